//! Domain tests of the sans-IO core: matching rules, funds holds, deal life cycle,
//! profiles, with property tests over random books.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use alloy_primitives::Address;
use ipsx_exchange::book::NoProfiles;
use ipsx_exchange::engine::BookQuery;
use ipsx_exchange::engine::{Actor, EventKind};
use ipsx_exchange::{
    Cancel, Command, DealStatus, Diversity, EngineConfig, Exchange, ExchangeError, Extend, Offer,
    Outcome, PartyStatus, Protocol, Rating, Request, StatusReport, WgKey,
};
use ipsx_rotation::{CountryCode, ExitKind};
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000;
const COUNTRIES: [&str; 6] = ["de", "fr", "us", "gb", "jp", "br"];
const KINDS: [ExitKind; 3] = [
    ExitKind::Residential,
    ExitKind::Mobile,
    ExitKind::Datacenter,
];

fn wallet(n: u8) -> Address {
    Address::repeat_byte(n)
}

fn cc(s: &str) -> CountryCode {
    s.parse().unwrap()
}

#[allow(clippy::too_many_arguments)]
fn offer(
    provider: u8,
    ip: [u8; 4],
    country: &str,
    kind: ExitKind,
    price: u128,
    cap: u32,
    nonce: u64,
) -> Offer {
    Offer {
        provider: wallet(provider),
        exit_address: IpAddr::V4(Ipv4Addr::from(ip)),
        country: cc(country),
        region: None,
        city: Some("city".into()),
        asn: Some(u32::from(ip[1]) + 1),
        kind,
        protocols: vec![Protocol::Http, Protocol::Https],
        price_per_ip_second: price,
        min_duration_s: 5,
        max_duration_s: 86_400,
        capacity: cap,
        wg_endpoint: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), 51820),
        wg_public_key: WgKey([provider; 32]),
        expiry: NOW + 3600,
        nonce,
    }
}

fn request(requester: u8, count: u32, countries: &[&str], max_price: u128, nonce: u64) -> Request {
    Request {
        requester: wallet(requester),
        count,
        countries: countries.iter().map(|c| cc(c)).collect(),
        regions: vec![],
        cities: vec![],
        asns: vec![],
        types: vec![],
        protocols: vec![],
        min_rating: 0,
        diversity: Diversity::None,
        exclude_providers: Vec::new(),
        duration_s: 60,
        max_price_per_ip_second: max_price,
        wg_public_key: WgKey([requester; 32]),
        expiry: NOW + 600,
        nonce,
    }
}

fn post_offer(ex: &mut Exchange, o: Offer) -> (u64, Vec<u64>) {
    match ex
        .apply(&Command::PostOffer {
            offer: o,
            now: ex.now().max(NOW),
        })
        .unwrap()
    {
        Outcome::OfferPosted { order_id, deals } => (order_id, deals),
        other => panic!("{other:?}"),
    }
}

fn post_request(ex: &mut Exchange, r: Request, balance: u128) -> Result<Outcome, ExchangeError> {
    ex.apply(&Command::PostRequest {
        request: r,
        balance,
        now: ex.now().max(NOW),
    })
}

fn report(
    ex: &mut Exchange,
    w: u8,
    deal: u64,
    status: PartyStatus,
    nonce: u64,
    now: u64,
) -> Result<Outcome, ExchangeError> {
    ex.apply(&Command::Report {
        report: StatusReport {
            wallet: wallet(w),
            deal_id: deal,
            status,
            reason: String::new(),
            expiry: now + 60,
            nonce,
        },
        now,
    })
}

#[test]
fn cheapest_first_then_rating_then_age() {
    let mut ex = Exchange::new(EngineConfig::default());
    let (a, _) = post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 5, 1, 1),
    );
    let (b, _) = post_offer(
        &mut ex,
        offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 3, 1, 1),
    );
    let (c, _) = post_offer(
        &mut ex,
        offer(3, [10, 0, 2, 1], "de", ExitKind::Residential, 3, 1, 1),
    );
    let (_d, _) = post_offer(
        &mut ex,
        offer(4, [10, 0, 3, 1], "fr", ExitKind::Residential, 1, 1, 1),
    );
    let out = post_request(&mut ex, request(9, 3, &["de"], 10, 1), u128::MAX).unwrap();
    let Outcome::RequestPosted {
        deals,
        filled,
        resting,
        ..
    } = out
    else {
        panic!()
    };
    assert_eq!((filled, resting), (3, 0));
    let offers: Vec<u64> = deals
        .iter()
        .map(|d| ex.deal(*d).unwrap().offer_id)
        .collect();
    assert_eq!(
        offers,
        vec![b, c, a],
        "price 3 (older first), then price 5; the French one is filtered out"
    );
    let d = ex.deal(deals[0]).unwrap();
    assert_eq!(
        d.terms.price_per_ip_second, 3,
        "agreed price is the offer's"
    );
    assert_eq!(d.terms.value, 3 * 60);
    assert_eq!(d.status, DealStatus::Matched);
}

#[test]
fn self_trade_is_prevented_and_remainder_rests_then_fills() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(7, [10, 0, 0, 1], "de", ExitKind::Mobile, 1, 5, 1),
    );
    // Wallet 7 asks for a German IP: its own offer is skipped.
    let out = post_request(&mut ex, request(7, 1, &["de"], 10, 2), 1_000_000).unwrap();
    let Outcome::RequestPosted {
        order_id,
        filled: 0,
        resting: 1,
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    // Someone else's offer arrives: the resting request takes it.
    let (_, deals) = post_offer(
        &mut ex,
        offer(8, [10, 0, 1, 1], "de", ExitKind::Mobile, 2, 1, 1),
    );
    assert_eq!(deals.len(), 1);
    let d = ex.deal(deals[0]).unwrap();
    assert_eq!(
        (d.provider, d.requester, d.request_id),
        (wallet(8), wallet(7), order_id)
    );
    assert!(
        ex.requests().get(order_id).is_none(),
        "fully filled request leaves the book"
    );
    // The exhausted offer leaves the matching indexes.
    assert!(
        ex.book(&BookQuery::default())
            .unwrap()
            .offers
            .iter()
            .all(|o| o.offer.provider != wallet(8))
    );
}

