//! The same node on a real PostgreSQL: orders, deals and statuses survive a restart, and
//! concurrent requests still cannot share a balance.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::common;

use alloy_primitives::Address;
use alloy_signer_local::PrivateKeySigner;
use common::pg::Pg;
use common::{Node, nonce, offer, request};
use ipsx_exchange::server::unix_now;
use ipsx_exchange::{DealStatus, MemoryBalances, Outcome, PartyStatus, StatusReport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_survives_restart() {
    let pg = Pg::start();
    let balances = MemoryBalances::new();
    let node = Node::start_on(&pg.url, balances.clone()).await;
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), 1_000);
    for i in 0..10u8 {
        cp.post_offer(&offer(p.address(), i + 1, "us", 1, 1))
            .await
            .unwrap();
    }
    // Concurrent requests of 600 each against a balance of 1000: exactly one.
    // (No offer in gb: they would rest in the book holding 600 each.)
    let reqs: Vec<_> = (0..6)
        .map(|_| request(r.address(), 5, "gb", 2, 60))
        .collect();
    let results = futures_util::future::join_all(reqs.iter().map(|q| cr.post_request(q))).await;
    let ok: Vec<&Outcome> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    // 400 left: a US request of 1 IP (120 at most) fills at the offer's price 1.
    let Outcome::RequestPosted {
        deals, held: 60, ..
    } = cr
        .post_request(&request(r.address(), 1, "us", 2, 60))
        .await
        .unwrap()
    else {
        panic!()
    };
    let d = deals[0];
    let rep = |w: Address, s| StatusReport {
        wallet: w,
        deal_id: d,
        status: s,
        reason: String::new(),
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    cp.report(&rep(p.address(), PartyStatus::Rejected))
        .await
        .unwrap();
    let before = cr.deals_of(r.address()).await.unwrap();
    let held = cr.profile(r.address()).await.unwrap().held;
    assert_eq!(held, 600, "the cancelled deal released its 60");
    node.stop().await;

    let node = Node::start_on(&pg.url, balances).await;
    let cr = node.client(&r);
    assert_eq!(cr.deals_of(r.address()).await.unwrap(), before);
    assert_eq!(cr.deal(d).await.unwrap().status, DealStatus::Cancelled);
    assert_eq!(cr.profile(r.address()).await.unwrap().held, held);
    assert_eq!(
        cr.profile(r.address()).await.unwrap().held,
        600,
        "the resting gb request keeps its hold"
    );
    assert!(node.journal_rows().await >= 13);
    node.stop().await;
}
