"""Publishing an export as a generation in the local shared-memory root, the
same layout and atomic order the node agent uses (docs/FORMAT.md), through
directory fds that never follow a symbolic link (docs/python.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import stat
import uuid
from pathlib import Path

from . import _gc
from ._export import Exported, detect_components, export, sha256_file
from ._format import DTYPES, FORMAT_V1, MANIFEST_FILE, parse_header
from ._root import (
    DEFAULT_ROOT,
    LEASES_DIR,
    LOCAL_NAMESPACE,
    STAGING_DIR,
    TRASH_DIR,
    check_name,
    dir_mode,
    exchange,
    fd_path,
    local_root,
    open_root,
    open_subdir,
    opened,
    rmtree_at,
    root_lock,
)

__all__ = ["DEFAULT_ROOT", "LOCAL_NAMESPACE", "local_root", "publish_local"]

log = logging.getLogger("modelwrapper")
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _file_entry(path: Path, sha256: str) -> dict[str, object]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256, "source": path.name}


def publish_local(
    model_or_pipeline: object, *, name: str, mode: str, root: Path | None = None
) -> tuple[Path, _gc.LeaseKey]:
    """Exports into ``<root>/.staging``, writes the manifest last and renames
    the directory into ``<root>/local/<name>/<generation>``; leases it for
    one wrapper object of this process (the caller owns that lease).

    An existing generation is reused only when its files hash to what was
    just exported; anything else there is replaced in one atomic exchange.
    """
    check_name(name)
    root = Path(os.path.abspath(root or local_root()))
    with opened(open_root(root)) as rfd:
        assert rfd is not None
        for hidden in (LEASES_DIR, TRASH_DIR):
            with opened(open_subdir(rfd, hidden, root / hidden)):
                pass
        with opened(open_subdir(rfd, STAGING_DIR, root / STAGING_DIR)) as sfd:
            assert sfd is not None
            # <pid>-<starttime> lets a later collection remove what a crash left
            stage = f"{LOCAL_NAMESPACE}.{name}.{_gc.process_token()}.{uuid.uuid4().hex[:12]}"
            os.mkdir(stage, dir_mode(), dir_fd=sfd)
            try:
                return _publish(model_or_pipeline, root, rfd, sfd, stage, name=name, mode=mode)
            finally:
                rmtree_at(sfd, stage)


def _publish(model_or_pipeline: object, root: Path, rfd: int, sfd: int, stage: str, *, name: str, mode: str) -> tuple[Path, _gc.LeaseKey]:
    with opened(open_subdir(sfd, stage, root / STAGING_DIR / stage, create=False)) as stage_fd:
        assert stage_fd is not None
        exported = export(model_or_pipeline, fd_path(stage_fd), name=name, mode=mode, hf_layout=False)
        os.unlink("modelwrapper.yaml", dir_fd=stage_fd)
        # torch.save stamps a random id into every archive, so the skeleton
        # files never hash alike; the architecture's repr stands in for them.
        _, modules = detect_components(model_or_pipeline)
        digest = hashlib.sha256(f"{mode}:{type(model_or_pipeline).__qualname__}".encode())
        for c in exported.components:
            digest.update(f"{c.name}:{c.weights_sha256}:{modules[c.attribute]!r}".encode())
        generation = digest.hexdigest()[:16]
        manifest = _manifest(exported, name=name, generation=generation, mode=mode)
        fd = os.open(MANIFEST_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=stage_fd)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2))
    target = root / LOCAL_NAMESPACE / name / generation
    # Shared lock first: a collection removes empty <name> directories under
    # the exclusive lock, so one must not vanish between mkdir and rename.
    with root_lock(rfd) as locked:
        if not locked:
            log.warning("%s: the root lock is busy; publishing without it", root)
        with opened(open_subdir(rfd, LOCAL_NAMESPACE, root / LOCAL_NAMESPACE)) as lfd:
            assert lfd is not None
            with opened(open_subdir(lfd, name, target.parent)) as nfd:
                assert nfd is not None
                state = _existing(nfd, generation, exported, target)
                if state == "missing":
                    os.rename(stage, generation, src_dir_fd=sfd, dst_dir_fd=nfd)
                elif state == "mismatch":
                    log.warning("%s does not hold what was just exported; replacing it", target)
                    if not exchange(sfd, stage, nfd, generation):
                        with opened(open_subdir(rfd, TRASH_DIR, root / TRASH_DIR)) as tfd:
                            assert tfd is not None
                            aside = f"{name}.{generation}.{uuid.uuid4().hex[:8]}"
                            os.rename(generation, aside, src_dir_fd=nfd, dst_dir_fd=tfd)
                            os.rename(stage, generation, src_dir_fd=sfd, dst_dir_fd=nfd)
                            rmtree_at(tfd, aside)
                    # after an exchange the old generation sits at `stage`: removed by the caller
                key: _gc.LeaseKey = (str(Path(os.path.realpath(root))), name, generation)
                _gc.acquire_locked(key, rfd)
    return target, key


def _existing(nfd: int, generation: str, exported: Exported, target: Path) -> str:
    """"missing", "match" (reuse it: every file hashes to what we just
    exported, or to its own manifest entry for skeletons, whose bytes differ
    per export) or "mismatch" (replace it)."""
    try:
        st = os.lstat(generation, dir_fd=nfd)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "mismatch"
    try:
        gfd = os.open(generation, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=nfd)
    except OSError:
        return "mismatch"
    try:
        manifest = json.loads(_read_at(gfd, MANIFEST_FILE))
        entries = {c["name"]: c for c in manifest["components"]}
        if manifest.get("format") != FORMAT_V1 or set(entries) != {c.name for c in exported.components}:
            return "mismatch"
        for c in exported.components:
            w = entries[c.name]["weights"]
            if w["file"] != c.weights.name or w["sha256"] != c.weights_sha256 or _sha256_at(gfd, w["file"]) != c.weights_sha256:
                return "mismatch"
            skeleton = (entries[c.name].get("skeleton") or {}).get("file")
            if bool(skeleton) != bool(c.skeleton):
                return "mismatch"
            if skeleton and _sha256_at(gfd, skeleton["file"]) != skeleton["sha256"]:
                return "mismatch"
        pipeline = manifest.get("pipelineSkeleton")
        if bool(pipeline) != bool(exported.pipeline_skeleton):
            return "mismatch"
        if pipeline and _sha256_at(gfd, pipeline["file"]) != pipeline["sha256"]:
            return "mismatch"
        return "match"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "mismatch"
    finally:
        os.close(gfd)


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _sha256_at(dir_fd: int, name: str) -> str | None:
    """sha256 of a regular file below ``dir_fd``; None for anything else."""
    if "/" in name:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return sha256_file(Path(fd_path(fd)))
    finally:
        os.close(fd)


def _manifest(exported: Exported, *, name: str, generation: str, mode: str) -> dict[str, object]:
    components = []
    total = 0
    for c in exported.components:
        with open(c.weights, "rb") as f:
            head = f.read(8 + 100 * 1024 * 1024)
        size = c.weights.stat().st_size
        header = parse_header(head, size, str(c.weights))
        entry: dict[str, object] = {
            "name": c.name,
            "weights": {
                **_file_entry(c.weights, c.weights_sha256),
                "tensors": len(header.tensors),
                "dtypes": sorted({_DTYPE_NAMES[t.dtype] for t in header.tensors}),
                "dataOffset": header.data_offset,
            },
        }
        total += size
        if c.skeleton and c.skeleton_sha256:
            entry["skeleton"] = {"file": _file_entry(c.skeleton, c.skeleton_sha256)}
            total += c.skeleton.stat().st_size
        components.append(entry)
    manifest: dict[str, object] = {
        "format": FORMAT_V1,
        "namespace": LOCAL_NAMESPACE,
        "name": name,
        "generation": generation,
        "mode": mode,
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "totalBytes": total,
        "hugePages": False,
        "prefault": False,
        "components": components,
    }
    if exported.pipeline_skeleton and exported.pipeline_skeleton_sha256:
        manifest["pipelineSkeleton"] = _file_entry(exported.pipeline_skeleton, exported.pipeline_skeleton_sha256)
        manifest["totalBytes"] = total + exported.pipeline_skeleton.stat().st_size
    return manifest
