//! QUALITY.md cases 1-15 against a running gateway: every hostile or malformed input is
//! refused with a clear status (or SOCKS reply), and nothing reaches the target.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn auth_header() -> String {
    use std::io::Write;
    let mut raw = Vec::new();
    write!(raw, "acct:{TOKEN}").unwrap();
    format!("Proxy-Authorization: Basic {}\r\n", base64(&raw))
}

async fn refused(gw: &TestGateway, target: &CountingTarget, request: String, want: &str) {
    let answer = raw_exchange(gw.addr, request.as_bytes()).await;
    assert!(
        status_line(&answer).starts_with(want),
        "want {want} for {request:?}, got {:?}",
        status_line(&answer)
    );
    assert!(target.untouched(), "target got bytes for {request:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_malformed_heads_are_refused_before_any_dial() {
    let target = CountingTarget::start(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let gw = TestGateway::start(&config_text("")).await;
    let t = target.addr;
    let a = auth_header();
    let cases: Vec<(String, &str)> = vec![
        // 1. CL + TE
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        // 2. TE variants
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
            ),
            "HTTP/1.1 400",
        ),
        // 3. bad Content-Length
        (
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
            ),
            "HTTP/1.1 400",
        ),
        (
            format!("POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Content-Length: +5\r\n\r\nhello"),
            "HTTP/1.1 400",
        ),
        (
            format!("POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 0x5\r\n\r\nhello"),
            "HTTP/1.1 400",
        ),
        (
            format!("POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 5, 6\r\n\r\nhello"),
            "HTTP/1.1 400",
        ),
        // 4. bare LF, obs-fold, NUL, CR in a value
        (
            format!("GET http://{t}/ HTTP/1.1\nHost: x\r\n{a}\r\n"),
            "HTTP/1.1 400",
        ),
        (
            format!("GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}X-A: 1\r\n folded\r\n\r\n"),
            "HTTP/1.1 400",
        ),
        (
            format!("GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}X-A: a\0b\r\n\r\n"),
            "HTTP/1.1 400",
        ),
        (
            format!("GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}X-A: a\rb\r\n\r\n"),
            "HTTP/1.1 400",
        ),
        // 8. origin-form on the proxy port
        (
            format!("GET / HTTP/1.1\r\nHost: {t}\r\n{a}\r\n"),
            "HTTP/1.1 400",
        ),
    ];
    for (request, want) in cases {
        refused(&gw, &target, request, want).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunked_bodies_never_pass_as_complete() {
    // 5. Bad chunk size / garbage after the last chunk: 400 or reset; the target must
    // never see a complete request built from a broken body.
    let target = CountingTarget::start(b"").await;
    let gw = TestGateway::start(&config_text("")).await;
    let t = target.addr;
    let a = auth_header();
    for body in ["ffffffffffffffffff\r\n", "5\r\nhelloXX0\r\n\r\n", "zz\r\n"] {
        let request = format!(
            "POST http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}Transfer-Encoding: chunked\r\n\r\n{body}"
        );
        let answer = raw_exchange(gw.addr, request.as_bytes()).await;
        assert!(
            answer.is_empty() || status_line(&answer).starts_with("HTTP/1.1 400"),
            "{answer:?}"
        );
        // The head may have reached the target (streaming), but never a final chunk:
        // the upstream request is aborted, not completed.
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_memory_stays_bounded() {
    let target = CountingTarget::start(b"").await;
    let gw = TestGateway::start(&config_text("")).await;
    let t = target.addr;
    let a = auth_header();
    // 6a. 101 header fields
    let mut many = format!("GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}");
    for i in 0..100 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    refused(&gw, &target, many, "HTTP/1.1 431").await;
    // 6b. a 70 KiB header arriving in two reads
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let first = format!(
        "GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{a}X-Big: {}",
        "a".repeat(35 * 1024)
    );
    s.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = s.write_all("b".repeat(35 * 1024).as_bytes()).await;
    let _ = s.write_all(b"\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(target.untouched());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_deadline() {
    // 7. Many trickling connections are closed at the deadline while a real request works.
    let echo = Echo::start().await;
    let mut cfg = config_text("");
    cfg = cfg.replace(
        "connect_timeout = \"2s\"",
        "connect_timeout = \"2s\"\nheader_timeout = \"1s\"",
    );
    let gw = TestGateway::start(&cfg).await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET http://").await.unwrap();
        slow.push(s);
    }
    let out = curl(&["-x", &gw.proxy("acct"), &echo.url()]).await;
    assert_eq!(
        echo_ips(&out.stdout).len(),
        1,
        "a real request still succeeds"
    );
    for s in &mut slow {
        // Trickle one more byte: the gateway must close by the deadline regardless.
        let _ = s.write_all(b"x").await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "slow connection not closed");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 408"),
            "a trickling head gets 408 at the deadline: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uri_host_decides_routing_and_hop_by_hop_headers_never_leak() {
    // 9 + 10.
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let a = auth_header();
    let request = format!(
        "GET http://{}/ip HTTP/1.1\r\nHost: evil.example\r\n{a}Proxy-Connection: keep-alive\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Ipsx-Country: de\r\n\r\n",
        echo.addr
    );
    let answer = raw_exchange(gw.addr, request.as_bytes()).await;
    assert!(status_line(&answer).starts_with("HTTP/1.1 200"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    for leaked in [
        "proxy-authorization",
        "proxy-connection",
        "x-secret",
        "keep-alive\"",
        "\"te\"",
        "x-ipsx",
        TOKEN,
    ] {
        assert!(
            !lower.contains(leaked),
            "{leaked} reached the target: {answer}"
        );
    }
    assert!(
        lower.contains(&format!("\"host\",\"{}\"", echo.addr)),
        "Host rewritten to the URI host: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_credentials_get_407_and_no_dial() {
    // 11.
    let target = CountingTarget::start(b"").await;
    let gw = TestGateway::start(&config_text("")).await;
    let t = target.addr;
    for auth in [
        "",
        "Proxy-Authorization: Basic bm9wZTpub3Bl\r\n",
        "Proxy-Authorization: Bearer x\r\n",
        "Proxy-Authorization: Basic !!!\r\n",
    ] {
        let answer = raw_exchange(
            gw.addr,
            format!("GET http://{t}/ HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(status_line(&answer).starts_with("HTTP/1.1 407"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("proxy-authenticate: basic"),
            "{answer}"
        );
        let answer = raw_exchange(
            gw.addr,
            format!("CONNECT {t} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes(),
        )
        .await;
        assert!(status_line(&answer).starts_with("HTTP/1.1 407"), "{answer}");
    }
    // SOCKS5: RFC 1929 failure status, then close.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 2]);
    s.write_all(&[
        1, 4, b'a', b'c', b'c', b't', 5, b'w', b'r', b'o', b'n', b'g',
    ])
    .await
    .unwrap();
    let mut st = [0u8; 2];
    s.read_exact(&mut st).await.unwrap();
    assert_eq!(st[0], 1);
    assert_ne!(st[1], 0);
    // No-auth offered while tokens are configured: no acceptable method.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0xff]);
    assert!(target.untouched());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_and_special_destinations_are_refused_without_a_syn() {
    // 12. Without the allow-list, every loopback/private/special form is refused.
    let target = CountingTarget::start(b"").await;
    let strict =
        config_text("").replace("allow_destinations = [\"127.0.0.0/8\", \"::1/128\"]\n", "");
    let gw = TestGateway::start(&strict).await;
    let port = target.addr.port();
    let a = auth_header();
    let hosts = [
        "127.0.0.1".to_owned(),
        "127.1".into(),
        "2130706433".into(),
        "0x7f.0.0.1".into(),
        "[::1]".into(),
        "[::ffff:127.0.0.1]".into(),
        "169.254.169.254".into(),
        "10.0.0.1".into(),
        "172.16.0.1".into(),
        "192.168.1.1".into(),
        "100.64.0.1".into(),
        "0.0.0.0".into(),
        "[fc00::1]".into(),
        "[fe80::1]".into(),
        "localhost".into(),
    ];
    for host in &hosts {
        let answer = raw_exchange(
            gw.addr,
            format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\n{a}\r\n").as_bytes(),
        )
        .await;
        assert!(
            status_line(&answer).starts_with("HTTP/1.1 403"),
            "{host}: {answer}"
        );
        let answer = raw_exchange(
            gw.addr,
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: x\r\n{a}\r\n").as_bytes(),
        )
        .await;
        assert!(
            status_line(&answer).starts_with("HTTP/1.1 403"),
            "CONNECT {host}: {answer}"
        );
    }
    // SOCKS5 with an IPv4 literal and with a name resolving to loopback: reply 0x02.
    for req in [vec![5u8, 1, 0, 1, 127, 0, 0, 1], {
        let mut v = vec![5u8, 1, 0, 3, 9];
        v.extend_from_slice(b"localhost");
        v
    }] {
        let mut full = req.clone();
        full.extend_from_slice(&port.to_be_bytes());
        assert_eq!(socks_connect(gw.addr, &full).await, 0x02);
    }
    assert!(target.untouched(), "a refused destination got a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_outside_the_exit_protocols_are_refused() {
    // 13. Exits that carry only http/https refuse other ports.
    let target = CountingTarget::start(b"").await;
    let cfg = config_text("").replace(
        "country = \"de\"\n",
        "country = \"de\"\nprotocols = [\"http\", \"https\"]\n",
    );
    let gw = TestGateway::start(&cfg).await;
    let a = auth_header();
    let answer = raw_exchange(
        gw.addr,
        format!(
            "CONNECT {} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {}\r\n\r\n",
            target.addr,
            base64(format!("acct-country-de:{TOKEN}").as_bytes())
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&answer).starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains(&format!("port {}", target.addr.port())),
        "{answer}"
    );
    let _ = a;
    assert!(target.untouched());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_reset_is_never_a_truncated_200() {
    // 14. Reset before any header -> 502; reset mid-body -> the client sees a reset or a
    // short body against its Content-Length, never a complete-looking response.
    let gw = TestGateway::start(&config_text("")).await;
    let a = auth_header();
    let before = reset_target(b"").await;
    let answer = raw_exchange(
        gw.addr,
        format!("GET http://{before}/ HTTP/1.1\r\nHost: x\r\n{a}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&answer).starts_with("HTTP/1.1 502"), "{answer}");
    let mid = reset_target(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly-a-little").await;
    let answer = raw_exchange(
        gw.addr,
        format!("GET http://{mid}/ HTTP/1.1\r\nHost: x\r\n{a}\r\n").as_bytes(),
    )
    .await;
    if status_line(&answer).starts_with("HTTP/1.1 200") {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(body.len() < 1000, "truncated body passed on as complete");
    } else {
        assert!(
            answer.is_empty() || status_line(&answer).starts_with("HTTP/1.1 502"),
            "{answer}"
        );
    }
}

/// A target that reads the request, writes `prefix`, then resets the connection.
async fn reset_target(prefix: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(prefix).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    addr
}

async fn socks_connect(gw: std::net::SocketAddr, request: &[u8]) -> u8 {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let mut auth = vec![1u8, 4];
    auth.extend_from_slice(b"acct");
    auth.push(TOKEN.len() as u8);
    auth.extend_from_slice(TOKEN.as_bytes());
    s.write_all(&auth).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [1, 0], "auth ok");
    s.write_all(request).await.unwrap();
    let mut reply = [0u8; 2];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply)).await {
        Ok(Ok(_)) => reply[1],
        _ => 0xee,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_socks5_inputs() {
    // 15.
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    // NMETHODS=0, SOCKS4, truncated greeting: refused or closed, never a panic.
    for bytes in [&[5u8, 0][..], &[4, 1, 0, 80, 127, 0, 0, 1, 0], &[5]] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(
            out.is_empty() || out == [5, 0xff] || out == [0, 0x5b, 0, 0, 0, 0, 0, 0],
            "{bytes:?} -> {out:?}"
        );
    }
    let port = echo.addr.port().to_be_bytes();
    // ATYP 0x03 with length 0, unknown ATYP, BIND.
    assert_eq!(
        socks_connect(gw.addr, &[5, 1, 0, 3, 0, port[0], port[1]]).await,
        0x04
    );
    assert_eq!(
        socks_connect(gw.addr, &[5, 1, 0, 9, 127, 0, 0, 1, port[0], port[1]]).await,
        0x08
    );
    assert_eq!(
        socks_connect(gw.addr, &[5, 2, 0, 1, 127, 0, 0, 1, port[0], port[1]]).await,
        0x07
    );
    // Every byte in its own segment, then a 255-byte hostname (both work).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut all = vec![5u8, 1, 2, 1, 4];
    all.extend_from_slice(b"acct");
    all.push(TOKEN.len() as u8);
    all.extend_from_slice(TOKEN.as_bytes());
    all.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, port[0], port[1]]);
    for b in &all {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut head = [0u8; 2 + 2 + 10];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..4], &[5, 2, 1, 0]);
    assert_eq!(head[5], 0, "CONNECT succeeded: {head:?}");
    s.write_all(b"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // A 255-byte name is well-formed: it is parsed and resolved (and fails to resolve
    // cleanly with "host unreachable", not a protocol error).
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63)
    );
    assert_eq!(name.len(), 255);
    let mut req = vec![5u8, 1, 0, 3, 255];
    req.extend_from_slice(name.as_bytes());
    req.extend_from_slice(&port);
    let code = socks_connect(gw.addr, &req).await;
    assert!(code == 0x04 || code == 0x00, "255-byte name -> {code:#x}");
}

// === QUALITY.md cases 24 and 25: hostile and slow targets ===

/// A raw target: for each request head it reads, writes `reply`; it keeps the
/// connection open (reading) until the other side closes, and counts connections
/// accepted and connections still open.
struct ScriptedTarget {
    addr: std::net::SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedTarget {
    async fn start(reply: Vec<u8>) -> Self {
        Self::start_with(reply, false).await
    }

    /// As `start`, closing each connection right after its first reply.
    async fn start_with(reply: Vec<u8>, close_after_reply: bool) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (acc, op) = (accepted.clone(), open.clone());
        let reply = std::sync::Arc::new(reply);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                op.fetch_add(1, Ordering::SeqCst);
                let (op, reply) = (op.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Until the peer closes (or an hour passes).
                    while let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(3600), s.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // One reply per complete request head.
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if s.write_all(&reply).await.is_err() {
                                break;
                            }
                        }
                        if close_after_reply && seen.is_empty() {
                            break;
                        }
                    }
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
            task,
        }
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads until the gateway closes the connection (or resets it); `None` if it stays
/// open for 20 s.
async fn read_until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until `out` holds `want` (20 s at most per read); returns what was read.
async fn read_until_contains(s: &mut TcpStream, want: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(want.len()).any(|w| w == want) {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

/// Polls `check` every 50 ms for at most 20 s.
pub(crate) async fn eventually(check: impl Fn() -> bool) -> bool {
    for _ in 0..400 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

fn get(target: std::net::SocketAddr) -> String {
    format!(
        "GET http://{target}/ HTTP/1.1\r\nHost: x\r\n{}\r\n",
        auth_header()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_response_framing_gets_502_before_any_byte() {
    // 24. The reproduction: Content-Length: 5 with a chunked body whose one chunk
    // holds a whole forged response. Then two lengths, a list, and broken chunking.
    let forged = b"helloHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!";
    let chunk = |head: &str| {
        let mut r = head.as_bytes().to_vec();
        r.extend_from_slice(format!("{:x}\r\n", forged.len()).as_bytes());
        r.extend_from_slice(forged);
        r.extend_from_slice(b"\r\n0\r\n\r\n");
        r
    };
    let cases: Vec<Vec<u8>> = vec![
        chunk("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        chunk("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
        [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 48\r\n\r\n"[..],
            forged,
        ]
        .concat(),
        [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 48\r\n\r\n"[..],
            forged,
        ]
        .concat(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloEVIL!\r\n0\r\n\r\n"
            .to_vec(),
    ];
    let gw = TestGateway::start(&config_text("")).await;
    for reply in cases {
        let shown = String::from_utf8_lossy(&reply).into_owned();
        let target = ScriptedTarget::start(reply).await;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(get(target.addr).as_bytes()).await.unwrap();
        let out = read_until_closed(&mut s)
            .await
            .unwrap_or_else(|| panic!("connection left open for {shown:?}"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 502 "), "{shown:?} -> {text:?}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{shown:?} -> {text:?}");
        assert!(!text.contains("EVIL"), "{shown:?} -> {text:?}");
        assert!(!text.contains("hello"), "{shown:?} -> {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_never_gets_more_body_than_announced() {
    // 24. Content-Length: 5 followed by more bytes: the client gets exactly 5, and the
    // next request on the same connection gets a fresh answer, not the leftover.
    let target = ScriptedTarget::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
            .to_vec(),
    )
    .await;
    let gw = TestGateway::start(&config_text("")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..2 {
        s.write_all(get(target.addr).as_bytes()).await.unwrap();
        let got = read_until_contains(&mut s, b"\r\n\r\nhello").await;
        all.extend_from_slice(&got);
    }
    // Nothing else arrives: ask once more and read that answer too.
    s.write_all(get(target.addr).as_bytes()).await.unwrap();
    all.extend_from_slice(&read_until_contains(&mut s, b"\r\n\r\nhello").await);
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text:?}");
    assert_eq!(text.matches("hello").count(), 3, "{text:?}");
    assert!(!text.contains("EVIL"), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("content-length: 5"),
        "{text:?}"
    );
}

fn with_idle(idle: &str) -> String {
    config_text("").replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"2s\"\nidle_timeout = \"{idle}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_target_sends_the_head_and_a_gone_client_frees_everything() {
    // 25. Head and 3 of 100 body bytes, then the target stalls. The head and the 3 bytes
    // reach the client at once; when the client goes away, the gateway closes the
    // target connection and its own (the idle timeout, an hour here, plays no part).
    let target =
        ScriptedTarget::start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc".to_vec()).await;
    let gw = TestGateway::start(&with_idle("1h")).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(get(target.addr).as_bytes()).await.unwrap();
        let got = read_until_contains(&mut s, b"\r\n\r\nabc").await;
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text:?}");
        assert!(text.contains("content-length: 100\r\n"), "{text:?}");
        assert!(text.ends_with("\r\n\r\nabc"), "{text:?}");
        clients.push(s);
    }
    assert_eq!(target.open(), 5);
    drop(clients);
    assert!(
        eventually(|| target.open() == 0).await,
        "{} target connections still open after the clients left",
        target.open()
    );
    assert!(
        eventually(|| gw.gateway.open_connections() == 0).await,
        "{} client connections still counted",
        gw.gateway.open_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_ends_at_the_idle_timeout() {
    // 25. The client stays; the target never sends the rest: after the idle timeout the
    // client connection is reset (never a truncated body passed on as complete) and the
    // target connection is closed.
    let target =
        ScriptedTarget::start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc".to_vec()).await;
    let gw = TestGateway::start(&with_idle("1s")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(get(target.addr).as_bytes()).await.unwrap();
    let out = read_until_closed(&mut s)
        .await
        .expect("the gateway ends a stalled response");
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200 ok\r\n"), "{text:?}");
    assert!(text.ends_with("\r\n\r\nabc"), "{text:?}");
    assert!(eventually(|| target.open() == 0).await);
    assert!(eventually(|| gw.gateway.open_connections() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_target_connections_are_reused_and_bodies_stream_in_both_framings() {
    // The upstream cache: three requests on one client connection use one target
    // connection; a chunked answer is passed on chunked, a close-delimited one too.
    let target = ScriptedTarget::start(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    let gw = TestGateway::start(&config_text("")).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut all = Vec::new();
    for _ in 0..3 {
        // Same exit every time: a session pins it.
        let request = format!(
            "GET http://{}/ HTTP/1.1\r\nHost: x\r\n{}\r\n",
            target.addr,
            auth_header_for("acct-session-reuse")
        );
        s.write_all(request.as_bytes()).await.unwrap();
        all.extend_from_slice(&read_until_contains(&mut s, b"0\r\n\r\n").await);
    }
    let text = String::from_utf8_lossy(&all).to_ascii_lowercase();
    assert_eq!(
        text.matches("transfer-encoding: chunked").count(),
        3,
        "{text:?}"
    );
    assert_eq!(
        text.matches("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").count(),
        3,
        "{text:?}"
    );
    assert_eq!(
        target.accepted(),
        1,
        "one target connection for three requests"
    );
    // A close-delimited answer to an HTTP/1.0 client: passed on until close.
    let target =
        ScriptedTarget::start_with(b"HTTP/1.0 200 OK\r\n\r\nuntil close".to_vec(), true).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "GET http://{}/ HTTP/1.0\r\n{}\r\n",
        target.addr,
        auth_header()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let out = read_until_closed(&mut s).await.expect("closed");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(text.ends_with("\r\n\r\nuntil close"), "{text:?}");
}

fn auth_header_for(user: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64(format!("{user}:{TOKEN}").as_bytes())
    )
}

// === Point 4 of issue 10: own addresses, DNS oracle, Retry-After, rules ===

/// A non-loopback address of this machine (the source of its default route), if any.
/// Finding it sends no packet (a UDP connect only picks a route).
fn own_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("203.0.113.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_never_dials_its_own_listening_sockets() {
    // 4. A CONNECT to the machine's own address at the admin port reached the admin API
    // even though only that address was allow-listed, not the gateway itself.
    let Some(ip) = own_address() else {
        eprintln!("no non-loopback address on this machine: nothing to check");
        return;
    };
    // Stands in for the admin API: a listener on the machine's own address.
    let admin = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let cfg = config_text("").replace(
        "allow_destinations = [\"127.0.0.0/8\", \"::1/128\"]",
        &format!(
            "allow_destinations = [\"127.0.0.0/8\", \"::1/128\", \"{ip}/32\"]\nadmin_listen = \"{admin_addr}\"\nadmin_token = \"an-admin-token-of-some-length\""
        ),
    );
    let gw = TestGateway::start(&cfg).await;
    let a = auth_header();
    let answer = raw_exchange(
        gw.addr,
        format!("CONNECT {admin_addr} HTTP/1.1\r\nHost: x\r\n{a}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&answer).starts_with("HTTP/1.1 403"), "{answer}");
    let reached = tokio::time::timeout(Duration::from_millis(200), admin.accept()).await;
    assert!(reached.is_err(), "the admin listener got a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_name_does_not_reveal_its_address() {
    // 4. `localhost` resolves to loopback: refused, and the answer says so without the
    // address (an internal DNS oracle otherwise).
    let strict =
        config_text("").replace("allow_destinations = [\"127.0.0.0/8\", \"::1/128\"]\n", "");
    let gw = TestGateway::start(&strict).await;
    let a = auth_header();
    for request in [
        format!("CONNECT localhost:80 HTTP/1.1\r\nHost: x\r\n{a}\r\n"),
        format!("GET http://localhost/ HTTP/1.1\r\nHost: x\r\n{a}Connection: close\r\n\r\n"),
    ] {
        let answer = raw_exchange(gw.addr, request.as_bytes()).await;
        assert!(status_line(&answer).starts_with("HTTP/1.1 403"), "{answer}");
        let error = answer
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("x-ipsx-error:"))
            .unwrap_or_default();
        assert!(error.contains("private address"), "{answer}");
        assert!(
            !answer.contains("127.0.0.1") && !answer.contains("::1"),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cool_down_503_says_when_to_retry() {
    // 4. docs/rotation.md: every matching exit cooling down -> 503 + Retry-After.
    let target =
        ScriptedTarget::start(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec())
            .await;
    let gw = TestGateway::start(&config_text(
        "[[ban]]\nstatuses = [403]\nscope = \"domain\"\ncooldown = \"10m\"\n",
    ))
    .await;
    let url = format!("http://{}/", target.addr);
    let out = curl(&["-i", "-x", &gw.proxy("acct-country-fr"), &url, &url]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let refused = text
        .split("http/1.1 ")
        .find(|r| r.starts_with("503"))
        .unwrap_or_else(|| panic!("no 503: {text}"));
    assert!(refused.contains("cooling down"), "{text}");
    let after: u64 = refused
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {text}"));
    assert!((1..=600).contains(&after), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_the_uri_host() {
    // 4. `[[rule]]` host matching through the gateway: requests to `localhost` go out
    // through the rule's country, requests to 127.0.0.1 (same echo) are not bound by it.
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text(
        "[[rule]]\nhosts = [\"localhost\"]\ntarget = { country = \"fr\" }\n",
    ))
    .await;
    let by_name = format!("http://localhost:{}/ip", echo.addr.port());
    let mut args = vec!["-x".to_owned(), gw.proxy("acct")];
    args.extend((0..5).map(|_| by_name.clone()));
    args.extend(["-w".to_owned(), "\\n".to_owned()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let ips = echo_ips(&curl(&refs).await.stdout);
    assert_eq!(ips, vec!["127.0.0.6".to_owned(); 5]);
    let mut args = vec!["-x".to_owned(), gw.proxy("acct")];
    args.extend((0..10).map(|_| echo.url()));
    args.extend(["-w".to_owned(), "\\n".to_owned()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let ips = echo_ips(&curl(&refs).await.stdout);
    assert_eq!(ips.len(), 10);
    assert!(ips.iter().any(|ip| ip != "127.0.0.6"), "{ips:?}");
}

// === SOCKS5 UDP ASSOCIATE: hostile datagrams, caps, the end of an association ===

/// Authenticates as `user` and sends UDP ASSOCIATE naming `requested` (`ATYP ADDR
/// PORT`): the control connection, the reply code and the relay address.
pub(crate) async fn udp_associate(
    gw: std::net::SocketAddr,
    user: &str,
    requested: &[u8],
) -> (TcpStream, u8, Option<std::net::SocketAddr>) {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let mut auth = vec![1u8, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(TOKEN.len() as u8);
    auth.extend_from_slice(TOKEN.as_bytes());
    s.write_all(&auth).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [1, 0], "auth ok");
    let mut req = vec![5u8, 3, 0];
    req.extend_from_slice(requested);
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 4];
    if tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .is_err()
    {
        return (s, 0xee, None);
    }
    let relay = match head[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await.unwrap();
            std::net::SocketAddr::from(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([a[4], a[5]])))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await.unwrap();
            let ip: [u8; 16] = a[..16].try_into().unwrap();
            std::net::SocketAddr::from((ip, u16::from_be_bytes([a[16], a[17]])))
        }
        t => panic!("reply address type {t}"),
    };
    (s, head[1], (head[1] == 0).then_some(relay))
}

/// A client datagram to an IPv4 destination, header written by hand.
pub(crate) fn udp_datagram(dst: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
    let std::net::SocketAddr::V4(v4) = dst else {
        panic!("IPv4 only")
    };
    let mut d = vec![0u8, 0, 0, 1];
    d.extend_from_slice(&v4.ip().octets());
    d.extend_from_slice(&v4.port().to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// Receives one relayed answer: its source as the header says, and its payload.
pub(crate) async fn udp_answer(
    sock: &tokio::net::UdpSocket,
) -> Option<(std::net::SocketAddr, Vec<u8>)> {
    let mut buf = vec![0u8; 70000];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let d = &buf[..n];
    assert_eq!(
        &d[..4],
        &[0, 0, 0, 1],
        "answer header {:?}",
        &d[..n.min(10)]
    );
    let src =
        std::net::SocketAddr::from(([d[4], d[5], d[6], d[7]], u16::from_be_bytes([d[8], d[9]])));
    Some((src, d[10..].to_vec()))
}

fn udp_config(keys: &str) -> String {
    config_text("").replacen(
        "connect_timeout = \"2s\"\n",
        &format!("connect_timeout = \"2s\"\n{keys}"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_udp_datagrams_are_dropped_and_counted() {
    use ipsx_gateway::udp::Dropped;
    let echo = crate::gateway_clients::UdpEcho::start().await;
    let gw = TestGateway::start(&udp_config(
        "udp_max_datagram = 1024\nudp_max_destinations = 4\n",
    ))
    .await;
    let (control, code, relay) = udp_associate(gw.addr, "acct", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0);
    let relay = relay.unwrap();
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(echo.addr, b"first"), relay)
        .await
        .unwrap();
    let (src, answer) = udp_answer(&client).await.expect("echo answered");
    assert_eq!(src, echo.addr);
    let answer = String::from_utf8(answer).unwrap();
    let (exit_src, payload) = answer.split_once('|').unwrap();
    assert_eq!(payload, "first");
    let exit_src: std::net::SocketAddr = exit_src.parse().unwrap();
    assert_ne!(
        exit_src.ip(),
        client.local_addr().unwrap().ip(),
        "left from an exit"
    );

    let port = echo.addr.port().to_be_bytes();
    let mut frag = udp_datagram(echo.addr, b"part");
    frag[2] = 1;
    let hostile: Vec<(Vec<u8>, Dropped)> = vec![
        (vec![], Dropped::Malformed),
        (vec![0, 0], Dropped::Malformed),
        (vec![0, 0, 0, 1, 127, 0], Dropped::Malformed),
        (
            vec![0, 0, 0, 9, 127, 0, 0, 1, port[0], port[1], b'x'],
            Dropped::Malformed,
        ),
        (
            vec![0, 0, 0, 3, 0, port[0], port[1], b'x'],
            Dropped::Malformed,
        ),
        (frag, Dropped::Fragment),
        (udp_datagram(echo.addr, &[b'x'; 1025]), Dropped::Oversize),
        (vec![0, 0, 0, 1, 127, 0, 0, 1, 0, 0, b'x'], Dropped::Port),
        (
            udp_datagram("10.0.0.1:7".parse().unwrap(), b"x"),
            Dropped::Refused,
        ),
        (
            udp_datagram("169.254.169.254:80".parse().unwrap(), b"x"),
            Dropped::Refused,
        ),
    ];
    let mut want = std::collections::BTreeMap::new();
    for (bytes, why) in &hostile {
        client.send_to(bytes, relay).await.unwrap();
        *want.entry(why.reason()).or_insert(0u64) += 1;
    }
    // Another socket of the same host is not the client.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger
        .send_to(&udp_datagram(echo.addr, b"foreign"), relay)
        .await
        .unwrap();
    *want.entry(Dropped::Foreign.reason()).or_insert(0) += 1;
    // Nor may anyone but the destinations the client sent to answer it through the exit.
    stranger.send_to(b"unsolicited", exit_src).await.unwrap();
    *want.entry(Dropped::Unsolicited.reason()).or_insert(0) += 1;
    // Four destinations per association: echo and the two refused ones are three.
    client
        .send_to(&udp_datagram("127.0.0.1:9".parse().unwrap(), b"x"), relay)
        .await
        .unwrap();
    client
        .send_to(&udp_datagram("127.0.0.1:10".parse().unwrap(), b"x"), relay)
        .await
        .unwrap();
    *want.entry(Dropped::Destinations.reason()).or_insert(0) += 1;
    let counted = eventually(|| {
        let stats = gw.gateway.udp_stats();
        want.iter().all(|(k, v)| stats.dropped[k] == *v)
    })
    .await;
    let stats = gw.gateway.udp_stats();
    assert!(counted, "want {want:?}, counted {:?}", stats.dropped);
    // Nothing hostile reached the echo, and the association still works.
    client
        .send_to(&udp_datagram(echo.addr, b"second"), relay)
        .await
        .unwrap();
    let (_, answer) = udp_answer(&client).await.expect("still relaying");
    assert!(answer.ends_with(b"|second"));
    assert_eq!(echo.received(), 2);
    assert_eq!(gw.gateway.udp_stats().associations, 1);

    // The association ends with its control connection: the relay socket is closed,
    // and a datagram sent to it afterwards goes nowhere.
    drop(control);
    assert!(eventually(|| gw.gateway.udp_stats().associations == 0).await);
    let up = gw.gateway.udp_stats().datagrams_up;
    let _ = client
        .send_to(&udp_datagram(echo.addr, b"late"), relay)
        .await;
    assert!(
        udp_answer_within(&client, Duration::from_millis(500))
            .await
            .is_none()
    );
    assert_eq!(echo.received(), 2);
    assert_eq!(gw.gateway.udp_stats().datagrams_up, up);
}

async fn udp_answer_within(sock: &tokio::net::UdpSocket, wait: Duration) -> Option<usize> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(n),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_associations_are_capped_and_idle_ones_end() {
    let gw = TestGateway::start(&udp_config(
        "udp_max_associations = 1\nudp_idle_timeout = \"1s\"\n",
    ))
    .await;
    let (mut first, code, _) = udp_associate(gw.addr, "acct", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0);
    // The total cap: a second association is refused (general failure) while it runs.
    let (_, code, _) = udp_associate(gw.addr, "acct", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0x01, "over gateway.udp_max_associations");
    // Idle for the timeout: the gateway ends it and closes the control connection.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), first.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(eventually(|| gw.gateway.udp_stats().associations == 0).await);
    let (second, code, relay) = udp_associate(gw.addr, "acct", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0);
    assert!(relay.is_some());
    drop(second);
    assert!(eventually(|| gw.gateway.udp_stats().associations == 0).await);
    // Targeting errors are answered like CONNECT's, and a bad ATYP in the request too.
    let (_, code, _) = udp_associate(gw.addr, "acct-country-jp", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_ne!(code, 0, "no exit in jp");
    let (_, code, _) = udp_associate(gw.addr, "acct", &[9, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0x08);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_a_dual_stack_listener_gets_an_ipv4_relay() {
    let echo = crate::gateway_clients::UdpEcho::start().await;
    let config = ipsx_config::GatewayConfig::from_toml(&config_text(""), "test.toml").unwrap();
    let Ok(listener) = tokio::net::TcpListener::bind("[::]:0").await else {
        return; // no IPv6 on this machine: nothing to test
    };
    let port = listener.local_addr().unwrap().port();
    let gateway = ipsx_gateway::Gateway::new(config, None);
    let task = tokio::spawn(ipsx_gateway::serve(
        listener,
        gateway.clone(),
        std::future::pending(),
    ));
    let gw: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_control, code, relay) = udp_associate(gw, "acct", &[1, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(code, 0);
    let relay = relay.unwrap();
    assert!(relay.is_ipv4(), "{relay}");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(echo.addr, b"v4"), relay)
        .await
        .unwrap();
    let (_, answer) = udp_answer(&client).await.expect("echo answered");
    assert!(answer.ends_with(b"|v4"));
    task.abort();
}
