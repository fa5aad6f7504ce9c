//! The exit's UDP flow table (sans-IO): which requester datagrams become relayed
//! flows, which are dropped and why, when a flow has been idle long enough to end, and
//! what each ended flow puts in the connection log.
//!
//! A flow is one (peer, inner source address and port, destination address and port).
//! Its first datagram passes the same checks as a TCP SYN: ports not 0, the egress
//! policy ([`EgressPolicy::check`]), then the peer's flow caps and flow rate
//! ([`FlowLimiter::admit`], shared with TCP: a UDP flow holds one of the peer's
//! `max_flows_per_peer` places until it ends). A flow ends when no datagram moved
//! either way for its idle timeout ([`udp_idle`]), when its socket fails, or when its
//! peer is removed; each end releases its place and yields a [`ClosedFlow`] for the log.
//!
//! The runtime ([`crate::udp_relay`]) owns one host UDP socket per flow and feeds this
//! table the datagrams and a millisecond clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::SocketAddr;
use std::time::Duration;

use crate::limits::{FlowLimiter, LimitRefusal};
use crate::policy::{EgressPolicy, Refusal};

/// The longest a UDP flow stays open without a datagram, whatever `limits.idle_timeout`
/// says (UDP has no close; NATs use similar timeouts).
pub const UDP_IDLE_MAX: Duration = Duration::from_secs(120);

/// The idle timeout of UDP flows for a given `limits.idle_timeout`: the smaller of it
/// and [`UDP_IDLE_MAX`].
pub fn udp_idle(idle_timeout: Duration) -> Duration {
    idle_timeout.min(UDP_IDLE_MAX)
}

/// A flow's identity in the runtime (never reused within one table).
pub type FlowId = u64;

/// What identifies a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey<K> {
    /// The peer (deal).
    pub peer: K,
    /// The requester's inner address and port.
    pub src: SocketAddr,
    /// The destination.
    pub dst: SocketAddr,
}

/// Why a requester datagram was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// Source or destination port 0.
    PortZero,
    /// The egress policy refuses the destination.
    Refused(Refusal),
    /// The peer's flow caps or flow rate refuse a new flow.
    Limited(LimitRefusal),
}

impl std::fmt::Display for UdpDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PortZero => f.write_str("port 0"),
            Self::Refused(r) => r.fmt(f),
            Self::Limited(l) => l.fmt(f),
        }
    }
}

/// The verdict on one requester datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpVerdict {
    /// Send it on the existing flow.
    Forward(FlowId),
    /// A new flow was admitted: open its socket, then send it.
    Open(FlowId),
    /// Drop it.
    Drop(UdpDrop),
}

/// A flow that ended, for the connection log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedFlow<K> {
    /// Its id.
    pub id: FlowId,
    /// Its key.
    pub key: FlowKey<K>,
    /// When it opened (the table's clock, ms).
    pub opened_ms: u64,
    /// How long it lasted, ms.
    pub duration_ms: u64,
    /// Payload bytes from the peer.
    pub bytes_up: u64,
    /// Payload bytes to the peer.
    pub bytes_down: u64,
}

#[derive(Debug, Clone)]
struct Flow {
    id: FlowId,
    opened_ms: u64,
    last_ms: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// Every live UDP flow of an exit.
#[derive(Debug, Clone)]
pub struct UdpFlows<K> {
    idle_ms: u64,
    flows: HashMap<FlowKey<K>, Flow>,
    ids: HashMap<FlowId, FlowKey<K>>,
    next_id: FlowId,
}

impl<K: Hash + Eq + Copy> UdpFlows<K> {
    /// An empty table whose flows end after `idle` without a datagram.
    pub fn new(idle: Duration) -> Self {
        Self {
            idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1),
            flows: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
        }
    }

