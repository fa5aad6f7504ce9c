//! Test helpers: loopback targets, a tiny DNS server, an exit + tunnel pair.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub, missing_docs)]

pub mod natlab;
pub mod netns;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipsx_provider::{Protocol, ProviderConfig, ProviderExit, ProviderHandle};
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// A TCP server on `bind` running `conn` for each connection (in its own task).
pub async fn serve_each<F, Fut>(bind: &str, conn: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(conn(s));
        }
    });
    addr
}

/// Echo server: writes back whatever it reads.
pub async fn echo_server(bind: &str) -> SocketAddr {
    serve_each(bind, |mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
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

/// A bare WireGuard peer (boringtun, no TCP stack) that puts hand-made IP packets into
/// a tunnel to an exit: the flood tests' requester. Answers from the exit are ignored.
pub struct RawPeer {
    tunn: ipsx_tunnel_pool::boringtun::noise::Tunn,
    udp: UdpSocket,
    pub public: [u8; 32],
    pub inner: Ipv4Addr,
    buf: Vec<u8>,
}

impl RawPeer {
    /// Adds a fresh key as a peer of `exit` (inner address `inner`) and completes a
    /// handshake with it.
    pub async fn connect(exit: &ProviderHandle, inner: Ipv4Addr) -> Self {
        use ipsx_tunnel_pool::boringtun::noise::{Tunn, TunnResult};
        use ipsx_tunnel_pool::boringtun::x25519;
        let key = SecretKey::generate();
        let public = key.public_key();
        exit.add_peer(public, IpAddr::V4(inner)).await.unwrap();
        let mut tunn = Tunn::new(
            x25519::StaticSecret::from(key.0),
            x25519::PublicKey::from(exit.public_key()),
            None,
            None,
            rand_index(),
            None,
        );
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.connect(exit.local_addr()).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let mut rx = vec![0u8; 2048];
        for _ in 0..10 {
            if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true)
            {
                udp.send(p).await.unwrap();
            }
            let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), udp.recv(&mut rx)).await
            else {
                continue;
            };
            if let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &rx[..n], &mut buf) {
                udp.send(p).await.unwrap();
                return Self {
                    tunn,
                    udp,
                    public,
                    inner,
                    buf,
                };
            }
        }
        panic!("no handshake with the exit");
    }

    /// Encrypts one IP packet and sends it to the exit.
    pub async fn send_ip(&mut self, pkt: &[u8]) {
        if let Some(d) = self.seal_ip(pkt) {
            let _ = self.udp.send(&d).await;
        }
    }

    /// Encrypts one IP packet into the datagram that carries it, without sending it: a
    /// flood can be sealed in advance so that its encryption does not share the CPU with
    /// the exit while it is measured (a real attacker encrypts on its own machine).
    pub fn seal_ip(&mut self, pkt: &[u8]) -> Option<Vec<u8>> {
        use ipsx_tunnel_pool::boringtun::noise::TunnResult;
        match self.tunn.encapsulate(pkt, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
            _ => None,
        }
    }

    /// Sends a datagram sealed by [`RawPeer::seal_ip`].
    pub async fn send_sealed(&self, datagram: &[u8]) {
        let _ = self.udp.send(datagram).await;
    }

    /// The next IP packet the exit sends into the tunnel (handshake and keepalive
    /// datagrams skipped), or `None` if none comes within `wait`.
    pub async fn recv_ip(&mut self, wait: std::time::Duration) -> Option<Vec<u8>> {
        use ipsx_tunnel_pool::boringtun::noise::TunnResult;
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = vec![0u8; 65536];
        for _ in 0..10_000 {
            let n = tokio::time::timeout_at(deadline, self.udp.recv(&mut rx))
                .await
                .ok()?
                .ok()?;
            match self.tunn.decapsulate(None, &rx[..n], &mut self.buf) {
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    return Some(p.to_vec());
                }
                TunnResult::WriteToNetwork(p) => {
                    let _ = self.udp.send(p).await;
                }
                _ => {}
            }
        }
        None
    }

    /// Discards whatever the exit sent back (RSTs, SYN-ACKs), so the socket's buffer
    /// does not fill.
    pub fn drain(&self) {
        let mut b = [0u8; 2048];
        for _ in 0..100_000 {
            if self.udp.try_recv(&mut b).is_err() {
                break;
            }
        }
    }
}

fn rand_index() -> u32 {
    let k = SecretKey::generate();
    u32::from_le_bytes([k.0[0], k.0[1], k.0[2], 0])
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// An IPv4 TCP SYN `src:sport -> dst` with valid checksums.
pub fn tcp_syn(src: Ipv4Addr, sport: u16, dst: std::net::SocketAddrV4) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&(u32::from(sport) * 7919).to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = sum16(0, &src.octets());
    pseudo = sum16(pseudo, &dst.ip().octets());
    pseudo += 6 + 20;
    let ck = fold(sum16(pseudo, &tcp));
    tcp[16..18].copy_from_slice(&ck.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.ip().octets());
    let hck = fold(sum16(0, &ip));
    ip[10..12].copy_from_slice(&hck.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// Resident memory of this process, bytes (Linux), or 0.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// A server that writes `n` bytes (a counter pattern) to each connection, then closes.
pub async fn source_server(bind: &str, n: usize) -> SocketAddr {
    serve_each(bind, move |mut s| async move {
        let chunk: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < n {
            let k = chunk.len().min(n - sent);
            if s.write_all(&chunk[..k]).await.is_err() {
                return;
            }
            sent += k;
        }
        let _ = s.shutdown().await;
    })
    .await
}
