//! DNS through the tunnel: a small DNS-over-UDP client (A and AAAA, RFC 1035 wire
//! format) and a TTL-respecting answer cache.
//!
//! Why not hickory-resolver: routing it through a userspace tunnel needs its
//! `RuntimeProvider` trait, which changed in each of 0.24, 0.25 and 0.26. A scraper
//! only needs addresses for a host name, asked of the exit's resolver so answers are
//! geo-correct and nothing leaks locally; this module does exactly that in a few hundred
//! lines with hand-written, property-tested parsing. It is kept behind
//! [`crate::Tunnel::resolve`], so swapping in hickory later changes no caller.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::time::Instant;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;

/// Answers are cached at least this long (a TTL of 0 would mean a query per request).
const MIN_TTL: Duration = Duration::from_secs(5);
/// And at most this long.
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Negative answers (NXDOMAIN, no records) are cached this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Why a DNS exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The name is not a valid host name.
    #[error("`{0}` is not a valid host name")]
    BadName(String),
    /// The answer could not be parsed.
    #[error("malformed DNS answer: {0}")]
    Malformed(&'static str),
    /// The server answered with an error code.
    #[error("DNS server answered rcode {0}")]
    Rcode(u8),
    /// The name does not exist.
    #[error("no such host `{0}`")]
    NotFound(String),
}

/// Checks a host name (RFC 1123 letters, digits, `-`, plus `_`), returns it lower-case
/// without a trailing dot.
pub fn normalise_host(host: &str) -> Result<String, DnsError> {
    let bad = || DnsError::BadName(host.chars().take(64).collect());
    let h = host.strip_suffix('.').unwrap_or(host);
    if h.is_empty() || h.len() > 253 {
        return Err(bad());
    }
    for label in h.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad());
        }
    }
    Ok(h.to_ascii_lowercase())
}

