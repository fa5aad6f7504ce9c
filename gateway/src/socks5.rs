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

/// What a request asks for (RFC 1928 section 4; BIND is not served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0x01: a TCP stream to the destination.
    Connect,
    /// 0x03: a UDP relay (section 7); the address is where the client will send from.
    UdpAssociate,
}

/// A request: CONNECT's destination, or UDP ASSOCIATE's expected client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub command: Command,
    /// CONNECT: the destination host, an address or a name resolved at the exit
    /// (socks5h). UDP ASSOCIATE: the address the client will send datagrams from
    /// (all zeros when it does not know it yet).
    pub host: Host,
    /// Destination port; for UDP ASSOCIATE the client's source port, or 0.
    pub port: u16,
}

/// Parses `VER CMD RSV ATYP DST.ADDR DST.PORT`; CONNECT and UDP ASSOCIATE are served.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
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
    let command = match buf[1] {
        1 => Command::Connect,
        3 => Command::UdpAssociate,
        2 => {
            return Err(err(
                "BIND is not supported",
                Some(Reply::CommandNotSupported),
            ));
        }
        c => {
            return Err(err(
                format!("unknown command {c}"),
                Some(Reply::CommandNotSupported),
            ));
        }
    };
    if buf[2] != 0 {
        return Err(err(
            "reserved byte is not zero",
            Some(Reply::GeneralFailure),
        ));
    }
    let Some((host, port, end)) = parse_address(buf, 3)? else {
        return Ok(None);
    };
    // UDP ASSOCIATE's port 0 means "not known yet" (section 7).
    if port == 0 && command == Command::Connect {
        return Err(err("destination port 0", Some(Reply::NotAllowed)));
    }
    Ok(Some((
        Request {
            command,
            host,
            port,
        },
        end,
    )))
}

/// Parses `ATYP ADDR PORT` starting at `at`: the host, the port and the offset just
/// past it; `Ok(None)` while bytes are missing.
fn parse_address(buf: &[u8], at: usize) -> Result<Option<(Host, u16, usize)>, SocksError> {
    let Some(&atyp) = buf.get(at) else {
        return Ok(None);
    };
    let addr = at + 1;
    let (host, addr_end) = match atyp {
        1 => {
            let Some(b) = buf.get(addr..addr + 4) else {
                return Ok(None);
            };
            (
                Host::Ip(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
                addr + 4,
            )
        }
        4 => {
            let Some(b) = buf.get(addr..addr + 16) else {
                return Ok(None);
            };
            let mut octets = [0u8; 16];
            octets.copy_from_slice(b);
            (Host::Ip(IpAddr::V6(Ipv6Addr::from(octets))), addr + 16)
        }
        3 => {
            let Some(&len) = buf.get(addr) else {
                return Ok(None);
            };
            if len == 0 {
                return Err(err("empty domain name", Some(Reply::HostUnreachable)));
            }
            let end = addr + 1 + len as usize;
            let Some(name) = buf.get(addr + 1..end) else {
                return Ok(None);
            };
            let name = std::str::from_utf8(name)
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
    let Some(p) = buf.get(addr_end..addr_end + 2) else {
        return Ok(None);
    };
    Ok(Some((host, u16::from_be_bytes([p[0], p[1]]), addr_end + 2)))
}

// === UDP relay datagrams (RFC 1928 section 7) ===

/// Why a datagram from the client was dropped. UDP has no error reply: the datagram
/// is dropped and counted under [`UdpHeaderError::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UdpHeaderError {
    /// Shorter than `RSV FRAG ATYP ADDR PORT`.
    #[error("datagram shorter than its SOCKS5 UDP header")]
    Truncated,
    /// `RSV` is not `0x0000`.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// `FRAG` is not 0: "an implementation that does not support fragmentation MUST
    /// drop any datagram whose FRAG field is other than X'00'".
    #[error("fragment {0} (fragmentation is not supported)")]
    Fragment(u8),
    /// An address the header cannot carry: unknown `ATYP`, empty or bad name.
    #[error("bad destination address: {0}")]
    Address(String),
    /// Destination port 0.
    #[error("destination port 0")]
    PortZero,
}

impl UdpHeaderError {
    /// The metrics label of this drop reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Fragment(_) => "fragment",
            Self::PortZero => "port",
            Self::Truncated | Self::Reserved | Self::Address(_) => "malformed",
        }
    }
}

