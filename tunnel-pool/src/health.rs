//! Is an exit alive? A sans-IO state machine fed with "sent" / "received" events.
//!
//! WireGuard has no explicit liveness signal, but its timers give one: a peer that
//! received data and has nothing to send answers with a keepalive after 10 s
//! (KEEPALIVE_TIMEOUT), and a handshake initiation is always answered. So:
//! - something that expects an answer (data, handshake initiation) was sent, and nothing
//!   at all came back for `dead_after` (default 15 s): **unhealthy**;
//! - nothing received for `probe_after` (default 25 s): the driver forces a handshake as
//!   a probe, which turns an idle but dead exit into the first case;
//! - no handshake completed `handshake_deadline` after start: **unhealthy**;
//! - the exit verification saw another public address than promised: **unhealthy** until
//!   a later verification succeeds.
//!
//! An idle dead exit is therefore marked unhealthy at most `probe_after + dead_after`
//! (40 s by default) after its last sign of life, a busy one `dead_after` after the first
//! unanswered packet.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::HealthSettings;

/// Where a tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthState {
    /// Started, first handshake not completed yet.
    Connecting,
    /// Handshake done, the exit answers.
    Healthy,
    /// No handshake within the deadline.
    NoHandshake,
    /// The exit stopped answering.
    Silent,
    /// The exit leaves from another address than promised.
    WrongExitAddress,
    /// The tunnel was shut down.
    Closed,
}

/// Exponentially weighted moving average weight of a new RTT sample (1/5).
const EWMA_NEW: f64 = 0.2;

/// The health state machine of one tunnel. Time is passed in, never read.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    settings: HealthSettings,
    started: Instant,
    last_rx: Option<Instant>,
    first_unanswered: Option<Instant>,
    handshaked: bool,
    rtt_ewma: Option<Duration>,
    exit_ok: Option<bool>,
    closed: bool,
}

impl HealthMonitor {
    /// A monitor for a tunnel started at `now`.
    pub fn new(settings: HealthSettings, now: Instant) -> Self {
        Self {
            settings,
            started: now,
            last_rx: None,
            first_unanswered: None,
            handshaked: false,
            rtt_ewma: None,
            exit_ok: None,
            closed: false,
        }
    }

    /// We sent a datagram that the exit must answer (data or handshake initiation).
    pub fn on_send_expecting_answer(&mut self, now: Instant) {
        if self.first_unanswered.is_none() {
            self.first_unanswered = Some(now);
        }
    }

    /// A datagram from the exit authenticated correctly.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = Some(now);
        self.first_unanswered = None;
    }

    /// A handshake completed.
    pub fn on_handshake(&mut self, now: Instant) {
        self.handshaked = true;
        self.on_receive(now);
    }

    /// A round-trip time sample (handshake RTT or TCP connect through the tunnel).
    pub fn on_rtt(&mut self, rtt: Duration) {
        self.rtt_ewma = Some(match self.rtt_ewma {
            None => rtt,
            Some(old) => old.mul_f64(1.0 - EWMA_NEW) + rtt.mul_f64(EWMA_NEW),
        });
    }

    /// The result of an exit-address verification.
    pub fn on_exit_verified(&mut self, ok: bool) {
        self.exit_ok = Some(ok);
    }

    /// The tunnel was shut down.
    pub fn on_closed(&mut self) {
        self.closed = true;
    }

    /// Whether the driver should force a handshake as a liveness probe now.
    pub fn should_probe(&self, now: Instant) -> bool {
        if self.first_unanswered.is_some() {
            return false; // already waiting for an answer
        }
        let last = self.last_rx.unwrap_or(self.started);
        now.saturating_duration_since(last) >= self.settings.probe_after
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> HealthState {
        if self.closed {
            return HealthState::Closed;
        }
        if self.exit_ok == Some(false) {
            return HealthState::WrongExitAddress;
        }
        if let Some(t) = self.first_unanswered
            && now.saturating_duration_since(t) >= self.settings.dead_after
        {
            return HealthState::Silent;
        }
        if !self.handshaked {
            if now.saturating_duration_since(self.started) >= self.settings.handshake_deadline {
                return HealthState::NoHandshake;
            }
            return HealthState::Connecting;
        }
        HealthState::Healthy
    }

    /// Smoothed round-trip time, if any sample was taken.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_ewma
    }

    /// The last exit-address verification result.
    pub fn exit_verified(&self) -> Option<bool> {
        self.exit_ok
    }
}

