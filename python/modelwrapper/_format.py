"""Volume formats v1 and v2 as the Python loader reads them (docs/FORMAT.md).

The node agent validated every header before publishing; this module still
checks what it relies on (bounds, spans, alignment), because a volume can also
come from ``export()`` or a hand-made directory.
"""

from __future__ import annotations

import json
import operator
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

FORMAT_V1 = "zerocopy.dev/v1"
# Generations with a directory component (a Hugging Face model directory).
FORMAT_V2 = "zerocopy.dev/v2"
MANIFEST_FILE = "manifest.json"
PIPELINE_SKELETON_FILE = "pipeline.skeleton.pkl"
MAX_HEADER_BYTES = 100 * 1024 * 1024
ATTRIBUTE_KEY = "zerocopy.attribute"
# The same for a directory component (a Hugging Face model directory, whose
# shards save_pretrained writes): {"attribute": "textEncoder"}, written by
# export() only where the component name does not give the attribute back.
ATTRIBUTE_FILE = "zerocopy-attribute.json"
# A skeleton written by export(): a plain pickle of {SKELETON_KEY: 3,
# "module": <root>, "modules": [(module, its state less empty bookkeeping)],
# "state": [(names, shape, dtype, parameter, owners)]} (docs/FORMAT.md
# "Skeleton files"); version 2 ({SKELETON_KEY: 2, "module": <module, weights
# set to None>, "state": [{names, shape, dtype, parameter}]}) and torch.save
# archives of a meta-device module load too.
SKELETON_KEY = "zerocopy.skeleton"
SKELETON_VERSION = 3
SKELETON_VERSIONS = (2, 3)

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


_DTYPE_SIZES = {name: (dtype, dtype.itemsize) for name, dtype in DTYPES.items()}


class VolumeError(ValueError):
    """A volume or file that cannot be loaded; the message says what to do."""


