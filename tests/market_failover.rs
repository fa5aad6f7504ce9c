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
use ipsx_exchange_client::chain::parse_tokens;
use ipsx_exchange_client::chain::testing::Anvil;

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

/// A TCP forwarder that can be cut and restored: the chain RPC "going down".
struct Forwarder {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    async fn start(to: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused-like failure
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, up }
    }

    fn set(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The whole market in this process: chain, exchange, DE providers, gateway + market.
struct System {
    dir: std::path::PathBuf,
    anvil: Anvil,
    exchange_addr: std::net::SocketAddr,
    exchange_toml: String,
    exchange: tokio::task::JoinHandle<Result<(), ipsx_exchange::ExchangeError>>,
    echo: Echo,
    agents: Vec<ipsx_provider::AgentHandle>,
    gw: TestGateway,
    market: ipsx_market::PoolManager,
    rpc: Forwarder,
}

impl System {
    async fn start(exits: &[&str]) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("ipsx-market-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let anvil = Anvil::spawn().expect("anvil (scripts/install-chain.sh installs it)");
        let requester = anvil.key(1);
        let deployment = anvil.deploy_with_treasury(9).await.unwrap().deployment;
        let deployment_path = dir.join("deployment.json");
        deployment.save(&deployment_path).unwrap();
        anvil
            .fund_and_deposit(
                deployment,
                1,
                parse_tokens("10000").unwrap(),
                parse_tokens("5000").unwrap(),
            )
            .await
            .unwrap();

        let exchange_toml = format!(
            "chain_id = {}\ndatabase = \"sqlite://{}\"\nrpc_url = \"{}\"\ncentralizer = \"{:#x}\"\n",
            deployment.chain_id,
            dir.join("exchange.db").display(),
            anvil.endpoint(),
            deployment.centralizer
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let exchange_addr = listener.local_addr().unwrap();
        let exchange_url = format!("http://{exchange_addr}");
        let exchange = tokio::spawn(ipsx_exchange::serve(
            listener,
            ipsx_exchange::ExchangeConfig::from_toml(&exchange_toml).unwrap(),
            std::future::pending(),
        ));

        let echo = Echo::start().await;
        let mut agents = Vec::new();
        for (i, exit) in exits.iter().enumerate() {
            let toml = agent_toml(
                &exchange_url,
                anvil.endpoint(),
                &deployment_path,
                &anvil.key(2 + i),
                exit,
            );
            agents.push(
                ipsx_provider::Agent::start(ipsx_provider::AgentConfig::from_toml(&toml).unwrap())
                    .await
                    .unwrap(),
            );
        }
        // The gateway's market reaches the chain through a forwarder the test can cut.
        let rpc = Forwarder::start(
            anvil
                .endpoint()
                .trim_start_matches("http://")
                .parse()
                .unwrap(),
        )
        .await;
        let gateway_toml = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nconnect_timeout = \"2s\"\nverify_url = \"http://{}/ip.txt\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n[market]\nexchange_url = \"{exchange_url}\"\nrpc_url = \"http://{}\"\ndeployment = \"{}\"\nprivate_key = \"{}\"\nmax_price_per_ip_second = \"2000000000000\"\ndeal_duration = \"5m\"\npayment_window = \"30s\"\nproof_interval = \"1s\"\ndead_after = \"2s\"\nrent_on_demand = false\n\n[[market.demand]]\nname = \"de\"\ntarget = {{ country = \"de\" }}\ncount = 1\n",
            echo.addr,
            rpc.addr,
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
        let system = Self {
            dir,
            anvil,
            exchange_addr,
            exchange_toml,
            exchange,
            echo,
            agents,
            gw,
            market,
            rpc,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while system.live_exits() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            system.live_exits(),
            1,
            "an exit was rented: {:?}",
            system.market.status()
        );
        system
    }

    fn live_exits(&self) -> usize {
        self.gw
            .gateway
            .rotator()
            .exits()
            .into_iter()
            .filter(|e| e.healthy)
            .count()
    }

    async fn get(&self) -> String {
        let out = curl(&[
            "-s",
            "-i",
            "--max-time",
            "15",
            "-x",
            &self.gw.proxy("acct-country-de"),
            &self.echo.url(),
        ])
        .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn stop(self) {
        self.market.shutdown().await;
        for a in self.agents {
            let _ = a.shutdown().await;
        }
        self.exchange.abort();
        drop(self.anvil);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip_of(response: &str) -> Option<String> {
    if !response.starts_with("HTTP/1.1 200") {
        return None;
    }
    echo_ips(response.split("\r\n\r\n").nth(1).unwrap_or("").as_bytes()).pop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rented_exit_is_replaced_with_one_matching_the_same_filter() {
    let mut sys = System::start(&["127.0.0.2", "127.0.0.3"]).await;
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
        replaced.unwrap_or_else(|| panic!("no replacement; market: {:?}", sys.market.status()));
    assert_ne!(replaced, first_ip);
    let status = sys.market.status();
    assert!(
        status
            .deals
            .iter()
            .any(|d| d["note"].as_str().unwrap_or("").contains("unhealthy")),
        "{status:?}"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_restart_and_chain_outage_do_not_disturb_rented_exits() {
    let mut sys = System::start(&["127.0.0.2"]).await;
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
    let paid_before: u128 = sys.market.status().deals[0]["paid"]
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
        paid_after = sys.market.status().deals[0]["paid"]
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
    let status = sys.market.status();
    assert_eq!(status.deals.len(), 1, "nothing rented twice: {status:?}");
    sys.stop().await;
}
