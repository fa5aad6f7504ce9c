//! Per-connection handling: sniff the first byte (0x05 = SOCKS5, else HTTP/1.x), then
//! run that protocol's front end over the shared pipeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ipsx_rotation::ExitId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::auth::{self, Authed};
use crate::error::ProxyError;
use crate::forward::forward;
use crate::http1::{self, BodyFraming, HeadLimits, HeadScan, RequestHead, Target};
use crate::pipeline::{self, Plan};
use crate::relay::relay;
use crate::respond::write_error;
use crate::socks5::{self, Reply};
use crate::targeting::Targeting;
use crate::upstream::UpstreamCache;
use crate::{Gateway, Runtime};

/// Decrements a counter when dropped.
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Same, for counters shared by `Arc`.
struct ArcCountGuard(Arc<AtomicUsize>);

impl Drop for ArcCountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client connection: its socket, the bytes read but not used yet, and its own
/// idle connections to targets (plain HTTP).
pub(crate) struct ClientConn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    peer: SocketAddr,
    pub(crate) upstreams: UpstreamCache,
}

pub(crate) async fn handle_connection(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr) {
    let open = gw.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
    let _open = CountGuard(&gw.open_connections);
    metrics::gauge!("ipsx_open_connections").set(open as f64);
    let _ = stream.set_nodelay(true);
    let rt = gw.runtime();
    let mut conn = ClientConn {
        stream,
        buf: BytesMut::new(),
        peer,
        upstreams: UpstreamCache::default(),
    };
    let deadline = Instant::now() + rt.config.listener.header_timeout;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout_at(deadline, conn.stream.peek(&mut first)) => r,
        () = gw.shutdown.cancelled() => return,
    };
    let is_socks = match peeked {
        Ok(Ok(1)) if first[0] == 4 => {
            // SOCKS4 is not served: answer in its own words (0x5B: rejected) and close.
            count_request("socks4", "bad_request");
            let _ = conn.stream.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await;
            return;
        }
        Ok(Ok(1)) => first[0] == 5,
        Ok(_) => return,
        Err(_) => {
            // Nothing at all before the header deadline.
            let _ = write_error(
                &mut conn.stream,
                &ProxyError::Head(http1::HeadError::Bad("request head timeout".into())),
                true,
                Some(408),
            )
            .await;
            return;
        }
    };
    if open > rt.config.listener.max_connections {
        let err = ProxyError::Overloaded(format!(
            "gateway at its limit of {} connections",
            rt.config.listener.max_connections
        ));
        tracing::warn!(%peer, "{err}");
        if is_socks {
            // Answer the greeting with "no acceptable method" and close.
            let _ = conn.stream.write_all(&[5, socks5::METHOD_NONE]).await;
        } else {
            let _ = write_error(&mut conn.stream, &err, true, None).await;
        }
        return;
    }
    drop(rt);
    if is_socks {
        serve_socks(&gw, &mut conn, deadline).await;
    } else {
        serve_http(&gw, &mut conn, deadline).await;
    }
}

// === HTTP ===

enum HeadRead {
    /// A complete head and the bytes it took.
    Head(Box<RequestHead>, usize),
    /// The client closed between requests.
    Closed,
    /// No byte of a new request before the deadline (an idle keep-alive connection).
    Idle,
    /// Part of a head, but not all of it, before the deadline (slowloris): 408.
    TooSlow,
}

