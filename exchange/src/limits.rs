//! Flood protection: what a stranger with free keys meets before the exchange spends
//! CPU on signatures, memory on the book or a call on the chain.
//!
//! Order of the checks on a write (cheapest first): body size (axum), the client
//! address's rate, JSON parse, the signature, the wallet's rate, then under the engine
//! lock the wallet's caps (open orders, nonces held) and the message's own checks, and
//! only then a chain balance read. Rates are governor GCRA limiters keyed by client
//! address (IPv6 by its /64, the unit one subscriber gets) and by wallet; keys whose
//! state is back at rest are dropped by [`Guard::sweep`], so the maps hold only the
//! recently active. Event-stream subscribers are counted per wallet and in total.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use alloy_primitives::Address;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ExchangeError;

pub use ipsx_exchange_client::api::LimitsConfig;

/// The key a client address is limited under: an IPv4 address as is (IPv4-mapped IPv6
/// too), an IPv6 address by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ipsx_egress::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// The limiters and counters of a running node.
#[derive(Debug)]
pub struct Guard {
    cfg: LimitsConfig,
    clients: DefaultKeyedRateLimiter<IpAddr>,
    wallets: DefaultKeyedRateLimiter<Address>,
    subscribers: Mutex<Subscribers>,
    clock: DefaultClock,
}

#[derive(Debug, Default)]
struct Subscribers {
    total: usize,
    by_wallet: HashMap<Address, usize>,
}

fn limited(key: &str, reason: String, retry_after_s: u64) -> ExchangeError {
    ExchangeError::Limited {
        limit: format!("limits.{key}"),
        reason,
        retry_after_s,
    }
}

impl Guard {
    /// Limiters for `cfg`.
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            cfg,
            clients: RateLimiter::keyed(quota(cfg.client_rate_per_s, cfg.client_burst)),
            wallets: RateLimiter::keyed(quota(cfg.wallet_rate_per_s, cfg.wallet_burst)),
            subscribers: Mutex::new(Subscribers::default()),
            clock: DefaultClock::default(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// Charges `n` calls to the client address `ip`; 429 naming
    /// `limits.client_rate_per_s` (or `limits.client_burst` when `n` alone exceeds it).
    pub fn client(&self, ip: IpAddr, n: usize) -> Result<(), ExchangeError> {
        let key = client_key(ip);
        self.charge(&self.clients, &key, n, "client", &key.to_string())
    }

    /// Charges `n` signed messages to `wallet`; 429 naming `limits.wallet_rate_per_s`
    /// (or `limits.wallet_burst`).
    pub fn wallet(&self, wallet: Address, n: usize) -> Result<(), ExchangeError> {
        self.charge(&self.wallets, &wallet, n, "wallet", &wallet.to_string())
    }

    fn charge<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        n: usize,
        what: &str,
        who: &str,
    ) -> Result<(), ExchangeError> {
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return match n {
                0 => Ok(()),
                _ => Err(limited(
                    &format!("{what}_burst"),
                    format!("{n} calls at once from {what} {who}"),
                    0,
                )),
            };
        };
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(limited(
                    &format!("{what}_rate_per_s"),
                    format!(
                        "{what} {who} is over its rate; retry in {} ms",
                        wait.as_millis()
                    ),
                    wait.as_secs() + 1,
                ))
            }
            Err(_) => Err(limited(
                &format!("{what}_burst"),
                format!("{n} calls at once from {what} {who}, more than the burst"),
                0,
            )),
        }
    }

    /// Refuses a new order of a wallet that already has `open` open orders.
    pub fn open_orders(&self, wallet: Address, open: usize) -> Result<(), ExchangeError> {
        if open >= self.cfg.max_open_orders_per_wallet {
            return Err(limited(
                "max_open_orders_per_wallet",
                format!(
                    "{wallet} has {open} open orders, at most {}; cancel or let some expire",
                    self.cfg.max_open_orders_per_wallet
                ),
                0,
            ));
        }
        Ok(())
    }

    /// Refuses a new order when the book already holds `open` orders in total.
    pub fn book_size(&self, open: usize) -> Result<(), ExchangeError> {
        if open >= self.cfg.max_open_orders {
            return Err(limited(
                "max_open_orders",
                format!(
                    "the book holds {open} open orders, at most {}",
                    self.cfg.max_open_orders
                ),
                5,
            ));
        }
        Ok(())
    }

    /// Refuses a new message of a wallet already holding `held` unexpired nonces.
    pub fn nonces(&self, wallet: Address, held: usize) -> Result<(), ExchangeError> {
        if held >= self.cfg.max_nonces_per_wallet {
            return Err(limited(
                "max_nonces_per_wallet",
                format!(
                    "{wallet} holds {held} unexpired nonces, at most {}; use shorter expiries",
                    self.cfg.max_nonces_per_wallet
                ),
                0,
            ));
        }
        Ok(())
    }

    /// Opens an event-stream slot for `wallet`; dropping the [`Subscription`] frees it.
    pub fn subscribe(self: &Arc<Self>, wallet: Address) -> Result<Subscription, ExchangeError> {
        let mut s = self
            .subscribers
            .lock()
            .map_err(|_| ExchangeError::Storage("subscriber lock poisoned".into()))?;
        if s.total >= self.cfg.max_subscribers {
            return Err(limited(
                "max_subscribers",
                format!(
                    "{} event streams open, at most {}",
                    s.total, self.cfg.max_subscribers
                ),
                1,
            ));
        }
        let mine = s.by_wallet.get(&wallet).copied().unwrap_or(0);
        if mine >= self.cfg.max_subscribers_per_wallet {
            return Err(limited(
                "max_subscribers_per_wallet",
                format!(
                    "{wallet} has {mine} event streams open, at most {}",
                    self.cfg.max_subscribers_per_wallet
                ),
                1,
            ));
        }
        s.total += 1;
        *s.by_wallet.entry(wallet).or_default() += 1;
        Ok(Subscription {
            guard: self.clone(),
            wallet,
        })
    }

    /// Open event streams: (total, of `wallet`).
    pub fn subscribers(&self, wallet: &Address) -> (usize, usize) {
        self.subscribers.lock().map_or((0, 0), |s| {
            (s.total, s.by_wallet.get(wallet).copied().unwrap_or(0))
        })
    }

    /// Forgets limiter keys that are back at rest (call now and then).
    pub fn sweep(&self) {
        self.clients.retain_recent();
        self.wallets.retain_recent();
        self.clients.shrink_to_fit();
        self.wallets.shrink_to_fit();
    }

    /// Keys the limiters hold: (client addresses, wallets).
    pub fn tracked(&self) -> (usize, usize) {
        (self.clients.len(), self.wallets.len())
    }
}

