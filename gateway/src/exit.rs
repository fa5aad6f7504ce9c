//! Exits: how traffic leaves the gateway.
//!
//! An exit dials `host:port` for a client. Every kind of exit resolves the name where
//! the traffic leaves (a local exit here; a tunnel exit at the far end), then the
//! gateway checks the address actually dialled against the destination policy (DNS
//! rebinding defence), then connects. Plain-HTTP requests use that same dial (see
//! `upstream.rs`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use ipsx_config::{ExitConfig, ExitTransport};
use ipsx_rotation::ExitId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::dest::{refused_local, refused_range};
use crate::http1::Host;

/// Why dialling through an exit failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The destination is in a refused range (403 / SOCKS 0x02). The message names the
    /// host as the client wrote it, never the address it resolved to (that would make
    /// the gateway an oracle for internal DNS).
    #[error("destination `{host}` is a private address: refused")]
    Refused {
        /// The host as the client wrote it.
        host: String,
        /// The address that would have been dialled (for logs only).
        ip: IpAddr,
        /// The range it falls in (for logs only).
        range: &'static str,
    },
    /// The name did not resolve (502 / SOCKS 0x04).
    #[error("cannot resolve `{host}`: {message}")]
    Resolve {
        /// The name.
        host: String,
        /// Why.
        message: String,
    },
    /// No address of a family this exit can reach.
    #[error("`{host}` has no address this exit can reach (exit source {bind})")]
    NoUsableAddress {
        /// The name.
        host: String,
        /// The exit's source address.
        bind: IpAddr,
    },
    /// Connect took longer than the connect timeout (504 / SOCKS 0x06).
    #[error("connect to {addr} timed out")]
    Timeout {
        /// The address.
        addr: String,
    },
    /// The WireGuard tunnel to the exit failed (502 / SOCKS 0x04).
    #[error("tunnel: {message}")]
    Tunnel {
        /// What the tunnel said.
        message: String,
        /// Whether another exit may be tried (nothing was sent).
        retry_elsewhere: bool,
    },
    /// The target refused or the network failed (502 / SOCKS 0x05).
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: Arc<io::Error>,
    },
}

impl DialError {
    /// True when the failure says something about the exit (ban rules count it).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    fn from_tunnel(e: ipsx_tunnel_pool::TunnelError) -> Self {
        match e {
            ipsx_tunnel_pool::TunnelError::ConnectTimeout(addr) => Self::Timeout {
                addr: addr.to_string(),
            },
            other => Self::Tunnel {
                retry_elsewhere: other.retry_elsewhere(),
                message: other.to_string(),
            },
        }
    }
}

/// What a dial needs besides the destination.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    /// Ranges allowed despite being private/loopback.
    pub allow: Arc<Vec<IpNet>>,
    /// Connect timeout (resolution included).
    pub connect_timeout: Duration,
    /// The gateway's own listening sockets (proxy and admin), never dialled through a
    /// local exit unless on loopback.
    pub own: OwnSockets,
}

/// The gateway's own listening sockets, shared by every exit and updated when a
/// listener is bound (its real port may differ from the config's port 0).
#[derive(Debug, Clone, Default)]
pub struct OwnSockets(Arc<std::sync::RwLock<Vec<SocketAddr>>>);

impl OwnSockets {
    /// Notes one more listening socket.
    pub fn add(&self, addr: SocketAddr) {
        let mut list = self.0.write().unwrap_or_else(|p| p.into_inner());
        if !list.contains(&addr) {
            list.push(addr);
        }
    }

    /// The sockets noted so far.
    pub fn list(&self) -> Vec<SocketAddr> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A stream opened through an exit.
#[derive(Debug)]
pub enum ExitStream {
    /// A TCP socket from a local source address.
    Tcp(TcpStream),
    /// A TCP stream inside a WireGuard tunnel.
    Tunnel(ipsx_tunnel_pool::TunnelStream),
}

impl ExitStream {
    /// The local address of the outgoing side, for the SOCKS reply.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(s) => s.local_addr().ok(),
            Self::Tunnel(_) => None,
        }
    }
}

