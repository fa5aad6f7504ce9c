//! Each deal's connection log on disk, and the commitments a claim puts on chain.
//!
//! [`LogBook`] is the sans-IO core: per deal its chain head, record count and the
//! connections past the caps; per channel the deals it paid for and the recent
//! commitments ([`ChannelCommit`]) sent as `logHash`. [`ConnLogStore`] is the thin
//! file layer: one append-only file of 51-byte records per deal
//! (`<deal_id>-<requester>-<start>.log`, so a file left by another exchange's deal of
//! the same id is never resumed), one JSON file per channel (`channels/<id>.json`,
//! written whole then renamed), both under the agent's `connlog.dir`. At start the
//! store reads them back (a torn last record is cut off) and the chains resume.
//!
//! Bounds: at most `max_records_per_deal` records per deal and `max_bytes` over all
//! files; a connection past either cap is counted (`dropped`, committed on chain
//! with the head) but not recorded, so growth stops and the requester sees how many
//! went unrecorded.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use alloy_primitives::{Address, B256};
use alloy_signer_local::PrivateKeySigner;
use ipsx_exchange_client::connlog::{
    self, ChannelCommit, CommitPart, ENTRY_LEN, LogEntry, LogExport, MAX_COMMITS,
};
use serde::{Deserialize, Serialize};

/// The store's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Records kept per deal.
    pub max_records_per_deal: u64,
    /// Bytes of records over all deals.
    pub max_bytes: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_records_per_deal: 20_000,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DealLog {
    requester: Address,
    start: u64,
    head: B256,
    entries: u64,
    dropped: u64,
}

/// A channel's deals and recent commitments, as kept on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRecord {
    /// The deals it paid for.
    pub deals: BTreeSet<u64>,
    /// Recent commitments, newest last (at most [`MAX_COMMITS`]).
    pub commits: VecDeque<ChannelCommit>,
}

/// What [`LogBook::append`] asks of the file layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Append this record to the deal's file.
    Record([u8; ENTRY_LEN]),
    /// Past a cap: counted, nothing to write.
    Dropped,
    /// No such deal open: nothing recorded.
    Unknown,
}

/// What [`LogBook::open_deal`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Already open with these terms: the chain goes on.
    Resumed,
    /// New.
    Fresh,
    /// The id was open for another requester or start (another exchange's deal):
    /// the old file is to be removed.
    Replaced {
        /// The old file's requester.
        requester: Address,
        /// The old file's start.
        start: u64,
        /// Its records.
        entries: u64,
    },
}

/// The sans-IO core of the store.
#[derive(Debug, Clone, Default)]
pub struct LogBook {
    limits: StoreLimits,
    deals: BTreeMap<u64, DealLog>,
    channels: BTreeMap<B256, ChannelRecord>,
    bytes: u64,
}

impl LogBook {
    /// An empty book.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Opens (or resumes) a deal's log.
    pub fn open_deal(&mut self, deal_id: u64, requester: Address, start: u64) -> Opened {
        match self.deals.get(&deal_id) {
            Some(d) if d.requester == requester && d.start == start => return Opened::Resumed,
            _ => {}
        }
        let fresh = DealLog {
            requester,
            start,
            head: connlog::genesis(deal_id),
            entries: 0,
            dropped: 0,
        };
        match self.deals.insert(deal_id, fresh) {
            None => Opened::Fresh,
            Some(old) => {
                self.bytes = self.bytes.saturating_sub(old.entries * ENTRY_LEN as u64);
                Opened::Replaced {
                    requester: old.requester,
                    start: old.start,
                    entries: old.entries,
                }
            }
        }
    }

    /// Resumes a deal from its file's bytes; returns how many bytes are whole, valid
    /// records (the file is to be cut to that length). Only the newest start of an id
    /// is kept (an older one is ignored: returns `None`).
    pub fn resume(
        &mut self,
        deal_id: u64,
        requester: Address,
        start: u64,
        bytes: &[u8],
    ) -> Option<usize> {
        if self.deals.get(&deal_id).is_some_and(|d| d.start >= start) {
            return None;
        }
        self.open_deal(deal_id, requester, start);
        let mut valid = 0;
        for rec in bytes.chunks_exact(ENTRY_LEN) {
            let Ok(rec) = <&[u8; ENTRY_LEN]>::try_from(rec) else {
                break;
            };
            let Ok(e) = LogEntry::decode(rec) else {
                break;
            };
            let d = self.deals.get_mut(&deal_id)?;
            d.head = connlog::chain(&d.head, &e);
            d.entries += 1;
            valid += ENTRY_LEN;
        }
        self.bytes = self.bytes.saturating_add(valid as u64);
        Some(valid)
    }

