#!/usr/bin/env bash
# make test-wheel: install the built wheel into a fresh venv outside the build tree and run
# tests/wheel there, from a copy, with a PATH that has no cargo and no target/release: the only
# zarrfs to be found is the wheel's, as on a user's machine without a Rust toolchain.
#   scripts/test_wheel.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
wheels=(target/wheels/zarrfs-"$version"-*_"$(uname -m)".whl)
if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "expected one wheel of zarrfs $version for $(uname -m) in target/wheels (make wheel): ${wheels[*]}" >&2
  exit 1
fi
work=$(mktemp -d /tmp/zarrfs-wheel-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
# The wheel, and the test's own needs at the versions pinned for the project.
"$work/venv/bin/pip" install -q "${wheels[0]}" \
  $(grep -E '^(numpy|zarr|numcodecs|crc32c|pytest)==' requirements.txt)
cp -r tests/wheel "$work/tests"
cd "$work"
env -i HOME="$HOME" LANG=C.UTF-8 PATH="$work/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  ZARRFS_EXPECTED_VERSION="$version" \
  "$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests
