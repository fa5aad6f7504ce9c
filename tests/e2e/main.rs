//! All integration tests of this crate in one binary (one link instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;
// The provider's test helpers (exit + tunnel pairs, network namespaces, the NAT lab),
// loaded once for every test module here.
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
#[path = "../../provider/tests/it/common/mod.rs"]
mod provider_common;
mod vpn_rent;
