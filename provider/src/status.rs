//! What a provider sees: [`ProviderStatus`] (offers, deals, bytes, earnings, NAT path)
//! built from a running agent, the small HTTP listener serving it (`[status] listen`,
//! `GET /api/status`), the client `ipsx provider status` uses, and the table it prints.
//!
//! Routes: `GET /api/status` (JSON, the shape below), `GET /healthz` (`ok`), whatever
//! the [`ExtraRoutes`] given at start serve (the provider dashboard page), else `404`.
//! With a token configured every route but `/healthz` needs
//! `Authorization: Bearer TOKEN` (`401` otherwise); the token is required when the
//! listener is not on loopback (a config error otherwise), as for the gateway's admin API.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Re-exported so that callers adding [`ExtraRoutes`] need no HTTP crates of their own.
pub use bytes::Bytes;
/// Re-exported (response bodies of [`ExtraRoutes`]).
pub use http_body_util::Full;
use hyper::Request;
use hyper::body::Incoming;
/// Re-exported (requests and responses of [`ExtraRoutes`]).
pub use hyper::{Method, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::agent::Stage;

/// The status JSON's version (`"version"`); bumped when a field changes meaning.
pub const STATUS_VERSION: u32 = 1;

/// Connections the status listener serves at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;
/// Largest request head accepted (bytes); larger ones get `431` and the connection ends.
pub const MAX_HEAD: usize = 16 * 1024;
/// A request head must arrive within this long.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A token amount: base units (a decimal string, since it overflows JSON numbers) and
/// the same in whole tokens (18 decimals, e.g. `"0.0015"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    /// Base units.
    #[serde(with = "ipsx_exchange_client::types::amount")]
    pub base_units: u128,
    /// Whole tokens, decimal.
    pub tokens: String,
}

impl Amount {
    /// `v` base units.
    pub fn new(v: u128) -> Self {
        Self {
            base_units: v,
            tokens: ipsx_chain::format_tokens(alloy_primitives::U256::from(v)),
        }
    }
}

/// One offered exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferStatus {
    /// The exit address sold.
    pub exit_address: IpAddr,
    /// The WireGuard endpoint advertised.
    pub endpoint: SocketAddr,
    /// The exit's WireGuard public key (base64).
    pub public_key: String,
    /// ISO country code.
    pub country: String,
    /// residential, mobile or datacenter.
    #[serde(rename = "type")]
    pub kind: String,
    /// Price per IP-second.
    pub price_per_ip_second: Amount,
    /// Deals served at once.
    pub capacity: u32,
    /// The order in the book now, if any.
    pub order_id: Option<u64>,
    /// Offers posted so far (refreshes included).
    pub offers_posted: u64,
    /// Deals accepted or served on this exit now.
    pub live_deals: u32,
    /// Relayed TCP flows open now.
    pub flows_live: u64,
    /// SYNs refused by the flow caps and the flow rate since start.
    pub flows_limited: u64,
}

/// One deal in view (live ones, and settled ones for ten minutes after their end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealStatus {
    /// Deal id.
    pub id: u64,
    /// The requester's wallet (0x...).
    pub requester: String,
    /// The exit serving it, if it is one of ours.
    pub exit_address: Option<IpAddr>,
    /// `accepted` (waiting for the first proof), `serving`, `ended` or `rejected`.
    pub stage: String,
    /// Accepted or serving.
    pub live: bool,
    /// The deal's start, unix seconds.
    pub started: u64,
    /// The deal's end, unix seconds (moves with extensions).
    pub ends: u64,
    /// Bytes from the requester to destinations.
    pub bytes_up: u64,
    /// Bytes from destinations to the requester.
    pub bytes_down: u64,
    /// Paid: the latest verified balance proof.
    pub paid: Amount,
    /// Claimed on chain.
    pub claimed: Amount,
    /// Paid but not yet claimed.
    pub unclaimed: Amount,
    /// Why service ended, once it did.
    pub end_reason: Option<String>,
}

/// Totals since the agent started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes from requesters to destinations, every exit.
    pub bytes_up: u64,
    /// Bytes from destinations to requesters, every exit.
    pub bytes_down: u64,
    /// Verified payments (balance proofs) received.
    pub earned: Amount,
    /// Claimed on chain.
    pub claimed: Amount,
    /// Earned but not claimed (claims follow at `claim_interval` and at each deal's end).
    pub unclaimed: Amount,
    /// Deals accepted or served now.
    pub live_deals: u64,
}

