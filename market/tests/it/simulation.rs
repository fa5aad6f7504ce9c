//! Seeded random simulation of the requester core against a model of the exchange, the
//! chain and providers (honest, never serving, flaky, slow to close), over virtual
//! hours, with exchange replays, chain errors, price changes, on-demand floods and a
//! shutdown. After every step it checks the money rules of `docs/market.md`:
//! - no deal is paid more than its service so far plus one window (plus the small
//!   first window when it never served), and no proof exceeds the deposit;
//! - spend stays within the budget caps;
//! - nothing is requested, opened or extended after shutdown began;
//! - on-demand groups stay within their cap;
//! - the chain model conserves tokens (balance + reserved + paid out = start);
//! - channels are reused across deals with one provider: the deals over one channel
//!   have disjoint, ordered slices of its cumulative amount (nothing counted twice), a
//!   provider is never paid more than the requester signed on the channel, nor (one
//!   that never serves) more than one first window per deal, and a channel's deposit
//!   covers every proof over it.
//!
//! At the end (idle channels are closed after `channel_idle_close`) it checks that
//! every channel opened was closed and `reserved` is back to 0.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;

use alloy::primitives::{Address, B256};
use ipsx_exchange_client::api::DealTerms;
use ipsx_exchange_client::market::cost;
use ipsx_exchange_client::types::{PartyStatus, WgKey};
use ipsx_market::core::{Action, ChannelPhase, Core, Input, Phase, Settings};
use ipsx_rotation::{ExitKind, Filter};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const START: u64 = 1_800_000_000_000;
const FUNDS: u128 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Honest,
    NeverServes,
    Flaky,
    NeverCloses,
}

#[derive(Debug)]
struct ChainChannel {
    provider: Address,
    deposit: u128,
    claimed: u128,
    settle_after: Option<u64>,
    open: bool,
    /// Highest cumulative amount the requester signed over it.
    signed: u128,
}

struct World {
    rng: SmallRng,
    core: Core,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    inputs: Vec<Option<Input>>,
    seq: u64,
    providers: Vec<(Address, Kind)>,
    next_deal: u64,
    next_order: u64,
    /// Chain model.
    balance: u128,
    reserved: u128,
    paid_out: u128,
    channels: HashMap<B256, ChainChannel>,
    next_channel: u64,
    /// Exchange model: latest proof per deal, deal -> (provider, terms).
    proofs: HashMap<u64, u128>,
    deals: HashMap<u64, (Address, Kind, DealTerms, Option<B256>)>,
    shutdown_at: u64,
    shut: bool,
    ended: bool,
    chain_down_until: u64,
    steps: u64,
    /// Deals (still in view at the end) paid over a reused channel.
    reused: usize,
}

fn settings() -> Settings {
    Settings {
        deal_duration: Duration::from_secs(600),
        max_price_per_ip_second: 1_000,
        max_spend_per_hour: Some(1_000 * 600 * 12),
        max_spend_total: Some(1_000 * 600 * 40),
        first_window: Duration::from_secs(5),
        payment_window: Duration::from_secs(30),
        proof_interval: Duration::from_secs(5),
        renew_ahead: Duration::from_secs(60),
        idle_release: Duration::from_secs(300),
        max_on_demand_groups: 6,
        min_provider_rating: 0,
        serve_timeout: Duration::from_secs(30),
        avoid_for: Duration::from_secs(600),
        close_grace: Duration::from_secs(60),
        challenge_period: Duration::from_secs(600),
        request_ttl: Duration::from_secs(30),
        reverify_every: Duration::from_secs(120),
        channel_idle_close: Duration::from_secs(1_200),
        channel_prefund: 2,
        close_channels_at_shutdown: false,
    }
}

