"""Helpers shared by the zarrfs end-to-end tests (fixtures live in conftest.py).

Safety rules every helper here follows:
  * synchronisation is always a bounded poll (``wait_until``), never a bare sleep;
  * every mount is torn down in ``finally``/fixture teardown (``fusermount3 -u``,
    then ``umount -l``), and any zarrfs daemon it started is reaped or killed;
  * only processes started by this suite are ever signalled (matched by pid, or
    by a mount point / store path that lives under the session's temp dir);
  * a watchdog kills the daemons of live mounts if a test hangs, so blocked
    reads on a wedged FUSE connection fail (ENOTCONN) instead of hanging forever.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stores  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ZARRFS_BIN = Path(os.environ.get("ZARRFS_BIN", REPO / "target" / "release" / "zarrfs")).resolve()

MOUNT_TIMEOUT = 10.0  # seconds for a mount to appear / disappear
CMD_TIMEOUT = 60.0  # seconds for any external command
TEST_TIMEOUT = float(os.environ.get("ZARRFS_TEST_TIMEOUT", "90"))  # watchdog per test
PUBLIC_TMP_PREFIX = "/tmp/zarrfs-test-"  # world-traversable temp dirs (test_allow_other)


# --------------------------------------------------------------------------
# polling, /proc helpers
# --------------------------------------------------------------------------


def wait_until(pred, timeout: float = MOUNT_TIMEOUT, interval: float = 0.02) -> bool:
    """Poll ``pred`` until it is truthy or ``timeout`` seconds pass; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        r = pred()
        if r or time.monotonic() >= deadline:
            return r
        time.sleep(interval)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def proc_mounts() -> list[dict]:
    """Entries of /proc/mounts as dicts (source, mountpoint, fstype, options)."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            out.append({
                "source": _unescape(parts[0]),
                "mountpoint": _unescape(parts[1]),
                "fstype": parts[2],
                "options": parts[3].split(","),
            })
    return out


def real_path(path) -> str:
    """Canonical path WITHOUT touching the last component: lstat()ing a mount
    point would send a request to a (possibly wedged) FUSE daemon."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def mounts_at(path) -> list[dict]:
    p = real_path(path)
    return [m for m in proc_mounts() if m["mountpoint"] == p]


def is_mounted(path) -> bool:
    return bool(mounts_at(path))


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def _proc_info(pid: int) -> tuple[str, list[str]] | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        return comm, argv
    except OSError:
        return None


def zarrfs_pids(*needles: str) -> list[int]:
    """Live processes named ``zarrfs`` having an argument equal to (or containing,
    for needles that are directories) one of ``needles``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        info = _proc_info(int(d))
        if not info:
            continue
        comm, argv = info
        if comm != "zarrfs" and not (argv and os.path.basename(argv[0]) == "zarrfs"):
            continue
        if any(n and (a == n or a.startswith(n.rstrip("/") + "/")) for a in argv[1:] for n in needles):
            if pid_alive(int(d)):
                found.append(int(d))
    return found


def kill_and_reap(pid: int, timeout: float = 5.0) -> None:
    """Make sure a daemon started by this suite is gone: wait, then TERM, then KILL."""
    if wait_until(lambda: not pid_alive(pid), timeout):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout):
            return


def run(cmd, timeout: float = CMD_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], timeout=timeout, **kw)


def stored_bytes(directory: Path) -> int:
    """Bytes in the files under `directory`: what `zarrfs info` calls stored."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_LOG")}
    env.update(extra)
    return env


