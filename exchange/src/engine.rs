//! The exchange as a deterministic state machine: order book, funds holds, deal book,
//! agreement protocol, profiles and the deal-event log.
//!
//! Every change enters through [`Exchange::apply`] with a [`Command`] that carries its
//! own clock reading and, for requests, the on-chain balance observed for the wallet.
//! So replaying the journal of accepted commands rebuilds exactly the same state, the
//! same deal ids and the same event ids: that is the whole persistence story (see
//! `store`). A refused command changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use alloy_primitives::map::{HashMap, HashSet};
use std::borrow::Cow;
use std::sync::Arc;

use alloy_primitives::{Address, U256};
use serde::{Deserialize, Serialize};

use crate::agreement::{Deadlines, DealStatus, deal_status};
use crate::book::{BookOffer, BookRequest, Counterparties, OfferBook, RequestBook};
use crate::error::ExchangeError;
use crate::types::{
    BalanceProof, Cancel, EndpointReport, Extend, MAX_DURATION_S, Offer, PartyStatus, Preferences,
    Rating, Request, StatusReport, amount, commission,
};
pub use ipsx_exchange_client::api::{
    Actor, BookOfferView, BookQuery, BookRequestView, BookView, Deal, DealEvent, DealTerms,
    EventKind, HistoryEntry, Outcome, Profile,
};

/// Rules of the engine that come from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Seconds both sides have to accept a new deal.
    pub accept_window_s: u64,
    /// Seconds after a deal's end for final reports before silence counts as agreement.
    pub settle_window_s: u64,
    /// Platform commission, basis points of a deal's value: the initial value. A node on a
    /// chain replaces it at start with the Centralizer's `feeBps` and follows it
    /// ([`Command::Fee`]); the config file may only set it without a chain
    /// (`static_balances`), see [`crate::config::ExchangeConfig::from_toml`].
    pub commission_bps: u16,
    /// Furthest ahead an order or message may expire, seconds.
    pub max_ttl_s: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            accept_window_s: 30,
            settle_window_s: 300,
            commission_bps: 250,
            max_ttl_s: 31 * 24 * 3600,
        }
    }
}

/// One accepted change, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Time passed (only journaled when it changed something).
    Tick {
        /// Unix seconds.
        now: u64,
    },
    /// A signed offer.
    PostOffer {
        /// The offer.
        offer: Offer,
        /// Unix seconds.
        now: u64,
    },
    /// A signed request, with the requester's on-chain balance read for it.
    PostRequest {
        /// The request.
        request: Request,
        /// On-chain `balance` of the requester (saturated to 128 bits).
        #[serde(with = "amount")]
        balance: u128,
        /// Unix seconds.
        now: u64,
    },
    /// A signed cancel.
    Cancel {
        /// The message.
        cancel: Cancel,
        /// Unix seconds.
        now: u64,
    },
    /// A signed status report.
    Report {
        /// The message.
        report: StatusReport,
        /// Unix seconds.
        now: u64,
    },
    /// A balance proof whose signature recovered to `signer`.
    Proof {
        /// The proof with its signature.
        proof: BalanceProof,
        /// The recovered signer.
        signer: Address,
        /// Unix seconds.
        now: u64,
    },
    /// A signed endpoint report (NAT traversal).
    Endpoint {
        /// The message.
        report: EndpointReport,
        /// Unix seconds.
        now: u64,
    },
    /// A signed rating.
    Rate {
        /// The message.
        rating: Rating,
        /// Unix seconds.
        now: u64,
    },
    /// Signed preferences.
    Prefs {
        /// The message.
        prefs: Preferences,
        /// Unix seconds.
        now: u64,
    },
    /// A signed proposal to extend a deal, with the requester's on-chain balance when
    /// the requester proposes (0 otherwise: a provider's proposal commits no funds).
    Extend {
        /// The message.
        extend: Extend,
        /// On-chain `balance` of the deal's requester (saturated to 128 bits).
        #[serde(with = "amount")]
        balance: u128,
        /// Unix seconds.
        now: u64,
    },
    /// The Centralizer's fee (`feeBps`), read from the chain, changed: deals matched (and
    /// extensions agreed) from now on carry it as their commission.
    Fee {
        /// The contract's fee, basis points.
        bps: u16,
        /// Unix seconds.
        now: u64,
    },
}

impl Command {
    /// The clock reading the command carries.
    pub fn now(&self) -> u64 {
        match self {
            Self::Tick { now }
            | Self::PostOffer { now, .. }
            | Self::PostRequest { now, .. }
            | Self::Cancel { now, .. }
            | Self::Report { now, .. }
            | Self::Endpoint { now, .. }
            | Self::Proof { now, .. }
            | Self::Rate { now, .. }
            | Self::Prefs { now, .. }
            | Self::Extend { now, .. }
            | Self::Fee { now, .. } => *now,
        }
    }
}

