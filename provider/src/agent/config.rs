//! The agent's configuration (`ipsx provider --config FILE` with an `[exchange]`
//! section): where the exchange and the chain are, the wallet, the timings, and one
//! `[[exit]]` per exit address offered. Raw TOML is checked into [`AgentConfig`] here;
//! every error names the key at fault (`exit[1].price_per_ip_second`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipsx_exchange_client::types::{MAX_CAPACITY, MAX_DURATION_S, MIN_DURATION_S};
use ipsx_rotation::{CountryCode, ExitKind, parse_place};
use serde::{Deserialize, Deserializer};

use super::AgentError;
use crate::config::PrivateKey;
use crate::policy::{Cidr, Protocol};

/// Everything the provider agent reads.
///
/// ```toml
/// [exchange]
/// url = "http://127.0.0.1:8700"
///
/// [chain]
/// rpc_url = "http://127.0.0.1:8545"
/// deployment = "ipsx-deployment.json"
///
/// [wallet]
/// keystore = "provider-wallet.json"
/// password_env = "IPSX_WALLET_PASSWORD"
///
/// [[exit]]
/// exit_address = "127.0.0.2"
/// listen = "127.0.0.2:0"
/// country = "de"
/// type = "residential"
/// price_per_ip_second = "1000000000000"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The exchange node.
    pub exchange: ExchangeSection,
    /// The chain holding the Centralizer.
    pub chain: ChainSection,
    /// The provider's wallet key.
    pub wallet: WalletSection,
    /// Offer lifetime, prepaid window, grace, claim and poll intervals.
    #[serde(default)]
    pub timings: Timings,
    /// One entry per exit address offered.
    #[serde(rename = "exit")]
    pub exits: Vec<ExitSection>,
    /// What one requester may cost each exit (`[limits]`, see [`crate::limits::Limits`]).
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// The local status listener (`[status]`). Absent: `127.0.0.1:9901` if that port
    /// is free (a warning otherwise); present: its `listen` must bind.
    #[serde(default)]
    pub status: Option<StatusSection>,
    /// Where and how much of each deal's connection log is kept (`[connlog]`).
    #[serde(default)]
    pub connlog: ConnlogSection,
}

/// `[connlog]`: each deal's connection log on disk (docs/provider.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnlogSection {
    /// Directory of the logs. Absent: `$XDG_STATE_HOME/ipsx/connlog/<wallet>` (else
    /// `$HOME/.local/state/...`, else the temp dir).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Records kept per deal; later connections are counted, not recorded.
    #[serde(default = "d_max_records")]
    pub max_records_per_deal: u64,
    /// Bytes of records kept over all deals (51 bytes a record).
    #[serde(default = "d_max_bytes")]
    pub max_bytes: u64,
}

fn d_max_records() -> u64 {
    crate::connlog_store::StoreLimits::default().max_records_per_deal
}
fn d_max_bytes() -> u64 {
    crate::connlog_store::StoreLimits::default().max_bytes
}

impl Default for ConnlogSection {
    fn default() -> Self {
        Self {
            dir: None,
            max_records_per_deal: d_max_records(),
            max_bytes: d_max_bytes(),
        }
    }
}

impl ConnlogSection {
    /// The directory for `wallet`'s logs.
    pub fn dir_for(&self, wallet: alloy_primitives::Address) -> PathBuf {
        if let Some(d) = &self.dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local").join("state"))
            })
            .unwrap_or_else(std::env::temp_dir);
        base.join("ipsx")
            .join("connlog")
            .join(format!("{wallet:#x}"))
    }

    /// The store's caps.
    pub fn limits(&self) -> crate::connlog_store::StoreLimits {
        crate::connlog_store::StoreLimits {
            max_records_per_deal: self.max_records_per_deal,
            max_bytes: self.max_bytes,
        }
    }
}

/// The default status listener.
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9901";

fn d_status_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn d_true() -> bool {
    true
}

