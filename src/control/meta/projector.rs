//! The projector: reads a pipeline's runs topic and writes `syncbridge_meta.runs`.
//!
//! Invariant: a record's effect and the projector's position are committed in one transaction,
//! and a run's row only ever moves to a higher `seq`, so a record read twice (a restart, a
//! duplicate append) changes nothing. The position lives in `syncbridge_meta.projector_offsets`,
//! not in the consumer group (which never commits and so always starts at the earliest record):
//! when the schema is dropped, the next start projects the whole topic again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::runs::{RunEvent, RunStatus, append_event};
use super::{MetaDb, MetaError, now_ms};
use crate::log::{ConsumedRecord, EventLog, LogConsumer};
use crate::telemetry::metrics as m;

/// How long a stopping projector keeps reading to project the events appended while draining.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause before retrying a record the database refused for a transient reason.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A running run whose last event is older than this (three missed heartbeats) belongs to a
/// process that ended, when another process might be running the pipeline (Kafka).
const ORPHAN_AFTER_MS: i64 = 3 * super::runs::STREAM_UPDATE_INTERVAL.as_millis() as i64;

/// The consumer group of a pipeline's projector (it never commits; see the module docs). With
/// `shared_log` (Kafka: several processes may run the pipeline) each process has a group of its
/// own: in one group they would split the partitions and a process's projector could be left
/// with none. Every projector then writes every event; the projection is idempotent.
pub fn projector_group(pipeline: &str, shared_log: bool) -> String {
    if shared_log {
        format!(
            "{pipeline}.meta-projector.{}",
            uuid::Uuid::new_v4().simple()
        )
    } else {
        format!("{pipeline}.meta-projector")
    }
}

/// Projects one runs topic. Its [`MetaDb`] must be its own (see [`Projector::open`]).
#[derive(Debug)]
pub struct Projector<L: EventLog> {
    log: Arc<L>,
    topic: String,
    pipeline: String,
    db: Arc<MetaDb>,
    consumer: L::Consumer,
    consumer_stop: CancellationToken,
    /// Next offset to apply per partition (from the meta-store).
    applied: BTreeMap<i32, i64>,
    pub projected: u64,
}

