"""Filling a mapping's page tables before the first forward pass needs them.

``madvise(MADV_POPULATE_READ)`` (Linux 5.14+) maps every page in one call;
it is made through ctypes so the GIL is released while the kernel works,
which is what lets ``prefault="background"`` run beside the caller's
Python code. Older kernels get one read per page instead.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
import warnings

import torch

log = logging.getLogger("modelwrapper")

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
PAGE = mmap.PAGESIZE
# Populated a slice at a time, so a background pass can be watched and the
# process can exit without waiting for gigabytes.
SLICE = 256 * 2**20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

_lock = threading.Lock()
_pending: list[threading.Thread] = []


def _view(mm: mmap.mmap) -> torch.Tensor:
    """The mapping as uint8 (the view keeps it mapped while it lives)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8)


def populate_mapping(mm: mmap.mmap) -> None:
    """Maps every page of ``mm`` now (reads only: works on read-only mappings)."""
    _populate(_view(mm))


def _populate(view: torch.Tensor) -> None:
    addr, size = view.data_ptr(), view.numel()
    for start in range(0, size, SLICE):
        n = min(SLICE, size - start)
        if _libc.madvise(addr + start, n, MADV_POPULATE_READ) != 0:
            int(view[::PAGE].sum())  # kernels before 5.14: one byte per page
            return


def populate_in_background(mappings: list[mmap.mmap]) -> threading.Thread:
    """Starts populating ``mappings`` in a daemon thread and returns it; the
    thread holds the mappings until it is done."""
    # Views are made here: warnings.catch_warnings (around frombuffer) is
    # not safe to use from two threads at once.
    views = [_view(mm) for mm in mappings]

    def run() -> None:
        started = time.perf_counter()
        try:
            for view in views:
                _populate(view)
        except (OSError, ValueError) as e:  # the mapping closed under us: nothing left to warm
            log.debug("background prefault stopped: %s", e)
        log.debug("background prefault of %d file(s) took %.3f s", len(mappings), time.perf_counter() - started)

    thread = threading.Thread(target=run, name="modelwrapper-prefault", daemon=True)
    with _lock:
        _pending[:] = [t for t in _pending if t.is_alive()]
        _pending.append(thread)
    thread.start()
    return thread


def wait_for_prefault(timeout: float | None = None) -> bool:
    """Waits for every background prefault of this process; True when all
    are done within ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _lock:
        threads = list(_pending)
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)
