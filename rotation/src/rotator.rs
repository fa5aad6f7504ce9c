//! The exit pool and the per-request choice: filters, health, bans, policies, sticky
//! sessions and fallbacks.
//!
//! Reads are cheap and lock-light: the exit set is an immutable [`Pool`] snapshot behind
//! an `Arc` (swapped whole on reload), with exits indexed by country so a filtered
//! request only scans its country's exits. Per-exit counters, latency EWMA and the
//! global ban deadline are atomics; domain bans sit behind a per-exit mutex that is only
//! taken when that exit has a domain ban. Sessions live in a bounded moka cache whose
//! values carry their own deadline, read against the injected clock.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::clock::Clock;
use crate::error::{ParseError, SelectError, truncate};
use crate::limit::{LimitSet, RateLimiter};
use crate::policy::Policy;
use crate::{CountryCode, ExitAttributes, Filter, rng};

// === ExitId, ExitInfo ===

/// The name of an exit, as in the config or the deal (`de-1`). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitId(Arc<str>);

impl Serialize for ExitId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ExitId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

impl ExitId {
    /// An id from its name.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ExitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for ExitId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ExitId {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for ExitId {
    fn from(name: String) -> Self {
        Self(Arc::from(name))
    }
}

/// An exit the rotator may choose: its id and attributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit's id.
    pub id: ExitId,
    /// Where it is and what kind it is.
    pub attrs: ExitAttributes,
}

// === Requests and answers ===

/// A sticky session as the client asked for it (`session-s1-sesstime-10`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// The session id chosen by the client; scoped by its token. 1..=256 bytes.
    pub id: String,
    /// How long the session keeps its exit after its last use (clamped to
    /// [`RotatorConfig::max_session_ttl`]).
    pub ttl: Duration,
    /// When the exit is gone, unhealthy or banned: bind a new exit matching the same
    /// filter (true) or fail with [`SelectError::SessionExitGone`] (false).
    pub allow_replacement: bool,
}

/// Longest session id accepted.
pub const MAX_SESSION_ID: usize = 256;

/// One request to route.
#[derive(Debug, Clone, Copy)]
pub struct SelectRequest<'a> {
    /// The client's token (sessions and per-request memory are scoped by it).
    pub token: &'a str,
    /// What the exit must satisfy.
    pub filter: &'a Filter,
    /// How to choose among the exits that do.
    pub policy: Policy,
    /// The sticky session, if any; only looked at with [`Policy::Sticky`].
    pub session: Option<&'a SessionSpec>,
    /// The target host (for domain bans), compared case-insensitively without a
    /// trailing dot.
    pub domain: &'a str,
}

/// The chosen exit and where to go if it fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// The exit to use.
    pub primary: ExitId,
    /// Other eligible exits in policy order (never the primary, no repeats), at most
    /// [`RotatorConfig::max_fallbacks`]. Empty for a sticky session that does not allow
    /// replacement: failing over would silently break the session.
    pub fallbacks: Vec<ExitId>,
}

/// Where a ban applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BanScope {
    /// Requests to this host (exact match after normalisation).
    Domain(String),
    /// All requests.
    Global,
}

// === Config ===

/// Tuning of a [`Rotator`]; `Default` gives sensible values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotatorConfig {
    /// Most fallbacks returned with a selection.
    pub max_fallbacks: usize,
    /// Most sticky sessions kept (least recently used evicted beyond).
    pub max_sessions: u64,
    /// Longest session TTL honoured; also moka's idle backstop.
    #[serde(with = "humantime_serde")]
    pub max_session_ttl: Duration,
    /// Weight of a new latency sample in the EWMA, in (0, 1].
    pub ewma_alpha: f64,
    /// Most domain bans one exit carries; beyond, the one ending soonest is dropped.
    pub max_domain_bans_per_exit: usize,
    /// Slots of the lossy token -> last exit table used by [`Policy::PerRequest`]
    /// (two tokens sharing a slot only lose their "not the same as last time" memory).
    pub per_request_slots: usize,
}

impl Default for RotatorConfig {
    fn default() -> Self {
        Self {
            max_fallbacks: 3,
            max_sessions: 100_000,
            max_session_ttl: Duration::from_secs(24 * 3600),
            ewma_alpha: 0.3,
            max_domain_bans_per_exit: 4096,
            per_request_slots: 16_384,
        }
    }
}

impl RotatorConfig {
    /// Checks every field; the error names the one at fault.
    pub fn validate(&self) -> Result<(), ParseError> {
        let bad = |field, reason: &str| {
            Err(ParseError::BadRotatorConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return bad("ewma_alpha", "must be in (0, 1]");
        }
        if self.max_fallbacks > 64 {
            return bad("max_fallbacks", "at most 64");
        }
        if self.max_sessions == 0 {
            return bad("max_sessions", "must be at least 1");
        }
        if self.max_session_ttl.is_zero() {
            return bad("max_session_ttl", "must be positive");
        }
        if self.max_domain_bans_per_exit == 0 {
            return bad("max_domain_bans_per_exit", "must be at least 1");
        }
        if self.per_request_slots == 0 || self.per_request_slots > 1 << 24 {
            return bad("per_request_slots", "must be 1..=16777216");
        }
        Ok(())
    }

    /// The same config with every out-of-range field brought back into range.
    fn sanitised(mut self) -> Self {
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            self.ewma_alpha = Self::default().ewma_alpha;
        }
        self.max_fallbacks = self.max_fallbacks.min(64);
        self.max_sessions = self.max_sessions.max(1);
        if self.max_session_ttl.is_zero() {
            self.max_session_ttl = Self::default().max_session_ttl;
        }
        self.max_domain_bans_per_exit = self.max_domain_bans_per_exit.max(1);
        self.per_request_slots = self.per_request_slots.clamp(1, 1 << 24);
        self
    }
}

