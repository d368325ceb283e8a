//! Failover against kube-sim: no capacity in the first pool, spot preemption, node loss. In
//! every case the job moves on without consuming `backoffLimit` and stays in the EEA.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn in_eea(region: &str) -> bool {
    region == "eu-west" || region == "eu-north"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unschedulable_pod_fails_over_to_the_next_eea_pool() {
    tokio::time::timeout(LIMIT, async {
        // eu-west-l4 is cheapest among on-demand EEA pools but its nodes carry a taint the
        // pool config does not tolerate: pods sent there never schedule.
        let sim = start_sim(topology(true), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:long", 1), "op-a");
        let spec = serde_json::json!({"placement": {"residency": "eea", "spot": "never"}});
        create_job(&client, &job("moved", spec)).await;
        let running = wait_job(&client, "moved", Duration::from_secs(30), "Running", |j| phase(j) == Some("Running")).await;
        let st = running.status.unwrap();
        assert_eq!(st.attempts[0].pool, "eu-west-l4");
        assert_eq!(st.attempts[0].reason.as_deref(), Some("Unschedulable"));
        let last = st.attempts.last().unwrap();
        assert_eq!(last.pool, "eu-north-l4");
        assert!(st.attempts.iter().all(|a| in_eea(&a.region)));
        assert_eq!(st.failures, None);
        let metrics = op.metrics.render();
        assert!(metrics.contains(r#"loraplane_failovers_total{from_region="eu-west",reason="Unschedulable",to_region="eu-north"}"#), "{metrics}");
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_preemption_resumes_from_the_last_checkpoint_elsewhere() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:long", 5), "op-a");
        let spec = serde_json::json!({"placement": {"residency": "eea", "spot": "preferred"}, "backoffLimit": 0});
        create_job(&client, &job("spotty", spec)).await;
        let running = wait_job(&client, "spotty", Duration::from_secs(20), "Running on spot with a checkpoint", |j| {
            phase(j) == Some("Running")
                && j.status.as_ref().and_then(|s| s.progress.as_ref()).and_then(|p| p.last_checkpoint_step) == Some(40)
        })
        .await;
        let placement = running.status.as_ref().unwrap().placement.clone().unwrap();
        assert_eq!(placement.pool, "eu-west-l4-spot");
        sim.cluster().unwrap().preempt_node(placement.node.as_deref().unwrap(), None).await.unwrap();

        let resumed = wait_job(&client, "spotty", Duration::from_secs(30), "Running on a new attempt", |j| {
            phase(j) == Some("Running") && j.status.as_ref().is_some_and(|s| s.attempts.len() >= 2)
        })
        .await;
        let st = resumed.status.unwrap();
        assert_eq!(st.attempts[0].reason.as_deref(), Some("Preempted"));
        assert_eq!(st.attempts.last().unwrap().resumed_from_step, Some(40));
        assert_eq!(st.failures, None, "a preemption does not count against backoffLimit");
        assert!(st.attempts.iter().all(|a| in_eea(&a.region)));
        let metrics = op.metrics.render();
        assert!(metrics.contains(r#"loraplane_preemptions_total{pool="eu-west-l4-spot",region="eu-west"} 1"#), "{metrics}");
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_restarts_the_job_on_another_node() {
    tokio::time::timeout(LIMIT, async {
        let sim = start_sim(topology(false), vec![script("trainer:long", None, 0, 0)]).await;
        let client = sim.client();
        let op = Operator::start(client.clone(), platform("trainer:long", 5), "op-a");
        let spec = serde_json::json!({"placement": {"residency": "eea", "spot": "never"}, "backoffLimit": 0});
        create_job(&client, &job("lost", spec)).await;
        let running = wait_job(&client, "lost", Duration::from_secs(20), "Running", |j| phase(j) == Some("Running")).await;
        let node = running.status.as_ref().unwrap().placement.clone().unwrap().node.unwrap();
        sim.cluster().unwrap().lose_node(&node).await.unwrap();
        let moved = wait_job(&client, "lost", Duration::from_secs(30), "Running on a new node", |j| {
            phase(j) == Some("Running") && j.status.as_ref().is_some_and(|s| s.attempts.len() >= 2)
        })
        .await;
        let st = moved.status.unwrap();
        assert_eq!(st.attempts[0].reason.as_deref(), Some("NodeLost"));
        assert_ne!(st.placement.unwrap().node.unwrap(), node);
        assert_eq!(st.failures, None);
        assert!(st.attempts.iter().all(|a| in_eea(&a.region)));
        op.stop().await;
        sim.shutdown().await;
    })
    .await
    .expect("test finished in time");
}
