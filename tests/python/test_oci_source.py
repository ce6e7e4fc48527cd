"""`oci://` sources against the CNCF distribution registry from Debian
(`docker-registry`) on 127.0.0.1, with a ModelPack-style artifact pushed by
the `oras` Python SDK: filled by tag and by digest, verified layer by layer
against their digests; a tampered blob and a layer of unknown media type
fail cleanly with nothing published."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import fill, free_port, generations, source_wrapper_yaml
from hub_server import assert_embeds_like_minilm, minilm_dir

oras_client = pytest.importorskip("oras.client")
transformers = pytest.importorskip("transformers")

REGISTRY_BIN = shutil.which("docker-registry")
pytestmark = pytest.mark.skipif(REGISTRY_BIN is None, reason="docker-registry (Debian package) is not installed")

WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"



@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """`docker-registry serve` on a free port; yields (host:port, storage dir)."""
    base = tmp_path_factory.mktemp("registry")
    port = free_port()
    storage = base / "storage"
    config = base / "config.yml"
    config.write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {storage}}}\n"
        f"  delete: {{enabled: true}}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    server = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://{host}/v2/", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("docker-registry did not start")
            time.sleep(0.2)
    try:
        yield host, storage
    finally:
        server.terminate()
        server.wait(timeout=30)


def push(host: str, repository: str, tag: str, directory: Path, tmp: Path, *, media_types: dict[str, str] | None = None) -> str:
    """Pushes every file of ``directory`` as one raw layer (ModelPack media
    types, path in ``org.cncf.model.filepath``) and returns the manifest digest."""
    files, annotations = [], {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(directory).as_posix()
        media = (media_types or {}).get(rel) or (WEIGHT if rel.endswith(".safetensors") else CONFIG)
        files.append(f"{p}:{media}")
        annotations[str(p)] = {"org.cncf.model.filepath": rel}
    annotation_file = tmp / f"annotations-{tag}.json"
    annotation_file.write_text(json.dumps(annotations))
    model_config = tmp / f"model-config-{tag}.json"
    model_config.write_text(json.dumps({"descriptor": {"name": repository}, "config": {"format": "safetensors"}}))
    client = oras_client.OrasClient(hostname=host, insecure=True)
    client.push(
        target=f"{host}/{repository}:{tag}",
        files=files,
        manifest_config=f"{model_config}:{MODEL_CONFIG}",
        annotation_file=str(annotation_file),
        disable_path_validation=True,
    )
    req = urllib.request.Request(f"http://{host}/v2/{repository}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(req) as resp:
        body = resp.read()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert resp.headers.get("Docker-Content-Digest") in (None, digest)
    return digest


def wrapper_yaml(path: Path, uri: str, host: str) -> Path:
    return source_wrapper_yaml(path, {"uri": uri, "endpoint": f"http://{host}"})


@pytest.fixture(scope="module")
def minilm_copy(tmp_path_factory) -> Path:
    """The MiniLM repository without its model card and git files."""
    out = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(minilm_dir(), out, ignore=shutil.ignore_patterns(".*", "README.md"))
    return out


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_a_modelpack_artifact_fills_by_tag_and_by_digest(tmp_path: Path, shm: Path, registry, minilm_copy: Path, by: str) -> None:
    host, _ = registry
    digest = push(host, "models/minilm", "v1", minilm_copy, tmp_path)
    ref = "models/minilm:v1" if by == "tag" else f"models/minilm@{digest}"
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", f"oci://{host}/{ref}", host), root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    directory = manifest["components"][0]["directory"]
    assert directory["revision"] == digest
    expected = {p.relative_to(minilm_copy).as_posix() for p in minilm_copy.rglob("*") if p.is_file()}
    assert {e["file"].removeprefix("encoder/") for e in directory["files"]} == expected
    for rel in expected:
        assert (generation / "encoder" / rel).read_bytes() == (minilm_copy / rel).read_bytes(), rel

    assert_embeds_like_minilm(generation)


def test_a_tampered_blob_fails_by_digest(tmp_path: Path, shm: Path, registry, minilm_copy: Path) -> None:
    host, storage = registry
    digest = push(host, "models/tampered", "v1", minilm_copy, tmp_path)
    weights = hashlib.sha256((minilm_copy / "model.safetensors").read_bytes()).hexdigest()
    blob = storage / "docker/registry/v2/blobs/sha256" / weights[:2] / weights / "data"
    assert blob.is_file(), blob
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        root = shm / "root"
        proc = fill(wrapper_yaml(tmp_path / "mw.yaml", f"oci://{host}/models/tampered@{digest}", host), root)
    finally:
        blob.write_bytes(original)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "component encoder" in output and "sha256 mismatch" in output and weights in output, output
    assert generations(root) == []
    assert not any((root / ".staging").iterdir())


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("unknown-media-type", ["unknown media type", "application/vnd.example.weights"]),
        ("missing-tag", ["models/minilm:v404 does not exist"]),
    ],
)
def test_bad_oci_sources_fail_clearly(tmp_path: Path, shm: Path, registry, minilm_copy: Path, case: str, expect: list[str]) -> None:
    host, _ = registry
    if case == "unknown-media-type":
        push(host, "models/odd", "v1", minilm_copy, tmp_path, media_types={"model.safetensors": "application/vnd.example.weights"})
        uri = f"oci://{host}/models/odd:v1"
    else:
        push(host, "models/minilm", "v1", minilm_copy, tmp_path)
        uri = f"oci://{host}/models/minilm:v404"
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", uri, host), root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "component encoder" in output, output
    for text in expect:
        assert text in output, f"{text!r} not in: {output}"
    assert generations(root) == []
    assert not os.listdir(root / ".staging")
