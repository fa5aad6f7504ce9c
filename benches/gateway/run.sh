#!/usr/bin/env bash
# Side-by-side benchmark of the ipsx gateway (local exit) against squid (HTTP and
# CONNECT), dante (SOCKS5), the origin straight and, as a reference for the cost of one
# HTTP hop, a 1-thread HAProxy reverse proxy in front of the origin; one load generator
# and one origin, in one run. Prints a table of peer figures, ours and the ratios.
#
#   bash benches/gateway/run.sh            # 5 s per measurement
#   DURATION=10 CONNS=64 bash benches/gateway/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-5}
CONNS=${CONNS:-32}
IDLE=${IDLE:-2000}
WORK=$(mktemp -d /tmp/ipsx-bench-gw.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v squid >/dev/null || need+=(squid)
command -v danted >/dev/null || need+=(dante-server)
command -v wrk >/dev/null || need+=(wrk)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || true

cargo build -q --release -p ipsx --bin ipsx && cargo build -q --release -p ipsx-benches --bin ipsx-loadgen
IPSX=target/release/ipsx
LOADGEN=target/release/ipsx-loadgen

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() { # file pattern
  for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timeout waiting for $2 in $1" >&2; cat "$1" >&2; return 1
}
rss_kb() { # sum of VmRSS over PIDs
  local total=0
  for p in "$@"; do
    local v; v=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- origin: 100-byte body ---
$IPSX echo --listen 127.0.0.1:0 --fixed-body 100 > "$WORK/origin.log" 2>&1 &
PIDS+=($!)
wait_line "$WORK/origin.log" "echo listening"
ORIGIN=$(grep -o '127.0.0.1:[0-9]*' "$WORK/origin.log" | head -1)

# --- ipsx gateway, one local exit ---
cat > "$WORK/gateway.toml" <<TOML
[gateway]
listen = "127.0.0.1:0"
allow_destinations = ["127.0.0.0/8"]
max_connections = 100000
reload_poll = "0s"

[[token]]
name = "bench"
secret = "bench-token"

[[exit]]
name = "local"
bind = "127.0.0.1"
country = "de"
TOML
IPSX_LOG=warn $IPSX gateway --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
wait_line "$WORK/gateway.log" "proxy listening"
GW=$(grep -o 'proxy listening on [0-9.:]*' "$WORK/gateway.log" | awk '{print $4}')

# --- squid ---
SQ_PORT=$(free_port)
mkdir -p "$WORK/squid"
chmod 777 "$WORK/squid"
cat > "$WORK/squid.conf" <<CONF
http_port 127.0.0.1:$SQ_PORT
acl all src all
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_log $WORK/squid/cache.log
pid_filename $WORK/squid/squid.pid
coredump_dir $WORK/squid
visible_hostname bench
shutdown_lifetime 1 seconds
workers 1
CONF
squid -N -f "$WORK/squid.conf" > "$WORK/squid.out" 2>&1 &
SQ_PID=$!
PIDS+=($SQ_PID)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$SQ_PORT) 2>/dev/null && break; sleep 0.1; done

# --- dante ---
DA_PORT=$(free_port)
cat > "$WORK/danted.conf" <<CONF
logoutput: $WORK/danted.log
internal: 127.0.0.1 port = $DA_PORT
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }
socks pass { from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }
CONF
danted -f "$WORK/danted.conf" -p "$WORK/danted.pid" > "$WORK/danted.out" 2>&1 &
DA_PID=$!
PIDS+=($DA_PID)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$DA_PORT) 2>/dev/null && break; sleep 0.1; done

# --- HAProxy: a 1-thread reverse proxy in front of the origin (reference hop cost) ---
HA_PORT=$(free_port)
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$HA_PORT
  default_backend be
backend be
  server origin $ORIGIN
CONF
haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$HA_PORT) 2>/dev/null && break; sleep 0.1; done

