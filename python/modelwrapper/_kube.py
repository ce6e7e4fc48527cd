"""The few Kubernetes API calls cluster mode makes, over plain HTTPS with the
pod's service-account token (in a pod) or a kubeconfig (``KUBECONFIG``), so
Ray images need no Kubernetes client library."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# ssl, urllib.request and yaml are imported where used: most processes that
# import modelwrapper (Ray workers loading a model) never call the API.
if TYPE_CHECKING:
    import ssl

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(RuntimeError):
    """An API call failed; ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, message: str, status: int = 0, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


@dataclass
class KubeConfig:
    server: str
    token: str | None
    ssl_context: ssl.SSLContext | None
    namespace: str | None
    source: str


def _ssl_from_kubeconfig(cluster: dict[str, Any], user: dict[str, Any]) -> ssl.SSLContext:
    import ssl

    ctx = ssl.create_default_context()
    if cluster.get("insecure-skip-tls-verify"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if "certificate-authority-data" in cluster:
        ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    elif "certificate-authority" in cluster:
        ctx.load_verify_locations(cafile=cluster["certificate-authority"])
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        with tempfile.NamedTemporaryFile("wb", delete=False) as c, tempfile.NamedTemporaryFile("wb", delete=False) as k:
            c.write(base64.b64decode(cert))
            k.write(base64.b64decode(key))
        ctx.load_cert_chain(c.name, k.name)
        os.unlink(c.name)
        os.unlink(k.name)
    elif user.get("client-certificate") and user.get("client-key"):
        ctx.load_cert_chain(user["client-certificate"], user["client-key"])
    return ctx


def load_config() -> KubeConfig:
    """In-cluster config first (the pod's service account), else the current
    context of ``$KUBECONFIG`` (or ``~/.kube/config``)."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = SERVICE_ACCOUNT / "token"
    if host and port and token_file.exists():
        import ssl

        ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        ns_file = SERVICE_ACCOUNT / "namespace"
        return KubeConfig(
            server=f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}",
            token=token_file.read_text().strip(),
            ssl_context=ctx,
            namespace=ns_file.read_text().strip() if ns_file.exists() else None,
            source="in-cluster service account",
        )
    path = Path(os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or Path.home() / ".kube" / "config")
    if not path.exists():
        raise KubeError(
            "no Kubernetes API access: not in a pod with a service-account token "
            "(automountServiceAccountToken) and no kubeconfig at "
            f"{path}; give the pod a service account allowed to create ModelWrappers, or set KUBECONFIG"
        )
    import yaml

    doc = yaml.safe_load(path.read_text()) or {}
    current = doc.get("current-context")
    ctx_entry = next((c["context"] for c in doc.get("contexts", []) if c.get("name") == current), None)
    if ctx_entry is None:
        raise KubeError(f"{path}: current-context {current!r} is not defined")
    cluster = next((c["cluster"] for c in doc.get("clusters", []) if c.get("name") == ctx_entry.get("cluster")), {})
    user = next((u["user"] for u in doc.get("users", []) if u.get("name") == ctx_entry.get("user")), {}) or {}
    server = cluster.get("server")
    if not server:
        raise KubeError(f"{path}: cluster {ctx_entry.get('cluster')!r} has no server")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = Path(user["tokenFile"]).read_text().strip()
    return KubeConfig(
        server=server.rstrip("/"),
        token=token,
        ssl_context=_ssl_from_kubeconfig(cluster, user) if server.startswith("https") else None,
        namespace=ctx_entry.get("namespace"),
        source=str(path),
    )


class Kube:
    """JSON requests against the API server."""

    def __init__(self, config: KubeConfig | None = None, timeout: float = 30.0):
        self.config = config or load_config()
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.config.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.config.token:
            req.add_header("Authorization", f"Bearer {self.config.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.config.ssl_context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                status_body = json.loads(text)
            except json.JSONDecodeError:
                status_body = {"message": text}
            raise KubeError(f"{method} {path}: HTTP {e.code}: {status_body.get('message', text)}", e.code, status_body) from None
        except (urllib.error.URLError, OSError) as e:
            raise KubeError(f"{method} {path}: cannot reach the API server {self.config.server} ({self.config.source}): {e}") from None
        return json.loads(raw) if raw else {}

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def create(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, obj)

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, path: str) -> dict[str, Any]:
        return self.request("DELETE", path)


def wrappers_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/zerocopy.dev/v1alpha1/namespaces/{urllib.parse.quote(namespace)}/modelwrappers"
    return base if name is None else f"{base}/{urllib.parse.quote(name)}"


def replica_path(namespace: str, name: str) -> str:
    return f"/apis/zerocopy.dev/v1alpha1/namespaces/{urllib.parse.quote(namespace)}/modelreplicas/{urllib.parse.quote(name)}"


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods/{urllib.parse.quote(name)}"