#[test]
fn cancel_after_partial_fill_releases_exactly_the_unfilled_part() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 4, 1, 1),
    );
    post_offer(
        &mut ex,
        offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 6, 1, 1),
    );
    let r = request(9, 5, &["de"], 10, 1);
    let per_ip = 10u128 * 60;
    let out = post_request(&mut ex, r, 10_000).unwrap();
    let Outcome::RequestPosted {
        order_id,
        filled: 2,
        resting: 3,
        held,
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!(held, 4 * 60 + 6 * 60 + 3 * per_ip);
    assert_eq!(ex.held(&wallet(9)), held);
    let out = ex
        .apply(&Command::Cancel {
            cancel: Cancel {
                wallet: wallet(9),
                order_id,
                expiry: NOW + 60,
                nonce: 2,
            },
            now: NOW + 1,
        })
        .unwrap();
    assert_eq!(
        out,
        Outcome::Cancelled {
            order_id,
            released: 3 * per_ip,
            open: 3
        }
    );
    assert_eq!(
        ex.held(&wallet(9)),
        4 * 60 + 6 * 60,
        "deals keep their hold"
    );
    // Cancelling again: the order is gone.
    let err = ex
        .apply(&Command::Cancel {
            cancel: Cancel {
                wallet: wallet(9),
                order_id,
                expiry: NOW + 60,
                nonce: 3,
            },
            now: NOW + 1,
        })
        .unwrap_err();
    assert_eq!(err, ExchangeError::UnknownOrder(order_id));
}

#[test]
fn cancel_of_someone_elses_order_is_refused() {
    let mut ex = Exchange::new(EngineConfig::default());
    let (id, _) = post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 4, 1, 1),
    );
    let err = ex
        .apply(&Command::Cancel {
            cancel: Cancel {
                wallet: wallet(2),
                order_id: id,
                expiry: NOW + 60,
                nonce: 1,
            },
            now: NOW,
        })
        .unwrap_err();
    assert!(matches!(err, ExchangeError::NotParty { .. }), "{err}");
    assert_eq!(ex.offers().len(), 1);
}

#[test]
fn funds_cover_the_maximum_cost_and_are_not_used_twice() {
    let mut ex = Exchange::new(EngineConfig::default());
    // max cost = 10 * 60 * 2 = 1200
    let balance = 2_000;
    post_request(&mut ex, request(9, 2, &["de"], 10, 1), balance).unwrap();
    let err = post_request(&mut ex, request(9, 2, &["de"], 10, 2), balance).unwrap_err();
    assert_eq!(
        err,
        ExchangeError::InsufficientFunds {
            field: "max_price_per_ip_second",
            wallet: wallet(9),
            needed: 1200,
            available: 800
        }
    );
    assert!(err.to_string().contains("max_price_per_ip_second"));
    post_request(&mut ex, request(9, 1, &["de"], 10, 3), balance).unwrap();
    assert_eq!(ex.held(&wallet(9)), 1800);
}

#[test]
fn replayed_nonce_and_expired_orders_are_refused_without_change() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 4, 1, 42),
    );
    let err = ex
        .apply(&Command::PostOffer {
            offer: offer(1, [10, 0, 0, 2], "de", ExitKind::Residential, 4, 1, 42),
            now: NOW,
        })
        .unwrap_err();
    assert_eq!(
        err,
        ExchangeError::Replay {
            wallet: wallet(1),
            nonce: 42
        }
    );
    let mut late = offer(1, [10, 0, 0, 3], "de", ExitKind::Residential, 4, 1, 43);
    late.expiry = NOW;
    let err = ex
        .apply(&Command::PostOffer {
            offer: late,
            now: NOW,
        })
        .unwrap_err();
    assert!(matches!(err, ExchangeError::Expired { .. }));
    assert_eq!(ex.offers().len(), 1);
}

#[test]
fn bad_fields_are_named() {
    let mut ex = Exchange::new(EngineConfig::default());
    let cases: Vec<(Request, &str)> = vec![
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.duration_s = 4;
                r
            },
            "duration_s",
        ),
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.duration_s = 30 * 86_400 + 1;
                r
            },
            "duration_s",
        ),
        (
            {
                let mut r = request(9, 0, &[], 10, 1);
                r.count = 0;
                r
            },
            "count",
        ),
        (request(9, 1, &[], 0, 1), "max_price_per_ip_second"),
        (request(9, 1, &[], u128::MAX, 1), "max_price_per_ip_second"),
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.cities = vec!["a/b".into()];
                r
            },
            "cities",
        ),
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.min_rating = 501;
                r
            },
            "min_rating",
        ),
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.asns = vec![0];
                r
            },
            "asns",
        ),
        (
            {
                let mut r = request(9, 1, &[], 10, 1);
                r.expiry = NOW + 400 * 86_400;
                r
            },
            "expiry",
        ),
    ];
    for (r, field) in cases {
        let err = post_request(&mut ex, r, u128::MAX).unwrap_err();
        assert_eq!(err.field().as_deref(), Some(field), "{err}");
    }
    let mut o = offer(
        1,
        [10, 0, 0, 1],
        "de",
        ExitKind::Residential,
        u128::MAX,
        1,
        1,
    );
    let err = ex
        .apply(&Command::PostOffer {
            offer: o.clone(),
            now: NOW,
        })
        .unwrap_err();
    assert_eq!(err.field().as_deref(), Some("price_per_ip_second"), "{err}");
    o.price_per_ip_second = 0;
    let err = ex
        .apply(&Command::PostOffer {
            offer: o.clone(),
            now: NOW,
        })
        .unwrap_err();
    assert_eq!(err.field().as_deref(), Some("price_per_ip_second"), "{err}");
    o.price_per_ip_second = 1;
    o.capacity = 0;
    let err = ex
        .apply(&Command::PostOffer {
            offer: o.clone(),
            now: NOW,
        })
        .unwrap_err();
    assert_eq!(err.field().as_deref(), Some("capacity"), "{err}");
    o.capacity = 1;
    o.min_duration_s = 100;
    o.max_duration_s = 50;
    let err = ex
        .apply(&Command::PostOffer { offer: o, now: NOW })
        .unwrap_err();
    assert_eq!(err.field().as_deref(), Some("max_duration_s"), "{err}");
    assert!(ex.offers().is_empty() && ex.requests().is_empty());
    assert_eq!(ex.held(&wallet(9)), 0);
}

