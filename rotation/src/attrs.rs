//! What an exit is (its attributes) and what a request asks for (a [`Filter`]).
//!
//! These types are shared by the config, the gateway's targeting parser, the exchange's
//! offers and the tunnel pool, so they live here, at the bottom of the crate graph.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a targeting value was refused; names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttrError {
    /// The value is not an ISO 3166-1 alpha-2 code in use.
    #[error("key `{key}`: unknown country code `{value}` (expected ISO 3166-1 alpha-2, e.g. `de`)")]
    UnknownCountry {
        /// The key that carried the value (`country`, `cc`, ...).
        key: String,
        /// The value as given.
        value: String,
    },
    /// The exit type is not one of residential, mobile, datacenter.
    #[error(
        "key `{key}`: unknown exit type `{value}` (expected residential, mobile or datacenter)"
    )]
    UnknownKind {
        /// The key that carried the value.
        key: String,
        /// The value as given.
        value: String,
    },
    /// An ASN that is not a number in 1..=4294967294.
    #[error("key `{key}`: bad ASN `{value}` (expected a number such as 3320 or AS3320)")]
    BadAsn {
        /// The key that carried the value.
        key: String,
        /// The value as given.
        value: String,
    },
    /// A free-text value (region, city) that is empty, too long or has odd characters.
    #[error("key `{key}`: bad value `{value}` (1-64 letters, digits, `_`, `.` or spaces)")]
    BadText {
        /// The key that carried the value.
        key: String,
        /// The value as given (truncated to 64 bytes).
        value: String,
    },
}

/// ISO 3166-1 alpha-2 codes officially assigned, plus `uk` and `el`, which commercial
/// gateways accept as aliases of `gb` and `gr`.
const ISO_ALPHA2: &str = "ad ae af ag ai al am ao aq ar as at au aw ax az ba bb bd be bf bg bh bi bj bl bm bn bo bq br bs bt bv bw by bz ca cc cd cf cg ch ci ck cl cm cn co cr cu cv cw cx cy cz de dj dk dm do dz ec ee eg eh er es et fi fj fk fm fo fr ga gb gd ge gf gg gh gi gl gm gn gp gq gr gs gt gu gw gy hk hm hn hr ht hu id ie il im in io iq ir is it je jm jo jp ke kg kh ki km kn kp kr kw ky kz la lb lc li lk lr ls lt lu lv ly ma mc md me mf mg mh mk ml mm mn mo mp mq mr ms mt mu mv mw mx my mz na nc ne nf ng ni nl no np nr nu nz om pa pe pf pg ph pk pl pm pn pr ps pt pw py qa re ro rs ru rw sa sb sc sd se sg sh si sj sk sl sm sn so sr ss st sv sx sy sz tc td tf tg th tj tk tl tm tn to tr tt tv tw tz ua ug um us uy uz va vc ve vg vi vn vu wf ws ye yt za zm zw";

/// A country, as an ISO 3166-1 alpha-2 code stored lower-case (`de`, `us`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Parses a code case-insensitively; `uk` becomes `gb` and `el` becomes `gr`.
    pub fn parse(key: &str, value: &str) -> Result<Self, AttrError> {
        let err = || AttrError::UnknownCountry {
            key: key.to_owned(),
            value: truncate(value),
        };
        let bytes = value.as_bytes();
        if bytes.len() != 2 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(err());
        }
        let code = [bytes[0].to_ascii_lowercase(), bytes[1].to_ascii_lowercase()];
        let code = match &code {
            b"uk" => *b"gb",
            b"el" => *b"gr",
            _ => code,
        };
        let known = ISO_ALPHA2
            .as_bytes()
            .chunks(3)
            .any(|chunk| chunk[..2] == code);
        if known { Ok(Self(code)) } else { Err(err()) }
    }

    /// The lower-case two-letter code.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CountryCode {
    type Err = AttrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse("country", s)
    }
}

impl TryFrom<String> for CountryCode {
    type Error = AttrError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse("country", &s)
    }
}

impl From<CountryCode> for String {
    fn from(c: CountryCode) -> Self {
        c.as_str().to_owned()
    }
}

/// The kind of connection an exit's address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitKind {
    /// A home broadband address.
    Residential,
    /// A mobile carrier address.
    Mobile,
    /// A hosting provider's address.
    Datacenter,
}

impl ExitKind {
    /// Parses `residential`, `mobile` or `datacenter` (case-insensitive).
    pub fn parse(key: &str, value: &str) -> Result<Self, AttrError> {
        match value.to_ascii_lowercase().as_str() {
            "residential" => Ok(Self::Residential),
            "mobile" => Ok(Self::Mobile),
            "datacenter" => Ok(Self::Datacenter),
            _ => Err(AttrError::UnknownKind {
                key: key.to_owned(),
                value: truncate(value),
            }),
        }
    }

    /// The lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Residential => "residential",
            Self::Mobile => "mobile",
            Self::Datacenter => "datacenter",
        }
    }
}

