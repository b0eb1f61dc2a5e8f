//! The pipelines as an operator sees them, and their dead letters.
//!
//! - `GET /pipelines`, `GET /pipelines/{name}`: each running pipeline's stages (ready or not, and
//!   why), pause, the stream run's counts (with Graph requests, RU and 429s), the processor's lag
//!   (events in its table topics it has not committed yet, per partition), throughput and RU
//!   budget use over the last minute.
//! - `GET /pipelines/{name}/dlq?limit=`: the dead letters not yet replayed, oldest first.
//! - `POST /pipelines/{name}/dlq/replay`: appends their original events back to their topics
//!   through the running process's log, so it works while the pipeline runs on the embedded log
//!   (which one process holds); recorded as a `dlq_replay` run. One replay at a time per pipeline.
//!
//! Throughput is measured between readings: each `GET` keeps a sample (time, events, RU) and
//! reports the rate over the samples of the last [`RATE_WINDOW`] (none until two samples at
//! least a second apart exist), so a console polling every few seconds gets a rolling minute.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use super::meta::{RunCounts, RunKind, RunRecorder, RunStatus, runs_topic};
use super::problem::{ApiError, Problem};
use super::{PauseRegistry, PipelineScoped, Readiness, Registry, running};
use crate::graph::GraphUsage;
use crate::log::{AnyLog, EventLog};
use crate::process::{ProcessorStats, dlq};

/// The span throughput and RU use are averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Dead letters one `GET .../dlq` answers by default, and at most.
const DEFAULT_DLQ_PAGE: usize = 100;
const MAX_DLQ_PAGE: usize = 1000;

/// What the control plane reads and does on one running pipeline.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    pub name: String,
    pub log: Arc<AnyLog>,
    /// Topic prefix of the pipeline's log.
    pub prefix: String,
    /// The table topics the processor consumes.
    pub inputs: Vec<String>,
    /// The processor's consumer group.
    pub group: String,
    pub stats: watch::Receiver<ProcessorStats>,
    pub usage: Arc<GraphUsage>,
    /// The tenant's RU budget per minute (graph.ru_per_minute).
    pub ru_per_minute: u32,
    pub started_ms: i64,
    samples: Arc<Mutex<VecDeque<Sample>>>,
    replaying: Arc<tokio::sync::Mutex<()>>,
}

impl PipelineScoped for PipelineHandle {
    fn pipeline(&self) -> &str {
        &self.name
    }
}

/// The running pipelines.
pub type PipelineRegistry = Registry<PipelineHandle>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    events: u64,
    resource_units: u64,
}

impl PipelineHandle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        log: Arc<AnyLog>,
        prefix: &str,
        inputs: Vec<String>,
        group: String,
        stats: watch::Receiver<ProcessorStats>,
        usage: Arc<GraphUsage>,
        ru_per_minute: u32,
    ) -> Self {
        Self {
            name: name.to_string(),
            log,
            prefix: prefix.to_string(),
            inputs,
            group,
            stats,
            usage,
            ru_per_minute,
            started_ms: chrono::Utc::now().timestamp_millis(),
            samples: Arc::default(),
            replaying: Arc::default(),
        }
    }

    fn counts(&self) -> RunCounts {
        RunCounts::of_stream(&self.stats.borrow(), self.usage.counts())
    }

    /// Takes a sample now and answers the rates over [`RATE_WINDOW`].
    fn rates(&self, counts: &RunCounts) -> Rates {
        let now = Sample {
            at: Instant::now(),
            events: counts.events,
            resource_units: counts.resource_units,
        };
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back(now);
        while samples.len() > 2 && now.at.duration_since(samples[0].at) > RATE_WINDOW {
            samples.pop_front();
        }
        rates_between(samples[0], now)
    }
}

/// How often [`export_lag`] reads the processor's lag.
pub const LAG_EXPORT_INTERVAL: Duration = Duration::from_secs(15);

