//! `ipsx-udpgen`: UDP echo load, straight to an echo target or through a SOCKS5 UDP
//! ASSOCIATE relay (RFC 1928 section 7). `echo` runs the target; `load` keeps a window
//! of datagrams in flight for a while and prints one JSON line: datagrams echoed per
//! second, payload MB/s (one way) and the share lost.

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
            } => {
                let load = Load {
                    target,
                    size,
                    window: window.max(1),
                    duration: Duration::from_secs(duration),
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
}

impl Load {
    async fn run(
        &self,
        label: &str,
        assoc: Option<(TcpStream, SocketAddr)>,
    ) -> std::io::Result<()> {
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
        let (mut sent, mut received, mut in_flight) = (0u64, 0u64, 0usize);
        let started = Instant::now();
        let end = started + self.duration;
        while Instant::now() < end {
            while in_flight < self.window {
                sock.send(&datagram).await?;
                sent += 1;
                in_flight += 1;
            }
            match tokio::time::timeout(Duration::from_millis(20), sock.recv(&mut buf)).await {
                Ok(Ok(n)) if n >= self.size => {
                    received += 1;
                    in_flight -= 1;
                }
                Ok(Ok(_)) => in_flight -= 1,
                Ok(Err(e)) => return Err(e),
                // Lost datagrams: refill the window.
                Err(_) => in_flight = 0,
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "label": label,
            "size": self.size,
            "window": self.window,
            "sent": sent,
            "received": received,
            "pps": received as f64 / secs,
            "mb_per_s": received as f64 * self.size as f64 / secs / 1e6,
            "loss": if sent == 0 { 0.0 } else { 1.0 - received as f64 / sent as f64 },
        });
        println!("{line}");
        Ok(())
    }
}
