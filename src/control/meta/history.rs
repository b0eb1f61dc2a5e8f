//! `GET /pipelines/{name}/rows/{table}/{key}/history?limit=&before=`: what happened to one row,
//! end to end, from the ledger audit (`syncbridge_meta.audit`, see `crate::process::audit`).
//!
//! Each entry reads as the row's lineage: commit LSN of the source change → its log position
//! (topic/partition/offset) → the processor's decision (`operation`) → the Graph request
//! (`request_id`, `client_request_id`, HTTP status) → the list, item and eTag. Newest first
//! (by time, then position in the audit topic); `limit` 1–500 (default 50); pass `next` as
//! `before` for the older page (absent on the last). `key` is the row's SyncKey (the key
//! column's text; a JSON array for composite keys), percent-encoded in the path.
//!
//! 404: no pipeline of that name runs in this process. 400 (naming the parameter): `table` is
//! not one the pipeline syncs, `key` is empty or too long, `limit` or `before` is bad, or an
//! unknown query parameter. 503: the meta-store cannot be reached. A row without records (none
//! yet, or all pruned) answers an empty page.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::api::{MetaRegistry, PipelineMeta};
use super::{MetaDb, MetaError};
use crate::control::problem::ApiError;

/// Largest page.
pub const MAX_HISTORY_PAGE: i64 = 500;
/// Default page: a row's recent story fits in one screen.
const DEFAULT_HISTORY_PAGE: i64 = 50;
/// Longest SyncKey accepted: SharePoint text columns hold 255 characters; a composite key's JSON
/// is longer but not by this much.
const MAX_KEY_LEN: usize = 1024;

/// One page of a row's history.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistoryPage {
    pub pipeline: String,
    /// `schema.table`.
    pub table: String,
    /// The row's SyncKey.
    pub key: String,
    /// Newest first.
    pub entries: Vec<HistoryEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One decision about the row, in lineage order: source → log → decision → Graph → item.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistoryEntry {
    /// Commit LSN of the source change (`X/Y`), when known.
    pub lsn: Option<String>,
    /// The change event's position in the log.
    pub source: Option<HistorySource>,
    /// `create`, `update`, `delete`, `move`, `adopt`, `skip-unchanged`, `dead-letter`,
    /// `pull-apply` or `conflict`.
    pub operation: String,
    /// The Graph request that carried it (absent when nothing was sent).
    pub graph: Option<HistoryGraph>,
    pub list_id: Option<String>,
    pub item_id: Option<String>,
    pub etag: Option<String>,
    /// Hash of the mapped fields the item holds afterwards.
    pub hash: Option<String>,
    /// Why, in words.
    pub detail: Option<String>,
    /// When it was decided (RFC 3339, UTC) and the same in Unix milliseconds.
    pub at: String,
    pub at_ms: i64,
    /// The audit record's id.
    pub event_id: String,
}

/// Where a change event sits in the log.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistorySource {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A Graph request's ids and answer.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct HistoryGraph {
    /// Microsoft's `request-id`.
    pub request_id: Option<String>,
    /// Ours (`client-request-id`).
    pub client_request_id: Option<String>,
    /// HTTP status of the (inner `$batch`) response.
    pub status: Option<u16>,
}

/// A page position: time and audit-topic position of the last entry of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    at_ms: i64,
    partition: i32,
    offset: i64,
}

impl Cursor {
    /// Before everything: the first page.
    const NEWEST: Cursor = Cursor {
        at_ms: i64::MAX,
        partition: i32::MAX,
        offset: i64::MAX,
    };

