#!/usr/bin/env bash
# Tunnel benchmark, side by side in one run (ratios matter, absolute numbers drift):
#   direct loopback | wireguard-go pair in two namespaces (kernel TCP over a TUN pair)
#   | ours (tunnel-pool -> our provider exit, userspace, same process) | onetun.
# Prints each figure and the ratio ours / wireguard-go. Needs root (namespaces).
#   IPSX_BENCH_SECS=3      seconds per load phase
#   IPSX_BENCH_QUICK=1     skip onetun (its cargo install takes ~10 min here)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install-tunnel.sh
SECS=${IPSX_BENCH_SECS:-3}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p ipsx-provider --example tunnel_bench
BIN="$TARGET/release/examples/tunnel_bench"
OUT=$(mktemp -d)
PIDS=()
NS_C=ipsxbc$$
NS_E=ipsxbe$$
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  ip netns del "$NS_C" 2>/dev/null || true
  ip netns del "$NS_E" 2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT

get() { awk -v k="$1" '$1==k {print $2}' "$2"; }

# --- direct loopback -------------------------------------------------------------
"$BIN" targets 127.0.0.1 > "$OUT/t_direct" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$OUT/t_direct" ] && break; sleep 0.1; done
read -r W S SO < "$OUT/t_direct"
"$BIN" load 127.0.0.1:$W 127.0.0.1:$S 127.0.0.1:$SO "$SECS" > "$OUT/direct"

# --- ours --------------------------------------------------------------------------
"$BIN" ours "$SECS" > "$OUT/ours"
"$BIN" idle 1000 > "$OUT/idle"

# --- wireguard-go pair in two namespaces ------------------------------------------------
ip netns add "$NS_C"; ip netns add "$NS_E"
ip link add vbc$$ type veth peer name vbe$$
ip link set vbc$$ netns "$NS_C"; ip link set vbe$$ netns "$NS_E"
ip -n "$NS_C" addr add 10.201.0.1/30 dev vbc$$; ip -n "$NS_E" addr add 10.201.0.2/30 dev vbe$$
for n in "$NS_C" "$NS_E"; do ip -n "$n" link set lo up; done
ip -n "$NS_C" link set vbc$$ up; ip -n "$NS_E" link set vbe$$ up
KC=$(wg genkey); KE=$(wg genkey)
PC=$(echo "$KC" | wg pubkey); PE=$(echo "$KE" | wg pubkey)
echo "$KC" > "$OUT/kc"; echo "$KE" > "$OUT/ke"
ip netns exec "$NS_C" env LOG_LEVEL=error wireguard-go -f wgbc$$ >/dev/null 2>&1 & PIDS+=($!)
ip netns exec "$NS_E" env LOG_LEVEL=error wireguard-go -f wgbe$$ >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 50); do
  ip -n "$NS_C" link show wgbc$$ >/dev/null 2>&1 && ip -n "$NS_E" link show wgbe$$ >/dev/null 2>&1 && break
  sleep 0.1
done
PORT=$(( 20000 + $$ % 20000 ))   # inside a fresh namespace nothing else can hold it
ip netns exec "$NS_E" wg set wgbe$$ private-key "$OUT/ke" listen-port "$PORT" peer "$PC" allowed-ips 10.98.0.2/32
ip netns exec "$NS_C" wg set wgbc$$ private-key "$OUT/kc" peer "$PE" endpoint 10.201.0.2:$PORT allowed-ips 10.98.0.0/24
ip -n "$NS_E" addr add 10.98.0.1/24 dev wgbe$$; ip -n "$NS_E" link set wgbe$$ up
ip -n "$NS_C" addr add 10.98.0.2/24 dev wgbc$$; ip -n "$NS_C" link set wgbc$$ up
ip netns exec "$NS_E" "$BIN" targets 10.98.0.1 > "$OUT/t_wg" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$OUT/t_wg" ] && break; sleep 0.1; done
read -r W S SO < "$OUT/t_wg"
# The first request of this run triggers the handshake: first_byte is cold.
ip netns exec "$NS_C" "$BIN" load 10.98.0.1:$W 10.98.0.1:$S 10.98.0.1:$SO "$SECS" > "$OUT/wg"

# --- onetun (optional) -----------------------------------------------------------------
ONETUN=""
if [ "${IPSX_BENCH_QUICK:-0}" != 1 ]; then
  command -v onetun >/dev/null || cargo install --locked onetun
  KO=$(wg genkey); PO=$(echo "$KO" | wg pubkey)
  "$BIN" targets 127.0.0.1 > "$OUT/t_on" & PIDS+=($!)
  for _ in $(seq 50); do [ -s "$OUT/t_on" ] && break; sleep 0.1; done
  read -r W S SO < "$OUT/t_on"
  "$BIN" exit "$PO" 10.77.0.3 > "$OUT/exit_on" & PIDS+=($!)
  for _ in $(seq 50); do [ -s "$OUT/exit_on" ] && break; sleep 0.1; done
  read -r EP EPUB < "$OUT/exit_on"
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  # One local port per target, each forwarded by onetun through our exit.
  LP=()
  for tp in "$W" "$S" "$SO"; do
    lp=$(free_port); LP+=("$lp")
    onetun "127.0.0.1:$lp:127.0.0.1:$tp" --endpoint-addr 127.0.0.1:$EP --endpoint-public-key "$EPUB" \
      --private-key "$KO" --source-peer-ip 10.77.0.3 >/dev/null 2>&1 & PIDS+=($!)
  done
  sleep 1
  "$BIN" load 127.0.0.1:${LP[0]} 127.0.0.1:${LP[1]} 127.0.0.1:${LP[2]} "$SECS" > "$OUT/onetun" || true
  ONETUN="req_s $(get req_s "$OUT/onetun"), up_mb_s $(get up_mb_s "$OUT/onetun"), down_mb_s $(get down_mb_s "$OUT/onetun") (onetun -> our exit)"
fi

# --- report ----------------------------------------------------------------------------
printf '\n%-26s %12s %12s %12s %10s\n' metric direct wireguard-go ours ours/wg-go
for k in req_s up_mb_s down_mb_s; do
  d=$(get $k "$OUT/direct"); w=$(get $k "$OUT/wg"); o=$(get $k "$OUT/ours")
  printf '%-26s %12s %12s %12s %10s\n' "$k" "$d" "$w" "$o" "$(awk -v a="$o" -v b="$w" 'BEGIN{printf "%.2fx", a/b}')"
done
w=$(get first_byte_ms "$OUT/wg"); o=$(get cold_first_byte_ms "$OUT/ours")
printf '%-26s %12s %12s %12s %10s\n' "cold_first_byte_ms" "-" "$w" "$o" "$(awk -v a="$o" -v b="$w" 'BEGIN{printf "%.2fx", a/b}')"
printf '%-26s %12s %12s %12s\n' "warm_first_byte_ms" "$(get first_byte_ms "$OUT/direct")" "-" "$(get first_byte_ms "$OUT/ours")"
printf '%-26s %12s\n' "idle_rss_kb_per_tunnel" "$(get idle_rss_kb_per_tunnel "$OUT/idle") (1000 tunnels, $(get idle_tunnels_up "$OUT/idle") up)"
printf '%-26s %12s\n' "upload_rss_kb start/max/end" "$(get upload_rss_kb_start "$OUT/ours")/$(get upload_rss_kb_max "$OUT/ours")/$(get upload_rss_kb_end "$OUT/ours") (10 s upload)"
[ -n "$ONETUN" ] && echo "onetun: $ONETUN"
exit 0
