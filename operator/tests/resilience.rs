//! Operations against kube-sim: a restart mid-flight makes no duplicate pods and loses no job,
//! two replicas never both reconcile, and 10% injected API errors still converge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restart_mid_flight_duplicates_nothing_and_loses_nothing() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_secs(3)), 0, 5)],
        )
        .await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        let names: Vec<String> = (0..6).map(|i| format!("restart-{i}")).collect();
        for n in &names {
            create_job(
                &client,
                &job(n, serde_json::json!({"placement": {"residency": "any"}})),
            )
            .await;
        }
        wait_job(&client, &names[0], Duration::from_secs(20), "a pod", |j| {
            j.status.as_ref().is_some_and(|s| !s.attempts.is_empty())
        })
        .await;
        op.stop().await;
        // Jobs created while no operator runs are picked up too.
        create_job(
            &client,
            &job(
                "restart-late",
                serde_json::json!({"placement": {"residency": "any"}}),
            ),
        )
        .await;
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-b");
        for n in names
            .iter()
            .chain(std::iter::once(&"restart-late".to_string()))
        {
            let done = wait_job(&client, n, Duration::from_secs(40), "Succeeded", |j| {
                phase(j) == Some("Succeeded")
            })
            .await;
            // One attempt, so one pod ever (pod names are per attempt); finished, it is gone.
            assert_eq!(done.status.unwrap().attempts.len(), 1, "{n}: one attempt");
        }
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_millis(500)), 0, 2)],
        )
        .await;
        let client = sim.client();
        let a = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !a.health.leading.load(Ordering::SeqCst) {
            assert!(tokio::time::Instant::now() < deadline, "op-a never led");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let b = Operator::start(client.clone(), platform("trainer:ok", 30), "op-b");
        create_job(&client, &job("leader-1", serde_json::json!({}))).await;
        wait_job(
            &client,
            "leader-1",
            Duration::from_secs(20),
            "Succeeded",
            |j| phase(j) == Some("Succeeded"),
        )
        .await;
        assert!(b.health.ready.load(Ordering::SeqCst), "a standby is ready");
        assert!(
            !b.health.leading.load(Ordering::SeqCst),
            "two leaders at once"
        );
        a.stop().await;
        create_job(&client, &job("leader-2", serde_json::json!({}))).await;
        wait_job(
            &client,
            "leader-2",
            Duration::from_secs(20),
            "Succeeded after failover",
            |j| phase(j) == Some("Succeeded"),
        )
        .await;
        assert!(b.health.leading.load(Ordering::SeqCst));
        b.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_api_errors_still_converge() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(
            topology(false),
            vec![script("trainer:ok", Some(Duration::from_secs(4)), 0, 3)],
        )
        .await;
        let client = sim.client();
        let names: Vec<String> = (0..8).map(|i| format!("flaky-{i}")).collect();
        for n in &names {
            create_job(
                &client,
                &job(n, serde_json::json!({"placement": {"residency": "any"}})),
            )
            .await;
        }
        // The faults are aimed at the operator's own client: kube-sim's kubelets do not retry
        // a lost pod-status write (a real kubelet does), so faulting them would test kube-sim.
        // They stay on from admission to completion.
        const AGENT: &str = "loraplane-operator-under-test";
        sim.faults().set_error_target(Some(AGENT));
        sim.faults().set_error_rate(0.1);
        let op_client = sim.client_as(AGENT).unwrap();
        let op = Operator::start(op_client, platform("trainer:ok", 30), "op-a");
        for n in &names {
            let j = wait_job(&client, n, Duration::from_secs(60), "Succeeded", |j| {
                phase(j) == Some("Succeeded")
            })
            .await;
            // One attempt, so one pod ever (pod names are per attempt).
            assert_eq!(j.status.unwrap().attempts.len(), 1, "{n}: one attempt");
        }
        let injected = sim.faults().injected_errors();
        sim.faults().clear();
        assert!(injected > 0, "faults were injected");
        let metrics = op.metrics.render();
        assert!(
            metrics.contains("loraplane_reconcile_errors_total"),
            "{metrics}"
        );
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

/// A replica told to stop the moment it leads, while its first list of jobs is still on the
/// way (a slow apiserver), stops anyway: kube-runtime's runner would wait for that list
/// forever once the shutdown has stopped the watch filling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_as_it_starts_leading_still_stops() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![]).await;
        let client = sim.client();
        create_job(
            &client,
            &job(
                "early",
                serde_json::json!({"placement": {"residency": "any"}}),
            ),
        )
        .await;
        sim.faults().set_latency(Duration::from_millis(1500));
        let op = Operator::start(client.clone(), platform("trainer:ok", 30), "op-a");
        while !op.health.leading.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // `stop` fails the test if the operator has not returned within 20 s.
        op.stop().await;
        sim.faults().clear();
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
