//! Mapping editor checks (issue 16): what the editor needs besides reading and writing the file
//! ([`super::config_edit`]).
//!
//! - `POST /pipelines/{name}/config/validate` (body `{"yaml"}`; a POST, so an operate token,
//!   though it changes nothing):
//!   the edited text checked as a save would be, and more, without writing anything:
//!   1. `config`: as `syncbridge validate` (every file of the process, this one replaced);
//!   2. `catalog`: each sync entry's table exists and has every mapped column, of a PostgreSQL
//!      type the field's type can hold ([`column_problems`]);
//!   3. `graph`: each list's live columns against the mapping, as `syncbridge validate --graph`.
//!      A missing list or column is a note, not a problem: the reload creates it.
//!
//!   200 `{ok, findings, mapping}` when nothing blocks a save (`findings`: notes; `mapping`: the
//!   text's sync entries, as the GET's); else 422, an RFC 9457 problem (`invalid_config`) with one
//!   `invalid-params` entry per blocking problem (`file:line:col: message` where known) and the
//!   extension member `problems` (every finding, structured). A database or Graph that cannot be
//!   reached is a note saying the check was skipped, not a problem: the save stays possible and
//!   the reload then refuses a config that does not start.
//! - `GET /pipelines/{name}/lists/{list}/columns`: a list's live columns as Graph answers them
//!   (name, display name, type facet, required, indexed, unique, hidden, read-only); `exists:
//!   false` when there is no such list yet. For a list of the pipeline's running file only.
//!
//! Graph calls go through a limiter of their own (one per process, [`limiters`]), apart from the
//! pipelines' write budget, as `syncbridge validate --graph` does: a few GETs per check.

use std::sync::OnceLock;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::catalog::introspect::{CatalogColumn, ColumnTypeKind};
use super::catalog::{self, CatalogTable};
use super::config_edit::{ConfigEditors, load_edited, read, secret_values, unredact};
use super::problem::{ApiError, InvalidParam, PROBLEM_JSON, Problem};
use crate::config::{FieldMapping, FieldType, LocatedPipeline, PipelineConfig};
use crate::graph::{ColumnDefinition, GraphClient, GraphClientConfig, GraphError, LimiterRegistry};
use crate::process::convert::{self, TypeClass};
use crate::process::provision;

/// The routes with the config editors' state: merge into the control router.
pub fn routes(editors: ConfigEditors) -> Router {
    Router::new()
        .route("/pipelines/{name}/config/validate", post(validate))
        .route("/pipelines/{name}/lists/{list}/columns", get(list_columns))
        .with_state(editors)
}

/// The limiters of the API's own Graph reads (shared by every request of this process).
fn limiters() -> &'static LimiterRegistry {
    static LIMITERS: OnceLock<LimiterRegistry> = OnceLock::new();
    LIMITERS.get_or_init(LimiterRegistry::new)
}

/// One thing a check found.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ConfigFinding {
    /// `config` (as `syncbridge validate`), `catalog` (the table's columns and types) or `graph`
    /// (the live list, as `validate --graph`).
    pub source: String,
    /// Whether it blocks a save; `false`: a note (e.g. a column the reload will add).
    pub blocking: bool,
    pub message: String,
    /// Where in the file, when known (1-based).
    pub file: Option<String>,
    pub line: Option<usize>,
    pub col: Option<usize>,
    /// The table column concerned, when one is.
    pub column: Option<String>,
    /// The list and its field concerned (graph findings).
    pub list: Option<String>,
    pub field: Option<String>,
}

impl ConfigFinding {
    fn new(source: &str, blocking: bool, message: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            blocking,
            message: message.into(),
            file: None,
            line: None,
            col: None,
            column: None,
            list: None,
            field: None,
        }
    }

    fn at(mut self, file: &str, (line, col): (usize, usize)) -> Self {
        (self.file, self.line, self.col) = (Some(file.into()), Some(line), Some(col));
        self
    }

    /// `file:line:col: message`, or the message alone.
    fn located(&self) -> String {
        match (&self.file, self.line, self.col) {
            (Some(f), Some(l), Some(c)) => format!("{f}:{l}:{c}: {}", self.message),
            _ => self.message.clone(),
        }
    }
}