/// Sets `syncbridge_consumer_lag_events{group="sync"}` from the log every
/// [`LAG_EXPORT_INTERVAL`] until `stop` (a failed read keeps the last value and is logged once
/// per failure streak: the lag gauge must not flood the log when the broker is away).
pub async fn export_lag(h: PipelineHandle, stop: tokio_util::sync::CancellationToken) {
    let gauge = metrics::gauge!(crate::telemetry::metrics::CONSUMER_LAG_EVENTS,
        "pipeline" => h.name.clone(), "group" => "sync");
    let mut failing = false;
    loop {
        match lag(&h).await {
            Ok(l) => {
                gauge.set(l.events as f64);
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(pipeline = %h.name, "cannot read the processor's lag: {e}");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LAG_EXPORT_INTERVAL) => {}
        }
    }
}

/// Rates from `first` to `last`, when they are at least a second apart.
fn rates_between(first: Sample, last: Sample) -> Rates {
    let secs = last.at.duration_since(first.at).as_secs_f64();
    if secs < 1.0 {
        return Rates::default();
    }
    let events = last.events.saturating_sub(first.events) as f64;
    let ru = last.resource_units.saturating_sub(first.resource_units) as f64;
    Rates {
        window_seconds: Some(secs),
        events_per_second: Some(events / secs),
        resource_units_per_minute: Some(ru * 60.0 / secs),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct Rates {
    /// The span the rates cover (up to 60 s); absent until two readings a second apart.
    pub window_seconds: Option<f64>,
    pub events_per_second: Option<f64>,
    pub resource_units_per_minute: Option<f64>,
}

/// How far the processor is behind its table topics.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Lag {
    /// Events written to the table topics and not yet committed by the processor.
    pub events: i64,
    pub partitions: Vec<PartitionLag>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The processor group's next offset (0 when it committed none).
    pub committed: i64,
    /// The partition's end (next offset to be written).
    pub end: i64,
    pub lag: i64,
}

/// The RU budget and what the pipeline spends of it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Budget {
    /// graph.ru_per_minute (shared by the pipelines of one tenant).
    pub ru_per_minute: u32,
    /// RU this pipeline spent per minute over the rate window.
    pub used_per_minute: Option<f64>,
    /// `used_per_minute / ru_per_minute`.
    pub use_ratio: Option<f64>,
}

/// One pipeline's status (`GET /pipelines/{name}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PipelineStatus {
    pub name: String,
    /// `embedded` or `kafka`.
    pub log: String,
    /// Every stage of the pipeline is ready.
    pub ready: bool,
    /// `log`, `capture`, `process`: ready or not.
    pub stages: BTreeMap<String, bool>,
    /// Why a stage is not ready, when it said so (e.g. a pause).
    pub reasons: BTreeMap<String, String>,
    pub paused: bool,
    pub started_ms: i64,
    /// Input partitions this process's push processor owns: all of them with the embedded
    /// log; with Kafka its share of the consumer group (several processes of one pipeline),
    /// 0 for a member the group gave nothing.
    pub assigned_partitions: u64,
    /// The stream run's counts so far.
    pub counts: RunCounts,
    /// `None` when the log could not be read (`lag_error` says why).
    pub lag: Option<Lag>,
    pub lag_error: Option<String>,
    pub throughput: Rates,
    pub budget: Budget,
}

/// What the pipeline routes read.
#[derive(Clone)]
struct PipelinesState {
    pipelines: PipelineRegistry,
    readiness: Readiness,
    pauses: PauseRegistry,
}

/// The routes of this module, with their state: merge them into the control router.
pub fn routes(pipelines: PipelineRegistry, readiness: Readiness, pauses: PauseRegistry) -> Router {
    Router::new()
        .route("/pipelines", get(list))
        .route("/pipelines/{name}", get(one))
        .route("/pipelines/{name}/dlq", get(dlq_list))
        .route("/pipelines/{name}/dlq/replay", post(dlq_replay))
        .with_state(PipelinesState {
            pipelines,
            readiness,
            pauses,
        })
}

