//! A seeded random sequence of deposits, opens, top-ups, claims, closes, settles and
//! withdrawals by several wallets, checked after every step against an exact model of
//! the contract and against the invariant `sum(balance + reserved) == token.balanceOf`.
//! Set `IPSX_CHAIN_SEED` to replay another sequence.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, U256};
use common::{World, tokens};
use ipsx_chain::{BalanceProof, ChainError, CloseConsent, fee_split};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const USERS: usize = 4;
const STEPS: usize = 300;
const FEE_BPS: u16 = 175;
/// One day: the test never runs that long, so only `advance_time` ends a period.
const PERIOD: u64 = 86_400;

#[derive(Debug, Clone)]
struct Ch {
    requester: usize,
    provider: usize,
    deposit: U256,
    claimed: U256,
    closing: bool,
    expired: bool,
}

#[derive(Debug, Default)]
struct Model {
    tokens: Vec<U256>,
    balance: BTreeMap<Address, U256>,
    reserved: BTreeMap<Address, U256>,
    open: BTreeMap<B256, Ch>,
    closed: Vec<B256>,
}

impl Model {
    fn bal(&self, a: Address) -> U256 {
        self.balance.get(&a).copied().unwrap_or_default()
    }
    fn res(&self, a: Address) -> U256 {
        self.reserved.get(&a).copied().unwrap_or_default()
    }
    fn add_bal(&mut self, a: Address, v: U256) {
        *self.balance.entry(a).or_default() += v;
    }
    fn sub_bal(&mut self, a: Address, v: U256) {
        *self.balance.entry(a).or_default() -= v;
    }
    fn add_res(&mut self, a: Address, v: U256) {
        *self.reserved.entry(a).or_default() += v;
    }
    fn sub_res(&mut self, a: Address, v: U256) {
        *self.reserved.entry(a).or_default() -= v;
    }
}

/// An awkward amount up to about `max`: odd base-unit counts, not round token figures.
fn awkward(rng: &mut StdRng, max: U256) -> U256 {
    if max.is_zero() {
        return U256::ZERO;
    }
    match rng.gen_range(0..6) {
        0 => U256::from(rng.gen_range(1u64..=1_000)),
        1 => max,
        2 => max + U256::from(1),
        _ => {
            let num = U256::from(rng.gen_range(1u64..=10_000));
            max * num / U256::from(10_007u64) + U256::from(rng.gen_range(0u64..=999))
        }
    }
}

fn expect(
    step: usize,
    what: &str,
    r: Result<impl std::fmt::Debug, ChainError>,
    want: Result<(), &str>,
) {
    match (r, want) {
        (Ok(_), Ok(())) => {}
        (Err(e), Err(name)) => {
            let got = match e.revert() {
                Some(ipsx_chain::Revert::Centralizer(c)) => format!("{c:?}"),
                Some(ipsx_chain::Revert::Token(t)) => format!("Token {t:?}"),
                _ => panic!("step {step} {what}: expected revert {name}, got non-revert error {e}"),
            };
            assert!(
                got.starts_with(name),
                "step {step} {what}: expected {name}, got {got}"
            );
        }
        (Ok(v), Err(name)) => panic!("step {step} {what}: expected {name}, succeeded with {v:?}"),
        (Err(e), Ok(())) => panic!("step {step} {what}: expected success, got {e}"),
    }
}

/// Pays `cum - claimed` of `ch` in the model, with the fee.
fn pay(m: &mut Model, w: &World, ch: &mut Ch, cum: U256) {
    let paid = cum - ch.claimed;
    let split = fee_split(paid, FEE_BPS).unwrap();
    let req = w.users[ch.requester].address();
    let prov = w.users[ch.provider].address();
    m.sub_res(req, paid);
    m.add_bal(prov, split.provider);
    m.add_bal(w.treasury.address(), split.fee);
    ch.claimed = cum;
}

fn close(m: &mut Model, w: &World, id: B256, ch: &Ch) {
    let refund = ch.deposit - ch.claimed;
    let req = w.users[ch.requester].address();
    m.sub_res(req, refund);
    m.add_bal(req, refund);
    m.open.remove(&id);
    m.closed.push(id);
}

