//! API tests over real HTTP with signed requests (QUALITY.md cases 19 and 20), proofs,
//! ratings, the OpenAPI document, TLS.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::common;

use alloy_primitives::{Address, B256};
use alloy_signer_local::PrivateKeySigner;
use common::{Node, nonce, offer, request};
use ipsx_exchange::server::{BatchItem, SignedMessage, unix_now};
use ipsx_exchange::{
    DealStatus, ExchangeError, Extend, Outcome, PartyStatus, Rating, StatusReport, sign,
};
use serde_json::{Value, json};

fn remote(e: ExchangeError) -> (u16, String, Option<String>) {
    match e {
        ExchangeError::Remote {
            status,
            code,
            field,
            ..
        } => (status, code, field),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field_and_nothing_is_written() {
    let node = Node::start().await;
    let key = PrivateKeySigner::random();
    let c = node.client(&key);
    node.fund(key.address(), 1_000_000);
    let good = offer(key.address(), 1, "de", 5, 1);
    let signed = serde_json::to_value(c.sign(&good).unwrap()).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = signed.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    // A payload change invalidates the signature, so field checks are exercised with
    // re-signed payloads.
    let resigned = |f: &dyn Fn(&mut Value)| {
        let mut p = serde_json::to_value(&good).unwrap();
        f(&mut p);
        match serde_json::from_value::<ipsx_exchange::Offer>(p.clone()) {
            Ok(o) => serde_json::to_vec(&c.sign(&o).unwrap()).unwrap(),
            // Not representable: send with the old signature; parsing fails first anyway.
            Err(_) => {
                serde_json::to_vec(&json!({ "payload": p, "signature": signed["signature"] }))
                    .unwrap()
            }
        }
    };
    let other = PrivateKeySigner::random();
    let forged = serde_json::to_vec(&SignedMessage {
        payload: good.clone(),
        signature: sign::sign(&good, &other, &sign::exchange_domain(31337, Address::ZERO)).unwrap(),
    })
    .unwrap();
    let wrong_chain = serde_json::to_vec(&SignedMessage {
        payload: good.clone(),
        signature: sign::sign(&good, &key, &sign::exchange_domain(1, Address::ZERO)).unwrap(),
    })
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed json", b"{\"payload\": {".to_vec(), 400, ""),
        ("not an object", b"[1,2]".to_vec(), 400, ""),
        (
            "trailing garbage",
            [serde_json::to_vec(&signed).unwrap(), b"xx".to_vec()].concat(),
            400,
            "",
        ),
        (
            "unknown top-level field",
            with(&|v| v["extra"] = json!(1)),
            400,
            "extra",
        ),
        (
            "unknown payload field",
            with(&|v| v["payload"]["colour"] = json!("red")),
            400,
            "colour",
        ),
        (
            "missing field",
            with(&|v| {
                v["payload"].as_object_mut().unwrap().remove("capacity");
            }),
            400,
            "capacity",
        ),
        (
            "wrong type",
            with(&|v| v["payload"]["capacity"] = json!("ten")),
            400,
            "capacity",
        ),
        (
            "bad country",
            with(&|v| v["payload"]["country"] = json!("zz")),
            400,
            "country",
        ),
        (
            "bad signature hex",
            with(&|v| v["signature"] = json!("0xzz")),
            401,
            "signature",
        ),
        (
            "short signature",
            with(&|v| v["signature"] = json!("0x1234")),
            401,
            "signature",
        ),
        ("forged signature", forged, 401, "signature"),
        ("other chain id", wrong_chain, 401, "signature"),
        (
            "price overflow",
            with(&|v| {
                v["payload"]["price_per_ip_second"] =
                    json!("340282366920938463463374607431768211456")
            }),
            400,
            "price_per_ip_second",
        ),
        (
            "negative price",
            with(&|v| v["payload"]["price_per_ip_second"] = json!("-5")),
            400,
            "price_per_ip_second",
        ),
        (
            "price as number",
            with(&|v| v["payload"]["price_per_ip_second"] = json!(5)),
            400,
            "price_per_ip_second",
        ),
        (
            "zero price",
            resigned(&|p| p["price_per_ip_second"] = json!("0")),
            400,
            "price_per_ip_second",
        ),
        (
            "price x duration overflow",
            resigned(&|p| p["price_per_ip_second"] = json!(u128::MAX.to_string())),
            400,
            "price_per_ip_second",
        ),
        (
            "negative capacity",
            with(&|v| v["payload"]["capacity"] = json!(-1)),
            400,
            "capacity",
        ),
        (
            "zero capacity",
            resigned(&|p| p["capacity"] = json!(0)),
            400,
            "capacity",
        ),
        (
            "duration too short",
            resigned(&|p| p["min_duration_s"] = json!(4)),
            400,
            "min_duration_s",
        ),
        (
            "duration too long",
            resigned(&|p| p["max_duration_s"] = json!(30 * 86_400 + 1)),
            400,
            "max_duration_s",
        ),
        (
            "expired",
            resigned(&|p| p["expiry"] = json!(unix_now() - 1)),
            400,
            "expiry",
        ),
        (
            "bad wg key",
            with(&|v| v["payload"]["wg_public_key"] = json!("short")),
            400,
            "wg_public_key",
        ),
    ];
    let rows_before = node.journal_rows().await;
    for (name, body, status, field) in cases {
        let (got, text) = c.post_raw("/v1/offers", body).await.unwrap();
        assert_eq!(got, status, "{name}: {text}");
        assert!(
            text.contains(field),
            "{name}: error must name `{field}`: {text}"
        );
    }
    // An oversized body, on its own connection: the server answers 413 without reading
    // it all and closes that connection.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/offers", node.url))
        .body(vec![b' '; 2 << 20])
        .send()
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 413);
    }
    // Requests: duration and count and price checks, signed properly.
    let rc = |f: &dyn Fn(&mut ipsx_exchange::Request)| {
        let mut r = request(key.address(), 1, "de", 10, 60);
        f(&mut r);
        r
    };
    for (r, field) in [
        (rc(&|r| r.duration_s = 4), "duration_s"),
        (rc(&|r| r.duration_s = 30 * 86_400 + 1), "duration_s"),
        (rc(&|r| r.count = 0), "count"),
        (
            rc(&|r| r.max_price_per_ip_second = 0),
            "max_price_per_ip_second",
        ),
        (
            rc(&|r| r.max_price_per_ip_second = u128::MAX / 2),
            "max_price_per_ip_second",
        ),
        (rc(&|r| r.expiry = unix_now() - 10), "expiry"),
    ] {
        let (status, _, f) = remote(c.post_request(&r).await.unwrap_err());
        assert_eq!(status, 400);
        assert_eq!(f.as_deref(), Some(field));
    }
    assert_eq!(node.journal_rows().await, rows_before, "nothing written");
    let book = c.book(&Default::default()).await.unwrap();
    assert!(book.offers.is_empty() && book.requests.is_empty());
    // Replay: the same signed offer twice.
    let body = serde_json::to_vec(&signed).unwrap();
    let (s1, _) = c.post_raw("/v1/offers", body.clone()).await.unwrap();
    let (s2, t2) = c.post_raw("/v1/offers", body).await.unwrap();
    assert_eq!((s1, s2), (201, 409), "{t2}");
    assert!(t2.contains("nonce"), "{t2}");
    assert_eq!(c.book(&Default::default()).await.unwrap().offers.len(), 1);
    // Unknown routes and bad path parameters.
    let (s, t) = c.post_raw("/v1/nope", b"{}".to_vec()).await.unwrap();
    assert_eq!(s, 404, "{t}");
    let e = reqwest::get(format!("{}/v1/deals/abc", node.url))
        .await
        .unwrap();
    assert_eq!(e.status(), 400);
    assert!(e.text().await.unwrap().contains("deal_id"));
    let e = reqwest::get(format!("{}/v1/profiles/0x12", node.url))
        .await
        .unwrap();
    assert_eq!(e.status(), 400);
    let e = reqwest::get(format!("{}/v1/book?colour=red", node.url))
        .await
        .unwrap();
    assert_eq!(e.status(), 400);
    assert!(e.text().await.unwrap().contains("colour"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_cannot_reserve_the_same_balance() {
    let node = Node::start().await;
    for round in 0..5 {
        let key = PrivateKeySigner::random();
        let c = node.client(&key);
        // Each request costs 10 x 60 = 600 at most; the wallet has 1000.
        node.fund(key.address(), 1_000);
        let reqs: Vec<_> = (0..8)
            .map(|_| request(key.address(), 1, "fr", 10, 60))
            .collect();
        let results = futures_util::future::join_all(reqs.iter().map(|r| c.post_request(r))).await;
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(accepted, 1, "round {round}: {results:?}");
        for r in results.into_iter().filter_map(Result::err) {
            let (status, code, _) = remote(r);
            assert_eq!((status, code.as_str()), (402, "insufficient_funds"));
        }
        assert_eq!(c.profile(key.address()).await.unwrap().held, 600);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_trade_is_prevented_and_cancel_releases_exactly_the_unfilled_part() {
    let node = Node::start().await;
    let (p1, p2, r) = (
        PrivateKeySigner::random(),
        PrivateKeySigner::random(),
        PrivateKeySigner::random(),
    );
    let (c1, c2, cr) = (node.client(&p1), node.client(&p2), node.client(&r));
    node.fund(r.address(), 1_000_000);
    node.fund(p1.address(), 1_000_000);
    // p1 offers and asks for the same country: no deal with itself.
    c1.post_offer(&offer(p1.address(), 1, "de", 3, 1))
        .await
        .unwrap();
    let out = c1
        .post_request(&request(p1.address(), 1, "de", 10, 60))
        .await
        .unwrap();
    let Outcome::RequestPosted {
        filled: 0,
        resting: 1,
        order_id: own,
        ..
    } = out
    else {
        panic!("{out:?}")
    };
    c1.cancel(own).await.unwrap();
    assert_eq!(c1.profile(p1.address()).await.unwrap().held, 0);
    // Partial fill: two offers, a request for five IPs at max price 10 for 60 s.
    c2.post_offer(&offer(p2.address(), 2, "de", 4, 1))
        .await
        .unwrap();
    let out = cr
        .post_request(&request(r.address(), 5, "de", 10, 60))
        .await
        .unwrap();
    let Outcome::RequestPosted {
        order_id,
        filled,
        resting,
        deals,
        held,
    } = out
    else {
        panic!("{out:?}")
    };
    assert_eq!((filled, resting, deals.len()), (2, 3, 2));
    assert_eq!(held, 3 * 60 + 4 * 60 + 3 * 600);
    assert_eq!(cr.profile(r.address()).await.unwrap().held, held);
    // Someone else cannot cancel it.
    let (status, _, field) = remote(c2.cancel(order_id).await.unwrap_err());
    assert_eq!((status, field.as_deref()), (403, Some("wallet")));
    let out = cr.cancel(order_id).await.unwrap();
    assert_eq!(
        out,
        Outcome::Cancelled {
            order_id,
            released: 3 * 600,
            open: 3
        }
    );
    assert_eq!(cr.profile(r.address()).await.unwrap().held, 3 * 60 + 4 * 60);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deal_reports_proofs_ratings_and_profiles() {
    let node = Node::start().await;
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), 1_000_000);
    let items = cp
        .post_offers(&[
            offer(p.address(), 3, "jp", 2, 1),
            offer(p.address(), 4, "jp", 3, 1),
        ])
        .await
        .unwrap();
    assert!(
        items.iter().all(|i| matches!(i, BatchItem::Ok(_))),
        "{items:?}"
    );
    let Outcome::RequestPosted { deals, .. } = cr
        .post_request(&request(r.address(), 1, "jp", 5, 60))
        .await
        .unwrap()
    else {
        panic!()
    };
    let id = deals[0];
    let rep = |w: Address, status| StatusReport {
        wallet: w,
        deal_id: id,
        status,
        reason: String::new(),
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    cp.report(&rep(p.address(), PartyStatus::Accepted))
        .await
        .unwrap();
    let out = cr
        .report(&rep(r.address(), PartyStatus::Accepted))
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::Reported {
            deal_id: id,
            status: DealStatus::Accepted
        }
    );
    // The provider signing as the requester: refused.
    let (status, _, _) = remote(
        cp.report(&rep(r.address(), PartyStatus::Active))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 401);
    cp.report(&rep(p.address(), PartyStatus::Active))
        .await
        .unwrap();
    cr.report(&rep(r.address(), PartyStatus::Active))
        .await
        .unwrap();
    // Balance proofs: the requester signs (Centralizer domain), amounts only grow.
    let ch = B256::repeat_byte(0xab);
    assert_eq!(
        cr.post_proof(id, ch, 50).await.unwrap(),
        Outcome::ProofStored {
            deal_id: id,
            amount: 50
        }
    );
    assert_eq!(remote(cr.post_proof(id, ch, 50).await.unwrap_err()).0, 409);
    assert_eq!(
        remote(
            cr.post_proof(id, B256::repeat_byte(1), 60)
                .await
                .unwrap_err()
        )
        .2
        .as_deref(),
        Some("channel_id")
    );
    assert_eq!(
        remote(cp.post_proof(id, ch, 70).await.unwrap_err()).0,
        401,
        "only the requester's proofs count"
    );
    cr.post_proof(id, ch, 120).await.unwrap();
    let stored = cp.proof(id).await.unwrap();
    assert_eq!(stored.cumulative_amount, 120);
    // The stored proof verifies under the Centralizer rules.
    let hash = stored.digest(&ipsx_chain::ChannelDomain {
        chain_id: 31337,
        centralizer: Address::ZERO,
    });
    assert_eq!(
        sign::recover(&hash, &stored.signature, false).unwrap(),
        r.address()
    );
    // A proof with v = 0 (not what the contract takes) is refused.
    let mut raw = alloy_primitives::hex::decode(&stored.signature).unwrap();
    raw[64] -= 27;
    let (s, t) = cr
        .post_raw("/v1/proofs", serde_json::to_vec(&json!({"deal_id": id, "channel_id": ch, "cumulative_amount": "130", "signature": alloy_primitives::hex::encode_prefixed(&raw)})).unwrap())
        .await
        .unwrap();
    assert_eq!(s, 401, "{t}");
    // Both complete; ratings weighted by value.
    cp.report(&rep(p.address(), PartyStatus::Completed))
        .await
        .unwrap();
    let out = cr
        .report(&rep(r.address(), PartyStatus::Completed))
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::Reported {
            deal_id: id,
            status: DealStatus::Completed
        }
    );
    let rating = Rating {
        wallet: r.address(),
        deal_id: id,
        score: 4,
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    assert_eq!(
        cr.rate(&rating).await.unwrap(),
        Outcome::Rated {
            deal_id: id,
            rating: 400
        }
    );
    let prof = cr.profile(p.address()).await.unwrap();
    assert_eq!((prof.profile.rating, prof.profile.completed), (400, 1));
    assert_eq!(cr.profile(r.address()).await.unwrap().held, 0);
    let deals = cr.deals_of(r.address()).await.unwrap();
    assert_eq!(deals.len(), 1);
    assert!(deals[0].history.len() >= 6);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_served_route_and_every_message_field() {
    let node = Node::start().await;
    let c = node.anonymous();
    let doc = c.openapi().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum::<usize>(),
        ipsx_exchange::openapi::ROUTES.len()
    );
    let http = reqwest::Client::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let url = format!(
                "{}{}",
                node.url,
                path.replace("{id}", "1")
                    .replace("{address}", &Address::ZERO.to_string())
            );
            let resp = match method.as_str() {
                "get" if path.ends_with("/events") => {
                    http.get(format!("{url}?after=0")).send().await.unwrap()
                }
                "get" => http.get(&url).send().await.unwrap(),
                _ => http.post(&url).body("{}").send().await.unwrap(),
            };
            let status = resp.status().as_u16();
            if status == 404 {
                let body: Value = resp.json().await.unwrap();
                assert_ne!(
                    body["error"]["code"], "not_found",
                    "{method} {path} is documented but not served"
                );
            }
            assert_ne!(status, 405, "{method} {path}");
        }
    }
    // Every field the server emits for a message is in its schema, and the reverse.
    let key = PrivateKeySigner::random();
    let mut o = offer(key.address(), 1, "de", 1, 1);
    o.region = Some("bavaria".into());
    let schemas = &doc["components"]["schemas"];
    let fields = |v: Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        fields(serde_json::to_value(&o).unwrap()),
        fields(schemas["Offer"]["properties"].clone())
    );
    let r = request(key.address(), 1, "de", 1, 60);
    assert_eq!(
        fields(serde_json::to_value(&r).unwrap()),
        fields(schemas["Request"]["properties"].clone())
    );
    assert_eq!(
        fields(serde_json::to_value(ext(key.address(), 1, 2)).unwrap()),
        fields(schemas["Extend"]["properties"].clone())
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_chain_is_a_503_not_a_crash() {
    // A real alloy balance source pointed at a closed port on loopback.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ipsx_exchange::ExchangeConfig::for_tests(
        format!("sqlite://{}/j.db", dir.path().display()),
        Default::default(),
    );
    cfg.static_balances = None;
    cfg.rpc_url = Some(format!("http://127.0.0.1:{port}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ipsx_exchange::serve(listener, cfg, async {
        let _ = stopped.await;
    }));
    let key = PrivateKeySigner::random();
    let c = ipsx_exchange::Client::new(&format!("http://{addr}"), 31337, Address::ZERO)
        .unwrap()
        .with_key(key.clone());
    let mut result = None;
    for _ in 0..100 {
        match c
            .post_request(&request(key.address(), 1, "de", 1, 60))
            .await
        {
            Err(ExchangeError::Transport(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => {
                result = Some(other);
                break;
            }
        }
    }
    let (status, code, _) = remote(result.unwrap().unwrap_err());
    assert_eq!((status, code.as_str()), (503, "chain"));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_route_refuses_hostile_input() {
    let node = Node::start().await;
    let key = PrivateKeySigner::random();
    let c = node.client(&key);
    let w = key.address();
    let rows = node.journal_rows().await;
    // Status reports.
    let rep = |status: &str, deal: u64| -> Vec<u8> {
        let v = json!({"wallet": w, "deal_id": deal, "status": status, "reason": "", "expiry": unix_now() + 60, "nonce": nonce()});
        let r: StatusReport = serde_json::from_value(v).unwrap();
        serde_json::to_vec(&c.sign(&r).unwrap()).unwrap()
    };
    let (s, t) = c.post_raw("/v1/reports", rep("pending", 1)).await.unwrap();
    assert_eq!(s, 400, "{t}");
    assert!(t.contains("status"), "{t}");
    let (s, t) = c.post_raw("/v1/reports", rep("active", 99)).await.unwrap();
    assert_eq!(s, 404, "{t}");
    assert!(t.contains("deal_id"), "{t}");
    let (s, t) = c
        .post_raw("/v1/reports", serde_json::to_vec(&json!({"payload": {"wallet": w, "deal_id": 1, "status": "bogus", "expiry": 1, "nonce": 1}, "signature": "0x"})).unwrap())
        .await
        .unwrap();
    assert_eq!(s, 400, "{t}");
    assert!(t.contains("payload.status"), "{t}");
    let long = StatusReport {
        wallet: w,
        deal_id: 1,
        status: PartyStatus::Failed,
        reason: "x".repeat(300),
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    let (s, _, f) = remote(c.report(&long).await.unwrap_err());
    assert_eq!((s, f.as_deref()), (400, Some("reason")));
    // Ratings and preferences.
    for score in [0u8, 6, 255] {
        let r = Rating {
            wallet: w,
            deal_id: 1,
            score,
            expiry: unix_now() + 60,
            nonce: nonce(),
        };
        let (s, _, f) = remote(c.rate(&r).await.unwrap_err());
        assert_eq!((s, f.as_deref()), (400, Some("score")));
    }
    let p = ipsx_exchange::Preferences {
        wallet: w,
        min_counterparty_rating: 501,
        expiry: unix_now() + 60,
        nonce: nonce(),
    };
    let (s, _, f) = remote(c.set_preferences(&p).await.unwrap_err());
    assert_eq!((s, f.as_deref()), (400, Some("min_counterparty_rating")));
    // Proofs.
    for (body, status, field) in [
        (
            json!({"deal_id": 1, "channel_id": B256::ZERO, "cumulative_amount": "0", "signature": "0x00"}),
            400,
            "cumulative_amount",
        ),
        (
            json!({"deal_id": 1, "channel_id": "0x12", "cumulative_amount": "1", "signature": "0x00"}),
            400,
            "channel_id",
        ),
        (
            json!({"deal_id": 1, "channel_id": B256::ZERO, "cumulative_amount": "1", "signature": "0x00"}),
            401,
            "signature",
        ),
        (
            json!({"deal_id": -1, "channel_id": B256::ZERO, "cumulative_amount": "1", "signature": "0x00"}),
            400,
            "deal_id",
        ),
    ] {
        let (s, t) = c
            .post_raw("/v1/proofs", serde_json::to_vec(&body).unwrap())
            .await
            .unwrap();
        assert_eq!(s, status, "{t}");
        assert!(t.contains(field), "{t}");
    }
    assert_eq!(
        remote(c.post_proof(77, B256::ZERO, 5).await.unwrap_err()).0,
        404
    );
    // Cancel of an unknown order.
    assert_eq!(
        remote(c.cancel(12345).await.unwrap_err()).2.as_deref(),
        Some("order_id")
    );
    assert_eq!(node.journal_rows().await, rows, "nothing written");
    // Batches: too many, and mixed good and bad items answered in order.
    let many: Vec<_> = (0..1001)
        .map(|i| offer(w, (i % 200) as u8 + 1, "de", 1, 1))
        .collect();
    let (s, _, f) = remote(c.post_offers(&many).await.unwrap_err());
    assert_eq!((s, f.as_deref()), (400, Some("orders")));
    let mut bad = offer(w, 2, "de", 1, 1);
    bad.capacity = 0;
    let items = c
        .post_offers(&[offer(w, 1, "de", 1, 1), bad, offer(w, 3, "fr", 9, 1)])
        .await
        .unwrap();
    assert!(matches!(items[0], BatchItem::Ok(_)));
    assert!(matches!(&items[1], BatchItem::Error(e) if e.field.as_deref() == Some("capacity")));
    assert!(matches!(items[2], BatchItem::Ok(_)));
    // Book queries filter.
    let q = |country: Option<&str>, max: Option<&str>| ipsx_exchange::engine::BookQuery {
        country: country.map(|c| c.parse().unwrap()),
        max_price: max.map(str::to_owned),
        ..Default::default()
    };
    assert_eq!(c.book(&q(Some("fr"), None)).await.unwrap().offers.len(), 1);
    assert_eq!(c.book(&q(None, Some("5"))).await.unwrap().offers.len(), 1);
    assert_eq!(c.book(&q(None, None)).await.unwrap().offers.len(), 2);
    let e = reqwest::get(format!("{}/v1/book?max_price=-1", node.url))
        .await
        .unwrap();
    assert_eq!(e.status(), 400);
    assert!(e.text().await.unwrap().contains("max_price"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_write_is_a_503_and_the_node_stops_accepting_writes() {
    let node = Node::start().await;
    let key = PrivateKeySigner::random();
    let c = node.client(&key);
    c.post_offer(&offer(key.address(), 1, "de", 1, 1))
        .await
        .unwrap();
    // Break the journal underneath the node.
    let pool = sqlx::SqlitePool::connect(&node.database).await.unwrap();
    sqlx::query("DROP TABLE journal")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (status, code, _) = remote(
        c.post_offer(&offer(key.address(), 2, "de", 1, 1))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (503, "storage"));
    // Even once the table is back, the node refuses writes rather than diverge from disk.
    let pool = sqlx::SqlitePool::connect(&node.database).await.unwrap();
    sqlx::query("CREATE TABLE journal (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (status, _, _) = remote(
        c.post_offer(&offer(key.address(), 3, "de", 1, 1))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 503);
    // Reads are refused too: memory holds an offer the journal lost.
    assert_eq!(
        remote(c.book(&Default::default()).await.unwrap_err()).0,
        503
    );
    node.stop().await;
}

/// A deal between two fresh wallets (requester funded with `funds`), both sides active.
async fn active_deal(node: &Node, funds: u128) -> (PrivateKeySigner, PrivateKeySigner, u64) {
    let (p, r) = (PrivateKeySigner::random(), PrivateKeySigner::random());
    let (cp, cr) = (node.client(&p), node.client(&r));
    node.fund(r.address(), funds);
    cp.post_offer(&offer(p.address(), 5, "nl", 2, 1))
        .await
        .unwrap();
    let Outcome::RequestPosted { deals, .. } = cr
        .post_request(&request(r.address(), 1, "nl", 5, 60))
        .await
        .unwrap()
    else {
        panic!()
    };
    let id = deals[0];
    for (c, k) in [(&cp, &p), (&cr, &r)] {
        for status in [PartyStatus::Accepted, PartyStatus::Active] {
            c.report(&StatusReport {
                wallet: k.address(),
                deal_id: id,
                status,
                reason: String::new(),
                expiry: unix_now() + 60,
                nonce: nonce(),
            })
            .await
            .unwrap();
        }
    }
    (p, r, id)
}

fn ext(w: Address, deal_id: u64, new_end: u64) -> Extend {
    Extend {
        wallet: w,
        deal_id,
        new_end,
        expiry: unix_now() + 60,
        nonce: nonce(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_parties_extend_a_deal_and_both_streams_see_it() {
    let node = Node::start().await;
    let (p, r, id) = active_deal(&node, 1_000).await;
    let (cp, cr) = (node.client(&p), node.client(&r));
    let mut ps = cp.events(p.address(), 0).await.unwrap();
    let mut rs = cr.events(r.address(), 0).await.unwrap();
    let d = cr.deal(id).await.unwrap();
    let new_end = d.terms.end + 30;
    let out = cr.extend(&ext(r.address(), id, new_end)).await.unwrap();
    assert_eq!(
        out,
        Outcome::Extend {
            deal_id: id,
            new_end,
            extended: false
        }
    );
    // Price 2: 120 for the deal, 60 more held for the proposal.
    assert_eq!(cr.profile(r.address()).await.unwrap().held, 180);
    let out = cp.extend(&ext(p.address(), id, new_end)).await.unwrap();
    assert!(matches!(out, Outcome::Extend { extended: true, .. }));
    let after = cr.deal(id).await.unwrap();
    assert_eq!(
        (after.terms.end, after.terms.duration_s, after.terms.value),
        (new_end, 90, 180)
    );
    assert_eq!(after.terms.start, d.terms.start);
    assert_eq!(after.terms.exit_address, d.terms.exit_address);
    for s in [&mut ps, &mut rs] {
        let mut seen = Vec::new();
        while !matches!(
            seen.last(),
            Some(ipsx_exchange::engine::EventKind::Extended { .. })
        ) {
            let ev = tokio::time::timeout(std::time::Duration::from_secs(20), s.next())
                .await
                .expect("event within 20 s")
                .expect("stream open")
                .unwrap();
            seen.push(ev.kind);
        }
        let n = seen.len();
        assert!(
            matches!(
                &seen[n - 3..],
                [
                    ipsx_exchange::engine::EventKind::ExtendProposed { actor: ipsx_exchange::engine::Actor::Requester, new_end: a },
                    ipsx_exchange::engine::EventKind::ExtendProposed { actor: ipsx_exchange::engine::Actor::Provider, new_end: b },
                    ipsx_exchange::engine::EventKind::Extended { terms },
                ] if *a == new_end && *b == new_end && terms.end == new_end
            ),
            "{seen:?}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extension_route_refuses_hostile_bodies_and_writes_nothing() {
    let node = Node::start().await;
    let (p, r, id) = active_deal(&node, 1_000).await;
    let (cp, cr) = (node.client(&p), node.client(&r));
    let stranger = PrivateKeySigner::random();
    let cs = node.client(&stranger);
    let end = cr.deal(id).await.unwrap().terms.end;
    let start = cr.deal(id).await.unwrap().terms.start;
    // One accepted proposal, so its nonce can be replayed.
    let first = cr.sign(&ext(r.address(), id, end + 10)).unwrap();
    let (s, t) = cr
        .post_raw("/v1/extensions", serde_json::to_vec(&first).unwrap())
        .await
        .unwrap();
    assert_eq!(s, 200, "{t}");
    let rows = node.journal_rows().await;
    let held = cr.profile(r.address()).await.unwrap().held;
    let signed =
        |c: &ipsx_exchange::Client, e: Extend| serde_json::to_vec(&c.sign(&e).unwrap()).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v =
            serde_json::to_value(cr.sign(&ext(r.address(), id, end + 20)).unwrap()).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let forged = serde_json::to_vec(&SignedMessage {
        payload: ext(r.address(), id, end + 20),
        signature: cs.sign(&ext(r.address(), id, end + 20)).unwrap().signature,
    })
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed json", b"{\"payload\": {".to_vec(), 400, ""),
        ("empty object", b"{}".to_vec(), 400, "payload"),
        (
            "unknown top-level field",
            with(&|v| v["extra"] = json!(1)),
            400,
            "extra",
        ),
        (
            "unknown payload field",
            with(&|v| v["payload"]["colour"] = json!("red")),
            400,
            "colour",
        ),
        (
            "missing new_end",
            with(&|v| {
                v["payload"].as_object_mut().unwrap().remove("new_end");
            }),
            400,
            "new_end",
        ),
        (
            "new_end not a number",
            with(&|v| v["payload"]["new_end"] = json!("soon")),
            400,
            "new_end",
        ),
        (
            "new_end negative",
            with(&|v| v["payload"]["new_end"] = json!(-1)),
            400,
            "new_end",
        ),
        (
            "new_end past 64 bits",
            with(&|v| v["payload"]["new_end"] = json!(1.0e20)),
            400,
            "new_end",
        ),
        (
            "tampered new_end",
            with(&|v| v["payload"]["new_end"] = json!(end + 21)),
            401,
            "signature",
        ),
        ("forged signature", forged, 401, "signature"),
        (
            "replayed nonce",
            serde_json::to_vec(&first).unwrap(),
            409,
            "nonce",
        ),
        (
            "new_end in the past",
            signed(&cr, ext(r.address(), id, unix_now() - 5)),
            400,
            "new_end",
        ),
        (
            "new_end before the end",
            signed(&cr, ext(r.address(), id, end - 1)),
            400,
            "new_end",
        ),
        (
            "new_end at the end",
            signed(&cr, ext(r.address(), id, end)),
            400,
            "new_end",
        ),
        (
            "beyond 30 days",
            signed(&cr, ext(r.address(), id, start + 30 * 24 * 3600 + 1)),
            400,
            "new_end",
        ),
        (
            "overflow",
            signed(&cr, ext(r.address(), id, u64::MAX)),
            400,
            "new_end",
        ),
        (
            "more than the balance",
            signed(&cr, ext(r.address(), id, end + 500)),
            402,
            "new_end",
        ),
        (
            "a stranger's deal",
            signed(&cs, ext(stranger.address(), id, end + 20)),
            403,
            "wallet",
        ),
        (
            "no such deal",
            signed(&cr, ext(r.address(), id + 1000, end + 20)),
            404,
            "deal_id",
        ),
        (
            "expired",
            signed(
                &cr,
                Extend {
                    expiry: unix_now() - 1,
                    ..ext(r.address(), id, end + 20)
                },
            ),
            400,
            "expiry",
        ),
    ];
    for (name, body, status, field) in cases {
        let (s, t) = cr.post_raw("/v1/extensions", body).await.unwrap();
        assert_eq!(s, status, "{name}: {t}");
        assert!(t.contains(field), "{name}: {t}");
    }
    assert_eq!(node.journal_rows().await, rows, "nothing written");
    assert_eq!(cr.profile(r.address()).await.unwrap().held, held);
    let d = cp.deal(id).await.unwrap();
    assert_eq!(
        (d.terms.end, d.requester_new_end, d.provider_new_end),
        (end, Some(end + 10), None)
    );
    node.stop().await;
}

// === issue 11 part 4: an exchange strangers cannot flood ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_signed_for_another_exchange_node_is_refused() {
    let (ca, cb) = (Address::repeat_byte(0xa1), Address::repeat_byte(0xb2));
    let a = Node::start_configured(|c| c.centralizer = ca).await;
    let b = Node::start_configured(|c| c.centralizer = cb).await;
    let key = PrivateKeySigner::random();
    // The client learns A's domain from A itself.
    let for_a = ipsx_exchange::Client::connect(&a.url)
        .await
        .unwrap()
        .with_key(key.clone());
    let info = for_a.info().await.unwrap();
    assert_eq!((info.chain_id, info.centralizer), (31337, ca));
    assert_eq!(for_a.domain().verifying_contract, Some(ca));
    let signed = for_a.sign(&offer(key.address(), 1, "de", 5, 1)).unwrap();

    let to_b = b.anonymous();
    let err = to_b
        .post_json::<_, Outcome>("/v1/offers", &signed)
        .await
        .unwrap_err();
    let msg = err.to_string();
    let (status, code, field) = remote(err);
    assert_eq!((status, code.as_str()), (401, "bad_signature"), "{msg}");
    assert_eq!(field.as_deref(), Some("signature"));
    assert!(msg.contains("another exchange node"), "{msg}");
    assert!(
        msg.contains(&cb.to_string()),
        "names B's verifyingContract: {msg}"
    );
    // The very same bytes are good at A.
    let out: Outcome = a
        .anonymous()
        .post_json("/v1/offers", &signed)
        .await
        .unwrap();
    assert!(matches!(out, Outcome::OfferPosted { .. }), "{out:?}");
    a.stop().await;
    b.stop().await;
}

/// Builds the `eth_signTypedData_v4` document of `payload` from the published
/// definitions only (types, domain, member sources), as a wallet library would.
fn typed_document(x: &Value, primary: &str, payload: &Value, chain_id: u64, vc: Address) -> Value {
    use base64::Engine as _;
    let spec = &x["messages"][primary];
    let mut message = serde_json::Map::new();
    for m in spec["members"].as_array().unwrap() {
        let field = m["field"].as_str().unwrap();
        let v = match payload.get(field) {
            Some(v) if !v.is_null() => v.clone(),
            _ => m
                .get("default")
                .cloned()
                .unwrap_or_else(|| panic!("{primary}.{field} absent and no default")),
        };
        let v = match m["encoding"].as_str().unwrap() {
            "base64_bytes32" => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap())
                    .unwrap();
                json!(format!("0x{}", alloy_primitives::hex::encode(raw)))
            }
            "address" | "text" | "number" | "decimal" | "list" => v,
            other => panic!("unknown encoding {other}"),
        };
        message.insert(m["member"].as_str().unwrap().to_owned(), v);
    }
    let mut types = serde_json::Map::new();
    types.insert("EIP712Domain".into(), x["types"]["EIP712Domain"].clone());
    types.insert(primary.into(), x["types"][primary].clone());
    json!({
        "types": types,
        "primaryType": primary,
        "domain": {
            "name": x["domain"]["name"], "version": x["domain"]["version"],
            "chainId": chain_id, "verifyingContract": vc.to_string()
        },
        "message": message,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_typed_data_hashes_as_the_rust_signer_does() {
    use ipsx_exchange::sign::Signed;
    let vc = Address::repeat_byte(0x5f);
    let node = Node::start_configured(|c| c.centralizer = vc).await;
    let doc = node.anonymous().openapi().await.unwrap();
    let x = &doc["x-eip712"];
    let domain = sign::exchange_domain(31337, vc);
    let w = Address::repeat_byte(3);
    let mut full = offer(w, 9, "fr", 12345, 3);
    full.region = Some("idf".into());
    let mut bare = offer(w, 9, "fr", 12345, 3);
    bare.city = None;
    bare.asn = None;
    let mut req = request(w, 2, "de", 77, 600);
    req.asns = vec![3320, 1];
    req.exclude_providers = vec![Address::repeat_byte(9)];
    let check = |primary: &str, payload: Value, rust: B256| {
        let d = typed_document(x, primary, &payload, 31337, vc);
        let typed: alloy_dyn_abi::TypedData =
            serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{primary}: {e}\n{d:#}"));
        assert_eq!(
            typed.eip712_signing_hash().unwrap(),
            rust,
            "{primary}: {d:#}"
        );
    };
    for o in [&full, &bare] {
        check(
            "Offer",
            serde_json::to_value(o).unwrap(),
            o.signing_hash(&domain),
        );
    }
    for r in [&req, &request(w, 1, "us", 5, 60)] {
        check(
            "Request",
            serde_json::to_value(r).unwrap(),
            r.signing_hash(&domain),
        );
    }
    let cancel = ipsx_exchange::Cancel {
        wallet: w,
        order_id: 4,
        expiry: 9,
        nonce: 2,
    };
    check(
        "Cancel",
        serde_json::to_value(&cancel).unwrap(),
        cancel.signing_hash(&domain),
    );
    for reason in ["", "exit unreachable"] {
        let r = StatusReport {
            wallet: w,
            deal_id: 7,
            status: PartyStatus::Failed,
            reason: reason.into(),
            expiry: 9,
            nonce: 3,
        };
        check(
            "StatusReport",
            serde_json::to_value(&r).unwrap(),
            r.signing_hash(&domain),
        );
    }
    for path in [
        ipsx_exchange::DealPath::Direct,
        ipsx_exchange::DealPath::Relayed,
    ] {
        let r = ipsx_exchange::EndpointReport {
            wallet: w,
            deal_id: 7,
            endpoint: "203.0.113.7:51820".parse().unwrap(),
            path,
            expiry: 9,
            nonce: 3,
        };
        check(
            "EndpointReport",
            serde_json::to_value(&r).unwrap(),
            r.signing_hash(&domain),
        );
    }
    let e = Extend {
        wallet: w,
        deal_id: 7,
        new_end: 99,
        expiry: 9,
        nonce: 4,
    };
    check(
        "Extend",
        serde_json::to_value(&e).unwrap(),
        e.signing_hash(&domain),
    );
    let r = Rating {
        wallet: w,
        deal_id: 7,
        score: 5,
        expiry: 9,
        nonce: 5,
    };
    check(
        "Rating",
        serde_json::to_value(&r).unwrap(),
        r.signing_hash(&domain),
    );
    let p = ipsx_exchange::Preferences {
        wallet: w,
        min_counterparty_rating: 300,
        expiry: 9,
        nonce: 6,
    };
    check(
        "Preferences",
        serde_json::to_value(&p).unwrap(),
        p.signing_hash(&domain),
    );
    // Every primary type is documented with its route.
    let primaries: Vec<&str> = x["primaryTypes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(primaries.len(), 8);
    for p in primaries {
        assert!(
            x["messages"][p]["route"]
                .as_str()
                .unwrap()
                .starts_with("/v1/"),
            "{p}"
        );
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_caps_rates_and_stream_caps_answer_429_naming_the_key() {
    let node = Node::start_configured(|c| {
        c.limits.max_open_orders_per_wallet = 3;
        c.limits.max_nonces_per_wallet = 5;
        c.limits.max_subscribers_per_wallet = 1;
        c.limits.max_subscribers = 2;
    })
    .await;
    let key = PrivateKeySigner::random();
    let c = node.client(&key);
    for i in 0..3 {
        c.post_offer(&offer(key.address(), i + 1, "de", 5, 1))
            .await
            .unwrap();
    }
    let (status, code, field) = remote(
        c.post_offer(&offer(key.address(), 4, "de", 5, 1))
            .await
            .unwrap_err(),
    );
    assert_eq!((status, code.as_str()), (429, "limited"));
    assert_eq!(field.as_deref(), Some("limits.max_open_orders_per_wallet"));
    // Cancels hold nonces too: 3 offers + 2 cancels = 5 nonces, the 6th message is refused.
    let book = c
        .book(&ipsx_exchange::engine::BookQuery {
            wallet: Some(key.address()),
            ..Default::default()
        })
        .await
        .unwrap();
    for o in book.offers.iter().take(2) {
        c.cancel(o.order_id).await.unwrap();
    }
    let (status, _, field) = remote(
        c.post_offer(&offer(key.address(), 5, "de", 5, 1))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, field.as_deref()),
        (429, Some("limits.max_nonces_per_wallet"))
    );
    let journal = node.journal_rows().await;

    // Event streams: one per wallet, two in total.
    let (w1, w2, w3) = (
        Address::repeat_byte(1),
        Address::repeat_byte(2),
        Address::repeat_byte(3),
    );
    let anon = node.anonymous();
    let s1 = anon.events(w1, 0).await.unwrap();
    let (status, _, field) = remote(anon.events(w1, 0).await.unwrap_err());
    assert_eq!(
        (status, field.as_deref()),
        (429, Some("limits.max_subscribers_per_wallet"))
    );
    let s2 = anon.events(w2, 0).await.unwrap();
    let (_, _, field) = remote(anon.events(w3, 0).await.unwrap_err());
    assert_eq!(field.as_deref(), Some("limits.max_subscribers"));
    drop(s1);
    // The slot frees when the server notices the stream is gone (bounded wait).
    let mut reopened = None;
    for _ in 0..100 {
        match anon.events(w1, 0).await {
            Ok(s) => {
                reopened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert!(reopened.is_some(), "a closed stream's slot is freed");
    drop(s2);
    assert_eq!(node.journal_rows().await, journal, "refusals write nothing");
    node.stop().await;
}

/// Key `i` of a fresh random family (libsecp256k1: the pure-Rust signer is too slow in
/// a debug build for 10^5 keys) and its wallet address.
fn fresh_key(seed: B256, i: usize) -> (secp256k1::SecretKey, Address) {
    let bytes = alloy_primitives::keccak256([seed.as_slice(), &i.to_be_bytes()].concat());
    let sk = secp256k1::SecretKey::from_byte_array(bytes.0).unwrap();
    let pk = secp256k1::PublicKey::from_secret_key_global(&sk).serialize_uncompressed();
    let digest = alloy_primitives::keccak256(&pk[1..]);
    (sk, Address::from_slice(&digest[12..]))
}

/// `r || s || v` (v 27/28; libsecp256k1 signs with low s).
fn sign_fast(sk: &secp256k1::SecretKey, hash: &B256) -> String {
    let (id, rs) = secp256k1::SECP256K1
        .sign_ecdsa_recoverable(secp256k1::Message::from_digest(hash.0), sk)
        .serialize_compact();
    let mut raw = rs.to_vec();
    raw.push(27 + i32::from(id) as u8);
    alloy_primitives::hex::encode_prefixed(raw)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// QUALITY.md case 29: offers, each signed by a fresh key, sent as fast as the client
/// can: the journal and memory stay bounded by the client address's rate, and an honest
/// provider (another address) is still accepted. 100,000 offers (`IPSX_FLOOD_OFFERS`
/// sets another count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_offers_from_fresh_keys_stay_bounded() {
    let n: usize = std::env::var("IPSX_FLOOD_OFFERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let node = Node::start_configured(|c| {
        c.limits.client_rate_per_s = 1;
        c.limits.client_burst = 2000;
    })
    .await;
    let anon = node.anonymous();
    use alloy_sol_types::SolStruct;
    use ipsx_exchange::sign::Signed;
    let domain = sign::exchange_domain(31337, node.centralizer);
    let seed = B256::from(PrivateKeySigner::random().to_bytes());
    // Every flood offer is the template with another provider; the provider is the
    // first member of the typed struct, so its EIP-712 hash is the template's encoded
    // data with the first word replaced (the server hashes each one in full; a wrong
    // hash here would show as 401s, and the test requires accepted offers).
    let template = offer(Address::ZERO, 1, "de", 5, 1);
    let separator = domain.hash_struct();
    let encoded = sign::typed_offer(&template).eip712_encode_data();
    let type_hash =
        ipsx_exchange::sign::typed::Offer::eip712_type_hash(&sign::typed_offer(&template));
    let hash_for = |_: &ipsx_exchange::Offer, wallet: Address| -> B256 {
        let mut data = Vec::with_capacity(32 + encoded.len());
        data.extend_from_slice(type_hash.as_slice());
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(wallet.as_slice());
        data.extend_from_slice(&encoded[32..]);
        let struct_hash = alloy_primitives::keccak256(&data);
        alloy_primitives::keccak256(
            [
                &[0x19u8, 0x01][..],
                separator.as_slice(),
                struct_hash.as_slice(),
            ]
            .concat(),
        )
    };
    // Sign everything first (two threads), so the flood arrives at full speed.
    let t0 = std::time::Instant::now();
    let batches: Vec<ipsx_exchange::server::OfferBatch> = std::thread::scope(|s| {
        let half = n / 2;
        let parts: Vec<_> = [(0, half), (half, n)]
            .into_iter()
            .map(|(from, to)| {
                let (template, hash_for) = (&template, &hash_for);
                s.spawn(move || {
                    (from..to)
                        .map(|i| {
                            let (sk, wallet) = fresh_key(seed, i);
                            let mut o = template.clone();
                            o.provider = wallet;
                            SignedMessage {
                                signature: sign_fast(&sk, &hash_for(&o, wallet)),
                                payload: o,
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<_> = parts.into_iter().flat_map(|p| p.join().unwrap()).collect();
        all.chunks(1000)
            .map(|c| ipsx_exchange::server::OfferBatch { orders: c.to_vec() })
            .collect()
    });
    let signing = t0.elapsed();
    let rss_before = rss_kib();
    let t1 = std::time::Instant::now();
    assert_eq!(
        hash_for(
            &batches[0].orders[0].payload,
            batches[0].orders[0].payload.provider
        ),
        batches[0].orders[0].payload.signing_hash(&domain)
    );
    let (mut accepted, mut refused_calls) = (0usize, 0usize);
    for b in &batches {
        match anon
            .post_json::<_, Vec<BatchItem>>("/v1/offers/batch", b)
            .await
        {
            Ok(items) => {
                accepted += items
                    .iter()
                    .filter(|i| matches!(i, BatchItem::Ok(_)))
                    .count()
            }
            Err(e) => {
                let (status, _, field) = remote(e);
                assert_eq!(status, 429);
                assert!(field.unwrap().starts_with("limits.client_"));
                refused_calls += 1;
            }
        }
    }
    let flood = t1.elapsed();
    drop(batches);
    let rss_after = rss_kib();
    let rows = node.journal_rows().await;
    // The flood spent this client address's burst: wait for its rate to allow a read.
    let mut tries = 0;
    let book = loop {
        match node
            .anonymous()
            .book(&ipsx_exchange::engine::BookQuery {
                limit: Some(1000),
                ..Default::default()
            })
            .await
        {
            Ok(b) => break b,
            Err(e) if tries < 20 => {
                let (status, _, field) = remote(e);
                assert_eq!(
                    (status, field.as_deref()),
                    (429, Some("limits.client_rate_per_s"))
                );
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("book after the flood: {e}"),
        }
    };
    println!(
        "flood: {n} offers from fresh keys (signed in {signing:?}) sent in {flood:?}: \
         {accepted} accepted, {refused_calls} batch calls refused 429; journal rows {rows}; \
         RSS {rss_before} KiB -> {rss_after} KiB"
    );
    // The bound is the client's burst plus its rate over the flood's duration.
    let bound = 2000 + flood.as_secs() as usize + 2;
    assert!(
        accepted >= 2000,
        "the burst's worth of valid offers is accepted: {accepted}"
    );
    assert!(accepted <= bound, "{accepted} accepted > {bound}");
    assert!(rows <= bound + 16, "journal rows {rows} > {bound}");
    assert!(book.offers.len() <= bound);
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );

    // An honest provider from another address is served.
    let http = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let honest = PrivateKeySigner::random();
    let c = node.client(&honest).with_http(http);
    let out = c
        .post_offer(&offer(honest.address(), 1, "fr", 5, 1))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::OfferPosted { .. }), "{out:?}");
    node.stop().await;
}