async fn read_head(
    conn: &mut ClientConn,
    limits: HeadLimits,
    deadline: Instant,
) -> Result<HeadRead, ProxyError> {
    let mut scan = HeadScan::new();
    loop {
        if !conn.buf.is_empty()
            && let Some((head, used)) =
                http1::parse_request_head_resumed(&conn.buf, limits, &mut scan)?
        {
            return Ok(HeadRead::Head(Box::new(head), used));
        }
        // Wait for bytes before giving the buffer memory, so idle connections hold none.
        match tokio::time::timeout_at(deadline, conn.stream.readable()).await {
            Err(_) => return Ok(deadline_passed(&conn.buf)),
            Ok(Err(_)) => return Ok(HeadRead::Closed),
            Ok(Ok(())) => {}
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(4096);
        }
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Err(_) => return Ok(deadline_passed(&conn.buf)),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return if conn.buf.is_empty() {
                    Ok(HeadRead::Closed)
                } else {
                    Err(ProxyError::Head(http1::HeadError::Bad(
                        "connection closed inside a request head".into(),
                    )))
                };
            }
            Ok(Ok(_)) => {}
        }
    }
}

fn deadline_passed(buf: &BytesMut) -> HeadRead {
    if buf.is_empty() {
        HeadRead::Idle
    } else {
        HeadRead::TooSlow
    }
}

async fn serve_http(gw: &Arc<Gateway>, conn: &mut ClientConn, first_deadline: Instant) {
    let mut deadline = first_deadline;
    let mut token_guard: Option<ArcCountGuard> = None;
    loop {
        let rt = gw.runtime();
        let limits = HeadLimits {
            max_bytes: rt.config.listener.max_header_bytes,
            max_headers: rt.config.listener.max_headers,
        };
        let read = tokio::select! {
            r = read_head(conn, limits, deadline) => r,
            () = gw.shutdown.cancelled(), if conn.buf.is_empty() => return,
        };
        let (head, used) = match read {
            Ok(HeadRead::Head(head, used)) => (head, used),
            Ok(HeadRead::Closed | HeadRead::Idle) => return,
            Ok(HeadRead::TooSlow) => {
                count_request("http", "header_timeout");
                let e = ProxyError::Head(http1::HeadError::Bad(
                    "request head not complete before the header deadline".into(),
                ));
                let _ = write_error(&mut conn.stream, &e, true, Some(408)).await;
                return;
            }
            Err(e) => {
                count_request("http", e.kind());
                tracing::debug!(peer = %conn.peer, error = %e, "bad request head");
                let _ = write_error(&mut conn.stream, &e, true, None).await;
                return;
            }
        };
        conn.buf.advance(used);
        gw.requests_total.fetch_add(1, Ordering::Relaxed);

        let authed = match auth::check_basic(&rt, head.header("proxy-authorization")) {
            Ok(a) => a,
            Err(e) => {
                if refuse_before_body(conn, &head, &e).await {
                    deadline = Instant::now() + rt.config.listener.idle_timeout;
                    continue;
                }
                return;
            }
        };
        if token_guard.is_none()
            && let Some(t) = authed.token
        {
            match acquire_token_slot(&rt, &t.name, t.max_connections) {
                Ok(g) => token_guard = g,
                Err(e) => {
                    count_request("http", e.kind());
                    let _ = write_error(&mut conn.stream, &e, true, None).await;
                    return;
                }
            }
        }
        let targeting = match targeting_for(&rt, &authed, Some(&head)) {
            Ok(t) => t,
            Err(e) => {
                if refuse_before_body(conn, &head, &e).await {
                    deadline = Instant::now() + rt.config.listener.idle_timeout;
                    continue;
                }
                return;
            }
        };
        let host = head.target.host().clone();
        let plan = Plan::new(&rt, &authed, &targeting, &host, head.target.port());
        if matches!(head.target, Target::Connect { .. }) {
            handle_connect(gw, &rt, conn, &plan, &host).await;
            return;
        }
        let keep_alive = forward(gw, &rt, conn, &head, &plan).await;
        if !keep_alive || gw.shutdown.is_cancelled() {
            return;
        }
        if conn.buf.is_empty() && conn.buf.capacity() > 8192 {
            conn.buf = BytesMut::new();
        }
        deadline = Instant::now() + rt.config.listener.idle_timeout;
    }
}