    fn parse(s: &str) -> Option<Cursor> {
        let mut parts = s.split('_');
        let c = Cursor {
            at_ms: parts.next()?.parse().ok()?,
            partition: parts.next()?.parse().ok()?,
            offset: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(c)
    }

    fn text(&self) -> String {
        format!("{}_{}_{}", self.at_ms, self.partition, self.offset)
    }
}

/// A validated request.
#[derive(Debug, PartialEq)]
struct Request {
    limit: i64,
    before: Cursor,
}

/// Checks the path and query against the pipeline (see the module docs for what is refused).
fn parse_request(
    p: &PipelineMeta,
    table: &str,
    key: &str,
    q: &HashMap<String, String>,
) -> Result<Request, ApiError> {
    if let Some(k) = q
        .keys()
        .find(|k| !["limit", "before"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_param(
            k,
            format!("unknown query parameter `{k}` (limit, before)"),
        ));
    }
    if !p.tables.iter().any(|t| t == table) {
        return Err(ApiError::bad_param(
            "table",
            format!(
                "{table:?} is not a table this pipeline syncs (one of: {})",
                p.tables.join(", ")
            ),
        ));
    }
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::bad_param(
            "key",
            format!("the row key must be 1 to {MAX_KEY_LEN} bytes (the row's SyncKey)"),
        ));
    }
    let limit = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => DEFAULT_HISTORY_PAGE,
        Some(Ok(l)) if (1..=MAX_HISTORY_PAGE).contains(&l) => l,
        Some(_) => {
            return Err(ApiError::bad_param(
                "limit",
                format!("`limit` must be a number from 1 to {MAX_HISTORY_PAGE}"),
            ));
        }
    };
    let before = match q.get("before").map(|b| Cursor::parse(b)) {
        None => Cursor::NEWEST,
        Some(Some(c)) => c,
        Some(None) => {
            return Err(ApiError::bad_param(
                "before",
                "`before` must be the `next` of a previous page",
            ));
        }
    };
    Ok(Request { limit, before })
}

/// The row-history route, with its own state: merge it into the control router.
pub fn routes(meta: MetaRegistry) -> Router {
    Router::new()
        .route(
            "/pipelines/{name}/rows/{table}/{key}/history",
            get(row_history),
        )
        .with_state(meta)
}

