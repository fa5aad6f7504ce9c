//! What the admin listener adds for the web dashboard: the embedded pages, the spend
//! history behind `GET /api/spend`, the masked config of `GET /api/config`, the
//! recent requests of `GET /api/requests` and their live stream `GET /api/events`
//! (server-sent events), and a write deadline that drops clients that stop reading.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::Frame;
use ipsx_config::GatewayConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc};

use crate::Gateway;
use crate::events::Subscription;

/// How often the market's spend is sampled for `GET /api/spend`.
pub const SPEND_SAMPLE: Duration = Duration::from_secs(30);
/// Samples kept: a day at [`SPEND_SAMPLE`].
pub const SPEND_POINTS: usize = 2880;
/// Frames queued for one event-stream client before it counts as a slow consumer.
pub const SSE_QUEUE: usize = 64;
/// An admin client that accepts no bytes for this long is disconnected.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// A comment line sent on an idle event stream, so proxies and clients see it alive.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// The market's spend over time: one point per [`SPEND_SAMPLE`], bounded.
#[derive(Debug, Default)]
pub struct SpendHistory {
    points: std::sync::Mutex<VecDeque<Value>>,
}

impl SpendHistory {
    /// Appends the current spend (if the gateway rents exits).
    pub fn sample(&self, gw: &Gateway) {
        if let Some(point) = spend_point(gw) {
            let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
            if points.len() == SPEND_POINTS {
                points.pop_front();
            }
            points.push_back(point);
        }
    }

    /// `GET /api/spend`: the samples and the current point, with the budget caps;
    /// `market: false` and no points without a `[market]`.
    pub fn report(&self, gw: &Gateway) -> Value {
        let Some(now) = spend_point(gw) else {
            return json!({ "market": false, "interval_s": SPEND_SAMPLE.as_secs(), "caps": null, "points": [] });
        };
        let mut points: Vec<Value> = self
            .points
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        points.push(now);
        let rt = gw.runtime();
        let caps = rt.config.market.as_ref().map(|m| {
            json!({
                "max_spend_per_hour": m.max_spend_per_hour.map(|a| a.0.to_string()),
                "max_spend_total": m.max_spend_total.map(|a| a.0.to_string()),
                "max_price_per_ip_second": m.max_price_per_ip_second.0.to_string(),
            })
        });
        json!({ "market": true, "interval_s": SPEND_SAMPLE.as_secs(), "caps": caps, "points": points })
    }
}

fn spend_point(gw: &Gateway) -> Option<Value> {
    let m = gw.market_status()?;
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(json!({
        "t": t,
        "spent_total": m.get("spent_total"),
        "spent_last_hour": m.get("spent_last_hour"),
        "paid_total": m.get("paid_total"),
        "channels_open": m.get("channels_open"),
    }))
}

/// Samples the spend every [`SPEND_SAMPLE`] until `stop` is dropped or sent.
pub async fn sample_spend(
    gw: Arc<Gateway>,
    history: Arc<SpendHistory>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(SPEND_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => history.sample(&gw),
            _ = &mut stop => return,
        }
    }
}

const MASK: &str = "***";

