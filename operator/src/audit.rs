//! The audit record a deleted job leaves behind, built as a pure function.
//!
//! A job's object, Secret, pods, claims and S3 data all go when its retention ends or its
//! erasure is requested; what a platform team (or an auditor) may still need is *that* the
//! job existed and *what happened to its data*. That is one ConfigMap per job in the
//! operator's namespace, labelled `loraplane.io/record=job-audit`:
//!
//! ```sh
//! kubectl -n loraplane-system get configmaps -l loraplane.io/record=job-audit -L loraplane.io/tenant,loraplane.io/reason
//! ```
//!
//! A ConfigMap, not a CRD of its own: every cluster and every tool can list and export it, the
//! operator needs no second schema, and the records live in the operator's namespace, apart
//! from tenants. It holds the SHA-256 of the job's uid (the uid itself links to logs, the hash
//! only to someone who already has the uid), the tenant (namespace), the regions the job's
//! data touched, its times, what was deleted (counts and bytes) and why, and the refund of a
//! paid job that ended badly (its reason and state, as the API recorded them). Never customer text,
//! file names, job names or payment ids. Records are deleted once `keepUntil` passes (default
//! three years).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use loraplane_crds::LoRATrainingJob;
use loraplane_crds::layout::{
    ANNOTATION_REFUND, AUDIT_RECORD, LABEL_MANAGED_BY, LABEL_RECORD, parse_refund_annotation,
};
use loraplane_runtime::storage::Deleted;
use sha2::{Digest, Sha256};

use crate::lifecycle::Cause;
use crate::resources::MANAGED_BY;

/// Label holding the tenant (the job's namespace) of an audit record.
pub const LABEL_TENANT: &str = "loraplane.io/tenant";
/// Label holding why the job's data was deleted.
pub const LABEL_REASON: &str = "loraplane.io/reason";
/// The data key holding the time after which the record itself is deleted (RFC 3339).
pub const KEEP_UNTIL: &str = "keepUntil";

/// Lowercase hex SHA-256 of a job uid.
pub fn uid_hash(uid: &str) -> String {
    hex_lower(&Sha256::digest(uid.as_bytes()))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The record's name: derived from the uid, so writing it twice is a no-op.
pub fn record_name(uid: &str) -> String {
    format!("ltj-audit-{}", &uid_hash(uid)[..32])
}

/// The regions a job's data may have touched: the dataset's and every attempt's (its
/// checkpoints and outputs live in its home region, which is one of them).
pub fn regions(job: &LoRATrainingJob) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = job.spec.dataset.region.iter().cloned().collect();
    if let Some(st) = &job.status {
        out.extend(st.attempts.iter().map(|a| a.region.clone()));
    }
    out
}

/// What the audit record says about one deletion.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// The job, as last stored.
    pub job: &'a LoRATrainingJob,
    /// Why its data went.
    pub cause: Cause,
    /// What the purge deleted (the record adds what the status says went before).
    pub deleted: Deleted,
    /// The job's copy in the consented corpus stays (the customer consented, and neither
    /// withdrew nor asked for erasure).
    pub corpus_kept: bool,
    /// When the purge finished.
    pub at: Timestamp,
    /// How long the record is kept.
    pub keep: std::time::Duration,
}

/// The refund the API recorded on a paid job that ended badly ([`ANNOTATION_REFUND`]:
/// `<reason>/<state>`), if it has the shape the API writes: anything else is not copied.
pub fn refund(job: &LoRATrainingJob) -> Option<(&str, &str)> {
    parse_refund_annotation(job.metadata.annotations.as_ref()?.get(ANNOTATION_REFUND)?)
}