#[utoipa::path(get, path = "/pipelines/{name}/rows/{table}/{key}/history", tag = "history",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("table" = String, Path, description = "A synced table, `schema.table`"),
        ("key" = String, Path, description = "The row's SyncKey (percent-encoded)"),
        ("limit" = Option<i64>, Query, description = "Entries per page, 1–500 (default 50)"),
        ("before" = Option<String>, Query, description = "`next` of the previous page"),
    ),
    responses(
        (status = 200, description = "The row's audit records, newest first", body = HistoryPage),
        (status = 400, description = "Bad table, key, limit or before (named in invalid-params)", body = crate::control::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = crate::control::problem::Problem, content_type = "application/problem+json"),
        (status = 503, description = "The meta-store cannot be reached", body = crate::control::problem::Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn row_history(
    State(meta): State<MetaRegistry>,
    Path((name, table, key)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<axum::Json<HistoryPage>, ApiError> {
    let p = meta
        .pipeline(&name)
        .ok_or_else(|| ApiError::unknown_pipeline(&name))?;
    let req = parse_request(&p, &table, &key, &q)?;
    let mut entries = page(&p.db, &name, &table, &key, &req).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "meta_unavailable",
            e.to_string(),
        )
    })?;
    // One more than asked was read: it says whether an older page exists.
    let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
    let next = (entries.len() > limit).then(|| {
        entries.truncate(limit);
        entries.last().map(|(_, c)| c.text())
    });
    Ok(axum::Json(HistoryPage {
        pipeline: name,
        table,
        key,
        entries: entries.into_iter().map(|(e, _)| e).collect(),
        next: next.flatten(),
    }))
}

/// `lsn` as PostgreSQL prints it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Up to `limit + 1` entries older than `req.before`, newest first, with their cursors.
async fn page(
    db: &MetaDb,
    pipeline: &str,
    table: &str,
    key: &str,
    req: &Request,
) -> Result<Vec<(HistoryEntry, Cursor)>, MetaError> {
    let client = db.client().await?;
    let rows = client
        .query(
            "SELECT event_id, operation, list_id, item_id, content_hash, lsn, source_topic, \
             source_partition, source_offset, request_id, client_request_id, http_status, etag, \
             detail, at_ms, log_partition, log_offset FROM syncbridge_meta.audit \
             WHERE pipeline = $1 AND table_name = $2 AND row_key = $3 \
             AND (at_ms, log_partition, log_offset) < ($4, $5, $6) \
             ORDER BY at_ms DESC, log_partition DESC, log_offset DESC LIMIT $7",
            &[
                &pipeline,
                &table,
                &key,
                &req.before.at_ms,
                &req.before.partition,
                &req.before.offset,
                &(req.limit + 1),
            ],
        )
        .await?;
    Ok(rows.iter().map(entry_from_row).collect())
}

fn entry_from_row(r: &tokio_postgres::Row) -> (HistoryEntry, Cursor) {
    let at_ms: i64 = r.get("at_ms");
    let source = match (
        r.get::<_, Option<String>>("source_topic"),
        r.get::<_, Option<i32>>("source_partition"),
        r.get::<_, Option<i64>>("source_offset"),
    ) {
        (Some(topic), Some(partition), Some(offset)) => Some(HistorySource {
            topic,
            partition,
            offset,
        }),
        _ => None,
    };
    let graph = HistoryGraph {
        request_id: r.get("request_id"),
        client_request_id: r.get("client_request_id"),
        status: r
            .get::<_, Option<i32>>("http_status")
            .and_then(|s| u16::try_from(s).ok()),
    };
    let sent =
        graph.request_id.is_some() || graph.client_request_id.is_some() || graph.status.is_some();
    let entry = HistoryEntry {
        lsn: r
            .get::<_, Option<i64>>("lsn")
            .map(|l| format_lsn(u64::try_from(l).unwrap_or(0))),
        source,
        operation: r.get("operation"),
        graph: sent.then_some(graph),
        list_id: r.get("list_id"),
        item_id: r.get("item_id"),
        etag: r.get("etag"),
        hash: r.get("content_hash"),
        detail: r.get("detail"),
        at: chrono::DateTime::from_timestamp_millis(at_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
        at_ms,
        event_id: r.get::<_, uuid::Uuid>("event_id").to_string(),
    };
    let cursor = Cursor {
        at_ms,
        partition: r.get("log_partition"),
        offset: r.get("log_offset"),
    };
    (entry, cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> PipelineMeta {
        PipelineMeta {
            db: MetaDb::new("postgres://unused"),
            tables: vec!["public.t".into()],
        }
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cursors_round_trip_and_order_like_the_query() {
        let c = Cursor {
            at_ms: 17,
            partition: 0,
            offset: 9,
        };
        assert_eq!(Cursor::parse(&c.text()), Some(c));
        for bad in ["", "17", "17_0", "17_0_9_1", "x_0_9", "17_0_y"] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
        // The first page starts above every real position.
        let newest = Cursor::NEWEST;
        assert!((newest.at_ms, newest.partition, newest.offset) > (c.at_ms, c.partition, c.offset));
    }

    #[test]
    fn requests_default_and_bound_the_page() {
        let p = pipeline();
        let r = parse_request(&p, "public.t", "42", &query(&[])).unwrap();
        assert_eq!(
            r,
            Request {
                limit: DEFAULT_HISTORY_PAGE,
                before: Cursor::NEWEST
            }
        );
        let r = parse_request(
            &p,
            "public.t",
            "42",
            &query(&[("limit", "500"), ("before", "5_0_3")]),
        )
        .unwrap();
        assert_eq!(r.limit, 500);
        assert_eq!(r.before.offset, 3);
    }

    #[test]
    fn bad_input_names_the_parameter() {
        let p = pipeline();
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for (table, key, q, name) in [
            ("public.x", "1", vec![], "table"),
            ("t", "1", vec![], "table"),
            ("public.t", "", vec![], "key"),
            ("public.t", long.as_str(), vec![], "key"),
            ("public.t", "1", vec![("limit", "0")], "limit"),
            ("public.t", "1", vec![("limit", "501")], "limit"),
            ("public.t", "1", vec![("limit", "x")], "limit"),
            ("public.t", "1", vec![("before", "x")], "before"),
            ("public.t", "1", vec![("nope", "1")], "nope"),
        ] {
            let e = parse_request(&p, table, key, &query(&q)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{table} {key} {q:?}");
            assert_eq!(e.param.unwrap().name, name, "{table} {key} {q:?}");
        }
    }

    #[test]
    fn lsns_print_like_postgres() {
        assert_eq!(format_lsn(0x16B_3748), "0/16B3748");
        assert_eq!(format_lsn((0x16 << 32) | 0xB374_D848), "16/B374D848");
    }
}
