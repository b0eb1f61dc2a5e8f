//! Cursors: where each input of a running pipeline stands, and moving one (issue 11 §4).
//!
//! `GET /pipelines/{name}/cursors` answers the replication slot (`confirmed_flush_lsn`,
//! `restart_lsn`, lag in bytes behind `pg_current_wal_lsn()`, whether a reader holds it), every
//! consumer group of the pipeline with its committed offset, start and end offset and lag per
//! partition (`sync`: the push processor; `return`: the return path; `dlq-replay`: `syncbridge
//! dlq replay`; `projector`: the run projector, whose position lives in the meta-store), and every
//! list's delta link (whether one is stored, its phase and age). A part that cannot be read (the
//! database is down) carries an `error` instead; the rest is still answered.
//!
//! `POST /pipelines/{name}/cursors/reset[?dry_run=true]` with a JSON body moves one cursor:
//! - `{"slot": "now" | "<LSN>"}`: the slot forward (never backwards: the WAL before
//!   `confirmed_flush_lsn` may be gone; re-snapshot a table to read older rows again).
//! - `{"group": "sync" | "return" | "dlq-replay" | "<group name>", "to": "earliest" | "latest"}`,
//!   or `"offset": n`, `"shift_by": ±n` or `"time": "<RFC 3339>"` (the first offset at or after
//!   it) instead of `to`; optionally `"topic"` and `"partition"` to move only those.
//! - `{"list": "<display name or id>", "to": "none"}`: drop the delta link; the list is
//!   enumerated in full (a resync with reason `operator`).
//!
//! `dry_run` (query or body) answers the blast radius and changes nothing (see [`plan`]): events
//! re-read or skipped per partition and in total, WAL bytes skipped, items enumerated again, the
//! RU that costs and the minutes at the configured `graph.ru_per_minute`. A real reset answers the
//! same figures measured at the moment it moved the cursor, and is a run of kind `cursor_reset`
//! (`by`: the body's `by`, else the API token's name; `detail`: target and blast radius).
//!
//! # Which resets stop what
//! - `sync` and `return` belong to the running push processor: the reset stops it as a shutdown
//!   would (it flushes and commits), moves the offsets, and restarts it from them
//!   ([`crate::process::hold`]), so a reset is safe on a running pipeline. A paused pipeline
//!   stays paused (resume it after).
//! - `dlq-replay` is moved at once; 409 while a replay runs (the log reports the group busy).
//! - the slot is held by the running capture, which streams from it all the time: a real slot
//!   reset answers 409 naming stage `capture` whenever the slot is active (PostgreSQL cannot
//!   advance a slot a reader holds), so it succeeds only while capture is not connected (e.g.
//!   reconnecting). The dry run always works.
//! - a list's delta link belongs to its delta poller, which takes the reset between two polls and
//!   answers once the enumeration's start is durable.
//! - the projector's position is in the meta-store (it is a projection): not resettable here;
//!   drop the `syncbridge_meta` schema to rebuild it.
//!
//! One reset at a time per pipeline (409 `reset_in_progress`). Bad input is a 400 naming the
//! field, a target that does not exist (unknown group, list, topic, partition) too; nothing
//! changes on any error answered before the cursor moved.
//!
//! [`ledger`]: `GET /pipelines/{name}/lists/{list}/ledger`, the ledger browser per list (read from
//! the same changelog the dry runs count items in).

pub mod ledger;
pub mod plan;
pub mod text;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::auth::Caller;
use super::meta::{MetaDb, RunCounts, RunKind, RunRecorder, RunStatus};
use super::problem::{ApiError, Problem};
use crate::log::{
    AnyLog, CancellationToken, CommittedOffsets, ConsumedRecord, EventLog, LogConsumer, LogError,
};
use crate::process::hold::HoldHandle;
use crate::pull::poller::{CursorPhase, ResetRequest as ListReset, StoredCursor};
use plan::{GroupTo, PartitionState, SlotTo, Target};

