//! The chain module's error type. Variants name what was wrong: which call, which
//! contract, which field of which file, which wallet and how much it had.

use std::path::PathBuf;

use alloy::primitives::{Address, B256, Bytes};
use alloy::sol_types::SolInterface;

use super::bindings::{Centralizer::CentralizerErrors, IPSXToken::IPSXTokenErrors};
use super::proof::ProofError;
use super::units::format_tokens;

/// A contract revert, decoded against the Centralizer's and the token's custom errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Revert {
    /// One of the Centralizer's errors (including inherited ones such as
    /// `ReentrancyGuardReentrantCall`).
    Centralizer(CentralizerErrors),
    /// One of the token's errors (ERC20 / permit), e.g. bubbled up through `deposit`.
    Token(IPSXTokenErrors),
    /// `Error(string)` or `Panic(uint256)`, already rendered.
    Message(String),
    /// Revert data nothing here knows.
    Raw(Bytes),
}

impl Revert {
    /// Decodes raw revert data.
    pub fn decode(data: &[u8]) -> Self {
        if let Ok(e) = CentralizerErrors::abi_decode(data) {
            return Self::Centralizer(e);
        }
        if let Ok(e) = IPSXTokenErrors::abi_decode(data) {
            return Self::Token(e);
        }
        if let Some(msg) = alloy::sol_types::decode_revert_reason(data) {
            return Self::Message(msg);
        }
        Self::Raw(Bytes::copy_from_slice(data))
    }

    /// The Centralizer error, if that is what it is.
    pub fn centralizer(&self) -> Option<&CentralizerErrors> {
        match self {
            Self::Centralizer(e) => Some(e),
            _ => None,
        }
    }
}

impl std::fmt::Display for Revert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use CentralizerErrors as C;
        match self {
            Self::Centralizer(e) => match e {
                C::InsufficientBalance(e) => write!(
                    f,
                    "insufficient balance: wallet {} has {} IPSX free in the Centralizer, {} needed",
                    e.wallet,
                    format_tokens(e.available),
                    format_tokens(e.requested)
                ),
                C::ZeroAmount(_) => write!(f, "amount must be positive"),
                C::InvalidParameter(e) => write!(f, "invalid parameter `{}`", e.field),
                C::PermitFailed(e) => write!(
                    f,
                    "permit did not authorise {} IPSX from {}",
                    format_tokens(e.amount),
                    e.owner
                ),
                C::InvalidProvider(e) => write!(f, "invalid provider address {}", e.provider),
                C::ChannelNotFound(e) => {
                    write!(f, "channel {} does not exist (or is closed)", e.channelId)
                }
                C::NotRequester(e) => {
                    write!(
                        f,
                        "{} is not the requester of channel {}",
                        e.caller, e.channelId
                    )
                }
                C::NotProvider(e) => {
                    write!(
                        f,
                        "{} is not the provider of channel {}",
                        e.caller, e.channelId
                    )
                }
                C::ChannelClosing(e) => write!(
                    f,
                    "channel {} is closing (settle allowed from timestamp {})",
                    e.channelId, e.settleAfter
                ),
                C::ChannelNotClosing(e) => write!(f, "channel {} is not closing", e.channelId),
                C::ChallengePeriodActive(e) => write!(
                    f,
                    "channel {} is in its challenge period until timestamp {}",
                    e.channelId, e.settleAfter
                ),
                C::ChallengePeriodOver(e) => write!(
                    f,
                    "challenge period of channel {} ended at timestamp {}",
                    e.channelId, e.settleAfter
                ),
                C::StaleProof(e) => write!(
                    f,
                    "stale proof for channel {}: {} IPSX already claimed, proof says {}",
                    e.channelId,
                    format_tokens(e.claimed),
                    format_tokens(e.cumulativeAmount)
                ),
                C::ClaimExceedsDeposit(e) => write!(
                    f,
                    "proof for channel {} claims {} IPSX but the deposit is {}",
                    e.channelId,
                    format_tokens(e.cumulativeAmount),
                    format_tokens(e.deposit)
                ),
                C::MalformedSignature(e) => {
                    let why = match e.reason {
                        1 => "invalid (bad v or unrecoverable)",
                        2 => "not 65 bytes long",
                        3 => "high s value",
                        _ => "malformed",
                    };
                    write!(f, "signature for channel {} is {why}", e.channelId)
                }
                C::WrongSigner(e) => write!(
                    f,
                    "signature for channel {} is by {}, expected {} (wrong key, chain id or contract?)",
                    e.channelId, e.recovered, e.expected
                ),
                C::AmountTooLarge(e) => write!(f, "amount {} does not fit 128 bits", e.amount),
                C::ReentrancyGuardReentrantCall(_) => write!(f, "re-entrant call refused"),
                C::OwnableUnauthorizedAccount(e) => {
                    write!(f, "{} is not the Centralizer's owner", e.account)
                }
                other => write!(f, "{other:?}"),
            },
            Self::Token(e) => match e {
                IPSXTokenErrors::ERC20InsufficientBalance(e) => write!(
                    f,
                    "insufficient token balance: wallet {} holds {} IPSX, {} needed",
                    e.sender,
                    format_tokens(e.balance),
                    format_tokens(e.needed)
                ),
                IPSXTokenErrors::ERC20InsufficientAllowance(e) => write!(
                    f,
                    "insufficient allowance: {} may spend {} IPSX, {} needed",
                    e.spender,
                    format_tokens(e.allowance),
                    format_tokens(e.needed)
                ),
                IPSXTokenErrors::ERC2612ExpiredSignature(e) => {
                    write!(f, "permit expired at timestamp {}", e.deadline)
                }
                other => write!(f, "token error {other:?}"),
            },
            Self::Message(m) => write!(f, "{m}"),
            Self::Raw(b) if b.is_empty() => write!(f, "reverted without reason"),
            Self::Raw(b) => write!(f, "reverted with unknown data {b}"),
        }
    }
}

