//! The whole market in one test process: anvil with the contracts, the exchange on
//! SQLite, provider agents with their WireGuard exits, and the gateway with its pool
//! manager (or the gateway as a child process, for crash tests). All real components.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use ipsx_chain::testing::Anvil;
use ipsx_chain::{ChainClient, DeployParams, Deployment, deploy, parse_tokens};

use super::*;

pub fn hex_key(signer: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(signer.to_bytes()))
}

/// A TCP forwarder that can be cut and restored: the chain RPC "going down".
pub struct Forwarder {
    pub addr: SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    pub async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused-like failure
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, up }
    }

    pub fn set(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

/// What a market system is made of.
pub struct MarketOpts {
    /// Provider exits: (address, country); one agent (wallet) per exit.
    pub exits: Vec<(&'static str, &'static str)>,
    /// Extra `[market]` lines.
    pub market: String,
    /// `[[market.demand]]` blocks.
    pub demand: String,
    /// Extra `[timings]` lines for the agents.
    pub agent_timings: String,
    /// The Centralizer's challenge period.
    pub challenge_secs: u64,
    /// Start the gateway and its pool manager in this process.
    pub gateway: bool,
}

impl Default for MarketOpts {
    fn default() -> Self {
        Self {
            exits: vec![("127.0.0.2", "de")],
            market: "deal_duration = \"5m\"\npayment_window = \"30s\"\nproof_interval = \"1s\"\ndead_after = \"2s\"\nrent_on_demand = false\n".into(),
            demand: "[[market.demand]]\nname = \"de\"\ntarget = { country = \"de\" }\ncount = 1\n".into(),
            agent_timings: String::new(),
            challenge_secs: 3_600,
            gateway: true,
        }
    }
}

/// The chain and the exchange (reached through `Deref`: `sys.anvil`, `sys.exchange_url`),
/// provider agents, an echo target and optionally a gateway with its market.
pub struct MarketSystem {
    pub dir: std::path::PathBuf,
    pub chain: ChainAndExchange,
    pub echo: Echo,
    pub agents: Vec<ipsx_provider::AgentHandle>,
    pub gw: Option<TestGateway>,
    pub market: Option<ipsx_market::PoolManager>,
    pub rpc: Forwarder,
    pub gateway_toml: String,
}

/// Dev key 1 is the requester; agents use keys 2.. ; key 9 is the treasury.
pub const REQUESTER: usize = 1;

/// anvil with the contracts deployed (the requester funded and deposited) and the
/// exchange serving on 127.0.0.1; their files under `dir`.
pub struct ChainAndExchange {
    pub anvil: Anvil,
    pub deployment: Deployment,
    pub deployment_path: std::path::PathBuf,
    pub exchange_addr: SocketAddr,
    pub exchange_url: String,
    pub exchange_toml: String,
    pub exchange: JoinHandle<Result<(), ipsx_exchange::ExchangeError>>,
}

impl ChainAndExchange {
    pub async fn start(dir: &std::path::Path, challenge_secs: u64) -> Self {
        let anvil = Anvil::spawn().expect("anvil (scripts/install-chain.sh installs it)");
        let deployer = anvil.key(0);
        let params = DeployParams {
            treasury: anvil.key(9).address(),
            challenge_period_secs: challenge_secs,
            ..DeployParams::all_to(deployer.address())
        };
        let deployment = deploy(anvil.endpoint(), deployer, &params)
            .await
            .unwrap()
            .deployment;
        let deployment_path = dir.join("deployment.json");
        deployment.save(&deployment_path).unwrap();
        anvil
            .fund_and_deposit(
                deployment,
                REQUESTER,
                parse_tokens("10000").unwrap(),
                parse_tokens("5000").unwrap(),
            )
            .await
            .unwrap();

        let exchange_toml = format!(
            "chain_id = {}\ndatabase = \"sqlite://{}\"\nrpc_url = \"{}\"\ncentralizer = \"{:#x}\"\nallow_private_addresses = true\n",
            deployment.chain_id,
            dir.join("exchange.db").display(),
            anvil.endpoint(),
            deployment.centralizer
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let exchange_addr = listener.local_addr().unwrap();
        let exchange_url = format!("http://{exchange_addr}");
        let exchange = tokio::spawn(ipsx_exchange::serve(
            listener,
            ipsx_exchange::ExchangeConfig::from_toml(&exchange_toml).unwrap(),
            std::future::pending(),
        ));
        Self {
            anvil,
            deployment,
            deployment_path,
            exchange_addr,
            exchange_url,
            exchange_toml,
            exchange,
        }
    }
}

impl std::ops::Deref for MarketSystem {
    type Target = ChainAndExchange;
    fn deref(&self) -> &ChainAndExchange {
        &self.chain
    }
}

impl std::ops::DerefMut for MarketSystem {
    fn deref_mut(&mut self) -> &mut ChainAndExchange {
        &mut self.chain
    }
}

impl MarketSystem {
    pub async fn start(opts: MarketOpts) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("ipsx-market-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chain = ChainAndExchange::start(&dir, opts.challenge_secs).await;
        let (anvil, deployment_path, exchange_url) =
            (&chain.anvil, &chain.deployment_path, &chain.exchange_url);

        let echo = Echo::start().await;
        let mut agents = Vec::new();
        for (i, (exit, country)) in opts.exits.iter().enumerate() {
            let toml = format!(
                "[exchange]\nurl = \"{exchange_url}\"\n\n[chain]\nrpc_url = \"{}\"\ndeployment = \"{}\"\n\n[wallet]\nprivate_key = \"{}\"\n\n[status]\nlisten = \"127.0.0.1:0\"\n\n[connlog]\ndir = \"{}\"\n\n[timings]\npoll = \"1s\"\n{}\n[[exit]]\nexit_address = \"{exit}\"\nlisten = \"{exit}:0\"\ncountry = \"{country}\"\ntype = \"residential\"\nprotocols = [\"any\"]\nprice_per_ip_second = \"1000000000000\"\nallow_destinations = [\"127.0.0.0/8\"]\n",
                anvil.endpoint(),
                deployment_path.display(),
                hex_key(&anvil.key(2 + i)),
                connlog_dir(&dir, i).display(),
                opts.agent_timings,
            );
            agents.push(
                ipsx_provider::Agent::start_with_routes(
                    ipsx_provider::AgentConfig::from_toml(&toml).unwrap(),
                    Some(ipsx_provider::status::page_routes()),
                )
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
            "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nconnect_timeout = \"2s\"\nverify_url = \"http://{}/ip.txt\"\n\n[[token]]\nname = \"t\"\nsecret = \"{TOKEN}\"\n\n[market]\nexchange_url = \"{exchange_url}\"\nrpc_url = \"http://{}\"\ndeployment = \"{}\"\nprivate_key = \"{}\"\nmax_price_per_ip_second = \"2000000000000\"\nstate_file = \"{}\"\n{}\n{}",
            echo.addr,
            rpc.addr,
            deployment_path.display(),
            hex_key(&anvil.key(REQUESTER)),
            dir.join("market-state.db").display(),
            opts.market,
            opts.demand,
        );
        let mut sys = Self {
            dir,
            chain,
            echo,
            agents,
            gw: None,
            market: None,
            rpc,
            gateway_toml,
        };
        if opts.gateway {
            sys.start_gateway().await;
        }
        sys
    }

    /// Starts the gateway and its pool manager in this process.
    pub async fn start_gateway(&mut self) {
        let gw = TestGateway::start(&self.gateway_toml).await;
        let config = GatewayConfig::from_toml(&self.gateway_toml, "gw.toml").unwrap();
        let market = ipsx_market::PoolManager::start(
            gw.gateway.clone(),
            config.market.clone().unwrap(),
            &self.dir,
            config.listener.verify_url.clone(),
        )
        .await
        .unwrap();
        self.gw = Some(gw);
        self.market = Some(market);
    }

    pub fn gw(&self) -> &TestGateway {
        self.gw.as_ref().expect("gateway started")
    }

    pub fn market(&self) -> &ipsx_market::PoolManager {
        self.market.as_ref().expect("gateway started")
    }

    /// Healthy exits in the gateway's rotation.
    pub fn live_exits(&self) -> usize {
        self.gw()
            .gateway
            .rotator()
            .exits()
            .into_iter()
            .filter(|e| e.healthy)
            .count()
    }

    /// Waits until `n` exits are live (panics with the market's status otherwise).
    pub async fn wait_live(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live_exits() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            self.live_exits() >= n,
            "{n} exit(s) rented: {:?}",
            self.market().status()
        );
    }

    /// One GET of the echo target through the gateway with `username`.
    pub async fn get_as(&self, username: &str) -> String {
        let out = curl(&[
            "-s",
            "-i",
            "--max-time",
            "15",
            "-x",
            &self.gw().proxy(username),
            &self.echo.url(),
        ])
        .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn get(&self) -> String {
        self.get_as("acct-country-de").await
    }

    /// A chain client of the requester wallet.
    pub async fn requester_chain(&self) -> ChainClient {
        ChainClient::connect(
            self.anvil.endpoint(),
            self.deployment,
            self.anvil.key(REQUESTER),
        )
        .await
        .unwrap()
    }

    /// The requester's (balance, reserved) on the Centralizer.
    pub async fn requester_funds(&self) -> (U256, U256) {
        let c = self.requester_chain().await;
        let who = self.anvil.key(REQUESTER).address();
        (
            c.balance(who).await.unwrap(),
            c.reserved(who).await.unwrap(),
        )
    }

    pub async fn stop(self) {
        if let Some(m) = &self.market {
            m.shutdown(Duration::from_secs(10)).await;
        }
        for a in self.agents {
            let _ = a.shutdown().await;
        }
        self.chain.exchange.abort();
        drop(self.chain.anvil);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Agent `i`'s connection-log directory (`[connlog] dir`): each agent its own.
pub fn connlog_dir(dir: &std::path::Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("connlog-{i}"))
}

/// The exit address a 200 response of the echo target reports, if it is one.
pub fn ip_of(response: &str) -> Option<String> {
    if !response.starts_with("HTTP/1.1 200") {
        return None;
    }
    echo_ips(response.split("\r\n\r\n").nth(1).unwrap_or("").as_bytes()).pop()
}