// === Snapshots for the admin API ===

/// One active ban of an exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BanSnapshot {
    /// Where it applies.
    pub scope: BanScope,
    /// Time left.
    #[serde(rename = "remaining_ms", serialize_with = "crate::serde_millis")]
    pub remaining: Duration,
}

/// The state of one exit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExitSnapshot {
    /// The exit's id.
    pub id: ExitId,
    /// Its attributes.
    pub attrs: ExitAttributes,
    /// Whether it is considered healthy.
    pub healthy: bool,
    /// Requests in flight ([`InFlight`] guards alive).
    pub in_flight: u64,
    /// Requests begun ([`Rotator::begin`]) since the exit was added.
    pub requests: u64,
    /// Successes recorded.
    pub successes: u64,
    /// Failures recorded.
    pub failures: u64,
    /// Latency EWMA in milliseconds, once a success was recorded.
    pub latency_ewma_ms: Option<f64>,
    /// Active bans, global first then domains by name.
    pub bans: Vec<BanSnapshot>,
}

/// One live sticky session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionSnapshot {
    /// The first characters of the owning token (never the whole credential).
    pub token_hint: String,
    /// The session id.
    pub session: String,
    /// The exit it is bound to.
    pub exit: ExitId,
    /// Time left before it expires unless used.
    #[serde(rename = "remaining_ms", serialize_with = "crate::serde_millis")]
    pub remaining: Duration,
}

// === Internal state ===

const NO_SAMPLE: u64 = u64::MAX;

/// Mutable per-exit state; survives reloads as long as the id stays.
#[derive(Debug)]
struct ExitState {
    healthy: AtomicBool,
    in_flight: AtomicU64,
    requests: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    /// f64 bits of the EWMA in ms, or [`NO_SAMPLE`].
    ewma_bits: AtomicU64,
    /// Nanoseconds since the rotator's epoch; 0 = none.
    global_ban_until: AtomicU64,
    /// Set while `domain_bans` may be non-empty, so the lock is skipped otherwise.
    domain_bans_active: AtomicBool,
    domain_bans: Mutex<HashMap<Box<str>, u64>>,
}

impl ExitState {
    fn new() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ewma_bits: AtomicU64::new(NO_SAMPLE),
            global_ban_until: AtomicU64::new(0),
            domain_bans_active: AtomicBool::new(false),
            domain_bans: Mutex::new(HashMap::new()),
        }
    }

    /// When the latest ban that applies to `domain` ends, if one is active at `now`.
    fn banned_until(&self, now: u64, domain: &str) -> Option<u64> {
        let global = self.global_ban_until.load(Ordering::Acquire);
        let mut until = (global > now).then_some(global);
        if self.domain_bans_active.load(Ordering::Acquire)
            && let Some(&d) = self.domain_bans.lock().get(domain)
            && d > now
        {
            until = Some(until.map_or(d, |g| g.max(d)));
        }
        until
    }

    fn ewma_ms(&self) -> Option<f64> {
        let bits = self.ewma_bits.load(Ordering::Relaxed);
        (bits != NO_SAMPLE).then(|| f64::from_bits(bits))
    }
}

#[derive(Debug)]
struct Slot {
    info: ExitInfo,
    /// Short hash of the id, for the per-request memory table.
    tag: u32,
    state: Arc<ExitState>,
}

/// Exits of one index key, in a fixed order, with the round-robin cursor.
#[derive(Debug, Default)]
struct Bucket {
    members: Vec<u32>,
    /// Position (in `members`) of the last round-robin pick; `usize::MAX` = none yet.
    last_rr: AtomicUsize,
}

impl Bucket {
    fn new(members: Vec<u32>) -> Self {
        Self {
            members,
            last_rr: AtomicUsize::new(usize::MAX),
        }
    }
}

/// An immutable snapshot of the exit set and its indexes.
#[derive(Debug, Default)]
struct Pool {
    slots: Vec<Slot>,
    by_id: HashMap<ExitId, u32>,
    all: Bucket,
    by_country: HashMap<CountryCode, Bucket>,
    empty: Bucket,
}

