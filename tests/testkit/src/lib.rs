//! The fixtures and helpers loraplane's tests share (a dev-dependency of the operator's and the
//! API's tests, a dependency of the e2e harness; never of a shipped binary):
//!
//! - `cluster`: a simulated cluster described once, as kube-sim's topology and as the platform
//!   configuration that matches it;
//! - `wait`: bounded polling of jobs (`wait_job`, `wait_gone`, `wait_until`) and status readers;
//! - `http`: a plain HTTP/1.1 client (what a browser or a storefront backend does);
//! - `api_config`: tenants and limits of the API's configuration;
//! - `stripe_events`: the webhook events Stripe sends.

pub mod api_config;
pub mod cluster;
pub mod http;
pub mod stripe_events;
pub mod wait;

pub use cluster::{Cluster, Family, Platform, Pool, Region};
pub use wait::{condition, phase, wait_gone, wait_job, wait_until};
