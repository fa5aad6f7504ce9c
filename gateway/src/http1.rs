//! A strict, sans-IO parser for HTTP/1.x request heads arriving at the proxy port.
//!
//! Strict on purpose: a proxy that reads a head differently from the server behind it is
//! how requests get smuggled (RFC 9112 section 11.2). So anything ambiguous is refused:
//! bare LF, CR or NUL inside a line, obs-fold, `Content-Length` together with
//! `Transfer-Encoding`, any coding but a lone `chunked`, odd `Content-Length` forms, and
//! origin-form targets (a proxy never serves itself: DNS-rebinding defence).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Limits applied while reading a head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Largest head in bytes, request line and final blank line included.
    pub max_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// Why a head was refused; converts to the HTTP status sent back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// The head is larger than the limit (431).
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    /// More header fields than the limit (431).
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    /// Malformed or ambiguous (400); the text names what is wrong.
    #[error("{0}")]
    Bad(String),
}

impl HeadError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge(_) | Self::TooManyHeaders(_) => 431,
            Self::Bad(_) => 400,
        }
    }
}

fn bad(msg: impl Into<String>) -> HeadError {
    HeadError::Bad(msg.into())
}

/// A destination host as written by the client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal (including legacy IPv4 forms such as `127.1` or `2130706433`,
    /// which resolvers would turn into addresses, so they are addresses here too).
    Ip(IpAddr),
    /// A DNS name, lower-case, without a trailing dot.
    Name(String),
}

impl Host {
    /// Parses a host: `[v6]`, IPv4 (with legacy forms), or a DNS name.
    pub fn parse(text: &str) -> Result<Self, HeadError> {
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .ok_or_else(|| bad(format!("bad IPv6 host `{}`", clip(text))))?;
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| bad(format!("bad IPv6 host `{}`", clip(text))));
        }
        if text.is_empty() {
            return Err(bad("empty host"));
        }
        if let Some(ip) = parse_legacy_ipv4(text) {
            return Ok(Host::Ip(IpAddr::V4(ip)));
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let labels_ok = name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        // A name whose last label is all digits would be read as an address by some
        // resolvers; refuse it rather than guess.
        let numeric_tld = name
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if !labels_ok || numeric_tld {
            return Err(bad(format!("bad host `{}`", clip(text))));
        }
        Ok(Host::Name(name))
    }

    /// The host as it goes into a `Host` header or a log line.
    pub fn to_header(&self) -> String {
        match self {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            Host::Ip(ip) => ip.to_string(),
            Host::Name(n) => n.clone(),
        }
    }
}

/// Reads IPv4 the way `inet_aton` does: 1 to 4 parts, each decimal, octal (`0` prefix)
/// or hex (`0x`), the last part filling the remaining bytes. `None` if not of that form.
pub fn parse_legacy_ipv4(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(4);
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X"))
        {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        if !digits.bytes().all(|b| (b as char).is_digit(radix)) {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        nums.push(value);
    }
    let (last, init) = nums.split_last()?;
    if init.iter().any(|n| *n > 255) {
        return None;
    }
    let last_bits = 8 * (4 - init.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut addr: u64 = 0;
    for (i, n) in init.iter().enumerate() {
        addr |= n << (24 - 8 * i as u32);
    }
    addr |= last;
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}

/// Where the request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET http://host:port/path` (absolute-form).
    Absolute {
        /// Target host.
        host: Host,
        /// Target port (80 if absent).
        port: u16,
        /// Path and query, starting with `/`.
        path: String,
    },
    /// `CONNECT host:port` (authority-form).
    Connect {
        /// Target host.
        host: Host,
        /// Target port.
        port: u16,
    },
}

impl Target {
    /// The target host.
    pub fn host(&self) -> &Host {
        match self {
            Target::Absolute { host, .. } | Target::Connect { host, .. } => host,
        }
    }

    /// The target port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Absolute { port, .. } | Target::Connect { port, .. } => *port,
        }
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Method token as sent (`GET`, `CONNECT`, ...).
    pub method: String,
    /// Where it goes.
    pub target: Target,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order, names as sent, values without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body delimitation.
    pub framing: BodyFraming,
    /// The client wants the connection closed after this exchange.
    pub close: bool,
}

