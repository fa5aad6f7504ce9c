//! Per-connection handling: sniff the first byte (0x05 = SOCKS5, else HTTP/1.x), then
//! run that protocol's front end over the shared pipeline.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use ipsx_rotation::ExitId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::{self, Authed};
use crate::body::{BodyError, ProxyBody};
use crate::error::ProxyError;
use crate::http1::{
    self, BodyFraming, ChunkEvent, ChunkedDecoder, HeadLimits, RequestHead, Target,
};
use crate::pipeline::{self, Plan};
use crate::relay::relay;
use crate::socks5::{self, Reply};
use crate::targeting::{HEADER_PREFIX, Targeting};
use crate::{Gateway, Runtime};

/// Most body bytes held back to match ban rules' body patterns.
const BAN_PEEK_LIMIT: usize = 64 * 1024;
/// Most response bytes gathered before the first write (small responses: one write).
const COALESCE: usize = 16 * 1024;

/// Decrements a counter when dropped.
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct ClientConn {
    stream: TcpStream,
    buf: BytesMut,
    peer: SocketAddr,
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
    loop {
        if !conn.buf.is_empty()
            && let Some((head, used)) = http1::parse_request_head(&conn.buf, limits)?
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
    let mut slots = auth::ConnSlots::default();
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
        if let Err(e) = slots.take(&rt, &authed) {
            count_request("http", e.kind());
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return;
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

fn targeting_for(
    rt: &Runtime,
    authed: &Authed<'_>,
    head: Option<&RequestHead>,
) -> Result<Targeting, ProxyError> {
    let max_ttl = rt.config.rotation.max_session_ttl;
    let mut targeting = authed.user.targeting.clone();
    if let Some(head) = head {
        targeting.add_headers(
            head.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            max_ttl,
        )?;
    }
    Ok(targeting)
}

fn count_request(protocol: &'static str, outcome: &'static str) {
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

/// Forwards one plain-HTTP request; returns whether the client connection may be reused.
async fn forward(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    conn: &mut ClientConn,
    head: &RequestHead,
    plan: &Plan,
) -> bool {
    let Target::Absolute { host, port, path } = &head.target else {
        return false;
    };
    let host_header = if *port == 80 {
        host.to_header()
    } else {
        format!("{}:{port}", host.to_header())
    };
    let uri: http::Uri = match format!("http://{host_header}{path}").parse() {
        Ok(u) => u,
        Err(_) => {
            let e = ProxyError::Head(http1::HeadError::Bad(
                "request target is not a valid URI".into(),
            ));
            count_request("http", e.kind());
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return false;
        }
    };
    let headers = match forwarded_headers(head, &host_header) {
        Ok(h) => h,
        Err(e) => {
            count_request("http", e.kind());
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return false;
        }
    };
    if head
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
        && head.framing != BodyFraming::None
        && conn
            .stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return false;
    }
    let has_body = head.framing != BodyFraming::None;
    let retry_allowed = head.is_idempotent() && !has_body && plan.session.is_none();
    let bans_need_body = rt.config.bans.iter().any(|b| !b.body_contains.is_empty());
    let mut tried: Vec<ExitId> = Vec::new();
    let mut body_done = !has_body;

    loop {
        let exit = match pipeline::choose_exit(gw, rt, plan, &tried).await {
            Ok(e) => e,
            Err(e) => {
                count_request("http", e.kind());
                let _ = write_error(&mut conn.stream, &e, has_body || head.close, None).await;
                return !has_body && !head.close;
            }
        };
        let _in_flight = gw.rotator.begin(&exit.id);
        let mut builder = http::Request::builder()
            .method(head.method.as_str())
            .uri(uri.clone());
        if let Some(h) = builder.headers_mut() {
            h.clone_from(&headers);
        }
        let (tx, body) = match head.framing {
            BodyFraming::None => (None, ProxyBody::Empty),
            BodyFraming::Length(n) => {
                let (tx, b) = ProxyBody::channel(Some(n));
                (Some(tx), b)
            }
            BodyFraming::Chunked => {
                let (tx, b) = ProxyBody::channel(None);
                (Some(tx), b)
            }
        };
        let Ok(request) = builder.body(body) else {
            return false;
        };
        let started = Instant::now();
        let send = tokio::time::timeout(
            rt.config.listener.response_timeout,
            exit.http_client().request(request),
        );
        tokio::pin!(send);
        let mut body_error: Option<ProxyError> = None;
        let result = match tx {
            None => send.await,
            Some(tx) => {
                let pump = pump_body(conn, head.framing, tx);
                tokio::pin!(pump);
                let mut pump_running = true;
                loop {
                    tokio::select! {
                        r = &mut send => break r,
                        p = &mut pump, if pump_running => {
                            pump_running = false;
                            match p {
                                Ok(()) => body_done = true,
                                Err(e) => body_error = Some(e),
                            }
                        }
                    }
                }
            }
        };
        if let Some(e) = body_error {
            count_request("http", e.kind());
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return false;
        }
        let response = match result {
            Err(_) => {
                gw.rotator.record_failure(&exit.id);
                let e = ProxyError::UpstreamTimeout {
                    exit: exit.id.to_string(),
                    timeout: rt.config.listener.response_timeout,
                };
                count_request("http", e.kind());
                let _ = write_error(&mut conn.stream, &e, true, None).await;
                return false;
            }
            Ok(Err(err)) => {
                let e = classify_client_error(&exit.id, &err);
                let connect_failed = matches!(e, ProxyError::Dial { .. });
                if let ProxyError::Dial { source, .. } = &e
                    && !matches!(source, crate::exit::DialError::Refused { .. })
                {
                    gw.rotator.record_failure(&exit.id);
                    pipeline::apply_ban(
                        gw,
                        rt,
                        &exit.id,
                        &plan.domain,
                        &pipeline::connect_outcome(source),
                    );
                }
                let refused = matches!(
                    e,
                    ProxyError::Dial {
                        source: crate::exit::DialError::Refused { .. },
                        ..
                    }
                );
                tried.push(exit.id.clone());
                if connect_failed
                    && !refused
                    && (retry_allowed || !has_body)
                    && tried.len() <= rt.config.rotation.max_retries
                    && plan.session.is_none()
                {
                    tracing::debug!(error = %e, "retrying on another exit");
                    continue;
                }
                count_request("http", e.kind());
                let _ = write_error(&mut conn.stream, &e, true, None).await;
                return false;
            }
            Ok(Ok(r)) => r,
        };
        gw.rotator.record_success(&exit.id, started.elapsed());
        metrics::histogram!("ipsx_upstream_response_seconds")
            .record(started.elapsed().as_secs_f64());

        let (parts, mut incoming) = response.into_parts();
        // Ban rules: by status, and by body pattern when any rule has one.
        let mut held: Vec<Bytes> = Vec::new();
        let mut upstream_done = false;
        let mut upstream_failed = false;
        if bans_need_body {
            let mut size = 0;
            while size < BAN_PEEK_LIMIT {
                match incoming.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            size += data.len();
                            held.push(data);
                        }
                    }
                    Some(Err(_)) => {
                        upstream_failed = true;
                        break;
                    }
                    None => {
                        upstream_done = true;
                        break;
                    }
                }
            }
        }
        let prefix: Vec<u8> = held
            .iter()
            .flat_map(|b| b.iter().copied())
            .take(BAN_PEEK_LIMIT)
            .collect();
        let outcome = ipsx_rotation::Outcome::Response {
            status: parts.status.as_u16(),
            body_prefix: &prefix,
        };
        if pipeline::apply_ban(gw, rt, &exit.id, &plan.domain, &outcome) {
            tried.push(exit.id.clone());
            if retry_allowed && tried.len() <= rt.config.rotation.max_retries {
                tracing::debug!(exit = %exit.id, status = parts.status.as_u16(), "banned response; retrying on another exit");
                continue;
            }
        }
        if upstream_failed {
            let e = ProxyError::Upstream {
                exit: exit.id.to_string(),
                message: "target closed the connection mid-response".into(),
            };
            count_request("http", e.kind());
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return false;
        }
        count_request("http", "ok");
        let client_keep = !head.close && body_done;
        return write_response(
            conn,
            head,
            parts,
            held,
            upstream_done,
            incoming,
            client_keep,
        )
        .await;
    }
}