/// Profiles as the matcher sees them; skips the per-offer preference lookup while no
/// wallet has set one.
struct ProfileView<'a> {
    profiles: &'a HashMap<Address, Profile>,
    any_prefs: bool,
}

impl Counterparties for ProfileView<'_> {
    fn rating(&self, wallet: &Address) -> u16 {
        self.profiles.get(wallet).map_or(0, |p| p.rating)
    }
    fn min_counterparty_rating(&self, provider: &Address) -> u16 {
        if !self.any_prefs {
            return 0;
        }
        self.profiles
            .get(provider)
            .map_or(0, |p| p.min_counterparty_rating)
    }
}

/// The exchange state machine.
#[derive(Debug, Default)]
pub struct Exchange {
    cfg: EngineConfig,
    now: u64,
    next_id: u64,
    offers: OfferBook,
    requests: RequestBook,
    /// order id -> (expiry) for offers and requests in the book.
    order_expiries: BTreeSet<(u64, u64)>,
    holds: HashMap<Address, u128>,
    deals: HashMap<u64, Deal>,
    deals_by_wallet: HashMap<Address, Vec<u64>>,
    deal_timers: BTreeSet<(u64, u64)>,
    profiles: HashMap<Address, Profile>,
    nonces: HashSet<(Address, u64)>,
    /// expiry -> (wallet, nonce) pairs to forget then (keyed by time only: cheap).
    nonce_expiries: BTreeMap<u64, Vec<(Address, u64)>>,
    /// How many unexpired nonces each wallet holds (for the per-wallet cap).
    nonces_held: HashMap<Address, usize>,
    events: Vec<DealEvent>,
    wallet_events: HashMap<Address, Vec<u64>>,
    /// Wallets with a non-zero `min_counterparty_rating`.
    prefs_set: usize,
}

impl std::fmt::Debug for ProfileView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProfileView")
    }
}