#[test]
fn deal_life_cycle_reports_deadlines_capacity_and_ratings() {
    let mut ex = Exchange::new(EngineConfig {
        accept_window_s: 30,
        settle_window_s: 60,
        ..EngineConfig::default()
    });
    let (oid, _) = post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 2, 1, 1),
    );
    let Outcome::RequestPosted { deals, .. } =
        post_request(&mut ex, request(9, 1, &["de"], 10, 1), 100_000).unwrap()
    else {
        panic!()
    };
    let id = deals[0];
    assert_eq!(ex.offers().get(oid).unwrap().remaining, 0);
    assert_eq!(
        report(&mut ex, 1, id, PartyStatus::Accepted, 10, NOW + 1).unwrap(),
        Outcome::Reported {
            deal_id: id,
            status: DealStatus::Matched
        }
    );
    assert_eq!(
        report(&mut ex, 9, id, PartyStatus::Accepted, 10, NOW + 2).unwrap(),
        Outcome::Reported {
            deal_id: id,
            status: DealStatus::Accepted
        }
    );
    // A stranger cannot report; a side cannot go back.
    assert!(matches!(
        report(&mut ex, 5, id, PartyStatus::Active, 1, NOW + 2),
        Err(ExchangeError::NotParty { .. })
    ));
    assert!(matches!(
        report(&mut ex, 9, id, PartyStatus::Accepted, 11, NOW + 2),
        Err(ExchangeError::Conflict { .. })
    ));
    report(&mut ex, 1, id, PartyStatus::Active, 12, NOW + 3).unwrap();
    report(&mut ex, 9, id, PartyStatus::Active, 12, NOW + 3).unwrap();
    assert_eq!(ex.deal(id).unwrap().status, DealStatus::Active);
    // Rating before the end is refused.
    let rate = |w: u8, score: u8, nonce: u64, now: u64| Command::Rate {
        rating: Rating {
            wallet: wallet(w),
            deal_id: id,
            score,
            expiry: now + 60,
            nonce,
        },
        now,
    };
    assert!(matches!(
        ex.apply(&rate(9, 5, 20, NOW + 4)),
        Err(ExchangeError::Conflict { .. })
    ));
    // Silence until the settle deadline: completed automatically.
    assert!(!ex.advance(NOW + 60 + 59));
    assert!(ex.advance(NOW + 60 + 60));
    let d = ex.deal(id).unwrap();
    assert_eq!(d.status, DealStatus::Completed);
    assert_eq!(ex.held(&wallet(9)), 0, "final deal releases its hold");
    assert_eq!(
        ex.offers().get(oid).unwrap().remaining,
        1,
        "capacity comes back"
    );
    assert_eq!(ex.profile(&wallet(1)).completed, 1);
    // Ratings weighted by value.
    assert_eq!(
        ex.apply(&rate(9, 4, 21, NOW + 200)).unwrap(),
        Outcome::Rated {
            deal_id: id,
            rating: 400
        }
    );
    assert!(matches!(
        ex.apply(&rate(9, 4, 22, NOW + 200)),
        Err(ExchangeError::Conflict { .. })
    ));
    assert_eq!(
        ex.offers().get(oid).unwrap().rating,
        400,
        "the provider's offers re-sort by rating"
    );
    // Events: matched, 4 reports + status changes, final status.
    let evs = ex.events_for(&wallet(9), 0, 100);
    assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(evs.last().unwrap().status, DealStatus::Completed);
    assert_eq!(
        ex.events_for(&wallet(1), 0, 100),
        evs,
        "both parties see the same events"
    );
}

#[test]
fn a_side_that_does_not_accept_in_time_cancels_the_deal() {
    let mut ex = Exchange::new(EngineConfig {
        accept_window_s: 30,
        ..EngineConfig::default()
    });
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 2, 1, 1),
    );
    let Outcome::RequestPosted { deals, .. } =
        post_request(&mut ex, request(9, 1, &[], 10, 1), 100_000).unwrap()
    else {
        panic!()
    };
    report(&mut ex, 9, deals[0], PartyStatus::Accepted, 5, NOW + 1).unwrap();
    assert_eq!(ex.next_deadline(), Some(NOW + 30));
    assert!(ex.advance(NOW + 30));
    assert_eq!(ex.deal(deals[0]).unwrap().status, DealStatus::Cancelled);
    assert_eq!(ex.profile(&wallet(9)).cancelled, 1);
}

#[test]
fn orders_expire_and_release_holds() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_request(&mut ex, request(9, 2, &["de"], 10, 1), 100_000).unwrap();
    assert_eq!(ex.held(&wallet(9)), 1200);
    assert!(!ex.advance(NOW + 599));
    assert!(ex.advance(NOW + 600));
    assert_eq!(ex.held(&wallet(9)), 0);
    assert!(ex.requests().is_empty());
}

