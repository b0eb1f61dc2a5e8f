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
//! resolved conflict; errors are problems (with `error` and `kind`): 400 bad `take`, 404 unknown
//! pipeline or id, 409 not parked / already resolved / superseded / gone, 412 a side changed
//! since the conflict was recorded, 502 a write failed, 503 busy or the processor stopped.
//!
//! Pauses: a pipeline whose guard tripped (a run of dead letters of one kind, a change event whose
//! schema cannot be had; see [`crate::process::guard`]) is not ready, and `/ready` names the reason
//! under `reasons`. `GET /pipelines/{name}/pause` shows it (`{"paused": false}` or the pause with
//! `kind`, `reason`, `at`, `since_ms`); `POST /pipelines/{name}/resume` restarts the processor from
//! its committed offsets (200 with the pause it ended; 409 not paused; 404 unknown pipeline).
//!
//! Inventory and catalog ([`catalog`]): `GET /inventory` (applications → databases → instances →
//! tables of the loaded pipelines) and `GET /catalog/{database}/tables[/{schema.table}]` (the
//! source database's tables, keys, indexes, replica identity and publication membership).
//! Cursors: `GET /pipelines/{name}/cursors` and `POST /pipelines/{name}/cursors/reset` (with a dry
//! run) are in [`cursors`], with their own state, merged into [`router`].
//!
//! Access: every route except `/health`, `/ready`, `/metrics` and `/openapi.json` needs a bearer
//! token of `control.tokens` ([`auth`]: 401 without or with an unknown one, 403 for a `read`
//! token on a non-GET route). [`run`] applies the check to the whole router it is given, so
//! routes merged into [`router`] (`.merge(...)`) are protected without further work. With no
//! token configured the API is open, which [`check_exposure`] allows on a loopback address only.
//! Every failure is an RFC 9457 problem from [`problem::ApiError`], returned before anything
//! changed; the OpenAPI 3.1 description ([`openapi`]) is served at `/openapi.json`.
//!
//! Mapping editor ([`config_edit`]): `GET`/`PUT /pipelines/{name}/config`, the pipeline file
//! (secrets redacted) and writing it (with `run --allow-config-writes`), reloaded at once;
//! [`config_check`]: a draft checked against the catalog and the live lists before saving, and a
//! list's live columns.
//!
//! Admin UI ([`ui`]): the single-page app at `/ui` (public static files, the app sends the
//! operator's token with each call) and `GET /whoami` (the token's name and role).
//!
//! Binding happens in [`bind`], before any stage starts, so a taken port fails the run at once
//! instead of after a snapshot has begun.

pub mod auth;
pub mod catalog;
pub mod client;
pub mod config_check;
pub mod config_edit;
pub mod cursors;
pub mod drift;
pub mod guard;
pub mod meta;
pub mod notify;
pub mod openapi;
pub mod pipelines;
pub mod problem;
pub mod schedule;
pub mod ui;

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

pub use auth::Auth;
use problem::{ApiError, InvalidParam, Problem};

use crate::capture::ResnapshotHandle;
use crate::capture::resnapshot::RequestError;
use crate::config::ApiToken;
use crate::process::guard::PauseHandle;
use crate::pull::{ConflictHandle, ConflictState, ResolveError, Take};
use crate::telemetry::metrics::STAGE_UP;

/// Control-plane settings (from the pipeline file's `control:` section).
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// API bearer tokens; empty: open API, allowed on a loopback address only.
    pub tokens: Vec<ApiToken>,
}