impl Exchange {
    /// An empty exchange.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            next_id: 1,
            ..Self::default()
        }
    }

    /// The engine's rules.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The engine clock (the latest `now` seen; it never goes back).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// What the exchange holds against a wallet's open requests and running deals.
    pub fn held(&self, wallet: &Address) -> u128 {
        self.holds.get(wallet).copied().unwrap_or(0)
    }

    /// The offer book (read-only).
    pub fn offers(&self) -> &OfferBook {
        &self.offers
    }

    /// The resting requests (read-only).
    pub fn requests(&self) -> &RequestBook {
        &self.requests
    }

    /// A deal.
    pub fn deal(&self, id: u64) -> Option<&Deal> {
        self.deals.get(&id)
    }

    /// Number of deals ever made.
    pub fn deal_count(&self) -> usize {
        self.deals.len()
    }

    /// A wallet's deals, oldest first.
    pub fn deals_of(&self, wallet: &Address) -> Vec<&Deal> {
        self.deals_by_wallet
            .get(wallet)
            .map(|ids| ids.iter().filter_map(|id| self.deals.get(id)).collect())
            .unwrap_or_default()
    }

    /// How many open orders (offers and resting requests) a wallet has in the book.
    pub fn open_orders_of(&self, wallet: &Address) -> usize {
        self.offers.count_of(wallet) + self.requests.count_of(wallet)
    }

    /// How many unexpired nonces a wallet holds (each accepted message holds its nonce
    /// until the message's expiry).
    pub fn nonces_held(&self, wallet: &Address) -> usize {
        self.nonces_held.get(wallet).copied().unwrap_or(0)
    }

    /// Whether `(wallet, nonce)` is still held by an accepted message.
    pub fn nonce_used(&self, wallet: &Address, nonce: u64) -> bool {
        self.nonces.contains(&(*wallet, nonce))
    }

    /// A wallet's profile (default when never seen).
    pub fn profile(&self, wallet: &Address) -> Profile {
        self.profiles.get(wallet).cloned().unwrap_or_default()
    }

    /// Id of the latest deal event (0 when none).
    pub fn last_event_id(&self) -> u64 {
        self.events.len() as u64
    }

    /// A wallet's deal events with id above `after`, at most `limit`, in order.
    pub fn events_for(&self, wallet: &Address, after: u64, limit: usize) -> Vec<DealEvent> {
        let Some(ids) = self.wallet_events.get(wallet) else {
            return Vec::new();
        };
        let start = ids.partition_point(|id| *id <= after);
        ids.get(start..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .filter_map(|id| {
                let idx = usize::try_from(*id).ok()?.checked_sub(1)?;
                self.events.get(idx).cloned()
            })
            .collect()
    }

    /// A snapshot of the book under `q`.
    pub fn book(&self, q: &BookQuery) -> Result<BookView, ExchangeError> {
        let limit = q.limit.unwrap_or(100).min(1000);
        let max_price = q
            .max_price
            .as_deref()
            .map(amount::parse)
            .transpose()
            .map_err(|e| ExchangeError::invalid("max_price", e))?;
        let view = |o: &BookOffer| BookOfferView {
            order_id: o.id,
            remaining: o.remaining,
            rating: o.rating,
            offer: o.offer.clone(),
            geo: None,
        };
        let offers = match q.wallet {
            Some(w) => self
                .offers
                .ids_of(&w)
                .into_iter()
                .filter_map(|id| self.offers.get(id))
                .filter(|o| q.country.is_none_or(|c| o.offer.country == c))
                .filter(|o| q.kind.is_none_or(|k| o.offer.kind == k))
                .filter(|o| max_price.is_none_or(|p| o.offer.price_per_ip_second <= p))
                .take(limit)
                .map(view)
                .collect(),
            None => self
                .offers
                .list(q.country, q.kind, max_price, limit)
                .into_iter()
                .map(view)
                .collect(),
        };
        let requests = self
            .requests
            .iter()
            .filter(|r| q.wallet.is_none_or(|w| r.request.requester == w))
            .filter(|r| {
                q.country.is_none_or(|c| {
                    r.request.countries.is_empty() || r.request.countries.contains(&c)
                })
            })
            .take(limit)
            .map(|r| BookRequestView {
                order_id: r.id,
                remaining: r.remaining,
                request: r.request.clone(),
            })
            .collect();
        Ok(BookView { offers, requests })
    }

    // === time ===

    /// Moves the clock to `now` (never back): expires orders and applies deal deadlines.
    /// Returns whether anything changed (the caller journals a [`Command::Tick`] then).
    pub fn advance(&mut self, now: u64) -> bool {
        if now <= self.now {
            return false;
        }
        self.now = now;
        let mut changed = false;
        while let Some(&(t, id)) = self.order_expiries.first() {
            if t > now {
                break;
            }
            self.order_expiries.pop_first();
            if self.offers.remove(id).is_some() {
                changed = true;
            } else if let Some(r) = self.requests.remove(id) {
                self.release_request(&r);
                changed = true;
            }
        }
        while let Some(&(t, id)) = self.deal_timers.first() {
            if t > now {
                break;
            }
            self.deal_timers.pop_first();
            changed |= self.evaluate(id);
        }
        while let Some((&t, _)) = self.nonce_expiries.first_key_value() {
            if t > now {
                break;
            }
            for key in self
                .nonce_expiries
                .pop_first()
                .map(|(_, v)| v)
                .unwrap_or_default()
            {
                if self.nonces.remove(&key)
                    && let Some(n) = self.nonces_held.get_mut(&key.0)
                {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.nonces_held.remove(&key.0);
                    }
                }
            }
        }
        changed
    }

    /// The earliest time at which [`Exchange::advance`] would change something.
    pub fn next_deadline(&self) -> Option<u64> {
        let a = self.order_expiries.first().map(|(t, _)| *t);
        let b = self.deal_timers.first().map(|(t, _)| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // === commands ===

    /// Applies one command; on error nothing changed (beyond the clock moving forward,
    /// which [`Exchange::advance`] reports separately).
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, ExchangeError> {
        self.advance(cmd.now());
        let now = self.now;
        let ttl = self.cfg.max_ttl_s;
        match cmd {
            Command::Tick { .. } => Ok(Outcome::Ticked),
            Command::Fee { bps, .. } => {
                if *bps > crate::types::MAX_COMMISSION_BPS {
                    return Err(ExchangeError::invalid(
                        "bps",
                        format!("{bps} is above {}", crate::types::MAX_COMMISSION_BPS),
                    ));
                }
                self.cfg.commission_bps = *bps;
                Ok(Outcome::FeeChanged {
                    commission_bps: *bps,
                })
            }
            Command::PostOffer { offer, .. } => {
                let mut offer = offer.clone();
                offer.check(now, ttl)?;
                self.check_nonce(offer.provider, offer.nonce)?;
                self.use_nonce(offer.provider, offer.nonce, offer.expiry);
                Ok(self.post_offer(offer))
            }
            Command::PostRequest {
                request, balance, ..
            } => {
                let mut request = request.clone();
                request.check(now, ttl)?;
                self.check_nonce(request.requester, request.nonce)?;
                let needed = request.max_cost()?;
                let available = balance.saturating_sub(self.held(&request.requester));
                if needed > available {
                    return Err(ExchangeError::InsufficientFunds {
                        field: "max_price_per_ip_second",
                        wallet: request.requester,
                        needed,
                        available,
                    });
                }
                self.use_nonce(request.requester, request.nonce, request.expiry);
                Ok(self.post_request(request, needed))
            }
            Command::Cancel { cancel, .. } => {
                cancel.check(now, ttl)?;
                self.check_nonce(cancel.wallet, cancel.nonce)?;
                self.check_cancel(cancel)?;
                self.use_nonce(cancel.wallet, cancel.nonce, cancel.expiry);
                Ok(self.cancel(cancel.order_id))
            }
            Command::Report { report, .. } => {
                report.check(now, ttl)?;
                self.check_nonce(report.wallet, report.nonce)?;
                let actor = self.check_report(report)?;
                self.use_nonce(report.wallet, report.nonce, report.expiry);
                Ok(self.report(report, actor))
            }
            Command::Endpoint { report, .. } => {
                report.check(now, ttl)?;
                self.check_nonce(report.wallet, report.nonce)?;
                let actor = self.check_endpoint(report)?;
                self.use_nonce(report.wallet, report.nonce, report.expiry);
                Ok(self.endpoint(report, actor))
            }
            Command::Proof { proof, signer, .. } => {
                proof.check()?;
                self.check_proof(proof, signer)?;
                Ok(self.store_proof(proof))
            }
            Command::Rate { rating, .. } => {
                rating.check(now, ttl)?;
                self.check_nonce(rating.wallet, rating.nonce)?;
                let actor = self.check_rating(rating)?;
                self.use_nonce(rating.wallet, rating.nonce, rating.expiry);
                Ok(self.rate(rating, actor))
            }
            Command::Extend {
                extend, balance, ..
            } => {
                extend.check(now, ttl)?;
                self.check_nonce(extend.wallet, extend.nonce)?;
                let (actor, added) = self.check_extend(extend, *balance)?;
                self.use_nonce(extend.wallet, extend.nonce, extend.expiry);
                Ok(self.extend(extend, actor, added))
            }
            Command::Prefs { prefs, .. } => {
                prefs.check(now, ttl)?;
                self.check_nonce(prefs.wallet, prefs.nonce)?;
                self.use_nonce(prefs.wallet, prefs.nonce, prefs.expiry);
                let p = self.profiles.entry(prefs.wallet).or_default();
                let was_set = p.min_counterparty_rating > 0;
                p.min_counterparty_rating = prefs.min_counterparty_rating;
                match (was_set, prefs.min_counterparty_rating > 0) {
                    (false, true) => self.prefs_set += 1,
                    (true, false) => self.prefs_set -= 1,
                    _ => {}
                }
                Ok(Outcome::PrefsStored)
            }
        }
    }

    fn view(&self) -> ProfileView<'_> {
        ProfileView {
            profiles: &self.profiles,
            any_prefs: self.prefs_set > 0,
        }
    }

    fn check_nonce(&self, wallet: Address, nonce: u64) -> Result<(), ExchangeError> {
        if self.nonces.contains(&(wallet, nonce)) {
            return Err(ExchangeError::Replay { wallet, nonce });
        }
        Ok(())
    }

    fn use_nonce(&mut self, wallet: Address, nonce: u64, expiry: u64) {
        if self.nonces.insert((wallet, nonce)) {
            *self.nonces_held.entry(wallet).or_default() += 1;
        }
        self.nonce_expiries
            .entry(expiry)
            .or_default()
            .push((wallet, nonce));
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn add_hold(&mut self, wallet: Address, amount: u128) {
        let h = self.holds.entry(wallet).or_insert(0);
        *h = h.saturating_add(amount);
    }

    fn release_hold(&mut self, wallet: &Address, amount: u128) {
        if let Some(h) = self.holds.get_mut(wallet) {
            *h = h.saturating_sub(amount);
            if *h == 0 {
                self.holds.remove(wallet);
            }
        }
    }

    fn release_request(&mut self, r: &BookRequest) -> u128 {
        // check() proved count x per-IP cost fits, so remaining x per-IP does too.
        let per_ip = r.request.max_cost_per_ip().unwrap_or(u128::MAX);
        let amount = per_ip.saturating_mul(u128::from(r.remaining));
        self.release_hold(&r.request.requester, amount);
        amount
    }

    fn post_offer(&mut self, offer: Offer) -> Outcome {
        let id = self.take_id();
        let rating = self.profiles.get(&offer.provider).map_or(0, |p| p.rating);
        let country = offer.country;
        let expiry = offer.expiry;
        self.offers.insert(id, offer, rating, self.now);
        self.order_expiries.insert((expiry, id));
        // A new offer serves resting requests, oldest first.
        let mut deals = Vec::new();
        for rid in self.requests.candidates(&country) {
            let Some(o) = self.offers.get(id) else { break };
            if o.remaining == 0 {
                break;
            }
            let Some(r) = self.requests.get(rid) else {
                continue;
            };
            if self
                .offers
                .fits(id, &r.request, &r.filled, self.now, &self.view())
            {
                let Some(mut r) = self.requests.remove(rid) else {
                    continue;
                };
                deals.push(self.fill(id, &mut r));
                if r.remaining > 0 {
                    self.requests.insert(r);
                } else {
                    self.order_expiries.remove(&(r.request.expiry, r.id));
                }
            }
        }
        Outcome::OfferPosted {
            order_id: id,
            deals,
        }
    }

    fn post_request(&mut self, request: Request, needed: u128) -> Outcome {
        let id = self.take_id();
        let requester = request.requester;
        let per_ip = request.max_cost_per_ip().unwrap_or(u128::MAX);
        self.add_hold(requester, needed);
        let picks = self
            .offers
            .select(&request, &[], request.count, self.now, &self.view());
        let mut r = BookRequest {
            id,
            remaining: request.count,
            request,
            filled: Vec::new(),
            created: self.now,
        };
        let deals: Vec<u64> = picks
            .into_iter()
            .map(|oid| self.fill(oid, &mut r))
            .collect();
        let (filled, resting) = (r.request.count - r.remaining, r.remaining);
        let expiry = r.request.expiry;
        if r.remaining > 0 {
            self.requests.insert(r);
            self.order_expiries.insert((expiry, id));
        }
        let held = deals
            .iter()
            .filter_map(|d| self.deals.get(d))
            .map(|d| d.terms.value)
            .fold(0u128, u128::saturating_add)
            .saturating_add(per_ip.saturating_mul(u128::from(resting)));
        Outcome::RequestPosted {
            order_id: id,
            filled,
            resting,
            deals,
            held,
        }
    }

    /// Makes one deal: one IP of request `r` on offer `oid`.
    fn fill(&mut self, oid: u64, r: &mut BookRequest) -> u64 {
        let now = self.now;
        let duration = r.request.duration_s;
        let deadlines = Deadlines::new(
            now,
            duration,
            self.cfg.accept_window_s,
            self.cfg.settle_window_s,
        );
        let Some(o) = self.offers.get(oid) else {
            return 0;
        };
        let offer = &o.offer;
        // Offer::check proved price x max_duration fits and duration <= max_duration.
        let value = offer
            .price_per_ip_second
            .saturating_mul(u128::from(duration));
        let terms = Arc::new(DealTerms {
            exit_address: offer.exit_address,
            country: offer.country,
            region: offer.region.clone(),
            city: offer.city.clone(),
            asn: offer.asn,
            kind: offer.kind,
            protocols: offer.protocols.clone(),
            wg_endpoint: offer.wg_endpoint,
            provider_wg_key: offer.wg_public_key,
            requester_wg_key: r.request.wg_public_key,
            price_per_ip_second: offer.price_per_ip_second,
            duration_s: duration,
            start: now,
            end: deadlines.end,
            value,
            commission: commission(value, self.cfg.commission_bps),
        });
        let provider = offer.provider;
        self.offers.take(oid);
        r.remaining = r.remaining.saturating_sub(1);
        r.filled.push((provider, terms.exit_address));
        let per_ip = r.request.max_cost_per_ip().unwrap_or(u128::MAX);
        let requester = r.request.requester;
        // The request's hold for this IP becomes the deal's hold at the agreed price.
        self.release_hold(&requester, per_ip.saturating_sub(value));
        let id = self.take_id();
        let deal = Deal {
            id,
            offer_id: oid,
            request_id: r.id,
            provider,
            requester,
            terms: Arc::clone(&terms),
            provider_status: PartyStatus::Pending,
            requester_status: PartyStatus::Pending,
            status: DealStatus::Matched,
            deadlines,
            history: vec![HistoryEntry {
                at: now,
                actor: Actor::Exchange,
                what: Cow::Borrowed("matched"),
            }],
            proof: None,
            rated_by_provider: false,
            rated_by_requester: false,
            provider_new_end: None,
            requester_new_end: None,
            requester_endpoint: None,
            path: None,
        };
        if let Some(t) = deadlines.next_after(now) {
            self.deal_timers.insert((t, id));
        }
        self.deals_by_wallet.entry(provider).or_default().push(id);
        self.deals_by_wallet.entry(requester).or_default().push(id);
        self.deals.insert(id, deal);
        self.emit(id, EventKind::Matched { terms });
        id
    }

    fn emit(&mut self, deal_id: u64, kind: EventKind) {
        let Some(d) = self.deals.get(&deal_id) else {
            return;
        };
        let id = self.events.len() as u64 + 1;
        let ev = DealEvent {
            id,
            at: self.now,
            deal_id,
            provider: d.provider,
            requester: d.requester,
            status: d.status,
            kind,
        };
        self.wallet_events.entry(d.provider).or_default().push(id);
        if d.requester != d.provider {
            self.wallet_events.entry(d.requester).or_default().push(id);
        }
        self.events.push(ev);
    }

    fn check_cancel(&self, c: &Cancel) -> Result<(), ExchangeError> {
        if let Some(o) = self.offers.get(c.order_id) {
            if o.offer.provider != c.wallet {
                return Err(ExchangeError::NotParty {
                    wallet: c.wallet,
                    what: format!("order {}", c.order_id),
                });
            }
            return Ok(());
        }
        if let Some(r) = self.requests.get(c.order_id) {
            if r.request.requester != c.wallet {
                return Err(ExchangeError::NotParty {
                    wallet: c.wallet,
                    what: format!("order {}", c.order_id),
                });
            }
            return Ok(());
        }
        Err(ExchangeError::UnknownOrder(c.order_id))
    }

    fn cancel(&mut self, order_id: u64) -> Outcome {
        if let Some(o) = self.offers.remove(order_id) {
            self.order_expiries.remove(&(o.offer.expiry, order_id));
            return Outcome::Cancelled {
                order_id,
                released: 0,
                open: o.remaining,
            };
        }
        if let Some(r) = self.requests.remove(order_id) {
            self.order_expiries.remove(&(r.request.expiry, order_id));
            let released = self.release_request(&r);
            return Outcome::Cancelled {
                order_id,
                released,
                open: r.remaining,
            };
        }
        Outcome::Cancelled {
            order_id,
            released: 0,
            open: 0,
        }
    }

    /// A deal still open and `wallet`'s side in it.
    fn open_deal_of(&self, deal_id: u64, wallet: Address) -> Result<(&Deal, Actor), ExchangeError> {
        let d = self
            .deals
            .get(&deal_id)
            .ok_or(ExchangeError::UnknownDeal(deal_id))?;
        let actor = d.actor_of(&wallet).ok_or(ExchangeError::NotParty {
            wallet,
            what: format!("deal {deal_id}"),
        })?;
        if d.status.is_final() {
            return Err(ExchangeError::conflict(
                "deal_id",
                format!("deal {} is already {}", d.id, d.status.as_str()),
            ));
        }
        Ok((d, actor))
    }

    fn check_report(&self, rep: &StatusReport) -> Result<Actor, ExchangeError> {
        let (d, actor) = self.open_deal_of(rep.deal_id, rep.wallet)?;
        let current = match actor {
            Actor::Provider => d.provider_status,
            _ => d.requester_status,
        };
        if !current.can_move_to(rep.status) {
            return Err(ExchangeError::conflict(
                "status",
                format!(
                    "cannot go from {} to {}",
                    current.as_str(),
                    rep.status.as_str()
                ),
            ));
        }
        Ok(actor)
    }

    fn check_endpoint(&self, rep: &EndpointReport) -> Result<Actor, ExchangeError> {
        self.open_deal_of(rep.deal_id, rep.wallet).map(|(_, a)| a)
    }

    fn endpoint(&mut self, rep: &EndpointReport, actor: Actor) -> Outcome {
        if let Some(d) = self.deals.get_mut(&rep.deal_id) {
            match actor {
                Actor::Provider => d.path = Some(rep.path),
                _ => d.requester_endpoint = Some(rep.endpoint),
            }
        }
        self.emit(
            rep.deal_id,
            EventKind::Endpoint {
                actor,
                endpoint: rep.endpoint,
                path: rep.path,
            },
        );
        Outcome::EndpointStored {
            deal_id: rep.deal_id,
        }
    }

    fn report(&mut self, rep: &StatusReport, actor: Actor) -> Outcome {
        let now = self.now;
        if let Some(d) = self.deals.get_mut(&rep.deal_id) {
            match actor {
                Actor::Provider => d.provider_status = rep.status,
                _ => d.requester_status = rep.status,
            }
            d.history.push(HistoryEntry {
                at: now,
                actor,
                what: if rep.reason.is_empty() {
                    format!("reported {}", rep.status.as_str()).into()
                } else {
                    format!("reported {}: {}", rep.status.as_str(), rep.reason).into()
                },
            });
        }
        self.emit(
            rep.deal_id,
            EventKind::Reported {
                actor,
                party_status: rep.status,
                reason: rep.reason.clone(),
            },
        );
        self.evaluate(rep.deal_id);
        Outcome::Reported {
            deal_id: rep.deal_id,
            status: self
                .deals
                .get(&rep.deal_id)
                .map_or(DealStatus::Matched, |d| d.status),
        }
    }

    /// Re-runs the agreement protocol on a deal; returns whether its status changed.
    fn evaluate(&mut self, deal_id: u64) -> bool {
        let now = self.now;
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return false;
        };
        if d.status.is_final() {
            return false;
        }
        let new = deal_status(d.provider_status, d.requester_status, now, &d.deadlines);
        let changed = new != d.status;
        if changed {
            d.status = new;
            d.history.push(HistoryEntry {
                at: now,
                actor: Actor::Exchange,
                what: format!("status {}", new.as_str()).into(),
            });
        }
        let (deadlines, final_) = (d.deadlines, new.is_final());
        let mut pending = 0;
        if changed && final_ {
            // A proposal still pending dies with the deal; its hold goes with it.
            pending = pending_hold(d);
            d.provider_new_end = None;
            d.requester_new_end = None;
        }
        let (provider, requester, offer_id, value) = (
            d.provider,
            d.requester,
            d.offer_id,
            d.terms.value.saturating_add(pending),
        );
        for t in [deadlines.accept_by, deadlines.end, deadlines.settle_by] {
            self.deal_timers.remove(&(t, deal_id));
        }
        if !final_ && let Some(t) = deadlines.next_after(now) {
            self.deal_timers.insert((t, deal_id));
        }
        if changed {
            self.emit(deal_id, EventKind::StatusChanged);
        }
        if changed && final_ {
            self.release_hold(&requester, value);
            self.offers.give_back(offer_id);
            for w in [provider, requester] {
                let p = self.profiles.entry(w).or_default();
                match new {
                    DealStatus::Completed => p.completed += 1,
                    DealStatus::Cancelled => p.cancelled += 1,
                    _ => p.failed += 1,
                }
            }
        }
        changed
    }

    fn check_proof(&self, p: &BalanceProof, signer: &Address) -> Result<(), ExchangeError> {
        let d = self
            .deals
            .get(&p.deal_id)
            .ok_or(ExchangeError::UnknownDeal(p.deal_id))?;
        if d.requester != *signer {
            return Err(ExchangeError::BadSignature {
                reason: format!(
                    "signed by {signer}, but deal {} is paid by {}",
                    d.id, d.requester
                ),
            });
        }
        if let Some(prev) = &d.proof {
            if prev.channel_id != p.channel_id {
                return Err(ExchangeError::invalid(
                    "channel_id",
                    format!("deal {} is paid over channel {}", d.id, prev.channel_id),
                ));
            }
            if p.cumulative_amount <= prev.cumulative_amount {
                return Err(ExchangeError::conflict(
                    "cumulative_amount",
                    format!(
                        "{} is not above the stored proof's {}",
                        p.cumulative_amount, prev.cumulative_amount
                    ),
                ));
            }
        }
        Ok(())
    }

    fn store_proof(&mut self, p: &BalanceProof) -> Outcome {
        let now = self.now;
        if let Some(d) = self.deals.get_mut(&p.deal_id) {
            d.proof = Some(p.clone());
            d.history.push(HistoryEntry {
                at: now,
                actor: Actor::Requester,
                what: format!("balance proof {}", p.cumulative_amount).into(),
            });
        }
        self.emit(
            p.deal_id,
            EventKind::Proof {
                amount: p.cumulative_amount,
            },
        );
        Outcome::ProofStored {
            deal_id: p.deal_id,
            amount: p.cumulative_amount,
        }
    }

    /// Checks an extension proposal against its deal; returns the proposing side and
    /// the value the extension adds (`price x (new_end - end)`).
    fn check_extend(&self, e: &Extend, balance: u128) -> Result<(Actor, u128), ExchangeError> {
        let d = self
            .deals
            .get(&e.deal_id)
            .ok_or(ExchangeError::UnknownDeal(e.deal_id))?;
        let actor = d.actor_of(&e.wallet).ok_or(ExchangeError::NotParty {
            wallet: e.wallet,
            what: format!("deal {}", e.deal_id),
        })?;
        if d.status.is_final() {
            return Err(ExchangeError::conflict(
                "deal_id",
                format!("deal {} is already {}", d.id, d.status.as_str()),
            ));
        }
        let t = &d.terms;
        if self.now >= t.end {
            return Err(ExchangeError::conflict(
                "deal_id",
                format!(
                    "deal {} ended at {}; only a running deal is extended",
                    d.id, t.end
                ),
            ));
        }
        if e.new_end <= t.end {
            return Err(ExchangeError::invalid(
                "new_end",
                format!("{} is not after the deal's end {}", e.new_end, t.end),
            ));
        }
        if e.new_end - t.start > MAX_DURATION_S {
            return Err(ExchangeError::invalid(
                "new_end",
                format!(
                    "{} s after the start {}; a deal lasts at most {MAX_DURATION_S} s (30 days)",
                    e.new_end - t.start,
                    t.start
                ),
            ));
        }
        let added = t
            .price_per_ip_second
            .checked_mul(u128::from(e.new_end - t.end))
            .filter(|a| t.value.checked_add(*a).is_some())
            .ok_or_else(|| {
                ExchangeError::invalid("new_end", "the added value overflows 128 bits")
            })?;
        if actor == Actor::Requester {
            // The new proposal replaces the earlier one and its hold.
            let available = balance
                .saturating_sub(self.held(&d.requester))
                .saturating_add(pending_hold(d));
            if added > available {
                return Err(ExchangeError::InsufficientFunds {
                    field: "new_end",
                    wallet: d.requester,
                    needed: added,
                    available,
                });
            }
        }
        Ok((actor, added))
    }

    fn extend(&mut self, e: &Extend, actor: Actor, added: u128) -> Outcome {
        let now = self.now;
        let settle_window = self.cfg.settle_window_s;
        let bps = self.cfg.commission_bps;
        let Some(d) = self.deals.get_mut(&e.deal_id) else {
            return Outcome::Extend {
                deal_id: e.deal_id,
                new_end: e.new_end,
                extended: false,
            };
        };
        let requester = d.requester;
        let mut release = 0;
        match actor {
            Actor::Provider => d.provider_new_end = Some(e.new_end),
            _ => {
                release = pending_hold(d);
                d.requester_new_end = Some(e.new_end);
            }
        }
        d.history.push(HistoryEntry {
            at: now,
            actor,
            what: format!("proposed end {}", e.new_end).into(),
        });
        let agreed =
            d.provider_new_end == Some(e.new_end) && d.requester_new_end == Some(e.new_end);
        let mut extended = None;
        let old_deadlines = d.deadlines;
        if agreed {
            let mut terms = DealTerms::clone(&d.terms);
            terms.end = e.new_end;
            terms.duration_s = e.new_end - terms.start;
            terms.value = terms.value.saturating_add(added);
            terms.commission = commission(terms.value, bps);
            let terms = Arc::new(terms);
            d.terms = Arc::clone(&terms);
            d.deadlines.end = e.new_end;
            d.deadlines.settle_by = e.new_end.saturating_add(settle_window);
            d.provider_new_end = None;
            d.requester_new_end = None;
            d.history.push(HistoryEntry {
                at: now,
                actor: Actor::Exchange,
                what: format!("extended to {}", e.new_end).into(),
            });
            extended = Some(terms);
        }
        if actor == Actor::Requester {
            self.release_hold(&requester, release);
            self.add_hold(requester, added);
        }
        self.emit(
            e.deal_id,
            EventKind::ExtendProposed {
                actor,
                new_end: e.new_end,
            },
        );
        let done = extended.is_some();
        if let Some(terms) = extended {
            for t in [
                old_deadlines.accept_by,
                old_deadlines.end,
                old_deadlines.settle_by,
            ] {
                self.deal_timers.remove(&(t, e.deal_id));
            }
            self.emit(e.deal_id, EventKind::Extended { terms });
            // The status is unchanged (the clock is before both ends); this re-arms the
            // deadline timers.
            self.evaluate(e.deal_id);
        }
        Outcome::Extend {
            deal_id: e.deal_id,
            new_end: e.new_end,
            extended: done,
        }
    }

    fn check_rating(&self, r: &Rating) -> Result<Actor, ExchangeError> {
        let d = self
            .deals
            .get(&r.deal_id)
            .ok_or(ExchangeError::UnknownDeal(r.deal_id))?;
        let actor = d.actor_of(&r.wallet).ok_or(ExchangeError::NotParty {
            wallet: r.wallet,
            what: format!("deal {}", r.deal_id),
        })?;
        if !d.status.is_final() {
            return Err(ExchangeError::conflict(
                "deal_id",
                format!("deal {} has not ended", d.id),
            ));
        }
        let done = match actor {
            Actor::Provider => d.rated_by_provider,
            _ => d.rated_by_requester,
        };
        if done {
            return Err(ExchangeError::conflict(
                "deal_id",
                format!("deal {} already rated by {}", d.id, r.wallet),
            ));
        }
        Ok(actor)
    }

    fn rate(&mut self, r: &Rating, actor: Actor) -> Outcome {
        let Some(d) = self.deals.get_mut(&r.deal_id) else {
            return Outcome::Rated {
                deal_id: r.deal_id,
                rating: 0,
            };
        };
        let rated = match actor {
            Actor::Provider => {
                d.rated_by_provider = true;
                d.requester
            }
            _ => {
                d.rated_by_requester = true;
                d.provider
            }
        };
        let value = d.terms.value;
        let p = self.profiles.entry(rated).or_default();
        p.ratings += 1;
        p.rated_value = p.rated_value.saturating_add(value);
        p.weighted_scores = p
            .weighted_scores
            .saturating_add(U256::from(value).saturating_mul(U256::from(r.score)));
        p.rating = weighted_rating(p.weighted_scores, p.rated_value);
        let rating = p.rating;
        self.offers.set_rating(&rated, rating);
        Outcome::Rated {
            deal_id: r.deal_id,
            rating,
        }
    }
}

/// What the exchange holds for the requester's pending extension proposal of `d`.
fn pending_hold(d: &Deal) -> u128 {
    d.requester_new_end.map_or(0, |n| {
        d.terms
            .price_per_ip_second
            .saturating_mul(u128::from(n.saturating_sub(d.terms.end)))
    })
}

/// Value-weighted mean score in hundredths of a star: `100 x sum(score x value) / sum(value)`.
pub fn weighted_rating(weighted_scores: U256, rated_value: u128) -> u16 {
    if rated_value == 0 {
        return 0;
    }
    let r = weighted_scores.saturating_mul(U256::from(100u8)) / U256::from(rated_value);
    u16::try_from(r.min(U256::from(crate::types::MAX_RATING))).unwrap_or(crate::types::MAX_RATING)
}
