#!/usr/bin/env bash
# Build a sample store, mount it, read it with ordinary tools, unmount. Run by `make demo`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
BIN=${BIN:-target/release/zarrfs}
DEMO=${DEMO:-demo}
STORE=$DEMO/sample.zarr
MNT=$DEMO/mnt

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

mkdir -p "$DEMO" "$MNT"
if mountpoint -q "$MNT"; then fusermount3 -u "$MNT"; fi
trap 'mountpoint -q "$MNT" && fusermount3 -u "$MNT" || true' EXIT

step "python scripts/make_sample_store.py $DEMO"
rm -rf "$STORE"
"$PY" scripts/make_sample_store.py "$DEMO"

step "zarrfs info $STORE"
"$BIN" info "$STORE"

step "zarrfs mount $STORE $MNT"
"$BIN" mount "$STORE" "$MNT"

step "ls -l $MNT $MNT/grp"
ls -l "$MNT" "$MNT/grp"

step "python: np.load('$MNT/grp/temperature.npy', mmap_mode='r')"
"$PY" - "$MNT" "$STORE" <<'PYEOF'
import sys, numpy as np, zarr
mnt, store = sys.argv[1], sys.argv[2]
a = np.load(f"{mnt}/grp/temperature.npy", mmap_mode="r")
print("shape", a.shape, "dtype", a.dtype)
print("a[5, :5] =", a[5, :5])
m = np.memmap(f"{mnt}/grp/temperature", dtype=a.dtype, shape=a.shape, mode="r")
z = zarr.open_array(store, path="grp/temperature", mode="r")
print("identical to zarr-python:", np.array_equal(m, z[:]))
PYEOF

step "dd if=$MNT/grp/temperature bs=1M | sha256sum"
dd if="$MNT/grp/temperature" bs=1M status=none | sha256sum

step "hexdump -C -n 64 $MNT/grp/temperature.npy"
hexdump -C -n 64 "$MNT/grp/temperature.npy"

step "getfattr -d $MNT/grp/temperature"
getfattr -d "$MNT/grp/temperature"

step "getfattr --only-values -n user.zarrfs.stats $MNT   # live counters"
getfattr --only-values -n user.zarrfs.stats "$MNT"; echo

step "fusermount3 -u $MNT"
fusermount3 -u "$MNT"
echo "unmounted; demo done"
