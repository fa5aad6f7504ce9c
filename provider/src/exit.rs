//! The exit: one UDP port, many WireGuard peers, each peer's TCP flows terminated in a
//! userspace stack and relayed to real sockets bound to the exit address.
//!
//! One driver task owns the UDP socket and hands each datagram to its peer's task (by
//! the receiver index on the wire; handshake initiations after the DH names the peer);
//! each peer's task owns its `Tunn` and its smoltcp stack, so a heavy peer delays only
//! itself. For each decrypted IP packet the peer's task checks the source (the peer's
//! inner address only), and for a TCP SYN to a new destination it applies the egress
//! policy and the limits and, if both allow, adds a listening socket for exactly that
//! destination to the peer's smoltcp stack (any-IP mode) and spawns a relay task. A
//! refused SYN is answered with a RST built outside the stack (`packet::rst_for_syn`):
//! the client fails fast and no byte reaches the destination. UDP to port 53 is
//! forwarded to the configured resolver; other UDP is relayed from the exit address,
//! one host socket per flow ([`crate::udp`], runtime in `udp_relay.rs`), under the same
//! policy and limits as TCP; ICMP echo requests to the exit's inner address are
//! answered; other ICMP and other protocols are dropped and counted.
//!
//! Load is bounded per requester ([`crate::limits`]): datagrams wait in bounded
//! per-peer queues, a SYN over the peer's SYN backlog, flow cap or flow rate or the
//! exit's flow cap gets a RST (at most 200 a second per peer; a peer refused more is
//! flooding and gets only a share of its datagrams decrypted for a while), a handshake
//! not done within `half_open_timeout` is reset, each relay resets its flow after
//! `idle_timeout` without a byte, and a deal's bytes per second can be capped.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipsx_tunnel_pool::boringtun::noise::handshake::parse_handshake_anon;
use ipsx_tunnel_pool::boringtun::noise::rate_limiter::RateLimiter;
use ipsx_tunnel_pool::boringtun::noise::{Packet, Tunn, TunnResult};
use ipsx_tunnel_pool::boringtun::x25519;
use ipsx_tunnel_pool::netstack::{Stack, StackStream};
use ipsx_tunnel_pool::smoltcp::iface::SocketHandle;
use ipsx_tunnel_pool::smoltcp::socket::tcp;
use ipsx_tunnel_pool::smoltcp::wire::{IpAddress, IpCidr, IpListenEndpoint};
use ipsx_tunnel_pool::{NatPath, NatSocket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::ProviderError;
use crate::config::ProviderConfig;
use crate::limits::{FloodGate, FlowLimiter, LimitRefusal, RELAY_BUFFER, TokenBucket};
use crate::meter::{LogEntry, MeterSnapshot, PeerMeter};
use crate::packet::{self, Transport};
use crate::policy::{EgressPolicy, discover_own_addresses};

#[path = "udp_relay.rs"]
mod udp_relay;

const TIMER_TICK: Duration = Duration::from_millis(250);
/// How often the driver brings the kernel filter of flooding peers up to date.
const FILTER_TICK: Duration = Duration::from_millis(50);
/// Datagrams the driver reads from the socket (and hands to the peers) in one turn; it
/// yields to the peers' tasks between turns.
const RX_READ: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
/// Concurrent DNS forwards per exit; more are dropped (the client retries).
const DNS_MAX_INFLIGHT: u64 = 256;
/// Peers are found by the top 24 bits of the receiver index boringtun puts on the wire.
const INDEX_SHIFT: u32 = 8;

/// Exit-wide counters.
#[derive(Debug, Default)]
struct AtomicCounters {
    datagrams_invalid: AtomicU64,
    unknown_peer: AtomicU64,
    cookies_sent: AtomicU64,
    handshakes: AtomicU64,
    handshake_dh: AtomicU64,
    spoofed_source: AtomicU64,
    refused: AtomicU64,
    dropped_other: AtomicU64,
    dns_forwarded: AtomicU64,
    dns_inflight: AtomicU64,
    flows: AtomicU64,
    limited: AtomicU64,
    rate_limited: AtomicU64,
    idle_closed: AtomicU64,
    datagrams_shed: AtomicU64,
    udp_flows: AtomicU64,
    udp_datagrams_up: AtomicU64,
    udp_datagrams_down: AtomicU64,
    udp_dropped: AtomicU64,
    icmp_echo: AtomicU64,
    resets_suppressed: AtomicU64,
    datagrams_gated: AtomicU64,
    peers_filtered: AtomicU64,
}

/// A snapshot of the exit-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitCounters {
    /// Datagrams refused by WireGuard (garbage, bad MAC, replay, wrong size).
    pub datagrams_invalid: u64,
    /// Authenticated-looking datagrams for no known peer.
    pub unknown_peer: u64,
    /// Cookie replies sent (handshake flood defence).
    pub cookies_sent: u64,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Handshake initiations that cost a Diffie-Hellman (bounded by the rate limit).
    pub handshake_dh: u64,
    /// Inner packets whose source was not the peer's address.
    pub spoofed_source: u64,
    /// Flows refused by the egress policy.
    pub refused: u64,
    /// Inner packets of other protocols (ICMP but echo to the exit, fragments ...) dropped.
    pub dropped_other: u64,
    /// DNS queries forwarded.
    pub dns_forwarded: u64,
    /// Flows relayed.
    pub flows: u64,
    /// Relayed flows open now (all peers).
    pub flows_live: u64,
    /// SYNs refused (RST) by `max_flows_per_peer`, `max_flows_total` or
    /// `max_half_open_per_peer`.
    pub limited: u64,
    /// SYNs refused (RST) by `new_flows_per_second`.
    pub rate_limited: u64,
    /// Relayed flows reset after `idle_timeout` without a byte.
    pub idle_closed: u64,
    /// Datagrams dropped because their peer's queue (`peer_queue`) was full.
    pub datagrams_shed: u64,
    /// UDP flows relayed (each one host socket; also in `flows_live` while open).
    pub udp_flows: u64,
    /// UDP datagrams relayed from peers to destinations.
    pub udp_datagrams_up: u64,
    /// UDP datagrams relayed from destinations back into the tunnels.
    pub udp_datagrams_down: u64,
    /// UDP datagrams dropped: bad checksum, port 0, socket buffer full, a reply too
    /// big for the tunnel MTU, over the deal's bandwidth cap.
    pub udp_dropped: u64,
    /// ICMP echo requests to the exit's inner address answered.
    pub icmp_echo: u64,
    /// Refused SYNs dropped without a RST: the peer had used its RSTs of the second
    /// (`new_flows_per_second` of them).
    pub resets_suppressed: u64,
    /// Datagrams of flooding peers dropped before decryption ([`crate::limits::FloodGate`]).
    pub datagrams_gated: u64,
    /// Flooding peers whose data datagrams the kernel thins before they are queued (a
    /// socket filter, [`ipsx_tunnel_pool::flood_filter`]); the kernel's drops are not
    /// counted.
    pub peers_filtered: u64,
}

