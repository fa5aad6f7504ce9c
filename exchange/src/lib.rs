//! The ipsx exchange node (the whitepaper's application layer): order book (offers and
//! requests), matching, funds holds, deal book, agreement protocol, profiles, and the
//! signed HTTP JSON API with its event stream and persistence.
//!
//! It does not move tokens: balances are read from the chain ([`chain::BalanceSource`])
//! and payments happen in payment channels the parties settle on chain.
//!
//! Layout: [`engine`] (with [`book`] and [`agreement`]) is the sans-IO core; [`server`]
//! is the axum glue ([`serve`]); [`store`] the journal. The wire types, signing, the
//! agreement status function, GeoIP checks and the typed client live in the light client
//! crate `ipsx-exchange-client` and are re-exported here under their old paths.

pub use ipsx_exchange_client::agreement;
pub mod book;
pub mod chain;
pub use ipsx_exchange_client::client;
pub mod config;
pub mod engine;
pub use ipsx_exchange_client::error;
pub use ipsx_exchange_client::geo;
pub mod limits;
pub mod openapi;
pub mod server;
pub use ipsx_exchange_client::sign;
pub mod store;
pub mod tls;
pub use ipsx_exchange_client::types;

pub use agreement::{Deadlines, DealStatus, deal_status};
pub use chain::{BalanceSource, ChainBalances, MemoryBalances};
pub use client::Client;
pub use config::ExchangeConfig;
pub use engine::{Command, Deal, DealEvent, EngineConfig, Exchange, Outcome, Profile};
pub use error::ExchangeError;
pub use server::{serve, serve_with};
pub use types::{
    BalanceProof, Cancel, DealPath, Diversity, EndpointReport, Extend, Offer, PartyStatus,
    Preferences, Protocol, Rating, Request, StatusReport, WgKey,
};
