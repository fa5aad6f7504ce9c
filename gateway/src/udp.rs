//! The sans-IO core of one SOCKS5 UDP association (RFC 1928 section 7): which client
//! datagrams are relayed and where, which answers go back, and why the others are
//! dropped. No sockets and no clock: the runtime (`udp_front.rs`) feeds it datagrams
//! and instants and does what it says.
//!
//! Rules, from the RFC and our egress policy:
//! - Only the client sends into the association: datagrams must come from the address
//!   the UDP ASSOCIATE request named; an unspecified address stands for the control
//!   connection's address, and port 0 for "the source port of the first datagram".
//! - `FRAG` other than 0 is dropped ("an implementation that does not support
//!   fragmentation MUST drop any datagram whose FRAG field is other than X'00'").
//! - At most `max_destinations` distinct destinations per association; their policy
//!   verdicts (resolved address, or why refused) are kept so a destination is resolved
//!   and checked once.
//! - Answers are relayed only from destinations the client sent to (endpoint-dependent
//!   filtering, as a NAT does): an unrelated host cannot reach the client by guessing
//!   the exit's port.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use crate::http1::Host;
use crate::socks5::{self, UdpHeader};

/// The longest SOCKS5 UDP header a client may send: `RSV FRAG ATYP LEN NAME PORT` with
/// a 255-byte name.
pub const MAX_CLIENT_HEADER: usize = 3 + 1 + 1 + 255 + 2;

/// Why a datagram was dropped; [`Dropped::reason`] is its metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Dropped {
    /// From another address than the association's client.
    Foreign,
    /// `FRAG` was not 0.
    Fragment,
    /// A header that does not parse (truncated, reserved bytes, address type, name).
    Malformed,
    /// Destination port 0, or a port the exit does not carry.
    Port,
    /// Larger than `gateway.udp_max_datagram` (or than the exit can carry).
    Oversize,
    /// A new destination beyond `gateway.udp_max_destinations`.
    Destinations,
    /// A destination the egress policy refuses (loopback, private, ...).
    Refused,
    /// A destination name that did not resolve.
    Resolve,
    /// An answer from an address the client never sent to.
    Unsolicited,
    /// The exit could not send it.
    SendFailed,
    /// An answer that reached a WireGuard exit's tunnel while the association's socket
    /// there had no room (the relay did not keep up with the exit).
    ExitBufferFull,
}

impl Dropped {
    /// Every reason, in label order (for counters).
    pub const ALL: [Dropped; 11] = [
        Self::Foreign,
        Self::Fragment,
        Self::Malformed,
        Self::Port,
        Self::Oversize,
        Self::Destinations,
        Self::Refused,
        Self::Resolve,
        Self::Unsolicited,
        Self::SendFailed,
        Self::ExitBufferFull,
    ];

    /// The metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Foreign => "foreign_source",
            Self::Fragment => "fragment",
            Self::Malformed => "malformed",
            Self::Port => "port",
            Self::Oversize => "oversize",
            Self::Destinations => "destinations",
            Self::Refused => "refused",
            Self::Resolve => "resolve",
            Self::Unsolicited => "unsolicited",
            Self::SendFailed => "send_failed",
            Self::ExitBufferFull => "exit_buffer_full",
        }
    }
}

/// The limits of one association, from `[gateway]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `gateway.udp_max_destinations`.
    pub max_destinations: usize,
    /// `gateway.udp_max_datagram`: the largest payload either way.
    pub max_datagram: usize,
    /// `gateway.udp_idle_timeout`.
    pub idle: Duration,
}

/// What the exit said about a destination, kept for the association's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send to this address.
    Send(SocketAddr),
    /// Dropped, for this reason.
    Drop(Dropped),
}

/// A client datagram to relay: where to, and where its payload starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The destination as the client wrote it.
    pub host: Host,
    /// The destination port.
    pub port: u16,
    /// The payload starts at this offset of the datagram.
    pub payload_at: usize,
}

