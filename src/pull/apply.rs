//! The PostgreSQL applier of the return path: writes one row change at a time, each in its own
//! transaction, under the pipeline's replication origin.
//!
//! Why an origin: capture reads the same tables through logical replication. Every transaction
//! the applier commits carries the origin `syncbridge_<pipeline>` (set once per session with
//! `pg_replication_origin_session_setup`), so capture and any other logical consumer can tell
//! these writes from application writes (pgoutput sends an Origin message; PG ≥ 16 can filter
//! with `origin = none`; `test_decoding` with `only-local`), and a change coming back from a list
//! is never echoed to the list again.
//!
//! # Values
//! Values arrive in PostgreSQL's text form (`Option<String>`, `None` = SQL NULL) and are sent as
//! `text` parameters cast to the column's catalog type: `$1::text::numeric`. The cast uses the type
//! without its modifier (`format_type(atttypid, NULL)`), so modifiers apply with *assignment*
//! semantics: a too-long `varchar(20)` value fails with 22001 instead of being truncated as an
//! explicit cast would. Types are read from the catalog once per table (and again after a schema
//! error). Identifiers are always quoted ([`quote_ident`]); values are never part of the SQL text.
//!
//! # Statements
//! - `Insert` → `INSERT … RETURNING <primary key>::text` (the key columns of the change when the
//!   table has no primary key), so database defaults (serial, identity, `gen_random_uuid()`) fill
//!   the key and [`Applied::key`] reports it.
//! - `Update` → `UPDATE … SET … WHERE <key>`; `Delete` → `DELETE … WHERE <key>`;
//!   `SoftDelete { column }` → `UPDATE … SET column = true` (boolean) or
//!   `column = COALESCE(column, now())` (timestamp/date: the first deletion time is kept).
//!   A NULL key value matches with `IS NULL`. An empty key is refused ([`ApplyError::Invalid`]):
//!   it would touch every row. [`Applied::rows`] says how many rows matched (0 when the row is gone).
//!
//! Each change is one statement in its own implicit transaction (autocommit): one round trip.
//! When the role may read `pg_replication_origin_status`, the commit's end LSN is reported
//! ([`Applied::commit_lsn`]; exact, since only this session uses the origin: it is the origin's
//! `local_lsn`, the same end LSN logical decoding reports for the commit). One more round trip;
//! without the privilege it is `None`.
//!
//! # Errors
//! [`ApplyError`] classifies: data and constraint errors (SQLSTATE classes 22 and 23: NOT NULL
//! 23502, FK 23503, unique 23505, check 23514, exclusion 23P01, bad input 22P02/22007, out of
//! range 22003/22008, too long 22001, …) are [`ApplyError::Rejected`] with the database's message
//! and, where known, the column: not retryable, the caller dead-letters the change. A lost
//! connection, a restart, a standby after failover, serialization failures, deadlocks and lock
//! timeouts are retryable; the connection is dropped and the next [`Applier::apply`] reconnects
//! (re-running the origin setup), with several instances ([`Applier::connect_any`]) to the one
//! that is the primary then. A change that failed after it was sent may have been committed
//! ([`ApplyError::Connection`] `maybe_applied`); the caller's retry must tolerate that (updates
//! and deletes are idempotent; a retried insert may hit the unique key and be rejected).
//!
//! # Privileges
//! `pg_replication_origin_create` and `pg_replication_origin_session_setup` are superuser-only by
//! default. A non-superuser works after (checked on PostgreSQL 15 by `tests/pull_apply.rs`):
//! ```sql
//! GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
//!                           pg_replication_origin_session_setup(text) TO syncbridge;
//! GRANT SELECT ON pg_replication_origin_status TO syncbridge;   -- optional: commit LSNs
//! GRANT SELECT, INSERT, UPDATE, DELETE ON schema.table1, … TO syncbridge;
//! ```
//! (or an administrator creates the origin `syncbridge_<pipeline>` beforehand and only the
//! session-setup grant is needed). An origin can be active in one session at a time, so two
//! appliers of the same pipeline exclude each other: the second gets a retryable error (55006).
//!
//! # Several processes of a pipeline
//! Only the process the return stream's one partition is assigned to applies (issue 15), but
//! every process has an applier. [`Applier::open`] therefore starts without a session when
//! another process holds the origin, and a session idle for [`IDLE_RELEASE`] is closed (and
//! opened again on the next change, not counted as a reconnect): after the partition moved, the
//! new owner's first applies fail with 55006 and are retried until the old owner's session is
//! gone, at most [`IDLE_RELEASE`] later. A killed owner's session ends with its connection.
//!
//! # Connection
//! tokio-postgres through [`crate::pg`]: the URL's `sslmode` / `sslrootcert` as libpq reads them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use crate::config::TableName;
use crate::telemetry::metrics as m;

/// `(column, value in PostgreSQL text form)`; `None` is SQL NULL.
pub type ColumnValues = Vec<(String, Option<String>)>;

