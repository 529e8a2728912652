#!/usr/bin/env python3
"""Strip the debug information from the executables of built wheels, in place.

The release profile keeps line tables (`debug = "line-tables-only"`) for the backtraces of a
locally built binary, which makes the wheel's binary about five times larger. maturin's own
`--strip` would change the flags cargo builds with and so recompile every dependency; stripping
the finished wheel costs seconds instead. The symbol table stays, so backtraces still name
functions. RECORD is rewritten with the new hashes and sizes, as the wheel format requires.

    strip_wheel.py [--strip PROGRAM] WHEEL...
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import subprocess
import tempfile
import zipfile
from pathlib import Path


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def stripped(data: bytes, strip: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "binary"
        path.write_bytes(data)
        subprocess.run([strip, "--strip-debug", str(path)], check=True)
        return path.read_bytes()


def strip_wheel(wheel: Path, strip: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        contents = {i.filename: z.read(i) for i in infos}
    changed = {name: stripped(data, strip) for name, data in contents.items()
               if ".data/scripts/" in name and data[:4] == b"\x7fELF"}
    if not changed:
        return
    contents.update(changed)
    record = next(name for name in contents if name.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(contents[record].decode())))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        if row and row[0] in changed:
            row = [row[0], record_hash(changed[row[0]]), str(len(changed[row[0]]))]
        writer.writerow(row)
    contents[record] = out.getvalue().encode()
    partial = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(partial, "w") as z:
        for info in infos:  # same names, order, dates, modes and compression as maturin wrote
            z.writestr(info, contents[info.filename])
    partial.replace(wheel)
    for name, data in changed.items():
        print(f"{wheel.name}: {name}: stripped to {len(data) >> 20} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip", default="strip", help="the strip program (a cross strip for other targets)")
    parser.add_argument("wheels", nargs="+", type=Path)
    args = parser.parse_args()
    for wheel in args.wheels:
        strip_wheel(wheel, args.strip)


if __name__ == "__main__":
    main()
