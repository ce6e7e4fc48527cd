"""modelwrapper.load() over volumes the real node agent filled."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import modelwrapper
from conftest import REPO, filled_volume, local_volume, with_pythonpath
from mw_models import (
    BigPipeline,
    CountsEval,
    CustomLoading,
    Encoder,
    KeepsDropoutOn,
    Pipeline,
    PicklesItsOwnWay,
    Renamed,
    SharesModules,
    SmallCNN,
    TransposedTie,
)


def mapped_ranges(path_part: str) -> list[tuple[int, int]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if path_part in line:
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def export_and_fill(model, shm: Path, **kw) -> Path:
    exported = modelwrapper.export(model, shm / "export", **kw)
    return filled_volume(exported.yaml_path, shm / "root")


def test_a_torch_save_skeleton_as_older_exports_wrote_it_still_loads(tmp_path: Path) -> None:
    """Skeletons were torch.save archives of the module on the meta device
    before export() wrote stripped pickles; volumes filled from those files
    must keep loading."""
    torch.manual_seed(0)
    enc = Encoder()
    volume = local_volume(enc, tmp_path)
    old = copy.deepcopy(enc)
    for m in old.modules():
        for k, p in m._parameters.items():
            m._parameters[k] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if k not in m._non_persistent_buffers_set:
                m._buffers[k] = b.to("meta")
    torch.save(old, volume / "model.skeleton.pt")
    assert (volume / "model.skeleton.pt").read_bytes()[:4] == b"PK\x03\x04"
    loaded = modelwrapper.load(volume)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), enc(x)) and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())


def test_export_skeletons_hold_no_weights_and_custom_loading_still_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = CustomLoading()
    volume = local_volume(module, tmp_path)
    skeleton = (volume / "model.skeleton.pt").read_bytes()
    assert len(skeleton) < 4096, "weights are not in the skeleton"
    before = CustomLoading.loads
    loaded = modelwrapper.load(volume)
    assert CustomLoading.loads > before, "a module's own _load_from_state_dict is honoured"
    x = torch.randn(2, 16)
    assert torch.equal(loaded(x), module(x)) and not loaded.training
    assert torch.equal(module.lin.weight, modelwrapper.load(volume).lin.weight), "export left the model intact"


def skeleton_version(volume: Path) -> int:
    import pickle

    with open(volume / "model.skeleton.pt", "rb") as f:
        return pickle.load(f)["zerocopy.skeleton"]


def test_a_version_3_skeleton_keeps_shared_modules_tied_weights_and_attributes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SharesModules()
    volume = local_volume(module, tmp_path)
    assert skeleton_version(volume) == 3
    loaded = modelwrapper.load(volume)
    assert loaded.again is loaded.block and loaded.outside is loaded.head
    assert loaded.head.weight is loaded.emb.weight and isinstance(loaded.head.weight, torch.nn.Parameter)
    assert loaded.scale == 0.5 and torch.equal(loaded.mask, module.mask)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in module.named_parameters()]
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), module(x))
    # Every module has its own hook tables: a hook on one is on that one only.
    calls = []
    loaded.block.register_forward_hook(lambda *a: calls.append(1))
    loaded.head(torch.randn(1, 8))
    assert calls == [] and not loaded.head._forward_hooks
    loaded.block(torch.randn(1, 8))
    assert calls == [1]
    # The weights are views of the mapping, and the model works like any other.
    assert loaded.block.weight.untyped_storage().nbytes() > loaded.block.weight.nbytes
    assert torch.equal(copy.deepcopy(loaded)(x), module(x))
    assert set(loaded.state_dict()) == set(module.state_dict())


def test_modules_with_their_own_setstate_get_it_called_from_a_version_3_skeleton(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = SmallCNN()
    module.train()(torch.randn(4, 3, 8, 8))  # running statistics that are not the defaults
    module.eval()
    volume = local_volume(module, tmp_path)
    assert skeleton_version(volume) == 3
    calls = []
    original = torch.nn.Conv2d.__setstate__
    monkeypatch.setattr(torch.nn.Conv2d, "__setstate__", lambda self, state: (calls.append(sorted(state)), original(self, state))[1])
    loaded = modelwrapper.load(volume)
    assert len(calls) == 1 and "_forward_hooks" in calls[0] and "padding_mode" in calls[0]
    assert torch.equal(loaded.bn.running_var, module.bn.running_var) and loaded.bn.num_batches_tracked == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), module(x)) and not loaded.bn.training


def test_a_version_2_skeleton_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Volumes exported before version 3 keep loading (FORMAT.md)."""
    import modelwrapper._export as export_module

    torch.manual_seed(0)
    module = SharesModules()
    with monkeypatch.context() as m:
        m.setattr(export_module, "standard_pickling", lambda cls: False)
        volume = local_volume(module, tmp_path)
    assert skeleton_version(volume) == 2
    loaded = modelwrapper.load(volume)
    assert loaded.again is loaded.block and loaded.head.weight is loaded.emb.weight
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), module(x)) and not loaded.training


