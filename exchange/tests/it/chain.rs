//! The real balance source against a real chain (anvil): alloy provider, the `sol!`
//! interface of the Centralizer's views, and the API's funds check on top of it.
//!
//! The contract here is a 11-byte stand-in put at an address with `anvil_setCode` that
//! answers every call with 1000: it exercises the exact ABI encoding, JSON-RPC and
//! decoding path of `balance(address)` / `reserved(address)` without the Centralizer's
//! artifacts (built on the chain branch). Ignored until `scripts/install-chain.sh` (chain
//! branch) is merged; run with `cargo test -p ipsx-exchange --test chain -- --ignored`
//! (set `ANVIL=/path/to/anvil` if it is not under `contracts/node_modules`).
#![allow(clippy::unwrap_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use alloy_primitives::{Address, U256};
use alloy_signer_local::PrivateKeySigner;
use common::request;
use ipsx_exchange::{BalanceSource, ChainBalances, Client, ExchangeConfig, ExchangeError};

struct Anvil {
    child: Child,
    url: String,
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn anvil_path() -> PathBuf {
    if let Ok(p) = std::env::var("ANVIL") {
        return PathBuf::from(p);
    }
    let modules =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../contracts/node_modules/@foundry-rs");
    for arch in ["amd64", "arm64"] {
        let p = modules.join(format!("anvil-linux-{arch}/bin/anvil"));
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("anvil")
}

fn start_anvil() -> Anvil {
    let child = Command::new(anvil_path())
        .args(["--port", "0", "--host", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("anvil: run scripts/install-chain.sh or set ANVIL");
    // The guard owns the child at once: killed and waited for even if this panics.
    let mut anvil = Anvil {
        child,
        url: String::new(),
    };
    let out = BufReader::new(anvil.child.stdout.take().unwrap());
    for line in out.lines().take(200) {
        let line = line.unwrap();
        if let Some(addr) = line.strip_prefix("Listening on ") {
            anvil.url = format!("http://{}", addr.trim());
            return anvil;
        }
    }
    panic!("anvil did not report its address");
}

async fn rpc(url: &str, method: &str, params: serde_json::Value) -> serde_json::Value {
    reqwest::Client::new()
        .post(url)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runtime code answering every call with uint256(1000):
/// PUSH2 0x03e8, PUSH1 0, MSTORE, PUSH1 32, PUSH1 0, RETURN.
const RETURNS_1000: &str = "0x6103e860005260206000f3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_come_from_the_chain_through_alloy() {
    let anvil = start_anvil();
    let contract = Address::repeat_byte(0xce);
    let r = rpc(
        &anvil.url,
        "anvil_setCode",
        serde_json::json!([contract, RETURNS_1000]),
    )
    .await;
    assert!(r.get("error").is_none(), "{r}");
    let chain = ChainBalances::new(&anvil.url, contract).unwrap();
    let w = Address::repeat_byte(7);
    assert_eq!(chain.balance(w).await.unwrap(), U256::from(1000));
    assert_eq!(chain.reserved(w).await.unwrap(), U256::from(1000));
    // An address without code answers nothing decodable: a chain error, not a panic.
    let empty = ChainBalances::new(&anvil.url, Address::repeat_byte(0x11)).unwrap();
    assert!(matches!(
        empty.balance(w).await,
        Err(ExchangeError::Chain(_))
    ));

    // The API's funds check on top of the chain read: 1000 covers one 600 request only.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ExchangeConfig::for_tests(
        format!("sqlite://{}/j.db", dir.path().display()),
        Default::default(),
    );
    cfg.static_balances = None;
    cfg.rpc_url = Some(anvil.url.clone());
    cfg.centralizer = contract;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ipsx_exchange::serve(listener, cfg, async {
        let _ = stopped.await;
    }));
    let key = PrivateKeySigner::random();
    let c = Client::new(&format!("http://{addr}"), 31337, contract)
        .unwrap()
        .with_key(key.clone());
    let mut first = None;
    for _ in 0..100 {
        match c
            .post_request(&request(key.address(), 1, "de", 10, 60))
            .await
        {
            Err(ExchangeError::Transport(_)) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => {
                first = Some(other);
                break;
            }
        }
    }
    first.unwrap().unwrap();
    let e = c
        .post_request(&request(key.address(), 1, "de", 10, 60))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ExchangeError::Remote { status: 402, .. }),
        "{e}"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// Posts a matching offer and request (one IP for 60 s at `price`) and returns the deal.
async fn one_deal(
    provider: &Client,
    requester: &Client,
    last: u8,
    price: u128,
) -> ipsx_exchange::Deal {
    let p = provider.wallet().unwrap();
    let r = requester.wallet().unwrap();
    provider
        .post_offer(&common::offer(p, last, "de", price, 1))
        .await
        .unwrap();
    let out = requester
        .post_request(&request(r, 1, "de", price, 60))
        .await
        .unwrap();
    let ipsx_exchange::Outcome::RequestPosted { deals, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(deals.len(), 1, "{deals:?}");
    requester.deal(deals[0]).await.unwrap()
}

/// The commission in a deal's terms is the Centralizer's `feeBps`, read from the chain, and
/// follows the owner's `setFee`: deals matched after the change carry the new fee, deals
/// matched before keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deals_carry_the_centralizers_fee_and_follow_set_fee() {
    use ipsx_exchange::types::commission;
    let anvil = ipsx_chain::testing::Anvil::spawn().unwrap();
    let dep = anvil.deploy_default().await.unwrap().deployment;
    let tokens = U256::from(10u128.pow(24));
    anvil
        .fund_and_deposit(dep, 1, tokens, tokens)
        .await
        .unwrap();
    let owner = ipsx_chain::ChainClient::connect(anvil.endpoint(), dep, anvil.key(0))
        .await
        .unwrap();
    let initial = owner.fee_bps().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ExchangeConfig::for_tests(
        format!("sqlite://{}/j.db", dir.path().display()),
        Default::default(),
    );
    cfg.static_balances = None;
    cfg.rpc_url = Some(anvil.endpoint().to_owned());
    cfg.chain_id = anvil.chain_id();
    cfg.centralizer = dep.centralizer;
    // The engine's own default must not be what the deals show.
    assert_ne!(cfg.engine.commission_bps, initial);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(ipsx_exchange::server::serve_ready(
        listener,
        cfg,
        async {
            let _ = stopped.await;
        },
        ready_tx,
    ));
    ready.await.unwrap();
    let provider = Client::new(&url, anvil.chain_id(), dep.centralizer)
        .unwrap()
        .with_key(anvil.key(2));
    let requester = Client::new(&url, anvil.chain_id(), dep.centralizer)
        .unwrap()
        .with_key(anvil.key(1));
    assert_eq!(requester.info().await.unwrap().commission_bps, initial);

    let price = 1_000_000_000_000u128;
    let before = one_deal(&provider, &requester, 1, price).await;
    assert_eq!(before.terms.value, price * 60);
    assert_eq!(
        before.terms.commission,
        commission(before.terms.value, initial)
    );

    let changed = if initial == 700 { 300 } else { 700 };
    owner.set_fee(changed).await.unwrap();
    // The node re-reads the fee every second: wait (bounded) until it shows.
    let mut seen = 0;
    for _ in 0..300 {
        seen = requester.info().await.unwrap().commission_bps;
        if seen == changed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, changed, "the node never picked up setFee");
    let after = one_deal(&provider, &requester, 2, price).await;
    assert_eq!(
        after.terms.commission,
        commission(after.terms.value, changed)
    );
    assert_ne!(after.terms.commission, before.terms.commission);
    // The earlier deal keeps the fee it was matched at.
    assert_eq!(requester.deal(before.id).await.unwrap().terms, before.terms);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
