//! The agent's sans-IO core: one state machine per deal, fed with what the exchange and
//! the chain said (observations, results of earlier actions) and the clock (unix
//! milliseconds, injected), answering with the [`Action`]s to take now.
//!
//! It is a reconciler: every deal holds what we want (our status, whether the peer is
//! served, what is claimed, the rating) and what is known to be done; [`Core::actions`]
//! emits the difference, one action per kind and deal in flight at a time, failed ones
//! again after a backoff. Feeding the same observation twice (an event replayed after a
//! reconnect, a poll seeing what an event already said) changes nothing, which is how
//! the agent never reports, serves or claims twice.
//!
//! Rules (docs/market.md): accept while under capacity; serve once a verified proof
//! covers the first window (`first_window_due(price, first_window, value)`, a few
//! seconds); stop serving when `payment_covers(price, paid, served, grace)` fails, at the
//! deal's end, or when the requester leaves; agree to the requester's extension of a
//! deal served and paid up, within the exit's longest rental; rate the requester once
//! the deal is final.
//!
//! Payment channels are reused across deals (one at a time per channel): a deal's
//! payments are the part of the channel's cumulative amount above its `base`, the
//! amount where the channel's earlier deals ended. Claims are per channel and lazy: when
//! the unclaimed amount reaches `claim_threshold`, when the requester starts closing the
//! channel (then the claim closes it), and at shutdown ([`Core::claimable`]); a fixed
//! timer (`claim_interval`) only when configured. A deal whose proofs never covered the
//! first window never adds to a claim of its own.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use alloy_primitives::{Address, B256};
use ipsx_exchange_client::market::{cost, first_window_due, inner_ip_for_deal, payment_covers};
use ipsx_exchange_client::{DealStatus, PartyStatus};

/// Unix time in milliseconds.
pub type Millis = u64;

/// What the core needs of a deal's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DealInfo {
    /// Deal id.
    pub id: u64,
    /// The requester's wallet (must sign the proofs and own the channel).
    pub requester: Address,
    /// The exit address sold.
    pub exit_address: IpAddr,
    /// Our exit's WireGuard key named in the deal (selects the exit).
    pub provider_wg_key: [u8; 32],
    /// The requester's WireGuard key (the peer to add).
    pub requester_wg_key: [u8; 32],
    /// Agreed price per IP-second.
    pub price: u128,
    /// Price x duration.
    pub value: u128,
    /// Start, unix seconds.
    pub start: u64,
    /// End, unix seconds.
    pub end: u64,
}

/// A deal as the exchange showed it (a `Matched` event, a poll, a fetch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Terms.
    pub info: DealInfo,
    /// Our status as the exchange has it.
    pub provider_status: PartyStatus,
    /// The requester's status.
    pub requester_status: PartyStatus,
    /// The deal status.
    pub status: DealStatus,
    /// Cumulative amount of the latest stored proof, if any.
    pub proof_amount: Option<u128>,
    /// Whether we rated the requester already.
    pub rated_by_provider: bool,
    /// Our pending proposal of a new end, as the exchange has it.
    pub provider_new_end: Option<u64>,
    /// The requester's pending proposal of a new end.
    pub requester_new_end: Option<u64>,
    /// The requester's WireGuard endpoint, if it reported one (NAT traversal).
    pub requester_endpoint: Option<SocketAddr>,
}

/// A payment channel as read from the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelFacts {
    /// Channel id.
    pub id: B256,
    /// Who opened it (pays).
    pub requester: Address,
    /// Who is paid.
    pub provider: Address,
    /// Deposit, base units.
    pub deposit: u128,
    /// Already claimed, base units.
    pub claimed: u128,
    /// An uncooperative close is running.
    pub closing: bool,
}

/// A balance proof that passed [`super::verify::check_proof`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProof {
    /// The channel, as read when the proof was checked.
    pub channel: ChannelFacts,
    /// Cumulative amount.
    pub amount: u128,
    /// The requester's 65-byte signature.
    pub signature: Vec<u8>,
}

/// Why an action failed, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Network, node down, timeouts: retried after a backoff.
    Transient(String),
    /// Refused for good (bad proof, conflict): not retried.
    Permanent(String),
}

/// What the glue must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Post our status for the deal.
    Report {
        /// Deal.
        deal_id: u64,
        /// Status.
        status: PartyStatus,
        /// Why (may be empty).
        reason: String,
    },
    /// Serve the requester on exit `exit`.
    AddPeer {
        /// Deal.
        deal_id: u64,
        /// Index of the exit in the config.
        exit: usize,
        /// Requester's WireGuard key.
        key: [u8; 32],
        /// Requester's inner address (`inner_ip_for_deal`).
        inner_ip: Ipv4Addr,
        /// The requester's endpoint, when known: the exit sends the first handshake
        /// there (NAT traversal).
        endpoint: Option<SocketAddr>,
    },
    /// The requester of a served deal reported a (new) endpoint: point the peer there
    /// and send a handshake. Its result goes to [`Core::peer_done`] (`added = true`).
    PeerEndpoint {
        /// Deal.
        deal_id: u64,
        /// Index of the exit.
        exit: usize,
        /// Requester's WireGuard key.
        key: [u8; 32],
        /// The endpoint.
        endpoint: SocketAddr,
    },
    /// Stop serving the requester.
    RemovePeer {
        /// Deal.
        deal_id: u64,
        /// Index of the exit.
        exit: usize,
        /// Requester's WireGuard key.
        key: [u8; 32],
    },
    /// Fetch the deal's latest proof and check it against the chain.
    CheckProof {
        /// Deal.
        deal_id: u64,
        /// Who must have signed it and opened the channel.
        requester: Address,
        /// Channels known to be the requester's to us, as last read: the deal's own once
        /// bound, else every open one of this requester (a proof over one of them within
        /// its known deposit is checked without a chain read).
        known_channels: Vec<ChannelFacts>,
    },
    /// Read a channel from the chain (deposit, claimed, closing) and feed the answer to
    /// [`Core::channel_read`].
    ReadChannel {
        /// Channel.
        channel_id: B256,
    },
    /// Redeem the latest proof on chain (`close` at the deal's end).
    Claim {
        /// Deal.
        deal_id: u64,
        /// The deal's exit (none for deals of a lost exit).
        exit: Option<usize>,
        /// The requester's WireGuard key. The `logHash` sent is the runtime's
        /// commitment to the logs of all the channel's deals (`connlog_store`).
        key: [u8; 32],
        /// Channel.
        channel_id: B256,
        /// Cumulative amount.
        amount: u128,
        /// The requester's signature of it.
        signature: Vec<u8>,
        /// Close the channel (refund the rest to the requester).
        close: bool,
    },
    /// Rate the requester.
    Rate {
        /// Deal.
        deal_id: u64,
        /// 1 to 5.
        score: u8,
    },
    /// Propose the same new end the requester proposed (agreeing to the extension).
    ProposeExtend {
        /// Deal.
        deal_id: u64,
        /// The new end, unix seconds.
        new_end: u64,
    },
}

/// The kinds of work tracked per deal (one in flight each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Status reports.
    Report = 0,
    /// Peer add/remove.
    Peer = 1,
    /// Proof checks.
    CheckProof = 2,
    /// Claims.
    Claim = 3,
    /// Ratings.
    Rate = 4,
    /// Extension proposals.
    Extend = 5,
}

/// Where a deal is in its life, from our side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// We accepted; waiting for a proof covering the first window.
    Accepted,
    /// The peer is (to be) served.
    Serving,
    /// Service is over (or never happened); settling: remove peer, claim, rate.
    Ended,
    /// We declined it.
    Rejected,
}

/// Timings the core applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Service starts once a verified proof covers this much of it.
    pub first_window: Duration,
    /// Payment lag tolerated.
    pub grace: Duration,
    /// Claim a channel once its unclaimed amount reaches this (base units).
    pub claim_threshold: u128,
    /// Also claim whatever is unclaimed this often (`None`: no timer).
    pub claim_interval: Option<Duration>,
    /// Channels with unclaimed proofs are read from the chain this often (to see a
    /// requester's close in time to claim).
    pub channel_refresh: Duration,
    /// How long an exchange contact (a successful poll) counts as fresh: payment is
    /// only enforced while the exchange is known reachable.
    pub fresh_for: Duration,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// One exit as the core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitSlot {
    /// Its WireGuard public key (deals name it).
    pub wg_key: [u8; 32],
    /// Deals served at once.
    pub capacity: u32,
    /// The longest rental the exit's offer accepts (bounds extensions too).
    pub max_duration: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    inflight: bool,
    attempts: u32,
    retry_at: Millis,
}

/// A read-only view of one deal (status snapshots, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DealView {
    /// Deal id.
    pub id: u64,
    /// Exit index, if the deal names one of ours.
    pub exit: Option<usize>,
    /// Stage.
    pub stage: Stage,
    /// Our status as last confirmed by the exchange.
    pub reported: PartyStatus,
    /// The requester's status.
    pub requester_status: PartyStatus,
    /// Deal status.
    pub status: DealStatus,
    /// Whether the peer is in the exit now.
    pub peer_present: bool,
    /// Requester's inner address.
    pub inner_ip: Ipv4Addr,
    /// Requester's WireGuard key.
    pub requester_wg_key: [u8; 32],
    /// The requester's wallet.
    pub requester: Address,
    /// The deal's start, unix seconds.
    pub start: u64,
    /// Paid for this deal: its latest verified cumulative amount minus `base`.
    pub paid: u128,
    /// The channel's cumulative amount where this deal's payments start (what its
    /// earlier deals reached).
    pub base: u128,
    /// Of `paid`, what is claimed on chain so far.
    pub claimed: u128,
    /// The channel is closed (or gone).
    pub closed: bool,
    /// The channel paying this deal.
    pub channel: Option<B256>,
    /// Why the last refused proof was refused.
    pub proof_rejection: Option<String>,
    /// Why service ended.
    pub end_reason: Option<String>,
    /// Whether we rated the requester.
    pub rated: bool,
    /// The score given or to give.
    pub score: Option<u8>,
    /// The deal's end as we serve it, unix seconds (moves with extensions).
    pub end: u64,
    /// The deal's value (grows with extensions).
    pub value: u128,
    /// The new end we proposed (agreeing to the requester's), until it applies.
    pub extend_proposed: Option<u64>,
}