/// `[status]`: the HTTP listener serving `GET /api/status` (docs/provider.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusSection {
    /// Whether to serve it at all.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// TCP address (port 0: any free port).
    #[serde(default = "d_status_listen")]
    pub listen: SocketAddr,
    /// Bearer token every route but `/healthz` then needs; required (16+ characters)
    /// when `listen` is not loopback.
    #[serde(default)]
    pub token: Option<Token>,
}

impl Default for StatusSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: d_status_listen(),
            token: None,
        }
    }
}

/// `[exchange]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeSection {
    /// Base URL of the exchange API (`http://host:port`).
    pub url: String,
}

/// `[chain]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    /// JSON-RPC URL of the chain.
    pub rpc_url: String,
    /// The deployment file written by `ipsx chain deploy`.
    pub deployment: PathBuf,
}

/// A secret string (a key, a token) whose `Debug` prints nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Masked(pub String);

impl fmt::Debug for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Masked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Masked)
    }
}

/// A hex private key, masked in `Debug`.
pub type HexKey = Masked;

/// A bearer token, masked in `Debug`.
pub type Token = Masked;

/// `[wallet]`: an encrypted keystore (with its password in an environment variable or a
/// file), or, for demos and tests only, a hex `private_key` written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalletSection {
    /// Web3 Secret Storage keystore file (`ipsx wallet create`).
    #[serde(default)]
    pub keystore: Option<PathBuf>,
    /// Environment variable holding the keystore password.
    #[serde(default = "default_password_env")]
    pub password_env: String,
    /// File whose first line is the keystore password (instead of `password_env`).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Demos and tests only: the key in clear, hex. Never use it with real funds.
    #[serde(default)]
    pub private_key: Option<HexKey>,
}

fn default_password_env() -> String {
    "IPSX_WALLET_PASSWORD".into()
}

/// `[timings]`, all as human durations (`"30s"`, `"500ms"`, `"1h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Offers expire this long after posting; they are re-posted at two thirds of it.
    #[serde(default = "d_offer_ttl", with = "humantime_serde")]
    pub offer_ttl: Duration,
    /// The first window: service starts once a verified proof covers this much of it
    /// (default 2 s, `market::DEFAULT_FIRST_WINDOW`); after that the peer stays while
    /// payment keeps up with service within `grace`.
    #[serde(default = "d_first_window", with = "humantime_serde")]
    pub first_window: Duration,
    /// The old name of the prepaid window (30 s by default then): refused with a hint,
    /// since it no longer means what it did.
    #[serde(default, with = "humantime_serde")]
    pub window: Option<Duration>,
    /// How far payment may lag behind service before the peer is removed.
    #[serde(default = "d_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// Also claim whatever is unclaimed on a channel this often (absent: no timer;
    /// claims are lazy, see `claim_threshold`).
    #[serde(default, with = "humantime_serde")]
    pub claim_interval: Option<Duration>,
    /// A channel is claimed once its unclaimed amount reaches this: `"auto"` (default,
    /// [`CLAIM_GAS_SHARE`]: a claim's gas at the chain's gas price is at most 1 % of
    /// what it claims) or a token amount in base units.
    #[serde(default)]
    pub claim_threshold: ClaimThreshold,
    /// The deal list is polled this often (fallback for the event stream).
    #[serde(default = "d_poll", with = "humantime_serde")]
    pub poll: Duration,
}

fn d_offer_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn d_first_window() -> Duration {
    ipsx_exchange_client::market::DEFAULT_FIRST_WINDOW
}
fn d_grace() -> Duration {
    Duration::from_secs(10)
}
/// Gas a claim costs (measured on anvil: 62k-75k; rounded up).
pub const CLAIM_GAS: u128 = 80_000;

/// `claim_threshold = "auto"`: claim once the claim's gas cost is at most
/// 1/`CLAIM_GAS_SHARE` of the amount claimed (1 %).
pub const CLAIM_GAS_SHARE: u128 = 100;

