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
# The tests mostly wait on the network, the chain and timers, so clippy runs at the
# lowest CPU priority while they run: the test binaries are built first and nextest
# reuses that build (no cargo lock held), and the lint result is printed afterwards.
test: install
	$(CARGO) fmt --all --check
	@mkdir -p target
	$(CARGO) nextest list --workspace --locked --list-type binaries-only \
		--message-format json > target/nextest-binaries.json
	$(CARGO) metadata --format-version 1 --all-features --no-deps --locked \
		> target/cargo-metadata.json
	@nice -n 19 $(CARGO) clippy --workspace --all-targets --locked --color never \
		-- -D warnings > target/clippy.log 2>&1 & lint=$$!; \
	$(CARGO) nextest run --binaries-metadata target/nextest-binaries.json \
		--cargo-metadata target/cargo-metadata.json --no-fail-fast; tests=$$?; \
	wait $$lint; lints=$$?; \
	echo "== clippy (exit $$lints)"; cat target/clippy.log; \
	[ $$tests = 0 ] && [ $$lints = 0 ]
	$(CARGO) test --workspace --locked --doc

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Side-by-side benchmarks against peer implementations (installs the peers).
bench:
	@for s in benches/*/run.sh; do echo "== $$s"; bash "$$s" || exit 1; done