/// Failure of the control plane. Binding is not retryable (the operator must free or change the
/// port, or configure tokens); a serve error after start is, by restarting the process.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {addr}: {source} (set control.listen to a free address)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "control.listen {addr} is not a loopback address and control.tokens is empty: anyone \
         reaching the port could resume pipelines and resolve conflicts; add tokens (role read \
         or operate, token from ${{ENV}}) or listen on 127.0.0.1"
    )]
    Unprotected { addr: SocketAddr },
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
    /// What must run in one process only, and whether this one runs it (`<pipeline>/<what>`,
    /// e.g. `poller:<list>`). A standby is ready: it takes over when the owner dies.
    owners: Arc<Mutex<BTreeMap<String, bool>>>,
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

    /// Forgets a stage (e.g. a table that was paused and fits again); true when it was there.
    pub fn remove(&self, pipeline: &str, stage: &str) -> bool {
        let key = format!("{pipeline}/{stage}");
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let had = self
            .stages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .is_some();
        if had {
            metrics::gauge!(STAGE_UP, "pipeline" => pipeline.to_string(), "stage" => stage.to_string())
                .set(1.0);
        }
        had
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

    /// Records whether this process owns `what` of `pipeline` (shown by `/ready` as `owns`).
    pub fn set_owner(&self, pipeline: &str, what: &str, owned: bool) {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(format!("{pipeline}/{what}"), owned);
    }

    /// What this process owns (true) or stands by for (false).
    pub fn owners(&self) -> BTreeMap<String, bool> {
        self.owners
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

/// A handle the control plane keeps per running pipeline.
pub trait PipelineScoped: Clone {
    /// The pipeline the handle belongs to.
    fn pipeline(&self) -> &str;
}

impl PipelineScoped for ResnapshotHandle {
    fn pipeline(&self) -> &str {
        ResnapshotHandle::pipeline(self)
    }
}

impl PipelineScoped for ConflictHandle {
    fn pipeline(&self) -> &str {
        ConflictHandle::pipeline(self)
    }
}

impl PipelineScoped for PauseHandle {
    fn pipeline(&self) -> &str {
        PauseHandle::pipeline(self)
    }
}

/// One kind of handle of the running pipelines, by pipeline name. A pipeline registered again
/// (a restarted processor) replaces its earlier handle.
#[derive(Debug, Clone)]
pub struct Registry<T> {
    pipelines: Arc<Mutex<BTreeMap<String, T>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Self {
            pipelines: Arc::default(),
        }
    }
}

impl<T: PipelineScoped> Registry<T> {
    pub fn register(&self, handle: T) {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle.pipeline().to_string(), handle);
    }

    pub fn get(&self, pipeline: &str) -> Option<T> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)
            .cloned()
    }

    /// Every registered handle, by pipeline name.
    pub fn all(&self) -> Vec<T> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The re-snapshot handles of the running pipelines.
pub type SnapshotRegistry = Registry<ResnapshotHandle>;
/// The conflict handles of the running pipelines' processors.
pub type ConflictRegistry = Registry<ConflictHandle>;
/// The pause switches of the running pipelines.
pub type PauseRegistry = Registry<PauseHandle>;

/// What the control plane serves: shared with the runtime, which registers each pipeline.
#[derive(Debug, Clone, Default)]
pub struct Registries {
    pub readiness: Readiness,
    pub snapshots: SnapshotRegistry,
    pub conflicts: ConflictRegistry,
    pub pauses: PauseRegistry,
    /// The meta-stores (run history) of the running pipelines.
    pub meta: meta::MetaRegistry,
    /// Status, lag and dead letters of the running pipelines.
    pub pipelines: pipelines::PipelineRegistry,
    /// The cursors (slot, consumer groups, delta links) of the running pipelines.
    pub cursors: cursors::CursorRegistry,
    pub drift: drift::DriftRegistry,
    /// The accidental-delete guards of the running pipelines.
    pub guards: guard::GuardRegistry,
    /// The pipeline files (mapping editor), once the runtime enables them.
    pub config: config_edit::ConfigEditors,
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
    prometheus: PrometheusHandle,
    snapshots: SnapshotRegistry,
    conflicts: ConflictRegistry,
    pauses: PauseRegistry,
}

/// Binds the listening socket; call before starting stages. Refuses an open API (no tokens) on
/// an address other machines can reach.
pub async fn bind(config: &ControlConfig) -> Result<TcpListener, ControlError> {
    check_exposure(config)?;
    TcpListener::bind(config.listen)
        .await
        .map_err(|source| ControlError::Bind {
            addr: config.listen,
            source,
        })
}

/// An open API (no tokens) is allowed on a loopback address only; `syncbridge run` checks this
/// before anything starts, [`bind`] again.
pub fn check_exposure(config: &ControlConfig) -> Result<(), ControlError> {
    if config.tokens.is_empty() && !config.listen.ip().is_loopback() {
        return Err(ControlError::Unprotected {
            addr: config.listen,
        });
    }
    Ok(())
}

/// The control-plane routes, separate from serving so tests can drive them in-process. Not yet
/// authenticated: merge further routes into it, then serve it through [`run`] (or wrap it with
/// [`auth::Auth::secure`]), which puts every route but [`auth::PUBLIC_PATHS`] behind a token.
pub fn router(registries: Registries, prometheus: PrometheusHandle) -> Router {
    let Registries {
        readiness,
        snapshots,
        conflicts,
        pauses,
        meta,
        pipelines,
        cursors,
        drift,
        guards,
        config,
    } = registries;
    let pipeline_routes = pipelines::routes(pipelines, readiness.clone(), pauses.clone());
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi_json))
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
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .with_state(AppState {
            readiness,
            prometheus,
            snapshots,
            conflicts,
            pauses,
        })
        .merge(meta::history::routes(meta.clone()))
        .merge(meta::routes(meta))
        .merge(pipeline_routes)
        .merge(cursors::routes(cursors))
        .merge(drift::routes(drift))
        .merge(guard::routes(guards))
        .merge(config_check::routes(config.clone()))
        .merge(config_edit::routes(config))
        .merge(ui::routes())
}

