"""`gs://bucket/prefix/` sources against a local Cloud Storage server
(gcp-storage-emulator on 127.0.0.1), with the official client
(google-cloud-storage) uploading a sharded checkpoint and reading every byte
back, which proves the server speaks the JSON API the agent uses. The agent
lists the prefix, fills it, verifies the pins, and `modelwrapper.load()` /
`transformers` read it in place; bad inputs fail cleanly with nothing
published."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import fill, free_port, generations, local_server, source_wrapper_yaml
from hub_server import assert_embeds_like_minilm, minilm_dir

storage = pytest.importorskip("google.cloud.storage")
credentials = pytest.importorskip("google.auth.credentials")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gcp_storage_emulator")

BUCKET = "models"


@pytest.fixture(scope="module")
def gcs_endpoint():
    port = free_port()
    argv = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
    with local_server(argv, port, "the Cloud Storage emulator"):
        yield f"http://127.0.0.1:{port}"


def client(endpoint: str):
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    return storage.Client(project="test", credentials=credentials.AnonymousCredentials())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    transformers.AutoModel.from_pretrained(str(minilm_dir())).save_pretrained(out, max_shard_size="20MB")
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out


def upload(endpoint: str, prefix: str, directory: Path, *, skip: str | None = None) -> dict[str, str]:
    """Uploads `directory` below `prefix`; returns {path: sha256} of what it uploaded."""
    gcs = client(endpoint)
    bucket = gcs.lookup_bucket(BUCKET) or gcs.create_bucket(BUCKET)
    pins = {}
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != skip:
            bucket.blob(f"{prefix}{rel}").upload_from_filename(str(p))
            pins[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return pins


def wrapper_yaml(
    path: Path, endpoint: str, prefix: str, pins: dict[str, str], *, secret: str | None, bucket: str = BUCKET
) -> Path:
    """Always carries Secret gcs-credentials; the source names it only when ``secret`` does."""
    source = {"uri": f"gs://{bucket}/{prefix}", "endpoint": endpoint, "sha256": pins}
    if secret:
        source["secretRef"] = {"name": secret}
    token = {"GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.test-token", "endpoint": endpoint}
    return source_wrapper_yaml(path, source, secrets={"gcs-credentials": token})


@pytest.mark.parametrize("secret", [None, "gcs-credentials"])
def test_a_sharded_checkpoint_fills_from_a_gcs_prefix(
    tmp_path: Path, shm: Path, gcs_endpoint: str, sharded: Path, secret: str | None
) -> None:
    prefix = f"minilm-{secret or 'public'}/"
    pins = upload(gcs_endpoint, prefix, sharded)
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", gcs_endpoint, prefix, pins, secret=secret), root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    directory = manifest["components"][0]["directory"]
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    assert directory["weights"] == [f"encoder/{s}" for s in shards]
    # Every byte equals what the official client reads back from the server.
    bucket = client(gcs_endpoint).bucket(BUCKET)
    assert {e["file"].removeprefix("encoder/") for e in directory["files"]} == set(pins)
    for entry in directory["files"]:
        rel = entry["file"].removeprefix("encoder/")
        body = bucket.blob(f"{prefix}{rel}").download_as_bytes()
        assert (generation / entry["file"]).read_bytes() == body, rel
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()

    assert_embeds_like_minilm(generation)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("wrong-pin", ["sha256 mismatch", "model-00002-of-"]),
        ("missing-shard", ["source.sha256 pins model-00001-of-"]),
        ("empty-prefix", ["no object below gs://models/nothing-here/"]),
        ("no-bucket", ["gs://no-such-bucket/", "HTTP 404", "the bucket does not exist"]),
    ],
)
def test_bad_gcs_sources_fail_clearly_and_publish_nothing(
    tmp_path: Path, shm: Path, gcs_endpoint: str, sharded: Path, case: str, expect: list[str]
) -> None:
    prefix = f"{case}/"
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    pins = {p.relative_to(sharded).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sharded.rglob("*") if p.is_file()}
    if case == "missing-shard":
        upload(gcs_endpoint, prefix, sharded, skip=shards[0])
    elif case == "empty-prefix":
        prefix = "nothing-here/"
        upload(gcs_endpoint, "something-else/", sharded)
    else:
        upload(gcs_endpoint, prefix, sharded)
    if case == "wrong-pin":
        pins[shards[1]] = hashlib.sha256(b"something else").hexdigest()
    bucket = "no-such-bucket" if case == "no-bucket" else BUCKET
    yaml = wrapper_yaml(tmp_path / "mw.yaml", gcs_endpoint, prefix, pins, secret=None, bucket=bucket)
    root = shm / "root"
    proc = fill(yaml, root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "component encoder" in output, output
    for text in expect:
        assert text in output, f"{text!r} not in: {output}"
    assert generations(root) == []
    assert not any((root / ".staging").iterdir()), "a failed fill left staging behind"
