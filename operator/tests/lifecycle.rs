//! Job lifecycle against kube-sim: success, trainer failures (bad input, backoff), suspend and
//! resume, deletion.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use loraplane_crds::LoRATrainingJob;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_reaches_succeeded_with_progress_and_locked_down_pod() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_secs(3)), 0, 30)],
        )
        .await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        create_job(&client, &job("happy", serde_json::json!({}))).await;

        // Progress shows up while the trainer runs.
        let running = wait_job(&client, "happy", Duration::from_secs(20), "progress", |j| {
            j.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.step > 0 && p.total_steps == 30)
        })
        .await;
        let summary = running
            .status
            .as_ref()
            .unwrap()
            .progress
            .as_ref()
            .unwrap()
            .summary
            .clone()
            .unwrap();
        assert!(summary.contains("/30 "), "{summary}");
        // The pod as the cluster stores it while it trains: pinned, locked down, no customer
        // text.
        let pods = pods_of(&client, &running).await;
        assert_eq!(pods.len(), 1);
        let text = serde_json::to_string(&pods[0]).unwrap();
        assert!(!text.contains("zxqsecret") && !text.contains("private description"));
        let spec = pods[0].spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        let pool = &running
            .status
            .as_ref()
            .unwrap()
            .placement
            .as_ref()
            .unwrap()
            .pool;
        assert!(
            spec.node_name
                .as_deref()
                .unwrap()
                .starts_with(pool.as_str())
        );

        let done = wait_job(
            &client,
            "happy",
            Duration::from_secs(30),
            "Succeeded",
            |j| phase(j) == Some("Succeeded"),
        )
        .await;
        let st = done.status.clone().unwrap();
        assert_eq!(
            condition(&done, "Complete"),
            Some(("True".into(), "Completed".into()))
        );
        assert_eq!(st.attempts.len(), 1);
        let region = &st.placement.as_ref().unwrap().region;
        assert!(region.starts_with("eu-"), "eea job placed in {region}");
        assert_eq!(st.progress.as_ref().unwrap().last_checkpoint_step, Some(40));
        assert!(st.start_time.is_some() && st.completion_time.is_some());

        // Once the outcome is recorded nothing needs the finished pod or the Secret (which
        // holds the customer's text) again: both go; the claim waits for the inputs' expiry.
        let released = wait_job(&client, "happy", Duration::from_secs(10), "released", |j| {
            j.status
                .as_ref()
                .and_then(|s| s.retention.as_ref())
                .is_some_and(|r| r.released_at.is_some() && r.inputs_expire_at.is_some())
        })
        .await;
        assert!(pods_of(&client, &released).await.is_empty());
        let secret = Api::<Secret>::namespaced(client.clone(), NS)
            .get_opt("happy-trainer-config")
            .await
            .unwrap();
        assert!(secret.is_none());
        let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
            .list(&ListParams::default().labels(&format!(
                "loraplane.io/job-uid={}",
                done.metadata.uid.clone().unwrap()
            )))
            .await
            .unwrap();
        assert_eq!(claims.items.len(), 1);

        let metrics = op.metrics.render();
        assert!(
            metrics.contains("loraplane_job_creation_to_running_seconds_count 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"loraplane_jobs{phase="Succeeded"} 1"#),
            "{metrics}"
        );
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_at_once_and_crashes_fail_after_backoff_limit() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![
                script("trainer:bad", Some(Duration::from_millis(300)), 2, 3),
                script("trainer:crash", Some(Duration::from_millis(300)), 1, 3),
            ],
        )
        .await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:bad", 30), "op-a");
        create_job(&client, &job("bad", serde_json::json!({}))).await;
        let failed = wait_job(&client, "bad", Duration::from_secs(20), "Failed", |j| {
            phase(j) == Some("Failed")
        })
        .await;
        assert_eq!(condition(&failed, "Failed").unwrap().1, "BadInput");
        assert_eq!(
            failed.status.as_ref().unwrap().attempts.len(),
            1,
            "bad input is not retried"
        );
        op.stop().await;

        let op = Operator::start(client.clone(), platform("trainer:crash", 30), "op-b");
        create_job(
            &client,
            &job("crash", serde_json::json!({"backoffLimit": 1})),
        )
        .await;
        let failed = wait_job(&client, "crash", Duration::from_secs(30), "Failed", |j| {
            phase(j) == Some("Failed")
        })
        .await;
        let st = failed.status.clone().unwrap();
        assert_eq!(
            condition(&failed, "Failed").unwrap().1,
            "BackoffLimitExceeded"
        );
        assert_eq!(st.failures, Some(2));
        assert_eq!(st.attempts.len(), 2);
        assert!(
            st.attempts
                .iter()
                .all(|a| a.reason.as_deref() == Some("TrainerFailed"))
        );
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_removes_the_pod_keeps_the_claim_and_resume_continues() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:long", 30), "op-a");
        let created = create_job(&client, &job("pausable", serde_json::json!({}))).await;
        wait_job(
            &client,
            "pausable",
            Duration::from_secs(20),
            "Running",
            |j| phase(j) == Some("Running"),
        )
        .await;
        let api = Api::<LoRATrainingJob>::namespaced(client.clone(), NS);
        let suspend = |on: bool| serde_json::json!({"spec": {"suspend": on}});
        api.patch(
            "pausable",
            &PatchParams::default(),
            &Patch::Merge(suspend(true)),
        )
        .await
        .unwrap();
        let paused = wait_job(
            &client,
            "pausable",
            Duration::from_secs(20),
            "Suspended",
            |j| {
                condition(j, "Suspended").is_some_and(|c| c.0 == "True")
                    && phase(j) == Some("Pending")
            },
        )
        .await;
        assert_eq!(
            paused.status.as_ref().unwrap().attempts[0]
                .reason
                .as_deref(),
            Some("Suspended")
        );
        // The pod goes away; the claim stays.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let live: Vec<Pod> = pods_of(&client, &created)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            if live.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pod not removed on suspend"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(claims.items.len(), 1);

        api.patch(
            "pausable",
            &PatchParams::default(),
            &Patch::Merge(suspend(false)),
        )
        .await
        .unwrap();
        let resumed = wait_job(
            &client,
            "pausable",
            Duration::from_secs(20),
            "Running again",
            |j| {
                phase(j) == Some("Running")
                    && j.status.as_ref().is_some_and(|s| s.attempts.len() == 2)
            },
        )
        .await;
        let st = resumed.status.unwrap();
        assert_eq!(st.attempts[1].resumed_from_step, Some(40));
        assert_eq!(condition_of(&st, "Suspended"), Some("False".to_string()));
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

