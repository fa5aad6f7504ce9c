//! The ipsx exchange node (the whitepaper's application layer): order book (offers and
//! requests), matching, funds holds, deal book, agreement protocol, profiles, and the
//! signed HTTP JSON API with its event stream and persistence.
//!
//! It does not move tokens: balances are read from the chain ([`chain::BalanceSource`])
//! and payments happen in payment channels the parties settle on chain.
//!
//! Layout: [`engine`] (with [`book`] and [`agreement`]) is the sans-IO core; [`server`]
//! is the axum glue ([`serve`]); [`store`] the journal; [`client`] the typed client.

pub mod agreement;
pub mod book;
pub mod chain;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod geo;
pub mod limits;
pub mod openapi;
pub mod server;
pub mod sign;
pub mod store;
pub mod tls;
pub mod types;

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
