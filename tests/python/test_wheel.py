"""The wheel users install works on its own: outside the repository, in a fresh venv."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import modelwrapper

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


def test_the_version_matches_pyproject() -> None:
    project = tomllib.loads((PYTHON_DIR / "pyproject.toml").read_text())["project"]
    assert modelwrapper.__version__ == project["version"]


CHECK = textwrap.dedent(
    """
    import importlib.metadata, json, pathlib, sys
    import modelwrapper
    pkg = pathlib.Path(modelwrapper.__file__).resolve().parent
    print(json.dumps({
        "file": str(pathlib.Path(modelwrapper.__file__).resolve()),
        "prefix": str(pathlib.Path(sys.prefix).resolve()),
        "typed": (pkg / "py.typed").is_file(),
        "version": modelwrapper.__version__,
        "dist_version": importlib.metadata.version("modelwrapper"),
        "modules": sorted(p.name for p in pkg.glob("*.py")),
    }))
    """
)


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build/ directory and an
    # editable install's leftovers (egg-info) cannot leak into the wheel.
    src = tmp_path / "src"
    shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("modelwrapper-*.whl")
    assert wheel.name.startswith(f"modelwrapper-{modelwrapper.__version__}-")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=600)
    python = venv / "bin" / "python"
    # --ignore-installed: the system may have modelwrapper installed (editable,
    # from this checkout); the venv must get its own copy from the wheel
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    check = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, cwd=outside, env=env, timeout=600)
    assert check.returncode == 0, check.stderr
    info = json.loads(check.stdout)
    assert Path(info["file"]).is_relative_to(venv.resolve()), f"{info['file']} is not the wheel's copy in {venv}"
    assert info["typed"], "py.typed is not shipped: type checkers would ignore the hints"
    assert info["version"] == info["dist_version"] == modelwrapper.__version__
    assert {"__main__.py", "_gc.py", "_root.py", "_load.py", "wrapper.py"} <= set(info["modules"])

    cli = subprocess.run(
        [str(python), "-m", "modelwrapper", "gc", "--help"], capture_output=True, text=True, cwd=outside, env=env, timeout=600
    )
    assert cli.returncode == 0, cli.stderr
    assert "--dry-run" in cli.stdout and "--root" in cli.stdout
