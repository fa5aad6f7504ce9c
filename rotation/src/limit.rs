//! Rate limits with governor's GCRA: per client token, per exit, per exit x target
//! domain.
//!
//! A request passes only if all three limits allow it, and a refused request consumes
//! nothing from any limiter. governor has no "peek", so each limiter runs on our own
//! keyed state store ([`ProbeStore`]) whose keys carry a `commit` flag: a probe runs
//! governor's own GCRA test against the stored state but does not write the new state
//! back. [`RateLimiter::check`] probes all three, and only when all conform commits all
//! three. Between the probe and the commit another thread may take the last cell of a
//! later limiter; the commit then refuses and the earlier commits stand, so under a race
//! a refused request can consume at most one cell of the limiters checked before it.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::clock::{Clock, GovernorClock};
use crate::error::{ParseError, truncate};
use crate::rotator::{ExitId, normalize_domain};

// === Quota ===

/// A rate: `count` cells per `per`, with up to `burst` cells at once.
///
/// Written as `10/s`, `600/min`, `100/10s` or `5/s burst 20` (units: `ms`, `s`, `min`,
/// `h`, `d` and their long forms); the burst defaults to `count`. The cells are spread
/// evenly: `600/min` allows one every 100 ms once the burst is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    per: Duration,
    count: NonZeroU32,
    burst: NonZeroU32,
}

/// Longest quota text accepted.
const MAX_QUOTA_TEXT: usize = 64;

impl Quota {
    /// `count` cells per `per`, burst `burst`; refused when a cell would take less than a
    /// nanosecond or `per` is zero.
    pub fn new(count: NonZeroU32, per: Duration, burst: NonZeroU32) -> Result<Self, String> {
        if per.is_zero() {
            return Err("the period is zero".into());
        }
        if (per / count.get()).is_zero() {
            return Err("more than one cell per nanosecond".into());
        }
        if per > Duration::from_secs(365 * 24 * 3600) {
            return Err("the period is longer than a year".into());
        }
        Ok(Self { per, count, burst })
    }

    /// Cells per period.
    pub fn count(&self) -> NonZeroU32 {
        self.count
    }

    /// The period.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// Cells allowed at once.
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// One cell comes back every `per / count`.
    pub fn replenish_interval(&self) -> Duration {
        self.per / self.count.get()
    }

    fn to_governor(self) -> governor::Quota {
        // `new` ensured the interval is at least 1ns, so `with_period` is Some.
        governor::Quota::with_period(self.replenish_interval())
            .unwrap_or(governor::Quota::per_second(self.count))
            .allow_burst(self.burst)
    }
}

impl FromStr for Quota {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ParseError::BadQuota {
            text: truncate(text),
            reason: reason.to_owned(),
        };
        if text.len() > MAX_QUOTA_TEXT {
            return Err(err("longer than 64 bytes"));
        }
        let (rate, burst) = match text.split_once("burst") {
            Some((rate, burst)) => (rate, Some(burst.trim())),
            None => (text, None),
        };
        let (count, period) = rate.trim().split_once('/').ok_or_else(|| err("no `/`"))?;
        let count =
            parse_positive(count.trim()).ok_or_else(|| err("count must be 1..4294967295"))?;
        let per = parse_period(period.trim()).ok_or_else(|| err("unknown period"))?;
        let burst = match burst {
            None => count,
            Some(b) => parse_positive(b).ok_or_else(|| err("burst must be 1..4294967295"))?,
        };
        Quota::new(count, per, burst).map_err(|reason| err(&reason))
    }
}

fn parse_positive(s: &str) -> Option<NonZeroU32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<NonZeroU32>().ok()
}

