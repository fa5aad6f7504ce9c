//! Test helpers: loopback targets, a tiny DNS server, an exit + tunnel pair.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub, missing_docs)]

pub mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipsx_provider::{Protocol, ProviderConfig, ProviderExit, ProviderHandle};
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// Echo server: writes back whatever it reads.
pub async fn echo_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// HTTP server answering every request with the caller's IP address (keep-alive).
pub async fn whoami_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = 0usize;
                loop {
                    let Ok(n) = s.read(&mut buf[have..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        let body = peer.ip().to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{}",
                            body.len(),
                            body
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Sink: reads everything, then writes the byte count as 8 bytes BE and closes.
pub async fn sink_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// A DNS server answering A queries for names in `records`, NXDOMAIN otherwise.
pub async fn dns_server(records: Vec<(&'static str, Ipv4Addr)>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // Question name: labels from byte 12.
            let mut i = 12;
            let mut name = String::new();
            while i < n && q[i] != 0 {
                let l = q[i] as usize;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(&q[i + 1..(i + 1 + l).min(n)]));
                i += 1 + l;
            }
            let qend = (i + 5).min(n);
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let mut r = q[..qend].to_vec();
            r[2] = 0x81;
            r[3] = 0x80;
            r[8..12].copy_from_slice(&[0, 0, 0, 0]);
            match records.iter().find(|(n, _)| *n == name) {
                Some((_, ip)) if qtype == 1 => {
                    r[6..8].copy_from_slice(&1u16.to_be_bytes());
                    r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                    r.extend_from_slice(&ip.octets());
                }
                Some(_) => r[6..8].copy_from_slice(&0u16.to_be_bytes()),
                None => {
                    r[3] = 0x83;
                    r[6..8].copy_from_slice(&0u16.to_be_bytes());
                }
            }
            let _ = sock.send_to(&r, from).await;
        }
    });
    addr
}

pub struct Pair {
    pub exit: ProviderHandle,
    pub tunnel: Tunnel,
    pub client_pub: [u8; 32],
}

/// A provider config on loopback leaving from `exit_ip`, allowing loopback targets.
pub fn exit_config(exit_ip: &str, allow: &[&str]) -> ProviderConfig {
    let key = SecretKey::generate();
    let mut cfg = ProviderConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        key.0,
        exit_ip.parse().unwrap(),
    );
    cfg.protocols = vec![Protocol::Any];
    cfg.allow_destinations = allow.iter().map(|s| s.to_string()).collect();
    cfg
}

/// Starts an exit from `cfg` and a tunnel to it (peer 10.77.0.2).
pub async fn pair(cfg: ProviderConfig) -> Pair {
    pair_with(cfg, |_| {}).await
}

/// As [`pair`], with `tune` applied to the tunnel's config before it starts.
pub async fn pair_with(cfg: ProviderConfig, tune: impl FnOnce(&mut TunnelConfig)) -> Pair {
    let exit = ProviderExit::start(cfg.clone()).await.unwrap();
    let client = SecretKey::generate();
    let client_pub = client.public_key();
    exit.add_peer(client_pub, "10.77.0.2".parse().unwrap())
        .await
        .unwrap();
    let mut tcfg = TunnelConfig::new(
        client,
        exit.public_key(),
        exit.local_addr(),
        Ipv4Addr::new(10, 77, 0, 2),
    );
    tcfg.dns = vec![IpAddr::V4(cfg.inner_address)];
    tune(&mut tcfg);
    let tunnel = Tunnel::start(tcfg).await.unwrap();
    Pair {
        exit,
        tunnel,
        client_pub,
    }
}

/// One HTTP GET over `s` (keep-alive), returning the body.
pub async fn get_body<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> String {
    s.write_all(b"GET /ip HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a full response");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            }
        }
    }
}
