//! The operator's leader election is the shared Lease election of `loraplane-crds`: only the
//! holder reconciles and writes status.

pub use loraplane_crds::leader::{Election, LeaderError, expired};