def test_a_module_that_pickles_its_own_way_gets_a_version_2_skeleton(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PicklesItsOwnWay()
    volume = local_volume(module, tmp_path)
    assert skeleton_version(volume) == 2
    loaded = modelwrapper.load(volume)
    assert loaded.cache == {}, "its own __setstate__ ran"
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), module(x))


def test_load_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    import gc

    volume = local_volume(Encoder(), tmp_path)
    assert gc.isenabled()
    modelwrapper.load(volume)
    assert gc.isenabled(), "on again after a load"
    with pytest.raises(modelwrapper.VolumeError):
        modelwrapper.load(tmp_path)
    assert gc.isenabled(), "on again after a failed load"
    gc.disable()
    try:
        modelwrapper.load(volume)
        assert not gc.isenabled(), "a collector the caller turned off stays off"
    finally:
        gc.enable()


def test_an_unknown_skeleton_version_is_refused(tmp_path: Path) -> None:
    import pickle

    volume = local_volume(Encoder(), tmp_path)
    (volume / "model.skeleton.pt").write_bytes(pickle.dumps({"zerocopy.skeleton": 9, "module": None}))
    with pytest.raises(modelwrapper.VolumeError, match="skeleton version 9; this modelwrapper reads 2, 3: upgrade it"):
        modelwrapper.load(volume)


def test_eval_mode_is_what_the_modules_own_train_and_eval_make_it(tmp_path: Path) -> None:
    mc = modelwrapper.load(local_volume(KeepsDropoutOn(), tmp_path / "mc"))
    assert not mc.training and mc.drop.training, "a parent's train() keeping dropout on is honoured"
    before = CountsEval.evals
    counted = modelwrapper.load(local_volume(CountsEval(), tmp_path / "eval"))
    assert CountsEval.evals == before + 1 and not counted.training


def test_weights_that_are_other_views_of_one_storage_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TransposedTie()
    loaded = modelwrapper.load(local_volume(module, tmp_path))
    assert torch.equal(loaded.dec.weight, module.enc.weight.t()) and torch.equal(loaded.enc.weight, module.enc.weight)
    x = torch.randn(2, 8)
    # Same values; the loaded copy is contiguous, so matmul may round differently.
    assert torch.allclose(loaded(x), module(x), atol=1e-6)


def test_a_module_that_renames_its_state_dict_keys_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Renamed()
    loaded = modelwrapper.load(local_volume(module, tmp_path))
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), module(x))


def test_a_file_whose_data_starts_unaligned_still_maps_its_aligned_tensors(tmp_path: Path) -> None:
    """safetensors pads headers to 8 bytes, but the format only requires each
    tensor's file offset to be aligned: data starting at byte 132 with an F64
    tensor at data byte 4 (file offset 136) is valid."""
    from modelwrapper._load import map_tensors

    header = json.dumps({"pad": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "x": {"dtype": "F64", "shape": [1], "data_offsets": [4, 12]}})
    header = header.ljust(124).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes([1, 2, 3, 4]) + struct.pack("<d", 2.5))
    tensors, _ = map_tensors(path)
    assert tensors["x"].tolist() == [2.5] and tensors["pad"].tolist() == [1, 2, 3, 4]


