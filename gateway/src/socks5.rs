//! A sans-IO SOCKS5 server codec (RFC 1928) with username/password auth (RFC 1929).
//!
//! Each `parse_*` function looks at the bytes received so far and returns `Ok(None)`
//! while more are needed, so a client that sends every byte in its own segment works.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::http1::Host;

/// RFC 1928 section 6 reply codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// 0x00 succeeded.
    Succeeded = 0x00,
    /// 0x01 general SOCKS server failure.
    GeneralFailure = 0x01,
    /// 0x02 connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03 network unreachable.
    NetworkUnreachable = 0x03,
    /// 0x04 host unreachable.
    HostUnreachable = 0x04,
    /// 0x05 connection refused.
    ConnectionRefused = 0x05,
    /// 0x06 TTL expired (used for timeouts).
    TtlExpired = 0x06,
    /// 0x07 command not supported.
    CommandNotSupported = 0x07,
    /// 0x08 address type not supported.
    AddressTypeNotSupported = 0x08,
}

/// A protocol violation by the client, with the reply to send (if any) before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("socks5: {message}")]
pub struct SocksError {
    /// What was wrong.
    pub message: String,
    /// The reply to send; `None` when the stage has no reply (greeting, auth).
    pub reply: Option<Reply>,
}

fn err(message: impl Into<String>, reply: Option<Reply>) -> SocksError {
    SocksError {
        message: message.into(),
        reply,
    }
}

/// Method 0x00: no authentication.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Method 0x02: username/password (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// Method 0xFF: no acceptable method.
pub const METHOD_NONE: u8 = 0xff;

/// The client's greeting: the methods it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Offered authentication methods.
    pub methods: Vec<u8>,
}

/// Parses `VER NMETHODS METHODS...`.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Greeting, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 5 {
        return Err(err(
            format!("unsupported version {ver} (only SOCKS5)"),
            None,
        ));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(err("greeting offers no methods (NMETHODS=0)", None));
    }
    let end = 2 + n as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Greeting {
            methods: buf[2..end].to_vec(),
        },
        end,
    )))
}

/// RFC 1929 credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Username (carries targeting parameters).
    pub username: String,
    /// Password (the access token).
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Parses `VER=1 ULEN UNAME PLEN PASSWD`.
pub fn parse_auth(buf: &[u8]) -> Result<Option<(Credentials, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 1 {
        return Err(err(format!("unsupported auth version {ver}"), None));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    let ulen = ulen as usize;
    let Some(&plen) = buf.get(2 + ulen) else {
        return Ok(None);
    };
    let end = 3 + ulen + plen as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let username =
        std::str::from_utf8(&buf[2..2 + ulen]).map_err(|_| err("username is not UTF-8", None))?;
    let password =
        std::str::from_utf8(&buf[3 + ulen..end]).map_err(|_| err("password is not UTF-8", None))?;
    Ok(Some((
        Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        },
        end,
    )))
}

/// A CONNECT request's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Destination host: an address, or a name resolved at the exit (socks5h).
    pub host: Host,
    /// Destination port.
    pub port: u16,
}

