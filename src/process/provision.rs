//! Provisioning: every list a pipeline writes to exists with the columns its mapping needs.
//!
//! - A missing list is created with one column per mapped field (type from the mapping, choices,
//!   `required` from the column's NOT NULL) plus the hidden `SyncKey` text column, indexed and
//!   unique — the key of idempotent creates.
//! - An existing list is verified: each mapped field must have a compatible type facet (and
//!   every configured choice), and `SyncKey` must be indexed and unique. All mismatches of all
//!   lists are reported together ([`Mismatch`]: the list, the field, what the mapping expects and
//!   what the list has), and then nothing is changed on any list.
//! - Lists follow the mapping: when every list passes, a field whose column is missing from an
//!   existing list (added to the mapping since) gets its column added; a list column no field
//!   maps any more (removed from the mapping) is left as it is, with its values. Both are
//!   returned in [`Targets::changes`]; the runtime logs them and [`fill_added_columns`]
//!   re-snapshots the tables of new pushed fields (so existing items get the values) as one
//!   `list_columns` run.
//!
//! Lookup columns need the id of the list they point into, so lists are provisioned in
//! dependency order (lists referenced by lookups first).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::capture::ResnapshotHandle;
use crate::config::{
    Direction, FieldMapping, FieldType, PipelineConfig, SYNC_KEY_FIELD, SYSTEM_FIELDS,
};
use crate::control::meta::{RunCounts, RunKind, RunRecorder, RunStatus};
use crate::graph::{ColumnDefinition, GraphClient, GraphError};
use crate::log::EventLog;

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
    /// The site's `webUrl`: where its SharePoint REST API lives (hyperlink writes).
    pub web_url: Option<String>,
    pub lists: HashMap<String, ListTarget>,
    /// What provisioning changed on, or found in, the existing lists.
    pub changes: ColumnChanges,
}

/// Columns of existing lists that differ from the mapping by a field added or removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ColumnChanges {
    /// Columns added for fields new in the mapping.
    pub added: Vec<ColumnRef>,
    /// Columns no field maps (removed from the mapping, or a person's own): left in the list.
    pub unmapped: Vec<ColumnRef>,
    /// Tables (`schema.table`) with a pushed field whose column was added: re-snapshotted so
    /// the items that exist get its values.
    #[serde(skip)]
    pub refill: BTreeSet<String>,
}

/// One column of one list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnRef {
    pub list: String,
    /// The table whose field the column is (`schema.table`); none for an unmapped column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    pub column: String,
    /// The column's type facet (`text`, `choice`, …).
    #[serde(rename = "type")]
    pub column_type: String,
}

impl ColumnChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.unmapped.is_empty()
    }

    /// One line for logs and run subjects.
    pub fn summary(&self) -> String {
        let names = |v: &[ColumnRef]| {
            v.iter()
                .map(|c| format!("{:?}.{}", c.list, c.column))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{} column(s) added [{}]; {} unmapped column(s) left in the lists [{}]",
            self.added.len(),
            names(&self.added),
            self.unmapped.len(),
            names(&self.unmapped)
        )
    }
}

/// One difference between a list and the mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub list: String,
    /// The field (list column) concerned.
    pub field: String,
    /// What the mapping needs.
    pub expected: String,
    /// What the list has (`missing` when there is no such column or list).
    pub found: String,
    /// The whole sentence, for people.
    pub message: String,
}

impl Mismatch {
    /// The column is missing: start-up adds it (every other mismatch needs a person).
    pub fn is_missing_column(&self) -> bool {
        self.found == MISSING && self.field != SYNC_KEY_FIELD
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What [`Mismatch::found`] says when the column or list does not exist.
pub const MISSING: &str = "missing";

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
        .0.iter().map(|m| m.message.as_str()).collect::<Vec<_>>().join("\n  - ")
    )]
    Mismatch(Vec<Mismatch>),
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

