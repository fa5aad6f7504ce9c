//! A deal's connection log as its requester checks it, sans-IO: the entry encoding, the
//! per-deal hash chain whose head the provider commits on chain (`logHash` of the
//! Centralizer's `claim` / `cooperativeClose`), the on-disk record format, and the
//! provider-signed export a requester recomputes at settlement.
//!
//! The chain is per deal, not per WireGuard key:
//! `h0 = SHA-256("ipsx-connlog-v2" || deal_id (u64 BE))`,
//! `h(n) = SHA-256(h(n-1) || entry(n))`, with `entry` the fixed 51-byte encoding of
//! [`LogEntry::encode`]. On disk a log is those records back to back (no header), so an
//! append is one write and a torn last record is detected by its length.
//!
//! The export ([`SignedLog`]) carries the entries, the head and the provider wallet's
//! signature of [`log_digest`]; [`verify_log`] recomputes the head from the entries,
//! checks the signer, and compares with the hash committed on chain when there is one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use alloy_primitives::{Address, B256, keccak256};
use alloy_signer_local::PrivateKeySigner;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ExchangeError;
use crate::sign;

/// Domain tag of the per-deal chain and of the export's signature.
pub const LOG_TAG: &[u8] = b"ipsx-connlog-v2";
/// Bytes of one encoded entry (and of one record on disk).
pub const ENTRY_LEN: usize = 51;
/// Version byte closing every encoded entry.
pub const ENTRY_VERSION: u8 = 1;

/// One relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// Start, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    /// The destination dialled.
    pub dst: SocketAddr,
    /// Bytes from the peer to the destination.
    pub bytes_up: u64,
    /// Bytes from the destination to the peer.
    pub bytes_down: u64,
    /// How long it lasted, milliseconds.
    pub duration_ms: u64,
}

impl LogEntry {
    /// The canonical encoding hashed into the chain: start (u64 BE), destination
    /// address as 16 bytes (IPv4 mapped into IPv6), port (u16 BE), bytes up, bytes
    /// down, duration (u64 BE each), then the version byte (1).
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[0..8].copy_from_slice(&self.start_unix_ms.to_be_bytes());
        let ip16 = match self.dst.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        out[8..24].copy_from_slice(&ip16);
        out[24..26].copy_from_slice(&self.dst.port().to_be_bytes());
        out[26..34].copy_from_slice(&self.bytes_up.to_be_bytes());
        out[34..42].copy_from_slice(&self.bytes_down.to_be_bytes());
        out[42..50].copy_from_slice(&self.duration_ms.to_be_bytes());
        out[50] = ENTRY_VERSION;
        out
    }

    /// Decodes one record; IPv4-mapped addresses come back as IPv4 (what `encode` wrote
    /// for them). Errors name the field.
    pub fn decode(rec: &[u8; ENTRY_LEN]) -> Result<Self, ExchangeError> {
        if rec[50] != ENTRY_VERSION {
            return Err(ExchangeError::invalid(
                "version",
                format!("record version {} (expected {ENTRY_VERSION})", rec[50]),
            ));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rec[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let mut ip16 = [0u8; 16];
        ip16.copy_from_slice(&rec[8..24]);
        let v6 = Ipv6Addr::from(ip16);
        let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        let port = u16::from_be_bytes([rec[24], rec[25]]);
        Ok(Self {
            start_unix_ms: u64_at(0),
            dst: SocketAddr::new(ip, port),
            bytes_up: u64_at(26),
            bytes_down: u64_at(34),
            duration_ms: u64_at(42),
        })
    }
}

/// The first link of a deal's chain.
pub fn genesis(deal_id: u64) -> B256 {
    let mut h = Sha256::new();
    h.update(LOG_TAG);
    h.update(deal_id.to_be_bytes());
    B256::from(<[u8; 32]>::from(h.finalize()))
}

/// The next link.
pub fn chain(prev: &B256, entry: &LogEntry) -> B256 {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(entry.encode());
    B256::from(<[u8; 32]>::from(h.finalize()))
}

/// The head of a deal's chain over `entries` (the genesis when there are none).
pub fn head<'a>(deal_id: u64, entries: impl IntoIterator<Item = &'a LogEntry>) -> B256 {
    entries
        .into_iter()
        .fold(genesis(deal_id), |h, e| chain(&h, e))
}

