//! The target side of a plain-HTTP request, driven from the client connection's own
//! task: a connection through an exit (kept alive in a small per-client-connection
//! cache), the request head written by our own writer, the response head read by the
//! strict parser of `response_head.rs`, and the response body decoded as it arrives.
//!
//! No pooled client, no extra tasks: one task per client connection does the whole
//! exchange, so a request costs no task hops and no cross-task wake-ups.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ipsx_rotation::ExitId;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::time::Instant;

use crate::exit::ExitStream;
use crate::http1::{self, BodyFraming, ChunkEvent, ChunkedDecoder, HeadLimits, HeadScan, Host};
use crate::response_head::{ResponseBody, ResponseHead, parse_response_head};
use crate::targeting::HEADER_PREFIX;

/// Most idle upstream connections one client connection keeps.
const MAX_IDLE_UPSTREAMS: usize = 4;
/// Most interim (1xx) responses skipped before a final one.
const MAX_INTERIM: usize = 8;
/// Bytes read from the target at a time.
const READ_CHUNK: usize = 16 * 1024;

/// One connection to a target through an exit, with the bytes read but not used yet.
pub(crate) struct Upstream {
    exit: ExitId,
    host: Host,
    port: u16,
    pub(crate) stream: ExitStream,
    pub(crate) buf: BytesMut,
    idle_since: Instant,
}

impl Upstream {
    /// A new connection to `host:port` through `exit`.
    pub(crate) fn new(exit: &ExitId, host: &Host, port: u16, stream: ExitStream) -> Self {
        Self {
            exit: exit.clone(),
            host: host.clone(),
            port,
            stream,
            buf: BytesMut::new(),
            idle_since: Instant::now(),
        }
    }

    /// Reads more bytes from the target; `Ok(0)` when it closed.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }

    /// False when the target closed the connection or sent bytes nobody asked for
    /// (checked without waiting).
    fn still_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let mut read = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }
}

/// A client connection's idle upstream connections, keyed by exit and target.
#[derive(Default)]
pub(crate) struct UpstreamCache {
    idle: Vec<Upstream>,
}

impl UpstreamCache {
    /// An idle connection to `host:port` through `exit` that is still open and was idle
    /// less than `max_idle`, if there is one.
    pub(crate) fn take(
        &mut self,
        exit: &ExitId,
        host: &Host,
        port: u16,
        max_idle: Duration,
    ) -> Option<Upstream> {
        let now = Instant::now();
        self.idle
            .retain(|u| now.saturating_duration_since(u.idle_since) < max_idle);
        let i = self
            .idle
            .iter()
            .position(|u| u.exit == *exit && u.port == port && u.host == *host)?;
        let mut up = self.idle.swap_remove(i);
        up.still_open().then_some(up)
    }

    /// Keeps `up` for the next request (dropping the oldest beyond the limit).
    pub(crate) fn put(&mut self, mut up: Upstream) {
        up.idle_since = Instant::now();
        if self.idle.len() >= MAX_IDLE_UPSTREAMS {
            self.idle.remove(0);
        }
        self.idle.push(up);
    }
}