/// `s`, `10s`, `min`, `5 min`, `100ms`: an optional positive multiplier and a unit.
fn parse_period(s: &str) -> Option<Duration> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = s.split_at(digits);
    let n = if n.is_empty() {
        1
    } else {
        parse_positive(n)?.get()
    };
    let unit_nanos: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "ms" | "msec" | "millisecond" | "milliseconds" => 1_000_000,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000_000_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000_000_000,
        "h" | "hr" | "hour" | "hours" => 3_600_000_000_000,
        "d" | "day" | "days" => 86_400_000_000_000,
        _ => return None,
    };
    unit_nanos
        .checked_mul(u64::from(n))
        .map(Duration::from_nanos)
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.count)?;
        let nanos = self.per.as_nanos();
        let units: [(u128, &str); 5] = [
            (86_400_000_000_000, "d"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "min"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
        ];
        match units.iter().find(|(u, _)| nanos.is_multiple_of(*u)) {
            Some((u, name)) if nanos == *u => f.write_str(name)?,
            Some((u, name)) => write!(f, "{}{name}", nanos / u)?,
            // Not a whole number of milliseconds: only reachable through `Quota::new`.
            None => write!(f, "{}ms", nanos / 1_000_000)?,
        }
        if self.burst != self.count {
            write!(f, " burst {}", self.burst)?;
        }
        Ok(())
    }
}

impl Serialize for Quota {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

// === LimitSet ===

/// The limits that apply to one request; any of them may be absent.
///
/// ```toml
/// [limits]
/// per_exit = "20/s"
/// per_exit_domain = "2/s burst 5"
/// per_token = "100/s"
/// per_account = "10/s"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSet {
    /// All requests through one exit.
    pub per_exit: Option<Quota>,
    /// Requests through one exit to one target domain.
    pub per_exit_domain: Option<Quota>,
    /// All requests of one client token.
    pub per_token: Option<Quota>,
    /// All requests of one account (a sub-user of a token); only checked by
    /// [`RateLimiter::check_account`].
    pub per_account: Option<Quota>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitScope {
    /// The exit's own limit.
    Exit,
    /// The exit's limit for this target domain.
    ExitDomain,
    /// The client token's limit.
    Token,
    /// The account's limit.
    Account,
}

impl fmt::Display for LimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exit => "exit",
            Self::ExitDomain => "exit-domain",
            Self::Token => "token",
            Self::Account => "account",
        })
    }
}

/// A request refused by a rate limit. The gateway may wait `retry_after` (bounded)
/// or answer 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit {quota} per {scope} reached; retry in {retry_after:?}")]
pub struct Limited {
    /// The limit that refused.
    pub scope: LimitScope,
    /// The quota of that limit.
    pub quota: Quota,
    /// How long until that limit lets one more request through.
    pub retry_after: Duration,
}

// === The probe-able keyed store ===

/// A key with a flag saying whether the GCRA outcome is written back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Probe<K> {
    key: K,
    commit: bool,
}

const SHARDS: usize = 16;

/// Keyed GCRA state (theoretical arrival time, nanoseconds since the limiter's start),
/// sharded to keep lock contention low.
struct ProbeStore<K> {
    shards: Box<[Mutex<HashMap<K, u64>>]>,
    hasher: RandomState,
}

impl<K> fmt::Debug for ProbeStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeStore").finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> ProbeStore<K> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u64>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        &self.shards[i]
    }
}

impl<K: Hash + Eq + Clone> StateStore for ProbeStore<K> {
    type Key = Probe<K>;

    fn measure_and_replace<T, F, E>(&self, probe: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.shard(&probe.key).lock();
        let current = map.get(&probe.key).copied().map(Nanos::from);
        let (outcome, new) = f(current)?;
        if probe.commit {
            match map.get_mut(&probe.key) {
                Some(v) => *v = new.as_u64(),
                None => {
                    map.insert(probe.key.clone(), new.as_u64());
                }
            }
        }
        Ok(outcome)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<Probe<K>> for ProbeStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = drop_below.as_u64();
        for shard in self.shards.iter() {
            shard.lock().retain(|_, tat| *tat > below);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in self.shards.iter() {
            shard.lock().shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.lock().is_empty())
    }
}

type Gov<K> =
    governor::RateLimiter<Probe<K>, ProbeStore<K>, GovernorClock, NoOpMiddleware<Instant>>;

/// The limiters of one scope, one per distinct quota (a reload that changes a quota
/// starts that limit afresh).
struct Scope<K: Hash + Eq + Clone> {
    limiters: RwLock<HashMap<Quota, Arc<Gov<K>>>>,
}

impl<K: Hash + Eq + Clone> Scope<K> {
    fn new() -> Self {
        Self {
            limiters: RwLock::new(HashMap::new()),
        }
    }