impl AtomicCounters {
    fn snapshot(&self) -> ExitCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExitCounters {
            datagrams_invalid: g(&self.datagrams_invalid),
            unknown_peer: g(&self.unknown_peer),
            cookies_sent: g(&self.cookies_sent),
            handshakes: g(&self.handshakes),
            handshake_dh: g(&self.handshake_dh),
            spoofed_source: g(&self.spoofed_source),
            refused: g(&self.refused),
            dropped_other: g(&self.dropped_other),
            dns_forwarded: g(&self.dns_forwarded),
            flows: g(&self.flows),
            flows_live: 0,
            limited: g(&self.limited),
            rate_limited: g(&self.rate_limited),
            idle_closed: g(&self.idle_closed),
            datagrams_shed: g(&self.datagrams_shed),
            udp_flows: g(&self.udp_flows),
            udp_datagrams_up: g(&self.udp_datagrams_up),
            udp_datagrams_down: g(&self.udp_datagrams_down),
            udp_dropped: g(&self.udp_dropped),
            icmp_echo: g(&self.icmp_echo),
            resets_suppressed: g(&self.resets_suppressed),
            datagrams_gated: g(&self.datagrams_gated),
            peers_filtered: g(&self.peers_filtered),
        }
    }
}

enum Command {
    Add {
        key: [u8; 32],
        inner_ip: IpAddr,
        endpoint: Option<SocketAddr>,
        reply: oneshot::Sender<Result<(), ProviderError>>,
    },
    Remove {
        key: [u8; 32],
        reply: oneshot::Sender<bool>,
    },
    Endpoint {
        key: [u8; 32],
        endpoint: SocketAddr,
        reply: oneshot::Sender<bool>,
    },
}

/// What the handle and the relays share.
struct Shared {
    cfg: ProviderConfig,
    policy: EgressPolicy,
    counters: AtomicCounters,
    meters: Mutex<HashMap<[u8; 32], Arc<PeerMeter>>>,
    flow_limiter: Mutex<FlowLimiter<[u8; 32]>>,
    epoch: Instant,
    local_addr: SocketAddr,
    public_key: [u8; 32],
    nat_path: NatPath,
    public_endpoint: Option<SocketAddr>,
    /// The UDP flows and their sockets.
    udp: Mutex<udp_relay::UdpState>,
    /// The address relayed flows and DNS forwards are bound to: the exit address when
    /// it is local, else unspecified (see [`source_address`]).
    source_ip: IpAddr,
}

/// A running exit. Dropping the last clone stops it.
#[derive(Clone)]
pub struct ProviderHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<Shared>,
    cmd: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl std::fmt::Debug for ProviderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderHandle")
            .field("local_addr", &self.inner.shared.local_addr)
            .finish_non_exhaustive()
    }
}

/// Starts exits.
#[derive(Debug)]
pub struct ProviderExit;

