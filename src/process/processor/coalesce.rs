//! The pending set: at most one pending write per row (keyed by its ledger key), holding the
//! row's latest desired state. A later change within the flush window replaces the earlier one,
//! so a burst of changes to a row costs one write of its last state.
//!
//! Invariants:
//! - *Offsets follow durability*: a pending write keeps the lowest offset merged into it per
//!   (topic, partition); the offset commit never passes it until the write leaves the set.
//! - *Own writes are not echoed* ([`Processor::fold_own_write`]): a change made by the return
//!   path's applier (this pipeline's replication origin) never becomes a push of its own; it
//!   only refreshes the state of a push that is pending or due anyway.

use std::collections::BTreeMap;

use super::Processor;
use crate::log::{ConsumedRecord, EventLog};
use crate::process::ProcessError;
use crate::process::ledger;
use crate::process::row::{Cell, Change, Row};
use crate::telemetry::metrics as m;

/// The SyncKey of a row: the key column's text for one-column keys, else a JSON array of the
/// texts in key order. Stable across restarts and versions: it is stored in every item.
pub fn sync_key(key: &[(String, Cell)]) -> String {
    if let [(_, c)] = key {
        return c.to_text().unwrap_or_default();
    }
    let parts: Vec<Option<String>> = key.iter().map(|(_, c)| c.to_text()).collect();
    serde_json::to_string(&parts).unwrap_or_default()
}

/// What a flush should make of a row's item.
#[derive(Debug, Clone)]
pub(crate) enum Desired {
    Upsert(Row),
    Delete,
}

/// The latest record merged into a pending write (for dead letters: its position and bytes).
#[derive(Debug, Clone)]
pub(crate) struct LastEvent {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Option<Vec<u8>>,
}

impl LastEvent {
    pub(crate) fn of(rec: &ConsumedRecord) -> Self {
        LastEvent {
            topic: rec.topic.clone(),
            partition: rec.partition,
            offset: rec.offset,
            key: rec.record.key.clone(),
            value: rec.record.value.clone(),
        }
    }
}

/// A row's pending write.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) table: usize,
    pub(crate) sync_key: String,
    pub(crate) desired: Desired,
    pub(crate) lsn: u64,
    /// Commit time of the latest change merged in (for `last_writer_wins`).
    pub(crate) commit_ts_ms: i64,
    /// Lowest offset merged into this pending write, per (topic, partition).
    pub(crate) offsets: BTreeMap<(String, i32), i64>,
    pub(crate) last: LastEvent,
    pub(crate) deferrals: u32,
}

