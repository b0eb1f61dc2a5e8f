//! Run events: what a run is ([`RunEvent`]), the topic they go to first
//! (`<prefix>.<pipeline>.runs`) and the [`RunRecorder`] that appends them.
//!
//! Invariant: every event carries the run's whole state and a `seq` that grows by one per event
//! of the run, so the projection keeps the event with the highest `seq` and a replayed or
//! duplicated event changes nothing. A run's events share its key (the run id), so they stay in
//! order in one partition.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::{MetaError, now_ms};
use crate::graph::GraphUsageCounts;
use crate::log::{EventLog, Record, TopicSpec};
use crate::process::ProcessorStats;

/// Partitions of a runs topic: runs are few, and one partition keeps them in append order.
pub const RUNS_PARTITIONS: i32 = 1;

/// How often a stream run's counts are appended while it runs.
pub const STREAM_UPDATE_INTERVAL: Duration = Duration::from_secs(10);

/// Errors kept per run (the newest).
pub const MAX_RUN_ERRORS: usize = 20;

/// `<prefix>.<pipeline>.runs`: append-only, keyed by run id.
pub fn runs_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.runs")
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// A pipeline's lifetime in one process.
    Stream,
    /// The initial snapshot of a pipeline's tables (or its resumption after a restart).
    Snapshot,
    /// One table read again while streaming (`POST /pipelines/{name}/snapshot`).
    Resnapshot,
    /// `syncbridge dlq replay`.
    DlqReplay,
    /// `POST /pipelines/{name}/cursors/reset` (not a dry run).
    CursorReset,
    /// A drift check (`syncbridge drift`, `POST /pipelines/{name}/drift`).
    DriftCheck,
    /// A drift heal (`--heal`, `POST /pipelines/{name}/drift/heal`, the vanished-list heal at start).
    DriftHeal,
    /// One tick of a `schedules:` entry, run by the one process that claimed it; `subject` is
    /// `<schedule>: <job> @ <tick, RFC 3339 UTC>`. The job also records its own run where it has
    /// one (`resnapshot`, `dlq_replay`), as when started by hand.
    Scheduled,
    /// Columns of existing lists changed to follow the mapping at start: columns added for new
    /// fields, columns no field maps any more left in place (`detail`: `added`, `unmapped`).
    ListColumns,
    /// A pipeline restarted in the same process with its re-read file (`SIGHUP`, `--watch`);
    /// `by` the trigger, `detail`: `changed`, `new_tables`.
    Reload,
    /// The source's primary moved (`source.urls`): capture resumed on the promoted instance;
    /// `subject` is `<old host:port> -> <new host:port>`, `detail.resnapshot` whether every table
    /// was read again (no synchronised slot there, see ops/docs/failover.md).
    Failover,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Stream => "stream",
            RunKind::Snapshot => "snapshot",
            RunKind::Resnapshot => "resnapshot",
            RunKind::DlqReplay => "dlq_replay",
            RunKind::CursorReset => "cursor_reset",
            RunKind::DriftCheck => "drift_check",
            RunKind::DriftHeal => "drift_heal",
            RunKind::Scheduled => "scheduled",
            RunKind::ListColumns => "list_columns",
            RunKind::Reload => "reload",
            RunKind::Failover => "failover",
        }
    }
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    /// How a run with `failure` (or none) ends.
    pub fn ended(failure: &Option<String>) -> Self {
        if failure.is_some() {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// A run's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct RunCounts {
    pub events: u64,
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    pub moves: u64,
    pub adopted: u64,
    pub skipped_unchanged: u64,
    pub coalesced: u64,
    pub dead_letters: u64,
    pub conflicts: u64,
    pub pulled: u64,
    /// `dlq_replay`: dead letters put back into their topics.
    pub replayed: u64,
    /// `cursor_reset`: events a consumer group reads again.
    pub reread: u64,
    /// `cursor_reset`: events a consumer group will never read.
    pub skipped: u64,
    /// `snapshot`, `resnapshot`: rows read and durable in the log.
    pub rows: u64,
    /// Graph requests sent (a `$batch` is one).
    pub graph_requests: u64,
    /// SharePoint resource units spent (graph-api.md §8.2).
    pub resource_units: u64,
    /// 429/503 answers from Graph.
    pub throttled: u64,
    /// `drift_check`, `drift_heal`: the differences found, per class.
    #[serde(flatten)]
    pub drift: crate::process::drift::ClassCounts,
}

impl RunCounts {
    /// A stream run's counts: the processor's, plus what the pipeline's Graph client spent.
    pub fn of_stream(stats: &ProcessorStats, graph: GraphUsageCounts) -> Self {
        Self {
            graph_requests: graph.requests,
            resource_units: graph.resource_units,
            throttled: graph.throttled,
            ..Self::from(stats)
        }
    }
}

impl From<&ProcessorStats> for RunCounts {
    fn from(s: &ProcessorStats) -> Self {
        Self {
            events: s.events,
            creates: s.creates,
            updates: s.updates,
            deletes: s.deletes,
            moves: s.moves,
            adopted: s.adopted,
            skipped_unchanged: s.skipped_ledger,
            coalesced: s.coalesced,
            dead_letters: s.dead_letters,
            conflicts: s.conflicts,
            pulled: s.pulled,
            ..Self::default()
        }
    }
}

/// One error of a run, with when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunError {
    pub at_ms: i64,
    pub message: String,
}

