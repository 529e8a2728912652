"""What the end-to-end tests (tests/python) and the scripts (scripts/bench.py,
scripts/scale_out.py) share to run zarrfs for real:

* ``kit.mount``: the mount guard ``Mount`` (start a mount, wait until it is there, always
  unmount and reap the daemon -- also on failure or exception --, abort a wedged one) and
  ``run_zarrfs`` (the CLI with its output in files);
* ``kit.procs``: bounded polling, /proc/mounts, finding zarrfs daemons left on a path, force
  unmount, CPU/memory probes of a daemon;
* ``kit.servers``: loopback HTTP(S) and moto S3 servers in subprocesses (``http_server.py`` is
  the HTTP server process).

Entry points put the ``tests`` directory on ``sys.path`` once and ``import kit`` (or
``from kit.servers import ...``). Assertion helpers for pytest stay in tests/python/helpers.py.
"""

from .mount import REPO, ZARRFS_BIN, Mount, MountFailed, live_mounts, run_zarrfs
from .procs import (
    CMD_TIMEOUT,
    MOUNT_TIMEOUT,
    bdi_read_ahead_kb,
    clean_env,
    force_unmount,
    is_mounted,
    kill_and_reap,
    mounts_at,
    pid_alive,
    proc_cpu_seconds,
    proc_mounts,
    real_path,
    run,
    thread_cpu_seconds,
    vm_hwm_bytes,
    wait_until,
    zarrfs_pids,
)

__all__ = [
    "REPO", "ZARRFS_BIN", "Mount", "MountFailed", "live_mounts", "run_zarrfs",
    "CMD_TIMEOUT", "MOUNT_TIMEOUT", "bdi_read_ahead_kb", "clean_env", "force_unmount", "is_mounted",
    "kill_and_reap", "mounts_at", "pid_alive", "proc_cpu_seconds", "proc_mounts", "real_path", "run",
    "thread_cpu_seconds", "vm_hwm_bytes", "wait_until", "zarrfs_pids",
]