/// A client datagram's header: where its data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// The destination: an address, or a name resolved at the exit.
    pub host: Host,
    /// The destination port (never 0).
    pub port: u16,
    /// The header's length: the data starts here.
    pub len: usize,
}

/// Parses a whole client datagram's `RSV FRAG ATYP DST.ADDR DST.PORT` header.
pub fn parse_udp_header(datagram: &[u8]) -> Result<UdpHeader, UdpHeaderError> {
    let Some(head) = datagram.get(..3) else {
        return Err(UdpHeaderError::Truncated);
    };
    if head[0] != 0 || head[1] != 0 {
        return Err(UdpHeaderError::Reserved);
    }
    if head[2] != 0 {
        return Err(UdpHeaderError::Fragment(head[2]));
    }
    match parse_address(datagram, 3) {
        Ok(None) => Err(UdpHeaderError::Truncated),
        Err(e) => Err(UdpHeaderError::Address(e.message)),
        Ok(Some((_, 0, _))) => Err(UdpHeaderError::PortZero),
        Ok(Some((host, port, len))) => Ok(UdpHeader { host, port, len }),
    }
}

/// Appends the header of a datagram relayed back to the client: `RSV FRAG=0` and the
/// address it came from.
pub fn encode_udp_header(source: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0]);
    push_address(Some(source), out);
}

/// The longest header [`encode_udp_header`] writes (IPv6).
pub const UDP_REPLY_HEADER_MAX: usize = 3 + 1 + 16 + 2;

