//! Recent requests for the dashboard's live view: a bounded ring of the last
//! [`RING`] requests and a broadcast to at most [`MAX_SUBSCRIBERS`] live listeners
//! (`GET /api/events`, server-sent events). Each event names the account, the target
//! host (never a path, query or credential), the exit, the status and the latency.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// Requests kept for `GET /api/requests` and for a page that connects late.
pub const RING: usize = 500;
/// Live listeners at once; more are refused with `503`.
pub const MAX_SUBSCRIBERS: usize = 16;
/// Events a listener may fall behind by before it is dropped (a slow consumer).
pub const LAG: usize = 256;

/// One finished (or refused) proxy request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestEvent {
    /// Increasing number, from 1.
    pub seq: u64,
    /// When it finished, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The configured account, else the token's name.
    pub account: String,
    /// `http`, `connect` or `socks5`.
    pub protocol: &'static str,
    /// The target host (and port when not the scheme's default), never a path or query.
    pub host: String,
    /// The exit used, if one was chosen.
    pub exit: Option<String>,
    /// The HTTP status answered (for CONNECT and SOCKS5: 200 once relaying started).
    pub status: u16,
    /// From the request head to the response head (or the tunnel being up).
    pub latency_ms: u64,
}

/// The ring and the broadcast.
#[derive(Debug)]
pub struct RequestLog {
    ring: std::sync::Mutex<(u64, VecDeque<Arc<RequestEvent>>)>,
    tx: broadcast::Sender<Arc<RequestEvent>>,
    subscribers: Arc<AtomicUsize>,
}

impl Default for RequestLog {
    fn default() -> Self {
        Self {
            ring: std::sync::Mutex::new((0, VecDeque::with_capacity(RING))),
            tx: broadcast::channel(LAG).0,
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// A live listener's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Subscription {
    /// Events from the moment of subscribing.
    pub rx: broadcast::Receiver<Arc<RequestEvent>>,
    count: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RequestLog {
    /// Records one request (`seq` and `time_ms` are filled in here).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        account: &str,
        protocol: &'static str,
        host: &str,
        exit: Option<&str>,
        status: u16,
        latency: Duration,
    ) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.0 += 1;
        let event = Arc::new(RequestEvent {
            seq: ring.0,
            time_ms,
            account: account.to_owned(),
            protocol,
            host: host.to_owned(),
            exit: exit.map(str::to_owned),
            status,
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        });
        if ring.1.len() == RING {
            ring.1.pop_front();
        }
        ring.1.push_back(event.clone());
        // Sent under the lock so listeners see events in `seq` order.
        let _ = self.tx.send(event);
    }

    /// The last requests, oldest first.
    pub fn recent(&self) -> Vec<Arc<RequestEvent>> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.1.iter().cloned().collect()
    }

    /// A live listener, or `None` when [`MAX_SUBSCRIBERS`] are listening.
    pub fn subscribe(&self) -> Option<Subscription> {
        let taken = self
            .subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SUBSCRIBERS).then_some(n + 1)
            });
        taken.ok()?;
        Some(Subscription {
            rx: self.tx.subscribe(),
            count: self.subscribers.clone(),
        })
    }

    /// Live listeners now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_requests_in_order() {
        let log = RequestLog::default();
        for i in 0..(RING + 7) {
            log.record("a", "http", &format!("h{i}"), None, 200, Duration::ZERO);
        }
        let recent = log.recent();
        assert_eq!(recent.len(), RING);
        assert_eq!(recent[0].seq, 8);
        assert_eq!(recent[RING - 1].host, format!("h{}", RING + 6));
    }

    #[test]
    fn subscribers_are_capped_and_slots_come_back() {
        let log = RequestLog::default();
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| log.subscribe()).collect();
        assert!(subs.iter().all(Option::is_some));
        assert!(log.subscribe().is_none());
        drop(subs);
        assert_eq!(log.subscribers(), 0);
        assert!(log.subscribe().is_some());
    }
}
