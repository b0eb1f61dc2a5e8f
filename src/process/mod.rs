//! The push path: the stateful sync processor and its Graph writer (DESIGN §6–7).
//!
//! One processor per pipeline and process consumes the capture topics
//! (`<prefix>.<pipeline>.<schema>.<table>`) as consumer group `<prefix>.<pipeline>.sync` and, per
//! event:
//! 1. decodes the Avro envelope ([`row`]) — the same bytes any external consumer reads;
//! 2. coalesces: pending writes are keyed by row; a later change within the flush window replaces
//!    the earlier one (a create then a delete in one window costs nothing);
//! 3. at flush time maps the latest row state ([`convert`]), routes it ([`route`]), compares it
//!    with the [`ledger`] (same hash → no write) and writes the difference through Graph `$batch`
//!    (creates, field-level PATCHes, deletes, moves), rate-limited by the tenant's RU limiter;
//! 4. records the outcome in the ledger (sled + compacted changelog), dead-letters what cannot be
//!    written ([`dlq`]), records each decision in the audit trail ([`audit`]: appended before
//!    the ledger change it describes), and only then commits the input offsets.
//!
//! # Delivery contract
//! Each promise is documented again, in more detail, next to the code that keeps it (the files
//! of `processor`: `consume` → `coalesce` → `project` → `plan` → `write` → `outcome` →
//! `flush`).
//! - **Offsets follow durability.** An input offset is committed only when every event below it
//!   is reflected in a durable ledger entry, a durable dead letter, or was skipped on purpose
//!   (own-origin, stale, unmapped table). A crash replays from the committed offsets.
//!   Kept by `processor::coalesce` (a pending write remembers its lowest offset),
//!   `processor::dead_letters` (dead letters are appended before a row is let go) and
//!   `processor::flush` (rows leave the pending set after their ledger step; the offset commit
//!   stops at the lowest pending offset).
//! - **Never two items, never none.** Before a create the ledger records an *intent*. A create
//!   is only ever retried as a create: if the earlier attempt had reached SharePoint, the unique
//!   `SyncKey` column rejects the second one and the processor adopts the existing item (looked
//!   up by `SyncKey`). A move creates in the new list, records it, then deletes the old item;
//!   a crash in between is repaired on replay (the old item is remembered as `pending_delete`).
//!   Kept by `processor::plan` (intents, open intents resolved), `processor::flush` (intents
//!   durable before the writes; each step recorded before the next), `processor::write`
//!   (`Duplicate`) and `processor::outcome` (adoption, moves, re-creates).
//! - **Idempotent replays.** Updates carry the full changed projection (re-applying is harmless);
//!   deletes of a missing item count as done. Replayed events older than the ledger's LSN for the
//!   row are skipped. Kept by `processor::plan` (stale rows, unchanged hashes, fields in flight)
//!   and `processor::outcome` (a missing item's delete is done).
//! - **One owner per partition.** With several processes of one pipeline (Kafka), each owns the
//!   partitions the group assigns it; it restores the ledger before using a new one and leaves
//!   a revoked one's pending writes to the new owner. Kept by `processor::assign`.
//! - **Own writes are not echoed.** Events whose transaction carries this pipeline's replication
//!   origin (the return path's applier) are skipped, and they cancel an older pending push of the
//!   same row. Kept by `processor::coalesce` (`Processor::fold_own_write`).

pub mod audit;
pub mod convert;
pub mod delete_guard;
pub mod dlq;
pub mod drift;
pub mod guard;
pub mod hold;
pub mod ledger;
pub(crate) mod processor;
pub mod provision;
pub mod route;
pub mod row;
pub(crate) mod schemas;

use std::path::PathBuf;
use std::time::Duration;

pub use processor::{Processor, ProcessorStats, sync_key};
pub use provision::{ProvisionError, Targets, provision};

use crate::config::PipelineConfig;
use crate::graph::GraphError;
use crate::log::LogError;

/// Changes to one row within this window become one write of its latest state. 200 ms keeps
/// push latency well under a second while collapsing bursts (bulk UPDATEs, app retries). The
/// window is an upper bound: a processor that has caught up with its input flushes at once, and
/// a transaction still arriving is never split (see `Processor::flush_deadline`).
pub const DEFAULT_FLUSH_WINDOW: Duration = Duration::from_millis(200);
/// Pending rows that force a flush before the window ends: bounds memory and the size of one
/// flush (100 `$batch` requests of 20).
pub const DEFAULT_MAX_PENDING: usize = 2000;
/// `$batch` requests in flight per processor; the tenant limiter bounds the rate anyway, this
/// bounds the burst against one site.
pub const DEFAULT_BATCH_CONCURRENCY: usize = 4;
/// Flushes a row waits for its lookup target to be written (another table's row, possibly read
/// from another topic a little later) before it is dead-lettered: about 5 s at the processor's
/// 50 ms retry pause.
pub const MAX_LOOKUP_DEFERRALS: u32 = 100;

