"""Builders for the Zarr stores the end-to-end tests mount.

Every store is written with zarr-python 3 (pinned in requirements.txt) from
seeded random data, so a build is deterministic. The case lists are static so
pytest can parametrise over them at collection time; the stores themselves are
written once per session by fixtures in conftest.py.

Expected file contents are always derived by reading the store back with
zarr-python (see :func:`expected_array`), never from the generating data, so
the tests check zarrfs against the reference implementation.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
    ZstdCodec,
)

# Attributes attached to most arrays; exercised through user.zarr.attributes.
ATTRS = {
    "units": "K",
    "long_name": "température de surface",
    "scale_factor": 0.5,
    "valid_range": [-50, 60],
    "nested": {"a": [1, 2, 3], "b": None, "c": True},
}


@dataclass
class ArrayCase:
    """One array in a multi-array store."""

    id: str  # pytest id, unique over all cases
    path: str  # path inside the store, "" for a root array
    zarr_format: int
    shape: tuple[int, ...]
    dtype: str  # dtype handed to zarr (may be non-native, e.g. ">i4")
    chunks: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_array kwargs
    write: str = "full"  # "full" | "partial" (some chunks missing) | "none" (nothing written)
    attributes: dict[str, Any] | None = None
    skipped: bool = False  # variable-length strings: zarrfs must skip it

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def shards(self) -> tuple[int, ...] | None:
        s = self.kwargs.get("shards")
        if isinstance(s, dict):
            return tuple(s["shape"])
        return tuple(s) if s is not None else None

    @property
    def native_dtype(self) -> np.dtype:
        return native(np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.native_dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunks, dtype=np.int64)) * self.native_dtype.itemsize


def native(dt: np.dtype) -> np.dtype:
    """The native-endian equivalent of ``dt`` (what zarrfs exposes)."""
    dt = np.dtype(dt)
    return np.dtype(dt.newbyteorder("=").str)


def _seed(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_data(shape, dtype, seed: int) -> np.ndarray:
    """Deterministic random data covering the whole range of ``dtype``."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt.newbyteorder("="), endpoint=True).astype(dt)
    if dt.kind == "f":
        a = (rng.standard_normal(shape) * 1000).astype(dt)
        flat = a.reshape(-1)
        if flat.size >= 16:  # a few special values, exact bit patterns survive the round trip
            flat[[1, 5, 9, 13]] = np.array([np.inf, -np.inf, -0.0, np.nan], dtype=dt)
        return a
    if dt.kind == "c":
        re = rng.standard_normal(shape) * 100
        im = rng.standard_normal(shape) * 100
        return (re + 1j * im).astype(dt)
    if dt.kind in "OUT":
        words = np.array(["", "a", "zarr", "Ünïcödé", "x" * 40, "fuse"], dtype=object)
        return words[rng.integers(0, len(words), size=shape)]
    raise ValueError(f"unsupported dtype {dt}")


