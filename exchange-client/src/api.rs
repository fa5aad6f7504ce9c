//! The API's own shapes: what commands return ([`Outcome`]), deals and their events as the
//! deal book and the event stream carry them, profiles, book snapshots, the signed-message
//! envelope, error bodies and the node's self-description (`GET /v1/info`).
//!
//! The exchange node builds these; clients (provider agent, market, third parties) read
//! them. The messages clients sign are in [`crate::types`].

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use alloy_primitives::{Address, U256};
use ipsx_rotation::{CountryCode, ExitKind};
use serde::{Deserialize, Serialize};

use crate::agreement::{Deadlines, DealStatus};
use crate::error::ExchangeError;
use crate::geo::GeoStatus;
use crate::types::{BalanceProof, DealPath, Offer, PartyStatus, Protocol, Request, WgKey, amount};

/// What an accepted command did, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Time passed.
    Ticked,
    /// The offer is in the book (deals made with resting requests are listed).
    OfferPosted {
        /// The offer's order id.
        order_id: u64,
        /// Deals made at once with resting requests.
        deals: Vec<u64>,
    },
    /// The request was accepted; part or all of it may have filled.
    RequestPosted {
        /// The request's order id.
        order_id: u64,
        /// IPs filled now.
        filled: u32,
        /// IPs left resting in the book.
        resting: u32,
        /// Deals made.
        deals: Vec<u64>,
        /// What the exchange now holds for this request and its deals.
        #[serde(with = "amount")]
        held: u128,
    },
    /// The open part of an order left the book.
    Cancelled {
        /// The order.
        order_id: u64,
        /// Funds released (requests; 0 for offers).
        #[serde(with = "amount")]
        released: u128,
        /// Capacity or IPs that were still open.
        open: u32,
    },
    /// A status report was recorded.
    Reported {
        /// The deal.
        deal_id: u64,
        /// The deal status after the report.
        status: DealStatus,
    },
    /// A balance proof was stored.
    ProofStored {
        /// The deal.
        deal_id: u64,
        /// The cumulative amount now claimable.
        #[serde(with = "amount")]
        amount: u128,
    },
    /// A rating was recorded.
    Rated {
        /// The deal.
        deal_id: u64,
        /// The rated wallet's new rating.
        rating: u16,
    },
    /// Preferences were stored.
    PrefsStored,
    /// An endpoint report was recorded on the deal.
    EndpointStored {
        /// The deal.
        deal_id: u64,
    },
    /// An extension proposal was recorded; `extended` when it matched the other
    /// party's, so the deal now ends at `new_end`.
    Extend {
        /// The deal.
        deal_id: u64,
        /// The proposed end, unix seconds.
        new_end: u64,
        /// Whether the deal was extended by this proposal.
        extended: bool,
    },
    /// The commission of new deals changed (the Centralizer's fee changed on chain).
    FeeChanged {
        /// The new commission, basis points.
        commission_bps: u16,
    },
}

/// The combined terms of a deal (offer data, request data, agreed price and times).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealTerms {
    /// Where the traffic exits.
    pub exit_address: IpAddr,
    /// Exit country.
    pub country: CountryCode,
    /// Exit region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Exit city.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Exit ASN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    /// Exit type.
    #[serde(rename = "type")]
    pub kind: ExitKind,
    /// Protocols the exit lets through.
    pub protocols: Vec<Protocol>,
    /// The provider's WireGuard endpoint.
    pub wg_endpoint: std::net::SocketAddr,
    /// The provider's WireGuard key.
    pub provider_wg_key: WgKey,
    /// The requester's WireGuard key.
    pub requester_wg_key: WgKey,
    /// Agreed price per IP-second (the offer's price).
    #[serde(with = "amount")]
    pub price_per_ip_second: u128,
    /// Rental duration, seconds.
    pub duration_s: u64,
    /// Start (matching time), unix seconds.
    pub start: u64,
    /// End, unix seconds.
    pub end: u64,
    /// Price x duration: what the requester pays at most.
    #[serde(with = "amount")]
    pub value: u128,
    /// The platform's commission out of the value.
    #[serde(with = "amount")]
    pub commission: u128,
}

/// Who did something to a deal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Actor {
    /// The provider.
    Provider,
    /// The requester.
    Requester,
    /// The exchange (matching, deadlines).
    Exchange,
}

/// One line of a deal's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Unix seconds.
    pub at: u64,
    /// Who.
    pub actor: Actor,
    /// What (`matched`, `reported active`, `status completed`, ...).
    pub what: Cow<'static, str>,
}

