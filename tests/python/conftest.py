"""Fixtures: a private tmpfs per test, the node agent binary, fills through it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def agent_bin() -> Path:
    path = Path(os.environ.get("ZEROCOPY_AGENT_BIN", REPO / "target/debug/zerocopy-node-agent"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build -p zerocopy-node-agent` (scripts/test.sh does)")
    return path


@pytest.fixture
def shm(tmp_path: Path):
    """A fresh tmpfs (the tests run as root), so PSS and sharing are real shared memory."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g", "zerocopy-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-R", "-l", str(mnt)], check=False)


def fill(yaml_path: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Runs `zerocopy-node-agent standalone` like a user would."""
    return subprocess.run(
        [str(agent_bin()), "--root", str(root), "standalone", "-q", "-f", str(yaml_path), *extra],
        capture_output=True,
        text=True,
    )


def generations(root: Path) -> list[dict]:
    """What `zerocopy-node-agent status --json` lists under ``root``."""
    out = subprocess.run([str(agent_bin()), "--root", str(root), "status", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def with_pythonpath(*dirs: Path) -> str:
    """PYTHONPATH for a child process: ``dirs``, then this process's own
    PYTHONPATH (a checkout run without installing the package keeps it)."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*map(str, dirs), *([inherited] if inherited else [])])


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now, for a test server."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(argv: list[str], port: int, name: str, timeout: float = 120):
    """Runs a server process until the block ends, once it accepts
    connections on 127.0.0.1:`port` (a generous bound: a loaded 2-core
    machine starts Java- and Node-based emulators slowly)."""
    import socket
    import time

    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"{name} did not start on 127.0.0.1:{port}")
            time.sleep(0.2)
    try:
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)


def source_wrapper_yaml(
    path: Path, source: dict, *, secrets: dict[str, dict] | None = None, name: str = "minilm", component: str = "encoder"
) -> Path:
    """Writes a ModelWrapper whose one component fills from ``source``, then a
    Secret per ``secrets`` entry (name -> stringData): standalone mode reads
    the Secrets a source names from the same file."""
    import yaml

    docs = [{"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ModelWrapper", "metadata": {"name": name},
             "spec": {"pipeline": {"components": [{"name": component, "source": source}]}}}]
    docs += [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n}, "stringData": data} for n, data in (secrets or {}).items()]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def filled_volume(yaml_path: Path, root: Path) -> Path:
    """Fills and returns the generation directory."""
    proc = fill(yaml_path, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = subprocess.run([str(agent_bin()), "--root", str(root), "status", "--json"], capture_output=True, text=True, check=True)
    gens = json.loads(status.stdout)
    assert len(gens) == 1, gens
    return Path(gens[0]["path"])


def local_volume(model, where: Path, *, skeletons: bool = True, factory: dict | None = None) -> Path:
    """A volume made without the node agent: export() plus the manifest the
    local publisher writes; ``factory`` replaces the only component's skeleton."""
    import modelwrapper
    from modelwrapper._local import _manifest

    exported = modelwrapper.export(model, where / "volume", name="v", skeletons=skeletons)
    manifest = _manifest(exported, name="v", generation="0123456789abcdef", mode="actor")
    if factory is not None:
        manifest["components"][0]["skeleton"] = factory
    (where / "volume" / "manifest.json").write_text(json.dumps(manifest))
    return where / "volume"


def directory_volume(where: Path, shards: dict[str, dict], *, component: str = "llm", config: dict | None = None) -> Path:
    """A format v2 generation written without the agent: component
    ``component`` is a directory holding ``shards`` (file name -> tensors)
    and, with ``config``, a ``config.json``."""
    import hashlib

    from safetensors.torch import save_file

    gen = where / "0123456789abcdef"
    (gen / component).mkdir(parents=True)
    if config is not None:
        (gen / component / "config.json").write_text(json.dumps(config))
    for name, tensors in shards.items():
        save_file(tensors, str(gen / component / name))
    files = []
    for p in sorted((gen / component).iterdir()):
        entry = {"file": f"{component}/{p.name}", "bytes": p.stat().st_size,
                 "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "source": p.as_uri()}
        if p.suffix == ".safetensors":
            n = int.from_bytes(p.read_bytes()[:8], "little")
            entry["safetensors"] = {"tensors": len(shards[p.name]), "dtypes": [], "dataOffset": 8 + n}
        files.append(entry)
    manifest = {
        "format": "zerocopy.dev/v2", "namespace": "t", "name": "v", "generation": gen.name, "mode": "actor",
        "created": "2026-01-01T00:00:00Z", "totalBytes": sum(f["bytes"] for f in files),
        "components": [{"name": component, "directory": {
            "path": component, "weights": [f"{component}/{n}" for n in sorted(shards)], "files": files}}],
    }
    (gen / "manifest.json").write_text(json.dumps(manifest))
    return gen
