"""Publishing an export as a generation in the local shared-memory root, the
same layout and atomic order the node agent uses (docs/FORMAT.md)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ._export import Exported, detect_components, export
from ._format import DTYPES, FORMAT_V1, MANIFEST_FILE, parse_header

DEFAULT_ROOT = "/dev/shm/zerocopy"
LOCAL_NAMESPACE = "local"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def local_root() -> Path:
    return Path(os.environ.get("MODELWRAPPER_ROOT", DEFAULT_ROOT))


def _file_entry(path: Path, sha256: str) -> dict[str, object]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256, "source": path.name}


def publish_local(model_or_pipeline: object, *, name: str, mode: str, root: Path | None = None) -> Path:
    """Exports into ``<root>/.staging``, writes the manifest last and renames
    the directory into ``<root>/local/<name>/<generation>``."""
    root = root or local_root()
    staging = root / ".staging" / f"local.{name}.{uuid.uuid4().hex[:12]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        exported = export(model_or_pipeline, staging, name=name, mode=mode)
        (staging / "modelwrapper.yaml").unlink()
        # torch.save stamps a random id into every archive, so the skeleton
        # files never hash alike; the architecture's repr stands in for them.
        _, modules = detect_components(model_or_pipeline)
        digest = hashlib.sha256(f"{mode}:{type(model_or_pipeline).__qualname__}".encode())
        for c in exported.components:
            digest.update(f"{c.name}:{c.weights_sha256}:{modules[c.attribute]!r}".encode())
        generation = digest.hexdigest()[:16]
        target = root / LOCAL_NAMESPACE / name / generation
        if (target / MANIFEST_FILE).exists():
            return target
        manifest = _manifest(exported, name=name, generation=generation, mode=mode)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a leftover without a manifest
            shutil.rmtree(target)
        os.rename(staging, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
