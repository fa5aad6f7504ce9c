//! `ipsx-udpgen`: UDP echo load, straight to an echo target or through a SOCKS5 UDP
//! ASSOCIATE relay (RFC 1928 section 7). `echo` runs the target; `load` keeps a window
//! of datagrams in flight for a while and prints one JSON line: datagrams echoed per
//! second, payload MB/s (one way) and the share lost.
//!
//! Every payload starts with a sequence number, so each answer is matched to its
//! datagram: the window holds at most `--window` unanswered datagrams, one counts as
//! lost only when unanswered after `--lost-after-ms` (an answer after that is `late`),
//! and the stragglers of the last window are waited for. (An earlier version refilled
//! the whole window after 20 ms without an answer, so a slow path got more than the
//! window in flight and its own buffers overflowed: loss the generator made.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

#[derive(Parser, Debug)]
#[command(about = "UDP echo load generator for the ipsx SOCKS5 UDP benchmark")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Answer every datagram with itself.
    Echo {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Echo load against `target`, through `socks` when given.
    Load {
        /// The echo target.
        #[arg(long)]
        target: SocketAddr,
        /// A SOCKS5 proxy to relay through (UDP ASSOCIATE).
        #[arg(long)]
        socks: Option<SocketAddr>,
        /// RFC 1929 username.
        #[arg(long, default_value = "bench")]
        user: String,
        /// RFC 1929 password.
        #[arg(long, default_value = "")]
        pass: String,
        /// Payload bytes per datagram.
        #[arg(long, default_value_t = 512)]
        size: usize,
        /// Datagrams in flight.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 5)]
        duration: u64,
        /// A label for the JSON line.
        #[arg(long, default_value = "load")]
        label: String,
        /// Milliseconds after which an unanswered datagram counts as lost (its place
        /// in the window is then reused; a later answer counts as late).
        #[arg(long, default_value_t = 1000)]
        lost_after_ms: u64,
    },
}

fn main() {
    let args = Args::parse();
    let rt = ipsx_benches::current_thread_runtime();
    let result = rt.block_on(async {
        match args.command {
            Command::Echo { listen } => echo(listen).await,
            Command::Load {
                target,
                socks,
                user,
                pass,
                size,
                window,
                duration,
                label,
                lost_after_ms,
            } => {
                let load = Load {
                    target,
                    size,
                    window: window.max(1),
                    duration: Duration::from_secs(duration),
                    lost_after: Duration::from_millis(lost_after_ms.max(1)),
                };
                let assoc = match socks {
                    Some(proxy) => Some(associate(proxy, &user, &pass).await?),
                    None => None,
                };
                load.run(&label, assoc).await
            }
        }
    });
    if let Err(e) = result {
        eprintln!("ipsx-udpgen: {e}");
        std::process::exit(1);
    }
}

async fn echo(listen: SocketAddr) -> std::io::Result<()> {
    let sock = UdpSocket::bind(listen).await?;
    println!("udp echo listening on {}", sock.local_addr()?);
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let _ = sock.send_to(&buf[..n], from).await;
    }
}

/// The control connection (kept open for the association's life) and the relay.
async fn associate(
    proxy: SocketAddr,
    user: &str,
    pass: &str,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let bad = |m: &str| std::io::Error::other(m.to_owned());
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(&[5, 1, 2]).await?;
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await?;
    if two != [5, 2] {
        return Err(bad("proxy refused username/password auth"));
    }
    let mut auth = vec![1u8, u8::try_from(user.len()).map_err(|_| bad("long user"))?];
    auth.extend_from_slice(user.as_bytes());
    auth.push(u8::try_from(pass.len()).map_err(|_| bad("long password"))?);
    auth.extend_from_slice(pass.as_bytes());
    s.write_all(&auth).await?;
    s.read_exact(&mut two).await?;
    if two != [1, 0] {
        return Err(bad("auth failed"));
    }
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[1] != 0 {
        return Err(bad(&format!(
            "UDP ASSOCIATE refused: reply {:#04x}",
            head[1]
        )));
    }
    let relay = match head[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await?;
            SocketAddr::from(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([a[4], a[5]])))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            SocketAddr::from((ip, u16::from_be_bytes([a[16], a[17]])))
        }
        _ => return Err(bad("bad reply address type")),
    };
    Ok((s, relay))
}

struct Load {
    target: SocketAddr,
    size: usize,
    window: usize,
    duration: Duration,
    lost_after: Duration,
}

/// Bytes of the sequence number at the start of every payload.
const SEQ_LEN: usize = 8;

/// The datagrams in flight, oldest first: (sequence number, sent at, answered).
/// At most `window` unanswered entries are younger than `lost_after`; older
/// unanswered ones are lost.
#[derive(Default)]
struct Flight {
    entries: std::collections::VecDeque<(u64, Instant, bool)>,
    outstanding: usize,
    received: u64,
    lost: u64,
    late: u64,
}

impl Flight {
    fn sent(&mut self, seq: u64, at: Instant) {
        self.entries.push_back((seq, at, false));
        self.outstanding += 1;
    }

