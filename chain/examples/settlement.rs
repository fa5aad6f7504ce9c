//! Settlement benchmark (run by `benches/settlement/run.sh`): the chain side of 100
//! deals of 10 minutes with 4 providers, on anvil mining a block every 2 s, under two
//! protocols, side by side:
//!
//! - **per-deal channels** (the protocol before channel reuse): every deal opens a
//!   channel (`openChannel`, requester) and ends with the provider's closing claim
//!   (`claim(close)`); the provider's default `claim_interval` (10 min) adds no claim
//!   inside a 10-minute deal. Every rental is a first contact: it waits for the open.
//! - **reused channels, lazy claims** (this protocol): one channel per provider, opened
//!   at first contact; later deals continue its cumulative amount; the deposit is kept
//!   one deal ahead, each top-up adding `channel_prefund` = 8 deals or what the channel
//!   carried so far when more (the market's `core::top_up_amount`); the provider
//!   claims once its unclaimed amount reaches the automatic threshold (a claim's gas at
//!   the current gas price is at most 1 % of the amount, one token base unit taken as
//!   one wei), and every channel is closed at the end (`startClose` by the requester,
//!   the provider's closing claim): those closes are counted.
//!
//! Time is compressed: a deal's service is not waited for, only its payments are made
//! (first window, then the whole value). "Rent to first byte" here is the payment part
//! of it: from the match to the provider holding a verified proof for the first window
//! (the requester's open when needed, its signature, the provider's channel read unless
//! the deposit is already known, the signature check); the exchange and tunnel hops
//! come on top (about 20 ms on one machine, `benches/market/run.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use ipsx_chain::testing::Anvil;
use ipsx_chain::{BalanceProof, ChainClient, ChannelState, Deployment, verify_balance_proof};

const DEALS: usize = 100;
const PROVIDERS: usize = 4;
const DEAL_S: u64 = 600;
/// Price per IP-second in base units (the example provider config's price).
const PRICE: u128 = 1_000_000_000_000;
const FIRST_WINDOW_S: u64 = 5;
const PREFUND: u128 = 8;
/// Gas a claim costs, rounded up, and the share the automatic threshold allows
/// (the provider agent's `CLAIM_GAS` and `CLAIM_GAS_SHARE`).
const CLAIM_GAS: u128 = 80_000;
const CLAIM_GAS_SHARE: u128 = 100;
const REQUESTER: usize = 5;
/// The commit before issue 12's work (first parent of the first 'split' merge).
const BEFORE: &str = "bcaaa06";

/// The market's `core::top_up_amount` (this crate cannot depend on the market): what
/// a top-up adds when a deal of `value` runs over a channel that carried `base`.
fn top_up_amount(deposit: u128, base: u128, value: u128, prefund: u128) -> Option<u128> {
    let need = base + value;
    let short = need.saturating_sub(deposit);
    if short == 0 && need + value <= deposit {
        return None;
    }
    Some(short + (value * prefund).max(base))
}

#[derive(Debug, Default, Clone)]
struct Tally {
    gas_requester: u64,
    gas_provider: u64,
    tx_requester: u32,
    tx_provider: u32,
    /// Per transaction kind: (count, gas).
    kinds: BTreeMap<&'static str, (u32, u64)>,
    first_contact: Vec<Duration>,
    funded: Vec<Duration>,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.gas_requester += o.gas_requester;
        self.gas_provider += o.gas_provider;
        self.tx_requester += o.tx_requester;
        self.tx_provider += o.tx_provider;
        for (k, (n, g)) in o.kinds {
            let e = self.kinds.entry(k).or_default();
            e.0 += n;
            e.1 += g;
        }
        self.first_contact.extend(o.first_contact);
        self.funded.extend(o.funded);
    }

    /// One transaction of `kind` ("requester: ..." or "provider: ...") that used `gas`.
    fn tx(&mut self, kind: &'static str, gas: u64) {
        if kind.starts_with("requester") {
            self.gas_requester += gas;
            self.tx_requester += 1;
        } else {
            self.gas_provider += gas;
            self.tx_provider += 1;
        }
        let e = self.kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += gas;
    }
}

