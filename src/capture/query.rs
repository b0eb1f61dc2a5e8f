//! Query sources: a sync entry's `query:` (any SELECT, typically of a view) read by polling
//! instead of logical replication, for what replication cannot see (views, joins) and for
//! databases where the sync role has no `REPLICATION` right. Push-only.
//!
//! # What a poll emits
//! Rows become the same [`ChangeEvent`]s, on the same per-source topic
//! (`<prefix>.<pipeline>.query.<list slug>`, see [`crate::config::query_table_name`]), that WAL
//! capture emits for a table, so mapping, routing, the hash ledger, coalescing, dead letters,
//! lineage and drift work unchanged:
//! - `op = c` for a key not read before, `u` for a known key whose row changed, `d` (key columns
//!   only) for a known key that a **full read** no longer returns;
//! - `source.connector` is `syncbridge.query.full`, `.timestamp` or `.incrementing` (the read
//!   that produced the event); `source.lsn` carries an incrementing cursor's value (it grows per
//!   row as an LSN does), else 0, which the processor never treats as stale: a timestamp is
//!   not an order per row (see the hazard below), and a row read is always its current state.
//!
//! The poller remembers, durably, every key it emitted with a hash of its row (a JSON file per
//! query source in the pipeline's state directory). A row read again unchanged is not emitted
//! again, so an unchanged read costs neither log space nor Graph writes; the first read of each
//! source after a start emits every row it reads (the ledger absorbs them: 0 writes), so a
//! mapping changed while stopped reaches the rows that did not change; with `full_every` that
//! first read is a full one, so it reaches every row.
//!
//! # Modes (`poll:`)
//! - `full: true`: every `every`, the whole result is read; vanished keys become deletes.
//! - `cursor: { column, kind }`: only rows whose cursor column is at or past the last value read
//!   (`>=`: rows that share the last value and commit later are still read). Rows whose cursor
//!   is NULL are seen by full reads only. `full_every:` adds a full read (the only way a cursor
//!   source learns about deleted rows) at most that often.
//!
//! # Durability
//! The cursor, the key set and the hashes move only after [`EventSink::append`] returned `Ok` for
//! every event of the read (at least once: a crash in between re-emits the read, which the ledger
//! absorbs).
//!
//! # The late-commit hazard of timestamp cursors
//! A stamp such as `now()` or `clock_timestamp()` is taken before the transaction commits. A
//! transaction stamped 10:00:00 that commits after one stamped 10:00:05 has been read is
//! invisible to `cursor >= 10:00:05`. `lookback` re-reads that far before the cursor on every
//! poll (unchanged rows cost nothing, see above): a transaction that commits within `lookback`
//! of its stamp is not missed. Longer ones are missed until the next full read (`full_every`).
//! Incrementing cursors (sequences) have the same hazard (a sequence value is taken before the
//! commit); `full_every` covers them.
//!
//! # Re-snapshots
//! A re-snapshot of a query source (`POST /pipelines/{name}/snapshot?table=query.<slug>`, a
//! `resnapshot` job, drift heal, start-up repairs) is its next read made a full one, due at once,
//! that emits every row; it is done when that read is durable.
//!
//! # One reader
//! The poller holds the advisory lock `lock_key("query:<pipeline>")` on its connection, so only
//! one process of a pipeline polls (others stand by and take over when it is gone).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::catalog::{Catalog, quote_ident, quote_literal};
use super::error::CaptureError;
use super::resnapshot::{ResnapshotRequests, ResnapshotState};
use super::sink::{EventSink, SinkError};
use crate::config::{CursorKind, QuerySource, SourceConfig, SyncEntry, TableName};
use crate::event::change::{ChangeEvent, Op, Relation, Row, Source, Value};
use crate::telemetry::metrics as m;

