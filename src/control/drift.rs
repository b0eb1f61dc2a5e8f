//! Drift check and heal over HTTP (issue 14): `POST /pipelines/{name}/drift` (check),
//! `POST /pipelines/{name}/drift/heal` (check, then fix), `GET /pipelines/{name}/drift` (the
//! latest report since the process started; every check's counts are kept as a run in the
//! meta-store). The work is in [`crate::process::drift`]; each request is one run and answers
//! with its [`DriftReport`] when it is done.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::problem::{ApiError, Problem};
use super::{PipelineScoped, Registry};
use crate::process::drift::{DriftError, DriftHandle, DriftReport};

impl PipelineScoped for DriftHandle {
    fn pipeline(&self) -> &str {
        self.name()
    }
}

/// The drift handles of the running pipelines.
pub type DriftRegistry = Registry<DriftHandle>;

/// The routes of this module, with their state: merge them into the control router.
pub fn routes(drift: DriftRegistry) -> Router {
    Router::new()
        .route("/pipelines/{name}/drift", get(latest).post(check))
        .route("/pipelines/{name}/drift/heal", post(heal))
        .with_state(drift)
}

fn handle(drift: &DriftRegistry, name: &str) -> Result<DriftHandle, ApiError> {
    drift
        .get(name)
        .ok_or_else(|| ApiError::unknown_pipeline(name))
}

/// A check (or with `heal`, a heal) of pipeline `name`, answered with its report.
async fn run(
    drift: &DriftRegistry,
    name: &str,
    heal: bool,
) -> Result<axum::Json<DriftReport>, ApiError> {
    let h = handle(drift, name)?;
    let report = if heal {
        h.heal().await
    } else {
        h.check().await
    };
    report.map(axum::Json).map_err(failed)
}

fn failed(e: DriftError) -> ApiError {
    let (status, kind) = match &e {
        DriftError::Busy => (StatusCode::CONFLICT, "drift_in_progress"),
        DriftError::Graph(_) => (StatusCode::BAD_GATEWAY, "graph_failed"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    ApiError::new(status, kind, e.to_string())
}

#[utoipa::path(post, path = "/pipelines/{name}/drift", tag = "drift",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The check's report (a `drift_check` run)", body = DriftReport),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A check or heal of this pipeline is running", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Graph failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The source, the processor or the log is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn check(
    State(drift): State<DriftRegistry>,
    Path(name): Path<String>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    run(&drift, &name, false).await
}

#[utoipa::path(post, path = "/pipelines/{name}/drift/heal", tag = "drift",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "What the check found and the heal did (a `drift_heal` run)", body = DriftReport),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A check or heal of this pipeline is running", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Graph failed", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The source, the processor or the log is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn heal(
    State(drift): State<DriftRegistry>,
    Path(name): Path<String>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    run(&drift, &name, true).await
}

#[utoipa::path(get, path = "/pipelines/{name}/drift", tag = "drift",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The latest report since the process started", body = DriftReport),
        (status = 404, description = "Unknown pipeline, or no check ran yet", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn latest(
    State(drift): State<DriftRegistry>,
    Path(name): Path<String>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    let h = handle(&drift, &name)?;
    h.latest().map(axum::Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_drift_report",
            format!("no drift check of {name:?} ran since the process started"),
        )
    })
}