/// The fields each list of `p` needs (list display name → `(table, mapping)` merged over the
/// entries writing to it), as [`verify`] takes them.
pub fn needed(p: &PipelineConfig) -> BTreeMap<String, Vec<(String, FieldMapping)>> {
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

/// Finds or creates every list of `p`, verifies existing ones and adds the columns of fields new
/// in the mapping. Everything is read and checked before anything changes: when a list does not
/// match (a missing column aside), the error names every mismatch and no list is touched.
pub async fn provision(
    client: &GraphClient,
    p: &PipelineConfig,
    not_null: &NotNull,
) -> Result<Targets, ProvisionError> {
    let site = client.resolve_target(&p.graph.site).await?;
    let needed = needed(p);
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for list in lookup_targets_first(p, &needed) {
        let existing = match client.get_list(&site.id, list).await? {
            None => None,
            Some(info) => {
                let columns = client.list_columns(&site.id, &info.id).await?;
                let mismatches = verify(list, &needed[list], &columns);
                problems.extend(mismatches.into_iter().filter(|m| !m.is_missing_column()));
                Some((info.id, columns))
            }
        };
        found.push((list, existing));
    }
    if !problems.is_empty() {
        return Err(ProvisionError::Mismatch(problems));
    }
    let mut targets = Targets {
        site_id: site.id.clone(),
        web_url: site.web_url.clone(),
        lists: HashMap::new(),
        changes: ColumnChanges::default(),
    };
    for (list, existing) in found {
        let fields = &needed[list];
        let (id, created) = match existing {
            None => {
                let cols: Vec<ColumnDefinition> = fields
                    .iter()
                    // Every generic list has a Title.
                    .filter(|(_, m)| m.field != "Title")
                    .map(|(table, m)| new_column(table, m, not_null, &targets, true))
                    .chain([sync_key_column()])
                    .collect();
                match client.create_list(&site.id, list, &cols).await {
                    Ok(created) => {
                        tracing::info!(list = %list, id = %created.id, columns = cols.len(), "created list");
                        (created.id, true)
                    }
                    // Another process of the pipeline (several share one on Kafka) created it
                    // since the lookup above, from the same mapping, in one call with its
                    // columns: use that one.
                    Err(GraphError::Conflict { .. }) => {
                        let Some(info) = client.get_list(&site.id, list).await? else {
                            return Err(GraphError::Transient {
                                status: None,
                                message: format!(
                                    "list {list}: exists (409) but cannot be read yet"
                                ),
                                request_id: None,
                            }
                            .into());
                        };
                        tracing::info!(list = %list, id = %info.id, "list created by another process meanwhile");
                        (info.id, false)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some((id, columns)) => {
                for (table, m) in missing_fields(fields, &columns) {
                    let col = new_column(table, m, not_null, &targets, false);
                    client.create_column(&site.id, &id, &col).await?;
                    tracing::info!(list = %list, field = %m.field, "added the column of a field new in the mapping");
                    targets
                        .changes
                        .added
                        .push(column_ref(list, Some(table), &col));
                    // A query source's first read after the start emits every row anyway.
                    if m.direction != Direction::PullOnly && !crate::config::is_query_table(table) {
                        targets.changes.refill.insert(table.to_string());
                    }
                }
                for c in unmapped(fields, &columns) {
                    tracing::warn!(list = %list, column = %c.name,
                        "list column no field maps (removed from the mapping?): left in the list with its values");
                    targets.changes.unmapped.push(column_ref(list, None, c));
                }
                (id, false)
            }
        };
        let target = ListTarget {
            id,
            display_name: list.clone(),
            created,
        };
        targets.lists.insert(list.clone(), target);
    }
    Ok(targets)
}

/// Every difference between the live lists of `p` and its mapping, changing nothing
/// (`syncbridge validate --graph`). A list that does not exist yet is one (start-up creates it),
/// and so is a missing column (start-up adds it).
pub async fn check(client: &GraphClient, p: &PipelineConfig) -> Result<Vec<Mismatch>, GraphError> {
    let site = client.resolve_target(&p.graph.site).await?;
    let mut out = Vec::new();
    for (list, fields) in needed(p) {
        match client.get_list(&site.id, &list).await? {
            None => out.push(mismatch(
                &list,
                "",
                "a list",
                MISSING,
                format!("list {list:?} is missing (start-up creates it)"),
            )),
            Some(info) => {
                let columns = client.list_columns(&site.id, &info.id).await?;
                out.extend(verify(&list, &fields, &columns));
            }
        }
    }
    Ok(out)
}

/// The lists of `needed` with the ones lookups point into first: a lookup column needs the id
/// of its list.
fn lookup_targets_first<'a>(
    p: &PipelineConfig,
    needed: &'a BTreeMap<String, Vec<(String, FieldMapping)>>,
) -> Vec<&'a String> {
    let mut order: Vec<&String> = needed.keys().collect();
    let referenced: HashSet<&str> = p
        .sync
        .iter()
        .flat_map(|e| e.fields.iter())
        .filter_map(|m| m.lookup_list.as_deref())
        .collect();
    order.sort_by_key(|l| !referenced.contains(l.as_str()));
    order
}

/// The column field `m` (of `table`) gets in a list this run creates (`new_list`) or extends.
fn new_column(
    table: &str,
    m: &FieldMapping,
    not_null: &NotNull,
    targets: &Targets,
    new_list: bool,
) -> ColumnDefinition {
    // A column added to a list that has items is never required: those items have no value.
    let required = new_list
        && m.direction != Direction::PullOnly
        && not_null.get(table).is_some_and(|c| c.contains(&m.column));
    let lookup_id = m.lookup_list.as_deref().and_then(|l| targets.list_id(l));
    column_for(m, required, lookup_id)
}

fn column_ref(list: &str, table: Option<&str>, c: &ColumnDefinition) -> ColumnRef {
    ColumnRef {
        list: list.to_string(),
        table: table.map(str::to_string),
        column: c.name.clone(),
        column_type: c.type_facet().unwrap_or("none").to_string(),
    }
}

fn find_column<'a>(columns: &'a [ColumnDefinition], name: &str) -> Option<&'a ColumnDefinition> {
    columns.iter().find(|c| c.name.eq_ignore_ascii_case(name))
}

