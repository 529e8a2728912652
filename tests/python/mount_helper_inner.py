"""Run by test_mount_helper.py inside ``unshare --mount --propagation private``.

Why a separate mount namespace: mount(8) (util-linux 2.38) starts the helper
/sbin/mount.fuse3 WITHOUT the caller's PATH, and mount.fuse3 then runs
``/bin/sh -c 'zarrfs STORE MNT -o OPTS'``, so sh searches its built-in default
PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:...). Prepending a directory to
PATH is therefore not enough to make ``mount -t fuse.zarrfs`` find the binary.
Inside a private mount namespace we bind-mount a directory holding a
``zarrfs`` symlink over /usr/local/sbin — invisible to the rest of the system
and gone when the namespace dies — which is what "zarrfs is on PATH" means for
an installed binary.

Usage: mount_helper_inner.py MODE STORE MOUNTPOINT BINDIR ARRAY_PATH [FSTAB]
  MODE "type":  mount -t fuse.zarrfs STORE MNT -o ro,cache_size=64M
  MODE "fstab": mount -T FSTAB MNT     (FSTAB has "STORE MNT fuse.zarrfs ro,relatime,nodiratime,nofail,cache_size=64M 0 0")
Then: compare ARRAY_PATH against zarr, `umount MNT`, and check the daemon exits.
Exit status 0 = pass; otherwise the failure is printed on stderr.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared kit (this directory is on it already)

import stores  # noqa: E402
from helpers import check_mounted_array  # noqa: E402
from kit import (  # noqa: E402
    force_unmount,
    is_mounted,
    kill_and_reap,
    mounts_at,
    pid_alive,
    run,
    wait_until,
    zarrfs_pids,
)


def main() -> int:
    mode, store, mp, bindir, array_path = sys.argv[1:6]
    fstab = sys.argv[6] if len(sys.argv) > 6 else None
    # refuse to touch /usr/local/sbin unless we really are in a private mount namespace
    outer_ns = os.environ.get("ZARRFS_TEST_OUTER_MNT_NS")
    assert outer_ns and os.readlink("/proc/self/ns/mnt") != outer_ns, \
        "must run under `unshare --mount --propagation private` (set ZARRFS_TEST_OUTER_MNT_NS)"
    r = run(["mount", "--bind", bindir, "/usr/local/sbin"])
    assert r.returncode == 0, f"bind mount of {bindir} failed: {r.stderr}"

    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    if mode == "type":
        cmd = ["mount", "-t", "fuse.zarrfs", store, mp, "-o", "ro,cache_size=64M"]
    else:
        cmd = ["mount", "-T", fstab, mp]
    pid = None
    try:
        r = run(cmd, env=env, timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: stdout={r.stdout!r} stderr={r.stderr!r}"
        assert wait_until(lambda: is_mounted(mp)), f"{mp} not in /proc/mounts after `{' '.join(cmd)}`"
        entry = mounts_at(mp)[-1]
        assert entry["fstype"].startswith("fuse"), entry
        assert "ro" in entry["options"], f"not mounted read-only: {entry}"
        pids = wait_until(lambda: zarrfs_pids(mp), 5)
        assert pids, "no process named zarrfs serves the mount"
        pid = pids[0]

        exp = stores.expected_array(Path(store), array_path)
        meta = stores.metadata_of(Path(store), array_path)
        chunk = meta.get("chunks") or meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk_bytes = int(exp.dtype.itemsize * math.prod(chunk))
        check_mounted_array(Path(mp) / array_path, exp, chunk_bytes, seed=11, n_reads=30)
        shape = json.loads(os.getxattr(Path(mp) / array_path, "user.zarr.shape"))
        assert shape == list(exp.shape), shape

        r = run(["umount", mp], timeout=30)
        assert r.returncode == 0, f"umount {mp} failed: {r.stderr}"
        assert wait_until(lambda: not is_mounted(mp)), f"{mp} still mounted after umount"
        assert wait_until(lambda: not pid_alive(pid)), f"zarrfs daemon {pid} still running 10 s after umount"
    finally:
        force_unmount(mp)
        for p in set(zarrfs_pids(mp)) | ({pid} if pid else set()):
            kill_and_reap(p, 2)
    print("ok")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
