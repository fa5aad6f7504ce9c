//! A rented exit as a VPN for a standard WireGuard client (issue 13), all real
//! components: anvil, the exchange, a provider agent with its exit, `ipsx rent` as a
//! child process, and wireguard-go + `wg` in a network namespace the test creates, with
//! no ipsx code on the client side.
//!
//! Topology (namespaces and veth pairs the test creates and removes):
//! - `cli`: wireguard-go; its only way out is the veth to the provider's WireGuard
//!   endpoint (root side `10.231.N.1`), and its default route is the tunnel;
//! - `tgt`: the targets (HTTP whoami, UDP echo, DNS on 53) at `10.232.N.2`; the
//!   provider's exit address is the root side `10.232.N.1`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::U256;

use crate::common;
use crate::common::market::{MarketOpts, MarketSystem, hex_key};

/// Runs a command to its end (blocking; the test's runtime keeps the other worker).
fn sh(args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| Command::new(args[0]).args(&args[1..]).output().unwrap())
}

/// Gives `dev` (in namespace `ns`, or the root one) the address `cidr` and brings it up.
fn addr_up(ns: Option<&str>, dev: &str, cidr: &str) {
    let mut ip = vec!["ip"];
    if let Some(ns) = ns {
        ip.extend(["-n", ns]);
    }
    must(&[ip.as_slice(), &["addr", "add", cidr, "dev", dev]].concat());
    must(&[ip.as_slice(), &["link", "set", dev, "up"]].concat());
}

fn must(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The targets in `tgt`: HTTP answering the caller's address on 8080, UDP echo on 7
/// (prefixed with the sender's address), plain UDP echo on 9 (the benchmark's), DNS on
/// 53 answering every A query with 192.0.2.53. Prints `ready` once bound. Fixed ports:
/// the namespace is the test's own.
const TARGETS_PY: &str = r#"
import socket, sys, threading
ip = sys.argv[1]
h = socket.socket(); h.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); h.bind((ip, 8080)); h.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 7))
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.bind((ip, 53))
p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); p.bind((ip, 9))
def http():
    while True:
        c, a = h.accept()
        try:
            c.recv(4096)
            body = a[0].encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        finally:
            c.close()
def echo():
    while True:
        m, a = u.recvfrom(65535)
        u.sendto(b"echo " + a[0].encode() + b" " + m, a)
def plain():
    while True:
        m, a = p.recvfrom(65535)
        p.sendto(m, a)
def dns():
    while True:
        q, a = d.recvfrom(512)
        if len(q) < 12: continue
        end = q.index(b"\0", 12) + 5
        r = q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:end]
        r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 53])
        d.sendto(r, a)
for f in (http, echo, plain, dns):
    threading.Thread(target=f, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"#;

/// A UDP client in `cli`: sends argv[3] to argv[1]:argv[2] (up to 5 tries), prints the reply.
const UDP_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for _ in range(5):
    s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(65535)[0].decode(errors="replace")); break
    except socket.timeout:
        pass
"#;

/// A DNS client in `cli`: asks argv[1]:53 for the A record of argv[2], prints the address.
const DNS_PY: &str = r#"
import socket, sys
q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
for label in sys.argv[2].split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
for _ in range(5):
    s.sendto(q, (sys.argv[1], 53))
    try:
        r = s.recvfrom(512)[0]
        if r[:2] == b"\x12\x34" and r[7] >= 1:
            print(".".join(str(b) for b in r[-4:])); break
    except socket.timeout:
        pass
"#;

/// Namespaces, links and child processes; all removed on drop (even on failure).
struct Lab {
    n: u8,
    children: Vec<Child>,
}

impl Lab {
    fn ns(&self, role: &str) -> String {
        format!("ipsxv{}{role}", self.n)
    }
    fn cli_gw(&self) -> String {
        format!("10.231.{}.1", self.n)
    }
    fn exit_ip(&self) -> String {
        format!("10.232.{}.1", self.n)
    }
    fn target_ip(&self) -> String {
        format!("10.232.{}.2", self.n)
    }

