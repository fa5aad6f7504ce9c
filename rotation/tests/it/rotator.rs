//! Behaviour of the rotator through its public API, with a manual clock.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ipsx_rotation::{
    BanScope, CountryCode, ExitAttributes, ExitId, ExitInfo, ExitKind, Filter, LimitSet,
    ManualClock, Policy, RateLimiter, Rotator, RotatorConfig, SelectError, SelectRequest,
    Selection, SessionSpec,
};

fn cc(s: &str) -> CountryCode {
    s.parse().unwrap()
}

fn exit(id: &str, country: &str) -> ExitInfo {
    ExitInfo {
        id: ExitId::new(id),
        attrs: ExitAttributes {
            country: Some(cc(country)),
            ..Default::default()
        },
    }
}

fn id(s: &str) -> ExitId {
    ExitId::new(s)
}

fn country(c: &str) -> Filter {
    Filter {
        country: Some(cc(c)),
        ..Default::default()
    }
}

struct Fixture {
    clock: ManualClock,
    rot: Rotator,
}

fn fixture(exits: Vec<ExitInfo>) -> Fixture {
    fixture_with(RotatorConfig::default(), exits)
}

fn fixture_with(cfg: RotatorConfig, exits: Vec<ExitInfo>) -> Fixture {
    let clock = ManualClock::new();
    let rot = Rotator::new(cfg, Arc::new(clock.clone()));
    rot.set_exits(exits);
    Fixture { clock, rot }
}

/// Five German exits `de-0`..`de-4` and two French ones.
fn de5() -> Vec<ExitInfo> {
    let mut v: Vec<ExitInfo> = (0..5).map(|i| exit(&format!("de-{i}"), "de")).collect();
    v.push(exit("fr-0", "fr"));
    v.push(exit("fr-1", "fr"));
    v
}

impl Fixture {
    fn pick(&self, token: &str, filter: &Filter, policy: Policy) -> Result<Selection, SelectError> {
        self.rot.select(&SelectRequest {
            token,
            filter,
            policy,
            session: None,
            domain: "example.com",
        })
    }

    fn pick_domain(&self, filter: &Filter, domain: &str) -> Result<Selection, SelectError> {
        self.rot.select(&SelectRequest {
            token: "t",
            filter,
            policy: Policy::Random,
            session: None,
            domain,
        })
    }

    fn sticky(
        &self,
        token: &str,
        filter: &Filter,
        spec: &SessionSpec,
    ) -> Result<Selection, SelectError> {
        self.rot.select(&SelectRequest {
            token,
            filter,
            policy: Policy::Sticky,
            session: Some(spec),
            domain: "example.com",
        })
    }
}

fn session(name: &str, ttl_secs: u64, allow_replacement: bool) -> SessionSpec {
    SessionSpec {
        id: name.into(),
        ttl: Duration::from_secs(ttl_secs),
        allow_replacement,
    }
}

// === Policies ===

#[test]
fn round_robin_cycles_through_every_matching_exit() {
    let f = fixture(de5());
    let de = country("de");
    let picks: Vec<ExitId> = (0..15)
        .map(|_| f.pick("t", &de, Policy::RoundRobin).unwrap().primary)
        .collect();
    let first_cycle: HashSet<&ExitId> = picks[..5].iter().collect();
    assert_eq!(first_cycle.len(), 5, "{picks:?}");
    for i in 5..15 {
        assert_eq!(picks[i], picks[i - 5], "period 5: {picks:?}");
    }
    // Fallbacks continue the cycle after the primary.
    let sel = f.pick("t", &de, Policy::RoundRobin).unwrap();
    assert_eq!(sel.primary, picks[0]);
    assert_eq!(sel.fallbacks, picks[1..4].to_vec());
}

#[test]
fn round_robin_skips_exits_that_become_ineligible() {
    let f = fixture(de5());
    let de = country("de");
    f.rot.set_healthy(&id("de-2"), false);
    let picks: Vec<String> = (0..8)
        .map(|_| {
            f.pick("t", &de, Policy::RoundRobin)
                .unwrap()
                .primary
                .to_string()
        })
        .collect();
    assert_eq!(
        picks,
        [
            "de-0", "de-1", "de-3", "de-4", "de-0", "de-1", "de-3", "de-4"
        ]
    );
}

#[test]
fn random_spreads_over_the_matching_exits() {
    let f = fixture(de5());
    let de = country("de");
    let seen: HashSet<ExitId> = (0..40)
        .map(|_| f.pick("t", &de, Policy::Random).unwrap().primary)
        .collect();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.iter().all(|e| e.as_str().starts_with("de-")));
}

#[test]
fn per_request_spreads_and_never_repeats_the_previous_exit() {
    let f = fixture(de5());
    let de = country("de");
    let picks: Vec<ExitId> = (0..40)
        .map(|_| f.pick("tok", &de, Policy::PerRequest).unwrap().primary)
        .collect();
    let seen: HashSet<&ExitId> = picks.iter().collect();
    assert!(seen.len() >= 3, "{seen:?}");
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1], "{picks:?}");
    }
    // With exactly two matching, it alternates.
    let f = fixture(de5());
    let fr = country("fr");
    let picks: Vec<ExitId> = (0..10)
        .map(|_| f.pick("tok", &fr, Policy::PerRequest).unwrap().primary)
        .collect();
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1]);
    }
    // With one matching, the same one every time.
    f.rot.set_healthy(&id("fr-1"), false);
    for _ in 0..5 {
        assert_eq!(
            f.pick("tok", &fr, Policy::PerRequest).unwrap().primary,
            id("fr-0")
        );
    }
}

