//! The gateway's error: where a failure came from, what the client is told (HTTP status
//! or SOCKS reply), and whether another exit may be tried.

use std::time::Duration;

use crate::exit::DialError;
use crate::http1::HeadError;
use crate::socks5::Reply;
use crate::targeting::TargetingError;

/// A request the gateway could not carry out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Malformed or ambiguous request head.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// Missing or wrong proxy credentials.
    #[error("proxy authentication required")]
    Auth,
    /// Bad targeting parameters (names the key).
    #[error(transparent)]
    Targeting(#[from] TargetingError),
    /// Destination refused by policy or by the exit's protocols.
    #[error("{0}")]
    Forbidden(String),
    /// No exit can serve the request now (names the filter).
    #[error("{0}")]
    NoExit(String),
    /// Every exit that could serve the request is cooling down after a ban (503 with
    /// `Retry-After`).
    #[error("{message}")]
    CoolingDown {
        /// What is cooling down, for whom (names the filter and domain).
        message: String,
        /// When the first of them is usable again.
        retry_after: Duration,
    },
    /// A sticky session's exit is gone and the session does not allow a replacement.
    #[error("{0}")]
    SessionGone(String),
    /// Over a rate limit.
    #[error("rate limit ({scope}) exceeded; retry after {retry_after:?}")]
    RateLimited {
        /// Which limit.
        scope: &'static str,
        /// When a slot frees up.
        retry_after: Duration,
    },
    /// Dialling the target through the exit failed.
    #[error("exit `{exit}`: {source}")]
    Dial {
        /// The exit used.
        exit: String,
        /// What happened.
        source: DialError,
    },
    /// The target failed after the connection was made.
    #[error("exit `{exit}`: upstream error: {message}")]
    Upstream {
        /// The exit used.
        exit: String,
        /// What happened.
        message: String,
    },
    /// The target took longer than the response timeout.
    #[error("exit `{exit}`: no response within {timeout:?}")]
    UpstreamTimeout {
        /// The exit used.
        exit: String,
        /// The timeout.
        timeout: Duration,
    },
    /// Too many connections (global or per token).
    #[error("{0}")]
    Overloaded(String),
}

impl ProxyError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Head(h) => h.status(),
            Self::Auth => 407,
            Self::Targeting(_) => 400,
            Self::Forbidden(_) => 403,
            Self::Dial {
                source: DialError::Refused { .. },
                ..
            } => 403,
            Self::NoExit(_) | Self::CoolingDown { .. } | Self::Overloaded(_) => 503,
            Self::SessionGone(_) | Self::Upstream { .. } => 502,
            Self::RateLimited { .. } => 429,
            Self::Dial { source, .. } if source.is_timeout() => 504,
            Self::Dial { .. } => 502,
            Self::UpstreamTimeout { .. } => 504,
        }
    }

    /// The SOCKS5 reply code to answer with.
    pub fn socks_reply(&self) -> Reply {
        match self {
            Self::Forbidden(_)
            | Self::Dial {
                source: DialError::Refused { .. },
                ..
            } => Reply::NotAllowed,
            Self::Dial {
                source: DialError::Timeout { .. },
                ..
            }
            | Self::UpstreamTimeout { .. } => Reply::TtlExpired,
            Self::Dial {
                source: DialError::Connect { .. },
                ..
            } => Reply::ConnectionRefused,
            Self::Dial { .. } => Reply::HostUnreachable,
            Self::NoExit(_) | Self::CoolingDown { .. } => Reply::NetworkUnreachable,
            _ => Reply::GeneralFailure,
        }
    }

    /// How long the client should wait before retrying, for `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::CoolingDown { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Head(_) => "bad_request",
            Self::Auth => "auth",
            Self::Targeting(_) => "targeting",
            Self::Forbidden(_) => "forbidden",
            Self::NoExit(_) => "no_exit",
            Self::CoolingDown { .. } => "cooling_down",
            Self::SessionGone(_) => "session_gone",
            Self::RateLimited { .. } => "rate_limited",
            Self::Dial { .. } => "dial",
            Self::Upstream { .. } => "upstream",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::Overloaded(_) => "overloaded",
        }
    }
}
