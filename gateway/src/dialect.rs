//! The username (and password) dialects of the commercial gateways, so a scraper set
//! up for one of them works here by changing only host and port. Sans-IO: strings in,
//! an account and a [`Targeting`] out.
//!
//! | dialect | username | password |
//! |---|---|---|
//! | ipsx | `ACCOUNT-country-de-session-s1` | `TOKEN` |
//! | Bright Data | `brd-customer-hl_1234-zone-residential-country-de-session-abc` (or `lum-`) | `TOKEN` |
//! | Oxylabs | `customer-USER-cc-DE-city-berlin-sessid-abc-sesstime-5` | `TOKEN` |
//! | Decodo | `user-USER-country-de-city-new_york-session-abc-sessionduration-30` | `TOKEN` |
//! | IPRoyal | `USER` | `TOKEN_country-de_session-AbCd1234_lifetime-30m` |
//!
//! The token is always compared with the password; with IPRoyal's form, with the part
//! of the password before the targeting (see `auth.rs`). The username's first word
//! picks the dialect, so `brd`, `lum`, `customer` and `user` followed by `-` are not
//! ipsx account names.

use std::time::Duration;

use ipsx_rotation::CountryCode;

use crate::targeting::{IGNORED, Targeting, TargetingError, shown_key};

/// Which gateway's username form a client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `ACCOUNT-key-value...`.
    Ipsx,
    /// `brd-customer-ID-zone-ZONE-key-value...` (also `lum-`).
    BrightData,
    /// `customer-USER-key-value...`.
    Oxylabs,
    /// `user-USER-key-value...`.
    Decodo,
}

impl Dialect {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ipsx => "ipsx",
            Self::BrightData => "brightdata",
            Self::Oxylabs => "oxylabs",
            Self::Decodo => "decodo",
        }
    }
}

/// A client's identity and targeting, from its username and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUser {
    /// The username form used.
    pub dialect: Dialect,
    /// The sub-user: the ipsx account, Oxylabs/Decodo user, or Bright Data
    /// `CUSTOMER/ZONE`. Empty when the client sent none.
    pub account: String,
    /// What the client asks of its exit.
    pub targeting: Targeting,
}

/// Longest account accepted, in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 128;

impl ProxyUser {
    /// Parses a username, plus the targeting part of an IPRoyal-style password
    /// (`country-de_session-AbCd1234_lifetime-30m`, without the secret and its `_`).
    /// Keys given twice, in the username or across username and password, are refused.
    pub fn parse(
        username: &str,
        password_targeting: Option<&str>,
        max_ttl: Duration,
    ) -> Result<Self, TargetingError> {
        let words: Vec<&str> = username.split('-').collect();
        let first = words.first().copied().unwrap_or_default();
        let prefixed = words.len() > 1;
        let (dialect, account, rest) = match first.to_ascii_lowercase().as_str() {
            "brd" | "lum" if prefixed => {
                let customer = named(&words, 1, "customer")?;
                let zone = named(&words, 3, "zone")?;
                (
                    Dialect::BrightData,
                    format!("{customer}/{zone}"),
                    &words[5.min(words.len())..],
                )
            }
            "customer" if prefixed => (
                Dialect::Oxylabs,
                value_of(&words, 1, "customer")?,
                &words[2..],
            ),
            "user" if prefixed => (Dialect::Decodo, value_of(&words, 1, "user")?, &words[2..]),
            _ => (
                Dialect::Ipsx,
                first.to_owned(),
                &words[1.min(words.len())..],
            ),
        };
        if account.len() > MAX_ACCOUNT_BYTES || account.chars().any(char::is_control) {
            return Err(TargetingError::Invalid {
                key: "account".into(),
                message: format!("at most {MAX_ACCOUNT_BYTES} bytes, no control characters"),
            });
        }
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(rest.len() / 2 + 4);
        let mut it = rest.iter().copied();
        while let Some(key) = it.next() {
            match it.next() {
                Some(value) if !value.is_empty() => pairs.push((key, value)),
                _ => return Err(TargetingError::MissingValue(shown_key(key))),
            }
        }
        if let Some(text) = password_targeting.filter(|t| !t.is_empty()) {
            for part in text.split('_') {
                match part.split_once('-') {
                    Some((key, value)) if !value.is_empty() => pairs.push((key, value)),
                    _ if part.is_empty() => {
                        return Err(TargetingError::Invalid {
                            key: "password".into(),
                            message: "targeting after the token is `_key-value` pairs".into(),
                        });
                    }
                    _ => {
                        let key = part.split('-').next().unwrap_or_default();
                        return Err(TargetingError::MissingValue(shown_key(key)));
                    }
                }
            }
        }
        let mut targeting = Targeting::default();
        let mut seen: Vec<&'static str> = Vec::new();
        let mut implied_us = false;
        for (key, mut value) in pairs {
            let lower = key.to_ascii_lowercase();
            // Oxylabs and Decodo write US states as `us_california`.
            if matches!(dialect, Dialect::Oxylabs | Dialect::Decodo)
                && matches!(lower.as_str(), "st" | "state")
                && let Some(state) = value
                    .strip_prefix("us_")
                    .or_else(|| value.strip_prefix("US_"))
            {
                value = state;
                implied_us = true;
            }
            let canonical = targeting.set(key, value, max_ttl)?;
            if canonical != IGNORED && seen.contains(&canonical) {
                return Err(TargetingError::Duplicate(canonical.to_owned()));
            }
            seen.push(canonical);
        }
        if implied_us && targeting.filter.country.is_none() {
            targeting.filter.country = Some(CountryCode::parse("country", "us")?);
        }
        targeting.check()?;
        Ok(Self {
            dialect,
            account,
            targeting,
        })
    }
}

