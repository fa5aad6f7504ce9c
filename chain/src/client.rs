//! Thin async glue over alloy: typed calls to the token and the Centralizer, deployment,
//! and receipts turned into [`TxOutcome`]s. Every revert is decoded into a
//! [`Revert`](super::error::Revert)
//! naming what was wrong.

use std::sync::Arc;
use std::time::Duration;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{Filter, TransactionReceipt};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolEvent, SolStruct, eip712_domain};

use super::bindings::{Centralizer, IPSXToken};
use super::deployment::Deployment;
use super::error::ChainError;
use super::proof::{
    BalanceProof, ChannelDomain, CloseConsent, sign_balance_proof, sign_close_consent,
};
use super::sender::TxSender;

/// How long to wait for a transaction receipt before giving up.
pub const DEFAULT_TX_TIMEOUT: Duration = Duration::from_secs(120);
/// Block span of one `eth_getLogs` query (public RPCs refuse wide ranges).
const LOG_CHUNK: u64 = 10_000;

/// What a mined transaction cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxOutcome {
    /// Transaction hash.
    pub tx_hash: B256,
    /// Block it was mined in.
    pub block_number: u64,
    /// Gas it used.
    pub gas_used: u64,
}

impl TxOutcome {
    fn from_receipt(r: &TransactionReceipt) -> Self {
        Self {
            tx_hash: r.transaction_hash,
            block_number: r.block_number.unwrap_or_default(),
            gas_used: r.gas_used,
        }
    }
}

/// A wallet's three amounts, in token base units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalletBalances {
    /// IPSX held by the wallet itself (ERC20 `balanceOf`).
    pub token: U256,
    /// The wallet's free `balance` in the Centralizer.
    pub balance: U256,
    /// The wallet's `reserved` amount in the Centralizer (locked in channels).
    pub reserved: U256,
}

/// One channel as the contract holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelState {
    /// Channel id.
    pub id: B256,
    /// Who pays.
    pub requester: Address,
    /// Who is paid.
    pub provider: Address,
    /// Total locked into the channel.
    pub deposit: U256,
    /// Total paid to the provider so far.
    pub claimed: U256,
    /// `Some(timestamp)` once an uncooperative close started: `settle` allowed from then.
    pub settle_after: Option<u64>,
    /// Last connection-log hash the provider submitted.
    pub log_hash: B256,
}

impl ChannelState {
    /// What the provider can still be paid (`deposit - claimed`).
    pub fn remaining(&self) -> U256 {
        self.deposit.saturating_sub(self.claimed)
    }
}

/// The parameters of `deploy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployParams {
    /// Receives 50 % of the supply.
    pub funding: Address,
    /// Receives 27.5 %.
    pub incentives: Address,
    /// Receives 2.5 %.
    pub bounty: Address,
    /// Receives 20 %.
    pub team: Address,
    /// The Centralizer's owner (sets fee and treasury).
    pub owner: Address,
    /// Wallet credited with the platform fee.
    pub treasury: Address,
    /// Platform fee in basis points (at most 1000).
    pub fee_bps: u16,
    /// Challenge period of uncooperative closes, seconds (1 s .. 30 days).
    pub challenge_period_secs: u64,
}

impl DeployParams {
    /// Everything to `deployer`: allocations, ownership and treasury; 1 % fee, 1 h
    /// challenge period. Handy for local chains.
    pub fn all_to(deployer: Address) -> Self {
        Self {
            funding: deployer,
            incentives: deployer,
            bounty: deployer,
            team: deployer,
            owner: deployer,
            treasury: deployer,
            fee_bps: 100,
            challenge_period_secs: 3_600,
        }
    }
}

/// What `deploy` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployReport {
    /// The new deployment.
    pub deployment: Deployment,
    /// The token's creation transaction.
    pub token_tx: TxOutcome,
    /// The Centralizer's creation transaction.
    pub centralizer_tx: TxOutcome,
}

