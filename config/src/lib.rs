//! The TOML configuration of the ipsx roles.
//!
//! Owns: the raw schema (serde, `deny_unknown_fields`), defaults (filled in one place),
//! and validation into typed configs whose errors carry file, line and key.
//! Does not own: acting on the config (listeners, reload): the roles do that.

mod error;
mod gateway;
mod market;
mod secret;

pub use error::{ConfigError, Location};
pub use gateway::{
    AccountConfig, ExitConfig, ExitTransport, GatewayConfig, HostPattern, LimitsConfig,
    ListenerConfig, OnLimit, Protocol, RotationConfig, RuleConfig, TokenConfig,
};
pub use market::{Amount, DemandConfig, DemandTarget, MarketConfig};
pub use secret::Secret;

/// Reads and validates a gateway config file.
pub fn load_gateway(path: &std::path::Path) -> Result<GatewayConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    GatewayConfig::from_toml(&text, &path.display().to_string())
}