/// A snapshot of a tunnel's health and counters.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TunnelHealth {
    /// The state machine's verdict.
    pub state: HealthState,
    /// `state == Healthy`.
    pub healthy: bool,
    /// Time since the last completed handshake.
    pub last_handshake_age: Option<Duration>,
    /// Smoothed round-trip time through the tunnel.
    pub rtt_ewma: Option<Duration>,
    /// The last exit-address verification, if one ran.
    pub exit_verified: Option<bool>,
    /// Counters.
    pub counters: Counters,
}

/// Traffic and error counters of a tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counters {
    /// UDP bytes sent to the exit.
    pub bytes_sent: u64,
    /// UDP bytes received from the exit.
    pub bytes_received: u64,
    /// Datagrams received that authenticated.
    pub datagrams_ok: u64,
    /// Datagrams refused by WireGuard (bad MAC, replay, garbage, wrong size ...).
    pub datagrams_invalid: u64,
    /// Datagrams from an address other than the endpoint.
    pub datagrams_foreign: u64,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Datagrams that could not be sent (socket errors).
    pub send_errors: u64,
    /// Handshakes forced as liveness probes.
    pub probes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            probe_after: Duration::from_secs(25),
            dead_after: Duration::from_secs(15),
            handshake_deadline: Duration::from_secs(15),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_dead_exit_is_unhealthy_within_probe_plus_dead_after() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(settings(), t0);
        assert_eq!(h.state(t0), HealthState::Connecting);
        h.on_handshake(t0 + Duration::from_millis(5));
        assert_eq!(h.state(t0 + Duration::from_secs(1)), HealthState::Healthy);
        // The exit dies right after the handshake; we are idle.
        let mut now = t0;
        let mut probe_at = None;
        // Step through time in 250 ms ticks, as the driver does, for at most 60 s.
        for _ in 0..240 {
            now += Duration::from_millis(250);
            if h.should_probe(now) {
                probe_at.get_or_insert(now);
                h.on_send_expecting_answer(now);
            }
            if h.state(now) == HealthState::Silent {
                break;
            }
        }
        assert_eq!(h.state(now), HealthState::Silent);
        let since_last_sign = now - (t0 + Duration::from_millis(5));
        assert!(since_last_sign <= Duration::from_secs(40) + Duration::from_millis(250));
        assert!(probe_at.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn busy_dead_exit_and_recovery() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(settings(), t0);
        h.on_handshake(t0);
        let t1 = t0 + Duration::from_secs(3);
        h.on_send_expecting_answer(t1);
        h.on_send_expecting_answer(t1 + Duration::from_secs(5)); // does not move the start
        assert_eq!(h.state(t1 + Duration::from_secs(14)), HealthState::Healthy);
        assert_eq!(h.state(t1 + Duration::from_secs(15)), HealthState::Silent);
        assert!(!h.should_probe(t1 + Duration::from_secs(100)));
        h.on_receive(t1 + Duration::from_secs(16));
        assert_eq!(h.state(t1 + Duration::from_secs(16)), HealthState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn no_handshake_and_wrong_exit() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(settings(), t0);
        assert_eq!(
            h.state(t0 + Duration::from_secs(14)),
            HealthState::Connecting
        );
        assert_eq!(
            h.state(t0 + Duration::from_secs(15)),
            HealthState::NoHandshake
        );
        h.on_handshake(t0 + Duration::from_secs(16));
        h.on_exit_verified(false);
        assert_eq!(
            h.state(t0 + Duration::from_secs(17)),
            HealthState::WrongExitAddress
        );
        h.on_exit_verified(true);
        assert_eq!(h.state(t0 + Duration::from_secs(17)), HealthState::Healthy);
        h.on_closed();
        assert_eq!(h.state(t0 + Duration::from_secs(17)), HealthState::Closed);
    }

    #[test]
    fn rtt_ewma() {
        let mut h = HealthMonitor::new(settings(), Instant::now());
        assert_eq!(h.rtt(), None);
        h.on_rtt(Duration::from_millis(100));
        assert_eq!(h.rtt(), Some(Duration::from_millis(100)));
        h.on_rtt(Duration::from_millis(200));
        let r = h.rtt().unwrap_or_default().as_millis();
        assert_eq!(r, 120);
    }
}
