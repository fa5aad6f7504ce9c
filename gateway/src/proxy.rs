//! Per-connection handling: sniff the first byte (0x05 = SOCKS5, else HTTP/1.x), then
//! run that protocol's front end (`http_front.rs`, `socks_front.rs`) over the shared
//! pipeline. Also what both front ends share: the connection, token slots, targeting,
//! request counters and the tunnel relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use ipsx_rotation::ExitId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::auth::Authed;
use crate::error::ProxyError;
use crate::http1::{self, RequestHead};
use crate::relay::{relay, relay_tcp};
use crate::respond::write_error;
use crate::socks5;
use crate::targeting::Targeting;
use crate::upstream::UpstreamCache;
use crate::{Gateway, Runtime};

/// Decrements a counter when dropped.
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One client connection: its socket, the bytes read but not used yet, and its own
/// idle connections to targets (plain HTTP).
pub(crate) struct ClientConn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    pub(crate) peer: SocketAddr,
    pub(crate) upstreams: UpstreamCache,
}

pub(crate) async fn handle_connection(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr) {
    let open = gw.open_connections.fetch_add(1, Ordering::AcqRel) + 1;
    let _open = CountGuard(&gw.open_connections);
    metrics::gauge!("ipsx_open_connections").set(open as f64);
    let _ = stream.set_nodelay(true);
    let rt = gw.runtime();
    let mut conn = ClientConn {
        stream,
        buf: BytesMut::new(),
        peer,
        upstreams: UpstreamCache::default(),
    };
    let deadline = Instant::now() + rt.config.listener.header_timeout;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout_at(deadline, conn.stream.peek(&mut first)) => r,
        () = gw.shutdown.cancelled() => return,
    };
    let is_socks = match peeked {
        Ok(Ok(1)) if first[0] == 4 => {
            // SOCKS4 is not served: answer in its own words (0x5B: rejected) and close.
            count_request("socks4", "bad_request");
            let _ = conn.stream.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await;
            return;
        }
        Ok(Ok(1)) => first[0] == 5,
        Ok(_) => return,
        Err(_) => {
            // Nothing at all before the header deadline.
            let _ = write_error(
                &mut conn.stream,
                &ProxyError::Head(http1::HeadError::Bad("request head timeout".into())),
                true,
                Some(408),
            )
            .await;
            return;
        }
    };
    if open > rt.config.listener.max_connections {
        let err = ProxyError::Overloaded(format!(
            "gateway at its limit of {} connections",
            rt.config.listener.max_connections
        ));
        tracing::warn!(%peer, "{err}");
        if is_socks {
            // Answer the greeting with "no acceptable method" and close.
            let _ = conn.stream.write_all(&[5, socks5::METHOD_NONE]).await;
        } else {
            let _ = write_error(&mut conn.stream, &err, true, None).await;
        }
        return;
    }
    drop(rt);
    if is_socks {
        crate::socks_front::serve_socks(&gw, &mut conn, deadline).await;
    } else {
        crate::http_front::serve_http(&gw, &mut conn, deadline).await;
    }
}

pub(crate) fn targeting_for(
    rt: &Runtime,
    authed: &Authed<'_>,
    head: Option<&RequestHead>,
) -> Result<Targeting, ProxyError> {
    let max_ttl = rt.config.rotation.max_session_ttl;
    let mut targeting = authed.user.targeting.clone();
    if let Some(head) = head {
        targeting.add_headers(
            head.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())),
            max_ttl,
        )?;
    }
    Ok(targeting)
}

pub(crate) fn count_request(protocol: &'static str, outcome: &'static str) {
    metrics::counter!("ipsx_requests_total", "protocol" => protocol, "outcome" => outcome)
        .increment(1);
}

/// Records one request in the gateway's request log (the dashboard's live view): the
/// account the username names (else the token's name), the target host and port,
/// never a path or query.
pub(crate) fn log_request(
    gw: &Gateway,
    plan: &crate::pipeline::Plan,
    protocol: &'static str,
    exit: Option<&ExitId>,
    status: u16,
    started: Instant,
) {
    let account = match (&plan.account, plan.user_account.as_str()) {
        (Some(configured), _) => configured.as_str(),
        (None, "") => plan.token.as_str(),
        (None, named) => named,
    };
    let host = format!("{}:{}", plan.domain, plan.port);
    let exit = exit.map(ToString::to_string);
    gw.requests.record(
        account,
        protocol,
        &host,
        exit.as_deref(),
        status,
        started.elapsed(),
    );
}

pub(crate) async fn run_relay(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    exit: &ExitId,
    client: &mut TcpStream,
    upstream: crate::exit::ExitStream,
) {
    let _in_flight = gw.rotator.begin(exit);
    let stop = hard_stop(gw, rt.config.listener.drain_timeout);
    let idle = rt.config.listener.idle_timeout;
    let stats = match upstream {
        crate::exit::ExitStream::Tcp(mut tcp) => relay_tcp(client, &mut tcp, idle, stop).await,
        tunnel => relay(client, tunnel, idle, stop).await,
    };
    metrics::counter!("ipsx_relay_bytes_total", "direction" => "up").increment(stats.up);
    metrics::counter!("ipsx_relay_bytes_total", "direction" => "down").increment(stats.down);
}

/// Resolves once shutdown began and the drain time has passed.
pub(crate) async fn hard_stop(gw: &Arc<Gateway>, drain: Duration) {
    gw.shutdown.cancelled().await;
    tokio::time::sleep(drain).await;
}
