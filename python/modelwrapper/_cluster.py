"""Cluster mode: ``from_model()`` in a pod that mounts the namespace catalog
(``MODELWRAPPER_CATALOG``) makes a ModelWrapper, uploads the export to its
node's agent and returns once a node holds a verified copy; ``load()`` in any
pod with the catalog waits until the wrapper is Ready on its own node and
maps it from there (docs/ray.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._export import component_name, detect_components, export, model_info
from ._kube import Kube, KubeError, pod_path, replica_path, wrappers_path

log = logging.getLogger("modelwrapper")

CATALOG_ENV = "MODELWRAPPER_CATALOG"
NODE_INFO = ".node.json"
UPLOAD_URI = "upload:"
UPLOAD_TOKEN_ANNOTATION = "zerocopy.dev/upload-token-sha256"
CREATED_BY_LABEL = "zerocopy.dev/created-by"
DEFAULT_TIMEOUT = 600.0
PROGRESS_EVERY = 5.0


@dataclass(frozen=True)
class ClusterRef:
    """What a cluster wrapper pickles to: never weights, never a host path."""

    namespace: str
    name: str
    generation: str


def catalog() -> Path | None:
    value = os.environ.get(CATALOG_ENV)
    return Path(value) if value else None


def pod_namespace(kube: Kube | None = None) -> str:
    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if sa.exists():
        return sa.read_text().strip()
    if kube is not None and kube.config.namespace:
        return kube.config.namespace
    return "default"


def node_info(cat: Path) -> dict[str, Any]:
    path = cat / NODE_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(
            f"{path} is missing: {cat} is not a zerocopy catalog volume. Mount one "
            "(csi driver csi.zerocopy.dev, volumeAttributes: {catalog: \"true\"}) and point "
            f"{CATALOG_ENV} at it (docs/ray.md)"
        ) from None


def _wrapper_name(model: Any, modules: dict[str, Any], shas: dict[str, str]) -> str:
    """The same model (class, architecture, weights) gives the same name, in
    actor and task mode alike: both use the same bytes on a node."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for attr in sorted(modules):
        digest.update(f"{attr}:{shas[attr]}:{modules[attr]!r}".encode())
    return f"{component_name(type(model).__name__)[:40].strip('-')}-{digest.hexdigest()[:10]}"


