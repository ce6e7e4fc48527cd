"""Rebuilding modules from skeletons without allocating their weights."""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import logging
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ._format import SKELETON_KEY, SKELETON_VERSIONS, VolumeError

log = logging.getLogger("modelwrapper")


# Parameters are put on the meta device by one process-wide replacement of
# nn.Module.register_parameter, installed once and active only in threads
# inside parameters_on_meta(): patching and restoring it per call would race
# between threads (one thread's "original" being another's patch, left in
# place for good) and reach modules other threads build meanwhile.
_meta_build = threading.local()
_install_lock = threading.Lock()
_original_register = nn.Module.register_parameter


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _original_register(module, name, param)
    seen = getattr(_meta_build, "seen", None)
    if seen is None or param is None or param.device.type == "meta":
        return
    # One meta parameter per original, so a parameter registered twice
    # (self.a = p; self.b = p) stays one parameter.
    entry = seen.get(id(param))
    if entry is None:
        entry = seen[id(param)] = (param, type(param)(param.to("meta"), requires_grad=param.requires_grad))
    module._parameters[name] = entry[1]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside (in this thread) land on the meta device;
    buffers keep real values, so a non-persistent buffer gets its value from
    the constructor. Other threads are not affected."""
    with _install_lock:
        if nn.Module.register_parameter is not _register_on_meta:
            nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign]
    outer = getattr(_meta_build, "seen", None)
    if outer is None:
        _meta_build.seen = {}
    try:
        yield
    finally:
        if outer is None:
            _meta_build.seen = None


def resolve_factory(ref: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise VolumeError(f"factory {ref!r} is not 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise VolumeError(f"factory {ref!r}: cannot import {module_name!r} ({e}); install the package that defines the model") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise VolumeError(f"factory {ref!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise VolumeError(f"factory {ref!r} is not callable")
    return obj


def build_from_factory(ref: str, kwargs: dict[str, Any] | None) -> nn.Module:
    factory = resolve_factory(ref)
    with parameters_on_meta():
        module = factory(**(kwargs or {}))
    if not isinstance(module, nn.Module):
        raise VolumeError(f"factory {ref!r} returned {type(module).__name__}, not an nn.Module")
    return module


_ZIP_MAGIC = b"PK\x03\x04"


# One tensor of a version 3 skeleton: its state-dict names (tied ones share
# an entry), shape, dtype name, whether it is a parameter, and where it is
# bound: (index in the module table, attribute) per name.
CompactEntry = tuple[tuple[str, ...], tuple[int, ...], str, bool, tuple[tuple[int, str], ...]]


@dataclass
class Skeleton:
    """A skeleton file's module and what it says about the weights: nothing
    (a torch.save archive), a version 2 description (``state``), or a
    version 3 module table (``modules``, ``entries``)."""

    module: nn.Module
    state: list[dict[str, Any]] | None = None
    modules: list[nn.Module] | None = None
    entries: list[CompactEntry] | None = None


_MODULE_SETSTATE = nn.Module.__setstate__


def standard_pickling(cls: type) -> bool:
    """Whether instances of ``cls`` pickle as nn.Module's default does (an
    empty ``__new__``, then ``__setstate__`` of nn.Module's ``__getstate__``,
    the class's own ``__setstate__`` included), so that a version 3 skeleton
    may store their state and rebuild them in one loop instead (export()
    checks this; load() trusts the file's author for everything in it
    anyway)."""
    return (
        cls.__new__ is object.__new__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
        and cls not in copyreg.dispatch_table
        and not any("__slots__" in vars(k) for k in cls.__mro__)
    )


_internals: tuple[tuple[str, ...], tuple[type, ...]] | None = None


def module_internals() -> tuple[tuple[str, ...], tuple[type, ...]]:
    """nn.Module's own bookkeeping (hook tables, parameter and buffer
    tables, ...) as this torch creates it, empty: names and the types that
    make each afresh. A version 3 skeleton leaves out what is empty; load()
    creates this torch's set for every module, as ``__setstate__`` does for
    attributes an older torch did not have."""
    global _internals
    if _internals is None:
        empty = [(k, type(v)) for k, v in nn.Module().__dict__.items() if k != "training" and not v]
        _internals = (tuple(k for k, _ in empty), tuple(t for _, t in empty))
    return _internals


def read_skeleton(path: Path) -> Skeleton:
    """The module of a skeleton file, and its weights' description when the
    file is export()'s payload (weights stripped, see SKELETON_KEY) rather
    than a torch.save archive of a meta-device module."""
    with open(path, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic == _ZIP_MAGIC:
            obj: Any = torch.load(f, map_location="cpu", weights_only=False)
        else:
            obj = pickle.load(f)
            if isinstance(obj, int):  # torch.save's legacy format starts with a magic number
                f.seek(0)
                obj = torch.load(f, map_location="cpu", weights_only=False)
    if not (isinstance(obj, dict) and SKELETON_KEY in obj):
        if not isinstance(obj, nn.Module):
            raise VolumeError(f"{path}: skeleton is a {type(obj).__name__}, not an nn.Module")
        return Skeleton(obj)
    version = obj[SKELETON_KEY]
    if version not in SKELETON_VERSIONS:
        raise VolumeError(
            f"{path}: skeleton version {version!r}; this modelwrapper reads "
            f"{', '.join(map(str, SKELETON_VERSIONS))}: upgrade it"
        )
    module = obj.get("module")
    if not isinstance(module, nn.Module):
        raise VolumeError(f"{path}: skeleton is a {type(module).__name__}, not an nn.Module")
    if version == 2:
        return Skeleton(module, state=obj.get("state"))
    try:
        table = obj["modules"]
        keys, types = module_internals()
        # Every module's empty tables, made in one loop in C; each module
        # takes the next len(keys) of them (zip stops at the keys first).
        made = iter(list(map(type.__call__, types * len(table))))
        modules = [m for m, _ in table]
        # Children before parents, as pickle builds them.
        for m, stored in reversed(table):
            setstate = type(m).__setstate__
            if setstate is _MODULE_SETSTATE:
                d = m.__dict__
                d.update(zip(keys, made))
                d.update(stored)
            else:  # its own __setstate__ (Conv's fills in old checkpoints' fields): the state pickle would give it
                state = dict(zip(keys, made))
                state.update(stored)
                setstate(m, state)
        entries = obj["state"]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise VolumeError(f"{path}: skeleton's module table is malformed ({e})") from None
    if not modules or modules[0] is not module:
        raise VolumeError(f"{path}: skeleton's module table does not start at its module")
    return Skeleton(module, modules=modules, entries=entries)


def assign_skeleton(component: str, skeleton: Skeleton, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Binds ``tensors`` into the module of ``skeleton`` (whichever kind),
    as :func:`assign_state` does."""
    if skeleton.entries is not None:
        return assign_compact(component, skeleton, tensors)
    if skeleton.state is not None:
        return assign_stripped(component, skeleton.module, skeleton.state, tensors)
    return assign_state(component, skeleton.module, tensors)


