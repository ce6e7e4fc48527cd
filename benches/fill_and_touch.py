"""Fill throughput against `cp`, first touch with and without huge pages, and
load() time of a large pipeline — side by side in one run.

    python3 benches/fill_and_touch.py --size-mb 1024 --load-size-mb 2048

Prints a table and writes docs/benchmarks-fill.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))

TOUCH = textwrap.dedent(
    """
    import sys, time, torch, modelwrapper
    t0 = time.perf_counter()
    pipe = modelwrapper.load(sys.argv[1], prefault=sys.argv[2] == "prefault")
    t1 = time.perf_counter()
    total = 0.0
    for comp in (pipe.first, pipe.second):
        for p in comp.parameters():
            total += float(p[:, ::1024].sum())  # one float per 4 KiB row: touches every page
    t2 = time.perf_counter()
    print((t1 - t0) * 1e3, (t2 - t1) * 1e3)
    """
)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


def agent_fill(agent: str, root: Path, yaml_path: Path) -> float:
    t0 = time.perf_counter()
    run([agent, "--root", str(root), "standalone", "-q", "-f", str(yaml_path)])
    return time.perf_counter() - t0


def volume_of(agent: str, root: Path) -> Path:
    return Path(json.loads(run([agent, "--root", str(root), "status", "--json"]).stdout)[0]["path"])


def clear(root: Path) -> None:
    """Unmounts every generation under ``root`` (deepest first), then deletes it."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{root}/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=True)
    shutil.rmtree(root)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--load-size-mb", type=int, default=2048)
    ap.add_argument("--agent", default=str(REPO / "target/release/zerocopy-node-agent"))
    ap.add_argument("--work", default="/var/tmp/zerocopy-bench-fill")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args()

    import modelwrapper
    import yaml
    from bench_model import BenchPipeline

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"  # on disk, read through the page cache, as cp reads it
    exported = modelwrapper.export(BenchPipeline(args.size_mb), src, name="fill")
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors")) + sum(f.stat().st_size for f in src.glob("*.pt"))
    # warm the page cache for both contenders
    for f in src.iterdir():
        f.read_bytes()

    results: dict[str, object] = {"source_bytes": src_bytes}
    fill_s, cp_s = [], []
    for _ in range(args.repeat):
        dst = Path("/dev/shm/zerocopy-bench-cp")
        dst.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        run(["cp", *[str(f) for f in sorted(src.glob("*.safetensors"))], *[str(f) for f in sorted(src.glob("*.pt"))], str(dst)])
        cp_s.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
        root = work / "root"
        fill_s.append(agent_fill(args.agent, root, exported.yaml_path))
        clear(root)
    results["cp_s"], results["fill_s"] = cp_s, fill_s

    # first touch: 4 KiB pages vs huge pages, fresh process each time
    touch = {}
    for huge in (False, True):
        doc = yaml.safe_load(exported.yaml_path.read_text())
        doc["spec"]["memory"] = {"hugePages": huge}
        y = work / f"huge-{huge}.yaml"
        y.write_text(yaml.safe_dump(doc))
        root = work / f"root-huge-{huge}"
        agent_fill(args.agent, root, y)
        vol = volume_of(args.agent, root)
        for mode in ("lazy", "prefault"):
            out = run([sys.executable, "-c", TOUCH, str(vol), mode], env=None, cwd=REPO / "benches").stdout.split()
            touch[f"huge={huge} {mode}"] = {"load_ms": float(out[0]), "touch_ms": float(out[1])}
        clear(root)
    results["touch"] = touch

    # load() of a large pipeline
    big = work / "big"
    exported_big = modelwrapper.export(BenchPipeline(args.load_size_mb), big, name="big")
    root = work / "root-big"
    agent_fill(args.agent, root, exported_big.yaml_path)
    vol = volume_of(args.agent, root)
    loads = [float(run([sys.executable, "-c", TOUCH, str(vol), "lazy"], cwd=REPO / "benches").stdout.split()[0]) for _ in range(args.repeat)]
    results["big_bytes"] = sum(f.stat().st_size for f in vol.iterdir())
    results["big_load_ms"] = loads
    clear(root)
    shutil.rmtree(work, ignore_errors=True)

    Path(args.out, "benchmarks-fill.json").write_text(json.dumps(results, indent=1))
    gib = src_bytes / 2**30
    best_cp, best_fill = min(cp_s), min(fill_s)
    print(f"\n| what | result |\n|---|---|")
    print(f"| cp into tmpfs ({gib:.2f} GiB, best of {args.repeat}) | {best_cp:.2f} s = {gib / best_cp:.2f} GiB/s |")
    print(f"| zerocopy-node-agent fill (sha256 + header checks + publish, best of {args.repeat}) | {best_fill:.2f} s = {gib / best_fill:.2f} GiB/s ({best_cp / best_fill:.0%} of cp) |")
    for k, v in touch.items():
        print(f"| first touch of all weights, {k} | load {v['load_ms']:.1f} ms, touch {v['touch_ms']:.0f} ms |")
    print(f"| load() of a {results['big_bytes'] / 2**30:.2f} GiB pipeline (fresh process, runs: {', '.join(f'{x:.1f}' for x in loads)} ms) | best {min(loads):.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
