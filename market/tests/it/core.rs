//! Unit tests of the requester core (`ipsx_market::core`): each rule in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use ipsx_exchange_client::api::DealTerms;
use ipsx_exchange_client::connlog::{self, ChannelCommit, CommitPart, LogEntry, LogExport};
use ipsx_exchange_client::types::{PartyStatus, WgKey};
use ipsx_market::core::{
    Action, ChannelPhase, Core, Input, LogCheck, Outcome, Phase, Settings, Want, deal_of_exit,
    exit_name, top_up_amount,
};
use ipsx_rotation::{ExitKind, Filter};

const PRICE: u128 = 1_000;
const T0: u64 = 1_800_000_000_000;

fn terms(country: &str, start_s: u64, duration_s: u64) -> DealTerms {
    DealTerms {
        exit_address: "127.0.0.2".parse().unwrap(),
        country: country.parse().unwrap(),
        region: None,
        city: None,
        asn: None,
        kind: ExitKind::Residential,
        protocols: vec![],
        wg_endpoint: "127.0.0.2:51820".parse().unwrap(),
        provider_wg_key: WgKey([1; 32]),
        requester_wg_key: WgKey([2; 32]),
        price_per_ip_second: PRICE,
        duration_s,
        start: start_s,
        end: start_s + duration_s,
        value: PRICE * u128::from(duration_s),
        commission: 0,
    }
}

fn de() -> Filter {
    Filter {
        country: Some("de".parse().unwrap()),
        ..Filter::default()
    }
}

fn settings() -> Settings {
    Settings {
        deal_duration: Duration::from_secs(600),
        max_price_per_ip_second: 10_000,
        first_window: Duration::from_secs(5),
        payment_window: Duration::from_secs(30),
        proof_interval: Duration::from_secs(5),
        renew_ahead: Duration::from_secs(60),
        idle_release: Duration::from_secs(300),
        max_on_demand_groups: 4,
        serve_timeout: Duration::from_secs(30),
        avoid_for: Duration::from_secs(600),
        close_grace: Duration::from_secs(60),
        challenge_period: Duration::from_secs(100),
        ..Settings::default()
    }
}

fn provider(n: u8) -> Address {
    Address::repeat_byte(n)
}

fn channel(n: u8) -> B256 {
    B256::repeat_byte(n)
}

/// A core with one DE group of 1, its request posted, and deal 7 matched, channel
/// open, first window paid and the provider serving: returns the core at `now`.
fn serving_deal(now: &mut u64) -> Core {
    serving_deal_with(settings(), now)
}

fn serving_deal_with(s: Settings, now: &mut u64) -> Core {
    serving_deal_of(s, provider(9), now)
}

fn serving_deal_of(s: Settings, provider_wallet: Address, now: &mut u64) -> Core {
    let provider = |_: u8| provider_wallet;
    let mut core = Core::new(s, vec![("de".into(), de(), 1)], *now);
    let a = core.tick(*now);
    assert!(
        matches!(a[0], Action::PostRequest { count: 1, .. }),
        "{a:?}"
    );
    let a = core.handle(
        Input::Matched {
            deal: 7,
            provider: provider(9),
            terms: terms("de", *now / 1000, 600),
        },
        *now,
    );
    assert!(a.contains(&Action::OpenChannel {
        deal: 7,
        provider: provider(9),
        deposit: PRICE * 600
    }));
    let a = core.handle(
        Input::ChannelOpened {
            deal: 7,
            channel: channel(7),
            deposit: PRICE * 600,
        },
        *now,
    );
    // The first proof is the small first window, not a full window.
    assert_eq!(
        a,
        vec![Action::PostProof {
            deal: 7,
            channel: channel(7),
            amount: PRICE * 5
        }]
    );
    core.handle(
        Input::ProofPosted {
            deal: 7,
            amount: PRICE * 5,
        },
        *now,
    );
    let a = core.handle(
        Input::ProviderReported {
            deal: 7,
            status: PartyStatus::Active,
        },
        *now,
    );
    assert!(matches!(a[0], Action::Connect { deal: 7, .. }));
    *now += 200;
    let a = core.handle(Input::ExitLive { deal: 7 }, *now);
    // Service observed: now one full window ahead.
    assert!(a.contains(&Action::PostProof {
        deal: 7,
        channel: channel(7),
        amount: PRICE * 30
    }));
    core.handle(
        Input::ProofPosted {
            deal: 7,
            amount: PRICE * 30,
        },
        *now,
    );
    core
}

