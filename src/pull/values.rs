//! The row side of the return path: values between list fields and PostgreSQL columns.
//!
//! Owns the applier session the return processor writes through (its replication origin is what
//! lets capture mark our writes, so the push side skips them), the column text of a pulled field
//! (a person's email, a lookup's foreign key), the row read back as a ledger projection, and the
//! key columns a SyncKey stands for. Invariant: a database connection failure is a retryable
//! error of the flush; a value the database rejects is the row's fault (a dead letter).

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use super::processor::PendingPull;
use super::{Applied, Applier, ApplyError, RowChange, RowChangeKind, quote_ident};
use crate::config::{FieldMapping, FieldType, TableName};
use crate::graph::GraphError;
use crate::graph::ops::USER_INFORMATION_LIST;
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::convert::{self, Unmappable};
use crate::process::ledger::{self, Entry};
use crate::process::processor::Processor;
use crate::process::provision::TableFacts;
use crate::process::row::{Cell, Row, float4_value};

/// The key column values a SyncKey stands for (see [`crate::process::sync_key`]).
pub(super) fn key_values(columns: &[String], sk: &str) -> Vec<(String, Option<String>)> {
    if columns.len() == 1 {
        return vec![(columns[0].clone(), Some(sk.to_string()))];
    }
    let parts: Vec<Option<String>> = serde_json::from_str(sk).unwrap_or_default();
    columns.iter().cloned().zip(parts).collect()
}

/// `WHERE` conditions selecting the row by its key columns, as `$1…$n` text parameters cast
/// to the columns' types, and those parameters for the row `sk`.
pub(super) fn key_match(facts: &TableFacts, sk: &str) -> (String, Vec<Option<String>>) {
    let conds: Vec<String> = facts
        .key_columns
        .iter()
        .zip(&facts.key_types)
        .enumerate()
        .map(|(i, (c, t))| format!("{} = ${}::text::{t}", quote_ident(c), i + 1))
        .collect();
    let params = key_values(&facts.key_columns, sk)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    (conds.join(" AND "), params)
}

/// Text parameters as the driver takes them.
pub(super) fn sql_params(
    params: &[Option<String>],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// A `to_json` value as a cell (what `convert` accepts for every field type).
fn cell_from_json(v: &Json) -> Cell {
    match v {
        Json::Null => Cell::Null,
        Json::Bool(b) => Cell::Bool(*b),
        Json::Number(n) => n
            .as_i64()
            .map_or_else(|| Cell::Decimal(n.to_string()), Cell::Int),
        Json::String(s) => Cell::Text(s.clone()),
        Json::Array(a) => Cell::Array(a.iter().map(cell_from_json).collect()),
        Json::Object(_) => Cell::Text(v.to_string()),
    }
}

/// A pulled column value back as a cell, so a pending push can carry the target's value.
pub(super) fn cell_from_text(m: &FieldMapping, text: Option<&str>) -> Cell {
    match text {
        None => Cell::Null,
        Some(t) if m.field_type == FieldType::MultiChoice => {
            let inner = t.trim_start_matches('{').trim_end_matches('}');
            Cell::Array(
                inner
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| Cell::Text(s.trim_matches('"').replace("\\\"", "\"")))
                    .collect(),
            )
        }
        Some(t) => Cell::Text(t.to_string()),
    }
}

/// Longest value a dead letter's reason quotes (a note can hold 63,999 characters).
const MAX_QUOTED_VALUE: usize = 200;

/// The reason of a row change PostgreSQL refused: its message, and the field and value of the
/// column it names (found by the applier when the database does not say), so an operator sees
/// which list value the row cannot take.
pub(super) fn rejected_reason(
    e: &ApplyError,
    fields: &[FieldMapping],
    values: &[(String, Option<String>)],
) -> String {
    let ApplyError::Rejected {
        column: Some(column),
        ..
    } = e
    else {
        return e.to_string();
    };
    let field = fields
        .iter()
        .find(|f| &f.column == column)
        .map_or("?", |f| f.field.as_str());
    match values.iter().find(|(c, _)| c == column) {
        Some((_, v)) => {
            let v = v.as_deref().map_or_else(
                || "NULL".to_string(),
                |v| {
                    let q: String = v.chars().take(MAX_QUOTED_VALUE).collect();
                    let more = if q.len() < v.len() { "…" } else { "" };
                    format!("{q:?}{more}")
                },
            );
            format!("{e}; field {field} = {v}")
        }
        None => e.to_string(),
    }
}

