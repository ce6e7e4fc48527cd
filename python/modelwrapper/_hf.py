"""Hugging Face components: a directory with ``config.json`` and safetensors
shards, built into the ``transformers`` model class its config names, with
every parameter a view of the node copy (docs/FORMAT.md, "Directory
components")."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._format import VolumeError

log = logging.getLogger("modelwrapper")


def _own_code(component: str, config_path: Path) -> VolumeError:
    return VolumeError(
        f"component {component}: {config_path} asks for code of its own (auto_map / trust_remote_code); "
        "a volume never runs code from the repository: load the tensors with as_dict=True, "
        "or give the component a factory skeleton"
    )


def model_class(component: str, config: Any) -> type:
    """The ``PreTrainedModel`` class ``config.architectures`` names (else the
    AutoModel class of the config type) that takes this config; never code
    from the repository."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            continue
        takes = getattr(cls, "config_class", None)
        if isinstance(takes, type) and isinstance(config, takes):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise VolumeError(
            f"component {component}: transformers {transformers.__version__} has no model class for architectures "
            f"{getattr(config, 'architectures', None)} (model_type {getattr(config, 'model_type', None)!r}); "
            "load the tensors with as_dict=True, or give the component a factory skeleton"
        ) from None


def _bind_names(component: str, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names to the model's: exact names first, then with or
    without the model's ``base_model_prefix``; two names for one target are
    refused. Names the model has no place for are reported, not bound."""
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed: dict[str, torch.Tensor] = {name: t for name, t in tensors.items() if name in expected}
    source: dict[str, str] = {name: name for name in renamed}
    unused: list[str] = []
    for name, tensor in tensors.items():
        if name in expected:
            continue
        target = None
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in expected:
            target = name[len(prefix) + 1 :]
        elif prefix and f"{prefix}.{name}" in expected:
            target = f"{prefix}.{name}"
        if target is None:
            unused.append(name)
            continue
        if target in renamed:
            raise VolumeError(
                f"component {component}: checkpoint tensors {source[target]!r} and {name!r} both name "
                f"{type(model).__name__}'s {target!r}; the checkpoint is ambiguous"
            )
        renamed[target] = tensor
        source[target] = name
    if unused:
        # As transformers does: a checkpoint may hold what this version keeps
        # as a non-persistent buffer (position_ids), or heads the class lacks.
        log.warning(
            "component %s: %d checkpoint tensors have no place in %s and are not loaded: %s",
            component,
            len(unused),
            type(model).__name__,
            ", ".join(unused[:8]) + (" …" if len(unused) > 8 else ""),
        )
    return renamed


def _match_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Gives each meta parameter its checkpoint tensor's dtype (a bf16 model
    is built in the default dtype, fp32), keeping tied parameters one."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, leaf))
    replaced: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        t = tensors.get(name)
        if t is None or p.device.type != "meta" or p.dtype == t.dtype or id(p) in replaced:
            continue
        new = type(p)(torch.empty(p.shape, dtype=t.dtype, device="meta"), requires_grad=False)
        replaced.add(id(p))
        for module, leaf in holders[id(p)]:
            module._parameters[leaf] = new


def build_pretrained(component: str, directory: Path, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The ``PreTrainedModel`` of ``directory``'s config with ``tensors``
    (views of the node copy) bound as its parameters and buffers, tied
    weights tied, in eval mode without gradients."""
    try:
        import transformers
    except ImportError:
        raise VolumeError(
            f"component {component} is a Hugging Face model directory ({directory}/config.json); "
            "install transformers to build it, or load its tensors with as_dict=True"
        ) from None
    from ._skeleton import assign_state, parameters_on_meta

    config_path = directory / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise VolumeError(f"component {component}: {config_path} is not a JSON config: {e}") from None
    if not isinstance(raw, dict) or raw.get("auto_map") or raw.get("trust_remote_code"):
        raise _own_code(component, config_path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except ValueError as e:
        raise VolumeError(f"component {component}: {config_path}: {e}") from None
    cls = model_class(component, config)
    # Parameters on the meta device cost nothing to create or initialise;
    # initialising also ties the tied weights (transformers >= 5).
    with parameters_on_meta():
        model = cls(config)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    renamed = _bind_names(component, model, tensors)
    _match_dtypes(model, renamed)
    return assign_state(component, model, renamed)
