//! The ipsx exchange node (the whitepaper's application layer): order book (offers and
//! requests), matching, funds holds, deal book, agreement protocol, profiles, and the
//! signed HTTP JSON API with its event stream and persistence.
//!
//! It does not move tokens: balances are read from the chain ([`chain::BalanceSource`])
//! and payments happen in payment channels settled on chain by the parties.

pub mod agreement;
pub mod book;
pub mod engine;
pub mod error;
pub mod types;

pub use agreement::{Deadlines, DealStatus, deal_status};
pub use engine::{Command, Deal, DealEvent, EngineConfig, Exchange, Outcome, Profile};
pub use error::ExchangeError;
pub use types::{
    BalanceProof, Cancel, Diversity, Offer, PartyStatus, Preferences, Protocol, Rating, Request,
    StatusReport, WgKey,
};
