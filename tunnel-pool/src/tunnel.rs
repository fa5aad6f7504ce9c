//! One WireGuard tunnel: boringtun's noise state machine over one UDP socket, feeding a
//! smoltcp [`Stack`] that owns the tunnel's inner address.
//!
//! A single driver task owns the `Tunn` and the socket; everything else talks to it
//! through the stack's mutex and notify (see [`crate::netstack`]). The driver loop:
//! wait for a datagram, a stream's poke, smoltcp's next deadline or the 250 ms timer
//! tick; then receive a bounded batch, run smoltcp once, encrypt and send what it
//! produced, and run WireGuard's timers. Nothing in the loop grows without bound: the
//! batch is capped, smoltcp's output is bounded by the TCP windows, and a full UDP send
//! buffer makes the driver wait, which stalls smoltcp, which fills the streams' send
//! buffers, which makes writers wait.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::TunnelError;
use crate::config::TunnelConfig;
use crate::dns::{self, DnsCache};
use crate::health::{Counters, HealthMonitor, HealthState, TunnelHealth};
use crate::nat::NatSocket;
use crate::netstack::{SCRATCH, Stack, StackStream};
use crate::udp::TunnelUdpSocket;

/// A TCP stream through a tunnel: `AsyncRead + AsyncWrite + Unpin + Send + 'static`.
pub type TunnelStream = StackStream;

/// WireGuard timer tick (boringtun wants 100-250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Longest wait for a TCP handshake through the tunnel.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams taken from the socket per loop turn before smoltcp runs.
const RX_BATCH: usize = 64;
/// DNS: per-attempt timeout and attempts per server.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const DNS_ATTEMPTS: usize = 2;
/// DNS: room for one query and one answer.
const DNS_BUFFER: usize = 4096;
/// Exit verification: largest response read.
const VERIFY_MAX: usize = 16 * 1024;

#[derive(Default)]
struct AtomicCounters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    datagrams_ok: AtomicU64,
    datagrams_invalid: AtomicU64,
    datagrams_foreign: AtomicU64,
    handshakes: AtomicU64,
    send_errors: AtomicU64,
    probes: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            datagrams_ok: g(&self.datagrams_ok),
            datagrams_invalid: g(&self.datagrams_invalid),
            datagrams_foreign: g(&self.datagrams_foreign),
            handshakes: g(&self.handshakes),
            send_errors: g(&self.send_errors),
            probes: g(&self.probes),
            udp_dropped: 0,
        }
    }
}

struct HealthCell {
    monitor: HealthMonitor,
    last_handshake: Option<Instant>,
}

/// State shared by the handle and the driver task.
struct Shared {
    stack: Arc<Stack>,
    cfg: TunnelConfig,
    counters: AtomicCounters,
    health: Mutex<HealthCell>,
    dns: Mutex<DnsCache>,
    local_addr: SocketAddr,
    nat_path: crate::nat::NatPath,
    public_endpoint: Option<SocketAddr>,
}

impl Shared {
    fn health(&self) -> std::sync::MutexGuard<'_, HealthCell> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Handle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Last clone gone: stop the driver and fail the remaining streams.
        let _ = self.stop.send(true);
        self.shared.stack.close();
    }
}

/// A live WireGuard tunnel to one exit. Cheap to clone; the last clone dropped (or
/// [`Tunnel::shutdown`]) stops it.
#[derive(Clone)]
pub struct Tunnel {
    h: Arc<Handle>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("endpoint", &self.h.shared.cfg.endpoint)
            .field("inner_addr", &self.h.shared.cfg.inner_addr)
            .finish_non_exhaustive()
    }
}

// === impl Tunnel ===

