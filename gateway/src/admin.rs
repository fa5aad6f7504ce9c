//! The admin listener: Prometheus `/metrics` and a small JSON API.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /api/status` | generation, open connections, requests, last reload error |
//! | `GET /api/exits` | every exit: attributes, transport, health, load, latency, bans |
//! | `GET /api/sessions` | sticky sessions and their remaining lifetime |
//! | `GET /api/limits` | the rate limits in force, defaults and per rule and token |
//! | `GET /api/market` | rented exits: deals, spend, demand groups, refusals |
//! | `POST /api/reload` | re-read the config file now; lists changed keys that need a restart (`listen`, `admin_listen`, `market`) |
//!
//! With `gateway.admin_token` set, every route but `/healthz` needs
//! `Authorization: Bearer TOKEN` (Prometheus: `authorization: { credentials: TOKEN }`);
//! without it or with another token the answer is `401` with `WWW-Authenticate: Bearer`.
//! The token is required when `admin_listen` is not loopback (a config error otherwise).

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::Gateway;

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
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gateway.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let gw = gw.clone();
                        async move { Ok::<_, Infallible>(route(&gw, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(64 * 1024)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// True when the request may use the admin API: no `admin_token` is configured, or
/// it carries `Authorization: Bearer <admin_token>` (compared in constant time).
pub fn admin_authorized(admin_token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    let Some(expected) = admin_token else {
        return true;
    };
    let Some(value) = authorization else {
        return false;
    };
    let Some((scheme, token)) = value
        .iter()
        .position(|b| *b == b' ')
        .map(|i| (&value[..i], &value[i + 1..]))
    else {
        return false;
    };
    let token = token.trim_ascii();
    scheme.eq_ignore_ascii_case(b"bearer") && bool::from(expected.as_bytes().ct_eq(token))
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = json_response(
        StatusCode::UNAUTHORIZED,
        json!({ "error": "admin API: missing or wrong bearer token (gateway.admin_token)" }),
    );
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"ipsx-admin\""),
    );
    r
}

async fn route(gw: &Gateway, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        (&Method::GET, "/metrics") => {
            let text = prometheus().map(|h| h.render()).unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(text)));
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
            }),
        ),
        (&Method::GET, "/api/exits") => {
            let exits: Vec<serde_json::Value> = gw
                .rotator()
                .exits()
                .into_iter()
                .map(|snap| {
                    let transport = rt
                        .exits
                        .get(&snap.id)
                        .map(|e| format!("{:?}", e.config.transport));
                    let mut v = serde_json::to_value(&snap).unwrap_or_default();
                    if let Some(obj) = v.as_object_mut() {
                        obj.insert("transport".into(), json!(transport));
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

#[cfg(test)]
mod tests {
    use super::admin_authorized;

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
    }
}
