//! Inventory and catalog (issue 11, item 5) on the real stack: a running `syncbridge run` serves
//! `GET /inventory` and `GET /catalog/{database}/tables[/{schema.table}]` for its source
//! database; `syncbridge catalog --json` and `syncbridge inventory --json` print the same
//! documents without a running process; no output anywhere carries the source password.
//!
//! The schema under test holds: an enum, a table with a unique constraint, a unique index and
//! REPLICA IDENTITY FULL; a table with a foreign key (ON DELETE CASCADE), an identity key,
//! defaults, arrays (of text and of the enum), a generated column and a partial index; and a
//! table outside the pipeline's publication. Needs `DATABASE_URL`; fails (never skips) without.

use serde_json::{Value, json};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::database_url;
use harness::{Harness, hard_timeout};

/// Drops the test's schema (its tables, enum and everything in it) when the test ends.
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        common::execute_best_effort(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

/// The password `url` carries, or a made-up one put into it (the stack's PostgreSQL trusts
/// loopback connections, so a password it does not ask for is ignored but still configured).
fn with_password(url: &str) -> (String, String) {
    let mut parsed: url::Url = url.parse().unwrap();
    if let Some(p) = parsed.password() {
        let p = p.to_string();
        return (url.to_string(), p);
    }
    let secret = format!("pw-{}", uuid::Uuid::new_v4().simple());
    if parsed.username().is_empty() {
        parsed.set_username("postgres").unwrap();
    }
    parsed.set_password(Some(&secret)).unwrap();
    (parsed.to_string(), secret)
}

async fn get(h: &Harness, path: &str) -> (u16, Value, String) {
    let resp = h
        .admin
        .get(format!("http://127.0.0.1:{}{path}", h.control_port))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body, text)
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x[key].as_str().unwrap().to_string())
        .collect()
}

