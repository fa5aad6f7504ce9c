//! The commercial username dialects through the real gateway, with real clients (curl,
//! Python requests): Bright Data, Oxylabs, Decodo and IPRoyal credentials reach a
//! local echo target through local exits, and country/city targeting and sticky
//! sessions take effect. Also: accounts and tokens hold connection slots per request.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use crate::common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Echo, TOKEN, TestGateway, base64, curl, curl_many, python, response_complete};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The test config with cities on some exits: de-2 Berlin, de-3 Munich, us-4 New York.
fn config(extra: &str) -> String {
    let mut text = common::config_text("");
    for (name, city) in [("de-2", "berlin"), ("de-3", "munich"), ("us-4", "new york")] {
        let exit = format!("name = \"{name}\"\n");
        text = text.replacen(&exit, &format!("{exit}city = \"{city}\"\n"), 1);
    }
    text.push_str(extra);
    text
}

/// `n` fetches of the echo URL in one curl run with `-U user:pass`; the exit IPs seen.
async fn fetch(
    gw: &TestGateway,
    scheme: &str,
    user: &str,
    pass: &str,
    url: &str,
    n: usize,
) -> Vec<String> {
    let proxy = format!("{scheme}://{}", gw.addr);
    let creds = format!("{user}:{pass}");
    curl_many(&["-x", &proxy, "-U", &creds], url, n).await
}

fn distinct(ips: &[String]) -> HashSet<&str> {
    ips.iter().map(String::as_str).collect()
}

const DE: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

#[tokio::test]
async fn bright_data_country_and_session() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    let user = "brd-customer-hl_1234-zone-residential-country-de";
    let ips = fetch(&gw, "http", user, TOKEN, &echo.url(), 20).await;
    assert!(ips.iter().all(|ip| DE.contains(&ip.as_str())), "{ips:?}");
    assert_eq!(
        distinct(&ips).len(),
        2,
        "no session: both DE exits: {ips:?}"
    );
    let user = "brd-customer-hl_1234-zone-residential-country-de-session-abc123";
    let ips = fetch(&gw, "http", user, TOKEN, &echo.url(), 20).await;
    assert_eq!(distinct(&ips).len(), 1, "{ips:?}");
    assert!(DE.contains(&ips[0].as_str()));
    // The legacy `lum-` prefix, over SOCKS5 (one connection per fetch).
    let user = "lum-customer-hl_1234-zone-residential-country-de-session-abc123";
    let again = fetch(&gw, "socks5h", user, TOKEN, &echo.url(), 5).await;
    assert_eq!(distinct(&again), distinct(&ips), "same session, same exit");
}

#[tokio::test]
async fn oxylabs_city_and_session() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    let user = "customer-USER-cc-DE-city-berlin-sessid-abc123-sesstime-5";
    let ips = fetch(&gw, "http", user, TOKEN, &echo.url(), 10).await;
    assert_eq!(distinct(&ips), HashSet::from(["127.0.0.2"]));
    let ips = fetch(
        &gw,
        "socks5h",
        "customer-USER-cc-US",
        TOKEN,
        &echo.url(),
        10,
    )
    .await;
    assert!(
        ips.iter().all(|ip| ip == "127.0.0.4" || ip == "127.0.0.5"),
        "{ips:?}"
    );
}

#[tokio::test]
async fn decodo_city_and_session() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    let user = "user-USER-country-us-city-new_york-session-abc-sessionduration-30";
    let ips = fetch(&gw, "http", user, TOKEN, &echo.url(), 10).await;
    assert_eq!(distinct(&ips), HashSet::from(["127.0.0.4"]));
    let sessions = gw.gateway.rotator().sessions();
    let text = serde_json::to_string(&sessions).unwrap();
    assert!(text.contains("abc"), "{text}");
}

#[tokio::test]
async fn iproyal_targeting_in_the_password() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    let pass = format!("{TOKEN}_country-de_session-AbCd1234_lifetime-30m");
    let ips = fetch(&gw, "http", "USER", &pass, &echo.url(), 20).await;
    assert_eq!(distinct(&ips).len(), 1, "{ips:?}");
    assert!(DE.contains(&ips[0].as_str()));
    // A wrong token before the targeting is refused as credentials, not as targeting.
    let out = curl(&[
        "-i",
        "-x",
        &format!("http://{}", gw.addr),
        "-U",
        "USER:wrong-token_country-de",
        &echo.url(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 407"), "{text}");
    // An unknown key in the password is a 400 naming it.
    let out = curl(&[
        "-i",
        "-x",
        &format!("http://{}", gw.addr),
        "-U",
        &format!("USER:{TOKEN}_country-de_streaming-1"),
        &echo.url(),
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("`streaming`"),
        "{text}"
    );
}

#[tokio::test]
async fn keys_we_cannot_honour_are_refused_by_name() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    for (user, key) in [
        ("brd-customer-hl_1234-zone-residential-zip-10115", "zip"),
        ("customer-USER-postalcode-10115", "postalcode"),
        ("user-USER-continent-eu", "continent"),
    ] {
        let out = curl(&["-i", "-x", &gw.proxy(user), &echo.url()]).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("HTTP/1.1 400") && text.contains(&format!("`{key}`")),
            "{user}: {text}"
        );
    }
}

#[tokio::test]
async fn python_requests_with_each_dialect() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    let code = r#"
import sys, requests
url, addr, token = sys.argv[1], sys.argv[2], sys.argv[3]
creds = [
    ("http", "brd-customer-hl_1234-zone-residential-country-de-session-py1", token),
    ("socks5h", "customer-USER-cc-DE-city-berlin", token),
    ("http", "user-USER-country-us-city-new_york", token),
    ("socks5h", "USER", token + "_country-de_session-Py123456_lifetime-10m"),
]
for scheme, user, password in creds:
    proxy = f"{scheme}://{user}:{password}@{addr}"
    ips = set()
    for i in range(4):
        r = requests.get(url, proxies={"http": proxy}, timeout=20)
        r.raise_for_status()
        ips.add(r.json()["ip"])
    print(user, ",".join(sorted(ips)))
"#;
    let out = python(code, &[&echo.url(), &gw.addr.to_string(), TOKEN]).await;
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let ips = |i: usize| lines[i].split_whitespace().nth(1).unwrap_or("");
    assert!(DE.contains(&ips(0)), "session: one DE exit: {text}");
    assert_eq!(ips(1), "127.0.0.2", "{text}");
    assert_eq!(ips(2), "127.0.0.4", "{text}");
    assert!(DE.contains(&ips(3)), "session: one DE exit: {text}");
}