/// The mapped fields (with their table) that have no column in the list.
fn missing_fields<'a>(
    fields: &'a [(String, FieldMapping)],
    columns: &[ColumnDefinition],
) -> impl Iterator<Item = (&'a str, &'a FieldMapping)> {
    fields
        .iter()
        .filter(|(_, m)| find_column(columns, &m.field).is_none())
        .map(|(t, m)| (t.as_str(), m))
}

/// The list's own columns that no field maps: editable, visible, not `Title` (every list has
/// it), not `SyncKey` and not a system field.
pub fn unmapped<'a>(
    fields: &[(String, FieldMapping)],
    columns: &'a [ColumnDefinition],
) -> Vec<&'a ColumnDefinition> {
    columns
        .iter()
        .filter(|c| !c.read_only && !c.hidden)
        .filter(|c| c.name != "Title" && c.name != SYNC_KEY_FIELD)
        .filter(|c| !SYSTEM_FIELDS.contains(&c.name.as_str()))
        .filter(|c| {
            !fields
                .iter()
                .any(|(_, m)| m.field.eq_ignore_ascii_case(&c.name))
        })
        .collect()
}

fn mismatch(
    list: &str,
    field: &str,
    expected: impl Into<String>,
    found: impl Into<String>,
    message: String,
) -> Mismatch {
    Mismatch {
        list: list.to_string(),
        field: field.to_string(),
        expected: expected.into(),
        found: found.into(),
        message,
    }
}