fn find<'v>(v: &'v Value, key: &str, name: &str) -> &'v Value {
    v.as_array()
        .unwrap()
        .iter()
        .find(|x| x[key] == name)
        .unwrap_or_else(|| panic!("no {key}={name} in {v:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_and_inventory_describe_the_source_without_its_password() {
    hard_timeout(150, run()).await;
}

async fn run() {
    let mut h = Harness::new("cat").await;
    let s = h.name.clone();
    let _schema = Schema(s.clone());
    h.sql(&format!(
        "CREATE SCHEMA {s};
         CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE {s}.customers (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, code text);
         CREATE UNIQUE INDEX customers_code_uidx ON {s}.customers (code);
         ALTER TABLE {s}.customers REPLICA IDENTITY FULL;
         CREATE TABLE {s}.orders (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             customer_id bigint NOT NULL REFERENCES {s}.customers (id) ON DELETE CASCADE,
             ref text NOT NULL,
             status {s}.mood NOT NULL DEFAULT 'ok',
             tags text[] DEFAULT '{{}}',
             moods {s}.mood[],
             amount numeric(10,2) DEFAULT 0,
             doubled numeric GENERATED ALWAYS AS (amount * 2) STORED
         );
         CREATE INDEX orders_open_idx ON {s}.orders (customer_id) WHERE status <> 'sad';
         CREATE TABLE {s}.audit_notes (id int PRIMARY KEY, note text);"
    ))
    .await;
    let (url, password) = with_password(&database_url());
    h.source_url = url;
    let sync = format!(
        "  - table: {s}.customers\n    list: C {s}\n    fields:\n      email: Title\n    pull: {{ enabled: false }}\n\
         \x20 - table: {s}.orders\n    list: O {s}\n    routes:\n      - when: \"ref == 'x'\"\n        list: OX {s}\n    fields:\n      ref: Title\n    pull: {{ enabled: false }}\n"
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    let app = format!("app-{s}");
    // The run history in a database of its own: the shared one may carry meta-store
    // migrations of other branches, which this binary would refuse.
    let meta = common::TempDatabase::create("sbcat").await;
    let mut text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'), "control: is the file's last section");
    text.push_str(&format!(
        "  meta_url: {}\nlabels:\n  application: {app}\n  owner: team-x\n",
        meta.url
    ));
    std::fs::write(&file, text).unwrap();
    h.start(&file);
    h.wait_for("the pipeline to be ready", || async {
        matches!(
            h.admin
                .get(format!("http://127.0.0.1:{}/ready", h.control_port))
                .send()
                .await,
            Ok(r) if r.status() == 200
        )
    })
    .await;
    let db_name = url::Url::parse(&database_url()).unwrap().path()[1..].to_string();
    let mut outputs: Vec<String> = Vec::new();

    // The inventory: one application, one database, one instance, the two synced tables.
    let (status, inv, raw) = get(&h, "/inventory").await;
    assert_eq!(status, 200, "{raw}");
    outputs.push(raw);
    let source: url::Url = database_url().parse().unwrap();
    assert_eq!(
        inv,
        json!({ "applications": [{
            "name": app,
            "databases": [{
                "name": db_name,
                "instances": [{
                    "host": source.host_str().unwrap(),
                    "port": source.port().unwrap_or(5432),
                    "pipelines": [s],
                }],
                "pipelines": [{
                    "name": s,
                    "labels": { "application": app, "owner": "team-x" },
                    "publication": format!("sb_{s}"),
                }],
                "tables": [
                    { "schema": s, "name": "customers", "pipeline": s, "lists": [format!("C {s}")] },
                    { "schema": s, "name": "orders", "pipeline": s,
                      "lists": [format!("O {s}"), format!("OX {s}")] },
                ],
            }],
        }]})
    );

    // The catalog of the test's schema.
    let path = format!("/catalog/{db_name}/tables?schema={s}");
    let (status, cat, raw) = get(&h, &path).await;
    assert_eq!(status, 200, "{raw}");
    outputs.push(raw);
    assert_eq!(cat["database"], db_name);
    assert_eq!(cat["publications"], json!([format!("sb_{s}")]));
    assert_eq!(cat["instance"]["host"], source.host_str().unwrap());
    let tables = &cat["tables"];
    assert_eq!(
        names(tables, "name"),
        ["audit_notes", "customers", "orders"]
    );
    check_customers(find(tables, "name", "customers"), &s);
    check_orders(find(tables, "name", "orders"), &s);
    let notes = find(tables, "name", "audit_notes");
    assert_eq!(notes["publications"], json!([]), "outside the publication");
    assert_eq!(notes["synced_by"], json!([]));
    assert_eq!(notes["replica_identity"], "default");

    // One table: the same as in the list.
    let (status, one, raw) = get(&h, &format!("/catalog/{db_name}/tables/{s}.orders")).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(&one, find(tables, "name", "orders"));
    outputs.push(raw);

    check_problems(&h, &db_name, &s).await;

    // The CLI, without the process's help: the same documents.
    let f = file.to_str().unwrap();
    let (code, out, err) = h.cli(&["catalog", f, "--json", "--schema", &s]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "one database, one line: {out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), cat);
    outputs.push(out);
    let table_arg = format!("{s}.orders");
    let (code, out, err) = h
        .cli(&["catalog", f, "--json", "--table", &table_arg])
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), one);
    outputs.push(out);
    let (code, out, err) = h.cli(&["inventory", f, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), inv);
    outputs.push(out);
    let (code, out, err) = h.cli(&["catalog", f, "--schema", &s]).await;
    assert_eq!(code, 0, "{err}");
    for expected in [
        format!("{s}.customers  replica identity full  publications: sb_{s}"),
        format!("{s}.audit_notes  replica identity default  publications: -  synced by: -"),
        format!("customer_id → {s}.customers (id) on update no action on delete cascade"),
        format!("status       {s}.mood ({})", "sad|ok|happy"),
    ] {
        assert!(out.contains(&expected), "{expected:?} not in:\n{out}");
    }
    outputs.push(out);
    let (code, out, err) = h.cli(&["inventory", f]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("application {app}")), "{out}");
    outputs.push(out);
    let missing = format!("{s}.missing");
    let (code, _, err) = h.cli(&["catalog", f, "--table", &missing]).await;
    assert_eq!(code, 2, "{err}");

    for o in &outputs {
        assert!(!o.contains(&password), "the password leaked: {o}");
    }
    h.stop().await;
}

fn check_customers(t: &Value, s: &str) {
    assert_eq!(t["replica_identity"], "full");
    assert_eq!(t["replica_identity_index"], Value::Null);
    assert_eq!(t["publications"], json!([format!("sb_{s}")]));
    assert_eq!(
        t["synced_by"],
        json!([{ "pipeline": s, "lists": [format!("C {s}")] }])
    );
    assert_eq!(
        t["primary_key"],
        json!({ "name": "customers_pkey", "columns": ["id"], "constraint": true })
    );
    assert_eq!(
        t["unique_keys"],
        json!([
            { "name": "customers_email_key", "columns": ["email"], "constraint": true },
            { "name": "customers_code_uidx", "columns": ["code"], "constraint": false },
        ])
    );
    assert_eq!(
        names(&t["indexes"], "name"),
        [
            "customers_code_uidx",
            "customers_email_key",
            "customers_pkey"
        ]
    );
    let uidx = find(&t["indexes"], "name", "customers_code_uidx");
    assert_eq!(uidx["unique"], true);
    assert_eq!(uidx["primary"], false);
    assert_eq!(uidx["method"], "btree");
    assert_eq!(uidx["columns"], json!(["code"]));
    assert_eq!(t["foreign_keys"], json!([]));
}

