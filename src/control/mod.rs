//! Control-plane HTTP server: `/health` (the process is up), `/ready` (every registered stage has
//! started), `/metrics` (Prometheus text format) and the pipeline API below.
//!
//! Re-snapshots: `POST /pipelines/{name}/snapshot?table=schema.table` asks the running
//! capture to re-snapshot one table while streaming continues (202 with the queued status and its
//! `id`; 404 unknown pipeline or table; 409 one is already queued or running) and
//! `GET /pipelines/{name}/snapshot` shows the latest one (`state`: queued, running, done, failed;
//! `chunks`, `rows`, `superseded`, …; `{"state": "idle"}` when none was requested).
//! [`client`] is the CLI side (`syncbridge snapshot`).
//!
//! Conflicts: `GET /pipelines/{name}/conflicts[?parked=true]` lists the recorded conflicts with
//! their state (`open`, `resolved` with `resolution`, `superseded` with `superseded_by`,
//! `decided`; `parked=true`: open ones only), read by the running processor.
//! `POST /pipelines/{name}/conflicts/{id}/resolve?take=source|target[&by=NAME]` hands an
//! operator's decision to the processor and answers once it is applied and durable: 200 with the
//! resolved conflict; errors carry `{"error", "kind"}`: 400 bad `take`, 404 unknown pipeline or
//! id, 409 not parked / already resolved / superseded / gone, 412 a side changed since the
//! conflict was recorded, 502 a write failed, 503 busy or the processor stopped.
//!
//! Pauses: a pipeline whose guard tripped (a run of dead letters of one kind, a change event whose
//! schema cannot be had; see [`crate::process::guard`]) is not ready, and `/ready` names the reason
//! under `reasons`. `GET /pipelines/{name}/pause` shows it (`{"paused": false}` or the pause with
//! `kind`, `reason`, `at`, `since_ms`); `POST /pipelines/{name}/resume` restarts the processor from
//! its committed offsets (200 with the pause it ended; 409 not paused; 404 unknown pipeline).
//!
//! Binding happens in [`bind`], before any stage starts, so a taken port fails the run at once
//! instead of after a snapshot has begun.

pub mod client;
pub mod meta;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::capture::ResnapshotHandle;
use crate::capture::resnapshot::RequestError;
use crate::process::guard::PauseHandle;
use crate::pull::{ConflictHandle, ConflictState, ResolveError, Take};
use crate::telemetry::metrics::STAGE_UP;

/// Control-plane settings (from the pipeline file's `control:` section).
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
}

/// Failure of the control plane. Binding is not retryable (the operator must free or change the
/// port); a serve error after start is, by restarting the process.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {addr}: {source} (set control.listen to a free address)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control server failed: {0}")]
    Serve(std::io::Error),
}

impl ControlError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ControlError::Serve(_))
    }
}

/// Which stages exist and whether each has started. Shared by every pipeline in the process.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    stages: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Why a stage is not ready, when it says so (e.g. a paused pipeline).
    reasons: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    /// Declares a stage (not ready yet). `name` is `<pipeline>/<stage>`.
    pub fn register(&self, pipeline: &str, stage: &str) {
        self.set(pipeline, stage, false);
    }

    /// Marks a stage ready (or not ready again, e.g. while it reconnects).
    pub fn set(&self, pipeline: &str, stage: &str, ready: bool) {
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("{pipeline}/{stage}"));
        self.mark(pipeline, stage, ready);
    }

    /// Marks a stage not ready and says why (shown by `/ready`).
    pub fn set_not_ready(&self, pipeline: &str, stage: &str, reason: String) {
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("{pipeline}/{stage}"), reason);
        self.mark(pipeline, stage, false);
    }

    fn mark(&self, pipeline: &str, stage: &str, ready: bool) {
        let key = format!("{pipeline}/{stage}");
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, ready);
        metrics::gauge!(STAGE_UP, "pipeline" => pipeline.to_string(), "stage" => stage.to_string())
            .set(if ready { 1.0 } else { 0.0 });
    }

    /// True when at least one stage is registered and all are ready.
    pub fn is_ready(&self) -> bool {
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        !stages.is_empty() && stages.values().all(|r| *r)
    }

    fn snapshot(&self) -> BTreeMap<String, bool> {
        self.stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn reasons(&self) -> BTreeMap<String, String> {
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The re-snapshot handles of the running pipelines, by pipeline name.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRegistry {
    pipelines: Arc<Mutex<BTreeMap<String, ResnapshotHandle>>>,
}

impl SnapshotRegistry {
    pub fn register(&self, handle: ResnapshotHandle) {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.pipeline().to_string(), handle);
    }

    fn get(&self, pipeline: &str) -> Option<ResnapshotHandle> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
    }
}

/// The conflict handles of the running pipelines' processors, by pipeline name.
#[derive(Debug, Clone, Default)]
pub struct ConflictRegistry {
    pipelines: Arc<Mutex<BTreeMap<String, ConflictHandle>>>,
}

impl ConflictRegistry {
    pub fn register(&self, handle: ConflictHandle) {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.pipeline().to_string(), handle);
    }

    fn get(&self, pipeline: &str) -> Option<ConflictHandle> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
    }
}