/// The provider's check of a first proof: the channel read from the chain unless its
/// deposit is known to cover the amount, then the signature.
async fn provider_verifies(
    prov: &ChainClient,
    requester: Address,
    id: B256,
    amount: u128,
    sig: &[u8],
    known: Option<&ChannelState>,
) -> ChannelState {
    let ch = match known {
        Some(k) if k.deposit >= U256::from(amount) => *k,
        _ => prov.channel(id).await.unwrap().expect("channel exists"),
    };
    assert!(ch.deposit >= U256::from(amount), "proof above the deposit");
    let proof = BalanceProof {
        channel_id: id,
        cumulative_amount: U256::from(amount),
    };
    verify_balance_proof(&prov.domain(), &proof, sig, requester).unwrap();
    ch
}

/// First contact: the requester opens a channel and pays the first window; the
/// provider reads the channel and checks the proof. Timed from the match.
async fn first_contact(
    req: &ChainClient,
    prov: &ChainClient,
    value: u128,
    first: u128,
    t: &mut Tally,
) -> B256 {
    let t0 = Instant::now();
    let (id, out) = req
        .open_channel(prov.address(), U256::from(value))
        .await
        .unwrap();
    t.tx("requester: openChannel", out.gas_used);
    let sig = req.sign_balance_proof(id, U256::from(first)).unwrap();
    provider_verifies(prov, req.address(), id, first, &sig, None).await;
    t.first_contact.push(t0.elapsed());
    id
}

async fn per_deal_channels(req: ChainClient, prov: ChainClient, deals: usize) -> Tally {
    let mut t = Tally::default();
    let value = PRICE * u128::from(DEAL_S);
    let first = PRICE * u128::from(FIRST_WINDOW_S);
    for _ in 0..deals {
        let id = first_contact(&req, &prov, value, first, &mut t).await;
        let sig = req.sign_balance_proof(id, U256::from(value)).unwrap();
        let proof = BalanceProof {
            channel_id: id,
            cumulative_amount: U256::from(value),
        };
        let out = prov.claim(&proof, sig, B256::ZERO, true).await.unwrap();
        t.tx("provider: claim + close", out.gas_used);
    }
    t
}

