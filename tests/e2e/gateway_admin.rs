//! Admin and open-proxy safety: the admin API's bearer token, and configs that would
//! expose the admin API or an open proxy are refused, naming the key (also through
//! `ipsx gateway --check`). The web dashboard in headless Chromium, and the admin
//! listener's limits (event-stream listeners, slow consumers, oversize heads, asset
//! paths).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{TestGateway, curl};
use ipsx_config::GatewayConfig;

const ADMIN_TOKEN: &str = "admin-token-0123456789";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(status, headers and body)` of a GET on the admin API, with an optional bearer token.
async fn admin_get(gw: &TestGateway, path: &str, bearer: Option<&str>) -> (u16, String) {
    let url = format!("http://{}{path}", gw.admin_addr());
    let header = bearer.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec!["-i", url.as_str()];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    let out = curl(&args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn admin_token_guards_the_api_and_metrics() {
    let config = common::config_text("").replacen(
        "[gateway]\n",
        &format!("[gateway]\nadmin_token = \"{ADMIN_TOKEN}\"\n"),
        1,
    );
    let gw = TestGateway::start(&config).await.with_admin().await;
    for path in ["/metrics", "/api/status", "/api/limits"] {
        let (status, text) = admin_get(&gw, path, None).await;
        assert_eq!(status, 401, "{path}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{text}"
        );
        let (status, _) = admin_get(&gw, path, Some("admin-token-0123456780")).await;
        assert_eq!(status, 401, "{path}: wrong token");
        let (status, text) = admin_get(&gw, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    // Liveness stays open for probes.
    let (status, _) = admin_get(&gw, "/healthz", None).await;
    assert_eq!(status, 200);
    // The proxy's own token is not the admin token.
    let (status, _) = admin_get(&gw, "/api/status", Some(common::TOKEN)).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn without_admin_token_a_loopback_admin_api_is_open() {
    let gw = TestGateway::start(&common::config_text(""))
        .await
        .with_admin()
        .await;
    let (status, text) = admin_get(&gw, "/api/limits", None).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"accounts\""), "{text}");
}

#[test]
fn exposing_admin_or_an_open_proxy_is_a_config_error_naming_the_key() {
    let token = "[[token]]\nname = \"t\"\nsecret = \"long-enough\"\n";
    let cases = [
        (
            format!("[gateway]\nadmin_listen = \"0.0.0.0:8081\"\n{token}"),
            "gateway.admin_token",
        ),
        (
            format!("[gateway]\nadmin_listen = \"[::]:8081\"\nadmin_token = \"short\"\n{token}"),
            "gateway.admin_token",
        ),
        (
            "[gateway]\nadmin_token = \"short\"\n".to_owned(),
            "gateway.admin_token",
        ),
        (
            "[gateway]\nlisten = \"0.0.0.0:8080\"\n".to_owned(),
            "gateway.listen",
        ),
        (
            "[gateway]\nlisten = \"192.0.2.1:8080\"\n".to_owned(),
            "gateway.listen",
        ),
    ];
    for (text, key) in &cases {
        let err = GatewayConfig::from_toml(text, "g.toml").unwrap_err();
        assert_eq!(err.key(), Some(*key), "{err}");
        assert!(!err.to_string().contains("long-enough"), "{err}");
    }
    // What the errors ask for is accepted.
    let ok = [
        format!(
            "[gateway]\nadmin_listen = \"0.0.0.0:8081\"\nadmin_token = \"{ADMIN_TOKEN}\"\n{token}"
        ),
        "[gateway]\nlisten = \"0.0.0.0:8080\"\nopen_proxy = true\n".to_owned(),
        format!("[gateway]\nlisten = \"0.0.0.0:8080\"\n{token}"),
        "[gateway]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8081\"\n".to_owned(),
    ];
    for text in &ok {
        GatewayConfig::from_toml(text, "g.toml").unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

#[test]
fn check_flag_names_the_key_of_an_unsafe_config() {
    let bin = env!("CARGO_BIN_EXE_ipsx");
    for (fixture, key) in [
        ("admin-public-no-token.toml", "gateway.admin_token"),
        ("open-proxy-public.toml", "gateway.listen"),
        ("account-unknown-token.toml", "account[0].token"),
    ] {
        let path = workspace().join("tests/fixtures/bad-gateway").join(fixture);
        let out = Command::new(bin)
            .args(["gateway", "--check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{fixture}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(fixture) && err.contains(&format!("key `{key}`")),
            "{fixture}: {err}"
        );
    }
}

// === the web dashboard ===

use std::time::Duration;

use common::market::{MarketOpts, MarketSystem};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A headless Chromium driven over WebDriver (Debian's `chromium` and
/// `chromium-driver`, installed by scripts/install-dashboard.sh).
struct Browser {
    _driver: tokio::process::Child,
    _profile: TempDir,
    base: String,
    http: reqwest::Client,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (scripts/install-dashboard.sh installs chromium-driver)");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if http.get(format!("{root}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile =
            std::env::temp_dir().join(format!("ipsx-chromium-{}-{port}", std::process::id()));
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium (scripts/install-dashboard.sh installs it)");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": { "browser": "ALL" },
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1400,2300",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let r: Value = http
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("new WebDriver session: {r}"))
            .to_owned();
        Self {
            _driver: driver,
            _profile: TempDir(profile),
            base: format!("{root}/session/{session}"),
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        if r["value"].get("error").is_some() {
            panic!("WebDriver {path}: {r}");
        }
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .await
    }

    /// Evaluates `script` until `done` holds for its value (at most `tries` × 250 ms).
    async fn wait_for(&self, script: &str, tries: usize, done: impl Fn(&Value) -> bool) -> Value {
        let mut v = Value::Null;
        for _ in 0..tries {
            v = self.eval(script).await;
            if done(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let page = self
            .eval("return document.getElementById('error')?.textContent")
            .await;
        self.screenshot("dashboard-failed.png").await;
        let errors = self.console_errors().await;
        panic!("{script}: still {v}; page error: {page}; console: {errors:?}");
    }

    /// The browser console's errors since the last call.
    async fn console_errors(&self) -> Vec<String> {
        let logs = self
            .call(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({ "type": "browser" })),
            )
            .await;
        logs.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].to_string())
            .collect()
    }

    /// Saves a screenshot under the test's temp dir, and under docs/ when
    /// `IPSX_SCREENSHOTS=1` (how the README's pictures are made).
    async fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name),
            &bytes,
        )
        .unwrap();
        if std::env::var("IPSX_SCREENSHOTS").is_ok_and(|v| v == "1") {
            std::fs::write(workspace().join("docs").join(name), &bytes).unwrap();
        }
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// With the market renting one DE and one US exit: the pool map shows one marker per
/// rented country; after ten requests the live view shows ten rows on the right
/// exits; the spend chart has points; the config shows no secret; no console error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let mut sys = MarketSystem::start(MarketOpts {
        exits: vec![("127.0.0.2", "de"), ("127.0.0.3", "us")],
        demand: "[[market.demand]]\nname = \"de\"\ntarget = { country = \"de\" }\ncount = 1\n\n[[market.demand]]\nname = \"us\"\ntarget = { country = \"us\" }\ncount = 1\n".into(),
        gateway: false,
        ..MarketOpts::default()
    })
    .await;
    sys.gateway_toml = sys.gateway_toml.replacen(
        "[gateway]\n",
        &format!("[gateway]\nadmin_token = \"{ADMIN_TOKEN}\"\n"),
        1,
    );
    sys.start_gateway().await;
    let market = sys.market().clone();
    sys.gw()
        .gateway
        .set_market_status(std::sync::Arc::new(move || {
            serde_json::to_value(market.status()).unwrap_or_default()
        }));
    let gw = sys.gw.take().unwrap().with_admin().await;
    sys.gw = Some(gw);
    sys.wait_live(2, Duration::from_secs(60)).await;
    let admin = sys.gw().admin_addr();

    // Without the token: 401 for the page, its files and the API alike.
    for path in ["/", "/app.js", "/api/events", "/api/config"] {
        let (status, text) = admin_get(sys.gw(), path, None).await;
        assert_eq!(status, 401, "{path}");
        assert!(text.contains("Basic realm"), "{text}");
    }

    let browser = Browser::start().await;
    browser
        .goto(&format!("http://admin:{ADMIN_TOKEN}@{admin}/"))
        .await;
    let countries = browser
        .wait_for(
            "return [...document.querySelectorAll('#markers circle.marker')].map(c => c.dataset.country).sort()",
            120,
            |v| v.as_array().is_some_and(|a| a.len() == 2),
        )
        .await;
    assert_eq!(countries, json!(["de", "us"]));
    browser
        .wait_for(
            "return Number(document.getElementById('spend-chart').dataset.points || 0) > 0 && !!document.querySelector('#spend-chart canvas') && document.querySelectorAll('#deals tbody tr').length",
            120,
            |v| v.as_u64().is_some_and(|n| n >= 2),
        )
        .await;

    // Ten requests, five per country.
    let exit_country: std::collections::HashMap<String, String> = sys
        .gw()
        .gateway
        .rotator()
        .exits()
        .into_iter()
        .map(|e| {
            let cc = e.attrs.country.map(|c| c.to_string()).unwrap_or_default();
            (e.id.to_string(), cc)
        })
        .collect();
    for i in 0..10 {
        let cc = if i % 2 == 0 { "de" } else { "us" };
        let text = sys.get_as(&format!("acct-country-{cc}")).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
    let rows = browser
        .wait_for(
            "return [...document.querySelectorAll('#requests tbody tr')].map(r => [...r.cells].map(c => c.textContent).concat([r.dataset.exit]))",
            120,
            |v| v.as_array().is_some_and(|a| a.len() >= 10),
        )
        .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 10, "{rows:?}");
    let mut per_country = std::collections::BTreeMap::new();
    for row in rows {
        let exit = row[7].as_str().unwrap();
        assert_eq!(row[1], "acct", "{row}");
        assert_eq!(row[5], "200", "{row}");
        assert!(row[3].as_str().unwrap().starts_with("127.0.0.1:"), "{row}");
        *per_country
            .entry(exit_country.get(exit).cloned().unwrap_or_default())
            .or_insert(0) += 1;
    }
    assert_eq!(
        per_country,
        [("de".to_owned(), 5), ("us".to_owned(), 5)].into()
    );

    // The pool table counts them per exit.
    browser
        .wait_for(
            "return [...document.querySelectorAll('#exits tbody tr')].reduce((n, r) => n + Number(r.cells[6].textContent), 0)",
            60,
            |v| v.as_u64().is_some_and(|n| n >= 10),
        )
        .await;

    // Rules and limits: the config in force, secrets masked.
    let config = browser
        .wait_for(
            "return document.getElementById('config').textContent",
            60,
            |v| v.as_str().is_some_and(|s| s.contains("\"market\"")),
        )
        .await;
    let config = config.as_str().unwrap();
    assert!(config.contains("***"));
    let key = common::market::hex_key(&sys.anvil.key(common::market::REQUESTER));
    for secret in [ADMIN_TOKEN, common::TOKEN, key.as_str()] {
        assert!(!config.contains(secret), "config shows a secret");
    }
    browser.screenshot("dashboard-gateway.png").await;
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // The provider's earnings page on its status listener (the harness's agents have
    // no status token; the token check is the gateway's, tested above).
    let status = sys.agents[0].status_addr().expect("status listener");
    browser.goto(&format!("http://{status}/")).await;
    let deals = browser
        .wait_for(
            "return Number(document.getElementById('earnings-chart').dataset.points || 0) > 1 && !!document.querySelector('#earnings-chart canvas') && [...document.querySelectorAll('#deals tbody tr')].map(r => r.cells[3].textContent)",
            120,
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
        )
        .await;
    assert!(
        deals.as_array().unwrap().iter().any(|s| s == "serving"),
        "{deals}"
    );
    let cards = browser
        .eval("return document.getElementById('cards').textContent")
        .await;
    let cards = cards.as_str().unwrap_or_default();
    assert!(
        cards.contains("NAT path") && cards.contains("direct"),
        "{cards}"
    );
    browser.screenshot("dashboard-provider.png").await;
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    browser.quit().await;
    sys.stop().await;
}

/// Sends raw bytes to the admin listener and returns what comes back first.
async fn admin_raw(gw: &TestGateway, request: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.admin_addr()).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .map_or(0, |r| r.unwrap_or(0));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn token_gateway_config() -> String {
    common::config_text("").replacen(
        "[gateway]\n",
        &format!("[gateway]\nadmin_token = \"{ADMIN_TOKEN}\"\n"),
        1,
    )
}

#[tokio::test]
async fn dashboard_refuses_bad_tokens_traversal_and_oversize() {
    let gw = TestGateway::start(&token_gateway_config())
        .await
        .with_admin()
        .await;
    use base64::Engine as _;
    let basic = |user: &str, pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    for auth in [
        basic("admin", "admin-token-0123456780"),
        basic(ADMIN_TOKEN, ""),
        "Basic !!notbase64".to_owned(),
        format!("Digest {ADMIN_TOKEN}"),
        format!("Bearer {ADMIN_TOKEN}x"),
    ] {
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n");
        let text = admin_raw(&gw, req.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 401"), "{auth}: {text}");
    }
    let ok = basic("anyone", ADMIN_TOKEN);
    let text = admin_raw(
        &gw,
        format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {ok}\r\n\r\n").as_bytes(),
    )
    .await;
    // 200 with the page, or 503 naming the build step when the binary has none.
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("text/html")
            || text.starts_with("HTTP/1.1 503") && text.contains("install-dashboard.sh"),
        "{text}"
    );
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/.gitignore",
        "/app.js/../../Cargo.toml",
        "/dist/index.html",
        "//etc/passwd",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        );
        let text = admin_raw(&gw, req.as_bytes()).await;
        assert!(
            text.starts_with("HTTP/1.1 404") || text.starts_with("HTTP/1.1 400"),
            "{path}: {text}"
        );
    }
    // A head past 16 KiB is refused, not served.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let text = admin_raw(&gw, big.as_bytes()).await;
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
}

/// Opens `GET /api/events` and returns the stream once its head arrived.
async fn open_events(gw: &TestGateway, recv_buffer: Option<u32>) -> (TcpStream, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut s = socket.connect(gw.admin_addr()).await.unwrap();
    s.write_all(
        format!(
            "GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_caps_listeners_and_drops_slow_ones() {
    let echo = common::Echo::start().await;
    let gw = TestGateway::start(&token_gateway_config())
        .await
        .with_admin()
        .await;
    let max = ipsx_gateway::events::MAX_SUBSCRIBERS;
    // A reading client sees a real request: account, host, exit, never the query.
    let (mut reader, head) = open_events(&gw, None).await;
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"),
        "{head}"
    );
    let url = format!("http://{}/ip?key=hunter2", echo.addr);
    let out = common::curl(&["-s", "-x", &gw.proxy("shop-country-fr"), &url]).await;
    assert!(out.status.success());
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: request") {
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buf))
            .await
            .expect("an event")
            .unwrap();
        assert!(n > 0, "stream ended");
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.contains("\"account\":\"shop\"") && seen.contains("\"exit\":\"fr-6\""),
        "{seen}"
    );
    assert!(
        !seen.contains("hunter2") && !seen.contains(common::TOKEN),
        "{seen}"
    );
    let (_, recent) = admin_get(&gw, "/api/requests", Some(ADMIN_TOKEN)).await;
    assert!(
        recent.contains("\"status\": 200") && !recent.contains("hunter2"),
        "{recent}"
    );

    // The cap: `max` listeners, then 503.
    let mut slow = Vec::new();
    for _ in 1..max {
        let (s, head) = open_events(&gw, Some(4096)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        slow.push(s);
    }
    let (_s, head) = open_events(&gw, None).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(gw.gateway.request_log().subscribers(), max);

    // Nobody reads: a flood of events drops every listener, and their slots come back.
    let log = gw.gateway.request_log();
    for i in 0..20_000 {
        log.record(
            "flood",
            "http",
            "example.test:80",
            Some("fr-6"),
            200,
            Duration::ZERO,
        );
        if i % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..100 {
        if log.subscribers() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log.subscribers(), 0, "slow listeners dropped");
    let (_s, head) = open_events(&gw, None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop((slow, reader));
}
