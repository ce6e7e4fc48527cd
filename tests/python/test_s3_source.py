"""`s3://bucket/prefix/` sources against a real S3-compatible server (moto in
server mode on 127.0.0.1): a sharded checkpoint uploaded with the official
client (boto3), filled by prefix by the node agent (through object_store),
verified against a pinned SHA256SUMS, and loaded in place; bad inputs fail
cleanly with nothing published. Objects uploaded with
`ChecksumAlgorithm=SHA256` need no pins standalone: S3's own full-object
checksum verifies them; a multipart upload's composite checksum is never
taken for a digest."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import fill, free_port, generations, local_server, source_wrapper_yaml
from hub_server import assert_embeds_like_minilm, minilm_dir

boto3 = pytest.importorskip("boto3")
transformers = pytest.importorskip("transformers")
pytest.importorskip("moto.server")

BUCKET = "models"


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    with local_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto server"):
        yield f"http://127.0.0.1:{port}"


def client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret",
    )


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    transformers.AutoModel.from_pretrained(str(minilm_dir())).save_pretrained(out, max_shard_size="20MB")
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out


def sums_of(directory: Path, *, wrong: str | None = None) -> bytes:
    lines = []
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            rel = p.relative_to(directory).as_posix()
            if rel == wrong:
                digest = hashlib.sha256(b"something else").hexdigest()
            lines.append(f"{digest}  {rel}\n")
    return "".join(lines).encode()


def upload(endpoint: str, prefix: str, directory: Path, *, sums: bytes | None, skip: str | None = None) -> None:
    s3 = client(endpoint)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != skip:
            s3.upload_file(str(p), BUCKET, f"{prefix}{rel}")
    if sums is not None:
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}SHA256SUMS", Body=sums)


def wrapper_yaml(path: Path, endpoint: str, prefix: str, *, sums_pin: str | None, secret: str = "s3-credentials") -> Path:
    """Always carries Secret s3-credentials; ``secret`` is the one the source names."""
    source = {"uri": f"s3://{BUCKET}/{prefix}", "endpoint": endpoint, "secretRef": {"name": secret}}
    if sums_pin:
        source["sha256"] = {"SHA256SUMS": sums_pin}
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "endpoint": endpoint}
    return source_wrapper_yaml(path, source, secrets={"s3-credentials": keys})


def test_a_sharded_checkpoint_fills_from_an_s3_prefix(tmp_path: Path, shm: Path, s3_endpoint: str, sharded: Path) -> None:
    sums = sums_of(sharded)
    upload(s3_endpoint, "minilm/", sharded, sums=sums)
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", s3_endpoint, "minilm/", sums_pin=hashlib.sha256(sums).hexdigest()), root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    directory = manifest["components"][0]["directory"]
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    assert directory["weights"] == [f"encoder/{s}" for s in shards]
    # Every byte equals what the official client reads back from the server.
    s3 = client(s3_endpoint)
    for entry in directory["files"]:
        rel = entry["file"].removeprefix("encoder/")
        body = s3.get_object(Bucket=BUCKET, Key=f"minilm/{rel}")["Body"].read()
        assert (generation / entry["file"]).read_bytes() == body, rel
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()

    assert_embeds_like_minilm(generation)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("wrong-checksum", ["sha256 mismatch", "model-00002-of-"]),
        ("missing-shard", ["model.safetensors.index.json names shard", "model-00001-of-"]),
        ("empty-prefix", ["no object below s3://models/nothing-here/"]),
        ("sums-not-the-pinned-one", ["sha256 mismatch", "SHA256SUMS"]),
        ("missing-credentials", ["Secret default/other-credentials is not in the YAML files"]),
    ],
)
def test_bad_s3_sources_fail_clearly_and_publish_nothing(
    tmp_path: Path, shm: Path, s3_endpoint: str, sharded: Path, case: str, expect: list[str]
) -> None:
    prefix = f"{case}/"
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    sums = sums_of(sharded, wrong=shards[1] if case == "wrong-checksum" else None)
    pin = hashlib.sha256(sums).hexdigest()
    secret = "s3-credentials"
    if case == "missing-shard":
        upload(s3_endpoint, prefix, sharded, sums=sums, skip=shards[0])
    elif case == "empty-prefix":
        prefix = "nothing-here/"
        upload(s3_endpoint, "something-else/", sharded, sums=None)
    elif case == "sums-not-the-pinned-one":
        upload(s3_endpoint, prefix, sharded, sums=sums)
        pin = hashlib.sha256(b"the SHA256SUMS the author meant").hexdigest()
    elif case == "missing-credentials":
        upload(s3_endpoint, prefix, sharded, sums=sums)
        secret = "other-credentials"
    else:
        upload(s3_endpoint, prefix, sharded, sums=sums)
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", s3_endpoint, prefix, sums_pin=pin, secret=secret), root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "component encoder" in output, output
    for text in expect:
        assert text in output, f"{text!r} not in: {output}"
    assert generations(root) == []
    assert not any((root / ".staging").iterdir()), "a failed fill left staging behind"


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254", "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]"])
def test_an_s3_endpoint_at_a_metadata_address_is_refused(tmp_path: Path, shm: Path, endpoint: str) -> None:
    """Even standalone, where internal addresses are allowed: an IP address in
    the endpoint is never resolved, so the policy checks it on every request."""
    yaml = source_wrapper_yaml(tmp_path / "mw.yaml", {"uri": "s3://latest/meta-data/", "endpoint": endpoint})
    root = shm / "root"
    proc = fill(yaml, root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "refused" in output and "link-local" in output, output
    assert generations(root) == []


def plain(proc) -> str:
    """The agent's output without terminal colours (log fields are styled)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def upload_with_checksums(
    endpoint: str, prefix: str, directory: Path, *, wrong: str | None = None, multipart: str | None = None
) -> dict[str, bytes]:
    """Uploads every file with `ChecksumAlgorithm=SHA256`: `wrong` with a
    stored checksum of other bytes (moto keeps what the client sends; real S3
    would refuse the upload, so this stands for a bucket that lies),
    `multipart` as a one-part multipart upload (a composite checksum)."""
    s3 = client(endpoint)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    bodies = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(directory).as_posix()
        key, body = f"{prefix}{rel}", p.read_bytes()
        bodies[rel] = body
        if rel == multipart:
            up = s3.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="SHA256")
            part = s3.upload_part(
                Bucket=BUCKET, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=body, ChecksumAlgorithm="SHA256"
            )
            s3.complete_multipart_upload(
                Bucket=BUCKET,
                Key=key,
                UploadId=up["UploadId"],
                MultipartUpload={
                    "Parts": [{"PartNumber": 1, "ETag": part["ETag"], "ChecksumSHA256": part["ChecksumSHA256"]}]
                },
            )
        elif rel == wrong:
            s3.put_object(
                Bucket=BUCKET, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=b64_sha256(b"other bytes")
            )
        else:
            s3.put_object(Bucket=BUCKET, Key=key, Body=body, ChecksumAlgorithm="SHA256")
    return bodies


