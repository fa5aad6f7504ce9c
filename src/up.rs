//! `ipsx up`: the whole system on one machine. A local chain (anvil) with the contracts
//! deployed, funded wallets, the exchange (SQLite), provider agents whose exits are
//! distinct 127.0.0.x addresses in four countries, an echo target, and the gateway,
//! which rents its exits on the exchange by itself. Ctrl-C settles and stops it all.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy::signers::local::PrivateKeySigner;
use ipsx_chain::parse_tokens;
use ipsx_chain::testing::Anvil;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The demo exits: (last octet, country, city, type). Two per provider.
const EXITS: [(u8, &str, &str, &str); 8] = [
    (2, "de", "berlin", "residential"),
    (3, "de", "munich", "datacenter"),
    (4, "us", "new_york", "residential"),
    (5, "us", "chicago", "mobile"),
    (6, "fr", "paris", "residential"),
    (7, "fr", "lyon", "datacenter"),
    (8, "jp", "tokyo", "residential"),
    (9, "jp", "osaka", "mobile"),
];

/// Price per IP-second offered by the demo providers: 0.0001 IPSX.
const PRICE: u128 = 100_000_000_000_000;
/// The demo's providers claim once about 20 IP-seconds of service are unclaimed, so the
/// chain and the dashboards show payments within a minute; a real provider keeps
/// `claim_threshold = "auto"` (see docs/provider.md).
const DEMO_CLAIM_THRESHOLD: u128 = PRICE * 20;

fn hex_key(signer: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(signer.to_bytes()))
}

fn step(n: usize, what: &str) {
    println!("[{n}/7] {what}");
}

/// Everything a test or a script needs to inspect the running system.
#[derive(serde::Serialize)]
struct State {
    proxy: String,
    admin: String,
    echo: String,
    rpc_url: String,
    exchange: String,
    deployment: PathBuf,
    requester: String,
    providers: Vec<String>,
    /// Each provider agent's status listener: its earnings page at `/`, JSON at
    /// `/api/status` (what `ipsx provider status --url` reads).
    provider_status: Vec<String>,
    treasury: String,
    token: String,
    centralizer: String,
    /// The chain's process: a supervisor that has to kill `ipsx up` hard can end it too.
    anvil_pid: u32,
}

