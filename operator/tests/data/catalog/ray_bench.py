"""Benchmark driver (operator/tests/catalog_workflow.rs, ignored test
`bench_seed_workflow_against_ray_zerocopy`): the seed's workflow with one
actor per Ray node, run with modelwrapper (zerocopy) and with ray-zerocopy
0.2.0 in the same Ray cluster, one after the other."""

import json
import os
import time
from pathlib import Path

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn


class BigPipeline:
    def __init__(self, total_mb: int) -> None:
        side = int((total_mb * 2**20 / 4 / 2) ** 0.5)
        torch.manual_seed(0)
        self.encoder = nn.Linear(side, side, bias=False)
        self.decoder = nn.Linear(side, side, bias=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


@ray.remote(num_cpus=2)
class Actor:
    def __init__(self, model_wrapper) -> None:
        self.model = model_wrapper.load()

    def pss(self) -> int:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
        return 0


def run(label: str, wrapper_cls, pipeline: BigPipeline, nodes: list[str]) -> dict:
    time.sleep(2)
    before = mem_available()
    started = time.time()
    wrapper = wrapper_cls.from_model(pipeline)
    published = time.time() - started
    actors = [
        Actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(wrapper) for n in nodes
    ]
    pss = ray.get([a.pss.remote() for a in actors])
    loaded = time.time() - started
    time.sleep(2)
    used = before - mem_available()
    for a in actors:
        ray.kill(a)
    return {
        "label": label,
        "from_model_s": round(published, 2),
        "all_actors_loaded_s": round(loaded, 2),
        "actors_pss_bytes": sum(pss),
        "memory_used_bytes": used,
    }


def main() -> None:
    shared = Path(os.environ["SHARED_DIR"])
    ray.init()
    want = int(os.environ["RAY_NODES"])
    while len([n for n in ray.nodes() if n["Alive"]]) < want:
        time.sleep(0.5)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    pipeline = BigPipeline(int(os.environ.get("BENCH_MB", "1024")))
    model_bytes = sum(p.numel() * p.element_size() for m in (pipeline.encoder, pipeline.decoder) for p in m.parameters())
    from modelwrapper import ModelWrapper as Zerocopy
    from ray_zerocopy import ModelWrapper as RayZerocopy

    rows = [run("zerocopy (this project)", Zerocopy, pipeline, nodes)]
    rows.append(run("ray-zerocopy 0.2.0", RayZerocopy, pipeline, nodes))
    out = {"model_bytes": model_bytes, "nodes": len(nodes), "rows": rows}
    tmp = shared / ".bench.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(shared / "bench.json")


if __name__ == "__main__":
    main()
