"""`mount -t fuse.zarrfs` and an fstab line (via `mount -T FILE`) with mount(8).

The mount itself runs in a private mount namespace (see mount_helper_inner.py
for why PATH alone does not reach mount.fuse3's shell); the binary is exposed
as ``zarrfs`` through a symlink in a temp dir, and that dir is also prepended
to PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import stores
from kit import clean_env, kill_and_reap, real_path, zarrfs_pids

INNER = Path(__file__).resolve().parent / "mount_helper_inner.py"


@pytest.fixture
def helper_setup(zarrfs_bin, tmp_path, guard_paths):
    if not shutil.which("unshare"):
        pytest.skip("unshare(1) not available")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "zarrfs").symlink_to(zarrfs_bin)
    store = tmp_path / "helper.zarr"
    stores.build_simple_store(store, 3, shape=(300, 500), dtype="float32", chunks=(64, 128))
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.extend([str(mp), str(store)])
    return store, mp, bindir


def _run_inner(*args) -> subprocess.CompletedProcess:
    cmd = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, str(INNER), *map(str, args)]
    try:
        env = clean_env(ZARRFS_TEST_OUTER_MNT_NS=os.readlink("/proc/self/ns/mnt"))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    finally:
        # a daemon left behind keeps the private namespace (and its mount) alive
        for pid in zarrfs_pids(*[str(a) for a in args[1:3]]):
            kill_and_reap(pid, 2)


def test_mount_type_fuse_zarrfs(helper_setup):
    store, mp, bindir = helper_setup
    r = _run_inner("type", real_path(store), real_path(mp), bindir, "data")
    assert r.returncode == 0, f"mount -t fuse.zarrfs: {r.stderr.strip()}\n{r.stdout}"


def test_fstab_line(helper_setup, tmp_path):
    store, mp, bindir = helper_setup
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{real_path(store)} {real_path(mp)} fuse.zarrfs ro,relatime,nodiratime,nofail,cache_size=64M 0 0\n")
    r = _run_inner("fstab", real_path(store), real_path(mp), bindir, "data", fstab)
    assert r.returncode == 0, f"mount -T {fstab} {mp}: {r.stderr.strip()}\n{r.stdout}"
