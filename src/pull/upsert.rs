//! An edit of a list item that carries a `SyncKey`: the row it belongs to takes the item's
//! changed fields, unless the edit is an echo, a replay, or loses a conflict.
//!
//! The steps of [`Processor::pull_upsert`], in order:
//! 1. find the row and its ledger entry; an item without one is left to the push side, and a
//!    list version the ledger already holds is an echo or a replay ([`Processor::edit_of`]);
//!    values of our own update whose outcome a crash cut off are known content, not edits
//!    ([`Processor::take_own_writes`]);
//! 2. the fields whose canonical value differs from the ledger's projection; none: an echo;
//! 3. the source side to weigh them against: the row's pending push, else the row as it is in
//!    PostgreSQL ([`Processor::source_side`]), and the policy decisions
//!    ([`super::conflict::decide_fields`]);
//! 4. record the conflicts (once per decision), settle them in the ledger and on the item;
//! 5. carry the list's values into the row's pending push, so it does not write old ones back;
//! 6. apply the remaining fields to the row and record them in the ledger.
//!
//! Invariant: the ledger entry records a list version only together with the content the
//! ledger then holds for it, so a later record of the same version is recognised as stale.

use std::ops::ControlFlow;

use serde_json::{Map, Value as Json};
use tracing::{debug, warn};

use super::conflict::{
    CanonField, FieldConflict, FieldDecisions, SourceSide, conflict_id, decide_fields, is_stale,
};
use super::new_item::{created_marker, new_item_key};
use super::processor::{PendingPull, PullOutcome};
use super::values::{ItemWrite, cell_from_text, key_values, refused_column, rejected_reason};
use super::{Applied, ApplyError, RowChange, RowChangeKind};
use crate::config::{Direction, SYSTEM_FIELDS};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::audit::AuditOp;
use crate::process::convert;
use crate::process::ledger::{Entry, ItemRef, Provenance};
use crate::process::processor::{Desired, Pending, Processor, hash_projection};
use crate::telemetry::metrics as m;

/// The row a list edit concerns, as the edit is decided.
struct Edit<'a> {
    p: &'a PendingPull,
    /// The row's ledger key and SyncKey.
    lkey: Vec<u8>,
    sk: String,
    /// The row's ledger entry, updated step by step.
    entry: Entry,
    /// A person-created item whose row was being made when the process stopped (its SyncKey
    /// is written, its ledger entry not yet): the row came from this item, so its values are
    /// taken as they are, not checked for a conflict.
    resumed_new: bool,
    /// The projection took values of our own unconfirmed update from this list version.
    took_own_writes: bool,
}