/// An HTTP provider for `rpc_url`, with `signer` as its wallet if given. Gas is
/// estimated. Transactions sent directly through it fetch their nonce from the node;
/// [`ChainClient`] and [`deploy`] set the nonce themselves through the wallet's one
/// sender, so concurrent sends do not collide.
pub fn http_provider(
    rpc_url: &str,
    signer: Option<PrivateKeySigner>,
) -> Result<DynProvider, ChainError> {
    let url: alloy::transports::http::reqwest::Url =
        rpc_url.parse().map_err(|e| ChainError::InvalidRpcUrl {
            url: rpc_url.to_owned(),
            reason: format!("{e}"),
        })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ChainError::InvalidRpcUrl {
            url: rpc_url.to_owned(),
            reason: format!("scheme {:?} is not http or https", url.scheme()),
        });
    }
    // The simple nonce manager only fills transactions sent around `ChainClient` (tests'
    // raw transactions); it asks the node every time, so it can leave no gap.
    let builder = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id();
    Ok(match signer {
        Some(s) => builder
            .wallet(EthereumWallet::from(s))
            .connect_http(url)
            .erased(),
        None => builder.connect_http(url).erased(),
    })
}

async fn send_tx<D: CallDecoder + Clone>(
    call: &'static str,
    sender: &TxSender,
    provider: &DynProvider,
    builder: CallBuilder<&DynProvider, D>,
    timeout: Duration,
) -> Result<TransactionReceipt, ChainError> {
    let pending = sender.send(call, provider, builder, timeout).await?;
    let tx_hash = *pending.tx_hash();
    let receipt = pending
        .with_timeout(Some(timeout))
        .get_receipt()
        .await
        .map_err(|source| ChainError::Pending {
            call,
            source: Box::new(source),
        })?;
    if !receipt.status() {
        return Err(ChainError::TxFailed { call, tx_hash });
    }
    Ok(receipt)
}

/// Deploys the token and the Centralizer with `signer` (which pays the gas) and returns
/// the deployment. The token's four allocations and the Centralizer's parameters come
/// from `params`.
pub async fn deploy(
    rpc_url: &str,
    signer: PrivateKeySigner,
    params: &DeployParams,
) -> Result<DeployReport, ChainError> {
    let bad = |field, reason: &str| ChainError::InvalidDeployParam {
        field,
        reason: reason.to_owned(),
    };
    if params.fee_bps > super::proof::MAX_FEE_BPS {
        return Err(bad("fee_bps", "above the 1000 bps (10 %) cap"));
    }
    if params.challenge_period_secs == 0 || params.challenge_period_secs > 30 * 86_400 {
        return Err(bad(
            "challenge_period_secs",
            "must be between 1 s and 30 days",
        ));
    }
    for (field, a) in [
        ("funding", params.funding),
        ("incentives", params.incentives),
        ("bounty", params.bounty),
        ("team", params.team),
        ("owner", params.owner),
        ("treasury", params.treasury),
    ] {
        if a.is_zero() {
            return Err(bad(field, "must not be the zero address"));
        }
    }
    let deployer = signer.address();
    let provider = http_provider(rpc_url, Some(signer))?;
    let chain_id = provider
        .get_chain_id()
        .await
        .map_err(|source| ChainError::rpc("reading the chain id", source))?;
    let sender = TxSender::for_wallet(rpc_url, chain_id, deployer);

    let token_deploy = IPSXToken::deploy_builder(
        &provider,
        params.funding,
        params.incentives,
        params.bounty,
        params.team,
    );
    let token_receipt = send_tx(
        "IPSXToken constructor",
        &sender,
        &provider,
        token_deploy,
        DEFAULT_TX_TIMEOUT,
    )
    .await?;
    let token = token_receipt
        .contract_address
        .ok_or(ChainError::MissingEvent {
            call: "IPSXToken constructor",
            event: "contract address",
        })?;
    let c_deploy = Centralizer::deploy_builder(
        &provider,
        token,
        params.owner,
        params.treasury,
        params.fee_bps,
        params.challenge_period_secs,
    );
    let c_receipt = send_tx(
        "Centralizer constructor",
        &sender,
        &provider,
        c_deploy,
        DEFAULT_TX_TIMEOUT,
    )
    .await?;
    let centralizer = c_receipt.contract_address.ok_or(ChainError::MissingEvent {
        call: "Centralizer constructor",
        event: "contract address",
    })?;
    let token_tx = TxOutcome::from_receipt(&token_receipt);
    Ok(DeployReport {
        deployment: Deployment {
            chain_id,
            token,
            centralizer,
            deploy_block: token_tx.block_number,
            challenge_period_secs: params.challenge_period_secs,
        },
        token_tx,
        centralizer_tx: TxOutcome::from_receipt(&c_receipt),
    })
}

