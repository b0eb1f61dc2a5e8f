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
//! Per query source (`query:`):
//! - **error** when the query does not run (the server's message);
//! - **error** when a key, cursor or mapped column is not in its result, when a key column is
//!   NULL in some row or two rows share a key, or when the cursor's type cannot be ordered as its
//!   `kind` says (`timestamp`: date/timestamp types; `incrementing`: integers or numeric).
//!
//! Opt-in (`--db`) so that plain `validate` stays offline. Uses a regular connection (no TLS, like
//! capture's catalog connection) and only reads the catalog.

use std::fmt;

use tokio_postgres::Client;

use super::catalog::{primary_key, quote_ident};
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
        let found = match &entry.query {
            Some(q) => check_query(client, entry, q).await?,
            None => check_table(client, entry).await?,
        };
        out.extend(
            found
                .into_iter()
                .map(|(severity, message)| Finding::at(&p.file, (line, col), severity, message)),
        );
        if entry.query.is_none() {
            for (column, severity, message) in mapping_problems(client, entry).await? {
                out.push(Finding::at(
                    &p.file,
                    p.mapping_at(i, &column),
                    severity,
                    message,
                ));
            }
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

/// The checks of one table (see the module docs).
async fn check_table(
    client: &Client,
    entry: &crate::config::SyncEntry,
) -> Result<Vec<(Severity, String)>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let mut push = |severity, message: String| out.push((severity, message));
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
        return Ok(out);
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
    Ok(out)
}

/// Types a timestamp cursor can be: date, timestamp, timestamptz.
const TIMESTAMP_OIDS: &[u32] = &[1082, 1114, 1184];
/// Types an incrementing cursor can be: int2, int4, int8, numeric.
const INCREMENTING_OIDS: &[u32] = &[21, 23, 20, 1700];

/// The checks of one query source (see the module docs). A query that does not run is a finding,
/// not a failure of the check.
async fn check_query(
    client: &Client,
    entry: &crate::config::SyncEntry,
    q: &crate::config::QuerySource,
) -> Result<Vec<(Severity, String)>, tokio_postgres::Error> {
    let what = format!("query of list {:?}", entry.list);
    let from = super::query::select_all(&q.sql);
    let stmt = match client.prepare(&from).await {
        Ok(s) => s,
        Err(e) => {
            let why = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            return Ok(vec![(
                Severity::Error,
                format!("the {what} does not run: {why}"),
            )]);
        }
    };
    let columns: Vec<(&str, u32)> = stmt
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_().oid()))
        .collect();
    let has = |c: &str| columns.iter().any(|(n, _)| *n == c);
    let mut out = Vec::new();
    let key = entry.key.clone().unwrap_or_default();
    for k in key.iter().filter(|k| !has(k)) {
        out.push((
            Severity::Error,
            format!("key column {k:?} is not a column of the {what}"),
        ));
    }
    for f in entry.fields.iter().filter(|f| !has(&f.column)) {
        out.push((
            Severity::Error,
            format!("mapped column {:?} is not a column of the {what}", f.column),
        ));
    }
    if let Some(c) = &q.cursor {
        match columns.iter().find(|(n, _)| *n == c.column) {
            None => out.push((
                Severity::Error,
                format!("cursor column {:?} is not a column of the {what}", c.column),
            )),
            Some((_, oid)) => {
                let ordered = match c.kind {
                    crate::config::CursorKind::Timestamp => TIMESTAMP_OIDS,
                    crate::config::CursorKind::Incrementing => INCREMENTING_OIDS,
                };
                if !ordered.contains(oid) {
                    out.push((Severity::Error, format!(
                        "cursor column {:?} of the {what} cannot be a `{}` cursor (its type, oid {oid}, is not {})",
                        c.column, c.kind, match c.kind {
                            crate::config::CursorKind::Timestamp => "date, timestamp or timestamptz",
                            crate::config::CursorKind::Incrementing => "an integer or numeric",
                        })));
                }
            }
        }
    }
    if key.is_empty() || !out.is_empty() {
        return Ok(out);
    }
    out.extend(key_problems(client, &from, &key, &what).await?);
    Ok(out)
}

/// NULL and repeated key values in a query's result.
async fn key_problems(
    client: &Client,
    from: &str,
    key: &[String],
    what: &str,
) -> Result<Vec<(Severity, String)>, tokio_postgres::Error> {
    let mut out = Vec::new();
    let cols: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
    let row = client
        .query_one(
            &format!(
                "WITH q AS ({from}) SELECT \
                 (SELECT count(*) FROM q WHERE {nulls}), \
                 (SELECT count(*) FROM (SELECT 1 FROM q GROUP BY {list} HAVING count(*) > 1) d)",
                nulls = cols
                    .iter()
                    .map(|c| format!("{c} IS NULL"))
                    .collect::<Vec<_>>()
                    .join(" OR "),
                list = cols.join(", "),
            ),
            &[],
        )
        .await?;
    let (nulls, dups): (i64, i64) = (row.get(0), row.get(1));
    if nulls > 0 {
        out.push((Severity::Error, format!("{nulls} row(s) of the {what} have a NULL key column ({}): a key must identify a row", key.join(", "))));
    }
    if dups > 0 {
        out.push((Severity::Error, format!("{dups} key value(s) of the {what} occur in more than one row: `key` ({}) must be unique", key.join(", "))));
    }
    Ok(out)
}
