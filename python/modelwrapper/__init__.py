"""Zero-copy model sharing through node shared memory.

``load(path)`` maps a ModelWrapper volume (filled by the zerocopy node agent
or by ``ModelWrapper.from_model``) without copying a byte; ``export()`` writes
a model or pipeline in that format; ``ModelWrapper`` keeps the seed
library's API.
"""

from ._export import export
from ._format import VolumeError
from ._load import LoadedPipeline, load
from .wrapper import ModelWrapper, TaskPipeline

__all__ = ["ModelWrapper", "TaskPipeline", "LoadedPipeline", "VolumeError", "export", "load"]
__version__ = "0.1.0"