/// At most this many values are probed to find the column behind a data error.
const MAX_PROBES: usize = 64;

/// One row change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    pub table: TableName,
    /// Identifies the row (update, delete, soft delete). For an insert: key values given by the
    /// caller (inserted with the values); leave empty when the database generates the key.
    pub key: ColumnValues,
    pub kind: RowChangeKind,
}

/// What to do with the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowChangeKind {
    Insert {
        values: ColumnValues,
    },
    Update {
        set: ColumnValues,
    },
    Delete,
    /// Marks the row deleted: a boolean column becomes true, a timestamp/date column `now()`.
    SoftDelete {
        column: String,
    },
}

impl RowChangeKind {
    fn as_str(&self) -> &'static str {
        match self {
            RowChangeKind::Insert { .. } => "insert",
            RowChangeKind::Update { .. } => "update",
            RowChangeKind::Delete => "delete",
            RowChangeKind::SoftDelete { .. } => "soft delete",
        }
    }
}

/// A committed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Rows inserted/updated/deleted (0: no row matched the key).
    pub rows: u64,
    /// Insert: the row's primary key as stored (text form, defaults filled in). Otherwise the
    /// change's key.
    pub key: ColumnValues,
    /// End LSN of the commit, when the role may read `pg_replication_origin_status`.
    pub commit_lsn: Option<u64>,
}

/// Why a change was not applied. See the module docs.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The database refused the data (SQLSTATE class 22 or 23). Not retryable: dead-letter it.
    #[error("rejected by PostgreSQL (SQLSTATE {sqlstate}{}): {message}{}",
        column.as_ref().map(|c| format!(", column {c}")).unwrap_or_default(),
        detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Rejected {
        sqlstate: String,
        message: String,
        detail: Option<String>,
        column: Option<String>,
        constraint: Option<String>,
    },
    /// The connection failed or was lost. Retryable; the next call reconnects.
    #[error("PostgreSQL connection failed{}: {message}",
        if *maybe_applied { " (the change may have been committed)" } else { "" })]
    Connection {
        message: String,
        /// The statement was sent before the failure: it may have committed.
        maybe_applied: bool,
    },
    /// Any other database error: retryable ones (serialization failure, deadlock, lock timeout,
    /// origin in use, too many connections, read-only standby) and fatal ones (permissions,
    /// missing table or column).
    #[error("PostgreSQL error (SQLSTATE {sqlstate}): {message}")]
    Database {
        sqlstate: String,
        message: String,
        retryable: bool,
    },
    /// The change cannot be expressed against the table (unknown column, empty key, …).
    #[error("invalid row change: {0}")]
    Invalid(String),
    /// The source URL's connection options are unusable (bad TLS options, unreadable root
    /// certificates): an operator must fix the configuration.
    #[error("cannot connect to PostgreSQL: {0}")]
    Config(String),
}

impl ApplyError {
    /// Worth retrying the same change later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Connection { .. } => true,
            ApplyError::Database { retryable, .. } => *retryable,
            ApplyError::Rejected { .. } | ApplyError::Invalid(_) | ApplyError::Config(_) => false,
        }
    }

    /// The SQLSTATE, when the database reported one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Rejected { sqlstate, .. } | ApplyError::Database { sqlstate, .. } => {
                Some(sqlstate)
            }
            _ => None,
        }
    }
}

/// Always-quoted SQL identifier (`"` doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Parses PostgreSQL's `X/Y` LSN text form.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// One column as the applier needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    /// `format_type(atttypid, NULL)`: the cast target.
    base_type: String,
    /// `format_type(atttypid, atttypmod)`: used to find the column of a data error.
    full_type: String,
    /// `varchar(n)` / `char(n)` length.
    char_max: Option<i32>,
    generated: bool,
    /// 1-based position in the primary key.
    pk_pos: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TableInfo {
    columns: Vec<Column>,
}

impl TableInfo {
    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn primary_key(&self) -> Vec<&Column> {
        let mut pk: Vec<&Column> = self.columns.iter().filter(|c| c.pk_pos.is_some()).collect();
        pk.sort_by_key(|c| c.pk_pos);
        pk
    }
}

/// A statement ready to run: SQL with `$n::text::type` parameters, the values, the column of each
/// parameter, and the columns returned (as text).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stmt {
    sql: String,
    params: Vec<Option<String>>,
    param_columns: Vec<String>,
    returning: Vec<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum BuildError {
    UnknownColumn(String),
    Invalid(String),
}

fn table_sql(t: &TableName) -> String {
    format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name))
}

struct Builder<'a> {
    info: &'a TableInfo,
    params: Vec<Option<String>>,
    param_columns: Vec<String>,
}