#[test]
fn exit_names_round_trip_and_refuse_others() {
    for id in [0, 1, 42, u64::MAX] {
        assert_eq!(deal_of_exit(&exit_name(id)), Some(id));
    }
    for bad in [
        "deal-",
        "deal-+1",
        "deal-1x",
        "local-1",
        "deal--1",
        "deal-99999999999999999999",
    ] {
        assert_eq!(deal_of_exit(bad), None, "{bad}");
    }
}

#[test]
fn pays_a_small_first_window_then_a_full_one_once_serving() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    // Every proof interval, service plus one window.
    now += 10_000;
    let a = core.tick(now);
    assert!(
        a.contains(&Action::PostProof {
            deal: 7,
            channel: channel(7),
            amount: PRICE * 40
        }),
        "{a:?}"
    );
}

#[test]
fn a_provider_that_never_serves_costs_one_first_window_and_its_channel_is_closed() {
    let mut now = T0;
    let mut core = Core::new(settings(), vec![("de".into(), de(), 1)], now);
    core.tick(now);
    core.handle(
        Input::Matched {
            deal: 1,
            provider: provider(5),
            terms: terms("de", now / 1000, 600),
        },
        now,
    );
    core.handle(
        Input::ChannelOpened {
            deal: 1,
            channel: channel(1),
            deposit: PRICE * 600,
        },
        now,
    );
    core.handle(
        Input::ProofPosted {
            deal: 1,
            amount: PRICE * 5,
        },
        now,
    );
    now += 31_000;
    let a = core.tick(now);
    let d = core.deal(1).unwrap();
    assert_eq!(d.outcome, Some(Outcome::NeverServed));
    assert_eq!(d.paid, PRICE * 5);
    assert!(a.contains(&Action::Rate { deal: 1, score: 1 }), "{a:?}");
    assert!(a.contains(&Action::CheckChannel {
        channel: channel(1)
    }));
    // A new request is posted at once, leaving that provider out.
    let req = a
        .iter()
        .find_map(|a| match a {
            Action::PostRequest { exclude, .. } => Some(exclude.clone()),
            _ => None,
        })
        .expect("a replacement request");
    assert_eq!(req, vec![provider(5)]);
    // Still open on chain: start the close admitting nothing, settle after the
    // challenge period.
    let a = core.handle(
        Input::ChannelStillOpen {
            channel: channel(1),
        },
        now,
    );
    assert_eq!(
        a,
        vec![Action::StartClose {
            channel: channel(1),
            amount: 0
        }]
    );
    core.handle(
        Input::CloseStarted {
            channel: channel(1),
            settle_after: now + 100_000,
        },
        now,
    );
    assert!(
        !core
            .tick(now + 50_000)
            .iter()
            .any(|a| matches!(a, Action::Settle { .. }))
    );
    let a = core.tick(now + 100_000);
    assert!(a.contains(&Action::Settle {
        channel: channel(1)
    }));
    core.handle(
        Input::ChannelClosed {
            channel: channel(1),
        },
        now + 101_000,
    );
    assert_eq!(
        core.deal(1).unwrap().channel.unwrap().phase,
        ChannelPhase::Closed
    );
}

