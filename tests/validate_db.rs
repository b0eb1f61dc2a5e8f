//! `syncbridge validate --db`: checks the synced tables in the source database (real PostgreSQL of
//! the stack; fails without DATABASE_URL). Warnings per TOAST-able column of tables that are not
//! REPLICA IDENTITY FULL keep exit 0; a missing table or a table without a key exits 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::database_url;

const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");

fn sql(statements: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the stack's PostgreSQL");
        tokio::spawn(conn);
        client.batch_execute(statements).await.expect(statements);
    });
}

struct Tables(Vec<String>);

impl Drop for Tables {
    fn drop(&mut self) {
        let list = self.0.join(", ");
        sql(&format!("DROP TABLE IF EXISTS {list}"));
    }
}

fn pipeline(dir: &Path, name: &str, tables: &[&str]) -> (PathBuf, String) {
    let mut sync = String::new();
    for (i, t) in tables.iter().enumerate() {
        sync.push_str(&format!(
            "  - table: {t}\n    list: List {i}\n    fields:\n      id: Title\n"
        ));
    }
    pipeline_file(dir, name, &sync)
}

/// Writes `<name>.yaml` with the `sync:` entries `sync`; returns its path and text.
fn pipeline_file(dir: &Path, name: &str, sync: &str) -> (PathBuf, String) {
    let yaml = format!(
        r#"version: 1
name: {name}
source:
  url: {url}
graph:
  base_url: ${{GRAPH_BASE_URL}}
  token_url: ${{GRAPH_TOKEN_URL}}
  tenant: contoso.onmicrosoft.com
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: dev-secret
  site: contoso.sharepoint.com:/sites/dev
sync:
{sync}"#,
        url = database_url(),
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, &yaml).unwrap();
    (file, yaml)
}

/// `file:line:col` of the `table:` value naming `table`.
fn loc(file: &Path, yaml: &str, table: &str) -> String {
    let (i, line) = yaml
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim_end().ends_with(&format!("table: {table}")))
        .unwrap();
    let col = line.find(table).unwrap() + 1;
    format!("{}:{}:{col}", file.display(), i + 1)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn validate_db_reports_missing_tables_keys_and_toast_risk() {
    let n = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (plain, full, nokey) = (
        format!("public.vd_plain_{n}"),
        format!("public.vd_full_{n}"),
        format!("public.vd_nokey_{n}"),
    );
    let missing = format!("public.vd_missing_{n}");
    let _tables = Tables(vec![plain.clone(), full.clone(), nokey.clone()]);
    sql(&format!(
        "CREATE TABLE {plain} (id int PRIMARY KEY, notes text, doc jsonb, tags text[], n int, at timestamptz);
         CREATE TABLE {full} (id int PRIMARY KEY, notes text);
         ALTER TABLE {full} REPLICA IDENTITY FULL;
         CREATE TABLE {nokey} (id int, notes text);"
    ));
    let dir = tempfile::tempdir().unwrap();

    // Only warnings: exit 0, one warning per TOAST-able column of the non-FULL table.
    let (file, yaml) = pipeline(dir.path(), "vd_ok", &[&plain, &full]);
    let out = run(&["validate", "--db", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let at = loc(&file, &yaml, &plain);
    let expected = format!(
        "{at}: warning: {plain}.notes (text) can be TOASTed and the table is not REPLICA IDENTITY \
         FULL; updates that do not change it arrive as \"unchanged\" — run ALTER TABLE {plain} \
         REPLICA IDENTITY FULL to always receive it"
    );
    assert!(
        stderr.lines().any(|l| l == expected),
        "want {expected}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("{at}: warning: {plain}.doc (jsonb)")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{at}: warning: {plain}.tags (text[])")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("warning:").count(),
        3,
        "int/timestamptz/FULL table: none\n{stderr}"
    );
    assert!(!stderr.contains(&full), "{stderr}");
    assert!(stdout.contains("3 warning(s)"), "{stdout}");

    // Without --db nothing is checked in the database.
    let out = run(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"));

    // Errors: exit 1, at each entry's table value.
    let (file, yaml) = pipeline(dir.path(), "vd_bad", &[&plain, &nokey, &missing]);
    let out = run(&["validate", "--db", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: error: table {nokey} has no primary key and no `key` is configured",
            loc(&file, &yaml, &nokey)
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}: error: table {missing} does not exist",
            loc(&file, &yaml, &missing)
        )),
        "{stderr}"
    );
    // The key-less table still gets its TOAST warning; the missing one has nothing else.
    assert!(
        stderr.contains(&format!("warning: {nokey}.notes (text)")),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s) found"), "{stderr}");
}

#[test]
fn validate_db_with_an_unreachable_database_is_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let yaml = format!(
        r#"version: 1
name: vd_down
source:
  url: postgres://nobody@127.0.0.1:{port}/x?sslmode=disable
graph:
  base_url: ${{GRAPH_BASE_URL}}
  token_url: ${{GRAPH_TOKEN_URL}}
  tenant: contoso.onmicrosoft.com
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: dev-secret
  site: contoso.sharepoint.com:/sites/dev
sync:
  - table: public.t
    list: T
    fields:
      id: Title
"#
    );
    let file = dir.path().join("down.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run(&["validate", "--db", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot connect to source.url"), "{stderr}");
}

/// Issue 21: every mapped column the table lacks, and every mapped column whose values its field
/// cannot take, is an error at the mapping's own line; text into a number field (parsed value by
/// value) a warning; columns that fit say nothing.
#[test]
fn validate_db_reports_every_missing_or_unconvertible_mapped_column_at_its_mapping() {
    let n = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let t = format!("public.vd_map_{n}");
    let _tables = Tables(vec![t.clone()]);
    sql(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, price numeric(10,2), qty text, due date);
         ALTER TABLE {t} REPLICA IDENTITY FULL;"
    ));
    let dir = tempfile::tempdir().unwrap();
    let sync = format!(
        "  - table: {t}
    list: Map {n}
    fields:
      id: Title
      price: {{ field: Price, type: number }}
      qty: {{ field: Qty, type: number }}
      gone: Gone
      due: {{ field: Due, type: boolean }}
"
    );
    let (file, yaml) = pipeline_file(dir.path(), "vd_map", &sync);
    let at = |column: &str| {
        let (i, line) = yaml
            .lines()
            .enumerate()
            .find(|(_, l)| l.trim_start().starts_with(&format!("{column}:")))
            .unwrap();
        let col = line.find(column).unwrap() + 1;
        format!("{}:{}:{col}", file.display(), i + 1)
    };
    let out = run(&["validate", "--db", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for (column, sev, what) in [
        (
            "gone",
            "error",
            format!("column gone does not exist in table {t}"),
        ),
        (
            "due",
            "error",
            format!("column {t}.due is date: a boolean field cannot hold it"),
        ),
        (
            "qty",
            "warning",
            format!("column {t}.qty is text: a number field takes it only by parsing each value"),
        ),
    ] {
        let want = format!(
            "{}: {sev}: mapping of column \"{column}\": {what}",
            at(column)
        );
        assert!(stderr.contains(&want), "want {want}\n{stderr}");
    }
    assert!(
        !stderr.contains("\"price\""),
        "numeric fits number: {stderr}"
    );
    assert!(!stderr.contains("\"id\""), "{stderr}");
    assert!(stderr.contains("2 problem(s) found"), "{stderr}");
}
