//! The return path inside the processor (DESIGN §8): list changes from the delta pollers
//! (`<prefix>.<pipeline>.list-changes`, consumer group `<prefix>.<pipeline>.return`) are applied
//! to PostgreSQL by the same task that pushes, against the same ledger entry. That is the
//! partitioning answer to "a row's push and pull decisions see one consistent ledger entry":
//! one owner per pipeline, and within a flush the pulls are decided first, knowing which rows
//! also have a pending push (both sides changed → conflict policy).
//!
//! - **Echo suppression**: an item whose mapped fields (canonical form, see
//!   `convert::canonical_from_item`) equal the ledger's projection is our own write: dropped.
//! - **Conflicts**: a field changed in the list *and* in a pending push of the row is decided by
//!   its policy (`source_wins`, `target_wins`, `last_writer_wins` by commit time vs
//!   `lastModifiedDateTime`; `manual` parks the row: neither side is written). Every conflict is
//!   recorded in `<prefix>.<pipeline>.conflicts` with both values and the decision. A push whose
//!   conditional PATCH meets 412 (the item changed since our last write) refetches the item and
//!   becomes such a conflict on the next flush.
//! - **Person-created items** (no `SyncKey`): a key is pre-allocated from the key columns'
//!   defaults, recorded as an intent, written to the item as `SyncKey`, then the row is inserted
//!   (a replay finds the intent, and a second insert meets the primary key: idempotent).
//! - **Deletes** follow `pull.on_delete` (delete the row, soft-delete, or ignore).
//!
//! Applies use the applier's replication-origin session, so capture marks the resulting events
//! and the push side skips them; the ledger is updated to the pulled values as well, so even
//! without the origin check the event would be recognised as in sync.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value as Json};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Applier, ApplyError, ChangeKind, ListChange, RowChange, RowChangeKind};
use crate::config::{ConflictPolicy, OnDelete, TableName};
use crate::config::{Direction, FieldMapping, FieldType, SYNC_KEY_FIELD, SYSTEM_FIELDS};
use crate::graph::GraphError;
use crate::graph::ops::USER_INFORMATION_LIST;
use crate::log::{ConsumedRecord, EventLog, Record};
use crate::process::convert::{self, Unmappable};
use crate::process::dlq::{DeadLetter, SourcePosition};
use crate::process::ledger::{self, Entry, ItemRef, Provenance};
use crate::process::processor::*;
use crate::process::row::{Cell, Row};
use crate::process::{ProcessError, sync_key};
use crate::telemetry::metrics as m;

/// A list change waiting for the next flush (the latest per item).
#[derive(Debug, Clone)]
pub(crate) struct PendingPull {
    pub table: usize,
    pub list_id: String,
    pub item_id: String,
    /// `None`: deleted in the list.
    pub fields: Option<Map<String, Json>>,
    pub etag: Option<String>,
    pub last_modified_ms: Option<i64>,
    /// Offset of the first change merged in (the changes topic has one partition).
    pub offset: i64,
    pub topic: String,
    /// Since when this change waits for a PostgreSQL change of the row to reach the processor.
    pub deferred_since: Option<Instant>,
}

/// How long a list edit waits when the row also changed in PostgreSQL but that change has not
/// reached the processor yet (so the conflict is decided with both sides and their times):
/// capture delivers a commit well within this, even under load.
const MAX_PULL_DEFER: std::time::Duration = std::time::Duration::from_secs(3);

/// One field both sides changed, as recorded in the conflicts topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldConflict {
    pub field: String,
    pub column: String,
    pub source: Json,
    pub target: Json,
    pub policy: ConflictPolicy,
    /// `source`, `target`, or `parked`.
    pub winner: String,
}

/// A conflict record (value of `<prefix>.<pipeline>.conflicts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: String,
    pub pipeline: String,
    pub table: String,
    pub key: String,
    pub list_id: String,
    pub item_id: String,
    pub fields: Vec<FieldConflict>,
    /// `resolved` (every field decided by its policy) or `parked` (manual).
    pub decision: String,
    pub source_commit_ts_ms: i64,
    pub target_modified_ms: Option<i64>,
    pub at_ms: i64,
}

/// `<prefix>.<pipeline>.conflicts`.
pub fn conflicts_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.conflicts")
}

fn parse_ms(s: Option<&str>) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s?)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The key column values a SyncKey stands for (see [`sync_key`]).
pub(crate) fn key_values(columns: &[String], sk: &str) -> Vec<(String, Option<String>)> {
    if columns.len() == 1 {
        return vec![(columns[0].clone(), Some(sk.to_string()))];
    }
    let parts: Vec<Option<String>> = serde_json::from_str(sk).unwrap_or_default();
    columns.iter().cloned().zip(parts).collect()
}