impl RequestHead {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// True for methods that a retry on another exit cannot turn into a double action.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        )
    }

    /// Header names listed in `Connection` (lower-case): hop-by-hop for this message.
    pub fn connection_tokens(&self) -> Vec<String> {
        connection_tokens(&self.headers)
    }
}

/// Header names listed in the `Connection` fields of `headers` (lower-case).
pub(crate) fn connection_tokens(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// Header fields that belong to one hop and are never forwarded (RFC 9110 section 7.6.1).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn clip(s: &str) -> String {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where the scan for the end of a head stopped, so that the next call with more bytes
/// resumes there instead of re-reading the whole buffer (a head trickled in byte by byte
/// costs linear time, not quadratic).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadScan {
    /// Bytes of the buffer already searched for the blank line and checked.
    scanned: usize,
}

impl HeadScan {
    /// A scan at the start of a buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Finds the blank line that ends the head in `buf[from..]`, resuming where the last
    /// call stopped. Returns the offset of its `\r\n\r\n`.
    pub(crate) fn find_end(&mut self, buf: &[u8], from: usize) -> Option<usize> {
        let resume = self.scanned.saturating_sub(3).max(from).min(buf.len());
        let found = buf[resume..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| resume + p);
        if found.is_none() {
            self.scanned = buf.len();
        }
        found
    }
}

/// Finds a complete head at the start of `buf` and parses it.
///
/// Returns `Ok(None)` while more bytes are needed, `Ok(Some((head, consumed)))` once the
/// head is complete (`consumed` includes the blank line), and an error as soon as the
/// bytes seen can no longer form an acceptable head.
pub fn parse_request_head(
    buf: &[u8],
    limits: HeadLimits,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    parse_request_head_resumed(buf, limits, &mut HeadScan::new())
}

/// As [`parse_request_head`], resuming the search for the end of the head where `scan`
/// stopped on the previous call with a shorter prefix of the same buffer.
pub fn parse_request_head_resumed(
    buf: &[u8],
    limits: HeadLimits,
    scan: &mut HeadScan,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    // RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before the
    // request line.
    let mut start = 0;
    while buf[start..].starts_with(b"\r\n") && start < 8 {
        start += 2;
    }
    let checked = scan.scanned.max(start);
    let Some(end) = scan.find_end(buf, start) else {
        if buf.len() > limits.max_bytes {
            return Err(HeadError::TooLarge(limits.max_bytes));
        }
        check_partial(&buf[start..], checked - start)?;
        return Ok(None);
    };
    let total = end + 4;
    if total > limits.max_bytes {
        return Err(HeadError::TooLarge(limits.max_bytes));
    }
    let lines = split_lines(&buf[start..end + 2], "request")?;
    let (request_line, field_lines) = lines.split_first().ok_or_else(|| bad("empty request"))?;
    if field_lines.len() > limits.max_headers {
        return Err(HeadError::TooManyHeaders(limits.max_headers));
    }
    let (method, target_text, minor_version) = parse_request_line(request_line)?;
    let headers = parse_fields(field_lines)?;
    let framing = match declared_framing(&headers, minor_version, "request")? {
        Declared::Nothing | Declared::Length(0) => BodyFraming::None,
        Declared::Length(n) => BodyFraming::Length(n),
        Declared::Chunked => BodyFraming::Chunked,
    };

    let host_headers: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map(|(_, v)| trim_ows(v))
        .collect();
    if host_headers.len() > 1 {
        return Err(bad("more than one Host header"));
    }
    if minor_version == 1 && host_headers.is_empty() {
        return Err(bad("HTTP/1.1 request without Host header"));
    }

    let target = parse_target(&method, target_text)?;
    if method == "CONNECT" && framing != BodyFraming::None {
        return Err(bad("CONNECT with a body"));
    }
    let mut parsed = RequestHead {
        method,
        target,
        minor_version,
        headers,
        framing,
        close: false,
    };
    parsed.close = wants_close(&parsed.connection_tokens(), minor_version);
    Ok(Some((parsed, total)))
}

/// Whether a message of this version with these `Connection` tokens ends its connection.
pub(crate) fn wants_close(tokens: &[String], minor_version: u8) -> bool {
    if minor_version == 0 {
        !tokens.iter().any(|t| t == "keep-alive")
    } else {
        tokens.iter().any(|t| t == "close")
    }
}

