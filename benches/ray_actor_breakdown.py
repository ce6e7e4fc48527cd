"""A new Ray actor on a warm node, from `.remote()` to its first output,
split into: Ray starting the worker process, `import torch`, `import
modelwrapper`, `load()` and the first forward pass (against a second one).

The volume is the Llama-shaped model published by `from_model()` once; Ray
runs locally (one node, the driver's). Each actor is a new worker process,
so every row is a cold start of that worker. Prints a table, writes --json.

    python3 benches/ray_actor_breakdown.py --actors 3 --json docs/benchmarks-actor.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    sys.path.insert(0, str(BENCHES))
    import llama_shaped
    import modelwrapper
    import ray

    wrapper = modelwrapper.ModelWrapper.from_model(llama_shaped.uninitialised(layers=args.layers))
    path = str(wrapper.path)
    nbytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(BENCHES), os.environ.get("PYTHONPATH", "")])}},
    )

    @ray.remote(num_cpus=0)
    class Actor:
        def __init__(self, path: str):
            # No module-level imports: this class's module is the driver's,
            # so torch and modelwrapper load here, inside the worker.
            self.marks = {"init": time.time()}
            import torch

            self.marks["torch"] = time.time()
            import modelwrapper

            self.marks["modelwrapper"] = time.time()
            self.model = modelwrapper.load(path)
            self.marks["load"] = time.time()
            ids = torch.randint(0, 32000, (1, 8))
            with torch.no_grad():
                self.model(ids)
                self.marks["first_forward"] = time.time()
                self.model(ids)
                self.marks["second_forward"] = time.time()

        def marks_(self) -> dict[str, float]:
            return self.marks

    rows = []
    for _ in range(args.actors):
        requested = time.time()
        actor = Actor.remote(path)
        marks = ray.get(actor.marks_.remote())
        ready = time.time()
        rows.append(
            {
                "ray worker start s": marks["init"] - requested,
                "import torch s": marks["torch"] - marks["init"],
                "import modelwrapper s": marks["modelwrapper"] - marks["torch"],
                "load() s": marks["load"] - marks["modelwrapper"],
                "first forward s": marks["first_forward"] - marks["load"],
                "second forward s": marks["second_forward"] - marks["first_forward"],
                "created to ready s": ready - requested,
            }
        )
        ray.kill(actor)
        print({k: round(v * 1e3, 1) for k, v in rows[-1].items()}, flush=True)
    ray.shutdown()
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nLlama-shaped, {args.layers} layers, {nbytes / 1e9:.2f} GB bf16; medians of {len(rows)} new actors\n")
    print("| step | median ms |\n|---|---:|")
    for k, v in median.items():
        print(f"| {k.removesuffix(' s')} | {v * 1e3:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"bytes": nbytes, "layers": args.layers, "rows": rows, "median": median}, indent=1))
    wrapper.release()


if __name__ == "__main__":
    main()