#[test]
fn shutdown_stops_renting_first_and_rejects_late_matches() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    // A request resting in the book when shutdown begins is cancelled.
    core.handle(
        Input::RequestPosted {
            group: de(),
            order: 77,
            deals: vec![],
        },
        now,
    );
    let a = core.handle(Input::Shutdown, now);
    assert_eq!(a, vec![Action::CancelOrder { order: 77 }]);
    // Draining: the live exit still serves and is paid as it serves.
    assert_eq!(core.deal(7).unwrap().phase, Phase::Serving);
    let a = core.handle(Input::EndAll, now);
    assert!(a.contains(&Action::Disconnect { deal: 7 }));
    // The log is fetched through the tunnel first; the provider hears of the end
    // after that.
    assert!(a.contains(&Action::FetchLog {
        deal: 7,
        channel: channel(7),
        provider: provider(9)
    }));
    assert!(
        !a.iter().any(|a| matches!(a, Action::Report { .. })),
        "{a:?}"
    );
    let a = core.handle(
        Input::LogFetched {
            deal: 7,
            log: Err("the tunnel did not answer".into()),
            on_chain: None,
        },
        now,
    );
    assert!(a.contains(&Action::Report {
        deal: 7,
        status: PartyStatus::Completed,
        reason: "gateway shutting down".into()
    }));
    assert_eq!(core.deal(7).unwrap().connlog.state, LogCheck::Unavailable);
    // A match arriving after shutdown is rejected without a channel.
    let a = core.handle(
        Input::Matched {
            deal: 8,
            provider: provider(9),
            terms: terms("de", now / 1000, 600),
        },
        now,
    );
    assert!(
        a.iter().all(|a| !matches!(a, Action::OpenChannel { .. })),
        "{a:?}"
    );
    // Nothing is requested, extended or paid ahead any more.
    for step in 1..100 {
        let a = core.tick(now + step * 1000);
        assert!(
            a.iter().all(|a| matches!(a, Action::CheckChannel { .. })),
            "{a:?}"
        );
    }
    assert!(matches!(
        core.want(&de(), now),
        Want::Refused(r) if r.contains("shutting down")
    ));
    // A request answered after shutdown began is cancelled at once.
    let a = core.handle(
        Input::RequestPosted {
            group: de(),
            order: 78,
            deals: vec![],
        },
        now,
    );
    assert_eq!(a, vec![Action::CancelOrder { order: 78 }]);
}

#[test]
fn on_demand_groups_are_capped_and_expire() {
    let now = T0;
    let mut core = Core::new(settings(), vec![], now);
    for asn in 0..4 {
        let f = Filter {
            asn: Some(asn),
            ..Filter::default()
        };
        assert!(matches!(core.want(&f, now), Want::Renting(_)));
    }
    let f = Filter {
        asn: Some(99),
        ..Filter::default()
    };
    match core.want(&f, now) {
        Want::Refused(r) => assert!(r.contains("market.max_on_demand_groups"), "{r}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(core.groups().len(), 4);
    // After idle_release without use the groups go, and the cap frees up.
    core.tick(now + 301_000);
    assert_eq!(core.groups().len(), 0);
    assert!(matches!(core.want(&f, now + 302_000), Want::Renting(_)));
}

#[test]
fn budget_caps_refuse_requests_and_say_which_key() {
    let now = T0;
    let mut s = settings();
    s.max_spend_total = Some(1_000);
    let mut core = Core::new(s, vec![("de".into(), de(), 1)], now);
    let a = core.tick(now);
    assert!(a.is_empty(), "{a:?}");
    let g = &core.groups()[0];
    assert!(
        g.refusal
            .as_deref()
            .unwrap()
            .contains("market.max_spend_total"),
        "{:?}",
        g.refusal
    );
}

#[test]
fn a_match_above_the_price_cap_is_rejected_without_a_channel() {
    let now = T0;
    let mut core = Core::new(settings(), vec![("de".into(), de(), 1)], now);
    core.tick(now);
    let mut t = terms("de", now / 1000, 600);
    t.price_per_ip_second = 1_000_000;
    let a = core.handle(
        Input::Matched {
            deal: 3,
            provider: provider(1),
            terms: t,
        },
        now,
    );
    assert_eq!(
        a,
        vec![Action::Report {
            deal: 3,
            status: PartyStatus::Rejected,
            reason: "price above market.max_price_per_ip_second".into()
        }]
    );
}

#[test]
fn leases_are_extended_with_the_same_provider_and_topped_up() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    let end = core.deal(7).unwrap().terms.end;
    // Keep it used.
    core.handle(
        Input::Usage {
            deal: 7,
            requests: 5,
        },
        now,
    );
    // 60 s before the end: propose an extension by one deal_duration, and rent nothing.
    now = (end - 59) * 1000;
    core.handle(
        Input::Usage {
            deal: 7,
            requests: 6,
        },
        now,
    );
    let a = core.tick(now);
    assert!(
        a.contains(&Action::Extend {
            deal: 7,
            new_end: end + 600
        }),
        "{a:?}"
    );
    assert!(a.iter().all(|a| !matches!(a, Action::PostRequest { .. })));
    // The channel is kept one deal ahead: topped up by `channel_prefund` deals.
    let prefund = PRICE * 600 * u128::from(settings().channel_prefund);
    assert!(
        a.contains(&Action::TopUp {
            deal: 7,
            channel: channel(7),
            amount: prefund
        }),
        "{a:?}"
    );
    core.handle(
        Input::ToppedUp {
            deal: 7,
            amount: prefund,
        },
        now,
    );
    let mut t = core.deal(7).unwrap().terms.clone();
    t.end += 600;
    t.duration_s += 600;
    t.value += PRICE * 600;
    // The extension's value is within the prefunded deposit: no transaction.
    let a = core.handle(Input::Extended { deal: 7, terms: t }, now);
    assert_eq!(a, vec![]);
    // Without prefunding, the extension is topped up by exactly its value.
    let mut s0 = settings();
    s0.channel_prefund = 0;
    let mut now0 = T0;
    let mut c0 = serving_deal_with(s0, &mut now0);
    let mut t = c0.deal(7).unwrap().terms.clone();
    t.end += 600;
    t.duration_s += 600;
    t.value += PRICE * 600;
    let a = c0.handle(Input::Extended { deal: 7, terms: t }, now0);
    assert_eq!(
        a,
        vec![Action::TopUp {
            deal: 7,
            channel: channel(7),
            amount: PRICE * 600
        }]
    );
    // Past the old end: still serving, same deal.
    let a = core.tick((end + 10) * 1000);
    assert_eq!(core.deal(7).unwrap().phase, Phase::Serving);
    assert!(
        a.iter().all(|a| !matches!(a, Action::PostRequest { .. })),
        "{a:?}"
    );
}

#[test]
fn an_extension_not_agreed_in_time_is_replaced_by_a_new_deal() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    let end = core.deal(7).unwrap().terms.end;
    now = (end - 59) * 1000;
    core.handle(
        Input::Usage {
            deal: 7,
            requests: 1,
        },
        now,
    );
    core.tick(now);
    let a = core.tick((end - 29) * 1000);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::PostRequest { count: 1, .. })),
        "{a:?}"
    );
}

