//! The gateway's pool manager: the requester side of the market (`docs/market.md`).
//!
//! Owns: demand groups (from config, and on demand from targeting no live exit
//! matches), request orders, following deals on the exchange's event stream, payment
//! channels and pay-as-you-go balance proofs, bringing rented tunnels up as gateway
//! exits, renewal, replacement of dead or lying exits, idle release and the budget.
//! Does not own: choosing among live exits (the gateway and `ipsx-rotation`), tunnels
//! (`ipsx-tunnel-pool`), the exchange or the chain.

mod manager;

pub use manager::{MarketError, MarketStatus, PoolManager};
