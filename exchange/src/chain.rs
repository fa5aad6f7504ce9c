//! Where balances come from: the Centralizer contract's `balance(address)` view (through
//! the one binding, `ipsx_chain::bindings::Centralizer`), behind
//! [`BalanceSource`] so the matching and API tests can run on an in-memory table.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy_primitives::map::HashMap;
use alloy_primitives::{Address, U256};
use ipsx_chain::bindings::Centralizer;

use crate::error::ExchangeError;

/// A boxed future, so sources can live behind `Arc<dyn BalanceSource>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads a wallet's free on-chain balance (the whitepaper's WALLET `Balance`).
pub trait BalanceSource: Send + Sync + 'static {
    /// Tokens of `wallet` free to use, base units.
    fn balance(&self, wallet: Address) -> BoxFuture<'_, Result<U256, ExchangeError>>;

    /// The Centralizer's platform fee (`feeBps`), which deals carry as their
    /// commission; `None` for a source without a chain (the engine's configured
    /// commission applies).
    fn fee_bps(&self) -> BoxFuture<'_, Result<Option<u16>, ExchangeError>> {
        Box::pin(async { Ok(None) })
    }
}

/// Balances read from the Centralizer over JSON-RPC (plain HTTP).
#[derive(Debug, Clone)]
pub struct ChainBalances {
    contract: Centralizer::CentralizerInstance<DynProvider>,
}

impl ChainBalances {
    /// Connects to `rpc_url` (no request is made until the first read).
    pub fn new(rpc_url: &str, centralizer: Address) -> Result<Self, ExchangeError> {
        let url = rpc_url.parse().map_err(|e| ExchangeError::Config {
            key: "rpc_url".into(),
            reason: format!("{e}"),
        })?;
        let provider = ProviderBuilder::new().connect_http(url).erased();
        Ok(Self {
            contract: Centralizer::new(centralizer, provider),
        })
    }

    /// Tokens of `wallet` locked in payment channels (`reserved`).
    pub async fn reserved(&self, wallet: Address) -> Result<U256, ExchangeError> {
        self.contract
            .reserved(wallet)
            .call()
            .await
            .map_err(|e| ExchangeError::Chain(format!("reserved({wallet}): {e}")))
    }
}

impl BalanceSource for ChainBalances {
    fn balance(&self, wallet: Address) -> BoxFuture<'_, Result<U256, ExchangeError>> {
        Box::pin(async move {
            self.contract
                .balance(wallet)
                .call()
                .await
                .map_err(|e| ExchangeError::Chain(format!("balance({wallet}): {e}")))
        })
    }

    fn fee_bps(&self) -> BoxFuture<'_, Result<Option<u16>, ExchangeError>> {
        Box::pin(async move {
            self.contract
                .feeBps()
                .call()
                .await
                .map(Some)
                .map_err(|e| ExchangeError::Chain(format!("feeBps(): {e}")))
        })
    }
}

/// An in-memory balance table (tests and local development).
#[derive(Debug, Clone, Default)]
pub struct MemoryBalances {
    inner: Arc<RwLock<HashMap<Address, U256>>>,
}

impl MemoryBalances {
    /// An empty table: every wallet has 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a wallet's balance.
    pub fn set(&self, wallet: Address, amount: U256) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(wallet, amount);
        }
    }
}

impl BalanceSource for MemoryBalances {
    fn balance(&self, wallet: Address) -> BoxFuture<'_, Result<U256, ExchangeError>> {
        let v = self
            .inner
            .read()
            .map(|m| m.get(&wallet).copied().unwrap_or_default())
            .map_err(|_| ExchangeError::Chain("balance table poisoned".into()));
        Box::pin(async move { v })
    }
}
