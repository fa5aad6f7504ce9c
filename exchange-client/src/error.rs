//! The one error enum of the crate; every variant names the field, order, deal or peer
//! at fault, and maps to an HTTP status for the API.

use alloy_primitives::Address;

/// Everything the exchange can refuse or fail at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// A field has a value the exchange does not accept.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Path of the field (`payload.price_per_ip_second`, `count`, ...).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The body is not the JSON the route expects (syntax, unknown field, wrong type).
    #[error("body at `{path}`: {reason}")]
    BadJson {
        /// Path of the offending field, `.` for the document itself.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// The signature does not parse, or the signer is not the wallet the payload names.
    #[error("field `signature`: {reason}")]
    BadSignature {
        /// Why the signature was refused.
        reason: String,
    },
    /// The (wallet, nonce) pair was already used by an accepted message.
    #[error("field `nonce`: nonce {nonce} already used by {wallet}")]
    Replay {
        /// The signer.
        wallet: Address,
        /// The nonce seen twice.
        nonce: u64,
    },
    /// The message or order expired before it arrived.
    #[error("field `expiry`: {expiry} is not after now ({now})")]
    Expired {
        /// The expiry in the payload (unix seconds).
        expiry: u64,
        /// The exchange clock (unix seconds).
        now: u64,
    },
    /// The requester's free balance does not cover the order's maximum cost (or an
    /// extension's added value).
    #[error(
        "field `{field}`: wallet {wallet} needs {needed} base units, {available} free (on-chain balance minus holds)"
    )]
    InsufficientFunds {
        /// The field that asks for the money (`max_price_per_ip_second`, `new_end`).
        field: &'static str,
        /// The requester.
        wallet: Address,
        /// Maximum cost of the request.
        needed: u128,
        /// On-chain balance minus what the exchange already holds.
        available: u128,
    },
    /// No open order with that id.
    #[error("field `order_id`: no open order {0}")]
    UnknownOrder(u64),
    /// No deal with that id.
    #[error("field `deal_id`: no deal {0}")]
    UnknownDeal(u64),
    /// The signer is not allowed to act on that order or deal.
    #[error("field `wallet`: {wallet} is not a party of {what}")]
    NotParty {
        /// The signer.
        wallet: Address,
        /// `order 5`, `deal 7`.
        what: String,
    },
    /// A status report or rating that the deal's state does not allow.
    #[error("field `{field}`: {reason}")]
    Conflict {
        /// The field at fault (`status`, `amount`, `score`).
        field: String,
        /// Why.
        reason: String,
    },
    /// The balance source (chain) could not be read.
    #[error("chain: {0}")]
    Chain(String),
    /// The journal could not be written or read.
    #[error("storage: {0}")]
    Storage(String),
    /// The exchange answered the client with an error.
    #[error("exchange answered {status} {code}: {message}")]
    Remote {
        /// HTTP status.
        status: u16,
        /// The error code from the body.
        code: String,
        /// The field at fault, if named.
        field: Option<String>,
        /// The message from the body.
        message: String,
    },
    /// The client could not reach the exchange or read its answer.
    #[error("transport: {0}")]
    Transport(String),
    /// A flood limit refused the call (rate or cap); the limit is the config key.
    #[error("limit `{limit}`: {reason}")]
    Limited {
        /// The config key of the limit (`limits.client_rate_per_s`, ...).
        limit: String,
        /// What was exceeded.
        reason: String,
        /// Seconds after which a retry may pass (0: not before something changes).
        retry_after_s: u64,
    },
    /// An offer's place does not match what the GeoIP database says of its address.
    #[error("field `{field}`: {reason}")]
    Geo {
        /// `country` or `asn`.
        field: &'static str,
        /// What the offer claims and what the database says.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("config `{key}`: {reason}")]
    Config {
        /// The key at fault.
        key: String,
        /// Why.
        reason: String,
    },
}

impl ExchangeError {
    /// Shorthand for [`ExchangeError::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ExchangeError::Conflict`].
    pub fn conflict(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Conflict {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Invalid { .. } | Self::BadJson { .. } | Self::Expired { .. } => 400,
            Self::BadSignature { .. } => 401,
            Self::InsufficientFunds { .. } => 402,
            Self::NotParty { .. } => 403,
            Self::UnknownOrder(_) | Self::UnknownDeal(_) => 404,
            Self::Replay { .. } | Self::Conflict { .. } => 409,
            Self::Geo { .. } => 422,
            Self::Limited { .. } => 429,
            Self::Chain(_) | Self::Storage(_) | Self::Transport(_) => 503,
            Self::Remote { status, .. } => *status,
            Self::Config { .. } => 500,
        }
    }

    /// A short machine-readable code for the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::BadJson { .. } => "bad_json",
            Self::BadSignature { .. } => "bad_signature",
            Self::Replay { .. } => "replay",
            Self::Expired { .. } => "expired",
            Self::InsufficientFunds { .. } => "insufficient_funds",
            Self::UnknownOrder(_) => "unknown_order",
            Self::UnknownDeal(_) => "unknown_deal",
            Self::NotParty { .. } => "not_party",
            Self::Conflict { .. } => "conflict",
            Self::Limited { .. } => "limited",
            Self::Geo { .. } => "geo_mismatch",
            Self::Chain(_) => "chain",
            Self::Storage(_) => "storage",
            Self::Config { .. } => "config",
            Self::Remote { .. } => "remote",
            Self::Transport(_) => "transport",
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::Invalid { field, .. } | Self::Conflict { field, .. } => Some(field.clone()),
            Self::BadJson { path, .. } => Some(path.clone()),
            Self::BadSignature { .. } => Some("signature".into()),
            Self::Replay { .. } => Some("nonce".into()),
            Self::Expired { .. } => Some("expiry".into()),
            Self::InsufficientFunds { field, .. } => Some((*field).to_owned()),
            Self::UnknownOrder(_) => Some("order_id".into()),
            Self::UnknownDeal(_) => Some("deal_id".into()),
            Self::NotParty { .. } => Some("wallet".into()),
            Self::Config { key, .. } => Some(key.clone()),
            Self::Limited { limit, .. } => Some(limit.clone()),
            Self::Geo { field, .. } => Some((*field).to_owned()),
            Self::Remote { field, .. } => field.clone(),
            Self::Chain(_) | Self::Storage(_) | Self::Transport(_) => None,
        }
    }
}
