//! On-demand re-snapshot of one table while streaming continues (DBLog-style watermarks).
//!
//! # Why watermarks
//! The running capture process owns the slot, so a re-snapshot is requested from it (control
//! plane `POST /pipelines/{name}/snapshot?table=schema.table`, or `syncbridge snapshot`) and runs
//! *inside* the replication reader, interleaved with the stream. Rows read by a plain `SELECT`
//! while changes keep committing could otherwise overwrite a newer streamed value in the log (the
//! SELECT result is older than a change committed after it, or newer than one committed before
//! it but still unread). The order between the two is fixed with watermarks written into the WAL,
//! as in Netflix's DBLog:
//!
//! For each primary-key chunk (`WHERE key > last ORDER BY key LIMIT n`, on its own connection):
//! 1. write the **low watermark** `pg_logical_emit_message(true, 'syncbridge_watermark',
//!    '<id>:<run>:<chunk>:low')` (its own committed transaction);
//! 2. `SELECT` the chunk (one statement, READ COMMITTED: it sees everything committed before it);
//! 3. write the **high watermark** `'<id>:<run>:<chunk>:high'`.
//!
//! The stream reader meets both watermarks in commit order. Between them (the *window*) it
//! remembers the key of every change of that table it emits; at the high watermark it appends
//! the chunk's rows as `op = r` events (`source.snapshot = true`, `source.lsn` = the high
//! watermark's LSN), **except** the rows whose key changed in the window, then streams on.
//!
//! Why that is correct, per key `k` of the chunk:
//! - a change to `k` committed *before* the low watermark precedes it in the WAL, so it was already
//!   emitted; the SELECT (which started after the low watermark committed) sees it, so the `r` row
//!   repeats the latest value;
//! - a change committed *after* the high watermark follows the `r` row in the log, so it wins;
//! - a change committed *inside* the window may or may not be visible to the SELECT: the row is
//!   dropped from the chunk and the change's own event (already emitted in WAL order, and newer
//!   than or equal to what the SELECT saw) stands; a delete in the window removes the row for good;
//! - a TRUNCATE of the table in the window (or a change whose key cannot be read) taints the whole
//!   chunk: nothing is emitted for it and the same chunk is read again with new watermarks.
//!
//! So per key the log stays in commit order and applying it (latest wins, deletes remove)
//! converges to the table, without ever pausing the stream: only one chunk (at most
//! `snapshot_chunk_size` rows) is held in memory while its window is open.
//!
//! # Lifecycle and limits
//! - One re-snapshot per pipeline at a time; a second request while one is queued or running is
//!   refused ([`RequestError::Busy`], HTTP 409). The request channel holds one request.
//! - The chunk events of a window are appended (durably) when its high watermark is read, before
//!   the next chunk starts; the job's position is the last durable chunk. After a reconnect the job
//!   continues from there with a new `<run>` number, so replayed watermarks of earlier runs are
//!   ignored; re-sent chunk rows are harmless duplicates.
//! - Progress is kept in memory: a process restart ends a running re-snapshot (state `failed`,
//!   "interrupted"); request it again.
//! - The rows use the relation (columns) the stream knew when the job started; a DDL changing the
//!   table's columns during the job fails it (request it again).
//! - Watermarks are logical messages: they need the same `REPLICATION` privilege as the heartbeats,
//!   and other slots of the database see (and ignore) them.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::catalog::{Catalog, ResolvedTable, qualified_ident, quote_ident, quote_literal};
use super::config::CaptureConfig;
use super::decode::WATERMARK_PREFIX;
use super::error::CaptureError;
use super::now_ms;
use crate::event::change::{ChangeEvent, Op, Relation, Row, Source, Value};
use crate::telemetry::metrics as m;

/// Where a re-snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResnapshotState {
    /// Accepted, waiting for the replication reader to pick it up (it does so while streaming).
    Queued,
    Running,
    Done,
    Failed,
}

