//! Tokio glue around [`Core`]: the exits, the offer refresher, the event stream (resumed
//! from the last event id), the deal-list poll, and the network actions (reports, proof
//! checks, claims, ratings) run as tasks whose results come back to one loop.
//!
//! One task owns the core; everything else talks to it through a channel, so the core
//! never waits on the network and a slow chain never stalls the tunnels.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256, Bytes, U256};
use alloy_signer_local::PrivateKeySigner;
use ipsx_chain::{BalanceProof, ChainClient, ChannelDomain, ChannelState, Deployment};
use ipsx_exchange_client::api::EventKind;
use ipsx_exchange_client::api::Outcome;
use ipsx_exchange_client::market::EXIT_INNER_ADDR;
use ipsx_exchange_client::{
    Client, Deal, DealEvent, DealPath, EndpointReport, ExchangeError, Extend, Offer, PartyStatus,
    Rating, StatusReport, WgKey,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::AgentError;
use super::config::{
    AgentConfig, ClaimThreshold, DEFAULT_STATUS_LISTEN, ExitSection, WalletSection,
};
use super::core::{
    Action, ChannelFacts, Core, DealInfo, DealView, ExitSlot, Failure, Observation, Settings,
};
use super::verify::check_proof;
use crate::connlog_store::{ConnLogStore, ServeError};
use crate::status::{
    Amount, DealStatus, ExtraRoutes, OfferStatus, ProviderStatus, STATUS_VERSION, StatusSource,
    Totals, stage_name,
};
use crate::{ProviderConfig, ProviderError, ProviderExit, ProviderHandle};

/// How often the core's clocks are looked at (payment, deal ends, retries).
const TICK: Duration = Duration::from_millis(200);
/// Longest wait between retries of a failed action.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long shutdown may spend on final claims and offer cancels.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(15);
/// Transactions are awaited this long.
const TX_TIMEOUT: Duration = Duration::from_secs(60);

/// One exit as shown in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit address offered.
    pub exit_address: IpAddr,
    /// The WireGuard endpoint advertised.
    pub endpoint: SocketAddr,
    /// The exit's WireGuard public key (base64).
    pub public_key: String,
    /// How requesters reach the exit (`direct`, `punched`, `relayed`), as NAT traversal
    /// found at start.
    pub nat_path: ipsx_tunnel_pool::NatPath,
    /// The offer currently in the book, if any.
    pub order_id: Option<u64>,
    /// Offers posted so far (refreshes included).
    pub offers_posted: u64,
}

/// A claim that went on chain (or found the channel already settled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    /// Deal.
    pub deal_id: u64,
    /// Channel.
    pub channel_id: B256,
    /// What this claim added (cumulative minus what was claimed before).
    pub paid: u128,
    /// Cumulative amount claimed.
    pub amount: u128,
    /// The claim closed the channel.
    pub close: bool,
    /// The connection-log hash sent with it.
    pub log_hash: B256,
    /// Transaction, if one was sent.
    pub tx_hash: Option<B256>,
}

/// A snapshot of what the agent did and where its deals are.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    /// The provider's wallet.
    pub wallet: Address,
    /// The exits.
    pub exits: Vec<ExitStatus>,
    /// Deals in view (settled ones leave it ten minutes after their end).
    pub deals: Vec<DealView>,
    /// Status reports the exchange accepted, in order (the latest 10,000).
    pub reports: Vec<(u64, PartyStatus)>,
    /// Claims, in order (the latest 10,000).
    pub claims: Vec<ClaimRecord>,
    /// Ratings given (the latest 10,000).
    pub ratings: Vec<(u64, u8)>,
    /// Event-stream connections opened.
    pub stream_connects: u64,
    /// Id of the last event received.
    pub last_event_id: u64,
    /// Successful deal-list polls.
    pub polls: u64,
    /// Verified payments since the agent started (growth of every deal's latest
    /// verified proof), base units.
    pub earned_total: u128,
    /// Claimed on chain since the agent started, base units.
    pub claimed_total: u128,
}

impl AgentStatus {
    /// One deal's view.
    pub fn deal(&self, id: u64) -> Option<&DealView> {
        self.deals.iter().find(|d| d.id == id)
    }
}

/// Starts agents.
#[derive(Debug)]
pub struct Agent;

/// A running agent.
#[derive(Debug)]
pub struct AgentHandle {
    wallet: Address,
    status: watch::Receiver<AgentStatus>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    exits: Vec<ProviderHandle>,
    view: Arc<StatusView>,
    status_addr: Option<SocketAddr>,
    status_task: Option<JoinHandle<()>>,
}

/// What the status listener and [`AgentHandle::provider_status`] build from.
#[derive(Debug)]
struct StatusView {
    sections: Vec<ExitSection>,
    exits: Vec<ProviderHandle>,
    status: watch::Receiver<AgentStatus>,
}

