"""The chart's alert rules, run by Prometheus' own `promtool test rules` against series shaped
like the ones the operator exports (the metrics contract in tests/e2e checks that the
names exist on the live endpoints; this checks that the rules fire when they should and stay
quiet when they should). promtool comes from Debian's `prometheus` package, which
`make bootstrap` installs."""

import pathlib
import shutil
import subprocess

import pytest
import yaml

from test_chart import render, by_kind


def promtool():
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool not found: run 'make bootstrap' (Debian: apt-get install prometheus)")
    return path


def rule_groups(values=None):
    rules = by_kind(render(values), "PrometheusRule")
    assert len(rules) == 1
    return {"groups": rules[0]["spec"]["groups"]}


def run_rule_tests(tmp_path: pathlib.Path, tests):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    out = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_overdue_deletions_page_only_when_cleanup_stalls(tmp_path):
    # One operator reports an input deletion overdue and growing (S3 down): 60 s at first,
    # then a minute more each minute. The default threshold is 300 s, held for 5 minutes.
    stalled = " ".join(str(60 + 60 * i) for i in range(20))
    run_rule_tests(tmp_path, [
        {
            "interval": "1m",
            "input_series": [
                {"series": 'loraplane_retention_overdue_seconds{what="inputs",pod="op-0"}', "values": stalled},
                {"series": 'loraplane_retention_overdue_seconds{what="outputs",pod="op-0"}', "values": "0x19"},
            ],
            "alert_rule_test": [
                # Past 300 s from minute 5 on; it must hold 5 minutes before paging.
                {"eval_time": "6m", "alertname": "LoraplaneRetentionDeletionOverdue", "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": "LoraplaneRetentionDeletionOverdue",
                    "exp_alerts": [{
                        "exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": "Retention deletions are overdue",
                            "description": "A job's data has been kept 11m 0s past its retention: the published "
                            "retention promise is broken until cleanup resumes (kubectl describe ltj shows "
                            "the Deleting condition).",
                        },
                    }],
                },
            ],
        },
        {
            # Deletions that keep up (overdue for a few seconds at a time) never page.
            "interval": "1m",
            "input_series": [
                {"series": 'loraplane_retention_overdue_seconds{what="inputs",pod="op-0"}', "values": "0 2 0 1 0 3 0 0 2 0 0 1 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "14m", "alertname": "LoraplaneRetentionDeletionOverdue", "exp_alerts": []},
            ],
        },
    ])


def test_a_stalled_erasure_pages_and_a_finished_one_does_not(tmp_path):
    run_rule_tests(tmp_path, [
        {
            "interval": "1m",
            "input_series": [
                # Requested at minute 0, still not done 10 minutes later.
                {"series": 'loraplane_retention_overdue_seconds{what="erasure",pod="op-0"}', "values": "0+60x12"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "LoraplaneErasureStalled", "exp_alerts": []},
                {
                    "eval_time": "9m",
                    "alertname": "LoraplaneErasureStalled",
                    "exp_alerts": [{
                        "exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": "An erasure request has not completed",
                            "description": "An erasure requested 9m 0s ago still has data left "
                            "(kubectl describe ltj shows what and why).",
                        },
                    }],
                },
            ],
        },
        {
            # Erasures that finish within seconds leave the gauge at 0 between scrapes.
            "interval": "1m",
            "input_series": [
                {"series": 'loraplane_retention_overdue_seconds{what="erasure",pod="op-0"}', "values": "0 4 0 0 6 0 0 0 0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "11m", "alertname": "LoraplaneErasureStalled", "exp_alerts": []},
            ],
        },
    ])


