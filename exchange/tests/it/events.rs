//! The per-wallet event stream: every deal event once and in order, across reconnects
//! (Last-Event-ID) and across a restart of the node; deadline events arrive by themselves.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::common;

use std::time::Duration;

use alloy_primitives::Address;
use alloy_signer_local::PrivateKeySigner;
use common::{Node, nonce, offer, request};
use ipsx_exchange::client::EventStream;
use ipsx_exchange::engine::EventKind;
use ipsx_exchange::server::unix_now;
use ipsx_exchange::{
    DealEvent, DealStatus, EngineConfig, MemoryBalances, Outcome, PartyStatus, StatusReport,
};

async fn take(s: &mut EventStream, n: usize) -> Vec<DealEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .expect("event within 20 s")
            .expect("stream open")
            .unwrap();
        out.push(ev);
    }
    out
}

fn report(w: Address, deal_id: u64, status: PartyStatus) -> StatusReport {
    StatusReport {
        wallet: w,
        deal_id,
        status,
        reason: String::new(),
        expiry: unix_now() + 60,
        nonce: nonce(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_once_and_in_order_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/j.db", dir.path().display());
    let balances = MemoryBalances::new();
    let node = Node::start_on(&db, balances.clone()).await;
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), 10_000_000);
    let mut stream = cr.events(r.address(), 0).await.unwrap();
    for i in 0..3 {
        cp.post_offer(&offer(p.address(), 10 + i, "br", 2, 1))
            .await
            .unwrap();
    }
    let Outcome::RequestPosted { deals, .. } = cr
        .post_request(&request(r.address(), 3, "br", 5, 60))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(deals.len(), 3);
    // 3 matched events.
    let first = take(&mut stream, 2).await;
    let resume_at = stream.last_id();
    drop(stream); // disconnect mid-way
    // More events while disconnected: 2 reports per deal (report events + status changes).
    for d in &deals {
        cp.report(&report(p.address(), *d, PartyStatus::Accepted))
            .await
            .unwrap();
        cr.report(&report(r.address(), *d, PartyStatus::Accepted))
            .await
            .unwrap();
    }
    // 3 matched + 3 x (report, report, status accepted) = 12 events in all.
    let mut stream = cr.events(r.address(), resume_at).await.unwrap();
    let rest = take(&mut stream, 10).await;
    let mut all = first.clone();
    all.extend(rest);
    let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing, no duplicate: {ids:?}"
    );
    // The same as a fresh read from the start, and the provider sees the same events.
    let mut fresh = cr.events(r.address(), 0).await.unwrap();
    assert_eq!(take(&mut fresh, 12).await, all);
    let mut prov = cp.events(p.address(), 0).await.unwrap();
    assert_eq!(take(&mut prov, 12).await, all);
    assert!(matches!(all[0].kind, EventKind::Matched { .. }));
    assert_eq!(
        all.iter()
            .filter(|e| e.kind == EventKind::StatusChanged)
            .count(),
        3
    );
    drop((fresh, prov));
    // Restart: the stream resumes from the same id with the same history.
    node.stop().await;
    let node = Node::start_on(&db, balances.clone()).await;
    let cr = node.client(&r);
    let mut again = cr.events(r.address(), ids[5]).await.unwrap();
    assert_eq!(take(&mut again, 6).await, all[6..].to_vec());
    // A new event after the restart arrives live on the open stream, with the next id.
    let cp = node.client(&p);
    cp.report(&report(p.address(), deals[0], PartyStatus::Active))
        .await
        .unwrap();
    let live = take(&mut again, 2).await;
    assert!(live[0].id > *ids.last().unwrap());
    assert_eq!(live[1].status, DealStatus::Active);
    // Bad resume ids are refused naming the header.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/wallets/{}/events", node.url, r.address()))
        .header("last-event-id", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("Last-Event-ID"));
    drop(again);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_push_status_events_without_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/j.db", dir.path().display());
    let engine = EngineConfig {
        accept_window_s: 1,
        ..EngineConfig::default()
    };
    let node = Node::start_with(&db, MemoryBalances::new(), engine).await;
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), 10_000_000);
    let mut stream = cp.events(p.address(), 0).await.unwrap();
    cp.post_offer(&offer(p.address(), 30, "ca", 2, 1))
        .await
        .unwrap();
    cr.post_request(&request(r.address(), 1, "ca", 5, 60))
        .await
        .unwrap();
    // Nobody accepts: after the 1-second accept window the ticker cancels the deal.
    let evs = take(&mut stream, 2).await;
    assert!(matches!(evs[0].kind, EventKind::Matched { .. }));
    assert_eq!(
        (evs[1].kind.clone(), evs[1].status),
        (EventKind::StatusChanged, DealStatus::Cancelled)
    );
    assert_eq!(
        cr.profile(r.address()).await.unwrap().held,
        0,
        "hold released"
    );
    drop(stream);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reconnects_across_a_node_restart_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/j.db", dir.path().display());
    let balances = MemoryBalances::new();
    let node = Node::start_on(&db, balances.clone()).await;
    let port = node.addr.port();
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), 10_000_000);
    let mut follow = cr.follow(r.address(), 0, 100);
    cp.post_offer(&offer(p.address(), 40, "it", 2, 1))
        .await
        .unwrap();
    let Outcome::RequestPosted { deals, .. } = cr
        .post_request(&request(r.address(), 1, "it", 5, 60))
        .await
        .unwrap()
    else {
        panic!()
    };
    let first = tokio::time::timeout(Duration::from_secs(20), follow.next())
        .await
        .unwrap()
        .unwrap();
    // The node goes away (its streams end) and comes back on the same address.
    node.stop().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let node = Node::start_on_listener(listener, &db, balances).await;
    let cp = node.client(&p);
    cp.report(&report(p.address(), deals[0], PartyStatus::Accepted))
        .await
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), follow.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.id,
        first.id + 1,
        "resumed right after the last event seen"
    );
    assert!(matches!(second.kind, EventKind::Reported { .. }));
    node.stop().await;
}
