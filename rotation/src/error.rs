//! Errors of the crate: config-level parse errors and per-request selection errors.

use std::time::Duration;

use serde::Serialize;

use crate::Filter;
use crate::rotator::ExitId;

/// A config value this crate parses (policy, rate limit, ban rule) was refused.
/// Every variant names the text or field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Not one of the rotation policy names.
    #[error(
        "unknown rotation policy `{text}` (expected per-request, sticky, round-robin, random, least-loaded or fastest)"
    )]
    UnknownPolicy {
        /// The text as given (truncated to 64 bytes).
        text: String,
    },
    /// A rate limit that does not parse or cannot be enforced.
    #[error("rate limit `{text}`: {reason} (expected e.g. `10/s`, `600/min` or `5/s burst 20`)")]
    BadQuota {
        /// The text as given (truncated to 64 bytes).
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A ban rule field with a value that cannot work.
    #[error("ban rule: `{field}`: {reason}")]
    BadBanRule {
        /// The field at fault (`statuses`, `body_contains`, `cooldown`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A rotator setting out of range.
    #[error("rotation: `{field}`: {reason}")]
    BadRotatorConfig {
        /// The field at fault (`ewma_alpha`, `max_sessions`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why [`Rotator::select`](crate::Rotator::select) found no exit.
///
/// The gateway maps these to a client-visible error (HTTP 502/503 with `Retry-After`,
/// SOCKS reply 0x01); the variant says whether waiting can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SelectError {
    /// No healthy exit satisfies the filter (the pool must rent one).
    #[error("no healthy exit matches {filter}")]
    NoExitMatches {
        /// The filter nothing satisfied.
        filter: Filter,
    },
    /// Healthy exits match, but every one is cooling down (banned) for this domain or
    /// globally.
    #[error(
        "every exit matching {filter} is cooling down for `{domain}`; retry in {retry_after:?}"
    )]
    AllCoolingDown {
        /// The filter of the request.
        filter: Filter,
        /// The target domain of the request.
        domain: String,
        /// When the first of those exits comes back.
        #[serde(rename = "retry_after_ms", serialize_with = "crate::serde_millis")]
        retry_after: Duration,
    },
    /// The sticky session's exit is gone, unhealthy or banned and the session does not
    /// allow a replacement.
    #[error(
        "session `{session}`: its exit `{exit}` is no longer usable and replacement is not allowed"
    )]
    SessionExitGone {
        /// The session id (without the token).
        session: String,
        /// The exit the session was bound to.
        exit: ExitId,
    },
    /// The session id or TTL is unusable (empty or oversized id, zero TTL).
    #[error("session `{session}`: {reason}")]
    InvalidSession {
        /// The session id as given (truncated to 64 bytes).
        session: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl SelectError {
    /// How long to wait before the same request can succeed, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::AllCoolingDown { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Cuts `value` to at most 64 bytes on a char boundary (for error messages).
pub(crate) fn truncate(value: &str) -> String {
    let mut end = value.len().min(64);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}