/// When a channel's unclaimed amount is worth a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClaimThreshold {
    /// `CLAIM_GAS x gas price x CLAIM_GAS_SHARE`, reading the gas price from the chain
    /// (one token base unit taken as worth one wei: without a price feed the agent
    /// cannot convert; set a fixed amount when they differ).
    #[default]
    Auto,
    /// This many token base units.
    Fixed(u128),
}

impl ClaimThreshold {
    /// The threshold in base units at `gas_price` (wei per gas).
    pub fn resolve(self, gas_price: u128) -> u128 {
        match self {
            Self::Fixed(v) => v,
            Self::Auto => CLAIM_GAS
                .saturating_mul(gas_price)
                .saturating_mul(CLAIM_GAS_SHARE),
        }
    }
}

impl<'de> Deserialize<'de> for ClaimThreshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Word {
            Auto,
        }
        /// `"auto"` or an amount, parsed as a [`Price`].
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "\"auto\" or an amount in base units")]
        enum Raw {
            Word(Word),
            Amount(Price),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Word(Word::Auto) => Self::Auto,
            Raw::Amount(Price(v)) => Self::Fixed(v),
        })
    }
}

fn d_poll() -> Duration {
    Duration::from_secs(10)
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            offer_ttl: d_offer_ttl(),
            first_window: d_first_window(),
            window: None,
            grace: d_grace(),
            claim_interval: None,
            claim_threshold: ClaimThreshold::Auto,
            poll: d_poll(),
        }
    }
}

/// A price in token base units: a TOML integer or a decimal string (amounts overflow
/// TOML's 64-bit integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price(pub u128);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) => u128::try_from(i)
                .map(Price)
                .map_err(|_| serde::de::Error::custom(format!("negative amount {i}"))),
            Raw::Text(s) => ipsx_exchange_client::types::amount::parse(&s)
                .map(Price)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// One `[[exit]]`: an exit address offered on the exchange and the WireGuard server
