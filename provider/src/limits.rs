//! Bounded per-requester load (sans-IO): how many flows a peer may hold and open per
//! second, how long a relayed flow may stay idle, how many bytes per second a deal may
//! move, and how much of a flooding peer's traffic is decrypted at all.
//!
//! Everything here is pure state fed with a millisecond clock the runtime supplies
//! (`now_ms`, monotonic); the exit ([`crate::exit`]) holds the sockets. The pieces:
//! - [`Limits`]: the `[limits]` config section, checked by [`Limits::validate`].
//! - [`TokenBucket`]: integer token bucket (exact, no floats) used both for the flow
//!   rate (take one token or refuse) and the bandwidth cap (take the bytes moved, get
//!   back how long to wait until the debt is paid).
//! - [`FlowLimiter`]: live flows per peer and in total, and each peer's flow-rate bucket.
//! - [`FloodGate`]: a peer's gate before decryption, closed (rate-limited) while the
//!   peer floods.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use serde::Deserialize;

use crate::ProviderError;

/// Bytes each relay task copies at a time, per direction (its memory besides the
/// userspace socket's buffers).
pub const RELAY_BUFFER: usize = 16 * 1024;

/// How long a closed flow's userspace socket may linger finishing its close (the
/// netstack's orphan linger); counted in the memory bound.
pub const CLOSE_LINGER: Duration = Duration::from_secs(30);

/// RSTs per second (and burst) one peer gets for its refused SYNs
/// ([`FlowLimiter::may_reset`]); its other refused SYNs are dropped.
pub const RESETS_PER_SECOND: u64 = 200;

/// Datagrams per second a flooding peer still gets decrypted ([`FloodGate`]).
pub const FLOODING_DATAGRAMS_PER_SECOND: u64 = 2000;

/// The burst of a closed [`FloodGate`]: a tenth of a second's worth, so the gate's
/// first moment lets no more through than any other.
pub const FLOODING_BURST: u64 = FLOODING_DATAGRAMS_PER_SECOND / 10;

/// How long after its last sign of flooding a peer stays behind its [`FloodGate`].
pub const FLOOD_PENALTY: Duration = Duration::from_secs(1);

fn d_max_flows_per_peer() -> u32 {
    256
}
fn d_max_flows_total() -> u32 {
    4096
}
fn d_new_flows_per_second() -> u32 {
    100
}
fn d_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn d_flow_buffer() -> usize {
    ipsx_tunnel_pool::netstack::TCP_BUFFER
}
fn d_peer_queue() -> usize {
    1024
}
fn d_peer_budget() -> usize {
    64
}
fn d_max_half_open_per_peer() -> u32 {
    32
}
fn d_half_open_timeout() -> Duration {
    Duration::from_secs(3)
}