/// One association's state (see the module doc).
#[derive(Debug)]
pub struct Association {
    limits: Limits,
    /// The client's source: IP fixed at start, port fixed at start or learned.
    client_ip: IpAddr,
    client_port: Option<u16>,
    verdicts: HashMap<(Host, u16), Verdict>,
    contacted: HashSet<SocketAddr>,
    last_activity: Instant,
}

impl Association {
    /// An association asked for by a client connected from `peer`, whose request named
    /// `requested` as its datagrams' source (all zeros: not known yet).
    pub fn new(limits: Limits, peer: IpAddr, requested: (&Host, u16), now: Instant) -> Self {
        let client_ip = match requested.0 {
            Host::Ip(ip) if !ip.is_unspecified() => ipsx_egress::canonical(*ip),
            // A name cannot be checked against a datagram's source: the control
            // connection's address stands for it.
            _ => ipsx_egress::canonical(peer),
        };
        Self {
            limits,
            client_ip,
            client_port: (requested.1 != 0).then_some(requested.1),
            verdicts: HashMap::new(),
            contacted: HashSet::new(),
            last_activity: now,
        }
    }

    /// The client's UDP address, once known.
    pub fn client(&self) -> Option<SocketAddr> {
        self.client_port
            .map(|port| SocketAddr::new(self.client_ip, port))
    }

    /// When the association ends unless a datagram passes before.
    pub fn idle_deadline(&self) -> Instant {
        self.last_activity + self.limits.idle
    }

    /// A datagram `datagram` arrived on the relay socket from `from`: its destination,
    /// or why it is dropped. The first datagram from the client's address fixes its
    /// port when the request left it open. `datagram` may be one byte longer than any
    /// acceptable datagram (the runtime's buffer), which reads as oversize.
    pub fn from_client(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Outbound, Dropped> {
        if ipsx_egress::canonical(from.ip()) != self.client_ip
            || self.client_port.is_some_and(|p| p != from.port())
        {
            return Err(Dropped::Foreign);
        }
        let UdpHeader { host, port, len } =
            socks5::parse_udp_header(datagram).map_err(|e| match e {
                socks5::UdpHeaderError::Fragment(_) => Dropped::Fragment,
                socks5::UdpHeaderError::PortZero => Dropped::Port,
                _ => Dropped::Malformed,
            })?;
        if datagram.len() - len > self.limits.max_datagram {
            return Err(Dropped::Oversize);
        }
        // Only a well-formed datagram from the client's address may fix its port.
        self.client_port.get_or_insert(from.port());
        self.last_activity = now;
        Ok(Outbound {
            host,
            port,
            payload_at: len,
        })
    }

    /// The verdict kept for a destination, if it was checked before.
    pub fn verdict(&self, host: &Host, port: u16) -> Option<&Verdict> {
        self.verdicts.get(&(host.clone(), port))
    }

    /// True when one more destination may be checked and kept.
    pub fn has_room(&self) -> bool {
        self.verdicts.len() < self.limits.max_destinations
    }

    /// Keeps the exit's verdict on a destination (call only when [`Self::has_room`]);
    /// returns what to do with the datagram.
    pub fn record(&mut self, host: Host, port: u16, verdict: Verdict) -> Verdict {
        if let Verdict::Send(addr) = verdict {
            self.contacted.insert(addr);
        }
        self.verdicts.insert((host, port), verdict.clone());
        verdict
    }

    /// An answer of `len` bytes arrived from `from` through the exit: the client to
    /// relay it to, or why it is dropped.
    pub fn from_exit(
        &mut self,
        from: SocketAddr,
        len: usize,
        now: Instant,
    ) -> Result<SocketAddr, Dropped> {
        let from = SocketAddr::new(ipsx_egress::canonical(from.ip()), from.port());
        if !self.contacted.contains(&from) {
            return Err(Dropped::Unsolicited);
        }
        if len > self.limits.max_datagram {
            return Err(Dropped::Oversize);
        }
        // Answers only come from destinations the client sent to, so it is known.
        let client = self.client().ok_or(Dropped::Unsolicited)?;
        self.last_activity = now;
        Ok(client)
    }
}

/// The gateway's UDP counters (shared by every association).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) open: std::sync::atomic::AtomicUsize,
    pub(crate) up: std::sync::atomic::AtomicU64,
    pub(crate) down: std::sync::atomic::AtomicU64,
    pub(crate) dropped: [std::sync::atomic::AtomicU64; Dropped::ALL.len()],
}

