//! Inventory and catalog: what the loaded pipelines sync, and what their source databases hold.
//!
//! - `GET /inventory`: applications → databases → instances → tables, projected from the
//!   pipeline files ([`inventory`]; no IO).
//! - `GET /catalog/{database}/tables[?schema=S]`: every table of a source database (tables,
//!   columns with types, nullability and defaults, primary and unique keys, foreign keys, indexes,
//!   replica identity, and which of the pipelines' publications include each), read from the
//!   database's catalog on each request ([`introspect`], one query per concern) through the first
//!   of its instances that answers.
//! - `GET /catalog/{database}/tables/{schema.table}`: one table. A part holding a `.` is written
//!   double-quoted (`"a.b".c`); names are matched as the catalog spells them (no case folding).
//!
//! Problems: 400 a malformed `database`, `table` or `schema` (or an unknown query parameter),
//! naming it; 404 a database no pipeline here reads, or a table it does not have; 503 no
//! instance of the database answers; 502 a catalog query failed. No answer carries a password:
//! instances are host and port only.
//!
//! `syncbridge catalog` and `syncbridge inventory` print the same from the pipeline files,
//! connecting to the source themselves ([`text`] renders the human form).

pub mod introspect;
pub mod inventory;
pub mod text;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio_postgres::Client;
use utoipa::ToSchema;

use super::problem::{ApiError, Problem};
use crate::capture::config::publication_name;
use crate::config::PipelineConfig;
use crate::pg::{PgConnectError, with_causes};
pub use introspect::{CatalogTable, Filter};
pub use inventory::{Inventory, project};

/// PostgreSQL truncates names beyond NAMEDATALEN-1 = 63 bytes: a longer one names nothing.
const MAX_NAME_BYTES: usize = 63;

/// Why a catalog could not be read. Unknown names are not retryable; an unreachable instance
/// or a failed query may be (the server may come back).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no pipeline here reads a database named {0:?}")]
    UnknownDatabase(String),
    #[error("database {database}: no instance answered ({instances}): {source}")]
    Connect {
        database: String,
        /// `host:port` of each instance tried.
        instances: String,
        #[source]
        source: PgConnectError,
    },
    #[error("database {database}: catalog query failed: {}", with_causes(.source))]
    Query {
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl CatalogError {
    pub fn is_retryable(&self) -> bool {
        match self {
            CatalogError::UnknownDatabase(_) => false,
            CatalogError::Connect { source, .. } => source.is_retryable(),
            CatalogError::Query { source, .. } => source.as_db_error().is_none(),
        }
    }
}

/// A server, by host and port only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct CatalogServer {
    pub host: String,
    pub port: u16,
}

/// The catalog of one source database.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DatabaseCatalog {
    pub database: String,
    /// The instance whose catalog this is (the first that answered).
    pub instance: CatalogServer,
    /// The publications of the pipelines reading this database (`sb_<pipeline>`).
    pub publications: Vec<String>,
    /// By schema, then name.
    pub tables: Vec<CatalogTable>,
}

/// Reads the catalog of `database` (a database name the `pipelines` read), narrowed by `filter`.
pub async fn database_catalog(
    pipelines: &[PipelineConfig],
    database: &str,
    filter: &Filter,
) -> Result<DatabaseCatalog, CatalogError> {
    let readers = inventory::readers(pipelines, database);
    if readers.is_empty() {
        return Err(CatalogError::UnknownDatabase(database.to_string()));
    }
    let publications: Vec<String> = readers.iter().map(|p| publication_name(&p.name)).collect();
    let (client, instance) = connect_any(database, &readers).await?;
    let mut tables = describe_settled(&client, filter, &publications)
        .await
        .map_err(|source| CatalogError::Query {
            database: database.to_string(),
            source,
        })?;
    for t in &mut tables {
        for p in &readers {
            for e in p
                .sync
                .iter()
                .filter(|e| e.table.schema == t.schema && e.table.name == t.name)
            {
                t.synced_by.push(introspect::SyncedBy {
                    pipeline: p.name.clone(),
                    lists: e.lists().map(str::to_owned).collect(),
                });
            }
        }
    }
    Ok(DatabaseCatalog {
        database: database.to_string(),
        instance,
        publications,
        tables,
    })
}

/// Attempts at describing the tables while other sessions drop some of them.
const DESCRIBE_ATTEMPTS: u32 = 3;

