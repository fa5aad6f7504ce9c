//! A tunnel's configuration, and the wg-quick `.conf` importer.
//!
//! wg-quick files are INI-like: `[Interface]` and `[Peer]` sections of `Key = Value`
//! lines, `#` comments. Only the keys a userspace client needs are read; keys that only
//! make sense for a kernel interface (`Table`, `PostUp`, ...) are refused by name so a
//! user knows they are ignored rather than silently half-applied.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use base64::Engine;

/// Default inner MTU: the wg-quick default for IPv4/IPv6 underlay (1500 - 80).
pub const DEFAULT_MTU: usize = 1420;

/// Longest wg-quick file we accept; real ones are well under 4 KiB.
const MAX_CONF_BYTES: usize = 64 * 1024;

/// A 32-byte WireGuard key whose `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

impl SecretKey {
    /// Parses a base64 key (44 characters, as `wg genkey` prints).
    pub fn from_base64(key: &str, value: &str) -> Result<Self, WgConfError> {
        parse_key(key, value).map(Self)
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> [u8; 32] {
        let secret = boringtun::x25519::StaticSecret::from(self.0);
        boringtun::x25519::PublicKey::from(&secret).to_bytes()
    }

    /// A fresh random private key (for tests and for `ipsx` generating its own keys).
    pub fn generate() -> Self {
        let secret = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        Self(secret.to_bytes())
    }
}

/// Encodes a key as wg does (standard base64 with padding).
pub fn key_to_base64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Decodes a wg base64 key; `key` names the field for the error.
pub fn parse_key(key: &str, value: &str) -> Result<[u8; 32], WgConfError> {
    let bad = |reason: &str| WgConfError::BadKey {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let value = value.trim();
    if value.len() != 44 {
        return Err(bad("a WireGuard key is 44 base64 characters"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| bad("not valid base64"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad("does not decode to 32 bytes"))
}

/// Health-check timing of a tunnel (see [`crate::health`] for the exact rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// With nothing received for this long, the tunnel forces a handshake as a probe.
    pub probe_after: Duration,
    /// Data sent and nothing received since for this long: probe at once (a busy
    /// tunnel's exit is checked sooner than an idle one's).
    pub busy_probe_after: Duration,
    /// A handshake initiation unanswered for this long: the exit is unhealthy. Keep it
    /// above 5 s (boringtun's retry) to survive one lost datagram.
    pub dead_after: Duration,
    /// No completed handshake this long after start: unhealthy.
    pub handshake_deadline: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        // A live peer answers a handshake initiation within a round trip; the initiator
        // retries after REKEY_TIMEOUT (5 s), so 15 s without an answer means it is gone.
        Self {
            probe_after: Duration::from_secs(25),
            busy_probe_after: Duration::from_secs(1),
            dead_after: Duration::from_secs(15),
            handshake_deadline: Duration::from_secs(15),
        }
    }
}

/// Everything one tunnel needs. Build it by hand or with [`parse_wg_quick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Our private key (masked in `Debug`).
    pub private_key: SecretKey,
    /// The exit's public key.
    pub peer_public_key: [u8; 32],
    /// Optional preshared key (masked in `Debug`).
    pub preshared_key: Option<SecretKey>,
    /// The exit's UDP endpoint.
    pub endpoint: SocketAddr,
    /// Our IPv4 address inside the tunnel.
    pub inner_addr: Ipv4Addr,
    /// Our optional IPv6 address inside the tunnel.
    pub inner_addr_v6: Option<Ipv6Addr>,
    /// DNS servers reached through the tunnel; empty means "ask the exit itself" is not
    /// possible without an address, so [`crate::Tunnel::resolve`] fails with
    /// [`crate::TunnelError::NoDnsServer`].
    pub dns: Vec<IpAddr>,
    /// Send a keepalive this often when idle (NAT bindings).
    pub persistent_keepalive: Option<Duration>,
    /// Inner MTU (IP packet size inside the tunnel).
    pub mtu: usize,
    /// Health-check timing.
    pub health: HealthSettings,
    /// Local UDP port to bind (wg-quick `ListenPort`; none: any free port). A fixed
    /// port lets an exit behind a NAT send the first handshake to us.
    pub listen_port: Option<u16>,
    /// NAT traversal of the tunnel's socket (STUN mapping, TURN relay); none by
    /// default.
    pub nat: crate::nat::NatSettings,
}

impl TunnelConfig {
    /// A config with the defaults for everything but keys, endpoint and address.
    pub fn new(
        private_key: SecretKey,
        peer_public_key: [u8; 32],
        endpoint: SocketAddr,
        inner_addr: Ipv4Addr,
    ) -> Self {
        Self {
            private_key,
            peer_public_key,
            preshared_key: None,
            endpoint,
            inner_addr,
            inner_addr_v6: None,
            dns: Vec::new(),
            persistent_keepalive: None,
            mtu: DEFAULT_MTU,
            health: HealthSettings::default(),
            listen_port: None,
            nat: crate::nat::NatSettings::default(),
        }
    }
}

/// Why a wg-quick file was refused; names the line (1-based, 0 = whole file) and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WgConfError {
    /// The file is larger than we accept.
    #[error("wg-quick file is {0} bytes, more than the 64 KiB accepted")]
    TooLarge(usize),
    /// A line that is neither a section header, a comment nor `Key = Value`.
    #[error("line {line}: expected `[Section]` or `Key = Value`")]
    Syntax {
        /// 1-based line number.
        line: usize,
    },
    /// A section other than `[Interface]` / `[Peer]`.
    #[error("line {line}: unknown section `{section}` (expected [Interface] or [Peer])")]
    UnknownSection {
        /// 1-based line number.
        line: usize,
        /// The section name as written.
        section: String,
    },
    /// A key outside any section, unknown, or not supported by a userspace tunnel.
    #[error("line {line}: key `{key}` {reason}")]
    UnknownKey {
        /// 1-based line number.
        line: usize,
        /// The key as written.
        key: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A key given twice in one section.
    #[error("line {line}: key `{key}` given twice")]
    Duplicate {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The key.
        key: String,
    },
    /// A value that does not parse.
    #[error("line {line}: key `{key}`: {reason}")]
    BadValue {
        /// 1-based line number.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A key (outside a wg-quick file) that does not decode.
    #[error("key `{key}`: {reason}")]
    BadKey {
        /// The field.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A required key is missing.
    #[error("missing key `{key}` in [{section}]")]
    Missing {
        /// The section that should hold it.
        section: &'static str,
        /// The key.
        key: &'static str,
    },
    /// Not exactly one `[Interface]` and one `[Peer]`.
    #[error("expected exactly one [Interface] and one [Peer], found {interfaces} and {peers}")]
    SectionCount {
        /// Number of `[Interface]` sections.
        interfaces: usize,
        /// Number of `[Peer]` sections.
        peers: usize,
    },
}

impl WgConfError {
    fn at(self, at: usize) -> Self {
        match self {
            Self::BadValue { key, reason, .. } | Self::BadKey { key, reason } => Self::BadValue {
                line: at,
                key,
                reason,
            },
            other => other,
        }
    }
}

#[derive(Default)]
struct Iface {
    private_key: Option<SecretKey>,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    dns: Vec<IpAddr>,
    mtu: Option<usize>,
    listen_port: Option<u16>,
    seen: Vec<String>,
}

#[derive(Default)]
struct Peer {
    public_key: Option<[u8; 32]>,
    psk: Option<SecretKey>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<Duration>,
    seen: Vec<String>,
}

enum Section {
    None,
    Interface,
    Peer,
}

/// Parses a wg-quick `.conf` (one `[Interface]`, one `[Peer]`) into a [`TunnelConfig`].
///
/// `Endpoint` must be `ip:port` or `host:port`; a host name is resolved once here with
/// the system resolver (as wg-quick does). `AllowedIPs` is accepted and checked but the
/// userspace tunnel routes everything it opens through the peer anyway.
pub fn parse_wg_quick(text: &str) -> Result<TunnelConfig, WgConfError> {
    if text.len() > MAX_CONF_BYTES {
        return Err(WgConfError::TooLarge(text.len()));
    }
    let mut section = Section::None;
    let mut iface = Iface::default();
    let mut peer = Peer::default();
    let (mut n_iface, mut n_peer) = (0usize, 0usize);

    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or(WgConfError::Syntax { line: line_no })?
                .trim();
            section = if name.eq_ignore_ascii_case("interface") {
                n_iface += 1;
                Section::Interface
            } else if name.eq_ignore_ascii_case("peer") {
                n_peer += 1;
                Section::Peer
            } else {
                return Err(WgConfError::UnknownSection {
                    line: line_no,
                    section: name.chars().take(64).collect(),
                });
            };
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or(WgConfError::Syntax { line: line_no })?;
        let (key, value) = (key.trim(), value.trim());
        let lkey = key.to_ascii_lowercase();
        let short_key: String = key.chars().take(64).collect();
        let bad = |reason: &str| WgConfError::BadValue {
            line: line_no,
            key: short_key.clone(),
            reason: reason.to_owned(),
        };
        match section {
            Section::None => {
                return Err(WgConfError::UnknownKey {
                    line: line_no,
                    key: short_key,
                    reason: "appears before any [Interface] or [Peer] section",
                });
            }
            Section::Interface => {
                if n_iface > 1 {
                    continue; // reported as SectionCount below
                }
                if iface.seen.contains(&lkey) && lkey != "address" && lkey != "dns" {
                    return Err(WgConfError::Duplicate {
                        line: line_no,
                        key: short_key,
                    });
                }
                iface.seen.push(lkey.clone());
                match lkey.as_str() {
                    "privatekey" => {
                        iface.private_key =
                            Some(SecretKey::from_base64(key, value).map_err(|e| e.at(line_no))?);
                    }
                    "address" => {
                        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let ip_part = item.split('/').next().unwrap_or(item);
                            if let Some(prefix) = item.split('/').nth(1) {
                                prefix.parse::<u8>().map_err(|_| bad("bad prefix length"))?;
                            }
                            match ip_part
                                .parse::<IpAddr>()
                                .map_err(|_| bad("not an IP address"))?
                            {
                                IpAddr::V4(a) if iface.v4.is_none() => iface.v4 = Some(a),
                                IpAddr::V6(a) if iface.v6.is_none() => iface.v6 = Some(a),
                                _ => return Err(bad("at most one IPv4 and one IPv6 address")),
                            }
                        }
                    }
                    "dns" => {
                        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            // wg-quick also allows search domains here; we have no use
                            // for them, but they are not an error.
                            if let Ok(ip) = item.parse::<IpAddr>() {
                                if iface.dns.len() >= 8 {
                                    return Err(bad("more than 8 DNS servers"));
                                }
                                iface.dns.push(ip);
                            }
                        }
                    }
                    "mtu" => {
                        let mtu: usize = value.parse().map_err(|_| bad("not a number"))?;
                        if !(576..=9000).contains(&mtu) {
                            return Err(bad("MTU must be within 576..=9000"));
                        }
                        iface.mtu = Some(mtu);
                    }
                    "listenport" => {
                        let port: u16 = value
                            .parse()
                            .map_err(|_| bad("ListenPort must be a port number"))?;
                        iface.listen_port = (port != 0).then_some(port);
                    }
                    "fwmark" => {
                        // Harmless for a userspace client.
                    }
                    "table" | "preup" | "postup" | "predown" | "postdown" | "saveconfig" => {
                        return Err(WgConfError::UnknownKey {
                            line: line_no,
                            key: short_key,
                            reason: "configures a kernel interface; a userspace tunnel cannot apply it",
                        });
                    }
                    _ => {
                        return Err(WgConfError::UnknownKey {
                            line: line_no,
                            key: short_key,
                            reason: "is not a known [Interface] key",
                        });
                    }
                }
            }
            Section::Peer => {
                if n_peer > 1 {
                    continue;
                }
                if peer.seen.contains(&lkey) && lkey != "allowedips" {
                    return Err(WgConfError::Duplicate {
                        line: line_no,
                        key: short_key,
                    });
                }
                peer.seen.push(lkey.clone());
                match lkey.as_str() {
                    "publickey" => {
                        peer.public_key = Some(parse_key(key, value).map_err(|e| e.at(line_no))?)
                    }
                    "presharedkey" => {
                        peer.psk =
                            Some(SecretKey::from_base64(key, value).map_err(|e| e.at(line_no))?)
                    }
                    "endpoint" => {
                        peer.endpoint = Some(parse_endpoint(value).map_err(|r| bad(&r))?);
                    }
                    "allowedips" => {
                        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let (ip, prefix) = item
                                .split_once('/')
                                .ok_or_else(|| bad("expected address/prefix"))?;
                            let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
                            let prefix: u8 =
                                prefix.parse().map_err(|_| bad("bad prefix length"))?;
                            let max = if ip.is_ipv4() { 32 } else { 128 };
                            if prefix > max {
                                return Err(bad("prefix length too long"));
                            }
                        }
                    }
                    "persistentkeepalive" => {
                        if value.eq_ignore_ascii_case("off") {
                            peer.keepalive = None;
                        } else {
                            let secs: u16 =
                                value.parse().map_err(|_| bad("not a number of seconds"))?;
                            peer.keepalive = (secs > 0).then(|| Duration::from_secs(secs.into()));
                        }
                    }
                    _ => {
                        return Err(WgConfError::UnknownKey {
                            line: line_no,
                            key: short_key,
                            reason: "is not a known [Peer] key",
                        });
                    }
                }
            }
        }
    }
    if n_iface != 1 || n_peer != 1 {
        return Err(WgConfError::SectionCount {
            interfaces: n_iface,
            peers: n_peer,
        });
    }
    let private_key = iface.private_key.ok_or(WgConfError::Missing {
        section: "Interface",
        key: "PrivateKey",
    })?;
    let inner_addr = iface.v4.ok_or(WgConfError::Missing {
        section: "Interface",
        key: "Address",
    })?;
    let peer_public_key = peer.public_key.ok_or(WgConfError::Missing {
        section: "Peer",
        key: "PublicKey",
    })?;
    let endpoint = peer.endpoint.ok_or(WgConfError::Missing {
        section: "Peer",
        key: "Endpoint",
    })?;
    Ok(TunnelConfig {
        private_key,
        peer_public_key,
        preshared_key: peer.psk,
        endpoint,
        inner_addr,
        inner_addr_v6: iface.v6,
        dns: iface.dns,
        persistent_keepalive: peer.keepalive,
        mtu: iface.mtu.unwrap_or(DEFAULT_MTU),
        health: HealthSettings::default(),
        listen_port: iface.listen_port,
        nat: crate::nat::NatSettings::default(),
    })
}