/// The state of a pipeline's latest re-snapshot (the body of `GET /pipelines/{name}/snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResnapshotStatus {
    pub id: String,
    /// `schema.table`.
    pub table: String,
    pub state: ResnapshotState,
    /// Chunks whose rows are durable in the log.
    pub chunks: u64,
    /// Rows emitted as `op = r` events.
    pub rows: u64,
    /// Chunk rows not emitted because a change of the same key in the watermark window supersedes them.
    pub superseded: u64,
    /// Chunks read again because their window saw a TRUNCATE (or a change without a readable key).
    pub retried_chunks: u64,
    pub requested_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("table {0} is not synced by this pipeline")]
    UnknownTable(String),
    #[error("re-snapshot {id} of {table} is still {state:?}; wait for it to finish")]
    Busy {
        id: String,
        table: String,
        state: ResnapshotState,
    },
}

#[derive(Debug)]
pub(crate) struct ResnapshotRequest {
    id: String,
    table: String,
}

/// The requesting side (control plane) of one pipeline's re-snapshots. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResnapshotHandle {
    pipeline: String,
    tables: Arc<Vec<String>>,
    tx: mpsc::Sender<ResnapshotRequest>,
    /// A watch so the run history can follow each re-snapshot (see [`ResnapshotHandle::subscribe`]).
    status: Arc<watch::Sender<Option<ResnapshotStatus>>>,
}

/// The capture side: hand it to [`super::run_with_control`].
#[derive(Debug)]
pub struct ResnapshotRequests {
    rx: mpsc::Receiver<ResnapshotRequest>,
    status: Arc<watch::Sender<Option<ResnapshotStatus>>>,
}

impl ResnapshotHandle {
    /// A connected pair for `pipeline` whose synced tables are `tables` (`schema.table`).
    pub fn channel(pipeline: &str, tables: Vec<String>) -> (Self, ResnapshotRequests) {
        // One slot: at most one request is ever queued (a second one is refused as busy).
        let (tx, rx) = mpsc::channel(1);
        let status = Arc::new(watch::Sender::new(None));
        (
            Self {
                pipeline: pipeline.to_string(),
                tables: Arc::new(tables),
                tx,
                status: status.clone(),
            },
            ResnapshotRequests { rx, status },
        )
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    pub fn has_table(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t == table)
    }

    /// Queues a re-snapshot of `table`; returns its (queued) status.
    pub fn request(&self, table: &str) -> Result<ResnapshotStatus, RequestError> {
        if !self.has_table(table) {
            return Err(RequestError::UnknownTable(table.to_string()));
        }
        let mut result = None;
        // Checked and set under the watch's lock, so two requests cannot both pass the check.
        self.status.send_if_modified(|status| {
            result = Some(self.enqueue(status, table));
            matches!(result, Some(Ok(_)))
        });
        result.unwrap_or_else(|| unreachable!("send_if_modified runs its closure"))
    }

    fn enqueue(
        &self,
        status: &mut Option<ResnapshotStatus>,
        table: &str,
    ) -> Result<ResnapshotStatus, RequestError> {
        if let Some(s) = status.as_ref()
            && matches!(s.state, ResnapshotState::Queued | ResnapshotState::Running)
        {
            return Err(RequestError::Busy {
                id: s.id.clone(),
                table: s.table.clone(),
                state: s.state,
            });
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let req = ResnapshotRequest {
            id: id.clone(),
            table: table.to_string(),
        };
        if let Err(e) = self.tx.try_send(req) {
            // Full: a request is still waiting (cannot happen while the status says idle);
            // closed: capture has stopped.
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "a request is already waiting",
                mpsc::error::TrySendError::Closed(_) => "capture is not running",
            };
            return Err(RequestError::Busy {
                id: why.to_string(),
                table: table.to_string(),
                state: ResnapshotState::Queued,
            });
        }
        let s = ResnapshotStatus {
            id,
            table: table.to_string(),
            state: ResnapshotState::Queued,
            chunks: 0,
            rows: 0,
            superseded: 0,
            retried_chunks: 0,
            requested_at_ms: now_ms(),
            finished_at_ms: None,
            error: None,
        };
        *status = Some(s.clone());
        Ok(s)
    }

