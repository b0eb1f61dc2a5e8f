//! Drift detection and heal (issue 14) on the real stack and the emulator.
//!
//! The vanished-list case: a pipeline synced its table, stopped, and the Graph emulator restarted
//! empty (it runs in memory). At the next start provisioning re-creates the list under a new id;
//! the ledger still names the old one. The pipeline must notice before its first write, drop
//! the stale entries, re-create every item, and record one `drift_heal` run.
//!
//! A seeded corruption of every class (an item deleted, an orphan added, a value edited behind
//! the sync with pull off, an item moved to the other list of the routes, a SyncKey duplicated
//! there, a ledger entry deleted) is reported exactly, per class, while a concurrent write
//! workload runs; the heal makes the table equal the lists and a second check reports 0.
//!
//! Needs `DATABASE_URL` (superuser). A test FAILS (never skips) when it is unset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use syncbridge::emulator::{self, EmulatorArgs};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase as MetaDatabase;
use harness::{Harness, hard_timeout, try_runs};

/// Stops the harness's emulator and starts an empty one on the same address.
async fn restart_emulator_empty(h: &mut Harness) {
    let addr = h.emu.addr;
    let placeholder = emulator::spawn(EmulatorArgs::default()).await.unwrap();
    std::mem::replace(&mut h.emu, placeholder)
        .stop()
        .await
        .unwrap();
    // The old listener's port may take a moment to be free again.
    let mut tries = 0;
    let fresh = loop {
        let args = EmulatorArgs {
            listen: addr,
            ..EmulatorArgs::default()
        };
        match emulator::spawn(args).await {
            Ok(e) => break e,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("emulator restart on {addr}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("emulator restart on {addr}: {e}"),
        }
    };
    std::mem::replace(&mut h.emu, fresh).stop().await.unwrap();
    h.site = h
        .graph
        .resolve_site(emulator::DEFAULT_SITE)
        .await
        .unwrap()
        .id;
}

/// Writes the pipeline file (embedded log, `sync`) with `control.meta_url` set.
fn pipeline_with_meta(h: &Harness, sync: &str, meta: &MetaDatabase) -> std::path::PathBuf {
    h.pipeline_with_meta(sync, &meta.url)
}

/// The list's `(SyncKey, Title)` pairs, sorted.
async fn list_titles(h: &Harness, list: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = h
        .items(list)
        .await
        .into_iter()
        .map(|(k, f)| (k, f["Title"].as_str().unwrap_or("").to_string()))
        .collect();
    out.sort();
    out
}

/// The table's `(id, title)` pairs as SyncKey/Title, sorted like [`list_titles`].
async fn table_titles(h: &Harness, t: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        h.db.query(&format!("SELECT id::text, title FROM public.{t}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_list_is_recreated_with_its_items_at_start_in_one_drift_run() {
    vanished_list(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_vanished_list_is_recreated_with_its_items_at_start() {
    vanished_list(true).await;
}

async fn vanished_list(kafka: bool) {
    hard_timeout(300, async {
        let meta_db = MetaDatabase::create("sbdrift").await;
        let mut h = Harness::new(if kafka { "driftk" } else { "drift" }).await;
        let (t, list) = h.titled_table(20).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = pipeline_with_meta(&h, &sync, &meta_db);
        if kafka {
            let log = format!(
                "{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbd{}' }} }}",
                common::kafka_brokers(),
                &h.name[h.name.len() - 8..]
            );
            let yaml = std::fs::read_to_string(&file).unwrap();
            assert!(yaml.contains(&h.embedded_log()));
            std::fs::write(&file, yaml.replace(&h.embedded_log(), &log)).unwrap();
        }
        let all = format!("pipeline={}", h.name);
        let heals = format!("{all}&kind=drift_heal");

        h.start(&file);
        h.wait_for("20 items", || async { h.items(&list).await.len() == 20 })
            .await;
        let first_list = h.list_id(&list).await;
        h.stop().await;

        // The emulator restarts empty: the list and its 20 items are gone.
        restart_emulator_empty(&mut h).await;
        assert!(h.items(&list).await.is_empty(), "the new emulator is empty");
        // A change made while the pipeline was down reaches the re-created list too.
        h.sql(&format!("UPDATE public.{t} SET title = 'changed' WHERE id = 7"))
            .await;

        h.start(&file);
        let want = table_titles(&h, &t).await;
        h.wait_for("table == list again", || async {
            list_titles(&h, &list).await == want
        })
        .await;
        assert_ne!(h.list_id(&list).await, first_list, "the list was re-created");
        h.wait_for("one succeeded drift_heal run", || async {
            try_runs(&h, &heals).await.is_some_and(|runs| {
                runs.len() == 1
                    && runs[0]["status"] == "succeeded"
                    && runs[0]["counts"]["stale_ledger"] == 20
                    && runs[0]["counts"]["rows"] == 20
            })
        })
        .await;
        assert!(
            h.run_log().contains("ledger named lists that no longer exist"),
            "the heal is logged:\n{}",
            h.run_log()
        );
        // The healed ledger is live: a later change is written to the new item.
        h.sql(&format!("UPDATE public.{t} SET title = 'later' WHERE id = 3"))
            .await;
        h.wait_for("the later change", || async {
            h.item(&list, "3")
                .await
                .is_some_and(|f| f["Title"] == "later")
        })
        .await;
        h.stop().await;

        // A start with nothing vanished heals nothing: still one drift run.
        h.start(&file);
        h.wait_for("the third stream run", || async {
            try_runs(&h, &format!("{all}&kind=stream"))
                .await
                .is_some_and(|runs| runs.len() == 3)
        })
        .await;
        assert_eq!(try_runs(&h, &heals).await.unwrap().len(), 1);
        assert_eq!(list_titles(&h, &list).await, table_titles(&h, &t).await);
        h.stop().await;
    })
    .await;
}

/// Deletes the ledger entry of `key` (the process must be stopped: the log is locked).
async fn delete_ledger_entry(h: &Harness, file: &std::path::Path, table: &str, key: &str) {
    use syncbridge::process::ledger::{self, Ledger};
    let p = syncbridge::config::load_files(&[file.to_path_buf()])
        .unwrap()
        .remove(0);
    let log = Arc::new(syncbridge::runtime::open_log(&p).unwrap());
    let topic = syncbridge::process::ledger_topic(syncbridge::runtime::topic_prefix(&p), &p.name);
    let l = Ledger::open(&h.dir.path().join("log-state").join("ledger"), log, &topic)
        .await
        .unwrap();
    assert!(l.get(&ledger::key(table, key)).unwrap().is_some());
    l.commit(vec![(ledger::key(table, key), None)])
        .await
        .unwrap();
}

/// Creates an item as a person would.
async fn person_create(h: &Harness, list: &str, fields: Value) {
    let id = h.list_id(list).await;
    h.person
        .create_item(&h.site, &id, fields.as_object().unwrap())
        .await
        .unwrap();
}

async fn person_delete(h: &Harness, list: &str, key: &str) {
    let (id, item) = (h.list_id(list).await, h.item_id(list, key).await);
    h.person
        .delete_item(&h.site, &id, &item, None)
        .await
        .unwrap();
}

/// `GET /pipelines/{name}/{path}`: status and body.
async fn get_drift(h: &Harness, path: &str) -> (u16, Value) {
    let url = format!(
        "http://127.0.0.1:{}/pipelines/{}/{path}",
        h.control_port, h.name
    );
    let r = h.admin.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The report of `report`'s run as the meta-store keeps it, read in pages of 4, equals it; the
/// `clean` report made before the restart is still there; a bad page size is a 400.
async fn stored_report_pages(h: &Harness, report: &Value, clean: &Value) {
    let run = report["run_id"].as_str().unwrap();
    let path = format!("drift/{run}?limit=4");
    h.wait_for("the report in the meta-store", || async {
        get_drift(h, &path).await.0 == 200
    })
    .await;
    let (_, first) = get_drift(h, &path).await;
    assert_eq!(
        first["differences"].as_array().unwrap().len(),
        4,
        "{first:#}"
    );
    assert_eq!(first["next"], 4, "{first:#}");
    assert_eq!(first["counts"], report["counts"]);
    let (_, second) = get_drift(h, &format!("drift/{run}?limit=4&after=4")).await;
    assert_eq!(
        second["differences"].as_array().unwrap().len(),
        2,
        "{second:#}"
    );
    assert!(second.get("next").is_none(), "the last page: {second:#}");
    let mut all = first.clone();
    all["differences"] = Value::Array(
        [
            first["differences"].as_array().unwrap().clone(),
            second["differences"].as_array().unwrap().clone(),
        ]
        .concat(),
    );
    all.as_object_mut().unwrap().remove("next");
    assert_eq!(&all, report, "stored == answered");
    let (status, before) =
        get_drift(h, &format!("drift/{}", clean["run_id"].as_str().unwrap())).await;
    assert_eq!(
        (status, &before),
        (200, clean),
        "a report from before the restart"
    );
    let (status, bad) = get_drift(h, &format!("drift/{run}?limit=0")).await;
    assert_eq!(status, 400, "{bad:#}");
    assert_eq!(bad["invalid-params"][0]["name"], "limit", "{bad:#}");
    let (status, _) = get_drift(h, &format!("drift/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(status, 404);
}

fn classes(report: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["class"].as_str().unwrap().into(),
                d["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_of_seeded_corruption_is_reported_exactly_and_healed() {
    hard_timeout(300, async {
        let meta_db = MetaDatabase::create("sbdrift").await;
        let mut h = Harness::new("driftc").await;
        let (t, a) = h.titled_table(12).await;
        let b = format!("B {}", h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {a}\n    fields: {{ title: Title }}\n    routes:\n      - when: \"title == 'to b'\"\n        list: {b}\n    pull: {{ enabled: false }}"
        );
        let file = pipeline_with_meta(&h, &sync, &meta_db);
        h.start(&file);
        h.wait_for("12 items", || async { h.items(&a).await.len() == 12 })
            .await;
        // A clean pipeline has no drift.
        let clean = h.post_drift("drift").await;
        assert_eq!(classes(&clean), [] as [(String, String); 0]);
        h.stop().await;
        delete_ledger_entry(&h, &file, &format!("public.{t}"), "5").await;
        h.start(&file);

        // The corruption, one of each class.
        person_delete(&h, &a, "1").await; // missing
        h.person_edit(&a, "2", json!({ "Title": "edited" })).await; // divergent
        person_create(&h, &b, json!({ "SyncKey": "3", "Title": "row 3" })).await;
        person_delete(&h, &a, "3").await; // misrouted
        person_create(&h, &b, json!({ "SyncKey": "4", "Title": "row 4" })).await; // duplicate
        person_create(&h, &a, json!({ "SyncKey": "999", "Title": "orphan" })).await; // orphaned

        // A concurrent workload on rows 7–12 while checking and healing.
        let stop = Arc::new(AtomicBool::new(false));
        let workload = {
            let (stop, t) = (stop.clone(), t.clone());
            let (db, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let q = format!("UPDATE public.{t} SET title = 'w {n}' WHERE id = {}", 7 + n % 6);
                    db.batch_execute(&q).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                n
            })
        };

        let report = h.post_drift("drift").await;
        let want: Vec<(String, String)> = [
            ("divergent", "2"),
            ("duplicate", "4"),
            ("misrouted", "3"),
            ("missing", "1"),
            ("orphaned", "999"),
            ("stale_ledger", "5"),
        ]
        .iter()
        .map(|(c, k)| (c.to_string(), k.to_string()))
        .collect();
        assert_eq!(classes(&report), want, "report: {report:#}");
        for c in ["missing", "orphaned", "divergent", "misrouted", "duplicate", "stale_ledger"] {
            assert_eq!(report["counts"][c], 1, "{c}: {report:#}");
        }
        let divergent = report["differences"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["class"] == "divergent")
            .unwrap();
        assert_eq!(divergent["fields"], json!(["Title"]));
        assert!(report["resource_units"].as_u64().unwrap() > 0);
        stored_report_pages(&h, &report, &clean).await;

        let healed = h.post_drift("drift/heal").await;
        assert_eq!(healed["healed"]["deleted"], 3, "orphan, duplicate, misrouted: {healed:#}");
        stop.store(true, Ordering::Relaxed);
        let writes = workload.await.unwrap();
        assert!(writes > 10, "the workload ran ({writes} updates)");

        let want = table_titles(&h, &t).await;
        h.wait_for("table == list A, list B empty", || async {
            list_titles(&h, &a).await == want && h.items(&b).await.is_empty()
        })
        .await;
        let again = h.post_drift("drift").await;
        assert_eq!(again["counts"]["missing"], 0, "{again:#}");
        assert_eq!(classes(&again), [] as [(String, String); 0], "{again:#}");

        let all = format!("pipeline={}", h.name);
        let checks = try_runs(&h, &format!("{all}&kind=drift_check")).await;
        h.wait_for("3 drift_check runs and one drift_heal run", || async {
            let c = try_runs(&h, &format!("{all}&kind=drift_check")).await;
            let heal = try_runs(&h, &format!("{all}&kind=drift_heal")).await;
            c.is_some_and(|c| c.len() == 3)
                && heal.is_some_and(|r| {
                    r.len() == 1 && r[0]["status"] == "succeeded" && r[0]["counts"]["orphaned"] == 1
                })
        })
        .await;
        drop(checks);
        h.wait_for("the latest stored report is the last check", || async {
            get_drift(&h, "drift").await.1["run_id"] == again["run_id"]
        })
        .await;

        // The CLI asks the running process: clean now, so exit 0; `--json` prints the report.
        let f = file.to_str().unwrap();
        let (code, out, err) = h.cli(&["drift", f]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(": 0 difference(s)"), "{out}");
        let (code, out, _) = h.cli(&["drift", f, "--json"]).await;
        assert_eq!(code, 0);
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["counts"]["orphaned"], 0);
        assert_eq!(report["lists"].as_array().unwrap().len(), 2);
        h.stop().await;
        // With no process listening, the CLI says so (exit 3).
        let (code, _, err) = h.cli(&["drift", f]).await;
        assert_eq!(code, 3, "{err}");
    })
    .await;
}

/// A list that still exists but is no longer a target (its route was removed from the file) is
/// not a vanished list: its ledger entries are left to the writer path, no heal runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_dropped_from_the_routes_is_not_taken_for_a_vanished_one() {
    hard_timeout(300, async {
        let meta_db = MetaDatabase::create("sbdrift").await;
        let mut h = Harness::new("driftr").await;
        let (t, a) = h.titled_table(4).await;
        let b = format!("B {}", h.name);
        let route = format!("    routes:\n      - when: \"title == 'row 2'\"\n        list: {b}\n");
        let sync = format!(
            "  - table: public.{t}\n    list: {a}\n    fields: {{ title: Title }}\n{route}    pull: {{ enabled: false }}"
        );
        let file = pipeline_with_meta(&h, &sync, &meta_db);
        h.start(&file);
        h.wait_for("3 items in A, 1 in B", || async {
            h.items(&a).await.len() == 3 && h.items(&b).await.len() == 1
        })
        .await;
        h.stop().await;
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, yaml.replace(&route, "")).unwrap();
        h.start(&file);
        let all = format!("pipeline={}", h.name);
        h.wait_for("the second stream run", || async {
            try_runs(&h, &format!("{all}&kind=stream"))
                .await
                .is_some_and(|runs| runs.len() == 2)
        })
        .await;
        assert_eq!(
            try_runs(&h, &format!("{all}&kind=drift_heal")).await.unwrap().len(),
            0,
            "{}",
            h.run_log()
        );
        assert!(!h.run_log().contains("ledger named lists that no longer exist"));
        assert_eq!(h.items(&b).await.len(), 1, "B's item is left alone");
        h.stop().await;
    })
    .await;
}

/// Column `col` of row 1 of `public.{t}` (text; NULL as "").
async fn cell(h: &Harness, t: &str, col: &str) -> String {
    h.db.query_one(&format!("SELECT {col} FROM public.{t} WHERE id = 1"), &[])
        .await
        .unwrap()
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// Heal of divergent fields follows each field's direction and conflict policy (pull on):
/// `Title` (bidirectional, `source_wins`) and `PushA` (`push_only`) are rewritten from the row;
/// `PullB` (`pull_only`) and `TgtC` (`target_wins`) go to the row through the return path's
/// applier (and are not pushed back); `ManD` (`manual`) is left alone and still reported.
/// The poller is slowed to an hour after its first poll, so the person's edit stays divergent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_fields_heal_the_way_their_direction_and_policy_say() {
    hard_timeout(300, async {
        let meta_db = MetaDatabase::create("sbdrift").await;
        let mut h = Harness::new("driftp").await;
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, a text, b text, c text, d text);
             INSERT INTO public.{t} SELECT g, 'row ' || g, 'a' || g, 'b' || g, 'c' || g, 'd' || g FROM generate_series(1, 2) g;"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let list = format!("T {}", h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      a: {{ field: PushA, direction: push_only }}\n      b: {{ field: PullB, direction: pull_only }}\n      c: {{ field: TgtC, conflict: target_wins }}\n      d: {{ field: ManD, conflict: manual }}\n    pull: {{ enabled: true, interval_ms: 1000 }}"
        );
        let file = pipeline_with_meta(&h, &sync, &meta_db);
        h.start(&file);
        h.wait_for("2 items", || async { h.items(&list).await.len() == 2 })
            .await;
        // A first pull of the pull-only field, so the ledger knows its value.
        h.person_edit(&list, "1", json!({ "PullB": "pulled" })).await;
        h.wait_for("the pull of PullB", || async { cell(&h, &t, "b").await == "pulled" })
            .await;
        h.stop().await;
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, yaml.replace("interval_ms: 1000", "interval_ms: 3600000")).unwrap();
        h.start(&file);
        let polls = format!("pipeline=\"{}\"", h.name);
        h.wait_for("the first delta poll", || async {
            h.metric("syncbridge_pull_delta_polls_total", &[&polls]).await >= 1.0
        })
        .await;
        let edit = json!({ "Title": "e title", "PushA": "e a", "PullB": "e b", "TgtC": "e c", "ManD": "e d" });
        h.person_edit(&list, "1", edit).await;

        let report = h.post_drift("drift").await;
        assert_eq!(classes(&report), [("divergent".to_string(), "1".to_string())], "{report:#}");
        let mut fields: Vec<String> =
            serde_json::from_value(report["differences"][0]["fields"].clone()).unwrap();
        fields.sort();
        assert_eq!(fields, ["ManD", "PullB", "PushA", "TgtC", "Title"], "{report:#}");

        let healed = h.post_drift("drift/heal").await;
        assert_eq!(healed["healed"]["pulled"], 1, "{healed:#}");
        assert_eq!(healed["healed"]["manual"], 1, "{healed:#}");
        // Pulled at once (the heal answers when the row is written).
        assert_eq!((cell(&h, &t, "b").await, cell(&h, &t, "c").await), ("e b".into(), "e c".into()));
        assert_eq!((cell(&h, &t, "title").await, cell(&h, &t, "a").await, cell(&h, &t, "d").await), ("row 1".into(), "a1".into(), "d1".into()));
        h.wait_for("Title and PushA rewritten from the row", || async {
            h.item(&list, "1").await.is_some_and(|i| i["Title"] == "row 1" && i["PushA"] == "a1")
        })
        .await;
        let item = h.item(&list, "1").await.unwrap();
        assert_eq!((&item["PullB"], &item["TgtC"], &item["ManD"]), (&json!("e b"), &json!("e c"), &json!("e d")), "{item:#?}");

        let again = h.post_drift("drift").await;
        assert_eq!(classes(&again), [("divergent".to_string(), "1".to_string())], "{again:#}");
        assert_eq!(again["differences"][0]["fields"], json!(["ManD"]), "only the manual field: {again:#}");
        // The pulled values were not pushed back as a change of the row.
        assert_eq!((cell(&h, &t, "b").await, cell(&h, &t, "c").await), ("e b".into(), "e c".into()));
        h.stop().await;
    })
    .await;
}

/// With several processes of a pipeline a check in one makes the others answer busy: the drift
/// lock on the source database (`drift:<pipeline>`, what another process's check holds) taken
/// here makes this process's check a 409 `drift_in_progress`; released, the check runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_held_by_another_process_answers_busy() {
    hard_timeout(300, async {
        let mut h = Harness::new("driftlock").await;
        let (t, list) = h.titled_table(2).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        h.start(&file);
        h.wait_for("2 items", || async { h.items(&list).await.len() == 2 })
            .await;
        let key = syncbridge::pg::lock_key(&syncbridge::process::drift::drift_lock_name(&h.name));
        let held: bool = h
            .db
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        assert!(held, "no check runs yet");
        let (status, body) = get_drift_post(&h).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["type"].as_str().map(|t| t.ends_with("drift_in_progress")), Some(true), "{body}");
        h.db.execute("SELECT pg_advisory_unlock($1)", &[&key]).await.unwrap();
        let report = h.post_drift("drift").await;
        assert_eq!(report["counts"]["missing"], 0, "{report}");
        h.stop().await;
    })
    .await;
}

/// `POST /pipelines/{name}/drift` once: (status, body).
async fn get_drift_post(h: &Harness) -> (u16, Value) {
    let url = format!(
        "http://127.0.0.1:{}/pipelines/{}/drift",
        h.control_port, h.name
    );
    let r = h.admin.post(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}