/// serving it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitSection {
    /// Flows leave from this address; it is what the offer sells.
    pub exit_address: IpAddr,
    /// UDP address of this exit's WireGuard server (port 0: any free port).
    pub listen: SocketAddr,
    /// The endpoint advertised in offers, when it differs from the bound address (NAT,
    /// port forwarding). Default: the listen IP (the exit address if the listen IP is
    /// unspecified) with the bound port.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// NAT traversal of this exit's WireGuard socket (`[exit.nat]`: `stun`, `turn`,
    /// `turn_username`, `turn_password`, `relay`, `timeout_s`). Without `endpoint`,
    /// the offer advertises what traversal found (STUN mapping or TURN relay).
    #[serde(default)]
    pub nat: crate::config::NatSection,
    /// WireGuard private key (base64). Generated at start when absent, in which case
    /// deals made before a restart cannot be served again.
    #[serde(default)]
    pub private_key: Option<PrivateKey>,
    /// Country of the exit address (ISO 3166-1 alpha-2).
    pub country: CountryCode,
    /// Region, if known.
    #[serde(default)]
    pub region: Option<String>,
    /// City, if known.
    #[serde(default)]
    pub city: Option<String>,
    /// Autonomous system number, if known.
    #[serde(default)]
    pub asn: Option<u32>,
    /// Residential, mobile or datacenter.
    #[serde(rename = "type")]
    pub kind: ExitKind,
    /// Protocols let through (`http`, `https`, `smtp`, `any`).
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// Price per IP-second, token base units.
    pub price_per_ip_second: Price,
    /// Shortest rental accepted.
    #[serde(default = "d_min_duration", with = "humantime_serde")]
    pub min_duration: Duration,
    /// Longest rental accepted.
    #[serde(default = "d_max_duration", with = "humantime_serde")]
    pub max_duration: Duration,
    /// Deals served at once on this exit.
    #[serde(default = "d_capacity")]
    pub capacity: u32,
    /// Tests and demos only: destination ranges normally refused that may be dialled.
    #[serde(default)]
    pub allow_destinations: Vec<String>,
    /// Where peers' DNS queries are forwarded (none: no DNS).
    #[serde(default)]
    pub dns_upstream: Option<SocketAddr>,
    /// More addresses of this host the exit must refuse to dial.
    #[serde(default)]
    pub own_addresses: Vec<IpAddr>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http, Protocol::Https]
}
fn d_min_duration() -> Duration {
    Duration::from_secs(MIN_DURATION_S)
}
fn d_max_duration() -> Duration {
    Duration::from_secs(86_400)
}
fn d_capacity() -> u32 {
    1
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> AgentError {
    AgentError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

impl AgentConfig {
    /// Parses and checks a TOML document; errors name the key (`exit[0].capacity`) and,
    /// for syntax errors, the line.
    pub fn from_toml(text: &str) -> Result<Self, AgentError> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| bad(line_of(text, &e), e.message()))?;
        let cfg: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let key = if path.is_empty() || path == "." {
                line_of(text, &inner)
            } else {
                path
            };
            bad(key, inner.message())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and checks a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(path.display().to_string(), e.to_string()))?;
        Self::from_toml(&text)
    }

    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), AgentError> {
        if self.connlog.max_records_per_deal == 0 {
            return Err(bad("connlog.max_records_per_deal", "must be at least 1"));
        }
        if self.connlog.max_bytes < crate::connlog_store::StoreLimits::default().max_bytes / 256 {
            return Err(bad("connlog.max_bytes", "must be at least 1 MiB"));
        }
        let url = self.exchange.url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(bad("exchange.url", "must be an http:// or https:// URL"));
        }
        let rpc = self.chain.rpc_url.trim();
        if !(rpc.starts_with("http://") || rpc.starts_with("https://")) {
            return Err(bad("chain.rpc_url", "must be an http:// or https:// URL"));
        }
        if self.chain.deployment.as_os_str().is_empty() {
            return Err(bad("chain.deployment", "must name the deployment file"));
        }
        match (&self.wallet.keystore, &self.wallet.private_key) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "wallet.private_key",
                    "give either keystore or private_key, not both",
                ));
            }
            (None, None) => {
                return Err(bad(
                    "wallet.keystore",
                    "missing: give a keystore file (or, for demos, private_key)",
                ));
            }
            _ => {}
        }
        if self.wallet.password_env.is_empty() {
            return Err(bad("wallet.password_env", "must not be empty"));
        }
        let t = &self.timings;
        if t.offer_ttl < Duration::from_secs(10) {
            return Err(bad("timings.offer_ttl", "at least 10s"));
        }
        if t.window.is_some() {
            return Err(bad(
                "timings.window",
                "replaced by first_window (service starts once this much is paid; default 2s)",
            ));
        }
        if t.first_window < Duration::from_secs(1) || t.first_window > Duration::from_secs(3600) {
            return Err(bad("timings.first_window", "between 1s and 1h"));
        }
        if t.poll < Duration::from_millis(50) || t.poll > Duration::from_secs(3600) {
            return Err(bad("timings.poll", "between 50ms and 1h"));
        }
        self.limits.validate("limits").map_err(|e| match e {
            crate::ProviderError::Config { key, reason } => bad(key, reason),
            other => bad("limits", other.to_string()),
        })?;
        if let Some(st) = &self.status {
            let token_ok = st.token.as_ref().is_some_and(|t| t.0.len() >= 16);
            if st.token.is_some() && !token_ok {
                return Err(bad("status.token", "must be at least 16 characters"));
            }
            if st.enabled && !st.listen.ip().is_loopback() && !token_ok {
                return Err(bad(
                    "status.token",
                    "required (at least 16 characters) when `status.listen` is not loopback",
                ));
            }
        }
        if t.claim_interval.is_some_and(|i| i < Duration::from_secs(1)) {
            return Err(bad("timings.claim_interval", "at least 1s"));
        }
        if t.grace > Duration::from_secs(86_400) {
            return Err(bad("timings.grace", "at most 1 day"));
        }
        if self.exits.is_empty() {
            return Err(bad("exit", "at least one [[exit]]"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, x) in self.exits.iter().enumerate() {
            let k = |f: &str| format!("exit[{i}].{f}");
            if x.exit_address.is_unspecified() || x.exit_address.is_multicast() {
                return Err(bad(k("exit_address"), "must be a unicast address"));
            }
            if !seen.insert(x.exit_address) {
                return Err(bad(k("exit_address"), "offered twice"));
            }
            if let Some(e) = x.endpoint
                && (e.port() == 0 || e.ip().is_unspecified())
            {
                return Err(bad(k("endpoint"), "needs a routable address and a port"));
            }
            if let Err((key, reason)) = x.nat.settings() {
                return Err(bad(k(&format!("nat.{key}")), reason));
            }
            if let Some(r) = &x.region {
                parse_place("region", r).map_err(|e| bad(k("region"), e.to_string()))?;
            }
            if let Some(c) = &x.city {
                parse_place("city", c).map_err(|e| bad(k("city"), e.to_string()))?;
            }
            if matches!(x.asn, Some(0) | Some(u32::MAX)) {
                return Err(bad(k("asn"), "must be in 1..=4294967294"));
            }
            if x.protocols.is_empty() {
                return Err(bad(k("protocols"), "at least one protocol"));
            }
            if x.price_per_ip_second.0 == 0 {
                return Err(bad(k("price_per_ip_second"), "must be positive"));
            }
            let (min, max) = (x.min_duration.as_secs(), x.max_duration.as_secs());
            for (f, v) in [("min_duration", min), ("max_duration", max)] {
                if !(MIN_DURATION_S..=MAX_DURATION_S).contains(&v) {
                    return Err(bad(k(f), format!("{v} s is outside 5 s..30 days")));
                }
            }
            if min > max {
                return Err(bad(k("max_duration"), "below min_duration"));
            }
            if x.price_per_ip_second
                .0
                .checked_mul(u128::from(max))
                .is_none()
            {
                return Err(bad(
                    k("price_per_ip_second"),
                    "price x max_duration overflows 128 bits",
                ));
            }
            if x.capacity == 0 || x.capacity > MAX_CAPACITY {
                return Err(bad(k("capacity"), format!("must be in 1..={MAX_CAPACITY}")));
            }
            for a in &x.allow_destinations {
                Cidr::parse(&k("allow_destinations"), a)
                    .map_err(|e| bad(k("allow_destinations"), e.to_string()))?;
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(s) => {
            let start = s.start.min(text.len());
            let line = text.get(..start).map_or(0, |t| t.matches('\n').count()) + 1;
            format!("line {line}")
        }
        None => "(document)".into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
[exchange]
url = "http://127.0.0.1:8700"
[chain]
rpc_url = "http://127.0.0.1:8545"
deployment = "d.json"
[wallet]
private_key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
[timings]
first_window = "5s"
poll = "500ms"
[[exit]]
exit_address = "127.0.0.2"
listen = "127.0.0.2:0"
country = "de"
type = "residential"
price_per_ip_second = "1000000000000"
capacity = 2
"#;

    fn err(text: &str) -> String {
        match AgentConfig::from_toml(text) {
            Err(AgentError::Config { key, reason }) => format!("{key}: {reason}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn threshold(v: &str) -> Result<ClaimThreshold, String> {
        let text = GOOD.replace(
            "poll = \"500ms\"",
            &format!("poll = \"500ms\"\nclaim_threshold = {v}"),
        );
        AgentConfig::from_toml(&text)
            .map(|c| c.timings.claim_threshold)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn claim_threshold_is_auto_or_an_amount() {
        assert_eq!(
            AgentConfig::from_toml(GOOD)
                .unwrap()
                .timings
                .claim_threshold,
            ClaimThreshold::Auto
        );
        assert_eq!(
            AgentConfig::from_toml(GOOD).unwrap().timings.claim_interval,
            None
        );
        assert_eq!(threshold("\"auto\""), Ok(ClaimThreshold::Auto));
        assert_eq!(threshold("\"5000\""), Ok(ClaimThreshold::Fixed(5000)));
        assert_eq!(threshold("5000"), Ok(ClaimThreshold::Fixed(5000)));
        for bad in ["-5", "\"-5\"", "\"often\"", "\"Auto \"", "1.5", "true"] {
            let e = threshold(bad).unwrap_err();
            assert!(e.contains("claim_threshold"), "{bad}: {e}");
        }
        assert_eq!(
            ClaimThreshold::Auto.resolve(2),
            CLAIM_GAS * 2 * CLAIM_GAS_SHARE
        );
        assert_eq!(ClaimThreshold::Auto.resolve(u128::MAX), u128::MAX);
        assert_eq!(ClaimThreshold::Fixed(7).resolve(1_000), 7);
    }

    proptest::proptest! {
        /// Any text or integer: a value or an error naming the key, never a panic;
        /// every decimal amount reads back as itself.
        #[test]
        fn claim_threshold_parses_any_input(n in proptest::num::u64::ANY, t in "\\PC{0,40}") {
            proptest::prop_assert_eq!(threshold(&format!("\"{n}\"")), Ok(ClaimThreshold::Fixed(u128::from(n))));
            let quoted = toml::Value::String(t).to_string();
            if let Err(e) = threshold(&quoted) {
                proptest::prop_assert!(e.contains("claim_threshold"), "{}", e);
            }
        }
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = AgentConfig::from_toml(GOOD).unwrap();
        assert_eq!(c.timings.first_window, Duration::from_secs(5));
        assert_eq!(c.timings.poll, Duration::from_millis(500));
        assert_eq!(c.timings.grace, Duration::from_secs(10));
        assert_eq!(c.exits[0].price_per_ip_second, Price(1_000_000_000_000));
        assert_eq!(c.exits[0].capacity, 2);
        assert_eq!(c.exits[0].protocols, vec![Protocol::Http, Protocol::Https]);
        assert!(
            !format!("{c:?}").contains("59c6995e"),
            "key masked in Debug"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("capacity = 2", "capacity = 0", "exit[0].capacity"),
            ("capacity = 2", "capacity = -1", "exit[0].capacity"),
            ("capacity = 2", "colour = 1", "colour"),
            (
                "price_per_ip_second = \"1000000000000\"",
                "price_per_ip_second = \"-5\"",
                "exit[0].price_per_ip_second",
            ),
            (
                "price_per_ip_second = \"1000000000000\"",
                "price_per_ip_second = \"340282366920938463463374607431768211456\"",
                "exit[0].price_per_ip_second",
            ),
            (
                "price_per_ip_second = \"1000000000000\"",
                "price_per_ip_second = 0",
                "exit[0].price_per_ip_second",
            ),
            ("country = \"de\"", "country = \"xx\"", "exit[0].country"),
            (
                "type = \"residential\"",
                "type = \"castle\"",
                "exit[0].type",
            ),
            (
                "first_window = \"5s\"",
                "first_window = \"soon\"",
                "timings.first_window",
            ),
            (
                "first_window = \"5s\"",
                "first_window = \"0s\"",
                "timings.first_window",
            ),
            (
                "first_window = \"5s\"",
                "first_window = \"2h\"",
                "timings.first_window",
            ),
            (
                "first_window = \"5s\"",
                "window = \"30s\"",
                "timings.window",
            ),
            ("poll = \"500ms\"", "poll = \"1ms\"", "timings.poll"),
            (
                "listen = \"127.0.0.2:0\"",
                "listen = \"nowhere\"",
                "exit[0].listen",
            ),
            (
                "url = \"http://127.0.0.1:8700\"",
                "url = \"ftp://x\"",
                "exchange.url",
            ),
            (
                "rpc_url = \"http://127.0.0.1:8545\"",
                "rpc_url = \"ws://x\"",
                "chain.rpc_url",
            ),
            (
                "private_key = \"0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d\"",
                "",
                "wallet.keystore",
            ),
            (
                "[wallet]",
                "[wallet]\nkeystore = \"k.json\"",
                "wallet.private_key",
            ),
            (
                "capacity = 2",
                "min_duration = \"1s\"",
                "exit[0].min_duration",
            ),
            (
                "capacity = 2",
                "max_duration = \"60d\"",
                "exit[0].max_duration",
            ),
            (
                "capacity = 2",
                "allow_destinations = [\"10.0.0.0/99\"]",
                "exit[0].allow_destinations",
            ),
            ("capacity = 2", "city = \"<script>\"", "exit[0].city"),
            ("capacity = 2", "asn = 0", "exit[0].asn"),
            ("capacity = 2", "protocols = []", "exit[0].protocols"),
            (
                "capacity = 2",
                "protocols = [\"gopher\"]",
                "exit[0].protocols",
            ),
            (
                "capacity = 2",
                "private_key = \"short\"",
                "exit[0].private_key",
            ),
            (
                "capacity = 2",
                "endpoint = \"0.0.0.0:51820\"",
                "exit[0].endpoint",
            ),
            ("[timings]", "[timings]\nfoo = \"1s\"", "timings"),
            ("[exchange]", "[exchangee]", "exchangee"),
            (
                "[timings]",
                "[limits]\nidle_timeout = \"0s\"\n[timings]",
                "limits.idle_timeout",
            ),
            (
                "[timings]",
                "[limits]\nmax_flows_total = 1\nmax_flows_per_peer = 2\n[timings]",
                "limits.max_flows_total",
            ),
            ("[timings]", "[limits]\nflows = 1\n[timings]", "limits"),
            (
                "[timings]",
                "[status]\nlisten = \"0.0.0.0:9901\"\n[timings]",
                "status.token",
            ),
            (
                "[timings]",
                "[status]\ntoken = \"short\"\n[timings]",
                "status.token",
            ),
            (
                "[timings]",
                "[status]\nlisten = \"here\"\n[timings]",
                "status.listen",
            ),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "fixture lacks {from}");
            let text = GOOD.replacen(from, to, 1);
            let e = err(&text);
            assert!(e.contains(key), "{to:?}: expected key {key} in `{e}`");
        }
    }

    #[test]
    fn missing_sections_and_exits_are_named() {
        let no_exit: String = GOOD.split("[[exit]]").next().unwrap().to_owned();
        assert!(err(&no_exit).contains("exit"));
        let twice = format!("{GOOD}{}", &GOOD[GOOD.find("[[exit]]").unwrap()..]);
        assert!(err(&twice).contains("exit[1].exit_address"));
        let no_chain = GOOD.replace(
            "[chain]\nrpc_url = \"http://127.0.0.1:8545\"\ndeployment = \"d.json\"\n",
            "",
        );
        assert!(err(&no_chain).contains("chain"));
    }

    #[test]
    fn hostile_input_is_refused_without_panic() {
        assert!(err("[[[").contains("line 1"));
        assert!(AgentConfig::from_toml(&"a".repeat(1 << 20)).is_err());
        assert!(AgentConfig::from_toml("\u{0}\u{ffff}").is_err());
        let deep = format!("x = {}{}", "[".repeat(300), "]".repeat(300));
        assert!(AgentConfig::from_toml(&deep).is_err());
        let huge = GOOD.replace("capacity = 2", "capacity = 99999999999999999999");
        assert!(AgentConfig::from_toml(&huge).is_err());
    }
}
