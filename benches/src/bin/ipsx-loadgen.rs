//! `ipsx-loadgen`: keep-alive HTTP/1.1 load straight to an origin, through an HTTP proxy
//! (absolute-form), through CONNECT, or through SOCKS5; or a fresh tunnel per request
//! (setup rate); or many idle connections (memory per connection). Prints one JSON line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// GETs straight to the target.
    Direct,
    /// Absolute-form GETs through an HTTP proxy.
    Http,
    /// One CONNECT per connection, then GETs inside the tunnel.
    Connect,
    /// One SOCKS5 CONNECT per connection, then GETs inside the tunnel.
    Socks5,
    /// A new CONNECT tunnel for every request.
    ConnectSetup,
    /// A new SOCKS5 tunnel for every request.
    Socks5Setup,
    /// Open idle connections to the proxy and hold them.
    Idle,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for the ipsx side-by-side benchmarks")]
struct Args {
    #[arg(long, value_enum)]
    mode: Mode,
    /// The proxy (unused in direct mode).
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// The origin.
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of load (or of holding idle connections).
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Proxy username (HTTP Basic or RFC 1929); none when absent.
    #[arg(long)]
    user: Option<String>,
    /// Proxy password.
    #[arg(long)]
    pass: Option<String>,
}

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u32>,
    errors: u64,
}

fn main() {
    let args = Args::parse();
    let rt = ipsx_benches::current_thread_runtime();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    if args.mode == Mode::Idle {
        idle(&args, deadline).await;
        return;
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let a = Shared::from(&args);
        tasks.push(tokio::spawn(async move { a.worker(deadline).await }));
    }
    let mut all = Stats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            all.latencies_us.extend(s.latencies_us);
            all.errors += s.errors;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        if all.latencies_us.is_empty() {
            return 0;
        }
        let i = ((all.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        all.latencies_us[i.min(all.latencies_us.len() - 1)]
    };
    let line = serde_json::json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "requests": all.latencies_us.len(),
        "errors": all.errors,
        "rps": all.latencies_us.len() as f64 / elapsed,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
    });
    println!("{line}");
}

async fn idle(args: &Args, deadline: Instant) {
    let Some(proxy) = args.proxy else {
        eprintln!("--proxy is required");
        return;
    };
    let mut held = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        match TcpStream::connect(proxy).await {
            Ok(s) => held.push(s),
            Err(e) => {
                eprintln!("connect: {e}");
                break;
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({ "mode": "idle", "open": held.len() })
    );
    tokio::time::sleep_until(deadline.into()).await;
}

#[derive(Clone)]
struct Shared {
    mode: Mode,
    proxy: Option<SocketAddr>,
    target: SocketAddr,
    basic: Option<String>,
    user: Option<String>,
    pass: Option<String>,
}

impl From<&Args> for Shared {
    fn from(a: &Args) -> Self {
        let basic = a.user.as_ref().map(|u| {
            let raw = format!("{u}:{}", a.pass.clone().unwrap_or_default());
            base64::engine::general_purpose::STANDARD.encode(raw)
        });
        Self {
            mode: a.mode,
            proxy: a.proxy,
            target: a.target,
            basic,
            user: a.user.clone(),
            pass: a.pass.clone(),
        }
    }
}

impl Shared {
    fn request(&self, close: bool) -> Vec<u8> {
        let t = self.target;
        let conn = if close { "Connection: close\r\n" } else { "" };
        match self.mode {
            Mode::Http => {
                let auth = self
                    .basic
                    .as_ref()
                    .map(|b| format!("Proxy-Authorization: Basic {b}\r\n"))
                    .unwrap_or_default();
                format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\n{auth}{conn}\r\n").into_bytes()
            }
            _ => format!("GET / HTTP/1.1\r\nHost: {t}\r\n{conn}\r\n").into_bytes(),
        }
    }

    async fn open(&self) -> std::io::Result<TcpStream> {
        let to = match self.mode {
            Mode::Direct => self.target,
            _ => self
                .proxy
                .ok_or_else(|| std::io::Error::other("--proxy is required"))?,
        };
        let mut s = TcpStream::connect(to).await?;
        s.set_nodelay(true)?;
        match self.mode {
            Mode::Connect | Mode::ConnectSetup => {
                let auth = self
                    .basic
                    .as_ref()
                    .map(|b| format!("Proxy-Authorization: Basic {b}\r\n"))
                    .unwrap_or_default();
                let req = format!(
                    "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n",
                    self.target
                );
                s.write_all(req.as_bytes()).await?;
                let mut buf = Vec::with_capacity(256);
                read_head(&mut s, &mut buf).await?;
                if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
                    return Err(std::io::Error::other("CONNECT refused"));
                }
            }
            Mode::Socks5 | Mode::Socks5Setup => {
                let with_auth = self.user.is_some();
                s.write_all(if with_auth { &[5, 1, 2] } else { &[5, 1, 0] })
                    .await?;
                let mut m = [0u8; 2];
                s.read_exact(&mut m).await?;
                if with_auth {
                    let u = self.user.clone().unwrap_or_default();
                    let p = self.pass.clone().unwrap_or_default();
                    let mut a = vec![1u8, u.len() as u8];
                    a.extend_from_slice(u.as_bytes());
                    a.push(p.len() as u8);
                    a.extend_from_slice(p.as_bytes());
                    s.write_all(&a).await?;
                    s.read_exact(&mut m).await?;
                    if m[1] != 0 {
                        return Err(std::io::Error::other("SOCKS auth refused"));
                    }
                }
                let mut req = vec![5u8, 1, 0];
                match self.target {
                    SocketAddr::V4(a) => {
                        req.push(1);
                        req.extend_from_slice(&a.ip().octets());
                    }
                    SocketAddr::V6(a) => {
                        req.push(4);
                        req.extend_from_slice(&a.ip().octets());
                    }
                }
                req.extend_from_slice(&self.target.port().to_be_bytes());
                s.write_all(&req).await?;
                let mut reply = [0u8; 10];
                s.read_exact(&mut reply).await?;
                if reply[1] != 0 {
                    return Err(std::io::Error::other("SOCKS connect refused"));
                }
            }
            _ => {}
        }
        Ok(s)
    }

    async fn worker(self, deadline: Instant) -> Stats {
        let mut stats = Stats::default();
        let setup = matches!(self.mode, Mode::ConnectSetup | Mode::Socks5Setup);
        let request = self.request(setup);
        let mut buf = Vec::with_capacity(4096);
        let mut conn: Option<TcpStream> = None;
        while Instant::now() < deadline {
            let t0 = Instant::now();
            if conn.is_none() {
                match self.open().await {
                    Ok(s) => conn = Some(s),
                    Err(_) => {
                        stats.errors += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                }
            }
            let Some(s) = conn.as_mut() else { continue };
            let ok =
                s.write_all(&request).await.is_ok() && read_response(s, &mut buf).await.is_ok();
            if ok {
                stats
                    .latencies_us
                    .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
            } else {
                stats.errors += 1;
                conn = None;
            }
            if setup {
                conn = None;
            }
        }
        stats
    }
}

async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(end + 4);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let head_len = read_head(s, buf).await?;
    let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_len;
    let mut chunk = [0u8; 8192];
    while have < len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok(())
}