def test_a_pipeline_loads_zero_copy_and_computes_the_same(shm: Path) -> None:
    torch.manual_seed(0)
    pipe = Pipeline()
    x = torch.randn(3, 64)
    expected = pipe(x)
    volume = export_and_fill(pipe, shm)
    loaded = modelwrapper.load(volume)
    assert type(loaded).__name__ == "Pipeline" and loaded.temperature == 2.0
    assert torch.equal(loaded(x), expected)
    # tied weights stay tied, constructor-only buffers keep their value
    assert loaded.decoder.head.weight is loaded.decoder.emb.weight
    assert torch.equal(loaded.text_encoder.scale, torch.full((64,), 0.5))
    ranges = mapped_ranges(str(volume))
    for module in (loaded.text_encoder, loaded.decoder):
        assert not module.training
        persistent = [(n, b) for n, b in module.named_buffers() if n != "scale"]
        for name, t in list(module.named_parameters()) + persistent:
            assert not t.requires_grad and t.device.type == "cpu"
            ptr = t.untyped_storage().data_ptr()
            assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} is not inside the volume mapping"


def test_a_standalone_module_comes_back_as_the_module(shm: Path) -> None:
    enc = Encoder()
    volume = export_and_fill(enc, shm)
    loaded = modelwrapper.load(volume, prefault=True)
    assert isinstance(loaded, Encoder)
    x = torch.randn(2, 64)
    assert torch.equal(loaded(x), enc(x))


def test_a_factory_skeleton_needs_no_pickle(shm: Path) -> None:
    torch.manual_seed(1)
    enc = Encoder(dim=32, hidden=48)
    exported = modelwrapper.export(enc, shm / "export", skeletons=False)
    doc = yaml.safe_load(exported.yaml_path.read_text())
    doc["spec"]["pipeline"]["components"][0]["skeleton"] = {"factory": "mw_models:Encoder", "kwargs": {"dim": 32, "hidden": 48}}
    exported.yaml_path.write_text(yaml.safe_dump(doc))
    volume = filled_volume(exported.yaml_path, shm / "root")
    assert not list(volume.glob("*.skeleton.pt"))
    loaded = modelwrapper.load(volume)
    x = torch.randn(4, 32)
    assert torch.equal(loaded(x), enc(x))
    assert torch.equal(loaded.scale, torch.full((32,), 0.5))