/// Builds the audit record.
pub fn record(namespace: &str, e: &Entry<'_>) -> ConfigMap {
    let job = e.job;
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let tenant = job.metadata.namespace.clone().unwrap_or_default();
    let time = |t: Option<Timestamp>| t.map(|t| t.to_string()).unwrap_or_default();
    let status = job.status.as_ref();
    let ret = status.and_then(|s| s.retention.as_ref());
    let keep = i64::try_from(e.keep.as_secs()).unwrap_or(i64::MAX);
    // What went while the job lived (inputs, a withdrawn corpus copy) plus the purge.
    let earlier_objects = ret.and_then(|r| r.deleted_objects).unwrap_or(0);
    let earlier_bytes = ret.and_then(|r| r.deleted_bytes).unwrap_or(0);
    let total = |earlier: i64, now: u64| {
        u64::try_from(earlier)
            .unwrap_or(0)
            .saturating_add(now)
            .to_string()
    };
    let keep_until =
        Timestamp::from_second(e.at.as_second().saturating_add(keep)).unwrap_or(Timestamp::MAX);
    let mut data = BTreeMap::from([
        ("jobUidSha256".to_string(), uid_hash(&uid)),
        ("tenant".to_string(), tenant.clone()),
        (
            "regions".to_string(),
            regions(job).into_iter().collect::<Vec<_>>().join(","),
        ),
        ("reason".to_string(), e.cause.as_str().to_string()),
        (
            "createdAt".to_string(),
            time(job.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        ),
        (
            "completedAt".to_string(),
            time(status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0)),
        ),
        (
            "phase".to_string(),
            status
                .and_then(|s| s.phase)
                .map_or("", |p| p.as_str())
                .to_string(),
        ),
        (
            "inputsDeletedAt".to_string(),
            time(ret.and_then(|r| r.inputs_deleted_at.as_ref()).map(|t| t.0)),
        ),
        ("deletedAt".to_string(), e.at.to_string()),
        (
            "objectsDeleted".to_string(),
            total(earlier_objects, e.deleted.objects),
        ),
        (
            "bytesDeleted".to_string(),
            total(earlier_bytes, e.deleted.bytes),
        ),
        (KEEP_UNTIL.to_string(), keep_until.to_string()),
    ]);
    if let Some(t) = ret.and_then(|r| r.corpus_copied_at.as_ref()) {
        data.insert("corpusCopiedAt".into(), t.0.to_string());
        data.insert("corpusKept".into(), e.corpus_kept.to_string());
    }
    if let Some(er) = &job.spec.erasure {
        data.insert("erasureRequestedAt".into(), er.requested_at.0.to_string());
    }
    if let Some((reason, state)) = refund(job) {
        data.insert("refundReason".into(), reason.to_string());
        data.insert("refundState".into(), state.to_string());
    }
    data.retain(|_, v| !v.is_empty());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(record_name(&uid)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
                (LABEL_RECORD.to_string(), AUDIT_RECORD.to_string()),
                (LABEL_TENANT.to_string(), tenant),
                (LABEL_REASON.to_string(), e.cause.as_str().to_string()),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Whether a record's `keepUntil` has passed.
pub fn expired(record: &ConfigMap, now: Timestamp) -> bool {
    record
        .data
        .as_ref()
        .and_then(|d| d.get(KEEP_UNTIL))
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_some_and(|t| t <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use loraplane_crds::v1alpha1::{
        Attempt, ErasureReason, ErasureRequest, LoRATrainingJobStatus, Phase,
    };
    use std::time::Duration;

    fn job() -> LoRATrainingJob {
        let mut j: LoRATrainingJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "loraplane.io/v1alpha1", "kind": "LoRATrainingJob",
            "metadata": {"name": "order-secretname", "namespace": "tenant-a", "uid": "uid-1",
                         "labels": {"loraplane.io/payment": "pay-hash"}},
            "spec": {
                "baseModel": {"family": "sd15"},
                "concept": {"type": "character", "triggerWord": "zqxtrigger",
                            "description": "my private words"},
                "dataset": {"uri": "s3://datasets-eu/uploads/tenant-a/holiday-photos.zip",
                            "sha256": "0".repeat(64), "region": "eu-west"}
            }
        }))
        .unwrap();
        j.spec.erasure = Some(ErasureRequest {
            requested_at: Time(Timestamp::from_second(1_800_000_000).unwrap()),
            reason: ErasureReason::Refund,
        });
        j.status = Some(LoRATrainingJobStatus {
            phase: Some(Phase::Cancelled),
            attempts: vec![Attempt {
                region: "eu-north".into(),
                pool: "p".into(),
                ..Attempt::default()
            }],
            ..LoRATrainingJobStatus::default()
        });
        j
    }

    fn entry(j: &LoRATrainingJob) -> Entry<'_> {
        Entry {
            job: j,
            cause: Cause::Erasure(ErasureReason::Refund),
            deleted: Deleted {
                objects: 3,
                bytes: 1234,
            },
            corpus_kept: false,
            at: Timestamp::from_second(1_800_000_010).unwrap(),
            keep: Duration::from_secs(100),
        }
    }

    #[test]
    fn the_record_says_what_went_and_why_without_customer_text() {
        let j = job();
        let cm = record("loraplane-system", &entry(&j));
        let text = serde_json::to_string(&cm).unwrap();
        for secret in [
            "zqxtrigger",
            "private",
            "holiday",
            "order-secretname",
            "pay-hash",
            "uid-1\"",
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {text}");
        }
        let data = cm.data.unwrap();
        assert_eq!(data["reason"], "refund");
        assert_eq!(data["regions"], "eu-north,eu-west");
        assert_eq!(data["objectsDeleted"], "3");
        assert_eq!(data["bytesDeleted"], "1234");
        assert_eq!(data["tenant"], "tenant-a");
        assert_eq!(data["jobUidSha256"], uid_hash("uid-1"));
        assert!(data.contains_key("erasureRequestedAt"));
        assert_eq!(cm.metadata.name.unwrap(), record_name("uid-1"));
    }

    #[test]
    fn counts_add_what_went_while_the_job_lived_to_the_purge() {
        let mut j = job();
        if let Some(st) = j.status.as_mut() {
            st.retention = Some(loraplane_crds::v1alpha1::RetentionStatus {
                deleted_objects: Some(2),
                deleted_bytes: Some(100),
                corpus_copied_at: Some(Time(Timestamp::from_second(1_799_999_000).unwrap())),
                ..Default::default()
            });
        }
        let data = record("ns", &entry(&j)).data.unwrap();
        assert_eq!(data["objectsDeleted"], "5");
        assert_eq!(data["bytesDeleted"], "1334");
        assert_eq!(data["corpusKept"], "false");
        assert!(data.contains_key("corpusCopiedAt"));
    }

    #[test]
    fn a_refund_the_api_recorded_is_kept_and_anything_else_is_not() {
        let mut j = job();
        let data = record("ns", &entry(&j)).data.unwrap();
        assert!(!data.contains_key("refundState"));
        j.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_REFUND.to_string(),
            "jobFailed/succeeded".to_string(),
        )]));
        let data = record("ns", &entry(&j)).data.unwrap();
        assert_eq!(data["refundReason"], "jobFailed");
        assert_eq!(data["refundState"], "succeeded");
        for bad in [
            "pi_123/succeeded",
            "jobFailed",
            "a b/c",
            "jobFailed/succeeded/x",
        ] {
            j.metadata.annotations = Some(BTreeMap::from([(
                ANNOTATION_REFUND.to_string(),
                bad.to_string(),
            )]));
            let data = record("ns", &entry(&j)).data.unwrap();
            assert!(!data.contains_key("refundReason"), "{bad} was copied");
        }
    }

    #[test]
    fn records_expire_after_their_keep_period() {
        let j = job();
        let cm = record("ns", &entry(&j));
        assert!(!expired(
            &cm,
            Timestamp::from_second(1_800_000_109).unwrap()
        ));
        assert!(expired(&cm, Timestamp::from_second(1_800_000_110).unwrap()));
    }
}
