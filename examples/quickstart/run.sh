#!/usr/bin/env bash
# The README's main job: standalone mode on local shared memory, no cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import torch, safetensors, yaml, modelwrapper' 2>/dev/null; then
  echo "== installing Python packages (requirements-dev.txt, python/)"
  python3 -m pip install --quiet -r requirements-dev.txt
  python3 -m pip install --quiet -e python/
fi
echo "== building zerocopy-node-agent (release)"
cargo build --release --quiet -p zerocopy-node-agent
exec python3 examples/quickstart/quickstart.py --agent target/release/zerocopy-node-agent "$@"