    /// The latest re-snapshot's status (`None` if none was requested since start).
    pub fn status(&self) -> Option<ResnapshotStatus> {
        self.status.borrow().clone()
    }

    /// Follows the latest re-snapshot's status (each change is seen, the newest when several
    /// happened between two reads).
    pub fn subscribe(&self) -> watch::Receiver<Option<ResnapshotStatus>> {
        self.status.subscribe()
    }
}

impl ResnapshotRequests {
    /// Splits off the requests for query sources (`is_query(table)`): the first half goes to
    /// capture, the second to the query poller (`capture::query`), which answers a re-snapshot
    /// with a full read that emits every row. Both report on the same status. Needs a runtime.
    pub fn split(self, is_query: fn(&str) -> bool) -> (ResnapshotRequests, ResnapshotRequests) {
        let (to_capture, capture_rx) = mpsc::channel(1);
        let (to_queries, queries_rx) = mpsc::channel(1);
        let mut rx = self.rx;
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let tx = if is_query(&r.table) {
                    &to_queries
                } else {
                    &to_capture
                };
                if tx.send(r).await.is_err() {
                    break;
                }
            }
        });
        let status = self.status;
        (
            ResnapshotRequests {
                rx: capture_rx,
                status: status.clone(),
            },
            ResnapshotRequests {
                rx: queries_rx,
                status,
            },
        )
    }

    /// The next request: its id and table (`None` once the handles are gone).
    pub(crate) async fn recv(&mut self) -> Option<(String, String)> {
        self.rx.recv().await.map(|q| (q.id, q.table))
    }

    /// Moves request `id` to `state`, with the rows emitted so far and, when it failed, why.
    pub(crate) fn report(
        &self,
        id: &str,
        state: ResnapshotState,
        rows: u64,
        error: Option<String>,
    ) {
        self.status.send_if_modified(|s| match s.as_mut() {
            Some(s) if s.id == id => {
                s.state = state;
                s.rows = rows;
                if matches!(state, ResnapshotState::Done | ResnapshotState::Failed) {
                    s.finished_at_ms = Some(now_ms());
                }
                s.error = error;
                true
            }
            _ => false,
        });
    }
}

/// One chunk as read between its watermarks.
#[derive(Debug)]
pub(crate) struct ChunkRead {
    run: u64,
    chunk: u64,
    rows: Vec<Row>,
    /// Key (text) of the last row: where the next chunk starts.
    last_key: Option<Vec<String>>,
    /// Fewer rows than the chunk size: this is the last chunk.
    last: bool,
}

/// What the reader tells the chunk task after a high watermark.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// The chunk is durable: read the next one.
    Advance,
    /// The chunk was tainted: read it again.
    Retry,
}

/// What a high watermark did with its chunk.
enum Closed {
    /// The window was tainted: the chunk is read again.
    Retry,
    /// Append these events (the rows not superseded by the stream).
    Emit {
        events: Vec<ChangeEvent>,
        superseded: u64,
    },
}

/// The window between a chunk's low and high watermarks.
#[derive(Debug, Default)]
struct Window {
    chunk: u64,
    changed: HashSet<Vec<String>>,
    tainted: bool,
}

/// A running re-snapshot (reader side). Survives reconnects; its task does not.
#[derive(Debug)]
pub(crate) struct Job {
    id: String,
    table: ResolvedTable,
    rel: Arc<Relation>,
    key_idx: Vec<usize>,
    /// Key of the last durable chunk's last row.
    last_key: Option<Vec<String>>,
    /// Incremented per task start, so watermarks of an earlier run never match.
    run: u64,
    task: Option<Task>,
    window: Option<Window>,
    pending: Option<ChunkRead>,
}

