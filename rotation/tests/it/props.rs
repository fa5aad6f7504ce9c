//! Property tests: whatever the exits, filters, health and bans, a selection satisfies
//! the filter, is healthy and not banned; fallbacks are distinct and never the primary;
//! errors tell the truth. The oracle is the rotator's own admin snapshot plus
//! `Filter::matches`, checked independently of the selection code path.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ipsx_rotation::{
    BanScope, CountryCode, ExitAttributes, ExitId, ExitInfo, ExitKind, ExitSnapshot, Filter,
    LimitSet, ManualClock, Policy, Quota, RateLimiter, Rotator, RotatorConfig, SelectError,
    SelectRequest, SessionSpec,
};
use proptest::prelude::*;

const COUNTRIES: [&str; 4] = ["de", "fr", "us", "jp"];
const CITIES: [&str; 3] = ["a", "b", "c"];
const DOMAINS: [&str; 3] = ["a.com", "b.com", "c.com"];

#[derive(Debug, Clone)]
struct ExitSpec {
    country: Option<usize>,
    city: Option<usize>,
    asn: Option<u32>,
    kind: Option<usize>,
    healthy: bool,
    /// (domain index or None for global, cooldown seconds)
    bans: Vec<(Option<usize>, u64)>,
}

fn kind(i: usize) -> ExitKind {
    [
        ExitKind::Residential,
        ExitKind::Mobile,
        ExitKind::Datacenter,
    ][i]
}

fn exit_spec() -> impl Strategy<Value = ExitSpec> {
    (
        proptest::option::weighted(0.9, 0..COUNTRIES.len()),
        proptest::option::of(0..CITIES.len()),
        proptest::option::of(1u32..4),
        proptest::option::of(0usize..3),
        proptest::bool::weighted(0.8),
        proptest::collection::vec((proptest::option::of(0..DOMAINS.len()), 1u64..100), 0..3),
    )
        .prop_map(|(country, city, asn, kind, healthy, bans)| ExitSpec {
            country,
            city,
            asn,
            kind,
            healthy,
            bans,
        })
}

fn filter() -> impl Strategy<Value = Filter> {
    (
        proptest::option::of(0..COUNTRIES.len()),
        proptest::option::weighted(0.3, 0..CITIES.len()),
        proptest::option::weighted(0.2, 1u32..4),
        proptest::option::weighted(0.2, 0usize..3),
    )
        .prop_map(|(c, city, asn, k)| Filter {
            country: c.map(|i| COUNTRIES[i].parse::<CountryCode>().unwrap()),
            city: city.map(|i| CITIES[i].to_owned()),
            asn,
            kind: k.map(kind),
            ..Default::default()
        })
}

fn build(specs: &[ExitSpec]) -> (ManualClock, Rotator) {
    let clock = ManualClock::new();
    let rot = Rotator::new(RotatorConfig::default(), Arc::new(clock.clone()));
    rot.set_exits(
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| ExitInfo {
                id: ExitId::new(&format!("x{i}")),
                attrs: ExitAttributes {
                    country: s.country.map(|c| COUNTRIES[c].parse().unwrap()),
                    city: s.city.map(|c| CITIES[c].to_owned()),
                    asn: s.asn,
                    kind: s.kind.map(kind),
                    ..Default::default()
                },
            })
            .collect(),
    );
    for (i, s) in specs.iter().enumerate() {
        let id = ExitId::new(&format!("x{i}"));
        rot.set_healthy(&id, s.healthy);
        for (d, secs) in &s.bans {
            let scope = match d {
                Some(d) => BanScope::Domain(DOMAINS[*d].to_owned()),
                None => BanScope::Global,
            };
            rot.ban(&id, scope, Duration::from_secs(*secs));
        }
    }
    (clock, rot)
}

/// True when the snapshot shows a ban that applies to `domain` now.
fn banned(e: &ExitSnapshot, domain: &str) -> bool {
    e.bans.iter().any(|b| match &b.scope {
        BanScope::Global => true,
        BanScope::Domain(d) => d == domain,
    })
}

