//! The provider agent against real components: anvil with the token and the Centralizer
//! deployed, the exchange node in-process on 127.0.0.1:0 reading balances from that
//! chain, the agent's own WireGuard exit on 127.0.0.2, and the requester side driven
//! by hand (request, channel, signed proofs, a userspace tunnel, status reports).
//!
//! Durations are short (deals of 12-20 s, window 5 s, grace 3 s, poll 500 ms); every
//! wait is bounded and asserts on what happened, not on how fast.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;
use crate::natlab;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, U256};
use alloy_signer_local::PrivateKeySigner;
use ipsx_chain::testing::Anvil;
use ipsx_chain::{ChainClient, Deployment};
use ipsx_exchange::engine::{Deal, Outcome};
use ipsx_exchange::{
    Client, DealStatus, ExchangeConfig, Extend, PartyStatus, Request, StatusReport, WgKey,
};
use ipsx_exchange_client::connlog;
use ipsx_exchange_client::market::{EXIT_INNER_ADDR, amount_due, inner_ip_for_deal};
use ipsx_provider::agent::{AgentConfig, AgentError, Stage};
use ipsx_provider::{Agent, AgentHandle};
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PRICE: u128 = 1_000_000_000_000; // base units per IP-second
const WINDOW: Duration = Duration::from_secs(5);
const EXIT_IP: &str = "127.0.0.2";
const WAIT: Duration = Duration::from_secs(60);
/// The status listener's bearer token in these tests.
const STATUS_TOKEN: &str = "status-token-0123456789";