impl StatusView {
    /// The NAT paths requesters reach this provider's exits by (`direct`, `punched`,
    /// `relayed`), each once, in exit order (`direct, relayed` for a mixed agent).
    fn nat_path(&self) -> String {
        let mut paths: Vec<&'static str> = Vec::new();
        for p in self.exits.iter().map(|h| h.nat_path().as_str()) {
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
        if paths.is_empty() {
            "direct".to_owned()
        } else {
            paths.join(", ")
        }
    }

    fn build(&self) -> ProviderStatus {
        let st = self.status.borrow();
        let meters: Vec<std::collections::HashMap<[u8; 32], crate::MeterSnapshot>> = self
            .exits
            .iter()
            .map(|h| h.meters().into_iter().collect())
            .collect();
        let live = |d: &DealView| matches!(d.stage, super::Stage::Accepted | super::Stage::Serving);
        let offers = self
            .sections
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let shown = st.exits.get(i);
                let c = self
                    .exits
                    .get(i)
                    .map(ProviderHandle::counters)
                    .unwrap_or_default();
                OfferStatus {
                    exit_address: x.exit_address,
                    endpoint: shown.map_or(x.listen, |e| e.endpoint),
                    public_key: shown.map(|e| e.public_key.clone()).unwrap_or_default(),
                    country: x.country.as_str().to_owned(),
                    kind: x.kind.as_str().to_owned(),
                    price_per_ip_second: Amount::new(x.price_per_ip_second.0),
                    capacity: x.capacity,
                    order_id: shown.and_then(|e| e.order_id),
                    offers_posted: shown.map_or(0, |e| e.offers_posted),
                    live_deals: st
                        .deals
                        .iter()
                        .filter(|d| d.exit == Some(i) && live(d))
                        .count() as u32,
                    flows_live: c.flows_live,
                    flows_limited: c.limited + c.rate_limited,
                }
            })
            .collect();
        let deals = st
            .deals
            .iter()
            .map(|d| {
                let m = d
                    .exit
                    .and_then(|i| meters.get(i))
                    .and_then(|m| m.get(&d.requester_wg_key))
                    .copied()
                    .unwrap_or_default();
                DealStatus {
                    id: d.id,
                    requester: d.requester.to_string(),
                    exit_address: d
                        .exit
                        .and_then(|i| self.sections.get(i))
                        .map(|x| x.exit_address),
                    stage: stage_name(d.stage).to_owned(),
                    live: live(d),
                    started: d.start,
                    ends: d.end,
                    bytes_up: m.bytes_up,
                    bytes_down: m.bytes_down,
                    paid: Amount::new(d.paid),
                    claimed: Amount::new(d.claimed),
                    unclaimed: Amount::new(d.paid.saturating_sub(d.claimed)),
                    end_reason: d.end_reason.clone(),
                }
            })
            .collect();
        let (mut up, mut down) = (0u64, 0u64);
        for m in meters.iter().flat_map(|m| m.values()) {
            up = up.saturating_add(m.bytes_up);
            down = down.saturating_add(m.bytes_down);
        }
        ProviderStatus {
            version: STATUS_VERSION,
            wallet: st.wallet.to_string(),
            nat_path: self.nat_path(),
            generated_unix_ms: now_ms(),
            offers,
            deals,
            totals: Totals {
                bytes_up: up,
                bytes_down: down,
                earned: Amount::new(st.earned_total),
                claimed: Amount::new(st.claimed_total),
                unclaimed: Amount::new(st.earned_total.saturating_sub(st.claimed_total)),
                live_deals: st.deals.iter().filter(|d| live(d)).count() as u64,
            },
        }
    }
}

impl AgentHandle {
    /// What `GET /api/status` answers now: offers, deals, bytes, earnings, NAT path.
    pub fn provider_status(&self) -> ProviderStatus {
        self.view.build()
    }

    /// The NAT paths requesters reach this provider's exits by, as the status shows
    /// them (`direct`, `punched`, `relayed`; `direct, relayed` for a mixed agent).
    pub fn nat_paths(&self) -> String {
        self.view.nat_path()
    }

    /// The address the status listener is bound to, if it runs.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// The provider's wallet address.
    pub fn wallet(&self) -> Address {
        self.wallet
    }

    /// The latest status snapshot.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Exit `i`'s WireGuard server (meters, log hashes).
    pub fn exit(&self, i: usize) -> Option<&ProviderHandle> {
        self.exits.get(i)
    }

    /// How requesters reach exit `i` (`direct`, `punched` behind a cone NAT, `relayed`
    /// through TURN); `None` for no such exit.
    pub fn nat_path(&self, i: usize) -> Option<ipsx_tunnel_pool::NatPath> {
        self.exits.get(i).map(ProviderHandle::nat_path)
    }

    /// Waits (at most `timeout`) until `pred` holds for a status snapshot; returns it.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> Option<AgentStatus> {
        let mut rx = self.status.clone();
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return Some(s.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Stops: cancels the offers, claims the latest proofs, stops the exits.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let _ = self.stop.send(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let r = match task {
            Some(t) => t.await.map_err(|e| AgentError::Task(e.to_string())),
            None => Ok(()),
        };
        for x in &self.exits {
            x.shutdown().await;
        }
        if let Some(t) = &self.status_task {
            t.abort();
        }
        r
    }
}

/// Most entries kept in each history list of the status (reports, claims, ratings).
const HISTORY: usize = 10_000;

fn push_capped<T>(v: &mut Vec<T>, item: T) {
    if v.len() >= HISTORY {
        v.drain(..HISTORY / 10);
    }
    v.push(item);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unix_s() -> u64 {
    now_ms() / 1000
}

/// Nonces unique within this process and increasing across restarts (clock-seeded).
fn next_nonce() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut cur = LAST.load(Ordering::Relaxed);
    loop {
        let next = clock.max(cur.saturating_add(1));
        match LAST.compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(v) => cur = v,
        }
    }
}

