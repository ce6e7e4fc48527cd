"""Freeing what ``from_model()`` put in shared memory once nothing uses it.

tmpfs pages are RAM, and a generation directory under ``<root>/local`` stays
until someone deletes it. A generation is in use while

- a ``ModelWrapper`` object for it is alive in some process: each such
  process holds a *lease*, an empty file ``<root>/.leases/<name>.<generation>/
  <pid>-<starttime>`` (the start time makes a reused pid a different holder),
  created with the first wrapper object in the process and removed when the
  last one is garbage-collected, released or the process exits; or
- some process maps or holds open one of its files (tensors returned by
  ``load()`` are views of the mapping), read from ``/proc/*/maps`` and
  ``/proc/*/fd``, which also covers processes that ``load()`` by path.

Collection runs at every ``from_model()`` (any process), on
``wrapper.release()`` and with ``python -m modelwrapper gc``. Only the
``local`` namespace is ever collected: generations the node agent filled are
the agent's.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ._root import (
    LEASES_DIR,
    LOCAL_NAMESPACE,
    STAGING_DIR,
    TRASH_DIR,
    is_generation_name,
    local_generation,
    local_root,
    open_root,
    open_subdir,
    opened,
    rmtree_at,
    root_lock,
)

log = logging.getLogger("modelwrapper")

LeaseKey = tuple[str, str, str]  # (real root, name, generation)


# -- process identity ---------------------------------------------------------
def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: ticks since boot when the process started."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def process_token(pid: int | None = None) -> str:
    """``<pid>-<starttime>``: names a process, not a reusable pid."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_time(pid)}"


def _alive(token: str) -> bool | None:
    """True/False for a ``<pid>-<starttime>`` token; None when it is not one."""
    pid_s, _, start = token.partition("-")
    if not pid_s.isdigit() or not start.isdigit():
        return None
    return str(start_time(int(pid_s))) == start


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd[:60]})" if cmd else "")


# -- leases -------------------------------------------------------------------
_mutex = threading.RLock()
_held: dict[LeaseKey, int] = {}


def _lease_id(name: str, generation: str) -> str:
    return f"{name}.{generation}"


def _write_lease(key: LeaseKey, root_fd: int) -> None:
    root, name, generation = key
    leases = Path(root) / LEASES_DIR
    with opened(open_subdir(root_fd, LEASES_DIR, leases)) as lfd:
        assert lfd is not None
        with opened(open_subdir(lfd, _lease_id(name, generation), leases / _lease_id(name, generation))) as gfd:
            assert gfd is not None
            body = json.dumps({"pid": os.getpid(), "pidns": _pid_namespace(), "created": time.time()}).encode()
            fd = os.open(process_token(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=gfd)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)


def _remove_lease(key: LeaseKey) -> None:
    root, name, generation = key
    try:
        os.unlink(Path(root) / LEASES_DIR / _lease_id(name, generation) / process_token())
    except OSError:
        pass


def acquire_locked(key: LeaseKey, root_fd: int) -> None:
    """One more wrapper object for ``key`` in this process; the caller holds
    the root lock (shared) and knows the generation exists."""
    with _mutex:
        n = _held.get(key, 0)
        if n == 0:
            _write_lease(key, root_fd)
        _held[key] = n + 1


def acquire(path: str | os.PathLike[str]) -> LeaseKey | None:
    """Leases ``path`` for a new wrapper object when it is a local
    generation; None (nothing to release later) otherwise, or when the root
    is not ours to write (the /proc scan still protects what we map)."""
    found = local_generation(path)
    if found is None:
        return None
    root, name, generation = found
    key: LeaseKey = (str(root), name, generation)
    with _mutex:
        if _held.get(key, 0) > 0:
            _held[key] += 1
            return key
        try:
            with opened(open_root(root, create=False)) as rfd:
                if rfd is None:
                    return None
                with root_lock(rfd) as locked:
                    if not locked:
                        log.warning("%s: the root lock is busy; leasing without it", root)
                    try:
                        os.lstat(root / LOCAL_NAMESPACE / name / generation)
                    except FileNotFoundError:
                        log.warning(
                            "%s was already freed: no wrapper object and no process held it when it was collected",
                            root / LOCAL_NAMESPACE / name / generation,
                        )
                        return None
                    acquire_locked(key, rfd)
                    return key
        except OSError as e:
            log.debug("cannot lease %s: %s", path, e)
            return None


def release(key: LeaseKey | None) -> None:
    """One wrapper object fewer; the last one removes this process's lease."""
    if key is None:
        return
    with _mutex:
        n = _held.get(key, 0) - 1
        if n > 0:
            _held[key] = n
            return
        _held.pop(key, None)
        _remove_lease(key)


