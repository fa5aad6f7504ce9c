//! Egress policy: which destinations an exit dials for its peers. Sans-IO.
//!
//! Refused by default (QUALITY.md case 18): loopback, private (RFC 1918, fc00::/7),
//! link-local (169.254/16 incl. the cloud metadata address, fe80::/10), CGNAT
//! (100.64/10), multicast, broadcast, unspecified, documentation/benchmark ranges, the
//! provider's own addresses, and IPv4-mapped IPv6 forms of all of these. An explicit
//! allow-list (tests, dev) can name ranges that would otherwise be refused. Ports are
//! limited to the offer's protocols.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use ipsx_egress::{Protocol, special_range};

/// An address range (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address; `key` names the field for the error.
    pub fn parse(key: &str, s: &str) -> Result<Self, crate::ProviderError> {
        let bad = |reason: &str| crate::ProviderError::Config {
            key: key.to_owned(),
            reason: format!("`{}`: {reason}", s.chars().take(64).collect::<String>()),
        };
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad("bad prefix"))?,
            None => max,
        };
        if prefix > max {
            return Err(bad("prefix too long"));
        }
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is inside the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Loopback, private, link-local, CGNAT, multicast ... (the name of the range).
    Range(&'static str),
    /// One of the provider's own addresses.
    OwnAddress,
    /// The port is outside the offer's protocols.
    Port(u16),
    /// The exit has no address of that family to dial from.
    Family,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Range(r) => write!(f, "{r} destination"),
            Self::OwnAddress => f.write_str("the provider's own address"),
            Self::Port(p) => write!(f, "port {p} outside the offer's protocols"),
            Self::Family => f.write_str("no exit address of that IP family"),
        }
    }
}

/// The checked egress policy of one exit.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    protocols: Vec<Protocol>,
    allow: Vec<Cidr>,
    own: Vec<IpAddr>,
    exit_v4: bool,
    exit_v6: bool,
}

impl EgressPolicy {
    /// A policy allowing `protocols`, refusing `own` addresses and the special ranges
    /// except those inside `allow`; `exit` is the address flows are dialled from.
    pub fn new(protocols: Vec<Protocol>, allow: Vec<Cidr>, own: Vec<IpAddr>, exit: IpAddr) -> Self {
        let mut own = own;
        own.push(exit);
        Self {
            protocols,
            allow,
            own,
            exit_v4: exit.is_ipv4(),
            exit_v6: exit.is_ipv6(),
        }
    }

    /// Checks one destination (the address actually dialled).
    pub fn check(&self, dst: SocketAddr) -> Result<(), Refusal> {
        let ip = canonical(dst.ip());
        if !self.protocols.iter().any(|p| p.allows(dst.port())) {
            return Err(Refusal::Port(dst.port()));
        }
        let allowed = self.allow.iter().any(|c| c.contains(ip));
        if !allowed {
            if self.own.iter().any(|o| canonical(*o) == ip) {
                return Err(Refusal::OwnAddress);
            }
            if let Some(r) = special_range(dst.ip()) {
                return Err(Refusal::Range(r));
            }
        }
        if (ip.is_ipv4() && !self.exit_v4) || (ip.is_ipv6() && !self.exit_v6) {
            return Err(Refusal::Family);
        }
        Ok(())
    }
}

use ipsx_egress::canonical;

