//! One wallet, many transactions at once: the market opens a channel per deal
//! concurrently, later tops them up, closes and settles them, all through one
//! `ChainClient` and its clones. Also the close path a requester takes on a provider
//! that never served: `start_close(id, 0)`, then `settle` after the challenge period.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::HashMap;

use alloy::primitives::{B256, U256};
use common::{World, tokens};
use ipsx_chain::bindings::IPSXToken;
use ipsx_chain::{ChainClient, ChainError};
use tokio::task::JoinSet;

/// Operations fired at once in each round.
const N: usize = 20;

fn assert_shareable<T: Clone + Send + Sync + 'static>() {}

#[test]
fn the_client_can_be_shared_across_tasks() {
    assert_shareable::<ChainClient>();
}

/// A client for the same wallet: a clone of `base`, or (every third) a separate
/// `connect` with the same key.
async fn client_for(w: &World, base: &ChainClient, i: usize) -> ChainClient {
    if i % 3 == 2 {
        ChainClient::connect(w.anvil.endpoint(), w.deployment(), w.key(1))
            .await
            .unwrap()
    } else {
        base.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_opens_then_twenty_concurrent_top_ups_from_one_wallet() {
    let w = World::new(1, 100, tokens("10000"), tokens("5000")).await;
    let req = w.users[0].clone();
    let me = req.address();
    let provider = w.key(5).address();
    let start = req.wallet_balances(me).await.unwrap();

    // Round 1: 20 opens at once, channel i locking i + 1 tokens.
    let mut opens = JoinSet::new();
    for i in 0..N {
        let c = client_for(&w, &req, i).await;
        let amount = tokens(&(i + 1).to_string());
        opens.spawn(async move { (amount, c.open_channel(provider, amount).await) });
    }
    let mut expected: HashMap<B256, U256> = HashMap::new();
    let mut failures: Vec<String> = Vec::new();
    while let Some(joined) = opens.join_next().await {
        let (amount, r) = joined.unwrap();
        match r {
            Ok((id, _)) => {
                expected.insert(id, amount);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} concurrent opens failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(expected.len(), N, "channel ids must be distinct");

    // Round 2: 20 top-ups at once, channel k gets k + 1 more tokens (ordered by id).
    let mut ids: Vec<B256> = expected.keys().copied().collect();
    ids.sort();
    let mut tops = JoinSet::new();
    for (k, id) in ids.iter().copied().enumerate() {
        let c = client_for(&w, &req, k).await;
        let amount = tokens(&(k + 1).to_string());
        *expected.get_mut(&id).unwrap() += amount;
        tops.spawn(async move { c.top_up(id, amount).await });
    }
    while let Some(joined) = tops.join_next().await {
        if let Err(e) = joined.unwrap() {
            failures.push(e.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {N} concurrent top-ups failed: {failures:#?}",
        failures.len()
    );

    // The chain holds exactly what was asked for.
    let mut on_chain = req.channel_ids_of(me).await.unwrap();
    on_chain.sort();
    assert_eq!(on_chain, ids, "exactly the 20 channels opened");
    let mut total = U256::ZERO;
    for (id, deposit) in &expected {
        let ch = req.channel(*id).await.unwrap().unwrap();
        assert_eq!(ch.deposit, *deposit, "deposit of channel {id}");
        assert_eq!((ch.requester, ch.provider), (me, provider));
        total += *deposit;
    }
    // 20 * 21 / 2 = 210 tokens opened, as much again topped up.
    assert_eq!(total, tokens("420"));
    let end = req.wallet_balances(me).await.unwrap();
    assert_eq!(
        end.reserved,
        start.reserved + total,
        "reserved = sum of deposits"
    );
    assert_eq!(end.balance, start.balance - total);
    assert_eq!(end.token, start.token, "no tokens left the wallet");
    w.assert_invariant().await;
}

#[tokio::test]
async fn a_nonce_used_behind_the_clients_back_is_resynced() {
    let w = World::new(1, 100, tokens("1000"), tokens("500")).await;
    let req = w.users[0].clone();
    let provider = w.key(5).address();
    // The client knows its next nonce now...
    req.open_channel(provider, tokens("1")).await.unwrap();
    // ...and another process with the same key sends a transaction.
    let other = w.anvil.wallet_provider(1).unwrap();
    let token = IPSXToken::new(w.deployment().token, &other);
    token
        .approve(w.deployment().centralizer, U256::MAX)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    // The stale nonce is refused by the node, re-read and the open re-sent.
    let (id, _) = req.open_channel(provider, tokens("2")).await.unwrap();
    assert_eq!(req.channel(id).await.unwrap().unwrap().deposit, tokens("2"));
    // And the next one goes straight through with the resynced nonce.
    req.top_up(id, tokens("3")).await.unwrap();
    assert_eq!(req.channel(id).await.unwrap().unwrap().deposit, tokens("5"));
}

#[tokio::test]
async fn a_reverted_estimate_leaves_no_nonce_gap() {
    let w = World::new(1, 100, tokens("1000"), tokens("10")).await;
    let req = w.users[0].clone();
    let provider = w.key(5).address();
    // More than the free balance: refused at the gas estimate, never sent.
    let err = req.open_channel(provider, tokens("11")).await.unwrap_err();
    assert!(err.centralizer_error().is_some(), "{err}");
    // The nonce was not consumed: the next transaction is mined (a gap would leave it
    // queued forever and this would time out).
    let quick = req
        .clone()
        .with_tx_timeout(std::time::Duration::from_secs(20));
    quick.open_channel(provider, tokens("10")).await.unwrap();
}

#[tokio::test]
async fn start_close_then_settle_returns_an_unserved_deposit() {
    let w = World::with_period(1, 100, tokens("1000"), tokens("100"), 600).await;
    let req = w.users[0].clone();
    let me = req.address();
    let provider = w.key(5).address();
    let start = req.wallet_balances(me).await.unwrap();
    let provider_start = req.wallet_balances(provider).await.unwrap();

    let (id, _) = req.open_channel(provider, tokens("30")).await.unwrap();
    let open = req.wallet_balances(me).await.unwrap();
    assert_eq!(open.reserved, start.reserved + tokens("30"));
    assert_eq!(open.balance, start.balance - tokens("30"));

    // The provider never served: close paying nothing.
    req.start_close(id, U256::ZERO).await.unwrap();
    let ch = req.channel(id).await.unwrap().unwrap();
    let settle_after = ch.settle_after.unwrap();
    assert!(settle_after >= req.latest_timestamp().await.unwrap() + 599);
    // Too early: refused, nothing moves.
    assert!(matches!(
        req.settle(id).await,
        Err(ChainError::Reverted { .. })
    ));
    assert_eq!(req.wallet_balances(me).await.unwrap(), open);

    w.anvil.advance_time(601).await.unwrap();
    req.settle(id).await.unwrap();
    assert_eq!(
        req.channel(id).await.unwrap(),
        None,
        "settled channels are gone"
    );
    let end = req.wallet_balances(me).await.unwrap();
    assert_eq!(
        end.balance, start.balance,
        "the whole deposit is free again"
    );
    assert_eq!(end.reserved, start.reserved);
    assert_eq!(end.token, start.token);
    assert_eq!(
        req.wallet_balances(provider).await.unwrap(),
        provider_start,
        "the provider got nothing"
    );
    w.assert_invariant().await;
}
