//! The pool manager's state machine and its tokio glue.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use ipsx_config::{ExitConfig, ExitTransport, MarketConfig, Protocol};
use ipsx_exchange::client::{Client, fresh};
use ipsx_exchange::engine::{Actor, DealTerms, EventKind};
use ipsx_exchange::types::{PartyStatus, Rating, Request, StatusReport, WgKey};
use ipsx_exchange_client::chain::{ChainClient, Deployment};
use ipsx_exchange_client::market::{EXIT_INNER_ADDR, amount_due, inner_ip_for_deal};
use ipsx_gateway::{ExitDemand, Gateway};
use ipsx_rotation::{ExitAttributes, Filter};
use ipsx_tunnel_pool::{SecretKey, Tunnel, TunnelConfig};
use serde::Serialize;
use tokio::sync::Notify;

/// Why the pool manager could not start or act.
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
}

/// Where one rented exit is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Matched; accepting and opening the channel.
    Matched,
    /// Channel open, first window paid; waiting for the provider to serve.
    Paid,
    /// Tunnel up, exit in rotation, paying as it goes.
    Serving,
    /// Over (completed, failed, cancelled).
    Done,
}

struct DealState {
    group: usize,
    provider: Address,
    terms: DealTerms,
    phase: Phase,
    channel: Option<B256>,
    paid: u128,
    serving_since: Option<Instant>,
    tunnel: Option<Tunnel>,
    note: String,
}

struct Group {
    name: String,
    filter: Filter,
    want: u32,
    on_demand: bool,
    last_used: Instant,
    /// IPs asked for and not matched yet, until the request expires.
    outstanding: u32,
    outstanding_until: Instant,
    refusal: Option<String>,
    /// Requests counted on this group's exits at the last look (idle detection).
    seen_requests: u64,
}

struct State {
    groups: Vec<Group>,
    deals: HashMap<u64, DealState>,
    spent: Vec<(Instant, u128)>,
    spent_total: u128,
    last_event: u64,
}

struct Inner {
    gw: Arc<Gateway>,
    cfg: MarketConfig,
    verify_url: Option<String>,
    exchange: Client,
    chain: ChainClient,
    wallet: Address,
    wg_key: SecretKey,
    state: Mutex<State>,
    wake: Notify,
    stop: tokio::sync::watch::Sender<bool>,
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

/// What the admin API shows of the market.
#[derive(Debug, Clone, Serialize)]
pub struct MarketStatus {
    /// The requester wallet.
    pub wallet: String,
    /// Deals, newest first.
    pub deals: Vec<serde_json::Value>,
    /// Demand groups with what they want, have, and why renting was refused.
    pub groups: Vec<serde_json::Value>,
    /// Deal values committed in the last hour (base units).
    pub spent_last_hour: String,
    /// Deal values committed since start (base units).
    pub spent_total: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn filter_of(target: &ipsx_config::DemandTarget) -> Result<Filter, MarketError> {
    let city = match &target.city {
        Some(c) => {
            Some(
                ipsx_rotation::parse_place("city", c).map_err(|e| MarketError::Config {
                    key: "demand.target.city",
                    message: e.to_string(),
                })?,
            )
        }
        None => None,
    };
    Ok(Filter {
        country: target.country,
        region: None,
        city,
        asn: target.asn,
        kind: target.kind,
    })
}

fn attrs_of(terms: &DealTerms) -> ExitAttributes {
    ExitAttributes {
        country: Some(terms.country),
        region: terms.region.clone(),
        city: terms.city.clone(),
        asn: terms.asn,
        kind: Some(terms.kind),
    }
}

impl PoolManager {
    /// Connects to the chain and the exchange, installs the renting hook in the gateway
    /// and starts following deals. `base_dir` resolves the deployment file's path.
    pub async fn start(
        gw: Arc<Gateway>,
        cfg: MarketConfig,
        base_dir: &Path,
        verify_url: Option<String>,
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
        let exchange = Client::new(
            &cfg.exchange_url,
            deployment.chain_id,
            deployment.centralizer,
        )
        .map_err(|e| MarketError::Exchange(e.to_string()))?
        .with_key(signer);
        let wg_key = match &cfg.wg_private_key {
            Some(k) => SecretKey::from_base64("wg_private_key", k.expose()).map_err(|e| {
                MarketError::Config {
                    key: "wg_private_key",
                    message: e.to_string(),
                }
            })?,
            None => SecretKey::generate(),
        };
        let now = Instant::now();
        let mut groups = Vec::new();
        for d in &cfg.demand {
            groups.push(Group {
                name: d.name.clone(),
                filter: filter_of(&d.target)?,
                want: d.count,
                on_demand: false,
                last_used: now,
                outstanding: 0,
                outstanding_until: now,
                refusal: None,
                seen_requests: 0,
            });
        }
        let (stop, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            gw: gw.clone(),
            cfg,
            verify_url,
            exchange,
            chain,
            wallet,
            wg_key,
            state: Mutex::new(State {
                groups,
                deals: HashMap::new(),
                spent: Vec::new(),
                spent_total: 0,
                last_event: 0,
            }),
            wake: Notify::new(),
            stop,
        });
        let manager = Self { inner };
        if manager.inner.cfg.rent_on_demand {
            gw.set_demand(Arc::new(manager.clone()));
        }
        tokio::spawn(manager.clone().follow_events());
        tokio::spawn(manager.clone().plan_loop());
        tokio::spawn(manager.clone().pay_loop());
        tracing::info!(wallet = %wallet, "pool manager started");
        Ok(manager)
    }

