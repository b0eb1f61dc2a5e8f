//! Query sources end to end (issue 21 item 1): a view joining two tables, read in full every
//! 2 s, syncs 1,000 rows; changes in either base table and deleted base rows reach the list; a
//! full read of the unchanged view costs 0 Graph writes. A timestamp cursor with a lookback
//! still delivers a row whose transaction commits after a later-stamped row was synced.
//!
//! Needs `DATABASE_URL` (`eval "$(cat /work/devstack.env)"` or `ops/stack env`); the harness
//! runs its own in-process emulator and the real `syncbridge run` binary on the embedded log.

use serde_json::Value;
use tokio_postgres::NoTls;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, app_writes, hard_timeout};

/// Drops the test's views before the harness drops their tables (declared after the harness,
/// so dropped first).
struct Views(Vec<String>);

impl Drop for Views {
    fn drop(&mut self) {
        let views = std::mem::take(&mut self.0);
        common::block_on_own_runtime(async move {
            let Ok((c, conn)) = tokio_postgres::connect(&common::database_url(), NoTls).await
            else {
                return;
            };
            tokio::spawn(conn);
            for v in views {
                let _ = c.batch_execute(&format!("DROP VIEW IF EXISTS {v}")).await;
            }
        });
    }
}

/// `(SyncKey, Title, Client)` of every item, sorted by key.
async fn rows(h: &Harness, list: &str) -> Vec<(i64, String, String)> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let mut out: Vec<(i64, String, String)> = h
        .items(list)
        .await
        .into_iter()
        .map(|(k, f)| {
            (
                k.parse().unwrap_or(-1),
                s(f.get("Title")),
                s(f.get("Client")),
            )
        })
        .collect();
    out.sort();
    out
}