class RunsCode:
    """Unpickling this creates a file: what any pickle may do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("value", ["0", "false", "no", "NO"])
def test_with_pickles_disallowed_pickled_skeletons_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    volume = local_volume(Pipeline(), tmp_path)
    monkeypatch.setenv("MODELWRAPPER_ALLOW_PICKLE", value)
    with pytest.raises(
        modelwrapper.VolumeError,
        match=rf"refusing to unpickle text-encoder: text-encoder\.skeleton\.pt; decoder: decoder\.skeleton\.pt; "
        rf"pipeline: pipeline\.skeleton\.pkl because MODELWRAPPER_ALLOW_PICKLE={value}: unpickling runs whatever code .*"
        r"factory skeleton instead .*or set MODELWRAPPER_ALLOW_PICKLE=1 if you trust",
    ):
        modelwrapper.load(volume)


def test_a_pickled_skeleton_runs_code_unless_pickles_are_disallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = local_volume(Encoder(), tmp_path)
    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), volume / "model.skeleton.pt")
    monkeypatch.setenv("MODELWRAPPER_ALLOW_PICKLE", "0")
    with pytest.raises(modelwrapper.VolumeError, match="refusing to unpickle model: model.skeleton.pt"):
        modelwrapper.load(volume)
    assert not marker.exists()
    monkeypatch.delenv("MODELWRAPPER_ALLOW_PICKLE")  # the default trusts the volume
    with pytest.raises(modelwrapper.VolumeError, match="skeleton is a TextIOWrapper, not an nn.Module"):
        modelwrapper.load(volume)
    assert marker.exists()


def test_factory_skeletons_and_tensor_dicts_need_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELWRAPPER_ALLOW_PICKLE", "false")
    torch.manual_seed(6)
    enc = Encoder(dim=32, hidden=48)
    factory = {"factory": "mw_models:Encoder", "kwargs": {"dim": 32, "hidden": 48}}
    loaded = modelwrapper.load(local_volume(enc, tmp_path / "a", skeletons=False, factory=factory))
    x = torch.randn(4, 32)
    assert torch.equal(loaded(x), enc(x))
    tensors = modelwrapper.load(local_volume(enc, tmp_path / "b", skeletons=False))
    assert set(tensors) == set(enc.state_dict())
    monkeypatch.setenv("MODELWRAPPER_ALLOW_PICKLE", "maybe")
    with pytest.raises(modelwrapper.VolumeError, match=r"MODELWRAPPER_ALLOW_PICKLE='maybe' is not understood: set it to 1/true/yes or 0/false/no"):
        modelwrapper.load(local_volume(enc, tmp_path / "c", skeletons=False))


def test_without_a_skeleton_a_component_is_a_tensor_dict(shm: Path) -> None:
    enc = Encoder()
    volume = export_and_fill(enc, shm, skeletons=False)
    loaded = modelwrapper.load(volume)
    assert isinstance(loaded, dict)
    assert set(loaded) == set(enc.state_dict())
    assert torch.equal(loaded["inp.weight"], enc.inp.weight)


def test_mismatching_weights_are_named(shm: Path, caplog: pytest.LogCaptureFixture) -> None:
    exported = modelwrapper.export(Encoder(dim=16, hidden=16), shm / "export", skeletons=False)
    doc = yaml.safe_load(exported.yaml_path.read_text())
    comp = doc["spec"]["pipeline"]["components"][0]
    comp["skeleton"] = {"factory": "mw_models:Encoder", "kwargs": {"dim": 16, "hidden": 24}}
    exported.yaml_path.write_text(yaml.safe_dump(doc))
    volume = filled_volume(exported.yaml_path, shm / "root")
    with pytest.raises(modelwrapper.VolumeError, match=r"component model: .*inp\.weight: weights have shape \[16, 16\], module expects \[24, 16\]"):
        modelwrapper.load(volume)

    # a key the module lacks is reported and skipped; a missing one is an error
    weights = {k: v for k, v in Encoder(dim=8, hidden=8).state_dict().items()}
    weights["extra.bias"] = torch.zeros(2)
    from safetensors.torch import save_file

    src = shm / "partial.safetensors"
    save_file(weights, str(src))
    spec = {
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ModelWrapper",
        "metadata": {"name": "partial"},
        "spec": {"pipeline": {"components": [{"name": "enc", "weights": {"uri": src.as_uri()}, "skeleton": {"factory": "mw_models:Encoder", "kwargs": {"dim": 8, "hidden": 8}}}]}},
    }
    (shm / "p.yaml").write_text(yaml.safe_dump(spec))
    v2 = filled_volume(shm / "p.yaml", shm / "root2")
    with caplog.at_level("WARNING", logger="modelwrapper"):
        modelwrapper.load(v2)
    assert "extra.bias" in caplog.text
    del weights["norm.weight"], weights["extra.bias"]
    save_file(weights, str(src))
    spec["metadata"]["name"] = "missing"
    (shm / "p.yaml").write_text(yaml.safe_dump(spec))
    v3 = filled_volume(shm / "p.yaml", shm / "root3")
    with pytest.raises(modelwrapper.VolumeError, match=r"component enc: .*missing from the weights: norm\.weight"):
        modelwrapper.load(v3)


def test_a_path_without_manifest_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(modelwrapper.VolumeError, match="not a complete zerocopy volume"):
        modelwrapper.load(tmp_path)


WRITER = textwrap.dedent(
    """
    import sys, torch, modelwrapper
    m = modelwrapper.load(sys.argv[1], copy_on_write=True if sys.argv[3] == "argument" else None)
    w = m.layers[0].weight if hasattr(m, "layers") else m.first.layers[0].weight
    if sys.argv[2] == "write":
        w.add_(1.0)  # in place: a copy-on-write page with the opt-in, else a read-only one
    print(float(w[0, 0]), flush=True)
    """
)


def run_writer(volume: Path, action: str, opt_in: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": with_pythonpath(Path(__file__).parent)}
    env.pop("MODELWRAPPER_COPY_ON_WRITE", None)
    if opt_in == "environment":
        env["MODELWRAPPER_COPY_ON_WRITE"] = "1"
    return subprocess.run([sys.executable, "-c", WRITER, str(volume), action, opt_in], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("opt_in", ["argument", "environment"])
def test_an_in_place_write_stays_in_its_process(shm: Path, opt_in: str) -> None:
    from mw_models import Big

    big = Big(4, seed=3)
    original = float(big.layers[0].weight.detach()[0, 0])
    volume = export_and_fill(big, shm)
    weights = next(volume.glob("*.safetensors"))
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    wrote = run_writer(volume, "write", opt_in)
    assert wrote.returncode == 0, wrote.stderr
    assert float(wrote.stdout) == pytest.approx(original + 1.0)
    read = run_writer(volume, "read", "none")
    assert read.returncode == 0, read.stderr
    assert float(read.stdout) == pytest.approx(original)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def test_an_in_place_write_without_the_opt_in_kills_the_writer(shm: Path) -> None:
    from mw_models import Big

    big = Big(4, seed=4)
    original = float(big.layers[0].weight.detach()[0, 0])
    volume = export_and_fill(big, shm)
    weights = next(volume.glob("*.safetensors"))
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    wrote = run_writer(volume, "write", "none")
    assert wrote.returncode == -signal.SIGSEGV, (wrote.returncode, wrote.stdout, wrote.stderr)
    assert wrote.stdout == "", "the write must not have succeeded"
    read = run_writer(volume, "read", "none")
    assert read.returncode == 0, read.stderr
    assert float(read.stdout) == pytest.approx(original)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def volume_mappings(volume: Path) -> list[dict[str, object]]:
    """This process's mappings of files under ``volume``: perms and Rss bytes."""
    out: list[dict[str, object]] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            if len(head) >= 6 and head[5].startswith(str(volume) + "/"):
                out.append({"perms": head[1], "rss": 0, "path": head[5]})
            else:
                out.append({})
        elif head[0] == "Rss:" and out and out[-1]:
            out[-1]["rss"] = int(head[1]) * 1024
    return [m for m in out if m]


