//! Acceptance of the gateway with real clients: curl and Python requests (PySocks).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_session_rotate_across_exits() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let proxy = gw.proxy("acct");
    let ips = curl_many(&["-x", &proxy], &echo.url(), 40).await;
    let distinct: HashSet<_> = ips.iter().collect();
    assert!(
        distinct.len() >= 3,
        "40 requests left from only {distinct:?}"
    );
    // The same through SOCKS5 with the name resolved at the exit side. A SOCKS5 (or
    // CONNECT) tunnel is one TCP stream, so exits rotate per connection: ask the target
    // to close so that curl opens a new one per request.
    let socks = gw.socks("acct");
    let ips = curl_many(
        &["--proxy", &socks, "-H", "Connection: close"],
        &echo.url(),
        40,
    )
    .await;
    let distinct: HashSet<_> = ips.iter().collect();
    assert!(
        distinct.len() >= 3,
        "SOCKS5: 40 requests left from only {distinct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_one_exit() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    for proxy in [gw.proxy("acct-session-x"), gw.socks("acct-session-x")] {
        let ips = curl_many(&["--proxy", &proxy], &echo.url(), 40).await;
        let distinct: HashSet<_> = ips.iter().collect();
        assert_eq!(distinct.len(), 1, "session x used {distinct:?} via {proxy}");
    }
    // Separate curl processes (separate connections) keep the session too.
    let mut seen = HashSet::new();
    for _ in 0..5 {
        seen.extend(
            curl_many(
                &["-x", &gw.proxy("acct-session-y-sesstime-5")],
                &echo.url(),
                1,
            )
            .await,
        );
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn country_targeting_only_uses_that_country() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let de: HashSet<String> = EXITS
        .iter()
        .filter(|(_, c)| *c == "de")
        .map(|(l, _)| exit_ip(*l).to_string())
        .collect();
    let ips = curl_many(&["-x", &gw.proxy("acct-country-de")], &echo.url(), 40).await;
    assert!(
        ips.iter().all(|ip| de.contains(ip)),
        "non-DE exit used: {ips:?}"
    );
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        2,
        "both DE exits used"
    );
    // Header targeting on plain HTTP, stripped before forwarding.
    let out = curl(&[
        "-x",
        &gw.proxy("acct"),
        "-H",
        "X-Ipsx-Country: fr",
        &echo.url(),
    ])
    .await;
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        echo_ips(&out.stdout),
        vec![exit_ip(6).to_string()],
        "{body}"
    );
    assert!(
        !body.to_ascii_lowercase().contains("x-ipsx"),
        "targeting header leaked: {body}"
    );
    // SOCKS5 with targeting in the username.
    let ips = curl_many(&["--proxy", &gw.socks("acct-cc-us")], &echo.url(), 10).await;
    assert!(
        ips.iter().all(|ip| ip == "127.0.0.4" || ip == "127.0.0.5"),
        "{ips:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targeting_gets_a_clear_error_naming_the_key() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let out = curl(&["-i", "-x", &gw.proxy("acct-country-zz"), &echo.url()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("`country`") && text.contains("zz"), "{text}");
    let out = curl(&["-i", "-x", &gw.proxy("acct-colour-red"), &echo.url()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("`colour`"),
        "{text}"
    );
    // A valid country with no exit: 503 that says what is missing.
    let out = curl(&["-i", "-x", &gw.proxy("acct-country-jp"), &echo.url()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 503") && text.contains("country=jp"),
        "{text}"
    );
    // SOCKS: the request fails (curl reports the SOCKS failure).
    let out = curl(&["--proxy", &gw.socks("acct-country-zz"), &echo.url()]).await;
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_over_http_and_socks5h() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let code = r#"
import sys, requests, json
url, http_proxy, socks_proxy = sys.argv[1], sys.argv[2], sys.argv[3]
seen = {}
for name, proxy in (("http", http_proxy), ("socks", socks_proxy)):
    s = requests.Session()
    s.trust_env = False
    ips = []
    for i in range(40):
        # SOCKS tunnels rotate per connection: close each one.
        r = s.get(url, proxies={"http": proxy, "https": proxy}, timeout=20, headers={"Connection": "close"})
        r.raise_for_status()
        ips.append(r.json()["ip"])
    seen[name] = ips
print(json.dumps(seen))
"#;
    let out = python(
        code,
        &[&echo.url(), &gw.proxy("acct-session-py"), &gw.socks("acct")],
    )
    .await;
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let http: HashSet<&str> = seen["http"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let socks: HashSet<&str> = seen["socks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(http.len(), 1, "session over HTTP proxy: {http:?}");
    assert!(socks.len() >= 3, "no session over SOCKS5h: {socks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reaches_a_tls_origin() {
    // A local TLS origin with a self-signed certificate for `localhost`.
    let dir = tempdir();
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .expect("openssl runs");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let origin = tls_origin(&dir).await;
    let gw = TestGateway::start(&config_text("")).await;
    let cacert = dir.join("cert.pem");
    let url = format!("https://localhost:{}/secure", origin.port());
    let out = curl(&[
        "-x",
        &gw.proxy("acct-country-us"),
        "--cacert",
        cacert.to_str().unwrap(),
        &url,
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("hello over tls from 127.0.0.4")
            || text.contains("hello over tls from 127.0.0.5"),
        "{text}"
    );
    let out = curl(&[
        "--proxy",
        &gw.socks("acct-country-de"),
        "--cacert",
        cacert.to_str().unwrap(),
        &url,
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("from 127.0.0.2") || text.contains("from 127.0.0.3"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ipsx-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A minimal HTTPS origin (rustls) answering with the caller's address.
async fn tls_origin(dir: &std::path::Path) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("cert.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = format!("hello over tls from {}\n", peer.ip());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A target that answers every request with a chunked body in three chunks.
async fn chunked_target() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Origin: chunky\r\n\r\n5\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\n\r\n";
                        if s.write_all(resp).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_and_http10_clients_are_framed_right() {
    let target = chunked_target().await;
    let gw = TestGateway::start(&config_text("")).await;
    let url = format!("http://{target}/");
    // HTTP/1.1 clients get the body chunked, whole, on a connection that stays usable.
    let out = curl(&["-s", "-x", &gw.proxy("acct"), &url, &url]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello, worldhello, world"
    );
    // An HTTP/1.0 client cannot read chunked: it gets the body delimited by the close.
    let out = curl(&["-s", "-i", "--http1.0", "-x", &gw.proxy("acct"), &url]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("transfer-encoding"),
        "{text}"
    );
    assert!(text.ends_with("hello, world"), "{text}");
    assert!(text.to_ascii_lowercase().contains("x-origin: chunky"));
    // A chunked request body reaches the target whole (Python requests streams a
    // generator as chunked).
    let echo = Echo::start().await;
    let code = r#"
import sys, requests
def body():
    yield b"a" * 1000
    yield b"b" * 2000
s = requests.Session(); s.trust_env = False
r = s.post(sys.argv[1], data=body(), proxies={"http": sys.argv[2]}, timeout=20)
print(r.json()["body_bytes"], r.json()["method"])
"#;
    let out = python(code, &[&echo.url(), &gw.proxy("acct")]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000 POST");
    // A large Content-Length upload streams through intact.
    let file = std::env::temp_dir().join(format!("ipsx-upload-{}", std::process::id()));
    std::fs::write(&file, vec![b'z'; 256 * 1024]).unwrap();
    let data = format!("@{}", file.display());
    let out = curl(&[
        "-s",
        "-x",
        &gw.proxy("acct"),
        "--data-binary",
        &data,
        &echo.url(),
    ])
    .await;
    let _ = std::fs::remove_file(&file);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["body_bytes"], 256 * 1024);
}

// === SOCKS5 UDP ASSOCIATE (RFC 1928 section 7) ===

/// A UDP echo target on loopback: answers every datagram with `SOURCE|PAYLOAD`, where
/// SOURCE is the address it came from (so the client sees which exit it left from).
pub(crate) struct UdpEcho {
    pub addr: std::net::SocketAddr,
    pub received: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UdpEcho {
    pub(crate) async fn start() -> Self {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut answer = format!("{from}|").into_bytes();
                answer.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&answer, from).await;
            }
        });
        Self {
            addr,
            received,
            task,
        }
    }

    pub(crate) fn received(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_leaves_from_the_chosen_exit_and_sessions_hold_it() {
    let echo = UdpEcho::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    // Each association is one PySocks UDP socket: several datagrams, each answered by
    // the echo with the address it saw.
    let code = r#"
import sys, json, socks, socket
gw_host, gw_port, token, echo_host, echo_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
def association(user, n):
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, gw_host, gw_port, True, user, token)
    s.settimeout(10)
    seen = []
    for i in range(n):
        payload = ("ping-%d" % i).encode()
        s.sendto(payload, (echo_host, echo_port))
        data, src = s.recvfrom(4096)
        source, echoed = data.split(b"|", 1)
        assert echoed == payload, (echoed, payload)
        assert src == (echo_host, echo_port), src
        seen.append(source.decode().rsplit(":", 1)[0])
    s.close()
    return seen
out = {
    "rotating": [association("acct", 2) for _ in range(20)],
    "sticky": [association("acct-session-u1", 3) for _ in range(4)],
    "sessions": [association("acct-session-s%d" % i, 2) for i in range(8)],
    "us": [association("acct-country-us", 1) for _ in range(8)],
}
print(json.dumps(out))
"#;
    let out = python(
        code,
        &[
            &gw.addr.ip().to_string(),
            &gw.addr.port().to_string(),
            TOKEN,
            &echo.addr.ip().to_string(),
            &echo.addr.port().to_string(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let assocs = |key: &str| -> Vec<Vec<String>> {
        seen[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                a.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            })
            .collect()
    };
    let exits: HashSet<String> = EXITS.iter().map(|(l, _)| exit_ip(*l).to_string()).collect();
    // One exit per association; associations without a session rotate.
    let rotating = assocs("rotating");
    for a in &rotating {
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 1, "{a:?}");
        assert!(exits.contains(&a[0]), "left from {a:?}, not an exit");
    }
    let distinct: HashSet<&String> = rotating.iter().map(|a| &a[0]).collect();
    assert!(
        distinct.len() >= 3,
        "20 associations left from {distinct:?}"
    );
    // A sticky session keeps its exit across associations; different sessions rotate.
    let sticky: HashSet<String> = assocs("sticky").into_iter().flatten().collect();
    assert_eq!(sticky.len(), 1, "session u1 used {sticky:?}");
    let sessions = assocs("sessions");
    for a in &sessions {
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 1, "{a:?}");
    }
    let spread: HashSet<&String> = sessions.iter().map(|a| &a[0]).collect();
    assert!(spread.len() >= 2, "8 sessions all on {spread:?}");
    // Targeting applies as for TCP.
    let us: HashSet<String> = assocs("us").into_iter().flatten().collect();
    assert!(
        us.iter().all(|ip| ip == "127.0.0.4" || ip == "127.0.0.5"),
        "{us:?}"
    );
    let stats = gw.gateway.udp_stats();
    let sent = 20 * 2 + 4 * 3 + 8 * 2 + 8;
    assert!(
        stats.datagrams_up >= sent && stats.datagrams_down >= sent,
        "{stats:?}"
    );
    assert_eq!(echo.received(), sent as usize);
}
