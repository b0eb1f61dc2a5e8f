//! Catalog introspection of one source database: one query per concern (tables, columns,
//! constraints, indexes, publication membership), each over every selected table at once, so the
//! number of round trips does not grow with tables or columns.
//!
//! The tables are the ordinary and partitioned tables outside PostgreSQL's own schemas
//! (`pg_catalog`, `information_schema`, `pg_toast`, temporary schemas), optionally narrowed to one
//! schema or one table. Type kinds are classified as capture classifies them
//! ([`crate::capture::catalog`]): enums, domains, arrays (with their element), base types.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::{Client, Row};
use utoipa::ToSchema;

/// Which tables to describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this schema.
    pub schema: Option<String>,
    /// Only this table (with `schema`).
    pub table: Option<String>,
}

/// One table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CatalogTable {
    pub schema: String,
    pub name: String,
    pub kind: CatalogTableKind,
    /// What PostgreSQL logs of an updated or deleted row's old version.
    pub replica_identity: ReplicaIdentity,
    /// The index whose columns are logged, when `replica_identity` is `index`.
    pub replica_identity_index: Option<String>,
    /// In column order.
    pub columns: Vec<CatalogColumn>,
    pub primary_key: Option<CatalogKey>,
    /// Unique constraints, then unique indexes that back no constraint (whole-table, plain
    /// columns only: a partial or expression index is not a key), by name.
    pub unique_keys: Vec<CatalogKey>,
    /// By name.
    pub foreign_keys: Vec<ForeignKey>,
    /// Every index (primary, unique and others), by name.
    pub indexes: Vec<CatalogIndex>,
    /// Which of the pipelines' publications include the table.
    pub publications: Vec<String>,
    /// The pipelines that sync it, with their target lists (empty: not synced).
    pub synced_by: Vec<SyncedBy>,
}

/// A synced table's pipeline and lists.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SyncedBy {
    pub pipeline: String,
    /// The default list, then the route lists.
    pub lists: Vec<String>,
}

/// `pg_class.relkind` of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatalogTableKind {
    Table,
    PartitionedTable,
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaIdentity {
    /// The primary key's columns (nothing without one).
    Default,
    /// Every column.
    Full,
    /// The columns of `replica_identity_index`.
    CatalogIndex,
    Nothing,
}

/// One column.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CatalogColumn {
    pub name: String,
    /// 1-based `attnum` (gaps where columns were dropped).
    pub position: i16,
    /// As PostgreSQL prints it: `character varying(20)`, `integer[]`, `public.mood`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub type_kind: ColumnTypeKind,
    /// For arrays: the element type.
    pub element_type: Option<String>,
    /// For enums and arrays of enums: the labels in sort order.
    pub enum_values: Option<Vec<String>>,
    pub nullable: bool,
    /// The default expression (none for generated columns).
    pub default: Option<String>,
    /// The expression of a `GENERATED ALWAYS AS (…) STORED` column.
    pub generated: Option<String>,
    pub identity: Option<ColumnIdentity>,
}

/// What kind of type a column has (`pg_type.typtype`, arrays told apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnTypeKind {
    Base,
    Enum,
    Array,
    Domain,
    Composite,
    Range,
    Multirange,
    Other,
}

/// `GENERATED … AS IDENTITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnIdentity {
    Always,
    ByDefault,
}

/// A primary or unique key.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CatalogKey {
    /// The constraint's name, or the index's when no constraint backs it.
    pub name: String,
    /// In key order.
    pub columns: Vec<String>,
    /// A constraint; `false`: a unique index without one.
    pub constraint: bool,
}

/// A foreign key constraint.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ForeignKey {
    pub name: String,
    /// The referencing columns, in key order.
    pub columns: Vec<String>,
    pub references_schema: String,
    pub references_table: String,
    /// The referenced columns, paired with `columns`.
    pub references_columns: Vec<String>,
    pub on_update: ForeignKeyAction,
    pub on_delete: ForeignKeyAction,
}

/// `ON UPDATE` / `ON DELETE` of a foreign key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForeignKeyAction {
    NoAction,
    Restrict,
    Cascade,
    SetNull,
    SetDefault,
}

/// An index.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CatalogIndex {
    pub name: String,
    /// Access method: `btree`, `hash`, `gin`, `gist`, …
    pub method: String,
    pub unique: bool,
    pub primary: bool,
    /// Key columns, or expressions as PostgreSQL prints them, in order.
    pub columns: Vec<String>,
    /// `INCLUDE` columns.
    pub include: Vec<String>,
    /// The `WHERE` of a partial index.
    pub predicate: Option<String>,
    /// `CREATE INDEX …` as PostgreSQL prints it.
    pub definition: String,
}

