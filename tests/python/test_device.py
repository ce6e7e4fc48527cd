"""Device loads, shards and background prefault, on any machine.

The copy engine runs here against a test double of the CUDA runtime that
copies on the host and checks what a real runtime would refuse (ranges
registered twice, unaligned registrations, buffers reused while in flight);
tests/python/test_gpu.py runs the same loads on a real GPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import modelwrapper
from conftest import REPO, local_volume
from modelwrapper import _device, _load
from mw_models import Pipeline

sys.path.insert(0, str(REPO / "benches"))
import llama_shaped  # noqa: E402

PAGE = _device.PAGE


class HostBackend:
    """Copies on the host; registration bookkeeping as strict as CUDA's."""

    def __init__(self, refuse: str | None = None):
        self.device = torch.device("cpu")
        self.refuse = refuse
        self.registered: dict[int, int] = {}
        self.registrations = 0
        self.in_flight: set[int] = set()

    def register(self, ptr: int, nbytes: int) -> str | None:
        assert ptr % PAGE == 0 and nbytes % PAGE == 0, (ptr, nbytes)
        if self.refuse:
            return self.refuse
        for lo, n in self.registered.items():
            if ptr < lo + n and lo < ptr + nbytes:
                return "cudaHostRegister: part or all of the requested memory range is already mapped (error 712)"
        self.registered[ptr] = nbytes
        self.registrations += 1
        return None

    def unregister(self, ptr: int) -> None:
        del self.registered[ptr]

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def streams(self, n: int) -> list[int]:
        return list(range(n))

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: int) -> int:
        dst.copy_(src)
        event = object()
        self.in_flight.add(id(event))
        return event

    def wait(self, event: object) -> None:
        self.in_flight.discard(id(event))

    def synchronize(self, streams: list[int]) -> None:
        self.in_flight.clear()


@pytest.fixture
def host_backend(monkeypatch: pytest.MonkeyPatch):
    backends: list[HostBackend] = []

    def make(refuse: str | None = None) -> HostBackend:
        backend = HostBackend(refuse)
        monkeypatch.setattr(_load, "_backend", lambda device: backend)
        backends.append(backend)
        return backend

    _device.forget_refusal()
    yield make
    _device.forget_refusal()
    for b in backends:
        assert not b.registered, "every registration is undone once the copies are done"


@pytest.fixture
def llama_volume(tmp_path: Path) -> Path:
    return local_volume(llama_shaped.random(**llama_shaped.SMALL), tmp_path, skeletons=False)


