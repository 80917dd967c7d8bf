//! Real kernel subsystems over rtnetlink and WireGuard's generic netlink. (Filled in next.)