impl AsyncRead for ExitStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ExitStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tunnel(s) => s.is_write_vectored(),
        }
    }
}

/// One exit as the gateway runs it: its config and its dialler.
pub struct ExitRuntime {
    /// The exit's id in the rotator.
    pub id: ExitId,
    /// Its config, as loaded.
    pub config: ExitConfig,
    dialer: Dialer,
}

impl std::fmt::Debug for ExitRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitRuntime")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ExitRuntime {
    /// Builds the runtime of a configured exit.
    pub fn new(config: ExitConfig, policy: DialPolicy) -> Self {
        Self::with_tunnel(config, policy, None)
    }

    /// As [`ExitRuntime::new`], with a WireGuard tunnel that is already up.
    pub fn with_tunnel(
        config: ExitConfig,
        policy: DialPolicy,
        tunnel: Option<ipsx_tunnel_pool::Tunnel>,
    ) -> Self {
        let dialer = Dialer {
            inner: Arc::new(DialerInner {
                transport: config.transport.clone(),
                policy,
                tunnel: match tunnel {
                    Some(t) => tokio::sync::OnceCell::new_with(Some(t)),
                    None => tokio::sync::OnceCell::new(),
                },
            }),
        };
        Self {
            id: ExitId::from(config.name.as_str()),
            config,
            dialer,
        }
    }

    /// Starts this exit's WireGuard tunnel now (no-op for local exits or when started).
    pub async fn start_tunnel(&self) -> Result<Option<ipsx_tunnel_pool::Tunnel>, DialError> {
        self.dialer.tunnel().await
    }

    /// The started tunnel, if this is a WireGuard exit whose tunnel is up.
    pub fn tunnel(&self) -> Option<&ipsx_tunnel_pool::Tunnel> {
        self.dialer.inner.tunnel.get()
    }

    /// Opens a stream to `host:port` through this exit.
    pub async fn dial(&self, host: &Host, port: u16) -> Result<ExitStream, DialError> {
        self.dialer.dial(host, port).await
    }

    /// Opens a UDP socket through this exit (a SOCKS5 UDP association's outside end):
    /// bound to a local exit's source address, or inside the exit's tunnel.
    pub async fn open_udp(&self) -> Result<ExitUdp, DialError> {
        self.dialer.open_udp().await
    }

    /// Resolves and checks one UDP destination the way [`ExitRuntime::dial`] checks a
    /// TCP one (names resolved where the traffic leaves; refused ranges, own addresses
    /// for a local exit): the address to send to, or why not.
    pub async fn udp_destination(&self, host: &Host, port: u16) -> Result<SocketAddr, DialError> {
        self.dialer.udp_destination(host, port).await
    }

    /// True when this runtime can keep serving `config` (same transport and policy), so
    /// a reload keeps it (and its tunnel).
    pub fn same_transport(&self, config: &ExitConfig, policy: &DialPolicy) -> bool {
        self.config.transport == config.transport
            && *self.dialer.inner.policy.allow == *policy.allow
            && self.dialer.inner.policy.connect_timeout == policy.connect_timeout
    }
}

/// Dials through one exit.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<DialerInner>,
}

struct DialerInner {
    transport: ExitTransport,
    policy: DialPolicy,
    /// The started tunnel of a WireGuard exit (started once, on first use or by
    /// [`ExitRuntime::start_tunnel`]).
    tunnel: tokio::sync::OnceCell<ipsx_tunnel_pool::Tunnel>,
}

impl Dialer {
    async fn dial(&self, host: &Host, port: u16) -> Result<ExitStream, DialError> {
        let timeout = self.inner.policy.connect_timeout;
        let shown = format!("{}:{port}", host.to_header());
        match tokio::time::timeout(timeout, self.dial_inner(host, port)).await {
            Ok(result) => result,
            Err(_) => Err(DialError::Timeout { addr: shown }),
        }
    }