impl Job {
    /// The rows of chunk `chunk` of this run, read before its high watermark was written.
    fn take_chunk(&mut self, run: u64, chunk: u64) -> Result<ChunkRead, String> {
        if self.pending.as_ref().is_none_or(|p| p.chunk != chunk) {
            // The task sent the rows before writing this watermark: they are queued.
            let msg = self.task.as_mut().map(|t| t.rows_rx.try_recv());
            match msg {
                Some(Ok(Ok(c))) => self.pending = Some(c),
                Some(Ok(Err(e))) => return Err(e),
                _ => return Err(format!("rows of chunk {chunk} are missing")),
            }
        }
        self.pending
            .take_if(|p| p.chunk == chunk && p.run == run)
            .ok_or_else(|| format!("rows of chunk {chunk} are missing"))
    }

    /// A DDL since the job started: the chunk's row shape is no longer the stream's.
    fn check_columns(&self, catalog: &Catalog) -> Result<(), String> {
        if let Some(now) = catalog.relation(self.table.oid)
            && now
                .columns
                .iter()
                .map(|c| &c.name)
                .ne(self.rel.columns.iter().map(|c| &c.name))
        {
            return Err(format!(
                "the columns of {} changed during the re-snapshot; request it again",
                self.table.spec.qualified()
            ));
        }
        Ok(())
    }

    /// The high watermark closed `window`: its chunk's rows minus the keys the stream changed
    /// inside the window, or a retry of the chunk when the window is tainted.
    fn close_window(
        &mut self,
        window: Window,
        run: u64,
        lsn: u64,
        catalog: &Catalog,
        db: &str,
        pipeline: &str,
    ) -> Result<Closed, String> {
        let read = self.take_chunk(run, window.chunk)?;
        self.check_columns(catalog)?;
        if window.tainted {
            if let Some(t) = &self.task {
                let _ = t.next_tx.try_send(Next::Retry);
            }
            return Ok(Closed::Retry);
        }
        let qualified = self.table.spec.qualified();
        let source = Source {
            connector: crate::event::change::CONNECTOR_WAL,
            pipeline: pipeline.to_string(),
            db: db.to_string(),
            lsn,
            tx_id: None,
            commit_ts_ms: now_ms(),
            origin: None,
            snapshot: true,
        };
        let events = self.unchanged_rows(&window, &read, source);
        let superseded = (read.rows.len() - events.len()) as u64;
        let emitted = events.len() as u64;
        metrics::counter!(m::SNAPSHOT_ROWS_TOTAL, "pipeline" => pipeline.to_string(), "table" => qualified.clone())
            .increment(emitted);
        metrics::counter!(m::RESNAPSHOT_ROWS_SUPERSEDED_TOTAL, "pipeline" => pipeline.to_string(), "table" => qualified)
            .increment(superseded);
        // The rows are handed over; the position stays until the chunk is durable.
        self.pending = Some(ChunkRead {
            rows: Vec::new(),
            ..read
        });
        Ok(Closed::Emit { events, superseded })
    }

