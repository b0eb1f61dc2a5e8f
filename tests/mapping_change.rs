//! Changing a pipeline's mapping on the real stack and the emulator (issue 13): lists follow the
//! mapping at start (a new field's column is added, a removed field's column is left and
//! reported, one `list_columns` run), and `syncbridge validate --graph` reports every difference
//! between the live lists and the mapping.
//!
//! Needs `DATABASE_URL` (superuser). A test FAILS (never skips) when it is unset.

use serde_json::{Value, json};
use syncbridge::graph::ColumnDefinition;

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase as MetaDatabase;
use harness::{Harness, hard_timeout, try_runs};

/// The push-only sync entry of `table` into `list` with `fields` (YAML flow mapping body).
fn entry(table: &str, list: &str, fields: &str) -> String {
    format!(
        "  - table: public.{table}\n    list: {list}\n    fields: {{ {fields} }}\n    pull: {{ enabled: false }}"
    )
}

/// Column names of `list`.
async fn column_names(h: &Harness, list: &str) -> Vec<String> {
    let id = h.list_id(list).await;
    let cols = h.graph.list_columns(&h.site, &id).await.unwrap();
    cols.into_iter().map(|c| c.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_added_to_the_mapping_gets_its_column_at_start_and_a_removed_one_is_left() {
    hard_timeout(240, async {
        let meta = MetaDatabase::create("sbcols").await;
        let mut h = Harness::new("cols").await;
        let (t, list) = h.titled_table(3).await;
        h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN note text, ADD COLUMN old text;
             UPDATE public.{t} SET note = 'note ' || id, old = 'old ' || id;"
        ))
        .await;
        let first = entry(&t, &list, "title: Title, old: Obsolete");
        let file = h.pipeline_with_meta(&first, &meta.url);
        h.start(&file);
        h.wait_for("the first sync", || async {
            h.items(&list).await.len() == 3
        })
        .await;
        h.stop().await;
        assert!(!column_names(&h, &list).await.contains(&"Note".to_string()));

        // `old` removed from the mapping, `note` added.
        let second = entry(&t, &list, "title: Title, note: Note");
        let file = h.pipeline_with_meta(&second, &meta.url);
        h.start(&file);
        let q = format!("pipeline={}&kind=list_columns", h.name);
        h.wait_for("the list_columns run", || async {
            try_runs(&h, &q)
                .await
                .is_some_and(|r| r.iter().any(|r| r["status"] == "succeeded"))
        })
        .await;
        let runs = try_runs(&h, &q).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:#?}");
        let detail = &runs[0]["detail"];
        assert_eq!(
            detail["added"],
            json!([{ "list": list, "table": format!("public.{t}"), "column": "Note", "type": "text" }]),
            "{detail:#}"
        );
        assert_eq!(
            detail["unmapped"],
            json!([{ "list": list, "column": "Obsolete", "type": "text" }]),
            "{detail:#}"
        );
        // The table was read again so the items that exist get the new column's values.
        assert_eq!(runs[0]["counts"]["rows"], 3, "{:#}", runs[0]);
        h.wait_for("Note values of the existing items", || async {
            let v = values(&h, &list, "Note").await;
            (1..=3).all(|i| v.get(&i.to_string()) == Some(&json!(format!("note {i}"))))
        })
        .await;
        let cols = column_names(&h, &list).await;
        assert!(cols.contains(&"Note".to_string()), "{cols:?}");
        assert!(cols.contains(&"Obsolete".to_string()), "{cols:?}");
        assert!(
            h.run_log().contains("left in the list with its values"),
            "{}",
            h.run_log()
        );

        // Values flow into the new column; the removed field keeps its values.
        h.sql(&format!(
            "UPDATE public.{t} SET note = 'changed' WHERE id = 1;
             INSERT INTO public.{t} VALUES (4, 'row 4', 'note 4', 'old 4');"
        ))
        .await;
        h.wait_for("Note values", || async {
            let items = h.items(&list).await;
            let note = |k: &str| {
                items
                    .iter()
                    .find(|(key, _)| key == k)
                    .and_then(|(_, f)| f.get("Note").cloned())
            };
            note("1") == Some(json!("changed")) && note("4") == Some(json!("note 4"))
        })
        .await;
        let items = h.items(&list).await;
        assert_eq!(items.len(), 4, "no duplicates: {items:#?}");
        let item2 = items.iter().find(|(k, _)| k == "2").unwrap();
        assert_eq!(item2.1.get("Obsolete"), Some(&json!("old 2")));
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_graph_reports_each_difference_between_the_lists_and_the_mapping() {
    hard_timeout(120, async {
        let mut h = Harness::new("vgraph").await;
        let (t, list) = h.titled_table(1).await;
        h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN qty int, ADD COLUMN status text, ADD COLUMN due date, ADD COLUMN note text"
        ))
        .await;
        let fields = "title: Title, qty: { field: Qty, type: number }, \
             status: { field: Status, type: choice, choices: [open, done] }, \
             due: { field: Due, type: date }, note: Note";
        let file = h.pipeline(&h.embedded_log(), &entry(&t, &list, fields));

        // No list yet: reported as missing.
        let (code, out, err) = h.cli(&["validate", "--graph", file.to_str().unwrap()]).await;
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(err.contains(&format!("list {list:?}")) && err.contains("missing"), "{err}");

        // The list made by hand with a wrong type, a missing choice, a date-time column, no Note
        // and a SyncKey that is not indexed.
        let cols = [
            ColumnDefinition::text("Qty"),
            ColumnDefinition::new("Status", "choice", json!({ "choices": ["open"] })),
            ColumnDefinition::new("Due", "dateTime", json!({ "format": "dateTime" })),
            ColumnDefinition::text("SyncKey").hidden(true),
        ];
        h.graph.create_list(&h.site, &list, &cols).await.unwrap();
        let (code, out, err) = h
            .cli(&["validate", "--graph", "--json", file.to_str().unwrap()])
            .await;
        assert_eq!(code, 1, "{out}\n{err}");
        let mut got: Vec<(String, String, String)> = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| {
                assert_eq!(v["list"], list.as_str(), "{v}");
                let s = |k: &str| v[k].as_str().unwrap().to_string();
                (s("field"), s("expected"), s("found"))
            })
            .collect();
        got.sort();
        let want = [
            ("Due", "date", "date-time column"),
            ("Note", "text", "missing"),
            ("Qty", "number (number)", "text"),
            ("Status", "choices [\"open\", \"done\"]", "choices [\"open\"]"),
            (
                "SyncKey",
                "indexed, unique text column",
                "indexed: false, enforceUniqueValues: false",
            ),
        ];
        let want: Vec<(String, String, String)> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want);

        // The text report names the same, one line each, and a matching list passes.
        let (code, _, err) = h.cli(&["validate", "--graph", file.to_str().unwrap()]).await;
        assert_eq!(code, 1);
        assert!(err.contains("field Qty has type text, the mapping needs number"), "{err}");
        assert!(err.contains("5 mismatch(es)"), "{err}");
        let ok = entry(&t, &format!("{list} ok"), "title: Title");
        let ok_file = h.pipeline(&h.embedded_log(), &ok);
        let created = [syncbridge::process::provision::sync_key_column()];
        h.graph
            .create_list(&h.site, &format!("{list} ok"), &created)
            .await
            .unwrap();
        let (code, out, err) = h.cli(&["validate", "--graph", ok_file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("ok:"), "{out}");
    })
    .await;
}