/// How long reading a topic to its end may take (the ledger changelog of a large table).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a moved group may still look busy: a stopped Kafka member leaves the group on a
/// detached thread, which can take a few seconds.
const GROUP_FREE_WAIT: Duration = Duration::from_secs(30);
/// How long a delta poller may take to reach its next pause between polls (a round in flight).
const LIST_RESET_WAIT: Duration = Duration::from_secs(120);

/// A consumer group of a pipeline.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// `sync`, `return` or `dlq-replay`.
    pub role: &'static str,
    pub name: String,
    pub topics: Vec<String>,
    /// The stage whose consumer uses the group and is stopped for a reset (`process`), if any.
    pub stage: Option<&'static str>,
}

/// A list of a pipeline.
#[derive(Debug, Clone)]
pub struct ListSpec {
    pub name: String,
    pub id: String,
    /// Its delta poller's reset channel; `None` when the list does not pull.
    pub reset: Option<mpsc::Sender<ListReset>>,
}

/// Everything the cursor routes need of one running pipeline.
pub struct CursorSpec {
    pub pipeline: String,
    pub log: Arc<AnyLog>,
    /// `source.url` (with its password: never logged or answered).
    pub source_url: String,
    pub slot: String,
    pub groups: Vec<GroupSpec>,
    pub lists: Vec<ListSpec>,
    pub hold: HoldHandle,
    pub ru_per_minute: u32,
    /// Share of the budget writes may use (the rest is the delta pollers' reserve).
    pub writer_share: f64,
    pub runs_topic: String,
    pub ledger_topic: String,
    pub cursors_topic: String,
    /// The run projector's store and the topic whose positions it keeps.
    pub meta: Option<Arc<MetaDb>>,
}

impl std::fmt::Debug for CursorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the source URL: it may hold a password.
        f.debug_struct("CursorSpec")
            .field("pipeline", &self.pipeline)
            .field("slot", &self.slot)
            .field("groups", &self.groups)
            .field("lists", &self.lists)
            .finish_non_exhaustive()
    }
}

/// A running pipeline's cursors (cheap to clone).
#[derive(Clone)]
pub struct CursorHandle {
    spec: Arc<CursorSpec>,
    /// Held while a real reset runs: one at a time.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for CursorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.spec.fmt(f)
    }
}

impl CursorHandle {
    pub fn new(spec: CursorSpec) -> Self {
        Self {
            spec: Arc::new(spec),
            busy: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// The cursor handles of the running pipelines, by pipeline name.
#[derive(Debug, Clone, Default)]
pub struct CursorRegistry {
    pipelines: Arc<Mutex<BTreeMap<String, CursorHandle>>>,
}

impl CursorRegistry {
    pub fn register(&self, handle: CursorHandle) {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.spec.pipeline.clone(), handle);
    }

    fn get(&self, pipeline: &str) -> Result<CursorHandle, ApiError> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
            .ok_or_else(|| ApiError::unknown_pipeline(pipeline))
    }
}

/// The cursor routes with their own state: merge them into the control router.
pub fn routes(registry: CursorRegistry) -> Router {
    Router::new()
        .route("/pipelines/{name}/cursors", get(cursors))
        .route("/pipelines/{name}/cursors/reset", post(reset))
        .route("/pipelines/{name}/lists/{list}/ledger", get(ledger::ledger))
        .with_state(registry)
}

/// Documents the reset body; the handler reads it field by field (see [`plan::parse_request`]).
/// Give exactly one of `slot`, `group`, `list`.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ResetBody {
    /// `now` or an LSN such as `0/16B3748` (forward only).
    slot: Option<String>,
    /// `sync`, `return`, `dlq-replay` or a full group name.
    group: Option<String>,
    /// A list's display name or id (its delta link goes to none).
    list: Option<String>,
    /// Group: `earliest` or `latest`; list: `none`.
    to: Option<String>,
    /// Group: this offset in every selected partition.
    offset: Option<i64>,
    /// Group: each selected partition's position moved by this many (negative: back).
    shift_by: Option<i64>,
    /// Group: the first offset at or after this RFC 3339 time.
    time: Option<String>,
    /// Group: only this topic.
    topic: Option<String>,
    /// Group: only this partition.
    partition: Option<i32>,
    /// Answer the blast radius only.
    dry_run: Option<bool>,
    /// Who asks (recorded with the run; default: the API token's name).
    by: Option<String>,
}

