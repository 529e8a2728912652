"""Mounting, page-cache control and process probes for scripts/bench.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


_drop_error: str | None = None


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`. Returns False (and remembers why) if refused."""
    global _drop_error
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if _drop_error is None:
            log(f"WARNING: cannot drop the page cache ({e}); 'cold' figures include cached data")
        _drop_error = str(e)
        return False


def drop_error() -> str | None:
    return _drop_error


def is_mounted(mnt: Path) -> bool:
    target = str(Path(mnt).resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == target and parts[2].startswith("fuse"):
                return True
    return False


def unmount(mnt: Path) -> None:
    for _ in range(50):
        if not is_mounted(mnt):
            return
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind (thread name without its number)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = comm.rstrip("0123456789").rstrip("-_") or comm
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def vm_hwm_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bdi_read_ahead_kb(mnt: Path) -> int | None:
    st = os.stat(mnt)
    try:
        return int(Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").read_text())
    except OSError:
        return None


class Mount:
    """`zarrfs mount -f STORE MNT` in a child process; unmounted and reaped on exit.

    A watchdog kills the daemon if the mount outlives `watchdog` seconds, so a hung read turns
    into an error instead of a hung benchmark.
    """

    def __init__(self, binary: Path, store: str, mnt: Path, cache_size: str | None = None,
                 decode_threads: int | None = None, threads: int | None = None,
                 env: dict | None = None, log_path: Path | None = None, watchdog: float = 180.0):
        self.binary, self.store, self.mnt = binary, store, Path(mnt)
        self.args = []
        if cache_size:
            self.args += ["--cache-size", cache_size]
        if decode_threads:
            self.args += ["--decode-threads", str(decode_threads)]
        if threads:
            self.args += ["--threads", str(threads)]
        self.env = dict(os.environ, **(env or {}))
        self.log_path = log_path
        self.watchdog = watchdog
        self.proc: subprocess.Popen | None = None
        self.timer: threading.Timer | None = None
        self.timed_out = False

    def __enter__(self) -> "Mount":
        self.mnt.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mnt):
            log(f"{self.mnt} is still mounted from an earlier run: unmounting it")
            unmount(self.mnt)
        self.logf = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(self.binary), "mount", self.store, str(self.mnt), "-f", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logf, env=self.env,
        )
        deadline = time.monotonic() + 30
        try:
            while not is_mounted(self.mnt):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"zarrfs exited with {self.proc.returncode} before mounting")
                if time.monotonic() > deadline:
                    raise RuntimeError("zarrfs did not mount within 30 s")
                time.sleep(0.02)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.timer = threading.Timer(self.watchdog, self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _expire(self) -> None:
        self.timed_out = True
        log(f"WATCHDOG: mount alive for {self.watchdog:.0f} s, killing zarrfs pid {self.proc.pid}")
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        return json.loads(os.getxattr(str(self.mnt), "user.zarrfs.stats"))

    def hwm(self) -> int:
        return vm_hwm_bytes(self.pid)

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def thread_cpu(self) -> dict[str, float]:
        return thread_cpu_seconds(self.pid)

    def __exit__(self, *exc) -> None:
        if self.timer:
            self.timer.cancel()
        try:
            unmount(self.mnt)
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log(f"zarrfs pid {self.proc.pid} did not exit after unmount: killing it")
                    self.proc.kill()
                    self.proc.wait(timeout=10)
                    unmount(self.mnt)
            if self.logf is not subprocess.DEVNULL:
                self.logf.close()
