//! A strict, sans-IO parser for the HTTP/1.x response heads targets send back.
//!
//! Checked as strictly as request heads (QUALITY.md case 24): a target that frames its
//! response ambiguously (`Content-Length` with `Transfer-Encoding`, two different
//! lengths, a coding other than a lone `chunked`) could otherwise make the gateway send a
//! client more bytes than the framing it announced, which on a kept-alive connection is
//! a forged next response. Such a head is refused (502) before any byte reaches the
//! client.

use crate::http1::{
    self, Declared, HeadError, HeadLimits, HeadScan, declared_framing, parse_fields, split_lines,
};

/// A parsed, validated response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Status code, 100 to 599.
    pub status: u16,
    /// Reason phrase as sent (may be empty).
    pub reason: Vec<u8>,
    /// Header fields in order, names as sent, values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// What the framing fields declare.
    pub declared: ResponseLength,
    /// The target will close the connection after this response.
    pub close: bool,
}

/// The body length a response head declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseLength {
    /// Neither `Content-Length` nor `Transfer-Encoding`: the body runs until close.
    UntilClose,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// How the body of one response is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body (HEAD request, 1xx, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the target closes.
    UntilClose,
}

impl ResponseHead {
    /// The body that follows this head, for a request with `method` (RFC 9112
    /// section 6.3).
    pub fn body(&self, method: &str) -> ResponseBody {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return ResponseBody::None;
        }
        match self.declared {
            ResponseLength::UntilClose => ResponseBody::UntilClose,
            ResponseLength::Length(n) => ResponseBody::Length(n),
            ResponseLength::Chunked => ResponseBody::Chunked,
        }
    }

    /// Header names listed in `Connection` (lower-case): hop-by-hop for this message.
    pub fn connection_tokens(&self) -> Vec<String> {
        http1::connection_tokens(&self.headers)
    }
}

/// Finds a complete response head at the start of `buf` and parses it, resuming the
/// search where `scan` stopped on the previous call with a shorter prefix of `buf`.
///
/// Returns `Ok(None)` while more bytes are needed, `Ok(Some((head, consumed)))` once the
/// head is complete, and an error naming what is wrong as soon as the bytes seen can no
/// longer form an acceptable head.
pub fn parse_response_head(
    buf: &[u8],
    limits: HeadLimits,
    scan: &mut HeadScan,
) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    if !buf.is_empty() && !b"HTTP/".starts_with(&buf[..buf.len().min(5)]) {
        return Err(HeadError::Bad(
            "response does not start with `HTTP/`".into(),
        ));
    }
    let Some(end) = scan.find_end(buf, 0) else {
        if buf.len() > limits.max_bytes {
            return Err(HeadError::TooLarge(limits.max_bytes));
        }
        return Ok(None);
    };
    let total = end + 4;
    if total > limits.max_bytes {
        return Err(HeadError::TooLarge(limits.max_bytes));
    }
    let lines = split_lines(&buf[..end + 2], "response")?;
    let (status_line, field_lines) = lines
        .split_first()
        .ok_or_else(|| HeadError::Bad("empty response".into()))?;
    if field_lines.len() > limits.max_headers {
        return Err(HeadError::TooManyHeaders(limits.max_headers));
    }
    let (minor_version, status, reason) = parse_status_line(status_line)?;
    let headers = parse_fields(field_lines)?;
    let declared = match declared_framing(&headers, minor_version, "response")? {
        Declared::Nothing => ResponseLength::UntilClose,
        Declared::Length(n) => ResponseLength::Length(n),
        Declared::Chunked => ResponseLength::Chunked,
    };
    let close = http1::wants_close(&http1::connection_tokens(&headers), minor_version);
    Ok(Some((
        ResponseHead {
            minor_version,
            status,
            reason: reason.to_vec(),
            headers,
            declared,
            close,
        },
        total,
    )))
}

