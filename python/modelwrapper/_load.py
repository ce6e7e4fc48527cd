"""``load()``: tensors as views of a read-only file mapping."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import mmap
import os
import pickle
import threading
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ._format import (
    ATTRIBUTE_FILE,
    ATTRIBUTE_KEY,
    SafetensorsHeader,
    TensorEntry,
    VolumeError,
    component_name,
    default_attribute,
    parse_header,
    read_manifest,
)
from ._shard import Shard, shard_of

if TYPE_CHECKING:  # the GPU path's modules load when a device load runs
    from ._device import CopyReport, FileSource, Transfer
from ._root import LOCAL_NAMESPACE, local_generation, open_root, opened, root_lock
from ._skeleton import assign_skeleton, assign_state, build_from_factory, read_skeleton

log = logging.getLogger("modelwrapper")



class LoadedPipeline(types.SimpleNamespace):
    """A pipeline rebuilt without its pickled object: one attribute per component."""


ALLOW_PICKLE_ENV = "MODELWRAPPER_ALLOW_PICKLE"
GPU_REGISTER_ENV = "MODELWRAPPER_GPU_REGISTER"
COPY_ON_WRITE_ENV = "MODELWRAPPER_COPY_ON_WRITE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment switch; an unknown value is an error rather
    than a guess, since these switches guard code execution and memory."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise VolumeError(f"{name}={os.environ[name]!r} is not understood: set it to 1/true/yes or 0/false/no")


def pickle_allowed() -> bool:
    """``MODELWRAPPER_ALLOW_PICKLE`` (default allowed): whether load() may
    unpickle skeletons, which runs whatever code their author chose."""
    return env_flag(ALLOW_PICKLE_ENV, True)


@dataclass
class MappedFile:
    """One safetensors file mapped read-only (or copy-on-write), checked."""

    path: Path
    mm: mmap.mmap
    header: SafetensorsHeader
    # The whole mapping, and its data region, as 1-D uint8 views; data is
    # None when the file holds no tensor bytes.
    whole: torch.Tensor
    data: torch.Tensor | None
    _typed: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def view(self, t: TensorEntry) -> torch.Tensor:
        """Tensor ``t`` as a view of the mapping: one ``as_strided`` of a
        per-dtype view of the whole mapping (page-aligned), at the tensor's
        file offset, which the header check found aligned for its dtype
        (whatever the data region's own alignment)."""
        size = t.dtype.itemsize
        base = self._typed.get(t.dtype)
        if base is None:
            base = self._typed[t.dtype] = self.whole[: self.whole.numel() // size * size].view(t.dtype)
        return base.as_strided(t.shape, _contiguous_strides(t.shape), (self.header.data_offset + t.begin) // size)


def map_file(path: Path, *, copy_on_write: bool = False) -> MappedFile:
    """Maps a safetensors file privately and read-only and checks its header.

    No byte is copied: views of the mapping share the tmpfs page cache with
    every other process. An in-place write is a bug that would silently give
    this process a private copy of the page (memory the sharing was meant to
    save), so the mapping has no write permission and the write fails loudly
    (SIGSEGV). With ``copy_on_write=True`` the mapping is writable
    copy-on-write instead: a write copies the touched page for this process.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise VolumeError(f"{path} is empty")
        if copy_on_write:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        else:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    header = parse_header(memoryview(mm)[: min(size, 8 + 100 * 1024 * 1024)], size, str(path))
    with warnings.catch_warnings():
        # torch warns that it cannot mark tensors read-only; the mapping is.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        whole = torch.frombuffer(mm, dtype=torch.uint8)
    data = whole[header.data_offset :] if size > header.data_offset else None
    return MappedFile(path, mm, header, whole, data)


def cpu_views(m: MappedFile, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Every tensor as a view of the mapping (a shard: a narrowed view)."""
    tensors: dict[str, torch.Tensor] = {}
    if shard is None:  # every load(): one as_strided per tensor, nothing else
        view = m.view
        for t in m.header.tensors:
            tensors[t.name] = torch.empty(t.shape, dtype=t.dtype) if t.end == t.begin else view(t)
        return tensors
    for t in m.header.tensors:
        tensor = torch.empty(t.shape, dtype=t.dtype) if t.end == t.begin else m.view(t)
        cut = shard_of(shard, t, m.path)
        tensors[t.name] = tensor.narrow(*cut) if cut else tensor
    return tensors


# Strides by shape: models repeat a few shapes many times (once per layer).
_strides: dict[tuple[int, ...], tuple[int, ...]] = {}


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    found = _strides.get(shape)
    if found is not None:
        return found
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    if len(_strides) < 4096:
        _strides[shape] = tuple(strides)
    return tuple(strides)


def map_tensors(
    path: Path, *, prefault: bool = False, copy_on_write: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Views of every tensor in a mapped file, and the file's metadata."""
    m = map_file(path, copy_on_write=copy_on_write)
    if prefault:
        populate(m.mm)
    return cpu_views(m), m.header.metadata


def device_tensors(
    files: list[MappedFile], device: torch.device, shard: Shard | None = None
) -> tuple[list[dict[str, torch.Tensor]], CopyReport]:
    """Copies the tensors of ``files`` (a shard's bytes only) to ``device``.

    A whole file lands in one device buffer at its file offsets, so the
    copy is one contiguous stream of chunks; a shard's tensors are packed.
    """
    from ._device import FileSource, Transfer

    transfer = Transfer(_backend(device), register=env_flag(GPU_REGISTER_ENV, False))
    out = []
    fds: list[int] = []
    try:
        for m in files:
            fds.append(os.open(m.path, os.O_RDONLY | os.O_CLOEXEC))
            out.append(_copy_file(transfer, FileSource(fds[-1], m.header.data_offset), m, device, shard))
    finally:
        try:
            report = transfer.finish()
        finally:
            for fd in fds:
                os.close(fd)
    log.info(
        "copied %.2f GB to %s in %.3f s (%.1f GB/s, %s%s)",
        report.bytes / 1e9,
        device,
        report.seconds,
        report.gb_per_s,
        report.path,
        f": {report.fallback_reason}" if report.fallback_reason and report.staged_bytes else "",
    )
    return out, report


def _copy_file(
    transfer: Transfer, source: FileSource, m: MappedFile, device: torch.device, shard: Shard | None
) -> dict[str, torch.Tensor]:
    from ._device import DEST_ALIGN, Gather, Piece

    pieces: list[Piece] = []
    gathers: list[Gather] = []
    # (name, dtype, shape, destination offset) of each non-empty tensor.
    placed: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    empty: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    packed = 0
    # A whole file keeps its layout shifted so that every tensor is as
    # aligned in the device buffer as it is in the file.
    shift = m.header.data_offset % DEST_ALIGN
    for t in m.header.tensors:
        cut = shard_of(shard, t, m.path)
        if cut is None:
            shape, nbytes = t.shape, t.end - t.begin
        else:
            dim, start, length = cut
            shape = t.shape[:dim] + (length,) + t.shape[dim + 1 :]
            nbytes = math.prod(shape) * t.dtype.itemsize
        if nbytes == 0 or m.data is None:
            empty[t.name] = (t.dtype, shape)
            continue
        if shard is None:
            dst = shift + t.begin  # the file's own layout: one contiguous copy
        else:
            dst = -(-packed // DEST_ALIGN) * DEST_ALIGN
            packed = dst + nbytes
        placed.append((t.name, t.dtype, shape, dst))
        if cut is None:
            pieces.append(Piece(t.begin, nbytes, dst))
            continue
        dim, start, length = cut
        if math.prod(t.shape[:dim]) == 1:  # a narrowed leading dimension is contiguous
            row = math.prod(t.shape[dim + 1 :]) * t.dtype.itemsize
            pieces.append(Piece(t.begin + start * row, nbytes, dst))
        else:
            view = m.view(t).narrow(dim, start, length)
            gathers.append(Gather(view, dst))
    size = (shift + (m.data.numel() if m.data is not None else 0)) if shard is None else packed
    dest = transfer.backend.empty(size)
    if m.data is not None:
        transfer.copy_file(source, m.data, dest, pieces, gathers)
    tensors = {
        name: dest[dst : dst + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, dtype, shape, dst in placed
    }
    for name, (dtype, shape) in empty.items():
        tensors[name] = torch.empty(shape, dtype=dtype, device=device)
    return {t.name: tensors[t.name] for t in m.header.tensors}


def _backend(device: torch.device) -> Any:
    """The CUDA runtime for a device :func:`_device` accepted (not the CPU)."""
    if not torch.cuda.is_available():
        raise VolumeError(
            f"cannot load to {device}: torch.cuda.is_available() is False in this process "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "load to 'cpu' (the default), or run where a GPU is visible (nvidia.com/gpu resource, NVIDIA_VISIBLE_DEVICES)"
        )
    from ._device import CudaBackend

    return CudaBackend(device)


def _device(device: str | torch.device | None) -> torch.device:
    try:
        d = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise VolumeError(f"device {device!r} is not a torch device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type not in ("cpu", "cuda"):
        raise VolumeError(f"device {str(d)!r} is not supported: load to 'cpu' (zero-copy) or to 'cuda[:N]'")
    return d


def populate(mm: mmap.mmap) -> None:
    """Fills the page tables up front so the first forward pass takes no faults."""
    from ._prefault import populate_mapping

    populate_mapping(mm)


def _build(
    path: Path,
    c: dict[str, Any],
    files: list[MappedFile],
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    as_dict: bool = False,
) -> tuple[str, Any]:
    attribute = recorded_attribute(path, c, files) or default_attribute(c["name"])
    skeleton = c.get("skeleton")
    directory = c.get("directory")
    if not skeleton and directory and not as_dict:
        component_dir = inside(path, directory.get("path"), "component directory")
        if (component_dir / "config.json").is_file():
            from ._hf import build_pretrained

            module = build_pretrained(c["name"], component_dir, tensors)
            landed = next(iter(tensors.values())).device if tensors else device
            if landed.type != "cpu":
                module.to(landed)
            return attribute, module
    if not skeleton or as_dict:
        return attribute, tensors
    if skeleton.get("file"):
        module = assign_skeleton(c["name"], read_skeleton(inside(path, skeleton["file"]["file"], "skeleton file")), tensors)
    elif skeleton.get("factory"):
        module = assign_state(c["name"], build_from_factory(skeleton["factory"], skeleton.get("kwargs")), tensors)
    else:
        raise VolumeError(f"component {c['name']}: skeleton has neither file nor factory")
    # Where the weights landed (the requested device, with its index).
    landed = next(iter(tensors.values())).device if tensors else device
    if landed.type != "cpu":
        # Buffers the weights do not hold (non-persistent ones) are still on
        # the host; parameters already on the device stay where they are.
        module.to(landed)
    return attribute, module


def recorded_attribute(path: Path, c: dict[str, Any], files: list[MappedFile]) -> str | None:
    """The pipeline attribute export() recorded for a component: in its
    weights' metadata, or for a directory component in its attribute file
    (docs/FORMAT.md); None when neither records one."""
    recorded = files[0].header.metadata.get(ATTRIBUTE_KEY) if files else None
    directory = c.get("directory")
    if recorded is None and directory:
        rel = f"{directory.get('path')}/{ATTRIBUTE_FILE}"
        if rel not in {e.get("file") for e in directory.get("files") or [] if isinstance(e, dict)}:
            return None
        where = inside(path, rel, "attribute file")
        try:
            recorded = json.loads(where.read_bytes()).get("attribute")
        except (OSError, ValueError, AttributeError) as e:
            raise VolumeError(f"component {c['name']}: {where} is not a JSON object with an attribute ({e})") from None
    if recorded is not None and not (isinstance(recorded, str) and recorded.isidentifier()):
        raise VolumeError(f"component {c['name']}: recorded attribute {recorded!r} is not a Python attribute name")
    return recorded


def _pipeline_attribute(pipeline: Any, component: str, attribute: str) -> str:
    """Where a component goes in an unpickled pipeline: the attribute the
    volume names when the pipeline has it, else the one attribute export()
    emptied (None) whose component name this is (volumes exported before
    attributes were recorded for directory components)."""
    if attribute in getattr(pipeline, "__dict__", {}):
        return attribute
    emptied = [
        k for k, v in getattr(pipeline, "__dict__", {}).items() if v is None and _component_name_or_none(k) == component
    ]
    return emptied[0] if len(emptied) == 1 else attribute


def _component_name_or_none(attribute: str) -> str | None:
    try:
        return component_name(attribute)
    except ValueError:
        return None


def _refuse_pickles(root: Path, manifest: dict[str, Any]) -> None:
    pickles = [
        f"{c['name']}: {c['skeleton']['file']['file']}"
        for c in manifest.get("components", [])
        if isinstance(c.get("skeleton"), dict) and c["skeleton"].get("file")
    ]
    if manifest.get("pipelineSkeleton"):
        pickles.append(f"pipeline: {manifest['pipelineSkeleton']['file']}")
    if pickles:
        raise VolumeError(
            f"{root}: refusing to unpickle {'; '.join(pickles)} because {ALLOW_PICKLE_ENV}="
            f"{os.environ.get(ALLOW_PICKLE_ENV)}: unpickling runs whatever code the file's author chose. "
            'Give each component a factory skeleton instead (skeleton: {factory: "package.module:callable", '
            "kwargs: {...}}) and no pipeline skeleton, or set "
            f"{ALLOW_PICKLE_ENV}=1 if you trust whoever can write this volume's ModelWrapper spec"
        )


_pause_lock = threading.Lock()
_pauses = 0
_resume = False


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a load builds its
    objects (thousands of modules' tables, views, parameters), on again
    after: otherwise its young-generation passes run a dozen times in one
    load, over objects that all survive (0.75 ms of a 291-tensor model's
    load). Only a collector that was on is turned on again; overlapping
    loads in several threads keep it off until the last one ends."""
    global _pauses, _resume
    with _pause_lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()


@contextlib.contextmanager
def _held_against_collection(path: Path) -> Iterator[None]:
    """For a generation ``from_model()`` published: holds the root lock
    (shared) while mapping, so a concurrent collection cannot free it
    between "it is there" and "it is mapped" (afterwards the mapping
    protects it), and says clearly when it was freed already."""
    found = local_generation(path)
    if found is None:
        yield
        return
    root, name, generation = found
    try:
        rfd = open_root(root, create=False)
    except OSError as e:  # UnsafeRootError included: loading a path is the caller's choice
        log.debug("loading %s without the root lock: %s", path, e)
        yield
        return
    with opened(rfd):
        if rfd is None:
            yield
            return
        with root_lock(rfd):
            if not os.path.isdir(root / LOCAL_NAMESPACE / name / generation):
                raise VolumeError(
                    f"{path} was freed: no ModelWrapper object held it and no process mapped it when unused "
                    "generations were collected. Keep the wrapper that from_model() returned alive while others "
                    "may still load it (pickled copies in flight do not count), or call from_model() again"
                )
            yield


def _prefault_mode(prefault: bool | str | None, manifest: dict[str, Any]) -> str:
    """The caller's choice, or the volume's `memory.prefault` when it made none."""
    if prefault in (None, False):
        return "sync" if manifest.get("prefault") else "off"
    if prefault is True or prefault == "sync":
        return "sync"
    if prefault == "background":
        return "background"
    raise VolumeError(f"prefault={prefault!r} is not understood: use False, True (or 'sync') or 'background'")


def _copy_on_write(copy_on_write: bool | None) -> bool:
    return env_flag(COPY_ON_WRITE_ENV, False) if copy_on_write is None else copy_on_write


def inside(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a path a manifest names, refused unless it is a
    plain relative path (a hand-made or export()ed volume is read too)."""
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise VolumeError(
            f"{root}/manifest.json names {what} {rel!r}, which is not a path inside the volume; "
            "the volume is damaged or not a zerocopy volume"
        )
    return root / rel


def weights_files(c: dict[str, Any]) -> list[str]:
    """A component's safetensors files, relative to the generation: its one
    file (format v1), or the shards its directory lists (format v2), which
    must lie in the component's directory."""
    if c.get("weights"):
        return [c["weights"]["file"]]
    directory = c.get("directory") or {}
    files = list(directory.get("weights") or [])
    if not files:
        raise VolumeError(f"component {c.get('name')!r}: the manifest lists no weights file; refill the volume")
    prefix = f"{directory.get('path')}/"
    outside = [f for f in files if not (isinstance(f, str) and f.startswith(prefix))]
    if outside:
        raise VolumeError(f"component {c.get('name')!r}: weights {outside} lie outside its directory {prefix!r}")
    return files


def _mapped(root: Path, manifest: dict[str, Any], cow: bool) -> list[list[MappedFile]]:
    return [
        [map_file(inside(root, f, "weights file"), copy_on_write=cow) for f in weights_files(c)]
        for c in manifest["components"]
    ]


def _merged(component: str, files: list[MappedFile], sets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One component's tensors from all its shards; a name in two shards is
    refused (per-rank files are read one at a time: ``load_state_dict(file=...)``)."""
    if len(sets) == 1:
        return sets[0]
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for m, tensors in zip(files, sets):
        for name, t in tensors.items():
            if name in merged:
                raise VolumeError(
                    f"component {component}: tensor {name} is in both {origin[name].name} and {m.path.name}; "
                    "shards of one model hold distinct tensors. Per-rank files are read one at a time: "
                    "modelwrapper.load_state_dict(path, component, file=...)"
                )
            merged[name] = t
            origin[name] = m.path
    return merged


_last_report: CopyReport | None = None


def last_copy_report() -> CopyReport | None:
    """How the last device load of this process moved its bytes: path
    (registered or staged, and why), bytes, seconds, GB/s."""
    return _last_report


def _tensor_sets(
    files: list[MappedFile], device: torch.device, prefault: str, shard: Shard | None = None
) -> list[dict[str, torch.Tensor]]:
    global _last_report
    if device.type == "cpu":
        if prefault == "sync":
            for m in files:
                populate(m.mm)
        elif prefault == "background":
            from ._prefault import populate_in_background

            populate_in_background([m.mm for m in files])
        return [cpu_views(m, shard) for m in files]
    sets, _last_report = device_tensors(files, device, shard)
    return sets


def load(
    path: str | os.PathLike[str],
    *,
    prefault: bool | str = False,
    copy_on_write: bool | None = None,
    device: str | torch.device | None = None,
    as_dict: bool = False,
) -> Any:
    """Loads a ModelWrapper volume zero-copy.

    Returns the ``nn.Module`` when the pipeline is one component without a
    pipeline skeleton, else the pipeline object with one attribute per
    component. Modules are in eval mode with ``requires_grad=False``. A
    component without a skeleton comes back as ``dict[str, Tensor]``, except
    a Hugging Face model directory (a ``source:`` component with a
    ``config.json``), which comes back as the ``transformers`` model its
    config names, every weight a view of the node copy. ``as_dict=True``
    returns every component's tensors as ``dict[str, Tensor]`` instead.

    On CPU (the default) tensors are read-only views of the shared pages: an
    in-place write kills the process with SIGSEGV rather than silently
    copying. ``copy_on_write=True`` (or ``MODELWRAPPER_COPY_ON_WRITE=1``) maps
    writable copy-on-write instead. ``prefault=True`` fills the page tables
    before returning; ``prefault="background"`` returns at once and fills
    them in a thread (``modelwrapper.wait_for_prefault()`` waits for it).

    ``device="cuda:N"`` copies every tensor from the node copy to that GPU:
    read by several threads into a ring of pinned buffers while earlier
    buffers are in flight on two streams (``MODELWRAPPER_GPU_REGISTER=1``
    pins the mapping itself instead, where the platform pins fast);
    ``modelwrapper.last_copy_report()`` says how it went. With
    ``MODELWRAPPER_ALLOW_PICKLE=0`` pickled skeletons are refused.
    """
    root = Path(path)
    dev = _device(device)
    allow_pickle = pickle_allowed()
    cow = _copy_on_write(copy_on_write)
    with _collector_paused():
        with _held_against_collection(root):
            manifest = read_manifest(root)
            if not allow_pickle:
                _refuse_pickles(root, manifest)
            mode = _prefault_mode(prefault, manifest)
            per_component = _mapped(root, manifest, cow and dev.type == "cpu")
            flat = _tensor_sets([m for files in per_component for m in files], dev, mode)
            components = []
            for c, files in zip(manifest["components"], per_component):
                tensors = _merged(c["name"], files, flat[: len(files)])
                flat = flat[len(files) :]
                components.append(_build(root, c, files, tensors, dev, as_dict))
        pipeline_file = manifest.get("pipelineSkeleton")
        if pipeline_file:
            with open(inside(root, pipeline_file["file"], "pipeline skeleton"), "rb") as f:
                pipeline = pickle.load(f)
            for c, (attribute, value) in zip(manifest["components"], components):
                setattr(pipeline, _pipeline_attribute(pipeline, c["name"], attribute), value)
            return pipeline
    if len(components) == 1:
        return components[0][1]
    return LoadedPipeline(**dict(components))


def load_state_dict(
    path: str | os.PathLike[str],
    component: str | None = None,
    *,
    device: str | torch.device | None = None,
    shard: Shard | None = None,
    prefault: bool | str = False,
    copy_on_write: bool | None = None,
    file: str | None = None,
) -> dict[str, torch.Tensor]:
    """One component's tensors by name, without building a module: the hook
    for frameworks that load weights themselves (vLLM, tensor-parallel
    ranks). ``component`` may be left out when the volume holds one.

    ``shard`` (``modelwrapper.tp_shard(rank, size, {...})``, or any
    callable ``(name, shape) -> (dim, start, length) | None``) gives each
    rank only its slice of every tensor it names: on CPU a narrowed view of
    the node copy (no byte copied), on a GPU only the shard's bytes are
    moved, so eight ranks on a node read one copy. ``prefault`` and
    ``copy_on_write`` (and their environment switches) as for :func:`load`.
    A directory component's shards are merged; ``file`` (a path inside the
    component, e.g. ``"model-rank3.safetensors"``) reads that one
    safetensors file instead, for per-rank pre-sharded layouts.
    """
    root = Path(path)
    dev = _device(device)
    cow = _copy_on_write(copy_on_write)
    with _held_against_collection(root):
        manifest = read_manifest(root)
        mode = _prefault_mode(prefault, manifest)
        names = [c["name"] for c in manifest["components"]]
        if component is None:
            if len(names) != 1:
                raise VolumeError(f"{root} holds components {', '.join(names)}: say which one (component=...)")
            component = names[0]
        chosen = [c for c in manifest["components"] if c["name"] == component]
        if not chosen:
            raise VolumeError(f"{root} has no component {component!r} (it has {', '.join(names)})")
        paths = weights_files(chosen[0])
        if file is not None:
            directory = (chosen[0].get("directory") or {}).get("path")
            listed = {e["file"] for e in (chosen[0].get("directory") or {}).get("files", [])}
            wanted = f"{directory}/{file}" if directory else None
            if wanted not in listed or not file.endswith(".safetensors"):
                raise VolumeError(
                    f"component {component} has no safetensors file {file!r}"
                    + (f" (its files: {', '.join(sorted(f.split('/', 1)[-1] for f in listed))})" if listed else "")
                )
            paths = [wanted]
        files = [map_file(inside(root, p, "weights file"), copy_on_write=cow and dev.type == "cpu") for p in paths]
        return _merged(component, files, _tensor_sets(files, dev, mode, shard))
