//! Every metric the Helm chart's alerts and Grafana dashboard query is one the operator or the
//! API really exports: their `/metrics` text (rendered by the same code that serves it, after
//! recording one of each event) is parsed with a Prometheus text parser and every
//! `loraplane_*` name in the chart's monitoring files must be among the families found.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use loraplane_operator::status::Signal;

fn families(text: &str) -> BTreeSet<String> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape.samples.into_iter().map(|s| s.metric).collect()
}

fn operator_metrics() -> String {
    let m = loraplane_operator::metrics::Metrics::new().unwrap();
    m.record(&[
        Signal::FirstRunning(3.0),
        Signal::Failover {
            from: "eu-west".into(),
            to: "eu-central".into(),
            reason: "Preempted".into(),
        },
        Signal::Preempted {
            region: "eu-west".into(),
            pool: "eu-west-spot".into(),
        },
        Signal::GpuSeconds {
            region: "eu-west".into(),
            pool: "eu-west-spot".into(),
            seconds: 60.0,
        },
    ]);
    m.reconcile_duration
        .with_label_values(&["ok"])
        .observe(0.01);
    m.reconcile_errors.with_label_values(&["CreatePod"]).inc();
    m.creation_to_pod.observe(0.5);
    m.leader.set(1);
    m.render()
}

fn api_metrics() -> String {
    let m = loraplane_api::metrics::Metrics::new().unwrap();
    m.requests
        .with_label_values(&["/v1/jobs", "GET", "200"])
        .inc();
    m.request_duration
        .with_label_values(&["/v1/jobs"])
        .observe(0.003);
    m.webhook_events
        .with_label_values(&["unverified", "invalid_signature"])
        .inc();
    m.retention_deletions.with_label_values(&["inputs"]).inc();
    m.gc_lag.observe(0.4);
    m.bytes_erased.inc_by(1024);
    m.render()
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

#[test]
fn every_metric_the_chart_queries_is_exported() {
    let mut exported = families(&operator_metrics());
    exported.extend(families(&api_metrics()));
    let queried = names_queried_by_the_chart();
    assert!(
        queried.len() >= 8,
        "the chart should query the main metrics: {queried:?}"
    );
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried by the chart but not exported: {missing:?}\nexported: {exported:?}"
    );
}

#[test]
fn the_operator_exports_jobs_by_phase_even_before_any_job() {
    let text = operator_metrics();
    assert!(
        text.contains("loraplane_jobs{phase=\"Running\"} 0"),
        "{text}"
    );
}
