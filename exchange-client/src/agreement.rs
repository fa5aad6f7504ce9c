//! The agreement protocol: one pure function from what each side says (and the clock)
//! to the deal's status.
//!
//! The whitepaper ("AGREEMENT PROTOCOL IMPLEMENTATION"): "a function that generates a deal
//! status based on the provider status and requester status received (or automatically
//! assigned in special cases) from the actors of a deal". The special cases here are the
//! deadlines: a side that has not accepted by the accept deadline, and silence after the
//! rental period ends.

use serde::{Deserialize, Serialize};

use crate::types::PartyStatus;

/// The status of a deal in the deal book.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DealStatus {
    /// Created by matching; waiting for both sides to accept.
    Matched,
    /// Both sides accepted; the tunnel is not reported up yet.
    Accepted,
    /// At least one side reports the tunnel up and nobody objects.
    Active,
    /// Ended as agreed: both sides said so, or nobody objected by the settle deadline.
    Completed,
    /// Never started: a side rejected it or did not accept in time.
    Cancelled,
    /// Stopped early: a side reported failure (exit down, tunnel dead, payment stopped).
    Terminated,
    /// The sides disagree on whether the service happened.
    Disputed,
}

impl DealStatus {
    /// Final statuses: the deal no longer changes and its funds hold is released.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Cancelled | Self::Terminated | Self::Disputed
        )
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::Accepted => "accepted",
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Terminated => "terminated",
            Self::Disputed => "disputed",
        }
    }
}

/// The deadlines of one deal, unix seconds, with
/// `accept_by <= end <= settle_by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// Both sides must have accepted by then.
    pub accept_by: u64,
    /// The rental period ends.
    pub end: u64,
    /// Last moment for final reports; silence after it counts as agreement.
    pub settle_by: u64,
}

impl Deadlines {
    /// Builds ordered deadlines from the deal start, its duration and the two windows.
    pub fn new(start: u64, duration: u64, accept_window: u64, settle_window: u64) -> Self {
        let end = start.saturating_add(duration);
        Self {
            accept_by: start.saturating_add(accept_window).min(end),
            end,
            settle_by: end.saturating_add(settle_window),
        }
    }

    /// The next deadline strictly after `now`, if any: when the status may change on
    /// its own.
    pub fn next_after(&self, now: u64) -> Option<u64> {
        [self.accept_by, self.end, self.settle_by]
            .into_iter()
            .find(|t| *t > now)
    }
}

/// Which window `now` falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the accept deadline.
    Accepting,
    /// From the accept deadline to the end of the rental.
    Running,
    /// From the end of the rental to the settle deadline.
    Settling,
    /// After the settle deadline.
    Closed,
}

impl Phase {
    /// Every phase in time order.
    pub const ALL: [Phase; 4] = [Self::Accepting, Self::Running, Self::Settling, Self::Closed];

    /// The phase of `now` under `d`.
    pub fn of(now: u64, d: &Deadlines) -> Self {
        if now < d.accept_by {
            Self::Accepting
        } else if now < d.end {
            Self::Running
        } else if now < d.settle_by {
            Self::Settling
        } else {
            Self::Closed
        }
    }
}

/// The agreement protocol: the deal status from the provider's status, the requester's
/// status, the clock and the deal's deadlines.
pub fn deal_status(
    provider: PartyStatus,
    requester: PartyStatus,
    now: u64,
    deadlines: &Deadlines,
) -> DealStatus {
    status_in_phase(provider, requester, Phase::of(now, deadlines))
}

