//! Which destination addresses the gateway refuses to dial (QUALITY.md case 12).
//!
//! Checked on the address actually dialled, after resolution, so a name that resolves
//! to a private address (DNS rebinding) is refused too.

use std::net::IpAddr;

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
