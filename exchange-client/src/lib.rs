//! The light client of the ipsx exchange: the API's wire types ([`types`], [`api`]),
//! EIP-712 signing of exchange messages ([`sign`]), the agreement protocol's status
//! function ([`agreement`]), the typed HTTP client and its event stream ([`client`]),
//! the per-deal connection log a requester checks at settlement ([`connlog`]), GeoIP
//! checks of exit addresses ([`geo`]) and the deal arithmetic both sides share
//! ([`market`]). No server code: the provider agent, the market and third parties
//! depend on this crate, not on the exchange node (`ipsx-exchange`).
//!
//! The contracts' client (bindings, balance proofs, deploy, wallet CLI) is the
//! `ipsx-chain` crate; balance proofs posted to the exchange are signed and verified
//! with its one implementation (`ipsx_chain::proof`).

pub mod agreement;
pub mod api;
pub mod client;
pub mod connlog;
pub mod error;
pub mod geo;
pub mod market;
pub mod sign;
pub mod types;

pub use agreement::{Deadlines, DealStatus, deal_status};
pub use api::{Actor, Deal, DealEvent, DealTerms, EventKind, NodeInfo, Outcome, Profile};
pub use client::{Client, Follow, fresh};
pub use error::ExchangeError;
pub use types::{
    BalanceProof, Cancel, DealPath, Diversity, EndpointReport, Extend, Offer, PartyStatus,
    Preferences, Protocol, Rating, Request, StatusReport, WgKey,
};