/// A deterministic conflict id: table, key, item, list version and the decided fields.
fn conflict_id(
    table: &str,
    key: &str,
    item: &str,
    etag: Option<&str>,
    fields: &[FieldConflict],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [table, key, item, etag.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(serde_json::to_vec(fields).unwrap_or_default());
    hex::encode(&h.finalize()[..16])
}

/// `(item GUID, version)` of a list item eTag (`"{guid},{n}"`, quoted or not, braced or not;
/// graph-api.md §5.8): the version rises with every write to the item.
fn etag_version(etag: &str) -> Option<(String, u64)> {
    let t = etag.trim().trim_start_matches("W/").trim_matches('"');
    let (guid, n) = t.rsplit_once(',')?;
    let guid = guid.trim().trim_matches(['{', '}']).to_ascii_lowercase();
    (!guid.is_empty()).then_some(())?;
    Some((guid, n.trim().parse().ok()?))
}

/// True when the list version `incoming` is one the ledger already holds or has passed (same
/// item, version not above the ledger's). Every write that sets the ledger's eTag either is
/// conditional on the version the ledger knew or rewrites every mapped field, so the ledger's
/// projection holds that version's content: an older or equal list record is a replay (a list
/// change read again after a restart) or the echo of our own write, never news.
fn is_stale(incoming: Option<&str>, known: Option<&str>) -> bool {
    match (
        incoming.and_then(etag_version),
        known.and_then(etag_version),
    ) {
        (Some((g1, v1)), Some((g2, v2))) => g1 == g2 && v1 <= v2,
        _ => false,
    }
}

/// Ledger key of a person-created item's intent (and, once its row exists, its marker).
fn new_item_key(table: &str, p: &PendingPull) -> Vec<u8> {
    ledger::key(table, &format!("\u{1}new:{}/{}", p.list_id, p.item_id))
}

/// The intent entry of a person-created item whose row `sk` was inserted.
fn created_marker(sk: &str) -> Entry {
    Entry {
        new_row_key: Some(sk.to_string()),
        row_created: true,
        ..Entry::default()
    }
}

/// A `to_json` value as a cell (what `convert` accepts for every field type).
fn cell_from_json(v: &Json) -> Cell {
    match v {
        Json::Null => Cell::Null,
        Json::Bool(b) => Cell::Bool(*b),
        Json::Number(n) => n
            .as_i64()
            .map_or_else(|| Cell::Decimal(n.to_string()), Cell::Int),
        Json::String(s) => Cell::Text(s.clone()),
        Json::Array(a) => Cell::Array(a.iter().map(cell_from_json).collect()),
        Json::Object(_) => Cell::Text(v.to_string()),
    }
}

/// A pulled column value back as a cell, so a pending push can carry the target's value.
fn cell_from_text(m: &FieldMapping, text: Option<&str>) -> Cell {
    match text {
        None => Cell::Null,
        Some(t) if m.field_type == FieldType::MultiChoice => {
            let inner = t.trim_start_matches('{').trim_end_matches('}');
            Cell::Array(
                inner
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Cell::Text(s.trim_matches('"').replace("\\\"", "\"")))
                    .collect(),
            )
        }
        Some(t) => Cell::Text(t.to_string()),
    }
}

enum PullOutcome {
    Done,
    Dead(Box<DeadLetter>),
    /// Try again next flush.
    Defer,
}

