"""Ray actors sharing one ~1 GB pipeline, three ways, two topologies.

  (a) safetensors: every actor loads its own private copy from a file
  (b) ray-zerocopy 0.2.0: ModelWrapper.from_model in the driver, load() in the actor
  (c) modelwrapper: load() from a volume filled once by zerocopy-node-agent

Topologies: one Ray node with N actors, and N Ray nodes on this machine
(ray.cluster_utils.Cluster: one raylet and object store each, as KubeRay runs
one per worker pod) with one actor each. Every Ray process stays on 127.0.0.1.

Prints a table and writes docs/benchmarks-ray.json and a PNG plot.

    python3 benches/ray_actors.py --size-mb 1024 --actors 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Keep every Ray process on 127.0.0.1: without this, ray.init(address=...)
# rewrites a loopback address to the host's interface address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))

import ray  # noqa: E402
from bench_model import BenchPipeline  # noqa: E402


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def rollup(pid: int) -> tuple[int, int]:
    vals = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v, *_ = line.split()
        vals[k.rstrip(":")] = int(v) * 1024
    return vals["Pss"], vals["Private_Clean"] + vals["Private_Dirty"]


def raylet_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@ray.remote(num_cpus=1)
class Worker:
    def __init__(self, how: str, arg, created: float, index: int):
        import time as _t

        import torch as _torch

        # imports stay outside the timed region: every approach pays them alike
        import modelwrapper  # noqa: F401
        from safetensors.torch import load_file

        sys.path.insert(0, str(REPO / "benches"))
        from bench_model import BenchPipeline as _P

        t0 = _t.perf_counter()
        if how == "safetensors":
            # each actor reads its own copy, as each pod would download its own
            pipe = _P.empty(arg["size_mb"])
            for name in ("first", "second"):
                getattr(pipe, name).load_state_dict(load_file(f"{arg['dir']}/actor{index}/{name}.safetensors"), assign=True)
            self.model = pipe
        elif how == "ray-zerocopy":
            self.model = arg.load()
        else:
            self.model = modelwrapper.load(arg)
        self.load_s = _t.perf_counter() - t0
        x = _torch.ones(8, 1024)
        with _torch.no_grad():
            t1 = _t.perf_counter()
            self.model(x)
            t2 = _t.perf_counter()
            self.model(x)
            t3 = _t.perf_counter()
        self.fwd1, self.fwd2 = t2 - t1, t3 - t2
        self.ready_s = _t.time() - created

    def report(self):
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "load_s": self.load_s,
                "ready_s": self.ready_s, "fwd1_s": self.fwd1, "fwd2_s": self.fwd2}


def start(topology: str, actors: int, store_bytes: int):
    common = dict(include_dashboard=False)
    # the pipeline skeleton pickles a class from benches/bench_model.py
    env = {"env_vars": {"PYTHONPATH": str(REPO / "benches")}}
    if topology == "1 node":
        ray.init(num_cpus=actors, object_store_memory=store_bytes, _node_ip_address="127.0.0.1", runtime_env=env, **common)
        return None
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store_bytes, "node_ip_address": "127.0.0.1", **common})
    for _ in range(actors - 1):
        cluster.add_node(num_cpus=1, object_store_memory=store_bytes, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", runtime_env=env)
    cluster.wait_for_nodes()
    return cluster


def run_case(topology: str, how: str, actors: int, size_mb: int, files_dir: Path, volume: Path) -> dict:
    gc.collect()
    before = mem_available()
    cluster = start(topology, actors, store_bytes=int(size_mb * 1.6) << 20)
    driver_model = None
    try:
        if how == "safetensors":
            arg = {"dir": str(files_dir), "size_mb": size_mb}
        elif how == "ray-zerocopy":
            from ray_zerocopy import ModelWrapper as PeerWrapper

            driver_model = BenchPipeline(size_mb)
            arg = PeerWrapper.from_model(driver_model, mode="actor")
        else:
            arg = str(volume)
        created = time.time()
        handles = [Worker.options(scheduling_strategy="SPREAD").remote(how, arg, created, i) for i in range(actors)]
        reports = ray.get([h.report.remote() for h in handles])
        mem = [rollup(r["pid"]) for r in reports]
        raylets = [rollup(p)[0] for p in raylet_pids()]
        driver = rollup(os.getpid())
        after = mem_available()
        # a new actor joining a warm node: the cost a scale-up pays
        extra = Worker.options(num_cpus=0).remote(how, arg, time.time(), 0)
        new_actor = ray.get(extra.report.remote())
        return {
            "topology": topology, "approach": how, "actors": actors,
            "nodes": len({r["node"] for r in reports}),
            "ready_ms": [r["ready_s"] * 1e3 for r in reports],
            "load_ms": [r["load_s"] * 1e3 for r in reports],
            "fwd1_ms": [r["fwd1_s"] * 1e3 for r in reports],
            "fwd2_ms": [r["fwd2_s"] * 1e3 for r in reports],
            "actors_pss": sum(m[0] for m in mem), "actors_uss": sum(m[1] for m in mem),
            "raylets_pss": sum(raylets), "driver_pss": driver[0],
            "memavailable_drop": before - after,
            "new_actor_load_ms": new_actor["load_s"] * 1e3,
            "new_actor_ready_ms": new_actor["ready_s"] * 1e3,
        }
    finally:
        del driver_model
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        time.sleep(2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--agent", default=str(REPO / "target/release/zerocopy-node-agent"))
    ap.add_argument("--work", default="/dev/shm/zerocopy-bench")
    ap.add_argument("--copies", default="/var/tmp/zerocopy-bench-copies", help="per-actor files of the safetensors baseline (on disk)")
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args()

    import modelwrapper

    work = Path(args.work)
    pipe = BenchPipeline(args.size_mb)
    exported = modelwrapper.export(pipe, work / "export", name="bench")
    del pipe
    gc.collect()
    fill = subprocess.run([args.agent, "--root", str(work / "root"), "standalone", "-q", "-f", str(exported.yaml_path)], capture_output=True, text=True)
    if fill.returncode:
        print(fill.stdout, fill.stderr)
        return 1
    status = json.loads(subprocess.run([args.agent, "--root", str(work / "root"), "status", "--json"], capture_output=True, text=True, check=True).stdout)
    volume = Path(status[0]["path"])
    model_bytes = sum(f.stat().st_size for f in volume.glob("*.safetensors"))

    # per-actor private copies for the safetensors baseline, on disk (page cache)
    copies = Path(args.copies)
    for i in range(args.actors):
        (copies / f"actor{i}").mkdir(parents=True, exist_ok=True)
        for name in ("first", "second"):
            src = work / "export" / f"{name}.safetensors"
            subprocess.run(["cp", str(src), str(copies / f"actor{i}" / src.name)], check=True)

    rows = []
    for topology in ("1 node", f"{args.actors} nodes"):
        for how in ("safetensors", "ray-zerocopy", "modelwrapper"):
            print(f"running {topology} / {how} ...", flush=True)
            rows.append(run_case(topology, how, args.actors, args.size_mb, copies, volume))
    subprocess.run(["rm", "-rf", str(copies)], check=False)
    Path(args.out, "benchmarks-ray.json").write_text(json.dumps({"model_bytes": model_bytes, "rows": rows}, indent=1))
    print_table(rows, model_bytes)
    plot(rows, model_bytes, Path(args.out) / "benchmarks-ray.png")
    return 0


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_table(rows: list[dict], model_bytes: int) -> None:
    print(f"\nmodel: {gib(model_bytes)} GiB\n")
    head = "| topology | approach | nodes | ready ms (max) | load ms (mean) | new actor load ms | 1st fwd ms | 2nd fwd ms | actors PSS GiB | actors USS GiB | raylets PSS GiB | driver PSS GiB | MemAvailable drop GiB |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for r in rows:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"| {r['topology']} | {r['approach']} | {r['nodes']} | {max(r['ready_ms']):.0f} | {mean(r['load_ms']):.1f} | {r['new_actor_load_ms']:.1f} | {mean(r['fwd1_ms']):.0f} | {mean(r['fwd2_ms']):.0f} | "
              f"{gib(r['actors_pss'])} | {gib(r['actors_uss'])} | {gib(r['raylets_pss'])} | {gib(r['driver_pss'])} | {gib(r['memavailable_drop'])} |")


def plot(rows: list[dict], model_bytes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['topology']}\n{r['approach']}" for r in rows]
    xs = range(len(rows))
    ax1.bar(xs, [(r["actors_pss"] + r["raylets_pss"]) / 2**30 for r in rows], color=["#999", "#c84", "#48c"] * 2)
    ax1.axhline(model_bytes / 2**30, color="k", ls="--", lw=1, label="one copy of the model")
    ax1.set_xticks(list(xs), labels, fontsize=7)
    ax1.set_ylabel("GiB")
    ax1.set_title("PSS of the actors + raylets (object stores)")
    ax1.legend()
    ax2.bar(xs, [r["new_actor_load_ms"] for r in rows], color=["#999", "#c84", "#48c"] * 2)
    ax2.set_yscale("log")
    ax2.set_xticks(list(xs), labels, fontsize=7)
    ax2.set_ylabel("ms (log)")
    ax2.set_title("load time of a new actor on a warm node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
