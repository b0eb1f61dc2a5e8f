//! The accidental-delete guard over HTTP (issue 21 item 5): `GET /pipelines/{name}/guard` (per
//! direction: paused, held deletes, threshold, the first keys) and
//! `POST /pipelines/{name}/guard/{direction}/allow|discard` (the operator's decision, answered
//! once the processor applied it: allow writes the held deletes, discard drops them and leaves
//! the items in place). The work is in [`crate::process::delete_guard`]; the CLI side is
//! `syncbridge guard` ([`super::client`]).
//!
//! `direction` is `push` (deletes bound for the lists) or `pull` (items deleted in a list, bound
//! for the tables); anything else is a 400 naming it. A pull discard answers once the rows were
//! read again (their items re-created).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::{ApiError, Problem};
use super::{PipelineScoped, Registry};
use crate::process::delete_guard::{
    Decision, DecisionError, DeleteGuardHandle, Direction, DirectionStatus,
};

impl PipelineScoped for DeleteGuardHandle {
    fn pipeline(&self) -> &str {
        DeleteGuardHandle::pipeline(self)
    }
}

/// The delete guards of the running pipelines.
pub type GuardRegistry = Registry<DeleteGuardHandle>;

/// The routes of this module, with their state: merge them into the control router.
pub fn routes(guards: GuardRegistry) -> Router {
    Router::new()
        .route("/pipelines/{name}/guard", get(status))
        .route("/pipelines/{name}/guard/{direction}/allow", post(allow))
        .route("/pipelines/{name}/guard/{direction}/discard", post(discard))
        .with_state(guards)
}

/// The guard of a pipeline, per direction.
#[derive(Debug, Serialize, ToSchema)]
pub struct GuardStatus {
    pub pipeline: String,
    /// Deletes bound for the lists (rows deleted in PostgreSQL).
    pub push: DirectionStatus,
    /// Deletes bound for the tables (items deleted in a list, pull `on_delete` not `ignore`).
    pub pull: DirectionStatus,
}

/// What a decision did.
#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionDone {
    pub direction: String,
    /// `allow` or `discard`.
    pub decision: String,
    /// Deletes released (allow) or dropped (discard).
    pub deletes: usize,
}

fn handle(guards: &GuardRegistry, name: &str) -> Result<DeleteGuardHandle, ApiError> {
    guards
        .get(name)
        .ok_or_else(|| ApiError::unknown_pipeline(name))
}

#[utoipa::path(get, path = "/pipelines/{name}/guard", tag = "guard",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Per direction: paused, held deletes, threshold, the first keys", body = GuardStatus),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn status(
    State(guards): State<GuardRegistry>,
    Path(name): Path<String>,
) -> Result<axum::Json<GuardStatus>, ApiError> {
    let h = handle(&guards, &name)?;
    Ok(axum::Json(GuardStatus {
        pipeline: name,
        push: h.status(Direction::Push),
        pull: h.status(Direction::Pull),
    }))
}

/// Checks the direction, then hands the decision to the processor.
async fn decide(
    guards: &GuardRegistry,
    name: &str,
    direction: &str,
    decision: Decision,
) -> Result<axum::Json<DecisionDone>, ApiError> {
    let h = handle(guards, name)?;
    let dir = match direction {
        "push" => Direction::Push,
        "pull" => Direction::Pull,
        other => {
            return Err(ApiError::bad_param(
                "direction",
                format!("unknown direction {other:?} (push or pull)"),
            ));
        }
    };
    let deletes = h.decide(dir, decision).await.map_err(|e| match e {
        DecisionError::NotPaused(_) => {
            ApiError::new(StatusCode::CONFLICT, "not_paused", e.to_string())
        }
        DecisionError::NotTaken | DecisionError::Resnapshot { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    })?;
    Ok(axum::Json(DecisionDone {
        direction: direction.to_string(),
        decision: match decision {
            Decision::Allow => "allow",
            Decision::Discard => "discard",
        }
        .into(),
        deletes,
    }))
}

#[utoipa::path(post, path = "/pipelines/{name}/guard/{direction}/allow", tag = "guard",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("direction" = String, Path, description = "`push` (deletes bound for the lists) or `pull` (bound for the tables)"),
    ),
    responses(
        (status = 200, description = "The held deletes are released and written now", body = DecisionDone),
        (status = 400, description = "Unknown direction", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The direction is not paused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The processor did not take the decision, or the rows could not be read again", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn allow(
    State(guards): State<GuardRegistry>,
    Path((name, direction)): Path<(String, String)>,
) -> Result<axum::Json<DecisionDone>, ApiError> {
    decide(&guards, &name, &direction, Decision::Allow).await
}

#[utoipa::path(post, path = "/pipelines/{name}/guard/{direction}/discard", tag = "guard",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("direction" = String, Path, description = "`push` (deletes bound for the lists) or `pull` (bound for the tables)"),
    ),
    responses(
        (status = 200, description = "The held deletes are dropped: push, the items stay in the lists; pull, the items are re-created from the rows (answered once the rows were read again)", body = DecisionDone),
        (status = 400, description = "Unknown direction", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The direction is not paused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The processor did not take the decision, or the rows could not be read again", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn discard(
    State(guards): State<GuardRegistry>,
    Path((name, direction)): Path<(String, String)>,
) -> Result<axum::Json<DecisionDone>, ApiError> {
    decide(&guards, &name, &direction, Decision::Discard).await
}
