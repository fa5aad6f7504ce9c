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

/// Domain tag of a channel's commitment (what a claim or close carries as `logHash`).
pub const CHANNEL_TAG: &[u8] = b"ipsx-connlog-channel-v1";
/// Domain tag of a requester's request for a deal's log.
pub const REQUEST_TAG: &[u8] = b"ipsx-connlog-request-v1";
/// The path a provider agent serves a deal's log under: `GET {LOG_PATH}{deal_id}?...`.
pub const LOG_PATH: &str = "/api/connlog/";
/// Longest request target ([`parse_request`]) accepted, bytes.
pub const MAX_REQUEST_LEN: usize = 512;
/// Longest a request stays valid: its `expiry` is at most this far ahead, seconds.
pub const MAX_REQUEST_TTL_S: u64 = 600;
/// Most commitments of a channel a provider keeps and serves (newest last).
pub const MAX_COMMITS: usize = 8;

/// One deal's share of a channel commitment: the head of its chain over its first
/// `entries` records, and how many connections went unrecorded past the store's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitPart {
    /// The deal.
    pub deal_id: u64,
    /// Records the head covers.
    pub entries: u64,
    /// Connections past the caps, counted but not recorded.
    pub dropped: u64,
    /// The deal's chain head over its first `entries` records.
    pub head: B256,
}

/// What a provider put on chain for a channel at one claim: every deal the channel
/// paid for, in deal order, and the hash of them ([`channel_commitment`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelCommit {
    /// The channel.
    pub channel_id: B256,
    /// The channel's deals, ascending deal id.
    pub parts: Vec<CommitPart>,
    /// [`channel_commitment`] of `channel_id` and `parts`: the `logHash` sent.
    pub hash: B256,
}

/// The `logHash` a provider commits for a channel:
/// `SHA-256(CHANNEL_TAG || channel_id || for each part: deal_id || entries || dropped
/// (u64 BE each) || head)`, parts in ascending deal id.
pub fn channel_commitment(channel_id: &B256, parts: &[CommitPart]) -> B256 {
    let mut h = Sha256::new();
    h.update(CHANNEL_TAG);
    h.update(channel_id);
    for p in parts {
        h.update(p.deal_id.to_be_bytes());
        h.update(p.entries.to_be_bytes());
        h.update(p.dropped.to_be_bytes());
        h.update(p.head);
    }
    B256::from(<[u8; 32]>::from(h.finalize()))
}

/// What a provider agent answers a deal's requester: the signed log, the connections
/// past the caps, and the recent commitments of every channel that paid for the deal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogExport {
    /// The deal's records, signed.
    pub log: SignedLog,
    /// Connections past the caps, counted but not recorded.
    pub dropped: u64,
    /// Recent commitments (newest last) of the channels the deal was paid over.
    pub commits: Vec<ChannelCommit>,
}