    /// A datagram of `len` payload bytes from `peer`'s `src` to `dst` at `now_ms`.
    /// A new flow is admitted by `policy` and `limiter` (it then holds a place in
    /// `limiter` until it ends).
    pub fn outbound(
        &mut self,
        limiter: &mut FlowLimiter<K>,
        policy: &EgressPolicy,
        key: FlowKey<K>,
        len: usize,
        now_ms: u64,
    ) -> UdpVerdict {
        if let Some(f) = self.flows.get_mut(&key) {
            f.last_ms = now_ms;
            f.bytes_up = f.bytes_up.saturating_add(len as u64);
            return UdpVerdict::Forward(f.id);
        }
        if key.src.port() == 0 || key.dst.port() == 0 {
            return UdpVerdict::Drop(UdpDrop::PortZero);
        }
        if let Err(r) = policy.check(key.dst) {
            return UdpVerdict::Drop(UdpDrop::Refused(r));
        }
        if let Err(l) = limiter.admit(key.peer, now_ms) {
            return UdpVerdict::Drop(UdpDrop::Limited(l));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.flows.insert(
            key,
            Flow {
                id,
                opened_ms: now_ms,
                last_ms: now_ms,
                bytes_up: len as u64,
                bytes_down: 0,
            },
        );
        self.ids.insert(id, key);
        UdpVerdict::Open(id)
    }

    /// A reply of `len` payload bytes on flow `id` at `now_ms`; its key (where to send
    /// it), or `None` if the flow has ended.
    pub fn inbound(&mut self, id: FlowId, len: usize, now_ms: u64) -> Option<FlowKey<K>> {
        let key = *self.ids.get(&id)?;
        let f = self.flows.get_mut(&key)?;
        f.last_ms = now_ms;
        f.bytes_down = f.bytes_down.saturating_add(len as u64);
        Some(key)
    }

    fn end(
        &mut self,
        key: &FlowKey<K>,
        limiter: &mut FlowLimiter<K>,
        now_ms: u64,
    ) -> Option<ClosedFlow<K>> {
        let f = self.flows.remove(key)?;
        self.ids.remove(&f.id);
        limiter.release(key.peer);
        Some(ClosedFlow {
            id: f.id,
            key: *key,
            opened_ms: f.opened_ms,
            duration_ms: now_ms.saturating_sub(f.opened_ms),
            bytes_up: f.bytes_up,
            bytes_down: f.bytes_down,
        })
    }

    /// Ends every flow idle for the timeout at `now_ms`.
    pub fn expire(&mut self, limiter: &mut FlowLimiter<K>, now_ms: u64) -> Vec<ClosedFlow<K>> {
        let idle = self.idle_ms;
        let stale: Vec<FlowKey<K>> = self
            .flows
            .iter()
            .filter(|(_, f)| now_ms.saturating_sub(f.last_ms) >= idle)
            .map(|(k, _)| *k)
            .collect();
        stale
            .iter()
            .filter_map(|k| self.end(k, limiter, now_ms))
            .collect()
    }

    /// Ends flow `id` (its socket failed); `None` if it had ended already.
    pub fn close(
        &mut self,
        id: FlowId,
        limiter: &mut FlowLimiter<K>,
        now_ms: u64,
    ) -> Option<ClosedFlow<K>> {
        let key = *self.ids.get(&id)?;
        self.end(&key, limiter, now_ms)
    }

    /// Ends every flow of `peer` (it was removed).
    pub fn close_peer(
        &mut self,
        peer: &K,
        limiter: &mut FlowLimiter<K>,
        now_ms: u64,
    ) -> Vec<ClosedFlow<K>> {
        let keys: Vec<FlowKey<K>> = self
            .flows
            .keys()
            .filter(|k| k.peer == *peer)
            .copied()
            .collect();
        keys.iter()
            .filter_map(|k| self.end(k, limiter, now_ms))
            .collect()
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is live.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Live flows of `peer`.
    pub fn flows_of(&self, peer: &K) -> usize {
        self.flows.keys().filter(|k| k.peer == *peer).count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::policy::{Cidr, Protocol};

    fn policy(protocols: Vec<Protocol>) -> EgressPolicy {
        EgressPolicy::new(
            protocols,
            vec![Cidr::parse("allow", "127.0.0.1/32").unwrap()],
            vec![],
            "127.0.0.2".parse().unwrap(),
        )
    }

    fn key(peer: u8, sport: u16, dst: &str) -> FlowKey<u8> {
        FlowKey {
            peer,
            src: SocketAddr::new("10.77.0.2".parse().unwrap(), sport),
            dst: dst.parse().unwrap(),
        }
    }

    fn limits(per_peer: u32, rate: u32) -> Limits {
        Limits {
            max_flows_per_peer: per_peer,
            max_flows_total: 100,
            new_flows_per_second: rate,
            ..Limits::default()
        }
    }

    #[test]
    fn a_flow_opens_once_forwards_then_expires_and_releases_its_place() {
        let mut lim = FlowLimiter::new(limits(10, 10));
        let p = policy(vec![Protocol::Any]);
        let mut t = UdpFlows::new(Duration::from_secs(2));
        let k = key(1, 5000, "127.0.0.1:53");
        let UdpVerdict::Open(id) = t.outbound(&mut lim, &p, k, 10, 0) else {
            panic!("not opened")
        };
        assert_eq!(t.outbound(&mut lim, &p, k, 5, 500), UdpVerdict::Forward(id));
        assert_eq!(lim.live(&1), 1);
        assert_eq!(t.inbound(id, 100, 1500), Some(k));
        // Replies keep it alive too.
        assert!(t.expire(&mut lim, 3000).is_empty());
        let closed = t.expire(&mut lim, 3500);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (
                closed[0].bytes_up,
                closed[0].bytes_down,
                closed[0].duration_ms
            ),
            (15, 100, 3500)
        );
        assert_eq!(lim.live(&1), 0);
        assert_eq!(t.inbound(id, 1, 3600), None);
        // The same key again is a new flow with a new id.
        assert!(matches!(t.outbound(&mut lim, &p, k, 1, 4000), UdpVerdict::Open(n) if n != id));
    }

    #[test]
    fn refusals_ports_and_limits() {
        let mut lim = FlowLimiter::new(limits(2, 100));
        let p = policy(vec![Protocol::Http, Protocol::Https]);
        let mut t = UdpFlows::new(Duration::from_secs(60));
        assert_eq!(
            t.outbound(&mut lim, &p, key(1, 1, "127.0.0.1:0"), 1, 0),
            UdpVerdict::Drop(UdpDrop::PortZero)
        );
        assert_eq!(
            t.outbound(&mut lim, &p, key(1, 0, "127.0.0.1:443"), 1, 0),
            UdpVerdict::Drop(UdpDrop::PortZero)
        );
        assert_eq!(
            t.outbound(&mut lim, &p, key(1, 1, "127.0.0.1:53"), 1, 0),
            UdpVerdict::Drop(UdpDrop::Refused(Refusal::Port(53)))
        );
        for dst in [
            "127.0.0.5:443",
            "169.254.169.254:443",
            "10.0.0.1:443",
            "127.0.0.2:443",
        ] {
            assert!(
                matches!(
                    t.outbound(&mut lim, &p, key(1, 1, dst), 1, 0),
                    UdpVerdict::Drop(UdpDrop::Refused(_))
                ),
                "{dst}"
            );
        }
        // QUIC (UDP 443) is allowed by `https`.
        assert!(matches!(
            t.outbound(&mut lim, &p, key(1, 1, "127.0.0.1:443"), 1, 0),
            UdpVerdict::Open(_)
        ));
        assert!(matches!(
            t.outbound(&mut lim, &p, key(1, 2, "127.0.0.1:443"), 1, 0),
            UdpVerdict::Open(_)
        ));
        assert_eq!(
            t.outbound(&mut lim, &p, key(1, 3, "127.0.0.1:443"), 1, 0),
            UdpVerdict::Drop(UdpDrop::Limited(LimitRefusal::PeerFlows))
        );
        // Another peer is not affected; removing the first frees its places.
        assert!(matches!(
            t.outbound(&mut lim, &p, key(2, 3, "127.0.0.1:443"), 1, 0),
            UdpVerdict::Open(_)
        ));
        assert_eq!(t.close_peer(&1, &mut lim, 10).len(), 2);
        assert_eq!((lim.live(&1), t.flows_of(&1), t.len()), (0, 0, 1));
    }

    #[test]
    fn the_flow_rate_applies() {
        let mut lim = FlowLimiter::new(limits(100, 3));
        let p = policy(vec![Protocol::Any]);
        let mut t = UdpFlows::new(Duration::from_secs(60));
        let mut opened = 0;
        for sport in 1..=10u16 {
            if let UdpVerdict::Open(_) =
                t.outbound(&mut lim, &p, key(1, sport, "127.0.0.1:9"), 1, 0)
            {
                opened += 1;
            }
        }
        assert_eq!(opened, 3);
        assert!(matches!(
            t.outbound(&mut lim, &p, key(1, 11, "127.0.0.1:9"), 1, 0),
            UdpVerdict::Drop(UdpDrop::Limited(LimitRefusal::Rate))
        ));
        // A second later the bucket has refilled.
        assert!(matches!(
            t.outbound(&mut lim, &p, key(1, 11, "127.0.0.1:9"), 1, 1000),
            UdpVerdict::Open(_)
        ));
    }

    #[test]
    fn close_is_idempotent_and_idle_is_capped() {
        let mut lim = FlowLimiter::new(limits(10, 10));
        let p = policy(vec![Protocol::Any]);
        let mut t = UdpFlows::new(Duration::from_secs(1));
        let UdpVerdict::Open(id) = t.outbound(&mut lim, &p, key(1, 7, "127.0.0.1:7"), 3, 0) else {
            panic!()
        };
        assert!(t.close(id, &mut lim, 5).is_some());
        assert!(t.close(id, &mut lim, 6).is_none());
        assert_eq!(lim.live(&1), 0);
        assert_eq!(udp_idle(Duration::from_secs(300)), UDP_IDLE_MAX);
        assert_eq!(udp_idle(Duration::from_secs(2)), Duration::from_secs(2));
    }

    proptest::proptest! {
        /// Whatever the datagrams and clock, the limiter's count equals the table's.
        #[test]
        fn places_held_match_live_flows(ops in proptest::collection::vec((0u8..3, 0u16..6, 0u16..4, 0u64..3000, proptest::bool::ANY), 0..200)) {
            let mut lim = FlowLimiter::new(limits(4, 5));
            let p = policy(vec![Protocol::Any]);
            let mut t = UdpFlows::new(Duration::from_secs(1));
            let mut now = 0;
            for (peer, sport, dport, dt, expire) in ops {
                now += dt;
                let _ = t.outbound(&mut lim, &p, key(peer, sport, &format!("127.0.0.1:{dport}")), 10, now);
                if expire {
                    let _ = t.expire(&mut lim, now);
                }
                if peer == 2 && sport == 5 {
                    let _ = t.close_peer(&1, &mut lim, now);
                }
                proptest::prop_assert_eq!(lim.total() as usize, t.len());
                for peer in 0..3u8 {
                    proptest::prop_assert_eq!(lim.live(&peer) as usize, t.flows_of(&peer));
                    proptest::prop_assert!(t.flows_of(&peer) <= 4);
                }
            }
        }
    }
}