def test_weights_are_mapped_read_only_and_prefault_still_populates_them(tmp_path: Path) -> None:
    from mw_models import Big

    big = Big(8, seed=5)
    volume = local_volume(big, tmp_path)
    size = (volume / "model.safetensors").stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "buffer is not writable" warning is not the user's business
        loaded = modelwrapper.load(volume, prefault=True)
    maps = volume_mappings(volume)
    assert maps and all(m["perms"] == "r--p" for m in maps), maps
    assert sum(m["rss"] for m in maps) >= 0.99 * size, (maps, size)
    x = torch.randn(2, 1024)
    assert torch.equal(loaded(x), big(x))
    cow = modelwrapper.load(volume, copy_on_write=True)
    assert {m["perms"] for m in volume_mappings(volume)} == {"r--p", "rw-p"}
    del cow


def test_python_and_rust_see_identical_bytes(shm: Path) -> None:
    torch.manual_seed(2)
    volume = export_and_fill(Pipeline(), shm)
    example = Path(os.environ.get("ZEROCOPY_LOADER_EXAMPLE", REPO / "target/debug/examples/tensor-digests"))
    if not example.exists():
        pytest.fail(f"{example} is missing: cargo build -p zerocopy-loader --features tch --example tensor-digests")
    rust = json.loads(subprocess.run([str(example), str(volume)], capture_output=True, text=True, check=True).stdout)
    manifest = json.loads((volume / "manifest.json").read_text())
    from modelwrapper._load import map_tensors

    python = {}
    for c in manifest["components"]:
        tensors, _ = map_tensors(volume / c["weights"]["file"])
        python[c["name"]] = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in tensors.items()}
    assert {c: {k: v["sha256"] for k, v in t.items()} for c, t in rust.items()} == python
    assert all(v["zeroCopy"] for t in rust.values() for v in t.values())


