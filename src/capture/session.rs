//! One connected capture session, step by step: connect and check the source, resolve the tables
//! and the publication, open the slot (create it and take the initial snapshot, or resume a
//! snapshot left unfinished), then stream ([`super::streaming`]) until error or shutdown.
//!
//! Invariants kept here: a slot is created only when no progress record says one existed (a
//! dropped slot is an operator error, never silently recreated); the snapshot plan is durable
//! before the slot exists; streaming starts only after the snapshot completed.

use std::sync::Arc;
use std::time::Duration;

use pg_walstream::{
    LogicalReplicationStream, ReplicationSlotOptions, ReplicationStreamConfig, RetryConfig,
    StreamingMode,
};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::{
    Catalog, ResolvedTable, SlotStatus, check_server, ensure_publication, resolve_tables,
    slot_status,
};
use super::config::CaptureConfig;
use super::error::CaptureError;
use super::resnapshot::Resnapper;
use super::run::{Conn, Position, connect};
use super::sink::EventSink;
use super::sink_task::SharedSink;
use super::snapshot::{SnapshotProgress, SnapshotState, Stop, TableProgress, run_snapshot};
use super::streaming::Streaming;
use crate::telemetry::metrics as m;

/// One connected session: setup, snapshot if needed, then stream until error or shutdown.
pub(super) async fn session<S: EventSink + 'static, P: SnapshotProgress>(
    config: &CaptureConfig,
    sink: &SharedSink<S>,
    progress: &mut P,
    lock: &Conn,
    shutdown: &CancellationToken,
    position: &mut Position,
    resnap: &mut Resnapper,
) -> Result<(), CaptureError> {
    let source = Source::connect(config).await?;
    let status = slot_status(&source.client, config, source.version).await?;
    if let Some(mut failover) = position.failover.take() {
        // A promoted instance without our slot: its LSNs are not the slot's, start afresh.
        failover.resnapshot = status == SlotStatus::Missing;
        if failover.resnapshot {
            position.durable_lsn = 0;
            position.failover_resync = true;
            tracing::warn!(pipeline = %config.pipeline, slot = %config.slot_name, "the promoted instance has no replication slot (PostgreSQL < 17 or slot synchronisation off): creating it and reading every captured table again; the ledger absorbs rows already synced");
        } else {
            tracing::info!(pipeline = %config.pipeline, slot = %config.slot_name, "the promoted instance has the synchronised slot; resuming at the acknowledged position");
        }
        super::failover::report(config, failover);
    }
    let mut opening = Opening {
        config,
        source: &source,
        catalog: Catalog::new(&source.tables),
        sink,
        progress,
        failover_resync: position.failover_resync,
        stop: Stop {
            shutdown,
            lock_lost: &lock.lost,
        },
    };
    let stream = match status {
        SlotStatus::Missing => opening.create_slot().await?,
        SlotStatus::Ready { confirmed_flush } => {
            opening
                .resume_slot(confirmed_flush, position.durable_lsn)
                .await?
        }
    };
    // None: shutdown (or the lock was lost) while the snapshot ran; its progress is durable.
    let Some(stream) = stream else {
        return Ok(());
    };
    position.failover_resync = false;
    let catalog = opening.catalog;
    metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => config.pipeline.clone()).set(0.0);
    let streaming = Streaming::start(
        config,
        &source,
        catalog,
        stream,
        sink,
        resnap,
        &mut position.durable_lsn,
    );
    streaming.run(&lock.lost, &source.conn.lost, shutdown).await
}

/// The source database as this session sees it: the catalog connection (its loss ends the
/// session), the server version, the captured tables (in the publication) and the database name.
pub(super) struct Source {
    pub(super) conn: Conn,
    pub(super) client: Arc<Client>,
    version: i32,
    pub(super) tables: Vec<ResolvedTable>,
    pub(super) db: String,
}

impl Source {
    /// Connects, checks the server, resolves the tables and makes sure the publication has them.
    async fn connect(config: &CaptureConfig) -> Result<Self, CaptureError> {
        let conn = connect(&config.source_url).await?;
        let client = conn.client.clone();
        let version = check_server(&client).await?;
        let tables = resolve_tables(&client, config).await?;
        ensure_publication(&client, config, &tables).await?;
        let db: String = client
            .query_one("SELECT current_database()::text", &[])
            .await?
            .get(0);
        Ok(Self {
            conn,
            client,
            version,
            tables,
            db,
        })
    }
}

/// What opening the slot needs: the snapshot (if any) runs before the stream is started.
struct Opening<'a, 's, S, P> {
    config: &'a CaptureConfig,
    source: &'a Source,
    catalog: Catalog,
    sink: &'a SharedSink<S>,
    progress: &'a mut P,
    /// The slot is missing because the primary failed over to an instance without it: create
    /// it and read every table again instead of refusing (see [`super::failover`]).
    failover_resync: bool,
    stop: Stop<'s>,
}

