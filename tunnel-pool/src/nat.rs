//! NAT traversal for one WireGuard UDP socket (docs/tunnel.md, "NAT traversal").
//!
//! WireGuard is symmetric, so crossing a NAT needs no tunnel changes, only three things
//! around the socket:
//!
//! * **learning our public mapping**: STUN Binding requests to one or more servers, sent
//!   from the WireGuard socket itself, so the answer is the mapping the peer will see;
//!   two servers answering with different mappings reveal a symmetric NAT;
//! * **punching**: the side behind a cone NAT sends first (a handshake initiation toward
//!   the peer's public endpoint), which opens its mapping for the peer's answers;
//! * **relaying**: behind a symmetric NAT nothing the peer learns stays valid, so the
//!   socket allocates an address on a TURN server and every WireGuard datagram to or
//!   from a peer goes through it.
//!
//! [`Traversal`] is the sans-IO core (datagrams and time in, datagrams out); STUN and
//! TURN messages are built and parsed by the `stun-proto` / `turn-client-proto` crates.
//! [`NatSocket`] is the thin tokio runtime around one `UdpSocket` that the provider exit
//! and the requester tunnel use in place of a bare socket.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnRecvRet};
use turn_client_proto::stun::Instant;
use turn_client_proto::stun::agent::{StunAgent, Transmit};
use turn_client_proto::stun::types::TransportType;
use turn_client_proto::stun::types::attribute::{ErrorCode, XorMappedAddress};
use turn_client_proto::stun::types::message::{BINDING, Message, MessageClass, MessageWriteVec};
use turn_client_proto::stun::types::prelude::*;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::udp::TurnClientUdp;

/// How a WireGuard peer reaches this socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatPath {
    /// No traversal: the socket's own address is reachable (no NAT, or no STUN server
    /// configured).
    Direct,
    /// Behind a cone NAT: the mapping learned by STUN is advertised and opened by
    /// sending first toward the peer (hole punching).
    Punched,
    /// Through an address allocated on a TURN server.
    Relayed,
}

impl NatPath {
    /// Every value.
    pub const ALL: [NatPath; 3] = [Self::Direct, Self::Punched, Self::Relayed];

    /// The lowercase name used in configs, APIs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Punched => "punched",
            Self::Relayed => "relayed",
        }
    }
}

impl fmt::Display for NatPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NatPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not one of direct, punched, relayed"))
    }
}

/// When to relay through TURN (config key `relay`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// Relay only when STUN shows a symmetric NAT (or no STUN server answers).
    #[default]
    Auto,
    /// Always relay (a TURN server is required).
    Always,
    /// Never relay.
    Never,
}

impl FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("`{s}` is not one of auto, always, never")),
        }
    }
}

/// A TURN server and its long-term credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnServer {
    /// UDP address of the server.
    pub addr: SocketAddr,
    /// User name.
    pub username: String,
    /// Password (masked in `Debug`).
    pub password: String,
}

impl fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnServer")
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// What a socket does about NAT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSettings {
    /// STUN servers asked for our mapping (two reveal a symmetric NAT).
    pub stun: Vec<SocketAddr>,
    /// TURN server for relaying.
    pub turn: Option<TurnServer>,
    /// When to relay.
    pub relay: RelayMode,
    /// How long discovery (STUN answers, TURN allocation) may take before the socket
    /// goes on with what it has.
    pub timeout: Duration,
}

impl Default for NatSettings {
    fn default() -> Self {
        Self {
            stun: Vec::new(),
            turn: None,
            relay: RelayMode::Auto,
            timeout: Duration::from_secs(5),
        }
    }
}

impl NatSettings {
    /// Whether anything is configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.stun.is_empty() || self.turn.is_some()
    }

    /// Checks the settings; errors name the key (`stun`, `turn`, `relay`, ...).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.stun.len() > 4 {
            return Err(("stun", "at most 4 servers".into()));
        }
        for s in &self.stun {
            if s.port() == 0 || s.ip().is_unspecified() {
                return Err(("stun", format!("{s} needs an address and a port")));
            }
        }
        if let Some(t) = &self.turn {
            if t.addr.port() == 0 || t.addr.ip().is_unspecified() {
                return Err(("turn", format!("{} needs an address and a port", t.addr)));
            }
            if t.username.is_empty() || t.username.len() > 256 {
                return Err(("turn_username", "1 to 256 bytes".into()));
            }
            if t.password.is_empty() || t.password.len() > 256 {
                return Err(("turn_password", "1 to 256 bytes".into()));
            }
        }
        if self.relay == RelayMode::Always && self.turn.is_none() {
            return Err(("relay", "`always` needs a `turn` server".into()));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(("timeout", "within 1 ms..=60 s".into()));
        }
        Ok(())
    }
}

