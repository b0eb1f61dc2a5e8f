//! The return processor: what happens to a list change (DESIGN §8).
//!
//! List changes from the delta pollers (`<prefix>.<pipeline>.list-changes`, consumer group
//! `<prefix>.<pipeline>.return`) are applied to PostgreSQL by the same task that pushes, against
//! the same ledger entry. That is the partitioning answer to "a row's push and pull decisions see
//! one consistent ledger entry": one owner per pipeline, and within a flush the pulls are decided
//! first, knowing which rows also have a pending push (both sides changed → conflict policy).
//!
//! A list change goes through these steps:
//! 1. **Ingest** ([`Processor::ingest_pull`]): the record becomes the item's pending pull (the
//!    latest per item, keeping the lowest offset merged in). A full re-read (resync) that ends
//!    without an item the ledger knows turns into that item's deletion.
//! 2. **Flush** ([`Processor::flush_pulls`], before the pushes of the same flush): each pending
//!    pull is an edit of a known item ([`super::upsert`]), a person-created item without a
//!    `SyncKey` ([`super::new_item`]), or a deletion ([`super::delete`]). It is done, dead-lettered,
//!    or deferred to the next flush; a retryable failure keeps it for the next flush.
//!
//! - **Echo suppression**: an item whose mapped fields (canonical form, see
//!   `convert::canonical_from_item`) equal the ledger's projection, or whose eTag version the
//!   ledger already holds, is our own write or a replay: dropped.
//! - **Conflicts** ([`super::conflict`]): a field changed in the list *and* in a pending push of
//!   the row is decided by its policy; every conflict is recorded in
//!   `<prefix>.<pipeline>.conflicts`. A push whose conditional PATCH meets 412 refetches the item
//!   and becomes such a conflict on the next flush.
//! - **Deletes** follow `pull.on_delete` (delete the row, soft-delete, or ignore).
//!
//! Applies use the applier's replication-origin session ([`super::values`]), so capture marks
//! the resulting events and the push side skips them; the ledger is updated to the pulled values
//! as well, so even without the origin check the event would be recognised as in sync.

use std::collections::HashSet;

use serde_json::{Map, Value as Json};
use tokio::time::Instant;
use tracing::warn;

use super::{ChangeKind, ListChange};
use crate::config::{Direction, FieldMapping, SYNC_KEY_FIELD};
use crate::graph::GraphError;
use crate::log::{ConsumedRecord, EventLog};
use crate::process::ProcessError;
use crate::process::dlq::{DeadLetter, SourcePosition};
use crate::process::ledger::{self, Entry};
use crate::process::processor::{Pending, Processor};

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

/// What became of one pending pull in a flush.
pub(super) enum PullOutcome {
    Done,
    Dead(Box<DeadLetter>),
    /// Try again next flush.
    Defer,
}

impl PullOutcome {
    pub(super) fn dead(d: DeadLetter) -> Self {
        PullOutcome::Dead(Box::new(d))
    }
}

fn parse_ms(s: Option<&str>) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s?)
        .ok()
        .map(|t| t.timestamp_millis())
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
            ChangeKind::ResyncEnd => self.resync_ended(ti, &change, &rec)?,
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

    /// The end of a full re-read of a list: items the ledger knows in this list that the read
    /// did not return were deleted while no delta token covered them.
    fn resync_ended(
        &mut self,
        ti: usize,
        change: &ListChange,
        rec: &ConsumedRecord,
    ) -> Result<(), ProcessError> {
        let Some((id, seen)) = self.resync_seen.remove(&change.list_id) else {
            return Ok(());
        };
        if change.resync_id.as_deref() != Some(id.as_str()) {
            return Ok(());
        }
        let table = self.tables[ti].table.clone();
        for (_, e) in self.ledger.scan_table(&table)? {
            if let Some(item) = e.item
                && item.list_id == change.list_id
                && !seen.contains(&item.item_id)
            {
                self.put_pull(ti, &change.list_id, &item.item_id, None, None, None, rec);
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

    /// Applies the pending list changes (before the pushes of the same flush).
    pub(crate) async fn flush_pulls(&mut self) -> Result<(), ProcessError> {
        if self.pulls.is_empty() {
            return Ok(());
        }
        // Item deletions the accidental-delete guard holds stay pending, unapplied.
        let held = self.gate_pull_deletes().await?;
        let keys: Vec<String> = self
            .pulls
            .keys()
            .filter(|k| !held.contains(*k))
            .cloned()
            .collect();
        let mut transient: Option<String> = None;
        let mut dead = Vec::new();
        for k in keys {
            let Some(p) = self.pulls.get(&k).cloned() else {
                continue;
            };
            match self.pull_one(&p).await {
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

    /// One pending pull: a deletion, an edit of an item with a `SyncKey`, or a person-created
    /// item (no `SyncKey` yet).
    async fn pull_one(&mut self, p: &PendingPull) -> Result<PullOutcome, ProcessError> {
        let Some(fields) = &p.fields else {
            return self.pull_delete(p).await;
        };
        let has_key = fields
            .get(SYNC_KEY_FIELD)
            .and_then(Json::as_str)
            .is_some_and(|s| !s.is_empty());
        if has_key {
            self.pull_upsert(p).await
        } else {
            self.pull_new_item(p).await
        }
    }

    /// The dead letter of a list change the database (or the mapping) cannot take.
    pub(super) fn pull_dead(
        &self,
        p: &PendingPull,
        key: &str,
        kind: &str,
        reason: String,
    ) -> DeadLetter {
        DeadLetter {
            pipeline: self.cfg.pipeline.name.clone(),
            table: self.tables[p.table].table.clone(),
            key: key.to_string(),
            kind: kind.to_string(),
            reason,
            list: Some(p.list_id.clone()),
            request_id: None,
            client_request_id: None,
            status: None,
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

    /// The row's pending push, unless it is older than the ledger (a replayed event the flush
    /// skips as stale): such a push is no source-side change to weigh against a list change.
    pub(super) fn live_pending(&self, lkey: &[u8], entry: &Entry) -> Option<Pending> {
        self.pending
            .get(lkey)
            .filter(|p| p.lsn == 0 || p.lsn >= entry.lsn)
            .cloned()
    }

    /// The fields the return path reads for a table: bidirectional and pull_only ones.
    pub(super) fn pull_fields(&self, ti: usize) -> Vec<FieldMapping> {
        self.tables[ti]
            .entry
            .fields
            .iter()
            .filter(|f| f.direction != Direction::PushOnly)
            .cloned()
            .collect()
    }

    /// The ledger key of the row an item belongs to (by SyncKey, else by a ledger scan).
    pub(super) fn row_of_item(
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
        Ok(self
            .ledger_key_of_item(table, &p.list_id, &p.item_id)?
            .map(|k| {
                let sk = ledger::split_key(&k).map(|(_, s)| s).unwrap_or_default();
                (k, sk)
            }))
    }
}