/// A connection to one deployment, optionally with a wallet key to send transactions.
///
/// Cheap to clone (the RPC connection and the wallet's sender are shared) and safe to
/// share across tasks: any number of transactions may be sent concurrently from clones,
/// from one client, or from clients connected separately with the same key in one
/// process. Every transaction of a wallet goes through that wallet's one sender
/// (`chain::sender`), which hands out nonces in order, consumes one only when the node
/// accepted the transaction, and on a stale nonce (`nonce too low`, `replacement
/// transaction underpriced`, `already known`: another process used the key) reads the
/// nonce from the node again and re-sends once. Receipts are awaited concurrently.
#[derive(Debug, Clone)]
pub struct ChainClient {
    provider: DynProvider,
    signer: Option<PrivateKeySigner>,
    sender: Option<Arc<TxSender>>,
    deployment: Deployment,
    tx_timeout: Duration,
}

impl ChainClient {
    /// Connects with a wallet key, after checking that the RPC serves the deployment's
    /// chain and that both contracts have code there.
    pub async fn connect(
        rpc_url: &str,
        deployment: Deployment,
        signer: PrivateKeySigner,
    ) -> Result<Self, ChainError> {
        Self::connect_inner(rpc_url, deployment, Some(signer)).await
    }

    /// Connects without a key: views only.
    pub async fn connect_read_only(
        rpc_url: &str,
        deployment: Deployment,
    ) -> Result<Self, ChainError> {
        Self::connect_inner(rpc_url, deployment, None).await
    }

    async fn connect_inner(
        rpc_url: &str,
        deployment: Deployment,
        signer: Option<PrivateKeySigner>,
    ) -> Result<Self, ChainError> {
        let provider = http_provider(rpc_url, signer.clone())?;
        let actual = provider.get_chain_id().await.map_err(|source| {
            ChainError::rpc(format!("reading the chain id of {rpc_url}"), source)
        })?;
        if actual != deployment.chain_id {
            return Err(ChainError::WrongChainId {
                expected: deployment.chain_id,
                actual,
            });
        }
        for (name, address) in [
            ("IPSXToken", deployment.token),
            ("Centralizer", deployment.centralizer),
        ] {
            let code = provider.get_code_at(address).await.map_err(|source| {
                ChainError::rpc(format!("reading the code of {name} at {address}"), source)
            })?;
            if code.is_empty() {
                return Err(ChainError::ContractNotDeployed {
                    name,
                    address,
                    chain_id: actual,
                });
            }
        }
        let sender = signer
            .as_ref()
            .map(|s| TxSender::for_wallet(rpc_url, actual, s.address()));
        Ok(Self {
            provider,
            signer,
            sender,
            deployment,
            tx_timeout: DEFAULT_TX_TIMEOUT,
        })
    }

    /// Changes how long transactions are awaited.
    pub fn with_tx_timeout(mut self, timeout: Duration) -> Self {
        self.tx_timeout = timeout;
        self
    }

    /// The wallet's address (zero for a read-only client).
    pub fn address(&self) -> Address {
        self.signer
            .as_ref()
            .map(|s| s.address())
            .unwrap_or_default()
    }

