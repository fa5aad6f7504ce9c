//! `[market]` in the gateway config: renting exits on the exchange.
//!
//! ```toml
//! [market]
//! exchange_url = "http://127.0.0.1:8700"
//! rpc_url = "http://127.0.0.1:8545"
//! deployment = "deployment.json"
//! private_key = "0x..."          # demo only; use a keystore for real money
//!
//! [[market.demand]]
//! name = "de-residential"
//! target = { country = "de", type = "residential" }
//! count = 5
//! ```

use std::time::Duration;

use ipsx_rotation::{CountryCode, ExitKind};
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

/// An amount of token base units (18 decimals): a TOML integer, or a string of digits
/// for amounts beyond 2^63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(pub u128);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(Amount(n as u128)),
            Raw::Int(_) => Err(serde::de::Error::custom("an amount cannot be negative")),
            Raw::Text(t) => {
                let t = t.trim();
                if t.is_empty() || t.len() > 39 || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(serde::de::Error::custom(format!(
                        "bad amount `{t}` (token base units, digits only)"
                    )));
                }
                t.parse()
                    .map(Amount)
                    .map_err(|_| serde::de::Error::custom(format!("amount `{t}` is too large")))
            }
        }
    }
}

/// What a demand group rents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandTarget {
    /// Country.
    pub country: Option<CountryCode>,
    /// Exit type.
    #[serde(rename = "type")]
    pub kind: Option<ExitKind>,
    /// Region (state, province).
    pub region: Option<String>,
    /// City.
    pub city: Option<String>,
    /// ASN.
    pub asn: Option<u32>,
}

/// `[[market.demand]]`: keep `count` exits matching `target` rented.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandConfig {
    /// A name for logs and the admin API.
    pub name: String,
    /// What to rent.
    #[serde(default)]
    pub target: DemandTarget,
    /// How many exits to keep.
    pub count: u32,
}

/// `[market]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketConfig {
    /// The exchange node's base URL.
    pub exchange_url: String,
    /// The Ethereum JSON-RPC URL.
    pub rpc_url: String,
    /// The deployment file written by `ipsx chain deploy` (relative to the config file).
    pub deployment: String,
    /// The wallet key, hex. For demos and tests: real wallets belong in a keystore.
    pub private_key: Secret,
    /// The gateway's WireGuard private key (base64); generated at start when absent.
    #[serde(default)]
    pub wg_private_key: Option<Secret>,
    /// Exit groups to keep rented.
    #[serde(default)]
    pub demand: Vec<DemandConfig>,
    /// Length of each rental.
    #[serde(default = "default_deal", with = "humantime_serde")]
    pub deal_duration: Duration,
    /// Highest price accepted, per IP and second (base units).
    pub max_price_per_ip_second: Amount,
    /// Most spent (deal values committed) in any hour; none: no cap.
    #[serde(default)]
    pub max_spend_per_hour: Option<Amount>,
    /// Most spent in total; none: no cap.
    #[serde(default)]
    pub max_spend_total: Option<Amount>,
    /// Paid ahead of use.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub payment_window: Duration,
    /// How often a new balance proof is signed.
    #[serde(default = "default_proof_interval", with = "humantime_serde")]
    pub proof_interval: Duration,
    /// A new deal is made this long before one ends while demand remains.
    #[serde(default = "default_renew", with = "humantime_serde")]
    pub renew_ahead: Duration,
    /// Rent when a request's targeting matches no live exit.
    #[serde(default = "default_true")]
    pub rent_on_demand: bool,
    /// How long such a request waits for the new exit (then 503).
    #[serde(default = "default_rent_wait", with = "humantime_serde")]
    pub rent_wait: Duration,
    /// An exit rented on demand and unused this long is let go.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_release: Duration,
    /// An exit whose tunnel stays unhealthy this long is replaced.
    #[serde(default = "default_dead", with = "humantime_serde")]
    pub dead_after: Duration,
    /// Paid ahead before a new provider has served anything (small: what a provider
    /// that never serves can keep).
    #[serde(default = "default_first_window", with = "humantime_serde")]
    pub first_window: Duration,
    /// At most this many on-demand demand groups at once (distinct targeting filters);
    /// a request for another gets a 503 naming this key.
    #[serde(default = "default_max_groups")]
    pub max_on_demand_groups: usize,
    /// Offers from providers rated below this (0 to 5 stars) are not matched.
    #[serde(default, deserialize_with = "stars")]
    pub min_provider_rating: u16,
    /// A paid deal whose provider has not started serving by then is failed.
    #[serde(default = "default_serve_timeout", with = "humantime_serde")]
    pub serve_timeout: Duration,
    /// A provider that failed us is left out of our requests this long.
    #[serde(default = "default_avoid", with = "humantime_serde")]
    pub avoid_for: Duration,
    /// After a deal ends, the provider's time to close the channel with its final
    /// claim before the gateway closes it on chain (`startClose`, then `settle`).
    #[serde(default = "default_close_grace", with = "humantime_serde")]
    pub close_grace: Duration,
    /// A payment channel no deal has used this long is closed; until then the next deal
    /// with the same provider reuses it without a chain transaction.
    #[serde(default = "default_channel_idle_close", with = "humantime_serde")]
    pub channel_idle_close: Duration,
    /// A top-up of a reused channel adds this many deals' value beyond what the deal
    /// needs, or what the channel has carried so far when that is more (a top-up at
    /// least doubles the channel's use, so N deals cost about log2(N / prefund)
    /// top-ups), so that the next deals need none. 0: exactly what a deal needs.
    #[serde(default = "default_channel_prefund")]
    pub channel_prefund: u32,
    /// At shutdown, close the idle channels too (`startClose`; the providers claim and
    /// close them when they see it) instead of keeping them for the next start.
    #[serde(default)]
    pub close_channels_at_shutdown: bool,
    /// The local store of deals and channels (SQLite), relative to the config file.
    #[serde(default = "default_state_file")]
    pub state_file: String,
    /// A serving rented exit's address is verified again this often (with `verify_url`)
    /// and checked against the GeoIP databases.
    #[serde(default = "default_reverify", with = "humantime_serde")]
    pub reverify_every: Duration,
    /// Country database (MaxMind format, relative to the config file) a rented exit's
    /// address is checked against; a contradiction ends the deal as `misplaced`.
    #[serde(default)]
    pub geoip_country: Option<String>,
    /// ASN database (MaxMind format, relative to the config file), checked where the
    /// deal names an ASN.
    #[serde(default)]
    pub geoip_asn: Option<String>,
    /// NAT traversal of the rented tunnels (`[market.nat]`: `stun`, `turn`,
    /// `turn_username`, `turn_password`, `relay`, `timeout_s`): each tunnel learns its
    /// public mapping and reports it to the exchange, so an exit behind a NAT can send
    /// first.
    #[serde(default)]
    pub nat: ipsx_tunnel_pool::nat::NatSection,
}