/// The exchange node, restartable on the same address and journal.
struct Exchange {
    addr: SocketAddr,
    cfg: ExchangeConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Exchange {
    async fn start(cfg: ExchangeConfig, bind: &str) -> Exchange {
        let mut listener = None;
        for _ in 0..50 {
            match TcpListener::bind(bind).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let listener = listener.expect("bind the exchange");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, is_ready) = oneshot::channel();
        let c = cfg.clone();
        let task = tokio::spawn(async move {
            ipsx_exchange::server::serve_ready(
                listener,
                c,
                async {
                    let _ = stopped.await;
                },
                ready,
            )
            .await
            .unwrap();
        });
        tokio::time::timeout(Duration::from_secs(30), is_ready)
            .await
            .unwrap()
            .unwrap();
        Exchange {
            addr,
            cfg,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    async fn restart(&mut self) {
        self.stop().await;
        let again = Exchange::start(self.cfg.clone(), &self.addr.to_string()).await;
        *self = again;
    }
}

struct World {
    anvil: Anvil,
    deployment: Deployment,
    deployment_path: PathBuf,
    _dir: tempfile::TempDir,
    exchange: Exchange,
    provider: PrivateKeySigner,
    requester: PrivateKeySigner,
    treasury: Address,
    deployer: ChainClient,
}

impl World {
    async fn new() -> World {
        let anvil = Anvil::spawn().expect("anvil (scripts/install-chain.sh installs it)");
        let deployer_key = anvil.key(0);
        let treasury = anvil.key(9).address();
        let report = anvil.deploy_with_treasury(9).await.unwrap();
        let deployment = report.deployment;
        let dir = tempfile::tempdir().unwrap();
        let deployment_path = dir.path().join("deployment.json");
        deployment.save(&deployment_path).unwrap();
        let deployer = ChainClient::connect(anvil.endpoint(), deployment, deployer_key)
            .await
            .unwrap();
        let mut cfg = ExchangeConfig::for_tests(
            format!("sqlite://{}/journal.db", dir.path().display()),
            Default::default(),
        );
        cfg.chain_id = deployment.chain_id;
        cfg.rpc_url = Some(anvil.endpoint().to_owned());
        cfg.centralizer = deployment.centralizer;
        cfg.static_balances = None;
        let exchange = Exchange::start(cfg, "127.0.0.1:0").await;
        let provider = anvil.key(1);
        let requester = anvil.key(2);
        // The requester gets tokens and deposits them in the Centralizer.
        let amount = U256::from(10u128.pow(20));
        anvil
            .fund_and_deposit(deployment, 2, amount, amount)
            .await
            .unwrap();
        World {
            anvil,
            deployment,
            deployment_path,
            _dir: dir,
            exchange,
            provider,
            requester,
            treasury,
            deployer,
        }
    }

    fn agent_toml(&self, capacity: u32) -> String {
        self.agent_toml_with(capacity, "")
    }

    /// The agent's config with `extra` appended to its `[[exit]]`.
    fn agent_toml_with(&self, capacity: u32, extra: &str) -> String {
        format!(
            r#"
[exchange]
url = "{url}"

[chain]
rpc_url = "{rpc}"
deployment = "{dep}"

[wallet]
private_key = "0x{key}"

[status]
listen = "127.0.0.1:0"
token = "{STATUS_TOKEN}"

[connlog]
dir = "{connlog}"

[timings]
offer_ttl = "1h"
first_window = "5s"
grace = "3s"
claim_interval = "4s"
poll = "500ms"

[[exit]]
exit_address = "{EXIT_IP}"
listen = "{EXIT_IP}:0"
country = "de"
city = "Berlin"
type = "residential"
protocols = ["any"]
price_per_ip_second = "{PRICE}"
min_duration = "5s"
max_duration = "1h"
capacity = {capacity}
allow_destinations = ["127.0.0.0/8"]
{extra}
"#,
            url = self.exchange.url(),
            rpc = self.anvil.endpoint(),
            dep = self.deployment_path.display(),
            key = alloy_primitives::hex::encode(self.provider.to_bytes()),
            connlog = self.connlog_dir().display(),
        )
    }

    /// Where the agent keeps the deals' connection logs.
    fn connlog_dir(&self) -> PathBuf {
        self._dir.path().join("connlog")
    }

    async fn agent(&self, capacity: u32) -> AgentHandle {
        let cfg = AgentConfig::from_toml(&self.agent_toml(capacity)).unwrap();
        let agent = Agent::start(cfg).await.unwrap();
        agent
            .wait_until(WAIT, |s| s.exits[0].order_id.is_some())
            .await
            .expect("the offer is posted");
        agent
    }

    fn requester_client(&self) -> Client {
        Client::new(
            &self.exchange.url(),
            self.deployment.chain_id,
            self.deployment.centralizer,
        )
        .unwrap()
        .with_key(self.requester.clone())
    }

    async fn chain_of(&self, key: &PrivateKeySigner) -> ChainClient {
        ChainClient::connect(self.anvil.endpoint(), self.deployment, key.clone())
            .await
            .unwrap()
    }
}

/// The requester's side of one deal.
struct Renter {
    client: Client,
    chain: ChainClient,
    wg: SecretKey,
    deal: Deal,
}

impl Renter {
    /// Posts a request for one German exit for `duration_s`, reports accepted.
    async fn rent(w: &World, duration_s: u64) -> Renter {
        let client = w.requester_client();
        let wg = SecretKey::generate();
        let (expiry, nonce) = ipsx_exchange::client::fresh();
        let req = Request {
            requester: w.requester.address(),
            count: 1,
            countries: vec!["de".parse().unwrap()],
            regions: vec![],
            cities: vec![],
            asns: vec![],
            types: vec![],
            protocols: vec![],
            min_rating: 0,
            diversity: Default::default(),
            exclude_providers: Vec::new(),
            duration_s,
            max_price_per_ip_second: PRICE,
            wg_public_key: WgKey(wg.public_key()),
            expiry,
            nonce,
        };
        let out = client.post_request(&req).await.unwrap();
        let Outcome::RequestPosted { deals, .. } = out else {
            panic!("unexpected {out:?}")
        };
        assert_eq!(deals.len(), 1, "matched at once with the agent's offer");
        let deal = client.deal(deals[0]).await.unwrap();
        assert_eq!(deal.provider, w.provider.address());
        let r = Renter {
            client,
            chain: w.chain_of(&w.requester).await,
            wg,
            deal,
        };
        r.report(PartyStatus::Accepted).await;
        r
    }

    async fn report(&self, status: PartyStatus) {
        let (expiry, nonce) = ipsx_exchange::client::fresh();
        let rep = StatusReport {
            wallet: self.chain.address(),
            deal_id: self.deal.id,
            status,
            reason: String::new(),
            expiry,
            nonce,
        };
        self.client.report(&rep).await.unwrap();
    }

    fn id(&self) -> u64 {
        self.deal.id
    }

    fn due(&self, served: Duration) -> u128 {
        amount_due(PRICE, served, WINDOW, self.deal.terms.value)
    }

    /// Starts closing the channel admitting only what is already claimed (the
    /// provider claims its latest proof in the challenge period).
    async fn close(&self, channel: B256) {
        // The provider may claim between the read and the close (its timer claims):
        // then the admitted amount is stale; read again (a few times at most).
        for attempt in 0..5 {
            let claimed = self.chain.channel(channel).await.unwrap().unwrap().claimed;
            match self.chain.start_close(channel, claimed).await {
                Ok(_) => return,
                // A stale admission reverts at the estimate or, when the claim lands
                // in the same block, on chain.
                Err(_) if attempt < 4 => {}
                Err(e) => panic!("startClose: {e}"),
            }
        }
    }

    async fn open_channel(&self, to: Address, deposit: u128) -> B256 {
        self.chain
            .open_channel(to, U256::from(deposit))
            .await
            .unwrap()
            .0
    }

    async fn tunnel(&self) -> Tunnel {
        let mut cfg = TunnelConfig::new(
            SecretKey(self.wg.0),
            self.deal.terms.provider_wg_key.0,
            self.deal.terms.wg_endpoint,
            inner_ip_for_deal(self.id()),
        );
        cfg.dns = vec![EXIT_INNER_ADDR.into()];
        Tunnel::start(cfg).await.unwrap()
    }
}

/// Fetches the whoami target through the tunnel: the address the target saw.
async fn whoami(t: &Tunnel, target: SocketAddr) -> String {
    let mut s = tokio::time::timeout(Duration::from_secs(15), t.connect_tcp(target))
        .await
        .expect("connect in time")
        .expect("connect through the tunnel");
    tokio::time::timeout(Duration::from_secs(15), common::get_body(&mut s))
        .await
        .expect("answer in time")
}

async fn wait_chain<F: Fn() -> Fut, Fut: std::future::Future<Output = bool>>(what: &str, f: F) {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

fn no_duplicate_reports(reports: &[(u64, PartyStatus)]) {
    let mut seen = std::collections::HashSet::new();
    for r in reports {
        assert!(
            seen.insert(*r),
            "status reported twice: {r:?} in {reports:?}"
        );
    }
}

/// Pays as it goes every `every` until the deal's end (cumulative, one window ahead),
/// tolerating exchange errors (it may be restarting). Returns the last amount paid.
async fn pay_until_end(r: &Renter, channel: B256, served_from: Instant, mut paid: u128) -> u128 {
    let end = r.deal.terms.end;
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if now >= end {
            return paid;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let due = r.due(served_from.elapsed());
        if due > paid && r.client.post_proof(r.id(), channel, due).await.is_ok() {
            paid = due;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_serves_after_the_first_proof_and_claims_at_the_end() {
    let w = World::new().await;
    let agent = w.agent(1).await;
    let target = common::whoami_server("127.0.0.1:0").await;
    let r = Renter::rent(&w, 12).await;
    let id = r.id();
    agent
        .wait_until(WAIT, |s| s.reports.contains(&(id, PartyStatus::Accepted)))
        .await
        .expect("the agent accepts");

    let provider_chain = w.chain_of(&w.provider).await;
    let before_provider = provider_chain.balance(w.provider.address()).await.unwrap();
    let before_treasury = provider_chain.balance(w.treasury).await.unwrap();

    let channel = r
        .open_channel(w.provider.address(), r.deal.terms.value)
        .await;
    let first = r.due(Duration::ZERO);
    r.client.post_proof(id, channel, first).await.unwrap();
    let s = agent
        .wait_until(WAIT, |s| {
            s.deal(id)
                .is_some_and(|d| d.peer_present && d.reported == PartyStatus::Active)
        })
        .await
        .expect("served after the first proof");
    assert_eq!(s.deal(id).unwrap().channel, Some(channel));
    let served_from = Instant::now();

    let tunnel = r.tunnel().await;
    assert_eq!(
        whoami(&tunnel, target).await,
        EXIT_IP,
        "the target sees the exit address"
    );
    r.report(PartyStatus::Active).await;

    // What the provider sees while serving, over its status listener.
    let base = format!("http://{}", agent.status_addr().unwrap());
    let st = ipsx_provider::status::fetch(&base, Some(STATUS_TOKEN))
        .await
        .unwrap();
    assert_eq!(st.nat_path, "direct");
    assert_eq!(st.wallet, w.provider.address().to_string());
    assert_eq!(st.offers.len(), 1);
    assert_eq!(st.offers[0].country, "de");
    assert_eq!(st.offers[0].exit_address.to_string(), EXIT_IP);
    assert!(st.offers[0].order_id.is_some());
    assert_eq!(st.offers[0].live_deals, 1);
    let d = st.deals.iter().find(|d| d.id == id).unwrap();
    assert_eq!((d.stage.as_str(), d.live), ("serving", true));
    assert_eq!(d.requester, w.requester.address().to_string());
    assert_eq!(d.ends, r.deal.terms.end);
    assert!(d.bytes_down > 0 && d.bytes_up > 0, "{d:?}");
    assert_eq!(d.paid.base_units, first);
    assert!(st.totals.earned.base_units >= first);
    assert_eq!(st.totals.live_deals, 1);
    assert!(ipsx_provider::status::render(&st).contains("serving"));
    hostile_status_requests(agent.status_addr().unwrap()).await;

    let paid = pay_until_end(&r, channel, served_from, first).await;
    r.report(PartyStatus::Completed).await;
    tunnel.shutdown().await;
    // Channels outlive deals (reuse); the requester closing it makes the provider
    // claim and close at once.
    r.close(channel).await;

    let s = agent
        .wait_until(WAIT, |s| {
            s.claims.iter().any(|c| c.deal_id == id && c.close)
                && s.deal(id).is_some_and(|d| d.rated)
        })
        .await
        .expect("closing claim and rating");
    let d = s.deal(id).unwrap();
    assert!(!d.peer_present);
    assert_eq!(d.stage, Stage::Ended);
    assert_eq!(d.claimed, paid, "the latest proof is what was claimed");
    no_duplicate_reports(&s.reports);
    assert!(s.reports.contains(&(id, PartyStatus::Completed)));
    let claims: Vec<_> = s.claims.iter().filter(|c| c.deal_id == id).collect();
    assert_eq!(claims.iter().filter(|c| c.close).count(), 1);
    assert!(
        claims
            .windows(2)
            .all(|p| p[0].amount < p[1].amount || p[1].close),
        "claims never repeat an amount: {claims:?}"
    );
    assert_eq!(s.ratings, vec![(id, 5)], "paid in full");
    let st = agent.provider_status();
    let d = st.deals.iter().find(|d| d.id == id).unwrap();
    assert_eq!((d.stage.as_str(), d.live), ("ended", false));
    assert_eq!(d.claimed.base_units, paid);
    assert_eq!(d.unclaimed.base_units, 0);
    assert_eq!(st.totals.earned.base_units, paid);
    assert_eq!(st.totals.claimed.base_units, paid);
    assert_eq!(st.totals.unclaimed.base_units, 0);

    // On chain: the provider got the amount minus the fee, the treasury the fee.
    let fee_bps = provider_chain.fee_bps().await.unwrap();
    let total = U256::from(paid);
    let fee = total * U256::from(fee_bps) / U256::from(10_000u32);
    let after_provider = provider_chain.balance(w.provider.address()).await.unwrap();
    let after_treasury = provider_chain.balance(w.treasury).await.unwrap();
    assert_eq!(after_provider - before_provider, total - fee);
    assert_eq!(after_treasury - before_treasury, fee);
    assert!(
        provider_chain.channel(channel).await.unwrap().is_none(),
        "closed"
    );

    assert_eq!(
        agent
            .exit(0)
            .unwrap()
            .meter(&r.wg.public_key())
            .unwrap()
            .flows,
        1
    );
    let events = w
        .deployer
        .centralizer()
        .ChannelClaimed_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    let ours: Vec<_> = events
        .iter()
        .filter(|(e, _)| e.channelId == channel)
        .collect();
    assert!(!ours.is_empty());
    let last = &ours.last().unwrap().0;
    assert_eq!(last.cumulativeAmount, total);
    connection_log_is_checkable(&w, &agent, id, channel, last.logHash, target).await;

    // The exchange saw both sides complete and the rating.
    wait_chain("the deal to be completed", || async {
        let d = r.client.deal(id).await.unwrap();
        d.status == DealStatus::Completed && d.rated_by_provider
    })
    .await;
    agent.shutdown().await.unwrap();
}

/// The deal's connection-log file in the agent's `connlog.dir`.
fn deal_log_file(w: &World, id: u64) -> Option<PathBuf> {
    ipsx_provider::connlog_store::find_deal_file(&w.connlog_dir(), id)
}

/// GET a deal's connection log from the agent as `who` (a signed request, no token):
/// the export, or the HTTP status and message of a refusal.
async fn fetch_log(
    agent: &AgentHandle,
    who: &PrivateKeySigner,
    provider: Address,
    deal: u64,
) -> Result<connlog::LogExport, (u16, String)> {
    let base = format!("http://{}", agent.status_addr().unwrap());
    connlog::fetch_log(
        &reqwest::Client::new(),
        &base,
        who,
        provider,
        deal,
        unix_now(),
    )
    .await
    .map_err(|e| match e {
        ipsx_exchange::ExchangeError::Remote {
            status, message, ..
        } => (status, message),
        e => panic!("{e}"),
    })
}

/// The deal's connection log, served signed to its requester, recomputes the
/// `logHash` the closing claim put on chain; someone else is refused; a record
/// dropped from the file on disk is caught.
async fn connection_log_is_checkable(
    w: &World,
    agent: &AgentHandle,
    id: u64,
    channel: B256,
    on_chain: B256,
    target: SocketAddr,
) {
    let provider = w.provider.address();
    let x = fetch_log(agent, &w.requester, provider, id).await.unwrap();
    connlog::verify_log(&x.log, id, provider, None).unwrap();
    assert_eq!(x.log.entries.len(), 1, "the one connection: {x:?}");
    assert_eq!(x.log.entries[0].dst, target);
    assert!(x.log.entries[0].bytes_down > 0);
    assert_ne!(on_chain, B256::ZERO);
    connlog::verify_commitment(&channel, &on_chain, id, &x.commits, |d| {
        (d == id).then_some(x.log.entries.as_slice())
    })
    .expect("the requester recomputes the logHash on chain");

    let (code, msg) = fetch_log(agent, &PrivateKeySigner::random(), provider, id)
        .await
        .unwrap_err();
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("signature"), "{msg}");
    let (code, _) = fetch_log(agent, &w.requester, provider, id + 1000)
        .await
        .unwrap_err();
    assert_eq!(code, 404);
    // Hostile requests: unsigned, expired, an oversized target, garbage, another method.
    let base = format!("http://{}", agent.status_addr().unwrap());
    let http = reqwest::Client::new();
    let sig = format!("0x{}", "ab".repeat(65));
    for (req, code, field) in [
        (
            http.get(format!("{base}/api/connlog/{id}?expiry=1")),
            400,
            "signature",
        ),
        (
            http.get(format!("{base}/api/connlog/{id}?expiry=1&signature={sig}")),
            400,
            "expiry",
        ),
        (
            http.get(format!(
                "{base}/api/connlog/{id}?expiry={}",
                "9".repeat(600)
            )),
            400,
            "path",
        ),
        (http.get(format!("{base}/api/connlog/x")), 400, "deal_id"),
        (http.post(format!("{base}/api/connlog/{id}")), 405, "GET"),
    ] {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), code, "{field}");
        let body = resp.text().await.unwrap();
        assert!(body.contains(field), "{field}: {body}");
    }

    // Tampering: the record dropped from the deal's file on disk.
    let file = deal_log_file(w, id).expect("the deal's log file");
    std::fs::write(&file, b"").unwrap();
    let x = fetch_log(agent, &w.requester, provider, id).await.unwrap();
    connlog::verify_log(&x.log, id, provider, None).unwrap();
    let e = connlog::verify_commitment(&channel, &on_chain, id, &x.commits, |d| {
        (d == id).then_some(x.log.entries.as_slice())
    })
    .unwrap_err();
    assert!(e.to_string().contains("entries"), "{e}");
}

/// Raw requests to the status listener: refusals are answered, none is served
/// without the token, and the listener keeps answering afterwards.
async fn hostile_status_requests(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn raw(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(req).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }
    let auth = format!("Authorization: Bearer {STATUS_TOKEN}\r\n");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GET /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), " 401 "),
        (
            b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-0123456\r\nConnection: close\r\n\r\n".to_vec(),
            " 401 ",
        ),
        (
            format!("GET /nope HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes(),
            " 404 ",
        ),
        (
            format!("GET /api/status/../../etc/passwd HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes(),
            " 404 ",
        ),
        (
            format!("DELETE /api/status HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes(),
            " 405 ",
        ),
        (
            format!(
                "GET /api/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n{auth}\r\n",
                "a".repeat(64 * 1024)
            )
            .into_bytes(),
            " 431 ",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n".to_vec(), " 400 "),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), " 200 "),
    ];
    for (req, want) in cases {
        let got = raw(addr, &req).await;
        let first = got.lines().next().unwrap_or("").to_owned();
        assert!(
            first.contains(want),
            "{:?}: expected{want}got {first:?}",
            String::from_utf8_lossy(&req[..req.len().min(60)])
        );
        assert!(
            !got.contains("\"wallet\""),
            "no status without the token: {got}"
        );
    }
    // Still serving.
    let ok = raw(
        addr,
        format!("GET /api/status HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
    assert!(ok.contains("\"nat_path\""));
}

/// A deal being served: the renter, its channel, the first payment, when service
/// started, and the tunnel (the exit address already checked through it).
struct Served {
    r: Renter,
    channel: B256,
    first: u128,
    from: Instant,
    tunnel: Tunnel,
}

/// Rents for `duration_s`, opens a channel for the deal's value, pays the first window,
/// waits until the agent serves and reports active, checks the exit address through
/// the tunnel and reports active.
async fn start_served(
    w: &World,
    agent: &AgentHandle,
    target: SocketAddr,
    duration_s: u64,
) -> Served {
    let r = Renter::rent(w, duration_s).await;
    let id = r.id();
    let channel = r
        .open_channel(w.provider.address(), r.deal.terms.value)
        .await;
    let first = r.due(Duration::ZERO);
    r.client.post_proof(id, channel, first).await.unwrap();
    agent
        .wait_until(WAIT, |s| {
            s.deal(id)
                .is_some_and(|d| d.peer_present && d.reported == PartyStatus::Active)
        })
        .await
        .expect("served after the first proof");
    let from = Instant::now();
    let tunnel = r.tunnel().await;
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    r.report(PartyStatus::Active).await;
    Served {
        r,
        channel,
        first,
        from,
        tunnel,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_keeps_the_same_exit_and_is_paid_past_the_old_value_after_a_top_up() {
    let w = World::new().await;
    let agent = w.agent(1).await;
    let target = common::whoami_server("127.0.0.1:0").await;
    let Served {
        mut r,
        channel,
        first,
        from: served_from,
        tunnel,
    } = start_served(&w, &agent, target, 15).await;
    let id = r.id();
    let (old_end, old_value) = (r.deal.terms.end, r.deal.terms.value);

    // The requester proposes 10 s more; the agent, served and paid up, agrees.
    let new_end = old_end + 10;
    let (expiry, nonce) = ipsx_exchange::client::fresh();
    let out = r
        .client
        .extend(&Extend {
            wallet: w.requester.address(),
            deal_id: id,
            new_end,
            expiry,
            nonce,
        })
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Extend {
                extended: false,
                ..
            }
        ),
        "{out:?}"
    );
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.end == new_end))
        .await
        .expect("the agent agrees and serves to the new end");
    r.deal = r.client.deal(id).await.unwrap();
    assert_eq!(r.deal.terms.end, new_end);
    assert_eq!(r.deal.terms.value, old_value + PRICE * 10);
    assert!(
        unix_now() < old_end,
        "the extension must be agreed before the old end for this test to mean anything"
    );
    // The same channel is topped up before paying past the old deposit.
    r.chain
        .top_up(channel, U256::from(PRICE * 10))
        .await
        .unwrap();
    let mut paid = first;
    while unix_now() < old_end + 2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let due = r.due(served_from.elapsed());
        if due > paid {
            r.client.post_proof(id, channel, due).await.unwrap();
            paid = due;
        }
    }
    // Past the old end the same exit still serves the requester.
    assert_eq!(
        whoami(&tunnel, target).await,
        EXIT_IP,
        "still served after the old end"
    );
    let paid = pay_until_end(&r, channel, served_from, paid).await;
    assert!(
        paid > old_value,
        "paid {paid}, the old value was {old_value}"
    );
    r.report(PartyStatus::Completed).await;
    // Channels outlive deals (reuse); the requester closing it makes the provider
    // claim and close at once.
    r.close(channel).await;
    let s = agent
        .wait_until(WAIT, |s| {
            s.claims.iter().any(|c| c.deal_id == id && c.close)
        })
        .await
        .expect("closing claim");
    let d = s.deal(id).unwrap();
    assert_eq!(d.claimed, paid, "the final claim is the last proof");
    assert!(d.proof_rejection.is_none(), "{:?}", d.proof_rejection);
    let claims: Vec<_> = s.claims.iter().filter(|c| c.deal_id == id).collect();
    assert_eq!(claims.last().unwrap().amount, paid);
    assert!(
        w.deployer.channel(channel).await.unwrap().is_none(),
        "closed"
    );
    tunnel.shutdown().await;
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_stall_removes_the_peer_and_reports_failed() {
    let w = World::new().await;
    let agent = w.agent(1).await;
    let target = common::whoami_server("127.0.0.1:0").await;
    let r = Renter::rent(&w, 20).await;
    let id = r.id();
    let channel = r
        .open_channel(w.provider.address(), r.deal.terms.value)
        .await;
    let first = r.due(Duration::ZERO);
    r.client.post_proof(id, channel, first).await.unwrap();
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.peer_present))
        .await
        .expect("served after the first proof");
    let served_from = Instant::now();
    let tunnel = r.tunnel().await;
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    r.report(PartyStatus::Active).await;

    // No more proofs: after window + grace the peer goes.
    let s = agent
        .wait_until(WAIT, |s| {
            s.deal(id)
                .is_some_and(|d| !d.peer_present && d.stage == Stage::Ended)
        })
        .await
        .expect("peer removed");
    let stopped_after = served_from.elapsed();
    let d = s.deal(id).unwrap();
    assert_eq!(d.end_reason.as_deref(), Some("payment stopped"));
    assert!(
        stopped_after >= WINDOW && stopped_after < Duration::from_secs(20),
        "removed within window + grace + a poll period or so: {stopped_after:?}"
    );
    let s = agent
        .wait_until(WAIT, |s| s.reports.contains(&(id, PartyStatus::Failed)))
        .await
        .expect("failed reported");
    no_duplicate_reports(&s.reports);
    let deal = r.client.deal(id).await.unwrap();
    assert_eq!(deal.provider_status, PartyStatus::Failed);
    assert!(
        deal.history
            .iter()
            .any(|h| h.what.contains("payment stopped")),
        "{:?}",
        deal.history
    );
    // The paid window is still claimed (closing the channel once the requester closes
    // it), and the tunnel is dead.
    r.close(channel).await;
    agent
        .wait_until(WAIT, |s| {
            s.claims
                .iter()
                .any(|c| c.deal_id == id && c.close && c.amount == first)
        })
        .await
        .expect("the first window is claimed");
    let probe = tokio::time::timeout(Duration::from_secs(5), tunnel.connect_tcp(target)).await;
    assert!(
        !matches!(probe, Ok(Ok(_))),
        "a removed peer must not reach the target"
    );
    // The provider's failure terminated the deal; the rating follows.
    assert_eq!(
        r.client.deal(id).await.unwrap().status,
        DealStatus::Terminated
    );
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.rated))
        .await
        .expect("rated");
    let s = agent.status();
    assert!(s.ratings.iter().any(|(d, score)| *d == id && *score < 5));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_for_a_channel_to_someone_else_is_never_served() {
    let w = World::new().await;
    let agent = w.agent(2).await;
    // Deal 1: the channel pays another provider (the exchange cannot know; the chain does).
    let r = Renter::rent(&w, 20).await;
    let id = r.id();
    let elsewhere = w.anvil.key(3).address();
    let channel = r.open_channel(elsewhere, r.deal.terms.value).await;
    r.client
        .post_proof(id, channel, r.due(Duration::ZERO))
        .await
        .unwrap();
    let s = agent
        .wait_until(WAIT, |s| {
            s.deal(id).is_some_and(|d| d.proof_rejection.is_some())
        })
        .await
        .expect("proof refused");
    let d = s.deal(id).unwrap();
    assert!(
        d.proof_rejection.as_ref().unwrap().contains("not us"),
        "{d:?}"
    );
    // Deal 2: a channel to us whose deposit does not cover the proof.
    let r2 = Renter::rent(&w, 20).await;
    let id2 = r2.id();
    let due = r2.due(Duration::ZERO);
    let small = r2.open_channel(w.provider.address(), due - 1).await;
    r2.client.post_proof(id2, small, due).await.unwrap();
    let s = agent
        .wait_until(WAIT, |s| {
            s.deal(id2).is_some_and(|d| d.proof_rejection.is_some())
        })
        .await
        .expect("second proof refused");
    assert!(
        s.deal(id2)
            .unwrap()
            .proof_rejection
            .as_ref()
            .unwrap()
            .contains("less than")
    );
    // A few poll periods later: still never served, no peer ever added.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = agent.status();
    for (deal, key) in [(id, r.wg.public_key()), (id2, r2.wg.public_key())] {
        let d = s.deal(deal).unwrap();
        assert_eq!(d.stage, Stage::Accepted);
        assert!(!d.peer_present && d.paid == 0);
        assert!(agent.exit(0).unwrap().meter(&key).is_none(), "never added");
        assert!(!s.reports.contains(&(deal, PartyStatus::Active)));
    }
    assert!(s.claims.is_empty());
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_restart_resumes_the_stream_without_double_actions() {
    let mut w = World::new().await;
    let agent = w.agent(1).await;
    let target = common::whoami_server("127.0.0.1:0").await;
    let Served {
        r,
        channel,
        first,
        from: served_from,
        tunnel,
    } = start_served(&w, &agent, target, 16).await;
    let id = r.id();
    let connects = agent.status().stream_connects;

    // The exchange goes away for a while: the peer keeps being served.
    w.exchange.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.status().deal(id).unwrap().peer_present,
        "served during the outage"
    );
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    w.exchange.restart().await;
    agent
        .wait_until(WAIT, |s| s.stream_connects > connects)
        .await
        .expect("the stream reconnects");

    let paid = pay_until_end(&r, channel, served_from, first).await;
    r.report(PartyStatus::Completed).await;
    // Channels outlive deals (reuse); the requester closing it makes the provider
    // claim and close at once.
    r.close(channel).await;
    let s = agent
        .wait_until(WAIT, |s| {
            s.claims.iter().any(|c| c.deal_id == id && c.close)
                && s.deal(id).is_some_and(|d| d.rated)
        })
        .await
        .expect("claimed and rated after the restart");
    no_duplicate_reports(&s.reports);
    let closes = s
        .claims
        .iter()
        .filter(|c| c.deal_id == id && c.close)
        .count();
    assert_eq!(closes, 1, "one closing claim: {:?}", s.claims);
    assert_eq!(s.deal(id).unwrap().claimed, paid);
    assert_eq!(s.ratings.iter().filter(|(d, _)| *d == id).count(), 1);
    // The chain agrees: exactly `paid` left the channel, in claims that never repeat.
    let events = w
        .deployer
        .centralizer()
        .ChannelClaimed_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    let total: U256 = events
        .iter()
        .filter(|(e, _)| e.channelId == channel)
        .map(|(e, _)| e.paid)
        .fold(U256::ZERO, |a, b| a + b);
    assert_eq!(total, U256::from(paid));
    tunnel.shutdown().await;
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_configs_name_the_key() {
    let w = World::new().await;
    let good = w.agent_toml(1);
    let start = |text: String| async move {
        let cfg = AgentConfig::from_toml(&text)?;
        Agent::start(cfg).await.map(|_| ())
    };
    // A deployment file that is not there.
    let e = start(good.replace(
        &w.deployment_path.display().to_string(),
        "/nonexistent/deployment.json",
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AgentError::Config { key, .. } if key == "chain.deployment"),
        "{e}"
    );
    // A key that is not a key.
    let key = alloy_primitives::hex::encode(w.provider.to_bytes());
    let e = start(good.replace(&key, &"zz".repeat(32)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Config { key, .. } if key == "wallet.private_key"),
        "{e}"
    );
    // A chain that is not there.
    let e = start(good.replace(w.anvil.endpoint(), "http://127.0.0.1:9"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Chain { rpc_url, .. } if rpc_url == "http://127.0.0.1:9"),
        "{e}"
    );
    // A keystore that is not there.
    let e = start(good.replace(
        &format!("private_key = \"0x{key}\""),
        "keystore = \"/nonexistent/k.json\"",
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AgentError::Wallet(m) if m.contains("/nonexistent/k.json")),
        "{e}"
    );
    // A listen address the exit cannot bind (an address of no local interface).
    let e = start(good.replace(
        &format!("listen = \"{EXIT_IP}:0\""),
        "listen = \"192.0.2.1:0\"",
    ))
    .await
    .unwrap_err();
    assert!(matches!(&e, AgentError::Exit { index: 0, .. }), "{e}");
    // A status listener address already taken: an explicit [status] must bind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = start(good.replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", taken.local_addr().unwrap()),
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AgentError::Config { key, .. } if key == "status.listen"),
        "{e}"
    );
    // Parse errors name the key.
    for (from, to, key) in [
        ("capacity = 1", "capacity = \"one\"", "exit[0].capacity"),
        ("grace = \"3s\"", "grace = 3", "timings.grace"),
        (
            "country = \"de\"",
            "country = \"germany\"",
            "exit[0].country",
        ),
        ("[chain]", "[chain]\nrpc = \"x\"", "chain"),
    ] {
        let e = start(good.replace(from, to)).await.unwrap_err();
        assert!(
            matches!(&e, AgentError::Config { key: k, .. } if k.contains(key)),
            "{to}: {e}"
        );
    }
}

#[test]
fn the_example_config_parses() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/provider-agent.toml");
    let cfg = AgentConfig::load(&path).unwrap();
    assert!(!cfg.exits.is_empty());
    assert!(cfg.wallet.keystore.is_some() || cfg.wallet.private_key.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_claims_at_shutdown_and_serves_again_from_the_exchange_view() {
    let w = World::new().await;
    let wg_key = SecretKey::generate();
    let key_line = format!(
        "private_key = \"{}\"\ncountry = \"de\"",
        ipsx_tunnel_pool::key_to_base64(&wg_key.0)
    );
    let text = w.agent_toml(1).replace("country = \"de\"", &key_line);
    let agent = Agent::start(AgentConfig::from_toml(&text).unwrap())
        .await
        .unwrap();
    let s = agent
        .wait_until(WAIT, |s| s.exits[0].order_id.is_some())
        .await
        .unwrap();
    let port = s.exits[0].endpoint.port();
    let target = common::whoami_server("127.0.0.1:0").await;
    let Served {
        r,
        channel,
        from: served_from,
        tunnel,
        ..
    } = start_served(&w, &agent, target, 20).await;
    let id = r.id();
    let second = r.due(Duration::from_secs(2));
    r.client.post_proof(id, channel, second).await.unwrap();
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.paid == second))
        .await
        .expect("second proof verified");
    tunnel.shutdown().await;