impl Pool {
    /// Builds the indexes; `slots` must have distinct ids.
    fn build(mut slots: Vec<Slot>) -> Self {
        slots.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        let mut by_id = HashMap::with_capacity(slots.len());
        let mut by_country: HashMap<CountryCode, Vec<u32>> = HashMap::new();
        let mut all = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter().enumerate() {
            // Pools are far below 2^32 exits.
            let i = i as u32;
            by_id.insert(slot.info.id.clone(), i);
            all.push(i);
            if let Some(c) = slot.info.attrs.country {
                by_country.entry(c).or_default().push(i);
            }
        }
        Self {
            slots,
            by_id,
            all: Bucket::new(all),
            by_country: by_country
                .into_iter()
                .map(|(c, m)| (c, Bucket::new(m)))
                .collect(),
            empty: Bucket::new(Vec::new()),
        }
    }

    fn bucket_for(&self, filter: &Filter) -> &Bucket {
        match &filter.country {
            Some(c) => self.by_country.get(c).unwrap_or(&self.empty),
            None => &self.all,
        }
    }

    fn state(&self, id: &ExitId) -> Option<&Arc<ExitState>> {
        self.by_id.get(id).map(|&i| &self.slots[i as usize].state)
    }
}

/// The exits of a bucket that can serve a request, by position in the bucket.
type Eligible = SmallVec<[u32; 64]>;
/// Chosen slot indexes, primary first.
type Order = SmallVec<[u32; 8]>;

/// A sticky session's binding; the deadline is renewed in place on use.
#[derive(Debug)]
struct Binding {
    exit: ExitId,
    filter: Filter,
    /// Nanoseconds since the rotator's epoch.
    deadline: AtomicU64,
}

// === Rotator ===

/// Chooses an exit for each request. `Send + Sync`; share it in an `Arc`.
pub struct Rotator {
    cfg: RotatorConfig,
    clock: Arc<dyn Clock>,
    epoch: Instant,
    pool: RwLock<Arc<Pool>>,
    sessions: moka::sync::Cache<String, Arc<Binding>>,
    /// token tag (high 32 bits) | exit tag (low 32 bits) of the last per-request pick.
    last_pick: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl fmt::Debug for Rotator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotator")
            .field("exits", &self.pool.read().slots.len())
            .field("sessions", &self.sessions.entry_count())
            .finish_non_exhaustive()
    }
}

/// What a scan of a bucket found.
struct Scan {
    eligible: Eligible,
    /// Earliest end of a ban among matching healthy exits that are banned.
    first_unban: Option<u64>,
}

impl Rotator {
    /// An empty rotator; out-of-range config values are replaced by defaults (call
    /// [`RotatorConfig::validate`] first to report them).
    pub fn new(cfg: RotatorConfig, clock: Arc<dyn Clock>) -> Self {
        let cfg = cfg.sanitised();
        let sessions = moka::sync::Cache::builder()
            .max_capacity(cfg.max_sessions)
            // LRU admits every new session; TinyLFU could refuse a fresh binding.
            .eviction_policy(EvictionPolicy::lru())
            .time_to_idle(cfg.max_session_ttl)
            .build();
        Self {
            epoch: clock.now(),
            clock,
            pool: RwLock::new(Arc::new(Pool::default())),
            sessions,
            last_pick: (0..cfg.per_request_slots)
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: RandomState::new(),
            cfg,
        }
    }

    /// The config in use (after sanitising).
    pub fn config(&self) -> &RotatorConfig {
        &self.cfg
    }