/// Parses a log file (records back to back). A length that is not a whole number of
/// records (a torn last write) or a bad record is an error naming its byte offset.
pub fn parse_records(bytes: &[u8]) -> Result<Vec<LogEntry>, ExchangeError> {
    let chunks = bytes.chunks_exact(ENTRY_LEN);
    if !chunks.remainder().is_empty() {
        return Err(ExchangeError::invalid(
            "connection log",
            format!(
                "{} bytes at offset {} are not a whole {ENTRY_LEN}-byte record",
                chunks.remainder().len(),
                bytes.len() - chunks.remainder().len()
            ),
        ));
    }
    chunks
        .enumerate()
        .map(|(i, c)| {
            let rec: &[u8; ENTRY_LEN] = c
                .try_into()
                .map_err(|_| ExchangeError::invalid("connection log", "short record"))?;
            LogEntry::decode(rec).map_err(|e| {
                ExchangeError::invalid(
                    "connection log",
                    format!("record at offset {}: {e}", i * ENTRY_LEN),
                )
            })
        })
        .collect()
}

/// What the provider signs for an export: `keccak256(tag || deal_id (u64 BE) || head)`.
pub fn log_digest(deal_id: u64, head: &B256) -> B256 {
    let mut buf = Vec::with_capacity(LOG_TAG.len() + 8 + 32);
    buf.extend_from_slice(LOG_TAG);
    buf.extend_from_slice(&deal_id.to_be_bytes());
    buf.extend_from_slice(head.as_slice());
    keccak256(buf)
}

/// A deal's connection log as the provider serves it to the deal's requester.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedLog {
    /// The deal.
    pub deal_id: u64,
    /// Every connection of the deal, in order.
    pub entries: Vec<LogEntry>,
    /// The chain's head over `entries` (what the provider commits on chain).
    pub head: B256,
    /// The provider wallet's signature of [`log_digest`], 0x-hex `r || s || v`.
    pub signature: String,
}

/// Signs a deal's log with the provider's wallet key.
pub fn sign_log(
    key: &PrivateKeySigner,
    deal_id: u64,
    entries: Vec<LogEntry>,
) -> Result<SignedLog, ExchangeError> {
    let head = head(deal_id, &entries);
    let signature = sign::sign_hash(key, &log_digest(deal_id, &head))?;
    Ok(SignedLog {
        deal_id,
        entries,
        head,
        signature,
    })
}

