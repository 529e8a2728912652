"""Polling, /proc/mounts, processes: what the mount guard, the tests and the scripts look at.

Rules every helper here follows:
  * synchronisation is always a bounded poll (``wait_until``), never a bare sleep;
  * only processes started by the caller are ever signalled (matched by pid, or by a mount
    point / store path the caller names);
  * nothing here touches a mount point itself (a wedged FUSE daemon would hang the caller):
    paths are canonicalised without the last component and mounts are read from /proc/mounts.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import time
from pathlib import Path

MOUNT_TIMEOUT = 10.0  # seconds for a mount to appear / disappear
CMD_TIMEOUT = 60.0  # seconds for any external command
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# polling, /proc helpers
# --------------------------------------------------------------------------


def wait_until(pred, timeout: float = MOUNT_TIMEOUT, interval: float = 0.02):
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
    """Make sure a daemon started by the caller is gone: wait, then TERM, then KILL."""
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


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_LOG")}
    env.update(extra)
    return env


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
# process probes (CPU, memory, readahead of a mount)
# --------------------------------------------------------------------------


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