    fn now(&self) -> u64 {
        let since = self.clock.now().saturating_duration_since(self.epoch);
        // Nanosecond 0 means "no ban": start counting at 1.
        u64::try_from(since.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn snapshot(&self) -> Arc<Pool> {
        Arc::clone(&self.pool.read())
    }

    fn state(&self, id: &ExitId) -> Option<Arc<ExitState>> {
        self.pool.read().state(id).cloned()
    }

    fn tag(&self, id: &ExitId) -> u32 {
        // Truncation intended: a short hash.
        self.hasher.hash_one(id.as_str()) as u32
    }

    // --- pool changes ---

    /// Replaces the exit set (hot reload, pool change). Exits whose id stays keep
    /// their health, counters, latency and bans; sessions bound to removed exits are
    /// dropped when next used. With duplicate ids the last one wins.
    pub fn set_exits(&self, exits: Vec<ExitInfo>) {
        let mut guard = self.pool.write();
        let old = Arc::clone(&guard);
        let mut by_id: HashMap<ExitId, ExitInfo> = HashMap::with_capacity(exits.len());
        for e in exits {
            by_id.insert(e.id.clone(), e);
        }
        let slots = by_id
            .into_values()
            .map(|info| {
                let state = old
                    .state(&info.id)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(ExitState::new()));
                Slot {
                    tag: self.tag(&info.id),
                    info,
                    state,
                }
            })
            .collect();
        *guard = Arc::new(Pool::build(slots));
    }

    /// Adds an exit, or replaces the attributes of the exit with that id (keeping its
    /// state).
    pub fn upsert_exit(&self, exit: ExitInfo) {
        let mut guard = self.pool.write();
        let mut slots: Vec<Slot> = guard
            .slots
            .iter()
            .filter(|s| s.info.id != exit.id)
            .map(|s| Slot {
                info: s.info.clone(),
                tag: s.tag,
                state: Arc::clone(&s.state),
            })
            .collect();
        let state = guard
            .state(&exit.id)
            .cloned()
            .unwrap_or_else(|| Arc::new(ExitState::new()));
        slots.push(Slot {
            tag: self.tag(&exit.id),
            info: exit,
            state,
        });
        *guard = Arc::new(Pool::build(slots));
    }

    /// Removes an exit (its state is dropped); unknown ids are ignored.
    pub fn remove_exit(&self, id: &ExitId) {
        let mut guard = self.pool.write();
        if !guard.by_id.contains_key(id) {
            return;
        }
        let slots = guard
            .slots
            .iter()
            .filter(|s| s.info.id != *id)
            .map(|s| Slot {
                info: s.info.clone(),
                tag: s.tag,
                state: Arc::clone(&s.state),
            })
            .collect();
        *guard = Arc::new(Pool::build(slots));
    }

    /// Marks an exit healthy or not (new exits start healthy); unknown ids are ignored.
    pub fn set_healthy(&self, id: &ExitId, healthy: bool) {
        if let Some(s) = self.state(id) {
            s.healthy.store(healthy, Ordering::Release);
        }
    }

    // --- selection ---

    /// Chooses the exit for one request, with fallbacks.
    ///
    /// With [`Policy::Sticky`] and a session, the session's exit is returned and its
    /// TTL renewed while it stays usable (present, healthy, not banned for the domain,
    /// still matching the filter); a session asked for with a different filter than it
    /// was bound with is bound afresh. A session is only honoured with `Sticky`.
    pub fn select(&self, req: &SelectRequest<'_>) -> Result<Selection, SelectError> {
        self.select_inner(req, None)
    }

    /// Like [`select`](Self::select), but prefers exits whose exit and exit x domain
    /// limits in `limits` would let the request through now (a peek, nothing taken).
    /// When every eligible exit is limited the choice is made among all of them, and
    /// the gateway's [`RateLimiter::check`] reports the wait. A live sticky session
    /// keeps its exit even when it is limited.
    pub fn select_with_limits(
        &self,
        req: &SelectRequest<'_>,
        limiter: &RateLimiter,
        limits: &LimitSet,
    ) -> Result<Selection, SelectError> {
        self.select_inner(req, Some((limiter, limits)))
    }

    fn select_inner(
        &self,
        req: &SelectRequest<'_>,
        limits: Option<(&RateLimiter, &LimitSet)>,
    ) -> Result<Selection, SelectError> {
        let now = self.now();
        let pool = self.snapshot();
        let domain = normalize_domain(req.domain);
        let ctx = Ctx {
            pool: &pool,
            bucket: pool.bucket_for(req.filter),
            filter: req.filter,
            domain: &domain,
            now,
            limits: limits
                .filter(|(_, set)| set.per_exit.is_some() || set.per_exit_domain.is_some()),
        };
        let k = self.cfg.max_fallbacks + 1;
        let policy = match (req.policy, req.session) {
            (Policy::Sticky, Some(spec)) => return self.select_sticky(&ctx, req, spec),
            (Policy::Sticky, None) => Policy::PerRequest,
            (policy, _) => policy,
        };
        // Large buckets: Random and PerRequest draw random members and keep the usable
        // ones, without scanning the bucket (same distribution, O(k) on average).
        match policy {
            Policy::Random => {
                if let Some(order) = ctx.sample(k, |_| false) {
                    return Ok(selection(&pool, &order));
                }
            }
            Policy::PerRequest => {
                let memory = self.per_request_memory(req.token);
                let prev = memory.previous();
                if let Some(order) =
                    ctx.sample(k, |slot| Some(pool.slots[slot as usize].tag) == prev)
                {
                    memory.remember(&pool, &order);
                    return Ok(selection(&pool, &order));
                }
            }
            _ => {}
        }
        let mut eligible = nonempty(ctx.scan(), req.filter, &domain, now)?;
        ctx.prefer_unlimited(&mut eligible);
        let order = self.order(policy, &ctx, &mut eligible, req.token);
        Ok(selection(&pool, &order))
    }

    fn select_sticky(
        &self,
        ctx: &Ctx<'_>,
        req: &SelectRequest<'_>,
        spec: &SessionSpec,
    ) -> Result<Selection, SelectError> {
        let invalid = |reason| SelectError::InvalidSession {
            session: truncate(&spec.id),
            reason,
        };
        if spec.id.is_empty() {
            return Err(invalid("empty session id"));
        }
        if spec.id.len() > MAX_SESSION_ID {
            return Err(invalid("session id longer than 256 bytes"));
        }
        if spec.ttl.is_zero() {
            return Err(invalid("session TTL is zero"));
        }
        let ttl =
            u64::try_from(spec.ttl.min(self.cfg.max_session_ttl).as_nanos()).unwrap_or(u64::MAX);
        let deadline = ctx.now.saturating_add(ttl);
        let fallbacks = if spec.allow_replacement {
            self.cfg.max_fallbacks
        } else {
            0
        };
        // The answer for a session bound to `primary`: fallbacks drawn at random from
        // the other usable exits.
        let answer = |primary: u32| {
            let mut order = Order::new();
            order.push(primary);
            if fallbacks > 0
                && let Ok(rest) = ctx.random(fallbacks, Some(primary))
            {
                order.extend(rest);
            }
            selection(ctx.pool, &order)
        };
        let key = session_key(req.token, &spec.id);

        // Fast path: a live binding with a usable exit; renew in place.
        if let Some(b) = self.sessions.get(&key)
            && b.deadline.load(Ordering::Acquire) > ctx.now
            && b.filter == *req.filter
            && let Some(&slot) = ctx.pool.by_id.get(&b.exit)
            && ctx.usable(slot)
        {
            b.deadline.fetch_max(deadline, Ordering::AcqRel);
            return Ok(answer(slot));
        }

        // Slow path, under moka's per-key lock so concurrent first uses agree.
        let mut out: Option<Result<Selection, SelectError>> = None;
        let bind_new = |out: &mut Option<Result<Selection, SelectError>>| -> Op<Arc<Binding>> {
            match ctx.random(fallbacks + 1, None) {
                Ok(order) => {
                    let sel = selection(ctx.pool, &order);
                    let binding = Arc::new(Binding {
                        exit: sel.primary.clone(),
                        filter: req.filter.clone(),
                        deadline: AtomicU64::new(deadline),
                    });
                    *out = Some(Ok(sel));
                    Op::Put(binding)
                }
                Err(e) => {
                    *out = Some(Err(e));
                    Op::Nop
                }
            }
        };
        self.sessions
            .entry_by_ref(key.as_str())
            .and_compute_with(|current| {
                let live = current.map(|e| e.into_value()).filter(|b| {
                    b.deadline.load(Ordering::Acquire) > ctx.now && b.filter == *req.filter
                });
                let Some(b) = live else {
                    return bind_new(&mut out);
                };
                let gone = || SelectError::SessionExitGone {
                    session: spec.id.clone(),
                    exit: b.exit.clone(),
                };
                match ctx.pool.by_id.get(&b.exit) {
                    Some(&slot) if ctx.usable(slot) => {
                        b.deadline.fetch_max(deadline, Ordering::AcqRel);
                        out = Some(Ok(answer(slot)));
                        Op::Nop
                    }
                    _ if spec.allow_replacement => bind_new(&mut out),
                    // Unhealthy or banned: keep the binding (it may come back), fail.
                    Some(_) => {
                        out = Some(Err(gone()));
                        Op::Nop
                    }
                    // Removed from the pool: fail once and forget the binding.
                    None => {
                        out = Some(Err(gone()));
                        Op::Remove
                    }
                }
            });
        out.unwrap_or_else(|| Err(no_exit_error(None, req.filter, ctx.domain, ctx.now)))
    }

    fn per_request_memory(&self, token: &str) -> Memory<'_> {
        let h = self.hasher.hash_one(token);
        Memory {
            cell: &self.last_pick[(h as usize) % self.last_pick.len()],
            // Truncation intended: the high half of the hash tags the token.
            token_tag: (h >> 32) as u32,
        }
    }