/// Addresses of this host that a flow must not reach: every address on every local
/// interface (from `/proc/net/fib_trie` for IPv4, `/proc/net/if_inet6` for IPv6), and
/// the source addresses the kernel would pick for the default routes (a connected UDP
/// socket sends nothing), which also covers systems without `/proc`.
pub fn discover_own_addresses() -> Vec<IpAddr> {
    let mut v = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        v.extend(parse_fib_trie_locals(&text).into_iter().map(IpAddr::V4));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        v.extend(parse_if_inet6(&text).into_iter().map(IpAddr::V6));
    }
    let probes: [(SocketAddr, SocketAddr); 2] = [
        (
            (Ipv4Addr::UNSPECIFIED, 0).into(),
            (Ipv4Addr::new(192, 0, 2, 1), 9).into(),
        ),
        (
            (Ipv6Addr::UNSPECIFIED, 0).into(),
            (
                "2001:db8::1"
                    .parse::<Ipv6Addr>()
                    .unwrap_or(Ipv6Addr::LOCALHOST),
                9,
            )
                .into(),
        ),
    ];
    for (bind, probe) in probes {
        if let Ok(s) = std::net::UdpSocket::bind(bind)
            && s.connect(probe).is_ok()
            && let Ok(local) = s.local_addr()
            && !local.ip().is_unspecified()
        {
            v.push(local.ip());
        }
    }
    v.sort();
    v.dedup();
    v
}

/// The host's own IPv4 addresses in the text of `/proc/net/fib_trie`: each leaf
/// (`|-- a.b.c.d`) followed by a `/32 host LOCAL` line. Malformed lines are skipped.
pub fn parse_fib_trie_locals(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
        } else if t.starts_with('+') || t.ends_with(':') {
            leaf = None;
        } else if let Some(a) = leaf {
            let mut words = t.split_whitespace();
            if words.next() == Some("/32")
                && words.next() == Some("host")
                && words.next() == Some("LOCAL")
                && !out.contains(&a)
            {
                out.push(a);
            }
        }
    }
    out
}

