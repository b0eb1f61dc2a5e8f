//! A person-created item (no `SyncKey`): a new row for it.
//!
//! The steps of [`Processor::pull_new_item`]: the item's column values; a key pre-allocated
//! from a mapped value or the key columns' defaults and recorded as an *intent* in the ledger;
//! the key written to the item as `SyncKey` (conditional on the version read); then the row
//! inserted, the database's own values (defaults, triggers) written back to the item, and the
//! intent turned into a *created marker*.
//!
//! Invariant: never two rows for one item. A replay finds the intent (and reuses its key), a
//! second insert meets the primary key, and the marker stays until the item is deleted, so the
//! item's creation read again after a restart makes no second row.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use serde_json::{Map, Value as Json};
use tracing::{debug, warn};

use super::ApplyError;
use super::processor::{PendingPull, PullOutcome};
use super::values::{ItemWrite, key_values, rejected_reason};
use crate::config::SYNC_KEY_FIELD;
use crate::graph::GraphError;
use crate::log::EventLog;
use crate::process::audit::AuditOp;
use crate::process::convert;
use crate::process::ledger::{self, Entry, ItemRef, Provenance};
use crate::process::processor::{Processor, diff, hash_projection};
use crate::process::row::Cell;
use crate::process::{ProcessError, sync_key};

/// Column values of a new row (column → text), and the item's canonical projection.
type ItemValues = (Vec<(String, Option<String>)>, BTreeMap<String, Json>);

/// Ledger key of a person-created item's intent (and, once its row exists, its marker).
pub(super) fn new_item_key(table: &str, p: &PendingPull) -> Vec<u8> {
    ledger::key(table, &format!("\u{1}new:{}/{}", p.list_id, p.item_id))
}

