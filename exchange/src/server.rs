//! The exchange node's HTTP JSON API (axum), its per-wallet event stream (SSE), the
//! journal writer and the deadline ticker: thin tokio glue around [`Exchange`].
//!
//! Flow of a write: the body size limit, the client address's rate ([`crate::limits`]),
//! parse the body (errors name the JSON path), verify the EIP-712 signature (the signer
//! is the identity), the wallet's rate, the offer's addresses and geography
//! ([`crate::geo`]), the wallet's caps and the message's own checks, and only then read
//! the chain balance for requests; then under one lock: apply to the engine and queue
//! the journal row. The answer waits until that row is committed. Lock order is the
//! journal order, so replay is exact.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, U256};
use alloy_sol_types::Eip712Domain;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::chain::{BalanceSource, ChainBalances, MemoryBalances};
use crate::config::ExchangeConfig;
use crate::engine::{BookQuery, BookView, Command, Deal, DealEvent, Exchange, Outcome};
use crate::error::ExchangeError;
use crate::geo::{self, GeoDb, GeoStatus};
use crate::limits::{Guard, Subscription};
use crate::sign::{self, Signed};
use crate::store::Store;
use crate::types::{
    BalanceProof, Cancel, EndpointReport, Extend, Offer, Preferences, Rating, Request, StatusReport,
};
pub use ipsx_exchange_client::api::{
    BatchItem, ErrorBody, ErrorEnvelope, NodeInfo, OfferBatch, ProfileView, SignedMessage,
};

struct ApiError(ExchangeError);

impl From<ExchangeError> for ApiError {
    fn from(e: ExchangeError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (
            status,
            Json(ErrorEnvelope {
                error: ErrorBody::from(&self.0),
            }),
        )
            .into_response();
        if let ExchangeError::Limited { retry_after_s, .. } = &self.0
            && *retry_after_s > 0
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*retry_after_s).into());
        }
        resp
    }
}

/// Parses a JSON body; errors carry the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ExchangeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| ExchangeError::BadJson {
        path: e.path().to_string(),
        reason: e.inner().to_string(),
    })?;
    de.end().map_err(|e| ExchangeError::BadJson {
        path: ".".into(),
        reason: e.to_string(),
    })?;
    Ok(v)
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Pending {
    seq: i64,
    body: String,
    events_upto: u64,
    done: oneshot::Sender<bool>,
}

struct Core {
    ex: Exchange,
    next_seq: i64,
    journal: Option<mpsc::UnboundedSender<Pending>>,
}

/// The running node's shared state.
struct Node {
    core: Mutex<Core>,
    failed: Arc<AtomicBool>,
    committed: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    domain: Eip712Domain,
    proof_domain: ipsx_chain::ChannelDomain,
    balances: Arc<dyn BalanceSource>,
    /// Whether the commission is known: the Centralizer's fee was read at least once
    /// (always true without a chain).
    fee_known: AtomicBool,
    max_batch: usize,
    guard: Arc<Guard>,
    geo: GeoDb,
    info: NodeInfo,
}

fn lock(m: &Mutex<Core>) -> Result<MutexGuard<'_, Core>, ExchangeError> {
    m.lock()
        .map_err(|_| ExchangeError::Storage("engine lock poisoned".into()))
}

