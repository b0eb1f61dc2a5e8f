//! Drift: what differs between the synced tables and their lists, and healing it (issue 14).
//!
//! It lives under `process/` because it is the processor's view of the two sides: it reads the
//! ledger ([`super::ledger`]) and the processor's targets, and every fix goes through the normal
//! writer path (ledger, intents, If-Match) — never a side channel.
//!
//! # Files
//! - [`check`](DriftHandle): the entry points, [`DriftHandle::check`] and [`DriftHandle::heal`]
//!   (one run each, a [`DriftReport`] back); what they read and how they pace themselves.
//! - `classify`: the pure classification ([`classify`], [`confirmed`] for the two-pass re-check).
//! - `commands`: what a check asks of the processor task (ledger snapshot, ledger repairs).
//! - `report`: [`DriftReport`] and its parts (the API's body).
//! - `stale`: the vanished-list case at start.
//!
//! The scheduler (`drift_check`/`drift_heal` jobs) calls `DriftHandle::check`/`heal` on the
//! handle registered for the pipeline (`control::Registries::drift`).
//!
//! # The vanished-list case ([`stale`])
//! A ledger names items in lists by id. When a list is deleted (or the Graph emulator restarts
//! empty) provisioning re-creates it under a new id, and every ledger entry pointing into the old
//! id is *stale*: the row's values did not change, so no write would ever happen and the new list
//! stayed empty. At start, before the first write, [`Processor::repair_stale_ledger`] drops
//! those entries (durably, through the ledger's changelog); [`heal_vanished`] then re-reads the
//! affected tables with a watermarked re-snapshot (see [`crate::capture::resnapshot`]), whose
//! `r` events reach the processor like any change and, finding no ledger entry, create the items
//! (intent first, idempotent by `SyncKey`). The heal is recorded as one `drift_heal` run.
//!
//! [`Processor::repair_stale_ledger`]: crate::process::Processor::repair_stale_ledger

mod check;
mod classify;
mod commands;
mod report;
mod stale;

pub use check::{
    DEFAULT_BUDGET_SHARE, DriftError, DriftHandle, HealSide, PAGE_SIZE, ProcessorFacts,
    drift_lock_name, heal_side,
};
pub use classify::{SeenItem, SeenList, SeenTable, Sides, classify, confirmed};
pub use commands::{DivergedFix, DriftCommand, LedgerView, Repairs};
pub use report::{ClassCounts, Difference, DriftClass, DriftReport, HealSummary, ListCount};
pub use stale::{StaleLedger, heal_vanished, resnapshot};
