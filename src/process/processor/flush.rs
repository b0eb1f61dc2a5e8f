//! One flush end to end, and the offset commit after it.
//!
//! A flush runs the return path's list edits first (they decide conflicts against the pushes
//! pending in the same flush), then the pending rows in two stages (tables that lookups point
//! into first, so their items exist when the rows that reference them are mapped). A stage
//! ([`Processor::flush_keys`]) is a fixed sequence of named steps:
//! 1. plan each row ([`plan`](super::plan)): the writes to send, the intents to record;
//! 2. record the intents (and trivial removals) in the ledger, *before* any write is sent;
//! 3. up to three rounds of: send the writes ([`write`](super::write)), apply each answer to
//!    its row's entry ([`outcome`](super::outcome)), append the round's dead letters, record
//!    the entries of the rows whose step is complete; follow-ups (a move's delete, an adopted
//!    item's update) form the next round;
//! 4. settle: rows whose every step is recorded leave the pending set.
//!
//! Invariants kept here:
//! - *Offsets follow durability* ([`Processor::commit_offsets`]): after a flush an input
//!   offset is committed up to, never past, the lowest offset of any row still pending; rows
//!   leave the pending set only after their ledger entry or dead letter is durable, and offsets
//!   move only after the flush's audit records are (see [`crate::process::audit`]).
//! - *Never two items, never none*: intents are durable before creates are sent, and each step
//!   of a move is recorded before the next one is sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::audit::audited;
use super::outcome::{Answered, Applied};
use super::{Op, Processor};
use crate::graph::GraphError;
use crate::log::{EventLog, LogConsumer};
use crate::process::ProcessError;
use crate::process::audit::AuditRecord;
use crate::process::dlq::DeadLetter;
use crate::process::ledger::Entry;
use crate::telemetry::metrics as m;

/// Rounds of writes per stage: a create, the delete of a moved row's old item, and the update
/// that brings an adopted item up to date. What is left after them waits for the next flush.
const ROUNDS: usize = 3;

/// The working state of one flush stage, shared by its steps.
#[derive(Default)]
pub(super) struct Stage {
    /// Working copies of the rows' ledger entries; a round records those whose step is complete.
    pub(super) entries: HashMap<Vec<u8>, Entry>,
    /// The writes of the next round.
    pub(super) ops: Vec<Op>,
    /// Rows settled without (more) writes: stale, unchanged, dead-lettered, nothing to delete.
    pub(super) done: Vec<Vec<u8>>,
    /// Dead letters not yet handed to the guard.
    pub(super) dead: Vec<DeadLetter>,
    /// Rows of this stage that were dead-lettered (the others that settle are successes).
    pub(super) dead_rows: usize,
    /// Ledger changes to make durable before any write is sent (intents, fields in flight).
    pub(super) intents: Vec<(Vec<u8>, Option<Entry>)>,
    /// Audit records of the planning (skips), buffered once the intents are recorded.
    pub(super) audit: Vec<AuditRecord>,
    /// The first retryable failure; reported once everything else is recorded.
    pub(super) transient: Option<String>,
    /// Rows whose write is not settled: they stay pending and their step is not recorded.
    pub(super) unfinished: HashSet<Vec<u8>>,
}