impl Node {
    /// Queues `cmd` for the journal; the receiver says whether it was committed.
    fn journal(
        &self,
        core: &mut Core,
        cmd: &Command,
    ) -> Result<oneshot::Receiver<bool>, ExchangeError> {
        let body = serde_json::to_string(cmd).map_err(|e| ExchangeError::Storage(e.to_string()))?;
        let seq = core.next_seq;
        core.next_seq += 1;
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            seq,
            body,
            events_upto: core.ex.last_event_id(),
            done,
        };
        core.journal
            .as_ref()
            .ok_or_else(|| ExchangeError::Storage("node is shutting down".into()))?
            .send(pending)
            .map_err(|_| ExchangeError::Storage("journal writer stopped".into()))?;
        Ok(rx)
    }

    /// Applies one command under the lock (after journaling any pending deadline work).
    fn apply_locked(
        &self,
        core: &mut Core,
        cmd: &Command,
    ) -> Result<(Outcome, oneshot::Receiver<bool>), ExchangeError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(ExchangeError::Storage(
                "the journal failed; the node refuses writes".into(),
            ));
        }
        if !self.fee_known.load(Ordering::SeqCst)
            && matches!(
                cmd,
                Command::PostOffer { .. } | Command::PostRequest { .. } | Command::Extend { .. }
            )
        {
            return Err(ExchangeError::Chain(
                "the Centralizer's fee (feeBps) has not been read yet, so no deal can be \
                 priced; is the chain at rpc_url reachable?"
                    .into(),
            ));
        }
        let now = cmd.now();
        if core.ex.advance(now) {
            // Deadline effects happen now, before the command, in the journal too.
            drop(self.journal(core, &Command::Tick { now })?);
        }
        self.caps(&core.ex, cmd)?;
        let out = core.ex.apply(cmd)?;
        let rx = self.journal(core, cmd)?;
        Ok((out, rx))
    }

    /// The per-wallet caps (open orders, nonces held) a command must pass.
    fn caps(&self, ex: &Exchange, cmd: &Command) -> Result<(), ExchangeError> {
        let (wallet, nonce, order) = match cmd {
            Command::PostOffer { offer, .. } => (offer.provider, offer.nonce, true),
            Command::PostRequest { request, .. } => (request.requester, request.nonce, true),
            Command::Cancel { cancel, .. } => (cancel.wallet, cancel.nonce, false),
            Command::Report { report, .. } => (report.wallet, report.nonce, false),
            Command::Endpoint { report, .. } => (report.wallet, report.nonce, false),
            Command::Rate { rating, .. } => (rating.wallet, rating.nonce, false),
            Command::Extend { extend, .. } => (extend.wallet, extend.nonce, false),
            Command::Prefs { prefs, .. } => (prefs.wallet, prefs.nonce, false),
            Command::Tick { .. } | Command::Proof { .. } | Command::Fee { .. } => return Ok(()),
        };
        if ex.nonce_used(&wallet, nonce) {
            return Err(ExchangeError::Replay { wallet, nonce });
        }
        self.guard.nonces(wallet, ex.nonces_held(&wallet))?;
        if order {
            self.guard.open_orders(wallet, ex.open_orders_of(&wallet))?;
            self.guard
                .book_size(ex.offers().len() + ex.requests().len())?;
        }
        Ok(())
    }

    /// Every check of `cmd` that needs no chain read (caps, replay, field checks),
    /// without applying it: run before a balance read so strangers cost no RPC call.
    fn precheck(&self, cmd: &Command) -> Result<(), ExchangeError> {
        let core = lock(&self.core)?;
        self.caps(&core.ex, cmd)?;
        let now = cmd.now().max(core.ex.now());
        let ttl = core.ex.config().max_ttl_s;
        match cmd {
            Command::PostRequest { request, .. } => request.clone().check(now, ttl),
            Command::Extend { extend, .. } => extend.check(now, ttl),
            _ => Ok(()),
        }
    }

    /// The offer's addresses and geography: refused when special (unless the dev flag)
    /// or contradicted by the GeoIP database.
    fn admit_offer(&self, offer: &Offer) -> Result<GeoStatus, ExchangeError> {
        let allow = self.info.allow_private_addresses;
        geo::check_public("exit_address", offer.exit_address, allow)?;
        geo::check_public("wg_endpoint", offer.wg_endpoint.ip(), allow)?;
        Ok(self
            .geo
            .check(offer.exit_address, offer.country, offer.asn)?)
    }

    async fn submit(&self, cmd: Command) -> Result<Outcome, ExchangeError> {
        let (out, rx) = {
            let mut core = lock(&self.core)?;
            self.apply_locked(&mut core, &cmd)?
        };
        committed(rx).await?;
        Ok(out)
    }

    fn tick(&self, now: u64) -> Result<(), ExchangeError> {
        let mut core = lock(&self.core)?;
        if !self.failed.load(Ordering::SeqCst) && core.ex.advance(now) {
            drop(self.journal(&mut core, &Command::Tick { now })?);
        }
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&Exchange) -> T) -> Result<T, ExchangeError> {
        if self.failed.load(Ordering::SeqCst) {
            // Memory may hold a change the journal lost: serve nothing rather than it.
            return Err(ExchangeError::Storage(
                "the journal failed; restart the node to serve from disk".into(),
            ));
        }
        let core = lock(&self.core)?;
        Ok(f(&core.ex))
    }
}

