//! One transaction sender per wallet: the nonce of every transaction a process sends
//! from one wallet comes from one place.
//!
//! [`TxSender`] keeps the wallet's next nonce and serialises the step that consumes it
//! (gas estimate, signing, `eth_sendRawTransaction`); waiting for the receipt happens
//! outside, so several transactions of one wallet are in flight at once. A nonce is
//! consumed only when the node accepted the transaction, so a reverted gas estimate
//! leaves no gap. The nonce is read from the node (`pending` count) on first use and
//! after any failed send; when the node says the nonce is stale (another process used
//! the key, see [`is_nonce_message`]) it is read again and the transaction re-sent once.
//!
//! Senders are shared per `(RPC URL, chain id, wallet address)` for the whole process
//! through [`TxSender::for_wallet`], so two `ChainClient`s connected separately with one
//! key do not race either. (The URL is part of the key because two local chains, e.g.
//! two anvils in one test process, share chain id and dev keys but not nonces.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::Duration;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::Ethereum;
use alloy::primitives::Address;
use alloy::providers::{DynProvider, PendingTransactionBuilder, Provider};

use super::error::ChainError;

/// The wallet's nonce state, behind the async lock every send of the wallet takes.
#[derive(Debug, Default)]
struct NonceState {
    /// The nonce of the next transaction, `None` until read from the node (or after a
    /// failed send, when it is unknown whether the node counted it).
    next: Option<u64>,
}

/// Sends transactions of one wallet, one at a time up to the node's acceptance.
#[derive(Debug)]
pub(crate) struct TxSender {
    address: Address,
    state: tokio::sync::Mutex<NonceState>,
}

type Registry = HashMap<(String, u64, Address), Weak<TxSender>>;

fn registry() -> &'static StdMutex<Registry> {
    static REGISTRY: OnceLock<StdMutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| StdMutex::new(HashMap::new()))
}

/// Whether a node's error message says the transaction's nonce was already used or is
/// being used by another pending transaction (geth, anvil, reth and erigon wordings).
pub(crate) fn is_nonce_message(message: &str) -> bool {
    const STALE: [&str; 5] = [
        "nonce too low",
        "replacement transaction underpriced",
        "already known",
        "already imported",
        "oldnonce",
    ];
    let m = message.to_ascii_lowercase();
    let compact: String = m.chars().filter(|c| !c.is_whitespace()).collect();
    STALE
        .iter()
        .any(|s| m.contains(s) || compact.contains(&s.replace(' ', "")))
}

impl TxSender {
    /// The process-wide sender of `address` on chain `chain_id` served at `rpc_url`.
    pub(crate) fn for_wallet(rpc_url: &str, chain_id: u64, address: Address) -> Arc<Self> {
        let key = (rpc_url.trim_end_matches('/').to_owned(), chain_id, address);
        let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = reg.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        reg.retain(|_, w| w.strong_count() > 0);
        let s = Arc::new(Self {
            address,
            state: tokio::sync::Mutex::new(NonceState::default()),
        });
        reg.insert(key, Arc::downgrade(&s));
        s
    }

    async fn node_nonce(&self, provider: &DynProvider) -> Result<u64, ChainError> {
        provider
            .get_transaction_count(self.address)
            .pending()
            .await
            .map_err(|source| {
                ChainError::rpc(format!("reading the nonce of {}", self.address), source)
            })
    }

    /// Estimates, signs and sends `builder` with the wallet's next nonce; gives up after
    /// `timeout`. Returns once the node accepted the transaction (not mined yet).
    pub(crate) async fn send<D: CallDecoder + Clone>(
        &self,
        call: &'static str,
        provider: &DynProvider,
        builder: CallBuilder<&DynProvider, D>,
        timeout: Duration,
    ) -> Result<PendingTransactionBuilder<Ethereum>, ChainError> {
        let mut state = self.state.lock().await;
        let attempt = self.send_locked(call, provider, &builder, &mut state);
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => {
                state.next = None;
                Err(ChainError::SendTimeout {
                    call,
                    after: timeout,
                })
            }
        }
    }

    async fn send_locked<D: CallDecoder + Clone>(
        &self,
        call: &'static str,
        provider: &DynProvider,
        builder: &CallBuilder<&DynProvider, D>,
        state: &mut NonceState,
    ) -> Result<PendingTransactionBuilder<Ethereum>, ChainError> {
        // Unknown until this send succeeds: a failure below leaves it `None`.
        let nonce = match state.next.take() {
            Some(n) => n,
            None => self.node_nonce(provider).await?,
        };
        let err = match builder.clone().nonce(nonce).send().await {
            Ok(pending) => {
                state.next = Some(nonce + 1);
                return Ok(pending);
            }
            Err(e) => e,
        };
        if !is_nonce_message(&err.to_string()) {
            return Err(ChainError::from_contract(call, err));
        }
        // Someone else (another process with this key) used the nonce: resync, once.
        let fresh = self.node_nonce(provider).await?;
        match builder.clone().nonce(fresh).send().await {
            Ok(pending) => {
                state.next = Some(fresh + 1);
                Ok(pending)
            }
            Err(e) => Err(ChainError::from_contract(call, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nonce_messages_of_known_nodes() {
        for m in [
            "nonce too low",
            "Nonce too low: next nonce 5, tx nonce 4",
            "server returned an error response: error code -32003: nonce too low",
            "replacement transaction underpriced",
            "already known",
            "Transaction already imported",
            "OldNonce",
        ] {
            assert!(is_nonce_message(m), "{m}");
        }
        for m in [
            "",
            "execution reverted",
            "insufficient funds for gas * price + value",
            "nonce too high",
            "connection refused",
        ] {
            assert!(!is_nonce_message(m), "{m}");
        }
    }

    #[test]
    fn one_sender_per_wallet_chain_and_node() {
        let a = Address::repeat_byte(0xa1);
        let b = Address::repeat_byte(0xb2);
        let url = "http://127.0.0.1:1";
        let s1 = TxSender::for_wallet(url, 7, a);
        let s2 = TxSender::for_wallet("http://127.0.0.1:1/", 7, a);
        assert!(Arc::ptr_eq(&s1, &s2));
        assert!(!Arc::ptr_eq(&s1, &TxSender::for_wallet(url, 7, b)));
        assert!(!Arc::ptr_eq(&s1, &TxSender::for_wallet(url, 8, a)));
        assert!(!Arc::ptr_eq(
            &s1,
            &TxSender::for_wallet("http://127.0.0.1:2", 7, a)
        ));
        let weak = Arc::downgrade(&s1);
        drop((s1, s2));
        assert!(
            weak.upgrade().is_none(),
            "the registry must not keep senders alive"
        );
    }

    proptest! {
        #[test]
        fn any_message_embedding_a_stale_phrase_is_a_nonce_error(
            pre in ".{0,40}",
            post in ".{0,40}",
            which in 0usize..3,
            upper in any::<bool>(),
        ) {
            let phrase = ["nonce too low", "replacement transaction underpriced", "already known"][which];
            let phrase = if upper { phrase.to_ascii_uppercase() } else { phrase.to_owned() };
            let message = format!("{pre}{phrase}{post}");
            prop_assert!(is_nonce_message(&message), "{}", message);
        }

        #[test]
        fn messages_without_the_words_are_not(m in "[a-z0-9 :,-]{0,80}") {
            prop_assume!(!m.contains("nonce") && !m.contains("known")
                && !m.contains("underpriced") && !m.contains("imported")
                && !m.replace(' ', "").contains("oldnonce"));
            prop_assert!(!is_nonce_message(&m));
        }
    }
}