async fn lag(h: &PipelineHandle) -> Result<Lag, String> {
    let committed = h
        .log
        .committed(&h.group, &h.inputs)
        .await
        .map_err(|e| e.to_string())?;
    let mut partitions = Vec::new();
    for topic in &h.inputs {
        let ends = h.log.end_offsets(topic).await.map_err(|e| e.to_string())?;
        for (p, end) in ends.into_iter().enumerate() {
            let partition = i32::try_from(p).unwrap_or(i32::MAX);
            let committed = committed
                .get(&(topic.clone(), partition))
                .copied()
                .unwrap_or(0);
            partitions.push(PartitionLag {
                topic: topic.clone(),
                partition,
                committed,
                end,
                lag: (end - committed).max(0),
            });
        }
    }
    Ok(Lag {
        events: partitions.iter().map(|p| p.lag).sum(),
        partitions,
    })
}

async fn status(state: &PipelinesState, h: &PipelineHandle) -> PipelineStatus {
    let prefix = format!("{}/", h.name);
    let stages: BTreeMap<String, bool> = state
        .readiness
        .snapshot()
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v)))
        .collect();
    let reasons = state
        .readiness
        .reasons()
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), v)))
        .collect();
    let counts = h.counts();
    let throughput = h.rates(&counts);
    let (lag, lag_error) = match lag(h).await {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(e)),
    };
    let used = throughput.resource_units_per_minute;
    PipelineStatus {
        name: h.name.clone(),
        log: match &*h.log {
            AnyLog::Embedded(_) => "embedded",
            AnyLog::Kafka(_) => "kafka",
        }
        .into(),
        ready: !stages.is_empty() && stages.values().all(|r| *r),
        stages,
        reasons,
        paused: state
            .pauses
            .get(&h.name)
            .is_some_and(|p| p.paused().is_some()),
        started_ms: h.started_ms,
        assigned_partitions: h.stats.borrow().assigned_partitions,
        counts,
        lag,
        lag_error,
        throughput,
        budget: Budget {
            ru_per_minute: h.ru_per_minute,
            used_per_minute: used,
            use_ratio: used.map(|u| u / f64::from(h.ru_per_minute.max(1))),
        },
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineList {
    pub pipelines: Vec<PipelineStatus>,
}

#[utoipa::path(get, path = "/pipelines", tag = "pipelines",
    responses((status = 200, description = "Every pipeline this process runs", body = PipelineList)))]
async fn list(State(state): State<PipelinesState>) -> axum::Json<PipelineList> {
    let mut pipelines = Vec::new();
    for h in state.pipelines.all() {
        pipelines.push(status(&state, &h).await);
    }
    axum::Json(PipelineList { pipelines })
}

#[utoipa::path(get, path = "/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The pipeline's status", body = PipelineStatus),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
    ))]
async fn one(
    State(state): State<PipelinesState>,
    Path(name): Path<String>,
) -> Result<axum::Json<PipelineStatus>, ApiError> {
    let h = running(state.pipelines.get(&name), &name)?;
    Ok(axum::Json(status(&state, &h).await))
}

/// One dead letter with its DLQ offset.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DlqEntry {
    pub offset: i64,
    /// The dead letter: table, key, kind, reason, list, Graph request ids, source position.
    #[schema(value_type = Object)]
    pub dead_letter: dlq::DeadLetter,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DlqPage {
    /// Not yet replayed, oldest first, at most `limit`.
    pub entries: Vec<DlqEntry>,
    /// How many are pending in all.
    pub pending: usize,
}

fn log_unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "log_unavailable",
        format!("cannot read the log: {e}"),
    )
}

#[utoipa::path(get, path = "/pipelines/{name}/dlq", tag = "pipelines",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("limit" = Option<usize>, Query, description = "At most this many entries, 1–1000 (default 100)"),
    ),
    responses(
        (status = 200, description = "Dead letters not yet replayed", body = DlqPage),
        (status = 400, description = "Bad `limit`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log cannot be read", body = Problem, content_type = "application/problem+json"),
    ))]