    // Shutdown flushes payment: the latest proof is claimed (channel left open).
    agent.shutdown().await.unwrap();
    let chain = w.chain_of(&w.provider).await;
    let ch = chain.channel(channel).await.unwrap().expect("still open");
    assert_eq!(ch.claimed, U256::from(second));

    // The deal's connection log is on disk (what the next agent resumes).
    let logged = deal_log_file(&w, id)
        .map(|f| std::fs::metadata(f).unwrap().len())
        .unwrap_or(0)
        / connlog::ENTRY_LEN as u64;
    assert!(logged >= 1, "the connection before the restart is on disk");

    // A new agent (same wallet, same WireGuard key and port) learns the deal from the
    // exchange, checks the proof again and serves; it reports nothing already reported.
    let text2 = text.replace(
        &format!("listen = \"{EXIT_IP}:0\""),
        &format!("listen = \"{EXIT_IP}:{port}\""),
    );
    let mut agent2 = None;
    for _ in 0..50 {
        match Agent::start(AgentConfig::from_toml(&text2).unwrap()).await {
            Ok(a) => {
                agent2 = Some(a);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let agent2 = agent2.expect("the agent restarts on its port");
    agent2
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.peer_present))
        .await
        .expect("served again after the restart");
    let tunnel = r.tunnel().await;
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    let paid = pay_until_end(&r, channel, served_from, second).await;
    r.report(PartyStatus::Completed).await;
    // Channels outlive deals (reuse); the requester closing it makes the provider
    // claim and close at once.
    r.close(channel).await;
    let s = agent2
        .wait_until(WAIT, |s| {
            s.claims.iter().any(|c| c.deal_id == id && c.close)
                && s.deal(id).is_some_and(|d| d.rated)
        })
        .await
        .expect("closing claim after the restart");
    let mine: Vec<_> = s.reports.iter().filter(|(d, _)| *d == id).collect();
    assert_eq!(
        mine,
        vec![&(id, PartyStatus::Completed)],
        "no report repeated"
    );
    let events = w
        .deployer
        .centralizer()
        .ChannelClaimed_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    let total: U256 = events
        .iter()
        .filter(|(e, _)| e.channelId == channel)
        .map(|(e, _)| e.paid)
        .fold(U256::ZERO, |a, b| a + b);
    assert_eq!(total, U256::from(paid), "paid exactly once in total");
    // The log went on from disk: the connections of both agents, and the closing
    // claim's logHash recomputes from them.
    let last = events
        .iter()
        .filter(|(e, _)| e.channelId == channel)
        .map(|(e, _)| e.logHash)
        .next_back()
        .unwrap();
    let x = fetch_log(&agent2, &w.requester, w.provider.address(), id)
        .await
        .unwrap();
    connlog::verify_log(&x.log, id, w.provider.address(), None).unwrap();
    assert_eq!(x.log.entries.len() as u64, logged + 1, "{x:?}");
    connlog::verify_commitment(&channel, &last, id, &x.commits, |d| {
        (d == id).then_some(x.log.entries.as_slice())
    })
    .expect("the closing claim commits the log resumed from disk");
    tunnel.shutdown().await;
    agent2.shutdown().await.unwrap();
}

/// A TCP forwarder to `upstream` that can be cut: while down, live connections are
/// dropped and new ones closed at once (the chain RPC "goes away").
struct Cuttable {
    addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

async fn cuttable(upstream: SocketAddr) -> Cuttable {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (up, up_rx) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            if !*up_rx.borrow() {
                continue;
            }
            let mut rx = up_rx.clone();
            tokio::spawn(async move {
                let Ok(mut u) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                    _ = rx.wait_for(|v| !*v) => {}
                }
            });
        }
    });
    Cuttable { addr, up }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_outage_keeps_serving_and_claims_after_recovery() {
    let w = World::new().await;
    let upstream: SocketAddr = w
        .anvil
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let rpc = cuttable(upstream).await;
    let text = w
        .agent_toml(1)
        .replace(w.anvil.endpoint(), &format!("http://{}", rpc.addr));
    let agent = Agent::start(AgentConfig::from_toml(&text).unwrap())
        .await
        .unwrap();
    agent
        .wait_until(WAIT, |s| s.exits[0].order_id.is_some())
        .await
        .unwrap();
    let target = common::whoami_server("127.0.0.1:0").await;
    let r = Renter::rent(&w, 20).await;
    let id = r.id();
    let channel = r
        .open_channel(w.provider.address(), r.deal.terms.value)
        .await;
    let first = r.due(Duration::ZERO);
    r.client.post_proof(id, channel, first).await.unwrap();
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.peer_present))
        .await
        .expect("served");
    let served_from = Instant::now();
    let tunnel = r.tunnel().await;
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    r.report(PartyStatus::Active).await;

    // The chain RPC goes away for longer than window + grace and a claim interval.
    rpc.up.send_replace(false);
    let claims_before = agent.status().claims.len();
    let mut paid = first;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let due = r.due(served_from.elapsed());
        r.client.post_proof(id, channel, due).await.unwrap();
        paid = due;
    }
    let s = agent
        .wait_until(Duration::from_secs(10), |s| {
            s.deal(id).is_some_and(|d| d.paid == paid)
        })
        .await
        .expect("proofs verified from the known channel while the chain is down");
    let d = s.deal(id).unwrap();
    assert!(d.peer_present && d.stage == Stage::Serving, "{d:?}");
    assert_eq!(
        s.claims.len(),
        claims_before,
        "no claim can land while the chain is down"
    );
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP, "still served");

    // Back: the queued claim goes through, the deal settles, nothing is paid twice.
    rpc.up.send_replace(true);
    let paid = pay_until_end(&r, channel, served_from, paid).await;
    r.report(PartyStatus::Completed).await;
    // Channels outlive deals (reuse); the requester closing it makes the provider
    // claim and close at once.
    r.close(channel).await;
    let s = agent
        .wait_until(WAIT, |s| {
            s.claims.iter().any(|c| c.deal_id == id && c.close)
        })
        .await
        .expect("closing claim after the outage");
    no_duplicate_reports(&s.reports);
    let amounts: Vec<u128> = s
        .claims
        .iter()
        .filter(|c| c.deal_id == id)
        .map(|c| c.amount)
        .collect();
    assert_eq!(amounts.last(), Some(&paid), "{amounts:?}");
    assert!(amounts.windows(2).all(|p| p[0] <= p[1]), "{amounts:?}");
    let events = w
        .deployer
        .centralizer()
        .ChannelClaimed_filter()
        .from_block(0)
        .query()
        .await
        .unwrap();
    let total: U256 = events
        .iter()
        .filter(|(e, _)| e.channelId == channel)
        .map(|(e, _)| e.paid)
        .fold(U256::ZERO, |a, b| a + b);
    assert_eq!(total, U256::from(paid));
    tunnel.shutdown().await;
    agent.shutdown().await.unwrap();
}

