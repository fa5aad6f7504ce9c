//! Per-request targeting: what the client asks of its exit, from the proxy username
//! (`acct-country-de-city-berlin-session-abc-sesstime-10`, the convention of the
//! commercial gateways) and from `X-Ipsx-*` request headers.

use std::time::Duration;

use ipsx_rotation::{AttrError, CountryCode, ExitKind, Filter, parse_asn, parse_place};

/// Why targeting was refused; always names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetingError {
    /// A key we do not know.
    #[error(
        "unknown targeting key `{0}` (known: country, region, city, asn, type, session, sesstime, lifetime, rotate)"
    )]
    UnknownKey(String),
    /// A key the commercial gateways know that no exit here can honour (`zip`, ...):
    /// refused rather than ignored, so the client never gets an exit it did not ask for.
    #[error(
        "targeting key `{0}` is not supported by this gateway (exits have country, region, city, asn and type)"
    )]
    Unsupported(String),
    /// A key with no value after it.
    #[error("targeting key `{0}` has no value")]
    MissingValue(String),
    /// The same key twice.
    #[error("targeting key `{0}` given twice")]
    Duplicate(String),
    /// A value of the wrong form.
    #[error("{0}")]
    BadValue(#[from] AttrError),
    /// A value out of range or of the wrong form for a non-attribute key.
    #[error("targeting key `{key}`: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// How requests rotate, when the client says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// A new exit for every request, even with a session id.
    Request,
    /// Keep the session's exit (needs a session id).
    Session,
}

/// What one request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targeting {
    /// Exit attributes asked for.
    pub filter: Filter,
    /// Sticky session id.
    pub session: Option<String>,
    /// Session lifetime asked for.
    pub session_ttl: Option<Duration>,
    /// Rotation asked for.
    pub rotate: Option<Rotate>,
}

/// Longest key quoted back in an error, in bytes.
const SHOWN_KEY_BYTES: usize = 32;

/// A key as quoted in an error: at most [`SHOWN_KEY_BYTES`] bytes, cut on a character
/// boundary (the key comes from the network and may be any UTF-8).
pub(crate) fn shown_key(key: &str) -> String {
    let mut end = key.len().min(SHOWN_KEY_BYTES);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_owned()
}

/// The canonical name returned for a key accepted and ignored (never a duplicate).
pub(crate) const IGNORED: &str = "";

