"""What the simulated pods run: `driver` publishes with from_model(), `worker`
loads on its node, `list` shows its catalog. Results go to $SHARED_DIR."""

import json
import os
import pickle
import sys
import time
from pathlib import Path

import torch

from catalog_models import TwoStage
from modelwrapper import ModelWrapper

shared = Path(os.environ["SHARED_DIR"])
pod = os.environ["POD_NAME"]
catalog = Path(os.environ["MODELWRAPPER_CATALOG"])


def write(name: str, value: object) -> None:
    tmp = shared / f".{name}.tmp"
    tmp.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
    tmp.rename(shared / name)


def wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.1)


def mapped_weights() -> list[str]:
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if line.endswith(".safetensors")})


def main() -> None:
    role = sys.argv[1]
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    if role == "driver":
        pipe = TwoStage()
        owner = json.loads(os.environ["OWNER"]) if os.environ.get("OWNER") else None
        started = time.time()
        wrapper = ModelWrapper.from_model(pipe, owner=owner)
        with torch.no_grad():
            expected = pipe(x)
        tasks = ModelWrapper.for_tasks(pipe)
        with torch.no_grad():
            via_tasks = tasks(x)
        write("expected.pt.bin", pickle.dumps(expected))
        write(
            "driver.json",
            {
                "seconds": time.time() - started,
                "wrapper": repr(wrapper),
                "pickle_bytes": len(pickle.dumps(wrapper)),
                "tasks_equal": bool(torch.equal(via_tasks, expected)),
            },
        )
        write("wrapper.pkl", pickle.dumps(wrapper))
    elif role == "worker":
        wait_for(shared / "wrapper.pkl")
        wrapper = pickle.loads((shared / "wrapper.pkl").read_bytes())
        model = wrapper.load()
        with torch.no_grad():
            out = model(x)
        wait_for(shared / "expected.pt.bin")
        expected = pickle.loads((shared / "expected.pt.bin").read_bytes())
        write(
            f"result-{pod}.json",
            {
                "pid": os.getpid(),
                "equal": bool(torch.equal(out, expected)),
                "mapped": mapped_weights(),
                "catalog": str(catalog),
            },
        )
    elif role == "list":
        write(f"list-{pod}.json", sorted(os.listdir(catalog)))
    while True:  # pods keep running (and mapping) until deleted
        time.sleep(3600)


if __name__ == "__main__":
    main()
