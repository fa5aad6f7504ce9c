//! The Ethereum layer of the whitepaper: the IPSX token and the Centralizer contract,
//! plus the `ipsx wallet` / `ipsx chain` CLI ([`cli`]). It owns everything that talks to
//! the EVM chain; it does not own the exchange's order book or the provider's metering
//! (those crates call into it).
//!
//! - [`proof`]: sans-IO balance-proof maths (EIP-712 digests, signing, verification with
//!   the contract's exact rules, channel ids, fee split).
//! - [`client`]: typed async calls ([`ChainClient`]) and [`deploy`].
//! - `sender`: one transaction sender per wallet (nonces in order, resync on a stale
//!   nonce), shared by every `ChainClient` of that wallet in the process.
//! - [`deployment`]: the deployment file every role reads.
//! - [`testing`]: a real anvil for tests (and for `ipsx up`), killed on drop.
//!
//! Channel ids are `bytes32`:
//! `keccak256(abi.encode(chainId, centralizer, requester, provider, nonce))`.

pub mod bindings;
pub mod cli;
pub mod client;
pub mod deployment;
pub mod error;
pub mod proof;
mod sender;
pub mod testing;
pub mod units;

pub use client::{
    ChainClient, ChannelState, DeployParams, DeployReport, TxOutcome, WalletBalances, deploy,
};
pub use deployment::Deployment;
pub use error::{ChainError, Revert};
pub use proof::{
    BalanceProof, ChannelDomain, CloseConsent, FeeSplit, ProofError, channel_id_for, fee_split,
    recover_signer, sign_balance_proof, sign_close_consent, verify_balance_proof,
    verify_close_consent,
};
pub use units::{format_tokens, parse_tokens};