impl<S: EventSink + 'static, P: SnapshotProgress> Opening<'_, '_, S, P> {
    /// First run: writes the snapshot plan, creates the slot with an exported snapshot, reads
    /// every table under it, then starts streaming at the slot's consistent point.
    async fn create_slot(&mut self) -> Result<Option<LogicalReplicationStream>, CaptureError> {
        let config = self.config;
        if !self.failover_resync {
            self.refuse_if_slot_was_dropped()?;
        }
        // The plan is durable before the slot exists (see SnapshotState).
        let mut state = self.all_pending();
        self.progress.save(&state)?;
        // PostgreSQL 17+: a failover slot, synchronised to standbys that are set up for it.
        let failover = self.source.version >= FAILOVER_SLOTS_VERSION_NUM;
        let mut stream = LogicalReplicationStream::new(
            &config.replication_url(),
            stream_config(config, true, failover),
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
            slot_status(&self.source.client, config, self.source.version).await?
        {
            state.consistent_point = confirmed_flush;
        }
        self.progress.save(&state)?;
        tracing::info!(pipeline = %config.pipeline, slot = %config.slot_name, snapshot = %name, "created replication slot; taking the initial snapshot");
        if !self.snapshot(Some(&name), &mut state).await? {
            return Ok(None);
        }
        stream.start(None).await?;
        Ok(Some(stream))
    }

    /// A slot that existed (its consistent point was recorded) and is gone now was dropped by
    /// someone: never recreate it silently, changes since its last ack are lost.
    fn refuse_if_slot_was_dropped(&mut self) -> Result<(), CaptureError> {
        if let Some(old) = self.progress.load()?
            && old.slot == self.config.slot_name
            && old.consistent_point != 0
        {
            return Err(CaptureError::Operator(format!(
                "replication slot {slot} is gone (it existed, consistent point {:X}): changes \
                 since its last acknowledgement were not captured. If it was dropped on \
                 purpose to resync, delete {} and start again: a new slot and a full initial \
                 snapshot are taken",
                old.consistent_point,
                self.progress.location(),
                slot = self.config.slot_name
            )));
        }
        Ok(())
    }

    /// The slot exists: finishes an interrupted snapshot (and snapshots tables added since) under
    /// a fresh snapshot, then streams from the slot's position or this process's durable LSN.
    async fn resume_slot(
        &mut self,
        confirmed_flush: u64,
        durable_lsn: u64,
    ) -> Result<Option<LogicalReplicationStream>, CaptureError> {
        let config = self.config;
        let Some(mut state) = self.progress.load()? else {
            return Err(CaptureError::Operator(format!(
                "replication slot {slot} exists but the snapshot progress record ({}) is missing: \
                 the state directory was lost or the slot was created by someone else, so it is \
                 unknown whether the initial snapshot completed. Fix: drop the slot \
                 (SELECT pg_drop_replication_slot('{slot}');) to take a new snapshot, or restore \
                 the state directory",
                self.progress.location(),
                slot = config.slot_name
            )));
        };
        // Tables added to the config since the plan was written need a snapshot too; they
        // passed the publication check above.
        for t in &self.source.tables {
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
            if !self.snapshot(None, &mut state).await? {
                return Ok(None);
            }
        }
        let mut stream = LogicalReplicationStream::new(
            &config.replication_url(),
            stream_config(config, false, false),
        )
        .await?;
        // Starting past confirmed_flush skips only what this process knows is durable.
        let start = durable_lsn.max(confirmed_flush);
        stream.start(Some(start)).await?;
        Ok(Some(stream))
    }

    /// Reads the pending tables on a connection of their own; false when stopped before the end.
    async fn snapshot(
        &mut self,
        exported: Option<&str>,
        state: &mut SnapshotState,
    ) -> Result<bool, CaptureError> {
        let snap = connect(&self.config.source_url).await?;
        run_snapshot(
            &self.stop,
            self.config,
            &snap.client,
            &self.source.db,
            exported,
            &self.source.tables,
            &mut self.catalog,
            self.sink,
            self.progress,
            state,
        )
        .await
    }

    /// A new plan: every captured table pending, no consistent point yet.
    fn all_pending(&self) -> SnapshotState {
        SnapshotState {
            slot: self.config.slot_name.clone(),
            consistent_point: 0,
            tables: self
                .source
                .tables
                .iter()
                .map(|t| (t.spec.qualified(), TableProgress::Pending))
                .collect(),
        }
    }
}

/// The first PostgreSQL version whose logical slots can be synchronised to standbys
/// (`CREATE_REPLICATION_SLOT ... (FAILOVER)`, `sync_replication_slots`).
const FAILOVER_SLOTS_VERSION_NUM: i32 = 170_000;

/// The replication stream's settings for `config` (public for the capture bench's bare-decoder
/// baseline, which must read exactly as capture does).
pub fn stream_config(
    config: &CaptureConfig,
    export_snapshot: bool,
    failover: bool,
) -> ReplicationStreamConfig {
    let slot_options = ReplicationSlotOptions {
        snapshot: Some(if export_snapshot { "export" } else { "nothing" }.to_string()),
        failover,
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
