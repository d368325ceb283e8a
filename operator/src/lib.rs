//! `loraplane-operator`: reconciles LoRATrainingJobs into scratch claims, trainer-config
//! Secrets and locked-down GPU pods on node pools in the regions a job's data may go to, keeps
//! their status true, fails over on lost capacity and cleans up through owner references.
//!
//! Pure decisions (`placement`, `status`, `progress`, `resources`) are kept apart from the
//! I/O that observes and applies them (`controller`, `podcache`, `server`; the Lease election
//! is `loraplane_crds::leader`, shared with the API).

pub mod config;
pub mod controller;
pub mod metrics;
pub mod placement;
pub mod podcache;
pub mod progress;
pub mod resources;
pub mod server;
pub mod status;
