//! Stale ledger entries: entries naming a list that is not one of this run's targets.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::capture::ResnapshotHandle;
use crate::capture::resnapshot::{RequestError, ResnapshotState};
use crate::control::meta::{RunCounts, RunKind, RunRecorder, RunStatus};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::ledger::Entry;
use crate::process::processor::Processor;

/// How long to wait before asking again when a re-snapshot is already running (an operator's,
/// or the previous table's still finishing).
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// How long to keep asking: longer than a large table's re-snapshot, short enough that a heal
/// whose capture has stopped fails (and says why) instead of hanging.
const BUSY_PATIENCE: Duration = Duration::from_secs(600);

/// What [`Processor::repair_stale_ledger`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleLedger {
    /// Entries removed, per table (`schema.table`).
    pub entries: BTreeMap<String, u64>,
    /// The list ids they named.
    pub lists: BTreeSet<String>,
}

impl StaleLedger {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.entries.values().sum()
    }
}

/// The list ids an entry names (its item, a create in flight, an item still to delete).
fn lists_of(e: &Entry) -> impl Iterator<Item = &str> {
    e.item
        .iter()
        .map(|i| i.list_id.as_str())
        .chain(e.intent.iter().map(|i| i.create_in.as_str()))
        .chain(e.pending_delete.iter().map(|i| i.list_id.as_str()))
}

impl<L: EventLog + 'static> Processor<L> {
    /// Removes every ledger entry naming a list that no longer exists (the list vanished and
    /// provisioning made a new one). A list id that is not one of this run's targets is looked
    /// up once: one that still exists (a route removed from the configuration) is left to the
    /// writer path. Call it before the first write: the removal is durable when this returns,
    /// and the rows are then re-read by [`heal_vanished`].
    pub async fn repair_stale_ledger(&mut self) -> Result<StaleLedger, ProcessError> {
        let live: HashSet<&str> = self.targets.lists.values().map(|l| l.id.as_str()).collect();
        let mut entries = Vec::new();
        let mut unknown = BTreeSet::new();
        for t in &self.tables {
            for (key, entry) in self.ledger.scan_table(&t.table)? {
                let other: Vec<String> = lists_of(&entry)
                    .filter(|l| !live.contains(l))
                    .map(str::to_string)
                    .collect();
                if !other.is_empty() {
                    unknown.extend(other.iter().cloned());
                    entries.push((t.table.clone(), key, other));
                }
            }
        }
        let mut gone = BTreeSet::new();
        for id in unknown {
            match self.client.get_list(&self.targets.site_id, &id).await {
                Ok(None) => {
                    gone.insert(id);
                }
                Ok(Some(_)) => {}
                // Not known to be gone: left alone this time (a drift check finds it later).
                Err(e) => warn!(pipeline = %self.cfg.pipeline.name, list = %id,
                    "cannot tell whether a list the ledger names still exists: {e}"),
            }
        }
        let mut found = StaleLedger::default();
        let mut changes = Vec::new();
        for (table, key, lists) in entries {
            if lists.iter().any(|l| gone.contains(l)) {
                *found.entries.entry(table).or_default() += 1;
                changes.push((key, None));
            }
        }
        found.lists = gone;
        if !changes.is_empty() {
            self.ledger.commit(changes).await?;
            warn!(pipeline = %self.cfg.pipeline.name, entries = found.total(),
                lists = ?found.lists, "ledger named lists that no longer exist: entries dropped, the rows will be re-read");
        }
        Ok(found)
    }
}

/// Heals what [`Processor::repair_stale_ledger`] found: re-snapshots each affected table, one at
/// a time, and records one `drift_heal` run (`stale_ledger` = entries dropped, `rows` = rows
/// re-read). A failure is recorded in the run, never propagated: the pipeline keeps streaming.
pub async fn heal_vanished<L: EventLog>(
    stale: StaleLedger,
    snapshots: ResnapshotHandle,
    log: Arc<L>,
    runs_topic: String,
) {
    let pipeline = snapshots.pipeline().to_string();
    let subject = format!("stale ledger: lists {:?} vanished", stale.lists);
    let mut run = match RunRecorder::start_about(
        log,
        runs_topic,
        &pipeline,
        RunKind::DriftHeal,
        Some(subject),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            warn!(%pipeline, "cannot record the drift heal run: {e}");
            return;
        }
    };
    let mut counts = RunCounts::default();
    counts.drift.stale_ledger = stale.total();
    let mut failure = None;
    // A query source's first read after the start emits every row: its items come back anyway.
    let tables = stale
        .entries
        .keys()
        .filter(|t| !crate::config::is_query_table(t));
    for table in tables {
        match resnapshot(&snapshots, table).await {
            Ok(rows) => counts.rows += rows,
            Err(e) => {
                failure = Some(format!("re-snapshot of {table}: {e}"));
                break;
            }
        }
    }
    let status = if failure.is_some() {
        RunStatus::Failed
    } else {
        RunStatus::Succeeded
    };
    info!(%pipeline, rows = counts.rows, entries = counts.drift.stale_ledger, ?status, "vanished-list heal finished");
    if let Err(e) = run.finish(status, counts, failure).await {
        warn!(%pipeline, "cannot record the end of the drift heal run: {e}");
    }
}

/// Requests a re-snapshot of `table` (waiting while another one runs) and waits for its end;
/// returns the rows it emitted.
pub async fn resnapshot(h: &ResnapshotHandle, table: &str) -> Result<u64, String> {
    let mut watch = h.subscribe();
    let mut waited = Duration::ZERO;
    let id = loop {
        match h.request(table) {
            Ok(s) => break s.id,
            // Another re-snapshot is running; a capture that stopped answers busy for ever.
            Err(e @ RequestError::Busy { .. }) if waited >= BUSY_PATIENCE => {
                return Err(e.to_string());
            }
            Err(RequestError::Busy { .. }) => {
                tokio::time::sleep(BUSY_RETRY).await;
                waited += BUSY_RETRY;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    loop {
        if let Some(s) = watch.borrow_and_update().as_ref()
            && s.id == id
        {
            match s.state {
                ResnapshotState::Done => return Ok(s.rows),
                ResnapshotState::Failed => {
                    return Err(s.error.clone().unwrap_or_else(|| "failed".into()));
                }
                ResnapshotState::Queued | ResnapshotState::Running => {}
            }
        }
        if watch.changed().await.is_err() {
            return Err("capture stopped".into());
        }
    }
}
