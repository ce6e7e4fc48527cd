"""Quickstart: one copy of the weights in shared memory, four processes using it.

1. build a deterministic two-component demo pipeline and export it
   (safetensors + skeletons + a ModelWrapper YAML);
2. fill it into local shared memory with `zerocopy-node-agent standalone`;
3. start 4 worker processes that each `modelwrapper.load()` it and run inference;
4. print per-process memory (from /proc/<pid>/smaps_rollup) and load times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import modelwrapper  # noqa: E402
from demo_pipeline import DemoPipeline  # noqa: E402

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch, modelwrapper
    sys.path.insert(0, sys.argv[2])
    from demo_pipeline import DemoPipeline  # the pipeline skeleton needs its class
    t0 = time.perf_counter()
    pipe = modelwrapper.load(sys.argv[1])
    t1 = time.perf_counter()
    with torch.no_grad():
        out = pipe(DemoPipeline.example_input(pipe))
    t2 = time.perf_counter()
    print(json.dumps({"pid": os.getpid(), "load_ms": (t1 - t0) * 1e3, "forward_ms": (t2 - t1) * 1e3,
                      "checksum": float(out.double().sum())}), flush=True)
    sys.stdin.readline()
    """
)


def memory(pid: int, volume: Path) -> dict[str, int]:
    """PSS and USS of the whole process (smaps_rollup), and PSS of the weights' mappings (smaps)."""
    roll = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        roll[key.rstrip(":")] = int(value) * 1024
    weights_pss, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if not parts[0].endswith(":"):
            current = len(parts) >= 6 and parts[5].startswith(str(volume))
        elif current and parts[0] == "Pss:":
            weights_pss += int(parts[1]) * 1024
    return {"pss": roll["Pss"], "uss": roll["Private_Clean"] + roll["Private_Dirty"], "weights_pss": weights_pss}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default="target/release/zerocopy-node-agent", help="node agent binary")
    ap.add_argument("--root", default="/dev/shm/zerocopy", help="volume root (shared memory)")
    ap.add_argument("--workdir", default="/tmp/zerocopy-quickstart", help="where the export goes")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--depth", type=int, default=9, help="layers per component (9 = ~151 MB each)")
    args = ap.parse_args()

    print(f"1/4 building the demo pipeline and exporting it to {args.workdir}/export")
    pipe = DemoPipeline(depth=args.depth)
    with torch.no_grad():
        reference = float(pipe(pipe.example_input()).double().sum())
    exported = modelwrapper.export(pipe, Path(args.workdir) / "export", name="demo", namespace="quickstart")
    del pipe
    print(f"    wrote {exported.yaml_path}")

    print(f"2/4 filling it into shared memory under {args.root} (zerocopy-node-agent standalone)")
    fill = subprocess.run([args.agent, "--root", args.root, "standalone", "-f", str(exported.yaml_path)], text=True)
    if fill.returncode != 0:
        print("the fill failed; see the message above", file=sys.stderr)
        return fill.returncode
    status = json.loads(subprocess.run([args.agent, "--root", args.root, "status", "--json"], capture_output=True, text=True, check=True).stdout)
    volume = next(Path(g["path"]) for g in status if g["namespace"] == "quickstart" and g["name"] == "demo" and g["state"] == "Ready")
    model_bytes = sum(f.stat().st_size for f in volume.iterdir())

    print(f"3/4 starting {args.workers} workers that load() {volume} and run inference")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(volume), str(HERE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(args.workers)
    ]
    try:
        results = [json.loads(p.stdout.readline()) for p in procs]
        mem = [memory(p.pid, volume) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()

    print("4/4 results\n")
    header = f"{'worker':>6} {'pid':>8} {'load ms':>8} {'forward ms':>10} {'PSS MiB':>9} {'USS MiB':>9} {'weights PSS MiB':>15}  output"
    print(header)
    print("-" * len(header))
    for i, (r, m) in enumerate(zip(results, mem)):
        ok = "matches" if abs(r["checksum"] - reference) <= 1e-6 * max(1.0, abs(reference)) else f"DIFFERS ({r['checksum']} vs {reference})"
        print(f"{i:>6} {r['pid']:>8} {r['load_ms']:>8.1f} {r['forward_ms']:>10.1f} {mib(m['pss']):>9} {mib(m['uss']):>9} {mib(m['weights_pss']):>15}  {ok}")
    print("-" * len(header))
    print(f"{'sum':>6} {'':>8} {'':>8} {'':>10} {mib(sum(m['pss'] for m in mem)):>9} {mib(sum(m['uss'] for m in mem)):>9} {mib(sum(m['weights_pss'] for m in mem)):>15}")
    print(f"\nmodel size: {mib(model_bytes)} MiB, held once in shared memory; "
          f"{args.workers} private copies would have been {mib(args.workers * model_bytes)} MiB.")
    print(f"weights PSS summed over the workers: {mib(sum(m['weights_pss'] for m in mem))} MiB "
          f"({sum(m['weights_pss'] for m in mem) / model_bytes:.2f} x the model)")
    bad = [r for r in results if abs(r["checksum"] - reference) > 1e-6 * max(1.0, abs(reference))]
    print_what_stays(args, status, volume, model_bytes)
    return 1 if bad else 0


def print_what_stays(args: argparse.Namespace, status: list[dict], volume: Path, model_bytes: int) -> None:
    """The workers have exited, but the generation the agent filled stays in
    shared memory (RAM) until someone removes it: say what and how."""
    backing = next((g.get("backing") for g in status if Path(g["path"]) == volume), "directory")
    wrapper_dir = volume.parent.parent  # <root>/quickstart
    print(f"\nstill in shared memory after this script: {volume} ({mib(model_bytes)} MiB of RAM, "
          f"{'its own tmpfs mount' if backing == 'tmpfs' else 'a read-only directory'}).")
    print("  The node agent filled it and keeps it, so the next run finds it up to date; no process maps it any more.")
    print("  The standalone agent removes a generation only when a later run no longer wants it, so free it by hand:")
    if backing == "tmpfs":
        print(f"    umount {volume}    # as root")
    else:
        print(f"    chmod -R u+w {wrapper_dir}")
    print(f"    rm -rf {wrapper_dir}")
    print(f"  The export it was filled from is ordinary files in {Path(args.workdir) / 'export'} (rm -rf {args.workdir}).")
    print("  This script did not use ModelWrapper.from_model(); what that publishes (under $MODELWRAPPER_ROOT/local) "
          "is freed by `python -m modelwrapper gc` once no process uses it.")


if __name__ == "__main__":
    raise SystemExit(main())