/// Answers a request refused before its body was read. Returns true when the
/// connection can carry another request: only if there was no body (an unread body
/// cannot be skipped safely, so the connection closes rather than resynchronise).
async fn refuse_before_body(conn: &mut ClientConn, head: &RequestHead, e: &ProxyError) -> bool {
    count_request("http", e.kind());
    let close = head.framing != BodyFraming::None || head.close;
    let _ = write_error(&mut conn.stream, e, close, None).await;
    !close
}

fn acquire_token_slot(
    rt: &Runtime,
    name: &str,
    max: Option<usize>,
) -> Result<Option<ArcCountGuard>, ProxyError> {
    let Some(counter) = rt.token_conns.get(name) else {
        return Ok(None);
    };
    let now = counter.fetch_add(1, Ordering::AcqRel) + 1;
    let guard = ArcCountGuard(counter.clone());
    if let Some(max) = max
        && now > max
    {
        return Err(ProxyError::Overloaded(format!(
            "token `{name}` is at its limit of {max} connections"
        )));
    }
    Ok(Some(guard))
}

fn targeting_for(
    rt: &Runtime,
    authed: &Authed<'_>,
    head: Option<&RequestHead>,
) -> Result<Targeting, ProxyError> {
    let max_ttl = rt.config.rotation.max_session_ttl;
    let (_account, mut targeting) = Targeting::from_username(&authed.username, max_ttl)?;
    if let Some(head) = head {
        targeting.add_headers(
            head.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            max_ttl,
        )?;
    }
    Ok(targeting)
}

pub(crate) fn count_request(protocol: &'static str, outcome: &'static str) {
    metrics::counter!("ipsx_requests_total", "protocol" => protocol, "outcome" => outcome)
        .increment(1);
}

async fn handle_connect(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    conn: &mut ClientConn,
    plan: &Plan,
    host: &http1::Host,
) {
    let (exit, mut upstream) = match pipeline::dial_with_retries(gw, rt, plan, host).await {
        Ok(pair) => pair,
        Err(e) => {
            count_request("connect", e.kind());
            tracing::info!(peer = %conn.peer, target = %plan.domain, error = %e, "CONNECT refused");
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return;
        }
    };
    count_request("connect", "ok");
    if conn
        .stream
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    if !conn.buf.is_empty() {
        // Bytes the client sent right after the CONNECT head (e.g. a TLS ClientHello).
        if upstream.write_all(&conn.buf).await.is_err() {
            return;
        }
        conn.buf.clear();
    }
    run_relay(gw, rt, &exit.id, &mut conn.stream, upstream).await;
}

async fn run_relay(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    exit: &ExitId,
    client: &mut TcpStream,
    upstream: crate::exit::ExitStream,
) {
    let _in_flight = gw.rotator.begin(exit);
    let stop = hard_stop(gw, rt.config.listener.drain_timeout);
    let stats = relay(client, upstream, rt.config.listener.idle_timeout, stop).await;
    metrics::counter!("ipsx_relay_bytes_total", "direction" => "up").increment(stats.up);
    metrics::counter!("ipsx_relay_bytes_total", "direction" => "down").increment(stats.down);
}

/// Resolves once shutdown began and the drain time has passed.
async fn hard_stop(gw: &Arc<Gateway>, drain: Duration) {
    gw.shutdown.cancelled().await;
    tokio::time::sleep(drain).await;
}

// === SOCKS5 ===