#[test]
fn unhealthy_exits_end_as_failed_and_are_avoided() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    now += 20_000;
    let a = core.handle(Input::ExitUnhealthy { deal: 7 }, now);
    assert!(a.contains(&Action::Disconnect { deal: 7 }));
    assert!(a.contains(&Action::Report {
        deal: 7,
        status: PartyStatus::Failed,
        reason: "exit failed: the tunnel stopped answering".into()
    }));
    assert!(a.contains(&Action::Rate { deal: 7, score: 2 }));
    let req = core.tick(now).into_iter().find_map(|a| match a {
        Action::PostRequest { exclude, .. } => Some(exclude),
        _ => None,
    });
    assert_eq!(req, Some(vec![provider(9)]));
}

#[test]
fn region_and_min_rating_reach_the_request() {
    let now = T0;
    let mut s = settings();
    s.min_provider_rating = 450;
    let f = Filter {
        country: Some("us".parse().unwrap()),
        region: Some("california".into()),
        ..Filter::default()
    };
    let mut core = Core::new(s, vec![("ca".into(), f.clone(), 2)], now);
    let a = core.tick(now);
    assert!(
        matches!(
            &a[..],
            [Action::PostRequest { filter, count: 2, min_rating: 450, .. }] if *filter == f
        ),
        "{a:?}"
    );
}

#[test]
fn restore_resumes_serving_deals_without_paying_twice() {
    let mut now = T0;
    let core = serving_deal(&mut now);
    let saved: Vec<_> = core.deals().values().cloned().collect();
    let paid = saved[0].paid;
    let mut again = Core::new(settings(), vec![("de".into(), de(), 1)], now + 5_000);
    again.restore(saved, now + 5_000);
    assert_eq!(again.resumable(now + 5_000), vec![7]);
    // Nothing new is rented for the group while the restored deal is live.
    let a = again.tick(now + 5_000);
    assert!(
        a.iter()
            .all(|a| !matches!(a, Action::PostRequest { .. } | Action::OpenChannel { .. })),
        "{a:?}"
    );
    // The provider still serves: reconnect, and pay on from what was paid.
    let a = again.handle(
        Input::ProviderReported {
            deal: 7,
            status: PartyStatus::Active,
        },
        now + 5_000,
    );
    assert!(matches!(a[0], Action::Connect { deal: 7, .. }));
    let a = again.handle(Input::ExitLive { deal: 7 }, now + 6_000);
    let amount = a
        .iter()
        .find_map(|a| match a {
            Action::PostProof { amount, .. } => Some(*amount),
            _ => None,
        })
        .unwrap();
    assert!(amount > paid, "cumulative proofs only grow");
    assert!(amount <= PRICE * (6 + 30));
}

