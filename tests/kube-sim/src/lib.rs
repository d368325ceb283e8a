//! kube-sim: a Kubernetes API emulator with simulated GPU nodes, for loraplane's tests and
//! demo. See `README.md` for what it emulates and where it differs from a real apiserver.
//!
//! - `apiserver`: the REST API over HTTP on 127.0.0.1 (storage, watch, CRDs, faults).
//! - `cluster`: simulated nodes from a topology file, a scheduler and kubelets, all talking to
//!   the apiserver through a `kube::Client` like kwok does.
//! - `schema`: CRD schema enforcement (pruning, defaulting, validation, CEL).
//! - `logs`: the container logs the kubelets capture and `pods/log` serves.
//!
//! Entry point: `KubeSim::start(SimConfig)`.

pub mod cluster;
pub mod logs;
pub mod schema;
