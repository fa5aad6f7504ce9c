//! Per-peer metering, a bounded in-memory window of the peer's connections with a
//! running SHA-256 chain over them, and the hook that records each connection in its
//! deal's log.
//!
//! What settlement commits is the per-deal chain kept on disk by the agent
//! ([`crate::connlog_store`], `ipsx_exchange_client::connlog`): the agent binds a
//! peer's meter to the deal it serves ([`PeerMeter::bind_deal`]) and every finished
//! connection goes to that deal's log. The per-peer chain here
//! (`h0 = SHA-256("ipsx-connlog-v1" || peer_public_key)`, `h(n) = SHA-256(h(n-1) ||
//! entry(n))`) only describes the exit's own window (a bare exit knows no deals).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// Entries kept in memory per peer (the hash covers every entry ever appended).
pub const LOG_KEEP: usize = 10_000;

/// One relayed connection, and its canonical 51-byte encoding: the one definition the
/// requester checks against (`ipsx_exchange_client::connlog`).
pub use ipsx_exchange_client::connlog::LogEntry;

/// The first link of a peer's chain.
pub fn genesis(peer_public_key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"ipsx-connlog-v1");
    h.update(peer_public_key);
    h.finalize().into()
}

/// The next link.
pub fn chain(prev: &[u8; 32], entry: &LogEntry) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(entry.encode());
    h.finalize().into()
}

/// Where a bound peer's finished connections go: the deal's log.
pub trait LogSink: Send + Sync + std::fmt::Debug {
    /// One finished connection of `deal_id`.
    fn record(&self, deal_id: u64, entry: &LogEntry);
}

impl LogSink for crate::connlog_store::ConnLogStore {
    fn record(&self, deal_id: u64, entry: &LogEntry) {
        self.append(deal_id, entry);
    }
}

/// A snapshot of a peer's meter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeterSnapshot {
    /// Payload bytes from the peer to destinations.
    pub bytes_up: u64,
    /// Payload bytes from destinations to the peer.
    pub bytes_down: u64,
    /// Distinct seconds in which the peer moved data.
    pub seconds_active: u64,
    /// Connections relayed.
    pub flows: u64,
    /// Connections refused by the egress policy.
    pub refused: u64,
    /// Connections refused by the load limits (flow caps, flow rate).
    pub limited: u64,
    /// Relayed flows open now.
    pub flows_live: u64,
    /// Relayed flows reset for being idle longer than `limits.idle_timeout`.
    pub idle_closed: u64,
    /// Entries in the connection log (ever appended).
    pub log_entries: u64,
}

/// Live meter and log of one peer.
#[derive(Debug)]
pub struct PeerMeter {
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    seconds_active: AtomicU64,
    last_second: AtomicU64,
    pub(crate) flows: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) limited: AtomicU64,
    pub(crate) flows_live: AtomicU64,
    pub(crate) idle_closed: AtomicU64,
    log: Mutex<ConnLog>,
    deal: Mutex<Option<(u64, Arc<dyn LogSink>)>>,
}

#[derive(Debug)]
struct ConnLog {
    hash: [u8; 32],
    total: u64,
    entries: std::collections::VecDeque<LogEntry>,
}

impl PeerMeter {
    /// A fresh meter for the peer with this public key.
    pub fn new(peer_public_key: &[u8; 32]) -> Self {
        Self {
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            seconds_active: AtomicU64::new(0),
            last_second: AtomicU64::new(u64::MAX),
            flows: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            flows_live: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            log: Mutex::new(ConnLog {
                hash: genesis(peer_public_key),
                total: 0,
                entries: Default::default(),
            }),
            deal: Mutex::new(None),
        }
    }

    /// From now on the peer's finished connections also go to `deal_id`'s log (a
    /// requester key reused by a later deal is bound again to that deal).
    pub fn bind_deal(&self, deal_id: u64, sink: Arc<dyn LogSink>) {
        *self.deal.lock().unwrap_or_else(PoisonError::into_inner) = Some((deal_id, sink));
    }

    /// The deal the peer's connections are recorded for, if bound.
    pub fn bound_deal(&self) -> Option<u64> {
        self.deal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|(d, _)| *d)
    }

    /// Data moved during second number `second` (of any monotonic clock).
    pub fn touch(&self, second: u64) {
        if self.last_second.swap(second, Ordering::Relaxed) != second {
            self.seconds_active.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Appends a finished connection, advances the hash chain, and records it in the
    /// bound deal's log.
    pub fn append(&self, entry: LogEntry) {
        {
            let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
            log.hash = chain(&log.hash, &entry);
            log.total += 1;
            if log.entries.len() >= LOG_KEEP {
                log.entries.pop_front();
            }
            log.entries.push_back(entry);
        }
        let bound = self
            .deal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some((deal_id, sink)) = bound {
            sink.record(deal_id, &entry);
        }
    }

    /// The current head of the hash chain.
    pub fn log_hash(&self) -> [u8; 32] {
        self.log.lock().unwrap_or_else(PoisonError::into_inner).hash
    }

    /// The kept entries, oldest first.
    pub fn log(&self) -> Vec<LogEntry> {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.entries.iter().cloned().collect()
    }

    /// The counters now.
    pub fn snapshot(&self) -> MeterSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MeterSnapshot {
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
            seconds_active: g(&self.seconds_active),
            flows: g(&self.flows),
            refused: g(&self.refused),
            limited: g(&self.limited),
            flows_live: g(&self.flows_live),
            idle_closed: g(&self.idle_closed),
            log_entries: self
                .log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .total,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(i: u64) -> LogEntry {
        LogEntry {
            start_unix_ms: 1_700_000_000_000 + i,
            dst: "93.184.216.34:443".parse().unwrap(),
            bytes_up: i * 10,
            bytes_down: i * 100,
            duration_ms: 5,
        }
    }

    #[test]
    fn chain_is_recomputable_and_order_sensitive() {
        let key = [7u8; 32];
        let m = PeerMeter::new(&key);
        assert_eq!(m.log_hash(), genesis(&key));
        for i in 0..3 {
            m.append(entry(i));
        }
        let mut h = genesis(&key);
        for e in m.log() {
            h = chain(&h, &e);
        }
        assert_eq!(h, m.log_hash());
        let mut swapped = genesis(&key);
        for i in [1, 0, 2] {
            swapped = chain(&swapped, &entry(i));
        }
        assert_ne!(swapped, m.log_hash());
        assert_ne!(genesis(&[8u8; 32]), genesis(&key));
        assert_eq!(m.snapshot().log_entries, 3);
    }

    #[test]
    fn encoding_is_fixed() {
        let e = entry(1);
        let b = e.encode();
        assert_eq!(
            &b[8..24],
            &"::ffff:93.184.216.34"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(u16::from_be_bytes([b[24], b[25]]), 443);
        assert_eq!(b[50], 1);
    }

    #[test]
    fn seconds_active_counts_distinct_seconds() {
        let m = PeerMeter::new(&[0; 32]);
        for s in [0, 0, 0, 1, 1, 5, 5, 6] {
            m.touch(s);
        }
        assert_eq!(m.snapshot().seconds_active, 4);
    }

    #[test]
    fn log_keeps_a_bounded_window_but_hashes_everything() {
        let m = PeerMeter::new(&[1; 32]);
        for i in 0..(LOG_KEEP as u64 + 5) {
            m.append(entry(i));
        }
        assert_eq!(m.log().len(), LOG_KEEP);
        assert_eq!(m.snapshot().log_entries, LOG_KEEP as u64 + 5);
    }
}
