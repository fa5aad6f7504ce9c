//! Forwarding one plain-HTTP request: choose an exit, reuse or open a connection to the
//! target through it, send the request (streaming its body), read the response head
//! strictly, apply the ban rules, and hand the response to `respond.rs`.

use std::sync::Arc;

use bytes::Bytes;
use ipsx_rotation::ExitId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::http1::{
    self, BodyFraming, ChunkEvent, ChunkedDecoder, HeadLimits, RequestHead, Target,
};
use crate::pipeline::{self, Plan};
use crate::proxy::{ClientConn, count_request, log_request};
use crate::respond::{stream_response, write_error};
use crate::response_head::ResponseHead;
use crate::upstream::{
    BodyReader, HeadFailure, Upstream, encode_request_head, read_more, read_response_head,
};
use crate::{Gateway, Runtime};

/// Most body bytes held back to match ban rules' body patterns.
const BAN_PEEK_LIMIT: usize = 64 * 1024;

/// Why an exchange with the target failed before a response head.
enum Failure {
    /// The client's request body was malformed or cut short (400).
    Client(ProxyError),
    /// The target did not answer acceptably (502).
    Target(HeadFailure),
}

/// Forwards one plain-HTTP request; returns whether the client connection may be reused.
pub(crate) async fn forward(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    conn: &mut ClientConn,
    head: &RequestHead,
    plan: &Plan,
) -> bool {
    let Target::Absolute { host, port, path } = &head.target else {
        return false;
    };
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        let e = ProxyError::Head(http1::HeadError::Bad(
            "request target is not a valid URI".into(),
        ));
        return answer(conn, &e, true).await;
    }
    let request = encode_request_head(head, host, *port, path);
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
    let listener = &rt.config.listener;
    let limits = HeadLimits {
        max_bytes: listener.max_header_bytes,
        max_headers: listener.max_headers,
    };
    let idle = listener.idle_timeout;
    let mut tried: Vec<ExitId> = Vec::new();
    let began = Instant::now();

    'exits: loop {
        let exit = match pipeline::choose_exit(gw, rt, plan, &tried).await {
            Ok(e) => e,
            Err(e) => {
                let close = has_body || head.close;
                count_request("http", e.kind());
                log_request(gw, plan, "http", None, e.status(), began);
                let _ = write_error(&mut conn.stream, &e, close, None).await;
                return !close;
            }
        };
        let _in_flight = gw.rotator.begin(&exit.id);
        let mut cached = conn.upstreams.take(&exit.id, host, *port, idle);
        // At most two turns: a kept-alive connection the target may have closed
        // meanwhile, then a fresh one.
        let (mut up, response, body_done) = loop {
            let reused = cached.is_some();
            let started = Instant::now();
            let mut up = match cached.take() {
                Some(up) => up,
                None => match exit.dial(host, *port).await {
                    Ok(stream) => Upstream::new(&exit.id, host, *port, stream),
                    Err(source) => {
                        match pipeline::dial_failed(gw, rt, plan, &exit.id, source, &mut tried) {
                            Ok(()) => continue 'exits,
                            Err(e) => return answer(conn, &e, true).await,
                        }
                    }
                },
            };
            let sent = tokio::time::timeout(
                listener.response_timeout,
                exchange(conn, &mut up, &request, head.framing, limits),
            )
            .await;
            match sent {
                Ok(Ok((response, body_done))) => {
                    gw.rotator.record_success(&exit.id, started.elapsed());
                    metrics::histogram!("ipsx_upstream_response_seconds")
                        .record(started.elapsed().as_secs_f64());
                    break (up, response, body_done);
                }
                Ok(Err(Failure::Target(HeadFailure::ClosedEarly(_)))) if reused && !has_body => {
                    tracing::debug!(exit = %exit.id, "kept-alive target connection was closed; dialling afresh");
                }
                Ok(Err(Failure::Client(e))) => return answer(conn, &e, true).await,
                Ok(Err(Failure::Target(f))) => {
                    let e = ProxyError::Upstream {
                        exit: exit.id.to_string(),
                        message: f.to_string(),
                    };
                    return answer(conn, &e, true).await;
                }
                Err(_) => {
                    gw.rotator.record_failure(&exit.id);
                    let e = ProxyError::UpstreamTimeout {
                        exit: exit.id.to_string(),
                        timeout: listener.response_timeout,
                    };
                    return answer(conn, &e, true).await;
                }
            }
        };

        let mut reader = BodyReader::new(response.body(&head.method));
        let held = match hold_body_start(&mut reader, &mut up, bans_need_body, idle).await {
            Ok(held) => held,
            Err(message) => {
                let e = ProxyError::Upstream {
                    exit: exit.id.to_string(),
                    message,
                };
                return answer(conn, &e, true).await;
            }
        };
        let prefix: Vec<u8> = held
            .iter()
            .flat_map(|b| b.iter().copied())
            .take(BAN_PEEK_LIMIT)
            .collect();
        let outcome = ipsx_rotation::Outcome::Response {
            status: response.status,
            body_prefix: &prefix,
        };
        if pipeline::apply_ban(gw, rt, &exit.id, &plan.domain, &outcome) {
            tried.push(exit.id.clone());
            if retry_allowed && pipeline::may_retry(rt, plan, &tried) {
                tracing::debug!(exit = %exit.id, status = response.status, "banned response; retrying on another exit");
                continue;
            }
        }
        count_request("http", "ok");
        log_request(gw, plan, "http", Some(&exit.id), response.status, began);
        let client_keep = !head.close && body_done;
        let watch_limit = listener.max_header_bytes;
        let streamed = stream_response(
            &mut conn.stream,
            &mut conn.buf,
            watch_limit,
            head,
            &response,
            held,
            &mut reader,
            &mut up,
            client_keep,
            idle,
        )
        .await;
        if streamed.body_complete && body_done && reusable(&response, &up) {
            conn.upstreams.put(up);
        }
        return streamed.client_keep;
    }
}

