//! The streaming phase of a session: read pgoutput messages, assemble committed transactions,
//! hand them in batches to the sink task, and serve re-snapshot requests and chunks in between.
//!
//! Invariant: the slot's applied LSN ([`Acks::ack`]) only moves to an LSN whose events, and all
//! before them, are durable: a batch's tag reported by the sink task (in order), or an event-less
//! position (empty transaction, heartbeat) while nothing waits for the sink.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_walstream::{
    LogicalReplicationMessage as M, LogicalReplicationParser, LogicalReplicationStream,
    RawXLogData, SharedLsnFeedback,
};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::Catalog;
use super::config::CaptureConfig;
use super::decode::{Assembler, Decoded};
use super::error::CaptureError;
use super::now_ms;
use super::resnapshot::Resnapper;
use super::session::Source;
use super::sink::EventSink;
use super::sink_task::{SharedSink, SinkTask};
use crate::event::change::ChangeEvent;
use crate::telemetry::metrics as m;

/// A session's stream after the snapshot, with everything its loop reads and writes.
pub(super) struct Streaming<'a> {
    config: &'a CaptureConfig,
    source: &'a Source,
    catalog: Catalog,
    stream: LogicalReplicationStream,
    parser: LogicalReplicationParser,
    asm: Assembler,
    batch: Batch,
    sinker: SinkTask<u64>,
    acks: Acks<'a>,
    resnap: &'a mut Resnapper,
    _heartbeat: AbortOnDrop,
}