/// An open event-stream slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Subscription {
    guard: Arc<Guard>,
    wallet: Address,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut s) = self.guard.subscribers.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.by_wallet.get_mut(&self.wallet) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.by_wallet.remove(&self.wallet);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rates_caps_and_subscribers_refuse_with_the_key() {
        let cfg = LimitsConfig {
            max_open_orders: 10,
            client_rate_per_s: 1,
            client_burst: 3,
            wallet_rate_per_s: 1,
            wallet_burst: 2,
            max_open_orders_per_wallet: 2,
            max_nonces_per_wallet: 5,
            max_subscribers_per_wallet: 1,
            max_subscribers: 2,
        };
        let g = Arc::new(Guard::new(cfg));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        g.client(ip, 3).unwrap();
        let e = g.client(ip, 1).unwrap_err();
        assert_eq!(e.http_status(), 429);
        assert_eq!(e.field().as_deref(), Some("limits.client_rate_per_s"));
        let e = g.client("192.0.2.2".parse().unwrap(), 4).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("limits.client_burst"));
        g.client("192.0.2.2".parse().unwrap(), 1).unwrap();

        let w = Address::repeat_byte(7);
        g.wallet(w, 2).unwrap();
        assert_eq!(
            g.wallet(w, 1).unwrap_err().field().as_deref(),
            Some("limits.wallet_rate_per_s")
        );
        g.wallet(Address::repeat_byte(8), 1).unwrap();

        g.open_orders(w, 1).unwrap();
        assert_eq!(
            g.open_orders(w, 2).unwrap_err().field().as_deref(),
            Some("limits.max_open_orders_per_wallet")
        );
        g.book_size(9).unwrap();
        assert_eq!(
            g.book_size(10).unwrap_err().field().as_deref(),
            Some("limits.max_open_orders")
        );
        assert_eq!(
            g.nonces(w, 5).unwrap_err().field().as_deref(),
            Some("limits.max_nonces_per_wallet")
        );

        let a = g.subscribe(w).unwrap();
        assert_eq!(
            g.subscribe(w).unwrap_err().field().as_deref(),
            Some("limits.max_subscribers_per_wallet")
        );
        let b = g.subscribe(Address::repeat_byte(9)).unwrap();
        assert_eq!(
            g.subscribe(Address::repeat_byte(10))
                .unwrap_err()
                .field()
                .as_deref(),
            Some("limits.max_subscribers")
        );
        drop(a);
        drop(b);
        assert_eq!(g.subscribers(&w), (0, 0));
        g.subscribe(w).unwrap();
    }

    #[test]
    fn ipv6_clients_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    proptest! {
        /// Over any sequence of charges, a key never gets more than its burst at once.
        #[test]
        fn a_client_never_gets_more_than_its_burst(
            burst in 1u32..50,
            charges in proptest::collection::vec(0usize..20, 0..40),
        ) {
            let g = Guard::new(LimitsConfig {
                client_rate_per_s: 1,
                client_burst: burst,
                ..LimitsConfig::default()
            });
            let ip: IpAddr = "198.51.100.1".parse().unwrap();
            let mut granted = 0usize;
            for n in charges {
                if g.client(ip, n).is_ok() {
                    granted += n;
                }
            }
            // One token may refill while the test runs (1 per second).
            prop_assert!(granted <= burst as usize + 1, "{granted} > {burst}");
        }
    }
}
