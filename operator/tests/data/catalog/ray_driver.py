"""The seed's workflow, unchanged but for the import: a Ray driver calls
ModelWrapper.from_model(), Ray Data actors on every node call
model_wrapper.load(), and for_tasks() runs calls as Ray tasks."""

import json
import os
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from catalog_models import TwoStage
from modelwrapper import ModelWrapper  # was: from ray_zerocopy import ModelWrapper


class InferenceActor:
    def __init__(self, model_wrapper):
        self.model = model_wrapper.load()
        catalog = os.environ["MODELWRAPPER_CATALOG"]
        maps = Path("/proc/self/maps").read_text().splitlines()
        weights = {line.split()[-1] for line in maps if line.endswith(".safetensors")}
        self.in_catalog = bool(weights) and all(w.startswith(catalog + "/") for w in weights)
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        with torch.no_grad():
            y = self.model(torch.as_tensor(batch["x"]))
        n = len(batch["x"])
        return {"i": batch["i"], "y": y.numpy(), "node": [self.node] * n, "in_catalog": [self.in_catalog] * n}


def main() -> None:
    shared = Path(os.environ["SHARED_DIR"])
    ray.init()  # RAY_ADDRESS, as KubeRay sets it for a RayJob's driver
    want_nodes = int(os.environ["RAY_NODES"])
    while len([n for n in ray.nodes() if n["Alive"]]) < want_nodes:
        time.sleep(0.5)
    pipeline = TwoStage()
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = pipeline(x)

    started = time.time()
    wrapper = ModelWrapper.from_model(pipeline)
    published = time.time() - started
    ds = ray.data.from_items([{"i": i, "x": x[i].numpy()} for i in range(len(x))])
    rows = ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={"model_wrapper": wrapper},
        concurrency=int(os.environ["RAY_WORKERS"]),
        num_cpus=2,
        batch_size=4,
    ).take_all()
    rows.sort(key=lambda r: r["i"])
    y = torch.as_tensor(np.stack([r["y"] for r in rows]))

    # And one actor pinned to each worker node (Ray Data may hand all the
    # batches to the actors that started first): every node loads.
    workers = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != ray.get_runtime_context().get_node_id()]
    pinned = [
        ray.remote(num_cpus=2)(InferenceActor)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote(wrapper)
        for node in workers
    ]
    per_node = ray.get([a.__call__.remote({"i": np.arange(len(x)), "x": x.numpy()}) for a in pinned])
    for a in pinned:
        ray.kill(a)

    wrapped = ModelWrapper.for_tasks(pipeline)
    with torch.no_grad():
        via_tasks = wrapped(x)
    result = {
        "rows": len(rows),
        "equal": bool(torch.equal(y, expected)),
        "tasks_equal": bool(torch.equal(via_tasks, expected)),
        "actor_nodes": sorted({r["node"] for r in rows}),
        "pinned_nodes": sorted({b["node"][0] for b in per_node}),
        "pinned_equal": all(torch.equal(torch.as_tensor(b["y"]), expected) for b in per_node),
        "pinned_in_catalog": all(bool(b["in_catalog"][0]) for b in per_node),
        "driver_node": ray.get_runtime_context().get_node_id(),
        "all_in_catalog": all(bool(r["in_catalog"]) for r in rows),
        "from_model_seconds": published,
        "total_seconds": time.time() - started,
    }
    tmp = shared / ".ray-result.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(shared / "ray-result.json")


if __name__ == "__main__":
    main()
