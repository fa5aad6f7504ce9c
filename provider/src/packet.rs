//! Just enough IPv4/IPv6 header parsing to route a decrypted packet (source check,
//! TCP SYN detection, UDP relay and DNS interception), checking UDP checksums, and
//! building UDP replies and ICMP echo replies. Sans-IO; every access is bounds-checked
//! because the bytes come from the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The transport part of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP; `syn_only` is a connection request (SYN without ACK).
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// SYN set, ACK clear.
        syn_only: bool,
    },
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// Offset of the payload in the packet.
        payload_at: usize,
        /// Payload length.
        payload_len: usize,
    },
    /// Anything else (ICMP, extension headers, fragments ...).
    Other,
}

/// The parsed headers of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport header.
    pub transport: Transport,
}

impl Parsed {
    /// Destination port (0 for other protocols).
    pub fn dst_port(&self) -> u16 {
        match self.transport {
            Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. } => dst_port,
            Transport::Other => 0,
        }
    }

    /// Source port (0 for other protocols).
    pub fn src_port(&self) -> u16 {
        match self.transport {
            Transport::Tcp { src_port, .. } | Transport::Udp { src_port, .. } => src_port,
            Transport::Other => 0,
        }
    }

    /// An owned copy of a UDP datagram's addressing and payload.
    pub fn owned(&self, pkt: &[u8]) -> OwnedUdp {
        let payload = match self.transport {
            Transport::Udp {
                payload_at,
                payload_len,
                ..
            } => pkt
                .get(payload_at..payload_at.saturating_add(payload_len))
                .unwrap_or(&[])
                .to_vec(),
            _ => Vec::new(),
        };
        OwnedUdp {
            src: self.src,
            dst: self.dst,
            src_port: self.src_port(),
            dst_port: self.dst_port(),
            payload,
        }
    }
}

/// A UDP datagram detached from its packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedUdp {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn transport(proto: u8, l4: &[u8], l4_at: usize) -> Transport {
    match proto {
        6 => match (be16(l4, 0), be16(l4, 2), l4.get(13)) {
            (Some(s), Some(d), Some(&flags)) if l4.len() >= 20 => Transport::Tcp {
                src_port: s,
                dst_port: d,
                syn_only: flags & 0x02 != 0 && flags & 0x10 == 0,
            },
            _ => Transport::Other,
        },
        17 => match (be16(l4, 0), be16(l4, 2), be16(l4, 4)) {
            (Some(s), Some(d), Some(len)) if (8..=l4.len()).contains(&(len as usize)) => {
                Transport::Udp {
                    src_port: s,
                    dst_port: d,
                    payload_at: l4_at + 8,
                    payload_len: len as usize - 8,
                }
            }
            _ => Transport::Other,
        },
        _ => Transport::Other,
    }
}

