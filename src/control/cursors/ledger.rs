//! Ledger browser: `GET /pipelines/{name}/lists/{list}/ledger[?after=…&limit=…]` pages through
//! what the ledger knows about one list (read scope): per row its table and sync key, item id,
//! the hash and time of the last confirmed write or read, and what is pending (a create in
//! flight, the old item of a move still to delete, fields sent but unconfirmed).
//!
//! It reads the ledger's compacted changelog (the latest entry per row; see
//! [`crate::process::ledger`]) with a throwaway consumer, as the cursor routes do, so it never
//! waits on the processor, which owns the sled store. The changelog can be a moment behind sled
//! for a row being written (the processor appends before it applies), never the other way.
//! Each page reads the whole changelog: fine for a browser's pace, not for a tight loop.
//!
//! Rows are ordered by `(table, key)`; `next` is the opaque cursor of the next page (`after`).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use serde::Serialize;
use utoipa::ToSchema;

use super::{CursorRegistry, find_list, read_to_end};
use crate::control::problem::{ApiError, Problem};
use crate::process::ledger::{Entry, split_key};

/// Rows per page unless `limit` says otherwise: one screen of the browser.
const DEFAULT_PAGE: usize = 50;
/// Upper bound of `limit`: a page stays a small answer.
const MAX_PAGE: usize = 500;

/// One row the ledger knows in the list.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LedgerRow {
    /// The source table, `schema.table`.
    pub table: String,
    /// The row's sync key.
    pub key: String,
    /// The live item's id in this list, if it has one here.
    pub item_id: Option<String>,
    /// Hash of the mapped fields last confirmed written or read.
    pub hash: Option<String>,
    /// `push` (last written by SyncBridge) or `pull` (last read from the list).
    pub provenance: String,
    /// When the fields were last written to the list (ms since the epoch).
    pub pushed_at_ms: Option<i64>,
    /// When the fields were last read from the list (ms since the epoch).
    pub pulled_at_ms: Option<i64>,
    /// What is pending: `create` (a create in flight), `delete` (the old item of a move),
    /// `update` (fields sent, outcome not recorded); empty when settled.
    pub pending: Vec<String>,
    /// The fields of a pending update.
    pub in_flight: Vec<String>,
}

/// A page of the ledger of one list.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub list: String,
    pub list_id: String,
    /// Rows after `after`, ordered by table then key, at most `limit`.
    pub rows: Vec<LedgerRow>,
    /// Rows the ledger knows in this list, in all.
    pub total: usize,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// The row view of `entry` when it concerns list `list_id` (its item, a create or a move there).
fn row(ledger_key: &[u8], entry: &Entry, list_id: &str) -> Option<LedgerRow> {
    let is = |l: &str| l.eq_ignore_ascii_case(list_id);
    let item = entry.item.as_ref().filter(|i| is(&i.list_id));
    let creating = entry.intent.as_ref().is_some_and(|i| is(&i.create_in));
    let deleting = entry
        .pending_delete
        .as_ref()
        .is_some_and(|i| is(&i.list_id));
    if item.is_none() && !creating && !deleting {
        return None;
    }
    let (table, key) = split_key(ledger_key)?;
    let mut pending = Vec::new();
    for (flag, what) in [
        (creating, "create"),
        (deleting, "delete"),
        (item.is_some() && !entry.in_flight.is_empty(), "update"),
    ] {
        if flag {
            pending.push(what.to_string());
        }
    }
    Some(LedgerRow {
        table,
        key,
        item_id: item.map(|i| i.item_id.clone()),
        hash: entry.hash.clone(),
        provenance: serde_json::to_value(entry.provenance)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        pushed_at_ms: entry.pushed_at_ms,
        pulled_at_ms: entry.pulled_at_ms,
        pending,
        in_flight: entry.in_flight.iter().cloned().collect(),
    })
}

/// The page after `after` (a hex ledger key) of the rows of `entries` in list `list_id`.
fn page(
    entries: &BTreeMap<Vec<u8>, Entry>,
    list_id: &str,
    after: Option<&[u8]>,
    limit: usize,
) -> (Vec<LedgerRow>, usize, Option<String>) {
    let mine: Vec<(&Vec<u8>, LedgerRow)> = entries
        .iter()
        .filter_map(|(k, e)| Some((k, row(k, e, list_id)?)))
        .collect();
    let total = mine.len();
    let mut rest = mine
        .into_iter()
        .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
        .peekable();
    let mut rows = Vec::new();
    let mut last = None;
    while rows.len() < limit {
        let Some((k, r)) = rest.next() else { break };
        last = Some(k);
        rows.push(r);
    }
    let next = rest.peek().and(last).map(hex::encode);
    (rows, total, next)
}

fn parse_query(q: &BTreeMap<String, String>) -> Result<(Option<Vec<u8>>, usize), ApiError> {
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "after" | "limit")) {
        return Err(ApiError::bad_param(
            k,
            format!("unknown query parameter `{k}` (known: after, limit)"),
        ));
    }
    let after = match q.get("after").filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => Some(hex::decode(a).map_err(|_| {
            ApiError::bad_param("after", "not a cursor this API answered (`next`)")
        })?),
    };
    let limit = ApiError::page_limit(q.get("limit"), DEFAULT_PAGE, MAX_PAGE)?;
    Ok((after, limit))
}

