//! Typed client of the IPSX contracts: the token and the Centralizer (wallet balances,
//! payment channels, EIP-712 balance proofs), plus the `ipsx wallet` / `ipsx chain` CLI.
//! It owns everything that talks to the EVM chain; it does not own the exchange's order
//! book or the provider's metering (those crates call into it).

pub mod chain;
pub mod cli;
pub mod market;