/// Checks an export against what the requester knows: the deal, the provider's wallet
/// and, once settled, the `logHash` committed on chain. Returns the recomputed head.
/// Errors name what disagrees (`entries`, `signature`, `deal_id`, `logHash`).
pub fn verify_log(
    log: &SignedLog,
    deal_id: u64,
    provider: Address,
    committed: Option<B256>,
) -> Result<B256, ExchangeError> {
    if log.deal_id != deal_id {
        return Err(ExchangeError::invalid(
            "deal_id",
            format!("the log is for deal {}, not {deal_id}", log.deal_id),
        ));
    }
    let recomputed = head(deal_id, &log.entries);
    if recomputed != log.head {
        return Err(ExchangeError::invalid(
            "entries",
            format!(
                "the entries hash to {recomputed}, but the log says {}",
                log.head
            ),
        ));
    }
    let signer = sign::recover(&log_digest(deal_id, &recomputed), &log.signature, false)?;
    if signer != provider {
        return Err(ExchangeError::BadSignature {
            reason: format!("log signed by {signer}, but the deal's provider is {provider}"),
        });
    }
    if let Some(c) = committed
        && c != recomputed
    {
        return Err(ExchangeError::invalid(
            "logHash",
            format!("the chain holds {c}, the provider's log hashes to {recomputed}"),
        ));
    }
    Ok(recomputed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(i: u64) -> LogEntry {
        LogEntry {
            start_unix_ms: 1_700_000_000_000 + i,
            dst: if i.is_multiple_of(2) {
                "93.184.216.34:443".parse().unwrap()
            } else {
                "[2606:2800:220:1::1]:80".parse().unwrap()
            },
            bytes_up: i * 10,
            bytes_down: i * 100,
            duration_ms: 5 + i,
        }
    }

    #[test]
    fn the_requester_recomputes_the_committed_hash_and_catches_tampering() {
        let key = PrivateKeySigner::random();
        let entries: Vec<_> = (0..5).map(entry).collect();
        let log = sign_log(&key, 7, entries.clone()).unwrap();
        let committed = head(7, &entries);
        assert_eq!(
            verify_log(&log, 7, key.address(), Some(committed)).unwrap(),
            committed
        );
        assert_ne!(committed, genesis(7));
        assert_ne!(head(8, &entries), committed, "the chain is per deal");

        let err = |l: &SignedLog, c: Option<B256>| {
            verify_log(l, 7, key.address(), c).unwrap_err().to_string()
        };
        let mut edited = log.clone();
        edited.entries[2].bytes_down += 1;
        assert!(err(&edited, None).contains("entries"));
        let mut dropped = log.clone();
        dropped.entries.remove(1);
        assert!(err(&dropped, None).contains("entries"));
        let mut swapped = log.clone();
        swapped.entries.swap(0, 1);
        assert!(err(&swapped, None).contains("entries"));
        // A consistent rewrite signed by someone else.
        let forged = sign_log(&PrivateKeySigner::random(), 7, entries[..3].to_vec()).unwrap();
        assert!(err(&forged, None).contains("signed by"));
        // The provider's own rewrite: signed, but not what it committed on chain.
        let rewritten = sign_log(&key, 7, entries[..3].to_vec()).unwrap();
        assert!(verify_log(&rewritten, 7, key.address(), None).is_ok());
        assert!(err(&rewritten, Some(committed)).contains("logHash"));
        assert!(
            verify_log(&log, 8, key.address(), None)
                .unwrap_err()
                .to_string()
                .contains("deal_id")
        );
    }

    #[test]
    fn records_on_disk_round_trip_and_a_torn_record_is_reported() {
        let entries: Vec<_> = (0..4).map(entry).collect();
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
        assert_eq!(parse_records(&bytes).unwrap(), entries);
        let e = parse_records(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(e.to_string().contains("offset 153"), "{e}");
        let mut bad = bytes.clone();
        bad[ENTRY_LEN + 50] = 9;
        let e = parse_records(&bad).unwrap_err();
        assert!(e.to_string().contains("offset 51"), "{e}");
    }

    fn any_entry() -> impl Strategy<Value = LogEntry> {
        (
            any::<u64>(),
            prop_oneof![
                any::<[u8; 4]>().prop_map(IpAddr::from),
                any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            ],
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(s, ip, port, up, down, d)| LogEntry {
                start_unix_ms: s,
                dst: SocketAddr::new(ip, port),
                bytes_up: up,
                bytes_down: down,
                duration_ms: d,
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_records(&bytes);
        }

        #[test]
        fn entries_round_trip_through_the_record_format(entries in proptest::collection::vec(any_entry(), 0..20)) {
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.encode()).collect();
            let back = parse_records(&bytes).unwrap();
            // Same hash chain (IPv4-mapped IPv6 comes back as IPv4, which encodes alike).
            prop_assert_eq!(head(1, &back), head(1, &entries));
            for (a, b) in back.iter().zip(&entries) {
                prop_assert_eq!(a.encode(), b.encode());
            }
        }
    }
}