async fn committed(rx: oneshot::Receiver<bool>) -> Result<(), ExchangeError> {
    match rx.await {
        Ok(true) => Ok(()),
        _ => Err(ExchangeError::Storage(
            "the journal write failed; the command is not accepted".into(),
        )),
    }
}

async fn writer(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    committed: watch::Sender<u64>,
    failed: Arc<AtomicBool>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 2048 {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let rows: Vec<(i64, String)> = batch
            .iter_mut()
            .map(|p| (p.seq, std::mem::take(&mut p.body)))
            .collect();
        let ok = if failed.load(Ordering::SeqCst) {
            false
        } else {
            match store.append(&rows).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("journal append failed, refusing further writes: {e}");
                    failed.store(true, Ordering::SeqCst);
                    false
                }
            }
        };
        if ok {
            let upto = batch.iter().map(|p| p.events_upto).max().unwrap_or(0);
            committed.send_if_modified(|v| {
                let changed = upto > *v;
                *v = (*v).max(upto);
                changed
            });
        }
        for p in batch {
            let _ = p.done.send(ok);
        }
    }
    store.close().await;
}

/// Builds the balance source the config names: the chain, or the static test table.
pub fn balance_source(config: &ExchangeConfig) -> Result<Arc<dyn BalanceSource>, ExchangeError> {
    match (&config.rpc_url, &config.static_balances) {
        (Some(url), None) => Ok(Arc::new(ChainBalances::new(url, config.centralizer)?)),
        (None, Some(table)) => {
            let m = MemoryBalances::new();
            for (w, v) in table {
                let v = crate::types::amount::parse(v).map_err(|e| ExchangeError::Config {
                    key: "static_balances".into(),
                    reason: e,
                })?;
                m.set(*w, U256::from(v));
            }
            Ok(Arc::new(m))
        }
        _ => Err(ExchangeError::Config {
            key: "rpc_url".into(),
            reason: "set either rpc_url or static_balances".into(),
        }),
    }
}

