#!/usr/bin/env bash
# `make bench`: builds the benchmark programs, runs each one (operator admission on kube-sim,
# the operator's erasure latency and retention lag beside live jobs, API webhook-to-CR, the
# API's memory checking 512 MiB datasets, kube-sim itself, the trainer), keeps each program's
# JSON in tests/bench/results/, and writes tests/bench/REPORT.json + REPORT.md with the machine
# description. Benchmarks never run inside `make test`: their figures depend on the machine.
#
# Knobs (environment): PROFILE (release|dev, default release), OPERATOR_JOBS (10000),
# LIFECYCLE_LIVE_JOBS (10000), API_ORDERS (2000), API_CONCURRENCY (32), TRAINER_STEPS (20),
# ONLY (a space-separated subset of: kube-sim operator lifecycle api dataset trainer).
set -euo pipefail
cd "$(dirname "$0")/../.."

PROFILE=${PROFILE:-release}
OPERATOR_JOBS=${OPERATOR_JOBS:-10000}
LIFECYCLE_LIVE_JOBS=${LIFECYCLE_LIVE_JOBS:-10000}
API_ORDERS=${API_ORDERS:-2000}
API_CONCURRENCY=${API_CONCURRENCY:-32}
TRAINER_STEPS=${TRAINER_STEPS:-20}
ONLY=${ONLY:-kube-sim operator lifecycle api dataset trainer}

case "$PROFILE" in
  release) dir=release ;;
  dev) dir=debug ;;
  *) echo "make bench: PROFILE must be release or dev, not '$PROFILE'" >&2; exit 2 ;;
esac
target=${CARGO_TARGET_DIR:-target}/$dir
results=tests/bench/results
mkdir -p "$results"

command -v weed >/dev/null || PATH="$PWD/.tools/bin:$PATH"
command -v weed >/dev/null || { echo "make bench: SeaweedFS 'weed' not found: run 'make bootstrap'" >&2; exit 1; }

echo "== building the benchmark programs ($PROFILE)"
# One invocation (one feature resolution); target selectors apply to every package named.
cargo build --locked --profile "$PROFILE" \
  -p kube-sim -p loraplane-operator -p loraplane-api -p loraplane-trainer \
  --bins --example operator-bench --example lifecycle-bench --example bench --example dataset-bench

wants() { [[ " $ONLY " == *" $1 "* ]]; }

# Each program prints one JSON object on stdout (logs go to stderr).
run() {
  local name=$1; shift
  echo "== $name: $*"
  local started=$SECONDS
  "$@" > "$results/$name.json"
  echo "   done in $((SECONDS - started)) s -> $results/$name.json"
}

wants kube-sim && run kube-sim "$target/kube-sim-bench"
wants operator && run operator "$target/examples/operator-bench" --jobs "$OPERATOR_JOBS"
wants lifecycle && run lifecycle "$target/examples/lifecycle-bench" --live "$LIFECYCLE_LIVE_JOBS"
wants api && run api "$target/examples/bench" "$API_ORDERS" "$API_CONCURRENCY"
wants dataset && run dataset "$target/examples/dataset-bench"
if wants trainer; then
  echo "== trainer: $target/trainer-bench --steps $TRAINER_STEPS"
  "$target/trainer-bench" --steps "$TRAINER_STEPS" --out "$results/trainer.json" >/dev/null
  echo "== trainer: $target/trainer-bench --flux (the tiny FLUX.1-dev fixture)"
  "$target/trainer-bench" --flux trainer-image/tests/fixtures/flux --steps "$TRAINER_STEPS" \
    > "$results/trainer-flux.json"
fi

export OPERATOR_JOBS LIFECYCLE_LIVE_JOBS API_ORDERS API_CONCURRENCY TRAINER_STEPS
python3 tests/bench/report.py --profile "$PROFILE" --results "$results" \
  --json tests/bench/REPORT.json --markdown tests/bench/REPORT.md
echo "make bench: wrote tests/bench/REPORT.md and tests/bench/REPORT.json"