/// What the view returns, in the same shape.
async fn view_rows(h: &Harness, view: &str) -> Vec<(i64, String, String)> {
    h.db.query(
        &format!("SELECT id, name, client FROM {view} ORDER BY id"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_read_in_full_mirrors_its_base_tables_and_an_unchanged_read_writes_nothing() {
    hard_timeout(300, async {
        let mut h = Harness::new("qfull").await;
        let (proj, client, view) = (h.t("proj"), h.t("client"), h.t("v"));
        h.sql(&format!(
            "CREATE TABLE public.{client} (id bigint PRIMARY KEY, cname text NOT NULL);
             INSERT INTO public.{client} SELECT g, 'Client ' || g FROM generate_series(1, 50) g;
             CREATE TABLE public.{proj} (id bigint PRIMARY KEY, name text NOT NULL,
                                          client_id bigint NOT NULL REFERENCES public.{client});
             INSERT INTO public.{proj} SELECT g, 'Project ' || g, 1 + g % 50
               FROM generate_series(1, 1000) g;
             CREATE VIEW public.{view} AS
               SELECT p.id, p.name, c.cname AS client
               FROM public.{proj} p JOIN public.{client} c ON c.id = p.client_id;"
        ))
        .await;
        h.tables.push(format!("public.{proj}"));
        h.tables.push(format!("public.{client}"));
        let _views = Views(vec![format!("public.{view}")]);
        let list = format!("Q {}", h.name);
        let sync = format!(
            "  - query: SELECT id, name, client FROM public.{view}\n    key: [id]\n    list: {list}\n    fields: {{ name: Title, client: Client }}\n    poll: {{ every: 2s, full: true }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let (code, out, err) = h.cli(&["validate", "--db", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "validate --db: {out}{err}");
        h.start(&file);

        h.wait_for_secs("the 1,000 rows of the view in the list", 180, || async {
            rows(&h, &list).await.len() == 1000
        })
        .await;
        assert_eq!(rows(&h, &list).await, view_rows(&h, &format!("public.{view}")).await);

        // A change in either base table, and a deleted base row.
        h.sql(&format!(
            "UPDATE public.{proj} SET name = 'Renamed' WHERE id = 5;
             UPDATE public.{client} SET cname = 'Acme' WHERE id = 3;
             DELETE FROM public.{proj} WHERE id = 7;"
        ))
        .await;
        let want = view_rows(&h, &format!("public.{view}")).await;
        assert_eq!(want.len(), 999);
        assert_eq!(want.iter().filter(|r| r.2 == "Acme").count(), 20);
        h.wait_for("both base tables' changes and the delete in the list", || async {
            rows(&h, &list).await == want
        })
        .await;

        // Restart: the first read after a start emits every row again; the ledger finds each
        // unchanged, so the full read costs no Graph write.
        let before = app_writes(&h.stats().await);
        h.stop().await;
        h.start(&file);
        h.wait_for("the restarted full read's 999 rows found unchanged", || async {
            h.metric("syncbridge_push_skipped_total", &["reason=\"unchanged\""]).await >= 999.0
        })
        .await;
        let (emitted, reads) = (
            h.metric("syncbridge_query_events_total", &["op=\"u\""]).await,
            h.metric("syncbridge_query_reads_total", &["mode=\"full\""]).await,
        );
        assert_eq!(emitted, 999.0, "the first read after a start emits every row");
        // Two more full reads of the unchanged view: nothing emitted, nothing written.
        h.wait_for("two more full reads", || async {
            h.metric("syncbridge_query_reads_total", &["mode=\"full\""]).await >= reads + 2.0
        })
        .await;
        assert_eq!(h.metric("syncbridge_query_events_total", &[]).await, emitted);
        assert_eq!(app_writes(&h.stats().await), before, "an unchanged view costs 0 writes");
        assert_eq!(rows(&h, &list).await, want);
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_cursor_with_lookback_still_reads_a_late_commit() {
    hard_timeout(180, async {
        let mut h = Harness::new("qcursor").await;
        let t = h.t("ev");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL,
                                      changed_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO public.{t} (id, title) VALUES (1, 'first');"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let list = format!("C {}", h.name);
        let sync = format!(
            "  - query: SELECT id, title, changed_at FROM public.{t}\n    key: [id]\n    list: {list}\n    fields: {{ title: Title }}\n    poll:\n      every: 1s\n      cursor: {{ column: changed_at, kind: timestamp, lookback: 60s }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let (code, out, err) = h.cli(&["validate", "--db", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "validate --db: {out}{err}");
        h.start(&file);
        h.wait_for("the first row", || async { h.item(&list, "1").await.is_some() })
            .await;

        // A transaction stamps row 2 (now() = its start), and commits only after row 3, stamped
        // later, has been read and synced: the cursor is past row 2's stamp by then.
        let (late, conn) = tokio_postgres::connect(&common::database_url(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        late.batch_execute(&format!(
            "BEGIN; INSERT INTO public.{t} (id, title) VALUES (2, 'late');"
        ))
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        h.sql(&format!("INSERT INTO public.{t} (id, title) VALUES (3, 'early')"))
            .await;
        h.wait_for("row 3", || async { h.item(&list, "3").await.is_some() })
            .await;
        let stamps: Vec<bool> = h
            .db
            .query(
                &format!("SELECT (SELECT changed_at FROM public.{t} WHERE id = 3) > $1::timestamptz"),
                &[&late
                    .query_one("SELECT now()", &[])
                    .await
                    .unwrap()
                    .get::<_, std::time::SystemTime>(0)],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(stamps, [true], "row 2 is stamped before row 3");
        late.batch_execute("COMMIT").await.unwrap();
        h.wait_for("the late-committed row 2", || async {
            h.item(&list, "2").await.is_some_and(|f| f.get("Title") == Some(&Value::from("late")))
        })
        .await;
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_db_runs_the_query_and_checks_key_and_cursor() {
    hard_timeout(60, async {
        let mut h = Harness::new("qvalidate").await;
        let t = h.t("dup");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint, title text, n bigint);
             INSERT INTO public.{t} VALUES (1, 'a', 1), (1, 'b', 2), (NULL, 'c', 3);"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let entry = |query: &str, cursor: &str| {
            format!(
                "  - query: {query}\n    key: [id]\n    list: L {}\n    fields: {{ title: Title }}\n    poll: {{ every: 5s, cursor: {{ column: {cursor}, kind: incrementing }} }}",
                h.name
            )
        };
        let file = h.pipeline(
            &h.embedded_log(),
            &entry(&format!("SELECT id, title, n FROM public.{t}"), "missing"),
        );
        let (code, out, err) = h.cli(&["validate", "--db", file.to_str().unwrap()]).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("cursor column \"missing\" is not a column of the query"), "{err}");

        // The cursor is fine now: the key's NULL and repeated values are what is wrong.
        let file = h.pipeline(
            &h.embedded_log(),
            &entry(&format!("SELECT id, title, n FROM public.{t}"), "n"),
        );
        let (code, out, err) = h.cli(&["validate", "--db", file.to_str().unwrap()]).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("1 row(s) of the query of list"), "{err}");
        assert!(err.contains("have a NULL key column (id)"), "{err}");
        assert!(err.contains("1 key value(s) of the query of list"), "{err}");

        // A query that does not run says why.
        let file = h.pipeline(&h.embedded_log(), &entry("SELECT nope FROM public.nothing_here", "n"));
        let (code, out, err) = h.cli(&["validate", "--db", file.to_str().unwrap()]).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("does not run: relation \"public.nothing_here\" does not exist"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_replicates_its_tables_and_polls_its_queries_side_by_side() {
    hard_timeout(120, async {
        let mut h = Harness::new("qmixed").await;
        let (t, list) = h.titled_table(20).await;
        let top = format!("Top {}", h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}\n  - query: SELECT id, upper(title) AS title FROM public.{t} WHERE id <= 5\n    key: [id]\n    list: {top}\n    fields: {{ title: Title }}\n    poll: {{ every: 1s, full: true }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        h.start(&file);
        let titles = |list: String| {
            let h = &h;
            async move {
                let mut v: Vec<(i64, String)> = rows(h, &list)
                    .await
                    .into_iter()
                    .map(|(k, t, _)| (k, t))
                    .collect();
                v.sort();
                v
            }
        };
        h.wait_for("the table's 20 rows and the query's 5", || async {
            titles(list.clone()).await.len() == 20 && titles(top.clone()).await.len() == 5
        })
        .await;
        h.sql(&format!("UPDATE public.{t} SET title = 'new' WHERE id = 2; DELETE FROM public.{t} WHERE id = 4"))
            .await;
        h.wait_for("the update and the delete in both lists", || async {
            let (all, top) = (titles(list.clone()).await, titles(top.clone()).await);
            all.len() == 19
                && all.contains(&(2, "new".into()))
                && top == [(1, "ROW 1".into()), (2, "NEW".into()), (3, "ROW 3".into()), (5, "ROW 5".into())]
        })
        .await;
        // The drift check reads the query like a table: clean, then the item a person deleted.
        let clean = h.post_drift("drift").await;
        assert_eq!(clean["differences"], serde_json::json!([]), "{clean:#}");
        let (id, item) = (h.list_id(&top).await, h.item_id(&top, "3").await);
        h.person.delete_item(&h.site, &id, &item, None).await.unwrap();
        let report = h.post_drift("drift").await;
        let found: Vec<(&str, &str, &str)> = report["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let s = |k: &str| d[k].as_str().unwrap_or("");
                (s("class"), s("table"), s("key"))
            })
            .collect();
        let table = format!("query.top_{}", h.name);
        assert_eq!(found, [("missing", table.as_str(), "3")], "{report:#}");
        // Healing re-reads the query (a full read emitting every row): the item is back.
        let healed = h.post_drift("drift/heal").await;
        assert_eq!(healed["healed"]["resnapshotted"], serde_json::json!([table]), "{healed:#}");
        h.wait_for("the healed item", || async {
            titles(top.clone()).await.contains(&(3, "ROW 3".into()))
        })
        .await;
        // Re-snapshots of either kind of source reach the source that reads it.
        let path = file.to_str().unwrap();
        for table in [format!("public.{t}"), table.clone()] {
            let (code, out, err) = h.cli(&["snapshot", path, "--table", &table, "--wait"]).await;
            assert_eq!(code, 0, "{table}: {out}{err}");
        }
        h.stop().await;
    })
    .await;
}

/// Counts what the poller appends, by op code.
#[derive(Clone, Default)]
struct Counting(std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>>);

impl syncbridge::capture::EventSink for Counting {
    async fn append(
        &mut self,
        events: &[syncbridge::event::change::ChangeEvent],
    ) -> Result<(), syncbridge::capture::SinkError> {
        let mut m = self.0.lock().unwrap();
        for e in events {
            *m.entry(e.op.code()).or_default() += 1;
        }
        Ok(())
    }
}

impl Counting {
    fn get(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.0.lock().unwrap().clone()
    }
}

/// The poller alone on a 100,000-row view: the first full read emits every row, later full
/// reads of the unchanged view emit nothing, a changed base row emits exactly its event. Prints
/// how long the first read took (no assertion on time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_100k_row_view_emits_nothing_after_its_first_read() {
    hard_timeout(240, async {
        let mut h = Harness::new("q100k").await;
        let (t, view) = (h.t("big"), h.t("bigv"));
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, name text NOT NULL, n int NOT NULL);
             INSERT INTO public.{t} SELECT g, 'row ' || g, g % 97 FROM generate_series(1, 100000) g;
             CREATE VIEW public.{view} AS SELECT id, name, n * 2 AS n2 FROM public.{t};"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let _views = Views(vec![format!("public.{view}")]);
        let sync = format!(
            "  - query: SELECT * FROM public.{view}\n    key: [id]\n    list: Big\n    fields: {{ name: Title }}\n    poll: {{ every: 1s, full: true }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let p = syncbridge::config::load_files(&[file]).unwrap().remove(0);
        let cfg = syncbridge::capture::query::QueryPollConfig::new(
            &p.name,
            &p.source,
            &p.sync,
            h.dir.path().join("state"),
        );
        let sink = Counting::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let started = std::time::Instant::now();
        let task = tokio::spawn(syncbridge::capture::query::run(
            cfg,
            sink.clone(),
            None,
            stop.clone(),
        ));
        h.wait_for_secs("the first read's 100,000 events", 120, || async {
            sink.get().values().sum::<usize>() >= 100_000
        })
        .await;
        println!(
            "first full read of 100,000 view rows, emitted: {:.2} s",
            started.elapsed().as_secs_f64()
        );
        // A few more full reads (every second) of the unchanged view, then one change.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        assert_eq!(sink.get().values().sum::<usize>(), 100_000);
        h.sql(&format!("UPDATE public.{t} SET n = n + 1 WHERE id = 777"))
            .await;
        h.wait_for("the changed row's event", || async {
            sink.get().get("u").copied().unwrap_or(0) >= 1
        })
        .await;
        let mut want = std::collections::BTreeMap::new();
        want.insert("c", 100_000);
        want.insert("u", 1);
        assert_eq!(sink.get(), want);
        stop.cancel();
        task.await.unwrap().unwrap();
    })
    .await;
}
