//! The return path (pull, issue 6): changes people make in SharePoint lists flow back into
//! PostgreSQL (DESIGN.md §8).
//!
//! ```text
//! SharePoint list --(items/delta)--> poller --> <prefix>.<pipeline>.list-changes --> return processor
//!                                       \--> <prefix>.<pipeline>.cursors (compacted, deltaLink per list)
//! return processor --> applier --> PostgreSQL (replication origin `syncbridge_<pipeline>`)
//!        \--> <prefix>.<pipeline>.conflicts (every conflict, and its manual resolution)
//! ```
//!
//! The whole return path lives here, in data-path order:
//! - [`poller`]: one Graph delta poller per synced list, appending every item change to the log
//!   and moving its cursor (the deltaLink) only after those changes are durable; [`owner`]: with
//!   several processes of a pipeline, the one holding the list's lock runs it.
//! - `processor`: the return processor: what happens to a list change, from the log record to
//!   the flush that decides it. Each kind of change has its own module: `upsert` (an edit of an
//!   item with a `SyncKey`), `new_item` (a person-created item gets a row), `delete` (an item
//!   deleted in the list); `system` writes a created item's system fields (`ID`, `Created`…)
//!   into its row.
//! - `conflict`: the conflict record, eTag staleness (echoes and replays) and the policy
//!   decisions; [`resolve`]: an operator's decision on a conflict the `manual` policy parked.
//! - `values`: list field values ↔ row columns, the row read back as a ledger projection.
//! - [`apply`]: the PostgreSQL applier: one row change per transaction, values cast per the
//!   catalog, written under a replication origin so capture can tell them from application writes.
//!
//! # The cut between push and return
//! The return processor runs inside the push processor's task (`impl Processor` blocks here),
//! not as a task of its own: one owner per pipeline must decide a row's push and its pull
//! against one ledger entry (DESIGN §8), so within a flush the pulls are decided first, knowing
//! which rows also have a pending push. It reaches the push side only through the items of
//! `crate::process::processor` that its modules import by name:
//! - [`Processor`]'s state: the ledger, the pending pushes by ledger key, the table plans and
//!   facts, the Graph client and targets, the applier and catalog connections, the log and the
//!   conflicts topic, the stats; and the return path's own fields (pending pulls, their
//!   offsets, resync bookkeeping, the command queue), which the push side only flushes and
//!   commits;
//! - `Pending` and `Desired`: a row's pending push, read to decide conflicts and given the
//!   values a pull takes, so the push does not write old ones back;
//! - `Processor::project` (a row as the ledger's projection), `hash_projection`, `diff`,
//!   `Processor::append_dead` (dead letters) and `Processor::flush` (manual resolution flushes
//!   pending work before deciding).
//!
//! The push side calls into the return path only through `ingest_pull` (a list-change record),
//! `flush_pulls` (before its own writes), `serve_command` and `conflict_handle` (manual
//! resolution), and by queueing a `processor::PendingPull` for an item whose conditional PATCH
//! met 412 (decided as a conflict on the next flush).
//!
//! [`Processor`]: crate::process::Processor

pub mod apply;
mod conflict;
mod delete;
mod new_item;
pub mod owner;
pub mod poller;
pub(crate) mod processor;
pub mod resolve;
mod system;
mod upsert;
mod values;

pub use apply::{
    Applied, Applier, ApplyError, ColumnValues, RowChange, RowChangeKind, origin_name, quote_ident,
};
pub use conflict::{ConflictRecord, FieldConflict, conflicts_topic};
pub use poller::{
    ChangeKind, CursorPhase, ListChange, PollerConfig, PullError, ResyncReason, StartMode,
    StoredCursor, changes_topic, cursors_topic, read_cursor, run,
};
pub use resolve::{
    ConflictCommand, ConflictEntry, ConflictHandle, ConflictState, ConflictView, PARKED,
    RESOLVED_MANUALLY, Resolution, ResolveError, Take, conflict_views, format_ms, read_conflicts,
};
