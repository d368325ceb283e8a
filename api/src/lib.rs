//! `loraplane-api`: the only door between the paying world and the cluster. Stripe webhooks and
//! the service API turn paid orders into `LoRATrainingJob`s; uploads and downloads go straight
//! to regional S3 through presigned URLs. Cancellation, erasure and refunds are *intent*
//! written on the job's spec: the operator owns every job's life from there, deletes its data
//! and leaves the audit record. All state lives in Kubernetes and S3.
//!
//! Pure logic (signatures, orders) is in its own modules with unit tests; the dataset rules and
//! checks are `loraplane-dataset`'s (the trainer's too), fed from S3 by `dataset_check`; `app`
//! does the I/O, `http` is the surface. S3 access is `loraplane_runtime::storage`, shared with
//! the operator.

pub mod app;
pub mod client_ip;
pub mod config;
pub mod dataset_check;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod notifier;
pub mod order;
pub mod outbox;
pub mod receipt;
pub mod refunds;
pub mod stripe;

pub use loraplane_runtime::tls::install_crypto_provider;
