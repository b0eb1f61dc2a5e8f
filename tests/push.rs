//! End-to-end push path: PostgreSQL → `syncbridge run` (capture → log → processor) → an
//! in-process Graph emulator, checked only through Graph reads and the emulator's counters.
//!
//! Needs `DATABASE_URL` (and `KAFKA_BROKERS` for the Kafka test): `eval "$(ops/stack env)"`.
//! A test FAILS (never skips) when a variable it needs is unset. Each test has its own emulator,
//! pipeline name, tables, slot and temp dir, a hard timeout, and a guard that stops the child
//! process and drops the replication objects and tables.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use syncbridge::graph::ColumnDefinition;

mod common;
use common::kafka_brokers;
#[path = "common/harness.rs"]
mod harness;
use harness::{BIN, Harness, hard_timeout, writes};

fn sync_entries(h: &Harness) -> String {
    format!(
        "  - table: public.{p}\n    list: P {n}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}\n  - table: public.{m}\n    list: Main {n}\n    fields:\n      title: Title\n      notes: {{ field: Notes, type: note }}\n      qty: {{ field: Qty, type: number }}\n      price: {{ field: Price, type: currency }}\n      due: {{ field: Due, type: date }}\n      at: {{ field: At, type: datetime }}\n      done: {{ field: Done, type: boolean }}\n      status: {{ field: Status, type: choice, choices: [open, done, archived] }}\n      tags: {{ field: Tags, type: multichoice, choices: [a, b, c] }}\n      owner: {{ field: Owner, type: person }}\n      ref: {{ field: Ref, type: lookup, list: P {n} }}\n      link: {{ field: Link, type: hyperlink }}\n      score: {{ field: Score, type: number }}\n      info: {{ field: Info, type: text }}\n    routes:\n      - when: \"status == 'archived'\"\n        list: Archive {n}\n    pull: {{ enabled: false }}",
        p = h.t("p"),
        m = h.t("m"),
        n = h.name,
    )
}

