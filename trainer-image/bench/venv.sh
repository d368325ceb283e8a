#!/usr/bin/env bash
# Makes (once) the PyTorch venv the trainer's reference scripts share, .tools/bench-venv with
# torch, diffusers and peft, and prints its python. Not part of `make test`: torch is a
# ~1 GB install (several GB from PyPI, whose default Linux wheel pulls the CUDA runtime).
#
# torch comes from PyTorch's CPU wheel index when reachable, else from PyPI.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/.tools/bench-venv"
die() { echo "bench venv: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 not found: install Python 3.10+ with pip and venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" || die "could not create $venv: install python3-venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "bench venv: installing torch (CPU) into $venv" >&2
  if ! "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
    echo "bench venv: PyTorch CPU index unreachable; installing torch from PyPI" \
      "(pulls CUDA packages: check 'df -h')" >&2
    "${pip[@]}" torch || die "pip could not install torch (needs PyPI and several GB of disk)"
  fi
fi
if ! "$venv/bin/python" -c 'import diffusers, peft, transformers' 2>/dev/null; then
  echo "bench venv: installing diffusers, peft and transformers into $venv" >&2
  # The versions the trainer README's figures and load check were measured with.
  "${pip[@]}" diffusers==0.42.1 peft==0.21.2 transformers==5.23.0 || die "pip could not install diffusers, peft and transformers (needs PyPI)"
fi
echo "$venv/bin/python"
