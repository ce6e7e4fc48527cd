"""Runs ray-zerocopy 0.2.0's own API tests (tests/test_model_wrapper_unified.py
from its sdist, Apache-2.0, unmodified) against modelwrapper through an import
alias: `import ray_zerocopy` resolves to `tests/seed/alias/ray_zerocopy`, which
re-exports modelwrapper. PYTHONPATH carries the alias and this directory into
the Ray workers the tests start, so task-mode calls unpickle there too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ALIAS = HERE / "alias"

sys.path.insert(0, str(ALIAS))
# A fresh local Ray instance for these tests, never one a `ray start` on this
# machine left registered in /tmp/ray/ray_current_cluster.
os.environ["RAY_ADDRESS"] = "local"
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ALIAS), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
)


@pytest.fixture(autouse=True, scope="session")
def private_root(tmp_path_factory: pytest.TempPathFactory):
    """Exports go to a private root, so the suite never touches /dev/shm/zerocopy."""
    os.environ["MODELWRAPPER_ROOT"] = str(tmp_path_factory.mktemp("seed-root"))
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