_dtypes: dict[str, torch.dtype] = {}


def _dtype(name: str) -> torch.dtype:
    dtype = _dtypes.get(name)
    if dtype is None:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise VolumeError(f"skeleton names dtype {name!r}, which this torch does not have")
        _dtypes[name] = dtype
    return dtype


def assign_compact(component: str, skeleton: Skeleton, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """:func:`assign_stripped` for a version 3 skeleton: its module table
    says which module owns each tensor, so binding walks nothing."""
    module, modules, entries = skeleton.module, skeleton.modules, skeleton.entries
    assert modules is not None and entries is not None
    if not _plain_modules(modules):
        # Custom loading (or a hook): the general path, from placeholders.
        try:
            state = [
                {"names": list(names), "shape": list(shape), "dtype": dtype, "parameter": parameter}
                for names, shape, dtype, parameter, _ in entries
            ]
        except (TypeError, ValueError) as e:
            raise VolumeError(f"component {component}: skeleton's weight description is malformed ({e})") from None
        return assign_stripped(component, module, state, tensors)
    _check_compact(component, entries, tensors)
    # Only non-persistent buffers have values yet: they are not in the weights.
    if any(value is not None and value.device.type == "meta" for m in modules for value in m._buffers.values()):
        left = [n for n, b in module.named_buffers(remove_duplicate=False) if b is not None and b.device.type == "meta"]
        raise VolumeError(f"component {component}: still on the meta device after loading: {', '.join(left)}")
    count = len(modules)
    make = torch.Tensor._make_subclass
    for names, _, _, parameter, owners in entries:
        source = None
        for n in names:
            source = tensors.get(n)
            if source is not None:
                break
        if parameter:
            bound = make(nn.Parameter, source, False) if type(source) is torch.Tensor else nn.Parameter(source, requires_grad=False)
        else:
            bound = source
        for index, leaf in owners:
            if not 0 <= index < count:
                raise VolumeError(f"component {component}: skeleton binds {names[0]!r} to a module it does not have")
            owner = modules[index]
            (owner._parameters if parameter else owner._buffers)[leaf] = bound
    _eval_modules(module, modules)
    return module


def _plain_modules(modules: list[nn.Module]) -> bool:
    """No module customises how its state is saved or loaded."""
    for cls in {type(m) for m in modules}:
        standard = _standard_classes.get(cls)
        if standard is None:
            standard = _standard_classes[cls] = all(getattr(cls, a) in ok for a, ok in _STANDARD.items())
        if not standard:
            return False
    return not any(
        m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks or m._state_dict_pre_hooks
        for m in modules
    )


def _check_compact(component: str, entries: list[CompactEntry], tensors: dict[str, torch.Tensor]) -> None:
    """:func:`_check` over a version 3 description."""
    problems = []
    missing = []
    known = 0
    for names, shape, dtype, _, _ in entries:
        found = False
        for name in names:
            t = tensors.get(name)
            if t is None:
                continue
            found = True
            known += 1
            if t.shape != shape:
                problems.append(f"{name}: weights have shape {list(t.shape)}, module expects {list(shape)}")
            elif t.dtype != (_dtypes.get(dtype) or _dtype(dtype)):
                problems.append(f"{name}: weights have dtype {t.dtype}, module expects {_dtype(dtype)}")
        if not found:
            missing.append(names[0])
    if known != len(tensors):
        expected = {n for e in entries for n in e[0]}
        unexpected = [k for k in tensors if k not in expected]
        log.warning("component %s: weights have keys the module does not: %s (skipped)", component, ", ".join(sorted(unexpected)))
    if missing:
        problems.append("missing from the weights: " + ", ".join(sorted(missing)))
    if problems:
        raise VolumeError(f"component {component}: weights do not match the module: " + "; ".join(problems))


class _Expected:
    """What the module expects of one tensor, from a stripped skeleton."""

    __slots__ = ("shape", "dtype", "parameter")

    def __init__(self, entry: dict[str, Any]):
        self.shape = tuple(entry["shape"])
        self.dtype = getattr(torch, entry["dtype"])
        self.parameter = entry["parameter"]


def assign_stripped(
    component: str, module: nn.Module, state: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
) -> nn.Module:
    """:func:`assign_state` for a skeleton whose weights were stripped: the
    description stands in for the placeholders, so none is built."""
    try:
        expected = {name: _Expected(e) for e in state for name in e["names"]}
    except (KeyError, TypeError, AttributeError) as e:
        raise VolumeError(f"component {component}: skeleton's weight description is malformed ({e})") from None
    groups = {i: list(e["names"]) for i, e in enumerate(state)}
    walked = _plain_entries(module)
    if walked is None:
        # Custom loading: give it the placeholders it expects, then the general path.
        for names in groups.values():
            spec = expected[names[0]]
            placeholder = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            if spec.parameter:
                placeholder = nn.Parameter(placeholder, requires_grad=False)
            for name in names:
                owner, leaf = _owner(module, name)
                (owner._parameters if spec.parameter else owner._buffers)[leaf] = placeholder
        return assign_state(component, module, tensors)
    _check(component, expected, groups, tensors)
    _, modules, unsaved = walked
    left = [name for name, value in unsaved if value.device.type == "meta"]
    if left:
        raise VolumeError(f"component {component}: still on the meta device after loading: {', '.join(left)}")
    owners = dict(modules)
    for names in groups.values():
        source = next(tensors[n] for n in names if n in tensors)
        parameter = expected[names[0]].parameter
        bound = nn.Parameter(source, requires_grad=False) if parameter else source
        for name in names:
            path, _, leaf = name.rpartition(".")
            owner = owners.get(path)
            if owner is None:
                raise VolumeError(f"component {component}: skeleton describes {name!r} but has no module {path!r}")
            (owner._parameters if parameter else owner._buffers)[leaf] = bound
    _eval(modules)
    return module


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    try:
        return (module.get_submodule(path) if path else module), leaf
    except AttributeError:
        raise VolumeError(f"skeleton describes {name!r} but the module has no {path!r}") from None


def _eval(modules: list[tuple[str, nn.Module]]) -> None:
    _eval_modules(modules[0][1], [m for _, m in modules])


def _eval_modules(root: nn.Module, modules: list[nn.Module]) -> None:
    """``root.eval()``, without its recursive walk where nothing overrides
    ``train``/``eval`` (a parent's ``train`` may keep a child in training
    mode on purpose, e.g. MC dropout: then the real call runs)."""
    if type(root).eval is not _EVAL or any(cls.train is not _TRAIN for cls in {type(m) for m in modules}):
        root.eval()
        return
    for m in modules:
        m.__dict__["training"] = False  # what train(False) sets, without nn.Module's lookups


def assign_state(component: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Binds ``tensors`` into ``module`` without copying, checking names,
    shapes and dtypes, re-tying shared parameters, and leaves it ready for
    inference (eval mode, no gradients).

    Modules that load their state the standard way (almost all) are bound
    in one walk over the module tree: ``load_state_dict`` would filter the
    whole dict once per submodule, and ``state_dict``/``eval``/
    ``requires_grad_`` walk it again each, which together cost more than
    mapping the weights. Others go through ``load_state_dict(assign=True)``.
    """
    walked = _plain_entries(module)
    if walked is None:
        expected = module.state_dict(keep_vars=True)
    else:
        entries, modules, unsaved = walked
        expected = {e[0]: e[3] for e in entries}
    # Tied parameters appear under several names but are one object.
    groups: dict[int, list[str]] = {}
    for name, value in expected.items():
        groups.setdefault(id(value), []).append(name)
    _check(component, expected, groups, tensors)
    provided = {k: v for k, v in tensors.items() if k in expected}
    if walked is not None:
        left = [name for name, value in unsaved if value.device.type == "meta"]
        if left:
            raise VolumeError(f"component {component}: still on the meta device after loading: {', '.join(left)}")
        _bind(entries, groups, provided, modules)
        return module
    for names in groups.values():
        source = next(n for n in names if n in provided)
        for alias in names:
            provided.setdefault(alias, provided[source])
    module.load_state_dict(provided, strict=False, assign=True)
    _retie(module, groups, provided)
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.device.type == "meta"]
    if left:
        raise VolumeError(f"component {component}: still on the meta device after loading: {', '.join(left)}")
    module.eval()
    module.requires_grad_(False)
    return module


def _check(component: str, expected: dict[str, Any], groups: dict[int, list[str]], tensors: dict[str, torch.Tensor]) -> None:
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        log.warning("component %s: weights have keys the module does not: %s (skipped)", component, ", ".join(sorted(unexpected)))
    problems = []
    for name, value in expected.items():
        t = tensors.get(name)
        if t is None:
            continue
        if t.shape != value.shape:
            problems.append(f"{name}: weights have shape {list(t.shape)}, module expects {list(value.shape)}")
        elif t.dtype != value.dtype:
            problems.append(f"{name}: weights have dtype {t.dtype}, module expects {value.dtype}")
    missing = [names[0] for names in groups.values() if not any(n in tensors for n in names)]
    if missing:
        problems.append("missing from the weights: " + ", ".join(sorted(missing)))
    if problems:
        raise VolumeError(f"component {component}: weights do not match the module: " + "; ".join(problems))


# (state-dict name, owning module, attribute, current value, is a parameter)
_Entry = tuple[str, nn.Module, str, torch.Tensor, bool]

# BatchNorm's override only fills in num_batches_tracked for old checkpoints;
# export() always writes it, so binding directly is equivalent.
_NORM_LOAD = nn.modules.batchnorm._NormBase._load_from_state_dict
_STANDARD = {
    "_load_from_state_dict": (nn.Module._load_from_state_dict, _NORM_LOAD),
    "_save_to_state_dict": (nn.Module._save_to_state_dict,),
    "get_extra_state": (nn.Module.get_extra_state,),
    # A module that renames its keys (a wrapper stripping a prefix) is
    # bound by those names, through its own methods.
    "state_dict": (nn.Module.state_dict,),
    "load_state_dict": (nn.Module.load_state_dict,),
}


_standard_classes: dict[type, bool] = {}


def _walk(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules(remove_duplicate=False)`` (the modules state_dict
    visits), iteratively: a third of the cost on deep models."""
    out: list[tuple[str, nn.Module]] = []
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        out.append((prefix, m))
        children = [(f"{prefix}.{name}" if prefix else name, child) for name, child in m._modules.items() if child is not None]
        stack.extend(reversed(children))
    return out


def _plain_entries(
    module: nn.Module,
) -> tuple[list[_Entry], list[tuple[str, nn.Module]], list[tuple[str, torch.Tensor]]] | None:
    """What ``state_dict(keep_vars=True)`` holds, every module, and the
    non-persistent buffers, found in one walk; None when a module
    customises saving or loading its state (its own
    ``_load_from_state_dict``, hooks, extra state)."""
    entries: list[_Entry] = []
    modules: list[tuple[str, nn.Module]] = []
    unsaved: list[tuple[str, torch.Tensor]] = []
    for prefix, m in _walk(module):
        modules.append((prefix, m))
        cls = type(m)
        standard = _standard_classes.get(cls)
        if standard is None:
            standard = _standard_classes[cls] = all(getattr(cls, a) in ok for a, ok in _STANDARD.items())
        if not standard:
            return None
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks or m._state_dict_pre_hooks:
            return None
        dot = f"{prefix}." if prefix else ""
        for leaf, value in m._parameters.items():
            if value is not None:
                entries.append((dot + leaf, m, leaf, value, True))
        skip = m._non_persistent_buffers_set
        for leaf, value in m._buffers.items():
            if value is None:
                continue
            if leaf in skip:
                unsaved.append((dot + leaf, value))
            else:
                entries.append((dot + leaf, m, leaf, value, False))
    return entries, modules, unsaved


_TRAIN = nn.Module.train
_EVAL = nn.Module.eval


def _bind(
    entries: list[_Entry],
    groups: dict[int, list[str]],
    provided: dict[str, torch.Tensor],
    modules: list[tuple[str, nn.Module]],
) -> None:
    """``load_state_dict(assign=True)`` + ``eval()`` + ``requires_grad_(False)``
    in one pass: tied names share one new Parameter."""
    made: dict[int, torch.Tensor] = {}
    for name, owner, leaf, value, is_param in entries:
        key = id(value)
        bound = made.get(key)
        if bound is None:
            source = provided.get(name)
            if source is None:  # a tied alias: bind from the name the weights hold
                source = next(provided[n] for n in groups[key] if n in provided)
            bound = made[key] = nn.Parameter(source, requires_grad=False) if is_param else source
        if is_param:
            owner._parameters[leaf] = bound
        else:
            owner._buffers[leaf] = bound
    _eval(modules)


def _retie(module: nn.Module, groups: dict[int, list[str]], provided: dict[str, torch.Tensor]) -> None:
    """assign=True replaces Parameter objects one name at a time; make every
    name of a tied group point at one Parameter again."""
    for names in groups.values():
        if len(names) < 2:
            continue
        owner_path, _, leaf = names[0].rpartition(".")
        first = module.get_submodule(owner_path) if owner_path else module
        shared = getattr(first, leaf)
        for alias in names[1:]:
            path, _, attr = alias.rpartition(".")
            sub = module.get_submodule(path) if path else module
            if isinstance(shared, nn.Parameter) and attr in sub._parameters:
                sub._parameters[attr] = shared
            elif attr in sub._buffers:
                sub._buffers[attr] = shared