    /// Orders `eligible` (positions in the bucket) by `policy`; returns up to
    /// `max_fallbacks + 1` slot indexes.
    fn order(&self, policy: Policy, ctx: &Ctx<'_>, eligible: &mut Eligible, token: &str) -> Order {
        let (pool, bucket) = (ctx.pool, ctx.bucket);
        let k = self.cfg.max_fallbacks + 1;
        let mut order = Order::new();
        match policy {
            Policy::Random | Policy::Sticky => shuffle_into(eligible, 0, k, bucket, &mut order),
            Policy::PerRequest => {
                let memory = self.per_request_memory(token);
                let n = eligible.len();
                let mut start = 0;
                if n >= 2
                    && let Some(prev) = memory.previous()
                    && let Some(i) = eligible
                        .iter()
                        .position(|&p| pool.slots[bucket.members[p as usize] as usize].tag == prev)
                {
                    // Park the previous exit last and draw the primary from the others;
                    // the previous one may still come back as a fallback.
                    eligible.swap(i, n - 1);
                    eligible.swap(0, rng::below(n - 1));
                    order.push(bucket.members[eligible[0] as usize]);
                    start = 1;
                }
                shuffle_into(eligible, start, k - order.len(), bucket, &mut order);
                memory.remember(pool, &order);
            }
            Policy::RoundRobin => {
                let last = bucket.last_rr.load(Ordering::Relaxed);
                // `eligible` is in bucket order: start after the last pick, wrapping.
                let start = if last == usize::MAX {
                    0
                } else {
                    eligible.partition_point(|&p| p as usize <= last) % eligible.len()
                };
                bucket
                    .last_rr
                    .store(eligible[start] as usize, Ordering::Relaxed);
                for i in 0..k.min(eligible.len()) {
                    let p = eligible[(start + i) % eligible.len()];
                    order.push(bucket.members[p as usize]);
                }
            }
            Policy::LeastLoaded => smallest_into(eligible, k, bucket, &mut order, |slot| {
                pool.slots[slot as usize]
                    .state
                    .in_flight
                    .load(Ordering::Relaxed)
            }),
            Policy::Fastest => smallest_into(eligible, k, bucket, &mut order, |slot| {
                match pool.slots[slot as usize]
                    .state
                    .ewma_bits
                    .load(Ordering::Relaxed)
                {
                    // Unmeasured exits first, so every exit gets a sample.
                    NO_SAMPLE => 0,
                    // Non-negative f64 bits order like the values; +1 keeps 0.0 after
                    // "no sample".
                    bits => bits.saturating_add(1),
                }
            }),
        }
        order
    }