/// Splits a head (up to and including the CRLF of its last field line) into lines,
/// refusing bare LF. `what` names the message in errors.
pub(crate) fn split_lines<'a>(head: &'a [u8], what: &str) -> Result<Vec<&'a [u8]>, HeadError> {
    let mut lines = Vec::new();
    let mut pos = 0;
    while pos < head.len() {
        let rel = head[pos..]
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| bad("header line without CRLF"))?;
        let line_end = pos + rel;
        if line_end == pos || head[line_end - 1] != b'\r' {
            return Err(bad(format!("bare LF in {what} head")));
        }
        lines.push(&head[pos..line_end - 1]);
        pos = line_end + 1;
    }
    Ok(lines)
}

/// Parses field lines strictly: no obs-fold, token names with no space before `:`, no
/// control characters in values. Values keep their surrounding whitespace.
pub(crate) fn parse_fields(field_lines: &[&[u8]]) -> Result<Vec<(String, Vec<u8>)>, HeadError> {
    let mut headers = Vec::with_capacity(field_lines.len());
    for line in field_lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(bad("obsolete line folding in header"));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad("header line without `:`"))?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(bad(format!(
                "bad header name `{}` (no spaces before `:`)",
                clip(&String::from_utf8_lossy(name))
            )));
        }
        let value = &line[colon + 1..];
        if value.iter().any(|b| {
            *b == 0 || *b == b'\r' || *b == b'\n' || (*b < 0x20 && *b != b'\t') || *b == 0x7f
        }) {
            return Err(bad(format!(
                "control character in header `{}`",
                String::from_utf8_lossy(name)
            )));
        }
        let name = String::from_utf8_lossy(name).into_owned();
        headers.push((name, value.to_vec()));
    }
    Ok(headers)
}

/// What a message's `Content-Length` and `Transfer-Encoding` fields declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Declared {
    /// Neither field.
    Nothing,
    /// `Content-Length` (one value, possibly repeated identically).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Reads the framing fields (RFC 9112 section 6), refusing every ambiguous form: both
/// fields, two different lengths, a length that is not plain digits, any coding but a
/// lone `chunked`, more than one `Transfer-Encoding`, chunked in HTTP/1.0. `what` names
/// the message in errors.
pub(crate) fn declared_framing(
    headers: &[(String, Vec<u8>)],
    minor_version: u8,
    what: &str,
) -> Result<Declared, HeadError> {
    let mut te_count = 0;
    let mut te_value: Option<&[u8]> = None;
    let mut cl_value: Option<u64> = None;
    for (name, raw) in headers {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            te_count += 1;
            te_value = Some(raw);
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = trim_ows(raw);
            let ok = !v.is_empty() && v.len() <= 18 && v.iter().all(u8::is_ascii_digit);
            if !ok {
                return Err(bad(format!(
                    "bad Content-Length `{}`",
                    clip(&String::from_utf8_lossy(raw))
                )));
            }
            let n: u64 = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad Content-Length"))?;
            if cl_value.is_some_and(|prev| prev != n) {
                return Err(bad("two different Content-Length values"));
            }
            cl_value = Some(n);
        }
    }
    match (te_count, te_value, cl_value) {
        (0, _, None) => Ok(Declared::Nothing),
        (0, _, Some(n)) => Ok(Declared::Length(n)),
        (1, Some(v), None) => {
            // Exactly `chunked`: no other coding, no list, no trailing whitespace.
            let lead = v.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
            if !v[lead..].eq_ignore_ascii_case(b"chunked") {
                return Err(bad(format!(
                    "unsupported Transfer-Encoding `{}` (only `chunked`)",
                    clip(&String::from_utf8_lossy(v))
                )));
            }
            if minor_version == 0 {
                return Err(bad(format!("Transfer-Encoding in an HTTP/1.0 {what}")));
            }
            Ok(Declared::Chunked)
        }
        (1, _, Some(_)) => Err(bad("both Content-Length and Transfer-Encoding")),
        _ => Err(bad("more than one Transfer-Encoding header")),
    }
}