#[test]
fn diversity_rules_spread_the_exits() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 1, 1),
    );
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 2], "de", ExitKind::Residential, 1, 1, 2),
    );
    post_offer(
        &mut ex,
        offer(2, [10, 0, 0, 3], "de", ExitKind::Residential, 2, 1, 1),
    );
    post_offer(
        &mut ex,
        offer(3, [10, 0, 9, 3], "de", ExitKind::Residential, 3, 1, 1),
    );
    let mut r = request(9, 3, &[], 10, 1);
    r.diversity = Diversity::DistinctSubnet;
    let Outcome::RequestPosted { filled, .. } =
        post_request(&mut ex, r.clone(), u128::MAX).unwrap()
    else {
        panic!()
    };
    assert_eq!(filled, 2, "10.0.0.x counts once, 10.0.9.3 once");
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 1, 1),
    );
    post_offer(
        &mut ex,
        offer(1, [10, 0, 1, 2], "de", ExitKind::Residential, 1, 1, 2),
    );
    post_offer(
        &mut ex,
        offer(2, [10, 0, 2, 3], "de", ExitKind::Residential, 2, 1, 1),
    );
    r.diversity = Diversity::DistinctProvider;
    let Outcome::RequestPosted { filled, .. } = post_request(&mut ex, r, u128::MAX).unwrap() else {
        panic!()
    };
    assert_eq!(filled, 2, "provider 1 counts once");
}

// === property tests ===

#[derive(Debug, Clone)]
struct GenOffer {
    provider: u8,
    ip: u8,
    subnet: u8,
    country: usize,
    kind: usize,
    price: u128,
    cap: u32,
    https: bool,
}

#[derive(Debug, Clone)]
struct GenRequest {
    requester: u8,
    count: u32,
    countries: Vec<usize>,
    kinds: Vec<usize>,
    https: bool,
    diversity: u8,
    max_price: u128,
    cancel: bool,
    /// Bit n excludes provider n + 1 (16 and above: no exclusion).
    exclude: u8,
}

fn gen_offer() -> impl Strategy<Value = GenOffer> {
    (
        1u8..6,
        0u8..8,
        0u8..3,
        0usize..6,
        0usize..3,
        1u128..20,
        1u32..4,
        any::<bool>(),
    )
        .prop_map(
            |(provider, ip, subnet, country, kind, price, cap, https)| GenOffer {
                provider,
                ip,
                subnet,
                country,
                kind,
                price,
                cap,
                https,
            },
        )
}

fn gen_request() -> impl Strategy<Value = GenRequest> {
    (
        1u8..8,
        1u32..6,
        proptest::collection::vec(0usize..6, 0..3),
        proptest::collection::vec(0usize..3, 0..2),
        any::<bool>(),
        0u8..3,
        1u128..25,
        any::<bool>(),
        0u8..32,
    )
        .prop_map(
            |(requester, count, countries, kinds, https, diversity, max_price, cancel, exclude)| {
                GenRequest {
                    requester,
                    count,
                    countries,
                    kinds,
                    https,
                    diversity,
                    max_price,
                    cancel,
                    exclude,
                }
            },
        )
}

fn build_offer(g: &GenOffer, nonce: u64) -> Offer {
    let mut o = offer(
        g.provider,
        [10, g.subnet, g.ip, g.provider],
        COUNTRIES[g.country],
        KINDS[g.kind],
        g.price,
        g.cap,
        nonce,
    );
    o.protocols = if g.https {
        vec![Protocol::Https]
    } else {
        vec![Protocol::Http]
    };
    // Places and ASNs vary too, so the interned-id path of the index is exercised.
    o.city = Some(["berlin", "paris", "tokyo"][usize::from(g.ip % 3)].into());
    o.region = match g.subnet {
        0 => None,
        n => Some(["north", "south"][usize::from(n % 2)].into()),
    };
    o
}