/// Parses an ASN given as `3320` or `AS3320`.
pub fn parse_asn(key: &str, value: &str) -> Result<u32, AttrError> {
    let digits = value
        .strip_prefix("AS")
        .or_else(|| value.strip_prefix("as"))
        .unwrap_or(value);
    match digits.parse::<u32>() {
        Ok(n) if n != 0 && n != u32::MAX && !digits.starts_with('+') => Ok(n),
        _ => Err(AttrError::BadAsn {
            key: key.to_owned(),
            value: truncate(value),
        }),
    }
}

/// Normalises a region or city name: lower-case, `_` and `+` read as spaces.
pub fn parse_place(key: &str, value: &str) -> Result<String, AttrError> {
    let normalised: String = value
        .chars()
        .map(|c| if c == '_' || c == '+' { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_lowercase();
    let ok = !normalised.is_empty()
        && normalised.len() <= 64
        && normalised
            .chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || c == '.' || c == '-' || c == '\'');
    if ok {
        Ok(normalised)
    } else {
        Err(AttrError::BadText {
            key: key.to_owned(),
            value: truncate(value),
        })
    }
}

fn truncate(value: &str) -> String {
    let mut end = value.len().min(64);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// What is known about one exit: where its address is and what kind it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitAttributes {
    /// Country of the exit address.
    pub country: Option<CountryCode>,
    /// Region or state, normalised by [`parse_place`].
    pub region: Option<String>,
    /// City, normalised by [`parse_place`].
    pub city: Option<String>,
    /// Autonomous system number of the exit address.
    pub asn: Option<u32>,
    /// Residential, mobile or datacenter.
    #[serde(rename = "type")]
    pub kind: Option<ExitKind>,
}

/// What a request asks of its exit. Every field that is set must match; unset fields
/// match anything. An exit attribute that is unknown never matches a set field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Filter {
    /// Required country.
    pub country: Option<CountryCode>,
    /// Required region.
    pub region: Option<String>,
    /// Required city.
    pub city: Option<String>,
    /// Required ASN.
    pub asn: Option<u32>,
    /// Required exit type.
    #[serde(rename = "type")]
    pub kind: Option<ExitKind>,
}

impl Filter {
    /// True when `attrs` satisfies every field set in this filter.
    pub fn matches(&self, attrs: &ExitAttributes) -> bool {
        fn field<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
            match want {
                None => true,
                Some(w) => have.as_ref() == Some(w),
            }
        }
        field(&self.country, &attrs.country)
            && field(&self.region, &attrs.region)
            && field(&self.city, &attrs.city)
            && field(&self.asn, &attrs.asn)
            && field(&self.kind, &attrs.kind)
    }

    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Fills every unset field from `defaults` (explicit targeting overrides rules).
    pub fn or(mut self, defaults: &Filter) -> Filter {
        if self.country.is_none() {
            self.country = defaults.country;
        }
        if self.region.is_none() {
            self.region.clone_from(&defaults.region);
        }
        if self.city.is_none() {
            self.city.clone_from(&defaults.city);
        }
        if self.asn.is_none() {
            self.asn = defaults.asn;
        }
        if self.kind.is_none() {
            self.kind = defaults.kind;
        }
        self
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(c) = &self.country {
            parts.push(format!("country={c}"));
        }
        if let Some(r) = &self.region {
            parts.push(format!("region={r}"));
        }
        if let Some(c) = &self.city {
            parts.push(format!("city={c}"));
        }
        if let Some(a) = &self.asn {
            parts.push(format!("asn={a}"));
        }
        if let Some(k) = &self.kind {
            parts.push(format!("type={}", k.as_str()));
        }
        if parts.is_empty() {
            f.write_str("any")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn country_codes_parse_case_insensitively_with_aliases() {
        assert_eq!(
            CountryCode::parse("cc", "DE").map(|c| c.to_string()),
            Ok("de".into())
        );
        assert_eq!(
            CountryCode::parse("cc", "uk").map(|c| c.to_string()),
            Ok("gb".into())
        );
        for bad in ["zz", "", "d", "deu", "d1", "ü", "xx"] {
            let err = CountryCode::parse("country", bad).unwrap_err();
            assert!(err.to_string().contains("`country`"), "{err}");
        }
    }

    #[test]
    fn filter_matches_only_what_it_names() {
        let de = ExitAttributes {
            country: Some("de".parse().unwrap()),
            city: Some("berlin".into()),
            ..Default::default()
        };
        assert!(Filter::default().matches(&de));
        let mut f = Filter {
            country: Some("de".parse().unwrap()),
            ..Default::default()
        };
        assert!(f.matches(&de));
        f.asn = Some(3320);
        assert!(!f.matches(&de), "unknown ASN never matches a set ASN");
    }

    #[test]
    fn asn_and_places_are_checked() {
        assert_eq!(parse_asn("asn", "AS3320"), Ok(3320));
        assert!(parse_asn("asn", "0").is_err());
        assert!(parse_asn("asn", "+5").is_err());
        assert!(parse_asn("asn", "x").is_err());
        assert_eq!(parse_place("city", "new_york"), Ok("new york".into()));
        assert!(parse_place("city", "").is_err());
        assert!(parse_place("city", "a/b").is_err());
        assert!(parse_place("city", &"x".repeat(65)).is_err());
    }
}
