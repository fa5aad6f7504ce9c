//! Writing to the HTTP client: a target's response (head as soon as it is known, body
//! as it arrives, never more than the framing announced) and the gateway's own error
//! responses.

use std::io::Write as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::http1::{self, RequestHead};
use crate::response_head::{ResponseBody, ResponseHead};
use crate::upstream::{BodyReader, Upstream, read_more};

/// Most body bytes gathered before a write (small responses go out in one write).
const COALESCE: usize = 16 * 1024;

/// What streaming a response left behind.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Streamed {
    /// The client connection may carry another request.
    pub client_keep: bool,
    /// The target's body was read to its end (the upstream connection may be reused if
    /// nothing else rules it out).
    pub body_complete: bool,
}

/// How the body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientFraming {
    /// No body.
    None,
    /// The target's `Content-Length`, passed on; exactly that many bytes follow.
    Length,
    /// Re-chunked by the gateway.
    Chunked,
    /// Until the gateway closes (HTTP/1.0 clients, body of unknown length).
    Close,
}

/// Writes the response head at once, then streams the body from `up` as it arrives.
/// Every read from the target waits at most `idle`; a client that goes away (or stops
/// reading for `idle`) ends the exchange at once. A body cut short by the target is
/// never passed on as complete: the client connection is reset.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream_response(
    client: &mut TcpStream,
    client_buf: &mut BytesMut,
    watch_limit: usize,
    request: &RequestHead,
    response: &ResponseHead,
    held: Vec<Bytes>,
    reader: &mut BodyReader,
    up: &mut Upstream,
    client_keep: bool,
    idle: Duration,
) -> Streamed {
    let body = response.body(&request.method);
    let framing = match body {
        ResponseBody::None => ClientFraming::None,
        ResponseBody::Length(_) => ClientFraming::Length,
        ResponseBody::Chunked | ResponseBody::UntilClose if request.minor_version == 1 => {
            ClientFraming::Chunked
        }
        ResponseBody::Chunked | ResponseBody::UntilClose => ClientFraming::Close,
    };
    let keep = client_keep && framing != ClientFraming::Close;
    let mut out = encode_response_head(response, framing, keep);
    let failed = Streamed {
        client_keep: false,
        body_complete: false,
    };
    let push = |out: &mut Vec<u8>, data: &[u8]| {
        if data.is_empty() {
            return;
        }
        if framing == ClientFraming::Chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
    };
    for data in &held {
        push(&mut out, data);
    }
    // Each turn passes on what the target sent, then waits for more: bounded by what
    // the target sends.
    loop {
        loop {
            match reader.take_buffered(up) {
                Ok(Some(data)) => push(&mut out, &data),
                Ok(None) => break,
                Err(message) => {
                    tracing::debug!(%message, "response body broken; resetting the client");
                    let _ = write_client(client, &out, idle).await;
                    abort(client);
                    return failed;
                }
            }
            if out.len() >= COALESCE {
                if !write_client(client, &out, idle).await {
                    return failed;
                }
                out.clear();
            }
        }
        if reader.is_done() {
            break;
        }
        if !out.is_empty() {
            // Before waiting on the target, the client gets what there is.
            if !write_client(client, &out, idle).await {
                return failed;
            }
            out.clear();
        }
        let read = tokio::select! {
            biased;
            r = tokio::time::timeout(idle, read_more(up)) => r,
            () = client_gone(client, client_buf, watch_limit) => {
                tracing::debug!("client went away mid-response");
                abort(client);
                return failed;
            }
        };
        let closed = match read {
            Ok(Ok(0)) => reader.on_close(),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(message)) => Err(message),
            Err(_) => Err(format!("target idle for {idle:?} mid-body")),
        };
        if let Err(message) = closed {
            tracing::debug!(%message, "response body cut short; resetting the client");
            let _ = write_client(client, &out, idle).await;
            abort(client);
            return failed;
        }
    }
    if framing == ClientFraming::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() && !write_client(client, &out, idle).await {
        return failed;
    }
    Streamed {
        client_keep: keep,
        body_complete: true,
    }
}

/// The head sent to the client: the target's status and fields without hop-by-hop ones
/// (nor any it listed in `Connection`), with the framing fields the gateway keeps to.
fn encode_response_head(response: &ResponseHead, framing: ClientFraming, keep: bool) -> Vec<u8> {
    let listed = response.connection_tokens();
    let mut out = Vec::with_capacity(
        256 + response
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>(),
    );
    let _ = write!(out, "HTTP/1.1 {} ", response.status);
    out.extend_from_slice(&response.reason);
    out.extend_from_slice(b"\r\n");
    for (name, value) in &response.headers {
        let n = name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length")
            || http1::HOP_BY_HOP
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h.as_bytes()))
            || listed.iter().any(|l| n.eq_ignore_ascii_case(l.as_bytes()))
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(http1::trim_ows(value));
        out.extend_from_slice(b"\r\n");
    }
    match (framing, response.declared) {
        // A HEAD or 304 answer keeps the length the body would have had.
        (
            ClientFraming::Length | ClientFraming::None,
            crate::response_head::ResponseLength::Length(n),
        ) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        (ClientFraming::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(if keep {
        b"connection: keep-alive\r\n\r\n"
    } else {
        b"connection: close\r\n\r\n"
    });
    out
}

/// Writes `bytes` to the client, waiting at most `idle` for it to take them.
async fn write_client(client: &mut TcpStream, bytes: &[u8], idle: Duration) -> bool {
    matches!(
        tokio::time::timeout(idle, client.write_all(bytes)).await,
        Ok(Ok(()))
    )
}

/// Resolves when the client closes its side or fails. Bytes it sends meanwhile (a
/// pipelined next request) are kept in `buf`, up to `limit`; beyond, it stops watching.
async fn client_gone(client: &mut TcpStream, buf: &mut BytesMut, limit: usize) {
    // Each turn reads at least one byte or returns; bounded by `limit`.
    while buf.len() < limit {
        buf.reserve(4096);
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending::<()>().await;
}

/// Makes the close a reset (RST), so the client sees an error, not a clean end.
pub(crate) fn abort(stream: &TcpStream) {
    let _ = socket_linger_zero(stream);
}

fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))
}

/// Writes an error response with the reason in the body and in `X-Ipsx-Error`.
pub(crate) async fn write_error(
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
    if let Some(after) = e.retry_after() {
        // Whole seconds, rounded up: a client that waits that long finds a slot.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        let _ = write!(out, "retry-after: {}\r\n", secs.max(1));
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