/// [`introspect::describe`], again when a table vanished between its queries: the catalog
/// functions (`pg_get_indexdef`, `format_type`, …) read the latest catalog, not the query's
/// snapshot, and fail with "cache lookup failed" (XX000) or an undefined object on a relation
/// dropped meanwhile. The next attempt no longer lists it.
async fn describe_settled(
    client: &Client,
    filter: &Filter,
    publications: &[String],
) -> Result<Vec<CatalogTable>, tokio_postgres::Error> {
    use tokio_postgres::error::SqlState;
    let mut attempt = 1;
    loop {
        match introspect::describe(client, filter, publications).await {
            Err(e)
                if attempt < DESCRIBE_ATTEMPTS
                    && matches!(
                        e.code(),
                        Some(
                            &SqlState::INTERNAL_ERROR
                                | &SqlState::UNDEFINED_TABLE
                                | &SqlState::UNDEFINED_OBJECT
                        )
                    ) =>
            {
                tracing::debug!("catalog changed while it was read ({e}); reading it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// One table of `database`, or `None` when it has no such table.
pub async fn table(
    pipelines: &[PipelineConfig],
    database: &str,
    schema: &str,
    name: &str,
) -> Result<Option<CatalogTable>, CatalogError> {
    let filter = Filter {
        schema: Some(schema.to_string()),
        table: Some(name.to_string()),
    };
    let catalog = database_catalog(pipelines, database, &filter).await?;
    Ok(catalog.tables.into_iter().next())
}

/// A client of the first instance of the readers' URLs that accepts a connection (its driver
/// task ends when the client is dropped).
async fn connect_any(
    database: &str,
    readers: &[&PipelineConfig],
) -> Result<(Client, CatalogServer), CatalogError> {
    let mut tried: Vec<CatalogServer> = Vec::new();
    let mut last = None;
    for p in readers {
        let (host, port) = p.source.url.server();
        let server = CatalogServer { host, port };
        if tried.contains(&server) {
            continue;
        }
        tried.push(server.clone());
        match crate::pg::connect(p.source.url.expose()).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("catalog connection ended: {e}");
                    }
                });
                return Ok((client, server));
            }
            Err(e) => last = Some(e),
        }
    }
    let instances: Vec<String> = tried
        .iter()
        .map(|s| format!("{}:{}", s.host, s.port))
        .collect();
    Err(CatalogError::Connect {
        database: database.to_string(),
        instances: instances.join(", "),
        // `readers` is not empty, so one connection was tried and failed.
        source: last.unwrap_or_else(|| PgConnectError::Options("no instance".into())),
    })
}

/// A database or schema name: 1 to 63 bytes, no control characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("must be 1 to {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err("must not hold control characters".into());
    }
    Ok(())
}

/// `schema.table`; a part holding a `.` (or starting with `"`) is double-quoted, with `""` for
/// a quote inside. Parts are taken as written (no case folding).
pub fn parse_table_name(text: &str) -> Result<(String, String), String> {
    const FORM: &str = "must be schema.table (quote a part holding a dot: \"a.b\".c)";
    let (schema, rest) = ident_part(text).ok_or(FORM)?;
    let rest = rest.strip_prefix('.').ok_or(FORM)?;
    let (name, rest) = ident_part(rest).ok_or(FORM)?;
    if !rest.is_empty() {
        return Err(FORM.into());
    }
    check_name(&schema).map_err(|e| format!("schema {e}"))?;
    check_name(&name).map_err(|e| format!("table name {e}"))?;
    Ok((schema, name))
}

/// The first identifier of `text` and what follows it.
fn ident_part(text: &str) -> Option<(String, &str)> {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text.find('.').unwrap_or(text.len());
        return Some((text[..end].to_string(), &text[end..]));
    };
    let mut out = String::new();
    let mut chars = quoted.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            out.push(c);
        } else if chars.peek().is_some_and(|(_, n)| *n == '"') {
            out.push('"');
            chars.next();
        } else {
            return Some((out, &quoted[i + 1..]));
        }
    }
    None
}

/// The inventory and catalog routes: merge them into the control router.
pub fn routes(pipelines: Vec<PipelineConfig>) -> Router {
    Router::new()
        .route("/inventory", get(get_inventory))
        .route("/catalog/{database}/tables", get(list_tables))
        .route("/catalog/{database}/tables/{table}", get(get_table))
        .with_state(Arc::new(pipelines))
}

type Pipelines = Arc<Vec<PipelineConfig>>;

fn api_error(e: CatalogError) -> ApiError {
    match &e {
        CatalogError::UnknownDatabase(_) => ApiError {
            param: Some(super::problem::InvalidParam {
                name: "database".into(),
                reason: "no pipeline here reads a database of that name".into(),
            }),
            ..ApiError::new(StatusCode::NOT_FOUND, "unknown_database", e.to_string())
        },
        CatalogError::Connect { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "source_unavailable",
            e.to_string(),
        ),
        CatalogError::Query { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "catalog_query_failed",
            e.to_string(),
        ),
    }
}

