"""Prints and plots docs/benchmarks-kuberay.json, written by the ignored test
`bench_seed_workflow_against_ray_zerocopy` in operator/tests/catalog_workflow.rs
(the seed's workflow on four simulated Ray nodes, one actor each, with this
project and with ray-zerocopy 0.2.0 in the same Ray cluster)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
r = json.loads((DOCS / "benchmarks-kuberay.json").read_text())
gib = 2**30
model = r["model_bytes"]
print(f"model {model / gib:.2f} GiB, {r['nodes']} Ray nodes, one actor each\n")
print("| | from_model | all actors loaded | actors' PSS | host memory used | origin sent |")
print("| --- | --- | --- | --- | --- | --- |")
for row in r["rows"]:
    origin = f"{r['zerocopy_origin_bytes'] / model:.2f}x model" if row["label"].startswith("zerocopy") else "not measured"
    print(
        f"| {row['label']} | {row['from_model_s']:.1f} s | {row['all_actors_loaded_s']:.1f} s | "
        f"{row['actors_pss_bytes'] / gib:.2f} GiB | {row['memory_used_bytes'] / gib:.2f} GiB | {origin} |"
    )
fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
labels = [row["label"] for row in r["rows"]]
a.bar(labels, [row["all_actors_loaded_s"] for row in r["rows"]])
a.set_ylabel("s, from_model() to all loaded")
b.bar(labels, [row["memory_used_bytes"] / gib for row in r["rows"]], label="host memory used")
b.axhline(model / gib * r["nodes"], color="k", linestyle="--", label="one copy per node")
b.set_ylabel("GiB")
b.legend(fontsize=8)
for ax in (a, b):
    ax.tick_params(axis="x", labelsize=8)
fig.suptitle(f"seed workflow, {model / gib:.1f} GiB pipeline, {r['nodes']} Ray nodes (simulated cluster, one host)")
fig.tight_layout()
fig.savefig(DOCS / "benchmarks-kuberay.png", dpi=110)
print(f"\nwrote {DOCS / 'benchmarks-kuberay.png'}")