    /// `op = r` events for the chunk's rows whose key the stream did not change in the window.
    fn unchanged_rows(
        &self,
        window: &Window,
        read: &ChunkRead,
        source: Source,
    ) -> Vec<ChangeEvent> {
        let mut events = Vec::with_capacity(read.rows.len());
        for row in read.rows.iter() {
            let key: Option<Vec<String>> = self
                .key_idx
                .iter()
                .map(|&i| match &row[i] {
                    Value::Text(s) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            if key.as_ref().is_some_and(|k| window.changed.contains(k)) {
                continue;
            }
            events.push(ChangeEvent {
                relation: self.rel.clone(),
                op: Op::Read,
                before: None,
                after: Some(row.clone()),
                source: source.clone(),
                ts_ms: source.commit_ts_ms,
            });
        }
        events
    }
}

#[derive(Debug)]
struct Task {
    rows_rx: mpsc::Receiver<Result<ChunkRead, String>>,
    next_tx: mpsc::Sender<Next>,
    handle: JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Reader-side state of a pipeline's re-snapshots (held across sessions by the run loop).
#[derive(Debug, Default)]
pub(crate) struct Resnapper {
    pub(crate) requests: Option<ResnapshotRequests>,
    pub(crate) job: Option<Job>,
}

/// A message of the chunk task (opaque to the run loop).
#[derive(Debug)]
pub(crate) struct ChunkMsg(Option<Result<ChunkRead, String>>);

/// What the run loop should do after a committed transaction's watermarks.
pub(crate) struct ChunkOutcome {
    /// `op = r` events to append after the transaction's own events (then flush and call
    /// [`Resnapper::chunk_durable`]).
    pub events: Vec<ChangeEvent>,
}

impl Resnapper {
    pub(crate) fn new(requests: Option<ResnapshotRequests>) -> Self {
        Self {
            requests,
            job: None,
        }
    }

    /// True when a new request may be taken.
    pub(crate) fn idle(&self) -> bool {
        self.requests.is_some() && self.job.is_none()
    }

    pub(crate) fn has_task(&self) -> bool {
        self.job.as_ref().is_some_and(|j| j.task.is_some())
    }

    /// Waits for the next request (pending forever without a request channel). An associated
    /// function on the field, so the run loop can wait for requests and chunks at once.
    pub(crate) async fn next_request(
        requests: &mut Option<ResnapshotRequests>,
    ) -> Option<(String, String)> {
        match requests.as_mut() {
            Some(r) => r.rx.recv().await.map(|q| (q.id, q.table)),
            None => std::future::pending().await,
        }
    }

    /// Waits for the chunk task's next message (pending forever without a task).
    pub(crate) async fn next_chunk(job: &mut Option<Job>) -> ChunkMsg {
        let Some(task) = job.as_mut().and_then(|j| j.task.as_mut()) else {
            return std::future::pending().await;
        };
        ChunkMsg(task.rows_rx.recv().await)
    }

    /// Takes what [`Resnapper::next_chunk`] returned; `Err` fails the job.
    pub(crate) fn accept_chunk(&mut self, msg: ChunkMsg) -> Result<(), String> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        match msg.0 {
            Some(Ok(chunk)) => {
                job.pending = Some(chunk);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err("the chunk reader stopped".into()),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ResnapshotStatus)) {
        if let (Some(r), Some(job)) = (&self.requests, &self.job) {
            r.status.send_if_modified(|s| match s.as_mut() {
                Some(s) if s.id == job.id => {
                    f(s);
                    true
                }
                _ => false,
            });
        }
    }

    fn set_status(&self, id: &str, f: impl FnOnce(&mut ResnapshotStatus)) {
        if let Some(r) = &self.requests {
            r.status.send_if_modified(|s| match s.as_mut() {
                Some(s) if s.id == id => {
                    f(s);
                    true
                }
                _ => false,
            });
        }
    }

    /// Ends the current job as failed (it can be requested again).
    pub(crate) fn fail(&mut self, pipeline: &str, error: String) {
        if let Some(job) = &self.job {
            tracing::warn!(pipeline = %pipeline, table = %job.table.spec.qualified(), id = %job.id, error = %error, "re-snapshot failed");
        }
        self.update(|s| {
            s.state = ResnapshotState::Failed;
            s.finished_at_ms = Some(now_ms());
            s.error = Some(error);
        });
        self.job = None;
        metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => pipeline.to_string()).set(0.0);
    }

    /// The process is stopping: a running job cannot continue after a restart.
    pub(crate) fn interrupt(&mut self, pipeline: &str) {
        if self.job.is_some() {
            self.fail(
                pipeline,
                "interrupted: capture stopped; request it again".into(),
            );
        }
    }

    /// The session ended (reconnect): the task dies with it, the job continues in the next one.
    pub(crate) fn session_ended(&mut self) {
        if let Some(job) = self.job.as_mut() {
            job.task = None;
            job.window = None;
            job.pending = None;
        }
    }

    /// Takes a request: resolves the table and its relation, then starts the chunk task.
    pub(crate) async fn start(
        &mut self,
        id: String,
        table: String,
        tables: &[ResolvedTable],
        catalog: &mut Catalog,
        client: &Client,
        config: &CaptureConfig,
    ) -> Result<(), CaptureError> {
        let Some(resolved) = tables.iter().find(|t| t.spec.qualified() == table) else {
            self.set_status(&id, |s| {
                s.state = ResnapshotState::Failed;
                s.error = Some(format!("table {table} is not captured by this pipeline"));
                s.finished_at_ms = Some(now_ms());
            });
            return Ok(());
        };
        let rel = match catalog.relation(resolved.oid) {
            Some(r) => r.clone(),
            None => match catalog.relation_from_catalog(client, resolved.oid).await {
                Ok(r) => r,
                Err(e) => {
                    // The session reconnects; the request must not stay "queued" forever.
                    self.set_status(&id, |s| {
                        s.state = ResnapshotState::Failed;
                        s.error = Some(format!("cannot read the table's columns: {e}"));
                        s.finished_at_ms = Some(now_ms());
                    });
                    return Err(e);
                }
            },
        };
        let key_idx: Option<Vec<usize>> = resolved
            .key
            .iter()
            .map(|k| rel.columns.iter().position(|c| &c.name == k))
            .collect();
        let Some(key_idx) = key_idx else {
            self.set_status(&id, |s| {
                s.state = ResnapshotState::Failed;
                s.error = Some(format!("a key column of {table} is missing"));
                s.finished_at_ms = Some(now_ms());
            });
            return Ok(());
        };
        tracing::info!(pipeline = %config.pipeline, table = %table, id = %id, "re-snapshot started");
        self.job = Some(Job {
            id,
            table: resolved.clone(),
            rel,
            key_idx,
            last_key: None,
            run: 0,
            task: None,
            window: None,
            pending: None,
        });
        self.update(|s| s.state = ResnapshotState::Running);
        metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => config.pipeline.clone()).set(1.0);
        self.ensure_task(config);
        Ok(())
    }

    /// Starts the chunk task of the current job if it has none (new job, or after a reconnect).
    pub(crate) fn ensure_task(&mut self, config: &CaptureConfig) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if job.task.is_some() {
            return;
        }
        job.run += 1;
        let (rows_tx, rows_rx) = mpsc::channel(1);
        let (next_tx, next_rx) = mpsc::channel(1);
        let reader = ChunkReader {
            url: config.source_url.clone(),
            id: job.id.clone(),
            run: job.run,
            from: qualified_ident(&job.table.spec.schema, &job.table.spec.name),
            columns: job.rel.columns.iter().map(|c| c.name.clone()).collect(),
            key_cols: job
                .key_idx
                .iter()
                .map(|&i| {
                    (
                        job.rel.columns[i].name.clone(),
                        job.rel.columns[i].type_name.clone(),
                    )
                })
                .collect(),
            key_idx: job.key_idx.clone(),
            chunk_size: config.snapshot_chunk_size,
            last_key: job.last_key.clone(),
        };
        let handle = tokio::spawn(async move {
            if let Err(e) = reader.run(&rows_tx, next_rx).await {
                let _ = rows_tx.send(Err(e)).await;
            }
        });
        job.task = Some(Task {
            rows_rx,
            next_tx,
            handle,
        });
    }