/// NAT traversal settings as written in a config file (`[nat]` of the provider exit,
/// `[exit.nat]` of the agent, `[market.nat]` of the gateway).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// STUN servers asked for the exit's public mapping.
    #[serde(default)]
    pub stun: Vec<SocketAddr>,
    /// TURN server relaying when the NAT is symmetric.
    #[serde(default)]
    pub turn: Option<SocketAddr>,
    /// TURN user name.
    #[serde(default)]
    pub turn_username: String,
    /// TURN password.
    #[serde(default)]
    pub turn_password: String,
    /// `auto` (relay behind a symmetric NAT), `always` or `never`.
    #[serde(default)]
    pub relay: Option<String>,
    /// How long discovery may take at start, seconds (default 5).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

impl NatSection {
    /// The traversal settings; errors name the key within the section (`relay`,
    /// `turn_password`, ...).
    pub fn settings(&self) -> Result<NatSettings, (&'static str, String)> {
        let bad = |key: &'static str, reason: String| (key, reason);
        let relay = match &self.relay {
            Some(r) => r.parse().map_err(|e| bad("relay", e))?,
            None => RelayMode::Auto,
        };
        let turn = self.turn.map(|addr| TurnServer {
            addr,
            username: self.turn_username.clone(),
            password: self.turn_password.clone(),
        });
        if turn.is_none() && !(self.turn_username.is_empty() && self.turn_password.is_empty()) {
            return Err(bad(
                "turn",
                "credentials given without a `turn` server".into(),
            ));
        }
        let s = NatSettings {
            stun: self.stun.clone(),
            turn,
            relay,
            timeout: std::time::Duration::from_secs(self.timeout_s.unwrap_or(5)),
        };
        s.validate()?;
        Ok(s)
    }
}

/// What STUN showed about the NAT in front of the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Discovery still running.
    Pending,
    /// No server answered (or none configured).
    Unknown,
    /// The mapping is our own address: no NAT.
    Public(SocketAddr),
    /// Every server saw the same mapping.
    Cone(SocketAddr),
    /// Servers saw different mappings (the port changes per destination).
    Symmetric,
}

/// What to do with a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Not from a STUN/TURN server: a WireGuard datagram from `from`, use it as is.
    Wireguard,
    /// A STUN/TURN message, handled here.
    Consumed,
    /// A WireGuard datagram relayed by TURN from `from`.
    Relayed {
        /// The peer's address as the TURN server sees it.
        from: SocketAddr,
        /// The datagram.
        data: Vec<u8>,
    },
}

/// Where an outgoing datagram goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight to the peer, unchanged.
    Direct,
    /// Wrapped for the TURN server: send `data` to `to`.
    Wrapped {
        /// The TURN server.
        to: SocketAddr,
        /// The framed datagram (ChannelData or Send indication).
        data: Vec<u8>,
    },
    /// Cannot be sent yet (a permission for the peer is being created); dropped,
    /// WireGuard retransmits.
    Dropped,
}

/// The sans-IO traversal state of one socket. Time is a [`Duration`] since an epoch the
/// runtime chooses.
#[derive(Debug)]
pub struct Traversal {
    settings: NatSettings,
    local: SocketAddr,
    stun: StunAgent,
    /// Outstanding Binding requests: (transaction, server index).
    outstanding: Vec<(
        turn_client_proto::stun::types::message::TransactionId,
        usize,
    )>,
    answers: Vec<Option<SocketAddr>>,
    started: Duration,
    mapping: Mapping,
    turn: Option<TurnClientUdp>,
    relayed: Option<SocketAddr>,
    turn_error: Option<String>,
    /// Peers given a permission and a channel.
    permitted: Vec<SocketAddr>,
    /// STUN/TURN messages from servers that could not be parsed.
    garbage: u64,
    /// The first Binding requests, not yet sent.
    first: Vec<(SocketAddr, Vec<u8>)>,
}

fn instant(now: Duration) -> Instant {
    Instant::from_nanos(i64::try_from(now.as_nanos()).unwrap_or(i64::MAX))
}

fn since(i: Instant) -> Duration {
    Duration::from_nanos(u64::try_from(i.as_nanos()).unwrap_or(0))
}

impl Traversal {
    /// Starts discovery: one Binding request per STUN server (queued, see
    /// [`Traversal::poll_transmit`]). `local` is the socket's address with the IP it uses
    /// toward the servers (so "no NAT" can be recognised).
    pub fn new(settings: NatSettings, local: SocketAddr, now: Duration) -> Self {
        let mut stun = StunAgent::builder(TransportType::Udp, local).build();
        let mut outstanding = Vec::new();
        let mut queued = Vec::new();
        for (i, server) in settings.stun.iter().enumerate() {
            let msg = Message::builder_request(BINDING, MessageWriteVec::new());
            let tid = msg.transaction_id();
            if let Ok(t) = stun.send_request(msg.finish(), *server, instant(now)) {
                queued.push((t.to, t.data.to_vec()));
                outstanding.push((tid, i));
            }
        }
        let mut me = Self {
            answers: vec![None; settings.stun.len()],
            settings,
            local,
            stun,
            outstanding,
            started: now,
            mapping: Mapping::Pending,
            turn: None,
            relayed: None,
            turn_error: None,
            permitted: Vec::new(),
            garbage: 0,
            first: queued,
        };
        me.decide(now);
        me
    }

