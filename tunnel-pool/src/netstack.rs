//! The userspace TCP/IP stack shared by a tunnel (gateway side) and a peer (exit side).
//!
//! A [`Stack`] is a smoltcp interface, its sockets and a queue device behind one mutex,
//! plus a [`Notify`] that wakes the driver task. The driver owns the WireGuard state and
//! the UDP socket; it pushes decrypted IP packets in with [`Stack::poll`] and gets the
//! packets to encrypt back. Streams ([`StackStream`]) lock the stack, move bytes in or
//! out of their smoltcp socket and poke the driver. Memory is bounded by the socket
//! buffers: a writer that outruns the tunnel gets `Pending` once its send buffer is
//! full, and a slow reader closes the TCP window towards the far end.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Segments per advertised TCP window (see [`QueueDevice`]'s capabilities).
pub const MAX_BURST: usize = 64;

/// Size of each direction's buffer of one TCP stream inside a tunnel.
pub const TCP_BUFFER: usize = 128 * 1024;

/// Kernel UDP buffer asked for each WireGuard socket: a whole TCP window of datagrams
/// must fit, or bursts are dropped and smoltcp (no SACK) falls back to timeouts.
pub const UDP_SOCKET_BUFFER: usize = 1024 * 1024;

/// Binds a non-blocking UDP socket with [`UDP_SOCKET_BUFFER`]-sized kernel buffers
/// (the kernel may cap them at `net.core.rmem_max`).
pub fn bind_udp(addr: std::net::SocketAddr, buffer: usize) -> io::Result<tokio::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(sock.into())
}

/// Scratch buffers shared by every driver task of the process: a driver takes one pair
/// for a loop turn and gives it back before it sleeps, so an idle tunnel holds none
/// (1,000 idle tunnels would otherwise pin 3 KB each).
#[derive(Debug)]
pub struct ScratchPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// The process-wide [`ScratchPool`].
pub static SCRATCH: ScratchPool = ScratchPool {
    free: Mutex::new(Vec::new()),
};

/// Scratch buffers are this large: any datagram of an MTU up to 9000 plus headers.
pub const SCRATCH_SIZE: usize = 9216;

/// Buffers kept in the pool at most (more are freed).
const SCRATCH_KEEP: usize = 64;

impl ScratchPool {
    /// Takes a zeroed-once buffer of [`SCRATCH_SIZE`] bytes.
    pub fn take(&'static self) -> Scratch {
        let buf = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_else(|| vec![0u8; SCRATCH_SIZE]);
        Scratch { buf, pool: self }
    }
}

/// A buffer borrowed from a [`ScratchPool`]; returned on drop.
#[derive(Debug)]
pub struct Scratch {
    /// The bytes.
    pub buf: Vec<u8>,
    pool: &'static ScratchPool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() < SCRATCH_KEEP {
            free.push(buf);
        }
    }
}

/// How long a dropped stream may linger closing before it is reset.
const ORPHAN_LINGER: Duration = Duration::from_secs(30);

/// Packets in and out of smoltcp, as plain queues.
#[derive(Debug)]
pub struct QueueDevice {
    /// IP packets decrypted from the tunnel, waiting for smoltcp.
    pub rx: VecDeque<Vec<u8>>,
    /// IP packets smoltcp produced, waiting to be encrypted.
    pub tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

impl QueueDevice {
    fn new(mtu: usize) -> Self {
        Self {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        }
    }
}

/// Receive token: one queued packet.
#[derive(Debug)]
pub struct RxTok(Vec<u8>);
/// Transmit token: appends one packet to the tx queue.
#[derive(Debug)]
pub struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let pkt = self.rx.pop_front()?;
        Some((RxTok(pkt), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // The queues never drop, but the UDP socket buffers on both ends do: smoltcp
        // has no congestion control by default and sends a whole window at once, so the
        // advertised window is capped to a burst the kernel buffers absorb.
        caps.max_burst_size = Some(MAX_BURST);
        caps
    }
}

/// The mutable part of a [`Stack`]: interface, sockets, device, dropped streams.
pub struct StackCore {
    /// The smoltcp interface.
    pub iface: Interface,
    /// All sockets of this stack.
    pub sockets: SocketSet<'static>,
    /// The packet queues.
    pub dev: QueueDevice,
    orphans: Vec<(SocketHandle, smoltcp::time::Instant)>,
    next_port: u16,
    /// The UDP sockets whose lost datagrams are counted (see [`Stack::poll`]): by
    /// local port, the socket and its drop counter.
    udp_watch: HashMap<u16, (SocketHandle, Arc<AtomicU64>)>,
    /// Set when the tunnel is shut down: streams fail from then on.
    pub closed: bool,
}

impl std::fmt::Debug for StackCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackCore")
            .field("orphans", &self.orphans.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl StackCore {
    /// Adds a TCP socket with the standard buffers.
    pub fn new_tcp_socket(&mut self) -> SocketHandle {
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        );
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        self.sockets.add(sock)
    }

    /// A local port not used by any socket of this stack (49152..=65535, rotating).
    pub fn ephemeral_port(&mut self) -> u16 {
        for _ in 0..16384 {
            let p = self.next_port;
            self.next_port = if p == 65535 { 49152 } else { p + 1 };
            let used = self.sockets.iter().any(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => t.listen_endpoint().port == p,
                smoltcp::socket::Socket::Udp(u) => u.endpoint().port == p,
                #[allow(unreachable_patterns)]
                _ => false,
            });
            if !used {
                return p;
            }
        }
        // 16384 sockets in use: reuse a port; smoltcp tells the tuples apart by remote.
        self.next_port
    }