/// The start of the body, checked before the head goes out: the bytes that came with
/// the head (so a broken start of a chunked body is a 502, not a reset), and, when a ban
/// rule has a body pattern, whatever arrives up to `BAN_PEEK_LIMIT`.
async fn hold_body_start(
    reader: &mut BodyReader,
    up: &mut Upstream,
    wait_for_more: bool,
    idle: std::time::Duration,
) -> Result<Vec<Bytes>, String> {
    let mut held = Vec::new();
    let mut size = 0;
    // Each turn holds buffered body bytes or reads more; bounded by BAN_PEEK_LIMIT.
    loop {
        if let Some(data) = reader.take_buffered(up)? {
            size += data.len();
            held.push(data);
            if size < BAN_PEEK_LIMIT {
                continue;
            }
        }
        if !wait_for_more || reader.is_done() || size >= BAN_PEEK_LIMIT {
            return Ok(held);
        }
        match tokio::time::timeout(idle, read_more(up)).await {
            Ok(Ok(0)) => reader.on_close()?,
            Ok(Ok(_)) => {}
            Ok(Err(message)) => return Err(message),
            Err(_) => return Err(format!("target idle for {idle:?} mid-body")),
        }
    }
}

/// Counts and answers an error; returns whether the connection may go on (`!close`).
async fn answer(conn: &mut ClientConn, e: &ProxyError, close: bool) -> bool {
    count_request("http", e.kind());
    let _ = write_error(&mut conn.stream, e, close, None).await;
    !close
}

/// A connection may carry another request when the target did not ask to close it and
/// sent nothing past the end of this response.
fn reusable(response: &ResponseHead, up: &Upstream) -> bool {
    !response.close && up.buf.is_empty()
}