    /// The requester wallet.
    pub fn wallet(&self) -> Address {
        self.inner.wallet
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot for the admin API.
    pub fn status(&self) -> MarketStatus {
        let st = self.state();
        let hour_ago = Instant::now().checked_sub(Duration::from_secs(3600));
        let last_hour: u128 = st
            .spent
            .iter()
            .filter(|(t, _)| hour_ago.is_none_or(|h| *t >= h))
            .map(|(_, v)| *v)
            .sum();
        let mut deals: Vec<(&u64, &DealState)> = st.deals.iter().collect();
        deals.sort_by(|a, b| b.0.cmp(a.0));
        MarketStatus {
            wallet: format!("{:#x}", self.inner.wallet),
            deals: deals
                .into_iter()
                .take(200)
                .map(|(id, d)| {
                    serde_json::json!({
                        "deal": id,
                        "group": st.groups.get(d.group).map(|g| g.name.clone()),
                        "phase": d.phase,
                        "provider": format!("{:#x}", d.provider),
                        "exit_address": d.terms.exit_address.to_string(),
                        "country": d.terms.country.to_string(),
                        "price_per_ip_second": d.terms.price_per_ip_second.to_string(),
                        "value": d.terms.value.to_string(),
                        "paid": d.paid.to_string(),
                        "ends_in_s": d.terms.end.saturating_sub(unix_now()),
                        "note": d.note,
                    })
                })
                .collect(),
            groups: st
                .groups
                .iter()
                .map(|g| {
                    let live = st.deals.values().filter(|d| d.phase != Phase::Done && st.groups.get(d.group).is_some_and(|x| x.name == g.name)).count();
                    serde_json::json!({
                        "name": g.name, "filter": g.filter.to_string(), "want": g.want, "live": live,
                        "on_demand": g.on_demand, "outstanding": g.outstanding, "refusal": g.refusal,
                    })
                })
                .collect(),
            spent_last_hour: last_hour.to_string(),
            spent_total: st.spent_total.to_string(),
        }
    }

    /// Ends every deal (reported completed, so providers settle) and stops.
    pub async fn shutdown(&self) {
        let ids: Vec<u64> = self
            .state()
            .deals
            .iter()
            .filter(|(_, d)| d.phase != Phase::Done)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.end_deal(id, PartyStatus::Completed, "gateway shutting down")
                .await;
        }
        let _ = self.inner.stop.send(true);
    }

    // === event stream ===