/// NAT traversal through the deal protocol: the exit learns its mapping from a STUN
/// server (coturn), the requester's tunnel learns its own and reports it to the
/// exchange, the agent hands it to the exit with the peer and reports the deal's path.
/// On loopback nothing is translated, so the path is `direct`; the NAT cases proper run
/// in namespaces (`interop.rs`, module `nat`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_endpoint_and_the_path_travel_through_the_exchange() {
    let stun = natlab::LoopbackStun::start();
    let w = World::new().await;
    let extra = format!("[exit.nat]\nstun = [\"{}\"]\ntimeout_s = 3\n", stun.addr);
    let cfg = AgentConfig::from_toml(&w.agent_toml_with(1, &extra)).unwrap();
    let agent = Agent::start(cfg).await.unwrap();
    let s = agent
        .wait_until(WAIT, |s| s.exits[0].order_id.is_some())
        .await
        .expect("the offer is posted");
    assert_eq!(s.exits[0].nat_path, ipsx_tunnel_pool::NatPath::Direct);
    assert_eq!(agent.nat_path(0), Some(ipsx_tunnel_pool::NatPath::Direct));
    let target = common::whoami_server("127.0.0.1:0").await;
    let r = Renter::rent(&w, 12).await;
    let id = r.id();
    // The offer advertised what STUN saw: the exit's own loopback address and port.
    assert_eq!(
        r.deal.terms.wg_endpoint,
        agent.exit(0).unwrap().public_endpoint().unwrap()
    );

    let mut cfg = TunnelConfig::new(
        SecretKey(r.wg.0),
        r.deal.terms.provider_wg_key.0,
        r.deal.terms.wg_endpoint,
        inner_ip_for_deal(id),
    );
    cfg.dns = vec![EXIT_INNER_ADDR.into()];
    cfg.nat.stun = vec![stun.addr];
    let tunnel = Tunnel::start(cfg).await.unwrap();
    let ep = tunnel.public_endpoint().expect("the tunnel's mapping");
    assert_eq!(ep.port(), tunnel.local_addr().port());
    let (expiry, nonce) = ipsx_exchange::client::fresh();
    r.client
        .report_endpoint(&ipsx_exchange::EndpointReport {
            wallet: w.requester.address(),
            deal_id: id,
            endpoint: ep,
            path: ipsx_exchange::DealPath::Direct,
            expiry,
            nonce,
        })
        .await
        .unwrap();

    let channel = r
        .open_channel(w.provider.address(), r.deal.terms.value)
        .await;
    r.client
        .post_proof(id, channel, r.due(Duration::ZERO))
        .await
        .unwrap();
    agent
        .wait_until(WAIT, |s| s.deal(id).is_some_and(|d| d.peer_present))
        .await
        .expect("served after the first proof");
    assert_eq!(whoami(&tunnel, target).await, EXIT_IP);
    // The exchange recorded both: the requester's endpoint and the provider's path.
    let mut deal = r.client.deal(id).await.unwrap();
    for _ in 0..100 {
        if deal.path.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        deal = r.client.deal(id).await.unwrap();
    }
    assert_eq!(deal.requester_endpoint, Some(ep));
    assert_eq!(deal.path, Some(ipsx_exchange::DealPath::Direct));
    tunnel.shutdown().await;
    agent.shutdown().await.unwrap();
}
