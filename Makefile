# loraplane: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
TOOLS := .tools

.PHONY: help bootstrap test fmt-check clippy code-shape unit chart-test crd-check crdgen values-schema demo bench e2e-real

help:
	@echo "make demo   - the customer journey on the local stack (DEMO_ARGS=--keep-running keeps it up)"
	@echo "make test   - everything CI checks: tools, fmt, clippy, code shape, tests, CRD and values-schema drift, the CUDA build"
	@echo "make cuda-check - compile, link and clippy the trainer's CUDA build (no GPU needed; CUDA 13.0 wheels from PyPI)"
	@echo "make crdgen - regenerate crds/loratrainingjob.yaml from the Rust types"
	@echo "make values-schema - regenerate charts/loraplane/values.schema.json from the Rust types"
	@echo "make e2e-real - the journey against a real cluster (KUBECONFIG; see tests/e2e/REAL_CLUSTER.md)"
	@echo "make bench  - run the benchmarks, write tests/bench/REPORT.md (+ .json); PROFILE=dev for a quicker build"

## Installs what the tests need into .tools/ (git-ignored); fails loudly on anything missing.
bootstrap:
	@tests/tools/bootstrap.sh

# The CRD drift check also runs inside `unit` (crds/tests/crd.rs); `make crd-check` is the
# standalone version (it rebuilds the crds crate alone, which costs minutes on a cold machine).
# So does the chart's values schema drift check (crds/tests/values_schema.rs).
test: bootstrap fmt-check clippy code-shape unit chart-test cuda-check
	@echo "make test: all checks passed"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# No import circle between a crate's modules; no function over 150 lines in the operator and
# the API (tests/tools/code_shape.py says where).
code-shape:
	python3 tests/tools/code_shape.py

# The e2e tests run the trainer binary that this same workspace build produces (the trainer's own
# CLI tests make cargo build it). Naming it here keeps the tests from calling cargo themselves: a
# `cargo build -p loraplane-trainer` resolves other features than the workspace build and would
# recompile half the dependency tree in the middle of the run.
unit:
	target_dir=$$($(CARGO) metadata --format-version 1 --no-deps --locked | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4) && \
	PATH="$(CURDIR)/$(TOOLS)/bin:$$PATH" LORAPLANE_TRAINER_BIN="$$target_dir/debug/loraplane-trainer" \
	  $(CARGO) nextest run --workspace --locked --no-fail-fast

crd-check:
	@generated=$$(mktemp) && trap 'rm -f "$$generated"' EXIT && \
	$(CARGO) run --quiet --locked -p loraplane-crds --bin crdgen > "$$generated" && \
	for f in crds/loratrainingjob.yaml charts/loraplane/files/loratrainingjob.yaml; do \
	  diff -u $$f "$$generated" || { echo "$$f is stale: run 'make crdgen' and commit it"; exit 1; }; \
	done
	@echo "crd-check: the checked-in CRDs match the types"

# The trainer's CUDA build compiles, links and passes clippy on every run, with no GPU: NVIDIA's
# CUDA 13.0 compiler and libraries come from PyPI (tests/tools/cuda-toolkit.sh, into .tools/cuda).
# Its own target dir, so the CPU build's trainer binary (which the e2e tests run) stays as it is.
cuda-check:
	@eval "$$(tests/tools/cuda-toolkit.sh --env)" && \
	target_dir=$$($(CARGO) metadata --format-version 1 --no-deps --locked | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)/cuda && \
	CARGO_TARGET_DIR="$$target_dir" $(CARGO) build -p loraplane-trainer --bins --features cuda --locked && \
	CARGO_TARGET_DIR="$$target_dir" $(CARGO) clippy -p loraplane-trainer --all-targets --features cuda --locked -- -D warnings
	@echo "cuda-check: the trainer's CUDA build compiles and links"

chart-test:
	$(TOOLS)/venv/bin/python -m pytest -q -p no:cacheprovider charts/loraplane/tests

crdgen:
	$(CARGO) run --quiet -p loraplane-crds --bin crdgen -- --write

## The chart's values.schema.json, generated from the Rust types of its values (crds/src/chart_values.rs).
values-schema:
	$(CARGO) run --quiet -p loraplane-crds --bin valuesgen -- --write

demo: bootstrap
	@tests/tools/demo.sh $(DEMO_ARGS)

## Benchmarks (never part of `make test`): see tests/bench/run.sh for the knobs.
bench: bootstrap
	@tests/bench/run.sh

## The journey against a real cluster set up as tests/e2e/REAL_CLUSTER.md says (never in `make test`).
e2e-real:
	$(CARGO) run --locked -p loraplane-e2e --bin loraplane-e2e-real -- run
