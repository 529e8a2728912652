"""Mount Zarr stores as plain, memory-mappable files, from Python.

zarrfs is a FUSE filesystem: every array of a store appears as a flat row-major file ``NAME``
and a ``NAME.npy`` view of the same bytes, decoded on demand. This package drives the
``zarrfs`` command that the wheel installs next to the Python interpreter::

    import numpy as np, zarrfs

    with zarrfs.mount("data.zarr", cache_size="2G") as root:      # a pathlib.Path
        t = np.load(root / "grp" / "temperature.npy", mmap_mode="r")
        print(t[5, :10].mean())
    # unmounted here, also after an exception or Ctrl-C

    a = zarrfs.memmap("data.zarr", "grp/temperature")   # keeps its own mount until collected

Every mount made here ends with the Python process that made it, even if that process is killed
(the daemon watches it: ``zarrfs mount -o exit_with_parent``). Only the standard library is
needed; :func:`memmap` needs numpy.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Union

if TYPE_CHECKING:  # numpy is optional: only memmap needs it
    import numpy as np

__all__ = ["MountError", "mount", "unmount", "memmap", "stats", "zarrfs_command"]

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("zarrfs")  # the wheel's, which is Cargo.toml's
except PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = "unknown"

StrPath = Union[str, "os.PathLike[str]"]
OptionValue = Union[str, int, float, bool, None]

#: The extended attribute of a mount's root that holds its live counters (JSON).
STATS_XATTR = "user.zarrfs.stats"


class MountError(RuntimeError):
    """zarrfs could not mount, unmount or read a mount.

    ``str(error)`` is zarrfs' one-line message (``zarrfs: <store>: <reason>``); ``stderr`` is
    everything the command printed, ``returncode`` its exit status (``None`` when no command ran).
    """

    def __init__(self, message: str, stderr: str = "", returncode: Optional[int] = None) -> None:
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


def zarrfs_command() -> str:
    """The ``zarrfs`` executable: the one installed with this package (next to the Python
    interpreter, in its scripts directory), else the first on ``PATH``."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, "zarrfs")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("zarrfs")
    if found is None:
        raise MountError("the zarrfs command was not found (pip install zarrfs, or put zarrfs on PATH)")
    return found