/// Builds a recursive query for `host` (already normalised) of type `qtype`.
pub fn build_query(id: u16, host: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + host.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // AN, NS, AR
    for label in host.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

/// The addresses of an answer and how long they may be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Addresses of the asked type (CNAME chains are followed implicitly: every A/AAAA
    /// record in the answer section is taken).
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the records taken.
    pub ttl: Duration,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DnsError::Malformed("length overflow"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DnsError::Malformed("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DnsError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DnsError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DnsError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Skips a (possibly compressed) name; a pointer ends it.
    fn skip_name(&mut self) -> Result<(), DnsError> {
        for _ in 0..128 {
            let len = self.u8()?;
            match len {
                0 => return Ok(()),
                l if l & 0xC0 == 0xC0 => {
                    self.take(1)?;
                    return Ok(());
                }
                l if l & 0xC0 != 0 => return Err(DnsError::Malformed("bad label type")),
                l => {
                    self.take(l as usize)?;
                }
            }
        }
        Err(DnsError::Malformed("name too long"))
    }
}

/// Parses the answer to a query with `id` and `qtype`.
pub fn parse_answer(buf: &[u8], id: u16, qtype: u16, host: &str) -> Result<Answer, DnsError> {
    let mut r = Reader { buf, pos: 0 };
    if r.u16()? != id {
        return Err(DnsError::Malformed("id mismatch"));
    }
    let flags = r.u16()?;
    if flags & 0x8000 == 0 {
        return Err(DnsError::Malformed("not a response"));
    }
    let rcode = (flags & 0x000F) as u8;
    let qd = r.u16()?;
    let an = r.u16()?;
    r.u16()?;
    r.u16()?;
    if rcode == 3 {
        return Err(DnsError::NotFound(host.to_owned()));
    }
    if rcode != 0 {
        return Err(DnsError::Rcode(rcode));
    }
    if qd > 4 {
        return Err(DnsError::Malformed("too many questions"));
    }
    for _ in 0..qd {
        r.skip_name()?;
        r.take(4)?;
    }
    let mut addrs = Vec::new();
    let mut ttl = MAX_TTL;
    for _ in 0..an.min(256) {
        r.skip_name()?;
        let rtype = r.u16()?;
        let class = r.u16()?;
        let rttl = r.u32()?;
        let len = r.u16()? as usize;
        let data = r.take(len)?;
        if class != 1 || rtype != qtype {
            continue;
        }
        let ip = match (rtype, data.len()) {
            (TYPE_A, 4) => IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (TYPE_AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(DnsError::Malformed("bad address length")),
        };
        addrs.push(ip);
        ttl = ttl.min(Duration::from_secs(rttl.into()));
    }
    Ok(Answer {
        addrs,
        ttl: ttl.clamp(MIN_TTL, MAX_TTL),
    })
}

/// A bounded cache of answers, expiring at their TTL.
#[derive(Debug)]
pub struct DnsCache {
    map: HashMap<String, (Vec<IpAddr>, Instant)>,
    capacity: usize,
}

impl DnsCache {
    /// A cache of at most `capacity` names.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The cached addresses of `host` if still fresh at `now` (empty = negative entry).
    pub fn get(&mut self, host: &str, now: Instant) -> Option<Vec<IpAddr>> {
        match self.map.get(host) {
            Some((addrs, exp)) if *exp > now => Some(addrs.clone()),
            Some(_) => {
                self.map.remove(host);
                None
            }
            None => None,
        }
    }

    /// Stores an answer; an empty one is kept for the negative TTL.
    pub fn put(&mut self, host: &str, addrs: Vec<IpAddr>, ttl: Duration, now: Instant) {
        if self.map.len() >= self.capacity && !self.map.contains_key(host) {
            self.map.retain(|_, (_, exp)| *exp > now);
            if self.map.len() >= self.capacity {
                // Still full of fresh entries: drop the one expiring first.
                if let Some(k) = self
                    .map
                    .iter()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&k);
                }
            }
        }
        let ttl = if addrs.is_empty() { NEGATIVE_TTL } else { ttl };
        self.map.insert(host.to_owned(), (addrs, now + ttl));
    }

    /// Number of entries (fresh or not yet evicted).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(id: u16, host: &str, ips: &[[u8; 4]], ttl: u32) -> Vec<u8> {
        let q = build_query(id, host, TYPE_A);
        let mut a = q.clone();
        a[2] = 0x81;
        a[3] = 0x80;
        a[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
        for ip in ips {
            a.extend_from_slice(&[0xC0, 12]);
            a.extend_from_slice(&TYPE_A.to_be_bytes());
            a.extend_from_slice(&1u16.to_be_bytes());
            a.extend_from_slice(&ttl.to_be_bytes());
            a.extend_from_slice(&4u16.to_be_bytes());
            a.extend_from_slice(ip);
        }
        a
    }

    #[test]
    fn round_trip() {
        let a = answer(7, "example.com", &[[1, 2, 3, 4], [5, 6, 7, 8]], 120);
        let ans = parse_answer(&a, 7, TYPE_A, "example.com").unwrap();
        assert_eq!(ans.addrs.len(), 2);
        assert_eq!(ans.ttl, Duration::from_secs(120));
        assert!(parse_answer(&a, 8, TYPE_A, "x").is_err());
        let mut nx = a.clone();
        nx[3] = 0x83;
        assert_eq!(
            parse_answer(&nx, 7, TYPE_A, "example.com"),
            Err(DnsError::NotFound("example.com".into()))
        );
        let zero = answer(1, "a.b", &[[1, 1, 1, 1]], 0);
        assert_eq!(parse_answer(&zero, 1, TYPE_A, "a.b").unwrap().ttl, MIN_TTL);
    }

    #[test]
    fn names() {
        assert_eq!(normalise_host("Example.COM.").unwrap(), "example.com");
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            &"a".repeat(64),
            &"a.".repeat(130),
            "é.com",
        ] {
            assert!(normalise_host(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cache_respects_ttl_and_capacity() {
        let mut c = DnsCache::new(2);
        let t = Instant::now();
        let ip: IpAddr = "1.2.3.4".parse().unwrap();
        c.put("a", vec![ip], Duration::from_secs(10), t);
        assert_eq!(c.get("a", t + Duration::from_secs(9)), Some(vec![ip]));
        assert_eq!(c.get("a", t + Duration::from_secs(10)), None);
        c.put("a", vec![ip], Duration::from_secs(10), t);
        c.put("b", vec![], Duration::from_secs(100), t);
        c.put("c", vec![ip], Duration::from_secs(100), t);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("a", t), None, "the entry expiring first was evicted");
        assert_eq!(
            c.get("b", t + NEGATIVE_TTL - Duration::from_secs(1)),
            Some(vec![])
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_answer(&buf, 7, TYPE_A, "x");
        }

        #[test]
        fn parse_never_panics_on_mutated(idx in 0usize..60, byte in proptest::num::u8::ANY, cut in 0usize..60) {
            let mut a = answer(7, "example.com", &[[1, 2, 3, 4]], 60);
            let i = idx % a.len();
            a[i] = byte;
            a.truncate(a.len().saturating_sub(cut));
            let _ = parse_answer(&a, 7, TYPE_A, "example.com");
        }
    }
}