/// `words[i]` must be `name` and `words[i + 1]` its non-empty value.
fn named<'a>(words: &[&'a str], i: usize, name: &str) -> Result<&'a str, TargetingError> {
    match words.get(i) {
        Some(w) if w.eq_ignore_ascii_case(name) => {}
        _ => {
            return Err(TargetingError::Invalid {
                key: name.to_owned(),
                message: "missing: Bright Data usernames start `brd-customer-ID-zone-ZONE`".into(),
            });
        }
    }
    match words.get(i + 1) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(TargetingError::MissingValue(name.to_owned())),
    }
}

/// `words[i]`, which must not be empty: the user after `customer-` or `user-`.
fn value_of(words: &[&str], i: usize, name: &str) -> Result<String, TargetingError> {
    match words.get(i) {
        Some(v) if !v.is_empty() => Ok((*v).to_owned()),
        _ => Err(TargetingError::MissingValue(name.to_owned())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::targeting::Rotate;

    const DAY: Duration = Duration::from_secs(86_400);

    fn parse(user: &str, pass: Option<&str>) -> ProxyUser {
        ProxyUser::parse(user, pass, DAY).unwrap_or_else(|e| panic!("{user}: {e}"))
    }

    fn country(u: &ProxyUser) -> &str {
        u.targeting
            .filter
            .country
            .as_ref()
            .map_or("", |c| c.as_str())
    }

    #[test]
    fn bright_data() {
        let u = parse(
            "brd-customer-hl_1234-zone-residential-country-de-session-abc123",
            None,
        );
        assert_eq!(u.dialect, Dialect::BrightData);
        assert_eq!(u.account, "hl_1234/residential");
        assert_eq!(country(&u), "de");
        assert_eq!(u.targeting.session.as_deref(), Some("abc123"));
        let u = parse(
            "lum-customer-c_9f8e-zone-isp-country-us-state-ny-city-newyork-asn-7922-dns-remote",
            None,
        );
        assert_eq!(u.account, "c_9f8e/isp");
        assert_eq!(u.targeting.filter.region.as_deref(), Some("ny"));
        assert_eq!(u.targeting.filter.city.as_deref(), Some("newyork"));
        assert_eq!(u.targeting.filter.asn, Some(7922));
        let plain = parse("brd-customer-hl_1-zone-z", None);
        assert_eq!(plain.targeting, Targeting::default());
    }

    #[test]
    fn oxylabs() {
        let u = parse(
            "customer-USER-cc-DE-city-berlin-sessid-abc123-sesstime-5",
            None,
        );
        assert_eq!(u.dialect, Dialect::Oxylabs);
        assert_eq!(u.account, "USER");
        assert_eq!(country(&u), "de");
        assert_eq!(u.targeting.filter.city.as_deref(), Some("berlin"));
        assert_eq!(u.targeting.session.as_deref(), Some("abc123"));
        assert_eq!(u.targeting.session_ttl, Some(Duration::from_secs(300)));
        let u = parse("customer-USER-st-us_california", None);
        assert_eq!(country(&u), "us");
        assert_eq!(u.targeting.filter.region.as_deref(), Some("california"));
    }

    #[test]
    fn decodo() {
        let u = parse(
            "user-USER-country-de-city-new_york-session-abc-sessionduration-30",
            None,
        );
        assert_eq!(u.dialect, Dialect::Decodo);
        assert_eq!(u.account, "USER");
        assert_eq!(u.targeting.filter.city.as_deref(), Some("new york"));
        assert_eq!(u.targeting.session_ttl, Some(Duration::from_secs(1800)));
    }

    #[test]
    fn iproyal_password() {
        let u = parse("USER", Some("country-de_session-AbCd1234_lifetime-30m"));
        assert_eq!(u.dialect, Dialect::Ipsx);
        assert_eq!(u.account, "USER");
        assert_eq!(country(&u), "de");
        assert_eq!(u.targeting.session.as_deref(), Some("AbCd1234"));
        assert_eq!(u.targeting.session_ttl, Some(Duration::from_secs(1800)));
        for (life, secs) in [("10s", 10), ("2h", 7200), ("1d", 86_400)] {
            let u = parse("u", Some(&format!("session-s1_lifetime-{life}")));
            assert_eq!(u.targeting.session_ttl, Some(Duration::from_secs(secs)));
        }
        let u = parse("u", Some("country-br_city-saopaulo_forcerandom-1"));
        assert_eq!(country(&u), "br");
    }

    #[test]
    fn ipsx_form_is_unchanged() {
        let u = parse("acme-country-de-rotate-request", None);
        assert_eq!((u.dialect, u.account.as_str()), (Dialect::Ipsx, "acme"));
        assert_eq!(u.targeting.rotate, Some(Rotate::Request));
        assert_eq!(parse("", None).account, "");
        assert_eq!(parse("user", None).account, "user");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("brd-customer-hl_1-zone-z-zip-12345", None, "zip"),
            ("brd-customer-hl_1", None, "zone"),
            ("brd-zone-z", None, "customer"),
            ("brd-customer--zone-z", None, "customer"),
            ("customer-", None, "customer"),
            ("user-", None, "user"),
            ("customer-U-postalcode-90210", None, "postalcode"),
            ("user-U-colour-red", None, "colour"),
            ("user-U-country-de-cc-fr", None, "country"),
            ("u-country-de", Some("country-fr"), "country"),
            ("u", Some("lifetime-30x"), "lifetime"),
            ("u", Some("lifetime-0m"), "lifetime"),
            ("u", Some("lifetime-8d"), "lifetime"),
            ("u", Some("session"), "session"),
            ("u", Some("session-a_lifetime-"), "lifetime"),
            ("u", Some("isp-x"), "isp"),
        ];
        for (user, pass, key) in cases {
            let err = ProxyUser::parse(user, *pass, DAY).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{user} {pass:?}: {err}"
            );
        }
    }

    fn backticked(cell: &str) -> &str {
        cell.split('`').nth(1).unwrap_or_default()
    }

    #[test]
    fn readme_dialect_examples_parse_to_their_account() {
        let readme = include_str!("../../README.md");
        let section = readme.split("### Commercial dialects").nth(1).unwrap();
        let table = section.split("```").next().unwrap();
        let mut seen = 0;
        for line in table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| dialect"))
        {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (user, pass, account) = (
                backticked(cells[2]),
                backticked(cells[3]),
                backticked(cells[4]),
            );
            let targeting = pass.strip_prefix("TOKEN_");
            let u =
                ProxyUser::parse(user, targeting, DAY).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(u.account, account, "{line}");
            assert!(u.targeting.filter.country.is_some(), "{line}");
            seen += 1;
        }
        assert_eq!(seen, 5);
    }

    proptest::proptest! {
        #[test]
        fn any_username_and_password_parse_or_name_a_key(
            user in ".{0,255}",
            pass in proptest::option::of(".{0,255}"),
        ) {
            match ProxyUser::parse(&user, pass.as_deref(), DAY) {
                Ok(u) => proptest::prop_assert!(u.account.len() <= MAX_ACCOUNT_BYTES),
                Err(e) => {
                    let text = e.to_string();
                    proptest::prop_assert!(text.contains('`'), "{}", text);
                }
            }
        }

        #[test]
        fn dialect_words_parse_or_name_a_key(
            prefix in proptest::sample::select(vec!["brd-customer-c-zone-z", "lum-customer-c-zone-z", "customer-u", "user-u", "acct"]),
            pairs in proptest::collection::vec(
                (proptest::sample::select(vec!["country", "cc", "city", "state", "st", "asn", "session", "sessid", "sesstime", "sessionduration", "lifetime", "zip", "dns", "type", "x"]),
                 "[A-Za-z0-9_]{0,12}"),
                0..6),
        ) {
            let user = pairs.iter().fold(prefix.to_owned(), |u, (k, v)| format!("{u}-{k}-{v}"));
            match ProxyUser::parse(&user, None, DAY) {
                Ok(u) => proptest::prop_assert!(!u.account.is_empty()),
                Err(e) => proptest::prop_assert!(e.to_string().contains('`')),
            }
        }
    }
}