async fn create_tables(h: &mut Harness) {
    let (p, m) = (h.t("p"), h.t("m"));
    h.sql(&format!(
        "CREATE TABLE public.{p} (id bigint PRIMARY KEY, title text NOT NULL);
         CREATE TABLE public.{m} (
            id bigint PRIMARY KEY, title text NOT NULL, notes text, qty int, price numeric(10,2),
            due date, at timestamptz, done boolean, status text, tags text[], owner text,
            ref bigint, link text, score text, info jsonb, unmapped text);"
    ))
    .await;
    h.tables.push(format!("public.{p}"));
    h.tables.push(format!("public.{m}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_path_end_to_end_on_the_embedded_log() {
    hard_timeout(240, async {
        let mut h = Harness::new("pushe2e").await;
        create_tables(&mut h).await;
        h.emulator_limits(json!({ "hyperlink_writes": true })).await;
        let (p, m, n) = (h.t("p"), h.t("m"), h.name.clone());
        let (main, archive, parent) = (format!("Main {n}"), format!("Archive {n}"), format!("P {n}"));
        h.sql(&format!(
            "INSERT INTO public.{p} VALUES (1, 'Parent one'), (2, 'Parent two');
             INSERT INTO public.{m} (id, title, notes, qty, price, due, at, done, status, tags, owner, ref, link, score, info)
             VALUES (1, 'First', E'line1\\nline2', 5, 12.50, '2026-12-01', '2026-11-25 10:11:12.5+00', true, 'open',
                     '{{a,b}}', 'adelev@contoso.onmicrosoft.com', 1, 'https://example.com/x', '7.5', '{{\"k\": 1}}'),
                    (2, 'Second', NULL, NULL, NULL, NULL, NULL, NULL, 'archived', NULL, NULL, NULL, NULL, NULL, NULL);"
        ))
        .await;
        let file = h.pipeline(&h.embedded_log(), &sync_entries(&h));
        h.start(&file);

        // Snapshot → provisioned lists with every field type, routed.
        h.wait_for("the snapshot rows", || async {
            h.items(&main).await.len() == 1 && h.items(&archive).await.len() == 1 && h.items(&parent).await.len() == 2
        })
        .await;
        // Counters exist at 0 before their first event (so increase() sees it); gauges for the
        // budget, the processor's lag and its last commit are there.
        let scrape = reqwest::get(format!("http://127.0.0.1:{}/metrics", h.control_port)).await.unwrap().text().await.unwrap();
        for line in [
            format!("syncbridge_push_dead_letters_total{{pipeline=\"{n}\",kind=\"too_long\"}} 0"),
            format!("syncbridge_pipeline_pauses_total{{pipeline=\"{n}\",kind=\"dead_letter_storm\"}} 0"),
            format!("syncbridge_push_moves_total{{pipeline=\"{n}\"}} 0"),
            format!("syncbridge_consumer_lag_events{{pipeline=\"{n}\",group=\"sync\"}}"),
            format!("syncbridge_push_last_commit_timestamp_seconds{{pipeline=\"{n}\"}}"),
            "syncbridge_graph_ru_budget_per_minute{tenant=".to_string(),
        ] {
            assert!(scrape.lines().any(|l| l.starts_with(&line)), "no `{line}` in /metrics:\n{scrape}");
        }
        let one = h.item(&main, "1").await.unwrap();
        let parent_one = h.item(&parent, "1").await.unwrap();
        assert_eq!(one["Title"], "First");
        assert_eq!(one["Notes"], "line1\nline2");
        assert_eq!(one["Qty"].as_f64(), Some(5.0));
        assert_eq!(one["Price"].as_f64(), Some(12.5));
        assert!(one["Due"].as_str().unwrap().starts_with("2026-12-01"), "{}", one["Due"]);
        assert_eq!(one["At"], "2026-11-25T10:11:12Z");
        assert_eq!(one["Done"], true);
        assert_eq!(one["Status"], "open");
        assert_eq!(one["Tags"], json!(["a", "b"]));
        assert_eq!(one["OwnerLookupId"], "7", "person resolved through the user list");
        assert_eq!(one["RefLookupId"], parent_one["id"], "lookup resolved through the ledger");
        assert_eq!(one["Link"]["Url"], "https://example.com/x");
        assert_eq!(one["Score"].as_f64(), Some(7.5));
        assert_eq!(one["Info"], "{\"k\": 1}");
        let two = h.item(&archive, "2").await.unwrap();
        assert_eq!(two["Title"], "Second");
        // Provisioned: SyncKey indexed and unique.
        let main_id = h.graph.get_list(&h.site, &main).await.unwrap().unwrap().id;
        let cols = h.graph.list_columns(&h.site, &main_id).await.unwrap();
        let sk = cols.iter().find(|c| c.name == "SyncKey").expect("SyncKey column");
        assert!(sk.indexed && sk.enforce_unique_values && sk.hidden);

        // Update.
        h.sql(&format!("UPDATE public.{m} SET qty = 6, notes = NULL WHERE id = 1")).await;
        h.wait_for("the update", || async {
            h.item(&main, "1").await.is_some_and(|f| f["Qty"].as_f64() == Some(6.0))
        })
        .await;
        let f = h.item(&main, "1").await.unwrap();
        assert!(f.get("Notes").is_none_or(Value::is_null), "notes cleared: {f:?}");

        // No-op updates cost no Graph request: unmapped column, and a same-value update.
        let unchanged_before = h.metric("syncbridge_push_skipped_total", &["reason=\"unchanged\""]).await;
        let before = writes(&h.stats().await);
        h.sql(&format!("UPDATE public.{m} SET unmapped = 'x' WHERE id = 1; UPDATE public.{m} SET qty = qty WHERE id = 1;"))
            .await;
        h.wait_for("two ledger skips", || async {
            h.metric("syncbridge_push_skipped_total", &["reason=\"unchanged\""]).await >= unchanged_before + 1.0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let after = writes(&h.stats().await);
        assert_eq!(before, after, "no-op updates must cost 0 RU and 0 write requests");

        // Move to the archive and back: exactly one live item at every check.
        h.sql(&format!("UPDATE public.{m} SET status = 'archived' WHERE id = 1")).await;
        h.wait_for("the move to the archive", || async {
            h.item(&archive, "1").await.is_some() && h.item(&main, "1").await.is_none()
        })
        .await;
        h.sql(&format!("UPDATE public.{m} SET status = 'done' WHERE id = 1")).await;
        h.wait_for("the move back", || async {
            h.item(&main, "1").await.is_some_and(|f| f["Status"] == "done") && h.item(&archive, "1").await.is_none()
        })
        .await;
        assert_eq!(h.item(&main, "1").await.unwrap()["Tags"], json!(["a", "b"]), "fields survive the moves");

        // Delete.
        h.sql(&format!("DELETE FROM public.{m} WHERE id = 2")).await;
        h.wait_for("the delete", || async { h.items(&archive).await.is_empty() }).await;

        // Dead letters: one per bad value kind, and the pipeline keeps going.
        let long = "x".repeat(300);
        h.emulator_limits(json!({ "hyperlink_writes": false })).await;
        h.sql(&format!(
            "INSERT INTO public.{m} (id, title) VALUES (10, '{long}');
             INSERT INTO public.{m} (id, title, status) VALUES (11, 't', 'bogus');
             INSERT INTO public.{m} (id, title, score) VALUES (12, 't', 'abc');
             INSERT INTO public.{m} (id, title, due) VALUES (13, 't', '1800-01-01');
             INSERT INTO public.{m} (id, title, owner) VALUES (14, 't', 'nobody@nowhere.example');
             INSERT INTO public.{m} (id, title, tags) VALUES (15, 't', '{{z}}');
             INSERT INTO public.{m} (id, title, link) VALUES (16, 't', 'https://example.com/rejected');
             INSERT INTO public.{m} (id, title) VALUES (17, 'good after bad');"
        ))
        .await;
        h.wait_for("the good row after the bad ones", || async { h.item(&main, "17").await.is_some() }).await;
        h.wait_for("seven dead letters", || async {
            h.metric("syncbridge_push_dead_letters_total", &[]).await >= 7.0
        })
        .await;
        for k in ["10", "11", "12", "13", "14", "15", "16"] {
            assert!(h.item(&main, k).await.is_none(), "row {k} must not be written");
        }
        // The pipeline's status: its counts, lag and budget, while it runs.
        let api = format!("http://127.0.0.1:{}/pipelines", h.control_port);
        let status: Value = h.admin.get(format!("{api}/{}", h.name)).send().await.unwrap().json().await.unwrap();
        assert_eq!((&status["log"], &status["ready"]), (&json!("embedded"), &json!(true)), "{status:#}");
        assert!(status["counts"]["dead_letters"].as_u64().unwrap() >= 7, "{status:#}");
        assert!(status["counts"]["resource_units"].as_u64().unwrap() > 0, "{status:#}");
        assert_eq!(status["budget"]["ru_per_minute"], 100000, "{status:#}");
        assert!(status["lag"]["partitions"].as_array().is_some_and(|p| !p.is_empty()), "{status:#}");
        let all: Value = h.admin.get(&api).send().await.unwrap().json().await.unwrap();
        assert_eq!(all["pipelines"][0]["name"], h.name.as_str());
        // The DLQ is read and replayed through the running process (it holds the embedded log).
        let out = Command::new(BIN).args(["dlq", "list", "--json"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let kinds: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| (v["key"].as_str().unwrap().to_string(), v["kind"].as_str().unwrap().to_string()))
            .collect();
        for (key, kind) in [
            ("10", "too_long"),
            ("11", "unknown_choice"),
            ("12", "type_mismatch"),
            ("13", "out_of_range"),
            ("14", "unknown_user"),
            ("15", "unknown_choice"),
            ("16", "graph_rejected"),
        ] {
            assert!(kinds.contains(&(key.to_string(), kind.to_string())), "missing {key}/{kind} in {kinds:?}");
        }
        // Fix the cause (hyperlinks writable again) and replay: the rejected row arrives; the
        // others are still bad and come back to the DLQ.
        h.emulator_limits(json!({ "hyperlink_writes": true })).await;
        let out = Command::new(BIN).args(["dlq", "replay"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("replayed 7 dead letter(s) through the running process"), "{said}");
        h.wait_for("the replayed row", || async { h.item(&main, "16").await.is_some() }).await;

        // TRUNCATE empties the lists of that table.
        h.sql(&format!("TRUNCATE public.{m}")).await;
        h.wait_for("the truncate", || async { h.items(&main).await.is_empty() && h.items(&archive).await.is_empty() })
            .await;
        assert_eq!(h.items(&parent).await.len(), 2, "other tables untouched");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_does_not_match_the_mapping_fails_startup_naming_each_mismatch_and_changes_nothing()
 {
    hard_timeout(120, async {
        let mut h = Harness::new("pushmis").await;
        create_tables(&mut h).await;
        let n = h.name.clone();
        // "Main" exists with a wrong type for Qty, Status lacking a choice, no SyncKey.
        let cols = [
            ColumnDefinition::text("Qty"),
            ColumnDefinition::new("Status", "choice", json!({ "choices": ["open"] })),
        ];
        h.graph
            .create_list(&h.site, &format!("Main {n}"), &cols)
            .await
            .unwrap();
        let file = h.pipeline(&h.embedded_log(), &sync_entries(&h));
        let out = Command::new(BIN).arg("run").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        for needle in [
            "field Qty has type text, the mapping needs number",
            "field Status lacks the choices [\"done\", \"archived\"]",
            "the SyncKey column is missing",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        // A missing column alone would be added at start; beside real mismatches it is neither
        // reported as one nor added (a list that does not match is not changed).
        assert!(!err.contains("field Notes"), "{err}");
        let main_id = h.list_id(&format!("Main {n}")).await;
        let cols = h.graph.list_columns(&h.site, &main_id).await.unwrap();
        assert!(!cols.iter().any(|c| c.name == "Notes"), "{cols:?}");
        // Nothing was written, and no slot was created.
        let slots: i64 =
            h.db.query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("sb_{n}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_path_over_the_kafka_log() {
    hard_timeout(180, async {
        let mut h = Harness::new("pushk").await;
        create_tables(&mut h).await;
        let (m, n) = (h.t("m"), h.name.clone());
        let main = format!("Main {n}");
        h.sql(&format!("INSERT INTO public.{m} (id, title, status, qty) SELECT g, 'row ' || g, 'open', g FROM generate_series(1, 30) g"))
            .await;
        let log = format!("{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbt{}' }} }}", kafka_brokers(), &n[n.len() - 8..]);
        let file = h.pipeline(&log, &sync_entries(&h));
        h.start(&file);
        h.wait_for("30 items through Kafka", || async { h.items(&main).await.len() == 30 }).await;
        h.sql(&format!(
            "UPDATE public.{m} SET qty = qty + 100 WHERE id <= 10; DELETE FROM public.{m} WHERE id > 25; \
             UPDATE public.{m} SET status = 'archived' WHERE id = 1"
        ))
        .await;
        let archive = format!("Archive {n}");
        h.wait_for("updates, deletes and a move through Kafka", || async {
            let items = h.items(&main).await;
            items.len() == 24
                && items.iter().filter(|(_, f)| f["Qty"].as_f64().unwrap_or(0.0) > 100.0).count() == 9
                && h.items(&archive).await.len() == 1
        })
        .await;
        h.stop().await;
    })
    .await;
}

/// Issue 5, "Bad input and faults": with 20 % 429/503 and 5 % connection resets injected, and the
/// access token revoked mid-run, the lists converge to the exact table state, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_injected_faults_the_lists_converge_without_duplicates() {
    hard_timeout(240, async {
        let mut h = Harness::new("pushflt").await;
        create_tables(&mut h).await;
        let (m, n) = (h.t("m"), h.name.clone());
        let (main, archive) = (format!("Main {n}"), format!("Archive {n}"));
        h.sql(&format!(
            "INSERT INTO public.{m} (id, title, status, qty) \
             SELECT g, 'row ' || g, CASE WHEN g % 5 = 0 THEN 'archived' ELSE 'open' END, g \
             FROM generate_series(1, 120) g"
        ))
        .await;
        let (admin, base) = (h.admin.clone(), h.emu.base_url());
        let post = |path: &'static str, body: Value| {
            let (admin, base) = (admin.clone(), base.clone());
            async move {
                let r = admin
                    .post(format!("{base}/_emulator/{path}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{path}: {}", r.status());
            }
        };
        post(
            "faults",
            json!({ "throttle_rate": 0.1, "unavailable_rate": 0.1, "reset_rate": 0.05,
                    "retry_after_secs": 1, "seed": 42 }),
        )
        .await;
        let file = h.pipeline(&h.embedded_log(), &sync_entries(&h));
        h.start(&file);
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Updates, moves both ways, deletes, inserts while faults stay on; the token is revoked.
        h.sql(&format!(
            "UPDATE public.{m} SET qty = qty + 1000 WHERE id % 3 = 0; \
             UPDATE public.{m} SET status = 'archived' WHERE id IN (1, 2, 3); \
             UPDATE public.{m} SET status = 'open' WHERE id IN (5, 10); \
             DELETE FROM public.{m} WHERE id BETWEEN 100 AND 109; \
             INSERT INTO public.{m} (id, title, status) VALUES (500, 'late', 'open');"
        ))
        .await;
        post("expire-tokens", json!({})).await;
        h.sql(&format!(
            "UPDATE public.{m} SET title = title || ' v2' WHERE id % 7 = 0"
        ))
        .await;
        let rows =
            h.db.query(
                &format!("SELECT id, title, status, qty FROM public.{m}"),
                &[],
            )
            .await
            .unwrap();
        let want: Vec<(String, String, String, Option<f64>)> = rows
            .iter()
            .map(|r| {
                let id: i64 = r.get(0);
                let status: String = r.get(2);
                let list = if status == "archived" {
                    archive.clone()
                } else {
                    main.clone()
                };
                (
                    id.to_string(),
                    list,
                    r.get(1),
                    r.get::<_, Option<i32>>(3).map(f64::from),
                )
            })
            .collect();
        h.wait_for("the exact table state under faults", || async {
            let mut items = Vec::new();
            for l in [&main, &archive] {
                for (k, f) in h.items(l).await {
                    items.push((k, l.clone(), f));
                }
            }
            items.len() == want.len()
                && want.iter().all(|(k, l, title, qty)| {
                    items.iter().filter(|(ik, _, _)| ik == k).count() == 1
                        && items.iter().any(|(ik, il, f)| {
                            ik == k
                                && il == l
                                && f.get("Title").and_then(Value::as_str) == Some(title.as_str())
                                && f.get("Qty").and_then(Value::as_f64) == *qty
                        })
                })
        })
        .await;
        let stats = h.stats().await;
        let injected = stats["faults"]["injected_throttles"].as_u64().unwrap_or(0)
            + stats["faults"]["injected_unavailable"]
                .as_u64()
                .unwrap_or(0);
        let resets = stats["faults"]["injected_resets"].as_u64().unwrap_or(0);
        eprintln!("faults injected: {injected} 429/503, {resets} connection resets");
        assert!(injected > 0, "the run must actually have met faults");
        h.stop().await;
    })
    .await;
}