/// `[limits]`: what one requester (a WireGuard peer, i.e. one deal) may cost the exit.
///
/// ```toml
/// [limits]
/// max_flows_per_peer = 256       # TCP flows a peer holds at once; more SYNs get a RST
/// max_flows_total = 4096         # flows of all peers together
/// new_flows_per_second = 100     # per peer (burst of the same size); more get a RST
/// idle_timeout = "5m"            # a relayed flow with no byte either way is reset
/// bandwidth_per_deal = 1250000   # bytes/s per direction for all of a peer's flows (absent: none)
/// flow_buffer = 131072           # bytes per direction of each flow's userspace socket
/// peer_queue = 1024              # datagrams waiting per peer for its task; more are shed
/// peer_budget = 64               # datagrams a peer's task handles before it yields
/// max_half_open_per_peer = 32    # flows of a peer still in their handshake; more SYNs get a RST
/// half_open_timeout = "3s"       # a flow whose handshake is not done by then is reset
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent TCP flows per peer; a SYN over it is answered with a RST (counted).
    #[serde(default = "d_max_flows_per_peer")]
    pub max_flows_per_peer: u32,
    /// Concurrent TCP flows of all peers of the exit together.
    #[serde(default = "d_max_flows_total")]
    pub max_flows_total: u32,
    /// New flows per second per peer (token bucket, burst of the same size).
    #[serde(default = "d_new_flows_per_second")]
    pub new_flows_per_second: u32,
    /// A relayed flow that moved no byte either way for this long is reset.
    #[serde(default = "d_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Bytes per second per direction for all flows of one peer (deal); none: no cap.
    #[serde(default)]
    pub bandwidth_per_deal: Option<u64>,
    /// Size of each direction's buffer of a flow's userspace socket, bytes.
    #[serde(default = "d_flow_buffer")]
    pub flow_buffer: usize,
    /// Datagrams waiting for a peer's task; more are dropped (counted).
    #[serde(default = "d_peer_queue")]
    pub peer_queue: usize,
    /// Datagrams a peer's task handles in one turn before it yields to the others.
    #[serde(default = "d_peer_budget")]
    pub peer_budget: usize,
    /// Flows of one peer whose TCP handshake is not complete yet (SYN received, no ACK:
    /// the SYN backlog); a SYN over it is answered with a RST before any socket is made.
    /// Counted within `max_flows_per_peer`.
    #[serde(default = "d_max_half_open_per_peer")]
    pub max_half_open_per_peer: u32,
    /// A flow whose handshake is not complete this long after its SYN is reset.
    #[serde(default = "d_half_open_timeout", with = "humantime_serde")]
    pub half_open_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flows_per_peer: d_max_flows_per_peer(),
            max_flows_total: d_max_flows_total(),
            new_flows_per_second: d_new_flows_per_second(),
            idle_timeout: d_idle_timeout(),
            bandwidth_per_deal: None,
            flow_buffer: d_flow_buffer(),
            peer_queue: d_peer_queue(),
            peer_budget: d_peer_budget(),
            max_half_open_per_peer: d_max_half_open_per_peer(),
            half_open_timeout: d_half_open_timeout(),
        }
    }
}

