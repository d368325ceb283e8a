//! `loraplane-runtime`: the parts the operator and the API both run but the trainer never
//! links: S3 access for every configured region (`storage`) and the Lease election
//! (`leader`). The contracts they act on (job types, label keys, the S3 layout) stay in
//! `loraplane-crds`.

pub mod leader;
pub mod storage;