SHARER = textwrap.dedent(
    """
    import sys, torch, modelwrapper
    volume = sys.argv[1]
    pipe = modelwrapper.load(volume)
    with torch.no_grad():
        out = pipe(torch.ones(2, 1024))
    print(repr(float(out.sum())), flush=True)
    sys.stdin.readline()  # stay alive until the parent has measured
    """
)


def weights_memory(pid: int, volume: Path) -> tuple[int, int, int]:
    """(Rss, Pss, USS) in bytes of the mappings of files under ``volume``."""
    rss = pss = uss = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = len(head) >= 6 and head[5].startswith(str(volume))
        elif current and head[0] in ("Rss:", "Pss:", "Private_Clean:", "Private_Dirty:"):
            kb = int(head[1]) * 1024
            if head[0] == "Rss:":
                rss += kb
            elif head[0] == "Pss:":
                pss += kb
            else:
                uss += kb
    return rss, pss, uss


def test_four_processes_share_one_copy_of_a_512mb_pipeline(shm: Path) -> None:
    pipe = BigPipeline(mib_each=256)
    with torch.no_grad():
        expected = float(pipe(torch.ones(2, 1024)).sum())
    volume = export_and_fill(pipe, shm)
    del pipe
    model_bytes = sum(f.stat().st_size for f in volume.glob("*.safetensors"))
    assert model_bytes >= 512 << 20
    env = {**os.environ, "PYTHONPATH": with_pythonpath(Path(__file__).parent)}
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARER, str(volume)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    try:
        outputs = [float(p.stdout.readline()) for p in procs]
        usage = [weights_memory(p.pid, volume) for p in procs]
        rollup = [Path(f"/proc/{p.pid}/smaps_rollup").read_text() for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    assert outputs == [expected] * 4
    total_pss = sum(u[1] for u in usage)
    # every process really touched every weight...
    assert all(u[0] >= model_bytes * 0.99 for u in usage), usage
    # ...yet together they hold one copy, and none of it privately
    assert total_pss <= 1.1 * model_bytes, (total_pss, model_bytes)
    assert all(u[2] < 0.01 * model_bytes for u in usage), usage
    assert all("Pss:" in r for r in rollup)


def test_a_directory_component_merges_its_shards_and_refuses_repeated_names(tmp_path: Path) -> None:
    from conftest import directory_volume

    a = {"layers.0.weight": torch.randn(4, 8), "embed.weight": torch.randn(16, 8).to(torch.bfloat16)}
    b = {"layers.1.weight": torch.randn(4, 8), "head.bias": torch.arange(3, dtype=torch.int64)}
    gen = directory_volume(tmp_path / "ok", {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b})
    tensors = modelwrapper.load(gen)
    assert set(tensors) == set(a) | set(b)
    for name, t in {**a, **b}.items():
        assert torch.equal(tensors[name], t), name
    assert modelwrapper.load_state_dict(gen, "llm").keys() == tensors.keys()
    one = modelwrapper.load_state_dict(gen, "llm", file="model-00002-of-00002.safetensors")
    assert set(one) == set(b)
    with pytest.raises(modelwrapper.VolumeError, match="has no safetensors file 'nope.safetensors'"):
        modelwrapper.load_state_dict(gen, "llm", file="nope.safetensors")
    info = modelwrapper.ModelWrapper.from_volume(gen)._model_info["llm"]
    assert info["tensors"] == 4 and info["bytes"] > 0
    ranks = directory_volume(tmp_path / "ranks", {"rank0.safetensors": a, "rank1.safetensors": a})
    with pytest.raises(modelwrapper.VolumeError, match="is in both rank0.safetensors and rank1.safetensors"):
        modelwrapper.load(ranks)
    assert set(modelwrapper.load_state_dict(ranks, file="rank1.safetensors")) == set(a)