    /// Counts in `dropped` the datagrams for UDP socket `handle` (bound to `port`) that
    /// smoltcp drops because its receive buffer is full; until [`StackCore::unwatch_udp`].
    pub fn watch_udp(&mut self, port: u16, handle: SocketHandle, dropped: Arc<AtomicU64>) {
        self.udp_watch.insert(port, (handle, dropped));
    }

    /// Stops counting for the UDP socket on `port`.
    pub fn unwatch_udp(&mut self, port: u16) {
        self.udp_watch.remove(&port);
    }

    /// Hands a socket to the stack for closing; it is removed once closed.
    pub fn orphan(&mut self, handle: SocketHandle, now: smoltcp::time::Instant) {
        self.orphans.push((handle, now));
    }

    fn reap(&mut self, now: smoltcp::time::Instant) {
        if self.orphans.is_empty() {
            return;
        }
        let linger = smoltcp::time::Duration::from_micros(ORPHAN_LINGER.as_micros() as u64);
        let sockets = &mut self.sockets;
        self.orphans.retain(|&(h, since)| {
            let done = match sockets.get_mut::<smoltcp::socket::Socket>(h) {
                smoltcp::socket::Socket::Tcp(t) => {
                    if matches!(t.state(), tcp::State::Closed | tcp::State::TimeWait) {
                        true
                    } else {
                        if now - since > linger {
                            t.abort();
                        }
                        false
                    }
                }
                #[allow(unreachable_patterns)]
                _ => true,
            };
            if done {
                sockets.remove(h);
            }
            !done
        });
    }
}

/// A userspace TCP/IP stack (see the module doc).
pub struct Stack {
    core: Mutex<StackCore>,
    /// Wakes the driver: a stream has data to send or window to open. Several stacks
    /// driven by one task (the exit side) share one.
    pub notify: Arc<Notify>,
    epoch: tokio::time::Instant,
    udp_dropped: AtomicU64,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").finish_non_exhaustive()
    }
}

impl Stack {
    /// A stack owning `addrs`; with `any_ip` it accepts packets for every destination
    /// (the exit side terminates flows to arbitrary addresses).
    pub fn new(addrs: &[IpCidr], mtu: usize, any_ip: bool) -> Arc<Self> {
        Self::with_notify(addrs, mtu, any_ip, Arc::new(Notify::new()))
    }

