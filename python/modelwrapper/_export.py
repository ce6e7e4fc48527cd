"""``export()``: a model or pipeline to safetensors files, skeletons and a
ModelWrapper YAML that points at them."""

from __future__ import annotations

import contextlib
import copy
import copyreg
import hashlib
import io
import json
import logging
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._format import (
    ATTRIBUTE_FILE,
    ATTRIBUTE_KEY,
    PIPELINE_SKELETON_FILE,
    SKELETON_KEY,
    SKELETON_VERSION,
    component_name,
    default_attribute,
    skeleton_file,
    weights_file,
)
from ._skeleton import module_internals, standard_pickling

log = logging.getLogger("modelwrapper")

def detect_components(obj: Any) -> tuple[bool, dict[str, nn.Module]]:
    """Like the seed: an ``nn.Module`` is a standalone model; any other object is
    a pipeline whose ``nn.Module`` attributes are its components."""
    if isinstance(obj, nn.Module):
        return True, {"model": obj}
    found = {k: v for k, v in vars(obj).items() if isinstance(v, nn.Module)}
    if not found:
        raise TypeError(
            f"{type(obj).__name__} is neither an nn.Module nor a pipeline with nn.Module attributes"
        )
    return False, found


def model_info(modules: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """What a wrapper says about each component (``wrapper._model_info``)."""
    return {
        attr: {
            "component": component_name(attr),
            "class": f"{type(m).__module__}.{type(m).__qualname__}",
            "parameters": sum(p.numel() for p in m.parameters()),
        }
        for attr, m in modules.items()
    }


def _cloudpickle() -> Any | None:
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle


def _defined_in_main(classes: Iterator[type]) -> bool:
    """A class of the running script (``__main__``: a driver, ``python -c``)
    pickles by reference to a module no other process has."""
    return any(c.__module__ == "__main__" for c in classes)


def _dumps(payload: dict[str, Any], by_value: Any | None) -> bytes:
    """Pickles a skeleton payload (by value: through cloudpickle's pickler).
    The modules of a version 3 payload's table are pickled as bare objects
    (``cls.__new__(cls)``, no state): the table carries their state."""
    table = {id(m) for m, _ in payload.get("modules", ())}
    base = by_value.Pickler if by_value is not None else pickle.Pickler

    class _Pickler(base):  # type: ignore[misc, valid-type]
        def reducer_override(self, obj: Any) -> Any:
            if id(obj) in table:
                return copyreg.__newobj__, (type(obj),)  # type: ignore[attr-defined]
            inherited = getattr(super(), "reducer_override", None)
            return inherited(obj) if inherited is not None else NotImplemented

    buf = io.BytesIO()
    _Pickler(buf, protocol=4).dump(payload)
    return buf.getvalue()


def _save_skeleton(payload: dict[str, Any], path: Path) -> None:
    """The skeleton payload pickled by reference, except classes that no
    other process can import (defined in a function, or in the driver
    script's ``__main__``): those go by value through cloudpickle (Ray's own
    pickler), as the seed library does. Loading them needs cloudpickle where
    load() runs."""
    module = payload["module"]
    by_value = _cloudpickle()
    if by_value is not None and _defined_in_main(type(m) for m in module.modules()):
        path.write_bytes(_dumps(payload, by_value))
        return
    try:
        data = _dumps(payload, None)
    except (AttributeError, pickle.PicklingError, TypeError) as e:
        if by_value is None:
            raise
        log.info("%s pickles only by value (%s): saving its skeleton with cloudpickle", type(module).__name__, e)
        data = _dumps(payload, by_value)
    path.write_bytes(data)


def _pickle_by_value_if_needed(obj: Any) -> bytes:
    by_value = _cloudpickle()
    if by_value is not None and _defined_in_main(iter([type(obj)])):
        return by_value.dumps(obj, protocol=4)
    try:
        return pickle.dumps(obj, protocol=4)
    except (AttributeError, pickle.PicklingError, TypeError):
        if by_value is None:
            raise
        return by_value.dumps(obj, protocol=4)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ExportedComponent:
    name: str
    attribute: str
    # One safetensors file, or (a Hugging Face model) a directory that
    # save_pretrained wrote, with the sha256 of each of its files.
    weights: Path | None
    weights_sha256: str | None
    skeleton: Path | None
    skeleton_sha256: str | None
    module_class: str
    parameters: int
    bytes: int
    dtypes: list[str] = field(default_factory=list)
    directory: Path | None = None
    directory_sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class Exported:
    out_dir: Path
    standalone: bool
    components: list[ExportedComponent]
    pipeline_skeleton: Path | None
    pipeline_skeleton_sha256: str | None
    yaml_path: Path
    spec: dict[str, Any]


#: Tensor data starts at a multiple of this in files export() writes, so the
#: mapped tensors are as aligned as freshly allocated ones (SIMD kernels pick
#: the same code paths, and outputs match the original bit for bit).
DATA_ALIGNMENT = 64


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Writes a standard safetensors file whose header is padded with spaces so
    the data starts on a 64-byte boundary. Tensors are ordered by element size
    (largest first), then name, as the reference writer does, which keeps
    every tensor aligned to its element size."""
    from ._format import DTYPES

    names = {v: k for k, v in DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in names:
            raise TypeError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % DATA_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = tensors[k].contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors written once (safetensors refuses
    aliases); the loader re-ties them from the module's structure. Only the
    very same view counts as tied: another view of the same storage (a
    transpose, a slice, another dtype) is written as its own tensor."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
    out = {}
    for name, t in module.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous().cpu()
    return out


@contextlib.contextmanager
def _weights_stripped(module: nn.Module) -> Iterator[dict[str, Any]]:
    """Temporarily sets parameters and persistent buffers to None and yields
    the skeleton payload: the module, and per distinct tensor its names
    (tied ones share an entry), shape, dtype and kind. Nothing of the model
    is copied; non-persistent buffers keep their values (they are not in the
    weights). Loading it rebuilds no placeholder tensors (SKELETON_KEY in
    docs/FORMAT.md).

    Where every module pickles the default way (almost always), the payload
    is version 3: a table of the modules, each with its state less the
    bookkeeping nn.Module creates empty, and for every tensor the table
    index and attribute of each module that holds it, so load() neither
    unpickles a dozen empty hook tables per module nor walks the tree to
    bind. Otherwise version 2, which load() reads as before."""
    found: list[tuple[dict[str, Any], str, torch.Tensor, str, int]] = []
    # Non-persistent buffers pickle with their values; one on a GPU would
    # unpickle only where that GPU exists, so it is saved from a CPU copy.
    moved: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    table: dict[int, int] = {}
    modules: list[nn.Module] = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        index = table.get(id(sub))
        if index is None:
            index = table[id(sub)] = len(modules)
            modules.append(sub)
        dot = f"{prefix}." if prefix else ""
        for name, p in sub._parameters.items():
            if p is not None:
                found.append((sub._parameters, name, p, dot + name, index))
        for name, b in sub._buffers.items():
            if b is None:
                continue
            if name not in sub._non_persistent_buffers_set:
                found.append((sub._buffers, name, b, dot + name, index))
            elif b.device.type not in ("cpu", "meta"):
                moved.append((sub._buffers, name, b))
    state: dict[int, dict[str, Any]] = {}
    for _, leaf, value, full, index in found:
        entry = state.get(id(value))
        if entry is None:
            entry = state[id(value)] = {
                "names": [],
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
                "parameter": isinstance(value, nn.Parameter),
                "owners": [],
            }
        if full not in entry["names"]:
            entry["names"].append(full)
            entry["owners"].append((index, leaf))
    compact = all(standard_pickling(type(m)) for m in modules)
    try:
        for table_, name, _, _, _ in found:
            table_[name] = None
        for table_, name, value in moved:
            table_[name] = value.cpu()
        if compact:
            keys, _ = module_internals()
            fresh = set(keys)
            rows = []
            for m in modules:
                kept = {k: v for k, v in m.__getstate__().items() if not (k in fresh and not v)}
                # Its own copies of the tables the weights were stripped from,
                # so that restoring the weights below leaves the payload as is.
                for k in ("_parameters", "_buffers"):
                    if k in kept:
                        kept[k] = copy.copy(kept[k])
                rows.append((m, kept))
            yield {
                SKELETON_KEY: SKELETON_VERSION,
                "module": module,
                "modules": rows,
                "state": [
                    (tuple(e["names"]), tuple(e["shape"]), e["dtype"], e["parameter"], tuple(e["owners"]))
                    for e in state.values()
                ],
            }
        else:
            for e in state.values():
                del e["owners"]
            yield {SKELETON_KEY: 2, "module": module, "state": list(state.values())}
    finally:
        for table_, name, value, _, _ in found:
            table_[name] = value
        for table_, name, value in moved:
            table_[name] = value


def _is_pretrained(module: nn.Module) -> bool:
    """A transformers model, without importing transformers when it is not loaded."""
    import sys

    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _export_pretrained(module: nn.Module, cname: str, attribute: str, out: Path) -> ExportedComponent:
    directory = out / cname
    module.save_pretrained(directory, safe_serialization=True)
    if default_attribute(cname) != attribute:
        # save_pretrained writes the shards' metadata, so the attribute the
        # name does not give back is recorded beside them.
        (directory / ATTRIBUTE_FILE).write_text(json.dumps({"attribute": attribute}))
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    sums = {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}
    return ExportedComponent(
        name=cname,
        attribute=attribute,
        weights=None,
        weights_sha256=None,
        skeleton=None,
        skeleton_sha256=None,
        module_class=f"{type(module).__module__}.{type(module).__qualname__}",
        parameters=sum(p.numel() for p in module.parameters()),
        bytes=sum(p.stat().st_size for p in files),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in module.state_dict().values()}),
        directory=directory,
        directory_sha256=sums,
    )


def export(
    model_or_pipeline: Any,
    out_dir: str | os.PathLike[str],
    *,
    uri_prefix: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
    mode: str = "actor",
    skeletons: bool = True,
    hf_layout: bool | None = None,
) -> Exported:
    """Writes ``<component>.safetensors`` (+ ``.skeleton.pt``) per component,
    ``pipeline.skeleton.pkl`` for a pipeline object, and ``modelwrapper.yaml``.

    A ``transformers.PreTrainedModel`` component is written as its Hugging
    Face directory instead (``<component>/``, ``save_pretrained`` with
    safetensors: config, shards), which ``transformers`` and vLLM read in
    place and ``load()`` rebuilds without a pickle; ``hf_layout=False``
    pickles it like any module.

    ``uri_prefix`` is where the files will be served from (``https://host/dir/``;
    directories: ``s3://bucket/prefix/``); by default the YAML points at the
    files with ``file://`` URIs.
    """
    if mode not in ("actor", "task"):
        raise ValueError(f"mode must be 'actor' or 'task', not {mode!r}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    standalone, modules = detect_components(model_or_pipeline)
    prefix = uri_prefix if uri_prefix is not None else out.as_uri() + "/"
    if not prefix.endswith("/"):
        prefix += "/"
    exported: list[ExportedComponent] = []
    names: dict[str, str] = {}
    for attribute, module in modules.items():
        cname = component_name(attribute)
        if cname in names:
            raise ValueError(f"attributes {names[cname]!r} and {attribute!r} both map to component {cname!r}")
        names[cname] = attribute
        if (hf_layout is None or hf_layout) and _is_pretrained(module):
            exported.append(_export_pretrained(module, cname, attribute, out))
            continue
        state = _unique_state(module)
        wpath = out / weights_file(cname)
        save_safetensors(state, wpath, {ATTRIBUTE_KEY: attribute, "format": "pt"})
        spath = None
        if skeletons:
            spath = out / skeleton_file(cname)
            with _weights_stripped(module) as payload:
                _save_skeleton(payload, spath)
        exported.append(
            ExportedComponent(
                name=cname,
                attribute=attribute,
                weights=wpath,
                weights_sha256=sha256_file(wpath),
                skeleton=spath,
                skeleton_sha256=sha256_file(spath) if spath else None,
                module_class=f"{type(module).__module__}.{type(module).__qualname__}",
                parameters=sum(p.numel() for p in module.parameters()),
                bytes=wpath.stat().st_size,
                dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
            )
        )
    pipeline_path = None
    if not standalone:
        hollow = copy.copy(model_or_pipeline)
        for attribute in modules:
            setattr(hollow, attribute, None)
        try:
            data = _pickle_by_value_if_needed(hollow)
        except Exception as e:  # noqa: BLE001 - any pickling failure means "no skeleton"
            log.warning("pipeline %s cannot be pickled (%s); load() will return a plain namespace", type(model_or_pipeline).__name__, e)
        else:
            pipeline_path = out / PIPELINE_SKELETON_FILE
            pipeline_path.write_bytes(data)
    wrapper_name = name or component_name(type(model_or_pipeline).__name__)
    components_spec = []
    for c in exported:
        entry: dict[str, Any] = {"name": c.name}
        if c.directory is not None:
            if not prefix.startswith(("file://", "s3://")):
                raise ValueError(
                    f"component {c.name} is a Hugging Face directory, which {prefix!r} cannot serve as one "
                    "source: upload the export to S3 (uri_prefix='s3://bucket/prefix/'), push it to an OCI "
                    "registry or the Hub, or use the default file:// URIs"
                )
            entry["source"] = {"uri": prefix + c.name + "/", "sha256": c.directory_sha256}
        else:
            assert c.weights is not None
            entry["weights"] = {"uri": prefix + c.weights.name, "sha256": c.weights_sha256}
        if c.skeleton:
            entry["skeleton"] = {"uri": prefix + c.skeleton.name, "sha256": c.skeleton_sha256}
        components_spec.append(entry)
    pipeline_spec: dict[str, Any] = {"components": components_spec}
    pipeline_sha = sha256_file(pipeline_path) if pipeline_path else None
    if pipeline_path:
        pipeline_spec["skeleton"] = {"uri": prefix + pipeline_path.name, "sha256": pipeline_sha}
    metadata: dict[str, Any] = {"name": wrapper_name}
    if namespace:
        metadata["namespace"] = namespace
    doc = {
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ModelWrapper",
        "metadata": metadata,
        "spec": {"mode": mode, "pipeline": pipeline_spec},
    }
    if mode == "task":
        doc["spec"]["task"] = {
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "task", "image": "REPLACE-ME"}]}}
        }
    yaml_path = out / "modelwrapper.yaml"
    import yaml  # only here: load() never needs it

    yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return Exported(out, standalone, exported, pipeline_path, pipeline_sha, yaml_path, doc)