impl<'a> Builder<'a> {
    fn column(&self, name: &str) -> Result<&'a Column, BuildError> {
        self.info
            .column(name)
            .ok_or_else(|| BuildError::UnknownColumn(name.to_string()))
    }

    /// `$n::text::type` for a value of `col`.
    fn param(&mut self, col: &Column, v: &Option<String>) -> String {
        self.params.push(v.clone());
        self.param_columns.push(col.name.clone());
        format!("${}::text::{}", self.params.len(), col.base_type)
    }

    fn where_key(&mut self, key: &ColumnValues) -> Result<String, BuildError> {
        if key.is_empty() {
            return Err(BuildError::Invalid(
                "the key is empty: the change would touch every row".into(),
            ));
        }
        let mut parts = Vec::with_capacity(key.len());
        for (name, v) in key {
            let col = self.column(name)?;
            parts.push(match v {
                None => format!("{} IS NULL", quote_ident(&col.name)),
                Some(_) => {
                    let p = self.param(col, v);
                    format!("{} = {p}", quote_ident(&col.name))
                }
            });
        }
        Ok(parts.join(" AND "))
    }
}

fn check_unique(cols: &[&(String, Option<String>)]) -> Result<(), BuildError> {
    for (i, (a, _)) in cols.iter().enumerate() {
        if cols[..i].iter().any(|(b, _)| a == b) {
            return Err(BuildError::Invalid(format!("column {a:?} given twice")));
        }
    }
    Ok(())
}

fn build(table: &TableName, info: &TableInfo, change: &RowChange) -> Result<Stmt, BuildError> {
    let mut b = Builder {
        info,
        params: Vec::new(),
        param_columns: Vec::new(),
    };
    let t = table_sql(table);
    let mut returning = Vec::new();
    let sql = match &change.kind {
        RowChangeKind::Insert { values } => {
            let all: Vec<&(String, Option<String>)> = change.key.iter().chain(values).collect();
            check_unique(&all)?;
            let mut cols = Vec::with_capacity(all.len());
            let mut vals = Vec::with_capacity(all.len());
            for (name, v) in all {
                let col = b.column(name)?;
                if col.generated {
                    return Err(BuildError::Invalid(format!(
                        "column {name:?} is generated and cannot be written"
                    )));
                }
                cols.push(quote_ident(&col.name));
                vals.push(b.param(col, v));
            }
            let pk = info.primary_key();
            returning = if pk.is_empty() {
                change.key.iter().map(|(c, _)| c.clone()).collect()
            } else {
                pk.iter().map(|c| c.name.clone()).collect()
            };
            let mut sql = if cols.is_empty() {
                format!("INSERT INTO {t} DEFAULT VALUES")
            } else {
                format!(
                    "INSERT INTO {t} ({}) VALUES ({})",
                    cols.join(", "),
                    vals.join(", ")
                )
            };
            if !returning.is_empty() {
                let r: Vec<String> = returning
                    .iter()
                    .map(|c| format!("{}::text", quote_ident(c)))
                    .collect();
                let _ = write!(sql, " RETURNING {}", r.join(", "));
            }
            sql
        }
        RowChangeKind::Update { set } => {
            if set.is_empty() {
                return Err(BuildError::Invalid("update without columns to set".into()));
            }
            check_unique(&set.iter().collect::<Vec<_>>())?;
            let mut assigns = Vec::with_capacity(set.len());
            for (name, v) in set {
                let col = b.column(name)?;
                if col.generated {
                    return Err(BuildError::Invalid(format!(
                        "column {name:?} is generated and cannot be written"
                    )));
                }
                let p = b.param(col, v);
                assigns.push(format!("{} = {p}", quote_ident(&col.name)));
            }
            let w = b.where_key(&change.key)?;
            format!("UPDATE {t} SET {} WHERE {w}", assigns.join(", "))
        }
        RowChangeKind::Delete => {
            let w = b.where_key(&change.key)?;
            format!("DELETE FROM {t} WHERE {w}")
        }
        RowChangeKind::SoftDelete { column } => {
            let col = b.column(column)?;
            let q = quote_ident(&col.name);
            let value = match col.base_type.as_str() {
                "boolean" => "true".to_string(),
                "timestamp with time zone" | "timestamp without time zone" | "date" => {
                    format!("COALESCE({q}, now())")
                }
                other => {
                    return Err(BuildError::Invalid(format!(
                        "soft-delete column {column:?} has type {other}; expected boolean, timestamp or date"
                    )));
                }
            };
            let w = b.where_key(&change.key)?;
            format!("UPDATE {t} SET {q} = {value} WHERE {w}")
        }
    };
    Ok(Stmt {
        sql,
        params: b.params,
        param_columns: b.param_columns,
        returning,
    })
}

/// SQLSTATEs worth retrying (besides connection loss): the same statement can succeed later.
fn retryable_state(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, disk full)
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || matches!(
            code,
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available
                | "55006" // object_in_use: the origin is active in another session
                | "57014" // query_canceled (statement_timeout)
                | "25006" // read_only_sql_transaction: a standby after failover
        )
}

/// States after which this connection must not be reused.
fn drops_connection(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code == "25006"
}

