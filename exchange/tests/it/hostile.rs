//! Every parser that sees network bytes, fed arbitrary and mutated input: errors, never
//! panics (property tests on stable instead of cargo-fuzz).
#![allow(clippy::unwrap_used, missing_docs)]

use alloy_primitives::B256;
use ipsx_exchange::client::SseParser;
use ipsx_exchange::server::{OfferBatch, SignedMessage, parse_json};
use ipsx_exchange::types::amount;
use ipsx_exchange::{
    BalanceProof, Cancel, Extend, Offer, Preferences, Rating, Request, StatusReport, WgKey, sign,
};
use proptest::prelude::*;

const VALID_OFFER: &str = r#"{"payload":{"provider":"0x0101010101010101010101010101010101010101","exit_address":"127.0.1.1","country":"de","city":"berlin","asn":3320,"type":"residential","protocols":["http","https"],"price_per_ip_second":"5","min_duration_s":5,"max_duration_s":86400,"capacity":1,"wg_endpoint":"127.0.1.1:51820","wg_public_key":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","expiry":4000000000,"nonce":1},"signature":"0x00"}"#;

fn all_parsers(bytes: &[u8]) {
    let _ = parse_json::<SignedMessage<Offer>>(bytes);
    let _ = parse_json::<SignedMessage<Request>>(bytes);
    let _ = parse_json::<SignedMessage<Cancel>>(bytes);
    let _ = parse_json::<SignedMessage<StatusReport>>(bytes);
    let _ = parse_json::<SignedMessage<Rating>>(bytes);
    let _ = parse_json::<SignedMessage<Preferences>>(bytes);
    let _ = parse_json::<SignedMessage<Extend>>(bytes);
    let _ = parse_json::<BalanceProof>(bytes);
    let _ = parse_json::<OfferBatch>(bytes);
    let mut p = SseParser::default();
    let _ = p.push(bytes);
    let text = String::from_utf8_lossy(bytes);
    let _ = amount::parse(&text);
    let _ = WgKey::parse(&text);
    let _ = sign::recover(&B256::ZERO, &text, true);
    let _ = ipsx_exchange::ExchangeConfig::from_toml(&text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        all_parsers(&bytes);
    }

    #[test]
    fn mutated_valid_orders_never_panic(pos in 0usize..VALID_OFFER.len(), byte in any::<u8>(), cut in 0usize..VALID_OFFER.len()) {
        let mut b = VALID_OFFER.as_bytes().to_vec();
        b[pos] = byte;
        all_parsers(&b);
        all_parsers(&VALID_OFFER.as_bytes()[..cut]);
    }

    #[test]
    fn arbitrary_strings_in_every_field_are_refused_or_accepted_cleanly(s in "\\PC{0,80}") {
        let v: serde_json::Value = serde_json::from_str(VALID_OFFER).unwrap();
        for field in ["provider", "exit_address", "country", "city", "asn", "type", "price_per_ip_second", "wg_endpoint", "wg_public_key", "expiry"] {
            let mut m = v.clone();
            m["payload"][field] = serde_json::Value::String(s.clone());
            let bytes = serde_json::to_vec(&m).unwrap();
            if let Err(e) = parse_json::<SignedMessage<Offer>>(&bytes) {
                // The error names where it happened.
                prop_assert!(e.to_string().contains(field), "{}: {}", field, e);
            }
        }
    }
}

const VALID_EXTEND: &str = r#"{"payload":{"wallet":"0x0101010101010101010101010101010101010101","deal_id":7,"new_end":4000000000,"expiry":4000000000,"nonce":1},"signature":"0x00"}"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any value in any field of an extension: refused naming the field, or parsed and
    /// then checked without panicking (new_end and expiry against any clock).
    #[test]
    fn extension_fields_are_refused_by_name_or_checked_cleanly(
        field in prop::sample::select(vec!["wallet", "deal_id", "new_end", "expiry", "nonce"]),
        value in prop_oneof![
            "\\PC{0,40}".prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::json!([1, 2])),
        ],
        now in any::<u64>(),
        ttl in any::<u64>(),
    ) {
        let mut m: serde_json::Value = serde_json::from_str(VALID_EXTEND).unwrap();
        m["payload"][field] = value;
        let bytes = serde_json::to_vec(&m).unwrap();
        match parse_json::<SignedMessage<Extend>>(&bytes) {
            Err(e) => prop_assert!(e.to_string().contains(field), "{}: {}", field, e),
            Ok(msg) => {
                if let Err(e) = msg.payload.check(now, ttl) {
                    let f = e.field().unwrap_or_default();
                    prop_assert!(f == "new_end" || f == "expiry", "{}", e);
                }
            }
        }
    }

    /// Excluded providers: any list of up to 40 strings is refused naming the field
    /// (not an address) or parsed; a parsed list is accepted up to 16 entries and
    /// refused naming `exclude_providers` beyond.
    #[test]
    fn excluded_providers_parse_and_check_by_name(items in proptest::collection::vec(prop_oneof![
        "0x[0-9a-f]{40}",
        "\\PC{0,44}",
    ], 0..40)) {
        let r: serde_json::Value = serde_json::json!({
            "requester": "0x0909090909090909090909090909090909090909",
            "count": 1, "duration_s": 60, "max_price_per_ip_second": "5",
            "wg_public_key": "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
            "expiry": 4000000000u64, "nonce": 1, "exclude_providers": items,
        });
        let bytes = serde_json::to_vec(&serde_json::json!({"payload": r, "signature": "0x00"})).unwrap();
        match parse_json::<SignedMessage<Request>>(&bytes) {
            Err(e) => prop_assert!(e.to_string().contains("exclude_providers"), "{}", e),
            Ok(mut msg) => {
                let n = msg.payload.exclude_providers.len();
                let res = msg.payload.check(3_999_999_000, 10_000);
                if n > 16 {
                    let field = res.unwrap_err().field();
                    prop_assert_eq!(field.as_deref(), Some("exclude_providers"));
                } else {
                    prop_assert!(res.is_ok(), "{:?}", res);
                    let v = &msg.payload.exclude_providers;
                    prop_assert!(v.windows(2).all(|w| w[0] < w[1]), "sorted without duplicates");
                }
            }
        }
    }
}

#[test]
fn the_valid_fixture_parses() {
    parse_json::<SignedMessage<Offer>>(VALID_OFFER.as_bytes()).unwrap();
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(parse_json::<SignedMessage<Offer>>(deep.as_bytes()).is_err());
    let deep_obj = format!("{{\"payload\":{}", "{\"a\":".repeat(50_000));
    assert!(parse_json::<SignedMessage<Offer>>(deep_obj.as_bytes()).is_err());
}
