//! What a check asks of the processor (the ledger's only writer), through the control plane's
//! command channel ([`ConflictHandle`]): a ledger snapshot, and repairs to commit.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::ledger::{self, Entry};
use crate::process::processor::Processor;
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
}

impl ConflictHandle {
    /// Every ledger entry of the pipeline's tables, as the processor has committed them.
    pub async fn drift_ledger(&self) -> Result<LedgerView, ResolveError> {
        self.call(|reply| ConflictCommand::Drift(DriftCommand::Ledger { reply }))
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
        }
        Ok(())
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
