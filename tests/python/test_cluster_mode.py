"""Cluster mode's errors: what a user without API access, without permission,
or without the catalog volume sees. The API server here is a real HTTP
server on 127.0.0.1 answering as kube-apiserver does (Status objects)."""

from __future__ import annotations

import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from mw_models import Encoder
from modelwrapper import ModelWrapper
from modelwrapper._cluster import ClusterRef


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / ".node.json").write_text(json.dumps({"node": "node-7", "uploadEndpoint": "http://127.0.0.1:9"}))
    monkeypatch.setenv("MODELWRAPPER_CATALOG", str(cat))
    monkeypatch.setenv("POD_NAME", "driver")
    monkeypatch.setenv("POD_NAMESPACE", "ml")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return cat


class ForbidCreates(BaseHTTPRequestHandler):
    """Pods are readable; creating a ModelWrapper is forbidden, with the
    Status body kube-apiserver sends."""

    def log_message(self, *_: object) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/api/v1/namespaces/ml/pods/driver":
            self._send(200, {"metadata": {"name": "driver", "namespace": "ml", "uid": "u-1"}})
        else:
            self._send(404, {"kind": "Status", "code": 404, "message": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(403, {
            "kind": "Status", "code": 403, "reason": "Forbidden",
            "message": 'modelwrappers.zerocopy.dev is forbidden: User "system:serviceaccount:ml:default" cannot create resource "modelwrappers" in API group "zerocopy.dev" in the namespace "ml"',
        })


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))
    return path


def test_from_model_without_api_access_says_what_is_missing(catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="needs the Kubernetes API.*no Kubernetes API access.*service account"):
        ModelWrapper.from_model(Encoder())


def test_from_model_without_permission_names_the_role(catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), ForbidCreates)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{server.server_port}")))
        with pytest.raises(RuntimeError, match="may not create ModelWrappers in namespace ml.*zerocopy-edit"):
            ModelWrapper.from_model(Encoder())
    finally:
        server.shutdown()


def test_a_catalog_that_is_not_one_is_named(catalog: Path) -> None:
    (catalog / ".node.json").unlink()
    with pytest.raises(RuntimeError, match="not a zerocopy catalog volume"):
        ModelWrapper.from_model(Encoder())


def test_a_cluster_wrapper_pickles_to_a_reference_and_needs_the_catalog(catalog: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))  # no API: wait without status
    ref = ClusterRef("ml", "enc-0123456789", "abcdef0123456789")
    w = ModelWrapper(None, mode="actor", is_standalone=True, model_info={}, cluster=ref)
    data = pickle.dumps(w)
    assert len(data) < 1024 and b"abcdef0123456789" in data
    again = pickle.loads(data)
    with pytest.raises(TimeoutError, match="not Ready on node node-7 after 0s"):
        again.load(timeout=0.3)
    monkeypatch.delenv("MODELWRAPPER_CATALOG")
    with pytest.raises(RuntimeError, match="needs the namespace catalog volume mounted"):
        again.load()


def test_a_node_left_out_for_good_is_named_with_the_reason() -> None:
    from modelwrapper._cluster import _never_here

    wrapper = {"status": {"conditions": [{"type": "Ready", "message": "no node can hold this wrapper: 2 node(s) does not match nodeSelector (node-7, node-8); 1 node(s) no live zerocopy agent (node-9)"}]}}
    assert "does not match nodeSelector" in _never_here(wrapper, "node-7")
    assert _never_here(wrapper, "node-9") is None, "an agent that is down may come back: keep waiting"
    assert _never_here(wrapper, "node-1") is None
