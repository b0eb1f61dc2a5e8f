//! The human form of the inventory and catalog (`syncbridge inventory`, `syncbridge catalog`
//! without `--json`): aligned plain-text tables, one block per table.

use std::fmt::Write;

use super::DatabaseCatalog;
use super::introspect::{
    CatalogColumn, CatalogTable, ColumnIdentity, ForeignKeyAction, ReplicaIdentity,
};
use super::inventory::Inventory;

/// Rows as columns padded to the widest cell, two spaces apart, each line `indent`ed.
fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = indent.to_string();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// The inventory as one line per application, database, instance and table.
pub fn inventory(inv: &Inventory) -> String {
    let mut out = String::new();
    for app in &inv.applications {
        let name = app.name.as_deref().unwrap_or("(no application label)");
        let _ = writeln!(out, "application {name}");
        for db in &app.databases {
            let _ = writeln!(out, "  database {}", db.name);
            for i in &db.instances {
                let _ = writeln!(
                    out,
                    "    instance {}:{} ({})",
                    i.host,
                    i.port,
                    i.pipelines.join(", ")
                );
            }
            let mut rows = vec![vec!["table".into(), "pipeline".into(), "lists".into()]];
            for t in &db.tables {
                rows.push(vec![
                    format!("{}.{}", t.schema, t.name),
                    t.pipeline.clone(),
                    t.lists.join(", "),
                ]);
            }
            out.push_str(&aligned(&rows, "    "));
        }
    }
    out
}

/// A database's catalog: a header, then every table.
pub fn database(c: &DatabaseCatalog) -> String {
    let mut out = format!(
        "database {} at {}:{} (publications: {}), {} table(s)\n",
        c.database,
        c.instance.host,
        c.instance.port,
        or_dash(&c.publications),
        c.tables.len()
    );
    for t in &c.tables {
        out.push('\n');
        out.push_str(&table(t));
    }
    out
}

fn replica_identity(t: &CatalogTable) -> String {
    match t.replica_identity {
        ReplicaIdentity::Default => "default".into(),
        ReplicaIdentity::Full => "full".into(),
        ReplicaIdentity::Nothing => "nothing".into(),
        ReplicaIdentity::CatalogIndex => format!(
            "index {}",
            t.replica_identity_index.as_deref().unwrap_or("?")
        ),
    }
}

fn column_row(c: &CatalogColumn) -> Vec<String> {
    let mut ty = c.type_name.clone();
    if let Some(values) = &c.enum_values {
        let _ = write!(ty, " ({})", values.join("|"));
    }
    let default = match (&c.default, &c.generated, c.identity) {
        (_, Some(g), _) => format!("generated: {g}"),
        (_, _, Some(ColumnIdentity::Always)) => "identity always".into(),
        (_, _, Some(ColumnIdentity::ByDefault)) => "identity by default".into(),
        (Some(d), _, _) => d.clone(),
        _ => String::new(),
    };
    vec![
        c.name.clone(),
        ty,
        if c.nullable { "null" } else { "not null" }.into(),
        default,
    ]
}

fn action(a: ForeignKeyAction) -> &'static str {
    match a {
        ForeignKeyAction::NoAction => "no action",
        ForeignKeyAction::Restrict => "restrict",
        ForeignKeyAction::Cascade => "cascade",
        ForeignKeyAction::SetNull => "set null",
        ForeignKeyAction::SetDefault => "set default",
    }
}

/// One table: what it is, its columns, then its keys and indexes.
pub fn table(t: &CatalogTable) -> String {
    let synced: Vec<String> = t
        .synced_by
        .iter()
        .map(|s| format!("{} → {}", s.pipeline, s.lists.join(", ")))
        .collect();
    let mut out = format!(
        "{}.{}  replica identity {}  publications: {}  synced by: {}\n",
        t.schema,
        t.name,
        replica_identity(t),
        or_dash(&t.publications),
        or_dash(&synced)
    );
    let mut rows = vec![vec![
        "column".into(),
        "type".into(),
        "null".into(),
        "default".into(),
    ]];
    rows.extend(t.columns.iter().map(column_row));
    out.push_str(&aligned(&rows, "  "));
    let mut keys: Vec<Vec<String>> = Vec::new();
    if let Some(pk) = &t.primary_key {
        keys.push(vec![
            "primary key".into(),
            pk.name.clone(),
            pk.columns.join(", "),
        ]);
    }
    for u in &t.unique_keys {
        let what = if u.constraint {
            "unique"
        } else {
            "unique index"
        };
        keys.push(vec![what.into(), u.name.clone(), u.columns.join(", ")]);
    }
    for f in &t.foreign_keys {
        keys.push(vec![
            "foreign key".into(),
            f.name.clone(),
            format!(
                "{} → {}.{} ({}) on update {} on delete {}",
                f.columns.join(", "),
                f.references_schema,
                f.references_table,
                f.references_columns.join(", "),
                action(f.on_update),
                action(f.on_delete)
            ),
        ]);
    }
    for i in &t.indexes {
        keys.push(vec!["index".into(), i.name.clone(), i.definition.clone()]);
    }
    out.push_str(&aligned(&keys, "  "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_trailing_blanks_trimmed() {
        let rows = vec![
            vec!["a".to_string(), "long type".into(), "x".into()],
            vec!["longer".to_string(), "t".into(), String::new()],
        ];
        assert_eq!(
            aligned(&rows, "  "),
            "  a       long type  x\n  longer  t\n"
        );
    }
}
