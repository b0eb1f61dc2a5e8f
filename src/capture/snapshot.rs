//! The initial snapshot: every configured table read in primary-key chunks inside one REPEATABLE
//! READ transaction, emitted as `op = r` events, with durable per-table progress.
//!
//! # Which snapshot
//! - First run: the slot is created with `EXPORT_SNAPSHOT`; the read imports that snapshot with
//!   `SET TRANSACTION SNAPSHOT`, so the rows are exactly the state at the slot's consistent point C
//!   and streaming from C continues seamlessly.
//! - Resumed after a crash mid-snapshot: the exported snapshot died with the replication connection.
//!   The remaining chunks (those after the last durable one) are read under a *fresh* snapshot
//!   taken at some time T > C, and then streaming resumes from the slot, i.e. from C (nothing after C
//!   was acknowledged while the snapshot ran). This is correct: a row unchanged since C reads the
//!   same at T as at C; a row changed between C and T reads its value at T, and every change that
//!   led there is also in the WAL after C, so its stream events follow the snapshot event in the
//!   log and the last of them equals the value read at T (a row deleted before T is absent from the
//!   snapshot and its delete is streamed). Applying the log in order therefore converges to the
//!   source state: later WAL events win. Between the snapshot row and the catch-up a consumer may
//!   briefly see an older value (the WAL replay from C); the ledger makes the repeated writes no-ops.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::catalog::{Catalog, ResolvedTable, quote_ident, quote_literal};
use super::config::CaptureConfig;
use super::error::CaptureError;
use super::now_ms;
use super::sink::EventSink;
use super::sink_task::{SharedSink, SinkTask};
use crate::event::change::{ChangeEvent, Op, Relation, Source, Value};
use crate::telemetry::metrics as m;

/// Snapshot progress of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TableProgress {
    Pending,
    /// Chunks up to and including the row with this key (text form, key order) are durable.
    InProgress {
        last_key: Vec<String>,
        rows: u64,
    },
    Done {
        rows: u64,
    },
}

/// Snapshot progress of a pipeline's slot. Written (all `Pending`) *before* the slot is created,
/// so "slot exists but no progress record" can only mean the state directory was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub slot: String,
    /// The slot's consistent point (0 until the slot exists).
    pub consistent_point: u64,
    /// Keyed by `schema.table`.
    pub tables: BTreeMap<String, TableProgress>,
}

impl SnapshotState {
    pub fn is_complete(&self) -> bool {
        self.tables
            .values()
            .all(|t| matches!(t, TableProgress::Done { .. }))
    }
}

/// Durable store of [`SnapshotState`]. `save` returns only when the state is durable.
pub trait SnapshotProgress: Send {
    fn load(&self) -> Result<Option<SnapshotState>, CaptureError>;
    fn save(&mut self, state: &SnapshotState) -> Result<(), CaptureError>;
    /// Where the record lives, for operator messages.
    fn location(&self) -> String;
}

/// A [`SnapshotProgress`] that also publishes every state it made durable that differs from the
/// one before (the loaded one included, which is held without notifying), so the run history
/// can follow a snapshot without reaching into capture: a change seen is work this process did.
#[derive(Debug)]
pub struct ObservedProgress<P> {
    inner: P,
    tx: tokio::sync::watch::Sender<Option<SnapshotState>>,
}

impl<P: SnapshotProgress> ObservedProgress<P> {
    pub fn new(inner: P) -> (Self, tokio::sync::watch::Receiver<Option<SnapshotState>>) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (Self { inner, tx }, rx)
    }
}

impl<P: SnapshotProgress> SnapshotProgress for ObservedProgress<P> {
    fn load(&self) -> Result<Option<SnapshotState>, CaptureError> {
        let state = self.inner.load()?;
        self.tx.send_if_modified(|v| {
            v.clone_from(&state);
            false
        });
        Ok(state)
    }

