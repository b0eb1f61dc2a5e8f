//! The in-process change event: what the replication reader (or the snapshot) hands to the
//! encoder. It is deliberately independent of `pg_walstream`'s types so the encoder, its tests
//! and its fuzz target need no database, and so a future reader can produce the same thing.
//!
//! Values keep PostgreSQL's text output form (what pgoutput sends in text mode and what
//! `SELECT col::text` gives the snapshot); the encoder converts them to Avro using the column's
//! catalog type. Keeping the text form here makes the mapping lossless and testable in one place.

use std::sync::Arc;

/// Debezium `op` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: INSERT (or the create half of a primary-key change).
    Create,
    /// `u`: UPDATE with the same primary key.
    Update,
    /// `d`: DELETE (or the delete half of a primary-key change).
    Delete,
    /// `r`: a row read by the initial or an on-demand snapshot.
    Read,
    /// `t`: TRUNCATE of the table.
    Truncate,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// Catalog facts about one column, resolved once per relation (schema) version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    /// `pg_type.oid` of the column's type.
    pub type_oid: u32,
    /// `format_type(atttypid, atttypmod)`, e.g. `numeric(12,2)`, `character varying(40)`, `text[]`.
    pub type_name: String,
    /// `atttypmod` (-1 when none); numeric precision/scale and varchar lengths live here.
    pub type_modifier: i32,
    /// What the type is, so the encoder needs no catalog access.
    pub kind: TypeKind,
    /// Part of the event key (the primary key, or the pipeline's configured `key`).
    pub is_key: bool,
    pub nullable: bool,
}

/// Shape of a column type, as far as encoding cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TypeKind {
    /// A built-in scalar type, identified by `type_oid`.
    Base,
    /// A user enum (encoded as its label string).
    Enum,
    /// An array whose element type has this oid and kind.
    Array {
        element_oid: u32,
        element: Box<TypeKind>,
    },
    /// A domain over the given base type oid.
    Domain { base_oid: u32 },
    /// Anything else (composite, range, ...): encoded as its text form with a warning once.
    Other,
}

/// One version of a table's shape. A new `Arc<Relation>` is made whenever the relation message
/// or the catalog says the columns changed; `version` increases then.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    /// 'd' default, 'f' full, 'i' index, 'n' nothing (pg_class.relreplident).
    pub replica_identity: char,
    pub version: u32,
}

/// One column's value in a row image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// PostgreSQL's text output form of the value.
    Text(String),
    /// An unchanged TOASTed value that the server did not send (never NULL, never a placeholder).
    UnchangedToast,
}

/// A row image, one value per `Relation::columns` entry, in the same order.
pub type Row = Vec<Value>;

/// `source.connector` of events read from the WAL (replication and snapshots).
pub const CONNECTOR_WAL: &str = "syncbridge";
/// `source.connector` of a query source's full read (`poll.full` or `poll.full_every`).
pub const CONNECTOR_QUERY_FULL: &str = "syncbridge.query.full";
/// `source.connector` of a query source's incremental read on a timestamp cursor.
pub const CONNECTOR_QUERY_TIMESTAMP: &str = "syncbridge.query.timestamp";
/// `source.connector` of a query source's incremental read on an incrementing cursor.
pub const CONNECTOR_QUERY_INCREMENTING: &str = "syncbridge.query.incrementing";

/// Where and when the change happened (Debezium `source` block).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// What read the change: [`CONNECTOR_WAL`] or one of the `CONNECTOR_QUERY_*` modes.
    pub connector: &'static str,
    /// The pipeline name (Debezium's logical server `name`).
    pub pipeline: String,
    pub db: String,
    /// LSN of the change's transaction commit (end LSN for acknowledgement purposes); for a
    /// query source the incrementing cursor's value, else 0 (see `capture::query`).
    pub lsn: u64,
    pub tx_id: Option<u32>,
    /// Commit timestamp, ms since the Unix epoch.
    pub commit_ts_ms: i64,
    /// The replication origin of the transaction (`syncbridge_<name>` for our own return-path writes).
    pub origin: Option<String>,
    /// True for `op = r` rows read by a snapshot.
    pub snapshot: bool,
}

/// One committed change of one row (or a TRUNCATE of the table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub relation: Arc<Relation>,
    pub op: Op,
    /// Old row image: key columns only (REPLICA IDENTITY DEFAULT) or all columns (FULL); None for c/r/t.
    pub before: Option<Row>,
    /// New row image; None for d/t.
    pub after: Option<Row>,
    pub source: Source,
    /// When SyncBridge processed the event, ms since the epoch (Debezium's top-level `ts_ms`).
    pub ts_ms: i64,
}
