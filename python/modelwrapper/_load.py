"""``load()``: tensors as views of a private, copy-on-write file mapping."""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._format import (
    ATTRIBUTE_KEY,
    PIPELINE_SKELETON_FILE,
    VolumeError,
    parse_header,
    read_manifest,
)
from ._skeleton import assign_state, build_from_factory

log = logging.getLogger("modelwrapper")

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
PAGE = mmap.PAGESIZE


class LoadedPipeline(types.SimpleNamespace):
    """A pipeline rebuilt without its pickled object: one attribute per component."""


def map_tensors(path: Path, *, prefault: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Maps a safetensors file privately (copy-on-write) and returns views.

    No byte is copied: every tensor's storage lies inside the mapping, which
    all processes share through the page cache of the tmpfs. An in-place write
    copies the touched page for this process only.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise VolumeError(f"{path} is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header = parse_header(memoryview(mm)[: min(size, 8 + 100 * 1024 * 1024)], size, str(path))
    if prefault:
        populate(mm)
    data_len = size - header.data_offset
    tensors: dict[str, torch.Tensor] = {}
    base = torch.frombuffer(mm, dtype=torch.uint8, offset=header.data_offset, count=data_len) if data_len else None
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
    view = torch.frombuffer(mm, dtype=torch.uint8)
    int(view[::PAGE].sum())  # one byte per page


def _component(path: Path, c: dict[str, Any], prefault: bool) -> tuple[str, Any]:
    tensors, metadata = map_tensors(path / c["weights"]["file"], prefault=prefault)
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


def load(path: str | os.PathLike[str], *, prefault: bool = False) -> Any:
    """Loads a ModelWrapper volume zero-copy.

    Returns the ``nn.Module`` when the pipeline is one component without a
    pipeline skeleton, else the pipeline object with one attribute per
    component. Modules are in eval mode, on CPU, with ``requires_grad=False``.
    A component without a skeleton comes back as ``dict[str, Tensor]``.
    """
    root = Path(path)
    manifest = read_manifest(root)
    prefault = prefault or bool(manifest.get("prefault"))
    components = [_component(root, c, prefault) for c in manifest["components"]]
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