def _owner_reference(kube: Kube, namespace: str, owner: Any) -> list[dict[str, Any]]:
    if owner is False or owner == "none":
        return []
    if isinstance(owner, dict):
        missing = {"apiVersion", "kind", "name", "uid"} - owner.keys()
        if missing:
            raise ValueError(f"owner= needs apiVersion, kind, name and uid; missing {sorted(missing)}")
        return [{**owner, "blockOwnerDeletion": False}]
    pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME")
    if not pod:
        raise RuntimeError("from_model() cannot tell which pod it runs in: set POD_NAME (downward API), or pass owner=")
    obj = kube.get(pod_path(namespace, pod))
    return [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": obj["metadata"]["uid"], "blockOwnerDeletion": False}]


def _explain(e: KubeError, namespace: str) -> RuntimeError:
    if e.status in (401, 403):
        return RuntimeError(
            f"from_model() may not create ModelWrappers in namespace {namespace}: {e}. "
            "Give the pod's service account the zerocopy-edit role (or create/get/patch on "
            "modelwrappers.zerocopy.dev and get on pods) in that namespace"
        )
    if e.status == 404 and "modelwrappers" in str(e):
        return RuntimeError(f"the ModelWrapper API is not installed in this cluster ({e}): install the zerocopy chart")
    return RuntimeError(f"from_model(): {e}")


def publish(
    model: Any,
    *,
    mode: str,
    name: str | None,
    owner: Any = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[ClusterRef, bool, dict[str, dict[str, Any]]]:
    """Exports ``model``, creates (or reuses) its ModelWrapper, uploads the
    files to this node's agent and waits until a node holds them."""
    cat = catalog()
    assert cat is not None
    info = node_info(cat)
    try:
        kube = Kube()
    except KubeError as e:
        raise RuntimeError(f"from_model() needs the Kubernetes API in cluster mode ({CATALOG_ENV} is set): {e}") from None
    namespace = pod_namespace(kube)
    standalone, modules = detect_components(model)
    work = Path(tempfile.mkdtemp(prefix="modelwrapper-export-"))
    try:
        exported = export(model, work, mode=mode, name="export", hf_layout=False)
        shas = {c.attribute: c.weights_sha256 for c in exported.components}
        wname = name or _wrapper_name(model, modules, shas)
        spec = dict(exported.spec["spec"])
        spec.pop("task", None)
        pipeline = json.loads(json.dumps(spec["pipeline"]))
        for c in pipeline["components"]:
            c["weights"]["uri"] = UPLOAD_URI
            if "skeleton" in c:
                c["skeleton"]["uri"] = UPLOAD_URI
        if "skeleton" in pipeline:
            pipeline["skeleton"]["uri"] = UPLOAD_URI
        # The CR's `mode: task` means ModelTask Jobs run by the operator;
        # from_model()'s task mode runs Ray tasks in the caller's cluster, so
        # the wrapper object is an actor-mode one either way (one copy of the
        # bytes serves both), and the mode stays with the Python wrapper.
        spec = {"mode": "actor", "placement": "Consumers", "pipeline": pipeline}
        files = {c.weights_sha256: c.weights for c in exported.components}
        files.update({c.skeleton_sha256: c.skeleton for c in exported.components if c.skeleton and c.skeleton_sha256})
        if exported.pipeline_skeleton and exported.pipeline_skeleton_sha256:
            files[exported.pipeline_skeleton_sha256] = exported.pipeline_skeleton
        token = secrets.token_urlsafe(32)
        try:
            wrapper = _create_or_reuse(kube, namespace, wname, spec, token, owner)
        except KubeError as e:
            raise _explain(e, namespace) from None
        components = model_info(modules)
        if _ready_generation(wrapper) is None:
            _upload(info, namespace, wname, files, token, timeout)
        generation = _wait_ready_somewhere(kube, namespace, wname, timeout)
        return ClusterRef(namespace, wname, generation), standalone, components
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ready_generation(wrapper: dict[str, Any]) -> str | None:
    status = wrapper.get("status") or {}
    if status.get("readyNodes", 0) >= 1 and status.get("observedGeneration") == wrapper["metadata"].get("generation"):
        return status.get("digest")
    return None


def _weights(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["name"], c["weights"].get("sha256", "")) for c in spec["pipeline"]["components"]]


def _create_or_reuse(kube: Kube, namespace: str, name: str, spec: dict[str, Any], token: str, owner: Any) -> dict[str, Any]:
    token_hash = hashlib.sha256(token.encode()).hexdigest()
    owners = _owner_reference(kube, namespace, owner)
    body = {
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ModelWrapper",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {CREATED_BY_LABEL: "from_model"},
            "annotations": {UPLOAD_TOKEN_ANNOTATION: token_hash},
            "ownerReferences": owners,
        },
        "spec": spec,
    }
    try:
        created = kube.create(wrappers_path(namespace), body)
        log.info("created ModelWrapper %s/%s", namespace, name)
        return created
    except KubeError as e:
        if e.status != 409:
            raise
    existing = kube.get(wrappers_path(namespace, name))
    same_weights = _weights(existing["spec"]) == _weights(spec)
    patch: dict[str, Any] = {"metadata": {"annotations": {UPLOAD_TOKEN_ANNOTATION: token_hash}}}
    known = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or []}
    if any(o["uid"] not in known for o in owners):
        # Kept while any of its users lives: garbage collection waits for all owners.
        patch["metadata"]["ownerReferences"] = (existing["metadata"].get("ownerReferences") or []) + [
            o for o in owners if o["uid"] not in known
        ]
        patch["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
    if same_weights and _ready_generation(existing) is not None:
        log.info("reusing ModelWrapper %s/%s: the same model is Ready on %s node(s)", namespace, name, existing["status"]["readyNodes"])
        if "ownerReferences" in patch["metadata"]:
            return kube.merge_patch(wrappers_path(namespace, name), {"metadata": {k: v for k, v in patch["metadata"].items() if k != "annotations"}})
        return existing
    # Not Ready anywhere (or a new model under a chosen name): this export
    # becomes its spec, uploaded below under this process's token.
    patch["spec"] = spec
    log.info("updating ModelWrapper %s/%s with this export", namespace, name)
    return kube.merge_patch(wrappers_path(namespace, name), patch)


def _upload(info: dict[str, Any], namespace: str, name: str, files: dict[str, Path], token: str, timeout: float) -> None:
    endpoint = info.get("uploadEndpoint")
    node = info.get("node", "?")
    if not endpoint:
        raise RuntimeError(
            f"the zerocopy agent on node {node} takes no uploads (started without --peer-addr; "
            "the chart's agent.peer.enabled turns it on)"
        )
    deadline = time.monotonic() + timeout
    for sha, path in files.items():
        url = f"{endpoint}/v1/uploads/{namespace}/{name}/{sha}"
        while True:
            status, text = _http("GET", url, token)
            if status == 200:
                break  # already there
            if status == 404:
                status, text = _http("PUT", url, token, path)
                if status in (200, 201):
                    log.info("uploaded %s (%.1f MiB) to the agent on %s", path.name, path.stat().st_size / 2**20, node)
                    break
            # 503: not placed on this node yet; 401/403/409: the agent has not
            # seen this token or spec yet (a re-run, another driver's patch);
            # 0/5xx: the agent is restarting. Anything else will not change.
            transient = status in (0, 401, 403, 409) or status >= 500
            if not transient or time.monotonic() > deadline:
                raise RuntimeError(f"uploading {path.name} to the zerocopy agent on node {node} failed: HTTP {status}: {text}")
            time.sleep(0.5)


def _http(method: str, url: str, token: str, path: Path | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    if path is None:
        req = urllib.request.Request(url, method=method)
        handle = None
    else:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
        req = urllib.request.Request(url, data=handle, method=method)
        req.add_header("Content-Length", str(path.stat().st_size))
        req.add_header("Content-Type", "application/octet-stream")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, f"cannot reach {url}: {e}"
    finally:
        if handle is not None:
            handle.close()


def _status_line(wrapper: dict[str, Any]) -> str:
    status = wrapper.get("status") or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return f"{status.get('phase', 'Pending')}, Ready on {status.get('readyNodes', 0)}/{status.get('desiredNodes', 0)} node(s): {ready.get('message', '')}"


def _wait_ready_somewhere(kube: Kube, namespace: str, name: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while True:
        wrapper = kube.get(wrappers_path(namespace, name))
        generation = _ready_generation(wrapper)
        if generation:
            return generation
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"ModelWrapper {namespace}/{name} was not Ready on any node after {timeout:.0f}s: {_status_line(wrapper)}")
        if now - last_log >= PROGRESS_EVERY:
            log.info("waiting for %s/%s: %s", namespace, name, _status_line(wrapper))
            last_log = now
        time.sleep(0.5)


def resolve(ref: ClusterRef, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """The generation's directory under this pod's catalog, once complete;
    waits (bounded), logging the wrapper's status, and fails early with the
    reason when this node will not get it."""
    cat = catalog()
    if cat is None:
        raise RuntimeError(
            f"ModelWrapper {ref.namespace}/{ref.name} lives in the cluster: this process needs the "
            f"namespace catalog volume mounted and {CATALOG_ENV} set to its path (docs/ray.md)"
        )
    path = cat / ref.name / ref.generation
    if (path / "manifest.json").exists():
        return path
    node = node_info(cat).get("node", "?")
    try:
        kube: Kube | None = Kube()
    except KubeError:
        kube = None  # no API access: wait without progress details
    deadline = time.monotonic() + timeout
    last_log = 0.0
    while not (path / "manifest.json").exists():
        now = time.monotonic()
        detail = ""
        if kube is not None and now - last_log >= PROGRESS_EVERY:
            detail = _node_detail(kube, ref, node)
            log.info("waiting for %s/%s on node %s: %s", ref.namespace, ref.name, node, detail)
            last_log = now
        if now > deadline:
            raise TimeoutError(
                f"ModelWrapper {ref.namespace}/{ref.name} generation {ref.generation} is not Ready on node {node} "
                f"after {timeout:.0f}s: {detail or 'no status available'}"
            )
        time.sleep(0.2)
    return path


def _node_detail(kube: Kube, ref: ClusterRef, node: str) -> str:
    """This node's replica status, or why the wrapper is not placed here;
    raises when waiting cannot help."""
    try:
        wrapper = kube.get(wrappers_path(ref.namespace, ref.name))
    except KubeError as e:
        if e.status == 404:
            raise RuntimeError(f"ModelWrapper {ref.namespace}/{ref.name} was deleted") from None
        return str(e)
    try:
        replica = kube.get(replica_path(ref.namespace, _replica_name(ref.name, node)))
    except KubeError as e:
        if e.status != 404:
            return str(e)
        never = _never_here(wrapper, node)
        if never:
            raise RuntimeError(
                f"ModelWrapper {ref.namespace}/{ref.name} will not be placed on node {node}: {never}"
            ) from None
        return f"not placed on this node yet: {_status_line(wrapper)}"
    status = replica.get("status") or {}
    if status.get("phase") == "Failed" and status.get("reason") not in (None, "WaitingForSource"):
        attempts = status.get("attempts", 1)
        if status.get("nextRetryTime") is None:
            raise RuntimeError(f"ModelWrapper {ref.namespace}/{ref.name} cannot be filled on node {node}: {status.get('message')}")
        return f"fill failed (attempt {attempts}, retried at {status.get('nextRetryTime')}): {status.get('message')}"
    return f"{status.get('phase', 'Pending')}: {status.get('message') or ''}".strip()


# Placement reasons (operator/src/placement.rs) that waiting does not change.
_PERMANENT = ("does not match nodeSelector", "node is cordoned", "not enough room")


def _never_here(wrapper: dict[str, Any], node: str) -> str | None:
    """The operator's reason this node is left out, when it is one waiting
    does not fix; its messages list nodes as `N node(s) <reason> (a, b)`."""
    for c in (wrapper.get("status") or {}).get("conditions") or []:
        for part in (c.get("message") or "").split("; "):
            listed = part[part.rfind("(") + 1 : part.rfind(")")].replace(" and", ",").split(", ")
            if node in listed and any(reason in part for reason in _PERMANENT):
                return part.split(": ", 1)[-1]
    return None


def _replica_name(wrapper: str, node: str) -> str:
    name = f"{wrapper}.{node}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"{name[:200].rstrip('.-')}.{digest[:16]}"
