# zarrfs: `make demo` builds and shows the main job; `make test` runs every test.
# Both install what they need (Debian packages via apt, Python packages into .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := target/release/zarrfs
PREFIX ?= /usr/local
# One cargo profile for everything (build, tests, benchmarks): release.
CARGO_FLAGS := --release --locked

.PHONY: all build lint test test-rust test-python test-wheel wheel wheel-aarch64 demo bench install uninstall system-deps rust-tools venv clean

all: build

# System packages: fuse3 (fusermount3, mount.fuse3), attr (getfattr), bsdextrautils (hexdump),
# openssl (the HTTPS test's certificates).
system-deps:
	@missing=""; \
	command -v fusermount3 >/dev/null || missing="$$missing fuse3"; \
	command -v getfattr >/dev/null || missing="$$missing attr"; \
	command -v hexdump >/dev/null || missing="$$missing bsdextrautils"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
	@test -e /dev/fuse || { echo "/dev/fuse is missing: load the fuse module (modprobe fuse)"; exit 1; }

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# rustfmt and clippy come with rustup's default profile; a minimal toolchain lacks them.
rust-tools:
	@cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

build: system-deps
	cargo build $(CARGO_FLAGS)

# Style is enforced: unformatted code or any clippy warning fails `make test` (and so CI).
# Same profile as the build; clippy only type-checks the dependencies (no code generation).
lint: system-deps rust-tools
	cargo fmt --check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings

test: lint test-rust test-python test-wheel

test-rust: build
	cargo test $(CARGO_FLAGS)

test-python: build venv
	$(VENV)/bin/pytest -q tests/python

# The Python wheel (the binary + python/zarrfs), into target/wheels. maturin runs cargo with the
# same profile and flags as `build`, so nothing but zarrfs itself is ever compiled again; the
# binary is stripped in the finished wheel (maturin's --strip would rebuild every dependency).
# manylinux_2_34 is the oldest tag this binary's glibc symbols allow (built on glibc 2.36).
WHEEL_FLAGS := --release --locked --compatibility manylinux_2_34 --out target/wheels
wheel: system-deps venv
	rm -f target/wheels/zarrfs-*_$(shell uname -m).whl
	$(VENV)/bin/maturin build $(WHEEL_FLAGS)
	$(PY) scripts/strip_wheel.py target/wheels/zarrfs-*_$(shell uname -m).whl

# Cross build for aarch64. Needs what this Makefile does not install: `rustup target add
# aarch64-unknown-linux-gnu` and Debian's gcc-aarch64-linux-gnu (linker, C compiler, strip).
wheel-aarch64: venv
	rm -f target/wheels/zarrfs-*_aarch64.whl
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	  $(VENV)/bin/maturin build $(WHEEL_FLAGS) --target aarch64-unknown-linux-gnu
	$(PY) scripts/strip_wheel.py --strip aarch64-linux-gnu-strip target/wheels/zarrfs-*_aarch64.whl

# The wheel installed into a fresh venv outside the build tree, without cargo on PATH.
test-wheel: wheel
	scripts/test_wheel.sh $(PYTHON)

demo: build venv
	PY=$(PY) BIN=$(BIN) scripts/demo.sh

bench: build venv
	$(PY) scripts/bench.py

install: build
	install -D -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/zarrfs

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/zarrfs

clean:
	cargo clean
	rm -rf $(VENV) demo bench-out