    async fn follow_events(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut backoff = Duration::from_millis(200);
        loop {
            let last = self.state().last_event;
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
                        self.state().last_event = ev.id;
                        self.on_event(ev);
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

    fn on_event(&self, ev: ipsx_exchange::DealEvent) {
        if ev.requester != self.inner.wallet {
            return;
        }
        let id = ev.deal_id;
        match ev.kind {
            EventKind::Matched { terms } => {
                let group = {
                    let mut st = self.state();
                    if st.deals.contains_key(&id) {
                        return; // replayed after a reconnect
                    }
                    let attrs = attrs_of(&terms);
                    let group = st
                        .groups
                        .iter()
                        .position(|g| g.outstanding > 0 && g.filter.matches(&attrs))
                        .or_else(|| st.groups.iter().position(|g| g.filter.matches(&attrs)));
                    let Some(group) = group else { return };
                    let g = &mut st.groups[group];
                    g.outstanding = g.outstanding.saturating_sub(1);
                    st.spent.push((Instant::now(), terms.value));
                    st.spent_total = st.spent_total.saturating_add(terms.value);
                    st.deals.insert(
                        id,
                        DealState {
                            group,
                            provider: ev.provider,
                            terms: (*terms).clone(),
                            phase: Phase::Matched,
                            channel: None,
                            paid: 0,
                            serving_since: None,
                            tunnel: None,
                            note: String::new(),
                        },
                    );
                    group
                };
                metrics::counter!("ipsx_market_deals_total").increment(1);
                tracing::info!(deal = id, group, "deal matched");
                let me = self.clone();
                tokio::spawn(async move { me.accept_and_pay(id).await });
            }
            EventKind::Reported {
                actor: Actor::Provider,
                party_status,
                reason,
            } => match party_status {
                PartyStatus::Active => {
                    let ready = self
                        .state()
                        .deals
                        .get(&id)
                        .is_some_and(|d| d.phase == Phase::Paid);
                    if ready {
                        let me = self.clone();
                        tokio::spawn(async move { me.connect(id).await });
                    }
                }
                PartyStatus::Failed | PartyStatus::Rejected | PartyStatus::Completed => {
                    let me = self.clone();
                    let reason = format!("provider reported {}: {reason}", party_status.as_str());
                    tokio::spawn(
                        async move { me.end_deal(id, PartyStatus::Completed, &reason).await },
                    );
                }
                _ => {}
            },
            EventKind::StatusChanged if ev.status.is_final() => {
                let me = self.clone();
                let reason = format!("deal {}", ev.status.as_str());
                tokio::spawn(async move { me.end_deal(id, PartyStatus::Completed, &reason).await });
            }
            _ => {}
        }
    }

    async fn report(&self, deal_id: u64, status: PartyStatus, reason: &str) {
        let (expiry, nonce) = fresh();
        let r = StatusReport {
            wallet: self.inner.wallet,
            deal_id,
            status,
            reason: reason.chars().take(200).collect(),
            expiry,
            nonce,
        };
        if let Err(e) = self.inner.exchange.report(&r).await {
            tracing::warn!(deal = deal_id, error = %e, "status report refused");
        }
    }

    /// Accepts a matched deal, opens its payment channel and pays the first window.
    async fn accept_and_pay(&self, id: u64) {
        let Some((provider, value, price)) = self
            .state()
            .deals
            .get(&id)
            .map(|d| (d.provider, d.terms.value, d.terms.price_per_ip_second))
        else {
            return;
        };
        if price > self.inner.cfg.max_price_per_ip_second.0 {
            self.fail(
                id,
                PartyStatus::Rejected,
                "price above market.max_price_per_ip_second",
            )
            .await;
            return;
        }
        self.report(id, PartyStatus::Accepted, "").await;
        let channel = match self
            .inner
            .chain
            .open_channel(provider, U256::from(value))
            .await
        {
            Ok((channel, _)) => channel,
            Err(e) => {
                self.fail(
                    id,
                    PartyStatus::Failed,
                    &format!("could not open the payment channel: {e}"),
                )
                .await;
                return;
            }
        };
        let first = amount_due(price, Duration::ZERO, self.inner.cfg.payment_window, value);
        if let Err(e) = self.inner.exchange.post_proof(id, channel, first).await {
            self.fail(
                id,
                PartyStatus::Failed,
                &format!("first balance proof refused: {e}"),
            )
            .await;
            return;
        }
        if let Some(d) = self.state().deals.get_mut(&id) {
            d.channel = Some(channel);
            d.paid = first;
            if d.phase == Phase::Matched {
                d.phase = Phase::Paid;
            }
        }
        // The provider may have reported `active` while we were paying.
        if let Ok(deal) = self.inner.exchange.deal(id).await
            && deal.provider_status == PartyStatus::Active
        {
            self.connect(id).await;
        }
    }

    async fn fail(&self, id: u64, status: PartyStatus, reason: &str) {
        tracing::warn!(deal = id, reason, "deal given up");
        if let Some(d) = self.state().deals.get_mut(&id) {
            d.phase = Phase::Done;
            d.note = reason.to_owned();
        }
        self.report(id, status, reason).await;
        self.inner.wake.notify_one();
    }

    /// Brings the deal's tunnel up, verifies the exit, and puts it in rotation.
    async fn connect(&self, id: u64) {
        let terms = {
            let mut st = self.state();
            let Some(d) = st.deals.get_mut(&id) else {
                return;
            };
            if d.phase != Phase::Paid || d.tunnel.is_some() {
                return;
            }
            d.serving_since = Some(Instant::now()); // claimed: no second connect
            d.terms.clone()
        };
        let mut cfg = TunnelConfig::new(
            self.inner.wg_key.clone(),
            terms.provider_wg_key.0,
            terms.wg_endpoint,
            inner_ip_for_deal(id),
        );
        cfg.dns = vec![EXIT_INNER_ADDR.into()];
        cfg.persistent_keepalive = Some(Duration::from_secs(15));
        // A rented exit that goes quiet is probed after 5 s and declared dead after
        // `dead_after` without an answer, so it is replaced within seconds.
        cfg.health.probe_after = Duration::from_secs(5);
        cfg.health.dead_after = self.inner.cfg.dead_after;
        let tunnel = match Tunnel::start(cfg.clone()).await {
            Ok(t) => t,
            Err(e) => {
                self.fail(
                    id,
                    PartyStatus::Failed,
                    &format!("tunnel did not start: {e}"),
                )
                .await;
                return;
            }
        };
        if let Some(url) = &self.inner.verify_url
            && let Err(e) = tunnel.verify_exit(url, terms.exit_address).await
        {
            tunnel.shutdown().await;
            self.fail(
                id,
                PartyStatus::Failed,
                &format!("exit address not verified: {e}"),
            )
            .await;
            return;
        }
        let protocols = terms.protocols.clone();
        let exit = ExitConfig {
            name: format!("deal-{id}"),
            transport: ExitTransport::WireGuard {
                tunnel: Box::new(cfg),
                file: format!("deal-{id}").into(),
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
        {
            let mut st = self.state();
            if let Some(d) = st.deals.get_mut(&id) {
                d.phase = Phase::Serving;
                d.serving_since = Some(Instant::now());
                d.tunnel = Some(tunnel);
            }
        }
        metrics::gauge!("ipsx_market_exits_live").increment(1.0);
        tracing::info!(deal = id, exit = %terms.exit_address, "rented exit live");
        self.report(id, PartyStatus::Active, "").await;
    }

    /// Takes a deal's exit out of rotation, reports, rates the provider.
    async fn end_deal(&self, id: u64, status: PartyStatus, reason: &str) {
        let (tunnel, was_serving) = {
            let mut st = self.state();
            let Some(d) = st.deals.get_mut(&id) else {
                return;
            };
            if d.phase == Phase::Done {
                return;
            }
            let was_serving = d.phase == Phase::Serving;
            d.phase = Phase::Done;
            d.note = reason.to_owned();
            (d.tunnel.take(), was_serving)
        };
        self.inner.gw.remove_exit(&format!("deal-{id}"));
        if let Some(t) = tunnel {
            t.shutdown().await;
        }
        if was_serving {
            metrics::gauge!("ipsx_market_exits_live").decrement(1.0);
        }
        tracing::info!(deal = id, reason, "deal ended");
        self.report(id, status, reason).await;
        let (expiry, nonce) = fresh();
        let score = if status == PartyStatus::Completed && !reason.contains("failed") {
            5
        } else {
            2
        };
        let _ = self
            .inner
            .exchange
            .rate(&Rating {
                wallet: self.inner.wallet,
                deal_id: id,
                score,
                expiry,
                nonce,
            })
            .await;
        self.inner.wake.notify_one();
    }

    // === paying ===

    async fn pay_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        let mut tick = tokio::time::interval(self.inner.cfg.proof_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let due: Vec<(u64, B256, u128)> = {
                let st = self.state();
                st.deals
                    .iter()
                    .filter(|(_, d)| d.phase == Phase::Serving)
                    .filter_map(|(id, d)| {
                        let served = d.serving_since?.elapsed();
                        let amount = amount_due(
                            d.terms.price_per_ip_second,
                            served,
                            self.inner.cfg.payment_window,
                            d.terms.value,
                        );
                        (amount > d.paid).then_some((*id, d.channel?, amount))
                    })
                    .collect()
            };
            for (id, channel, amount) in due {
                match self.inner.exchange.post_proof(id, channel, amount).await {
                    Ok(_) => {
                        if let Some(d) = self.state().deals.get_mut(&id) {
                            d.paid = d.paid.max(amount);
                        }
                        metrics::counter!("ipsx_market_proofs_total").increment(1);
                    }
                    Err(e) => {
                        tracing::warn!(deal = id, error = %e, "balance proof refused; retrying next tick")
                    }
                }
            }
        }
    }

    // === planning ===

    async fn plan_loop(self) {
        let mut stop = self.inner.stop.subscribe();
        loop {
            self.plan().await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = self.inner.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn plan(&self) {
        let now = Instant::now();
        let unix = unix_now();
        let cfg = &self.inner.cfg;
        // Ends, dead exits, idle on-demand groups.
        let mut to_end: Vec<(u64, PartyStatus, String)> = Vec::new();
        let exits = self.inner.gw.rotator().exits();
        {
            let mut st = self.state();
            let State { groups, deals, .. } = &mut *st;
            for (gi, g) in groups.iter_mut().enumerate() {
                let used: u64 = exits
                    .iter()
                    .filter(|e| {
                        e.id.as_str()
                            .strip_prefix("deal-")
                            .and_then(|n| n.parse::<u64>().ok())
                            .and_then(|n| deals.get(&n))
                            .is_some_and(|d| d.group == gi)
                    })
                    .map(|e| e.requests)
                    .sum();
                if used != g.seen_requests {
                    g.seen_requests = used;
                    g.last_used = now;
                }
                if g.on_demand && g.want > 0 && now.duration_since(g.last_used) > cfg.idle_release {
                    tracing::info!(group = %g.name, "idle: letting its exits go");
                    g.want = 0;
                    for (id, d) in deals.iter() {
                        if d.group == gi && d.phase != Phase::Done {
                            to_end.push((*id, PartyStatus::Completed, "idle release".into()));
                        }
                    }
                }
            }
            for (id, d) in deals.iter_mut() {
                if d.phase == Phase::Done {
                    continue;
                }
                if unix >= d.terms.end {
                    to_end.push((*id, PartyStatus::Completed, "rental period over".into()));
                    continue;
                }
                // The tunnel's own health already waited `dead_after` for an answer.
                if d.phase == Phase::Serving
                    && d.tunnel.as_ref().is_some_and(|t| !t.health().healthy)
                {
                    to_end.push((
                        *id,
                        PartyStatus::Failed,
                        "exit failed: tunnel unhealthy".into(),
                    ));
                }
                // Paid but never served: the provider is not coming.
                if d.phase == Phase::Paid && d.serving_since.is_none() && unix > d.terms.start + 60
                {
                    to_end.push((
                        *id,
                        PartyStatus::Failed,
                        "provider never started serving".into(),
                    ));
                }
            }
        }
        for (id, status, reason) in to_end {
            self.end_deal(id, status, &reason).await;
        }
        // Requests for groups short of their want (renewing ahead of expiry).
        let mut to_request: Vec<(usize, u32)> = Vec::new();
        {
            let mut st = self.state();
            let State {
                groups,
                deals,
                spent,
                ..
            } = &mut *st;
            let hour_ago = now.checked_sub(Duration::from_secs(3600));
            let spent_hour: u128 = spent
                .iter()
                .filter(|(t, _)| hour_ago.is_none_or(|h| *t >= h))
                .map(|(_, v)| *v)
                .sum();
            let spent_total: u128 = spent.iter().map(|(_, v)| *v).sum();
            for (gi, g) in groups.iter_mut().enumerate() {
                if now >= g.outstanding_until {
                    g.outstanding = 0;
                }
                let renew_at = cfg.renew_ahead.as_secs();
                let live = deals
                    .values()
                    .filter(|d| {
                        d.group == gi
                            && d.phase != Phase::Done
                            && d.terms.end.saturating_sub(unix) > renew_at
                    })
                    .count() as u32;
                let short = g.want.saturating_sub(live + g.outstanding);
                if short == 0 {
                    continue;
                }
                let estimate = cfg
                    .max_price_per_ip_second
                    .0
                    .saturating_mul(u128::from(cfg.deal_duration.as_secs()))
                    .saturating_mul(u128::from(short));
                let refusal = if cfg
                    .max_spend_per_hour
                    .is_some_and(|cap| spent_hour.saturating_add(estimate) > cap.0)
                {
                    Some(format!(
                        "budget: renting {short} more for `{}` would pass market.max_spend_per_hour",
                        g.name
                    ))
                } else if cfg
                    .max_spend_total
                    .is_some_and(|cap| spent_total.saturating_add(estimate) > cap.0)
                {
                    Some(format!(
                        "budget: renting {short} more for `{}` would pass market.max_spend_total",
                        g.name
                    ))
                } else {
                    None
                };
                if refusal.is_some() {
                    if g.refusal != refusal {
                        tracing::warn!(group = %g.name, reason = ?refusal, "not renting");
                        metrics::counter!("ipsx_market_refusals_total").increment(1);
                    }
                    g.refusal = refusal;
                    continue;
                }
                g.refusal = None;
                g.outstanding += short;
                g.outstanding_until = now + Duration::from_secs(30);
                to_request.push((gi, short));
            }
        }
        for (gi, count) in to_request {
            self.post_request(gi, count).await;
        }
    }

    async fn post_request(&self, gi: usize, count: u32) {
        let Some(filter) = self.state().groups.get(gi).map(|g| g.filter.clone()) else {
            return;
        };
        let (_, nonce) = fresh();
        let request = Request {
            requester: self.inner.wallet,
            count,
            countries: filter.country.into_iter().collect(),
            regions: Vec::new(),
            cities: filter.city.clone().into_iter().collect(),
            asns: filter.asn.into_iter().collect(),
            types: filter.kind.into_iter().collect(),
            protocols: Vec::new(),
            min_rating: 0,
            diversity: Default::default(),
            exclude_providers: Vec::new(),
            duration_s: self.inner.cfg.deal_duration.as_secs(),
            max_price_per_ip_second: self.inner.cfg.max_price_per_ip_second.0,
            wg_public_key: WgKey(self.inner.wg_key.public_key()),
            expiry: unix_now() + 30,
            nonce,
        };
        match self.inner.exchange.post_request(&request).await {
            Ok(outcome) => tracing::info!(count, %filter, ?outcome, "request posted"),
            Err(e) => {
                tracing::warn!(count, %filter, error = %e, "request refused");
                let mut st = self.state();
                if let Some(g) = st.groups.get_mut(gi) {
                    g.outstanding = g.outstanding.saturating_sub(count);
                    g.refusal = Some(format!("exchange refused the request: {e}"));
                }
            }
        }
    }
}

impl ExitDemand for PoolManager {
    fn want(&self, filter: &Filter) -> Result<String, String> {
        let mut st = self.state();
        let now = Instant::now();
        let gi = match st.groups.iter().position(|g| g.filter == *filter) {
            Some(i) => i,
            None => {
                st.groups.push(Group {
                    name: format!("on-demand {filter}"),
                    filter: filter.clone(),
                    want: 1,
                    on_demand: true,
                    last_used: now,
                    outstanding: 0,
                    outstanding_until: now,
                    refusal: None,
                    seen_requests: 0,
                });
                st.groups.len() - 1
            }
        };
        let g = &mut st.groups[gi];
        g.last_used = now;
        if g.want == 0 {
            g.want = 1;
        }
        if let Some(r) = &g.refusal {
            return Err(format!("no live exit matches {filter}, and {r}"));
        }
        drop(st);
        self.inner.wake.notify_one();
        Ok(format!("renting an exit matching {filter} on the exchange"))
    }

    fn wait(&self) -> Duration {
        self.inner.cfg.rent_wait
    }
}
