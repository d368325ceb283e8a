#!/usr/bin/env bash
# The local demo. The full customer journey (kube-sim, SeaweedFS, operator, API, trainer)
# arrives with the end-to-end work; until then it shows what exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
echo "== loraplane demo =="
echo "Built so far: the LoRATrainingJob CRD (crds/loratrainingjob.yaml) and its samples."
cargo run --quiet -p loraplane-crds --bin crdgen | head -n 40
echo "..."
echo "Sample jobs:"
ls -1 crds/examples/
echo "Not yet built: kube-sim, operator, API, trainer, chart (see the open issues)."
