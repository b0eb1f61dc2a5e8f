//! The capture run loop: single-reader lock, slot/publication setup, snapshot, streaming,
//! acknowledgement, heartbeats and reconnects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_walstream::{
    LogicalReplicationMessage as M, LogicalReplicationParser, LogicalReplicationStream,
    ReplicationSlotOptions, ReplicationStreamConfig, RetryConfig, StreamingMode,
};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::{
    Catalog, SlotStatus, check_server, ensure_publication, resolve_tables, slot_status,
};
use super::config::CaptureConfig;
use super::decode::{Assembler, Decoded};
use super::error::CaptureError;
use super::now_ms;
use super::resnapshot::{Resnapper, ResnapshotRequests};
use super::sink::EventSink;
use super::sink_task::{SharedSink, SinkTask};
use super::snapshot::{
    FileProgress, SnapshotProgress, SnapshotState, Stop, TableProgress, run_snapshot,
};
use crate::event::change::ChangeEvent;
use crate::telemetry::metrics as m;

/// Runs capture for one pipeline until `shutdown` is cancelled or a non-retryable error occurs.
/// Snapshot progress is kept in a [`FileProgress`] under `config.state_dir`.
pub async fn run<S: EventSink + 'static>(
    config: CaptureConfig,
    sink: S,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let progress = FileProgress::new(&config.state_dir, &config.slot_name);
    run_with_progress(config, sink, progress, shutdown).await
}

/// [`run`] with an explicit snapshot progress store.
pub async fn run_with_progress<S: EventSink + 'static, P: SnapshotProgress>(
    config: CaptureConfig,
    sink: S,
    progress: P,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    run_with_control(config, sink, progress, None, shutdown).await
}

/// [`run_with_progress`] that also serves on-demand re-snapshots requested through the
/// [`super::ResnapshotHandle`] paired with `requests` (see [`super::resnapshot`]).
pub async fn run_with_control<S: EventSink + 'static, P: SnapshotProgress>(
    config: CaptureConfig,
    sink: S,
    progress: P,
    requests: Option<ResnapshotRequests>,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let mut resnap = Resnapper::new(requests);
    let result = run_inner(config.clone(), sink, progress, &mut resnap, shutdown).await;
    resnap.interrupt(&config.pipeline);
    result
}

async fn run_inner<S: EventSink + 'static, P: SnapshotProgress>(
    config: CaptureConfig,
    sink: S,
    mut progress: P,
    resnap: &mut Resnapper,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    config.validate()?;
    // Appends run on a task of their own (see `sink_task`); sessions take turns with the sink.
    let sink: SharedSink<S> = Arc::new(tokio::sync::Mutex::new(sink));
    let mut backoff = Backoff::new(config.max_backoff);
    // Highest LSN whose events (and all before) are durable, known to this process.
    let mut durable_lsn = 0u64;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let lock = match acquire_lock(&config, &shutdown).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(pipeline = %config.pipeline, error = %e, "advisory lock connection failed; retrying");
                if !backoff.sleep(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        tracing::info!(pipeline = %config.pipeline, slot = %config.slot_name, "acquired single-reader lock");
        loop {
            let before = durable_lsn;
            let result = session(
                &config,
                &sink,
                &mut progress,
                &lock,
                &shutdown,
                &mut durable_lsn,
                resnap,
            )
            .await;
            resnap.session_ended();
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    metrics::counter!(m::CAPTURE_RECONNECTS_TOTAL, "pipeline" => config.pipeline.clone())
                        .increment(1);
                    tracing::warn!(pipeline = %config.pipeline, error = %e, "capture session failed; reconnecting");
                    if durable_lsn > before {
                        backoff.reset();
                    }
                    if !backoff.sleep(&shutdown).await {
                        return Ok(());
                    }
                    if lock.lost.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(pipeline = %config.pipeline, error = %e, "capture stopped");
                    return Err(e);
                }
            }
        }
    }
}

/// Exponential backoff between reconnects, interruptible by shutdown.
#[derive(Debug)]
struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(250);

    fn new(max: Duration) -> Self {
        Self {
            current: Self::START,
            max,
        }
    }

    fn reset(&mut self) {
        self.current = Self::START;
    }

    /// Sleeps; false when shutdown was requested meanwhile.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// A regular connection whose driver task cancels `lost` when the connection ends.
struct Conn {
    client: Arc<Client>,
    lost: CancellationToken,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the socket releases session state on the server (the advisory lock).
        self.driver.abort();
    }
}