impl MarketConfig {
    /// Checks the values serde cannot: `Err((key, why))`.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.first_window.is_zero() || self.first_window > self.payment_window {
            return Err((
                "first_window",
                "must be more than 0s and at most market.payment_window",
            ));
        }
        if self.max_on_demand_groups == 0 || self.max_on_demand_groups > 10_000 {
            return Err(("max_on_demand_groups", "must be 1..=10000"));
        }
        if self.serve_timeout < Duration::from_secs(1) {
            return Err(("serve_timeout", "must be at least 1s"));
        }
        if self.reverify_every < Duration::from_secs(1) {
            return Err(("reverify_every", "must be at least 1s"));
        }
        if self.state_file.trim().is_empty() {
            return Err(("state_file", "must name a file"));
        }
        Ok(())
    }
}

/// A rating in stars (0 to 5, fractions allowed) as hundredths of a star.
fn stars<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Float(f64),
    }
    let v = match Raw::deserialize(d)? {
        Raw::Int(n) => n as f64,
        Raw::Float(f) => f,
    };
    if !(0.0..=5.0).contains(&v) {
        return Err(serde::de::Error::custom("a rating is 0 to 5 stars"));
    }
    Ok((v * 100.0).round() as u16)
}

fn default_first_window() -> Duration {
    Duration::from_secs(5)
}
fn default_max_groups() -> usize {
    16
}
fn default_serve_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_avoid() -> Duration {
    Duration::from_secs(600)
}
fn default_close_grace() -> Duration {
    Duration::from_secs(60)
}
fn default_channel_idle_close() -> Duration {
    Duration::from_secs(3600)
}
fn default_channel_prefund() -> u32 {
    8
}
fn default_reverify() -> Duration {
    Duration::from_secs(180)
}
fn default_state_file() -> String {
    "market-state.db".into()
}

fn default_deal() -> Duration {
    Duration::from_secs(600)
}
fn default_window() -> Duration {
    Duration::from_secs(30)
}
fn default_proof_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_renew() -> Duration {
    Duration::from_secs(60)
}
fn default_true() -> bool {
    true
}
fn default_rent_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_dead() -> Duration {
    Duration::from_secs(10)
}