#[derive(Debug, Clone)]
struct DealState {
    info: DealInfo,
    exit: Option<usize>,
    known: PartyStatus,
    requester: PartyStatus,
    status: DealStatus,
    rated: bool,
    proof_seen: u128,
    rejected_upto: u128,
    rejection: Option<String>,
    want: Option<(PartyStatus, String)>,
    stage: Stage,
    proof: Option<VerifiedProof>,
    serve_since: Option<Millis>,
    peer_present: bool,
    /// The channel's cumulative amount where this deal's payments start.
    base: u128,
    /// A later deal pays over this deal's channel now: this deal's account is closed.
    frozen: bool,
    /// First seen already accepted or active (the agent restarted): the deal's base on
    /// a channel we have no record of is unknown, so it is taken as 0 (generous).
    restored: bool,
    score: Option<u8>,
    end_reason: Option<String>,
    /// The requester's proposed end we mean to agree to.
    extend_to: Option<u64>,
    /// The end we proposed, as the exchange confirmed it.
    extend_sent: Option<u64>,
    /// The requester's endpoint as the exchange showed it.
    requester_endpoint: Option<SocketAddr>,
    /// The endpoint the exit was given with the peer.
    peer_endpoint: Option<SocketAddr>,
    slots: [Slot; 6],
}

/// The score a provider gives: 5 when the proofs covered the service, lower the less
/// of it was paid.
pub fn score_for(paid: u128, owed: u128) -> u8 {
    if paid >= owed {
        5
    } else if paid >= owed - owed / 4 {
        4
    } else if paid >= owed / 2 {
        3
    } else if paid > 0 {
        2
    } else {
        1
    }
}

fn later(a: PartyStatus, b: PartyStatus) -> PartyStatus {
    if a.can_move_to(b) { b } else { a }
}

impl DealState {
    fn end_ms(&self) -> Millis {
        self.info.end.saturating_mul(1000)
    }

    fn ready(&self, k: Kind, now: Millis) -> bool {
        let s = &self.slots[k as usize];
        !s.inflight && now >= s.retry_at
    }

    fn start(&mut self, k: Kind) {
        self.slots[k as usize].inflight = true;
    }

    fn succeeded(&mut self, k: Kind) {
        self.slots[k as usize] = Slot::default();
    }

    fn failed(&mut self, k: Kind, now: Millis, s: &Settings) {
        let slot = &mut self.slots[k as usize];
        slot.inflight = false;
        let factor = 1u32.checked_shl(slot.attempts.min(16)).unwrap_or(u32::MAX);
        let delay = s.retry_base.saturating_mul(factor).min(s.retry_max);
        slot.attempts = slot.attempts.saturating_add(1);
        slot.retry_at = now.saturating_add(delay.as_millis() as u64);
    }

    fn want(&mut self, status: PartyStatus, reason: &str) {
        if !self.status.is_final() && self.known.can_move_to(status) {
            self.want = Some((status, reason.to_owned()));
        }
    }

    /// Ends service: the peer goes, our final status is reported, the final claim and
    /// the rating follow.
    fn end(&mut self, status: PartyStatus, reason: &str, now: Millis) {
        if self.stage == Stage::Serving {
            let since = self.serve_since.unwrap_or(now);
            let served = now
                .saturating_sub(since)
                .min(self.end_ms().saturating_sub(since))
                / 1000;
            let owed = cost(self.info.price, served).min(self.info.value);
            let paid = self.proof.as_ref().map_or(0, |p| p.amount);
            self.score = Some(score_for(paid, owed));
            self.want(status, reason);
        }
        self.stage = Stage::Ended;
        self.end_reason = Some(reason.to_owned());
    }

    fn paid(&self) -> u128 {
        self.proof
            .as_ref()
            .map_or(0, |p| p.amount.saturating_sub(self.base))
    }

    fn view(&self, lanes: &HashMap<B256, Lane>) -> DealView {
        let lane = self.proof.as_ref().and_then(|p| lanes.get(&p.channel.id));
        let claimed = lane.map_or(0, |l| {
            l.facts.claimed.saturating_sub(self.base).min(self.paid())
        });
        DealView {
            id: self.info.id,
            exit: self.exit,
            stage: self.stage,
            reported: self.known,
            requester_status: self.requester,
            status: self.status,
            peer_present: self.peer_present,
            inner_ip: inner_ip_for_deal(self.info.id),
            requester_wg_key: self.info.requester_wg_key,
            requester: self.info.requester,
            start: self.info.start,
            paid: self.paid(),
            base: self.base,
            claimed,
            closed: lane.is_none_or(|l| l.closed) && self.proof.is_some(),
            channel: self.proof.as_ref().map(|p| p.channel.id),
            proof_rejection: self.rejection.clone(),
            end_reason: self.end_reason.clone(),
            rated: self.rated,
            score: self.score,
            end: self.info.end,
            value: self.info.value,
            extend_proposed: self.extend_sent,
        }
    }

    /// Whether the latest verified proof is worth a chain transaction: the deal was
    /// served, or the proof covered the first window. A deal that never got that far
    /// ends without touching the chain.
    fn claim_worthy(&self, first_window: Duration) -> bool {
        self.proof.as_ref().is_some_and(|p| {
            self.serve_since.is_some()
                || p.amount >= first_window_due(self.info.price, first_window, self.info.value)
        })
    }

    /// The extension terms moved our end and value (never back).
    fn extend_terms(&mut self, end: u64, value: u128) {
        if end > self.info.end {
            self.info.end = end;
            self.info.value = self.info.value.max(value);
            self.extend_to = None;
            self.extend_sent = None;
        }
    }
}

/// One payment channel as we track it: the deals it paid, one after the other.
#[derive(Debug, Clone)]
struct Lane {
    /// The deal it pays now (the latest bound).
    deal: u64,
    /// That deal's exit and requester key.
    exit: Option<usize>,
    key: [u8; 32],
    /// Facts as last read; `deposit` and `claimed` only grow.
    facts: ChannelFacts,
    /// Highest verified cumulative amount over all its deals, and its signature.
    high: u128,
    signature: Vec<u8>,
    /// Gone from the chain, closed by our claim, or refused for good.
    closed: bool,
    /// One of its deals was served or paid its first window: worth a transaction.
    worthy: bool,
    last_claim: Millis,
    last_read: Millis,
    claim: Slot,
    read: Slot,
}

impl Lane {
    fn unclaimed(&self) -> u128 {
        self.high.saturating_sub(self.facts.claimed)
    }
}

fn slot_failed(slot: &mut Slot, now: Millis, s: &Settings) {
    slot.inflight = false;
    let factor = 1u32.checked_shl(slot.attempts.min(16)).unwrap_or(u32::MAX);
    let delay = s.retry_base.saturating_mul(factor).min(s.retry_max);
    slot.attempts = slot.attempts.saturating_add(1);
    slot.retry_at = now.saturating_add(delay.as_millis() as u64);
}

/// Every deal of this provider, and the rules.
#[derive(Debug, Clone)]
pub struct Core {
    settings: Settings,
    exits: Vec<ExitSlot>,
    deals: BTreeMap<u64, DealState>,
    lanes: HashMap<B256, Lane>,
    settled: std::collections::HashSet<u64>,
    fresh_until: Millis,
}

/// How long a fully settled deal stays in view before only its id is kept.
const KEEP_SETTLED_MS: Millis = 10 * 60 * 1000;

impl Core {
    /// A core for these exits.
    pub fn new(settings: Settings, exits: Vec<ExitSlot>) -> Self {
        Self {
            settings,
            exits,
            deals: BTreeMap::new(),
            lanes: HashMap::new(),
            settled: std::collections::HashSet::new(),
            fresh_until: 0,
        }
    }

    /// Whether the deal is known (in view, or settled and forgotten).
    pub fn knows(&self, deal_id: u64) -> bool {
        self.deals.contains_key(&deal_id) || self.settled.contains(&deal_id)
    }

    /// A view of one deal.
    pub fn deal(&self, deal_id: u64) -> Option<DealView> {
        self.deals.get(&deal_id).map(|d| d.view(&self.lanes))
    }

    /// Views of every deal, by id.
    pub fn deals(&self) -> Vec<DealView> {
        self.deals.values().map(|d| d.view(&self.lanes)).collect()
    }

    /// Sets the claim threshold (the runtime follows the gas price).
    pub fn set_claim_threshold(&mut self, threshold: u128) {
        self.settings.claim_threshold = threshold;
    }

    /// Unclaimed amount (verified, not yet claimed) summed over open channels.
    pub fn unclaimed(&self) -> u128 {
        self.lanes
            .values()
            .filter(|l| !l.closed)
            .map(Lane::unclaimed)
            .fold(0u128, u128::saturating_add)
    }

    /// The exchange answered (a poll succeeded) at `now`: payment may be enforced for
    /// a while, since the latest proofs are known.
    pub fn exchange_contact(&mut self, now: Millis) {
        self.fresh_until = now.saturating_add(self.settings.fresh_for.as_millis() as u64);
    }

    fn live_on(&self, exit: usize) -> usize {
        self.deals
            .values()
            .filter(|d| d.exit == Some(exit) && matches!(d.stage, Stage::Accepted | Stage::Serving))
            .count()
    }

