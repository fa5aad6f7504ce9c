//! API bench: signed orders accepted per second over real HTTP with persistence on
//! (SQLite journal, group commit), server in-process on 127.0.0.1:0. Orders are signed
//! before the clock starts; the server verifies every signature. Prints the figures.
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use alloy_primitives::{Address, U256};
use alloy_signer_local::PrivateKeySigner;
use ipsx_exchange::server::{BatchItem, SignedMessage, unix_now};
use ipsx_exchange::{
    Client, Diversity, ExchangeConfig, MemoryBalances, Offer, Outcome, Protocol, Request, WgKey,
};
use ipsx_rotation::ExitKind;

fn offer(provider: Address, i: u32) -> Offer {
    let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
    Offer {
        provider,
        exit_address: ip,
        country: ["de", "fr", "us", "jp"][(i % 4) as usize].parse().unwrap(),
        region: None,
        city: None,
        asn: Some(3320),
        kind: ExitKind::Residential,
        protocols: vec![Protocol::Any],
        price_per_ip_second: 1 + u128::from(i % 100),
        min_duration_s: 5,
        max_duration_s: 86_400,
        capacity: 1,
        wg_endpoint: SocketAddr::new(ip, 51820),
        wg_public_key: WgKey([1; 32]),
        expiry: unix_now() + 3600,
        nonce: u64::from(i),
    }
}

fn request(requester: Address, i: u32) -> Request {
    Request {
        requester,
        count: 1,
        countries: vec!["gb".parse().unwrap()],
        regions: vec![],
        cities: vec![],
        asns: vec![],
        types: vec![],
        protocols: vec![],
        min_rating: 0,
        diversity: Diversity::None,
        exclude_providers: Vec::new(),
        duration_s: 60,
        max_price_per_ip_second: 10,
        wg_public_key: WgKey([2; 32]),
        expiry: unix_now() + 3600,
        nonce: u64::from(i),
    }
}

async fn fire<T: serde::Serialize + Send + Sync + 'static>(
    url: &str,
    path: &'static str,
    bodies: Vec<T>,
    concurrency: usize,
) -> (f64, usize) {
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (bodies, next, url) = (bodies.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = Client::new(&url, 31337, Address::ZERO).unwrap();
            let mut ok = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(b) = bodies.get(i) else { break };
                if c.post_json::<T, serde_json::Value>(path, b).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    (start.elapsed().as_secs_f64(), ok)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: u32 = if quick { 500 } else { 20_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut cfg = ExchangeConfig::for_tests(format!("sqlite://{}/journal.db", dir.path().display()), Default::default());
        // Throughput of the API itself, not of its flood limits.
        cfg.limits = ipsx_exchange::limits::LimitsConfig::unlimited();
        let balances = MemoryBalances::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let b: Arc<dyn ipsx_exchange::BalanceSource> = Arc::new(balances.clone());
        let server = tokio::spawn(ipsx_exchange::serve_with(listener, cfg, b, async {
            let _ = stopped.await;
        }));
        let probe = reqwest::Client::new();
        for _ in 0..200 {
            if probe.get(format!("{url}/v1/health")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let pk = PrivateKeySigner::random();
        let rk = PrivateKeySigner::random();
        balances.set(rk.address(), U256::MAX);
        let signer = Client::new(&url, 31337, Address::ZERO).unwrap();
        let ps = signer.clone().with_key(pk.clone());
        let rs = signer.with_key(rk.clone());
        let offers: Vec<SignedMessage<Offer>> = (0..n).map(|i| ps.sign(&offer(pk.address(), i)).unwrap()).collect();
        let requests: Vec<SignedMessage<Request>> = (0..n).map(|i| rs.sign(&request(rk.address(), i)).unwrap()).collect();
        let batches: Vec<ipsx_exchange::server::OfferBatch> = (0..n / 100)
            .map(|b| ipsx_exchange::server::OfferBatch {
                orders: (0..100).map(|i| ps.sign(&offer(pk.address(), n + b * 100 + i)).unwrap()).collect(),
            })
            .collect();
        let domain = ipsx_exchange::sign::exchange_domain(31337, Address::ZERO);
        let t = Instant::now();
        for m in offers.iter().take(2000) {
            ipsx_exchange::sign::verify(&m.payload, &m.signature, &domain).unwrap();
        }
        let per = t.elapsed().as_secs_f64() / offers.len().min(2000) as f64;
        println!("EIP-712 hash + ecrecover of one offer: {:.1} us ({:.0} /s on one core)", per * 1e6, 1.0 / per);
        println!("signed orders accepted per second over HTTP, SQLite journal (synchronous=FULL, group commit):");
        let (secs, ok) = fire(&url, "/v1/offers", offers, 64).await;
        println!("  offers, one per call, 64 connections   {:>9.0} /s   ({ok} accepted in {secs:.2} s)", ok as f64 / secs);
        let (secs, ok) = fire(&url, "/v1/requests", requests, 64).await;
        println!("  requests (funds check), 64 connections {:>9.0} /s   ({ok} accepted in {secs:.2} s)", ok as f64 / secs);
        let nb = batches.len();
        let (secs, _) = fire(&url, "/v1/offers/batch", batches, 8).await;
        println!("  offers in batches of 100, 8 connections {:>8.0} /s   ({} offers in {secs:.2} s)", (nb * 100) as f64 / secs, nb * 100);
        println!("  target: 5000 /s");
        let c = Client::new(&url, 31337, Address::ZERO).unwrap();
        let v: Vec<BatchItem> = Vec::new();
        drop(v);
        let _ = c.profile(rk.address()).await.map(|p| assert!(p.held > 0));
        let _: Option<Outcome> = None;
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
}
