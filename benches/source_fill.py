"""Fill of a 4-shard checkpoint (4 x 512 MiB safetensors plus config and
index) from real servers on 127.0.0.1, side by side in one run:

- the node agent from the local Hub stand-in (`hf://`, loopback HTTP), from
  moto's S3 server (`s3://`) and from Debian's docker-registry (`oci://`);
- the official clients from the same servers into tmpfs:
  `huggingface_hub.snapshot_download` and boto3 (`download_file` per object,
  its transfer manager's default ranged concurrency, as `aws s3 cp` does;
  and `get_object` streamed, one request per object);
- `cp` of the same files from the page cache into tmpfs (the floor).

    cargo build --release -p zerocopy-node-agent
    python3 benches/source_fill.py --json docs/benchmarks-sources.json --plot docs/benchmarks-sources.png

Each contender writes into a fresh tmpfs directory; runs alternate, best and
median of --runs. The servers are the test stand-ins (Python's http.server,
moto on Flask, the distribution registry reading its disk): what is compared
is the agent against the official client on the same server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/python"))

from hub_server import HubServer  # noqa: E402

BUCKET = "bench"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start")
            time.sleep(0.2)


def make_checkpoint(src: Path, files: int, mib: int) -> None:
    import torch
    from safetensors.torch import save_file

    src.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        tensors = {
            f"layers.{i}.{j}.weight": torch.randint(0, 255, (mib // 8, 2**20), dtype=torch.uint8, generator=g)
            for j in range(8)
        }
        save_file(tensors, str(src / name))
        weight_map.update({k: name for k in tensors})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "bench"}))


def tmpfs(path: Path, size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "zerocopy-bench", str(path)], check=True)
    return path


def huge_tmpfs(path: Path) -> Path:
    """The kind of tmpfs the agent mounts at its root on a fresh node."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,huge=within_size", "zerocopy-bench", str(path)], check=True)
    return path


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def agent_fill(agent: str, dest: Path, uri: str, endpoint: str, extra: str = "", own_root: bool = False) -> float:
    spec = dest.parent / f"{dest.name}.yaml"
    spec.write_text(
        f"""apiVersion: zerocopy.dev/v1alpha1
kind: ModelWrapper
metadata: {{name: bench}}
spec:
  pipeline:
    components:
      - name: llm
        source: {{uri: "{uri}", endpoint: "{endpoint}"{extra}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: s3}}
stringData: {{AWS_ACCESS_KEY_ID: bench, AWS_SECRET_ACCESS_KEY: bench-secret, endpoint: "{endpoint}"}}
"""
    )
    # own_root: the agent mounts its own huge=within_size tmpfs at the root,
    # as `run` does on a fresh node (unmounted with `dest`, lazily).
    root_tmpfs = ["--root-tmpfs", "auto", "--root-tmpfs-size", "4g"] if own_root else []
    started = time.perf_counter()
    subprocess.run([agent, "--root", str(dest / "root"), "standalone", "-q", "-f", str(spec), *root_tmpfs],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default=str(REPO / "target/release/zerocopy-node-agent"))
    ap.add_argument("--work", default="/var/tmp/zerocopy-bench-sources")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    import boto3
    import huggingface_hub
    import oras.client

    work = Path(args.work)
    src = work / "checkpoint"
    if not (src / "config.json").exists():
        make_checkpoint(src, args.files, args.mib)
    files = sorted(p for p in src.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:  # every contender reads warm sources
        p.read_bytes()
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files).encode()
    size = f"{total * 2 // 2**20 + 256}m"

    s3_port, reg_port = free_port(), free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reg_dir = Path(tempfile.mkdtemp(dir=work))
    (reg_dir / "config.yml").write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {reg_dir}/storage}}\n"
        f"http:\n  addr: 127.0.0.1:{reg_port}\n"
    )
    registry = subprocess.Popen(["docker-registry", "serve", str(reg_dir / "config.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s3_endpoint, reg = f"http://127.0.0.1:{s3_port}", f"127.0.0.1:{reg_port}"
    results: dict[str, list[float]] = {}
    try:
        wait_http(s3_endpoint, moto, "moto")
        wait_http(f"http://{reg}/v2/", registry, "docker-registry")
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench-secret")
        s3.create_bucket(Bucket=BUCKET)
        for p in files:
            s3.upload_file(str(p), BUCKET, f"llm/{p.name}")
        s3.put_object(Bucket=BUCKET, Key="llm/SHA256SUMS", Body=sums)
        annotations = {str(p): {"org.cncf.model.filepath": p.name} for p in files}
        (reg_dir / "annotations.json").write_text(json.dumps(annotations))
        oras.client.OrasClient(hostname=reg, insecure=True).push(
            target=f"{reg}/models/bench:v1",
            files=[f"{p}:{WEIGHT if p.suffix == '.safetensors' else CONFIG}" for p in files],
            annotation_file=str(reg_dir / "annotations.json"),
            disable_path_validation=True,
        )
        with HubServer() as hub:
            hub.add_repo("bench/llm", src)
            contenders = {
                "cp (floor)": lambda d: run_cp(files, d),
                "cp into a huge=within_size tmpfs": lambda d: run_cp(files, huge_tmpfs(d / "huge")),
                "agent hf:// (HTTP)": lambda d: agent_fill(args.agent, d, "hf://bench/llm", hub.endpoint),
                "agent hf://, own root tmpfs": lambda d: agent_fill(args.agent, d, "hf://bench/llm", hub.endpoint,
                                                                    own_root=True),
                "huggingface_hub.snapshot_download": lambda d: timed(
                    lambda: huggingface_hub.snapshot_download("bench/llm", local_dir=str(d / "out"), endpoint=hub.endpoint)),
                "agent s3://": lambda d: agent_fill(args.agent, d, f"s3://{BUCKET}/llm/", s3_endpoint,
                                                    ", secretRef: {name: s3}"),
                "boto3 download_file": lambda d: timed(lambda: [
                    s3.download_file(BUCKET, f"llm/{p.name}", str(d / p.name)) for p in files]),
                "boto3 get_object (one stream each)": lambda d: timed(lambda: [
                    stream_to(s3.get_object(Bucket=BUCKET, Key=f"llm/{p.name}")["Body"], d / p.name) for p in files]),
                "agent s3://, own root tmpfs": lambda d: agent_fill(args.agent, d, f"s3://{BUCKET}/llm/", s3_endpoint,
                                                                    ", secretRef: {name: s3}", own_root=True),
                "agent oci://": lambda d: agent_fill(args.agent, d, f"oci://{reg}/models/bench:v1", f"http://{reg}"),
                "agent oci://, own root tmpfs": lambda d: agent_fill(args.agent, d, f"oci://{reg}/models/bench:v1",
                                                                     f"http://{reg}", own_root=True),
            }
            for run in range(args.runs):
                for name, fn in contenders.items():
                    dest = tmpfs(work / f"dest-{run}-{len(results.get(name, []))}-{abs(hash(name))}", size)
                    try:
                        seconds = fn(dest)
                    finally:
                        for below in (dest / "huge", dest / "root"):
                            if os.path.ismount(below):
                                umount(below)
                        umount(dest)
                        shutil.rmtree(dest, ignore_errors=True)
                    results.setdefault(name, []).append(seconds)
                    print(f"run {run + 1}: {name:36s} {seconds:7.2f} s", flush=True)
    finally:
        moto.terminate()
        registry.terminate()
        shutil.rmtree(reg_dir, ignore_errors=True)

    floor = min(results["cp (floor)"])
    rows = []
    print(f"\n{total / 2**30:.2f} GiB in {len(files)} files, best and median of {args.runs} runs\n")
    print("| contender | best s | median s | GB/s (best) | share of cp |")
    print("|---|---:|---:|---:|---:|")
    for name, times in results.items():
        best, median = min(times), statistics.median(times)
        rows.append({"contender": name, "best_s": best, "median_s": median, "gb_per_s": total / best / 1e9,
                     "share_of_cp": floor / best})
        print(f"| {name} | {best:.2f} | {median:.2f} | {total / best / 1e9:.2f} | {floor / best:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bytes": total, "files": len(files), "runs": args.runs, "rows": rows},
                                              indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.6))
        names = [r["contender"] for r in rows]
        ax.barh(names, [r["gb_per_s"] for r in rows],
                color=["#999" if n.startswith("cp") else "#2a7" if n.startswith("agent") else "#c84" for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("GB/s into tmpfs (best of runs)")
        ax.set_title(f"Fill of {total / 2**30:.1f} GiB, 4 shards, from servers on 127.0.0.1")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def stream_to(body, path: Path) -> None:
    with open(path, "wb") as f:
        for chunk in body.iter_chunks(8 << 20):
            f.write(chunk)


def run_cp(files: list[Path], dest: Path) -> float:
    return timed(lambda: subprocess.run(["cp", *map(str, files), str(dest)], check=True))


if __name__ == "__main__":
    main()