/// The intent entry of a person-created item whose row `sk` was inserted.
pub(super) fn created_marker(sk: &str) -> Entry {
    Entry {
        new_row_key: Some(sk.to_string()),
        row_created: true,
        ..Entry::default()
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Makes the row of a person-created item (see the module docs for the steps).
    pub(super) async fn pull_new_item(
        &mut self,
        p: &PendingPull,
    ) -> Result<PullOutcome, ProcessError> {
        let table = self.tables[p.table].table.clone();
        let intent_key = new_item_key(&table, p);
        let intent = self.ledger.get(&intent_key)?;
        if intent.as_ref().is_some_and(|e| e.row_created) {
            // The item's creation read again after a restart (offsets trail the ledger): its row
            // exists, and the item's later changes (at least the echo of the SyncKey write)
            // follow in the log with its whole state. A new key now would make a second row.
            debug!(table = %table, item = %p.item_id, "replayed creation of a person-created item whose row exists: skipped");
            self.stats.echoes += 1;
            return Ok(PullOutcome::Done);
        }
        let (values, projection) = match self.item_values(p).await? {
            ControlFlow::Continue(v) => v,
            ControlFlow::Break(outcome) => return Ok(outcome),
        };
        let sk = match intent.as_ref().and_then(|e| e.new_row_key.clone()) {
            Some(sk) => sk,
            None => match self.allocate_key(p, &values, &intent_key).await? {
                ControlFlow::Continue(sk) => sk,
                ControlFlow::Break(outcome) => return Ok(outcome),
            },
        };
        let resumed = intent.is_some();
        let etag = match self.write_sync_key(p, &sk, resumed, &intent_key).await? {
            ControlFlow::Continue(etag) => etag,
            ControlFlow::Break(outcome) => return Ok(outcome),
        };
        self.insert_new_row(p, &sk, values, projection, etag, intent_key)
            .await
    }

    /// The new row's column values, read from the item's pulled fields.
    async fn item_values(
        &mut self,
        p: &PendingPull,
    ) -> Result<ControlFlow<PullOutcome, ItemValues>, ProcessError> {
        let fields = p.fields.clone().unwrap_or_default();
        let mut values = Vec::new();
        let mut projection = BTreeMap::new();
        for f in &self.pull_fields(p.table) {
            let canon = convert::canonical_from_item(&fields, f);
            match self.pulled_text(f, &canon).await? {
                Ok(text) => values.push((f.column.clone(), text)),
                Err(u) => {
                    let dead = self.pull_dead(p, "?", u.kind, u.to_string());
                    return Ok(ControlFlow::Break(PullOutcome::dead(dead)));
                }
            }
            projection.extend(canon);
        }
        Ok(ControlFlow::Continue((values, projection)))
    }

    /// Pre-allocates the new row's key (per key column: a mapped value, else the column's
    /// default) and records it as the item's intent before anything is written.
    async fn allocate_key(
        &mut self,
        p: &PendingPull,
        values: &[(String, Option<String>)],
        intent_key: &[u8],
    ) -> Result<ControlFlow<PullOutcome, String>, ProcessError> {
        let facts = self.facts[p.table].clone();
        let mut parts = Vec::new();
        for (col, default) in facts.key_columns.iter().zip(&facts.key_defaults) {
            if let Some((_, Some(v))) = values.iter().find(|(c, _)| c == col) {
                parts.push(Cell::Text(v.clone()));
                continue;
            }
            let Some(expr) = default else {
                let dead = self.pull_dead(p, "?", "no_key",
                    format!("key column {col} has no default and is not mapped from a list field; cannot create a row for a person-created item"));
                return Ok(ControlFlow::Break(PullOutcome::dead(dead)));
            };
            let v = self.eval_default(expr).await?;
            parts.push(Cell::Text(v));
        }
        let named: Vec<(String, Cell)> = facts.key_columns.iter().cloned().zip(parts).collect();
        let sk = sync_key(&named);
        let e = Entry {
            new_row_key: Some(sk.clone()),
            ..Entry::default()
        };
        self.ledger
            .commit(vec![(intent_key.to_vec(), Some(e))])
            .await?;
        Ok(ControlFlow::Continue(sk))
    }

    async fn eval_default(&mut self, expr: &str) -> Result<String, ProcessError> {
        let client = self.catalog().await?;
        let row = client
            .query_one(&format!("SELECT ({expr})::text"), &[])
            .await
            .map_err(|e| {
                ProcessError::Catalog(format!("evaluating the key default {expr}: {e}"))
            })?;
        row.get::<_, Option<String>>(0)
            .ok_or_else(|| ProcessError::Config(format!("the key default {expr} gave NULL")))
    }

    /// Writes the key to the item as `SyncKey` before the row exists: a crash after this is
    /// resumed by the intent, and the delta of this very write is recognised as an echo
    /// afterwards. Continues with the item's new eTag. `resumed`: the intent was there before
    /// this attempt (an earlier one may have inserted the row).
    async fn write_sync_key(
        &mut self,
        p: &PendingPull,
        sk: &str,
        resumed: bool,
        intent_key: &[u8],
    ) -> Result<ControlFlow<PullOutcome, Option<String>>, ProcessError> {
        let mut f = Map::new();
        f.insert(SYNC_KEY_FIELD.into(), Json::String(sk.to_string()));
        // Conditional on the version read: a person's later edit must not hide inside the
        // version this write makes (the ledger takes that version as holding the read values).
        let written = self.write_item(p, &f, p.etag.as_deref()).await;
        let outcome = match written {
            Ok(ItemWrite::Written(etag)) => return Ok(ControlFlow::Continue(etag)),
            // Changed since this record was read (a person's edit, or our own SyncKey write
            // before a restart): the newer version follows in the log and resumes the intent.
            Ok(ItemWrite::Changed) => PullOutcome::Done,
            // The person deleted the item meanwhile. A resumed intent means an earlier attempt
            // may have inserted the row before a crash: the deletion applies to it.
            Err(GraphError::NotFound { .. }) => {
                self.forget_new_item(p, sk, intent_key.to_vec(), resumed)
                    .await?
            }
            Err(e) if e.is_retryable() => return Err(e.into()),
            Err(e) => {
                let reason = format!("writing SyncKey: {e}");
                PullOutcome::dead(self.pull_dead(p, sk, "graph_rejected", reason))
            }
        };
        Ok(ControlFlow::Break(outcome))
    }

    /// A person-created item deleted before its row was recorded: `pull.on_delete` applies to
    /// the row `sk` when an earlier attempt may have inserted it (`row_may_exist`); then the
    /// intent and the row's ledger entry go.
    pub(super) async fn forget_new_item(
        &mut self,
        p: &PendingPull,
        sk: &str,
        intent_key: Vec<u8>,
        row_may_exist: bool,
    ) -> Result<PullOutcome, ProcessError> {
        if row_may_exist && let Some(d) = self.apply_on_delete(p.table, sk, p).await? {
            return Ok(PullOutcome::dead(d));
        }
        let row_key = ledger::key(&self.tables[p.table].table, sk);
        self.ledger
            .commit(vec![(intent_key, None), (row_key, None)])
            .await?;
        Ok(PullOutcome::Done)
    }

    /// Inserts the new row, writes the database's values back to the item, and records the
    /// row's ledger entry with the created marker (or, when the insert was rejected, drops the
    /// intent: it made no row, and a replay may try again with a new key).
    async fn insert_new_row(
        &mut self,
        p: &PendingPull,
        sk: &str,
        values: Vec<(String, Option<String>)>,
        projection: BTreeMap<String, Json>,
        etag: Option<String>,
        intent_key: Vec<u8>,
    ) -> Result<PullOutcome, ProcessError> {
        let ti = p.table;
        let key = key_values(&self.facts[ti].key_columns, sk);
        let insert = self.row_insert(ti, key, values.clone());
        let mut dead = None;
        let mut lsn = 0;
        match self.apply(insert).await? {
            Ok(a) => lsn = a.commit_lsn.unwrap_or(0),
            Err(ApplyError::Rejected { sqlstate, .. }) if sqlstate == "23505" => {} // inserted before a crash
            Err(e) => {
                let reason = rejected_reason(&e, &self.tables[ti].entry.fields, &values);
                dead = Some(self.pull_dead(p, sk, "pull_rejected", reason));
            }
        }
        let mut entry = Entry {
            item: Some(ItemRef {
                list_id: p.list_id.clone(),
                item_id: p.item_id.clone(),
            }),
            projection,
            etag,
            lsn,
            provenance: Provenance::Pull,
            pulled_at_ms: Some(chrono::Utc::now().timestamp_millis()),
            ..Entry::default()
        };
        if dead.is_none() && !self.write_back_row_values(ti, sk, &mut entry, p).await? {
            // The item changed meanwhile: its newer version resumes the intent (row kept).
            return Ok(PullOutcome::Done);
        }
        entry.hash = Some(hash_projection(&entry.projection));
        let marker = dead.is_none().then(|| created_marker(sk));
        if dead.is_none() {
            self.audit_pull(
                AuditOp::PullApply,
                p,
                sk,
                Some(&entry),
                Some(lsn),
                Some("a person created the item: the row was inserted".into()),
            );
        }
        let row_key = ledger::key(&self.tables[ti].table, sk);
        self.ledger
            .commit(vec![(row_key, Some(entry)), (intent_key, marker)])
            .await?;
        self.stats.pulled += 1;
        Ok(match dead {
            Some(d) => PullOutcome::dead(d),
            None => PullOutcome::Done,
        })
    }

    /// Writes the values the database filled in for a person-created item's new row (defaults,
    /// triggers) back to the item: the row's own capture event carries our origin and is not
    /// pushed. Conditional on `entry.etag` (the version whose content the ledger holds);
    /// `false` when the item changed meanwhile, so nothing may be recorded for this version.
    pub(super) async fn write_back_row_values(
        &mut self,
        ti: usize,
        sk: &str,
        entry: &mut Entry,
        p: &PendingPull,
    ) -> Result<bool, ProcessError> {
        let Some(source) = self.source_projection(ti, sk, entry).await? else {
            return Ok(true);
        };
        let diff = diff(&entry.projection, &source);
        if diff.is_empty() {
            return Ok(true);
        }
        match self.write_item(p, &diff, entry.etag.as_deref()).await {
            Ok(ItemWrite::Written(etag)) => {
                entry.etag = etag.or(entry.etag.take());
                entry.projection.extend(source);
                Ok(true)
            }
            Ok(ItemWrite::Changed) => Ok(false),
            Err(e) if e.is_retryable() => Err(e.into()),
            Err(e) => {
                warn!(table = %self.tables[ti].table, key = %sk, "writing database defaults back to the item: {e}");
                Ok(true)
            }
        }
    }
}