fn country(i: usize) -> &'static str {
    ["de", "us", "fr", "jp"][i % 4]
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let groups = (0..3)
            .map(|i| {
                (
                    country(i).to_string(),
                    Filter {
                        country: Some(country(i).parse().unwrap()),
                        ..Filter::default()
                    },
                    1 + (i as u32 % 2),
                )
            })
            .collect();
        let kinds = [
            Kind::Honest,
            Kind::NeverServes,
            Kind::Flaky,
            Kind::NeverCloses,
        ];
        let providers = (0..12)
            .map(|i| {
                (
                    Address::repeat_byte(i as u8 + 1),
                    kinds[rng.random_range(0..4)],
                )
            })
            .collect();
        let hours = rng.random_range(2..6);
        Self {
            core: Core::new(settings(), groups, START),
            rng,
            now: START,
            queue: BinaryHeap::new(),
            inputs: Vec::new(),
            seq: 0,
            providers,
            next_deal: 1,
            next_order: 1,
            balance: FUNDS,
            reserved: 0,
            paid_out: 0,
            channels: HashMap::new(),
            next_channel: 1,
            proofs: HashMap::new(),
            deals: HashMap::new(),
            shutdown_at: START + hours * 3_600_000,
            shut: false,
            ended: false,
            chain_down_until: 0,
            steps: 0,
            reused: 0,
        }
    }

    fn at(&mut self, delay_ms: u64, input: Input) {
        self.seq += 1;
        self.inputs.push(Some(input));
        self.queue.push(Reverse((
            self.now + delay_ms,
            self.seq,
            self.inputs.len() - 1,
        )));
    }

    fn delay(&mut self) -> u64 {
        self.rng.random_range(10..3_000)
    }

    fn chain_ok(&mut self) -> bool {
        self.now >= self.chain_down_until && self.rng.random_range(0..100) >= 3
    }

    fn pay(&mut self, ch: B256, amount: u128) {
        let c = self.channels.get_mut(&ch).unwrap();
        assert!(c.open);
        let amount = amount.min(c.deposit);
        if amount > c.claimed {
            let d = amount - c.claimed;
            c.claimed = amount;
            self.reserved -= d;
            self.paid_out += d;
        }
    }

    fn close(&mut self, ch: B256) {
        let c = self.channels.get_mut(&ch).unwrap();
        if c.open {
            c.open = false;
            let back = c.deposit - c.claimed;
            self.reserved -= back;
            self.balance += back;
        }
    }

    /// The provider's side after a deal ended: an honest one claims the latest proof
    /// and closes the channel (sometimes late); a bad one never does.
    fn provider_settles(&mut self, deal: u64) {
        let Some((_, kind, _, ch)) = self.deals.get(&deal).cloned() else {
            return;
        };
        let Some(ch) = ch else { return };
        // Claims are per channel: the highest proof over it, whichever deal it paid.
        let proof = self.channels[&ch].signed;
        let claimable =
            self.channels[&ch].open && self.channels[&ch].settle_after.is_none_or(|t| self.now < t);
        if kind == Kind::NeverServes {
            // The worst it can do: claim the first window it was paid, and vanish.
            if claimable {
                self.pay(ch, proof);
            }
            return;
        }
        if kind == Kind::NeverCloses || self.rng.random_range(0..10) < 2 {
            return; // never claims (or crashed)
        }
        let c = &self.channels[&ch];
        if c.open && c.settle_after.is_none_or(|t| self.now < t) {
            // Lazy claims: the channel stays open for the requester's next deals.
            self.pay(ch, proof);
        }
    }

    fn act(&mut self, a: Action) {
        let shut = self.core.shutting_down();
        match a {
            Action::PostRequest {
                filter,
                count,
                duration_s,
                max_price,
                exclude,
                ..
            } => {
                assert!(!shut, "request after shutdown");
                if self.rng.random_range(0..20) == 0 {
                    let d = self.delay();
                    self.at(
                        d,
                        Input::RequestFailed {
                            group: filter,
                            count,
                            error: "exchange down".into(),
                        },
                    );
                    return;
                }
                let order = self.next_order;
                self.next_order += 1;
                let mut made = Vec::new();
                for _ in 0..count {
                    if self.rng.random_range(0..10) == 0 {
                        continue; // nothing matched
                    }
                    let candidates: Vec<_> = self
                        .providers
                        .iter()
                        .filter(|(p, _)| !exclude.contains(p))
                        .copied()
                        .collect();
                    if candidates.is_empty() {
                        continue;
                    }
                    let (p, kind) = candidates[self.rng.random_range(0..candidates.len())];
                    let price = self.rng.random_range(max_price / 2..=max_price * 11 / 10);
                    let id = self.next_deal;
                    self.next_deal += 1;
                    let start = self.now / 1000;
                    let t = DealTerms {
                        exit_address: "127.0.0.2".parse().unwrap(),
                        country: filter.country.unwrap_or("de".parse().unwrap()),
                        region: filter.region.clone(),
                        city: filter.city.clone(),
                        asn: filter.asn,
                        kind: filter.kind.unwrap_or(ExitKind::Residential),
                        protocols: vec![],
                        wg_endpoint: "127.0.0.2:1".parse().unwrap(),
                        provider_wg_key: WgKey([1; 32]),
                        requester_wg_key: WgKey([2; 32]),
                        price_per_ip_second: price,
                        duration_s,
                        start,
                        end: start + duration_s,
                        value: price * u128::from(duration_s),
                        commission: 0,
                    };
                    self.deals.insert(id, (p, kind, t.clone(), None));
                    made.push(id);
                    let d = self.delay();
                    self.at(
                        d,
                        Input::Matched {
                            deal: id,
                            provider: p,
                            terms: t.clone(),
                        },
                    );
                    // The exchange restarts now and then: events come again.
                    if self.rng.random_range(0..10) == 0 {
                        let d = self.delay() + 5_000;
                        self.at(
                            d,
                            Input::Matched {
                                deal: id,
                                provider: p,
                                terms: t,
                            },
                        );
                    }
                }
                let d = self.delay();
                self.at(
                    d,
                    Input::RequestPosted {
                        group: filter,
                        order,
                        deals: made,
                    },
                );
            }
            Action::CancelOrder { .. } | Action::Rate { .. } => {}
            Action::Report { deal, status, .. } => {
                if matches!(status, PartyStatus::Completed | PartyStatus::Failed) {
                    self.provider_settles(deal);
                }
            }
            Action::OpenChannel {
                deal,
                provider,
                deposit,
            } => {
                assert!(!shut, "channel opened after shutdown");
                let d = self.delay();
                if !self.chain_ok() || deposit > self.balance {
                    self.at(
                        d,
                        Input::ChannelFailed {
                            deal,
                            error: "chain error".into(),
                        },
                    );
                    return;
                }
                let id = B256::left_padding_from(&self.next_channel.to_be_bytes());
                self.next_channel += 1;
                self.balance -= deposit;
                self.reserved += deposit;
                self.channels.insert(
                    id,
                    ChainChannel {
                        provider,
                        deposit,
                        claimed: 0,
                        settle_after: None,
                        open: true,
                        signed: 0,
                    },
                );
                if let Some(x) = self.deals.get_mut(&deal) {
                    x.3 = Some(id);
                }
                self.at(
                    d,
                    Input::ChannelOpened {
                        deal,
                        channel: id,
                        deposit,
                    },
                );
            }
            Action::TopUp {
                deal,
                channel,
                amount,
            } => {
                let d = self.delay();
                let ok = self.chain_ok() && amount <= self.balance && self.channels[&channel].open;
                if ok {
                    self.balance -= amount;
                    self.reserved += amount;
                    self.channels.get_mut(&channel).unwrap().deposit += amount;
                    self.at(d, Input::ToppedUp { deal, amount });
                } else {
                    self.at(d, Input::TopUpFailed { deal });
                }
            }
            Action::PostProof {
                deal,
                channel,
                amount,
            } => {
                let c = self.channels.get_mut(&channel).unwrap();
                assert!(amount <= c.deposit, "proof above the deposit");
                assert_eq!(
                    c.provider, self.deals[&deal].0,
                    "a proof to another provider"
                );
                c.signed = c.signed.max(amount);
                if let Some(x) = self.deals.get_mut(&deal) {
                    assert!(x.3.is_none_or(|c| c == channel), "a deal's channel changed");
                    x.3 = Some(channel);
                }
                let d = self.delay();
                if self.rng.random_range(0..20) == 0 {
                    self.at(
                        d,
                        Input::ProofFailed {
                            deal,
                            amount,
                            error: "exchange down".into(),
                        },
                    );
                    return;
                }
                let p = self.proofs.entry(deal).or_insert(0);
                *p = (*p).max(amount);
                self.at(d, Input::ProofPosted { deal, amount });
                // A provider that saw its first window serves (unless it never does).
                let (_, kind, ..) = self.deals[&deal];
                if kind != Kind::NeverServes {
                    let d = self.delay();
                    self.at(
                        d,
                        Input::ProviderReported {
                            deal,
                            status: PartyStatus::Active,
                        },
                    );
                }
            }
            Action::Connect { deal, .. } => {
                let d = self.delay();
                if self.rng.random_range(0..15) == 0 {
                    self.at(
                        d,
                        Input::ExitFailed {
                            deal,
                            reason: "exit address not verified".into(),
                        },
                    );
                } else {
                    self.at(d, Input::ExitLive { deal });
                    let (_, kind, ..) = self.deals[&deal];
                    if kind == Kind::Flaky {
                        let later = self.rng.random_range(10_000..900_000);
                        self.at(later, Input::ExitUnhealthy { deal });
                    }
                }
            }
            Action::Disconnect { .. } | Action::LogChecked { .. } => {}
            Action::FetchLog { deal, .. } => {
                // The tunnel may be gone already: the deal's report is sent either way.
                let d = self.delay();
                self.at(
                    d,
                    Input::LogFetched {
                        deal,
                        log: Err("the tunnel did not answer".into()),
                        on_chain: None,
                    },
                );
            }
            Action::ReadLogHash { channel } => {
                let d = self.delay();
                self.at(
                    d,
                    Input::LogHash {
                        channel,
                        hash: None,
                    },
                );
            }
            Action::Reverify { deal, .. } => {
                // Now and then the database places a serving exit elsewhere.
                if self.rng.random_range(0..20) == 0 {
                    let d = self.delay();
                    self.at(
                        d,
                        Input::ExitMisplaced {
                            deal,
                            reason: "`country` claims de but the GeoIP database places the address in br".into(),
                        },
                    );
                }
            }
            Action::Extend { deal, new_end } => {
                assert!(!shut, "extension after shutdown");
                if self.rng.random_range(0..4) == 0 {
                    return; // the provider does not agree
                }
                let (_, _, t, _) = self.deals.get_mut(&deal).unwrap();
                let mut t2 = t.clone();
                let add = new_end - t2.end;
                t2.end = new_end;
                t2.duration_s += add;
                t2.value += t2.price_per_ip_second * u128::from(add);
                *t = t2.clone();
                let d = self.delay();
                self.at(d, Input::Extended { deal, terms: t2 });
            }
            Action::CheckChannel { channel } => {
                let d = self.delay();
                if !self.chain_ok() {
                    return;
                }
                let c = &self.channels[&channel];
                let input = if !c.open {
                    Input::ChannelClosed { channel }
                } else if let Some(t) = c.settle_after {
                    Input::CloseStarted {
                        channel,
                        settle_after: t,
                    }
                } else {
                    Input::ChannelStillOpen { channel }
                };
                self.at(d, input);
            }
            Action::StartClose { channel, amount } => {
                let d = self.delay();
                let ok = self.chain_ok();
                let c = &self.channels[&channel];
                if !ok || !c.open || c.settle_after.is_some() {
                    self.at(d, Input::CloseFailed { channel });
                    return;
                }
                let admit = amount.max(c.claimed);
                assert!(
                    admit <= c.signed.max(c.claimed),
                    "admits more than it signed"
                );
                let honest = self
                    .deals
                    .values()
                    .find(|x| x.3 == Some(channel))
                    .is_some_and(|x| matches!(x.1, Kind::Honest | Kind::Flaky));
                let signed = c.signed;
                self.pay(channel, admit);
                let t = self.now + 600_000;
                self.channels.get_mut(&channel).unwrap().settle_after = Some(t);
                // A provider watching its channels claims the latest proof in time.
                if honest {
                    self.pay(channel, signed);
                }
                self.at(
                    d,
                    Input::CloseStarted {
                        channel,
                        settle_after: t,
                    },
                );
            }
            Action::Settle { channel } => {
                let d = self.delay();
                let ok = self.chain_ok();
                let c = &self.channels[&channel];
                if ok && c.settle_after.is_some_and(|t| self.now >= t) {
                    self.close(channel);
                    self.at(d, Input::ChannelClosed { channel });
                } else if !c.open {
                    self.at(d, Input::ChannelClosed { channel });
                } else {
                    self.at(d, Input::CloseFailed { channel });
                }
            }
        }
    }

    fn check(&self) {
        let s = self.core.settings();
        let first = |price: u128| cost(price, s.first_window.as_secs());
        for d in self.core.deals().values() {
            let price = d.terms.price_per_ip_second;
            let bound = if d.served() {
                cost(price, d.served_s(self.now) + s.payment_window.as_secs() + 1)
            } else {
                first(price)
            };
            assert!(
                d.paid <= bound.max(first(price)),
                "deal {} paid {} > bound {bound} ({d:?})",
                d.id,
                d.paid
            );
            if let Some(c) = d.channel {
                assert!(d.base + d.paid <= c.deposit, "paid past the deposit");
            }
        }
        // Deals over one channel: disjoint, ordered slices of its cumulative amount.
        let mut by_channel: HashMap<B256, Vec<(u128, u128, u64)>> = HashMap::new();
        for d in self.core.deals().values() {
            if let Some(c) = d.channel {
                by_channel.entry(c.id).or_default().push((
                    d.base,
                    d.paid.max(d.paying.unwrap_or(0)),
                    d.id,
                ));
            }
        }
        for (ch, mut v) in by_channel {
            v.sort_unstable();
            for w in v.windows(2) {
                assert!(
                    w[0].0 + w[0].1 <= w[1].0,
                    "channel {ch}: deal {} (base {}, paid {}) overlaps deal {} (base {})",
                    w[0].2,
                    w[0].0,
                    w[0].1,
                    w[1].2,
                    w[1].0
                );
            }
        }
        // Chain: what providers were paid never exceeds what they were owed.
        for (provider, kind, t, ch) in self.deals.values() {
            if let Some(ch) = ch {
                assert_eq!(
                    self.channels[ch].provider, *provider,
                    "a deposit for another provider"
                );
            }
            if let (Some(ch), Kind::NeverServes) = (ch, kind) {
                let firsts: u128 = self
                    .deals
                    .values()
                    .filter(|x| x.3 == Some(*ch))
                    .map(|x| first(x.2.price_per_ip_second))
                    .sum();
                assert!(
                    self.channels[ch].claimed <= firsts.max(first(t.price_per_ip_second)),
                    "a provider that never served got more than one first window per deal"
                );
            }
        }
        for (ch, c) in &self.channels {
            assert!(
                c.claimed <= c.signed,
                "channel {ch}: provider paid {} > signed {}",
                c.claimed,
                c.signed
            );
            assert!(
                c.signed <= c.deposit,
                "channel {ch}: proof above the deposit"
            );
        }
        if let Some(cap) = s.max_spend_total {
            assert!(self.core.spent_total() <= cap, "spend over max_spend_total");
        }
        if let Some(cap) = s.max_spend_per_hour {
            assert!(
                self.core.spent_last_hour(self.now) <= cap,
                "spend over max_spend_per_hour"
            );
        }
        let on_demand = self.core.groups().iter().filter(|g| g.on_demand).count();
        assert!(
            on_demand <= s.max_on_demand_groups,
            "{on_demand} on-demand groups"
        );
        assert_eq!(
            self.balance + self.reserved + self.paid_out,
            FUNDS,
            "tokens conserved"
        );
        let open_deposits: u128 = self
            .channels
            .values()
            .filter(|c| c.open)
            .map(|c| c.deposit - c.claimed)
            .sum();
        assert_eq!(
            open_deposits, self.reserved,
            "reserved = unspent deposits of open channels"
        );
    }

    fn run(&mut self) {
        let end = self.shutdown_at + 3 * 3_600_000;
        while self.now < end {
            self.steps += 1;
            // Next: a scheduled input, or a tick every 500 ms.
            let next_tick = self.now + 500;
            let input = match self.queue.peek() {
                Some(Reverse((t, _, _))) if *t <= next_tick => {
                    let Reverse((t, _, i)) = self.queue.pop().unwrap();
                    self.now = self.now.max(t);
                    self.inputs[i].take()
                }
                _ => {
                    self.now = next_tick;
                    None
                }
            };
            let actions = match input {
                Some(input) => self.core.handle(input, self.now),
                None => {
                    // Outside events of this instant.
                    if !self.shut && self.now >= self.shutdown_at {
                        self.shut = true;
                        let a = self.core.handle(Input::Shutdown, self.now);
                        for x in a {
                            self.act(x);
                        }
                    }
                    if self.shut && !self.ended && self.now >= self.shutdown_at + 20_000 {
                        self.ended = true;
                        let a = self.core.handle(Input::EndAll, self.now);
                        for x in a {
                            self.act(x);
                        }
                    }
                    let r = self.rng.random_range(0..1000);
                    if r < 5 && !self.shut {
                        // Scrapers asking for ever new ASNs.
                        let asn = self.rng.random_range(0..40);
                        let f = Filter {
                            country: Some(country(asn as usize).parse().unwrap()),
                            asn: Some(asn),
                            ..Filter::default()
                        };
                        self.core.want(&f, self.now);
                    } else if r < 7 {
                        self.chain_down_until = self.now + self.rng.random_range(1_000..120_000);
                    }
                    // Live exits carry requests now and then.
                    let live: Vec<u64> = self
                        .core
                        .deals()
                        .values()
                        .filter(|d| d.phase == Phase::Serving)
                        .map(|d| d.id)
                        .collect();
                    for id in live {
                        if self.rng.random_range(0..4) == 0 {
                            let n = self.steps;
                            self.core.handle(
                                Input::Usage {
                                    deal: id,
                                    requests: n,
                                },
                                self.now,
                            );
                        }
                    }
                    if self.steps.is_multiple_of(120) {
                        self.core.prune(self.now);
                    }
                    self.core.tick(self.now)
                }
            };
            for a in actions {
                self.act(a);
            }
            self.check();
        }
        // Everything drained: every channel closed, nothing reserved.
        let open: BTreeMap<_, _> = self.channels.iter().filter(|(_, c)| c.open).collect();
        assert!(open.is_empty(), "channels left open: {open:?}");
        assert_eq!(self.reserved, 0);
        for d in self.core.deals().values() {
            assert_eq!(d.phase, Phase::Ended);
            if let Some(c) = d.channel {
                assert!(
                    matches!(c.phase, ChannelPhase::Closed | ChannelPhase::Reused { .. }),
                    "deal {}: {:?}",
                    d.id,
                    c.phase
                );
            }
        }
        assert!(self.next_deal > 10, "the simulation made deals");
        self.reused = self.core.deals().values().filter(|d| d.base > 0).count();
    }
}

#[test]
fn seeded_random_runs_keep_the_money_rules() {
    let seeds: u64 = std::env::var("IPSX_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 0..seeds {
        let mut w = World::new(seed);
        w.run();
        eprintln!(
            "seed {seed}: {} steps, {} deals, {} channels, paid out {}, {} deals in view over reused channels",
            w.steps,
            w.next_deal - 1,
            w.channels.len(),
            w.paid_out,
            w.reused
        );
        assert!(
            w.channels.len() < w.next_deal as usize - 1,
            "seed {seed}: no channel reused"
        );
    }
}
