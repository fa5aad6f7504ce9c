//! Orders and the values inside them, as the API carries them (JSON) and as the engine
//! keeps them. Checks live here, so every entry point applies the same rules.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use alloy_primitives::{Address, B256};
use base64::Engine as _;
use ipsx_rotation::{CountryCode, ExitAttributes, ExitKind, parse_place};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ExchangeError;

/// Shortest rental the whitepaper allows (5 seconds).
pub const MIN_DURATION_S: u64 = 5;
/// Longest rental (30 days; the whitepaper says "a whole month").
pub const MAX_DURATION_S: u64 = 30 * 24 * 3600;
/// Most IPs one request may ask for.
pub const MAX_COUNT: u32 = 1000;
/// Most concurrent deals one offer may serve.
pub const MAX_CAPACITY: u32 = 100_000;
/// Most values in one any-of filter list.
pub const MAX_FILTER_VALUES: usize = 64;
/// Most providers one request may exclude.
pub const MAX_EXCLUDED_PROVIDERS: usize = 16;
/// Highest rating, in hundredths of a star (5.00 stars).
pub const MAX_RATING: u16 = 500;

/// Token amounts in base units, carried in JSON as decimal strings (they overflow the
/// 53-bit integers of JavaScript and many JSON parsers).
pub mod amount {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes the amount as a decimal string.
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// Reads a decimal string of digits only: no sign, no spaces, no exponent.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }

