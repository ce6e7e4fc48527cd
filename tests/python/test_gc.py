"""What ModelWrapper.from_model() puts in shared memory is freed once nothing uses it."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import modelwrapper
from modelwrapper import ModelWrapper
from conftest import with_pythonpath
from mw_models import Big, Encoder

HERE = Path(__file__).resolve().parent
MODEL_MIB = 8


def used(mount: Path) -> int:
    """Bytes the tmpfs holds: its pages are RAM."""
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "MODELWRAPPER_ROOT": str(root), "PYTHONPATH": with_pythonpath(HERE)}


def run_gc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "modelwrapper", "gc", *args], env=env_for(root), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def root(shm: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELWRAPPER_ROOT", str(shm / "root"))
    return shm / "root"


MAKER = textwrap.dedent(
    """
    import sys
    from modelwrapper import ModelWrapper
    from mw_models import Big
    w = ModelWrapper.from_model(Big(int(sys.argv[1]), seed=int(sys.argv[2])), name=f"big{sys.argv[2]}")
    print(w.path, flush=True)
    sys.stdin.readline()  # hold the wrapper until told to drop it
    del w
    """
)


def start_makers(root: Path, seeds: list[int]) -> tuple[list[subprocess.Popen[str]], list[Path]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MAKER, str(MODEL_MIB), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env_for(root),
        )
        for seed in seeds
    ]
    paths = []
    for p in procs:
        line = p.stdout.readline().strip()
        assert line, f"maker {p.pid} printed nothing (exit {p.wait()})"
        paths.append(Path(line))
    return procs, paths


def finish(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=120) == 0


def test_generations_of_processes_that_ended_are_freed(shm: Path, root: Path) -> None:
    baseline = used(shm)
    model = MODEL_MIB << 20

    # three processes share a model each, drop their wrappers and exit
    procs, paths = start_makers(root, [1, 2, 3])
    assert len(set(paths)) == 3
    assert used(shm) >= baseline + 3 * model
    finish(procs)
    assert all(p.is_dir() for p in paths), "nothing may be freed before a collection runs"

    out = run_gc(root).stdout
    for p in paths:
        assert f"freed {p} " in out, out
        assert not p.exists()
    assert used(shm) <= baseline + (256 << 10), out

    # the next from_model() (any process) collects too
    procs, paths = start_makers(root, [4, 5, 6])
    finish(procs)
    assert used(shm) >= baseline + 3 * model
    small = ModelWrapper.from_model(Encoder(), name="small")
    assert not any(p.exists() for p in paths)
    assert used(shm) <= baseline + (1 << 20)
    assert small.release() is True
    assert used(shm) <= baseline + (256 << 10)


HOLDER = textwrap.dedent(
    """
    import gc, pickle, sys
    w = pickle.loads(bytes.fromhex(sys.argv[1]))
    if sys.argv[2] == "tensors":
        m = w.load()
        del w
        gc.collect()  # only the loaded tensors hold the generation now
        print(float(m.layers[0].weight[0, 0]), flush=True)
    else:
        print("wrapper", flush=True)
    sys.stdin.readline()
    """
)


def hold(wrapper: ModelWrapper, what: str, root: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pickle.dumps(wrapper).hex(), what],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env_for(root),
    )
    assert p.stdout.readline().strip(), f"holder exited with {p.wait()}"
    return p


def test_a_generation_mapped_by_a_live_process_is_kept_until_it_exits(shm: Path, root: Path) -> None:
    baseline = used(shm)
    big = Big(MODEL_MIB, seed=7)
    wrapper = ModelWrapper.from_model(big, name="mapped")
    path = wrapper.path
    holder = hold(wrapper, "tensors", root)
    try:
        del wrapper
        gc.collect()
        out = run_gc(root).stdout
        assert f"kept {path} " in out and f"mapped or open (loaded tensors) in pid {holder.pid}" in out, out
        assert path.is_dir() and used(shm) >= baseline + (MODEL_MIB << 20)
        # a from_model() elsewhere does not free it either
        ModelWrapper.from_model(Encoder(), name="other").release()
        assert path.is_dir()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0
    out = run_gc(root).stdout
    assert f"freed {path} " in out, out
    assert not path.exists()
    assert used(shm) <= baseline + (256 << 10)


def test_a_wrapper_alive_in_another_process_keeps_its_generation_until_that_process_dies(shm: Path, root: Path) -> None:
    baseline = used(shm)
    wrapper = ModelWrapper.from_model(Big(MODEL_MIB, seed=8), name="leased")
    path = wrapper.path
    holder = hold(wrapper, "wrapper", root)
    try:
        del wrapper
        gc.collect()
        out = run_gc(root).stdout
        assert f"kept {path} " in out and f"a ModelWrapper is alive in pid {holder.pid}" in out, out
        # SIGKILL: no finalizer runs and the lease file stays, but it names a
        # process (pid and start time) that is gone
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(timeout=120) == -signal.SIGKILL
        out = run_gc(root).stdout
        assert f"freed {path} " in out, out
        assert used(shm) <= baseline + (256 << 10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_release_frees_at_once_unless_something_else_uses_it(shm: Path, root: Path) -> None:
    baseline = used(shm)
    enc = Encoder()
    first = ModelWrapper.from_model(enc, name="enc")
    second = ModelWrapper.from_model(enc, name="enc")
    assert first.path == second.path
    path = first.path
    assert first.release() is False  # `second` still refers to it
    assert path.is_dir()
    with pytest.raises(RuntimeError, match=r"released .*ModelWrapper\.from_model\(\)"):
        first.load()
    with pytest.raises(RuntimeError, match="released"):
        pickle.dumps(first)
    model = second.load()
    x = torch.randn(2, 64)
    assert torch.equal(model(x), enc(x))
    assert second.release() is False  # this process maps it: `model` is alive
    assert path.is_dir()
    del model
    gc.collect()
    assert modelwrapper.gc(root).freed[0].path == path
    assert not path.exists()
    assert used(shm) <= baseline + (256 << 10)


def test_dry_run_frees_nothing_and_agent_generations_are_never_touched(shm: Path, root: Path) -> None:
    # what the node agent filled into the same root: another namespace
    agent_gen = root / "default" / "bert" / "0123456789abcdef"
    agent_gen.mkdir(parents=True, mode=0o755)
    (agent_gen / "manifest.json").write_text("{}")
    (agent_gen / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    # a from_model() killed while exporting left its staging directory
    token = subprocess.run(
        [sys.executable, "-c", "from modelwrapper._gc import process_token; print(process_token())"],
        capture_output=True, text=True, check=True, env=env_for(root),
    ).stdout.strip()
    wrapper = ModelWrapper.from_model(Encoder(), name="enc")
    path = wrapper.path
    leftover = root / ".staging" / f"local.enc.{token}.0123456789ab"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * (1 << 20))
    del wrapper
    gc.collect()

    out = run_gc(root, "--dry-run").stdout
    assert f"would free {path} " in out and f"would free {leftover} " in out, out
    assert path.is_dir() and leftover.is_dir()

    out = run_gc(root).stdout
    assert f"freed {path} " in out and f"freed {leftover} " in out, out
    assert not path.exists() and not leftover.exists()
    assert (agent_gen / "model.safetensors").stat().st_size == 1 << 20
    assert str(agent_gen) not in out


def test_gc_of_a_missing_root_is_a_no_op(tmp_path: Path) -> None:
    out = run_gc(tmp_path / "nothing-here").stdout
    assert "freed 0 item(s)" in out
    assert not (tmp_path / "nothing-here").exists()