/// The pause switches of the running pipelines, by pipeline name.
#[derive(Debug, Clone, Default)]
pub struct PauseRegistry {
    pipelines: Arc<Mutex<BTreeMap<String, PauseHandle>>>,
}

impl PauseRegistry {
    pub fn register(&self, handle: PauseHandle) {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.pipeline().to_string(), handle);
    }

    fn get(&self, pipeline: &str) -> Option<PauseHandle> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
    }
}

/// What the control plane serves: shared with the runtime, which registers each pipeline.
#[derive(Debug, Clone)]
pub struct Registries {
    pub readiness: Readiness,
    pub snapshots: SnapshotRegistry,
    pub conflicts: ConflictRegistry,
    pub pauses: PauseRegistry,
    /// The meta-stores (run history) of the running pipelines.
    pub meta: meta::MetaRegistry,
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    prometheus: PrometheusHandle,
    snapshots: SnapshotRegistry,
    conflicts: ConflictRegistry,
    pauses: PauseRegistry,
}

/// Binds the listening socket; call before starting stages.
pub async fn bind(config: &ControlConfig) -> Result<TcpListener, ControlError> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ControlError::Bind {
            addr: config.listen,
            source,
        })
}

/// The control-plane routes, separate from serving so tests can drive them in-process.
pub fn router(registries: Registries, prometheus: PrometheusHandle) -> Router {
    let Registries {
        readiness,
        snapshots,
        conflicts,
        pauses,
        meta,
    } = registries;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route(
            "/pipelines/{name}/snapshot",
            get(snapshot_status).post(snapshot_start),
        )
        .route("/pipelines/{name}/conflicts", get(conflicts_list))
        .route(
            "/pipelines/{name}/conflicts/{id}/resolve",
            axum::routing::post(conflict_resolve),
        )
        .route("/pipelines/{name}/pause", get(pause_status))
        .route("/pipelines/{name}/resume", axum::routing::post(resume))
        .with_state(AppState {
            readiness,
            prometheus,
            snapshots,
            conflicts,
            pauses,
        })
        .merge(meta::routes(meta))
}

/// Serves until `shutdown` is cancelled, then finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    registries: Registries,
    prometheus: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    axum::serve(listener, router(registries, prometheus))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ControlError::Serve)
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.readiness.is_ready();
    let mut body = serde_json::json!({ "ready": ready, "stages": state.readiness.snapshot() });
    let reasons = state.readiness.reasons();
    if !reasons.is_empty() {
        body["reasons"] = serde_json::json!(reasons);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn snapshot_start(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(handle) = state.snapshots.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    let Some(table) = query
        .get("table")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "missing query parameter `table` (schema.table)".into(),
        );
    };
    match handle.request(table) {
        Ok(status) => (StatusCode::ACCEPTED, axum::Json(status)).into_response(),
        Err(e @ RequestError::UnknownTable(_)) => json_error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ RequestError::Busy { .. }) => json_error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn snapshot_status(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(handle) = state.snapshots.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    match handle.status() {
        Some(status) => axum::Json(status).into_response(),
        None => axum::Json(serde_json::json!({ "state": "idle" })).into_response(),
    }
}

fn resolve_error(e: &ResolveError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        axum::Json(serde_json::json!({ "error": e.to_string(), "kind": e.kind() })),
    )
        .into_response()
}

async fn conflicts_list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(handle) = state.conflicts.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    let parked = query.get("parked").is_some_and(|v| v != "false");
    match handle.list().await {
        Ok(views) => axum::Json(
            views
                .into_iter()
                .filter(|v| !parked || v.state == ConflictState::Open)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => resolve_error(&e),
    }
}

async fn conflict_resolve(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(handle) = state.conflicts.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    let take = match query.get("take").map(|t| t.parse::<Take>()) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return json_error(StatusCode::BAD_REQUEST, e),
        None => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "missing query parameter `take` (source or target)".into(),
            );
        }
    };
    let by = query
        .get("by")
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty());
    match handle.resolve(&id, take, by).await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => resolve_error(&e),
    }
}

async fn pause_status(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(handle) = state.pauses.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    match handle.paused() {
        Some(p) => axum::Json(serde_json::json!({ "paused": true, "pause": p })).into_response(),
        None => axum::Json(serde_json::json!({ "paused": false })).into_response(),
    }
}

async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(handle) = state.pauses.get(&name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no pipeline {name:?} runs in this process"),
        );
    };
    match handle.resume() {
        Some(p) => axum::Json(serde_json::json!({ "resumed": true, "pause": p })).into_response(),
        None => json_error(
            StatusCode::CONFLICT,
            format!("pipeline {name:?} is not paused"),
        ),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    // Upkeep drains histogram buckets that would otherwise grow between scrapes.
    state.prometheus.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_stage() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "no stage registered is not ready");
        r.register("p", "log");
        r.register("p", "capture");
        assert!(!r.is_ready());
        r.set("p", "log", true);
        assert!(!r.is_ready());
        r.set("p", "capture", true);
        assert!(r.is_ready());
        r.set("p", "capture", false);
        assert!(!r.is_ready());
    }
}
