//! The meta-store (issue 11, part B) on the real stack: migrations are idempotent and safe when
//! several processes start at once; a pipeline's lifetime is a `stream` run with counts, served
//! by `GET /runs` and `GET /runs/{id}`; a run left `running` by a kill -9 is marked failed by the
//! next start; dropping `syncbridge_meta` and restarting rebuilds every run from the runs topic,
//! equal to before.
//!
//! Needs `DATABASE_URL` (superuser: the tests create a database of their own, so dropping its
//! schema cannot disturb other tests). A test FAILS (never skips) when it is unset.

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase as MetaDatabase;
use harness::{Harness, hard_timeout};

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
            ["projector_offsets", "refinery_schema_history", "runs"]
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

/// The pipeline's runs as the meta-store holds them, oldest first, each as its full row.
async fn runs(meta: &Client, pipeline: &str) -> Vec<Value> {
    meta.query(
        "SELECT row_to_json(r)::text FROM syncbridge_meta.runs r WHERE pipeline = $1 \
         ORDER BY started_ms, run_id",
        &[&pipeline],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
    .collect()
}

/// `GET <path>` on the process's control plane; `Err` while it is not listening.
async fn get(h: &Harness, path: &str) -> reqwest::Result<reqwest::Response> {
    h.admin
        .get(format!("http://127.0.0.1:{}{path}", h.control_port))
        .send()
        .await
}

/// `GET /runs?query`, `None` while the process is not listening yet.
async fn try_runs(h: &Harness, query: &str) -> Option<Vec<Value>> {
    let body: Value = get(h, &format!("/runs?{query}"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["runs"].as_array().cloned()
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

        // 3. Drop the schema, restart: every earlier run comes back equal from the log.
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
        h.stop().await;
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
        h.wait_for("the first process's run", || async {
            try_runs(&h, &format!("{q}&status=running"))
                .await
                .is_some_and(|r| r.len() == 1)
        })
        .await;
        let killed = api_runs(&h, &q).await["runs"][0]["run_id"]
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
            .filter(|r| r["run_id"] != killed.as_str())
            .collect();
        assert_eq!(live.len(), 1, "{runs:#?}");
        assert_eq!(live[0]["status"], "running", "the live run is left alone");
        h.stop().await;
    })
    .await;
}