/// Serves `app` (the [`router`], plus whatever was merged into it) behind the token check until
/// `shutdown` is cancelled, then finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    app: Router,
    auth: Auth,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    axum::serve(listener, auth.secure(app))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ControlError::Serve)
}

/// Answers of the JSON routes: the value or a problem.
type ApiResult = Result<Response, ApiError>;

/// A registry's handle of pipeline `name`, or 404 when no such pipeline runs here.
fn running<T>(handle: Option<T>, name: &str) -> Result<T, ApiError> {
    handle.ok_or_else(|| ApiError::unknown_pipeline(name))
}

#[utoipa::path(get, path = "/health", tag = "probes",
    responses((status = 200, description = "The process is up", body = serde_json::Value)))]
async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/ready", tag = "probes", responses(
    (status = 200, description = "Every stage has started; `owns`: what runs in one process only (a list's delta poller) and whether this process runs it (false: standing by)", body = serde_json::Value),
    (status = 503, description = "Some stage is not ready; `reasons` says why", body = serde_json::Value),
))]
async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.readiness.is_ready();
    let mut body = serde_json::json!({ "ready": ready, "stages": state.readiness.snapshot() });
    let reasons = state.readiness.reasons();
    if !reasons.is_empty() {
        body["reasons"] = serde_json::json!(reasons);
    }
    let owners = state.readiness.owners();
    if !owners.is_empty() {
        body["owns"] = serde_json::json!(owners);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

#[utoipa::path(post, path = "/pipelines/{name}/snapshot", tag = "pipelines",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("table" = String, Query, description = "Table to re-snapshot, `schema.table`"),
    ),
    responses(
        (status = 202, description = "Queued; the status with its `id`", body = serde_json::Value),
        (status = 400, description = "Missing `table`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline or table", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A re-snapshot is already queued or running", body = Problem, content_type = "application/problem+json"),
    ))]
async fn snapshot_start(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let handle = running(state.snapshots.get(&name), &name)?;
    let table = query
        .get("table")
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::bad_param("table", "missing query parameter `table` (schema.table)")
        })?;
    match handle.request(table) {
        Ok(status) => Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response()),
        Err(e @ RequestError::UnknownTable(_)) => Err(ApiError {
            param: Some(InvalidParam {
                name: "table".into(),
                reason: "not a table this pipeline syncs".into(),
            }),
            ..ApiError::new(StatusCode::NOT_FOUND, "unknown_table", e.to_string())
        }),
        Err(e @ RequestError::Busy { .. }) => {
            Err(ApiError::new(StatusCode::CONFLICT, "busy", e.to_string()))
        }
    }
}

#[utoipa::path(get, path = "/pipelines/{name}/snapshot", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The latest re-snapshot (`state`: idle, queued, running, done, failed)", body = serde_json::Value),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
    ))]
async fn snapshot_status(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let handle = running(state.snapshots.get(&name), &name)?;
    Ok(match handle.status() {
        Some(status) => axum::Json(status).into_response(),
        None => axum::Json(serde_json::json!({ "state": "idle" })).into_response(),
    })
}

// Documents the `take` parameter; the handler parses it as `Take`.
/// Which side of a conflict wins.
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum TakeParam {
    Source,
    Target,
}

fn resolve_error(e: &ResolveError) -> ApiError {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::new(status, e.kind(), e.to_string())
}

#[utoipa::path(get, path = "/pipelines/{name}/conflicts", tag = "conflicts",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("parked" = Option<bool>, Query, description = "Only the open (parked) ones"),
    ),
    responses(
        (status = 200, description = "The recorded conflicts with their state", body = Vec<serde_json::Value>),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The processor is busy or stopped", body = Problem, content_type = "application/problem+json"),
    ))]
async fn conflicts_list(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let handle = running(state.conflicts.get(&name), &name)?;
    let parked = query.get("parked").is_some_and(|v| v != "false");
    let views = handle.list().await.map_err(|e| resolve_error(&e))?;
    Ok(axum::Json(
        views
            .into_iter()
            .filter(|v| !parked || v.state == ConflictState::Open)
            .collect::<Vec<_>>(),
    )
    .into_response())
}

