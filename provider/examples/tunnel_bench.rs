//! Side-by-side tunnel benchmark driver, used by `benches/tunnel/run.sh`.
//!
//! Modes (each prints `key value` lines):
//! - `targets IP`: whoami / sink / source servers on `IP:0`; prints their ports, runs.
//! - `load WHO SINK SOURCE SECS`: plain TCP load against those targets (direct, or
//!   through a kernel route such as a wireguard-go pair).
//! - `ours SECS`: our exit + our tunnel in this process, the same load through it, plus
//!   cold first byte and RSS during a 10 s upload.
//! - `exit PEER_PUB INNER_IP`: only our exit, with one peer (for onetun); prints
//!   `port` and `pubkey`, runs.
//! - `idle N`: N idle tunnels (handshake done) to an exit in a child process; RSS per
//!   tunnel.
#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipsx_provider::{Protocol, ProviderConfig, ProviderExit};
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig, key_to_base64};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Conn = Pin<Box<dyn AsyncReadWrite>>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}
type Dialer = Arc<dyn Fn(SocketAddr) -> Pin<Box<dyn Future<Output = Conn> + Send>> + Send + Sync>;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn targets(ip: IpAddr) -> (SocketAddr, SocketAddr, SocketAddr) {
    let who = TcpListener::bind((ip, 0)).await.unwrap();
    let sink = TcpListener::bind((ip, 0)).await.unwrap();
    let source = TcpListener::bind((ip, 0)).await.unwrap();
    let addrs = (
        who.local_addr().unwrap(),
        sink.local_addr().unwrap(),
        source.local_addr().unwrap(),
    );
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = who.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let body = peer.ip().to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = source.accept().await {
            tokio::spawn(async move {
                let mut n = [0u8; 8];
                if s.read_exact(&mut n).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(n);
                let chunk = vec![0x42u8; 256 * 1024];
                while left > 0 {
                    let k = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addrs
}

async fn get(s: &mut Conn, buf: &mut [u8]) -> bool {
    if s.write_all(b"GET /ip HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut have = 0;
    loop {
        let Ok(n) = s.read(&mut buf[have..]).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        have += n;
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if have >= end + 4 + len {
                return true;
            }
        }
    }
}

async fn load(dial: Dialer, who: SocketAddr, sink: SocketAddr, source: SocketAddr, secs: u64) {
    // First byte on a fresh connection.
    let t0 = Instant::now();
    let mut c = dial(who).await;
    let mut buf = vec![0u8; 4096];
    assert!(get(&mut c, &mut buf).await);
    println!("first_byte_ms {:.3}", t0.elapsed().as_secs_f64() * 1e3);
    drop(c);

    // Keep-alive small requests, 4 connections.
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..4 {
        let (dial, count) = (dial.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = dial(who).await;
            let mut buf = vec![0u8; 4096];
            while Instant::now() < deadline {
                if !get(&mut c, &mut buf).await {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "req_s {:.0}",
        count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
    );

    // Bulk upload for `secs`.
    let mut c = dial(sink).await;
    let chunk = vec![0x17u8; 64 * 1024];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    while Instant::now() < deadline {
        c.write_all(&chunk).await.unwrap();
    }
    c.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    c.read_exact(&mut n).await.unwrap();
    println!(
        "up_mb_s {:.1}",
        u64::from_be_bytes(n) as f64 / 1e6 / start.elapsed().as_secs_f64()
    );

    // Bulk download of a size that takes about `secs` at ~100 MB/s, at most.
    let want: u64 = 100_000_000 * secs;
    let mut c = dial(source).await;
    let start = Instant::now();
    c.write_all(&want.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let deadline = start + Duration::from_secs(secs);
    while got < want && Instant::now() < deadline {
        let n = c.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    println!(
        "down_mb_s {:.1}",
        got as f64 / 1e6 / start.elapsed().as_secs_f64()
    );
}

fn tcp_dialer() -> Dialer {
    Arc::new(|a| {
        Box::pin(async move {
            let s = TcpStream::connect(a).await.unwrap();
            s.set_nodelay(true).unwrap();
            Box::pin(s) as Conn
        })
    })
}

fn tunnel_dialer(t: Tunnel) -> Dialer {
    Arc::new(move |a| {
        let t = t.clone();
        Box::pin(async move { Box::pin(t.connect_tcp(a).await.unwrap()) as Conn })
    })
}

fn exit_cfg(exit_ip: &str) -> ProviderConfig {
    let mut cfg = ProviderConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        SecretKey::generate().0,
        exit_ip.parse().unwrap(),
    );
    cfg.protocols = vec![Protocol::Any];
    cfg.allow_destinations = vec!["127.0.0.0/8".into()];
    cfg
}

fn derive_key(i: u32) -> SecretKey {
    let mut k = [0u8; 32];
    k[1..5].copy_from_slice(&i.to_le_bytes());
    k[5] = 0x5a;
    SecretKey(k)
}

fn inner_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 2)) + i)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    match mode {
        "targets" => {
            let (w, s, so) = targets(args[2].parse().unwrap()).await;
            println!("{} {} {}", w.port(), s.port(), so.port());
            std::future::pending::<()>().await;
        }
        "load" => {
            let p = |i: usize| args[i].parse::<SocketAddr>().unwrap();
            load(tcp_dialer(), p(2), p(3), p(4), args[5].parse().unwrap()).await;
        }
        "ours" => {
            let secs: u64 = args[2].parse().unwrap();
            let (who, sink, source) = targets("127.0.0.1".parse().unwrap()).await;
            let exit = ProviderExit::start(exit_cfg("127.0.0.2")).await.unwrap();
            let client = SecretKey::generate();
            exit.add_peer(client.public_key(), "10.77.0.2".parse().unwrap())
                .await
                .unwrap();
            let cfg = TunnelConfig::new(
                client,
                exit.public_key(),
                exit.local_addr(),
                Ipv4Addr::new(10, 77, 0, 2),
            );
            // Cold first byte: tunnel start (handshake) + connect + one GET.
            let t0 = Instant::now();
            let t = Tunnel::start(cfg).await.unwrap();
            let mut c: Conn = Box::pin(t.connect_tcp(who).await.unwrap());
            let mut buf = vec![0u8; 4096];
            assert!(get(&mut c, &mut buf).await);
            println!("cold_first_byte_ms {:.3}", t0.elapsed().as_secs_f64() * 1e3);
            drop(c);
            load(tunnel_dialer(t.clone()), who, sink, source, secs).await;
            // RSS during a 10 s upload.
            let mut c = t.connect_tcp(sink).await.unwrap();
            let chunk = vec![0x17u8; 64 * 1024];
            let start = Instant::now();
            let mut samples = Vec::new();
            let mut next = start;
            while start.elapsed() < Duration::from_secs(10) {
                c.write_all(&chunk).await.unwrap();
                if Instant::now() >= next {
                    samples.push(rss_kb());
                    next += Duration::from_millis(500);
                }
            }
            c.shutdown().await.unwrap();
            let _ = c.read(&mut [0u8; 8]).await;
            let first = samples.get(1).copied().unwrap_or(0);
            println!("upload_rss_kb_start {first}");
            println!("upload_rss_kb_max {}", samples.iter().max().unwrap_or(&0));
            println!("upload_rss_kb_end {}", samples.last().unwrap_or(&0));
        }
        "exit" => {
            let peer = ipsx_tunnel_pool::parse_key("peer", &args[2]).unwrap();
            let exit = ProviderExit::start(exit_cfg("127.0.0.2")).await.unwrap();
            exit.add_peer(peer, args[3].parse().unwrap()).await.unwrap();
            println!(
                "{} {}",
                exit.local_addr().port(),
                key_to_base64(&exit.public_key())
            );
            std::future::pending::<()>().await;
        }
        "idle-exit" => {
            let n: u32 = args[2].parse().unwrap();
            let exit = ProviderExit::start(exit_cfg("127.0.0.2")).await.unwrap();
            for i in 0..n {
                exit.add_peer(derive_key(i).public_key(), IpAddr::V4(inner_ip(i)))
                    .await
                    .unwrap();
            }
            println!(
                "{} {}",
                exit.local_addr().port(),
                key_to_base64(&exit.public_key())
            );
            std::future::pending::<()>().await;
        }
        "idle" => {
            let n: u32 = args[2].parse().unwrap();
            let mut child = tokio::process::Command::new(&args[0])
                .args(["idle-exit", &n.to_string()])
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
                .await
                .unwrap();
            let mut it = line.split_whitespace();
            let port: u16 = it.next().unwrap().parse().unwrap();
            let exit_pub = ipsx_tunnel_pool::parse_key("exit", it.next().unwrap()).unwrap();
            let ep = SocketAddr::from(([127, 0, 0, 1], port));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = rss_kb();
            let mut tunnels = Vec::new();
            for i in 0..n {
                let cfg = TunnelConfig::new(derive_key(i), exit_pub, ep, inner_ip(i));
                tunnels.push(Tunnel::start(cfg).await.unwrap());
            }
            // Bounded wait for every handshake.
            for _ in 0..200 {
                if tunnels.iter().all(|t| t.health().counters.handshakes > 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let up = tunnels
                .iter()
                .filter(|t| t.health().counters.handshakes > 0)
                .count();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss_kb();
            println!("idle_tunnels_up {up}");
            println!(
                "idle_rss_kb_per_tunnel {:.2}",
                (after.saturating_sub(before)) as f64 / f64::from(n)
            );
            drop(child);
        }
        _ => {
            eprintln!(
                "usage: tunnel_bench targets IP | load WHO SINK SOURCE SECS | ours SECS | exit PEER_PUB INNER_IP | idle N"
            );
            std::process::exit(2);
        }
    }
}
