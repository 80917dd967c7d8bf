//! etcd v3 with Calico's key layout. (Filled in next.)
