//! An item deleted in the list: `pull.on_delete` (delete the row, soft-delete it, or ignore)
//! applies to its row, unless the row has a pending push that changes it, in which case the
//! deletion is a conflict decided by the table's policy.
//!
//! The steps of [`Processor::pull_delete`]: find the row (or, for a person-created item whose
//! row was being made, its intent); decide a conflict with a changing pending push (the source
//! winning re-creates the item, `manual` parks the row); apply `pull.on_delete`; and update the
//! ledger (the entry forgets its item; a deleted row's entry goes, with the item's marker).
//!
//! Invariant: after a deletion the ledger no longer points at the item, so a later push of the
//! row creates a new item instead of patching a deleted one.

use serde_json::Value as Json;

use super::conflict::{DELETE_CONFLICT_FIELD, FieldConflict, winner};
use super::new_item::new_item_key;
use super::processor::{PendingPull, PullOutcome};
use super::values::key_values;
use super::{RowChange, RowChangeKind};
use crate::config::{ConflictPolicy, OnDelete};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::audit::AuditOp;
use crate::process::dlq::DeadLetter;
use crate::process::ledger::Entry;
use crate::process::processor::{Desired, Pending, Processor};

impl<L: EventLog + 'static> Processor<L> {
    /// Applies an item's deletion to its row (see the module docs for the steps).
    pub(super) async fn pull_delete(
        &mut self,
        p: &PendingPull,
    ) -> Result<PullOutcome, ProcessError> {
        let Some((lkey, sk)) = self.row_of_item(p.table, p)? else {
            return self.delete_without_row(p).await;
        };
        let Some(mut entry) = self.ledger.get(&lkey)? else {
            return Ok(PullOutcome::Done);
        };
        let changing = self.changing_push(p.table, &lkey, &entry).await;
        if changing.is_none() {
            // A pending push that only restates the ledger (our own return-path write) or
            // deletes the row is superseded by this deletion: left pending, its flush would
            // create a new item for a row the deletion removes.
            self.pending.remove(&lkey);
        }
        if let Some(Pending { commit_ts_ms, .. }) = changing
            && !self
                .decide_delete_conflict(p, &sk, &lkey, &mut entry, commit_ts_ms)
                .await?
        {
            return Ok(PullOutcome::Done);
        }
        self.apply_deletion(p, &sk, lkey, entry).await
    }

    /// A deleted item no ledger entry points at. A person-created item whose row was being made
    /// when the process stopped: its intent knows the key, and the row may already exist (the
    /// item's create and its delete were coalesced on replay, so only the delete is seen here).
    async fn delete_without_row(&mut self, p: &PendingPull) -> Result<PullOutcome, ProcessError> {
        let intent_key = new_item_key(&self.tables[p.table].table, p);
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
            return self.forget_new_item(p, &sk, intent_key, true).await;
        }
        // Not ours (or our own delete coming back).
        self.stats.echoes += 1;
        Ok(PullOutcome::Done)
    }

    /// The row's pending push if it changes the item: when the source wins it re-creates the
    /// item (one that only restates the ledger, such as our own return-path write, changes
    /// nothing).
    async fn changing_push(&mut self, ti: usize, lkey: &[u8], entry: &Entry) -> Option<Pending> {
        let pp = self.live_pending(lkey, entry)?;
        let Desired::Upsert(row) = &pp.desired else {
            return None;
        };
        let proj = self.project(ti, row, entry).await.ok();
        proj.is_none_or(|proj| {
            proj.iter()
                .any(|(k, v)| entry.projection.get(k).unwrap_or(&Json::Null) != v)
        })
        .then_some(pp)
    }

    /// Decides the deletion against a changing pending push (committed at `commit_ts_ms`) and
    /// records the conflict; the ledger entry forgets the deleted item either way. `true`: the
    /// target won and the deletion applies to the row; otherwise the source's push re-creates
    /// the item, or (`manual`) the row is parked and neither side is written.
    async fn decide_delete_conflict(
        &mut self,
        p: &PendingPull,
        sk: &str,
        lkey: &[u8],
        entry: &mut Entry,
        commit_ts_ms: i64,
    ) -> Result<bool, ProcessError> {
        let policy = self.tables[p.table].entry.conflict;
        let winner = winner(policy, p.last_modified_ms, commit_ts_ms);
        let field = FieldConflict {
            field: DELETE_CONFLICT_FIELD.into(),
            column: "(row)".into(),
            source: Json::String("changed".into()),
            target: Json::String("deleted".into()),
            policy,
            winner: winner.into(),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let parked = policy == ConflictPolicy::Manual;
        let record = self.conflict_record(p, sk, id, vec![field], parked, commit_ts_ms);
        self.record_conflict(&record).await?;
        entry.item = None;
        entry.hash = None;
        entry.projection.clear();
        self.ledger
            .commit(vec![(lkey.to_vec(), Some(entry.clone()))])
            .await?;
        if winner == "source" {
            return Ok(false);
        }
        // Parked: the pending push waits for the operator; target: the deletion wins over it.
        self.pending.remove(lkey);
        Ok(winner == "target")
    }

    /// Applies `pull.on_delete` to the row of the deleted item and updates the ledger: the
    /// entry goes with a deleted row, else it forgets the item; the item's marker goes too.
    async fn apply_deletion(
        &mut self,
        p: &PendingPull,
        sk: &str,
        lkey: Vec<u8>,
        mut entry: Entry,
    ) -> Result<PullOutcome, ProcessError> {
        let ti = p.table;
        let on_delete = self.tables[ti].entry.pull.on_delete.clone();
        if let Some(d) = self.apply_on_delete(ti, sk, p).await? {
            return Ok(PullOutcome::dead(d));
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
        self.audit_pull(
            AuditOp::PullApply,
            p,
            sk,
            change.as_ref(),
            None,
            Some(format!(
                "the item was deleted in the list (pull.on_delete: {on_delete})"
            )),
        );
        let mut changes = vec![(lkey, change)];
        // A person-created item's marker goes with the item.
        let marker_key = new_item_key(&self.tables[ti].table, p);
        if self.ledger.get(&marker_key)?.is_some() {
            changes.push((marker_key, None));
        }
        self.ledger.commit(changes).await?;
        Ok(PullOutcome::Done)
    }

    /// Applies `pull.on_delete` to the row `sk` of table `ti` (an item deleted in the list);
    /// a database rejection comes back as the dead letter to write.
    pub(super) async fn apply_on_delete(
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
}