def stored_checksum(endpoint: str, key: str) -> str | None:
    return client(endpoint).head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED").get("ChecksumSHA256")


def test_s3_checksums_verify_an_unpinned_prefix(tmp_path: Path, shm: Path, s3_endpoint: str, sharded: Path) -> None:
    bodies = upload_with_checksums(s3_endpoint, "checksummed/", sharded)
    for rel, body in bodies.items():
        assert stored_checksum(s3_endpoint, f"checksummed/{rel}") == b64_sha256(body), rel
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", s3_endpoint, "checksummed/", sums_pin=None), root)
    output = plain(proc)
    assert proc.returncode == 0, output
    assert f"verified={len(bodies)} composite=0 without_checksum=0" in output, output
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    files = manifest["components"][0]["directory"]["files"]
    assert sorted(f["file"] for f in files) == sorted(f"encoder/{rel}" for rel in bodies)
    for entry in files:
        body = bodies[entry["file"].removeprefix("encoder/")]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
        assert (generation / entry["file"]).read_bytes() == body
    assert_embeds_like_minilm(generation)


def test_an_object_whose_s3_checksum_is_not_its_bytes_fails_and_publishes_nothing(
    tmp_path: Path, shm: Path, s3_endpoint: str, sharded: Path
) -> None:
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    bodies = upload_with_checksums(s3_endpoint, "lying/", sharded, wrong=shards[1])
    # The server does answer the stored checksum, and boto3 too finds it wrong.
    assert stored_checksum(s3_endpoint, f"lying/{shards[1]}") == b64_sha256(b"other bytes")
    assert hashlib.sha256(bodies[shards[1]]).hexdigest() != hashlib.sha256(b"other bytes").hexdigest()
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", s3_endpoint, "lying/", sums_pin=None), root)
    output = plain(proc)
    assert proc.returncode != 0, output
    assert "component encoder" in output, output
    assert f"sha256 (the object's S3 ChecksumSHA256) mismatch for s3://{BUCKET}/lying/{shards[1]}" in output, output
    assert f"expected {hashlib.sha256(b'other bytes').hexdigest()}, got {hashlib.sha256(bodies[shards[1]]).hexdigest()}" in output
    assert generations(root) == []
    assert not any((root / ".staging").iterdir()), "a failed fill left staging behind"