fn parse_status_line(line: &[u8]) -> Result<(u8, u16, &[u8]), HeadError> {
    let bad = |m: &str| HeadError::Bad(m.to_owned());
    let minor = match line.get(..9) {
        Some(b"HTTP/1.1 ") => 1,
        Some(b"HTTP/1.0 ") => 0,
        _ => return Err(bad("bad status line (want `HTTP/1.x NNN reason`)")),
    };
    let code = line
        .get(9..12)
        .filter(|c| c.iter().all(u8::is_ascii_digit))
        .ok_or_else(|| bad("bad status code"))?;
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&status) {
        return Err(bad("status code outside 100..=599"));
    }
    let reason = match line.get(12..) {
        None | Some([]) => &[][..],
        Some([b' ', rest @ ..]) => rest,
        Some(_) => return Err(bad("bad status line (no space after the code)")),
    };
    if reason
        .iter()
        .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return Err(bad("control character in the reason phrase"));
    }
    Ok((minor, status, reason))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::http1::tests::LIMITS;

    fn parse(text: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        parse_response_head(text, LIMITS, &mut HeadScan::new())
    }

    #[test]
    fn ordinary_heads_parse() {
        let (h, used) = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(used, 38);
        assert_eq!((h.status, h.minor_version, h.close), (200, 1, false));
        assert_eq!(h.body("GET"), ResponseBody::Length(5));
        assert_eq!(h.body("HEAD"), ResponseBody::None);
        let (h, _) = parse(b"HTTP/1.0 204 \r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.close), (204, false));
        assert_eq!(h.body("GET"), ResponseBody::None);
        let (h, _) = parse(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        assert_eq!(h.body("GET"), ResponseBody::UntilClose);
        let (h, _) = parse(b"HTTP/1.1 200\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body("GET"), ResponseBody::Chunked);
        assert!(parse(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
        assert!(parse(b"HTT").unwrap().is_none());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for case in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 99 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 20x OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
        ] {
            assert!(parse(case).is_err(), "{:?}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn a_trickled_head_is_scanned_once() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let mut scan = HeadScan::new();
        for n in 1..text.len() {
            assert!(
                parse_response_head(&text[..n], LIMITS, &mut scan)
                    .unwrap()
                    .is_none()
            );
        }
        let (h, used) = parse_response_head(text, LIMITS, &mut scan)
            .unwrap()
            .unwrap();
        assert_eq!((h.status, used), (200, text.len()));
    }

    fn encode(h: &ResponseHead) -> Vec<u8> {
        let mut out = format!("HTTP/1.{} {} ", h.minor_version, h.status).into_bytes();
        out.extend_from_slice(&h.reason);
        out.extend_from_slice(b"\r\n");
        for (n, v) in &h.headers {
            out.extend_from_slice(n.as_bytes());
            out.push(b':');
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), split in 0usize..600) {
            let mut scan = HeadScan::new();
            let split = split.min(bytes.len());
            let _ = parse_response_head(&bytes[..split], LIMITS, &mut scan);
            let _ = parse_response_head(&bytes, LIMITS, &mut scan);
            let mut prefixed = b"HTTP/1.1 200 OK\r\n".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = parse(&prefixed);
        }

        #[test]
        fn valid_heads_round_trip(
            minor in 0u8..2,
            status in 100u16..600,
            reason in "[a-zA-Z ]{0,20}",
            fields in proptest::collection::vec(("x-[a-z]{1,8}", "[!-~]([ -~]{0,20}[!-~])?"), 0..6),
            length in proptest::option::of(0u64..1_000_000),
        ) {
            let mut headers: Vec<(String, Vec<u8>)> =
                fields.into_iter().map(|(n, v)| (n, v.into_bytes())).collect();
            let declared = match length {
                Some(n) => {
                    headers.push(("Content-Length".into(), n.to_string().into_bytes()));
                    ResponseLength::Length(n)
                }
                None => ResponseLength::UntilClose,
            };
            let head = ResponseHead {
                minor_version: minor,
                status,
                reason: reason.into_bytes(),
                headers,
                declared,
                close: minor == 0,
            };
            let mut text = encode(&head);
            let len = text.len();
            text.extend_from_slice(b"body");
            let (parsed, used) = parse(&text).unwrap().unwrap();
            proptest::prop_assert_eq!(used, len);
            proptest::prop_assert_eq!(parsed, head);
        }
    }
}
