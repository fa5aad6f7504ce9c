//! Copies bytes both ways between the client and the exit until both sides are done or
//! nothing moves either way for the idle timeout. Buffers are fixed (16 KiB a
//! direction), so memory per tunnel is bounded whatever the peers do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Bytes per direction buffered at most.
pub const RELAY_BUFFER: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes client -> target.
    pub up: u64,
    /// Bytes target -> client.
    pub down: u64,
    /// Closed because nothing moved for the idle timeout.
    pub idle_closed: bool,
}

/// Relays until both directions end, an error occurs, the idle timeout passes with no
/// bytes either way, or `stop` resolves (shutdown).
pub async fn relay<A, B>(
    a: A,
    b: B,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> RelayStats
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    relay_halves((ar, aw), (br, bw), idle, stop).await
}

/// [`relay`] between two TCP sockets, on their borrowed halves (no lock around each
/// read and write, as `tokio::io::split` needs).
pub async fn relay_tcp(
    a: &mut tokio::net::TcpStream,
    b: &mut tokio::net::TcpStream,
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> RelayStats {
    relay_halves(a.split(), b.split(), idle, stop).await
}

async fn relay_halves<AR, AW, BR, BW>(
    (mut ar, mut aw): (AR, AW),
    (mut br, mut bw): (BR, BW),
    idle: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> RelayStats
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let up = copy_one_way(&mut ar, &mut bw, &activity);
    let down = copy_one_way(&mut br, &mut aw, &activity);
    let both = async { tokio::join!(up, down) };
    let watchdog = async {
        loop {
            let deadline = activity.last() + idle;
            tokio::time::sleep_until(deadline).await;
            if activity.last() + idle <= Instant::now() {
                return;
            }
        }
    };
    tokio::select! {
        (up, down) = both => RelayStats { up, down, idle_closed: false },
        () = watchdog => RelayStats { up: 0, down: 0, idle_closed: true },
        () = stop => RelayStats { up: 0, down: 0, idle_closed: false },
    }
}

/// The time of the last byte either way, shared by both directions.
struct Activity {
    base: Instant,
    micros: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            micros: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let us = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.micros.store(us, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }
}

async fn copy_one_way<R, W>(r: &mut R, w: &mut W, last: &Activity) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        last.touch();
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        last.touch();
    }
    let _ = w.shutdown().await;
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_close_after_the_timeout() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let stats = relay(a, b, Duration::from_secs(30), std::future::pending()).await;
        assert!(stats.idle_closed);
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_propagates() {
        let (a, mut client) = tokio::io::duplex(1024);
        let (b, mut target) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(a, b, Duration::from_secs(30), std::future::pending()));
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        target.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        target.write_all(b"pong").await.unwrap();
        target.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let stats = task.await.unwrap();
        assert_eq!((stats.up, stats.down, stats.idle_closed), (4, 4, false));
    }
}
