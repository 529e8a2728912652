"""The mount guard: ``zarrfs mount STORE MOUNTPOINT`` that is always unmounted and reaped.

``Mount`` starts a mount (the detached daemon, or ``-f`` in a child process), waits (bounded)
until /proc/mounts shows it, and on exit -- normal, failure or exception, including a failure
while starting -- unmounts (``fusermount3 -u``, then ``umount -l``) and makes sure every
daemon it started is gone. ``abort()`` kills the daemon so that reads blocked on a wedged FUSE
connection fail (ENOTCONN) instead of hanging; the tests' watchdog calls it on every live mount
(``live_mounts()``), a mount made with ``watchdog=SECONDS`` kills its own daemon after that long.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .procs import (
    CMD_TIMEOUT,
    MOUNT_TIMEOUT,
    clean_env,
    force_unmount,
    is_mounted,
    kill_and_reap,
    mounts_at,
    pid_alive,
    proc_cpu_seconds,
    real_path,
    thread_cpu_seconds,
    vm_hwm_bytes,
    wait_until,
    zarrfs_pids,
)

REPO = Path(__file__).resolve().parents[2]
ZARRFS_BIN = Path(os.environ.get("ZARRFS_BIN", REPO / "target" / "release" / "zarrfs")).resolve()


def run_zarrfs(*args, timeout: float = CMD_TIMEOUT, env=None, binary=None) -> subprocess.CompletedProcess:
    """Run the zarrfs CLI with stdout/stderr sent to files (never pipes): a daemon
    that forgets to detach its stdio must not make the caller block."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([str(binary or ZARRFS_BIN), *map(str, args)], stdout=out, stderr=err,
                           stdin=subprocess.DEVNULL, timeout=timeout, env=env or clean_env())
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())


def _stderr_note(msg: str) -> None:
    print(f"[zarrfs mount guard] {msg}", file=sys.stderr, flush=True)


_LIVE_MOUNTS: set["Mount"] = set()
_LIVE_LOCK = threading.Lock()


def live_mounts() -> list["Mount"]:
    """Mounts started and not yet closed (for a watchdog to abort)."""
    with _LIVE_LOCK:
        return list(_LIVE_MOUNTS)


class MountFailed(AssertionError):
    pass


class Mount:
    """``zarrfs mount STORE MOUNTPOINT [args]`` as a context manager.

    On enter: runs the CLI (daemon mode unless ``foreground``), requires exit 0,
    polls /proc/mounts for the mount (bounded by ``timeout``) and locates the daemon pid.
    On exit: always unmounts and makes sure the daemon is gone.

    ``env``: the daemon's whole environment (default: ours without RUST_LOG*).
    ``binary``: the zarrfs executable (default ``ZARRFS_BIN``).
    ``log_path``: where a foreground daemon's output goes (default MOUNTPOINT.zarrfs.log next
    to the mount point).
    ``watchdog``: seconds after which the daemon is killed (SIGKILL) if still mounted, so a hung
    read becomes an error; ``timed_out`` tells whether that happened.
    ``replace_stale``: unmount whatever is still mounted on the mount point first (a run that
    was killed), instead of mounting on top of it.
    ``note``: where the guard reports what it did on its own (watchdog, stale mount, a daemon
    killed after unmount); default stderr.
    """

    def __init__(self, store, mountpoint, *args, foreground: bool = False, env=None, binary=None,
                 log_path=None, timeout: float = MOUNT_TIMEOUT, watchdog: float | None = None,
                 replace_stale: bool = False, note=None):
        self.store = str(store)  # kept verbatim (e.g. a trailing slash matters)
        self.mountpoint = Path(mountpoint)
        self.mp_real = real_path(self.mountpoint)
        self.args = [str(a) for a in args]
        self.foreground = foreground
        self.env = env or clean_env()
        self.binary = Path(binary) if binary else ZARRFS_BIN
        self.timeout = timeout
        self.watchdog = watchdog
        self.replace_stale = replace_stale
        self.note = note or _stderr_note
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.result: subprocess.CompletedProcess | None = None
        self.log_path = Path(log_path) if log_path else self.mountpoint.parent / (self.mountpoint.name + ".zarrfs.log")
        self._log = None
        self._timer: threading.Timer | None = None
        self.timed_out = False

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "Mount":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "Mount":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.replace_stale and is_mounted(self.mp_real):
            self.note(f"{self.mountpoint} is still mounted from an earlier run: unmounting it")
            force_unmount(self.mp_real)
        with _LIVE_LOCK:
            _LIVE_MOUNTS.add(self)
        try:
            cmd = [str(self.binary), "mount", str(self.store), str(self.mountpoint), *self.args]
            if self.foreground:
                self._log = open(self.log_path, "w")
                self.proc = subprocess.Popen(cmd + ["-f"], stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env)
                self.pid = self.proc.pid
                wait_until(lambda: is_mounted(self.mp_real) or self.proc.poll() is not None, self.timeout)
                if not is_mounted(self.mp_real):
                    raise MountFailed(f"foreground mount did not appear within {self.timeout}s "
                                      f"(exit={self.proc.poll()}): {cmd}\n{self.log_path.read_text()}")
            else:
                self.result = run_zarrfs("mount", self.store, self.mountpoint, *self.args, env=self.env,
                                         binary=self.binary)
                if self.result.returncode != 0:
                    raise MountFailed(f"zarrfs mount exited {self.result.returncode}: {cmd}\n"
                                      f"stderr: {self.result.stderr}\nstdout: {self.result.stdout}")
                if not wait_until(lambda: is_mounted(self.mp_real), self.timeout):
                    raise MountFailed(f"zarrfs mount exited 0 but {self.mp_real} is not in /proc/mounts "
                                      f"after {self.timeout}s")
                pids = wait_until(lambda: zarrfs_pids(str(self.mountpoint), self.mp_real), 5)
                self.pid = pids[0] if pids else None
        except BaseException:
            self.close()
            raise
        if self.watchdog:
            self._timer = threading.Timer(self.watchdog, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _expire(self) -> None:
        self.timed_out = True
        self.note(f"WATCHDOG: mount alive for {self.watchdog:.0f} s, killing zarrfs pid {self.pid}")
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            gc.collect()
            force_unmount(self.mp_real)
        finally:
            try:
                if self.proc is not None:
                    try:
                        self.proc.wait(timeout=self.timeout)
                    except subprocess.TimeoutExpired:
                        self.note(f"zarrfs pid {self.proc.pid} did not exit after unmount: killing it")
                        self.proc.kill()
                        self.proc.wait(timeout=self.timeout)
                        force_unmount(self.mp_real)
                    self.proc = None
                if self._log is not None:
                    self._log.close()
                    self._log = None
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

    # -- the daemon's counters and resources ---------------------------------
    def stats(self) -> dict:
        """The live counters of ``user.zarrfs.stats`` on the mount root."""
        return json.loads(os.getxattr(str(self.mountpoint), "user.zarrfs.stats"))

    def hwm(self) -> int:
        """The daemon's peak RSS (VmHWM), bytes."""
        return vm_hwm_bytes(self.pid)

    def cpu(self) -> float:
        """CPU seconds the daemon has used (user + system)."""
        return proc_cpu_seconds(self.pid)

    def thread_cpu(self) -> dict[str, float]:
        return thread_cpu_seconds(self.pid)