/// Checks a proof amount against the contract's order of checks.
fn pay_check(ch: &Ch, cum: U256, must_increase: bool) -> Result<(), &'static str> {
    if cum < ch.claimed || (must_increase && cum == ch.claimed) {
        return Err("StaleProof");
    }
    if cum > ch.deposit {
        return Err("ClaimExceedsDeposit");
    }
    Ok(())
}

#[tokio::test]
async fn invariant_holds_after_every_step_of_a_random_sequence() {
    let seed = std::env::var("IPSX_CHAIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1b5c_2017);
    let mut rng = StdRng::seed_from_u64(seed);
    let funded = tokens("1000");
    let w = World::with_period(USERS, FEE_BPS, funded, U256::ZERO, PERIOD).await;
    let mut m = Model {
        tokens: vec![funded; USERS],
        ..Model::default()
    };
    let mut counts = BTreeMap::<&str, (u32, u32)>::new();

    for step in 0..STEPS {
        let u = rng.gen_range(0..USERS);
        let me = w.users[u].address();
        let op = rng.gen_range(0..100);
        let pick_channel = |rng: &mut StdRng, m: &Model| -> Option<(B256, Ch)> {
            if m.open.is_empty() {
                return None;
            }
            let i = rng.gen_range(0..m.open.len());
            m.open.iter().nth(i).map(|(k, v)| (*k, v.clone()))
        };
        let (name, ok) = match op {
            0..=14 => {
                let amount = awkward(&mut rng, m.tokens[u] / U256::from(2));
                let want = if amount.is_zero() {
                    Err("ZeroAmount")
                } else if amount > m.tokens[u] {
                    Err("Token")
                } else {
                    Ok(())
                };
                let r = w.users[u].deposit(amount).await;
                let ok = r.is_ok();
                expect(step, "deposit", r, want);
                if ok {
                    m.tokens[u] -= amount;
                    m.add_bal(me, amount);
                }
                ("deposit", ok)
            }
            15..=24 => {
                let amount = awkward(&mut rng, m.bal(me));
                let want = if amount.is_zero() {
                    Err("ZeroAmount")
                } else if amount > m.bal(me) {
                    Err("InsufficientBalance")
                } else {
                    Ok(())
                };
                let r = w.users[u].withdraw(amount).await;
                let ok = r.is_ok();
                expect(step, "withdraw", r, want);
                if ok {
                    m.tokens[u] += amount;
                    m.sub_bal(me, amount);
                }
                ("withdraw", ok)
            }
            25..=39 => {
                let p = (u + rng.gen_range(1..USERS)) % USERS;
                let amount = awkward(&mut rng, m.bal(me));
                let want = if amount.is_zero() {
                    Err("ZeroAmount")
                } else if amount > m.bal(me) {
                    Err("InsufficientBalance")
                } else {
                    Ok(())
                };
                let r = w.users[u].open_channel(w.users[p].address(), amount).await;
                let ok = r.is_ok();
                if let Ok((id, _)) = &r {
                    m.sub_bal(me, amount);
                    m.add_res(me, amount);
                    let ch = Ch {
                        requester: u,
                        provider: p,
                        deposit: amount,
                        claimed: U256::ZERO,
                        closing: false,
                        expired: false,
                    };
                    m.open.insert(*id, ch);
                }
                expect(step, "openChannel", r, want);
                ("openChannel", ok)
            }
            40..=47 => {
                let Some((id, ch)) = pick_channel(&mut rng, &m) else {
                    continue;
                };
                let req = w.users[ch.requester].address();
                let amount = awkward(&mut rng, m.bal(req) / U256::from(3));
                let want = if ch.closing {
                    Err("ChannelClosing")
                } else if amount.is_zero() {
                    Err("ZeroAmount")
                } else if amount > m.bal(req) {
                    Err("InsufficientBalance")
                } else {
                    Ok(())
                };
                let r = w.users[ch.requester].top_up(id, amount).await;
                let ok = r.is_ok();
                expect(step, "topUp", r, want);
                if ok {
                    m.sub_bal(req, amount);
                    m.add_res(req, amount);
                    m.open.get_mut(&id).unwrap().deposit += amount;
                }
                ("topUp", ok)
            }
            48..=67 => {
                let Some((id, mut ch)) = pick_channel(&mut rng, &m) else {
                    continue;
                };
                let close_it = rng.gen_bool(0.25);
                let cum = match rng.gen_range(0..4) {
                    0 => ch.claimed,
                    1 => ch.claimed.saturating_sub(U256::from(1)),
                    _ => ch.claimed + awkward(&mut rng, ch.deposit - ch.claimed),
                };
                let want = if ch.expired {
                    Err("ChallengePeriodOver")
                } else {
                    pay_check(&ch, cum, !close_it)
                };
                let sig = w.users[ch.requester].sign_balance_proof(id, cum).unwrap();
                let log = B256::from(U256::from(step));
                let proof = BalanceProof {
                    channel_id: id,
                    cumulative_amount: cum,
                };
                let r = w.users[ch.provider].claim(&proof, sig, log, close_it).await;
                let ok = r.is_ok();
                expect(step, "claim", r, want);
                if ok {
                    pay(&mut m, &w, &mut ch, cum);
                    if close_it {
                        close(&mut m, &w, id, &ch);
                    } else {
                        m.open.insert(id, ch);
                    }
                }
                (if close_it { "claim+close" } else { "claim" }, ok)
            }
            68..=74 => {
                let Some((id, mut ch)) = pick_channel(&mut rng, &m) else {
                    continue;
                };
                let cum = ch.claimed + awkward(&mut rng, ch.deposit - ch.claimed);
                let want = pay_check(&ch, cum, false);
                let consent = CloseConsent {
                    channel_id: id,
                    cumulative_amount: cum,
                    log_hash: B256::repeat_byte(7),
                };
                let sig = w.users[ch.provider]
                    .sign_close_consent(id, cum, consent.log_hash)
                    .unwrap();
                let r = w.users[ch.requester].cooperative_close(&consent, sig).await;
                let ok = r.is_ok();
                expect(step, "cooperativeClose", r, want);
                if ok {
                    pay(&mut m, &w, &mut ch, cum);
                    close(&mut m, &w, id, &ch);
                }
                ("cooperativeClose", ok)
            }
            75..=82 => {
                let Some((id, mut ch)) = pick_channel(&mut rng, &m) else {
                    continue;
                };
                let cum = ch.claimed + awkward(&mut rng, (ch.deposit - ch.claimed) / U256::from(2));
                let want = if ch.closing {
                    Err("ChannelClosing")
                } else {
                    pay_check(&ch, cum, false)
                };
                let r = w.users[ch.requester].start_close(id, cum).await;
                let ok = r.is_ok();
                expect(step, "startClose", r, want);
                if ok {
                    pay(&mut m, &w, &mut ch, cum);
                    ch.closing = true;
                    m.open.insert(id, ch);
                }
                ("startClose", ok)
            }
            83..=90 => {
                // Settle an open channel, or (sometimes) one already gone.
                let target = if !m.closed.is_empty() && rng.gen_bool(0.2) {
                    let i = rng.gen_range(0..m.closed.len());
                    Some((m.closed[i], None))
                } else if rng.gen_bool(0.7) {
                    // Mostly channels that are closing, so settles do happen.
                    let closing: Vec<_> = m.open.iter().filter(|(_, c)| c.closing).collect();
                    if closing.is_empty() {
                        continue;
                    }
                    let (id, ch) = closing[rng.gen_range(0..closing.len())];
                    Some((*id, Some(ch.clone())))
                } else {
                    pick_channel(&mut rng, &m).map(|(id, ch)| (id, Some(ch)))
                };
                let Some((id, ch)) = target else { continue };
                let want = match &ch {
                    None => Err("ChannelNotFound"),
                    Some(c) if !c.closing => Err("ChannelNotClosing"),
                    Some(c) if !c.expired => Err("ChallengePeriodActive"),
                    Some(_) => Ok(()),
                };
                let r = w.users[u].settle(id).await;
                let ok = r.is_ok();
                expect(step, "settle", r, want);
                if let (true, Some(c)) = (ok, ch) {
                    close(&mut m, &w, id, &c);
                }
                ("settle", ok)
            }
            91..=94 => {
                let amount = awkward(&mut rng, m.bal(w.treasury.address()));
                let want = if amount.is_zero() {
                    Err("ZeroAmount")
                } else if amount > m.bal(w.treasury.address()) {
                    Err("InsufficientBalance")
                } else {
                    Ok(())
                };
                let r = w.treasury.withdraw(amount).await;
                let ok = r.is_ok();
                expect(step, "treasury withdraw", r, want);
                if ok {
                    m.sub_bal(w.treasury.address(), amount);
                }
                ("treasury withdraw", ok)
            }
            _ => {
                w.anvil.advance_time(PERIOD + 1).await.unwrap();
                for ch in m.open.values_mut() {
                    ch.expired |= ch.closing;
                }
                ("advance time", true)
            }
        };
        let e = counts.entry(name).or_default();
        if ok {
            e.0 += 1
        } else {
            e.1 += 1
        }

        // After every step: the model matches the chain, and the invariant holds.
        for a in w.wallets() {
            assert_eq!(
                w.owner.balance(a).await.unwrap(),
                m.bal(a),
                "step {step} ({name}): balance of {a}"
            );
            assert_eq!(
                w.owner.reserved(a).await.unwrap(),
                m.res(a),
                "step {step} ({name}): reserved of {a}"
            );
        }
        w.assert_invariant().await;
    }

    // Every open channel is as modelled, and `reserved` is the sum of what they hold.
    let mut per_requester = BTreeMap::<Address, U256>::new();
    for (id, ch) in &m.open {
        let on_chain = w.owner.channel(*id).await.unwrap().unwrap();
        assert_eq!(
            (on_chain.deposit, on_chain.claimed),
            (ch.deposit, ch.claimed)
        );
        assert_eq!(on_chain.settle_after.is_some(), ch.closing);
        *per_requester
            .entry(w.users[ch.requester].address())
            .or_default() += ch.deposit - ch.claimed;
    }
    for a in w.wallets() {
        assert_eq!(
            w.owner.reserved(a).await.unwrap(),
            per_requester.get(&a).copied().unwrap_or_default()
        );
    }
    for id in &m.closed {
        assert_eq!(w.owner.channel(*id).await.unwrap(), None);
    }
    println!("seed {seed:#x}: (succeeded, reverted) per operation: {counts:?}");
    // The sequence exercised every kind of operation at least once successfully.
    for op in [
        "deposit",
        "withdraw",
        "openChannel",
        "topUp",
        "claim",
        "startClose",
        "settle",
    ] {
        assert!(
            counts.get(op).is_some_and(|c| c.0 > 0),
            "{op} never succeeded: {counts:?}"
        );
    }
}

/// One payment channel as the protocol uses it since channel reuse: deal after deal
/// with one provider, each deal a slice of the cumulative amount.
#[derive(Debug)]
struct Lane {
    id: B256,
    provider: usize,
    deposit: U256,
    /// The requester's latest signed cumulative amount (and its signature).
    signed: U256,
    sig: alloy::primitives::Bytes,
    /// The highest proof the provider verified (lost by a crash, found again on the
    /// exchange only when the next proof arrives).
    known: U256,
    known_sig: alloy::primitives::Bytes,
    claimed: U256,
    closing: bool,
    expired: bool,
    /// (base, paid, value) per deal, in order; the last one may be live.
    deals: Vec<(U256, U256, U256)>,
    live: bool,
}

/// Channel reuse on the real contract: a requester rents from two providers, deal after
/// deal over one channel per provider (opened on first contact, topped up when a
/// payment would pass the deposit), pays each deal in random increments, and the
/// providers claim lazily (above a threshold), crash (forgetting what they have not
/// claimed), and claim and close when the requester starts closing. After every step:
/// `sum(balance + reserved) == token.balanceOf(centralizer)`; each channel's deposit
/// covers every proof signed over it (so every unclaimed proof is claimable); nobody
/// is paid more than the requester signed; each provider's balance is exactly what its
/// claims paid minus the fee; and each channel's deals are contiguous slices of its
/// cumulative amount (deal k starts where deal k-1 ended) that add up to what was
/// signed. `IPSX_CHAIN_SEED` replays another sequence.
#[tokio::test]
async fn channel_reuse_keeps_every_deal_exact_and_every_proof_covered() {
    let seed = std::env::var("IPSX_CHAIN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5e77_1e12);
    let mut rng = StdRng::seed_from_u64(seed);
    let w = World::with_period(3, FEE_BPS, tokens("1000"), tokens("400"), PERIOD).await;
    let req = &w.users[0];
    let threshold = tokens("3");
    let mut lanes: Vec<Lane> = Vec::new();
    let mut provider_paid = [U256::ZERO; 3];
    let mut counts = BTreeMap::<&str, u32>::new();
    let (mut opens, mut deals) = (0u32, 0u32);

    for step in 0..160 {
        let op = rng.gen_range(0..100);
        let name = match op {
            // A new deal with provider 1 or 2: the open channel to it, else a new one.
            0..=19 => {
                let p = rng.gen_range(1..3);
                let value = tokens("1") * U256::from(rng.gen_range(1u64..=12)) / U256::from(2);
                deals += 1;
                if let Some(l) = lanes.iter_mut().find(|l| l.provider == p && !l.closing) {
                    // Sequential deals: the previous one is over.
                    l.deals.push((l.signed, U256::ZERO, value));
                    l.live = true;
                    "deal over a reused channel"
                } else {
                    let (id, _) = req.open_channel(w.users[p].address(), value).await.unwrap();
                    opens += 1;
                    lanes.push(Lane {
                        id,
                        provider: p,
                        deposit: value,
                        signed: U256::ZERO,
                        sig: Default::default(),
                        known: U256::ZERO,
                        known_sig: Default::default(),
                        claimed: U256::ZERO,
                        closing: false,
                        expired: false,
                        deals: vec![(U256::ZERO, U256::ZERO, value)],
                        live: true,
                    });
                    "first contact: openChannel"
                }
            }
            // Pay a live deal: top up first when the proof would pass the deposit.
            20..=59 => {
                let live: Vec<usize> = (0..lanes.len())
                    .filter(|&i| lanes[i].live && !lanes[i].closing)
                    .collect();
                if live.is_empty() {
                    continue;
                }
                let l = &mut lanes[live[rng.gen_range(0..live.len())]];
                let (base, paid, value) = *l.deals.last().unwrap();
                if paid >= value {
                    continue;
                }
                let x = awkward(&mut rng, value - paid).min(value - paid);
                if x.is_zero() {
                    continue;
                }
                let cum = base + paid + x;
                let mut name = "pay";
                if cum > l.deposit {
                    // Prefund the next deals too (a top-up is a transaction).
                    let add = cum - l.deposit + value * U256::from(2);
                    req.top_up(l.id, add).await.unwrap();
                    l.deposit += add;
                    name = "topUp + pay";
                }
                let sig = req.sign_balance_proof(l.id, cum).unwrap();
                // The provider's check: the channel's deposit covers the proof.
                let ch = w.owner.channel(l.id).await.unwrap().unwrap();
                assert!(ch.deposit >= cum, "step {step}: a proof above the deposit");
                l.signed = cum;
                l.sig = sig.clone();
                l.known = cum;
                l.known_sig = sig;
                l.deals.last_mut().unwrap().1 = paid + x;
                name
            }
            60..=71 => {
                for l in lanes.iter_mut() {
                    if rng.gen_bool(0.5) {
                        l.live = false;
                    }
                }
                "deal ends"
            }
            // Lazy claims: only once the unclaimed amount reaches the threshold.
            72..=83 => {
                let mut claimed_any = false;
                for l in lanes.iter_mut().filter(|l| !l.expired) {
                    if l.known > l.claimed && l.known - l.claimed >= threshold {
                        let proof = BalanceProof {
                            channel_id: l.id,
                            cumulative_amount: l.known,
                        };
                        w.users[l.provider]
                            .claim(&proof, l.known_sig.clone(), B256::repeat_byte(1), false)
                            .await
                            .unwrap();
                        provider_paid[l.provider] +=
                            fee_split(l.known - l.claimed, FEE_BPS).unwrap().provider;
                        l.claimed = l.known;
                        claimed_any = true;
                    }
                }
                if !claimed_any {
                    continue;
                }
                "lazy claim"
            }
            // A provider crashes: what it had not claimed is forgotten until the next
            // proof (the exchange keeps the latest one; the next verified proof is
            // cumulative and covers it).
            84..=88 => {
                let p = rng.gen_range(1..3);
                for l in lanes.iter_mut().filter(|l| l.provider == p) {
                    l.known = l.claimed;
                    l.known_sig = Default::default();
                }
                "provider crash"
            }
            // The requester closes an idle channel admitting what is claimed; the
            // provider, if it still holds a newer proof, claims it and closes.
            89..=95 => {
                let idle: Vec<usize> = (0..lanes.len())
                    .filter(|&i| !lanes[i].live && !lanes[i].closing)
                    .collect();
                if idle.is_empty() {
                    continue;
                }
                let i = idle[rng.gen_range(0..idle.len())];
                let l = &mut lanes[i];
                req.start_close(l.id, l.claimed).await.unwrap();
                l.closing = true;
                // The exchange still has the latest proof: a crashed provider finds it.
                l.known = l.signed;
                l.known_sig = l.sig.clone();
                if l.known > l.claimed && rng.gen_bool(0.8) {
                    let proof = BalanceProof {
                        channel_id: l.id,
                        cumulative_amount: l.known,
                    };
                    w.users[l.provider]
                        .claim(&proof, l.known_sig.clone(), B256::repeat_byte(2), true)
                        .await
                        .unwrap();
                    provider_paid[l.provider] +=
                        fee_split(l.known - l.claimed, FEE_BPS).unwrap().provider;
                    l.claimed = l.known;
                    lanes.remove(i);
                    "startClose + closing claim"
                } else {
                    "startClose"
                }
            }
            _ => {
                w.anvil.advance_time(PERIOD + 1).await.unwrap();
                let mut i = 0;
                while i < lanes.len() {
                    if lanes[i].closing {
                        w.users[0].settle(lanes[i].id).await.unwrap();
                        lanes.remove(i);
                    } else {
                        i += 1;
                    }
                }
                "settle after the challenge period"
            }
        };
        *counts.entry(name).or_default() += 1;

        w.assert_invariant().await;
        for l in &lanes {
            let ch = w.owner.channel(l.id).await.unwrap().unwrap();
            assert_eq!(ch.claimed, l.claimed, "step {step} ({name})");
            assert!(ch.deposit >= l.signed, "step {step}: deposit below a proof");
            assert!(ch.claimed <= l.signed, "step {step}: paid more than signed");
            let mut next = U256::ZERO;
            for (base, paid, value) in &l.deals {
                assert!(*base >= next, "step {step}: deals overlap on {}", l.id);
                assert_eq!(*base, next, "step {step}: a gap between deals on {}", l.id);
                assert!(paid <= value, "step {step}: a deal paid past its value");
                next = *base + *paid;
            }
            assert_eq!(
                next, l.signed,
                "step {step}: the deals add up to what was signed"
            );
        }
        for (p, paid) in provider_paid.iter().enumerate().skip(1) {
            assert_eq!(
                w.owner.balance(w.users[p].address()).await.unwrap(),
                tokens("400") + *paid,
                "step {step}: provider {p} paid exactly its claims minus the fee"
            );
        }
    }
    println!("seed {seed:#x}: {opens} channels for {deals} deals; {counts:?}");
    assert!(
        opens < deals,
        "channels were reused: {opens} opens for {deals} deals"
    );
    for op in [
        "deal over a reused channel",
        "lazy claim",
        "topUp + pay",
        "provider crash",
    ] {
        assert!(counts.contains_key(op), "{op} never happened: {counts:?}");
    }
}