    /// The deployment this client talks to.
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// The EIP-712 domain of this deployment's balance proofs.
    pub fn domain(&self) -> ChannelDomain {
        self.deployment.domain()
    }

    /// The underlying alloy provider (with the wallet, if any).
    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// Typed binding of the token.
    pub fn token(&self) -> IPSXToken::IPSXTokenInstance<DynProvider> {
        IPSXToken::new(self.deployment.token, self.provider.clone())
    }

    /// Typed binding of the Centralizer.
    pub fn centralizer(&self) -> Centralizer::CentralizerInstance<DynProvider> {
        Centralizer::new(self.deployment.centralizer, self.provider.clone())
    }

    fn signer(&self, call: &'static str) -> Result<&PrivateKeySigner, ChainError> {
        self.signer.as_ref().ok_or(ChainError::NoSigner { call })
    }

    async fn send<D: CallDecoder + Clone>(
        &self,
        call: &'static str,
        builder: CallBuilder<&DynProvider, D>,
    ) -> Result<TransactionReceipt, ChainError> {
        let sender = self.sender.as_ref().ok_or(ChainError::NoSigner { call })?;
        send_tx(call, sender, &self.provider, builder, self.tx_timeout).await
    }

    // === views ===

    /// IPSX held by `who` (ERC20 balance).
    pub async fn token_balance(&self, who: Address) -> Result<U256, ChainError> {
        let token = self.token();
        token
            .balanceOf(who)
            .call()
            .await
            .map_err(|e| ChainError::from_contract("balanceOf", e))
    }

    /// `who`'s free `balance` in the Centralizer.
    pub async fn balance(&self, who: Address) -> Result<U256, ChainError> {
        let c = self.centralizer();
        c.balance(who)
            .call()
            .await
            .map_err(|e| ChainError::from_contract("balance", e))
    }

    /// `who`'s `reserved` amount in the Centralizer.
    pub async fn reserved(&self, who: Address) -> Result<U256, ChainError> {
        let c = self.centralizer();
        c.reserved(who)
            .call()
            .await
            .map_err(|e| ChainError::from_contract("reserved", e))
    }

    /// Token, balance and reserved of `who`.
    pub async fn wallet_balances(&self, who: Address) -> Result<WalletBalances, ChainError> {
        Ok(WalletBalances {
            token: self.token_balance(who).await?,
            balance: self.balance(who).await?,
            reserved: self.reserved(who).await?,
        })
    }

    /// The channel, or `None` if it never existed or is closed.
    pub async fn channel(&self, id: B256) -> Result<Option<ChannelState>, ChainError> {
        let c = self.centralizer();
        let ch = c
            .getChannel(id)
            .call()
            .await
            .map_err(|e| ChainError::from_contract("getChannel", e))?;
        if ch.requester.is_zero() {
            return Ok(None);
        }
        Ok(Some(ChannelState {
            id,
            requester: ch.requester,
            provider: ch.provider,
            deposit: U256::from(ch.deposit),
            claimed: U256::from(ch.claimed),
            settle_after: (ch.settleAfter != 0).then_some(ch.settleAfter),
            log_hash: ch.logHash,
        }))
    }