impl Counters {
    /// Counts a drop, here and in the metrics.
    pub(crate) fn drop(&self, why: Dropped) {
        self.drop_n(why, 1);
    }

    /// Counts `n` drops for `why`.
    pub(crate) fn drop_n(&self, why: Dropped, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(i) = Dropped::ALL.iter().position(|d| *d == why) {
            self.dropped[i].fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        metrics::counter!("ipsx_udp_dropped_total", "reason" => why.reason()).increment(n);
    }

    pub(crate) fn snapshot(&self) -> UdpStats {
        use std::sync::atomic::Ordering::Relaxed;
        UdpStats {
            associations: self.open.load(Relaxed),
            datagrams_up: self.up.load(Relaxed),
            datagrams_down: self.down.load(Relaxed),
            dropped: Dropped::ALL
                .iter()
                .zip(&self.dropped)
                .map(|(d, n)| (d.reason(), n.load(Relaxed)))
                .collect(),
        }
    }
}

/// A snapshot of the gateway's SOCKS5 UDP relay counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UdpStats {
    /// Associations open now.
    pub associations: usize,
    /// Datagrams relayed from clients to exits.
    pub datagrams_up: u64,
    /// Datagrams relayed from exits back to clients.
    pub datagrams_down: u64,
    /// Datagrams dropped, by [`Dropped::reason`] (every reason listed).
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
}