/// Parses an IPv4 or IPv6 packet's headers; `None` if it is not a well-formed one.
pub fn parse(pkt: &[u8]) -> Option<Parsed> {
    match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt.first()? & 0x0f) * 4;
            let total = usize::from(be16(pkt, 2)?);
            if ihl < 20 || total < ihl || total > pkt.len() {
                return None;
            }
            let src = Ipv4Addr::new(*pkt.get(12)?, *pkt.get(13)?, *pkt.get(14)?, *pkt.get(15)?);
            let dst = Ipv4Addr::new(*pkt.get(16)?, *pkt.get(17)?, *pkt.get(18)?, *pkt.get(19)?);
            let frag = be16(pkt, 6)?;
            let proto = *pkt.get(9)?;
            // Fragments (MF set or an offset) carry no usable transport header.
            let transport = if frag & 0x3fff != 0 {
                Transport::Other
            } else {
                transport(proto, pkt.get(ihl..total)?, ihl)
            };
            Some(Parsed {
                src: IpAddr::V4(src),
                dst: IpAddr::V4(dst),
                transport,
            })
        }
        6 => {
            let payload_len = usize::from(be16(pkt, 4)?);
            let end = 40usize.checked_add(payload_len)?;
            if end > pkt.len() {
                return None;
            }
            let mut s = [0u8; 16];
            s.copy_from_slice(pkt.get(8..24)?);
            let mut d = [0u8; 16];
            d.copy_from_slice(pkt.get(24..40)?);
            let proto = *pkt.get(6)?;
            Some(Parsed {
                src: IpAddr::V6(Ipv6Addr::from(s)),
                dst: IpAddr::V6(Ipv6Addr::from(d)),
                transport: transport(proto, pkt.get(40..end)?, 40),
            })
        }
        _ => None,
    }
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP RST (with ACK) refusing the connection request `syn` (IPv4, or IPv6 without
/// extension headers), as a stack with no listener answers it (RFC 9293 3.10.7.1):
/// sequence 0, acknowledging the SYN and whatever it carried. `None` unless `syn` is a
/// well-formed TCP segment with SYN set and ACK and RST clear.
pub fn rst_for_syn(syn: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match syn.first()? >> 4 {
        4 => {
            let ihl = usize::from(syn[0] & 0x0f) * 4;
            let total = usize::from(be16(syn, 2)?);
            if ihl < 20 || syn.get(9) != Some(&6) || total < ihl {
                return None;
            }
            let a: [u8; 4] = syn.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = syn.get(16..20)?.try_into().ok()?;
            (a.into(), b.into(), syn.get(ihl..total)?)
        }
        6 => {
            if syn.get(6) != Some(&6) {
                return None;
            }
            let len = usize::from(be16(syn, 4)?);
            let a: [u8; 16] = syn.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = syn.get(24..40)?.try_into().ok()?;
            (a.into(), b.into(), syn.get(40..40 + len)?)
        }
        _ => return None,
    };
    let offset = usize::from(*l4.get(12)? >> 4) * 4;
    let flags = *l4.get(13)?;
    if offset < 20 || offset > l4.len() || flags & 0x16 != 0x02 {
        return None;
    }
    let seq = u32::from_be_bytes(l4.get(4..8)?.try_into().ok()?);
    let carried = u32::try_from(l4.len() - offset).ok()? + 1 + u32::from(flags & 0x01);
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&l4[2..4]);
    tcp.extend_from_slice(&l4[0..2]);
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(&seq.wrapping_add(carried).to_be_bytes());
    // Header of 5 words; RST|ACK; window, checksum and urgent pointer 0.
    tcp.extend_from_slice(&[0x50, 0x14, 0, 0, 0, 0, 0, 0]);
    let octets = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let pseudo = sum16(sum16(0, &octets(dst)), &octets(src)) + 6 + 20;
    let ck = fold(sum16(pseudo, &tcp));
    tcp[16..18].copy_from_slice(&ck.to_be_bytes());
    let mut ip = match (dst, src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            let hck = fold(sum16(0, &ip));
            ip[10..12].copy_from_slice(&hck.to_be_bytes());
            ip
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            ip
        }
        _ => return None,
    };
    ip.extend_from_slice(&tcp);
    Some(ip)
}