    /// Like [`Stack::new`], waking `notify` instead of a notify of its own.
    pub fn with_notify(
        addrs: &[IpCidr],
        mtu: usize,
        any_ip: bool,
        notify: Arc<Notify>,
    ) -> Arc<Self> {
        let mut dev = QueueDevice::new(mtu);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        let epoch = tokio::time::Instant::now();
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            for cidr in addrs {
                let _ = a.push(*cidr);
            }
        });
        iface.set_any_ip(any_ip);
        let start_port =
            49152 + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 16384) as u16;
        Arc::new(Self {
            core: Mutex::new(StackCore {
                iface,
                sockets: SocketSet::new(Vec::new()),
                dev,
                orphans: Vec::new(),
                next_port: start_port,
                udp_watch: HashMap::new(),
                closed: false,
            }),
            notify,
            epoch,
            udp_dropped: AtomicU64::new(0),
        })
    }

    /// Locks the core (a poisoned lock is still usable: the core has no invariant a
    /// panic in a stream could break halfway).
    pub fn lock(&self) -> MutexGuard<'_, StackCore> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// smoltcp's clock, from tokio's (so paused-time tests drive it).
    pub fn now(&self) -> smoltcp::time::Instant {
        let us = tokio::time::Instant::now()
            .saturating_duration_since(self.epoch)
            .as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(us).unwrap_or(i64::MAX))
    }

    /// Feeds `inbound` packets to smoltcp, runs it, and moves the packets it wants sent
    /// into `outbound`. Returns when smoltcp next wants to be polled.
    pub fn poll(
        &self,
        inbound: &mut Vec<Vec<u8>>,
        outbound: &mut Vec<Vec<u8>>,
    ) -> Option<Duration> {
        let now = self.now();
        let mut core = self.lock();
        let core = &mut *core;
        core.dev.rx.extend(inbound.drain(..));
        core.iface.poll_maintenance(now);
        // What `Interface::poll` does, one packet at a time, so that a datagram a
        // watched UDP socket had no room for (smoltcp drops it silently) is counted:
        // its receive queue did not grow by the datagram.
        for _ in 0..core.dev.rx.len() {
            let watched = core
                .dev
                .rx
                .front()
                .filter(|_| !core.udp_watch.is_empty())
                .and_then(|p| udp_dst(p))
                .filter(|&(_, len)| len > 0)
                .and_then(|(port, len)| Some((core.udp_watch.get(&port)?, len)));
            let before = watched.map(|((h, dropped), len)| {
                (
                    *h,
                    dropped.clone(),
                    len,
                    core.sockets.get::<udp::Socket>(*h).recv_queue(),
                )
            });
            if core
                .iface
                .poll_ingress_single(now, &mut core.dev, &mut core.sockets)
                == smoltcp::iface::PollIngressSingleResult::None
            {
                break;
            }
            // Taken, the queue grew by the payload (and maybe padding); refused, by
            // less (nothing, or padding smoltcp added before finding no room).
            if let Some((h, dropped, len, queued)) = before
                && core
                    .sockets
                    .get::<udp::Socket>(h)
                    .recv_queue()
                    .saturating_sub(queued)
                    < len
            {
                dropped.fetch_add(1, Ordering::Relaxed);
                self.udp_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        while core
            .iface
            .poll_egress(now, &mut core.dev, &mut core.sockets)
            != smoltcp::iface::PollResult::None
        {}
        core.reap(now);
        outbound.extend(core.dev.tx.drain(..));
        core.iface
            .poll_delay(now, &core.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Datagrams for this stack's UDP sockets dropped because the socket's receive
    /// buffer was full (counted for sockets registered with [`StackCore::watch_udp`]).
    pub fn udp_dropped(&self) -> u64 {
        self.udp_dropped.load(Ordering::Relaxed)
    }

    /// Marks the stack closed and aborts every socket.
    pub fn close(&self) {
        let mut core = self.lock();
        core.closed = true;
        let handles: Vec<SocketHandle> = core.sockets.iter().map(|(h, _)| h).collect();
        for h in handles {
            if let smoltcp::socket::Socket::Tcp(t) =
                core.sockets.get_mut::<smoltcp::socket::Socket>(h)
            {
                t.abort();
            }
        }
        drop(core);
        self.notify.notify_one();
    }
}

/// The destination port and payload length of an unfragmented UDP packet (IPv4, or
/// IPv6 without extension headers); `None` for anything else.
fn udp_dst(pkt: &[u8]) -> Option<(u16, usize)> {
    let at = match pkt.first()? >> 4 {
        4 => {
            let ihl = usize::from(pkt.first()? & 0x0f) * 4;
            let frag = u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]) & 0x3fff;
            if *pkt.get(9)? != 17 || frag != 0 || ihl < 20 {
                return None;
            }
            ihl
        }
        6 if *pkt.get(6)? == 17 => 40,
        _ => return None,
    };
    let port = u16::from_be_bytes([*pkt.get(at + 2)?, *pkt.get(at + 3)?]);
    let len = usize::from(u16::from_be_bytes([*pkt.get(at + 4)?, *pkt.get(at + 5)?]));
    Some((port, len.saturating_sub(8)))
}

/// A TCP connection inside a [`Stack`], as a tokio byte stream.
///
/// Dropping it closes the connection gracefully (FIN) in the background.
pub struct StackStream {
    stack: Arc<Stack>,
    handle: SocketHandle,
    eof: bool,
    closed: bool,
}

impl std::fmt::Debug for StackStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackStream")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl StackStream {
    /// Wraps a socket of `stack`; the stream owns it from now on.
    pub fn new(stack: Arc<Stack>, handle: SocketHandle) -> Self {
        Self {
            stack,
            handle,
            eof: false,
            closed: false,
        }
    }

    /// The socket's current TCP state.
    pub fn state(&self) -> tcp::State {
        let mut core = self.stack.lock();
        core.sockets.get_mut::<tcp::Socket>(self.handle).state()
    }

    /// Waits until the socket leaves SYN-SENT/SYN-RECEIVED: `Ok` once established,
    /// an error if it was refused or reset.
    pub async fn established(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut core = self.stack.lock();
            if core.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "tunnel shut down",
                )));
            }
            let sock = core.sockets.get_mut::<tcp::Socket>(self.handle);
            match sock.state() {
                tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => {
                    sock.register_send_waker(cx.waker());
                    sock.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed | tcp::State::TimeWait => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "connection refused inside the tunnel",
                ))),
                _ => Poll::Ready(Ok(())),
            }
        })
        .await
    }

    /// Resets the connection (RST) instead of closing it gracefully.
    pub fn abort(&mut self) {
        let mut core = self.stack.lock();
        core.sockets.get_mut::<tcp::Socket>(self.handle).abort();
        drop(core);
        self.stack.notify.notify_one();
    }
}

