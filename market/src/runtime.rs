//! The thin tokio runtime around [`Core`]: follows the exchange's event stream, carries
//! out the core's actions (exchange calls, chain transactions, tunnels, the gateway's
//! exits), feeds their results back, and writes every changed deal to the [`Store`].

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use ipsx_chain::{ChainClient, Deployment};
use ipsx_config::{ExitConfig, ExitTransport, MarketConfig, Protocol};
use ipsx_exchange_client::api::{Actor, EventKind, Outcome as ExchangeOutcome};
use ipsx_exchange_client::client::{Client, fresh};
use ipsx_exchange_client::geo::GeoDb;
use ipsx_exchange_client::market::{EXIT_INNER_ADDR, inner_ip_for_deal};
use ipsx_exchange_client::types::{Extend, PartyStatus, Rating, Request, StatusReport, WgKey};
use ipsx_gateway::{ExitDemand, Gateway};
use ipsx_rotation::Filter;
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig};
use serde::Serialize;
use tokio::sync::Notify;

use crate::core::{
    Action, ChannelPhase, Core, Input, LogCheck, Millis, Phase, Settings, Want, attrs_of,
    deal_of_exit, exit_name,
};
use crate::store::Store;

#[path = "rent.rs"]
pub(crate) mod rent;

/// Why the pool manager could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MarketError {
    /// A `[market]` value is unusable (names the key).
    #[error("market.{key}: {message}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The chain refused or could not be reached.
    #[error("chain: {0}")]
    Chain(String),
    /// The exchange refused or could not be reached.
    #[error("exchange: {0}")]
    Exchange(String),
    /// The local store failed.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// What the admin API shows of the market.
#[derive(Debug, Clone, Serialize)]
pub struct MarketStatus {
    /// The requester wallet.
    pub wallet: String,
    /// Whether shutdown began (nothing is rented any more).
    pub shutting_down: bool,
    /// Deals, newest first (at most 200).
    pub deals: Vec<serde_json::Value>,
    /// Demand groups with what they want, have, and why renting was refused.
    pub groups: Vec<serde_json::Value>,
    /// Deal values committed in the last hour (base units).
    pub spent_last_hour: String,
    /// Deal values committed since start (base units).
    pub spent_total: String,
    /// Balance proofs accepted by the exchange, summed over deals (base units).
    pub paid_total: String,
    /// Channels opened and not closed on chain yet.
    pub channels_open: usize,
}

/// Splits actions into batches run one after the other: a deal's
/// [`Action::FetchLog`] comes before its [`Action::Disconnect`] (the log is read
/// through the tunnel that the disconnect removes); every other action alone.
fn sequenced(actions: Vec<Action>) -> Vec<Vec<Action>> {
    let fetching: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::FetchLog { deal, .. } => Some(*deal),
            _ => None,
        })
        .collect();
    let (held, rest): (Vec<Action>, Vec<Action>) = actions
        .into_iter()
        .partition(|a| matches!(a, Action::Disconnect { deal } if fetching.contains(deal)));
    let mut out = Vec::new();
    for a in rest {
        if let Action::FetchLog { deal, .. } = a {
            let d = deal;
            let mut batch = vec![a];
            batch.extend(
                held.iter()
                    .filter(|h| matches!(h, Action::Disconnect { deal } if *deal == d))
                    .cloned(),
            );
            out.push(batch);
        } else {
            out.push(vec![a]);
        }
    }
    out
}

fn unix_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn filter_of(target: &ipsx_config::DemandTarget) -> Result<Filter, MarketError> {
    let place = |key: &'static str, v: &Option<String>| {
        v.as_ref()
            .map(|c| {
                ipsx_rotation::parse_place(key, c).map_err(|e| MarketError::Config {
                    key: if key == "city" {
                        "demand.target.city"
                    } else {
                        "demand.target.region"
                    },
                    message: e.to_string(),
                })
            })
            .transpose()
    };
    Ok(Filter {
        country: target.country,
        region: place("region", &target.region)?,
        city: place("city", &target.city)?,
        asn: target.asn,
        kind: target.kind,
    })
}

/// The core's settings from `[market]`.
pub fn settings_of(cfg: &MarketConfig, challenge_period: Duration) -> Settings {
    Settings {
        deal_duration: cfg.deal_duration,
        max_price_per_ip_second: cfg.max_price_per_ip_second.0,
        max_spend_per_hour: cfg.max_spend_per_hour.map(|a| a.0),
        max_spend_total: cfg.max_spend_total.map(|a| a.0),
        first_window: cfg.first_window,
        payment_window: cfg.payment_window,
        proof_interval: cfg.proof_interval,
        renew_ahead: cfg.renew_ahead,
        idle_release: cfg.idle_release,
        max_on_demand_groups: cfg.max_on_demand_groups,
        min_provider_rating: cfg.min_provider_rating,
        serve_timeout: cfg.serve_timeout,
        avoid_for: cfg.avoid_for,
        close_grace: cfg.close_grace,
        challenge_period,
        request_ttl: Duration::from_secs(30),
        reverify_every: cfg.reverify_every,
        channel_idle_close: cfg.channel_idle_close,
        channel_prefund: cfg.channel_prefund,
        close_channels_at_shutdown: cfg.close_channels_at_shutdown,
    }
}