/// Every difference between what `fields` need and the list's `columns`.
pub fn verify(
    list: &str,
    fields: &[(String, FieldMapping)],
    columns: &[ColumnDefinition],
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (_, m) in fields {
        let want = column_for(m, false, None);
        let want_facet = want.type_facet().unwrap_or("text");
        let Some(have) = find_column(columns, &m.field) else {
            out.push(mismatch(
                list,
                &m.field,
                m.field_type.to_string(),
                MISSING,
                format!(
                    "list {list:?}: field {} (column {}) is missing; expected a {} column",
                    m.field, m.column, m.field_type
                ),
            ));
            continue;
        };
        let have_facet = have.type_facet().unwrap_or("none");
        if have_facet != want_facet {
            out.push(mismatch(
                list,
                &m.field,
                format!("{want_facet} ({})", m.field_type),
                have_facet,
                format!(
                    "list {list:?}: field {} has type {have_facet}, the mapping needs {want_facet} ({})",
                    m.field, m.field_type
                ),
            ));
            continue;
        }
        let facet = have.facet.get(have_facet).cloned().unwrap_or(Json::Null);
        facet_mismatches(list, m, &facet, &mut out);
    }
    const WANT_KEY: &str = "indexed, unique text column";
    match find_column(columns, SYNC_KEY_FIELD) {
        None => out.push(mismatch(
            list,
            SYNC_KEY_FIELD,
            WANT_KEY,
            MISSING,
            format!(
                "list {list:?}: the {SYNC_KEY_FIELD} column is missing (a single line of text, indexed, enforceUniqueValues); SyncBridge needs it for idempotent writes"
            ),
        )),
        Some(c) if !(c.indexed && c.enforce_unique_values) => out.push(mismatch(
            list,
            SYNC_KEY_FIELD,
            WANT_KEY,
            format!(
                "indexed: {}, enforceUniqueValues: {}",
                c.indexed, c.enforce_unique_values
            ),
            format!(
                "list {list:?}: the {SYNC_KEY_FIELD} column must be indexed and enforce unique values"
            ),
        )),
        Some(_) => {}
    }
    out
}

/// The differences between the column's type facet and what mapping `m` needs (choices,
/// single/multi, single-/multi-line text, date-only/date-time), appended to `out`.
fn facet_mismatches(list: &str, m: &FieldMapping, facet: &Json, out: &mut Vec<Mismatch>) {
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
        let found = format!("{}{post}", if has { yes } else { no });
        out.push(mismatch(
            list,
            &m.field,
            m.field_type.to_string(),
            found.clone(),
            format!(
                "list {list:?}: field {} is {pre}{found}, the mapping says {}",
                m.field, m.field_type
            ),
        ));
    }
}

/// The choices mapping `m` needs that the choice column lacks, appended to `out`.
fn missing_choices(list: &str, m: &FieldMapping, facet: &Json, out: &mut Vec<Mismatch>) {
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
        out.push(mismatch(
            list,
            &m.field,
            format!("choices {:?}", m.choices),
            format!("choices {have_choices:?}"),
            format!(
                "list {list:?}: field {} lacks the choices {missing:?} (it has {have_choices:?})",
                m.field
            ),
        ));
    }
}

