"""Fill of a 4-file checkpoint (4 x 512 MiB safetensors, file:// sources with
sha256) against `cp` of the same files into tmpfs and runai-model-streamer
reading them, side by side in one run, alternating, best and median of N.

    cargo build --release -p zerocopy-node-agent
    python3 benches/fill_speed.py --json docs/benchmarks-fill-4file.json

Sources live on disk under --work, read through the page cache (warmed
first, as all contenders read them); every fill goes to a fresh tmpfs root.

Before each timed run the script touches and frees as much memory as the
checkpoint (--no-prewarm turns it off), so every contender starts from free
memory that is resident. On a VM with free page reporting (Firecracker,
`page_reporting_order` in the kernel command line) freed blocks go back to
the host after a couple of seconds and the next first touch faults them in
from it: without the prewarm, whichever contender runs after a pause pays
that, and 2 MiB pages pay it most. Bare metal has no such cost.

CPU seconds (user + sys of the contender's processes) are printed beside
the wall time: on a small machine the fill is bound by sha256 on its cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from modelwrapper._export import sha256_file

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(src: Path, files: int, mib: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    src.mkdir(parents=True, exist_ok=True)
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(files):
        tensors = {f"layer.{i}.{j}.weight": torch.randint(0, 255, (mib // 8, 2**20), dtype=torch.uint8, generator=g) for j in range(8)}
        path = src / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def write_spec(path: Path, name: str, paths: list[Path]) -> Path:
    """A ModelWrapper with one `file://` component per shard, pinned."""
    components = "\n".join(
        f"      - name: shard-{i + 1}\n        weights: {{uri: '{p.as_uri()}', sha256: '{sha256_file(p)}'}}" for i, p in enumerate(paths)
    )
    path.write_text(
        f"apiVersion: zerocopy.dev/v1alpha1\nkind: ModelWrapper\nmetadata: {{name: {name}}}\n"
        f"spec:\n  mode: actor\n  pipeline:\n    components:\n{components}\n"
    )
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--agent", default="/var/tmp/zerocopy-ci-target/release/zerocopy-node-agent")
    ap.add_argument("--baseline-agent", help="another build to measure side by side (e.g. before a change)")
    ap.add_argument("--work", default="/var/tmp/zerocopy-bench-fill4")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-prewarm", action="store_true", help="do not touch and free memory before each run")
    args = ap.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    paths = make_checkpoint(work / "src", args.files, args.mib)
    total = sum(p.stat().st_size for p in paths)
    spec = write_spec(work / "fill.yaml", "fill-bench", paths)
    for p in paths:  # warm the page cache for every contender
        p.read_bytes()

    shm = Path("/dev/shm/zerocopy-bench-fill4")
    shm.mkdir(parents=True, exist_ok=True)

    def cp() -> float:
        dst = shm / "cp"
        dst.mkdir()
        t0 = time.perf_counter()
        subprocess.run(["cp", *map(str, paths), str(dst)], check=True)
        seconds = time.perf_counter() - t0
        shutil.rmtree(dst)
        return seconds

    def cp_huge() -> float:
        # The kind of tmpfs the agent mounts at its root on a fresh node.
        dst = shm / "cp-huge"
        dst.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,huge=within_size", "bench", str(dst)], check=True)
        t0 = time.perf_counter()
        subprocess.run(["cp", *map(str, paths), str(dst)], check=True)
        seconds = time.perf_counter() - t0
        subprocess.run(["umount", "-l", str(dst)], check=True)
        dst.rmdir()
        return seconds

    def fill(agent: str = args.agent, own_root: bool = False) -> float:
        root = shm / ("root-own" if own_root else "root")
        extra = ["--root-tmpfs", "auto", "--root-tmpfs-size", "4g"] if own_root else []
        t0 = time.perf_counter()
        subprocess.run([agent, "--root", str(root), "standalone", "-q", "-f", str(spec), *extra], check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        if own_root:
            subprocess.run(["umount", "-l", str(root)], check=True)
        shutil.rmtree(root)
        return seconds

    def runai() -> float:
        from runai_model_streamer import SafetensorsStreamer

        t0 = time.perf_counter()
        n = 0
        with SafetensorsStreamer() as streamer:
            streamer.stream_files([str(p) for p in paths])
            for _, tensor in streamer.get_tensors():
                n += tensor.numel() * tensor.element_size()
        seconds = time.perf_counter() - t0
        assert n > 0
        return seconds

    contenders = {
        "cp into tmpfs": cp,
        "cp into a huge=within_size tmpfs (small writes: large folios, no 2 MiB pages)": cp_huge,
        "zerocopy-node-agent fill (sha256, checks, publish)": fill,
        "agent fill into its own root tmpfs (--root-tmpfs auto)": lambda: fill(own_root=True),
        "runai-model-streamer 0.16.1 (to host memory)": runai,
    }
    if args.baseline_agent:
        contenders["baseline agent fill"] = lambda: fill(args.baseline_agent)
    def prewarm() -> None:
        import numpy

        a = numpy.ones(total + (256 << 20), dtype=numpy.uint8)
        del a

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def self_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    runs: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeat):
        for name, fn in contenders.items():
            if not args.no_prewarm:
                prewarm()
            c0, s0 = children_cpu(), self_cpu()
            try:
                runs[name].append(fn())
            except Exception as e:  # a contender that cannot run must not hide the others
                print(f"{name} failed: {e}")
                continue
            # runai streams in this process; the others are child processes.
            cpu[name].append(children_cpu() - c0 + (self_cpu() - s0 if name.startswith("runai") else 0.0))
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    gib = total / 2**30
    best_cp = min(runs["cp into tmpfs"])
    print(f"\n{args.files} files, {gib:.2f} GiB; best and median of {args.repeat}, alternating\n")
    print("| contender | best | median | GiB/s (best) | of cp | CPU s (median) |\n|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        if r:
            print(
                f"| {name} | {min(r):.2f} s | {statistics.median(r):.2f} s | {gib / min(r):.2f} | {best_cp / min(r):.0%} | {statistics.median(cpu[name]):.2f} |"
            )
    block = os.urandom(256 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(block).digest()
    sha_gbs = len(block) / (time.perf_counter() - t0) / 1e9
    cores = len(os.sched_getaffinity(0))
    floor = total / 1e9 / sha_gbs / cores
    print(f"\nsha256 on one core (OpenSSL via hashlib): {sha_gbs:.2f} GB/s; hashing {gib:.2f} GiB alone takes {floor:.2f} s of wall time on {cores} cores")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bytes": total, "files": args.files, "cores": cores, "sha256_gbs": sha_gbs, "prewarm": not args.no_prewarm, "runs_s": runs, "cpu_s": cpu},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