/// The body of a validation.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfigDraft {
    /// The edited text, with the GET's `<redacted:N>` placeholders.
    pub yaml: String,
}

/// A draft that may be saved.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigValidation {
    /// Always `true` here (a draft with problems answers 422).
    pub ok: bool,
    /// Notes that do not block a save (a list or column the reload will create, a check skipped).
    pub findings: Vec<ConfigFinding>,
    /// The draft's sync entries, as `GET …/config` shows them.
    #[schema(value_type = Vec<Object>)]
    pub mapping: serde_json::Value,
}

/// The 422 answer: a problem with every finding.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigProblems {
    #[serde(flatten)]
    pub problem: Problem,
    /// Every finding, the blocking ones and the notes.
    pub problems: Vec<ConfigFinding>,
    /// The draft's sync entries when the text loads (absent after a `config` problem).
    #[schema(value_type = Option<Vec<Object>>)]
    pub mapping: Option<serde_json::Value>,
}

#[utoipa::path(post, path = "/pipelines/{name}/config/validate", tag = "config",
    params(("name" = String, Path, description = "Pipeline name")),
    request_body(content = ConfigDraft, description = "The edited file text"),
    responses(
        (status = 200, description = "Nothing blocks saving it; notes in `findings`", body = ConfigValidation),
        (status = 400, description = "A bad body (`invalid-params` names the field)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Problems (config, catalog, live list): each in `invalid-params` and `problems`; nothing written", body = ConfigProblems, content_type = "application/problem+json"),
        (status = 503, description = "The current file cannot be read", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn validate(
    State(editors): State<ConfigEditors>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (editor, path) = editors.get(&name)?;
    let draft: ConfigDraft = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_param("yaml", format!("the body must be {{\"yaml\"}}: {e}")))?;
    let (_, current) = read(&path)?;
    let text = unredact(&draft.yaml, &secret_values(&current))
        .map_err(|e| ApiError::bad_param("yaml", e))?;
    let located = match load_edited(&editor, &path, &text)? {
        Ok(located) => located,
        Err(problems) => {
            let found = problems
                .iter()
                .map(|p| {
                    ConfigFinding::new("config", true, &p.message).at(&p.file, (p.line, p.col))
                })
                .collect();
            return Ok(answer(found, None));
        }
    };
    let mut found = catalog_findings(&located).await;
    found.extend(graph_findings(&located.config).await);
    let mapping = serde_json::to_value(&located.config.sync).unwrap_or_default();
    Ok(answer(found, Some(mapping)))
}

/// 200 with the notes when nothing blocks, else the 422 problem.
fn answer(found: Vec<ConfigFinding>, mapping: Option<serde_json::Value>) -> Response {
    let blocking: Vec<&ConfigFinding> = found.iter().filter(|f| f.blocking).collect();
    if blocking.is_empty() {
        return axum::Json(ConfigValidation {
            ok: true,
            findings: found,
            mapping: mapping.unwrap_or_default(),
        })
        .into_response();
    }
    let lines: Vec<String> = blocking.iter().map(|f| f.located()).collect();
    let mut problem = ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_config",
        format!(
            "{} problem(s), nothing written:\n{}",
            lines.len(),
            lines.join("\n")
        ),
    )
    .problem();
    problem.invalid_params = lines
        .into_iter()
        .map(|reason| InvalidParam {
            name: "yaml".into(),
            reason,
        })
        .collect();
    let body = ConfigProblems {
        problem,
        problems: found,
        mapping,
    };
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        axum::Json(body),
    )
        .into_response()
}

/// Each sync entry's table from the source database's catalog, checked by [`column_problems`].
async fn catalog_findings(p: &LocatedPipeline) -> Vec<ConfigFinding> {
    let config = &p.config;
    let database = config.source.url.database();
    let mut out = Vec::new();
    for (i, entry) in config.sync.iter().enumerate() {
        // A query source has no table in the catalog: `validate --db` runs its query.
        if entry.query.is_some() {
            continue;
        }
        let at = p.tables.get(i).copied().unwrap_or((1, 1));
        let t = &entry.table;
        let found =
            catalog::table(std::slice::from_ref(config), &database, &t.schema, &t.name).await;
        match found {
            Ok(Some(table)) => {
                out.extend(column_problems(&entry.fields, &table).into_iter().map(|f| {
                    let at = f.column.as_deref().map_or(at, |c| p.mapping_at(i, c));
                    f.at(&p.file, at)
                }))
            }
            Ok(None) => out.push(
                ConfigFinding::new(
                    "catalog",
                    true,
                    format!("table {t} does not exist in database {database}"),
                )
                .at(&p.file, at),
            ),
            Err(e) => out.push(ConfigFinding::new(
                "catalog",
                false,
                format!("the catalog was not checked ({t}): {e}"),
            )),
        }
    }
    out
}

