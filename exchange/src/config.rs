//! The exchange node's configuration file (TOML), checked into an [`ExchangeConfig`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alloy_primitives::Address;
use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use crate::error::ExchangeError;
use crate::limits::LimitsConfig;

/// Everything `ipsx exchange --config FILE` reads.
///
/// ```toml
/// chain_id = 31337
/// database = "sqlite:///var/lib/ipsx/exchange.db"   # or "postgres://user@host:5432/db"
/// rpc_url = "http://127.0.0.1:8545"
/// centralizer = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
///
/// [engine]
/// accept_window_s = 30
/// settle_window_s = 300
/// max_ttl_s = 2678400
/// # commission_bps: only without a chain (static_balances); with rpc_url the
/// # commission is the Centralizer's feeBps and this key is refused.
///
/// # GeoIP databases (scripts/install-geo.sh); offers are checked against them.
/// geoip_country = "geo/geolite2-country.mmdb"
/// geoip_asn = "geo/asn.mmdb"
/// # allow_private_addresses = true   # dev/test only: 127.0.0.x, 10/8, ... endpoints
///
/// [limits]
/// max_open_orders_per_wallet = 1000
/// client_rate_per_s = 50
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    /// EIP-155 chain id: part of every signature's domain.
    pub chain_id: u64,
    /// Journal location: `sqlite://PATH` (created if missing) or `postgres://...`.
    #[serde(default = "default_database")]
    pub database: String,
    /// JSON-RPC URL of the chain holding the Centralizer (plain HTTP).
    #[serde(default)]
    pub rpc_url: Option<String>,
    /// Address of the Centralizer contract (balances; balance-proof domain).
    #[serde(default)]
    pub centralizer: Address,
    /// Local development and tests only: fixed balances instead of a chain
    /// (wallet -> base units, decimal string). Exactly one of this and `rpc_url`.
    #[serde(default)]
    pub static_balances: Option<BTreeMap<Address, String>>,
    /// Matching, deadlines and commission.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Serve HTTPS with these PEM files instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest request body accepted, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Most offers in one batch.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Flood protection: caps and rate limits per wallet and client address.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Country database (MaxMind format) offers' exit addresses are checked against.
    #[serde(default)]
    pub geoip_country: Option<PathBuf>,
    /// ASN database (MaxMind format) checked where an offer names its ASN.
    #[serde(default)]
    pub geoip_asn: Option<PathBuf>,
    /// Dev and tests only: accept offers whose exit address or WireGuard endpoint is
    /// loopback, private, link-local, a documentation range, ... (refused otherwise).
    #[serde(default)]
    pub allow_private_addresses: bool,
}

/// TLS certificate chain and key, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

fn default_database() -> String {
    "sqlite://ipsx-exchange.db".into()
}
fn default_max_body() -> usize {
    1 << 20
}
fn default_max_batch() -> usize {
    1000
}

impl ExchangeConfig {
    /// A config for tests: in-memory balances, the given database URL, default limits,
    /// no GeoIP database, and loopback/private addresses allowed (tests use 127.0.0.x).
    pub fn for_tests(database: impl Into<String>, balances: BTreeMap<Address, String>) -> Self {
        Self {
            chain_id: 31337,
            database: database.into(),
            rpc_url: None,
            centralizer: Address::ZERO,
            static_balances: Some(balances),
            engine: EngineConfig::default(),
            tls: None,
            max_body_bytes: default_max_body(),
            max_batch: default_max_batch(),
            limits: LimitsConfig::default(),
            geoip_country: None,
            geoip_asn: None,
            allow_private_addresses: true,
        }
    }

