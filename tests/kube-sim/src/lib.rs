//! kube-sim: a Kubernetes API emulator with simulated GPU nodes, for loraplane's tests and
//! demo. See `README.md` for what it emulates and where it differs from a real apiserver.

pub mod schema;