def _run(*args: str) -> None:
    """Run ``zarrfs ARGS``; raise :class:`MountError` with its last line of stderr on failure.

    Output goes to temporary files, never pipes: the daemon shares our stderr until the mount is
    live and must not be able to block on it."""
    with tempfile.TemporaryFile("w+") as err:
        done = subprocess.run([zarrfs_command(), *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, check=False)
        if done.returncode != 0:
            err.seek(0)
            text = err.read()
            lines = [line for line in text.splitlines() if line.strip()]
            message = lines[-1] if lines else f"zarrfs {args[0]} failed with status {done.returncode}"
            raise MountError(message, text, done.returncode)


def _option_string(options: Dict[str, OptionValue]) -> str:
    """``-o`` text for keyword options: ``cache_size="4G"`` -> ``cache_size=4G``, ``rw=True`` ->
    ``rw``; ``False`` and ``None`` leave the option out."""
    parts = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            parts.append(name)
            continue
        text = str(value)
        if "," in text:
            raise ValueError(f"option {name}={text!r}: a value cannot contain a comma")
        parts.append(f"{name}={text}")
    return ",".join(parts)


def _is_mount_point(path: Path) -> bool:
    """Whether a mount sits at exactly ``path`` (from /proc/self/mountinfo; never stat, which
    would ask the mount itself)."""
    want = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                at = line.split(" ")[4]
                for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                    at = at.replace(escaped, char)
                if at == want:
                    return True
    except OSError:
        pass
    return False


class _Mount:
    """One mount made by this package; :meth:`close` unmounts it (lazily if files are still
    open) and removes the mount point if it was made here. Safe to call more than once."""

    def __init__(self, store: StrPath, mountpoint: Optional[StrPath], options: Dict[str, OptionValue]) -> None:
        self.private = mountpoint is None
        self.path = Path(tempfile.mkdtemp(prefix="zarrfs-")) if mountpoint is None else Path(mountpoint).absolute()
        self._lock = threading.Lock()
        self._closed = False
        opts = _option_string({"exit_with_parent": True, **options})
        try:
            _run("mount", "-o", opts, os.fspath(store), str(self.path))
        except BaseException:
            # Interrupted (Ctrl-C) just as the mount came up: it must not stay behind.
            self.close()
            raise
        with _LIVE_LOCK:
            _LIVE.add(self)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        try:
            if _is_mount_point(self.path):
                _run("umount", "--lazy", str(self.path))
        finally:
            if self.private:
                with contextlib.suppress(OSError):
                    self.path.rmdir()


_LIVE: "weakref.WeakSet[_Mount]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_live_mounts() -> None:
    """At interpreter exit: the mounts still open (a ``with`` block in a suspended generator,
    a memmap still referenced) are unmounted and their temporary mount points removed."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for m in live:
        with contextlib.suppress(Exception):
            m.close()


@contextlib.contextmanager
def mount(store: StrPath, mountpoint: Optional[StrPath] = None, **options: OptionValue) -> Iterator[Path]:
    """Mount ``store`` (a local directory, ``s3://...`` or ``https://...``) for the ``with``
    block and yield the mount's root as a :class:`pathlib.Path`.

    ``mountpoint``: an existing empty directory; by default a private temporary directory,
    removed afterwards. ``options`` are zarrfs' ``-o`` mount options (see ``zarrfs mount
    --help``): ``cache_size="4G"``, ``threads=8``, ``decode_threads=4``, ``rw=True``,
    ``disk_cache="/var/cache/z"``, ``remote_timeout="10s"``, ...; ``True`` gives a bare flag,
    ``False``/``None`` leave the option out.

    Raises :class:`MountError` carrying zarrfs' one-line error when the store cannot be mounted.
    The mount is undone when the block ends, however it ends (exception, ``KeyboardInterrupt``);
    files still open then keep working until closed, the mount point being detached at once.
    """
    handle = _Mount(store, mountpoint, options)
    try:
        yield handle.path
    finally:
        handle.close()


def unmount(path: StrPath, lazy: bool = False) -> None:
    """Unmount the zarrfs mount at ``path`` (``zarrfs umount``). While files on it are open this
    raises :class:`MountError` ("busy"), unless ``lazy``: then the mount point is detached now
    and the daemon ends once they are closed."""
    args = ["umount", str(path)]
    if lazy:
        args.insert(1, "--lazy")
    _run(*args)


def memmap(store: StrPath, array: str, mode: str = "r", **options: OptionValue) -> "np.memmap":
    """The array ``array`` (its path in the store, e.g. ``"grp/temperature"``) of ``store`` as an
    :class:`numpy.memmap` of its ``.npy`` view, on a private mount of its own.

    The mount lives as long as the memory map: it is unmounted when the array (and every view
    of it) has been garbage collected, and at interpreter exit. ``mode`` is ``"r"``, ``"c"``
    (copy-on-write in memory) or ``"r+"`` (writes go to the store; mounts with ``rw``).
    ``options`` are mount options as for :func:`mount`.
    """
    import numpy as np

    if mode not in ("r", "c", "r+"):
        raise ValueError(f"mode must be 'r', 'c' or 'r+', not {mode!r}")
    if mode == "r+":
        options.setdefault("rw", True)
    handle = _Mount(store, None, options)
    try:
        mapped = np.load(handle.path / f"{array.strip('/')}.npy", mmap_mode=mode)
    except BaseException:
        handle.close()
        raise
    # Views of the array share its mmap object: the mount ends when the last of them goes.
    owner = getattr(mapped, "_mmap", None)
    weakref.finalize(mapped if owner is None else owner, handle.close)
    return mapped


def stats(path: StrPath) -> Dict[str, Any]:
    """The live counters of the mount whose root is ``path``: chunks decoded, cache hits and
    misses, evictions, bytes decoded and served, decode seconds, cache use and budget."""
    try:
        text = os.getxattr(os.fspath(path), STATS_XATTR)
    except OSError as e:
        raise MountError(f"{os.fspath(path)}: not the root of a zarrfs mount ({e.strerror})") from e
    counters: Dict[str, Any] = json.loads(text)
    return counters

