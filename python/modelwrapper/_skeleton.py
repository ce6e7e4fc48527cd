"""Rebuilding modules from skeletons without allocating their weights."""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ._format import VolumeError

log = logging.getLogger("modelwrapper")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside land on the meta device; buffers keep real
    values, so a non-persistent buffer gets its value from the constructor."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


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


def assign_state(component: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Binds ``tensors`` into ``module`` without copying, checking names,
    shapes and dtypes, and re-tying shared parameters."""
    expected = module.state_dict(keep_vars=True)
    # Tied parameters appear under several names but are one object.
    groups: dict[int, list[str]] = {}
    for name, value in expected.items():
        groups.setdefault(id(value), []).append(name)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.warning("component %s: weights have keys the module does not: %s (skipped)", component, ", ".join(unexpected))
    problems = []
    for name, value in expected.items():
        if name not in tensors:
            continue
        t = tensors[name]
        if tuple(t.shape) != tuple(value.shape):
            problems.append(f"{name}: weights have shape {list(t.shape)}, module expects {list(value.shape)}")
        elif t.dtype != value.dtype:
            problems.append(f"{name}: weights have dtype {t.dtype}, module expects {value.dtype}")
    missing = [
        names[0]
        for names in groups.values()
        if not any(n in tensors for n in names)
    ]
    if missing:
        problems.append("missing from the weights: " + ", ".join(sorted(missing)))
    if problems:
        raise VolumeError(f"component {component}: weights do not match the module: " + "; ".join(problems))
    provided = {k: v for k, v in tensors.items() if k in expected}
    if _plain_loading(module):
        _assign_directly(module, groups, provided)
    else:
        for names in groups.values():
            source = next(n for n in names if n in provided)
            for alias in names:
                provided.setdefault(alias, provided[source])
        module.load_state_dict(provided, strict=False, assign=True)
        _retie(module, groups, provided)
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.device.type == "meta"]
    if left:
        raise VolumeError(f"component {component}: still on the meta device after loading: {', '.join(left)}")
    return module


def _plain_loading(module: nn.Module) -> bool:
    """True when no module customises state-dict loading, so tensors can be
    bound directly: ``load_state_dict`` filters the whole dict once per
    submodule, which is quadratic and dominates load() on deep models."""
    for m in module.modules():
        hook = type(m)._load_from_state_dict
        if hook is not nn.Module._load_from_state_dict and hook is not _NORM_LOAD:
            return False
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return False
    return True


# BatchNorm's override only fills in num_batches_tracked for old checkpoints;
# export() always writes it, so binding directly is equivalent.
_NORM_LOAD = nn.modules.batchnorm._NormBase._load_from_state_dict


def _assign_directly(module: nn.Module, groups: dict[int, list[str]], provided: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(assign=True)`` in one pass, tied names sharing one Parameter."""
    owners = dict(module.named_modules(remove_duplicate=False))
    for names in groups.values():
        source = next(n for n in names if n in provided)
        tensor = provided[source]
        value: torch.Tensor | None = None
        for name in names:
            path, _, leaf = name.rpartition(".")
            owner = owners[path] if path else module
            if leaf in owner._parameters:
                if not isinstance(value, nn.Parameter):
                    value = nn.Parameter(tensor, requires_grad=False)
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = tensor


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