def _after_fork_in_child() -> None:
    """A forked child inherits the parent's wrapper objects: lease them in its own name."""
    global _mutex
    _mutex = threading.RLock()
    for root, name, generation in list(_held):
        try:
            with opened(open_root(Path(root), create=False)) as rfd:
                if rfd is not None:
                    _write_lease((root, name, generation), rfd)
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- who maps what ------------------------------------------------------------
def processes_using(local_dir: Path) -> dict[tuple[str, str], set[int]]:
    """``(name, generation)`` -> pids that map or hold open a file below
    ``local_dir`` (``<root>/local``), from /proc/*/maps and /proc/*/fd.
    Processes whose /proc entries we may not read (other users') and
    processes in other mount namespaces are not seen."""
    prefix = str(local_dir) + "/"
    found: dict[tuple[str, str], set[int]] = {}

    def hit(pid: int, path: str) -> None:
        parts = path[len(prefix) :].split("/")
        if len(parts) >= 2:
            found.setdefault((parts[0], parts[1].removesuffix(" (deleted)")), set()).add(pid)

    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read().decode(errors="replace")
        except OSError:
            maps = ""
        if prefix in maps:
            for line in maps.splitlines():
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith(prefix):
                    hit(pid, fields[5])
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                hit(pid, target)
    return found


# -- collection ---------------------------------------------------------------
@dataclass
class Decision:
    path: Path
    bytes: int
    reason: str