def run_zarrfs(*args, timeout: float = CMD_TIMEOUT, env=None) -> subprocess.CompletedProcess:
    """Run the zarrfs CLI with stdout/stderr sent to files (never pipes): a daemon
    that forgets to detach its stdio must not make the caller block."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([str(ZARRFS_BIN), *map(str, args)], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                           timeout=timeout, env=env or clean_env())
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())


def force_unmount(path) -> None:
    """Unmount everything stacked on ``path`` (fusermount3 -u, then umount -l)."""
    for _ in range(8):
        if not is_mounted(path):
            return
        gc.collect()  # drop lingering np.memmap objects holding the mount busy
        try:
            run(["fusermount3", "-u", path], timeout=20)
        except subprocess.TimeoutExpired:
            pass
        if wait_until(lambda: not is_mounted(path), 2):
            continue
        try:
            run(["umount", "-l", path], timeout=20)
        except subprocess.TimeoutExpired:
            pass
        wait_until(lambda: not is_mounted(path), 2)


# --------------------------------------------------------------------------
# Mount guard
# --------------------------------------------------------------------------

_LIVE_MOUNTS: set["Mount"] = set()
_LIVE_LOCK = threading.Lock()


class MountFailed(AssertionError):
    pass


class Mount:
    """``zarrfs mount STORE MOUNTPOINT [args]`` as a context manager.

    On enter: runs the CLI (daemon mode unless ``foreground``), requires exit 0,
    polls /proc/mounts for the mount (bounded) and locates the daemon pid.
    On exit: always unmounts and makes sure the daemon is gone.
    """

    def __init__(self, store, mountpoint, *args, foreground: bool = False, env=None):
        self.store = str(store)  # kept verbatim (e.g. a trailing slash matters)
        self.mountpoint = Path(mountpoint)
        self.mp_real = real_path(self.mountpoint)
        self.args = [str(a) for a in args]
        self.foreground = foreground
        self.env = env or clean_env()
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.result: subprocess.CompletedProcess | None = None
        self.log_path = self.mountpoint.parent / (self.mountpoint.name + ".zarrfs.log")

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Mount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Mount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with _LIVE_LOCK:
            _LIVE_MOUNTS.add(self)
        try:
            cmd = [str(ZARRFS_BIN), "mount", str(self.store), str(self.mountpoint), *self.args]
            if self.foreground:
                self._log = open(self.log_path, "w")
                self.proc = subprocess.Popen(cmd + ["-f"], stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env)
                self.pid = self.proc.pid
                wait_until(lambda: is_mounted(self.mp_real) or self.proc.poll() is not None)
                if not is_mounted(self.mp_real):
                    raise MountFailed(f"foreground mount did not appear within {MOUNT_TIMEOUT}s "
                                      f"(exit={self.proc.poll()}): {cmd}\n{self.log_path.read_text()}")
            else:
                self.result = run_zarrfs("mount", self.store, self.mountpoint, *self.args, env=self.env)
                if self.result.returncode != 0:
                    raise MountFailed(f"zarrfs mount exited {self.result.returncode}: {cmd}\n"
                                      f"stderr: {self.result.stderr}\nstdout: {self.result.stdout}")
                if not wait_until(lambda: is_mounted(self.mp_real)):
                    raise MountFailed(f"zarrfs mount exited 0 but {self.mp_real} is not in /proc/mounts "
                                      f"after {MOUNT_TIMEOUT}s")
                pids = wait_until(lambda: zarrfs_pids(str(self.mountpoint), self.mp_real), 5)
                self.pid = pids[0] if pids else None
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        try:
            gc.collect()
            force_unmount(self.mp_real)
        finally:
            try:
                if self.proc is not None:
                    try:
                        self.proc.wait(timeout=MOUNT_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(timeout=MOUNT_TIMEOUT)
                    self._log.close()
                    self.proc = None
                pids = set(zarrfs_pids(str(self.mountpoint), self.mp_real))
                if self.pid is not None and not self.foreground:
                    pids.add(self.pid)
                for pid in pids:
                    kill_and_reap(pid)
            finally:
                with _LIVE_LOCK:
                    _LIVE_MOUNTS.discard(self)

    def abort(self) -> None:
        """Watchdog: kill the daemon so blocked requests fail, then detach the mount."""
        pids = set(zarrfs_pids(str(self.mountpoint), self.mp_real))
        if self.pid is not None:
            pids.add(self.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["umount", "-l", self.mp_real], capture_output=True, timeout=20)

    # -- convenience -------------------------------------------------------
    def path(self, rel: str = "") -> Path:
        return self.mountpoint / rel if rel else self.mountpoint

    def entry(self) -> dict:
        ms = mounts_at(self.mp_real)
        assert ms, f"{self.mp_real} is not mounted"
        return ms[-1]

    def assert_live(self) -> None:
        assert is_mounted(self.mp_real), f"mount {self.mp_real} disappeared"
        if self.pid is not None:
            assert pid_alive(self.pid), f"zarrfs daemon pid {self.pid} died"
        os.listdir(self.mountpoint)  # the FUSE connection still answers


# --------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------


def describe_mismatch(got: bytes, exp: bytes, dtype=None, offset: int = 0) -> str:
    if len(got) != len(exp):
        head = f"length {len(got)} != expected {len(exp)}"
    else:
        head = "same length"
    n = min(len(got), len(exp))
    g = np.frombuffer(got[:n], np.uint8)
    e = np.frombuffer(exp[:n], np.uint8)
    diff = np.flatnonzero(g != e)
    if diff.size == 0:
        return f"{head}; common prefix identical"
    first = int(diff[0])
    msg = (f"{head}; {diff.size} differing bytes, first at file offset {offset + first}: "
           f"got {got[first:first + 16].hex()} expected {exp[first:first + 16].hex()}")
    if dtype is not None:
        dt = np.dtype(dtype)
        el = (offset + first) // dt.itemsize
        s = el * dt.itemsize - offset
        if 0 <= s and s + dt.itemsize <= n:
            msg += (f"; element {el}: got {np.frombuffer(got[s:s + dt.itemsize], dt)[0]!r} "
                    f"expected {np.frombuffer(exp[s:s + dt.itemsize], dt)[0]!r}")
    return msg


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread until ``length`` bytes or EOF (a short read mid-file is retried, not trusted)."""
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def random_ranges(size: int, chunk_bytes: int, rng: np.random.Generator, n: int = 50) -> list[tuple[int, int]]:
    """Fixed edge cases plus ``n`` random (offset, length) pairs: unaligned offsets,
    chunk-boundary offsets, ranges crossing EOF, lengths 1..3*chunk_bytes."""
    cb = max(1, chunk_bytes)
    ranges = [(0, 1), (0, min(size, 4096)), (max(0, size - 1), 1), (max(0, size - 1), 10),
              (max(0, size - 3), 100), (size, 10), (size + 12345, 7), (1, size + 10)]
    for i in range(n):
        length = int(rng.integers(1, 3 * cb + 1))
        kind = i % 4
        if kind == 0:  # anywhere
            off = int(rng.integers(0, size))
        elif kind == 1:  # just before a chunk-sized boundary
            off = max(0, (int(rng.integers(0, size)) // cb) * cb - int(rng.integers(0, 8)))
        elif kind == 2:  # crossing the end of the file
            off = int(rng.integers(max(0, size - length), size))
        else:  # odd offset: never element aligned for multi-byte dtypes
            off = int(rng.integers(0, size)) | 1
        ranges.append((off, length))
    return ranges


def check_preads(path, expected: bytes, chunk_bytes: int, rng: np.random.Generator, n: int = 50,
                 dtype=None, base: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, length in random_ranges(len(expected), chunk_bytes, rng, n):
            got = pread_full(fd, length, off)
            exp = expected[off:off + length]
            assert got == exp, (f"pread({path}, len={length}, off={off}) mismatch: "
                                f"{describe_mismatch(got, exp, dtype, off - base)}")
    finally:
        os.close(fd)


def read_npy_header(path) -> tuple[int, tuple, bool, np.dtype]:
    """Parse a .npy header with numpy's own reader: (header_len, shape, fortran, dtype)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = np.lib.format._read_array_header(f, version)
        return f.tell(), shape, fortran, dtype


def assert_same_array(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype.str} != {expected.dtype.str}"
    gb, eb = np.ascontiguousarray(got).tobytes(), expected.tobytes()
    if gb != eb:
        if expected.dtype.kind in "fc" and np.array_equal(got, expected, equal_nan=True):
            pytest.fail(f"{what}: values equal but bytes differ (NaN payload / signed zero?): "
                        f"{describe_mismatch(gb, eb, expected.dtype)}")
        pytest.fail(f"{what}: {describe_mismatch(gb, eb, expected.dtype)}")


def check_mounted_array(flat_path, expected: np.ndarray, chunk_bytes: int, seed: int, n_reads: int = 50) -> None:
    """Full comparison of ``flat_path`` and ``flat_path.npy`` against ``expected``
    (C-contiguous, native-endian), then random preads on both."""
    flat = Path(flat_path)
    npy = flat.with_name(flat.name + ".npy")
    exp_bytes = expected.tobytes()

    st = os.stat(flat)
    assert st.st_size == len(exp_bytes), f"{flat}: st_size {st.st_size} != {len(exp_bytes)}"

    _compare_memmap(flat, expected)
    data = flat.read_bytes()
    assert data == exp_bytes, f"{flat}: read() mismatch: {describe_mismatch(data, exp_bytes, expected.dtype)}"
    del data

    header_len, shape, fortran, dtype = read_npy_header(npy)
    assert tuple(shape) == expected.shape, f"{npy}: header shape {shape}"
    assert not fortran, f"{npy}: fortran_order must be False"
    assert dtype.str == expected.dtype.str, f"{npy}: header dtype {dtype.str} != native {expected.dtype.str}"
    assert os.stat(npy).st_size == header_len + len(exp_bytes), f"{npy}: size != header {header_len} + data"
    _compare_npy(npy, expected)

    rng = np.random.default_rng(seed)
    check_preads(flat, exp_bytes, chunk_bytes, rng, n_reads, expected.dtype)
    with open(npy, "rb") as f:
        header = f.read(header_len)
    check_preads(npy, header + exp_bytes, chunk_bytes, rng, max(10, n_reads // 5), expected.dtype, base=header_len)


def _compare_memmap(flat: Path, expected: np.ndarray) -> None:
    mm = np.memmap(flat, dtype=expected.dtype, shape=expected.shape, mode="r")
    try:
        assert_same_array(np.asarray(mm), expected, f"np.memmap({flat})")
    finally:
        del mm


def _compare_npy(npy: Path, expected: np.ndarray) -> None:
    arr = np.load(npy, mmap_mode="r")
    try:
        assert arr.dtype.str == expected.dtype.str, f"{npy}: np.load dtype {arr.dtype.str}"
        assert_same_array(np.asarray(arr), expected, f"np.load({npy}, mmap_mode='r')")
    finally:
        del arr


def errno_of(fn, *args, **kwargs) -> int | None:
    """Run ``fn``; return the OSError errno it raised, or None if it succeeded."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno
    return None


__all__ = [
    "stored_bytes",
    "Mount", "MountFailed", "ZARRFS_BIN", "wait_until", "proc_mounts", "mounts_at", "is_mounted",
    "pid_alive", "zarrfs_pids", "kill_and_reap", "run", "run_zarrfs", "clean_env", "force_unmount",
    "check_mounted_array", "check_preads", "pread_full", "describe_mismatch", "read_npy_header",
    "assert_same_array", "errno_of", "errno", "stores", "real_path",
]
