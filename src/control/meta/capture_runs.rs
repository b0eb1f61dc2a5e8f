//! Runs of capture's reads: the initial `snapshot` (or its resumption after a restart) and each
//! `resnapshot` of one table, recorded from what capture publishes (the durable snapshot state of
//! [`ObservedProgress`](crate::capture::snapshot::ObservedProgress), the status of
//! [`ResnapshotHandle`]) so capture itself knows nothing of the run history.
//!
//! A snapshot run starts at the first durable state this process saved that differs from the one
//! it loaded (a snapshot finished by an earlier process is not run again), appends its rows at most
//! every [`STREAM_UPDATE_INTERVAL`], and ends `succeeded` when every table is done. A re-snapshot
//! run follows one request id from queued to done (`succeeded`) or failed. Runs still open when
//! the pipeline stops end `cancelled`; a process that dies leaves them `running`, and the next
//! start marks them failed like any run.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::MetaError;
use super::runs::{RunCounts, RunKind, RunRecorder, RunStatus, STREAM_UPDATE_INTERVAL};
use crate::capture::snapshot::{SnapshotState, TableProgress};
use crate::capture::{ResnapshotState, ResnapshotStatus};
use crate::log::EventLog;

/// Where capture's runs go.
#[derive(Debug)]
pub struct CaptureRuns<L: EventLog> {
    pub log: Arc<L>,
    pub topic: String,
    pub pipeline: String,
}

/// An open run and when its counts were last appended.
struct Open<L: EventLog> {
    recorder: RunRecorder<L>,
    appended: Instant,
    /// The re-snapshot request id (empty for a snapshot).
    id: String,
}

/// Follows `snapshots` and `resnapshots` until `stop`, recording their runs. A failed append is
/// logged and skipped: the run history must not stop the pipeline.
pub async fn follow<L: EventLog>(
    runs: CaptureRuns<L>,
    mut snapshots: watch::Receiver<Option<SnapshotState>>,
    mut resnapshots: watch::Receiver<Option<ResnapshotStatus>>,
    stop: CancellationToken,
) {
    let mut snapshot: Option<Open<L>> = None;
    let mut resnapshot: Option<Open<L>> = None;
    let (mut snapshots_open, mut resnapshots_open) = (true, true);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            r = snapshots.changed(), if snapshots_open => {
                if r.is_err() { snapshots_open = false; continue; }
                let state = snapshots.borrow_and_update().clone();
                if let Some(state) = state {
                    log_err(&runs, on_snapshot(&runs, &mut snapshot, &state).await);
                }
            }
            r = resnapshots.changed(), if resnapshots_open => {
                if r.is_err() { resnapshots_open = false; continue; }
                let status = resnapshots.borrow_and_update().clone();
                if let Some(status) = status {
                    log_err(&runs, on_resnapshot(&runs, &mut resnapshot, &status).await);
                }
            }
        }
    }
    for open in [snapshot, resnapshot].into_iter().flatten() {
        let mut recorder = open.recorder;
        let counts = recorder.last().counts.clone();
        let reason = Some("the pipeline stopped before it finished".to_string());
        log_err(
            &runs,
            recorder.finish(RunStatus::Cancelled, counts, reason).await,
        );
    }
}

fn log_err<L: EventLog>(runs: &CaptureRuns<L>, r: Result<(), MetaError>) {
    if let Err(e) = r {
        warn!(pipeline = %runs.pipeline, "cannot record a capture run: {e}");
    }
}

/// Rows durable in the log so far, over every table.
fn snapshot_rows(state: &SnapshotState) -> u64 {
    state
        .tables
        .values()
        .map(|t| match t {
            TableProgress::Pending => 0,
            TableProgress::InProgress { rows, .. } | TableProgress::Done { rows } => *rows,
        })
        .sum()
}

async fn start<L: EventLog>(
    runs: &CaptureRuns<L>,
    kind: RunKind,
    subject: String,
    id: String,
) -> Result<Open<L>, MetaError> {
    let recorder = RunRecorder::start_about(
        runs.log.clone(),
        runs.topic.clone(),
        &runs.pipeline,
        kind,
        Some(subject),
    )
    .await?;
    Ok(Open {
        recorder,
        appended: Instant::now(),
        id,
    })
}

/// Appends `counts` to `open`, ending it with `end` (status, reason) when given; without an end,
/// at most every [`STREAM_UPDATE_INTERVAL`].
async fn advance<L: EventLog>(
    slot: &mut Option<Open<L>>,
    counts: RunCounts,
    end: Option<(RunStatus, Option<String>)>,
) -> Result<(), MetaError> {
    let Some(open) = slot.as_mut() else {
        return Ok(());
    };
    match end {
        Some((status, reason)) => {
            let mut open = slot.take().expect("checked above");
            open.recorder.finish(status, counts, reason).await
        }
        None if open.appended.elapsed() >= STREAM_UPDATE_INTERVAL => {
            open.appended = Instant::now();
            open.recorder.update(counts).await
        }
        None => Ok(()),
    }
}

async fn on_snapshot<L: EventLog>(
    runs: &CaptureRuns<L>,
    slot: &mut Option<Open<L>>,
    state: &SnapshotState,
) -> Result<(), MetaError> {
    if slot.is_none() {
        let tables: Vec<&str> = state.tables.keys().map(String::as_str).collect();
        *slot = Some(start(runs, RunKind::Snapshot, tables.join(", "), String::new()).await?);
    }
    let counts = RunCounts {
        rows: snapshot_rows(state),
        ..RunCounts::default()
    };
    let end = state.is_complete().then_some((RunStatus::Succeeded, None));
    advance(slot, counts, end).await
}

async fn on_resnapshot<L: EventLog>(
    runs: &CaptureRuns<L>,
    slot: &mut Option<Open<L>>,
    s: &ResnapshotStatus,
) -> Result<(), MetaError> {
    if slot.as_ref().is_some_and(|o| o.id != s.id) {
        // A newer request replaced the one followed (its end was not seen): close the old run.
        let counts = slot.as_ref().map(|o| o.recorder.last().counts.clone());
        let reason = Some("superseded by a newer re-snapshot request".to_string());
        advance(
            slot,
            counts.unwrap_or_default(),
            Some((RunStatus::Failed, reason)),
        )
        .await?;
    }
    if slot.is_none() {
        *slot = Some(start(runs, RunKind::Resnapshot, s.table.clone(), s.id.clone()).await?);
    }
    let counts = RunCounts {
        rows: s.rows,
        ..RunCounts::default()
    };
    let end = match s.state {
        ResnapshotState::Queued | ResnapshotState::Running => None,
        ResnapshotState::Done => Some((RunStatus::Succeeded, None)),
        ResnapshotState::Failed => Some((RunStatus::Failed, s.error.clone())),
    };
    advance(slot, counts, end).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn rows_sum_over_tables_in_every_state() {
        let state = SnapshotState {
            slot: "s".into(),
            consistent_point: 1,
            tables: BTreeMap::from([
                ("a.x".into(), TableProgress::Pending),
                (
                    "a.y".into(),
                    TableProgress::InProgress {
                        last_key: vec!["3".into()],
                        rows: 3,
                    },
                ),
                ("a.z".into(), TableProgress::Done { rows: 7 }),
            ]),
        };
        assert_eq!(snapshot_rows(&state), 10);
    }
}