fn classify(e: &tokio_postgres::Error, sent: bool) -> ApplyError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code().to_string();
            if code.starts_with("22") || code.starts_with("23") {
                ApplyError::Rejected {
                    sqlstate: code,
                    message: db.message().to_string(),
                    detail: db.detail().map(str::to_string),
                    column: db.column().map(str::to_string),
                    constraint: db.constraint().map(str::to_string),
                }
            } else {
                ApplyError::Database {
                    retryable: retryable_state(&code),
                    sqlstate: code,
                    message: db.message().to_string(),
                }
            }
        }
        None => ApplyError::Connection {
            message: e.to_string(),
            maybe_applied: sent,
        },
    }
}

#[derive(Debug)]
struct Conn {
    client: Client,
    driver: JoinHandle<()>,
    pid: i32,
}

/// How long an applier keeps its origin session without a change to apply. The origin can be
/// active in one session only: after the return stream's partition moved to another process (a
/// rebalance), that process's applies wait (55006, retried) until this one lets go, so an idle
/// session is closed after this. Long enough that a steady trickle of pulls keeps one session,
/// short enough that a handover waits seconds, not forever.
pub const IDLE_RELEASE: Duration = Duration::from_secs(10);

/// Whether the applier's session is in use, idle since when, or closed for idleness (shared by
/// the applier and its connection's driver task, which closes it).
#[derive(Debug)]
enum SessionUse {
    Busy,
    Idle(Instant),
    Released,
}

/// Marks the session idle again when an operation ends (however it ends).
struct InUse(Arc<Mutex<SessionUse>>);

impl Drop for InUse {
    fn drop(&mut self) {
        *lock(&self.0) = SessionUse::Idle(Instant::now());
    }
}

fn lock(m: &Mutex<SessionUse>) -> std::sync::MutexGuard<'_, SessionUse> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drives the connection; closes it once the session has been idle for `idle` (dropping the
/// connection closes the socket, which ends the session and frees the origin).
async fn drive(
    connection: crate::pg::PgConnection,
    used: Arc<Mutex<SessionUse>>,
    idle: Duration,
    pipeline: String,
) {
    tokio::pin!(connection);
    loop {
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(pipeline = %pipeline, error = %e, "applier connection ended");
                }
                return;
            }
            () = tokio::time::sleep(idle / 4) => {
                let mut u = lock(&used);
                if let SessionUse::Idle(since) = *u && since.elapsed() >= idle {
                    *u = SessionUse::Released;
                    tracing::debug!(pipeline = %pipeline, "applier idle: closing its session (frees the origin)");
                    return;
                }
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Closing the socket ends the session, which releases the replication origin.
        self.driver.abort();
    }
}

/// Applies row changes to PostgreSQL under the replication origin `syncbridge_<pipeline>`.
/// One connection, used by one caller at a time (`&mut self`); see the module docs.
#[derive(Debug)]
pub struct Applier {
    url: String,
    /// Every instance of a replicated source, primary first (`source.urls`); empty for one.
    /// Each (re)connect goes to whichever is the primary then.
    instances: Vec<String>,
    pipeline: String,
    origin: String,
    conn: Option<Conn>,
    connects: u64,
    tables: HashMap<TableName, Arc<TableInfo>>,
    /// Cleared when the role may not read `pg_replication_origin_status`.
    report_lsn: bool,
    /// In use, idle or released (see [`IDLE_RELEASE`]).
    used: Arc<Mutex<SessionUse>>,
    /// After this long idle the session is closed.
    idle_release: Duration,
}

/// The replication origin of a pipeline's applier.
pub fn origin_name(pipeline: &str) -> String {
    format!("syncbridge_{pipeline}")
}

impl Applier {
    /// Connects and sets up the session's replication origin (created when missing).
    ///
    /// # Errors
    /// [`ApplyError::Connection`] when the database is unreachable; [`ApplyError::Database`] with
    /// SQLSTATE 42501 when the role lacks the origin privileges (see the module docs), 55006
    /// (retryable) when another session uses the origin.
    pub async fn connect(database_url: &str, pipeline: &str) -> Result<Applier, ApplyError> {
        Self::connect_any(&[database_url.to_string()], pipeline).await
    }

    /// [`Applier::connect`] to a replicated source (primary first, then standbys): this and every
    /// reconnect go to the instance that is the primary then (a promoted standby after a
    /// failover); while none is, connecting fails retryably.
    ///
    /// # Errors
    /// As [`Applier::connect`].
    pub async fn connect_any(urls: &[String], pipeline: &str) -> Result<Applier, ApplyError> {
        let mut a = Applier::disconnected(urls, pipeline);
        let _in_use = a.begin_use();
        a.ensure_connected().await?;
        Ok(a)
    }