    /// Parses and checks a TOML document; errors name the key (and line for syntax).
    ///
    /// With `rpc_url` the commission is the Centralizer's `feeBps`, read from the chain,
    /// so `engine.commission_bps` is refused (naming the key) rather than allowed to
    /// disagree with it; it only sets the commission of a node without a chain
    /// (`static_balances`).
    pub fn from_toml(text: &str) -> Result<Self, ExchangeError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ExchangeError::Config {
            key: e
                .span()
                .map(|s| {
                    let before = text.as_bytes().get(..s.start).unwrap_or(text.as_bytes());
                    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "document".into()),
            reason: e.message().to_owned(),
        })?;
        cfg.check()?;
        let names_commission = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|t| t.get("engine")?.get("commission_bps").cloned())
            .is_some();
        if cfg.rpc_url.is_some() && names_commission {
            return Err(ExchangeError::Config {
                key: "engine.commission_bps".into(),
                reason: "the commission is the Centralizer's feeBps, read from the chain \
                         (change it on chain with setFee); remove this key"
                    .into(),
            });
        }
        Ok(cfg)
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Self, ExchangeError> {
        let text = std::fs::read_to_string(path).map_err(|e| ExchangeError::Config {
            key: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// Checks values serde cannot.
    pub fn check(&self) -> Result<(), ExchangeError> {
        let err = |key: &str, reason: &str| ExchangeError::Config {
            key: key.into(),
            reason: reason.into(),
        };
        if !(self.database.starts_with("sqlite:")
            || self.database.starts_with("postgres://")
            || self.database.starts_with("postgresql://"))
        {
            return Err(err("database", "expected sqlite://PATH or postgres://..."));
        }
        match (&self.rpc_url, &self.static_balances) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "static_balances",
                    "set either rpc_url or static_balances",
                ));
            }
            (None, None) => return Err(err("rpc_url", "required (or static_balances for tests)")),
            (Some(url), None) if !url.starts_with("http://") && !url.starts_with("https://") => {
                return Err(err("rpc_url", "expected an http:// URL"));
            }
            _ => {}
        }
        if let Some(b) = &self.static_balances {
            for v in b.values() {
                crate::types::amount::parse(v).map_err(|e| err("static_balances", &e))?;
            }
        }
        if self.engine.commission_bps > 10_000 {
            return Err(err("engine.commission_bps", "at most 10000"));
        }
        if self.engine.max_ttl_s == 0 {
            return Err(err("engine.max_ttl_s", "must be positive"));
        }
        self.limits.check()?;
        if self.max_batch == 0 || self.max_body_bytes < 1024 {
            return Err(err(
                "max_batch",
                "max_batch >= 1 and max_body_bytes >= 1024",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
chain_id = 31337
database = "sqlite:///tmp/x.db"
rpc_url = "http://127.0.0.1:8545"
centralizer = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
geoip_country = "geo/geolite2-country.mmdb"
geoip_asn = "geo/asn.mmdb"
[engine]
accept_window_s = 30
settle_window_s = 300
max_ttl_s = 2678400
[limits]
max_open_orders_per_wallet = 1000
client_rate_per_s = 50
"#;
        let c = ExchangeConfig::from_toml(text).unwrap();
        assert_eq!(c.engine.settle_window_s, 300);
        assert_eq!(c.limits.client_rate_per_s, 50);
        assert!(!c.allow_private_addresses, "refused by default");
    }

    #[test]
    fn bad_configs_name_the_key() {
        for (text, key) in [
            ("chain_id = 1\nrpc_url = \"http://x\"\nbogus = 1", "line 3"),
            ("chain_id = 1", "rpc_url"),
            ("chain_id = 1\nrpc_url = \"ftp://x\"", "rpc_url"),
            (
                "chain_id = 1\nrpc_url = \"http://x\"\ndatabase = \"mysql://\"",
                "database",
            ),
            (
                "chain_id = 1\nstatic_balances = { \"0x0000000000000000000000000000000000000001\" = \"-5\" }",
                "static_balances",
            ),
            (
                "chain_id = 1\nstatic_balances = {}\n[engine]\ncommission_bps = 10001",
                "engine.commission_bps",
            ),
            // On a chain the commission is the contract's fee: the key is refused,
            // whatever its value.
            (
                "chain_id = 1\nrpc_url = \"http://x\"\n[engine]\ncommission_bps = 250",
                "engine.commission_bps",
            ),
            (
                "chain_id = 1\nrpc_url = \"http://x\"\n[limits]\nclient_burst = 0",
                "limits.client_burst",
            ),
            (
                "chain_id = 1\nrpc_url = \"http://x\"\n[limits]\nbogus = 0",
                "line 4",
            ),
        ] {
            let e = ExchangeConfig::from_toml(text).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }
}