    /// Parses a decimal amount; the message says what is wrong.
    pub fn parse(s: &str) -> Result<u128, String> {
        if s.is_empty() {
            return Err("empty amount".into());
        }
        if s.starts_with('-') {
            return Err(format!("negative amount `{}`", shorten(s)));
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{}` is not a decimal amount of base units",
                shorten(s)
            ));
        }
        s.parse::<u128>()
            .map_err(|_| format!("amount `{}` overflows 128 bits", shorten(s)))
    }

    fn shorten(s: &str) -> &str {
        let mut end = s.len().min(48);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        &s[..end]
    }
}

/// ASNs in JSON: a number (`3320`) or a string (`"AS3320"`, `"3320"`), read with
/// [`ipsx_rotation::parse_asn`]; written as numbers.
pub mod asn {
    use serde::{Deserialize, Deserializer, de::Error as _};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }

    fn one<E: serde::de::Error>(raw: Raw) -> Result<u32, E> {
        let text = match raw {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        ipsx_rotation::parse_asn("asn", &text).map_err(E::custom)
    }

    /// Reads an optional ASN.
    pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<Raw>::deserialize(d)?.map(one).transpose()
    }

    /// Reads a list of ASNs.
    pub fn deserialize_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let raw = Vec::<Raw>::deserialize(d)?;
        if raw.len() > super::MAX_FILTER_VALUES {
            return Err(D::Error::custom(format!(
                "{} values, at most {}",
                raw.len(),
                super::MAX_FILTER_VALUES
            )));
        }
        raw.into_iter().map(one).collect()
    }
}

/// Application protocols an exit lets through (shared with the gateway and the
/// provider, so an offer means the same ports everywhere).
pub use ipsx_egress::Protocol;

/// How spread out the exits of one request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Diversity {
    /// Distinct exit addresses only (always required).
    #[default]
    None,
    /// No two exits in the same /24 (IPv4) or /48 (IPv6).
    DistinctSubnet,
    /// No two exits from the same provider.
    DistinctProvider,
}

impl Diversity {
    /// The name used in JSON and in signed payloads.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::DistinctSubnet => "distinct_subnet",
            Self::DistinctProvider => "distinct_provider",
        }
    }
}

/// The subnet key used by [`Diversity::DistinctSubnet`]: /24 for IPv4, /48 for IPv6.
pub fn subnet_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => (1u128 << 127) | (u128::from(v6) >> 80),
    }
}

/// A WireGuard public key (Curve25519, 32 bytes), base64 in JSON as `wg` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgKey(pub [u8; 32]);

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl WgKey {
    /// Parses a base64 key of exactly 32 bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() != 44 {
            return Err("expected 44 base64 characters (32 bytes)".into());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("bad base64: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "expected 32 bytes".to_owned())?;
        Ok(Self(arr))
    }
}

impl Serialize for WgKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An offer order (Offer Orders List): one exit address a provider lends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The provider's wallet; must be the signer.
    pub provider: Address,
    /// The address traffic leaves from.
    pub exit_address: IpAddr,
    /// Country of the exit address.
    pub country: CountryCode,
    /// Region or state, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// City, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Autonomous system number, if known (`3320` or `"AS3320"`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "asn::deserialize_opt"
    )]
    pub asn: Option<u32>,
    /// Residential, mobile or datacenter.
    #[serde(rename = "type")]
    pub kind: ExitKind,
    /// Protocols the exit lets through (non-empty).
    pub protocols: Vec<Protocol>,
    /// Price per IP-second in token base units.
    #[serde(with = "amount")]
    pub price_per_ip_second: u128,
    /// Shortest rental accepted, seconds.
    pub min_duration_s: u64,
    /// Longest rental accepted, seconds.
    pub max_duration_s: u64,
    /// How many deals may run on this exit at once.
    pub capacity: u32,
    /// Where the requester's WireGuard client connects.
    pub wg_endpoint: SocketAddr,
    /// The provider's WireGuard public key.
    pub wg_public_key: WgKey,
    /// The offer leaves the book at this time (unix seconds).
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// A request order (Request Orders List): some IPs matching filters, for a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The requester's wallet; must be the signer.
    pub requester: Address,
    /// How many IPs (distinct exits).
    pub count: u32,
    /// Any of these countries (empty: any country).
    #[serde(default)]
    pub countries: Vec<CountryCode>,
    /// Any of these regions.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Any of these cities.
    #[serde(default)]
    pub cities: Vec<String>,
    /// Any of these ASNs (`3320` or `"AS3320"`).
    #[serde(default, deserialize_with = "asn::deserialize_vec")]
    pub asns: Vec<u32>,
    /// Any of these exit types.
    #[serde(default)]
    pub types: Vec<ExitKind>,
    /// Every one of these protocols must be offered.
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    /// Lowest provider rating accepted, hundredths of a star (0: any, unrated included).
    #[serde(default)]
    pub min_rating: u16,
    /// How spread out the exits must be.
    #[serde(default)]
    pub diversity: Diversity,
    /// Never match an offer of these providers (at most 16), e.g. ones that failed the
    /// requester before.
    #[serde(default)]
    pub exclude_providers: Vec<Address>,
    /// Rental duration, seconds (5 s to 30 days).
    pub duration_s: u64,
    /// Highest price per IP-second accepted, base units.
    #[serde(with = "amount")]
    pub max_price_per_ip_second: u128,
    /// The requester's WireGuard public key, given to the provider.
    pub wg_public_key: WgKey,
    /// The unfilled part leaves the book at this time (unix seconds).
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// Cancels the open part of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// The order's owner; must be the signer.
    pub wallet: Address,
    /// The order (offer or request) to cancel.
    pub order_id: u64,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// What one side of a deal says about it (the input of the agreement protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartyStatus {
    /// Nothing reported yet.
    Pending,
    /// The side agrees to the deal (provider: peer configured; requester: will connect).
    Accepted,
    /// The tunnel is up and serving.
    Active,
    /// The side considers the deal done as agreed.
    Completed,
    /// Something broke (exit down, payment stopped, tunnel dead).
    Failed,
    /// The side declines the deal.
    Rejected,
}

impl PartyStatus {
    /// Every value, in table order.
    pub const ALL: [PartyStatus; 6] = [
        Self::Pending,
        Self::Accepted,
        Self::Active,
        Self::Completed,
        Self::Failed,
        Self::Rejected,
    ];

    /// The lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Accepted => "accepted",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }

    /// Parses a name (as carried in signed payloads).
    pub fn parse(s: &str) -> Result<Self, ExchangeError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ExchangeError::invalid("status", format!("unknown status `{s}`")))
    }

    /// Whether a side may move from `self` to `next`: forward along
    /// pending -> accepted -> active -> completed, failure from any non-final status,
    /// rejection only before the tunnel is up.
    pub fn can_move_to(self, next: PartyStatus) -> bool {
        use PartyStatus::*;
        match (self, next) {
            (Completed | Failed | Rejected, _) => false,
            (_, Pending) => false,
            (_, Failed) => true,
            (Pending | Accepted, Rejected) => true,
            (_, Rejected) => false,
            (a, b) => b > a,
        }
    }
}

/// A side's status report for a deal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// The reporting side; must be the signer and a party of the deal.
    pub wallet: Address,
    /// The deal.
    pub deal_id: u64,
    /// The new status of that side.
    pub status: PartyStatus,
    /// Free text (at most 256 bytes), e.g. why it failed.
    #[serde(default)]
    pub reason: String,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// How a deal's WireGuard traffic crosses NATs (docs/tunnel.md, "NAT traversal").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DealPath {
    /// The exit's own address is reachable.
    Direct,
    /// A cone NAT's mapping, opened by sending first (hole punching).
    Punched,
    /// Through a TURN relay.
    Relayed,
}

impl DealPath {
    /// Every value.
    pub const ALL: [DealPath; 3] = [Self::Direct, Self::Punched, Self::Relayed];

    /// The lowercase name (API, metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Punched => "punched",
            Self::Relayed => "relayed",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Result<Self, ExchangeError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ExchangeError::invalid("path", "not one of direct, punched, relayed"))
    }
}

/// A party's WireGuard endpoint for a deal, which the exchange records on the deal and
/// relays to the other party on its event stream (NAT traversal: an exit behind a NAT
/// sends the first handshake to the requester's endpoint). The provider's report also
/// records the deal's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointReport {
    /// The reporting side; must be the signer and a party of the deal.
    pub wallet: Address,
    /// The deal.
    pub deal_id: u64,
    /// Where the side's WireGuard socket is reached (its STUN mapping, relayed address
    /// or own address).
    pub endpoint: SocketAddr,
    /// How the side is reached.
    pub path: DealPath,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// A party's proposal to extend a running deal to `new_end` (same exit, same price).
/// The deal is extended when both parties proposed the same `new_end`; a party's later
/// proposal replaces its earlier one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    /// The proposing side; must be the signer and a party of the deal.
    pub wallet: Address,
    /// The deal.
    pub deal_id: u64,
    /// The new end, unix seconds: after the current end, at most 30 days after the start.
    pub new_end: u64,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// A requester's off-chain balance proof for a deal's payment channel: the Centralizer's
/// `BalanceProof(bytes32 channelId,uint256 cumulativeAmount)`, signed by the requester
/// under the Centralizer's EIP-712 domain. Stored so the provider can always fetch the
/// latest one and claim it on chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceProof {
    /// The deal paid for.
    pub deal_id: u64,
    /// The payment channel (the first proof binds it to the deal).
    pub channel_id: B256,
    /// Total owed over the channel's life, base units (only grows).
    #[serde(with = "amount")]
    pub cumulative_amount: u128,
    /// The requester's signature, 0x-hex `r || s || v` (65 bytes).
    pub signature: String,
}

/// A counterparty's rating after a deal ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rating {
    /// The rating side; must be the signer and a party of the deal.
    pub wallet: Address,
    /// The ended deal.
    pub deal_id: u64,
    /// 1 to 5 stars.
    pub score: u8,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

/// A wallet's matching preferences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    /// The wallet; must be the signer.
    pub wallet: Address,
    /// As a provider: refuse requesters rated below this (hundredths of a star; 0: any).
    #[serde(default)]
    pub min_counterparty_rating: u16,
    /// The message is refused after this time.
    pub expiry: u64,
    /// Unique per wallet among unexpired messages.
    pub nonce: u64,
}

fn check_expiry(expiry: u64, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
    if expiry <= now {
        return Err(ExchangeError::Expired { expiry, now });
    }
    if expiry - now > max_ttl {
        return Err(ExchangeError::invalid(
            "expiry",
            format!("more than {max_ttl} s ahead"),
        ));
    }
    Ok(())
}

fn check_duration(field: &str, d: u64) -> Result<(), ExchangeError> {
    if !(MIN_DURATION_S..=MAX_DURATION_S).contains(&d) {
        return Err(ExchangeError::invalid(
            field,
            format!("{d} s is outside {MIN_DURATION_S} s..{MAX_DURATION_S} s (5 s..30 days)"),
        ));
    }
    Ok(())
}

fn normalise_place(field: &str, v: &mut String) -> Result<(), ExchangeError> {
    *v = parse_place(field, v).map_err(|e| ExchangeError::invalid(field, e.to_string()))?;
    Ok(())
}

fn check_list_len<T>(field: &str, v: &[T]) -> Result<(), ExchangeError> {
    if v.len() > MAX_FILTER_VALUES {
        return Err(ExchangeError::invalid(
            field,
            format!("{} values, at most {MAX_FILTER_VALUES}", v.len()),
        ));
    }
    Ok(())
}

fn sort_dedup<T: Ord>(v: &mut Vec<T>) {
    v.sort_unstable();
    v.dedup();
}

impl Offer {
    /// Checks every field and normalises place names; errors name the field.
    pub fn check(&mut self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if let Some(r) = &mut self.region {
            normalise_place("region", r)?;
        }
        if let Some(c) = &mut self.city {
            normalise_place("city", c)?;
        }
        if let Some(a) = self.asn
            && (a == 0 || a == u32::MAX)
        {
            return Err(ExchangeError::invalid("asn", "must be in 1..=4294967294"));
        }
        if self.protocols.is_empty() {
            return Err(ExchangeError::invalid("protocols", "must not be empty"));
        }
        check_list_len("protocols", &self.protocols)?;
        sort_dedup(&mut self.protocols);
        if self.price_per_ip_second == 0 {
            return Err(ExchangeError::invalid(
                "price_per_ip_second",
                "must be positive",
            ));
        }
        check_duration("min_duration_s", self.min_duration_s)?;
        check_duration("max_duration_s", self.max_duration_s)?;
        if self.min_duration_s > self.max_duration_s {
            return Err(ExchangeError::invalid(
                "max_duration_s",
                "must not be below min_duration_s",
            ));
        }
        // The longest deal's value must fit, so no fill can overflow later.
        if self
            .price_per_ip_second
            .checked_mul(u128::from(self.max_duration_s))
            .is_none()
        {
            return Err(ExchangeError::invalid(
                "price_per_ip_second",
                "price x max_duration_s overflows 128 bits",
            ));
        }
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(ExchangeError::invalid(
                "capacity",
                format!("must be in 1..={MAX_CAPACITY}"),
            ));
        }
        if self.exit_address.is_unspecified() || self.exit_address.is_multicast() {
            return Err(ExchangeError::invalid(
                "exit_address",
                "unspecified or multicast",
            ));
        }
        if self.wg_endpoint.port() == 0 || self.wg_endpoint.ip().is_unspecified() {
            return Err(ExchangeError::invalid(
                "wg_endpoint",
                "needs a routable address and a port",
            ));
        }
        Ok(())
    }

    /// The exit's attributes in the shared targeting type.
    pub fn attributes(&self) -> ExitAttributes {
        ExitAttributes {
            country: Some(self.country),
            region: self.region.clone(),
            city: self.city.clone(),
            asn: self.asn,
            kind: Some(self.kind),
        }
    }

    /// Whether the exit lets every protocol of `wanted` through.
    pub fn supports(&self, wanted: &[Protocol]) -> bool {
        self.protocols.contains(&Protocol::Any) || wanted.iter().all(|p| self.protocols.contains(p))
    }
}

impl Request {
    /// Checks every field and normalises filter values; errors name the field.
    pub fn check(&mut self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if self.count == 0 || self.count > MAX_COUNT {
            return Err(ExchangeError::invalid(
                "count",
                format!("must be in 1..={MAX_COUNT}"),
            ));
        }
        check_list_len("countries", &self.countries)?;
        check_list_len("regions", &self.regions)?;
        check_list_len("cities", &self.cities)?;
        check_list_len("asns", &self.asns)?;
        check_list_len("types", &self.types)?;
        check_list_len("protocols", &self.protocols)?;
        for r in &mut self.regions {
            normalise_place("regions", r)?;
        }
        for c in &mut self.cities {
            normalise_place("cities", c)?;
        }
        if self.asns.iter().any(|a| *a == 0 || *a == u32::MAX) {
            return Err(ExchangeError::invalid("asns", "must be in 1..=4294967294"));
        }
        sort_dedup(&mut self.countries);
        sort_dedup(&mut self.regions);
        sort_dedup(&mut self.cities);
        sort_dedup(&mut self.asns);
        self.types.sort_unstable_by_key(|k| k.as_str());
        self.types.dedup();
        sort_dedup(&mut self.protocols);
        if self.exclude_providers.len() > MAX_EXCLUDED_PROVIDERS {
            return Err(ExchangeError::invalid(
                "exclude_providers",
                format!(
                    "{} providers, at most {MAX_EXCLUDED_PROVIDERS}",
                    self.exclude_providers.len()
                ),
            ));
        }
        sort_dedup(&mut self.exclude_providers);
        if self.min_rating > MAX_RATING {
            return Err(ExchangeError::invalid(
                "min_rating",
                format!("at most {MAX_RATING} (5.00 stars)"),
            ));
        }
        check_duration("duration_s", self.duration_s)?;
        if self.max_price_per_ip_second == 0 {
            return Err(ExchangeError::invalid(
                "max_price_per_ip_second",
                "must be positive",
            ));
        }
        self.max_cost()?;
        Ok(())
    }

    /// Cost of one IP at the maximum price for the whole duration.
    pub fn max_cost_per_ip(&self) -> Result<u128, ExchangeError> {
        self.max_price_per_ip_second
            .checked_mul(u128::from(self.duration_s))
            .ok_or_else(|| {
                ExchangeError::invalid(
                    "max_price_per_ip_second",
                    "price x duration_s overflows 128 bits",
                )
            })
    }

    /// Cost of the whole request at the maximum price.
    pub fn max_cost(&self) -> Result<u128, ExchangeError> {
        self.max_cost_per_ip()?
            .checked_mul(u128::from(self.count))
            .ok_or_else(|| {
                ExchangeError::invalid(
                    "max_price_per_ip_second",
                    "price x duration_s x count overflows 128 bits",
                )
            })
    }

    /// Whether the request excludes `provider`.
    pub fn excludes(&self, provider: &Address) -> bool {
        self.exclude_providers.contains(provider)
    }

    /// Whether `offer`'s provider, attributes, protocols and duration bounds satisfy
    /// this request's filters (not price, rating or diversity).
    pub fn accepts_attributes(&self, offer: &Offer) -> bool {
        !self.excludes(&offer.provider)
            && (self.countries.is_empty() || self.countries.contains(&offer.country))
            && (self.regions.is_empty()
                || offer
                    .region
                    .as_ref()
                    .is_some_and(|r| self.regions.contains(r)))
            && (self.cities.is_empty()
                || offer.city.as_ref().is_some_and(|c| self.cities.contains(c)))
            && (self.asns.is_empty() || offer.asn.is_some_and(|a| self.asns.contains(&a)))
            && (self.types.is_empty() || self.types.contains(&offer.kind))
            && offer.supports(&self.protocols)
            && (offer.min_duration_s..=offer.max_duration_s).contains(&self.duration_s)
    }
}

impl EndpointReport {
    /// Checks the message fields.
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        let ip = self.endpoint.ip();
        if self.endpoint.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
            return Err(ExchangeError::invalid(
                "endpoint",
                "needs a unicast address and a port",
            ));
        }
        Ok(())
    }
}

impl StatusReport {
    /// Checks the message fields.
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if self.status == PartyStatus::Pending {
            return Err(ExchangeError::invalid(
                "status",
                "pending cannot be reported",
            ));
        }
        if self.reason.len() > 256 {
            return Err(ExchangeError::invalid("reason", "longer than 256 bytes"));
        }
        Ok(())
    }
}

impl Extend {
    /// Checks the message fields (the deal-dependent rules are the engine's).
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if self.new_end <= now {
            return Err(ExchangeError::invalid(
                "new_end",
                format!("{} is not in the future (now {now})", self.new_end),
            ));
        }
        Ok(())
    }
}

impl Cancel {
    /// Checks the message fields.
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)
    }
}

impl BalanceProof {
    /// The EIP-712 digest the requester signs: the Centralizer's `BalanceProof` under
    /// `domain`, computed by the one implementation in `ipsx_chain::proof`.
    pub fn digest(&self, domain: &ipsx_chain::ChannelDomain) -> B256 {
        ipsx_chain::BalanceProof {
            channel_id: self.channel_id,
            cumulative_amount: alloy_primitives::U256::from(self.cumulative_amount),
        }
        .digest(domain)
    }

    /// Checks the message fields.
    pub fn check(&self) -> Result<(), ExchangeError> {
        if self.cumulative_amount == 0 {
            return Err(ExchangeError::invalid(
                "cumulative_amount",
                "must be positive",
            ));
        }
        if self.signature.len() > 140 {
            return Err(ExchangeError::invalid("signature", "too long"));
        }
        Ok(())
    }
}

impl Rating {
    /// Checks the message fields.
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if !(1..=5).contains(&self.score) {
            return Err(ExchangeError::invalid("score", "must be 1 to 5"));
        }
        Ok(())
    }
}

impl Preferences {
    /// Checks the message fields.
    pub fn check(&self, now: u64, max_ttl: u64) -> Result<(), ExchangeError> {
        check_expiry(self.expiry, now, max_ttl)?;
        if self.min_counterparty_rating > MAX_RATING {
            return Err(ExchangeError::invalid(
                "min_counterparty_rating",
                format!("at most {MAX_RATING}"),
            ));
        }
        Ok(())
    }
}

/// Highest commission the exchange accepts, basis points (the whole value).
pub const MAX_COMMISSION_BPS: u16 = 10_000;

/// The platform's commission on `value` at `bps` basis points, rounded down, exact for
/// every `u128` value (no intermediate overflow).
pub fn commission(value: u128, bps: u16) -> u128 {
    let bps = u128::from(bps.min(10_000));
    (value / 10_000) * bps + (value % 10_000) * bps / 10_000
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn amounts_parse_digits_only() {
        assert_eq!(amount::parse("0"), Ok(0));
        assert_eq!(amount::parse(&u128::MAX.to_string()), Ok(u128::MAX));
        for bad in ["", "-1", "+1", " 1", "1e3", "0x10", "1.5", "١"] {
            assert!(amount::parse(bad).is_err(), "{bad}");
        }
        assert!(
            amount::parse("340282366920938463463374607431768211456")
                .unwrap_err()
                .contains("overflows")
        );
    }

    #[test]
    fn commission_is_exact_at_the_extremes() {
        assert_eq!(commission(0, 250), 0);
        assert_eq!(commission(9_999, 1), 0);
        assert_eq!(commission(10_000, 1), 1);
        assert_eq!(commission(u128::MAX, 10_000), u128::MAX);
        assert_eq!(commission(u128::MAX, 0), 0);
        assert_eq!(
            commission(u128::MAX, 65_535),
            u128::MAX,
            "bps capped at 100%"
        );
        // floor(u128::MAX * 250 / 10000) computed with wider arithmetic by hand:
        // u128::MAX = 10000*q + r.
        let q = u128::MAX / 10_000;
        let r = u128::MAX % 10_000;
        assert_eq!(commission(u128::MAX, 250), q * 250 + r * 250 / 10_000);
    }

    #[test]
    fn asns_read_numbers_and_as_strings() {
        #[derive(Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "asn::deserialize_opt")]
            a: Option<u32>,
            #[serde(default, deserialize_with = "asn::deserialize_vec")]
            v: Vec<u32>,
        }
        let t: T = serde_json::from_str(r#"{"a": "AS3320", "v": [1, "as2", "3"]}"#).unwrap();
        assert_eq!((t.a, t.v), (Some(3320), vec![1, 2, 3]));
        for bad in [
            r#"{"a": 0}"#,
            r#"{"a": "ASx"}"#,
            r#"{"a": 4294967295}"#,
            r#"{"a": -1}"#,
            r#"{"v": [true]}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
        let many = format!(r#"{{"v": [{}]}}"#, vec!["1"; 65].join(","));
        assert!(serde_json::from_str::<T>(&many).is_err());
    }

    #[test]
    fn wg_keys_are_32_bytes_of_base64() {
        let k = WgKey([7; 32]);
        assert_eq!(WgKey::parse(&k.to_string()), Ok(k));
        assert!(WgKey::parse("").is_err());
        assert!(WgKey::parse(&format!("{}=", "A".repeat(43))).is_ok());
        assert!(WgKey::parse(&"A".repeat(44)).is_err(), "33 bytes");
        assert!(WgKey::parse(&"!".repeat(44)).is_err());
        assert!(WgKey::parse(&"A".repeat(4000)).is_err());
    }

    #[test]
    fn party_status_moves_forward_only() {
        use PartyStatus::*;
        assert!(Pending.can_move_to(Accepted));
        assert!(Accepted.can_move_to(Active));
        assert!(Active.can_move_to(Completed));
        assert!(Active.can_move_to(Failed));
        assert!(!Active.can_move_to(Rejected));
        assert!(!Active.can_move_to(Accepted));
        assert!(!Completed.can_move_to(Failed));
        assert!(!Accepted.can_move_to(Pending));
        assert!(Pending.can_move_to(Rejected));
    }

    #[test]
    fn subnets_group_by_24_and_48() {
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        let b: IpAddr = "10.1.2.200".parse().unwrap();
        let c: IpAddr = "10.1.3.3".parse().unwrap();
        assert_eq!(subnet_of(a), subnet_of(b));
        assert_ne!(subnet_of(a), subnet_of(c));
        let d: IpAddr = "2001:db8:1::1".parse().unwrap();
        let e: IpAddr = "2001:db8:1:ff::1".parse().unwrap();
        assert_eq!(subnet_of(d), subnet_of(e));
    }
}
