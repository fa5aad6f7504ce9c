#!/usr/bin/env bash
# Rent-to-first-byte through the whole product on a chain that mines every 2 s:
# `ipsx up` with its anvil run as `anvil --block-time 2` (through IPSX_ANVIL), then for
# each city whose exit is not rented yet, one request through the gateway asking for
# it: the pool manager rents it (match, first contact: openChannel mined, first-window
# proof, tunnel up, exit verified) and the request gets its first byte through the new
# tunnel. Timed by curl from the request to the first byte of the response.
#   IPSX_BIN=target/release/ipsx bash benches/settlement/first-byte.sh
# IPSX_BIN defaults to the release binary (built if missing); BLOCK_TIME defaults to 2;
# IPSX_LOG sets the log level of ipsx up (warn); KEEP_LOG=FILE keeps its log there.
set -euo pipefail
cd "$(dirname "$0")/../.."
BLOCK_TIME=${BLOCK_TIME:-2}
WORK=$(mktemp -d /tmp/ipsx-bench-first-byte.XXXXXX)
. benches/market/up.sh
BIN=${IPSX_BIN:-target/release/ipsx}
if [ -z "${IPSX_BIN:-}" ]; then cargo build -q --release -p ipsx --bin ipsx; fi
REAL_ANVIL=${IPSX_ANVIL:-}
if [ -z "$REAL_ANVIL" ]; then
  REAL_ANVIL=contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
  [ -x "$REAL_ANVIL" ] || REAL_ANVIL=$(command -v anvil)
fi
REAL_ANVIL=$(readlink -f "$REAL_ANVIL")
printf '#!/bin/sh\nexec %s "$@" --block-time %s\n' "$REAL_ANVIL" "$BLOCK_TIME" > "$WORK/anvil"
chmod +x "$WORK/anvil"
IPSX_ANVIL="$WORK/anvil" IPSX_LOG=${IPSX_LOG:-warn} "$BIN" up --port 0 --state "$WORK/state.json" > "$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 1800); do grep -q "ipsx is up" "$WORK/up.log" && break; sleep 0.1; done
grep -q "ipsx is up" "$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }
read -r PROXY ADMIN ECHO < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["proxy"].split("@")[1], s["admin"], s["echo"])' "$WORK/state.json")
ALL="berlin munich new_york chicago paris lyon tokyo osaka"
LIVE=$(curl -s "$ADMIN/api/exits" | python3 -c 'import json,sys; print(" ".join(e["attrs"].get("city") or "" for e in json.load(sys.stdin)["exits"]))')
# rent_cities LABEL: one request for each city no exit served at start; prints the
# first-byte times (seconds) of those answered 200.
rent_cities() {
  local city code t
  for city in $ALL; do
    case " $LIVE " in *" ${city//_/ } "*) continue;; esac
    read -r code t < <(curl -s -m 60 -o "$WORK/body" -w '%{http_code} %{time_starttransfer}\n' -x "http://demo-city-$city:demo-token@$PROXY" "$ECHO")
    echo "$1 city=$city status=$code ${t}s" >&2
    [ "$code" = 200 ] && echo "$t"
  done
  return 0
}
samples=$(rent_cities "first contact")
# Funded channel: once the on-demand groups are released (idle_release, 5 min unused)
# their deals end and their channels go idle; the same cities again rent over those
# channels without a transaction. Bounded: at most 8 minutes of waiting.
funded=""
if [ "${FUNDED:-1}" = 1 ] && [ -n "$samples" ]; then
  for _ in $(seq 1 96); do
    n=$(curl -s "$ADMIN/api/exits" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["exits"]))')
    [ "$n" -le 4 ] && break
    sleep 5
  done
  sleep 3
  funded=$(rent_cities "funded channel")
fi
[ -n "${KEEP_LOG:-}" ] && cp "$WORK/up.log" "$KEEP_LOG"
python3 - "$BLOCK_TIME" "$BIN" "$samples" "$funded" <<'PY'
import statistics, sys
bt = float(sys.argv[1])
print(f"rent-to-first-byte through ipsx up ({sys.argv[2]}), anvil --block-time {sys.argv[1]}:")
for name, raw, target in (("first contact", sys.argv[3], bt * 1000 + 300), ("funded channel", sys.argv[4], 300)):
    s = sorted(float(x) for x in raw.split())
    if s:
        print(f"  {name}: median {statistics.median(s)*1000:.0f} ms, max {s[-1]*1000:.0f} ms over {len(s)} rentals; target <= {target:.0f} ms")
    else:
        print(f"  {name}: no rental served")
PY
