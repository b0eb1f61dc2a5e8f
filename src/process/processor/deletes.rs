//! The push side of the accidental-delete guard ([`crate::process::delete_guard`]): which
//! pending deletes a flush may write.
//!
//! Held deletes are rows of the pending set that the flush skips; they keep their offsets, so
//! the offset commit stops at the first of them (*offsets follow durability*) and a restart
//! reads them again. Everything else in the pending set is flushed as usual.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;
use tracing::info;

use super::{Desired, Processor};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::delete_guard::{
    Decision, DeleteGate, DeleteGuardHandle, DirectionStatus, SHOWN_KEYS, Verdict,
};

/// The guard's state in the processor.
#[derive(Debug)]
pub(crate) struct DeleteHold {
    pub(crate) gate: DeleteGate,
    /// When each pending delete became one.
    since: HashMap<Vec<u8>, Instant>,
    /// Deletes held because the direction is paused (they need no re-flush until a decision).
    pub(crate) parked: usize,
    pub(crate) handle: Option<DeleteGuardHandle>,
}

impl DeleteHold {
    pub(crate) fn new(limits: crate::config::DeleteGuard) -> Self {
        Self {
            gate: DeleteGate::new(limits),
            since: HashMap::new(),
            parked: 0,
            handle: None,
        }
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Publishes the guard's state to `handle` and takes the operator's decisions from it.
    pub fn set_delete_guard(&mut self, handle: DeleteGuardHandle) {
        self.deletes.handle = Some(handle);
    }

    /// The pending deletes this flush must not write (held for their `hold_ms`, or paused).
    pub(super) async fn gate_deletes(&mut self) -> Result<HashSet<Vec<u8>>, ProcessError> {
        let now = Instant::now();
        let keys = self.pending_deletes()?;
        let live: HashSet<&Vec<u8>> = keys.iter().collect();
        self.deletes.since.retain(|k, _| live.contains(k));
        let decision = self.deletes.handle.as_ref().and_then(|h| h.take_decision());
        if let Some((decision, reply)) = decision {
            let n = self.decide_deletes(decision, &keys);
            let _ = reply.send(n);
            self.publish_deletes_with(&HashSet::new(), None, now);
            return Ok(HashSet::new());
        }
        let since: Vec<Instant> = keys
            .iter()
            .map(|k| *self.deletes.since.entry(k.clone()).or_insert(now))
            .collect();
        // The percent rule needs the managed items (a ledger scan); below the smallest possible
        // threshold the count cannot trip, so the scan is spared.
        let floor = self.deletes.gate.limits.threshold(0);
        let counted = self.deletes.gate.recent(now) + keys.len();
        let target = if counted <= floor || self.deletes.gate.paused() {
            0
        } else {
            self.managed_items()?
        };
        let (held, parked): (HashSet<Vec<u8>>, bool) =
            match self.deletes.gate.decide(&since, target, now) {
                Verdict::Release(due) => {
                    let due: HashSet<usize> = due.into_iter().collect();
                    let held = (0..keys.len()).filter(|i| !due.contains(i));
                    (held.map(|i| keys[i].clone()).collect(), false)
                }
                Verdict::Pause { .. } => (keys.iter().cloned().collect(), true),
            };
        self.deletes.parked = if parked { held.len() } else { 0 };
        let target_for_status = if target == 0 { None } else { Some(target) };
        self.publish_deletes_with(&held, target_for_status, now);
        Ok(held)
    }

    /// Pending deletes of rows whose item the ledger knows (a delete of a row never written
    /// costs nothing and is not counted).
    fn pending_deletes(&self) -> Result<Vec<Vec<u8>>, ProcessError> {
        let mut keys = Vec::new();
        for (k, p) in &self.pending {
            if matches!(p.desired, Desired::Delete)
                && self.ledger.get(k)?.is_some_and(|e| e.item.is_some())
            {
                keys.push(k.clone());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Items the pipeline manages (the percent rule's base).
    fn managed_items(&self) -> Result<usize, ProcessError> {
        let mut n = 0;
        for t in &self.tables {
            n += self
                .ledger
                .scan_table(&t.table)?
                .iter()
                .filter(|(_, e)| e.item.is_some())
                .count();
        }
        Ok(n)
    }

    /// Applies the operator's decision to the held `keys`: allow writes them in this flush,
    /// discard drops them from the pending set (items and ledger entries stay as they are).
    fn decide_deletes(&mut self, decision: Decision, keys: &[Vec<u8>]) -> usize {
        self.deletes.gate.resume();
        self.deletes.parked = 0;
        let pipeline = &self.cfg.pipeline.name;
        match decision {
            Decision::Allow => {
                info!(pipeline = %pipeline, deletes = keys.len(), "held deletes allowed by the operator");
            }
            Decision::Discard => {
                for k in keys {
                    self.pending.remove(k);
                    self.deletes.since.remove(k);
                }
                info!(pipeline = %pipeline, deletes = keys.len(),
                    "held deletes discarded by the operator: the items stay in the lists");
            }
        }
        keys.len()
    }

    /// Shows the direction's state (held keys, threshold at the last count) through the handle.
    fn publish_deletes_with(
        &mut self,
        held: &HashSet<Vec<u8>>,
        target: Option<usize>,
        now: Instant,
    ) {
        let Some(handle) = self.deletes.handle.clone() else {
            return;
        };
        let previous = handle.push_status();
        let limits = self.deletes.gate.limits;
        let mut first_keys: Vec<String> = held
            .iter()
            .filter_map(|k| self.pending.get(k))
            .map(|p| format!("{}/{}", self.tables[p.table].table, p.sync_key))
            .collect();
        first_keys.sort();
        first_keys.truncate(SHOWN_KEYS);
        handle.publish_push(DirectionStatus {
            enabled: limits.enabled,
            paused: self.deletes.gate.paused(),
            held: held.len(),
            threshold: target.map_or(previous.threshold.max(limits.threshold(0)), |t| {
                limits.threshold(t)
            }),
            recent: self.deletes.gate.recent(now),
            first_keys,
            since_ms: self.deletes.gate.paused_since(),
        });
    }
}