/// [`deal_status`] with the clock already reduced to a phase (what the table test walks).
pub fn status_in_phase(p: PartyStatus, r: PartyStatus, phase: Phase) -> DealStatus {
    use DealStatus as D;
    use PartyStatus::*;
    // "Served" = the side claims the tunnel was up.
    let served = |s: PartyStatus| matches!(s, Active | Completed);
    // 1. A rejection: nothing should have been served; if the other side claims
    //    service, the sides disagree.
    if p == Rejected || r == Rejected {
        let other = if p == Rejected { r } else { p };
        return if served(other) {
            D::Disputed
        } else {
            D::Cancelled
        };
    }
    // 2. A failure ends the deal early, unless the other side says it completed fine.
    if p == Failed || r == Failed {
        let other = if p == Failed { r } else { p };
        return if other == Completed {
            D::Disputed
        } else {
            D::Terminated
        };
    }
    // 3. Someone has not accepted: wait until the accept deadline, then the deal never
    //    started (or, if the other side claims service, disagreement).
    if p == Pending || r == Pending {
        let other = if p == Pending { r } else { p };
        return match phase {
            Phase::Accepting => D::Matched,
            _ if served(other) => D::Disputed,
            _ => D::Cancelled,
        };
    }
    // Both sides are in accepted / active / completed from here on.
    if p == Completed && r == Completed {
        return D::Completed;
    }
    match (served(p), served(r)) {
        // Both accepted, nobody brought the tunnel up: fine until the rental ends,
        // then nothing was delivered.
        (false, false) => match phase {
            Phase::Accepting | Phase::Running => D::Accepted,
            Phase::Settling | Phase::Closed => D::Cancelled,
        },
        // Both say it ran: active until the settle deadline, then silence is agreement.
        (true, true) => match phase {
            Phase::Closed => D::Completed,
            _ => D::Active,
        },
        // One says it ran, the other never confirmed the tunnel: active while there is
        // time to confirm, disagreement after the settle deadline.
        _ => match phase {
            Phase::Closed => D::Disputed,
            _ => D::Active,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PartyStatus::*;

    /// The full table: for each (provider, requester) the expected status in the four
    /// phases Accepting / Running / Settling / Closed, one letter each:
    /// M matched, A accepted, V active, C completed, X cancelled, T terminated,
    /// D disputed. Written by hand from the rules in the module doc, not generated.
    const TABLE: &[(PartyStatus, PartyStatus, &str)] = &[
        (Pending, Pending, "MXXX"),
        (Pending, Accepted, "MXXX"),
        (Pending, Active, "MDDD"),
        (Pending, Completed, "MDDD"),
        (Pending, Failed, "TTTT"),
        (Pending, Rejected, "XXXX"),
        (Accepted, Pending, "MXXX"),
        (Accepted, Accepted, "AAXX"),
        (Accepted, Active, "VVVD"),
        (Accepted, Completed, "VVVD"),
        (Accepted, Failed, "TTTT"),
        (Accepted, Rejected, "XXXX"),
        (Active, Pending, "MDDD"),
        (Active, Accepted, "VVVD"),
        (Active, Active, "VVVC"),
        (Active, Completed, "VVVC"),
        (Active, Failed, "TTTT"),
        (Active, Rejected, "DDDD"),
        (Completed, Pending, "MDDD"),
        (Completed, Accepted, "VVVD"),
        (Completed, Active, "VVVC"),
        (Completed, Completed, "CCCC"),
        (Completed, Failed, "DDDD"),
        (Completed, Rejected, "DDDD"),
        (Failed, Pending, "TTTT"),
        (Failed, Accepted, "TTTT"),
        (Failed, Active, "TTTT"),
        (Failed, Completed, "DDDD"),
        (Failed, Failed, "TTTT"),
        (Failed, Rejected, "XXXX"),
        (Rejected, Pending, "XXXX"),
        (Rejected, Accepted, "XXXX"),
        (Rejected, Active, "DDDD"),
        (Rejected, Completed, "DDDD"),
        (Rejected, Failed, "XXXX"),
        (Rejected, Rejected, "XXXX"),
    ];

    fn letter(s: DealStatus) -> char {
        match s {
            DealStatus::Matched => 'M',
            DealStatus::Accepted => 'A',
            DealStatus::Active => 'V',
            DealStatus::Completed => 'C',
            DealStatus::Cancelled => 'X',
            DealStatus::Terminated => 'T',
            DealStatus::Disputed => 'D',
        }
    }

    #[test]
    fn every_cell_of_the_agreement_table() {
        assert_eq!(TABLE.len(), 36, "6 x 6 party statuses");
        let mut cells = 0;
        for &(p, r, want) in TABLE {
            for (phase, want) in Phase::ALL.iter().zip(want.chars()) {
                let got = letter(status_in_phase(p, r, *phase));
                assert_eq!(got, want, "provider {p:?}, requester {r:?}, {phase:?}");
                cells += 1;
            }
        }
        assert_eq!(cells, 144);
        // And the table covers every pair exactly once.
        for p in PartyStatus::ALL {
            for r in PartyStatus::ALL {
                assert_eq!(
                    TABLE.iter().filter(|(a, b, _)| *a == p && *b == r).count(),
                    1
                );
            }
        }
    }

    #[test]
    fn deadlines_assign_statuses_through_the_clock() {
        let d = Deadlines::new(1_000, 100, 30, 60);
        assert_eq!(
            d,
            Deadlines {
                accept_by: 1_030,
                end: 1_100,
                settle_by: 1_160
            }
        );
        assert_eq!(
            deal_status(Pending, Accepted, 1_029, &d),
            DealStatus::Matched
        );
        assert_eq!(
            deal_status(Pending, Accepted, 1_030, &d),
            DealStatus::Cancelled
        );
        assert_eq!(deal_status(Active, Active, 1_159, &d), DealStatus::Active);
        assert_eq!(
            deal_status(Active, Active, 1_160, &d),
            DealStatus::Completed
        );
        assert_eq!(
            deal_status(Accepted, Accepted, 1_100, &d),
            DealStatus::Cancelled
        );
        assert_eq!(d.next_after(1_000), Some(1_030));
        assert_eq!(d.next_after(1_030), Some(1_100));
        assert_eq!(d.next_after(1_160), None);
    }

    #[test]
    fn short_deals_keep_deadlines_ordered() {
        // A 5-second deal with a 30-second accept window: accept_by is capped at end.
        let d = Deadlines::new(10, 5, 30, 60);
        assert!(d.accept_by <= d.end && d.end <= d.settle_by);
        assert_eq!(d.accept_by, 15);
        let far = Deadlines::new(u64::MAX - 1, 100, 30, 60);
        assert!(far.accept_by <= far.end && far.end <= far.settle_by);
    }
}