async fn reused_channels(
    req: ChainClient,
    prov: ChainClient,
    deals: usize,
    threshold: u128,
) -> Tally {
    let mut t = Tally::default();
    let value = PRICE * u128::from(DEAL_S);
    let first = PRICE * u128::from(FIRST_WINDOW_S);
    // (id, known channel state, deposit, signed, claimed, latest signature)
    let mut lane: Option<(
        B256,
        ChannelState,
        u128,
        u128,
        u128,
        alloy::primitives::Bytes,
    )> = None;
    for _ in 0..deals {
        let t0 = Instant::now();
        let Some((id, known, deposit, signed, claimed, last)) = lane.take() else {
            let id = first_contact(&req, &prov, value, first, &mut t).await;
            // Kept one deal ahead: topped up beside the first deal's service.
            let add = top_up_amount(value, 0, value, PREFUND).unwrap();
            let out = req.top_up(id, U256::from(add)).await.unwrap();
            t.tx("requester: topUp", out.gas_used);
            let known = prov.channel(id).await.unwrap().unwrap();
            let sig = req.sign_balance_proof(id, U256::from(value)).unwrap();
            lane = Some((id, known, value + add, value, 0, sig));
            continue;
        };
        let base = signed;
        let mut deposit = deposit;
        let mut known = known;
        // The first window goes at once when the deposit covers it; the top-up (if
        // the whole deal would pass the deposit) runs beside it.
        let covered = deposit >= base + first;
        if covered {
            let sig = req
                .sign_balance_proof(id, U256::from(base + first))
                .unwrap();
            provider_verifies(&prov, req.address(), id, base + first, &sig, Some(&known)).await;
            t.funded.push(t0.elapsed());
        }
        if let Some(add) = top_up_amount(deposit, base, value, PREFUND) {
            let out = req.top_up(id, U256::from(add)).await.unwrap();
            t.tx("requester: topUp", out.gas_used);
            deposit += add;
            // The provider sees the larger deposit on its next read (or when a proof
            // passes what it knew).
            known = prov.channel(id).await.unwrap().unwrap();
        }
        if !covered {
            let sig = req
                .sign_balance_proof(id, U256::from(base + first))
                .unwrap();
            provider_verifies(&prov, req.address(), id, base + first, &sig, Some(&known)).await;
            t.funded.push(t0.elapsed());
        }
        let _ = last;
        let signed = base + value;
        let sig = req.sign_balance_proof(id, U256::from(signed)).unwrap();
        let mut claimed = claimed;
        if signed - claimed >= threshold {
            let proof = BalanceProof {
                channel_id: id,
                cumulative_amount: U256::from(signed),
            };
            let out = prov
                .claim(&proof, sig.clone(), B256::ZERO, false)
                .await
                .unwrap();
            t.tx("provider: claim (lazy)", out.gas_used);
            claimed = signed;
        }
        lane = Some((id, known, deposit, signed, claimed, sig));
    }
    // Close: the requester starts it admitting what is claimed, the provider claims the
    // rest and closes.
    if let Some((id, _, _, signed, claimed, sig)) = lane {
        let out = req.start_close(id, U256::from(claimed)).await.unwrap();
        t.tx("requester: startClose", out.gas_used);
        let proof = BalanceProof {
            channel_id: id,
            cumulative_amount: U256::from(signed),
        };
        let out = prov.claim(&proof, sig, B256::ZERO, true).await.unwrap();
        t.tx("provider: claim + close", out.gas_used);
    }
    t
}

async fn run(deployment: Deployment, anvil: &Anvil, reuse: bool, threshold: u128) -> Tally {
    let req = ChainClient::connect(anvil.endpoint(), deployment, anvil.key(REQUESTER))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for p in 0..PROVIDERS {
        let prov = ChainClient::connect(anvil.endpoint(), deployment, anvil.key(1 + p))
            .await
            .unwrap();
        let req = req.clone();
        let n = DEALS / PROVIDERS;
        tasks.push(tokio::spawn(async move {
            if reuse {
                reused_channels(req, prov, n, threshold).await
            } else {
                per_deal_channels(req, prov, n).await
            }
        }));
    }
    let mut t = Tally::default();
    for task in tasks {
        t.add(task.await.unwrap());
    }
    t
}

fn stats(v: &[Duration]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    let mut v = v.to_vec();
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.1} ms, max {:.1} ms (n={})",
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