impl Limits {
    /// Checks the values; errors name `{prefix}.{key}` (`limits.idle_timeout`).
    pub fn validate(&self, prefix: &str) -> Result<(), ProviderError> {
        let bad = |key: &str, reason: String| ProviderError::Config {
            key: format!("{prefix}.{key}"),
            reason,
        };
        if !(1..=65_536).contains(&self.max_flows_per_peer) {
            return Err(bad("max_flows_per_peer", "must be in 1..=65536".into()));
        }
        if !(1..=1_048_576).contains(&self.max_flows_total) {
            return Err(bad("max_flows_total", "must be in 1..=1048576".into()));
        }
        if self.max_flows_total < self.max_flows_per_peer {
            return Err(bad(
                "max_flows_total",
                format!(
                    "{} is below max_flows_per_peer ({})",
                    self.max_flows_total, self.max_flows_per_peer
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.new_flows_per_second) {
            return Err(bad("new_flows_per_second", "must be in 1..=1000000".into()));
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(86_400)
        {
            return Err(bad("idle_timeout", "between 1s and 1d".into()));
        }
        if let Some(b) = self.bandwidth_per_deal
            && !(1024..=1_000_000_000_000).contains(&b)
        {
            return Err(bad(
                "bandwidth_per_deal",
                "bytes per second, at least 1024 (omit the key for no cap)".into(),
            ));
        }
        if !(4096..=4 * 1024 * 1024).contains(&self.flow_buffer) {
            return Err(bad("flow_buffer", "bytes, within 4096..=4194304".into()));
        }
        if !(1..=65_536).contains(&self.peer_queue) {
            return Err(bad("peer_queue", "must be in 1..=65536".into()));
        }
        if !(1..=self.peer_queue).contains(&self.peer_budget) {
            return Err(bad("peer_budget", "must be in 1..=peer_queue".into()));
        }
        if !(1..=65_536).contains(&self.max_half_open_per_peer) {
            return Err(bad("max_half_open_per_peer", "must be in 1..=65536".into()));
        }
        if self.half_open_timeout < Duration::from_millis(100)
            || self.half_open_timeout > Duration::from_secs(600)
        {
            return Err(bad("half_open_timeout", "between 100ms and 10m".into()));
        }
        Ok(())
    }

    /// Upper bound of the memory one live flow holds at the exit, bytes: its userspace
    /// socket's two buffers and the relay's two copy buffers (kernel socket buffers
    /// not included).
    pub fn bytes_per_flow(&self) -> u64 {
        2 * (self.flow_buffer as u64 + RELAY_BUFFER as u64)
    }

    /// Upper bound of the flow memory of the whole exit: every allowed live flow, plus
    /// the sockets of closed flows still lingering (at most one rate-limit's worth per
    /// second of linger, per peer).
    pub fn memory_bound(&self, peers: u64) -> u64 {
        let lingering = u64::from(self.new_flows_per_second)
            .saturating_mul(CLOSE_LINGER.as_secs())
            .saturating_mul(peers)
            .saturating_mul(2 * self.flow_buffer as u64);
        u64::from(self.max_flows_total)
            .saturating_mul(self.bytes_per_flow())
            .saturating_add(lingering)
    }
}

/// An integer token bucket: `rate` tokens per second, at most `burst` stored. Tokens
/// are kept in thousandths so that a millisecond clock refills exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Thousandths of a token; negative is a debt (bandwidth use).
    level: i128,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now_ms: u64) -> Self {
        Self {
            rate,
            burst,
            level: i128::from(burst) * 1000,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        // rate tokens/s = rate thousandths per ms.
        let add = i128::from(elapsed) * i128::from(self.rate);
        self.level = (self.level + add).min(i128::from(self.burst) * 1000);
    }

    /// Tokens available now (whole ones; 0 while in debt).
    pub fn available(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        u64::try_from(self.level.max(0) / 1000).unwrap_or(u64::MAX)
    }

    /// Takes `n` tokens if there are that many; else takes nothing.
    pub fn try_take(&mut self, n: u64, now_ms: u64) -> bool {
        self.refill(now_ms);
        let need = i128::from(n) * 1000;
        if self.level >= need {
            self.level -= need;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens even if that leaves a debt, and says how long to wait until
    /// the bucket is out of debt again (zero if it is not in debt).
    pub fn take_debt(&mut self, n: u64, now_ms: u64) -> Duration {
        self.refill(now_ms);
        self.level -= i128::from(n) * 1000;
        if self.level >= 0 || self.rate == 0 {
            return Duration::ZERO;
        }
        let debt = -self.level; // thousandths
        let ms = (debt + i128::from(self.rate) - 1) / i128::from(self.rate);
        Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// Why a new flow was refused by the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitRefusal {
    /// The peer holds `max_flows_per_peer` flows.
    PeerFlows,
    /// The exit holds `max_flows_total` flows.
    TotalFlows,
    /// The peer opened `new_flows_per_second` flows in the last second (bucket empty).
    Rate,
    /// The peer has `max_half_open_per_peer` flows still in their handshake.
    HalfOpen,
}

impl std::fmt::Display for LimitRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PeerFlows => "max_flows_per_peer reached",
            Self::TotalFlows => "max_flows_total reached",
            Self::Rate => "new_flows_per_second exceeded",
            Self::HalfOpen => "max_half_open_per_peer reached",
        })
    }
}

#[derive(Debug, Clone)]
struct PeerLoad {
    live: u32,
    /// Of `live`, the flows admitted by [`FlowLimiter::admit_half_open`] whose handshake
    /// is not done.
    half_open: u32,
    bucket: TokenBucket,
    /// RSTs for refused SYNs ([`FlowLimiter::may_reset`]).
    resets: TokenBucket,
    gone: bool,
}

/// Live flows per peer and in total, and each peer's flow-rate bucket.
#[derive(Debug, Clone)]
pub struct FlowLimiter<K> {
    limits: Limits,
    total: u32,
    peers: HashMap<K, PeerLoad>,
}

impl<K: Hash + Eq + Copy> FlowLimiter<K> {
    /// A limiter applying `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            total: 0,
            peers: HashMap::new(),
        }
    }

    /// A new flow of `peer` at `now_ms`: admitted (counted live until [`release`]) or
    /// refused. Caps are checked before the rate, so a capped SYN costs no token.
    ///
    /// [`release`]: FlowLimiter::release
    pub fn admit(&mut self, peer: K, now_ms: u64) -> Result<(), LimitRefusal> {
        let (per_peer, cap, total) = (
            self.limits.max_flows_per_peer,
            self.limits.max_flows_total,
            self.total,
        );
        let load = self.load(peer, now_ms);
        if load.live >= per_peer {
            return Err(LimitRefusal::PeerFlows);
        }
        if total >= cap {
            return Err(LimitRefusal::TotalFlows);
        }
        if !load.bucket.try_take(1, now_ms) {
            return Err(LimitRefusal::Rate);
        }
        load.live += 1;
        self.total += 1;
        Ok(())
    }