fn push_address(addr: Option<SocketAddr>, out: &mut Vec<u8>) {
    match addr {
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
}

/// Encodes a reply with the bound address (all zero when unknown).
pub fn encode_reply(reply: Reply, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![5, reply as u8, 0];
    push_address(bound, &mut out);
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
        let cases: [(&[u8], Reply); 6] = [
            (&[5, 2, 0, 1, 1, 2, 3, 4, 0, 80], Reply::CommandNotSupported),
            (&[5, 9, 0, 1, 1, 2, 3, 4, 0, 80], Reply::CommandNotSupported),
            (&[5, 1, 0, 1, 1, 2, 3, 4, 0, 0], Reply::NotAllowed),
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

    #[test]
    fn udp_associate_takes_the_client_address_and_port_zero() {
        let (r, n) = parse_request(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!(n, 10);
        assert_eq!(r.command, Command::UdpAssociate);
        assert_eq!((r.host, r.port), (Host::Ip("0.0.0.0".parse().unwrap()), 0));
        // PySocks with remote DNS sends the name "0" and its socket's port.
        let (r, _) = parse_request(&[5, 3, 0, 3, 1, b'0', 0x30, 0x39])
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.host, r.port),
            (Host::Ip("0.0.0.0".parse().unwrap()), 12345)
        );
        let (r, _) = parse_request(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80])
            .unwrap()
            .unwrap();
        assert_eq!(r.command, Command::Connect);
    }

    fn datagram(header: &[u8], data: &[u8]) -> Vec<u8> {
        let mut d = header.to_vec();
        d.extend_from_slice(data);
        d
    }

    #[test]
    fn udp_headers_in_every_address_type() {
        let d = datagram(&[0, 0, 0, 1, 127, 0, 0, 9, 0, 53], b"query");
        let h = parse_udp_header(&d).unwrap();
        assert_eq!(
            (h.host, h.port, &d[h.len..]),
            (
                Host::Ip("127.0.0.9".parse().unwrap()),
                53,
                b"query".as_slice()
            )
        );
        let mut v6 = vec![0, 0, 0, 4];
        v6.extend_from_slice(&"::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[1, 187]);
        let h = parse_udp_header(&v6).unwrap();
        assert_eq!((h.port, h.len), (443, 22));
        let d = datagram(&[0, 0, 0, 3, 9], b"localhost\x00\x35x");
        let h = parse_udp_header(&d).unwrap();
        assert_eq!(
            (h.host, h.port, h.len),
            (Host::Name("localhost".into()), 53, 16)
        );
        // An empty payload is a datagram too.
        assert!(parse_udp_header(&[0, 0, 0, 1, 1, 2, 3, 4, 0, 7]).is_ok());
    }

    #[test]
    fn hostile_udp_headers_are_dropped_with_their_reason() {
        let cases: [(&[u8], &str); 10] = [
            (&[], "malformed"),
            (&[0, 0], "malformed"),
            (&[0, 0, 0], "malformed"),
            (&[0, 0, 0, 1, 127, 0, 0], "malformed"),
            (&[0, 0, 0, 1, 127, 0, 0, 1, 0], "malformed"),
            (&[0, 1, 0, 1, 127, 0, 0, 1, 0, 80], "malformed"),
            (&[0, 0, 1, 1, 127, 0, 0, 1, 0, 80], "fragment"),
            (&[0, 0, 0, 9, 127, 0, 0, 1, 0, 80], "malformed"),
            (&[0, 0, 0, 3, 0, 0, 80], "malformed"),
            (&[0, 0, 0, 1, 127, 0, 0, 1, 0, 0], "port"),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_udp_header(bytes).unwrap_err().reason(),
                want,
                "{bytes:?}"
            );
        }
        // A domain whose length runs past the datagram.
        assert_eq!(
            parse_udp_header(&[0, 0, 0, 3, 200, b'a', 0, 80]),
            Err(UdpHeaderError::Truncated)
        );
        // FRAG is checked before anything else, as the RFC requires.
        assert_eq!(
            parse_udp_header(&[0, 0, 0x81]),
            Err(UdpHeaderError::Fragment(0x81))
        );
    }

    #[test]
    fn reply_headers_round_trip() {
        for src in ["127.0.0.1:53", "[2001:db8::1]:443"] {
            let src: SocketAddr = src.parse().unwrap();
            let mut out = Vec::new();
            encode_udp_header(src, &mut out);
            assert!(out.len() <= UDP_REPLY_HEADER_MAX);
            out.extend_from_slice(b"x");
            let h = parse_udp_header(&out).unwrap();
            assert_eq!((h.host, h.port), (Host::Ip(src.ip()), src.port()));
            assert_eq!(&out[h.len..], b"x");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_greeting(&bytes);
            let _ = parse_auth(&bytes);
            let _ = parse_request(&bytes);
            if let Ok(h) = parse_udp_header(&bytes) {
                proptest::prop_assert!(h.len <= bytes.len());
                proptest::prop_assert!(h.port != 0);
            }
        }

        #[test]
        fn udp_header_round_trips_any_address(
            ip in proptest::prelude::any::<std::net::IpAddr>(),
            port in 1u16..,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let src = SocketAddr::new(ip, port);
            let mut d = Vec::new();
            encode_udp_header(src, &mut d);
            d.extend_from_slice(&data);
            let h = parse_udp_header(&d).unwrap();
            proptest::prop_assert_eq!(h.host, Host::Ip(ip));
            proptest::prop_assert_eq!(h.port, port);
            proptest::prop_assert_eq!(&d[h.len..], data.as_slice());
        }

        #[test]
        fn every_cut_udp_header_is_refused(
            ip in proptest::prelude::any::<std::net::Ipv6Addr>(),
            port in 1u16..,
        ) {
            let mut d = Vec::new();
            encode_udp_header(SocketAddr::new(std::net::IpAddr::V6(ip), port), &mut d);
            for cut in 0..d.len() {
                proptest::prop_assert!(parse_udp_header(&d[..cut]).is_err());
            }
        }
    }
}