#[test]
fn per_request_memory_is_per_token() {
    let f = fixture(de5());
    let fr = country("fr");
    // Interleaved tokens: each still alternates on its own.
    let mut last: HashMap<&str, ExitId> = HashMap::new();
    for i in 0..20 {
        let token = if i % 2 == 0 { "alice" } else { "bob" };
        let got = f.pick(token, &fr, Policy::PerRequest).unwrap().primary;
        if let Some(prev) = last.insert(token, got.clone()) {
            assert_ne!(prev, got, "{token} repeated");
        }
    }
}

#[test]
fn sticky_without_a_session_behaves_like_per_request() {
    let f = fixture(de5());
    let fr = country("fr");
    let picks: Vec<ExitId> = (0..10)
        .map(|_| f.pick("tok", &fr, Policy::Sticky).unwrap().primary)
        .collect();
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1]);
    }
}

#[test]
fn least_loaded_picks_the_idle_exit() {
    let f = fixture(de5());
    let de = country("de");
    let mut guards = Vec::new();
    for i in [0, 1, 3, 4] {
        guards.push(f.rot.begin(&id(&format!("de-{i}"))));
    }
    guards.push(f.rot.begin(&id("de-0")));
    for _ in 0..10 {
        let sel = f.pick("t", &de, Policy::LeastLoaded).unwrap();
        assert_eq!(sel.primary, id("de-2"));
        // Then the ones with one request in flight, and de-0 (two) last.
        assert_eq!(sel.fallbacks.len(), 3);
        assert!(!sel.fallbacks.contains(&id("de-0")), "{sel:?}");
    }
    guards.clear();
    let in_flight: u64 = f.rot.exits().iter().map(|e| e.in_flight).sum();
    assert_eq!(in_flight, 0, "guards give their count back");
    // All idle again: ties are broken at random.
    let seen: HashSet<ExitId> = (0..40)
        .map(|_| f.pick("t", &de, Policy::LeastLoaded).unwrap().primary)
        .collect();
    assert!(seen.len() >= 3, "{seen:?}");
}

#[test]
fn fastest_tries_unmeasured_exits_first_then_the_lowest_ewma() {
    let f = fixture(de5());
    let de = country("de");
    let latencies = [80u64, 20, 50, 10, 200];
    for (i, ms) in latencies.iter().enumerate().take(4) {
        f.rot
            .record_success(&id(&format!("de-{i}")), Duration::from_millis(*ms));
    }
    // de-4 has no sample yet: it goes first.
    assert_eq!(
        f.pick("t", &de, Policy::Fastest).unwrap().primary,
        id("de-4")
    );
    f.rot
        .record_success(&id("de-4"), Duration::from_millis(200));
    let sel = f.pick("t", &de, Policy::Fastest).unwrap();
    assert_eq!(sel.primary, id("de-3"));
    assert_eq!(sel.fallbacks, vec![id("de-1"), id("de-2"), id("de-0")]);
    // The EWMA moves with new samples (alpha 0.3): de-3 at 10 ms gets 500 ms samples.
    for _ in 0..3 {
        f.rot
            .record_success(&id("de-3"), Duration::from_millis(500));
    }
    assert_eq!(
        f.pick("t", &de, Policy::Fastest).unwrap().primary,
        id("de-1")
    );
    let snap = f.rot.exits();
    let de3 = snap.iter().find(|e| e.id == id("de-3")).unwrap();
    let expected = {
        let mut v = 10.0f64;
        for _ in 0..3 {
            v = 0.3 * 500.0 + 0.7 * v;
        }
        v
    };
    assert!((de3.latency_ewma_ms.unwrap() - expected).abs() < 1e-9);
    assert_eq!(de3.successes, 4);
}

// === Filters and health ===

#[test]
fn only_exits_matching_the_filter_are_ever_chosen() {
    let mut exits = de5();
    exits.push(ExitInfo {
        id: id("de-berlin-res"),
        attrs: ExitAttributes {
            country: Some(cc("de")),
            city: Some("berlin".into()),
            asn: Some(3320),
            kind: Some(ExitKind::Residential),
            ..Default::default()
        },
    });
    exits.push(ExitInfo {
        id: id("nowhere"),
        attrs: ExitAttributes::default(),
    });
    let f = fixture(exits);
    let berlin = Filter {
        country: Some(cc("de")),
        city: Some("berlin".into()),
        ..Default::default()
    };
    let residential = Filter {
        kind: Some(ExitKind::Residential),
        ..Default::default()
    };
    for policy in Policy::ALL {
        for _ in 0..20 {
            let sel = f.pick("t", &berlin, policy).unwrap();
            assert_eq!(sel.primary, id("de-berlin-res"), "{policy}");
            assert!(sel.fallbacks.is_empty());
            assert_eq!(
                f.pick("t", &residential, policy).unwrap().primary,
                id("de-berlin-res")
            );
            let fr = f.pick("t", &country("fr"), policy).unwrap();
            for e in std::iter::once(&fr.primary).chain(&fr.fallbacks) {
                assert!(e.as_str().starts_with("fr-"), "{policy}: {fr:?}");
            }
        }
    }
    // No filter: any exit, including the one with no known country.
    let all: HashSet<ExitId> = (0..200)
        .map(|_| {
            f.pick("t", &Filter::default(), Policy::Random)
                .unwrap()
                .primary
        })
        .collect();
    assert!(all.contains(&id("nowhere")));
    // Filters nothing satisfies.
    for filter in [
        country("us"),
        Filter {
            asn: Some(1),
            ..Default::default()
        },
        Filter {
            country: Some(cc("fr")),
            city: Some("berlin".into()),
            ..Default::default()
        },
    ] {
        let err = f.pick("t", &filter, Policy::Random).unwrap_err();
        assert_eq!(
            err,
            SelectError::NoExitMatches {
                filter: filter.clone()
            }
        );
        assert!(err.to_string().contains(&filter.to_string()));
        assert_eq!(err.retry_after(), None);
    }
}