    /// The mapping STUN showed.
    pub fn mapping(&self) -> Mapping {
        self.mapping
    }

    /// The TURN allocation, once made.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Why relaying is unavailable, if it was tried and failed.
    pub fn turn_error(&self) -> Option<&str> {
        self.turn_error.as_deref()
    }

    /// Messages from the servers that were not valid STUN/TURN.
    pub fn garbage(&self) -> u64 {
        self.garbage
    }

    /// Whether discovery (and the allocation, when relaying) is over.
    pub fn is_settled(&self) -> bool {
        self.mapping != Mapping::Pending
            && (self.turn.is_none() || self.relayed.is_some() || self.turn_error.is_some())
    }

    /// How peers reach us.
    pub fn path(&self) -> NatPath {
        if self.relayed.is_some() {
            NatPath::Relayed
        } else if matches!(self.mapping, Mapping::Cone(_)) {
            NatPath::Punched
        } else {
            NatPath::Direct
        }
    }

    /// The endpoint to advertise: the relayed address, the cone mapping, or `None`
    /// (advertise the configured/bound address).
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        match (self.relayed, self.mapping) {
            (Some(r), _) => Some(r),
            (None, Mapping::Cone(m) | Mapping::Public(m)) => Some(m),
            _ => None,
        }
    }

    fn is_stun_server(&self, from: SocketAddr) -> bool {
        self.settings.stun.contains(&from)
    }

    fn is_turn_server(&self, from: SocketAddr) -> bool {
        self.settings.turn.as_ref().is_some_and(|t| t.addr == from)
    }

    /// Whether datagrams from `from` are STUN/TURN traffic to hand to [`Traversal::recv`].
    pub fn is_server(&self, from: SocketAddr) -> bool {
        self.is_stun_server(from) || self.is_turn_server(from)
    }

    /// Takes a datagram received from `from`.
    pub fn recv(&mut self, from: SocketAddr, data: &[u8], now: Duration) -> Received {
        if !self.is_server(from) {
            return Received::Wireguard;
        }
        let from_turn = self.is_turn_server(from);
        if let Some(turn) = self.turn.as_mut().filter(|_| from_turn) {
            let t = Transmit::new(data, TransportType::Udp, from, self.local);
            match turn.recv(t, instant(now)) {
                TurnRecvRet::Handled => {
                    self.drain_turn_events();
                    return Received::Consumed;
                }
                TurnRecvRet::PeerData(p) => {
                    return Received::Relayed {
                        from: p.peer,
                        data: p.data().to_vec(),
                    };
                }
                TurnRecvRet::PeerIcmp { .. } => return Received::Consumed,
                TurnRecvRet::Ignored(_) => {}
            }
        }
        if self.is_stun_server(from) {
            self.on_stun(from, data, now);
        } else {
            self.garbage += 1;
        }
        Received::Consumed
    }

    fn on_stun(&mut self, from: SocketAddr, data: &[u8], now: Duration) {
        let Ok(msg) = Message::from_bytes(data) else {
            self.garbage += 1;
            return;
        };
        let tid = msg.transaction_id();
        let Some(pos) = self.outstanding.iter().position(|(t, _)| *t == tid) else {
            return;
        };
        if !self
            .stun
            .handle_stun_message_with_time(&msg, from, instant(now))
        {
            return;
        }
        let (_, server) = self.outstanding.swap_remove(pos);
        if msg.has_class(MessageClass::Success) {
            if let Ok(x) = msg.attribute::<XorMappedAddress>() {
                self.answers[server] = Some(x.addr(tid));
            } else {
                self.garbage += 1;
            }
        } else if let Ok(e) = msg.attribute::<ErrorCode>() {
            tracing::debug!(server = %from, code = e.code(), "STUN error answer");
        }
        self.decide(now);
    }

    /// Sets `mapping` once every server answered or the time is up, then starts the
    /// TURN allocation if the settings ask for one.
    fn decide(&mut self, now: Duration) {
        if self.mapping != Mapping::Pending {
            return;
        }
        let timed_out = now.saturating_sub(self.started) >= self.settings.timeout;
        if !self.outstanding.is_empty() && !timed_out {
            return;
        }
        let seen: Vec<SocketAddr> = self.answers.iter().flatten().copied().collect();
        self.mapping = match seen.first() {
            None => Mapping::Unknown,
            Some(&m) if seen.iter().any(|s| *s != m) => Mapping::Symmetric,
            Some(&m) if m == self.local => Mapping::Public(m),
            Some(&m) => Mapping::Cone(m),
        };
        self.outstanding.clear();
        let relay = match self.settings.relay {
            RelayMode::Never => false,
            RelayMode::Always => true,
            RelayMode::Auto => matches!(self.mapping, Mapping::Symmetric | Mapping::Unknown),
        };
        if let (true, Some(t)) = (relay, self.settings.turn.clone()) {
            let cfg = TurnConfig::new(TurnCredentials::new(&t.username, &t.password));
            self.turn = Some(TurnClientUdp::allocate(self.local, t.addr, cfg));
        }
    }

    fn drain_turn_events(&mut self) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        while let Some(ev) = turn.poll_event() {
            match ev {
                TurnEvent::AllocationCreated(_, addr) => self.relayed = Some(addr),
                TurnEvent::AllocationCreateFailed(family) => {
                    self.turn_error = Some(format!("allocation refused ({family:?})"));
                }
                TurnEvent::PermissionCreateFailed(_, ip) => {
                    tracing::debug!(peer = %ip, "TURN permission refused");
                    self.permitted.retain(|p| p.ip() != ip);
                }
                TurnEvent::ChannelCreateFailed(_, peer) => {
                    tracing::debug!(%peer, "TURN channel refused");
                }
                _ => {}
            }
        }
    }

    /// Lets `peer` send to us through the relay and binds a channel to it (cheaper
    /// framing). Does nothing when not relaying or already permitted.
    pub fn permit(&mut self, peer: SocketAddr, now: Duration) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        if self.relayed.is_none() || self.permitted.contains(&peer) {
            return;
        }
        let _ = turn.create_permission(TransportType::Udp, peer.ip(), instant(now));
        let _ = turn.bind_channel(TransportType::Udp, peer, instant(now));
        self.permitted.push(peer);
    }

    /// How to send `data` to `to`.
    pub fn route(&mut self, to: SocketAddr, data: &[u8], now: Duration) -> Route {
        if self.relayed.is_none() || self.is_server(to) {
            return Route::Direct;
        }
        let Some(turn) = self.turn.as_mut() else {
            return Route::Direct;
        };
        if !turn.have_permission(TransportType::Udp, to.ip()) {
            self.permit(to, now);
            return Route::Dropped;
        }
        let Some(turn) = self.turn.as_mut() else {
            return Route::Direct;
        };
        match turn.send_to(TransportType::Udp, to, data, instant(now)) {
            Ok(Some(t)) => {
                let t = t.build();
                Route::Wrapped {
                    to: t.to,
                    data: t.data,
                }
            }
            Ok(None) | Err(_) => Route::Dropped,
        }
    }

    /// The next STUN/TURN message to send (retransmissions, refreshes).
    pub fn poll_transmit(&mut self, now: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        if let Some(first) = self.first.pop() {
            return Some(first);
        }
        if let Some(t) = self.stun.poll_transmit(instant(now)) {
            return Some((t.to, t.data.to_vec()));
        }
        let turn = self.turn.as_mut()?;
        let t = turn.poll_transmit(instant(now));
        self.drain_turn_events();
        t.map(|t| (t.to, t.data.to_vec()))
    }

    /// Advances timers; returns when to call again (and [`Traversal::poll_transmit`]).
    pub fn poll(&mut self, now: Duration) -> Duration {
        let mut next = now + Duration::from_secs(60);
        if !self.outstanding.is_empty() {
            use turn_client_proto::stun::agent::StunAgentPollRet;
            loop {
                match self.stun.poll(instant(now)) {
                    StunAgentPollRet::WaitUntil(at) => {
                        next = next.min(since(at));
                        break;
                    }
                    StunAgentPollRet::TransactionTimedOut(tid)
                    | StunAgentPollRet::TransactionCancelled(tid) => {
                        self.outstanding.retain(|(t, _)| *t != tid);
                    }
                }
            }
            next = next.min(self.started + self.settings.timeout);
        }
        self.decide(now);
        if let Some(turn) = self.turn.as_mut() {
            match turn.poll(instant(now)) {
                turn_client_proto::api::TurnPollRet::WaitUntil(at) => next = next.min(since(at)),
                turn_client_proto::api::TurnPollRet::Closed
                    if self.turn_error.is_none() && self.relayed.is_none() =>
                {
                    self.turn_error = Some("TURN client closed".into());
                }
                _ => {}
            }
            self.drain_turn_events();
            if self.relayed.is_none()
                && self.turn_error.is_none()
                && now.saturating_sub(self.started) >= 2 * self.settings.timeout
            {
                self.turn_error = Some("no allocation before the timeout".into());
            }
        }
        next.max(now + Duration::from_millis(1))
    }
}