impl<L: EventLog + 'static> Processor<L> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put(
        &mut self,
        key: Vec<u8>,
        table: usize,
        sync_key: String,
        desired: Desired,
        lsn: u64,
        commit_ts_ms: i64,
        last: &LastEvent,
    ) {
        let tp = (last.topic.clone(), last.partition);
        match self.pending.get_mut(&key) {
            Some(p) => {
                self.stats.coalesced += 1;
                metrics::counter!(m::PUSH_COALESCED_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
                    .increment(1);
                p.desired = desired;
                p.lsn = p.lsn.max(lsn);
                p.commit_ts_ms = p.commit_ts_ms.max(commit_ts_ms);
                p.offsets.entry(tp).or_insert(last.offset);
                p.last = last.clone();
            }
            None => {
                let mut offsets = BTreeMap::new();
                offsets.insert(tp, last.offset);
                self.pending.insert(
                    key,
                    Pending {
                        table,
                        sync_key,
                        desired,
                        lsn,
                        commit_ts_ms,
                        offsets,
                        last: last.clone(),
                        deferrals: 0,
                    },
                );
            }
        }
        metrics::gauge!(m::PUSH_PENDING_ROWS, "pipeline" => self.cfg.pipeline.name.clone())
            .set(self.pending.len() as f64);
    }

    /// A truncate: every row of the table the ledger knows, and every pending one, is to be
    /// deleted.
    pub(super) fn truncate(
        &mut self,
        ti: usize,
        change: &Change,
        last: &LastEvent,
    ) -> Result<(), ProcessError> {
        let table = self.tables[ti].table.clone();
        let mut keys: Vec<(Vec<u8>, String)> = self
            .ledger
            .scan_table(&table)?
            .into_iter()
            .filter_map(|(k, _)| ledger::split_key(&k).map(|(_, sk)| (k, sk)))
            .collect();
        for (k, p) in &self.pending {
            if p.table == ti {
                keys.push((k.clone(), p.sync_key.clone()));
            }
        }
        for (k, sk) in keys {
            self.put(
                k,
                ti,
                sk,
                Desired::Delete,
                change.lsn,
                change.commit_ts_ms,
                last,
            );
        }
        Ok(())
    }

    /// Our own return-path write: the list already has what it wrote. But its row image is the
    /// newest state of the row, and it also folds in database changes committed before it that
    /// this processor skips as older than the ledger (the pull raised the ledger's LSN to this
    /// commit). So it is not dropped: it replaces an older pending push, or becomes one when the
    /// ledger knows the row's item; the flush diffs it against the ledger, so the pulled values
    /// (already there) cost nothing and only what the list lacks is sent. A row whose ledger
    /// entry the return path has not written yet (a person-created item mid-creation) is left
    /// to the return path. Replayed after a restart, an event older than the ledger is history:
    /// skipped.
    pub(super) fn fold_own_write(
        &mut self,
        lkey: Vec<u8>,
        ti: usize,
        sk: String,
        change: Change,
        last: &LastEvent,
    ) -> Result<(), ProcessError> {
        let known_item = self
            .ledger
            .get(&lkey)?
            .is_some_and(|e| e.item.is_some() && change.lsn >= e.lsn);
        match self.pending.get_mut(&lkey) {
            Some(p) => {
                match (change.op, change.after) {
                    ('c' | 'u' | 'r', Some(after)) => p.desired = Desired::Upsert(after),
                    _ => p.desired = Desired::Delete,
                }
                p.lsn = p.lsn.max(change.lsn);
            }
            None if known_item && matches!(change.op, 'c' | 'u' | 'r') => {
                if let Some(after) = change.after {
                    self.put(
                        lkey,
                        ti,
                        sk,
                        Desired::Upsert(after),
                        change.lsn,
                        change.commit_ts_ms,
                        last,
                    );
                    return Ok(());
                }
            }
            None => {}
        }
        self.stats.skipped_origin += 1;
        self.skip_metric("own_origin");
        Ok(())
    }

    /// An unchanged TOAST value: take it from the old image when the table is `REPLICA
    /// IDENTITY FULL` (PostgreSQL logs the whole old row, TOASTed values inline), else from
    /// the pending state when there is one (the ledger's projection covers the rest at flush
    /// time).
    pub(super) fn fill_unchanged(&self, lkey: &[u8], after: &mut Row, before: Option<&Row>) {
        let prev = match self.pending.get(lkey) {
            Some(Pending {
                desired: Desired::Upsert(prev),
                ..
            }) => Some(prev),
            _ => None,
        };
        for (col, cell) in after.iter_mut() {
            if !matches!(cell, Cell::Unchanged) {
                continue;
            }
            // A TOASTed value is never NULL: a NULL in the old image is a column it does not
            // carry (a key-only image of a table that is not FULL).
            let known = [before, prev]
                .into_iter()
                .flatten()
                .filter_map(|r| r.get(col))
                .find(|c| !matches!(c, Cell::Unchanged | Cell::Null));
            if let Some(c) = known {
                *cell = c.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_keys_are_stable() {
        assert_eq!(sync_key(&[("id".into(), Cell::Int(42))]), "42");
        assert_eq!(
            sync_key(&[
                ("a".into(), Cell::Text("x".into())),
                ("b".into(), Cell::Int(1))
            ]),
            r#"["x","1"]"#
        );
    }
}