class TensorEntry(NamedTuple):
    """One tensor of a checked header (a named tuple: built once per tensor
    on every load, three times cheaper than a frozen dataclass)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


_SPAN = operator.itemgetter(3, 4)  # (begin, end) of a TensorEntry


@dataclass(frozen=True)
class SafetensorsHeader:
    data_offset: int
    tensors: list[TensorEntry]
    metadata: dict[str, str]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def component_name(attribute: str) -> str:
    """Attribute name → DNS-1123 component name (``text_encoder`` → ``text-encoder``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", attribute.lower()).strip("-")[:63].strip("-")
    if not _DNS_LABEL.match(name or ""):
        raise ValueError(f"attribute {attribute!r} cannot be turned into a component name")
    return name


def default_attribute(component: str) -> str:
    """The attribute a component name stands for when nothing records one
    (``text-encoder`` → ``text_encoder``)."""
    return component.replace("-", "_")


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
    if manifest.get("format") not in (FORMAT_V1, FORMAT_V2):
        raise VolumeError(
            f"{manifest_path} has format {manifest.get('format')!r}; this modelwrapper reads "
            f"{FORMAT_V1!r} and {FORMAT_V2!r}: upgrade modelwrapper"
        )
    return manifest


_U64_MAX = 2**64 - 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object hook that refuses duplicate keys (a header that says two
    things about one tensor is ambiguous; readers would disagree)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def parse_header(buf: memoryview | bytes, file_size: int, where: str) -> SafetensorsHeader:
    """Parses and checks a safetensors header from the start of ``buf``.

    The same rules, in the same order, as ``validate_header`` in
    ``api/src/safetensors.rs`` (docs/FORMAT.md), so a file one loader accepts
    the other accepts too. Stricter only where Rust would silently pick one
    of two meanings: duplicate keys are refused.
    """
    if file_size < 8 or len(buf) < 8:
        raise VolumeError(
            f"{where}: file is {file_size} bytes: too short for a safetensors header (needs at least 8); "
            "it is not a safetensors file, or it is truncated"
        )
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER_BYTES:
        raise VolumeError(
            f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: not a safetensors file, or a corrupt one"
        )
    if 8 + n > file_size or 8 + n > len(buf):
        raise VolumeError(
            f"{where}: header length {n} does not fit in a {file_size}-byte file: the file is truncated or not safetensors"
        )
    bad = f"{where}: header is not valid safetensors JSON"
    text = bytes(buf[8 : 8 + n])
    data_offset = 8 + n
    available = file_size - data_offset
    fast = _parse_fast(text, data_offset, available)
    if fast is not None:
        return _covered(SafetensorsHeader(data_offset, fast[0], fast[1]), where, available)
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey as e:
        raise VolumeError(f"{bad}: key {e.args[0]!r} appears twice; re-save the file with the safetensors library") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise VolumeError(f"{bad}: {e}") from None
    if not isinstance(raw, dict):
        raise VolumeError(f"{bad}: expected an object of tensors, found {type(raw).__name__}")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise VolumeError(f"{bad}: __metadata__ must map strings to strings, found {json.dumps(metadata)[:200]}")
    tensors = [
        _tensor_fast(name, info, data_offset, available) or _tensor(name, info, bad, where, data_offset, available)
        for name, info in raw.items()
    ]
    return _covered(SafetensorsHeader(data_offset, tensors, dict(metadata)), where, available)


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs: a hook json calls without
    running Python code, unlike :func:`_no_duplicates`."""

    __slots__ = ()


def _parse_fast(text: bytes, data_offset: int, available: int) -> tuple[list[TensorEntry], dict[str, str]] | None:
    """The tensors and metadata of a header that passes every check of the
    strict parse below (no duplicate key anywhere, exactly dtype, shape and
    data_offsets per tensor, each :func:`_tensor_fast`), else None: then
    the strict parse says what is wrong. A third of the header's parse time
    on a 291-tensor model was the Python duplicate-key hook."""
    try:
        raw = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if type(raw) is not _Pairs:
        return None
    top = dict(raw)
    if len(top) != len(raw):
        return None
    metadata: dict[str, str] = {}
    if "__metadata__" in top:
        pairs = top.pop("__metadata__")
        if type(pairs) is not _Pairs:
            return None
        metadata = dict(pairs)
        if len(metadata) != len(pairs) or not all(type(v) is str for v in metadata.values()):
            return None
    # _tensor_fast's checks on the pairs the parse gave.
    tensors = []
    sizes = _DTYPE_SIZES
    new = tuple.__new__
    for name, info in top.items():
        if type(info) is not _Pairs or len(info) != 3:
            return None
        fields = dict(info)
        dtype_name, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if len(fields) != 3 or type(dtype_name) is not str or type(shape) is not list or type(offsets) is not list:
            return None
        found = sizes.get(dtype_name)
        if found is None or len(offsets) != 2:
            return None
        dtype, size = found
        if not _span_ok(shape, offsets, size, data_offset, available):
            return None
        tensors.append(new(TensorEntry, (name, dtype, tuple(shape), offsets[0], offsets[1])))
    return tensors, metadata


def _covered(header: SafetensorsHeader, where: str, available: int) -> SafetensorsHeader:
    """``header`` once its tensors are checked to cover the data exactly
    once (no overlap, no gap); its tensors end up ordered by span."""
    tensors = header.tensors
    # Empty tensors occupy no bytes and may sit anywhere; order by span.
    tensors.sort(key=_SPAN)
    covered = 0
    last: TensorEntry | None = None
    for t in tensors:
        if t.end == t.begin:
            continue
        if t.begin < covered:
            raise VolumeError(
                f"{where}: tensors {last.name if last else ''!r} and {t.name!r} overlap "
                f"(data bytes {t.begin}..{min(covered, t.end)} belong to both)"
            )
        if t.begin > covered:
            raise VolumeError(f"{where}: data bytes {covered}..{t.begin} belong to no tensor: the header does not cover the file")
        covered = t.end
        last = t
    if covered != available:
        raise VolumeError(f"{where}: data bytes {covered}..{available} belong to no tensor: the header does not cover the file")
    return header


def _tensor_fast(name: str, info: Any, data_offset: int, available: int) -> TensorEntry | None:
    """The entry when it passes every check of :func:`_tensor`, else None
    (then :func:`_tensor` says what is wrong). Per-tensor validation was
    most of load()'s own time on many-tensor models."""
    if type(info) is not dict:
        return None
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    if not _span_ok(shape, offsets, dtype.itemsize, data_offset, available):
        return None
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _span_ok(shape: list, offsets: list, size: int, data_offset: int, available: int) -> bool:
    """True when ``offsets`` (a list of two) are ints inside the data, span
    exactly shape x ``size`` bytes and start aligned to ``size``; every
    dimension an int in u64 range."""
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= available:
        return False
    nbytes = size
    for d in shape:
        if type(d) is not int or not 0 <= d <= _U64_MAX:
            return False
        nbytes *= d
    return nbytes == end - begin and (data_offset + begin) % size == 0


def _tensor(name: str, info: Any, bad: str, where: str, data_offset: int, available: int) -> TensorEntry:
    """One header entry, checked: fields, dtype, span = shape x element size,
    bounds, element alignment in the file."""
    if not isinstance(info, dict):
        raise VolumeError(f"{bad}: tensor {name!r} is a {type(info).__name__}, not an object of dtype, shape and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise VolumeError(f"{bad}: tensor {name!r} is missing {', '.join(missing)}")
    dtype_name = info["dtype"]
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise VolumeError(
            f"{where}: tensor {name!r} has unsupported dtype {dtype_name!r} (supported: {', '.join(DTYPES)})"
        )
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_u64(d) for d in shape):
        raise VolumeError(f"{bad}: tensor {name!r} has shape {json.dumps(shape)}; dimensions must be non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(x) for x in offsets):
        raise VolumeError(
            f"{bad}: tensor {name!r} has data_offsets {json.dumps(offsets)}; expected [begin, end], non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise VolumeError(f"{where}: tensor {name!r} has data_offsets [{begin}, {end}] with begin after end")
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if expected > _U64_MAX:
        raise VolumeError(f"{bad}: tensor {name!r}: shape {shape} overflows")
    if expected != end - begin:
        raise VolumeError(
            f"{where}: tensor {name!r}: shape {shape} of {dtype_name} needs {expected} bytes "
            f"but data_offsets span {end - begin}"
        )
    if end > available:
        raise VolumeError(
            f"{where}: tensor {name!r} ends at data byte {end} but the file holds {available} data bytes: the file is truncated"
        )
    offset = data_offset + begin
    if offset % dtype.itemsize:
        raise VolumeError(
            f"{where}: tensor {name!r} ({dtype_name}) starts at file offset {offset}, not a multiple of {dtype.itemsize}: "
            "zero-copy views would be misaligned; re-save it with the safetensors library"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)
