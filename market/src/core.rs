//! The requester side of the market as a sans-IO state machine.
//!
//! [`Core`] owns what the gateway knows about its rentals: demand groups, deals, their
//! payment channels, what was paid, the budget, providers to avoid. The runtime feeds it
//! [`Input`]s (exchange events, results of its own actions, health, usage, the clock as
//! unix milliseconds) and carries out the [`Action`]s it returns. The core reads no
//! clock, does no I/O and never blocks, so every rule here is tested in memory, and a
//! seeded simulation drives it through hours of virtual time (`tests/it/simulation.rs`).
//!
//! Money rules (`docs/market.md`):
//! - a deal is paid ahead only as service is observed: a small first window
//!   (`first_window`) before the provider serves, then `payment_window` ahead of the
//!   time served once the tunnel is up and its exit verified;
//! - a proof never exceeds the channel's deposit nor the deal's value;
//! - a deal that never served is failed, its provider avoided and rated down, and its
//!   channel closed on chain (`startClose`, then `settle` after the challenge period);
//! - every channel opened is eventually closed: by the provider's closing claim, or by
//!   us after `close_grace`;
//! - once shutdown began nothing is rented, extended or paid for beyond what was served.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use ipsx_exchange_client::api::DealTerms;
use ipsx_exchange_client::connlog::{self, CommitPart, LogExport};
use ipsx_exchange_client::market::{amount_due, cost};
use ipsx_exchange_client::types::PartyStatus;
use ipsx_rotation::{ExitAttributes, Filter};
use serde::{Deserialize, Serialize};

/// Unix time in milliseconds: the core's only clock.
pub type Millis = u64;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The longest lease the exchange accepts (30 days), seconds.
pub const MAX_LEASE_S: u64 = 30 * 24 * 3600;

/// The core's settings, from `[market]` (see `ipsx_config::MarketConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Length of each lease and of each extension.
    pub deal_duration: Duration,
    /// Highest price accepted per IP-second.
    pub max_price_per_ip_second: u128,
    /// Spend cap over any hour.
    pub max_spend_per_hour: Option<u128>,
    /// Spend cap in total.
    pub max_spend_total: Option<u128>,
    /// Paid ahead before the provider has served (small).
    pub first_window: Duration,
    /// Paid ahead once the exit is verified.
    pub payment_window: Duration,
    /// A new balance proof at most this often.
    pub proof_interval: Duration,
    /// Extend (or, failing that, replace) a lease this long before it ends.
    pub renew_ahead: Duration,
    /// On-demand groups unused this long are let go.
    pub idle_release: Duration,
    /// At most this many on-demand groups at once.
    pub max_on_demand_groups: usize,
    /// Offers from providers rated below this (hundredths of a star) are not matched.
    pub min_provider_rating: u16,
    /// A paid deal whose provider has not started serving by then is failed.
    pub serve_timeout: Duration,
    /// A provider that failed us is left out of our requests this long.
    pub avoid_for: Duration,
    /// After a deal ends, how long the provider has to close the channel with its
    /// final claim before we start an uncooperative close.
    pub close_grace: Duration,
    /// The Centralizer's challenge period (read from the chain).
    pub challenge_period: Duration,
    /// How long a posted request may rest in the book.
    pub request_ttl: Duration,
    /// A serving exit's address (and its country/ASN against the GeoIP database) is
    /// verified again this often.
    pub reverify_every: Duration,
    /// A channel left idle (no deal over it) this long is closed; until then the next
    /// deal with the same provider reuses it without a chain transaction.
    pub channel_idle_close: Duration,
    /// A top-up adds this many deals' value beyond what the deal needs (or, when
    /// more, what the channel has carried so far), so that the next deals over the
    /// channel need none. 0: top up by exactly what a deal needs.
    pub channel_prefund: u32,
    /// At shutdown ([`Input::EndAll`]) close the idle channels too.
    pub close_channels_at_shutdown: bool,
}

/// What a channel's top-up adds when a deal of `value` runs over it after its earlier
/// deals were signed `base`, with `deposit` on chain (`None`: no top-up).
///
/// Without prefunding (`prefund` 0), exactly what the deal is short of. With it, the
/// deposit is kept one deal ahead (so the next deal over the channel starts at once,
/// without a transaction), and a top-up adds what is short plus `prefund` deals'
/// value, or plus `base` (what the channel has carried so far) when that is more: the
/// pair's past use sizes its next, so N deals over one channel cost about
/// log2(N / prefund) top-ups while the unspent deposit (returned at the close) stays
/// within the channel's past use plus `prefund` deals.
pub fn top_up_amount(deposit: u128, base: u128, value: u128, prefund: u32) -> Option<u128> {
    let need = base.saturating_add(value);
    let short = need.saturating_sub(deposit);
    if prefund == 0 {
        return (short > 0).then_some(short);
    }
    let behind = need.saturating_add(value) > deposit;
    if short == 0 && !behind {
        return None;
    }
    let ahead = value.saturating_mul(u128::from(prefund)).max(base);
    Some(short.saturating_add(ahead))
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            deal_duration: Duration::from_secs(600),
            max_price_per_ip_second: u128::MAX,
            max_spend_per_hour: None,
            max_spend_total: None,
            first_window: Duration::from_secs(5),
            payment_window: Duration::from_secs(30),
            proof_interval: Duration::from_secs(5),
            renew_ahead: Duration::from_secs(60),
            idle_release: Duration::from_secs(300),
            max_on_demand_groups: 16,
            min_provider_rating: 0,
            serve_timeout: Duration::from_secs(30),
            avoid_for: Duration::from_secs(600),
            close_grace: Duration::from_secs(60),
            challenge_period: Duration::from_secs(3600),
            request_ttl: Duration::from_secs(30),
            reverify_every: Duration::from_secs(180),
            channel_idle_close: Duration::from_secs(3600),
            channel_prefund: 8,
            close_channels_at_shutdown: false,
        }
    }
}

/// Where one deal is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Matched; accepted, the channel is being opened.
    Opening,
    /// Channel open, first (small) window paid; waiting for the provider to serve.
    Paid,
    /// The provider serves; our tunnel is coming up and its exit being verified.
    Connecting,
    /// Tunnel up, exit verified and in rotation; paying as it goes.
    Serving,
    /// Over; see the deal's [`Outcome`].
    Ended,
}

/// How a deal ended: decides the report, the rating and whether to avoid the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The lease ran its course, or we let it go (idle, shutdown): served as agreed.
    Completed,
    /// The provider ended it (reported completed/failed, or the deal went final).
    ProviderEnded,
    /// Rejected at once (price over the cap, shutting down, no matching group).
    Rejected,
    /// We could not open the channel or post the first proof (our side's failure).
    PaymentFailed,
    /// The provider never started serving after being paid its first window.
    NeverServed,
    /// Our tunnel did not come up, or the exit did not leave from the promised address.
    ExitBroken,
    /// The tunnel stopped answering while serving.
    Unhealthy,
    /// The exit's address is not where the offer said: the GeoIP database places it in
    /// another country or ASN.
    Misplaced,
}

impl Outcome {
    /// The status we report to the exchange.
    pub fn report(self) -> PartyStatus {
        match self {
            Self::Completed | Self::ProviderEnded => PartyStatus::Completed,
            Self::Rejected => PartyStatus::Rejected,
            Self::PaymentFailed
            | Self::NeverServed
            | Self::ExitBroken
            | Self::Unhealthy
            | Self::Misplaced => PartyStatus::Failed,
        }
    }

    /// The provider's rating (1-5 stars), or none when the provider is not to blame
    /// for anything and did not serve (nothing to rate).
    pub fn rating(self, served: bool) -> Option<u8> {
        match self {
            Self::Completed | Self::ProviderEnded if served => Some(5),
            Self::Completed | Self::ProviderEnded | Self::Rejected | Self::PaymentFailed => None,
            Self::Unhealthy => Some(2),
            Self::NeverServed | Self::ExitBroken | Self::Misplaced => Some(1),
        }
    }