/// Runs the exchange node on `listener` until `shutdown` resolves, with the balance
/// source the config names (`rpc_url`, or `static_balances` for local tests).
pub async fn serve(
    listener: TcpListener,
    config: ExchangeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExchangeError> {
    let balances = balance_source(&config)?;
    serve_with(listener, config, balances, shutdown).await
}

/// [`serve`] that signals `ready` once the journal is replayed and requests are served.
pub async fn serve_ready(
    listener: TcpListener,
    config: ExchangeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: oneshot::Sender<()>,
) -> Result<(), ExchangeError> {
    let balances = balance_source(&config)?;
    run(listener, config, balances, shutdown, Some(ready)).await
}

/// [`serve`] with an explicit balance source.
pub async fn serve_with(
    listener: TcpListener,
    config: ExchangeConfig,
    balances: Arc<dyn BalanceSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExchangeError> {
    run(listener, config, balances, shutdown, None).await
}

async fn run(
    listener: TcpListener,
    config: ExchangeConfig,
    balances: Arc<dyn BalanceSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<()>>,
) -> Result<(), ExchangeError> {
    config.check()?;
    let geo = GeoDb::open(config.geoip_country.as_deref(), config.geoip_asn.as_deref())?;
    let store = Store::open(&config.database).await?;
    let mut ex = Exchange::new(config.engine);
    let rows = store.load().await?;
    let mut next_seq = 1;
    for (seq, body) in &rows {
        let cmd: Command = serde_json::from_str(body)
            .map_err(|e| ExchangeError::Storage(format!("journal row {seq}: {e}")))?;
        ex.apply(&cmd).map_err(|e| {
            ExchangeError::Storage(format!("journal row {seq} does not replay: {e}"))
        })?;
        next_seq = seq + 1;
    }
    tracing::info!(rows = rows.len(), "journal replayed");
    let (committed_tx, committed_rx) = watch::channel(ex.last_event_id());
    let (closing_tx, closing_rx) = watch::channel(false);
    let failed = Arc::new(AtomicBool::new(false));
    let (jtx, jrx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(writer(store, jrx, committed_tx, failed.clone()));
    let node = Arc::new(Node {
        core: Mutex::new(Core {
            ex,
            next_seq,
            journal: Some(jtx),
        }),
        failed,
        committed: committed_rx,
        closing: closing_rx,
        domain: sign::exchange_domain(config.chain_id, config.centralizer),
        proof_domain: ipsx_chain::ChannelDomain {
            chain_id: config.chain_id,
            centralizer: config.centralizer,
        },
        balances,
        fee_known: AtomicBool::new(false),
        max_batch: config.max_batch,
        guard: Arc::new(Guard::new(config.limits)),
        info: NodeInfo {
            chain_id: config.chain_id,
            centralizer: config.centralizer,
            domain_name: sign::DOMAIN_NAME.into(),
            domain_version: sign::DOMAIN_VERSION.into(),
            limits: config.limits,
            geoip_country: config.geoip_country.is_some(),
            geoip_asn: config.geoip_asn.is_some(),
            allow_private_addresses: config.allow_private_addresses,
            commission_bps: config.engine.commission_bps,
        },
        geo,
    });
    // The commission is the Centralizer's fee: read before serving, then followed. Until
    // it has been read once (chain unreachable), nothing that can make a deal is accepted.
    if let Err(e) = sync_fee(&node).await {
        tracing::warn!("reading the Centralizer's fee: {e}; no deals until it is read");
    }
    let fee_follower = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(FEE_REFRESH);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = sync_fee(&node).await {
                    tracing::warn!("reading the Centralizer's fee: {e}");
                }
            }
        })
    };
    let ticker = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0u64.. {
                every.tick().await;
                if n % 60 == 59 {
                    node.guard.sweep();
                }
                if let Err(e) = node.tick(unix_now()) {
                    tracing::warn!("tick: {e}");
                }
            }
        })
    };
    let app = router(node.clone(), config.max_body_bytes);
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let served = match &config.tls {
        None => axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ExchangeError::Storage(format!("server: {e}"))),
        Some(tls) => crate::tls::serve_tls(listener, app, tls, shutdown).await,
    };
    ticker.abort();
    let _ = ticker.await;
    fee_follower.abort();
    let _ = fee_follower.await;
    if let Ok(mut core) = node.core.lock() {
        core.journal = None;
    }
    drop(node);
    let _ = writer.await;
    served
}

fn router(node: Arc<Node>, max_body: usize) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/info", get(info))
        .route("/v1/offers", post(post_offer))
        .route("/v1/offers/batch", post(post_offer_batch))
        .route("/v1/requests", post(post_request))
        .route("/v1/cancel", post(post_cancel))
        .route("/v1/book", get(get_book))
        .route("/v1/deals/{id}", get(get_deal))
        .route("/v1/deals/{id}/proof", get(get_proof))
        .route("/v1/reports", post(post_report))
        .route("/v1/endpoints", post(post_endpoint))
        .route("/v1/proofs", post(post_proof))
        .route("/v1/extensions", post(post_extension))
        .route("/v1/ratings", post(post_rating))
        .route("/v1/preferences", post(post_preferences))
        .route("/v1/wallets/{address}/deals", get(get_wallet_deals))
        .route("/v1/wallets/{address}/events", get(get_events))
        .route("/v1/profiles/{address}", get(get_profile))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorEnvelope {
                    error: ErrorBody {
                        code: "not_found".into(),
                        field: Some("path".into()),
                        message: "no such route".into(),
                    },
                }),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            client_rate,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(node)
}

