//! Is an exit alive? A sans-IO state machine fed with "handshake initiation sent" and
//! "authenticated datagram received" events.
//!
//! The only WireGuard message a live peer answers at once is a handshake initiation
//! (with a response, or a cookie reply under load). Data is not: the last packet of a
//! request (our trailing TCP ACK) is answered at best by the peer's passive keepalive,
//! `KEEPALIVE_TIMEOUT` (10 s) later, and boringtun does not even send that one when the
//! data arrived in the same timer tick as the peer's own last packet (it stamps both with
//! the tick's time and needs "received > sent") -- the normal case after a response. So
//! data and keepalives never start the dead clock; only handshake initiations (the first
//! one, boringtun's rekeys and retries, and our probes) do. The rule:
//! - **answer**: any datagram from the exit that authenticates (data, keepalive,
//!   handshake response, cookie reply);
//! - **probe**: when no initiation is waiting for its answer and either nothing was
//!   received for `probe_after` (idle), or data we sent has had no answer at all for
//!   `busy_probe_after` (busy; 1 s by default), the driver forces a handshake
//!   initiation;
//! - **dead** ([`HealthState::Silent`]): a handshake initiation went unanswered for
//!   `dead_after` (boringtun re-sends it after 5 s, so one lost datagram is survived if
//!   `dead_after` exceeds 5 s);
//! - no handshake completed `handshake_deadline` after start: [`HealthState::NoHandshake`];
//! - the exit verification saw another public address than promised:
//!   [`HealthState::WrongExitAddress`] until a later verification succeeds.
//!
//! A dead exit is therefore declared unhealthy at most `probe_after + dead_after` (plus
//! one 250 ms timer tick) after its last sign of life, and a busy one at most
//! `busy_probe_after + dead_after` (plus a tick) after the first data it left
//! unanswered; a live one never is, whatever it does or does not send after the last
//! data packet.

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
    /// When the oldest handshake initiation still waiting for an answer was sent.
    init_unanswered: Option<Instant>,
    /// When the oldest data packet sent since the last answer was sent.
    data_unanswered: Option<Instant>,
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
            init_unanswered: None,
            data_unanswered: None,
            handshaked: false,
            rtt_ewma: None,
            exit_ok: None,
            closed: false,
        }
    }

    /// We sent a handshake initiation, which a live exit answers at once. (Data and
    /// keepalives are not reported: a live exit need not answer them for 10 s or more.)
    pub fn on_initiation_sent(&mut self, now: Instant) {
        if self.init_unanswered.is_none() {
            self.init_unanswered = Some(now);
        }
    }

    /// We sent data (not a keepalive). It does not start the dead clock, only an earlier
    /// probe (after `busy_probe_after` without any answer).
    pub fn on_data_sent(&mut self, now: Instant) {
        if self.data_unanswered.is_none() {
            self.data_unanswered = Some(now);
        }
    }

    /// A datagram from the exit authenticated correctly: the exit is alive.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = Some(now);
        self.init_unanswered = None;
        self.data_unanswered = None;
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
        if self.init_unanswered.is_some() {
            return false; // an initiation is already waiting for its answer
        }
        if let Some(t) = self.data_unanswered
            && now.saturating_duration_since(t) >= self.settings.busy_probe_after
        {
            return true;
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
        if let Some(t) = self.init_unanswered
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
    /// Datagrams from the exit for one of the tunnel's UDP sockets (SOCKS5 UDP
    /// associations, DNS queries) dropped because that socket's buffer was full.
    pub udp_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            probe_after: Duration::from_secs(25),
            busy_probe_after: Duration::from_secs(1),
            dead_after: Duration::from_secs(15),
            handshake_deadline: Duration::from_secs(15),
        }
    }

    /// The market's settings for rented tunnels.
    fn market() -> HealthSettings {
        HealthSettings {
            probe_after: Duration::from_secs(5),
            busy_probe_after: Duration::from_secs(1),
            dead_after: Duration::from_secs(10),
            handshake_deadline: Duration::from_secs(15),
        }
    }

    const TICK: Duration = Duration::from_millis(250);

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
            now += TICK;
            if h.should_probe(now) {
                probe_at.get_or_insert(now);
                h.on_initiation_sent(now);
            }
            if h.state(now) == HealthState::Silent {
                break;
            }
        }
        assert_eq!(h.state(now), HealthState::Silent);
        let since_last_sign = now - (t0 + Duration::from_millis(5));
        assert!(since_last_sign <= Duration::from_secs(40) + TICK);
        assert!(probe_at.is_some());
    }

    /// The reported bug: after a request the last packet we send is a TCP ACK; a live
    /// exit answers it only with its passive keepalive ~10 s (plus its timer tick) after
    /// its own last packet. With `dead_after` = 10 s the old rule ("data sent, nothing
    /// back for dead_after") declared every such exit Silent.
    #[tokio::test(start_paused = true)]
    async fn a_trailing_ack_answered_by_the_passive_keepalive_is_not_death() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(market(), t0);
        h.on_handshake(t0);
        // Request and response; the exit's last data packet at t1, our ACK right after.
        let t1 = t0 + Duration::from_secs(1);
        h.on_receive(t1);
        h.on_data_sent(t1 + Duration::from_millis(1));
        let keepalive_at = t1 + Duration::from_secs(10) + Duration::from_millis(900);
        let mut now = t1;
        let mut probes = 0;
        for _ in 0..(3 * 40) {
            now += TICK;
            if now >= keepalive_at && now < keepalive_at + TICK {
                h.on_receive(now);
            }
            if h.should_probe(now) {
                probes += 1;
                h.on_initiation_sent(now);
                // A live exit answers an initiation within a round trip.
                h.on_handshake(now + Duration::from_millis(1));
            }
            assert_eq!(h.state(now), HealthState::Healthy, "at {:?}", now - t1);
        }
        assert!(probes > 0, "an idle tunnel is probed");
    }

    #[tokio::test(start_paused = true)]
    async fn busy_dead_exit_and_recovery() {
        let t0 = Instant::now();
        let mut h = HealthMonitor::new(market(), t0);
        h.on_handshake(t0);
        // We keep sending data from t0 on; the exit died at t0.
        h.on_data_sent(t0);
        h.on_data_sent(t0 + Duration::from_millis(500)); // does not move the start
        let probe_at = t0 + Duration::from_secs(1);
        assert!(!h.should_probe(probe_at - TICK));
        assert!(h.should_probe(probe_at));
        h.on_initiation_sent(probe_at);
        h.on_initiation_sent(probe_at + Duration::from_secs(5)); // a retry: same clock
        assert!(!h.should_probe(probe_at + Duration::from_secs(6)));
        assert_eq!(
            h.state(probe_at + Duration::from_secs(10) - TICK),
            HealthState::Healthy
        );
        assert_eq!(
            h.state(probe_at + Duration::from_secs(10)),
            HealthState::Silent
        );
        h.on_receive(probe_at + Duration::from_secs(11));
        assert_eq!(
            h.state(probe_at + Duration::from_secs(11)),
            HealthState::Healthy
        );
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

    /// Runs the driver's loop (250 ms ticks) sending data at `our_sends_ms` against a
    /// model exit that is alive until `death_ms`: it sends whatever it likes at
    /// `exit_sends_ms` (answering our data or not) and answers every
    /// initiation after `rtt_ms`. Returns the first Silent time (ms) and the last time
    /// anything was received (ms).
    fn simulate(
        s: &HealthSettings,
        our_sends_ms: &[u64],
        exit_sends_ms: &[u64],
        death_ms: u64,
        rtt_ms: u64,
        horizon_ms: u64,
    ) -> (Option<u64>, u64) {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = HealthMonitor::new(s.clone(), t0);
        h.on_handshake(t0);
        let mut last_rx = 0;
        let mut answer_at: Option<u64> = None;
        let mut sends = exit_sends_ms.to_vec();
        sends.sort_unstable();
        let mut next_send = 0;
        let mut ms = 0;
        while ms < horizon_ms {
            ms += 250;
            if our_sends_ms.iter().any(|&t| t > ms - 250 && t <= ms) {
                h.on_data_sent(at(ms));
            }
            while next_send < sends.len() && sends[next_send] <= ms {
                if sends[next_send] < death_ms {
                    h.on_receive(at(sends[next_send]));
                    last_rx = last_rx.max(sends[next_send]);
                }
                next_send += 1;
            }
            if let Some(a) = answer_at
                && a <= ms
            {
                h.on_receive(at(a));
                last_rx = last_rx.max(a);
                answer_at = None;
            }
            if h.should_probe(at(ms)) {
                h.on_initiation_sent(at(ms));
                if ms < death_ms {
                    answer_at = Some(ms + rtt_ms);
                }
            }
            if h.state(at(ms)) == HealthState::Silent {
                return (Some(ms), last_rx);
            }
        }
        (None, last_rx)
    }

    /// A case proptest found: the exit dies while a probe answer is in flight, so its
    /// last sign of life is `rtt` after the death; it is still found dead in time.
    #[test]
    fn a_death_with_an_answer_in_flight_is_found_in_time() {
        let s = HealthSettings {
            probe_after: Duration::from_secs(3),
            busy_probe_after: Duration::from_millis(2001),
            dead_after: Duration::from_secs(6),
            handshake_deadline: Duration::from_secs(15),
        };
        let horizon = 120_000 + 1_501 + 9_000 + 1_000;
        let (silent, last_rx) = simulate(&s, &[], &[83_001], 119_501, 1_501, horizon);
        let silent = silent.expect("declared Silent");
        assert!(silent <= last_rx + 9_000 + 250, "{silent} {last_rx}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// A live exit is never declared dead, whatever it sends, as long as it answers
        /// initiations within `dead_after`; a dead one is declared dead at most
        /// `probe_after + dead_after + tick` after its last sign of life.
        #[test]
        fn live_exits_stay_healthy_and_dead_ones_are_found_in_time(
            probe_s in 1u64..30,
            busy_ms in 250u64..5_000,
            dead_s in 6u64..30,
            rtt_ms in 0u64..2_000,
            ours in proptest::collection::vec(0u64..120_000, 0..40),
            sends in proptest::collection::vec(0u64..120_000, 0..40),
            death_ms in 0u64..120_000,
        ) {
            let s = HealthSettings {
                probe_after: Duration::from_secs(probe_s),
                busy_probe_after: Duration::from_millis(busy_ms),
                dead_after: Duration::from_secs(dead_s),
                handshake_deadline: Duration::from_secs(15),
            };
            // Room for a death at the last instant whose probe answer was already in
            // flight (up to `rtt_ms` later), then a whole probe and dead period.
            let horizon = 120_000 + rtt_ms + (probe_s + dead_s) * 1_000 + 1_000;
            // Never dies within the horizon: never Silent.
            let (silent, _) = simulate(&s, &ours, &sends, u64::MAX, rtt_ms, horizon);
            prop_assert_eq!(silent, None);
            // Dies at death_ms: Silent, in time.
            let (silent, last_rx) = simulate(&s, &ours, &sends, death_ms, rtt_ms, horizon);
            let silent = silent.expect("a dead exit is declared Silent");
            prop_assert!(silent >= death_ms.min(last_rx));
            prop_assert!(
                silent <= last_rx + (probe_s + dead_s) * 1_000 + 250,
                "silent at {} ms, last sign of life at {} ms", silent, last_rx
            );
        }
    }
}