    /// Whether the provider is left out of our requests for a while.
    pub fn avoid(self) -> bool {
        matches!(
            self,
            Self::NeverServed | Self::ExitBroken | Self::Unhealthy | Self::Misplaced
        )
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ProviderEnded => "provider_ended",
            Self::Rejected => "rejected",
            Self::PaymentFailed => "payment_failed",
            Self::NeverServed => "never_served",
            Self::ExitBroken => "exit_broken",
            Self::Unhealthy => "unhealthy",
            Self::Misplaced => "misplaced",
        }
    }
}

/// The on-chain side of a deal's payment channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ChannelPhase {
    /// Open and in use.
    Open,
    /// Open, no deal over it since `since` (unix ms): the next deal with the same
    /// provider takes it over; closed after `channel_idle_close`.
    Idle {
        /// Unix ms.
        since: Millis,
    },
    /// This deal is over and its channel went on to pay deal `by` (which tracks it).
    Reused {
        /// The deal now paid over the channel.
        by: u64,
    },
    /// The deal is over; waiting for the provider's closing claim until `until`.
    AwaitingClaim {
        /// Then we close it ourselves.
        until: Millis,
    },
    /// `startClose` was sent; waiting for it to land.
    Closing,
    /// `startClose` landed; `settle` is allowed from `settle_after`.
    Challenge {
        /// Unix ms.
        settle_after: Millis,
    },
    /// `settle` was sent.
    Settling,
    /// Closed on chain: the unspent deposit is back in our balance.
    Closed,
}

/// A deal's payment channel (one channel carries the deals with one provider, one
/// after the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// Channel id.
    pub id: B256,
    /// Tokens locked in it (for all its deals).
    pub deposit: u128,
    /// Where it is.
    pub phase: ChannelPhase,
    /// Last look-up on chain (unix ms).
    #[serde(default)]
    pub checked_at: Millis,
}

/// Where the requester's check of a deal's connection log stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogCheck {
    /// Not decided yet: the log is still to be fetched, or the channel's `logHash`
    /// on chain does not cover it yet.
    #[default]
    Pending,
    /// The provider's signed log recomputes the `logHash` its claim put on chain.
    Verified,
    /// The log is not what the provider committed (or not signed by it).
    Mismatch,
    /// No log to check (never served, the tunnel was gone, the fetch failed).
    Unavailable,
}

impl LogCheck {
    /// The lower-case name (`/api/market`, the metric's label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Verified => "verified",
            Self::Mismatch => "mismatch",
            Self::Unavailable => "unavailable",
        }
    }
}

/// A deal's connection-log check and why it stands there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnlogCheck {
    /// Where it stands.
    pub state: LogCheck,
    /// Why (free text for the admin API).
    pub reason: String,
    /// The log was fetched (and its signature checked).
    pub fetched: bool,
    /// Last look at the channel's `logHash` (unix ms).
    pub checked_at: Millis,
}

/// Most fetched logs the core keeps (oldest deals go first; a pending one then turns
/// `unavailable`).
pub const MAX_KEPT_LOGS: usize = 64;
/// A pending check looks at the channel's `logHash` on chain again this often (ms).
pub const LOG_RECHECK_MS: Millis = 10_000;

/// Everything the requester knows about one deal; persisted by the runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    /// Deal id on the exchange.
    pub id: u64,
    /// The demand group's filter (groups are found again by filter after a restart).
    pub group: Filter,
    /// Provider wallet.
    pub provider: Address,
    /// The terms (updated by extensions).
    pub terms: DealTerms,
    /// Where it is.
    pub phase: Phase,
    /// How it ended, once `Ended`.
    pub outcome: Option<Outcome>,
    /// Free text for the admin API.
    pub note: String,
    /// When we saw the match (unix ms).
    pub matched_at: Millis,
    /// When the first window was paid (unix ms).
    pub paid_at: Option<Millis>,
    /// When the exit went live for us (unix ms): service is counted from then.
    pub serving_since: Option<Millis>,
    /// When the exit's address and place were last (re)verified (unix ms).
    #[serde(default)]
    pub verified_at: Option<Millis>,
    /// When service ended (unix ms).
    pub ended_at: Option<Millis>,
    /// The payment channel, once opened.
    pub channel: Option<Channel>,
    /// The channel's cumulative amount where this deal's payments start (what its
    /// earlier deals were paid); proofs carry `base + paid`.
    #[serde(default)]
    pub base: u128,
    /// Paid for this deal: the highest proof the exchange accepted, minus `base`.
    pub paid: u128,
    /// A proof for this much (of this deal, like `paid`) is in flight.
    pub paying: Option<u128>,
    /// When the last proof was sent.
    pub last_proof_at: Millis,
    /// A top-up of this amount is in flight.
    pub topping_up: Option<u128>,
    /// We proposed extending to this end (unix s).
    pub extend_to: Option<u64>,
    /// Extensions agreed so far.
    pub extensions: u32,
    /// Requests seen through this deal's exit at the last look.
    pub requests_seen: u64,
    /// Whether the provider has been rated.
    pub rated: bool,
    /// The check of the deal's connection log.
    #[serde(default)]
    pub connlog: ConnlogCheck,
}

impl Deal {
    /// Whether the provider's exit ever went live for us.
    pub fn served(&self) -> bool {
        self.serving_since.is_some()
    }

    /// Seconds of service counted at `now` (from going live to the end of service).
    pub fn served_s(&self, now: Millis) -> u64 {
        match self.serving_since {
            Some(since) => self.ended_at.unwrap_or(now).saturating_sub(since) / 1000,
            None => 0,
        }
    }

    /// What the deal's payments may reach at `now` under `s`: the money rule the
    /// simulation checks (service plus one window ahead, never past value or deposit).
    pub fn payable(&self, s: &Settings, now: Millis) -> u128 {
        let price = self.terms.price_per_ip_second;
        let deposit = self
            .channel
            .map_or(0, |c| c.deposit.saturating_sub(self.base));
        let cap = self.terms.value.min(deposit);
        if self.served() {
            let served = Duration::from_secs(self.served_s(now));
            amount_due(price, served, s.payment_window, cap)
        } else if self.channel.is_some() {
            cost(price, s.first_window.as_secs()).min(cap)
        } else {
            0
        }
    }
}

/// The name of a deal's exit in the gateway's rotation: the one place it is made.
pub fn exit_name(deal_id: u64) -> String {
    format!("deal-{deal_id}")
}

