//! Drift check and heal over HTTP (issue 14): `POST /pipelines/{name}/drift` (check),
//! `POST /pipelines/{name}/drift/heal` (check, then fix), `GET /pipelines/{name}/drift` (the
//! latest report) and `GET /pipelines/{name}/drift/{run_id}` (a given one). The work is in
//! [`crate::process::drift`]; each request is one run and answers with its [`DriftReport`] when
//! it is done.
//!
//! Reports are read from the meta-store ([`crate::control::meta::drift`]), where the projector
//! puts them a moment after the run ends; they survive restarts. A `GET` answers one page of the
//! differences: `?after=<n>&limit=<1–5000, default 500>`, `next` in the body names the `after` of
//! the next page. Bad parameters are a 400 naming them.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::problem::{ApiError, Problem};
use super::{PipelineScoped, Registry};
use crate::control::meta::MetaError;
use crate::control::meta::api::run_id_param;
use crate::control::meta::drift::{DEFAULT_PAGE, MAX_PAGE};
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
        .route("/pipelines/{name}/drift/{run_id}", get(by_run))
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

/// Page of differences asked for: `(after, limit)`.
fn page_query(q: &HashMap<String, String>) -> Result<(i64, i64), ApiError> {
    if let Some(key) = q.keys().find(|k| !["after", "limit"].contains(&k.as_str())) {
        return Err(ApiError::bad_param(
            key,
            format!("unknown query parameter `{key}` (known: after, limit)"),
        ));
    }
    let after = match q.get("after").map(|a| a.parse::<i64>()) {
        None => 0,
        Some(Ok(a)) if a >= 0 => a,
        Some(_) => {
            return Err(ApiError::bad_param(
                "after",
                "`after` must be a `next` from a previous page (a number ≥ 0)",
            ));
        }
    };
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => DEFAULT_PAGE,
        Some(Ok(l)) if (1..=MAX_PAGE).contains(&l) => l,
        Some(_) => {
            return Err(ApiError::bad_param(
                "limit",
                format!("`limit` must be a number from 1 to {MAX_PAGE}"),
            ));
        }
    };
    Ok((after, limit))
}

/// Report `run_id` (the latest when `None`) of pipeline `name`, one page of it.
async fn stored(
    drift: &DriftRegistry,
    name: &str,
    run_id: Option<uuid::Uuid>,
    q: &HashMap<String, String>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    // The pipeline first: an unknown one is a 404 whatever else was asked.
    let h = handle(drift, name)?;
    let (after, limit) = page_query(q)?;
    let unavailable = |e: MetaError| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "meta_unavailable",
            e.to_string(),
        )
    };
    let report = h.report(run_id, after, limit).await.map_err(unavailable)?;
    report.map(axum::Json).ok_or_else(|| {
        let detail = match run_id {
            Some(id) => format!("no drift report of run {id} for {name:?}"),
            None => format!("no drift check of {name:?} has been recorded"),
        };
        ApiError::new(StatusCode::NOT_FOUND, "no_drift_report", detail)
    })
}

#[utoipa::path(get, path = "/pipelines/{name}/drift", tag = "drift",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("after" = Option<i64>, Query, description = "`next` of the previous page (default 0)"),
        ("limit" = Option<i64>, Query, description = "Differences per page, 1–5000 (default 500)"),
    ),
    responses(
        (status = 200, description = "The latest report (from the meta-store), one page of its differences", body = DriftReport),
        (status = 400, description = "A bad parameter (named in `invalid-params`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline, or no check recorded yet", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The meta-store cannot be reached", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn latest(
    State(drift): State<DriftRegistry>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    stored(&drift, &name, None, &q).await
}

#[utoipa::path(get, path = "/pipelines/{name}/drift/{run_id}", tag = "drift",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("run_id" = String, Path, description = "The `drift_check` or `drift_heal` run (UUID)"),
        ("after" = Option<i64>, Query, description = "`next` of the previous page (default 0)"),
        ("limit" = Option<i64>, Query, description = "Differences per page, 1–5000 (default 500)"),
    ),
    responses(
        (status = 200, description = "The run's report, one page of its differences", body = DriftReport),
        (status = 400, description = "A bad parameter (named in `invalid-params`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline, or no report of that run", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The meta-store cannot be reached", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn by_run(
    State(drift): State<DriftRegistry>,
    Path((name, run_id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<DriftReport>, ApiError> {
    handle(&drift, &name)?;
    let id = run_id_param("run_id", &run_id)?;
    stored(&drift, &name, Some(id), &q).await
}