/// `<prefix>.<pipeline>.ledger`.
pub fn ledger_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.ledger")
}

/// `<prefix>.<pipeline>.sync`: the push processor's consumer group.
pub fn sync_group(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.sync")
}

/// `<prefix>.<pipeline>.return`: the return path's consumer group (list changes).
pub fn return_group(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.return")
}

/// The replication origin the return path writes with (`syncbridge_<pipeline>`).
pub fn origin_name(pipeline: &str) -> String {
    format!("syncbridge_{pipeline}")
}

/// Everything one processor needs besides its log and Graph client.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub pipeline: PipelineConfig,
    /// Topic prefix (`<prefix>.<pipeline>.…`).
    pub prefix: String,
    /// Partitions of the capture topics (created here if capture has not yet).
    pub table_partitions: i32,
    /// Local state (the ledger's sled store lives in `<state_dir>/ledger`).
    pub state_dir: PathBuf,
    pub flush_window: Duration,
    pub max_pending: usize,
    pub batch_concurrency: usize,
    /// Record every decision in `<prefix>.<pipeline>.audit` ([`audit`]). On by default: the
    /// control plane's row history reads it; off only to measure what it costs.
    pub audit: bool,
}

impl ProcessorConfig {
    pub fn new(
        pipeline: PipelineConfig,
        prefix: &str,
        table_partitions: i32,
        state_dir: PathBuf,
    ) -> Self {
        ProcessorConfig {
            pipeline,
            prefix: prefix.to_string(),
            table_partitions,
            state_dir,
            flush_window: DEFAULT_FLUSH_WINDOW,
            max_pending: DEFAULT_MAX_PENDING,
            batch_concurrency: DEFAULT_BATCH_CONCURRENCY,
            audit: true,
        }
    }
}

/// Why the processor stopped or a flush failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("Graph: {0}")]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("PostgreSQL catalog: {0}")]
    Catalog(String),
    #[error("{0}")]
    Config(String),
    /// Resolving a Confluent schema id (`log.kafka.schema_registry`) failed.
    #[error(transparent)]
    Registry(#[from] crate::event::registry::RegistryError),
    /// The pipeline paused itself (a dead-letter storm, a schema that cannot be had): nothing
    /// past the first failing event was acknowledged; the runtime waits for the operator.
    #[error("pipeline paused ({}): {}", .0.kind, .0.reason)]
    Paused(guard::Paused),
}

impl From<crate::pg::PgConnectError> for ProcessError {
    /// Bad TLS options or root certificates need an operator; connection failures are retried.
    fn from(e: crate::pg::PgConnectError) -> Self {
        match e {
            crate::pg::PgConnectError::Postgres(e) => ProcessError::Catalog(e.to_string()),
            other => ProcessError::Config(format!("source.url: {other}")),
        }
    }
}

impl ProcessError {
    /// Whether retrying (the flush, or the stage) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProcessError::Log(e) => e.is_retryable(),
            ProcessError::Ledger(e) => e.is_retryable(),
            ProcessError::Graph(e) => e.is_retryable(),
            ProcessError::Provision(e) => e.is_retryable(),
            ProcessError::Catalog(_) => true,
            ProcessError::Config(_) => false,
            ProcessError::Registry(e) => e.is_retryable(),
            ProcessError::Paused(_) => false,
        }
    }
}

/// Test-only crash points, armed by `SYNCBRIDGE_FAILPOINTS` (e.g.
/// `push.after_graph=0.05,push.after_intent=0.02`): at an armed point the process aborts
/// (like `kill -9`) with the given probability. Unset in production.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    points: Vec<(String, f64)>,
}

impl Failpoints {
    pub fn from_env() -> Self {
        let spec = std::env::var("SYNCBRIDGE_FAILPOINTS").unwrap_or_default();
        let points = spec
            .split(',')
            .filter_map(|p| {
                let (name, prob) = p.split_once('=')?;
                Some((name.trim().to_string(), prob.trim().parse().ok()?))
            })
            .collect();
        Failpoints { points }
    }

    /// Aborts the process when `name` is armed and the dice say so.
    pub fn hit(&self, name: &str) {
        if let Some((_, p)) = self.points.iter().find(|(n, _)| n == name)
            && rand::random::<f64>() < *p
        {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}
