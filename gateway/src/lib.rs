//! The ipsx gateway: one proxy port that speaks HTTP/1.1 (absolute-form and CONNECT)
//! and SOCKS5, authenticates clients by access token, reads per-request targeting, and
//! relays through exits chosen by the rotation policies under rate limits and bans.
//!
//! Owns: listeners, the request pipeline, relaying, the admin API, metrics and reload.
//! Does not own: choosing exits (`ipsx-rotation`), config parsing (`ipsx-config`),
//! tunnels (`ipsx-tunnel-pool`).

pub mod admin;
mod auth;
pub mod dashboard;
pub mod dest;
pub mod dialect;
pub mod echo;
pub mod error;
pub mod events;
pub mod exit;
mod forward;
pub mod http1;
mod http_front;
mod pipeline;
mod proxy;
pub mod relay;
mod respond;
pub mod response_head;
pub mod socks5;
mod socks_front;
pub mod targeting;
pub mod udp;
mod udp_front;
mod upstream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use ipsx_config::GatewayConfig;
use ipsx_rotation::{Clock, ExitId, ExitInfo, RateLimiter, Rotator, RotatorConfig, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::ProxyError;
use exit::{DialPolicy, ExitRuntime, OwnSockets};

/// One loaded config and everything built from it. Each request takes the snapshot that
/// is current when it starts and keeps it to the end, so a reload never changes a
/// request in flight.
pub struct Runtime {
    /// The validated config.
    pub config: GatewayConfig,
    /// Exits by id.
    pub exits: HashMap<ExitId, Arc<ExitRuntime>>,
    /// Per-token live connection counters, by token name.
    token_conns: HashMap<String, Arc<AtomicUsize>>,
    /// Per-account live connection counters, by configured account name.
    account_conns: HashMap<String, Arc<AtomicUsize>>,
    /// Increments at every successful reload.
    pub generation: u64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Something that can rent exits when no live exit matches a request (the market's
/// pool manager). The gateway calls it and waits, at most `wait`, for a new exit.
pub trait ExitDemand: Send + Sync + 'static {
    /// No live exit matches `filter`. `Ok(note)`: renting has started or is under way
    /// (`note` says what, for the error if the wait runs out); `Err(reason)`: nothing
    /// will be rented (budget, renting off), and `reason` says why.
    fn want(&self, filter: &ipsx_rotation::Filter) -> Result<String, String>;

    /// How long a request may wait for a rented exit.
    fn wait(&self) -> std::time::Duration;
}

/// Produces the market's status as JSON for the admin API.
pub type MarketStatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The running gateway, shared by every connection.
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    /// Exits added at runtime (rented on the market), beside the config's own.
    dynamic: std::sync::RwLock<HashMap<ExitId, Arc<ExitRuntime>>>,
    exits_changed: tokio::sync::Notify,
    demand: std::sync::OnceLock<Arc<dyn ExitDemand>>,
    market_status: std::sync::OnceLock<MarketStatusFn>,
    rotator: Rotator,
    limiter: RateLimiter,
    config_path: Option<PathBuf>,
    reload_lock: Mutex<()>,
    last_reload_error: std::sync::Mutex<Option<String>>,
    open_connections: AtomicUsize,
    waiters: AtomicUsize,
    requests_total: AtomicU64,
    requests: events::RequestLog,
    shutdown: CancellationToken,
    /// The gateway's own listening sockets, never dialled (see [`dest::refused_local`]).
    own: OwnSockets,
    /// SOCKS5 UDP associations: how many are open, datagrams relayed and dropped.
    udp: udp::Counters,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds a gateway from a validated config; `config_path` enables reload.
    pub fn new(config: GatewayConfig, config_path: Option<PathBuf>) -> Arc<Self> {
        Self::with_clock(config, config_path, Arc::new(SystemClock))
    }

    /// As [`Gateway::new`], with an injected clock (tests).
    pub fn with_clock(
        config: GatewayConfig,
        config_path: Option<PathBuf>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let rotator = Rotator::new(
            RotatorConfig {
                max_fallbacks: config.rotation.max_retries.max(3),
                max_sessions: config.rotation.max_sessions,
                ..RotatorConfig::default()
            },
            clock.clone(),
        );
        let limiter = RateLimiter::new(clock);
        let own = OwnSockets::default();
        let runtime = build_runtime(config, None, 0, &own);
        rotator.set_exits(exit_infos(&runtime));
        Arc::new(Self {
            runtime: ArcSwap::from_pointee(runtime),
            dynamic: std::sync::RwLock::new(HashMap::new()),
            exits_changed: tokio::sync::Notify::new(),
            demand: std::sync::OnceLock::new(),
            market_status: std::sync::OnceLock::new(),
            rotator,
            limiter,
            config_path,
            reload_lock: Mutex::new(()),
            last_reload_error: std::sync::Mutex::new(None),
            open_connections: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            requests_total: AtomicU64::new(0),
            requests: events::RequestLog::default(),
            shutdown: CancellationToken::new(),
            own,
            udp: udp::Counters::default(),
        })
    }

    /// The current config snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// The exit selector.
    pub fn rotator(&self) -> &Rotator {
        &self.rotator
    }

    /// Swaps in a new config: new requests use it at once; requests in flight finish on
    /// the snapshot they started with. Exits whose transport is unchanged keep their
    /// pooled connections, counters, bans and sessions.
    pub fn apply(&self, config: GatewayConfig) {
        let old = self.runtime.load_full();
        let new = build_runtime(config, Some(&old), old.generation + 1, &self.own);
        let mut infos = exit_infos(&new);
        infos.extend(self.dynamic_infos());
        self.rotator.set_exits(infos);
        self.runtime.store(Arc::new(new));
        self.exits_changed.notify_waiters();
        metrics::counter!("ipsx_config_reloads_total").increment(1);
        tracing::info!(generation = old.generation + 1, "config applied");
    }

    /// Adds (or replaces) an exit at runtime, beside the config's exits; it survives
    /// reloads until [`Gateway::remove_exit`]. `tunnel` is an already started tunnel for
    /// a WireGuard exit (so the caller could verify it first).
    pub fn add_exit(
        &self,
        config: ipsx_config::ExitConfig,
        tunnel: Option<ipsx_tunnel_pool::Tunnel>,
    ) -> Arc<ExitRuntime> {
        let rt = self.runtime();
        let policy = DialPolicy {
            allow: Arc::new(rt.config.listener.allow_destinations.clone()),
            connect_timeout: rt.config.listener.connect_timeout,
            own: self.own.clone(),
        };
        let attrs = config.attrs.clone();
        let exit = Arc::new(ExitRuntime::with_tunnel(config, policy, tunnel));
        self.dynamic
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(exit.id.clone(), exit.clone());
        self.rotator.upsert_exit(ExitInfo {
            id: exit.id.clone(),
            attrs,
        });
        self.exits_changed.notify_waiters();
        exit
    }

    /// Removes a runtime exit; requests in flight on it finish.
    pub fn remove_exit(&self, name: &str) -> Option<Arc<ExitRuntime>> {
        let id = ExitId::from(name);
        let removed = self
            .dynamic
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if removed.is_some() {
            self.rotator.remove_exit(&id);
        }
        removed
    }

    /// An exit by id: the config's, else a runtime one.
    pub fn exit(&self, rt: &Runtime, id: &ExitId) -> Option<Arc<ExitRuntime>> {
        rt.exits.get(id).cloned().or_else(|| {
            self.dynamic
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
        })
    }

    /// Every exit: the config's and the runtime ones.
    pub fn all_exits(&self) -> Vec<Arc<ExitRuntime>> {
        let mut all: Vec<Arc<ExitRuntime>> = self.runtime().exits.values().cloned().collect();
        all.extend(
            self.dynamic
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        all
    }

    fn dynamic_infos(&self) -> Vec<ExitInfo> {
        self.dynamic
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| ExitInfo {
                id: e.id.clone(),
                attrs: e.config.attrs.clone(),
            })
            .collect()
    }

    /// Installs what `GET /api/market` shows (once).
    pub fn set_market_status(&self, status: MarketStatusFn) {
        let _ = self.market_status.set(status);
    }

    /// The market's status for the admin API, if a market runs.
    pub fn market_status(&self) -> Option<serde_json::Value> {
        self.market_status.get().map(|f| f())
    }

    /// Installs the market's renting hook (once).
    pub fn set_demand(&self, demand: Arc<dyn ExitDemand>) {
        let _ = self.demand.set(demand);
    }

    /// Waits until the set of exits changes, at most `timeout`.
    pub async fn exits_changed(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.exits_changed.notified()).await;
    }

    /// Re-reads the config file (if the gateway was started from one) and applies it;
    /// returns the new generation. Changed keys that only a restart applies are logged
    /// (see [`Gateway::reload_report`]). On error the running config stays and the error
    /// is kept for the admin API.
    pub async fn reload(&self) -> Result<u64, String> {
        self.reload_report().await.map(|r| r.generation)
    }

    /// As [`Gateway::reload`], and says which changed keys need a restart to take
    /// effect (`[market]`, `listen`, `admin_listen`: the running ones stay).
    pub async fn reload_report(&self) -> Result<ReloadReport, String> {
        let _guard = self.reload_lock.lock().await;
        let Some(path) = &self.config_path else {
            return Err("gateway was not started from a config file".into());
        };
        let result = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| {
                GatewayConfig::from_toml(&text, &path.display().to_string())
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok(config) => {
                let needs_restart = needs_restart(&self.runtime().config, &config);
                if !needs_restart.is_empty() {
                    tracing::warn!(
                        keys = %needs_restart.join(", "),
                        "config reload: these changes need a restart; the running values stay"
                    );
                }
                self.apply(config);
                *self
                    .last_reload_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                Ok(ReloadReport {
                    generation: self.runtime.load().generation,
                    needs_restart,
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "config reload refused; keeping the running config");
                *self
                    .last_reload_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The last reload error, if the last reload failed.
    pub fn last_reload_error(&self) -> Option<String> {
        self.last_reload_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Client connections open now.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// The recent requests and their live listeners (the dashboard's live view).
    pub fn request_log(&self) -> &events::RequestLog {
        &self.requests
    }

    /// The SOCKS5 UDP relay's counters: open associations, datagrams relayed each way
    /// and dropped by reason.
    pub fn udp_stats(&self) -> udp::UdpStats {
        self.udp.snapshot()
    }

    /// Requests handled since start (all protocols, including refused ones).
    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    /// Starts a graceful shutdown: stop accepting, let requests finish until the drain
    /// timeout, then close what is left.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Starts WireGuard tunnels not started yet, then feeds every tunnel's health into
    /// the rotator: an exit whose tunnel is silent, never handshook, or leaves from
    /// another address than its `exit_ip` gets no new requests until it recovers.
    pub async fn check_exits(&self) {
        let rt = self.runtime();
        for exit in rt.exits.values() {
            let ipsx_config::ExitTransport::WireGuard { exit_ip, .. } = &exit.config.transport
            else {
                continue;
            };
            let tunnel = match exit.tunnel() {
                Some(t) => t.clone(),
                None => match exit.start_tunnel().await {
                    Ok(Some(t)) => t,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(exit = %exit.id, error = %e, "tunnel did not start");
                        self.rotator.set_healthy(&exit.id, false);
                        continue;
                    }
                },
            };
            let mut health = tunnel.health();
            if let (Some(url), Some(ip), None) = (
                &rt.config.listener.verify_url,
                exit_ip,
                health.exit_verified,
            ) {
                if let Err(e) = tunnel.verify_exit(url, *ip).await {
                    tracing::warn!(exit = %exit.id, error = %e, "exit address verification failed");
                }
                health = tunnel.health();
            }
            let healthy = health.healthy && health.exit_verified != Some(false);
            self.rotator.set_healthy(&exit.id, healthy);
            metrics::gauge!("ipsx_exit_healthy", "exit" => exit.id.to_string()).set(if healthy {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Drops rate-limiter state of keys idle for long, expired bans and sessions
    /// (called once a minute by [`serve`]).
    pub fn prune(&self) {
        self.limiter.prune();
        self.rotator.prune();
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// The generation now running.
    pub generation: u64,
    /// Changed keys a reload does not apply (a restart does), e.g. `gateway.listen`.
    pub needs_restart: Vec<String>,
}

/// The keys that differ between `old` and `new` and that only a restart applies: the
/// listeners are bound and the market is started once.
fn needs_restart(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let mut keys = Vec::new();
    if old.listener.listen != new.listener.listen {
        keys.push("gateway.listen".to_owned());
    }
    if old.listener.admin_listen != new.listener.admin_listen {
        keys.push("gateway.admin_listen".to_owned());
    }
    if old.market != new.market {
        keys.push("market".to_owned());
    }
    keys
}

fn exit_infos(rt: &Runtime) -> Vec<ExitInfo> {
    rt.config
        .exits
        .iter()
        .map(|e| ExitInfo {
            id: ExitId::from(e.name.as_str()),
            attrs: e.attrs.clone(),
        })
        .collect()
}

fn build_runtime(
    config: GatewayConfig,
    old: Option<&Runtime>,
    generation: u64,
    own: &OwnSockets,
) -> Runtime {
    own.add(config.listener.listen);
    if let Some(admin) = config.listener.admin_listen {
        own.add(admin);
    }
    let policy = DialPolicy {
        allow: Arc::new(config.listener.allow_destinations.clone()),
        connect_timeout: config.listener.connect_timeout,
        own: own.clone(),
    };
    let mut exits = HashMap::new();
    for exit in &config.exits {
        let id = ExitId::from(exit.name.as_str());
        let reused = old
            .and_then(|o| o.exits.get(&id))
            .filter(|rt| rt.same_transport(exit, &policy) && rt.config == *exit)
            .cloned();
        let rt = reused.unwrap_or_else(|| Arc::new(ExitRuntime::new(exit.clone(), policy.clone())));
        exits.insert(id, rt);
    }
    // Counters survive a reload, so connections open across it stay counted.
    let counters = |names: Vec<&String>, old: Option<&HashMap<String, Arc<AtomicUsize>>>| {
        names
            .into_iter()
            .map(|name| {
                let counter = old
                    .and_then(|o| o.get(name).cloned())
                    .unwrap_or_else(|| Arc::new(AtomicUsize::new(0)));
                (name.clone(), counter)
            })
            .collect::<HashMap<_, _>>()
    };
    let token_conns = counters(
        config.tokens.iter().map(|t| &t.name).collect(),
        old.map(|o| &o.token_conns),
    );
    let account_conns = counters(
        config.accounts.iter().map(|a| &a.name).collect(),
        old.map(|o| &o.account_conns),
    );
    Runtime {
        config,
        exits,
        token_conns,
        account_conns,
        generation,
    }
}

/// Serves the proxy port on an already bound listener until `shutdown` resolves or
/// [`Gateway::begin_shutdown`] is called; then drains for the configured time.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let tracker = TaskTracker::new();
    let stop = gateway.shutdown.clone();
    if let Ok(addr) = listener.local_addr() {
        gateway.own.add(addr);
    }
    tokio::pin!(shutdown);
    // Exit health every 2 s; limiter, ban and session state pruned once a minute.
    let housekeeping = {
        let gw = gateway.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut health = tokio::time::interval(std::time::Duration::from_secs(2));
            let mut prune = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = health.tick() => gw.check_exits().await,
                    _ = prune.tick() => gw.prune(),
                    () = stop.cancelled() => return,
                }
            }
        })
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let gw = gateway.clone();
                tracker.spawn(async move { proxy::handle_connection(gw, stream, peer).await });
            }
            () = &mut shutdown => { stop.cancel(); break; }
            () = stop.cancelled() => break,
        }
    }
    drop(listener);
    tracker.close();
    let drain = gateway.runtime().config.listener.drain_timeout;
    tracing::info!(open = gateway.open_connections(), ?drain, "draining");
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            open = gateway.open_connections(),
            "drain timeout: closing remaining connections"
        );
    }
    housekeeping.abort();
}