/// Events per append: bounds one log write while a 100k-row first read goes through.
const APPEND_CHUNK: usize = 1000;
/// Reconnect backoff after a retryable failure: first wait, doubling up to the maximum.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Every row and column of a query source's `sql`.
pub fn select_all(sql: &str) -> String {
    format!("SELECT * FROM ({sql}) AS sb_query")
}

/// The query sources of one pipeline.
#[derive(Debug, Clone)]
pub struct QueryPollConfig {
    pub pipeline: String,
    pub source: SourceConfig,
    pub entries: Vec<QueryEntry>,
    /// Where each source's key set and cursor are kept (`query-<name>.json`).
    pub state_dir: PathBuf,
}

/// One query source.
#[derive(Debug, Clone)]
pub struct QueryEntry {
    /// The name its events carry (`query.<list slug>`).
    pub table: TableName,
    pub key: Vec<String>,
    pub query: QuerySource,
}

impl QueryPollConfig {
    /// The query sources among `entries` (none: nothing to poll).
    pub fn new(
        pipeline: &str,
        source: &SourceConfig,
        entries: &[SyncEntry],
        state_dir: PathBuf,
    ) -> Self {
        let entries = entries
            .iter()
            .filter_map(|e| {
                Some(QueryEntry {
                    table: e.table.clone(),
                    key: e.key.clone().unwrap_or_default(),
                    query: e.query.clone()?,
                })
            })
            .collect();
        Self {
            pipeline: pipeline.to_owned(),
            source: source.clone(),
            entries,
            state_dir,
        }
    }
}

/// Why polling stopped or paused. [`QueryError::is_retryable`] says whether it resumes alone.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("connecting to the source: {0}")]
    Connect(#[from] crate::pg::PgConnectError),
    /// The query (or a catalog lookup) failed; retryable when the connection was lost.
    #[error("query source {table}: {source}")]
    Query {
        table: String,
        source: tokio_postgres::Error,
    },
    #[error("query source {table}: {source}")]
    Catalog { table: String, source: CaptureError },
    #[error("query source {table}: the log refused the events: {source}")]
    Sink { table: String, source: SinkError },
    /// The key set / cursor file cannot be read or written (fix the state directory).
    #[error("query source state {path}: {reason}")]
    State { path: String, reason: String },
    #[error("the source connection was lost")]
    ConnectionLost,
}

impl QueryError {
    pub fn is_retryable(&self) -> bool {
        match self {
            QueryError::Connect(e) => e.is_retryable(),
            // A broken query stays broken until the view or the config is fixed; a closed
            // connection or a server restart does not.
            QueryError::Query { source, .. } => super::error::postgres_retryable(source),
            QueryError::Catalog { source, .. } => source.is_retryable(),
            QueryError::Sink { source, .. } => source.retryable,
            QueryError::State { .. } => false,
            QueryError::ConnectionLost => true,
        }
    }
}