def test_a_multipart_composite_checksum_is_not_taken_for_a_digest(
    tmp_path: Path, shm: Path, s3_endpoint: str, sharded: Path
) -> None:
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    bodies = upload_with_checksums(s3_endpoint, "multipart/", sharded, multipart=shards[0])
    # The object has a SHA256 checksum, but not of its bytes: used as a pin
    # it would fail the fill.
    composite = stored_checksum(s3_endpoint, f"multipart/{shards[0]}")
    assert composite and composite.split("-")[0] != b64_sha256(bodies[shards[0]])
    root = shm / "root"
    proc = fill(wrapper_yaml(tmp_path / "mw.yaml", s3_endpoint, "multipart/", sums_pin=None), root)
    output = plain(proc)
    assert proc.returncode == 0, output
    assert "composite checksum" in output and shards[0] in output, output
    assert f"verified={len(bodies) - 1} composite=1 without_checksum=0" in output, output
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    for entry in manifest["components"][0]["directory"]["files"]:
        body = bodies[entry["file"].removeprefix("encoder/")]
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()


def test_the_checksum_request_is_signed_as_s3_checks_it(tmp_path: Path, shm: Path) -> None:
    """moto does not check signatures: a fake S3 here checks every request's
    SigV4 signature with botocore's signer, as S3 would, including the
    HeadObject that carries `x-amz-checksum-mode` (which must be signed) for a
    key that needs percent-encoding."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    key_id, secret, token = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    body = struct.pack("<Q", len(header)) + header + b"\0" * 8
    seen: list[tuple[str, str, bool, list[str], str | None]] = []

    class FakeS3(BaseHTTPRequestHandler):
        def signed(self) -> bool:
            auth = self.headers.get("Authorization", "")
            names = auth.partition("SignedHeaders=")[2].partition(",")[0].split(";")
            request = AWSRequest(
                method=self.command,
                url=f"http://{self.headers['Host']}{self.path}",
                headers={k: v for k, v in self.headers.items() if k.lower() in names},
            )
            request.context["timestamp"] = self.headers.get("X-Amz-Date", "")
            signer = S3SigV4Auth(Credentials(key_id, secret, token), "s3", "us-east-1")
            signature = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
            ok = bool(auth) and auth.endswith(f"Signature={signature}")
            seen.append((self.command, self.path, ok, names, self.headers.get("If-Match")))
            if not ok:
                self.send_response(403)
                self.send_header("content-length", "0")
                self.end_headers()
            return ok

        def answer(self, payload: bytes, **headers: str) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(payload)))
            self.send_header("etag", '"v1"')
            self.send_header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            for k, v in headers.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()

        def do_HEAD(self) -> None:
            if self.signed():
                self.answer(body, x_amz_checksum_sha256=b64_sha256(body))

        def do_GET(self) -> None:
            if not self.signed():
                return
            if "list-type=2" in self.path:
                payload = (
                    '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>models</Name><KeyCount>1</KeyCount>'
                    "<IsTruncated>false</IsTruncated><Contents><Key>m/a b+c.safetensors</Key>"
                    f"<Size>{len(body)}</Size><LastModified>2024-01-01T00:00:00.000Z</LastModified>"
                    '<ETag>"v1"</ETag></Contents></ListBucketResult>'
                ).encode()
            else:
                payload = body
            self.answer(payload)
            self.wfile.write(payload)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        keys = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token, "endpoint": endpoint}
        source = {"uri": "s3://models/m/", "endpoint": endpoint, "secretRef": {"name": "keys"}}
        proc = fill(source_wrapper_yaml(tmp_path / "mw.yaml", source, name="signed", secrets={"keys": keys}), shm / "root")
    finally:
        server.shutdown()
    output = plain(proc)
    assert proc.returncode == 0, output + repr(seen)
    assert "verified=1 composite=0 without_checksum=0" in output, output
    # The object is read only as the version whose checksum was read.
    assert [(m, p, ok, if_match) for m, p, ok, _, if_match in seen] == [
        ("GET", "/models?list-type=2&prefix=m%2F", True, None),
        ("HEAD", "/models/m/a%20b%2Bc.safetensors", True, None),
        ("GET", "/models/m/a%20b%2Bc.safetensors", True, '"v1"'),
    ], seen
    head_signed = seen[1][3]
    assert "x-amz-checksum-mode" in head_signed and "x-amz-security-token" in head_signed, head_signed