fn forwarded_headers(head: &RequestHead, host_header: &str) -> Result<http::HeaderMap, ProxyError> {
    let listed = head.connection_tokens();
    let mut map = http::HeaderMap::with_capacity(head.headers.len() + 1);
    for (name, value) in &head.headers {
        let lower = name.to_ascii_lowercase();
        if http1::HOP_BY_HOP.contains(&lower.as_str())
            || listed.contains(&lower)
            || lower.starts_with(HEADER_PREFIX)
            || lower == "host"
            || lower == "expect"
        {
            continue;
        }
        let n = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            ProxyError::Head(http1::HeadError::Bad(format!("bad header name `{name}`")))
        })?;
        let v = http::HeaderValue::from_bytes(http1::trim_ows(value)).map_err(|_| {
            ProxyError::Head(http1::HeadError::Bad(format!(
                "bad value in header `{name}`"
            )))
        })?;
        map.append(n, v);
    }
    let host = http::HeaderValue::from_str(host_header)
        .map_err(|_| ProxyError::Head(http1::HeadError::Bad("bad host".into())))?;
    map.insert(http::header::HOST, host);
    Ok(map)
}

fn classify_client_error(exit: &ExitId, err: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(d) = s.downcast_ref::<crate::exit::DialError>() {
            return ProxyError::Dial {
                exit: exit.to_string(),
                source: d.clone(),
            };
        }
        source = s.source();
    }
    let message = if err.is_connect() {
        "connect failed".to_owned()
    } else {
        "target closed the connection before a response".to_owned()
    };
    ProxyError::Upstream {
        exit: exit.to_string(),
        message,
    }
}