    fn new() -> Self {
        let n = (std::process::id() % 200) as u8 + 1;
        let lab = Self {
            n,
            children: Vec::new(),
        };
        lab.cleanup();
        for (role, net) in [("c", 231), ("t", 232)] {
            let ns = lab.ns(role);
            let (a, b) = (format!("ipsxv{n}{role}a"), format!("ipsxv{n}{role}b"));
            must(&["ip", "netns", "add", &ns]);
            must(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b]);
            must(&["ip", "link", "set", &b, "netns", &ns]);
            addr_up(None, &a, &format!("10.{net}.{n}.1/30"));
            addr_up(Some(&ns), &b, &format!("10.{net}.{n}.2/30"));
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn exec(&self, role: &str, args: &[&str]) -> std::process::Output {
        let ns = self.ns(role);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        sh(&v)
    }

    fn spawn(&mut self, role: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role)])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    fn cleanup(&self) {
        for role in ["c", "t", "a", "b"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(role)]);
            let _ = sh(&["ip", "link", "del", &format!("ipsxv{}{role}a", self.n)]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.cleanup();
    }
}

/// Starts wireguard-go `name` in namespace `role`, configures it with `wg setconf`
/// from `conf`, gives it `address`, MTU 1420, and brings it up.
async fn wg_up(lab: &mut Lab, role: &str, name: &str, conf: &std::path::Path, address: &str) {
    lab.spawn(role, &["wireguard-go", "-f", name]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab
        .exec(role, &["ip", "link", "show", name])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "wireguard-go made no {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ns = lab.ns(role);
    must(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "wg",
        "setconf",
        name,
        conf.to_str().unwrap(),
    ]);
    must(&["ip", "-n", &ns, "addr", "add", address, "dev", name]);
    must(&["ip", "-n", &ns, "link", "set", name, "mtu", "1420", "up"]);
}