/// The host's IPv6 addresses in the text of `/proc/net/if_inet6` (first field of each
/// line: 32 hex digits). Malformed lines are skipped.
pub fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            if hex.len() != 32 || !hex.is_ascii() {
                return None;
            }
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(Ipv6Addr::from(octets))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> EgressPolicy {
        EgressPolicy::new(
            vec![Protocol::Http, Protocol::Https],
            allow
                .iter()
                .map(|a| Cidr::parse("allow", a).unwrap())
                .collect(),
            vec!["203.0.113.9".parse().unwrap(), "8.8.4.4".parse().unwrap()],
            "127.0.0.2".parse().unwrap(),
        )
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refuses_the_quality_md_list() {
        let p = policy(&[]);
        for dst in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "10.1.2.3:80",
            "172.16.0.1:80",
            "172.31.255.255:443",
            "192.168.1.1:80",
            "100.64.0.1:80",
            "100.127.255.255:80",
            "169.254.169.254:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[fc00::1]:80",
            "[fd12::1]:443",
            "[fe80::1]:80",
            "[::]:80",
            "[ff02::1]:80",
            "[64:ff9b::a00:1]:80",
        ] {
            assert!(p.check(sa(dst)).is_err(), "{dst} should be refused");
        }
        assert_eq!(p.check(sa("8.8.4.4:80")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("127.0.0.2:80")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("93.184.216.34:22")), Err(Refusal::Port(22)));
        assert_eq!(p.check(sa("93.184.216.34:80")), Ok(()));
        assert_eq!(p.check(sa("[2606:4700::1]:443")), Err(Refusal::Family));
        assert!(!policy(&[]).protocols.iter().any(|p| p.allows(25)));
    }

    #[test]
    fn allow_list_opens_ranges_but_not_ports() {
        let p = policy(&["127.0.0.0/8"]);
        assert_eq!(p.check(sa("127.0.0.1:80")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:22")), Err(Refusal::Port(22)));
        assert!(p.check(sa("10.0.0.1:80")).is_err());
        // Explicitly allowed own address (tests run everything on loopback).
        assert_eq!(p.check(sa("127.0.0.2:80")), Ok(()));
    }

    #[test]
    fn cidr_parsing() {
        assert!(Cidr::parse("k", "10.0.0.0/33").is_err());
        assert!(Cidr::parse("k", "nonsense").is_err());
        assert!(Cidr::parse("k", "::/129").is_err());
        let all = Cidr::parse("k", "0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let err = Cidr::parse("allow_destinations", "x/1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_destinations"));
    }

    const FIB_TRIE: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n        +-- 127.0.0.0/31 1 0 0\n           |-- 127.0.0.0\n              /8 host LOCAL\n           |-- 127.0.0.1\n              /32 host LOCAL\n        |-- 127.255.255.255\n           /32 link BROADCAST\n     +-- 192.0.2.0/24 2 0 2\n        +-- 192.0.2.0/30 2 0 2\n           |-- 192.0.2.0\n              /24 link UNICAST\n           |-- 192.0.2.2\n              /32 host LOCAL\n     |-- 198.51.100.7\n        /32 host LOCAL\nLocal:\n  +-- 0.0.0.0/0 3 0 5\n           |-- 192.0.2.2\n              /32 host LOCAL\n";

    #[test]
    fn every_local_address_is_found() {
        let v4 = parse_fib_trie_locals(FIB_TRIE);
        let want: Vec<Ipv4Addr> = ["127.0.0.1", "192.0.2.2", "198.51.100.7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v4, want, "only /32 host LOCAL leaves, each once");
        let v6 = parse_if_inet6(
            "fd000000000000000000000000000002 04 40 00 82     eth0\n00000000000000000000000000000001 01 80 10 80       lo\nzz\n",
        );
        assert_eq!(
            v6,
            vec!["fd00::2".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]
        );
        // On this host, every address the kernel lists is refused as the exit's own.
        let own = discover_own_addresses();
        if let Ok(t) = std::fs::read_to_string("/proc/net/fib_trie") {
            for a in parse_fib_trie_locals(&t) {
                assert!(own.contains(&IpAddr::V4(a)), "{a} missing from {own:?}");
            }
        }
        let p = EgressPolicy::new(
            vec![Protocol::Any],
            vec![],
            own.clone(),
            "127.0.0.2".parse().unwrap(),
        );
        for a in own {
            assert!(p.check(SocketAddr::new(a, 80)).is_err(), "{a} allowed");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_v4_check_is_total(a in proptest::num::u32::ANY, port in proptest::num::u16::ANY) {
            let p = policy(&["127.0.0.0/8"]);
            let _ = p.check(SocketAddr::from((Ipv4Addr::from(a), port)));
        }

        #[test]
        fn proc_parsers_never_panic(s in "\\PC{0,400}") {
            let _ = parse_fib_trie_locals(&s);
            let _ = parse_if_inet6(&s);
        }

        #[test]
        fn fib_trie_finds_generated_locals(addrs in proptest::collection::vec(proptest::num::u32::ANY, 0..20), other in proptest::collection::vec(proptest::num::u32::ANY, 0..20)) {
            let mut text = String::from("Main:\n  +-- 0.0.0.0/0 3 0 5\n");
            for a in &addrs {
                text.push_str(&format!("     |-- {}\n        /32 host LOCAL\n", Ipv4Addr::from(*a)));
            }
            for a in &other {
                text.push_str(&format!("     |-- {}\n        /24 link UNICAST\n        /32 link BROADCAST\n", Ipv4Addr::from(*a)));
            }
            let got = parse_fib_trie_locals(&text);
            for a in &addrs {
                proptest::prop_assert!(got.contains(&Ipv4Addr::from(*a)));
            }
            for g in &got {
                proptest::prop_assert!(addrs.contains(&u32::from(*g)));
            }
        }

        #[test]
        fn if_inet6_round_trips(a in proptest::num::u128::ANY) {
            let line = format!("{a:032x} 02 40 00 80 eth0\n");
            proptest::prop_assert_eq!(parse_if_inet6(&line), vec![Ipv6Addr::from(a)]);
        }

        #[test]
        fn mapped_v6_same_verdict_as_v4(a in proptest::num::u32::ANY) {
            let p = EgressPolicy::new(vec![Protocol::Any], vec![], vec![], "::".parse().unwrap());
            let v4 = Ipv4Addr::from(a);
            let mapped = v4.to_ipv6_mapped();
            let r4 = special_range(IpAddr::V4(v4)).is_some();
            let r6 = p.check(SocketAddr::from((mapped, 80))).is_err();
            proptest::prop_assert!(!r4 || r6);
        }
    }
}
