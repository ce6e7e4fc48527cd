"""modelwrapper.load() over volumes the real node agent filled."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import modelwrapper
from conftest import REPO, fill, filled_volume
from mw_models import BigPipeline, Encoder, Pipeline


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
    m = modelwrapper.load(sys.argv[1])
    w = m.layers[0].weight if hasattr(m, "layers") else m.first.layers[0].weight
    if sys.argv[2] == "write":
        w.add_(1.0)  # in place, on a copy-on-write page
    print(float(w[0, 0]))
    """
)


def test_an_in_place_write_stays_in_its_process(shm: Path) -> None:
    from mw_models import Big

    big = Big(4, seed=3)
    original = float(big.layers[0].weight.detach()[0, 0])
    volume = export_and_fill(big, shm)
    weights = next(volume.glob("*.safetensors"))
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    wrote = subprocess.run([sys.executable, "-c", WRITER, str(volume), "write"], capture_output=True, text=True, env=env, check=True)
    assert float(wrote.stdout) == pytest.approx(original + 1.0)
    read = subprocess.run([sys.executable, "-c", WRITER, str(volume), "read"], capture_output=True, text=True, env=env, check=True)
    assert float(read.stdout) == pytest.approx(original)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
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
