//! Which destinations an exit may dial, shared by the gateway (local exits, the address
//! actually dialled) and the provider (its peers' flows), so both refuse exactly the
//! same things (QUALITY.md cases 12 and 18).
//!
//! Owns: the special address ranges, how IPv6 forms that carry an IPv4 address are
//! judged, and the destination ports of an offer's protocols. Does not own allow-lists
//! or a host's own addresses: each caller applies those first. Sans-IO.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A protocol an exit carries, i.e. a set of destination ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP 80.
    Http,
    /// TCP 443.
    Https,
    /// TCP 25, 465, 587.
    Smtp,
    /// Every port but 0.
    Any,
}

impl Protocol {
    /// The lower-case name used in configs, JSON and signed payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Smtp => "smtp",
            Self::Any => "any",
        }
    }

    /// True when this protocol allows destination `port`.
    pub fn allows(self, port: u16) -> bool {
        match self {
            Self::Http => port == 80,
            Self::Https => port == 443,
            Self::Smtp => matches!(port, 25 | 465 | 587),
            Self::Any => port != 0,
        }
    }
}

/// Names the special range `ip` falls in (loopback, private, link-local, CGNAT,
/// multicast, reserved, documentation, ...), or `None` for an ordinary public address.
///
/// IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses are judged
/// by the IPv4 address they carry; deprecated IPv4-compatible ones (`::a.b.c.d`) are
/// refused outright.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return special_v4(v4);
            }
            special_v6(v6)
        }
    }
}

/// The IPv4 address inside an IPv4-mapped or NAT64 address.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let mapped = s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff;
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
    (mapped || nat64)
        .then(|| Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (what a socket dials).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    let name = match o {
        [0, ..] => "unspecified (0.0.0.0/8)",
        [127, ..] => "loopback (127.0.0.0/8)",
        [10, ..] => "private (10.0.0.0/8)",
        [172, b, ..] if (16..32).contains(&b) => "private (172.16.0.0/12)",
        [192, 168, ..] => "private (192.168.0.0/16)",
        [169, 254, ..] => "link-local (169.254.0.0/16)",
        [100, b, ..] if (64..128).contains(&b) => "CGNAT (100.64.0.0/10)",
        [192, 0, 0, _] => "IETF protocol assignments (192.0.0.0/24)",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation",
        [198, 18 | 19, ..] => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..240).contains(&a) => "multicast (224.0.0.0/4)",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(name)
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let name = if ip.is_unspecified() {
        "unspecified (::)"
    } else if ip.is_loopback() {
        "loopback (::1)"
    } else if s[..6] == [0, 0, 0, 0, 0, 0] {
        "IPv4-compatible (deprecated, ::/96)"
    } else if s[0] & 0xfe00 == 0xfc00 {
        "unique local (fc00::/7)"
    } else if s[0] & 0xffc0 == 0xfe80 {
        "link-local (fe80::/10)"
    } else if s[0] & 0xff00 == 0xff00 {
        "multicast (ff00::/8)"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "documentation (2001:db8::/32)"
    } else {
        return None;
    };
    Some(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges_are_named() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "203.0.113.7",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
            "::8.8.8.8",
        ] {
            assert!(special_range(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:93.184.216.34",
            "64:ff9b::5db8:d822",
        ] {
            assert_eq!(special_range(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn protocols_carry_their_ports() {
        assert!(Protocol::Http.allows(80) && !Protocol::Http.allows(443));
        assert!(Protocol::Smtp.allows(587) && !Protocol::Smtp.allows(80));
        assert!(Protocol::Any.allows(1) && !Protocol::Any.allows(0));
    }

    proptest::proptest! {
        #[test]
        fn mapped_and_nat64_forms_get_the_ipv4_verdict(a in proptest::num::u32::ANY) {
            let v4 = Ipv4Addr::from(a);
            let verdict = special_range(IpAddr::V4(v4)).is_some();
            proptest::prop_assert_eq!(special_range(IpAddr::V6(v4.to_ipv6_mapped())).is_some(), verdict);
            let o = v4.octets();
            let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]));
            proptest::prop_assert_eq!(special_range(IpAddr::V6(nat64)).is_some(), verdict);
        }
    }
}
