//! The UDP relay's runtime (a child of [`crate::exit`]): one host UDP socket per flow
//! of the [`crate::udp`] table, bound to the exit address and connected to the
//! destination, and one task per flow writing the destination's replies back into
//! the peer's tunnel as IP/UDP packets. The decisions (admission, idle expiry, the
//! log) are the table's; this module only moves datagrams.
//!
//! Dropped and counted ([`ExitCounters::udp_dropped`](super::ExitCounters)): bad
//! checksums, port 0, datagrams whose socket buffer is full, replies that would not
//! fit the tunnel MTU unfragmented, datagrams over the deal's bandwidth cap. Refused
//! destinations count in `refused`, flows over the limits in `limited`/`rate_limited`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipsx_tunnel_pool::netstack::Stack;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use super::{Bandwidth, Peer, Shared, unix_ms};
use crate::limits::LimitRefusal;
use crate::meter::{LogEntry, PeerMeter};
use crate::packet::{self, OwnedUdp, Parsed};
use crate::udp::{ClosedFlow, FlowId, FlowKey, UdpDrop, UdpFlows, UdpVerdict};

/// Largest datagram read from a destination (anything bigger than the tunnel MTU is
/// dropped after reading it whole).
const RECV_BUFFER: usize = 65_536;

/// A live flow's sending side: the socket (non-blocking; a clone of the one its task
/// reads, since tokio's `try_send` refuses until the reactor has seen the socket
/// writable) and the signal that stops its task when dropped.
type FlowSender = (Arc<std::net::UdpSocket>, oneshot::Sender<()>);

/// The flow table and each live flow's socket and stop signal.
pub(super) struct UdpState {
    table: UdpFlows<[u8; 32]>,
    socks: HashMap<FlowId, FlowSender>,
}

impl UdpState {
    pub(super) fn new(idle: Duration) -> Mutex<Self> {
        Mutex::new(Self {
            table: UdpFlows::new(idle),
            socks: HashMap::new(),
        })
    }
}

impl Shared {
    fn udp_state(&self) -> std::sync::MutexGuard<'_, UdpState> {
        self.udp.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn meter_by_key(&self, key: &[u8; 32]) -> Option<Arc<PeerMeter>> {
        self.meters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }
}