fn build_request(g: &GenRequest, nonce: u64) -> Request {
    let countries: Vec<&str> = g.countries.iter().map(|i| COUNTRIES[*i]).collect();
    let mut r = request(g.requester, g.count, &countries, g.max_price, nonce);
    r.types = g.kinds.iter().map(|i| KINDS[*i]).collect();
    r.protocols = if g.https {
        vec![Protocol::Https]
    } else {
        vec![]
    };
    // Derived filters: cities (one unknown to every offer), regions, ASNs.
    match g.count {
        3 => r.cities = vec!["berlin".into()],
        4 => r.cities = vec!["paris".into(), "tokyo".into()],
        5 => r.cities = vec!["atlantis".into()],
        _ => {}
    }
    if g.requester.is_multiple_of(4) {
        r.regions = vec!["north".into()];
    }
    if g.requester.is_multiple_of(5) {
        r.asns = vec![1, 3];
    }
    r.diversity = match g.diversity {
        0 => Diversity::None,
        1 => Diversity::DistinctSubnet,
        _ => Diversity::DistinctProvider,
    };
    if g.exclude < 16 {
        r.exclude_providers = (0u8..4)
            .filter(|b| g.exclude & (1 << b) != 0)
            .map(|b| wallet(b + 1))
            .collect();
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The index picks exactly what a scan of the whole book picks.
    #[test]
    fn index_agrees_with_naive_scan(offers in proptest::collection::vec(gen_offer(), 0..40), reqs in proptest::collection::vec(gen_request(), 1..10)) {
        let mut ex = Exchange::new(EngineConfig::default());
        for (i, g) in offers.iter().enumerate() {
            post_offer(&mut ex, build_offer(g, i as u64));
        }
        for (i, g) in reqs.iter().enumerate() {
            let r = build_request(g, i as u64);
            let fast = ex.offers().select(&r, &[], r.count, NOW, &NoProfiles);
            let slow = ex.offers().select_naive(&r, &[], r.count, NOW, &NoProfiles);
            prop_assert_eq!(fast, slow);
        }
    }

    /// Every deal satisfies its request's filters and price; no offer serves more deals
    /// than its capacity; holds never exceed the balance they were checked against and
    /// always equal open requests at their maximum plus running deals at their value.
    #[test]
    fn matching_invariants(ops in proptest::collection::vec(prop_oneof![gen_offer().prop_map(Ok), gen_request().prop_map(Err)], 1..60), balance in 0u128..20_000) {
        let mut ex = Exchange::new(EngineConfig::default());
        let mut requests = std::collections::HashMap::new();
        let mut offers = std::collections::HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            let nonce = i as u64;
            match op {
                Ok(g) => {
                    let o = build_offer(g, nonce);
                    let (id, _) = post_offer(&mut ex, o.clone());
                    offers.insert(id, o);
                }
                Err(g) => {
                    let r = build_request(g, nonce);
                    if let Ok(Outcome::RequestPosted { order_id, resting, .. }) = post_request(&mut ex, r.clone(), balance) {
                        requests.insert(order_id, r.clone());
                        if g.cancel && resting > 0 {
                            let out = ex.apply(&Command::Cancel {
                                cancel: Cancel { wallet: r.requester, order_id, expiry: NOW + 60, nonce: nonce + 1_000 },
                                now: NOW,
                            }).unwrap();
                            let Outcome::Cancelled { released, open, .. } = out else { panic!() };
                            prop_assert_eq!(open, resting);
                            prop_assert_eq!(released, r.max_cost_per_ip().unwrap() * u128::from(resting));
                        }
                    }
                }
            }
            // Funds: per wallet, holds = resting requests at max + deals at value <= balance.
            for w in 1u8..8 {
                let w = wallet(w);
                let resting: u128 = ex.requests().iter().filter(|r| r.request.requester == w)
                    .map(|r| r.request.max_cost_per_ip().unwrap() * u128::from(r.remaining)).sum();
                let deals: u128 = ex.deals_of(&w).iter().filter(|d| d.requester == w && !d.status.is_final())
                    .map(|d| d.terms.value).sum();
                prop_assert_eq!(ex.held(&w), resting + deals);
                prop_assert!(ex.held(&w) <= balance);
            }
        }
        let mut per_offer = std::collections::HashMap::<u64, u32>::new();
        let mut per_request = std::collections::HashMap::<u64, Vec<IpAddr>>::new();
        for w in 1u8..8 {
            for d in ex.deals_of(&wallet(w)) {
                if d.requester != wallet(w) { continue; }
                let r = &requests[&d.request_id];
                let o = &offers[&d.offer_id];
                prop_assert!(r.accepts_attributes(o));
                prop_assert!(!r.exclude_providers.contains(&d.provider), "excluded provider matched");
                prop_assert!(o.price_per_ip_second <= r.max_price_per_ip_second);
                prop_assert_eq!(d.terms.price_per_ip_second, o.price_per_ip_second);
                prop_assert_ne!(d.provider, d.requester);
                *per_offer.entry(d.offer_id).or_default() += 1;
                per_request.entry(d.request_id).or_default().push(o.exit_address);
            }
        }
        for (id, n) in per_offer {
            prop_assert!(n <= offers[&id].capacity, "offer {} over capacity", id);
        }
        for (id, ips) in per_request {
            prop_assert!(ips.len() as u32 <= requests[&id].count);
            let mut dedup = ips.clone();
            dedup.sort();
            dedup.dedup();
            prop_assert_eq!(dedup.len(), ips.len(), "distinct exits per request");
        }
    }

    /// Replaying the same commands gives the same state (the persistence contract).
    #[test]
    fn replay_is_deterministic(offers in proptest::collection::vec(gen_offer(), 0..20), reqs in proptest::collection::vec(gen_request(), 0..10)) {
        let mut cmds = Vec::new();
        for (i, g) in offers.iter().enumerate() {
            cmds.push(Command::PostOffer { offer: build_offer(g, i as u64), now: NOW + i as u64 });
        }
        for (i, g) in reqs.iter().enumerate() {
            cmds.push(Command::PostRequest { request: build_request(g, 100 + i as u64), balance: 5_000, now: NOW + 50 });
        }
        cmds.push(Command::Tick { now: NOW + 700 });
        let run = |cmds: &[Command]| {
            let mut ex = Exchange::new(EngineConfig::default());
            let outs: Vec<String> = cmds.iter().map(|c| format!("{:?}", ex.apply(c))).collect();
            let evs: Vec<_> = (1u8..8).flat_map(|w| ex.events_for(&wallet(w), 0, 10_000)).collect();
            (outs, evs, format!("{:?}", ex.book(&BookQuery { limit: Some(1000), ..BookQuery::default() })))
        };
        prop_assert_eq!(run(&cmds), run(&cmds));
    }
}

proptest! {
    /// Commission is floor(value x bps / 10000) computed without overflow, checked
    /// against 256-bit arithmetic over the whole u128 range.
    #[test]
    fn commission_matches_wide_arithmetic(value in any::<u128>(), bps in 0u16..=10_000) {
        use alloy_primitives::U256;
        let wide = U256::from(value) * U256::from(bps) / U256::from(10_000u32);
        prop_assert_eq!(U256::from(ipsx_exchange::types::commission(value, bps)), wide);
    }

    /// Maximum cost either fits in 128 bits exactly or the request is refused naming the
    /// price; never a wrapped value.
    #[test]
    fn request_cost_is_checked(price in any::<u128>(), duration in 5u64..=2_592_000, count in 1u32..=1000) {
        use alloy_primitives::U256;
        let mut r = request(9, count, &[], price.max(1), 1);
        r.duration_s = duration;
        let wide = U256::from(price.max(1)) * U256::from(duration) * U256::from(count);
        match r.max_cost() {
            Ok(c) => prop_assert_eq!(U256::from(c), wide),
            Err(e) => {
                prop_assert!(wide > U256::from(u128::MAX));
                let field = e.field();
                prop_assert_eq!(field.as_deref(), Some("max_price_per_ip_second"));
            }
        }
    }
}