/// Sends the request head and body and reads the response head. With a body, the body
/// streams while the head is awaited, so an early answer (say a 413) is read at once;
/// the returned flag says whether the client's body was read to its end.
async fn exchange(
    conn: &mut ClientConn,
    up: &mut Upstream,
    request: &[u8],
    framing: BodyFraming,
    limits: HeadLimits,
) -> Result<(ResponseHead, bool), Failure> {
    let sent = up.stream.write_all(request).await;
    if let Err(e) = sent {
        return Err(Failure::Target(HeadFailure::ClosedEarly(format!(
            "sending the request failed: {e}"
        ))));
    }
    if framing == BodyFraming::None {
        let head = read_response_head(&mut up.stream, &mut up.buf, limits)
            .await
            .map_err(Failure::Target)?;
        return Ok((head, true));
    }
    let (mut rd, mut wr) = tokio::io::split(&mut up.stream);
    let pump = pump_body(conn, framing, &mut wr);
    let read = read_response_head(&mut rd, &mut up.buf, limits);
    tokio::pin!(pump, read);
    let mut pumping = true;
    let mut body_done = false;
    // At most two turns: the pump ends once, then the head arrives.
    loop {
        tokio::select! {
            p = &mut pump, if pumping => {
                pumping = false;
                match p {
                    Ok(()) => body_done = true,
                    Err(Pump::Client(e)) => return Err(Failure::Client(e)),
                    // The target stopped reading: it may still answer (early response).
                    Err(Pump::Target) => {}
                }
            }
            head = &mut read => {
                let head = head.map_err(Failure::Target)?;
                return Ok((head, body_done));
            }
        }
    }
}

/// Why pumping a request body stopped.
enum Pump {
    /// The client's body is malformed or cut short.
    Client(ProxyError),
    /// Writing to the target failed.
    Target,
}

/// Streams the client's request body to the target, validating its framing; a chunked
/// body is decoded and re-chunked (trailers dropped).
async fn pump_body<W: AsyncWrite + Unpin>(
    conn: &mut ClientConn,
    framing: BodyFraming,
    w: &mut W,
) -> Result<(), Pump> {
    let fail = |msg: &str| Pump::Client(ProxyError::Head(http1::HeadError::Bad(msg.to_owned())));
    match framing {
        BodyFraming::None => Ok(()),
        BodyFraming::Length(mut left) => {
            // Each turn moves at least one byte or ends.
            while left > 0 {
                if conn.buf.is_empty() && !fill(&mut conn.stream, &mut conn.buf).await {
                    return Err(fail("request body shorter than its Content-Length"));
                }
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(conn.buf.len());
                let chunk = conn.buf.split_to(take);
                left -= take as u64;
                w.write_all(&chunk).await.map_err(|_| Pump::Target)?;
            }
            Ok(())
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            let mut out = Vec::new();
            // Each turn consumes at least one byte or ends.
            loop {
                if conn.buf.is_empty() && !fill(&mut conn.stream, &mut conn.buf).await {
                    return Err(fail("chunked request body ended before its last chunk"));
                }
                let (used, event) = decoder
                    .step(&conn.buf)
                    .map_err(|e| Pump::Client(ProxyError::Head(e)))?;
                match event {
                    ChunkEvent::Data(range) => {
                        let part = conn.buf.split_to(used);
                        let data = &part[range];
                        if data.is_empty() {
                            continue;
                        }
                        out.clear();
                        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        out.extend_from_slice(data);
                        out.extend_from_slice(b"\r\n");
                        w.write_all(&out).await.map_err(|_| Pump::Target)?;
                    }
                    ChunkEvent::Framing => bytes::Buf::advance(&mut conn.buf, used),
                    ChunkEvent::End => {
                        bytes::Buf::advance(&mut conn.buf, used);
                        w.write_all(b"0\r\n\r\n").await.map_err(|_| Pump::Target)?;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Reads more of the client's bytes; false when it closed or failed.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut bytes::BytesMut) -> bool {
    buf.reserve(16 * 1024);
    matches!(r.read_buf(buf).await, Ok(n) if n > 0)
}