impl Tunnel {
    /// Binds a UDP socket (`0.0.0.0:0` or `[::]:0`, matching the endpoint), starts the
    /// driver and sends the first handshake initiation at once, so the tunnel is usually
    /// up before the first stream asks for it.
    pub async fn start(cfg: TunnelConfig) -> Result<Tunnel, TunnelError> {
        if !(576..=9000).contains(&cfg.mtu) {
            return Err(TunnelError::BadConfig {
                field: "mtu",
                reason: "must be within 576..=9000".into(),
            });
        }
        if cfg.endpoint.port() == 0 || cfg.endpoint.ip().is_unspecified() {
            return Err(TunnelError::BadConfig {
                field: "endpoint",
                reason: "needs an address and a non-zero port".into(),
            });
        }
        if let Err((field, reason)) = cfg.nat.validate() {
            return Err(TunnelError::BadConfig { field, reason });
        }
        let port = cfg.listen_port.unwrap_or(0);
        let bind: SocketAddr = if cfg.endpoint.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        };
        let udp = crate::netstack::bind_udp(bind, crate::netstack::UDP_SOCKET_BUFFER)
            .map_err(TunnelError::Bind)?;
        let local_addr = udp.local_addr().map_err(TunnelError::Bind)?;
        // Our public mapping (what an exit behind a NAT must send to), learned from
        // this socket; bounded by the NAT settings' timeout.
        let udp = NatSocket::discover(udp, cfg.nat.clone())
            .await
            .map_err(TunnelError::Bind)?;
        let nat_path = udp.path();
        let public_endpoint = udp.public_endpoint();
        let index = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
        // Boxed: `Tunn` is 11 KB and an async fn would otherwise carry it twice.
        let tunn = Box::new(Tunn::new(
            boringtun::x25519::StaticSecret::from(cfg.private_key.0),
            boringtun::x25519::PublicKey::from(cfg.peer_public_key),
            cfg.preshared_key.as_ref().map(|k| k.0),
            cfg.persistent_keepalive
                .map(|d| u16::try_from(d.as_secs()).unwrap_or(u16::MAX).max(1)),
            index,
            None,
        ));
        let mut addrs = vec![IpCidr::new(IpAddress::Ipv4(cfg.inner_addr), 32)];
        if let Some(v6) = cfg.inner_addr_v6 {
            addrs.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
        }
        let stack = Stack::new(&addrs, cfg.mtu, false);
        {
            let mut core = stack.lock();
            let _ = core
                .iface
                .routes_mut()
                .add_default_ipv4_route(cfg.inner_addr);
            if let Some(v6) = cfg.inner_addr_v6 {
                let _ = core.iface.routes_mut().add_default_ipv6_route(v6);
            }
        }
        let now = Instant::now();
        let shared = Arc::new(Shared {
            stack,
            counters: AtomicCounters::default(),
            health: Mutex::new(HealthCell {
                monitor: HealthMonitor::new(cfg.health.clone(), now),
                last_handshake: None,
            }),
            dns: Mutex::new(DnsCache::new(4096)),
            cfg,
            local_addr,
            nat_path,
            public_endpoint,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drive(shared.clone(), udp, tunn, stop_rx));
        Ok(Tunnel {
            h: Arc::new(Handle {
                shared,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The config this tunnel runs with.
    pub fn config(&self) -> &TunnelConfig {
        &self.h.shared.cfg
    }

    /// The local UDP address the tunnel sends from.
    pub fn local_addr(&self) -> SocketAddr {
        self.h.shared.local_addr
    }

    /// How the exit reaches this tunnel's socket (`direct`, `punched` behind a cone
    /// NAT, `relayed`), as NAT traversal found at start.
    pub fn nat_path(&self) -> crate::nat::NatPath {
        self.h.shared.nat_path
    }

    /// The endpoint to tell the exit (STUN mapping or TURN relayed address); `None`
    /// without NAT settings or when no server answered.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.h.shared.public_endpoint
    }

    /// Opens a TCP connection to `dst` through the tunnel (the exit dials it).
    pub async fn connect_tcp(&self, dst: SocketAddr) -> Result<TunnelStream, TunnelError> {
        let shared = &self.h.shared;
        if dst.is_ipv6() && shared.cfg.inner_addr_v6.is_none() {
            return Err(TunnelError::NoIpv6(dst));
        }
        if dst.port() == 0 || dst.ip().is_unspecified() {
            return Err(TunnelError::BadDestination(dst));
        }
        let handle = {
            let mut core = shared.stack.lock();
            if core.closed {
                return Err(TunnelError::Closed);
            }
            let port = core.ephemeral_port();
            let h = core.new_tcp_socket();
            let core = &mut *core;
            let sock = core.sockets.get_mut::<tcp::Socket>(h);
            if sock
                .connect(core.iface.context(), IpEndpoint::from(dst), port)
                .is_err()
            {
                core.sockets.remove(h);
                return Err(TunnelError::BadDestination(dst));
            }
            h
        };
        shared.stack.notify.notify_one();
        let mut stream = StackStream::new(shared.stack.clone(), handle);
        let t0 = Instant::now();
        match tokio::time::timeout(CONNECT_TIMEOUT, stream.established()).await {
            Ok(Ok(())) => {
                shared.health().monitor.on_rtt(t0.elapsed());
                Ok(stream)
            }
            Ok(Err(e)) => Err(TunnelError::Connect { dst, source: e }),
            Err(_) => {
                stream.abort();
                Err(TunnelError::ConnectTimeout(dst))
            }
        }
    }

    /// Opens a UDP socket on an ephemeral port of the tunnel's inner address:
    /// datagrams sent through it leave from the exit, answers come back to it.
    pub fn udp_socket(&self) -> Result<TunnelUdpSocket, TunnelError> {
        let shared = &self.h.shared;
        TunnelUdpSocket::bind(
            &shared.stack,
            shared.cfg.mtu,
            shared.cfg.inner_addr_v6.is_some(),
            crate::udp::UDP_BUFFER,
            crate::udp::UDP_PACKETS,
        )
    }

    /// Resolves `host` through the tunnel with the exit's DNS server (the config's `dns`
    /// list, tried in order), caching answers for their TTL. IP literals are returned
    /// as they are.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, TunnelError> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let name = dns::normalise_host(host)?;
        let shared = &self.h.shared;
        {
            let mut cache = shared.dns.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(addrs) = cache.get(&name, Instant::now()) {
                return if addrs.is_empty() {
                    Err(dns::DnsError::NotFound(name).into())
                } else {
                    Ok(addrs)
                };
            }
        }
        if shared.cfg.dns.is_empty() {
            return Err(TunnelError::NoDnsServer);
        }
        let mut qtypes = vec![dns::TYPE_A];
        if shared.cfg.inner_addr_v6.is_some() {
            qtypes.push(dns::TYPE_AAAA);
        }
        let mut last_err = TunnelError::DnsTimeout;
        for server in shared.cfg.dns.clone() {
            let mut addrs = Vec::new();
            let mut ttl = Duration::from_secs(3600);
            let mut ok = true;
            for &qtype in &qtypes {
                match self.query(server, &name, qtype).await {
                    Ok(ans) => {
                        ttl = ttl.min(ans.ttl);
                        addrs.extend(ans.addrs);
                    }
                    Err(e @ TunnelError::Dns(dns::DnsError::NotFound(_))) => {
                        let mut cache = shared.dns.lock().unwrap_or_else(PoisonError::into_inner);
                        cache.put(&name, Vec::new(), ttl, Instant::now());
                        return Err(e);
                    }
                    Err(e) => {
                        last_err = e;
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                let mut cache = shared.dns.lock().unwrap_or_else(PoisonError::into_inner);
                cache.put(&name, addrs.clone(), ttl, Instant::now());
                return if addrs.is_empty() {
                    Err(dns::DnsError::NotFound(name).into())
                } else {
                    Ok(addrs)
                };
            }
        }
        Err(last_err)
    }

    async fn query(
        &self,
        server: IpAddr,
        name: &str,
        qtype: u16,
    ) -> Result<dns::Answer, TunnelError> {
        let shared = &self.h.shared;
        if server.is_ipv6() && shared.cfg.inner_addr_v6.is_none() {
            return Err(TunnelError::NoIpv6(SocketAddr::new(server, 53)));
        }
        let sock = TunnelUdpSocket::bind(
            &shared.stack,
            shared.cfg.mtu,
            shared.cfg.inner_addr_v6.is_some(),
            DNS_BUFFER,
            4,
        )?;
        let server_ep = SocketAddr::new(server, 53);
        let mut buf = vec![0u8; DNS_BUFFER];
        for _ in 0..DNS_ATTEMPTS {
            let id = rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u16;
            let query = dns::build_query(id, name, qtype);
            // A full queue or an oversized query: this attempt is lost, like a datagram.
            let _ = tokio::time::timeout(DNS_TIMEOUT, sock.send_to(&query, server_ep)).await;
            let deadline = Instant::now() + DNS_TIMEOUT;
            loop {
                let got = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await;
                match got {
                    Err(_) => break, // this attempt timed out
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok((n, from))) => {
                        if from != server_ep || n > buf.len() {
                            continue;
                        }
                        match dns::parse_answer(&buf[..n], id, qtype, name) {
                            Err(dns::DnsError::Malformed("id mismatch")) => continue,
                            r => return r.map_err(TunnelError::from),
                        }
                    }
                }
            }
        }
        Err(TunnelError::DnsTimeout)
    }

    /// Fetches `url` (plain `http://`) through the tunnel and checks that the body names
    /// `expected` as the caller's address; a mismatch marks the tunnel unhealthy
    /// ([`HealthState::WrongExitAddress`]) until a later check passes.
    pub async fn verify_exit(&self, url: &str, expected: IpAddr) -> Result<(), TunnelError> {
        let seen = self.fetch_ip(url).await?;
        let ok = seen == expected;
        self.h.shared.health().monitor.on_exit_verified(ok);
        if ok {
            Ok(())
        } else {
            Err(TunnelError::ExitMismatch { expected, seen })
        }
    }

    async fn fetch_ip(&self, url: &str) -> Result<IpAddr, TunnelError> {
        let bad = |reason: &str| TunnelError::BadUrl {
            url: url.chars().take(200).collect(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => {
                (h, p.parse::<u16>().map_err(|_| bad("bad port"))?)
            }
            _ => (authority, 80),
        };
        if host.is_empty() || path.contains(['\r', '\n', ' ']) {
            return Err(bad("bad host or path"));
        }
        let ip = *self
            .resolve(host)
            .await?
            .first()
            .ok_or_else(|| bad("host has no address"))?;
        let mut s = self.connect_tcp(SocketAddr::new(ip, port)).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ipsx-tunnel-probe\r\nConnection: close\r\n\r\n"
        );
        let io = |e: io::Error| TunnelError::Probe(e.to_string());
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let buf = tokio::time::timeout(CONNECT_TIMEOUT, read_http_response(&mut s))
            .await
            .map_err(|_| TunnelError::Probe("timed out reading the answer".into()))?
            .map_err(io)?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| TunnelError::Probe("no HTTP header end".into()))?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(TunnelError::Probe(format!(
                "status line `{}`",
                head.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(80)
                    .collect::<String>()
            )));
        }
        body.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
            .find_map(|tok| tok.parse::<IpAddr>().ok())
            .ok_or_else(|| TunnelError::Probe("no IP address in the body".into()))
    }

    /// A snapshot of health and counters.
    pub fn health(&self) -> TunnelHealth {
        let shared = &self.h.shared;
        let now = Instant::now();
        let cell = shared.health();
        let state = cell.monitor.state(now);
        TunnelHealth {
            state,
            healthy: state == HealthState::Healthy,
            last_handshake_age: cell
                .last_handshake
                .map(|t| now.saturating_duration_since(t)),
            rtt_ewma: cell.monitor.rtt(),
            exit_verified: cell.monitor.exit_verified(),
            counters: Counters {
                udp_dropped: shared.stack.udp_dropped(),
                ..shared.counters.snapshot()
            },
        }
    }

    /// Stops the driver, resets every stream and waits for the task to end.
    pub async fn shutdown(&self) {
        let _ = self.h.stop.send(true);
        self.h.shared.stack.close();
        self.h.shared.health().monitor.on_closed();
        let task = self
            .h
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Reads one HTTP response (head, then `Content-Length` bytes or up to EOF), at most
/// [`VERIFY_MAX`] bytes.
async fn read_http_response(s: &mut TunnelStream) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > VERIFY_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too large",
            ));
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(len) = len {
                if len > VERIFY_MAX {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "answer too large",
                    ));
                }
                if buf.len() >= end + 4 + len {
                    buf.truncate(end + 4 + len);
                    return Ok(buf);
                }
            }
        }
    }
}

