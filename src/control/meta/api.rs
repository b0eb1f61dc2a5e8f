//! `GET /runs` and `GET /runs/{id}`: the run history, read from the meta-store(s) of the
//! pipelines this process runs (one per distinct `control.meta_url`).
//!
//! `GET /runs?pipeline=&kind=&status=&limit=&before=` answers `{"runs": [...], "next": cursor}`,
//! newest first (by start time, then run id); `limit` is 1–500 (default 50); pass `next` as
//! `before` for the next page (absent on the last). `GET /runs/{id}` answers one run or 404.
//! Bad input is a 400 problem naming the parameter; an unreachable meta-store a 503.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::projector::{RUN_COLUMNS, event_from_row};
use super::{MetaDb, MetaError, RunEvent, RunKind, RunStatus};
use crate::control::problem::{ApiError, Problem};

/// Largest page of `GET /runs`.
pub const MAX_RUNS_PAGE: i64 = 500;
const DEFAULT_RUNS_PAGE: i64 = 50;

/// The meta-stores of the running pipelines, by database URL (pipelines sharing one share it).
#[derive(Debug, Clone, Default)]
pub struct MetaRegistry {
    dbs: Arc<Mutex<BTreeMap<String, Arc<MetaDb>>>>,
    /// The running pipelines by name: their store and synced tables (row history).
    pipelines: Arc<Mutex<BTreeMap<String, PipelineMeta>>>,
}

/// A running pipeline as the row history sees it.
#[derive(Debug, Clone)]
pub struct PipelineMeta {
    pub db: Arc<MetaDb>,
    /// Its synced tables, `schema.table`.
    pub tables: Vec<String>,
}

impl MetaRegistry {
    /// The store for `url`, shared with earlier registrations of the same database.
    pub fn register(&self, url: &str) -> Arc<MetaDb> {
        self.dbs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(url.to_string())
            .or_insert_with(|| MetaDb::new(url))
            .clone()
    }

    /// Registers a running pipeline: its meta-store (shared as by [`MetaRegistry::register`])
    /// and the tables it syncs.
    pub fn register_pipeline(&self, name: &str, url: &str, tables: Vec<String>) -> Arc<MetaDb> {
        let db = self.register(url);
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                PipelineMeta {
                    db: db.clone(),
                    tables,
                },
            );
        db
    }

    /// A running pipeline's store and tables.
    pub fn pipeline(&self, name: &str) -> Option<PipelineMeta> {
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<MetaDb>> {
        self.dbs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The run-history routes, with their own state: merge them into the control router.
pub fn routes(meta: MetaRegistry) -> Router {
    Router::new()
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(get_run))
        .with_state(meta)
}

fn unavailable(e: &MetaError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "meta_unavailable",
        e.to_string(),
    )
}

/// A page position: the start time and run id of the last run of the previous page.
fn parse_cursor(s: &str) -> Option<(i64, Uuid)> {
    let (ms, id) = s.split_once('_')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

fn cursor(e: &RunEvent) -> String {
    format!("{}_{}", e.started_ms, e.run_id)
}

/// One page of `GET /runs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunsPage {
    /// Newest first.
    pub runs: Vec<RunEvent>,
    /// Pass as `before` for the next page; absent on the last.
    pub next: Option<String>,
}

/// A filter value that must name one variant of `T` (its snake_case name).
fn one_of<T: serde::de::DeserializeOwned>(
    q: &HashMap<String, String>,
    name: &str,
    allowed: &str,
) -> Result<(), ApiError> {
    match q.get(name) {
        Some(v) if serde_json::from_value::<T>(serde_json::Value::String(v.clone())).is_err() => {
            Err(ApiError::bad_param(
                name,
                format!("`{name}` must be one of {allowed}"),
            ))
        }
        _ => Ok(()),
    }
}

/// The checked query of `GET /runs`: page size and position.
fn runs_query(q: &HashMap<String, String>) -> Result<(i64, (i64, Uuid)), ApiError> {
    if let Some(key) = q.keys().find(|k| !RUNS_PARAMS.contains(&k.as_str())) {
        return Err(ApiError::bad_param(
            key,
            format!(
                "unknown query parameter `{key}` (known: {})",
                RUNS_PARAMS.join(", ")
            ),
        ));
    }
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => DEFAULT_RUNS_PAGE,
        Some(Ok(l)) if (1..=MAX_RUNS_PAGE).contains(&l) => l,
        Some(_) => {
            return Err(ApiError::bad_param(
                "limit",
                format!("`limit` must be a number from 1 to {MAX_RUNS_PAGE}"),
            ));
        }
    };
    let before = match q.get("before").map(|b| parse_cursor(b)) {
        None => (i64::MAX, Uuid::max()),
        Some(Some(c)) => c,
        Some(None) => {
            return Err(ApiError::bad_param(
                "before",
                "`before` must be a cursor from a previous page's `next`",
            ));
        }
    };
    one_of::<RunKind>(q, "kind", RUN_KINDS)?;
    one_of::<RunStatus>(q, "status", "running, succeeded, failed, cancelled")?;
    Ok((limit, before))
}

