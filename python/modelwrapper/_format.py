"""Volume format v1 as the Python loader reads it (docs/FORMAT.md).

The node agent validated every header before publishing; this module still
checks what it relies on (bounds, spans, alignment), because a volume can also
come from ``export()`` or a hand-made directory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_V1 = "zerocopy.dev/v1"
MANIFEST_FILE = "manifest.json"
PIPELINE_SKELETON_FILE = "pipeline.skeleton.pkl"
MAX_HEADER_BYTES = 100 * 1024 * 1024
ATTRIBUTE_KEY = "zerocopy.attribute"

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}


class VolumeError(ValueError):
    """A volume or file that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    data_offset: int
    tensors: list[TensorEntry]
    metadata: dict[str, str]


def weights_file(component: str) -> str:
    return f"{component}.safetensors"


def skeleton_file(component: str) -> str:
    return f"{component}.skeleton.pt"


def read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except FileNotFoundError:
        raise VolumeError(
            f"{path} has no {MANIFEST_FILE}: it is not a complete zerocopy volume "
            "(still filling, or the wrong path; mount the ModelWrapper volume or run "
            "`zerocopy-node-agent standalone -f <yaml>` first)"
        ) from None
    except json.JSONDecodeError as e:
        raise VolumeError(f"{manifest_path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT_V1:
        raise VolumeError(
            f"{manifest_path} has format {manifest.get('format')!r}; this modelwrapper reads {FORMAT_V1!r}"
        )
    return manifest


def parse_header(buf: memoryview | bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Parses and checks a safetensors header from the start of ``buf``."""
    if file_size < 8:
        raise VolumeError(f"{where}: {file_size} bytes is too short for safetensors")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise VolumeError(f"{where}: header length {n} is invalid for a {file_size}-byte file")
    try:
        raw = json.loads(bytes(buf[8 : 8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VolumeError(f"{where}: header is not JSON: {e}") from None
    data_offset = 8 + n
    available = file_size - data_offset
    metadata = raw.pop("__metadata__", None) or {}
    tensors = []
    for name, info in raw.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise VolumeError(f"{where}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        size = numel * dtype.itemsize
        if end - begin != size or begin > end or end > available:
            raise VolumeError(f"{where}: tensor {name!r} span [{begin}, {end}] does not fit shape {list(shape)}")
        if (data_offset + begin) % dtype.itemsize:
            raise VolumeError(f"{where}: tensor {name!r} is not aligned to its element size")
        tensors.append(TensorEntry(name, dtype, shape, begin, end))
    return SafetensorsHeader(data_offset, tensors, dict(metadata))
