"""Failure behaviour: refused mounts, damaged chunks, read-only mount, signals."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import stores
from helpers import check_mounted_array, errno_of, pread_full, read_npy_header
from kit import (
    Mount,
    is_mounted,
    mounts_at,
    pid_alive,
    proc_mounts,
    real_path,
    run_zarrfs,
    wait_until,
    zarrfs_pids,
)

# --------------------------------------------------------------------------
# mount failures
# --------------------------------------------------------------------------


def _valid_store(tmp_path):
    store = tmp_path / "ok.zarr"
    stores.build_simple_store(store, 3, shape=(100,), dtype="i4", chunks=(10,))
    return store


def _root_array_v3(tmp_path, mutate):
    store = tmp_path / "arr.zarr"
    stores.build_root_array_store(store, 3, shape=(50, 50), dtype="float32", chunks=(10, 10))
    meta = json.loads((store / "zarr.json").read_text())
    mutate(meta)
    (store / "zarr.json").write_text(json.dumps(meta))
    return store


def _root_array_v2(tmp_path, mutate):
    store = tmp_path / "arr2.zarr"
    stores.build_root_array_store(store, 2, shape=(50, 50), dtype="float32", chunks=(10, 10))
    meta = json.loads((store / ".zarray").read_text())
    mutate(meta)
    (store / ".zarray").write_text(json.dumps(meta))
    return store


def _setup_store_missing(tmp_path):
    return tmp_path / "does_not_exist.zarr", tmp_path / "mnt", "store"


def _setup_not_a_store(tmp_path):
    d = tmp_path / "just_a_dir"
    d.mkdir()
    (d / "readme.txt").write_text("not zarr\n")
    return d, tmp_path / "mnt", "store"


def _setup_store_is_file(tmp_path):
    f = tmp_path / "file.zarr"
    f.write_bytes(b"\0" * 100)
    return f, tmp_path / "mnt", "store"


def _setup_bad_json_v3_array(tmp_path):
    store = _root_array_v3(tmp_path, lambda m: None)
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array", "shape": [50, 50], ')
    return store, tmp_path / "mnt", "store"


def _setup_bad_json_v3_group(tmp_path):
    store = _valid_store(tmp_path)
    (store / "zarr.json").write_text("{this is not json")
    return store, tmp_path / "mnt", "store"


def _setup_bad_json_v2_zarray(tmp_path):
    store = _root_array_v2(tmp_path, lambda m: None)
    (store / ".zarray").write_text('{"zarr_format": 2, "shape": [50, 50], "chunks": ')
    return store, tmp_path / "mnt", "store"


def _setup_unsupported_codec_v3(tmp_path):
    def mutate(m):
        m["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "no_such_codec", "configuration": {"level": 1}}]
    return _root_array_v3(tmp_path, mutate), tmp_path / "mnt", "store"


def _setup_unsupported_codec_v2(tmp_path):
    def mutate(m):
        m["compressor"] = {"id": "no_such_codec", "level": 1}
    return _root_array_v2(tmp_path, mutate), tmp_path / "mnt", "store"


def _setup_mountpoint_missing(tmp_path):
    return _valid_store(tmp_path), tmp_path / "no_such_mountpoint", "mountpoint"


def _setup_mountpoint_is_file(tmp_path):
    f = tmp_path / "mnt_file"
    f.write_text("x")
    return _valid_store(tmp_path), f, "mountpoint"


MOUNT_FAILURES = {
    "store-missing": _setup_store_missing,
    "store-not-zarr": _setup_not_a_store,
    "store-is-a-file": _setup_store_is_file,
    "invalid-json-v3-array": _setup_bad_json_v3_array,
    "invalid-json-v3-root-group": _setup_bad_json_v3_group,
    "invalid-json-v2-zarray": _setup_bad_json_v2_zarray,
    "unsupported-codec-v3": _setup_unsupported_codec_v3,
    "unsupported-codec-v2": _setup_unsupported_codec_v2,
    "mountpoint-missing": _setup_mountpoint_missing,
    "mountpoint-is-a-file": _setup_mountpoint_is_file,
}


def assert_one_line_error(r, *paths) -> None:
    assert r.returncode != 0, f"expected failure, got exit 0; stdout={r.stdout!r} stderr={r.stderr!r}"
    err = r.stderr.rstrip("\n")
    assert err, "no message on stderr"
    assert "\n" not in err, f"stderr must be ONE line, got:\n{r.stderr}"
    assert err.startswith("zarrfs: "), err
    names = {str(p) for p in paths} | {real_path(p) for p in paths}
    assert any(n in err for n in names), f"stderr does not name {sorted(names)}: {err!r}"


@pytest.mark.parametrize("setup", list(MOUNT_FAILURES.values()), ids=list(MOUNT_FAILURES))
def test_mount_fails_cleanly(zarrfs_bin, tmp_path, guard_paths, setup):
    store, mp, which = setup(tmp_path)
    if which == "store":
        mp.mkdir()
    guard_paths.extend([str(mp), str(store)])
    before = proc_mounts()
    r = run_zarrfs("mount", store, mp)
    assert_one_line_error(r, store if which == "store" else mp)
    assert r.returncode == 1, f"exit code {r.returncode} (contract: 1)"
    assert proc_mounts() == before, "a mount appeared although zarrfs mount failed"
    assert wait_until(lambda: not zarrfs_pids(str(mp), str(store)), 3), "a zarrfs process survived the failure"


def test_mount_fails_cleanly_when_the_log_file_cannot_be_opened(zarrfs_bin, tmp_path, guard_paths):
    """The daemon opens --log-file before it mounts: an unusable one fails `zarrfs mount` with
    one line, instead of a daemon that said "ready" dying and leaving a dead mount."""
    store, mp = _valid_store(tmp_path), tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    log = tmp_path / "no-such-dir" / "zarrfs.log"
    before = proc_mounts()
    r = run_zarrfs("mount", store, mp, "--log-file", log)
    assert_one_line_error(r, log)
    assert r.returncode == 1, f"exit code {r.returncode} (contract: 1)"
    assert proc_mounts() == before, "mounted although the log file could not be opened"
    assert wait_until(lambda: not zarrfs_pids(str(mp), str(store)), 3), "a zarrfs process survived the failure"


def test_mount_fails_when_mountpoint_already_mounted(mount_factory, tmp_path):
    first = mount_factory(_valid_store(tmp_path))
    other = tmp_path / "other.zarr"
    stores.build_simple_store(other, 2, shape=(10,), dtype="i2", chunks=(5,))
    before = proc_mounts()
    r = run_zarrfs("mount", other, first.mountpoint)
    try:
        assert_one_line_error(r, first.mountpoint)
        assert proc_mounts() == before, "a second mount was stacked on the mount point"
        assert len(mounts_at(first.mountpoint)) == 1
    finally:
        for pid in zarrfs_pids(str(other)):
            os.kill(pid, signal.SIGTERM)  # pid of a daemon this test started by mistake
    first.assert_live()
    assert sorted(os.listdir(first.path())) == ["data", "data.npy"]


# --------------------------------------------------------------------------
# damaged chunks
# --------------------------------------------------------------------------

N = 64 * 1024  # elements
C = 4096  # elements per chunk (f8: 32 KiB = 8 pages, so chunk regions are page aligned)
BAD = 5  # damaged chunk / shard index


def _garbage(path):
    n = path.stat().st_size
    path.write_bytes(np.random.default_rng(99).integers(0, 256, n, dtype=np.uint8).tobytes())


def _truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    # id: (zarr_format, create_array kwargs, damage function, elements per damaged region)
    "v3-zstd-garbage": (3, {}, _garbage, C),
    "v3-zstd-truncated": (3, {}, _truncate_half, C),
    "v3-gzip-crc32c-bitflip": (3, {"compressors": [stores.GzipCodec(level=5), stores.Crc32cCodec()]}, _flip_byte, C),
    "v3-raw-truncated": (3, {"compressors": None}, _truncate_half, C),
    "v2-blosc-garbage": (2, {"compressors": stores.numcodecs.Blosc(cname="lz4")}, _garbage, C),
    "v2-zlib-truncated": (2, {"compressors": stores.numcodecs.Zlib(level=5)}, _truncate_half, C),
    "v2-raw-truncated": (2, {"compressors": None}, _truncate_half, C),
    # a shard cut in half loses its index (at the end): the whole shard is unreadable
    "v3-shard-truncated": (3, {"shards": (C,), "chunks_override": (C // 4,)}, _truncate_half, C),
}


def _touches(off: int, length: int, lo: int, hi: int) -> bool:
    return off < hi and off + length > lo


@pytest.mark.parametrize("damage_id", list(DAMAGE))
def test_damaged_chunk_gives_eio_elsewhere_ok(mount_factory, tmp_path, damage_id):
    fmt, kwargs, damage, region = DAMAGE[damage_id]
    kwargs = dict(kwargs)
    chunks = kwargs.pop("chunks_override", (C,))
    store = tmp_path / "damaged.zarr"
    stores.build_simple_store(store, fmt, shape=(N,), dtype="float64", chunks=chunks, **kwargs)
    exp = stores.expected_array(store, "data").tobytes()
    damage(stores.chunk_file(store, "data", (BAD,)))

    m = mount_factory(store)
    f = m.path("data")
    isz = 8
    lo, hi = BAD * region * isz, (BAD + 1) * region * isz
    size = N * isz
    fd = os.open(f, os.O_RDONLY)
    try:
        def expect_ok(off, length):
            got = pread_full(fd, length, off)
            assert got == exp[off:off + length], f"pread(off={off}, len={length}) outside the damaged chunk [{lo},{hi})"

        def expect_eio(off, length):
            e = errno_of(pread_full, fd, length, off)
            assert e == errno.EIO, (f"pread(off={off}, len={length}) touching the damaged chunk [{lo},{hi}) "
                                    f"gave {'success' if e is None else errno.errorcode.get(e, e)}, expected EIO")

        # neighbours first (nothing cached yet), then the damaged chunk, then again
        expect_ok(lo - region * isz, region * isz)  # whole previous chunk
        expect_ok(hi, region * isz)  # whole next chunk
        expect_ok(lo - 1, 1)
        expect_ok(hi, 1)
        expect_eio(lo, 1)
        expect_eio(hi - 1, 1)
        expect_eio(lo, hi - lo)
        expect_eio(lo - 100, 200)  # straddles into it
        expect_eio(hi - 3, 100)  # straddles out of it
        expect_eio(0, size)  # whole file
        expect_ok(0, 4096)
        expect_ok(size - 5000, 5000)
        expect_ok(lo - region * isz, region * isz)
        rng = np.random.default_rng(stores._seed(damage_id))
        for _ in range(40):
            off = int(rng.integers(0, size))
            length = int(rng.integers(1, 3 * region * isz))
            if _touches(off, min(length, size - off), lo, hi):
                expect_eio(off, length)
            else:
                expect_ok(off, length)
        expect_eio(lo, 1)  # still failing: errors are not cached as data
    finally:
        os.close(fd)

    # the .npy view fails the same way at the same data offset
    header_len, *_ = read_npy_header(m.path("data.npy"))
    nfd = os.open(m.path("data.npy"), os.O_RDONLY)
    try:
        assert errno_of(pread_full, nfd, 16, header_len + lo) == errno.EIO
        assert pread_full(nfd, 16, header_len) == exp[:16]
    finally:
        os.close(nfd)

    m.assert_live()
    assert m.pid is not None and pid_alive(m.pid)
    assert stores.expected_array  # the store itself is untouched apart from the damaged chunk


# --------------------------------------------------------------------------
# read-only
# --------------------------------------------------------------------------


@pytest.fixture
def small_mount(mount_factory, tmp_path):
    store = tmp_path / "ro.zarr"
    stores.build_simple_store(store, 3, shape=(100, 50), dtype="i4", chunks=(30, 20))
    zarr_grp = stores.zarr.open_group(str(store), mode="r+")
    zarr_grp.require_group("grp")
    return mount_factory(store), store


WRITE_OPS = {
    "open-wronly": lambda mp: os.close(os.open(mp / "data", os.O_WRONLY)),
    "open-rdwr": lambda mp: os.close(os.open(mp / "data", os.O_RDWR)),
    "open-trunc": lambda mp: os.close(os.open(mp / "data.npy", os.O_WRONLY | os.O_TRUNC)),
    "open-append": lambda mp: os.close(os.open(mp / "data", os.O_WRONLY | os.O_APPEND)),
    "python-open-w": lambda mp: open(mp / "data", "wb").close(),
    "create-root": lambda mp: os.close(os.open(mp / "new_file", os.O_WRONLY | os.O_CREAT, 0o644)),
    "create-in-group": lambda mp: os.close(os.open(mp / "grp" / "new_file", os.O_WRONLY | os.O_CREAT, 0o644)),
    "create-excl": lambda mp: os.close(os.open(mp / "new2", os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)),
    "unlink": lambda mp: os.unlink(mp / "data"),
    "unlink-npy": lambda mp: os.unlink(mp / "data.npy"),
    "rename": lambda mp: os.rename(mp / "data", mp / "renamed"),
    "rename-into-group": lambda mp: os.rename(mp / "data.npy", mp / "grp" / "data.npy"),
    "truncate": lambda mp: os.truncate(mp / "data", 0),
    "truncate-grow": lambda mp: os.truncate(mp / "data", 10**9),
    "mkdir": lambda mp: os.mkdir(mp / "newdir"),
    "mkdir-in-group": lambda mp: os.mkdir(mp / "grp" / "newdir"),
    "rmdir": lambda mp: os.rmdir(mp / "grp"),
    "symlink": lambda mp: os.symlink("data", mp / "link"),
    "hardlink": lambda mp: os.link(mp / "data", mp / "hardlink"),
    "chmod": lambda mp: os.chmod(mp / "data", 0o666),
    "utime": lambda mp: os.utime(mp / "data", (0, 0)),
    "setxattr": lambda mp: os.setxattr(mp / "data", "user.zarr.shape", b"[1]"),
    "removexattr": lambda mp: os.removexattr(mp / "data", "user.zarr.dtype"),
    "mknod-fifo": lambda mp: os.mkfifo(mp / "fifo"),
}


@pytest.mark.parametrize("op", list(WRITE_OPS.values()), ids=list(WRITE_OPS))
def test_write_paths_erofs(small_mount, op):
    m, store = small_mount
    e = errno_of(op, m.path())
    assert e == errno.EROFS, f"expected EROFS, got {'success' if e is None else errno.errorcode.get(e, e)}"
    # nothing changed
    assert sorted(os.listdir(m.path())) == ["data", "data.npy", "grp"]
    assert os.listdir(m.path("grp")) == []
    check_mounted_array(m.path("data"), stores.expected_array(store, "data"), 30 * 20 * 4, seed=1, n_reads=5)
    m.assert_live()


# --------------------------------------------------------------------------
# signals / lifecycle
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_daemon(mount_factory, tmp_path, sig):
    m = mount_factory(_valid_store(tmp_path))
    assert m.pid is not None, "no process named zarrfs serves the mount"
    with open(f"/proc/{m.pid}/comm") as f:
        assert f.read().strip() == "zarrfs"
    assert os.stat(m.path("data")).st_size == 400
    os.kill(m.pid, sig)
    assert wait_until(lambda: not is_mounted(m.mp_real)), f"mount still present 10 s after {sig.name}"
    assert wait_until(lambda: not pid_alive(m.pid)), f"daemon still running 10 s after {sig.name}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_foreground_mode(zarrfs_bin, tmp_path, sig):
    store = _valid_store(tmp_path)
    m = Mount(store, tmp_path / "mnt", foreground=True)
    with m:
        assert m.proc.poll() is None, "zarrfs -f returned although it should stay in the foreground"
        check_mounted_array(m.path("data"), stores.expected_array(store, "data"), 40, seed=2, n_reads=5)
        m.proc.send_signal(sig)
        assert wait_until(lambda: m.proc.poll() is not None), f"zarrfs -f still running 10 s after {sig.name}"
        assert wait_until(lambda: not is_mounted(m.mp_real)), f"mount still present after {sig.name}"
        assert m.proc.returncode == 0, f"exit code {m.proc.returncode} after {sig.name}; log:\n" + \
            m.log_path.read_text()


def _silent_server():
    """A TCP port that takes connections and never answers: a mount of it hangs opening the store."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