#[test]
fn ratings_are_weighted_by_deal_value() {
    use alloy_primitives::U256;
    use ipsx_exchange::engine::weighted_rating;
    // 5 stars on a deal worth 100, 1 star on one worth 300: (500 + 300) / 400 = 2.00.
    assert_eq!(weighted_rating(U256::from(5 * 100 + 300), 400), 200);
    assert_eq!(weighted_rating(U256::ZERO, 0), 0, "unrated");
    // Extremes: huge values do not overflow and stay within 0..=5 stars.
    let v = u128::MAX;
    assert_eq!(weighted_rating(U256::from(v) * U256::from(5u8), v), 500);
    assert_eq!(weighted_rating(U256::from(v), v), 100);
}

#[test]
fn profiles_are_used_in_matching() {
    use ipsx_exchange::Preferences;
    let mut ex = Exchange::new(EngineConfig::default());
    // Provider 1 refuses requesters rated below 3 stars; provider 2 takes anyone.
    ex.apply(&Command::Prefs {
        prefs: Preferences {
            wallet: wallet(1),
            min_counterparty_rating: 300,
            expiry: NOW + 60,
            nonce: 99,
        },
        now: NOW,
    })
    .unwrap();
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 5, 1),
    );
    post_offer(
        &mut ex,
        offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 2, 5, 1),
    );
    let Outcome::RequestPosted { deals, .. } =
        post_request(&mut ex, request(9, 1, &["de"], 10, 1), u128::MAX).unwrap()
    else {
        panic!()
    };
    assert_eq!(
        ex.deal(deals[0]).unwrap().provider,
        wallet(2),
        "the cheaper provider refuses an unrated requester"
    );
    // A request asking for rated providers only finds none (both unrated).
    let mut r = request(9, 1, &["de"], 10, 2);
    r.min_rating = 100;
    let Outcome::RequestPosted { filled: 0, .. } = post_request(&mut ex, r, u128::MAX).unwrap()
    else {
        panic!()
    };
    assert_eq!(ex.profile(&wallet(1)).min_counterparty_rating, 300);
}

// === excluded providers, ratings, regions ===

#[test]
fn excluded_providers_are_never_matched_by_either_path() {
    let mut ex = Exchange::new(EngineConfig::default());
    post_offer(
        &mut ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 5, 1),
    );
    post_offer(
        &mut ex,
        offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 2, 5, 2),
    );
    // The cheapest provider is excluded: the other one is chosen.
    let mut r = request(9, 1, &["de"], 10, 3);
    r.exclude_providers = vec![wallet(1)];
    let Outcome::RequestPosted { deals, .. } = post_request(&mut ex, r, u128::MAX).unwrap() else {
        panic!()
    };
    assert_eq!(ex.deal(deals[0]).unwrap().provider, wallet(2));
    // Excluding both: nothing fills, the request rests; a new offer of an excluded
    // provider does not fill it either, one of another provider does.
    let mut r = request(9, 1, &["de"], 10, 4);
    r.exclude_providers = vec![wallet(2), wallet(1), wallet(3), wallet(1)];
    let Outcome::RequestPosted {
        filled, resting, ..
    } = post_request(&mut ex, r, u128::MAX).unwrap()
    else {
        panic!()
    };
    assert_eq!((filled, resting), (0, 1));
    let (_, deals) = post_offer(
        &mut ex,
        offer(3, [10, 0, 2, 1], "de", ExitKind::Residential, 1, 5, 5),
    );
    assert!(
        deals.is_empty(),
        "excluded provider 3 filled a resting request"
    );
    let (_, deals) = post_offer(
        &mut ex,
        offer(4, [10, 0, 3, 1], "de", ExitKind::Residential, 1, 5, 6),
    );
    assert_eq!(deals.len(), 1);
    assert_eq!(ex.deal(deals[0]).unwrap().provider, wallet(4));
    // At most 16.
    let mut r = request(9, 1, &["de"], 10, 7);
    r.exclude_providers = (1u8..=17).map(wallet).collect();
    let e = post_request(&mut ex, r.clone(), u128::MAX).unwrap_err();
    assert_eq!(e.field().as_deref(), Some("exclude_providers"), "{e}");
    r.exclude_providers.pop();
    post_request(&mut ex, r, u128::MAX).unwrap();
}

#[test]
fn min_rating_is_honoured_by_the_index_and_the_scan() {
    use ipsx_exchange::book::OfferBook;
    let mut book = OfferBook::new();
    // Cheapest is rated 2.00 stars, the next 4.50, the dearest is unrated.
    book.insert(
        1,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 1, 1),
        200,
        NOW,
    );
    book.insert(
        2,
        offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 2, 1, 2),
        450,
        NOW,
    );
    book.insert(
        3,
        offer(3, [10, 0, 2, 1], "de", ExitKind::Residential, 3, 1, 3),
        0,
        NOW,
    );
    for (min, want) in [
        (0u16, vec![1u64, 2, 3]),
        (200, vec![1, 2]),
        (201, vec![2]),
        (450, vec![2]),
        (451, vec![]),
    ] {
        let mut r = request(9, 3, &["de"], 10, 1);
        r.min_rating = min;
        assert_eq!(book.select(&r, &[], 3, NOW, &NoProfiles), want, "min {min}");
        assert_eq!(
            book.select_naive(&r, &[], 3, NOW, &NoProfiles),
            want,
            "min {min}"
        );
    }
}