struct Inner {
    gw: Arc<Gateway>,
    cfg: MarketConfig,
    verify_url: Option<String>,
    /// GeoIP databases rented exits' addresses are checked against (may be empty).
    geo: GeoDb,
    exchange: Client,
    chain: ChainClient,
    wallet: Address,
    /// The requester wallet's key (signs connection-log requests).
    signer: PrivateKeySigner,
    wg_key: SecretKey,
    core: Mutex<Core>,
    tunnels: Mutex<HashMap<u64, Tunnel>>,
    /// How each deal's exit is reached, as its provider reported (NAT traversal).
    paths: Mutex<HashMap<u64, ipsx_exchange_client::DealPath>>,
    store: Store,
    /// Serializes store writes so a later snapshot never lands before an earlier one.
    store_lock: tokio::sync::Mutex<()>,
    wake: Notify,
    stop: tokio::sync::watch::Sender<bool>,
    /// `ipsx rent`: deals are exported to a WireGuard client, not tunnelled here.
    rent: Option<rent::RentState>,
}

impl Inner {
    /// The live tunnels by deal (a poisoned lock is taken over: the map stays valid).
    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tunnel>> {
        self.tunnels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deal `deal`'s tunnel, if it is live.
    fn tunnel(&self, deal: u64) -> Option<Tunnel> {
        self.tunnels().get(&deal).cloned()
    }
}

/// The running pool manager; cheap to clone.
#[derive(Clone)]
pub struct PoolManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PoolManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolManager")
            .field("wallet", &self.inner.wallet)
            .finish_non_exhaustive()
    }
}

impl PoolManager {
    /// Connects to the chain and the exchange, opens the local store (resuming the
    /// deals it holds), installs the renting hook in the gateway and starts following
    /// deals. `base_dir` resolves the deployment and state files' paths.
    pub async fn start(
        gw: Arc<Gateway>,
        cfg: MarketConfig,
        base_dir: &Path,
        verify_url: Option<String>,
    ) -> Result<Self, MarketError> {
        Self::start_with(gw, cfg, base_dir, verify_url, None).await
    }

