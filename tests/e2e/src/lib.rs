//! loraplane's end-to-end harness: the whole product on one machine, and a customer's journey
//! through it as reusable steps.
//!
//! - `stack`: kube-sim (three regions, simulated GPU nodes whose kubelets run the real
//!   `loraplane-trainer` binary), SeaweedFS with regional buckets, the operator and API
//!   replicas in-process, plus customer and auditor calls.
//! - `endpoints`: what a scenario talks to (Kubernetes API, the loraplane API, S3), for the
//!   local stack and for a real cluster alike.
//! - `journey`: the journey's steps and the timeline the demo prints.
//! - `config`: topology, platform and API configuration, the CRD as installed (pure).
//! - `fixtures`: tiny models, a generated dataset, LoRA checks.
//! - `helm`: the chart rendered by Helm's SDK.
//! - `http`: a plain HTTP client (what a browser does with presigned URLs).
//! - `trainer_bin`: finds or builds the trainer binary.
//! - `real`: Helm values, set-up and spot reclaim for running the journey on a real cluster.
//!
//! Scenarios live in `tests/` (`journey.rs`, `variants.rs`); the demo is
//! `src/bin/loraplane-demo.rs`; the real-cluster runner is `src/bin/loraplane-e2e-real.rs`.
//! See `README.md`.

pub mod config;
pub mod endpoints;
pub mod fixtures;
pub mod helm;
pub use loraplane_testkit::http;
pub mod journey;
pub mod real;
pub mod stack;
pub mod trainer_bin;