/// Builds the IP/UDP packet answering `q` with `payload` (source and destination
/// swapped). `None` if the payload does not fit a UDP datagram.
pub fn udp_reply(q: &OwnedUdp, payload: &[u8]) -> Option<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload.len()).ok()?;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&q.dst_port.to_be_bytes());
    udp.extend_from_slice(&q.src_port.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    match (q.dst, q.src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let total = u16::try_from(20 + udp.len()).ok()?;
            let mut pseudo = sum16(0, &from.octets());
            pseudo = sum16(pseudo, &to.octets());
            pseudo += 17 + u32::from(udp_len);
            let mut ck = fold(sum16(pseudo, &udp));
            if ck == 0 {
                ck = 0xffff;
            }
            udp[6..8].copy_from_slice(&ck.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            let hck = fold(sum16(0, &ip));
            ip[10..12].copy_from_slice(&hck.to_be_bytes());
            ip.extend_from_slice(&udp);
            Some(ip)
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let mut pseudo = sum16(0, &from.octets());
            pseudo = sum16(pseudo, &to.octets());
            pseudo += 17 + u32::from(udp_len);
            let mut ck = fold(sum16(pseudo, &udp));
            if ck == 0 {
                ck = 0xffff;
            }
            udp[6..8].copy_from_slice(&ck.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&udp_len.to_be_bytes());
            ip.extend_from_slice(&[17, 64]);
            ip.extend_from_slice(&from.octets());
            ip.extend_from_slice(&to.octets());
            ip.extend_from_slice(&udp);
            Some(ip)
        }
        _ => None,
    }
}

/// Whether a parsed UDP packet's checksums hold: the IPv4 header checksum, and the UDP
/// checksum over the pseudo-header (optional in IPv4, where 0 means none; mandatory in
/// IPv6). False for anything but a well-formed UDP packet.
pub fn udp_checksums_ok(pkt: &[u8], parsed: &Parsed) -> bool {
    let Transport::Udp {
        payload_at,
        payload_len,
        ..
    } = parsed.transport
    else {
        return false;
    };
    let Some(udp) = pkt.get(payload_at.saturating_sub(8)..payload_at.saturating_add(payload_len))
    else {
        return false;
    };
    let Some(wire) = be16(udp, 6) else {
        return false;
    };
    let udp_len = udp.len() as u32;
    match (parsed.src, parsed.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ihl = usize::from(pkt.first().map_or(0, |b| b & 0x0f)) * 4;
            let Some(header) = pkt.get(..ihl) else {
                return false;
            };
            if fold(sum16(0, header)) != 0 {
                return false;
            }
            if wire == 0 {
                return true;
            }
            let pseudo = sum16(sum16(0, &s.octets()), &d.octets()) + 17 + udp_len;
            fold(sum16(pseudo, udp)) == 0
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            if wire == 0 {
                return false;
            }
            let pseudo = sum16(sum16(0, &s.octets()), &d.octets()) + 17 + udp_len;
            fold(sum16(pseudo, udp)) == 0
        }
        _ => false,
    }
}

