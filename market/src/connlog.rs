//! The requester's fetch of a deal's connection log through the deal's tunnel: one
//! `GET` (HTTP/1.0, the request signed by the requester wallet) to the exit's inner
//! address on [`connlog::SERVICE_PORT`], bounded in size and time. The answer is
//! checked by the core ([`crate::core`], `Input::LogFetched`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use ipsx_exchange_client::connlog::{self, LogExport};
use ipsx_exchange_client::market::EXIT_INNER_ADDR;
use ipsx_tunnel_pool::Tunnel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The whole fetch (connect, request, answer) gives up after this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (the export's cap plus room for the headers), bytes.
pub const MAX_ANSWER_BYTES: usize = connlog::MAX_EXPORT_BYTES + 16 * 1024;

/// Fetches deal `deal_id`'s log from `provider`'s exit through `tunnel`.
pub async fn fetch_through(
    tunnel: &Tunnel,
    key: &PrivateKeySigner,
    provider: Address,
    deal_id: u64,
    now_s: u64,
) -> Result<LogExport, String> {
    let target = connlog::request_target(key, provider, deal_id, now_s.saturating_add(60))
        .map_err(|e| e.to_string())?;
    let dst = SocketAddr::new(IpAddr::V4(EXIT_INNER_ADDR), connlog::SERVICE_PORT);
    let io = async {
        let mut s = tunnel
            .connect_tcp(dst)
            .await
            .map_err(|e| format!("connecting to {dst} through the tunnel: {e}"))?;
        let req = format!("GET {target} HTTP/1.0\r\nHost: {EXIT_INNER_ADDR}\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                break;
            }
            if buf.len() + n > MAX_ANSWER_BYTES {
                return Err(format!("answer over {MAX_ANSWER_BYTES} bytes"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, String>(buf)
    };
    let raw = tokio::time::timeout(FETCH_TIMEOUT, io)
        .await
        .map_err(|_| format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))??;
    let (status, body) = parse_response(&raw)?;
    if status != 200 {
        let msg = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        return Err(format!("the provider answered {status}: {msg}"));
    }
    serde_json::from_slice(body).map_err(|e| format!("the answer is not a log export: {e}"))
}

/// Splits an HTTP/1.x answer read to its end into the status code and the body, with
/// the gateway's strict response-head parser (ambiguous framing refused). A chunked
/// body is refused (an HTTP/1.0 request never gets one); a `Content-Length` longer than
/// the body is a truncated answer.
pub fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), String> {
    use ipsx_gateway::http1::{HeadLimits, HeadScan};
    use ipsx_gateway::response_head::{ResponseLength, parse_response_head};
    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 16 * 1024,
        max_headers: 64,
    };
    let (head, consumed) = parse_response_head(raw, LIMITS, &mut HeadScan::default())
        .map_err(|e| format!("the answer's head: {e}"))?
        .ok_or("no end of the headers")?;
    let body = &raw[consumed..];
    match head.declared {
        ResponseLength::UntilClose => Ok((head.status, body)),
        ResponseLength::Length(len) => match usize::try_from(len) {
            Ok(len) if len <= body.len() => Ok((head.status, &body[..len])),
            _ => Err(format!(
                "truncated: content-length {len}, {} bytes read",
                body.len()
            )),
        },
        ResponseLength::Chunked => Err("transfer-encoding chunked is not supported".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn answers_are_split_and_bounded_by_their_length() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}extra";
        assert_eq!(parse_response(raw).unwrap(), (200, &b"{}"[..]));
        let raw = b"HTTP/1.0 403 Forbidden\r\n\r\n{\"error\":\"signature\"}";
        assert_eq!(parse_response(raw).unwrap().0, 403);
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n",
            b"SSH-2.0-x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        /// Never panics; whatever it accepts has a 3-digit code and a body inside the input.
        #[test]
        fn any_bytes_are_parsed_or_refused(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok((code, body)) = parse_response(&raw) {
                prop_assert!(code <= 999);
                prop_assert!(body.len() <= raw.len());
            }
        }

        /// A well-formed answer comes back as it was written.
        #[test]
        fn well_formed_answers_round_trip(code in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut raw = format!("HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
            raw.extend_from_slice(&body);
            let (c, b) = parse_response(&raw).unwrap();
            prop_assert_eq!(c, code);
            prop_assert_eq!(b, &body[..]);
        }
    }
}
