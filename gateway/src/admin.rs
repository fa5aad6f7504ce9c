//! The admin listener: the web dashboard, Prometheus `/metrics` and a small JSON API.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /` | the web dashboard (pool map, spend, live requests, rules); its files by name (`/app.js`, `/style.css`) |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/status` | generation, open connections, requests, last reload error |
//! | `GET /api/exits` | every exit: attributes, transport, NAT `path` of a rented exit (`direct`, `punched`, `relayed`), health, load, latency, bans |
//! | `GET /api/sessions` | sticky sessions and their remaining lifetime |
//! | `GET /api/limits` | the rate limits in force, defaults and per rule and token |
//! | `GET /api/market` | rented exits: deals, spend, demand groups, refusals |
//! | `GET /api/spend` | the market's spend sampled over time, with the budget caps |
//! | `GET /api/config` | the config in force, secrets masked |
//! | `GET /api/requests` | the last requests (account, target host, exit, status, latency) |
//! | `GET /api/events` | the same, live, as server-sent events (`event: request`) |
//! | `POST /api/reload` | re-read the config file now; lists changed keys that need a restart (`listen`, `admin_listen`, `market`) |
//!
//! With `gateway.admin_token` set, every route but `/healthz` needs
//! `Authorization: Bearer TOKEN` (Prometheus: `authorization: { credentials: TOKEN }`),
//! or, for a browser, HTTP Basic with the token as the password (any user name);
//! without it or with another token the answer is `401` with `WWW-Authenticate: Bearer`
//! and `Basic` challenges. The token is required when `admin_listen` is not loopback
//! (a config error otherwise).

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::net::TcpListener;

use crate::Gateway;
use crate::dashboard::{EventStream, SpendHistory, WRITE_DEADLINE, WriteDeadline};

/// The admin API's response body: a whole body, or an event stream.
pub type AdminBody = BoxBody<Bytes, Infallible>;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later calls reuse it.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// Serves the admin API on a bound listener until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let _ = prometheus();
    let spend = Arc::new(SpendHistory::default());
    // Dropped on return: the sampler stops with the listener.
    let (_stop_sampler, stop) = tokio::sync::oneshot::channel();
    tokio::spawn(crate::dashboard::sample_spend(
        gateway.clone(),
        spend.clone(),
        stop,
    ));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gateway.clone();
                let spend = spend.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let gw = gw.clone();
                        let spend = spend.clone();
                        async move { Ok::<_, Infallible>(route(&gw, &spend, req).await) }
                    });
                    let io = WriteDeadline::new(stream, WRITE_DEADLINE);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}

