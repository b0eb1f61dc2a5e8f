//! What a drift check found: [`DriftReport`], one [`Difference`] per finding.

use serde::{Deserialize, Serialize};

/// The kinds of difference a check reports.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DriftClass {
    /// A row without an item.
    Missing,
    /// An item whose SyncKey names no row, or that has no SyncKey.
    Orphaned,
    /// An item whose mapped fields differ from what the sync last wrote (`fields` names them).
    Divergent,
    /// A row's item in a list other than the one the sync put it in.
    Misrouted,
    /// A second (third, …) item with a row's SyncKey; the one the ledger names is kept.
    Duplicate,
    /// A ledger entry naming an item or list that does not exist.
    StaleLedger,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Difference {
    pub class: DriftClass,
    /// `schema.table` (empty for an item without SyncKey).
    pub table: String,
    /// The row's SyncKey (empty for an item without one).
    pub key: String,
    /// The list the item is in (or, for `missing`, the list it should be in; may be empty when
    /// the routes decide and the row has no ledger entry).
    pub list: String,
    /// The item concerned (`missing`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// The item's eTag when read (deletes send it as If-Match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `divergent`: the fields whose values differ.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

/// Per list: how many rows the ledger places there (or whose entry has only this list) and how
/// many items it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListCount {
    pub list: String,
    pub rows: u64,
    pub items: u64,
}

/// Counts per class (see [`DriftClass`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ClassCounts {
    pub missing: u64,
    pub orphaned: u64,
    pub divergent: u64,
    pub misrouted: u64,
    pub duplicate: u64,
    pub stale_ledger: u64,
}

impl ClassCounts {
    pub fn of(diffs: &[Difference]) -> Self {
        let mut c = ClassCounts::default();
        for d in diffs {
            *match d.class {
                DriftClass::Missing => &mut c.missing,
                DriftClass::Orphaned => &mut c.orphaned,
                DriftClass::Divergent => &mut c.divergent,
                DriftClass::Misrouted => &mut c.misrouted,
                DriftClass::Duplicate => &mut c.duplicate,
                DriftClass::StaleLedger => &mut c.stale_ledger,
            } += 1;
        }
        c
    }

    pub fn total(&self) -> u64 {
        self.missing
            + self.orphaned
            + self.divergent
            + self.misrouted
            + self.duplicate
            + self.stale_ledger
    }
}

/// The result of one check (the body of `POST`/`GET /pipelines/{p}/drift`; kept in the
/// meta-store, see `crate::control::meta::drift`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DriftReport {
    pub pipeline: String,
    /// The `drift_check` (or `drift_heal`) run that produced it.
    pub run_id: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub counts: ClassCounts,
    pub lists: Vec<ListCount>,
    pub differences: Vec<Difference>,
    /// Differences seen in the first pass but explained by changes in flight (gone in the re-check).
    pub in_flight: u64,
    /// Graph requests and resource units the check spent.
    pub graph_requests: u64,
    pub resource_units: u64,
    /// `heal` only: what the heal did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healed: Option<HealSummary>,
    /// A report read from the meta-store holds one page of `differences`: pass this as `after`
    /// for the next page (absent on the last page, and on a report fresh from a check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// What a heal did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealSummary {
    /// Items deleted (orphaned, duplicate, misrouted), each with If-Match.
    pub deleted: u64,
    /// Ledger entries repaired (dropped or re-pointed) so the writer rewrites the rows.
    pub ledger_repaired: u64,
    /// Tables re-read through a re-snapshot, so the writer path creates and rewrites.
    pub resnapshotted: Vec<String>,
    /// Deletes refused because the item changed since the check (412) or failed, and divergent
    /// items not healed (their entry or row changed since the check, or the row refused the
    /// item's value).
    pub skipped: u64,
    /// Divergent items whose row took the item's values (fields healed from the item: `pull_only`,
    /// `target_wins`, `last_writer_wins`), through the return path's applier.
    #[serde(default)]
    pub pulled: u64,
    /// Divergent items with a `manual` field, left alone there (still reported).
    #[serde(default)]
    pub manual: u64,
}
