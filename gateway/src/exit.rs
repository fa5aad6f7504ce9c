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

    async fn dial_inner(&self, host: &Host, port: u16) -> Result<ExitStream, DialError> {
        match &self.inner.transport {
            ExitTransport::WireGuard { .. } => {
                let Some(tunnel) = self.tunnel().await? else {
                    return Err(DialError::Tunnel {
                        message: "tunnel not started".into(),
                        retry_elsewhere: true,
                    });
                };
                // Names resolve at the exit, through the tunnel (no DNS leak, geo-correct
                // answers); the address actually dialled is then checked here.
                let candidates = match host {
                    Host::Ip(ip) => vec![*ip],
                    Host::Name(name) => {
                        tunnel.resolve(name).await.map_err(|e| DialError::Resolve {
                            host: name.clone(),
                            message: e.to_string(),
                        })?
                    }
                };
                let mut refused = None;
                let mut last_err = None;
                for ip in candidates {
                    let ip = ipsx_egress::canonical(ip);
                    if let Some(range) = refused_range(ip, &self.inner.policy.allow) {
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
                let candidates: Vec<IpAddr> = match host {
                    Host::Ip(ip) => vec![*ip],
                    Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
                        .await
                        .map_err(|e| DialError::Resolve {
                            host: name.clone(),
                            message: e.to_string(),
                        })?
                        .map(|a| a.ip())
                        .collect(),
                };
                let mut refused = None;
                let mut last_err = None;
                let mut usable = false;
                let own = self.inner.policy.own.list();
                for ip in candidates {
                    let ip = ipsx_egress::canonical(ip);
                    let range = refused_range(ip, &self.inner.policy.allow)
                        .or_else(|| refused_local(ip, port, &self.inner.policy.allow, &own));
                    if let Some(range) = range {
                        refused.get_or_insert_with(|| refusal(host, ip, range));
                        continue;
                    }
                    if ip.is_ipv4() != bind.is_ipv4() {
                        continue;
                    }
                    usable = true;
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
                if let Some(e) = last_err {
                    return Err(e);
                }
                if let Some(e) = refused {
                    return Err(e);
                }
                debug_assert!(!usable);
                Err(DialError::NoUsableAddress {
                    host: host.to_header(),
                    bind: *bind,
                })
            }
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
