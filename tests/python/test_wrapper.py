"""The seed-shaped ModelWrapper API."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import modelwrapper
from conftest import filled_volume, with_pythonpath
from modelwrapper import ModelWrapper
from mw_models import Encoder, Pipeline


@pytest.fixture
def local_root(shm: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELWRAPPER_ROOT", str(shm / "local"))
    return shm / "local"


def test_from_model_detects_components_like_the_seed(local_root: Path) -> None:
    pipe = Pipeline()
    wrapper = ModelWrapper.from_model(pipe)
    assert wrapper._mode == "actor"
    assert wrapper._is_standalone_module is False
    assert list(wrapper._model_info) == ["text_encoder", "decoder"]
    assert wrapper._model_info["decoder"]["parameters"] == sum(p.numel() for p in pipe.decoder.parameters())
    assert wrapper.path.is_relative_to(local_root / "local")
    assert (wrapper.path / "manifest.json").exists()
    single = ModelWrapper.from_model(Encoder())
    assert single._is_standalone_module is True and list(single._model_info) == ["model"]


def test_a_wrapper_pickles_to_a_path_not_weights(local_root: Path) -> None:
    torch.manual_seed(0)
    pipe = Pipeline()
    wrapper = ModelWrapper.from_model(pipe)
    data = pickle.dumps(wrapper)
    assert len(data) < 2048, len(data)
    x = torch.randn(2, 64)
    script = textwrap.dedent(
        """
        import pickle, sys, torch
        w = pickle.loads(sys.stdin.buffer.read())
        p = w.load()
        torch.manual_seed(0)
        torch.save(p(torch.load(sys.argv[1])), sys.argv[2])
        """
    )
    torch.save(x, local_root.parent / "x.pt")
    env = {**os.environ, "PYTHONPATH": with_pythonpath(Path(__file__).parent)}
    subprocess.run([sys.executable, "-c", script, str(local_root.parent / "x.pt"), str(local_root.parent / "y.pt")], input=data, env=env, check=True)
    assert torch.equal(torch.load(local_root.parent / "y.pt"), pipe(x))
    again = ModelWrapper.deserialize(wrapper.serialize())
    assert again.path == wrapper.path and again._model_info == wrapper._model_info


def test_from_model_twice_reuses_the_generation(local_root: Path) -> None:
    enc = Encoder()
    a = ModelWrapper.from_model(enc, name="enc")
    b = ModelWrapper.from_model(enc, name="enc")
    assert a.path == b.path
    assert not list((local_root / ".staging").iterdir())


def test_a_wrapper_is_not_callable_and_modes_are_checked(local_root: Path) -> None:
    wrapper = ModelWrapper.from_model(Encoder())
    with pytest.raises(TypeError, match="call wrapper.load"):
        wrapper(torch.zeros(1, 64))
    with pytest.raises(ValueError, match="mode must be"):
        ModelWrapper.from_model(Encoder(), mode="batch")


def test_from_volume_reads_an_agent_filled_volume(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    pipe = Pipeline()
    exported = modelwrapper.export(pipe, shm / "export", name="pipe")
    volume = filled_volume(exported.yaml_path, shm / "root")
    monkeypatch.setenv("MODELWRAPPER_PATH", str(volume))
    wrapper = ModelWrapper.from_volume()
    assert wrapper._is_standalone_module is False
    assert set(wrapper._model_info) == {"text_encoder", "decoder"}
    x = torch.randn(1, 64)
    assert torch.equal(wrapper.load(_use_fast_load=True)(x), pipe(x))


def test_for_tasks_runs_in_process_without_ray(local_root: Path) -> None:
    torch.manual_seed(4)
    pipe = Pipeline()
    wrapped = ModelWrapper.for_tasks(pipe)
    x = torch.randn(2, 64)
    assert torch.equal(wrapped(x), pipe(x))
    assert torch.equal(wrapped.text_encoder(x), pipe.text_encoder(x))


def test_for_tasks_runs_each_call_as_a_ray_task(local_root: Path) -> None:
    ray = pytest.importorskip("ray", reason="ray is in requirements-dev.txt; CI installs it")
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": with_pythonpath(Path(__file__).parent)}})
    try:
        torch.manual_seed(5)
        pipe = Pipeline()
        wrapped = ModelWrapper.for_tasks(pipe)
        x = torch.randn(2, 64)
        assert torch.equal(wrapped(x), pipe(x))

        @ray.remote
        def where() -> int:
            return os.getpid()

        assert ray.get(where.remote()) != os.getpid()  # tasks run in worker processes
    finally:
        ray.shutdown()


def test_method_names_limit_what_a_task_pipeline_exposes(local_root: Path) -> None:
    enc = Encoder()
    wrapper = ModelWrapper.from_model(enc, mode="task", method_names=("forward",))
    tasks = pickle.loads(pickle.dumps(wrapper)).load()
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(tasks.forward(x), enc.eval()(x))
    with pytest.raises(AttributeError, match="method_names"):
        tasks.predict  # noqa: B018 - attribute access is the behaviour under test
    with pytest.raises(TypeError, match="method_names must be a tuple"):
        ModelWrapper.from_model(enc, mode="task", method_names="forward")


def test_deserialize_takes_the_dict_or_its_keys(local_root: Path) -> None:
    wrapper = ModelWrapper.from_model(Encoder())
    data = wrapper.serialize()
    assert ModelWrapper.deserialize(**data).path == wrapper.path
    assert ModelWrapper.deserialize(data).path == wrapper.path
    with pytest.raises(TypeError, match="missing .*path"):
        ModelWrapper.deserialize(mode="actor")


def test_a_pipeline_defined_in_the_driver_script_loads_in_another_process(local_root: Path, tmp_path: Path) -> None:
    """A Ray driver defines its pipeline class in __main__ (a script, or
    `python -c` in a RayJob entrypoint); actors are other processes."""
    driver = textwrap.dedent(
        """
        import pickle, sys, torch
        from torch import nn
        from modelwrapper import ModelWrapper

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(8, 8)
            def forward(self, x):
                return self.lin(x) * 2

        class Pipe:
            def __init__(self):
                self.block = Block()
            def __call__(self, x):
                return self.block(x) + 1

        torch.manual_seed(0)
        p = Pipe()
        w = ModelWrapper.from_model(p)
        x = torch.ones(2, 8)
        with torch.no_grad():
            expected = p(x)
        open(sys.argv[1], "wb").write(pickle.dumps((w, x, expected)))
        """
    )
    out = tmp_path / "w.pkl"
    subprocess.run([sys.executable, "-c", driver, str(out)], check=True, env={**os.environ})
    actor = textwrap.dedent(
        """
        import pickle, sys, torch
        w, x, expected = pickle.loads(open(sys.argv[1], "rb").read())
        with torch.no_grad():
            assert torch.equal(w.load()(x), expected)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", actor, str(out)], capture_output=True, text=True, env={**os.environ})
    assert done.stdout.strip() == "ok", done.stderr
