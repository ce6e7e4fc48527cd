#!/usr/bin/env bash
# The real-cluster suite: kind + Helm + KubeRay. Needs Docker, kind, kubectl,
# helm and network access (images, the KubeRay chart, the model from Hugging
# Face). It cannot run on this project's CI machines (no Docker daemon, no
# kind); run it by hand:  e2e/kind/run.sh [--keep]
#
# Steps: create a 3-node cluster, build and load the images, install the chart
# and KubeRay, apply the actor-mode example and a RayCluster, wait for Ready,
# check that Ray actors on one node share one copy of the weights (node Shmem
# and per-process PSS), and tear down (unless --keep).
set -euo pipefail

CLUSTER="${CLUSTER:-zerocopy-e2e}"
TAG="${TAG:-e2e}"
REGISTRY="ghcr.io/zerocopy-dev"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.4.2}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done

cleanup() {
  if [[ "$KEEP" == 1 ]]; then
    step "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER)"
  else
    step "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
}
trap cleanup EXIT

step "creating kind cluster $CLUSTER (1 control plane, 2 workers)"
kind create cluster --name "$CLUSTER" --wait 120s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
    labels: {pool: ray-workers}
  - role: worker
    labels: {pool: ray-workers}
EOF

step "building images (tag $TAG)"
docker build -f "$ROOT/docker/operator.Dockerfile" -t "$REGISTRY/zerocopy-operator:$TAG" "$ROOT"
docker build -f "$ROOT/docker/node-agent.Dockerfile" -t "$REGISTRY/zerocopy-node-agent:$TAG" "$ROOT"
docker build -f "$ROOT/docker/modelwrapper-python.Dockerfile" -t "$REGISTRY/modelwrapper-python:$TAG" "$ROOT"
docker build -f "$ROOT/docker/modelwrapper-ray.Dockerfile" -t "$REGISTRY/modelwrapper-ray:$TAG" "$ROOT"

step "loading images into the kind nodes"
for image in zerocopy-operator zerocopy-node-agent modelwrapper-python modelwrapper-ray; do
  kind load docker-image --name "$CLUSTER" "$REGISTRY/$image:$TAG"
done

step "installing the zerocopy chart"
helm install zerocopy "$ROOT/charts/zerocopy" --namespace zerocopy-system --create-namespace \
  --set image.tag="$TAG" --set image.pullPolicy=Never --set agent.capacityGi=2 --wait --timeout 5m
helm test zerocopy --namespace zerocopy-system

step "installing KubeRay $KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update kuberay >/dev/null
helm install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay --create-namespace --wait --timeout 5m

step "applying the actor-mode example and waiting for Ready on both workers"
kubectl create namespace ml
kubectl apply -f "$ROOT/examples/actor-mode/modelwrapper.yaml"
kubectl wait -n ml mw/minilm --for=jsonpath='{.status.phase}'=Ready --timeout=10m
kubectl get mw -n ml
ready=$(kubectl get nodes -l ready.zerocopy.dev/ml.minilm -o name | wc -l)
[[ "$ready" == 2 ]] || fail "expected the ready label on 2 nodes, found $ready"

step "starting a RayCluster whose workers mount the model"
sed "s#ghcr.io/zerocopy-dev/modelwrapper-ray:0.1.0#$REGISTRY/modelwrapper-ray:$TAG#" "$ROOT/examples/kuberay/raycluster.yaml" \
  | kubectl apply -f -
kubectl wait -n ml pod -l ray.io/cluster=minilm-ray,ray.io/group=embed --for=condition=Ready --timeout=10m

step "four loaders on one node: one copy of the weights"
node=$(kubectl get pod -n ml -l ray.io/group=embed -o jsonpath='{.items[0].spec.nodeName}')
pod=$(kubectl get pod -n ml -l ray.io/group=embed --field-selector spec.nodeName="$node" -o jsonpath='{.items[0].metadata.name}')
shmem_before=$(docker exec "$node" awk '/^Shmem:/ {print $2}' /proc/meminfo)
kubectl exec -n ml "$pod" -- python3 - <<'EOF'
import multiprocessing as mp, os, time
import modelwrapper

def worker(q):
    w = modelwrapper.load(os.environ["MODELWRAPPER_PATH"], prefault=True)
    total = sum(t.sum().item() for t in w.values())  # touch every page
    pss = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Shmem:") or line.startswith("Pss_File:"):
                pss += int(line.split()[1])
    q.put((pss, total))
    time.sleep(2)

q = mp.Queue()
procs = [mp.Process(target=worker, args=(q,)) for _ in range(4)]
for p in procs: p.start()
results = [q.get() for _ in procs]
for p in procs: p.join()
size_kib = sum(os.path.getsize(os.path.join(os.environ["MODELWRAPPER_PATH"], f))
               for f in os.listdir(os.environ["MODELWRAPPER_PATH"])) // 1024
pss_total = sum(r[0] for r in results)
print(f"model {size_kib} KiB; summed file/shmem PSS of 4 loaders {pss_total} KiB")
assert len({r[1] for r in results}) == 1, "loaders saw different weights"
assert pss_total <= size_kib * 1.25, "the loaders hold more than one copy"
EOF
shmem_after=$(docker exec "$node" awk '/^Shmem:/ {print $2}' /proc/meminfo)
echo "node $node Shmem: ${shmem_before} KiB before loaders, ${shmem_after} KiB after"
(( shmem_after - shmem_before < 20000 )) || fail "node shared memory grew by more than 20 MB while loading"

step "all checks passed"