    /// An answer carrying `seq`: counted once if still in flight, as late otherwise.
    fn answered(&mut self, seq: u64) {
        let Some(&(front, _, _)) = self.entries.front() else {
            self.late += 1;
            return;
        };
        let Some(i) = seq.checked_sub(front).and_then(|d| usize::try_from(d).ok()) else {
            self.late += 1;
            return;
        };
        match self.entries.get_mut(i) {
            Some(e) if !e.2 => {
                e.2 = true;
                self.outstanding -= 1;
                self.received += 1;
            }
            _ => self.late += 1,
        }
    }

    /// Retires answered entries and declares those older than `lost_after` lost.
    fn expire(&mut self, now: Instant, lost_after: Duration) {
        while let Some(&(_, at, done)) = self.entries.front() {
            if done {
                self.entries.pop_front();
            } else if now.duration_since(at) >= lost_after {
                self.entries.pop_front();
                self.outstanding -= 1;
                self.lost += 1;
            } else {
                break;
            }
        }
    }

    /// When the oldest unanswered datagram will be declared lost.
    fn next_deadline(&self, lost_after: Duration) -> Option<Instant> {
        self.entries
            .iter()
            .find(|e| !e.2)
            .map(|&(_, at, _)| at + lost_after)
    }
}

impl Load {
    async fn run(
        &self,
        label: &str,
        assoc: Option<(TcpStream, SocketAddr)>,
    ) -> std::io::Result<()> {
        if self.size < SEQ_LEN {
            return Err(std::io::Error::other(format!(
                "--size must be at least {SEQ_LEN} (the sequence number)"
            )));
        }
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let mut datagram = Vec::new();
        let (header_len, _control) = match assoc {
            Some((control, relay)) => {
                sock.connect(relay).await?;
                let SocketAddr::V4(t) = self.target else {
                    return Err(std::io::Error::other("IPv4 targets only"));
                };
                datagram.extend_from_slice(&[0, 0, 0, 1]);
                datagram.extend_from_slice(&t.ip().octets());
                datagram.extend_from_slice(&t.port().to_be_bytes());
                (datagram.len(), Some(control))
            }
            None => {
                sock.connect(self.target).await?;
                (0, None)
            }
        };
        datagram.resize(header_len + self.size, 0x5a);
        let mut buf = vec![0u8; 65536];
        let mut flight = Flight::default();
        let (mut sent, mut seq) = (0u64, 0u64);
        let started = Instant::now();
        let end = started + self.duration;
        // Load for `duration`, then wait for the stragglers (up to `lost_after`) so
        // that only datagrams really not answered count as lost.
        let mut counted = None;
        loop {
            let now = Instant::now();
            flight.expire(now, self.lost_after);
            if now >= end && counted.is_none() {
                counted = Some((flight.received, now));
            }
            if now >= end && flight.outstanding == 0 {
                break;
            }
            while now < end && flight.outstanding < self.window {
                datagram[header_len..header_len + SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
                sock.send(&datagram).await?;
                flight.sent(seq, Instant::now());
                seq += 1;
                sent += 1;
            }
            let wake = flight
                .next_deadline(self.lost_after)
                .unwrap_or(now + self.lost_after);
            let wake = if now < end { wake.min(end) } else { wake };
            match tokio::time::timeout_at(wake.into(), sock.recv(&mut buf)).await {
                // The echo's payload is the last `size` bytes (after a SOCKS header).
                Ok(Ok(n)) if n >= self.size => {
                    let at = n - self.size;
                    let mut s = [0u8; SEQ_LEN];
                    s.copy_from_slice(&buf[at..at + SEQ_LEN]);
                    flight.answered(u64::from_be_bytes(s));
                }
                Ok(Ok(_)) => flight.late += 1,
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
        }
        let (received, stop) = counted.unwrap_or((flight.received, Instant::now()));
        let secs = stop.duration_since(started).as_secs_f64();
        let line = serde_json::json!({
            "label": label,
            "size": self.size,
            "window": self.window,
            "sent": sent,
            "received": flight.received,
            "lost": flight.lost,
            "late": flight.late,
            "pps": received as f64 / secs,
            "mb_per_s": received as f64 * self.size as f64 / secs / 1e6,
            "loss": if sent == 0 { 0.0 } else { flight.lost as f64 / sent as f64 },
        });
        println!("{line}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_answers_once_and_loses_only_the_unanswered() {
        let t0 = Instant::now();
        let lost_after = Duration::from_secs(1);
        let mut f = Flight::default();
        for seq in 0..4 {
            f.sent(seq, t0);
        }
        f.answered(2);
        f.answered(2); // a duplicate
        f.answered(0);
        f.answered(9); // never sent
        assert_eq!((f.received, f.outstanding, f.late), (2, 2, 2));
        f.expire(t0 + Duration::from_millis(999), lost_after);
        assert_eq!((f.lost, f.outstanding), (0, 2));
        assert_eq!(f.next_deadline(lost_after), Some(t0 + lost_after));
        f.expire(t0 + lost_after, lost_after);
        assert_eq!((f.lost, f.outstanding, f.entries.len()), (2, 0, 0));
        f.answered(1); // after it was declared lost
        assert_eq!((f.received, f.late), (2, 3));
        assert_eq!(f.next_deadline(lost_after), None);
    }
}
