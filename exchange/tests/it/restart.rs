//! QUALITY.md case 21: the node is a child process (`ipsx-exchange` bin) killed with
//! SIGKILL while orders are in flight; after a restart on the same SQLite file every
//! acknowledged order, deal and status is there, with the same ids.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy_primitives::Address;
use alloy_signer_local::PrivateKeySigner;
use common::{nonce, offer, request};
use ipsx_exchange::engine::BookQuery;
use ipsx_exchange::server::unix_now;
use ipsx_exchange::{Client, DealStatus, Extend, Outcome, PartyStatus, StatusReport};

/// The child node; killed (SIGKILL) on drop, even when the test panics.
struct Child9 {
    child: Child,
    url: String,
}

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &std::path::Path) -> Child9 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipsx-exchange"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line:?}"));
    Child9 {
        url: format!("http://{addr}"),
        child,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_order_deal_or_status() {
    let dir = tempfile::tempdir().unwrap();
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let config = dir.path().join("exchange.toml");
    std::fs::write(
        &config,
        format!(
            "chain_id = 31337\ndatabase = \"sqlite://{}/journal.db\"\nallow_private_addresses = true\n[static_balances]\n\"{}\" = \"1000000000\"\n",
            dir.path().display(),
            r.address()
        ),
    )
    .unwrap();
    let node = start(&config);
    let client = |k: &PrivateKeySigner| {
        Client::new(&node.url, 31337, Address::ZERO)
            .unwrap()
            .with_key(k.clone())
    };
    let (cp, cr) = (client(&p), client(&r));
    // Acknowledged state before the kill.
    let mut offer_ids = Vec::new();
    for i in 0..20u8 {
        let Outcome::OfferPosted { order_id, .. } = cp
            .post_offer(&offer(p.address(), i + 1, "de", 2, 2))
            .await
            .unwrap()
        else {
            panic!()
        };
        offer_ids.push(order_id);
    }
    let Outcome::RequestPosted {
        deals,
        order_id: req_id,
        ..
    } = cr
        .post_request(&request(r.address(), 30, "de", 5, 600))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(deals.len(), 20);
    let rep = |w: Address, d: u64, s| StatusReport {
        wallet: w,
        deal_id: d,
        status: s,
        reason: String::new(),
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    for d in &deals[..5] {
        cp.report(&rep(p.address(), *d, PartyStatus::Accepted))
            .await
            .unwrap();
        cr.report(&rep(r.address(), *d, PartyStatus::Accepted))
            .await
            .unwrap();
    }
    cp.report(&rep(p.address(), deals[5], PartyStatus::Failed))
        .await
        .unwrap();
    // An applied extension (deal 0) and a pending proposal (deal 1).
    let ext = |w: Address, d: u64, new_end: u64| Extend {
        wallet: w,
        deal_id: d,
        new_end,
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    let end0 = cr.deal(deals[0]).await.unwrap().terms.end;
    cr.extend(&ext(r.address(), deals[0], end0 + 60))
        .await
        .unwrap();
    let out = cp
        .extend(&ext(p.address(), deals[0], end0 + 60))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Extend { extended: true, .. }));
    let end1 = cr.deal(deals[1]).await.unwrap().terms.end;
    cr.extend(&ext(r.address(), deals[1], end1 + 30))
        .await
        .unwrap();
    let before_deals = cr.deals_of(r.address()).await.unwrap();
    let before_profile = cr.profile(r.address()).await.unwrap();
    // Orders in flight while the process is killed: each either was acknowledged (and
    // must survive) or was not (and may be lost).
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let in_flight = {
        let (cp, progress) = (cp.clone(), progress.clone());
        let pa = p.address();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000u32 {
                let o = offer(pa, (i % 200) as u8 + 30, "fr", 3, 1);
                match cp.post_offer(&o).await {
                    Ok(Outcome::OfferPosted { order_id, .. }) => acked.push(order_id),
                    _ => break,
                }
                progress.store(acked.len(), std::sync::atomic::Ordering::SeqCst);
            }
            acked
        })
    };
    // Kill once the writer is busy: at least 50 in-flight offers acknowledged.
    for _ in 0..6000 {
        if progress.load(std::sync::atomic::Ordering::SeqCst) >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut node = node;
    node.child.kill().unwrap(); // SIGKILL
    node.child.wait().unwrap();
    let acked = in_flight.await.unwrap();
    assert!(
        acked.len() >= 50,
        "the kill happened while orders were being acknowledged"
    );
    drop(node);

    let node = start(&config);
    let client = |k: &PrivateKeySigner| {
        Client::new(&node.url, 31337, Address::ZERO)
            .unwrap()
            .with_key(k.clone())
    };
    let (cp, cr) = (client(&p), client(&r));
    assert_eq!(
        cr.deals_of(r.address()).await.unwrap(),
        before_deals,
        "deals, statuses and history survive"
    );
    assert_eq!(
        cr.profile(r.address()).await.unwrap(),
        before_profile,
        "holds survive"
    );
    let book = cp
        .book(&BookQuery {
            wallet: Some(p.address()),
            limit: Some(1000),
            ..BookQuery::default()
        })
        .await
        .unwrap();
    let ids: std::collections::HashSet<u64> = book.offers.iter().map(|o| o.order_id).collect();
    for id in offer_ids.iter().chain(acked.iter()) {
        assert!(
            ids.contains(id),
            "acknowledged offer {id} lost (of {} in flight acked)",
            acked.len()
        );
    }
    let rq = cr
        .book(&BookQuery {
            wallet: Some(r.address()),
            ..BookQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rq.requests.len(), 1);
    assert_eq!(
        (rq.requests[0].order_id, rq.requests[0].remaining),
        (req_id, 10)
    );
    assert_eq!(
        cr.deal(deals[0]).await.unwrap().status,
        DealStatus::Accepted
    );
    assert_eq!(
        cr.deal(deals[5]).await.unwrap().status,
        DealStatus::Terminated
    );
    // The extension and the pending proposal survived: the provider's agreement now
    // extends deal 1.
    let d0 = cr.deal(deals[0]).await.unwrap();
    assert_eq!((d0.terms.end, d0.deadlines.end), (end0 + 60, end0 + 60));
    assert_eq!(
        cr.deal(deals[1]).await.unwrap().requester_new_end,
        Some(end1 + 30)
    );
    let out = cp
        .extend(&ext(p.address(), deals[1], end1 + 30))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Extend { extended: true, .. }));
    assert_eq!(cr.deal(deals[1]).await.unwrap().terms.end, end1 + 30);
    // Replayed nonces stay refused after the restart; new orders work.
    let again = cp.sign(&offer(p.address(), 251, "de", 2, 1)).unwrap();
    assert_eq!(
        cp.post_raw("/v1/offers", serde_json::to_vec(&again).unwrap())
            .await
            .unwrap()
            .0,
        201
    );
    drop(node);
    let node = start(&config);
    let cp = Client::new(&node.url, 31337, Address::ZERO).unwrap();
    assert_eq!(
        cp.post_raw("/v1/offers", serde_json::to_vec(&again).unwrap())
            .await
            .unwrap()
            .0,
        409,
        "replay refused after restart"
    );
}