impl<L: EventLog + 'static> Processor<L> {
    /// Flushes until it succeeds (retryable failures back off), then commits offsets. On
    /// shutdown a retryable failure stops retrying: the uncommitted events replay on restart.
    pub(crate) async fn flush_with_retry(
        &mut self,
        consumer: &mut L::Consumer,
        pulls: &mut Option<L::Consumer>,
        shutdown: &CancellationToken,
    ) -> Result<(), ProcessError> {
        // A revocation recorded during the last `recv` drops its rows before anything is
        // written (see `assign`).
        self.apply_assignment(consumer).await?;
        let mut delay = Duration::from_millis(200);
        loop {
            // The audit records of decisions that changed no entry (skips, dead letters) go
            // out with the flush; the others went with the ledger commits they describe.
            let flushed = match self.flush().await {
                Ok(()) => self.ledger.flush_audit().await.map_err(ProcessError::from),
                Err(e) => Err(e),
            };
            match flushed {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    if shutdown.is_cancelled() {
                        warn!("flush failed while draining ({e}); the rest replays on restart");
                        break;
                    }
                    warn!(retry_in = ?delay, "flush incomplete, retrying: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
        // Never an offset past a decision whose audit record is not durable.
        self.ledger.flush_audit().await?;
        self.commit_offsets(consumer).await?;
        if let Some(c) = pulls {
            self.commit_pull_offsets(c).await?;
        }
        Ok(())
    }

    /// Commits the return stream's offsets up to the oldest list change still pending.
    pub(crate) async fn commit_pull_offsets(
        &mut self,
        consumer: &mut L::Consumer,
    ) -> Result<(), ProcessError> {
        let floor = lowest(
            self.pulls
                .values()
                .map(|p| ((p.topic.clone(), 0), p.offset)),
        );
        commit_up_to(
            consumer,
            &self.pull_consumed,
            &floor,
            &mut self.pull_committed,
        )
        .await
    }

    /// Commits each input partition up to what was consumed, but never past the lowest offset
    /// merged into a row that is still pending, nor past a paused table's first held record
    /// (*offsets follow durability*).
    pub(crate) async fn commit_offsets(
        &mut self,
        consumer: &mut L::Consumer,
    ) -> Result<(), ProcessError> {
        let pending = self.pending.values().flat_map(|p| p.offsets.iter());
        let held = self.held_positions();
        let floor = lowest(
            pending
                .map(|(tp, off)| (tp.clone(), *off))
                .chain(held)
                .chain(self.schema.held()),
        );
        commit_up_to(consumer, &self.consumed, &floor, &mut self.committed).await?;
        // Set on every commit round, even one that had nothing to move: "the processor is alive
        // and caught up" and "stalled" must look different.
        metrics::gauge!(m::PUSH_LAST_COMMIT_TIMESTAMP, "pipeline" => self.cfg.pipeline.name.clone())
            .set(crate::telemetry::unix_seconds());
        Ok(())
    }

    /// One flush: list edits, then the pending rows stage by stage. A retryable failure of one
    /// part does not stop the others; the first is reported after all have run.
    pub(crate) async fn flush(&mut self) -> Result<(), ProcessError> {
        self.release_quiet().await?;
        if self.pending.is_empty() && self.pulls.is_empty() {
            self.send_stats();
            return Ok(());
        }
        // Deletes the accidental-delete guard holds stay pending, unwritten (see `deletes`).
        let held = self.gate_deletes().await?;
        self.stats.flushes += 1;
        let started = Instant::now();
        let mut transient: Option<String> = None;
        // List edits first: they decide conflicts against the pushes pending in this flush.
        if let Err(e) = self.flush_pulls().await {
            if e.is_retryable() {
                transient.get_or_insert(e.to_string());
            } else {
                return Err(e);
            }
        }
        for stage in 0..=1u8 {
            let keys: Vec<Vec<u8>> = self
                .pending
                .iter()
                .filter(|(k, p)| self.tables[p.table].stage == stage && !held.contains(*k))
                .map(|(k, _)| k.clone())
                .collect();
            if keys.is_empty() {
                continue;
            }
            if let Err(e) = self.flush_keys(keys).await {
                if e.is_retryable() {
                    transient.get_or_insert(e.to_string());
                } else {
                    return Err(e);
                }
            }
        }
        metrics::histogram!(m::PUSH_FLUSH_SECONDS, "pipeline" => self.cfg.pipeline.name.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!(m::PUSH_PENDING_ROWS, "pipeline" => self.cfg.pipeline.name.clone())
            .set(self.pending.len() as f64);
        self.send_stats();
        match transient {
            None => Ok(()),
            Some(msg) => Err(ProcessError::Graph(GraphError::Transient {
                status: None,
                message: msg,
                request_id: None,
            })),
        }
    }

    /// One stage of a flush: plan, record intents, write, record outcomes (see the module docs).
    pub(crate) async fn flush_keys(&mut self, keys: Vec<Vec<u8>>) -> Result<(), ProcessError> {
        let mut stage = Stage::default();
        for k in keys {
            self.plan_row(&mut stage, k).await?;
        }
        // Intents (and trivial removals) are durable before any create is sent.
        self.ledger
            .commit(std::mem::take(&mut stage.intents))
            .await?;
        for r in std::mem::take(&mut stage.audit) {
            self.ledger.audit(r);
        }
        self.failpoints.hit("push.after_intent");
        let mut round = 0;
        while !stage.ops.is_empty() && round < ROUNDS {
            round += 1;
            self.write_round(&mut stage).await?;
        }
        self.settle(stage).await
    }

    /// Sends the stage's writes, applies each answer to its row's entry, then records the
    /// round: its dead letters, then the entries of the rows whose step is complete. Each step
    /// is recorded before the next one is sent (move: create recorded, then delete).
    async fn write_round(&mut self, stage: &mut Stage) -> Result<(), ProcessError> {
        let ops = std::mem::take(&mut stage.ops);
        let outcomes = self.execute(&ops).await;
        self.failpoints.hit("push.after_graph");
        let mut next: Vec<Op> = Vec::new();
        let mut touched: HashSet<Vec<u8>> = HashSet::new();
        for (op, (outcome, trace)) in ops.into_iter().zip(outcomes) {
            let k = op.key.clone();
            touched.insert(k.clone());
            let Some(p) = self.pending.get(&k).cloned() else {
                continue;
            };
            let table = self.tables[p.table].table.clone();
            let audited = audited(&op.kind, &outcome);
            let mut answered = Answered {
                key: &k,
                pending: &p,
                table: &table,
                entry: stage.entries.entry(k.clone()).or_default(),
                next: &mut next,
                now_ms: chrono::Utc::now().timestamp_millis(),
            };
            match self.apply_outcome(&mut answered, op.kind, outcome).await? {
                Applied::Recorded => {
                    if let Some(a) = audited {
                        // Buffered: the round's ledger commit appends it first.
                        self.audit_write(&table, &p, &stage.entries[&k], a, trace);
                    }
                }
                Applied::Unfinished(why) => {
                    stage.transient.get_or_insert(why);
                    stage.unfinished.insert(k);
                }
                Applied::Dead(d) => {
                    stage.dead.push(*d);
                    stage.dead_rows += 1;
                }
            }
        }
        let step: Vec<(Vec<u8>, Option<Entry>)> = touched
            .iter()
            .filter(|k| !stage.unfinished.contains(*k))
            .filter_map(|k| {
                stage
                    .entries
                    .get(k)
                    .map(|e| (k.clone(), Some(e.clone()).filter(|e| !e.is_empty())))
            })
            .collect();
        self.dead_letter_push(std::mem::take(&mut stage.dead))
            .await?;
        self.ledger.commit(step).await?;
        self.fill_system_fields().await?;
        stage.ops = next;
        Ok(())
    }

    /// Ends a stage: the remaining dead letters go to the guard (held until durable, see
    /// [`dead_letters`](super::dead_letters)); rows whose every step is recorded, and rows
    /// settled without a write, leave the pending set, and those without a dead letter count as
    /// successes for the guard. Rows with work left (an open intent, an old item to delete, an
    /// unsettled write) stay; the retry replans them.
    async fn settle(&mut self, stage: Stage) -> Result<(), ProcessError> {
        self.dead_letter_push(stage.dead).await?;
        let mut settled: usize = 0;
        for (k, e) in &stage.entries {
            let finished =
                !stage.unfinished.contains(k) && e.intent.is_none() && e.pending_delete.is_none();
            let dead_or_done = stage.done.contains(k);
            if (finished || dead_or_done) && self.pending.remove(k).is_some() {
                settled += 1;
            }
        }
        for k in &stage.done {
            if self.pending.remove(k).is_some() {
                settled += 1;
            }
        }
        self.settled_ok(settled.saturating_sub(stage.dead_rows))
            .await?;
        match stage.transient {
            None => Ok(()),
            Some(message) => Err(ProcessError::Graph(GraphError::Transient {
                status: None,
                message,
                request_id: None,
            })),
        }
    }
}

/// Offsets by (topic, partition).
type Offsets = BTreeMap<(String, i32), i64>;

/// The lowest offset per (topic, partition).
fn lowest(offsets: impl Iterator<Item = ((String, i32), i64)>) -> Offsets {
    let mut floor = Offsets::new();
    for (tp, off) in offsets {
        let e = floor.entry(tp).or_insert(off);
        *e = (*e).min(off);
    }
    floor
}

/// Commits each partition up to what was `consumed`, but never past its `floor` (the lowest
/// offset pending work still holds); `committed` remembers what was committed, so a partition
/// is only committed when its target moved forward.
async fn commit_up_to<C: LogConsumer>(
    consumer: &mut C,
    consumed: &Offsets,
    floor: &Offsets,
    committed: &mut Offsets,
) -> Result<(), ProcessError> {
    for (tp, next) in consumed {
        let target = floor.get(tp).map_or(*next, |f| (*f).min(*next));
        if committed.get(tp).is_none_or(|c| *c < target) {
            consumer.commit(&tp.0, tp.1, target).await?;
            committed.insert(tp.clone(), target);
        }
    }
    Ok(())
}