#[test]
fn regions_are_honoured_and_compared_normalised() {
    let mut ex = Exchange::new(EngineConfig::default());
    let mut a = offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 1, 5, 1);
    a.region = Some("Bavaria".into());
    let mut b = offer(2, [10, 0, 1, 1], "de", ExitKind::Residential, 2, 5, 2);
    b.region = Some("berlin".into());
    let c = offer(3, [10, 0, 2, 1], "de", ExitKind::Residential, 1, 5, 3);
    post_offer(&mut ex, a);
    post_offer(&mut ex, b);
    post_offer(&mut ex, c);
    let provider_of = |ex: &Exchange, out: Outcome| -> Vec<Address> {
        let Outcome::RequestPosted { deals, .. } = out else {
            panic!()
        };
        deals
            .iter()
            .map(|d| ex.deal(*d).unwrap().provider)
            .collect()
    };
    // Only Berlin, though Bavaria and the region-less offer are as cheap or cheaper.
    let mut r = request(9, 3, &["de"], 10, 4);
    r.regions = vec!["BERLIN".into()];
    let out = post_request(&mut ex, r, u128::MAX).unwrap();
    assert_eq!(provider_of(&ex, out), vec![wallet(2)]);
    // Any of two regions; an offer without a region never matches a region filter.
    let mut r = request(8, 3, &["de"], 10, 5);
    r.regions = vec!["bavaria".into(), "hamburg".into()];
    let out = post_request(&mut ex, r, u128::MAX).unwrap();
    assert_eq!(provider_of(&ex, out), vec![wallet(1)]);
    // A region no offer has: nothing.
    let mut r = request(7, 1, &["de"], 10, 6);
    r.regions = vec!["atlantis".into()];
    let Outcome::RequestPosted { filled, .. } = post_request(&mut ex, r, u128::MAX).unwrap() else {
        panic!()
    };
    assert_eq!(filled, 0);
}

// === extensions ===

fn extend(
    ex: &mut Exchange,
    w: u8,
    deal: u64,
    new_end: u64,
    balance: u128,
    nonce: u64,
    now: u64,
) -> Result<Outcome, ExchangeError> {
    ex.apply(&Command::Extend {
        extend: Extend {
            wallet: wallet(w),
            deal_id: deal,
            new_end,
            expiry: now + 60,
            nonce,
        },
        balance,
        now,
    })
}

/// A running deal (provider 1 at price 5, requester 9, 60 s from NOW, both sides
/// active) and its id.
fn running_deal(ex: &mut Exchange) -> u64 {
    post_offer(
        ex,
        offer(1, [10, 0, 0, 1], "de", ExitKind::Residential, 5, 1, 1),
    );
    let Outcome::RequestPosted { deals, .. } =
        post_request(ex, request(9, 1, &["de"], 10, 2), 1_000).unwrap()
    else {
        panic!()
    };
    report(ex, 1, deals[0], PartyStatus::Active, 3, NOW).unwrap();
    report(ex, 9, deals[0], PartyStatus::Active, 4, NOW).unwrap();
    deals[0]
}

#[test]
fn both_sides_proposing_the_same_end_extends_the_deal() {
    let mut ex = Exchange::new(EngineConfig::default());
    let id = running_deal(&mut ex);
    let end = NOW + 60;
    assert_eq!(ex.held(&wallet(9)), 300);
    // The requester proposes +40 s: 200 more is held (balance 1000, 300 held).
    let out = extend(&mut ex, 9, id, end + 40, 1_000, 10, NOW + 10).unwrap();
    assert_eq!(
        out,
        Outcome::Extend {
            deal_id: id,
            new_end: end + 40,
            extended: false
        }
    );
    assert_eq!(ex.held(&wallet(9)), 500);
    // A different proposal replaces it (and its hold).
    extend(&mut ex, 9, id, end + 20, 1_000, 11, NOW + 10).unwrap();
    assert_eq!(ex.held(&wallet(9)), 400);
    assert_eq!(ex.deal(id).unwrap().requester_new_end, Some(end + 20));
    // The provider proposes something else: nothing happens yet.
    let out = extend(&mut ex, 1, id, end + 40, 0, 12, NOW + 11).unwrap();
    assert!(matches!(
        out,
        Outcome::Extend {
            extended: false,
            ..
        }
    ));
    assert_eq!(ex.deal(id).unwrap().terms.end, end);
    // The provider agrees to the requester's: extended.
    let out = extend(&mut ex, 1, id, end + 20, 0, 13, NOW + 12).unwrap();
    assert!(matches!(out, Outcome::Extend { extended: true, .. }));
    let d = ex.deal(id).unwrap();
    assert_eq!(
        (d.terms.end, d.terms.duration_s, d.terms.value),
        (end + 20, 80, 400)
    );
    assert_eq!(
        d.terms.commission,
        ipsx_exchange::types::commission(400, 250)
    );
    assert_eq!(
        (d.deadlines.end, d.deadlines.settle_by),
        (end + 20, end + 20 + 300)
    );
    assert_eq!((d.provider_new_end, d.requester_new_end), (None, None));
    assert_eq!(d.status, DealStatus::Active, "status unchanged");
    assert_eq!(ex.held(&wallet(9)), 400);
    // Both parties saw the proposals and the new terms.
    for w in [1, 9] {
        let evs = ex.events_for(&wallet(w), 0, 100);
        let kinds: Vec<_> = evs.iter().rev().take(5).map(|e| e.kind.clone()).collect();
        assert!(
            matches!(&kinds[0], EventKind::Extended { terms } if terms.end == end + 20 && terms.value == 400)
        );
        assert!(
            matches!(kinds[1], EventKind::ExtendProposed { actor: Actor::Provider, new_end } if new_end == end + 20)
        );
        assert!(
            matches!(kinds[3], EventKind::ExtendProposed { actor: Actor::Requester, new_end } if new_end == end + 20)
        );
    }
    // The old end passes: still running; the new one: settling, then completed by silence.
    ex.advance(end + 1);
    assert_eq!(ex.deal(id).unwrap().status, DealStatus::Active);
    ex.advance(end + 20 + 300);
    assert_eq!(ex.deal(id).unwrap().status, DealStatus::Completed);
    assert_eq!(
        ex.held(&wallet(9)),
        0,
        "the extended value is released at the end"
    );
}

