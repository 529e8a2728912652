"""Tests of the installed wheel: run by `make test-wheel` in a fresh venv outside the build tree,
with a PATH that has neither cargo nor target/release, so the only zarrfs there is the wheel's.

Self-contained on purpose (no tests/kit: the build tree is out of reach): each test bounds its
own polling and the `_cleanup` fixture undoes whatever a failing test left mounted or running.
Stores are written by zarr-python; what the mount shows is compared with what zarr reads.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import zarr

import zarrfs

WAIT_SECONDS = 30


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll `condition` (bounded): a daemon's exit and an unmount are asynchronous."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def mount_points() -> List[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split(" ")[4].replace("\\040", " ") for line in f]


def is_mounted(path: os.PathLike | str) -> bool:
    return os.path.abspath(path) in mount_points()


def zarrfs_pids(needle: str) -> List[int]:
    """Live zarrfs processes whose command line mentions `needle` (a test's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if "zombie" in state:
            continue
        if argv and os.path.basename(argv[0]) == b"zarrfs" and any(needle.encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(autouse=True)
def _cleanup(tmp_path, monkeypatch):
    """Private mount points under this test's tmp_path; afterwards nothing of the test stays
    mounted or running (cleaned up, then reported)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield
    gc.collect()
    base = str(tmp_path.resolve())
    left = [m for m in mount_points() if m.startswith(base + "/")]
    for m in reversed(left):
        subprocess.run(["umount", "-l", m], check=False)
    procs = zarrfs_pids(base)
    for pid in procs:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"mounts left behind: {left}"
    assert not procs, f"zarrfs processes left behind: {procs}"


@pytest.fixture
def store(tmp_path) -> Path:
    """A Zarr v3 store written by zarr-python: grp/t (float32, 3x4 chunks of 16x16, zstd)."""
    path = tmp_path / "data.zarr"
    root = zarr.open_group(str(path), mode="w")
    t = root.create_group("grp").create_array("t", shape=(40, 50), chunks=(16, 16), dtype="f4")
    t[...] = np.arange(40 * 50, dtype="f4").reshape(40, 50)
    return path


def expected(store: Path) -> np.ndarray:
    return zarr.open_array(str(store / "grp" / "t"), mode="r")[...]


def private_mount_dirs(tmp_path: Path) -> List[Path]:
    return sorted(tmp_path.glob("zarrfs-*"))


# --------------------------------------------------------------------------------------------
# the wheel itself


def test_metadata_and_file_list_are_what_pip_shows():
    version = os.environ["ZARRFS_EXPECTED_VERSION"]  # from Cargo.toml, given by make test-wheel
    shown = run(sys.executable, "-m", "pip", "show", "-f", "zarrfs").stdout
    fields = dict(line.split(": ", 1) for line in shown.splitlines() if ": " in line and not line.startswith(" "))
    assert fields["Name"] == "zarrfs"
    assert fields["Version"] == version
    assert fields["Summary"] == "Mount Zarr arrays as flat, memory-mappable files through FUSE"
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    assert "../../../bin/zarrfs" in files, files
    assert {"zarrfs/__init__.py", "zarrfs/py.typed"} <= set(files), files
    assert f"zarrfs-{version}.dist-info/METADATA" in files, files

    from importlib.metadata import metadata
    meta = metadata("zarrfs")
    assert meta["License-Expression"] == "MIT OR Apache-2.0"  # pip show prints it from pip 25.1 on
    classifiers = meta.get_all("Classifier")
    for c in ("Operating System :: POSIX :: Linux", "Programming Language :: Rust",
              "Topic :: Scientific/Engineering", "Topic :: System :: Filesystems"):
        assert c in classifiers
    assert meta["Requires-Python"] == ">=3.9"
    assert meta.get_all("Provides-Extra") == ["numpy"]
    assert "# zarrfs" in meta.get_payload() or "# zarrfs" in (meta["Description"] or "")


def test_the_command_and_package_are_the_wheels():
    prefix = os.path.realpath(sys.prefix)
    assert os.path.realpath(zarrfs.__file__).startswith(prefix + "/"), zarrfs.__file__
    assert zarrfs.__version__ == os.environ["ZARRFS_EXPECTED_VERSION"]
    command = zarrfs.zarrfs_command()
    assert command == os.path.join(sysconfig.get_path("scripts"), "zarrfs")
    assert shutil.which("zarrfs") == command, "the venv's zarrfs must be the one on PATH"
    assert shutil.which("cargo") is None, "the test must run without a Rust toolchain"
    version = run(command, "--version").stdout.split()
    assert version == ["zarrfs", os.environ["ZARRFS_EXPECTED_VERSION"]]


# --------------------------------------------------------------------------------------------
# mount / unmount


def test_with_block_mounts_and_unmounts(store, tmp_path):
    with zarrfs.mount(store, cache_size="64M", threads=2) as root:
        assert isinstance(root, Path)
        assert is_mounted(root)
        assert root.parent == tmp_path and root.name.startswith("zarrfs-")
        a = np.load(root / "grp" / "t.npy", mmap_mode="r")
        np.testing.assert_array_equal(a, expected(store))
        assert os.getxattr(root / "grp" / "t", "user.zarr.dtype") == b"<f4"
        del a
    assert not is_mounted(root)
    assert not root.exists(), "the private mount point is removed"


def test_given_mount_point_stays(store, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    with zarrfs.mount(store, mp) as root:
        assert root == mp and is_mounted(mp)
        assert sorted(p.name for p in (root / "grp").iterdir()) == ["t", "t.npy"]
    assert not is_mounted(mp) and mp.is_dir()


def test_exception_in_the_block_still_unmounts(store):
    with pytest.raises(KeyError):
        with zarrfs.mount(store) as root:
            assert is_mounted(root)
            raise KeyError("boom")
    assert not is_mounted(root) and not root.exists()


def test_keyboard_interrupt_still_unmounts(store):
    with pytest.raises(KeyboardInterrupt):
        with zarrfs.mount(store) as root:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python raises KeyboardInterrupt here
            wait_until(lambda: False, "the interrupt", timeout=10)
    assert not is_mounted(root) and not root.exists()


def test_open_files_after_the_block_keep_working(store):
    """A memmap taken inside the block outlives it: the mount point is detached at once, the
    daemon serves the mapping until it is dropped, then exits."""
    with zarrfs.mount(store) as root:
        a = np.load(root / "grp" / "t.npy", mmap_mode="r")
    assert not is_mounted(root)
    np.testing.assert_array_equal(a, expected(store))
    del a
    gc.collect()
    wait_until(lambda: not zarrfs_pids(str(root)), "the daemon to exit once the memmap is gone")


def test_failed_mount_raises_the_one_line_error(tmp_path):
    missing = tmp_path / "missing.zarr"
    with pytest.raises(zarrfs.MountError) as caught:
        with zarrfs.mount(missing):
            pytest.fail("mounted a missing store")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"zarrfs: {missing}: "), message
    assert caught.value.returncode == 1
    assert private_mount_dirs(tmp_path) == [], "the private mount point is removed"


def test_bad_option_raises_naming_it(store, tmp_path):
    with pytest.raises(zarrfs.MountError, match="frobnicate"):
        with zarrfs.mount(store, frobnicate=3):
            pass
    with pytest.raises(zarrfs.MountError, match='threads: "0" is not a positive number'):
        with zarrfs.mount(store, threads=0):
            pass
    assert private_mount_dirs(tmp_path) == []


CHILD = textwrap.dedent("""
    import sys, zarrfs, numpy as np
    how = sys.argv[2]
    if how == "with":
        cm = zarrfs.mount(sys.argv[1])
        root = cm.__enter__()
        a = np.load(root / "grp" / "t.npy", mmap_mode="r")
    else:
        a = zarrfs.memmap(sys.argv[1], "grp/t")
        root = str(a.filename).rsplit("/grp/", 1)[0]
    print(root, float(a[1, 2]), flush=True)
    if how != "exit":
        sys.stdin.read()  # until killed
""")


@pytest.mark.parametrize("how", ["with", "memmap"])
def test_killed_parent_leaves_no_mount_and_no_daemon(store, tmp_path, how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store), how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        root, value = child.stdout.readline().split()
        assert float(value) == expected(store)[1, 2]
        assert is_mounted(root) and zarrfs_pids(root)
        child.kill()  # SIGKILL: no finally, no atexit in the child
        child.wait(timeout=WAIT_SECONDS)
        wait_until(lambda: not is_mounted(root), "the daemon to unmount after its parent was killed")
        wait_until(lambda: not zarrfs_pids(root), "the daemon to exit")
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()


def test_interpreter_exit_unmounts_a_live_memmap(store, tmp_path):
    done = run(sys.executable, "-c", CHILD, str(store), "exit")
    root = done.stdout.split()[0]
    assert not is_mounted(root)
    assert not Path(root).exists(), "the private mount point is removed at exit"
    wait_until(lambda: not zarrfs_pids(root), "the daemon to exit")


# --------------------------------------------------------------------------------------------
# memmap


def test_memmap_unmounts_when_collected(store):
    a = zarrfs.memmap(store, "grp/t")
    assert isinstance(a, np.memmap)
    np.testing.assert_array_equal(a, expected(store))
    root = Path(a.filename).parent.parent
    view = a[10:20]
    del a
    gc.collect()
    assert is_mounted(root), "a view keeps the mount alive"
    np.testing.assert_array_equal(view, expected(store)[10:20])
    del view
    gc.collect()
    wait_until(lambda: not is_mounted(root), "the memmap's mount to go once collected")
    wait_until(lambda: not zarrfs_pids(str(root)), "the daemon to exit")
    assert not root.exists()


def test_memmap_of_a_missing_array_raises_and_unmounts(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        zarrfs.memmap(store, "grp/nothing")
    assert private_mount_dirs(tmp_path) == []
    assert not zarrfs_pids(str(tmp_path))


def test_memmap_r_plus_writes_to_the_store(store):
    a = zarrfs.memmap(store, "grp/t", mode="r+")
    a[0, :3] = [-1, -2, -3]
    a.flush()
    del a
    gc.collect()
    np.testing.assert_array_equal(expected(store)[0, :4], [-1, -2, -3, 3])


# --------------------------------------------------------------------------------------------
# stats and the commands


def test_stats_counts_the_chunks_decoded(store):
    with zarrfs.mount(store, cache_size="64M") as root:
        before = zarrfs.stats(root)
        assert before["chunks_decoded"] == 0
        data = (root / "grp" / "t").read_bytes()
        assert data == expected(store).tobytes()
        after = zarrfs.stats(root)
        assert after["chunks_decoded"] == 3 * 4  # every chunk once: 40x50 in 16x16 chunks
        assert after["bytes_served"] >= 40 * 50 * 4
        assert after["cache_budget_bytes"] == 64 << 20
        shown = json.loads(run("zarrfs", "stats", "--json", str(root)).stdout)
        assert shown["chunks_decoded"] == 12 and set(shown) == set(after)
        table = run("zarrfs", "stats", str(root)).stdout
        assert "chunks decoded" in table and "of 64.0 MiB" in table, table
        watched = run("zarrfs", "stats", "--watch", "--count", "2", str(root)).stdout
        assert watched.count("chunks decoded") == 2 and "/s" in watched, watched
        with pytest.raises(zarrfs.MountError, match="not the root of a zarrfs mount"):
            zarrfs.stats(root / "grp")


def test_zarrfs_umount_refuses_when_busy_and_unmounts_otherwise(store, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    with zarrfs.mount(store, mp) as root:
        with open(root / "grp" / "t", "rb") as f:
            busy = run("zarrfs", "umount", str(mp), check=False)
            assert busy.returncode == 1
            assert busy.stderr.strip() == f"zarrfs: {mp}: busy: files on it are still open " \
                                          "(close them, or use --lazy to detach it now)"
            with pytest.raises(zarrfs.MountError, match="busy"):
                zarrfs.unmount(mp)
            assert is_mounted(mp) and f.read(4)
        zarrfs.unmount(mp)
        assert not is_mounted(mp)
        wait_until(lambda: not zarrfs_pids(str(mp)), "the daemon to exit")
    not_mounted = run("zarrfs", "umount", str(mp), check=False)
    assert (not_mounted.returncode, not_mounted.stderr.strip()) == (1, f"zarrfs: {mp}: not a mount point")
    with pytest.raises(zarrfs.MountError, match=r"not a zarrfs mount \(it is "):
        zarrfs.unmount("/proc")