fn condition_of(st: &loraplane_crds::LoRATrainingJobStatus, t: &str) -> Option<String> {
    st.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

/// `kubectl delete` of a running job: the finalizer holds the object until its pods have
/// stopped and its data is gone; then the audit record says why (`deleted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_job_removes_its_pod_claim_secret_and_data() {
    tokio::time::timeout(LIMIT, async {
        let (sim, client, s3, op) = start_with_s3(script("trainer:long", None, 0, 0)).await;
        let created = create_running(&client, "doomed", serde_json::json!({})).await;
        Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
            .delete("doomed", &DeleteParams::default())
            .await
            .unwrap();
        let selector = format!(
            "loraplane.io/job-uid={}",
            created.metadata.uid.clone().unwrap()
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let lp = ListParams::default().labels(&selector);
            let pods = Api::<Pod>::namespaced(client.clone(), NS)
                .list(&lp)
                .await
                .unwrap()
                .items
                .len();
            let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
                .list(&lp)
                .await
                .unwrap()
                .items
                .len();
            let secrets = Api::<Secret>::namespaced(client.clone(), NS)
                .list(&lp)
                .await
                .unwrap()
                .items
                .len();
            let gone = Api::<LoRATrainingJob>::namespaced(client.clone(), NS)
                .get_opt("doomed")
                .await
                .unwrap()
                .is_none();
            if pods + claims + secrets == 0 && gone {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "children left: {pods} pods, {claims} claims, {secrets} secrets; job gone: {gone}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(s3.keys().await.is_empty(), "{:?}", s3.keys().await);
        let record = audit_record(&client, created.metadata.uid.as_deref().unwrap()).await;
        assert_eq!(record["reason"], "deleted");
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// A customer cancels: the API sets `spec.cancel`; the operator ends the attempt, deletes the
/// pod, writes phase Cancelled, releases the Secret, and never starts another attempt.
#[tokio::test]
async fn a_cancelled_job_loses_its_pod_and_secret_and_stays_cancelled() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:long", 30), "op-a");
        let created = create_job(&client, &job("refunded", serde_json::json!({}))).await;
        wait_job(
            &client,
            "refunded",
            Duration::from_secs(20),
            "Running",
            |j| phase(j) == Some("Running"),
        )
        .await;
        let api = Api::<LoRATrainingJob>::namespaced(client.clone(), NS);
        api.patch(
            "refunded",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": true}})),
        )
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let live = pods_of(&client, &created)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            if live == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pod of a cancelled job still runs"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = wait_job(
            &client,
            "refunded",
            Duration::from_secs(10),
            "released",
            |j| {
                j.status
                    .as_ref()
                    .and_then(|s| s.retention.as_ref())
                    .is_some_and(|r| r.released_at.is_some())
            },
        )
        .await;
        assert_eq!(phase(&after), Some("Cancelled"));
        assert_eq!(
            condition(&after, "Cancelled").map(|c| c.0),
            Some("True".to_string())
        );
        let st = after.status.clone().unwrap();
        assert_eq!(st.attempts.len(), 1, "no new attempt: {:?}", st.attempts);
        assert_eq!(st.attempts[0].reason.as_deref(), Some("CancelRequested"));
        let secret = Api::<Secret>::namespaced(client.clone(), NS)
            .get_opt("refunded-trainer-config")
            .await
            .unwrap();
        assert!(secret.is_none(), "the Secret goes once the job has ended");
        assert!(
            pods_of(&client, &created).await.is_empty(),
            "finished pods go once their outcome is recorded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = api.get("refunded").await.unwrap();
        assert_eq!(later.status.unwrap().attempts.len(), 1);
        op.stop().await;
    })
    .await
    .expect("test timed out");
}

/// `activeDeadlineSeconds` (at least 60 s by the schema) fails a running job and removes its
/// pod. Rather than wait a minute, the test backdates the open attempt's start in the status,
/// as the status of a job that has been training for two minutes would read; the operator
/// counts active time from `status.attempts`, so its next reconcile must end the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_deadline_fails_a_running_job_and_removes_its_pod() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:late", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:late", 30), "op-a");
        let created = create_job(
            &client,
            &job("late", serde_json::json!({"activeDeadlineSeconds": 60})),
        )
        .await;
        wait_job(&client, "late", Duration::from_secs(20), "Running", |j| {
            phase(j) == Some("Running")
        })
        .await;
        assert_eq!(
            pods_of(&client, &created).await.len(),
            1,
            "one pod runs before the deadline"
        );

        let api = Api::<LoRATrainingJob>::namespaced(client.clone(), NS);
        let two_minutes_ago = k8s_openapi::jiff::Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(120))
            .unwrap();
        loop {
            let mut current = api.get("late").await.unwrap();
            let status = current.status.as_mut().unwrap();
            let open = status.attempts.last_mut().unwrap();
            assert!(open.end_time.is_none(), "the attempt is still open");
            open.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                two_minutes_ago,
            ));
            let body = serde_json::json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "status": status,
            });
            // The operator writes progress meanwhile: retry on a conflict.
            match api
                .patch_status("late", &PatchParams::default(), &Patch::Merge(&body))
                .await
            {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => panic!("backdating the attempt failed: {e}"),
            }
        }

        let failed = wait_job(&client, "late", Duration::from_secs(20), "Failed", |j| {
            phase(j) == Some("Failed")
        })
        .await;
        assert_eq!(
            condition(&failed, "Failed"),
            Some(("True".into(), "DeadlineExceeded".into()))
        );
        let st = failed.status.clone().unwrap();
        let last = st.attempts.last().unwrap();
        assert_eq!(last.reason.as_deref(), Some("DeadlineExceeded"));
        assert!(last.end_time.is_some() && st.completion_time.is_some());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let live = pods_of(&client, &created)
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            if live == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pod of a job past its deadline still runs"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op.stop().await;
    })
    .await
    .expect("test timed out");
}

/// A job whose dataset lies in a US bucket while its residency is `eea` fails at once as bad
/// input, naming the rule, and no pod ever exists to read the data.
#[tokio::test]
async fn data_outside_the_residency_fails_as_bad_input_with_no_pod() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:ok", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        let created = create_job(
            &client,
            &job(
                "abroad",
                serde_json::json!({"dataset": {"uri": "s3://datasets-us-east/d.zip", "sha256": "a".repeat(64)}}),
            ),
        )
        .await;
        let failed = wait_job(&client, "abroad", Duration::from_secs(20), "Failed", |j| {
            phase(j) == Some("Failed")
        })
        .await;
        let cond = failed
            .status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .cloned()
            .unwrap();
        assert_eq!(cond.reason, "BadInput");
        assert!(
            cond.message
                .contains("the dataset lies in region us-east (us), which residency eea does not allow"),
            "{}",
            cond.message
        );
        assert!(failed.status.unwrap().attempts.is_empty());
        assert!(pods_of(&client, &created).await.is_empty());
        op.stop().await;
    })
    .await
    .expect("test finished in time");
}
