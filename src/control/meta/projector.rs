//! The projectors: one reads a pipeline's runs topic and writes `syncbridge_meta.runs`, another
//! its audit topic (`crate::process::audit`) into `syncbridge_meta.audit`, a third its drift
//! topic into the drift report tables (`super::drift`) ([`Projection`]).
//!
//! Invariant: a batch of records' effects and the projector's position are committed in one
//! transaction; a run's row only ever moves to a higher `seq` and an audit row is inserted once
//! per `event_id`, so a record read twice (a restart, a duplicate append) changes nothing. The
//! position lives in `syncbridge_meta.projector_offsets`, not in the consumer group (which never
//! commits and so always starts at the earliest record): when the schema is dropped, the next
//! start projects the whole topic again.
//!
//! The audit projector also applies `control.audit_retention`: every [`PRUNE_INTERVAL`] it
//! deletes the pipeline's older records in bounded chunks ([`PRUNE_CHUNK`] rows per statement),
//! so pruning never holds long locks or starves the projection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use futures::FutureExt;

use super::runs::{RunEvent, RunStatus, append_event};
use super::{MetaDb, MetaError, now_ms};
use crate::log::{ConsumedRecord, EventLog, LogConsumer};
use crate::process::audit::AuditRecord;
use crate::telemetry::metrics as m;

/// How long a stopping projector keeps reading to project the events appended while draining.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause before retrying a record the database refused for a transient reason.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Most records applied in one transaction: a burst of audit records (one per row a flush
/// wrote) costs one round of statements, and a transaction stays short.
const MAX_BATCH: usize = 500;

/// How often the audit projector prunes records older than `control.audit_retention`: the
/// retention is days, so a few minutes of extra age is irrelevant, and a rare prune costs little.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

/// Rows one pruning `DELETE` removes at most: small enough for a short statement, large enough
/// that a day of a busy pipeline's records goes in a few hundred statements.
pub const PRUNE_CHUNK: i64 = 5_000;

/// Chunks one prune deletes at most before the projector gets back to projecting; the rest is
/// deleted at the next interval.
const PRUNE_MAX_CHUNKS: usize = 200;

/// What a projector writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Run events into `syncbridge_meta.runs`.
    Runs,
    /// Audit records into `syncbridge_meta.audit`.
    Audit,
    /// Drift reports into `syncbridge_meta.drift_reports` and `drift_differences`.
    Drift,
}

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

