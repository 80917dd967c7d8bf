//! wireguard-go driven over its UAPI socket. (Filled in next.)
