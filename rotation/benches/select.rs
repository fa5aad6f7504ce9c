//! Exit selection and rate-limit checks, each beside a naive baseline in the same run.
//!
//! - `select/*`: 1,000 exits across 50 countries, a country filter per request, with and
//!   without a sticky session. Baseline: a `Mutex<Vec<ExitInfo>>` cloned per request
//!   and scanned linearly (plus a `Mutex<HashMap>` of sessions for the sticky case).
//! - `ratelimit/*`: `RateLimiter::check` with token, exit and exit x domain limits
//!   (probe all, then commit) against three plain governor keyed limiters that each
//!   consume on their own (no all-or-nothing).
//!
//! After criterion's report, a short side-by-side timing loop prints ours, the
//! baseline and the ratio in one table.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::Criterion;
use governor::clock::MonotonicClock;
use ipsx_rotation::{
    CountryCode, ExitAttributes, ExitId, ExitInfo, Filter, LimitSet, Policy, RateLimiter, Rotator,
    RotatorConfig, SelectRequest, SessionSpec, SystemClock,
};

const EXITS: usize = 1_000;
const COUNTRIES: [&str; 50] = [
    "de", "fr", "us", "gb", "jp", "it", "es", "nl", "be", "ch", "at", "pl", "cz", "se", "no", "dk",
    "fi", "pt", "ie", "gr", "ro", "hu", "bg", "hr", "si", "sk", "lt", "lv", "ee", "ca", "mx", "br",
    "ar", "cl", "co", "pe", "au", "nz", "in", "sg", "kr", "tw", "hk", "th", "vn", "id", "my", "ph",
    "za", "tr",
];

fn exits() -> Vec<ExitInfo> {
    (0..EXITS)
        .map(|i| {
            let c = COUNTRIES[i % COUNTRIES.len()];
            ExitInfo {
                id: ExitId::new(&format!("{c}-{i}")),
                attrs: ExitAttributes {
                    country: Some(c.parse().unwrap()),
                    asn: Some(1000 + (i as u32 % 7)),
                    ..Default::default()
                },
            }
        })
        .collect()
}

fn filters() -> Vec<Filter> {
    COUNTRIES
        .iter()
        .map(|c| Filter {
            country: Some(c.parse::<CountryCode>().unwrap()),
            ..Default::default()
        })
        .collect()
}

// === Naive baseline ===

/// What a first implementation would do: one mutex, clone the list, scan it all.
struct Naive {
    exits: Mutex<Vec<(ExitInfo, bool)>>,
    sessions: Mutex<HashMap<(String, String), (ExitId, Instant)>>,
    seed: Mutex<u64>,
}

