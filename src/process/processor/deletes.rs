//! The processor's side of the accidental-delete guard ([`crate::process::delete_guard`]):
//! which pending deletes a flush may apply, per direction.
//!
//! - push: rows of the pending set whose desired state is a delete of a known item, or a move
//!   of it to another list (a route change: a delete in its list). A held move holds the row's
//!   whole write; a discarded one leaves the item where it was until the row changes again;
//! - pull: list changes of the return path that delete an item whose row the ledger knows, on a
//!   table whose `pull.on_delete` is not `ignore`.
//!
//! Held deletes stay in their pending set and keep their offsets, so the offset commits stop at
//! the first of them (*offsets follow durability*) and a restart reads them again. Everything
//! else is flushed as usual.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use tokio::time::Instant;
use tracing::info;

use super::{Desired, Processor};
use crate::config::DeleteGuard;
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::delete_guard::{
    Applied, Decision, DeleteGate, DeleteGuardHandle, Direction, DirectionStatus, SHOWN_KEYS,
    Verdict,
};
use crate::process::ledger;

/// The guard's state of one direction; `K` is the pending set's key.
#[derive(Debug)]
pub(crate) struct DirHold<K> {
    pub(crate) gate: DeleteGate,
    /// When each pending delete became one.
    since: HashMap<K, Instant>,
    /// Deletes held because the direction is paused (they need no re-flush until a decision).
    pub(crate) parked: usize,
}

impl<K: Hash + Eq + Clone> DirHold<K> {
    fn new(limits: DeleteGuard) -> Self {
        Self {
            gate: DeleteGate::new(limits),
            since: HashMap::new(),
            parked: 0,
        }
    }

    /// The held subset of the pending deletes `keys`. `target` (the percent rule's base, a
    /// ledger scan) is only asked for when the count can trip.
    fn hold(
        &mut self,
        keys: &[K],
        now: Instant,
        target: impl FnOnce() -> Result<usize, ProcessError>,
    ) -> Result<(HashSet<K>, Option<usize>), ProcessError> {
        let live: HashSet<&K> = keys.iter().collect();
        self.since.retain(|k, _| live.contains(k));
        let since: Vec<Instant> = keys
            .iter()
            .map(|k| *self.since.entry(k.clone()).or_insert(now))
            .collect();
        let counted = self.gate.recent(now) + keys.len();
        let base = if counted <= self.gate.limits.threshold(0) || self.gate.paused() {
            None
        } else {
            Some(target()?)
        };
        let (held, parked): (HashSet<K>, bool) =
            match self.gate.decide(&since, base.unwrap_or(0), now) {
                Verdict::Release(due) => {
                    let due: HashSet<usize> = due.into_iter().collect();
                    let held = (0..keys.len()).filter(|i| !due.contains(i));
                    (held.map(|i| keys[i].clone()).collect(), false)
                }
                Verdict::Pause { .. } => (keys.iter().cloned().collect(), true),
            };
        self.parked = if parked { held.len() } else { 0 };
        Ok((held, base))
    }

    /// The operator decided: the pause ends, a fresh window starts.
    fn resume(&mut self) {
        self.gate.resume();
        self.parked = 0;
        self.since.clear();
    }

    /// The direction's state for the API; `labels`: the held keys as the operator reads them.
    fn status(
        &mut self,
        held: usize,
        mut labels: Vec<String>,
        base: Option<usize>,
        previous: &DirectionStatus,
        now: Instant,
    ) -> DirectionStatus {
        let limits = self.gate.limits;
        labels.sort();
        labels.truncate(SHOWN_KEYS);
        DirectionStatus {
            enabled: limits.enabled,
            paused: self.gate.paused(),
            held,
            threshold: base.map_or(previous.threshold.max(limits.threshold(0)), |t| {
                limits.threshold(t)
            }),
            recent: self.gate.recent(now),
            first_keys: labels,
            since_ms: self.gate.paused_since(),
        }
    }
}

/// Both directions, and the handle they are published through.
#[derive(Debug)]
pub(crate) struct DeleteHold {
    pub(crate) push: DirHold<Vec<u8>>,
    pub(crate) pull: DirHold<String>,
    pub(crate) handle: Option<DeleteGuardHandle>,
}