    /// Restores a channel's record from disk.
    pub fn resume_channel(&mut self, channel_id: B256, record: ChannelRecord) {
        self.channels.insert(channel_id, record);
    }

    /// A finished connection of `deal_id`: chains it and asks for the write, or counts
    /// it past a cap.
    pub fn append(&mut self, deal_id: u64, entry: &LogEntry) -> Appended {
        let Some(d) = self.deals.get_mut(&deal_id) else {
            return Appended::Unknown;
        };
        if d.entries >= self.limits.max_records_per_deal
            || self.bytes.saturating_add(ENTRY_LEN as u64) > self.limits.max_bytes
        {
            d.dropped = d.dropped.saturating_add(1);
            return Appended::Dropped;
        }
        d.head = connlog::chain(&d.head, entry);
        d.entries += 1;
        self.bytes += ENTRY_LEN as u64;
        Appended::Record(entry.encode())
    }

    /// The channel paid for the deal (a proof over it was verified); true when new.
    pub fn bind_channel(&mut self, channel_id: B256, deal_id: u64) -> bool {
        self.channels
            .entry(channel_id)
            .or_default()
            .deals
            .insert(deal_id)
    }

    /// The commitment for a claim on `channel_id` now (recorded, newest last); the
    /// `deal_id` claiming is bound to it if it was not.
    pub fn commit(&mut self, channel_id: B256, deal_id: u64) -> ChannelCommit {
        let deals = &self.deals;
        let rec = self.channels.entry(channel_id).or_default();
        rec.deals.insert(deal_id);
        let parts: Vec<CommitPart> = rec
            .deals
            .iter()
            .map(|&id| match deals.get(&id) {
                Some(d) => CommitPart {
                    deal_id: id,
                    entries: d.entries,
                    dropped: d.dropped,
                    head: d.head,
                },
                None => CommitPart {
                    deal_id: id,
                    entries: 0,
                    dropped: 0,
                    head: connlog::genesis(id),
                },
            })
            .collect();
        let c = ChannelCommit {
            channel_id,
            hash: connlog::channel_commitment(&channel_id, &parts),
            parts,
        };
        if rec.commits.back() != Some(&c) {
            while rec.commits.len() >= MAX_COMMITS {
                rec.commits.pop_front();
            }
            rec.commits.push_back(c.clone());
        }
        c
    }

    /// A channel's record (to write to disk).
    pub fn channel(&self, channel_id: &B256) -> Option<&ChannelRecord> {
        self.channels.get(channel_id)
    }

    /// The deal's requester, start, records and dropped count.
    pub fn deal(&self, deal_id: u64) -> Option<(Address, u64, u64, u64)> {
        self.deals
            .get(&deal_id)
            .map(|d| (d.requester, d.start, d.entries, d.dropped))
    }

    /// The deal's chain head now.
    pub fn head(&self, deal_id: u64) -> Option<B256> {
        self.deals.get(&deal_id).map(|d| d.head)
    }

    /// The recent commitments of every channel that paid for the deal.
    pub fn commits_for(&self, deal_id: u64) -> Vec<ChannelCommit> {
        self.channels
            .values()
            .filter(|c| c.deals.contains(&deal_id))
            .flat_map(|c| c.commits.iter().cloned())
            .collect()
    }

    /// Bytes of records held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Why the store could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeError {
    /// The request is malformed (names the field): 400.
    Bad(String),
    /// Not signed by the deal's requester: 403.
    Forbidden(String),
    /// No log for that deal: 404.
    NotFound(String),
    /// The file could not be read: 500.
    Io(String),
}

/// The deals' logs under one directory: [`LogBook`] plus the files.
#[derive(Debug)]
pub struct ConnLogStore {
    dir: PathBuf,
    book: Mutex<LogBook>,
}

fn deal_file(dir: &Path, deal_id: u64, requester: Address, start: u64) -> PathBuf {
    dir.join(format!("{deal_id}-{requester:#x}-{start}.log"))
}

fn channel_file(dir: &Path, channel_id: &B256) -> PathBuf {
    dir.join("channels").join(format!("{channel_id:#x}.json"))
}

/// `<deal_id>-<0xrequester>-<start>.log` back to its parts.
fn parse_deal_file(name: &str) -> Option<(u64, Address, u64)> {
    let stem = name.strip_suffix(".log")?;
    let mut it = stem.splitn(3, '-');
    let deal = it.next()?.parse().ok()?;
    let requester = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    Some((deal, requester, start))
}