/// Describes the tables `filter` selects, ordered by schema and name; `publications` are the
/// names whose membership is reported. `synced_by` is left empty (the caller knows the pipelines).
pub async fn describe(
    client: &Client,
    filter: &Filter,
    publications: &[String],
) -> Result<Vec<CatalogTable>, tokio_postgres::Error> {
    let (oids, mut tables) = tables(client, filter).await?;
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    let mut columns = columns(client, &oids).await?;
    let mut constraints = constraints(client, &oids).await?;
    let mut indexes = indexes(client, &oids).await?;
    let members = publication_members(client, publications).await?;
    for (oid, t) in oids.iter().zip(tables.iter_mut()) {
        t.columns = columns.remove(oid).unwrap_or_default();
        let (primary, unique, foreign) = constraints.remove(oid).unwrap_or_default();
        t.primary_key = primary;
        t.unique_keys = unique;
        t.foreign_keys = foreign;
        let (idx, unique_indexes) = indexes.remove(oid).unwrap_or_default();
        t.indexes = idx;
        t.unique_keys.extend(unique_indexes);
        t.publications = members
            .iter()
            .filter(|(_, s, n)| *s == t.schema && *n == t.name)
            .map(|(p, _, _)| p.clone())
            .collect();
    }
    Ok(tables)
}

async fn tables(
    client: &Client,
    filter: &Filter,
) -> Result<(Vec<u32>, Vec<CatalogTable>), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, \
             c.relreplident::text, \
             (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
              WHERE i.indrelid = c.oid AND i.indisreplident) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)' \
             AND ($1::text IS NULL OR n.nspname = $1) AND ($2::text IS NULL OR c.relname = $2) \
             ORDER BY n.nspname, c.relname",
            &[&filter.schema, &filter.table],
        )
        .await?;
    let mut oids = Vec::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        oids.push(r.get::<_, u32>(0));
        let kind: String = r.get(3);
        let ident: String = r.get(4);
        out.push(CatalogTable {
            schema: r.get(1),
            name: r.get(2),
            kind: if kind == "p" {
                CatalogTableKind::PartitionedTable
            } else {
                CatalogTableKind::Table
            },
            replica_identity: match ident.as_str() {
                "f" => ReplicaIdentity::Full,
                "i" => ReplicaIdentity::CatalogIndex,
                "n" => ReplicaIdentity::Nothing,
                _ => ReplicaIdentity::Default,
            },
            replica_identity_index: r.get(5),
            columns: Vec::new(),
            primary_key: None,
            unique_keys: Vec::new(),
            foreign_keys: Vec::new(),
            indexes: Vec::new(),
            publications: Vec::new(),
            synced_by: Vec::new(),
        });
    }
    Ok((oids, out))
}

async fn columns(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, Vec<CatalogColumn>>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attrelid, a.attname::text, a.attnum, format_type(a.atttypid, a.atttypmod), \
             NOT a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attgenerated::text, \
             a.attidentity::text, t.typtype::text, \
             CASE WHEN et.oid IS NOT NULL THEN format_type(et.oid, NULL) END, \
             (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e \
              WHERE e.enumtypid = coalesce(et.oid, t.oid)) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_type et ON t.typcategory = 'A' AND t.typelem <> 0 AND et.oid = t.typelem \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attrelid, a.attnum",
            &[&oids],
        )
        .await?;
    let mut out: HashMap<u32, Vec<CatalogColumn>> = HashMap::new();
    for r in &rows {
        out.entry(r.get(0)).or_default().push(column(r));
    }
    Ok(out)
}

fn column(r: &Row) -> CatalogColumn {
    let expr: Option<String> = r.get(5);
    let generated = r.get::<_, String>(6) == "s";
    let typtype: String = r.get(8);
    let element_type: Option<String> = r.get(9);
    let type_kind = match (typtype.as_str(), element_type.is_some()) {
        ("b", true) => ColumnTypeKind::Array,
        ("b", false) => ColumnTypeKind::Base,
        ("e", _) => ColumnTypeKind::Enum,
        ("d", _) => ColumnTypeKind::Domain,
        ("c", _) => ColumnTypeKind::Composite,
        ("r", _) => ColumnTypeKind::Range,
        ("m", _) => ColumnTypeKind::Multirange,
        _ => ColumnTypeKind::Other,
    };
    CatalogColumn {
        name: r.get(1),
        position: r.get(2),
        type_name: r.get::<_, Option<String>>(3).unwrap_or_default(),
        type_kind,
        element_type,
        enum_values: r.get(10),
        nullable: r.get(4),
        default: expr.clone().filter(|_| !generated),
        generated: expr.filter(|_| generated),
        identity: match r.get::<_, String>(7).as_str() {
            "a" => Some(ColumnIdentity::Always),
            "d" => Some(ColumnIdentity::ByDefault),
            _ => None,
        },
    }
}

