//! Operations: config files (examples, invalid fixtures, `--check`), hot reload under
//! load, graceful drain on SIGTERM, the admin API, rate limits, ban rules, sessions.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use ipsx_config::GatewayConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === config files ===

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_config_parses() {
    let mut gateways = 0;
    let mut providers = 0;
    for entry in std::fs::read_dir(workspace().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.display().to_string();
        // Each example is a gateway config ([gateway]), a provider agent config
        // ([exchange]) or a bare provider exit config (exit_address); none may be left
        // unchecked.
        if text.lines().any(|l| l.trim() == "[gateway]") {
            GatewayConfig::from_toml(&text, &name).unwrap_or_else(|e| panic!("{e}"));
            gateways += 1;
        } else if text.lines().any(|l| l.trim() == "[exchange]") {
            ipsx_provider::agent::AgentConfig::from_toml(&text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            providers += 1;
        } else if text
            .lines()
            .any(|l| l.trim_start().starts_with("exit_address"))
        {
            ipsx_provider::ProviderConfig::from_toml(&text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            providers += 1;
        } else {
            panic!("{name}: not a config this test knows how to check");
        }
    }
    assert!(
        gateways >= 2 && providers >= 1,
        "examples present: {gateways} gateway, {providers} provider"
    );
}

#[test]
fn every_invalid_fixture_is_refused_with_line_and_key() {
    let dir = workspace().join("tests/fixtures/bad-gateway");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("fixture has an expect line")
            .to_owned();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let err = GatewayConfig::from_toml(&text, &name)
            .expect_err(&name)
            .to_string();
        for part in expect.split_whitespace() {
            assert!(err.contains(part), "{name}: error `{err}` lacks `{part}`");
        }
        assert!(err.starts_with(&format!("{name}:")), "{err}");
        seen += 1;
    }
    assert!(seen >= 10);
}

#[test]
fn check_flag_prints_errors_with_line_and_key() {
    let bin = env!("CARGO_BIN_EXE_ipsx");
    let bad = workspace().join("tests/fixtures/bad-gateway/duplicate-exit.toml");
    let out = Command::new(bin)
        .args(["gateway", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("duplicate-exit.toml:7:") && err.contains("exit[1].name"),
        "{err}"
    );
    let good = workspace().join("examples/local-exits.toml");
    let out = Command::new(bin)
        .args(["gateway", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// === a gateway in its own process ===

struct GatewayProcess {
    child: Child,
    proxy: SocketAddr,
    admin: Option<SocketAddr>,
    dir: PathBuf,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl GatewayProcess {
    fn start(config: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ipsx-ops-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ipsx"))
            .args(["gateway", "--config"])
            .arg(&path)
            .env("IPSX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addrs = common::gateway_addrs(&mut lines).expect("gateway printed its address");
        Self {
            child,
            proxy: addrs.proxy,
            admin: addrs.admin,
            dir,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("gateway.toml")
    }

    fn signal(&self, sig: i32) {
        // SAFETY-free: libc::kill on our own child's PID.
        let pid = i32::try_from(self.child.id()).unwrap();
        assert_eq!(
            std::process::Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .unwrap()
                .code(),
            Some(0)
        );
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn basic(user: &str) -> String {
    let raw = format!("{user}:{TOKEN}");
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = out;
    use std::io::Write;
    out.stdin.take().unwrap().write_all(raw.as_bytes()).unwrap();
    let o = out.wait_with_output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

/// One keep-alive client: `n` GETs on one connection; returns statuses and exit IPs.
async fn keep_alive_client(
    proxy: SocketAddr,
    url_host: SocketAddr,
    auth: &str,
    n: usize,
) -> Vec<(u16, String)> {
    let mut results = Vec::with_capacity(n);
    let mut stream: Option<TcpStream> = None;
    for _ in 0..n {
        if stream.is_none() {
            stream = TcpStream::connect(proxy).await.ok();
        }
        let Some(s) = stream.as_mut() else {
            results.push((0, String::new()));
            continue;
        };
        let req = format!(
            "GET http://{url_host}/ip HTTP/1.1\r\nHost: {url_host}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            results.push((0, String::new()));
            stream = None;
            continue;
        }
        let (status, body, close) = read_response(s).await;
        results.push((status, body));
        if close {
            stream = None;
        }
    }
    results
}

async fn read_response(s: &mut TcpStream) -> (u16, String, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (status, body, head.contains("connection: close"));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (0, String::new(), true),
        }
    }
}

fn exit_ip_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["ip"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn config_with_exits(exits: &[(u8, &str)], extra: &str) -> String {
    let mut t = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\nreload_poll = \"100ms\"\ndrain_timeout = \"10s\"\n{extra}\n[[token]]\nname = \"tester\"\nsecret = \"{TOKEN}\"\n\n"
    );
    for (last, cc) in exits {
        t.push_str(&format!(
            "[[exit]]\nname = \"{cc}-{last}\"\nbind = \"127.0.0.{last}\"\ncountry = \"{cc}\"\n\n"
        ));
    }
    t
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_loses_no_request() {
    let echo = Echo::start().await;
    let set_a: &[(u8, &str)] = &[(2, "de"), (3, "de"), (4, "us")];
    let set_b: &[(u8, &str)] = &[(4, "us"), (5, "us"), (6, "fr")];
    let gw = GatewayProcess::start(&config_with_exits(set_a, ""));
    let auth = basic("acct");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(keep_alive_client(
                gw.proxy,
                echo.addr,
                Box::leak(auth.into_boxed_str()),
                150,
            ))
        })
        .collect();
    // Reload five times while the clients run: by file change and by SIGHUP.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let next = if i % 2 == 0 { set_b } else { set_a };
        write_atomically(&gw.config_path(), &config_with_exits(next, ""));
        if i == 3 {
            gw.signal(1);
        }
    }
    let mut total = 0;
    for c in clients {
        for (status, body) in c.await.unwrap() {
            total += 1;
            assert_eq!(status, 200, "a request failed during reloads: {body}");
        }
    }
    assert_eq!(total, 600);
    // The last config (set_b) is in force: only its exits are used now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = keep_alive_client(gw.proxy, echo.addr, &auth, 30).await;
    for (status, body) in &after {
        assert_eq!(*status, 200);
        let ip = exit_ip_of(body);
        assert!(
            ["127.0.0.4", "127.0.0.5", "127.0.0.6"].contains(&ip.as_str()),
            "old exit {ip} still used"
        );
    }
    // A broken config is refused and the running one stays.
    write_atomically(&gw.config_path(), "[gateway]\nlisen = 1\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = admin_get(gw.admin.unwrap(), "/api/status").await;
    assert!(status["generation"].as_u64().unwrap() >= 3, "{status}");
    assert!(
        status["last_reload_error"]
            .as_str()
            .unwrap_or("")
            .contains("lisen"),
        "{status}"
    );
    let still = keep_alive_client(gw.proxy, echo.addr, &auth, 5).await;
    assert!(still.iter().all(|(s, _)| *s == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_stops_accepting() {
    // A target that answers after a second.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nslow!")
                    .await;
            });
        }
    });
    let mut gw = GatewayProcess::start(&config_with_exits(&[(2, "de")], ""));
    let auth = basic("acct");
    let proxy = gw.proxy;
    let in_flight = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let req = format!(
            "GET http://{slow}/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        read_response(&mut s).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(15);
    let (status, body, _) = in_flight.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "slow!"),
        "in-flight request finished"
    );
    assert!(
        TcpStream::connect(gw.proxy).await.is_err(),
        "no new connections after SIGTERM"
    );
    let mut exited = false;
    for _ in 0..100 {
        if gw.child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited, "gateway exited after draining");
}

async fn admin_get(admin: SocketAddr, path: &str) -> serde_json::Value {
    let out = curl(&[&format!("http://{admin}{path}")]).await;
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

// === in-process ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_exits_sessions_limits_and_metrics() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("[limits]\nper_exit = \"100/s\"\n"))
        .await
        .with_admin()
        .await;
    let out = curl(&["-x", &gw.proxy("acct-session-adm"), &echo.url()]).await;
    assert_eq!(echo_ips(&out.stdout).len(), 1);
    let admin = gw.admin_addr();
    let exits = admin_get(admin, "/api/exits").await;
    let list = exits["exits"].as_array().unwrap();
    assert_eq!(list.len(), EXITS.len());
    assert!(
        list.iter()
            .any(|e| e["requests"].as_u64().unwrap_or(0) >= 1),
        "{exits}"
    );
    let sessions = admin_get(admin, "/api/sessions").await;
    assert!(sessions.to_string().contains("adm"), "{sessions}");
    let limits = admin_get(admin, "/api/limits").await;
    assert_eq!(limits["defaults"]["per_exit"], "100/s", "{limits}");
    let metrics = curl(&[&format!("http://{admin}/metrics")]).await;
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(text.contains("ipsx_requests_total"), "{text}");
    let missing = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{admin}/nope"),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&missing.stdout), "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_reject_with_429_or_wait() {
    let echo = Echo::start().await;
    let cfg = config_text("[limits]\non_limit = \"reject\"\n").replace(
        &format!("secret = \"{TOKEN}\"\n"),
        &format!("secret = \"{TOKEN}\"\nrate = \"1/min\"\n"),
    );
    let gw = TestGateway::start(&cfg).await;
    let out = curl(&["-i", "-x", &gw.proxy("acct"), &echo.url(), &echo.url()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 429"), "{text}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    // Wait mode: a tight per-exit limit on one exit still serves every request.
    let cfg = config_text(
        "[limits]\nper_exit = \"10/s burst 1\"\non_limit = \"wait\"\nmax_wait = \"3s\"\n",
    );
    let gw = TestGateway::start(&cfg).await;
    let ips = {
        let urls: Vec<String> = (0..5).map(|_| echo.url()).collect();
        let mut args = vec!["-x".to_owned(), gw.proxy("acct-country-fr")];
        args.extend(urls);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        echo_ips(&curl(&refs).await.stdout)
    };
    assert_eq!(ips, vec!["127.0.0.6".to_owned(); 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_responses_cool_the_exit_down_and_retry_elsewhere() {
    // A target that answers 403 to 127.0.0.2 and 200 to everyone else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let hits_from_banned = Arc::new(AtomicUsize::new(0));
    let hb = hits_from_banned.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = listener.accept().await else {
                return;
            };
            let hb = hb.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let body = format!("{{\"ip\":\"{}\"}}", peer.ip());
                    let status = if peer.ip().to_string() == "127.0.0.2" {
                        hb.fetch_add(1, Ordering::SeqCst);
                        "403 Forbidden"
                    } else {
                        "200 OK"
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let cfg = config_text("[[ban]]\nstatuses = [403]\nscope = \"domain\"\ncooldown = \"10m\"\n");
    let gw = TestGateway::start(&cfg).await;
    let url = format!("http://{target}/");
    let mut args = vec!["-x".to_owned(), gw.proxy("acct-country-de")];
    args.extend((0..20).map(|_| url.clone()));
    args.push("-w".into());
    args.push("\\n".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&refs).await;
    let ips = echo_ips(&out.stdout);
    assert_eq!(
        ips,
        vec!["127.0.0.3".to_owned(); 20],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        hits_from_banned.load(Ordering::SeqCst) <= 1,
        "the banned exit was used again"
    );
    let snapshot = gw.gateway.rotator().exits();
    let banned = snapshot.iter().find(|e| e.id.as_str() == "de-2").unwrap();
    assert!(
        !serde_json::to_value(banned).unwrap()["bans"]
            .as_array()
            .is_none_or(|b| b.is_empty()),
        "{banned:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_exit_is_gone_fails_loudly() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config_text("")).await;
    let out = curl(&["-x", &gw.proxy("acct-country-de-session-gone"), &echo.url()]).await;
    let first = echo_ips(&out.stdout);
    assert_eq!(first.len(), 1);
    // Reload without that exit.
    let keep: Vec<(u8, &str)> = EXITS
        .iter()
        .copied()
        .filter(|(l, _)| exit_ip(*l).to_string() != first[0])
        .collect();
    let mut text = String::from(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nallow_destinations = [\"127.0.0.0/8\"]\n\n",
    );
    text.push_str(&format!(
        "[[token]]\nname = \"tester\"\nsecret = \"{TOKEN}\"\n\n"
    ));
    for (last, cc) in keep {
        text.push_str(&format!(
            "[[exit]]\nname = \"{cc}-{last}\"\nbind = \"127.0.0.{last}\"\ncountry = \"{cc}\"\n\n"
        ));
    }
    gw.gateway
        .apply(GatewayConfig::from_toml(&text, "reload.toml").unwrap());
    let out = curl(&[
        "-i",
        "-x",
        &gw.proxy("acct-country-de-session-gone"),
        &echo.url(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-ipsx-error: session `gone`"),
        "{text}"
    );
    // A new session id works at once, on the remaining DE exit.
    let out = curl(&[
        "-x",
        &gw.proxy("acct-country-de-session-fresh"),
        &echo.url(),
    ])
    .await;
    assert_eq!(echo_ips(&out.stdout).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_the_changes_that_need_a_restart() {
    // Listeners are bound and the market started once: a reload that changes them says
    // so (and logs it) instead of ignoring them silently; the rest applies.
    let dir = std::env::temp_dir().join(format!("ipsx-reload-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    let first = config_text("");
    std::fs::write(&path, &first).unwrap();
    let gateway = ipsx_gateway::Gateway::new(
        GatewayConfig::from_toml(&first, "gateway.toml").unwrap(),
        Some(path.clone()),
    );
    let same = gateway.reload_report().await.unwrap();
    assert!(same.needs_restart.is_empty(), "{same:?}");
    let moved = first.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"",
    );
    std::fs::write(&path, &moved).unwrap();
    let report = gateway.reload_report().await.unwrap();
    assert_eq!(
        report.needs_restart,
        vec![
            "gateway.listen".to_owned(),
            "gateway.admin_listen".to_owned()
        ]
    );
    assert_eq!(report.generation, same.generation + 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
