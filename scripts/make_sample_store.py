#!/usr/bin/env python3
"""Write the small demo stores used by ``make demo``.

Usage: make_sample_store.py OUT_DIR

Creates (a Zarr hierarchy holds a single format, so v2 gets its own store):

  OUT_DIR/sample.zarr        Zarr v3, root group
      grp/                   group
          temperature        float32 (2000, 3000), chunks (500, 500), zstd
          subgroup/
              counts         int32 (1000, 1000), chunks (250, 250), zstd
  OUT_DIR/legacy_v2.zarr     Zarr v2, root group
      pressure               float64 (500, 400), chunks (128, 128), blosc lz4

Mount one with e.g. ``zarrfs mount OUT_DIR/sample.zarr /mnt/zarr``, then
``/mnt/zarr/grp/temperature`` is a 24 MB flat float32 file and
``/mnt/zarr/grp/temperature.npy`` loads with ``np.load(..., mmap_mode="r")``.
Data is deterministic (seeded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import ZstdCodec


def _temperature(rng: np.random.Generator, shape=(2000, 3000)) -> np.ndarray:
    y = np.linspace(-np.pi / 2, np.pi / 2, shape[0], dtype=np.float32)[:, None]
    x = np.linspace(0, 4 * np.pi, shape[1], dtype=np.float32)[None, :]
    field = 288.0 - 40.0 * np.sin(y) ** 2 + 5.0 * np.cos(x) * np.cos(y)
    return (field + rng.normal(0.0, 0.5, size=shape)).astype(np.float32)


def make_sample_store(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240601)

    v3 = out_dir / "sample.zarr"
    root = zarr.open_group(store=str(v3), mode="w", zarr_format=3,
                           attributes={"title": "zarrfs demo store", "zarr_format": 3})
    grp = root.require_group("grp")
    grp.attrs["description"] = "demo group"
    zarr.create_array(
        store=str(v3), name="grp/temperature", data=_temperature(rng), chunks=(500, 500),
        compressors=ZstdCodec(level=3), dimension_names=["lat", "lon"],
        attributes={"units": "K", "long_name": "surface temperature"},
    )
    zarr.create_array(
        store=str(v3), name="grp/subgroup/counts",
        data=rng.poisson(7.0, size=(1000, 1000)).astype(np.int32), chunks=(250, 250),
        compressors=ZstdCodec(level=3), attributes={"units": "1"},
    )

    v2 = out_dir / "legacy_v2.zarr"
    zarr.open_group(store=str(v2), mode="w", zarr_format=2, attributes={"title": "zarrfs demo v2 store"})
    zarr.create_array(
        store=str(v2), name="pressure", data=(1013.25 + rng.normal(0, 10, size=(500, 400))).astype("<f8"),
        chunks=(128, 128), zarr_format=2,
        compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
        attributes={"units": "hPa"},
    )
    return v3, v2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="directory to create the demo stores in")
    args = p.parse_args(argv)
    v3, v2 = make_sample_store(args.out_dir)
    print(f"wrote {v3} (zarr v3: grp/temperature, grp/subgroup/counts)")
    print(f"wrote {v2} (zarr v2: pressure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