fn check_orders(t: &Value, s: &str) {
    assert_eq!(t["kind"], "table");
    assert_eq!(t["replica_identity"], "default");
    assert_eq!(
        t["synced_by"],
        json!([{ "pipeline": s, "lists": [format!("O {s}"), format!("OX {s}")] }])
    );
    let col = |name: &str| find(&t["columns"], "name", name).clone();
    let plain = |name: &str, position: i64, ty: &str, nullable: bool, default: Value| {
        json!({
            "name": name, "position": position, "type": ty, "type_kind": "base",
            "element_type": null, "enum_values": null, "nullable": nullable,
            "default": default, "generated": null, "identity": null,
        })
    };
    let mut id = plain("id", 1, "bigint", false, Value::Null);
    id["identity"] = json!("always");
    assert_eq!(col("id"), id);
    assert_eq!(col("ref"), plain("ref", 3, "text", false, Value::Null));
    assert_eq!(
        col("status"),
        json!({
            "name": "status", "position": 4, "type": format!("{s}.mood"), "type_kind": "enum",
            "element_type": null, "enum_values": ["sad", "ok", "happy"], "nullable": false,
            "default": format!("'ok'::{s}.mood"), "generated": null, "identity": null,
        })
    );
    assert_eq!(
        col("tags"),
        json!({
            "name": "tags", "position": 5, "type": "text[]", "type_kind": "array",
            "element_type": "text", "enum_values": null, "nullable": true,
            "default": "'{}'::text[]", "generated": null, "identity": null,
        })
    );
    let moods = col("moods");
    assert_eq!(moods["type_kind"], "array");
    assert_eq!(moods["element_type"], format!("{s}.mood"));
    assert_eq!(moods["enum_values"], json!(["sad", "ok", "happy"]));
    assert_eq!(
        col("amount"),
        plain("amount", 7, "numeric(10,2)", true, json!("0"))
    );
    let doubled = col("doubled");
    assert_eq!(doubled["default"], Value::Null, "{doubled}");
    assert!(
        doubled["generated"].as_str().unwrap().contains("amount"),
        "{doubled}"
    );
    assert_eq!(
        t["primary_key"],
        json!({ "name": "orders_pkey", "columns": ["id"], "constraint": true })
    );
    assert_eq!(t["unique_keys"], json!([]));
    assert_eq!(
        t["foreign_keys"],
        json!([{
            "name": "orders_customer_id_fkey", "columns": ["customer_id"],
            "references_schema": s, "references_table": "customers", "references_columns": ["id"],
            "on_update": "no_action", "on_delete": "cascade",
        }])
    );
    let partial = find(&t["indexes"], "name", "orders_open_idx");
    assert_eq!(partial["unique"], false);
    assert_eq!(partial["columns"], json!(["customer_id"]));
    assert_eq!(partial["predicate"], format!("status <> 'sad'::{s}.mood"));
    assert!(
        partial["definition"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "CREATE INDEX orders_open_idx ON {s}.orders USING btree"
            )),
        "{partial}"
    );
}

/// 400 naming the bad input, 404 for what does not exist: problem bodies.
async fn check_problems(h: &Harness, db: &str, s: &str) {
    let long = "x".repeat(64);
    for (path, status, kind, param) in [
        (
            "/catalog/nope_db/tables".to_string(),
            404,
            "unknown_database",
            "database",
        ),
        (
            format!("/catalog/nope_db/tables/{s}.orders"),
            404,
            "unknown_database",
            "database",
        ),
        (
            format!("/catalog/{db}/tables/{s}.missing"),
            404,
            "unknown_table",
            "table",
        ),
        (
            format!("/catalog/{db}/tables/nodot"),
            400,
            "bad_request",
            "table",
        ),
        (
            format!("/catalog/{db}/tables/{s}.{long}"),
            400,
            "bad_request",
            "table",
        ),
        (
            format!("/catalog/{long}/tables"),
            400,
            "bad_request",
            "database",
        ),
        (
            format!("/catalog/{db}/tables?schema={long}"),
            400,
            "bad_request",
            "schema",
        ),
        (
            format!("/catalog/{db}/tables?bogus=1"),
            400,
            "bad_request",
            "bogus",
        ),
    ] {
        let (got, body, raw) = get(h, &path).await;
        assert_eq!(got, status, "{path}: {raw}");
        assert_eq!(body["kind"], kind, "{path}: {raw}");
        assert_eq!(body["invalid-params"][0]["name"], param, "{path}: {raw}");
    }
}