fn load_wallet(w: &WalletSection) -> Result<PrivateKeySigner, AgentError> {
    if let Some(hex) = &w.private_key {
        return PrivateKeySigner::from_str(hex.0.trim()).map_err(|_| AgentError::Config {
            key: "wallet.private_key".into(),
            reason: "not a valid secp256k1 private key (64 hex digits)".into(),
        });
    }
    let keystore = w.keystore.clone().ok_or_else(|| AgentError::Config {
        key: "wallet.keystore".into(),
        reason: "missing".into(),
    })?;
    let args = ipsx_chain::cli::KeyArgs {
        keystore,
        password_file: w.password_file.clone(),
        password_env: w.password_env.clone(),
        private_key_env: None,
    };
    ipsx_chain::cli::load_signer(&args).map_err(|e| AgentError::Wallet(e.to_string()))
}

fn classify(e: &ExchangeError) -> Failure {
    match e {
        ExchangeError::Remote { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429 =>
        {
            Failure::Permanent(e.to_string())
        }
        _ => Failure::Transient(e.to_string()),
    }
}

fn observation(d: &Deal) -> Observation {
    Observation {
        info: DealInfo {
            id: d.id,
            requester: d.requester,
            exit_address: d.terms.exit_address,
            provider_wg_key: d.terms.provider_wg_key.0,
            requester_wg_key: d.terms.requester_wg_key.0,
            price: d.terms.price_per_ip_second,
            value: d.terms.value,
            start: d.terms.start,
            end: d.terms.end,
        },
        provider_status: d.provider_status,
        requester_status: d.requester_status,
        status: d.status,
        proof_amount: d.proof.as_ref().map(|p| p.cumulative_amount),
        rated_by_provider: d.rated_by_provider,
        provider_new_end: d.provider_new_end,
        requester_new_end: d.requester_new_end,
        requester_endpoint: d.requester_endpoint,
    }
}

fn small(v: U256) -> u128 {
    u128::try_from(v).unwrap_or(u128::MAX)
}

fn facts(c: ChannelState) -> ChannelFacts {
    ChannelFacts {
        id: c.id,
        requester: c.requester,
        provider: c.provider,
        deposit: small(c.deposit),
        claimed: small(c.claimed),
        closing: c.settle_after.is_some(),
    }
}

/// What the offer refresher needs of one exit.
#[derive(Debug, Clone)]
struct OfferTemplate {
    section: ExitSection,
    endpoint: SocketAddr,
    wg_key: [u8; 32],
}

impl OfferTemplate {
    fn offer(&self, provider: Address, ttl: Duration) -> Offer {
        let x = &self.section;
        Offer {
            provider,
            exit_address: x.exit_address,
            country: x.country,
            region: x.region.clone(),
            city: x.city.clone(),
            asn: x.asn,
            kind: x.kind,
            protocols: x.protocols.clone(),
            price_per_ip_second: x.price_per_ip_second.0,
            min_duration_s: x.min_duration.as_secs(),
            max_duration_s: x.max_duration.as_secs(),
            capacity: x.capacity,
            wg_endpoint: self.endpoint,
            wg_public_key: WgKey(self.wg_key),
            expiry: unix_s().saturating_add(ttl.as_secs()),
            nonce: next_nonce(),
        }
    }
}

enum Msg {
    Event(Box<DealEvent>),
    StreamUp,
    Polled(Result<Vec<Deal>, String>),
    Fetched(u64, Option<Box<Deal>>),
    Reported(u64, PartyStatus, Result<(), Failure>),
    Checked(u64, Result<super::core::VerifiedProof, Failure>),
    Claimed(
        B256,
        u128,
        bool,
        Result<(bool, Option<ClaimRecord>), Failure>,
    ),
    Rated(u64, u8, Result<(), Failure>),
    Extended(u64, u64, Result<(), Failure>),
    Offer(usize, u64),
    ChannelRead(B256, Result<Option<ChannelFacts>, Failure>),
    ClaimThreshold(u128),
}

#[derive(Clone)]
struct Net {
    client: Client,
    chain: ChainClient,
    wallet: Address,
    domain: ChannelDomain,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Agent {
    /// Loads the wallet and the deployment, connects to the chain, starts every exit,
    /// then (in the background) polls the deal list, follows the event stream and
    /// keeps the offers posted.
    pub async fn start(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
        Self::start_with_routes(cfg, None).await
    }

    /// As [`Agent::start`], the status listener also serving `extra` routes (the
    /// provider dashboard page).
    pub async fn start_with_routes(
        cfg: AgentConfig,
        extra: Option<ExtraRoutes>,
    ) -> Result<AgentHandle, AgentError> {
        cfg.validate()?;
        let status_listener = bind_status(&cfg).await?;
        let signer = load_wallet(&cfg.wallet)?;
        let wallet = signer.address();
        let connlog_dir = cfg.connlog.dir_for(wallet);
        let connlog = Arc::new(
            ConnLogStore::open(&connlog_dir, cfg.connlog.limits()).map_err(|e| {
                AgentError::Config {
                    key: "connlog.dir".into(),
                    reason: format!("{}: {e}", connlog_dir.display()),
                }
            })?,
        );
        let log_key = signer.clone();
        let deployment =
            Deployment::load(&cfg.chain.deployment).map_err(|e| AgentError::Config {
                key: "chain.deployment".into(),
                reason: e.to_string(),
            })?;
        let chain = ChainClient::connect(&cfg.chain.rpc_url, deployment, signer.clone())
            .await
            .map_err(|e| AgentError::Chain {
                rpc_url: cfg.chain.rpc_url.clone(),
                reason: e.to_string(),
            })?
            .with_tx_timeout(TX_TIMEOUT);
        let client = Client::new(
            &cfg.exchange.url,
            deployment.chain_id,
            deployment.centralizer,
        )
        .map_err(|e| AgentError::Exchange {
            url: cfg.exchange.url.clone(),
            reason: e.to_string(),
        })?
        .with_key(signer);

        let mut exits = Vec::new();
        let mut templates = Vec::new();
        let mut slots = Vec::new();
        let mut exit_status = Vec::new();
        for (i, x) in cfg.exits.iter().enumerate() {
            let key = match &x.private_key {
                Some(k) => k.0,
                None => ipsx_tunnel_pool::SecretKey::generate().0,
            };
            let mut pc = ProviderConfig::new(x.listen, key, x.exit_address);
            pc.inner_address = EXIT_INNER_ADDR;
            pc.dns_upstream = x.dns_upstream;
            pc.protocols = x.protocols.clone();
            pc.allow_destinations = x.allow_destinations.clone();
            pc.own_addresses = x.own_addresses.clone();
            pc.limits = cfg.limits;
            pc.nat = x.nat.clone();
            let handle = match ProviderExit::start(pc).await {
                Ok(h) => h,
                Err(source) => {
                    for h in &exits {
                        ProviderHandle::shutdown(h).await;
                    }
                    return Err(AgentError::Exit { index: i, source });
                }
            };
            let bound = handle.local_addr();
            let endpoint = x.endpoint.or(handle.public_endpoint()).unwrap_or_else(|| {
                let ip = if bound.ip().is_unspecified() {
                    x.exit_address
                } else {
                    bound.ip()
                };
                SocketAddr::new(ip, bound.port())
            });
            templates.push(OfferTemplate {
                section: x.clone(),
                endpoint,
                wg_key: handle.public_key(),
            });
            slots.push(ExitSlot {
                wg_key: handle.public_key(),
                capacity: x.capacity,
                max_duration: x.max_duration,
            });
            exit_status.push(ExitStatus {
                exit_address: x.exit_address,
                endpoint,
                public_key: ipsx_tunnel_pool::key_to_base64(&handle.public_key()),
                nat_path: handle.nat_path(),
                order_id: None,
                offers_posted: 0,
            });
            exits.push(handle);
        }

        let t = cfg.timings;
        let settings = Settings {
            first_window: t.first_window,
            grace: t.grace,
            // Until the gas price is read: 1 gwei.
            claim_threshold: t.claim_threshold.resolve(1_000_000_000),
            claim_interval: t.claim_interval,
            channel_refresh: t.poll,
            fresh_for: t
                .poll
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1)),
            retry_base: Duration::from_millis(250),
            retry_max: RETRY_MAX,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let status = AgentStatus {
            wallet,
            exits: exit_status,
            ..AgentStatus::default()
        };
        let (status_tx, status_rx) = watch::channel(status.clone());
        let net = Net {
            client,
            chain,
            wallet,
            domain: deployment.domain(),
            tx,
        };
        let rt = Runtime {
            core: Core::new(settings, slots),
            net,
            exits: exits.clone(),
            status,
            status_tx,
            fetching: HashSet::new(),
            connlog: connlog.clone(),
            polling: false,
            poll_every: t.poll,
        };
        if t.claim_threshold == ClaimThreshold::Auto {
            tokio::spawn(gas_price_loop(rt.net.clone(), stop_rx.clone()));
        }
        let offers = tokio::spawn(offer_loop(
            rt.net.clone(),
            templates,
            t.offer_ttl,
            stop_rx.clone(),
        ));
        let view = Arc::new(StatusView {
            sections: cfg.exits.clone(),
            exits: exits.clone(),
            status: status_rx.clone(),
        });
        let mut status_addr = None;
        let mut status_task = None;
        if let Some(listener) = status_listener {
            status_addr = listener.local_addr().ok();
            let token = cfg
                .status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .map(|t| t.0.clone());
            let v = view.clone();
            let source: StatusSource = Arc::new(move || v.build());
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            tracing::info!(addr = ?status_addr, "provider status listening (GET /api/status)");
            let open = connlog_route(connlog, log_key);
            status_task = Some(tokio::spawn(crate::status::serve(
                listener,
                source,
                token,
                extra,
                Some(open),
                shutdown,
            )));
        }
        let task = tokio::spawn(rt.run(rx, stop_rx, offers));
        Ok(AgentHandle {
            wallet,
            status: status_rx,
            stop,
            task: Mutex::new(Some(task)),
            exits,
            view,
            status_addr,
            status_task,
        })
    }
}

struct Runtime {
    core: Core,
    net: Net,
    exits: Vec<ProviderHandle>,
    status: AgentStatus,
    status_tx: watch::Sender<AgentStatus>,
    fetching: HashSet<u64>,
    /// Each deal's connection log.
    connlog: Arc<ConnLogStore>,
    polling: bool,
    poll_every: Duration,
}

/// How often `claim_threshold = "auto"` reads the gas price again.
const GAS_PRICE_EVERY: Duration = Duration::from_secs(600);

/// Keeps the automatic claim threshold in step with the chain's gas price.
async fn gas_price_loop(net: Net, mut stop: watch::Receiver<bool>) {
    loop {
        match net.chain.gas_price().await {
            Ok(p) => {
                let _ = net
                    .tx
                    .send(Msg::ClaimThreshold(ClaimThreshold::Auto.resolve(p)));
            }
            Err(e) => tracing::warn!(error = %e, "reading the gas price for the claim threshold"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(GAS_PRICE_EVERY) => {}
        }
    }
}

impl Runtime {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut stop: watch::Receiver<bool>,
        offers: JoinHandle<()>,
    ) {
        let mut stream: Option<JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some(msg) = rx.recv() => {
                    let first_poll = matches!(msg, Msg::Polled(Ok(_))) && stream.is_none();
                    self.handle(msg);
                    // The stream starts after the first poll, so replayed history
                    // meets deals already known and needs no fetches.
                    if first_poll {
                        stream = Some(tokio::spawn(stream_loop(self.net.clone(), stop.clone())));
                    }
                }
                _ = tick.tick() => {}
                _ = poll.tick() => self.spawn_poll(),
            }
            self.run_actions().await;
            self.publish();
        }
        if let Some(s) = stream {
            s.abort();
        }
        self.finish(offers).await;
        self.publish();
    }

    fn publish(&mut self) {
        self.status.deals = self.core.deals();
        self.status_tx.send_replace(self.status.clone());
    }

    fn spawn_poll(&mut self) {
        if self.polling {
            return;
        }
        self.polling = true;
        let net = self.net.clone();
        tokio::spawn(async move {
            let r = net
                .client
                .deals_of(net.wallet)
                .await
                .map_err(|e| e.to_string());
            let _ = net.tx.send(Msg::Polled(r));
        });
    }

    fn fetch(&mut self, id: u64) {
        if !self.fetching.insert(id) {
            return;
        }
        let net = self.net.clone();
        tokio::spawn(async move {
            let d = net.client.deal(id).await.ok().map(Box::new);
            let _ = net.tx.send(Msg::Fetched(id, d));
        });
    }

    fn handle(&mut self, msg: Msg) {
        let now = now_ms();
        match msg {
            Msg::Polled(r) => {
                self.polling = false;
                match r {
                    Ok(deals) => {
                        self.status.polls += 1;
                        self.core.exchange_contact(now);
                        for d in deals.iter().filter(|d| d.provider == self.net.wallet) {
                            self.core.observe(observation(d), now);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "deal poll failed"),
                }
            }
            Msg::StreamUp => {
                self.status.stream_connects += 1;
                // Whatever happened while disconnected is in the deal list.
                self.spawn_poll();
            }
            Msg::Event(ev) => {
                self.status.last_event_id = self.status.last_event_id.max(ev.id);
                if ev.provider != self.net.wallet {
                    return;
                }
                let id = ev.deal_id;
                if !self.core.knows(id) {
                    self.fetch(id);
                    return;
                }
                match ev.kind {
                    EventKind::Matched { .. } => {}
                    EventKind::Reported {
                        actor,
                        party_status,
                        ..
                    } => {
                        let provider = matches!(actor, ipsx_exchange_client::api::Actor::Provider);
                        self.core.party_reported(id, provider, party_status, now);
                    }
                    EventKind::Endpoint {
                        actor: ipsx_exchange_client::api::Actor::Requester,
                        endpoint,
                        ..
                    } => self.core.requester_endpoint(id, endpoint, now),
                    EventKind::Endpoint { .. } => {}
                    EventKind::StatusChanged => self.core.status_changed(id, ev.status, now),
                    EventKind::Proof { amount } => self.core.proof_posted(id, amount),
                    EventKind::ExtendProposed { actor, new_end } => {
                        let provider = matches!(actor, ipsx_exchange_client::api::Actor::Provider);
                        self.core.extend_proposed(id, provider, new_end, now);
                    }
                    EventKind::Extended { terms } => {
                        tracing::info!(deal = id, end = terms.end, "deal extended");
                        self.core.extended(id, terms.end, terms.value);
                    }
                }
            }
            Msg::Fetched(id, d) => {
                self.fetching.remove(&id);
                if let Some(d) = d
                    && d.provider == self.net.wallet
                {
                    self.core.observe(observation(&d), now);
                }
            }
            Msg::Reported(id, status, r) => {
                if r.is_ok() {
                    push_capped(&mut self.status.reports, (id, status));
                }
                self.core.report_done(id, status, r, now);
            }
            Msg::Checked(id, r) => {
                if let Ok(v) = &r {
                    self.connlog.bind_channel(v.channel.id, id);
                }
                let before = self.core.deal(id).map_or(0, |d| d.paid);
                self.core.proof_checked(id, r, now);
                let after = self.core.deal(id).map_or(0, |d| d.paid);
                self.status.earned_total = self
                    .status
                    .earned_total
                    .saturating_add(after.saturating_sub(before));
            }
            Msg::Claimed(channel_id, amount, close, r) => {
                let r = r.map(|(gone, record)| {
                    if let Some(rec) = record {
                        self.status.claimed_total =
                            self.status.claimed_total.saturating_add(rec.paid);
                        push_capped(&mut self.status.claims, rec);
                    }
                    gone
                });
                self.core.claim_done(channel_id, amount, close, r, now);
            }
            Msg::ChannelRead(channel_id, r) => self.core.channel_read(channel_id, r, now),
            Msg::ClaimThreshold(v) => self.core.set_claim_threshold(v),
            Msg::Extended(id, new_end, r) => self.core.extend_done(id, new_end, r, now),
            Msg::Rated(id, score, r) => {
                if r.is_ok() {
                    push_capped(&mut self.status.ratings, (id, score));
                }
                self.core.rate_done(id, r, now);
            }
            Msg::Offer(i, order_id) => {
                if let Some(x) = self.status.exits.get_mut(i) {
                    x.order_id = Some(order_id);
                    x.offers_posted += 1;
                }
            }
        }
    }

    async fn run_actions(&mut self) {
        // Peer changes are local and quick; their results may unlock more work.
        for _ in 0..4 {
            let actions = self.core.actions(now_ms());
            if actions.is_empty() {
                return;
            }
            let mut local = false;
            for a in actions {
                local |= matches!(
                    a,
                    Action::AddPeer { .. }
                        | Action::RemovePeer { .. }
                        | Action::PeerEndpoint { .. }
                );
                self.execute(a).await;
            }
            if !local {
                return;
            }
        }
    }

    /// Tells the exchange how the deal's exit is reached (recorded as the deal's
    /// path); best effort, a few tries.
    fn report_path(&self, deal_id: u64, exit: usize) {
        let (Some(h), Some(x)) = (self.exits.get(exit), self.status.exits.get(exit)) else {
            return;
        };
        let path = match h.nat_path() {
            ipsx_tunnel_pool::NatPath::Direct => DealPath::Direct,
            ipsx_tunnel_pool::NatPath::Punched => DealPath::Punched,
            ipsx_tunnel_pool::NatPath::Relayed => DealPath::Relayed,
        };
        let endpoint = x.endpoint;
        let net = self.net.clone();
        tokio::spawn(async move {
            for attempt in 0..3u32 {
                let r = EndpointReport {
                    wallet: net.wallet,
                    deal_id,
                    endpoint,
                    path,
                    expiry: unix_s() + 600,
                    nonce: next_nonce(),
                };
                match net.client.report_endpoint(&r).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::debug!(deal = deal_id, error = %e, "endpoint report refused");
                        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                    }
                }
            }
        });
    }

    async fn execute(&mut self, a: Action) {
        let net = self.net.clone();
        match a {
            Action::AddPeer {
                deal_id,
                exit,
                key,
                inner_ip,
                endpoint,
            } => {
                // The deal's log opens (or resumes from disk) before the peer can
                // make a connection, and the peer's meter records into it.
                if let Some(d) = self.core.deal(deal_id) {
                    self.connlog.open_deal(deal_id, d.requester, d.start);
                }
                let r = match self.exits.get(exit) {
                    Some(h) => h.add_peer_at(key, IpAddr::V4(inner_ip), endpoint).await,
                    None => Err(ProviderError::Stopped),
                };
                if r.is_ok()
                    && let Some(m) = self.exits.get(exit).and_then(|h| h.peer_meter(&key))
                {
                    m.bind_deal(deal_id, self.connlog.clone());
                }
                let r = r.map_err(|e| match e {
                    ProviderError::Stopped => Failure::Transient(e.to_string()),
                    e => Failure::Permanent(e.to_string()),
                });
                if r.is_ok() {
                    tracing::info!(deal = deal_id, %inner_ip, ?endpoint, "serving requester");
                    self.report_path(deal_id, exit);
                }
                self.core.peer_done(deal_id, true, r, now_ms());
            }
            Action::PeerEndpoint {
                deal_id,
                exit,
                key,
                endpoint,
            } => {
                let known = match self.exits.get(exit) {
                    Some(h) => h.set_peer_endpoint(&key, endpoint).await,
                    None => false,
                };
                tracing::info!(deal = deal_id, %endpoint, known, "requester endpoint");
                self.core.peer_done(deal_id, true, Ok(()), now_ms());
            }
            Action::RemovePeer { deal_id, exit, key } => {
                if let Some(h) = self.exits.get(exit) {
                    h.remove_peer(&key).await;
                }
                tracing::info!(deal = deal_id, "requester removed");
                self.core.peer_done(deal_id, false, Ok(()), now_ms());
            }
            Action::Report {
                deal_id,
                status,
                reason,
            } => {
                tokio::spawn(async move {
                    let mut reason = reason;
                    reason.truncate(256);
                    let rep = StatusReport {
                        wallet: net.wallet,
                        deal_id,
                        status,
                        reason,
                        expiry: unix_s() + 600,
                        nonce: next_nonce(),
                    };
                    let r = net
                        .client
                        .report(&rep)
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(&e));
                    let _ = net.tx.send(Msg::Reported(deal_id, status, r));
                });
            }
            Action::Rate { deal_id, score } => {
                tokio::spawn(async move {
                    let rating = Rating {
                        wallet: net.wallet,
                        deal_id,
                        score,
                        expiry: unix_s() + 600,
                        nonce: next_nonce(),
                    };
                    let r = net
                        .client
                        .rate(&rating)
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(&e));
                    let _ = net.tx.send(Msg::Rated(deal_id, score, r));
                });
            }
            Action::ProposeExtend { deal_id, new_end } => {
                tokio::spawn(async move {
                    let e = Extend {
                        wallet: net.wallet,
                        deal_id,
                        new_end,
                        expiry: unix_s() + 600,
                        nonce: next_nonce(),
                    };
                    let r = net
                        .client
                        .extend(&e)
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(&e));
                    let _ = net.tx.send(Msg::Extended(deal_id, new_end, r));
                });
            }
            Action::CheckProof {
                deal_id,
                requester,
                known_channels,
            } => {
                tokio::spawn(async move {
                    let r = check(&net, deal_id, requester, known_channels).await;
                    let _ = net.tx.send(Msg::Checked(deal_id, r));
                });
            }
            Action::ReadChannel { channel_id } => {
                tokio::spawn(async move {
                    let r = net
                        .chain
                        .channel(channel_id)
                        .await
                        .map(|c| c.map(facts))
                        .map_err(|e| Failure::Transient(e.to_string()));
                    let _ = net.tx.send(Msg::ChannelRead(channel_id, r));
                });
            }
            Action::Claim {
                deal_id,
                channel_id,
                amount,
                signature,
                close,
                ..
            } => {
                let log_hash = self.connlog.commit(channel_id, deal_id);
                tokio::spawn(async move {
                    let r = claim(
                        &net, deal_id, channel_id, amount, signature, close, log_hash,
                    )
                    .await;
                    let _ = net.tx.send(Msg::Claimed(channel_id, amount, close, r));
                });
            }
        }
    }

    async fn finish(&mut self, offers: JoinHandle<()>) {
        let claims = self.core.claimable();
        let net = self.net.clone();
        let connlog = self.connlog.clone();
        let work = async move {
            let _ = offers.await;
            for a in claims {
                if let Action::Claim {
                    deal_id,
                    channel_id,
                    amount,
                    signature,
                    close,
                    ..
                } = a
                {
                    let log_hash = connlog.commit(channel_id, deal_id);
                    match claim(
                        &net, deal_id, channel_id, amount, signature, close, log_hash,
                    )
                    .await
                    {
                        Ok(_) => tracing::info!(deal = deal_id, amount, "claimed at shutdown"),
                        Err(e) => {
                            tracing::warn!(deal = deal_id, error = ?e, "claim at shutdown failed")
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_BUDGET, work).await.is_err() {
            tracing::warn!("shutdown budget spent before every claim was made");
        }
    }
}

async fn check(
    net: &Net,
    deal_id: u64,
    requester: Address,
    known: Vec<ChannelFacts>,
) -> Result<super::core::VerifiedProof, Failure> {
    let proof = net
        .client
        .proof(deal_id)
        .await
        .map_err(|e| Failure::Transient(e.to_string()))?;
    // A known channel's facts only change by top-ups (deposit grows) or closes (seen
    // by the core's periodic reads); a proof within the known deposit needs no chain
    // read, so a rental over a funded channel does not wait for the chain and a chain
    // outage does not stop a running deal from being paid.
    let known = known
        .into_iter()
        .find(|k| k.id == proof.channel_id && k.deposit >= proof.cumulative_amount);
    let channel = match known {
        Some(k) => Some(k),
        None => net
            .chain
            .channel(proof.channel_id)
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?
            .map(facts),
    };
    check_proof(&net.domain, net.wallet, requester, deal_id, &proof, channel)
        .map_err(Failure::Permanent)
}

async fn claim(
    net: &Net,
    deal_id: u64,
    channel_id: B256,
    amount: u128,
    signature: Vec<u8>,
    close: bool,
    log_hash: B256,
) -> Result<(bool, Option<ClaimRecord>), Failure> {
    // Read first: what is already claimed is never claimed again (a retry after a lost
    // receipt, a restart).
    let ch = net
        .chain
        .channel(channel_id)
        .await
        .map_err(|e| Failure::Transient(e.to_string()))?;
    let Some(ch) = ch else {
        return Ok((true, None));
    };
    if ch.claimed >= U256::from(amount) && !close {
        return Ok((false, None));
    }
    let before = small(ch.claimed);
    let proof = BalanceProof {
        channel_id,
        cumulative_amount: U256::from(amount),
    };
    match net
        .chain
        .claim(&proof, Bytes::from(signature), log_hash, close)
        .await
    {
        Ok(out) => {
            tracing::info!(deal = deal_id, amount, close, tx = %out.tx_hash, "claimed");
            Ok((
                close,
                Some(ClaimRecord {
                    deal_id,
                    channel_id,
                    amount,
                    paid: amount.saturating_sub(before),
                    close,
                    log_hash,
                    tx_hash: Some(out.tx_hash),
                }),
            ))
        }
        Err(e) if e.revert().is_some() => Err(Failure::Permanent(e.to_string())),
        Err(e) => Err(Failure::Transient(e.to_string())),
    }
}

/// `GET /api/connlog/<deal>?expiry=..&signature=..` on the status listener, outside
/// its token: a deal's log, signed by the provider's wallet, for the deal's requester
/// only (the request is signed by its wallet). Errors name the field.
fn connlog_route(store: Arc<ConnLogStore>, key: PrivateKeySigner) -> ExtraRoutes {
    use http_body_util::Full;
    use hyper::{Method, Response, StatusCode};
    Arc::new(move |method: &Method, target: &str| {
        if !target.starts_with(ipsx_exchange_client::connlog::LOG_PATH) {
            return None;
        }
        let (code, body) = if method != Method::GET {
            (StatusCode::METHOD_NOT_ALLOWED, err_body("only GET"))
        } else {
            match store.serve(target, &key, unix_s()) {
                Ok(x) => (StatusCode::OK, serde_json::to_vec(&x).unwrap_or_default()),
                Err(ServeError::Bad(e)) => (StatusCode::BAD_REQUEST, err_body(&e)),
                Err(ServeError::Forbidden(e)) => (StatusCode::FORBIDDEN, err_body(&e)),
                Err(ServeError::NotFound(e)) => (StatusCode::NOT_FOUND, err_body(&e)),
                Err(ServeError::Io(e)) => {
                    tracing::error!(error = %e, "connection log: not served");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        err_body("the log could not be read"),
                    )
                }
            }
        };
        let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Some(r)
    })
}

fn err_body(msg: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": msg })).unwrap_or_default()
}

/// Binds the status listener: an explicit `[status]` must bind (error naming
/// `status.listen`); without one the default address is tried and skipped with a
/// warning when taken (several agents on one host).
async fn bind_status(cfg: &AgentConfig) -> Result<Option<tokio::net::TcpListener>, AgentError> {
    match &cfg.status {
        Some(s) if !s.enabled => Ok(None),
        Some(s) => tokio::net::TcpListener::bind(s.listen)
            .await
            .map(Some)
            .map_err(|e| AgentError::Config {
                key: "status.listen".into(),
                reason: format!("binding {}: {e}", s.listen),
            }),
        None => match tokio::net::TcpListener::bind(DEFAULT_STATUS_LISTEN).await {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                tracing::warn!(addr = DEFAULT_STATUS_LISTEN, error = %e, "status listener not started (add [status] listen = \"127.0.0.1:0\" or another port)");
                Ok(None)
            }
        },
    }
}

/// Follows the wallet's event stream, resuming after the last event id on every
/// reconnect (backoff 250 ms doubling to 5 s).
async fn stream_loop(net: Net, mut stop: watch::Receiver<bool>) {
    let mut last = 0u64;
    let mut backoff = Duration::from_millis(250);
    loop {
        match net.client.events(net.wallet, last).await {
            Ok(mut s) => {
                backoff = Duration::from_millis(250);
                let _ = net.tx.send(Msg::StreamUp);
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        ev = s.next() => match ev {
                            Some(Ok(ev)) => {
                                last = ev.id;
                                if net.tx.send(Msg::Event(Box::new(ev))).is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "event stream broke");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "event stream refused"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Keeps one offer per exit in the book: posts it, re-posts at two thirds of its
/// lifetime (then cancels the previous one), retries failures; cancels at shutdown.
async fn offer_loop(
    net: Net,
    templates: Vec<OfferTemplate>,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let n = templates.len();
    let mut current: Vec<Option<u64>> = vec![None; n];
    let mut due = vec![tokio::time::Instant::now(); n];
    let mut backoff = vec![Duration::from_millis(500); n];
    let refresh = ttl.saturating_mul(2) / 3;
    loop {
        for (i, t) in templates.iter().enumerate() {
            if tokio::time::Instant::now() < due[i] {
                continue;
            }
            let offer = t.offer(net.wallet, ttl);
            match net.client.post_offer(&offer).await {
                Ok(Outcome::OfferPosted { order_id, .. }) => {
                    if let Some(old) = current[i].replace(order_id) {
                        let _ = net.client.cancel(old).await;
                    }
                    let _ = net.tx.send(Msg::Offer(i, order_id));
                    backoff[i] = Duration::from_millis(500);
                    due[i] = tokio::time::Instant::now() + refresh;
                }
                Ok(other) => {
                    tracing::warn!(exit = %t.section.exit_address, outcome = ?other, "unexpected answer to an offer");
                    due[i] = tokio::time::Instant::now() + backoff[i];
                }
                Err(e) => {
                    tracing::warn!(exit = %t.section.exit_address, error = %e, "posting the offer failed");
                    due[i] = tokio::time::Instant::now() + backoff[i];
                    backoff[i] = (backoff[i] * 2).min(Duration::from_secs(30)).min(refresh);
                }
            }
        }
        let next = due
            .iter()
            .min()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    for id in current.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(3), net.client.cancel(id)).await;
    }
}