#[utoipa::path(get, path = "/pipelines/{name}/cursors", tag = "cursors",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The slot, every consumer group per partition, every list's delta link", body = serde_json::Value),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn cursors(
    State(registry): State<CursorRegistry>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let h = registry.get(&name)?;
    let s = &h.spec;
    let (slot, groups, lists) = tokio::join!(slot_view(s), groups_view(s), lists_view(s));
    Ok(axum::Json(json!({
        "pipeline": s.pipeline,
        "slot": slot,
        "groups": groups,
        "lists": lists,
    }))
    .into_response())
}

#[utoipa::path(post, path = "/pipelines/{name}/cursors/reset", tag = "cursors",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("dry_run" = Option<bool>, Query, description = "Answer the blast radius only; change nothing"),
    ),
    request_body(content = ResetBody, description = "The cursor to move and where"),
    responses(
        (status = 200, description = "The blast radius (a real reset: as measured when the cursor moved, with `run_id`)", body = serde_json::Value),
        (status = 400, description = "A bad or unknown target; `invalid-params` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The stage owning the cursor holds it (the detail names it), or another reset runs", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The log, the source database or the poller did not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn reset(
    State(registry): State<CursorRegistry>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    caller: Option<Extension<Caller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let h = registry.get(&name)?;
    if let Some(k) = query.keys().find(|k| k.as_str() != "dry_run") {
        return Err(ApiError::bad_param(k, "unknown query parameter"));
    }
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_param("body", format!("not JSON: {e}")))?;
    let req = plan::parse_request(&body, query.get("dry_run").map(String::as_str))?;
    let by = req
        .by
        .clone()
        .or_else(|| caller.map(|Extension(c)| c.name))
        .or_else(|| Some("anonymous (open API)".into()));
    if req.dry_run {
        return execute(&h, req.target, true, by).await;
    }
    let busy = h.busy.clone().try_lock_owned().map_err(|_| {
        ApiError::new(
            StatusCode::CONFLICT,
            "reset_in_progress",
            format!("another cursor reset of pipeline {name:?} is running; try again after it"),
        )
    })?;
    // Its own task: a client that hangs up must not leave a processor stopped or a run open.
    let task = tokio::spawn(async move {
        let _busy = busy;
        execute(&h, req.target, false, by).await
    });
    task.await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the reset task ended abnormally: {e}"),
        )
    })?
}

async fn execute(
    h: &CursorHandle,
    target: Target,
    dry_run: bool,
    by: Option<String>,
) -> Result<Response, ApiError> {
    let s = &h.spec;
    let report = match target {
        Target::Group {
            group,
            to,
            topic,
            partition,
        } => {
            let g = find_group(s, &group)?;
            reset_group(s, g, &to, topic.as_deref(), partition, dry_run, by).await?
        }
        Target::Slot(to) => reset_slot(s, to, dry_run, by).await?,
        Target::List(list) => reset_list(s, &list, dry_run, by).await?,
    };
    Ok(axum::Json(report).into_response())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!("{what}: {e}"),
    )
}

fn stage_running(stage: &str, detail: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "stage_running",
        format!("stage {stage}: {detail}"),
    )
}

fn find_group<'a>(s: &'a CursorSpec, group: &str) -> Result<&'a GroupSpec, ApiError> {
    if group == "projector" || group.contains("meta-projector") {
        return Err(ApiError::bad_param(
            "group",
            "the run projector's position lives in the meta-store (a projection): drop the \
             syncbridge_meta schema to rebuild it instead",
        ));
    }
    s.groups
        .iter()
        .find(|g| g.role == group || g.name == group)
        .ok_or_else(|| {
            let known: Vec<&str> = s.groups.iter().map(|g| g.role).collect();
            ApiError::bad_param(
                "group",
                format!(
                    "not a consumer group of this pipeline (one of {}, or its full name)",
                    known.join(", ")
                ),
            )
        })
}