@pytest.mark.parametrize("how", ["foreground-SIGTERM", "daemon-parent-killed"])
def test_signal_while_opening_the_store_ends_everything(zarrfs_bin, tmp_path, guard_paths, how):
    """A signal before the mount exists ends the daemon at once with one line (opening a remote
    store can take minutes of retries); killing `zarrfs mount` while it waits takes the daemon it
    started with it, so nothing mounts later behind the user's back."""
    server = _silent_server()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/x.zarr"
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    args = [str(zarrfs_bin), "mount", url, str(mp), "-o", "remote_timeout=30s"]
    if how == "foreground-SIGTERM":
        args.insert(2, "-f")
    err = tmp_path / "stderr"
    try:
        with open(err, "w") as e:
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e)
        try:
            # The server becomes readable once a connection waits on it: the daemon is opening
            # the store, well past its start-up.
            assert select.select([server], [], [], 20)[0], "the daemon never connected"
            started = time.monotonic()
            p.send_signal(signal.SIGTERM)
            assert wait_until(lambda: not zarrfs_pids(url), 10), f"still running: {zarrfs_pids(url)}"
            assert time.monotonic() - started < 10
            assert p.wait(10) != 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert not is_mounted(mp)
        lines = err.read_text().strip().splitlines()
        assert lines and lines[-1].startswith(f"zarrfs: {url}: stopped by signal"), lines
    finally:
        server.close()