/// The deal log files in `dir`: deal id, requester, start and path, oldest start first.
pub fn deal_files(dir: &Path) -> std::io::Result<Vec<(u64, Address, u64, PathBuf)>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some((d, r, s)) = e.file_name().to_str().and_then(parse_deal_file) {
            found.push((d, r, s, e.path()));
        }
    }
    found.sort_by_key(|f| f.2);
    Ok(found)
}

/// The file of deal `deal_id` in a store's `dir` (the newest, if several), read from
/// the outside (no store open).
pub fn find_deal_file(dir: &Path, deal_id: u64) -> Option<PathBuf> {
    deal_files(dir)
        .ok()?
        .into_iter()
        .rev()
        .find(|f| f.0 == deal_id)
        .map(|f| f.3)
}

impl ConnLogStore {
    /// Opens `dir` (created if missing) and resumes every deal's chain and every
    /// channel's commitments from it. A torn last record is cut off.
    pub fn open(dir: &Path, limits: StoreLimits) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("channels"))?;
        let mut book = LogBook::new(limits);
        // Oldest start first, so the newest of an id wins.
        for (deal, requester, start, path) in deal_files(dir)? {
            let bytes = std::fs::read(&path)?;
            if let Some(valid) = book.resume(deal, requester, start, &bytes)
                && valid < bytes.len()
            {
                tracing::warn!(deal, path = %path.display(), valid, len = bytes.len(), "connection log: cutting a torn or bad tail");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(valid as u64)?;
            }
        }
        for e in std::fs::read_dir(dir.join("channels"))? {
            let e = e?;
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<B256>().ok())
            else {
                continue;
            };
            match std::fs::read(e.path())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(rec) => book.resume_channel(id, rec),
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "connection log: unreadable channel record skipped")
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            book: Mutex::new(book),
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, LogBook> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of a deal's file, if the deal is open.
    pub fn deal_path(&self, deal_id: u64) -> Option<PathBuf> {
        let (r, s, _, _) = self.book().deal(deal_id)?;
        Some(deal_file(&self.dir, deal_id, r, s))
    }

    /// Opens (or resumes) a deal's log: called when its peer is added.
    pub fn open_deal(&self, deal_id: u64, requester: Address, start: u64) {
        let opened = self.book().open_deal(deal_id, requester, start);
        if let Opened::Replaced {
            requester, start, ..
        } = opened
        {
            let _ = std::fs::remove_file(deal_file(&self.dir, deal_id, requester, start));
        }
    }

    /// Records a finished connection of the deal (one append of 51 bytes).
    pub fn append(&self, deal_id: u64, entry: &LogEntry) {
        let mut book = self.book();
        let Appended::Record(rec) = book.append(deal_id, entry) else {
            return;
        };
        let Some((r, s, _, _)) = book.deal(deal_id) else {
            return;
        };
        let path = deal_file(&self.dir, deal_id, r, s);
        // Written under the lock, so records land in chain order.
        let w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&rec));
        if let Err(e) = w {
            tracing::error!(deal = deal_id, path = %path.display(), error = %e, "connection log: record not written");
        }
    }

    /// The channel paid for the deal; persisted when new.
    pub fn bind_channel(&self, channel_id: B256, deal_id: u64) {
        let mut book = self.book();
        if book.bind_channel(channel_id, deal_id) {
            self.write_channel(&book, &channel_id);
        }
    }

    /// The `logHash` for a claim on `channel_id` by `deal_id` now; the commitment is
    /// written to disk before it is returned (so it can be served once on chain).
    pub fn commit(&self, channel_id: B256, deal_id: u64) -> B256 {
        let mut book = self.book();
        let c = book.commit(channel_id, deal_id);
        self.write_channel(&book, &channel_id);
        c.hash
    }

    fn write_channel(&self, book: &LogBook, channel_id: &B256) {
        let Some(rec) = book.channel(channel_id) else {
            return;
        };
        let path = channel_file(&self.dir, channel_id);
        let tmp = path.with_extension("json.tmp");
        let r = serde_json::to_vec(rec)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            tracing::error!(channel = %channel_id, path = %path.display(), error = %e, "connection log: channel record not written");
        }
    }

    /// Answers a requester's request target (`GET /api/connlog/..`): checks the
    /// signature against the deal's requester, reads the deal's file and signs it
    /// with the provider's wallet.
    pub fn serve(
        &self,
        target: &str,
        key: &PrivateKeySigner,
        now_s: u64,
    ) -> Result<LogExport, ServeError> {
        let req = connlog::parse_request(target).map_err(|e| ServeError::Bad(e.to_string()))?;
        let signer = connlog::request_signer(&req, key.address(), now_s)
            .map_err(|e| ServeError::Bad(e.to_string()))?;
        let (deal_path, requester, dropped, commits) = {
            let book = self.book();
            let Some((r, s, _, dropped)) = book.deal(req.deal_id) else {
                return Err(ServeError::NotFound(format!(
                    "deal_id: no connection log of deal {}",
                    req.deal_id
                )));
            };
            (
                deal_file(&self.dir, req.deal_id, r, s),
                r,
                dropped,
                book.commits_for(req.deal_id),
            )
        };
        if signer != requester {
            return Err(ServeError::Forbidden(format!(
                "signature: signed by {signer}, not the deal's requester"
            )));
        }
        let bytes = match std::fs::read(&deal_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ServeError::Io(format!("{}: {e}", deal_path.display()))),
        };
        let entries = connlog::parse_records(&bytes).map_err(|e| ServeError::Io(e.to_string()))?;
        let log = connlog::sign_log(key, req.deal_id, entries)
            .map_err(|e| ServeError::Io(e.to_string()))?;
        Ok(LogExport {
            log,
            dropped,
            commits,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(i: u64) -> LogEntry {
        LogEntry {
            start_unix_ms: 1_700_000_000_000 + i,
            dst: "93.184.216.34:443".parse().unwrap(),
            bytes_up: i,
            bytes_down: 2 * i,
            duration_ms: 3,
        }
    }

    const REQ: Address = Address::repeat_byte(0x11);

    #[test]
    fn a_deal_chain_is_per_deal_and_caps_count_what_they_drop() {
        let mut b = LogBook::new(StoreLimits {
            max_records_per_deal: 3,
            max_bytes: 5 * ENTRY_LEN as u64,
        });
        assert_eq!(b.append(1, &entry(0)), Appended::Unknown);
        assert_eq!(b.open_deal(1, REQ, 100), Opened::Fresh);
        assert_eq!(b.open_deal(2, REQ, 100), Opened::Fresh);
        for i in 0..4 {
            let a = b.append(1, &entry(i));
            assert_eq!(matches!(a, Appended::Record(_)), i < 3, "{i}: {a:?}");
        }
        assert_eq!(b.deal(1).map(|d| (d.2, d.3)), Some((3, 1)));
        assert_eq!(
            b.head(1).unwrap(),
            connlog::head(1, &[entry(0), entry(1), entry(2)])
        );
        // The byte cap over all deals: deal 2 gets two records, then drops.
        for i in 0..3 {
            b.append(2, &entry(i));
        }
        assert_eq!(b.deal(2).map(|d| (d.2, d.3)), Some((2, 1)));
        assert_eq!(b.bytes(), 5 * ENTRY_LEN as u64);
        // Same id, other terms (another exchange's deal 1): a fresh chain.
        assert!(matches!(
            b.open_deal(1, REQ, 200),
            Opened::Replaced { entries: 3, .. }
        ));
        assert_eq!(b.head(1).unwrap(), connlog::genesis(1));
        assert_eq!(b.open_deal(1, REQ, 200), Opened::Resumed);
    }

    #[test]
    fn a_channel_commitment_covers_every_deal_it_paid_for() {
        let mut b = LogBook::new(StoreLimits::default());
        let ch = B256::repeat_byte(1);
        b.open_deal(1, REQ, 1);
        b.open_deal(2, REQ, 2);
        b.append(1, &entry(1));
        b.append(2, &entry(2));
        b.bind_channel(ch, 1);
        let c = b.commit(ch, 2);
        assert_eq!(
            c.parts.iter().map(|p| p.deal_id).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(c.hash, connlog::channel_commitment(&ch, &c.parts));
        assert_eq!(c.parts[0].head, connlog::head(1, &[entry(1)]));
        // Committed again with nothing new: not recorded twice; bounded history.
        b.commit(ch, 2);
        assert_eq!(b.commits_for(1).len(), 1);
        for i in 0..20 {
            b.append(2, &entry(i));
            b.commit(ch, 2);
        }
        assert_eq!(b.commits_for(2).len(), MAX_COMMITS);
        assert!(b.commits_for(3).is_empty());
        let all: Vec<_> = (0..21)
            .map(|i| if i == 0 { entry(2) } else { entry(i - 1) })
            .collect();
        assert_eq!(
            b.commits_for(2).last().unwrap().parts[1].head,
            connlog::head(2, &all)
        );
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ipsx-connlog-test-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn the_store_resumes_from_disk_cuts_a_torn_record_and_serves_only_the_requester() {
        let dir = tmp();
        let provider = PrivateKeySigner::random();
        let requester = PrivateKeySigner::random();
        let ch = B256::repeat_byte(5);
        let head_before;
        {
            let s = ConnLogStore::open(&dir, StoreLimits::default()).unwrap();
            s.open_deal(7, requester.address(), 1_000);
            for i in 0..3 {
                s.append(7, &entry(i));
            }
            s.bind_channel(ch, 7);
            let h = s.commit(ch, 7);
            head_before = s.book().head(7).unwrap();
            assert_eq!(
                h,
                connlog::channel_commitment(
                    &ch,
                    &[CommitPart {
                        deal_id: 7,
                        entries: 3,
                        dropped: 0,
                        head: head_before
                    }]
                )
            );
        }
        // A torn half record at the end (a crash mid-write).
        let path = deal_file(&dir, 7, requester.address(), 1_000);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        drop(f);
        let s = ConnLogStore::open(&dir, StoreLimits::default()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * ENTRY_LEN as u64
        );
        assert_eq!(s.book().head(7).unwrap(), head_before);
        // Reopened by the agent for the same deal: the chain goes on.
        s.open_deal(7, requester.address(), 1_000);
        s.append(7, &entry(3));
        assert_eq!(
            s.book().head(7).unwrap(),
            connlog::head(7, &(0..4).map(entry).collect::<Vec<_>>())
        );

        let now = 5_000;
        let target = connlog::request_target(&requester, provider.address(), 7, now + 60).unwrap();
        let x = s.serve(&target, &provider, now).unwrap();
        assert_eq!(x.log.entries.len(), 4);
        let h = connlog::verify_log(&x.log, 7, provider.address(), None).unwrap();
        assert_eq!(h, s.book().head(7).unwrap());
        let c = &x.commits[0];
        connlog::verify_commitment(&ch, &c.hash, 7, &x.commits, |d| {
            (d == 7).then_some(x.log.entries.as_slice())
        })
        .unwrap();
        // Someone else, another deal, an expired request, garbage.
        let other =
            connlog::request_target(&PrivateKeySigner::random(), provider.address(), 7, now + 60)
                .unwrap();
        assert!(matches!(
            s.serve(&other, &provider, now),
            Err(ServeError::Forbidden(_))
        ));
        let t8 = connlog::request_target(&requester, provider.address(), 8, now + 60).unwrap();
        assert!(matches!(
            s.serve(&t8, &provider, now),
            Err(ServeError::NotFound(_))
        ));
        assert!(
            matches!(s.serve(&target, &provider, now + 61), Err(ServeError::Bad(e)) if e.contains("expiry"))
        );
        assert!(
            matches!(s.serve("/api/connlog/x", &provider, now), Err(ServeError::Bad(e)) if e.contains("deal_id"))
        );

        // A record dropped from the file: the served log still verifies as signed,
        // but no longer matches what was committed.
        let bytes = std::fs::read(&path).unwrap();
        let mut cut = bytes[..ENTRY_LEN].to_vec();
        cut.extend_from_slice(&bytes[2 * ENTRY_LEN..]);
        std::fs::write(&path, cut).unwrap();
        let x = s.serve(&target, &provider, now).unwrap();
        connlog::verify_log(&x.log, 7, provider.address(), None).unwrap();
        let e = connlog::verify_commitment(&ch, &c.hash, 7, &x.commits, |d| {
            (d == 7).then_some(x.log.entries.as_slice())
        })
        .unwrap_err();
        assert!(e.to_string().contains("entries"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest! {
        #[test]
        fn resuming_any_bytes_never_panics_and_keeps_whole_records(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut b = LogBook::new(StoreLimits::default());
            let valid = b.resume(1, REQ, 1, &bytes).unwrap();
            prop_assert_eq!(valid % ENTRY_LEN, 0);
            prop_assert!(valid <= bytes.len());
            let kept = connlog::parse_records(&bytes[..valid]).unwrap();
            prop_assert_eq!(b.head(1).unwrap(), connlog::head(1, &kept));
        }

        #[test]
        fn file_names_round_trip(deal in any::<u64>(), r in any::<[u8; 20]>(), start in any::<u64>()) {
            let p = deal_file(Path::new("/x"), deal, Address::from(r), start);
            let name = p.file_name().unwrap().to_str().unwrap();
            prop_assert_eq!(parse_deal_file(name), Some((deal, Address::from(r), start)));
        }
    }
}