/// One event of a run: the run's whole state after it (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunEvent {
    pub event_id: Uuid,
    pub run_id: Uuid,
    /// 1 for the first event of the run, +1 for each later one.
    pub seq: u64,
    pub pipeline: String,
    pub kind: RunKind,
    /// What the run is about, when its kind does not say it all (the tables of a snapshot, the
    /// table of a re-snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: RunStatus,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// When this event was made (a running run's heartbeat).
    pub updated_ms: i64,
    /// `host/pid` of the process that ran it.
    pub owner: String,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    pub counts: RunCounts,
    /// The last [`MAX_RUN_ERRORS`] errors, oldest first.
    pub errors: Vec<RunError>,
    /// Who asked for it (an operator's run, e.g. `cursor_reset`: the `by` given, else the API
    /// token's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// What it was asked to do and found (e.g. a cursor reset's target and blast radius).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl RunEvent {
    /// The next event of the same run: a new event id, `seq + 1`, stamped now.
    #[must_use]
    pub fn next(&self) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            seq: self.seq + 1,
            updated_ms: now_ms(),
            ..self.clone()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        serde_json::from_slice(bytes).map_err(|e| MetaError::Decode(e.to_string()))
    }
}

/// This process, as runs name their owner.
pub fn owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{}", std::process::id())
}

/// Appends one run's events to its pipeline's runs topic.
#[derive(Debug)]
pub struct RunRecorder<L: EventLog> {
    log: Arc<L>,
    topic: String,
    event: RunEvent,
}

/// Creates a runs topic unless it exists.
pub async fn ensure_runs_topic<L: EventLog>(log: &L, topic: &str) -> Result<(), MetaError> {
    log.ensure_topic(&TopicSpec::new(topic, RUNS_PARTITIONS))
        .await?;
    Ok(())
}

/// Appends `event` to `topic`, durable on return.
pub async fn append_event<L: EventLog>(
    log: &L,
    topic: &str,
    event: &RunEvent,
) -> Result<(), MetaError> {
    let record = Record::new(event.run_id.as_bytes().to_vec(), event.encode())
        .with_timestamp_ms(event.updated_ms);
    log.append(topic, vec![record]).await?;
    Ok(())
}

impl<L: EventLog> RunRecorder<L> {
    /// Starts a run: appends its first event (`running`).
    pub async fn start(
        log: Arc<L>,
        topic: String,
        pipeline: &str,
        kind: RunKind,
    ) -> Result<Self, MetaError> {
        Self::start_about(log, topic, pipeline, kind, None).await
    }

    /// Starts a run about `subject` (see [`RunEvent::subject`]).
    pub async fn start_about(
        log: Arc<L>,
        topic: String,
        pipeline: &str,
        kind: RunKind,
        subject: Option<String>,
    ) -> Result<Self, MetaError> {
        Self::start_requested(log, topic, pipeline, kind, subject, None, None).await
    }

    /// Starts an operator's run, recording who asked (`by`) and what (`detail`).
    pub async fn start_requested(
        log: Arc<L>,
        topic: String,
        pipeline: &str,
        kind: RunKind,
        subject: Option<String>,
        by: Option<String>,
        detail: Option<serde_json::Value>,
    ) -> Result<Self, MetaError> {
        let now = now_ms();
        let event = RunEvent {
            event_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            seq: 1,
            pipeline: pipeline.to_string(),
            kind,
            subject,
            status: RunStatus::Running,
            started_ms: now,
            ended_ms: None,
            updated_ms: now,
            owner: owner(),
            reason: None,
            counts: RunCounts::default(),
            errors: Vec::new(),
            by,
            detail,
        };
        append_event(&*log, &topic, &event).await?;
        Ok(Self { log, topic, event })
    }