/// The IP this host uses toward `server` (a connected UDP socket's local address; sends
/// nothing).
pub fn local_ip_toward(server: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(server).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Buffers a [`BatchReader`] reads into at most (each may hold several datagrams).
const MAX_BATCH: usize = 16;

/// Datagrams read together from a [`NatSocket`] (see [`NatSocket::batch_reader`]).
pub struct BatchReader {
    state: quinn_udp::UdpSocketState,
    bufs: Vec<Vec<u8>>,
    metas: Vec<quinn_udp::RecvMeta>,
    /// The peer datagrams of the last read: buffer, start, length, sender.
    got: Vec<(usize, usize, usize, SocketAddr)>,
}

impl fmt::Debug for BatchReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchReader")
            .field("buffers", &self.bufs.len())
            .field("got", &self.got.len())
            .finish()
    }
}

impl BatchReader {
    /// How many peer datagrams the last read gave.
    pub fn len(&self) -> usize {
        self.got.len()
    }

    /// Whether the last read gave no peer datagram.
    pub fn is_empty(&self) -> bool {
        self.got.is_empty()
    }

    /// The `k`-th peer datagram of the last read and its sender (`None` past the end).
    pub fn get(&self, k: usize) -> Option<(&[u8], SocketAddr)> {
        let &(i, start, len, from) = self.got.get(k)?;
        Some((&self.bufs[i][start..start + len], from))
    }
}

