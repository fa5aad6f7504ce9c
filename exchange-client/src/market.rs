//! The market protocol both sides of a deal follow, as shared arithmetic: where the
//! requester sits inside the provider's tunnel, and how much has to be paid by when.
//!
//! The steps themselves are in `docs/market.md`; keeping the numbers here means the
//! gateway (requester) and the provider agent cannot disagree on them.

use std::net::Ipv4Addr;
use std::time::Duration;

/// The provider exit's own address inside every tunnel; also its DNS server.
pub const EXIT_INNER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The requester's address inside the provider's tunnel for `deal_id`: unique among
/// the 65,000 most recent deals of one provider, the same on both sides without a
/// message.
pub fn inner_ip_for_deal(deal_id: u64) -> Ipv4Addr {
    let host = 2 + (deal_id % 65_000) as u32;
    Ipv4Addr::new(10, 77, (host >> 8) as u8, (host & 0xff) as u8)
}

/// The provider's default first window: it starts serving once a verified proof covers
/// this much service (`timings.first_window`). Small, so a requester risks little
/// before it has seen the tunnel work.
pub const DEFAULT_FIRST_WINDOW: Duration = Duration::from_secs(2);

/// The requester's default first payment, in seconds of service: what it pays before
/// its tunnel handshake and exit check succeeded (then it pays a full window ahead).
/// At least [`DEFAULT_FIRST_WINDOW`], so the defaults of both sides always agree.
pub const DEFAULT_REQUESTER_FIRST_WINDOW: Duration = Duration::from_secs(5);

const _: () = assert!(
    DEFAULT_REQUESTER_FIRST_WINDOW.as_secs() >= DEFAULT_FIRST_WINDOW.as_secs(),
    "the requester's first payment must cover the provider's first window"
);

/// The amount the first balance proof of a deal worth `deal_value` must reach for a
/// provider with first window `first_window` to start serving: its cost, never more
/// than the deal's value.
pub fn first_window_due(price_per_second: u128, first_window: Duration, deal_value: u128) -> u128 {
    cost(price_per_second, first_window.as_secs()).min(deal_value)
}

/// What `seconds` of service at `price_per_second` cost, saturating instead of
/// overflowing (a price that large is refused by the exchange anyway).
pub fn cost(price_per_second: u128, seconds: u64) -> u128 {
    price_per_second.saturating_mul(u128::from(seconds))
}

/// The cumulative amount a requester's balance proof must reach after `served` of a
/// deal worth `deal_value`: service so far plus one prepaid `window`, never more than
/// the deal's value. The provider serves while the latest proof covers
/// `served - grace`; the requester never pays more than one window ahead.
pub fn amount_due(
    price_per_second: u128,
    served: Duration,
    window: Duration,
    deal_value: u128,
) -> u128 {
    let seconds = served.as_secs().saturating_add(window.as_secs());
    cost(price_per_second, seconds).min(deal_value)
}

/// True when a proof of `paid` still covers `served` of service with `grace` allowed.
pub fn payment_covers(
    price_per_second: u128,
    paid: u128,
    served: Duration,
    grace: Duration,
) -> bool {
    let owed_seconds = served.saturating_sub(grace).as_secs();
    paid >= cost(price_per_second, owed_seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_addresses_are_distinct_and_never_the_exit() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..65_000u64 {
            let ip = inner_ip_for_deal(id);
            assert_ne!(ip, EXIT_INNER_ADDR);
            assert_eq!(ip.octets()[..2], [10, 77]);
            assert!(seen.insert(ip), "{id} -> {ip}");
        }
        assert_eq!(
            inner_ip_for_deal(u64::MAX),
            inner_ip_for_deal(u64::MAX % 65_000)
        );
    }

    #[test]
    fn the_first_window_is_small_and_agreed() {
        assert_eq!(first_window_due(10, DEFAULT_FIRST_WINDOW, 1_000), 20);
        assert_eq!(first_window_due(10, DEFAULT_FIRST_WINDOW, 15), 15);
        assert_eq!(
            first_window_due(u128::MAX, DEFAULT_FIRST_WINDOW, u128::MAX),
            u128::MAX
        );
        // The requester's default first payment is accepted by a default provider.
        let price = 7;
        let paid = amount_due(price, Duration::ZERO, DEFAULT_REQUESTER_FIRST_WINDOW, 1_000);
        assert!(paid >= first_window_due(price, DEFAULT_FIRST_WINDOW, 1_000));
    }

    #[test]
    fn payments_run_one_window_ahead_and_never_past_the_deal() {
        let w = Duration::from_secs(30);
        assert_eq!(amount_due(10, Duration::ZERO, w, 1_000_000), 300);
        assert_eq!(
            amount_due(10, Duration::from_secs(100), w, 1_000_000),
            1_300
        );
        assert_eq!(amount_due(10, Duration::from_secs(100), w, 500), 500);
        assert_eq!(
            amount_due(u128::MAX, Duration::from_secs(2), w, u128::MAX),
            u128::MAX
        );
        assert!(payment_covers(
            10,
            300,
            Duration::from_secs(35),
            Duration::from_secs(10)
        ));
        assert!(!payment_covers(
            10,
            300,
            Duration::from_secs(45),
            Duration::from_secs(10)
        ));
    }
}
