//! The SOCKS5 front end (RFC 1928, RFC 1929 username/password): greeting, auth,
//! request, then a tunnel through an exit (CONNECT) or a UDP relay (UDP ASSOCIATE,
//! `udp_front.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Buf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::Gateway;
use crate::auth;
use crate::error::ProxyError;
use crate::pipeline::{self, Plan};
use crate::proxy::{ClientConn, count_request, log_request, run_relay, targeting_for};
use crate::socks5::{self, Reply};

async fn read_socks<T>(
    conn: &mut ClientConn,
    deadline: Instant,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, socks5::SocksError>,
) -> Result<Option<T>, socks5::SocksError> {
    loop {
        if let Some((value, used)) = parse(&conn.buf)? {
            conn.buf.advance(used);
            return Ok(Some(value));
        }
        if conn.buf.len() > 1024 {
            return Err(socks5::SocksError {
                message: "message too long".into(),
                reply: Some(Reply::GeneralFailure),
            });
        }
        conn.buf.reserve(512);
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

pub(crate) async fn serve_socks(gw: &Arc<Gateway>, conn: &mut ClientConn, deadline: Instant) {
    let rt = gw.runtime();
    let fail = |e: &socks5::SocksError| {
        tracing::info!(error = %e, "socks5 refused");
        count_request("socks5", "bad_request");
    };
    let greeting = match read_socks(conn, deadline, socks5::parse_greeting).await {
        Ok(Some(g)) => g,
        Ok(None) => return,
        Err(e) => {
            fail(&e);
            let _ = conn.stream.write_all(&[5, socks5::METHOD_NONE]).await;
            return;
        }
    };
    let needs_auth = !rt.config.tokens.is_empty();
    let method = if greeting.methods.contains(&socks5::METHOD_USER_PASS) {
        socks5::METHOD_USER_PASS
    } else if !needs_auth && greeting.methods.contains(&socks5::METHOD_NO_AUTH) {
        socks5::METHOD_NO_AUTH
    } else {
        socks5::METHOD_NONE
    };
    if conn.stream.write_all(&[5, method]).await.is_err() || method == socks5::METHOD_NONE {
        count_request("socks5", "auth");
        return;
    }
    let (username, password) = if method == socks5::METHOD_USER_PASS {
        match read_socks(conn, deadline, socks5::parse_auth).await {
            Ok(Some(c)) => (c.username, c.password),
            Ok(None) => return,
            Err(e) => {
                fail(&e);
                let _ = conn.stream.write_all(&[1, 1]).await;
                return;
            }
        }
    } else {
        (String::new(), String::new())
    };
    let authed = match auth::check_credentials(&rt, &username, &password) {
        Ok(a) => a,
        Err(e) => {
            count_request("socks5", e.kind());
            if !matches!(e, ProxyError::Auth) {
                tracing::info!(peer = %conn.peer, error = %e, "socks5 credentials refused");
            }
            let _ = conn.stream.write_all(&[1, 1]).await;
            return;
        }
    };
    if method == socks5::METHOD_USER_PASS && conn.stream.write_all(&[1, 0]).await.is_err() {
        return;
    }
    let mut slots = auth::ConnSlots::default();
    if let Err(e) = slots.take(&rt, &authed) {
        count_request("socks5", e.kind());
        let _ = conn
            .stream
            .write_all(&socks5::encode_reply(e.socks_reply(), None))
            .await;
        return;
    }
    let request = match read_socks(conn, deadline, socks5::parse_request).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            fail(&e);
            if let Some(reply) = e.reply {
                let _ = conn
                    .stream
                    .write_all(&socks5::encode_reply(reply, None))
                    .await;
            }
            return;
        }
    };
    gw.requests_total.fetch_add(1, Ordering::Relaxed);
    let targeting = match targeting_for(&rt, &authed, None) {
        Ok(t) => t,
        Err(e) => {
            count_request("socks5", e.kind());
            tracing::info!(peer = %conn.peer, error = %e, "socks5 targeting refused");
            let _ = conn
                .stream
                .write_all(&socks5::encode_reply(e.socks_reply(), None))
                .await;
            return;
        }
    };
    if request.command == socks5::Command::UdpAssociate {
        let requested = (&request.host, request.port);
        crate::udp_front::serve_udp_associate(gw, &rt, conn, &authed, &targeting, requested).await;
        return;
    }
    let plan = Plan::new(&rt, &authed, &targeting, &request.host, request.port);
    let began = Instant::now();
    let (exit, upstream) = match pipeline::dial_with_retries(gw, &rt, &plan, &request.host).await {
        Ok(pair) => pair,
        Err(e) => {
            count_request("socks5", e.kind());
            log_request(gw, &plan, "socks5", None, e.status(), began);
            tracing::info!(peer = %conn.peer, target = %plan.domain, error = %e, "socks5 connect refused");
            let _ = conn
                .stream
                .write_all(&socks5::encode_reply(e.socks_reply(), None))
                .await;
            return;
        }
    };
    count_request("socks5", "ok");
    log_request(gw, &plan, "socks5", Some(&exit.id), 200, began);
    if conn
        .stream
        .write_all(&socks5::encode_reply(
            Reply::Succeeded,
            upstream.local_addr(),
        ))
        .await
        .is_err()
    {
        return;
    }
    let mut upstream = upstream;
    if !conn.buf.is_empty() {
        if upstream.write_all(&conn.buf).await.is_err() {
            return;
        }
        conn.buf.clear();
    }
    run_relay(gw, &rt, &exit.id, &mut conn.stream, upstream).await;
}
