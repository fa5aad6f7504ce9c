#!/usr/bin/env bash
# Rent-to-first-byte: from a request whose targeting no live exit matches to the first
# byte through the freshly rented WireGuard tunnel, on the local system (`ipsx up`,
# anvil mining instantly). Also req/s through a rented exit vs straight to the origin.
#
#   bash benches/market/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-5}
WORK=$(mktemp -d /tmp/ipsx-bench-market.XXXXXX)
. benches/market/up.sh
cargo build -q --release -p ipsx-benches --bin ipsx-loadgen
start_up warn
grep -E '^\[7/7\]' "$WORK/up.log" >&2

read -r PROXY ADMIN ECHO < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["proxy"].split("@")[1], s["admin"], s["echo"])' "$WORK/state.json")
# Cities whose exit is not rented yet (the demand groups rented one city per country).
ALL="berlin munich new_york chicago paris lyon tokyo osaka"
LIVE=$(curl -s "$ADMIN/api/exits" | python3 -c 'import json,sys; print(" ".join(e["attrs"].get("city") or "" for e in json.load(sys.stdin)["exits"]))')
samples=()
for city in $ALL; do
  case " $LIVE " in *" ${city//_/ } "*) continue;; esac
  read -r code t < <(curl -s -o "$WORK/body" -w '%{http_code} %{time_starttransfer}\n' -x "http://demo-city-$city:demo-token@$PROXY" "$ECHO")
  echo "rent-to-first-byte city=$city status=$code ${t}s exit=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ip"])' "$WORK/body" 2>/dev/null)" >&2
  [ "$code" = 200 ] || { echo "rental for $city did not serve: $(cat "$WORK/body")" >&2; exit 1; }
  samples+=("$t")
done
warm=$(curl -s -o /dev/null -w '%{time_starttransfer}' -x "http://demo-country-de:demo-token@$PROXY" "$ECHO")
ORIGIN=${ECHO#http://}; ORIGIN=${ORIGIN%%/*}
direct=$(target/release/ipsx-loadgen --mode direct --target "$ORIGIN" --connections 16 --duration "$DURATION")
rented=$(target/release/ipsx-loadgen --mode http --proxy "$PROXY" --target "$ORIGIN" --connections 16 --duration "$DURATION" --user demo-country-de --pass demo-token)
python3 - "$warm" "$direct" "$rented" "${samples[@]}" <<'PY'
import json, statistics, sys
warm = float(sys.argv[1]); direct = json.loads(sys.argv[2]); rented = json.loads(sys.argv[3])
s = sorted(float(x) for x in sys.argv[4:])
print()
if s:
    print(f"rent-to-first-byte: median {statistics.median(s)*1000:.0f} ms over {len(s)} rentals (min {s[0]*1000:.0f}, max {s[-1]*1000:.0f}); target <= 300 ms")
print(f"first byte through an exit already rented: {warm*1000:.1f} ms")
print(f"req/s straight to the origin:        {direct['rps']:10.0f}  p50/p99 {direct['p50_us']}/{direct['p99_us']} us")
print(f"req/s through one rented WG exit:    {rented['rps']:10.0f}  p50/p99 {rented['p50_us']}/{rented['p99_us']} us  ({rented['rps']/direct['rps']:.2f}x of direct, errors {rented['errors']})")
PY
