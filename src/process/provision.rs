//! Provisioning: every list a pipeline writes to exists with the columns its mapping needs.
//!
//! - A missing list is created with one column per mapped field (type from the mapping, choices,
//!   `required` from the column's NOT NULL) plus the hidden `SyncKey` text column, indexed and
//!   unique — the key of idempotent creates.
//! - An existing list is verified: each mapped field must exist with a compatible type facet (and
//!   every configured choice), and `SyncKey` must be indexed and unique. All mismatches of all
//!   lists are reported together, each naming the list, the field, what the mapping expects and
//!   what the list has; nothing is changed on an existing list.
//!
//! Lookup columns need the id of the list they point into, so lists are provisioned in
//! dependency order (lists referenced by lookups first).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value as Json, json};

use crate::config::{
    Direction, FieldMapping, FieldType, PipelineConfig, SYNC_KEY_FIELD, SYSTEM_FIELDS,
};
use crate::graph::{ColumnDefinition, GraphClient, GraphError};

/// A list the pipeline writes to, ready for use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListTarget {
    pub id: String,
    pub display_name: String,
    /// True when this run created it.
    pub created: bool,
}

/// The site and every list of a pipeline, by display name.
#[derive(Debug, Clone)]
pub struct Targets {
    pub site_id: String,
    pub lists: HashMap<String, ListTarget>,
}

impl Targets {
    pub fn list_id(&self, display_name: &str) -> Option<&str> {
        self.lists.get(display_name).map(|l| l.id.as_str())
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("Graph: {0}")]
    Graph(#[from] GraphError),
    #[error(
        "the lists do not match the pipeline's mapping (fix the list or the mapping):\n  - {}",
        .0.join("\n  - ")
    )]
    Mismatch(Vec<String>),
}

impl ProvisionError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ProvisionError::Graph(e) => e.is_retryable(),
            ProvisionError::Mismatch(_) => false,
        }
    }
}

/// NOT NULL columns per table (`schema.table` → column names), read from the catalog by the
/// caller; used for `required`.
pub type NotNull = HashMap<String, HashSet<String>>;

/// Fields a list needs: `(field name → mapping)` merged over the entries writing to it.
fn needed(p: &PipelineConfig) -> BTreeMap<String, Vec<(String, FieldMapping)>> {
    let mut out: BTreeMap<String, Vec<(String, FieldMapping)>> = BTreeMap::new();
    for e in &p.sync {
        for list in e.lists() {
            let fields = out.entry(list.to_string()).or_default();
            for m in &e.fields {
                if SYSTEM_FIELDS.contains(&m.field.as_str()) {
                    continue;
                }
                if !fields.iter().any(|(_, f)| f.field == m.field) {
                    fields.push((e.table.to_string(), m.clone()));
                }
            }
        }
    }
    out
}

/// The column definition a mapped field is created with.
pub fn column_for(
    m: &FieldMapping,
    required: bool,
    lookup_list_id: Option<&str>,
) -> ColumnDefinition {
    let (facet, settings): (&str, Json) = match m.field_type {
        FieldType::Text => ("text", json!({ "maxLength": 255 })),
        FieldType::Note => ("text", json!({ "allowMultipleLines": true })),
        FieldType::Number => ("number", json!({})),
        FieldType::Currency => ("currency", json!({ "locale": "en-US" })),
        FieldType::Date => ("dateTime", json!({ "format": "dateOnly" })),
        FieldType::DateTime => ("dateTime", json!({ "format": "dateTime" })),
        FieldType::Boolean => ("boolean", json!({})),
        FieldType::Choice => (
            "choice",
            json!({ "choices": m.choices, "displayAs": "dropDownMenu", "allowTextEntry": false }),
        ),
        FieldType::MultiChoice => (
            "choice",
            json!({ "choices": m.choices, "displayAs": "checkBoxes", "allowTextEntry": false }),
        ),
        FieldType::Person => (
            "personOrGroup",
            json!({ "allowMultipleSelection": false, "chooseFromType": "peopleOnly" }),
        ),
        FieldType::Lookup => (
            "lookup",
            json!({ "listId": lookup_list_id.unwrap_or_default(), "columnName": "Title" }),
        ),
        FieldType::Hyperlink => ("hyperlinkOrPicture", json!({ "isPicture": false })),
    };
    ColumnDefinition::new(m.field.clone(), facet, settings).required(required)
}

/// The hidden key column of idempotent creates.
pub fn sync_key_column() -> ColumnDefinition {
    ColumnDefinition::text(SYNC_KEY_FIELD)
        .indexed(true)
        .unique(true)
        .hidden(true)
}

