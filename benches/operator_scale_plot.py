"""Plots docs/benchmarks-operator-scale.json (written by
`cargo bench -p zerocopy-operator --bench scale`): operator requests per
second during the rollout, and prints the table again."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
r = json.loads((DOCS / "benchmarks-operator-scale.json").read_text())
xs = [p[0] for p in r["qps_per_second"]]
ys = [p[1] for p in r["qps_per_second"]]
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.bar(xs, ys, width=0.9)
ax.axvline(r["seconds_to_all_ready"], color="k", linestyle="--", label=f"all Ready ({r['seconds_to_all_ready']:.1f} s)")
ax.set_xlabel("seconds after the wrappers were created")
ax.set_ylabel("operator requests / s")
ax.set_title(f"{r['nodes']} nodes x {r['wrappers']} wrappers: {r['operator_requests']} requests, peak RSS {r['operator_peak_rss_mib']:.0f} MiB")
ax.legend()
fig.tight_layout()
fig.savefig(DOCS / "benchmarks-operator-scale.png", dpi=110)
print(f"| all Ready | {r['seconds_to_all_ready']:.1f} s |\n| requests | {r['operator_requests']} |\n| peak QPS | {r['peak_qps']} |\n"
      f"| steady-state QPS | {r['steady_state_qps']:.1f} |\n| peak RSS | {r['operator_peak_rss_mib']:.0f} MiB |")
print(f"wrote {DOCS / 'benchmarks-operator-scale.png'}")
