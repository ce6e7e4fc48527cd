"""The local shared-memory root (``$MODELWRAPPER_ROOT``): where it is,
whether it can be trusted, and the lock that orders publishing, leasing and
loading against garbage collection.

Everything ``from_model()`` shares lives under this root, and every process
that loads from it runs what it finds there (skeleton pickles) and computes
with its weights. So the root must belong to the user who shares, nobody else
may write to it, and no symbolic link below it is ever followed: a link would
let whoever controls it decide where weights are written or what is deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import pwd
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

DEFAULT_ROOT = "/dev/shm/zerocopy"
LOCAL_NAMESPACE = "local"
STAGING_DIR = ".staging"
LEASES_DIR = ".leases"
TRASH_DIR = ".trash"
# Not the agent's ".lock": an agent holds that one exclusively for as long as it runs.
LOCK_FILE = ".modelwrapper.lock"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GENERATION = re.compile(r"^[0-9a-f]{16}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_EXCHANGE = 2


class UnsafeRootError(PermissionError):
    """The local root (or an entry below it) cannot be trusted; the message
    names the path, its owner and what to do."""


def local_root() -> Path:
    return Path(os.environ.get("MODELWRAPPER_ROOT") or DEFAULT_ROOT)


def dir_mode() -> int:
    """0755 for root (pods of other users may load what root shares), 0700 otherwise."""
    return 0o755 if os.geteuid() == 0 else 0o700


def check_name(name: str) -> str:
    if not _DNS_LABEL.match(name):
        raise ValueError(
            f"name {name!r} is not a DNS-1123 label (lower-case letters, digits and '-', at most 63): "
            "it becomes a directory under the local root"
        )
    return name


def is_generation_name(name: str) -> bool:
    return bool(_GENERATION.match(name))


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _label(what: str, path: Path) -> str:
    return f"{what} {path}" if what else str(path)


def _check_trusted(st: os.stat_result, path: Path, what: str) -> None:
    me = os.geteuid()
    try:
        user = pwd.getpwuid(me).pw_name
    except KeyError:
        user = str(me)
    fix = (
        "Set MODELWRAPPER_ROOT to a directory you own that nobody else can write "
        f"(for example /dev/shm/zerocopy-{user}), or remove {path}"
    )
    label = _label(what, path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRootError(f"{label} is not a directory. {fix}")
    if st.st_uid != me:
        raise UnsafeRootError(
            f"{label} is owned by {_owner(st.st_uid)}, not by you ({_owner(me)}): its owner could swap the "
            f"weights or skeletons that every process loading from it runs. {fix}"
        )
    if st.st_mode & 0o022:
        raise UnsafeRootError(
            f"{label} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): other users could plant "
            f"or replace files in it. Run `chmod go-w {path}`, or: {fix}"
        )


def _refuse_link(parent_fd: int | None, name: str | Path, path: Path, what: str) -> None:
    """Raises if ``name`` is a symbolic link (called when an O_NOFOLLOW open failed)."""
    try:
        st = os.lstat(name, dir_fd=parent_fd) if parent_fd is not None else os.lstat(name)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=parent_fd) if parent_fd is not None else os.readlink(name)
        raise UnsafeRootError(
            f"{_label(what, path)} is a symbolic link (to {target}); refusing to follow it, since whoever controls the link "
            f"decides where weights are written and what is deleted. Remove the link, or set MODELWRAPPER_ROOT "
            "to the real directory"
        )


def open_root(root: Path | None = None, *, create: bool = True) -> int | None:
    """Opens (creating it if asked) the local root and checks that it can be
    trusted. Returns a directory fd, or None when it does not exist and
    ``create`` is false."""
    root = Path(os.path.abspath(root or local_root()))
    created = False
    if create:
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(root, dir_mode())
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            return None
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_link(None, root, root, "the local shared-memory root")
        raise UnsafeRootError(f"the local shared-memory root {root} cannot be opened as a directory: {e}") from None
    try:
        if created:
            os.fchmod(fd, dir_mode())  # mkdir's mode is masked by the umask
        _check_trusted(os.fstat(fd), root, "the local shared-memory root")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_subdir(parent_fd: int, name: str, path: Path, *, create: bool = True) -> int | None:
    """Opens ``name`` below ``parent_fd`` without following a link, creating
    it (mode 0700, or 0755 for root) if asked; checks it like the root."""
    if create:
        try:
            os.mkdir(name, dir_mode(), dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            return None
        raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_link(parent_fd, name, path, "")
        raise UnsafeRootError(f"{path} cannot be opened as a directory: {e}") from None
    try:
        _check_trusted(os.fstat(fd), path, "")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened(fd: int | None) -> Iterator[int | None]:
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def fd_path(fd: int, name: str = "") -> str:
    """A path that reaches exactly the directory ``fd`` is open on, whatever
    happens to the names above it (for APIs that only take paths)."""
    return f"/proc/self/fd/{fd}" + (f"/{name}" if name else "")


def rmtree_at(dir_fd: int, name: str) -> None:
    """Removes ``name`` below ``dir_fd`` without following links inside it."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, ignore_errors=True, dir_fd=dir_fd)
    else:  # pragma: no cover - rmtree follows no links either, given a real directory
        shutil.rmtree(fd_path(dir_fd, name), ignore_errors=True)


def exchange(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
    """Atomically swaps two directory entries (renameat2 RENAME_EXCHANGE).
    False where the kernel or libc cannot, so the caller falls back."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), _RENAME_EXCHANGE) == 0


def local_generation(path: str | os.PathLike[str]) -> tuple[Path, str, str] | None:
    """``(root, name, generation)`` when ``path`` is a generation that
    ``from_model()`` published (``<root>/local/<name>/<generation>`` with the
    root's ``.leases`` beside it); None for anything else, such as volumes the
    node agent filled, which the agent collects."""
    p = Path(os.path.realpath(path))
    if len(p.parts) < 4 or p.parent.parent.name != LOCAL_NAMESPACE or not is_generation_name(p.name):
        return None
    root = p.parents[2]
    try:
        if not stat.S_ISDIR(os.lstat(root / LEASES_DIR).st_mode):
            return None
    except OSError:
        return None
    return root, p.parent.name, p.name


@contextlib.contextmanager
def root_lock(root_fd: int, *, exclusive: bool = False, timeout: float | None = 60.0) -> Iterator[bool]:
    """``flock`` on ``<root>/.modelwrapper.lock``: garbage collection holds it exclusively
    while it decides and renames; publishing, leasing and mapping a local
    generation hold it shared, so a generation cannot vanish between "it is
    there" and "it is leased or mapped". Yields False when the lock could not
    be had within ``timeout`` (0: do not wait) or the file cannot be opened
    (a root of another user that we only read from). Not reentrant."""
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    except OSError:
        try:
            fd = os.open(LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            yield False
            return
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = None if timeout is None else time.monotonic() + timeout
        got = False
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                got = True
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
        yield got
    finally:
        os.close(fd)  # releases the lock