#[test]
fn extensions_are_refused_naming_the_field_and_change_nothing() {
    let mut ex = Exchange::new(EngineConfig::default());
    let id = running_deal(&mut ex);
    let end = NOW + 60;
    let t = NOW + 10;
    let before = (
        format!("{:?}", ex.deal(id)),
        ex.held(&wallet(9)),
        ex.last_event_id(),
    );
    let cases: Vec<(u8, u64, u64, u128, &str)> = vec![
        (9, 999, end + 10, 1_000, "deal_id"), // no such deal
        (5, id, end + 10, 1_000, "wallet"),   // a stranger
        (9, id, end, 1_000, "new_end"),       // not after the end
        (9, id, end - 5, 1_000, "new_end"),   // before the end
        (9, id, t, 1_000, "new_end"),         // now
        (9, id, NOW - 5, 1_000, "new_end"),   // in the past
        (9, id, NOW + 30 * 24 * 3600 + 1, u128::MAX, "new_end"), // beyond 30 days
        (9, id, end + 141, 1_000, "new_end"), // 705 > 1000 - 300 free
        (9, id, u64::MAX, u128::MAX, "new_end"), // overflow / too long
    ];
    for (i, (w, deal, new_end, balance, field)) in cases.into_iter().enumerate() {
        let e = extend(&mut ex, w, deal, new_end, balance, 100 + i as u64, t).unwrap_err();
        assert_eq!(e.field().as_deref(), Some(field), "case {i}: {e}");
    }
    assert_eq!(
        (
            format!("{:?}", ex.deal(id)),
            ex.held(&wallet(9)),
            ex.last_event_id()
        ),
        before,
        "refusals change nothing"
    );
    // 30 days exactly is fine; a nonce is used once.
    extend(&mut ex, 9, id, NOW + 30 * 24 * 3600, u128::MAX, 200, t).unwrap();
    let e = extend(&mut ex, 9, id, end + 10, u128::MAX, 200, t).unwrap_err();
    assert!(matches!(e, ExchangeError::Replay { .. }));
    // An ended deal and a final one are not extended; a final deal drops the pending
    // proposal's hold.
    let e = extend(&mut ex, 9, id, end + 10, u128::MAX, 201, end).unwrap_err();
    assert_eq!(e.field().as_deref(), Some("deal_id"));
    report(&mut ex, 9, id, PartyStatus::Failed, 202, end + 1).unwrap();
    assert!(ex.deal(id).unwrap().status.is_final());
    assert_eq!(ex.held(&wallet(9)), 0);
    assert_eq!(ex.deal(id).unwrap().requester_new_end, None);
    let e = extend(&mut ex, 1, id, end + 10, 0, 203, end + 2).unwrap_err();
    assert_eq!(e.field().as_deref(), Some("deal_id"));
}

#[test]
fn a_pending_proposal_is_released_when_the_deal_ends() {
    let mut ex = Exchange::new(EngineConfig::default());
    let id = running_deal(&mut ex);
    extend(&mut ex, 9, id, NOW + 100, 1_000, 10, NOW + 5).unwrap();
    assert_eq!(ex.held(&wallet(9)), 500);
    ex.advance(NOW + 60 + 300);
    assert!(ex.deal(id).unwrap().status.is_final());
    assert_eq!(ex.held(&wallet(9)), 0);
}

proptest! {
    /// Whatever sequence of proposals: the hold is always running value + pending
    /// requester proposal, the deal only ever grows to an end both sides proposed, and
    /// replaying the accepted commands gives the same state.
    #[test]
    fn extension_proposals_keep_holds_exact(ops in proptest::collection::vec((any::<bool>(), 1u64..200, 0u64..4), 1..30)) {
        let mut ex = Exchange::new(EngineConfig::default());
        let id = running_deal(&mut ex);
        let mut cmds = Vec::new();
        let mut last: [Option<u64>; 2] = [None, None];
        let mut now = NOW;
        for (i, (by_provider, add, dt)) in ops.into_iter().enumerate() {
            // The clock only moves forward, as the server's does.
            now += dt % 4;
            let end_before = ex.deal(id).unwrap().terms.end;
            let new_end = end_before + add;
            let cmd = Command::Extend {
                extend: Extend { wallet: wallet(if by_provider { 1 } else { 9 }), deal_id: id, new_end, expiry: now + 60, nonce: 1_000 + i as u64 },
                balance: 2_000,
                now,
            };
            if let Ok(Outcome::Extend { extended, .. }) = ex.apply(&cmd) {
                cmds.push(cmd);
                last[usize::from(by_provider)] = Some(new_end);
                if extended {
                    prop_assert_eq!(last[0], last[1]);
                    last = [None, None];
                }
            }
            let d = ex.deal(id).unwrap();
            prop_assert!(d.terms.end >= end_before);
            prop_assert_eq!(d.terms.value, 5 * u128::from(d.terms.duration_s));
            let pending = d.requester_new_end.map_or(0, |n| 5 * u128::from(n - d.terms.end));
            prop_assert_eq!(ex.held(&wallet(9)), d.terms.value + pending);
            prop_assert!(ex.held(&wallet(9)) <= 2_000);
        }
        let mut again = Exchange::new(EngineConfig::default());
        running_deal(&mut again);
        for c in &cmds {
            again.apply(c).unwrap();
        }
        prop_assert_eq!(format!("{:?}", again.deal(id)), format!("{:?}", ex.deal(id)));
        prop_assert_eq!(again.held(&wallet(9)), ex.held(&wallet(9)));
    }
}
