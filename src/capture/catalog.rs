//! Catalog access on a regular connection: relation shapes (for events), tables and keys (for
//! validation and the snapshot), the publication and the slot (created once, verified after).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::config::{CaptureConfig, TableSpec};
use super::error::CaptureError;
use crate::event::change::{Column, Relation, TypeKind};

/// PostgreSQL 14 is the oldest release whose pgoutput speaks protocol 2 with `streaming` and
/// `messages`, and whose `pg_replication_slots` has `wal_status`.
pub const MIN_SERVER_VERSION_NUM: i32 = 140_000;

/// A configured table resolved against the catalog.
#[derive(Debug, Clone)]
pub struct ResolvedTable {
    pub spec: TableSpec,
    pub oid: u32,
    /// Key columns in key order (the primary key's index order, or the configured order).
    pub key: Vec<String>,
}

/// `"a"."b"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'x'` with embedded quotes doubled (standard_conforming_strings is on since 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What a `SELECT … FROM` of a sync entry reads: its table, or its query as a subquery.
pub fn from_clause(e: &crate::config::SyncEntry) -> String {
    match &e.query {
        Some(q) => format!("({}) AS sb_query", q.sql),
        None => qualified_ident(&e.table.schema, &e.table.name),
    }
}

pub fn qualified_ident(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Catalog facts and the relation versions seen so far.
#[derive(Debug, Default)]
pub struct Catalog {
    types: HashMap<u32, TypeKind>,
    type_names: HashMap<(u32, i32), String>,
    relations: HashMap<u32, Arc<Relation>>,
    /// Configured key per table oid (after resolution).
    keys: HashMap<u32, Vec<String>>,
}

impl Catalog {
    pub fn new(tables: &[ResolvedTable]) -> Self {
        Self {
            keys: tables.iter().map(|t| (t.oid, t.key.clone())).collect(),
            ..Self::default()
        }
    }

    pub fn relation(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// The relation as the catalog describes it now (used by the snapshot, before any relation
    /// message arrived). Generated columns are left out, as pgoutput leaves them out.
    pub async fn relation_from_catalog(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Arc<Relation>, CaptureError> {
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid, a.atttypmod FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let cols: Vec<(String, u32, i32)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        self.install(client, oid, None, &cols).await
    }

    /// The relation described by a pgoutput Relation message (authoritative for column order,
    /// names and types at that point of the WAL), completed from the catalog.
    pub async fn relation_from_message(
        &mut self,
        client: &Client,
        oid: u32,
        replica_identity: u8,
        columns: &[(String, u32, i32)],
    ) -> Result<Arc<Relation>, CaptureError> {
        self.install(client, oid, Some(replica_identity as char), columns)
            .await
    }

    async fn install(
        &mut self,
        client: &Client,
        oid: u32,
        replica_identity: Option<char>,
        cols: &[(String, u32, i32)],
    ) -> Result<Arc<Relation>, CaptureError> {
        let row = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&oid],
            )
            .await?;
        let (schema, name, ident): (String, String, String) = match &row {
            Some(r) => (r.get(0), r.get(1), r.get(2)),
            None => {
                // Dropped since: keep what the previous version knew.
                match self.relations.get(&oid) {
                    Some(prev) => (
                        prev.schema.clone(),
                        prev.name.clone(),
                        prev.replica_identity.to_string(),
                    ),
                    None => {
                        return Err(CaptureError::Protocol(format!(
                            "relation oid {oid} not found in the catalog"
                        )));
                    }
                }
            }
        };
        let notnull: HashMap<String, bool> = client
            .query(
                "SELECT attname::text, attnotnull FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let key = match self.keys.get(&oid) {
            Some(k) => k.clone(),
            None => primary_key(client, oid).await?,
        };
        let mut columns = Vec::with_capacity(cols.len());
        for col in cols {
            let is_key = key.contains(&col.0);
            let nullable = !notnull.get(&col.0).copied().unwrap_or(false);
            columns.push(self.column(client, col, is_key, nullable).await?);
        }
        let replica_identity =
            replica_identity.unwrap_or_else(|| ident.chars().next().unwrap_or('d'));
        Ok(self.remember(Relation {
            oid,
            schema,
            name,
            columns,
            replica_identity,
            version: 1,
        }))
    }

    /// The relation of a query's result (a query source, `capture::query`): `cols` as the
    /// server describes the statement (name, type oid, typmod), `key` marks the key columns
    /// (not null; the other columns are taken as nullable, a query's result has no constraints).
    /// `oid` is a stable made-up id of the query source, unique in the pipeline.
    pub async fn relation_of_query(
        &mut self,
        client: &Client,
        oid: u32,
        (schema, name): (&str, &str),
        key: &[String],
        cols: &[(String, u32, i32)],
    ) -> Result<Arc<Relation>, CaptureError> {
        let mut columns = Vec::with_capacity(cols.len());
        for col in cols {
            let is_key = key.contains(&col.0);
            columns.push(self.column(client, col, is_key, !is_key).await?);
        }
        Ok(self.remember(Relation {
            oid,
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns,
            // Deletes carry the key columns only, as with REPLICA IDENTITY DEFAULT.
            replica_identity: 'd',
            version: 1,
        }))
    }

    /// One column of a relation: `(name, type oid, typmod)` completed from the catalog.
    async fn column(
        &mut self,
        client: &Client,
        (name, type_oid, typmod): &(String, u32, i32),
        is_key: bool,
        nullable: bool,
    ) -> Result<Column, CaptureError> {
        Ok(Column {
            name: name.clone(),
            type_oid: *type_oid,
            type_name: self.type_name(client, *type_oid, *typmod).await?,
            type_modifier: *typmod,
            kind: self.type_kind(client, *type_oid).await?,
            is_key,
            nullable,
        })
    }

    /// Installs `rel` as the newest version of its oid (the same `Arc` when nothing changed).
    fn remember(&mut self, mut rel: Relation) -> Arc<Relation> {
        let oid = rel.oid;
        if let Some(prev) = self.relations.get(&oid) {
            rel.version = prev.version;
            if **prev == rel {
                return prev.clone();
            }
            rel.version = prev.version + 1;
        }
        let rel = Arc::new(rel);
        self.relations.insert(oid, rel.clone());
        rel
    }

    async fn type_name(
        &mut self,
        client: &Client,
        oid: u32,
        typmod: i32,
    ) -> Result<String, CaptureError> {
        if let Some(n) = self.type_names.get(&(oid, typmod)) {
            return Ok(n.clone());
        }
        let row = client
            .query_one("SELECT format_type($1, $2)", &[&oid, &typmod])
            .await?;
        let name: Option<String> = row.get(0);
        let name = name.unwrap_or_else(|| format!("oid {oid}"));
        self.type_names.insert((oid, typmod), name.clone());
        Ok(name)
    }

    async fn type_kind(&mut self, client: &Client, oid: u32) -> Result<TypeKind, CaptureError> {
        if let Some(k) = self.types.get(&oid) {
            return Ok(k.clone());
        }
        let kind = match type_row(client, oid).await? {
            None => TypeKind::Other,
            Some((typtype, cat, elem, base)) => match (typtype.as_str(), cat.as_str()) {
                ("e", _) => TypeKind::Enum,
                ("d", _) => TypeKind::Domain { base_oid: base },
                ("b", "A") if elem != 0 => {
                    // Element kinds are not arrays themselves (PostgreSQL arrays are flat).
                    let element = match type_row(client, elem).await? {
                        Some((t, _, _, b)) => match t.as_str() {
                            "e" => TypeKind::Enum,
                            "d" => TypeKind::Domain { base_oid: b },
                            "b" => TypeKind::Base,
                            _ => TypeKind::Other,
                        },
                        None => TypeKind::Other,
                    };
                    TypeKind::Array {
                        element_oid: elem,
                        element: Box::new(element),
                    }
                }
                ("b", _) => TypeKind::Base,
                _ => TypeKind::Other,
            },
        };
        self.types.insert(oid, kind.clone());
        Ok(kind)
    }
}

async fn type_row(
    client: &Client,
    oid: u32,
) -> Result<Option<(String, String, u32, u32)>, CaptureError> {
    Ok(client
        .query_opt(
            "SELECT typtype::text, typcategory::text, typelem, typbasetype FROM pg_type WHERE oid = $1",
            &[&oid],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

/// Primary key columns in index order (empty when none).
pub async fn primary_key(client: &Client, oid: u32) -> Result<Vec<String>, CaptureError> {
    Ok(client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Server version check (PostgreSQL ≥ 14 and `wal_level = logical`).
pub async fn check_server(client: &Client) -> Result<i32, CaptureError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int4, current_setting('wal_level')",
            &[],
        )
        .await?;
    let version: i32 = row.get(0);
    let wal_level: String = row.get(1);
    if version < MIN_SERVER_VERSION_NUM {
        return Err(CaptureError::Operator(format!(
            "PostgreSQL {version} is too old: capture needs PostgreSQL 14 or later"
        )));
    }
    if wal_level != "logical" {
        return Err(CaptureError::Operator(format!(
            "wal_level is {wal_level:?}: set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    Ok(version)
}

/// Resolves every configured table: it exists, and it has a key (primary key or configured).
pub async fn resolve_tables(
    client: &Client,
    config: &CaptureConfig,
) -> Result<Vec<ResolvedTable>, CaptureError> {
    let mut out = Vec::new();
    for spec in &config.tables {
        let row = client
            .query_opt(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&spec.schema, &spec.name],
            )
            .await?;
        let Some(row) = row else {
            return Err(CaptureError::Operator(format!(
                "table {} does not exist (or the capture role cannot see it)",
                spec.qualified()
            )));
        };
        let oid: u32 = row.get(0);
        let key = match &spec.key {
            Some(k) if !k.is_empty() => {
                let cols: Vec<String> = client
                    .query(
                        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
                        &[&oid],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if let Some(missing) = k.iter().find(|c| !cols.contains(c)) {
                    return Err(CaptureError::Config(format!(
                        "configured key column {missing:?} does not exist in {}",
                        spec.qualified()
                    )));
                }
                k.clone()
            }
            _ => primary_key(client, oid).await?,
        };
        if key.is_empty() {
            return Err(CaptureError::Config(format!(
                "table {} has no primary key and no `key` is configured: add a primary key, or set \
                 `key: [col, ...]` for it in the pipeline (and REPLICA IDENTITY FULL or USING INDEX \
                 covering those columns)",
                spec.qualified()
            )));
        }
        out.push(ResolvedTable {
            spec: spec.clone(),
            oid,
            key,
        });
    }
    Ok(out)
}

/// Creates the publication on first run; afterwards verifies it covers every table.
pub async fn ensure_publication(
    client: &Client,
    config: &CaptureConfig,
    tables: &[ResolvedTable],
) -> Result<(), CaptureError> {
    let pubname = &config.publication_name;
    let existing = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[pubname],
        )
        .await?;
    match existing {
        None => {
            let list: Vec<String> = tables
                .iter()
                .map(|t| qualified_ident(&t.spec.schema, &t.spec.name))
                .collect();
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(pubname),
                list.join(", ")
            );
            client.batch_execute(&sql).await.map_err(|e| {
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                    CaptureError::Operator(format!(
                        "cannot create publication {pubname}: {e}. Grant CREATE on the database \
                         (GRANT CREATE ON DATABASE <db> TO <role>) and ownership of the tables, or \
                         have an administrator run: {sql}"
                    ))
                } else {
                    CaptureError::Postgres(e)
                }
            })?;
            tracing::info!(publication = %pubname, "created publication");
        }
        Some(row) => {
            let all_ops: bool = row.get(0);
            if !all_ops {
                return Err(CaptureError::Operator(format!(
                    "publication {pubname} does not publish all of insert, update, delete and truncate; \
                     fix: ALTER PUBLICATION {pubname} SET (publish = 'insert, update, delete, truncate')"
                )));
            }
            let published: Vec<(String, String)> = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[pubname],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let missing: Vec<&ResolvedTable> = tables
                .iter()
                .filter(|t| !published.contains(&(t.spec.schema.clone(), t.spec.name.clone())))
                .collect();
            if !missing.is_empty() {
                let names: Vec<String> = missing
                    .iter()
                    .map(|t| qualified_ident(&t.spec.schema, &t.spec.name))
                    .collect();
                return Err(CaptureError::Operator(format!(
                    "table(s) {} are configured but not in publication {pubname}. Changes to them are \
                     not captured. Fix: ALTER PUBLICATION {} ADD TABLE {}; and restart: tables \
                     new to the pipeline get an initial snapshot before streaming resumes",
                    names.join(", "),
                    quote_ident(pubname),
                    names.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// State of the pipeline's slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    Missing,
    /// Usable; `confirmed_flush` is where streaming resumes.
    Ready {
        confirmed_flush: u64,
    },
}

/// Looks the slot up and refuses one PostgreSQL invalidated or one that is not ours to use.
pub async fn slot_status(
    client: &Client,
    config: &CaptureConfig,
    server_version: i32,
) -> Result<SlotStatus, CaptureError> {
    // `conflicting` exists from PostgreSQL 16 (slots invalidated by recovery conflicts on standbys).
    let conflicting = if server_version >= 160_000 {
        "coalesce(conflicting, false)"
    } else {
        "false"
    };
    let sql = format!(
        "SELECT coalesce(plugin::text, ''), slot_type::text, coalesce(database::text, ''), \
         coalesce(wal_status, ''), {conflicting}, coalesce(confirmed_flush_lsn::text, ''), \
         current_database()::text FROM pg_replication_slots WHERE slot_name = $1"
    );
    let Some(row) = client.query_opt(&sql, &[&config.slot_name]).await? else {
        return Ok(SlotStatus::Missing);
    };
    let slot = &config.slot_name;
    let (plugin, slot_type, db, wal_status, conflicting, flush, current_db): (
        String,
        String,
        String,
        String,
        bool,
        String,
        String,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    );
    let resync = format!(
        "To resync: stop syncbridge for this pipeline, run SELECT pg_drop_replication_slot('{slot}');, \
         delete the snapshot progress file capture-{slot}.snapshot.json in the pipeline's state \
         directory, and start it again: a new slot and a full initial snapshot are taken (the ledger \
         absorbs rows already synced)"
    );
    if wal_status == "lost" || conflicting {
        return Err(CaptureError::Operator(format!(
            "replication slot {slot} was invalidated by PostgreSQL (wal_status={wal_status}, \
             conflicting={conflicting}): WAL it needed was removed (max_slot_wal_keep_size) or it \
             conflicted with recovery, so changes were lost. {resync}"
        )));
    }
    if slot_type != "logical" || plugin != "pgoutput" || db != current_db {
        return Err(CaptureError::Operator(format!(
            "replication slot {slot} exists but is not a pgoutput logical slot of database \
             {current_db} (type {slot_type}, plugin {plugin:?}, database {db:?}); it is not ours. \
             Rename the pipeline or drop that slot"
        )));
    }
    let confirmed_flush = pg_walstream::parse_lsn(&flush).map_err(|_| {
        CaptureError::Protocol(format!(
            "unparsable confirmed_flush_lsn {flush:?} of slot {slot}"
        ))
    })?;
    Ok(SlotStatus::Ready { confirmed_flush })
}