// === the driver ===

/// What one loop turn saw, applied to the health monitor once per turn.
#[derive(Default)]
struct Turn {
    rx_ok: bool,
    /// A handshake initiation went out (the only message a live exit answers at once).
    initiation_sent: bool,
    /// Data (not a keepalive) went out: only makes the next probe come sooner.
    data_sent: bool,
    handshake: bool,
    handshake_rtt: Option<Duration>,
}

/// WireGuard message types (first byte, little-endian u32).
const MSG_INIT: u8 = 1;
const MSG_RESPONSE: u8 = 2;
const MSG_DATA: u8 = 4;
/// A data message carrying nothing: a keepalive.
const KEEPALIVE_LEN: usize = 32;

async fn send_datagram(
    udp: &NatSocket,
    ep: SocketAddr,
    pkt: &[u8],
    shared: &Shared,
    turn: &mut Turn,
) {
    // Data does not start the dead clock (a live exit may never answer a trailing ACK,
    // see `crate::health`); it only brings the next probe forward.
    match pkt.first() {
        Some(&MSG_INIT) => turn.initiation_sent = true,
        Some(&MSG_DATA) if pkt.len() > KEEPALIVE_LEN => turn.data_sent = true,
        _ => {}
    }
    // Bounded retries: a full socket buffer makes us wait (backpressure), a real
    // error is counted and the packet dropped (TCP inside will retransmit).
    match udp.send_to(ep, pkt).await {
        Ok(n) => {
            shared
                .counters
                .bytes_sent
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(_) => {
            shared.counters.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn drive(
    shared: Arc<Shared>,
    udp: NatSocket,
    mut tunn: Box<Tunn>,
    mut stop: watch::Receiver<bool>,
) {
    let ep = shared.cfg.endpoint;
    let mut inbound: Vec<Vec<u8>> = Vec::new();
    let mut outbound: Vec<Vec<u8>> = Vec::new();
    let mut next_timer = Instant::now() + TIMER_TICK;
    let mut poll_delay: Option<Duration> = None;

    let mut turn = Turn::default();
    let mut nat_next = udp.service().await;
    let mut out_buf = SCRATCH.take();
    if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut out_buf.buf, false)
    {
        send_datagram(&udp, ep, p, &shared, &mut turn).await;
    }
    apply_turn(&shared, std::mem::take(&mut turn));
    drop(out_buf);

    loop {
        let now = Instant::now();
        let mut wake_at = next_timer;
        if let Some(d) = poll_delay {
            wake_at = wake_at.min(now + d);
        }
        tokio::select! {
            biased;
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
            r = udp.readable() => {
                if r.is_err() {
                    break;
                }
            }
            _ = shared.stack.notify.notified() => {}
            _ = tokio::time::sleep_until(wake_at.min(udp.instant_of(nat_next))) => {}
        }
        if udp.due(nat_next) {
            nat_next = udp.service().await;
        }

        // Scratch space for this turn only (given back before sleeping). Larger
        // datagrams than it holds are truncated and fail authentication.
        let mut rx_scratch = SCRATCH.take();
        let mut out_scratch = SCRATCH.take();
        let rx_buf = &mut rx_scratch.buf;
        let out_buf = &mut out_scratch.buf;

        // 1. A bounded batch of datagrams.
        for _ in 0..RX_BATCH {
            let (n, from) = match udp.try_recv_from(rx_buf) {
                Ok(Some(x)) => x,
                Ok(None) | Err(_) => break,
            };
            if from != ep {
                shared
                    .counters
                    .datagrams_foreign
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            shared
                .counters
                .bytes_received
                .fetch_add(n as u64, Ordering::Relaxed);
            let kind = rx_buf.first().copied();
            let res = tunn.decapsulate(Some(from.ip()), &rx_buf[..n], out_buf);
            match res {
                TunnResult::Err(e) => {
                    tracing::trace!(?e, "tunnel: datagram refused");
                    shared
                        .counters
                        .datagrams_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                TunnResult::WriteToNetwork(p) => {
                    // A cookie reply to the peer would be WriteToNetwork too, but a
                    // client never is under load; responses and inits mean a handshake.
                    if kind == Some(MSG_RESPONSE) || kind == Some(MSG_INIT) {
                        turn.handshake = true;
                        turn.handshake_rtt =
                            tunn.stats().4.map(|ms| Duration::from_millis(ms.into()));
                    }
                    send_datagram(&udp, ep, p, &shared, &mut turn).await;
                    // Packets queued while the handshake was pending.
                    for _ in 0..512 {
                        match tunn.decapsulate(None, &[], out_buf) {
                            TunnResult::WriteToNetwork(p) => {
                                send_datagram(&udp, ep, p, &shared, &mut turn).await
                            }
                            _ => break,
                        }
                    }
                }
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    inbound.push(p.to_vec());
                }
                TunnResult::Done => {}
            }
            turn.rx_ok = true;
            shared.counters.datagrams_ok.fetch_add(1, Ordering::Relaxed);
        }

        // 2. The TCP/IP stack.
        poll_delay = shared.stack.poll(&mut inbound, &mut outbound);

        // 3. Encrypt and send what it produced.
        for pkt in outbound.drain(..) {
            match tunn.encapsulate(&pkt, out_buf) {
                TunnResult::WriteToNetwork(p) => {
                    send_datagram(&udp, ep, p, &shared, &mut turn).await
                }
                TunnResult::Err(e) => {
                    tracing::debug!(?e, "tunnel: encapsulate failed");
                }
                _ => {} // queued until the handshake completes
            }
        }

        // 4. WireGuard timers, liveness probes.
        let now = Instant::now();
        if now >= next_timer {
            next_timer = now + TIMER_TICK;
            match tunn.update_timers(out_buf) {
                TunnResult::WriteToNetwork(p) => {
                    send_datagram(&udp, ep, p, &shared, &mut turn).await
                }
                TunnResult::Err(e) => tracing::trace!(?e, "tunnel: timers"),
                _ => {}
            }
            let probe = shared.health().monitor.should_probe(now);
            if probe {
                shared.counters.probes.fetch_add(1, Ordering::Relaxed);
                if let TunnResult::WriteToNetwork(p) =
                    tunn.format_handshake_initiation(out_buf, true)
                {
                    send_datagram(&udp, ep, p, &shared, &mut turn).await;
                }
            }
        }
        apply_turn(&shared, std::mem::take(&mut turn));
        drop(rx_scratch);
        drop(out_scratch);
        inbound.shrink_to(RX_BATCH);
        outbound.shrink_to(RX_BATCH);
    }
    shared.stack.close();
    shared.health().monitor.on_closed();
}

fn apply_turn(shared: &Shared, turn: Turn) {
    if !(turn.rx_ok || turn.initiation_sent || turn.data_sent || turn.handshake) {
        return;
    }
    let now = Instant::now();
    let mut cell = shared.health();
    if turn.handshake {
        shared.counters.handshakes.fetch_add(1, Ordering::Relaxed);
        cell.monitor.on_handshake(now);
        cell.last_handshake = Some(now);
        if let Some(rtt) = turn.handshake_rtt {
            cell.monitor.on_rtt(rtt);
        }
    }
    if turn.rx_ok {
        cell.monitor.on_receive(now);
    }
    if turn.data_sent {
        cell.monitor.on_data_sent(now);
    }
    if turn.initiation_sent {
        cell.monitor.on_initiation_sent(now);
    }
}