impl<L: EventLog + 'static> Processor<L> {
    /// Reads one list-change record into the pending pulls.
    pub(crate) async fn ingest_pull(&mut self, rec: ConsumedRecord) -> Result<(), ProcessError> {
        let tp = (rec.topic.clone(), rec.partition);
        self.pull_consumed.insert(tp, rec.offset + 1);
        let Some(v) = rec.record.value.as_deref() else {
            return Ok(());
        };
        let change: ListChange = match serde_json::from_slice(v) {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    offset = rec.offset,
                    "ignoring an unreadable list-change record: {e}"
                );
                return Ok(());
            }
        };
        let Some(&ti) = self.list_table.get(&change.list_id) else {
            return Ok(());
        };
        match change.kind {
            ChangeKind::ResyncBegin => {
                let id = change.resync_id.clone().unwrap_or_default();
                self.resync_seen
                    .insert(change.list_id.clone(), (id, HashSet::new()));
            }
            ChangeKind::ResyncEnd => {
                let Some((id, seen)) = self.resync_seen.remove(&change.list_id) else {
                    return Ok(());
                };
                if change.resync_id.as_deref() != Some(id.as_str()) {
                    return Ok(());
                }
                // Items the ledger knows in this list that the full read did not return were
                // deleted while no delta token covered them.
                let table = self.tables[ti].table.clone();
                for (_, e) in self.ledger.scan_table(&table)? {
                    if let Some(item) = e.item
                        && item.list_id == change.list_id
                        && !seen.contains(&item.item_id)
                    {
                        self.put_pull(ti, &change.list_id, &item.item_id, None, None, None, &rec);
                    }
                }
            }
            ChangeKind::Upsert | ChangeKind::Deleted => {
                let Some(item_id) = change.item_id.clone() else {
                    return Ok(());
                };
                if change.resync
                    && let Some((id, seen)) = self.resync_seen.get_mut(&change.list_id)
                    && change.resync_id.as_deref() == Some(id.as_str())
                {
                    seen.insert(item_id.clone());
                }
                let fields = if change.kind == ChangeKind::Deleted {
                    None
                } else {
                    change.fields.clone()
                };
                let modified = parse_ms(change.last_modified.as_deref());
                self.put_pull(
                    ti,
                    &change.list_id,
                    &item_id,
                    fields,
                    change.etag.clone(),
                    modified,
                    &rec,
                );
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn put_pull(
        &mut self,
        table: usize,
        list_id: &str,
        item_id: &str,
        fields: Option<Map<String, Json>>,
        etag: Option<String>,
        last_modified_ms: Option<i64>,
        rec: &ConsumedRecord,
    ) {
        let key = format!("{list_id}/{item_id}");
        let offset = self
            .pulls
            .get(&key)
            .map_or(rec.offset, |p| p.offset.min(rec.offset));
        self.pulls.insert(
            key,
            PendingPull {
                table,
                list_id: list_id.to_string(),
                item_id: item_id.to_string(),
                fields,
                etag,
                last_modified_ms,
                offset,
                topic: rec.topic.clone(),
                deferred_since: None,
            },
        );
    }

    /// The row's pending push, unless it is older than the ledger (a replayed event the flush
    /// skips as stale): such a push is no source-side change to weigh against a list change.
    fn live_pending(&self, lkey: &[u8], entry: &Entry) -> Option<Pending> {
        self.pending
            .get(lkey)
            .filter(|p| p.lsn == 0 || p.lsn >= entry.lsn)
            .cloned()
    }

    /// The fields the return path reads for a table: bidirectional and pull_only ones.
    fn pull_fields(&self, ti: usize) -> Vec<FieldMapping> {
        self.tables[ti]
            .entry
            .fields
            .iter()
            .filter(|f| f.direction != Direction::PushOnly)
            .cloned()
            .collect()
    }

    /// The ledger key of the row an item belongs to (by SyncKey, else by a ledger scan).
    fn row_of_item(
        &self,
        ti: usize,
        p: &PendingPull,
    ) -> Result<Option<(Vec<u8>, String)>, ProcessError> {
        let table = &self.tables[ti].table;
        if let Some(sk) = p
            .fields
            .as_ref()
            .and_then(|f| f.get(SYNC_KEY_FIELD))
            .and_then(Json::as_str)
            && !sk.is_empty()
        {
            return Ok(Some((ledger::key(table, sk), sk.to_string())));
        }
        for (k, e) in self.ledger.scan_table(table)? {
            if e.item
                .as_ref()
                .is_some_and(|i| i.list_id == p.list_id && i.item_id == p.item_id)
            {
                let sk = ledger::split_key(&k).map(|(_, s)| s).unwrap_or_default();
                return Ok(Some((k, sk)));
            }
        }
        Ok(None)
    }

    /// Applies the pending list changes (before the pushes of the same flush).
    pub(crate) async fn flush_pulls(&mut self) -> Result<(), ProcessError> {
        if self.pulls.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = self.pulls.keys().cloned().collect();
        let mut transient: Option<String> = None;
        let mut dead = Vec::new();
        for k in keys {
            let Some(p) = self.pulls.get(&k).cloned() else {
                continue;
            };
            let result = match &p.fields {
                None => self.pull_delete(&p).await,
                Some(fields) => {
                    let has_key = fields
                        .get(SYNC_KEY_FIELD)
                        .and_then(Json::as_str)
                        .is_some_and(|s| !s.is_empty());
                    if has_key {
                        self.pull_upsert(&p).await
                    } else {
                        self.pull_new_item(&p).await
                    }
                }
            };
            match result {
                Ok(PullOutcome::Done) => {
                    self.pulls.remove(&k);
                }
                Ok(PullOutcome::Dead(d)) => {
                    dead.push(*d);
                    self.pulls.remove(&k);
                }
                Ok(PullOutcome::Defer) => {
                    if let Some(p) = self.pulls.get_mut(&k) {
                        p.deferred_since.get_or_insert_with(Instant::now);
                    }
                }
                Err(e) if e.is_retryable() => {
                    transient.get_or_insert(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        self.append_dead(dead).await?;
        match transient {
            None => Ok(()),
            Some(message) => Err(ProcessError::Graph(GraphError::Transient {
                status: None,
                message,
                request_id: None,
            })),
        }
    }

    fn pull_dead(&self, p: &PendingPull, key: &str, kind: &str, reason: String) -> DeadLetter {
        DeadLetter {
            pipeline: self.cfg.pipeline.name.clone(),
            table: self.tables[p.table].table.clone(),
            key: key.to_string(),
            kind: kind.to_string(),
            reason,
            list: Some(p.list_id.clone()),
            request_id: None,
            client_request_id: None,
            source: Some(SourcePosition {
                topic: p.topic.clone(),
                partition: 0,
                offset: p.offset,
            }),
            event_key_b64: None,
            event_value_b64: None,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    fn applier(&mut self) -> Result<&mut Applier, ProcessError> {
        self.applier
            .as_mut()
            .ok_or_else(|| ProcessError::Config("the return path has no PostgreSQL applier".into()))
    }

    /// Applies one row change; connection failures are retryable errors of the flush (the
    /// applier reconnects on the next call), data rejections are returned for the DLQ.
    pub(crate) async fn apply(
        &mut self,
        change: RowChange,
    ) -> Result<Result<crate::pull::Applied, ApplyError>, ProcessError> {
        match self.applier()?.apply(&change).await {
            Err(e) if e.is_retryable() => Err(ProcessError::Catalog(e.to_string())),
            // Not the row's fault: stop rather than dead-letter every change.
            Err(ApplyError::Config(m)) => Err(ProcessError::Config(m)),
            other => Ok(other),
        }
    }

    pub(crate) fn table_name(&self, ti: usize) -> TableName {
        self.tables[ti].entry.table.clone()
    }

    /// Column text of a pulled field (persons → email, lookups → foreign key).
    pub(crate) async fn pulled_text(
        &mut self,
        f: &FieldMapping,
        canon: &[(String, Json)],
    ) -> Result<Result<Option<String>, Unmappable>, ProcessError> {
        let id = canon
            .iter()
            .find(|(k, _)| k.ends_with("LookupId"))
            .and_then(|(_, v)| v.as_u64());
        let resolved = match (f.field_type, id) {
            (FieldType::Person, Some(id)) => self.email(id).await?,
            (FieldType::Lookup, Some(id)) => self.lookup_key(f, &id.to_string())?,
            _ => None,
        };
        Ok(convert::column_text(canon, f, resolved))
    }

    async fn email(&mut self, id: u64) -> Result<Option<String>, ProcessError> {
        if let Some(e) = self.emails.get(&id) {
            return Ok(e.clone());
        }
        let item = self
            .client
            .get_item(
                &self.targets.site_id,
                USER_INFORMATION_LIST,
                &id.to_string(),
            )
            .await?;
        let email = item.and_then(|i| {
            i.fields
                .get("EMail")
                .and_then(Json::as_str)
                .map(str::to_owned)
        });
        self.emails.insert(id, email.clone());
        Ok(email)
    }

    /// The foreign key (the referenced row's SyncKey) of a lookup item id.
    fn lookup_key(&self, f: &FieldMapping, item_id: &str) -> Result<Option<String>, ProcessError> {
        let list = f.lookup_list.as_deref().unwrap_or_default();
        let Some(list_id) = self.targets.list_id(list) else {
            return Ok(None);
        };
        let Some(target) = self
            .tables
            .iter()
            .find(|t| t.entry.lists().any(|l| l == list))
        else {
            return Ok(None);
        };
        for (k, e) in self.ledger.scan_table(&target.table)? {
            if e.item
                .as_ref()
                .is_some_and(|i| i.list_id == list_id && i.item_id == item_id)
            {
                return Ok(ledger::split_key(&k).map(|(_, sk)| sk));
            }
        }
        Ok(None)
    }

    async fn pull_upsert(&mut self, p: &PendingPull) -> Result<PullOutcome, ProcessError> {
        let ti = p.table;
        let fields = p.fields.clone().unwrap_or_default();
        let Some((lkey, sk)) = self.row_of_item(ti, p)? else {
            return Ok(PullOutcome::Done);
        };
        let known = self.ledger.get(&lkey)?;
        // A person-created item whose row was being made when the process stopped (its SyncKey
        // is written, its ledger entry not yet): the row came from this item, so its values are
        // taken as they are, not checked for a conflict.
        let resumed_key = new_item_key(&self.tables[ti].table, p);
        let resumed_new = known.is_none()
            && self
                .ledger
                .get(&resumed_key)?
                .is_some_and(|e| !e.row_created);
        if known.is_none() && !resumed_new {
            // An item with a SyncKey this pipeline has no record of (a list from an earlier
            // installation, a lost state directory without its changelog): there is no last
            // sync to compare with, so it is not a conflict. The database is the system of
            // record: the push side adopts the item by its SyncKey and writes the row's values.
            debug!(table = %self.tables[ti].table, key = %sk, "list change of an item without a ledger entry: left to the push side");
            return Ok(PullOutcome::Done);
        }
        if let Some(k) = &known
            && is_stale(p.etag.as_deref(), k.etag.as_deref())
        {
            self.stats.echoes += 1;
            metrics::counter!(m::PULL_ECHOES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
                .increment(1);
            return Ok(PullOutcome::Done);
        }
        let mut entry = known.unwrap_or_default();
        let policy_default = self.tables[ti].entry.conflict;
        // Changed fields: canonical pulled value differs from the ledger's.
        let mut changed: Vec<(FieldMapping, Vec<(String, Json)>)> = Vec::new();
        let mut system_changed = Vec::new();
        for f in self.pull_fields(ti) {
            let canon = convert::canonical_from_item(&fields, &f);
            let same = canon
                .iter()
                .all(|(k, v)| entry.projection.get(k).unwrap_or(&Json::Null) == v);
            if !same {
                if SYSTEM_FIELDS.contains(&f.field.as_str()) {
                    system_changed.push((f, canon));
                } else {
                    changed.push((f, canon));
                }
            }
        }
        if entry.item.is_none() {
            entry.item = Some(ItemRef {
                list_id: p.list_id.clone(),
                item_id: p.item_id.clone(),
            });
        }
        if changed.is_empty() {
            // Our own write coming back (or a change to unmapped columns only).
            self.stats.echoes += 1;
            metrics::counter!(m::PULL_ECHOES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
                .increment(1);
            if p.etag.is_some() && entry.etag != p.etag {
                entry.etag = p.etag.clone();
                self.ledger.commit(vec![(lkey, Some(entry))]).await?;
            }
            return Ok(PullOutcome::Done);
        }
        // Conflict with a pending push of the same row?
        let mut apply: Vec<(FieldMapping, Vec<(String, Json)>)> = Vec::new();
        let mut conflicts = Vec::new();
        let pending = self.live_pending(&lkey, &entry);
        if let Some(Pending {
            desired: Desired::Delete,
            ..
        }) = &pending
        {
            // Deleted in PostgreSQL while edited in the list: the delete is pushed next.
            return Ok(PullOutcome::Done);
        }
        // The source side: the pending push, else the row as it is now in PostgreSQL (its change
        // may not have reached the processor yet).
        let (push_proj, from_pending) = match &pending {
            Some(Pending {
                desired: Desired::Upsert(row),
                ..
            }) => (self.project(ti, row, &entry).await.ok(), true),
            _ if resumed_new => (None, false),
            _ => (self.source_projection(ti, &sk, &entry).await?, false),
        };
        let mut parked = false;
        let mut converged: Vec<(String, Json)> = Vec::new();
        let mut lost_targets: Vec<(String, Json)> = Vec::new();
        // Source values that won without a pending push (its event was lost to a crash or is
        // older than the ledger): written to the item here, or nobody would.
        let mut source_fields = Map::new();
        let mut target_cells: Vec<(String, Cell)> = Vec::new();
        for (f, canon) in changed {
            let source_changed = push_proj.as_ref().is_some_and(|pp| {
                canon.iter().any(|(k, _)| {
                    pp.get(k).unwrap_or(&Json::Null)
                        != entry.projection.get(k).unwrap_or(&Json::Null)
                })
            });
            if !source_changed || f.direction == Direction::PullOnly {
                apply.push((f, canon));
                continue;
            }
            if push_proj.as_ref().is_some_and(|pp| {
                canon
                    .iter()
                    .all(|(k, v)| pp.get(k).unwrap_or(&Json::Null) == v)
            }) {
                // Both sides hold the same value (typically our own write whose ledger record a
                // crash cut off): in sync, nothing to decide or write.
                converged.extend(canon);
                continue;
            }
            if !from_pending
                && p.deferred_since
                    .is_none_or(|t| t.elapsed() < MAX_PULL_DEFER)
            {
                return Ok(PullOutcome::Defer);
            }
            let policy = f.conflict.unwrap_or(policy_default);
            let source_ts = pending
                .as_ref()
                .map_or_else(|| chrono::Utc::now().timestamp_millis(), |p| p.commit_ts_ms);
            let winner = match policy {
                ConflictPolicy::SourceWins => "source",
                ConflictPolicy::TargetWins => "target",
                ConflictPolicy::LastWriterWins => {
                    if p.last_modified_ms.is_some_and(|t| t > source_ts) {
                        "target"
                    } else {
                        "source"
                    }
                }
                ConflictPolicy::Manual => "parked",
            };
            let pp = push_proj.as_ref().expect("source changed");
            let value = |m: &BTreeMap<String, Json>| {
                canon
                    .iter()
                    .find(|(k, _)| !k.ends_with("@odata.type"))
                    .and_then(|(k, _)| m.get(k).cloned())
                    .unwrap_or(Json::Null)
            };
            let target_value = canon
                .iter()
                .find(|(k, _)| !k.ends_with("@odata.type"))
                .map(|(_, v)| v.clone())
                .unwrap_or(Json::Null);
            conflicts.push(FieldConflict {
                field: f.field.clone(),
                column: f.column.clone(),
                source: value(pp),
                target: target_value,
                policy,
                winner: winner.to_string(),
            });
            match winner {
                "target" => apply.push((f, canon)),
                "parked" => parked = true,
                _ if !from_pending => {
                    for (k, _) in &canon {
                        source_fields.insert(k.clone(), pp.get(k).cloned().unwrap_or(Json::Null));
                    }
                }
                // The pending push writes the winner. Until then the item holds the losing
                // value at this version: the ledger records it as read, so the push diffs
                // against it and a later list version still carrying it is no new change.
                _ => lost_targets.extend(canon),
            }
        }
        let had_conflicts = !conflicts.is_empty();
        // The same decision replayed after a crash (same row, list version and values) is
        // recorded once: the id is derived from them and remembered in the ledger.
        let conflict_id = conflict_id(
            &self.tables[ti].table,
            &sk,
            &p.item_id,
            p.etag.as_deref(),
            &conflicts,
        );
        if had_conflicts && entry.last_conflict.as_deref() != Some(conflict_id.as_str()) {
            entry.last_conflict = Some(conflict_id.clone());
            let record = ConflictRecord {
                id: conflict_id,
                pipeline: self.cfg.pipeline.name.clone(),
                table: self.tables[ti].table.clone(),
                key: sk.clone(),
                list_id: p.list_id.clone(),
                item_id: p.item_id.clone(),
                fields: conflicts,
                decision: if parked { "parked" } else { "resolved" }.into(),
                source_commit_ts_ms: pending.as_ref().map_or(0, |p| p.commit_ts_ms),
                target_modified_ms: p.last_modified_ms,
                at_ms: chrono::Utc::now().timestamp_millis(),
            };
            self.record_conflict(&record).await?;
            // Remembered at once (before any write to the item), so a crash from here on
            // replays the decision without recording it again.
            self.ledger
                .commit(vec![(lkey.clone(), Some(entry.clone()))])
                .await?;
        }
        if parked {
            // Neither side is written until an operator decides.
            self.pending.remove(&lkey);
            return Ok(PullOutcome::Done);
        }
        if !converged.is_empty() {
            entry.projection.extend(converged);
            entry.hash = Some(hash_projection(&entry.projection));
            if !had_conflicts && apply.is_empty() {
                entry.etag = p.etag.clone().or(entry.etag);
                self.ledger
                    .commit(vec![(lkey.clone(), Some(entry.clone()))])
                    .await?;
            }
        }
        if had_conflicts {
            // The list's version is now known and decided on: the push's conditional PATCH must
            // not meet 412 for it again.
            entry.etag = p.etag.clone().or(entry.etag);
            if !lost_targets.is_empty() {
                entry.projection.extend(lost_targets);
                entry.hash = Some(hash_projection(&entry.projection));
            }
            if !source_fields.is_empty() {
                match self
                    .client
                    .update_item_fields(
                        &self.targets.site_id,
                        &p.list_id,
                        &p.item_id,
                        &source_fields,
                        p.etag.as_deref(),
                    )
                    .await
                {
                    Ok(u) => {
                        entry.etag = u.e_tag.or(entry.etag);
                        entry.projection.extend(source_fields.clone());
                        entry.hash = Some(hash_projection(&entry.projection));
                    }
                    // A newer list version exists: it arrives as its own change and is decided then.
                    Err(GraphError::PreconditionFailed { .. }) => {
                        self.ledger
                            .commit(vec![(lkey.clone(), Some(entry.clone()))])
                            .await?;
                        return Ok(PullOutcome::Done);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            self.ledger
                .commit(vec![(lkey.clone(), Some(entry.clone()))])
                .await?;
        }
        // A pending push of the row must carry every value taken from the list (edits the source
        // did not touch, and conflicts the target won), or it would write the old ones back.
        if pending.is_some() {
            for (f, canon) in &apply {
                let text = self.pulled_text(f, canon).await?.ok().flatten();
                target_cells.push((f.column.clone(), cell_from_text(f, text.as_deref())));
            }
            if let Some(Pending {
                desired: Desired::Upsert(row),
                ..
            }) = self.pending.get_mut(&lkey)
            {
                for (col, cell) in target_cells.drain(..) {
                    row.insert(col, cell);
                }
            }
        }
        if apply.is_empty() {
            return Ok(PullOutcome::Done);
        }
        apply.extend(system_changed);
        let mut set = Vec::new();
        for (f, canon) in &apply {
            match self.pulled_text(f, canon).await? {
                Ok(text) => set.push((f.column.clone(), text)),
                Err(u) => {
                    return Ok(PullOutcome::Dead(Box::new(self.pull_dead(
                        p,
                        &sk,
                        u.kind,
                        u.to_string(),
                    ))));
                }
            }
        }
        let facts = &self.facts[ti];
        let key = key_values(&facts.key_columns, &sk);
        let change = RowChange {
            table: self.table_name(ti),
            key: key.clone(),
            kind: RowChangeKind::Update { set: set.clone() },
        };
        let applied = match self.apply(change).await? {
            Ok(a) if a.rows == 0 && !resumed_new => {
                // No such row: deleted in PostgreSQL (its delete is pushed next, or was while we
                // were down), or an item with a SyncKey this pipeline never wrote. Never
                // resurrect a row from an item: the list edit is dropped, with a warning.
                warn!(table = %self.tables[ti].table, key = %sk, item = %p.item_id,
                    "list edit of an item whose row does not exist; not applied");
                return Ok(PullOutcome::Done);
            }
            Ok(a) if a.rows == 0 => {
                // A person-created item whose row's insert did not happen before a crash.
                // The applier inserts the key columns from `key`; `values` are the others.
                // Empty list fields are left out so the columns' defaults apply.
                let values: Vec<_> = set
                    .into_iter()
                    .filter(|(c, v)| v.is_some() && !key.iter().any(|(k, _)| k == c))
                    .collect();
                let insert = RowChange {
                    table: self.table_name(ti),
                    key: key.clone(),
                    kind: RowChangeKind::Insert { values },
                };
                match self.apply(insert).await? {
                    Ok(a) => a,
                    Err(e) => {
                        return Ok(PullOutcome::Dead(Box::new(self.pull_dead(
                            p,
                            &sk,
                            "pull_rejected",
                            e.to_string(),
                        ))));
                    }
                }
            }
            Ok(a) => a,
            Err(e) => {
                return Ok(PullOutcome::Dead(Box::new(self.pull_dead(
                    p,
                    &sk,
                    "pull_rejected",
                    e.to_string(),
                ))));
            }
        };
        self.stats.pulled += 1;
        for (_, canon) in apply {
            for (k, v) in canon {
                entry.projection.insert(k, v);
            }
        }
        entry.hash = Some(hash_projection(&entry.projection));
        entry.etag = p.etag.clone().or(entry.etag);
        entry.provenance = Provenance::Pull;
        entry.pulled_at_ms = Some(chrono::Utc::now().timestamp_millis());
        if let Some(lsn) = applied.commit_lsn {
            entry.lsn = entry.lsn.max(lsn);
        }
        // The pending push now includes the pulled values: it is as new as this apply, not a
        // stale event to skip.
        if let Some(pp) = self.pending.get_mut(&lkey) {
            pp.lsn = pp.lsn.max(entry.lsn);
        }
        if resumed_new && !self.write_back_row_values(ti, &sk, &mut entry, p).await? {
            // Changed again meanwhile: the newer version resumes (the intent stays).
            return Ok(PullOutcome::Done);
        }
        entry.hash = Some(hash_projection(&entry.projection));
        let mut changes = vec![(lkey, Some(entry))];
        if resumed_new {
            changes.push((resumed_key, Some(created_marker(&sk))));
        }
        self.ledger.commit(changes).await?;
        debug!(table = %self.tables[ti].table, key = %sk, "applied a list edit");
        Ok(PullOutcome::Done)
    }

    /// The row's mapped projection as it is now in PostgreSQL (`None`: no such row, or a value
    /// that cannot be read back; then no source-side change is assumed).
    pub(crate) async fn source_projection(
        &mut self,
        ti: usize,
        sk: &str,
        entry: &Entry,
    ) -> Result<Option<BTreeMap<String, Json>>, ProcessError> {
        let facts = self.facts[ti].clone();
        let fields = self.tables[ti].push_fields.clone();
        if fields.is_empty() || facts.key_columns.is_empty() {
            return Ok(None);
        }
        let q = crate::pull::quote_ident;
        let exprs: Vec<String> = fields
            .iter()
            .map(|f| {
                let c = q(&f.column);
                match facts.column_types.get(&f.column).map(String::as_str) {
                    Some("json" | "jsonb") => format!("to_json({c}::text)"),
                    Some(t) if t.starts_with("timestamp") && !t.contains("with time zone") => {
                        format!("to_json(to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))")
                    }
                    _ => format!("to_json({c})"),
                }
            })
            .collect();
        let keys = key_values(&facts.key_columns, sk);
        let conds: Vec<String> = facts
            .key_columns
            .iter()
            .zip(&facts.key_types)
            .enumerate()
            .map(|(i, (c, t))| format!("{} = ${}::text::{t}", q(c), i + 1))
            .collect();
        let t = &self.tables[ti].entry.table;
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE {}",
            exprs
                .iter()
                .map(|e| format!("({e})::text"))
                .collect::<Vec<_>>()
                .join(", "),
            q(&t.schema),
            q(&t.name),
            conds.join(" AND ")
        );
        let params: Vec<Option<String>> = keys.into_iter().map(|(_, v)| v).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let client = self.catalog().await?;
        let row = client
            .query_opt(&sql, &refs)
            .await
            .map_err(|e| ProcessError::Catalog(format!("reading the row back: {e}")))?;
        let Some(row) = row else { return Ok(None) };
        let mut cells = Row::new();
        for (i, f) in fields.iter().enumerate() {
            let v: Option<String> = row.get(i);
            let v = v
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Json::Null);
            cells.insert(f.column.clone(), cell_from_json(&v));
        }
        Ok(self.project(ti, &cells, entry).await.ok())
    }

    async fn record_conflict(&mut self, r: &ConflictRecord) -> Result<(), ProcessError> {
        for f in &r.fields {
            metrics::counter!(m::PULL_CONFLICTS_TOTAL, "pipeline" => r.pipeline.clone(), "policy" => f.policy.as_str(), "outcome" => f.winner.clone())
                .increment(1);
        }
        self.stats.conflicts += 1;
        warn!(table = %r.table, key = %r.key, decision = %r.decision, fields = r.fields.len(), "conflict: both sides changed");
        let value = serde_json::to_vec(r).unwrap_or_default();
        self.log
            .append(
                &self.conflicts_topic,
                vec![Record::new(
                    format!("{}\u{0}{}", r.table, r.key).into_bytes(),
                    value,
                )],
            )
            .await?;
        Ok(())
    }

    async fn pull_new_item(&mut self, p: &PendingPull) -> Result<PullOutcome, ProcessError> {
        let ti = p.table;
        let table = self.tables[ti].table.clone();
        let fields = p.fields.clone().unwrap_or_default();
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
        let pull_fields = self.pull_fields(ti);
        // Column values from the item.
        let mut values = Vec::new();
        let mut projection = BTreeMap::new();
        for f in &pull_fields {
            let canon = convert::canonical_from_item(&fields, f);
            match self.pulled_text(f, &canon).await? {
                Ok(text) => values.push((f.column.clone(), text)),
                Err(u) => {
                    return Ok(PullOutcome::Dead(Box::new(self.pull_dead(
                        p,
                        "?",
                        u.kind,
                        u.to_string(),
                    ))));
                }
            }
            projection.extend(canon);
        }
        let facts = self.facts[ti].clone();
        let sk = match intent.as_ref().and_then(|e| e.new_row_key.clone()) {
            Some(sk) => sk,
            None => {
                // Pre-allocate the key: a mapped value, else the column's default.
                let mut parts = Vec::new();
                for (col, default) in facts.key_columns.iter().zip(&facts.key_defaults) {
                    if let Some((_, Some(v))) = values.iter().find(|(c, _)| c == col) {
                        parts.push(Cell::Text(v.clone()));
                        continue;
                    }
                    let Some(expr) = default else {
                        return Ok(PullOutcome::Dead(Box::new(self.pull_dead(p, "?", "no_key",
                            format!("key column {col} has no default and is not mapped from a list field; cannot create a row for a person-created item")))));
                    };
                    let v = self.eval_default(expr).await?;
                    parts.push(Cell::Text(v));
                }
                let named: Vec<(String, Cell)> =
                    facts.key_columns.iter().cloned().zip(parts).collect();
                let sk = sync_key(&named);
                let e = Entry {
                    new_row_key: Some(sk.clone()),
                    ..Entry::default()
                };
                self.ledger
                    .commit(vec![(intent_key.clone(), Some(e))])
                    .await?;
                sk
            }
        };
        // The item carries the key before the row exists: a crash after this is resumed by the
        // intent, and the delta of this very write is recognised as an echo afterwards.
        let mut f = Map::new();
        f.insert(SYNC_KEY_FIELD.into(), Json::String(sk.clone()));
        // Conditional on the version read: a person's later edit must not hide inside the
        // version this write makes (the ledger takes that version as holding the read values).
        let etag = match self
            .client
            .update_item_fields(
                &self.targets.site_id,
                &p.list_id,
                &p.item_id,
                &f,
                p.etag.as_deref(),
            )
            .await
        {
            Ok(u) => u.e_tag,
            Err(GraphError::PreconditionFailed { .. }) => {
                // Changed since this record was read (a person's edit, or our own SyncKey write
                // before a restart): the newer version follows in the log and resumes the intent.
                return Ok(PullOutcome::Done);
            }
            Err(GraphError::NotFound { .. }) => {
                // The person deleted the item meanwhile. A resumed intent means an earlier
                // attempt may have inserted the row before a crash: the deletion applies to it.
                if intent.is_some()
                    && let Some(d) = self.apply_on_delete(ti, &sk, p).await?
                {
                    return Ok(PullOutcome::Dead(Box::new(d)));
                }
                self.ledger
                    .commit(vec![(intent_key, None), (ledger::key(&table, &sk), None)])
                    .await?;
                return Ok(PullOutcome::Done);
            }
            Err(e) if e.is_retryable() => return Err(e.into()),
            Err(e) => {
                return Ok(PullOutcome::Dead(Box::new(self.pull_dead(
                    p,
                    &sk,
                    "graph_rejected",
                    format!("writing SyncKey: {e}"),
                ))));
            }
        };
        let key = key_values(&facts.key_columns, &sk);
        // SharePoint omits empty fields: leave them out so the columns' defaults apply.
        let row_values: Vec<_> = values
            .into_iter()
            .filter(|(c, v)| v.is_some() && !key.iter().any(|(k, _)| k == c))
            .collect();
        let insert = RowChange {
            table: self.table_name(ti),
            key: key.clone(),
            kind: RowChangeKind::Insert { values: row_values },
        };
        let mut dead = None;
        let mut lsn = 0;
        match self.apply(insert).await? {
            Ok(a) => lsn = a.commit_lsn.unwrap_or(0),
            Err(ApplyError::Rejected { sqlstate, .. }) if sqlstate == "23505" => {} // inserted before a crash
            Err(e) => dead = Some(self.pull_dead(p, &sk, "pull_rejected", e.to_string())),
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
        if dead.is_none() && !self.write_back_row_values(ti, &sk, &mut entry, p).await? {
            // The item changed meanwhile: its newer version resumes the intent (row kept).
            return Ok(PullOutcome::Done);
        }
        entry.hash = Some(hash_projection(&entry.projection));
        // A rejected insert made no row: the intent goes (a replay may try again with a new key).
        let marker = dead.is_none().then(|| created_marker(&sk));
        self.ledger
            .commit(vec![
                (ledger::key(&table, &sk), Some(entry)),
                (intent_key, marker),
            ])
            .await?;
        self.stats.pulled += 1;
        Ok(match dead {
            Some(d) => PullOutcome::Dead(Box::new(d)),
            None => PullOutcome::Done,
        })
    }

    /// Writes the values the database filled in for a person-created item's new row (defaults,
    /// triggers) back to the item: the row's own capture event carries our origin and is not
    /// pushed. Conditional on `entry.etag` (the version whose content the ledger holds);
    /// `false` when the item changed meanwhile, so nothing may be recorded for this version.
    async fn write_back_row_values(
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
        match self
            .client
            .update_item_fields(
                &self.targets.site_id,
                &p.list_id,
                &p.item_id,
                &diff,
                entry.etag.as_deref(),
            )
            .await
        {
            Ok(u) => {
                entry.etag = u.e_tag.or(entry.etag.take());
                entry.projection.extend(source);
                Ok(true)
            }
            Err(GraphError::PreconditionFailed { .. }) => Ok(false),
            Err(e) if e.is_retryable() => Err(e.into()),
            Err(e) => {
                warn!(table = %self.tables[ti].table, key = %sk, "writing database defaults back to the item: {e}");
                Ok(true)
            }
        }
    }

    /// Applies `pull.on_delete` to the row `sk` of table `ti` (an item deleted in the list);
    /// a database rejection comes back as the dead letter to write.
    async fn apply_on_delete(
        &mut self,
        ti: usize,
        sk: &str,
        p: &PendingPull,
    ) -> Result<Option<DeadLetter>, ProcessError> {
        let kind = match &self.tables[ti].entry.pull.on_delete {
            OnDelete::Delete => RowChangeKind::Delete,
            OnDelete::Soft { column } => RowChangeKind::SoftDelete {
                column: column.clone(),
            },
            OnDelete::Ignore => return Ok(None),
        };
        let key = key_values(&self.facts[ti].key_columns, sk);
        let change = RowChange {
            table: self.table_name(ti),
            key,
            kind,
        };
        Ok(match self.apply(change).await? {
            Ok(_) => None,
            Err(e) => Some(self.pull_dead(p, sk, "pull_rejected", e.to_string())),
        })
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

    pub(crate) async fn catalog(&mut self) -> Result<&tokio_postgres::Client, ProcessError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = crate::pg::connect(self.cfg.pipeline.source.url.expose()).await?;
            tokio::spawn(conn);
            self.catalog = Some(client);
        }
        Ok(self.catalog.as_ref().expect("connected"))
    }

    async fn pull_delete(&mut self, p: &PendingPull) -> Result<PullOutcome, ProcessError> {
        let ti = p.table;
        let Some((lkey, sk)) = self.row_of_item(ti, p)? else {
            // A person-created item whose row was being made when the process stopped: its
            // intent knows the key, and the row may already exist (the item's create and its
            // delete were coalesced on replay, so only the delete is seen here).
            let table = self.tables[ti].table.clone();
            let intent_key = new_item_key(&table, p);
            let intent = self.ledger.get(&intent_key)?;
            if let Some(e) = &intent
                && e.row_created
            {
                // Its row was made and now belongs to another item (a source win re-created
                // it) or is gone: this deletion no longer concerns the row.
                self.ledger.commit(vec![(intent_key, None)]).await?;
                return Ok(PullOutcome::Done);
            }
            if let Some(sk) = intent.and_then(|e| e.new_row_key) {
                if let Some(d) = self.apply_on_delete(ti, &sk, p).await? {
                    return Ok(PullOutcome::Dead(Box::new(d)));
                }
                self.ledger
                    .commit(vec![(intent_key, None), (ledger::key(&table, &sk), None)])
                    .await?;
                return Ok(PullOutcome::Done);
            }
            // Not ours (or our own delete coming back).
            self.stats.echoes += 1;
            return Ok(PullOutcome::Done);
        };
        let Some(mut entry) = self.ledger.get(&lkey)? else {
            return Ok(PullOutcome::Done);
        };
        // A pending push that changes the item re-creates it when the source wins (one that
        // only restates the ledger, such as our own return-path write, changes nothing).
        let mut changing = None;
        if let Some(pp) = self.live_pending(&lkey, &entry)
            && let Desired::Upsert(row) = &pp.desired
        {
            let proj = self.project(ti, row, &entry).await.ok();
            if proj.is_none_or(|proj| {
                proj.iter()
                    .any(|(k, v)| entry.projection.get(k).unwrap_or(&Json::Null) != v)
            }) {
                changing = Some(pp);
            }
        }
        if changing.is_none() {
            // A pending push that only restates the ledger (our own return-path write) or
            // deletes the row is superseded by this deletion: left pending, its flush would
            // create a new item for a row the deletion removes.
            self.pending.remove(&lkey);
        }
        if let Some(Pending { commit_ts_ms, .. }) = changing {
            let policy = self.tables[ti].entry.conflict;
            let source = match policy {
                ConflictPolicy::SourceWins => true,
                ConflictPolicy::LastWriterWins => {
                    p.last_modified_ms.is_none_or(|t| t <= commit_ts_ms)
                }
                _ => false,
            };
            let record = ConflictRecord {
                id: uuid::Uuid::new_v4().to_string(),
                pipeline: self.cfg.pipeline.name.clone(),
                table: self.tables[ti].table.clone(),
                key: sk.clone(),
                list_id: p.list_id.clone(),
                item_id: p.item_id.clone(),
                fields: vec![FieldConflict {
                    field: "(item)".into(),
                    column: "(row)".into(),
                    source: Json::String("changed".into()),
                    target: Json::String("deleted".into()),
                    policy,
                    winner: if policy == ConflictPolicy::Manual {
                        "parked"
                    } else if source {
                        "source"
                    } else {
                        "target"
                    }
                    .into(),
                }],
                decision: if policy == ConflictPolicy::Manual {
                    "parked"
                } else {
                    "resolved"
                }
                .into(),
                source_commit_ts_ms: commit_ts_ms,
                target_modified_ms: p.last_modified_ms,
                at_ms: chrono::Utc::now().timestamp_millis(),
            };
            self.record_conflict(&record).await?;
            entry.item = None;
            entry.hash = None;
            entry.projection.clear();
            self.ledger
                .commit(vec![(lkey.clone(), Some(entry.clone()))])
                .await?;
            if source || policy == ConflictPolicy::Manual {
                if policy == ConflictPolicy::Manual {
                    self.pending.remove(&lkey);
                }
                return Ok(PullOutcome::Done);
            }
            self.pending.remove(&lkey);
        }
        let on_delete = self.tables[ti].entry.pull.on_delete.clone();
        if let Some(d) = self.apply_on_delete(ti, &sk, p).await? {
            return Ok(PullOutcome::Dead(Box::new(d)));
        }
        if on_delete != OnDelete::Ignore {
            self.stats.pulled += 1;
        }
        let change = match on_delete {
            OnDelete::Delete => None,
            _ => {
                entry.item = None;
                entry.hash = None;
                entry.projection.clear();
                entry.etag = None;
                Some(entry)
            }
        };
        let mut changes = vec![(lkey, change)];
        // A person-created item's marker goes with the item.
        let marker_key = new_item_key(&self.tables[ti].table, p);
        if self.ledger.get(&marker_key)?.is_some() {
            changes.push((marker_key, None));
        }
        self.ledger.commit(changes).await?;
        Ok(PullOutcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_versions_compare_only_within_one_item() {
        assert_eq!(
            etag_version("\"{1A64AE23-9cb6-4521-b489-61d558dde9f7},11\""),
            Some(("1a64ae23-9cb6-4521-b489-61d558dde9f7".into(), 11))
        );
        assert_eq!(etag_version("\"g,x\""), None);
        assert_eq!(etag_version("no-comma"), None);
        assert!(is_stale(Some("\"g,3\""), Some("\"g,4\"")));
        assert!(is_stale(Some("\"G,3\""), Some("\"{g},4\"")));
        // The version the ledger holds (every write that sets it is conditional or whole, so
        // the ledger has its content): a replay or our own echo.
        assert!(is_stale(Some("\"g,4\""), Some("\"g,4\"")));
        assert!(!is_stale(Some("\"g,5\""), Some("\"g,4\"")));
        // Another item (re-created elsewhere) or no known eTag: not comparable.
        assert!(!is_stale(Some("\"h,1\""), Some("\"g,4\"")));
        assert!(!is_stale(Some("\"g,1\""), None));
        assert!(!is_stale(None, Some("\"g,4\"")));
    }
}