/// Charges every call to its client address before anything else is done with it.
async fn client_rate(State(node): State<Arc<Node>>, mut req: HttpRequest, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    if let Some(ip) = peer
        && let Err(e) = node.guard.client(ip, 1)
    {
        return ApiError(e).into_response();
    }
    req.extensions_mut().insert(ClientAddr(peer));
    next.run(req).await
}

/// The client address of a call, when the server knows it (set by [`client_rate`]).
#[derive(Debug, Clone, Copy)]
struct ClientAddr(Option<std::net::IpAddr>);

type ApiResult<T> = Result<T, ApiError>;

async fn health() -> &'static str {
    "ok"
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn info(State(node): State<Arc<Node>>) -> ApiResult<Json<NodeInfo>> {
    let commission_bps = node.read(|ex| ex.config().commission_bps)?;
    Ok(Json(NodeInfo {
        commission_bps,
        ..node.info.clone()
    }))
}

/// How often a node on a chain re-reads the Centralizer's fee (`feeBps`).
pub const FEE_REFRESH: Duration = Duration::from_secs(1);

/// Reads the Centralizer's fee and, when it differs from the engine's commission, journals
/// a [`Command::Fee`] so new deals carry it. Nothing to do without a chain.
async fn sync_fee(node: &Node) -> Result<(), ExchangeError> {
    let Some(bps) = node.balances.fee_bps().await? else {
        node.fee_known.store(true, Ordering::SeqCst);
        return Ok(());
    };
    if node.read(|ex| ex.config().commission_bps)? != bps {
        tracing::info!(fee_bps = bps, "commission follows the Centralizer's fee");
        node.submit(Command::Fee {
            bps,
            now: unix_now(),
        })
        .await?;
    }
    node.fee_known.store(true, Ordering::SeqCst);
    Ok(())
}

/// Parses and verifies a signed message, then charges its wallet's rate.
fn verified<T: Signed + DeserializeOwned>(node: &Node, body: &[u8]) -> Result<T, ExchangeError> {
    let m: SignedMessage<T> = parse_json(body)?;
    sign::verify(&m.payload, &m.signature, &node.domain)?;
    node.guard.wallet(m.payload.author(), 1)?;
    Ok(m.payload)
}

async fn post_offer(
    State(node): State<Arc<Node>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Outcome>)> {
    let offer: Offer = verified(&node, &body)?;
    node.admit_offer(&offer)?;
    let out = node
        .submit(Command::PostOffer {
            offer,
            now: unix_now(),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(out)))
}

async fn post_offer_batch(
    State(node): State<Arc<Node>>,
    axum::Extension(ClientAddr(peer)): axum::Extension<ClientAddr>,
    body: Bytes,
) -> ApiResult<Json<Vec<BatchItem>>> {
    let batch: OfferBatch = parse_json(&body)?;
    if batch.orders.len() > node.max_batch {
        return Err(ExchangeError::invalid(
            "orders",
            format!("{} orders, at most {}", batch.orders.len(), node.max_batch),
        )
        .into());
    }
    // Each offer counts against the client's rate (the call itself was charged one).
    if let Some(ip) = peer {
        node.guard
            .client(ip, batch.orders.len().saturating_sub(1))?;
    }
    let now = unix_now();
    let cmds: Vec<Result<Command, ExchangeError>> = batch
        .orders
        .into_iter()
        .map(|m| {
            sign::verify(&m.payload, &m.signature, &node.domain)?;
            node.guard.wallet(m.payload.provider, 1)?;
            node.admit_offer(&m.payload)?;
            Ok(Command::PostOffer {
                offer: m.payload,
                now,
            })
        })
        .collect();
    // One lock for the whole batch, one wait for all its journal rows.
    let pending: Vec<Result<(Outcome, oneshot::Receiver<bool>), ExchangeError>> = {
        let mut core = lock(&node.core)?;
        cmds.into_iter()
            .map(|c| c.and_then(|c| node.apply_locked(&mut core, &c)))
            .collect()
    };
    let mut items = Vec::with_capacity(pending.len());
    for p in pending {
        items.push(match p {
            Ok((out, rx)) => match committed(rx).await {
                Ok(()) => BatchItem::Ok(out),
                Err(e) => BatchItem::Error(ErrorBody::from(&e)),
            },
            Err(e) => BatchItem::Error(ErrorBody::from(&e)),
        });
    }
    Ok(Json(items))
}