/// Early refusal of bytes that can never become a valid head (saves waiting for the
/// header deadline on garbage such as a TLS ClientHello sent to the plain port). Bytes
/// before `checked` were checked by an earlier call.
fn check_partial(buf: &[u8], checked: usize) -> Result<(), HeadError> {
    if buf == b"\r" {
        // The first half of an empty line before the request line.
        return Ok(());
    }
    if let Some(first) = buf.first()
        && !is_tchar(*first)
    {
        return Err(bad("not an HTTP request"));
    }
    if buf[checked.min(buf.len())..].contains(&0) {
        return Err(bad("NUL byte in request head"));
    }
    Ok(())
}

/// `v` without leading and trailing spaces and tabs (RFC 9110 OWS).
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
    let end = v.len()
        - v.iter()
            .rev()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
    if start >= end { &[] } else { &v[start..end] }
}

fn parse_request_line(line: &[u8]) -> Result<(String, &str, u8), HeadError> {
    let text = std::str::from_utf8(line).map_err(|_| bad("request line is not UTF-8"))?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("bad method"));
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(bad(format!("unsupported version `{}`", clip(version)))),
    };
    if target.is_empty() || !target.bytes().all(|b| b > 0x20 && b != 0x7f) {
        return Err(bad("bad request target"));
    }
    Ok((method.to_owned(), target, minor))
}

fn split_host_port(authority: &str, default_port: Option<u16>) -> Result<(Host, u16), HeadError> {
    if authority.contains('@') {
        return Err(bad("credentials in the request target are not accepted"));
    }
    let (host_text, port_text) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(i) => {
                let rest = &authority[i + 1..];
                let port = match rest.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if rest.is_empty() => None,
                    None => return Err(bad(format!("bad authority `{}`", clip(authority)))),
                };
                (&authority[..=i], port)
            }
            None => return Err(bad(format!("bad authority `{}`", clip(authority)))),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port_text {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(bad(format!("bad port `{}`", clip(p)))),
        },
        None => default_port.ok_or_else(|| bad("CONNECT target needs a port"))?,
    };
    Ok((Host::parse(host_text)?, port))
}

fn parse_target(method: &str, text: &str) -> Result<Target, HeadError> {
    if method == "CONNECT" {
        let (host, port) = split_host_port(text, None)?;
        return Ok(Target::Connect { host, port });
    }
    if text.starts_with('/') || text == "*" {
        return Err(bad(
            "origin-form request on the proxy port: send an absolute URI (http://host/path)",
        ));
    }
    let lower_scheme = text.get(..7).map(str::to_ascii_lowercase);
    if lower_scheme.as_deref() != Some("http://") {
        if text
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            return Err(bad(
                "https URIs go through CONNECT (use the proxy for https with CONNECT)",
            ));
        }
        return Err(bad(format!("unsupported request target `{}`", clip(text))));
    }
    let rest = &text[7..];
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    if path.contains('#') {
        return Err(bad("fragment in request target"));
    }
    let (host, port) = split_host_port(authority, Some(80))?;
    Ok(Target::Absolute { host, port, path })
}

// === chunked body decoding ===

/// Incremental decoder of a chunked request body (RFC 9112 section 7.1), strict: sizes
/// in at most 15 hex digits, CRLF everywhere, trailers read and dropped.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataCr,
    DataLf,
    Trailer,
    Done,
}

/// One step of chunked decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkEvent {
    /// Body bytes `input[range]`.
    Data(std::ops::Range<usize>),
    /// Consumed framing bytes; nothing to pass on.
    Framing,
    /// The body is complete.
    End,
}

/// Longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }

    /// True once the final chunk and trailers are read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`; returns how many bytes were consumed and what they were.
    pub fn step(&mut self, input: &[u8]) -> Result<(usize, ChunkEvent), HeadError> {
        match self.state {
            ChunkState::Done => Ok((0, ChunkEvent::End)),
            ChunkState::Data(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(left)
                };
                Ok((n, ChunkEvent::Data(0..n)))
            }
            ChunkState::DataCr | ChunkState::DataLf => {
                let mut used = 0;
                for b in input {
                    used += 1;
                    match (self.state, b) {
                        (ChunkState::DataCr, b'\r') => self.state = ChunkState::DataLf,
                        (ChunkState::DataLf, b'\n') => {
                            self.state = ChunkState::Size;
                            return Ok((used, ChunkEvent::Framing));
                        }
                        _ => return Err(bad("chunk data not followed by CRLF")),
                    }
                }
                Ok((used, ChunkEvent::Framing))
            }
            ChunkState::Size | ChunkState::Trailer => {
                let Some(nl) = input.iter().position(|b| *b == b'\n') else {
                    self.line.extend_from_slice(input);
                    if self.line.len() > MAX_CHUNK_LINE {
                        return Err(bad("chunk line too long"));
                    }
                    return Ok((input.len(), ChunkEvent::Framing));
                };
                self.line.extend_from_slice(&input[..nl]);
                if self.line.len() > MAX_CHUNK_LINE {
                    return Err(bad("chunk line too long"));
                }
                if self.line.pop() != Some(b'\r') {
                    return Err(bad("bare LF in chunked framing"));
                }
                let line = std::mem::take(&mut self.line);
                let used = nl + 1;
                if self.state == ChunkState::Trailer {
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                        return Ok((used, ChunkEvent::End));
                    }
                    if line.iter().any(|b| *b < 0x20 && *b != b'\t') || !line.contains(&b':') {
                        return Err(bad("malformed trailer field"));
                    }
                    return Ok((used, ChunkEvent::Framing));
                }
                let size_end = line.iter().position(|b| *b == b';').unwrap_or(line.len());
                let size_text = &line[..size_end];
                if size_text.is_empty()
                    || size_text.len() > 15
                    || !size_text.iter().all(u8::is_ascii_hexdigit)
                {
                    return Err(bad(format!(
                        "bad chunk size `{}`",
                        clip(&String::from_utf8_lossy(size_text))
                    )));
                }
                if line[size_end..].iter().any(|b| *b < 0x20 && *b != b'\t') {
                    return Err(bad("control character in chunk extension"));
                }
                let size = u64::from_str_radix(std::str::from_utf8(size_text).unwrap_or("x"), 16)
                    .map_err(|_| bad("bad chunk size"))?;
                self.state = if size == 0 {
                    ChunkState::Trailer
                } else {
                    ChunkState::Data(size)
                };
                Ok((used, ChunkEvent::Framing))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// The default limits, for parser tests.
    pub(crate) const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 64 * 1024,
        max_headers: 100,
    };

    fn parse(text: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request_head(text.as_bytes(), LIMITS)
    }

    fn refused(text: &str) -> HeadError {
        match parse(text) {
            Err(e) => e,
            Ok(v) => panic!("accepted {text:?}: {v:?}"),
        }
    }

    #[test]
    fn absolute_form_get_parses() {
        let (head, used) =
            parse("GET http://Example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\nrest")
                .unwrap()
                .unwrap();
        assert_eq!(
            used,
            "GET http://Example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com\r\n\r\n".len()
        );
        assert_eq!(
            head.target,
            Target::Absolute {
                host: Host::Name("example.com".into()),
                port: 8080,
                path: "/a?b=1".into()
            }
        );
        assert_eq!(head.framing, BodyFraming::None);
        assert!(!head.close);
    }

    #[test]
    fn a_trickled_head_resumes_its_scan_where_it_stopped() {
        // One byte per read: each call looks at the new bytes only (linear, not
        // quadratic, in the head's length).
        let text = b"\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\nX-Long: aaaaaaaaaaaaaaaa\r\n\r\n";
        let mut scan = HeadScan::new();
        for n in 1..text.len() {
            assert!(
                parse_request_head_resumed(&text[..n], LIMITS, &mut scan)
                    .unwrap()
                    .is_none(),
                "{n}"
            );
            assert_eq!(scan.scanned, n, "the next call starts at byte {n}");
        }
        let (head, used) = parse_request_head_resumed(text, LIMITS, &mut scan)
            .unwrap()
            .unwrap();
        assert_eq!((head.method.as_str(), used), ("GET", text.len()));
        // A NUL arriving late is still seen.
        let mut scan = HeadScan::new();
        assert!(
            parse_request_head_resumed(b"GET http://a/", LIMITS, &mut scan)
                .unwrap()
                .is_none()
        );
        assert!(parse_request_head_resumed(b"GET http://a/\0", LIMITS, &mut scan).is_err());
    }

    #[test]
    fn connect_parses_and_needs_a_port() {
        let (head, _) = parse("CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.target.port(), 443);
        assert_eq!(head.target.host(), &Host::Ip("::1".parse().unwrap()));
        assert!(matches!(
            refused("CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n"),
            HeadError::Bad(_)
        ));
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        assert!(
            parse("GET http://a/ HTTP/1.1\r\nHost: a\r\n")
                .unwrap()
                .is_none()
        );
        assert!(parse("").unwrap().is_none());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases = [
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\t\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
            "GET http://a/ HTTP/1.1\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET http://user:pw@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for case in cases {
            let err = refused(case);
            assert_eq!(err.status(), 400, "{case:?} -> {err}");
        }
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = refused("POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n");
        assert!(err.to_string().contains("Content-Length"), "{err}");
        let err = refused("GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(err.to_string().contains("origin-form"), "{err}");
    }

    #[test]
    fn too_many_or_too_large_headers_get_431() {
        let mut many = String::from("GET http://a/ HTTP/1.1\r\nHost: a\r\n");
        for i in 0..100 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(refused(&many).status(), 431);
        let big = format!(
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: {}\r\n",
            "v".repeat(70 * 1024)
        );
        assert_eq!(
            refused(&big).status(),
            431,
            "even before the head is complete"
        );
    }

    #[test]
    fn legacy_ipv4_forms_are_addresses() {
        for (text, ip) in [
            ("127.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("10.1.1", "10.1.0.1"),
            ("169.254.169.254", "169.254.169.254"),
        ] {
            assert_eq!(
                Host::parse(text).unwrap(),
                Host::Ip(ip.parse().unwrap()),
                "{text}"
            );
        }
        assert!(Host::parse("1.2.3.4.5").is_err());
        assert!(
            Host::parse("256.1.1.1").is_err(),
            "numeric last label refused"
        );
        assert!(Host::parse("a..b").is_err());
        assert_eq!(
            Host::parse("Example.COM.").unwrap(),
            Host::Name("example.com".into())
        );
    }

    #[test]
    fn framing_and_keep_alive() {
        let (h, _) = parse("POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Chunked);
        assert!(h.close);
        let (h, _) = parse("POST http://a/ HTTP/1.0\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, BodyFraming::Length(3));
        assert!(h.close, "HTTP/1.0 closes unless keep-alive");
    }

    fn decode_all(input: &[u8]) -> Result<Vec<u8>, HeadError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut pos = 0;
        // Feed one byte at a time: the decoder must cope with any segmentation.
        while !d.is_done() {
            if pos >= input.len() {
                return Err(HeadError::Bad("truncated".into()));
            }
            let end = pos + 1;
            let mut slice = &input[pos..end];
            while !slice.is_empty() {
                let (used, ev) = d.step(slice)?;
                if let ChunkEvent::Data(r) = ev {
                    out.extend_from_slice(&slice[r]);
                }
                slice = &slice[used..];
                if d.is_done() {
                    break;
                }
            }
            pos = end;
        }
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        assert_eq!(
            decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n").unwrap(),
            b"hello world"
        );
        for bad_body in [
            &b"ffffffffffffffffff\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"-1\r\n",
            b"\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                decode_all(bad_body).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad_body)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_request_head(&bytes, LIMITS);
            let mut d = ChunkedDecoder::new();
            let mut slice = &bytes[..];
            for _ in 0..1000 {
                match d.step(slice) {
                    Ok((used, _)) if used > 0 => slice = &slice[used..],
                    _ => break,
                }
            }
        }

        #[test]
        fn valid_heads_round_trip(host in "[a-z][a-z0-9]{0,10}(\\.[a-z]{2,5}){1,2}", port in 1u16.., path in "/[a-zA-Z0-9/_.-]{0,30}") {
            let text = format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let (head, used) = parse(&text).unwrap().unwrap();
            proptest::prop_assert_eq!(used, text.len());
            proptest::prop_assert_eq!(head.target, Target::Absolute { host: Host::Name(host.clone()), port, path: path.clone() });
        }
    }
}
