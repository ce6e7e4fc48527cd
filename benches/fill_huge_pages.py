"""2 MiB pages for a fill on a node whose page cache fills memory, as a busy
node's does: the agent's fill into its own `huge=within_size` root, this
build against another, side by side, each going first in turn.

    cargo build --release -p zerocopy-node-agent
    python3 benches/fill_huge_pages.py --baseline-agent <previous build> --json docs/benchmarks-fill-huge-pages.json

Before each fill the script reads --ballast-gib of files it wrote once, so
the page cache holds nearly all memory (MemFree is printed). It reports per
fill: wall time, how much of the generation got 2 MiB pages
(ShmemHugePages before the root is unmounted), and the first touch of every
page of the published weights through a fresh mapping (what a pod's first
forward pays).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fill_speed import make_checkpoint, write_spec  # noqa: E402


def meminfo(key: str) -> int:
    """A /proc/meminfo value in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def touch_all(path: Path) -> float:
    """Seconds to read one byte of every 4 KiB page through a fresh mapping."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        t0 = time.perf_counter()
        total = 0
        for off in range(0, len(m), 4096):
            total += m[off]
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", default="/var/tmp/zerocopy-ci-target/release/zerocopy-node-agent")
    ap.add_argument("--baseline-agent", required=True)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--ballast-gib", type=int, default=22, help="more than the memory the page cache may take")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--work", default="/var/tmp/zerocopy-bench-hugepages")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    paths = make_checkpoint(work / "src", args.files, args.mib)
    spec = write_spec(work / "fill.yaml", "huge-bench", paths)
    ballast = work / "ballast"
    ballast.mkdir()
    block = os.urandom(1 << 20)
    for i in range(args.ballast_gib):
        with open(ballast / f"b{i}", "wb") as f:
            for _ in range(1024):
                f.write(block)

    def fill_page_cache() -> int:
        for p in sorted(ballast.iterdir()):
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
        for p in paths:  # the sources last, so they stay cached
            p.read_bytes()
        return meminfo("MemFree")

    root = Path("/dev/shm/zerocopy-bench-hugepages")

    def clear_root() -> None:
        # A root left mounted by an interrupted run would be reused, with
        # its old generation counted too.
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    def fill(agent: str) -> dict:
        free = fill_page_cache()
        huge0 = meminfo("ShmemHugePages")
        t0 = time.perf_counter()
        try:
            subprocess.run(
                [agent, "--root", str(root), "standalone", "-q", "-f", str(spec), "--root-tmpfs", "auto", "--root-tmpfs-size", "4g"],
                check=True,
                capture_output=True,
            )
            seconds = time.perf_counter() - t0
            huge = meminfo("ShmemHugePages") - huge0
            # `current` links to the generation: count each file once.
            weights = sorted({w.resolve() for w in root.glob("default/huge-bench/*/*.safetensors")})
            touch = sum(touch_all(w) for w in weights)
            total = sum(w.stat().st_size for w in weights)
        finally:
            clear_root()
        return {"seconds": seconds, "free_before": free, "huge_bytes": huge, "bytes": total, "touch_s": touch}

    contenders = {"this build": args.agent, "baseline": args.baseline_agent}
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    clear_root()
    try:
        for i in range(args.repeat):
            # Each goes first in turn: the one after pays for what the other left.
            for name in list(contenders)[:: 1 if i % 2 == 0 else -1]:
                r = fill(contenders[name])
                runs[name].append(r)
                print(
                    f"{name}: {r['seconds']:.2f} s, {r['huge_bytes'] / 2**20:.0f} of {r['bytes'] / 2**20:.0f} MiB in 2 MiB pages, "
                    f"first touch {r['touch_s'] * 1e3:.0f} ms, MemFree before {r['free_before'] / 2**20:.0f} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.files} x {args.mib} MiB, page cache filled before each fill, median of {args.repeat}, each first in turn\n")
    print("| agent | fill | in 2 MiB pages | first touch of every page | MemFree before |\n|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(
            f"| {name} | {med('seconds'):.2f} s | {med('huge_bytes') / med('bytes'):.0%} | {med('touch_s') * 1e3:.0f} ms | {med('free_before') / 2**20:.0f} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