#[test]
fn unhealthy_exits_are_skipped_until_healthy_again() {
    let f = fixture(de5());
    let fr = country("fr");
    f.rot.set_healthy(&id("fr-0"), false);
    for _ in 0..20 {
        let sel = f.pick("t", &fr, Policy::Random).unwrap();
        assert_eq!(sel.primary, id("fr-1"));
        assert!(sel.fallbacks.is_empty());
    }
    f.rot.set_healthy(&id("fr-1"), false);
    assert!(matches!(
        f.pick("t", &fr, Policy::Random),
        Err(SelectError::NoExitMatches { .. })
    ));
    f.rot.set_healthy(&id("fr-0"), true);
    assert_eq!(
        f.pick("t", &fr, Policy::Random).unwrap().primary,
        id("fr-0")
    );
    // Unknown ids are ignored.
    f.rot.set_healthy(&id("ghost"), false);
}

// === Bans ===

#[test]
fn domain_bans_apply_to_that_domain_only_and_expire() {
    let f = fixture(de5());
    let fr = country("fr");
    f.rot.ban(
        &id("fr-0"),
        BanScope::Domain("Shop.Example.".into()),
        Duration::from_secs(60),
    );
    for _ in 0..20 {
        assert_eq!(
            f.pick_domain(&fr, "shop.example").unwrap().primary,
            id("fr-1")
        );
        assert_eq!(
            f.pick_domain(&fr, "SHOP.example.").unwrap().primary,
            id("fr-1")
        );
    }
    let other: HashSet<ExitId> = (0..40)
        .map(|_| f.pick_domain(&fr, "other.example").unwrap().primary)
        .collect();
    assert_eq!(other.len(), 2, "other domains unaffected");
    // Subdomains are other hosts.
    let sub: HashSet<ExitId> = (0..40)
        .map(|_| f.pick_domain(&fr, "a.shop.example").unwrap().primary)
        .collect();
    assert_eq!(sub.len(), 2);
    f.rot.ban(
        &id("fr-1"),
        BanScope::Domain("shop.example".into()),
        Duration::from_secs(30),
    );
    let err = f.pick_domain(&fr, "shop.example").unwrap_err();
    assert_eq!(
        err,
        SelectError::AllCoolingDown {
            filter: fr.clone(),
            domain: "shop.example".into(),
            retry_after: Duration::from_secs(30),
        }
    );
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(
        f.pick_domain(&fr, "shop.example").unwrap().primary,
        id("fr-1")
    );
    f.clock.advance(Duration::from_secs(29));
    assert_eq!(
        f.pick_domain(&fr, "shop.example").unwrap().primary,
        id("fr-1")
    );
    f.clock.advance(Duration::from_secs(1));
    let both: HashSet<ExitId> = (0..40)
        .map(|_| f.pick_domain(&fr, "shop.example").unwrap().primary)
        .collect();
    assert_eq!(both.len(), 2);
}

#[test]
fn global_bans_apply_everywhere_and_never_shorten() {
    let f = fixture(de5());
    let fr = country("fr");
    f.rot
        .ban(&id("fr-0"), BanScope::Global, Duration::from_secs(300));
    f.rot
        .ban(&id("fr-0"), BanScope::Global, Duration::from_secs(10));
    for d in ["a.com", "b.com", ""] {
        assert_eq!(f.pick_domain(&fr, d).unwrap().primary, id("fr-1"));
    }
    f.rot.ban(
        &id("fr-1"),
        BanScope::Domain("a.com".into()),
        Duration::from_secs(20),
    );
    f.rot
        .ban(&id("fr-1"), BanScope::Global, Duration::from_secs(5));
    // fr-1 is back at 5 s for other domains, at 20 s for a.com; fr-0 at 300 s.
    let err = f.pick_domain(&fr, "a.com").unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(20)));
    assert_eq!(
        f.pick_domain(&fr, "b.com").unwrap_err().retry_after(),
        Some(Duration::from_secs(5))
    );
    f.clock.advance(Duration::from_secs(5));
    assert_eq!(f.pick_domain(&fr, "b.com").unwrap().primary, id("fr-1"));
    assert_eq!(
        f.pick_domain(&fr, "a.com").unwrap_err().retry_after(),
        Some(Duration::from_secs(15))
    );
    f.clock.advance(Duration::from_secs(295));
    assert_eq!(f.pick_domain(&fr, "a.com").unwrap().fallbacks.len(), 1);
    // Unhealthy + banned: no exit matches (a ban on an unhealthy exit does not make the
    // error a "wait").
    f.rot
        .ban(&id("fr-1"), BanScope::Global, Duration::from_secs(5));
    f.rot.set_healthy(&id("fr-0"), false);
    assert_eq!(
        f.pick_domain(&fr, "a.com").unwrap_err().retry_after(),
        Some(Duration::from_secs(5))
    );
    f.rot.set_healthy(&id("fr-1"), false);
    assert!(matches!(
        f.pick_domain(&fr, "a.com"),
        Err(SelectError::NoExitMatches { .. })
    ));
    // unban lifts everything.
    f.rot.set_healthy(&id("fr-1"), true);
    f.rot.unban(&id("fr-1"));
    assert_eq!(f.pick_domain(&fr, "a.com").unwrap().primary, id("fr-1"));
}

