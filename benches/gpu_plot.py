"""Plots docs/benchmarks-gpu.json (benches/gpu_load.sh on a GPU machine):
host-to-device GB/s per loader, the pinned-memcpy limit as a line, and
prints the table that docs/benchmarks.md quotes."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Other loaders (grey); every other row is a variant of ours (blue).
OTHERS = {"fastsafetensors", "runai streamer", "load() + .to(cuda)", "safetensors"}
source = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "benchmarks-gpu.json"
doc = json.loads(source.read_text())
results = doc["results"]
limit = results["pinned memcpy"]["gb_per_s"]
rows = [(name, r) for name, r in results.items() if "gb_per_s" in r and name != "pinned memcpy"]
rows.sort(key=lambda x: -x[1]["gb_per_s"])
print(f"{doc['env']['card']}, torch {doc['env']['torch']}, {doc['bytes'] / 1e9:.2f} GB in {doc['tensors']} tensors")
print("| loader | median ms | GB/s | of pinned memcpy |\n|---|---:|---:|---:|")
print(f"| pinned memcpy (the limit) | {results['pinned memcpy']['median_s'] * 1e3:.1f} | {limit:.1f} | 100% |")
for name, r in rows:
    print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['gb_per_s']:.1f} | {r['gb_per_s'] / limit:.0%} |")
fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
names = [n for n, _ in rows][::-1]
ax.barh(names, [r["gb_per_s"] for _, r in rows][::-1], color=["C7" if n in OTHERS else "C0" for n in names])
ax.axvline(limit, color="C3", linestyle="--", label=f"pinned cudaMemcpy {limit:.0f} GB/s")
ax.set_xlabel(f"GB/s, {doc['bytes'] / 1e9:.2f} GB Llama-shaped bf16 from tmpfs to {doc['env']['card']}")
ax.legend(loc="lower right")
fig.tight_layout()
fig.savefig(DOCS / "benchmarks-gpu.png", dpi=110)
print("wrote", DOCS / "benchmarks-gpu.png")