/// A UDP socket with optional NAT traversal: STUN/TURN traffic is handled inside,
/// relayed datagrams come out of [`NatSocket::try_recv_from`] as if sent by the peer,
/// and [`NatSocket::send_to`] relays when the socket relays.
#[derive(Debug)]
pub struct NatSocket {
    udp: UdpSocket,
    nat: Option<Mutex<Traversal>>,
    epoch: std::time::Instant,
    /// Set when the traversal queued a message (a permission) to send now.
    urgent: AtomicBool,
}

impl NatSocket {
    /// A socket without traversal.
    pub fn plain(udp: UdpSocket) -> Self {
        Self {
            udp,
            nat: None,
            epoch: std::time::Instant::now(),
            urgent: AtomicBool::new(false),
        }
    }

    /// Wraps `udp` and runs discovery (and the TURN allocation when needed) before
    /// returning, within twice `settings.timeout`. Settings with no server give a plain
    /// socket.
    pub async fn discover(udp: UdpSocket, settings: NatSettings) -> io::Result<Self> {
        if !settings.is_enabled() {
            return Ok(Self::plain(udp));
        }
        let mut local = udp.local_addr()?;
        if local.ip().is_unspecified() {
            let server = settings
                .stun
                .first()
                .copied()
                .or(settings.turn.as_ref().map(|t| t.addr));
            if let Some(ip) = server.and_then(local_ip_toward) {
                local.set_ip(ip);
            }
        }
        let deadline = tokio::time::Instant::now() + 2 * settings.timeout;
        let me = Self {
            udp,
            nat: None,
            epoch: std::time::Instant::now(),
            urgent: AtomicBool::new(false),
        };
        let me = Self {
            nat: Some(Mutex::new(Traversal::new(settings, local, me.now()))),
            ..me
        };
        let mut buf = vec![0u8; 2048];
        while tokio::time::Instant::now() < deadline {
            let next = me.service().await;
            if me.with(|t| t.is_settled()).unwrap_or(true) {
                break;
            }
            let wake = tokio::time::Instant::from_std(me.epoch + next).min(deadline);
            tokio::select! {
                r = me.udp.readable() => r?,
                _ = tokio::time::sleep_until(wake) => {}
            }
            // Anything that is not STUN/TURN during discovery is dropped: no peer
            // knows this socket yet.
            while let Ok(Some(_)) = me.try_recv_from(&mut buf) {}
        }
        Ok(me)
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Traversal) -> R) -> Option<R> {
        self.nat
            .as_ref()
            .map(|m| f(&mut m.lock().unwrap_or_else(PoisonError::into_inner)))
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// How peers reach this socket.
    pub fn path(&self) -> NatPath {
        self.with(|t| t.path()).unwrap_or(NatPath::Direct)
    }

    /// The endpoint to advertise (relayed address or STUN mapping), if traversal found
    /// one.
    pub fn public_endpoint(&self) -> Option<SocketAddr> {
        self.with(|t| t.public_endpoint()).flatten()
    }

    /// What STUN showed (`None`: no traversal configured).
    pub fn mapping(&self) -> Option<Mapping> {
        self.with(|t| t.mapping())
    }

    /// Why relaying failed, if it did.
    pub fn turn_error(&self) -> Option<String> {
        self.with(|t| t.turn_error().map(str::to_owned)).flatten()
    }

    /// Lets `peer` reach us through the relay (no-op when not relaying).
    pub fn permit(&self, peer: SocketAddr) {
        let now = self.now();
        self.with(|t| t.permit(peer, now));
        self.urgent.store(true, Ordering::Relaxed);
    }

    /// Whether [`NatSocket::service`] should run now: `next` (its last answer) has come,
    /// or a message was queued since.
    pub fn due(&self, next: Duration) -> bool {
        self.urgent.swap(false, Ordering::Relaxed) || self.now() >= next
    }

    /// Waits until the socket may be readable.
    pub async fn readable(&self) -> io::Result<()> {
        self.udp.readable().await
    }

    /// Runs the traversal timers and sends what they produced; returns when to call
    /// again (time since the socket's epoch; far away without traversal).
    pub async fn service(&self) -> Duration {
        let now = self.now();
        let Some(next) = self.with(|t| t.poll(now)) else {
            return now + Duration::from_secs(3600);
        };
        for _ in 0..64 {
            let Some((to, data)) = self.with(|t| t.poll_transmit(now)).flatten() else {
                break;
            };
            let _ = self.send_raw(to, &data).await;
        }
        // Refreshes are minutes apart, but answers to requests may need a retransmit
        // soon; a second is cheap.
        next.min(now + Duration::from_secs(1))
    }

    /// When [`NatSocket::service`] wants to run next, as a tokio instant.
    pub fn instant_of(&self, at: Duration) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + at)
    }

    /// Receives one peer datagram without waiting: `Ok(None)` when nothing is queued.
    /// STUN/TURN messages are handled and skipped; relayed data is unwrapped into `buf`
    /// with the peer's address.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        for _ in 0..64 {
            let (n, from) = match self.udp.try_recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(peer) = self.peer_datagram(&mut buf[..n], from, &mut None) {
                return Ok(Some(peer));
            }
        }
        Ok(None)
    }

    /// What a received datagram (at the start of `datagram`, from `from`) is for the
    /// peers: `None` for a STUN/TURN message (handled), else its length and sender, a
    /// relayed datagram unwrapped in place. `now` is read once, when first needed.
    fn peer_datagram(
        &self,
        datagram: &mut [u8],
        from: SocketAddr,
        now: &mut Option<Duration>,
    ) -> Option<(usize, SocketAddr)> {
        let Some(nat) = &self.nat else {
            return Some((datagram.len(), from));
        };
        let now = *now.get_or_insert_with(|| self.now());
        let r = nat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv(from, datagram, now);
        match r {
            Received::Wireguard => Some((datagram.len(), from)),
            Received::Consumed => None,
            Received::Relayed { from, data } => {
                let k = data.len().min(datagram.len());
                datagram[..k].copy_from_slice(&data[..k]);
                Some((k, from))
            }
        }
    }

    /// Thins the data datagrams to the peers `indices` (receiver index `>> shift`) in the
    /// kernel, before they are queued ([`crate::flood_filter`]); an empty list removes
    /// the filter.
    pub fn filter_receivers(&self, indices: &[u32], shift: u32) -> io::Result<()> {
        let sock = socket2::SockRef::from(&self.udp);
        match crate::flood_filter::program(indices, shift) {
            Some(p) => sock.attach_filter(&p),
            None => match sock.detach_filter() {
                // ENOENT: there was none.
                Err(e) if e.raw_os_error() == Some(2) => Ok(()),
                r => r,
            },
        }
    }

    /// A reader that takes the datagrams waiting on this socket many per system call
    /// (`recvmmsg`, through quinn-udp), for a receive loop that sees floods: one call
    /// per batch instead of one per datagram. `max_datagram` is the largest datagram
    /// expected (larger ones are cut). It turns on the socket options quinn-udp reads
    /// batches with (GRO among them: a buffer may hold several datagrams of one sender,
    /// which [`NatSocket::try_recv_batch`] splits again).
    pub fn batch_reader(&self, max_datagram: usize) -> io::Result<BatchReader> {
        let state = quinn_udp::UdpSocketState::new((&self.udp).into())?;
        let buffers = quinn_udp::BATCH_SIZE.clamp(1, MAX_BATCH);
        let size = max_datagram.max(1) * state.gro_segments().max(1);
        Ok(BatchReader {
            state,
            // Zeroed allocations: the kernel maps their pages as datagrams fill them.
            bufs: (0..buffers).map(|_| vec![0u8; size]).collect(),
            metas: vec![quinn_udp::RecvMeta::default(); buffers],
            got: Vec::new(),
        })
    }

    /// Reads the datagrams waiting (one batch at most) without waiting: `Ok(None)` when
    /// nothing is queued, else how many datagrams were read. The peer datagrams among
    /// them are then in `reader` ([`BatchReader::get`]); STUN/TURN messages are handled
    /// and skipped, relayed data is unwrapped with the peer's address, as in
    /// [`NatSocket::try_recv_from`].
    pub fn try_recv_batch(&self, reader: &mut BatchReader) -> io::Result<Option<usize>> {
        let BatchReader {
            state,
            bufs,
            metas,
            got,
        } = reader;
        got.clear();
        let mut slices: Vec<io::IoSliceMut<'_>> =
            bufs.iter_mut().map(|b| io::IoSliceMut::new(b)).collect();
        let n = match self.udp.try_io(tokio::io::Interest::READABLE, || {
            state.recv((&self.udp).into(), &mut slices, metas)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        drop(slices);
        let mut datagrams = 0;
        let mut now = None;
        for (i, meta) in metas.iter().enumerate().take(n) {
            let len = meta.len.min(bufs[i].len());
            let stride = if meta.stride == 0 { len } else { meta.stride };
            let mut start = 0;
            while start < len {
                let end = (start + stride).min(len);
                datagrams += 1;
                if let Some((k, from)) =
                    self.peer_datagram(&mut bufs[i][start..end], meta.addr, &mut now)
                {
                    got.push((i, start, k, from));
                }
                start = end;
            }
        }
        Ok(Some(datagrams))
    }

    /// Sends `data` to `to` (through the relay when relaying); returns the bytes put
    /// on the wire (0: dropped until the relay permits the peer). A full buffer is
    /// waited for (a few times), other errors are returned.
    pub async fn send_to(&self, to: SocketAddr, data: &[u8]) -> io::Result<usize> {
        let now = self.now();
        match self.with(|t| t.route(to, data, now)) {
            None | Some(Route::Direct) => self.send_raw(to, data).await,
            Some(Route::Wrapped { to, data }) => self.send_raw(to, &data).await,
            Some(Route::Dropped) => {
                self.urgent.store(true, Ordering::Relaxed);
                Ok(0)
            }
        }
    }

    async fn send_raw(&self, to: SocketAddr, data: &[u8]) -> io::Result<usize> {
        for _ in 0..8 {
            match self.udp.try_send_to(data, to) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.udp.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> NatSettings {
        NatSettings {
            stun: vec!["192.0.2.1:3478".parse().unwrap()],
            turn: Some(TurnServer {
                addr: "192.0.2.1:3478".parse().unwrap(),
                username: "u".into(),
                password: "p".into(),
            }),
            relay: RelayMode::Always,
            timeout: Duration::from_secs(1),
        }
    }

    fn local() -> SocketAddr {
        "198.51.100.7:40000".parse().unwrap()
    }

    #[test]
    fn names_round_trip() {
        for p in NatPath::ALL {
            assert_eq!(p.as_str().parse::<NatPath>().unwrap(), p);
        }
        assert!(
            "sideways"
                .parse::<NatPath>()
                .unwrap_err()
                .contains("sideways")
        );
        assert_eq!("never".parse::<RelayMode>().unwrap(), RelayMode::Never);
        assert!("x".parse::<RelayMode>().is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = settings();
        s.turn = None;
        assert_eq!(s.validate().unwrap_err().0, "relay");
        let mut s = settings();
        s.stun = vec!["0.0.0.0:3478".parse().unwrap()];
        assert_eq!(s.validate().unwrap_err().0, "stun");
        let mut s = settings();
        if let Some(t) = s.turn.as_mut() {
            t.password.clear();
        }
        assert_eq!(s.validate().unwrap_err().0, "turn_password");
        assert!(settings().validate().is_ok());
        assert!(!format!("{:?}", settings()).contains("\"p\""));
    }

    #[test]
    fn sends_one_binding_request_per_server_then_settles_on_timeout() {
        let mut t = Traversal::new(settings(), local(), Duration::ZERO);
        let (to, data) = t.poll_transmit(Duration::ZERO).unwrap();
        assert_eq!(to, settings().stun[0]);
        assert!(
            Message::from_bytes(&data)
                .unwrap()
                .has_class(MessageClass::Request)
        );
        assert_eq!(t.mapping(), Mapping::Pending);
        // Nobody answers: the mapping is unknown, and `always` starts an allocation.
        t.poll(Duration::from_secs(2));
        assert_eq!(t.mapping(), Mapping::Unknown);
        let (to, _) = t.poll_transmit(Duration::from_secs(2)).unwrap();
        assert_eq!(to, settings().turn.unwrap().addr);
        // No allocation either: relaying is given up with a reason, traffic goes direct.
        t.poll(Duration::from_secs(5));
        assert!(t.is_settled());
        assert!(t.turn_error().is_some());
        assert_eq!(t.path(), NatPath::Direct);
        let peer: SocketAddr = "203.0.113.9:51820".parse().unwrap();
        assert_eq!(t.route(peer, b"x", Duration::from_secs(5)), Route::Direct);
    }

    #[test]
    fn datagrams_from_peers_are_not_ours() {
        let mut t = Traversal::new(settings(), local(), Duration::ZERO);
        let peer: SocketAddr = "203.0.113.9:51820".parse().unwrap();
        assert_eq!(
            t.recv(peer, &[1, 0, 0, 0], Duration::ZERO),
            Received::Wireguard
        );
    }

    proptest::proptest! {
        /// A hostile or broken STUN/TURN server: whatever it sends is consumed
        /// (counted as garbage when it is not STUN), never a panic, never handed to
        /// WireGuard as a peer's datagram.
        #[test]
        fn hostile_server_input_is_consumed(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 1..8),
            cookie in proptest::bool::ANY,
        ) {
            let mut t = Traversal::new(settings(), local(), Duration::ZERO);
            let _ = t.poll_transmit(Duration::ZERO);
            let server = settings().stun[0];
            for (i, mut f) in frames.into_iter().enumerate() {
                if cookie && f.len() >= 20 {
                    // Make some frames look like STUN (type, length, magic cookie).
                    f[0] = 0x01;
                    f[1] = 0x01;
                    let len = u16::try_from(f.len() - 20).unwrap_or(0);
                    f[2..4].copy_from_slice(&len.to_be_bytes());
                    f[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
                }
                let now = Duration::from_millis(i as u64 * 300);
                let r = t.recv(server, &f, now);
                proptest::prop_assert_eq!(r, Received::Consumed);
                t.poll(now);
                while t.poll_transmit(now).is_some() {}
            }
        }
    }

    /// Reads batches from `sock` until `want` peer datagrams came (bounded wait).
    async fn read_batches(
        sock: &NatSocket,
        reader: &mut BatchReader,
        want: usize,
    ) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut got = Vec::new();
        for _ in 0..200 {
            if got.len() >= want {
                break;
            }
            match sock.try_recv_batch(reader).unwrap() {
                Some(n) => {
                    assert!(n >= reader.len());
                    for k in 0..reader.len() {
                        let (d, from) = reader.get(k).unwrap();
                        got.push((d.to_vec(), from));
                    }
                    assert!(reader.get(reader.len()).is_none());
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), sock.readable()).await;
                }
            }
        }
        got
    }

    #[tokio::test]
    async fn a_batch_reader_gives_every_datagram_whole_with_its_sender() {
        let sock = NatSocket::plain(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let to = sock.local_addr().unwrap();
        let mut reader = sock.batch_reader(1500).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // Sizes from 1 byte to past the largest expected datagram (not cut, not mixed).
        let sizes = [1usize, 7, 148, 1200, 1500, 1501, 9000, 65_000];
        let mut sent = Vec::new();
        for i in 0..200usize {
            let (s, from) = if i % 3 == 0 {
                (&a, a.local_addr().unwrap())
            } else {
                (&b, b.local_addr().unwrap())
            };
            let len = sizes[i % sizes.len()];
            let data: Vec<u8> = (0..len).map(|k| (k + i) as u8).collect();
            s.send_to(&data, to).await.unwrap();
            sent.push((data, from));
            if i % 4 == 3 {
                // Let the reader keep up (the socket's buffer holds a few 65 KB ones).
                let got = read_batches(&sock, &mut reader, 4).await;
                let lens = |v: &[(Vec<u8>, SocketAddr)]| {
                    v.iter().map(|(d, f)| (d.len(), *f)).collect::<Vec<_>>()
                };
                assert_eq!(lens(&got), lens(&sent[i - 3..=i]));
                assert!(got == sent[i - 3..=i], "contents differ");
            }
        }
        assert_eq!(
            sock.try_recv_batch(&mut reader).unwrap(),
            None,
            "nothing left"
        );
        assert!(reader.is_empty());
    }

    #[tokio::test]
    async fn a_batch_reader_splits_datagrams_the_kernel_coalesced() {
        let sock = NatSocket::plain(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let to = sock.local_addr().unwrap();
        let mut reader = sock.batch_reader(1500).unwrap();
        // Sent as one GSO transmit: on a kernel with UDP GRO they arrive in one buffer
        // with a stride, elsewhere as separate datagrams; either way ten come out.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = sender.local_addr().unwrap();
        let state = quinn_udp::UdpSocketState::new((&sender).into()).unwrap();
        let segments = state.max_gso_segments().clamp(1, 10);
        let mut payload = Vec::new();
        for i in 0..segments {
            let len = if i + 1 == segments { 300 } else { 1000 };
            payload.extend((0..len).map(|k| (k * 7 + i) as u8));
        }
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: &payload,
            segment_size: (segments > 1).then_some(1000),
            src_ip: None,
        };
        state.send((&sender).into(), &transmit).unwrap();
        let got = read_batches(&sock, &mut reader, segments).await;
        assert_eq!(got.len(), segments);
        let mut at = 0;
        for (i, (d, f)) in got.iter().enumerate() {
            assert_eq!(*f, from);
            assert_eq!(d.len(), if i + 1 == segments { 300 } else { 1000 });
            assert_eq!(d[..], payload[at..at + d.len()]);
            at += d.len();
        }
    }
}
