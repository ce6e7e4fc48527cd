"""Host-to-device load of a Llama-shaped model from the node copy, side by side.

Every loader reads the same safetensors file from shared memory (tmpfs) and
ends with every tensor on the GPU, synchronised. Printed as a table; the
numbers go to ``--json`` (docs/benchmarks-gpu.json), the plot is made by
``benches/gpu_plot.py``. Needs a CUDA GPU; run through benches/gpu_load.sh.

  pinned memcpy         one cudaMemcpy of the same byte count from a pinned
                        buffer: the host-to-device limit of this machine
  zerocopy load(cuda)   modelwrapper.load(path, device="cuda"): module built,
                        weights copied from the registered mapping
  zerocopy tensors      modelwrapper.load_state_dict(path, device="cuda")
  zerocopy staged       the same through pinned bounce buffers (the fallback)
  load() + .to(cuda)    zero-copy CPU load, then torch's pageable copies
  safetensors           safe_open(path, framework="pt", device="cuda")
  fastsafetensors       SafeTensorsFileLoader(nogds=True), copy_files_to_device
  runai streamer        SafetensorsStreamer(device="cuda") over the file
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_shaped  # noqa: E402

import modelwrapper  # noqa: E402
from modelwrapper import _device  # noqa: E402


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    """Seconds of each run (GPU synchronised); the last run's result is dropped
    before the next starts, so each run allocates afresh."""
    times = []
    for _ in range(reps):
        gc.collect()
        torch.cuda.empty_cache()
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
        del out
    return times, None


def on_gpu(tensors: Any) -> None:
    items = tensors.values() if isinstance(tensors, dict) else tensors
    for t in items:
        assert t.is_cuda, t.device


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="only the default path, a fresh process, fastsafetensors and first output")
    ap.add_argument("--huge-dir", type=Path, help="a tmpfs mounted with huge=within_size, for the huge-page rows")
    args = ap.parse_args()

    props = torch.cuda.get_device_properties(0)
    env = {
        "card": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
    }
    print("# GPU load benchmark:", env, flush=True)

    model = llama_shaped.uninitialised(layers=args.layers)
    t0 = time.perf_counter()
    wrapper = modelwrapper.ModelWrapper.from_model(model)
    print(f"from_model: {time.perf_counter() - t0:.1f} s", flush=True)
    path = wrapper.path
    weights = next(path.glob("*.safetensors"))
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    ntensors = len(model.state_dict())
    del model
    gc.collect()
    print(f"model: {ntensors} tensors, {nbytes / 1e9:.2f} GB bf16, file {weights}", flush=True)
    ids = torch.randint(0, 32000, (1, 16), device="cuda")

    results: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any], reps: int = args.reps, **extra: Any) -> None:
        try:
            times, _ = timed(fn, reps)
        except Exception as e:  # one loader failing must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name:24s} FAILED: {e}", flush=True)
            return
        best, median = min(times), statistics.median(times)
        results[name] = {"seconds": times, "best_s": best, "median_s": median, "gb_per_s": nbytes / median / 1e9, **extra}
        print(f"{name:24s} median {median * 1e3:8.1f} ms  best {best * 1e3:8.1f} ms  {nbytes / median / 1e9:6.1f} GB/s", flush=True)

    # The limit: one copy of the same byte count from page-locked memory.
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.fill_(1)
    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    run("pinned memcpy", lambda: dest.copy_(pinned, non_blocking=True), reps=max(args.reps, 5))
    del pinned, dest
    gc.collect()
    torch.cuda.empty_cache()

    def zerocopy_module() -> Any:
        m = modelwrapper.load(path, device="cuda")
        return m

    run("zerocopy load(cuda)", zerocopy_module)
    results["zerocopy load(cuda)"]["report"] = vars(modelwrapper.last_copy_report()).copy()
    run("zerocopy tensors", lambda: modelwrapper.load_state_dict(path, device="cuda"))
    results["zerocopy tensors"]["report"] = vars(modelwrapper.last_copy_report()).copy()
    # Variants, to choose the defaults from data: reader threads, chunk
    # size, ring size; and the registered path (pins the mapping itself).
    knobs = ("DEFAULT_CHUNK", "READ_THREADS", "RING")
    defaults = {k: getattr(_device, k) for k in knobs}
    variants = [
        ("read 64MiB x8 ring4", {"READ_THREADS": 8, "RING": 4}, False),
        ("read 64MiB x16 ring8", {"READ_THREADS": 16, "RING": 8}, False),
        ("read 32MiB x16 ring8", {"DEFAULT_CHUNK": 32 * 2**20, "READ_THREADS": 16, "RING": 8}, False),
        ("register 64MiB x1", {}, True),
    ]
    for label, knob_values, register in variants if not args.quick else []:
        for k, v in {**defaults, **knob_values}.items():
            setattr(_device, k, v)
        if register:
            os.environ["MODELWRAPPER_GPU_REGISTER"] = "1"
        run(label, lambda: modelwrapper.load_state_dict(path, device="cuda"))
        os.environ.pop("MODELWRAPPER_GPU_REGISTER", None)
        if "error" not in results[label]:
            results[label]["report"] = vars(modelwrapper.last_copy_report()).copy()
    for k, v in defaults.items():
        setattr(_device, k, v)

    # A fresh process's first load (its pinned ring not yet allocated), as a
    # new Ray actor would do it; CUDA initialised before the clock starts.
    try:
        import subprocess

        code = (
            "import sys, time, torch, modelwrapper; torch.cuda.init(); torch.empty(1, device='cuda'); "
            "t0 = time.perf_counter(); modelwrapper.load(sys.argv[1], device='cuda'); torch.cuda.synchronize(); "
            "print(time.perf_counter() - t0)"
        )
        child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
        fresh = [
            float(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, env=child_env).stdout.split()[-1])
            for _ in range(args.reps)
        ]
        results["zerocopy load(cuda), fresh process"] = {
            "seconds": fresh, "median_s": statistics.median(fresh), "gb_per_s": nbytes / statistics.median(fresh) / 1e9
        }
        print(f"{'fresh process load(cuda)':24s} median {statistics.median(fresh) * 1e3:8.1f} ms", flush=True)
    except Exception as e:
        traceback.print_exc()
        results["zerocopy load(cuda), fresh process"] = {"error": str(e)[:500]}

    if not args.quick:
        run("load() + .to(cuda)", lambda: modelwrapper.load(path).to("cuda"))

    def safetensors_cuda() -> Any:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cuda:0") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
        on_gpu(out)
        return out

    if not args.quick:
        run("safetensors", safetensors_cuda)

    kept: list[Any] = []  # fastsafetensors' device buffers back its tensors: closed after timing

    def fastsafetensors_cuda() -> Any:
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), "cuda:0", nogds=True)
        loader.add_filenames({0: [str(weights)]})
        buffer = loader.copy_files_to_device()
        out = {k: buffer.get_tensor(k) for k in loader.get_keys()}
        kept.append((loader, buffer))
        on_gpu(out)
        return out

    run("fastsafetensors", fastsafetensors_cuda)
    for loader, buffer in kept:
        buffer.close()
        loader.close()

    def runai_cuda() -> Any:
        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as streamer:
            try:
                streamer.stream_file(str(weights), device="cuda")
            except Exception as e:  # older versions stream to host memory only
                print("runai streamer: device='cuda' refused, streaming to host:", e, flush=True)
                streamer.stream_file(str(weights))
            for item in streamer.get_tensors():
                name, tensor = item if isinstance(item, tuple) else (len(out), item)
                out[name] = tensor.to("cuda", non_blocking=True)
        on_gpu(out)
        return out

    if not args.quick:
        run("runai streamer", runai_cuda)

    # The same file on a tmpfs mounted huge=within_size (what the agent's
    # root tmpfs gives every generation): the row's name says what was granted.
    if args.huge_dir and not args.quick:
        import shutil

        huge = args.huge_dir / weights.name
        # Sized first, as the agent's fill does: huge=within_size grants a
        # 2 MiB page only where the file's size already covers it, which a
        # plain copy's small appends never do (stop 18 got 0 huge pages).
        with open(weights, "rb") as src, open(huge, "wb") as dst:
            os.ftruncate(dst.fileno(), weights.stat().st_size)
            shutil.copyfileobj(src, dst, 64 << 20)
        meminfo = [line for line in Path("/proc/meminfo").read_text().splitlines() if "ShmemHugePages" in line]
        results["hugepages meminfo"] = {"lines": meminfo}
        print("huge-page tmpfs:", args.huge_dir, meminfo, flush=True)

        def _load_file(file: Path) -> Any:
            from modelwrapper._load import device_tensors, map_file

            return device_tensors([map_file(file)], torch.device("cuda", 0))[0]

        granted = any(int(line.split()[1]) > 0 for line in meminfo)
        kind = "huge pages" if granted else "huge=within_size tmpfs (0 huge pages granted)"
        run(f"{kind} read x16", lambda: _load_file(huge))
        run("4k pages read x16 (same code)", lambda: _load_file(weights))
        # Pinning 2 MiB pages is 512x fewer pages to pin than 4 KiB ones:
        # whether that makes registering the node copy the faster path.
        os.environ["MODELWRAPPER_GPU_REGISTER"] = "1"
        run(f"{kind} cudaHostRegister", lambda: _load_file(huge))
        os.environ.pop("MODELWRAPPER_GPU_REGISTER", None)
        huge.unlink()

    # Time to first output: load to the GPU, then one forward pass.
    def first_output() -> tuple[float, float, float]:
        gc.collect()
        torch.cuda.empty_cache()
        sync()
        t0 = time.perf_counter()
        m = modelwrapper.load(path, device="cuda")
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            m(ids)
            sync()
            t2 = time.perf_counter()
            m(ids)
            sync()
            t3 = time.perf_counter()
        return t1 - t0, t2 - t0, t3 - t2

    try:
        first_output()  # warms cuBLAS/kernels so the comparison is of loads
        runs = [first_output() for _ in range(args.reps)]
        results["first output"] = {
            "load_s": statistics.median(r[0] for r in runs),
            "first_output_s": statistics.median(r[1] for r in runs),
            "second_forward_s": statistics.median(r[2] for r in runs),
        }
        print("first output:", results["first output"], flush=True)
    except Exception as e:
        traceback.print_exc()
        results["first output"] = {"error": str(e)[:500]}

    # Tensor parallel: eight ranks, each moving only its shard's bytes.
    try:
        ranks = []
        for rank in range(8):
            shard = modelwrapper.tp_shard(rank, 8, llama_shaped.TP_DIMS)
            gc.collect()
            torch.cuda.empty_cache()
            sync()
            t0 = time.perf_counter()
            out = modelwrapper.load_state_dict(path, device="cuda", shard=shard)
            sync()
            seconds = time.perf_counter() - t0
            report = modelwrapper.last_copy_report()
            ranks.append({"rank": rank, "seconds": seconds, "bytes": report.bytes, "staged_bytes": report.staged_bytes})
            del out
        results["tp8 per rank"] = {
            "ranks": ranks,
            "median_s": statistics.median(r["seconds"] for r in ranks),
            "bytes_per_rank": statistics.median(r["bytes"] for r in ranks),
        }
        print("tp=8:", [(r["rank"], round(r["seconds"] * 1e3, 1), round(r["bytes"] / 1e9, 3)) for r in ranks], flush=True)
    except Exception as e:
        traceback.print_exc()
        results["tp8 per rank"] = {"error": str(e)[:500]}

    limit = results.get("pinned memcpy", {}).get("median_s")
    print("\n| loader | median ms | GB/s | share of pinned memcpy |\n|---|---:|---:|---:|")
    for name, r in results.items():
        if "median_s" in r and "gb_per_s" in r:
            share = f"{limit / r['median_s']:.0%}" if limit else "-"
            print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['gb_per_s']:.1f} | {share} |")
        elif "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} | | |")
    doc = {"env": env, "bytes": nbytes, "tensors": ntensors, "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    wrapper.release()


if __name__ == "__main__":
    main()