/// The deal behind an exit name made by [`exit_name`].
pub fn deal_of_exit(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("deal-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The attributes a deal's exit gets in rotation.
pub fn attrs_of(terms: &DealTerms) -> ExitAttributes {
    ExitAttributes {
        country: Some(terms.country),
        region: terms.region.clone(),
        city: terms.city.clone(),
        asn: terms.asn,
        kind: Some(terms.kind),
    }
}

/// A demand group: exits matching `filter` to keep rented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// For logs and the admin API.
    pub name: String,
    /// What its exits must match.
    pub filter: Filter,
    /// How many it wants now.
    pub want: u32,
    /// Made on demand (expires when idle) rather than from `[[market.demand]]`.
    pub on_demand: bool,
    /// Last time a request used or asked for it.
    pub last_used: Millis,
    /// IPs asked for and not matched yet.
    pub outstanding: u32,
    /// Until then (the request's expiry).
    pub outstanding_until: Millis,
    /// Why renting is refused, if it is.
    pub refusal: Option<String>,
}

/// What the runtime tells the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The exchange matched a deal for us.
    Matched {
        /// Deal id.
        deal: u64,
        /// Provider wallet.
        provider: Address,
        /// Terms.
        terms: DealTerms,
    },
    /// The provider reported a status.
    ProviderReported {
        /// Deal id.
        deal: u64,
        /// Its status.
        status: PartyStatus,
    },
    /// The deal turned final on the exchange.
    DealFinal {
        /// Deal id.
        deal: u64,
    },
    /// Both sides agreed an extension; these are the new terms.
    Extended {
        /// Deal id.
        deal: u64,
        /// New terms.
        terms: DealTerms,
    },
    /// A request was posted; these deals were made at once.
    RequestPosted {
        /// Group filter.
        group: Filter,
        /// Order id.
        order: u64,
        /// Deals made at once.
        deals: Vec<u64>,
    },
    /// The exchange refused a request.
    RequestFailed {
        /// Group filter.
        group: Filter,
        /// IPs asked for.
        count: u32,
        /// Why.
        error: String,
    },
    /// The channel was opened (or found again after a restart).
    ChannelOpened {
        /// Deal id.
        deal: u64,
        /// Channel id.
        channel: B256,
        /// Deposit.
        deposit: u128,
    },
    /// The channel could not be opened.
    ChannelFailed {
        /// Deal id.
        deal: u64,
        /// Why.
        error: String,
    },
    /// The exchange accepted a proof.
    ProofPosted {
        /// Deal id.
        deal: u64,
        /// Cumulative amount.
        amount: u128,
    },
    /// The exchange refused a proof, or could not be reached.
    ProofFailed {
        /// Deal id.
        deal: u64,
        /// Cumulative amount.
        amount: u128,
        /// Why.
        error: String,
    },
    /// A top-up landed.
    ToppedUp {
        /// Deal id.
        deal: u64,
        /// Added.
        amount: u128,
    },
    /// A top-up failed.
    TopUpFailed {
        /// Deal id.
        deal: u64,
    },
    /// Our tunnel is up and its exit verified; it is in rotation.
    ExitLive {
        /// Deal id.
        deal: u64,
    },
    /// Our tunnel did not come up or the exit address did not verify.
    ExitFailed {
        /// Deal id.
        deal: u64,
        /// Why.
        reason: String,
    },
    /// The tunnel's health check declared it dead.
    ExitUnhealthy {
        /// Deal id.
        deal: u64,
    },
    /// The exit's address is placed by the GeoIP database in another country or ASN
    /// than the deal's terms (at connect or at a periodic re-verification).
    ExitMisplaced {
        /// Deal id.
        deal: u64,
        /// What the terms say and what the database says.
        reason: String,
    },
    /// Requests counted through the deal's exit so far.
    Usage {
        /// Deal id.
        deal: u64,
        /// Requests since the exit went live.
        requests: u64,
    },
    /// The channel is closed on chain (seen by a look-up).
    ChannelClosed {
        /// Channel id.
        channel: B256,
    },
    /// The channel is still open on chain; `claimed` so far.
    ChannelStillOpen {
        /// Channel id.
        channel: B256,
    },
    /// `startClose` landed; `settle` from `settle_after` (unix ms).
    CloseStarted {
        /// Channel id.
        channel: B256,
        /// Unix ms.
        settle_after: Millis,
    },
    /// A chain call for this channel's close failed; try again later.
    CloseFailed {
        /// Channel id.
        channel: B256,
    },
    /// The deal's connection log was fetched through its tunnel before the tunnel was
    /// removed ([`Action::FetchLog`]); `on_chain` is the channel's `logHash` read just
    /// before the fetch (`None`: the channel is gone or the read failed).
    LogFetched {
        /// Deal id.
        deal: u64,
        /// The provider's export, or why there is none.
        log: Result<Box<LogExport>, String>,
        /// The channel's `logHash` then.
        on_chain: Option<B256>,
    },
    /// The channel's `logHash` on chain ([`Action::ReadLogHash`]); `None` when the
    /// channel is closed (no longer readable).
    LogHash {
        /// Channel id.
        channel: B256,
        /// The hash.
        hash: Option<B256>,
    },
    /// Shutdown began: rent nothing more (cancel resting requests, refuse matches);
    /// the live deals keep serving while the gateway drains.
    Shutdown,
    /// The gateway drained: end every live deal (reported completed).
    EndAll,
}

/// What the core asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Post a request order for `count` IPs matching `filter`.
    PostRequest {
        /// The group's filter.
        filter: Filter,
        /// IPs.
        count: u32,
        /// Lease length, seconds.
        duration_s: u64,
        /// Price cap.
        max_price: u128,
        /// Minimum provider rating.
        min_rating: u16,
        /// Providers to leave out.
        exclude: Vec<Address>,
        /// Order expiry, unix s.
        expiry: u64,
    },
    /// Cancel a resting request (shutdown).
    CancelOrder {
        /// Order id.
        order: u64,
    },
    /// Report our status for a deal.
    Report {
        /// Deal id.
        deal: u64,
        /// Status.
        status: PartyStatus,
        /// Reason.
        reason: String,
    },
    /// Open the deal's channel with this deposit.
    OpenChannel {
        /// Deal id.
        deal: u64,
        /// Provider.
        provider: Address,
        /// Deposit.
        deposit: u128,
    },
    /// Add to the channel's deposit.
    TopUp {
        /// Deal id.
        deal: u64,
        /// Channel.
        channel: B256,
        /// Added amount.
        amount: u128,
    },
    /// Sign and post a cumulative balance proof.
    PostProof {
        /// Deal id.
        deal: u64,
        /// Channel.
        channel: B256,
        /// Cumulative amount.
        amount: u128,
    },
    /// Bring the tunnel up, verify the exit and put it in rotation.
    Connect {
        /// Deal id.
        deal: u64,
        /// Terms.
        terms: Box<DealTerms>,
    },
    /// Verify again that the serving exit leaves from the deal's address and that the
    /// GeoIP database places that address where the terms say; answer with
    /// [`Input::ExitFailed`] or [`Input::ExitMisplaced`] when not (nothing when it is).
    Reverify {
        /// Deal id.
        deal: u64,
        /// Terms (address, country, ASN).
        terms: Box<DealTerms>,
    },
    /// Take the deal's exit out of rotation and shut its tunnel.
    Disconnect {
        /// Deal id.
        deal: u64,
    },
    /// Fetch the deal's signed connection log through its tunnel (bounded), then
    /// carry out the [`Action::Disconnect`] of the same deal, and answer with
    /// [`Input::LogFetched`]. Comes with that `Disconnect` in one batch.
    FetchLog {
        /// Deal id.
        deal: u64,
        /// Its channel (its `logHash` is read first).
        channel: B256,
        /// The provider wallet (who signed the request is checked by it).
        provider: Address,
    },
    /// Read the channel's `logHash` on chain; answer with [`Input::LogHash`].
    ReadLogHash {
        /// Channel.
        channel: B256,
    },
    /// A deal's log check reached a verdict: count it (and warn on a mismatch).
    LogChecked {
        /// Deal id.
        deal: u64,
        /// The verdict.
        state: LogCheck,
        /// Why.
        reason: String,
    },
    /// Propose extending the lease to `new_end` (unix s).
    Extend {
        /// Deal id.
        deal: u64,
        /// New end.
        new_end: u64,
    },
    /// Rate the provider.
    Rate {
        /// Deal id.
        deal: u64,
        /// Stars, 1-5.
        score: u8,
    },
    /// Look the channel up on chain (closed or not).
    CheckChannel {
        /// Channel.
        channel: B256,
    },
    /// Start an uncooperative close admitting `amount`.
    StartClose {
        /// Channel.
        channel: B256,
        /// Cumulative amount admitted owed.
        amount: u128,
    },
    /// Settle a channel after its challenge period.
    Settle {
        /// Channel.
        channel: B256,
    },
}

/// What the core answers the gateway when a request's targeting matches no live exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Renting is under way (the note says what).
    Renting(String),
    /// Nothing will be rented; the reason names the cap or setting.
    Refused(String),
}

/// The requester's state machine.
#[derive(Debug, Clone)]
pub struct Core {
    s: Settings,
    groups: Vec<Group>,
    deals: BTreeMap<u64, Deal>,
    /// Deal values committed: (when, amount).
    spend: Vec<(Millis, u128)>,
    spent_total: u128,
    /// Deals made at once by our requests, to their group.
    pending_group: HashMap<u64, Filter>,
    /// Requests resting in the book: order -> expiry (unix ms).
    orders: HashMap<u64, Millis>,
    avoid: HashMap<Address, Millis>,
    shutting_down: bool,
    /// Deals changed since the last [`Core::take_dirty`].
    dirty: Vec<u64>,
    /// Fetched connection logs (at most [`MAX_KEPT_LOGS`]), by deal.
    logs: BTreeMap<u64, LogExport>,
}