/// One UDP datagram from `peer` (its source already checked): relayed on its flow,
/// or dropped and counted.
pub(super) fn outbound(shared: &Arc<Shared>, peer: &mut Peer, pkt: &[u8], parsed: &Parsed) {
    let c = &shared.counters;
    if !packet::udp_checksums_ok(pkt, parsed) {
        c.udp_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let q = parsed.owned(pkt);
    let key = FlowKey {
        peer: peer.key,
        src: SocketAddr::new(q.src, q.src_port),
        dst: SocketAddr::new(q.dst, q.dst_port),
    };
    let now = shared.now_ms();
    let verdict = {
        let mut st = shared.udp_state();
        let mut lim = shared.limiter();
        st.table
            .outbound(&mut lim, &shared.policy, key, q.payload.len(), now)
    };
    let sock = match verdict {
        UdpVerdict::Drop(why) => {
            match why {
                UdpDrop::PortZero => &c.udp_dropped,
                UdpDrop::Refused(_) => {
                    peer.meter.refused.fetch_add(1, Ordering::Relaxed);
                    &c.refused
                }
                UdpDrop::Limited(l) => {
                    peer.meter.limited.fetch_add(1, Ordering::Relaxed);
                    match l {
                        LimitRefusal::Rate => &c.rate_limited,
                        _ => &c.limited,
                    }
                }
            }
            .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                peer = %ipsx_tunnel_pool::key_to_base64(&peer.key),
                dst = %key.dst,
                reason = %why,
                "exit: UDP datagram dropped"
            );
            return;
        }
        UdpVerdict::Forward(id) => shared.udp_state().socks.get(&id).map(|s| s.0.clone()),
        UdpVerdict::Open(id) => open(shared, peer, id, key),
    };
    let Some(sock) = sock else {
        c.udp_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if let Some(b) = &peer.bandwidth {
        let ok =
            b.up.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .try_take(q.payload.len() as u64, now);
        if !ok {
            c.udp_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // UDP semantics: a datagram the socket cannot take now is lost.
    if sock.send(&q.payload).is_err() {
        c.udp_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    c.udp_datagrams_up.fetch_add(1, Ordering::Relaxed);
    peer.meter
        .bytes_up
        .fetch_add(q.payload.len() as u64, Ordering::Relaxed);
    peer.meter.touch(now / 1000);
}

/// Opens flow `id`'s socket and starts its reply task; on failure the flow ends.
fn open(
    shared: &Arc<Shared>,
    peer: &Peer,
    id: FlowId,
    key: FlowKey<[u8; 32]>,
) -> Option<Arc<std::net::UdpSocket>> {
    // Live from admission; `finish` takes it back whichever way the flow ends.
    peer.meter.flows_live.fetch_add(1, Ordering::Relaxed);
    let (send, sock) = match bind_connected(shared.source_ip, key.dst) {
        Ok((send, recv)) => (Arc::new(send), recv),
        Err(e) => {
            tracing::debug!(dst = %key.dst, error = %e, "exit: UDP socket failed");
            let closed = {
                let mut st = shared.udp_state();
                let mut lim = shared.limiter();
                st.table.close(id, &mut lim, shared.now_ms())
            };
            finish(shared, closed.into_iter().collect());
            return None;
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    shared.udp_state().socks.insert(id, (send.clone(), stop_tx));
    shared.counters.udp_flows.fetch_add(1, Ordering::Relaxed);
    peer.meter.flows.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(replies(
        shared.clone(),
        id,
        key,
        sock,
        peer.stack.clone(),
        peer.meter.clone(),
        peer.bandwidth.clone(),
        stop_rx,
    ));
    Some(send)
}

/// A socket bound to the exit address and connected to `dst`: the sending clone and
/// the task's reading side.
fn bind_connected(
    from: std::net::IpAddr,
    dst: SocketAddr,
) -> io::Result<(std::net::UdpSocket, UdpSocket)> {
    let s = std::net::UdpSocket::bind(SocketAddr::new(from, 0))?;
    s.connect(dst)?;
    s.set_nonblocking(true)?;
    let send = s.try_clone()?;
    Ok((send, UdpSocket::from_std(s)?))
}

/// Writes flow `id`'s replies into the peer's tunnel until the flow ends.
#[allow(clippy::too_many_arguments)]
async fn replies(
    shared: Arc<Shared>,
    id: FlowId,
    key: FlowKey<[u8; 32]>,
    sock: UdpSocket,
    stack: Arc<Stack>,
    meter: Arc<PeerMeter>,
    bandwidth: Option<Arc<Bandwidth>>,
    mut stop: oneshot::Receiver<()>,
) {
    let c = &shared.counters;
    let q = OwnedUdp {
        src: key.src.ip(),
        dst: key.dst.ip(),
        src_port: key.src.port(),
        dst_port: key.dst.port(),
        payload: Vec::new(),
    };
    let headers = if key.dst.is_ipv4() { 28 } else { 48 };
    let max = shared.cfg.mtu.saturating_sub(headers);
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let n = tokio::select! {
            _ = &mut stop => return,
            r = sock.recv(&mut buf) => match r {
                Ok(n) => n,
                // An ICMP error from the destination (port unreachable): the flow
                // stays, as it would through a NAT.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(_) => break,
            },
        };
        if n > max {
            c.udp_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = shared.now_ms();
        if let Some(b) = &bandwidth {
            let ok = b
                .down
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .try_take(n as u64, now);
            if !ok {
                c.udp_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        if shared.udp_state().table.inbound(id, n, now).is_none() {
            return;
        }
        let Some(reply) = packet::udp_reply(&q, buf.get(..n).unwrap_or_default()) else {
            continue;
        };
        if !into_tunnel(&stack, reply) {
            break;
        }
        c.udp_datagrams_down.fetch_add(1, Ordering::Relaxed);
        meter.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        meter.touch(now / 1000);
    }
    let closed = {
        let mut st = shared.udp_state();
        let mut lim = shared.limiter();
        st.table.close(id, &mut lim, shared.now_ms())
    };
    finish(&shared, closed.into_iter().collect());
}

/// Queues `pkt` for the peer of `stack` (sent on the driver's next turn); false if
/// the peer is gone.
pub(super) fn into_tunnel(stack: &Stack, pkt: Vec<u8>) -> bool {
    let mut core = stack.lock();
    if core.closed {
        return false;
    }
    core.dev.tx.push_back(pkt);
    drop(core);
    stack.notify.notify_one();
    true
}

/// Ends flows idle for the UDP idle timeout (the driver calls this on its timer).
pub(super) fn expire(shared: &Shared) {
    let closed = {
        let mut st = shared.udp_state();
        if st.table.is_empty() {
            return;
        }
        let mut lim = shared.limiter();
        st.table.expire(&mut lim, shared.now_ms())
    };
    finish(shared, closed);
}

/// Ends every flow of a removed peer.
pub(super) fn close_peer(shared: &Shared, key: &[u8; 32]) {
    let closed = {
        let mut st = shared.udp_state();
        let mut lim = shared.limiter();
        st.table.close_peer(key, &mut lim, shared.now_ms())
    };
    finish(shared, closed);
}

/// Stops every flow's task (the exit is stopping).
pub(super) fn close_all(shared: &Shared) {
    shared.udp_state().socks.clear();
}

/// Drops ended flows' sockets (their tasks stop) and logs them like TCP flows.
fn finish(shared: &Shared, closed: Vec<ClosedFlow<[u8; 32]>>) {
    if closed.is_empty() {
        return;
    }
    {
        let mut st = shared.udp_state();
        for f in &closed {
            st.socks.remove(&f.id);
        }
    }
    let now = shared.now_ms();
    let unix_now = unix_ms();
    for f in closed {
        let Some(meter) = shared.meter_by_key(&f.key.peer) else {
            continue;
        };
        meter.flows_live.fetch_sub(1, Ordering::Relaxed);
        meter.append(LogEntry {
            start_unix_ms: unix_now.saturating_sub(now.saturating_sub(f.opened_ms)),
            dst: f.key.dst,
            bytes_up: f.bytes_up,
            bytes_down: f.bytes_down,
            duration_ms: f.duration_ms,
        });
    }
}