    fn save(&mut self, state: &SnapshotState) -> Result<(), CaptureError> {
        self.inner.save(state)?;
        self.tx.send_if_modified(|v| {
            let changed = v.as_ref() != Some(state);
            if changed {
                *v = Some(state.clone());
            }
            changed
        });
        Ok(())
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

/// One JSON file per slot under the pipeline's state directory, replaced atomically
/// (write temp, fsync, rename, fsync directory).
#[derive(Debug, Clone)]
pub struct FileProgress {
    path: PathBuf,
}

impl FileProgress {
    pub fn new(state_dir: impl Into<PathBuf>, slot: &str) -> Self {
        Self {
            path: state_dir
                .into()
                .join(format!("capture-{slot}.snapshot.json")),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl SnapshotProgress for FileProgress {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> Result<Option<SnapshotState>, CaptureError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CaptureError::Progress(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CaptureError::Progress(format!(
                "{}: {e}",
                self.path.display()
            ))),
        }
    }

    fn save(&mut self, state: &SnapshotState) -> Result<(), CaptureError> {
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| CaptureError::Progress(e.to_string()))?;
        write_atomically(&self.path, &bytes)
            .map_err(|e| CaptureError::Progress(format!("{}: {e}", self.path.display())))
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new file, never a torn
/// one: write a temporary file beside it, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Reads every table that is not `Done` and emits `op = r` events.
///
/// `exported` is the slot's exported snapshot name on the first run, `None` when resuming (a fresh
/// snapshot is used then, see the module docs). `client` must be a connection dedicated to this
/// read (it holds the transaction). Returns `Ok(false)` when `stop.shutdown` interrupted it (the
/// chunks read are durable and recorded) and fails with [`CaptureError::LostLock`] when the
/// single-reader lock was lost, so a standby that takes over never snapshots concurrently with us.
///
/// The next chunk is queried while the previous ones are encoded and appended on the sink task
/// (at most `config.sink_in_flight` chunks in flight); a chunk's position is recorded only after
/// its append, and every append before it, returned durable.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_snapshot<S: EventSink + 'static, P: SnapshotProgress>(
    stop: &Stop<'_>,
    config: &CaptureConfig,
    client: &Client,
    db: &str,
    exported: Option<&str>,
    tables: &[ResolvedTable],
    catalog: &mut Catalog,
    sink: &SharedSink<S>,
    progress: &mut P,
    state: &mut SnapshotState,
) -> Result<bool, CaptureError> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    if let Some(name) = exported {
        client
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(name)))
            .await?;
    }
    let pending: Vec<&ResolvedTable> = tables
        .iter()
        .filter(|t| {
            !matches!(
                state.tables.get(&t.spec.qualified()),
                Some(TableProgress::Done { .. })
            )
        })
        .collect();
    metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => config.pipeline.clone())
        .set(pending.len() as f64);

    let bar = progress_bar(config, client, &pending).await?;

    let mut sinker: SinkTask<ChunkDone> =
        SinkTask::spawn(sink.clone(), config.sink_in_flight, &config.pipeline);
    let mut rec = Recorder {
        config,
        progress,
        state,
        bar: bar.as_ref(),
        pending: pending.len(),
    };
    let result: Result<bool, CaptureError> = async {
        let mut complete = true;
        for table in &pending {
            let rel = catalog.relation_from_catalog(client, table.oid).await?;
            if let Some(bar) = &bar {
                bar.set_message(table.spec.qualified());
            }
            let table_complete =
                snapshot_table(stop, config, client, db, table, &rel, &mut sinker, &mut rec)
                    .await?;
            if !table_complete {
                complete = false;
                break;
            }
        }
        // Shutdown or the end: what was read is made durable and recorded.
        sinker.drain(&mut |done| rec.record(done)).await?;
        Ok(complete)
    }
    .await;
    // On an error the append in progress finishes (the queued chunks are dropped); a chunk that
    // became durable meanwhile is recorded, so a resumed snapshot re-reads less.
    for done in sinker.stop().await {
        if let Err(e) = rec.record(done) {
            tracing::warn!(pipeline = %config.pipeline, error = %e, "could not record a durable snapshot chunk");
        }
    }
    if !result? {
        return Ok(false);
    }
    client.batch_execute("COMMIT").await?;
    if let Some(bar) = bar {
        bar.finish_with_message("snapshot done");
    }
    Ok(true)
}

