#!/usr/bin/env bash
# Settlement benchmark (issue [settlement]): anvil with --block-time 2, 4 providers,
# 100 deals of 10 minutes (time compressed), the protocol before channel reuse (the
# transactions of bcaaa06, main before issue 12: a channel and a closing claim per deal,
# replayed with today's client against the same, unchanged contracts; bcaaa06 itself is
# not built) beside this one (reused channels, top-ups sized by the market's
# top_up_amount, lazy claims), printed side by side: gas per IP-hour, gas per
# transaction kind, transactions per deal per side, and the payment part of
# rent-to-first-byte for a funded channel and for first contact (not the exchange and
# tunnel hops). Bounded: about three minutes (most of it waiting for 2-second blocks).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${IPSX_ANVIL:-}" ] && [ ! -x contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil ] && ! command -v anvil >/dev/null; then
    echo "anvil not found: run scripts/install-chain.sh (or set IPSX_ANVIL)" >&2
    exit 1
fi
exec timeout 900 cargo run --quiet -p ipsx-chain --example settlement