    /// [`Applier::connect_any`] for a process that may share the pipeline with others: when
    /// another session holds the origin (55006: another process applies the return stream now),
    /// the applier starts disconnected and connects on its first change. A session idle for
    /// `idle_release` is closed ([`IDLE_RELEASE`] says why). Other errors are
    /// [`Applier::connect`]'s.
    pub async fn open(
        urls: &[String],
        pipeline: &str,
        idle_release: Duration,
    ) -> Result<Applier, ApplyError> {
        let mut a = Applier::disconnected(urls, pipeline);
        a.idle_release = idle_release;
        let in_use = a.begin_use();
        match a.ensure_connected().await {
            Ok(()) => {}
            Err(ApplyError::Database { sqlstate, .. }) if sqlstate == "55006" => {
                tracing::info!(
                    pipeline,
                    "another process holds the applier's origin; connecting on the first change"
                );
            }
            Err(e) => return Err(e),
        }
        drop(in_use);
        Ok(a)
    }

    /// An applier with no session yet; `urls` as [`Applier::connect_any`] takes them.
    fn disconnected(urls: &[String], pipeline: &str) -> Applier {
        Applier {
            url: urls.first().cloned().unwrap_or_default(),
            instances: if urls.len() > 1 {
                urls.to_vec()
            } else {
                Vec::new()
            },
            pipeline: pipeline.to_string(),
            origin: origin_name(pipeline),
            conn: None,
            connects: 0,
            tables: HashMap::new(),
            report_lsn: true,
            used: Arc::new(Mutex::new(SessionUse::Idle(Instant::now()))),
            idle_release: IDLE_RELEASE,
        }
    }

    /// Marks the session in use until the returned guard drops; a session the driver closed for
    /// idleness is forgotten, so the operation reconnects (not counted as a reconnect).
    fn begin_use(&mut self) -> InUse {
        let mut u = lock(&self.used);
        if matches!(*u, SessionUse::Released) {
            self.conn = None;
            self.connects = 0;
        }
        *u = SessionUse::Busy;
        drop(u);
        InUse(self.used.clone())
    }

    /// The replication origin name (`syncbridge_<pipeline>`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The server process id of the current connection (`None` while disconnected).
    pub fn backend_pid(&self) -> Option<i32> {
        self.conn
            .as_ref()
            .filter(|c| !c.client.is_closed())
            .map(|c| c.pid)
    }

    /// Whether the session has its replication origin set up (reconnects when needed): a health
    /// check, and what the tests use to prove the origin is in force.
    pub async fn origin_session_is_setup(&mut self) -> Result<bool, ApplyError> {
        let _in_use = self.begin_use();
        self.ensure_connected().await?;
        let r = self
            .client()?
            .query_one(
                "SELECT pg_catalog.pg_replication_origin_session_is_setup()",
                &[],
            )
            .await;
        match r {
            Ok(row) => Ok(row.get(0)),
            Err(e) => Err(self.fail(&e, false)),
        }
    }

    /// Applies one change in its own transaction. See the module docs.
    pub async fn apply(&mut self, change: &RowChange) -> Result<Applied, ApplyError> {
        let _in_use = self.begin_use();
        let started = Instant::now();
        let r = self.apply_inner(change).await;
        let outcome = match &r {
            Ok(_) => "applied",
            Err(ApplyError::Rejected { .. }) => "rejected",
            Err(ApplyError::Invalid(_)) => "invalid",
            Err(_) => "error",
        };
        metrics::counter!(m::PULL_APPLY_TOTAL, "pipeline" => self.pipeline.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(m::PULL_APPLY_SECONDS, "pipeline" => self.pipeline.clone())
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            tracing::debug!(pipeline = %self.pipeline, table = %change.table, op = change.kind.as_str(), error = %e, "row change not applied");
        }
        r
    }