#[tokio::main]
async fn main() {
    let block_time = std::env::var("IPSX_BLOCK_TIME").unwrap_or_else(|_| "2".into());
    let anvil = Anvil::spawn_with_args(&["--block-time", &block_time]).unwrap();
    let report = anvil.deploy_default().await.unwrap();
    let d = report.deployment;
    let lots = U256::from(10u128.pow(18) * 1_000_000);
    anvil
        .fund_and_deposit(d, REQUESTER, lots, lots)
        .await
        .unwrap();
    let gas_price = ChainClient::connect_read_only(anvil.endpoint(), d)
        .await
        .unwrap()
        .gas_price()
        .await
        .unwrap();
    let threshold = CLAIM_GAS * gas_price * CLAIM_GAS_SHARE;
    println!(
        "anvil --block-time {block_time}; {DEALS} deals of {DEAL_S} s over {PROVIDERS} providers; price {PRICE}/IP-s (deal value {}); gas price {gas_price} wei; claim threshold {threshold}",
        PRICE * u128::from(DEAL_S)
    );
    let t0 = Instant::now();
    let old = run(d, &anvil, false, threshold).await;
    let old_s = t0.elapsed();
    let t0 = Instant::now();
    let new = run(d, &anvil, true, threshold).await;
    let new_s = t0.elapsed();
    let ip_hours = (DEALS as f64) * (DEAL_S as f64) / 3600.0;
    let per_ip_hour = |t: &Tally| (t.gas_requester + t.gas_provider) as f64 / ip_hours;
    let per_deal = |n: u32| f64::from(n) / DEALS as f64;
    println!();
    println!(
        "{:<44} {:>26} {:>34}",
        "", "before: per-deal channels", "now: reused channels, lazy claims"
    );
    println!(
        "{:<44} {:>26.0} {:>34.0}",
        "gas per IP-hour (both sides)",
        per_ip_hour(&old),
        per_ip_hour(&new)
    );
    println!(
        "{:<44} {:>26} {:>34}",
        "  gas total (requester + provider)",
        format!("{} + {}", old.gas_requester, old.gas_provider),
        format!("{} + {}", new.gas_requester, new.gas_provider)
    );
    println!(
        "{:<44} {:>26.2} {:>34.2}",
        "transactions per deal, requester",
        per_deal(old.tx_requester),
        per_deal(new.tx_requester)
    );
    println!(
        "{:<44} {:>26.2} {:>34.2}",
        "transactions per deal, provider",
        per_deal(old.tx_provider),
        per_deal(new.tx_provider)
    );
    println!(
        "{:<44} {:>26} {:>34}",
        "rent to first byte (payment part), funded",
        stats(&old.funded),
        stats(&new.funded)
    );
    println!(
        "{:<44} {:>26} {:>34}",
        "rent to first byte (payment part), first contact",
        stats(&old.first_contact),
        stats(&new.first_contact)
    );
    println!(
        "{:<44} {:>26.1} {:>34.1}",
        "wall time of the run, s",
        old_s.as_secs_f64(),
        new_s.as_secs_f64()
    );
    println!();
    println!(
        "{:<44} {:>26} {:>34}",
        "gas by transaction kind (count x avg = total)", "", ""
    );
    let kinds: std::collections::BTreeSet<&str> =
        old.kinds.keys().chain(new.kinds.keys()).copied().collect();
    let cell = |t: &Tally, k: &str| match t.kinds.get(k) {
        Some((n, g)) => format!("{n} x {} = {g}", g / u64::from(*n)),
        None => "-".into(),
    };
    for k in kinds {
        println!(
            "{:<44} {:>26} {:>34}",
            format!("  {k}"),
            cell(&old, k),
            cell(&new, k)
        );
    }
    println!();
    println!(
        "gas per IP-hour ratio (new / before): {:.3} (target <= 0.100)",
        per_ip_hour(&new) / per_ip_hour(&old)
    );
    // bcaaa06's own recorded gas table (its docs/chain.md, from its gas test's receipts):
    // a deal there is one `openChannel` (next for the wallet) and one `claim + close`.
    let (open_gas, close_gas) = (124_405u64, 64_534u64);
    let recorded = (open_gas + close_gas) as f64 * DEALS as f64 / ip_hours;
    println!(
        "{BEFORE}'s recorded gas table (its docs/chain.md, recorded 2026-11-29): openChannel {open_gas} + claim + close {close_gas} per deal = {recorded:.0} gas per IP-hour; new / that: {:.3}",
        per_ip_hour(&new) / recorded
    );
    println!(
        "before = the transactions of {BEFORE} (main before issue 12: an openChannel per deal, the provider's closing claim; its 10-minute claim_interval adds none in a 10-minute deal), replayed with this client against the same contracts (contracts/ unchanged since {BEFORE}); {BEFORE} itself is not built in this run"
    );
}