/// Streams the client's request body into `tx`, validating its framing.
async fn pump_body(
    conn: &mut ClientConn,
    framing: BodyFraming,
    tx: mpsc::Sender<Result<Bytes, BodyError>>,
) -> Result<(), ProxyError> {
    let fail = |msg: &str| ProxyError::Head(http1::HeadError::Bad(msg.to_owned()));
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(mut left) => {
            while left > 0 {
                if conn.buf.is_empty() {
                    conn.buf.reserve(16 * 1024);
                    match conn.stream.read_buf(&mut conn.buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Err("client body truncated".into())).await;
                            return Err(fail("request body shorter than its Content-Length"));
                        }
                        Ok(_) => {}
                    }
                }
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(conn.buf.len());
                let chunk = conn.buf.split_to(take).freeze();
                left -= take as u64;
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            loop {
                if conn.buf.is_empty() {
                    conn.buf.reserve(16 * 1024);
                    match conn.stream.read_buf(&mut conn.buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Err("client body truncated".into())).await;
                            return Err(fail("chunked request body ended before its last chunk"));
                        }
                        Ok(_) => {}
                    }
                }
                let (used, event) = match decoder.step(&conn.buf) {
                    Ok(step) => step,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string().into())).await;
                        return Err(ProxyError::Head(e));
                    }
                };
                match event {
                    ChunkEvent::Data(range) => {
                        let mut part = conn.buf.split_to(used).freeze();
                        part = part.slice(range);
                        if tx.send(Ok(part)).await.is_err() {
                            return Ok(());
                        }
                    }
                    ChunkEvent::Framing => conn.buf.advance(used),
                    ChunkEvent::End => {
                        conn.buf.advance(used);
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Writes the response head and streams the body to the client. Returns whether the
/// connection may carry another request.
async fn write_response(
    conn: &mut ClientConn,
    head: &RequestHead,
    parts: http::response::Parts,
    held: Vec<Bytes>,
    upstream_done: bool,
    mut incoming: hyper::body::Incoming,
    client_keep: bool,
) -> bool {
    let status = parts.status.as_u16();
    let no_body =
        head.method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
    let listed: Vec<String> = parts
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let length: Option<u64> = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok());
    let chunked = !no_body && length.is_none() && head.minor_version == 1;
    let close_delimited = !no_body && length.is_none() && !chunked;
    let keep = client_keep && !close_delimited;

    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let reason = parts.status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if http1::HOP_BY_HOP.contains(&n) || listed.iter().any(|l| l == n) || n == "content-length"
        {
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(if keep {
        b"connection: keep-alive\r\n\r\n"
    } else {
        b"connection: close\r\n\r\n"
    });
    if no_body {
        return conn.stream.write_all(&out).await.is_ok() && keep;
    }

    let mut sent: u64 = 0;
    let push = |out: &mut Vec<u8>, data: &[u8]| {
        if data.is_empty() {
            return;
        }
        if chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
    };
    for data in &held {
        push(&mut out, data);
        sent += data.len() as u64;
    }
    let mut finished = upstream_done;
    while !finished {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    sent += data.len() as u64;
                    push(&mut out, &data);
                    if out.len() >= COALESCE {
                        if conn.stream.write_all(&out).await.is_err() {
                            return false;
                        }
                        out.clear();
                    }
                }
            }
            Some(Err(_)) => {
                // The target failed after the head went out: never pass a truncated body
                // on as complete. Flush what we have, then reset the connection.
                let _ = conn.stream.write_all(&out).await;
                abort(&conn.stream);
                return false;
            }
            None => finished = true,
        }
    }
    if length.is_some_and(|n| n != sent) {
        let _ = conn.stream.write_all(&out).await;
        abort(&conn.stream);
        return false;
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if conn.stream.write_all(&out).await.is_err() {
        return false;
    }
    keep
}