    async fn apply_inner(&mut self, change: &RowChange) -> Result<Applied, ApplyError> {
        self.ensure_connected().await?;
        let mut info = self.table_info(&change.table, false).await?;
        let stmt = match build(&change.table, &info, change) {
            Ok(s) => s,
            Err(BuildError::UnknownColumn(_)) => {
                // The table may have changed since its columns were read: read them once more.
                info = self.table_info(&change.table, true).await?;
                build(&change.table, &info, change).map_err(|e| match e {
                    BuildError::UnknownColumn(c) => ApplyError::Invalid(format!(
                        "column {c:?} does not exist in table {}",
                        change.table
                    )),
                    BuildError::Invalid(m) => ApplyError::Invalid(m),
                })?
            }
            Err(BuildError::Invalid(m)) => return Err(ApplyError::Invalid(m)),
        };
        let params: Vec<(&(dyn ToSql + Sync), Type)> = stmt
            .params
            .iter()
            .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT))
            .collect();
        let client = self.client()?;
        let result = if stmt.returning.is_empty() {
            client
                .execute_typed(&stmt.sql, &params)
                .await
                .map(|n| (n, Vec::new()))
        } else {
            client.query_typed(&stmt.sql, &params).await.map(|rows| {
                let key = rows
                    .first()
                    .map(|row| {
                        stmt.returning
                            .iter()
                            .enumerate()
                            .map(|(i, c)| (c.clone(), row.get::<_, Option<String>>(i)))
                            .collect()
                    })
                    .unwrap_or_default();
                (rows.len() as u64, key)
            })
        };
        let (rows, key) = match result {
            Ok(r) => r,
            Err(e) => {
                let mut err = self.fail(&e, true);
                if let ApplyError::Rejected {
                    column, sqlstate, ..
                } = &mut err
                    && column.is_none()
                    && sqlstate.starts_with("22")
                {
                    *column = self.find_bad_column(&info, &stmt, sqlstate).await;
                }
                if err.sqlstate().is_some_and(|s| s.starts_with("42")) {
                    // Undefined column/table, type mismatch: re-read the catalog next time.
                    self.tables.remove(&change.table);
                }
                return Err(err);
            }
        };
        let key = match &change.kind {
            RowChangeKind::Insert { .. } => key,
            _ => change.key.clone(),
        };
        let commit_lsn = self.commit_lsn().await;
        Ok(Applied {
            rows,
            key,
            commit_lsn,
        })
    }

    fn client(&self) -> Result<&Client, ApplyError> {
        self.conn
            .as_ref()
            .map(|c| &c.client)
            .ok_or_else(|| ApplyError::Connection {
                message: "not connected".into(),
                maybe_applied: false,
            })
    }

    /// Classifies an error and drops the connection when it cannot be reused.
    fn fail(&mut self, e: &tokio_postgres::Error, sent: bool) -> ApplyError {
        let err = classify(e, sent);
        let closed = self.conn.as_ref().is_none_or(|c| c.client.is_closed());
        let drop_it = closed
            || match &err {
                ApplyError::Connection { .. } => true,
                ApplyError::Database { sqlstate, .. } => drops_connection(sqlstate),
                _ => false,
            };
        if drop_it {
            tracing::info!(pipeline = %self.pipeline, error = %err, "applier connection lost; reconnecting on the next change");
            self.conn = None;
        }
        err
    }

    /// Connects (or reconnects after a loss) and sets up the origin session.
    async fn ensure_connected(&mut self) -> Result<(), ApplyError> {
        if self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return Ok(());
        }
        self.conn = None;
        if !self.instances.is_empty() {
            let Some(i) = crate::pg::find_primary(&self.instances).await else {
                return Err(ApplyError::Connection {
                    message: "no source instance is a primary (waiting for a promotion)".into(),
                    maybe_applied: false,
                });
            };
            self.url.clone_from(&self.instances[i]);
        }
        let (client, connection) = crate::pg::connect(&self.url).await.map_err(|e| match e {
            crate::pg::PgConnectError::Postgres(e) => match e.as_db_error() {
                Some(_) => classify(&e, false),
                None => ApplyError::Connection {
                    message: e.to_string(),
                    maybe_applied: false,
                },
            },
            other => ApplyError::Config(other.to_string()),
        })?;
        let driver = tokio::spawn(drive(
            connection,
            self.used.clone(),
            self.idle_release,
            self.pipeline.clone(),
        ));
        let pid = match setup_session(&client, &self.origin, &self.pipeline).await {
            Ok(pid) => pid,
            Err(e) => {
                driver.abort();
                let mut err = classify(&e, false);
                if let ApplyError::Database {
                    sqlstate, message, ..
                } = &mut err
                    && sqlstate == "42501"
                {
                    message.push_str(
                        " (the applier needs superuser or GRANT EXECUTE ON FUNCTION \
                         pg_replication_origin_create(text), pg_replication_origin_session_setup(text))",
                    );
                }
                return Err(err);
            }
        };
        self.connects += 1;
        if self.connects > 1 {
            metrics::counter!(m::PULL_APPLY_RECONNECTS_TOTAL, "pipeline" => self.pipeline.clone())
                .increment(1);
        }
        tracing::debug!(pipeline = %self.pipeline, origin = %self.origin, pid, "applier connected");
        self.conn = Some(Conn {
            client,
            driver,
            pid,
        });
        Ok(())
    }

    async fn table_info(
        &mut self,
        table: &TableName,
        refresh: bool,
    ) -> Result<Arc<TableInfo>, ApplyError> {
        if !refresh && let Some(t) = self.tables.get(table) {
            return Ok(t.clone());
        }
        let rows = self
            .client()?
            .query(
                "SELECT a.attname::text, \
                        pg_catalog.format_type(a.atttypid, NULL), \
                        pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        CASE WHEN a.atttypid IN ('pg_catalog.varchar'::regtype, 'pg_catalog.bpchar'::regtype) \
                             AND a.atttypmod > 4 THEN a.atttypmod - 4 END, \
                        a.attgenerated <> '', \
                        (SELECT pg_catalog.array_position(i.indkey::int2[], a.attnum) \
                           FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&table.schema, &table.name],
            )
            .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => return Err(self.fail(&e, false)),
        };
        if rows.is_empty() {
            return Err(ApplyError::Database {
                sqlstate: "42P01".into(),
                message: format!("table {table} does not exist (or has no columns)"),
                retryable: false,
            });
        }
        let info = Arc::new(TableInfo {
            columns: rows
                .iter()
                .map(|r| Column {
                    name: r.get(0),
                    base_type: r.get(1),
                    full_type: r.get(2),
                    char_max: r.get(3),
                    generated: r.get(4),
                    pk_pos: r.get(5),
                })
                .collect(),
        });
        self.tables.insert(table.clone(), info.clone());
        Ok(info)
    }

    /// After a data error without a column: the first value whose length exceeds its column's
    /// (22001), or whose cast to the column's full type fails with the same SQLSTATE.
    async fn find_bad_column(
        &mut self,
        info: &TableInfo,
        stmt: &Stmt,
        sqlstate: &str,
    ) -> Option<String> {
        let pairs = stmt.param_columns.iter().zip(&stmt.params).take(MAX_PROBES);
        if sqlstate == "22001" {
            return pairs
                .filter_map(|(c, v)| Some((info.column(c)?, v.as_ref()?)))
                .find(|(col, v)| col.char_max.is_some_and(|n| v.chars().count() > n as usize))
                .map(|(col, _)| col.name.clone());
        }
        let client = self.conn.as_ref().map(|c| &c.client)?;
        for (c, v) in pairs {
            let (Some(col), Some(v)) = (info.column(c), v) else {
                continue;
            };
            let sql = format!("SELECT $1::text::{}", col.full_type);
            if let Err(e) = client.query_typed(&sql, &[(v, Type::TEXT)]).await
                && e.code().is_some_and(|s| s.code() == sqlstate)
            {
                return Some(col.name.clone());
            }
        }
        None
    }

    /// The origin's `local_lsn`: the end LSN of this session's last commit.
    async fn commit_lsn(&mut self) -> Option<u64> {
        if !self.report_lsn {
            return None;
        }
        let client = &self.conn.as_ref()?.client;
        let r = client
            .query_opt(
                "SELECT local_lsn::text FROM pg_catalog.pg_replication_origin_status WHERE external_id = $1",
                &[&self.origin],
            )
            .await;
        match r {
            Ok(row) => row
                .and_then(|r| r.get::<_, Option<String>>(0))
                .as_deref()
                .and_then(parse_lsn),
            Err(e) => {
                if e.code().is_some_and(|s| s.code() == "42501") {
                    tracing::info!(pipeline = %self.pipeline, "no privilege to read pg_replication_origin_status; commit LSNs are not reported");
                    self.report_lsn = false;
                } else if e.is_closed() {
                    // The change is committed; the next call reconnects.
                    self.conn = None;
                }
                None
            }
        }
    }
}

