"""`zarrfs umount`, `zarrfs stats` and `-o exit_with_parent` on the repo's binary. The same
commands through the installed wheel are in tests/wheel; these are the cases that need the kit."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import stores
from kit import ZARRFS_BIN, Mount, force_unmount, is_mounted, kill_and_reap, run_zarrfs, wait_until, zarrfs_pids


def _store(tmp_path):
    store = tmp_path / "s.zarr"
    stores.build_simple_store(store, 3, shape=(1000,), dtype="i4", chunks=(100,))
    return store


def test_umount_of_a_mount_whose_daemon_died(tmp_path):
    """A dead daemon leaves a mount that answers ENOTCONN to every lookup; `zarrfs umount` must
    not look at it to find its path."""
    mp = tmp_path / "mnt"
    with Mount(_store(tmp_path), mp) as m:
        os.kill(m.pid, signal.SIGKILL)
        assert wait_until(lambda: not zarrfs_pids(str(mp)), 10)
        assert is_mounted(mp)
        done = run_zarrfs("umount", mp)
        assert (done.returncode, done.stderr) == (0, "")
        assert not is_mounted(mp)


def test_stats_of_a_live_mount_and_of_a_plain_directory(tmp_path):
    mp = tmp_path / "mnt"
    with Mount(_store(tmp_path), mp, "--cache-size", "1M") as m:
        (mp / "data").read_bytes()
        counters = json.loads(run_zarrfs("stats", "--json", mp).stdout)
        assert counters == m.stats()  # the same document as the xattr, nothing read in between
        assert counters["chunks_decoded"] == 10 and counters["cache_budget_bytes"] == 1 << 20
    done = run_zarrfs("stats", tmp_path)
    assert done.returncode == 1
    assert done.stderr == f"zarrfs: {tmp_path}: not the root of a zarrfs mount (it has no user.zarrfs.stats)\n"


def test_exit_with_parent_unmounts_when_the_mounting_process_is_killed(tmp_path):
    """The daemon watches the process that ran `zarrfs mount` (here a shell that then waits on
    its stdin), not the command itself, which exits as soon as the mount is live."""
    store, mp = _store(tmp_path), tmp_path / "mnt"
    mp.mkdir()
    shell = subprocess.Popen(
        ["sh", "-c", f'"$0" mount -o exit_with_parent "$1" "$2" && echo mounted && exec cat', ZARRFS_BIN, store, mp],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout.readline() == "mounted\n"
        assert is_mounted(mp)
        daemons = zarrfs_pids(str(mp))
        assert daemons
        shell.kill()
        shell.wait()
        assert wait_until(lambda: not is_mounted(mp), 20), "the daemon did not unmount"
        assert wait_until(lambda: not zarrfs_pids(str(mp)), 20), "the daemon did not exit"
    finally:
        shell.kill()
        shell.wait()
        shell.stdin.close()
        shell.stdout.close()
        force_unmount(mp)
        for pid in zarrfs_pids(str(mp)):
            kill_and_reap(pid)
