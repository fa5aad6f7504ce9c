#!/usr/bin/env bash
# VPN benchmark (issue 13), in one run: UDP echo datagrams/s and MB/s through a rented
# ipsx exit with wireguard-go as the client (the wg-quick file `ipsx rent` exports),
# against a plain wireguard-go pair in two namespaces. Everything runs in namespaces
# the benchmark creates (tests/e2e/vpn_rent.rs); the chain is anvil, the exchange and
# the provider agent are real. The load and the echo are the same small Python
# programs on both paths, which cap the absolute figures: compare the ratio.
# A row for SOCKS5 UDP ASSOCIATE through the gateway is reserved (printed as "-").
# Needs root (namespaces) and wireguard-go/wg (scripts/install-tunnel.sh).
#   IPSX_BENCH_SECS=5           seconds per measurement
#   IPSX_BENCH_PROFILE=release  build optimised (slow first build; default: dev)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-tunnel.sh
PROFILE=()
if [ "${IPSX_BENCH_PROFILE:-dev}" = release ]; then PROFILE=(--release); fi
cargo test -q "${PROFILE[@]}" -p ipsx --test e2e vpn_rent::bench_udp_echo_rented_exit_vs_wireguard_go_pair \
  -- --ignored --nocapture --exact 2>&1 | grep -E '^(path|wireguard-go|rented|socks5|ratio) '
