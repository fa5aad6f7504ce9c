//! QUALITY.md case 17 through the market: the provider serving the gateway's rented DE
//! exit goes away; the gateway notices (tunnel health), ends that deal, rents a
//! replacement matching the same filter from another provider, and the scraper sees at
//! most clean errors meanwhile. All real: anvil, the exchange, provider agents with
//! their WireGuard exits, the gateway with its pool manager, curl.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::signers::local::PrivateKeySigner;
use common::*;
use ipsx_exchange_client::chain::testing::Anvil;
use ipsx_exchange_client::chain::{ChainClient, DeployParams, deploy, parse_tokens};

fn hex_key(signer: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(signer.to_bytes()))
}

fn agent_toml(
    exchange: &str,
    rpc: &str,
    deployment: &std::path::Path,
    key: &PrivateKeySigner,
    exit: &str,
) -> String {
    format!(
        "[exchange]\nurl = \"{exchange}\"\n\n[chain]\nrpc_url = \"{rpc}\"\ndeployment = \"{}\"\n\n[wallet]\nprivate_key = \"{}\"\n\n[timings]\npoll = \"1s\"\n\n[[exit]]\nexit_address = \"{exit}\"\nlisten = \"{exit}:0\"\ncountry = \"de\"\ntype = \"residential\"\nprotocols = [\"any\"]\nprice_per_ip_second = \"1000000000000\"\nallow_destinations = [\"127.0.0.0/8\"]\n",
        deployment.display(),
        hex_key(key)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rented_exit_is_replaced_with_one_matching_the_same_filter() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("ipsx-failover-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Chain, contracts, a funded requester.
    let anvil = Anvil::spawn().expect("anvil (scripts/install-chain.sh installs it)");
    let deployer = anvil.key(0);
    let requester = anvil.key(1);
    let params = DeployParams {
        treasury: anvil.key(9).address(),
        ..DeployParams::all_to(deployer.address())
    };
    let deployment = deploy(anvil.endpoint(), deployer.clone(), &params)
        .await
        .unwrap()
        .deployment;
    let deployment_path = dir.join("deployment.json");
    deployment.save(&deployment_path).unwrap();
    let chain0 = ChainClient::connect(anvil.endpoint(), deployment, deployer)
        .await
        .unwrap();
    chain0
        .transfer_tokens(requester.address(), parse_tokens("10000").unwrap())
        .await
        .unwrap();
    let chain1 = ChainClient::connect(anvil.endpoint(), deployment, requester.clone())
        .await
        .unwrap();
    chain1.approve(parse_tokens("5000").unwrap()).await.unwrap();
    chain1.deposit(parse_tokens("5000").unwrap()).await.unwrap();

    // Exchange.
    let exchange_toml = format!(
        "chain_id = {}\ndatabase = \"sqlite://{}\"\nrpc_url = \"{}\"\ncentralizer = \"{:#x}\"\n",
        deployment.chain_id,
        dir.join("exchange.db").display(),
        anvil.endpoint(),
        deployment.centralizer
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exchange_url = format!("http://{}", listener.local_addr().unwrap());
    let exchange = tokio::spawn(ipsx_exchange::serve(
        listener,
        ipsx_exchange::ExchangeConfig::from_toml(&exchange_toml).unwrap(),
        std::future::pending(),
    ));

    // Two DE providers.
    let echo = Echo::start().await;
    let a = ipsx_provider::Agent::start(
        ipsx_provider::AgentConfig::from_toml(&agent_toml(
            &exchange_url,
            anvil.endpoint(),
            &deployment_path,
            &anvil.key(2),
            "127.0.0.2",
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let b = ipsx_provider::Agent::start(
        ipsx_provider::AgentConfig::from_toml(&agent_toml(
            &exchange_url,
            anvil.endpoint(),
            &deployment_path,
            &anvil.key(3),
            "127.0.0.3",
        ))
        .unwrap(),
    )
    .await
    .unwrap();

    // The gateway, keeping one DE exit rented.
    let gateway_toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nconnect_timeout = \"2s\"\nverify_url = \"http://{}/ip.txt\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n[market]\nexchange_url = \"{exchange_url}\"\nrpc_url = \"{}\"\ndeployment = \"{}\"\nprivate_key = \"{}\"\nmax_price_per_ip_second = \"2000000000000\"\ndeal_duration = \"5m\"\npayment_window = \"30s\"\nproof_interval = \"1s\"\ndead_after = \"2s\"\nrent_on_demand = false\n\n[[market.demand]]\nname = \"de\"\ntarget = {{ country = \"de\" }}\ncount = 1\n",
        echo.addr,
        anvil.endpoint(),
        deployment_path.display(),
        hex_key(&requester)
    );
    let gw = TestGateway::start(&gateway_toml).await;
    let config = ipsx_config::GatewayConfig::from_toml(&gateway_toml, "gw.toml").unwrap();
    let market = ipsx_market::PoolManager::start(
        gw.gateway.clone(),
        config.market.clone().unwrap(),
        std::path::Path::new("/"),
        config.listener.verify_url.clone(),
    )
    .await
    .unwrap();

    let live_ip = |gw: &Arc<ipsx_gateway::Gateway>| {
        gw.rotator()
            .exits()
            .into_iter()
            .find(|e| e.healthy)
            .and_then(|e| e.attrs.country.map(|_| e.id.to_string()))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while live_ip(&gw.gateway).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        live_ip(&gw.gateway).is_some(),
        "an exit was rented: {:?}",
        market.status()
    );
    let first = echo_ips(
        &curl(&["-x", &gw.proxy("acct-country-de"), &echo.url()])
            .await
            .stdout,
    );
    assert_eq!(first.len(), 1);
    let first_ip = first[0].clone();

    // The provider serving it goes away.
    let (gone, survivor) = if first_ip == "127.0.0.2" {
        (a, b)
    } else {
        (b, a)
    };
    gone.shutdown().await.unwrap();

    // Requests keep coming: each either works or fails cleanly (5xx with a reason), and
    // soon they work again through the other provider's exit.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut replaced = None;
    while Instant::now() < deadline {
        let out = curl(&[
            "-s",
            "-i",
            "--max-time",
            "15",
            "-x",
            &gw.proxy("acct-country-de"),
            &echo.url(),
        ])
        .await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.starts_with("HTTP/1.1 200") {
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            let ip = echo_ips(body.as_bytes()).pop().unwrap_or_default();
            if ip != first_ip {
                replaced = Some(ip);
                break;
            }
        } else {
            assert!(
                text.starts_with("HTTP/1.1 5")
                    && text.to_ascii_lowercase().contains("x-ipsx-error"),
                "not a clean error while the exit was down: {text:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let replaced =
        replaced.unwrap_or_else(|| panic!("no replacement; market: {:?}", market.status()));
    assert_ne!(replaced, first_ip);
    let status = market.status();
    assert!(
        status
            .deals
            .iter()
            .any(|d| d["note"].as_str().unwrap_or("").contains("unhealthy")),
        "{status:?}"
    );

    market.shutdown().await;
    let _ = survivor.shutdown().await;
    exchange.abort();
    drop(anvil);
    let _ = std::fs::remove_dir_all(&dir);
}