/// Makes the close a reset (RST), so the client sees an error, not a clean end.
fn abort(stream: &TcpStream) {
    let _ = socket_linger_zero(stream);
}

fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))
}

/// Writes an error response with the reason in the body and in `X-Ipsx-Error`.
async fn write_error(
    stream: &mut TcpStream,
    e: &ProxyError,
    close: bool,
    status_override: Option<u16>,
) -> std::io::Result<()> {
    let status = status_override.unwrap_or_else(|| e.status());
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let message: String = if status == 408 {
        "request head timeout".into()
    } else {
        e.to_string()
    };
    let message: String = message
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    let body = format!("ipsx: {message}\n");
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        body.len()
    );
    let _ = write!(out, "x-ipsx-error: {message}\r\n");
    if status == 407 {
        out.extend_from_slice(b"proxy-authenticate: Basic realm=\"ipsx\"\r\n");
    }
    if let ProxyError::RateLimited { retry_after, .. } = e {
        let _ = write!(out, "retry-after: {}\r\n", retry_after.as_secs().max(1));
    }
    out.extend_from_slice(if close {
        b"connection: close\r\n\r\n"
    } else {
        b"connection: keep-alive\r\n\r\n"
    });
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out).await?;
    if close {
        let _ = stream.shutdown().await;
    }
    Ok(())
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
        Err(e) => {
            count_request("socks5", e.kind());
            if !matches!(e, ProxyError::Auth) {
                tracing::info!(peer = %conn.peer, error = %e, "socks5 credentials refused");
            }
            let _ = conn.stream.write_all(&[1, 1]).await;
            return;
        }
    };
    if method == socks5::METHOD_USER_PASS && conn.stream.write_all(&[1, 0]).await.is_err() {
        return;
    }
    let mut slots = auth::ConnSlots::default();
    if let Err(e) = slots.take(&rt, &authed) {
        count_request("socks5", e.kind());
        let _ = conn
            .stream
            .write_all(&socks5::encode_reply(e.socks_reply(), None))
            .await;
        return;
    }
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
