//! QUALITY.md case 17 through the market: the provider serving the gateway's rented DE
//! exit goes away; the gateway notices (tunnel health), ends that deal, rents a
//! replacement matching the same filter from another provider, and the scraper sees at
//! most clean errors meanwhile. All real: anvil, the exchange, provider agents with
//! their WireGuard exits, the gateway with its pool manager, curl.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::time::{Duration, Instant};

use common::market::{MarketOpts, MarketSystem, ip_of};

/// Two DE providers (or one), the gateway keeping one DE exit rented.
async fn system(exits: &[&'static str]) -> MarketSystem {
    let sys = MarketSystem::start(MarketOpts {
        exits: exits.iter().map(|e| (*e, "de")).collect(),
        ..MarketOpts::default()
    })
    .await;
    sys.wait_live(1, Duration::from_secs(60)).await;
    sys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rented_exit_is_replaced_with_one_matching_the_same_filter() {
    let mut sys = system(&["127.0.0.2", "127.0.0.3"]).await;
    let first_ip = ip_of(&sys.get().await).expect("served through the rented exit");

    // The provider serving it goes away.
    let gone = sys
        .agents
        .remove(if first_ip == "127.0.0.2" { 0 } else { 1 });
    gone.shutdown().await.unwrap();

    // Requests keep coming: each either works or fails cleanly (5xx with a reason), and
    // soon they work again through the other provider's exit.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut replaced = None;
    while Instant::now() < deadline {
        let text = sys.get().await;
        match ip_of(&text) {
            Some(ip) if ip != first_ip => {
                replaced = Some(ip);
                break;
            }
            Some(_) => {}
            None => assert!(
                text.starts_with("HTTP/1.1 5")
                    && text.to_ascii_lowercase().contains("x-ipsx-error"),
                "not a clean error while the exit was down: {text:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let replaced =
        replaced.unwrap_or_else(|| panic!("no replacement; market: {:?}", sys.market().status()));
    assert_ne!(replaced, first_ip);
    let status = sys.market().status();
    assert!(
        status.deals.iter().any(|d| d["outcome"] == "unhealthy"),
        "{status:?}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_restart_and_chain_outage_do_not_disturb_rented_exits() {
    let mut sys = system(&["127.0.0.2"]).await;
    let ip = ip_of(&sys.get().await).expect("served");

    // Chain RPC down: the rented exit keeps serving (the channel is open; proofs go to
    // the exchange), nothing is rented twice.
    sys.rpc.set(false);
    for _ in 0..5 {
        assert_eq!(ip_of(&sys.get().await).as_deref(), Some(ip.as_str()));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    sys.rpc.set(true);

    // Exchange restarted on the same address from its journal: the gateway resumes its
    // event stream, keeps serving, keeps paying, and makes no second deal.
    let paid_before: u128 = sys.market().status().deals[0]["paid"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    sys.exchange.abort();
    let _ = (&mut sys.exchange).await;
    let listener = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(sys.exchange_addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind the exchange: {e}"),
            }
        }
    };
    assert_eq!(
        ip_of(&sys.get().await).as_deref(),
        Some(ip.as_str()),
        "served while the exchange is down"
    );
    sys.exchange = tokio::spawn(ipsx_exchange::serve(
        listener,
        ipsx_exchange::ExchangeConfig::from_toml(&sys.exchange_toml).unwrap(),
        std::future::pending(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut paid_after = paid_before;
    while Instant::now() < deadline && paid_after <= paid_before {
        tokio::time::sleep(Duration::from_millis(500)).await;
        paid_after = sys.market().status().deals[0]["paid"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    }
    assert!(
        paid_after > paid_before,
        "payments resumed after the restart"
    );
    assert_eq!(ip_of(&sys.get().await).as_deref(), Some(ip.as_str()));
    let status = sys.market().status();
    assert_eq!(status.deals.len(), 1, "nothing rented twice: {status:?}");
    sys.stop().await;
}