/// Every partition of `g`'s topics (only `topic` / `partition` when given) with its positions.
async fn partition_states(
    s: &CursorSpec,
    g: &GroupSpec,
    topic: Option<&str>,
    partition: Option<i32>,
) -> Result<Vec<PartitionState>, ApiError> {
    if let Some(t) = topic
        && !g.topics.iter().any(|x| x == t)
    {
        return Err(ApiError::bad_param(
            "topic",
            format!("group {} reads {}", g.name, g.topics.join(", ")),
        ));
    }
    let committed = s
        .log
        .committed(&g.name, &g.topics)
        .await
        .map_err(|e| unavailable("reading committed offsets", e))?;
    let mut out = Vec::new();
    for t in g.topics.iter().filter(|t| topic.is_none_or(|x| x == *t)) {
        let log_err = |e: LogError| unavailable(&format!("reading {t}"), e);
        let starts = s.log.start_offsets(t).await.map_err(log_err)?;
        let ends = s.log.end_offsets(t).await.map_err(log_err)?;
        for (p, (start, end)) in starts.into_iter().zip(ends).enumerate() {
            let p = i32::try_from(p).unwrap_or(i32::MAX);
            if partition.is_some_and(|x| x != p) {
                continue;
            }
            out.push(PartitionState {
                topic: t.clone(),
                partition: p,
                committed: committed.get(&(t.clone(), p)).copied(),
                start,
                end,
            });
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad_param(
            "partition",
            "no partition of the group's topics has that number",
        ));
    }
    Ok(out)
}

/// The moves of a group reset, looking a time target's offsets up first.
async fn group_moves(
    s: &CursorSpec,
    states: &[PartitionState],
    to: &GroupTo,
) -> Result<Vec<plan::PartitionMove>, ApiError> {
    let mut by_time = BTreeMap::new();
    if let GroupTo::Time(ms) = to {
        let mut topics: Vec<&str> = states.iter().map(|x| x.topic.as_str()).collect();
        topics.dedup();
        for t in topics {
            let offsets = s
                .log
                .offsets_for_time(t, *ms)
                .await
                .map_err(|e| unavailable(&format!("looking up offsets by time in {t}"), e))?;
            for (p, o) in offsets.into_iter().enumerate() {
                by_time.insert((t.to_string(), i32::try_from(p).unwrap_or(i32::MAX)), o);
            }
        }
    }
    plan::plan_group(states, to, &by_time)
}

/// The report of a group move (dry run or real).
fn group_report(
    s: &CursorSpec,
    g: &GroupSpec,
    moves: &[plan::PartitionMove],
    dry_run: bool,
) -> Value {
    let (reread, skipped) = plan::totals(moves);
    // The return path applies list changes to PostgreSQL: no Graph writes.
    let ru = if g.role == "return" {
        0
    } else {
        reread * plan::WRITE_RU
    };
    json!({
        "pipeline": s.pipeline,
        "dry_run": dry_run,
        "target": { "kind": "group", "role": g.role, "group": g.name },
        "stage": g.stage,
        "partitions": moves,
        "events_reread": reread,
        "events_skipped": skipped,
        "ru": ru,
        "ru_is_upper_bound": true,
        "ru_per_minute": s.ru_per_minute,
        "minutes": plan::minutes(ru, s.ru_per_minute, s.writer_share),
        "note": "re-read events whose rows the ledger already holds cost no write (same hash); \
                 `ru` counts one write per re-read event; skipped events never reach the list",
    })
}

