//! The provider agent: the market side of `ipsx provider` (docs/market.md, provider
//! steps). It runs one [`ProviderExit`](crate::ProviderExit) per configured exit
//! address, offers each on the exchange, follows its deals on the event stream (with a
//! polling fallback), serves a requester once its balance proof checks out on chain,
//! stops serving when payment stops, and claims and rates at the end.
//!
//! It owns no order book and no contract: it talks to the exchange with
//! [`ipsx_exchange_client::Client`] and to the chain with
//! [`ipsx_chain::ChainClient`]. Layout: [`config`] (TOML, checked),
//! [`core`] (sans-IO deal state machine), [`verify`] (sans-IO proof check),
//! [`runtime`] (tokio glue: [`Agent::start`], [`run_agent`]).

pub mod config;
pub mod core;
pub mod runtime;
pub mod verify;

use std::future::Future;

pub use config::{AgentConfig, ExitSection, Timings};
pub use core::{DealView, Stage};
pub use runtime::{Agent, AgentHandle, AgentStatus, ClaimRecord, ExitStatus};

/// What stops the agent from starting or running; variants name the key or the party
/// at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A config value is refused.
    #[error("agent config `{key}`: {reason}")]
    Config {
        /// The key (`exit[0].price_per_ip_second`, `wallet.keystore`, ...).
        key: String,
        /// Why.
        reason: String,
    },
    /// The wallet key could not be loaded.
    #[error("wallet: {0}")]
    Wallet(String),
    /// The chain could not be reached or does not hold the deployment.
    #[error("chain {rpc_url}: {reason}")]
    Chain {
        /// The RPC URL.
        rpc_url: String,
        /// Why.
        reason: String,
    },
    /// The exchange client could not be built.
    #[error("exchange {url}: {reason}")]
    Exchange {
        /// The exchange URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// An exit failed to start.
    #[error("exit[{index}]: {source}")]
    Exit {
        /// Which `[[exit]]`.
        index: usize,
        /// The exit's error.
        #[source]
        source: crate::ProviderError,
    },
    /// The agent task ended abnormally.
    #[error("agent task: {0}")]
    Task(String),
}

/// Runs the agent until `shutdown` completes, then cancels its offers, claims what the
/// latest proofs allow and stops the exits. Its status listener also serves the
/// earnings page at `/` ([`crate::status::page_routes`]).
pub async fn run_agent(
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    run_agent_with_routes(cfg, Some(crate::status::page_routes()), shutdown).await
}

/// As [`run_agent`], the status listener also serving `extra` routes (e.g. the
/// provider dashboard page at `/`; see [`crate::status::ExtraRoutes`]).
pub async fn run_agent_with_routes(
    cfg: AgentConfig,
    extra: Option<crate::status::ExtraRoutes>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let handle = Agent::start_with_routes(cfg, extra).await?;
    for x in handle.status().exits {
        tracing::info!(exit = %x.exit_address, endpoint = %x.endpoint, public_key = %x.public_key, "exit serving");
    }
    shutdown.await;
    handle.shutdown().await
}