    /// A new TCP flow of `peer` (a SYN): as [`admit`], and first refused with
    /// [`LimitRefusal::HalfOpen`] when the peer already has `max_half_open_per_peer`
    /// flows in their handshake. An admitted flow counts as half-open until
    /// [`established`] (or its [`release_half_open`] if it never completes).
    ///
    /// [`admit`]: FlowLimiter::admit
    /// [`established`]: FlowLimiter::established
    /// [`release_half_open`]: FlowLimiter::release_half_open
    pub fn admit_half_open(&mut self, peer: K, now_ms: u64) -> Result<(), LimitRefusal> {
        let cap = self.limits.max_half_open_per_peer;
        if self.load(peer, now_ms).half_open >= cap {
            return Err(LimitRefusal::HalfOpen);
        }
        self.admit(peer, now_ms)?;
        if let Some(load) = self.peers.get_mut(&peer) {
            load.half_open += 1;
        }
        Ok(())
    }

    /// One of `peer`'s half-open flows completed its handshake (it stays live).
    pub fn established(&mut self, peer: K) {
        if let Some(load) = self.peers.get_mut(&peer) {
            load.half_open = load.half_open.saturating_sub(1);
        }
    }

    /// One of `peer`'s flows ended before its handshake completed.
    pub fn release_half_open(&mut self, peer: K) {
        self.established(peer);
        self.release(peer);
    }

    /// Whether a refused SYN of `peer` may be answered with a RST now: at most
    /// [`RESETS_PER_SECOND`] a second per peer (burst of the same size), so a flood of
    /// refused SYNs costs the exit no encryption and no send beyond that; the others
    /// are dropped (the sender's SYN retransmission or timeout tells it).
    pub fn may_reset(&mut self, peer: K, now_ms: u64) -> bool {
        self.load(peer, now_ms).resets.try_take(1, now_ms)
    }

    /// Half-open flows of `peer`.
    pub fn half_open(&self, peer: &K) -> u32 {
        self.peers.get(peer).map_or(0, |l| l.half_open)
    }

    fn load(&mut self, peer: K, now_ms: u64) -> &mut PeerLoad {
        let rate = u64::from(self.limits.new_flows_per_second);
        let load = self.peers.entry(peer).or_insert_with(|| PeerLoad {
            live: 0,
            half_open: 0,
            bucket: TokenBucket::new(rate, rate, now_ms),
            resets: TokenBucket::new(RESETS_PER_SECOND, RESETS_PER_SECOND, now_ms),
            gone: false,
        });
        load.gone = false;
        load
    }

    /// One of `peer`'s admitted flows ended.
    pub fn release(&mut self, peer: K) {
        if let Some(load) = self.peers.get_mut(&peer)
            && load.live > 0
        {
            load.live -= 1;
            load.half_open = load.half_open.min(load.live);
            self.total = self.total.saturating_sub(1);
            if load.live == 0 && load.gone {
                self.peers.remove(&peer);
            }
        }
    }

    /// The peer was removed: its state goes once its last flow is released.
    pub fn forget(&mut self, peer: K) {
        if let Some(load) = self.peers.get_mut(&peer) {
            if load.live == 0 {
                self.peers.remove(&peer);
            } else {
                load.gone = true;
            }
        }
    }

    /// Live flows of `peer`.
    pub fn live(&self, peer: &K) -> u32 {
        self.peers.get(peer).map_or(0, |l| l.live)
    }

    /// Live flows of every peer.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Peers with state (live flows or a bucket).
    pub fn peers(&self) -> usize {
        self.peers.len()
    }
}

/// A peer's gate before decryption. Every datagram costs the exit a decryption before
/// anything about it is known, so a peer that sends SYNs far beyond its limits (its
/// refused SYNs outran [`RESETS_PER_SECOND`]) would make the exit spend that on each.
/// Until [`FLOOD_PENALTY`] after its last sign of flooding, only
/// [`FLOODING_DATAGRAMS_PER_SECOND`] of its datagrams pass; the others are dropped
/// undecrypted (its own flows suffer, other peers do not). Any other peer is never
/// gated.
#[derive(Debug, Clone)]
pub struct FloodGate {
    bucket: TokenBucket,
}

impl FloodGate {
    /// An open gate.
    pub fn new(now_ms: u64) -> Self {
        Self {
            bucket: TokenBucket::new(FLOODING_DATAGRAMS_PER_SECOND, FLOODING_BURST, now_ms),
        }
    }