/// The request head sent to the target: origin-form, HTTP/1.1, our own `Host`, no
/// hop-by-hop fields (nor any the client listed in `Connection`), no targeting fields,
/// no `Expect` (the gateway answered it), and framing fields the gateway writes itself.
pub(crate) fn encode_request_head(
    head: &http1::RequestHead,
    host: &Host,
    port: u16,
    path: &str,
) -> Vec<u8> {
    let listed = head.connection_tokens();
    let mut out = Vec::with_capacity(
        128 + path.len()
            + head
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>(),
    );
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.to_header().as_bytes());
    if port != 80 {
        out.push(b':');
        out.extend_from_slice(port.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let prefix = HEADER_PREFIX.as_bytes();
    let mut had_length = false;
    for (name, value) in &head.headers {
        let n = name.as_bytes();
        if n.eq_ignore_ascii_case(b"content-length") {
            had_length = true;
            continue;
        }
        if http1::HOP_BY_HOP
            .iter()
            .any(|h| n.eq_ignore_ascii_case(h.as_bytes()))
            || listed.iter().any(|l| n.eq_ignore_ascii_case(l.as_bytes()))
            || n.get(..prefix.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
            || n.eq_ignore_ascii_case(b"host")
            || n.eq_ignore_ascii_case(b"expect")
        {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(http1::trim_ows(value));
        out.extend_from_slice(b"\r\n");
    }
    match head.framing {
        BodyFraming::Length(n) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::None if had_length => out.extend_from_slice(b"content-length: 0\r\n"),
        BodyFraming::None => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why no response head came back.
#[derive(Debug)]
pub(crate) enum HeadFailure {
    /// The target closed (or reset) before sending a single byte: on a reused
    /// connection, it had closed it meanwhile.
    ClosedEarly(String),
    /// The target sent something that is not an acceptable response head, or stopped
    /// in the middle of one.
    Bad(String),
}

impl std::fmt::Display for HeadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClosedEarly(m) | Self::Bad(m) => f.write_str(m),
        }
    }
}

/// Reads the final response head from `r` into `buf`, skipping interim (1xx) ones;
/// the bytes after the head stay in `buf`.
pub(crate) async fn read_response_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<ResponseHead, HeadFailure> {
    let mut scan = HeadScan::new();
    let mut received = !buf.is_empty();
    let mut interim = 0;
    loop {
        if !buf.is_empty() {
            match parse_response_head(buf, limits, &mut scan) {
                Ok(Some((head, used))) => {
                    buf.advance(used);
                    if !(100..200).contains(&head.status) {
                        return Ok(head);
                    }
                    interim += 1;
                    if head.status == 101 || interim > MAX_INTERIM {
                        return Err(HeadFailure::Bad(format!(
                            "unexpected interim response {}",
                            head.status
                        )));
                    }
                    scan = HeadScan::new();
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(HeadFailure::Bad(format!("bad response head: {e}"))),
            }
        }
        buf.reserve(READ_CHUNK);
        match r.read_buf(buf).await {
            Ok(0) if !received => {
                return Err(HeadFailure::ClosedEarly(
                    "target closed the connection before a response".into(),
                ));
            }
            Err(e) if !received => {
                return Err(HeadFailure::ClosedEarly(format!(
                    "target failed before a response: {e}"
                )));
            }
            Ok(0) | Err(_) => {
                return Err(HeadFailure::Bad(
                    "target closed the connection inside a response head".into(),
                ));
            }
            Ok(_) => received = true,
        }
    }
}

/// Decodes one response body from an upstream connection, never reading past its end:
/// bytes after it stay in the connection's buffer (and make the connection unfit for
/// reuse), never reaching the client.
#[derive(Debug)]
pub(crate) struct BodyReader {
    state: BodyState,
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

impl BodyReader {
    /// A reader for a body delimited as `body`.
    pub(crate) fn new(body: ResponseBody) -> Self {
        let state = match body {
            ResponseBody::None | ResponseBody::Length(0) => BodyState::Done,
            ResponseBody::Length(n) => BodyState::Length(n),
            ResponseBody::Chunked => BodyState::Chunked(ChunkedDecoder::new()),
            ResponseBody::UntilClose => BodyState::UntilClose,
        };
        Self { state }
    }

    /// True once the whole body was read.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    /// The next piece of the body among the bytes already read from the target, `None`
    /// when it is complete or more bytes are needed; an error (naming what is wrong)
    /// when the target broke the chunked framing. Sans-IO: never reads.
    pub(crate) fn take_buffered(&mut self, up: &mut Upstream) -> Result<Option<Bytes>, String> {
        // Each turn consumes at least one buffered byte or returns.
        while !up.buf.is_empty() {
            match &mut self.state {
                BodyState::Done => return Ok(None),
                BodyState::UntilClose => return Ok(Some(up.buf.split().freeze())),
                BodyState::Length(left) => {
                    let take = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(up.buf.len());
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = BodyState::Done;
                    }
                    return Ok(Some(up.buf.split_to(take).freeze()));
                }
                BodyState::Chunked(decoder) => {
                    let (used, event) = decoder
                        .step(&up.buf)
                        .map_err(|e| format!("bad chunked body from the target: {e}"))?;
                    match event {
                        ChunkEvent::Data(range) => {
                            return Ok(Some(up.buf.split_to(used).freeze().slice(range)));
                        }
                        ChunkEvent::Framing => up.buf.advance(used),
                        ChunkEvent::End => {
                            up.buf.advance(used);
                            self.state = BodyState::Done;
                            return Ok(None);
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// The target closed its side: the end of a body that runs until close, an error
    /// (a truncated body) otherwise.
    pub(crate) fn on_close(&mut self) -> Result<(), String> {
        match self.state {
            BodyState::Done => Ok(()),
            BodyState::UntilClose => {
                self.state = BodyState::Done;
                Ok(())
            }
            _ => Err("target closed the connection before the end of the body".into()),
        }
    }
}

/// Reads more bytes from the target into its buffer; `Ok(0)` when it closed.
pub(crate) async fn read_more(up: &mut Upstream) -> Result<usize, String> {
    up.fill()
        .await
        .map_err(|e| format!("target failed mid-body: {e}"))
}