def inside_mapping(address: int, path: Path) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(str(path)):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("chunk", [PAGE, 3 * PAGE, _device.DEFAULT_CHUNK])
def test_a_device_load_copies_every_byte_from_the_registered_mapping(
    llama_volume: Path, host_backend, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    backend = host_backend()
    monkeypatch.setenv("MODELWRAPPER_GPU_REGISTER", "1")
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", chunk)
    on_device = modelwrapper.load_state_dict(llama_volume, device="cuda:0")
    mapped = modelwrapper.load_state_dict(llama_volume)
    assert on_device.keys() == mapped.keys()
    assert all(same_bytes(on_device[k], mapped[k]) for k in mapped)
    report = modelwrapper.last_copy_report()
    total = sum(t.numel() * t.element_size() for t in mapped.values())
    assert report.path == "registered" and report.registered_bytes == total == report.bytes
    assert report.fallback_reason is None
    # Registered chunk by chunk, never a page twice: whole mapping's worth.
    assert backend.registrations >= math.ceil(total / chunk)


def test_a_refused_registration_falls_back_to_bounce_buffers_and_says_why(
    llama_volume: Path, host_backend, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", 4 * PAGE)
    monkeypatch.setenv("MODELWRAPPER_GPU_REGISTER", "1")
    host_backend(refuse="cudaHostRegister: operation not permitted (error 800)")
    mapped = modelwrapper.load_state_dict(llama_volume)
    with caplog.at_level("WARNING", logger="modelwrapper"):
        on_device = modelwrapper.load_state_dict(llama_volume, device="cuda")
    assert all(same_bytes(on_device[k], mapped[k]) for k in mapped)
    report = modelwrapper.last_copy_report()
    assert report.path == "staged" and report.registered_bytes == 0
    assert "operation not permitted" in report.fallback_reason
    assert "bounce buffers" in caplog.text and "memlock" in caplog.text
    # The refusal is remembered: the next load stages without asking again.
    second = host_backend()
    modelwrapper.load_state_dict(llama_volume, device="cuda")
    assert second.registrations == 0 and modelwrapper.last_copy_report().path == "staged"


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("chunk", [PAGE, 5 * PAGE, _device.DEFAULT_CHUNK])
def test_by_default_the_file_is_read_into_pinned_buffers_without_registering(
    llama_volume: Path, host_backend, monkeypatch: pytest.MonkeyPatch, chunk: int, threads: int
) -> None:
    backend = host_backend()
    monkeypatch.setattr(_device, "READ_THREADS", threads)
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", chunk)
    monkeypatch.setattr(_device, "MIN_READ", PAGE)  # several reader threads per chunk
    mapped = modelwrapper.load_state_dict(llama_volume)
    on_device = modelwrapper.load_state_dict(llama_volume, device="cuda")
    report = modelwrapper.last_copy_report()
    assert backend.registrations == 0 and report.path == "staged" and report.fallback_reason is None
    assert all(same_bytes(on_device[k], mapped[k]) for k in mapped)


def test_a_file_truncated_under_a_load_is_an_error_not_garbage(tmp_path: Path, host_backend) -> None:
    host_backend()
    volume = local_volume(llama_shaped.random(**llama_shaped.SMALL), tmp_path, skeletons=False)
    weights = volume / "model.safetensors"
    m = _load.map_file(weights)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 3 * PAGE)
    transfer = _device.Transfer(HostBackend())
    with pytest.raises(OSError, match="truncated"):
        with open(weights, "rb") as f:
            try:
                transfer.copy_file(
                    _device.FileSource(f.fileno(), m.header.data_offset),
                    torch.empty(0, dtype=torch.uint8),
                    torch.empty(size, dtype=torch.uint8),
                    [_device.Piece(0, size - m.header.data_offset, 0)],
                )
            finally:
                transfer.finish()


@pytest.mark.parametrize("size", [1, 2, 4])
def test_tensor_parallel_ranks_read_only_their_shard(llama_volume: Path, host_backend, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    host_backend()
    monkeypatch.setattr(_device, "DEFAULT_CHUNK", 2 * PAGE)  # many chunks and row blocks
    full = modelwrapper.load_state_dict(llama_volume)
    moved = 0
    for rank in range(size):
        shard = modelwrapper.tp_shard(rank, size, llama_shaped.TP_DIMS)
        views = modelwrapper.load_state_dict(llama_volume, shard=shard)
        on_device = modelwrapper.load_state_dict(llama_volume, device="cuda", shard=shard)
        for name, tensor in full.items():
            cut = shard(name, tuple(tensor.shape))
            expected = tensor.narrow(*cut) if cut else tensor
            assert same_bytes(views[name], expected), name
            assert same_bytes(on_device[name], expected), name
            assert on_device[name].is_contiguous()
            # CPU shards are views of the node copy, not copies.
            assert inside_mapping(views[name].data_ptr(), llama_volume / "model.safetensors"), name
        report = modelwrapper.last_copy_report()
        assert report.bytes == sum(t.numel() * t.element_size() for t in on_device.values())
        moved += report.bytes
    q = full["model.layers.0.self_attn.q_proj.weight"]
    o = full["model.layers.0.self_attn.o_proj.weight"]
    assert on_device["model.layers.0.self_attn.q_proj.weight"].shape[0] == q.shape[0] // size
    assert on_device["model.layers.0.self_attn.o_proj.weight"].shape[1] == o.shape[1] // size
    replicated = sum(t.numel() * t.element_size() for n, t in full.items() if "norm" in n or "embed" in n)
    total = sum(t.numel() * t.element_size() for t in full.values())
    assert moved == total + (size - 1) * replicated, "split tensors are read once over all ranks"


def test_a_module_loads_to_the_device_with_its_constructor_buffers(tmp_path: Path, host_backend) -> None:
    host_backend()
    torch.manual_seed(0)
    pipe = Pipeline()
    x = torch.randn(3, 64)
    volume = local_volume(pipe, tmp_path)
    loaded = modelwrapper.load(volume, device="cuda:0")
    assert torch.equal(loaded.text_encoder(x), pipe.text_encoder(x))
    assert loaded.decoder.head.weight is loaded.decoder.emb.weight, "tied weights stay tied"
    assert torch.equal(loaded.text_encoder.scale, torch.full((64,), 0.5))


def test_shards_that_do_not_fit_are_refused_with_the_tensor_named(llama_volume: Path) -> None:
    with pytest.raises(modelwrapper.VolumeError, match=r"q_proj.weight.*does not split into 3"):
        modelwrapper.load_state_dict(llama_volume, shard=modelwrapper.tp_shard(0, 3, {"*.q_proj.weight": 0}))
    with pytest.raises(modelwrapper.VolumeError, match="out of range"):
        modelwrapper.load_state_dict(llama_volume, shard=lambda name, shape: (0, shape[0], 1))
    with pytest.raises(ValueError, match="rank"):
        modelwrapper.tp_shard(4, 4, {})


def test_load_state_dict_honours_copy_on_write(llama_volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELWRAPPER_COPY_ON_WRITE", "1")
    tensors = modelwrapper.load_state_dict(llama_volume)
    w = tensors["model.norm.weight"]
    w.add_(1)  # would be SIGSEGV on the read-only mapping
    assert torch.equal(modelwrapper.load_state_dict(llama_volume)["model.norm.weight"] + 1, w), "the node copy is untouched"


def test_load_state_dict_names_the_components(tmp_path: Path) -> None:
    volume = local_volume(Pipeline(), tmp_path)
    with pytest.raises(modelwrapper.VolumeError, match="say which one"):
        modelwrapper.load_state_dict(volume)
    with pytest.raises(modelwrapper.VolumeError, match="no component 'nope'"):
        modelwrapper.load_state_dict(volume, "nope")
    tensors = modelwrapper.load_state_dict(volume, "decoder")
    assert set(tensors) == {"emb.weight"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_a_gpu_load_without_cuda_says_what_is_missing(llama_volume: Path) -> None:
    with pytest.raises(modelwrapper.VolumeError, match=r"torch.cuda.is_available\(\) is False.*load to 'cpu'"):
        modelwrapper.load(llama_volume, device="cuda")
    with pytest.raises(modelwrapper.VolumeError, match="not supported"):
        modelwrapper.load(llama_volume, device="mps")
    with pytest.raises(modelwrapper.VolumeError, match="not a torch device"):
        modelwrapper.load(llama_volume, device="gpu0")


def resident_bytes(path: Path) -> int:
    """Rss of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def test_background_prefault_maps_the_pages_after_load_returned(tmp_path: Path) -> None:
    volume = local_volume(llama_shaped.random(**llama_shaped.SMALL), tmp_path, skeletons=False)
    weights = volume / "model.safetensors"
    lazy = modelwrapper.load(volume)
    assert resident_bytes(weights) < weights.stat().st_size // 2, "a lazy load maps pages on first touch"
    eager = modelwrapper.load(volume, prefault="background")
    assert modelwrapper.wait_for_prefault(timeout=120)
    assert resident_bytes(weights) >= weights.stat().st_size - PAGE, "every page mapped, none touched by the caller"
    assert all(same_bytes(eager[k], lazy[k]) for k in lazy)
    with pytest.raises(modelwrapper.VolumeError, match="prefault='later' is not understood"):
        modelwrapper.load(volume, prefault="later")
