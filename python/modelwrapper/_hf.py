"""Hugging Face components: a directory with ``config.json`` and safetensors
shards, built into the ``transformers`` model class its config names, with
every parameter a view of the node copy (docs/FORMAT.md, "Directory
components")."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._format import VolumeError

log = logging.getLogger("modelwrapper")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init);
    buffers stay real, so non-persistent ones (rotary frequencies, position
    ids), which no checkpoint holds, keep the values the model computes."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' switch that skips weight initialisation (its place moved
    between versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def model_class(config: Any) -> type:
    """The class ``config.architectures`` names, else the AutoModel class of
    the config type; never code from the repository (no trust_remote_code)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise VolumeError(
            f"transformers {transformers.__version__} has no model class for architectures "
            f"{getattr(config, 'architectures', None)} (model_type {getattr(config, 'model_type', None)!r}); "
            "models with their own code are not built from a volume: load the tensors with as_dict=True, "
            "or give the component a factory skeleton"
        ) from None


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
    from ._skeleton import assign_state

    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    cls = model_class(config)
    with _parameters_on_meta(), _no_init():
        model = cls(config)
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for name, tensor in tensors.items():
        target = name
        if name not in expected and prefix:
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in expected:
                target = name[len(prefix) + 1 :]
            elif f"{prefix}.{name}" in expected:
                target = f"{prefix}.{name}"
        if target in expected:
            renamed[target] = tensor
        else:
            ignored.append(name)
    if ignored:
        # As transformers does: a checkpoint may hold what this version keeps
        # as a non-persistent buffer (position_ids) or heads the class lacks.
        log.info("component %s: %d checkpoint tensors unused by %s: %s", component, len(ignored), cls.__name__,
                 ", ".join(ignored[:8]) + (" …" if len(ignored) > 8 else ""))
    model = assign_state(component, model, renamed)
    return model
