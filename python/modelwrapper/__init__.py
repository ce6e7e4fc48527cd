"""Zero-copy model sharing through node shared memory.

``load(path)`` maps a ModelWrapper volume (filled by the zerocopy node agent
or by ``ModelWrapper.from_model``) without copying a byte; ``export()`` writes
a model or pipeline in that format; ``ModelWrapper`` keeps the seed
library's API; ``gc()`` (``python -m modelwrapper gc``) frees what
``from_model()`` left in shared memory once nothing uses it.
"""

from typing import TYPE_CHECKING, Any

from ._format import VolumeError
from ._load import LoadedPipeline, last_copy_report, load, load_state_dict

# Everything else loads on first use: a Ray worker that only calls load()
# (or unpickles a ModelWrapper) does not pay for export, gc, cluster mode
# or the GPU path at import.
_LAZY = {
    "CopyReport": "._device",
    "GcReport": "._gc",
    "gc": ("._gc", "collect"),
    "ModelWrapper": ".wrapper",
    "TaskPipeline": ".wrapper",
    "UnsafeRootError": "._root",
    "export": "._export",
    "tp_shard": "._shard",
    "wait_for_prefault": "._prefault",
}

if TYPE_CHECKING:
    from ._device import CopyReport
    from ._export import export
    from ._gc import GcReport
    from ._gc import collect as gc
    from ._prefault import wait_for_prefault
    from ._root import UnsafeRootError
    from ._shard import tp_shard
    from .wrapper import ModelWrapper, TaskPipeline


def __getattr__(name: str) -> Any:
    import importlib

    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'modelwrapper' has no attribute {name!r}")
    module, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CopyReport",
    "GcReport",
    "LoadedPipeline",
    "ModelWrapper",
    "TaskPipeline",
    "UnsafeRootError",
    "VolumeError",
    "export",
    "gc",
    "last_copy_report",
    "load",
    "load_state_dict",
    "tp_shard",
    "wait_for_prefault",
]
# Keep in step with python/pyproject.toml (tests/python/test_wheel.py checks).
__version__ = "0.1.0"