/// What `GET /api/status` answers (docs/provider.md, "What a provider sees").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStatus {
    /// [`STATUS_VERSION`].
    pub version: u32,
    /// The provider's wallet (0x...).
    pub wallet: String,
    /// How requesters reach this provider: `direct` (a public or forwarded port),
    /// `punched` or `relayed`.
    pub nat_path: String,
    /// When this snapshot was taken, unix milliseconds.
    pub generated_unix_ms: u64,
    /// The offered exits.
    pub offers: Vec<OfferStatus>,
    /// Deals in view, by id.
    pub deals: Vec<DealStatus>,
    /// Totals.
    pub totals: Totals,
}

/// The lowercase name of a stage in the status.
pub fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Accepted => "accepted",
        Stage::Serving => "serving",
        Stage::Ended => "ended",
        Stage::Rejected => "rejected",
    }
}

/// Routes added to the status listener (e.g. the dashboard page at `/`): called with
/// the method and path of a request the listener does not serve itself (after the
/// token check); `None` means `404`.
pub type ExtraRoutes =
    Arc<dyn Fn(&Method, &str) -> Option<Response<Full<Bytes>>> + Send + Sync + 'static>;

/// Builds a fresh status for each request.
pub type StatusSource = Arc<dyn Fn() -> ProviderStatus + Send + Sync + 'static>;

/// True when the request may use the listener: no token configured, or
/// `Authorization: Bearer <token>`, or Basic with the token as the password (a
/// browser opening the earnings page). Compared in constant time.
pub fn authorized(token: Option<&str>, authorization: Option<&[u8]>) -> bool {
    ipsx_dashboard::authorized(token, authorization)
}

/// The provider's earnings page (`/`, with its script and style), for
/// [`crate::Agent::start_with_routes`]; `ipsx provider` serves it. A binary built
/// without the dashboard answers `/` with `503` and a page naming the build step.
pub fn page_routes() -> ExtraRoutes {
    Arc::new(|method, path| {
        if method != Method::GET {
            return None;
        }
        let (status, content_type, body) = match ipsx_dashboard::provider_page(path)? {
            Ok(a) => (StatusCode::OK, a.content_type, a.body),
            Err(ipsx_dashboard::Missing::NotBuilt) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/html; charset=utf-8",
                ipsx_dashboard::NOT_BUILT_PAGE.as_bytes(),
            ),
            Err(ipsx_dashboard::Missing::NotFound) => return None,
        };
        let mut r = Response::new(Full::new(Bytes::from_static(body)));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        h.insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-cache"),
        );
        h.insert(
            hyper::header::CONTENT_SECURITY_POLICY,
            hyper::header::HeaderValue::from_static(
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        );
        Some(r)
    })
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": msg })).unwrap_or_default();
    json(status, body)
}

/// Answers one request (no I/O besides building the status).
pub fn route(
    source: &StatusSource,
    token: Option<&str>,
    extra: Option<&ExtraRoutes>,
    method: &Method,
    path: &str,
    authorization: Option<&[u8]>,
) -> Response<Full<Bytes>> {
    if path == "/healthz" && method == Method::GET {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    if !authorized(token, authorization) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "status API: missing or wrong bearer token (status.token)",
        );
        for challenge in [
            "Bearer realm=\"ipsx-provider\"",
            "Basic realm=\"ipsx-provider\"",
        ] {
            r.headers_mut().append(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static(challenge),
            );
        }
        return r;
    }
    if path == "/api/status" {
        if method != Method::GET {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET"),
            );
            return r;
        }
        let body = serde_json::to_vec_pretty(&source()).unwrap_or_default();
        return json(StatusCode::OK, body);
    }
    if let Some(r) = extra.and_then(|f| f(method, path)) {
        return r;
    }
    error(StatusCode::NOT_FOUND, "no such route (try GET /api/status)")
}