impl ProviderExit {
    /// Validates `cfg`, binds the UDP socket and starts serving its peers.
    pub async fn start(cfg: ProviderConfig) -> Result<ProviderHandle, ProviderError> {
        cfg.validate()?;
        let udp = ipsx_tunnel_pool::netstack::bind_udp(
            cfg.listen,
            4 * ipsx_tunnel_pool::netstack::UDP_SOCKET_BUFFER,
        )
        .map_err(|e| ProviderError::Bind {
            addr: cfg.listen,
            source: e,
        })?;
        let local_addr = udp.local_addr().map_err(|e| ProviderError::Bind {
            addr: cfg.listen,
            source: e,
        })?;
        // Learn the public mapping (and relay, behind a symmetric NAT) from the
        // WireGuard socket itself, before any peer is served.
        let settings = cfg
            .nat
            .settings()
            .map_err(|(key, reason)| ProviderError::Config {
                key: format!("nat.{key}"),
                reason,
            })?;
        let udp = NatSocket::discover(udp, settings)
            .await
            .map_err(|e| ProviderError::Bind {
                addr: cfg.listen,
                source: e,
            })?;
        let nat_path = udp.path();
        let public_endpoint = udp.public_endpoint();
        if let Some(e) = udp.turn_error() {
            tracing::warn!(error = %e, "exit: TURN relay unavailable");
        }
        let mut own = cfg.own_addresses.clone();
        own.extend(discover_own_addresses());
        if !local_addr.ip().is_unspecified() {
            own.push(local_addr.ip());
        }
        own.push(IpAddr::V4(cfg.inner_address));
        let policy = EgressPolicy::new(
            cfg.protocols.clone(),
            cfg.allow_list()?,
            own,
            cfg.exit_address,
        );
        let source_ip = source_address(cfg.exit_address);
        let secret = x25519::StaticSecret::from(cfg.private_key.0);
        let public = x25519::PublicKey::from(&secret);
        let shared = Arc::new(Shared {
            policy,
            counters: AtomicCounters::default(),
            meters: Mutex::new(HashMap::new()),
            flow_limiter: Mutex::new(FlowLimiter::new(cfg.limits)),
            epoch: Instant::now(),
            local_addr,
            public_key: public.to_bytes(),
            nat_path,
            public_endpoint,
            udp: udp_relay::UdpState::new(crate::udp::udp_idle(cfg.limits.idle_timeout)),
            source_ip,
            cfg,
        });
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let limiter = Arc::new(RateLimiter::new(&public, shared.cfg.handshake_rate_limit));
        let mut driver = Driver {
            shared: shared.clone(),
            udp: Arc::new(udp),
            secret,
            public,
            limiter,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            next_index: rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> INDEX_SHIFT,
            filtered: Vec::new(),
            filter_failed: false,
        };
        for p in shared.cfg.peers.clone() {
            driver.add_peer(p.public_key.0, p.inner_ip, p.endpoint)?;
        }
        let task = tokio::spawn(driver.run(cmd_rx, stop_rx));
        Ok(ProviderHandle {
            inner: Arc::new(HandleInner {
                shared,
                cmd: cmd_tx,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// Where flows leave from: `exit_address` when a socket of this host can bind it.
/// Behind a NAT the offer sells the router's public address, which is not local: flows
/// then leave from the route's source address (unspecified bind) and the NAT maps them
/// to the public one, which the requester verifies through the tunnel.
fn source_address(exit_address: IpAddr) -> IpAddr {
    match std::net::UdpSocket::bind(SocketAddr::new(exit_address, 0)) {
        Ok(_) => exit_address,
        Err(e) => {
            tracing::warn!(
                %exit_address, error = %e,
                "exit_address is not an address of this host (behind a NAT?): flows leave \
                 from the route's source address"
            );
            match exit_address {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            }
        }
    }
}

// === impl ProviderHandle ===

impl ProviderHandle {
    /// The UDP address the exit listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.shared.local_addr
    }

    /// The exit's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.inner.shared.public_key
    }

    /// How requesters reach this exit: `direct` (its own address), `punched` (a cone
    /// NAT's mapping, learned by STUN) or `relayed` (a TURN allocation).
    pub fn nat_path(&self) -> NatPath {
        self.inner.shared.nat_path
    }

    /// The endpoint NAT traversal found to advertise (TURN relayed address or STUN
    /// mapping); `None` without traversal.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.inner.shared.public_endpoint
    }

    /// Accepts a requester's key (a new deal); its packets must come from `inner_ip`.
    pub async fn add_peer(
        &self,
        public_key: [u8; 32],
        inner_ip: IpAddr,
    ) -> Result<(), ProviderError> {
        self.add_peer_at(public_key, inner_ip, None).await
    }

    /// As [`ProviderHandle::add_peer`], with the requester's public endpoint when known:
    /// the exit sends the first handshake there (opening its own NAT, punching through
    /// the requester's) and lets it through the TURN relay when relaying.
    pub async fn add_peer_at(
        &self,
        public_key: [u8; 32],
        inner_ip: IpAddr,
        endpoint: Option<SocketAddr>,
    ) -> Result<(), ProviderError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Command::Add {
                key: public_key,
                inner_ip,
                endpoint,
                reply,
            })
            .await
            .map_err(|_| ProviderError::Stopped)?;
        rx.await.map_err(|_| ProviderError::Stopped)?
    }

    /// Points a served requester at a new public endpoint (it reported one after it
    /// was added) and sends it a handshake; false when the key is not served.
    pub async fn set_peer_endpoint(&self, public_key: &[u8; 32], endpoint: SocketAddr) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .cmd
            .send(Command::Endpoint {
                key: *public_key,
                endpoint,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Stops serving a requester at once (its flows are reset). Its meter and log stay
    /// readable for settlement.
    pub async fn remove_peer(&self, public_key: &[u8; 32]) -> bool {
        let (reply, rx) = oneshot::channel();
        if self
            .inner
            .cmd
            .send(Command::Remove {
                key: *public_key,
                reply,
            })
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    fn meter_of(&self, key: &[u8; 32]) -> Option<Arc<PeerMeter>> {
        self.inner
            .shared
            .meters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// A peer's live meter (to bind its connection log to a deal).
    pub fn peer_meter(&self, public_key: &[u8; 32]) -> Option<Arc<PeerMeter>> {
        self.meter_of(public_key)
    }

    /// A peer's meter (bytes, active seconds, flows, refusals).
    pub fn meter(&self, public_key: &[u8; 32]) -> Option<MeterSnapshot> {
        self.meter_of(public_key).map(|m| m.snapshot())
    }

    /// The head of a peer's connection-log hash chain (what settlement records).
    pub fn log_hash(&self, public_key: &[u8; 32]) -> Option<[u8; 32]> {
        self.meter_of(public_key).map(|m| m.log_hash())
    }

    /// A peer's kept connection log, oldest first.
    pub fn log(&self, public_key: &[u8; 32]) -> Option<Vec<LogEntry>> {
        self.meter_of(public_key).map(|m| m.log())
    }

    /// Exit-wide counters.
    pub fn counters(&self) -> ExitCounters {
        let mut c = self.inner.shared.counters.snapshot();
        c.flows_live = u64::from(self.inner.shared.limiter().total());
        c
    }

    /// Every peer's meter (removed peers' too, for settlement), by public key.
    pub fn meters(&self) -> Vec<([u8; 32], MeterSnapshot)> {
        self.inner
            .shared
            .meters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, m)| (*k, m.snapshot()))
            .collect()
    }

    /// The load limits this exit applies.
    pub fn limits(&self) -> crate::limits::Limits {
        self.inner.shared.cfg.limits
    }

    /// Stops the exit and waits for the driver to end.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

// === the driver and the peer tasks ===

/// One peer's state, owned by its own task ([`run_peer`]): its `Tunn`, its stack and
/// what its packets are waiting for.
struct Peer {
    key: [u8; 32],
    inner_ip: IpAddr,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    stack: Arc<Stack>,
    meter: Arc<PeerMeter>,
    inbound: Vec<Vec<u8>>,
    /// SYNs given a listening socket since the stack last ran: (source, destination).
    pending_syns: Vec<(SocketAddr, SocketAddr)>,
    /// Every (source, destination) given a listening socket that may still be served
    /// (swept in [`listen_flow`]): a SYN whose pair is not here is new, found without
    /// scanning the stack's sockets.
    flow_pairs: std::collections::HashSet<(SocketAddr, SocketAddr)>,
    /// Packets for the peer built outside its stack (RSTs refusing SYNs), sent with the
    /// stack's output.
    direct: Vec<Vec<u8>>,
    /// When the stack's timers next want it run (`None`: no timer).
    poll_at: Option<Instant>,
    /// The deal's bandwidth buckets, shared by its relays (none: no cap).
    bandwidth: Option<Arc<Bandwidth>>,
    /// When the peer was last seen flooding (exit milliseconds; 0: never), for its
    /// [`FloodGate`] in the driver.
    flooded: Arc<AtomicU64>,
}

/// The driver's side of a peer: where its datagrams go.
struct PeerLink {
    inner_ip: IpAddr,
    stack: Arc<Stack>,
    /// Closed (rate-limited) while the peer floods; checked before the datagram is
    /// copied or decrypted.
    gate: FloodGate,
    flooded: Arc<AtomicU64>,
    /// The peer's datagrams (at most `peer_queue` waiting; more are shed).
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    /// A new endpoint of the peer (rare: the control API).
    endpoint: mpsc::UnboundedSender<SocketAddr>,
    _task: AbortOnDrop,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One deal's bytes-per-second buckets, one per direction.
struct Bandwidth {
    up: Mutex<TokenBucket>,
    down: Mutex<TokenBucket>,
}

/// Owns the UDP socket: reads datagrams and hands each to its peer's task by the
/// receiver index on the wire (handshake initiations after the DH that names their
/// peer). Every peer's decryption, stack and sending run on the peer's own task, so
/// one peer's load (a SYN flood, hundreds of half-open sockets) delays only itself.
struct Driver {
    shared: Arc<Shared>,
    udp: Arc<NatSocket>,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
    peers: HashMap<u32, PeerLink>,
    by_key: HashMap<[u8; 32], u32>,
    next_index: u32,
    /// The peers the socket's kernel filter thins now (sorted; empty: no filter).
    filtered: Vec<u32>,
    /// Set when the kernel refused a filter: the gate alone works from then on.
    filter_failed: bool,
}

impl Driver {
    fn add_peer(
        &mut self,
        key: [u8; 32],
        inner_ip: IpAddr,
        endpoint: Option<SocketAddr>,
    ) -> Result<(), ProviderError> {
        if self.by_key.contains_key(&key) {
            return Err(ProviderError::PeerExists(ipsx_tunnel_pool::key_to_base64(
                &key,
            )));
        }
        if self.peers.values().any(|p| p.inner_ip == inner_ip) {
            return Err(ProviderError::Config {
                key: "inner_ip".into(),
                reason: format!("{inner_ip} is already used by another peer"),
            });
        }
        let mut index = self.next_index & 0x00ff_ffff;
        for _ in 0..(1 << 24) {
            if !self.peers.contains_key(&index) {
                break;
            }
            index = (index + 1) & 0x00ff_ffff;
        }
        self.next_index = index.wrapping_add(1);
        let tunn = Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(key),
            None,
            // Keep our NAT mapping open toward a peer we reached first.
            endpoint
                .filter(|_| self.shared.nat_path != NatPath::Direct)
                .map(|_| 25),
            index,
            Some(self.limiter.clone()),
        );
        let addrs = [IpCidr::new(
            IpAddress::Ipv4(self.shared.cfg.inner_address),
            32,
        )];
        // The stack wakes the peer's task when one of its relays wrote or read.
        let own = Arc::new(Notify::new());
        let stack = Stack::with_notify(&addrs, self.shared.cfg.mtu, true, own.clone());
        let meter = self
            .shared
            .meters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| Arc::new(PeerMeter::new(&key)))
            .clone();
        let flooded = Arc::new(AtomicU64::new(0));
        let peer = Peer {
            flooded: flooded.clone(),
            key,
            inner_ip,
            tunn,
            endpoint,
            stack: stack.clone(),
            meter,
            inbound: Vec::new(),
            pending_syns: Vec::new(),
            flow_pairs: std::collections::HashSet::new(),
            direct: Vec::new(),
            poll_at: None,
            bandwidth: self.shared.cfg.limits.bandwidth_per_deal.map(|rate| {
                let now = self.shared.now_ms();
                Arc::new(Bandwidth {
                    up: Mutex::new(TokenBucket::new(rate, rate, now)),
                    down: Mutex::new(TokenBucket::new(rate, rate, now)),
                })
            }),
        };
        let (tx, rx) = mpsc::channel(self.shared.cfg.limits.peer_queue);
        let (ep_tx, ep_rx) = mpsc::unbounded_channel();
        if let Some(ep) = endpoint {
            self.udp.permit(ep);
        }
        let task = tokio::spawn(run_peer(
            self.shared.clone(),
            self.udp.clone(),
            peer,
            PeerInput {
                datagrams: rx,
                endpoint: ep_rx,
                wake: own,
            },
        ));
        self.peers.insert(
            index,
            PeerLink {
                inner_ip,
                stack,
                gate: FloodGate::new(self.shared.now_ms()),
                flooded,
                tx,
                endpoint: ep_tx,
                _task: AbortOnDrop(task),
            },
        );
        self.by_key.insert(key, index);
        Ok(())
    }

    fn remove_peer(&mut self, key: &[u8; 32]) -> bool {
        match self.by_key.remove(key) {
            Some(idx) => {
                if let Some(p) = self.peers.remove(&idx) {
                    p.stack.close();
                }
                udp_relay::close_peer(&self.shared, key);
                self.shared.limiter().forget(*key);
                true
            }
            None => false,
        }
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Command>, mut stop: watch::Receiver<bool>) {
        let size = self.shared.cfg.mtu.max(1420) + 128;
        let mut out_buf = vec![0u8; size + 64];
        let mut reader = match self.udp.batch_reader(size) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "exit: cannot read the socket in batches");
                return;
            }
        };
        let mut next_timer = Instant::now() + TIMER_TICK;
        let mut next_reset = Instant::now() + Duration::from_secs(1);
        let mut next_filter = Instant::now() + FILTER_TICK;
        let mut nat_next = self.udp.service().await;
        loop {
            tokio::select! {
                biased;
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        break;
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(Command::Add { key, inner_ip, endpoint, reply }) => {
                        let _ = reply.send(self.add_peer(key, inner_ip, endpoint));
                    }
                    Some(Command::Remove { key, reply }) => {
                        let _ = reply.send(self.remove_peer(&key));
                    }
                    Some(Command::Endpoint { key, endpoint, reply }) => {
                        let known = self.by_key.get(&key).copied();
                        if let Some(idx) = known
                            && let Some(p) = self.peers.get(&idx)
                        {
                            self.udp.permit(endpoint);
                            let _ = p.endpoint.send(endpoint);
                        }
                        let _ = reply.send(known.is_some());
                    }
                    None => {}
                },
                r = self.udp.readable() => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(next_timer.min(self.udp.instant_of(nat_next))) => {}
            }

            // Hand what is waiting to the peers' tasks (no decryption here but of
            // handshake initiations); a peer's full queue sheds only its datagrams.
            let mut read = 0;
            while read < RX_READ {
                let Ok(Some(n)) = self.udp.try_recv_batch(&mut reader) else {
                    break;
                };
                read += n;
                let now_ms = self.shared.now_ms();
                for k in 0..reader.len() {
                    if let Some((data, from)) = reader.get(k) {
                        self.route(data, from, &mut out_buf, now_ms).await;
                    }
                }
            }
            // STUN/TURN refreshes and retransmissions.
            if self.udp.due(nat_next) {
                nat_next = self.udp.service().await;
            }
            let now = Instant::now();
            if now >= next_reset {
                next_reset = now + Duration::from_secs(1);
                self.limiter.reset_count();
            }
            if now >= next_timer {
                next_timer = now + TIMER_TICK;
                udp_relay::expire(&self.shared);
            }
            if now >= next_filter {
                next_filter = now + FILTER_TICK;
                self.refresh_filter();
            }
            if read >= RX_READ {
                // More may be waiting: the peers' tasks it woke run first.
                tokio::task::yield_now().await;
            }
        }
        for p in self.peers.values() {
            p.stack.close();
        }
        udp_relay::close_all(&self.shared);
    }

    /// Puts the peers flooding now (and only them) behind the socket's kernel filter.
    fn refresh_filter(&mut self) {
        if self.filter_failed {
            return;
        }
        let now = self.shared.now_ms();
        let mut flooding: Vec<u32> = self
            .peers
            .iter()
            .filter(|(_, p)| flooding_at(&p.flooded, now))
            .map(|(idx, _)| *idx)
            .collect();
        flooding.sort_unstable();
        if flooding == self.filtered {
            return;
        }
        match self.udp.filter_receivers(&flooding, INDEX_SHIFT) {
            Ok(()) => {
                let n = flooding
                    .len()
                    .min(ipsx_tunnel_pool::flood_filter::MAX_FILTERED);
                self.shared
                    .counters
                    .peers_filtered
                    .store(n as u64, Ordering::Relaxed);
                self.filtered = flooding;
            }
            Err(e) => {
                tracing::warn!(error = %e, "exit: no kernel filter for flooding peers; the gate alone drops their datagrams");
                self.filter_failed = true;
            }
        }
    }

    /// Hands a datagram to its peer's task: by the receiver index on the wire, or for a
    /// handshake initiation by the static key the DH reveals (after the MAC1 check and,
    /// under load, a cookie). Garbage and unknown peers are counted and dropped here.
    async fn route(&mut self, data: &[u8], from: SocketAddr, out: &mut [u8], now_ms: u64) {
        let c = &self.shared.counters;
        let idx = match Tunn::parse_incoming_packet(data) {
            Ok(Packet::HandshakeInit(_)) => {
                // MAC1 check and load-dependent cookie before any Diffie-Hellman.
                let init = match self.limiter.verify_packet(Some(from.ip()), data, out) {
                    Ok(Packet::HandshakeInit(init)) => init,
                    Ok(_) => return,
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        c.cookies_sent.fetch_add(1, Ordering::Relaxed);
                        send(&self.udp, from, cookie).await;
                        return;
                    }
                    Err(_) => {
                        c.datagrams_invalid.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                c.handshake_dh.fetch_add(1, Ordering::Relaxed);
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, &init) else {
                    c.datagrams_invalid.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                match self.by_key.get(&half.peer_static_public) {
                    Some(&idx) => idx,
                    None => {
                        c.unknown_peer.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> INDEX_SHIFT,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> INDEX_SHIFT,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> INDEX_SHIFT,
            Err(_) => {
                c.datagrams_invalid.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&idx) else {
            c.unknown_peer.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !peer.gate.pass(now_ms, flooded_ms(&peer.flooded)) {
            c.datagrams_gated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if peer.tx.try_send((data.to_vec(), from)).is_err() {
            c.datagrams_shed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What a peer's task waits on.
struct PeerInput {
    datagrams: mpsc::Receiver<(Vec<u8>, SocketAddr)>,
    endpoint: mpsc::UnboundedReceiver<SocketAddr>,
    /// Woken by the peer's stack when one of its relays wrote or read.
    wake: Arc<Notify>,
}

/// A peer's task: decrypts its datagrams (at most `peer_budget` a turn, then it yields
/// to the other tasks), handles the IP packets, runs its stack when it has something to
/// do (packets in, a relay's wake-up, a timer due), and encrypts and sends the output.
/// It ends when the driver drops the peer (or stops).
async fn run_peer(shared: Arc<Shared>, udp: Arc<NatSocket>, mut peer: Peer, mut input: PeerInput) {
    let size = shared.cfg.mtu.max(1420) + 128;
    let mut out_buf = vec![0u8; size + 64];
    let budget = shared.cfg.limits.peer_budget;
    let mut batch: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(budget);
    let mut outbound: Vec<Vec<u8>> = Vec::new();
    let mut next_timer = Instant::now() + TIMER_TICK;
    let mut initiate = peer.endpoint.is_some();
    loop {
        // First handshake toward a peer whose endpoint we were given.
        if std::mem::take(&mut initiate)
            && let (TunnResult::WriteToNetwork(p), Some(ep)) = (
                peer.tunn.format_handshake_initiation(&mut out_buf, false),
                peer.endpoint,
            )
        {
            send(&udp, ep, p).await;
        }
        let wake_at = peer.poll_at.map_or(next_timer, |t| t.min(next_timer));
        let mut woken = false;
        tokio::select! {
            biased;
            _ = input.wake.notified() => woken = true,
            ep = input.endpoint.recv() => {
                if let Some(ep) = ep {
                    peer.endpoint = Some(ep);
                    initiate = true;
                }
            }
            n = input.datagrams.recv_many(&mut batch, budget) => {
                if n == 0 {
                    break; // the driver dropped the peer
                }
            }
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        while batch.len() < budget {
            match input.datagrams.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let full = batch.len() >= budget;
        let flooding = is_flooding(&shared, &peer);
        let seen = peer.flooded.load(Ordering::Relaxed);
        let mut turn = batch.drain(..);
        for (data, from) in turn.by_ref() {
            peer_datagram(&shared, &udp, &mut peer, &data, from, &mut out_buf).await;
            if !flooding && peer.flooded.load(Ordering::Relaxed) != seen {
                // The peer began to flood in this turn: what it queued before its gate
                // closed is dropped undecrypted too, not worked through.
                let queued = turn.len() + discard_queued(&mut input.datagrams);
                shared
                    .counters
                    .datagrams_gated
                    .fetch_add(queued as u64, Ordering::Relaxed);
                break;
            }
        }
        drop(turn);

        let now = Instant::now();
        let due = woken
            || !peer.inbound.is_empty()
            || !peer.direct.is_empty()
            || peer.poll_at.is_some_and(|t| t <= now);
        if due {
            let d = peer.stack.poll(&mut peer.inbound, &mut outbound);
            peer.poll_at = d.map(|d| now + d);
        }
        outbound.append(&mut peer.direct);
        peer.pending_syns.clear();
        match peer.endpoint {
            Some(ep) => {
                for pkt in outbound.drain(..) {
                    if let TunnResult::WriteToNetwork(p) = peer.tunn.encapsulate(&pkt, &mut out_buf)
                    {
                        send(&udp, ep, p).await;
                    }
                }
            }
            None => outbound.clear(),
        }
        if now >= next_timer {
            next_timer = now + TIMER_TICK;
            if let (TunnResult::WriteToNetwork(p), Some(ep)) =
                (peer.tunn.update_timers(&mut out_buf), peer.endpoint)
            {
                send(&udp, ep, p).await;
            }
        }
        if full {
            // More is waiting: let the other peers' tasks run first.
            tokio::task::yield_now().await;
        }
    }
    peer.stack.close();
}

/// Whether `peer` is behind its [`FloodGate`] now (seen flooding within the penalty).
fn is_flooding(shared: &Shared, peer: &Peer) -> bool {
    flooding_at(&peer.flooded, shared.now_ms())
}

/// Whether a peer last seen flooding at `flooded` is still within its penalty at
/// `now_ms`.
fn flooding_at(flooded: &AtomicU64, now_ms: u64) -> bool {
    crate::limits::penalized(flooded_ms(flooded), now_ms)
}

/// When a peer was last seen flooding (exit milliseconds; the atomic holds 0 for never).
fn flooded_ms(flooded: &AtomicU64) -> Option<u64> {
    Some(flooded.load(Ordering::Relaxed)).filter(|&t| t != 0)
}

/// Empties a peer's queue (at most its capacity) without decrypting it; how many
/// datagrams it held.
fn discard_queued(queue: &mut mpsc::Receiver<(Vec<u8>, SocketAddr)>) -> usize {
    let mut n = 0;
    while n < queue.max_capacity() && queue.try_recv().is_ok() {
        n += 1;
    }
    n
}

/// One datagram of `peer` (its task).
async fn peer_datagram(
    shared: &Arc<Shared>,
    udp: &NatSocket,
    peer: &mut Peer,
    data: &[u8],
    from: SocketAddr,
    out: &mut [u8],
) {
    let c = &shared.counters;
    let kind = data.first().copied();
    match peer.tunn.decapsulate(Some(from.ip()), data, out) {
        TunnResult::WriteToNetwork(p) => {
            if kind == Some(1) {
                c.handshakes.fetch_add(1, Ordering::Relaxed);
                peer.endpoint = Some(from);
            }
            let ep = peer.endpoint.unwrap_or(from);
            send(udp, ep, p).await;
            for _ in 0..512 {
                match peer.tunn.decapsulate(None, &[], out) {
                    TunnResult::WriteToNetwork(p) => send(udp, ep, p).await,
                    _ => break,
                }
            }
        }
        TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
            // Authenticated data: the peer may have roamed.
            peer.endpoint = Some(from);
            let pkt = p.to_vec();
            handle_inner(shared, peer, pkt);
        }
        TunnResult::Done => {
            peer.endpoint = Some(from);
        }
        TunnResult::Err(e) => {
            tracing::trace!(?e, "exit: datagram refused");
            c.datagrams_invalid.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn send(udp: &NatSocket, ep: SocketAddr, p: &[u8]) {
    // UDP semantics: a datagram that cannot be sent is lost, WireGuard retransmits.
    let _ = udp.send_to(ep, p).await;
}

/// One decrypted IP packet from a peer.
fn handle_inner(shared: &Arc<Shared>, peer: &mut Peer, pkt: Vec<u8>) {
    let c = &shared.counters;
    let Some(parsed) = packet::parse(&pkt) else {
        c.dropped_other.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if parsed.src != peer.inner_ip {
        c.spoofed_source.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match parsed.transport {
        Transport::Tcp { syn_only: true, .. } => {
            // A refused SYN is answered with a RST built here: it never enters the
            // stack, so a flood of them costs neither a scan of the peer's sockets
            // nor a pass of smoltcp over every one of them.
            let dst = SocketAddr::new(parsed.dst, parsed.dst_port());
            let src = SocketAddr::new(parsed.src, parsed.src_port());
            // The exit's own services (the connection log) bypass the policy for
            // their exact (inner address, port) only.
            let inner = IpAddr::V4(shared.cfg.inner_address);
            let service = shared.cfg.inner_services.route(inner, dst);
            if service.is_none()
                && let Err(reason) = shared.policy.check(dst)
            {
                c.refused.fetch_add(1, Ordering::Relaxed);
                peer.meter.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    peer = %ipsx_tunnel_pool::key_to_base64(&peer.key),
                    %dst,
                    %reason,
                    "exit: flow refused"
                );
                refuse_syn(shared, peer, &pkt);
                return;
            }
            if !is_new_flow(peer, src, dst) {
                peer.inbound.push(pkt); // a retransmitted or duplicate SYN
                return;
            }
            let admitted = shared.limiter().admit_half_open(peer.key, shared.now_ms());
            match admitted {
                Err(why) => {
                    let counter = match why {
                        LimitRefusal::Rate => &c.rate_limited,
                        LimitRefusal::PeerFlows
                        | LimitRefusal::TotalFlows
                        | LimitRefusal::HalfOpen => &c.limited,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    peer.meter.limited.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        peer = %ipsx_tunnel_pool::key_to_base64(&peer.key),
                        %dst,
                        reason = %why,
                        "exit: flow over the limits"
                    );
                    refuse_syn(shared, peer, &pkt);
                }
                Ok(()) => {
                    let guard = FlowGuard::new(shared.clone(), peer);
                    let buffer = shared.cfg.limits.flow_buffer;
                    if let Some(handle) = listen_flow(peer, src, dst, buffer) {
                        c.flows.fetch_add(1, Ordering::Relaxed);
                        peer.meter.flows.fetch_add(1, Ordering::Relaxed);
                        let stream = StackStream::new(peer.stack.clone(), handle);
                        tokio::spawn(relay(
                            shared.clone(),
                            guard,
                            peer.bandwidth.clone(),
                            stream,
                            dst,
                            service,
                        ));
                    }
                    // No listener (it could not listen): smoltcp answers RST.
                    peer.inbound.push(pkt);
                }
            }
        }
        Transport::Tcp { .. } => peer.inbound.push(pkt),
        Transport::Udp { dst_port: 53, .. } if shared.cfg.dns_upstream.is_some() => {
            if c.dns_inflight.load(Ordering::Relaxed) >= DNS_MAX_INFLIGHT {
                c.dropped_other.fetch_add(1, Ordering::Relaxed);
                return;
            }
            c.dns_forwarded.fetch_add(1, Ordering::Relaxed);
            c.dns_inflight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(forward_dns(
                shared.clone(),
                peer.stack.clone(),
                parsed.owned(&pkt),
            ));
        }
        Transport::Udp { .. } => udp_relay::outbound(shared, peer, &pkt, &parsed),
        Transport::Other => match packet::icmp_echo_reply(&pkt, shared.cfg.inner_address) {
            Some(reply) => {
                c.icmp_echo.fetch_add(1, Ordering::Relaxed);
                udp_relay::into_tunnel(&peer.stack, reply);
            }
            None => {
                c.dropped_other.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
}

/// Whether a SYN `src -> dst` starts a new flow: not a duplicate in this batch, and no
/// socket serves that pair yet (a retransmitted SYN). The scan is bounded by the flow
/// caps (the peer's live flows and its lingering closed ones).
fn is_new_flow(peer: &mut Peer, src: SocketAddr, dst: SocketAddr) -> bool {
    if peer.pending_syns.contains(&(src, dst)) {
        return false;
    }
    // Never given a socket: new (the common case, and every SYN of a flood).
    if !peer.flow_pairs.contains(&(src, dst)) {
        return true;
    }
    let core = peer.stack.lock();
    let src_ep = ipsx_tunnel_pool::smoltcp::wire::IpEndpoint::from(src);
    let dst_ep = ipsx_tunnel_pool::smoltcp::wire::IpEndpoint::from(dst);
    let exists = core.sockets.iter().any(|(_, s)| match s {
        ipsx_tunnel_pool::smoltcp::socket::Socket::Tcp(t) => {
            t.remote_endpoint() == Some(src_ep)
                && t.local_endpoint() == Some(dst_ep)
                && !matches!(t.state(), tcp::State::Closed | tcp::State::TimeWait)
        }
        #[allow(unreachable_patterns)]
        _ => false,
    });
    drop(core);
    if !exists {
        peer.flow_pairs.remove(&(src, dst));
    }
    !exists
}

/// Answers a refused SYN with a RST (queued with the peer's output), while the peer
/// has RSTs left this second; beyond that the SYN is dropped (counted).
fn refuse_syn(shared: &Shared, peer: &mut Peer, syn: &[u8]) {
    let now = shared.now_ms();
    if !shared.limiter().may_reset(peer.key, now) {
        // Refused SYNs beyond the RST budget: the peer is flooding.
        shared
            .counters
            .resets_suppressed
            .fetch_add(1, Ordering::Relaxed);
        peer.flooded.store(now.max(1), Ordering::Relaxed);
        return;
    }
    if let Some(rst) = packet::rst_for_syn(syn) {
        peer.direct.push(rst);
    }
}

/// A listening socket for exactly `dst` with `buffer` bytes each way.
///
/// Several SYNs to the same destination may arrive in one batch: each distinct source
/// gets its own listener. smoltcp hands each SYN to the first free listener of that
/// destination, which may not be "its" one, but listeners of one destination are
/// interchangeable (the relay only needs the destination).
fn listen_flow(
    peer: &mut Peer,
    src: SocketAddr,
    dst: SocketAddr,
    buffer: usize,
) -> Option<SocketHandle> {
    let mut core = peer.stack.lock();
    let dst_ep = ipsx_tunnel_pool::smoltcp::wire::IpEndpoint::from(dst);
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; buffer]),
        tcp::SocketBuffer::new(vec![0; buffer]),
    );
    sock.set_nagle_enabled(false);
    sock.set_ack_delay(None);
    let h = core.sockets.add(sock);
    let listen = IpListenEndpoint {
        addr: Some(dst_ep.addr),
        port: dst_ep.port,
    };
    if core
        .sockets
        .get_mut::<tcp::Socket>(h)
        .listen(listen)
        .is_err()
    {
        core.sockets.remove(h);
        return None;
    }
    // Sweep the pairs whose sockets are gone once they outnumber the sockets: the set
    // stays within twice the live sockets (plus this turn's) at O(1) per flow.
    let sockets = core.sockets.iter().count();
    if peer.flow_pairs.len() >= 2 * sockets + 64 {
        let live: std::collections::HashSet<(SocketAddr, SocketAddr)> = core
            .sockets
            .iter()
            .filter_map(|(_, s)| match s {
                ipsx_tunnel_pool::smoltcp::socket::Socket::Tcp(t)
                    if !matches!(t.state(), tcp::State::Closed | tcp::State::TimeWait) =>
                {
                    Some((t.remote_endpoint()?.into(), t.local_endpoint()?.into()))
                }
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .collect();
        let pending = &peer.pending_syns;
        peer.flow_pairs
            .retain(|pair| live.contains(pair) || pending.contains(pair));
    }
    drop(core);
    peer.flow_pairs.insert((src, dst));
    peer.pending_syns.push((src, dst));
    Some(h)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shared {
    fn limiter(&self) -> std::sync::MutexGuard<'_, FlowLimiter<[u8; 32]>> {
        self.flow_limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Milliseconds since the exit started (the limits' clock; tokio's, so paused-time
    /// tests drive it).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A flow's place in the limits (and in its peer's SYN backlog until its handshake
/// completes), given back when its relay ends (however it ends).
struct FlowGuard {
    shared: Arc<Shared>,
    meter: Arc<PeerMeter>,
    key: [u8; 32],
    half_open: bool,
}

impl FlowGuard {
    fn new(shared: Arc<Shared>, peer: &Peer) -> Self {
        peer.meter.flows_live.fetch_add(1, Ordering::Relaxed);
        Self {
            shared,
            meter: peer.meter.clone(),
            key: peer.key,
            half_open: true,
        }
    }

    /// The flow's handshake completed: it leaves the peer's SYN backlog.
    fn established(&mut self) {
        if std::mem::take(&mut self.half_open) {
            self.shared.limiter().established(self.key);
        }
    }
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.meter.flows_live.fetch_sub(1, Ordering::Relaxed);
        let mut limiter = self.shared.limiter();
        if self.half_open {
            limiter.release_half_open(self.key);
        } else {
            limiter.release(self.key);
        }
    }
}

/// Relays one accepted flow to a real socket bound to the exit address, until both
/// sides close, either fails, or no byte moved for `idle_timeout` (then both are reset).
async fn relay(
    shared: Arc<Shared>,
    mut guard: FlowGuard,
    bandwidth: Option<Arc<Bandwidth>>,
    inner: StackStream,
    dst: SocketAddr,
    service: Option<SocketAddr>,
) {
    let meter = guard.meter.clone();
    let start_ms = unix_ms();
    let t0 = Instant::now();
    // A handshake not done within `half_open_timeout` is reset: the flow leaves the
    // peer's SYN backlog either way.
    let handshake = shared.cfg.limits.half_open_timeout;
    let accepted = tokio::time::timeout(handshake, inner.established()).await;
    let mut inner = inner;
    if !matches!(accepted, Ok(Ok(()))) {
        inner.abort();
        return;
    }
    guard.established();
    let outer = async {
        let sock = if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        match service {
            // An inner service is a local listener, dialled as is.
            Some(local) => return TcpStream::connect(local).await,
            None => sock.bind(SocketAddr::new(shared.source_ip, 0))?,
        }
        sock.connect(dst).await
    };
    let mut outer = match tokio::time::timeout(CONNECT_TIMEOUT, outer).await {
        Ok(Ok(s)) => s,
        _ => {
            inner.abort();
            if service.is_none() {
                meter.append(LogEntry {
                    start_unix_ms: start_ms,
                    dst,
                    bytes_up: 0,
                    bytes_down: 0,
                    duration_ms: t0.elapsed().as_millis() as u64,
                });
            }
            return;
        }
    };
    let _ = outer.set_nodelay(true);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let last = AtomicU64::new(shared.now_ms());
    let (mut inner_r, mut inner_w) = tokio::io::split(inner);
    let (mut outer_r, mut outer_w) = outer.split();
    let ctx = PumpCtx {
        shared: &shared,
        meter: &meter,
        last: &last,
    };
    let idle = tokio::select! {
        _ = async {
            tokio::try_join!(
                pump(&mut inner_r, &mut outer_w, &up, Dir::Up, bandwidth.as_deref().map(|b| &b.up), &ctx),
                pump(&mut outer_r, &mut inner_w, &down, Dir::Down, bandwidth.as_deref().map(|b| &b.down), &ctx),
            )
        } => false,
        () = idle_watch(&last, shared.cfg.limits.idle_timeout, &shared) => true,
    };
    let mut inner = inner_r.unsplit(inner_w);
    if idle {
        inner.abort();
        shared.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
        meter.idle_closed.fetch_add(1, Ordering::Relaxed);
        // Dropping `outer` closes it; with nothing unread it is a FIN, which the
        // destination sees as the end of an idle connection.
    }
    drop(inner);
    drop(outer);
    if service.is_some() {
        return; // the exit's own service: not a relayed connection
    }
    meter.append(LogEntry {
        start_unix_ms: start_ms,
        dst,
        bytes_up: up.load(Ordering::Relaxed),
        bytes_down: down.load(Ordering::Relaxed),
        duration_ms: t0.elapsed().as_millis() as u64,
    });
    drop(guard);
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

struct PumpCtx<'a> {
    shared: &'a Shared,
    meter: &'a PeerMeter,
    last: &'a AtomicU64,
}

/// Copies one direction until EOF (then shuts the writer: a half close), counting the
/// bytes read into the flow's and the peer's meters, noting the time of each move in
/// `last`, and waiting out the deal's bandwidth debt after each chunk.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    flow: &AtomicU64,
    dir: Dir,
    bucket: Option<&Mutex<TokenBucket>>,
    ctx: &PumpCtx<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        let now = ctx.shared.now_ms();
        ctx.last.store(now, Ordering::Relaxed);
        flow.fetch_add(n as u64, Ordering::Relaxed);
        let total = match dir {
            Dir::Up => &ctx.meter.bytes_up,
            Dir::Down => &ctx.meter.bytes_down,
        };
        total.fetch_add(n as u64, Ordering::Relaxed);
        ctx.meter.touch(now / 1000);
        w.write_all(buf.get(..n).unwrap_or_default()).await?;
        if let Some(b) = bucket {
            let wait = b
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take_debt(n as u64, now);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        // Waiting for the bandwidth cap is not idleness.
        ctx.last.store(ctx.shared.now_ms(), Ordering::Relaxed);
    }
}

/// Completes once `last` (a `now_ms` time) is `idle` old.
async fn idle_watch(last: &AtomicU64, idle: Duration, shared: &Shared) {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let since = shared.now_ms().saturating_sub(last.load(Ordering::Relaxed));
        if since >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - since)).await;
    }
}

/// Forwards one DNS query to the upstream resolver, from the exit address, and queues
/// the answer as an IP packet into the peer's stack output.
async fn forward_dns(shared: Arc<Shared>, stack: Arc<Stack>, q: packet::OwnedUdp) {
    let _guard = InflightGuard(&shared.counters.dns_inflight);
    let Some(upstream) = shared.cfg.dns_upstream else {
        return;
    };
    let bind = SocketAddr::new(shared.source_ip, 0);
    let Ok(sock) = UdpSocket::bind(bind).await else {
        return;
    };
    if sock.send_to(&q.payload, upstream).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 1500];
    let got = tokio::time::timeout(DNS_TIMEOUT, async {
        loop {
            match sock.recv_from(&mut buf).await {
                Ok((n, from)) if from == upstream => return Some(n),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    })
    .await;
    let Ok(Some(n)) = got else {
        return;
    };
    // Keep the reply within the tunnel MTU; a truncated DNS answer would be wrong, so
    // an oversized one is dropped (the client retries over TCP if it can).
    let max = shared.cfg.mtu.saturating_sub(48);
    if n > max {
        return;
    }
    let Some(reply) = packet::udp_reply(&q, &buf[..n]) else {
        return;
    };
    udp_relay::into_tunnel(&stack, reply);
}

struct InflightGuard<'a>(&'a AtomicU64);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