    /// Records the keys of `events` that fall into an open window.
    pub(crate) fn observe(&mut self, events: &[ChangeEvent]) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let Some(window) = job.window.as_mut() else {
            return;
        };
        for e in events.iter().filter(|e| e.relation.oid == job.table.oid) {
            if e.op == Op::Truncate {
                window.tainted = true;
                continue;
            }
            match event_key(e, &job.table.key) {
                Some(k) => {
                    window.changed.insert(k);
                }
                None => window.tainted = true,
            }
        }
    }

    /// Handles one committed watermark. `Some` at the matching high watermark: append its events,
    /// flush, then call [`Resnapper::chunk_durable`].
    pub(crate) fn watermark(
        &mut self,
        content: &str,
        lsn: u64,
        catalog: &Catalog,
        db: &str,
        pipeline: &str,
    ) -> Result<Option<ChunkOutcome>, String> {
        let Some(job) = self.job.as_mut() else {
            return Ok(None);
        };
        let mut parts = content.split(':');
        let (Some(id), Some(run), Some(chunk), Some(kind), None) = (
            parts.next(),
            parts.next().and_then(|r| r.parse::<u64>().ok()),
            parts.next().and_then(|c| c.parse::<u64>().ok()),
            parts.next(),
            parts.next(),
        ) else {
            return Ok(None);
        };
        if id != job.id || run != job.run {
            return Ok(None);
        }
        match kind {
            "low" => {
                job.window = Some(Window {
                    chunk,
                    ..Window::default()
                });
                Ok(None)
            }
            "high" => {
                let Some(window) = job.window.take_if(|w| w.chunk == chunk) else {
                    return Ok(None);
                };
                match job.close_window(window, run, lsn, catalog, db, pipeline)? {
                    Closed::Retry => {
                        self.update(|s| s.retried_chunks += 1);
                        Ok(None)
                    }
                    Closed::Emit { events, superseded } => {
                        let emitted = events.len() as u64;
                        self.update(|s| {
                            s.rows += emitted;
                            s.superseded += superseded;
                        });
                        Ok(Some(ChunkOutcome { events }))
                    }
                }
            }
            _ => Ok(None),
        }
    }

    /// The chunk returned by [`Resnapper::watermark`] is durable: move on (or finish).
    pub(crate) fn chunk_durable(&mut self, pipeline: &str) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let Some(done) = job.pending.take() else {
            return;
        };
        if done.last_key.is_some() {
            job.last_key = done.last_key;
        }
        self.update(|s| s.chunks += 1);
        let Some(job) = self.job.as_mut() else {
            return;
        };
        if done.last {
            tracing::info!(pipeline = %pipeline, table = %job.table.spec.qualified(), id = %job.id, "re-snapshot done");
            self.update(|s| {
                s.state = ResnapshotState::Done;
                s.finished_at_ms = Some(now_ms());
            });
            self.job = None;
            metrics::gauge!(m::SNAPSHOT_TABLES_PENDING, "pipeline" => pipeline.to_string())
                .set(0.0);
        } else if let Some(t) = &job.task {
            let _ = t.next_tx.try_send(Next::Advance);
        }
    }
}