#[test]
fn serving_exits_are_reverified_periodically_and_a_misplaced_one_ends_the_deal() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    let reverifies = |a: &[Action]| {
        a.iter()
            .filter(|a| matches!(a, Action::Reverify { deal: 7, .. }))
            .count()
    };
    // Not before `reverify_every` (180 s by default) after the exit went live.
    for _ in 0..17 {
        now += 10_000;
        let a = core.tick(now);
        assert_eq!(reverifies(&a), 0, "{a:?}");
        for act in a {
            if let Action::PostProof { amount, .. } = act {
                core.handle(Input::ProofPosted { deal: 7, amount }, now);
            }
        }
    }
    now += 10_000;
    let a = core.tick(now);
    assert_eq!(reverifies(&a), 1, "{a:?}");
    let Some(Action::Reverify { terms, .. }) =
        a.iter().find(|a| matches!(a, Action::Reverify { .. }))
    else {
        unreachable!()
    };
    assert_eq!(terms.country, "de".parse().unwrap());
    // Once per interval, not on every tick.
    now += 1_000;
    assert_eq!(reverifies(&core.tick(now)), 0);

    let reason = "`country` claims de but the GeoIP database places the address in br";
    let a = core.handle(
        Input::ExitMisplaced {
            deal: 7,
            reason: reason.into(),
        },
        now,
    );
    assert!(a.contains(&Action::Disconnect { deal: 7 }), "{a:?}");
    assert!(
        a.contains(&Action::Report {
            deal: 7,
            status: PartyStatus::Failed,
            reason: format!("exit misplaced: {reason}"),
        }),
        "{a:?}"
    );
    assert!(a.contains(&Action::Rate { deal: 7, score: 1 }));
    assert_eq!(core.deal(7).unwrap().outcome, Some(Outcome::Misplaced));
    assert_eq!(Outcome::Misplaced.as_str(), "misplaced");
    // A late answer for an ended deal changes nothing; the provider is avoided.
    assert!(
        core.handle(
            Input::ExitMisplaced {
                deal: 7,
                reason: reason.into()
            },
            now
        )
        .is_empty()
    );
    let req = core.tick(now).into_iter().find_map(|a| match a {
        Action::PostRequest { exclude, .. } => Some(exclude),
        _ => None,
    });
    assert_eq!(req, Some(vec![provider(9)]));
}