impl<'a> Streaming<'a> {
    /// Starts the heartbeat, a re-snapshot interrupted by a reconnect, and the sink task.
    pub(super) fn start<S: EventSink + 'static>(
        config: &'a CaptureConfig,
        source: &'a Source,
        catalog: Catalog,
        stream: LogicalReplicationStream,
        sink: &SharedSink<S>,
        resnap: &'a mut Resnapper,
        durable_lsn: &'a mut u64,
    ) -> Self {
        let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
            source.client.clone(),
            config.pipeline.clone(),
            config.slot_name.clone(),
            config.heartbeat_interval,
        )));
        let acks = Acks {
            feedback: stream.shared_lsn_feedback.clone(),
            pipeline: config.pipeline.clone(),
            durable: durable_lsn,
        };
        // A re-snapshot interrupted by a reconnect continues from its last durable chunk.
        resnap.ensure_task(config);
        // Reading continues while earlier batches are encoded and appended on this task.
        let sinker = SinkTask::spawn(sink.clone(), config.sink_in_flight, &config.pipeline);
        Self {
            config,
            source,
            catalog,
            stream,
            parser: LogicalReplicationParser::with_protocol_version(2),
            asm: Assembler::new(&config.pipeline, &source.db),
            batch: Batch::default(),
            sinker,
            acks,
            resnap,
            _heartbeat: heartbeat,
        }
    }

    /// Streams until shutdown (`Ok`) or an error; either way acknowledges what became durable.
    pub(super) async fn run(
        mut self,
        lock_lost: &CancellationToken,
        conn_lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let result = self.select_loop(lock_lost, conn_lost, shutdown).await;
        // On an error, the append in progress finishes (never cancelled half-way) and the queued
        // batches are dropped; whatever became durable meanwhile may still be acknowledged.
        for lsn in self.sinker.stop().await {
            self.acks.ack(lsn);
        }
        result
    }

    async fn select_loop(
        &mut self,
        lock_lost: &CancellationToken,
        conn_lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let mut tick = tokio::time::interval(self.config.feedback_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let never = CancellationToken::new();
        loop {
            let linger = self
                .batch
                .since
                .map(|t| tokio::time::Instant::from_std(t + self.config.batch_linger));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.finish().await,
                _ = lock_lost.cancelled() => return Err(CaptureError::LostLock),
                _ = conn_lost.cancelled() => {
                    return Err(CaptureError::ConnectionLost("catalog connection closed".into()));
                }
                done = self.sinker.next_done(), if !self.sinker.idle() => {
                    self.acks.ack(done?);
                    // What arrived while batches were in flight (events, or only positions) goes
                    // out now: group commit, the batch grew while the sink was busy.
                    if self.sinker.idle() {
                        self.flush().await?;
                    }
                }
                _ = sleep_until_opt(linger), if linger.is_some() => self.flush().await?,
                _ = tick.tick() => self.stream.maybe_send_feedback().await,
                req = Resnapper::next_request(&mut self.resnap.requests), if self.resnap.idle() => {
                    if let Some((id, table)) = req {
                        self.resnap
                            .start(
                                id,
                                table,
                                &self.source.tables,
                                &mut self.catalog,
                                &self.source.client,
                                self.config,
                            )
                            .await?;
                    }
                }
                chunk = Resnapper::next_chunk(&mut self.resnap.job), if self.resnap.has_task() => {
                    if let Err(e) = self.resnap.accept_chunk(chunk) {
                        self.resnap.fail(&self.config.pipeline, e);
                    }
                }
                raw = self.stream.next_raw_event(&never) => self.on_raw(raw?).await?,
            }
        }
    }

    /// Shutdown: everything read becomes durable and acknowledged before the session ends.
    async fn finish(&mut self) -> Result<(), CaptureError> {
        self.flush_and_drain().await?;
        // Event-less positions left once nothing is in flight.
        self.flush().await?;
        // Best effort: the slot also resumes correctly from an older position.
        let _ = self.stream.send_feedback().await;
        Ok(())
    }

    /// One message from the replication stream.
    async fn on_raw(&mut self, raw: RawXLogData) -> Result<(), CaptureError> {
        metrics::counter!(m::CAPTURE_BYTES_TOTAL, "pipeline" => self.config.pipeline.clone())
            .increment(raw.data.len() as u64);
        if raw.data.is_empty() {
            return Ok(());
        }
        let msg = self
            .parser
            .parse_wal_message_bytes(raw.data)
            .map_err(|e| CaptureError::Protocol(e.to_string()))?;
        if let M::Relation {
            relation_id,
            replica_identity,
            columns,
            ..
        } = &msg.message
        {
            let cols: Vec<(String, u32, i32)> = columns
                .iter()
                .map(|c| (c.name.to_string(), c.type_id, c.type_modifier))
                .collect();
            self.catalog
                .relation_from_message(&self.source.client, *relation_id, *replica_identity, &cols)
                .await?;
            return Ok(());
        }
        match self.asm.handle(msg, &self.catalog)? {
            Decoded::Nothing => {}
            Decoded::Committed {
                events,
                end_lsn,
                commit_ts_ms,
                watermarks,
            } => {
                self.on_commit(events, end_lsn, commit_ts_ms);
                for w in &watermarks {
                    self.on_watermark(w, end_lsn).await?;
                }
            }
            Decoded::Heartbeat { lsn } => {
                if self.batch.events.is_empty() && self.sinker.idle() {
                    self.acks.ack(lsn);
                } else {
                    self.batch.push(Vec::new(), lsn);
                }
            }
        }
        // An idle sink takes a commit at once (no linger: a lone commit would otherwise wait for
        // the timer); while it is busy, commits gather into the next batch.
        if self.batch.events.len() >= self.config.batch_max_events
            || (!self.batch.events.is_empty() && self.sinker.idle())
        {
            self.flush().await?;
        }
        Ok(())
    }

    /// A committed transaction: batched, or acknowledged at once when it has no events and
    /// nothing waits for the sink.
    fn on_commit(&mut self, events: Vec<ChangeEvent>, end_lsn: u64, commit_ts_ms: i64) {
        let pipeline = &self.config.pipeline;
        metrics::gauge!(m::CAPTURE_LAG_SECONDS, "pipeline" => pipeline.clone())
            .set((now_ms() - commit_ts_ms).max(0) as f64 / 1000.0);
        count_events(pipeline, &events);
        self.resnap.observe(&events);
        if events.is_empty() && self.batch.events.is_empty() && self.sinker.idle() {
            self.acks.ack(end_lsn);
        } else {
            self.batch.push(events, end_lsn);
        }
    }

    /// A re-snapshot watermark committed at `end_lsn`; a high watermark may release a chunk.
    async fn on_watermark(&mut self, content: &str, end_lsn: u64) -> Result<(), CaptureError> {
        let pipeline = &self.config.pipeline;
        match self
            .resnap
            .watermark(content, end_lsn, &self.catalog, &self.source.db, pipeline)
        {
            Ok(None) => {}
            Ok(Some(chunk)) => {
                count_events(pipeline, &chunk.events);
                self.batch.push(chunk.events, end_lsn);
                // Durable before the next chunk starts: the job's position is always a durable
                // chunk.
                self.flush_and_drain().await?;
                self.resnap.chunk_durable(pipeline);
            }
            Err(e) => self.resnap.fail(pipeline, e),
        }
        Ok(())
    }

    /// Hands the batch to the sink task (see [`Batch::flush`]).
    async fn flush(&mut self) -> Result<(), CaptureError> {
        let acks = &mut self.acks;
        self.batch
            .flush(&mut self.sinker, &mut |lsn| {
                acks.ack(lsn);
                Ok(())
            })
            .await
    }

    /// Hands the batch to the sink task and waits until everything in flight is durable.
    async fn flush_and_drain(&mut self) -> Result<(), CaptureError> {
        let acks = &mut self.acks;
        let mut durable = |lsn| {
            acks.ack(lsn);
            Ok(())
        };
        self.batch.flush(&mut self.sinker, &mut durable).await?;
        self.sinker.drain(&mut durable).await
    }
}

