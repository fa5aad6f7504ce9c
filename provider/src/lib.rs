//! The ipsx provider exit: a userspace WireGuard server (no root, no TUN) that
//! terminates each requester's TCP flows and DNS queries and relays them from the
//! offered exit address, under an egress policy, with per-peer metering and a hashed
//! connection log. The [`agent`] puts exits on the market: it offers them on the
//! exchange, serves requesters whose balance proofs check out on chain, and claims its
//! pay; the order book and the contracts themselves live elsewhere.
//!
//! The binary calls [`run`] for `ipsx provider --config FILE` (a bare exit), or
//! [`run_agent`] when the file has an `[exchange]` section:
//! ```no_run
//! # async fn demo() -> Result<(), ipsx_provider::ProviderError> {
//! let text = std::fs::read_to_string("provider.toml").map_err(|e| {
//!     ipsx_provider::ProviderError::Config { key: "(file)".into(), reason: e.to_string() }
//! })?;
//! let cfg = ipsx_provider::ProviderConfig::from_toml(&text)?;
//! ipsx_provider::run(cfg, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! # async fn agent() -> Result<(), ipsx_provider::AgentError> {
//! let cfg = ipsx_provider::AgentConfig::load(std::path::Path::new("provider-agent.toml"))?;
//! ipsx_provider::run_agent(cfg, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod agent;
pub mod config;
pub mod connlog_store;
pub mod exit;
pub mod limits;
pub mod meter;
pub mod packet;
pub mod policy;
pub mod status;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;

pub use agent::{Agent, AgentConfig, AgentError, AgentHandle, AgentStatus, run_agent};
pub use config::{PeerConfig, PrivateKey, ProviderConfig, PublicKey};
pub use exit::{ExitCounters, ProviderExit, ProviderHandle};
pub use limits::Limits;
pub use meter::{LogEntry, MeterSnapshot};
pub use policy::{EgressPolicy, Protocol, Refusal};
pub use status::ProviderStatus;

/// What went wrong in the exit; variants name the key, address or peer at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A config value is refused.
    #[error("provider config `{key}`: {reason}")]
    Config {
        /// The key (`peers[2].inner_ip`, `allow_destinations`, ...).
        key: String,
        /// Why.
        reason: String,
    },
    /// The UDP socket could not be bound.
    #[error("binding WireGuard UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A peer with that public key is already served.
    #[error("peer {0} is already served")]
    PeerExists(String),
    /// The exit was stopped.
    #[error("the exit is stopped")]
    Stopped,
}

/// Runs an exit until `shutdown` completes.
pub async fn run(
    cfg: ProviderConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProviderError> {
    let handle = ProviderExit::start(cfg).await?;
    tracing::info!(addr = %handle.local_addr(), public_key = %ipsx_tunnel_pool::key_to_base64(&handle.public_key()), "provider exit listening");
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}
