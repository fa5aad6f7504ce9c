# ipsx: the two commands of the quick start are `make up` and `make test`.
# Every install step lives in scripts/install-*.sh (idempotent), run by both targets.

SHELL := /bin/bash
CARGO ?= cargo
# CI builds a fresh clone once: incremental compilation only costs time there.
ifeq ($(CI),true)
export CARGO_INCREMENTAL := 0
endif

.PHONY: up test install lint fmt bench clean

install:
	@for s in scripts/install-*.sh; do echo "== $$s"; bash "$$s" || exit 1; done

## Bring the whole local system up and print the proxy URL (Ctrl-C stops it).
up: install
	$(CARGO) build --release --bin ipsx
	./target/release/ipsx up

## Run every check and test: format, lints, unit, property and end-to-end tests.
# Lints ride on the test build: cargo runs our own crates through clippy-driver (what
# `cargo clippy` does, keeping code generation), with the same lints and `-D warnings`.
# The dependencies are then compiled once for both, instead of once for the tests and
# again in check mode for clippy, which used to cost about four minutes.
# The test build also links with mold (installed by scripts/install-base.sh): about thirty
# test binaries of ~100 MB each are linked, which GNU ld does several times slower. No
# debug info for the test build: panics still name file and line.
# One build for everything: the test build activates the dev-dependencies' features
# (tokio, rand, ...), so a separate `cargo build --bins` first compiled about sixty
# dependencies (tokio, hyper, alloy) twice. nextest builds every binary the tests run,
# and every bin target's own test harness, so each bin is still compiled and linted.
LINT_ENV = RUSTC_WORKSPACE_WRAPPER="$$(command -v clippy-driver || echo clippy-driver-not-installed)" \
	CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__ \
	RUSTFLAGS="-C link-arg=-fuse-ld=mold" CARGO_PROFILE_DEV_DEBUG=false
test: install
	$(CARGO) fmt --all --check
	$(LINT_ENV) $(CARGO) nextest run --workspace --locked --no-fail-fast
	$(LINT_ENV) $(CARGO) test --workspace --locked --bench '*' --no-run
	$(LINT_ENV) $(CARGO) test --workspace --locked --doc

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Side-by-side benchmarks against peer implementations (installs the peers).
bench:
	@for s in benches/*/run.sh; do echo "== $$s"; bash "$$s" || exit 1; done