/// Acknowledges durable positions to the slot (see the module docs for when).
struct Acks<'a> {
    feedback: Arc<SharedLsnFeedback>,
    pipeline: String,
    /// Highest LSN whose events (and all before) are durable, kept across sessions.
    durable: &'a mut u64,
}

impl Acks<'_> {
    fn ack(&mut self, lsn: u64) {
        if lsn > *self.durable {
            *self.durable = lsn;
            self.feedback.update_applied_lsn(lsn);
            metrics::gauge!(m::CAPTURE_ACKED_LSN, "pipeline" => self.pipeline.clone())
                .set(lsn as f64);
            metrics::gauge!(m::CAPTURE_LAST_ACK_TIMESTAMP, "pipeline" => self.pipeline.clone())
                .set(crate::telemetry::unix_seconds());
        }
    }
}

/// Aborts a task on drop.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Committed events not yet handed to the sink task, and the LSN to acknowledge once they (and
/// every batch before them) are durable.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    end_lsn: u64,
    /// When the first event arrived (the linger deadline counts from there).
    since: Option<Instant>,
}

impl Batch {
    /// Adds a transaction's events; with no events, only the acknowledgeable position moves.
    fn push(&mut self, events: Vec<ChangeEvent>, end_lsn: u64) {
        if !events.is_empty() {
            self.since.get_or_insert_with(Instant::now);
        }
        self.events.extend(events);
        self.end_lsn = self.end_lsn.max(end_lsn);
    }

    /// Hands the events to the sink task (waiting when it is full). `durable` gets every LSN
    /// that may be acknowledged now: those of earlier batches that became durable while waiting,
    /// or this batch's own position when it has no events and nothing waits for the sink. An
    /// event-less position while batches are in flight stays here: the next batch carries it, or
    /// it is acknowledged once the sink task is idle.
    async fn flush<F>(
        &mut self,
        sinker: &mut SinkTask<u64>,
        durable: &mut F,
    ) -> Result<(), CaptureError>
    where
        F: FnMut(u64) -> Result<(), CaptureError> + Send,
    {
        self.since = None;
        if self.events.is_empty() {
            if sinker.idle() && self.end_lsn > 0 {
                durable(std::mem::take(&mut self.end_lsn))?;
            }
            return Ok(());
        }
        let events = std::mem::take(&mut self.events);
        let lsn = std::mem::take(&mut self.end_lsn);
        sinker.submit(events, lsn, durable).await
    }
}

fn count_events(pipeline: &str, events: &[ChangeEvent]) {
    for e in events {
        metrics::counter!(
            m::CAPTURE_EVENTS_TOTAL,
            "pipeline" => pipeline.to_string(),
            "table" => format!("{}.{}", e.relation.schema, e.relation.name),
            "op" => e.op.code()
        )
        .increment(1);
    }
}

/// WAL bytes `slot` retains (`pg_current_wal_lsn() - confirmed_flush_lsn`); `None` without the
/// slot, 0 before its first confirmation.
pub async fn slot_lag_bytes(
    client: &Client,
    slot: &str,
) -> Result<Option<f64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, Option<f64>>(0).unwrap_or(0.0)))
}

/// Writes a non-transactional heartbeat into the WAL every `interval` (so an idle slot advances
/// when other databases/tables are busy) and samples the slot lag.
async fn heartbeat(client: Arc<Client>, pipeline: String, slot: String, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = client
            .execute(
                "SELECT pg_logical_emit_message(false, 'syncbridge', 'heartbeat')",
                &[],
            )
            .await
        {
            tracing::warn!(pipeline = %pipeline, error = %e, "heartbeat failed");
        }
        match slot_lag_bytes(&client, &slot).await {
            Ok(Some(lag)) => {
                metrics::gauge!(m::CAPTURE_SLOT_LAG_BYTES, "pipeline" => pipeline.clone()).set(lag);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(pipeline = %pipeline, error = %e, "slot lag query failed"),
        }
    }
}
