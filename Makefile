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
test: install
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) nextest run --workspace --locked --no-fail-fast
	$(CARGO) test --workspace --locked --doc

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Side-by-side benchmarks against peer implementations (installs the peers).
bench:
	@for s in benches/*/run.sh; do echo "== $$s"; bash "$$s" || exit 1; done