    /// Timestamp of the latest block (the chain's clock, which may differ from ours).
    pub async fn latest_timestamp(&self) -> Result<u64, ChainError> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(|source| ChainError::rpc("reading the latest block", source))?;
        Ok(block.map(|b| b.header.timestamp).unwrap_or_default())
    }

    /// The node's gas price, wei per gas (what a transaction sent now pays).
    pub async fn gas_price(&self) -> Result<u128, ChainError> {
        self.provider
            .get_gas_price()
            .await
            .map_err(|source| ChainError::rpc("reading the gas price", source))
    }

    /// The current platform fee in basis points.
    pub async fn fee_bps(&self) -> Result<u16, ChainError> {
        let c = self.centralizer();
        c.feeBps()
            .call()
            .await
            .map_err(|e| ChainError::from_contract("feeBps", e))
    }

    /// The current treasury.
    pub async fn treasury(&self) -> Result<Address, ChainError> {
        let c = self.centralizer();
        c.treasury()
            .call()
            .await
            .map_err(|e| ChainError::from_contract("treasury", e))
    }

    /// Ids of every channel `who` opened (as requester) or was opened to (as provider),
    /// oldest first, from the `ChannelOpened` events since the deployment block.
    pub async fn channel_ids_of(&self, who: Address) -> Result<Vec<B256>, ChainError> {
        let latest = self
            .provider
            .get_block_number()
            .await
            .map_err(|source| ChainError::rpc("reading the block number", source))?;
        let base = Filter::new()
            .address(self.deployment.centralizer)
            .event_signature(Centralizer::ChannelOpened::SIGNATURE_HASH);
        let mut found: Vec<(u64, u64, B256)> = Vec::new();
        let mut from = self.deployment.deploy_block;
        while from <= latest {
            let to = latest.min(from.saturating_add(LOG_CHUNK - 1));
            for filter in [
                base.clone().topic2(who.into_word()),
                base.clone().topic3(who.into_word()),
            ] {
                let filter = filter.from_block(from).to_block(to);
                let logs = self.provider.get_logs(&filter).await.map_err(|source| {
                    ChainError::rpc(
                        format!("reading ChannelOpened events of blocks {from}..={to}"),
                        source,
                    )
                })?;
                for log in logs {
                    if let Some(id) = log.topics().get(1) {
                        found.push((
                            log.block_number.unwrap_or_default(),
                            log.log_index.unwrap_or_default(),
                            *id,
                        ));
                    }
                }
            }
            from = to + 1;
        }
        found.sort();
        found.dedup();
        Ok(found.into_iter().map(|(_, _, id)| id).collect())
    }

    // === signing ===

    /// Signs a balance proof for `channel_id` with this wallet (the requester).
    pub fn sign_balance_proof(
        &self,
        channel_id: B256,
        cumulative_amount: U256,
    ) -> Result<Bytes, ChainError> {
        let proof = BalanceProof {
            channel_id,
            cumulative_amount,
        };
        Ok(sign_balance_proof(
            self.signer("sign_balance_proof")?,
            &self.domain(),
            &proof,
        )?)
    }

    /// Signs a close consent for `channel_id` with this wallet (the provider).
    pub fn sign_close_consent(
        &self,
        channel_id: B256,
        cumulative_amount: U256,
        log_hash: B256,
    ) -> Result<Bytes, ChainError> {
        let consent = CloseConsent {
            channel_id,
            cumulative_amount,
            log_hash,
        };
        Ok(sign_close_consent(
            self.signer("sign_close_consent")?,
            &self.domain(),
            &consent,
        )?)
    }

    // === transactions ===

    /// ERC20 `approve` of `amount` for the Centralizer.
    pub async fn approve(&self, amount: U256) -> Result<TxOutcome, ChainError> {
        let token = self.token();
        let r = self
            .send(
                "approve",
                token.approve(self.deployment.centralizer, amount),
            )
            .await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// `deposit(amount)`: needs an allowance (see [`approve`](Self::approve)).
    pub async fn deposit(&self, amount: U256) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("deposit", c.deposit(amount)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Signs an EIP-2612 permit for `amount` valid until `deadline` and deposits with it
    /// in one transaction (`depositWithPermit`).
    pub async fn deposit_with_permit(
        &self,
        amount: U256,
        deadline: U256,
    ) -> Result<TxOutcome, ChainError> {
        let signer = self.signer("depositWithPermit")?;
        let token = self.token();
        let nonce = token
            .nonces(signer.address())
            .call()
            .await
            .map_err(|e| ChainError::from_contract("nonces", e))?;
        let sig = self.sign_permit(signer, amount, nonce, deadline)?;
        let c = self.centralizer();
        let call = c.depositWithPermit(
            amount,
            deadline,
            if sig.v() { 28 } else { 27 },
            sig.r().into(),
            sig.s().into(),
        );
        let r = self.send("depositWithPermit", call).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// The EIP-2612 permit signature for the Centralizer as spender.
    pub fn sign_permit(
        &self,
        signer: &PrivateKeySigner,
        amount: U256,
        nonce: U256,
        deadline: U256,
    ) -> Result<alloy::primitives::Signature, ChainError> {
        let permit = permit_type::Permit {
            owner: signer.address(),
            spender: self.deployment.centralizer,
            value: amount,
            nonce,
            deadline,
        };
        let domain = eip712_domain! {
            name: "IPSX",
            version: "1",
            chain_id: self.deployment.chain_id,
            verifying_contract: self.deployment.token,
        };
        signer
            .sign_hash_sync(&permit.eip712_signing_hash(&domain))
            .map_err(|e| ChainError::Proof(super::proof::ProofError::Signing(e.to_string())))
    }

    /// `withdraw(amount)` from the free balance back to the wallet.
    pub async fn withdraw(&self, amount: U256) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("withdraw", c.withdraw(amount)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Opens a channel to `provider` locking `amount`; returns its id.
    pub async fn open_channel(
        &self,
        provider: Address,
        amount: U256,
    ) -> Result<(B256, TxOutcome), ChainError> {
        let c = self.centralizer();
        let r = self
            .send("openChannel", c.openChannel(provider, amount))
            .await?;
        let ev = r
            .decoded_log::<Centralizer::ChannelOpened>()
            .ok_or(ChainError::MissingEvent {
                call: "openChannel",
                event: "ChannelOpened",
            })?;
        Ok((ev.channelId, TxOutcome::from_receipt(&r)))
    }

    /// Adds `amount` to an open channel.
    pub async fn top_up(&self, id: B256, amount: U256) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("topUp", c.topUp(id, amount)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// The provider redeems a balance proof (see `Centralizer.claim`).
    pub async fn claim(
        &self,
        proof: &BalanceProof,
        signature: Bytes,
        log_hash: B256,
        close: bool,
    ) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let call = c.claim(
            proof.channel_id,
            proof.cumulative_amount,
            signature,
            log_hash,
            close,
        );
        let r = self.send("claim", call).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// The requester closes at once with the provider's signed consent.
    pub async fn cooperative_close(
        &self,
        consent: &CloseConsent,
        provider_signature: Bytes,
    ) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let call = c.cooperativeClose(
            consent.channel_id,
            consent.cumulative_amount,
            consent.log_hash,
            provider_signature,
        );
        let r = self.send("cooperativeClose", call).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// The requester starts an uncooperative close, paying up to `cumulative_amount`.
    pub async fn start_close(
        &self,
        id: B256,
        cumulative_amount: U256,
    ) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self
            .send("startClose", c.startClose(id, cumulative_amount))
            .await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Ends a closing channel after its challenge period.
    pub async fn settle(&self, id: B256) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("settle", c.settle(id)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Owner only: sets the platform fee.
    pub async fn set_fee(&self, fee_bps: u16) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("setFee", c.setFee(fee_bps)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Owner only: sets the treasury.
    pub async fn set_treasury(&self, treasury: Address) -> Result<TxOutcome, ChainError> {
        let c = self.centralizer();
        let r = self.send("setTreasury", c.setTreasury(treasury)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }

    /// Sends a plain ERC20 transfer of IPSX.
    pub async fn transfer_tokens(
        &self,
        to: Address,
        amount: U256,
    ) -> Result<TxOutcome, ChainError> {
        let token = self.token();
        let r = self.send("transfer", token.transfer(to, amount)).await?;
        Ok(TxOutcome::from_receipt(&r))
    }
}

mod permit_type {
    #![allow(missing_docs, unreachable_pub)]
    alloy::sol! {
        struct Permit {
            address owner;
            address spender;
            uint256 value;
            uint256 nonce;
            uint256 deadline;
        }
    }
}
