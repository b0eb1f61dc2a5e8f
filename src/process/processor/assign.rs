//! Which input partitions this processor owns: several processes of one pipeline on Kafka share
//! the consumer group `<prefix>.<pipeline>.sync`, and the group's (cooperative) rebalances move
//! partitions between them. The embedded log owns every partition from the start.
//!
//! The consumer records each rebalance as an [`AssignmentEvent`] (during its `recv`); the loop
//! applies them here after every `recv` and before every flush, so:
//! - *Restored before used*: on `Assigned` the ledger catches up with its changelog (every
//!   entry the previous owner recorded) before a record of the new partitions is ingested.
//! - *No half-done work handed over*: on `Revoked` the pending writes of those partitions are
//!   dropped without writing or committing them; the new owner replays them from the group's
//!   committed offsets. A create whose intent is in the ledger is resolved by the new owner by
//!   `SyncKey`, as after a crash. A flush never runs while a revocation is unapplied: librdkafka
//!   calls the rebalance callbacks only inside `recv`, and a flush starts by applying them.
//! - *No commit for another member's partition*: a revoked partition leaves the consumed and
//!   committed maps, and records of partitions not owned (a late record of a revoked one) are
//!   ignored.
//!
//! Lookups (a row's lookup field → another table's row, whose partition may be another
//! member's): a row deferred because its target has no item yet catches the ledger up with the
//! changelog before the next flush, so a target written by another member is found there.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Processor;
use crate::log::{AssignmentEvent, ConsumedRecord, EventLog, LogConsumer};
use crate::process::ProcessError;
use crate::telemetry::metrics as m;

/// A member without partitions for this many session timeouts is reported: one session
/// timeout is how long a dead member keeps its partitions, a second covers the rebalance
/// that follows.
const UNASSIGNED_WARN_SESSIONS: u32 = 2;

/// The processor's share of its input.
#[derive(Debug, Default)]
pub(crate) struct Ownership {
    pub(crate) owned: BTreeSet<(String, i32)>,
    /// Since when the processor has owned nothing (`None` while it owns something).
    unassigned_since: Option<Instant>,
    /// The WARN for the current unassigned stretch was logged.
    warned: bool,
}

impl Ownership {
    pub(crate) fn new() -> Self {
        Ownership {
            unassigned_since: Some(Instant::now()),
            ..Ownership::default()
        }
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Applies the consumer's assignment changes (see the module docs), then checks for a
    /// member left without partitions.
    pub(crate) async fn apply_assignment(
        &mut self,
        consumer: &mut L::Consumer,
    ) -> Result<(), ProcessError> {
        let events = consumer.take_assignment_events();
        let changed = !events.is_empty();
        for event in events {
            self.stats.rebalances += 1;
            match event {
                AssignmentEvent::Assigned(parts) => {
                    let replayed = self.ledger.catch_up().await?;
                    info!(pipeline = %self.cfg.pipeline.name, partitions = ?parts, ledger_replayed = replayed, "input partitions assigned");
                    self.own.owned.extend(parts);
                }
                AssignmentEvent::Revoked(parts) => self.drop_revoked(parts),
            }
        }
        self.stats.assigned_partitions = self.own.owned.len() as u64;
        if changed {
            // The status API shows the share at once, not after the next flush.
            self.send_stats();
        }
        metrics::gauge!(m::PUSH_ASSIGNED_PARTITIONS, "pipeline" => self.cfg.pipeline.name.clone())
            .set(self.own.owned.len() as f64);
        self.watch_unassigned(consumer.group_session_timeout());
        // A row waiting for its lookup target: the target may be another member's row, whose
        // item reached the changelog after this store last read it.
        if consumer.group_session_timeout().is_some()
            && self.pending.values().any(|p| p.deferrals > 0)
        {
            self.ledger.catch_up().await?;
        }
        Ok(())
    }

    /// Whether `rec` is from a partition this processor owns.
    pub(crate) fn owns(&self, rec: &ConsumedRecord) -> bool {
        self.own.owned.contains(&(rec.topic.clone(), rec.partition))
    }

    /// Forgets the pending writes and positions of revoked partitions (the new owner replays
    /// them from the committed offsets).
    fn drop_revoked(&mut self, parts: Vec<(String, i32)>) {
        let revoked: BTreeSet<(String, i32)> = parts.into_iter().collect();
        let before = self.pending.len();
        self.pending
            .retain(|_, p| !p.offsets.keys().any(|tp| revoked.contains(tp)));
        for tp in &revoked {
            self.consumed.remove(tp);
            self.committed.remove(tp);
            self.own.owned.remove(tp);
        }
        info!(
            pipeline = %self.cfg.pipeline.name,
            partitions = ?revoked,
            dropped_pending = before - self.pending.len(),
            "input partitions revoked; their pending writes are left to the new owner"
        );
    }

    /// WARNs once per stretch when the processor has owned no partition for longer than
    /// [`UNASSIGNED_WARN_SESSIONS`] session timeouts (a group member that reads nothing: more
    /// members than partitions, or a broker that kept a dead member's partitions).
    fn watch_unassigned(&mut self, session: Option<Duration>) {
        if self.topics.is_empty() {
            return;
        }
        if let Some(unassigned_for) = self.own.unassigned_warning(session, Instant::now()) {
            warn!(
                pipeline = %self.cfg.pipeline.name,
                ?unassigned_for,
                topics = self.topics.len(),
                "this processor has had no input partition for longer than {UNASSIGNED_WARN_SESSIONS} \
                 session timeouts: more processes than partitions (table_partitions), or the broker \
                 still counts a dead member; it reads nothing until a rebalance gives it some"
            );
        }
    }
}

impl Ownership {
    /// How long nothing has been owned, once per unassigned stretch, when that passed
    /// [`UNASSIGNED_WARN_SESSIONS`] × `session` (`None`: no group, never).
    fn unassigned_warning(&mut self, session: Option<Duration>, now: Instant) -> Option<Duration> {
        if !self.owned.is_empty() {
            self.unassigned_since = None;
            self.warned = false;
            return None;
        }
        let since = *self.unassigned_since.get_or_insert(now);
        let limit = session? * UNASSIGNED_WARN_SESSIONS;
        let for_ = now.saturating_duration_since(since);
        if self.warned || for_ <= limit {
            return None;
        }
        self.warned = true;
        Some(for_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_without_partitions_is_reported_once_per_stretch() {
        let t0 = Instant::now();
        let s = Duration::from_secs(6);
        let mut o = Ownership::default();
        assert_eq!(o.unassigned_warning(Some(s), t0), None);
        assert_eq!(
            o.unassigned_warning(Some(s), t0 + 2 * s),
            None,
            "not before 2 sessions"
        );
        assert_eq!(
            o.unassigned_warning(Some(s), t0 + 2 * s + Duration::from_secs(1)),
            Some(2 * s + Duration::from_secs(1))
        );
        assert_eq!(
            o.unassigned_warning(Some(s), t0 + 5 * s),
            None,
            "once per stretch"
        );
        o.owned.insert(("t".into(), 0));
        assert_eq!(o.unassigned_warning(Some(s), t0 + 6 * s), None);
        o.owned.clear();
        let t1 = t0 + 7 * s;
        assert_eq!(
            o.unassigned_warning(Some(s), t1),
            None,
            "a new stretch starts"
        );
        assert!(o.unassigned_warning(Some(s), t1 + 3 * s).is_some());
        let mut embedded = Ownership::default();
        assert_eq!(embedded.unassigned_warning(None, t0 + 100 * s), None);
    }
}