/// The process's `syncbridge_config_reloads_total{outcome}`.
async fn reloads(h: &Harness, outcome: &str) -> f64 {
    h.metric(
        "syncbridge_config_reloads_total",
        &[&format!("outcome=\"{outcome}\"")],
    )
    .await
}

/// The `reload` runs of the harness's pipeline that succeeded.
async fn reload_runs(h: &Harness) -> Vec<Value> {
    let q = format!("pipeline={}&kind=reload&status=succeeded", h.name);
    try_runs(h, &q).await.unwrap_or_default()
}

/// SyncKey → the item's `field`, for every item of `list`; panics on a duplicated SyncKey.
async fn values(h: &Harness, list: &str, field: &str) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    for (k, f) in h.items(list).await {
        let v = f.get(field).cloned().unwrap_or(Value::Null);
        assert!(out.insert(k.clone(), v).is_none(), "item {k} duplicated");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_field_and_changes_nothing_for_a_broken_file_or_a_key_change() {
    hard_timeout(240, async {
        let meta = MetaDatabase::create("sbreload").await;
        let mut h = Harness::new("reload").await;
        let (t, list) = h.titled_table(3).await;
        h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN note text; UPDATE public.{t} SET note = 'note ' || id;"
        ))
        .await;
        let file = h.pipeline_with_meta(&entry(&t, &list, "title: Title"), &meta.url);
        h.start(&file);
        h.wait_for("the first sync", || async { h.items(&list).await.len() == 3 })
            .await;
        assert_eq!(reloads(&h, "applied").await, 0.0);

        // A field added: the pipeline restarts in the process, the column is added and values
        // flow into it; no item is created twice.
        h.pipeline_with_meta(&entry(&t, &list, "title: Title, note: Note"), &meta.url);
        h.sighup();
        h.wait_for("the reload run", || async { !reload_runs(&h).await.is_empty() })
            .await;
        let run = &reload_runs(&h).await[0];
        assert_eq!(run["by"], "SIGHUP", "{run:#}");
        assert_eq!(
            run["detail"]["changed"],
            json!([format!("table public.{t}: fields added [\"Note\"]")]),
            "{run:#}"
        );
        assert_eq!(reloads(&h, "applied").await, 1.0);
        assert!(column_names(&h, &list).await.contains(&"Note".to_string()));
        h.sql(&format!(
            "UPDATE public.{t} SET note = 'changed' WHERE id = 2; INSERT INTO public.{t} VALUES (4, 'row 4', 'note 4');"
        ))
        .await;
        h.wait_for("Note values after the reload", || async {
            let v = values(&h, &list, "Note").await;
            v.get("2") == Some(&json!("changed"))
                && v.get("4") == Some(&json!("note 4"))
                && v.get("1") == Some(&json!("note 1"))
                && v.get("3") == Some(&json!("note 3"))
        })
        .await;
        assert_eq!(values(&h, &list, "Note").await.len(), 4);

        // A broken file: nothing changes, the pipeline keeps running, the counter says so.
        std::fs::write(&file, "version: 1\nname: [unclosed\n").unwrap();
        h.sighup();
        h.wait_for("the invalid reload counted", || async {
            reloads(&h, "invalid").await == 1.0
        })
        .await;
        h.sql(&format!("INSERT INTO public.{t} VALUES (5, 'row 5', 'note 5')"))
            .await;
        h.wait_for("row 5 after the broken file", || async {
            values(&h, &list, "Note").await.get("5") == Some(&json!("note 5"))
        })
        .await;

        // A key change is refused with the reason; the pipeline runs on with its config.
        let keyed = entry(&t, &list, "title: Title, note: Note")
            .replace("    fields:", "    key: [title]\n    fields:");
        h.pipeline_with_meta(&keyed, &meta.url);
        h.sighup();
        h.wait_for("the refused reload counted", || async {
            reloads(&h, "refused").await == 1.0
        })
        .await;
        assert!(h.run_log().contains("key changed from the primary key to [\"title\"]"), "{}", h.run_log());
        h.sql(&format!("UPDATE public.{t} SET note = 'after refusal' WHERE id = 1"))
            .await;
        h.wait_for("row 1 after the refusal", || async {
            values(&h, &list, "Note").await.get("1") == Some(&json!("after refusal"))
        })
        .await;
        assert_eq!(reloads(&h, "applied").await, 1.0);
        assert_eq!(reload_runs(&h).await.len(), 1);

        // A config that passes validation but does not start (the list's Note column is text,
        // the mapping now says number): the old config runs again, the run says why.
        let typed = entry(&t, &list, "title: Title, note: { field: Note, type: number }");
        h.pipeline_with_meta(&typed, &meta.url);
        h.sighup();
        let q = format!("pipeline={}&kind=reload&status=failed", h.name);
        h.wait_for("the failed reload run", || async {
            try_runs(&h, &q).await.is_some_and(|r| !r.is_empty())
        })
        .await;
        let failed = &try_runs(&h, &q).await.unwrap()[0];
        let reason = failed["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("field Note has type text, the mapping needs number"), "{failed:#}");
        assert_eq!(reloads(&h, "failed").await, 1.0);
        h.sql(&format!("UPDATE public.{t} SET note = 'after failure' WHERE id = 3"))
            .await;
        h.wait_for("row 3 after the failed reload", || async {
            values(&h, &list, "Note").await.get("3") == Some(&json!("after failure"))
        })
        .await;
        assert_eq!(values(&h, &list, "Note").await.len(), 5);
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_watch_reloads_when_a_file_changes_and_snapshots_a_new_table() {
    hard_timeout(240, async {
        let meta = MetaDatabase::create("sbwatch").await;
        let mut h = Harness::new("watch").await;
        let (t, list) = h.titled_table(2).await;
        let t2 = h.t("second");
        h.sql(&format!(
            "CREATE TABLE public.{t2} (id bigint PRIMARY KEY, title text NOT NULL);
             INSERT INTO public.{t2} VALUES (1, 'second 1'), (2, 'second 2');"
        ))
        .await;
        h.tables.push(format!("public.{t2}"));
        let list2 = format!("{list} second");
        let file = h.pipeline_with_meta(&entry(&t, &list, "title: Title"), &meta.url);
        let stderr = std::fs::File::create(h.dir.path().join("run.log")).unwrap();
        let child = std::process::Command::new(harness::BIN)
            .args(["run", "--watch"])
            .arg(&file)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        h.child = Some(child);
        h.wait_for("the first sync", || async { h.items(&list).await.len() == 2 })
            .await;

        // A second table: added to the publication, snapshotted, then streamed.
        let both = format!("{}\n{}", entry(&t, &list, "title: Title"), entry(&t2, &list2, "title: Title"));
        // The budget changes with it.
        let budget = "syncbridge_graph_ru_budget_per_minute";
        assert_eq!(h.metric(budget, &[]).await, 100000.0);
        // One write, so the watcher cannot see half of the change.
        let yaml = std::fs::read_to_string(&file)
            .unwrap()
            .replace(&entry(&t, &list, "title: Title"), &both)
            .replace("ru_per_minute: 100000", "ru_per_minute: 60000");
        std::fs::write(&file, yaml).unwrap();
        h.wait_for("the new table's rows", || async { h.items(&list2).await.len() == 2 })
            .await;
        let run = &reload_runs(&h).await[0];
        assert_eq!(run["by"], "watch", "{run:#}");
        assert_eq!(h.metric(budget, &[]).await, 60000.0);
        assert_eq!(run["detail"]["new_tables"], json!([format!("public.{t2}")]), "{run:#}");
        h.sql(&format!(
            "INSERT INTO public.{t2} VALUES (3, 'second 3'); INSERT INTO public.{t} VALUES (3, 'row 3');"
        ))
        .await;
        h.wait_for("streamed rows of both tables", || async {
            h.items(&list2).await.len() == 3 && h.items(&list).await.len() == 3
        })
        .await;
        assert_eq!(values(&h, &list, "Title").await.len(), 3);
        assert_eq!(values(&h, &list2, "Title").await.len(), 3);
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_sighup_restarts_the_pipeline_on_its_consumer_group_without_duplicates() {
    hard_timeout(240, async {
        let mut h = Harness::new("reloadk").await;
        let file = h.kafka_titled_pipeline(3, "").await;
        let (t, list) = (h.t("t"), format!("T {}", h.name));
        h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN note text; UPDATE public.{t} SET note = 'note ' || id;"
        ))
        .await;
        h.start(&file);
        h.wait_for("the first sync", || async { h.items(&list).await.len() == 3 })
            .await;
        let yaml = std::fs::read_to_string(&file).unwrap();
        let added = yaml.replace("fields: { title: Title }", "fields: { title: Title, note: Note }");
        assert_ne!(yaml, added);
        std::fs::write(&file, added).unwrap();
        h.sighup();
        h.wait_for("the applied reload", || async {
            reloads(&h, "applied").await == 1.0
        })
        .await;
        h.sql(&format!(
            "UPDATE public.{t} SET note = 'changed' WHERE id = 1; INSERT INTO public.{t} VALUES (4, 'row 4', 'note 4');"
        ))
        .await;
        h.wait_for("Note values after the reload", || async {
            let v = values(&h, &list, "Note").await;
            v.get("1") == Some(&json!("changed"))
                && v.get("2") == Some(&json!("note 2"))
                && v.get("4") == Some(&json!("note 4"))
        })
        .await;
        assert_eq!(values(&h, &list, "Title").await.len(), 4);
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_list_edits_still_come_back_and_the_new_field_pulls() {
    hard_timeout(240, async {
        let meta = MetaDatabase::create("sbreloadp").await;
        let mut h = Harness::new("reloadp").await;
        let (t, list) = h.titled_table(2).await;
        h.sql(&format!("ALTER TABLE public.{t} ADD COLUMN note text"))
            .await;
        let pulled = |fields: &str| {
            entry(&t, &list, fields).replace(
                "pull: { enabled: false }",
                "pull: { enabled: true, interval_ms: 200 }",
            )
        };
        let file = h.pipeline_with_meta(&pulled("title: Title"), &meta.url);
        h.start(&file);
        h.wait_for("the first sync", || async {
            h.items(&list).await.len() == 2
        })
        .await;
        h.pipeline_with_meta(&pulled("title: Title, note: Note"), &meta.url);
        h.sighup();
        h.wait_for("the reload run", || async {
            !reload_runs(&h).await.is_empty()
        })
        .await;
        // A person edits both fields in the list: the row follows, through the new field too.
        h.person_edit(
            &list,
            "1",
            json!({ "Title": "edited", "Note": "from the list" }),
        )
        .await;
        let q = format!("SELECT title, note FROM public.{t} WHERE id = 1");
        h.wait_for("the edit in the row", || async {
            let r = h.db.query_one(&q, &[]).await.unwrap();
            r.get::<_, String>(0) == "edited"
                && r.get::<_, Option<String>>(1).as_deref() == Some("from the list")
        })
        .await;
        assert_eq!(values(&h, &list, "Title").await.len(), 2);
        h.stop().await;
    })
    .await;
}