    /// [`PoolManager::start`], or with `rent` the one-exit renting of `ipsx rent`.
    async fn start_with(
        gw: Arc<Gateway>,
        cfg: MarketConfig,
        base_dir: &Path,
        verify_url: Option<String>,
        rent: Option<rent::RentSpec>,
    ) -> Result<Self, MarketError> {
        let deployment =
            Deployment::load(&base_dir.join(&cfg.deployment)).map_err(|e| MarketError::Config {
                key: "deployment",
                message: e.to_string(),
            })?;
        let signer = PrivateKeySigner::from_str(cfg.private_key.expose().trim()).map_err(|_| {
            MarketError::Config {
                key: "private_key",
                message: "not a hex secp256k1 private key".into(),
            }
        })?;
        let wallet = signer.address();
        let chain = ChainClient::connect(&cfg.rpc_url, deployment, signer.clone())
            .await
            .map_err(|e| MarketError::Chain(e.to_string()))?;
        let challenge = chain
            .centralizer()
            .challengePeriod()
            .call()
            .await
            .map_err(|e| MarketError::Chain(format!("challengePeriod: {e}")))?;
        let exchange = Client::new(
            &cfg.exchange_url,
            deployment.chain_id,
            deployment.centralizer,
        )
        .map_err(|e| MarketError::Exchange(e.to_string()))?
        .with_key(signer.clone());
        let geo_path = |p: &Option<String>| p.as_ref().map(|p| base_dir.join(p));
        let geo = GeoDb::open(
            geo_path(&cfg.geoip_country).as_deref(),
            geo_path(&cfg.geoip_asn).as_deref(),
        )
        .map_err(|e| MarketError::Config {
            key: if e.field().as_deref() == Some("geoip_asn") {
                "geoip_asn"
            } else {
                "geoip_country"
            },
            message: e.to_string(),
        })?;
        let store = Store::open(&base_dir.join(&cfg.state_file), wallet).await?;
        let wg_key = match &cfg.wg_private_key {
            Some(k) => SecretKey::from_base64("wg_private_key", k.expose()).map_err(|e| {
                MarketError::Config {
                    key: "wg_private_key",
                    message: e.to_string(),
                }
            })?,
            // Generated once and kept in the state file: deals resumed after a restart
            // are bound to this key at the providers.
            None => match store.wg_key().await? {
                Some(k) => {
                    SecretKey::from_base64("state_file", &k).map_err(|e| MarketError::Config {
                        key: "state_file",
                        message: e.to_string(),
                    })?
                }
                None => {
                    let k = SecretKey::generate();
                    store
                        .set_wg_key(&ipsx_tunnel_pool::key_to_base64(&k.0))
                        .await?;
                    k
                }
            },
        };
        let now = unix_ms();
        let mut groups = Vec::new();
        for d in &cfg.demand {
            groups.push((d.name.clone(), filter_of(&d.target)?, d.count));
        }
        if let Some(spec) = &rent {
            groups.push(("rent".to_owned(), spec.filter.clone(), 1));
        }
        let mut settings = settings_of(&cfg, Duration::from_secs(challenge));
        // A one-shot rental settles everything when it ends: nothing is left to reuse
        // its channel, so a deposit kept open would only wait for someone to close it.
        settings.close_channels_at_shutdown |= rent.is_some();
        let mut core = Core::new(settings, groups, now);
        let restored = store.load().await?;
        let resumed = restored.len();
        core.restore(restored, now);
        let resumable = core.resumable(now);
        let (stop, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            gw: gw.clone(),
            cfg,
            verify_url,
            geo,
            exchange,
            chain,
            wallet,
            signer,
            wg_key,
            core: Mutex::new(core),
            tunnels: Mutex::new(HashMap::new()),
            paths: Mutex::new(HashMap::new()),
            store,
            store_lock: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            stop,
            rent: rent.map(|_| rent::RentState::default()),
        });
        let manager = Self { inner };
        if manager.inner.cfg.rent_on_demand {
            gw.set_demand(Arc::new(manager.clone()));
        }
        if resumed > 0 {
            tracing::info!(
                deals = resumed,
                live = resumable.len(),
                "market state restored"
            );
        }
        manager.recover(resumable).await;
        tokio::spawn(manager.clone().follow_events());
        tokio::spawn(manager.clone().tick_loop());
        tracing::info!(wallet = %wallet, "pool manager started");
        Ok(manager)
    }

    /// The requester wallet.
    pub fn wallet(&self) -> Address {
        self.inner.wallet
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.inner.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot for the admin API.
    pub fn status(&self) -> MarketStatus {
        let now = unix_ms();
        let paths = self
            .inner
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let core = self.core();
        let unix = now / 1000;
        let deals: Vec<serde_json::Value> = core
            .deals()
            .values()
            .rev()
            .take(200)
            .map(|d| {
                serde_json::json!({
                    "deal": d.id,
                    "group": d.group.to_string(),
                    "phase": d.phase,
                    "outcome": d.outcome.map(|o| o.as_str()),
                    "provider": format!("{:#x}", d.provider),
                    "exit": exit_name(d.id),
                    "exit_address": d.terms.exit_address.to_string(),
                    "country": d.terms.country.to_string(),
                    "price_per_ip_second": d.terms.price_per_ip_second.to_string(),
                    "value": d.terms.value.to_string(),
                    "paid": d.paid.to_string(),
                    "served_s": d.served_s(now),
                    "extensions": d.extensions,
                    "channel": d.channel.map(|c| serde_json::json!({
                        "id": format!("{:#x}", c.id),
                        "deposit": c.deposit.to_string(),
                        "state": c.phase,
                    })),
                    "ends_in_s": d.terms.end.saturating_sub(unix),
                    "path": paths.get(&d.id).map(|p| p.as_str()),
                    "connlog": d.connlog.state.as_str(),
                    "connlog_reason": d.connlog.reason,
                    "note": d.note,
                })
            })
            .collect();
        let groups = core
            .groups()
            .iter()
            .map(|g| {
                let live = core
                    .deals()
                    .values()
                    .filter(|d| d.group == g.filter && d.phase != Phase::Ended)
                    .count();
                serde_json::json!({
                    "name": g.name, "filter": g.filter.to_string(), "want": g.want, "live": live,
                    "on_demand": g.on_demand, "outstanding": g.outstanding, "refusal": g.refusal,
                })
            })
            .collect();
        let paid_total: u128 = core.deals().values().map(|d| d.paid).sum();
        MarketStatus {
            wallet: format!("{:#x}", self.inner.wallet),
            shutting_down: core.shutting_down(),
            deals,
            groups,
            spent_last_hour: core.spent_last_hour(now).to_string(),
            spent_total: core.spent_total().to_string(),
            paid_total: paid_total.to_string(),
            channels_open: core
                .deals()
                .values()
                .filter(|d| {
                    d.channel.is_some_and(|c| {
                        !matches!(c.phase, ChannelPhase::Closed | ChannelPhase::Reused { .. })
                    })
                })
                .count(),
        }
    }

    /// Shutdown began: rents nothing more from now on (resting requests are
    /// cancelled, late matches rejected); live exits keep serving while the gateway
    /// drains. Call it first, then [`PoolManager::shutdown`].
    pub async fn stop_renting(&self) {
        let actions = self.step(Input::Shutdown).await;
        self.run_all(actions).await;
    }

    /// Carries actions out here and waits for them (not spawned: the runtime may stop
    /// right after).
    async fn run_all(&self, actions: Vec<Action>) {
        let mut tasks = Vec::new();
        for batch in sequenced(actions) {
            let me = self.clone();
            tasks.push(tokio::spawn(async move {
                for a in batch {
                    me.run(a).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops renting, ends every deal (reported completed so providers claim and
    /// close their channels), waits up to `wait` for those closing claims, and stops.
    /// What is still open is in the store and closed after the next start.
    pub async fn shutdown(&self, wait: Duration) {
        self.stop_renting().await;
        let actions = self.step(Input::EndAll).await;
        self.run_all(actions).await;
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            let open: Vec<_> = self
                .core()
                .deals()
                .values()
                .filter_map(|d| d.channel)
                .filter(|c| {
                    matches!(
                        c.phase,
                        ChannelPhase::AwaitingClaim { .. }
                            | ChannelPhase::Closing
                            | ChannelPhase::Challenge { .. }
                    )
                })
                .map(|c| c.id)
                .collect();
            if open.is_empty() {
                break;
            }
            for id in open {
                if let Ok(None) = self.inner.chain.channel(id).await {
                    self.step(Input::ChannelClosed { channel: id }).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = self.inner.stop.send(true);
        tracing::info!("pool manager stopped");
    }

    /// Feeds one input, persists what changed, returns the actions.
    async fn step(&self, input: Input) -> Vec<Action> {
        self.advance(|core, now| core.handle(input, now)).await
    }

    /// Moves the core with `f` at the current time, then writes the deals it changed
    /// to the store before anything it asked for is carried out.
    async fn advance(&self, f: impl FnOnce(&mut Core, Millis) -> Vec<Action>) -> Vec<Action> {
        let now = unix_ms();
        let (actions, changed) = {
            let mut core = self.core();
            let actions = f(&mut core, now);
            let dirty = core.take_dirty();
            let changed: Vec<_> = dirty
                .iter()
                .filter_map(|id| core.deal(*id).cloned())
                .collect();
            (actions, changed)
        };
        self.persist(changed).await;
        actions
    }

    async fn persist(&self, changed: Vec<crate::core::Deal>) {
        if changed.is_empty() {
            return;
        }
        let _guard = self.inner.store_lock.lock().await;
        if let Err(e) = self.inner.store.save(&changed).await {
            tracing::error!(error = %e, "market state not saved");
        }
    }

    /// Feeds an input and carries out its actions in the background.
    async fn input(&self, input: Input) {
        let actions = self.step(input).await;
        self.spawn_all(actions);
    }

    fn spawn_all(&self, actions: Vec<Action>) {
        for batch in sequenced(actions) {
            let me = self.clone();
            tokio::spawn(async move {
                for a in batch {
                    me.run(a).await;
                }
            });
        }
    }

    /// After a restart: deals whose channel was being opened are matched to the
    /// channel on chain (or given up), and deals that were serving are reconnected if
    /// the exchange still has them active.
    async fn recover(&self, resumable: Vec<u64>) {
        let opening: Vec<(u64, Address, u128)> = self
            .core()
            .deals()
            .values()
            .filter(|d| d.phase == Phase::Opening && d.channel.is_none())
            .map(|d| (d.id, d.provider, d.terms.value))
            .collect();
        if !opening.is_empty() {
            let known: Vec<_> = self
                .core()
                .deals()
                .values()
                .filter_map(|d| d.channel.map(|c| c.id))
                .collect();
            let ours = self
                .inner
                .chain
                .channel_ids_of(self.inner.wallet)
                .await
                .unwrap_or_default();
            let mut taken = Vec::new();
            for (id, provider, value) in opening {
                let mut found = None;
                for ch in &ours {
                    if known.contains(ch) || taken.contains(ch) {
                        continue;
                    }
                    if let Ok(Some(st)) = self.inner.chain.channel(*ch).await
                        && st.provider == provider
                        && st.deposit == U256::from(value)
                    {
                        found = Some(*ch);
                        break;
                    }
                }
                let input = match found {
                    Some(channel) => {
                        taken.push(channel);
                        Input::ChannelOpened {
                            deal: id,
                            channel,
                            deposit: value,
                        }
                    }
                    None => Input::ChannelFailed {
                        deal: id,
                        error: "no channel found after a restart".into(),
                    },
                };
                self.input(input).await;
            }
        }
        for id in resumable {
            match self.inner.exchange.deal(id).await {
                Ok(deal) if deal.status.is_final() => {
                    self.input(Input::DealFinal { deal: id }).await;
                }
                Ok(deal) => {
                    if let Some(p) = &deal.proof {
                        // The exchange holds the latest proof we posted.
                        self.input(Input::ProofPosted {
                            deal: id,
                            amount: p.cumulative_amount,
                        })
                        .await;
                    }
                    if deal.provider_status == PartyStatus::Active {
                        self.input(Input::ProviderReported {
                            deal: id,
                            status: PartyStatus::Active,
                        })
                        .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(deal = id, error = %e, "restored deal not found on the exchange")
                }
            }
        }
    }

    // === the event stream ===

    async fn follow_events(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut backoff = Duration::from_millis(200);
        loop {
            let last = self.inner.store.last_event().await.unwrap_or(0);
            let stream = self.inner.exchange.events(self.inner.wallet, last).await;
            let mut stream = match stream {
                Ok(s) => {
                    backoff = Duration::from_millis(200);
                    s
                }
                Err(e) => {
                    tracing::warn!(error = %e, "exchange event stream unavailable; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = stop.changed() => return,
                };
                match next {
                    Some(Ok(ev)) => {
                        let id = ev.id;
                        if let Some(input) = self.event_input(ev) {
                            self.input(input).await;
                        }
                        if let Err(e) = self.inner.store.set_last_event(id).await {
                            tracing::error!(error = %e, "market state not saved");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "event stream error; reconnecting");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    fn event_input(&self, ev: ipsx_exchange_client::DealEvent) -> Option<Input> {
        if ev.requester != self.inner.wallet {
            return None;
        }
        let deal = ev.deal_id;
        match ev.kind {
            EventKind::Matched { terms } => {
                metrics::counter!("ipsx_market_deals_total").increment(1);
                Some(Input::Matched {
                    deal,
                    provider: ev.provider,
                    terms: (*terms).clone(),
                })
            }
            EventKind::Reported {
                actor: Actor::Provider,
                party_status,
                reason,
            } => {
                tracing::info!(
                    deal,
                    status = party_status.as_str(),
                    reason,
                    "provider reported"
                );
                Some(Input::ProviderReported {
                    deal,
                    status: party_status,
                })
            }
            EventKind::Endpoint {
                actor: Actor::Provider,
                path,
                ..
            } => {
                metrics::counter!("ipsx_market_deal_paths_total", "path" => path.as_str())
                    .increment(1);
                let mut paths = self.inner.paths.lock().unwrap_or_else(|p| p.into_inner());
                if paths.len() >= 10_000 {
                    paths.clear();
                }
                paths.insert(deal, path);
                None
            }
            EventKind::Extended { terms } => Some(Input::Extended {
                deal,
                terms: (*terms).clone(),
            }),
            EventKind::StatusChanged if ev.status.is_final() => Some(Input::DealFinal { deal }),
            _ => None,
        }
    }

    // === the clock ===

    async fn tick_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut prune = 0u32;
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = self.inner.wake.notified() => {}
                _ = stop.changed() => return,
            }
            self.observe().await;
            let actions = self.advance(|core, now| core.tick(now)).await;
            self.spawn_all(actions);
            prune += 1;
            if prune.is_multiple_of(120) {
                let gone = self.core().prune(unix_ms());
                if !gone.is_empty()
                    && let Err(e) = self.inner.store.delete(&gone).await
                {
                    tracing::warn!(error = %e, "old deals not removed from the store");
                }
            }
        }
    }

    /// Health and usage of the rented exits, as inputs.
    async fn observe(&self) {
        let unhealthy: Vec<u64> = self
            .inner
            .tunnels()
            .iter()
            .filter(|(_, t)| !t.health().healthy)
            .map(|(id, _)| *id)
            .collect();
        for deal in unhealthy {
            self.input(Input::ExitUnhealthy { deal }).await;
        }
        let usage: Vec<(u64, u64)> = self
            .inner
            .gw
            .rotator()
            .exits()
            .into_iter()
            .filter_map(|e| deal_of_exit(e.id.as_str()).map(|d| (d, e.requests)))
            .collect();
        let mut core = self.core();
        let now = unix_ms();
        for (deal, requests) in usage {
            core.handle(Input::Usage { deal, requests }, now);
        }
    }

    // === actions ===

    async fn run(&self, action: Action) {
        let ex = &self.inner.exchange;
        let chain = &self.inner.chain;
        let next = match action {
            Action::PostRequest {
                filter,
                count,
                duration_s,
                max_price,
                min_rating,
                exclude,
                expiry,
            } => {
                let (_, nonce) = fresh();
                let request = Request {
                    requester: self.inner.wallet,
                    count,
                    countries: filter.country.into_iter().collect(),
                    regions: filter.region.clone().into_iter().collect(),
                    cities: filter.city.clone().into_iter().collect(),
                    asns: filter.asn.into_iter().collect(),
                    types: filter.kind.into_iter().collect(),
                    protocols: Vec::new(),
                    min_rating,
                    exclude_providers: exclude,
                    diversity: Default::default(),
                    duration_s,
                    max_price_per_ip_second: max_price,
                    wg_public_key: WgKey(self.inner.wg_key.public_key()),
                    expiry,
                    nonce,
                };
                match ex.post_request(&request).await {
                    Ok(ExchangeOutcome::RequestPosted {
                        order_id, deals, ..
                    }) => {
                        tracing::info!(count, %filter, order_id, matched = deals.len(), "request posted");
                        Some(Input::RequestPosted {
                            group: filter,
                            order: order_id,
                            deals,
                        })
                    }
                    Ok(other) => {
                        tracing::warn!(?other, "unexpected answer to a request");
                        None
                    }
                    Err(e) => {
                        tracing::warn!(count, %filter, error = %e, "request refused");
                        Some(Input::RequestFailed {
                            group: filter,
                            count,
                            error: e.to_string(),
                        })
                    }
                }
            }
            Action::CancelOrder { order } => {
                if let Err(e) = ex.cancel(order).await {
                    tracing::debug!(order, error = %e, "cancel refused (filled or expired)");
                }
                None
            }
            Action::Report {
                deal,
                status,
                reason,
            } => {
                match status {
                    PartyStatus::Failed => tracing::warn!(deal, reason, "deal given up"),
                    PartyStatus::Completed | PartyStatus::Rejected => {
                        tracing::info!(deal, status = status.as_str(), reason, "deal ended")
                    }
                    _ => {}
                }
                let (expiry, nonce) = fresh();
                let r = StatusReport {
                    wallet: self.inner.wallet,
                    deal_id: deal,
                    status,
                    reason,
                    expiry,
                    nonce,
                };
                if let Err(e) = ex.report(&r).await {
                    tracing::debug!(deal, error = %e, "status report refused");
                }
                None
            }
            Action::OpenChannel {
                deal,
                provider,
                deposit,
            } => match chain.open_channel(provider, U256::from(deposit)).await {
                Ok((channel, _)) => {
                    tracing::info!(deal, %channel, "payment channel open");
                    Some(Input::ChannelOpened {
                        deal,
                        channel,
                        deposit,
                    })
                }
                Err(e) => Some(Input::ChannelFailed {
                    deal,
                    error: e.to_string(),
                }),
            },
            Action::TopUp {
                deal,
                channel,
                amount,
            } => match chain.top_up(channel, U256::from(amount)).await {
                Ok(_) => Some(Input::ToppedUp { deal, amount }),
                Err(e) => {
                    tracing::warn!(deal, error = %e, "top-up failed");
                    Some(Input::TopUpFailed { deal })
                }
            },
            Action::PostProof {
                deal,
                channel,
                amount,
            } => match ex.post_proof(deal, channel, amount).await {
                Ok(_) => {
                    metrics::counter!("ipsx_market_proofs_total").increment(1);
                    Some(Input::ProofPosted { deal, amount })
                }
                Err(e) => Some(Input::ProofFailed {
                    deal,
                    amount,
                    error: e.to_string(),
                }),
            },
            Action::Connect { deal, terms } => Some(self.connect(deal, *terms).await),
            Action::Reverify { deal, terms } => self.reverify(deal, &terms).await,
            Action::Disconnect { deal } => {
                self.inner.gw.remove_exit(&exit_name(deal));
                let tunnel = self.inner.tunnels().remove(&deal);
                if let Some(t) = tunnel {
                    t.shutdown().await;
                    metrics::gauge!("ipsx_market_exits_live").decrement(1.0);
                }
                tracing::info!(deal, "rented exit out of rotation");
                None
            }
            Action::FetchLog {
                deal,
                channel,
                provider,
            } => {
                // Out of rotation first: no new connection starts while the log is read.
                self.inner.gw.remove_exit(&exit_name(deal));
                let on_chain = chain
                    .channel(channel)
                    .await
                    .ok()
                    .flatten()
                    .map(|c| c.log_hash);
                let tunnel = self.inner.tunnel(deal);
                let log = match tunnel {
                    Some(t) => crate::connlog::fetch_through(
                        &t,
                        &self.inner.signer,
                        provider,
                        deal,
                        unix_ms() / 1000,
                    )
                    .await
                    .map(Box::new),
                    None => Err("no tunnel to the exit".into()),
                };
                Some(Input::LogFetched {
                    deal,
                    log,
                    on_chain,
                })
            }
            Action::ReadLogHash { channel } => match chain.channel(channel).await {
                Ok(st) => Some(Input::LogHash {
                    channel,
                    hash: st.map(|c| c.log_hash),
                }),
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "channel look-up failed");
                    None
                }
            },
            Action::LogChecked {
                deal,
                state,
                reason,
            } => {
                metrics::counter!("ipsx_market_connlog_checks_total", "outcome" => state.as_str())
                    .increment(1);
                match state {
                    LogCheck::Mismatch => {
                        tracing::warn!(deal, %reason, "connection log does not match what the provider committed")
                    }
                    _ => {
                        tracing::info!(deal, outcome = state.as_str(), %reason, "connection log checked")
                    }
                }
                None
            }
            Action::Extend { deal, new_end } => {
                let (expiry, nonce) = fresh();
                let e = Extend {
                    wallet: self.inner.wallet,
                    deal_id: deal,
                    new_end,
                    expiry,
                    nonce,
                };
                match ex.extend(&e).await {
                    Ok(_) => tracing::info!(deal, new_end, "lease extension proposed"),
                    Err(err) => tracing::warn!(deal, error = %err, "lease extension refused"),
                }
                None
            }
            Action::Rate { deal, score } => {
                let (expiry, nonce) = fresh();
                let _ = ex
                    .rate(&Rating {
                        wallet: self.inner.wallet,
                        deal_id: deal,
                        score,
                        expiry,
                        nonce,
                    })
                    .await;
                None
            }
            Action::CheckChannel { channel } => match chain.channel(channel).await {
                Ok(None) => Some(Input::ChannelClosed { channel }),
                Ok(Some(st)) => match st.settle_after {
                    Some(t) => Some(Input::CloseStarted {
                        channel,
                        settle_after: t.saturating_mul(1000),
                    }),
                    None => Some(Input::ChannelStillOpen { channel }),
                },
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "channel look-up failed");
                    None
                }
            },
            Action::StartClose { channel, amount } => {
                let claimed = match chain.channel(channel).await {
                    Ok(Some(st)) => st.claimed,
                    Ok(None) => return self.input(Input::ChannelClosed { channel }).await,
                    Err(_) => return self.input(Input::CloseFailed { channel }).await,
                };
                let admit = U256::from(amount).max(claimed);
                match chain.start_close(channel, admit).await {
                    Ok(_) => match chain.channel(channel).await {
                        Ok(Some(st)) => {
                            tracing::info!(%channel, "uncooperative close started");
                            Some(Input::CloseStarted {
                                channel,
                                settle_after: st.settle_after.unwrap_or(0).saturating_mul(1000),
                            })
                        }
                        Ok(None) => Some(Input::ChannelClosed { channel }),
                        Err(_) => Some(Input::CloseFailed { channel }),
                    },
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "startClose failed");
                        Some(Input::CloseFailed { channel })
                    }
                }
            }
            Action::Settle { channel } => match chain.settle(channel).await {
                Ok(_) => {
                    tracing::info!(%channel, "channel settled; unspent deposit back in balance");
                    Some(Input::ChannelClosed { channel })
                }
                Err(e) => match chain.channel(channel).await {
                    Ok(None) => Some(Input::ChannelClosed { channel }),
                    _ => {
                        tracing::warn!(%channel, error = %e, "settle failed");
                        Some(Input::CloseFailed { channel })
                    }
                },
            },
        };
        if let Some(input) = next {
            self.input(input).await;
        }
        self.inner.wake.notify_one();
    }

    /// What the GeoIP databases say against the deal's country/ASN, if anything.
    fn misplaced(&self, terms: &ipsx_exchange_client::api::DealTerms) -> Option<String> {
        self.inner
            .geo
            .check(terms.exit_address, terms.country, terms.asn)
            .err()
            .map(|m| m.to_string())
    }

    /// Verifies a serving exit again: it still leaves from the deal's address (with
    /// `verify_url`) and the GeoIP databases place that address as the terms say.
    async fn reverify(
        &self,
        id: u64,
        terms: &ipsx_exchange_client::api::DealTerms,
    ) -> Option<Input> {
        let tunnel = self.inner.tunnel(id);
        if let (Some(url), Some(t)) = (&self.inner.verify_url, tunnel)
            && let Err(e) = t.verify_exit(url, terms.exit_address).await
        {
            return Some(Input::ExitFailed {
                deal: id,
                reason: format!("exit address not verified again: {e}"),
            });
        }
        let reason = self.misplaced(terms)?;
        tracing::warn!(deal = id, %reason, "rented exit misplaced");
        Some(Input::ExitMisplaced { deal: id, reason })
    }

    /// Posts our tunnel's public endpoint for deal `id` (the exchange relays it to the
    /// provider); a refusal is logged, the tunnel may still work without it.
    async fn report_endpoint(
        &self,
        id: u64,
        endpoint: std::net::SocketAddr,
        path: ipsx_tunnel_pool::NatPath,
    ) {
        let path = match path {
            ipsx_tunnel_pool::NatPath::Direct => ipsx_exchange_client::DealPath::Direct,
            ipsx_tunnel_pool::NatPath::Punched => ipsx_exchange_client::DealPath::Punched,
            ipsx_tunnel_pool::NatPath::Relayed => ipsx_exchange_client::DealPath::Relayed,
        };
        let (expiry, nonce) = fresh();
        let r = ipsx_exchange_client::EndpointReport {
            wallet: self.inner.wallet,
            deal_id: id,
            endpoint,
            path,
            expiry,
            nonce,
        };
        if let Err(e) = self.inner.exchange.report_endpoint(&r).await {
            tracing::warn!(deal = id, error = %e, "endpoint report refused");
        }
    }

    /// Brings a deal's tunnel up, verifies the exit, and puts it in rotation.
    async fn connect(&self, id: u64, terms: ipsx_exchange_client::api::DealTerms) -> Input {
        if let Some(rent) = &self.inner.rent {
            return self.connect_rented(id, terms, rent).await;
        }
        let mut cfg = TunnelConfig::new(
            self.inner.wg_key.clone(),
            terms.provider_wg_key.0,
            terms.wg_endpoint,
            inner_ip_for_deal(id),
        );
        cfg.dns = vec![EXIT_INNER_ADDR.into()];
        cfg.persistent_keepalive = Some(Duration::from_secs(15));
        // An idle rented exit is probed after 5 s without a sign of life (a busy one
        // after `busy_probe_after` of unanswered data); dead when a probe's handshake
        // initiation stays unanswered for `dead_after` (`docs/tunnel.md`).
        cfg.health.probe_after = Duration::from_secs(5);
        cfg.health.dead_after = self.inner.cfg.dead_after;
        // Validated with the config (`market.nat.*`).
        cfg.nat = self.inner.cfg.nat.settings().unwrap_or_default();
        let tunnel = match Tunnel::start(cfg.clone()).await {
            Ok(t) => t,
            Err(e) => {
                return Input::ExitFailed {
                    deal: id,
                    reason: format!("tunnel did not start: {e}"),
                };
            }
        };
        // NAT traversal: tell the exit where we are, so one behind a NAT sends first.
        if let Some(endpoint) = tunnel.public_endpoint() {
            self.report_endpoint(id, endpoint, tunnel.nat_path()).await;
        }
        if let Some(url) = &self.inner.verify_url
            && let Err(e) = tunnel.verify_exit(url, terms.exit_address).await
        {
            tunnel.shutdown().await;
            return Input::ExitFailed {
                deal: id,
                reason: format!("exit address not verified: {e}"),
            };
        }
        if let Some(reason) = self.misplaced(&terms) {
            tunnel.shutdown().await;
            return Input::ExitMisplaced { deal: id, reason };
        }
        let still_wanted = self
            .core()
            .deal(id)
            .is_some_and(|d| d.phase == Phase::Connecting);
        if !still_wanted {
            tunnel.shutdown().await;
            return Input::ExitLive { deal: id }; // the core answers with Disconnect
        }
        let protocols = terms.protocols.clone();
        let name = exit_name(id);
        let exit = ExitConfig {
            name: name.clone(),
            transport: ExitTransport::WireGuard {
                tunnel: Box::new(cfg),
                file: name.into(),
                exit_ip: Some(terms.exit_address),
            },
            attrs: attrs_of(&terms),
            protocols: if protocols.is_empty() {
                vec![Protocol::Any]
            } else {
                protocols
            },
        };
        self.inner.gw.add_exit(exit, Some(tunnel.clone()));
        self.inner.tunnels().insert(id, tunnel);
        metrics::gauge!("ipsx_market_exits_live").increment(1.0);
        tracing::info!(deal = id, exit = %terms.exit_address, "rented exit live");
        Input::ExitLive { deal: id }
    }
}

impl ExitDemand for PoolManager {
    fn want(&self, filter: &Filter) -> Result<String, String> {
        let answer = self.core().want(filter, unix_ms());
        match answer {
            Want::Renting(note) => {
                self.inner.wake.notify_one();
                Ok(note)
            }
            Want::Refused(reason) => Err(reason),
        }
    }

    fn wait(&self) -> Duration {
        self.inner.cfg.rent_wait
    }
}
