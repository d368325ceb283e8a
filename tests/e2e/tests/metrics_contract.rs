//! Every metric the Helm chart's alerts and Grafana dashboard query is one the operator or the
//! API really exports. The scenario of `contract/mod.rs` runs the operator and the API against
//! kube-sim and SeaweedFS (a webhook order, a spot preemption and failover, a success, retention
//! GC, an erasure), then their live `/metrics` endpoints are scraped over HTTP, parsed with a
//! Prometheus text parser, and every `loraplane_*` name in the chart's monitoring files must be
//! among the families found.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;

use std::collections::BTreeSet;
use std::path::Path;

use prometheus_parse::{Sample, Scrape};

fn parse(text: &str) -> Vec<Sample> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    Scrape::parse(lines).expect("valid Prometheus text").samples
}

fn families(samples: &[Sample]) -> BTreeSet<String> {
    samples.iter().map(|s| s.metric.clone()).collect()
}

/// The value of the sample of `metric` whose labels include all of `labels`.
fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn names_queried_by_the_chart() -> BTreeSet<String> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/loraplane");
    let re = regex::Regex::new(r"loraplane_[a-z_]+").unwrap();
    let mut names = BTreeSet::new();
    for file in ["templates/monitoring.yaml", "files/dashboard.json"] {
        let text = std::fs::read_to_string(chart.join(file)).unwrap();
        for m in re.find_iter(&text) {
            let name = m.as_str();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_chart_queries_is_served_on_live_metrics_endpoints() {
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(150), contract::run())
        .await
        .expect("the scenario finishes within 150 s");
    let operator = parse(&outcome.operator_metrics);
    let api = parse(&outcome.api_metrics);

    let mut exported = families(&operator);
    exported.extend(families(&api));
    let queried = names_queried_by_the_chart();
    assert!(
        queried.len() >= 8,
        "the chart should query the main metrics: {queried:?}"
    );
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried by the chart but not on /metrics: {missing:?}\nexported: {exported:?}"
    );

    // The values tell the scenario's story, as a dashboard would show it.
    let spot = [("region", "eu-west"), ("pool", "eu-west-l4-spot")];
    assert_eq!(
        value(&operator, "loraplane_preemptions_total", &spot),
        Some(1.0),
        "{}",
        outcome.operator_metrics
    );
    assert!(
        value(
            &operator,
            "loraplane_failovers_total",
            &[("from_region", "eu-west"), ("reason", "Preempted")]
        )
        .is_some_and(|v| v >= 1.0),
        "{}",
        outcome.operator_metrics
    );
    assert!(
        value(&operator, "loraplane_gpu_seconds_total", &spot).is_some_and(|v| v > 0.0),
        "{}",
        outcome.operator_metrics
    );
    assert_eq!(
        value(&operator, "loraplane_operator_leader", &[]),
        Some(1.0)
    );
    for phase in [
        "Pending",
        "Scheduling",
        "Running",
        "Succeeded",
        "Failed",
        "Cancelled",
    ] {
        assert!(
            value(&operator, "loraplane_jobs", &[("phase", phase)]).is_some(),
            "loraplane_jobs{{phase=\"{phase}\"}} is exported even at 0:\n{}",
            outcome.operator_metrics
        );
    }
    assert_eq!(
        value(
            &api,
            "loraplane_api_webhook_events_total",
            &[("type", "checkout.session.completed")]
        ),
        Some(1.0),
        "{}",
        outcome.api_metrics
    );
    // Retention (job A: inputs, then the job) and an erasure request (job B), counted where
    // they happen: the API counts the request, the operator the deletions.
    for (what, reason) in [
        ("inputs", "retention"),
        ("job", "retention"),
        ("job", "customerRequest"),
    ] {
        assert!(
            value(
                &operator,
                "loraplane_retention_deletions_total",
                &[("what", what), ("reason", reason)]
            )
            .is_some_and(|v| v >= 1.0),
            "no {what} deletion for {reason} counted:\n{}",
            outcome.operator_metrics
        );
    }
    assert_eq!(
        value(
            &api,
            "loraplane_api_erasure_requests_total",
            &[("reason", "customerRequest")]
        ),
        Some(1.0),
        "{}",
        outcome.api_metrics
    );
}