impl UdpStats {
    /// Datagrams dropped for `why`.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.dropped.get(why.reason()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_destinations: 2,
            max_datagram: 16,
            idle: Duration::from_secs(60),
        }
    }

    fn dgram(dst: SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        socks5::encode_udp_header(dst, &mut d);
        d.extend_from_slice(data);
        d
    }

    fn any() -> (Host, u16) {
        (Host::Ip("0.0.0.0".parse().unwrap()), 0)
    }

    #[test]
    fn the_first_datagram_fixes_the_client_port_and_others_are_foreign() {
        let now = Instant::now();
        let (h, p) = any();
        let mut a = Association::new(limits(), "127.0.0.1".parse().unwrap(), (&h, p), now);
        assert_eq!(a.client(), None);
        let dst: SocketAddr = "127.0.0.9:7".parse().unwrap();
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // Another host first: foreign, and it does not capture the association.
        assert_eq!(
            a.from_client("127.0.0.2:5000".parse().unwrap(), &dgram(dst, b"x"), now),
            Err(Dropped::Foreign)
        );
        // A malformed datagram from the right host does not fix the port either.
        assert_eq!(
            a.from_client(from, &[0, 0, 0, 9], now),
            Err(Dropped::Malformed)
        );
        assert_eq!(a.client(), None);
        let out = a.from_client(from, &dgram(dst, b"hello"), now).unwrap();
        assert_eq!((out.port, out.payload_at), (7, 10));
        assert_eq!(a.client(), Some(from));
        // Same host, other port: foreign now.
        assert_eq!(
            a.from_client("127.0.0.1:5001".parse().unwrap(), &dgram(dst, b"x"), now),
            Err(Dropped::Foreign)
        );
    }

    #[test]
    fn a_requested_address_is_the_only_source() {
        let now = Instant::now();
        let host = Host::Ip("127.0.0.7".parse().unwrap());
        let mut a = Association::new(limits(), "127.0.0.1".parse().unwrap(), (&host, 4000), now);
        let dst: SocketAddr = "127.0.0.9:7".parse().unwrap();
        for from in ["127.0.0.1:4000", "127.0.0.7:4001"] {
            assert_eq!(
                a.from_client(from.parse().unwrap(), &dgram(dst, b"x"), now),
                Err(Dropped::Foreign),
                "{from}"
            );
        }
        // The IPv4-mapped form of the same address is the same client.
        assert!(
            a.from_client(
                "[::ffff:127.0.0.7]:4000".parse().unwrap(),
                &dgram(dst, b"x"),
                now
            )
            .is_ok()
        );
    }

    #[test]
    fn fragments_oversize_and_destination_cap() {
        let now = Instant::now();
        let (h, p) = any();
        let mut a = Association::new(limits(), "127.0.0.1".parse().unwrap(), (&h, p), now);
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.9:7".parse().unwrap();
        let mut frag = dgram(dst, b"x");
        frag[2] = 1;
        assert_eq!(a.from_client(from, &frag, now), Err(Dropped::Fragment));
        assert_eq!(
            a.from_client(from, &dgram(dst, &[0; 17]), now),
            Err(Dropped::Oversize)
        );
        assert!(a.from_client(from, &dgram(dst, &[0; 16]), now).is_ok());
        // Two destinations fit; the third finds no room.
        for port in [7, 8] {
            assert!(a.has_room());
            let host = Host::Ip("127.0.0.9".parse().unwrap());
            let v = Verdict::Send(SocketAddr::new("127.0.0.9".parse().unwrap(), port));
            assert_eq!(a.record(host.clone(), port, v.clone()), v);
            assert_eq!(a.verdict(&host, port), Some(&v));
        }
        assert!(!a.has_room());
    }

    #[test]
    fn answers_only_from_contacted_destinations() {
        let t0 = Instant::now();
        let (h, p) = any();
        let mut a = Association::new(limits(), "127.0.0.1".parse().unwrap(), (&h, p), t0);
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.9:7".parse().unwrap();
        assert_eq!(a.from_exit(dst, 1, t0), Err(Dropped::Unsolicited));
        a.from_client(from, &dgram(dst, b"x"), t0).unwrap();
        a.record(Host::Ip(dst.ip()), 7, Verdict::Send(dst));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(a.from_exit(dst, 16, t1), Ok(from));
        assert_eq!(a.idle_deadline(), t1 + Duration::from_secs(60));
        assert_eq!(a.from_exit(dst, 17, t1), Err(Dropped::Oversize));
        assert_eq!(
            a.from_exit("127.0.0.9:8".parse().unwrap(), 1, t1),
            Err(Dropped::Unsolicited)
        );
        // A refused verdict is kept but does not open the way back.
        let refused: SocketAddr = "10.0.0.1:7".parse().unwrap();
        a.record(Host::Ip(refused.ip()), 7, Verdict::Drop(Dropped::Refused));
        assert_eq!(a.from_exit(refused, 1, t1), Err(Dropped::Unsolicited));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_from_anyone_never_panic_and_respect_the_limits(
            datagrams in proptest::collection::vec(
                (proptest::bool::ANY, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                0..32,
            ),
        ) {
            let now = Instant::now();
            let (h, p) = any();
            let mut a = Association::new(limits(), "127.0.0.1".parse().unwrap(), (&h, p), now);
            for (own, bytes) in datagrams {
                let from: SocketAddr = if own { "127.0.0.1:5000" } else { "127.0.0.2:5000" }
                    .parse()
                    .unwrap();
                match a.from_client(from, &bytes, now) {
                    Ok(out) => {
                        proptest::prop_assert!(own);
                        proptest::prop_assert!(out.payload_at <= bytes.len());
                        proptest::prop_assert!(bytes.len() - out.payload_at <= 16);
                        proptest::prop_assert!(out.port != 0);
                        proptest::prop_assert_eq!(a.client(), Some(from));
                    }
                    Err(Dropped::Foreign) => proptest::prop_assert!(!own),
                    Err(_) => {}
                }
            }
        }
    }
}
