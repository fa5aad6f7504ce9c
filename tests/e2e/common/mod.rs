//! Shared harness for the end-to-end tests: an echo target, a gateway started in this
//! process on 127.0.0.1:0, and helpers for real clients (curl, Python requests).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub,
    missing_docs
)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipsx_config::GatewayConfig;
use ipsx_gateway::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Exits used by most tests: two DE, two US, one FR, on distinct loopback addresses.
pub const EXITS: &[(u8, &str)] = &[(2, "de"), (3, "de"), (4, "us"), (5, "us"), (6, "fr")];
pub const TOKEN: &str = "test-token-1";

pub fn exit_ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The default test config: loopback allowed, one token, the exits above. `extra` is
/// appended (rules, bans, limits).
pub fn config_text(extra: &str) -> String {
    let mut t = String::from(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\", \"::1/128\"]\nconnect_timeout = \"2s\"\n\n",
    );
    t.push_str(&format!(
        "[[token]]\nname = \"tester\"\nsecret = \"{TOKEN}\"\n\n"
    ));
    for (last, cc) in EXITS {
        t.push_str(&format!(
            "[[exit]]\nname = \"{cc}-{last}\"\nbind = \"127.0.0.{last}\"\ncountry = \"{cc}\"\n\n"
        ));
    }
    t.push_str(extra);
    t
}

pub struct Echo {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let countries: HashMap<IpAddr, String> = EXITS
            .iter()
            .map(|(l, c)| (exit_ip(*l), (*c).to_owned()))
            .collect();
        let task = tokio::spawn(ipsx_gateway::echo::serve_echo(listener, countries));
        Self { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/ip", self.addr)
    }
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    task: JoinHandle<()>,
    admin: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.task.abort();
        if let Some((_, t)) = &self.admin {
            t.abort();
        }
    }
}

impl TestGateway {
    pub async fn start(config_toml: &str) -> Self {
        let config =
            GatewayConfig::from_toml(config_toml, "test.toml").expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = Gateway::new(config, None);
        let task = tokio::spawn(ipsx_gateway::serve(
            listener,
            gateway.clone(),
            std::future::pending(),
        ));
        Self {
            addr,
            gateway,
            task,
            admin: None,
        }
    }

    pub async fn with_admin(mut self) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let t = tokio::spawn(ipsx_gateway::admin::serve_admin(
            listener,
            self.gateway.clone(),
            std::future::pending(),
        ));
        self.admin = Some((addr, t));
        self
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.as_ref().expect("admin started").0
    }

    pub fn proxy(&self, username: &str) -> String {
        format!("http://{username}:{TOKEN}@{}", self.addr)
    }

    pub fn socks(&self, username: &str) -> String {
        format!("socks5h://{username}:{TOKEN}@{}", self.addr)
    }
}

/// Runs curl with the proxy environment cleared; bounded by a timeout.
pub async fn curl(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    clear_proxy_env(cmd.as_std_mut());
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("curl finished")
        .expect("curl runs (is curl installed?)")
}

/// The addresses `ipsx gateway` prints when it starts.
#[derive(Debug, Clone, Copy)]
pub struct GatewayAddrs {
    /// `proxy listening on ...`: HTTP and SOCKS5.
    pub proxy: std::net::SocketAddr,
    /// `admin listening on http://...`, when the config has an admin listener.
    pub admin: Option<std::net::SocketAddr>,
}

/// Reads `ipsx gateway`'s stdout lines until it says where its proxy listens (the admin
/// line comes first when there is one); `None` if the output ends (or breaks) first.
pub fn gateway_addrs(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> Option<GatewayAddrs> {
    let mut admin = None;
    for line in lines {
        let line = line.ok()?;
        if let Some(a) = line.strip_prefix("admin listening on http://") {
            admin = a.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("proxy listening on ") {
            let proxy = rest.split_whitespace().next()?.parse().ok()?;
            return Some(GatewayAddrs { proxy, admin });
        }
    }
    None
}

/// Removes the proxy variables of the environment from a child's (a std or, through
/// `as_std_mut`, a tokio command), so test clients and processes never use a proxy by
/// accident.
pub fn clear_proxy_env(cmd: &mut std::process::Command) {
    for v in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
}

/// Runs a Python snippet (requests + PySocks); bounded by a timeout.
pub async fn python(code: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(code).args(args);
    clear_proxy_env(cmd.as_std_mut());
    cmd.kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("python finished")
        .expect("python3 runs")
}

/// The `ip` field of every echo answer in curl's output (one JSON object per line).
pub fn echo_ips(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["ip"].as_str().map(str::to_owned))
        .collect()
}

/// Sends raw bytes and reads the answer until close or timeout.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    // Until close, or one complete response (head + Content-Length body).
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if response_complete(&out) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `bytes` hold a whole response head and its Content-Length body.
pub fn response_complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => bytes.len() >= end + 4 + n,
        None => false,
    }
}

/// A raw TCP target that counts connections and bytes received: proves that a refused
/// request sent nothing to the target.
pub struct CountingTarget {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub bytes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for CountingTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingTarget {
    /// `reply` is written after the first read (e.g. a canned HTTP response).
    pub async fn start(reply: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut replied = false;
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n, Ordering::SeqCst);
                        if !replied && !reply.is_empty() {
                            replied = true;
                            let _ = s.write_all(reply).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            bytes,
            task,
        }
    }

    pub fn untouched(&self) -> bool {
        self.connections.load(Ordering::SeqCst) == 0 && self.bytes.load(Ordering::SeqCst) == 0
    }
}

pub fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

pub fn urls(url: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| url.to_owned()).collect()
}

/// curl through the proxy `n` times (one run, keep-alive); the exit IP of each answer.
pub async fn curl_many(proxy_args: &[&str], url: &str, n: usize) -> Vec<String> {
    let list = urls(url, n);
    let mut args: Vec<&str> = proxy_args.to_vec();
    // `--next`-free form: curl fetches every URL, one JSON answer per line.
    args.extend(list.iter().map(String::as_str));
    let out = curl(&args).await;
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ips = echo_ips(&out.stdout);
    assert_eq!(
        ips.len(),
        n,
        "every request answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ips
}

/// Standard base64 (for hand-written `Proxy-Authorization: Basic` headers).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub mod market;
