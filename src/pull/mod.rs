//! The return path (pull, issue 6): changes people make in SharePoint lists flow back into
//! PostgreSQL (DESIGN.md §8).
//!
//! ```text
//! SharePoint list --(items/delta)--> poller --> <prefix>.<pipeline>.list-changes --> return processor
//!                                       \--> <prefix>.<pipeline>.cursors (compacted, deltaLink per list)
//! return processor --> applier --> PostgreSQL (replication origin `syncbridge_<pipeline>`)
//! ```
//!
//! Two independent building blocks live here; the return processor between them (mapping back,
//! echo suppression via the ledger, conflict policies) arrives separately:
//! - [`poller`]: one Graph delta poller per synced list, appending every item change to the log
//!   and moving its cursor (the deltaLink) only after those changes are durable.
//! - [`apply`]: the PostgreSQL applier: one row change per transaction, values cast per the
//!   catalog, written under a replication origin so capture can tell them from application writes.

pub mod apply;
pub mod poller;
pub(crate) mod processor;
pub mod resolve;

pub use apply::{
    Applied, Applier, ApplyError, ColumnValues, RowChange, RowChangeKind, origin_name, quote_ident,
};
pub use poller::{
    ChangeKind, CursorPhase, ListChange, PollerConfig, PullError, ResyncReason, StartMode,
    StoredCursor, changes_topic, cursors_topic, read_cursor, run,
};
pub use processor::{ConflictRecord, FieldConflict, conflicts_topic};
pub use resolve::{
    ConflictCommand, ConflictEntry, ConflictHandle, ConflictState, ConflictView, PARKED,
    RESOLVED_MANUALLY, Resolution, ResolveError, Take, conflict_views, format_ms, read_conflicts,
};
