"""CPU loads of the Llama-shaped model (32 layers, 291 tensors, 3.55 GB
bf16), side by side in one run, each in a fresh process (a new worker):

  floor                  mmap + one view per tensor, nothing else
  modelwrapper.load()    the zero-copy load (module built, weights bound)
  safetensors + assign   safetensors.torch.load_file + load_state_dict(assign=True)
                         on a meta-device model (what users write today)
  fastsafetensors cpu    SafeTensorsFileLoader(device="cpu", nogds=True)

then the first forward pass (one token) after a lazy load, after prefault=True and
after prefault="background" (once it finished), against a second forward,
and the import times. Prints a table, writes --json (docs/benchmarks-cpu.json).

    python3 benches/load_cpu.py --json docs/benchmarks-cpu.json

``--loaders floor,modelwrapper.load() --no-forward`` measures only those rows
(seconds, and no 3.55 GB copies per process); ``--baseline DIR`` adds a row
for another modelwrapper's load() (DIR holds its package, e.g. from
``git archive <commit> python | tar -x -C /tmp/base``, then DIR is
/tmp/base/python) of a volume its own export() wrote, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent

PRELUDE = textwrap.dedent(
    """
    import json, mmap, os, sys, time, warnings
    t_start = time.perf_counter()
    import torch
    t_torch = time.perf_counter()
    import modelwrapper
    t_mw = time.perf_counter()
    sys.path.insert(0, {benches!r})
    import llama_shaped
    path = sys.argv[1]
    weights = os.path.join(path, "model.safetensors")
    """
)

LOADERS = {
    "floor": """
        t0 = time.perf_counter()
        with open(weights, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        n = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8 : 8 + n])
        header.pop("__metadata__", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torch.frombuffer(mm, dtype=torch.uint8)
        out = {k: base[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]].view(torch.bfloat16).view(v["shape"]) for k, v in header.items()}
        t1 = time.perf_counter()
    """,
    "modelwrapper.load()": """
        t0 = time.perf_counter()
        out = modelwrapper.load(path)
        t1 = time.perf_counter()
    """,
    "safetensors + assign": """
        from safetensors.torch import load_file
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = llama_shaped.LlamaShaped().to(torch.bfloat16)
        model.load_state_dict(load_file(weights), assign=True)
        out = model.eval()
        t1 = time.perf_counter()
    """,
    "fastsafetensors cpu": """
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup
        t0 = time.perf_counter()
        loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
        loader.add_filenames({0: [weights]})
        buffer = loader.copy_files_to_device()
        out = {k: buffer.get_tensor(k) for k in loader.get_keys()}
        t1 = time.perf_counter()
    """,
}

FORWARD = """
    mode = sys.argv[2]
    ids = torch.randint(0, 32000, (1, 1))  # one token: a decode step, bound by reading the weights
    t0 = time.perf_counter()
    model = modelwrapper.load(path, prefault={"lazy": False, "prefault": True, "background": "background"}[mode])
    t1 = time.perf_counter()
    if mode == "background":
        modelwrapper.wait_for_prefault()
    t2 = time.perf_counter()
    with torch.no_grad():
        model(ids)
        t3 = time.perf_counter()
        model(ids)
        t4 = time.perf_counter()
"""


def child(body: str, path: Path, *args: str, pythonpath: Path | None = None) -> dict[str, float]:
    code = PRELUDE.format(benches=str(BENCHES)) + textwrap.dedent(body)
    code += "\nprint(json.dumps({k: v for k, v in globals().items() if k.startswith('t') and isinstance(v, float)}))\n"
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", code, str(path), *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


BASELINE_EXPORT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {benches!r})
import llama_shaped, modelwrapper
from modelwrapper._local import _manifest
out = Path(sys.argv[1])
exported = modelwrapper.export(llama_shaped.uninitialised(), out, name="baseline")
(out / "manifest.json").write_text(json.dumps(_manifest(exported, name="baseline", generation="0123456789abcdef", mode="actor")))
"""


def baseline_volume(package: Path) -> Path:
    """The model exported by the modelwrapper in ``package`` (its own
    skeleton encoding), as a volume in /dev/shm without the agent."""
    import shutil

    out = Path("/dev/shm/zerocopy-bench-baseline")
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", BASELINE_EXPORT.format(benches=str(BENCHES)), str(out)], check=True, env=env)
    return out


def huge_page_volume(model: Any, agent: str) -> tuple[Path, int, Path] | None:
    """The same model filled by the node agent with memory.hugePages: true
    (tmpfs huge=within_size); returns (volume, ShmemHugePages kB granted, root)."""
    import shutil

    import yaml

    import modelwrapper

    if not Path(agent).exists():
        print(f"no agent at {agent}: skipping the huge-page rows (cargo build -p zerocopy-node-agent)", flush=True)
        return None
    work = Path("/var/tmp/zerocopy-bench-huge")
    shutil.rmtree(work, ignore_errors=True)
    exported = modelwrapper.export(model, work, name="llama-huge")
    doc = yaml.safe_load(exported.yaml_path.read_text())
    doc["spec"]["memory"] = {"hugePages": True}
    exported.yaml_path.write_text(yaml.safe_dump(doc))
    root = Path("/dev/shm/zerocopy-bench-huge")
    before = _shmem_huge_kb()
    subprocess.run([agent, "--root", str(root), "standalone", "-q", "-f", str(exported.yaml_path)], check=True, capture_output=True)
    granted = _shmem_huge_kb() - before
    status = subprocess.run([agent, "--root", str(root), "status", "--json"], check=True, capture_output=True, text=True)
    shutil.rmtree(work, ignore_errors=True)
    volume = Path(json.loads(status.stdout)[0]["path"])
    print(f"huge-page volume: {volume}, {granted / 1024:.0f} MiB of huge pages granted", flush=True)
    return volume, granted, root


