#!/usr/bin/env python3
"""Turns the benchmark programs' JSON (tests/bench/results/*.json) into one report.

REPORT.json holds the machine description, the headline figures next to the issues' goals and
every program's raw output; REPORT.md is the same for people. Standard library only, so it runs
before `make bootstrap`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# (bench, label, candidate key paths, unit, goal text, goal check)
# Candidates: the first path present in the program's JSON is used, so a renamed key in one
# program does not silently drop a headline figure (a missing one shows as "missing").
HEADLINES = [
    ("operator", "admission throughput", ["throughput_jobs_per_s", "admission_jobs_per_s"],
     "jobs/s", "≥ 500", lambda v: v >= 500),
    ("operator", "creation → pod p50, burst", ["p50_latency_seconds", "creation_to_pod_p50_s"],
     "s", "", None),
    ("operator", "creation → pod p99, burst", ["p99_latency_seconds", "creation_to_pod_p99_s"],
     "s", "< 2", lambda v: v < 2),
    ("operator", "operator peak RSS", ["operator_peak_rss_mib"],
     "MiB", "≤ 200", lambda v: v <= 200),
    # The burst latencies above are queue-bound (10,000 jobs at once drain at the throughput
    # rate); the paced ones are one job's latency under a steady load, which the goal is about.
    ("operator", "paced load", ["paced.rate_per_s"], "jobs/s", "", None),
    ("operator", "creation → pod p50, paced", ["paced.p50_latency_seconds"],
     "s", "", None),
    ("operator", "creation → pod p99, paced", ["paced.p99_latency_seconds"],
     "s", "< 2", lambda v: v < 2),
    ("lifecycle", "live jobs beside the lifecycle", ["live_jobs"], "jobs", "", None),
    ("lifecycle", "erasure, request → nothing left, p50", ["erasure.p50_seconds"], "s", "", None),
    ("lifecycle", "erasure, request → nothing left, p99", ["erasure.p99_seconds"], "s", "< 10",
     lambda v: v < 10),
    ("lifecycle", "operator requests per erasure", ["erasure.apiserver_requests_per_erasure.total"],
     "requests", "O(1)", None),
    ("lifecycle", "retention lag p99 (due → job gone)", ["retention.lag_p99_seconds"], "s", "", None),
    ("api", "webhook → CR throughput",
     ["webhook_to_cr.throughput_orders_per_s"], "orders/s", "≥ 2000",
     lambda v: v >= 2000),
    ("api", "webhook → CR p50", ["webhook_to_cr.latency_ms.p50"], "ms", "", None),
    ("api", "webhook → CR p99", ["webhook_to_cr.latency_ms.p99"], "ms", "< 50",
     lambda v: v < 50),
    # Orders without a dataset receipt read the validation marker from S3 instead.
    ("api", "webhook → CR throughput, no receipt",
     ["webhook_to_cr_without_receipt.throughput_orders_per_s"], "orders/s", "", None),
    ("api", "webhook → CR p99, no receipt",
     ["webhook_to_cr_without_receipt.latency_ms.p99"], "ms", "", None),
    ("api", "draft orders recorded (POST /v1/orders)", ["drafts_recorded_per_s"], "orders/s", "",
     None),
    ("api", "Stripe signature check", ["signature_verify_us"], "µs",
     "", None),
    ("api", "webhook with 100,000 v1= entries, answer p50", ["stuffed_signature_webhook.ms.p50"],
     "ms", "< 50", lambda v: v < 50),
    # The API checking a 512 MiB dataset where it lies; the goal is the chart's memory limit.
    ("dataset", "API peak RSS, one 512 MiB dataset check", ["one.peak_rss_mib"], "MiB",
     "≤ 1024", lambda v: v <= 1024),
    ("dataset", "API peak RSS, eight 512 MiB checks at once", ["at_once.peak_rss_mib"], "MiB",
     "≤ 1024", lambda v: v <= 1024),
    ("dataset", "one 512 MiB dataset check", ["one.seconds"], "s", "", None),
    ("kube-sim", "creates", ["creates_per_s"], "/s", "", None),
    ("kube-sim", "merge-patch updates", ["updates_per_s"], "/s", "", None),
    ("kube-sim", "watch fan-out", ["fanout.events_delivered_per_s"], "events/s", "", None),
]


def lookup(data, path: str):
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def first(data, paths):
    for p in paths:
        v = lookup(data, p)
        if v is not None:
            return p, v
    return None, None


def flatten(data, prefix=""):
    """Every numeric or short string leaf as (dotted key, value)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            name = v.get("config") if isinstance(v, dict) else None
            yield from flatten(v, f"{prefix}[{name or i}]")
    elif isinstance(data, (int, float, str, bool)) and data is not None:
        yield prefix, data


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": os.cpu_count(),
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "rustc": run(["rustc", "--version"]),
        "commit": run(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(run(["git", "status", "--porcelain"])),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load(results: Path) -> dict:
    benches = {}
    for f in sorted(results.glob("*.json")):
        text = f.read_text()
        # Programs print one JSON object; anything before its first line-initial brace is noise.
        start = text.find("{")
        try:
            benches[f.stem] = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError as e:
            sys.exit(f"report: {f} is not one JSON object ({e})")
    return benches


def headlines(benches: dict) -> list[dict]:
    rows = []
    for bench, label, paths, unit, goal, check in HEADLINES:
        if bench not in benches:
            continue
        key, value = first(benches[bench], paths)
        met = None
        if check is not None and isinstance(value, (int, float)):
            met = bool(check(value))
        rows.append({"bench": bench, "figure": label, "key": key, "value": value, "unit": unit,
                     "goal": goal, "met": met})
    trainer = benches.get("trainer") or {}
    flux = benches.get("trainer-flux")
    flux_rows = [dict(flux, config="tiny-flux1")] if isinstance(flux, dict) else []
    for r in trainer.get("results", []) + flux_rows:
        if not isinstance(r, dict):
            continue
        name = r.get("config", "?")
        for key, label, unit in [("cpu_seconds_per_step", "CPU per step", "s"),
                                 ("peak_rss_mib", "peak RSS", "MiB")]:
            if key in r:
                rows.append({"bench": "trainer", "figure": f"{name}: {label}", "key": key,
                             "value": r[key], "unit": unit, "goal": "", "met": None})
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    out = [
        "# loraplane benchmark report",
        "",
        "Written by `make bench` (`tests/bench/run.sh` → `tests/bench/report.py`); do not edit by "
        "hand. Each program's raw JSON is in `REPORT.json`.",
        "",
        f"- Machine: {m['cpu'] or 'unknown CPU'}, {m['threads']} threads, "
        f"{m['memory_gib']} GiB, {m['os']}",
        f"- Build: `{report['profile']}` profile, {m['rustc']}, commit {m['commit']}"
        + (" (with uncommitted changes)" if m["dirty"] else ""),
        f"- Date: {m['date']}",
        f"- Settings: {report['settings']}",
        "",
        "Latency figures are medians (p50) and 99th percentiles over every request or job of one "
        "run; throughput is the whole run's count over its wall time.",
        "",
        "## Headline figures",
        "",
        "| part | figure | measured | goal | met |",
        "|---|---|---|---|---|",
    ]
    for r in report["headlines"]:
        value = "missing" if r["value"] is None else f"{fmt(r['value'])} {r['unit']}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        out.append(f"| {r['bench']} | {r['figure']} | {value} | {r['goal']} | {met} |")
    for name, data in report["benches"].items():
        out += ["", f"## {name}", "", "| key | value |", "|---|---|"]
        for k, v in flatten(data):
            out.append(f"| `{k}` | {fmt(v)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--markdown", type=Path, required=True)
    args = ap.parse_args()
    benches = load(args.results)
    if not benches:
        sys.exit(f"report: no benchmark results in {args.results}: run `make bench`")
    settings = ", ".join(
        f"{k}={os.environ[k]}" for k in
        ["OPERATOR_JOBS", "LIFECYCLE_LIVE_JOBS", "API_ORDERS", "API_CONCURRENCY", "TRAINER_STEPS"]
        if k in os.environ) or "defaults"
    report = {"profile": args.profile, "settings": settings, "machine": machine(),
              "headlines": headlines(benches), "benches": benches}
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    args.markdown.write_text(markdown(report))


if __name__ == "__main__":
    main()