/// Projects one runs or audit topic. Its [`MetaDb`] must be its own (see [`Projector::open`]).
#[derive(Debug)]
pub struct Projector<L: EventLog> {
    log: Arc<L>,
    topic: String,
    pipeline: String,
    projection: Projection,
    /// Audit records older than this are pruned (audit projector only).
    retention: Option<Duration>,
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
        projection: Projection,
    ) -> Result<Self, MetaError> {
        let consumer_stop = CancellationToken::new();
        let mut group = projector_group(pipeline, shared_log);
        match projection {
            Projection::Runs => {}
            Projection::Audit => group.push_str(".audit"),
            Projection::Drift => group.push_str(".drift"),
        }
        let consumer = log
            .consumer(&group, std::slice::from_ref(&topic), consumer_stop.clone())
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
            projection,
            retention: None,
            db,
            consumer,
            consumer_stop,
            applied,
            projected: 0,
        })
    }

    /// Prunes audit records older than `retention` (see the module docs).
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
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
                Some(rec) => {
                    let batch = self.gather(rec)?;
                    self.apply_retrying(batch, None).await?;
                }
                None => return Ok(()),
            }
        }
    }

    /// `first` and the records the consumer already holds behind it, up to [`MAX_BATCH`].
    /// (`recv` is cancel-safe: a record is handed out only by the poll that returns it.)
    fn gather(&mut self, first: ConsumedRecord) -> Result<Vec<ConsumedRecord>, MetaError> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.consumer.recv().now_or_never() {
                Some(Ok(Some(rec))) => batch.push(rec),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(None)) | None => break,
            }
        }
        Ok(batch)
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
        // The first prune comes right at start (a process down for days has work waiting).
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retention = self.retention;
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
                _ = prune.tick(), if retention.is_some() => {
                    if let Some(r) = retention
                        && let Err(e) = prune_audit(&self.db, &self.pipeline, r, &stop).await
                    {
                        warn!(pipeline = %self.pipeline, "pruning old audit records failed (retried at the next interval): {e}");
                    }
                    continue;
                }
            };
            match rec {
                Some(rec) => {
                    let batch = self.gather(rec)?;
                    self.apply_retrying(batch, Some(&stop)).await?;
                }
                None => break,
            }
        }
        self.catch_up(DRAIN_TIMEOUT).await?;
        self.consumer_stop.cancel();
        info!(topic = %self.topic, projected = self.projected, "projector stopped");
        Ok(self.projected)
    }

    /// Applies a batch of records, retrying transient database failures (until `stop`, if
    /// given).
    async fn apply_retrying(
        &mut self,
        batch: Vec<ConsumedRecord>,
        stop: Option<&CancellationToken>,
    ) -> Result<(), MetaError> {
        loop {
            match self.apply(&batch).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    metrics::counter!(m::META_PROJECT_ERRORS_TOTAL, "pipeline" => self.pipeline.clone())
                        .increment(1);
                    warn!(topic = %self.topic, offset = batch[0].offset, "projecting failed, retrying: {e}");
                    if stop.is_some_and(CancellationToken::is_cancelled) {
                        return Err(e);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn apply(&mut self, batch: &[ConsumedRecord]) -> Result<(), MetaError> {
        let fresh: Vec<&ConsumedRecord> = batch
            .iter()
            .filter(|r| r.offset >= self.applied.get(&r.partition).copied().unwrap_or(0))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        // Next offset per partition once the batch is applied.
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for r in &fresh {
            let n = next.entry(r.partition).or_insert(0);
            *n = (*n).max(r.offset + 1);
        }
        let client = self.db.client().await?;
        client.batch_execute("BEGIN").await?;
        let result = async {
            let written = match self.projection {
                Projection::Runs => {
                    let events = decode_all(&self.topic, &fresh, |_, b| RunEvent::decode(b));
                    for e in &events {
                        upsert(&client, e).await?;
                    }
                    events.len()
                }
                Projection::Audit => {
                    let records = decode_all(&self.topic, &fresh, |rec, b| {
                        AuditRecord::decode(b)
                            .map(|a| (a, rec.partition, rec.offset))
                            .map_err(|e| MetaError::Decode(e.to_string()))
                    });
                    insert_audit(&client, &records).await?;
                    records.len()
                }
                Projection::Drift => {
                    let records =
                        decode_all(&self.topic, &fresh, |_, b| super::drift::DriftRecord::decode(b));
                    super::drift::project(&client, &records).await?;
                    records.len()
                }
            };
            for (partition, n) in &next {
                client
                    .execute(
                        "INSERT INTO syncbridge_meta.projector_offsets (topic, partition, next_offset) \
                         VALUES ($1, $2, $3) ON CONFLICT (topic, partition) \
                         DO UPDATE SET next_offset = \
                         GREATEST(syncbridge_meta.projector_offsets.next_offset, EXCLUDED.next_offset)",
                        &[&self.topic, partition, n],
                    )
                    .await?;
            }
            client.batch_execute("COMMIT").await?;
            Ok::<_, MetaError>(written)
        }
        .await;
        let written = match result {
            Ok(w) => w as u64,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        self.applied.extend(next);
        self.projected += fresh.len() as u64;
        let counter = match self.projection {
            Projection::Runs | Projection::Drift => m::META_EVENTS_PROJECTED_TOTAL,
            Projection::Audit => m::META_AUDIT_PROJECTED_TOTAL,
        };
        metrics::counter!(counter, "pipeline" => self.pipeline.clone()).increment(written);
        Ok(())
    }
}

/// The decodable values of `records`; an undecodable one is skipped with a warning (not ours to
/// fix: its offset still moves rather than stall the history), a tombstone silently.
fn decode_all<T>(
    topic: &str,
    records: &[&ConsumedRecord],
    decode: impl Fn(&ConsumedRecord, &[u8]) -> Result<T, MetaError>,
) -> Vec<T> {
    records
        .iter()
        .filter_map(
            |rec| match rec.record.value.as_deref().map(|v| decode(rec, v)) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    warn!(
                        topic,
                        offset = rec.offset,
                        "skipping an undecodable record: {e}"
                    );
                    None
                }
                None => None,
            },
        )
        .collect()
}

/// Inserts audit records with their log positions (one statement for the batch); a record
/// already there (same `event_id`: read twice, or appended twice) is left as it is.
async fn insert_audit(
    client: &tokio_postgres::Client,
    records: &[(AuditRecord, i32, i64)],
) -> Result<(), MetaError> {
    if records.is_empty() {
        return Ok(());
    }
    let c = AuditColumns::of(records);
    client
        .execute(
            "INSERT INTO syncbridge_meta.audit (event_id, pipeline, table_name, row_key, \
             operation, list_id, item_id, content_hash, lsn, source_topic, source_partition, \
             source_offset, request_id, client_request_id, http_status, etag, detail, at_ms, \
             log_partition, log_offset) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[], $11::int[], \
             $12::bigint[], $13::text[], $14::text[], $15::int[], $16::text[], $17::text[], \
             $18::bigint[], $19::int[], $20::bigint[]) ON CONFLICT (event_id) DO NOTHING",
            &[
                &c.event_id,
                &c.pipeline,
                &c.table,
                &c.key,
                &c.operation,
                &c.list_id,
                &c.item_id,
                &c.hash,
                &c.lsn,
                &c.source_topic,
                &c.source_partition,
                &c.source_offset,
                &c.request_id,
                &c.client_request_id,
                &c.status,
                &c.etag,
                &c.detail,
                &c.at_ms,
                &c.log_partition,
                &c.log_offset,
            ],
        )
        .await?;
    Ok(())
}

/// Audit records column by column, for `UNNEST`.
#[derive(Default)]
struct AuditColumns {
    event_id: Vec<uuid::Uuid>,
    pipeline: Vec<String>,
    table: Vec<String>,
    key: Vec<String>,
    operation: Vec<&'static str>,
    list_id: Vec<Option<String>>,
    item_id: Vec<Option<String>>,
    hash: Vec<Option<String>>,
    lsn: Vec<Option<i64>>,
    source_topic: Vec<Option<String>>,
    source_partition: Vec<Option<i32>>,
    source_offset: Vec<Option<i64>>,
    request_id: Vec<Option<String>>,
    client_request_id: Vec<Option<String>>,
    status: Vec<Option<i32>>,
    etag: Vec<Option<String>>,
    detail: Vec<Option<String>>,
    at_ms: Vec<i64>,
    log_partition: Vec<i32>,
    log_offset: Vec<i64>,
}

impl AuditColumns {
    fn of(records: &[(AuditRecord, i32, i64)]) -> Self {
        let mut c = AuditColumns::default();
        for (r, partition, offset) in records {
            c.log_partition.push(*partition);
            c.log_offset.push(*offset);
            c.event_id.push(r.event_id);
            c.pipeline.push(r.pipeline.clone());
            c.table.push(r.table.clone());
            c.key.push(r.key.clone());
            c.operation.push(r.operation.as_str());
            c.list_id.push(r.list_id.clone());
            c.item_id.push(r.item_id.clone());
            c.hash.push(r.hash.clone());
            c.lsn
                .push(r.lsn.map(|l| i64::try_from(l).unwrap_or(i64::MAX)));
            c.source_topic
                .push(r.source.as_ref().map(|s| s.topic.clone()));
            c.source_partition
                .push(r.source.as_ref().map(|s| s.partition));
            c.source_offset.push(r.source.as_ref().map(|s| s.offset));
            c.request_id.push(r.graph.request_id.clone());
            c.client_request_id.push(r.graph.client_request_id.clone());
            c.status.push(r.graph.status.map(i32::from));
            c.etag.push(r.etag.clone());
            c.detail.push(r.detail.clone());
            c.at_ms.push(r.at_ms);
        }
        c
    }
}

/// Deletes `pipeline`'s audit records older than `retention`, [`PRUNE_CHUNK`] rows per
/// statement, at most [`PRUNE_MAX_CHUNKS`] statements (or until `stop`). Returns the rows deleted.
pub async fn prune_audit(
    db: &MetaDb,
    pipeline: &str,
    retention: Duration,
    stop: &CancellationToken,
) -> Result<u64, MetaError> {
    let cutoff = now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
    let client = db.client().await?;
    let mut deleted = 0;
    for _ in 0..PRUNE_MAX_CHUNKS {
        let n = client
            .execute(
                "DELETE FROM syncbridge_meta.audit WHERE event_id IN (SELECT event_id \
                 FROM syncbridge_meta.audit WHERE pipeline = $1 AND at_ms < $2 LIMIT $3)",
                &[&pipeline, &cutoff, &PRUNE_CHUNK],
            )
            .await?;
        deleted += n;
        if n < PRUNE_CHUNK as u64 || stop.is_cancelled() {
            break;
        }
    }
    if deleted > 0 {
        info!(
            pipeline,
            deleted, "pruned audit records older than control.audit_retention"
        );
    }
    Ok(deleted)
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
