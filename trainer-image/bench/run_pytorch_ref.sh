#!/usr/bin/env bash
# Runs the PyTorch reference benchmark (diffusers + PEFT on PyTorch CPU) against the same
# configurations trainer-bench measures. Not part of `make test`: it needs a ~1 GB torch
# install in its own venv (.tools/bench-venv) so the test tools stay small.
#
#   trainer-image/bench/run_pytorch_ref.sh [--steps N] [--full-sd15 [--full-steps N]] [--only-full] [--json PATH]
#
# torch comes from PyTorch's CPU wheel index when reachable, else from PyPI (whose default
# Linux wheel also pulls the CUDA runtime packages: several GB of disk).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.tools/bench-venv"
die() { echo "run_pytorch_ref: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found: install Python 3.10+ with pip and venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || die "could not create $venv: install python3-venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "run_pytorch_ref: installing torch (CPU) into $venv" >&2
  if ! "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
    echo "run_pytorch_ref: PyTorch CPU index unreachable; installing torch from PyPI" \
      "(pulls CUDA packages: check 'df -h')" >&2
    "${pip[@]}" torch || die "pip could not install torch (needs PyPI and several GB of disk)"
  fi
fi
if ! "$venv/bin/python" -c 'import diffusers, peft' 2>/dev/null; then
  echo "run_pytorch_ref: installing diffusers and peft into $venv" >&2
  "${pip[@]}" diffusers peft || die "pip could not install diffusers and peft (needs PyPI)"
fi
# The exact UNet configs trainer-bench builds, so both sides train the same architecture.
configs="$root/.tools/bench-configs"
(cd "$root" && cargo run --quiet -p loraplane-trainer --bin trainer-bench -- --unet-configs "$configs") \
  || die "trainer-bench --unet-configs failed (needs the Rust toolchain: https://rustup.rs)"
exec "$venv/bin/python" "$root/trainer-image/bench/pytorch_ref.py" --configs "$configs" "$@"
