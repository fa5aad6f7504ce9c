//! UDP through a tunnel: a smoltcp UDP socket bound to an ephemeral port of the
//! tunnel's inner address. Datagrams sent to any destination leave from the exit (the
//! provider relays them out of its exit address); answers come back to the same port.
//!
//! Memory is bounded by the socket's packet buffers: a sender that outruns the tunnel
//! waits in [`TunnelUdpSocket::send_to`] until the driver drained the queue, and
//! answers that nobody reads are dropped by smoltcp once the receive buffer is full
//! (UDP semantics), and counted ([`TunnelUdpSocket::dropped`], and per tunnel in its
//! health counters). The receive buffer holds several of the driver's batches of
//! full-size datagrams, so a reader that keeps up loses none.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpEndpoint};

use crate::TunnelError;
use crate::netstack::Stack;

/// Bytes of each direction's packet buffer of a [`TunnelUdpSocket`] (allocated
/// zeroed, so pages are committed only as the ring is used). 64 KiB held only 53
/// datagrams of 1,200 bytes, fewer than the driver hands the stack in one turn.
pub const UDP_BUFFER: usize = 256 * 1024;
/// Datagrams each direction's buffer holds at most.
pub const UDP_PACKETS: usize = 256;

/// IPv4 and UDP headers: what an IPv4 datagram adds to its payload.
const V4_OVERHEAD: usize = 20 + 8;
/// IPv6 and UDP headers.
const V6_OVERHEAD: usize = 40 + 8;