/// Everything that can go wrong talking to the chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The RPC URL does not parse.
    #[error("invalid RPC URL {url:?}: {reason}")]
    InvalidRpcUrl {
        /// The URL given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The RPC endpoint failed or could not be reached.
    #[error("RPC error while {action}: {source}")]
    Rpc {
        /// What was being done.
        action: String,
        /// The transport error.
        #[source]
        source: Box<alloy::transports::TransportError>,
    },
    /// The RPC serves another chain than the deployment file names.
    #[error(
        "wrong chain id: the deployment is for chain {expected}, the RPC serves chain {actual}"
    )]
    WrongChainId {
        /// From the deployment file.
        expected: u64,
        /// From `eth_chainId`.
        actual: u64,
    },
    /// No code at a contract address.
    #[error("contract {name} not deployed at {address} on chain {chain_id}")]
    ContractNotDeployed {
        /// "IPSXToken" or "Centralizer".
        name: &'static str,
        /// The address looked at.
        address: Address,
        /// The chain looked at.
        chain_id: u64,
    },
    /// A call or transaction reverted.
    #[error("{call} reverted: {reason}")]
    Reverted {
        /// The contract function.
        call: &'static str,
        /// The decoded reason.
        reason: Box<Revert>,
    },
    /// The transaction was mined but failed.
    #[error("{call} transaction {tx_hash} failed on chain")]
    TxFailed {
        /// The contract function.
        call: &'static str,
        /// Its hash.
        tx_hash: B256,
    },
    /// A contract call failed for another reason than a revert.
    #[error("{call} failed: {source}")]
    Contract {
        /// The contract function.
        call: &'static str,
        /// The error.
        #[source]
        source: Box<alloy::contract::Error>,
    },
    /// The node did not accept a transaction in time (gas estimate and send).
    #[error("sending the {call} transaction timed out after {after:?}")]
    SendTimeout {
        /// The contract function.
        call: &'static str,
        /// The time allowed.
        after: std::time::Duration,
    },
    /// Waiting for a transaction failed.
    #[error("waiting for the {call} transaction failed: {source}")]
    Pending {
        /// The contract function.
        call: &'static str,
        /// The error.
        #[source]
        source: Box<alloy::providers::PendingTransactionError>,
    },
    /// An expected event is missing from a receipt.
    #[error("{call} receipt has no {event} event")]
    MissingEvent {
        /// The contract function.
        call: &'static str,
        /// The event.
        event: &'static str,
    },
    /// A transaction needs a key but the client is read-only.
    #[error("{call} needs a wallet key, this client is read-only")]
    NoSigner {
        /// The contract function.
        call: &'static str,
    },
    /// Reading or writing a deployment file failed.
    #[error("deployment file {path}: {source}")]
    DeploymentIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A deployment file is not valid JSON of the expected shape.
    #[error("deployment file {path}: {source}")]
    DeploymentParse {
        /// The file.
        path: PathBuf,
        /// The parse error (names the field, line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A deployment file has an invalid value.
    #[error("deployment file {path}: field `{field}` {reason}")]
    DeploymentInvalid {
        /// The file.
        path: PathBuf,
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Deployment parameters are invalid.
    #[error("invalid deploy parameter `{field}`: {reason}")]
    InvalidDeployParam {
        /// The parameter at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A signature could not be made or checked.
    #[error("balance proof: {0}")]
    Proof(#[from] ProofError),
    /// The anvil binary was not found.
    #[error(
        "anvil binary not found (set IPSX_ANVIL or run scripts/install-chain.sh); looked at: {searched:?}"
    )]
    AnvilNotFound {
        /// Paths tried.
        searched: Vec<PathBuf>,
    },
    /// anvil did not start.
    #[error("anvil did not start: {reason}")]
    AnvilStart {
        /// Why.
        reason: String,
    },
}

impl ChainError {
    /// The decoded revert, if this is one.
    pub fn revert(&self) -> Option<&Revert> {
        match self {
            Self::Reverted { reason, .. } => Some(reason.as_ref()),
            _ => None,
        }
    }

    /// The Centralizer custom error, if this is one.
    pub fn centralizer_error(&self) -> Option<&CentralizerErrors> {
        self.revert().and_then(Revert::centralizer)
    }

    /// An RPC failure while doing `action`.
    pub(crate) fn rpc(
        action: impl Into<String>,
        source: alloy::transports::TransportError,
    ) -> Self {
        Self::Rpc {
            action: action.into(),
            source: Box::new(source),
        }
    }

    /// Maps an alloy contract error of `call`: reverts are decoded.
    pub(crate) fn from_contract(call: &'static str, source: alloy::contract::Error) -> Self {
        match source.as_revert_data() {
            Some(data) => Self::Reverted {
                call,
                reason: Box::new(Revert::decode(&data)),
            },
            None => Self::Contract {
                call,
                source: Box::new(source),
            },
        }
    }
}
