//! The provider exit's configuration (`ipsx provider --config FILE`, TOML).
//!
//! ```toml
//! listen = "0.0.0.0:51820"          # UDP, WireGuard
//! private_key = "base64..."         # wg genkey
//! exit_address = "203.0.113.7"      # flows leave from this address
//! inner_address = "10.77.0.1"       # the exit inside the tunnels (DNS server for peers)
//! dns_upstream = "1.1.1.1:53"       # where peers' DNS queries are forwarded
//! protocols = ["http", "https"]     # or ["any"]
//! allow_destinations = []           # test/dev only: ranges normally refused
//! own_addresses = []                # extra addresses of this host to refuse
//!
//! [limits]                          # per-requester load; see crate::limits::Limits
//! max_flows_per_peer = 256
//! new_flows_per_second = 100
//! idle_timeout = "5m"
//!
//! [[peers]]
//! public_key = "base64..."
//! inner_ip = "10.77.0.2"
//! endpoint = "198.51.100.4:40000"   # optional: the exit sends first (NAT, relay)
//!
//! [nat]                             # optional: behind a NAT (docs/tunnel.md)
//! stun = ["192.0.2.1:3478"]         # two servers also detect a symmetric NAT
//! turn = "192.0.2.1:3478"           # relay when symmetric (or `relay = "always"`)
//! turn_username = "ipsx"
//! turn_password = "..."
//! relay = "auto"                    # auto | always | never
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Deserializer};

use crate::ProviderError;
use crate::limits::Limits;
use crate::policy::{Cidr, Protocol};

/// A base64 WireGuard private key whose `Debug` prints nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey(pub [u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(***)")
    }
}

impl<'de> Deserialize<'de> for PrivateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ipsx_tunnel_pool::parse_key("private_key", &s)
            .map(PrivateKey)
            .map_err(serde::de::Error::custom)
    }
}

/// A base64 WireGuard public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&ipsx_tunnel_pool::key_to_base64(&self.0))
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ipsx_tunnel_pool::parse_key("public_key", &s)
            .map(PublicKey)
            .map_err(serde::de::Error::custom)
    }
}

/// A peer allowed at start-up (more are added at runtime as deals are made).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The requester's WireGuard public key.
    pub public_key: PublicKey,
    /// The requester's address inside the tunnel; packets from any other source are
    /// dropped.
    pub inner_ip: IpAddr,
    /// The requester's public WireGuard endpoint, when known: the exit sends the first
    /// handshake there (opening its NAT) and, when relaying, lets it through the relay.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
}

pub use ipsx_tunnel_pool::nat::NatSection;

fn default_inner() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 1)
}
fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http, Protocol::Https]
}
fn default_rate() -> u64 {
    50
}
fn default_mtu() -> usize {
    ipsx_tunnel_pool::config::DEFAULT_MTU
}

/// The provider exit's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// UDP address WireGuard listens on (port 0: any free port).
    pub listen: SocketAddr,
    /// The exit's WireGuard private key.
    pub private_key: PrivateKey,
    /// Flows to destinations leave from this address.
    pub exit_address: IpAddr,
    /// The exit's own address inside the tunnels.
    #[serde(default = "default_inner")]
    pub inner_address: Ipv4Addr,
    /// Where peers' DNS queries (UDP port 53 to any address) are forwarded; none
    /// means DNS is not offered.
    #[serde(default)]
    pub dns_upstream: Option<SocketAddr>,
    /// The offer's protocols (destination ports).
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// Ranges normally refused that this exit may dial anyway (tests, dev).
    #[serde(default)]
    pub allow_destinations: Vec<String>,
    /// More addresses of this host to refuse.
    #[serde(default)]
    pub own_addresses: Vec<IpAddr>,
    /// Handshake initiations per second before cookie replies are demanded.
    #[serde(default = "default_rate")]
    pub handshake_rate_limit: u64,
    /// Inner MTU.
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// What one requester may cost the exit (`[limits]`).
    #[serde(default)]
    pub limits: Limits,
    /// Peers known at start.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// NAT traversal (none by default: the listen address is reachable).
    #[serde(default)]
    pub nat: NatSection,
    /// Local services peers reach at `inner_address` past the egress policy (set by
    /// the agent: the connection-log listener; see [`crate::inner_service`]).
    #[serde(skip)]
    pub inner_services: crate::inner_service::InnerServices,
}

impl ProviderConfig {
    /// A config with defaults for everything but the essentials.
    pub fn new(listen: SocketAddr, private_key: [u8; 32], exit_address: IpAddr) -> Self {
        Self {
            listen,
            private_key: PrivateKey(private_key),
            exit_address,
            inner_address: default_inner(),
            dns_upstream: None,
            protocols: default_protocols(),
            allow_destinations: Vec::new(),
            own_addresses: Vec::new(),
            handshake_rate_limit: default_rate(),
            mtu: default_mtu(),
            limits: Limits::default(),
            peers: Vec::new(),
            nat: NatSection::default(),
            inner_services: crate::inner_service::InnerServices::none(),
        }
    }