    async fn tunnel(&self) -> Result<Option<ipsx_tunnel_pool::Tunnel>, DialError> {
        let ExitTransport::WireGuard { tunnel, .. } = &self.inner.transport else {
            return Ok(None);
        };
        self.inner
            .tunnel
            .get_or_try_init(|| ipsx_tunnel_pool::Tunnel::start((**tunnel).clone()))
            .await
            .cloned()
            .map(Some)
            .map_err(DialError::from_tunnel)
    }

    /// The addresses `host` stands for where traffic leaves: an address as it is; a
    /// name resolved at the exit (through the tunnel: no DNS leak, geo-correct
    /// answers) or here for a local exit.
    async fn candidates(&self, host: &Host, port: u16) -> Result<Vec<IpAddr>, DialError> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![*ip]),
            Host::Name(name) => name,
        };
        let resolve_err = |message: String| DialError::Resolve {
            host: name.clone(),
            message,
        };
        match &self.inner.transport {
            ExitTransport::WireGuard { .. } => {
                let Some(tunnel) = self.tunnel().await? else {
                    return Err(tunnel_not_started());
                };
                tunnel
                    .resolve(name)
                    .await
                    .map_err(|e| resolve_err(e.to_string()))
            }
            ExitTransport::Local { .. } => Ok(tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|e| resolve_err(e.to_string()))?
                .map(|a| a.ip())
                .collect()),
        }
    }

    /// Why `ip:port` may not be reached through this exit, or `None`: the refused
    /// ranges (less the allow-list), and for a local exit this machine's own addresses.
    /// Checked on the address actually used, after resolution.
    fn refused(&self, ip: IpAddr, port: u16) -> Option<&'static str> {
        let allow = &self.inner.policy.allow;
        refused_range(ip, allow).or_else(|| match &self.inner.transport {
            ExitTransport::Local { .. } => {
                refused_local(ip, port, allow, &self.inner.policy.own.list())
            }
            ExitTransport::WireGuard { .. } => None,
        })
    }

    async fn dial_inner(&self, host: &Host, port: u16) -> Result<ExitStream, DialError> {
        let candidates = self.candidates(host, port).await?;
        let mut refused = None;
        let mut last_err = None;
        match &self.inner.transport {
            ExitTransport::WireGuard { .. } => {
                let Some(tunnel) = self.tunnel().await? else {
                    return Err(tunnel_not_started());
                };
                for ip in candidates {
                    let ip = ipsx_egress::canonical(ip);
                    if let Some(range) = self.refused(ip, port) {
                        refused.get_or_insert_with(|| refusal(host, ip, range));
                        continue;
                    }
                    match tunnel.connect_tcp(SocketAddr::new(ip, port)).await {
                        Ok(stream) => return Ok(ExitStream::Tunnel(stream)),
                        Err(e) => last_err = Some(DialError::from_tunnel(e)),
                    }
                }
                Err(last_err.or(refused).unwrap_or_else(|| DialError::Resolve {
                    host: host.to_header(),
                    message: "no address".into(),
                }))
            }
            ExitTransport::Local { bind } => {
                for ip in candidates {
                    let ip = ipsx_egress::canonical(ip);
                    if let Some(range) = self.refused(ip, port) {
                        refused.get_or_insert_with(|| refusal(host, ip, range));
                        continue;
                    }
                    if ip.is_ipv4() != bind.is_ipv4() {
                        continue;
                    }
                    let addr = SocketAddr::new(ip, port);
                    match connect_from(*bind, addr).await {
                        Ok(s) => return Ok(ExitStream::Tcp(s)),
                        Err(source) => {
                            last_err = Some(DialError::Connect {
                                addr,
                                source: Arc::new(source),
                            })
                        }
                    }
                }
                Err(last_err
                    .or(refused)
                    .unwrap_or_else(|| DialError::NoUsableAddress {
                        host: host.to_header(),
                        bind: *bind,
                    }))
            }
        }
    }

    async fn open_udp(&self) -> Result<ExitUdp, DialError> {
        match &self.inner.transport {
            ExitTransport::WireGuard { .. } => {
                let Some(tunnel) = self.tunnel().await? else {
                    return Err(tunnel_not_started());
                };
                tunnel
                    .udp_socket()
                    .map(ExitUdp::Tunnel)
                    .map_err(DialError::from_tunnel)
            }
            ExitTransport::Local { bind } => {
                let addr = SocketAddr::new(*bind, 0);
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .map(ExitUdp::Local)
                    .map_err(|source| DialError::Connect {
                        addr,
                        source: Arc::new(source),
                    })
            }
        }
    }

    async fn udp_destination(&self, host: &Host, port: u16) -> Result<SocketAddr, DialError> {
        let timeout = self.inner.policy.connect_timeout;
        let candidates = match tokio::time::timeout(timeout, self.candidates(host, port)).await {
            Ok(found) => found?,
            Err(_) => {
                return Err(DialError::Timeout {
                    addr: format!("{}:{port}", host.to_header()),
                });
            }
        };
        let mut refused = None;
        for ip in candidates {
            let ip = ipsx_egress::canonical(ip);
            if let Some(range) = self.refused(ip, port) {
                refused.get_or_insert_with(|| refusal(host, ip, range));
                continue;
            }
            let usable = match &self.inner.transport {
                ExitTransport::Local { bind } => ip.is_ipv4() == bind.is_ipv4(),
                ExitTransport::WireGuard { tunnel, .. } => {
                    ip.is_ipv4() || tunnel.inner_addr_v6.is_some()
                }
            };
            if usable {
                return Ok(SocketAddr::new(ip, port));
            }
        }
        Err(refused.unwrap_or_else(|| DialError::Resolve {
            host: host.to_header(),
            message: "no address this exit can reach".into(),
        }))
    }
}