def _shmem_huge_kb() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("ShmemHugePages:"))
    return int(line.split()[1])


def clear_root(root: Path) -> None:
    """Unmounts the generations under ``root`` (deepest first), then deletes it."""
    import shutil

    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--agent",
        default=os.environ.get("ZEROCOPY_AGENT_BIN", "/var/tmp/zerocopy-ci-target/debug/zerocopy-node-agent"),
        help="zerocopy-node-agent, for the huge-page rows ('' to skip them)",
    )
    ap.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated rows to measure (of: {', '.join(LOADERS)})")
    ap.add_argument("--no-forward", action="store_true", help="skip the first-forward rows (and the huge-page volume)")
    ap.add_argument("--baseline", type=Path, help="a directory holding another modelwrapper package: adds its load() as a row")
    args = ap.parse_args()
    loaders = [x for x in args.loaders.split(",") if x]
    unknown = [x for x in loaders if x not in LOADERS]
    if unknown:
        ap.error(f"unknown loaders {unknown}; choose from {list(LOADERS)}")

    sys.path.insert(0, str(BENCHES))
    import llama_shaped
    import modelwrapper

    model = llama_shaped.uninitialised()
    wrapper = modelwrapper.ModelWrapper.from_model(model)
    huge = huge_page_volume(model, args.agent) if args.agent and not args.no_forward else None
    del model
    path = wrapper.path
    print(f"volume: {path} ({(path / 'model.safetensors').stat().st_size / 1e9:.2f} GB)", flush=True)
    results: dict[str, dict] = {}
    # (row, body, volume, package): the rows alternate within each repetition,
    # so a busy moment of the machine falls on all of them alike.
    rows = [(name, LOADERS[name], path, None) for name in loaders]
    baseline = None
    if args.baseline is not None:
        baseline = baseline_volume(args.baseline.resolve())
        rows.append(("modelwrapper.load() baseline", LOADERS["modelwrapper.load()"], baseline, args.baseline.resolve()))
    measured: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in rows}
    failed: dict[str, str] = {}
    for _ in range(args.reps):
        for name, body, volume, package in rows:
            if name in failed:
                continue
            try:
                measured[name].append(child(body, volume, pythonpath=package))
            except RuntimeError as e:
                failed[name] = str(e)
    for name, *_ in rows:
        runs = measured[name]
        if name in failed:
            results[name] = {"error": failed[name][-300:]}
            print(f"{name:24s} failed: {failed[name][-200:]}", flush=True)
            continue
        ms = [(r["t1"] - r["t0"]) * 1e3 for r in runs]
        results[name] = {"ms": ms, "median_ms": statistics.median(ms)}
        print(f"{name:24s} median {statistics.median(ms):9.2f} ms  runs {[round(x, 2) for x in ms]}", flush=True)
        if name == "floor":
            imports = {
                "import torch ms": statistics.median((r["t_torch"] - r["t_start"]) * 1e3 for r in runs),
                "import modelwrapper ms": statistics.median((r["t_mw"] - r["t_torch"]) * 1e3 for r in runs),
            }
            results["imports"] = imports
            print("imports:", {k: round(v, 1) for k, v in imports.items()}, flush=True)

    volumes = [] if args.no_forward else [("", path, m) for m in ("lazy", "prefault", "background")]
    if huge is not None:
        volumes += [("huge pages, ", huge[0], m) for m in ("lazy", "background")]
    for pages, volume, mode in volumes:
        runs = [child(FORWARD, volume, mode) for _ in range(args.reps)]
        row = {
            "load_ms": statistics.median((r["t1"] - r["t0"]) * 1e3 for r in runs),
            "prefault_wait_ms": statistics.median((r["t2"] - r["t1"]) * 1e3 for r in runs),
            "first_forward_ms": statistics.median((r["t3"] - r["t2"]) * 1e3 for r in runs),
            "second_forward_ms": statistics.median((r["t4"] - r["t3"]) * 1e3 for r in runs),
        }
        row["first_over_second"] = row["first_forward_ms"] / row["second_forward_ms"]
        results[f"forward after {pages}{mode} load"] = row
        print(f"forward after {pages}{mode:10s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    if huge is not None:
        results["huge pages granted kB"] = huge[1]
        clear_root(huge[2])

    floor = results.get("floor", {}).get("median_ms")
    print("\n| loader | median ms | x floor |\n|---|---:|---:|")
    for name, *_ in rows:
        r = results.get(name, {})
        if "median_ms" in r:
            print(f"| {name} | {r['median_ms']:.2f} | {r['median_ms'] / floor:.2f}x |" if floor else f"| {name} | {r['median_ms']:.2f} | |")
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=1))
    wrapper.release()
    if baseline is not None:
        import shutil

        shutil.rmtree(baseline, ignore_errors=True)


if __name__ == "__main__":
    main()
