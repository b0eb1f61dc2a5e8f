//! Schema changes while streaming (issue 21, item 3), on the real stack (PostgreSQL, the embedded
//! log, the `syncbridge run` binary) and the emulator, each with a write workload running:
//! - a mapped column dropped, or renamed: that table pauses with an operator error naming the
//!   column and the mapping's line (`/ready`, `syncbridge_table_paused`, the log), no item loses
//!   a value, the other table keeps flowing; after the mapping is fixed and reloaded (SIGHUP) the
//!   table resumes and the list equals the table, one item per row;
//! - a type change the field still holds: nothing pauses; one it cannot hold: pauses the same way;
//! - an unmapped column added: ignored; mapped later: its list column is provisioned on reload and
//!   the existing items get its values (the table is read again);
//! - a new table added to the mapping (and so to the publication): snapshotted, then streamed.
//!
//! Needs `DATABASE_URL` (superuser). A test FAILS (never skips) when it is unset.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

/// Rows of the watched table.
const ROWS: i64 = 20;

/// The watched table `<name>_t (id, title, price numeric(10,2), qty int)` and the other table
/// `<name>_o (id, title)`, both dropped with the harness; returns (watched, its list, other, its
/// list).
async fn tables(h: &mut Harness) -> (String, String, String, String) {
    let (t, o) = (h.t("t"), h.t("o"));
    h.sql(&format!(
        "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, price numeric(10,2), qty int NOT NULL);
         ALTER TABLE public.{t} REPLICA IDENTITY FULL;
         INSERT INTO public.{t} SELECT g, 'row ' || g, g * 1.5, 0 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE public.{o} (id bigint PRIMARY KEY, title text NOT NULL);"
    ))
    .await;
    h.tables.push(format!("public.{t}"));
    h.tables.push(format!("public.{o}"));
    (
        t.clone(),
        format!("T {}", h.name),
        o,
        format!("O {}", h.name),
    )
}

/// The pipeline file: `fields` of the watched table (YAML flow body), the other table by title.
fn pipeline(
    h: &Harness,
    t: &str,
    list: &str,
    o: &str,
    olist: &str,
    fields: &str,
) -> std::path::PathBuf {
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields: {{ {fields} }}\n    pull: {{ enabled: false }}\n  - table: public.{o}\n    list: {olist}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
    );
    h.pipeline(&h.embedded_log(), &sync)
}

const ALL: &str =
    "title: Title, price: { field: Price, type: number }, qty: { field: Qty, type: number }";

/// Updates the watched table's rows in turn (`SET <set>`) and inserts into the other table until
/// stopped; `set` is read each time (a rename or a type change changes it).
struct Workload {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Workload {
    fn start(t: &str, o: &str, set: Arc<std::sync::Mutex<String>>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let (t, o, flag) = (t.to_string(), o.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let (db, conn) =
                tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
                    .await
                    .expect("workload connects");
            tokio::spawn(conn);
            let mut i: i64 = 0;
            while !flag.load(Ordering::Relaxed) {
                let set = set.lock().unwrap().clone();
                let id = i % ROWS + 1;
                // A change between reading `set` and the UPDATE fails once: try the next.
                let _ = db
                    .batch_execute(&format!(
                        "UPDATE public.{t} SET {set} WHERE id = {id};
                         INSERT INTO public.{o} VALUES ({}, 'other {i}') ON CONFLICT DO NOTHING;",
                        i + 1
                    ))
                    .await;
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(15)).await;
            }
        });
        Workload { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

/// Rows of `sql` (id, title, price as text or NULL, qty as text).
async fn rows(h: &Harness, sql: &str) -> Vec<(String, String, Option<f64>, f64)> {
    h.db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let price: Option<String> = r.get(2);
            let qty: String = r.get(3);
            (
                r.get::<_, i64>(0).to_string(),
                r.get(1),
                price.map(|p| p.parse().unwrap()),
                qty.parse().unwrap(),
            )
        })
        .collect()
}

/// SyncKey → item fields; panics on a duplicated SyncKey.
async fn items(
    h: &Harness,
    list: &str,
) -> std::collections::BTreeMap<String, serde_json::Map<String, Value>> {
    let mut out = std::collections::BTreeMap::new();
    for (k, f) in h.items(list).await {
        assert!(out.insert(k.clone(), f).is_none(), "item {k} duplicated");
    }
    out
}