async fn dlq_list(
    State(state): State<PipelinesState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<DlqPage>, ApiError> {
    let h = running(state.pipelines.get(&name), &name)?;
    if let Some(key) = q.keys().find(|k| k.as_str() != "limit") {
        return Err(ApiError::bad_param(
            key,
            format!("unknown query parameter `{key}` (known: limit)"),
        ));
    }
    let limit = ApiError::page_limit(q.get("limit"), DEFAULT_DLQ_PAGE, MAX_DLQ_PAGE)?;
    let entries = dlq::pending(&*h.log, &h.prefix, &h.name)
        .await
        .map_err(log_unavailable)?;
    let pending = entries.len();
    let entries = entries
        .into_iter()
        .take(limit)
        .map(|(offset, dead_letter)| DlqEntry {
            offset,
            dead_letter,
        })
        .collect();
    Ok(axum::Json(DlqPage { entries, pending }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DlqReplayed {
    /// Dead letters whose events were appended back to their topics.
    pub replayed: usize,
    /// The `dlq_replay` run that records it.
    pub run_id: uuid::Uuid,
}

#[utoipa::path(post, path = "/pipelines/{name}/dlq/replay", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Replayed: the processor handles the events next", body = DlqReplayed),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A replay of this pipeline is in progress", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log cannot be read or written", body = Problem, content_type = "application/problem+json"),
    ))]
async fn dlq_replay(
    State(state): State<PipelinesState>,
    Path(name): Path<String>,
) -> Result<axum::Json<DlqReplayed>, ApiError> {
    let h = running(state.pipelines.get(&name), &name)?;
    match replay_dead_letters(&h).await {
        Ok(done) => Ok(axum::Json(done)),
        Err(ReplayError::InProgress) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "replay_in_progress",
            format!("a DLQ replay of {name:?} is in progress"),
        )),
        Err(ReplayError::Log(e)) => Err(log_unavailable(e)),
    }
}

/// Why a DLQ replay did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("a DLQ replay of this pipeline is in progress")]
    InProgress,
    #[error("cannot read or write the log: {0}")]
    Log(String),
}

/// Appends the pipeline's pending dead letters back to their topics, recorded as a `dlq_replay`
/// run; one at a time per pipeline. Shared by the API and the scheduler's `dlq_replay` job.
pub async fn replay_dead_letters(h: &PipelineHandle) -> Result<DlqReplayed, ReplayError> {
    let Ok(_one) = h.replaying.try_lock() else {
        return Err(ReplayError::InProgress);
    };
    let log_error = |e: &dyn std::fmt::Display| ReplayError::Log(e.to_string());
    let topic = runs_topic(&h.prefix, &h.name);
    let mut run = RunRecorder::start(h.log.clone(), topic, &h.name, RunKind::DlqReplay)
        .await
        .map_err(|e| log_error(&e))?;
    match dlq::replay(&*h.log, &h.prefix, &h.name).await {
        Ok(n) => {
            let counts = RunCounts {
                replayed: n as u64,
                ..RunCounts::default()
            };
            run.finish(RunStatus::Succeeded, counts, None)
                .await
                .map_err(|e| log_error(&e))?;
            Ok(DlqReplayed {
                replayed: n,
                run_id: run.run_id(),
            })
        }
        Err(e) => {
            let reason = Some(e.to_string());
            // The replay's own error is the answer; a failure to record it is only logged.
            if let Err(rec) = run
                .finish(RunStatus::Failed, RunCounts::default(), reason)
                .await
            {
                tracing::warn!(pipeline = %h.name, "cannot record the failed DLQ replay run: {rec}");
            }
            Err(log_error(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_a_second_and_are_per_window() {
        let t0 = Instant::now();
        let a = Sample {
            at: t0,
            events: 10,
            resource_units: 100,
        };
        let soon = Sample {
            at: t0 + Duration::from_millis(500),
            ..a
        };
        assert_eq!(rates_between(a, soon), Rates::default());
        let later = Sample {
            at: t0 + Duration::from_secs(4),
            events: 30,
            resource_units: 140,
        };
        let r = rates_between(a, later);
        assert_eq!(r.window_seconds, Some(4.0));
        assert_eq!(r.events_per_second, Some(5.0));
        assert_eq!(r.resource_units_per_minute, Some(600.0));
    }
}
