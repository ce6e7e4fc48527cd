"""Fills all-MiniLM-L6-v2 from a local Hub stand-in with the node agent and
loads it three ways (see README.md). Runs offline, as root (it mounts a
tmpfs for the volume root)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/python"))

from hub_server import HubServer, minilm_dir  # noqa: E402

YAML = """apiVersion: zerocopy.dev/v1alpha1
kind: ModelWrapper
metadata: {{name: minilm}}
spec:
  pipeline:
    components:
      - name: encoder
        source: {{uri: "hf://sentence-transformers/all-MiniLM-L6-v2@main", endpoint: "{endpoint}", exclude: [README.md]}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agent", default=str(REPO / "target/debug/zerocopy-node-agent"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_dir())
        root = Path(tmp) / "shm"
        root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "zerocopy-hf-demo", str(root)], check=True)
        try:
            spec = Path(tmp) / "minilm.yaml"
            spec.write_text(YAML.format(endpoint=hub.endpoint))
            started = time.perf_counter()
            subprocess.run([args.agent, "--root", str(root / "zc"), "standalone", "-f", str(spec)], check=True)
            print(f"filled in {time.perf_counter() - started:.2f} s")
            generation = next((root / "zc/default/minilm").glob("[0-9a-f]" * 16))
            demo(generation)
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)


def demo(generation: Path) -> None:
    import torch
    import transformers

    import modelwrapper

    sentences = ["one copy of the weights per node", "every pod shares it"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(generation / "encoder"))
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)

    original = embed(transformers.AutoModel.from_pretrained(str(minilm_dir())).eval())
    started = time.perf_counter()
    mapped = modelwrapper.load(generation)
    print(f"modelwrapper.load(): {type(mapped).__name__} in {(time.perf_counter() - started) * 1e3:.0f} ms")
    in_place = transformers.AutoModel.from_pretrained(str(generation / "encoder")).eval()
    print("zero-copy load equals the original:", torch.equal(embed(mapped), original))
    print("transformers in place equals the original:", torch.allclose(embed(in_place), original, atol=1e-6))


if __name__ == "__main__":
    main()