fn check_selection(
    snap: &HashMap<ExitId, ExitSnapshot>,
    filter: &Filter,
    domain: &str,
    result: &Result<ipsx_rotation::Selection, SelectError>,
    max_fallbacks: usize,
) -> Result<(), TestCaseError> {
    let usable = |e: &ExitSnapshot| filter.matches(&e.attrs) && e.healthy && !banned(e, domain);
    match result {
        Ok(sel) => {
            let mut seen = HashSet::new();
            for id in std::iter::once(&sel.primary).chain(&sel.fallbacks) {
                let e = snap
                    .get(id)
                    .ok_or_else(|| TestCaseError::fail(format!("unknown {id}")))?;
                prop_assert!(usable(e), "{id} unusable for {filter} @ {domain}: {e:?}");
                prop_assert!(seen.insert(id.clone()), "repeat {id}");
            }
            prop_assert!(!sel.fallbacks.contains(&sel.primary));
            prop_assert!(sel.fallbacks.len() <= max_fallbacks);
            let eligible = snap.values().filter(|e| usable(e)).count();
            prop_assert_eq!(sel.fallbacks.len(), (eligible - 1).min(max_fallbacks));
        }
        Err(SelectError::NoExitMatches { .. }) => {
            prop_assert!(!snap.values().any(|e| filter.matches(&e.attrs) && e.healthy));
        }
        Err(SelectError::AllCoolingDown { retry_after, .. }) => {
            let waiting: Vec<&ExitSnapshot> = snap
                .values()
                .filter(|e| filter.matches(&e.attrs) && e.healthy)
                .collect();
            prop_assert!(!waiting.is_empty());
            prop_assert!(waiting.iter().all(|e| banned(e, domain)));
            // retry_after is when the first of them is free for this domain.
            let first = waiting
                .iter()
                .map(|e| {
                    e.bans
                        .iter()
                        .filter(|b| match &b.scope {
                            BanScope::Global => true,
                            BanScope::Domain(d) => d == domain,
                        })
                        .map(|b| b.remaining)
                        .max()
                        .unwrap()
                })
                .min()
                .unwrap();
            prop_assert_eq!(*retry_after, first);
        }
        Err(other) => prop_assert!(false, "unexpected {other}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn selections_respect_filter_health_and_bans(
        specs in proptest::collection::vec(exit_spec(), 0..90),
        requests in proptest::collection::vec(
            (filter(), 0..DOMAINS.len(), 0..Policy::ALL.len(), 0u64..60, proptest::option::of((0u8..3, any::<bool>()))),
            1..20,
        ),
    ) {
        let (clock, rot) = build(&specs);
        let max_fallbacks = rot.config().max_fallbacks;
        for (filter, d, p, advance, session) in requests {
            clock.advance(Duration::from_secs(advance));
            let domain = DOMAINS[d];
            let spec = session.map(|(n, allow)| SessionSpec {
                id: format!("s{n}"),
                ttl: Duration::from_secs(30),
                allow_replacement: allow,
            });
            let policy = Policy::ALL[p];
            let result = rot.select(&SelectRequest {
                token: "tok",
                filter: &filter,
                policy,
                session: spec.as_ref(),
                domain,
            });
            let snap: HashMap<ExitId, ExitSnapshot> =
                rot.exits().into_iter().map(|e| (e.id.clone(), e)).collect();
            match (&result, &spec) {
                // A sticky session without replacement may fail loudly on its exit,
                // and carries no fallbacks.
                (Err(SelectError::SessionExitGone { exit, .. }), Some(s)) if policy == Policy::Sticky => {
                    prop_assert!(!s.allow_replacement);
                    if let Some(e) = snap.get(exit) {
                        prop_assert!(!(filter.matches(&e.attrs) && e.healthy && !banned(e, domain)));
                    }
                }
                (Ok(sel), Some(s)) if policy == Policy::Sticky && !s.allow_replacement => {
                    prop_assert!(sel.fallbacks.is_empty());
                    let e = &snap[&sel.primary];
                    prop_assert!(filter.matches(&e.attrs) && e.healthy && !banned(e, domain));
                }
                _ => check_selection(&snap, &filter, domain, &result, max_fallbacks)?,
            }
        }
    }

    /// least-loaded and fastest return the true k smallest, in order.
    #[test]
    fn ordered_policies_return_the_smallest_keys_in_order(
        loads in proptest::collection::vec((0usize..4, proptest::option::of(1u64..50), any::<bool>()), 1..80),
        fastest in any::<bool>(),
    ) {
        let clock = ManualClock::new();
        let rot = Rotator::new(RotatorConfig::default(), Arc::new(clock.clone()));
        let ids: Vec<ExitId> = (0..loads.len()).map(|i| ExitId::new(&format!("e{i:02}"))).collect();
        rot.set_exits(ids.iter().map(|id| ExitInfo { id: id.clone(), attrs: ExitAttributes::default() }).collect());
        let mut guards = Vec::new();
        for (id, (in_flight, latency, healthy)) in ids.iter().zip(&loads) {
            for _ in 0..*in_flight {
                guards.push(rot.begin(id));
            }
            if let Some(ms) = latency {
                rot.record_success(id, Duration::from_millis(*ms));
            }
            rot.set_healthy(id, *healthy);
        }
        let snap: HashMap<ExitId, ExitSnapshot> = rot.exits().into_iter().map(|e| (e.id.clone(), e)).collect();
        // Unmeasured first (as -1), then by EWMA; or by in-flight count.
        let key = |e: &ExitSnapshot| -> f64 {
            if fastest { e.latency_ewma_ms.unwrap_or(-1.0) } else { e.in_flight as f64 }
        };
        let policy = if fastest { Policy::Fastest } else { Policy::LeastLoaded };
        let result = rot.select(&SelectRequest { token: "t", filter: &Filter::default(), policy, session: None, domain: "d" });
        let mut eligible: Vec<f64> = snap.values().filter(|e| e.healthy).map(key).collect();
        eligible.sort_by(f64::total_cmp);
        match result {
            Ok(sel) => {
                let got: Vec<f64> = std::iter::once(&sel.primary).chain(&sel.fallbacks).map(|id| key(&snap[id])).collect();
                prop_assert_eq!(&got[..], &eligible[..got.len()]);
                prop_assert_eq!(got.len(), eligible.len().min(4));
            }
            Err(e) => prop_assert!(eligible.is_empty(), "{e}"),
        }
        drop(guards);
    }

    #[test]
    fn quota_text_never_panics_and_round_trips(text in "\\PC{0,40}") {
        if let Ok(q) = text.parse::<Quota>() {
            prop_assert_eq!(q.to_string().parse::<Quota>().unwrap(), q);
        }
    }

    #[test]
    fn quotas_from_parts_round_trip(count in 1u32..100_000, per in 1u64..100_000, burst in 1u32..1000, unit in 0usize..3) {
        let unit_name = ["ms", "s", "min"][unit];
        let text = format!("{count}/{per}{unit_name} burst {burst}");
        match text.parse::<Quota>() {
            Ok(q) => {
                prop_assert_eq!(q.count().get(), count);
                prop_assert_eq!(q.burst().get(), burst);
                prop_assert_eq!(q.to_string().parse::<Quota>().unwrap(), q);
            }
            Err(e) => prop_assert!(e.to_string().contains(&text), "{e}"),
        }
    }

    /// Over any interleaving of checks and clock steps, a single key never gets more
    /// than `burst + elapsed / interval` cells.
    #[test]
    fn rate_limits_never_exceed_their_quota(
        count in 1u32..20,
        burst in 1u32..20,
        steps in proptest::collection::vec((0u64..300, 1usize..10), 1..40),
    ) {
        let clock = ManualClock::new();
        let rl = RateLimiter::new(Arc::new(clock.clone()));
        let quota: Quota = format!("{count}/s burst {burst}").parse().unwrap();
        let limits = LimitSet { per_exit: Some(quota), ..Default::default() };
        let e = ExitId::new("e");
        let mut passed = 0u64;
        let mut elapsed_ms = 0u64;
        for (advance_ms, tries) in steps {
            clock.advance(Duration::from_millis(advance_ms));
            elapsed_ms += advance_ms;
            for _ in 0..tries {
                match rl.check(&limits, "t", &e, "d") {
                    Ok(()) => passed += 1,
                    Err(l) => prop_assert!(l.retry_after > Duration::ZERO && l.retry_after <= quota.replenish_interval()),
                }
            }
        }
        let interval_ns = u64::try_from(quota.replenish_interval().as_nanos()).unwrap();
        let bound = u64::from(burst) + elapsed_ms * 1_000_000 / interval_ns;
        prop_assert!(passed <= bound, "{passed} > {bound}");
    }
}
