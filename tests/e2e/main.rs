//! All integration tests of this crate in one binary (one link instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
mod gateway_admin;
mod gateway_clients;
mod gateway_dialects;
mod gateway_hostile;
mod gateway_ops;
mod gateway_wireguard;
mod market_e2e;
mod market_failover;
mod market_v2;
mod nat_gateway;
mod vpn_rent;