/// A terminal progress bar over the pending tables' estimated rows (`reltuples`), when asked for
/// and stderr is a terminal.
async fn progress_bar(
    config: &CaptureConfig,
    client: &Client,
    pending: &[&ResolvedTable],
) -> Result<Option<indicatif::ProgressBar>, CaptureError> {
    if !config.progress_bar || !std::io::stderr().is_terminal() {
        return Ok(None);
    }
    let mut estimate = 0u64;
    for t in pending {
        let row = client
            .query_one(
                "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1",
                &[&t.oid],
            )
            .await?;
        estimate += row.get::<_, i64>(0).max(0) as u64;
    }
    let bar = crate::telemetry::progress().add(indicatif::ProgressBar::new(estimate));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Ok(Some(bar))
}

/// Why a snapshot must stop between chunks.
#[derive(Debug)]
pub(crate) struct Stop<'a> {
    pub shutdown: &'a tokio_util::sync::CancellationToken,
    pub lock_lost: &'a tokio_util::sync::CancellationToken,
}

/// The progress a chunk handed to the sink task makes once it is durable.
struct ChunkDone {
    table: String,
    progress: TableProgress,
    /// Rows of the chunk (0 for the end-of-table marker).
    rows: u64,
    /// When the table's read started (on the end-of-table marker, for the log line).
    started: Option<Instant>,
}

/// Records durable chunks, in the order the sink task reports them.
struct Recorder<'a, P> {
    config: &'a CaptureConfig,
    progress: &'a mut P,
    state: &'a mut SnapshotState,
    bar: Option<&'a indicatif::ProgressBar>,
    /// Tables of this run not yet `Done`.
    pending: usize,
}

impl<P: SnapshotProgress> Recorder<'_, P> {
    fn record(&mut self, done: ChunkDone) -> Result<(), CaptureError> {
        let finished = match &done.progress {
            TableProgress::Done { rows } => Some(*rows),
            _ => None,
        };
        self.state.tables.insert(done.table.clone(), done.progress);
        self.progress.save(self.state)?;
        let pipeline = &self.config.pipeline;
        if done.rows > 0 {
            metrics::counter!(m::SNAPSHOT_ROWS_TOTAL, "pipeline" => pipeline.clone(), "table" => done.table.clone())
                .increment(done.rows);
            if let Some(bar) = self.bar {
                bar.inc(done.rows);
            }
        }
        if let Some(rows) = finished {
            self.pending = self.pending.saturating_sub(1);
            metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => pipeline.clone())
                .set(self.pending as f64);
            let elapsed_ms = done.started.map_or(0, |t| t.elapsed().as_millis() as u64);
            tracing::info!(table = %done.table, rows, elapsed_ms, "snapshot of table done");
        }
        Ok(())
    }
}

/// Reads one table's remaining chunks and hands them to the sink task; `Ok(false)` on shutdown.
#[allow(clippy::too_many_arguments)]
async fn snapshot_table<P: SnapshotProgress>(
    stop: &Stop<'_>,
    config: &CaptureConfig,
    client: &Client,
    db: &str,
    table: &ResolvedTable,
    rel: &Arc<Relation>,
    sinker: &mut SinkTask<ChunkDone>,
    rec: &mut Recorder<'_, P>,
) -> Result<bool, CaptureError> {
    let qualified = table.spec.qualified();
    let (mut last_key, mut rows) = match rec.state.tables.get(&qualified) {
        Some(TableProgress::InProgress { last_key, rows }) => (Some(last_key.clone()), *rows),
        _ => (None, 0),
    };
    let consistent_point = rec.state.consistent_point;
    let query = ChunkQuery::new(table, rel)?;
    let started = Instant::now();
    loop {
        if stop.lock_lost.is_cancelled() {
            return Err(CaptureError::LostLock);
        }
        if stop.shutdown.is_cancelled() {
            return Ok(false);
        }
        let sql = query.sql(last_key.as_deref(), config.snapshot_chunk_size)?;
        let ts = now_ms();
        let source = Source {
            connector: crate::event::change::CONNECTOR_WAL,
            pipeline: config.pipeline.clone(),
            db: db.to_string(),
            lsn: consistent_point,
            tx_id: None,
            commit_ts_ms: ts,
            origin: None,
            snapshot: true,
        };
        let events = read_chunk(client, &sql, rel, &source).await?;
        let n = events.len();
        if let Some(last) = events.last() {
            let key = query.key_of(last)?;
            rows += n as u64;
            last_key = Some(key.clone());
            let done = ChunkDone {
                table: qualified.clone(),
                progress: TableProgress::InProgress {
                    last_key: key,
                    rows,
                },
                rows: n as u64,
                started: None,
            };
            // The next chunk is queried while this one is appended.
            sinker
                .submit(events, done, &mut |done| rec.record(done))
                .await?;
        }
        if n < config.snapshot_chunk_size {
            break;
        }
    }
    // An event-less marker: the table is recorded done once all its chunks are durable.
    let done = ChunkDone {
        table: qualified,
        progress: TableProgress::Done { rows },
        rows: 0,
        started: Some(started),
    };
    sinker
        .submit(Vec::new(), done, &mut |done| rec.record(done))
        .await?;
    Ok(true)
}

