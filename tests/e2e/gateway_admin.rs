//! Admin and open-proxy safety: the admin API's bearer token, and configs that would
//! expose the admin API or an open proxy are refused, naming the key (also through
//! `ipsx gateway --check`).
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
