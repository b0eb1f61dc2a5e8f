//! The meta-store (issue 11, part B) on the real stack: migrations are idempotent and safe when
//! several processes start at once; a pipeline's lifetime is a `stream` run with counts, served
//! by `GET /runs` and `GET /runs/{id}`; a run left `running` by a kill -9 is marked failed by the
//! next start; dropping `syncbridge_meta` and restarting rebuilds every run from the runs topic
//! and every audit record from the audit topic, equal to before. The ledger audit (issue 11,
//! item 3): a moved row's history (`GET /pipelines/{p}/rows/{table}/{key}/history`) shows its
//! capture LSN, log offset, the create in the new list and the delete in the old one, with the
//! request ids the emulator logged for those writes; `control.audit_retention` prunes only the
//! pipeline's older records, past several chunks.
//!
//! Needs `DATABASE_URL` (superuser: the tests create a database of their own, so dropping its
//! schema cannot disturb other tests). A test FAILS (never skips) when it is unset.

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase as MetaDatabase;
use harness::{Harness, hard_timeout, try_runs};

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_when_started_concurrently() {
    hard_timeout(120, async {
        let db = MetaDatabase::create("sbmeta").await;
        // Four "processes" at once: each migration is applied exactly once, none fails.
        let runs = futures::future::join_all(
            (0..4).map(|_| syncbridge::control::meta::migrate::migrate(&db.url)),
        )
        .await;
        let applied: usize = runs
            .into_iter()
            .map(|r| r.expect("a concurrent migration run succeeds"))
            .sum();
        assert_eq!(
            applied,
            syncbridge::control::meta::migrate::MIGRATIONS.len(),
            "each migration applied once across the concurrent runs"
        );
        assert_eq!(
            syncbridge::control::meta::migrate::migrate(&db.url)
                .await
                .unwrap(),
            0,
            "a second start applies nothing"
        );
        let c = connect(&db.url).await;
        let tables: Vec<String> = c
            .query(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'syncbridge_meta' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            tables,
            [
                "audit",
                "drift_differences",
                "drift_reports",
                "projector_offsets",
                "refinery_schema_history",
                "runs",
                "schedule_ticks"
            ]
        );
        let history: i64 = c
            .query_one(
                "SELECT count(*) FROM syncbridge_meta.refinery_schema_history",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            history as usize,
            syncbridge::control::meta::migrate::MIGRATIONS.len()
        );
    })
    .await;
}

/// The rows `select` (with `$1` = the pipeline) answers, each as its JSON object.
async fn json_rows(meta: &Client, select: &str, pipeline: &str) -> Vec<Value> {
    meta.query(select, &[&pipeline])
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect()
}

/// The pipeline's runs as the meta-store holds them, oldest first, each as its full row.
async fn runs(meta: &Client, pipeline: &str) -> Vec<Value> {
    let select = "SELECT row_to_json(r)::text FROM syncbridge_meta.runs r WHERE pipeline = $1 \
                  ORDER BY started_ms, run_id";
    json_rows(meta, select, pipeline).await
}

/// The pipeline's audit records as the meta-store holds them, in log order, each as its full row.
async fn audit_rows(meta: &Client, pipeline: &str) -> Vec<Value> {
    let select = "SELECT row_to_json(a)::text FROM syncbridge_meta.audit a WHERE pipeline = $1 \
                  ORDER BY log_partition, log_offset";
    json_rows(meta, select, pipeline).await
}

/// `GET <path>` on the process's control plane; `Err` while it is not listening.
async fn get(h: &Harness, path: &str) -> reqwest::Result<reqwest::Response> {
    h.admin
        .get(format!("http://127.0.0.1:{}{path}", h.control_port))
        .send()
        .await
}

async fn api_runs(h: &Harness, query: &str) -> Value {
    let r = get(h, &format!("/runs?{query}")).await.unwrap();
    assert_eq!(r.status(), 200, "GET /runs?{query}");
    r.json().await.unwrap()
}

