//! What a check asks of the processor (the ledger's only writer), through the control plane's
//! command channel ([`ConflictHandle`]): a ledger snapshot, repairs to commit, and the heal of
//! one divergent item ([`DivergedFix`]: pulled fields written to the row by the return path's
//! applier, the entry told the item's values so the writer pushes the others).

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};
use tokio::sync::oneshot;

use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::convert;
use crate::process::ledger::{self, Entry};
use crate::process::processor::Processor;
use crate::process::processor::hash_projection;
use crate::pull::resolve::process_failure;
use crate::pull::{ConflictCommand, ConflictHandle, ResolveError};

/// The ledger by `(table, SyncKey)`.
pub type LedgerView = BTreeMap<(String, String), Entry>;
/// Ledger repairs: `(table, SyncKey, new entry or None to drop it)`.
pub type Repairs = Vec<(String, String, Option<Entry>)>;

/// A drift request for the processor task.
#[derive(Debug)]
pub enum DriftCommand {
    Ledger {
        reply: oneshot::Sender<Result<LedgerView, ResolveError>>,
    },
    Repair {
        changes: Repairs,
        reply: oneshot::Sender<Result<(), ResolveError>>,
    },
    Diverged {
        fix: Box<DivergedFix>,
        reply: oneshot::Sender<Result<bool, ResolveError>>,
    },
}

/// The heal of one divergent item, as the check decided it per field (see `check::heal_side`).
#[derive(Debug, Clone)]
pub struct DivergedFix {
    pub table: String,
    pub key: String,
    /// The item the row's entry must still name (else nothing is done).
    pub list_id: String,
    pub item_id: String,
    pub etag: Option<String>,
    /// The item's fields as the check read them.
    pub item: Map<String, Json>,
    /// Divergent fields (graph keys) to rewrite from the row: the entry records the item's
    /// values for them, so the writer's next diff sends the row's.
    pub push: Vec<String>,
    /// Columns whose mapped field's item value goes to the row.
    pub pull: Vec<String>,
}

impl ConflictHandle {
    /// Every ledger entry of the pipeline's tables, as the processor has committed them.
    pub async fn drift_ledger(&self) -> Result<LedgerView, ResolveError> {
        self.call(|reply| ConflictCommand::Drift(DriftCommand::Ledger { reply }))
            .await
    }

    /// Heals one divergent item (see [`DivergedFix`]); `false` when the row's entry no longer
    /// names that item (nothing done). Durable when this returns.
    pub async fn drift_diverged(&self, fix: DivergedFix) -> Result<bool, ResolveError> {
        let fix = Box::new(fix);
        self.call(|reply| ConflictCommand::Drift(DriftCommand::Diverged { fix, reply }))
            .await
    }

    /// Commits `changes` to the ledger (durable when this returns).
    pub async fn drift_repair(&self, changes: Repairs) -> Result<(), ResolveError> {
        self.call(|reply| ConflictCommand::Drift(DriftCommand::Repair { changes, reply }))
            .await
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Serves one drift command (between flushes, so the ledger is consistent).
    pub(crate) async fn serve_drift(&mut self, cmd: DriftCommand) -> Result<(), ProcessError> {
        match cmd {
            DriftCommand::Ledger { reply } => {
                let _ = reply.send(self.ledger_view().map_err(|e| process_failure("drift", e)));
            }
            DriftCommand::Repair { changes, reply } => {
                let changes = changes
                    .into_iter()
                    .map(|(t, k, e)| (ledger::key(&t, &k), e))
                    .collect();
                let r = self
                    .ledger
                    .commit(changes)
                    .await
                    .map_err(ProcessError::from);
                let _ = reply.send(r.map_err(|e| process_failure("drift", e)));
            }
            DriftCommand::Diverged { fix, reply } => {
                let r = self.heal_diverged(*fix).await;
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    /// Serves [`DriftCommand::Diverged`]: the pulled fields through the applier (replication
    /// origin: capture does not push them back), then one ledger commit holding the item's
    /// values and eTag, so neither side's echo is written again and the pushed fields differ
    /// from the row.
    async fn heal_diverged(&mut self, fix: DivergedFix) -> Result<bool, ResolveError> {
        let fail = |e: ProcessError| process_failure("drift", e);
        let Some(ti) = self.tables.iter().position(|t| t.table == fix.table) else {
            return Ok(false);
        };
        let lkey = ledger::key(&fix.table, &fix.key);
        let entry = self.ledger.get(&lkey).map_err(|e| fail(e.into()))?;
        let Some(mut entry) = entry.filter(|e| {
            e.item
                .as_ref()
                .is_some_and(|i| i.list_id == fix.list_id && i.item_id == fix.item_id)
        }) else {
            return Ok(false);
        };
        let to_row: Vec<_> = self.tables[ti]
            .entry
            .fields
            .iter()
            .filter(|f| fix.pull.contains(&f.column))
            .map(|f| (f.clone(), convert::canonical_from_item(&fix.item, f)))
            .collect();
        if !to_row.is_empty() {
            let now = chrono::Utc::now().timestamp_millis();
            self.write_to_row(ti, ("drift heal", &fix.key), &mut entry, &to_row, now)
                .await?;
        }
        for (k, v) in to_row.iter().flat_map(|(_, canon)| canon) {
            entry.projection.insert(k.clone(), v.clone());
        }
        for k in &fix.push {
            let actual = fix.item.get(k).cloned().unwrap_or(Json::Null);
            entry.projection.insert(k.clone(), actual);
        }
        entry.hash = Some(hash_projection(&entry.projection));
        entry.etag = fix.etag.or(entry.etag);
        self.ledger
            .commit(vec![(lkey, Some(entry))])
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(true)
    }

    fn ledger_view(&self) -> Result<LedgerView, ProcessError> {
        let mut out = BTreeMap::new();
        for t in &self.tables {
            for (k, e) in self.ledger.scan_table(&t.table)? {
                if let Some((table, key)) = ledger::split_key(&k) {
                    out.insert((table, key), e);
                }
            }
        }
        Ok(out)
    }
}
