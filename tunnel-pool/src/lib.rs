//! Userspace WireGuard tunnels for the ipsx gateway: no root, no TUN device, no kernel
//! module. Owns the tunnels (boringtun noise + smoltcp TCP/IP), DNS through them, their
//! health, UDP sockets through them, and the pool of them; does not choose exits (that is `ipsx-rotation`) nor
//! rent them (that is the exchange client).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ipsx_tunnel_pool::{parse_wg_quick, Tunnel};
//! let cfg = parse_wg_quick(&std::fs::read_to_string("exit.conf")?)?;
//! let tunnel = Tunnel::start(cfg).await?;
//! let addrs = tunnel.resolve("example.com").await?;
//! let stream = tunnel.connect_tcp((addrs[0], 80).into()).await?;
//! let udp = tunnel.udp_socket()?;
//! udp.send_to(b"ping", (addrs[0], 7).into()).await?;
//! # drop(stream); Ok(()) }
//! ```

pub mod config;
pub mod dns;
pub mod flood_filter;
pub mod health;
pub mod nat;
pub mod netstack;
pub mod pool;
pub mod tunnel;
pub mod udp;

use std::net::{IpAddr, SocketAddr};

pub use config::{
    HealthSettings, SecretKey, TunnelConfig, WgConfError, key_to_base64, parse_key, parse_wg_quick,
};
pub use health::{Counters, HealthState, TunnelHealth};
pub use nat::{NatPath, NatSettings, NatSocket, RelayMode, TurnServer};
pub use pool::{PoolEntry, TunnelPool};
pub use tunnel::{Tunnel, TunnelStream};
pub use udp::TunnelUdpSocket;

/// Re-exported so the provider uses the very same stack types.
pub use boringtun;
pub use smoltcp;

/// What went wrong with a tunnel; variants name the field, destination or peer at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// A config field is unusable.
    #[error("tunnel config `{field}`: {reason}")]
    BadConfig {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The UDP socket could not be bound.
    #[error("binding the tunnel's UDP socket: {0}")]
    Bind(#[source] std::io::Error),
    /// The tunnel was shut down.
    #[error("the tunnel is shut down")]
    Closed,
    /// An IPv6 destination but the tunnel has no inner IPv6 address.
    #[error("{0}: the tunnel has no IPv6 address")]
    NoIpv6(SocketAddr),
    /// A destination that cannot be dialled (port 0, unspecified address).
    #[error("{0}: not a usable destination")]
    BadDestination(SocketAddr),
    /// The TCP handshake through the tunnel did not complete in time.
    #[error("{0}: connect through the tunnel timed out")]
    ConnectTimeout(SocketAddr),
    /// The connection was refused or reset by the exit or the target.
    #[error("{dst}: {source}")]
    Connect {
        /// The destination.
        dst: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A DNS failure.
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    /// No DNS server answered in time.
    #[error("no DNS server answered through the tunnel")]
    DnsTimeout,
    /// The config names no DNS server for the exit.
    #[error("the tunnel config has no DNS server (`dns`)")]
    NoDnsServer,
    /// An exit-verification URL that is not usable.
    #[error("probe URL `{url}`: {reason}")]
    BadUrl {
        /// The URL (truncated).
        url: String,
        /// Why.
        reason: String,
    },
    /// The exit-verification request failed.
    #[error("exit probe failed: {0}")]
    Probe(String),
    /// The exit leaves from another address than promised.
    #[error("exit leaves from {seen}, promised {expected}")]
    ExitMismatch {
        /// The promised address.
        expected: IpAddr,
        /// The address the probe saw.
        seen: IpAddr,
    },
    /// A UDP payload larger than one datagram inside the tunnel can carry.
    #[error("a {size}-byte UDP payload does not fit the tunnel (at most {max})")]
    DatagramTooLarge {
        /// The payload's size.
        size: usize,
        /// The largest the tunnel carries to that destination.
        max: usize,
    },
    /// A pool entry with that name exists already.
    #[error("pool: a tunnel named `{0}` exists already")]
    DuplicateName(String),
}

impl TunnelError {
    /// Whether the same request may be retried on another exit: true when nothing can
    /// have reached the target.
    pub fn retry_elsewhere(&self) -> bool {
        matches!(
            self,
            Self::Closed | Self::ConnectTimeout(_) | Self::DnsTimeout | Self::Connect { .. }
        )
    }
}