#[test]
fn domain_bans_per_exit_are_bounded() {
    let cfg = RotatorConfig {
        max_domain_bans_per_exit: 100,
        ..Default::default()
    };
    let f = fixture_with(cfg, de5());
    for i in 0..10_000u64 {
        f.rot.ban(
            &id("de-0"),
            BanScope::Domain(format!("d{i}.com")),
            Duration::from_secs(1000 + i),
        );
    }
    let snap = f.rot.exits();
    let de0 = snap.iter().find(|e| e.id == id("de-0")).unwrap();
    assert_eq!(de0.bans.len(), 100);
    // The longest bans are the ones kept.
    assert!(
        de0.bans
            .iter()
            .all(|b| b.remaining >= Duration::from_secs(1000 + 9_900))
    );
    // Hostile domain strings are only keys.
    f.rot.ban(
        &id("de-1"),
        BanScope::Domain("x".repeat(100_000)),
        Duration::from_secs(1),
    );
    f.rot
        .ban(&id("de-1"), BanScope::Domain(String::new()), Duration::MAX);
    assert!(f.pick_domain(&country("de"), "").is_ok());
}

#[test]
fn prune_drops_expired_bans() {
    let f = fixture(de5());
    f.rot.ban(
        &id("de-0"),
        BanScope::Domain("a.com".into()),
        Duration::from_secs(10),
    );
    f.rot.ban(
        &id("de-0"),
        BanScope::Domain("b.com".into()),
        Duration::from_secs(20),
    );
    f.clock.advance(Duration::from_secs(15));
    f.rot.prune();
    let snap = f.rot.exits();
    let bans = &snap.iter().find(|e| e.id == id("de-0")).unwrap().bans;
    assert_eq!(bans.len(), 1);
    assert_eq!(bans[0].scope, BanScope::Domain("b.com".into()));
    assert_eq!(bans[0].remaining, Duration::from_secs(5));
}

// === Sessions ===

#[test]
fn a_session_keeps_its_exit_for_its_ttl_and_renews_on_use() {
    let f = fixture(de5());
    let de = country("de");
    let s1 = session("s1", 60, false);
    let first = f.sticky("tok", &de, &s1).unwrap();
    assert!(
        first.fallbacks.is_empty(),
        "no failover without replacement"
    );
    for _ in 0..50 {
        f.clock.advance(Duration::from_secs(59));
        assert_eq!(f.sticky("tok", &de, &s1).unwrap().primary, first.primary);
    }
    let sessions = f.rot.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].session, "s1");
    assert_eq!(sessions[0].exit, first.primary);
    assert_eq!(sessions[0].remaining, Duration::from_secs(60));
    // Unused for its TTL: the binding is gone (a new one is made, maybe elsewhere).
    f.clock.advance(Duration::from_secs(60));
    assert!(f.rot.sessions().is_empty());
    f.rot.prune();
    assert_eq!(f.rot.session_count(), 0);
    let rebinds: HashSet<ExitId> = (0..30)
        .map(|i| {
            f.clock.advance(Duration::from_secs(61));
            f.sticky("tok", &de, &session(&format!("x{i}"), 60, false))
                .unwrap()
                .primary
        })
        .collect();
    assert!(rebinds.len() >= 2, "fresh sessions spread: {rebinds:?}");
}

#[test]
fn session_ttl_is_clamped_to_the_configured_maximum() {
    let cfg = RotatorConfig {
        max_session_ttl: Duration::from_secs(600),
        ..Default::default()
    };
    let f = fixture_with(cfg, de5());
    let s = session("s", 100_000, false);
    f.sticky("tok", &country("de"), &s).unwrap();
    assert_eq!(f.rot.sessions()[0].remaining, Duration::from_secs(600));
}

#[test]
fn a_removed_exit_fails_the_session_once_without_replacement() {
    let f = fixture(de5());
    let de = country("de");
    let s = session("s", 600, false);
    let bound = f.sticky("tok", &de, &s).unwrap().primary;
    f.rot.remove_exit(&bound);
    assert_eq!(
        f.sticky("tok", &de, &s).unwrap_err(),
        SelectError::SessionExitGone {
            session: "s".into(),
            exit: bound.clone(),
        }
    );
    // The binding was dropped: the next request binds afresh.
    let next = f.sticky("tok", &de, &s).unwrap().primary;
    assert_ne!(next, bound);
    assert_eq!(f.sticky("tok", &de, &s).unwrap().primary, next);
}