impl<L: EventLog + 'static> Processor<L> {
    /// Applies a list edit of an item with a `SyncKey` (see the module docs for the steps).
    pub(super) async fn pull_upsert(
        &mut self,
        p: &PendingPull,
    ) -> Result<PullOutcome, ProcessError> {
        let Some(mut edit) = self.edit_of(p)? else {
            return Ok(PullOutcome::Done);
        };
        self.take_own_writes(&mut edit);
        let (changed, system_changed) = self.changed_fields(&edit);
        self.hold_push_only(&mut edit);
        if edit.entry.item.is_none() {
            edit.entry.item = Some(ItemRef {
                list_id: p.list_id.clone(),
                item_id: p.item_id.clone(),
            });
        }
        if changed.is_empty() {
            // Our own write coming back (or a change to unmapped columns only).
            return self.take_echo(edit).await;
        }
        let pending = self.live_pending(&edit.lkey, &edit.entry);
        if let Some(Pending {
            desired: Desired::Delete,
            ..
        }) = &pending
        {
            // Deleted in PostgreSQL while edited in the list: the delete is pushed next.
            return Ok(PullOutcome::Done);
        }
        let source = self.source_side(&edit, pending.as_ref()).await?;
        let policy = self.tables[p.table].entry.conflict;
        let Some(decisions) = decide_fields(changed, &edit.entry.projection, &source, policy, p)
        else {
            return Ok(PullOutcome::Defer);
        };
        let FieldDecisions {
            mut apply,
            conflicts,
            parked,
            converged,
            lost_targets,
            source_fields,
        } = decisions;
        let had_conflicts = !conflicts.is_empty();
        self.record_field_conflicts(&mut edit, conflicts, parked, source.pending_ts_ms)
            .await?;
        if parked {
            // Neither side is written until an operator decides.
            self.pending.remove(&edit.lkey);
            return Ok(PullOutcome::Done);
        }
        let settled_by_converged = !had_conflicts && apply.is_empty();
        self.take_converged(&mut edit, converged, settled_by_converged)
            .await?;
        if had_conflicts
            && !self
                .settle_conflicts(&mut edit, lost_targets, source_fields)
                .await?
        {
            return Ok(PullOutcome::Done);
        }
        if pending.is_some() {
            self.carry_into_pending(&edit.lkey, &apply).await?;
        }
        if apply.is_empty() {
            return Ok(PullOutcome::Done);
        }
        apply.extend(system_changed);
        match self.write_row(&edit, &apply).await? {
            ControlFlow::Continue(applied) => self.record_pulled(edit, apply, applied).await,
            ControlFlow::Break(outcome) => Ok(outcome),
        }
    }

    /// Step 1: the row the edit concerns. `None` when there is nothing to decide: no row, an
    /// item this pipeline has no record of, or a list version the ledger already holds.
    fn edit_of<'a>(&mut self, p: &'a PendingPull) -> Result<Option<Edit<'a>>, ProcessError> {
        let ti = p.table;
        let Some((lkey, sk)) = self.row_of_item(ti, p)? else {
            return Ok(None);
        };
        let known = self.ledger.get(&lkey)?;
        let resumed_new = known.is_none()
            && self
                .ledger
                .get(&new_item_key(&self.tables[ti].table, p))?
                .is_some_and(|e| !e.row_created);
        if known.is_none() && !resumed_new {
            // An item with a SyncKey this pipeline has no record of (a list from an earlier
            // installation, a lost state directory without its changelog): there is no last
            // sync to compare with, so it is not a conflict. The database is the system of
            // record: the push side adopts the item by its SyncKey and writes the row's values.
            debug!(table = %self.tables[ti].table, key = %sk, "list change of an item without a ledger entry: left to the push side");
            return Ok(None);
        }
        if let Some(k) = &known
            && is_stale(p.etag.as_deref(), k.etag.as_deref())
        {
            self.count_echo();
            return Ok(None);
        }
        Ok(Some(Edit {
            p,
            lkey,
            sk,
            entry: known.unwrap_or_default(),
            resumed_new,
            took_own_writes: false,
        }))
    }

    /// Step 1b: an update whose outcome was never recorded (a crash, or a lost answer, between
    /// Graph and the ledger) may have landed. A list field holding a value it sent holds our
    /// own write, not a person's edit: it joins the projection as the item's known content, so
    /// it is neither taken back into the row (overwriting newer source values) nor weighed as
    /// a conflict. The fields stay in flight: the push sends the row's current values again.
    fn take_own_writes(&self, edit: &mut Edit<'_>) {
        if edit.entry.sent.is_empty() {
            return;
        }
        let Some(fields) = edit.p.fields.as_ref() else {
            return;
        };
        for f in self.pull_fields(edit.p.table) {
            for (k, v) in convert::canonical_from_item(fields, &f) {
                if edit.entry.projection.get(&k) != Some(&v) && edit.entry.was_sent(&k, &v) {
                    edit.entry.projection.insert(k, v);
                    edit.took_own_writes = true;
                }
            }
        }
    }

    fn count_echo(&mut self) {
        self.stats.echoes += 1;
        metrics::counter!(m::PULL_ECHOES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
            .increment(1);
    }

    /// Step 2: the fields whose canonical list value differs from the ledger's; read-only
    /// system fields (`Modified`…) apart, as they change with every edit.
    fn changed_fields(&self, edit: &Edit<'_>) -> (Vec<CanonField>, Vec<CanonField>) {
        let fields = edit.p.fields.clone().unwrap_or_default();
        let mut changed = Vec::new();
        let mut system_changed = Vec::new();
        for f in self.pull_fields(edit.p.table) {
            let canon = convert::canonical_from_item(&fields, &f);
            let same = canon
                .iter()
                .all(|(k, v)| edit.entry.projection.get(k).unwrap_or(&Json::Null) == v);
            if !same {
                if SYSTEM_FIELDS.contains(&f.field.as_str()) {
                    system_changed.push((f, canon));
                } else {
                    changed.push((f, canon));
                }
            }
        }
        (changed, system_changed)
    }

    /// `push_only` fields the person changed: not applied to the row (counted), but the ledger
    /// learns the list's value, so the row's next change writes the row's value over it (and
    /// not before: nothing is sent for them now).
    fn hold_push_only(&mut self, edit: &mut Edit<'_>) {
        let fields = edit.p.fields.clone().unwrap_or_default();
        let mut held = 0u64;
        for f in &self.tables[edit.p.table].entry.fields {
            if f.direction != Direction::PushOnly {
                continue;
            }
            for (k, v) in convert::canonical_from_item(&fields, f) {
                if edit.entry.projection.get(&k).unwrap_or(&Json::Null) != &v {
                    held += u64::from(!k.ends_with("@odata.type"));
                    edit.entry.projection.insert(k, v);
                }
            }
        }
        if held > 0 {
            edit.entry.hash = Some(hash_projection(&edit.entry.projection));
            metrics::counter!(m::DIRECTION_HELD_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "direction" => "push_only")
                .increment(held);
        }
    }

    /// No mapped field changed (or only to values our own unconfirmed update sent): an echo.
    /// The ledger learns the item's new version, with those values.
    async fn take_echo(&mut self, mut edit: Edit<'_>) -> Result<PullOutcome, ProcessError> {
        self.count_echo();
        let p = edit.p;
        if (p.etag.is_some() && edit.entry.etag != p.etag) || edit.took_own_writes {
            edit.entry.etag = p.etag.clone().or(edit.entry.etag.take());
            self.ledger
                .commit(vec![(edit.lkey, Some(edit.entry))])
                .await?;
        }
        Ok(PullOutcome::Done)
    }

    /// Step 3: the source side: the pending push, else the row as it is now in PostgreSQL (its
    /// change may not have reached the processor yet); none for a resumed person-created item.
    async fn source_side(
        &mut self,
        edit: &Edit<'_>,
        pending: Option<&Pending>,
    ) -> Result<SourceSide, ProcessError> {
        let ti = edit.p.table;
        let (projection, from_pending) = match pending {
            Some(Pending {
                desired: Desired::Upsert(row),
                ..
            }) => (self.project(ti, row, &edit.entry).await.ok(), true),
            _ if edit.resumed_new => (None, false),
            _ => (
                self.source_projection(ti, &edit.sk, &edit.entry).await?,
                false,
            ),
        };
        Ok(SourceSide {
            projection,
            from_pending,
            pending_ts_ms: pending.map(|p| p.commit_ts_ms),
        })
    }

    /// Step 4a: records the conflicts. The same decision replayed after a crash (same row,
    /// list version and values) is recorded once: its id is derived from them and remembered
    /// in the ledger (as unconfirmed) before the record is appended and before any write to
    /// the item. A replay that finds it unconfirmed (a crash around the append) appends it
    /// only if the conflicts topic does not hold it.
    async fn record_field_conflicts(
        &mut self,
        edit: &mut Edit<'_>,
        conflicts: Vec<FieldConflict>,
        parked: bool,
        pending_ts_ms: Option<i64>,
    ) -> Result<(), ProcessError> {
        let p = edit.p;
        let table = &self.tables[p.table].table;
        let id = conflict_id(table, &edit.sk, &p.item_id, p.etag.as_deref(), &conflicts);
        if conflicts.is_empty() {
            return Ok(());
        }
        let known = edit.entry.last_conflict.as_deref() == Some(id.as_str());
        if known && !edit.entry.conflict_unconfirmed {
            return Ok(());
        }
        if known && self.conflict_recorded(&id).await? {
            return self.confirm_conflict(edit).await;
        }
        if !known {
            edit.entry.last_conflict = Some(id.clone());
            edit.entry.conflict_unconfirmed = true;
            self.ledger
                .commit(vec![(edit.lkey.clone(), Some(edit.entry.clone()))])
                .await?;
        }
        let ts = pending_ts_ms.unwrap_or(0);
        let record = self.conflict_record(p, &edit.sk, id, conflicts, parked, ts);
        self.record_conflict(&record).await?;
        self.failpoints.hit("pull.after_conflict");
        self.confirm_conflict(edit).await
    }

    /// The row's last conflict is in the conflicts topic: the ledger stops doubting it.
    async fn confirm_conflict(&mut self, edit: &mut Edit<'_>) -> Result<(), ProcessError> {
        edit.entry.conflict_unconfirmed = false;
        self.ledger
            .commit(vec![(edit.lkey.clone(), Some(edit.entry.clone()))])
            .await?;
        Ok(())
    }

    /// Step 4b: fields both sides changed to the same value join the projection. When nothing
    /// else is decided or applied (`settled`), the ledger records the list version now.
    async fn take_converged(
        &mut self,
        edit: &mut Edit<'_>,
        converged: Vec<(String, Json)>,
        settled: bool,
    ) -> Result<(), ProcessError> {
        if converged.is_empty() {
            return Ok(());
        }
        let entry = &mut edit.entry;
        entry.projection.extend(converged);
        entry.hash = Some(hash_projection(&entry.projection));
        if settled {
            entry.etag = edit.p.etag.clone().or(entry.etag.take());
            self.ledger
                .commit(vec![(edit.lkey.clone(), Some(entry.clone()))])
                .await?;
        }
        Ok(())
    }

    /// Step 4c: the decided list version goes to the ledger (the push's conditional PATCH must
    /// not meet 412 for it again), with the target values the pending push overwrites, and the
    /// source winners no push carries are written to the item. `false`: the item changed again
    /// meanwhile; its newer version arrives as its own change and is decided then.
    async fn settle_conflicts(
        &mut self,
        edit: &mut Edit<'_>,
        lost_targets: Vec<(String, Json)>,
        source_fields: Map<String, Json>,
    ) -> Result<bool, ProcessError> {
        let p = edit.p;
        let entry = &mut edit.entry;
        entry.etag = p.etag.clone().or(entry.etag.take());
        if !lost_targets.is_empty() {
            entry.projection.extend(lost_targets);
            entry.hash = Some(hash_projection(&entry.projection));
        }
        let mut current = true;
        if !source_fields.is_empty() {
            match self
                .write_item(p, &source_fields, p.etag.as_deref())
                .await?
            {
                ItemWrite::Written(etag) => {
                    entry.etag = etag.or(entry.etag.take());
                    entry.projection.extend(source_fields);
                    entry.hash = Some(hash_projection(&entry.projection));
                }
                ItemWrite::Changed => current = false,
            }
        }
        self.ledger
            .commit(vec![(edit.lkey.clone(), Some(entry.clone()))])
            .await?;
        Ok(current)
    }

    /// Step 5: a pending push of the row must carry every value taken from the list (edits the
    /// source did not touch, and conflicts the target won), or it would write the old ones back.
    async fn carry_into_pending(
        &mut self,
        lkey: &[u8],
        apply: &[CanonField],
    ) -> Result<(), ProcessError> {
        let mut target_cells = Vec::new();
        for (f, canon) in apply {
            let text = self.pulled_text(f, canon).await?.ok().flatten();
            target_cells.push((f.column.clone(), cell_from_text(f, text.as_deref())));
        }
        if let Some(Pending {
            desired: Desired::Upsert(row),
            ..
        }) = self.pending.get_mut(lkey)
        {
            for (col, cell) in target_cells {
                row.insert(col, cell);
            }
        }
        Ok(())
    }

    /// Step 6a: writes the fields to the row (an `UPDATE` through the applier's origin
    /// session). A value the mapping or the database refuses is a dead letter of its own,
    /// naming the row, field and value; the row takes the other fields, and the ledger records
    /// the list's value of the refused one (so it is not refused again with every later edit,
    /// and the row's next change writes the row's value over it).
    async fn write_row(
        &mut self,
        edit: &Edit<'_>,
        apply: &[CanonField],
    ) -> Result<ControlFlow<PullOutcome, Applied>, ProcessError> {
        let (p, ti, sk) = (edit.p, edit.p.table, edit.sk.as_str());
        let mut set = Vec::new();
        let mut refused = Vec::new();
        for (f, canon) in apply {
            match self.pulled_text(f, canon).await? {
                Ok(text) => set.push((f.column.clone(), text)),
                // A system person without an email (the app account): the column keeps its value.
                Err(_) if SYSTEM_FIELDS.contains(&f.field.as_str()) => {}
                Err(u) => refused.push(self.pull_dead(p, sk, u.kind, u.to_string())),
            }
        }
        let key = key_values(&self.facts[ti].key_columns, sk);
        let outcome = loop {
            if set.is_empty() {
                // Nothing the row can take: the list version is recorded all the same.
                let none = Applied {
                    rows: 1,
                    key: key.clone(),
                    commit_lsn: None,
                };
                break ControlFlow::Continue(none);
            }
            let change = RowChange {
                table: self.table_name(ti),
                key: key.clone(),
                kind: RowChangeKind::Update { set: set.clone() },
            };
            match self.apply(change).await? {
                Ok(a) if a.rows == 0 => break self.row_missing(edit, key, set).await?,
                Ok(a) => break ControlFlow::Continue(a),
                Err(e) => match refused_column(&e, &set) {
                    Some(column) => {
                        let reason = rejected_reason(&e, &self.tables[ti].entry.fields, &set);
                        refused.push(self.pull_dead(p, sk, "pull_rejected", reason));
                        set.retain(|(c, _)| *c != column);
                    }
                    None => break ControlFlow::Break(self.pull_rejected(p, sk, &e, &set)),
                },
            }
        };
        self.append_dead(refused).await?;
        Ok(outcome)
    }

    /// The `UPDATE` matched no row: deleted in PostgreSQL (its delete is pushed next, or was
    /// while we were down), or an item with a SyncKey this pipeline never wrote. Never
    /// resurrect a row from an item: the list edit is dropped, with a warning. A person-created
    /// item whose row's insert did not happen before a crash gets its row now.
    async fn row_missing(
        &mut self,
        edit: &Edit<'_>,
        key: Vec<(String, Option<String>)>,
        set: Vec<(String, Option<String>)>,
    ) -> Result<ControlFlow<PullOutcome, Applied>, ProcessError> {
        let (p, ti, sk) = (edit.p, edit.p.table, edit.sk.as_str());
        if !edit.resumed_new {
            warn!(table = %self.tables[ti].table, key = %sk, item = %p.item_id,
                "list edit of an item whose row does not exist; not applied");
            return Ok(ControlFlow::Break(PullOutcome::Done));
        }
        let insert = self.row_insert(ti, key, set.clone());
        Ok(match self.apply(insert).await? {
            Ok(a) => ControlFlow::Continue(a),
            Err(e) => ControlFlow::Break(self.pull_rejected(p, sk, &e, &set)),
        })
    }

    /// The outcome of a list change PostgreSQL refused: a dead letter naming the field and
    /// value when the database's error names a column.
    pub(super) fn pull_rejected(
        &self,
        p: &PendingPull,
        sk: &str,
        e: &ApplyError,
        values: &[(String, Option<String>)],
    ) -> PullOutcome {
        let reason = rejected_reason(e, &self.tables[p.table].entry.fields, values);
        PullOutcome::dead(self.pull_dead(p, sk, "pull_rejected", reason))
    }

    /// Step 6b: the ledger takes the applied values and the list version; a pending push of
    /// the row is as new as this apply. A resumed person-created item's row gets its database
    /// values written back to the item, and its intent becomes the created marker.
    async fn record_pulled(
        &mut self,
        edit: Edit<'_>,
        apply: Vec<CanonField>,
        applied: Applied,
    ) -> Result<PullOutcome, ProcessError> {
        let Edit {
            p,
            lkey,
            sk,
            mut entry,
            resumed_new,
            ..
        } = edit;
        self.stats.pulled += 1;
        for (_, canon) in apply {
            entry.projection.extend(canon);
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
        let ti = p.table;
        if resumed_new && !self.write_back_row_values(ti, &sk, &mut entry, p).await? {
            // Changed again meanwhile: the newer version resumes (the intent stays).
            return Ok(PullOutcome::Done);
        }
        entry.hash = Some(hash_projection(&entry.projection));
        self.audit_pull(
            AuditOp::PullApply,
            p,
            &sk,
            Some(&entry),
            applied.commit_lsn,
            Some("a list edit was applied to the row".into()),
        );
        let mut changes = vec![(lkey, Some(entry))];
        if resumed_new {
            let intent_key = new_item_key(&self.tables[ti].table, p);
            changes.push((intent_key, Some(created_marker(&sk))));
        }
        self.ledger.commit(changes).await?;
        debug!(table = %self.tables[ti].table, key = %sk, "applied a list edit");
        Ok(PullOutcome::Done)
    }
}