impl AsyncRead for StackStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.eof {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        let mut core = this.stack.lock();
        if core.closed {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        }
        let sock = core.sockets.get_mut::<tcp::Socket>(this.handle);
        if sock.can_recv() {
            let n = sock
                .recv(|data| {
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    (n, n)
                })
                .unwrap_or(0);
            drop(core);
            if n > 0 {
                // Reading opened the window: let the driver tell the far end.
                this.stack.notify.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if !sock.may_recv() {
            return match sock.state() {
                tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent => {
                    Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
                }
                _ => {
                    this.eof = true;
                    Poll::Ready(Ok(()))
                }
            };
        }
        sock.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for StackStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut core = self.stack.lock();
        if core.closed {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        }
        let sock = core.sockets.get_mut::<tcp::Socket>(self.handle);
        if !sock.may_send() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if sock.can_send() {
            let n = sock.send_slice(data).unwrap_or(0);
            drop(core);
            self.stack.notify.notify_one();
            return Poll::Ready(Ok(n));
        }
        sock.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes in the send buffer go out as fast as the window allows; there is
        // nothing more to push.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            self.closed = true;
            let mut core = self.stack.lock();
            core.sockets.get_mut::<tcp::Socket>(self.handle).close();
            drop(core);
            self.stack.notify.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StackStream {
    fn drop(&mut self) {
        let now = self.stack.now();
        let mut core = self.stack.lock();
        core.sockets.get_mut::<tcp::Socket>(self.handle).close();
        core.orphan(self.handle, now);
        drop(core);
        self.stack.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::udp_dst;

    /// An IPv4 packet (header of `ihl` words) carrying UDP to `port` with `payload`.
    fn v4(ihl: u8, port: u16, payload: &[u8], frag: u16) -> Vec<u8> {
        let h = usize::from(ihl) * 4;
        let mut p = vec![0u8; h + 8 + payload.len()];
        p[0] = 0x40 | ihl;
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = 17;
        p[h + 2..h + 4].copy_from_slice(&port.to_be_bytes());
        let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
        p[h + 4..h + 6].copy_from_slice(&len.to_be_bytes());
        p[h + 8..].copy_from_slice(payload);
        p
    }

    #[test]
    fn udp_destinations_are_read_and_the_rest_is_not_udp() {
        assert_eq!(udp_dst(&v4(5, 5353, b"hello", 0)), Some((5353, 5)));
        assert_eq!(udp_dst(&v4(6, 9, b"", 0)), Some((9, 0)));
        // Fragments (offset or more-fragments) and other protocols are not.
        assert_eq!(udp_dst(&v4(5, 9, b"x", 0x2000)), None);
        assert_eq!(udp_dst(&v4(5, 9, b"x", 0x0001)), None);
        let mut tcp = v4(5, 9, b"x", 0);
        tcp[9] = 6;
        assert_eq!(udp_dst(&tcp), None);
        assert_eq!(udp_dst(&v4(4, 9, b"x", 0)), None, "IHL under 5");
        let mut v6 = vec![0u8; 48 + 3];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[42..44].copy_from_slice(&53u16.to_be_bytes());
        v6[44..46].copy_from_slice(&11u16.to_be_bytes());
        assert_eq!(udp_dst(&v6), Some((53, 3)));
        assert_eq!(udp_dst(&v6[..43]), None, "truncated");
        assert_eq!(udp_dst(&[]), None);
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = udp_dst(&p);
        }

        #[test]
        fn a_built_packet_reads_back(
            ihl in 5u8..=15,
            port: u16,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            prop_assert_eq!(udp_dst(&v4(ihl, port, &payload, 0)), Some((port, payload.len())));
            // Cut anywhere inside the headers: not read.
            let p = v4(ihl, port, &payload, 0);
            let cut = usize::from(ihl) * 4 + 5;
            prop_assert_eq!(udp_dst(&p[..cut]), None);
        }
    }
}
