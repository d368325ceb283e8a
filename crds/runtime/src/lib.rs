//! `loraplane-runtime`: the parts the operator and the API both run but the trainer never
//! links: S3 access for every configured region (`storage`), the Lease election (`leader`),
//! the logging convention (`logging`) and the process-wide TLS provider (`tls`). The contracts they act on (job types, label keys, the S3 layout) stay in
//! `loraplane-crds`.

pub mod leader;
pub mod logging;
pub mod storage;
pub mod tls;
