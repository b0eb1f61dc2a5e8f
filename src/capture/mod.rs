//! Capture: PostgreSQL logical replication (pgoutput) → Debezium-style Avro change events in the
//! log. The replication slot is acknowledged only up to what is durable in the log.
//!
//! # Delivery contract of the replication reader ([`run`])
//! 1. **Only committed changes, in commit order.** Changes are buffered per transaction (streamed
//!    in-progress transactions per xid, with each change's subxact xid) and handed to the
//!    [`EventSink`] at Commit / StreamCommit; a StreamAbort of a (sub)transaction drops its changes.
//!    Transactions reach the sink in commit-LSN order, a transaction's events in WAL order.
//! 2. **Acknowledge only what is durable.** The slot's flush LSN (standby status update, sent at
//!    least every `feedback_interval` ≤ 1 s while events flow) only moves to the end LSN of a
//!    transaction after [`EventSink::append`] returned `Ok` for its events and for every event
//!    before them; a heartbeat's LSN only when nothing is waiting for the sink. A failed append
//!    acknowledges nothing more; the session reconnects and the slot re-sends from the last ack.
//!    Appending runs on a task of its own so reading goes on meanwhile: batches are handed over
//!    with their end LSN (at most `sink_in_flight` at a time, then the reader waits), appended
//!    strictly in order, and reported back in order only once durable (see `sink_task.rs`).
//! 3. **At least once.** After a restart, reconnect, PostgreSQL restart or killed walsender, reading
//!    resumes at the slot's `confirmed_flush_lsn` (or this process's higher durable LSN): events
//!    after the last acknowledgement may arrive again (same `source.lsn`), none are lost.
//! 4. **Snapshot first.** On the first run the slot is created with an exported snapshot and every
//!    table is read in primary-key chunks inside one REPEATABLE READ transaction on it (`op = r`,
//!    `source.snapshot = true`, `source.lsn` = the slot's consistent point); streaming starts at the
//!    consistent point after that. Progress is durable per chunk; a resumed snapshot reads the
//!    remaining chunks under a fresh snapshot and later WAL events win (see [`snapshot`]).
//! 5. **Provenance.** A transaction with a replication origin has `source.origin` set on all its
//!    events (`syncbridge_<pipeline>` for our own return-path writes); they are delivered and
//!    acknowledged like any other, the processor decides not to push them back.
//! 6. **Unchanged TOAST** values (REPLICA IDENTITY DEFAULT, column not touched by an UPDATE) are
//!    [`crate::event::change::Value::UnchangedToast`], never NULL or a placeholder. A primary-key change is a
//!    Delete of the old key followed by a Create of the new one in the same transaction.
//! 7. **One reader per slot.** A `pg_try_advisory_lock(lock_key(slot))` on a dedicated connection is
//!    held while reading; other instances poll and take over when its connection dies. Losing the
//!    lock connection stops reading at once.
//! 8. **Never silently recreated.** The slot and publication `sb_<pipeline>` are created on first
//!    run only. An invalidated slot (`wal_status = lost` / `conflicting`), a table missing from the
//!    publication, a slot without a snapshot progress record, a slot that disappeared after it
//!    existed, or a table without a key is an operator error whose message says how to fix it.
//!    Tables added to the pipeline (and publication) later get an initial snapshot on restart.
//!    One exception: after a failover to an instance without the slot (see 10) it is created
//!    there and every table read again.
//! 9. **Re-snapshot while streaming.** One table can be read again on request
//!    ([`run_with_control`], control plane `POST /pipelines/{name}/snapshot?table=s.t`): chunks
//!    are read between low/high watermarks written into the WAL and emitted at the high watermark
//!    minus the keys the stream changed in between, so the newer value always wins per key
//!    (see [`resnapshot`]).
//! 10. **Failover.** With `source.urls` ([`CaptureConfig::failover_urls`]) the lock and every
//!     session go to the instance that is the primary; when it is lost, capture waits for a
//!     promoted one and resumes: from the synchronised slot on PostgreSQL 17+ (slots are created
//!     with `failover = true`), else with a new slot and a re-read of every table that the
//!     ledger absorbs. Each failover is reported ([`failover`], ops/docs/failover.md).
//!
//! 11. **Schema changes are not capture's to judge.** A Relation message with another column
//!     set gives the table a new relation version and Avro schema, and its events are appended and
//!     acknowledged like any other: the slot never waits for a mapping. The push processor holds a
//!     table whose events no longer fit its mapping (see `process::processor::schema_check`).
//!
//! # Where each step lives
//! `run.rs` holds the single-reader lock and restarts sessions with backoff; `session.rs` runs one
//! session (connect and check the source, resolve tables and publication, create or resume the
//! slot, the initial snapshot in `snapshot.rs`); `streaming.rs` is the stream loop (decode in
//! `decode.rs`, batch, acknowledge, re-snapshot chunks from `resnapshot.rs`); `sink_task.rs`
//! appends batches in order through the [`EventSink`] ([`LogSink`] in production).
//! `query.rs` is the other input: sync entries with `query:` instead of `table:` are polled, not
//! replicated, into the same events (ops/docs/query-sources.md); `db_check.rs` is `validate --db`.
//!
//! # Requirements and grants
//! PostgreSQL ≥ 14 with `wal_level = logical`. The capture role needs `REPLICATION` (replication
//! connection, slot, `pg_logical_emit_message` heartbeats) and `SELECT` on the captured tables;
//! on the first run also `CREATE` on the database and ownership of the tables to create the
//! publication (or an administrator creates `sb_<pipeline>` `FOR TABLE ...` beforehand):
//! ```sql
//! CREATE ROLE syncbridge LOGIN REPLICATION PASSWORD '...';
//! GRANT SELECT ON schema.table1, schema.table2 TO syncbridge;
//! GRANT CREATE ON DATABASE mydb TO syncbridge;  -- first run only, for CREATE PUBLICATION
//! ```
//! The replication connection uses libpq; catalog, snapshot, lock and heartbeat connections use
//! tokio-postgres through [`crate::pg`], which gives `sslmode` / `sslrootcert` libpq's meaning, so
//! every connection has the same TLS. `sslmode` is required in the URL (libpq's default `prefer`
//! silently falls back to plaintext); production URLs should say `verify-full`.
//!
//! # Limits
//! - Streamed (large) transactions are buffered in memory until their commit.
//! - Snapshot progress ([`snapshot::FileProgress`]) lives in the local state directory; a standby
//!   on another host needs that directory on shared storage (or another
//!   [`snapshot::SnapshotProgress`] implementation) to take over.
//! - Relation facts besides name/type/typmod/order (nullability, type kind) are read from the
//!   current catalog when a Relation message arrives, not from the catalog as of that WAL position.

pub mod catalog;
pub mod config;
pub mod db_check;
mod decode;
pub mod error;
pub mod failover;
pub mod log_sink;
pub mod query;
pub mod resnapshot;
mod run;
mod session;
pub mod sink;
mod sink_task;
pub mod snapshot;
mod streaming;

pub use config::{CaptureConfig, TableSpec};
pub use error::CaptureError;
pub use log_sink::LogSink;
pub use resnapshot::{ResnapshotHandle, ResnapshotRequests, ResnapshotState, ResnapshotStatus};
pub use run::{lock_key, run, run_with_control, run_with_progress};
pub use session::stream_config;
pub use sink::{EventSink, SinkError};
pub use streaming::slot_lag_bytes;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