#[allow(clippy::too_many_arguments)]
async fn reset_group(
    s: &CursorSpec,
    g: &GroupSpec,
    to: &GroupTo,
    topic: Option<&str>,
    partition: Option<i32>,
    dry_run: bool,
    by: Option<String>,
) -> Result<Value, ApiError> {
    let states = partition_states(s, g, topic, partition).await?;
    let moves = group_moves(s, &states, to).await?;
    if dry_run {
        return Ok(group_report(s, g, &moves, true));
    }
    // Stop the stage that consumes with the group: it flushes and commits, then nothing moves
    // the positions but us until `_held` is dropped (the processor restarts from them).
    let _held = match g.stage {
        Some(stage) => Some(
            s.hold
                .hold()
                .await
                .map_err(|e| stage_running(stage, e.to_string()))?,
        ),
        None => None,
    };
    // Measured again now that the processor has committed what it had read.
    let states = partition_states(s, g, topic, partition).await?;
    let moves = group_moves(s, &states, to).await?;
    let report = group_report(s, g, &moves, false);
    let mut run = start_run(s, by, &report).await?;
    let positions: CommittedOffsets = moves
        .iter()
        .map(|m| ((m.topic.clone(), m.partition), m.to))
        .collect();
    let moved = set_committed_when_free(s, g, &positions).await;
    let (reread, skipped) = plan::totals(&moves);
    let counts = RunCounts {
        reread,
        skipped,
        ..RunCounts::default()
    };
    finish_run(&mut run, counts, moved.as_ref().err()).await;
    moved?;
    Ok(with_run(report, &run))
}

/// Stores the positions, waiting out a group that still looks busy for a moment (a stopped
/// Kafka member leaving it); 409 when it stays busy.
async fn set_committed_when_free(
    s: &CursorSpec,
    g: &GroupSpec,
    positions: &CommittedOffsets,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + GROUP_FREE_WAIT;
    loop {
        match s.log.set_committed(&g.name, positions).await {
            Ok(()) => return Ok(()),
            Err(LogError::GroupBusy(_))
                if tokio::time::Instant::now() < deadline && g.stage.is_some() =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(LogError::GroupBusy(_)) => {
                let stage = g.stage.unwrap_or(if g.role == "dlq-replay" {
                    "dlq replay"
                } else {
                    "a consumer"
                });
                return Err(stage_running(
                    stage,
                    format!(
                        "consumer group {} has a live consumer; try again when it ends",
                        g.name
                    ),
                ));
            }
            Err(e) => return Err(unavailable("storing the offsets", e)),
        }
    }
}

async fn start_run(
    s: &CursorSpec,
    by: Option<String>,
    detail: &Value,
) -> Result<RunRecorder<AnyLog>, ApiError> {
    // The run is about the cursor: `group sync`, `slot sb_p`, `list Tasks`.
    let t = &detail["target"];
    let name = ["role", "slot", "list"]
        .iter()
        .find_map(|k| t[*k].as_str())
        .unwrap_or_default();
    let subject = format!("{} {name}", t["kind"].as_str().unwrap_or("cursor"));
    RunRecorder::start_requested(
        s.log.clone(),
        s.runs_topic.clone(),
        &s.pipeline,
        RunKind::CursorReset,
        Some(subject),
        by,
        Some(detail.clone()),
    )
    .await
    .map_err(|e| unavailable("recording the run", e))
}

/// Ends the run; a failure to record it is logged (the cursor moved or not regardless).
async fn finish_run(run: &mut RunRecorder<AnyLog>, counts: RunCounts, failed: Option<&ApiError>) {
    let (status, reason) = match failed {
        None => (RunStatus::Succeeded, None),
        Some(e) => (RunStatus::Failed, Some(e.detail.clone())),
    };
    if let Err(e) = run.finish(status, counts, reason).await {
        tracing::warn!(run = %run.run_id(), "cannot record the end of the cursor reset (the next start marks it failed): {e}");
    }
}

fn with_run(mut report: Value, run: &RunRecorder<AnyLog>) -> Value {
    report["run_id"] = json!(run.run_id());
    report
}

/// The slot's row: (confirmed_flush_lsn, restart_lsn, current WAL, active, active_pid).
struct SlotRow {
    confirmed: Option<u64>,
    restart: Option<u64>,
    current: u64,
    active: bool,
    pid: Option<i32>,
}