/// The keyset query of one table's chunks: all columns, ordered by the key, after a key.
struct ChunkQuery<'a> {
    rel: &'a Relation,
    qualified: String,
    select_list: Vec<String>,
    key_list: Vec<String>,
    /// Position of each key column in the relation's columns.
    key_idx: Vec<usize>,
    from: String,
}

impl<'a> ChunkQuery<'a> {
    fn new(table: &ResolvedTable, rel: &'a Relation) -> Result<Self, CaptureError> {
        let qualified = table.spec.qualified();
        let key_idx: Vec<usize> = table
            .key
            .iter()
            .map(|k| {
                rel.columns
                    .iter()
                    .position(|c| &c.name == k)
                    .ok_or_else(|| {
                        CaptureError::Config(format!("key column {k:?} missing from {qualified}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            rel,
            select_list: rel.columns.iter().map(|c| quote_ident(&c.name)).collect(),
            key_list: table.key.iter().map(|k| quote_ident(k)).collect(),
            key_idx,
            from: super::catalog::qualified_ident(&table.spec.schema, &table.spec.name),
            qualified,
        })
    }

    /// The next chunk after `last_key` (the first chunk without one).
    fn sql(&self, last_key: Option<&[String]>, chunk_size: usize) -> Result<String, CaptureError> {
        let filter = match last_key {
            None => String::new(),
            Some(values) => {
                if values.len() != self.key_idx.len() {
                    return Err(CaptureError::Progress(format!(
                        "stored snapshot position of {} has {} key values, the key has {}",
                        self.qualified,
                        values.len(),
                        self.key_idx.len()
                    )));
                }
                let lits: Vec<String> = values
                    .iter()
                    .zip(&self.key_idx)
                    .map(|(v, &i)| {
                        format!("{}::{}", quote_literal(v), self.rel.columns[i].type_name)
                    })
                    .collect();
                format!(
                    " WHERE ({}) > ({})",
                    self.key_list.join(", "),
                    lits.join(", ")
                )
            }
        };
        // Simple query protocol: every value comes back in PostgreSQL's text output form.
        Ok(format!(
            "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {chunk_size}",
            self.select_list.join(", "),
            self.from,
            self.key_list.join(", "),
        ))
    }

    /// The key (text) of a row read by this query: where the next chunk starts.
    fn key_of(&self, event: &ChangeEvent) -> Result<Vec<String>, CaptureError> {
        let mut key = Vec::with_capacity(self.key_idx.len());
        for &i in &self.key_idx {
            match event.after.as_ref().and_then(|r| r.get(i)) {
                Some(Value::Text(s)) => key.push(s.clone()),
                _ => {
                    return Err(CaptureError::Config(format!(
                        "key column {} of {} is NULL in a row: key columns must be NOT NULL",
                        self.rel.columns[i].name, self.qualified
                    )));
                }
            }
        }
        Ok(key)
    }
}

/// Runs one chunk query; every row becomes an `op = r` event from `source`.
async fn read_chunk(
    client: &Client,
    sql: &str,
    rel: &Arc<Relation>,
    source: &Source,
) -> Result<Vec<ChangeEvent>, CaptureError> {
    let mut events = Vec::new();
    for msg in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = msg {
            let mut values = Vec::with_capacity(rel.columns.len());
            for i in 0..rel.columns.len() {
                values.push(match row.try_get(i)? {
                    Some(s) => Value::Text(s.to_string()),
                    None => Value::Null,
                });
            }
            events.push(ChangeEvent {
                relation: rel.clone(),
                op: Op::Read,
                before: None,
                after: Some(values),
                source: source.clone(),
                ts_ms: source.commit_ts_ms,
            });
        }
    }
    Ok(events)
}