#[utoipa::path(get, path = "/pipelines/{name}/lists/{list}/ledger", tag = "cursors",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("list" = String, Path, description = "The list's display name or id"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
        ("limit" = Option<usize>, Query, description = "Rows per page, 1–500 (default 50)"),
    ),
    responses(
        (status = 200, description = "A page of the rows the ledger knows in the list", body = LedgerPage),
        (status = 400, description = "Unknown list, bad `after` or `limit`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The ledger changelog cannot be read", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn ledger(
    State(registry): State<CursorRegistry>,
    Path((name, list)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<axum::Json<LedgerPage>, ApiError> {
    let h = registry.get(&name)?;
    let s = &h.spec;
    let l = find_list(s, &list)?;
    let (after, limit) = parse_query(&q)?;
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    read_to_end(&s.log, &s.ledger_topic, |r| {
        // A tombstone (no value) or an unreadable value: the row is gone from the ledger.
        match r
            .record
            .value
            .as_deref()
            .map(serde_json::from_slice::<Entry>)
        {
            Some(Ok(e)) => entries.insert(r.record.key, e),
            _ => entries.remove(&r.record.key),
        };
    })
    .await?;
    let (rows, total, next) = page(&entries, &l.id, after.as_deref(), limit);
    Ok(axum::Json(LedgerPage {
        list: l.name.clone(),
        list_id: l.id.clone(),
        rows,
        total,
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ledger::{Intent, ItemRef, key};

    fn entry(list: &str, item: &str) -> Entry {
        Entry {
            item: Some(ItemRef {
                list_id: list.into(),
                item_id: item.into(),
            }),
            hash: Some(format!("h{item}")),
            ..Entry::default()
        }
    }

    fn ledger() -> BTreeMap<Vec<u8>, Entry> {
        let mut m = BTreeMap::new();
        for i in 0..5 {
            m.insert(
                key("public.t", &format!("k{i}")),
                entry("L1", &i.to_string()),
            );
        }
        m.insert(key("public.t", "other"), entry("L2", "9"));
        let creating = Entry {
            intent: Some(Intent {
                create_in: "l1".into(),
            }),
            ..Entry::default()
        };
        m.insert(key("public.u", "new"), creating);
        let mut moving = entry("L2", "7");
        moving.pending_delete = Some(ItemRef {
            list_id: "L1".into(),
            item_id: "3".into(),
        });
        moving.in_flight.insert("Title".into());
        m.insert(key("public.u", "moved"), moving);
        m
    }

    #[test]
    fn pages_cover_the_list_once_in_key_order() {
        let m = ledger();
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (rows, total, next) = page(&m, "L1", after.as_deref(), 3);
            assert_eq!(
                total, 7,
                "5 items, a create, a move's old item; not list L2's"
            );
            assert!(rows.len() <= 3);
            seen.extend(rows.into_iter().map(|r| format!("{}/{}", r.table, r.key)));
            match next {
                Some(n) => after = Some(hex::decode(n).unwrap()),
                None => break,
            }
        }
        let expected = [
            "public.t/k0",
            "public.t/k1",
            "public.t/k2",
            "public.t/k3",
            "public.t/k4",
            "public.u/moved",
            "public.u/new",
        ];
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_row_says_what_is_pending_in_this_list() {
        let m = ledger();
        let (rows, _, _) = page(&m, "L1", None, MAX_PAGE);
        let by_key = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
        let settled = by_key("k1");
        assert_eq!(settled.item_id.as_deref(), Some("1"));
        assert_eq!(settled.hash.as_deref(), Some("h1"));
        assert_eq!(settled.provenance, "push");
        assert!(settled.pending.is_empty());
        let new = by_key("new");
        assert_eq!(
            (new.item_id, new.pending),
            (None, vec!["create".to_string()])
        );
        // The moved row's live item is in L2: here only its old item, waiting to be deleted;
        // its in-flight update concerns L2, not this list.
        let moved = by_key("moved");
        assert_eq!(
            (moved.item_id, moved.pending),
            (None, vec!["delete".to_string()])
        );
        let (in_l2, total, next) = page(&m, "L2", None, MAX_PAGE);
        assert_eq!((total, next), (2, None));
        let moved = in_l2.iter().find(|r| r.key == "moved").unwrap();
        assert_eq!(moved.pending, vec!["update".to_string()]);
        assert_eq!(moved.in_flight, vec!["Title".to_string()]);
    }

    #[test]
    fn bad_query_names_the_parameter() {
        let q = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(parse_query(&q(&[])).unwrap(), (None, DEFAULT_PAGE));
        for (pairs, field) in [
            (vec![("limit", "0")], "limit"),
            (vec![("limit", "501")], "limit"),
            (vec![("after", "zz")], "after"),
            (vec![("offset", "1")], "offset"),
        ] {
            let err = parse_query(&q(&pairs)).unwrap_err();
            assert_eq!(err.param.unwrap().name, field, "{pairs:?}");
        }
    }
}
