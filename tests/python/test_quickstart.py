"""The quickstart ends by saying what stays in shared memory, and how to free it works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, agent_bin


def used(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_the_quickstart_says_what_stays_and_its_commands_free_it(shm: Path, tmp_path: Path) -> None:
    baseline = used(shm)
    root = shm / "root"
    run = subprocess.run(
        [
            sys.executable, str(REPO / "examples/quickstart/quickstart.py"),
            "--agent", str(agent_bin()), "--root", str(root), "--workdir", str(tmp_path / "work"),
            "--workers", "2", "--depth", "1",
        ],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    tail = run.stdout[run.stdout.index("still in shared memory after this script:"):]
    # `current` is the pointer to the newest generation, not one
    volume = next(p for p in root.glob("quickstart/demo/*") if not p.is_symlink())
    assert str(volume) in tail and "python -m modelwrapper gc" in tail, tail
    # as root the agent gives the generation a tmpfs of its own, else a directory on ours
    own_mount = os.path.ismount(volume)
    held = used(volume) if own_mount else used(shm) - baseline
    assert held > 8 << 20, "the generation stays after the run"

    lines = tail.splitlines()
    start = next(i for i, line in enumerate(lines) if "free it by hand" in line) + 1
    commands = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        commands.append(line.split("#")[0].strip())
    assert commands, tail
    freed = subprocess.run(["bash", "-euc", "\n".join(commands)], capture_output=True, text=True, timeout=120)
    assert freed.returncode == 0, freed.stderr
    assert not (root / "quickstart").exists()
    assert str(volume) not in Path("/proc/self/mountinfo").read_text()
    assert used(shm) <= baseline + (256 << 10), tail
