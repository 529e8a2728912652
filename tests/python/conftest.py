"""pytest fixtures for the zarrfs end-to-end tests; assertion helpers are in helpers.py, the
mount guard, /proc probes and servers in the shared kit (tests/kit)."""

from __future__ import annotations

import gc
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared kit
import stores  # noqa: E402
from helpers import PUBLIC_TMP_PREFIX, TEST_TIMEOUT  # noqa: E402
from kit import (  # noqa: E402
    ZARRFS_BIN,
    Mount,
    force_unmount,
    kill_and_reap,
    live_mounts,
    proc_mounts,
    real_path,
    zarrfs_pids,
)


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def zarrfs_bin() -> Path:
    if not (ZARRFS_BIN.is_file() and os.access(ZARRFS_BIN, os.X_OK)):
        pytest.fail(f"zarrfs binary not found at {ZARRFS_BIN} (set ZARRFS_BIN or run cargo build --release)")
    return ZARRFS_BIN


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_mounts(tmp_path_factory):
    """At session end: nothing may stay mounted under the test temp dirs and no
    zarrfs process started on them may survive. Cleans up, then reports."""
    base = os.path.realpath(tmp_path_factory.getbasetemp())
    yield
    gc.collect()
    leftover = [m["mountpoint"] for m in proc_mounts()
                if m["mountpoint"].startswith(base + "/") or m["mountpoint"].startswith(PUBLIC_TMP_PREFIX)]
    for mp in reversed(leftover):
        force_unmount(mp)
    procs = zarrfs_pids(base) + [p for p in zarrfs_pids("/tmp") if _args_have_prefix(p, PUBLIC_TMP_PREFIX)]
    for pid in procs:
        kill_and_reap(pid, 2)
    assert not leftover, f"mounts left behind: {leftover}"
    assert not procs, f"zarrfs processes left behind: {procs}"


def _args_have_prefix(pid: int, prefix: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return any(a.decode(errors="replace").startswith(prefix) for a in f.read().split(b"\0"))
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Abort live mounts if a test runs longer than TEST_TIMEOUT seconds."""
    fired = threading.Event()

    def fire():
        fired.set()
        for m in live_mounts():
            try:
                m.abort()
            except Exception:  # noqa: BLE001 - best effort from a timer thread
                pass

    t = threading.Timer(TEST_TIMEOUT, fire)
    t.daemon = True
    t.start()
    yield
    t.cancel()
    if fired.is_set():
        pytest.fail(f"watchdog: test exceeded {TEST_TIMEOUT}s; killed the zarrfs daemons of live mounts")


@pytest.fixture
def mount_factory(zarrfs_bin, tmp_path):
    """mount_factory(store, *args, mountpoint=None, foreground=False) -> live Mount,
    unmounted at teardown."""
    made: list[Mount] = []

    def factory(store, *args, mountpoint=None, foreground=False, env=None) -> Mount:
        mp = Path(mountpoint) if mountpoint else tmp_path / f"mnt{len(made)}"
        m = Mount(store, mp, *args, foreground=foreground, env=env)
        made.append(m)
        return m.start()

    yield factory
    gc.collect()
    for m in reversed(made):
        m.close()


@pytest.fixture
def guard_paths(tmp_path):
    """Register mount points/stores a test passes to zarrfs by hand; anything
    mounted there or still running on them is cleaned up at teardown."""
    paths: list[str] = []
    yield paths
    gc.collect()
    for p in paths:
        force_unmount(real_path(p))
    for pid in zarrfs_pids(*[str(p) for p in paths], *[real_path(p) for p in paths]):
        kill_and_reap(pid, 2)


@pytest.fixture(scope="session")
def big_stores(tmp_path_factory) -> dict[int, Path]:
    """The two multi-array stores, keyed by zarr format."""
    base = tmp_path_factory.mktemp("stores")
    out = {}
    for fmt in (2, 3):
        root = base / f"big_v{fmt}.zarr"
        stores.build_big_store(root, fmt)
        out[fmt] = root
    return out


