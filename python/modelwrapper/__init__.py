"""Zero-copy model sharing through node shared memory.

``load(path)`` maps a ModelWrapper volume (filled by the zerocopy node agent
or by ``ModelWrapper.from_model``) without copying a byte; ``export()`` writes
a model or pipeline in that format; ``ModelWrapper`` keeps the seed
library's API; ``gc()`` (``python -m modelwrapper gc``) frees what
``from_model()`` left in shared memory once nothing uses it.
"""

from ._export import export
from ._format import VolumeError
from ._gc import GcReport
from ._gc import collect as gc
from ._device import CopyReport
from ._load import LoadedPipeline, last_copy_report, load, load_state_dict
from ._prefault import wait_for_prefault
from ._root import UnsafeRootError
from ._shard import tp_shard
from .wrapper import ModelWrapper, TaskPipeline

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