/// Runs the whole system until SIGINT/SIGTERM; `state` receives a JSON description.
pub(crate) async fn run(port: u16, state_file: Option<PathBuf>) -> Result<(), String> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("ipsx-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    // 1. Chain.
    let anvil =
        Anvil::spawn().map_err(|e| format!("chain: {e} (run `make up`, which installs anvil)"))?;
    step(
        1,
        &format!(
            "chain: anvil on {} (chain id {})",
            anvil.endpoint(),
            anvil.chain_id()
        ),
    );
    let requester = anvil.key(1);
    let treasury = anvil.key(9);
    let provider_keys: Vec<PrivateKeySigner> = (2..6).map(|i| anvil.key(i)).collect();
    let report = anvil
        .deploy_with_treasury(9)
        .await
        .map_err(|e| format!("deploy: {e}"))?;
    let deployment = report.deployment;
    let deployment_path = dir.join("deployment.json");
    deployment
        .save(&deployment_path)
        .map_err(|e| e.to_string())?;
    step(
        2,
        &format!(
            "contracts: IPSX token {:#x}, Centralizer {:#x}",
            deployment.token, deployment.centralizer
        ),
    );

    // 2. Wallets: the requester gets tokens and deposits them; providers need only gas.
    let amount = |t: &str| parse_tokens(t).map_err(|e| e.to_string());
    anvil
        .fund_and_deposit(deployment, 1, amount("1000000")?, amount("100000")?)
        .await
        .map_err(|e| format!("funding the requester: {e}"))?;
    step(
        3,
        &format!(
            "wallets: requester {:#x} deposited 100000 IPSX",
            requester.address()
        ),
    );

    // 3. Exchange.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The demo GeoIP databases place each 127.0.0.x exit in its demo country, so offers
    // are verified as on a real node; 127.0.0.x needs the dev flag.
    let (geo_country, geo_asn) = (dir.join("geo-country.mmdb"), dir.join("geo-asn.mmdb"));
    std::fs::write(&geo_country, ipsx_exchange::geo::DEMO_COUNTRY_MMDB)
        .and_then(|()| std::fs::write(&geo_asn, ipsx_exchange::geo::DEMO_ASN_MMDB))
        .map_err(|e| format!("demo GeoIP databases: {e}"))?;
    let exchange_toml = format!(
        "chain_id = {}\ndatabase = \"sqlite://{}\"\nrpc_url = \"{}\"\ncentralizer = \"{:#x}\"\nallow_private_addresses = true\ngeoip_country = \"{}\"\ngeoip_asn = \"{}\"\n",
        deployment.chain_id,
        dir.join("exchange.db").display(),
        anvil.endpoint(),
        deployment.centralizer,
        geo_country.display(),
        geo_asn.display()
    );
    let exchange_config = ipsx_exchange::ExchangeConfig::from_toml(&exchange_toml)
        .map_err(|e| format!("exchange config: {e}"))?;
    let exchange_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let exchange_url = format!(
        "http://{}",
        exchange_listener.local_addr().map_err(|e| e.to_string())?
    );
    let exchange = tokio::spawn(ipsx_exchange::serve(
        exchange_listener,
        exchange_config,
        stopped(stop_rx.clone()),
    ));
    step(4, &format!("exchange: {exchange_url}"));

    // 4. Echo target, reporting the caller's address and its demo country.
    let echo = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let echo_addr = echo.local_addr().map_err(|e| e.to_string())?;
    let countries: HashMap<IpAddr, String> = EXITS
        .iter()
        .map(|(last, cc, _, _)| {
            (
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, *last)),
                (*cc).to_owned(),
            )
        })
        .collect();
    tokio::spawn(ipsx_gateway::echo::serve_echo(echo, countries));

    // NAT traversal runs in the demo too: a coturn on loopback (when installed) is the
    // STUN server of every exit and rented tunnel (no NAT here, so paths are `direct`).
    let stun = Stun::start(&dir);
    let (exit_nat, market_nat) = match &stun {
        Some(s) => (
            format!("[exit.nat]\nstun = [\"{}\"]\ntimeout_s = 2\n\n", s.addr),
            format!("[market.nat]\nstun = [\"{}\"]\ntimeout_s = 2\n\n", s.addr),
        ),
        None => (String::new(), String::new()),
    };

    // 5. Providers: two exits each.
    let mut providers = Vec::new();
    let mut provider_status = Vec::new();
    for (i, key) in provider_keys.iter().enumerate() {
        // Each agent's status listener (earnings page, `ipsx provider status`) on its
        // own port: after the gateway's two when a port was asked for, else any.
        let status_port = if port == 0 {
            0
        } else {
            port.saturating_add(2 + i as u16)
        };
        let mut toml = format!(
            "[exchange]\nurl = \"{exchange_url}\"\n\n[chain]\nrpc_url = \"{}\"\ndeployment = \"{}\"\n\n[wallet]\nprivate_key = \"{}\"\n\n[timings]\npoll = \"2s\"\nclaim_threshold = \"{DEMO_CLAIM_THRESHOLD}\"\n\n[status]\nlisten = \"127.0.0.1:{status_port}\"\n\n[connlog]\ndir = \"{}\"\n\n",
            anvil.endpoint(),
            deployment_path.display(),
            hex_key(key),
            // Each agent's connection logs in its own directory of this run's state.
            dir.join(format!("connlog-{i}")).display(),
        );
        for (last, cc, city, kind) in &EXITS[i * 2..i * 2 + 2] {
            toml.push_str(&format!(
                "[[exit]]\nexit_address = \"127.0.0.{last}\"\nlisten = \"127.0.0.{last}:0\"\ncountry = \"{cc}\"\ncity = \"{city}\"\ntype = \"{kind}\"\nprice_per_ip_second = \"{PRICE}\"\nprotocols = [\"any\"]\nallow_destinations = [\"127.0.0.0/8\"]\n\n{exit_nat}"
            ));
        }
        let path = dir.join(format!("provider-{i}.toml"));
        std::fs::write(&path, &toml).map_err(|e| e.to_string())?;
        let cfg = ipsx_provider::agent::AgentConfig::from_toml(&toml)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let agent = ipsx_provider::Agent::start_with_routes(
            cfg,
            Some(ipsx_provider::status::page_routes()),
        )
        .await
        .map_err(|e| format!("provider {i}: {e}"))?;
        if let Some(a) = agent.status_addr() {
            provider_status.push(format!("http://{a}"));
        }
        providers.push(agent);
    }
    step(
        5,
        &format!(
            "providers: {} agents, exits 127.0.0.2-9 in de, us, fr, jp",
            provider_keys.len()
        ),
    );

    // 6. Gateway, renting one exit per country to start with, more on demand.
    let mut gateway_toml = format!(
        "[gateway]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\nallow_destinations = [\"127.0.0.0/8\"]\nverify_url = \"http://{echo_addr}/ip.txt\"\n\n[[token]]\nname = \"demo\"\nsecret = \"demo-token\"\n\n[market]\nexchange_url = \"{exchange_url}\"\nrpc_url = \"{}\"\ndeployment = \"{}\"\nprivate_key = \"{}\"\nmax_price_per_ip_second = \"{}\"\ndeal_duration = \"10m\"\npayment_window = \"15s\"\nproof_interval = \"3s\"\nrent_wait = \"10s\"\nreverify_every = \"1m\"\nclose_channels_at_shutdown = true\ngeoip_country = \"{}\"\ngeoip_asn = \"{}\"\n\n",
        if port == 0 { 0 } else { port.saturating_add(1) },
        anvil.endpoint(),
        deployment_path.display(),
        hex_key(&requester),
        PRICE * 2,
        geo_country.display(),
        geo_asn.display(),
    );
    gateway_toml.push_str(&market_nat);
    for cc in ["de", "us", "fr", "jp"] {
        gateway_toml.push_str(&format!(
            "[[market.demand]]\nname = \"{cc}\"\ntarget = {{ country = \"{cc}\" }}\ncount = 1\n\n"
        ));
    }
    let gateway_path = dir.join("gateway.toml");
    std::fs::write(&gateway_path, &gateway_toml).map_err(|e| e.to_string())?;
    let gateway_config =
        ipsx_config::GatewayConfig::from_toml(&gateway_toml, &gateway_path.display().to_string())
            .map_err(|e| e.to_string())?;
    let (gw_stop_tx, gw_stop_rx) = watch::channel(false);
    let (addr_tx, mut addr_rx) = watch::channel(None);
    let gateway = tokio::spawn(crate::gateway_cmd::serve_reporting(
        gateway_config,
        Some(gateway_path.clone()),
        stopped(gw_stop_rx),
        addr_tx,
    ));
    let (proxy, admin) = loop {
        if let Some(v) = *addr_rx.borrow() {
            break v;
        }
        if addr_rx.changed().await.is_err() {
            return Err("gateway stopped while starting".into());
        }
    };
    step(6, &format!("gateway: proxy {proxy}, admin http://{admin}"));

    // 7. Wait for the first rented exits.
    let want = 4;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut live = 0;
    while Instant::now() < deadline {
        live = admin_live_exits(admin).await;
        if live >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    step(
        7,
        &format!(
            "renting: {live} of {want} exits live after {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    );

    let echo_url = format!("http://{echo_addr}/ip");
    let state = State {
        proxy: format!("http://demo:demo-token@{proxy}"),
        admin: format!("http://{admin}"),
        echo: echo_url.clone(),
        rpc_url: anvil.endpoint().to_owned(),
        exchange: exchange_url.clone(),
        deployment: deployment_path.clone(),
        requester: format!("{:#x}", requester.address()),
        providers: provider_keys
            .iter()
            .map(|k| format!("{:#x}", k.address()))
            .collect(),
        provider_status: provider_status.clone(),
        treasury: format!("{:#x}", treasury.address()),
        token: format!("{:#x}", deployment.token),
        centralizer: format!("{:#x}", deployment.centralizer),
        anvil_pid: anvil.pid(),
    };
    if let Some(path) = &state_file {
        let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!();
    println!("ipsx is up.");
    println!(
        "  proxy URL:   {}   (HTTP and SOCKS5 on one port)",
        state.proxy
    );
    println!("  echo target: {echo_url}");
    println!(
        "  dashboard:   {}/   (JSON: /api/market, /api/exits)",
        state.admin
    );
    for (i, url) in provider_status.iter().enumerate() {
        println!("  provider {i}:  {url}/   (ipsx provider status --url {url})");
    }
    match &stun {
        Some(s) => println!(
            "  NAT:         STUN via coturn (turnserver) on {}; each deal's path in /api/market",
            s.addr
        ),
        None => {
            println!("  NAT:         off (turnserver not installed: scripts/install-tunnel.sh)")
        }
    }
    println!("try:");
    println!("  curl -x http://demo-country-de-session-s1:demo-token@{proxy} {echo_url}");
    println!("  curl --socks5-hostname demo-country-us:demo-token@{proxy} {echo_url}");
    println!("Ctrl-C settles every channel and stops everything.");

    crate::gateway_cmd::terminated().await;
    println!("stopping: ending deals so providers settle on chain...");
    let _ = gw_stop_tx.send(true);
    let _ = gateway.await;
    // Give providers a moment to see the completed deals and claim.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    for p in providers {
        match tokio::time::timeout(Duration::from_secs(10), p.shutdown()).await {
            Ok(Err(e)) => println!("provider shutdown: {e}"),
            Err(_) => println!("provider shutdown: still settling after 10 s"),
            Ok(Ok(())) => {}
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), exchange).await;
    // What the requester paid, and whether every channel it opened is closed.
    match settlement(&anvil, deployment, &requester).await {
        Ok((paid, closed, open)) => println!(
            "settled: requester paid {paid} base units; {closed} channel(s) closed, {open} left open"
        ),
        Err(e) => println!("settlement not checked: {e}"),
    }
    drop(anvil);
    drop(stun);
    let _ = std::fs::remove_dir_all(&dir);
    println!("stopped.");
    Ok(())
}

/// coturn as the demo's STUN server on a free loopback port; killed on drop.
struct Stun {
    addr: std::net::SocketAddr,
    child: std::process::Child,
}

impl Stun {
    /// `None` when `turnserver` is not installed or does not start.
    fn start(dir: &std::path::Path) -> Option<Self> {
        // coturn takes no port 0: take a free one and hand it over.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let conf = dir.join("turnserver.conf");
        std::fs::write(
            &conf,
            format!(
                "listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\nno-auth\n\
                 no-tls\nno-dtls\nno-cli\nno-rfc5780\nlog-file=stdout\nsimple-log\npidfile={}\n",
                dir.join("turnserver.pid").display()
            ),
        )
        .ok()?;
        // Its own process group, so a terminal's Ctrl-C (sent to the whole foreground
        // group) reaches only `ipsx up`, which stops it after the settlement.
        let child = std::os::unix::process::CommandExt::process_group(
            std::process::Command::new("turnserver")
                .arg("-c")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
            0,
        )
        .spawn()
        .ok()?;
        let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // Wait (bounded) until it holds the port.
        let mut me = Self { addr, child };
        for _ in 0..50 {
            if std::net::UdpSocket::bind(addr).is_err() {
                return Some(me);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = me.child.kill();
        let _ = me.child.wait();
        None
    }
}

impl Drop for Stun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin_live_exits(admin: std::net::SocketAddr) -> usize {
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return 0;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(b"GET /api/exits HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return 0;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["exits"]
                .as_array()
                .map(|a| a.iter().filter(|e| e["healthy"] == true).count())
        })
        .unwrap_or(0)
}

/// The requester's spend (the deposit minus what it holds now) and its channels
/// (closed, still open) after everything stopped.
async fn settlement(
    anvil: &Anvil,
    deployment: ipsx_chain::Deployment,
    requester: &PrivateKeySigner,
) -> Result<(alloy::primitives::U256, usize, usize), String> {
    let chain = ipsx_chain::ChainClient::connect(anvil.endpoint(), deployment, requester.clone())
        .await
        .map_err(|e| e.to_string())?;
    let who = requester.address();
    let held = chain
        .wallet_balances(who)
        .await
        .map_err(|e| e.to_string())?;
    let deposited = parse_tokens("100000").map_err(|e| e.to_string())?;
    let paid = deposited.saturating_sub(held.balance.saturating_add(held.reserved));
    let (mut closed, mut open) = (0, 0);
    for id in chain.channel_ids_of(who).await.map_err(|e| e.to_string())? {
        match chain.channel(id).await.map_err(|e| e.to_string())? {
            Some(_) => open += 1,
            None => closed += 1,
        }
    }
    Ok((paid, closed, open))
}
