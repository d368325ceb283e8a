#!/usr/bin/env bash
# Trains tiny SD1.5, SDXL and FLUX.1 LoRAs with the real trainer binary and loads both output files
# (kohya and diffusers/PEFT) with diffusers' `load_lora_weights`: exit 1 with one line per
# problem when keys are unexpected or missing or the UNet does not change. Not part of
# `make test`: it needs the PyTorch venv (see venv.sh).
#
#   trainer-image/bench/check_diffusers_load.sh [WORK_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
die() { echo "check_diffusers_load: $*" >&2; exit 1; }

python=$("$root/trainer-image/bench/venv.sh") || die "no PyTorch venv (see the line above)"
work=${1:-$(mktemp -d)}
# One cargo invocation (one feature resolution) for both binaries.
(cd "$root" && cargo build --quiet --locked -p loraplane-trainer -p loraplane-e2e \
  --bin loraplane-trainer --bin loraplane-e2e-real) \
  || die "cargo build failed (needs the Rust toolchain: https://rustup.rs)"
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps --locked \
  | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)
# SD1.5 and SDXL from the trainer's writer, FLUX.1 the tiny pipeline diffusers made.
"$target/debug/loraplane-e2e-real" models "$work/models" >/dev/null
exec "$python" "$root/trainer-image/bench/check_diffusers_load.py" \
  --trainer "$target/debug/loraplane-trainer" --models "$work/models" --work "$work/runs"