impl DeleteHold {
    pub(crate) fn new(guard: &crate::config::GuardConfig) -> Self {
        Self {
            push: DirHold::new(guard.push),
            pull: DirHold::new(guard.pull),
            handle: None,
        }
    }

    fn take_decision(
        &self,
        dir: Direction,
    ) -> Option<(Decision, tokio::sync::oneshot::Sender<Applied>)> {
        self.handle.as_ref().and_then(|h| h.take_decision(dir))
    }

    fn publish(&self, dir: Direction, status: DirectionStatus) {
        if let Some(h) = &self.handle {
            h.publish(dir, status);
        }
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Publishes the guard's state to `handle` and takes the operator's decisions from it.
    pub fn set_delete_guard(&mut self, handle: DeleteGuardHandle) {
        self.deletes.handle = Some(handle);
    }

    /// The pending pushes this flush must not write: deletes held for their `hold_ms`, or
    /// paused.
    pub(super) async fn gate_deletes(&mut self) -> Result<HashSet<Vec<u8>>, ProcessError> {
        let now = Instant::now();
        let keys = self.pending_deletes()?;
        if let Some((decision, reply)) = self.deletes.take_decision(Direction::Push) {
            self.deletes.push.resume();
            if decision == Decision::Discard {
                for k in &keys {
                    self.pending.remove(k);
                }
            }
            self.log_decision(Direction::Push, decision, keys.len());
            let _ = reply.send(Applied {
                deletes: keys.len(),
                resnapshot: Vec::new(),
            });
            self.publish_deletes(Direction::Push, 0, Vec::new(), None, now);
            return Ok(HashSet::new());
        }
        let (held, base) = {
            let hold = &mut self.deletes.push;
            let (ledger, tables) = (&self.ledger, &self.tables);
            hold.hold(&keys, now, || managed_items(ledger, tables))?
        };
        let labels = held
            .iter()
            .filter_map(|k| self.pending.get(k))
            .map(|p| format!("{}/{}", self.tables[p.table].table, p.sync_key))
            .collect();
        self.publish_deletes(Direction::Push, held.len(), labels, base, now);
        Ok(held)
    }

    /// The pending list changes this flush must not apply: item deletions held for their
    /// `hold_ms`, or paused. A discard forgets the deleted items in the ledger and names the
    /// tables to read again, so the rows re-create them.
    pub(crate) async fn gate_pull_deletes(&mut self) -> Result<HashSet<String>, ProcessError> {
        let now = Instant::now();
        let deletions = self.pending_pull_deletes()?;
        let keys: Vec<String> = deletions.keys().cloned().collect();
        if let Some((decision, reply)) = self.deletes.take_decision(Direction::Pull) {
            self.deletes.pull.resume();
            let mut resnapshot = Vec::new();
            if decision == Decision::Discard {
                resnapshot = self.forget_deleted_items(&deletions).await?;
            }
            self.log_decision(Direction::Pull, decision, keys.len());
            let _ = reply.send(Applied {
                deletes: keys.len(),
                resnapshot,
            });
            self.publish_deletes(Direction::Pull, 0, Vec::new(), None, now);
            return Ok(HashSet::new());
        }
        let (held, base) = {
            let hold = &mut self.deletes.pull;
            let (ledger, tables) = (&self.ledger, &self.tables);
            hold.hold(&keys, now, || managed_items(ledger, tables))?
        };
        let labels = held
            .iter()
            .filter_map(|k| deletions.get(k))
            .map(|(ti, lkey)| {
                let sk = ledger::split_key(lkey).map(|(_, s)| s).unwrap_or_default();
                format!("{}/{sk}", self.tables[*ti].table)
            })
            .collect();
        self.publish_deletes(Direction::Pull, held.len(), labels, base, now);
        Ok(held)
    }

    /// Pending deletes of rows whose item the ledger knows (a delete of a row never written
    /// costs nothing and is not counted), and pending moves (a route change takes the item out
    /// of its list: a delete there).
    fn pending_deletes(&self) -> Result<Vec<Vec<u8>>, ProcessError> {
        let mut keys = Vec::new();
        for (k, p) in &self.pending {
            let Some(entry) = self.ledger.get(k)? else {
                continue;
            };
            let Some(item) = &entry.item else { continue };
            let counted = match &p.desired {
                Desired::Delete => true,
                Desired::Upsert(row) => {
                    let t = &self.tables[p.table];
                    !t.entry.routes.is_empty() && {
                        let routed = super::plan::route_view(&t.entry.fields, row, &entry);
                        let list = t.router.route(&t.table, &routed);
                        self.targets.list_id(list) != Some(item.list_id.as_str())
                    }
                }
            };
            if counted {
                keys.push(k.clone());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Pending item deletions that would change a row: pull key → (table index, ledger key).
    /// One ledger scan per table with such deletions (a deleted item carries no SyncKey).
    fn pending_pull_deletes(&self) -> Result<HashMap<String, (usize, Vec<u8>)>, ProcessError> {
        let mut by_table: HashMap<usize, Vec<(&String, &str, &str)>> = HashMap::new();
        for (k, p) in &self.pulls {
            let applies =
                self.tables[p.table].entry.pull.on_delete != crate::config::OnDelete::Ignore;
            if p.fields.is_none() && applies {
                by_table
                    .entry(p.table)
                    .or_default()
                    .push((k, &p.list_id, &p.item_id));
            }
        }
        let mut out = HashMap::new();
        for (ti, deletions) in by_table {
            let items: HashMap<(String, String), Vec<u8>> = self
                .ledger
                .scan_table(&self.tables[ti].table)?
                .into_iter()
                .filter_map(|(k, e)| e.item.map(|i| ((i.list_id, i.item_id), k)))
                .collect();
            for (k, list, item) in deletions {
                if let Some(lkey) = items.get(&(list.to_string(), item.to_string())) {
                    out.insert(k.clone(), (ti, lkey.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Discarded list deletions: the rows' entries forget their (deleted) items, the changes
    /// leave the pending set; returns the tables whose rows must be read again.
    async fn forget_deleted_items(
        &mut self,
        deletions: &HashMap<String, (usize, Vec<u8>)>,
    ) -> Result<Vec<String>, ProcessError> {
        let mut changes = Vec::new();
        let mut tables = Vec::new();
        for (k, (ti, lkey)) in deletions {
            if let Some(mut e) = self.ledger.get(lkey)? {
                e.item = None;
                e.hash = None;
                e.etag = None;
                e.projection.clear();
                changes.push((lkey.clone(), Some(e)));
            }
            self.pulls.remove(k);
            let table = self.tables[*ti].table.clone();
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
        self.ledger.commit(changes).await?;
        Ok(tables)
    }

    fn log_decision(&self, dir: Direction, decision: Decision, n: usize) {
        info!(pipeline = %self.cfg.pipeline.name, direction = dir.word(), ?decision, deletes = n,
            "the operator decided on the held deletes");
    }

    fn publish_deletes(
        &mut self,
        dir: Direction,
        held: usize,
        labels: Vec<String>,
        base: Option<usize>,
        now: Instant,
    ) {
        let Some(previous) = self.deletes.handle.as_ref().map(|h| h.status(dir)) else {
            return;
        };
        let status = match dir {
            Direction::Push => self.deletes.push.status(held, labels, base, &previous, now),
            Direction::Pull => self.deletes.pull.status(held, labels, base, &previous, now),
        };
        self.deletes.publish(dir, status);
    }

    /// Pending rows other than the deletes the guard holds paused (those wait for the operator:
    /// they neither force a flush nor keep the timer running).
    pub(crate) fn unparked(&self) -> usize {
        self.pending.len().saturating_sub(self.deletes.push.parked)
    }

    /// Pending list changes other than the deletions the guard holds paused.
    pub(crate) fn unparked_pulls(&self) -> usize {
        self.pulls.len().saturating_sub(self.deletes.pull.parked)
    }
}

/// Items the pipeline manages (the percent rule's base).
fn managed_items<L: EventLog + 'static>(
    ledger: &ledger::Ledger<L>,
    tables: &[super::TablePlan],
) -> Result<usize, ProcessError> {
    let mut n = 0;
    for t in tables {
        n += ledger
            .scan_table(&t.table)?
            .iter()
            .filter(|(_, e)| e.item.is_some())
            .count();
    }
    Ok(n)
}
