//! Network namespaces and wireguard-go for interop tests; everything is torn down by
//! `Drop` (also on panic).
#![allow(clippy::unwrap_used, dead_code, unreachable_pub, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::natlab::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip_at(base: u32, off: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + base + off)
}

/// A namespace linked to the host by a veth pair:
/// host side `.1/30` (plus `.5/32` for targets), namespace side `.2/30` of a /29 in
/// 10.200.0.0/16.
pub struct Netns {
    pub name: String,
    pub host_veth: String,
    pub n: u32,
    children: Vec<Child>,
    files: Vec<PathBuf>,
}

impl Netns {
    /// Creates the namespace; panics (the test fails) if `ip netns` is unavailable.
    pub fn new() -> Self {
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        // A /29 per namespace inside 10.200.0.0/16, spread by pid so concurrent test
        // processes do not collide.
        let n = ((pid % 2000) * 4 + k % 4) * 8;
        let name = format!("ipsx{}x{k}", pid % 100_000);
        let host_veth = format!("vh{}x{k}", pid % 100_000);
        let ns_veth = format!("vn{}x{k}", pid % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let me = Self {
            name: name.clone(),
            host_veth: host_veth.clone(),
            n,
            children: Vec::new(),
            files: Vec::new(),
        };
        run(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
        ]);
        run(&["ip", "link", "set", &ns_veth, "netns", &name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ip_at(n, 1)),
            "dev",
            &host_veth,
        ]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/32", ip_at(n, 5)),
            "dev",
            &host_veth,
        ]);
        run(&["ip", "link", "set", &host_veth, "up"]);
        run(&[
            "ip",
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/30", ip_at(n, 2)),
            "dev",
            &ns_veth,
        ]);
        run(&["ip", "-n", &name, "link", "set", &ns_veth, "up"]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        me
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        ip_at(self.n, 1)
    }
    pub fn target_ip(&self) -> Ipv4Addr {
        ip_at(self.n, 5)
    }
    pub fn ns_ip(&self) -> Ipv4Addr {
        ip_at(self.n, 2)
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// Starts wireguard-go on interface `ifname` inside the namespace (foreground,
    /// killed on drop) and waits for the interface.
    pub fn wireguard_go(&mut self, ifname: &str, private_key: &[u8; 32], listen_port: Option<u16>) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "wireguard-go", "-f", ifname])
            .env("LOG_LEVEL", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go not installed: run scripts/install-tunnel.sh");
        self.children.push(child);
        let mut up = false;
        for _ in 0..100 {
            let st = Command::new("ip")
                .args(["-n", &self.name, "link", "show", ifname])
                .output()
                .unwrap();
            if st.status.success() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(up, "wireguard-go did not create {ifname}");
        let key_file = std::env::temp_dir().join(format!("{}-{ifname}.key", self.name));
        std::fs::write(&key_file, ipsx_tunnel_pool::key_to_base64(private_key)).unwrap();
        self.files.push(key_file.clone());
        let mut args = vec![
            "wg".to_string(),
            "set".into(),
            ifname.into(),
            "private-key".into(),
            key_file.display().to_string(),
        ];
        if let Some(p) = listen_port {
            args.push("listen-port".into());
            args.push(p.to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exec(&refs);
    }

    /// Starts a whoami HTTP server (python) inside the namespace on `ip:0`; returns
    /// its port.
    pub fn whoami(&mut self, ip: &str) -> u16 {
        const PY: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(s):
        b = s.client_address[0].encode()
        s.send_response(200)
        s.send_header('Content-Length', str(len(b)))
        s.end_headers()
        s.wfile.write(b)
    def log_message(s, *a):
        pass
srv = http.server.ThreadingHTTPServer((sys.argv[1], 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", PY, ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.children.push(child);
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("whoami server said `{line}`"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
