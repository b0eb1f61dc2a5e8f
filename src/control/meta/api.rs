//! `GET /runs` and `GET /runs/{id}`: the run history, read from the meta-store(s) of the
//! pipelines this process runs (one per distinct `control.meta_url`).
//!
//! `GET /runs?pipeline=&kind=&status=&limit=&before=` answers `{"runs": [...], "next": cursor}`,
//! newest first (by start time, then run id); `limit` is 1–500 (default 50); pass `next` as
//! `before` for the next page (absent on the last). `GET /runs/{id}` answers one run or 404.
//! Bad input is a 400 naming the parameter; an unreachable meta-store a 503.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use uuid::Uuid;

use super::projector::{RUN_COLUMNS, event_from_row};
use super::{MetaDb, MetaError, RunEvent};

/// Largest page of `GET /runs`.
pub const MAX_RUNS_PAGE: i64 = 500;
const DEFAULT_RUNS_PAGE: i64 = 50;

/// The meta-stores of the running pipelines, by database URL (pipelines sharing one share it).
#[derive(Debug, Clone, Default)]
pub struct MetaRegistry {
    dbs: Arc<Mutex<BTreeMap<String, Arc<MetaDb>>>>,
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

fn problem(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn unavailable(e: &MetaError) -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// A page position: the start time and run id of the last run of the previous page.
fn parse_cursor(s: &str) -> Option<(i64, Uuid)> {
    let (ms, id) = s.split_once('_')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

fn cursor(e: &RunEvent) -> String {
    format!("{}_{}", e.started_ms, e.run_id)
}

async fn list_runs(
    State(meta): State<MetaRegistry>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    for key in q.keys() {
        if !["pipeline", "kind", "status", "limit", "before"].contains(&key.as_str()) {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter `{key}`"),
            );
        }
    }
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => DEFAULT_RUNS_PAGE,
        Some(Ok(l)) if (1..=MAX_RUNS_PAGE).contains(&l) => l,
        Some(_) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("`limit` must be a number from 1 to {MAX_RUNS_PAGE}"),
            );
        }
    };
    let before = match q.get("before").map(|b| parse_cursor(b)) {
        None => (i64::MAX, Uuid::max()),
        Some(Some(c)) => c,
        Some(None) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "`before` must be a cursor from a previous page's `next`".into(),
            );
        }
    };
    let kinds: Vec<&str> = super::RunKind::ALL.iter().map(|k| k.as_str()).collect();
    if let Some(k) = q.get("kind")
        && !kinds.contains(&k.as_str())
    {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("`kind` must be one of {}", kinds.join(", ")),
        );
    }
    if let Some(s) = q.get("status")
        && !["running", "succeeded", "failed", "cancelled"].contains(&s.as_str())
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "`status` must be one of running, succeeded, failed, cancelled".into(),
        );
    }
    let mut runs = Vec::new();
    for db in meta.all() {
        match page(&db, &q, before, limit).await {
            Ok(mut r) => runs.append(&mut r),
            Err(e) => return unavailable(&e),
        }
    }
    runs.sort_by_key(|r| std::cmp::Reverse((r.started_ms, r.run_id)));
    runs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = (runs.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| runs.last().map(cursor))
        .flatten();
    axum::Json(serde_json::json!({ "runs": runs, "next": next })).into_response()
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

async fn get_run(State(meta): State<MetaRegistry>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("run id {id:?} is not a UUID"),
        );
    };
    for db in meta.all() {
        let found = async {
            let client = db.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {RUN_COLUMNS} FROM syncbridge_meta.runs WHERE run_id = $1"),
                    &[&id],
                )
                .await?;
            row.as_ref().map(event_from_row).transpose()
        }
        .await;
        match found {
            Ok(Some(run)) => return axum::Json(run).into_response(),
            Ok(None) => {}
            Err(e) => return unavailable(&e),
        }
    }
    problem(StatusCode::NOT_FOUND, format!("no run {id}"))
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