def _selected_chunks(case: ArrayCase):
    """Chunk slices to write for a ``partial`` case: deliberately leaves gaps,
    and for sharded arrays leaves whole shards absent and shards partly filled."""
    grid = [-(-s // c) for s, c in zip(case.shape, case.chunks)]
    shards = case.shards
    for idx in np.ndindex(*grid):
        if shards is not None:
            per = [sh // c for sh, c in zip(shards, case.chunks)]
            shard_idx = tuple(i // p for i, p in zip(idx, per))
            if sum(shard_idx) % 2 == 1:  # whole shard missing
                continue
            if sum(idx) % 2 == 1:  # inner chunk missing inside a present shard
                continue
        elif sum(idx) % 3 == 1:  # plain chunk missing
            continue
        yield tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, case.chunks, case.shape))


def write_case(store_root: Path, case: ArrayCase) -> zarr.Array:
    kwargs = dict(case.kwargs)
    data = make_data(case.shape, case.dtype, _seed(case.id))
    common = dict(
        store=str(store_root),
        name=case.path or None,
        chunks=case.chunks,
        zarr_format=case.zarr_format,
        attributes=case.attributes,
        overwrite=True,
    )
    if case.skipped:  # variable-length strings
        arr = zarr.create_array(shape=case.shape, dtype=str, **common, **kwargs)
        arr[...] = data
        return arr
    if case.write == "full":
        return zarr.create_array(data=data, **common, **kwargs)
    arr = zarr.create_array(shape=case.shape, dtype=case.dtype, **common, **kwargs)
    if case.write == "partial":
        for sel in _selected_chunks(case):
            arr[sel] = data[sel]
    return arr


def expected_array(store_root: Path, case_path: str) -> np.ndarray:
    """The array as zarr-python reads it, C-contiguous and native-endian."""
    arr = zarr.open_array(store=str(store_root), path=case_path or "", mode="r")
    a = np.ascontiguousarray(arr[...])
    return a.astype(native(a.dtype))


def metadata_of(store_root: Path, case_path: str) -> dict:
    """The raw on-disk metadata document (zarr.json or .zarray)."""
    d = Path(store_root, case_path) if case_path else Path(store_root)
    if (d / "zarr.json").exists():
        return json.loads((d / "zarr.json").read_text())
    return json.loads((d / ".zarray").read_text())


def attributes_of(store_root: Path, case_path: str) -> dict:
    d = Path(store_root, case_path) if case_path else Path(store_root)
    if (d / "zarr.json").exists():
        return json.loads((d / "zarr.json").read_text()).get("attributes", {})
    za = d / ".zattrs"
    return json.loads(za.read_text()) if za.exists() else {}


# --------------------------------------------------------------------------
# The two big multi-array stores (one per zarr format; a Zarr hierarchy has a
# single format, so v2 and v3 arrays live in separate stores).
# --------------------------------------------------------------------------


def _v2(id, path, shape, dtype, chunks, write="full", attrs=ATTRS, skipped=False, **kw):
    return ArrayCase(f"v2-{id}", path, 2, tuple(shape), dtype, tuple(chunks), kw, write, attrs, skipped)


def _v3(id, path, shape, dtype, chunks, write="full", attrs=ATTRS, skipped=False, **kw):
    return ArrayCase(f"v3-{id}", path, 3, tuple(shape), dtype, tuple(chunks), kw, write, attrs, skipped)


V2_CASES: list[ArrayCase] = [
    # compressors
    _v2("default_zstd", "compressors/default", (120, 90), "<f4", (32, 25)),
    _v2("blosc_lz4", "compressors/blosc_lz4", (120, 90), "<f4", (32, 25),
        compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)),
    _v2("blosc_zstd_bitshuffle", "compressors/blosc_zstd", (300, 37), "<i4", (64, 16),
        compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)),
    _v2("zlib", "compressors/zlib", (77, 53), "<i8", (20, 20), compressors=numcodecs.Zlib(level=5)),
    _v2("gzip", "compressors/gzip", (64, 64), "<f8", (30, 30), compressors=numcodecs.GZip(level=6)),
    _v2("zstd", "compressors/zstd", (5000,), "<u2", (1024,), compressors=numcodecs.Zstd(level=3)),
    _v2("no_compressor", "compressors/none", (40, 50), "<i2", (16, 16), compressors=None),
    # memory layout / keys
    _v2("order_F_3d", "layout/order_f", (30, 40, 50), "<i4", (8, 16, 20), order="F"),
    _v2("order_F_2d_nocomp", "layout/order_f_raw", (33, 47), "<f8", (10, 10), order="F", compressors=None),
    _v2("dim_sep_slash", "layout/nested_keys", (50, 60, 7), "<f4", (16, 16, 4),
        chunk_key_encoding={"name": "v2", "separator": "/"}),
    # endianness
    _v2("big_endian_i4", "endian/be_i4", (100, 70), ">i4", (30, 30)),
    _v2("big_endian_f8", "endian/be_f8", (2000,), ">f8", (512,)),
    _v2("big_endian_f8_order_F", "endian/be_f8_order_f", (30, 40), ">f8", (7, 9), order="F", compressors=None),
    _v2("big_endian_u2", "endian/be_u2", (11, 13, 17), ">u2", (4, 5, 6)),
    # fill values / missing chunks
    _v2("missing_chunks_fill42", "fill/missing_nonzero", (90, 90), "<i4", (20, 20), write="partial", fill_value=42),
    _v2("missing_chunks_nan", "fill/missing_nan", (90, 90), "<f4", (20, 20), write="partial", fill_value=np.nan),
    _v2("never_written", "fill/never_written", (50, 50), "<f8", (16, 16), write="none", fill_value=-1.5),
    # dtypes
    _v2("dtype_u1", "dtypes/u1", (1000,), "|u1", (300,)),
    _v2("dtype_i1", "dtypes/i1", (40, 41), "|i1", (16, 16)),
    _v2("dtype_bool", "dtypes/bool", (33, 65), "|b1", (10, 20)),
    _v2("dtype_f2", "dtypes/f2", (70, 30), "<f2", (32, 16)),
    _v2("dtype_c8", "dtypes/c8", (45, 46), "<c8", (16, 16)),
    _v2("dtype_u8", "dtypes/u8", (7, 8, 9, 10), "<u8", (3, 3, 4, 4)),
    # deep nesting: root group -> group -> subgroup -> subsubgroup -> array
    _v2("deep", "deep/sub/subsub/leaf", (25, 26), "<u4", (10, 10)),
    _v2("deep_mid", "deep/sub/mid", (100,), "<i2", (33,), attrs={}),
    # must be skipped
    _v2("vlen_strings", "text/names", (20,), "|O", (8,), skipped=True),
]

