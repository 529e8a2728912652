"""Reading through a zarrfs mount: contents, layout, metadata, CLI `info`.

The two big stores (v2 and v3; a Zarr hierarchy has one format) are each
mounted ONCE for the module; every array is its own test id.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

import stores
from helpers import PUBLIC_TMP_PREFIX, check_mounted_array, check_preads, errno_of, stored_bytes
from kit import Mount, clean_env, force_unmount, is_mounted, proc_mounts, run, run_zarrfs, wait_until

CASES = [c for c in stores.ALL_CASES if not c.skipped]
XATTRS = ["user.zarr.shape", "user.zarr.dtype", "user.zarr.chunks", "user.zarr.fill_value",
          "user.zarr.attributes", "user.zarr.zarr_format"]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_mounts(big_stores, zarrfs_bin, tmp_path_factory):
    base = tmp_path_factory.mktemp("bigmnt")
    mounts: dict[int, Mount] = {}
    try:
        for fmt, store in big_stores.items():
            mounts[fmt] = Mount(store, base / f"v{fmt}").start()
        yield mounts
    finally:
        for m in mounts.values():
            m.close()


@functools.lru_cache(maxsize=None)
def _expected(store: str, path: str) -> np.ndarray:
    return stores.expected_array(store, path)


def expected_for(big_stores, case) -> np.ndarray:
    return _expected(str(big_stores[case.zarr_format]), case.path)


def chunk_shape_options(meta: dict) -> list[list[int]]:
    """Acceptable values for "chunks": the storage chunk (shard) shape, and for a
    sharded array also the inner chunk shape (the contract doesn't pin which)."""
    if meta["zarr_format"] == 2:
        return [list(meta["chunks"])]
    outer = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
    opts = [outer]
    first = meta["codecs"][0]
    if first["name"] == "sharding_indexed":
        opts.append(list(first["configuration"]["chunk_shape"]))
    return opts


def _norm_scalar(v, kind):
    if kind == "b":
        return bool(v)
    if kind in "iu":
        return int(v)
    if isinstance(v, str):
        specials = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
        if v in specials:
            return specials[v]
        if v.startswith("0x"):  # v3 hex-encoded float
            raw = bytes.fromhex(v[2:])
            return float(np.frombuffer(raw, {2: ">f2", 4: ">f4", 8: ">f8"}[len(raw)])[0])
        return float(v)
    return float(v)


def norm_fill(v, dtype):
    """Normalise a JSON fill value so 0 == 0.0 and "NaN" == "NaN" compare equal."""
    if v is None:
        return None
    kind = np.dtype(dtype).kind
    if kind == "c":
        assert isinstance(v, list) and len(v) == 2, f"complex fill value should be [re, im], got {v!r}"
        return tuple(_norm_scalar(x, "f") for x in v)
    return _norm_scalar(v, kind)


def fill_equal(got, expected, dtype) -> bool:
    g, e = norm_fill(got, dtype), norm_fill(expected, dtype)
    if isinstance(e, tuple):
        return isinstance(g, tuple) and all(_same(a, b) for a, b in zip(g, e))
    return _same(g, e)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    if isinstance(b, bool):
        return isinstance(a, bool) and a == b
    return a == b


# --------------------------------------------------------------------------
# contents
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_array_contents(big_mounts, big_stores, case):
    exp = expected_for(big_stores, case)
    m = big_mounts[case.zarr_format]
    check_mounted_array(m.path(case.path), exp, case.chunk_bytes, seed=stores._seed("pread", case.id))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dd_sha256(big_mounts, big_stores, case):
    exp = expected_for(big_stores, case)
    f = big_mounts[case.zarr_format].path(case.path)
    r = run(["bash", "-o", "pipefail", "-c", 'dd if="$1" bs=1M status=none | sha256sum', "dd", f])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.sha256(exp.tobytes()).hexdigest()


@pytest.mark.parametrize("case_id", ["v3-large_2d", "v2-big_endian_i4", "v3-dtype_bool_2d", "v2-order_F_3d"])
def test_hexdump(big_mounts, big_stores, tmp_path, case_id):
    case = next(c for c in CASES if c.id == case_id)
    exp = expected_for(big_stores, case)
    local = tmp_path / "expected.bin"
    local.write_bytes(exp.tobytes())
    f = big_mounts[case.zarr_format].path(case.path)
    got = run(["hexdump", "-C", "-n", "256", f])
    want = run(["hexdump", "-C", "-n", "256", local])
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout


def test_concurrent_reads(big_mounts, big_stores):
    """Many threads pread different arrays (and the same one) at once."""
    picks = [c for c in CASES if c.id in ("v3-large_2d", "v3-shard_partial", "v2-order_F_3d", "v2-blosc_lz4",
                                          "v3-transpose_3d", "v3-missing_chunks_nan")]
    picks += [picks[0]] * 3  # several readers on the big array
    errors: list[BaseException] = []

    def worker(i, case):
        try:
            exp = expected_for(big_stores, case).tobytes()
            check_preads(big_mounts[case.zarr_format].path(case.path), exp, case.chunk_bytes,
                         np.random.default_rng(1000 + i), n=40)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(picks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "reader threads hung"
    assert not errors, errors[0]


# --------------------------------------------------------------------------
# layout, attributes of files
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_directory_tree(big_mounts, fmt):
    cases, empty = stores.BIG_STORES[fmt]
    tree = stores.expected_tree(cases, empty)
    root = big_mounts[fmt].path()
    for d, entries in sorted(tree.items()):
        p = root / d if d else root
        st = os.stat(p)
        assert stat.S_ISDIR(st.st_mode), p
        assert stat.S_IMODE(st.st_mode) == 0o555, f"{p}: mode {oct(stat.S_IMODE(st.st_mode))}"
        assert sorted(os.listdir(p)) == sorted(entries), f"listing of /{d}"
        for name in entries:
            est = os.lstat(p / name)
            if (d + "/" + name).lstrip("/") in tree:
                assert stat.S_ISDIR(est.st_mode), p / name
            else:
                assert stat.S_ISREG(est.st_mode), p / name
                assert stat.S_IMODE(est.st_mode) == 0o444, f"{p / name}: mode {oct(stat.S_IMODE(est.st_mode))}"
    # `ls` agrees with os.listdir, and metadata files are not exposed
    r = run(["ls", "-1A", root / "deep/sub"])
    assert r.returncode == 0 and r.stdout.split() == sorted(tree["deep/sub"])
    # the store's own metadata / chunk files are not exposed
    for hidden in ("zarr.json", ".zgroup", ".zattrs", "deep/zarr.json", "deep/.zgroup", "codecs/default/c",
                   "compressors/default/0.0", "codecs/default.npy/x", "codecs/default.npy.npy",
                   "compressors/default.npy.npy", "deep/sub/mid.NPY"):
        assert errno_of(os.stat, root / hidden) in (errno.ENOENT, errno.ENOTDIR), hidden
    assert errno_of(os.stat, root / "no_such_thing") == errno.ENOENT


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_file_sizes(big_mounts, case):
    m = big_mounts[case.zarr_format]
    assert os.stat(m.path(case.path)).st_size == case.nbytes
    npy = m.path(case.path + ".npy")
    with open(npy, "rb") as f:
        head = f.read(4096)
    assert head[:6] == b"\x93NUMPY"
    assert os.stat(npy).st_size > case.nbytes


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_xattrs(big_mounts, big_stores, case):
    m = big_mounts[case.zarr_format]
    store = big_stores[case.zarr_format]
    meta = stores.metadata_of(store, case.path)
    for f in (m.path(case.path), m.path(case.path + ".npy")):
        names = os.listxattr(f)
        for x in XATTRS:
            assert x in names, f"{f}: listxattr lacks {x}: {names}"
        x = {n: os.getxattr(f, n).decode() for n in XATTRS}
        assert json.loads(x["user.zarr.shape"]) == list(case.shape)
        # the dtype describes the exposed (native-endian) bytes, so
        # np.memmap(f, dtype=xattr_dtype, shape=xattr_shape) is correct
        assert x["user.zarr.dtype"] == case.native_dtype.str
        assert json.loads(x["user.zarr.chunks"]) in chunk_shape_options(meta), x["user.zarr.chunks"]
        assert fill_equal(json.loads(x["user.zarr.fill_value"]), meta["fill_value"], case.native_dtype), \
            f"fill_value xattr {x['user.zarr.fill_value']!r} != metadata {meta['fill_value']!r}"
        assert json.loads(x["user.zarr.attributes"]) == stores.attributes_of(store, case.path)
        assert x["user.zarr.zarr_format"].strip() == str(case.zarr_format)
        assert errno_of(os.getxattr, f, "user.zarr.nonexistent") == errno.ENODATA


def _getfattr_decode(v: str) -> str:
    """Decode one value as printed by getfattr (quoted text with octal escapes, 0x hex or 0s base64)."""
    if v.startswith("0x"):
        return bytes.fromhex(v[2:]).decode()
    if v.startswith("0s"):
        import base64

        return base64.b64decode(v[2:]).decode()
    assert v.startswith('"') and v.endswith('"'), v
    b, out, i = v[1:-1].encode(), bytearray(), 0
    while i < len(b):
        if b[i] == 0x5C and re.fullmatch(rb"[0-7]{3}", b[i + 1:i + 4]):
            out.append(int(b[i + 1:i + 4], 8))
            i += 4
        elif b[i] == 0x5C and i + 1 < len(b):
            out.append(b[i + 1])
            i += 2
        else:
            out.append(b[i])
            i += 1
    return out.decode()


def _getfattr_values(out: str) -> dict[str, str]:
    vals = {}
    for line in out.splitlines():
        mm = re.match(r"^(user\.[^=]+)=(.*)$", line)
        if mm:
            vals[mm.group(1)] = _getfattr_decode(mm.group(2))
    return vals


def test_getfattr_dump(big_mounts):
    f = big_mounts[3].path("large/temperature")
    r = run(["getfattr", "-d", "--absolute-names", f])
    assert r.returncode == 0, r.stderr
    vals = _getfattr_values(r.stdout)
    missing = [x for x in XATTRS if x not in vals]  # extra user.zarr.* names are fine
    assert not missing, f"getfattr -d lacks {missing}:\n{r.stdout}"
    assert json.loads(vals["user.zarr.shape"]) == [1000, 1000]
    assert vals["user.zarr.dtype"] == "<f4"
    assert json.loads(vals["user.zarr.chunks"]) == [256, 256]
    assert json.loads(vals["user.zarr.attributes"]) == stores.ATTRS
    assert vals["user.zarr.zarr_format"] == "3"


def test_mount_entry(big_mounts):
    for m in big_mounts.values():
        e = m.entry()
        assert e["fstype"].startswith("fuse"), e
        assert "ro" in e["options"], f"mount is not read-only in /proc/mounts: {e}"
        m.assert_live()
        assert m.pid is not None, "could not find a process named zarrfs serving the mount"
        with open(f"/proc/{m.pid}/comm") as f:
            assert f.read().strip() == "zarrfs"


# --------------------------------------------------------------------------
# other stores / options
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,dirname,name,suffix", [(3, "temp.zarr", "temp", ""), (2, "legacy_v2", "legacy_v2", ""),
                                                      (2, "old.zarr", "old", "/")],
                         ids=["v3-temp.zarr", "v2-no-suffix", "v2-trailing-slash"])