    /// Merges what the exchange shows of a deal (idempotent; statuses only move
    /// forward).
    pub fn observe(&mut self, obs: Observation, now: Millis) {
        let id = obs.info.id;
        if self.settled.contains(&id) {
            return;
        }
        if let Some(d) = self.deals.get_mut(&id) {
            d.known = later(d.known, obs.provider_status);
            d.requester = later(d.requester, obs.requester_status);
            if !d.status.is_final() {
                d.status = obs.status;
            }
            d.proof_seen = d.proof_seen.max(obs.proof_amount.unwrap_or(0));
            d.rated |= obs.rated_by_provider;
            d.extend_terms(obs.info.end, obs.info.value);
            if obs.requester_endpoint.is_some() {
                d.requester_endpoint = obs.requester_endpoint;
            }
            if obs.provider_new_end.is_some() {
                d.extend_sent = obs.provider_new_end;
            }
            if d.want
                .as_ref()
                .is_some_and(|(w, _)| !d.known.can_move_to(*w))
            {
                d.want = None;
            }
            self.react(id, now);
            if let Some(n) = obs.requester_new_end {
                self.extend_proposed(id, false, n, now);
            }
            return;
        }
        let requester_new_end = obs.requester_new_end;
        let exit = self
            .exits
            .iter()
            .position(|x| x.wg_key == obs.info.provider_wg_key);
        let mut d = DealState {
            exit,
            known: obs.provider_status,
            requester: obs.requester_status,
            status: obs.status,
            rated: obs.rated_by_provider,
            proof_seen: obs.proof_amount.unwrap_or(0),
            rejected_upto: 0,
            rejection: None,
            want: None,
            stage: Stage::Ended,
            proof: None,
            serve_since: None,
            peer_present: false,
            base: 0,
            frozen: false,
            restored: matches!(
                obs.provider_status,
                PartyStatus::Accepted | PartyStatus::Active
            ),
            score: None,
            end_reason: None,
            extend_to: None,
            extend_sent: obs.provider_new_end,
            requester_endpoint: obs.requester_endpoint,
            peer_endpoint: None,
            slots: Default::default(),
            info: obs.info,
        };
        let ended = now >= d.end_ms();
        if d.status.is_final() {
            d.end_reason = Some(format!("deal already {}", d.status.as_str()));
        } else {
            match d.known {
                PartyStatus::Pending => match exit {
                    None => {
                        d.stage = Stage::Rejected;
                        d.want(PartyStatus::Rejected, "no exit with this WireGuard key");
                    }
                    Some(_) if ended => d.end_reason = Some("matched after its end".into()),
                    Some(x) => {
                        let cap = self.exits.get(x).map_or(0, |e| e.capacity) as usize;
                        if self.live_on(x) >= cap {
                            d.stage = Stage::Rejected;
                            d.want(PartyStatus::Rejected, "exit at capacity");
                        } else {
                            d.stage = Stage::Accepted;
                            d.want(PartyStatus::Accepted, "");
                        }
                    }
                },
                PartyStatus::Accepted | PartyStatus::Active => {
                    if exit.is_none() {
                        d.want(
                            PartyStatus::Failed,
                            "exit restarted with another WireGuard key",
                        );
                        d.end_reason = Some("exit key changed".into());
                    } else if ended {
                        d.want(PartyStatus::Completed, "");
                        d.end_reason = Some("ended while the agent was away".into());
                    } else {
                        d.stage = Stage::Accepted;
                    }
                }
                _ => d.end_reason = Some("already reported final".into()),
            }
        }
        self.deals.insert(id, d);
        self.react(id, now);
        if let Some(n) = requester_new_end {
            self.extend_proposed(id, false, n, now);
        }
    }

    /// A known deal's status changed on the exchange (events carry the new status).
    pub fn status_changed(&mut self, deal_id: u64, status: DealStatus, now: Millis) {
        if let Some(d) = self.deals.get_mut(&deal_id)
            && !d.status.is_final()
        {
            d.status = status;
            self.react(deal_id, now);
        }
    }

    /// A side reported a status (from the event stream).
    pub fn party_reported(
        &mut self,
        deal_id: u64,
        provider: bool,
        status: PartyStatus,
        now: Millis,
    ) {
        if let Some(d) = self.deals.get_mut(&deal_id) {
            if provider {
                d.known = later(d.known, status);
                if d.want
                    .as_ref()
                    .is_some_and(|(w, _)| !d.known.can_move_to(*w))
                {
                    d.want = None;
                }
            } else {
                d.requester = later(d.requester, status);
            }
            self.react(deal_id, now);
        }
    }

    /// The requester reported its WireGuard endpoint (event stream).
    pub fn requester_endpoint(&mut self, deal_id: u64, endpoint: SocketAddr, now: Millis) {
        if let Some(d) = self.deals.get_mut(&deal_id) {
            d.requester_endpoint = Some(endpoint);
            self.react(deal_id, now);
        }
    }

