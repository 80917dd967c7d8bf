//! `wiremesh lab`: a multi-node cluster out of network namespaces. (Filled in next.)