/// Serves the status listener until `shutdown` completes. `open` routes are asked
/// first, with the request's path and query, and need no token (they authenticate
/// their requests themselves: the connection log's signed requests).
pub async fn serve(
    listener: TcpListener,
    source: StatusSource,
    token: Option<String>,
    extra: Option<ExtraRoutes>,
    open: Option<ExtraRoutes>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let token: Option<Arc<str>> = token.map(Arc::from);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let (source, token, extra, open) =
            (source.clone(), token.clone(), extra.clone(), open.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let target = req.uri().path_and_query().map_or("", |p| p.as_str());
                if let Some(r) = open.as_ref().and_then(|f| f(req.method(), target)) {
                    return std::future::ready(Ok::<_, Infallible>(r));
                }
                let auth = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .map(|v| v.as_bytes().to_vec());
                let r = route(
                    &source,
                    token.as_deref(),
                    extra.as_ref(),
                    req.method(),
                    req.uri().path(),
                    auth.as_deref(),
                );
                std::future::ready(Ok::<_, Infallible>(r))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Fetches `GET {base}/api/status` (base: `http://host:port`), with the bearer token
/// if one is given; errors say what failed (connection, status code, JSON).
pub async fn fetch(base: &str, token: Option<&str>) -> Result<ProviderStatus, String> {
    let base = base.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        return Err(format!("`{base}` is not an http:// URL"));
    }
    let url = format!("{base}/api/status");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = client.get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let code = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
    if !code.is_success() {
        return Err(format!(
            "{url}: HTTP {code}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not a provider status: {e}"))
}

fn bytes_h(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(s: &str) -> String {
    if s.len() > 12 && s.is_ascii() {
        format!("{}..{}", &s[..6], &s[s.len() - 4..])
    } else {
        s.to_owned()
    }
}

/// The readable table `ipsx provider status` prints.
pub fn render(s: &ProviderStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let t = &s.totals;
    let _ = writeln!(o, "provider {}   nat path: {}", s.wallet, s.nat_path);
    let _ = writeln!(
        o,
        "earned {} IPSX   claimed {}   unclaimed {}   served {} up / {} down   live deals {}",
        t.earned.tokens,
        t.claimed.tokens,
        t.unclaimed.tokens,
        bytes_h(t.bytes_up),
        bytes_h(t.bytes_down),
        t.live_deals
    );
    let _ = writeln!(o, "\nOFFERS");
    let _ = writeln!(
        o,
        "{:<16} {:<22} {:<4} {:<12} {:>14} {:>9} {:>8} {:>6} {:>8}",
        "EXIT", "ENDPOINT", "CC", "TYPE", "PRICE/IP-S", "ORDER", "DEALS", "FLOWS", "LIMITED"
    );
    for x in &s.offers {
        let _ = writeln!(
            o,
            "{:<16} {:<22} {:<4} {:<12} {:>14} {:>9} {:>8} {:>6} {:>8}",
            x.exit_address.to_string(),
            x.endpoint.to_string(),
            x.country,
            x.kind,
            x.price_per_ip_second.tokens,
            x.order_id.map_or_else(|| "-".into(), |i| i.to_string()),
            format!("{}/{}", x.live_deals, x.capacity),
            x.flows_live,
            x.flows_limited
        );
    }
    let _ = writeln!(o, "\nDEALS");
    if s.deals.is_empty() {
        let _ = writeln!(o, "(none)");
        return o;
    }
    let _ = writeln!(
        o,
        "{:>6} {:<14} {:<16} {:<9} {:>11} {:>11} {:>10} {:>10} {:>22} {:>22}",
        "ID", "REQUESTER", "EXIT", "STAGE", "STARTED", "ENDS", "UP", "DOWN", "PAID", "UNCLAIMED"
    );
    let now = s.generated_unix_ms / 1000;
    for d in &s.deals {
        let _ = writeln!(
            o,
            "{:>6} {:<14} {:<16} {:<9} {:>11} {:>11} {:>10} {:>10} {:>22} {:>22}",
            d.id,
            short(&d.requester),
            d.exit_address.map_or_else(|| "-".into(), |a| a.to_string()),
            d.stage,
            relative(d.started, now),
            relative(d.ends, now),
            bytes_h(d.bytes_up),
            bytes_h(d.bytes_down),
            d.paid.tokens,
            d.unclaimed.tokens
        );
    }
    o
}

/// `at` (unix seconds) against `now`, for a table: `3m12s ago`, `in 6m48s`, `now`.
fn relative(at: u64, now: u64) -> String {
    let span = |s: u64| {
        let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
        match (h, m) {
            (0, 0) => format!("{s}s"),
            (0, _) => format!("{m}m{s:02}s"),
            _ => format!("{h}h{m:02}m"),
        }
    };
    match at.cmp(&now) {
        std::cmp::Ordering::Less => format!("{} ago", span(now - at)),
        std::cmp::Ordering::Greater => format!("in {}", span(at - now)),
        std::cmp::Ordering::Equal => "now".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn times_show_relative_to_the_status() {
        assert_eq!(super::relative(100, 100), "now");
        assert_eq!(super::relative(88, 100), "12s ago");
        assert_eq!(super::relative(100 + 408, 100), "in 6m48s");
        assert_eq!(super::relative(0, 7_500), "2h05m ago");
        assert!(super::relative(u64::MAX, 0).starts_with("in "));
    }

    use super::*;

    fn sample() -> ProviderStatus {
        ProviderStatus {
            version: STATUS_VERSION,
            wallet: "0x70997970C51812dc3A010C7d01b50e0d17dc79C8".into(),
            nat_path: "direct".into(),
            generated_unix_ms: 1,
            offers: vec![OfferStatus {
                exit_address: "127.0.0.2".parse().unwrap(),
                endpoint: "127.0.0.2:51820".parse().unwrap(),
                public_key: "k".into(),
                country: "de".into(),
                kind: "residential".into(),
                price_per_ip_second: Amount::new(1_000_000_000_000),
                capacity: 2,
                order_id: Some(7),
                offers_posted: 1,
                live_deals: 1,
                flows_live: 3,
                flows_limited: 0,
            }],
            deals: vec![DealStatus {
                id: 9,
                requester: "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC".into(),
                exit_address: Some("127.0.0.2".parse().unwrap()),
                stage: "serving".into(),
                live: true,
                started: 100,
                ends: 160,
                bytes_up: 2048,
                bytes_down: 10,
                paid: Amount::new(u128::MAX),
                claimed: Amount::new(0),
                unclaimed: Amount::new(u128::MAX),
                end_reason: None,
            }],
            totals: Totals {
                bytes_up: 2048,
                bytes_down: 10,
                earned: Amount::new(1_500_000_000_000_000_000),
                claimed: Amount::new(0),
                unclaimed: Amount::new(1_500_000_000_000_000_000),
                live_deals: 1,
            },
        }
    }

    #[test]
    fn json_round_trips_with_amounts_as_strings() {
        let s = sample();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["totals"]["earned"]["base_units"], "1500000000000000000");
        assert_eq!(v["totals"]["earned"]["tokens"], "1.5");
        assert_eq!(v["offers"][0]["type"], "residential");
        assert_eq!(
            v["deals"][0]["paid"]["base_units"],
            u128::MAX.to_string().as_str()
        );
        let back: ProviderStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
        let table = render(&s);
        assert!(table.contains("nat path: direct"), "{table}");
        assert!(table.contains("2.0 KiB"), "{table}");
        assert!(table.contains("1.5"), "{table}");
    }

    #[test]
    fn routes_and_tokens() {
        let src: StatusSource = Arc::new(sample);
        let get = Method::GET;
        let r = route(&src, None, None, &get, "/api/status", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            route(&src, None, None, &get, "/nope", None).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&src, None, None, &Method::POST, "/api/status", None).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let tok = Some("0123456789abcdef");
        assert_eq!(
            route(&src, tok, None, &get, "/api/status", None).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            route(&src, tok, None, &get, "/api/status", Some(b"Bearer wrong")).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            route(
                &src,
                tok,
                None,
                &get,
                "/api/status",
                Some(b"bearer 0123456789abcdef")
            )
            .status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&src, tok, None, &get, "/healthz", None).status(),
            StatusCode::OK
        );
        let extra: ExtraRoutes = Arc::new(|m, p| {
            (m == Method::GET && p == "/").then(|| Response::new(Full::new(Bytes::from("page"))))
        });
        assert_eq!(
            route(&src, None, Some(&extra), &get, "/", None).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&src, tok, Some(&extra), &get, "/", None).status(),
            StatusCode::UNAUTHORIZED,
            "extra routes sit behind the token too"
        );
    }

    proptest::proptest! {
        #[test]
        fn authorization_parsing_is_total(h in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let ok = authorized(Some("0123456789abcdef"), Some(&h));
            let expect = h.len() > 7 && h[..6].eq_ignore_ascii_case(b"bearer") && h[6] == b' ' && h[7..].trim_ascii() == b"0123456789abcdef";
            proptest::prop_assert_eq!(ok, expect);
        }

        #[test]
        fn any_status_round_trips(earned in proptest::num::u128::ANY, claimed in proptest::num::u128::ANY, up in proptest::num::u64::ANY) {
            let mut s = sample();
            s.totals.earned = Amount::new(earned);
            s.totals.claimed = Amount::new(claimed);
            s.totals.bytes_up = up;
            let text = serde_json::to_string(&s).unwrap();
            let back: ProviderStatus = serde_json::from_str(&text).unwrap();
            proptest::prop_assert_eq!(back, s.clone());
            let _ = render(&s);
        }
    }
}
