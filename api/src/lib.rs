//! `loraplane-api`: the only door between the paying world and the cluster. Stripe webhooks and
//! the service API turn paid orders into `LoRATrainingJob`s; uploads and downloads go straight
//! to regional S3 through presigned URLs; erasure and the retention loop delete a job's data on
//! time and leave an audit record. All state lives in Kubernetes and S3.
//!
//! Pure logic (signatures, orders, retention decisions, zip validation) is in its own modules
//! with unit tests; `app` does the I/O, `http` is the surface.

pub mod app;
pub mod config;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod order;
pub mod receipt;
pub mod retention;
pub mod storage;
pub mod stripe;
pub mod zipcheck;

pub use loraplane_crds::tls::install_crypto_provider;