impl Core {
    /// A core with the `[[market.demand]]` groups `(name, filter, count)`.
    pub fn new(s: Settings, groups: Vec<(String, Filter, u32)>, now: Millis) -> Self {
        Self {
            s,
            groups: groups
                .into_iter()
                .map(|(name, filter, want)| Group {
                    name,
                    filter,
                    want,
                    on_demand: false,
                    last_used: now,
                    outstanding: 0,
                    outstanding_until: now,
                    refusal: None,
                })
                .collect(),
            deals: BTreeMap::new(),
            spend: Vec::new(),
            spent_total: 0,
            pending_group: HashMap::new(),
            orders: HashMap::new(),
            avoid: HashMap::new(),
            shutting_down: false,
            dirty: Vec::new(),
            logs: BTreeMap::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.s
    }

    /// Every deal, by id.
    pub fn deals(&self) -> &BTreeMap<u64, Deal> {
        &self.deals
    }

    /// One deal.
    pub fn deal(&self, id: u64) -> Option<&Deal> {
        self.deals.get(&id)
    }

    /// The demand groups.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Whether shutdown began.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Deal values committed since start.
    pub fn spent_total(&self) -> u128 {
        self.spent_total
    }

    /// Deal values committed in the hour before `now`.
    pub fn spent_last_hour(&self, now: Millis) -> u128 {
        let from = now.saturating_sub(3_600_000);
        self.spend
            .iter()
            .filter(|(t, _)| *t >= from)
            .map(|(_, v)| *v)
            .sum()
    }

    /// Ids of deals changed since the last call (for the store).
    pub fn take_dirty(&mut self) -> Vec<u64> {
        let mut d = std::mem::take(&mut self.dirty);
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Deals whose channel is still to be closed, or that still run.
    pub fn unfinished(&self) -> impl Iterator<Item = &Deal> {
        self.deals.values().filter(|d| {
            d.phase != Phase::Ended
                || d.channel.is_some_and(|c| {
                    !matches!(
                        c.phase,
                        ChannelPhase::Closed
                            | ChannelPhase::Idle { .. }
                            | ChannelPhase::Reused { .. }
                    )
                })
        })
    }

    /// Restores deals from the store after a restart. Deals that were serving go back
    /// to `Paid` so that the provider's next `active` (or [`Core::resume`]) reconnects
    /// them; their payments continue from what was paid.
    pub fn restore(&mut self, deals: Vec<Deal>, now: Millis) {
        for mut d in deals {
            d.paying = None;
            d.topping_up = None;
            if matches!(d.phase, Phase::Connecting | Phase::Serving) {
                d.phase = Phase::Paid;
                d.paid_at = Some(now);
            }
            if let Some(c) = &mut d.channel
                && matches!(c.phase, ChannelPhase::Closing | ChannelPhase::Settling)
            {
                // Unknown whether it landed: look again.
                c.phase = ChannelPhase::AwaitingClaim { until: now };
            }
            // A restored deal counts against its group: make the group exist.
            if d.phase != Phase::Ended
                && !self.groups.iter().any(|g| g.filter == d.group)
                && self.groups.iter().filter(|g| g.on_demand).count() < self.s.max_on_demand_groups
            {
                self.groups.push(Group {
                    name: format!("on-demand {}", d.group),
                    filter: d.group.clone(),
                    want: 1,
                    on_demand: true,
                    last_used: now,
                    outstanding: 0,
                    outstanding_until: now,
                    refusal: None,
                });
            }
            self.spent_total = self.spent_total.saturating_add(d.terms.value);
            self.spend.push((d.matched_at, d.terms.value));
            self.deals.insert(d.id, d);
        }
    }

    /// Deals restored in `Paid` with a channel whose lease still runs: the runtime
    /// asks the exchange for their status and reconnects those still active.
    pub fn resumable(&self, now: Millis) -> Vec<u64> {
        self.deals
            .values()
            .filter(|d| {
                d.phase == Phase::Paid && d.served() && d.terms.end.saturating_mul(1000) > now
            })
            .map(|d| d.id)
            .collect()
    }

    /// A request's targeting matched no live exit: make or refresh an on-demand group.
    pub fn want(&mut self, filter: &Filter, now: Millis) -> Want {
        if self.shutting_down {
            return Want::Refused("the gateway is shutting down".into());
        }
        let gi = match self.groups.iter().position(|g| g.filter == *filter) {
            Some(i) => i,
            None => {
                let on_demand = self.groups.iter().filter(|g| g.on_demand).count();
                if on_demand >= self.s.max_on_demand_groups {
                    return Want::Refused(format!(
                        "market.max_on_demand_groups ({}) reached: no new exit is rented for {filter} until a group goes idle",
                        self.s.max_on_demand_groups
                    ));
                }
                self.groups.push(Group {
                    name: format!("on-demand {filter}"),
                    filter: filter.clone(),
                    want: 1,
                    on_demand: true,
                    last_used: now,
                    outstanding: 0,
                    outstanding_until: now,
                    refusal: None,
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[gi];
        g.last_used = now;
        if g.want == 0 {
            g.want = 1;
        }
        match &g.refusal {
            Some(r) => Want::Refused(format!("no live exit matches {filter}, and {r}")),
            None => Want::Renting(format!("renting an exit matching {filter} on the exchange")),
        }
    }

    fn touch(&mut self, id: u64) {
        self.dirty.push(id);
    }

    /// Feeds one input; returns what to do.
    pub fn handle(&mut self, input: Input, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Matched {
                deal,
                provider,
                terms,
            } => self.on_matched(deal, provider, terms, now, &mut out),
            Input::ProviderReported { deal, status } => match status {
                PartyStatus::Active => {
                    if let Some(d) = self.deals.get_mut(&deal)
                        && d.phase == Phase::Paid
                        && d.terms.end.saturating_mul(1000) > now
                    {
                        d.phase = Phase::Connecting;
                        out.push(Action::Connect {
                            deal,
                            terms: Box::new(d.terms.clone()),
                        });
                        self.touch(deal);
                    }
                }
                PartyStatus::Failed | PartyStatus::Rejected | PartyStatus::Completed => {
                    let outcome = self.provider_outcome(deal);
                    self.end(deal, outcome, "the provider ended it", now, &mut out);
                }
                _ => {}
            },
            Input::DealFinal { deal } => {
                let outcome = self.provider_outcome(deal);
                self.end(
                    deal,
                    outcome,
                    "the deal ended on the exchange",
                    now,
                    &mut out,
                );
            }
            Input::Extended { deal, terms } => {
                if let Some(d) = self.deals.get_mut(&deal)
                    && d.phase != Phase::Ended
                    && terms.end > d.terms.end
                {
                    // Its value was counted against the budget when proposed.
                    d.terms = terms;
                    d.extend_to = None;
                    d.extensions += 1;
                    d.note = format!("extended {} time(s)", d.extensions);
                    self.touch(deal);
                    self.top_up_if_needed(deal, &mut out);
                }
            }
            Input::RequestPosted {
                group,
                order,
                deals,
            } => {
                for id in deals {
                    if let Some(d) = self.deals.get_mut(&id) {
                        d.group = group.clone();
                    } else {
                        self.pending_group.insert(id, group.clone());
                    }
                }
                let expiry = now.saturating_add(ms(self.s.request_ttl));
                self.orders.insert(order, expiry);
                if self.shutting_down {
                    self.orders.remove(&order);
                    out.push(Action::CancelOrder { order });
                }
            }
            Input::RequestFailed {
                group,
                count,
                error,
            } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.filter == group) {
                    g.outstanding = g.outstanding.saturating_sub(count);
                    g.refusal = Some(format!("the exchange refused the request: {error}"));
                    // Try again after the request's lifetime, not at once.
                    g.outstanding_until = now.saturating_add(ms(self.s.request_ttl));
                }
            }
            Input::ChannelOpened {
                deal,
                channel,
                deposit,
            } => {
                let Some(d) = self.deals.get_mut(&deal) else {
                    return out;
                };
                d.channel = Some(Channel {
                    id: channel,
                    deposit,
                    phase: ChannelPhase::Open,
                    checked_at: 0,
                });
                self.touch(deal);
                let d = &self.deals[&deal];
                if d.phase == Phase::Opening {
                    let first = d.payable(&self.s, now);
                    self.pay(deal, first, now, &mut out);
                } else if d.phase == Phase::Ended {
                    // Ended while opening (shutdown, the provider left): close it.
                    self.start_channel_close(deal, now, &mut out);
                }
            }
            Input::ChannelFailed { deal, error } => {
                self.end(
                    deal,
                    Outcome::PaymentFailed,
                    &format!("could not open the payment channel: {error}"),
                    now,
                    &mut out,
                );
            }
            Input::ProofPosted { deal, amount } => {
                if let Some(d) = self.deals.get_mut(&deal) {
                    let amount = amount.saturating_sub(d.base);
                    d.paid = d.paid.max(amount);
                    if d.paying == Some(amount) {
                        d.paying = None;
                    }
                    if d.phase == Phase::Opening {
                        d.phase = Phase::Paid;
                        d.paid_at = Some(now);
                    }
                    self.touch(deal);
                }
            }
            Input::ProofFailed {
                deal,
                amount,
                error,
            } => {
                if let Some(d) = self.deals.get_mut(&deal) {
                    if d.paying == Some(amount.saturating_sub(d.base)) {
                        d.paying = None;
                    }
                    d.note = format!("balance proof refused: {error}");
                    let first = d.phase == Phase::Opening;
                    self.touch(deal);
                    if first {
                        self.end(
                            deal,
                            Outcome::PaymentFailed,
                            &format!("first balance proof refused: {error}"),
                            now,
                            &mut out,
                        );
                    }
                }
            }
            Input::ToppedUp { deal, amount } => {
                if let Some(d) = self.deals.get_mut(&deal) {
                    d.topping_up = None;
                    if let Some(c) = &mut d.channel {
                        c.deposit = c.deposit.saturating_add(amount);
                    }
                    self.touch(deal);
                    // A deal over a reused channel waiting for the deposit to cover
                    // its first window pays it now.
                    let d = &self.deals[&deal];
                    if d.phase == Phase::Opening && d.paid == 0 {
                        let first = d.payable(&self.s, now);
                        self.pay(deal, first, now, &mut out);
                    }
                }
            }
            Input::TopUpFailed { deal } => {
                if let Some(d) = self.deals.get_mut(&deal) {
                    d.topping_up = None;
                    d.note = "top-up failed; retrying".into();
                    self.touch(deal);
                }
            }
            Input::ExitLive { deal } => {
                if let Some(d) = self.deals.get_mut(&deal) {
                    if d.phase != Phase::Connecting {
                        // Ended meanwhile: the exit must not stay in rotation.
                        out.push(Action::Disconnect { deal });
                        return out;
                    }
                    d.phase = Phase::Serving;
                    if d.serving_since.is_none() {
                        d.serving_since = Some(now);
                    }
                    d.verified_at = Some(now);
                    d.note = "serving".into();
                    d.requests_seen = 0;
                    out.push(Action::Report {
                        deal,
                        status: PartyStatus::Active,
                        reason: String::new(),
                    });
                    self.touch(deal);
                    // Service observed: pay the full window ahead now.
                    let due = self.deals[&deal].payable(&self.s, now);
                    self.pay(deal, due, now, &mut out);
                }
            }
            Input::ExitFailed { deal, reason } => {
                self.end(deal, Outcome::ExitBroken, &reason, now, &mut out);
            }
            Input::ExitMisplaced { deal, reason } => {
                if self
                    .deals
                    .get(&deal)
                    .is_some_and(|d| matches!(d.phase, Phase::Connecting | Phase::Serving))
                {
                    self.end(
                        deal,
                        Outcome::Misplaced,
                        &format!("exit misplaced: {reason}"),
                        now,
                        &mut out,
                    );
                }
            }
            Input::ExitUnhealthy { deal } => {
                if self
                    .deals
                    .get(&deal)
                    .is_some_and(|d| d.phase == Phase::Serving)
                {
                    self.end(
                        deal,
                        Outcome::Unhealthy,
                        "exit failed: the tunnel stopped answering",
                        now,
                        &mut out,
                    );
                }
            }
            Input::Usage { deal, requests } => {
                if let Some(d) = self.deals.get_mut(&deal)
                    && requests != d.requests_seen
                {
                    d.requests_seen = requests;
                    let filter = d.group.clone();
                    if let Some(g) = self.groups.iter_mut().find(|g| g.filter == filter) {
                        g.last_used = now;
                    }
                }
            }
            Input::ChannelClosed { channel } => {
                if let Some(d) = self.deal_of_channel(channel) {
                    let id = d.id;
                    if let Some(c) = &mut self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                        c.phase = ChannelPhase::Closed;
                    }
                    self.touch(id);
                }
            }
            Input::ChannelStillOpen { channel } => {
                if let Some(id) = self.deal_of_channel(channel).map(|d| d.id) {
                    let d = &self.deals[&id];
                    if let Some(c) = d.channel
                        && let ChannelPhase::AwaitingClaim { until } = c.phase
                        && now >= until
                    {
                        // A provider that never served is owed nothing we admit; it
                        // may still claim our first-window proof in the challenge period.
                        let amount = d.base + if d.served() { d.paid } else { 0 };
                        if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                            c.phase = ChannelPhase::Closing;
                        }
                        out.push(Action::StartClose { channel, amount });
                        self.touch(id);
                    }
                }
            }
            Input::CloseStarted {
                channel,
                settle_after,
            } => {
                if let Some(id) = self.deal_of_channel(channel).map(|d| d.id) {
                    if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut())
                        && c.phase != ChannelPhase::Closed
                    {
                        c.phase = ChannelPhase::Challenge { settle_after };
                    }
                    self.touch(id);
                }
            }
            Input::CloseFailed { channel } => {
                if let Some(id) = self.deal_of_channel(channel).map(|d| d.id) {
                    if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                        c.phase = match c.phase {
                            ChannelPhase::Settling => ChannelPhase::Challenge { settle_after: now },
                            ChannelPhase::Closed => ChannelPhase::Closed,
                            // Look again (it may have been closed by the provider).
                            _ => ChannelPhase::AwaitingClaim { until: now },
                        };
                    }
                    self.touch(id);
                }
            }
            Input::LogFetched {
                deal,
                log,
                on_chain,
            } => self.on_log_fetched(deal, log, on_chain, now, &mut out),
            Input::LogHash { channel, hash } => {
                let ids: Vec<u64> = self
                    .deals
                    .values()
                    .filter(|d| {
                        d.connlog.state == LogCheck::Pending
                            && d.connlog.fetched
                            && d.channel.is_some_and(|c| c.id == channel)
                    })
                    .map(|d| d.id)
                    .collect();
                for id in ids {
                    if let Some(d) = self.deals.get_mut(&id) {
                        d.connlog.checked_at = now;
                    }
                    match hash {
                        Some(h) => self.check_log(id, h, &mut out),
                        None => self.log_verdict(
                            id,
                            LogCheck::Unavailable,
                            "the channel closed with a logHash no fetched log covers".into(),
                            &mut out,
                        ),
                    }
                }
            }
            Input::Shutdown => {
                self.shutting_down = true;
                for g in &mut self.groups {
                    g.want = 0;
                    g.outstanding = 0;
                }
                let mut orders: Vec<u64> = self.orders.drain().map(|(o, _)| o).collect();
                orders.sort_unstable();
                out.extend(
                    orders
                        .into_iter()
                        .map(|order| Action::CancelOrder { order }),
                );
            }
            Input::EndAll => {
                self.shutting_down = true;
                let ids: Vec<u64> = self
                    .deals
                    .values()
                    .filter(|d| d.phase != Phase::Ended)
                    .map(|d| d.id)
                    .collect();
                for id in ids {
                    self.end(
                        id,
                        Outcome::Completed,
                        "gateway shutting down",
                        now,
                        &mut out,
                    );
                }
                if self.s.close_channels_at_shutdown {
                    let idle: Vec<u64> = self
                        .deals
                        .values()
                        .filter(|d| {
                            d.channel
                                .is_some_and(|c| matches!(c.phase, ChannelPhase::Idle { .. }))
                        })
                        .map(|d| d.id)
                        .collect();
                    for id in idle {
                        if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                            c.phase = ChannelPhase::AwaitingClaim { until: now };
                            c.checked_at = now;
                            out.push(Action::CheckChannel { channel: c.id });
                        }
                        self.touch(id);
                    }
                }
            }
        }
        out
    }

    /// How a deal the provider (or the exchange) ended counts: a provider that took
    /// our first window and never served is treated as one that never serves.
    fn provider_outcome(&self, id: u64) -> Outcome {
        match self.deals.get(&id) {
            Some(d) if !d.served() && d.channel.is_some() => Outcome::NeverServed,
            _ => Outcome::ProviderEnded,
        }
    }

    /// The deal that tracks `channel` (the latest over it).
    fn deal_of_channel(&self, channel: B256) -> Option<&Deal> {
        self.deals.values().find(|d| {
            d.channel
                .is_some_and(|c| c.id == channel && !matches!(c.phase, ChannelPhase::Reused { .. }))
        })
    }

    /// An idle open channel to `provider`, the one with the most deposit left.
    fn idle_channel_to(&self, provider: Address) -> Option<u64> {
        self.deals
            .values()
            .filter(|d| {
                d.provider == provider
                    && d.topping_up.is_none()
                    && d.channel
                        .is_some_and(|c| matches!(c.phase, ChannelPhase::Idle { .. }))
            })
            .max_by_key(|d| {
                let signed = d.base + d.paid.max(d.paying.unwrap_or(0));
                d.channel.map_or(0, |c| c.deposit.saturating_sub(signed))
            })
            .map(|d| d.id)
    }

    fn on_matched(
        &mut self,
        id: u64,
        provider: Address,
        terms: DealTerms,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        if self.deals.contains_key(&id) {
            return; // replayed after a reconnect
        }
        let attrs = attrs_of(&terms);
        let group = self.pending_group.remove(&id).or_else(|| {
            self.groups
                .iter()
                .find(|g| g.outstanding > 0 && g.filter.matches(&attrs))
                .or_else(|| self.groups.iter().find(|g| g.filter.matches(&attrs)))
                .map(|g| g.filter.clone())
        });
        let over = self.over_budget(terms.value, now);
        let reject = if self.shutting_down {
            Some("gateway shutting down".to_string())
        } else if terms.price_per_ip_second > self.s.max_price_per_ip_second {
            Some("price above market.max_price_per_ip_second".into())
        } else if let Some(key) = over {
            Some(format!("budget: this deal would pass {key}"))
        } else if group.is_none() {
            Some("no demand for this exit".into())
        } else {
            None
        };
        let group = group.unwrap_or_default();
        if let Some(g) = self.groups.iter_mut().find(|g| g.filter == group) {
            g.outstanding = g.outstanding.saturating_sub(1);
        }
        let value = terms.value;
        let deposit = value;
        let mut deal = Deal {
            id,
            group,
            provider,
            terms,
            phase: Phase::Opening,
            outcome: None,
            note: String::new(),
            matched_at: now,
            paid_at: None,
            serving_since: None,
            verified_at: None,
            ended_at: None,
            channel: None,
            base: 0,
            paid: 0,
            paying: None,
            last_proof_at: 0,
            topping_up: None,
            extend_to: None,
            extensions: 0,
            requests_seen: 0,
            rated: false,
            connlog: ConnlogCheck::default(),
        };
        self.touch(id);
        if let Some(reason) = reject {
            deal.phase = Phase::Ended;
            deal.outcome = Some(Outcome::Rejected);
            deal.note.clone_from(&reason);
            deal.ended_at = Some(now);
            self.deals.insert(id, deal);
            out.push(Action::Report {
                deal: id,
                status: PartyStatus::Rejected,
                reason,
            });
            return;
        }
        self.spend.push((now, value));
        self.spent_total = self.spent_total.saturating_add(value);
        // A channel to this provider that no deal uses: this deal's payments continue
        // its cumulative amount, no chain transaction before the first proof.
        let reuse = self.idle_channel_to(provider).and_then(|o| {
            let old = self.deals.get_mut(&o)?;
            let c = old.channel.as_mut()?;
            let base = old.base + old.paid.max(old.paying.unwrap_or(0));
            let taken = *c;
            c.phase = ChannelPhase::Reused { by: id };
            self.dirty.push(o);
            Some((taken, base))
        });
        if let Some((c, base)) = reuse {
            deal.base = base;
            deal.channel = Some(Channel {
                id: c.id,
                deposit: c.deposit,
                phase: ChannelPhase::Open,
                checked_at: 0,
            });
            deal.note = format!("reusing channel {}", c.id);
        }
        self.deals.insert(id, deal);
        out.push(Action::Report {
            deal: id,
            status: PartyStatus::Accepted,
            reason: String::new(),
        });
        if reuse.is_some() {
            let first = self.deals[&id].payable(&self.s, now);
            let due = cost(
                self.deals[&id].terms.price_per_ip_second,
                self.s.first_window.as_secs(),
            )
            .min(value);
            if first >= due {
                self.pay(id, first, now, out);
            }
            self.top_up_if_needed(id, out);
        } else {
            out.push(Action::OpenChannel {
                deal: id,
                provider,
                deposit,
            });
        }
    }

    fn pay(&mut self, id: u64, amount: u128, now: Millis, out: &mut Vec<Action>) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        let Some(c) = d.channel else { return };
        if c.phase != ChannelPhase::Open || d.paying.is_some() || amount <= d.paid {
            return;
        }
        d.paying = Some(amount);
        d.last_proof_at = now;
        out.push(Action::PostProof {
            deal: id,
            channel: c.id,
            amount: d.base.saturating_add(amount),
        });
    }

    fn top_up_if_needed(&mut self, id: u64, out: &mut Vec<Action>) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        let Some(c) = d.channel else { return };
        if d.phase == Phase::Ended || d.topping_up.is_some() || c.phase != ChannelPhase::Open {
            return;
        }
        if let Some(amount) =
            top_up_amount(c.deposit, d.base, d.terms.value, self.s.channel_prefund)
        {
            d.topping_up = Some(amount);
            out.push(Action::TopUp {
                deal: id,
                channel: c.id,
                amount,
            });
        }
    }

    fn end(&mut self, id: u64, outcome: Outcome, reason: &str, now: Millis, out: &mut Vec<Action>) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        if d.phase == Phase::Ended {
            return;
        }
        let was = d.phase;
        d.phase = Phase::Ended;
        d.outcome = Some(outcome);
        d.note = reason.chars().take(200).collect();
        d.ended_at = Some(now);
        d.extend_to = None;
        // Our own end of a serving deal: its log is fetched through the tunnel before
        // the tunnel goes, and the provider hears of the end only then (it removes our
        // key when it does).
        let fetch = match (was, d.channel) {
            (Phase::Serving, Some(c)) if outcome == Outcome::Completed => Some(c.id),
            _ => None,
        };
        if let Some(channel) = fetch {
            out.push(Action::FetchLog {
                deal: id,
                channel,
                provider: d.provider,
            });
        } else if d.connlog.state == LogCheck::Pending && !d.connlog.fetched {
            d.connlog.state = LogCheck::Unavailable;
            d.connlog.reason = if d.served() {
                format!(
                    "the deal ended as {}: its log was not fetched",
                    outcome.as_str()
                )
            } else {
                "the exit never served".into()
            };
        }
        if matches!(was, Phase::Connecting | Phase::Serving) {
            out.push(Action::Disconnect { deal: id });
        }
        if fetch.is_none() {
            out.push(Action::Report {
                deal: id,
                status: outcome.report(),
                reason: d.note.clone(),
            });
        }
        if let Some(score) = outcome.rating(d.served()) {
            d.rated = true;
            out.push(Action::Rate { deal: id, score });
        }
        let provider = d.provider;
        self.touch(id);
        if outcome.avoid() {
            self.avoid
                .insert(provider, now.saturating_add(ms(self.s.avoid_for)));
        }
        // A channel to a provider that failed us is closed; otherwise it waits, open,
        // for our next deal with that provider.
        let keep = !outcome.avoid() && outcome != Outcome::PaymentFailed;
        match self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
            Some(c) if keep && c.phase == ChannelPhase::Open => {
                c.phase = ChannelPhase::Idle { since: now };
            }
            _ => self.start_channel_close(id, now, out),
        }
    }

    fn on_log_fetched(
        &mut self,
        id: u64,
        log: Result<Box<LogExport>, String>,
        on_chain: Option<B256>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        if d.connlog.fetched {
            return; // replayed
        }
        // The report held back for the fetch.
        if let Some(outcome) = d.outcome {
            out.push(Action::Report {
                deal: id,
                status: outcome.report(),
                reason: d.note.clone(),
            });
        }
        d.connlog.checked_at = now;
        let provider = d.provider;
        self.touch(id);
        let x = match log {
            Ok(x) => x,
            Err(e) => {
                let reason = format!("not fetched: {}", e.chars().take(300).collect::<String>());
                return self.log_verdict(id, LogCheck::Unavailable, reason, out);
            }
        };
        if let Err(e) = connlog::verify_log(&x.log, id, provider, None) {
            return self.log_verdict(id, LogCheck::Mismatch, e.to_string(), out);
        }
        if let Some(d) = self.deals.get_mut(&id) {
            d.connlog.fetched = true;
            d.connlog.reason = format!(
                "{} connection(s) fetched; waiting for the channel's logHash on chain",
                x.log.entries.len()
            );
        }
        self.logs.insert(id, *x);
        while self.logs.len() > MAX_KEPT_LOGS {
            let Some((old, _)) = self.logs.pop_first() else {
                break;
            };
            if self
                .deals
                .get(&old)
                .is_some_and(|d| d.connlog.state == LogCheck::Pending)
            {
                self.log_verdict(
                    old,
                    LogCheck::Unavailable,
                    format!("log dropped: more than {MAX_KEPT_LOGS} kept"),
                    out,
                );
            }
        }
        if let Some(h) = on_chain {
            self.check_log(id, h, out);
        }
    }

    /// Checks a fetched log against the channel's `logHash` on chain: with the
    /// provider's commitment that hash names ([`connlog::verify_commitment`]), or, for
    /// a claim made after the fetch, by recomputing the commitment from the logs of
    /// every deal over the channel. Stays pending while the hash covers none of it.
    fn check_log(&mut self, id: u64, on_chain: B256, out: &mut Vec<Action>) {
        let (Some(d), Some(x)) = (self.deals.get(&id), self.logs.get(&id)) else {
            return;
        };
        let Some(channel) = d.channel.map(|c| c.id) else {
            return;
        };
        if d.connlog.state != LogCheck::Pending {
            return;
        }
        if on_chain == B256::ZERO {
            return; // nothing claimed yet
        }
        let logs = &self.logs;
        let entries = |deal: u64| logs.get(&deal).map(|x| x.log.entries.as_slice());
        let verdict = if let Some(c) = x
            .commits
            .iter()
            .rev()
            .find(|c| c.channel_id == channel && c.hash == on_chain)
        {
            match c.parts.iter().find(|p| !logs.contains_key(&p.deal_id)) {
                Some(p) => Some((
                    LogCheck::Unavailable,
                    format!(
                        "the commitment covers deal {}, whose log this gateway does not hold",
                        p.deal_id
                    ),
                )),
                None => Some(
                    match connlog::verify_commitment(&channel, &on_chain, id, &x.commits, entries) {
                        Ok(()) => (
                            LogCheck::Verified,
                            format!(
                                "{} connection(s); logHash {on_chain} recomputed",
                                x.log.entries.len()
                            ),
                        ),
                        Err(e) => (LogCheck::Mismatch, e.to_string()),
                    },
                ),
            }
        } else {
            // A claim after the fetch: the deals over the channel, as fetched.
            let parts: Vec<CommitPart> = self
                .deals
                .values()
                .filter(|d| d.channel.is_some_and(|c| c.id == channel))
                .filter_map(|d| {
                    let x = logs.get(&d.id)?;
                    Some(CommitPart {
                        deal_id: d.id,
                        entries: x.log.entries.len() as u64,
                        dropped: x.dropped,
                        head: x.log.head,
                    })
                })
                .collect();
            (connlog::channel_commitment(&channel, &parts) == on_chain).then(|| {
                (
                    LogCheck::Verified,
                    format!(
                        "{} connection(s); logHash {on_chain} recomputed from the channel's logs",
                        x.log.entries.len()
                    ),
                )
            })
        };
        match verdict {
            Some((state, reason)) => self.log_verdict(id, state, reason, out),
            None => {
                if let Some(d) = self.deals.get_mut(&id) {
                    d.connlog.reason = format!(
                        "the chain holds logHash {on_chain}, which the fetched commitments do not include yet"
                    );
                }
            }
        }
    }

    fn log_verdict(&mut self, id: u64, state: LogCheck, reason: String, out: &mut Vec<Action>) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        d.connlog.state = state;
        d.connlog.reason = reason.chars().take(400).collect();
        self.touch(id);
        out.push(Action::LogChecked {
            deal: id,
            state,
            reason,
        });
    }

    /// Pending log checks of ended deals: the channel's `logHash` is looked at again
    /// every [`LOG_RECHECK_MS`] (one read per channel).
    fn recheck_logs(&mut self, now: Millis, out: &mut Vec<Action>) {
        let mut channels = Vec::new();
        for d in self.deals.values_mut() {
            if d.connlog.state == LogCheck::Pending
                && d.connlog.fetched
                && now.saturating_sub(d.connlog.checked_at) >= LOG_RECHECK_MS
                && let Some(c) = d.channel
            {
                d.connlog.checked_at = now;
                if !channels.contains(&c.id) {
                    channels.push(c.id);
                }
            }
        }
        out.extend(
            channels
                .into_iter()
                .map(|channel| Action::ReadLogHash { channel }),
        );
    }

    /// The kept log of a deal (fetched and signature-checked).
    pub fn log(&self, id: u64) -> Option<&LogExport> {
        self.logs.get(&id)
    }

    /// Asks for a re-verification of a serving exit once `reverify_every` has passed
    /// since the last one.
    fn maybe_reverify(&mut self, id: u64, now: Millis, out: &mut Vec<Action>) {
        let every = ms(self.s.reverify_every);
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        let last = d.verified_at.or(d.serving_since).unwrap_or(now);
        if d.phase == Phase::Serving && every > 0 && now.saturating_sub(last) >= every {
            d.verified_at = Some(now);
            out.push(Action::Reverify {
                deal: id,
                terms: Box::new(d.terms.clone()),
            });
        }
    }

    /// After a deal ended: give the provider `close_grace` to close the channel with
    /// its final claim (at once for a provider that never served), then close it.
    fn start_channel_close(&mut self, id: u64, now: Millis, out: &mut Vec<Action>) {
        let s = &self.s;
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        let grace = if d.served() { ms(s.close_grace) } else { 0 };
        let Some(c) = &mut d.channel else { return };
        if c.phase != ChannelPhase::Open {
            return;
        }
        c.phase = ChannelPhase::AwaitingClaim {
            until: now.saturating_add(grace),
        };
        if grace == 0 {
            c.checked_at = now;
            out.push(Action::CheckChannel { channel: c.id });
        }
    }

    /// Forgets deals that ended over an hour before `now` with their channel closed
    /// (or never opened), keeping memory bounded over weeks; returns their ids.
    pub fn prune(&mut self, now: Millis) -> Vec<u64> {
        let gone: Vec<u64> = self
            .deals
            .values()
            .filter(|d| {
                d.phase == Phase::Ended
                    && d.ended_at
                        .is_some_and(|t| now.saturating_sub(t) > 3_600_000)
                    && d.channel.is_none_or(|c| {
                        matches!(c.phase, ChannelPhase::Closed | ChannelPhase::Reused { .. })
                    })
            })
            .map(|d| d.id)
            .collect();
        for id in &gone {
            self.deals.remove(id);
            self.logs.remove(id);
        }
        let from = now.saturating_sub(3_600_000);
        self.spend.retain(|(t, _)| *t >= from);
        gone
    }

    /// The clock moved: pay, extend, end, close, rent. Call it every few hundred ms.
    pub fn tick(&mut self, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        let unix = now / 1000;
        self.recheck_logs(now, &mut out);
        // Deals: ends, timeouts, payments, extensions, channels.
        let ids: Vec<u64> = self.deals.keys().copied().collect();
        for id in ids {
            let d = &self.deals[&id];
            if d.phase != Phase::Ended {
                if unix >= d.terms.end {
                    self.end(id, Outcome::Completed, "lease over", now, &mut out);
                } else if d.phase == Phase::Paid
                    && now.saturating_sub(d.paid_at.unwrap_or(d.matched_at))
                        > ms(self.s.serve_timeout)
                {
                    let (outcome, why) = if d.served() {
                        (
                            Outcome::ExitBroken,
                            "the provider did not serve again after a restart",
                        )
                    } else {
                        (Outcome::NeverServed, "the provider never started serving")
                    };
                    self.end(id, outcome, why, now, &mut out);
                } else if d.phase == Phase::Opening
                    && d.channel.is_none()
                    && now.saturating_sub(d.matched_at) > 4 * ms(self.s.serve_timeout)
                {
                    // The chain has not answered for a long time; the deal's accept
                    // deadline has passed on the exchange anyway.
                    self.end(
                        id,
                        Outcome::PaymentFailed,
                        "the payment channel did not open in time",
                        now,
                        &mut out,
                    );
                } else if d.phase == Phase::Serving {
                    let interval = ms(self.s.proof_interval);
                    if now.saturating_sub(d.last_proof_at) >= interval {
                        let due = d.payable(&self.s, now);
                        self.pay(id, due, now, &mut out);
                    }
                    self.maybe_extend(id, now, &mut out);
                    self.top_up_if_needed(id, &mut out);
                    self.maybe_reverify(id, now, &mut out);
                }
            }
            let d = &self.deals[&id];
            if let Some(c) = d.channel {
                match c.phase {
                    ChannelPhase::Idle { since }
                        if now.saturating_sub(since) >= ms(self.s.channel_idle_close) =>
                    {
                        // Unused for long: close it (the provider claims what it holds
                        // when it sees the close; we admit what we signed).
                        if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                            c.phase = ChannelPhase::AwaitingClaim { until: now };
                            c.checked_at = now;
                        }
                        out.push(Action::CheckChannel { channel: c.id });
                        self.touch(id);
                    }
                    ChannelPhase::AwaitingClaim { until }
                        if now >= until && now.saturating_sub(c.checked_at) >= 5_000 =>
                    {
                        // Look every few seconds until the provider closed it or we do.
                        if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                            c.checked_at = now;
                        }
                        out.push(Action::CheckChannel { channel: c.id });
                    }
                    ChannelPhase::Challenge { settle_after } if now >= settle_after => {
                        if let Some(c) = self.deals.get_mut(&id).and_then(|d| d.channel.as_mut()) {
                            c.phase = ChannelPhase::Settling;
                        }
                        out.push(Action::Settle { channel: c.id });
                        self.touch(id);
                    }
                    _ => {}
                }
            }
        }
        self.avoid.retain(|_, until| *until > now);
        self.orders.retain(|_, exp| *exp > now);
        if !self.shutting_down {
            self.expire_groups(now, &mut out);
            self.plan_requests(now, &mut out);
        }
        out
    }

    fn maybe_extend(&mut self, id: u64, now: Millis, out: &mut Vec<Action>) {
        if self.shutting_down {
            return;
        }
        let unix = now / 1000;
        let Some(d) = self.deals.get(&id) else { return };
        let renew = self.s.renew_ahead.as_secs();
        if d.extend_to.is_some() || d.terms.end.saturating_sub(unix) > renew {
            return;
        }
        // Only while the group still wants this exit.
        let Some(g) = self.groups.iter().find(|g| g.filter == d.group) else {
            return;
        };
        let live = self.live_for(&g.filter, unix);
        if g.want == 0 || live > g.want {
            return;
        }
        let new_end = d
            .terms
            .end
            .saturating_add(self.s.deal_duration.as_secs())
            .min(d.terms.start.saturating_add(MAX_LEASE_S));
        if new_end <= d.terms.end {
            return;
        }
        let added = d
            .terms
            .price_per_ip_second
            .saturating_mul(u128::from(new_end - d.terms.end));
        if self.over_budget(added, now).is_some() {
            return;
        }
        if let Some(d) = self.deals.get_mut(&id) {
            d.extend_to = Some(new_end);
            self.touch(id);
        }
        // Counted now, so that no agreement can pass a cap; an extension the provider
        // does not agree to stays counted (the caps err on the safe side).
        self.spend.push((now, added));
        self.spent_total = self.spent_total.saturating_add(added);
        out.push(Action::Extend { deal: id, new_end });
    }

    /// Deals of a group counted as live at `unix`: not ended, and either not near
    /// their end or being extended (an extension not agreed by half of `renew_ahead`
    /// before the end no longer counts, so a replacement is rented in time).
    fn live_for(&self, filter: &Filter, unix: u64) -> u32 {
        let renew = self.s.renew_ahead.as_secs();
        self.deals
            .values()
            .filter(|d| {
                d.group == *filter && d.phase != Phase::Ended && {
                    let left = d.terms.end.saturating_sub(unix);
                    left > renew || (d.extend_to.is_some() && left > renew / 2)
                }
            })
            .count() as u32
    }

    fn over_budget(&self, estimate: u128, now: Millis) -> Option<&'static str> {
        if self
            .s
            .max_spend_per_hour
            .is_some_and(|cap| self.spent_last_hour(now).saturating_add(estimate) > cap)
        {
            Some("market.max_spend_per_hour")
        } else if self
            .s
            .max_spend_total
            .is_some_and(|cap| self.spent_total.saturating_add(estimate) > cap)
        {
            Some("market.max_spend_total")
        } else {
            None
        }
    }

    fn expire_groups(&mut self, now: Millis, out: &mut Vec<Action>) {
        let idle = ms(self.s.idle_release);
        let mut release = Vec::new();
        for g in &mut self.groups {
            if g.on_demand && g.want > 0 && now.saturating_sub(g.last_used) > idle {
                g.want = 0;
                release.push(g.filter.clone());
            }
        }
        for filter in release {
            let ids: Vec<u64> = self
                .deals
                .values()
                .filter(|d| d.group == filter && d.phase != Phase::Ended)
                .map(|d| d.id)
                .collect();
            for id in ids {
                self.end(id, Outcome::Completed, "idle release", now, out);
            }
        }
        // An idle on-demand group with no deal left is forgotten.
        let deals = &self.deals;
        self.groups.retain(|g| {
            !g.on_demand
                || g.want > 0
                || deals
                    .values()
                    .any(|d| d.group == g.filter && d.phase != Phase::Ended)
        });
    }

    fn plan_requests(&mut self, now: Millis, out: &mut Vec<Action>) {
        let unix = now / 1000;
        let mut exclude: Vec<Address> = self.avoid.keys().copied().collect();
        exclude.sort_unstable();
        exclude.truncate(16);
        for gi in 0..self.groups.len() {
            let filter = self.groups[gi].filter.clone();
            let live = self.live_for(&filter, unix);
            let g = &mut self.groups[gi];
            if now >= g.outstanding_until {
                g.outstanding = 0;
            }
            let short = g.want.saturating_sub(live + g.outstanding);
            if short == 0 {
                continue;
            }
            let estimate = self
                .s
                .max_price_per_ip_second
                .saturating_mul(u128::from(self.s.deal_duration.as_secs()))
                .saturating_mul(u128::from(short));
            let cap = self.over_budget(estimate, now);
            let g = &mut self.groups[gi];
            if let Some(key) = cap {
                g.refusal = Some(format!(
                    "budget: renting {short} more for `{}` would pass {key}",
                    g.name
                ));
                continue;
            }
            if now < g.outstanding_until && g.refusal.is_some() {
                continue; // refused by the exchange a moment ago
            }
            g.refusal = None;
            g.outstanding += short;
            g.outstanding_until = now.saturating_add(ms(self.s.request_ttl));
            out.push(Action::PostRequest {
                filter,
                count: short,
                duration_s: self.s.deal_duration.as_secs(),
                max_price: self.s.max_price_per_ip_second,
                min_rating: self.s.min_provider_rating,
                exclude: exclude.clone(),
                expiry: unix.saturating_add(self.s.request_ttl.as_secs()),
            });
        }
    }
}
