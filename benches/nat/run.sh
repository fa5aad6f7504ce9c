#!/usr/bin/env bash
# NAT traversal benchmark, the three paths side by side in one run (ratios matter,
# absolute numbers drift): direct (exit and requester on the public bridge), punched
# (both behind port-restricted cone NATs), relayed (exit behind a symmetric NAT, TURN
# through coturn). Each path gets its own namespaces (provider/tests/common/natlab.rs);
# prints req/s (sequential 100-byte GETs on one connection) and MB/s (one large GET)
# and each against the direct path. Needs root (namespaces, iptables).
#   IPSX_BENCH_REQUESTS=300   requests per path
#   IPSX_BENCH_MIB=32         MiB downloaded per path
#   IPSX_BENCH_PROFILE=release  build optimised (slow first build; default: dev)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-tunnel.sh
PROFILE=()
if [ "${IPSX_BENCH_PROFILE:-dev}" = release ]; then PROFILE=(--release); fi
cargo test -q "${PROFILE[@]}" -p ipsx-provider --test it interop::nat::bench_paths \
  -- --ignored --nocapture --exact 2>&1 | grep -E '^(path|direct|punched|relayed) '
