#!/usr/bin/env bash
# Soak: `ipsx up`, then mixed light traffic for SOAK_MINUTES (default 10): plain HTTP,
# CONNECT and SOCKS5, a sticky session per country, a few on-demand cities; then
# Ctrl-C. Prints: deals made, unexpected deal ends (target 0), distinct IPs per sticky
# session (target 1), failed client requests (target 0), requester spend / (price x
# time served) (target <= 1.05), channels left open after shutdown (target 0).
#
#   bash benches/market/soak.sh            # 10 minutes
#   SOAK_MINUTES=2 bash benches/market/soak.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${SOAK_MINUTES:-10}
WORK=$(mktemp -d /tmp/ipsx-soak.XXXXXX)
. benches/market/up.sh
start_up info

python3 - "$WORK/state.json" "$MINUTES" "$WORK/traffic.json" <<'PY'
import json, random, socket, sys, time, base64
import requests
state = json.load(open(sys.argv[1])); minutes = float(sys.argv[2]); out = sys.argv[3]
proxy = state["proxy"].split("@")[1]; echo = state["echo"]; admin = state["admin"]
host, port = echo[len("http://"):].split("/")[0].split(":")
random.seed(7)
countries = ["de", "us", "fr", "jp"]
on_demand = ["munich", "chicago", "lyon", "osaka"]
sessions = {cc: set() for cc in countries}
stats = {"ok": 0, "failed": 0, "by_kind": {}}
failures = []

def record(kind, ok, detail=""):
    stats["by_kind"].setdefault(kind, [0, 0])[0 if ok else 1] += 1
    stats["ok" if ok else "failed"] += 1
    if not ok and len(failures) < 20:
        failures.append(f"{kind}: {detail}")

def http(user):
    p = f"http://{user}:demo-token@{proxy}"
    r = requests.get(echo, proxies={"http": p}, timeout=20)
    return r.status_code, r.text

def socks(user):
    p = f"socks5h://{user}:demo-token@{proxy}"
    r = requests.get(echo, proxies={"http": p}, timeout=20)
    return r.status_code, r.text

def connect(user):
    auth = base64.b64encode(f"{user}:demo-token".encode()).decode()
    s = socket.create_connection((proxy.split(":")[0], int(proxy.split(":")[1])), timeout=20)
    try:
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            b = s.recv(4096)
            if not b: break
            head += b
        if not head.startswith(b"HTTP/1.1 200"):
            return int(head[9:12] or 0), head.decode(errors="replace")
        s.sendall(f"GET /ip HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b: break
            data += b
        status = int(data[9:12] or 0)
        return status, data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    finally:
        s.close()

def ip_of(text):
    try:
        return json.loads(text)["ip"]
    except Exception:
        return None

end = time.time() + minutes * 60
n = 0
while time.time() < end:
    n += 1
    cc = countries[n % 4]
    kind = random.choice(["http", "socks", "connect", "sticky", "sticky", "on_demand"]) if n > 4 else "sticky"
    try:
        if kind == "sticky":
            code, body = http(f"demo-country-{cc}-session-soak{cc}")
            ip = ip_of(body)
            if code == 200 and ip: sessions[cc].add(ip)
        elif kind == "http":
            code, body = http(f"demo-country-{cc}")
        elif kind == "socks":
            code, body = socks(f"demo-country-{cc}")
        elif kind == "connect":
            code, body = connect(f"demo-country-{cc}")
        else:
            city = random.choice(on_demand)
            code, body = http(f"demo-city-{city}")
        record(kind, code == 200, f"{code} {body[:160]!r}")
    except Exception as e:
        record(kind, False, repr(e)[:200])
    time.sleep(0.2)
market = requests.get(f"{admin}/api/market", timeout=10).json()
json.dump({"stats": stats, "failures": failures, "sessions": {k: sorted(v) for k, v in sessions.items()}, "market": market}, open(out, "w"))
PY

stop_up
python3 - "$WORK/traffic.json" "$WORK/up.log" "$MINUTES" <<'PY'
import json, re, sys
t = json.load(open(sys.argv[1])); log = open(sys.argv[2]).read(); minutes = sys.argv[3]
m = t["market"]; deals = m.get("deals", [])
expected = {None, "completed"}
unexpected = [d for d in deals if d.get("outcome") not in expected]
paid = sum(int(d["paid"]) for d in deals)
served = sum(int(d["price_per_ip_second"]) * int(d["served_s"]) for d in deals)
settled = re.search(r"settled: requester paid (\d+) base units; (\d+) channel\(s\) closed, (\d+) left open", log)
print()
print(f"soak: {minutes} min of mixed traffic through `ipsx up`")
print(f"deals made:                       {len(deals)}")
print(f"unexpected deal ends:             {len(unexpected)}   (target 0) {[(d['deal'], d['outcome'], d['note']) for d in unexpected][:5]}")
print("distinct IPs per sticky session:  " + ", ".join(f"{k}={len(v)}" for k, v in t["sessions"].items()) + "   (target 1 each)")
s = t["stats"]
print(f"client requests:                  {s['ok']} ok, {s['failed']} failed   (target 0 failed) {s['by_kind']}")
for f in t["failures"][:5]:
    print(f"  failure: {f}")
if settled:
    spent = int(settled.group(1))
    print(f"requester spend / served value:   {spent / served if served else float('nan'):.3f}   (target <= 1.05; paid on chain {spent}, served value {served}, last proofs {paid})")
    print(f"channels left open after stop:    {settled.group(3)}   (target 0; {settled.group(2)} closed)")
else:
    print("settlement line missing from the log:")
    print(log[-2000:])
PY
