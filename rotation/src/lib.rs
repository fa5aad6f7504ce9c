//! Exit selection for the ipsx gateway.
//!
//! Owns: what an exit is ([`ExitAttributes`]) and what a request asks for ([`Filter`]),
//! the rotation policies ([`Rotator`]), sticky sessions, rate limits ([`RateLimiter`]),
//! ban rules ([`classify`]) and cool-downs.
//! Does not own: sockets, tunnels, retries on the wire or config files; the core is
//! sans-IO and reads time only through an injected [`Clock`].
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use ipsx_rotation::*;
//!
//! let clock = ManualClock::new();
//! let rotator = Rotator::new(RotatorConfig::default(), Arc::new(clock.clone()));
//! rotator.set_exits(vec![
//!     ExitInfo { id: ExitId::new("de-1"), attrs: ExitAttributes { country: "de".parse().ok(), ..Default::default() } },
//!     ExitInfo { id: ExitId::new("de-2"), attrs: ExitAttributes { country: "de".parse().ok(), ..Default::default() } },
//! ]);
//! let filter = Filter { country: "de".parse().ok(), ..Default::default() };
//! let session = SessionSpec { id: "s1".into(), ttl: Duration::from_secs(600), allow_replacement: false };
//! let req = SelectRequest { token: "tok", filter: &filter, policy: Policy::Sticky, session: Some(&session), domain: "example.com" };
//! let first = rotator.select(&req)?;
//! clock.advance(Duration::from_secs(300));
//! assert_eq!(rotator.select(&req)?.primary, first.primary);
//!
//! // The gateway checks rate limits for the chosen exit, then relays.
//! let limiter = RateLimiter::new(Arc::new(clock.clone()));
//! let limits = LimitSet { per_exit_domain: Some("1/s".parse()?), ..Default::default() };
//! limiter.check(&limits, "tok", &first.primary, "example.com")?;
//! let refused = limiter.check(&limits, "tok", &first.primary, "example.com").unwrap_err();
//! assert_eq!((refused.scope, refused.retry_after), (LimitScope::ExitDomain, Duration::from_secs(1)));
//! let _guard = rotator.begin(&first.primary); // in flight until dropped
//! rotator.record_success(&first.primary, Duration::from_millis(80));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

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