    // --- accounting ---

    /// Counts a request starting on `id`; the guard keeps it "in flight" (for
    /// [`Policy::LeastLoaded`]) until dropped. Unknown ids give an inert guard.
    pub fn begin(&self, id: &ExitId) -> InFlight {
        let state = self.state(id);
        if let Some(s) = &state {
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        InFlight { state }
    }

    /// Records a success and folds `latency` into the exit's EWMA.
    pub fn record_success(&self, id: &ExitId, latency: Duration) {
        let Some(s) = self.state(id) else { return };
        s.successes.fetch_add(1, Ordering::Relaxed);
        let sample = latency.as_secs_f64() * 1000.0;
        let alpha = self.cfg.ewma_alpha;
        // fetch_update only fails if the closure returns None, which it never does.
        let _ = s
            .ewma_bits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                let next = if bits == NO_SAMPLE {
                    sample
                } else {
                    alpha * sample + (1.0 - alpha) * f64::from_bits(bits)
                };
                Some(next.to_bits())
            });
    }

    /// Records a failure (counted; the latency EWMA is untouched).
    pub fn record_failure(&self, id: &ExitId) {
        if let Some(s) = self.state(id) {
            s.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cools an exit down for `cooldown`, for one domain or globally. A ban never
    /// shortens an existing one. Unknown ids are ignored.
    pub fn ban(&self, id: &ExitId, scope: BanScope, cooldown: Duration) {
        let Some(s) = self.state(id) else { return };
        let now = self.now();
        let until = now.saturating_add(u64::try_from(cooldown.as_nanos()).unwrap_or(u64::MAX));
        match scope {
            BanScope::Global => {
                s.global_ban_until.fetch_max(until, Ordering::AcqRel);
            }
            BanScope::Domain(domain) => {
                let domain = normalize_domain(&domain);
                let mut bans = s.domain_bans.lock();
                let entry = bans.entry(Box::from(domain.as_ref())).or_insert(0);
                *entry = (*entry).max(until);
                if bans.len() > self.cfg.max_domain_bans_per_exit {
                    bans.retain(|_, &mut t| t > now);
                }
                while bans.len() > self.cfg.max_domain_bans_per_exit {
                    // Drop the ban that ends first.
                    let first = bans.iter().min_by_key(|(_, t)| **t).map(|(d, _)| d.clone());
                    match first {
                        Some(d) => bans.remove(&d),
                        None => break,
                    };
                }
                s.domain_bans_active.store(true, Ordering::Release);
            }
        }
    }

    /// Lifts every ban of an exit.
    pub fn unban(&self, id: &ExitId) {
        if let Some(s) = self.state(id) {
            s.global_ban_until.store(0, Ordering::Release);
            let mut bans = s.domain_bans.lock();
            bans.clear();
            s.domain_bans_active.store(false, Ordering::Release);
        }
    }

    /// Ends a sticky session; true if it existed.
    pub fn end_session(&self, token: &str, session: &str) -> bool {
        self.sessions.remove(&session_key(token, session)).is_some()
    }

    /// Housekeeping to call periodically: drops expired domain bans and expired
    /// sessions, and lets moka apply pending evictions.
    pub fn prune(&self) {
        let now = self.now();
        let pool = self.snapshot();
        for slot in &pool.slots {
            let mut bans = slot.state.domain_bans.lock();
            bans.retain(|_, &mut t| t > now);
            if bans.is_empty() {
                bans.shrink_to_fit();
                slot.state
                    .domain_bans_active
                    .store(false, Ordering::Release);
            }
        }
        let expired: Vec<Arc<String>> = self
            .sessions
            .iter()
            .filter(|(_, b)| b.deadline.load(Ordering::Acquire) <= now)
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            // Re-check under the key lock: it may have been renewed meanwhile.
            self.sessions
                .entry_by_ref(k.as_str())
                .and_compute_with(|cur| match cur {
                    Some(e) if e.value().deadline.load(Ordering::Acquire) <= now => Op::Remove,
                    _ => Op::Nop,
                });
        }
        self.sessions.run_pending_tasks();
    }

    // --- snapshots ---

    /// The state of every exit, sorted by id (for the admin API).
    pub fn exits(&self) -> Vec<ExitSnapshot> {
        let now = self.now();
        let pool = self.snapshot();
        pool.slots
            .iter()
            .map(|slot| {
                let s = &slot.state;
                let mut bans = Vec::new();
                let global = s.global_ban_until.load(Ordering::Acquire);
                if global > now {
                    bans.push(BanSnapshot {
                        scope: BanScope::Global,
                        remaining: Duration::from_nanos(global - now),
                    });
                }
                let mut domains: Vec<BanSnapshot> = s
                    .domain_bans
                    .lock()
                    .iter()
                    .filter(|(_, t)| **t > now)
                    .map(|(d, t)| BanSnapshot {
                        scope: BanScope::Domain(d.to_string()),
                        remaining: Duration::from_nanos(t - now),
                    })
                    .collect();
                domains.sort_by(|a, b| a.scope_name().cmp(b.scope_name()));
                bans.extend(domains);
                ExitSnapshot {
                    id: slot.info.id.clone(),
                    attrs: slot.info.attrs.clone(),
                    healthy: s.healthy.load(Ordering::Acquire),
                    in_flight: s.in_flight.load(Ordering::Acquire),
                    requests: s.requests.load(Ordering::Relaxed),
                    successes: s.successes.load(Ordering::Relaxed),
                    failures: s.failures.load(Ordering::Relaxed),
                    latency_ewma_ms: s.ewma_ms(),
                    bans,
                }
            })
            .collect()
    }

    /// Every live sticky session, sorted by token hint then session id.
    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        let now = self.now();
        let mut out: Vec<SessionSnapshot> = self
            .sessions
            .iter()
            .filter_map(|(key, b)| {
                let deadline = b.deadline.load(Ordering::Acquire);
                if deadline <= now {
                    return None;
                }
                let (token, session) = split_session_key(&key)?;
                Some(SessionSnapshot {
                    token_hint: token_hint(token),
                    session: session.to_owned(),
                    exit: b.exit.clone(),
                    remaining: Duration::from_nanos(deadline - now),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.token_hint, &a.session).cmp(&(&b.token_hint, &b.session)));
        out
    }

    /// How many sessions the cache holds (including expired ones not yet evicted).
    pub fn session_count(&self) -> u64 {
        self.sessions.run_pending_tasks();
        self.sessions.entry_count()
    }
}

impl BanSnapshot {
    fn scope_name(&self) -> &str {
        match &self.scope {
            BanScope::Domain(d) => d,
            BanScope::Global => "",
        }
    }
}

/// Keeps an exit's in-flight count up while alive. `Send`; move it into the task that
/// relays the request.
#[derive(Debug)]
#[must_use = "the request counts as in flight only while the guard lives"]
pub struct InFlight {
    state: Option<Arc<ExitState>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = &self.state {
            s.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

// === Helpers ===

/// Lower-cases a host and strips one trailing dot, borrowing when already normal.
pub fn normalize_domain(domain: &str) -> Cow<'_, str> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

fn no_exit_error(first_unban: Option<u64>, filter: &Filter, domain: &str, now: u64) -> SelectError {
    match first_unban {
        Some(until) => SelectError::AllCoolingDown {
            filter: filter.clone(),
            domain: domain.to_owned(),
            retry_after: Duration::from_nanos(until.saturating_sub(now)),
        },
        None => SelectError::NoExitMatches {
            filter: filter.clone(),
        },
    }
}

fn nonempty(scan: Scan, filter: &Filter, domain: &str, now: u64) -> Result<Eligible, SelectError> {
    if scan.eligible.is_empty() {
        Err(no_exit_error(scan.first_unban, filter, domain, now))
    } else {
        Ok(scan.eligible)
    }
}

/// Buckets at least this large are sampled rather than scanned by the random policies.
const SAMPLE_MIN: usize = 32;

/// Everything one selection looks at.
struct Ctx<'a> {
    pool: &'a Pool,
    bucket: &'a Bucket,
    filter: &'a Filter,
    domain: &'a str,
    now: u64,
    /// Only set when the set has an exit or exit x domain limit.
    limits: Option<(&'a RateLimiter, &'a LimitSet)>,
}

impl Ctx<'_> {
    /// Matches the filter, healthy, not banned for the domain.
    fn usable(&self, slot: u32) -> bool {
        let slot = &self.pool.slots[slot as usize];
        self.filter.matches(&slot.info.attrs)
            && slot.state.healthy.load(Ordering::Acquire)
            && slot.state.banned_until(self.now, self.domain).is_none()
    }

    /// Every usable member of the bucket, in bucket order, and when the first banned
    /// one comes back.
    fn scan(&self) -> Scan {
        let mut eligible = Eligible::new();
        let mut first_unban: Option<u64> = None;
        for (pos, &i) in self.bucket.members.iter().enumerate() {
            let slot = &self.pool.slots[i as usize];
            if !self.filter.matches(&slot.info.attrs) || !slot.state.healthy.load(Ordering::Acquire)
            {
                continue;
            }
            if let Some(until) = slot.state.banned_until(self.now, self.domain) {
                first_unban = Some(first_unban.map_or(until, |f| f.min(until)));
                continue;
            }
            // Bucket positions fit: pools are far below 2^32 exits.
            eligible.push(pos as u32);
        }
        Scan {
            eligible,
            first_unban,
        }
    }

    /// `k` distinct usable members not `excluded`, drawn uniformly at random by
    /// rejection from a large bucket; `None` when the bucket is small, rate limits must
    /// be consulted, or the draws did not find `k` (then the caller scans).
    fn sample(&self, k: usize, excluded: impl Fn(u32) -> bool) -> Option<Order> {
        let members = &self.bucket.members;
        if members.len() < SAMPLE_MIN || self.limits.is_some() || k == 0 {
            return None;
        }
        let mut order = Order::new();
        for _ in 0..4 * k + 16 {
            let slot = members[rng::below(members.len())];
            if !order.contains(&slot) && !excluded(slot) && self.usable(slot) {
                order.push(slot);
                if order.len() == k {
                    return Some(order);
                }
            }
        }
        None
    }

    /// Up to `k` usable members (at least one) in random order, never `exclude`.
    fn random(&self, k: usize, exclude: Option<u32>) -> Result<Order, SelectError> {
        if let Some(order) = self.sample(k, |slot| Some(slot) == exclude) {
            return Ok(order);
        }
        let mut scan = self.scan();
        if let Some(x) = exclude {
            scan.eligible
                .retain(|p| self.bucket.members[*p as usize] != x);
        }
        let mut eligible = nonempty(scan, self.filter, self.domain, self.now)?;
        self.prefer_unlimited(&mut eligible);
        let mut order = Order::new();
        shuffle_into(&mut eligible, 0, k, self.bucket, &mut order);
        Ok(order)
    }

    /// Keeps only the exits the rate limits would let through, unless that is none.
    fn prefer_unlimited(&self, eligible: &mut Eligible) {
        let Some((limiter, set)) = self.limits else {
            return;
        };
        let allowed: Eligible = eligible
            .iter()
            .copied()
            .filter(|&p| {
                let id = &self.pool.slots[self.bucket.members[p as usize] as usize]
                    .info
                    .id;
                limiter.exit_allows(set, id, self.domain)
            })
            .collect();
        if !allowed.is_empty() {
            *eligible = allowed;
        }
    }
}

/// The per-request memory cell of one token: which exit it was given last.
struct Memory<'a> {
    cell: &'a AtomicU64,
    token_tag: u32,
}