/// Checks a channel's on-chain `logHash` against the requester's logs of that
/// channel's deals. `logs(deal_id)` gives the verified entries of one of the
/// requester's deals ([`verify_log`] first), `None` when it has none. Finds the
/// commitment the chain holds among `commits`, checks each part's head against the
/// prefix of that deal's entries, that `deal_id` is one of the parts, and recomputes the
/// hash. Errors name what disagrees (`logHash`, `parts`, `entries`).
pub fn verify_commitment<'a>(
    channel_id: &B256,
    on_chain: &B256,
    deal_id: u64,
    commits: &[ChannelCommit],
    logs: impl Fn(u64) -> Option<&'a [LogEntry]>,
) -> Result<(), ExchangeError> {
    let Some(c) = commits
        .iter()
        .rev()
        .find(|c| c.channel_id == *channel_id && c.hash == *on_chain)
    else {
        return Err(ExchangeError::invalid(
            "logHash",
            format!(
                "the chain holds {on_chain} for channel {channel_id}; none of the provider's {} commitments is that",
                commits.len()
            ),
        ));
    };
    if !c.parts.windows(2).all(|w| w[0].deal_id < w[1].deal_id) {
        return Err(ExchangeError::invalid(
            "parts",
            "not in ascending deal order",
        ));
    }
    if !c.parts.iter().any(|p| p.deal_id == deal_id) {
        return Err(ExchangeError::invalid(
            "parts",
            format!("deal {deal_id} is not in the commitment of channel {channel_id}"),
        ));
    }
    let recomputed = channel_commitment(channel_id, &c.parts);
    if recomputed != *on_chain {
        return Err(ExchangeError::invalid(
            "logHash",
            format!("the parts hash to {recomputed}, the chain holds {on_chain}"),
        ));
    }
    for p in &c.parts {
        let entries = logs(p.deal_id).ok_or_else(|| {
            ExchangeError::invalid(
                "parts",
                format!("no log of deal {} to check its part against", p.deal_id),
            )
        })?;
        let n = usize::try_from(p.entries).unwrap_or(usize::MAX);
        let Some(prefix) = entries.get(..n) else {
            return Err(ExchangeError::invalid(
                "entries",
                format!(
                    "deal {}: {} records committed, the log has {}",
                    p.deal_id,
                    p.entries,
                    entries.len()
                ),
            ));
        };
        let h = head(p.deal_id, prefix);
        if h != p.head {
            return Err(ExchangeError::invalid(
                "entries",
                format!(
                    "deal {}: its first {} records hash to {h}, the commitment says {}",
                    p.deal_id, p.entries, p.head
                ),
            ));
        }
    }
    Ok(())
}

/// A requester's request for a deal's log, as [`parse_request`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRequest {
    /// The deal.
    pub deal_id: u64,
    /// Valid until, unix seconds.
    pub expiry: u64,
    /// The requester wallet's signature of [`request_digest`], 0x-hex.
    pub signature: String,
}

/// What a requester signs to fetch a deal's log from `provider`:
/// `keccak256(REQUEST_TAG || provider || deal_id || expiry (u64 BE))`.
pub fn request_digest(provider: Address, deal_id: u64, expiry: u64) -> B256 {
    let mut buf = Vec::with_capacity(REQUEST_TAG.len() + 20 + 16);
    buf.extend_from_slice(REQUEST_TAG);
    buf.extend_from_slice(provider.as_slice());
    buf.extend_from_slice(&deal_id.to_be_bytes());
    buf.extend_from_slice(&expiry.to_be_bytes());
    keccak256(buf)
}

/// The request target (path and query) a requester sends the provider's agent:
/// `/api/connlog/{deal_id}?expiry={unix s}&signature=0x..`.
pub fn request_target(
    key: &PrivateKeySigner,
    provider: Address,
    deal_id: u64,
    expiry: u64,
) -> Result<String, ExchangeError> {
    let sig = sign::sign_hash(key, &request_digest(provider, deal_id, expiry))?;
    Ok(format!(
        "{LOG_PATH}{deal_id}?expiry={expiry}&signature={sig}"
    ))
}

/// Parses a request target (path and query). Bounded ([`MAX_REQUEST_LEN`]); errors
/// name the field (`path`, `deal_id`, `expiry`, `signature`, `query`).
pub fn parse_request(target: &str) -> Result<LogRequest, ExchangeError> {
    if target.len() > MAX_REQUEST_LEN {
        return Err(ExchangeError::invalid(
            "path",
            format!("longer than {MAX_REQUEST_LEN} bytes"),
        ));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let id = path
        .strip_prefix(LOG_PATH)
        .ok_or_else(|| ExchangeError::invalid("path", format!("not under {LOG_PATH}")))?;
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ExchangeError::invalid("deal_id", "not a decimal deal id"));
    }
    let deal_id = id
        .parse::<u64>()
        .map_err(|e| ExchangeError::invalid("deal_id", e.to_string()))?;
    let (mut expiry, mut signature) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "expiry" => &mut expiry,
            "signature" => &mut signature,
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(ExchangeError::invalid(
                    "query",
                    format!("unknown parameter `{shown}`"),
                ));
            }
        };
        if slot.replace(v).is_some() {
            return Err(ExchangeError::invalid(k, "given twice"));
        }
    }
    let expiry = expiry.ok_or_else(|| ExchangeError::invalid("expiry", "missing"))?;
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ExchangeError::invalid("expiry", "not decimal unix seconds"));
    }
    let expiry = expiry
        .parse::<u64>()
        .map_err(|e| ExchangeError::invalid("expiry", e.to_string()))?;
    let signature = signature.ok_or_else(|| ExchangeError::invalid("signature", "missing"))?;
    let hex = signature.strip_prefix("0x").unwrap_or(signature);
    if hex.len() != 130 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ExchangeError::invalid(
            "signature",
            "not 65 bytes of hex (r || s || v)",
        ));
    }
    Ok(LogRequest {
        deal_id,
        expiry,
        signature: signature.to_string(),
    })
}