/// Channel reuse: after deal 7 ended (lease over), the next deal with the same
/// provider takes its idle channel over: no `OpenChannel`, the first proof at once,
/// continuing the channel's cumulative amount (deal 8's payments start where deal 7's
/// ended), and a top-up that prefunds the next deals; the idle channel is closed after
/// `channel_idle_close`, admitting exactly what was signed. A deal with another
/// provider never uses it.
#[test]
fn the_next_deal_with_a_provider_reuses_its_channel_without_a_chain_transaction() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    // Lease over: paid 30 windows' worth so far (PRICE * 30), the channel goes idle.
    now = T0 + 600_000;
    let a = core.tick(now);
    assert!(
        !a.iter().any(|a| matches!(a, Action::CheckChannel { .. })),
        "{a:?}"
    );
    let d7 = core.deal(7).unwrap().clone();
    assert!(matches!(
        d7.channel.unwrap().phase,
        ChannelPhase::Idle { .. }
    ));
    let signed7 = d7.base + d7.paid;
    // Another provider: a channel of its own.
    let a = core.handle(
        Input::Matched {
            deal: 9,
            provider: provider(3),
            terms: terms("de", now / 1000, 600),
        },
        now,
    );
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::OpenChannel { deal: 9, .. }))
    );
    // The same provider: its idle channel, no transaction before the first proof.
    let a = core.handle(
        Input::Matched {
            deal: 8,
            provider: provider(9),
            terms: terms("de", now / 1000, 600),
        },
        now,
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::OpenChannel { .. })),
        "{a:?}"
    );
    assert!(a.contains(&Action::PostProof {
        deal: 8,
        channel: channel(7),
        amount: signed7 + PRICE * 5
    }));
    // Deposit PRICE * 600, carries signed7 already: topped up for this deal and
    // `channel_prefund` more.
    let short = signed7 + PRICE * 600 - PRICE * 600;
    let prefund = PRICE * 600 * u128::from(settings().channel_prefund);
    assert!(
        a.contains(&Action::TopUp {
            deal: 8,
            channel: channel(7),
            amount: short + prefund
        }),
        "{a:?}"
    );
    assert!(matches!(
        core.deal(7).unwrap().channel.unwrap().phase,
        ChannelPhase::Reused { by: 8 }
    ));
    core.handle(
        Input::ProofPosted {
            deal: 8,
            amount: signed7 + PRICE * 5,
        },
        now,
    );
    let d8 = core.deal(8).unwrap();
    assert_eq!((d8.base, d8.paid), (signed7, PRICE * 5));
    assert_eq!(d8.phase, Phase::Paid);
    // The provider leaves before serving (never served: avoided), so the channel is
    // closed at once, admitting only what the earlier deal was paid.
    core.handle(
        Input::ToppedUp {
            deal: 8,
            amount: short + prefund,
        },
        now,
    );
    let a = core.handle(
        Input::ProviderReported {
            deal: 8,
            status: PartyStatus::Completed,
        },
        now,
    );
    assert!(a.contains(&Action::CheckChannel {
        channel: channel(7)
    }));
    let a = core.handle(
        Input::ChannelStillOpen {
            channel: channel(7),
        },
        now,
    );
    assert_eq!(
        a,
        vec![Action::StartClose {
            channel: channel(7),
            amount: signed7
        }]
    );
}

/// A top-up grows with the channel's use: once a channel has carried more than
/// `channel_prefund` deals' value, the top-up adds what the deal is short of plus
/// everything carried so far, not just `channel_prefund` deals (so 25 deals over one
/// channel need 3 top-ups with the default 8, not 4); with prefunding off it adds
/// exactly what the deal is short of.
#[test]
fn a_top_up_adds_at_least_what_the_channel_carried_so_far() {
    let v = PRICE * 600;
    // First deal over a fresh channel (deposit = its value): 8 deals ahead.
    assert_eq!(top_up_amount(v, 0, v, 8), Some(8 * v));
    // Not behind: nothing.
    assert_eq!(top_up_amount(9 * v, 7 * v, v, 8), None);
    // Carried 8 deals: 8 more; carried 16: 16 more (plus what is short).
    assert_eq!(top_up_amount(9 * v, 8 * v, v, 8), Some(8 * v));
    assert_eq!(top_up_amount(17 * v, 16 * v, v, 8), Some(16 * v));
    assert_eq!(top_up_amount(10 * v, 16 * v, v, 8), Some(7 * v + 16 * v));
    // No prefunding: exactly what is short, nothing when covered.
    assert_eq!(top_up_amount(10 * v, 16 * v, v, 0), Some(7 * v));
    assert_eq!(top_up_amount(17 * v, 16 * v, v, 0), None);
    // 25 deals over one channel opened with the first deal's value.
    let (mut deposit, mut top_ups) = (v, 0);
    for k in 0..25 {
        if let Some(add) = top_up_amount(deposit, k * v, v, 8) {
            deposit += add;
            top_ups += 1;
        }
    }
    assert_eq!(top_ups, 3, "deposit {deposit}");
}

