//! Exit selection for the ipsx gateway.
//!
//! Owns: what an exit is ([`ExitAttributes`]) and what a request asks for ([`Filter`]),
//! the rotation policies ([`Rotator`]), sticky sessions, rate limits ([`RateLimiter`]),
//! ban rules ([`classify`]) and cool-downs.
//! Does not own: sockets, tunnels, retries on the wire or config files; the core is
//! sans-IO and reads time only through an injected [`Clock`].

mod attrs;
mod ban;
mod clock;
mod error;
mod limit;
mod policy;
mod rng;
mod rotator;

pub use attrs::{AttrError, CountryCode, ExitAttributes, ExitKind, Filter, parse_asn, parse_place};
pub use ban::{
    BanRule, BanScopeKind, MAX_BODY_PATTERNS, MAX_COOLDOWN, MAX_PATTERN_LEN, Outcome, classify,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ParseError, SelectError};
pub use limit::{LimitScope, LimitSet, Limited, Quota, RateLimiter};
pub use policy::Policy;
pub use rotator::{
    BanScope, BanSnapshot, ExitId, ExitInfo, ExitSnapshot, InFlight, MAX_SESSION_ID, Rotator,
    RotatorConfig, SelectRequest, Selection, SessionSnapshot, SessionSpec, normalize_domain,
};

/// Serialises a duration as whole milliseconds (admin API JSON).
fn serde_millis<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