/// Records `changes` as one `list_columns` run (`detail`: the columns added and the unmapped
/// ones) that fills the added columns: each table of [`ColumnChanges::refill`] is re-snapshotted,
/// one at a time (`rows`: the rows read again; the ledger sees each row changed, so every item
/// gets the new values). A failure is recorded in the run, never returned: the pipeline keeps
/// streaming, and `syncbridge snapshot --table` fills the column later.
pub async fn fill_added_columns<L: EventLog>(
    changes: ColumnChanges,
    snapshots: ResnapshotHandle,
    log: Arc<L>,
    runs_topic: String,
) {
    let pipeline = snapshots.pipeline().to_string();
    let mut run = match RunRecorder::start_requested(
        log,
        runs_topic,
        &pipeline,
        RunKind::ListColumns,
        Some(changes.summary()),
        None,
        serde_json::to_value(&changes).ok(),
    )
    .await
    {
        Ok(run) => run,
        Err(e) => {
            tracing::warn!(%pipeline, "cannot record the list_columns run: {e}");
            return;
        }
    };
    let mut counts = RunCounts::default();
    let mut failure = None;
    for table in &changes.refill {
        match crate::process::drift::resnapshot(&snapshots, table).await {
            Ok(rows) => counts.rows += rows,
            Err(e) => {
                failure = Some(format!(
                    "re-snapshot of {table} to fill its new columns: {e}"
                ));
                break;
            }
        }
    }
    let status = RunStatus::ended(&failure);
    tracing::info!(%pipeline, rows = counts.rows, ?status, "list columns follow the mapping");
    if let Err(e) = run.finish(status, counts, failure).await {
        tracing::warn!(%pipeline, "cannot record the end of the list_columns run: {e}");
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
    let (client, connection) = crate::pg::connect_source(&p.source).await?;
    let conn = tokio::spawn(connection);
    let mut out = HashMap::new();
    for e in &p.sync {
        if let Some(q) = &e.query {
            out.insert(
                e.table.to_string(),
                query_facts(&client, e, &q.sql).await.map_err(err)?,
            );
            continue;
        }
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

/// [`TableFacts`] of a query source, from its result's columns: no NOT NULL (a result has no
/// constraints), no key defaults (push-only), the key in result order like its events' keys.
async fn query_facts(
    client: &tokio_postgres::Client,
    e: &crate::config::SyncEntry,
    sql: &str,
) -> Result<TableFacts, tokio_postgres::Error> {
    let stmt = client
        .prepare(&crate::capture::query::select_all(sql))
        .await?;
    let key = e.key.clone().unwrap_or_default();
    let mut facts = TableFacts::default();
    for c in stmt.columns() {
        let ty: String = client
            .query_one("SELECT format_type($1, NULL)", &[&c.type_().oid()])
            .await?
            .get(0);
        if key.iter().any(|k| k == c.name()) {
            facts.key_columns.push(c.name().to_owned());
            facts.key_defaults.push(None);
            facts.key_types.push(ty.clone());
        }
        facts.column_types.insert(c.name().to_owned(), ty);
    }
    Ok(facts)
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
        let p: Vec<String> = verify("L", &fields, &cols)
            .iter()
            .map(ToString::to_string)
            .collect();
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

    #[test]
    fn mismatches_name_list_field_expected_and_found() {
        let fields = vec![
            m("Amount", FieldType::Currency, &[]),
            m("Missing", FieldType::Text, &[]),
        ];
        let cols = vec![
            column_for(&m("Amount", FieldType::Number, &[]).1, false, None),
            ColumnDefinition::text(SYNC_KEY_FIELD).indexed(true),
        ];
        let got = verify("L", &fields, &cols);
        let parts: Vec<_> = got
            .iter()
            .map(|x| {
                (
                    x.list.as_str(),
                    x.field.as_str(),
                    x.expected.as_str(),
                    x.found.as_str(),
                )
            })
            .collect();
        assert_eq!(
            parts,
            [
                ("L", "Amount", "currency (currency)", "number"),
                ("L", "Missing", "text", MISSING),
                (
                    "L",
                    SYNC_KEY_FIELD,
                    "indexed, unique text column",
                    "indexed: true, enforceUniqueValues: false"
                ),
            ]
        );
        // Only the missing mapped column is one start-up adds.
        let adds: Vec<bool> = got.iter().map(Mismatch::is_missing_column).collect();
        assert_eq!(adds, [false, true, false]);
    }

    #[test]
    fn unmapped_columns_are_the_lists_own_editable_ones_no_field_names() {
        let fields = vec![m("Status", FieldType::Text, &[])];
        let mut read_only = ColumnDefinition::text("Created");
        read_only.read_only = true;
        let cols = vec![
            ColumnDefinition::text("Title"),
            ColumnDefinition::text("status"),
            ColumnDefinition::text("OldField"),
            ColumnDefinition::text("Hidden").hidden(true),
            read_only,
            sync_key_column(),
        ];
        let names: Vec<&str> = unmapped(&fields, &cols)
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["OldField"]);
    }
}
