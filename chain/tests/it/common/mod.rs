//! Shared set-up of the chain tests: one anvil, one deployment, funded wallets.

#![allow(clippy::unwrap_used, dead_code, unreachable_pub, missing_docs)]

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use ipsx_chain::bindings::Centralizer::CentralizerErrors;
use ipsx_chain::testing::Anvil;
use ipsx_chain::{
    ChainClient, ChainError, DeployParams, DeployReport, Deployment, deploy, parse_tokens,
};

/// Dev key index of the deployer / owner.
pub const OWNER: usize = 0;
/// Dev key index of the treasury.
pub const TREASURY: usize = 9;

pub struct World {
    pub anvil: Anvil,
    pub report: DeployReport,
    pub owner: ChainClient,
    pub treasury: ChainClient,
    /// Users 0.. are dev keys 1..
    pub users: Vec<ChainClient>,
}

pub fn tokens(s: &str) -> U256 {
    parse_tokens(s).unwrap()
}

impl World {
    /// A fresh anvil and deployment with `fee_bps`; each of `n_users` users gets
    /// `funded` tokens, approves the Centralizer for everything and deposits `deposited`.
    pub async fn new(n_users: usize, fee_bps: u16, funded: U256, deposited: U256) -> Self {
        Self::with_period(n_users, fee_bps, funded, deposited, 600).await
    }

    /// Same as `new` with a challenge period of `period` seconds.
    pub async fn with_period(
        n_users: usize,
        fee_bps: u16,
        funded: U256,
        deposited: U256,
        period: u64,
    ) -> Self {
        let anvil = Anvil::spawn().unwrap();
        let owner_key = anvil.key(OWNER);
        let mut params = DeployParams::all_to(owner_key.address());
        params.treasury = anvil.key(TREASURY).address();
        params.fee_bps = fee_bps;
        params.challenge_period_secs = period;
        let report = deploy(anvil.endpoint(), owner_key.clone(), &params)
            .await
            .unwrap();
        let d = report.deployment;
        let owner = ChainClient::connect(anvil.endpoint(), d, owner_key)
            .await
            .unwrap();
        let treasury = ChainClient::connect(anvil.endpoint(), d, anvil.key(TREASURY))
            .await
            .unwrap();
        let mut users = Vec::new();
        for i in 0..n_users {
            let c = ChainClient::connect(anvil.endpoint(), d, anvil.key(i + 1))
                .await
                .unwrap();
            if !funded.is_zero() {
                owner.transfer_tokens(c.address(), funded).await.unwrap();
                c.approve(U256::MAX).await.unwrap();
            }
            if !deposited.is_zero() {
                c.deposit(deposited).await.unwrap();
            }
            users.push(c);
        }
        Self {
            anvil,
            report,
            owner,
            treasury,
            users,
        }
    }

    pub fn deployment(&self) -> Deployment {
        self.report.deployment
    }

    pub fn key(&self, i: usize) -> PrivateKeySigner {
        self.anvil.key(i)
    }

    /// Every wallet that may hold anything in the Centralizer.
    pub fn wallets(&self) -> Vec<Address> {
        let mut w = vec![self.owner.address(), self.treasury.address()];
        w.extend(self.users.iter().map(ChainClient::address));
        w
    }

    /// sum(balance + reserved) over `wallets()` must equal the contract's token balance.
    pub async fn assert_invariant(&self) {
        let mut sum = U256::ZERO;
        for w in self.wallets() {
            sum += self.owner.balance(w).await.unwrap() + self.owner.reserved(w).await.unwrap();
        }
        let held = self
            .owner
            .token_balance(self.deployment().centralizer)
            .await
            .unwrap();
        assert_eq!(
            sum, held,
            "sum(balance + reserved) != token.balanceOf(centralizer)"
        );
    }
}

/// The Centralizer error of a failed call; panics on success or on another error.
#[track_caller]
pub fn centralizer_err<T: std::fmt::Debug>(r: Result<T, ChainError>) -> CentralizerErrors {
    match r {
        Ok(v) => panic!("expected a revert, got {v:?}"),
        Err(e) => match e.centralizer_error() {
            Some(c) => c.clone(),
            None => panic!("expected a Centralizer revert, got {e}"),
        },
    }
}