/// The mapped columns `fields` that `table` lacks or whose type the field cannot hold.
pub fn column_problems(fields: &[FieldMapping], table: &CatalogTable) -> Vec<ConfigFinding> {
    let name = format!("{}.{}", table.schema, table.name);
    let mut out = Vec::new();
    for f in fields {
        let problem = match table.columns.iter().find(|c| c.name == f.column) {
            None => format!("column {} does not exist in table {name}", f.column),
            Some(c) if !holds(f.field_type, c) => format!(
                "column {}.{} is {}: a {} field cannot hold it ({})",
                name,
                f.column,
                c.type_name,
                f.field_type,
                convert::accepted_types(f.field_type)
            ),
            Some(_) => continue,
        };
        out.push(ConfigFinding {
            column: Some(f.column.clone()),
            field: Some(f.field.clone()),
            ..ConfigFinding::new("catalog", true, problem)
        });
    }
    out
}

/// Whether a field of type `t` can hold column `c` (the rule is
/// [`convert::field_holds`], shared with `validate --db` and the processor's schema check).
fn holds(t: FieldType, c: &CatalogColumn) -> bool {
    let class = match c.type_kind {
        ColumnTypeKind::Base => TypeClass::Base,
        ColumnTypeKind::Domain => TypeClass::Domain,
        _ => TypeClass::Other,
    };
    convert::field_holds(t, &c.type_name, class)
}

/// Each list's live columns against the mapping, as `syncbridge validate --graph`.
async fn graph_findings(p: &PipelineConfig) -> Vec<ConfigFinding> {
    let checked = async {
        let client = GraphClient::new(GraphClientConfig::from(&p.graph), limiters())?;
        provision::check(&client, p).await
    };
    match checked.await {
        Ok(found) => found
            .into_iter()
            .map(|m| ConfigFinding {
                list: Some(m.list.clone()),
                field: (!m.field.is_empty()).then(|| m.field.clone()),
                // A missing list or column: the reload creates it.
                ..ConfigFinding::new("graph", !m.is_missing_column(), m.message.clone())
            })
            .collect(),
        Err(e) => vec![ConfigFinding::new(
            "graph",
            false,
            format!("the live lists were not checked: {e}"),
        )],
    }
}

/// A list's live columns.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListColumns {
    pub list: String,
    /// `false`: the list does not exist (yet); start-up creates it.
    pub exists: bool,
    pub columns: Vec<LiveColumn>,
}

/// One column of a live list.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveColumn {
    /// The internal name (what a mapping's `field` names).
    pub name: String,
    pub display_name: Option<String>,
    /// The Graph type facet (`text`, `number`, `dateTime`, `choice`, …); absent when unknown.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub required: bool,
    pub indexed: bool,
    pub unique: bool,
    pub hidden: bool,
    pub read_only: bool,
}

impl From<ColumnDefinition> for LiveColumn {
    fn from(c: ColumnDefinition) -> Self {
        Self {
            type_: c.type_facet().map(str::to_string),
            name: c.name,
            display_name: c.display_name,
            required: c.required,
            indexed: c.indexed,
            unique: c.enforce_unique_values,
            hidden: c.hidden,
            read_only: c.read_only,
        }
    }
}