    /// A side proposed to extend the deal to `new_end` (event stream or poll). We agree
    /// to the requester's proposal when we serve the deal, its payment is current, the
    /// exit is still ours and the new length is within the exit's longest rental.
    pub fn extend_proposed(&mut self, deal_id: u64, provider: bool, new_end: u64, now: Millis) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        if provider {
            d.extend_sent = Some(new_end);
            return;
        }
        if d.extend_sent == Some(new_end) || d.extend_to == Some(new_end) {
            return;
        }
        let max = d
            .exit
            .and_then(|x| self.exits.get(x))
            .map_or(0, |x| x.max_duration.as_secs());
        let served = Duration::from_millis(now.saturating_sub(d.serve_since.unwrap_or(now)));
        let refusal = if d.stage != Stage::Serving || d.status.is_final() {
            Some("the deal is not being served")
        } else if !payment_covers(d.info.price, d.paid(), served, s.grace) {
            Some("payment is behind")
        } else if new_end <= d.info.end {
            Some("the new end is not after the current end")
        } else if new_end.saturating_sub(d.info.start) > max {
            Some("longer than the exit's longest rental")
        } else {
            None
        };
        match refusal {
            Some(why) => {
                tracing::info!(
                    deal = deal_id,
                    new_end,
                    reason = why,
                    "extension not agreed"
                );
                d.extend_to = None;
            }
            None => d.extend_to = Some(new_end),
        }
    }

    /// Both sides agreed: the deal now ends at `end` and is worth `value`.
    pub fn extended(&mut self, deal_id: u64, end: u64, value: u128) {
        if let Some(d) = self.deals.get_mut(&deal_id) {
            d.extend_terms(end, value);
        }
    }

    /// Result of an [`Action::ProposeExtend`].
    pub fn extend_done(&mut self, deal_id: u64, new_end: u64, r: Result<(), Failure>, now: Millis) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        match r {
            Ok(()) => {
                d.succeeded(Kind::Extend);
                if d.info.end < new_end {
                    d.extend_sent = Some(new_end);
                }
                if d.extend_to == Some(new_end) {
                    d.extend_to = None;
                }
            }
            Err(Failure::Transient(_)) => d.failed(Kind::Extend, now, &s),
            Err(Failure::Permanent(e)) => {
                tracing::warn!(deal = deal_id, new_end, error = %e, "extension refused");
                d.succeeded(Kind::Extend);
                if d.extend_to == Some(new_end) {
                    d.extend_to = None;
                }
            }
        }
    }

    /// The exchange stored a proof of `amount` (from the event stream).
    pub fn proof_posted(&mut self, deal_id: u64, amount: u128) {
        if let Some(d) = self.deals.get_mut(&deal_id) {
            d.proof_seen = d.proof_seen.max(amount);
        }
    }

    fn react(&mut self, id: u64, now: Millis) {
        let Some(d) = self.deals.get_mut(&id) else {
            return;
        };
        let left = matches!(d.requester, PartyStatus::Completed | PartyStatus::Failed);
        match d.stage {
            Stage::Serving if left || d.status.is_final() => {
                let why = if left {
                    "requester left"
                } else {
                    "deal closed by the exchange"
                };
                d.end(PartyStatus::Completed, why, now);
            }
            Stage::Accepted if left || d.status.is_final() => {
                d.stage = Stage::Ended;
                d.end_reason = Some("ended before any valid payment".into());
            }
            _ => {}
        }
    }

    /// The actions due at `now`; each is marked in flight until its result is fed back.
    pub fn actions(&mut self, now: Millis) -> Vec<Action> {
        let s = self.settings;
        let enforce = now <= self.fresh_until;
        let mut out = Vec::new();
        let lanes = &self.lanes;
        for (&id, d) in self.deals.iter_mut() {
            // Clocks.
            if d.stage == Stage::Accepted && now >= d.end_ms() {
                d.stage = Stage::Ended;
                d.end_reason = Some("no valid payment before the end".into());
            }
            if d.stage == Stage::Serving {
                if now >= d.end_ms() {
                    d.end(PartyStatus::Completed, "", now);
                } else if d.peer_present
                    && enforce
                    && !d.slots[Kind::CheckProof as usize].inflight
                    && !(d.proof_seen > d.paid() && d.proof_seen > d.rejected_upto)
                {
                    // A newer proof waiting to be checked may well cover it.
                    let since = d.serve_since.unwrap_or(now);
                    let served = Duration::from_millis(now.saturating_sub(since));
                    if !payment_covers(d.info.price, d.paid(), served, s.grace) {
                        d.end(PartyStatus::Failed, "payment stopped", now);
                    }
                }
            }
            // Report.
            if let Some((status, reason)) = d.want.clone() {
                if d.status.is_final() || !d.known.can_move_to(status) {
                    d.want = None;
                } else if d.ready(Kind::Report, now) {
                    d.start(Kind::Report);
                    out.push(Action::Report {
                        deal_id: id,
                        status,
                        reason,
                    });
                }
            }
            // Extension.
            if let Some(new_end) = d.extend_to {
                if d.stage != Stage::Serving || d.status.is_final() || new_end <= d.info.end {
                    d.extend_to = None;
                } else if d.ready(Kind::Extend, now) {
                    d.start(Kind::Extend);
                    out.push(Action::ProposeExtend {
                        deal_id: id,
                        new_end,
                    });
                }
            }
            // Proofs.
            let unverified = d.proof_seen > d.paid() && d.proof_seen > d.rejected_upto;
            let bound = d.proof.as_ref().map(|p| p.channel.id);
            let wants_proof = match d.stage {
                Stage::Accepted | Stage::Serving => true,
                Stage::Ended => {
                    !d.frozen && bound.is_none_or(|c| lanes.get(&c).is_some_and(|l| !l.closed))
                }
                Stage::Rejected => false,
            };
            if unverified && wants_proof && d.ready(Kind::CheckProof, now) {
                d.start(Kind::CheckProof);
                let requester = d.info.requester;
                let known_channels = lanes
                    .iter()
                    .filter(|(c, l)| match bound {
                        Some(b) => **c == b,
                        None => !l.closed && !l.facts.closing && l.facts.requester == requester,
                    })
                    .map(|(_, l)| l.facts.clone())
                    .collect();
                out.push(Action::CheckProof {
                    deal_id: id,
                    requester,
                    known_channels,
                });
            }
            // Peer.
            if let Some(exit) = d.exit {
                let want_peer = d.stage == Stage::Serving;
                let moved = want_peer
                    && d.peer_present
                    && d.requester_endpoint.is_some()
                    && d.requester_endpoint != d.peer_endpoint;
                if moved && d.ready(Kind::Peer, now) {
                    d.start(Kind::Peer);
                    d.peer_endpoint = d.requester_endpoint;
                    if let Some(endpoint) = d.requester_endpoint {
                        out.push(Action::PeerEndpoint {
                            deal_id: id,
                            exit,
                            key: d.info.requester_wg_key,
                            endpoint,
                        });
                    }
                } else if want_peer != d.peer_present && d.ready(Kind::Peer, now) {
                    d.start(Kind::Peer);
                    if want_peer {
                        d.peer_endpoint = d.requester_endpoint;
                    }
                    out.push(if want_peer {
                        Action::AddPeer {
                            deal_id: id,
                            exit,
                            key: d.info.requester_wg_key,
                            inner_ip: inner_ip_for_deal(id),
                            endpoint: d.requester_endpoint,
                        }
                    } else {
                        Action::RemovePeer {
                            deal_id: id,
                            exit,
                            key: d.info.requester_wg_key,
                        }
                    });
                }
            }
            // Rating.
            if d.stage == Stage::Ended
                && d.status.is_final()
                && !d.rated
                && let Some(score) = d.score
                && d.ready(Kind::Rate, now)
            {
                d.start(Kind::Rate);
                out.push(Action::Rate { deal_id: id, score });
            }
        }
        // Channels: lazy claims, and reads to see a requester's close in time.
        let refresh = s.channel_refresh.as_millis() as u64;
        let mut ids: Vec<&B256> = self.lanes.keys().collect();
        ids.sort_unstable();
        let ids: Vec<B256> = ids.into_iter().copied().collect();
        for cid in ids {
            let Some(l) = self.lanes.get_mut(&cid) else {
                continue;
            };
            if l.closed || !l.worthy {
                continue;
            }
            let unclaimed = l.unclaimed();
            // The requester is closing: claim the latest proof and close at once (a
            // closing claim may repeat the amount already claimed).
            let close = l.facts.closing;
            let timer = s
                .claim_interval
                .is_some_and(|i| now.saturating_sub(l.last_claim) >= i.as_millis() as u64);
            let due = close || (unclaimed > 0 && (unclaimed >= s.claim_threshold.max(1) || timer));
            if due && !l.claim.inflight && now >= l.claim.retry_at {
                l.claim.inflight = true;
                out.push(Action::Claim {
                    deal_id: l.deal,
                    exit: l.exit,
                    key: l.key,
                    channel_id: cid,
                    amount: l.high,
                    signature: l.signature.clone(),
                    close,
                });
            }
            if !close
                && now.saturating_sub(l.last_read) >= refresh
                && !l.read.inflight
                && now >= l.read.retry_at
            {
                l.read.inflight = true;
                l.last_read = now;
                out.push(Action::ReadChannel { channel_id: cid });
            }
        }
        // Deals with nothing left to do are forgotten after a while (their id is kept,
        // so polls and replayed events do not bring them back). A deal's payments are
        // settled once claimed, once a later deal took its channel over (that deal's
        // claims cover them), or once the channel is gone.
        let lanes = &self.lanes;
        let done: Vec<u64> = self
            .deals
            .iter()
            .filter(|(_, d)| {
                let paid_up = d.frozen
                    || !d.claim_worthy(s.first_window)
                    || d.proof.as_ref().is_none_or(|p| {
                        lanes
                            .get(&p.channel.id)
                            .is_none_or(|l| l.closed || l.facts.claimed >= p.amount)
                    });
                matches!(d.stage, Stage::Ended | Stage::Rejected)
                    && d.status.is_final()
                    && !d.peer_present
                    && d.want.is_none()
                    && paid_up
                    && (d.rated || d.score.is_none())
                    && d.slots.iter().all(|s| !s.inflight)
                    && now >= d.end_ms().saturating_add(KEEP_SETTLED_MS)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            self.deals.remove(&id);
            self.settled.insert(id);
        }
        // Closed channels no deal refers to any more are forgotten.
        let deals = &self.deals;
        self.lanes.retain(|cid, l| {
            !l.closed
                || l.claim.inflight
                || deals
                    .values()
                    .any(|d| d.proof.as_ref().is_some_and(|p| p.channel.id == *cid))
        });
        out
    }

    /// Result of a [`Action::Report`].
    pub fn report_done(
        &mut self,
        deal_id: u64,
        status: PartyStatus,
        r: Result<(), Failure>,
        now: Millis,
    ) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        match r {
            Ok(()) => {
                d.succeeded(Kind::Report);
                d.known = later(d.known, status);
                if d.want
                    .as_ref()
                    .is_some_and(|(w, _)| !d.known.can_move_to(*w))
                {
                    d.want = None;
                }
            }
            Err(Failure::Transient(_)) => d.failed(Kind::Report, now, &s),
            Err(Failure::Permanent(e)) => {
                tracing::warn!(deal = deal_id, status = status.as_str(), error = %e, "report refused");
                d.succeeded(Kind::Report);
                if d.want.as_ref().is_some_and(|(w, _)| *w == status) {
                    d.want = None;
                }
            }
        }
    }

    /// Result of [`Action::AddPeer`] (`added = true`) or [`Action::RemovePeer`].
    pub fn peer_done(&mut self, deal_id: u64, added: bool, r: Result<(), Failure>, now: Millis) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        match r {
            Ok(()) => {
                d.succeeded(Kind::Peer);
                d.peer_present = added;
                if added && d.stage == Stage::Serving {
                    d.want(PartyStatus::Active, "");
                }
            }
            Err(Failure::Transient(_)) => d.failed(Kind::Peer, now, &s),
            Err(Failure::Permanent(e)) => {
                d.succeeded(Kind::Peer);
                if added {
                    d.stage = Stage::Ended;
                    d.want(PartyStatus::Failed, "exit cannot serve this peer");
                    d.end_reason = Some(e);
                } else {
                    d.peer_present = false;
                }
            }
        }
    }

    /// Result of [`Action::CheckProof`].
    pub fn proof_checked(&mut self, deal_id: u64, r: Result<VerifiedProof, Failure>, now: Millis) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        let v = match r {
            Ok(v) => v,
            Err(Failure::Transient(_)) => {
                d.failed(Kind::CheckProof, now, &s);
                return;
            }
            Err(Failure::Permanent(why)) => {
                d.succeeded(Kind::CheckProof);
                tracing::warn!(deal = deal_id, reason = %why, "balance proof refused");
                d.rejected_upto = d.proof_seen;
                d.rejection = Some(why);
                return;
            }
        };
        d.succeeded(Kind::CheckProof);
        d.proof_seen = d.proof_seen.max(v.amount);
        let refuse = |d: &mut DealState, why: String| {
            d.rejected_upto = d.proof_seen;
            d.rejection = Some(why);
        };
        if let Some(p) = &d.proof
            && p.channel.id != v.channel.id
        {
            refuse(d, format!("deal is paid over channel {}", p.channel.id));
            return;
        }
        if d.frozen {
            // A later deal pays over this channel now; its payments cover ours.
            return;
        }
        let restored = d.restored;
        let first_bind = d.proof.is_none();
        // The deal the channel paid before, if another one.
        let previous = self
            .lanes
            .get(&v.channel.id)
            .map(|l| l.deal)
            .filter(|&o| o != deal_id);
        if first_bind {
            if let Some(other) = previous
                && self
                    .deals
                    .get(&other)
                    .is_some_and(|o| matches!(o.stage, Stage::Accepted | Stage::Serving))
            {
                let Some(d) = self.deals.get_mut(&deal_id) else {
                    return;
                };
                refuse(
                    d,
                    format!("channel {} still pays deal {other}", v.channel.id),
                );
                return;
            }
            // Where this deal's payments start: above everything the channel's earlier
            // deals reached (and anything claimed on chain we did not see).
            let base = match self.lanes.get(&v.channel.id) {
                Some(l) => l.high.max(l.facts.claimed).max(v.channel.claimed),
                None if restored => 0,
                None => v.channel.claimed,
            };
            let Some(d) = self.deals.get_mut(&deal_id) else {
                return;
            };
            if v.amount <= base {
                refuse(
                    d,
                    format!(
                        "cumulative amount {} does not pass the {base} channel {} already carries",
                        v.amount, v.channel.id
                    ),
                );
                return;
            }
            d.base = base;
            if let Some(other) = previous
                && let Some(o) = self.deals.get_mut(&other)
            {
                o.frozen = true;
            }
        }
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        if v.amount <= d.base.saturating_add(d.paid()) && !first_bind {
            return;
        }
        let lane = self.lanes.entry(v.channel.id).or_insert_with(|| Lane {
            deal: deal_id,
            exit: d.exit,
            key: d.info.requester_wg_key,
            facts: v.channel.clone(),
            high: 0,
            signature: Vec::new(),
            closed: false,
            worthy: false,
            last_claim: now,
            last_read: now,
            claim: Slot::default(),
            read: Slot::default(),
        });
        lane.deal = deal_id;
        lane.exit = d.exit;
        lane.key = d.info.requester_wg_key;
        lane.facts.deposit = lane.facts.deposit.max(v.channel.deposit);
        lane.facts.claimed = lane.facts.claimed.max(v.channel.claimed);
        lane.facts.closing |= v.channel.closing;
        if v.amount > lane.high {
            lane.high = v.amount;
            lane.signature.clone_from(&v.signature);
        }
        d.proof = Some(v);
        d.rejection = None;
        let first = first_window_due(d.info.price, s.first_window, d.info.value);
        if d.stage == Stage::Accepted && d.paid() >= first && now < d.end_ms() {
            d.stage = Stage::Serving;
            d.serve_since = Some(now);
        }
        lane.worthy |= d.claim_worthy(s.first_window);
    }

    /// Result of an [`Action::Claim`] on `channel_id`: `channel_gone` when the chain no
    /// longer has the channel (closed by the claim or otherwise).
    pub fn claim_done(
        &mut self,
        channel_id: B256,
        amount: u128,
        close: bool,
        r: Result<bool, Failure>,
        now: Millis,
    ) {
        let s = self.settings;
        let Some(l) = self.lanes.get_mut(&channel_id) else {
            return;
        };
        match r {
            Ok(channel_gone) => {
                l.claim = Slot::default();
                l.facts.claimed = l.facts.claimed.max(amount);
                l.last_claim = now;
                if close || channel_gone {
                    l.closed = true;
                }
            }
            Err(Failure::Transient(_)) => slot_failed(&mut l.claim, now, &s),
            Err(Failure::Permanent(e)) => {
                tracing::warn!(channel = %channel_id, error = %e, "claim refused for good");
                l.claim = Slot::default();
                l.closed = true;
            }
        }
    }

    /// Result of an [`Action::ReadChannel`]: the channel as the chain has it now
    /// (`None`: gone). A top-up raises the known deposit; a requester's close makes
    /// the next [`Core::actions`] claim (and close) at once.
    pub fn channel_read(
        &mut self,
        channel_id: B256,
        r: Result<Option<ChannelFacts>, Failure>,
        now: Millis,
    ) {
        let s = self.settings;
        let Some(l) = self.lanes.get_mut(&channel_id) else {
            return;
        };
        match r {
            Ok(Some(f)) => {
                l.read = Slot::default();
                l.facts.deposit = l.facts.deposit.max(f.deposit);
                l.facts.claimed = l.facts.claimed.max(f.claimed);
                l.facts.closing |= f.closing;
            }
            Ok(None) => {
                l.read = Slot::default();
                l.closed = true;
            }
            Err(Failure::Transient(_)) => slot_failed(&mut l.read, now, &s),
            Err(Failure::Permanent(_)) => l.read = Slot::default(),
        }
    }

    /// Result of an [`Action::Rate`].
    pub fn rate_done(&mut self, deal_id: u64, r: Result<(), Failure>, now: Millis) {
        let s = self.settings;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return;
        };
        match r {
            Ok(()) => {
                d.succeeded(Kind::Rate);
                d.rated = true;
            }
            Err(Failure::Transient(_)) => d.failed(Kind::Rate, now, &s),
            Err(Failure::Permanent(e)) => {
                tracing::warn!(deal = deal_id, error = %e, "rating refused");
                d.succeeded(Kind::Rate);
                d.rated = true;
            }
        }
    }

    /// The claims to make at shutdown: every open channel's unclaimed proof (the
    /// channel stays open for the requester's next deals).
    pub fn claimable(&self) -> Vec<Action> {
        let mut v: Vec<(&B256, &Lane)> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.closed && l.worthy && l.unclaimed() > 0)
            .collect();
        v.sort_unstable_by_key(|(c, _)| **c);
        v.into_iter()
            .map(|(c, l)| Action::Claim {
                deal_id: l.deal,
                exit: l.exit,
                key: l.key,
                channel_id: *c,
                amount: l.high,
                signature: l.signature.clone(),
                close: false,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PRICE: u128 = 10;
    const T0: Millis = 1_000_000_000; // unix ms
    const KEY: [u8; 32] = [1; 32];
    const MAX_S: u64 = 3_600;

    fn settings() -> Settings {
        Settings {
            first_window: Duration::from_secs(5),
            grace: Duration::from_secs(3),
            claim_threshold: 1_000_000,
            claim_interval: None,
            channel_refresh: Duration::from_secs(7200),
            fresh_for: Duration::from_secs(3600),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(8),
        }
    }

    fn core(capacity: u32) -> Core {
        let mut c = Core::new(
            settings(),
            vec![ExitSlot {
                wg_key: KEY,
                capacity,
                max_duration: Duration::from_secs(MAX_S),
            }],
        );
        c.exchange_contact(T0);
        c
    }

    fn obs(id: u64, duration: u64) -> Observation {
        Observation {
            info: DealInfo {
                id,
                requester: Address::repeat_byte(0xaa),
                exit_address: "127.0.0.2".parse().unwrap(),
                provider_wg_key: KEY,
                requester_wg_key: [id as u8; 32],
                price: PRICE,
                value: PRICE * u128::from(duration),
                start: T0 / 1000,
                end: T0 / 1000 + duration,
            },
            provider_status: PartyStatus::Pending,
            requester_status: PartyStatus::Pending,
            status: DealStatus::Matched,
            proof_amount: None,
            rated_by_provider: false,
            provider_new_end: None,
            requester_new_end: None,
            requester_endpoint: None,
        }
    }

    fn channel(n: u8) -> ChannelFacts {
        ChannelFacts {
            id: B256::repeat_byte(n),
            requester: Address::repeat_byte(0xaa),
            provider: Address::repeat_byte(0xbb),
            deposit: 1_000_000,
            claimed: 0,
            closing: false,
        }
    }

    fn proof(n: u8, amount: u128) -> VerifiedProof {
        VerifiedProof {
            channel: channel(n),
            amount,
            signature: vec![1; 65],
        }
    }

    /// Runs actions, answering each with success; returns them.
    fn settle(c: &mut Core, now: Millis) -> Vec<Action> {
        let acts = c.actions(now);
        for a in &acts {
            match a {
                Action::Report {
                    deal_id, status, ..
                } => c.report_done(*deal_id, *status, Ok(()), now),
                Action::AddPeer { deal_id, .. } | Action::PeerEndpoint { deal_id, .. } => {
                    c.peer_done(*deal_id, true, Ok(()), now)
                }
                Action::RemovePeer { deal_id, .. } => c.peer_done(*deal_id, false, Ok(()), now),
                Action::Claim {
                    channel_id,
                    amount,
                    close,
                    ..
                } => c.claim_done(*channel_id, *amount, *close, Ok(*close), now),
                Action::ReadChannel { .. } => {}
                Action::Rate { deal_id, .. } => c.rate_done(*deal_id, Ok(()), now),
                Action::ProposeExtend { deal_id, new_end } => {
                    c.extend_done(*deal_id, *new_end, Ok(()), now)
                }
                Action::CheckProof { .. } => {}
            }
        }
        acts
    }

    fn reports(acts: &[Action]) -> Vec<PartyStatus> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Report { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }

    /// NAT traversal: an endpoint known before service goes with the peer; one
    /// reported while served (or changed) re-points the peer, once per change.
    #[test]
    fn requester_endpoint_goes_to_the_exit() {
        let ep: SocketAddr = "198.51.100.4:40000".parse().unwrap();
        let ep2: SocketAddr = "198.51.100.4:40001".parse().unwrap();
        let serve = |c: &mut Core, id: u64| {
            settle(c, T0);
            c.proof_posted(id, 50);
            settle(c, T0 + 100);
            c.proof_checked(id, Ok(proof(id as u8, 50)), T0 + 100);
            settle(c, T0 + 100)
        };
        let mut c = core(2);
        let mut o = obs(7, 20);
        o.requester_endpoint = Some(ep);
        c.observe(o, T0);
        let a = serve(&mut c, 7);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::AddPeer { endpoint: Some(e), .. } if *e == ep)),
            "{a:?}"
        );
        assert!(
            !settle(&mut c, T0 + 200)
                .iter()
                .any(|a| matches!(a, Action::PeerEndpoint { .. }))
        );

        c.observe(obs(8, 20), T0);
        let a = serve(&mut c, 8);
        assert!(a.iter().any(|a| matches!(
            a,
            Action::AddPeer {
                deal_id: 8,
                endpoint: None,
                ..
            }
        )));
        c.requester_endpoint(8, ep2, T0 + 300);
        let a = settle(&mut c, T0 + 300);
        assert!(
            a.iter().any(
                |a| matches!(a, Action::PeerEndpoint { deal_id: 8, endpoint, .. } if *endpoint == ep2)
            ),
            "{a:?}"
        );
        c.requester_endpoint(8, ep2, T0 + 400);
        assert!(
            !settle(&mut c, T0 + 400)
                .iter()
                .any(|a| matches!(a, Action::PeerEndpoint { .. }))
        );
    }

    #[test]
    fn happy_path_accept_serve_end_claim_rate() {
        let mut c = core(1);
        c.observe(obs(7, 20), T0);
        assert_eq!(reports(&settle(&mut c, T0)), vec![PartyStatus::Accepted]);
        // Nothing to do until a proof arrives; replays change nothing.
        c.observe(obs(7, 20), T0 + 10);
        assert!(settle(&mut c, T0 + 10).is_empty());
        // A proof short of the first window does not open the tunnel.
        c.proof_posted(7, 49);
        let a = settle(&mut c, T0 + 100);
        assert!(matches!(a[..], [Action::CheckProof { .. }]));
        c.proof_checked(7, Ok(proof(1, 49)), T0 + 100);
        assert!(settle(&mut c, T0 + 100).is_empty());
        c.proof_posted(7, 50);
        settle(&mut c, T0 + 200);
        c.proof_checked(7, Ok(proof(1, 50)), T0 + 200);
        let a = settle(&mut c, T0 + 200);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::AddPeer { exit: 0, .. }))
        );
        let a = settle(&mut c, T0 + 200);
        assert_eq!(reports(&a), vec![PartyStatus::Active]);
        // Proofs keep up: served 10 s, paid 150 (covers 15 s).
        c.proof_posted(7, 150);
        let a = settle(&mut c, T0 + 10_200);
        assert!(matches!(a[..], [Action::CheckProof { .. }]));
        c.proof_checked(7, Ok(proof(1, 150)), T0 + 10_200);
        c.proof_posted(7, 200);
        settle(&mut c, T0 + 15_000);
        c.proof_checked(7, Ok(proof(1, 200)), T0 + 15_000);
        assert!(settle(&mut c, T0 + 19_000).is_empty());
        // The end: remove, report completed, then the closing claim.
        let a = settle(&mut c, T0 + 20_000);
        assert!(a.iter().any(|a| matches!(a, Action::RemovePeer { .. })));
        assert_eq!(reports(&a), vec![PartyStatus::Completed]);
        // Claims are lazy: 200 is under the threshold, so nothing goes on chain yet.
        let a = settle(&mut c, T0 + 20_000);
        assert!(
            !a.iter().any(|a| matches!(a, Action::Claim { .. })),
            "{a:?}"
        );
        // Rating waits for the deal to be final.
        assert!(settle(&mut c, T0 + 21_000).is_empty());
        c.status_changed(7, DealStatus::Completed, T0 + 22_000);
        let a = settle(&mut c, T0 + 22_000);
        assert_eq!(
            a,
            vec![Action::Rate {
                deal_id: 7,
                score: 5
            }]
        );
        assert!(settle(&mut c, T0 + 30_000).is_empty());
        // At shutdown the channel's unclaimed proof is claimed; the channel stays open.
        let claims = c.claimable();
        assert!(matches!(
            claims[..],
            [Action::Claim {
                deal_id: 7,
                amount: 200,
                close: false,
                ..
            }]
        ));
        c.claim_done(B256::repeat_byte(1), 200, false, Ok(false), T0 + 30_000);
        assert!(c.claimable().is_empty());
        let v = c.deal(7).unwrap();
        assert!(!v.closed && v.rated && !v.peer_present);
        assert_eq!(v.claimed, 200);
        // Ten minutes after the end only the id is kept; a poll does not revive it.
        settle(&mut c, T0 + 20_000 + KEEP_SETTLED_MS);
        assert!(c.deal(7).is_none() && c.knows(7));
        let mut o = obs(7, 20);
        o.status = DealStatus::Completed;
        o.proof_amount = Some(200);
        c.observe(o, T0 + 20_000 + KEEP_SETTLED_MS);
        assert!(settle(&mut c, T0 + 20_000 + KEEP_SETTLED_MS).is_empty());
        assert!(c.deal(7).is_none());
    }

    #[test]
    fn capacity_rejects_the_extra_deal() {
        let mut c = core(1);
        c.observe(obs(1, 20), T0);
        c.observe(obs(2, 20), T0);
        let a = settle(&mut c, T0);
        assert_eq!(
            reports(&a),
            vec![PartyStatus::Accepted, PartyStatus::Rejected]
        );
        let mut unknown = obs(3, 20);
        unknown.info.provider_wg_key = [9; 32];
        c.observe(unknown, T0);
        assert_eq!(reports(&settle(&mut c, T0)), vec![PartyStatus::Rejected]);
    }

    #[test]
    fn payment_stall_removes_the_peer_after_grace() {
        let mut c = serving(50);
        // 50 covers 5 s; grace 3 s: fine at 8.9 s, failed at 9 s.
        assert!(settle(&mut c, T0 + 8_900).is_empty());
        let a = settle(&mut c, T0 + 9_000);
        assert!(a.iter().any(|a| matches!(a, Action::RemovePeer { .. })));
        assert_eq!(reports(&a), vec![PartyStatus::Failed]);
        let Action::Report { reason, .. } = a
            .iter()
            .find(|a| matches!(a, Action::Report { .. }))
            .unwrap()
        else {
            unreachable!()
        };
        assert_eq!(reason, "payment stopped");
        assert!(matches!(
            c.claimable()[..],
            [Action::Claim {
                amount: 50,
                close: false,
                ..
            }]
        ));
        c.status_changed(1, DealStatus::Terminated, T0 + 9_500);
        let a = settle(&mut c, T0 + 9_500);
        assert!(matches!(a[..], [Action::Rate { score, .. }] if score < 5));
    }

    #[test]
    fn payment_is_not_enforced_while_the_exchange_is_unreachable() {
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        settle(&mut c, T0);
        settle(&mut c, T0);
        let mut c2 = c.clone();
        c2.fresh_until = T0 + 1000;
        assert!(
            settle(&mut c2, T0 + 20_000).is_empty(),
            "exchange stale: keep serving"
        );
        c2.exchange_contact(T0 + 20_000);
        assert!(!settle(&mut c2, T0 + 20_000).is_empty());
    }

    #[test]
    fn a_refused_proof_never_serves_and_is_not_rechecked() {
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        c.proof_posted(1, 500);
        settle(&mut c, T0);
        c.proof_checked(1, Err(Failure::Permanent("wrong signer".into())), T0);
        assert!(settle(&mut c, T0 + 1000).is_empty());
        assert_eq!(
            c.deal(1).unwrap().proof_rejection.as_deref(),
            Some("wrong signer")
        );
        // A newer proof is checked again.
        c.proof_posted(1, 600);
        assert!(matches!(
            settle(&mut c, T0 + 2000)[..],
            [Action::CheckProof { .. }]
        ));
    }

    /// Channel reuse: deal 2 pays over deal 1's channel once deal 1 is over; its
    /// payments are what the channel's cumulative amount adds above deal 1's last proof
    /// (exact per-deal accounting), a proof that adds nothing is refused, and deal 1's
    /// later proofs no longer count for it. One claim covers both deals.
    #[test]
    fn a_channel_carries_deal_after_deal_with_exact_accounting() {
        let mut c = core(2);
        c.observe(obs(1, 20), T0);
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        settle(&mut c, T0);
        c.proof_posted(1, 200);
        settle(&mut c, T0 + 15_000);
        c.proof_checked(1, Ok(proof(1, 200)), T0 + 15_000);
        settle(&mut c, T0 + 20_000); // deal 1 ends
        assert_eq!(c.deal(1).unwrap().stage, Stage::Ended);

        let mut o = obs(2, 20);
        o.info.start = T0 / 1000 + 20;
        o.info.end = T0 / 1000 + 40;
        c.observe(o, T0 + 20_000);
        settle(&mut c, T0 + 20_000);
        // Not above what the channel already carries: refused, not served.
        c.proof_posted(2, 200);
        let a = settle(&mut c, T0 + 20_100);
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::CheckProof { deal_id: 2, known_channels, .. } if known_channels.len() == 1
            )),
            "the known channel goes with the check: {a:?}"
        );
        c.proof_checked(2, Ok(proof(1, 200)), T0 + 20_100);
        let v = c.deal(2).unwrap();
        assert_eq!(v.stage, Stage::Accepted);
        assert!(v.proof_rejection.unwrap().contains("does not pass the 200"));
        // 250 = 200 of deal 1 + deal 2's first window.
        c.proof_posted(2, 250);
        settle(&mut c, T0 + 20_200);
        c.proof_checked(2, Ok(proof(1, 250)), T0 + 20_200);
        let v = c.deal(2).unwrap();
        assert_eq!((v.stage, v.base, v.paid), (Stage::Serving, 200, 50));
        // Deal 1's late proof counts for nobody: its account closed at 200.
        c.proof_posted(1, 300);
        settle(&mut c, T0 + 20_300);
        c.proof_checked(1, Ok(proof(1, 300)), T0 + 20_300);
        assert_eq!(c.deal(1).unwrap().paid, 200);
        assert_eq!(c.deal(2).unwrap().paid, 50);
        // One claim for the channel: everything both deals were paid.
        assert!(matches!(
            c.claimable()[..],
            [Action::Claim {
                deal_id: 2,
                amount: 250,
                close: false,
                ..
            }]
        ));
    }

    /// Claims are lazy: nothing under the threshold, one claim when the unclaimed
    /// amount reaches it, and a closing claim as soon as a read shows the requester
    /// closing the channel.
    #[test]
    fn claims_wait_for_the_threshold_or_the_requesters_close() {
        let mut c = core(1);
        c.set_claim_threshold(300);
        c.observe(obs(1, 600), T0);
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        settle(&mut c, T0);
        let mut claims = Vec::new();
        for t in 1..=40u64 {
            let now = T0 + t * 1_000;
            let amount = PRICE * u128::from(t + 5);
            c.proof_posted(1, amount);
            settle(&mut c, now);
            c.proof_checked(1, Ok(proof(1, amount)), now);
            claims.extend(
                settle(&mut c, now)
                    .into_iter()
                    .filter(|a| matches!(a, Action::Claim { .. })),
            );
        }
        // 300 unclaimed is reached at 25 s (amount 300), then again at 55 s... not yet.
        assert!(
            matches!(
                claims[..],
                [Action::Claim {
                    amount: 300,
                    close: false,
                    ..
                }]
            ),
            "{claims:?}"
        );
        // The requester starts closing: the next read shows it, the claim closes.
        let mut f = channel(1);
        f.closing = true;
        c.channel_read(B256::repeat_byte(1), Ok(Some(f)), T0 + 41_000);
        let a = settle(&mut c, T0 + 41_000);
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::Claim {
                    amount: 450,
                    close: true,
                    ..
                }
            )),
            "{a:?}"
        );
        assert!(c.deal(1).unwrap().closed);
        assert!(c.claimable().is_empty());
    }

    #[test]
    fn a_channel_pays_one_running_deal_at_a_time() {
        let mut c = core(2);
        c.observe(obs(1, 60), T0);
        c.observe(obs(2, 60), T0);
        c.proof_posted(1, 50);
        c.proof_posted(2, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        c.proof_checked(2, Ok(proof(1, 50)), T0);
        let v = c.deal(2).unwrap();
        assert_eq!(v.stage, Stage::Accepted);
        assert!(v.proof_rejection.unwrap().contains("still pays deal 1"));
        // And a deal's channel cannot change.
        c.proof_posted(1, 80);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(3, 80)), T0);
        assert!(
            c.deal(1)
                .unwrap()
                .proof_rejection
                .unwrap()
                .contains("paid over channel")
        );
        assert_eq!(c.deal(1).unwrap().paid, 50);
    }

    #[test]
    fn failures_back_off_and_retry_without_duplicates() {
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        let a = c.actions(T0);
        assert_eq!(reports(&a), vec![PartyStatus::Accepted]);
        assert!(c.actions(T0).is_empty(), "in flight: not emitted twice");
        c.report_done(
            1,
            PartyStatus::Accepted,
            Err(Failure::Transient("down".into())),
            T0,
        );
        assert!(c.actions(T0 + 499).is_empty());
        assert_eq!(reports(&c.actions(T0 + 500)), vec![PartyStatus::Accepted]);
        c.report_done(
            1,
            PartyStatus::Accepted,
            Err(Failure::Transient("down".into())),
            T0 + 500,
        );
        assert!(c.actions(T0 + 1499).is_empty(), "doubled delay");
        assert_eq!(reports(&c.actions(T0 + 1500)).len(), 1);
        c.report_done(1, PartyStatus::Accepted, Ok(()), T0 + 1500);
        assert!(c.actions(T0 + 1500).is_empty());
        // The event of our own report arriving later changes nothing.
        c.party_reported(1, true, PartyStatus::Accepted, T0 + 1600);
        assert!(c.actions(T0 + 1600).is_empty());
    }

    #[test]
    fn claims_are_periodic_and_never_repeat_an_amount() {
        let mut s = settings();
        s.claim_interval = Some(Duration::from_secs(10));
        let mut c = Core::new(
            s,
            vec![ExitSlot {
                wg_key: KEY,
                capacity: 1,
                max_duration: Duration::from_secs(MAX_S),
            }],
        );
        c.exchange_contact(T0);
        c.observe(obs(1, 600), T0);
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        settle(&mut c, T0);
        settle(&mut c, T0);
        c.proof_posted(1, 150);
        settle(&mut c, T0 + 5_000);
        c.proof_checked(1, Ok(proof(1, 150)), T0 + 5_000);
        assert!(settle(&mut c, T0 + 9_999).is_empty(), "interval not over");
        let a = settle(&mut c, T0 + 10_000);
        assert!(matches!(
            a[..],
            [Action::Claim {
                amount: 150,
                close: false,
                ..
            }]
        ));
        assert!(
            settle(&mut c, T0 + 12_000).is_empty(),
            "nothing new to claim"
        );
        c.proof_posted(1, 250);
        settle(&mut c, T0 + 15_000);
        c.proof_checked(1, Ok(proof(1, 250)), T0 + 15_000);
        assert!(settle(&mut c, T0 + 19_999).is_empty());
        let a = settle(&mut c, T0 + 20_000);
        assert!(matches!(
            a[..],
            [Action::Claim {
                amount: 250,
                close: false,
                ..
            }]
        ));
        assert!(settle(&mut c, T0 + 21_000).is_empty());
    }

    #[test]
    fn restart_recovers_from_the_exchange_view() {
        // The agent restarted: the deal was accepted and is active with a proof.
        let mut c = core(1);
        let mut o = obs(1, 60);
        o.provider_status = PartyStatus::Active;
        o.requester_status = PartyStatus::Active;
        o.status = DealStatus::Active;
        o.proof_amount = Some(200);
        c.observe(o, T0 + 10_000);
        let a = settle(&mut c, T0 + 10_000);
        assert!(matches!(a[..], [Action::CheckProof { .. }]), "{a:?}");
        c.proof_checked(1, Ok(proof(1, 200)), T0 + 10_000);
        let a = settle(&mut c, T0 + 10_000);
        assert!(matches!(a[..], [Action::AddPeer { .. }]), "serves again");
        assert!(
            reports(&settle(&mut c, T0 + 10_000)).is_empty(),
            "already active"
        );
        // A final deal with an unclaimed proof: claimed once worth it (here at once).
        let mut f = obs(2, 5);
        f.provider_status = PartyStatus::Completed;
        f.requester_status = PartyStatus::Completed;
        f.status = DealStatus::Completed;
        f.proof_amount = Some(50);
        f.rated_by_provider = true;
        c.observe(f, T0 + 60_000);
        let a = settle(&mut c, T0 + 60_000);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::CheckProof { deal_id: 2, .. }))
        );
        c.set_claim_threshold(50);
        c.proof_checked(2, Ok(proof(2, 50)), T0 + 60_000);
        let a = settle(&mut c, T0 + 60_000);
        assert!(a.iter().any(|a| matches!(
            a,
            Action::Claim {
                deal_id: 2,
                close: false,
                ..
            }
        )));
    }

    /// Serves deal 1 (60 s from T0) on a first proof of `first`.
    fn serving(first: u128) -> Core {
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        c.proof_posted(1, first);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, first)), T0);
        settle(&mut c, T0);
        settle(&mut c, T0);
        assert!(c.deal(1).unwrap().peer_present);
        c
    }

    #[test]
    fn the_first_window_is_the_configured_few_seconds() {
        // First window 5 s at price 10: 49 does not open the tunnel, 50 does, whatever
        // the deal's length (the old rule asked for a whole prepaid window).
        let mut c = core(1);
        c.observe(obs(1, 3_000), T0);
        c.proof_posted(1, 49);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 49)), T0);
        assert!(settle(&mut c, T0).is_empty());
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        assert!(
            settle(&mut c, T0)
                .iter()
                .any(|a| matches!(a, Action::AddPeer { .. }))
        );
    }

    #[test]
    fn an_extension_by_the_requester_is_agreed_and_served_to_the_new_end() {
        let mut c = serving(50);
        let end = T0 / 1000 + 60;
        // Our own proposal echoed back changes nothing; the requester's is agreed once.
        c.extend_proposed(1, true, end + 100, T0 + 1_000);
        assert!(settle(&mut c, T0 + 1_000).is_empty());
        c.extend_proposed(1, false, end + 120, T0 + 1_000);
        let a = settle(&mut c, T0 + 1_000);
        assert!(matches!(
            a[..],
            [Action::ProposeExtend { deal_id: 1, new_end }] if new_end == end + 120
        ));
        c.extend_proposed(1, false, end + 120, T0 + 1_100);
        assert!(settle(&mut c, T0 + 1_100).is_empty(), "replayed proposal");
        assert_eq!(c.deal(1).unwrap().extend_proposed, Some(end + 120));
        c.extended(1, end + 120, PRICE * 180);
        let v = c.deal(1).unwrap();
        assert_eq!(
            (v.end, v.value, v.extend_proposed),
            (end + 120, PRICE * 180, None)
        );
        // Paid up, the peer stays past the old end and goes at the new one.
        for t in (5..=175).step_by(5) {
            let now = T0 + t * 1_000;
            let amount = PRICE * u128::from(t + 5);
            c.proof_posted(1, amount);
            settle(&mut c, now);
            c.proof_checked(1, Ok(proof(1, amount)), now);
            let a = settle(&mut c, now);
            assert!(
                !a.iter().any(|a| matches!(a, Action::RemovePeer { .. })),
                "removed at {t} s"
            );
        }
        assert!(c.deal(1).unwrap().peer_present);
        let a = settle(&mut c, T0 + 180_000);
        assert!(a.iter().any(|a| matches!(a, Action::RemovePeer { .. })));
        assert!(matches!(
            c.claimable()[..],
            [Action::Claim { amount, close: false, .. }] if amount == PRICE * 180
        ));
    }

    #[test]
    fn extensions_are_refused_unless_served_paid_and_within_the_exit_maximum() {
        let end = T0 / 1000 + 60;
        // Too long for the exit (3600 s from the start).
        let mut c = serving(50);
        c.extend_proposed(1, false, T0 / 1000 + MAX_S + 1, T0 + 1_000);
        assert!(settle(&mut c, T0 + 1_000).is_empty());
        c.extend_proposed(1, false, T0 / 1000 + MAX_S, T0 + 1_000);
        assert!(matches!(
            settle(&mut c, T0 + 1_000)[..],
            [Action::ProposeExtend { .. }]
        ));
        // Payment behind (50 covers 5 s, grace 3 s: behind at 9 s).
        let mut c = serving(50);
        c.extend_proposed(1, false, end + 60, T0 + 9_000);
        assert!(
            !c.actions(T0 + 8_000)
                .iter()
                .any(|a| matches!(a, Action::ProposeExtend { .. }))
        );
        // Not served yet.
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        settle(&mut c, T0);
        c.extend_proposed(1, false, end + 60, T0 + 1_000);
        assert!(settle(&mut c, T0 + 1_000).is_empty());
        // Not later than the end.
        let mut c = serving(50);
        c.extend_proposed(1, false, end, T0 + 1_000);
        assert!(settle(&mut c, T0 + 1_000).is_empty());
        // A poll showing the requester's pending proposal is enough.
        let mut c = serving(50);
        let mut o = obs(1, 60);
        o.provider_status = PartyStatus::Active;
        o.requester_new_end = Some(end + 30);
        c.observe(o, T0 + 1_000);
        assert!(matches!(
            settle(&mut c, T0 + 1_000)[..],
            [Action::ProposeExtend { new_end, .. }] if new_end == end + 30
        ));
    }

    #[test]
    fn a_requester_giving_up_before_service_costs_no_chain_transaction() {
        // No proof at all: nothing to claim.
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        settle(&mut c, T0);
        c.party_reported(1, false, PartyStatus::Failed, T0 + 1_000);
        c.status_changed(1, DealStatus::Terminated, T0 + 1_000);
        for t in [1_000, 2_000, 70_000, 700_000] {
            let a = settle(&mut c, T0 + t);
            assert!(
                !a.iter().any(|a| matches!(a, Action::Claim { .. })),
                "{a:?}"
            );
        }
        assert!(c.claimable().is_empty());
        assert!(c.deal(1).is_none(), "forgotten once settled");
        // A verified proof short of the first window: still no transaction.
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        c.proof_posted(1, 20);
        settle(&mut c, T0);
        c.proof_checked(1, Ok(proof(1, 20)), T0);
        c.party_reported(1, false, PartyStatus::Failed, T0 + 1_000);
        c.status_changed(1, DealStatus::Terminated, T0 + 1_000);
        for t in [1_000, 70_000] {
            assert!(
                !settle(&mut c, T0 + t)
                    .iter()
                    .any(|a| matches!(a, Action::Claim { .. }))
            );
        }
        assert!(c.claimable().is_empty());
        // A first-window proof, then the requester gives up before the peer was added:
        // that proof is worth claiming (lazily: here the threshold is reached).
        let mut c = core(1);
        c.observe(obs(1, 60), T0);
        c.proof_posted(1, 50);
        settle(&mut c, T0);
        c.set_claim_threshold(50);
        c.proof_checked(1, Ok(proof(1, 50)), T0);
        c.party_reported(1, false, PartyStatus::Failed, T0 + 10);
        let a = settle(&mut c, T0 + 10);
        let a2 = settle(&mut c, T0 + 10);
        assert!(
            a.iter().chain(&a2).any(|a| matches!(
                a,
                Action::Claim {
                    amount: 50,
                    close: false,
                    ..
                }
            )),
            "{a:?} {a2:?}"
        );
    }

    #[test]
    fn requester_leaving_ends_service_early() {
        let mut c = serving(50);
        c.party_reported(1, false, PartyStatus::Completed, T0 + 2000);
        let a = settle(&mut c, T0 + 2000);
        assert!(a.iter().any(|a| matches!(a, Action::RemovePeer { .. })));
        assert_eq!(reports(&a), vec![PartyStatus::Completed]);
    }

    #[test]
    fn scores() {
        assert_eq!(score_for(100, 100), 5);
        assert_eq!(score_for(200, 100), 5);
        assert_eq!(score_for(75, 100), 4);
        assert_eq!(score_for(50, 100), 3);
        assert_eq!(score_for(1, 100), 2);
        assert_eq!(score_for(0, 100), 1);
        assert_eq!(score_for(0, 0), 5);
        assert_eq!(score_for(u128::MAX - 1, u128::MAX), 4);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Observe {
                deal: u64,
                provider: u8,
                requester: u8,
                proof: Option<u128>,
            },
            Posted {
                deal: u64,
                amount: u128,
            },
            Advance(u64),
            Contact,
            Resolve {
                pick: usize,
                outcome: u8,
                amount: u128,
            },
            /// The requester proposes to end `20 + extra` s after the start.
            Propose {
                deal: u64,
                extra: u64,
            },
            /// The exchange applied an extension to `20 + extra` s.
            Applied {
                deal: u64,
                extra: u64,
            },
        }

        fn party(n: u8) -> PartyStatus {
            PartyStatus::ALL[usize::from(n) % PartyStatus::ALL.len()]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (1u64..4, 0u8..6, 0u8..6, proptest::option::of(1u128..400)).prop_map(
                    |(deal, provider, requester, proof)| Op::Observe {
                        deal,
                        provider,
                        requester,
                        proof
                    }
                ),
                (1u64..4, 1u128..400).prop_map(|(deal, amount)| Op::Posted { deal, amount }),
                (0u64..4_000).prop_map(Op::Advance),
                Just(Op::Contact),
                (0usize..8, 0u8..4, 1u128..400).prop_map(|(pick, outcome, amount)| Op::Resolve {
                    pick,
                    outcome,
                    amount
                }),
                (1u64..4, 0u64..4_000).prop_map(|(deal, extra)| Op::Propose { deal, extra }),
                (1u64..4, 0u64..4_000).prop_map(|(deal, extra)| Op::Applied { deal, extra }),
            ]
        }

        fn kind(a: &Action) -> (u64, Kind) {
            match a {
                Action::Report { deal_id, .. } => (*deal_id, Kind::Report),
                Action::AddPeer { deal_id, .. }
                | Action::RemovePeer { deal_id, .. }
                | Action::PeerEndpoint { deal_id, .. } => (*deal_id, Kind::Peer),
                Action::CheckProof { deal_id, .. } => (*deal_id, Kind::CheckProof),
                Action::Claim { deal_id, .. } => (*deal_id, Kind::Claim),
                Action::ReadChannel { channel_id } => {
                    (10_000 + u64::from(channel_id[0]), Kind::CheckProof)
                }
                Action::Rate { deal_id, .. } => (*deal_id, Kind::Rate),
                Action::ProposeExtend { deal_id, .. } => (*deal_id, Kind::Extend),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            /// Whatever the exchange and chain say and in whatever order results come
            /// back: one action per kind and deal in flight, no status reported twice,
            /// no peer without a verified first window, no claim above what was verified
            /// or repeating an amount already claimed (except the closing one), no chain
            /// transaction for a deal never served and never paid its first window, and
            /// extensions agreed only while serving and within the exit's longest rental.
            #[test]
            fn the_core_keeps_its_promises(ops in proptest::collection::vec(op(), 1..120)) {
                let mut c = core(2);
                // Lazy claims of at least the first window.
                c.set_claim_threshold(100);
                let mut now = T0;
                let mut outstanding: Vec<Action> = Vec::new();
                let mut reported: std::collections::HashSet<(u64, PartyStatus)> = Default::default();
                let mut verified: HashMap<u64, u128> = HashMap::new();
                let mut claimed: HashMap<u64, u128> = HashMap::new();
                let mut served: std::collections::HashSet<u64> = Default::default();
                let start = T0 / 1000;
                let first = first_window_due(PRICE, settings().first_window, PRICE * 20);
                for op in ops {
                    match op {
                        Op::Observe { deal, provider, requester, proof } => {
                            let mut o = obs(deal, 20);
                            o.provider_status = party(provider);
                            o.requester_status = party(requester);
                            o.proof_amount = proof;
                            c.observe(o, now);
                        }
                        Op::Posted { deal, amount } => c.proof_posted(deal, amount),
                        Op::Propose { deal, extra } => c.extend_proposed(deal, false, start + 20 + extra, now),
                        Op::Applied { deal, extra } => c.extended(deal, start + 20 + extra, PRICE * u128::from(20 + extra)),
                        Op::Advance(ms) => now += ms,
                        Op::Contact => c.exchange_contact(now),
                        Op::Resolve { pick, outcome, amount } => {
                            if outstanding.is_empty() {
                                continue;
                            }
                            let a = outstanding.remove(pick % outstanding.len());
                            let fail = match outcome {
                                0 => Some(Failure::Transient("t".into())),
                                1 => Some(Failure::Permanent("p".into())),
                                _ => None,
                            };
                            match a {
                                Action::Report { deal_id, status, .. } => {
                                    if fail.is_none() {
                                        prop_assert!(reported.insert((deal_id, status)), "reported twice");
                                    }
                                    c.report_done(deal_id, status, fail.map_or(Ok(()), Err), now);
                                }
                                Action::AddPeer { deal_id, .. } | Action::PeerEndpoint { deal_id, .. } => c.peer_done(deal_id, true, fail.map_or(Ok(()), Err), now),
                                Action::RemovePeer { deal_id, .. } => c.peer_done(deal_id, false, fail.map_or(Ok(()), Err), now),
                                Action::CheckProof { deal_id, .. } => {
                                    let r = match fail {
                                        Some(f) => Err(f),
                                        None => {
                                            let v = verified.entry(deal_id).or_default();
                                            *v = (*v).max(amount);
                                            Ok(proof(deal_id as u8, amount))
                                        }
                                    };
                                    c.proof_checked(deal_id, r, now);
                                }
                                Action::Claim { deal_id, channel_id, amount, close, .. } => {
                                    if fail.is_none() {
                                        let cl = claimed.entry(deal_id).or_default();
                                        *cl = (*cl).max(amount);
                                    }
                                    c.claim_done(channel_id, amount, close, fail.map_or(Ok(close), Err), now);
                                }
                                Action::ReadChannel { channel_id } => c.channel_read(channel_id, fail.map_or(Ok(None), Err), now),
                                Action::Rate { deal_id, .. } => c.rate_done(deal_id, fail.map_or(Ok(()), Err), now),
                                Action::ProposeExtend { deal_id, new_end } => c.extend_done(deal_id, new_end, fail.map_or(Ok(()), Err), now),
                            }
                        }
                    }
                    for a in c.actions(now) {
                        let k = kind(&a);
                        prop_assert!(!outstanding.iter().any(|o| kind(o) == k), "two {k:?} in flight");
                        match &a {
                            Action::Report { deal_id, status, .. } => {
                                prop_assert!(!reported.contains(&(*deal_id, *status)), "re-report {status:?}");
                            }
                            Action::AddPeer { deal_id, .. } => {
                                let v = c.deal(*deal_id).unwrap();
                                prop_assert!(v.paid >= first, "peer without the first window");
                                served.insert(*deal_id);
                            }
                            Action::ProposeExtend { deal_id, new_end } => {
                                let v = c.deal(*deal_id).unwrap();
                                prop_assert_eq!(v.stage, Stage::Serving);
                                prop_assert!(*new_end > v.end, "extension not later");
                                prop_assert!(*new_end - start <= MAX_S, "beyond the exit's longest rental");
                            }
                            Action::Claim { deal_id, amount, close, .. } => {
                                prop_assert!(
                                    served.contains(deal_id) || *amount >= first,
                                    "chain transaction for a deal never served nor paid its first window"
                                );
                                prop_assert!(*amount <= verified.get(deal_id).copied().unwrap_or(0));
                                let done = claimed.get(deal_id).copied().unwrap_or(0);
                                prop_assert!(*close || *amount > done, "claim repeats {amount}");
                            }
                            _ => {}
                        }
                        outstanding.push(a);
                    }
                }
            }
        }
    }
}