#[test]
fn an_unhealthy_or_banned_exit_fails_the_session_until_it_recovers() {
    let f = fixture(de5());
    let de = country("de");
    let s = session("s", 600, false);
    let bound = f.sticky("tok", &de, &s).unwrap().primary;
    f.rot.set_healthy(&bound, false);
    for _ in 0..3 {
        let err = f.sticky("tok", &de, &s).unwrap_err();
        assert!(
            matches!(err, SelectError::SessionExitGone { ref exit, .. } if *exit == bound),
            "{err}"
        );
        assert!(err.to_string().contains("replacement is not allowed"));
    }
    f.rot.set_healthy(&bound, true);
    assert_eq!(f.sticky("tok", &de, &s).unwrap().primary, bound);
    f.rot.ban(
        &bound,
        BanScope::Domain("example.com".into()),
        Duration::from_secs(30),
    );
    assert!(matches!(
        f.sticky("tok", &de, &s),
        Err(SelectError::SessionExitGone { .. })
    ));
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(f.sticky("tok", &de, &s).unwrap().primary, bound);
}

#[test]
fn replacement_binds_a_new_exit_matching_the_same_filter() {
    let f = fixture(de5());
    let de = country("de");
    let s = session("s", 600, true);
    let first = f.sticky("tok", &de, &s).unwrap();
    assert_eq!(
        first.fallbacks.len(),
        3,
        "fallbacks when replacement is allowed"
    );
    assert!(!first.fallbacks.contains(&first.primary));
    f.rot.set_healthy(&first.primary, false);
    let second = f.sticky("tok", &de, &s).unwrap().primary;
    assert_ne!(second, first.primary);
    assert!(second.as_str().starts_with("de-"));
    // The session now sticks to the replacement, even when the old one comes back.
    f.rot.set_healthy(&first.primary, true);
    for _ in 0..10 {
        assert_eq!(f.sticky("tok", &de, &s).unwrap().primary, second);
    }
    f.rot.remove_exit(&second);
    let third = f.sticky("tok", &de, &s).unwrap().primary;
    assert!(third != second && third.as_str().starts_with("de-"));
    // Nothing left to replace with: the usual error.
    for e in f.rot.exits() {
        f.rot.set_healthy(&e.id, false);
    }
    assert!(matches!(
        f.sticky("tok", &de, &s),
        Err(SelectError::NoExitMatches { .. })
    ));
}

#[test]
fn sessions_are_scoped_by_token() {
    let f = fixture(vec![exit("de-0", "de")]);
    let de = country("de");
    let s = session("shared-name", 600, false);
    assert_eq!(f.sticky("alice", &de, &s).unwrap().primary, id("de-0"));
    f.rot
        .set_exits(vec![exit("de-0", "de"), exit("de-1", "de")]);
    f.rot.set_healthy(&id("de-0"), false);
    // Bob guessing Alice's session id gets his own session, not hers.
    assert_eq!(f.sticky("bob", &de, &s).unwrap().primary, id("de-1"));
    assert!(matches!(
        f.sticky("alice", &de, &s),
        Err(SelectError::SessionExitGone { .. })
    ));
    // Key framing: ("ab", "c") and ("a", "bc") are different sessions.
    f.rot.set_healthy(&id("de-0"), true);
    let x = f
        .sticky("ab", &de, &session("c", 600, false))
        .unwrap()
        .primary;
    f.rot.set_healthy(&x, false);
    assert!(f.sticky("a", &de, &session("bc", 600, false)).is_ok());
    // The admin view never shows a whole token.
    let long_token = "secret-token-0123456789";
    f.sticky(long_token, &de, &session("s9", 600, true))
        .unwrap();
    let views = f.rot.sessions();
    assert!(views.iter().all(|v| !v.token_hint.contains("secret-token")));
    assert!(views.iter().any(|v| v.token_hint == "secr…"));
    assert!(f.rot.end_session(long_token, "s9"));
    assert!(!f.rot.end_session(long_token, "s9"));
}

#[test]
fn a_changed_filter_rebinds_the_session() {
    let f = fixture(de5());
    let s = session("s", 600, false);
    let de = f.sticky("tok", &country("de"), &s).unwrap().primary;
    assert!(de.as_str().starts_with("de-"));
    let fr = f.sticky("tok", &country("fr"), &s).unwrap().primary;
    assert!(fr.as_str().starts_with("fr-"));
    assert_eq!(f.sticky("tok", &country("fr"), &s).unwrap().primary, fr);
}

