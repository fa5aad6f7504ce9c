//! The exit's inner service map: the few local services a peer reaches at the exit's
//! own address inside its tunnel, past the egress policy.
//!
//! A requester cannot know where the provider agent's listeners are (offers do not say,
//! and they are on loopback by default), and behind a NAT it could not reach them
//! anyway. Inside the deal's tunnel it always reaches the exit's inner address, so a
//! TCP SYN to `(inner address, port)` of a mapped port is relayed to the local address
//! the agent gave for it. Only the exact mapped pairs bypass the egress policy: every
//! other flow to loopback or to the exit's own addresses stays refused.
//!
//! Flows to an inner service are not recorded in the deal's connection log (they are
//! the provider's own service, not traffic relayed for the requester; the log fetch
//! itself goes this way and must not change the log it reads).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The port of the exit's inner address that serves a deal's connection log
/// (`GET /api/connlog/<deal>?expiry=..&signature=..`, see `docs/provider.md`).
pub const CONNLOG_PORT: u16 = ipsx_exchange_client::connlog::SERVICE_PORT;

/// Which `(inner address, port)` pairs are relayed to which local address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InnerServices {
    map: Vec<(u16, SocketAddr)>,
}

impl InnerServices {
    /// No service (every flow goes through the egress policy).
    pub fn none() -> Self {
        Self::default()
    }

    /// The connection-log service on [`CONNLOG_PORT`], served by the listener at
    /// `local` (an unspecified address means this host's loopback).
    pub fn connlog(local: SocketAddr) -> Self {
        Self::none().with(CONNLOG_PORT, local)
    }

    /// Adds (or replaces) the service on `port`.
    pub fn with(mut self, port: u16, local: SocketAddr) -> Self {
        let local = dialable(local);
        match self.map.iter_mut().find(|(p, _)| *p == port) {
            Some(slot) => slot.1 = local,
            None => self.map.push((port, local)),
        }
        self
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Where a flow to `dst` goes when it is one of the services on `inner` (the
    /// exit's inner address): the local listener, else `None` (the egress policy
    /// decides as for any destination).
    pub fn route(&self, inner: IpAddr, dst: SocketAddr) -> Option<SocketAddr> {
        if dst.ip() != inner {
            return None;
        }
        self.map
            .iter()
            .find(|(p, _)| *p == dst.port())
            .map(|(_, local)| *local)
    }
}

/// A listener bound to an unspecified address is dialled on loopback.
fn dialable(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port())
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), a.port())
        }
        _ => a,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{EgressPolicy, Protocol};

    const INNER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 64, 0, 1));

    #[test]
    fn only_the_mapped_port_of_the_inner_address_is_relayed() {
        let local: SocketAddr = "127.0.0.1:41234".parse().unwrap();
        let s = InnerServices::connlog(local);
        assert_eq!(
            s.route(INNER, SocketAddr::new(INNER, CONNLOG_PORT)),
            Some(local)
        );
        // Another port of the inner address, the same port elsewhere, the local
        // listener itself: none is a service.
        assert_eq!(s.route(INNER, SocketAddr::new(INNER, 81)), None);
        assert_eq!(s.route(INNER, SocketAddr::new(INNER, 22)), None);
        let other = IpAddr::V4(Ipv4Addr::new(10, 64, 0, 2));
        assert_eq!(s.route(INNER, SocketAddr::new(other, CONNLOG_PORT)), None);
        assert_eq!(s.route(INNER, local), None);
        assert_eq!(
            s.route(INNER, "127.0.0.1:80".parse().unwrap()),
            None,
            "loopback is not the inner address"
        );
        assert_eq!(
            InnerServices::none().route(INNER, SocketAddr::new(INNER, 80)),
            None
        );
        assert!(InnerServices::none().is_empty());
    }

    #[test]
    fn an_unspecified_listener_is_dialled_on_loopback_and_ports_replace() {
        let s = InnerServices::connlog("0.0.0.0:9000".parse().unwrap());
        assert_eq!(
            s.route(INNER, SocketAddr::new(INNER, CONNLOG_PORT)),
            Some("127.0.0.1:9000".parse().unwrap())
        );
        let s = s.with(CONNLOG_PORT, "[::]:9001".parse().unwrap());
        assert_eq!(
            s.route(INNER, SocketAddr::new(INNER, CONNLOG_PORT)),
            Some("[::1]:9001".parse().unwrap())
        );
    }

    /// The flows the map does not take still meet the egress policy, which refuses
    /// loopback and the exit's own inner address: the map is the only way in.
    #[test]
    fn everything_else_stays_refused_by_the_policy() {
        let policy = EgressPolicy::new(vec![Protocol::Any], Vec::new(), vec![INNER], INNER);
        let s = InnerServices::connlog("127.0.0.1:41234".parse().unwrap());
        for dst in [
            "127.0.0.1:41234",
            "127.0.0.1:80",
            "10.64.0.1:22",
            "10.64.0.1:81",
            "[::1]:80",
        ] {
            let dst: SocketAddr = dst.parse().unwrap();
            assert_eq!(s.route(INNER, dst), None, "{dst}");
            assert!(policy.check(dst).is_err(), "{dst} must stay refused");
        }
    }

    proptest::proptest! {
        /// Whatever the destination, a flow is relayed only for the exact pair.
        #[test]
        fn routes_only_the_exact_pair(a in proptest::prelude::any::<[u8; 4]>(), port in proptest::prelude::any::<u16>()) {
            let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
            let s = InnerServices::connlog(local);
            let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port);
            let want = (dst.ip() == INNER && port == CONNLOG_PORT).then_some(local);
            proptest::prop_assert_eq!(s.route(INNER, dst), want);
        }
    }
}
