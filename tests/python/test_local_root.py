"""The local shared-memory root is trusted only when it is ours, private, and free of links."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from modelwrapper import ModelWrapper, UnsafeRootError
from mw_models import Encoder

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "modelwrapper"


@pytest.fixture
def root(shm: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELWRAPPER_ROOT", str(shm / "root"))
    return shm / "root"


def test_the_root_is_created_for_its_user_only(root: Path) -> None:
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        ModelWrapper.from_model(Encoder(), name="enc")
    finally:
        os.umask(old)
    st = root.stat()
    assert st.st_uid == os.geteuid()
    assert st.st_mode & 0o777 == (0o755 if os.geteuid() == 0 else 0o700)
    for sub in ("local", ".staging", ".leases"):
        assert (root / sub).stat().st_mode & 0o022 == 0, sub


@pytest.fixture
def public_tmpfs():
    """A tmpfs that another user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="mw-public-"))
    d.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "zerocopy-test", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()


UNPRIVILEGED = textwrap.dedent(
    """
    import importlib.util, os, stat, sys
    spec = importlib.util.spec_from_file_location("_root", sys.argv[1])
    _root = importlib.util.module_from_spec(spec); spec.loader.exec_module(_root)  # stdlib only
    os.umask(0)
    os.close(_root.open_root(_root.Path(sys.argv[2])))
    st = os.stat(sys.argv[2])
    print(oct(stat.S_IMODE(st.st_mode)), st.st_uid)
    try:
        _root.open_root(_root.Path(sys.argv[3]), create=False)
    except _root.UnsafeRootError as e:
        print("refused:", e)
    """
)


def test_a_non_root_user_gets_a_0700_root_and_refuses_roots_of_others(public_tmpfs: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system python3 that an unprivileged user can run")
    others = public_tmpfs / "roots-of-root"
    others.mkdir(mode=0o755)  # owned by root, not by nobody
    proc = subprocess.run(
        [python, "-c", UNPRIVILEGED, str(PACKAGE / "_root.py"), str(public_tmpfs / "mine"), str(others)],
        capture_output=True,
        text=True,
        user=65534,
        group=65534,
        cwd="/",
    )
    if proc.returncode != 0 and "Permission denied" in proc.stderr and "_root.py" in proc.stderr:
        pytest.skip(f"the checkout is not readable by an unprivileged user: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    created, refusal = proc.stdout.splitlines()
    assert created == "0o700 65534"
    assert f"{others} is owned by uid 0" in refusal and "not by you (uid 65534" in refusal
    assert "Set MODELWRAPPER_ROOT to a directory you own" in refusal


def test_a_symlinked_root_is_refused(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shm / "real"
    real.mkdir(mode=0o700)
    (shm / "link").symlink_to(real)
    monkeypatch.setenv("MODELWRAPPER_ROOT", str(shm / "link"))
    with pytest.raises(UnsafeRootError, match=rf"{re.escape(str(shm / 'link'))} is a symbolic link \(to {re.escape(str(real))}\); refusing to follow it.*MODELWRAPPER_ROOT"):
        ModelWrapper.from_model(Encoder())
    assert not list(real.iterdir())


def test_a_root_owned_by_another_user_is_refused(root: Path) -> None:
    root.mkdir(mode=0o755)
    os.chown(root, 12345, 12345)
    with pytest.raises(UnsafeRootError, match=rf"{re.escape(str(root))} is owned by uid 12345, not by you .*Set MODELWRAPPER_ROOT to a directory you own"):
        ModelWrapper.from_model(Encoder())
    assert not list(root.iterdir())


def test_a_group_or_world_writable_root_is_refused(root: Path) -> None:
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(UnsafeRootError, match=rf"{re.escape(str(root))} is group- or world-writable \(mode 0777\).*chmod go-w {re.escape(str(root))}"):
        ModelWrapper.from_model(Encoder())
    assert not list(root.iterdir())


@pytest.mark.parametrize("link", [".staging", "local", "local/enc"])
def test_links_below_the_root_are_never_followed(shm: Path, root: Path, link: str) -> None:
    ModelWrapper.from_model(Encoder(dim=8, hidden=8), name="other").release()  # creates the root's layout
    elsewhere = shm / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(root / link, ignore_errors=True)
    (root / link).parent.mkdir(exist_ok=True)
    (root / link).symlink_to(elsewhere)
    with pytest.raises(UnsafeRootError, match=rf"{re.escape(str(root / link))} is a symbolic link \(to {re.escape(str(elsewhere))}\); refusing to follow it"):
        ModelWrapper.from_model(Encoder(), name="enc")
    assert not list(elsewhere.iterdir())


def test_name_cannot_leave_the_root(root: Path) -> None:
    with pytest.raises(ValueError, match="not a DNS-1123 label"):
        ModelWrapper.from_model(Encoder(), name="../../etc")


def test_an_existing_generation_is_reused_only_when_its_files_match(root: Path) -> None:
    torch.manual_seed(0)
    enc = Encoder()
    first = ModelWrapper.from_model(enc, name="enc")
    weights = first.path / "model.safetensors"
    manifest = first.path / "manifest.json"
    inode = manifest.stat().st_ino
    assert ModelWrapper.from_model(enc, name="enc").path == first.path
    assert manifest.stat().st_ino == inode, "an intact generation is reused as is"

    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    again = ModelWrapper.from_model(enc, name="enc")
    assert again.path == first.path
    assert hashlib.sha256((again.path / "model.safetensors").read_bytes()).hexdigest() == good
    assert manifest.stat().st_ino != inode, "a tampered generation is replaced"
    x = torch.randn(3, 64)
    assert torch.equal(again.load()(x), enc(x))
    assert not list((root / ".staging").iterdir())