/// Sets the application name, creates the origin when missing and binds it to the session;
/// returns the backend pid.
async fn setup_session(
    client: &Client,
    origin: &str,
    pipeline: &str,
) -> Result<i32, tokio_postgres::Error> {
    let app: String = format!("syncbridge-apply-{pipeline}")
        .chars()
        .take(63)
        .collect();
    client
        .execute(
            "SELECT pg_catalog.set_config('application_name', $1, false)",
            &[&app],
        )
        .await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1",
            &[&origin],
        )
        .await?
        .is_some();
    if !exists {
        match client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_create($1)",
                &[&origin],
            )
            .await
        {
            Ok(_) => tracing::info!(origin, "replication origin created"),
            // Created concurrently by another applier of the same pipeline.
            Err(e) if e.code().is_some_and(|s| s.code() == "23505") => {}
            Err(e) => return Err(e),
        }
    }
    client
        .execute(
            "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
            &[&origin],
        )
        .await?;
    let row = client
        .query_one("SELECT pg_catalog.pg_backend_pid()", &[])
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str, pk: Option<i32>) -> Column {
        Column {
            name: name.into(),
            base_type: ty.into(),
            full_type: ty.into(),
            char_max: None,
            generated: false,
            pk_pos: pk,
        }
    }

    fn info() -> TableInfo {
        TableInfo {
            columns: vec![
                col("id", "integer", Some(1)),
                col("Na\"me", "character varying", None),
                col("price", "numeric", None),
                col("gone", "boolean", None),
                col("deleted_at", "timestamp with time zone", None),
                Column {
                    generated: true,
                    ..col("total", "numeric", None)
                },
            ],
        }
    }

    fn t() -> TableName {
        TableName {
            schema: "app".into(),
            name: "or\"ders".into(),
        }
    }

    fn kv(pairs: &[(&str, Option<&str>)]) -> ColumnValues {
        pairs
            .iter()
            .map(|(c, v)| (c.to_string(), v.map(str::to_string)))
            .collect()
    }

    fn change(key: ColumnValues, kind: RowChangeKind) -> RowChange {
        RowChange {
            table: t(),
            key,
            kind,
        }
    }

    #[test]
    fn quoting_and_lsn() {
        assert_eq!(quote_ident("a"), "\"a\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("12"), None);
    }

    #[test]
    fn insert_returns_the_primary_key() {
        let s = build(
            &t(),
            &info(),
            &change(
                vec![],
                RowChangeKind::Insert {
                    values: kv(&[("Na\"me", Some("x")), ("price", None)]),
                },
            ),
        )
        .unwrap();
        assert_eq!(
            s.sql,
            "INSERT INTO \"app\".\"or\"\"ders\" (\"Na\"\"me\", \"price\") VALUES \
             ($1::text::character varying, $2::text::numeric) RETURNING \"id\"::text"
        );
        assert_eq!(s.params, vec![Some("x".to_string()), None]);
        assert_eq!(s.returning, vec!["id"]);
        let s = build(
            &t(),
            &info(),
            &change(vec![], RowChangeKind::Insert { values: vec![] }),
        )
        .unwrap();
        assert_eq!(
            s.sql,
            "INSERT INTO \"app\".\"or\"\"ders\" DEFAULT VALUES RETURNING \"id\"::text"
        );
    }

    #[test]
    fn update_delete_soft_delete() {
        let key = kv(&[("id", Some("7")), ("Na\"me", None)]);
        let s = build(
            &t(),
            &info(),
            &change(
                key.clone(),
                RowChangeKind::Update {
                    set: kv(&[("price", Some("1.5"))]),
                },
            ),
        )
        .unwrap();
        assert_eq!(
            s.sql,
            "UPDATE \"app\".\"or\"\"ders\" SET \"price\" = $1::text::numeric \
             WHERE \"id\" = $2::text::integer AND \"Na\"\"me\" IS NULL"
        );
        assert_eq!(s.param_columns, vec!["price", "id"]);
        let s = build(&t(), &info(), &change(key.clone(), RowChangeKind::Delete)).unwrap();
        assert_eq!(
            s.sql,
            "DELETE FROM \"app\".\"or\"\"ders\" WHERE \"id\" = $1::text::integer AND \"Na\"\"me\" IS NULL"
        );
        let soft = |c: &str| {
            build(
                &t(),
                &info(),
                &change(
                    kv(&[("id", Some("7"))]),
                    RowChangeKind::SoftDelete { column: c.into() },
                ),
            )
        };
        assert_eq!(
            soft("gone").unwrap().sql,
            "UPDATE \"app\".\"or\"\"ders\" SET \"gone\" = true WHERE \"id\" = $1::text::integer"
        );
        assert_eq!(
            soft("deleted_at").unwrap().sql,
            "UPDATE \"app\".\"or\"\"ders\" SET \"deleted_at\" = COALESCE(\"deleted_at\", now()) \
             WHERE \"id\" = $1::text::integer"
        );
        assert!(matches!(soft("price"), Err(BuildError::Invalid(_))));
    }

    #[test]
    fn refuses_what_cannot_be_right() {
        let i = info();
        let bad = |c: RowChange| build(&t(), &i, &c).unwrap_err();
        assert!(matches!(
            bad(change(vec![], RowChangeKind::Delete)),
            BuildError::Invalid(_)
        ));
        assert!(matches!(
            bad(change(
                kv(&[("id", Some("1"))]),
                RowChangeKind::Update { set: vec![] }
            )),
            BuildError::Invalid(_)
        ));
        assert_eq!(
            bad(change(
                kv(&[("id", Some("1"))]),
                RowChangeKind::Update {
                    set: kv(&[("nope", Some("1"))])
                }
            )),
            BuildError::UnknownColumn("nope".into())
        );
        assert!(matches!(
            bad(change(
                kv(&[("id", Some("1"))]),
                RowChangeKind::Insert {
                    values: kv(&[("id", Some("2"))])
                }
            )),
            BuildError::Invalid(_)
        ));
        assert!(matches!(
            bad(change(
                vec![],
                RowChangeKind::Insert {
                    values: kv(&[("total", Some("2"))])
                }
            )),
            BuildError::Invalid(_)
        ));
    }

    #[test]
    fn sqlstate_classes() {
        for s in [
            "08006", "57P01", "40001", "40P01", "55006", "53300", "25006",
        ] {
            assert!(retryable_state(s), "{s}");
        }
        for s in ["42501", "42P01", "23505", "22001", "XX000"] {
            assert!(!retryable_state(s), "{s}");
        }
        assert!(drops_connection("57P01") && !drops_connection("40001"));
        let e = ApplyError::Rejected {
            sqlstate: "23505".into(),
            message: "duplicate key value violates unique constraint \"u\"".into(),
            detail: Some("Key (a)=(1) already exists.".into()),
            column: None,
            constraint: Some("u".into()),
        };
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("23505") && e.to_string().contains("already exists"));
        assert!(
            ApplyError::Connection {
                message: "x".into(),
                maybe_applied: true
            }
            .is_retryable()
        );
    }
}
