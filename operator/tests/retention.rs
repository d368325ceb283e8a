//! The operator keeps every retention and erasure promise, against kube-sim and a real
//! SeaweedFS: inputs go when due, then the job object with everything left of it; an erasure
//! stops the job before it deletes anything, survives S3 failing and an operator restart, and
//! never deletes a dataset another job reads; privacy fields cannot be changed (checked with
//! the real `kubectl`). What stays is the audit record, without customer text. With consent a
//! successful job is copied into its region's corpus, and withdrawal deletes the copy; uploads
//! no order consumed go after their TTL; a bucket that keeps versions keeps none of a job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use loraplane_crds::LoRATrainingJob;

const LIMIT: Duration = Duration::from_secs(90);

fn uid(job: &LoRATrainingJob) -> String {
    job.metadata.uid.clone().unwrap()
}

async fn request_erasure(client: &kube::Client, name: &str, reason: &str) {
    Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"erasure": {
                "requestedAt": k8s_openapi::jiff::Timestamp::now().to_string(),
                "reason": reason,
            }}})),
        )
        .await
        .unwrap();
}

/// Waits until the job object is gone, collecting the names of every pod of it seen meanwhile.
async fn wait_gone(
    client: &kube::Client,
    job: &LoRATrainingJob,
    within: Duration,
) -> BTreeSet<String> {
    let jobs = Api::<LoRATrainingJob>::namespaced(client.clone(), NS);
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let lp = ListParams::default().labels(&format!("loraplane.io/job-uid={}", uid(job)));
    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        for p in pods.list(&lp).await.unwrap().items {
            seen.insert(p.metadata.name.unwrap_or_default());
        }
        let left = jobs
            .get_opt(job.metadata.name.as_deref().unwrap())
            .await
            .unwrap();
        if left.is_none() {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job not deleted; status: {:?}",
            left.and_then(|j| j.status)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing of the job left in the cluster: pods, claims, Secret.
async fn assert_no_children(client: &kube::Client, job: &LoRATrainingJob) {
    let lp = ListParams::default().labels(&format!("loraplane.io/job-uid={}", uid(job)));
    let pods = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
        .items;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
        .items;
    let secrets = Api::<Secret>::namespaced(client.clone(), NS)
        .list(&lp)
        .await
        .unwrap()
        .items;
    assert!(
        pods.is_empty() && claims.is_empty() && secrets.is_empty(),
        "left: {} pods, {} claims, {} secrets",
        pods.len(),
        claims.len(),
        secrets.len()
    );
}

/// `loraplane_retention_deletions_total{what, reason}`.
fn deletions(op: &Operator, what: &str, reason: &str) -> Option<f64> {
    metric(
        op,
        &format!(r#"loraplane_retention_deletions_total{{reason="{reason}",what="{what}"}}"#),
    )
}

fn metric(op: &Operator, line_start: &str) -> Option<f64> {
    op.metrics
        .render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_the_inputs_then_the_job_and_every_byte() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_millis(500)), 0, 5)],
        )
        .await;
        let client = sim.client();
        let s3 = S3::start().await;
        let op = Operator::start_with(
            client.clone(),
            s3.platform("trainer:ok", 30),
            s3.storage(),
            "op-a",
        );
        let created = create_job(
            &client,
            &job(
                "kept",
                serde_json::json!({"retention": {"keepInputsSeconds": 1, "keepOutputsSeconds": 4}}),
            ),
        )
        .await;
        s3.seed_job(&created).await;
        let done = wait_job(&client, "kept", Duration::from_secs(30), "Succeeded", |j| {
            phase(j) == Some("Succeeded")
        })
        .await;
        // The operator put its finalizer on before the first pod.
        assert!(
            done.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == "loraplane.io/data"))
        );

        // Inputs first: dataset, checkpoints in every region, claims; the LoRA stays.
        let inputs_gone = wait_job(
            &client,
            "kept",
            Duration::from_secs(10),
            "inputs deleted",
            |j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.retention.as_ref())
                    .is_some_and(|r| r.inputs_deleted_at.is_some())
            },
        )
        .await;
        let r = inputs_gone.status.unwrap().retention.unwrap();
        assert!(
            r.released_at.is_some(),
            "the Secret and finished pods went at the end"
        );
        assert!(
            r.inputs_deleted_at.unwrap().0 >= r.inputs_expire_at.unwrap().0,
            "not before due"
        );
        let left = s3.keys().await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with("outputs-eu-west/"), "{left:?}");

        // Then the outputs, and with them the job object itself.
        wait_gone(&client, &created, Duration::from_secs(15)).await;
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        assert_no_children(&client, &created).await;
        let record = audit_record(&client, &uid(&created)).await;
        assert_eq!(record["reason"], "retention");
        assert_eq!(record["phase"], "Succeeded");
        assert_eq!(
            record["objectsDeleted"], "4",
            "the inputs deleted earlier count too: {record:?}"
        );
        assert_eq!(record["tenant"], NS);
        assert!(record.contains_key("inputsDeletedAt") && record.contains_key("keepUntil"));
        let text = serde_json::to_string(&record).unwrap();
        for private in ["zxqsecret", "private description", "kept", &uid(&created)] {
            assert!(!text.contains(private), "{private} in {text}");
        }
        assert_eq!(deletions(&op, "inputs", "retention"), Some(1.0));
        assert_eq!(deletions(&op, "job", "retention"), Some(1.0));
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_of_a_running_job_stops_it_first_and_no_attempt_follows() {
    tokio::time::timeout(LIMIT, async {
        let (sim, client, s3, op) = start_with_s3(script("trainer:long", None, 0, 0)).await;
        let created = create_running(&client, "erased", serde_json::json!({})).await;
        s3.seed_job(&created).await;
        request_erasure(&client, "erased", "customerRequest").await;
        let pods = wait_gone(&client, &created, Duration::from_secs(20)).await;
        assert_eq!(
            pods.into_iter().collect::<Vec<_>>(),
            vec!["erased-a0".to_string()],
            "no attempt may start after the erasure request"
        );
        assert_no_children(&client, &created).await;
        // Look twice, a second apart: nothing writes after the sweep.
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        let record = audit_record(&client, &uid(&created)).await;
        assert_eq!(record["reason"], "customerRequest");
        assert_eq!(record["phase"], "Cancelled");
        assert_eq!(record["objectsDeleted"], "4", "{record:?}");
        assert!(record.contains_key("erasureRequestedAt"));
        assert_eq!(deletions(&op, "job", "customerRequest"), Some(1.0));
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_with_s3_failing_is_visible_and_completes_after_a_restart() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_millis(300)), 0, 5)],
        )
        .await;
        let client = sim.client();
        let s3 = S3::start().await;
        let platform = s3.platform("trainer:ok", 30);
        // S3 unreachable for the first operator: nothing listens on the discard port.
        let broken = storage_without_s3(&platform_with_s3("trainer:ok", 30, "http://127.0.0.1:9"));
        let first = Operator::start_with(client.clone(), platform.clone(), broken, "op-a");
        let created = create_job(&client, &job("stuck", serde_json::json!({}))).await;
        s3.seed_job(&created).await;
        wait_job(
            &client,
            "stuck",
            Duration::from_secs(30),
            "Succeeded",
            |j| phase(j) == Some("Succeeded"),
        )
        .await;
        request_erasure(&client, "stuck", "refund").await;
        let failing = wait_job(
            &client,
            "stuck",
            Duration::from_secs(30),
            "a DeletionFailed condition",
            |j| {
                condition(j, "Deleting")
                    .is_some_and(|(status, reason)| status == "True" && reason == "DeletionFailed")
            },
        )
        .await;
        assert!(failing.metadata.deletion_timestamp.is_some());
        let overdue = metric(
            &first,
            r#"loraplane_retention_overdue_jobs{what="erasure"}"#,
        );
        assert_eq!(overdue, Some(1.0), "{}", first.metrics.render());
        assert_eq!(s3.keys().await.len(), 4, "nothing deleted while S3 fails");
        first.stop().await;

        // A new operator (S3 reachable again) finishes the job from where the finalizer kept it.
        let second = Operator::start_with(client.clone(), platform, s3.storage(), "op-b");
        wait_gone(&client, &created, Duration::from_secs(30)).await;
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        assert_no_children(&client, &created).await;
        let record = audit_record(&client, &uid(&created)).await;
        assert_eq!(record["reason"], "refund");
        second.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_another_job_reads_outlives_the_first_job() {
    tokio::time::timeout(LIMIT, async {
        let (sim, client, s3, op) = start_with_s3(script("trainer:long", None, 0, 0)).await;
        // The API's claim on the upload both orders read (made by hand here).
        let claim = loraplane_crds::layout::upload_claim_name("s3://datasets-eu-west/d.zip");
        let leases =
            Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), NS);
        leases
            .create(
                &Default::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": claim}})).unwrap(),
            )
            .await
            .unwrap();
        let one = create_job(&client, &job("one", serde_json::json!({}))).await;
        // The same upload, placed elsewhere so both run at once.
        let two = create_job(
            &client,
            &job(
                "two",
                serde_json::json!({"placement": {"residency": "eea", "regions": ["eu-north"]}}),
            ),
        )
        .await;
        s3.seed_job(&one).await;
        for name in ["one", "two"] {
            wait_job(&client, name, Duration::from_secs(20), "Running", |j| {
                phase(j) == Some("Running")
            })
            .await;
        }
        request_erasure(&client, "one", "customerRequest").await;
        wait_gone(&client, &one, Duration::from_secs(20)).await;
        assert_eq!(
            s3.keys().await,
            vec!["datasets-eu-west/d.zip".to_string()],
            "job two still reads the dataset"
        );
        assert!(
            leases.get_opt(&claim).await.unwrap().is_some(),
            "and its claim"
        );
        request_erasure(&client, "two", "customerRequest").await;
        wait_gone(&client, &two, Duration::from_secs(20)).await;
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        assert!(
            leases.get_opt(&claim).await.unwrap().is_none(),
            "the claim went with the upload"
        );
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// The keys left in one region's corpus bucket.
async fn corpus_keys(s3: &S3) -> Vec<String> {
    s3.keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with("corpus-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consented_data_is_copied_to_the_corpus_and_withdrawal_deletes_it() {
    tokio::time::timeout(LIMIT, async {
        let lora = "s3://outputs-eu-west/default/lora-of-the-test.safetensors";
        let summary = loraplane_crds::trainer::TrainerSummary {
            outcome: loraplane_crds::trainer::Outcome::Succeeded,
            step: 100,
            artifacts: vec![loraplane_crds::trainer::ArtifactInfo {
                format: "kohya".into(),
                uri: lora.into(),
                sha256: "b".repeat(64),
                bytes: 4,
            }],
            error: None,
        };
        let mut rule = script("trainer:ok", Some(Duration::from_millis(300)), 0, 5);
        rule.script.termination_message = Some(serde_json::to_string(&summary).unwrap());
        let (sim, client, s3, op) = start_with_s3(rule).await;
        s3.put(
            "outputs-eu-west",
            "default/lora-of-the-test.safetensors",
            b"lora",
        )
        .await;
        let keep = serde_json::json!({"keepInputsSeconds": 60, "keepOutputsSeconds": 120});
        let consenting = create_job(
            &client,
            &job(
                "consenting",
                serde_json::json!({"retention": keep, "dataUse": {"trainingConsent": true}}),
            ),
        )
        .await;
        let declining = create_job(
            &client,
            &job("declining", serde_json::json!({"retention": keep})),
        )
        .await;
        s3.seed_job(&consenting).await;
        s3.seed_job(&declining).await;
        wait_job(
            &client,
            "declining",
            Duration::from_secs(30),
            "Succeeded",
            |j| phase(j) == Some("Succeeded"),
        )
        .await;
        let copied_at = |j: &LoRATrainingJob| {
            j.status
                .as_ref()
                .and_then(|s| s.retention.as_ref())
                .and_then(|r| r.corpus_copied_at.clone())
        };
        wait_job(
            &client,
            "consenting",
            Duration::from_secs(30),
            "the corpus copy",
            |j| copied_at(j).is_some(),
        )
        .await;
        let prefix = format!("corpus-eu-west/{NS}/consenting-{}/", uid(&consenting));
        // The LoRA the scripted trainer reports lies outside the job's own layout (its uid is
        // not known when the script is written): like any file another job wrote, it is not
        // copied. The dataset is.
        assert_eq!(
            corpus_keys(&s3).await,
            vec![format!("{prefix}dataset.zip")],
            "the consenting job's dataset, no foreign file, nothing of the declining job"
        );
        let declined = Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
            .get("declining")
            .await
            .unwrap();
        assert!(copied_at(&declined).is_none());

        // Withdrawal deletes the copy; the job and its own data stay until their retention.
        Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
            .patch(
                "consenting",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"dataUse": {"consentWithdrawn": true}}})),
            )
            .await
            .unwrap();
        wait_job(
            &client,
            "consenting",
            Duration::from_secs(10),
            "the copy deleted",
            |j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.retention.as_ref())
                    .is_some_and(|r| r.corpus_deleted_at.is_some())
            },
        )
        .await;
        assert!(
            corpus_keys(&s3).await.is_empty(),
            "{:?}",
            corpus_keys(&s3).await
        );
        assert_eq!(deletions(&op, "corpus", "withdrawal"), Some(1.0));
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_uploads_and_drafts_go_after_their_ttl_and_ordered_ones_stay() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let s3 = S3::start().await;
        let mut platform = s3.platform("trainer:long", 30);
        platform.defaults.upload_ttl_seconds = 1;
        let mut settings =
            loraplane_operator::config::Settings::for_tests(platform, NS, "op-a");
        settings.upload_sweep = Duration::from_millis(300);
        let ordered = "uploads/default/0123456789abcdef0123456789abcdef.zip";
        let unordered = "uploads/us/fedcba9876543210fedcba9876543210.zip";
        // A draft order (customer text) is never a job's dataset: it goes with the TTL too.
        let draft = "drafts/default/00112233445566778899aabbccddeeff.json";
        s3.put("datasets-eu-west", ordered, b"zip").await;
        s3.put("datasets-us-east", unordered, b"zip").await;
        s3.put("datasets-eu-west", draft, b"{}").await;
        create_job(
            &client,
            &job(
                "ordered",
                serde_json::json!({"dataset": {"uri": format!("s3://datasets-eu-west/{ordered}"), "sha256": "a".repeat(64)}}),
            ),
        )
        .await;
        let op = Operator::start_configured(client.clone(), settings, s3.storage());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while s3
            .keys()
            .await
            .iter()
            .any(|k| k.ends_with(unordered) || k.ends_with(draft))
        {
            assert!(tokio::time::Instant::now() < deadline, "unordered upload or draft kept");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            s3.keys().await,
            vec![format!("datasets-eu-west/{ordered}")],
            "the ordered upload stays"
        );
        // The two may go in different sweeps; a sweep counts what it deleted when it ends.
        while deletions(&op, "upload", "unordered") != Some(2.0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "deletions counted: {:?}",
                deletions(&op, "upload", "unordered")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_leaves_no_old_version_in_a_versioned_bucket() {
    tokio::time::timeout(LIMIT, async {
        let (sim, client, s3, op) = start_with_s3(script("trainer:long", None, 0, 0)).await;
        let bucket = "checkpoints-eu-west";
        s3.fs
            .client()
            .put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(
                aws_sdk_s3::types::VersioningConfiguration::builder()
                    .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let created = create_running(&client, "versioned", serde_json::json!({})).await;
        s3.seed_job(&created).await;
        // A second checkpoint over the first: the bucket now keeps two versions of it.
        s3.seed_job(&created).await;
        let versions = |s3: &S3| {
            let client = s3.fs.client();
            async move {
                let out = client
                    .list_object_versions()
                    .bucket(bucket)
                    .send()
                    .await
                    .unwrap();
                out.versions().len() + out.delete_markers().len()
            }
        };
        assert_eq!(versions(&s3).await, 2);
        request_erasure(&client, "versioned", "customerRequest").await;
        wait_gone(&client, &created, Duration::from_secs(20)).await;
        assert_eq!(
            versions(&s3).await,
            0,
            "old versions and delete markers are gone too"
        );
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// The privacy fields and the one-way intents, refused by the apiserver with its own words,
/// as a platform engineer would meet them with `kubectl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_fields_and_intents_cannot_be_changed_back_with_kubectl() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![]).await;
        let client = sim.client();
        create_job(
            &client,
            &job(
                "fixed",
                serde_json::json!({
                    "retention": {"mode": "standard"},
                    "dataUse": {"trainingConsent": true, "consentWithdrawn": true},
                    "cancel": true,
                    "erasure": {"requestedAt": "2026-12-01T00:00:00Z", "reason": "customerRequest"}
                }),
            ),
        )
        .await;
        let dir = tempfile_dir();
        let kubeconfig = dir.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).unwrap();
        for (patch, message) in [
            (
                r#"{"spec":{"placement":{"residency":"any"}}}"#,
                "spec.placement.residency is immutable",
            ),
            (
                r#"{"spec":{"retention":{"mode":"zeroRetention","keepInputsSeconds":0}}}"#,
                "spec.retention.mode is immutable",
            ),
            (
                r#"{"spec":{"dataUse":{"trainingConsent":false}}}"#,
                "spec.dataUse.trainingConsent is immutable",
            ),
            (
                r#"{"spec":{"dataUse":{"consentWithdrawn":false}}}"#,
                "spec.dataUse.consentWithdrawn cannot be undone",
            ),
            (
                r#"{"spec":{"cancel":false}}"#,
                "spec.cancel cannot be undone",
            ),
            (
                r#"{"spec":{"erasure":null}}"#,
                "spec.erasure cannot be changed or withdrawn",
            ),
            (
                r#"{"spec":{"erasure":{"requestedAt":"2026-12-02T00:00:00Z","reason":"refund"}}}"#,
                "spec.erasure cannot be changed or withdrawn",
            ),
        ] {
            let out = tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args([
                    "-n", NS, "patch", "ltj", "fixed", "--type", "merge", "-p", patch,
                ])
                .output()
                .await
                .expect("kubectl must be on PATH (Debian: apt-get install kubernetes-client)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{patch} was accepted");
            assert!(stderr.contains("is invalid"), "{patch}: {stderr}");
            assert!(stderr.contains(message), "{patch}: {stderr}");
        }
        let kept = Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
            .get("fixed")
            .await
            .unwrap();
        assert_eq!(
            kept.spec.placement.residency,
            loraplane_crds::v1alpha1::Residency::Eea
        );
        assert!(kept.spec.data_use.training_consent && kept.spec.cancel);
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "loraplane-op-kubectl-{}-{}",
        std::process::id(),
        k8s_openapi::jiff::Timestamp::now().as_nanosecond()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
