#!/usr/bin/env bash
# The test command of README.md. Runs as root: the integration tests mount
# tmpfs and bind mounts for real.
#   lint -> Rust unit + one-node integration tests -> Python tests
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything the tests need, installed here so this one command works on a
# fresh machine (as root): shellcheck from Debian, Python packages from PyPI,
# kubectl and helm below.
# docker-registry: the CNCF distribution registry, for OCI sources.
if ! command -v shellcheck >/dev/null || ! command -v docker-registry >/dev/null; then
  echo "== system packages (shellcheck, docker-registry)"
  apt-get update -qq && apt-get install -y -qq shellcheck docker-registry >/dev/null
fi
# Azurite: Microsoft's Azure Storage emulator, for az:// sources.
if ! command -v azurite-blob >/dev/null; then
  echo "== azurite (npm)"
  npm install -g --silent azurite@3 >/dev/null
fi
echo "== python packages (requirements-dev.txt, python/ editable)"
python3 -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
python3 -m pip install --quiet --disable-pip-version-check -e python/
# shellcheck source=scripts/torch-env.sh
source scripts/torch-env.sh
target_dir="${CARGO_TARGET_DIR:-target}"

echo "== kubectl and helm (for the simulator and chart tests)"; bash scripts/k8s-tools.sh
echo "== rustfmt"; cargo fmt --all --check
echo "== clippy"; cargo clippy --workspace --all-targets --all-features -- -D warnings
echo "== shellcheck"; shellcheck scripts/*.sh .ci/run examples/quickstart/run.sh e2e/kind/run.sh
echo "== cargo test"; cargo test --workspace --all-features
echo "== build binaries for the Python tests"; cargo build --workspace --bins --examples --all-features
echo "== pytest"
ZEROCOPY_AGENT_BIN="$target_dir/debug/zerocopy-node-agent" \
ZEROCOPY_LOADER_EXAMPLE="$target_dir/debug/examples/tensor-digests" \
  python3 -m pytest -n 2 -q tests/python tests/chart
# Separately: its conftest (the import alias) would shadow tests/python's.
echo "== fuzz (libFuzzer, bounded)"; bash scripts/fuzz.sh
echo "== seed parity (ray-zerocopy 0.2.0's own API tests)"
python3 -m pytest -q tests/seed