#[test]
fn bad_sessions_are_refused() {
    let f = fixture(de5());
    let de = country("de");
    let cases = [
        (session("", 60, false), "empty"),
        (session(&"s".repeat(257), 60, false), "256"),
        (session("s", 0, false), "TTL"),
    ];
    for (spec, needle) in cases {
        let err = f.sticky("tok", &de, &spec).unwrap_err();
        assert!(matches!(err, SelectError::InvalidSession { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(err.to_string().len() < 200);
    }
    assert!(
        f.sticky("tok", &de, &session(&"s".repeat(256), 60, false))
            .is_ok()
    );
    assert!(
        f.sticky("tok", &de, &session("ü\0\u{202e}", 60, false))
            .is_ok()
    );
}

#[test]
fn session_storage_is_bounded() {
    let cfg = RotatorConfig {
        max_sessions: 100,
        ..Default::default()
    };
    let f = fixture_with(cfg, de5());
    let de = country("de");
    for i in 0..2_000 {
        f.sticky(
            &format!("tok{}", i % 7),
            &de,
            &session(&format!("s{i}"), 600, false),
        )
        .unwrap();
    }
    assert!(f.rot.session_count() <= 100, "{}", f.rot.session_count());
    // The most recent sessions are usable (LRU admits new ones).
    let last = session("s1999", 600, false);
    let a = f.sticky("tok4", &de, &last).unwrap().primary;
    assert_eq!(f.sticky("tok4", &de, &last).unwrap().primary, a);
    assert!(f.rot.sessions().len() <= 100);
}

// === Fallbacks ===

#[test]
fn fallbacks_are_distinct_eligible_and_never_the_primary() {
    let f = fixture(de5());
    let de = country("de");
    f.rot.set_healthy(&id("de-4"), false);
    f.rot
        .ban(&id("de-3"), BanScope::Global, Duration::from_secs(10));
    for policy in Policy::ALL {
        for _ in 0..30 {
            let sel = f.pick("t", &de, policy).unwrap();
            let mut all = vec![sel.primary.clone()];
            all.extend(sel.fallbacks.iter().cloned());
            let distinct: HashSet<&ExitId> = all.iter().collect();
            assert_eq!(distinct.len(), all.len(), "{policy}: {sel:?}");
            assert_eq!(all.len(), 3, "three eligible: primary + 2 fallbacks");
            assert!(
                all.iter()
                    .all(|e| ["de-0", "de-1", "de-2"].contains(&e.as_str())),
                "{sel:?}"
            );
        }
    }
    let cfg = RotatorConfig {
        max_fallbacks: 1,
        ..Default::default()
    };
    let f = fixture_with(cfg, de5());
    assert_eq!(f.pick("t", &de, Policy::Random).unwrap().fallbacks.len(), 1);
    let cfg = RotatorConfig {
        max_fallbacks: 0,
        ..Default::default()
    };
    let f = fixture_with(cfg, de5());
    for policy in Policy::ALL {
        assert!(f.pick("t", &de, policy).unwrap().fallbacks.is_empty());
    }
}

// === Pool changes and snapshots ===

#[test]
fn reloads_keep_the_state_of_exits_that_stay() {
    let f = fixture(de5());
    let g = f.rot.begin(&id("de-0"));
    f.rot.record_failure(&id("de-0"));
    f.rot.record_success(&id("de-0"), Duration::from_millis(42));
    f.rot.set_healthy(&id("de-1"), false);
    f.rot
        .ban(&id("de-2"), BanScope::Global, Duration::from_secs(60));
    f.rot.set_exits(vec![
        exit("de-0", "de"),
        exit("de-1", "de"),
        exit("de-2", "de"),
        exit("us-0", "us"),
        exit("us-0", "us"),
    ]);
    let snap = f.rot.exits();
    let names: Vec<&str> = snap.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(names, ["de-0", "de-1", "de-2", "us-0"]);
    assert_eq!(
        (snap[0].requests, snap[0].in_flight, snap[0].failures),
        (1, 1, 1)
    );
    assert_eq!(snap[0].latency_ewma_ms, Some(42.0));
    assert!(!snap[1].healthy);
    assert_eq!(snap[2].bans.len(), 1);
    assert_eq!(snap[2].bans[0].scope, BanScope::Global);
    assert_eq!(snap[2].bans[0].remaining, Duration::from_secs(60));
    assert!(snap[3].healthy && snap[3].requests == 0);
    drop(g);
    assert_eq!(f.rot.exits()[0].in_flight, 0);
    // A removed exit is never chosen again, even by a guard's late drop.
    let g = f.rot.begin(&id("us-0"));
    f.rot.remove_exit(&id("us-0"));
    drop(g);
    assert!(matches!(
        f.pick("t", &country("us"), Policy::Random),
        Err(SelectError::NoExitMatches { .. })
    ));
    // Re-added: a fresh state.
    f.rot.upsert_exit(exit("us-0", "us"));
    assert_eq!(
        f.rot
            .exits()
            .iter()
            .find(|e| e.id == id("us-0"))
            .unwrap()
            .requests,
        0
    );
    // Unknown ids are ignored everywhere.
    f.rot.remove_exit(&id("ghost"));
    f.rot.record_failure(&id("ghost"));
    f.rot.record_success(&id("ghost"), Duration::from_millis(1));
    f.rot
        .ban(&id("ghost"), BanScope::Global, Duration::from_secs(1));
    drop(f.rot.begin(&id("ghost")));
}

#[test]
fn upsert_moves_an_exit_between_index_buckets() {
    let f = fixture(de5());
    f.rot.record_failure(&id("de-0"));
    f.rot.upsert_exit(exit("de-0", "us"));
    assert_eq!(
        f.pick("t", &country("us"), Policy::Random).unwrap().primary,
        id("de-0")
    );
    for _ in 0..30 {
        assert_ne!(
            f.pick("t", &country("de"), Policy::Random).unwrap().primary,
            id("de-0")
        );
    }
    assert_eq!(
        f.rot
            .exits()
            .iter()
            .find(|e| e.id == id("de-0"))
            .unwrap()
            .failures,
        1
    );
}

#[test]
fn an_empty_pool_has_no_exit() {
    let f = fixture(Vec::new());
    for policy in Policy::ALL {
        assert!(matches!(
            f.pick("t", &Filter::default(), policy),
            Err(SelectError::NoExitMatches { .. })
        ));
    }
    assert!(matches!(
        f.sticky("t", &Filter::default(), &session("s", 1, true)),
        Err(SelectError::NoExitMatches { .. })
    ));
}

#[test]
fn snapshots_serialize_for_the_admin_api() {
    let f = fixture(de5());
    f.rot.ban(
        &id("de-0"),
        BanScope::Domain("a.com".into()),
        Duration::from_millis(1500),
    );
    f.rot.record_success(&id("de-0"), Duration::from_millis(12));
    f.sticky(
        "a-long-enough-token",
        &country("de"),
        &session("s1", 30, false),
    )
    .unwrap();
    let exits = serde_json::to_value(f.rot.exits()).unwrap();
    assert_eq!(exits[0]["id"], "de-0");
    assert_eq!(exits[0]["attrs"]["country"], "de");
    assert_eq!(exits[0]["bans"][0]["scope"]["domain"], "a.com");
    assert_eq!(exits[0]["bans"][0]["remaining_ms"], 1500);
    assert_eq!(exits[0]["latency_ewma_ms"], 12.0);
    let sessions = serde_json::to_value(f.rot.sessions()).unwrap();
    assert_eq!(sessions[0]["session"], "s1");
    assert_eq!(sessions[0]["remaining_ms"], 30_000);
    let err = serde_json::to_value(SelectError::AllCoolingDown {
        filter: country("de"),
        domain: "a.com".into(),
        retry_after: Duration::from_secs(2),
    })
    .unwrap();
    assert_eq!(err["error"], "all-cooling-down");
    assert_eq!(err["retry_after_ms"], 2000);
}

// === Rate-limit-aware selection ===

#[test]
fn select_with_limits_prefers_exits_that_are_not_limited() {
    let clock = ManualClock::new();
    let rot = Rotator::new(RotatorConfig::default(), Arc::new(clock.clone()));
    rot.set_exits(de5());
    let limiter = RateLimiter::new(Arc::new(clock.clone()));
    let limits = LimitSet {
        per_exit_domain: Some("1/min".parse().unwrap()),
        ..Default::default()
    };
    let fr = country("fr");
    let req = SelectRequest {
        token: "t",
        filter: &fr,
        policy: Policy::Random,
        session: None,
        domain: "a.com",
    };
    limiter.check(&limits, "t", &id("fr-0"), "a.com").unwrap();
    for _ in 0..20 {
        let sel = rot.select_with_limits(&req, &limiter, &limits).unwrap();
        assert_eq!(sel.primary, id("fr-1"));
        assert!(sel.fallbacks.is_empty());
    }
    limiter.check(&limits, "t", &id("fr-1"), "a.com").unwrap();
    // Both limited: choose among all, the gateway's check reports the wait.
    let seen: HashSet<ExitId> = (0..40)
        .map(|_| {
            rot.select_with_limits(&req, &limiter, &limits)
                .unwrap()
                .primary
        })
        .collect();
    assert_eq!(seen.len(), 2);
}

// === Concurrency ===

#[test]
fn concurrent_selection_and_accounting_stay_consistent() {
    let f = Arc::new(fixture(de5()));
    std::thread::scope(|s| {
        for t in 0..4 {
            let f = Arc::clone(&f);
            s.spawn(move || {
                let de = country("de");
                let spec = session(&format!("s{}", t % 2), 600, true);
                for i in 0..500 {
                    let policy = Policy::ALL[i % Policy::ALL.len()];
                    let sel = if policy == Policy::Sticky {
                        f.sticky("shared", &de, &spec).unwrap()
                    } else {
                        f.pick("shared", &de, policy).unwrap()
                    };
                    let guard = f.rot.begin(&sel.primary);
                    f.rot
                        .record_success(&sel.primary, Duration::from_millis(i as u64 % 50));
                    if i % 50 == 0 {
                        f.rot.set_exits(de5());
                    }
                    drop(guard);
                }
            });
        }
    });
    let snap = f.rot.exits();
    assert_eq!(snap.iter().map(|e| e.in_flight).sum::<u64>(), 0);
    assert_eq!(snap.iter().map(|e| e.requests).sum::<u64>(), 2000);
    assert_eq!(snap.iter().map(|e| e.successes).sum::<u64>(), 2000);
    // Two session ids shared by two threads each: each stuck to a single exit.
    assert_eq!(f.rot.sessions().len(), 2);
}

#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Rotator>();
    send_sync::<RateLimiter>();
    send::<ipsx_rotation::InFlight>();
    send_sync::<SelectError>();
}

/// Buckets of 32 exits or more are sampled by the random policies instead of scanned:
/// the same guarantees must hold there.
#[test]
fn large_buckets_keep_every_guarantee() {
    let mut exits: Vec<ExitInfo> = (0..200)
        .map(|i| exit(&format!("de-{i:03}"), "de"))
        .collect();
    exits.push(ExitInfo {
        id: id("de-berlin"),
        attrs: ExitAttributes {
            country: Some(cc("de")),
            city: Some("berlin".into()),
            ..Default::default()
        },
    });
    let f = fixture(exits);
    let de = country("de");
    // Most of the bucket is banned or unhealthy for this domain.
    for i in 0..190 {
        if i % 2 == 0 {
            f.rot.ban(
                &id(&format!("de-{i:03}")),
                BanScope::Domain("example.com".into()),
                Duration::from_secs(60),
            );
        } else {
            f.rot.set_healthy(&id(&format!("de-{i:03}")), false);
        }
    }
    let usable = |e: &ExitId| e.as_str() >= "de-190";
    for policy in Policy::ALL {
        let mut prev: Option<ExitId> = None;
        let mut seen = HashSet::new();
        for _ in 0..60 {
            let sel = f.pick("tok", &de, policy).unwrap();
            assert!(usable(&sel.primary), "{policy}: {sel:?}");
            assert_eq!(sel.fallbacks.len(), 3);
            assert!(sel.fallbacks.iter().all(usable));
            assert!(!sel.fallbacks.contains(&sel.primary));
            let distinct: HashSet<&ExitId> = sel.fallbacks.iter().collect();
            assert_eq!(distinct.len(), 3);
            if policy == Policy::PerRequest {
                assert_ne!(Some(&sel.primary), prev.as_ref());
            }
            prev = Some(sel.primary.clone());
            seen.insert(sel.primary);
        }
        if matches!(
            policy,
            Policy::Random | Policy::PerRequest | Policy::RoundRobin
        ) {
            assert!(seen.len() >= 5, "{policy}: {seen:?}");
        }
    }
    // A city filter that one exit in the large bucket satisfies.
    let berlin = Filter {
        country: Some(cc("de")),
        city: Some("berlin".into()),
        ..Default::default()
    };
    for policy in Policy::ALL {
        let sel = f.pick("tok", &berlin, policy).unwrap();
        assert_eq!(sel.primary, id("de-berlin"));
        assert!(sel.fallbacks.is_empty());
    }
    // Per-request with only two usable exits in a large bucket still alternates.
    for i in 190..200 {
        f.rot.set_healthy(&id(&format!("de-{i:03}")), i >= 198);
    }
    f.rot.set_healthy(&id("de-berlin"), false);
    let picks: Vec<ExitId> = (0..20)
        .map(|_| f.pick("tok", &de, Policy::PerRequest).unwrap().primary)
        .collect();
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1]);
    }
    // Sticky sessions with replacement in a large bucket.
    let s = session("big", 60, true);
    let bound = f.sticky("tok", &de, &s).unwrap();
    assert_eq!(bound.fallbacks.len(), 1);
    assert_eq!(f.sticky("tok", &de, &s).unwrap().primary, bound.primary);
    // Everything usable banned: a wait, with the first unban time.
    f.rot
        .ban(&id("de-198"), BanScope::Global, Duration::from_secs(10));
    f.rot
        .ban(&id("de-199"), BanScope::Global, Duration::from_secs(20));
    assert_eq!(
        f.pick("tok", &de, Policy::Random)
            .unwrap_err()
            .retry_after(),
        Some(Duration::from_secs(10))
    );
}

