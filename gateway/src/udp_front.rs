//! The runtime of SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): picks the association's
//! exit, binds the relay socket the client sends to, and moves datagrams between it
//! and a UDP socket through the exit until the control connection closes, the
//! association idles out or the gateway stops. What is relayed is decided by the
//! sans-IO [`crate::udp::Association`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::auth::Authed;
use crate::error::ProxyError;
use crate::exit::{DialError, ExitRuntime, ExitUdp};
use crate::http1::Host;
use crate::pipeline::{self, Plan};
use crate::proxy::{ClientConn, count_request, hard_stop, log_request};
use crate::socks5::{self, Reply};
use crate::targeting::Targeting;
use crate::udp::{Association, Dropped, Limits, MAX_CLIENT_HEADER, Verdict};
use crate::{Gateway, Runtime};

const PROTOCOL: &str = "socks5-udp";

/// Holds one slot of `gateway.udp_max_associations` while alive.
struct Slot<'a>(&'a Gateway);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let open = self.0.udp.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("ipsx_udp_associations").set(open as f64);
    }
}

/// Serves an authenticated UDP ASSOCIATE request: answers it (with the relay socket's
/// address, or the reply code of what failed) and relays until the association ends.
pub(crate) async fn serve_udp_associate(
    gw: &Arc<Gateway>,
    rt: &Runtime,
    conn: &mut ClientConn,
    authed: &Authed<'_>,
    targeting: &Targeting,
    requested: (&Host, u16),
) {
    let refuse = |e: &ProxyError| {
        count_request(PROTOCOL, e.kind());
        tracing::info!(peer = %conn.peer, error = %e, "socks5 udp associate refused");
        socks5::encode_reply(e.socks_reply(), None)
    };
    let max = rt.config.listener.udp_max_associations;
    let open = gw.udp.open.fetch_add(1, Ordering::AcqRel) + 1;
    let _slot = Slot(gw);
    metrics::gauge!("ipsx_udp_associations").set(open as f64);
    if open > max {
        let reply = refuse(&ProxyError::Overloaded(format!(
            "gateway.udp_max_associations ({max}) reached"
        )));
        let _ = conn.stream.write_all(&reply).await;
        return;
    }
    // The exit is chosen once, for the whole association, by the username's targeting
    // and the default rotation; the destinations are not known yet, so host rules do
    // not apply and each datagram's port is checked against the exit when it comes.
    let mut plan = Plan::new(
        rt,
        authed,
        targeting,
        &Host::Ip(Ipv4Addr::UNSPECIFIED.into()),
        0,
    );
    plan.domain = "udp".to_owned();
    let began = Instant::now();
    let (exit, exit_sock) = match open_with_retries(gw, rt, &plan).await {
        Ok(pair) => pair,
        Err(e) => {
            log_request(gw, &plan, PROTOCOL, None, e.status(), began);
            let reply = refuse(&e);
            let _ = conn.stream.write_all(&reply).await;
            return;
        }
    };
    // The relay socket listens where the client reached us: the control connection's
    // local address is one it can send to (also when `listen` is 0.0.0.0). An IPv4
    // client of a dual-stack `[::]` listener gets an IPv4 relay, not a mapped address.
    let local_ip = conn
        .stream
        .local_addr()
        .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |a| {
            ipsx_egress::canonical(a.ip())
        });
    let relay = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            let reply = refuse(&ProxyError::Overloaded(format!(
                "cannot bind a UDP relay socket on {local_ip}: {e}"
            )));
            let _ = conn.stream.write_all(&reply).await;
            return;
        }
    };
    let bound = relay.local_addr().ok();
    if conn
        .stream
        .write_all(&socks5::encode_reply(Reply::Succeeded, bound))
        .await
        .is_err()
    {
        return;
    }
    count_request(PROTOCOL, "ok");
    log_request(gw, &plan, PROTOCOL, Some(&exit.id), 200, began);
    tracing::debug!(peer = %conn.peer, exit = %exit.id, relay = ?bound, "udp association open");
    let limits = Limits {
        max_destinations: rt.config.listener.udp_max_destinations,
        max_datagram: rt.config.listener.udp_max_datagram,
        idle: rt.config.listener.udp_idle_timeout,
    };
    let assoc = Association::new(limits, conn.peer.ip(), requested, Instant::now());
    let _in_flight = gw.rotator.begin(&exit.id);
    let stop = hard_stop(gw, rt.config.listener.drain_timeout);
    let relaying = Relaying {
        gw,
        exit: &exit,
        exit_sock: &exit_sock,
        relay: &relay,
        assoc,
        limits,
        exit_drops: 0,
    };
    relaying.run(conn, stop).await;
    tracing::debug!(peer = %conn.peer, exit = %exit.id, "udp association closed");
}

/// Picks the association's exit and opens a UDP socket through it, moving on to
/// another exit after a failure as the TCP dial does.
async fn open_with_retries(
    gw: &Gateway,
    rt: &Runtime,
    plan: &Plan,
) -> Result<(Arc<ExitRuntime>, ExitUdp), ProxyError> {
    let mut tried = Vec::new();
    loop {
        let exit = pipeline::choose_exit(gw, rt, plan, &tried).await?;
        let started = Instant::now();
        match exit.open_udp().await {
            Ok(sock) => {
                gw.rotator.record_success(&exit.id, started.elapsed());
                return Ok((exit, sock));
            }
            Err(e) => pipeline::dial_failed(gw, rt, plan, &exit.id, e, &mut tried)?,
        }
    }
}

