//! The HTTP/1.x front end: read and check request heads (keep-alive loop, header
//! deadline), authenticate, read targeting, then CONNECT (tunnel) or forward
//! (`forward.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth;
use crate::error::ProxyError;
use crate::forward::forward;
use crate::http1::{self, BodyFraming, HeadLimits, HeadScan, RequestHead, Target};
use crate::pipeline::{self, Plan};
use crate::proxy::{ClientConn, count_request, log_request, run_relay, targeting_for};
use crate::respond::write_error;
use crate::{Gateway, Runtime};

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

pub(crate) async fn serve_http(gw: &Arc<Gateway>, conn: &mut ClientConn, first_deadline: Instant) {
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

async fn handle_connect(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    conn: &mut ClientConn,
    plan: &Plan,
    host: &http1::Host,
) {
    let began = Instant::now();
    let (exit, mut upstream) = match pipeline::dial_with_retries(gw, rt, plan, host).await {
        Ok(pair) => pair,
        Err(e) => {
            count_request("connect", e.kind());
            log_request(gw, plan, "connect", None, e.status(), began);
            tracing::info!(peer = %conn.peer, target = %plan.domain, error = %e, "CONNECT refused");
            let _ = write_error(&mut conn.stream, &e, true, None).await;
            return;
        }
    };
    count_request("connect", "ok");
    log_request(gw, plan, "connect", Some(&exit.id), 200, began);
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
