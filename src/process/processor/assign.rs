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
        for event in consumer.take_assignment_events() {
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
        let own = &mut self.own;
        if !own.owned.is_empty() {
            own.unassigned_since = None;
            own.warned = false;
            return;
        }
        let since = *own.unassigned_since.get_or_insert_with(Instant::now);
        let Some(session) = session else { return };
        let limit = session * UNASSIGNED_WARN_SESSIONS;
        if !own.warned && since.elapsed() > limit && !self.topics.is_empty() {
            own.warned = true;
            warn!(
                pipeline = %self.cfg.pipeline.name,
                unassigned_for = ?since.elapsed(),
                topics = self.topics.len(),
                "this processor has had no input partition for longer than {UNASSIGNED_WARN_SESSIONS} \
                 session timeouts: more processes than partitions (table_partitions), or the broker \
                 still counts a dead member; it reads nothing until a rebalance gives it some"
            );
        }
    }
}