def test_root_is_array(mount_factory, tmp_path, fmt, dirname, name, suffix):
    store = tmp_path / dirname
    stores.build_root_array_store(store, fmt)
    exp = stores.expected_array(store, "")
    m = mount_factory(str(store) + suffix)
    assert sorted(os.listdir(m.path())) == sorted([name, name + ".npy"])
    check_mounted_array(m.path(name), exp, 64 * 64 * exp.dtype.itemsize, seed=fmt)
    assert json.loads(os.getxattr(m.path(name), "user.zarr.shape")) == [300, 200]
    assert json.loads(os.getxattr(m.path(name + ".npy"), "user.zarr.attributes")) == {"role": "root array"}
    assert os.getxattr(m.path(name), "user.zarr.zarr_format").decode().strip() == str(fmt)


def test_vlen_strings_skipped(mount_factory, tmp_path):
    store = tmp_path / "strings.zarr"
    stores.build_strings_store(store)
    m = mount_factory(store)
    assert sorted(os.listdir(m.path())) == ["values", "values.npy"]
    assert errno_of(os.stat, m.path("names")) == errno.ENOENT
    check_mounted_array(m.path("values"), stores.expected_array(store, "values"), 32 * 8 * 4, seed=7)
    r = run_zarrfs("info", "--json", store)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [a["path"] for a in info["arrays"]] == ["/values"]
    assert [s["path"] for s in info["skipped"]] == ["/names"]
    assert info["skipped"][0]["reason"]