/// A UDP socket inside a tunnel. Dropping it removes the socket from the stack.
pub struct TunnelUdpSocket {
    stack: Arc<Stack>,
    handle: SocketHandle,
    port: u16,
    mtu: usize,
    has_v6: bool,
    buffer: usize,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for TunnelUdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelUdpSocket")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TunnelUdpSocket {
    /// Binds a socket on an ephemeral port of `stack`, with `buffer` bytes and
    /// `packets` datagrams of room each way.
    pub(crate) fn bind(
        stack: &Arc<Stack>,
        mtu: usize,
        has_v6: bool,
        buffer: usize,
        packets: usize,
    ) -> Result<Self, TunnelError> {
        let mut core = stack.lock();
        if core.closed {
            return Err(TunnelError::Closed);
        }
        let port = core.ephemeral_port();
        let meta = || vec![udp::PacketMetadata::EMPTY; packets];
        let mut sock = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; buffer]),
            udp::PacketBuffer::new(meta(), vec![0; buffer]),
        );
        sock.bind(port).map_err(|_| TunnelError::Closed)?;
        let handle = core.sockets.add(sock);
        let dropped = Arc::new(AtomicU64::new(0));
        core.watch_udp(port, handle, dropped.clone());
        Ok(Self {
            stack: stack.clone(),
            handle,
            port,
            mtu,
            has_v6,
            buffer,
            dropped,
        })
    }

    /// The socket's port on the tunnel's inner address.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Datagrams that arrived for this socket while its receive buffer was full, and
    /// were dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The largest payload that can be sent to `dst` in one datagram: the tunnel's MTU
    /// less the IP and UDP headers (datagrams are not fragmented inside the tunnel).
    pub fn max_payload(&self, dst: &SocketAddr) -> usize {
        let overhead = if dst.is_ipv4() {
            V4_OVERHEAD
        } else {
            V6_OVERHEAD
        };
        self.mtu.saturating_sub(overhead).min(self.buffer)
    }

    /// Sends one datagram to `dst` through the tunnel, waiting while the socket's send
    /// queue is full.
    pub async fn send_to(&self, data: &[u8], dst: SocketAddr) -> Result<(), TunnelError> {
        std::future::poll_fn(|cx| self.poll_send_to(cx, data, dst)).await
    }

    /// Polls sending one datagram (see [`TunnelUdpSocket::send_to`]).
    pub fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        data: &[u8],
        dst: SocketAddr,
    ) -> Poll<Result<(), TunnelError>> {
        if dst.is_ipv6() && !self.has_v6 {
            return Poll::Ready(Err(TunnelError::NoIpv6(dst)));
        }
        if dst.port() == 0 || dst.ip().is_unspecified() {
            return Poll::Ready(Err(TunnelError::BadDestination(dst)));
        }
        let max = self.max_payload(&dst);
        if data.len() > max {
            return Poll::Ready(Err(TunnelError::DatagramTooLarge {
                size: data.len(),
                max,
            }));
        }
        let mut core = self.stack.lock();
        if core.closed {
            return Poll::Ready(Err(TunnelError::Closed));
        }
        let sock = core.sockets.get_mut::<udp::Socket>(self.handle);
        match sock.send_slice(data, IpEndpoint::new(IpAddress::from(dst.ip()), dst.port())) {
            Ok(()) => {
                drop(core);
                self.stack.notify.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(udp::SendError::BufferFull) => {
                sock.register_send_waker(cx.waker());
                drop(core);
                // The queue drains only when the driver runs.
                self.stack.notify.notify_one();
                Poll::Pending
            }
            Err(udp::SendError::Unaddressable) => {
                Poll::Ready(Err(TunnelError::BadDestination(dst)))
            }
        }
    }

    /// Receives one datagram: copies it into `buf` and returns its full length and
    /// source. A datagram longer than `buf` is cut to `buf.len()` bytes; the length
    /// returned says so.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), TunnelError> {
        std::future::poll_fn(|cx| self.poll_recv_from(cx, buf)).await
    }

    /// Polls receiving one datagram (see [`TunnelUdpSocket::recv_from`]).
    pub fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<Result<(usize, SocketAddr), TunnelError>> {
        let mut core = self.stack.lock();
        if core.closed {
            return Poll::Ready(Err(TunnelError::Closed));
        }
        let sock = core.sockets.get_mut::<udp::Socket>(self.handle);
        match sock.recv() {
            Ok((data, meta)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                let from = SocketAddr::new(IpAddr::from(meta.endpoint.addr), meta.endpoint.port);
                Poll::Ready(Ok((data.len(), from)))
            }
            Err(_) => {
                sock.register_recv_waker(cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for TunnelUdpSocket {
    fn drop(&mut self) {
        let mut core = self.stack.lock();
        core.unwatch_udp(self.port);
        core.sockets.remove(self.handle);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::task::Waker;

    use smoltcp::wire::IpCidr;

    use super::*;

    fn stack() -> Arc<Stack> {
        Stack::new(&[IpCidr::new(IpAddress::v4(10, 77, 0, 2), 32)], 1420, false)
    }

    #[tokio::test]
    async fn sizes_and_destinations_are_checked_before_queueing() {
        let stack = stack();
        let s = TunnelUdpSocket::bind(&stack, 1420, false, UDP_BUFFER, 4).unwrap();
        let dst: SocketAddr = "203.0.113.1:9".parse().unwrap();
        assert_eq!(s.max_payload(&dst), 1420 - 28);
        assert!(matches!(
            s.send_to(&[0; 1393], dst).await,
            Err(TunnelError::DatagramTooLarge {
                size: 1393,
                max: 1392
            })
        ));
        s.send_to(&[0; 1392], dst).await.unwrap();
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        assert!(matches!(
            s.send_to(b"x", v6).await,
            Err(TunnelError::NoIpv6(_))
        ));
        for bad in ["203.0.113.1:0", "0.0.0.0:9"] {
            assert!(matches!(
                s.send_to(b"x", bad.parse().unwrap()).await,
                Err(TunnelError::BadDestination(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_full_queue_waits_and_a_closed_stack_fails() {
        let stack = stack();
        let s = TunnelUdpSocket::bind(&stack, 1420, false, UDP_BUFFER, 2).unwrap();
        let dst: SocketAddr = "203.0.113.1:9".parse().unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        // Two datagrams of room and no driver draining them: the third waits.
        for _ in 0..2 {
            assert!(matches!(
                s.poll_send_to(&mut cx, b"x", dst),
                Poll::Ready(Ok(()))
            ));
        }
        assert!(s.poll_send_to(&mut cx, b"x", dst).is_pending());
        // Running the stack sends the queue out: room again.
        let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
        stack.poll(&mut inbound, &mut outbound);
        assert_eq!(outbound.len(), 2);
        assert!(matches!(
            s.poll_send_to(&mut cx, b"x", dst),
            Poll::Ready(Ok(()))
        ));
        let mut buf = [0u8; 16];
        assert!(s.poll_recv_from(&mut cx, &mut buf).is_pending());
        stack.close();
        assert!(matches!(
            s.recv_from(&mut buf).await,
            Err(TunnelError::Closed)
        ));
        assert!(matches!(
            s.send_to(b"x", dst).await,
            Err(TunnelError::Closed)
        ));
    }
}