run() { # label mode proxy [user pass]; TARGET overrides the origin
  local label=$1 mode=$2 proxy=$3; shift 3
  local extra=()
  [ $# -ge 2 ] && extra=(--user "$1" --pass "$2")
  local args=(--mode "$mode" --target "${TARGET:-$ORIGIN}" --connections "$CONNS" --duration "$DURATION")
  [ "$proxy" != "-" ] && args+=(--proxy "$proxy")
  local out; out=$($LOADGEN "${args[@]}" "${extra[@]}")
  echo "$label $out" | tee -a "$WORK/results.txt" >&2
}

echo "== load: $CONNS connections, ${DURATION}s each, 100-byte body" >&2
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
run direct            direct        -
TARGET="127.0.0.1:$HA_PORT" run haproxy-reverse direct -
run squid-http        http          "127.0.0.1:$SQ_PORT"
run ipsx-http         http          "$GW" bench bench-token
run squid-connect     connect       "127.0.0.1:$SQ_PORT"
run ipsx-connect      connect       "$GW" bench bench-token
run dante-socks5      socks5        "127.0.0.1:$DA_PORT"
run ipsx-socks5       socks5        "$GW" bench bench-token
run squid-connect-new connect-setup "127.0.0.1:$SQ_PORT"
run ipsx-connect-new  connect-setup "$GW" bench bench-token
run dante-socks5-new  socks5-setup  "127.0.0.1:$DA_PORT"
run ipsx-socks5-new   socks5-setup  "$GW" bench bench-token

# --- wrk as a second witness for plain HTTP (absolute-form through the proxy) ---
cat > "$WORK/proxy.lua" <<LUA
wrk.path = "http://$ORIGIN/"
wrk.headers["Host"] = "$ORIGIN"
LUA
AUTH=$(printf 'bench:bench-token' | base64 -w0)
wrk_rps() { wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/proxy.lua" "$@" 2>/dev/null | awk '/Requests\/sec/{print $2}'; }
WRK_SQUID=$(wrk_rps "http://127.0.0.1:$SQ_PORT/")
WRK_IPSX=$(wrk_rps -H "Proxy-Authorization: Basic $AUTH" "http://$GW/")
echo "wrk squid=$WRK_SQUID ipsx=$WRK_IPSX" >&2

# --- memory per idle client connection ---
idle_kb() { # label proxy-addr pids...
  local label=$1 addr=$2; shift 2
  local before; before=$(rss_kb "$@")
  $LOADGEN --mode idle --proxy "$addr" --target "$ORIGIN" --connections "$IDLE" --duration 6 > "$WORK/idle.out" &
  local lg=$!
  sleep 4
  local after; after=$(rss_kb "$@")
  wait $lg || true
  local open; open=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["open"])' "$WORK/idle.out")
  echo "$label idle_open=$open rss_before_kb=$before rss_after_kb=$after" | tee -a "$WORK/results.txt" >&2
}
SQ_KIDS=$(pgrep -P "$SQ_PID" | tr '\n' ' ' || true)
DA_KIDS=$(pgrep -P "$DA_PID" | tr '\n' ' ' || true)
idle_kb squid-idle "127.0.0.1:$SQ_PORT" $SQ_PID $SQ_KIDS
idle_kb dante-idle "127.0.0.1:$DA_PORT" $DA_PID $DA_KIDS
idle_kb ipsx-idle "$GW" $GW_PID

python3 - "$WORK/results.txt" "$WRK_SQUID" "$WRK_IPSX" <<'PY'
import json, sys
rows = {}
idle = {}
for line in open(sys.argv[1]):
    label, rest = line.split(" ", 1)
    if rest.startswith("{"):
        rows[label] = json.loads(rest)
    else:
        kv = dict(p.split("=") for p in rest.split())
        idle[label] = kv
def r(label): return rows[label]["rps"]
print()
print(f"{'measurement':34} {'peer':>12} {'ipsx':>12} {'ratio':>7}   p50/p99 us peer | ipsx")
def line(name, peer, ours):
    p, o = rows[peer], rows[ours]
    ratio = o["rps"] / p["rps"] if p["rps"] else float("nan")
    print(f"{name:34} {p['rps']:12.0f} {o['rps']:12.0f} {ratio:7.2f}x  {p['p50_us']}/{p['p99_us']} | {o['p50_us']}/{o['p99_us']}  (errors {p['errors']}/{o['errors']})")
d = rows["direct"]
print(f"{'direct to origin (req/s)':34} {d['rps']:12.0f} {'':>12} {'':>7}   {d['p50_us']}/{d['p99_us']}")
line("plain HTTP vs origin straight", "direct", "ipsx-http")
line("HAProxy reverse (1 thread) vs origin", "direct", "haproxy-reverse")
line("plain HTTP vs squid (req/s)", "squid-http", "ipsx-http")
line("CONNECT tunnel vs squid (req/s)", "squid-connect", "ipsx-connect")
line("SOCKS5 tunnel vs dante (req/s)", "dante-socks5", "ipsx-socks5")
line("new CONNECT per req vs squid", "squid-connect-new", "ipsx-connect-new")
line("new SOCKS5 per req vs dante", "dante-socks5-new", "ipsx-socks5-new")
try:
    ws, wi = float(sys.argv[2]), float(sys.argv[3])
    print(f"{'plain HTTP, wrk, vs squid (req/s)':34} {ws:12.0f} {wi:12.0f} {wi/ws:7.2f}x")
except ValueError:
    pass
print(f"load average at the end: {open('/proc/loadavg').read().split()[:3]}")
for label in ("squid-idle", "dante-idle", "ipsx-idle"):
    kv = idle[label]
    n = max(int(kv["idle_open"]), 1)
    per = (int(kv["rss_after_kb"]) - int(kv["rss_before_kb"])) / n
    print(f"{label:34} {n} idle connections: {per:.1f} KB each (RSS {kv['rss_before_kb']} -> {kv['rss_after_kb']} KB)")
PY