    /// Whether a datagram of the peer passes at `now_ms`, the peer having last been seen
    /// flooding at `flooded_ms` (`None`: never).
    pub fn pass(&mut self, now_ms: u64, flooded_ms: Option<u64>) -> bool {
        !penalized(flooded_ms, now_ms) || self.bucket.try_take(1, now_ms)
    }
}

/// Whether a peer last seen flooding at `flooded_ms` (`None`: never) is still within
/// its [`FLOOD_PENALTY`] at `now_ms`: behind its [`FloodGate`] (and the kernel filter).
pub fn penalized(flooded_ms: Option<u64>, now_ms: u64) -> bool {
    flooded_ms.is_some_and(|t| now_ms < t.saturating_add(FLOOD_PENALTY.as_millis() as u64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(per_peer: u32, total: u32, rate: u32) -> Limits {
        Limits {
            max_flows_per_peer: per_peer,
            max_flows_total: total,
            new_flows_per_second: rate,
            ..Limits::default()
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_name_the_key() {
        Limits::default().validate("limits").unwrap();
        let cases: [(Limits, &str); 10] = [
            (limits(0, 10, 1), "limits.max_flows_per_peer"),
            (limits(10, 5, 1), "limits.max_flows_total"),
            (limits(1, 1, 0), "limits.new_flows_per_second"),
            (
                Limits {
                    idle_timeout: Duration::from_millis(10),
                    ..Limits::default()
                },
                "limits.idle_timeout",
            ),
            (
                Limits {
                    bandwidth_per_deal: Some(10),
                    ..Limits::default()
                },
                "limits.bandwidth_per_deal",
            ),
            (
                Limits {
                    flow_buffer: 100,
                    ..Limits::default()
                },
                "limits.flow_buffer",
            ),
            (
                Limits {
                    peer_queue: 0,
                    ..Limits::default()
                },
                "limits.peer_queue",
            ),
            (
                Limits {
                    peer_budget: 10_000,
                    ..Limits::default()
                },
                "limits.peer_budget",
            ),
            (
                Limits {
                    max_half_open_per_peer: 0,
                    ..Limits::default()
                },
                "limits.max_half_open_per_peer",
            ),
            (
                Limits {
                    half_open_timeout: Duration::from_millis(10),
                    ..Limits::default()
                },
                "limits.half_open_timeout",
            ),
        ];
        for (l, key) in cases {
            let e = l.validate("limits").unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn bucket_refills_by_the_millisecond() {
        let mut b = TokenBucket::new(10, 10, 0);
        for _ in 0..10 {
            assert!(b.try_take(1, 0));
        }
        assert!(!b.try_take(1, 0));
        assert!(!b.try_take(1, 99), "0.99 tokens after 99 ms");
        assert!(b.try_take(1, 100));
        assert_eq!(b.available(10_000), 10, "capped at the burst");
        // Debt: 25 tokens at 10/s from 10 stored = 15 in debt = 1.5 s.
        assert_eq!(b.take_debt(25, 10_000), Duration::from_millis(1500));
        assert_eq!(b.available(11_499), 0);
        assert_eq!(b.take_debt(0, 11_500), Duration::ZERO);
    }

    #[test]
    fn caps_before_rate_and_release_frees() {
        let mut f = FlowLimiter::new(limits(2, 3, 100));
        assert_eq!(f.admit(1u8, 0), Ok(()));
        assert_eq!(f.admit(1, 0), Ok(()));
        assert_eq!(f.admit(1, 0), Err(LimitRefusal::PeerFlows));
        assert_eq!(f.admit(2, 0), Ok(()));
        assert_eq!(f.admit(3, 0), Err(LimitRefusal::TotalFlows));
        f.release(1);
        assert_eq!(f.live(&1), 1);
        assert_eq!(f.admit(3, 0), Ok(()));
        assert_eq!(f.total(), 3);
        // Forget with live flows keeps the state until the last release.
        f.forget(3);
        assert_eq!(f.peers(), 3);
        f.release(3);
        assert_eq!(f.peers(), 2);
        f.release(9); // unknown peer: nothing
        assert_eq!(f.total(), 2);
    }

    #[test]
    fn rate_refuses_then_recovers() {
        let mut f = FlowLimiter::new(limits(1000, 1000, 5));
        let ok = (0..20).filter(|_| f.admit(7u8, 1000).is_ok()).count();
        assert_eq!(ok, 5);
        assert_eq!(f.admit(7, 1000), Err(LimitRefusal::Rate));
        assert_eq!(f.admit(7, 1200), Ok(()));
    }

    #[test]
    fn half_open_cap_refuses_before_the_rate_and_frees_on_handshake() {
        let mut f = FlowLimiter::new(Limits {
            max_half_open_per_peer: 2,
            ..limits(10, 10, 3)
        });
        assert_eq!(f.admit_half_open(1u8, 0), Ok(()));
        assert_eq!(f.admit_half_open(1, 0), Ok(()));
        assert_eq!(f.admit_half_open(1, 0), Err(LimitRefusal::HalfOpen));
        assert_eq!(f.half_open(&1), 2);
        // The refusal took no token: the third one is still there.
        f.established(1);
        assert_eq!(f.admit_half_open(1, 0), Ok(()));
        assert_eq!(f.admit_half_open(1, 0), Err(LimitRefusal::HalfOpen));
        // A half-open flow that never completes frees both places.
        f.release_half_open(1);
        assert_eq!((f.live(&1), f.half_open(&1)), (2, 1));
        assert_eq!(f.admit_half_open(1, 0), Err(LimitRefusal::Rate));
        // Another peer has its own backlog.
        assert_eq!(f.admit_half_open(2, 0), Ok(()));
        // An established flow's release leaves the backlog alone.
        f.established(1);
        f.release(1);
        assert_eq!((f.live(&1), f.half_open(&1)), (1, 0));
        assert_eq!(f.total(), 2);
    }

    #[test]
    fn resets_are_limited_per_peer() {
        let mut f = FlowLimiter::new(limits(10, 10, 5));
        let sent = (0..1000).filter(|_| f.may_reset(1u8, 0)).count() as u64;
        assert_eq!(sent, RESETS_PER_SECOND);
        assert!(f.may_reset(2, 0), "another peer has its own budget");
        let tick = 1000 / RESETS_PER_SECOND;
        assert!(!f.may_reset(1, tick - 1));
        assert!(f.may_reset(1, tick));
    }

    #[test]
    fn the_flood_gate_closes_for_a_flooder_and_reopens() {
        let mut g = FloodGate::new(0);
        assert!((0..10_000).all(|_| g.pass(0, None)), "open: no limit");
        let passed = (0..10_000).filter(|_| g.pass(100, Some(100))).count() as u64;
        assert_eq!(passed, FLOODING_BURST);
        // Then the rate, millisecond by millisecond, for half a second.
        let later: u64 = (101..=600)
            .map(|t| (0..100).filter(|_| g.pass(t, Some(100))).count() as u64)
            .sum();
        assert_eq!(
            later,
            FLOODING_DATAGRAMS_PER_SECOND / 2,
            "half a second's worth"
        );
        let penalty = FLOOD_PENALTY.as_millis() as u64;
        assert!(!g.pass(600, Some(100)));
        let refilled = (0..10_000)
            .filter(|_| g.pass(100 + penalty - 1, Some(100)))
            .count() as u64;
        assert!(refilled <= FLOODING_BURST, "{refilled}");
        assert!(
            (0..10_000).all(|_| g.pass(100 + penalty, Some(100))),
            "open again"
        );
    }

    proptest! {
        #[test]
        fn limiter_never_exceeds_caps(ops in proptest::collection::vec((0u8..4, any::<bool>(), 0u64..50), 0..400),
                                      per_peer in 1u32..6, extra in 0u32..6, rate in 1u32..20) {
            let l = limits(per_peer, per_peer + extra, rate);
            let mut f = FlowLimiter::new(l);
            let mut now = 0u64;
            let mut live = [0u32; 4];
            let mut admitted_at: Vec<(u8, u64)> = Vec::new();
            for (peer, open, dt) in ops {
                now += dt;
                if open {
                    if f.admit(peer, now).is_ok() {
                        live[peer as usize] += 1;
                        admitted_at.push((peer, now));
                    }
                } else if live[peer as usize] > 0 {
                    f.release(peer);
                    live[peer as usize] -= 1;
                }
                prop_assert!(live.iter().all(|&n| n <= per_peer));
                prop_assert!(live.iter().sum::<u32>() <= per_peer + extra);
                prop_assert_eq!(f.total(), live.iter().sum::<u32>());
            }
            // The rate: in any window of W ms a peer is admitted at most rate + rate*W/1000 times.
            for p in 0..4u8 {
                let times: Vec<u64> = admitted_at.iter().filter(|(q, _)| *q == p).map(|(_, t)| *t).collect();
                for (i, &t0) in times.iter().enumerate() {
                    for (j, &t1) in times.iter().enumerate().skip(i) {
                        let n = (j - i + 1) as u64;
                        prop_assert!(n <= u64::from(rate) + u64::from(rate) * (t1 - t0) / 1000 + 1);
                    }
                }
            }
        }

        #[test]
        fn half_open_backlog_stays_within_its_cap(ops in proptest::collection::vec((0u8..3, 0u8..4, 0u64..50), 0..400),
                                                  backlog in 1u32..5, per_peer in 1u32..8) {
            let mut f = FlowLimiter::new(Limits {
                max_half_open_per_peer: backlog,
                ..limits(per_peer, 100, 1000)
            });
            let mut now = 0u64;
            // Model: per peer, (half-open, established) flows.
            let mut model = [(0u32, 0u32); 3];
            for (peer, op, dt) in ops {
                now += dt;
                let m = &mut model[peer as usize];
                match op {
                    0 => {
                        let r = f.admit_half_open(peer, now);
                        if m.0 >= backlog {
                            prop_assert_eq!(r, Err(LimitRefusal::HalfOpen));
                        } else if m.0 + m.1 >= per_peer {
                            prop_assert_eq!(r, Err(LimitRefusal::PeerFlows));
                        }
                        if r.is_ok() {
                            m.0 += 1;
                        }
                    }
                    1 if m.0 > 0 => {
                        f.established(peer);
                        m.0 -= 1;
                        m.1 += 1;
                    }
                    2 if m.0 > 0 => {
                        f.release_half_open(peer);
                        m.0 -= 1;
                    }
                    3 if m.1 > 0 => {
                        f.release(peer);
                        m.1 -= 1;
                    }
                    _ => {}
                }
                for (p, &(h, e)) in model.iter().enumerate() {
                    let p = p as u8;
                    prop_assert_eq!(f.half_open(&p), h);
                    prop_assert_eq!(f.live(&p), h + e);
                    prop_assert!(h <= backlog && h + e <= per_peer);
                }
            }
        }

        #[test]
        fn the_flood_gate_passes_at_most_its_rate_while_closed(steps in proptest::collection::vec((0u64..20, any::<bool>(), 1u32..500), 1..200)) {
            let mut g = FloodGate::new(0);
            let (mut now, mut flooded) = (0u64, None);
            let mut passed_closed: Vec<u64> = Vec::new();
            for (dt, flood, n) in steps {
                now += dt;
                if flood {
                    flooded = Some(now);
                }
                let closed = flooded.is_some_and(|t| now < t + FLOOD_PENALTY.as_millis() as u64);
                let passed = (0..n).filter(|_| g.pass(now, flooded)).count() as u32;
                if closed {
                    passed_closed.extend(std::iter::repeat_n(now, passed as usize));
                } else {
                    prop_assert_eq!(passed, n);
                }
            }
            // While closed: within burst + rate x window in any window.
            let rate = FLOODING_DATAGRAMS_PER_SECOND;
            if let (Some(&first), Some(&last)) = (passed_closed.first(), passed_closed.last()) {
                prop_assert!(passed_closed.len() as u64 <= FLOODING_BURST + rate * (last - first) / 1000 + 1);
            }
        }

        #[test]
        fn bucket_debt_never_lets_more_than_rate_through(chunks in proptest::collection::vec(1u64..100_000, 1..50), rate in 1024u64..1_000_000) {
            let mut b = TokenBucket::new(rate, rate, 0);
            let mut now = 0u64;
            let mut moved = 0u64;
            for c in chunks {
                moved += c;
                let wait = b.take_debt(c, now);
                now += wait.as_millis() as u64;
                // After waiting, everything moved so far is covered by burst + rate*t.
                prop_assert!(moved as u128 <= rate as u128 + (rate as u128 * now as u128) / 1000 + 1);
            }
        }
    }
}