/// Per table: the primary key, the unique constraints and the foreign keys.
type Constraints = (Option<CatalogKey>, Vec<CatalogKey>, Vec<ForeignKey>);

async fn constraints(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, Constraints>, tokio_postgres::Error> {
    // Column lists in key order: `conkey` / `confkey` unnested with their ordinality.
    let rows = client
        .query(
            "SELECT con.conrelid, con.conname::text, con.contype::text, \
             ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o) \
                   JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o), \
             fn.nspname::text, fc.relname::text, \
             ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o) \
                   JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o), \
             con.confupdtype::text, con.confdeltype::text \
             FROM pg_constraint con \
             LEFT JOIN pg_class fc ON fc.oid = con.confrelid \
             LEFT JOIN pg_namespace fn ON fn.oid = fc.relnamespace \
             WHERE con.conrelid = ANY($1) AND con.contype IN ('p', 'u', 'f') \
             ORDER BY con.conrelid, con.conname",
            &[&oids],
        )
        .await?;
    let mut out: HashMap<u32, Constraints> = HashMap::new();
    for r in &rows {
        let entry = out.entry(r.get(0)).or_default();
        let key = CatalogKey {
            name: r.get(1),
            columns: r.get(3),
            constraint: true,
        };
        match r.get::<_, String>(2).as_str() {
            "p" => entry.0 = Some(key),
            "u" => entry.1.push(key),
            _ => entry.2.push(ForeignKey {
                name: key.name,
                columns: key.columns,
                references_schema: r.get::<_, Option<String>>(4).unwrap_or_default(),
                references_table: r.get::<_, Option<String>>(5).unwrap_or_default(),
                references_columns: r.get(6),
                on_update: fk_action(&r.get::<_, String>(7)),
                on_delete: fk_action(&r.get::<_, String>(8)),
            }),
        }
    }
    Ok(out)
}

fn fk_action(code: &str) -> ForeignKeyAction {
    match code {
        "r" => ForeignKeyAction::Restrict,
        "c" => ForeignKeyAction::Cascade,
        "n" => ForeignKeyAction::SetNull,
        "d" => ForeignKeyAction::SetDefault,
        _ => ForeignKeyAction::NoAction,
    }
}

/// Per table: every index, and the unique keys of the unique indexes that back no constraint.
type Indexes = (Vec<CatalogIndex>, Vec<CatalogKey>);

async fn indexes(
    client: &Client,
    oids: &[u32],
) -> Result<HashMap<u32, Indexes>, tokio_postgres::Error> {
    // `pg_get_indexdef(index, n, true)` prints key column n as a name or an expression.
    let rows = client
        .query(
            "SELECT i.indrelid, ic.relname::text, am.amname::text, i.indisunique, i.indisprimary, \
             ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) \
                   FROM generate_series(1, i.indnkeyatts::int) k ORDER BY k), \
             ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) \
                   FROM generate_series(i.indnkeyatts::int + 1, i.indnatts::int) k ORDER BY k), \
             pg_get_expr(i.indpred, i.indrelid, true), pg_get_indexdef(i.indexrelid), \
             i.indexprs IS NOT NULL, \
             EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid \
                     AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x')) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_am am ON am.oid = ic.relam \
             WHERE i.indrelid = ANY($1) ORDER BY i.indrelid, ic.relname",
            &[&oids],
        )
        .await?;
    let mut out: HashMap<u32, Indexes> = HashMap::new();
    for r in &rows {
        let entry = out.entry(r.get(0)).or_default();
        let index = CatalogIndex {
            name: r.get(1),
            method: r.get(2),
            unique: r.get(3),
            primary: r.get(4),
            columns: r.get(5),
            include: r.get(6),
            predicate: r.get(7),
            definition: r.get(8),
        };
        let expressions: bool = r.get(9);
        let backs_constraint: bool = r.get(10);
        if index.unique && !backs_constraint && !expressions && index.predicate.is_none() {
            entry.1.push(CatalogKey {
                name: index.name.clone(),
                columns: index.columns.clone(),
                constraint: false,
            });
        }
        entry.0.push(index);
    }
    Ok(out)
}

/// `(publication, schema, table)` of every table in `publications` (`FOR ALL TABLES` and
/// `FOR TABLES IN SCHEMA` resolved by `pg_publication_tables`).
async fn publication_members(
    client: &Client,
    publications: &[String],
) -> Result<Vec<(String, String, String)>, tokio_postgres::Error> {
    if publications.is_empty() {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT pubname::text, schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = ANY($1) ORDER BY pubname",
            &[&publications],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}