/// Parses `VER CMD RSV ATYP DST.ADDR DST.PORT`; only CONNECT is supported.
pub fn parse_request(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, SocksError> {
    if buf.len() < 4 {
        if let Some(&ver) = buf.first()
            && ver != 5
        {
            return Err(err(
                format!("unsupported version {ver} in request"),
                Some(Reply::GeneralFailure),
            ));
        }
        return Ok(None);
    }
    if buf[0] != 5 {
        return Err(err(
            format!("unsupported version {} in request", buf[0]),
            Some(Reply::GeneralFailure),
        ));
    }
    match buf[1] {
        1 => {}
        2 => {
            return Err(err(
                "BIND is not supported",
                Some(Reply::CommandNotSupported),
            ));
        }
        3 => {
            return Err(err(
                "UDP ASSOCIATE is not supported",
                Some(Reply::CommandNotSupported),
            ));
        }
        c => {
            return Err(err(
                format!("unknown command {c}"),
                Some(Reply::CommandNotSupported),
            ));
        }
    }
    if buf[2] != 0 {
        return Err(err(
            "reserved byte is not zero",
            Some(Reply::GeneralFailure),
        ));
    }
    let (host, addr_end) = match buf[3] {
        1 => {
            if buf.len() < 8 {
                return Ok(None);
            }
            (
                Host::Ip(IpAddr::V4(Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]))),
                8,
            )
        }
        4 => {
            if buf.len() < 20 {
                return Ok(None);
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&buf[4..20]);
            (Host::Ip(IpAddr::V6(Ipv6Addr::from(octets))), 20)
        }
        3 => {
            let Some(&len) = buf.get(4) else {
                return Ok(None);
            };
            if len == 0 {
                return Err(err("empty domain name", Some(Reply::HostUnreachable)));
            }
            let end = 5 + len as usize;
            if buf.len() < end {
                return Ok(None);
            }
            let name = std::str::from_utf8(&buf[5..end])
                .map_err(|_| err("domain name is not UTF-8", Some(Reply::HostUnreachable)))?;
            let host =
                Host::parse(name).map_err(|e| err(e.to_string(), Some(Reply::HostUnreachable)))?;
            (host, end)
        }
        t => {
            return Err(err(
                format!("unknown address type {t}"),
                Some(Reply::AddressTypeNotSupported),
            ));
        }
    };
    if buf.len() < addr_end + 2 {
        return Ok(None);
    }
    let port = u16::from_be_bytes([buf[addr_end], buf[addr_end + 1]]);
    if port == 0 {
        return Err(err("destination port 0", Some(Reply::NotAllowed)));
    }
    Ok(Some((ConnectRequest { host, port }, addr_end + 2)))
}

/// Encodes a reply with the bound address (all zero when unknown).
pub fn encode_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![5, reply as u8, 0];
    match bound {
        Some(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        None => out.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0]),
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn greeting_cases() {
        assert_eq!(
            parse_greeting(&[5, 1, 0]).unwrap().unwrap().0.methods,
            vec![0]
        );
        assert!(parse_greeting(&[5]).unwrap().is_none());
        assert!(parse_greeting(&[5, 2, 0]).unwrap().is_none());
        assert!(parse_greeting(&[5, 0]).is_err(), "NMETHODS=0");
        assert!(parse_greeting(&[4, 1, 0]).is_err(), "SOCKS4");
    }

    #[test]
    fn requests_in_every_address_type() {
        let (r, n) = parse_request(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80])
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.host, r.port, n),
            (Host::Ip("127.0.0.1".parse().unwrap()), 80, 10)
        );
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[1, 187]);
        assert_eq!(parse_request(&v6).unwrap().unwrap().0.port, 443);
        let name =
            "a".repeat(63) + "." + &"b".repeat(63) + "." + &"c".repeat(63) + "." + &"d".repeat(61);
        assert_eq!(name.len(), 253);
        let mut dom = vec![5, 1, 0, 3, name.len() as u8];
        dom.extend_from_slice(name.as_bytes());
        dom.extend_from_slice(&[0, 80]);
        assert_eq!(
            parse_request(&dom).unwrap().unwrap().0.host,
            Host::Name(name)
        );
    }

    #[test]
    fn hostile_requests_get_their_reply_code() {
        let cases: [(&[u8], Reply); 5] = [
            (&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80], Reply::CommandNotSupported),
            (&[5, 3, 0, 1, 1, 2, 3, 4, 0, 80], Reply::CommandNotSupported),
            (
                &[5, 1, 0, 9, 1, 2, 3, 4, 0, 80],
                Reply::AddressTypeNotSupported,
            ),
            (&[5, 1, 0, 3, 0, 0, 80], Reply::HostUnreachable),
            (
                &[5, 1, 0, 3, 3, b'a', b'/', b'b', 0, 80],
                Reply::HostUnreachable,
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_request(bytes).unwrap_err().reply,
                Some(want),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn byte_by_byte_is_incomplete_until_the_end() {
        let full = [
            5u8, 1, 0, 3, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't', 0x1f, 0x90,
        ];
        for cut in 0..full.len() {
            assert!(
                parse_request(&full[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        assert_eq!(parse_request(&full).unwrap().unwrap().0.port, 8080);
        let auth = [1u8, 1, b'u', 2, b'p', b'w'];
        for cut in 0..auth.len() {
            assert!(parse_auth(&auth[..cut]).unwrap().is_none());
        }
        let (c, _) = parse_auth(&auth).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "pw"));
        assert!(!format!("{c:?}").contains("pw"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_greeting(&bytes);
            let _ = parse_auth(&bytes);
            let _ = parse_request(&bytes);
        }
    }
}