async fn connect_source(s: &CursorSpec) -> Result<tokio_postgres::Client, ApiError> {
    let (client, conn) = crate::pg::connect(&s.source_url)
        .await
        .map_err(|e| unavailable("connecting to the source database", e))?;
    tokio::spawn(conn);
    Ok(client)
}

async fn slot_row(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotRow>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text, pg_current_wal_lsn()::text, \
             active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| {
        let lsn = |i: usize| {
            r.get::<_, Option<String>>(i)
                .and_then(|l| plan::parse_lsn(&l))
        };
        SlotRow {
            confirmed: lsn(0),
            restart: lsn(1),
            current: lsn(2).unwrap_or(0),
            active: r.get(3),
            pid: r.get(4),
        }
    }))
}

async fn slot_view(s: &CursorSpec) -> Value {
    let row = async {
        let client = connect_source(s).await?;
        slot_row(&client, &s.slot)
            .await
            .map_err(|e| unavailable("reading pg_replication_slots", e))
    }
    .await;
    match row {
        Err(e) => json!({ "name": s.slot, "error": e.detail }),
        Ok(None) => json!({ "name": s.slot, "exists": false }),
        Ok(Some(r)) => json!({
            "name": s.slot,
            "exists": true,
            "confirmed_flush_lsn": r.confirmed.map(plan::format_lsn),
            "restart_lsn": r.restart.map(plan::format_lsn),
            "current_wal_lsn": plan::format_lsn(r.current),
            "lag_bytes": r.confirmed.map(|c| r.current.saturating_sub(c)),
            "active": r.active,
            "active_pid": r.pid,
        }),
    }
}

async fn reset_slot(
    s: &CursorSpec,
    to: SlotTo,
    dry_run: bool,
    by: Option<String>,
) -> Result<Value, ApiError> {
    let client = connect_source(s).await?;
    let read = |e| unavailable("reading pg_replication_slots", e);
    let row = slot_row(&client, &s.slot).await.map_err(read)?;
    let Some(SlotRow {
        confirmed: Some(confirmed),
        current,
        active,
        pid,
        ..
    }) = row
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_slot",
            format!("replication slot {} does not exist (yet)", s.slot),
        ));
    };
    let mv = plan::plan_slot(confirmed, current, to)?;
    let report = json!({
        "pipeline": s.pipeline,
        "dry_run": dry_run,
        "target": { "kind": "slot", "slot": s.slot },
        "stage": "capture",
        "slot": mv,
        "ru": 0,
        "ru_per_minute": s.ru_per_minute,
        "minutes": 0.0,
        "note": "the changes in the skipped WAL are never captured: their rows reach the lists \
                 only when they change again or are re-snapshotted",
    });
    if dry_run {
        return Ok(report);
    }
    if active {
        return Err(stage_running(
            "capture",
            format!(
                "the running capture streams from slot {} (pid {}); PostgreSQL advances a slot \
                 only while no reader holds it",
                s.slot,
                pid.map_or("?".into(), |p| p.to_string())
            ),
        ));
    }
    let mut run = start_run(s, by, &report).await?;
    // PostgreSQL advances a logical slot only up to the WAL flushed so far, which may be short of
    // the target read a moment ago (`now` is the insert position): answer where it really is.
    let moved = client
        .query_one(
            "SELECT end_lsn::text FROM pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&s.slot, &mv.to_lsn],
        )
        .await
        .map(|row| row.get::<_, String>(0))
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.message().contains("active") => {
                stage_running("capture", db.message().to_string())
            }
            _ => unavailable("advancing the slot", e),
        });
    finish_run(&mut run, RunCounts::default(), moved.as_ref().err()).await;
    let mut report = report;
    report["slot"]["requested_lsn"] = json!(mv.to_lsn);
    report["slot"]["to_lsn"] = json!(moved?);
    Ok(with_run(report, &run))
}