proptest::proptest! {
    /// Whatever the channel's state, a top-up covers the deal, keeps the deposit one
    /// deal ahead when prefunding, and adds no more than what is short plus the larger
    /// of `prefund` deals and what the channel carried.
    #[test]
    fn top_up_amount_covers_the_deal_and_stays_bounded(
        deposit in 0u128..1 << 80,
        base in 0u128..1 << 80,
        value in 1u128..1 << 60,
        prefund in 0u32..64,
    ) {
        let short = (base + value).saturating_sub(deposit);
        match top_up_amount(deposit, base, value, prefund) {
            None => {
                proptest::prop_assert!(deposit >= base + value);
                if prefund > 0 {
                    proptest::prop_assert!(deposit >= base + 2 * value);
                }
            }
            Some(add) => {
                proptest::prop_assert!(deposit + add >= base + value);
                if prefund > 0 {
                    proptest::prop_assert!(deposit + add >= base + 2 * value);
                }
                let ahead = if prefund == 0 { 0 } else { (value * u128::from(prefund)).max(base) };
                proptest::prop_assert_eq!(add, short + ahead);
            }
        }
    }
}

/// An idle channel is closed after `channel_idle_close`, admitting what was signed.
#[test]
fn an_idle_channel_is_closed_after_channel_idle_close() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    now = T0 + 600_000;
    core.tick(now);
    let d7 = core.deal(7).unwrap().clone();
    let idle = settings().channel_idle_close.as_millis() as u64;
    assert!(
        !core
            .tick(now + idle - 1_000)
            .iter()
            .any(|a| matches!(a, Action::CheckChannel { .. }))
    );
    let a = core.tick(now + idle);
    assert!(a.contains(&Action::CheckChannel {
        channel: channel(7)
    }));
    let a = core.handle(
        Input::ChannelStillOpen {
            channel: channel(7),
        },
        now + idle,
    );
    assert_eq!(
        a,
        vec![Action::StartClose {
            channel: channel(7),
            amount: d7.base + d7.paid
        }]
    );
}

fn conn(i: u64) -> LogEntry {
    LogEntry {
        start_unix_ms: 1_800_000_000_000 + i,
        dst: "93.184.216.34:443".parse().unwrap(),
        bytes_up: 100 + i,
        bytes_down: 1000 + i,
        duration_ms: 20,
    }
}

/// What a provider agent serves for deal 7 over channel 7: its records signed, and its
/// commitment of the first `committed` of them (what its claim put on chain).
fn export(key: &PrivateKeySigner, entries: Vec<LogEntry>, committed: usize) -> LogExport {
    let part = CommitPart {
        deal_id: 7,
        entries: committed as u64,
        dropped: 0,
        head: connlog::head(7, &entries[..committed]),
    };
    let hash = connlog::channel_commitment(&channel(7), &[part]);
    LogExport {
        log: connlog::sign_log(key, 7, entries).unwrap(),
        dropped: 0,
        commits: vec![ChannelCommit {
            channel_id: channel(7),
            parts: vec![part],
            hash,
        }],
    }
}

fn ended_for_fetch(key: &PrivateKeySigner, now: &mut u64) -> Core {
    let mut core = serving_deal_of(settings(), key.address(), now);
    *now += 10_000;
    let a = core.handle(Input::EndAll, *now);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::FetchLog { deal: 7, .. })),
        "{a:?}"
    );
    assert_eq!(core.deal(7).unwrap().connlog.state, LogCheck::Pending);
    core
}

/// Deal 7's log came back from the fetch.
fn fetched(
    core: &mut Core,
    log: Result<Box<LogExport>, String>,
    on_chain: Option<B256>,
    now: u64,
) -> Vec<Action> {
    core.handle(
        Input::LogFetched {
            deal: 7,
            log,
            on_chain,
        },
        now,
    )
}

fn verdict(a: &[Action]) -> Option<LogCheck> {
    a.iter().find_map(|a| match a {
        Action::LogChecked { deal: 7, state, .. } => Some(*state),
        _ => None,
    })
}

#[test]
fn a_fetched_log_recomputes_the_loghash_on_chain() {
    let key = PrivateKeySigner::random();
    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    // The claim on chain committed the first two of three records (a prefix).
    let x = export(&key, (0..3).map(conn).collect(), 2);
    let on_chain = x.commits[0].hash;
    let a = fetched(&mut core, Ok(Box::new(x)), Some(on_chain), now);
    assert_eq!(verdict(&a), Some(LogCheck::Verified), "{a:?}");
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Report { deal: 7, .. }))
    );
    assert_eq!(core.deal(7).unwrap().connlog.state, LogCheck::Verified);
    assert_eq!(core.log(7).unwrap().log.entries.len(), 3);
}

