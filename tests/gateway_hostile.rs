//! QUALITY.md cases 1-15 against a running gateway: every hostile or malformed input is
//! refused with a clear status (or SOCKS reply), and nothing reaches the target.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

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