/// 400 for the first query parameter not in `allowed`.
fn only_params(query: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match query.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_param(
            k,
            format!("unknown query parameter `{k}`"),
        )),
        None => Ok(()),
    }
}

fn database_param(database: &str) -> Result<(), ApiError> {
    check_name(database).map_err(|e| ApiError::bad_param("database", format!("database name {e}")))
}

/// The problems the catalog routes answer with (documentation only).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum CatalogProblems {
    /// Malformed `database`, `schema` or `table`, or an unknown query parameter
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No pipeline here reads that database, or it has no such table
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// A catalog query failed
    #[response(status = 502, content_type = "application/problem+json")]
    QueryFailed(Problem),
    /// No instance of the database answers
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

#[utoipa::path(get, path = "/inventory", tag = "catalog",
    responses((status = 200, description = "Applications → databases → instances → tables of the loaded pipelines", body = Inventory)))]
pub(crate) async fn get_inventory(State(pipelines): State<Pipelines>) -> Response {
    axum::Json(project(&pipelines)).into_response()
}

#[utoipa::path(get, path = "/catalog/{database}/tables", tag = "catalog",
    params(
        ("database" = String, Path, description = "A source database name (`/inventory`)"),
        ("schema" = Option<String>, Query, description = "Only the tables of this schema"),
    ),
    responses(
        (status = 200, description = "The database's tables as its catalog describes them", body = DatabaseCatalog),
        CatalogProblems,
    ))]
pub(crate) async fn list_tables(
    State(pipelines): State<Pipelines>,
    Path(database): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    database_param(&database)?;
    only_params(&query, &["schema"])?;
    let schema = query.get("schema").cloned();
    if let Some(s) = &schema {
        check_name(s).map_err(|e| ApiError::bad_param("schema", format!("schema {e}")))?;
    }
    let filter = Filter {
        schema,
        table: None,
    };
    let catalog = database_catalog(&pipelines, &database, &filter)
        .await
        .map_err(api_error)?;
    Ok(axum::Json(catalog).into_response())
}

#[utoipa::path(get, path = "/catalog/{database}/tables/{table}", tag = "catalog",
    params(
        ("database" = String, Path, description = "A source database name (`/inventory`)"),
        ("table" = String, Path, description = "`schema.table`; quote a part holding a dot (`\"a.b\".c`)"),
    ),
    responses(
        (status = 200, description = "The table as its catalog describes it", body = CatalogTable),
        CatalogProblems,
    ))]
pub(crate) async fn get_table(
    State(pipelines): State<Pipelines>,
    Path((database, table_name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    database_param(&database)?;
    only_params(&query, &[])?;
    let (schema, name) =
        parse_table_name(&table_name).map_err(|e| ApiError::bad_param("table", e))?;
    match table(&pipelines, &database, &schema, &name)
        .await
        .map_err(api_error)?
    {
        Some(t) => Ok(axum::Json(t).into_response()),
        None => Err(ApiError {
            param: Some(super::problem::InvalidParam {
                name: "table".into(),
                reason: "no such table in the database".into(),
            }),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_table",
                format!("database {database:?} has no table {schema}.{name}"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_with_quotes_and_name_what_is_wrong() {
        let ok = |s: &str| parse_table_name(s).unwrap();
        assert_eq!(ok("public.t"), ("public".into(), "t".into()));
        assert_eq!(ok("Public.MyTable"), ("Public".into(), "MyTable".into()));
        assert_eq!(ok("\"a.b\".c"), ("a.b".into(), "c".into()));
        assert_eq!(ok("s.\"x\"\"y.z\""), ("s".into(), "x\"y.z".into()));
        for bad in [
            "t", "", ".t", "s.", "s.t.u", "\"s.t", "\"s\"x.t", "s.\"t\"x",
        ] {
            let e = parse_table_name(bad).unwrap_err();
            assert!(
                e.starts_with("must be schema.table") || e.contains("1 to 63"),
                "{bad}: {e}"
            );
        }
        let long = format!("s.{}", "t".repeat(64));
        assert_eq!(
            parse_table_name(&long).unwrap_err(),
            "table name must be 1 to 63 bytes"
        );
        assert_eq!(
            parse_table_name("s\u{7}.t").unwrap_err(),
            "schema must not hold control characters"
        );
    }
}
