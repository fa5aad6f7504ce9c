//! Rotation policies: how one exit is chosen among those that match a request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ParseError, truncate};

/// How [`Rotator::select`](crate::Rotator::select) orders the eligible exits.
///
/// Config and targeting spell these in kebab-case (`per-request`, `least-loaded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// A random exit, never the one this token was given last time when two or more
    /// match.
    #[default]
    PerRequest,
    /// The same exit for a session (token, session id) until its TTL runs out; without
    /// a session it behaves like [`Policy::PerRequest`].
    Sticky,
    /// The exits of the request's index bucket (country, or all) in turn.
    RoundRobin,
    /// A uniformly random exit.
    Random,
    /// The exit with the fewest requests in flight; ties random.
    LeastLoaded,
    /// The exit with the lowest latency EWMA; exits without a sample first; ties random.
    Fastest,
}

impl Policy {
    /// Every policy, in documentation order.
    pub const ALL: [Policy; 6] = [
        Policy::PerRequest,
        Policy::Sticky,
        Policy::RoundRobin,
        Policy::Random,
        Policy::LeastLoaded,
        Policy::Fastest,
    ];

    /// The kebab-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PerRequest => "per-request",
            Self::Sticky => "sticky",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
            Self::LeastLoaded => "least-loaded",
            Self::Fastest => "fastest",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = ParseError;

    /// Accepts the kebab-case names case-insensitively, with `_` for `-` as well.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Self::ALL
            .into_iter()
            .find(|p| {
                p.as_str().len() == wanted.len()
                    && p.as_str()
                        .bytes()
                        .zip(wanted.bytes())
                        .all(|(a, b)| a == b.to_ascii_lowercase() || (a == b'-' && b == b'_'))
            })
            .ok_or_else(|| ParseError::UnknownPolicy { text: truncate(s) })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_variants_are_accepted() {
        for p in Policy::ALL {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
            assert_eq!(p.to_string().to_uppercase().parse::<Policy>().unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), p);
        }
        assert_eq!(
            "least_loaded".parse::<Policy>().unwrap(),
            Policy::LeastLoaded
        );
    }

    #[test]
    fn bad_names_are_refused_with_the_text() {
        for bad in [
            "",
            "rr",
            "round robin",
            "sticky2",
            "per-request-",
            "périodique",
        ] {
            let err = bad.parse::<Policy>().unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
        let long = "x".repeat(10_000);
        let err = long.parse::<Policy>().unwrap_err().to_string();
        assert!(err.len() < 300, "error text stays small: {}", err.len());
        assert!(serde_json::from_str::<Policy>("\"rr\"").is_err());
    }
}
