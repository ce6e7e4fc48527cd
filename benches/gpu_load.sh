#!/usr/bin/env bash
# The GPU checks and benchmark as one short script for a GPU machine (the
# `device` tool runs it from the repository root; $OUT, if set, receives the
# log and the JSON). Wheels of the competing loaders, if carried in .whl/,
# are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/gpu-bench}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 | tee "$out/gpu.txt"
echo "memlock: $(ulimit -l); /dev/shm: $(df -h /dev/shm | tail -1)" | tee -a "$out/gpu.txt"
echo "== GPU tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/python/test_gpu.py 2>&1 | tee "$out/gpu-tests.log"
echo "shmem THP: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>&1)" | tee -a "$out/gpu.txt"
huge=/mnt/zerocopy-huge
mkdir -p "$huge"
huge_args=()
if mount -t tmpfs -o size=8g,huge=within_size zerocopy-huge "$huge"; then huge_args=(--huge-dir "$huge"); fi
echo "== GPU benchmark"
timeout 420 python3 benches/gpu_load.py --json "$out/benchmarks-gpu.json" "${huge_args[@]}" "$@" 2>&1 | tee "$out/gpu-bench.log"
grep -E "AnonHugePages|ShmemHugePages|ShmemPmdMapped" /proc/meminfo | tee -a "$out/gpu.txt"
umount "$huge" 2>/dev/null || true