/// Whether every row of `expected` is an item with its Title, Qty and Price (the price the row
/// had when `Price` is no longer mapped).
async fn list_equals(
    h: &Harness,
    list: &str,
    expected: &[(String, String, Option<f64>, f64)],
) -> bool {
    let items = items(h, list).await;
    items.len() == expected.len()
        && expected.iter().all(|(id, title, price, qty)| {
            items.get(id).is_some_and(|f| {
                f.get("Title") == Some(&json!(title))
                    && f.get("Qty").and_then(Value::as_f64) == Some(*qty)
                    && f.get("Price").and_then(Value::as_f64) == *price
            })
        })
}

/// Every item of `list` still has a Price (nothing was pushed empty).
async fn every_price_kept(h: &Harness, list: &str) {
    let items = items(h, list).await;
    assert_eq!(items.len() as i64, ROWS);
    for (k, f) in &items {
        let want = k.parse::<f64>().unwrap() * 1.5;
        assert_eq!(
            f.get("Price").and_then(Value::as_f64),
            Some(want),
            "item {k}: {f:?}"
        );
    }
}

/// The `/ready` reason of the watched table once it is paused.
async fn wait_paused(h: &Harness, t: &str) -> String {
    let stage = format!("{}/table:public.{t}", h.name);
    h.wait_for("the table's pause in /ready", || async {
        let (status, body) = h.ready().await;
        status == 503 && body["reasons"][&stage].is_string()
    })
    .await;
    let (_, body) = h.ready().await;
    assert_eq!(body["stages"][&stage], json!(false), "{body:#}");
    let paused = h
        .metric(
            "syncbridge_table_paused",
            &[&format!("table=\"public.{t}\"")],
        )
        .await;
    assert_eq!(paused, 1.0, "gauge while paused");
    body["reasons"][&stage].as_str().unwrap().to_string()
}

/// `file:line:col` of the watched table's mapping of `column` in the pipeline file.
fn mapping_line(file: &std::path::Path, column: &str) -> String {
    let yaml = std::fs::read_to_string(file).unwrap();
    let (i, line) = yaml
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(&format!("{column}: {{ field")))
        .unwrap();
    let col = line.find(&format!("{column}: {{ field")).unwrap() + 1;
    format!("{}:{}:{col}", file.display(), i + 1)
}

/// The other table's rows all reached its list (it keeps flowing while the watched one waits).
async fn other_flows(h: &Harness, o: &str, olist: &str) {
    let count: i64 =
        h.db.query_one(&format!("SELECT count(*) FROM public.{o}"), &[])
            .await
            .unwrap()
            .get(0);
    h.wait_for("the other table flowing", || async {
        h.items(olist).await.len() as i64 >= count
    })
    .await;
}

/// After the fix: stage and gauge cleared, and the list equals `final_sql`'s rows.
async fn wait_resumed(h: &Harness, t: &str, list: &str, final_sql: &str) {
    let stage = format!("{}/table:public.{t}", h.name);
    let expected = rows(h, final_sql).await;
    h.wait_for("the table resumed and caught up", || async {
        let (_, body) = h.ready().await;
        body["stages"].get(&stage).is_none() && list_equals(h, list, &expected).await
    })
    .await;
    let paused = h
        .metric(
            "syncbridge_table_paused",
            &[&format!("table=\"public.{t}\"")],
        )
        .await;
    assert_eq!(paused, 0.0, "gauge after the resume");
    assert_eq!(h.ready().await.0, 200, "{:#}", h.ready().await.1);
}

/// A pipeline streaming both tables with every field mapped, after its first sync, with a write
/// workload running.
struct Streaming {
    h: Harness,
    t: String,
    list: String,
    o: String,
    olist: String,
    file: std::path::PathBuf,
    /// The workload's `SET` clause (follows the column's changes).
    set: Arc<std::sync::Mutex<String>>,
    work: Option<Workload>,
}