/// The key (text form, key order) of the row a change event is about.
fn event_key(e: &ChangeEvent, key: &[String]) -> Option<Vec<String>> {
    let (primary, secondary) = match e.op {
        Op::Create | Op::Read | Op::Update => (e.after.as_ref()?, e.before.as_ref()),
        Op::Delete => (e.before.as_ref()?, e.after.as_ref()),
        Op::Truncate => return None,
    };
    key.iter()
        .map(|k| {
            let i = e.relation.columns.iter().position(|c| &c.name == k)?;
            match (&primary[i], secondary.map(|r| &r[i])) {
                (Value::Text(s), _) => Some(s.clone()),
                (Value::UnchangedToast, Some(Value::Text(s))) => Some(s.clone()),
                _ => None,
            }
        })
        .collect()
}

/// Reads chunks between watermarks on its own connection.
struct ChunkReader {
    url: String,
    id: String,
    run: u64,
    from: String,
    columns: Vec<String>,
    /// (name, type name) of the key columns.
    key_cols: Vec<(String, String)>,
    key_idx: Vec<usize>,
    chunk_size: usize,
    last_key: Option<Vec<String>>,
}

impl ChunkReader {
    /// Reads the chunk after `self.last_key` (keyset query, text values).
    async fn read_chunk(&self, client: &Client, chunk: u64) -> Result<ChunkRead, String> {
        let select_list: Vec<String> = self.columns.iter().map(|c| quote_ident(c)).collect();
        let key_list: Vec<String> = self.key_cols.iter().map(|(k, _)| quote_ident(k)).collect();
        let filter = match &self.last_key {
            None => String::new(),
            Some(values) => {
                let lits: Vec<String> = values
                    .iter()
                    .zip(&self.key_cols)
                    .map(|(v, (_, ty))| format!("{}::{ty}", quote_literal(v)))
                    .collect();
                format!(" WHERE ({}) > ({})", key_list.join(", "), lits.join(", "))
            }
        };
        let sql = format!(
            "SELECT {} FROM {}{filter} ORDER BY {} LIMIT {}",
            select_list.join(", "),
            self.from,
            key_list.join(", "),
            self.chunk_size
        );
        let mut rows = Vec::new();
        for msg in client
            .simple_query(&sql)
            .await
            .map_err(|e| format!("re-snapshot chunk query failed: {e}"))?
        {
            if let SimpleQueryMessage::Row(r) = msg {
                let mut row = Vec::with_capacity(self.columns.len());
                for i in 0..self.columns.len() {
                    row.push(match r.try_get(i).map_err(|e| e.to_string())? {
                        Some(s) => Value::Text(s.to_string()),
                        None => Value::Null,
                    });
                }
                rows.push(row);
            }
        }
        let last = rows.len() < self.chunk_size;
        let last_key = match rows.last() {
            None => None,
            Some(row) => Some(
                self.key_idx
                    .iter()
                    .map(|&i| match &row[i] {
                        Value::Text(s) => Ok(s.clone()),
                        _ => Err("a key column is NULL: key columns must be NOT NULL"),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(ChunkRead {
            run: self.run,
            chunk,
            rows,
            last_key,
            last,
        })
    }

    async fn run(
        mut self,
        rows_tx: &mpsc::Sender<Result<ChunkRead, String>>,
        mut next_rx: mpsc::Receiver<Next>,
    ) -> Result<(), String> {
        let (client, connection) = crate::pg::connect(&self.url)
            .await
            .map_err(|e| format!("cannot connect for the re-snapshot: {e}"))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut chunk = 0u64;
        loop {
            chunk += 1;
            let mark = |kind: &str| format!("{}:{}:{chunk}:{kind}", self.id, self.run);
            emit(&client, &mark("low")).await?;
            let read = self.read_chunk(&client, chunk).await?;
            let (last, last_key) = (read.last, read.last_key.clone());
            if rows_tx.send(Ok(read)).await.is_err() {
                return Ok(());
            }
            // The rows are queued before the high watermark exists, so the reader has them when
            // it meets the watermark.
            emit(&client, &mark("high")).await?;
            match next_rx.recv().await {
                Some(Next::Advance) => {
                    if last {
                        return Ok(());
                    }
                    if last_key.is_some() {
                        self.last_key = last_key;
                    }
                }
                Some(Next::Retry) => {}
                None => return Ok(()),
            }
        }
    }
}

async fn emit(client: &Client, content: &str) -> Result<(), String> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot write a watermark: {e}"))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_at_a_time_and_checked() {
        let (h, _rx) = ResnapshotHandle::channel("p", vec!["public.a".into()]);
        assert_eq!(
            h.request("public.b"),
            Err(RequestError::UnknownTable("public.b".into()))
        );
        let s = h.request("public.a").unwrap();
        assert_eq!(s.state, ResnapshotState::Queued);
        assert!(matches!(
            h.request("public.a"),
            Err(RequestError::Busy { .. })
        ));
        assert_eq!(h.status().unwrap().id, s.id);
    }
}