/// Finds or creates every list of `p` and verifies existing ones.
pub async fn provision(
    client: &GraphClient,
    p: &PipelineConfig,
    not_null: &NotNull,
) -> Result<Targets, ProvisionError> {
    let site = client.resolve_site(&p.graph.site).await?;
    let needed = needed(p);
    // Lookup targets first.
    let mut order: Vec<&String> = needed.keys().collect();
    let referenced: HashSet<&str> = p
        .sync
        .iter()
        .flat_map(|e| e.fields.iter())
        .filter_map(|m| m.lookup_list.as_deref())
        .collect();
    order.sort_by_key(|l| !referenced.contains(l.as_str()));

    let mut targets = Targets {
        site_id: site.id.clone(),
        lists: HashMap::new(),
    };
    let mut problems = Vec::new();
    for list in order {
        let fields = &needed[list];
        match client.get_list(&site.id, list).await? {
            None => {
                let mut cols = Vec::new();
                for (table, m) in fields {
                    if m.field == "Title" {
                        continue; // every generic list has it
                    }
                    let required = m.direction != Direction::PullOnly
                        && not_null.get(table).is_some_and(|c| c.contains(&m.column));
                    let lookup_id = m
                        .lookup_list
                        .as_deref()
                        .and_then(|l| targets.list_id(l).map(str::to_owned));
                    cols.push(column_for(m, required, lookup_id.as_deref()));
                }
                cols.push(sync_key_column());
                let created = client.create_list(&site.id, list, &cols).await?;
                tracing::info!(list = %list, id = %created.id, columns = cols.len(), "created list");
                targets.lists.insert(
                    list.clone(),
                    ListTarget {
                        id: created.id,
                        display_name: list.clone(),
                        created: true,
                    },
                );
            }
            Some(info) => {
                let columns = client.list_columns(&site.id, &info.id).await?;
                problems.extend(verify(list, fields, &columns));
                targets.lists.insert(
                    list.clone(),
                    ListTarget {
                        id: info.id,
                        display_name: list.clone(),
                        created: false,
                    },
                );
            }
        }
    }
    if problems.is_empty() {
        Ok(targets)
    } else {
        Err(ProvisionError::Mismatch(problems))
    }
}

/// Every difference between what `fields` need and the list's `columns`.
pub fn verify(
    list: &str,
    fields: &[(String, FieldMapping)],
    columns: &[ColumnDefinition],
) -> Vec<String> {
    let mut out = Vec::new();
    let find = |name: &str| columns.iter().find(|c| c.name.eq_ignore_ascii_case(name));
    for (_, m) in fields {
        let want = column_for(m, false, None);
        let want_facet = want.type_facet().unwrap_or("text");
        let Some(have) = find(&m.field) else {
            out.push(format!(
                "list {list:?}: field {} (column {}) is missing; expected a {} column",
                m.field, m.column, m.field_type
            ));
            continue;
        };
        let have_facet = have.type_facet().unwrap_or("none");
        if have_facet != want_facet {
            out.push(format!(
                "list {list:?}: field {} has type {have_facet}, the mapping needs {want_facet} ({})",
                m.field, m.field_type
            ));
            continue;
        }
        let facet = have.facet.get(have_facet).cloned().unwrap_or(Json::Null);
        facet_mismatches(list, m, &facet, &mut out);
    }
    match find(SYNC_KEY_FIELD) {
        None => out.push(format!(
            "list {list:?}: the {SYNC_KEY_FIELD} column is missing (a single line of text, indexed, enforceUniqueValues); SyncBridge needs it for idempotent writes"
        )),
        Some(c) if !(c.indexed && c.enforce_unique_values) => out.push(format!(
            "list {list:?}: the {SYNC_KEY_FIELD} column must be indexed and enforce unique values"
        )),
        Some(_) => {}
    }
    out
}

/// The differences between the column's type facet and what mapping `m` needs (choices,
/// single/multi, single-/multi-line text, date-only/date-time), appended to `out`.
fn facet_mismatches(list: &str, m: &FieldMapping, facet: &Json, out: &mut Vec<String>) {
    // A two-way facet: whether the column has it, the type that needs it, and how the message
    // names the column (`is {pre}{yes|no}{post}`).
    let (has, needed_by, pre, (yes, no), post) = match m.field_type {
        FieldType::Choice | FieldType::MultiChoice => {
            missing_choices(list, m, facet, out);
            let multi = facet["displayAs"] == "checkBoxes";
            let names = ("multi", "single");
            (multi, FieldType::MultiChoice, "a ", names, " choice column")
        }
        FieldType::Note | FieldType::Text => {
            let multi = facet["allowMultipleLines"] == true;
            let names = ("multi-line", "single-line");
            (multi, FieldType::Note, "", names, " text")
        }
        FieldType::Date | FieldType::DateTime => {
            let date_only = facet["format"] == "dateOnly";
            let names = ("date-only", "date-time");
            (date_only, FieldType::Date, "a ", names, " column")
        }
        _ => return,
    };
    if has != (m.field_type == needed_by) {
        out.push(format!(
            "list {list:?}: field {} is {pre}{}{post}, the mapping says {}",
            m.field,
            if has { yes } else { no },
            m.field_type
        ));
    }
}