fn tunnel_not_started() -> DialError {
    DialError::Tunnel {
        message: "tunnel not started".into(),
        retry_elsewhere: true,
    }
}

/// A UDP socket through an exit: datagrams leave from the exit's address.
#[derive(Debug)]
pub enum ExitUdp {
    /// A UDP socket bound to a local exit's source address.
    Local(tokio::net::UdpSocket),
    /// A UDP socket on the inner address of a WireGuard tunnel.
    Tunnel(ipsx_tunnel_pool::TunnelUdpSocket),
}

impl ExitUdp {
    /// Sends one datagram to `dst` (an address already checked with
    /// [`ExitRuntime::udp_destination`]).
    pub async fn send_to(&self, data: &[u8], dst: SocketAddr) -> io::Result<()> {
        match self {
            Self::Local(s) => s.send_to(data, dst).await.map(drop),
            Self::Tunnel(s) => s
                .send_to(data, dst)
                .await
                .map_err(|e| io::Error::other(e.to_string())),
        }
    }

    /// Receives one datagram into `buf`: its length and source. A length above
    /// `buf.len()` means it was cut (a local socket cuts silently, so give it a buffer
    /// one byte larger than the largest datagram wanted to tell).
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        match self {
            Self::Local(s) => s.recv_from(buf).await,
            Self::Tunnel(s) => s
                .recv_from(buf)
                .await
                .map_err(|e| io::Error::other(e.to_string())),
        }
    }

    /// Answers dropped before the relay read them because the socket was full: counted
    /// inside a tunnel; the kernel counts those of a local socket (`/proc/net/udp`).
    pub fn dropped(&self) -> u64 {
        match self {
            Self::Local(_) => 0,
            Self::Tunnel(s) => s.dropped(),
        }
    }

    /// The largest payload one datagram to `dst` can carry through this exit.
    pub fn max_payload(&self, dst: &SocketAddr) -> usize {
        match self {
            Self::Local(_) => 65507,
            Self::Tunnel(s) => s.max_payload(dst),
        }
    }
}

fn refusal(host: &Host, ip: IpAddr, range: &'static str) -> DialError {
    tracing::debug!(host = %host.to_header(), %ip, range, "destination refused");
    DialError::Refused {
        host: host.to_header(),
        ip,
        range,
    }
}

async fn connect_from(bind: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if bind.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !bind.is_unspecified() {
        socket.bind(SocketAddr::new(bind, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
