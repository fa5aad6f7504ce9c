#!/usr/bin/env bash
# VPN benchmark (issue 13), in one run: UDP echo datagrams/s and MB/s (64 B and
# 1,200 B payloads, 32 in flight) through one rented ipsx exit, first with
# wireguard-go as the client (the wg-quick file `ipsx rent` exports), then through
# `ipsx gateway`'s SOCKS5 UDP ASSOCIATE with that same file as its WireGuard exit,
# against a plain wireguard-go pair in two namespaces; then the ratios to the pair.
# Everything runs in namespaces the benchmark creates (tests/e2e/vpn_rent.rs); the
# chain is anvil, the exchange and the provider agent are real. The load and the echo
# are the same small Python programs on every path, which cap the absolute figures:
# compare the ratios. The output of the last run is in benches/vpn/last-run.txt.
# Needs root (namespaces) and wireguard-go/wg (scripts/install-tunnel.sh).
#   IPSX_BENCH_SECS=5           seconds per measurement
#   IPSX_BENCH_PROFILE=release  build optimised (slow first build; default: dev)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-tunnel.sh
PROFILE=()
if [ "${IPSX_BENCH_PROFILE:-dev}" = release ]; then PROFILE=(--release); fi
cargo test -q "${PROFILE[@]}" -p ipsx --test e2e vpn_rent::bench_udp_echo_rented_exit_vs_wireguard_go_pair \
  -- --ignored --nocapture --exact 2>&1 | grep -E '^(path|wireguard-go|rented|socks5-udp|ratio) '
