"""Host-to-device copies of a mapped volume's tensors, at close to the PCIe limit.

Two ways to get the node copy's bytes to a GPU without torch's pageable
copies (which stage through a driver buffer one tensor at a time):

- read (the default): several threads ``pread`` the file into a ring of
  pinned (page-locked) buffers while the buffers filled earlier are copied
  to the device on two streams. The kernel copies straight from the tmpfs
  page cache: no page faults, nothing pinned but the ring.
- register (``MODELWRAPPER_GPU_REGISTER=1``): ``cudaHostRegister`` pins the
  read-only mapping itself, chunk by chunk, and the DMA engine reads the
  node copy directly, with no host copy at all. Pinning is the kernel's
  page-by-page work; measured on an H200 in a Firecracker VM it ran at
  1.3-1.8 GB/s against 20-27 GB/s for reading (docs/benchmarks.md), so it is
  opt-in. Where it is refused the rest of the load is read, and the report
  says why.

The engine talks to CUDA through a small backend (:class:`CudaBackend`) so
its planning, chunking and fallback run unchanged under a test double on
machines without a GPU.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

log = logging.getLogger("modelwrapper")

PAGE = 4096
# 32 MiB x a ring of 4: as fast as larger rings in the GPU benchmark, and a
# fresh process pins only 128 MiB (pinning is slow on some hosts).
DEFAULT_CHUNK = 32 * 2**20
STREAMS = 2
# Threads that read chunks into pinned buffers, and the buffers in the ring.
# Reading scales with threads (3.7 GB/s for one, 25 GB/s for 16 on an H200
# host, docs/benchmarks.md): as many as the process may use, up to 16.
READ_THREADS = max(1, min(16, len(os.sched_getaffinity(0))))
RING = 4
MIN_READ = 2**20
_NOT_TRIED = object()
# cudaHostRegisterPortable | cudaHostRegisterReadOnly (CUDA 11.1+).
_REGISTER_FLAGS = 0x01 | 0x08
# Destination offsets of packed (sharded) tensors: what CUDA kernels expect
# of a fresh allocation, so vectorised loads stay aligned.
DEST_ALIGN = 256


class Backend(Protocol):
    """What the copy engine needs from a device runtime."""

    device: torch.device

    def register(self, ptr: int, nbytes: int) -> str | None:
        """Page-locks ``[ptr, ptr+nbytes)`` in place; the reason on refusal."""

    def unregister(self, ptr: int) -> None: ...

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 destination buffer on the device."""

    def pinned(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 host buffer."""

    def streams(self, n: int) -> list[Any]: ...

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> Any:
        """Enqueues ``dst.copy_(src)`` on ``stream``; returns an event that completes with it."""

    def wait(self, event: Any) -> None:
        """Blocks the host until ``event`` completes."""

    def synchronize(self, streams: list[Any]) -> None: ...


class CudaBackend:
    def __init__(self, device: torch.device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._cudart = torch.cuda.cudart()

    def register(self, ptr: int, nbytes: int) -> str | None:
        """Through ctypes, which also gives ``cudaGetLastError`` (torch binds
        neither it nor a GIL-free register): a refusal stays CUDA's "last
        error", which torch's next kernel-launch check would raise, so it is
        cleared; where it could not be, nothing is registered."""
        import ctypes

        register, clear = _runtime("cudaHostRegister"), _runtime("cudaGetLastError")
        if register is None or clear is None:
            return "no libcudart mapped in this process (a static build): not registering"
        code = register(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(_REGISTER_FLAGS))
        if code == 0:
            return None
        clear()
        describe = _runtime("cudaGetErrorString", ctypes.c_char_p)
        text = (describe(code) or b"").decode(errors="replace") if describe is not None else ""
        return f"cudaHostRegister: {text or 'refused'} (error {code})"

    def unregister(self, ptr: int) -> None:
        err = self._cudart.cudaHostUnregister(ptr)
        if int(err) != 0:
            log.warning("cudaHostUnregister(%#x): %s", ptr, self._cudart.cudaGetErrorString(err))

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def streams(self, n: int) -> list[Any]:
        current = torch.cuda.current_stream(self.device)
        out = []
        for _ in range(n):
            s = torch.cuda.Stream(self.device)
            # The destination may reuse memory freed by work still queued
            # on the current stream.
            s.wait_stream(current)
            out.append(s)
        return out

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> Any:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def wait(self, event: Any) -> None:
        event.synchronize()

    def synchronize(self, streams: list[Any]) -> None:
        for s in streams:
            s.synchronize()


_runtime_fns: dict[str, Any] = {}


def _runtime(name: str, restype: Any = None) -> Any:
    """A function of the CUDA runtime library torch loaded, through ctypes
    (which releases the GIL during the call), or None when this process has
    no separate libcudart mapped (a static build)."""
    if name in _runtime_fns:
        return _runtime_fns[name]
    import ctypes

    fn = None
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart" in line and "/" in line})
    except OSError:
        paths = []
    # torch's own runtime first (others, e.g. cupy's, may be mapped too).
    torch_dir = os.path.dirname(os.path.dirname(torch.__file__))
    paths.sort(key=lambda p: (not p.startswith(torch_dir), "nvidia" not in p, p))
    for path in paths:
        try:
            fn = getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
        fn.restype = restype or ctypes.c_int
        break
    if fn is None:
        log.debug("no libcudart mapped in this process: %s is not available", name)
    _runtime_fns[name] = fn
    return fn


@dataclass
class CopyReport:
    """What one load moved to the device, how, and how fast."""

    device: str
    bytes: int = 0
    seconds: float = 0.0
    registered_bytes: int = 0
    staged_bytes: int = 0
    # Why some bytes were staged instead of copied from the mapping directly.
    fallback_reason: str | None = None
    files: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def path(self) -> str:
        if self.staged_bytes and self.registered_bytes:
            return "mixed"
        return "staged" if self.staged_bytes else "registered"


# A refusal is a property of the process's driver and limits, not of one
# file: once refused, later loads stage at once instead of asking again.
_refused: dict[str, str] = {}


def forget_refusal() -> None:
    _refused.clear()


@dataclass(frozen=True)
class Piece:
    """Contiguous bytes ``[src, src+length)`` of a mapped file's data region
    that land at ``dst`` in the destination buffer."""

    src: int
    length: int
    dst: int


@dataclass(frozen=True)
class Gather:
    """A strided view (a shard along a dimension other than 0) whose bytes
    land, packed row-major, at ``dst``."""

    view: torch.Tensor
    dst: int


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merges pieces adjacent in both source and destination (a full load is
    one piece per file), sorted by source."""
    out: list[Piece] = []
    for p in sorted(pieces, key=lambda p: p.src):
        if p.length == 0:
            continue
        if out and out[-1].src + out[-1].length == p.src and out[-1].dst + out[-1].length == p.dst:
            last = out.pop()
            p = Piece(last.src, last.length + p.length, last.dst)
        out.append(p)
    return out


def chunks(base_addr: int, pieces: list[Piece], chunk: int) -> list[Piece]:
    """Splits pieces at multiples of ``chunk`` in the *address space* (a
    multiple of the page size), so the page covers of consecutive chunks
    never overlap and each can be registered on its own."""
    out = []
    for p in pieces:
        start, end = p.src, p.src + p.length
        while start < end:
            boundary = ((base_addr + start) // chunk + 1) * chunk - base_addr
            stop = min(end, boundary)
            out.append(Piece(start, stop - start, p.dst + (start - p.src)))
            start = stop
    return out


@dataclass(frozen=True)
class FileSource:
    """The file behind a mapping, for reading with pread (no page faults)."""

    fd: int
    data_offset: int


def split(pieces: list[Piece], size: int) -> list[Piece]:
    """Pieces cut into parts of at most ``size`` bytes."""
    return [
        Piece(p.src + off, min(size, p.length - off), p.dst + off) for p in pieces for off in range(0, p.length, size)
    ]


def _parts(length: int, threads: int) -> list[tuple[int, int]]:
    """(offset, length) of the reads one chunk is split into, page-aligned,
    none smaller than MIN_READ unless the chunk is."""
    n = max(1, min(threads, length // MIN_READ))
    part = -(-(-(-length // n)) // PAGE) * PAGE
    return [(off, min(part, length - off)) for off in range(0, length, part)]


def _pread_into(fd: int, address: int, nbytes: int, offset: int) -> None:
    """Reads ``nbytes`` at file ``offset`` into host memory at ``address``."""
    import ctypes

    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"file ended at byte {offset + done} with {nbytes - done} bytes still to read: truncated")
        done += got


class Transfer:
    """Copies the pieces of one or more mapped files into device buffers.

    By default the bytes are read (``pread``, on READ_THREADS threads) into a
    ring of pinned buffers while earlier buffers are copied to the device:
    reading lets the kernel copy straight from the page cache, with no page
    faults and no pinning of the mapping. ``register=True`` instead pins the
    mapping itself chunk by chunk and copies from it (no host copy at all);
    where pinning is refused the rest is read.
    """

    def __init__(self, backend: Backend, *, chunk: int | None = None, register: bool = False, streams: int = STREAMS):
        chunk = chunk or DEFAULT_CHUNK
        if chunk % PAGE:
            raise ValueError(f"chunk size {chunk} is not a multiple of the page size {PAGE}")
        self.backend = backend
        self.chunk = chunk
        self.report = CopyReport(device=str(backend.device))
        key = str(backend.device)
        self._register = register and key not in _refused
        if register and not self._register:
            self.report.fallback_reason = _refused[key]
        self._streams = backend.streams(streams)
        self._next_stream = 0
        self._registered: list[int] = []
        self._bounce: list[torch.Tensor] = []
        self._bounce_events: list[Any] = []
        self._next_bounce = 0
        self._readers: ThreadPoolExecutor | None = None
        self._started = time.perf_counter()

    def _stream(self) -> Any:
        s = self._streams[self._next_stream % len(self._streams)]
        self._next_stream += 1
        return s

    def copy_file(
        self,
        source: FileSource,
        host: torch.Tensor,
        dest: torch.Tensor,
        pieces: list[Piece],
        gathers: list[Gather] = (),  # type: ignore[assignment]
    ) -> None:
        """``source``: the file; ``host``: its data region as a 1-D uint8 CPU
        view of the mapping; ``dest``: the device buffer the pieces land in."""
        self.report.files += 1
        pieces = coalesce(pieces)
        if self._register:
            pieces = self._copy_registered(host, dest, pieces)
        if pieces:
            self._read(source, dest, pieces)
        for g in gathers:
            self._gather(g, dest)

    # -- registered: DMA straight from the pinned mapping -------------------

    def _copy_registered(self, host: torch.Tensor, dest: torch.Tensor, pieces: list[Piece]) -> list[Piece]:
        """Copies what can be registered; returns the pieces left to read."""
        base = host.data_ptr()
        plan: list[tuple[Piece, int, int]] = []  # chunk, and the pages it registers
        covered = 0  # pages up to here belong to an earlier chunk (chunks come sorted)
        for p in chunks(base, pieces, self.chunk):
            lo = max((base + p.src) // PAGE * PAGE, covered)
            hi = max(lo, -(-(base + p.src + p.length) // PAGE) * PAGE)
            covered = max(covered, hi)
            plan.append((p, lo, hi))
        left = []
        for (p, _, _), refused in zip(plan, self._registrations(plan)):
            if refused is None:
                self.backend.copy_async(dest[p.dst : p.dst + p.length], host[p.src : p.src + p.length], self._stream())
                self.report.registered_bytes += p.length
                continue
            if refused is not _NOT_TRIED and self._register:
                self._refuse(refused)
            left.append(p)
        return left

    def _register_one(self, lo: int, hi: int) -> str | None:
        """Registers one chunk's pages and records them at once, so they are
        undone even if the copies stop early."""
        if lo == hi:
            return None
        refused = self.backend.register(lo, hi - lo)
        if refused is None:
            self._registered.append(lo)
        return refused

    def _registrations(self, plan: list[tuple[Piece, int, int]]) -> Iterator[Any]:
        """Per chunk, in order: None once its pages are registered, the
        refusal, or _NOT_TRIED once an earlier chunk was refused. Chunk k+1
        is registered while chunk k's copy is in flight (copies are async)."""
        for _, lo, hi in plan:
            yield self._register_one(lo, hi) if self._register else _NOT_TRIED

    def _refuse(self, reason: str) -> None:
        self._register = False
        self.report.fallback_reason = reason
        _refused[str(self.backend.device)] = reason
        log.warning(
            "loading to %s through pinned bounce buffers: the shared mapping cannot be registered with CUDA (%s). "
            "Loads stay correct; allow page-locking (the container's memlock limit) to copy straight from the node copy",
            self.backend.device,
            reason,
        )

    # -- read: pread into a ring of pinned buffers --------------------------

    def _slot(self, b: int, nbytes: int) -> torch.Tensor:
        """Ring buffer ``b``, once the copy that last used it is done."""
        while len(self._bounce) <= b:
            self._bounce.append(self.backend.pinned(max(nbytes, self.chunk)))
            self._bounce_events.append(None)
        if self._bounce_events[b] is not None:
            self.backend.wait(self._bounce_events[b])
            self._bounce_events[b] = None
        if self._bounce[b].numel() < nbytes:
            self._bounce[b] = self.backend.pinned(nbytes)
        return self._bounce[b]

    def _next_slot(self) -> int:
        b = self._next_bounce % RING
        self._next_bounce += 1
        return b

    def _read(self, source: FileSource, dest: torch.Tensor, pieces: list[Piece]) -> None:
        """Reads chunk i+1.. on the reader threads while chunk i is copied."""
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="modelwrapper-read")
        plan = split(pieces, self.chunk)
        reads: dict[int, tuple[int, list[Future[None]]]] = {}

        def start(j: int) -> None:
            b = self._next_slot()
            buf = self._slot(b, plan[j].length)
            assert self._readers is not None
            reads[j] = (
                b,
                [
                    self._readers.submit(
                        _pread_into, source.fd, buf.data_ptr() + off, n, source.data_offset + plan[j].src + off
                    )
                    for off, n in _parts(plan[j].length, READ_THREADS)
                ],
            )

        submitted = min(RING - 1, len(plan))
        for j in range(submitted):
            start(j)
        try:
            for i, p in enumerate(plan):
                b, futures = reads.pop(i)
                for f in futures:
                    f.result()
                self._bounce_events[b] = self.backend.copy_async(
                    dest[p.dst : p.dst + p.length], self._bounce[b][: p.length], self._stream()
                )
                self.report.staged_bytes += p.length
                if submitted < len(plan):
                    start(submitted)
                    submitted += 1
        finally:
            for _, futures in reads.values():  # on error: no read may still write into a buffer
                for f in futures:
                    f.exception()

    def _gather(self, g: Gather, dest: torch.Tensor) -> None:
        """A strided shard, in row blocks of at most one chunk: gathered on
        the host (only the shard's bytes are read), then one DMA per block."""
        view = g.view
        if view.dim() == 0 or view.numel() == 0:
            return
        row = view[0].numel() * view.element_size() if view.dim() > 1 else view.element_size()
        rows_per_block = max(1, self.chunk // max(row, 1))
        offset = g.dst
        for start in range(0, view.shape[0], rows_per_block):
            block = view[start : start + rows_per_block]
            n = block.numel() * block.element_size()
            b = self._next_slot()
            buf = self._slot(b, n)[:n]
            buf.view(block.dtype).view(block.shape).copy_(block)
            self._bounce_events[b] = self.backend.copy_async(dest[offset : offset + n], buf, self._stream())
            self.report.staged_bytes += n
            offset += n

    def finish(self) -> CopyReport:
        """Waits for every copy, then unpins what was registered."""
        try:
            if self._readers is not None:
                self._readers.shutdown(wait=True)
            self.backend.synchronize(self._streams)
        finally:
            for ptr in self._registered:
                self.backend.unregister(ptr)
            self._registered.clear()
        self.report.bytes = self.report.registered_bytes + self.report.staged_bytes
        self.report.seconds = time.perf_counter() - self._started
        return self.report
