"""Plots a JSON file written by `cargo bench -p zerocopy-operator --bench scale`
(default docs/benchmarks-operator-scale.json; or the path given, e.g.
docs/benchmarks-operator-scale-1000x100.json): operator requests per second
during the wrapper rollout and, when the run had ModelTasks, during the task
phase; writes the PNG next to the JSON and prints the table again."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
src = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCS / "benchmarks-operator-scale.json"
r = json.loads(src.read_text())
tasks = r.get("tasks")
fig, axes = plt.subplots(1, 2 if tasks else 1, figsize=(12 if tasks else 7, 3.2), squeeze=False)
ax = axes[0][0]
xs = [p[0] for p in r["qps_per_second"]]
ys = [p[1] for p in r["qps_per_second"]]
ax.bar(xs, ys, width=0.9)
ax.axvline(r["seconds_to_all_ready"], color="k", linestyle="--", label=f"all Ready ({r['seconds_to_all_ready']:.1f} s)")
ax.set_xlabel("seconds after the wrappers were created")
ax.set_ylabel("operator requests / s")
ax.set_title(f"{r['nodes']} nodes x {r['wrappers']} wrappers: {r['operator_requests']} requests", fontsize=10)
ax.legend()
if tasks:
    ax = axes[0][1]
    xs = [p[0] for p in tasks["qps_per_second"]]
    ys = [p[1] for p in tasks["qps_per_second"]]
    ax.bar(xs, ys, width=0.9, color="tab:orange")
    ax.axvline(tasks["seconds_to_all_started"], color="k", linestyle="--",
               label=f"all started ({tasks['seconds_to_all_started']:.1f} s)")
    ax.set_xlabel("seconds after the tasks were created (Jobs complete 15 s after all started)")
    ax.set_title(f"{tasks['tasks']} ModelTasks: {tasks['requests']} requests; "
                 f"{tasks['steady_state_qps_running']:.1f} QPS while running", fontsize=10)
    ax.legend()
fig.suptitle(f"operator peak RSS {r['operator_peak_rss_mib']:.0f} MiB", fontsize=10)
fig.tight_layout()
out = src.with_suffix(".png")
fig.savefig(out, dpi=110)
print(f"| all Ready | {r['seconds_to_all_ready']:.1f} s |\n| requests | {r['operator_requests']} |\n| peak QPS | {r['peak_qps']} |\n"
      f"| steady-state QPS | {r['steady_state_qps']:.1f} |\n| peak RSS | {r['operator_peak_rss_mib']:.0f} MiB |")
if tasks:
    print(f"| tasks all started | {tasks['seconds_to_all_started']:.1f} s |\n"
          f"| tasks steady-state QPS while running | {tasks['steady_state_qps_running']:.1f} |\n"
          f"| tasks all Succeeded after Jobs complete | {tasks['seconds_to_all_succeeded']:.1f} s |")
print(f"wrote {out}")