fn find_list<'a>(s: &'a CursorSpec, list: &str) -> Result<&'a ListSpec, ApiError> {
    s.lists
        .iter()
        .find(|l| l.name == list || l.id.eq_ignore_ascii_case(list))
        .ok_or_else(|| {
            ApiError::bad_param(
                "list",
                "not a list of this pipeline (give its display name or id)",
            )
        })
}

async fn reset_list(
    s: &CursorSpec,
    list: &str,
    dry_run: bool,
    by: Option<String>,
) -> Result<Value, ApiError> {
    let l = find_list(s, list)?;
    let Some(poller) = &l.reset else {
        return Err(ApiError::bad_param(
            "list",
            "this list does not pull (pull.enabled is false): it has no delta link",
        ));
    };
    let items = items_in_list(s, &l.id).await?;
    let ru = plan::enumeration_ru(items);
    let mut report = json!({
        "pipeline": s.pipeline,
        "dry_run": dry_run,
        "target": { "kind": "list", "list": l.name, "list_id": l.id },
        "stage": "poller",
        "items_reenumerated": items,
        "ru": ru,
        "ru_is_upper_bound": false,
        "ru_per_minute": s.ru_per_minute,
        "minutes": plan::minutes(ru, s.ru_per_minute, 1.0),
        "note": "items: those the ledger knows in the list (items people created that were not \
                 pulled yet come on top); pages of 200 at 2 RU; unchanged items cause no write",
    });
    if dry_run {
        return Ok(report);
    }
    let mut run = start_run(s, by, &report).await?;
    let (reply, answer) = oneshot::channel();
    let gone = || {
        stage_running(
            "poller",
            format!("the delta poller of list {:?} is not running", l.name),
        )
    };
    let started = async {
        poller.send(reply).await.map_err(|_| gone())?;
        match tokio::time::timeout(LIST_RESET_WAIT, answer).await {
            Err(_) => Err(unavailable(
                "the delta poller",
                "did not take the reset in time",
            )),
            Ok(Err(_)) => Err(gone()),
            Ok(Ok(Err(e))) => Err(unavailable("starting the enumeration", e)),
            Ok(Ok(Ok(resync_id))) => Ok(resync_id),
        }
    }
    .await;
    finish_run(&mut run, RunCounts::default(), started.as_ref().err()).await;
    report["resync_id"] = json!(started?);
    Ok(with_run(report, &run))
}

/// Reads `topic` from its start to the end offsets taken first, handing each record to `f`.
async fn read_to_end(
    log: &AnyLog,
    topic: &str,
    mut f: impl FnMut(ConsumedRecord),
) -> Result<(), ApiError> {
    let err = |e| unavailable(&format!("reading {topic}"), e);
    let ends = log.end_offsets(topic).await.map_err(err)?;
    let mut remaining: Vec<(i32, i64)> = (0..).zip(ends).filter(|(_, e)| *e > 0).collect();
    if remaining.is_empty() {
        return Ok(());
    }
    let stop = CancellationToken::new();
    // A throwaway group that never commits reads from the start.
    let group = format!("{topic}.cursors-reader.{}", uuid::Uuid::new_v4().simple());
    let mut c = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await
        .map_err(err)?;
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    let result = loop {
        if remaining.is_empty() {
            break Ok(());
        }
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => break Err(unavailable(&format!("reading {topic}"), "timed out")),
            Ok(Err(e)) => break Err(err(e)),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(r))) => {
                remaining.retain(|(p, end)| !(*p == r.partition && r.offset + 1 >= *end));
                f(r);
            }
        }
    };
    stop.cancel();
    result
}

/// Items the ledger knows in list `list_id` (its changelog's latest entry per row).
async fn items_in_list(s: &CursorSpec, list_id: &str) -> Result<u64, ApiError> {
    let mut lists: HashMap<Vec<u8>, Option<String>> = HashMap::new();
    read_to_end(&s.log, &s.ledger_topic, |r| {
        let list = r.record.value.as_deref().and_then(|v| {
            let e: Value = serde_json::from_slice(v).ok()?;
            e["item"]["list_id"].as_str().map(str::to_string)
        });
        lists.insert(r.record.key, list);
    })
    .await?;
    Ok(lists
        .values()
        .filter(|l| {
            l.as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(list_id))
        })
        .count() as u64)
}