/// The column of `values` a data error names: that value alone is refused, the others may
/// still be written. `None`: the error is not about one value.
pub(super) fn refused_column(
    e: &ApplyError,
    values: &[(String, Option<String>)],
) -> Option<String> {
    match e {
        ApplyError::Rejected {
            column: Some(c), ..
        } if values.iter().any(|(v, _)| v == c) => Some(c.clone()),
        _ => None,
    }
}

/// What a conditional write to a list item came back with.
pub(super) enum ItemWrite {
    /// Written; the item's new eTag.
    Written(Option<String>),
    /// 412: the item is no longer at the version the write was conditional on.
    Changed,
}

impl<L: EventLog + 'static> Processor<L> {
    /// Writes `fields` to the item of `p` if it is still at version `if_match`.
    pub(super) async fn write_item(
        &self,
        p: &PendingPull,
        fields: &Map<String, Json>,
        if_match: Option<&str>,
    ) -> Result<ItemWrite, GraphError> {
        let written = self
            .client
            .update_item_fields(
                &self.targets.site_id,
                &p.list_id,
                &p.item_id,
                fields,
                if_match,
            )
            .await;
        match written {
            Ok(u) => Ok(ItemWrite::Written(u.e_tag)),
            Err(GraphError::PreconditionFailed { .. }) => Ok(ItemWrite::Changed),
            Err(e) => Err(e),
        }
    }

    fn applier(&mut self) -> Result<&mut Applier, ProcessError> {
        self.applier
            .as_mut()
            .ok_or_else(|| ProcessError::Config("the return path has no PostgreSQL applier".into()))
    }

    /// Applies one row change; connection failures are retryable errors of the flush (the
    /// applier reconnects on the next call), data rejections are returned for the DLQ.
    pub(super) async fn apply(
        &mut self,
        change: RowChange,
    ) -> Result<Result<Applied, ApplyError>, ProcessError> {
        match self.applier()?.apply(&change).await {
            Err(e) if e.is_retryable() => Err(ProcessError::Catalog(e.to_string())),
            // Not the row's fault: stop rather than dead-letter every change.
            Err(ApplyError::Config(m)) => Err(ProcessError::Config(m)),
            other => Ok(other),
        }
    }

    pub(super) fn table_name(&self, ti: usize) -> TableName {
        self.tables[ti].entry.table.clone()
    }

    /// The insert of a new row of table `ti`: the applier inserts the key columns from `key`,
    /// `values` give the others. Empty values are left out (SharePoint omits empty fields) so
    /// the columns' defaults apply.
    pub(super) fn row_insert(
        &self,
        ti: usize,
        key: Vec<(String, Option<String>)>,
        values: Vec<(String, Option<String>)>,
    ) -> RowChange {
        let values = values
            .into_iter()
            .filter(|(c, v)| v.is_some() && !key.iter().any(|(k, _)| k == c))
            .collect();
        RowChange {
            table: self.table_name(ti),
            key,
            kind: RowChangeKind::Insert { values },
        }
    }

    /// Column text of a pulled field (persons → email, lookups → foreign key).
    pub(super) async fn pulled_text(
        &mut self,
        f: &FieldMapping,
        canon: &[(String, Json)],
    ) -> Result<Result<Option<String>, Unmappable>, ProcessError> {
        let id = canon
            .iter()
            .find(|(k, _)| k.ends_with("LookupId"))
            .and_then(|(_, v)| v.as_u64());
        let resolved = match (f.field_type, id) {
            (FieldType::Person, Some(id)) => self.email(id).await?,
            (FieldType::Lookup, Some(id)) => self.lookup_key(f, &id.to_string())?,
            _ => None,
        };
        Ok(convert::column_text(canon, f, resolved))
    }

    async fn email(&mut self, id: u64) -> Result<Option<String>, ProcessError> {
        if let Some(e) = self.emails.get(&id) {
            return Ok(e.clone());
        }
        let item = self
            .client
            .get_item(
                &self.targets.site_id,
                USER_INFORMATION_LIST,
                &id.to_string(),
            )
            .await?;
        let email = item.and_then(|i| {
            i.fields
                .get("EMail")
                .and_then(Json::as_str)
                .map(str::to_owned)
        });
        self.emails.insert(id, email.clone());
        Ok(email)
    }

    /// The foreign key (the referenced row's SyncKey) of a lookup item id.
    fn lookup_key(&self, f: &FieldMapping, item_id: &str) -> Result<Option<String>, ProcessError> {
        let list = f.lookup_list.as_deref().unwrap_or_default();
        let Some(list_id) = self.targets.list_id(list) else {
            return Ok(None);
        };
        let Some(target) = self
            .tables
            .iter()
            .find(|t| t.entry.lists().any(|l| l == list))
        else {
            return Ok(None);
        };
        Ok(self
            .ledger_key_of_item(&target.table, list_id, item_id)?
            .and_then(|k| ledger::split_key(&k).map(|(_, sk)| sk)))
    }

    /// The ledger key of the row of `table` whose live item is `list_id/item_id` (a scan).
    pub(super) fn ledger_key_of_item(
        &self,
        table: &str,
        list_id: &str,
        item_id: &str,
    ) -> Result<Option<Vec<u8>>, ProcessError> {
        for (k, e) in self.ledger.scan_table(table)? {
            if e.item
                .as_ref()
                .is_some_and(|i| i.list_id == list_id && i.item_id == item_id)
            {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// The row's mapped projection as it is now in PostgreSQL (`None`: no such row, or a value
    /// that cannot be read back; then no source-side change is assumed).
    pub(super) async fn source_projection(
        &mut self,
        ti: usize,
        sk: &str,
        entry: &Entry,
    ) -> Result<Option<BTreeMap<String, Json>>, ProcessError> {
        let facts = self.facts[ti].clone();
        let fields = self.tables[ti].push_fields.clone();
        if fields.is_empty() || facts.key_columns.is_empty() {
            return Ok(None);
        }
        let q = quote_ident;
        let exprs: Vec<String> = fields
            .iter()
            .map(|f| {
                let c = q(&f.column);
                match facts.column_types.get(&f.column).map(String::as_str) {
                    Some("json" | "jsonb") => format!("to_json({c}::text)"),
                    Some(t) if t.starts_with("timestamp") && !t.contains("with time zone") => {
                        format!("to_json(to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'))")
                    }
                    _ => format!("to_json({c})"),
                }
            })
            .collect();
        let (conds, params) = key_match(&facts, sk);
        let t = &self.tables[ti].entry.table;
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE {conds}",
            exprs
                .iter()
                .map(|e| format!("({e})::text"))
                .collect::<Vec<_>>()
                .join(", "),
            q(&t.schema),
            q(&t.name),
        );
        let client = self.catalog().await?;
        let row = client
            .query_opt(&sql, &sql_params(&params))
            .await
            .map_err(|e| ProcessError::Catalog(format!("reading the row back: {e}")))?;
        let Some(row) = row else { return Ok(None) };
        let mut cells = Row::new();
        for (i, f) in fields.iter().enumerate() {
            let v: Option<String> = row.get(i);
            let v = v
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Json::Null);
            let cell = match (v.as_f64(), facts.column_types.get(&f.column)) {
                // The same float the push path derived from the captured float4.
                (Some(x), Some(t)) if t == "real" => Cell::Float(float4_value(x as f32)),
                _ => cell_from_json(&v),
            };
            cells.insert(f.column.clone(), cell);
        }
        Ok(self.project(ti, &cells, entry).await.ok())
    }

    /// The catalog connection (reconnected when closed): reads rows back, evaluates key
    /// defaults, re-emits rows. Not the applier's session: these are not our writes.
    pub(super) async fn catalog(&mut self) -> Result<&tokio_postgres::Client, ProcessError> {
        if self.catalog.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, conn) = crate::pg::connect_source(&self.cfg.pipeline.source).await?;
            tokio::spawn(conn);
            self.catalog = Some(client);
        }
        Ok(self.catalog.as_ref().expect("connected"))
    }
}
