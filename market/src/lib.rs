//! The gateway's pool manager: the requester side of the market (`docs/market.md`).
//!
//! Owns: demand groups (from config, and on demand from targeting no live exit
//! matches), request orders, following deals on the exchange's event stream, payment
//! channels and pay-as-you-go balance proofs, bringing rented tunnels up as gateway
//! exits, lease extension, replacement of dead or lying exits, idle release, the
//! budget, closing every channel it opened, and a local store so all of it survives a
//! restart. Does not own: choosing among live exits (the gateway and `ipsx-rotation`),
//! tunnels (`ipsx-tunnel-pool`), the exchange or the chain.
//!
//! Layout, as in the provider agent: [`core`] is the sans-IO state machine (inputs and
//! the clock in, actions out), [`store`] the SQLite file, and the runtime
//! ([`PoolManager`]) the tokio glue that carries out actions.

pub mod connlog;
pub mod core;
mod runtime;
pub mod store;

pub use runtime::rent::{NAT_KEEPALIVE_S, RentSpec, WgExport};
pub use runtime::{MarketError, MarketStatus, PoolManager, settings_of};
