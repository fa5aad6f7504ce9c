//! Token amounts as people write them ("12.5") and as the chain holds them (base units,
//! 18 decimals). Sans-IO, strict: no sign, no exponent, no more than 18 decimals.

use alloy::primitives::U256;

/// Decimals of the IPSX token.
pub const DECIMALS: usize = 18;
/// Longest amount text accepted (a U256 has at most 78 digits; this leaves room for a dot).
const MAX_LEN: usize = 100;

/// Why an amount text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AmountError {
    /// Empty or only a dot.
    #[error("amount is empty")]
    Empty,
    /// Longer than any valid amount.
    #[error("amount is {len} characters long, at most {MAX_LEN} allowed")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A character other than a digit or one dot.
    #[error("amount has an unexpected character {found:?} at position {position}")]
    BadCharacter {
        /// The character.
        found: char,
        /// Byte offset.
        position: usize,
    },
    /// More decimals than the token has.
    #[error("amount has {decimals} decimals, the token has {DECIMALS}")]
    TooManyDecimals {
        /// Decimals given.
        decimals: usize,
    },
    /// Does not fit 256 bits.
    #[error("amount is too large")]
    Overflow,
}

/// Parses a decimal token amount ("1", "0.25", "1800000000") into base units.
pub fn parse_tokens(text: &str) -> Result<U256, AmountError> {
    let text = text.trim();
    if text.len() > MAX_LEN {
        return Err(AmountError::TooLong { len: text.len() });
    }
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(AmountError::Empty);
    }
    for (position, found) in text.char_indices() {
        let dot_ok = found == '.' && position == int.len();
        if !found.is_ascii_digit() && !dot_ok {
            return Err(AmountError::BadCharacter { found, position });
        }
    }
    if frac.len() > DECIMALS {
        return Err(AmountError::TooManyDecimals {
            decimals: frac.len(),
        });
    }
    let mut value = U256::ZERO;
    let padded = frac.bytes().chain(std::iter::repeat(b'0')).take(DECIMALS);
    for digit in int.bytes().chain(padded) {
        value = value
            .checked_mul(U256::from(10u8))
            .and_then(|v| v.checked_add(U256::from(digit - b'0')))
            .ok_or(AmountError::Overflow)?;
    }
    Ok(value)
}

/// Formats base units as a decimal token amount without trailing zeros ("12.5", "0").
pub fn format_tokens(value: U256) -> String {
    let unit = U256::from(10u8).pow(U256::from(DECIMALS));
    let int = value / unit;
    let frac = value % unit;
    if frac.is_zero() {
        return int.to_string();
    }
    let frac = format!("{frac:0>width$}", width = DECIMALS);
    format!("{int}.{}", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_usual_amounts() {
        let e18 = U256::from(10u8).pow(U256::from(18u8));
        assert_eq!(parse_tokens("1").unwrap(), e18);
        assert_eq!(parse_tokens("0.5").unwrap(), e18 / U256::from(2u8));
        assert_eq!(parse_tokens(".5").unwrap(), e18 / U256::from(2u8));
        assert_eq!(parse_tokens("2.").unwrap(), e18 * U256::from(2u8));
        assert_eq!(
            parse_tokens("0.000000000000000001").unwrap(),
            U256::from(1u8)
        );
        assert_eq!(parse_tokens(" 3 ").unwrap(), e18 * U256::from(3u8));
    }

    #[test]
    fn refuses_hostile_amounts() {
        assert_eq!(parse_tokens(""), Err(AmountError::Empty));
        assert_eq!(parse_tokens("."), Err(AmountError::Empty));
        assert!(matches!(
            parse_tokens("-1"),
            Err(AmountError::BadCharacter {
                found: '-',
                position: 0
            })
        ));
        assert!(matches!(
            parse_tokens("+1"),
            Err(AmountError::BadCharacter { .. })
        ));
        assert!(matches!(
            parse_tokens("1e18"),
            Err(AmountError::BadCharacter { found: 'e', .. })
        ));
        assert!(matches!(
            parse_tokens("1.2.3"),
            Err(AmountError::BadCharacter {
                found: '.',
                position: 3
            })
        ));
        assert!(matches!(
            parse_tokens("0x10"),
            Err(AmountError::BadCharacter { .. })
        ));
        assert!(matches!(
            parse_tokens("1,5"),
            Err(AmountError::BadCharacter { .. })
        ));
        assert!(matches!(
            parse_tokens("１"),
            Err(AmountError::BadCharacter { .. })
        ));
        assert_eq!(
            parse_tokens("0.0000000000000000001"),
            Err(AmountError::TooManyDecimals { decimals: 19 })
        );
        assert_eq!(parse_tokens(&"9".repeat(70)), Err(AmountError::Overflow));
        assert_eq!(
            parse_tokens(&"9".repeat(1000)),
            Err(AmountError::TooLong { len: 1000 })
        );
    }

    #[test]
    fn formats_without_trailing_zeros() {
        assert_eq!(format_tokens(U256::ZERO), "0");
        assert_eq!(format_tokens(U256::from(1u8)), "0.000000000000000001");
        assert_eq!(format_tokens(parse_tokens("12.50").unwrap()), "12.5");
        assert_eq!(
            format_tokens(parse_tokens("1800000000").unwrap()),
            "1800000000"
        );
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(v in any::<u128>()) {
            let v = U256::from(v);
            prop_assert_eq!(parse_tokens(&format_tokens(v)).unwrap(), v);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,120}") {
            let _ = parse_tokens(&s);
        }
    }
}