V2_EMPTY_GROUPS = ["empty_group", "text"]  # groups with no (visible) arrays

V3_CASES: list[ArrayCase] = [
    # codecs
    _v3("default_zstd", "codecs/default", (120, 90), "float32", (32, 25)),
    _v3("gzip_crc32c", "codecs/gzip_crc32c", (64, 100), "int32", (30, 30),
        compressors=[GzipCodec(level=5), Crc32cCodec()]),
    _v3("blosc_lz4", "codecs/blosc", (120, 90), "float64", (32, 25),
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    _v3("zstd_checksum", "codecs/zstd_checksum", (500, 7), "uint16", (128, 7),
        compressors=ZstdCodec(level=5, checksum=True)),
    _v3("uncompressed", "codecs/raw", (40, 50), "int16", (16, 16), compressors=None),
    _v3("transpose_3d", "codecs/transpose", (20, 30, 40), "float32", (8, 8, 16),
        filters=[TransposeCodec(order=(2, 0, 1))]),
    _v3("transpose_2d_nocomp", "codecs/transpose_raw", (33, 47), "int64", (10, 12),
        filters=[TransposeCodec(order=(1, 0))], compressors=None),
    _v3("big_endian_bytes", "codecs/big_endian", (100, 70), "int32", (30, 30), serializer=BytesCodec(endian="big")),
    _v3("big_endian_f8_nocomp", "codecs/big_endian_f8", (1000,), "float64", (300,),
        serializer=BytesCodec(endian="big"), compressors=None),
    # chunk key encodings
    _v3("key_default_dot", "keys/default_dot", (50, 60), "float32", (16, 16),
        chunk_key_encoding={"name": "default", "separator": "."}),
    _v3("key_v2_dot", "keys/v2_dot", (50, 60), "float32", (16, 16),
        chunk_key_encoding={"name": "v2", "separator": "."}),
    _v3("key_v2_slash", "keys/v2_slash", (50, 60), "float32", (16, 16),
        chunk_key_encoding={"name": "v2", "separator": "/"}),
    # sharding: shapes not divisible by shard nor chunk
    _v3("shard_partial", "sharding/partial", (100, 75), "float64", (8, 6), shards=(32, 24)),
    _v3("shard_missing", "sharding/missing", (100, 75), "int32", (8, 6), write="partial", shards=(32, 24),
        fill_value=7),
    _v3("shard_index_start_gzip", "sharding/index_start", (1000,), "int16", (256,),
        serializer=ShardingCodec(chunk_shape=(64,), codecs=[BytesCodec(), GzipCodec(level=4)], index_location="start"),
        compressors=None),
    _v3("shard_3d", "sharding/cube", (30, 20, 10), "uint16", (4, 4, 4), shards=(8, 8, 8)),
    _v3("shard_transpose", "sharding/transpose", (37, 29), "float32", (8, 8),
        serializer=ShardingCodec(chunk_shape=(8, 8), codecs=[TransposeCodec(order=(1, 0)), BytesCodec(), ZstdCodec()]),
        compressors=None, attrs={}),
    # fill values / missing chunks
    _v3("missing_chunks_fill", "fill/missing_nonzero", (90, 90), "int16", (20, 20), write="partial", fill_value=-7),
    _v3("missing_chunks_nan", "fill/missing_nan", (90, 90), "float64", (20, 20), write="partial", fill_value=np.nan),
    _v3("missing_chunks_complex", "fill/missing_complex", (40, 40), "complex64", (16, 16), write="partial",
        fill_value=1 + 2j),
    _v3("never_written_bool", "fill/never_written", (30, 31), "bool", (8, 8), write="none", fill_value=True),
    # dtypes over 1-D..4-D with partial edge chunks
    _v3("dtype_u1_1d", "dtypes/u1", (1001,), "uint8", (300,)),
    _v3("dtype_i1_1d", "dtypes/i1", (999,), "int8", (100,)),
    _v3("dtype_i2_2d", "dtypes/i2", (61, 83), "int16", (16, 20)),
    _v3("dtype_u2_2d", "dtypes/u2", (61, 83), "uint16", (16, 20)),
    _v3("dtype_i4_3d", "dtypes/i4", (17, 19, 23), "int32", (5, 6, 7)),
    _v3("dtype_u4_3d", "dtypes/u4", (17, 19, 23), "uint32", (5, 6, 7)),
    _v3("dtype_i8_4d", "dtypes/i8", (6, 7, 8, 9), "int64", (4, 3, 5, 2)),
    _v3("dtype_u8_4d", "dtypes/u8", (6, 7, 8, 9), "uint64", (4, 3, 5, 2)),
    _v3("dtype_f2_2d", "dtypes/f2", (70, 30), "float16", (32, 16)),
    _v3("dtype_f4_3d", "dtypes/f4", (21, 22, 23), "float32", (8, 8, 8)),
    _v3("dtype_f8_4d", "dtypes/f8", (5, 6, 7, 8), "float64", (2, 4, 3, 5)),
    _v3("dtype_bool_2d", "dtypes/bool", (33, 65), "bool", (10, 20)),
    _v3("dtype_c8_2d", "dtypes/c8", (45, 46), "complex64", (16, 16)),
    _v3("dtype_c16_1d", "dtypes/c16", (777,), "complex128", (128,)),
    # one array spanning several MiB for large sequential reads
    _v3("large_2d", "large/temperature", (1000, 1000), "float32", (256, 256), dimension_names=["y", "x"]),
    # single chunk covering more than the whole array
    _v3("chunk_bigger_than_array", "misc/one_chunk", (10, 10), "int32", (16, 16)),
    # deep nesting
    _v3("deep", "deep/sub/subsub/leaf", (25, 26), "uint32", (10, 10)),
    _v3("deep_mid", "deep/sub/mid", (100,), "int16", (33,), attrs={}),
    # must be skipped
    _v3("vlen_strings", "text/names", (20,), "str", (8,), skipped=True),
]

V3_EMPTY_GROUPS = ["empty_group", "text"]

BIG_STORES = {2: (V2_CASES, V2_EMPTY_GROUPS), 3: (V3_CASES, V3_EMPTY_GROUPS)}
ALL_CASES = V2_CASES + V3_CASES


def build_big_store(root: Path, zarr_format: int) -> list[ArrayCase]:
    cases, empty_groups = BIG_STORES[zarr_format]
    g = zarr.open_group(store=str(root), mode="w", zarr_format=zarr_format,
                        attributes={"title": f"zarrfs test store v{zarr_format}"})
    for eg in empty_groups:
        g.require_group(eg)
    for case in cases:
        write_case(root, case)
    return cases


def expected_tree(cases: list[ArrayCase], empty_groups: list[str]) -> dict[str, set[str]]:
    """Directory (relative to the mount root, "" = root) -> expected entries."""
    tree: dict[str, set[str]] = {"": set()}

    def add_dir(d: str):
        parts = d.split("/") if d else []
        for i in range(len(parts)):
            parent, child = "/".join(parts[:i]), parts[i]
            tree.setdefault(parent, set()).add(child)
            tree.setdefault("/".join(parts[: i + 1]), set())

    for eg in empty_groups:
        add_dir(eg)
    for c in cases:
        parent = c.path.rsplit("/", 1)[0] if "/" in c.path else ""
        add_dir(parent)
        if not c.skipped:
            tree[parent] |= {c.name, c.name + ".npy"}
    return tree


# --------------------------------------------------------------------------
# Small single-purpose stores
# --------------------------------------------------------------------------


def build_root_array_store(store: Path, zarr_format: int, shape=(300, 200), dtype="float32",
                           chunks=(64, 64)) -> None:
    """A store whose root node is an array (no group)."""
    zarr.create_array(store=str(store), data=make_data(shape, dtype, _seed(store.name)), chunks=chunks,
                      zarr_format=zarr_format, attributes={"role": "root array"}, overwrite=True)


def build_strings_store(store: Path) -> None:
    """Root group holding one variable-length string array and one numeric array."""
    zarr.open_group(store=str(store), mode="w", zarr_format=3)
    s = zarr.create_array(store=str(store), name="names", shape=(10,), dtype=str, chunks=(4,))
    s[...] = make_data((10,), "O", 1)
    zarr.create_array(store=str(store), name="values", data=make_data((100, 30), "int32", 2), chunks=(32, 8))


def build_simple_store(store: Path, zarr_format: int = 3, shape=(64 * 1024,), dtype="float64",
                       chunks=(4096,), **kwargs) -> str:
    """Root group with a single array ``data``; returns its path in the store.

    The default makes each chunk exactly 32 KiB (8 pages), so chunk boundaries
    are page aligned and "touches the chunk" is unambiguous for the kernel.
    """
    zarr.open_group(store=str(store), mode="w", zarr_format=zarr_format)
    zarr.create_array(store=str(store), name="data", data=make_data(shape, dtype, _seed(store.name, "data")),
                      chunks=chunks, zarr_format=zarr_format, **kwargs)
    return "data"


def chunk_file(store: Path, array_path: str, index: tuple[int, ...]) -> Path:
    """The storage key (file) of chunk/shard ``index`` of an array."""
    meta = metadata_of(store, array_path)
    base = Path(store, array_path)
    if meta.get("zarr_format") == 2:
        sep = meta.get("dimension_separator") or "."
        return base / sep.join(map(str, index))
    enc = meta["chunk_key_encoding"]
    sep = enc.get("configuration", {}).get("separator", "/" if enc["name"] == "default" else ".")
    if enc["name"] == "default":
        return base / sep.join(["c", *map(str, index)])
    return base / sep.join(map(str, index))


def count_chunk_files(array_dir: Path) -> int:
    n = 0
    for _, _, files in os.walk(array_dir):
        n += sum(1 for f in files if f not in ("zarr.json", ".zarray", ".zattrs"))
    return n