/// Query parameters `GET /runs` knows.
const RUNS_PARAMS: [&str; 5] = ["pipeline", "kind", "status", "limit", "before"];
/// The run kinds, as the `kind` filter names them.
const RUN_KINDS: &str = "stream, snapshot, resnapshot, dlq_replay, cursor_reset, drift_check, drift_heal, scheduled, list_columns, reload";

#[utoipa::path(get, path = "/runs", tag = "runs",
    params(
        ("pipeline" = Option<String>, Query, description = "Only this pipeline's runs"),
        ("kind" = Option<RunKind>, Query, description = "Only runs of this kind"),
        ("status" = Option<RunStatus>, Query, description = "Only runs in this status"),
        ("limit" = Option<i64>, Query, description = "Page size, 1–500 (default 50)"),
        ("before" = Option<String>, Query, description = "`next` of the previous page"),
    ),
    responses(
        (status = 200, description = "Runs, newest first", body = RunsPage),
        (status = 400, description = "A bad parameter (named in `invalid-params`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A meta-store cannot be reached", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list_runs(
    State(meta): State<MetaRegistry>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<RunsPage>, ApiError> {
    let (limit, before) = runs_query(&q)?;
    let mut runs = Vec::new();
    for db in meta.all() {
        runs.append(
            &mut page(&db, &q, before, limit)
                .await
                .map_err(|e| unavailable(&e))?,
        );
    }
    runs.sort_by_key(|r| std::cmp::Reverse((r.started_ms, r.run_id)));
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    runs.truncate(limit);
    let next = (runs.len() == limit)
        .then(|| runs.last().map(cursor))
        .flatten();
    Ok(axum::Json(RunsPage { runs, next }))
}

async fn page(
    db: &MetaDb,
    q: &HashMap<String, String>,
    before: (i64, Uuid),
    limit: i64,
) -> Result<Vec<RunEvent>, MetaError> {
    let client = db.client().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {RUN_COLUMNS} FROM syncbridge_meta.runs \
                 WHERE ($1::text IS NULL OR pipeline = $1) AND ($2::text IS NULL OR kind = $2) \
                 AND ($3::text IS NULL OR status = $3) AND (started_ms, run_id) < ($4, $5) \
                 ORDER BY started_ms DESC, run_id DESC LIMIT $6"
            ),
            &[
                &q.get("pipeline"),
                &q.get("kind"),
                &q.get("status"),
                &before.0,
                &before.1,
                &limit,
            ],
        )
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// Path parameter `name` as a run id, or a 400 naming it.
pub(crate) fn run_id_param(name: &str, value: &str) -> Result<Uuid, ApiError> {
    value
        .parse::<Uuid>()
        .map_err(|_| ApiError::bad_param(name, format!("run id {value:?} is not a UUID")))
}

#[utoipa::path(get, path = "/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id (UUID)")),
    responses(
        (status = 200, description = "The run", body = RunEvent),
        (status = 400, description = "`id` is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A meta-store cannot be reached", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_run(
    State(meta): State<MetaRegistry>,
    Path(id): Path<String>,
) -> Result<axum::Json<RunEvent>, ApiError> {
    let id = run_id_param("id", &id)?;
    for db in meta.all() {
        let client = db.client().await.map_err(|e| unavailable(&e))?;
        let row = client
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM syncbridge_meta.runs WHERE run_id = $1"),
                &[&id],
            )
            .await
            .map_err(|e| unavailable(&e.into()))?;
        if let Some(row) = row {
            return event_from_row(&row)
                .map(axum::Json)
                .map_err(|e| unavailable(&e));
        }
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no run {id}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let id = Uuid::new_v4();
        assert_eq!(parse_cursor(&format!("17_{id}")), Some((17, id)));
        assert_eq!(parse_cursor("17"), None);
        assert_eq!(parse_cursor("x_y"), None);
    }
}