impl<L: EventLog> Projector<L> {
    /// Opens the consumer and reads the stored positions. `db` must not be shared with other
    /// users: each record is applied between `BEGIN` and `COMMIT` on its connection.
    pub async fn open(
        log: Arc<L>,
        topic: String,
        pipeline: &str,
        db: Arc<MetaDb>,
        shared_log: bool,
    ) -> Result<Self, MetaError> {
        let consumer_stop = CancellationToken::new();
        let consumer = log
            .consumer(
                &projector_group(pipeline, shared_log),
                std::slice::from_ref(&topic),
                consumer_stop.clone(),
            )
            .await?;
        let client = db.client().await?;
        let rows = client
            .query(
                "SELECT partition, next_offset FROM syncbridge_meta.projector_offsets \
                 WHERE topic = $1",
                &[&topic],
            )
            .await?;
        let applied = rows
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1)))
            .collect();
        Ok(Self {
            log,
            topic,
            pipeline: pipeline.to_string(),
            db,
            consumer,
            consumer_stop,
            applied,
            projected: 0,
        })
    }

    /// Reads until every record appended before the call is applied (or `timeout` passed).
    pub async fn catch_up(&mut self, timeout: Duration) -> Result<(), MetaError> {
        let ends = self.log.end_offsets(&self.topic).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let behind = ends.iter().enumerate().any(|(p, end)| {
                let p = i32::try_from(p).unwrap_or(i32::MAX);
                self.applied.get(&p).copied().unwrap_or(0) < *end
            });
            if !behind {
                return Ok(());
            }
            let rec = tokio::select! {
                r = self.consumer.recv() => r?,
                () = tokio::time::sleep_until(deadline) => {
                    warn!(topic = %self.topic, "projector did not catch up in {timeout:?}");
                    return Ok(());
                }
            };
            match rec {
                Some(rec) => self.apply_retrying(rec, None).await?,
                None => return Ok(()),
            }
        }
    }

    /// Projects until `stop`, then for a while longer what was appended before it (the final
    /// events of the runs that ended while draining). With `sweep` (a log other processes of
    /// the pipeline may share), runs whose process stopped sending heartbeats are marked failed
    /// every [`STREAM_UPDATE_INTERVAL`](super::runs::STREAM_UPDATE_INTERVAL) too: a process that
    /// died is seen while its peers run, not only by the next start. Two peers marking the same
    /// run append events with the same `seq`; the projection keeps the first.
    pub async fn run(mut self, stop: CancellationToken, sweep: bool) -> Result<u64, MetaError> {
        let mut tick = tokio::time::interval(super::runs::STREAM_UPDATE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let rec = tokio::select! {
                r = self.consumer.recv() => r?,
                () = stop.cancelled() => break,
                _ = tick.tick(), if sweep => {
                    if let Err(e) = fail_orphans(&*self.log, &self.topic, &self.db, &self.pipeline, false).await {
                        warn!(pipeline = %self.pipeline, "looking for runs of ended processes failed: {e}");
                    }
                    continue;
                }
            };
            match rec {
                Some(rec) => self.apply_retrying(rec, Some(&stop)).await?,
                None => break,
            }
        }
        self.catch_up(DRAIN_TIMEOUT).await?;
        self.consumer_stop.cancel();
        info!(topic = %self.topic, projected = self.projected, "run projector stopped");
        Ok(self.projected)
    }

    /// Applies one record, retrying transient database failures (until `stop`, if given).
    async fn apply_retrying(
        &mut self,
        rec: ConsumedRecord,
        stop: Option<&CancellationToken>,
    ) -> Result<(), MetaError> {
        loop {
            match self.apply(&rec).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    metrics::counter!(m::META_PROJECT_ERRORS_TOTAL, "pipeline" => self.pipeline.clone())
                        .increment(1);
                    warn!(topic = %self.topic, offset = rec.offset, "projecting a run event failed, retrying: {e}");
                    if stop.is_some_and(CancellationToken::is_cancelled) {
                        return Err(e);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn apply(&mut self, rec: &ConsumedRecord) -> Result<(), MetaError> {
        if rec.offset < self.applied.get(&rec.partition).copied().unwrap_or(0) {
            return Ok(());
        }
        let event = match rec.record.value.as_deref().map(RunEvent::decode) {
            Some(Ok(e)) => Some(e),
            Some(Err(e)) => {
                // Not ours to fix: skip it (the offset still moves) rather than stall the history.
                warn!(topic = %self.topic, offset = rec.offset, "skipping an undecodable run event: {e}");
                None
            }
            None => None,
        };
        let client = self.db.client().await?;
        let next = rec.offset + 1;
        client.batch_execute("BEGIN").await?;
        let result = async {
            if let Some(e) = &event {
                upsert(&client, e).await?;
            }
            client
                .execute(
                    "INSERT INTO syncbridge_meta.projector_offsets (topic, partition, next_offset) \
                     VALUES ($1, $2, $3) ON CONFLICT (topic, partition) \
                     DO UPDATE SET next_offset = \
                     GREATEST(syncbridge_meta.projector_offsets.next_offset, EXCLUDED.next_offset)",
                    &[&self.topic, &rec.partition, &next],
                )
                .await?;
            client.batch_execute("COMMIT").await?;
            Ok::<_, MetaError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        self.applied.insert(rec.partition, next);
        self.projected += 1;
        metrics::counter!(m::META_EVENTS_PROJECTED_TOTAL, "pipeline" => self.pipeline.clone())
            .increment(1);
        Ok(())
    }
}

/// Writes `e` unless the row already holds this or a later event of the run.
async fn upsert(client: &tokio_postgres::Client, e: &RunEvent) -> Result<(), MetaError> {
    let counts = serde_json::to_value(&e.counts).map_err(|x| MetaError::Decode(x.to_string()))?;
    let errors = serde_json::to_value(&e.errors).map_err(|x| MetaError::Decode(x.to_string()))?;
    let seq = i64::try_from(e.seq).unwrap_or(i64::MAX);
    client
        .execute(
            "INSERT INTO syncbridge_meta.runs (run_id, pipeline, kind, status, started_ms, \
             ended_ms, updated_ms, seq, event_id, owner, reason, counts, errors, subject, \
             requested_by, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
             ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, \
             ended_ms = EXCLUDED.ended_ms, updated_ms = EXCLUDED.updated_ms, seq = EXCLUDED.seq, \
             event_id = EXCLUDED.event_id, reason = EXCLUDED.reason, counts = EXCLUDED.counts, \
             errors = EXCLUDED.errors, requested_by = EXCLUDED.requested_by, \
             detail = EXCLUDED.detail WHERE syncbridge_meta.runs.seq < EXCLUDED.seq",
            &[
                &e.run_id,
                &e.pipeline,
                &e.kind.as_str(),
                &e.status.as_str(),
                &e.started_ms,
                &e.ended_ms,
                &e.updated_ms,
                &seq,
                &e.event_id,
                &e.owner,
                &e.reason,
                &counts,
                &errors,
                &e.subject,
                &e.by,
                &e.detail,
            ],
        )
        .await?;
    Ok(())
}

/// Marks failed (reason "process ended") the runs of `pipeline` that the projection shows
/// running but whose process is gone: every one when this process holds the pipeline alone (the
/// embedded log is locked to one process), else those without a heartbeat for
/// [`ORPHAN_AFTER_MS`]. The failure is appended to the log like any event; the projector writes
/// it. Call after [`Projector::catch_up`]. Returns the runs marked.
pub async fn fail_orphans<L: EventLog>(
    log: &L,
    topic: &str,
    db: &MetaDb,
    pipeline: &str,
    exclusive: bool,
) -> Result<usize, MetaError> {
    let client = db.client().await?;
    let stale_before = if exclusive {
        i64::MAX
    } else {
        now_ms() - ORPHAN_AFTER_MS
    };
    let rows = client
        .query(
            &format!(
                "SELECT {RUN_COLUMNS} FROM syncbridge_meta.runs \
                 WHERE pipeline = $1 AND status = 'running' AND updated_ms < $2"
            ),
            &[&pipeline, &stale_before],
        )
        .await?;
    let mut marked = 0;
    for row in rows {
        let last = event_from_row(&row)?;
        let mut failed = last.next();
        failed.status = RunStatus::Failed;
        // It ended some time after its last heartbeat; that is the last moment known.
        failed.ended_ms = Some(last.updated_ms);
        failed.reason = Some("process ended".into());
        failed.errors.push(super::runs::RunError {
            at_ms: failed.updated_ms,
            message: "process ended (marked by the next start)".into(),
        });
        append_event(log, topic, &failed).await?;
        warn!(pipeline, run = %last.run_id, owner = %last.owner, "a run left running by a process that ended is marked failed");
        marked += 1;
    }
    Ok(marked)
}

/// The columns [`event_from_row`] reads, in order.
pub(crate) const RUN_COLUMNS: &str = "run_id, pipeline, kind, status, started_ms, ended_ms, \
     updated_ms, seq, event_id, owner, reason, counts, errors, subject, requested_by, detail";

/// A projected row back into the event that made it.
pub(crate) fn event_from_row(row: &tokio_postgres::Row) -> Result<RunEvent, MetaError> {
    let value = serde_json::json!({
        "run_id": row.get::<_, uuid::Uuid>(0),
        "pipeline": row.get::<_, String>(1),
        "kind": row.get::<_, String>(2),
        "status": row.get::<_, String>(3),
        "started_ms": row.get::<_, i64>(4),
        "ended_ms": row.get::<_, Option<i64>>(5),
        "updated_ms": row.get::<_, i64>(6),
        "seq": row.get::<_, i64>(7),
        "event_id": row.get::<_, uuid::Uuid>(8),
        "owner": row.get::<_, String>(9),
        "reason": row.get::<_, Option<String>>(10),
        "counts": row.get::<_, serde_json::Value>(11),
        "errors": row.get::<_, serde_json::Value>(12),
        "subject": row.get::<_, Option<String>>(13),
        "by": row.get::<_, Option<String>>(14),
        "detail": row.get::<_, Option<serde_json::Value>>(15),
    });
    serde_json::from_value(value).map_err(|e| MetaError::Decode(e.to_string()))
}
