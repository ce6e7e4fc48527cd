"""`az://account/container/prefix/` sources against Azurite (Microsoft's
Azure Storage emulator, from npm) on 127.0.0.1: a sharded checkpoint
uploaded with the official client (azure-storage-blob), filled by prefix by
the node agent (object_store) with a SAS token, an account key, or unsigned
from a public container, verified against a pinned SHA256SUMS and loaded in
place; an empty prefix fails cleanly."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import fill, free_port, generations, local_server, source_wrapper_yaml
from hub_server import assert_embeds_like_minilm, minilm_dir

blob = pytest.importorskip("azure.storage.blob")
transformers = pytest.importorskip("transformers")
AZURITE = shutil.which("azurite-blob")
pytestmark = pytest.mark.skipif(AZURITE is None, reason="azurite (npm) is not installed")

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="



@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """`azurite-blob` on a free port; yields the account's blob endpoint."""
    port = free_port()
    data = tmp_path_factory.mktemp("azurite")
    argv = [AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(data), "--silent",
            "--skipApiVersionCheck", "--loose"]
    with local_server(argv, port, "azurite"):
        yield f"http://127.0.0.1:{port}/{ACCOUNT}"


@pytest.fixture(scope="module")
def uploaded(azurite: str, tmp_path_factory) -> dict:
    """The MiniLM checkpoint re-saved as shards, in a private and a public container."""
    src = tmp_path_factory.mktemp("sharded")
    transformers.AutoModel.from_pretrained(str(minilm_dir())).save_pretrained(src, max_shard_size="20MB")
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(src).as_posix()}\n" for p in files).encode()
    service = blob.BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={azurite};"
    )
    for name, public in (("private", None), ("public", "container")):
        container = service.create_container(name, public_access=public)
        for p in files:
            with open(p, "rb") as f:
                container.upload_blob(f"minilm/{p.relative_to(src).as_posix()}", f)
        container.upload_blob("minilm/SHA256SUMS", sums)
    sas = blob.generate_container_sas(
        ACCOUNT, "private", account_key=KEY,
        permission=blob.ContainerSasPermissions(read=True, list=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2),
    )
    return {"sums_sha256": hashlib.sha256(sums).hexdigest(), "sas": sas, "files": len(files) + 1}


def wrapper_yaml(path: Path, uri: str, endpoint: str, sums: str, secret: dict | None) -> Path:
    """With ``secret``, the source names Secret azure, which holds it (and consents to the endpoint)."""
    source = {"uri": uri, "endpoint": endpoint, "sha256": {"SHA256SUMS": sums}}
    if secret:
        source["secretRef"] = {"name": "azure"}
    return source_wrapper_yaml(path, source, secrets={"azure": {**secret, "endpoint": endpoint}} if secret else None)


@pytest.mark.parametrize("auth", ["sas", "account-key", "public"])
def test_a_sharded_checkpoint_fills_from_an_azure_prefix(tmp_path: Path, shm: Path, azurite: str, uploaded: dict, auth: str) -> None:
    container = "public" if auth == "public" else "private"
    secret = {"sas": {"AZURE_STORAGE_SAS_TOKEN": uploaded["sas"]}, "account-key": {"AZURE_STORAGE_ACCOUNT_KEY": KEY}}.get(auth)
    root = shm / "root"
    yaml = wrapper_yaml(tmp_path / "mw.yaml", f"az://{ACCOUNT}/{container}/minilm/", azurite, uploaded["sums_sha256"], secret)
    proc = fill(yaml, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    directory = manifest["components"][0]["directory"]
    assert len(directory["files"]) == uploaded["files"] and len(directory["weights"]) >= 3

    assert_embeds_like_minilm(generation)


def test_an_empty_azure_prefix_fails_clearly(tmp_path: Path, shm: Path, azurite: str, uploaded: dict) -> None:
    root = shm / "root"
    yaml = wrapper_yaml(tmp_path / "mw.yaml", f"az://{ACCOUNT}/public/nothing-here/", azurite, uploaded["sums_sha256"], None)
    proc = fill(yaml, root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "component encoder" in output, output
    assert f"no object below az://{ACCOUNT}/public/nothing-here/" in output, output
    assert generations(root) == []
