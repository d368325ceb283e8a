#!/usr/bin/env bash
# Installs what compiling the trainer's CUDA build needs into .tools/cuda (git-ignored), from
# PyPI: NVIDIA's CUDA 13.0 compiler and libraries ship there as wheels. With `--env` it then
# prints the environment the build needs, for `eval`.
#
# Why 13.0.x: cudarc 0.19 (candle 0.11) refuses toolkits newer than 13.4, and the H100/H200
# machines we run on have driver 580, which loads code from CUDA <= 13.0 only.
#
# candle links the CUDA libraries at build time (cudarc's `dynamic-linking`), so the linker
# needs unversioned names (symlinks to the wheels' files) and a `libcuda.so` for the driver
# API, which no wheel ships (it comes with the driver): a stub exporting every `cu*` function
# cudarc declares, with the driver's soname `libcuda.so.1`, so the real one is loaded at run
# time. `LIBRARY_PATH` points the linker there without touching RUSTFLAGS (which would
# invalidate cargo's cache of every other build).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=.tools/cuda
die() { echo "cuda-toolkit: $*" >&2; exit 1; }

wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.5.25
)
stamp="$root/.wheels"
cu="$root/py/nvidia/cu13"
if [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  command -v python3 >/dev/null || die "python3 not found: install Python 3 with pip"
  echo "cuda-toolkit: installing the CUDA 13.0 compiler and libraries from PyPI into $root" >&2
  rm -rf "$root"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$root/py" "${wheels[@]}" >&2 \
    || die "pip could not install the CUDA wheels (needs PyPI): ${wheels[*]}"
  [ -x "$cu/bin/nvcc" ] || die "no nvcc in $cu/bin after installing the wheels"

  mkdir -p "$root/lib"
  for lib in cudart cublas cublasLt nvrtc curand; do
    file=$(ls "$cu/lib/lib$lib.so."* 2>/dev/null | grep -v builtins | head -n1)
    [ -n "$file" ] || die "lib$lib.so.* missing from the wheels"
    ln -sf "$(realpath "$file")" "$root/lib/lib$lib.so"
  done

  # The driver API stub: every function cudarc's driver bindings name (cudarc is an optional
  # dependency no other build needs, so its source may not be downloaded yet).
  cargo fetch --locked >&2 || die "cargo fetch failed (needs crates.io)"
  sys=$(cargo metadata --format-version 1 --locked --all-features 2>/dev/null \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))' \
    | sed 's|Cargo.toml$|src/driver/sys/mod.rs|') || die "cudarc not in Cargo.lock (run 'cargo fetch')"
  [ -f "$sys" ] || die "cudarc's driver bindings not found at $sys (run 'cargo fetch')"
  grep -o 'fn cu[A-Za-z0-9_]*(' "$sys" | sed 's/^fn \(.*\)(/void \1(void) {}/' | sort -u > "$root/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$root/libcuda-stub.c" \
    || die "could not build the libcuda.so stub (needs gcc)"
  echo "${wheels[*]}" > "$stamp"
fi

if [ "${1:-}" = --env ]; then
  abs=$(realpath "$root")
  echo "export CUDA_ROOT='$abs/py/nvidia/cu13'"
  echo "export PATH='$abs/py/nvidia/cu13/bin':\"\$PATH\""
  echo "export LIBRARY_PATH='$abs/lib'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  # The H100/H200's compute capability.
  echo "export CUDA_COMPUTE_CAP=90"
fi
