#!/usr/bin/env bash
# The GPU check: loraplane's LoRA training steps against diffusers + PEFT on one GPU, one JSON
# report (gpu_check.py says what is measured and how). Three ways to run it:
#
#   gpu-check.sh --prepare [CARRY]   here: builds the release CUDA trainer-bench, stripped and
#                                    gzipped, and downloads diffusers as a wheel into CARRY
#                                    (default trainer-image/bench/gpu-carry, git-ignored; 22 MB)
#   gpu-check.sh --out DIR [CARRY]   on the GPU machine (driver, PyTorch with peft, no network,
#                                    no Rust): installs the carried wheel into a temporary folder,
#                                    runs the check within 8 minutes, writes DIR/gpu-check.json,
#                                    then FLUX.1-dev's full architecture within 4 minutes
#                                    (DIR/gpu-check-flux.json; peak GPU memory in its .err)
#   gpu-check.sh --dry-run --bench-bin BIN --out DIR
#                                    anywhere, no GPU or PyTorch: the same plumbing on tiny models
#                                    on the CPU (the reference only checks its inputs); `make test`
#                                    runs it (trainer-image/tests/gpu_check.rs)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
die() { echo "gpu-check: $*" >&2; exit 1; }

mode=run out="" bench_bin="" carry="$here/gpu-carry"
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) mode=prepare ;;
    --dry-run) mode=dry-run ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    --bench-bin) bench_bin="${2:?--bench-bin needs a path}"; shift ;;
    -*) die "unknown option $1 (see the comment at the top of $0)" ;;
    *) carry="$1" ;;
  esac
  shift
done

# The diffusers release the trainer's reference scripts use (bench/venv.sh).
diffusers_pin="diffusers==0.42.1"

if [ "$mode" = prepare ]; then
  mkdir -p "$carry/wheels"
  cuda_env=$("$root/tests/tools/cuda-toolkit.sh" --env) || die "the CUDA toolkit could not be installed"
  eval "$cuda_env"
  target="$(cd "$root" && cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/cuda"
  (cd "$root" && CARGO_TARGET_DIR="$target" cargo build --release --locked -p loraplane-trainer \
    --features cuda --bin trainer-bench) || die "the CUDA build of trainer-bench failed"
  # Compressed: the stripped binary is 59 MB, and what travels to the GPU machine (this
  # working tree and the carried files) may be 64 MiB in all; gzipped it is 15 MB.
  rm -f "$carry/trainer-bench"
  strip -o "$carry/trainer-bench.stripped" "$target/release/trainer-bench"
  gzip -c -6 "$carry/trainer-bench.stripped" > "$carry/trainer-bench.gz"
  rm -f "$carry/trainer-bench.stripped"
  rm -f "$carry"/wheels/*.whl
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$carry/wheels" "$diffusers_pin" || die "pip could not download $diffusers_pin (needs PyPI)"
  du -ch "$carry/trainer-bench.gz" "$carry"/wheels/*.whl | tail -n1 | sed 's/^/gpu-check: carry /'
  echo "gpu-check: prepared $carry; on the GPU machine run: bash trainer-image/bench/gpu-check.sh --out \$OUT"
  exit 0
fi

[ -n "$out" ] || die "--out DIR is required"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
command -v python3 >/dev/null || die "python3 not found"

if [ "$mode" = dry-run ]; then
  [ -x "$bench_bin" ] || die "--dry-run needs --bench-bin pointing at a built trainer-bench"
  python3 "$here/gpu_check.py" check --dry-run --bench-bin "$bench_bin" \
    --work "$work" --json "$out/gpu-check.json"
  exit
fi

if [ -z "$bench_bin" ]; then
  [ -f "$carry/trainer-bench.gz" ] || die "no trainer-bench.gz in $carry: run 'gpu-check.sh --prepare' here and carry $carry"
  bench_bin="$work/trainer-bench"
  gzip -dc "$carry/trainer-bench.gz" > "$bench_bin" && chmod +x "$bench_bin" \
    || die "could not unpack $carry/trainer-bench.gz"
fi
[ -x "$bench_bin" ] || die "no trainer-bench at $bench_bin"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this is not a GPU machine"
shopt -s nullglob
wheels=("$carry"/wheels/diffusers-*.whl)
[ ${#wheels[@]} -gt 0 ] || die "no diffusers wheel in $carry/wheels: run 'gpu-check.sh --prepare' here"
wheel=${wheels[0]}
python3 -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
  --target "$work/py" "$wheel" || die "could not install $wheel"
export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"

# candle loads the CUDA runtime, cuBLAS, NVRTC and cuRAND that PyTorch's NVIDIA wheels ship
# (the driver's libcuda is on the loader's path already).
nvidia_libs=$(python3 - <<'EOF'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = {os.path.dirname(p) for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
# Never an empty entry: that would put the current directory on the library path.
export LD_LIBRARY_PATH="${nvidia_libs}${nvidia_libs:+${LD_LIBRARY_PATH:+:}}${LD_LIBRARY_PATH:-}"
python3 "$here/gpu_check.py" check --bench-bin "$bench_bin" --work "$work" \
  --json "$out/gpu-check.json" --budget 450

# FLUX.1-dev's full architecture (random weights, bf16 base, checkpointing, 1024 px, 512 T5
# tokens): loraplane's side only (no diffusers reference at this size). GPU memory is sampled
# every 100 ms while it runs; the report keeps the peak.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
  > "$work/flux-memory.csv" 2>/dev/null &
sampler=$!
if timeout 240 "$bench_bin" --full-flux --device cuda --steps 3 \
    > "$out/gpu-check-flux.json" 2> "$out/gpu-check-flux.err"; then
  echo "gpu-check: FLUX.1 case written to $out/gpu-check-flux.json"
else
  echo "gpu-check: FLUX.1 case failed or ran past 240 s (see $out/gpu-check-flux.err)" >&2
fi
kill "$sampler" 2>/dev/null || true
sort -n "$work/flux-memory.csv" | tail -n1 | sed 's/^/peak GPU memory MiB: /' >> "$out/gpu-check-flux.err"