#[test]
fn a_record_missing_from_the_served_log_is_a_mismatch() {
    let key = PrivateKeySigner::random();
    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    // The provider committed three records, then served (signed) only two.
    let mut x = export(&key, (0..3).map(conn).collect(), 3);
    let on_chain = x.commits[0].hash;
    x.log = connlog::sign_log(&key, 7, vec![conn(0), conn(2)]).unwrap();
    let a = fetched(&mut core, Ok(Box::new(x)), Some(on_chain), now);
    assert_eq!(verdict(&a), Some(LogCheck::Mismatch), "{a:?}");
    let c = &core.deal(7).unwrap().connlog;
    assert!(c.reason.contains("entries"), "{}", c.reason);
}

#[test]
fn a_log_signed_by_someone_else_is_a_mismatch_and_a_failed_fetch_unavailable() {
    let key = PrivateKeySigner::random();
    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    let x = export(&PrivateKeySigner::random(), vec![conn(0)], 1);
    let a = fetched(&mut core, Ok(Box::new(x)), None, now);
    assert_eq!(verdict(&a), Some(LogCheck::Mismatch), "{a:?}");
    assert!(core.deal(7).unwrap().connlog.reason.contains("signed by"));

    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    let a = fetched(
        &mut core,
        Err("connecting to 10.77.0.1:80 through the tunnel: timed out".into()),
        None,
        now,
    );
    assert_eq!(verdict(&a), Some(LogCheck::Unavailable), "{a:?}");
}

#[test]
fn a_claim_after_the_fetch_is_checked_when_it_lands() {
    let key = PrivateKeySigner::random();
    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    let entries: Vec<LogEntry> = (0..2).map(conn).collect();
    // Nothing claimed yet when fetched: pending.
    let x = export(&key, entries.clone(), 1);
    let a = fetched(&mut core, Ok(Box::new(x)), Some(B256::ZERO), now);
    assert_eq!(verdict(&a), None);
    assert_eq!(core.deal(7).unwrap().connlog.state, LogCheck::Pending);
    // The pending check looks at the chain again, once per interval.
    now += ipsx_market::core::LOG_RECHECK_MS;
    let reads = |a: &[Action]| {
        a.iter()
            .filter(|a| matches!(a, Action::ReadLogHash { channel: c } if *c == channel(7)))
            .count()
    };
    assert_eq!(reads(&core.tick(now)), 1);
    assert_eq!(reads(&core.tick(now + 1)), 0);
    // A hash that covers something else: still pending.
    let a = core.handle(
        Input::LogHash {
            channel: channel(7),
            hash: Some(B256::repeat_byte(0xee)),
        },
        now,
    );
    assert_eq!(verdict(&a), None);
    // The closing claim, made after the fetch, over the whole log.
    let part = CommitPart {
        deal_id: 7,
        entries: 2,
        dropped: 0,
        head: connlog::head(7, &entries),
    };
    let closing = connlog::channel_commitment(&channel(7), &[part]);
    let a = core.handle(
        Input::LogHash {
            channel: channel(7),
            hash: Some(closing),
        },
        now,
    );
    assert_eq!(verdict(&a), Some(LogCheck::Verified), "{a:?}");
}

#[test]
fn a_channel_gone_before_any_hash_covers_the_log_leaves_it_unavailable() {
    let key = PrivateKeySigner::random();
    let mut now = T0;
    let mut core = ended_for_fetch(&key, &mut now);
    let x = export(&key, vec![conn(0)], 1);
    fetched(&mut core, Ok(Box::new(x)), None, now);
    let a = core.handle(
        Input::LogHash {
            channel: channel(7),
            hash: None,
        },
        now,
    );
    assert_eq!(verdict(&a), Some(LogCheck::Unavailable), "{a:?}");
}

#[test]
fn a_deal_that_never_served_or_died_has_no_log_to_fetch() {
    let mut now = T0;
    let mut core = serving_deal(&mut now);
    now += 20_000;
    let a = core.handle(Input::ExitUnhealthy { deal: 7 }, now);
    assert!(!a.iter().any(|a| matches!(a, Action::FetchLog { .. })));
    let c = &core.deal(7).unwrap().connlog;
    assert_eq!(c.state, LogCheck::Unavailable);
    assert!(c.reason.contains("unhealthy"), "{}", c.reason);
}