/// A meta-store database, a harness with a table of `rows` rows and the pipeline file syncing
/// it to list `T <name>` on the log `log(h)` names, with `control.meta_url` set.
async fn setup(
    tag: &str,
    rows: u32,
    log: impl FnOnce(&Harness) -> String,
) -> (MetaDatabase, Harness, String, std::path::PathBuf) {
    let meta_db = MetaDatabase::create("sbmeta").await;
    let mut h = Harness::new(tag).await;
    let (t, list) = h.titled_table(rows).await;
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
    );
    let file = h.pipeline(&log(&h), &sync);
    let yaml = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{yaml}  meta_url: {}\n", meta_db.url)).unwrap();
    (meta_db, h, list, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_runs_are_recorded_survive_kill_9_and_are_rebuilt_from_the_log() {
    hard_timeout(300, async {
        let (meta_db, mut h, list, file) = setup("meta", 3, |h| h.embedded_log()).await;
        let name = h.name.clone();
        let all = format!("pipeline={name}");
        let q = format!("{all}&kind=stream");

        // 1. A run: `running` while the pipeline runs, its counts come with the heartbeat.
        h.start(&file);
        h.wait_for("three items", || async { h.items(&list).await.len() == 3 })
            .await;
        h.wait_for(
            "the stream run with 3 creates (heartbeat ≤ 10 s)",
            || async {
                try_runs(&h, &q).await.is_some_and(|runs| {
                    runs.len() == 1
                        && runs[0]["status"] == "running"
                        && runs[0]["kind"] == "stream"
                        && runs[0]["counts"]["creates"] == 3
                        && runs[0]["counts"]["events"] == 3
                })
            },
        )
        .await;
        // The run's first event and at least one heartbeat were projected.
        let projected = h
            .metric(
                "syncbridge_meta_events_projected_total",
                &[&format!("pipeline=\"{name}\"")],
            )
            .await;
        assert!(projected >= 2.0, "projected {projected} run events");
        // The initial snapshot is a run of its own, about the table it read.
        h.wait_for("the snapshot run, succeeded with 3 rows", || async {
            try_runs(&h, &format!("{all}&kind=snapshot"))
                .await
                .is_some_and(|runs| {
                    runs.len() == 1
                        && runs[0]["status"] == "succeeded"
                        && runs[0]["counts"]["rows"] == 3
                        && runs[0]["subject"] == format!("public.{name}_t").as_str()
                })
        })
        .await;
        // So is a re-snapshot asked for while streaming.
        let asked = h
            .admin
            .post(format!(
                "http://127.0.0.1:{}/pipelines/{name}/snapshot?table=public.{name}_t",
                h.control_port
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(asked.status(), 202);
        h.wait_for("the re-snapshot run, succeeded with 3 rows", || async {
            try_runs(&h, &format!("{all}&kind=resnapshot"))
                .await
                .is_some_and(|runs| {
                    runs.len() == 1
                        && runs[0]["status"] == "succeeded"
                        && runs[0]["counts"]["rows"] == 3
                        && runs[0]["subject"] == format!("public.{name}_t").as_str()
                })
        })
        .await;
        let body = api_runs(&h, &q).await;
        let first_id = body["runs"][0]["run_id"].as_str().unwrap().to_string();
        let one = get(&h, &format!("/runs/{first_id}")).await.unwrap();
        assert_eq!(one.status(), 200);
        let one: Value = one.json().await.unwrap();
        assert_eq!(one["run_id"], first_id.as_str());
        let missing = get(&h, &format!("/runs/{}", uuid::Uuid::new_v4()))
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        for bad in [
            "limit=0",
            "limit=x",
            "status=done",
            "kind=x",
            "before=x",
            "nope=1",
        ] {
            let r = get(&h, &format!("/runs?{bad}")).await.unwrap();
            assert_eq!(r.status(), 400, "GET /runs?{bad}");
        }
        h.stop().await;

        let meta = connect(&meta_db.url).await;
        let after_first = runs(&meta, &name).await;
        assert_eq!(
            after_first.len(),
            3,
            "a stream, a snapshot and a re-snapshot run: {after_first:#?}"
        );
        let stream = after_first.iter().find(|r| r["kind"] == "stream").unwrap();
        assert_eq!(stream["status"], "succeeded");
        assert_eq!(stream["counts"]["creates"], 3);
        assert!(stream["ended_ms"].as_i64().is_some());
        // What the pipeline's Graph client spent: at least the three creates (2 RU each).
        let counts = &stream["counts"];
        assert!(counts["graph_requests"].as_u64().unwrap() >= 1, "{counts}");
        assert!(counts["resource_units"].as_u64().unwrap() >= 6, "{counts}");
        assert_eq!(counts["throttled"], 0, "{counts}");

        // 2. kill -9 while running: the next start marks that run failed.
        h.start(&file);
        h.wait_for("the second run", || async {
            try_runs(&h, &format!("{q}&status=running"))
                .await
                .is_some_and(|r| r.len() == 1)
        })
        .await;
        let killed = api_runs(&h, &format!("{q}&status=running")).await["runs"][0]["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(killed, first_id);
        let mut child = h.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        h.start(&file);
        h.wait_for("the killed run marked failed", || async {
            try_runs(&h, &q).await.is_some_and(|runs| {
                runs.len() == 3
                    && runs.iter().any(|x| {
                        x["run_id"] == killed.as_str()
                            && x["status"] == "failed"
                            && x["reason"] == "process ended"
                    })
            })
        })
        .await;
        // Paging: one run per page, newest first, three pages.
        let page1 = api_runs(&h, &format!("{q}&limit=1")).await;
        let next = page1["next"].as_str().unwrap().to_string();
        let page2 = api_runs(&h, &format!("{q}&limit=1&before={next}")).await;
        assert_eq!(page2["runs"][0]["run_id"], killed.as_str());
        let page3 = api_runs(
            &h,
            &format!("{q}&limit=1&before={}", page2["next"].as_str().unwrap()),
        )
        .await;
        assert_eq!(page3["runs"][0]["run_id"], first_id.as_str());
        h.stop().await;

        // A `dlq replay` while the pipeline is stopped is a run too, projected at the next start.
        let out = std::process::Command::new(harness::BIN)
            .args(["dlq", "replay"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "dlq replay: {out:?}");

        // 3. Drop the schema, restart: every earlier run and audit record comes back equal from
        // the log.
        let audit_before = audit_rows(&meta, &name).await;
        let creates = audit_before
            .iter()
            .filter(|a| a["operation"] == "create")
            .count();
        assert_eq!(creates, 3, "one create per row: {audit_before:#?}");
        let before = runs(&meta, &name).await;
        assert_eq!(
            before.len(),
            5,
            "three stream runs, the snapshot and the re-snapshot; the replay run is not projected yet: {before:#?}"
        );
        assert!(
            before.iter().all(|r| r["status"] != "running"),
            "{before:#?}"
        );
        meta.batch_execute("DROP SCHEMA syncbridge_meta CASCADE")
            .await
            .unwrap();
        h.start(&file);
        h.wait_for("the rebuilt history", || async {
            try_runs(&h, &all).await.is_some_and(|r| r.len() == 7)
        })
        .await;
        h.wait_for("the rebuilt audit", || async {
            audit_rows(&meta, &name).await.len() >= audit_before.len()
        })
        .await;
        h.stop().await;
        let audit_after = audit_rows(&meta, &name).await;
        assert_eq!(
            audit_after, audit_before,
            "rebuilt audit records equal the ones dropped (and nothing new was decided)"
        );
        let after = runs(&meta, &name).await;
        assert_eq!(after.len(), 7, "{after:#?}");
        assert_eq!(
            after[..5],
            before[..],
            "rebuilt runs equal the ones dropped"
        );
        assert_eq!(
            (
                &after[5]["kind"],
                &after[5]["status"],
                &after[5]["counts"]["replayed"]
            ),
            (
                &Value::from("dlq_replay"),
                &Value::from("succeeded"),
                &Value::from(0)
            ),
            "{after:#?}"
        );
        assert_eq!(
            (&after[6]["kind"], &after[6]["status"]),
            (&Value::from("stream"), &Value::from("succeeded"))
        );
    })
    .await;
}

/// On Kafka several processes may run one pipeline, so a start cannot assume every `running` run
/// is dead: a run is marked failed once it missed three heartbeats (30 s), by a peer's periodic
/// sweep, while the peer's own run stays running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_peer_marks_a_dead_process_run_failed_once_its_heartbeats_stop() {
    hard_timeout(240, async {
        let (_meta_db, mut h, _list, file) = setup("metak", 2, |h| {
            format!(
                "{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbm{}' }} }}",
                common::kafka_brokers(),
                &h.name[h.name.len() - 8..]
            )
        })
        .await;
        let n = h.name.clone();
        let q = format!("pipeline={n}");

        h.start(&file);
        // The stream run: the snapshot is a run of its own (and may be the newest).
        let stream = format!("{q}&kind=stream");
        h.wait_for("the first process's run", || async {
            try_runs(&h, &format!("{stream}&status=running"))
                .await
                .is_some_and(|r| r.len() == 1)
        })
        .await;
        let killed = api_runs(&h, &stream).await["runs"][0]["run_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut child = h.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let killed_at = std::time::Instant::now();
        h.start(&file);
        // At once the killed run may still look alive; after 30 s without heartbeats plus one
        // sweep interval it must be failed, and the live process's run still running.
        let deadline = killed_at + std::time::Duration::from_secs(90);
        let runs = loop {
            let runs = try_runs(&h, &q).await.unwrap_or_default();
            let failed = runs
                .iter()
                .any(|r| r["run_id"] == killed.as_str() && r["status"] == "failed");
            if failed {
                break runs;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the killed run was not marked failed: {runs:#?}\n{}",
                h.run_log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        assert!(
            killed_at.elapsed() >= std::time::Duration::from_secs(30),
            "marked failed before three heartbeats were missed"
        );
        let dead = runs
            .iter()
            .find(|r| r["run_id"] == killed.as_str())
            .unwrap();
        assert_eq!(dead["reason"], "process ended");
        let live: Vec<_> = runs
            .iter()
            .filter(|r| r["run_id"] != killed.as_str() && r["kind"] == "stream")
            .collect();
        assert_eq!(live.len(), 1, "{runs:#?}");
        assert_eq!(live[0]["status"], "running", "the live run is left alone");
        h.stop().await;
    })
    .await;
}

/// `pg_current_wal_insert_lsn()` as a number.
async fn wal_lsn(h: &Harness) -> u64 {
    let text: String =
        h.db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
    syncbridge::pull::apply::parse_lsn(&text).unwrap()
}

/// Runs `sql` and returns the WAL positions around it: its commit LSN lies in (before, after].
async fn committed(h: &Harness, sql: &str) -> (u64, u64) {
    let before = wal_lsn(h).await;
    h.sql(sql).await;
    (before, wal_lsn(h).await)
}

/// The history entry's LSN, checked to lie in `window`.
fn lsn_in(entry: &Value, window: (u64, u64)) -> u64 {
    let lsn = syncbridge::pull::apply::parse_lsn(entry["lsn"].as_str().unwrap()).unwrap();
    assert!(
        window.0 < lsn && lsn <= window.1,
        "LSN {lsn:X} outside the commit's window {:X}..{:X}: {entry:#}",
        window.0,
        window.1
    );
    lsn
}

/// The emulator logged a call with these ids, method, path suffix and status.
fn logged(requests: &[Value], entry: &Value, method: &str, path_end: &str, status: u16) {
    let g = &entry["graph"];
    let found = requests.iter().any(|r| {
        r["request_id"] == g["request_id"]
            && r["client_request_id"] == g["client_request_id"]
            && r["method"] == method
            && r["path"].as_str().is_some_and(|p| p.ends_with(path_end))
            && r["status"] == status
    });
    assert!(
        found,
        "no {method} …{path_end} → {status} with the ids of {entry:#} in the emulator's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_rows_history_shows_its_lineage_with_the_emulators_request_ids() {
    hard_timeout(240, async {
        let meta_db = MetaDatabase::create("sbmeta").await;
        let mut h = Harness::new("audit").await;
        let name = h.name.clone();
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, status text NOT NULL);
             INSERT INTO public.{t} VALUES (1, 'canary', 'open');"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let (main, archive) = (format!("M {name}"), format!("A {name}"));
        let sync = format!(
            "  - table: public.{t}\n    list: {main}\n    fields: {{ title: Title }}\n    routes:\n      - when: \"status == 'archived'\"\n        list: {archive}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &file,
            format!("{yaml}  meta_url: {}\n  audit_retention: 7d\n", meta_db.url),
        )
        .unwrap();
        h.start(&file);
        // The canary's item: the slot exists and the snapshot is done, so what follows streams.
        h.wait_for("the canary's item", || async {
            h.item(&main, "1").await.is_some()
        })
        .await;

        let created = committed(
            &h,
            &format!("INSERT INTO public.{t} VALUES (2, 'row two', 'open')"),
        )
        .await;
        h.wait_for("row 2 in the main list", || async {
            h.item(&main, "2").await.is_some()
        })
        .await;
        let old_item = h.item_id(&main, "2").await;
        let moved = committed(
            &h,
            &format!("UPDATE public.{t} SET status = 'archived' WHERE id = 2"),
        )
        .await;
        h.wait_for("row 2 moved to the archive list", || async {
            h.item(&archive, "2").await.is_some() && h.item(&main, "2").await.is_none()
        })
        .await;
        let new_item = h.item_id(&archive, "2").await;
        // A change the list already has: decided, nothing written.
        h.sql(&format!(
            "UPDATE public.{t} SET status = 'archived' WHERE id = 2"
        ))
        .await;
        let (main_id, archive_id) = (h.list_id(&main).await, h.list_id(&archive).await);

        let path = format!("/pipelines/{name}/rows/public.{t}/2/history");
        let ops = |body: &Value| -> Vec<String> {
            body["entries"]
                .as_array()
                .map(|e| e.iter().map(|x| x["operation"].as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        h.wait_for("the row's four records projected", || async {
            match get(&h, &path).await {
                Ok(r) if r.status() == 200 => r.json::<Value>().await.is_ok_and(|b| ops(&b).len() >= 4),
                _ => false,
            }
        })
        .await;
        let body: Value = get(&h, &path).await.unwrap().json().await.unwrap();
        assert_eq!(
            ops(&body),
            ["skip-unchanged", "delete", "move", "create"],
            "newest first: {body:#}"
        );
        let e = body["entries"].as_array().unwrap();
        let (skip, delete, mv, create) = (&e[0], &e[1], &e[2], &e[3]);
        let topic_end = format!(".{name}.public.{t}");

        // create: LSN of the INSERT → its event → POST in the main list.
        lsn_in(create, created);
        assert!(create["source"]["topic"].as_str().unwrap().ends_with(&topic_end));
        assert_eq!(create["list_id"], main_id.as_str());
        assert_eq!(create["item_id"], old_item.as_str());
        assert_eq!(create["graph"]["status"], 201);
        // move: LSN of the UPDATE → a later event of the same row → POST in the archive list.
        let move_lsn = lsn_in(mv, moved);
        assert_eq!(mv["source"]["topic"], create["source"]["topic"]);
        assert_eq!(mv["source"]["partition"], create["source"]["partition"]);
        assert!(mv["source"]["offset"].as_i64() > create["source"]["offset"].as_i64());
        assert_eq!(mv["list_id"], archive_id.as_str());
        assert_eq!(mv["item_id"], new_item.as_str());
        assert_eq!(mv["graph"]["status"], 201);
        assert!(mv["etag"].is_string() && mv["hash"].is_string(), "{mv:#}");
        // delete: the old item in the main list, same change.
        assert_eq!(lsn_in(delete, moved), move_lsn);
        assert_eq!(delete["source"], mv["source"]);
        assert_eq!(delete["list_id"], main_id.as_str());
        assert_eq!(delete["item_id"], old_item.as_str());
        assert_eq!(delete["graph"]["status"], 204);
        // skip-unchanged: no Graph request, the archive item it found.
        assert!(skip["graph"].is_null(), "{skip:#}");
        assert_eq!(skip["item_id"], new_item.as_str());

        // The same request ids are in the emulator's own log of what it answered.
        let log: Value = h
            .admin
            .get(format!("{}/_emulator/requests", h.emu.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let requests = log["requests"].as_array().unwrap();
        logged(requests, create, "POST", &format!("/lists/{main_id}/items"), 201);
        logged(requests, mv, "POST", &format!("/lists/{archive_id}/items"), 201);
        logged(
            requests,
            delete,
            "DELETE",
            &format!("/lists/{main_id}/items/{old_item}"),
            204,
        );
        assert_ne!(mv["graph"]["client_request_id"], create["graph"]["client_request_id"]);

        // Paging: one entry a page, the pages together are the whole history.
        let mut paged = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let q = match &next {
                Some(c) => format!("{path}?limit=1&before={c}"),
                None => format!("{path}?limit=1"),
            };
            let page: Value = get(&h, &q).await.unwrap().json().await.unwrap();
            paged.extend(page["entries"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(c) => next = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(&paged, e, "pages concatenated = the first page of 50");

        // Bad input: a problem naming the field; an unknown pipeline is 404.
        for (bad, field) in [
            (format!("/pipelines/{name}/rows/public.nope/2/history"), "table"),
            (format!("{path}?limit=0"), "limit"),
            (format!("{path}?limit=x"), "limit"),
            (format!("{path}?before=x"), "before"),
            (format!("{path}?nope=1"), "nope"),
        ] {
            let r = get(&h, &bad).await.unwrap();
            assert_eq!(r.status(), 400, "{bad}");
            let p: Value = r.json().await.unwrap();
            assert_eq!(p["invalid-params"][0]["name"], field, "{bad}: {p:#}");
        }
        let r = get(&h, &format!("/pipelines/nope/rows/public.{t}/2/history"))
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        // A row without records: an empty page.
        let none: Value = get(&h, &format!("/pipelines/{name}/rows/public.{t}/99/history"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(none["entries"], serde_json::json!([]));
        let projected = h
            .metric(
                "syncbridge_meta_audit_projected_total",
                &[&format!("pipeline=\"{name}\"")],
            )
            .await;
        assert!(projected >= 5.0, "projected {projected} audit records (canary + row 2)");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_prunes_only_the_pipelines_older_records_in_chunks() {
    hard_timeout(120, async {
        let db = MetaDatabase::create("sbmeta").await;
        syncbridge::control::meta::migrate::migrate(&db.url)
            .await
            .unwrap();
        let c = connect(&db.url).await;
        let now = chrono::Utc::now().timestamp_millis();
        let day = 86_400_000i64;
        // More old records than two chunks, plus ones that must stay: newer, or another pipeline's.
        let old = 2 * syncbridge::control::meta::projector::PRUNE_CHUNK + 7;
        c.execute(
            "INSERT INTO syncbridge_meta.audit (event_id, pipeline, table_name, row_key, operation, \
             at_ms, log_partition, log_offset) \
             SELECT gen_random_uuid(), p, 'public.t', g::text, 'create', at, 0, g \
             FROM generate_series(1, $1::bigint) g, \
             (VALUES ('p', $2::bigint), ('other', $2::bigint)) v(p, at) \
             UNION ALL SELECT gen_random_uuid(), 'p', 'public.t', 'new', 'update', $3, 0, 0",
            &[&old, &(now - 3 * day), &(now - day / 2)],
        )
        .await
        .unwrap();
        let meta = syncbridge::control::meta::MetaDb::new(&db.url);
        let deleted = syncbridge::control::meta::projector::prune_audit(
            &meta,
            "p",
            std::time::Duration::from_secs(86_400),
            &syncbridge::log::CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(deleted as i64, old);
        let left: Vec<(String, String)> = c
            .query(
                "SELECT pipeline, row_key FROM syncbridge_meta.audit \
                 WHERE pipeline = 'p' OR row_key = '1' ORDER BY 1, 2",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            left,
            [("other".into(), "1".into()), ("p".into(), "new".into())],
            "the newer record and the other pipeline's stay"
        );
    })
    .await;
}