@pytest.mark.parametrize("opts", [["--cache-size", "1M", "--threads", "2"], ["-o", "ro,cache_size=2M"]],
                         ids=["small-cache-2-threads", "dash-o"])
def test_mount_options(mount_factory, big_stores, opts):
    """Arrays larger than the cache still read correctly."""
    m = mount_factory(big_stores[3], *opts)
    for cid in ("v3-large_2d", "v3-shard_partial", "v3-missing_chunks_nan"):
        case = next(c for c in CASES if c.id == cid)
        check_mounted_array(m.path(case.path), expected_for(big_stores, case), case.chunk_bytes, seed=3, n_reads=30)


def test_relative_paths(zarrfs_bin, big_stores, tmp_path, guard_paths):
    """Relative STORE and MOUNTPOINT work although the daemon may chdir("/")."""
    store = tmp_path / "rel.zarr"
    stores.build_simple_store(store, 3, shape=(5000,), dtype="int32", chunks=(1000,))
    (tmp_path / "relmnt").mkdir()
    guard_paths.append(str(tmp_path / "relmnt"))
    with open(tmp_path / "stderr.txt", "w+") as err:
        r = subprocess.run([str(zarrfs_bin), "mount", "rel.zarr", "relmnt"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=err, timeout=60, stdin=subprocess.DEVNULL, env=clean_env())
    try:
        assert r.returncode == 0, (tmp_path / "stderr.txt").read_text()
        assert wait_until(lambda: is_mounted(tmp_path / "relmnt"))
        check_mounted_array(tmp_path / "relmnt/data", stores.expected_array(store, "data"), 4000, seed=5, n_reads=10)
    finally:
        run(["fusermount3", "-u", tmp_path / "relmnt"])


@pytest.fixture
def public_dir(guard_paths):
    """A world-traversable temp dir (pytest's basetemp is 0700, which would hide
    the mount from other users regardless of allow_other)."""
    d = tempfile.mkdtemp(prefix=os.path.basename(PUBLIC_TMP_PREFIX), dir=os.path.dirname(PUBLIC_TMP_PREFIX))
    os.chmod(d, 0o755)
    guard_paths.extend([os.path.join(d, "mnt_default"), os.path.join(d, "mnt_other")])
    yield d
    for sub in ("mnt_default", "mnt_other"):
        force_unmount(os.path.join(d, sub))
    shutil.rmtree(d, ignore_errors=True)


def test_allow_other(mount_factory, public_dir):
    """Without --allow-other another user is refused; with it, they can read."""
    store = os.path.join(public_dir, "store.zarr")
    stores.build_simple_store(Path(store), 3, shape=(1000,), dtype="int16", chunks=(100,))
    exp = stores.expected_array(store, "data").tobytes()
    digest = hashlib.sha256(exp).hexdigest()
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "sha256sum"]

    m = mount_factory(store, mountpoint=os.path.join(public_dir, "mnt_default"))
    r = run([*as_nobody, m.path("data")])
    assert r.returncode != 0, "another user could read a mount made without --allow-other"
    assert "Permission denied" in r.stderr, r.stderr

    m2 = mount_factory(store, "--allow-other", mountpoint=os.path.join(public_dir, "mnt_other"))
    assert "allow_other" in m2.entry()["options"], m2.entry()
    r = run([*as_nobody, m2.path("data")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == digest


def test_mount_is_live_when_daemon_returns(zarrfs_bin, big_stores, tmp_path, guard_paths):
    """Daemon mode returns 0 only once the mount is live: no polling here."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    r = run_zarrfs("mount", big_stores[2], mp)
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(mp), "zarrfs mount returned before the mount appeared in /proc/mounts"
        assert "compressors" in os.listdir(mp)
    finally:
        run(["fusermount3", "-u", mp])
    assert wait_until(lambda: not is_mounted(mp))


def test_daemon_detaches_stdio(zarrfs_bin, big_stores, tmp_path, guard_paths):
    """`out=$(zarrfs mount ...)` must not hang: the daemon closes inherited stdout/stderr."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    p = subprocess.Popen([str(zarrfs_bin), "mount", str(big_stores[3]), str(mp)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("zarrfs mount: the daemon kept the caller's stdout/stderr pipes open (caller blocks)")
    finally:
        run(["fusermount3", "-u", mp])
    assert p.returncode == 0, err


# --------------------------------------------------------------------------
# zarrfs info
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_info_table(zarrfs_bin, big_stores, fmt):
    r = run_zarrfs("info", big_stores[fmt])
    assert r.returncode == 0, r.stderr
    cases, _ = stores.BIG_STORES[fmt]
    for c in cases:
        if not c.skipped:
            assert c.path in r.stdout, f"{c.path} missing from `zarrfs info` table"
    assert "1000" in r.stdout  # shapes are shown


@pytest.mark.parametrize("fmt", [2, 3])
def test_info_json(zarrfs_bin, big_stores, fmt):
    store = big_stores[fmt]
    r = run_zarrfs("info", "--json", store)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert os.path.realpath(info["store"]) == os.path.realpath(store)
    assert info["zarr_format"] == fmt
    cases, _ = stores.BIG_STORES[fmt]
    by_path = {a["path"]: a for a in info["arrays"]}
    want = {"/" + c.path: c for c in cases if not c.skipped}
    assert sorted(by_path) == sorted(want)
    for p, c in want.items():
        a = by_path[p]
        meta = stores.metadata_of(store, c.path)
        assert a["dtype"] in (c.native_dtype.str, np.dtype(c.dtype).str), (p, a["dtype"])
        assert a["shape"] == list(c.shape), p
        assert a["chunks"] in chunk_shape_options(meta), (p, a["chunks"])
        assert a["nbytes"] == c.nbytes, p
        assert a["stored_bytes"] == stored_bytes(Path(store) / c.path), p
        assert fill_equal(a["fill_value"], meta["fill_value"], c.native_dtype), (p, a["fill_value"])
        assert "codecs" in a, p
    skipped = {s["path"]: s for s in info["skipped"]}
    assert sorted(skipped) == ["/text/names"]
    assert isinstance(skipped["/text/names"]["reason"], str) and skipped["/text/names"]["reason"]


def test_info_survives_closed_stdout(zarrfs_bin, big_stores):
    """`zarrfs info STORE | head -n 1` must not panic: stdout is a pipe whose reader is gone (EPIPE)."""
    rfd, wfd = os.pipe()
    os.close(rfd)  # deterministic: the very first write gets EPIPE
    try:
        p = subprocess.run([str(zarrfs_bin), "info", str(big_stores[3])], stdout=wfd, stderr=subprocess.PIPE,
                           text=True, timeout=60, stdin=subprocess.DEVNULL, env=clean_env())
    finally:
        os.close(wfd)
    assert "panicked" not in p.stderr, p.stderr
    assert p.returncode in (0, 1, -13, 141), p.returncode  # exit quietly, or die of SIGPIPE like coreutils


def test_info_missing_store(zarrfs_bin, tmp_path):
    r = run_zarrfs("info", tmp_path / "nope.zarr")
    assert r.returncode != 0
    err = r.stderr.rstrip("\n")
    assert "\n" not in err and str(tmp_path / "nope.zarr") in err, err


def test_info_does_not_mount(zarrfs_bin, big_stores):
    # Only zarrfs mounts of this store count: other test runs may mount concurrently.
    def ours():
        return [m for m in proc_mounts() if m["fstype"].endswith("zarrfs") and str(big_stores[3]) in m["source"]]
    before = ours()
    r = run_zarrfs("info", big_stores[3])
    assert r.returncode == 0
    assert ours() == before


def test_shard_replaced_by_another_writer_reads_old_or_new_never_a_mix(mount_factory, tmp_path):
    """A read-only mount has used a shard's index; another writer (zarr-python) replaces the
    shard, and its inner chunks move. An inner chunk not decoded yet must read as the new data:
    the index of a shard whose file changed is read again, not applied to the new bytes."""
    import zarr
    rows, width, inner, shard = 64, 1024, 8, 32  # f4: 32 KiB inner chunks, two shards
    store = tmp_path / "sharded.zarr"
    rng = np.random.default_rng(5)
    old = rng.standard_normal((rows, width)).astype("f4")  # barely compressible
    zarr.open_group(str(store), mode="w", zarr_format=3)
    z = zarr.create_array(store=str(store), name="arr", shape=(rows, width), dtype="f4", chunks=(inner, width),
                          shards=(shard, width), zarr_format=3)
    z[:] = old
    m = mount_factory(store)
    row = width * 4
    fd = os.open(m.path("arr"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one page per read: one inner chunk decoded
        assert os.pread(fd, 4, 1 * inner * row) == old[inner, :1].tobytes()
        new = np.tile(np.arange(width, dtype="f4"), (rows, 1)) + 7  # compresses far better: offsets move
        zarr.open_array(str(store), path="arr", mode="r+")[:] = new
        got = np.frombuffer(os.pread(fd, 4 * 4, 2 * inner * row), "f4")  # inner chunk 2 of shard 0
        assert np.array_equal(got, new[2 * inner, :4]), f"read {got}, new {new[2 * inner, :4]}, old {old[2 * inner, :4]}"
    finally:
        os.close(fd)