/// One association's relaying: its sockets and its core.
struct Relaying<'a> {
    gw: &'a Gateway,
    exit: &'a ExitRuntime,
    exit_sock: &'a ExitUdp,
    relay: &'a UdpSocket,
    assoc: Association,
    limits: Limits,
    /// The exit socket's drops counted so far.
    exit_drops: u64,
}

impl Relaying<'_> {
    async fn run(mut self, conn: &mut ClientConn, stop: impl std::future::Future<Output = ()>) {
        self.relay_until_end(conn, stop).await;
        self.count_exit_drops();
    }

    /// Moves the exit socket's new drops into the gateway's counters.
    fn count_exit_drops(&mut self) {
        let now = self.exit_sock.dropped();
        self.gw
            .udp
            .drop_n(Dropped::ExitBufferFull, now.saturating_sub(self.exit_drops));
        self.exit_drops = now;
    }

    async fn relay_until_end(
        &mut self,
        conn: &mut ClientConn,
        stop: impl std::future::Future<Output = ()>,
    ) {
        // One byte more than the largest acceptable datagram, so a larger one reads as
        // oversize instead of being cut silently.
        let mut up = vec![0u8; MAX_CLIENT_HEADER + self.limits.max_datagram + 1];
        let mut down = vec![0u8; socks5::UDP_REPLY_HEADER_MAX + self.limits.max_datagram + 1];
        let mut control = [0u8; 256];
        let (relay, exit_sock) = (self.relay, self.exit_sock);
        tokio::pin!(stop);
        loop {
            let at = socks5::UDP_REPLY_HEADER_MAX;
            tokio::select! {
                got = relay.recv_from(&mut up) => match got {
                    Ok((n, from)) => self.up(from, &up[..n]).await,
                    Err(e) => {
                        // ICMP errors from the client side surface here; not fatal.
                        tracing::debug!(error = %e, "udp relay socket");
                    }
                },
                got = exit_sock.recv_from(&mut down[at..]) => match got {
                    Ok((n, from)) => self.down(from, n, &mut down).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "udp exit socket");
                        if matches!(self.exit_sock, ExitUdp::Tunnel(_)) {
                            // The tunnel is gone: nothing more can come through it.
                            return;
                        }
                    }
                },
                // The association ends with its control connection (section 7); bytes
                // on it mean nothing and are discarded.
                read = conn.stream.read(&mut control) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                () = tokio::time::sleep_until(self.assoc.idle_deadline()) => {
                    if Instant::now() >= self.assoc.idle_deadline() {
                        return;
                    }
                }
                () = &mut stop => return,
            }
        }
    }

    async fn up(&mut self, from: std::net::SocketAddr, datagram: &[u8]) {
        let out = match self.assoc.from_client(from, datagram, Instant::now()) {
            Ok(out) => out,
            Err(why) => return self.gw.udp.drop(why),
        };
        let dst = match self.assoc.verdict(&out.host, out.port) {
            Some(v) => v.clone(),
            None if !self.assoc.has_room() => return self.gw.udp.drop(Dropped::Destinations),
            None => {
                let verdict = self.check(&out.host, out.port).await;
                self.assoc.record(out.host, out.port, verdict)
            }
        };
        let dst = match dst {
            Verdict::Send(dst) => dst,
            Verdict::Drop(why) => return self.gw.udp.drop(why),
        };
        let payload = &datagram[out.payload_at..];
        if payload.len() > self.exit_sock.max_payload(&dst) {
            return self.gw.udp.drop(Dropped::Oversize);
        }
        match self.exit_sock.send_to(payload, dst).await {
            Ok(()) => {
                self.gw.udp.up.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ipsx_udp_datagrams_total", "direction" => "up").increment(1);
                metrics::counter!("ipsx_relay_bytes_total", "direction" => "up")
                    .increment(payload.len() as u64);
            }
            Err(e) => {
                tracing::debug!(%dst, error = %e, "udp send through the exit failed");
                self.gw.udp.drop(Dropped::SendFailed);
            }
        }
    }

    /// The exit's verdict on a new destination: the egress policy on the address
    /// actually used (names resolved where the traffic leaves), and the exit's ports.
    async fn check(&self, host: &Host, port: u16) -> Verdict {
        if !self.exit.config.allows_port(port) {
            return Verdict::Drop(Dropped::Port);
        }
        match self.exit.udp_destination(host, port).await {
            Ok(addr) => Verdict::Send(addr),
            Err(DialError::Refused { .. }) => Verdict::Drop(Dropped::Refused),
            Err(e) => {
                tracing::debug!(host = %host.to_header(), error = %e, "udp destination");
                Verdict::Drop(Dropped::Resolve)
            }
        }
    }

    /// An answer of `n` bytes from `from` sits in `buf` after room for the header.
    async fn down(&mut self, from: std::net::SocketAddr, n: usize, buf: &mut [u8]) {
        self.count_exit_drops();
        let client = match self.assoc.from_exit(from, n, Instant::now()) {
            Ok(c) => c,
            Err(why) => return self.gw.udp.drop(why),
        };
        let mut header = Vec::with_capacity(socks5::UDP_REPLY_HEADER_MAX);
        socks5::encode_udp_header(from, &mut header);
        let at = socks5::UDP_REPLY_HEADER_MAX;
        let start = at - header.len();
        buf[start..at].copy_from_slice(&header);
        match self.relay.send_to(&buf[start..at + n], client).await {
            Ok(_) => {
                self.gw.udp.down.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ipsx_udp_datagrams_total", "direction" => "down").increment(1);
                metrics::counter!("ipsx_relay_bytes_total", "direction" => "down")
                    .increment(n as u64);
            }
            Err(e) => {
                tracing::debug!(%client, error = %e, "udp send to the client failed");
                self.gw.udp.drop(Dropped::SendFailed);
            }
        }
    }
}