impl Naive {
    fn new() -> Self {
        Self {
            exits: Mutex::new(exits().into_iter().map(|e| (e, true)).collect()),
            sessions: Mutex::new(HashMap::new()),
            seed: Mutex::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    fn rand(&self) -> usize {
        let mut s = self.seed.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s as usize
    }

    fn select(&self, filter: &Filter) -> Option<(ExitId, Vec<ExitId>)> {
        let snapshot = self.exits.lock().unwrap().clone();
        let mut matching: Vec<ExitId> = snapshot
            .iter()
            .filter(|(e, healthy)| *healthy && filter.matches(&e.attrs))
            .map(|(e, _)| e.id.clone())
            .collect();
        if matching.is_empty() {
            return None;
        }
        let n = matching.len();
        for i in 0..4.min(n) {
            let j = i + self.rand() % (n - i);
            matching.swap(i, j);
        }
        matching.truncate(4);
        let primary = matching.remove(0);
        Some((primary, matching))
    }

    fn select_sticky(
        &self,
        token: &str,
        session: &str,
        filter: &Filter,
    ) -> Option<(ExitId, Vec<ExitId>)> {
        let key = (token.to_owned(), session.to_owned());
        let now = Instant::now();
        let bound = self.sessions.lock().unwrap().get(&key).cloned();
        let (candidate, rest) = self.select(filter)?;
        if let Some((exit, deadline)) = bound
            && deadline > now
        {
            let snapshot = self.exits.lock().unwrap().clone();
            if snapshot.iter().any(|(e, h)| *h && e.id == exit) {
                self.sessions
                    .lock()
                    .unwrap()
                    .insert(key, (exit.clone(), now + Duration::from_secs(600)));
                return Some((exit, rest));
            }
        }
        self.sessions
            .lock()
            .unwrap()
            .insert(key, (candidate.clone(), now + Duration::from_secs(600)));
        Some((candidate, rest))
    }
}

// === Ours ===

fn rotator() -> Rotator {
    let rot = Rotator::new(RotatorConfig::default(), Arc::new(SystemClock));
    rot.set_exits(exits());
    rot
}

fn sessions() -> Vec<SessionSpec> {
    (0..10_000)
        .map(|i| SessionSpec {
            id: format!("s{i}"),
            ttl: Duration::from_secs(600),
            allow_replacement: true,
        })
        .collect()
}

/// Three plain governor keyed limiters, each consuming independently.
struct PlainGovernor {
    token: governor::DefaultKeyedRateLimiter<String>,
    exit: governor::DefaultKeyedRateLimiter<ExitId>,
    exit_domain: governor::DefaultKeyedRateLimiter<(ExitId, String)>,
}

impl PlainGovernor {
    fn new() -> Self {
        let q = governor::Quota::per_second(std::num::NonZeroU32::new(1_000_000_000).unwrap());
        Self {
            token: governor::RateLimiter::hashmap_with_clock(q, MonotonicClock),
            exit: governor::RateLimiter::hashmap_with_clock(q, MonotonicClock),
            exit_domain: governor::RateLimiter::hashmap_with_clock(q, MonotonicClock),
        }
    }

    fn check(&self, token: &str, exit: &ExitId, domain: &str) -> bool {
        self.token.check_key(&token.to_owned()).is_ok()
            && self.exit.check_key(exit).is_ok()
            && self
                .exit_domain
                .check_key(&(exit.clone(), domain.to_owned()))
                .is_ok()
    }
}

fn limits() -> LimitSet {
    let q = "1000000000/s".parse().unwrap();
    LimitSet {
        per_exit: Some(q),
        per_exit_domain: Some(q),
        per_token: Some(q),
        per_account: None,
    }
}

struct Inputs {
    filters: Vec<Filter>,
    sessions: Vec<SessionSpec>,
    tokens: Vec<String>,
    domains: Vec<String>,
    exit_ids: Vec<ExitId>,
}

fn inputs() -> Inputs {
    Inputs {
        filters: filters(),
        sessions: sessions(),
        tokens: (0..100).map(|i| format!("token-{i}")).collect(),
        domains: (0..1000).map(|i| format!("site{i}.example")).collect(),
        exit_ids: exits().into_iter().map(|e| e.id).collect(),
    }
}

/// Every benchmark as a closure over a counter, so criterion and the ratio table run the
/// same code.
struct Cases {
    rot: Rotator,
    naive: Naive,
    limiter: RateLimiter,
    plain: PlainGovernor,
    limits: LimitSet,
    inp: Inputs,
}

impl Cases {
    fn ours_filtered(&self, i: usize) {
        let filter = &self.inp.filters[i % self.inp.filters.len()];
        let sel = self.rot.select(&SelectRequest {
            token: &self.inp.tokens[i % 100],
            filter,
            policy: Policy::PerRequest,
            session: None,
            domain: "example.com",
        });
        black_box(sel.unwrap());
    }

    fn naive_filtered(&self, i: usize) {
        let filter = &self.inp.filters[i % self.inp.filters.len()];
        black_box(self.naive.select(filter).unwrap());
    }

    fn ours_sticky(&self, i: usize) {
        let filter = &self.inp.filters[i % self.inp.filters.len()];
        let s = &self.inp.sessions[(i * 7919) % self.inp.sessions.len()];
        let sel = self.rot.select(&SelectRequest {
            token: &self.inp.tokens[i % 100],
            filter,
            policy: Policy::Sticky,
            session: Some(s),
            domain: "example.com",
        });
        black_box(sel.unwrap());
    }

    fn naive_sticky(&self, i: usize) {
        let filter = &self.inp.filters[i % self.inp.filters.len()];
        let s = &self.inp.sessions[(i * 7919) % self.inp.sessions.len()];
        black_box(
            self.naive
                .select_sticky(&self.inp.tokens[i % 100], &s.id, filter)
                .unwrap(),
        );
    }

    fn ours_unfiltered(&self, i: usize) {
        let sel = self.rot.select(&SelectRequest {
            token: &self.inp.tokens[i % 100],
            filter: &Filter::default(),
            policy: Policy::LeastLoaded,
            session: None,
            domain: "example.com",
        });
        black_box(sel.unwrap());
    }

    fn ours_unfiltered_random(&self, i: usize) {
        let sel = self.rot.select(&SelectRequest {
            token: &self.inp.tokens[i % 100],
            filter: &Filter::default(),
            policy: Policy::PerRequest,
            session: None,
            domain: "example.com",
        });
        black_box(sel.unwrap());
    }

    fn naive_unfiltered(&self, _i: usize) {
        black_box(self.naive.select(&Filter::default()).unwrap());
    }

    fn ours_check(&self, i: usize) {
        let r = self.limiter.check(
            &self.limits,
            &self.inp.tokens[i % 100],
            &self.inp.exit_ids[i % EXITS],
            &self.inp.domains[i % 1000],
        );
        assert!(black_box(r).is_ok());
    }

    fn plain_check(&self, i: usize) {
        let ok = self.plain.check(
            &self.inp.tokens[i % 100],
            &self.inp.exit_ids[i % EXITS],
            &self.inp.domains[i % 1000],
        );
        assert!(black_box(ok));
    }
}

type Case = (&'static str, fn(&Cases, usize));

const PAIRS: [(&str, Case, Case); 5] = [
    (
        "select, country filter (20 of 1000)",
        ("select/ours/country", Cases::ours_filtered),
        ("select/naive/country", Cases::naive_filtered),
    ),
    (
        "select, sticky session (10k sessions)",
        ("select/ours/sticky", Cases::ours_sticky),
        ("select/naive/sticky", Cases::naive_sticky),
    ),
    (
        "select, no filter, per-request (sampled)",
        (
            "select/ours/unfiltered-per-request",
            Cases::ours_unfiltered_random,
        ),
        ("select/naive/unfiltered", Cases::naive_unfiltered),
    ),
    (
        "select, no filter, least-loaded (scan)",
        (
            "select/ours/unfiltered-least-loaded",
            Cases::ours_unfiltered,
        ),
        ("select/naive/unfiltered", Cases::naive_unfiltered),
    ),
    (
        "RateLimiter::check, 3 limits",
        ("ratelimit/ours/check", Cases::ours_check),
        ("ratelimit/plain-governor/check", Cases::plain_check),
    ),
];

/// Median ns per call over `rounds` batches of `per_round` calls.
fn time_ns(cases: &Cases, f: fn(&Cases, usize), rounds: usize, per_round: usize) -> f64 {
    let mut samples: Vec<f64> = (0..rounds)
        .map(|r| {
            let start = Instant::now();
            for i in 0..per_round {
                f(cases, r * per_round + i);
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let cases = Cases {
        rot: rotator(),
        naive: Naive::new(),
        limiter: RateLimiter::new(Arc::new(SystemClock)),
        plain: PlainGovernor::new(),
        limits: limits(),
        inp: inputs(),
    };
    // Warm the session tables so the sticky cases measure the steady state.
    for i in 0..20_000 {
        cases.ours_sticky(i);
        cases.naive_sticky(i);
    }

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let mut done = std::collections::HashSet::new();
    for (_, ours, base) in PAIRS {
        for (name, f) in [ours, base] {
            if !done.insert(name) {
                continue;
            }
            let mut i = 0usize;
            c.bench_function(name, |b| {
                b.iter(|| {
                    i = i.wrapping_add(1);
                    f(&cases, i)
                })
            });
        }
    }
    c.final_summary();
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }

    // Side by side, interleaved, in this same process.
    println!(
        "\n{:<40} {:>12} {:>14} {:>8}",
        "case", "ours ns/op", "baseline ns/op", "ratio"
    );
    for (label, (_, ours), (_, base)) in PAIRS {
        let mut o = Vec::new();
        let mut b = Vec::new();
        for _ in 0..5 {
            o.push(time_ns(&cases, ours, 7, 5_000));
            b.push(time_ns(&cases, base, 7, 5_000));
        }
        o.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        let (o, b) = (o[2], b[2]);
        println!("{label:<40} {o:>12.0} {b:>14.0} {:>7.1}x", b / o);
    }
}