    pub fn run_id(&self) -> Uuid {
        self.event.run_id
    }

    /// The last event appended.
    pub fn last(&self) -> &RunEvent {
        &self.event
    }

    /// Appends the run's state with `counts` (a heartbeat while it runs).
    pub async fn update(&mut self, counts: RunCounts) -> Result<(), MetaError> {
        let mut next = self.event.next();
        next.counts = counts;
        self.append(next).await
    }

    /// Notes an error (kept with the next event).
    pub fn error(&mut self, message: String) {
        let errors = &mut self.event.errors;
        errors.push(RunError {
            at_ms: now_ms(),
            message,
        });
        if errors.len() > MAX_RUN_ERRORS {
            errors.drain(..errors.len() - MAX_RUN_ERRORS);
        }
    }

    /// Ends the run with `status` (and `reason` when it failed) and its final counts.
    pub async fn finish(
        &mut self,
        status: RunStatus,
        counts: RunCounts,
        reason: Option<String>,
    ) -> Result<(), MetaError> {
        if let Some(r) = &reason {
            self.error(r.clone());
        }
        let mut next = self.event.next();
        next.status = status;
        next.counts = counts;
        next.ended_ms = Some(next.updated_ms);
        next.reason = reason;
        self.append(next).await
    }

    async fn append(&mut self, next: RunEvent) -> Result<(), MetaError> {
        append_event(&*self.log, &self.topic, &next).await?;
        self.event = next;
        Ok(())
    }
}

/// What an operator's or a process's one-step run is about ([`record_finished`]).
#[derive(Debug, Clone, Default)]
pub struct RunAbout {
    pub subject: Option<String>,
    pub by: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// Records a run that is over when it is recorded (a step of a start or a reload): its first
/// and its final event, failed with `failure` when given. A failure to append is logged, not
/// returned: the run history must not stop a pipeline.
pub async fn record_finished<L: EventLog>(
    log: Arc<L>,
    topic: String,
    pipeline: &str,
    kind: RunKind,
    about: RunAbout,
    failure: Option<String>,
) {
    let status = RunStatus::ended(&failure);
    let recorded = async {
        let mut run = RunRecorder::start_requested(
            log,
            topic,
            pipeline,
            kind,
            about.subject,
            about.by,
            about.detail,
        )
        .await?;
        run.finish(status, RunCounts::default(), failure).await
    }
    .await;
    if let Err(e) = recorded {
        warn!(%pipeline, kind = kind.as_str(), "cannot record the run: {e}");
    }
}

/// A stream run's heartbeat: appends the run's counts (read by `counts`) every
/// [`STREAM_UPDATE_INTERVAL`] until `stop`, then hands the recorder back for the final event. A
/// failed append is logged and retried at the next tick: the run history must not stop the
/// pipeline.
pub async fn stream_heartbeat<L: EventLog>(
    mut recorder: RunRecorder<L>,
    counts: impl Fn() -> RunCounts + Send,
    stop: CancellationToken,
    interval: Duration,
) -> RunRecorder<L> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return recorder,
            _ = tick.tick() => {}
        }
        let counts = counts();
        // A heartbeat also proves the owner is alive, so it is appended even without new counts.
        if let Err(e) = recorder.update(counts).await {
            warn!(pipeline = %recorder.event.pipeline, run = %recorder.event.run_id,
                "cannot append the run's counts, retrying at the next tick: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_next_advances_seq() {
        let e = RunEvent {
            event_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            seq: 3,
            pipeline: "p".into(),
            kind: RunKind::Stream,
            subject: None,
            status: RunStatus::Running,
            started_ms: 1,
            ended_ms: None,
            updated_ms: 2,
            owner: "h/1".into(),
            reason: None,
            counts: RunCounts {
                creates: 4,
                ..RunCounts::default()
            },
            errors: vec![],
            by: None,
            detail: None,
        };
        assert_eq!(RunEvent::decode(&e.encode()).unwrap(), e);
        let asked = RunEvent {
            kind: RunKind::CursorReset,
            by: Some("ann".into()),
            detail: Some(serde_json::json!({"group": "sync"})),
            ..e.clone()
        };
        assert_eq!(RunEvent::decode(&asked.encode()).unwrap(), asked);
        let n = e.next();
        assert_eq!((n.seq, n.run_id), (4, e.run_id));
        assert_ne!(n.event_id, e.event_id);
        assert!(RunEvent::decode(b"{").is_err());
    }
}