async fn connect(url: &str) -> Result<Conn, CaptureError> {
    let (client, connection) = crate::pg::connect(url).await?;
    let lost = CancellationToken::new();
    let lost2 = lost.clone();
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
        lost2.cancel();
    });
    Ok(Conn {
        client: Arc::new(client),
        lost,
        driver,
    })
}

/// The advisory-lock key of a slot: FNV-1a of `syncbridge:<slot>` (stable across builds and
/// processes, unlike `DefaultHasher`).
pub fn lock_key(slot: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"syncbridge:".iter().chain(slot.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// Waits until this process holds the pipeline's advisory lock (None on shutdown). The lock lives
/// as long as the returned connection; when it dies, `lost` fires and streaming stops.
async fn acquire_lock(
    config: &CaptureConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Conn>, CaptureError> {
    let conn = connect(&config.source_url).await?;
    let key = lock_key(&config.slot_name);
    let mut waiting_logged = false;
    loop {
        let got: bool = conn
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0);
        if got {
            return Ok(Some(conn));
        }
        if !waiting_logged {
            tracing::info!(pipeline = %config.pipeline, "another instance reads this slot; standing by");
            waiting_logged = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(config.lock_poll_interval) => {}
        }
    }
}

fn stream_config(config: &CaptureConfig, export_snapshot: bool) -> ReplicationStreamConfig {
    let slot_options = ReplicationSlotOptions {
        snapshot: Some(if export_snapshot { "export" } else { "nothing" }.to_string()),
        ..ReplicationSlotOptions::default()
    };
    ReplicationStreamConfig::builder(config.slot_name.clone(), config.publication_name.clone())
        .with_protocol_version(2)
        .with_streaming_mode(if config.streaming {
            StreamingMode::On
        } else {
            StreamingMode::Off
        })
        .with_messages(true)
        .with_feedback_interval(config.feedback_interval)
        .with_connection_timeout(Duration::from_secs(30))
        .with_health_check_interval(Duration::from_secs(3600))
        // We own reconnects (the whole session restarts from the slot).
        .with_retry_config(RetryConfig {
            max_attempts: 1,
            ..RetryConfig::default()
        })
        .with_slot_options(slot_options)
        // Never let the library (re)create the slot: a missing slot must be an operator error.
        .with_existing_slot_required(true)
}

/// Aborts a task on drop.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One connected session: setup, snapshot if needed, then stream until error or shutdown.
#[allow(clippy::too_many_arguments)]
async fn session<S: EventSink + 'static, P: SnapshotProgress>(
    config: &CaptureConfig,
    sink: &SharedSink<S>,
    progress: &mut P,
    lock: &Conn,
    shutdown: &CancellationToken,
    durable_lsn: &mut u64,
    resnap: &mut Resnapper,
) -> Result<(), CaptureError> {
    let conn = connect(&config.source_url).await?;
    let client = conn.client.clone();
    let version = check_server(&client).await?;
    let tables = resolve_tables(&client, config).await?;
    ensure_publication(&client, config, &tables).await?;
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let mut catalog = Catalog::new(&tables);
    let all_pending = || SnapshotState {
        slot: config.slot_name.clone(),
        consistent_point: 0,
        tables: tables
            .iter()
            .map(|t| (t.spec.qualified(), TableProgress::Pending))
            .collect(),
    };

    let mut stream = match slot_status(&client, config, version).await? {
        SlotStatus::Missing => {
            // A slot that existed (its consistent point was recorded) and is gone now was dropped
            // by someone: never recreate it silently, changes since its last ack are lost.
            if let Some(old) = progress.load()?
                && old.slot == config.slot_name
                && old.consistent_point != 0
            {
                return Err(CaptureError::Operator(format!(
                    "replication slot {slot} is gone (it existed, consistent point {:X}): changes \
                     since its last acknowledgement were not captured. If it was dropped on \
                     purpose to resync, delete {} and start again: a new slot and a full initial \
                     snapshot are taken",
                    old.consistent_point,
                    progress.location(),
                    slot = config.slot_name
                )));
            }
            // The plan is durable before the slot exists (see SnapshotState).
            let mut state = all_pending();
            progress.save(&state)?;
            let mut stream = LogicalReplicationStream::new(
                &config.replication_url(),
                stream_config(config, true),
            )
            .await?;
            stream.ensure_replication_slot().await?;
            let name = stream
                .exported_snapshot_name()
                .map(str::to_owned)
                .ok_or_else(|| {
                    CaptureError::Operator(format!(
                        "replication slot {} appeared concurrently (created by someone else?); \
                         refusing to stream without a snapshot",
                        config.slot_name
                    ))
                })?;
            if let SlotStatus::Ready { confirmed_flush } =
                slot_status(&client, config, version).await?
            {
                state.consistent_point = confirmed_flush;
            }
            progress.save(&state)?;
            tracing::info!(pipeline = %config.pipeline, slot = %config.slot_name, snapshot = %name, "created replication slot; taking the initial snapshot");
            let snap = connect(&config.source_url).await?;
            let stop = Stop {
                shutdown,
                lock_lost: &lock.lost,
            };
            let complete = run_snapshot(
                &stop,
                config,
                &snap.client,
                &db,
                Some(&name),
                &tables,
                &mut catalog,
                sink,
                progress,
                &mut state,
            )
            .await?;
            if !complete {
                return Ok(());
            }
            stream.start(None).await?;
            stream
        }
        SlotStatus::Ready { confirmed_flush } => {
            let Some(mut state) = progress.load()? else {
                return Err(CaptureError::Operator(format!(
                    "replication slot {slot} exists but the snapshot progress record ({}) is missing: \
                     the state directory was lost or the slot was created by someone else, so it is \
                     unknown whether the initial snapshot completed. Fix: drop the slot \
                     (SELECT pg_drop_replication_slot('{slot}');) to take a new snapshot, or restore \
                     the state directory",
                    progress.location(),
                    slot = config.slot_name
                )));
            };
            // Tables added to the config since the plan was written need a snapshot too; they
            // passed the publication check above.
            for t in &tables {
                state
                    .tables
                    .entry(t.spec.qualified())
                    .or_insert(TableProgress::Pending);
            }
            if state.consistent_point == 0 {
                state.consistent_point = confirmed_flush;
            }
            if !state.is_complete() {
                tracing::info!(pipeline = %config.pipeline, "resuming the initial snapshot under a fresh snapshot");
                let snap = connect(&config.source_url).await?;
                let stop = Stop {
                    shutdown,
                    lock_lost: &lock.lost,
                };
                let complete = run_snapshot(
                    &stop,
                    config,
                    &snap.client,
                    &db,
                    None,
                    &tables,
                    &mut catalog,
                    sink,
                    progress,
                    &mut state,
                )
                .await?;
                if !complete {
                    return Ok(());
                }
            }
            let mut stream = LogicalReplicationStream::new(
                &config.replication_url(),
                stream_config(config, false),
            )
            .await?;
            // Starting past confirmed_flush skips only what this process knows is durable.
            let start = (*durable_lsn).max(confirmed_flush);
            stream.start(Some(start)).await?;
            stream
        }
    };
    metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => config.pipeline.clone()).set(0.0);

    let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
        client.clone(),
        config.pipeline.clone(),
        config.slot_name.clone(),
        config.heartbeat_interval,
    )));

    let feedback = stream.shared_lsn_feedback.clone();
    let mut parser = LogicalReplicationParser::with_protocol_version(2);
    let mut asm = Assembler::new(&config.pipeline, &db);
    let mut batch = Batch::default();
    let mut tick = tokio::time::interval(config.feedback_interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let never = CancellationToken::new();
    let pipeline = config.pipeline.clone();
    // A re-snapshot interrupted by a reconnect continues from its last durable chunk.
    resnap.ensure_task(config);
    // Only ever called with an LSN whose events, and all before them, are durable: a batch's tag
    // reported by the sink task (in order), or an event-less position while nothing waits for it.
    let ack = |lsn: u64, durable: &mut u64| {
        if lsn > *durable {
            *durable = lsn;
            feedback.update_applied_lsn(lsn);
            metrics::gauge!(m::CAPTURE_ACKED_LSN, "pipeline" => pipeline.clone()).set(lsn as f64);
        }
    };
    // Reading continues while earlier batches are encoded and appended on this task.
    let mut sinker: SinkTask<u64> =
        SinkTask::spawn(sink.clone(), config.sink_in_flight, &config.pipeline);

    let result: Result<(), CaptureError> = async {
        loop {
            let linger = batch
                .since
                .map(|t| tokio::time::Instant::from_std(t + config.batch_linger));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let mut durable = |lsn| {
                        ack(lsn, durable_lsn);
                        Ok(())
                    };
                    batch.flush(&mut sinker, &mut durable).await?;
                    sinker.drain(&mut durable).await?;
                    // Event-less positions left once nothing is in flight.
                    batch.flush(&mut sinker, &mut durable).await?;
                    // Best effort: the slot also resumes correctly from an older position.
                    let _ = stream.send_feedback().await;
                    return Ok(());
                }
                _ = lock.lost.cancelled() => return Err(CaptureError::LostLock),
                _ = conn.lost.cancelled() => {
                    return Err(CaptureError::ConnectionLost("catalog connection closed".into()));
                }
                done = sinker.next_done(), if !sinker.idle() => {
                    ack(done?, durable_lsn);
                    // Event-less positions that arrived while batches were in flight.
                    if sinker.idle() && batch.events.is_empty() {
                        batch.flush(&mut sinker, &mut |lsn| {
                            ack(lsn, durable_lsn);
                            Ok(())
                        })
                        .await?;
                    }
                }
                _ = sleep_until_opt(linger), if linger.is_some() => {
                    batch.flush(&mut sinker, &mut |lsn| {
                        ack(lsn, durable_lsn);
                        Ok(())
                    })
                    .await?;
                }
                _ = tick.tick() => stream.maybe_send_feedback().await,
                req = Resnapper::next_request(&mut resnap.requests), if resnap.idle() => {
                    if let Some((id, table)) = req {
                        resnap.start(id, table, &tables, &mut catalog, &client, config).await?;
                    }
                }
                chunk = Resnapper::next_chunk(&mut resnap.job), if resnap.has_task() => {
                    if let Err(e) = resnap.accept_chunk(chunk) {
                        resnap.fail(&config.pipeline, e);
                    }
                }
                raw = stream.next_raw_event(&never) => {
                    let raw = raw?;
                    metrics::counter!(m::CAPTURE_BYTES_TOTAL, "pipeline" => config.pipeline.clone())
                        .increment(raw.data.len() as u64);
                    if raw.data.is_empty() {
                        continue;
                    }
                    let msg = parser
                        .parse_wal_message_bytes(raw.data)
                        .map_err(|e| CaptureError::Protocol(e.to_string()))?;
                    if let M::Relation { relation_id, replica_identity, columns, .. } = &msg.message {
                        let cols: Vec<(String, u32, i32)> = columns
                            .iter()
                            .map(|c| (c.name.to_string(), c.type_id, c.type_modifier))
                            .collect();
                        catalog
                            .relation_from_message(&client, *relation_id, *replica_identity, &cols)
                            .await?;
                        continue;
                    }
                    match asm.handle(msg, &catalog)? {
                        Decoded::Nothing => {}
                        Decoded::Committed { events, end_lsn, commit_ts_ms, watermarks } => {
                            metrics::gauge!(m::CAPTURE_LAG_SECONDS, "pipeline" => config.pipeline.clone())
                                .set((now_ms() - commit_ts_ms).max(0) as f64 / 1000.0);
                            count_events(&config.pipeline, &events);
                            resnap.observe(&events);
                            if events.is_empty() && batch.events.is_empty() && sinker.idle() {
                                ack(end_lsn, durable_lsn);
                            } else {
                                batch.push(events, end_lsn);
                            }
                            for w in &watermarks {
                                match resnap.watermark(w, end_lsn, &catalog, &db, &config.pipeline) {
                                    Ok(None) => {}
                                    Ok(Some(chunk)) => {
                                        count_events(&config.pipeline, &chunk.events);
                                        batch.push(chunk.events, end_lsn);
                                        // Durable before the next chunk starts: the job's
                                        // position is always a durable chunk.
                                        let mut durable = |lsn| {
                                            ack(lsn, durable_lsn);
                                            Ok(())
                                        };
                                        batch.flush(&mut sinker, &mut durable).await?;
                                        sinker.drain(&mut durable).await?;
                                        resnap.chunk_durable(&config.pipeline);
                                    }
                                    Err(e) => resnap.fail(&config.pipeline, e),
                                }
                            }
                        }
                        Decoded::Heartbeat { lsn } => {
                            if batch.events.is_empty() && sinker.idle() {
                                ack(lsn, durable_lsn);
                            } else {
                                batch.push(Vec::new(), lsn);
                            }
                        }
                    }
                    if batch.events.len() >= config.batch_max_events {
                        batch.flush(&mut sinker, &mut |lsn| {
                            ack(lsn, durable_lsn);
                            Ok(())
                        })
                        .await?;
                    }
                }
            }
        }
    }
    .await;
    // On an error, the append in progress finishes (never cancelled half-way) and the queued
    // batches are dropped; whatever became durable meanwhile may still be acknowledged.
    for lsn in sinker.stop().await {
        ack(lsn, durable_lsn);
    }
    result
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
        match client
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(Some(row)) => {
                let lag: Option<f64> = row.get(0);
                metrics::gauge!(m::CAPTURE_SLOT_LAG_BYTES, "pipeline" => pipeline.clone())
                    .set(lag.unwrap_or(0.0));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(pipeline = %pipeline, error = %e, "slot lag query failed"),
        }
    }
}
