//! Property test on a real chain: the platform fee of every claim is exactly
//! `floor(paid * fee_bps / 10_000)`, the provider gets the rest, for awkward amounts and
//! every fee up to the cap; the Rust mirror (`fee_split`) agrees with the contract.

#![allow(clippy::unwrap_used)]

use crate::common;

use alloy::primitives::{B256, U256};
use common::{World, tokens};
use ipsx_chain::{BalanceProof, fee_split};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Amounts in base units: tiny, around the 10 000 bps denominator, and large.
fn amount() -> impl Strategy<Value = u128> {
    prop_oneof![
        1u128..=20,
        9_990u128..=10_010,
        any::<u64>().prop_map(u128::from),
        (1u128..=1_000_000u128).prop_map(|t| t * 10u128.pow(18) - 1),
    ]
}

#[test]
fn fee_arithmetic_is_exact_on_chain() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let w = rt.block_on(World::new(2, 0, tokens("100000000"), tokens("100000000")));
    let (req, prov) = (&w.users[0], &w.users[1]);
    let treasury = w.treasury.address();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0u16..=1_000,
        amount(),
        amount(),
        prop_oneof![Just(0u16), Just(1), Just(999), Just(1_000)],
        any::<bool>(),
    );
    runner
        .run(&strategy, |(bps, a, b, edge_bps, use_edge)| {
            let bps = if use_edge { edge_bps } else { bps };
            let (first, deposit) = (U256::from(a.min(b)), U256::from(a.max(b)) + U256::from(1));
            rt.block_on(async {
                w.owner.set_fee(bps).await.unwrap();
                let (id, _) = req.open_channel(prov.address(), deposit).await.unwrap();
                let mut claimed = U256::ZERO;
                for (cum, close) in [(first, false), (deposit, true)] {
                    if cum <= claimed {
                        continue;
                    }
                    let p0 = prov.balance(prov.address()).await.unwrap();
                    let t0 = w.owner.balance(treasury).await.unwrap();
                    let sig = req.sign_balance_proof(id, cum).unwrap();
                    let proof = BalanceProof {
                        channel_id: id,
                        cumulative_amount: cum,
                    };
                    prov.claim(&proof, sig, B256::ZERO, close).await.unwrap();
                    let split = fee_split(cum - claimed, bps).unwrap();
                    let p1 = prov.balance(prov.address()).await.unwrap();
                    let t1 = w.owner.balance(treasury).await.unwrap();
                    prop_assert_eq!(
                        p1 - p0,
                        split.provider,
                        "provider share of {} at {} bps",
                        cum - claimed,
                        bps
                    );
                    prop_assert_eq!(
                        t1 - t0,
                        split.fee,
                        "fee of {} at {} bps",
                        cum - claimed,
                        bps
                    );
                    prop_assert_eq!(
                        split.fee * U256::from(10_000u64) <= (cum - claimed) * U256::from(bps),
                        true
                    );
                    claimed = cum;
                }
                w.assert_invariant().await;
                Ok(())
            })
        })
        .unwrap();
}