async fn read_socks<T>(
    conn: &mut ClientConn,
    deadline: Instant,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks5::SocksError>,
) -> Result<Option<T>, socks5::SocksError> {
    loop {
        if let Some((value, used)) = parse(&conn.buf)? {
            conn.buf.advance(used);
            return Ok(Some(value));
        }
        if conn.buf.len() > 1024 {
            return Err(socks5::SocksError {
                message: "message too long".into(),
                reply: Some(Reply::GeneralFailure),
            });
        }
        conn.buf.reserve(512);
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

async fn serve_socks(gw: &Arc<Gateway>, conn: &mut ClientConn, deadline: Instant) {
    let rt = gw.runtime();
    let fail = |e: &socks5::SocksError| {
        tracing::info!(error = %e, "socks5 refused");
        count_request("socks5", "bad_request");
    };
    let greeting = match read_socks(conn, deadline, socks5::parse_greeting).await {
        Ok(Some(g)) => g,
        Ok(None) => return,
        Err(e) => {
            fail(&e);
            let _ = conn.stream.write_all(&[5, socks5::METHOD_NONE]).await;
            return;
        }
    };
    let needs_auth = !rt.config.tokens.is_empty();
    let method = if greeting.methods.contains(&socks5::METHOD_USER_PASS) {
        socks5::METHOD_USER_PASS
    } else if !needs_auth && greeting.methods.contains(&socks5::METHOD_NO_AUTH) {
        socks5::METHOD_NO_AUTH
    } else {
        socks5::METHOD_NONE
    };
    if conn.stream.write_all(&[5, method]).await.is_err() || method == socks5::METHOD_NONE {
        count_request("socks5", "auth");
        return;
    }
    let (username, password) = if method == socks5::METHOD_USER_PASS {
        match read_socks(conn, deadline, socks5::parse_auth).await {
            Ok(Some(c)) => (c.username, c.password),
            Ok(None) => return,
            Err(e) => {
                fail(&e);
                let _ = conn.stream.write_all(&[1, 1]).await;
                return;
            }
        }
    } else {
        (String::new(), String::new())
    };
    let authed = match auth::check_credentials(&rt, &username, &password) {
        Ok(a) => a,
        Err(_) => {
            count_request("socks5", "auth");
            let _ = conn.stream.write_all(&[1, 1]).await;
            return;
        }
    };
    if method == socks5::METHOD_USER_PASS && conn.stream.write_all(&[1, 0]).await.is_err() {
        return;
    }
    let _token_guard = match authed
        .token
        .map(|t| acquire_token_slot(&rt, &t.name, t.max_connections))
        .transpose()
    {
        Ok(g) => g,
        Err(e) => {
            count_request("socks5", e.kind());
            let _ = conn
                .stream
                .write_all(&socks5::encode_reply(e.socks_reply(), None))
                .await;
            return;
        }
    };
    let request = match read_socks(conn, deadline, socks5::parse_request).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            fail(&e);
            if let Some(reply) = e.reply {
                let _ = conn
                    .stream
                    .write_all(&socks5::encode_reply(reply, None))
                    .await;
            }
            return;
        }
    };
    gw.requests_total.fetch_add(1, Ordering::Relaxed);
    let targeting = match targeting_for(&rt, &authed, None) {
        Ok(t) => t,
        Err(e) => {
            count_request("socks5", e.kind());
            tracing::info!(peer = %conn.peer, error = %e, "socks5 targeting refused");
            let _ = conn
                .stream
                .write_all(&socks5::encode_reply(e.socks_reply(), None))
                .await;
            return;
        }
    };
    let plan = Plan::new(&rt, &authed, &targeting, &request.host, request.port);
    let (exit, upstream) = match pipeline::dial_with_retries(gw, &rt, &plan, &request.host).await {
        Ok(pair) => pair,
        Err(e) => {
            count_request("socks5", e.kind());
            tracing::info!(peer = %conn.peer, target = %plan.domain, error = %e, "socks5 connect refused");
            let _ = conn
                .stream
                .write_all(&socks5::encode_reply(e.socks_reply(), None))
                .await;
            return;
        }
    };
    count_request("socks5", "ok");
    if conn
        .stream
        .write_all(&socks5::encode_reply(
            Reply::Succeeded,
            upstream.local_addr(),
        ))
        .await
        .is_err()
    {
        return;
    }
    let mut upstream = upstream;
    if !conn.buf.is_empty() {
        if upstream.write_all(&conn.buf).await.is_err() {
            return;
        }
        conn.buf.clear();
    }
    run_relay(gw, &rt, &exit.id, &mut conn.stream, upstream).await;
}
