//! A tiny HTTP echo target for demos and tests: answers every request with the
//! caller's address (the exit the request left from) and that address's demo country,
//! as JSON; `/ip.txt` answers with the address alone, as plain text.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves the echo target on `listener` until the task is dropped. `countries` maps a
/// caller address to the country label reported back.
pub async fn serve_echo(listener: TcpListener, countries: HashMap<IpAddr, String>) {
    serve_echo_with(listener, countries, None).await;
}

/// As [`serve_echo`]; with `fixed_body = Some(n)` every answer is `n` bytes of `x`
/// instead (a benchmark origin whose cost does not depend on the request).
pub async fn serve_echo_with(
    listener: TcpListener,
    countries: HashMap<IpAddr, String>,
    fixed_body: Option<usize>,
) {
    let countries = Arc::new(countries);
    let fixed: Option<Bytes> = fixed_body.map(|n| Bytes::from(vec![b'x'; n]));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let countries = countries.clone();
        let fixed = fixed.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let countries = countries.clone();
                    let fixed = fixed.clone();
                    async move {
                        if let Some(body) = fixed {
                            return Ok::<_, Infallible>(hyper::Response::new(Full::new(body)));
                        }
                        if req.uri().path() == "/ip.txt" {
                            // Plain text, for "what is my IP" probes.
                            let text = format!("{}\n", peer.ip());
                            return Ok(hyper::Response::new(Full::new(Bytes::from(text))));
                        }
                        let method = req.method().to_string();
                        let path = req.uri().path().to_owned();
                        let headers: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        let body_len = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        let answer = serde_json::json!({
                            "ip": peer.ip().to_string(),
                            "port": peer.port(),
                            "country": countries.get(&peer.ip()),
                            "method": method,
                            "path": path,
                            "headers": headers,
                            "body_bytes": body_len,
                        });
                        let mut body = serde_json::to_vec(&answer).unwrap_or_default();
                        body.push(b'\n');
                        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                        r.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