fn parse_endpoint(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0".into());
        }
        return Ok(addr);
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_owned())?;
    let port: u16 = port.parse().map_err(|_| "bad port".to_owned())?;
    if port == 0 {
        return Err("port 0".into());
    }
    if host.is_empty() || host.len() > 253 {
        return Err("bad host name".into());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{host}` has no address"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const K2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn sample() -> String {
        format!(
            "# a comment\n[Interface]\nPrivateKey = {K1}\nAddress = 10.0.0.2/32, fd00::2/128\nDNS = 10.0.0.1, example.internal\nMTU = 1380\n\n[Peer]\nPublicKey = {K2}\nPresharedKey = {K1}\nEndpoint = 127.0.0.1:51820\nAllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn parses_a_full_file() {
        let cfg = parse_wg_quick(&sample()).unwrap();
        assert_eq!(cfg.inner_addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(cfg.inner_addr_v6, Some("fd00::2".parse().unwrap()));
        assert_eq!(cfg.dns, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(cfg.mtu, 1380);
        assert_eq!(cfg.endpoint, "127.0.0.1:51820".parse().unwrap());
        assert_eq!(cfg.persistent_keepalive, Some(Duration::from_secs(25)));
        assert_eq!(key_to_base64(&cfg.peer_public_key), K2);
        assert!(cfg.preshared_key.is_some());
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains(K1) && dbg.contains("SecretKey(***)"));
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = sample().replace("MTU = 1380", "MTU = lots");
        let err = parse_wg_quick(&text).unwrap_err();
        assert_eq!(
            err,
            WgConfError::BadValue {
                line: 6,
                key: "MTU".into(),
                reason: "not a number".into()
            }
        );
        let text = sample().replace(&format!("PublicKey = {K2}"), "PublicKey = abc");
        match parse_wg_quick(&text).unwrap_err() {
            WgConfError::BadValue { line, key, .. } => {
                assert_eq!((line, key.as_str()), (9, "PublicKey"))
            }
            e => panic!("{e}"),
        }
        let text = sample().replace("MTU = 1380", "PostUp = iptables -F");
        assert!(matches!(
            parse_wg_quick(&text).unwrap_err(),
            WgConfError::UnknownKey { line: 6, .. }
        ));
        let text = sample().replace("MTU = 1380", "Bogus = 1");
        assert!(
            parse_wg_quick(&text)
                .unwrap_err()
                .to_string()
                .contains("Bogus")
        );
        let text = sample().replace("Endpoint = 127.0.0.1:51820", "Endpoint = 127.0.0.1");
        assert!(matches!(
            parse_wg_quick(&text).unwrap_err(),
            WgConfError::BadValue { line: 11, .. }
        ));
    }

    #[test]
    fn structural_errors() {
        assert!(matches!(
            parse_wg_quick("PrivateKey = x"),
            Err(WgConfError::UnknownKey { line: 1, .. })
        ));
        assert!(matches!(
            parse_wg_quick("[Interface"),
            Err(WgConfError::Syntax { line: 1 })
        ));
        assert!(matches!(
            parse_wg_quick("[Wat]"),
            Err(WgConfError::UnknownSection { line: 1, .. })
        ));
        assert!(matches!(
            parse_wg_quick(""),
            Err(WgConfError::SectionCount { .. })
        ));
        let twice = format!("{}\n[Peer]\nPublicKey = {K2}\n", sample());
        assert!(matches!(
            parse_wg_quick(&twice),
            Err(WgConfError::SectionCount { peers: 2, .. })
        ));
        let no_addr = sample().replace("Address = 10.0.0.2/32, fd00::2/128\n", "");
        assert_eq!(
            parse_wg_quick(&no_addr).unwrap_err(),
            WgConfError::Missing {
                section: "Interface",
                key: "Address"
            }
        );
        let dup = sample().replace("MTU = 1380", "MTU = 1380\nmtu = 1300");
        assert!(matches!(
            parse_wg_quick(&dup),
            Err(WgConfError::Duplicate { line: 7, .. })
        ));
        let huge = "#".repeat(MAX_CONF_BYTES + 1);
        assert!(matches!(
            parse_wg_quick(&huge),
            Err(WgConfError::TooLarge(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,400}") {
            let _ = parse_wg_quick(&s);
        }

        #[test]
        // No `:` in junk, so no host name ever reaches the system resolver.
        fn never_panics_on_mutated_lines(idx in 0usize..14, junk in "[ -9;-~]{0,80}") {
            let mut lines: Vec<String> = sample().lines().map(str::to_owned).collect();
            let i = idx % lines.len();
            lines[i] = junk;
            let _ = parse_wg_quick(&lines.join("\n"));
        }
    }
}
