"""Seeded benchmark data for scripts/bench.py: one float32 2-D array written three ways.

  DATA/v3.zarr/field      Zarr v3, zarr-python's default codecs (bytes + zstd level 0)
  DATA/v2.zarr/field      Zarr v2, zarr-python 2's default compressor: Blosc lz4, clevel 5, shuffle
  DATA/raw.f32            the same elements, uncompressed, C order, native endian
  DATA/params.json        the parameters; data are reused when they match

and, for the scan over HTTP, a smaller field (HTTP_PARAMS, the first rows' recipe at 8192x8192)
written once more by ensure_http_data():

  HTTPDATA/v3.zarr        a group with consolidated metadata (a plain HTTP server cannot be
                          listed), field as above: v3, bytes + zstd level 0

The field is smooth (a latitude profile plus waves) with Gaussian noise, quantised to 1/256 so
that zstd compresses it about 2x, as real measured fields do. Written in slabs of one chunk row,
all three copies in the same pass, so generation stays within seconds per GiB.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr

PARAMS = {
    "version": 1,
    "shape": [16384, 16384],
    "chunks": [1024, 1024],
    "dtype": "<f4",
    "seed": 20261128,
    "noise_sigma": 1.0,
    "quantum": 1 / 256,
    "zarr": zarr.__version__,
    "numcodecs": numcodecs.__version__,
}

ARRAY = "field"

# 256 MiB: 8x8 chunks of 4 MiB, for the scan over loopback HTTP.
HTTP_PARAMS = {**PARAMS, "shape": [8192, 8192], "layout": "v3 zstd only, consolidated"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def slab(params: dict, i: int) -> np.ndarray:
    """Rows [i*chunk_rows, (i+1)*chunk_rows) of the field; each slab has its own seed."""
    rows, cols = params["shape"]
    cr = params["chunks"][0]
    r0, r1 = i * cr, min(rows, (i + 1) * cr)
    y = (np.arange(r0, r1, dtype=np.float32) / np.float32(rows) - np.float32(0.5)) * np.float32(np.pi)
    x = np.arange(cols, dtype=np.float32) / np.float32(cols) * np.float32(8 * np.pi)
    y, x = y[:, None], x[None, :]
    field = np.float32(288.0) - np.float32(40.0) * np.sin(y) ** 2 + np.float32(5.0) * np.cos(x) * np.cos(3 * y)
    rng = np.random.default_rng([params["seed"], i])
    field += rng.standard_normal((r1 - r0, cols), dtype=np.float32) * np.float32(params["noise_sigma"])
    q = np.float32(params["quantum"])
    return (np.round(field / q) * q).astype(params["dtype"])


def ensure_data(data_dir: Path, params: dict = PARAMS) -> dict:
    """Generate the data under data_dir unless what is there was made with the same params."""
    data_dir = Path(data_dir)
    pfile = data_dir / "params.json"
    if pfile.exists():
        try:
            if json.loads(pfile.read_text()) == json.loads(json.dumps(params)) and complete(data_dir, params):
                log(f"reusing data in {data_dir}")
                return info(data_dir, params)
        except ValueError:
            pass
    log(f"generating {np.prod(params['shape']) * 4 / 2**30:.2f} GiB of data in {data_dir} ...")
    t0 = time.perf_counter()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    shape, chunks, dtype = tuple(params["shape"]), tuple(params["chunks"]), params["dtype"]
    z3 = zarr.create_array(store=str(data_dir / "v3.zarr"), name=ARRAY, shape=shape, chunks=chunks,
                           dtype=dtype, zarr_format=3)  # defaults: bytes + zstd(level=0)
    z2 = zarr.create_array(store=str(data_dir / "v2.zarr"), name=ARRAY, shape=shape, chunks=chunks,
                           dtype=dtype, zarr_format=2,
                           compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE))
    n_slabs = -(-shape[0] // chunks[0])
    with open(data_dir / "raw.f32", "wb") as raw:
        for i in range(n_slabs):
            s = slab(params, i)
            r0 = i * chunks[0]
            z3[r0:r0 + s.shape[0], :] = s
            z2[r0:r0 + s.shape[0], :] = s
            raw.write(s.tobytes())
            if i % 4 == 3:
                log(f"  slab {i + 1}/{n_slabs} ({time.perf_counter() - t0:.0f} s)")
    # Written last: its presence means the data are complete.
    pfile.write_text(json.dumps(params, indent=1))
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return info(data_dir, params)


def complete(data_dir: Path, params: dict) -> bool:
    """Every file is there: the raw copy at full size, both metadata documents, every chunk."""
    n = int(np.prod([-(-s // c) for s, c in zip(params["shape"], params["chunks"])]))
    raw = data_dir / "raw.f32"
    nbytes = int(np.prod(params["shape"])) * np.dtype(params["dtype"]).itemsize
    v3, v2 = data_dir / "v3.zarr" / ARRAY, data_dir / "v2.zarr" / ARRAY
    return (raw.exists() and raw.stat().st_size == nbytes
            and (v3 / "zarr.json").exists() and (v2 / ".zarray").exists()
            and sum(1 for p in (v3 / "c").rglob("*") if p.is_file()) == n
            and sum(1 for p in v2.iterdir() if not p.name.startswith(".")) == n)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def info(data_dir: Path, params: dict) -> dict:
    shape = params["shape"]
    nbytes = int(np.prod(shape)) * np.dtype(params["dtype"]).itemsize
    grid = [-(-s // c) for s, c in zip(shape, params["chunks"])]
    return {
        "dir": str(data_dir),
        "array": ARRAY,
        "shape": shape,
        "chunks": params["chunks"],
        "dtype": params["dtype"],
        "nbytes": nbytes,
        "n_chunks": int(np.prod(grid)),
        "v3": str(data_dir / "v3.zarr"),
        "v2": str(data_dir / "v2.zarr"),
        "raw": str(data_dir / "raw.f32"),
        "v3_stored_bytes": dir_bytes(data_dir / "v3.zarr"),
        "v2_stored_bytes": dir_bytes(data_dir / "v2.zarr"),
    }


def ensure_http_data(data_dir: Path, params: dict = HTTP_PARAMS) -> dict:
    """The store served over HTTP: v3 only, consolidated; reused while params match."""
    import warnings

    data_dir = Path(data_dir)
    pfile = data_dir / "params.json"
    store = data_dir / "v3.zarr"
    n = int(np.prod([-(-s // c) for s, c in zip(params["shape"], params["chunks"])]))
    if pfile.exists():
        try:
            if (json.loads(pfile.read_text()) == json.loads(json.dumps(params))
                    and sum(1 for p in (store / ARRAY / "c").rglob("*") if p.is_file()) == n):
                log(f"reusing data in {data_dir}")
                return http_info(data_dir, params)
        except ValueError:
            pass
    log(f"generating {np.prod(params['shape']) * 4 / 2**20:.0f} MiB of data in {data_dir} ...")
    t0 = time.perf_counter()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    shape, chunks = tuple(params["shape"]), tuple(params["chunks"])
    z = zarr.create_array(store=str(store), name=ARRAY, shape=shape, chunks=chunks, dtype=params["dtype"],
                          zarr_format=3)
    for i in range(-(-shape[0] // chunks[0])):
        s = slab(params, i)
        z[i * chunks[0]:i * chunks[0] + s.shape[0], :] = s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the Zarr v3 spec"
        zarr.consolidate_metadata(str(store))
    pfile.write_text(json.dumps(params, indent=1))
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return http_info(data_dir, params)


def http_info(data_dir: Path, params: dict) -> dict:
    shape = params["shape"]
    grid = [-(-s // c) for s, c in zip(shape, params["chunks"])]
    return {
        "dir": str(data_dir),
        "store": "v3.zarr",
        "array": ARRAY,
        "shape": shape,
        "chunks": params["chunks"],
        "dtype": params["dtype"],
        "nbytes": int(np.prod(shape)) * np.dtype(params["dtype"]).itemsize,
        "n_chunks": int(np.prod(grid)),
        "stored_bytes": dir_bytes(Path(data_dir) / "v3.zarr"),
    }
