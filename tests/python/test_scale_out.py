"""scripts/scale_out.py on a tiny store: four nodes (four mounts, four daemons) read one store
served over loopback HTTP, four worker processes each sum their own row slice through their
node's mount, and the sums match numpy on the original data. The script runs in a subprocess
with TMPDIR under this test's tmp_path, so its mounts and daemons fall under the session's
leftover checks; it stops its own servers, cluster and mounts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kit import REPO, clean_env, proc_mounts, zarrfs_pids

SCRIPT = REPO / "scripts" / "scale_out.py"


def run_demo(zarrfs_bin, tmp_path, *args) -> dict:
    env = clean_env(ZARRFS_BIN=str(zarrfs_bin), TMPDIR=str(tmp_path))
    with open(tmp_path / "stderr.txt", "w+") as err:
        p = subprocess.run([sys.executable, str(SCRIPT), "--small", "--json", *args], stdout=subprocess.PIPE,
                           stderr=err, stdin=subprocess.DEVNULL, env=env, timeout=60, text=True)
        err.seek(0)
        assert p.returncode == 0, f"exit {p.returncode}: {err.read()[-3000:]}"
    return json.loads(p.stdout)


@pytest.mark.parametrize("executor", ["dask", "processes"])
def test_nodes_share_one_store(zarrfs_bin, tmp_path, executor):
    r = run_demo(zarrfs_bin, tmp_path, "--executor", executor, *(["--no-baseline"] if executor != "dask" else []))
    nodes = r["nodes"]
    assert len(nodes) == 4
    assert r["all_match"], nodes
    assert r["total"] == pytest.approx(r["numpy_total"], rel=1e-12)
    # Contiguous slices covering every row, aligned to chunk rows, one per worker process.
    assert [n["rows"] for n in nodes] == [[0, 128], [128, 256], [256, 384], [384, 512]]
    assert all(n["rows"][0] % r["chunks"][0] == 0 for n in nodes)
    assert len({n["worker_pid"] for n in nodes}) == 4, "each slice ran in its own process"
    assert all(n["chunks_decoded"] > 0 for n in nodes), "every node's daemon decoded its own chunks"
    # Every chunk came from the one server; each node fetched at least its own.
    assert r["chunk_gets"] >= r["n_chunks"]
    if executor == "dask":
        assert r["baseline_match"]
    base = os.path.realpath(tmp_path)
    assert not [m for m in proc_mounts() if m["mountpoint"].startswith(base + "/")], "mounts left behind"
    assert not zarrfs_pids(base), "daemons left behind"