/// IPRoyal's `lifetime`: a whole number and one unit, `s`, `m`, `h` or `d` (`30m`),
/// from 1 second to `max_ttl`.
fn parse_lifetime(key: &str, value: &str, max_ttl: Duration) -> Result<Duration, TargetingError> {
    let invalid = |message: String| TargetingError::Invalid {
        key: key.to_owned(),
        message,
    };
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(invalid(
                "a whole number and one unit: `s`, `m`, `h` or `d` (e.g. `30m`)".into(),
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| invalid("a whole number and one unit, e.g. `30m`".into()))?;
    let ttl = Duration::from_secs(n.saturating_mul(unit_secs));
    if n == 0 || ttl > max_ttl {
        return Err(invalid(format!("must be 1s..={}s", max_ttl.as_secs())));
    }
    Ok(ttl)
}

/// Header prefix for targeting on plain HTTP requests.
pub const HEADER_PREFIX: &str = "x-ipsx-";

impl Targeting {
    /// Parses a proxy username in any dialect (see [`crate::dialect`]): `ACCOUNT(-KEY-VALUE)*`
    /// and the commercial forms. Returns the account and the targeting.
    pub fn from_username(
        username: &str,
        max_ttl: Duration,
    ) -> Result<(String, Targeting), TargetingError> {
        let user = crate::dialect::ProxyUser::parse(username, None, max_ttl)?;
        Ok((user.account, user.targeting))
    }

    /// Fills fields not set yet from `X-Ipsx-<Key>` headers.
    pub fn add_headers<'a>(
        &mut self,
        headers: impl Iterator<Item = (&'a str, &'a [u8])>,
        max_ttl: Duration,
    ) -> Result<(), TargetingError> {
        let mut from_headers = Targeting::default();
        let mut seen: Vec<&'static str> = Vec::new();
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            let Some(key) = lower.strip_prefix(HEADER_PREFIX) else {
                continue;
            };
            let value = std::str::from_utf8(value).map_err(|_| TargetingError::Invalid {
                key: key.to_owned(),
                message: "value is not UTF-8".into(),
            })?;
            let canonical = from_headers.set(key, value.trim(), max_ttl)?;
            if canonical != IGNORED && seen.contains(&canonical) {
                return Err(TargetingError::Duplicate(canonical.to_owned()));
            }
            seen.push(canonical);
        }
        self.filter = std::mem::take(&mut self.filter).or(&from_headers.filter);
        self.session = self.session.take().or(from_headers.session);
        self.session_ttl = self.session_ttl.or(from_headers.session_ttl);
        self.rotate = self.rotate.or(from_headers.rotate);
        self.check()
    }

    /// Sets one key; returns its canonical name (duplicates are found by it).
    pub(crate) fn set(
        &mut self,
        key: &str,
        value: &str,
        max_ttl: Duration,
    ) -> Result<&'static str, TargetingError> {
        let lower = key.to_ascii_lowercase();
        let canonical = match lower.as_str() {
            "country" | "cc" => {
                self.filter.country = Some(CountryCode::parse(key, value)?);
                "country"
            }
            "region" | "state" | "st" => {
                self.filter.region = Some(parse_place(key, value)?);
                "region"
            }
            "city" => {
                self.filter.city = Some(parse_place(key, value)?);
                "city"
            }
            "asn" => {
                self.filter.asn = Some(parse_asn(key, value)?);
                "asn"
            }
            "type" => {
                self.filter.kind = Some(ExitKind::parse(key, value)?);
                "type"
            }
            "session" | "sessid" => {
                let ok = !value.is_empty()
                    && value.len() <= 64
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(TargetingError::Invalid {
                        key: key.to_owned(),
                        message: "1-64 letters, digits or `_`".into(),
                    });
                }
                self.session = Some(value.to_owned());
                "session"
            }
            "sesstime" | "sessionduration" => {
                let minutes: u64 = value.parse().map_err(|_| TargetingError::Invalid {
                    key: key.to_owned(),
                    message: format!("`{value}` is not a whole number of minutes"),
                })?;
                let ttl = Duration::from_secs(minutes.saturating_mul(60));
                if minutes == 0 || ttl > max_ttl {
                    return Err(TargetingError::Invalid {
                        key: key.to_owned(),
                        message: format!("must be 1..={} minutes", max_ttl.as_secs() / 60),
                    });
                }
                self.session_ttl = Some(ttl);
                "sesstime"
            }
            "lifetime" => {
                self.session_ttl = Some(parse_lifetime(key, value, max_ttl)?);
                "sesstime"
            }
            "zip" | "postalcode" | "continent" | "cn" | "ip" | "gip" | "os" | "carrier" | "isp"
            | "mobile" => return Err(TargetingError::Unsupported(lower.clone())),
            // Provider flags with no bearing on which exit is chosen: accepted, no effect.
            "dns" | "c_tag" | "route_err" | "forcerandom" | "skipispstatic" => IGNORED,
            "rotate" => {
                self.rotate = Some(match value.to_ascii_lowercase().as_str() {
                    "request" => Rotate::Request,
                    "session" => Rotate::Session,
                    _ => {
                        return Err(TargetingError::Invalid {
                            key: key.to_owned(),
                            message: format!("`{value}` is not `request` or `session`"),
                        });
                    }
                });
                "rotate"
            }
            _ => return Err(TargetingError::UnknownKey(shown_key(key))),
        };
        Ok(canonical)
    }

    pub(crate) fn check(&self) -> Result<(), TargetingError> {
        if self.rotate == Some(Rotate::Session) && self.session.is_none() {
            return Err(TargetingError::Invalid {
                key: "rotate".into(),
                message: "`session` rotation needs a `session` key".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn commercial_usernames_parse() {
        let (acct, t) = Targeting::from_username(
            "acme-country-DE-city-new_york-session-abc123-sesstime-10",
            DAY,
        )
        .unwrap();
        assert_eq!(acct, "acme");
        assert_eq!(t.filter.country.unwrap().as_str(), "de");
        assert_eq!(t.filter.city.as_deref(), Some("new york"));
        assert_eq!(t.session.as_deref(), Some("abc123"));
        assert_eq!(t.session_ttl, Some(Duration::from_secs(600)));
        let (_, t) = Targeting::from_username(
            "a-cc-us-st-california-asn-AS7922-type-mobile-sessid-x-rotate-session",
            DAY,
        )
        .unwrap();
        assert_eq!(t.filter.asn, Some(7922));
        assert_eq!(t.rotate, Some(Rotate::Session));
        let (acct, t) = Targeting::from_username("plain", DAY).unwrap();
        assert_eq!((acct.as_str(), t), ("plain", Targeting::default()));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("a-colour-red", "colour"),
            ("a-country", "country"),
            ("a-country-zz", "country"),
            ("a-cc-de-country-fr", "country"),
            ("a-asn-x", "asn"),
            ("a-type-satellite", "type"),
            ("a-session-a.b", "session"),
            ("a-sesstime-0", "sesstime"),
            ("a-sesstime-99999999", "sesstime"),
            ("a-rotate-sometimes", "rotate"),
            ("a-rotate-session", "rotate"),
        ];
        for (user, key) in cases {
            let err = Targeting::from_username(user, DAY).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{user}: {err}"
            );
        }
    }

    #[test]
    fn username_wins_over_headers() {
        let (_, mut t) = Targeting::from_username("a-country-de", DAY).unwrap();
        let headers: Vec<(&str, &[u8])> = vec![
            ("X-Ipsx-Country", b"fr"),
            ("X-Ipsx-City", b"berlin"),
            ("Accept", b"*/*"),
        ];
        t.add_headers(headers.into_iter(), DAY).unwrap();
        assert_eq!(t.filter.country.unwrap().as_str(), "de");
        assert_eq!(t.filter.city.as_deref(), Some("berlin"));
        let mut t = Targeting::default();
        let bad: Vec<(&str, &[u8])> = vec![("X-Ipsx-Planet", b"mars")];
        assert!(
            t.add_headers(bad.into_iter(), DAY)
                .unwrap_err()
                .to_string()
                .contains("`planet`")
        );
    }

    #[test]
    fn a_multibyte_character_at_the_cut_is_an_error_not_a_panic() {
        // Byte 32 of the key falls inside `é`: cutting the key there used to panic.
        let key = format!("{}é", "a".repeat(31));
        let err = Targeting::from_username(&format!("acct-{key}-x"), DAY).unwrap_err();
        assert_eq!(err, TargetingError::UnknownKey("a".repeat(31)));
        assert_eq!(shown_key("ab"), "ab");
        assert_eq!(shown_key(&"é".repeat(20)), "é".repeat(16));
    }

    proptest::proptest! {
        #[test]
        fn any_utf8_username_parses_or_names_a_key(user in ".{0,300}") {
            match Targeting::from_username(&user, DAY) {
                Ok((account, _)) => proptest::prop_assert!(account.len() <= user.len()),
                Err(e) => {
                    let text = e.to_string();
                    proptest::prop_assert!(text.contains('`'), "{}", text);
                }
            }
        }

        #[test]
        fn any_utf8_header_value_is_handled(name in "[A-Za-z-]{0,40}", value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            let mut t = Targeting::default();
            let header = format!("X-Ipsx-{name}");
            let _ = t.add_headers(std::iter::once((header.as_str(), value.as_slice())), DAY);
        }
    }
}