@dataclass
class GcReport:
    """What one collection freed and kept, and why."""

    root: Path
    dry_run: bool = False
    freed: list[Decision] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)
    busy: bool = False

    @property
    def freed_bytes(self) -> int:
        return sum(d.bytes for d in self.freed)

    def lines(self) -> Iterator[str]:
        verb = "would free" if self.dry_run else "freed"
        for d in self.freed:
            yield f"{verb} {d.path} ({_mib(d.bytes)}): {d.reason}"
        for d in self.kept:
            yield f"kept {d.path} ({_mib(d.bytes)}): {d.reason}"
        if self.busy:
            yield f"{self.root}: another process is collecting or publishing right now; nothing was collected"
        yield (
            f"{verb} {len(self.freed)} item(s), {_mib(self.freed_bytes)}; kept {len(self.kept)} generation(s), "
            f"{_mib(sum(d.bytes for d in self.kept))} (only {self.root / LOCAL_NAMESPACE} is collected here; "
            "generations the node agent filled are the agent's)"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _allocated(dir_fd: int, name: str) -> int:
    """Bytes a directory tree holds on its file system (st_blocks: real pages on tmpfs)."""
    total = 0
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return 0
    total += st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return total
    try:
        for child in os.listdir(fd):
            total += _allocated(fd, child)
    finally:
        os.close(fd)
    return total


def _subdirs(dir_fd: int) -> list[tuple[str, bool]]:
    """(name, is_symlink) of the directories and links in ``dir_fd``, sorted."""
    out = []
    for e in os.scandir(dir_fd):
        if e.is_symlink():
            out.append((e.name, True))
        elif e.is_dir(follow_symlinks=False):
            out.append((e.name, False))
    return sorted(out)


def _live_leases(leases_fd: int | None, root: Path, dry_run: bool) -> dict[str, list[str]]:
    """lease id -> live holders; removes the leases of processes that are gone."""
    live: dict[str, list[str]] = {}
    if leases_fd is None:
        return live
    my_ns = _pid_namespace()
    for lease_id, is_link in _subdirs(leases_fd):
        if is_link:
            continue
        try:
            gfd = os.open(lease_id, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=leases_fd)
        except OSError:
            continue
        try:
            for token in os.listdir(gfd):
                alive = _alive(token)
                if alive is None:
                    continue
                if not alive:
                    ns = None
                    try:
                        fd = os.open(token, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=gfd)
                        try:
                            ns = json.loads(os.read(fd, 4096) or b"{}").get("pidns")
                        finally:
                            os.close(fd)
                    except (OSError, ValueError, AttributeError):
                        pass
                    if ns and my_ns and ns != my_ns:
                        # Another pid namespace (a container sharing this
                        # tmpfs): we cannot tell whether it lives; keep it.
                        live.setdefault(lease_id, []).append(
                            f"pid {token.partition('-')[0]} in another pid namespace ({ns}; remove "
                            f"{root / LEASES_DIR / lease_id / token} once it has exited)"
                        )
                    elif not dry_run:
                        try:
                            os.unlink(token, dir_fd=gfd)
                        except OSError:
                            pass
                    continue
                live.setdefault(lease_id, []).append(_describe(int(token.partition("-")[0])))
        finally:
            os.close(gfd)
    return live


def collect(
    root: Path | None = None,
    *,
    dry_run: bool = False,
    only: tuple[str, str] | None = None,
    timeout: float | None = 60.0,
) -> GcReport:
    """Frees the generations under ``<root>/local`` that no live process
    leases, maps or holds open, and what interrupted ``from_model()`` calls
    left in ``.staging`` and ``.trash``. ``only`` limits it to one
    ``(name, generation)``. With ``timeout=0`` it gives up at once when
    another process holds the root lock (``report.busy``)."""
    root = Path(os.path.abspath(root or local_root()))
    report = GcReport(root=root, dry_run=dry_run)
    with opened(open_root(root, create=False)) as rfd:
        if rfd is None:
            return report
        real_root = Path(os.path.realpath(root))
        doomed: list[tuple[int, str]] = []  # (dir fd, name) to delete after the lock is released
        try:
            with root_lock(rfd, exclusive=True, timeout=timeout) as locked:
                if not locked:
                    report.busy = True
                    return report
                _collect_locked(rfd, root, real_root, report, only, doomed)
        finally:
            for dfd, name in doomed:
                try:
                    rmtree_at(dfd, name)
                finally:
                    os.close(dfd)
    return report


def _collect_locked(
    rfd: int,
    root: Path,
    real_root: Path,
    report: GcReport,
    only: tuple[str, str] | None,
    doomed: list[tuple[int, str]],
) -> None:
    dry = report.dry_run
    leases_fd = open_subdir(rfd, LEASES_DIR, root / LEASES_DIR, create=False)
    try:
        live = _live_leases(leases_fd, root, dry)
        users = processes_using(real_root / LOCAL_NAMESPACE)
        if only is None:
            _collect_leftovers(rfd, root, report, doomed)
        local_fd = open_subdir(rfd, LOCAL_NAMESPACE, root / LOCAL_NAMESPACE, create=False)
        if local_fd is None:
            return
        try:
            for name, is_link in _subdirs(local_fd):
                if only is not None and name != only[0]:
                    continue
                wpath = root / LOCAL_NAMESPACE / name
                if is_link:
                    report.kept.append(Decision(wpath, 0, "not collected: a symbolic link, which from_model() never makes"))
                    continue
                wfd = open_subdir(local_fd, name, wpath, create=False)
                if wfd is None:
                    continue
                try:
                    for gen, gen_is_link in _subdirs(wfd):
                        if only is not None and gen != only[1]:
                            continue
                        gpath = wpath / gen
                        if gen_is_link or not is_generation_name(gen):
                            report.kept.append(Decision(gpath, 0, "not collected: not a generation from_model() made"))
                            continue
                        size = _allocated(wfd, gen)
                        holders = live.get(_lease_id(name, gen))
                        mappers = users.get((name, gen))
                        if holders:
                            report.kept.append(Decision(gpath, size, "a ModelWrapper is alive in " + ", ".join(holders)))
                        elif mappers:
                            report.kept.append(
                                Decision(gpath, size, "mapped or open (loaded tensors) in " + ", ".join(_describe(p) for p in sorted(mappers)))
                            )
                        else:
                            report.freed.append(Decision(gpath, size, "no ModelWrapper holds it and no process maps it"))
                            if not dry:
                                _discard(rfd, root, wfd, gen, leases_fd, _lease_id(name, gen), doomed)
                    if not dry:
                        try:
                            os.rmdir(name, dir_fd=local_fd)  # only when empty
                        except OSError:
                            pass
                finally:
                    os.close(wfd)
        finally:
            os.close(local_fd)
        if leases_fd is not None and not dry and only is None:
            # lease directories of generations that are gone and have no holder
            for lease_id, is_link in _subdirs(leases_fd):
                if not is_link and lease_id not in live:
                    try:
                        os.rmdir(lease_id, dir_fd=leases_fd)
                    except OSError:
                        pass
    finally:
        if leases_fd is not None:
            os.close(leases_fd)


def _discard(rfd: int, root: Path, parent_fd: int, name: str, leases_fd: int | None, lease_id: str, doomed: list[tuple[int, str]]) -> None:
    """Renames ``name`` into ``.trash`` (atomic: no reader sees half a
    generation), and queues it for deletion."""
    trash_fd = open_subdir(rfd, TRASH_DIR, root / TRASH_DIR)
    assert trash_fd is not None
    trashed = f"{lease_id}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(name, trashed, src_dir_fd=parent_fd, dst_dir_fd=trash_fd)
    except OSError:
        os.close(trash_fd)
        raise
    doomed.append((trash_fd, trashed))
    if leases_fd is not None:
        rmtree_at(leases_fd, lease_id)


def _collect_leftovers(rfd: int, root: Path, report: GcReport, doomed: list[tuple[int, str]]) -> None:
    """``.trash`` entries (a collection interrupted before deleting) and
    ``.staging/local.*`` of ``from_model()`` calls whose process is gone. The
    node agent's own staging entries (other names) are left alone."""
    dry = report.dry_run
    trash_fd = open_subdir(rfd, TRASH_DIR, root / TRASH_DIR, create=False)
    if trash_fd is not None:
        for name in sorted(os.listdir(trash_fd)):
            report.freed.append(Decision(root / TRASH_DIR / name, _allocated(trash_fd, name), "left by an interrupted collection"))
            if not dry:
                doomed.append((os.dup(trash_fd), name))
        os.close(trash_fd)
    staging_fd = open_subdir(rfd, STAGING_DIR, root / STAGING_DIR, create=False)
    if staging_fd is not None:
        for name in sorted(os.listdir(staging_fd)):
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != LOCAL_NAMESPACE or _alive(parts[2]) is not False:
                continue
            report.freed.append(
                Decision(root / STAGING_DIR / name, _allocated(staging_fd, name), f"left by a from_model() in pid {parts[2].partition('-')[0]}, which is gone")
            )
            if not dry:
                doomed.append((os.dup(staging_fd), name))
        os.close(staging_fd)