fn to_json(v: impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `GET /api/config`: the config in force, every secret replaced by `***` (token
/// secrets, the admin token, the market's private keys).
pub fn masked_config(c: &GatewayConfig) -> Value {
    let mut listener = to_json(&c.listener);
    if let Some(obj) = listener.as_object_mut() {
        obj.insert(
            "admin_token".into(),
            json!(c.listener.admin_token.as_ref().map(|_| MASK)),
        );
    }
    let tokens: Vec<Value> = c
        .tokens
        .iter()
        .map(|t| json!({ "name": t.name, "secret": MASK, "rate": t.rate, "max_connections": t.max_connections }))
        .collect();
    let accounts: Vec<Value> = c
        .accounts
        .iter()
        .map(|a| json!({ "name": a.name, "token": a.token, "rate": a.rate, "max_connections": a.max_connections }))
        .collect();
    let rules: Vec<Value> = c
        .rules
        .iter()
        .map(|r| {
            json!({
                "hosts": r.hosts.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>(),
                "target": r.target,
                "policy": r.policy,
                "limits": r.limits,
            })
        })
        .collect();
    let exits: Vec<Value> = c
        .exits
        .iter()
        .map(|e| {
            let transport = match &e.transport {
                ipsx_config::ExitTransport::Local { bind } => json!({ "local": { "bind": bind } }),
                ipsx_config::ExitTransport::WireGuard { file, exit_ip, .. } => {
                    json!({ "wireguard": { "file": file.display().to_string(), "exit_ip": exit_ip } })
                }
            };
            json!({ "name": e.name, "transport": transport, "attrs": e.attrs, "protocols": e.protocols.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>() })
        })
        .collect();
    let market = c.market.as_ref().map(|m| {
        let secs = |d: Duration| d.as_secs_f64();
        json!({
            "exchange_url": m.exchange_url,
            "rpc_url": m.rpc_url,
            "deployment": m.deployment,
            "private_key": MASK,
            "wg_private_key": m.wg_private_key.as_ref().map(|_| MASK),
            "demand": m.demand.iter().map(|d| json!({ "name": d.name, "count": d.count, "target": format!("{:?}", d.target) })).collect::<Vec<_>>(),
            "deal_duration_s": secs(m.deal_duration),
            "max_price_per_ip_second": m.max_price_per_ip_second.0.to_string(),
            "max_spend_per_hour": m.max_spend_per_hour.map(|a| a.0.to_string()),
            "max_spend_total": m.max_spend_total.map(|a| a.0.to_string()),
            "payment_window_s": secs(m.payment_window),
            "proof_interval_s": secs(m.proof_interval),
            "renew_ahead_s": secs(m.renew_ahead),
            "rent_on_demand": m.rent_on_demand,
            "rent_wait_s": secs(m.rent_wait),
            "idle_release_s": secs(m.idle_release),
            "dead_after_s": secs(m.dead_after),
            "min_provider_rating": m.min_provider_rating,
            "state_file": m.state_file,
        })
    });
    json!({
        "gateway": listener,
        "tokens": tokens,
        "accounts": accounts,
        "rotation": c.rotation,
        "limits": c.limits,
        "bans": c.bans,
        "rules": rules,
        "exits": exits,
        "market": market,
    })
}

/// `GET /api/requests`: the recent requests, oldest first.
pub fn recent_requests(gw: &Gateway) -> Value {
    json!({ "requests": gw.request_log().recent().iter().map(|e| &**e).collect::<Vec<_>>() })
}

/// The body of `GET /api/events`: `event: request` frames, one per request, fed by a
/// task that drops the stream (the client reconnects and resumes from
/// `/api/requests`) when the client falls [`SSE_QUEUE`] frames or the broadcast's lag
/// behind.
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::Receiver<Bytes>,
}

impl EventStream {
    /// Starts feeding a subscriber's events into a stream.
    pub fn start(mut sub: Subscription) -> Self {
        let (tx, rx) = mpsc::channel(SSE_QUEUE);
        tokio::spawn(async move {
            // The browser retries 2 s after the stream ends.
            if tx.try_send(Bytes::from_static(b"retry: 2000\n\n")).is_err() {
                return;
            }
            loop {
                let frame = tokio::select! {
                    r = sub.rx.recv() => match r {
                        Ok(ev) => {
                            let data = serde_json::to_string(&*ev).unwrap_or_default();
                            Bytes::from(format!("id: {}\nevent: request\ndata: {data}\n\n", ev.seq))
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!(missed = n, "event stream client lagged; dropped");
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = tokio::time::sleep(SSE_KEEPALIVE) => Bytes::from_static(b": keep-alive\n\n"),
                    () = tx.closed() => return,
                };
                if tx.try_send(frame).is_err() {
                    tracing::debug!("event stream client too slow; dropped");
                    return;
                }
            }
        });
        Self { rx }
    }
}

impl http_body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A connection that fails its writes when the peer has accepted no bytes for
/// [`WRITE_DEADLINE`]: an admin client that stops reading (a stalled event stream)
/// is disconnected instead of holding its connection forever.
#[derive(Debug)]
pub struct WriteDeadline<S> {
    inner: S,
    deadline: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    /// Wraps a stream.
    pub fn new(inner: S, deadline: Duration) -> Self {
        Self {
            inner,
            deadline,
            stalled: None,
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = self.deadline;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "admin client accepted no bytes before the write deadline",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_cut_at_the_write_deadline() {
        let (client, server) = tokio::io::duplex(1024);
        let mut io = WriteDeadline::new(server, WRITE_DEADLINE);
        // The peer reads nothing: the 1 KiB pipe fills, then the deadline fails the write.
        let err = io.write_all(&[0u8; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_peer_is_never_cut() {
        let (mut client, server) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink)
                .await
                .unwrap();
            sink.len()
        });
        let mut io = WriteDeadline::new(server, WRITE_DEADLINE);
        io.write_all(&[0u8; 64 * 1024]).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), 64 * 1024);
    }

    #[test]
    fn masked_config_shows_no_secret() {
        let toml = "[gateway]\nadmin_token = \"admin-secret-0123456789\"\n\n[[token]]\nname = \"t\"\nsecret = \"token-secret-1\"\n";
        let c = GatewayConfig::from_toml(toml, "g.toml").unwrap();
        let text = masked_config(&c).to_string();
        assert!(
            text.contains("\"secret\":\"***\"") && text.contains("\"admin_token\":\"***\""),
            "{text}"
        );
        assert!(
            !text.contains("admin-secret") && !text.contains("token-secret"),
            "{text}"
        );
    }
}