fn full(body: impl Into<Bytes>) -> AdminBody {
    Full::new(body.into()).boxed()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<AdminBody> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// True when the request may use the admin API: no `admin_token` is configured, or
/// it carries `Authorization: Bearer <admin_token>`, or `Authorization: Basic` with
/// `<admin_token>` as the password and any user name (a browser's login prompt).
/// Compared in constant time.
pub fn admin_authorized(admin_token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    ipsx_dashboard::authorized(admin_token, authorization)
}

fn unauthorized() -> Response<AdminBody> {
    let mut r = json_response(
        StatusCode::UNAUTHORIZED,
        json!({ "error": "admin API: missing or wrong bearer token (gateway.admin_token)" }),
    );
    for challenge in ["Bearer realm=\"ipsx-admin\"", "Basic realm=\"ipsx-admin\""] {
        r.headers_mut().append(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(challenge),
        );
    }
    r
}

/// An embedded dashboard file, or why there is none (`503` naming the missing build
/// step, `404`).
fn asset_response(path: &str) -> Response<AdminBody> {
    let (status, content_type, body): (_, &'static str, Bytes) = match ipsx_dashboard::asset(path) {
        Ok(a) => (StatusCode::OK, a.content_type, Bytes::from_static(a.body)),
        Err(ipsx_dashboard::Missing::NotBuilt) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/html; charset=utf-8",
            Bytes::from_static(ipsx_dashboard::NOT_BUILT_PAGE.as_bytes()),
        ),
        Err(ipsx_dashboard::Missing::NotFound) => {
            return json_response(StatusCode::NOT_FOUND, json!({ "error": "no such route" }));
        }
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

/// `GET /api/events`: the live request stream, or `503` when
/// [`crate::events::MAX_SUBSCRIBERS`] clients are listening.
fn events_response(gw: &Gateway) -> Response<AdminBody> {
    let Some(sub) = gw.request_log().subscribe() else {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": format!("at most {} event-stream clients at once", crate::events::MAX_SUBSCRIBERS) }),
        );
    };
    let mut r = Response::new(EventStream::start(sub).boxed());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

/// Largest request head (target and headers) the admin listener answers; larger ones
/// get `431`.
pub const MAX_ADMIN_HEAD: usize = 16 * 1024;

fn head_size<B>(req: &Request<B>) -> usize {
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    headers + req.uri().to_string().len()
}

async fn route(gw: &Gateway, spend: &SpendHistory, req: Request<Incoming>) -> Response<AdminBody> {
    if head_size(&req) > MAX_ADMIN_HEAD {
        return json_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            json!({ "error": format!("request head over {MAX_ADMIN_HEAD} bytes") }),
        );
    }
    let rt = gw.runtime();
    let admin_token = rt.config.listener.admin_token.as_ref().map(|t| t.expose());
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(http::HeaderValue::as_bytes);
    if req.uri().path() != "/healthz" && !admin_authorized(admin_token, authorization) {
        return unauthorized();
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Response::new(full(Bytes::from_static(b"ok\n"))),
        (&Method::GET, "/metrics") => {
            let text = prometheus().map(|h| h.render()).unwrap_or_default();
            let mut r = Response::new(full(text));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/api/status") => json_response(
            StatusCode::OK,
            json!({
                "generation": rt.generation,
                "open_connections": gw.open_connections(),
                "requests_total": gw.requests_total(),
                "exits": rt.exits.len(),
                "last_reload_error": gw.last_reload_error(),
                "udp": gw.udp_stats(),
            }),
        ),
        (&Method::GET, "/api/exits") => {
            let paths = market_paths(gw.market_status());
            let exits: Vec<serde_json::Value> = gw
                .rotator()
                .exits()
                .into_iter()
                .map(|snap| {
                    let transport = rt
                        .exits
                        .get(&snap.id)
                        .map(|e| format!("{:?}", e.config.transport));
                    let path = paths.get(snap.id.as_str()).cloned();
                    let mut v = serde_json::to_value(&snap).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("transport".into(), json!(transport));
                        obj.insert("path".into(), json!(path));
                    }
                    v
                })
                .collect();
            json_response(StatusCode::OK, json!({ "exits": exits }))
        }
        (&Method::GET, "/api/sessions") => json_response(
            StatusCode::OK,
            json!({ "sessions": gw.rotator().sessions() }),
        ),
        (&Method::GET, "/api/limits") => {
            let rules: Vec<serde_json::Value> = rt
                .config
                .rules
                .iter()
                .map(|r| json!({ "hosts": r.hosts.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>(), "limits": r.limits }))
                .collect();
            let tokens: Vec<serde_json::Value> = rt
                .config
                .tokens
                .iter()
                .map(|t| {
                    let open = rt.token_conns.get(&t.name).map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
                    json!({ "name": t.name, "rate": t.rate, "max_connections": t.max_connections, "open_connections": open })
                })
                .collect();
            let accounts: Vec<serde_json::Value> = rt
                .config
                .accounts
                .iter()
                .map(|a| {
                    let open = rt.account_conns.get(&a.name).map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
                    json!({ "name": a.name, "token": a.token, "rate": a.rate, "max_connections": a.max_connections, "open_connections": open })
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({ "defaults": rt.config.limits, "rules": rules, "tokens": tokens, "accounts": accounts }),
            )
        }
        (&Method::GET, "/api/market") => match gw.market_status() {
            Some(v) => json_response(StatusCode::OK, v),
            None => json_response(
                StatusCode::NOT_FOUND,
                json!({ "error": "no [market] in the config" }),
            ),
        },
        (&Method::GET, "/api/spend") => json_response(StatusCode::OK, spend.report(gw)),
        (&Method::GET, "/api/config") => {
            json_response(StatusCode::OK, crate::dashboard::masked_config(&rt.config))
        }
        (&Method::GET, "/api/requests") => {
            json_response(StatusCode::OK, crate::dashboard::recent_requests(gw))
        }
        (&Method::GET, "/api/events") => events_response(gw),
        (&Method::GET, path) if !path.starts_with("/api/") => asset_response(path),
        (&Method::POST, "/api/reload") => match gw.reload_report().await {
            Ok(r) => json_response(
                StatusCode::OK,
                json!({ "generation": r.generation, "needs_restart": r.needs_restart }),
            ),
            Err(e) => json_response(StatusCode::UNPROCESSABLE_ENTITY, json!({ "error": e })),
        },
        _ => json_response(StatusCode::NOT_FOUND, json!({ "error": "no such route" })),
    }
}

/// Each rented exit's NAT path (`direct`, `punched`, `relayed`) as its deal recorded
/// it, by exit name, from the market's status (`/api/market` `deals[].exit`/`path`).
fn market_paths(market: Option<serde_json::Value>) -> std::collections::HashMap<String, String> {
    let mut paths = std::collections::HashMap::new();
    let Some(deals) = market
        .as_ref()
        .and_then(|m| m.get("deals"))
        .and_then(|d| d.as_array())
    else {
        return paths;
    };
    for d in deals {
        if let (Some(exit), Some(path)) = (
            d.get("exit").and_then(|v| v.as_str()),
            d.get("path").and_then(|v| v.as_str()),
        ) {
            paths
                .entry(exit.to_owned())
                .or_insert_with(|| path.to_owned());
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::admin_authorized;
    use base64::Engine as _;
    use proptest::prelude::*;

    const TOKEN: &str = "0123456789abcdef";

    proptest! {
        /// Any header value: no panic, and only a value that carries the token (as a
        /// bearer token or a Basic password) is accepted.
        #[test]
        fn only_the_token_opens_the_api(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            if admin_authorized(Some(TOKEN), Some(&value)) {
                let text = String::from_utf8_lossy(&value);
                let (scheme, rest) = text.split_once(' ').unwrap_or_default();
                let carried = if scheme.eq_ignore_ascii_case("basic") {
                    base64::engine::general_purpose::STANDARD
                        .decode(rest.trim())
                        .is_ok_and(|d| d.ends_with(TOKEN.as_bytes()))
                } else {
                    rest.trim() == TOKEN
                };
                prop_assert!(carried, "{text}");
            }
        }

        #[test]
        fn basic_accepts_any_user_with_the_token(user in "[^:]{0,40}") {
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{TOKEN}"))
            );
            prop_assert!(admin_authorized(Some(TOKEN), Some(value.as_bytes())));
            let wrong = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{TOKEN}x"))
            );
            prop_assert!(!admin_authorized(Some(TOKEN), Some(wrong.as_bytes())));
        }
    }

    #[test]
    fn bearer_token_is_required_when_configured() {
        let t = Some("0123456789abcdef");
        assert!(admin_authorized(None, None));
        assert!(admin_authorized(t, Some(b"Bearer 0123456789abcdef")));
        assert!(admin_authorized(t, Some(b"bearer  0123456789abcdef ")));
        assert!(!admin_authorized(t, None));
        assert!(!admin_authorized(t, Some(b"Bearer 0123456789abcdeF")));
        assert!(!admin_authorized(t, Some(b"Basic 0123456789abcdef")));
        assert!(!admin_authorized(t, Some(b"Bearer")));
        assert!(!admin_authorized(t, Some(b"")));
        // A browser's Basic login: any user, the token as the password.
        assert!(admin_authorized(
            t,
            Some(b"Basic YWRtaW46MDEyMzQ1Njc4OWFiY2RlZg==")
        ));
        assert!(admin_authorized(t, Some(b"Basic OjAxMjM0NTY3ODlhYmNkZWY=")));
        assert!(!admin_authorized(
            t,
            Some(b"Basic YWRtaW46MDEyMzQ1Njc4OWFiY2RlRg==")
        ));
        assert!(!admin_authorized(
            t,
            Some(b"Basic MDEyMzQ1Njc4OWFiY2RlZg==")
        ));
        assert!(!admin_authorized(t, Some(b"Basic !!!")));
    }

    #[test]
    fn market_paths_reads_each_rented_exits_path_and_skips_malformed_deals() {
        let m = serde_json::json!({"deals": [
            {"exit": "deal-1", "path": "relayed"},
            {"exit": "deal-2", "path": null},
            {"exit": 7, "path": "direct"},
            {"path": "punched"},
            "garbage",
        ]});
        let p = super::market_paths(Some(m));
        assert_eq!(p.len(), 1);
        assert_eq!(p.get("deal-1").map(String::as_str), Some("relayed"));
        assert!(super::market_paths(None).is_empty());
        assert!(super::market_paths(Some(serde_json::json!({"deals": 3}))).is_empty());
    }
}
