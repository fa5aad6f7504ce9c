# Sourced by the market benchmarks: runs the release `ipsx up` in the background with
# its state in $WORK, and always stops it (Ctrl-C, then by PID, its anvil too).
#   start_up LOG_LEVEL     starts it, waits for "ipsx is up" (exits on failure)
#   stop_up                Ctrl-C and wait up to 90 s for it to settle and exit
UP_PID=""
stop_up() {
  if [ -n "$UP_PID" ] && kill -0 "$UP_PID" 2>/dev/null; then
    kill -INT "$UP_PID" 2>/dev/null || true
    for _ in $(seq 1 900); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$UP_PID" 2>/dev/null || true
    # A hard-killed `ipsx up` leaves its anvil behind: end it by its PID.
    pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["anvil_pid"])' "$WORK/state.json" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  fi
  UP_PID=""
}
cleanup() {
  stop_up
  rm -rf "$WORK"
}
trap cleanup EXIT
start_up() {
  bash scripts/install-chain.sh >/dev/null
  bash scripts/install-base.sh >/dev/null
  cargo build -q --release -p ipsx --bin ipsx
  IPSX_LOG=$1 target/release/ipsx up --port 0 --state "$WORK/state.json" > "$WORK/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 1 900); do grep -q "ipsx is up" "$WORK/up.log" && break; sleep 0.1; done
  grep -q "ipsx is up" "$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }
}