#[test]
fn rotator_config_is_validated_and_sanitised() {
    let cfg: RotatorConfig =
        toml::from_str("max_fallbacks = 2\nmax_session_ttl = \"10m\"").unwrap();
    assert_eq!(cfg.max_fallbacks, 2);
    assert_eq!(cfg.max_session_ttl, Duration::from_secs(600));
    assert_eq!(cfg.max_sessions, RotatorConfig::default().max_sessions);
    assert!(cfg.validate().is_ok());
    let err = toml::from_str::<RotatorConfig>("max_fallback = 2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_fallback"), "{err}");
    let err = toml::from_str::<RotatorConfig>("max_session_ttl = \"forever\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_session_ttl"), "{err}");
    let bad = [
        (
            RotatorConfig {
                ewma_alpha: 0.0,
                ..Default::default()
            },
            "ewma_alpha",
        ),
        (
            RotatorConfig {
                ewma_alpha: f64::NAN,
                ..Default::default()
            },
            "ewma_alpha",
        ),
        (
            RotatorConfig {
                ewma_alpha: 1.5,
                ..Default::default()
            },
            "ewma_alpha",
        ),
        (
            RotatorConfig {
                max_fallbacks: 1000,
                ..Default::default()
            },
            "max_fallbacks",
        ),
        (
            RotatorConfig {
                max_sessions: 0,
                ..Default::default()
            },
            "max_sessions",
        ),
        (
            RotatorConfig {
                max_session_ttl: Duration::ZERO,
                ..Default::default()
            },
            "max_session_ttl",
        ),
        (
            RotatorConfig {
                max_domain_bans_per_exit: 0,
                ..Default::default()
            },
            "max_domain_bans_per_exit",
        ),
        (
            RotatorConfig {
                per_request_slots: 0,
                ..Default::default()
            },
            "per_request_slots",
        ),
        (
            RotatorConfig {
                per_request_slots: usize::MAX,
                ..Default::default()
            },
            "per_request_slots",
        ),
    ];
    for (cfg, field) in bad {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
        // Rotator::new never panics on it; the values in use are sane.
        let f = fixture_with(cfg, de5());
        assert!(f.rot.config().validate().is_ok());
        f.rot.record_success(&id("de-0"), Duration::from_millis(5));
        f.rot.record_success(&id("de-0"), Duration::from_millis(5));
        let ewma = f.rot.exits()[0].latency_ewma_ms.unwrap();
        assert!((ewma - 5.0).abs() < 1e-9);
        assert!(f.pick("t", &country("de"), Policy::PerRequest).is_ok());
    }
}
