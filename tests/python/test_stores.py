"""Sanity checks of the store builders themselves (no zarrfs needed).

If one of these fails, the fault is in stores.py / zarr-python, not in zarrfs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import stores
from kit import REPO


@pytest.mark.parametrize("case", [c for c in stores.ALL_CASES if not c.skipped], ids=lambda c: c.id)
def test_case_round_trips_through_zarr(big_stores, case):
    root = big_stores[case.zarr_format]
    exp = stores.expected_array(root, case.path)
    assert exp.shape == case.shape
    assert exp.dtype == case.native_dtype
    assert exp.flags.c_contiguous
    data = stores.make_data(case.shape, case.dtype, stores._seed(case.id))
    if case.write == "full":
        assert exp.tobytes() == np.ascontiguousarray(data).astype(case.native_dtype).tobytes()
    meta = stores.metadata_of(root, case.path)
    assert meta["zarr_format"] == case.zarr_format
    if case.attributes:
        assert stores.attributes_of(root, case.path) == case.attributes


def test_builders_wrote_what_they_claim(big_stores):
    v2, v3 = big_stores[2], big_stores[3]
    assert stores.metadata_of(v2, "layout/order_f")["order"] == "F"
    assert stores.metadata_of(v2, "layout/nested_keys")["dimension_separator"] == "/"
    assert (v2 / "layout/nested_keys/0/0/0").is_file()
    assert stores.metadata_of(v2, "endian/be_i4")["dtype"] == ">i4"
    assert stores.metadata_of(v2, "endian/be_f8")["dtype"] == ">f8"
    assert stores.metadata_of(v2, "compressors/blosc_lz4")["compressor"]["cname"] == "lz4"
    assert stores.metadata_of(v2, "compressors/none")["compressor"] is None
    assert stores.metadata_of(v2, "fill/missing_nan")["fill_value"] == "NaN"
    assert stores.metadata_of(v2, "text/names")["dtype"] == "|O"
    codecs = stores.metadata_of(v3, "codecs/gzip_crc32c")["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "gzip", "crc32c"]
    assert stores.metadata_of(v3, "codecs/transpose")["codecs"][0]["name"] == "transpose"
    assert stores.metadata_of(v3, "codecs/big_endian")["codecs"][0]["configuration"]["endian"] == "big"
    assert stores.metadata_of(v3, "sharding/partial")["codecs"][0]["name"] == "sharding_indexed"
    assert stores.metadata_of(v3, "sharding/index_start")["codecs"][0]["configuration"]["index_location"] == "start"
    assert stores.metadata_of(v3, "text/names")["data_type"] == "string"
    assert (v3 / "keys/default_dot/c.0.0").is_file()
    assert (v3 / "keys/v2_dot/0.0").is_file()
    assert (v3 / "keys/v2_slash/0/0").is_file()
    # missing chunks really are missing
    for store, path, grid in [(v2, "fill/missing_nonzero", 25), (v2, "fill/never_written", 16),
                              (v3, "fill/missing_nan", 25), (v3, "sharding/missing", 16)]:
        n = stores.count_chunk_files(store / path)
        assert n < grid, (path, n)
    # the big store is a proper hierarchy: root group -> group -> subgroup -> array
    for store in (v2, v3):
        for grp in ("deep", "deep/sub", "deep/sub/subsub", "empty_group"):
            assert (store / grp / ("zarr.json" if store == v3 else ".zgroup")).is_file(), (store, grp)


def test_total_data_is_small():
    assert sum(c.nbytes for c in stores.ALL_CASES if not c.skipped) < 20 * 2**20


def test_chunk_file_helper(tmp_path):
    store = tmp_path / "s.zarr"
    stores.build_simple_store(store, 2, shape=(100,), dtype="i4", chunks=(10,))
    assert stores.chunk_file(store, "data", (3,)).is_file()
    store3 = tmp_path / "s3.zarr"
    stores.build_simple_store(store3, 3, shape=(100,), dtype="i4", chunks=(10,))
    assert stores.chunk_file(store3, "data", (3,)) == store3 / "data/c/3"
    assert stores.chunk_file(store3, "data", (3,)).is_file()


def test_make_sample_store_script(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_store.py"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import zarr

    g = zarr.open_group(str(out / "sample.zarr"), mode="r")
    t = g["grp/temperature"]
    assert t.shape == (2000, 3000) and t.dtype == np.float32 and t.chunks == (500, 500)
    assert json.loads((out / "sample.zarr/grp/temperature/zarr.json").read_text())["codecs"][1]["name"] == "zstd"
    assert g["grp/subgroup/counts"].dtype == np.int32
    v2 = zarr.open_group(str(out / "legacy_v2.zarr"), mode="r")
    assert v2.metadata.zarr_format == 2 and v2["pressure"].shape == (500, 400)
    assert os.path.isfile(out / "legacy_v2.zarr/pressure/.zarray")