async fn streaming(tag: &str) -> Streaming {
    let mut h = Harness::new(tag).await;
    let (t, list, o, olist) = tables(&mut h).await;
    let file = pipeline(&h, &t, &list, &o, &olist, ALL);
    h.start(&file);
    h.wait_for("the first sync", || async {
        items(&h, &list).await.len() as i64 == ROWS
    })
    .await;
    let set = Arc::new(std::sync::Mutex::new("qty = qty + 1".to_string()));
    let work = Some(Workload::start(&t, &o, set.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    Streaming {
        h,
        t,
        list,
        o,
        olist,
        file,
        set,
        work,
    }
}

impl Streaming {
    fn set(&self, clause: &str) {
        *self.set.lock().unwrap() = clause.into();
    }

    async fn stop_work(&mut self) {
        if let Some(w) = self.work.take() {
            w.stop().await;
        }
    }

    fn start_work(&mut self) {
        self.work = Some(Workload::start(&self.t, &self.o, self.set.clone()));
    }

    /// Maps the watched table with `fields`, reloads, lets the workload run on a little, stops it.
    async fn reload_with(&mut self, fields: &str) {
        pipeline(&self.h, &self.t, &self.list, &self.o, &self.olist, fields);
        self.h.sighup();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        self.stop_work().await;
    }

    /// Waits until the watched list equals the rows of `sql` (see [`rows`]).
    async fn wait_list_equals(&self, what: &str, sql: &str) {
        let expected = rows(&self.h, sql).await;
        self.h
            .wait_for(what, || async {
                list_equals(&self.h, &self.list, &expected).await
            })
            .await;
    }

    /// The `/ready` reason of the watched table's pause, checked to name `column`'s mapping.
    async fn paused_on(&self, column: &str) -> String {
        let reason = wait_paused(&self.h, &self.t).await;
        assert!(reason.contains(&format!("\"{column}\"")), "{reason}");
        assert!(
            reason.contains(&format!("table public.{}", self.t)),
            "{reason}"
        );
        assert!(
            reason.contains(&mapping_line(&self.file, column)),
            "{reason}"
        );
        other_flows(&self.h, &self.o, &self.olist).await;
        every_price_kept(&self.h, &self.list).await;
        reason
    }
}

/// (id, text) pairs of `sql`.
async fn text_pairs(h: &Harness, sql: &str) -> Vec<(String, String)> {
    h.db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `list` has exactly the items of `want` (SyncKey, value of `field`).
async fn wait_field(h: &Harness, list: &str, field: &str, want: &[(String, String)]) {
    h.wait_for(&format!("{field} on every item of {list}"), || async {
        let items = items(h, list).await;
        items.len() == want.len()
            && want
                .iter()
                .all(|(id, v)| items.get(id).and_then(|f| f.get(field)) == Some(&json!(v)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_mapped_column_pauses_its_table_until_the_mapping_is_fixed() {
    hard_timeout(240, async {
        let mut s = streaming("scdrop").await;
        let t = s.t.clone();
        // An unmapped column added while streaming changes nothing.
        s.h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN extra text DEFAULT 'x'"
        ))
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        s.h.sql(&format!("ALTER TABLE public.{t} DROP COLUMN price"))
            .await;
        let reason = s.paused_on("price").await;
        assert!(reason.contains("dropped or renamed"), "{reason}");
        assert!(
            !reason.contains("extra"),
            "the unmapped column is ignored: {reason}"
        );
        let log = s.h.run_log();
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains("paused") && l.contains("\"price\"")),
            "{log}"
        );

        // The fix: `price` no longer mapped. The items keep the prices they had.
        s.reload_with("title: Title, qty: { field: Qty, type: number }")
            .await;
        let final_rows =
            format!("SELECT id, title, (id * 1.5)::text, qty::text FROM public.{t} ORDER BY id");
        wait_resumed(&s.h, &t, &s.list, &final_rows).await;
        other_flows(&s.h, &s.o, &s.olist).await;
        s.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_mapped_column_pauses_its_table_until_the_mapping_follows() {
    hard_timeout(240, async {
        let mut s = streaming("scren").await;
        let t = s.t.clone();
        s.h.sql(&format!("ALTER TABLE public.{t} RENAME COLUMN qty TO quantity"))
            .await;
        s.set("quantity = quantity + 1");
        let reason = s.paused_on("qty").await;
        assert!(reason.contains("dropped or renamed"), "{reason}");

        s.reload_with(
            "title: Title, price: { field: Price, type: number }, quantity: { field: Qty, type: number }",
        )
        .await;
        let final_rows =
            format!("SELECT id, title, price::text, quantity::text FROM public.{t} ORDER BY id");
        wait_resumed(&s.h, &t, &s.list, &final_rows).await;
        s.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_the_field_holds_continues_and_one_it_cannot_hold_pauses() {
    hard_timeout(240, async {
        let mut s = streaming("sctype").await;
        let t = s.t.clone();
        let all_rows = format!("SELECT id, title, price::text, qty::text FROM public.{t} ORDER BY id");
        // int → bigint: a number field still holds it; the workload's updates keep arriving.
        s.h.sql(&format!("ALTER TABLE public.{t} ALTER COLUMN qty TYPE bigint"))
            .await;
        s.stop_work().await;
        s.wait_list_equals("updates after the bigint change", &all_rows)
            .await;
        // bigint → text: each value is parsed, as text columns in number fields always were.
        s.h.sql(&format!(
            "ALTER TABLE public.{t} ALTER COLUMN qty TYPE text;
             UPDATE public.{t} SET qty = (qty::int + 7)::text WHERE id <= 5;"
        ))
        .await;
        s.wait_list_equals("updates after the text change", &all_rows)
            .await;
        let stage = format!("{}/table:public.{t}", s.h.name);
        assert!(s.h.ready().await.1["stages"].get(&stage).is_none());
        let pauses = s
            .h
            .metric("syncbridge_table_pauses_total", &[&format!("table=\"public.{t}\"")])
            .await;
        assert_eq!(pauses, 0.0);

        // text → boolean: a number field cannot take booleans: pauses, naming the type.
        s.start_work();
        s.set("qty = NOT qty");
        s.h.sql(&format!(
            "ALTER TABLE public.{t} ALTER COLUMN qty TYPE boolean USING qty::int % 2 = 0"
        ))
        .await;
        let reason = s.paused_on("qty").await;
        assert!(reason.contains("\"qty\" is now boolean"), "{reason}");

        // The fix: a text field for the column (provisioned on reload, the table read again).
        // Qty keeps the numbers it had.
        s.reload_with(
            "title: Title, price: { field: Price, type: number }, qty: { field: QtyText, type: text }",
        )
        .await;
        let want = text_pairs(&s.h, &format!("SELECT id::text, qty::text FROM public.{t} ORDER BY id")).await;
        wait_field(&s.h, &s.list, "QtyText", &want).await;
        assert!(s.h.ready().await.1["stages"].get(&stage).is_none());
        for (k, f) in items(&s.h, &s.list).await {
            assert!(f.get("Qty").and_then(Value::as_f64).is_some(), "item {k} kept Qty: {f:?}");
        }
        every_price_kept(&s.h, &s.list).await;
        s.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_then_mapped_is_provisioned_and_back_filled_on_reload() {
    hard_timeout(240, async {
        let mut s = streaming("scadd").await;
        let t = s.t.clone();
        s.h.sql(&format!(
            "ALTER TABLE public.{t} ADD COLUMN note text; UPDATE public.{t} SET note = 'note ' || id;"
        ))
        .await;
        s.set("qty = qty + 1, note = 'note ' || id || ' v' || (qty + 1)");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(s.h.ready().await.0, 200, "an unmapped column pauses nothing");

        s.reload_with(&format!("{ALL}, note: Note")).await;
        let all_rows = format!("SELECT id, title, price::text, qty::text FROM public.{t} ORDER BY id");
        s.wait_list_equals("the list after the reload", &all_rows).await;
        let notes = text_pairs(&s.h, &format!("SELECT id::text, note FROM public.{t} ORDER BY id")).await;
        wait_field(&s.h, &s.list, "Note", &notes).await;
        other_flows(&s.h, &s.o, &s.olist).await;
        s.h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_mapping_is_snapshotted_then_streamed() {
    hard_timeout(240, async {
        let mut s = streaming("scnew").await;
        let (t, o) = (s.t.clone(), s.o.clone());
        let n = s.h.t("n");
        s.h.sql(&format!(
            "CREATE TABLE public.{n} (id bigint PRIMARY KEY, title text NOT NULL);
             INSERT INTO public.{n} SELECT g, 'new ' || g FROM generate_series(1, 50) g;"
        ))
        .await;
        s.h.tables.push(format!("public.{n}"));
        let nlist = format!("N {}", s.h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {}\n    fields: {{ {ALL} }}\n    pull: {{ enabled: false }}\n  - table: public.{o}\n    list: {}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}\n  - table: public.{n}\n    list: {nlist}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}",
            s.list, s.olist
        );
        s.h.pipeline(&s.h.embedded_log(), &sync);
        s.h.sighup();
        // Streamed after the snapshot: rows written while and after it is read.
        for i in 51..=80 {
            s.h.sql(&format!(
                "INSERT INTO public.{n} VALUES ({i}, 'new {i}'); UPDATE public.{n} SET title = 'changed {i}' WHERE id = {}",
                i - 50
            ))
            .await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        s.stop_work().await;
        let want = text_pairs(&s.h, &format!("SELECT id::text, title FROM public.{n} ORDER BY id")).await;
        wait_field(&s.h, &nlist, "Title", &want).await;
        let all_rows = format!("SELECT id, title, price::text, qty::text FROM public.{t} ORDER BY id");
        s.wait_list_equals("the watched table kept flowing", &all_rows).await;
        other_flows(&s.h, &s.o, &s.olist).await;
        s.h.stop().await;
    })
    .await;
}
