#!/usr/bin/env bash
# Runs the PyTorch reference benchmark (diffusers + PEFT on PyTorch CPU) against the same
# configurations trainer-bench measures. Not part of `make test` (see venv.sh).
#
#   trainer-image/bench/run_pytorch_ref.sh [--steps N] [--full-sd15 [--full-steps N]] [--only-full] [--json PATH]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
die() { echo "run_pytorch_ref: $*" >&2; exit 1; }

python=$("$root/trainer-image/bench/venv.sh") || die "no PyTorch venv (see the line above)"
# The exact UNet configs trainer-bench builds, so both sides train the same architecture.
configs="$root/.tools/bench-configs"
(cd "$root" && cargo run --quiet -p loraplane-trainer --bin trainer-bench -- --unet-configs "$configs") \
  || die "trainer-bench --unet-configs failed (needs the Rust toolchain: https://rustup.rs)"
exec "$python" "$root/trainer-image/bench/pytorch_ref.py" --configs "$configs" "$@"