#[utoipa::path(post, path = "/pipelines/{name}/conflicts/{id}/resolve", tag = "conflicts",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("id" = String, Path, description = "Conflict id"),
        ("take" = TakeParam, Query, description = "Which side wins"),
        ("by" = Option<String>, Query, description = "Who decided (recorded)"),
    ),
    responses(
        (status = 200, description = "Applied and durable: the resolved conflict", body = serde_json::Value),
        (status = 400, description = "Missing or bad `take`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline or conflict", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not parked, already resolved, superseded or gone", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "A side changed since the conflict was recorded", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "A write failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Busy or the processor stopped", body = Problem, content_type = "application/problem+json"),
    ))]
async fn conflict_resolve(
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult {
    let handle = running(state.conflicts.get(&name), &name)?;
    let take = match query.get("take").map(|t| t.parse::<Take>()) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return Err(ApiError::bad_param("take", e)),
        None => {
            return Err(ApiError::bad_param(
                "take",
                "missing query parameter `take` (source or target)",
            ));
        }
    };
    let by = query
        .get("by")
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty());
    let view = handle
        .resolve(&id, take, by)
        .await
        .map_err(|e| resolve_error(&e))?;
    Ok(axum::Json(view).into_response())
}

#[utoipa::path(get, path = "/pipelines/{name}/pause", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "`{\"paused\": false}` or the pause (`kind`, `reason`, `at`, `since_ms`)", body = serde_json::Value),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
    ))]
async fn pause_status(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let handle = running(state.pauses.get(&name), &name)?;
    Ok(match handle.paused() {
        Some(p) => axum::Json(serde_json::json!({ "paused": true, "pause": p })).into_response(),
        None => axum::Json(serde_json::json!({ "paused": false })).into_response(),
    })
}

#[utoipa::path(post, path = "/pipelines/{name}/resume", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Restarted from the committed offsets: the pause it ended", body = serde_json::Value),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not paused", body = Problem, content_type = "application/problem+json"),
    ))]
async fn resume(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult {
    let handle = running(state.pauses.get(&name), &name)?;
    match handle.resume() {
        Some(p) => {
            Ok(axum::Json(serde_json::json!({ "resumed": true, "pause": p })).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_paused",
            format!("pipeline {name:?} is not paused"),
        )),
    }
}

#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
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

#[utoipa::path(get, path = "/openapi.json", tag = "probes",
    responses((status = 200, description = "This document", body = serde_json::Value)))]
