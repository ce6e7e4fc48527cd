"""GPU loads on a real GPU: bytes equal, data on the device, the fallback
taken for a real refusal. Skipped where CUDA is not available (CI machines);
run on a GPU machine with `python3 -m pytest tests/python/test_gpu.py`
(benches/gpu_load.sh runs them before the GPU benchmark)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import modelwrapper
from conftest import REPO, local_volume
from modelwrapper import _device, _load
from mw_models import Pipeline

sys.path.insert(0, str(REPO / "benches"))
import llama_shaped  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_refusals():
    _device.forget_refusal()
    yield
    _device.forget_refusal()
    # Nothing a load did may surface as a later kernel's error.
    torch.ones(8, device="cuda").sum().item()
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def shm_dir():
    """Volumes on tmpfs, as the node copy is (registration pins its pages)."""
    path = Path(tempfile.mkdtemp(prefix="zerocopy-gpu-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def llama_volume(shm_dir: Path) -> Path:
    model = llama_shaped.random(**llama_shaped.SMALL)
    return local_volume(model, shm_dir / "llama", skeletons=False)


def same_bytes(gpu: torch.Tensor, cpu: torch.Tensor) -> bool:
    host = gpu.cpu()
    return (
        host.shape == cpu.shape
        and host.dtype == cpu.dtype
        and torch.equal(host.contiguous().view(torch.uint8), cpu.contiguous().view(torch.uint8))
    )


@pytest.mark.parametrize("chunk", [4096, 20 * 4096, _device.DEFAULT_CHUNK])
def test_every_byte_reaches_the_gpu_from_the_registered_mapping(
    llama_volume: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setenv("MODELWRAPPER_GPU_REGISTER", "1")
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", chunk)
    mapped = modelwrapper.load_state_dict(llama_volume)
    on_gpu = modelwrapper.load_state_dict(llama_volume, device="cuda")
    report = modelwrapper.last_copy_report()
    assert report.path == "registered", report
    assert report.bytes == sum(t.numel() * t.element_size() for t in mapped.values())
    for name, tensor in mapped.items():
        assert on_gpu[name].device.type == "cuda", name
        assert same_bytes(on_gpu[name], tensor), name


def test_a_module_on_the_gpu_computes_what_the_cpu_copy_computes(shm_dir: Path) -> None:
    torch.manual_seed(0)
    pipe = Pipeline()
    volume = local_volume(pipe, shm_dir / "pipeline")
    loaded = modelwrapper.load(volume, device="cuda:0")
    for module in (loaded.text_encoder, loaded.decoder):
        assert all(t.device == torch.device("cuda", 0) for t in list(module.parameters()) + list(module.buffers()))
    assert loaded.decoder.head.weight is loaded.decoder.emb.weight
    x = torch.randn(3, 64)
    reference = pipe.text_encoder.to("cuda")(x.cuda())
    assert torch.equal(loaded.text_encoder(x.cuda()), reference)


def test_llama_forward_on_the_gpu_matches_the_same_weights_moved_by_torch(shm_dir: Path) -> None:
    torch.manual_seed(1)
    model = llama_shaped.random(**llama_shaped.SMALL)
    volume = local_volume(model, shm_dir / "llama-module")
    loaded = modelwrapper.load(volume, device="cuda")
    ids = torch.randint(0, llama_shaped.SMALL["vocab"], (2, 16), device="cuda")
    assert torch.equal(loaded(ids), model.to("cuda")(ids))


@pytest.mark.parametrize("threads", [1, 8])
def test_read_through_pinned_buffers_is_byte_identical(llama_volume: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", 64 * 4096)
    monkeypatch.setattr(_device, "READ_THREADS", threads)
    monkeypatch.setattr(_device, "MIN_READ", 4096)
    mapped = modelwrapper.load_state_dict(llama_volume)
    on_gpu = modelwrapper.load_state_dict(llama_volume, device="cuda")
    assert modelwrapper.last_copy_report().path == "staged"
    assert all(same_bytes(on_gpu[k], mapped[k]) for k in mapped)


class RegisteredTwice(_device.CudaBackend):
    """Registers each range, then asks again: CUDA's own refusal
    ("already mapped"), so the fallback runs on a real runtime error."""

    def register(self, ptr: int, nbytes: int) -> str | None:
        first = super().register(ptr, nbytes)
        assert first is None, first
        refused = super().register(ptr, nbytes)
        self.unregister(ptr)
        return refused


def test_a_refusal_by_cuda_falls_back_and_leaves_no_error_behind(llama_volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELWRAPPER_GPU_REGISTER", "1")
    monkeypatch.setattr(_load, "_backend", lambda device: RegisteredTwice(torch.device(device)))
    mapped = modelwrapper.load_state_dict(llama_volume)
    on_gpu = modelwrapper.load_state_dict(llama_volume, device="cuda")
    report = modelwrapper.last_copy_report()
    assert report.path == "staged" and report.fallback_reason and "cudaHostRegister" in report.fallback_reason, report
    assert all(same_bytes(on_gpu[k], mapped[k]) for k in mapped)
    # The refused call's "last error" was cleared: a kernel launch works.
    assert torch.arange(4, device="cuda").sum().item() == 6


@pytest.mark.parametrize("size", [2, 8])
def test_tensor_parallel_ranks_get_their_shards_on_the_gpu(llama_volume: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", 16 * 4096)
    full = modelwrapper.load_state_dict(llama_volume)
    for rank in range(size):
        shard = modelwrapper.tp_shard(rank, size, llama_shaped.TP_DIMS)
        on_gpu = modelwrapper.load_state_dict(llama_volume, device="cuda", shard=shard)
        for name, tensor in full.items():
            cut = shard(name, tuple(tensor.shape))
            assert same_bytes(on_gpu[name], tensor.narrow(*cut) if cut else tensor), (rank, name)


def test_a_model_exported_from_the_gpu_loads_on_the_cpu_and_on_the_gpu(shm_dir: Path) -> None:
    """Its constructor-only buffers (not in the weights) were on the GPU when
    it was exported; the skeleton must not need a GPU to unpickle."""
    torch.manual_seed(2)
    pipe = Pipeline()
    pipe.text_encoder.to("cuda")
    volume = local_volume(pipe, shm_dir / "from-gpu")
    assert pipe.text_encoder.scale.is_cuda, "export left the model where it was"
    on_cpu = modelwrapper.load(volume)
    assert on_cpu.text_encoder.scale.device.type == "cpu"
    on_gpu = modelwrapper.load(volume, device="cuda")
    assert on_gpu.text_encoder.scale.is_cuda
    x = torch.randn(3, 64, device="cuda")
    assert torch.equal(on_gpu.text_encoder(x), pipe.text_encoder(x))


def test_a_sharded_directory_component_lands_on_the_gpu_byte_for_byte(tmp_path: Path) -> None:
    from conftest import directory_volume

    g = torch.Generator().manual_seed(3)
    a = {f"layers.{i}.weight": torch.randn(256, 512, generator=g).to(torch.bfloat16) for i in range(4)}
    b = {"embed.weight": torch.randn(1000, 64, generator=g), "head.bias": torch.arange(7, dtype=torch.int64)}
    gen = directory_volume(Path(tempfile.mkdtemp(dir="/dev/shm")), {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b})
    try:
        on_gpu = modelwrapper.load(gen, device="cuda")
        assert set(on_gpu) == set(a) | set(b)
        for name, t in {**a, **b}.items():
            assert on_gpu[name].device.type == "cuda" and torch.equal(on_gpu[name].cpu(), t), name
        one = modelwrapper.load_state_dict(gen, file="model-00002-of-00002.safetensors", device="cuda:0")
        assert set(one) == set(b) and all(t.device.type == "cuda" for t in one.values())
    finally:
        shutil.rmtree(gen.parent, ignore_errors=True)