#[utoipa::path(get, path = "/pipelines/{name}/lists/{list}/columns", tag = "config",
    params(
        ("name" = String, Path, description = "Pipeline name"),
        ("list" = String, Path, description = "A list the pipeline writes to (display name)"),
    ),
    responses(
        (status = 200, description = "The list's live columns (Graph)", body = ListColumns),
        (status = 404, description = "Unknown pipeline, or a list it does not sync", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Graph did not answer", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The pipeline file cannot be read", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list_columns(
    State(editors): State<ConfigEditors>,
    UrlPath((name, list)): UrlPath<(String, String)>,
) -> Result<axum::Json<ListColumns>, ApiError> {
    let (_, path) = editors.get(&name)?;
    let (_, config) = read(&path)?;
    if !config.sync.iter().any(|e| e.lists().any(|l| l == list)) {
        return Err(ApiError {
            param: Some(InvalidParam {
                name: "list".into(),
                reason: "not a list this pipeline syncs".into(),
            }),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_list",
                format!("pipeline {name} syncs no list {list:?}"),
            )
        });
    }
    let graph = |e: GraphError| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "graph_unavailable",
            format!("Graph: {e}"),
        )
    };
    let client =
        GraphClient::new(GraphClientConfig::from(&config.graph), limiters()).map_err(graph)?;
    let site = client
        .resolve_target(&config.graph.site)
        .await
        .map_err(graph)?;
    let Some(info) = client.get_list(&site.id, &list).await.map_err(graph)? else {
        return Ok(axum::Json(ListColumns {
            list,
            exists: false,
            columns: Vec::new(),
        }));
    };
    let columns = client
        .list_columns(&site.id, &info.id)
        .await
        .map_err(graph)?;
    Ok(axum::Json(ListColumns {
        list,
        exists: true,
        columns: columns.into_iter().map(LiveColumn::from).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(column: &str, t: FieldType) -> FieldMapping {
        FieldMapping::for_test(column, t)
    }

    fn column(name: &str, pg: &str) -> CatalogColumn {
        let kind = match pg {
            p if p.ends_with("[]") => ColumnTypeKind::Array,
            "mood" => ColumnTypeKind::Enum,
            "positive" => ColumnTypeKind::Domain,
            _ => ColumnTypeKind::Base,
        };
        CatalogColumn {
            name: name.into(),
            position: 1,
            type_name: pg.into(),
            type_kind: kind,
            element_type: None,
            enum_values: None,
            nullable: true,
            default: None,
            generated: None,
            identity: None,
        }
    }

    #[test]
    fn a_field_type_holds_the_column_types_of_its_family() {
        let cases = [
            (FieldType::Number, "numeric(10,2)", true),
            (FieldType::Number, "text", false),
            (FieldType::Number, "positive", true),
            (FieldType::Currency, "money", true),
            (FieldType::DateTime, "timestamp(3) with time zone", true),
            (FieldType::Date, "date", true),
            (FieldType::Date, "integer", false),
            (FieldType::Boolean, "boolean", true),
            (FieldType::Boolean, "integer", false),
            (FieldType::Number, "integer[]", false),
            (FieldType::Text, "jsonb", true),
            (FieldType::Choice, "mood", true),
            (FieldType::Note, "integer[]", true),
            (FieldType::Lookup, "bigint", true),
            (FieldType::Lookup, "boolean", false),
        ];
        for (t, pg, ok) in cases {
            assert_eq!(holds(t, &column("c", pg)), ok, "{t} holding {pg}");
        }
    }

    #[test]
    fn a_missing_column_and_a_type_the_field_cannot_hold_are_problems_naming_the_column() {
        let table = CatalogTable {
            schema: "public".into(),
            name: "t".into(),
            kind: catalog::introspect::CatalogTableKind::Table,
            replica_identity: catalog::introspect::ReplicaIdentity::Default,
            replica_identity_index: None,
            columns: vec![column("id", "bigint"), column("title", "text")],
            primary_key: None,
            unique_keys: Vec::new(),
            foreign_keys: Vec::new(),
            indexes: Vec::new(),
            publications: Vec::new(),
            synced_by: Vec::new(),
        };
        let fields = [
            field("id", FieldType::Number),
            field("title", FieldType::Number),
            field("gone", FieldType::Text),
        ];
        let found = column_problems(&fields, &table);
        let got: Vec<(Option<&str>, bool)> = found
            .iter()
            .map(|f| (f.column.as_deref(), f.blocking))
            .collect();
        assert_eq!(got, [(Some("title"), true), (Some("gone"), true)]);
        assert!(
            found[0].message.contains("public.t.title is text"),
            "{}",
            found[0].message
        );
        assert!(
            found[1].message.contains("column gone does not exist"),
            "{}",
            found[1].message
        );
    }
}