    /// Parses and validates a TOML config; errors name the key (and line for syntax).
    pub fn from_toml(text: &str) -> Result<Self, ProviderError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ProviderError::Config {
            key: "(file)".into(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let bad = |key: &str, reason: &str| ProviderError::Config {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if self.exit_address.is_unspecified() || self.exit_address.is_multicast() {
            return Err(bad("exit_address", "must be a unicast address"));
        }
        if self.protocols.is_empty() {
            return Err(bad("protocols", "at least one protocol"));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(bad("mtu", "must be within 576..=9000"));
        }
        if self.handshake_rate_limit == 0 {
            return Err(bad("handshake_rate_limit", "must be at least 1"));
        }
        for a in &self.allow_destinations {
            Cidr::parse("allow_destinations", a)?;
        }
        self.limits.validate("limits")?;
        self.nat
            .settings()
            .map_err(|(key, reason)| ProviderError::Config {
                key: format!("nat.{key}"),
                reason,
            })?;
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            if !seen.insert(p.public_key) {
                return Err(bad(&format!("peers[{i}].public_key"), "given twice"));
            }
            if IpAddr::V4(self.inner_address) == p.inner_ip {
                return Err(bad(
                    &format!("peers[{i}].inner_ip"),
                    "is the exit's inner_address",
                ));
            }
        }
        Ok(())
    }

    /// The allow-list, parsed.
    pub fn allow_list(&self) -> Result<Vec<Cidr>, ProviderError> {
        self.allow_destinations
            .iter()
            .map(|a| Cidr::parse("allow_destinations", a))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const K: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn base() -> String {
        format!(
            "listen = \"127.0.0.1:0\"\nprivate_key = \"{K}\"\nexit_address = \"127.0.0.2\"\nprotocols = [\"any\"]\nallow_destinations = [\"127.0.0.0/8\"]\n\n[[peers]]\npublic_key = \"{P}\"\ninner_ip = \"10.77.0.2\"\n"
        )
    }

    #[test]
    fn parses_and_masks() {
        let c = ProviderConfig::from_toml(&base()).unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.protocols, vec![Protocol::Any]);
        assert!(!format!("{c:?}").contains(K));
        assert_eq!(format!("{:?}", c.private_key), "PrivateKey(***)");
    }

    #[test]
    fn refuses_bad_configs_naming_the_key() {
        let cases = [
            (base().replace("listen", "lisen"), "lisen"),
            (base().replace("\"any\"", "\"ftp\""), "ftp"),
            (base().replace(K, "short"), "private_key"),
            (
                base().replace("127.0.0.0/8", "127.0.0.0/99"),
                "allow_destinations",
            ),
            (
                base().replace("exit_address = \"127.0.0.2\"", "exit_address = \"0.0.0.0\""),
                "exit_address",
            ),
            (
                base().replace("10.77.0.2", "10.77.0.1"),
                "peers[0].inner_ip",
            ),
            (
                format!(
                    "{}\n[[peers]]\npublic_key = \"{P}\"\ninner_ip = \"10.77.0.3\"\n",
                    base()
                ),
                "peers[1].public_key",
            ),
            (
                base().replace(
                    "inner_ip = \"10.77.0.2\"",
                    "inner_ip = \"10.77.0.2\"\nextra = 1",
                ),
                "extra",
            ),
            (
                format!("{}\n[limits]\nidle_timeout = \"1ms\"\n", base()),
                "limits.idle_timeout",
            ),
            (
                format!("{}\n[limits]\nmax_flows_per_peer = 0\n", base()),
                "limits.max_flows_per_peer",
            ),
            (format!("{}\n[limits]\nmax_flow = 3\n", base()), "max_flow"),
            (
                base().replace("[[peers]]", "[nat]\nrelay = \"sometimes\"\n[[peers]]"),
                "nat.relay",
            ),
            (
                base().replace("[[peers]]", "[nat]\nrelay = \"always\"\n[[peers]]"),
                "nat.relay",
            ),
            (
                base().replace("[[peers]]", "[nat]\nturn_password = \"x\"\n[[peers]]"),
                "nat.turn",
            ),
            (
                base().replace(
                    "[[peers]]",
                    "[nat]\nturn = \"192.0.2.1:3478\"\nturn_username = \"u\"\n[[peers]]",
                ),
                "nat.turn_password",
            ),
            (
                base().replace("[[peers]]", "[nat]\nstun = [\"0.0.0.0:3478\"]\n[[peers]]"),
                "nat.stun",
            ),
        ];
        for (text, key) in cases {
            let err = ProviderConfig::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = ProviderConfig::from_toml(&s);
        }
    }
}