/// `wg-quick strip`, done here: the file without wg-quick's own keys.
fn strip(conf: &str) -> String {
    conf.lines()
        .filter(|l| {
            let k = l.split('=').next().unwrap_or("").trim();
            !matches!(k, "Address" | "DNS" | "MTU") && !l.starts_with('#')
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn conf_value(conf: &str, key: &str) -> Option<String> {
    conf.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// Reads JSON lines from `ipsx rent` until one has `event == want` (bounded).
fn until_event(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    seen: &mut Vec<serde_json::Value>,
    want: &str,
) -> serde_json::Value {
    for _ in 0..10_000 {
        let Some(line) = tokio::task::block_in_place(|| lines.next()) else {
            break;
        };
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        seen.push(v.clone());
        if v["event"] == want {
            return v;
        }
    }
    panic!("`ipsx rent` ended before `{want}`: {seen:#?}");
}

/// Everything up to a working tunnel: the targets, the market, a provider agent,
/// `ipsx rent` (its JSON lines so far in `seen`) and wireguard-go in `cli` brought up
/// from the exported file, with the checks on the file itself.
struct Rented {
    lab: Lab,
    sys: MarketSystem,
    agent: ipsx_provider::AgentHandle,
    rent: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    seen: Vec<serde_json::Value>,
    own: std::net::TcpListener,
    own_port: u16,
}

async fn rented() -> Rented {
    let mut lab = Lab::new();
    // The targets, in their own namespace.
    let target_ip = lab.target_ip();
    {
        let t = lab.spawn("t", &["python3", "-c", TARGETS_PY, &target_ip]);
        let mut line = String::new();
        BufReader::new(t.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let sys = MarketSystem::start(MarketOpts {
        exits: vec![],
        demand: String::new(),
        gateway: false,
        ..MarketOpts::default()
    })
    .await;
    // The provider: WireGuard on the client's veth, flows out of the target's veth.
    let toml = format!(
        "[exchange]\nurl = \"{}\"\n\n[chain]\nrpc_url = \"{}\"\ndeployment = \"{}\"\n\n[wallet]\nprivate_key = \"{}\"\n\n[timings]\npoll = \"1s\"\n\n[[exit]]\nexit_address = \"{}\"\nlisten = \"{}:0\"\ncountry = \"de\"\ntype = \"residential\"\nprotocols = [\"any\"]\nprice_per_ip_second = \"1000000000000\"\nallow_destinations = [\"{target_ip}/32\"]\ndns_upstream = \"{target_ip}:53\"\n",
        sys.exchange_url,
        sys.anvil.endpoint(),
        sys.deployment_path.display(),
        hex_key(&sys.anvil.key(2)),
        lab.exit_ip(),
        lab.cli_gw(),
    );
    let agent = ipsx_provider::Agent::start(ipsx_provider::AgentConfig::from_toml(&toml).unwrap())
        .await
        .unwrap();
    // A listener on the exit's own address: the policy must keep the client off it.
    let own = std::net::TcpListener::bind(format!("{}:0", lab.exit_ip())).unwrap();
    own.set_nonblocking(true).unwrap();
    let own_port = own.local_addr().unwrap().port();

    // `ipsx rent`, configured by the gateway's [market] section.
    let cfg_path = sys.dir.join("rent.toml");
    std::fs::write(&cfg_path, &sys.gateway_toml).unwrap();
    let conf_path = sys.dir.join("de.conf");
    let mut rent = Command::new(env!("CARGO_BIN_EXE_ipsx"))
        .args(["rent", "--config"])
        .arg(&cfg_path)
        .args([
            "--country",
            "de",
            "--duration",
            "10m",
            "--json",
            "--wg-quick",
        ])
        .arg(&conf_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(rent.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let wg = until_event(&mut lines, &mut seen, "wg_quick");
    assert_eq!(wg["exit_address"], lab.exit_ip().as_str(), "{wg}");
    assert!(wg.get("private_key").is_none(), "the key stays in the file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&conf_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    assert_eq!(
        conf_value(&conf, "AllowedIPs").as_deref(),
        Some("0.0.0.0/0")
    );
    assert_eq!(conf_value(&conf, "DNS").as_deref(), Some("10.77.0.1"));
    assert_eq!(
        conf_value(&conf, "Endpoint").unwrap().split(':').next(),
        Some(lab.cli_gw().as_str())
    );
    // The agent serves directly: no keepalive needed.
    assert_eq!(conf_value(&conf, "PersistentKeepalive"), None, "{conf}");
    let address = conf_value(&conf, "Address").unwrap();

    // The standard client: wireguard-go + wg setconf, in `cli`.
    let stripped = sys.dir.join("de.wg");
    std::fs::write(&stripped, strip(&conf)).unwrap();
    // Interface names are global for wireguard-go (its UAPI socket): one per lab.
    let wg = format!("wgr{}", lab.n);
    wg_up(&mut lab, "c", &wg, &stripped, &address).await;
    let c = lab.ns("c");
    // Default route through the tunnel; the endpoint stays on the veth (its /30).
    must(&["ip", "-n", &c, "route", "add", "default", "dev", &wg]);

    Rented {
        lab,
        sys,
        agent,
        rent,
        lines,
        seen,
        own,
        own_port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rented_exit_works_as_a_vpn_for_wireguard_go_and_settles_on_ctrl_c() {
    let Rented {
        lab,
        sys,
        agent,
        mut rent,
        mut lines,
        mut seen,
        own,
        own_port,
    } = rented().await;
    let rent_pid = rent.id();
    let target_ip = lab.target_ip();
    // TCP: curl sees the exit address.
    let url = format!("http://{target_ip}:8080/");
    let mut body = String::new();
    for _ in 0..10 {
        let out = lab.exec("c", &["curl", "-s", "--max-time", "5", &url]);
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            break;
        }
    }
    assert_eq!(body, lab.exit_ip(), "curl through the tunnel");
    // UDP echo: relayed from the exit address.
    let out = lab.exec("c", &["python3", "-c", UDP_PY, &target_ip, "7", "hello"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("echo {} hello", lab.exit_ip())
    );
    // DNS over UDP to port 53 (the exit sends every DNS query to its resolver) ...
    let out = lab.exec("c", &["python3", "-c", DNS_PY, &target_ip, "target.test"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.53");
    // ... to the file's DNS too.
    let out = lab.exec("c", &["python3", "-c", DNS_PY, "10.77.0.1", "target.test"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.53");
    // A destination the policy refuses (the exit's own address) stays unreachable.
    let refused = format!("http://{}:{own_port}/", lab.exit_ip());
    let out = lab.exec("c", &["curl", "-s", "--max-time", "5", &refused]);
    assert!(!out.status.success(), "the exit's own address was reached");
    assert!(
        own.accept().is_err(),
        "a connection reached the exit's own address"
    );
    let out = lab.exec("c", &["python3", "-c", UDP_PY, "169.254.169.254", "7", "x"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");

    // Paying while it runs.
    until_event(&mut lines, &mut seen, "paid");
    // Ctrl-C: the deal ends and settles.
    assert_eq!(sigint(rent_pid), 0);
    let settled = until_event(&mut lines, &mut seen, "settled");
    assert_eq!(settled["channels_open"], 0, "{seen:#?}");
    let status = rent.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let paid: u128 = settled["paid_total"].as_str().unwrap().parse().unwrap();
    assert!(paid > 0);
    let (_, reserved) = sys.requester_funds().await;
    assert_eq!(reserved, U256::ZERO, "a channel is still open on chain");
    let _ = agent.shutdown().await;
    sys.stop().await;
    drop(lab);
}

/// SIGINT to `pid` with the `kill` tool (no unsafe code); its exit code.
fn sigint(pid: u32) -> i32 {
    sh(&["kill", "-INT", &pid.to_string()])
        .status
        .code()
        .unwrap_or(-1)
}

/// The benchmark's load: UDP echo to argv[1]:argv[2] with argv[3]-byte payloads, at
/// most argv[4] datagrams in flight, for argv[5] seconds (a silent second resets the
/// window: lost datagrams). With argv[6..10] (proxy address, port, user, password) the
/// datagrams go through that SOCKS5 proxy's UDP ASSOCIATE (RFC 1928 section 7), each
/// with its 10-byte header. Prints `<replies/s> <MB/s of replies>`.
const UDP_LOAD_PY: &str = r#"
import socket, struct, sys, time
ip, port, size, window, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
payload = b"x" * size
if len(sys.argv) > 9:
    c = socket.create_connection((sys.argv[6], int(sys.argv[7])))
    def exact(n):
        b = b""
        while len(b) < n:
            m = c.recv(n - len(b))
            if not m: raise SystemExit("proxy closed")
            b += m
        return b
    user, pw = sys.argv[8].encode(), sys.argv[9].encode()
    c.sendall(b"\x05\x01\x02"); assert exact(2) == b"\x05\x02"
    c.sendall(bytes([1, len(user)]) + user + bytes([len(pw)]) + pw); assert exact(2) == b"\x01\x00"
    c.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    r = exact(10); assert r[1] == 0 and r[3] == 1, r
    s.connect((socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0]))
    payload = b"\x00\x00\x00\x01" + socket.inet_aton(ip) + struct.pack(">H", port) + payload
else:
    s.connect((ip, port))
s.settimeout(1.0)
inflight = got = 0
t0 = time.time(); end = t0 + secs
while time.time() < end:
    while inflight < window:
        s.send(payload); inflight += 1
    try:
        s.recv(65535); got += 1; inflight -= 1
    except socket.timeout:
        inflight = 0
el = time.time() - t0
print("%.0f %.2f" % (got / el, got * size / el / 1e6))
"#;

/// Runs the load from namespace `role` (`None`: the root one) and returns (datagrams/s,
/// MB/s) for small (64 B) and large (1200 B) payloads; `socks` as UDP_LOAD_PY's tail.
fn load(
    lab: &Lab,
    role: Option<&str>,
    ip: &str,
    secs: &str,
    socks: &[&str],
) -> [(String, String); 2] {
    ["64", "1200"].map(|size| {
        let mut args = vec!["python3", "-c", UDP_LOAD_PY, ip, "9", size, "32", secs];
        args.extend_from_slice(socks);
        let out = match role {
            Some(role) => lab.exec(role, &args),
            None => sh(&args),
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut w = text.split_whitespace();
        (
            w.next().unwrap_or("0").to_owned(),
            w.next().unwrap_or("0").to_owned(),
        )
    })
}

/// `ipsx gateway` (a child in the root namespace, killed with the lab) with the rented
/// exit's exported wg-quick file as its one tunnel exit, allowed to reach `target`;
/// returns its proxy address.
fn gateway_on_rented_exit(
    lab: &mut Lab,
    dir: &std::path::Path,
    conf: &std::path::Path,
    target: &str,
) -> String {
    let cfg = dir.join("bench-gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"{target}/32\"]\nreload_poll = \"0s\"\n\n[[token]]\nname = \"bench\"\nsecret = \"bench-token\"\n\n[[exit]]\nname = \"rented\"\nwireguard = \"{}\"\ncountry = \"de\"\n",
            conf.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipsx"))
        .args(["gateway", "--config"])
        .arg(&cfg)
        .env("IPSX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lab.children.push(child);
    let addrs = tokio::task::block_in_place(|| common::gateway_addrs(&mut lines))
        .expect("`ipsx gateway` did not start");
    // Keep reading its stdout so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    addrs.proxy.to_string()
}

/// A plain wireguard-go pair: namespaces `a` and `b` joined by a veth, one wireguard-go
/// in each, the plain echo on `b`'s tunnel address; returns that address.
async fn plain_pair(lab: &mut Lab) -> String {
    let n = lab.n;
    let (a, b) = (lab.ns("a"), lab.ns("b"));
    let (va, vb) = (format!("ipsxv{n}pa"), format!("ipsxv{n}pb"));
    must(&["ip", "netns", "add", &a]);
    must(&["ip", "netns", "add", &b]);
    must(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    must(&["ip", "link", "set", &va, "netns", &a]);
    must(&["ip", "link", "set", &vb, "netns", &b]);
    for (ns, dev, last) in [(&a, &va, 1), (&b, &vb, 2)] {
        addr_up(Some(ns), dev, &format!("10.233.{n}.{last}/30"));
        must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let key = |_: u8| {
        let k = must(&["wg", "genkey"]).trim().to_owned();
        let out = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(k.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        (k, String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (ka, kb) = (key(0), key(1));
    for (role, me, peer, last, peer_last) in [("a", &ka, &kb, 1, 2), ("b", &kb, &ka, 2, 1)] {
        let wg = format!("wg{role}{n}");
        let conf = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\nEndpoint = 10.233.{n}.{peer_last}:51820\nAllowedIPs = 10.234.{n}.{peer_last}/32\n",
            me.0, peer.1
        );
        let file =
            std::env::temp_dir().join(format!("ipsx-bench-{}-{role}.wg", std::process::id()));
        std::fs::write(&file, conf).unwrap();
        wg_up(lab, role, &wg, &file, &format!("10.234.{n}.{last}/32")).await;
        let _ = std::fs::remove_file(&file);
        let ns = lab.ns(role);
        must(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            &format!("10.234.{n}.{peer_last}/32"),
            "dev",
            &wg,
        ]);
    }
    let ip = format!("10.234.{n}.2");
    let t = lab.spawn("b", &["python3", "-c", PLAIN_ECHO_PY, &ip]);
    let mut line = String::new();
    BufReader::new(t.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    ip
}

/// The plain echo alone (port 9), for the wireguard-go pair.
const PLAIN_ECHO_PY: &str = r#"
import socket, sys
p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); p.bind((sys.argv[1], 9))
print("ready", flush=True)
while True:
    m, a = p.recvfrom(65535)
    p.sendto(m, a)
"#;

/// `benches/vpn/run.sh`: UDP echo through a rented ipsx exit with wireguard-go as the
/// client (the exported wg-quick file), against a plain wireguard-go pair, in one run.
/// Both use the same Python echo and load, which cap the absolute figures; the ratio
/// is the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: benches/vpn/run.sh"]
async fn bench_udp_echo_rented_exit_vs_wireguard_go_pair() {
    let secs = std::env::var("IPSX_BENCH_SECS").unwrap_or_else(|_| "5".into());
    let mut r = rented().await;
    let target = r.lab.target_ip();
    // Warm up (handshake) with one echo.
    let _ = r
        .lab
        .exec("c", &["python3", "-c", UDP_PY, &target, "9", "warm"]);
    let rented = load(&r.lab, Some("c"), &target, &secs, &[]);
    // The same rented exit through the gateway's SOCKS5 UDP ASSOCIATE: wireguard-go
    // goes (one key, one client at a time) and the gateway takes the exported file.
    let wg = format!("wgr{}", r.lab.n);
    must(&["ip", "-n", &r.lab.ns("c"), "link", "del", &wg]);
    let conf = r.sys.dir.join("de.conf");
    let gw = gateway_on_rented_exit(&mut r.lab, &r.sys.dir, &conf, &target);
    let (gw_ip, gw_port) = gw.rsplit_once(':').unwrap();
    let socks = [gw_ip, gw_port, "bench", "bench-token"];
    // Warm up: the gateway's tunnel handshake, a second or so at most.
    for _ in 0..10 {
        let w = load(&r.lab, None, &target, "1", &socks);
        if w[0].0 != "0" {
            break;
        }
    }
    let via_socks = load(&r.lab, None, &target, &secs, &socks);
    let plain_ip = plain_pair(&mut r.lab).await;
    let _ = r
        .lab
        .exec("a", &["python3", "-c", UDP_PY, &plain_ip, "9", "warm"]);
    let plain = load(&r.lab, Some("a"), &plain_ip, &secs, &[]);
    println!("path                     64B dgram/s   1200B dgram/s   1200B MB/s");
    for (name, v) in [
        ("wireguard-go pair", &plain),
        ("rented ipsx exit", &rented),
        ("socks5-udp via gateway", &via_socks),
    ] {
        println!("{name:<24} {:>12} {:>15} {:>12}", v[0].0, v[1].0, v[1].1);
    }
    let ratio = |a: &str, b: &str| {
        let (a, b) = (
            a.parse::<f64>().unwrap_or(0.0),
            b.parse::<f64>().unwrap_or(0.0),
        );
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    for (name, v) in [
        ("ratio rented/pair", &rented),
        ("ratio socks5/pair", &via_socks),
    ] {
        println!(
            "{name:<24} {:>12} {:>15} {:>12}",
            ratio(&v[0].0, &plain[0].0),
            ratio(&v[1].0, &plain[1].0),
            ratio(&v[1].1, &plain[1].1)
        );
    }
    let _ = tokio::task::block_in_place(|| {
        let _ = sh(&["kill", "-INT", &r.rent.id().to_string()]);
        r.rent.wait()
    });
    let _ = r.agent.shutdown().await;
    r.sys.stop().await;
}