/// A deal in the deal book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    /// Deal id.
    pub id: u64,
    /// The offer matched.
    pub offer_id: u64,
    /// The request matched.
    pub request_id: u64,
    /// Provider wallet.
    pub provider: Address,
    /// Requester wallet.
    pub requester: Address,
    /// The combined terms.
    pub terms: Arc<DealTerms>,
    /// What the provider last reported.
    pub provider_status: PartyStatus,
    /// What the requester last reported.
    pub requester_status: PartyStatus,
    /// The agreement protocol's verdict.
    pub status: DealStatus,
    /// The deal's deadlines.
    pub deadlines: Deadlines,
    /// Everything that happened, in order.
    pub history: Vec<HistoryEntry>,
    /// Latest balance proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<BalanceProof>,
    /// Whether the provider has rated the requester.
    pub rated_by_provider: bool,
    /// Whether the requester has rated the provider.
    pub rated_by_requester: bool,
    /// The provider's pending proposal of a new end (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_new_end: Option<u64>,
    /// The requester's pending proposal of a new end; its added value is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_new_end: Option<u64>,
    /// The requester's WireGuard endpoint, as it last reported (NAT traversal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester_endpoint: Option<SocketAddr>,
    /// How the exit is reached, as the provider last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<DealPath>,
}

impl Deal {
    /// Which side of the deal `wallet` is, if any.
    pub fn actor_of(&self, wallet: &Address) -> Option<Actor> {
        if *wallet == self.provider {
            Some(Actor::Provider)
        } else if *wallet == self.requester {
            Some(Actor::Requester)
        } else {
            None
        }
    }
}

/// What kind of deal event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A new deal; carries its terms.
    Matched {
        /// The terms.
        terms: Arc<DealTerms>,
    },
    /// A side reported a status.
    Reported {
        /// Who.
        actor: Actor,
        /// The side's new status.
        party_status: PartyStatus,
        /// Their reason text.
        reason: String,
    },
    /// The deal status changed (reports or deadlines).
    StatusChanged,
    /// A balance proof was stored.
    Proof {
        /// Cumulative amount.
        #[serde(with = "amount")]
        amount: u128,
    },
    /// A side proposed a new end for the deal (it replaces that side's earlier one).
    ExtendProposed {
        /// Who.
        actor: Actor,
        /// The proposed end, unix seconds.
        new_end: u64,
    },
    /// A side reported its WireGuard endpoint (and path).
    Endpoint {
        /// Who.
        actor: Actor,
        /// The endpoint.
        endpoint: SocketAddr,
        /// How that side is reached.
        path: DealPath,
    },
    /// Both sides proposed the same end: the deal now runs to `terms.end`.
    Extended {
        /// The updated terms (end, duration, value, commission).
        terms: Arc<DealTerms>,
    },
}

/// One entry of the deal-event log; ids are global, increasing by one, and both parties
/// of the deal see the event on their stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealEvent {
    /// Event id (1, 2, 3, ...).
    pub id: u64,
    /// Unix seconds.
    pub at: u64,
    /// The deal.
    pub deal_id: u64,
    /// Provider wallet.
    pub provider: Address,
    /// Requester wallet.
    pub requester: Address,
    /// The deal status after the event.
    pub status: DealStatus,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A wallet's profile (whitepaper PROFILES: rating, preferences, history).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Rating in hundredths of a star, weighted by deal value (0 when unrated).
    pub rating: u16,
    /// Number of ratings received.
    pub ratings: u64,
    /// Sum of the values of rated deals (the weights).
    #[serde(with = "amount")]
    pub rated_value: u128,
    /// Sum of score x value, in 256 bits (it overflows 128 bits at the extremes).
    pub weighted_scores: U256,
    /// Deals that completed.
    pub completed: u64,
    /// Deals that were terminated or disputed.
    pub failed: u64,
    /// Deals that were cancelled.
    pub cancelled: u64,
    /// Lowest requester rating accepted when providing.
    pub min_counterparty_rating: u16,
}

/// Filters of a book query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookQuery {
    /// Only this country.
    #[serde(default)]
    pub country: Option<CountryCode>,
    /// Only this exit type.
    #[serde(default, rename = "type")]
    pub kind: Option<ExitKind>,
    /// Only at or below this price.
    #[serde(default)]
    pub max_price: Option<String>,
    /// Only this wallet's orders.
    #[serde(default)]
    pub wallet: Option<Address>,
    /// At most this many of each list (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A snapshot of part of the order book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookView {
    /// Offers, in matching order.
    pub offers: Vec<BookOfferView>,
    /// Resting requests, oldest first.
    pub requests: Vec<BookRequestView>,
}

/// An offer as the book shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookOfferView {
    /// Order id.
    pub order_id: u64,
    /// Capacity left.
    pub remaining: u32,
    /// Provider rating used for sorting.
    pub rating: u16,
    /// The offer.
    pub offer: Offer,
    /// Whether the node's GeoIP database confirms the offer's country (and ASN), filled
    /// by the API; `unverified` when the database does not know the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<GeoStatus>,
}

/// A resting request as the book shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookRequestView {
    /// Order id.
    pub order_id: u64,
    /// IPs still wanted.
    pub remaining: u32,
    /// The request.
    pub request: Request,
}

/// A signed message as the API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedMessage<T> {
    /// The message.
    pub payload: T,
    /// EIP-712 signature of `payload` by its author, 0x-hex `r || s || v`.
    pub signature: String,
}