// === connection slots: counted per request ===

/// One keep-alive request on `stream`; returns the response head and body.
async fn request(stream: &mut TcpStream, echo: SocketAddr, user: &str, pass: &str) -> String {
    let auth = base64(format!("{user}:{pass}").as_bytes());
    let req = format!(
        "GET http://{echo}/ip HTTP/1.1\r\nHost: {echo}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("response before the timeout")
            .unwrap();
        out.extend_from_slice(&buf[..n]);
        if n == 0 || response_complete(&out) {
            return String::from_utf8_lossy(&out).into_owned();
        }
    }
}

const LIMITED: &str = "[[token]]\nname = \"limited\"\nsecret = \"limited-secret\"\nmax_connections = 1\n\n[[account]]\nname = \"solo\"\nmax_connections = 1\n\n";

#[tokio::test]
async fn a_keep_alive_connection_switching_token_takes_the_new_tokens_slot() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config(LIMITED)).await;
    // Connection 1 holds the only slot of token `limited`.
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut first, echo.addr, "acct", "limited-secret").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Connection 2 starts with the other token, then switches to `limited`: refused.
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut second, echo.addr, "acct", TOKEN).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = request(&mut second, echo.addr, "acct", "limited-secret").await;
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("token `limited`"),
        "{r}"
    );
    // Connection 1 keeps working with its own slot.
    let r = request(&mut first, echo.addr, "acct", "limited-secret").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn an_account_is_limited_to_its_connections_across_tokens() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config(LIMITED)).await;
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut first, echo.addr, "solo-country-de", TOKEN).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The same account in another dialect, on another connection: over its limit.
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut second, echo.addr, "user-solo-country-de", TOKEN).await;
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("account `solo`"),
        "{r}"
    );
    // Other accounts are not limited by it.
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut third, echo.addr, "other", TOKEN).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn account_rate_limits_and_token_binding() {
    let echo = Echo::start().await;
    let extra = "[[token]]\nname = \"second\"\nsecret = \"second-secret\"\n\n[[account]]\nname = \"hl_1234/residential\"\ntoken = \"tester\"\nrate = \"2/min\"\n\n[limits]\non_limit = \"reject\"\n\n";
    let gw = TestGateway::start(&config(extra)).await;
    let user = "brd-customer-hl_1234-zone-residential";
    let mut conn = TcpStream::connect(gw.addr).await.unwrap();
    for _ in 0..2 {
        let r = request(&mut conn, echo.addr, user, TOKEN).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let r = request(&mut conn, echo.addr, user, TOKEN).await;
    assert!(
        r.starts_with("HTTP/1.1 429") && r.contains("account"),
        "{r}"
    );
    // Another zone of the same customer is another account.
    let r = request(&mut conn, echo.addr, "brd-customer-hl_1234-zone-isp", TOKEN).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // The account is bound to token `tester`: another token cannot use it.
    let mut other = TcpStream::connect(gw.addr).await.unwrap();
    let r = request(&mut other, echo.addr, user, "second-secret").await;
    assert!(r.starts_with("HTTP/1.1 407"), "{r}");
}

#[tokio::test]
async fn accounts_of_one_token_never_share_a_session() {
    let echo = Echo::start().await;
    let gw = TestGateway::start(&config("")).await;
    for user in [
        "brd-customer-hl_1234-zone-residential-session-same",
        "brd-customer-hl_1234-zone-isp-session-same",
        "customer-alice-sessid-same",
        "customer-alice-sessid-same",
    ] {
        let ips = fetch(&gw, "http", user, TOKEN, &echo.url(), 1).await;
        assert_eq!(ips.len(), 1);
    }
    // Three accounts (two zones, one Oxylabs user used twice): three sessions.
    assert_eq!(gw.gateway.rotator().sessions().len(), 3);
}