/// The echo reply to an IPv4 ICMP echo request addressed to `me` (addresses swapped,
/// same identifier, sequence and data). `None` for anything else: another protocol or
/// type, another destination, a fragment, IP options, a bad header or ICMP checksum.
pub fn icmp_echo_reply(pkt: &[u8], me: Ipv4Addr) -> Option<Vec<u8>> {
    if pkt.first()? != &0x45 {
        return None;
    }
    let total = usize::from(be16(pkt, 2)?);
    if total < 28 || total > pkt.len() || *pkt.get(9)? != 1 || be16(pkt, 6)? & 0x3fff != 0 {
        return None;
    }
    let header = pkt.get(..20)?;
    let icmp = pkt.get(20..total)?;
    if fold(sum16(0, header)) != 0 || fold(sum16(0, icmp)) != 0 {
        return None;
    }
    if *icmp.first()? != 8 || *icmp.get(1)? != 0 || pkt.get(16..20)? != me.octets() {
        return None;
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    out.extend_from_slice(&me.octets());
    out.extend_from_slice(pkt.get(12..16)?);
    let hck = fold(sum16(0, &out));
    out[10..12].copy_from_slice(&hck.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(icmp.get(4..)?);
    let ck = fold(sum16(0, out.get(20..)?));
    out[22..24].copy_from_slice(&ck.to_be_bytes());
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn q4() -> OwnedUdp {
        OwnedUdp {
            src: "10.77.0.2".parse().unwrap(),
            dst: "10.77.0.1".parse().unwrap(),
            src_port: 40000,
            dst_port: 53,
            payload: b"question".to_vec(),
        }
    }

    #[test]
    fn reply_round_trips_through_parse() {
        let r = udp_reply(&q4(), b"answer!").unwrap();
        let p = parse(&r).unwrap();
        assert_eq!(p.src, q4().dst);
        assert_eq!(p.dst, q4().src);
        assert_eq!((p.src_port(), p.dst_port()), (53, 40000));
        assert_eq!(p.owned(&r).payload, b"answer!");
        // IPv4 header checksum verifies to zero.
        assert_eq!(fold(sum16(0, &r[..20])), 0);
        let mut q6 = q4();
        q6.src = "fd00::2".parse().unwrap();
        q6.dst = "fd00::1".parse().unwrap();
        let r6 = udp_reply(&q6, b"x").unwrap();
        assert_eq!(parse(&r6).unwrap().owned(&r6).payload, b"x");
        let mut mixed = q4();
        mixed.src = "fd00::2".parse().unwrap();
        assert!(udp_reply(&mixed, b"x").is_none());
    }

    #[test]
    fn syn_detection() {
        let mut pkt = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 1, 2, 3, 4,
        ];
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x02;
        pkt.extend_from_slice(&tcp);
        let p = parse(&pkt).unwrap();
        assert_eq!(
            p.transport,
            Transport::Tcp {
                src_port: 1234,
                dst_port: 80,
                syn_only: true
            }
        );
        pkt[20 + 13] = 0x12;
        assert!(matches!(
            parse(&pkt).unwrap().transport,
            Transport::Tcp {
                syn_only: false,
                ..
            }
        ));
        pkt[6] = 0x20; // MF: a fragment
        assert_eq!(parse(&pkt).unwrap().transport, Transport::Other);
        pkt.truncate(30);
        assert!(parse(&pkt).is_none(), "total length beyond the buffer");
    }

    fn udp4(payload: &[u8]) -> Vec<u8> {
        let q = OwnedUdp {
            src: "1.2.3.4".parse().unwrap(),
            dst: "10.77.0.2".parse().unwrap(),
            src_port: 53,
            dst_port: 4000,
            payload: vec![],
        };
        udp_reply(&q, payload).unwrap()
    }

    #[test]
    fn udp_checksums_are_verified() {
        let pkt = udp4(b"hello");
        let p = parse(&pkt).unwrap();
        assert!(udp_checksums_ok(&pkt, &p));
        for at in [10usize, 16, 26, 28, 30] {
            let mut bad = pkt.clone();
            bad[at] ^= 0x40;
            let Some(p) = parse(&bad) else { continue };
            assert!(!udp_checksums_ok(&bad, &p), "byte {at} flipped");
        }
        // IPv4 UDP checksum 0: none (accepted).
        let mut none = pkt.clone();
        none[26] = 0;
        none[27] = 0;
        assert!(udp_checksums_ok(&none, &parse(&none).unwrap()));
        let mut q6 = q4();
        q6.src = "fd00::2".parse().unwrap();
        q6.dst = "fd00::1".parse().unwrap();
        let mut r6 = udp_reply(&q6, b"x").unwrap();
        assert!(udp_checksums_ok(&r6, &parse(&r6).unwrap()));
        r6[46] = 0;
        r6[47] = 0;
        assert!(
            !udp_checksums_ok(&r6, &parse(&r6).unwrap()),
            "v6 requires a checksum"
        );
    }

    fn echo_request(dst: Ipv4Addr, data: &[u8]) -> Vec<u8> {
        let total = (28 + data.len()) as u16;
        let mut pkt = vec![0x45, 0];
        pkt.extend_from_slice(&total.to_be_bytes());
        pkt.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0, 10, 77, 0, 2]);
        pkt.extend_from_slice(&dst.octets());
        let hck = fold(sum16(0, &pkt));
        pkt[10..12].copy_from_slice(&hck.to_be_bytes());
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 7];
        icmp.extend_from_slice(data);
        let ck = fold(sum16(0, &icmp));
        icmp[2..4].copy_from_slice(&ck.to_be_bytes());
        pkt.extend_from_slice(&icmp);
        pkt
    }

    #[test]
    fn echo_requests_to_me_are_answered() {
        let me = Ipv4Addr::new(10, 77, 0, 1);
        let req = echo_request(me, b"ping data");
        let r = icmp_echo_reply(&req, me).unwrap();
        assert_eq!(r.len(), req.len());
        assert_eq!(&r[12..16], &me.octets());
        assert_eq!(&r[16..20], &[10, 77, 0, 2]);
        assert_eq!(r[20], 0, "echo reply");
        assert_eq!(&r[24..], &req[24..], "id, sequence and data kept");
        assert_eq!(fold(sum16(0, &r[..20])), 0);
        assert_eq!(fold(sum16(0, &r[20..])), 0);
        // Not to me, bad checksum, a fragment, truncated: no answer.
        assert!(icmp_echo_reply(&echo_request(Ipv4Addr::new(1, 1, 1, 1), b"x"), me).is_none());
        let mut bad = req.clone();
        bad[30] ^= 1;
        assert!(icmp_echo_reply(&bad, me).is_none());
        let mut frag = echo_request(me, b"x");
        frag[6] = 0x20;
        assert!(icmp_echo_reply(&frag, me).is_none());
        assert!(icmp_echo_reply(&req[..24], me).is_none());
        assert!(icmp_echo_reply(&r, me).is_none(), "a reply is not answered");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            if let Some(p) = parse(&buf) {
                let _ = p.owned(&buf);
                let _ = udp_checksums_ok(&buf, &p);
            }
            let _ = icmp_echo_reply(&buf, Ipv4Addr::new(10, 77, 0, 1));
        }

        #[test]
        fn udp_replies_always_verify(payload in proptest::collection::vec(proptest::num::u8::ANY, 0..1400), flip in 0usize..1500) {
            let pkt = udp4(&payload);
            let p = parse(&pkt).unwrap();
            proptest::prop_assert!(udp_checksums_ok(&pkt, &p));
            proptest::prop_assert_eq!(p.owned(&pkt).payload, payload);
            // Any single flipped payload bit is caught.
            if flip >= 28 && flip < pkt.len() {
                let mut bad = pkt.clone();
                bad[flip] ^= 0x01;
                let p = parse(&bad).unwrap();
                proptest::prop_assert!(!udp_checksums_ok(&bad, &p));
            }
        }

        #[test]
        fn parse_v4_header_fuzz(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..100), len in 0u16..200, ihl in 0u8..16, proto in proptest::num::u8::ANY) {
            let mut pkt = vec![0x40 | ihl, 0];
            pkt.extend_from_slice(&len.to_be_bytes());
            pkt.extend_from_slice(&[0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 2, 1, 2, 3, 4]);
            pkt.extend_from_slice(&tail);
            if let Some(p) = parse(&pkt) {
                let _ = p.owned(&pkt);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod rst_tests {
    use super::*;
    use ipsx_tunnel_pool::smoltcp::wire::{IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket};

    /// A SYN `src:sport -> dst:dport` with sequence `seq`, `data` bytes and `flags`.
    fn segment(src: IpAddr, dst: IpAddr, seq: u32, data: &[u8], flags: u8) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = flags;
        tcp.extend_from_slice(data);
        let len = u16::try_from(tcp.len()).unwrap();
        let mut ip = match (src, dst) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&(len + 20).to_be_bytes());
                ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
                ip.extend_from_slice(&a.octets());
                ip.extend_from_slice(&b.octets());
                ip
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend_from_slice(&len.to_be_bytes());
                ip.extend_from_slice(&[6, 64]);
                ip.extend_from_slice(&a.octets());
                ip.extend_from_slice(&b.octets());
                ip
            }
            _ => unreachable!(),
        };
        ip.extend_from_slice(&tcp);
        ip
    }

    /// Checks `rst` with smoltcp's parser: checksums, addresses and ports swapped,
    /// RST|ACK acknowledging `ack`.
    fn check(rst: &[u8], src: IpAddr, dst: IpAddr, ack: u32) {
        let payload = match dst {
            IpAddr::V4(_) => {
                let ip = Ipv4Packet::new_checked(rst).unwrap();
                assert!(ip.verify_checksum());
                assert_eq!(IpAddr::V4(ip.src_addr()), dst);
                assert_eq!(IpAddr::V4(ip.dst_addr()), src);
                ip.payload().to_vec()
            }
            IpAddr::V6(_) => {
                let ip = Ipv6Packet::new_checked(rst).unwrap();
                assert_eq!(IpAddr::V6(ip.src_addr()), dst);
                assert_eq!(IpAddr::V6(ip.dst_addr()), src);
                ip.payload().to_vec()
            }
        };
        let tcp = TcpPacket::new_checked(&payload[..]).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::from(dst), &IpAddress::from(src)));
        assert!(tcp.rst() && tcp.ack() && !tcp.syn());
        assert_eq!((tcp.src_port(), tcp.dst_port()), (443, 40000));
        assert_eq!(tcp.seq_number().0, 0);
        assert_eq!(tcp.ack_number().0 as u32, ack);
        let p = parse(rst).unwrap();
        assert!(matches!(
            p.transport,
            Transport::Tcp {
                syn_only: false,
                ..
            }
        ));
    }

    #[test]
    fn a_refused_syn_gets_a_rst_acknowledging_it() {
        let (a4, b4): (IpAddr, IpAddr) = ("10.77.0.2".parse().unwrap(), "1.2.3.4".parse().unwrap());
        let rst = rst_for_syn(&segment(a4, b4, 1000, b"", 0x02)).unwrap();
        check(&rst, a4, b4, 1001);
        let (a6, b6): (IpAddr, IpAddr) =
            ("fd00::2".parse().unwrap(), "2001:db8::1".parse().unwrap());
        let rst = rst_for_syn(&segment(a6, b6, u32::MAX, b"hello", 0x02)).unwrap();
        check(&rst, a6, b6, 5);
        // Not a connection request: no RST.
        for flags in [0x12, 0x04, 0x06, 0x10, 0x00] {
            assert!(
                rst_for_syn(&segment(a4, b4, 1, b"", flags)).is_none(),
                "{flags:#x}"
            );
        }
        let mut udp = segment(a4, b4, 1, b"", 0x02);
        udp[9] = 17;
        assert!(rst_for_syn(&udp).is_none());
        assert!(rst_for_syn(&[]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn rst_for_syn_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            if let Some(rst) = rst_for_syn(&buf) {
                proptest::prop_assert!(parse(&rst).is_some());
            }
        }

        #[test]
        fn every_syn_gets_a_valid_rst(
            v6 in proptest::bool::ANY,
            seq in proptest::num::u32::ANY,
            fin in proptest::bool::ANY,
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cut in 0usize..8,
        ) {
            let (a, b): (IpAddr, IpAddr) = if v6 {
                ("fd00::2".parse().unwrap(), "2001:db8::7".parse().unwrap())
            } else {
                ("10.77.0.2".parse().unwrap(), "192.0.2.7".parse().unwrap())
            };
            let syn = segment(a, b, seq, &data, 0x02 | u8::from(fin));
            let carried = data.len() as u32 + 1 + u32::from(fin);
            check(&rst_for_syn(&syn).unwrap(), a, b, seq.wrapping_add(carried));
            // A truncated packet is refused, never read past its end.
            if cut > 0 {
                proptest::prop_assert!(rst_for_syn(&syn[..syn.len() - cut]).is_none());
            }
        }
    }
}
