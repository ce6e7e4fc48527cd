"""``load()``: tensors as views of a read-only file mapping."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import types
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._format import (
    ATTRIBUTE_KEY,
    PIPELINE_SKELETON_FILE,
    VolumeError,
    parse_header,
    read_manifest,
)
from ._root import LOCAL_NAMESPACE, local_generation, open_root, opened, root_lock
from ._skeleton import assign_state, build_from_factory

log = logging.getLogger("modelwrapper")

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
PAGE = mmap.PAGESIZE


class LoadedPipeline(types.SimpleNamespace):
    """A pipeline rebuilt without its pickled object: one attribute per component."""


ALLOW_PICKLE_ENV = "MODELWRAPPER_ALLOW_PICKLE"
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


def map_tensors(
    path: Path, *, prefault: bool = False, copy_on_write: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Maps a safetensors file privately and read-only, and returns views.

    No byte is copied: every tensor's storage lies inside the mapping, which
    all processes share through the page cache of the tmpfs. An in-place
    write is a bug that would silently give this process a private copy of
    the page (memory the sharing was meant to save), so the mapping has no
    write permission and the write fails loudly (SIGSEGV). With
    ``copy_on_write=True`` the mapping is writable copy-on-write instead: a
    write copies the touched page for this process only.
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
    if prefault:
        populate(mm)
    data_len = size - header.data_offset
    tensors: dict[str, torch.Tensor] = {}
    base = None
    if data_len:
        with warnings.catch_warnings():
            # torch warns that it cannot mark tensors read-only; the mapping is.
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            base = torch.frombuffer(mm, dtype=torch.uint8, offset=header.data_offset, count=data_len)
    for t in header.tensors:
        if t.end == t.begin or base is None:
            tensors[t.name] = torch.empty(t.shape, dtype=t.dtype)
            continue
        tensors[t.name] = base[t.begin : t.end].view(t.dtype).view(t.shape)
    return tensors, header.metadata


def populate(mm: mmap.mmap) -> None:
    """Fills the page tables up front so the first forward pass takes no faults."""
    try:
        mm.madvise(MADV_POPULATE_READ)
        return
    except (OSError, ValueError):
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        view = torch.frombuffer(mm, dtype=torch.uint8)
    int(view[::PAGE].sum())  # one byte per page: reads only, so it works on the read-only mapping


def _component(path: Path, c: dict[str, Any], prefault: bool, copy_on_write: bool) -> tuple[str, Any]:
    tensors, metadata = map_tensors(path / c["weights"]["file"], prefault=prefault, copy_on_write=copy_on_write)
    attribute = metadata.get(ATTRIBUTE_KEY) or c["name"].replace("-", "_")
    skeleton = c.get("skeleton")
    if not skeleton:
        return attribute, tensors
    if skeleton.get("file"):
        module = torch.load(path / skeleton["file"]["file"], map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise VolumeError(f"component {c['name']}: skeleton is a {type(module).__name__}, not an nn.Module")
    elif skeleton.get("factory"):
        module = build_from_factory(skeleton["factory"], skeleton.get("kwargs"))
    else:
        raise VolumeError(f"component {c['name']}: skeleton has neither file nor factory")
    module = assign_state(c["name"], module, tensors)
    module.eval()
    module.requires_grad_(False)
    return attribute, module


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


def load(path: str | os.PathLike[str], *, prefault: bool = False, copy_on_write: bool | None = None) -> Any:
    """Loads a ModelWrapper volume zero-copy.

    Returns the ``nn.Module`` when the pipeline is one component without a
    pipeline skeleton, else the pipeline object with one attribute per
    component. Modules are in eval mode, on CPU, with ``requires_grad=False``.
    A component without a skeleton comes back as ``dict[str, Tensor]``.

    Tensors are read-only views of the shared pages: an in-place write kills
    the process with SIGSEGV rather than silently copying. ``copy_on_write=True``
    (or ``MODELWRAPPER_COPY_ON_WRITE=1``) maps writable copy-on-write instead.
    With ``MODELWRAPPER_ALLOW_PICKLE=0`` pickled skeletons are refused.
    """
    root = Path(path)
    allow_pickle = pickle_allowed()
    cow = env_flag(COPY_ON_WRITE_ENV, False) if copy_on_write is None else copy_on_write
    with _held_against_collection(root):
        manifest = read_manifest(root)
        if not allow_pickle:
            _refuse_pickles(root, manifest)
        prefault = prefault or bool(manifest.get("prefault"))
        components = [_component(root, c, prefault, cow) for c in manifest["components"]]
    pipeline_file = manifest.get("pipelineSkeleton")
    if pipeline_file:
        with open(root / pipeline_file["file"], "rb") as f:
            pipeline = pickle.load(f)
        for attribute, value in components:
            setattr(pipeline, attribute, value)
        return pipeline
    if len(components) == 1:
        return components[0][1]
    return LoadedPipeline(**dict(components))
