//! Which destination addresses the gateway refuses to dial (QUALITY.md case 12).
//!
//! Checked on the address actually dialled, after resolution, so a name that resolves
//! to a private address (DNS rebinding) is refused too.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::OnceLock;

use ipnet::IpNet;

/// Names the refused range an address falls in, or `None` when it may be dialled: the
/// special ranges of `ipsx-egress`, minus what the config's allow-list names (checked
/// for the address and for the IPv4 address an IPv4-mapped or NAT64 one carries).
pub fn refused_range(ip: IpAddr, allow: &[IpNet]) -> Option<&'static str> {
    let allowed = |ip: IpAddr| allow.iter().any(|net| net.contains(&ip));
    if allowed(ip) {
        return None;
    }
    if let IpAddr::V6(v6) = ip
        && ipsx_egress::embedded_v4(v6).is_some_and(|v4| allowed(IpAddr::V4(v4)))
    {
        return None;
    }
    ipsx_egress::special_range(ip)
}

/// Names why an address of this machine itself is refused for a local exit, or `None`:
/// a socket the gateway listens on (proxy or admin, `own`; an unspecified listen address
/// stands for every address of the machine) unless on loopback, even when the allow-list
/// names it; and any other address of the machine's own interfaces unless the allow-list
/// names it. Loopback is left to [`refused_range`] and its allow-list (tests and
/// development allow it).
pub fn refused_local(
    ip: IpAddr,
    port: u16,
    allow: &[IpNet],
    own: &[SocketAddr],
) -> Option<&'static str> {
    if ip.is_loopback() || !is_local_address(ip) {
        return None;
    }
    if own
        .iter()
        .any(|s| s.port() == port && (s.ip() == ip || s.ip().is_unspecified()))
    {
        return Some("the gateway itself");
    }
    if allow.iter().any(|net| net.contains(&ip)) {
        return None;
    }
    Some("an address of this machine")
}

/// True when `ip` is an address of one of this machine's interfaces: a socket can be
/// bound to it. Where the system lets sockets bind any address (`ip_nonlocal_bind`),
/// the test says nothing, and only loopback counts.
pub fn is_local_address(ip: IpAddr) -> bool {
    static NONLOCAL_V4: OnceLock<bool> = OnceLock::new();
    static NONLOCAL_V6: OnceLock<bool> = OnceLock::new();
    let binds = |ip: IpAddr| UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok();
    // Documentation addresses (RFC 5737, RFC 3849) are never assigned to an interface.
    let nonlocal = match ip {
        IpAddr::V4(_) => *NONLOCAL_V4.get_or_init(|| binds(IpAddr::from([203, 0, 113, 254]))),
        IpAddr::V6(_) => *NONLOCAL_V6
            .get_or_init(|| binds(IpAddr::from([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0xfe]))),
    };
    if nonlocal {
        return ip.is_loopback();
    }
    binds(ip)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_ranges_are_refused() {
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
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "::127.0.0.1",
        ] {
            assert!(refused_range(ip.parse().unwrap(), &[]).is_some(), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:93.184.216.34",
        ] {
            assert_eq!(refused_range(ip.parse().unwrap(), &[]), None, "{ip}");
        }
    }

    #[test]
    fn own_addresses_are_refused_unless_allow_listed() {
        let here = "127.0.0.1".parse().unwrap();
        assert!(is_local_address(here));
        assert!(!is_local_address("203.0.113.7".parse().unwrap()));
        // Loopback is left to the allow-list.
        assert_eq!(refused_local(here, 80, &[], &[]), None);
        // A non-loopback address of this machine, if it has one.
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        if probe.connect("192.0.2.1:9").is_ok() {
            let ip = probe.local_addr().unwrap().ip();
            if !ip.is_loopback() && !ip.is_unspecified() {
                assert!(refused_local(ip, 80, &[], &[]).is_some(), "{ip}");
                let allow = vec![IpNet::from(ip)];
                assert_eq!(refused_local(ip, 80, &allow, &[]), None);
                let own = vec![SocketAddr::new("0.0.0.0".parse().unwrap(), 8080)];
                assert!(refused_local(ip, 8080, &allow, &own).is_some());
            }
        }
    }

    #[test]
    fn allow_list_opens_exactly_what_it_names() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(refused_range("127.0.0.5".parse().unwrap(), &allow), None);
        assert_eq!(
            refused_range("::ffff:127.0.0.5".parse().unwrap(), &allow),
            None
        );
        assert!(refused_range("10.0.0.1".parse().unwrap(), &allow).is_some());
        assert!(refused_range("::1".parse().unwrap(), &allow).is_some());
    }
}
