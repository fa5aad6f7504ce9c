#!/usr/bin/env bash
# SOCKS5 UDP ASSOCIATE benchmark, side by side in one run (ratios matter, absolute
# numbers drift with the machine):
#   direct      UDP echo straight to the target
#   local exit  through the gateway's SOCKS5 UDP relay, leaving from a local exit
#   tunnel exit through the relay and a WireGuard tunnel to our provider exit (the data
#               path of a rented exit; renting only adds the exchange's control plane)
# Each row: datagrams echoed per second and payload MB/s one way, with a window of
# datagrams in flight (each matched by sequence number; one unanswered after 1 s is
# lost), the datagrams lost, then the ratios to direct; below, the gateway's UDP drop
# counters and the kernel's socket drops. No root needed (all on loopback).
#   DURATION=5 SIZE=512 WINDOW=32 bash benches/socks-udp/run.sh
#   BUILD=debug bash benches/socks-udp/run.sh   # use debug binaries (figures are lower)
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-5}
SIZE=${SIZE:-512}
WINDOW=${WINDOW:-32}
BUILD=${BUILD:-release}
TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d /tmp/ipsx-bench-udp.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$BUILD" = release ]; then
  cargo build -q --release -p ipsx --bin ipsx
  cargo build -q --release -p ipsx-benches --bin ipsx-udpgen
else
  cargo build -q -p ipsx --bin ipsx
  cargo build -q -p ipsx-benches --bin ipsx-udpgen
fi
IPSX="$TARGET/$BUILD/ipsx"
GEN="$TARGET/$BUILD/ipsx-udpgen"

wait_line() { # file pattern
  for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timeout waiting for $2 in $1" >&2; cat "$1" >&2; return 1
}

# --- the echo target ---
"$GEN" echo --listen 127.0.0.1:0 > "$WORK/echo.log" 2>&1 &
PIDS+=($!)
wait_line "$WORK/echo.log" "udp echo listening"
ECHO=$(grep -o '127.0.0.1:[0-9]*' "$WORK/echo.log" | head -1)

# --- our provider exit, leaving from 127.0.0.3 ---
"$IPSX" keygen > "$WORK/exit.key"
"$IPSX" keygen > "$WORK/client.key"
key() { awk -v k="$1" '$1==k {print $3}' "$2"; }
cat > "$WORK/provider.toml" <<TOML
listen = "127.0.0.1:0"
private_key = "$(key private_key "$WORK/exit.key")"
exit_address = "127.0.0.3"
inner_address = "10.77.0.1"
protocols = ["any"]
allow_destinations = ["127.0.0.0/8"]

[[peers]]
public_key = "$(key public_key "$WORK/client.key")"
inner_ip = "10.77.0.2"
TOML
IPSX_LOG=warn "$IPSX" provider --config "$WORK/provider.toml" > "$WORK/provider.log" 2>&1 &
PIDS+=($!)
wait_line "$WORK/provider.log" "provider exit listening"
ENDPOINT=$(grep -o 'listening on [0-9.:]*' "$WORK/provider.log" | awk '{print $3}')
cat > "$WORK/exit.conf" <<CONF
[Interface]
PrivateKey = $(key private_key "$WORK/client.key")
Address = 10.77.0.2/32

[Peer]
PublicKey = $(key public_key "$WORK/exit.key")
Endpoint = $ENDPOINT
AllowedIPs = 0.0.0.0/0
PersistentKeepalive = 25
CONF

# --- the gateway: a local exit (de) and the tunnel exit (fr) ---
cat > "$WORK/gateway.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
allow_destinations = ["127.0.0.0/8"]
reload_poll = "0s"
udp_max_datagram = 65507

[[token]]
name = "bench"
secret = "bench-token"

[[exit]]
name = "local"
bind = "127.0.0.2"
country = "de"

[[exit]]
name = "tunnel"
wireguard = "$WORK/exit.conf"
country = "fr"
TOML
IPSX_LOG=warn "$IPSX" gateway --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_line "$WORK/gateway.log" "proxy listening"
GW=$(grep -o 'proxy listening on [0-9.:]*' "$WORK/gateway.log" | awk '{print $4}')
ADMIN=$(grep -o 'admin listening on http://[0-9.:]*' "$WORK/gateway.log" | sed 's|.*http://||')

load() { # label [socks args...]
  local label=$1; shift
  "$GEN" load --target "$ECHO" --size "$SIZE" --window "$WINDOW" --duration "$DURATION" --label "$label" "$@"
}
# The tunnel's first handshake: a short warm-up until the exit answers.
for _ in $(seq 1 50); do
  if "$GEN" load --target "$ECHO" --socks "$GW" --user bench-country-fr --pass bench-token \
      --duration 1 --window 1 --size 16 --label warm 2>/dev/null | grep -q '"received":[1-9]'; then
    break
  fi
done

load direct > "$WORK/direct.json"
load "socks5-udp local exit" --socks "$GW" --user bench-country-de --pass bench-token > "$WORK/local.json"
load "socks5-udp tunnel exit" --socks "$GW" --user bench-country-fr --pass bench-token > "$WORK/tunnel.json"

curl -s "http://$ADMIN/api/status" > "$WORK/status.json" || echo '{}' > "$WORK/status.json"
# The kernel's own drops (last column of /proc/net/udp), for sockets still open.
awk 'NR>1 && $NF>0 {print $2, $NF}' /proc/net/udp > "$WORK/kernel-drops.txt" || true

python3 - "$WORK" "$SIZE" "$WINDOW" "$DURATION" "$BUILD" <<'PY'
import json, sys
work, size, window, duration, build = sys.argv[1:]
rows = [json.load(open(f"{work}/{n}.json")) for n in ("direct", "local", "tunnel")]
print(f"UDP echo, {size}-byte payloads, {window} in flight, {duration}s each ({build} build)")
print(f"{'path':<26}{'datagrams/s':>14}{'MB/s':>10}{'lost':>8}{'loss':>8}{'vs direct':>11}")
base = rows[0]["pps"] or 1
for r in rows:
    print(f"{r['label']:<26}{r['pps']:>14.0f}{r['mb_per_s']:>10.1f}{r['lost']:>8}{r['loss']*100:>7.1f}%{r['pps']/base:>10.2f}x")
udp = json.load(open(f"{work}/status.json")).get("udp", {})
dropped = {k: v for k, v in udp.get("dropped", {}).items() if v}
print(f"gateway udp: up {udp.get('datagrams_up')} down {udp.get('datagrams_down')} dropped {dropped or 'none'}")
drops = open(f"{work}/kernel-drops.txt").read().split()
print("kernel socket drops (local address, count): " + (" ".join(drops) or "none"))
PY
