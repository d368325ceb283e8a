//! `loraplane-operator`: reconciles LoRATrainingJobs into scratch claims, trainer-config
//! Secrets and locked-down GPU pods on node pools in the regions a job's data may go to, keeps
//! their status true, fails over on lost capacity, and keeps every retention and erasure
//! promise: from payment to the last byte, each job's life is the operator's.
//!
//! Pure decisions (`placement`, `status`, `progress`, `resources`, `lifecycle`, `audit`, and
//! `uploads::expired`) are kept apart from the I/O that observes and applies them
//! (`controller`, `cleanup`, `corpus`, `uploads::sweep`, `podcache`, `server`; the Lease
//! election and S3 access are `loraplane_runtime`).

pub mod audit;
pub mod cleanup;
pub mod config;
pub mod controller;
pub mod corpus;
pub mod grants;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod podcache;
pub mod progress;
pub mod resources;
pub mod server;
pub mod status;
pub mod uploads;