async fn openapi_json() -> Response {
    axum::Json(openapi::document()).into_response()
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

    use crate::config::{ApiRole, Secret};

    const OPERATE: &str = "operate-secret";
    const READ: &str = "read-secret";

    /// Serves the real router behind the token check on an ephemeral loopback port.
    async fn serve(tokens: &[(&str, &str, ApiRole)]) -> (SocketAddr, CancellationToken) {
        let tokens: Vec<ApiToken> = tokens
            .iter()
            .map(|(name, token, role)| ApiToken {
                name: (*name).into(),
                token: Secret::new(*token),
                role: *role,
            })
            .collect();
        let registries = Registries::default();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let listener = bind(&ControlConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tokens: tokens.clone(),
        })
        .await
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(run(
            listener,
            router(registries, prometheus).merge(catalog::routes(Vec::new())),
            Auth::new(&tokens),
            stop.clone(),
        ));
        (addr, stop)
    }

    /// [`serve`] with an `operate` token (`ops`) and a `read` one (`dash`).
    async fn serve_operate_and_read() -> (SocketAddr, CancellationToken) {
        serve(&[
            ("ops", OPERATE, ApiRole::Operate),
            ("dash", READ, ApiRole::Read),
        ])
        .await
    }

    /// Every operation of the OpenAPI document, path parameters filled in.
    fn operations() -> Vec<(String, String)> {
        let doc = serde_json::to_value(openapi::document()).unwrap();
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = path.replace("{name}", "p").replace("{id}", "c1");
            for method in item.as_object().unwrap().keys() {
                ops.push((method.to_uppercase(), concrete.clone()));
            }
        }
        assert!(ops.iter().any(|(m, _)| m == "POST"), "{ops:?}");
        ops
    }

    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut req = reqwest::Client::new().request(
            method.parse().unwrap(),
            format!("http://{addr}{path}?take=source&table=public.t"),
        );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    fn is_public(path: &str) -> bool {
        auth::is_public(path)
    }

    #[tokio::test]
    async fn no_or_unknown_token_is_401_on_every_protected_route() {
        let (addr, stop) = serve(&[("ops", OPERATE, ApiRole::Operate)]).await;
        let mut protected = 0;
        for (method, path) in operations() {
            for token in [None, Some("wrong"), Some("operate-secreT")] {
                let resp = call(addr, &method, &path, token).await;
                if is_public(&path) {
                    assert_ne!(resp.status(), 401, "{method} {path} is public");
                    continue;
                }
                assert_eq!(resp.status(), 401, "{method} {path} with {token:?}");
                let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
                assert!(challenge.starts_with("Bearer"), "{challenge}");
                assert_eq!(
                    resp.headers()["content-type"],
                    problem::PROBLEM_JSON,
                    "{method} {path}"
                );
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["status"], 401);
                assert_eq!(body["kind"], "unauthorized");
                protected += 1;
            }
        }
        assert!(protected >= 18, "only {protected} protected calls");
        // An unknown route is protected too (no probing without a token).
        assert_eq!(call(addr, "GET", "/nope", None).await.status(), 401);
        stop.cancel();
    }

    #[tokio::test]
    async fn read_token_is_403_on_every_post_and_passes_gets() {
        let (addr, stop) = serve_operate_and_read().await;
        let mut posts = 0;
        for (method, path) in operations() {
            let resp = call(addr, &method, &path, Some(READ)).await;
            if method == "GET" {
                assert!(
                    !matches!(resp.status().as_u16(), 401 | 403),
                    "GET {path}: {}",
                    resp.status()
                );
            } else {
                assert_eq!(resp.status(), 403, "{method} {path}");
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["kind"], "forbidden");
                assert!(body["detail"].as_str().unwrap().contains("dash"), "{body}");
                assert!(!body.to_string().contains(READ), "token echoed: {body}");
                posts += 1;
            }
        }
        assert!(posts >= 3, "{posts}");
        stop.cancel();
    }

    #[tokio::test]
    async fn operate_token_passes_every_route() {
        let (addr, stop) = serve(&[("ops", OPERATE, ApiRole::Operate)]).await;
        for (method, path) in operations() {
            let resp = call(addr, &method, &path, Some(OPERATE)).await;
            let status = resp.status().as_u16();
            assert!(!matches!(status, 401 | 403), "{method} {path}: {status}");
            if path.starts_with("/pipelines/") {
                // No pipeline runs in this test: the handler itself answered.
                assert_eq!(status, 404, "{method} {path}");
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["kind"], "unknown_pipeline", "{method} {path}");
                assert_eq!(body["invalid-params"][0]["name"], "name");
            }
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn the_ui_is_public_and_whoami_names_the_token() {
        let (addr, stop) = serve_operate_and_read().await;
        for path in ["/ui", "/ui/runs"] {
            let status = call(addr, "GET", path, None).await.status().as_u16();
            // 200 with a built UI, 503 (the how-to-build page) without: never 401.
            assert!(matches!(status, 200 | 503), "{path}: {status}");
        }
        assert_eq!(call(addr, "GET", "/whoami", None).await.status(), 401);
        for (token, name, role) in [(READ, "dash", "read"), (OPERATE, "ops", "operate")] {
            let body: serde_json::Value = call(addr, "GET", "/whoami", Some(token))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(
                (body["name"].as_str(), body["role"].as_str()),
                (Some(name), Some(role))
            );
            assert!(!body.to_string().contains(token), "token echoed: {body}");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_answer_problems() {
        let (addr, stop) = serve(&[("ops", OPERATE, ApiRole::Operate)]).await;
        for (method, path, status, kind) in [
            ("GET", "/nope", 404, "not_found"),
            ("DELETE", "/pipelines/p/resume", 405, "method_not_allowed"),
        ] {
            let resp = call(addr, method, path, Some(OPERATE)).await;
            assert_eq!(resp.status(), status, "{method} {path}");
            assert_eq!(resp.headers()["content-type"], problem::PROBLEM_JSON);
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["kind"], kind, "{method} {path}");
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn no_tokens_on_loopback_is_open() {
        let (addr, stop) = serve(&[]).await;
        let resp = call(addr, "POST", "/pipelines/p/resume", None).await;
        assert_eq!(resp.status(), 404);
        stop.cancel();
    }

    #[tokio::test]
    async fn no_tokens_on_a_public_address_refuses_to_bind() {
        let err = bind(&ControlConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            tokens: Vec::new(),
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ControlError::Unprotected { .. }), "{err}");
        assert!(err.to_string().contains("control.tokens"), "{err}");
        let with_token = ControlConfig {
            listen: "0.0.0.0:0".parse().unwrap(),
            tokens: vec![ApiToken {
                name: "ops".into(),
                token: Secret::new(OPERATE),
                role: ApiRole::Operate,
            }],
        };
        assert!(check_exposure(&with_token).is_ok());
    }
}
