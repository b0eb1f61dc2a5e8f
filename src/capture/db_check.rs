//! `syncbridge validate --db`: the checks that need the source database, reported like config
//! problems (`file:line:col: error|warning: message`, at the sync entry's `table:` value).
//!
//! Per synced table:
//! - **error** when the table does not exist (or the role cannot see it);
//! - **error** when it has no primary key and no `key:` is configured, or a configured key column
//!   does not exist;
//! - **warning** for every TOAST-able column (variable-length storage: `pg_attribute.attstorage`
//!   other than `p`, which defaults to the type's `typstorage` — text, varchar, jsonb, bytea,
//!   arrays, …) of a table whose replica identity is not FULL: an UPDATE that does not change such
//!   a value sends it as "unchanged TOAST" (no value), so consumers must merge it from earlier
//!   state. `ALTER TABLE … REPLICA IDENTITY FULL` makes PostgreSQL send it every time.
//!
//! - **error** for every mapped column the table lacks, and every mapped column whose values its
//!   field cannot take ([`crate::process::convert::converts`]: the rule that pauses a running
//!   table); **warning** for one whose values its field takes only by parsing each one (text
//!   into a number field: [`crate::process::convert::field_holds`], the mapping editor's rule,
//!   says no). Located at the mapping's line (`fields: <column>`).
//!
//! Opt-in (`--db`) so that plain `validate` stays offline. Uses a regular connection (no TLS, like
//! capture's catalog connection) and only reads the catalog.

use std::fmt;

use tokio_postgres::Client;

use super::catalog::primary_key;
use crate::config::{LocatedPipeline, SyncEntry};
use crate::control::catalog::introspect::{ColumnTypeKind, Filter, describe};
use crate::process::convert::{TypeClass, accepted_types, converts, field_holds, pg_value_kind};

/// How bad a finding is: errors make `validate --db` exit 1, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, located like a config problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    pub message: String,
}

impl Finding {
    fn at(file: &str, (line, col): (usize, usize), severity: Severity, message: String) -> Self {
        Finding {
            file: file.to_string(),
            line,
            col,
            severity,
            message,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// The database could not be asked at all (a runtime failure, not a finding).
#[derive(Debug, thiserror::Error)]
pub enum DbCheckError {
    #[error("{file}: cannot connect to source.url: {source}")]
    Connect {
        file: String,
        #[source]
        source: crate::pg::PgConnectError,
    },
    #[error("{file}: catalog query failed: {source}")]
    Query {
        file: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `name` as written in SQL: bare when it is a plain lower-case identifier, quoted otherwise.
fn sql_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        name.to_string()
    } else {
        super::catalog::quote_ident(name)
    }
}

/// Runs every check of one pipeline against its `source.url`.
pub async fn check_pipeline(p: &LocatedPipeline) -> Result<Vec<Finding>, DbCheckError> {
    let (client, connection) = crate::pg::connect(p.config.source.url.expose())
        .await
        .map_err(|source| DbCheckError::Connect {
            file: p.file.clone(),
            source,
        })?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = check_tables(&client, p)
        .await
        .map_err(|source| DbCheckError::Query {
            file: p.file.clone(),
            source,
        });
    drop(client);
    driver.abort();
    result
}

async fn check_tables(
    client: &Client,
    p: &LocatedPipeline,
) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for (i, entry) in p.config.sync.iter().enumerate() {
        let (line, col) = p.tables.get(i).copied().unwrap_or((1, 1));
        let mut push = |severity, message: String| {
            out.push(Finding::at(&p.file, (line, col), severity, message))
        };
        let (schema, name) = (&entry.table.schema, &entry.table.name);
        let qualified = format!("{schema}.{name}");
        let row = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[schema, name],
            )
            .await?;
        let Some(row) = row else {
            push(
                Severity::Error,
                format!(
                    "table {qualified} does not exist in the source database (or the role in \
                     source.url cannot see it)"
                ),
            );
            continue;
        };
        let oid: u32 = row.get(0);
        let replident: String = row.get(1);
        let columns: Vec<(String, String, String)> = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attstorage::text \
                 FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 \
                 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        match &entry.key {
            Some(key) if !key.is_empty() => {
                for k in key {
                    if !columns.iter().any(|(c, _, _)| c == k) {
                        push(
                            Severity::Error,
                            format!("key column {k:?} does not exist in {qualified}"),
                        );
                    }
                }
            }
            _ => {
                let pk = primary_key(client, oid).await.unwrap_or_default();
                if pk.is_empty() {
                    push(
                        Severity::Error,
                        format!(
                            "table {qualified} has no primary key and no `key` is configured: add \
                             a primary key, or set `key: [col, ...]` for it (with REPLICA \
                             IDENTITY FULL or USING INDEX covering those columns)"
                        ),
                    );
                }
            }
        }
        if replident != "f" {
            let table_sql = format!("{}.{}", sql_ident(schema), sql_ident(name));
            for (col_name, ty, storage) in &columns {
                if storage != "p" {
                    push(
                        Severity::Warning,
                        format!(
                            "{qualified}.{col_name} ({ty}) can be TOASTed and the table is not \
                             REPLICA IDENTITY FULL; updates that do not change it arrive as \
                             \"unchanged\" — run ALTER TABLE {table_sql} REPLICA IDENTITY FULL \
                             to always receive it"
                        ),
                    );
                }
            }
        }
        for (column, severity, message) in mapping_problems(client, entry).await? {
            out.push(Finding::at(
                &p.file,
                p.mapping_at(i, &column),
                severity,
                message,
            ));
        }
    }
    Ok(out)
}

/// Every mapped column the table lacks or whose values its field cannot take (errors: a running
/// table pauses on them), and every one whose values its field takes only by parsing each one
/// (warnings: a value that does not parse is dead-lettered): (column, severity, message).
async fn mapping_problems(
    client: &Client,
    entry: &SyncEntry,
) -> Result<Vec<(String, Severity, String)>, tokio_postgres::Error> {
    let filter = Filter {
        schema: Some(entry.table.schema.clone()),
        table: Some(entry.table.name.clone()),
    };
    let Some(table) = describe(client, &filter, &[]).await?.into_iter().next() else {
        return Ok(Vec::new());
    };
    let t = format!("{}.{}", table.schema, table.name);
    let mut out = Vec::new();
    for f in &entry.fields {
        let at = |sev, what: String| {
            let message = format!("mapping of column {:?}: {what}", f.column);
            (f.column.clone(), sev, message)
        };
        let Some(c) = table.columns.iter().find(|c| c.name == f.column) else {
            out.push(at(
                Severity::Error,
                format!("column {} does not exist in table {t}", f.column),
            ));
            continue;
        };
        let class = match c.type_kind {
            ColumnTypeKind::Base => TypeClass::Base,
            ColumnTypeKind::Domain => TypeClass::Domain,
            _ => TypeClass::Other,
        };
        let (ty, ft, accepted) = (&c.type_name, f.field_type, accepted_types(f.field_type));
        if !converts(ft, pg_value_kind(ty, class)) {
            out.push(at(
                Severity::Error,
                format!(
                    "column {t}.{} is {ty}: a {ft} field cannot hold it ({accepted})",
                    f.column
                ),
            ));
        } else if !field_holds(ft, ty, class) {
            out.push(at(
                Severity::Warning,
                format!(
                    "column {t}.{} is {ty}: a {ft} field takes it only by parsing each value \
                     ({accepted}); a value that does not parse is dead-lettered",
                    f.column
                ),
            ));
        }
    }
    Ok(out)
}
