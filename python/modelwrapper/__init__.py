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
from ._load import LoadedPipeline, load
from ._root import UnsafeRootError
from .wrapper import ModelWrapper, TaskPipeline

__all__ = [
    "GcReport",
    "LoadedPipeline",
    "ModelWrapper",
    "TaskPipeline",
    "UnsafeRootError",
    "VolumeError",
    "export",
    "gc",
    "load",
]
# Keep in step with python/pyproject.toml (tests/python/test_wheel.py checks).
__version__ = "0.1.0"