/// The choices mapping `m` needs that the choice column lacks, appended to `out`.
fn missing_choices(list: &str, m: &FieldMapping, facet: &Json, out: &mut Vec<String>) {
    let have_choices: Vec<&str> = facet["choices"]
        .as_array()
        .map(|a| a.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<&String> = m
        .choices
        .iter()
        .filter(|c| !have_choices.contains(&c.as_str()))
        .collect();
    if !missing.is_empty() {
        out.push(format!(
            "list {list:?}: field {} lacks the choices {missing:?} (it has {have_choices:?})",
            m.field
        ));
    }
}

/// Catalog facts about one synced table that the push and return paths need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableFacts {
    /// NOT NULL columns without a default (for `required` on created columns).
    pub not_null: HashSet<String>,
    /// Key columns in column order (the configured `key`, else the primary key): the order of
    /// the capture key record, hence of multi-column `SyncKey`s.
    pub key_columns: Vec<String>,
    /// Per key column, an SQL expression that allocates a new value (its default, or `nextval`
    /// of an identity column's sequence); used to pre-allocate keys for person-created items.
    pub key_defaults: Vec<Option<String>>,
    /// Per key column, `format_type()` (for typed key comparisons that can use the index).
    pub key_types: Vec<String>,
    /// Every column's `format_type()`.
    pub column_types: HashMap<String, String>,
}

/// [`TableFacts`] of every synced table (`schema.table` → facts).
pub async fn table_facts(
    p: &PipelineConfig,
) -> Result<HashMap<String, TableFacts>, super::ProcessError> {
    let err = |e: tokio_postgres::Error| super::ProcessError::Catalog(e.to_string());
    let (client, connection) = crate::pg::connect(p.source.url.expose()).await?;
    let conn = tokio::spawn(connection);
    let mut out = HashMap::new();
    for e in &p.sync {
        let name = crate::capture::catalog::qualified_ident(&e.table.schema, &e.table.name);
        let rows = client
            .query(
                "SELECT a.attname::text, a.attnotnull, \
                        COALESCE(i.indisprimary, false), \
                        CASE WHEN a.attidentity <> '' \
                             THEN format('nextval(%L::regclass)', pg_get_serial_sequence($1, a.attname)) \
                             ELSE pg_get_expr(d.adbin, d.adrelid) END, \
                        format_type(a.atttypid, a.atttypmod) \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                      AND a.attnum = ANY(i.indkey) \
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&name],
            )
            .await
            .map_err(err)?;
        let mut facts = TableFacts::default();
        for r in &rows {
            let col: String = r.get(0);
            facts
                .column_types
                .insert(col.clone(), r.get::<_, String>(4));
            // NOT NULL with a default is not `required` in the list: a person creating an item
            // cannot know the value, and the database fills it in.
            if r.get::<_, bool>(1) && r.get::<_, Option<String>>(3).is_none() {
                facts.not_null.insert(col.clone());
            }
            let is_key = match &e.key {
                Some(k) => k.contains(&col),
                None => r.get::<_, bool>(2),
            };
            if is_key {
                facts.key_columns.push(col);
                facts.key_defaults.push(r.get::<_, Option<String>>(3));
                facts.key_types.push(r.get::<_, String>(4));
            }
        }
        out.insert(e.table.to_string(), facts);
    }
    drop(client);
    let _ = conn.await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(field: &str, t: FieldType, choices: &[&str]) -> (String, FieldMapping) {
        (
            "public.t".into(),
            FieldMapping {
                column: field.to_lowercase(),
                field: field.into(),
                field_type: t,
                direction: Direction::Bidirectional,
                choices: choices.iter().map(|s| s.to_string()).collect(),
                lookup_list: None,
                conflict: None,
            },
        )
    }

    #[test]
    fn verify_names_each_mismatch() {
        let fields = vec![
            m("Status", FieldType::Choice, &["open", "done"]),
            m("Amount", FieldType::Currency, &[]),
            m("Due", FieldType::Date, &[]),
            m("Missing", FieldType::Text, &[]),
        ];
        let cols = vec![
            column_for(&m("Status", FieldType::Choice, &["open"]).1, false, None),
            column_for(&m("Amount", FieldType::Number, &[]).1, false, None),
            column_for(&m("Due", FieldType::DateTime, &[]).1, false, None),
        ];
        let p = verify("L", &fields, &cols);
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p[0].contains("lacks the choices [\"done\"]"), "{}", p[0]);
        assert!(
            p[1].contains("Amount has type number, the mapping needs currency"),
            "{}",
            p[1]
        );
        assert!(p[2].contains("date-time"), "{}", p[2]);
        assert!(
            p[3].contains("Missing (column missing) is missing"),
            "{}",
            p[3]
        );
        assert!(p[4].contains("SyncKey column is missing"), "{}", p[4]);
        let mut ok_cols: Vec<_> = fields
            .iter()
            .map(|(_, f)| column_for(f, false, None))
            .collect();
        ok_cols.push(sync_key_column());
        assert!(verify("L", &fields, &ok_cols).is_empty());
    }
}
