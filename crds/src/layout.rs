//! Names more than one crate relies on, defined once: the label keys on jobs, their children
//! and the records that outlive them, and where a job's data lies in S3. The operator writes
//! by these names, the API and the trainer read by them, and cleanup deletes by them, so a
//! rename here is a rename everywhere.

/// Label marking every object a loraplane component creates (`app.kubernetes.io/managed-by`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label holding a child's job name.
pub const LABEL_JOB: &str = "loraplane.io/job";
/// Label holding a child's job uid (what the operator selects a job's pods by).
pub const LABEL_JOB_UID: &str = "loraplane.io/job-uid";
/// Label holding the pool of a pod.
pub const LABEL_POOL: &str = "loraplane.io/pool";
/// Label holding the region of a pod or claim.
pub const LABEL_REGION: &str = "loraplane.io/region";
/// Label on a job: the keyed hash of the order it was created for.
pub const LABEL_ORDER: &str = "loraplane.io/order";
/// Label on a job: the keyed hash of the payment that paid for it.
pub const LABEL_PAYMENT: &str = "loraplane.io/payment";
/// Label on an audit record: which kind of record it is (see [`AUDIT_RECORD`]).
pub const LABEL_RECORD: &str = "loraplane.io/record";
/// Value of [`LABEL_RECORD`] on the audit record a deleted job leaves behind.
pub const AUDIT_RECORD: &str = "job-audit";

/// The finalizer that guards a job's data in S3: the job object stays until its data is gone.
pub const DATA_FINALIZER: &str = "loraplane.io/data";

/// The key prefix, inside the checkpoints and outputs buckets, of everything one job writes:
/// `<namespace>/<name>-<uid>/`. The uid keeps a recreated job of the same name apart.
pub fn job_prefix(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}-{uid}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_keeps_namespace_name_and_uid_apart() {
        assert_eq!(job_prefix("ns", "job", "u-1"), "ns/job-u-1/");
    }
}