/// One group's positions per partition, with lag.
fn partitions_view(states: &[PartitionState]) -> Value {
    let parts: Vec<Value> = states
        .iter()
        .map(|p| {
            json!({
                "topic": p.topic,
                "partition": p.partition,
                "committed": p.committed,
                "start": p.start,
                "end": p.end,
                "lag": (p.end - p.position()).max(0),
            })
        })
        .collect();
    let lag: i64 = states.iter().map(|p| (p.end - p.position()).max(0)).sum();
    json!({ "partitions": parts, "lag": lag })
}

async fn groups_view(s: &CursorSpec) -> Vec<Value> {
    let mut out = Vec::new();
    for g in &s.groups {
        let mut v =
            json!({ "role": g.role, "group": g.name, "stage": g.stage, "resettable": true });
        match partition_states(s, g, None, None).await {
            Ok(states) => merge(&mut v, partitions_view(&states)),
            Err(e) => v["error"] = json!(e.detail),
        }
        out.push(v);
    }
    out.push(projector_view(s).await);
    out
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The run projector: its positions are rows of the meta-store, not log commits.
async fn projector_view(s: &CursorSpec) -> Value {
    let mut v = json!({
        "role": "projector",
        "group": format!("{}.meta-projector", s.pipeline),
        "stage": "projector",
        "resettable": false,
        "position_in": "meta-store (syncbridge_meta.projector_offsets)",
    });
    let Some(db) = &s.meta else {
        return v;
    };
    let read = async {
        let client = db.client().await.map_err(|e| e.to_string())?;
        let rows = client
            .query(
                "SELECT partition, next_offset FROM syncbridge_meta.projector_offsets \
                 WHERE topic = $1",
                &[&s.runs_topic],
            )
            .await
            .map_err(|e| e.to_string())?;
        let ends = s
            .log
            .end_offsets(&s.runs_topic)
            .await
            .map_err(|e| e.to_string())?;
        let starts = s
            .log
            .start_offsets(&s.runs_topic)
            .await
            .map_err(|e| e.to_string())?;
        let applied: BTreeMap<i32, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok::<_, String>(
            (0..)
                .zip(starts.into_iter().zip(ends))
                .map(|(p, (start, end))| PartitionState {
                    topic: s.runs_topic.clone(),
                    partition: p,
                    committed: applied.get(&p).copied(),
                    start,
                    end,
                })
                .collect::<Vec<_>>(),
        )
    }
    .await;
    match read {
        Ok(states) => merge(&mut v, partitions_view(&states)),
        Err(e) => v["error"] = json!(e),
    }
    v
}

async fn lists_view(s: &CursorSpec) -> Vec<Value> {
    let mut stored: HashMap<String, StoredCursor> = HashMap::new();
    let read = read_to_end(&s.log, &s.cursors_topic, |r| {
        let key = String::from_utf8_lossy(&r.record.key).into_owned();
        match r
            .record
            .value
            .as_deref()
            .map(serde_json::from_slice::<StoredCursor>)
        {
            Some(Ok(c)) => {
                stored.insert(key, c);
            }
            _ => {
                stored.remove(&key);
            }
        }
    })
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    s.lists
        .iter()
        .map(|l| {
            let mut v = json!({ "list": l.name, "list_id": l.id, "pulls": l.reset.is_some() });
            match (&read, stored.get(&l.id)) {
                (Err(e), _) => v["error"] = json!(e.detail),
                (Ok(()), None) => v["delta_link"] = json!(false),
                (Ok(()), Some(c)) => merge(
                    &mut v,
                    json!({
                        "delta_link": c.phase == CursorPhase::Delta,
                        "phase": c.phase,
                        "stored_at_ms": c.stored_at_ms,
                        "age_ms": (now - c.stored_at_ms).max(0),
                        "resync": c.resync,
                    }),
                ),
            }
            v
        })
        .collect()
}