/// Polls every query source of the pipeline until `shutdown`, reconnecting with backoff after
/// retryable failures; returns the first failure that is not.
pub async fn run<S: EventSink>(
    cfg: QueryPollConfig,
    mut sink: S,
    mut requests: Option<ResnapshotRequests>,
    shutdown: CancellationToken,
) -> Result<(), QueryError> {
    let mut pollers = cfg
        .entries
        .iter()
        .map(|e| Poller::load(&cfg, e))
        .collect::<Result<Vec<_>, _>>()?;
    let mut backoff = MIN_BACKOFF;
    while !shutdown.is_cancelled() {
        match session(&cfg, &mut pollers, &mut sink, &mut requests, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                warn!(pipeline = %cfg.pipeline, retry_in = ?backoff, "query sources: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One connection's life: take the single-reader lock, then poll each source when it is due.
async fn session<S: EventSink>(
    cfg: &QueryPollConfig,
    pollers: &mut [Poller],
    sink: &mut S,
    requests: &mut Option<ResnapshotRequests>,
    shutdown: &CancellationToken,
) -> Result<(), QueryError> {
    let urls: Vec<&str> = cfg.source.instances().map(|u| u.expose()).collect();
    let url = match urls.len() {
        1 => urls[0],
        _ => urls[crate::pg::find_primary(&urls).await.unwrap_or(0)],
    };
    let key = crate::pg::lock_key(&format!("query:{}", cfg.pipeline));
    let standing_by = || info!(pipeline = %cfg.pipeline, "query sources: another process polls them; standing by");
    let retry = crate::pg::LOCK_RETRY_INTERVAL;
    let Some(conn) =
        crate::pg::acquire_advisory_lock(url, key, retry, shutdown, standing_by).await?
    else {
        return Ok(());
    };
    let db: String = conn
        .client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|source| QueryError::Query {
            table: "-".into(),
            source,
        })?
        .get(0);
    let mut catalog = Catalog::default();
    loop {
        let now = Instant::now();
        for p in pollers.iter_mut().filter(|p| p.due <= now) {
            let emitted = p
                .poll(&conn.client, &mut catalog, (&cfg.pipeline, &db), sink)
                .await?;
            if let (Some(id), Some(r)) = (p.reread.take(), requests.as_ref()) {
                r.report(&id, ResnapshotState::Done, emitted, None);
            }
            p.due = Instant::now() + p.entry.query.every;
        }
        let next = pollers
            .iter()
            .map(|p| p.due)
            .min()
            .unwrap_or(now + MAX_BACKOFF);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = conn.lost.cancelled() => return Err(QueryError::ConnectionLost),
            Some((id, table)) = next_request(requests) => reread(pollers, requests, id, &table),
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// The next re-snapshot request (pending forever without a request channel).
async fn next_request(requests: &mut Option<ResnapshotRequests>) -> Option<(String, String)> {
    match requests.as_mut() {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// A re-snapshot of a query source: its next read is a full one, due now, that emits every row
/// (the request is done when that read is durable).
fn reread(pollers: &mut [Poller], requests: &Option<ResnapshotRequests>, id: String, table: &str) {
    let Some(r) = requests else { return };
    match pollers.iter_mut().find(|p| p.table() == table) {
        Some(p) => {
            r.report(&id, ResnapshotState::Running, 0, None);
            p.reread = Some(id);
            p.emit_all = true;
            p.due = Instant::now();
        }
        None => {
            let why = format!("{table} is not a query source of this pipeline");
            r.report(&id, ResnapshotState::Failed, 0, Some(why));
        }
    }
}

/// What a source remembers between reads (and restarts).
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// The cursor column's text form in the last row of the last incremental read.
    cursor: Option<String>,
    /// When the last full read started (ms since the epoch).
    last_full_ms: Option<i64>,
    /// Every key emitted and not deleted since (key columns' text), with its row's hash.
    rows: Vec<(Vec<String>, u64)>,
}

/// One source's poller.
#[derive(Debug)]
struct Poller {
    entry: QueryEntry,
    /// Stable made-up relation oid (the encoder caches schemas per oid).
    oid: u32,
    path: PathBuf,
    cursor: Option<String>,
    last_full_ms: Option<i64>,
    rows: HashMap<Vec<String>, u64>,
    /// The first read after a start emits every row it reads (a changed mapping reaches them).
    emit_all: bool,
    /// A re-snapshot in progress (its id): the next read is a full one.
    reread: Option<String>,
    due: Instant,
}

/// One read's outcome, applied to the poller once its events are durable.
#[derive(Debug, Default)]
struct Read {
    events: Vec<ChangeEvent>,
    upserts: Vec<(Vec<String>, u64)>,
    deletes: Vec<Vec<String>>,
    cursor: Option<String>,
    null_keys: usize,
}

impl Poller {
    fn load(cfg: &QueryPollConfig, entry: &QueryEntry) -> Result<Self, QueryError> {
        let path = cfg
            .state_dir
            .join(format!("query-{}.json", entry.table.name));
        let state: State = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| QueryError::State {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(QueryError::State {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        };
        Ok(Self {
            entry: entry.clone(),
            oid: crc32fast::hash(entry.table.to_string().as_bytes()),
            path,
            cursor: state.cursor,
            last_full_ms: state.last_full_ms,
            rows: state.rows.into_iter().collect(),
            emit_all: true,
            reread: None,
            due: Instant::now(),
        })
    }

    fn table(&self) -> String {
        self.entry.table.to_string()
    }

    /// A full read now: always without a cursor, else first after a start (it emits every row,
    /// see `emit_all`) and whenever `full_every` has passed.
    fn full_due(&self, now_ms: i64) -> bool {
        let q = &self.entry.query;
        match (&q.cursor, q.full_every) {
            (None, _) => true,
            (Some(_), Some(every)) => {
                (self.emit_all && self.cursor.is_some())
                    || self
                        .last_full_ms
                        .is_none_or(|last| now_ms - last >= every.as_millis() as i64)
            }
            (Some(_), None) => false,
        }
    }

    /// One read; returns how many rows it emitted (`c`/`u` events).
    async fn poll<S: EventSink>(
        &mut self,
        client: &Client,
        catalog: &mut Catalog,
        (pipeline, db): (&str, &str),
        sink: &mut S,
    ) -> Result<u64, QueryError> {
        let started_ms = super::now_ms();
        let full = self.reread.is_some() || self.full_due(started_ms);
        let rel = self.relation(client, catalog).await?;
        let sql = self.select_sql(&rel, full);
        let query_err = |source| QueryError::Query {
            table: self.table(),
            source,
        };
        let messages = client.simple_query(&sql).await.map_err(query_err)?;
        let source = read_source(self.entry.query.connector(full), (pipeline, db), started_ms);
        let read = self
            .diff(&rel, &messages, full, &source)
            .map_err(query_err)?;
        for chunk in read.events.chunks(APPEND_CHUNK) {
            sink.append(chunk)
                .await
                .map_err(|source| QueryError::Sink {
                    table: self.table(),
                    source,
                })?;
        }
        count(pipeline, &self.table(), full, &read.events);
        if read.null_keys > 0 {
            warn!(pipeline, table = %self.entry.table, rows = read.null_keys, "query source: rows with a NULL key column are skipped (a key must identify a row)");
        }
        let emitted = read.upserts.len() as u64;
        self.commit(read, full.then_some(started_ms))?;
        Ok(emitted)
    }

    /// The statement's columns as a relation (cached per shape by the catalog).
    async fn relation(
        &self,
        client: &Client,
        catalog: &mut Catalog,
    ) -> Result<Arc<Relation>, QueryError> {
        let table = self.table();
        let query_err = |source| QueryError::Query {
            table: table.clone(),
            source,
        };
        let stmt = client
            .prepare(&select_all(&self.entry.query.sql))
            .await
            .map_err(query_err)?;
        let mut cols = Vec::with_capacity(stmt.columns().len());
        for c in stmt.columns() {
            cols.push((
                c.name().to_owned(),
                c.type_().oid(),
                typmod(client, c).await.map_err(query_err)?,
            ));
        }
        let name = (
            self.entry.table.schema.as_str(),
            self.entry.table.name.as_str(),
        );
        catalog
            .relation_of_query(client, self.oid, name, &self.entry.key, &cols)
            .await
            .map_err(|source| QueryError::Catalog { table, source })
    }

    /// The read's SQL: everything for a full read, else the rows at or past the cursor (minus
    /// the lookback) in cursor order.
    fn select_sql(&self, rel: &Relation, full: bool) -> String {
        let from = select_all(&self.entry.query.sql);
        let Some(c) = self.entry.query.cursor.as_ref().filter(|_| !full) else {
            return from;
        };
        let col = quote_ident(&c.column);
        let order = format!("ORDER BY {col} ASC NULLS FIRST");
        let Some(cursor) = &self.cursor else {
            return format!("{from} {order}");
        };
        let ty = rel
            .columns
            .iter()
            .find(|x| x.name == c.column)
            .map_or("text", |x| x.type_name.as_str());
        let mut bound = format!("{}::{ty}", quote_literal(cursor));
        if c.kind == CursorKind::Timestamp && !c.lookback.is_zero() {
            bound = format!("({bound} - interval '{} seconds')", c.lookback.as_secs());
        }
        format!("{from} WHERE {col} >= {bound} {order}")
    }

    /// The events of a read: rows new or changed since they were last emitted, and (full read)
    /// the keys that vanished.
    fn diff(
        &self,
        rel: &Arc<Relation>,
        messages: &[SimpleQueryMessage],
        full: bool,
        source: &Source,
    ) -> Result<Read, tokio_postgres::Error> {
        let key_idx: Vec<usize> = (0..rel.columns.len())
            .filter(|&i| rel.columns[i].is_key)
            .collect();
        let cursor = self.entry.query.cursor.as_ref();
        let cursor_idx = cursor.and_then(|c| rel.columns.iter().position(|x| x.name == c.column));
        let incrementing = cursor.is_some_and(|c| c.kind == CursorKind::Incrementing);
        let mut read = Read::default();
        let mut seen: HashSet<Vec<String>> = HashSet::new();
        for msg in messages {
            let SimpleQueryMessage::Row(row) = msg else {
                continue;
            };
            let mut values: Row = Vec::with_capacity(rel.columns.len());
            for i in 0..rel.columns.len() {
                values.push(match row.try_get(i)? {
                    Some(s) => Value::Text(s.to_owned()),
                    None => Value::Null,
                });
            }
            let cursor_text = cursor_idx.and_then(|i| text(&values[i]));
            if !full && let Some(c) = &cursor_text {
                read.cursor = Some((*c).to_owned());
            }
            let Some(key) = key_idx
                .iter()
                .map(|&i| text(&values[i]).map(str::to_owned))
                .collect::<Option<Vec<String>>>()
            else {
                read.null_keys += 1;
                continue;
            };
            let hash = row_hash(&values);
            if full {
                seen.insert(key.clone());
            }
            let op = match self.rows.get(&key) {
                Some(&h) if h == hash && !self.emit_all => continue,
                Some(_) => Op::Update,
                None => Op::Create,
            };
            let mut source = source.clone();
            if incrementing {
                source.lsn = cursor_text.and_then(|c| c.parse().ok()).unwrap_or(0);
            }
            read.events.push(event(rel, op, None, Some(values), source));
            read.upserts.push((key, hash));
        }
        if full {
            for key in self.rows.keys().filter(|k| !seen.contains(*k)) {
                let mut before: Row = vec![Value::Null; rel.columns.len()];
                for (&i, v) in key_idx.iter().zip(key) {
                    before[i] = Value::Text(v.clone());
                }
                read.events
                    .push(event(rel, Op::Delete, Some(before), None, source.clone()));
                read.deletes.push(key.clone());
            }
        }
        Ok(read)
    }

    /// Applies a read whose events are durable, and saves the state when it changed.
    fn commit(&mut self, read: Read, full_at: Option<i64>) -> Result<(), QueryError> {
        let changed = !read.upserts.is_empty()
            || !read.deletes.is_empty()
            || (read.cursor.is_some() && read.cursor != self.cursor)
            || full_at.is_some() && self.entry.query.cursor.is_some();
        for (k, h) in read.upserts {
            self.rows.insert(k, h);
        }
        for k in &read.deletes {
            self.rows.remove(k);
        }
        if read.cursor.is_some() {
            self.cursor = read.cursor;
        }
        if full_at.is_some() {
            self.last_full_ms = full_at;
        } else if self.entry.query.cursor.is_some() && self.last_full_ms.is_none() {
            // The first cursor read (no cursor yet) read every row: as good as a full read.
            self.last_full_ms = Some(super::now_ms());
        }
        self.emit_all = false;
        if !changed {
            return Ok(());
        }
        let state = State {
            cursor: self.cursor.clone(),
            last_full_ms: self.last_full_ms,
            rows: self.rows.iter().map(|(k, h)| (k.clone(), *h)).collect(),
        };
        let err = |reason: String| QueryError::State {
            path: self.path.display().to_string(),
            reason,
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| err(e.to_string()))?;
        super::snapshot::write_atomically(&self.path, &bytes).map_err(|e| err(e.to_string()))
    }
}

/// A column's typmod when it comes straight from a table column (`numeric(12,2)` keeps its scale
/// through a view); -1 (none) for computed columns.
async fn typmod(client: &Client, c: &tokio_postgres::Column) -> Result<i32, tokio_postgres::Error> {
    let (Some(table), Some(attnum)) = (c.table_oid(), c.column_id()) else {
        return Ok(-1);
    };
    Ok(client
        .query_opt(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = $1 AND attnum = $2 AND atttypid = $3",
            &[&table, &attnum, &c.type_().oid()],
        )
        .await?
        .map_or(-1, |r| r.get(0)))
}

/// The `source` block of a read's events (an incrementing cursor sets `lsn` per row).
fn read_source(connector: &'static str, (pipeline, db): (&str, &str), read_ms: i64) -> Source {
    Source {
        connector,
        pipeline: pipeline.to_owned(),
        db: db.to_owned(),
        lsn: 0,
        tx_id: None,
        commit_ts_ms: read_ms,
        origin: None,
        snapshot: false,
    }
}

/// One read in the metrics: the read, and its events by op.
fn count(pipeline: &str, source: &str, full: bool, events: &[ChangeEvent]) {
    let mode = if full { "full" } else { "incremental" };
    metrics::counter!(m::QUERY_READS_TOTAL, "pipeline" => pipeline.to_owned(), "source" => source.to_owned(), "mode" => mode)
        .increment(1);
    for op in [Op::Create, Op::Update, Op::Delete] {
        let n = events.iter().filter(|e| e.op == op).count() as u64;
        metrics::counter!(m::QUERY_EVENTS_TOTAL, "pipeline" => pipeline.to_owned(), "source" => source.to_owned(), "op" => op.code())
            .increment(n);
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Text(s) => Some(s),
        _ => None,
    }
}

/// A stable hash of a row's values (NULL distinct from every text).
fn row_hash(values: &[Value]) -> u64 {
    let mut h = Sha256::new();
    for v in values {
        match v {
            Value::Text(s) => {
                h.update([1]);
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            _ => h.update([0]),
        }
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("sha256 is 32 bytes"))
}

fn event(
    rel: &Arc<Relation>,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
    source: Source,
) -> ChangeEvent {
    ChangeEvent {
        relation: rel.clone(),
        op,
        before,
        after,
        ts_ms: super::now_ms(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueryCursor;

    fn poller(cursor: Option<QueryCursor>) -> Poller {
        let entry = QueryEntry {
            table: crate::config::query_table_name("Projects"),
            key: vec!["id".into()],
            query: QuerySource {
                sql: "SELECT id, name FROM v".into(),
                every: Duration::from_secs(2),
                cursor,
                full_every: None,
            },
        };
        Poller {
            oid: 1,
            path: PathBuf::from("/nonexistent/query-projects.json"),
            cursor: None,
            last_full_ms: None,
            rows: HashMap::new(),
            emit_all: false,
            reread: None,
            due: Instant::now(),
            entry,
        }
    }

    fn rel() -> Arc<Relation> {
        let col = |name: &str, is_key| crate::event::change::Column {
            name: name.into(),
            type_oid: 25,
            type_name: "text".into(),
            type_modifier: -1,
            kind: crate::event::change::TypeKind::Base,
            is_key,
            nullable: !is_key,
        };
        Arc::new(Relation {
            oid: 1,
            schema: "query".into(),
            name: "projects".into(),
            columns: vec![col("id", true), col("name", false)],
            replica_identity: 'd',
            version: 1,
        })
    }

    #[test]
    fn a_cursor_source_reads_in_full_first_after_a_start_and_then_every_full_every() {
        let mut p = poller(Some(QueryCursor {
            column: "n".into(),
            kind: CursorKind::Incrementing,
            lookback: Duration::ZERO,
        }));
        p.entry.query.full_every = Some(Duration::from_secs(60));
        p.cursor = Some("7".into());
        p.last_full_ms = Some(1_000);
        p.emit_all = true;
        assert!(p.full_due(1_001), "first read after a start");
        p.emit_all = false;
        assert!(!p.full_due(1_001));
        assert!(p.full_due(61_000), "full_every passed");
        p.entry.query.full_every = None;
        assert!(!p.full_due(1_000_000), "no full reads without full_every");
    }

    #[test]
    fn row_hash_tells_null_from_empty_and_shifted_text() {
        let t = |s: &str| Value::Text(s.into());
        assert_ne!(row_hash(&[Value::Null]), row_hash(&[t("")]));
        assert_ne!(row_hash(&[t("ab"), t("c")]), row_hash(&[t("a"), t("bc")]));
        assert_eq!(row_hash(&[t("a")]), row_hash(&[t("a")]));
    }

    #[test]
    fn cursor_reads_start_at_the_cursor_minus_lookback_in_order() {
        let mut p = poller(Some(QueryCursor {
            column: "changed_at".into(),
            kind: CursorKind::Timestamp,
            lookback: Duration::from_secs(30),
        }));
        let mut r = (*rel()).clone();
        r.columns[1].name = "changed_at".into();
        r.columns[1].type_name = "timestamp with time zone".into();
        assert_eq!(
            p.select_sql(&r, false),
            "SELECT * FROM (SELECT id, name FROM v) AS sb_query ORDER BY \"changed_at\" ASC NULLS FIRST"
        );
        p.cursor = Some("2026-01-01 10:00:00+00".into());
        assert_eq!(
            p.select_sql(&r, false),
            "SELECT * FROM (SELECT id, name FROM v) AS sb_query WHERE \"changed_at\" >= ('2026-01-01 10:00:00+00'::timestamp with time zone - interval '30 seconds') ORDER BY \"changed_at\" ASC NULLS FIRST"
        );
        assert_eq!(
            p.select_sql(&r, true),
            "SELECT * FROM (SELECT id, name FROM v) AS sb_query"
        );
    }

    #[test]
    fn commit_moves_the_key_set_and_a_full_read_deletes_what_vanished() {
        let mut p = poller(None);
        let rel = rel();
        let src = read_source(crate::event::change::CONNECTOR_QUERY_FULL, ("p", "d"), 0);
        let row = |id: &str, name: &str| {
            let v: Row = vec![Value::Text(id.into()), Value::Text(name.into())];
            (vec![id.to_string()], row_hash(&v))
        };
        p.rows.extend([row("1", "a"), row("2", "b")]);
        // Nothing read: both keys vanished.
        let read = p.diff(&rel, &[], true, &src).unwrap();
        assert_eq!(read.events.len(), 2);
        assert!(
            read.events
                .iter()
                .all(|e| e.op == Op::Delete && e.before.as_ref().unwrap()[1] == Value::Null)
        );
        // An incremental read never deletes.
        assert!(p.diff(&rel, &[], false, &src).unwrap().events.is_empty());
        p.path = std::env::temp_dir().join(format!("sb-query-test-{}.json", std::process::id()));
        p.commit(read, Some(5)).unwrap();
        assert!(p.rows.is_empty());
        assert_eq!(p.last_full_ms, Some(5));
        let _ = std::fs::remove_file(&p.path);
    }
}