/// A batch of signed offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferBatch {
    /// The offers, each signed on its own.
    pub orders: Vec<SignedMessage<Offer>>,
}

/// One item of a batch answer: the outcome or the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchItem {
    /// Accepted.
    Ok(Outcome),
    /// Refused.
    Error(ErrorBody),
}

/// The error body of every refused call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code (`invalid`, `bad_signature`, `replay`, ...).
    pub code: String,
    /// The field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Human-readable message naming the field.
    pub message: String,
}

impl From<&ExchangeError> for ErrorBody {
    fn from(e: &ExchangeError) -> Self {
        Self {
            code: e.code().to_owned(),
            field: e.field(),
            message: e.to_string(),
        }
    }
}

/// `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// What a node tells clients about itself at `GET /v1/info`: the EIP-712 domain every
/// signed message must use, and the limits it enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// EIP-155 chain id (`domain.chainId`).
    pub chain_id: u64,
    /// The Centralizer this node settles against (`domain.verifyingContract`).
    pub centralizer: Address,
    /// EIP-712 domain name of exchange messages.
    pub domain_name: String,
    /// EIP-712 domain version of exchange messages.
    pub domain_version: String,
    /// The flood limits in force.
    pub limits: LimitsConfig,
    /// Whether offers' exit countries are checked against a GeoIP database (and ASNs).
    pub geoip_country: bool,
    /// Whether an ASN database is loaded.
    pub geoip_asn: bool,
    /// Whether loopback/private addresses are accepted (dev flag).
    pub allow_private_addresses: bool,
    /// The commission new deals carry, basis points: on a chain, the Centralizer's
    /// `feeBps` as last read (absent from older nodes).
    #[serde(default)]
    pub commission_bps: u16,
}

/// A profile as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileView {
    /// The wallet.
    pub wallet: Address,
    /// The profile.
    #[serde(flatten)]
    pub profile: Profile,
    /// What the exchange holds against the wallet's open requests and deals.
    #[serde(with = "amount")]
    pub held: u128,
}

/// The `[limits]` table of the exchange config. Every cap and rate has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most open orders in the whole book (a memory bound when many wallets and
    /// addresses flood at once).
    pub max_open_orders: usize,
    /// Most open orders (offers plus resting requests) one wallet may have in the book.
    pub max_open_orders_per_wallet: usize,
    /// Most unexpired nonces one wallet may hold (every accepted message holds its
    /// nonce until its expiry).
    pub max_nonces_per_wallet: usize,
    /// Signed messages per second one wallet may send, sustained.
    pub wallet_rate_per_s: u32,
    /// Signed messages one wallet may send in a burst (a batch counts each offer).
    pub wallet_burst: u32,
    /// API calls per second from one client address (IPv4 address or IPv6 /64).
    pub client_rate_per_s: u32,
    /// API calls one client address may make in a burst (a batch counts each offer).
    pub client_burst: u32,
    /// Most open event streams of one wallet.
    pub max_subscribers_per_wallet: usize,
    /// Most open event streams in total.
    pub max_subscribers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_open_orders: 1_000_000,
            max_open_orders_per_wallet: 1000,
            max_nonces_per_wallet: 10_000,
            wallet_rate_per_s: 20,
            wallet_burst: 1000,
            client_rate_per_s: 50,
            client_burst: 2000,
            max_subscribers_per_wallet: 8,
            max_subscribers: 4096,
        }
    }
}

impl LimitsConfig {
    /// Limits high enough never to bind (benchmarks and tests of other things).
    pub fn unlimited() -> Self {
        Self {
            max_open_orders: usize::MAX,
            max_open_orders_per_wallet: usize::MAX,
            max_nonces_per_wallet: usize::MAX,
            wallet_rate_per_s: u32::MAX,
            wallet_burst: u32::MAX,
            client_rate_per_s: u32::MAX,
            client_burst: u32::MAX,
            max_subscribers_per_wallet: usize::MAX,
            max_subscribers: usize::MAX,
        }
    }

    /// Checks values serde cannot; the error names the key.
    pub fn check(&self) -> Result<(), ExchangeError> {
        let err = |key: &str| ExchangeError::Config {
            key: format!("limits.{key}"),
            reason: "must be positive".into(),
        };
        for (key, v) in [
            ("max_open_orders", self.max_open_orders),
            (
                "max_open_orders_per_wallet",
                self.max_open_orders_per_wallet,
            ),
            ("max_nonces_per_wallet", self.max_nonces_per_wallet),
            (
                "max_subscribers_per_wallet",
                self.max_subscribers_per_wallet,
            ),
            ("max_subscribers", self.max_subscribers),
        ] {
            if v == 0 {
                return Err(err(key));
            }
        }
        for (key, v) in [
            ("wallet_rate_per_s", self.wallet_rate_per_s),
            ("wallet_burst", self.wallet_burst),
            ("client_rate_per_s", self.client_rate_per_s),
            ("client_burst", self.client_burst),
        ] {
            if v == 0 {
                return Err(err(key));
            }
        }
        Ok(())
    }
}