impl Memory<'_> {
    /// The tag of the exit this token was given last, if the cell is still its own.
    fn previous(&self) -> Option<u32> {
        let v = self.cell.load(Ordering::Relaxed);
        // Truncations intended: the cell packs two 32-bit tags.
        ((v >> 32) as u32 == self.token_tag).then_some(v as u32)
    }

    fn remember(&self, pool: &Pool, order: &Order) {
        if let Some(&primary) = order.first() {
            let exit_tag = pool.slots[primary as usize].tag;
            self.cell.store(
                (u64::from(self.token_tag) << 32) | u64::from(exit_tag),
                Ordering::Relaxed,
            );
        }
    }
}

/// Moves up to `k` random members of `eligible[start..]` (a partial Fisher-Yates) into
/// `order` as slot indexes.
fn shuffle_into(
    eligible: &mut Eligible,
    start: usize,
    k: usize,
    bucket: &Bucket,
    order: &mut Order,
) {
    let n = eligible.len();
    for i in start..start.saturating_add(k).min(n) {
        let j = i + rng::below(n - i);
        eligible.swap(i, j);
        order.push(bucket.members[eligible[i] as usize]);
    }
}

/// Moves the `k` members with the smallest `key` (ties broken at random) into `order`,
/// in one pass keeping a sorted top-k (k is small); the random tie-breaker is drawn only
/// for members that can still enter the top-k.
fn smallest_into(
    eligible: &Eligible,
    k: usize,
    bucket: &Bucket,
    order: &mut Order,
    key: impl Fn(u32) -> u64,
) {
    if k == 0 {
        return;
    }
    let mut best: SmallVec<[(u64, u64, u32); 8]> = SmallVec::new();
    for &p in eligible {
        let slot = bucket.members[p as usize];
        let primary = key(slot);
        if best.len() == k && best.last().is_some_and(|&(worst, _, _)| primary > worst) {
            continue;
        }
        let entry = (primary, rng::next_u64(), slot);
        let at = best.partition_point(|e| (e.0, e.1) < (entry.0, entry.1));
        if at < k {
            if best.len() == k {
                best.pop();
            }
            best.insert(at, entry);
        }
    }
    order.extend(best.iter().map(|&(_, _, slot)| slot));
}

fn selection(pool: &Pool, order: &Order) -> Selection {
    let mut ids = order
        .iter()
        .map(|&i| pool.slots[i as usize].info.id.clone());
    // Callers only build an order from a non-empty eligible set.
    let primary = ids.next().unwrap_or_else(|| ExitId::new(""));
    Selection {
        primary,
        fallbacks: ids.collect(),
    }
}

/// `len:token` + `session`: unambiguous whatever bytes either part holds.
fn session_key(token: &str, session: &str) -> String {
    format!("{}:{token}{session}", token.len())
}

fn split_session_key(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once(':')?;
    let len: usize = len.parse().ok()?;
    if !rest.is_char_boundary(len) {
        return None;
    }
    Some(rest.split_at(len))
}

fn token_hint(token: &str) -> String {
    if token.chars().count() < 12 {
        return "…".to_owned();
    }
    let mut hint: String = token.chars().take(4).collect();
    hint.push('…');
    hint
}