/// Checks a request's time window and recovers who signed it (the agent then
/// compares with the deal's requester). Errors name the field.
pub fn request_signer(
    req: &LogRequest,
    provider: Address,
    now_s: u64,
) -> Result<Address, ExchangeError> {
    if req.expiry < now_s {
        return Err(ExchangeError::invalid("expiry", "in the past"));
    }
    if req.expiry > now_s.saturating_add(MAX_REQUEST_TTL_S) {
        return Err(ExchangeError::invalid(
            "expiry",
            format!("more than {MAX_REQUEST_TTL_S} s ahead"),
        ));
    }
    sign::recover(
        &request_digest(provider, req.deal_id, req.expiry),
        &req.signature,
        false,
    )
}

/// Largest answer [`fetch_log`] reads, bytes (a full deal of 20,000 records is about
/// 4 MB of JSON).
pub const MAX_EXPORT_BYTES: usize = 16 << 20;

/// Fetches a deal's log from the provider agent listening at `base`
/// (`http://host:port`), with a request signed by `key` (the deal's requester) valid
/// for a minute after `now_s`. Answers over [`MAX_EXPORT_BYTES`] are refused; the
/// signature and chain are not checked here ([`verify_log`], [`verify_commitment`]).
pub async fn fetch_log(
    http: &reqwest::Client,
    base: &str,
    key: &PrivateKeySigner,
    provider: Address,
    deal_id: u64,
    now_s: u64,
) -> Result<LogExport, ExchangeError> {
    let target = request_target(key, provider, deal_id, now_s.saturating_add(60))?;
    let url = format!("{}{target}", base.trim_end_matches('/'));
    let shown = format!("{}{LOG_PATH}{deal_id}", base.trim_end_matches('/'));
    let mut resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| ExchangeError::Transport(format!("{shown}: {e}")))?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ExchangeError::Transport(format!("{shown}: {e}")))?
    {
        if body.len() + chunk.len() > MAX_EXPORT_BYTES {
            return Err(ExchangeError::Transport(format!(
                "{shown}: answer over {MAX_EXPORT_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if status != 200 {
        let msg = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        return Err(ExchangeError::Remote {
            status,
            code: "connlog".into(),
            field: None,
            message: format!("{shown}: {msg}"),
        });
    }
    serde_json::from_slice(&body).map_err(|e| ExchangeError::BadJson {
        path: ".".into(),
        reason: format!("{shown}: {e}"),
    })
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

    #[test]
    fn a_channel_commitment_is_recomputed_from_the_deals_logs() {
        let ch = B256::repeat_byte(9);
        let a: Vec<_> = (0..5).map(entry).collect();
        let b: Vec<_> = (10..12).map(entry).collect();
        // Deal 3 was committed over its first 4 records (one more finished later).
        let parts = vec![
            CommitPart {
                deal_id: 3,
                entries: 4,
                dropped: 0,
                head: head(3, &a[..4]),
            },
            CommitPart {
                deal_id: 5,
                entries: 2,
                dropped: 1,
                head: head(5, &b),
            },
        ];
        let hash = channel_commitment(&ch, &parts);
        let commits = vec![ChannelCommit {
            channel_id: ch,
            parts: parts.clone(),
            hash,
        }];
        let check = |deal: u64, on_chain: B256, a: &[LogEntry], b: &[LogEntry]| {
            verify_commitment(&ch, &on_chain, deal, &commits, |d| match d {
                3 => Some(a),
                5 => Some(b),
                _ => None,
            })
            .map_err(|e| e.to_string())
        };
        assert_eq!(check(3, hash, &a, &b), Ok(()));
        assert_eq!(check(5, hash, &a, &b), Ok(()));
        assert!(check(4, hash, &a, &b).unwrap_err().contains("parts"));
        assert!(
            check(3, B256::ZERO, &a, &b)
                .unwrap_err()
                .contains("logHash")
        );
        // A record dropped from deal 3's log, or one edited: its prefix no longer hashes.
        let mut dropped = a.clone();
        dropped.remove(1);
        assert!(
            check(3, hash, &dropped, &b)
                .unwrap_err()
                .contains("entries")
        );
        let mut edited = b.clone();
        edited[0].bytes_up += 1;
        assert!(check(3, hash, &a, &edited).unwrap_err().contains("entries"));
        assert!(check(3, hash, &a[..3], &b).unwrap_err().contains("entries"));
        // The hash binds the channel and every field of every part.
        assert_ne!(channel_commitment(&B256::ZERO, &parts), hash);
        let mut p2 = parts.clone();
        p2[1].dropped = 0;
        assert_ne!(channel_commitment(&ch, &p2), hash);
    }

    #[test]
    fn a_signed_request_round_trips_and_bad_ones_name_the_field() {
        let key = PrivateKeySigner::random();
        let provider = Address::repeat_byte(7);
        let t = request_target(&key, provider, 42, 1_000).unwrap();
        let r = parse_request(&t).unwrap();
        assert_eq!((r.deal_id, r.expiry), (42, 1_000));
        assert_eq!(request_signer(&r, provider, 900).unwrap(), key.address());
        assert_ne!(
            request_signer(&r, Address::repeat_byte(8), 900).unwrap(),
            key.address(),
            "bound to the provider"
        );
        let field = |t: &str| match parse_request(t).unwrap_err() {
            ExchangeError::Invalid { field, .. } => field,
            e => panic!("{e}"),
        };
        assert!(
            request_signer(&r, provider, 1_001)
                .unwrap_err()
                .to_string()
                .contains("expiry")
        );
        assert!(
            request_signer(&r, provider, 100)
                .unwrap_err()
                .to_string()
                .contains("expiry")
        );
        assert_eq!(field("/api/status"), "path");
        assert_eq!(field("/api/connlog/"), "deal_id");
        assert_eq!(field("/api/connlog/-1?expiry=1"), "deal_id");
        assert_eq!(field("/api/connlog/99999999999999999999"), "deal_id");
        assert_eq!(field("/api/connlog/1"), "expiry");
        assert_eq!(field("/api/connlog/1?expiry=x&signature=0x"), "expiry");
        assert_eq!(field("/api/connlog/1?expiry=1"), "signature");
        assert_eq!(field("/api/connlog/1?expiry=1&signature=0x12"), "signature");
        assert_eq!(field("/api/connlog/1?expiry=1&expiry=2"), "expiry");
        assert_eq!(field("/api/connlog/1?expiry=1&who=me"), "query");
        assert_eq!(
            field(&format!("/api/connlog/1?expiry={}", "1".repeat(600))),
            "path"
        );
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
        fn arbitrary_request_targets_never_panic_the_parser(t in "(/api/connlog/)?[0-9a-z?&=x/-]{0,200}") {
            if let Ok(r) = parse_request(&t) {
                prop_assert!(t.len() <= MAX_REQUEST_LEN);
                prop_assert!(t.contains(&r.deal_id.to_string()));
            }
        }

        #[test]
        fn signed_requests_parse_back(deal in any::<u64>(), expiry in any::<u64>()) {
            let key = PrivateKeySigner::from_bytes(&B256::repeat_byte(3)).unwrap();
            let t = request_target(&key, Address::ZERO, deal, expiry).unwrap();
            let r = parse_request(&t).unwrap();
            prop_assert_eq!((r.deal_id, r.expiry), (deal, expiry));
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