def test_the_operator_not_leading_pages(tmp_path):
    run_rule_tests(tmp_path, [
        {
            "interval": "1m",
            "input_series": [
                # Two replicas; the leader stops at minute 3 and nobody takes over.
                {"series": 'loraplane_operator_leader{pod="op-0"}', "values": "1 1 1 0 0 0 0 0 0 0 0 0"},
                {"series": 'loraplane_operator_leader{pod="op-1"}', "values": "0x11"},
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "LoraplaneOperatorNotLeading", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "LoraplaneOperatorNotLeading", "exp_alerts": []},
                {
                    "eval_time": "9m",
                    "alertname": "LoraplaneOperatorNotLeading",
                    "exp_alerts": [{
                        "exp_labels": {"severity": "critical"},
                        "exp_annotations": {
                            "summary": "No operator replica holds the leader lease; jobs are not reconciled",
                        },
                    }],
                },
            ],
        },
        {
            # A hand-over (one replica stops leading, the other starts) does not page.
            "interval": "1m",
            "input_series": [
                {"series": 'loraplane_operator_leader{pod="op-0"}', "values": "1 1 1 0 0 0 0 0 0 0"},
                {"series": 'loraplane_operator_leader{pod="op-1"}', "values": "0 0 0 1 1 1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "LoraplaneOperatorNotLeading", "exp_alerts": []},
            ],
        },
    ])


def test_refunds_that_keep_failing_page_and_a_retry_that_succeeds_does_not(tmp_path):
    failed = 'loraplane_api_job_refunds_total{reason="job_failed",outcome="failed",pod="api-0"}'
    succeeded = 'loraplane_api_job_refunds_total{reason="job_failed",outcome="succeeded",pod="api-0"}'
    run_rule_tests(tmp_path, [
        {
            # Stripe refuses every try (backoff: one more failure every few minutes).
            "interval": "1m",
            "input_series": [
                {"series": failed, "values": "0 1 1 2 2 2 3 3 3 3 4 4 4 4 4 5 5 5 5 5 5 6 6 6 6 6"},
                {"series": succeeded, "values": "0x25"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "LoraplaneRefundsFailing", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "LoraplaneRefundsFailing",
                 "exp_alerts": [{"exp_labels": {"severity": "critical"}, "exp_annotations": {
                     "summary": "Refunds of failed or platform-cancelled paid jobs keep failing at Stripe",
                     "description": "Customers are owed money: the API retries each refund with backoff until "
                     "Stripe accepts it (GET /v1/jobs/{id}/events shows each one's attempts; check the Stripe "
                     "API key, stripeApi.baseUrl and networkPolicy.stripeCidrs)."}}]},
            ],
        },
        {
            # Two failures, then Stripe takes it: no page.
            "interval": "1m",
            "input_series": [
                {"series": failed, "values": "0 1 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2"},
                {"series": succeeded, "values": "0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": "LoraplaneRefundsFailing", "exp_alerts": []},
            ],
        },
    ])


def test_a_storefront_down_warns_and_an_abandoned_notification_warns(tmp_path):
    retry = 'loraplane_api_notifications_total{type="job.accepted",outcome="retry",pod="api-0"}'
    delivered = 'loraplane_api_notifications_total{type="job.accepted",outcome="delivered",pod="api-0"}'
    abandoned = 'loraplane_api_notifications_total{type="job.accepted",outcome="abandoned",pod="api-0"}'
    run_rule_tests(tmp_path, [
        {
            "interval": "5m",
            "input_series": [
                {"series": retry, "values": "0+1x30"},
                {"series": delivered, "values": "0x30"},
                {"series": abandoned, "values": "0x20 1x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "LoraplaneNotificationsNotDelivered", "exp_alerts": []},
                {"eval_time": "70m", "alertname": "LoraplaneNotificationsNotDelivered",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"}, "exp_annotations": {
                     "summary": "No storefront notification was delivered for 30 minutes while deliveries were retried"}}]},
                {"eval_time": "90m", "alertname": "LoraplaneNotificationsAbandoned", "exp_alerts": []},
                {"eval_time": "105m", "alertname": "LoraplaneNotificationsAbandoned",
                 "exp_alerts": [{"exp_labels": {"severity": "warning"}, "exp_annotations": {
                     "summary": "Storefront notifications were abandoned after three days of failed deliveries"}}]},
            ],
        },
        {
            # Retries among deliveries (one slow storefront, others fine): quiet.
            "interval": "5m",
            "input_series": [
                {"series": retry, "values": "0+1x30"},
                {"series": delivered, "values": "0+2x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "120m", "alertname": "LoraplaneNotificationsNotDelivered", "exp_alerts": []},
            ],
        },
    ])
