//! The requester side under real use (issue market-v2), all real components: anvil, the
//! exchange on SQLite, provider agents with their WireGuard exits, the gateway and its
//! pool manager, curl.
//! - a rented exit that carried traffic and then went idle stays rented (no churn);
//! - a provider that takes the first window and never serves costs one small window,
//!   is avoided, and its channel is closed on chain so the deposit comes back;
//! - on-demand demand is bounded: a flood of distinct ASNs keeps the group count at the
//!   cap, and the configured DE rental still works;
//! - a lease is extended with the same provider, so a sticky session keeps its IP
//!   across three lease lengths;
//! - a gateway killed with SIGKILL resumes its deal and channel after a restart, pays
//!   nothing twice, and after SIGTERM posts no order and leaves no channel open.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::U256;
use common::market::{MarketOpts, MarketSystem, REQUESTER, ip_of};
use common::*;
use ipsx_exchange::client::{Client, fresh};
use ipsx_exchange::types::{Offer, WgKey};
use ipsx_exchange_client::connlog;

fn deals(status: &ipsx_market::MarketStatus) -> Vec<serde_json::Value> {
    status.deals.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rented_exit_that_went_idle_after_traffic_stays_rented() {
    let dead_after = 3;
    let sys = MarketSystem::start(MarketOpts {
        market: format!(
            "deal_duration = \"5m\"\nproof_interval = \"1s\"\ndead_after = \"{dead_after}s\"\nrent_on_demand = false\n"
        ),
        ..MarketOpts::default()
    })
    .await;
    sys.wait_live(1, Duration::from_secs(60)).await;
    let ip = ip_of(&sys.get().await).expect("served through the rented exit");
    for _ in 0..5 {
        assert_eq!(ip_of(&sys.get().await).as_deref(), Some(ip.as_str()));
    }
    // Idle, provider alive, for well over three times dead_after (and past WireGuard's
    // 10 s passive keepalive).
    tokio::time::sleep(Duration::from_secs(3 * dead_after + 12)).await;
    let status = sys.market().status();
    let d = deals(&status);
    assert_eq!(d.len(), 1, "no deal ended or replaced: {status:?}");
    assert_eq!(d[0]["phase"], "serving", "{status:?}");
    assert_eq!(ip_of(&sys.get().await).as_deref(), Some(ip.as_str()));
    provider_status_cli_shows_the_deal(&sys, &ip);
    sys.stop().await;
}

/// `ipsx provider status` against the serving agent's status listener: the JSON and
/// the table show the live deal, its bytes and payment, and the NAT path.
fn provider_status_cli_shows_the_deal(sys: &MarketSystem, exit_ip: &str) {
    let agent = sys
        .agents
        .iter()
        .find(|a| a.provider_status().totals.live_deals > 0)
        .expect("one agent serves the deal");
    let url = format!("http://{}", agent.status_addr().expect("status listener"));
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ipsx"))
            .args(["provider", "status", "--url", &url])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: serde_json::Value = serde_json::from_str(&run(&["--json"])).unwrap();
    assert_eq!(v["nat_path"], "direct");
    assert_eq!(v["totals"]["live_deals"], 1);
    let deal = &v["deals"][0];
    assert_eq!(deal["stage"], "serving", "{v}");
    assert_eq!(deal["exit_address"], exit_ip);
    assert!(deal["bytes_down"].as_u64().unwrap() > 0, "{v}");
    let paid: u128 = deal["paid"]["base_units"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(paid > 0, "{v}");
    let table = run(&[]);
    assert!(table.contains("nat path: direct"), "{table}");
    assert!(
        table.contains("serving") && table.contains(exit_ip),
        "{table}"
    );
    // A wrong URL is an error naming it, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_ipsx"))
        .args(["provider", "status", "--url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("127.0.0.1:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_serves_costs_one_small_window_and_its_deposit_comes_back() {
    let sys = MarketSystem::start(MarketOpts {
        exits: vec![("127.0.0.2", "de")],
        market: "deal_duration = \"5m\"\nproof_interval = \"1s\"\nfirst_window = \"5s\"\nserve_timeout = \"3s\"\nclose_grace = \"2s\"\nrent_on_demand = false\n".into(),
        challenge_secs: 3,
        gateway: false,
        ..MarketOpts::default()
    })
    .await;
    let (balance0, reserved0) = sys.requester_funds().await;
    assert_eq!(reserved0, U256::ZERO);
    // Three strangers offer DE at a tenth of the honest price from fresh keys, and never
    // serve (their WireGuard endpoint answers nothing).
    let honest_price: u128 = 1_000_000_000_000;
    let fake_price = honest_price / 10;
    let mut fakes = Vec::new();
    for k in 5..8 {
        let key = sys.anvil.key(k);
        let client = Client::new(
            &sys.exchange_url,
            sys.deployment.chain_id,
            sys.deployment.centralizer,
        )
        .unwrap()
        .with_key(key.clone());
        let (expiry, nonce) = fresh();
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .post_offer(&Offer {
                provider: key.address(),
                exit_address: format!("127.0.0.{}", 20 + k).parse().unwrap(),
                country: "de".parse().unwrap(),
                region: None,
                city: None,
                asn: None,
                kind: ipsx_rotation::ExitKind::Residential,
                protocols: vec![ipsx_exchange::types::Protocol::Any],
                price_per_ip_second: fake_price,
                min_duration_s: 5,
                max_duration_s: 86_400,
                capacity: 1,
                wg_endpoint: silent.local_addr().unwrap(),
                wg_public_key: WgKey([k as u8; 32]),
                expiry: expiry + 600,
                nonce,
            })
            .await
            .unwrap();
        fakes.push((key.address(), silent));
    }
    let mut sys = sys;
    sys.start_gateway().await;
    // Each fake is tried at most once, then the honest provider serves.
    sys.wait_live(1, Duration::from_secs(120)).await;
    let ip = ip_of(&sys.get().await).expect("served by the honest provider");
    assert_eq!(ip, "127.0.0.2");
    let status = sys.market().status();
    let fake_addrs: HashSet<String> = fakes.iter().map(|(a, _)| format!("{a:#x}")).collect();
    let fake_deals: Vec<_> = deals(&status)
        .into_iter()
        .filter(|d| fake_addrs.contains(d["provider"].as_str().unwrap()))
        .collect();
    assert!(
        !fake_deals.is_empty(),
        "the cheap fakes were tried: {status:?}"
    );
    assert!(fake_deals.len() <= 3, "each fake tried once: {status:?}");
    let first_window = fake_price * 5;
    for d in &fake_deals {
        assert_eq!(d["outcome"], "never_served", "{d}");
        let paid: u128 = d["paid"].as_str().unwrap().parse().unwrap();
        assert!(
            paid <= first_window,
            "paid {paid} > one first window {first_window}"
        );
    }
    // Stop: the fakes' channels are closed by the gateway (startClose, settle after the
    // challenge); the honest provider's stays open, idle, for reuse.
    let market = sys.market.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while market.status().channels_open > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    market.shutdown(Duration::from_secs(20)).await;
    let chain = sys.requester_chain().await;
    let (balance1, reserved1) = sys.requester_funds().await;
    // The fakes' deposits came back; the honest provider's channel stays open for the
    // next deals (channel reuse), holding the rest of its deposit.
    let mut still_reserved = U256::ZERO;
    for id in chain.channel_ids_of(chain.address()).await.unwrap() {
        if let Some(c) = chain.channel(id).await.unwrap() {
            assert!(
                !fakes.iter().any(|(f, _)| *f == c.provider),
                "a fake's channel is still open: {c:?}"
            );
            still_reserved += c.deposit - c.claimed;
        }
    }
    assert_eq!(
        reserved1,
        reserved0 + still_reserved,
        "every other deposit came back: {:?}",
        market.status()
    );
    for (fake, _) in &fakes {
        assert!(
            chain.balance(*fake).await.unwrap() <= U256::from(first_window),
            "a fake earned more than one window"
        );
    }
    let spent = (balance0 + reserved0) - (balance1 + reserved1);
    let honest: u128 = deals(&market.status())
        .iter()
        .filter(|d| {
            d["provider"].as_str().unwrap() != ""
                && !fake_addrs.contains(d["provider"].as_str().unwrap())
        })
        .map(|d| d["paid"].as_str().unwrap().parse::<u128>().unwrap())
        .sum();
    assert!(
        spent <= U256::from(honest + first_window * fake_deals.len() as u128),
        "spent {spent}: more than the honest service plus one window per fake"
    );
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_asns_is_capped_and_the_de_rental_still_works() {
    let sys = MarketSystem::start(MarketOpts {
        market: "deal_duration = \"5m\"\nproof_interval = \"1s\"\nrent_wait = \"50ms\"\nmax_on_demand_groups = 8\n".into(),
        ..MarketOpts::default()
    })
    .await;
    sys.wait_live(1, Duration::from_secs(60)).await;
    let proxy = sys.gw().addr;
    let mut capped = 0;
    for asn in 1..=1000u32 {
        let auth = base64(format!("acct-asn-{asn}:{TOKEN}").as_bytes());
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n",
            sys.echo.url()
        );
        let resp = raw_exchange(proxy, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        if resp.contains("market.max_on_demand_groups") {
            capped += 1;
        }
    }
    let status = sys.market().status();
    let on_demand = status
        .groups
        .iter()
        .filter(|g| g["on_demand"] == true)
        .count();
    assert!(on_demand <= 8, "{on_demand} on-demand groups");
    assert!(
        capped >= 990,
        "requests over the cap get a 503 naming it ({capped})"
    );
    assert_eq!(ip_of(&sys.get().await).as_deref(), Some("127.0.0.2"));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_session_keeps_its_ip_across_three_lease_lengths() {
    let sys = MarketSystem::start(MarketOpts {
        exits: vec![("127.0.0.2", "de"), ("127.0.0.3", "de")],
        market: "deal_duration = \"15s\"\nrenew_ahead = \"8s\"\nproof_interval = \"1s\"\nrent_on_demand = false\n".into(),
        ..MarketOpts::default()
    })
    .await;
    sys.wait_live(1, Duration::from_secs(60)).await;
    let started = Instant::now();
    let mut ips = HashSet::new();
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(50) {
        let r = sys.get_as("acct-country-de-session-keep").await;
        match ip_of(&r) {
            Some(ip) => {
                ips.insert(ip);
            }
            None => failures.push(r),
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let status = sys.market().status();
    assert!(failures.is_empty(), "{failures:?} {status:?}");
    assert_eq!(ips.len(), 1, "one IP throughout: {ips:?} {status:?}");
    let d = deals(&status);
    assert_eq!(d.len(), 1, "one deal, extended: {status:?}");
    assert!(d[0]["extensions"].as_u64().unwrap() >= 3, "{status:?}");
    sys.stop().await;
}

/// `ipsx gateway` as a child process of the test.
struct GatewayProcess {
    child: Child,
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl GatewayProcess {
    fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipsx"));
        cmd.args(["gateway", "--config"])
            .arg(config)
            .env("IPSX_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        clear_proxy_env(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let addrs = common::gateway_addrs(&mut out).expect("the gateway printed its proxy address");
        Self {
            child,
            proxy: addrs.proxy,
            admin: addrs.admin.expect("the gateway printed its admin address"),
        }
    }

    async fn market(&self) -> serde_json::Value {
        let out = curl(&[
            "-s",
            "--max-time",
            "5",
            &format!("http://{}/api/market", self.admin),
        ])
        .await;
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    async fn get(&self, echo: &str) -> String {
        let proxy = format!("http://acct-country-de-session-s:{TOKEN}@{}", self.proxy);
        let out = curl(&["-s", "-i", "--max-time", "15", "-x", &proxy, echo]).await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn wait_serving(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.market().await;
            let serving = m["deals"]
                .as_array()
                .and_then(|d| d.iter().find(|d| d["phase"] == "serving").cloned());
            if let Some(d) = serving {
                return d;
            }
            assert!(Instant::now() < deadline, "no deal serving: {m}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_sigkill_resumes_its_deal_and_pays_nothing_twice() {
    let sys = MarketSystem::start(MarketOpts {
        gateway: false,
        ..MarketOpts::default()
    })
    .await;
    let config = sys.dir.join("gateway.toml");
    let toml = sys
        .gateway_toml
        .replace("[gateway]\n", "[gateway]\nadmin_listen = \"127.0.0.1:0\"\n")
        // Channels are kept for reuse by default; this test checks that a gateway
        // asked to close them at shutdown leaves none open after a SIGKILL and resume.
        .replace(
            "[market]\n",
            "[market]\nclose_channels_at_shutdown = true\n",
        );
    std::fs::write(&config, toml).unwrap();
    let echo = sys.echo.url();
    let requester = sys.anvil.key(REQUESTER).address();
    let chain = sys.requester_chain().await;

    let log1 = sys.dir.join("gateway-1.log");
    let log2 = sys.dir.join("gateway-2.log");
    let gw = GatewayProcess::start(&config, &log1);
    let deal = gw.wait_serving().await;
    let ip = ip_of(&gw.get(&echo).await).expect("served");
    let channels = chain.channel_ids_of(requester).await.unwrap().len();
    assert_eq!(channels, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paid_before: u128 = gw.market().await["deals"][0]["paid"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    gw.signal("-KILL");
    drop(gw);

    // Restarted from the same config and state file: the same deal serves again, from
    // the same exit, over the same channel, paying on from where it was.
    let gw = GatewayProcess::start(&config, &log2);
    let again = gw.wait_serving().await;
    let logs = || {
        format!(
            "\n--- first run ---\n{}\n--- after SIGKILL ---\n{}",
            std::fs::read_to_string(&log1).unwrap_or_default(),
            std::fs::read_to_string(&log2).unwrap_or_default()
        )
    };
    assert_eq!(
        again["deal"],
        deal["deal"],
        "the same deal resumed{}",
        logs()
    );
    assert_eq!(ip_of(&gw.get(&echo).await).as_deref(), Some(ip.as_str()));
    assert_eq!(
        chain.channel_ids_of(requester).await.unwrap().len(),
        channels,
        "no second channel"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = gw.market().await;
    let paid_after: u128 = m["deals"][0]["paid"].as_str().unwrap().parse().unwrap();
    assert!(
        paid_after >= paid_before,
        "cumulative payments never go back"
    );
    let served_s = m["deals"][0]["served_s"].as_u64().unwrap();
    let price: u128 = 1_000_000_000_000;
    assert!(
        paid_after <= price * u128::from(served_s + 30 + 1),
        "paid {paid_after} for {served_s} s served: more than one window ahead"
    );
    assert_eq!(
        m["deals"].as_array().unwrap().len(),
        1,
        "nothing rented twice: {m}"
    );

    // SIGTERM: renting stops first; nothing is ordered after; channels are closed.
    let exchange = Client::new(
        &sys.exchange_url,
        sys.deployment.chain_id,
        sys.deployment.centralizer,
    )
    .unwrap();
    gw.signal("-TERM");
    let mut gw = gw;
    let deadline = Instant::now() + Duration::from_secs(40);
    while gw.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        gw.child.try_wait().unwrap().is_some(),
        "the gateway stopped"
    );
    let made = exchange.deals_of(requester).await.unwrap().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(exchange.deals_of(requester).await.unwrap().len(), made);
    assert_eq!(made, 1, "no deal made at or after shutdown");
    let open = chain.channel_ids_of(requester).await.unwrap();
    let mut still = 0;
    for c in open {
        if chain.channel(c).await.unwrap().is_some() {
            still += 1;
        }
    }
    assert_eq!(still, 0, "channels left open after shutdown");
    drop(gw);
    sys.stop().await;
}

/// Issue 11 part 3: the provider's offer says `de`, but its exit (127.0.0.40) is in
/// Brazil in the gateway's GeoIP database: the deal ends as `misplaced` with the reason,
/// which the exchange shows in the deal's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_the_geoip_database_places_elsewhere_ends_its_deal_as_misplaced() {
    let db = std::env::temp_dir().join(format!("ipsx-geo-{}-country.mmdb", std::process::id()));
    std::fs::write(&db, ipsx_exchange::geo::DEMO_COUNTRY_MMDB).unwrap();
    let sys = MarketSystem::start(MarketOpts {
        exits: vec![("127.0.0.40", "de")],
        market: format!(
            "deal_duration = \"5m\"\nproof_interval = \"1s\"\ndead_after = \"2s\"\nrent_on_demand = false\nreverify_every = \"2s\"\ngeoip_country = \"{}\"\n",
            db.display()
        ),
        ..MarketOpts::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let ended = loop {
        let status = sys.market().status();
        if let Some(d) = deals(&status)
            .into_iter()
            .find(|d| d["outcome"] == "misplaced")
        {
            break d;
        }
        assert!(Instant::now() < deadline, "no misplaced deal: {status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let id = ended["deal"].as_u64().unwrap();
    let exchange = Client::new(
        &sys.exchange_url,
        sys.deployment.chain_id,
        sys.deployment.centralizer,
    )
    .unwrap();
    // The report reaches the exchange (bounded wait): the reason is in the history.
    let mut shown = None;
    for _ in 0..60 {
        let deal = exchange.deal(id).await.unwrap();
        if let Some(h) = deal
            .history
            .iter()
            .find(|h| h.what.contains("reported failed: exit misplaced"))
        {
            shown = Some(h.what.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let what = shown.expect("the exchange shows the misplaced report");
    assert!(what.contains("`country` claims de"), "{what}");
    assert!(what.contains("in br"), "{what}");
    // Never in rotation: no request was served through the misplaced exit.
    assert_eq!(sys.live_exits(), 0);
    sys.stop().await;
    let _ = std::fs::remove_file(&db);
}

/// Issue 12: each deal's connection log, fetched by the gateway through the deal's
/// tunnel (the exit's inner address, port 80) before the tunnel goes, recomputes the
/// `logHash` its provider claimed on chain: `verified`. At the other provider a record
/// is removed from the deal's log file on disk before the fetch: `mismatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_checks_each_deals_connection_log_against_the_chain() {
    let sys = MarketSystem::start(MarketOpts {
        exits: vec![("127.0.0.2", "de"), ("127.0.0.3", "de")],
        demand: "[[market.demand]]\nname = \"de\"\ntarget = { country = \"de\" }\ncount = 2\n"
            .into(),
        // Claims (with their logHash) come often.
        agent_timings: "claim_threshold = \"1\"\nclaim_interval = \"1s\"\n".into(),
        ..MarketOpts::default()
    })
    .await;
    sys.wait_live(2, Duration::from_secs(60)).await;
    let provider_of = |i: usize| format!("{:#x}", sys.anvil.key(2 + i).address());
    let deal_of = |i: usize| {
        let status = sys.market().status();
        let d = deals(&status)
            .into_iter()
            .find(|d| d["provider"] == provider_of(i))
            .unwrap_or_else(|| panic!("a deal with provider {i}: {status:?}"));
        let id = d["deal"].as_u64().unwrap();
        let channel: alloy::primitives::B256 =
            d["channel"]["id"].as_str().unwrap().parse().unwrap();
        (id, channel)
    };
    let log_file = |i: usize, id: u64| {
        ipsx_provider::connlog_store::find_deal_file(&common::market::connlog_dir(&sys.dir, i), id)
    };
    let records = |i: usize, id: u64| {
        log_file(i, id)
            .and_then(|f| std::fs::metadata(f).ok())
            .map_or(0, |m| m.len() / connlog::ENTRY_LEN as u64)
    };
    // Traffic through both exits, until each deal's log holds a connection.
    let mut i = 0;
    while (records(0, deal_of(0).0) == 0 || records(1, deal_of(1).0) == 0) && i < 30 {
        assert!(ip_of(&sys.get().await).is_some(), "served");
        i += 1;
    }
    assert!(
        records(0, deal_of(0).0) > 0 && records(1, deal_of(1).0) > 0,
        "both exits logged a connection"
    );
    // A claim commits those connections: wait until the chain holds the commitment
    // of each deal's records as they are on disk.
    let chain = sys.requester_chain().await;
    for p in 0..2 {
        let (id, channel) = deal_of(p);
        let entries =
            connlog::parse_records(&std::fs::read(log_file(p, id).unwrap()).unwrap()).unwrap();
        let part = connlog::CommitPart {
            deal_id: id,
            entries: entries.len() as u64,
            dropped: 0,
            head: connlog::head(id, &entries),
        };
        let want = connlog::channel_commitment(&channel, &[part]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while chain.channel(channel).await.unwrap().unwrap().log_hash != want
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            chain.channel(channel).await.unwrap().unwrap().log_hash,
            want,
            "provider {p} claimed its deal's connections"
        );
    }
    // Tampering at provider 1: its deal's file loses its records.
    let (id1, _) = deal_of(1);
    std::fs::write(log_file(1, id1).unwrap(), b"").unwrap();

    // The gateway ends both deals: each log is fetched through its tunnel and checked.
    sys.market().shutdown(Duration::from_secs(2)).await;
    let status = sys.market().status();
    let check = |i: usize| {
        let d = deals(&status)
            .into_iter()
            .find(|d| d["provider"] == provider_of(i))
            .unwrap();
        (
            d["connlog"].as_str().unwrap().to_owned(),
            d["connlog_reason"].as_str().unwrap().to_owned(),
        )
    };
    let (state, reason) = check(0);
    assert_eq!(state, "verified", "{reason}: {status:?}");
    assert!(reason.contains("recomputed"), "{reason}");
    let (state, reason) = check(1);
    assert_eq!(state, "mismatch", "{reason}: {status:?}");
    assert!(reason.contains("entries"), "{reason}");
    sys.stop().await;
}