async fn post_request(
    State(node): State<Arc<Node>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Outcome>)> {
    let request: Request = verified(&node, &body)?;
    let mut cmd = Command::PostRequest {
        request,
        balance: 0,
        now: unix_now(),
    };
    node.precheck(&cmd)?;
    if let Command::PostRequest {
        request, balance, ..
    } = &mut cmd
    {
        let b = node.balances.balance(request.requester).await?;
        *balance = u128::try_from(b).unwrap_or(u128::MAX);
    }
    let out = node.submit(cmd).await?;
    Ok((StatusCode::CREATED, Json(out)))
}

async fn post_cancel(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let cancel: Cancel = verified(&node, &body)?;
    Ok(Json(
        node.submit(Command::Cancel {
            cancel,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_report(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let report: StatusReport = verified(&node, &body)?;
    Ok(Json(
        node.submit(Command::Report {
            report,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_endpoint(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let report: EndpointReport = verified(&node, &body)?;
    Ok(Json(
        node.submit(Command::Endpoint {
            report,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_extension(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let extend: Extend = verified(&node, &body)?;
    node.precheck(&Command::Extend {
        extend: extend.clone(),
        balance: 0,
        now: unix_now(),
    })?;
    // Only the requester's proposal commits funds, so only it needs a balance read.
    let requester = node.read(|ex| ex.deal(extend.deal_id).map(|d| d.requester))?;
    let balance = if requester == Some(extend.wallet) {
        let b = node.balances.balance(extend.wallet).await?;
        u128::try_from(b).unwrap_or(u128::MAX)
    } else {
        0
    };
    Ok(Json(
        node.submit(Command::Extend {
            extend,
            balance,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_rating(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let rating: Rating = verified(&node, &body)?;
    Ok(Json(
        node.submit(Command::Rate {
            rating,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_preferences(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let prefs: Preferences = verified(&node, &body)?;
    Ok(Json(
        node.submit(Command::Prefs {
            prefs,
            now: unix_now(),
        })
        .await?,
    ))
}

async fn post_proof(State(node): State<Arc<Node>>, body: Bytes) -> ApiResult<Json<Outcome>> {
    let proof: BalanceProof = parse_json(&body)?;
    proof.check()?;
    let hash = proof.digest(&node.proof_domain);
    // The contract's rules exactly: v must be 27 or 28.
    let signer = sign::recover(&hash, &proof.signature, false)?;
    Ok(Json(
        node.submit(Command::Proof {
            proof,
            signer,
            now: unix_now(),
        })
        .await?,
    ))
}

fn parse_address(field: &str, s: &str) -> Result<Address, ExchangeError> {
    s.parse()
        .map_err(|_| ExchangeError::invalid(field, "expected a 0x-prefixed 20-byte address"))
}

fn parse_id(field: &str, s: &str) -> Result<u64, ExchangeError> {
    s.parse()
        .map_err(|_| ExchangeError::invalid(field, "expected a decimal id"))
}

async fn get_book(
    State(node): State<Arc<Node>>,
    q: Result<Query<BookQuery>, QueryRejection>,
) -> ApiResult<Json<BookView>> {
    let Query(q) = q.map_err(|e| ExchangeError::BadJson {
        path: "query".into(),
        reason: e.body_text(),
    })?;
    let mut view = node.read(|ex| ex.book(&q))??;
    // What the GeoIP database says now (offers it contradicted were refused).
    for o in &mut view.offers {
        o.geo = Some(
            node.geo
                .check(o.offer.exit_address, o.offer.country, o.offer.asn)
                .unwrap_or(GeoStatus::Unverified),
        );
    }
    Ok(Json(view))
}

async fn get_deal(State(node): State<Arc<Node>>, Path(id): Path<String>) -> ApiResult<Json<Deal>> {
    let id = parse_id("deal_id", &id)?;
    node.read(|ex| ex.deal(id).cloned())?
        .map(Json)
        .ok_or_else(|| ExchangeError::UnknownDeal(id).into())
}

async fn get_proof(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> ApiResult<Json<BalanceProof>> {
    let id = parse_id("deal_id", &id)?;
    let deal = node
        .read(|ex| ex.deal(id).cloned())?
        .ok_or(ExchangeError::UnknownDeal(id))?;
    deal.proof.map(Json).ok_or_else(|| {
        ExchangeError::invalid("deal_id", format!("deal {id} has no balance proof yet")).into()
    })
}

async fn get_wallet_deals(
    State(node): State<Arc<Node>>,
    Path(address): Path<String>,
) -> ApiResult<Json<Vec<Deal>>> {
    let w = parse_address("address", &address)?;
    Ok(Json(node.read(|ex| {
        ex.deals_of(&w).into_iter().cloned().collect()
    })?))
}

async fn get_profile(
    State(node): State<Arc<Node>>,
    Path(address): Path<String>,
) -> ApiResult<Json<ProfileView>> {
    let wallet = parse_address("address", &address)?;
    Ok(Json(node.read(|ex| ProfileView {
        wallet,
        profile: ex.profile(&wallet),
        held: ex.held(&wallet),
    })?))
}

/// Query of the event stream.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Resume after this event id (the `Last-Event-ID` header wins).
    #[serde(default)]
    after: Option<u64>,
}

struct StreamState {
    _slot: Subscription,
    node: Arc<Node>,
    wallet: Address,
    last: u64,
    buf: VecDeque<DealEvent>,
    committed: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
}

async fn get_events(
    State(node): State<Arc<Node>>,
    Path(address): Path<String>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let wallet = parse_address("address", &address)?;
    let Query(q) = q.map_err(|e| ExchangeError::BadJson {
        path: "query".into(),
        reason: e.body_text(),
    })?;
    let last = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ExchangeError::invalid("Last-Event-ID", "expected a decimal event id")
            })?,
        None => q.after.unwrap_or(0),
    };
    let slot = node.guard.subscribe(wallet)?;
    let st = StreamState {
        _slot: slot,
        committed: node.committed.clone(),
        closing: node.closing.clone(),
        node,
        wallet,
        last,
        buf: VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.buf.pop_front() {
                st.last = ev.id;
                let e = Event::default()
                    .id(ev.id.to_string())
                    .event("deal")
                    .json_data(&ev)
                    .unwrap_or_else(|_| Event::default().comment("unserialisable event"));
                return Some((Ok(e), st));
            }
            if *st.closing.borrow() {
                return None;
            }
            // Only committed events: a client never sees an event a crash could undo.
            let upto = *st.committed.borrow_and_update();
            let (wallet, last) = (st.wallet, st.last);
            let evs = st.node.read(|ex| ex.events_for(&wallet, last, 256)).ok()?;
            st.buf.extend(evs.into_iter().filter(|e| e.id <= upto));
            if !st.buf.is_empty() {
                continue;
            }
            tokio::select! {
                r = st.committed.changed() => if r.is_err() { return None },
                _ = st.closing.changed() => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