    fn limiter(&self, quota: Quota, clock: &Arc<dyn Clock>) -> Arc<Gov<K>> {
        if let Some(l) = self.limiters.read().get(&quota) {
            return Arc::clone(l);
        }
        let mut map = self.limiters.write();
        Arc::clone(map.entry(quota).or_insert_with(|| {
            Arc::new(governor::RateLimiter::new(
                quota.to_governor(),
                ProbeStore::new(),
                GovernorClock(Arc::clone(clock)),
            ))
        }))
    }

    fn prune(&self) {
        let mut map = self.limiters.write();
        map.retain(|_, limiter| {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            !limiter.is_empty()
        });
        map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.limiters.read().values().map(|l| l.len()).sum()
    }
}

/// One pending check: the limiter, the probe key and what to report on refusal.
struct Step<K: Hash + Eq + Clone> {
    limiter: Arc<Gov<K>>,
    probe: Probe<K>,
    scope: LimitScope,
    quota: Quota,
}

/// One limiter step, whatever its key type.
trait Check {
    /// Tests one cell; writes the new state back only when `commit`.
    fn run(&mut self, commit: bool, clock: &dyn Clock) -> Result<(), Limited>;
}

impl<K: Hash + Eq + Clone> Check for Step<K> {
    fn run(&mut self, commit: bool, clock: &dyn Clock) -> Result<(), Limited> {
        self.probe.commit = commit;
        self.limiter
            .check_key(&self.probe)
            .map_err(|not_until| Limited {
                scope: self.scope,
                quota: self.quota,
                retry_after: not_until
                    .earliest_possible()
                    .saturating_duration_since(clock.now()),
            })
    }
}

// === RateLimiter ===

/// Per-token, per-exit and per-exit-x-domain rate limits. `Send + Sync`; share it in an
/// `Arc`. Call [`RateLimiter::prune`] periodically (e.g. every minute) so the keyed
/// state of idle keys is dropped and memory stays bounded.
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    token: Scope<Box<str>>,
    account: Scope<Box<str>>,
    exit: Scope<ExitId>,
    exit_domain: Scope<(ExitId, Box<str>)>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("tracked_keys", &self.tracked_keys())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// An empty limiter reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            token: Scope::new(),
            account: Scope::new(),
            exit: Scope::new(),
            exit_domain: Scope::new(),
        }
    }

    /// Takes one cell from each limit in `limits` that applies (token, then exit, then
    /// exit x domain), or none at all when one refuses; the error names the first limit
    /// that refused and how long until it would allow the request. The domain is
    /// compared case-insensitively, without a trailing dot.
    pub fn check(
        &self,
        limits: &LimitSet,
        token: &str,
        exit: &ExitId,
        domain: &str,
    ) -> Result<(), Limited> {
        self.check_keys(limits, token, None, exit, domain)
    }

    /// As [`RateLimiter::check`], with the account's limit too (`limits.per_account`,
    /// keyed by `account`), checked after the token's.
    pub fn check_account(
        &self,
        limits: &LimitSet,
        token: &str,
        account: &str,
        exit: &ExitId,
        domain: &str,
    ) -> Result<(), Limited> {
        self.check_keys(limits, token, Some(account), exit, domain)
    }

    fn check_keys(
        &self,
        limits: &LimitSet,
        token: &str,
        account: Option<&str>,
        exit: &ExitId,
        domain: &str,
    ) -> Result<(), Limited> {
        let clock = &*self.clock;
        let account_step = limits.per_account.zip(account).map(|(q, account)| Step {
            limiter: self.account.limiter(q, &self.clock),
            probe: Probe {
                key: Box::<str>::from(account),
                commit: false,
            },
            scope: LimitScope::Account,
            quota: q,
        });
        let token_step = limits.per_token.map(|q| Step {
            limiter: self.token.limiter(q, &self.clock),
            probe: Probe {
                key: Box::<str>::from(token),
                commit: false,
            },
            scope: LimitScope::Token,
            quota: q,
        });
        let exit_step = limits.per_exit.map(|q| Step {
            limiter: self.exit.limiter(q, &self.clock),
            probe: Probe {
                key: exit.clone(),
                commit: false,
            },
            scope: LimitScope::Exit,
            quota: q,
        });
        let domain_step = limits.per_exit_domain.map(|q| Step {
            limiter: self.exit_domain.limiter(q, &self.clock),
            probe: Probe {
                key: (
                    exit.clone(),
                    Box::<str>::from(normalize_domain(domain).as_ref()),
                ),
                commit: false,
            },
            scope: LimitScope::ExitDomain,
            quota: q,
        });
        let (mut t, mut a, mut e, mut d) = (token_step, account_step, exit_step, domain_step);
        let mut steps: SmallVec<[&mut dyn Check; 4]> = SmallVec::new();
        if let Some(s) = &mut t {
            steps.push(s);
        }
        if let Some(s) = &mut a {
            steps.push(s);
        }
        if let Some(s) = &mut e {
            steps.push(s);
        }
        if let Some(s) = &mut d {
            steps.push(s);
        }
        let Some((last, first)) = steps.split_last_mut() else {
            return Ok(());
        };
        // Probe all but the last, in order; nothing is written, and the first refusal
        // is the one reported.
        for s in first.iter_mut() {
            s.run(false, clock)?;
        }
        // The last one needs no probe: if its commit refuses, nothing was taken.
        last.run(true, clock)?;
        for s in first.iter_mut() {
            s.run(true, clock)?;
        }
        Ok(())
    }

    /// True when the exit and exit x domain limits would let one request to `domain`
    /// through now; takes nothing (the token limit is not looked at).
    pub fn exit_allows(&self, limits: &LimitSet, exit: &ExitId, domain: &str) -> bool {
        let clock = &*self.clock;
        let exit_ok = limits.per_exit.is_none_or(|q| {
            Step {
                limiter: self.exit.limiter(q, &self.clock),
                probe: Probe {
                    key: exit.clone(),
                    commit: false,
                },
                scope: LimitScope::Exit,
                quota: q,
            }
            .run(false, clock)
            .is_ok()
        });
        exit_ok
            && limits.per_exit_domain.is_none_or(|q| {
                Step {
                    limiter: self.exit_domain.limiter(q, &self.clock),
                    probe: Probe {
                        key: (
                            exit.clone(),
                            Box::<str>::from(normalize_domain(domain).as_ref()),
                        ),
                        commit: false,
                    },
                    scope: LimitScope::ExitDomain,
                    quota: q,
                }
                .run(false, clock)
                .is_ok()
            })
    }

    /// Drops the state of every key whose limit has fully replenished (it is then
    /// indistinguishable from a fresh key) and limiters left with no key.
    pub fn prune(&self) {
        self.token.prune();
        self.account.prune();
        self.exit.prune();
        self.exit_domain.prune();
    }

    /// How many keys currently hold state, over all scopes (for metrics and tests).
    pub fn tracked_keys(&self) -> usize {
        self.token.len() + self.account.len() + self.exit.len() + self.exit_domain.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn q(s: &str) -> Quota {
        s.parse().unwrap()
    }

    fn setup() -> (ManualClock, RateLimiter) {
        let clock = ManualClock::new();
        let limiter = RateLimiter::new(Arc::new(clock.clone()));
        (clock, limiter)
    }

    fn exit(name: &str) -> ExitId {
        ExitId::new(name)
    }

    #[test]
    fn accounts_have_their_own_limit_under_the_token_limit() {
        let (_clock, rl) = setup();
        let limits = LimitSet {
            per_token: Some(q("3/min")),
            per_account: Some(q("1/min")),
            ..Default::default()
        };
        let exit = ExitId::from("e");
        rl.check_account(&limits, "t", "a", &exit, "d").unwrap();
        let refused = rl.check_account(&limits, "t", "a", &exit, "d").unwrap_err();
        assert_eq!(refused.scope, LimitScope::Account);
        // Another account of the same token still has its own cell; the refusal above
        // took none of the token's.
        rl.check_account(&limits, "t", "b", &exit, "d").unwrap();
        rl.check(&limits, "t", &exit, "d").unwrap();
        let refused = rl.check_account(&limits, "t", "c", &exit, "d").unwrap_err();
        assert_eq!(refused.scope, LimitScope::Token);
    }

    #[test]
    fn quotas_parse() {
        let cases = [
            ("10/s", 10, 1_000, 10),
            ("600/min", 600, 60_000, 600),
            ("5/s burst 20", 5, 1_000, 20),
            ("100/10s", 100, 10_000, 100),
            (" 3 / 2 min  burst 1 ", 3, 120_000, 1),
            ("1/d", 1, 86_400_000, 1),
            ("50/500ms", 50, 500, 50),
            ("7/hour", 7, 3_600_000, 7),
        ];
        for (text, count, per_ms, burst) in cases {
            let quota = q(text);
            assert_eq!(quota.count().get(), count, "{text}");
            assert_eq!(quota.per(), Duration::from_millis(per_ms), "{text}");
            assert_eq!(quota.burst().get(), burst, "{text}");
            // Display round-trips.
            assert_eq!(quota.to_string().parse::<Quota>().unwrap(), quota, "{text}");
        }
        assert_eq!(
            q("600/min").replenish_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(q("5/s burst 20").to_string(), "5/s burst 20");
        assert_eq!(q("10/60s").to_string(), "10/min");
    }

    #[test]
    fn bad_quotas_name_the_text() {
        let long = "1".repeat(100);
        for bad in [
            "",
            "10",
            "/s",
            "10/",
            "0/s",
            "-1/s",
            "+1/s",
            "1.5/s",
            "10/fortnight",
            "10/s burst",
            "10/s burst 0",
            "10/s burst x",
            "10/0s",
            "4294967296/s",
            "4294967295/ms",
            "1/400d",
            "10/s burst 5 burst 6",
            "ten/s",
            "10/ s s",
            "10/99999999999999999999d",
            long.as_str(),
            "١٠/s",
        ] {
            let err = bad.parse::<Quota>().unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("rate limit `"), "{bad:?} -> {msg}");
            assert!(msg.contains(&truncate(bad)), "{bad:?} -> {msg}");
            assert!(msg.len() < 250, "{msg}");
        }
    }

    #[test]
    fn limit_sets_deserialize_from_toml() {
        let set: LimitSet =
            toml::from_str("per_exit = \"20/s\"\nper_exit_domain = \"2/s burst 5\"").unwrap();
        assert_eq!(set.per_exit, Some(q("20/s")));
        assert_eq!(set.per_exit_domain, Some(q("2/s burst 5")));
        assert_eq!(set.per_token, None);
        let err = toml::from_str::<LimitSet>("per_exit = \"20/fortnight\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("20/fortnight") && err.contains("per_exit"),
            "{err}"
        );
        let err = toml::from_str::<LimitSet>("per_host = \"1/s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("per_host"), "{err}");
        let err = toml::from_str::<LimitSet>("per_exit = 20")
            .unwrap_err()
            .to_string();
        assert!(err.contains("per_exit"), "{err}");
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(serde_json::from_str::<LimitSet>(&json).unwrap(), set);
    }

    #[test]
    fn exact_counts_and_retry_after_with_the_manual_clock() {
        let (clock, rl) = setup();
        let limits = LimitSet {
            per_exit: Some(q("10/s")),
            ..Default::default()
        };
        let de1 = exit("de-1");
        for i in 0..10 {
            assert!(rl.check(&limits, "t", &de1, "a.com").is_ok(), "cell {i}");
        }
        let refused = rl.check(&limits, "t", &de1, "a.com").unwrap_err();
        assert_eq!(refused.scope, LimitScope::Exit);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        clock.advance(Duration::from_millis(40));
        assert_eq!(
            rl.check(&limits, "t", &de1, "a.com")
                .unwrap_err()
                .retry_after,
            Duration::from_millis(60)
        );
        clock.advance(Duration::from_millis(60));
        assert!(rl.check(&limits, "t", &de1, "a.com").is_ok());
        assert!(rl.check(&limits, "t", &de1, "a.com").is_err());
        // Another exit has its own budget.
        assert!(rl.check(&limits, "t", &exit("de-2"), "a.com").is_ok());
        // After a full second, the whole burst is back, and no more.
        clock.advance(Duration::from_secs(5));
        let passed = (0..25)
            .filter(|_| rl.check(&limits, "t", &de1, "a.com").is_ok())
            .count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn burst_differs_from_rate() {
        let (clock, rl) = setup();
        let limits = LimitSet {
            per_token: Some(q("2/s burst 5")),
            ..Default::default()
        };
        let e = exit("x");
        let passed = (0..10)
            .filter(|_| rl.check(&limits, "tok", &e, "a").is_ok())
            .count();
        assert_eq!(passed, 5);
        let err = rl.check(&limits, "tok", &e, "a").unwrap_err();
        assert_eq!(
            (err.scope, err.retry_after),
            (LimitScope::Token, Duration::from_millis(500))
        );
        clock.advance(Duration::from_millis(500));
        assert!(rl.check(&limits, "tok", &e, "a").is_ok());
        assert!(
            rl.check(&limits, "other", &e, "a").is_ok(),
            "tokens are separate"
        );
    }

    #[test]
    fn a_refusal_consumes_nothing_and_names_its_scope() {
        let (clock, rl) = setup();
        let limits = LimitSet {
            per_token: Some(q("3/s")),
            per_exit: Some(q("100/s")),
            per_exit_domain: Some(q("1/s")),
            per_account: None,
        };
        let e = exit("de-1");
        assert!(rl.check(&limits, "tok", &e, "a.com").is_ok());
        // a.com is exhausted for this exit; those refusals must not eat the token budget.
        for _ in 0..50 {
            let err = rl.check(&limits, "tok", &e, "A.com.").unwrap_err();
            assert_eq!(err.scope, LimitScope::ExitDomain);
            assert_eq!(err.retry_after, Duration::from_secs(1));
        }
        // The token still has 2 of 3 cells: b.com and c.com pass, d.com hits the token limit.
        assert!(rl.check(&limits, "tok", &e, "b.com").is_ok());
        assert!(rl.check(&limits, "tok", &e, "c.com").is_ok());
        let err = rl.check(&limits, "tok", &e, "d.com").unwrap_err();
        assert_eq!(err.scope, LimitScope::Token);
        assert_eq!(err.retry_after, Duration::from_nanos(333_333_333));
        // Token is checked first: d.com's exit-domain budget was not touched either.
        clock.advance(Duration::from_secs(1));
        assert!(rl.check(&limits, "tok", &e, "d.com").is_ok());
        // A per-exit refusal is reported as such.
        let tight = LimitSet {
            per_exit: Some(q("1/min")),
            ..Default::default()
        };
        assert!(rl.check(&tight, "tok", &e, "z.com").is_ok());
        let err = rl.check(&tight, "tok", &e, "z.com").unwrap_err();
        assert_eq!(
            (err.scope, err.retry_after),
            (LimitScope::Exit, Duration::from_secs(60))
        );
        assert!(err.to_string().contains("1/min") && err.to_string().contains("exit"));
    }

    #[test]
    fn a_refusal_in_the_middle_consumes_nothing_either() {
        let (_clock, rl) = setup();
        let limits = LimitSet {
            per_token: Some(q("2/s")),
            per_exit: Some(q("1/s")),
            per_exit_domain: Some(q("1/s")),
            per_account: None,
        };
        let (a, b) = (exit("a"), exit("b"));
        assert!(rl.check(&limits, "tok", &a, "x.com").is_ok());
        for _ in 0..10 {
            assert_eq!(
                rl.check(&limits, "tok", &a, "y.com").unwrap_err().scope,
                LimitScope::Exit
            );
        }
        // The refusals on exit a took nothing from the token: 1 of 2 cells left.
        assert!(rl.check(&limits, "tok", &b, "y.com").is_ok());
        assert_eq!(
            rl.check(&limits, "tok", &b, "z.com").unwrap_err().scope,
            LimitScope::Token
        );
        // exit a x y.com was never charged; exit a x x.com was.
        let domain_only = LimitSet {
            per_exit_domain: Some(q("1/s")),
            ..Default::default()
        };
        assert!(rl.exit_allows(&domain_only, &a, "y.com"));
        assert!(!rl.exit_allows(&domain_only, &a, "x.com"));
    }

    #[test]
    fn exit_allows_peeks_without_consuming() {
        let (_clock, rl) = setup();
        let limits = LimitSet {
            per_exit_domain: Some(q("1/s")),
            ..Default::default()
        };
        let e = exit("e");
        for _ in 0..5 {
            assert!(rl.exit_allows(&limits, &e, "a.com"));
        }
        assert!(rl.check(&limits, "t", &e, "a.com").is_ok());
        assert!(!rl.exit_allows(&limits, &e, "a.com"));
        assert!(rl.exit_allows(&limits, &e, "b.com"));
        assert!(rl.exit_allows(&LimitSet::default(), &e, "a.com"));
    }

    #[test]
    fn no_limits_means_no_state() {
        let (_clock, rl) = setup();
        for _ in 0..100 {
            assert!(rl.check(&LimitSet::default(), "t", &exit("e"), "a").is_ok());
        }
        assert_eq!(rl.tracked_keys(), 0);
    }

    #[test]
    fn pruning_bounds_memory_after_many_domains() {
        let (clock, rl) = setup();
        let limits = LimitSet {
            per_exit_domain: Some(q("5/s")),
            per_token: Some(q("1000000/s")),
            ..Default::default()
        };
        let e = exit("de-1");
        for i in 0..100_000 {
            assert!(rl.check(&limits, "t", &e, &format!("d{i}.example")).is_ok());
        }
        assert_eq!(rl.tracked_keys(), 100_001);
        // Pruning right away keeps keys whose state is still distinguishable.
        rl.prune();
        assert_eq!(rl.tracked_keys(), 100_001);
        // Once a full burst has replenished, every key is fresh again: all dropped.
        clock.advance(Duration::from_secs(1));
        rl.prune();
        assert_eq!(rl.tracked_keys(), 0);
        // And limits still work afterwards.
        for _ in 0..5 {
            assert!(rl.check(&limits, "t", &e, "d1.example").is_ok());
        }
        assert!(rl.check(&limits, "t", &e, "d1.example").is_err());
        assert_eq!(rl.tracked_keys(), 2);
    }

    #[test]
    fn hostile_keys_are_just_keys() {
        let (_clock, rl) = setup();
        let limits = LimitSet {
            per_exit_domain: Some(q("1/s")),
            per_token: Some(q("2/s")),
            ..Default::default()
        };
        let huge = "x".repeat(1 << 16);
        let e = exit("e");
        assert!(rl.check(&limits, &huge, &e, &huge).is_ok());
        assert!(rl.check(&limits, "", &e, "").is_ok());
        assert!(rl.check(&limits, "\0", &e, "\u{202e}").is_ok());
        assert_eq!(
            rl.check(&limits, &huge, &e, &huge).unwrap_err().scope,
            LimitScope::ExitDomain
        );
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let (_clock, rl) = setup();
        let rl = Arc::new(rl);
        let limits = LimitSet {
            per_exit: Some(q("100/s")),
            ..Default::default()
        };
        let passed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let rl = Arc::clone(&rl);
                    let limits = limits.clone();
                    s.spawn(move || {
                        (0..200)
                            .filter(|_| rl.check(&limits, "t", &ExitId::new("e"), "a").is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 100);
    }
}
