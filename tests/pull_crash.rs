//! Crash acceptance test of two-way sync (the push path and the return path in one task) against
//! real PostgreSQL, the real binary (`syncbridge run`) and an in-process Graph emulator:
//!
//! "kill -9 at ≥ 20 random points during a two-way workload; final state equal on both sides, no
//! duplicated rows or items, every conflict recorded once."
//!
//! A table `(id bigint identity pk, title, qty, status, gone)` is synced two-way with one list
//! (`conflict: source_wins`, `pull: { interval_ms: 200, on_delete: delete }`, embedded log). While
//! `syncbridge run` is started and killed (SIGKILL after 0.3–2.5 s, or a self-abort at an armed
//! `SYNCBRIDGE_FAILPOINTS` crash point) over and over, two writers run concurrently:
//!
//! - a **database writer** (its own PostgreSQL connection): inserts, updates and deletes of the
//!   rows it owns, plus updates of a small *shared* subset;
//! - a **person** (the emulator's user client, like edits in the browser): creates items, edits
//!   Title/Qty of the items it owns, deletes them, plus edits of the shared subset.
//!
//! Only the shared rows are changed on both sides, so conflicts happen there only; every value
//! either side writes to Title/Qty is unique (a per-writer sequence number), so one conflict
//! decision is identified by (key, field, source value, target value) (for Status, which has two
//! values, also by the list version's `target_modified_ms`). After the loop both writers stop, a
//! clean run converges and is stopped with SIGTERM; then asserted:
//!
//! - every row has exactly one item carrying its SyncKey, with equal Title/Qty/Status; every item
//!   has a SyncKey and a row; no SyncKey twice;
//! - the rows only the database writer changed hold its last values (the return path wrote
//!   nothing else into them), deleted ones are gone; the items only the person changed hold its
//!   last values, and each live person-created/owned item's (unique) title is on exactly one row,
//!   the one its SyncKey names; items the person deleted are gone from both sides;
//! - the conflicts topic has no two records for the same (key, field, source, target) — a
//!   duplicate means a decision replayed after a crash was recorded again. Reported, not
//!   asserted: one list version decided more than once against different source values,
//!   "conflicts" whose source and target values are equal, and ones whose list-side value is a
//!   database value SyncBridge wrote itself.
//!
//! Needs `DATABASE_URL` (`eval "$(ops/stack env)"`); fails (never skips) without it. A failing run
//! keeps its temp dir (logs of every run: `run-<n>.log`, the embedded log) and prints its path.
//! `PULL_CRASH_SEED=<n>` reproduces the run times, failpoint choices and both writers' choices
//! (not the interleaving with the process).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use syncbridge::graph::GraphClient;
use syncbridge::log::{AnyLog, EmbeddedLogConfig, EventLog, LogConfig, LogConsumer};
use syncbridge::pull::ConflictRecord;
use tokio_postgres::NoTls;

mod common;
#[path = "common/run.rs"]
mod run;
use run::{Run, tail};
#[path = "common/harness.rs"]
mod harness;
use harness::{BIN, Harness, hard_timeout};

/// SIGABRT: what `std::process::abort` (a failpoint) ends the process with.
const SIGABRT: i32 = 6;
/// The children's log filter (the binary's default), so a caller's `RUST_LOG` cannot hide lines.
const CHILD_LOG_FILTER: &str =
    "info,sled=warn,rdkafka=warn,hyper=warn,reqwest=warn,pg_walstream=warn";
const STATUSES: [&str; 2] = ["open", "done"];
/// Initial rows: 1..=DB_ROWS the database writer's, then the person's, then the shared ones.
const DB_ROWS: i64 = 12;
const PERSON_ROWS: i64 = 12;
const SHARED_ROWS: i64 = 6;
const INITIAL_ROWS: i64 = DB_ROWS + PERSON_ROWS + SHARED_ROWS;

// ---------------------------------------------------------------------------------------------
// Process handling (as in tests/push_crash.rs)

// ---------------------------------------------------------------------------------------------
// Fixture

/// A row's mapped columns.
#[derive(Debug, Clone, PartialEq)]
struct RowV {
    title: String,
    qty: Option<i32>,
    status: String,
}

/// An item's mapped fields.
#[derive(Debug, Clone, PartialEq)]
struct ItemV {
    id: String,
    sync_key: Option<String>,
    title: Option<String>,
    qty: Option<f64>,
    status: Option<String>,
}

struct Fixture {
    h: Harness,
    table: String,
    list: String,
    file: PathBuf,
    runs: usize,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(fresh) = tempfile::tempdir()
        {
            // Keep the logs of a failed run (the harness would delete its dir).
            let d = std::mem::replace(&mut self.h.dir, fresh);
            eprintln!("{}: run logs kept in {}", self.h.name, d.keep().display());
        }
    }
}

impl Fixture {
    async fn new() -> Fixture {
        let mut h = Harness::new("pullcrash").await;
        let table = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{table} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
             title text NOT NULL, qty int, status text NOT NULL DEFAULT 'open', \
             gone boolean NOT NULL DEFAULT false);
             INSERT INTO public.{table} (title, qty) \
             SELECT 'row ' || g, g FROM generate_series(1, {INITIAL_ROWS}) g;"
        ))
        .await;
        h.tables.push(format!("public.{table}"));
        let list = format!("T {}", h.name);
        let sync = format!(
            "  - table: public.{table}\n    list: {list}\n    fields:\n      title: Title\n      \
             qty: {{ field: Qty, type: number }}\n      status: {{ field: Status, type: choice, \
             choices: [open, done] }}\n    conflict: source_wins\n    pull: {{ enabled: true, \
             interval_ms: 200, on_delete: delete }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        Fixture {
            h,
            table,
            list,
            file,
            runs: 0,
        }
    }

    fn root(&self) -> PathBuf {
        self.h.dir.path().to_path_buf()
    }

    /// Starts `syncbridge run` (output to `run-<n>.log`), with `failpoints` armed if given.
    fn spawn(&mut self, failpoints: Option<&str>) -> Run {
        let log = self.root().join(format!("run-{}.log", self.runs));
        self.runs += 1;
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // `ulimit -c 0`: a failpoint aborts, and no machine should fill up with core files.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"ulimit -c 0; exec "$0" run "$1""#, BIN])
            .arg(&self.file)
            .current_dir(self.root())
            .env("RUST_LOG", CHILD_LOG_FILTER)
            .env("SYNCBRIDGE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        match failpoints {
            Some(f) => cmd.env("SYNCBRIDGE_FAILPOINTS", f),
            None => cmd.env_remove("SYNCBRIDGE_FAILPOINTS"),
        };
        Run {
            child: Some(cmd.spawn().expect("spawn syncbridge run")),
            log,
        }
    }

    async fn rows(&self) -> BTreeMap<i64, RowV> {
        let rows = self
            .h
            .db
            .query(
                &format!("SELECT id, title, qty, status FROM public.{}", self.table),
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    RowV {
                        title: r.get(1),
                        qty: r.get(2),
                        status: r.get(3),
                    },
                )
            })
            .collect()
    }

    /// A first run until the list is provisioned and holds the initial rows, stopped cleanly.
    async fn warm_up(&mut self) {
        let mut run = self.spawn(None);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            run.assert_alive("warm-up");
            let items = self.items().await;
            if items.len() as i64 == INITIAL_ROWS && items.iter().all(|i| i.sync_key.is_some()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the initial rows did not reach the list within 40 s:\n{}",
                tail(&run.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = run.terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "warm-up run: {status}\n{}",
            tail(&run.log)
        );
    }

    /// A run with `failpoint` armed at probability 1, which must abort itself there.
    async fn crash_at(&mut self, failpoint: &str) {
        let mut run = self.spawn(Some(&format!("{failpoint}=1")));
        let status = run.wait_exit(Duration::from_secs(60)).await;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(SIGABRT),
            "no abort at {failpoint} within 60 s: {status:?}\n{}",
            tail(&run.log)
        );
    }

    /// A clean run until both sides are equal and settled, stopped with SIGTERM; its log tail.
    async fn settle(&mut self) -> String {
        let mut run = self.spawn(None);
        let converged = self.converge(&mut run, 60).await;
        let status = run.terminate().await;
        if let Err(problems) = converged {
            panic!("did not converge: {problems:?}\n{}", tail(&run.log));
        }
        assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM: {status}\n{}",
            tail(&run.log)
        );
        tail(&run.log)
    }

    /// Every item of the list, sorted by item id.
    async fn items(&self) -> Vec<ItemV> {
        let mut out: Vec<ItemV> = self
            .h
            .items(&self.list)
            .await
            .into_iter()
            .map(|(sk, f)| {
                let s = |k: &str| f.get(k).and_then(Value::as_str).map(str::to_owned);
                ItemV {
                    id: s("id").unwrap_or_default(),
                    sync_key: Some(sk).filter(|k| !k.is_empty()),
                    title: s("Title"),
                    qty: f.get("Qty").and_then(Value::as_f64),
                    status: s("Status"),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Everything that differs between the table and the list (empty = equal).
    fn discrepancies(rows: &BTreeMap<i64, RowV>, items: &[ItemV]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut by_key: BTreeMap<&str, Vec<&ItemV>> = BTreeMap::new();
        for i in items {
            match &i.sync_key {
                Some(k) => by_key.entry(k).or_default().push(i),
                None => problems.push(format!("item without SyncKey: {i:?}")),
            }
        }
        for (k, its) in &by_key {
            if its.len() > 1 {
                problems.push(format!("duplicate SyncKey {k}: {its:?}"));
                continue;
            }
            let Some(r) = k.parse::<i64>().ok().and_then(|id| rows.get(&id)) else {
                problems.push(format!("item for a deleted/unknown row {k}: {its:?}"));
                continue;
            };
            let i = its[0];
            let want = (
                Some(r.title.as_str()),
                r.qty.map(f64::from),
                Some(r.status.as_str()),
            );
            let got = (i.title.as_deref(), i.qty, i.status.as_deref());
            if want != got {
                problems.push(format!(
                    "row {k}: (Title, Qty, Status) want {want:?}, item {} has {got:?}",
                    i.id
                ));
            }
        }
        for (id, r) in rows {
            if !by_key.contains_key(id.to_string().as_str()) {
                problems.push(format!("row {id} {r:?} has no item"));
            }
        }
        problems
    }

    /// Polls until the list equals the table and both stayed the same for 2 s (so no list change
    /// or push still in flight changes them), for up to `secs`; the last discrepancies otherwise.
    async fn converge(&self, run: &mut Run, secs: u64) -> Result<(), Vec<String>> {
        type Snapshot = (BTreeMap<i64, RowV>, Vec<ItemV>);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut stable: Option<(Instant, Snapshot)> = None;
        loop {
            run.assert_alive("waiting for both sides to converge");
            let rows = self.rows().await;
            let items = self.items().await;
            let problems = Self::discrepancies(&rows, &items);
            if problems.is_empty() {
                let snap = (rows, items);
                match &stable {
                    Some((since, s)) if *s == snap => {
                        if since.elapsed() >= Duration::from_secs(2) {
                            return Ok(());
                        }
                    }
                    _ => stable = Some((Instant::now(), snap)),
                }
            } else {
                stable = None;
                if Instant::now() > deadline {
                    return Err(problems);
                }
            }
            if Instant::now() > deadline + Duration::from_secs(5) {
                return Err(vec!["equal but never stable for 2 s".into()]);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every record of the conflicts topic (read from the embedded log; the process must have
    /// stopped). As `conflicts()` in tests/pull.rs.
    fn conflicts(&self) -> Vec<ConflictRecord> {
        let rt = tokio::runtime::Handle::current();
        let dir = self.root().join("log");
        let name = self.h.name.clone();
        std::thread::spawn(move || {
            rt.block_on(async move {
                let log = AnyLog::open(LogConfig::Embedded(EmbeddedLogConfig::new(dir))).unwrap();
                let topic = syncbridge::pull::conflicts_topic("syncbridge", &name);
                let end = log.end_offsets(&topic).await.unwrap()[0];
                let stop = syncbridge::log::CancellationToken::new();
                let mut c = log
                    .consumer("test-reader", &[topic], stop.clone())
                    .await
                    .unwrap();
                let mut out = Vec::new();
                while (out.len() as i64) < end {
                    let r = c.recv().await.unwrap().unwrap();
                    out.push(serde_json::from_slice(r.record.value.as_deref().unwrap()).unwrap());
                }
                stop.cancel();
                out
            })
        })
        .join()
        .unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The two writers

#[derive(Debug, Default)]
struct DbStats {
    transactions: u64,
    inserts: u64,
    updates: u64,
    deletes: u64,
    shared_updates: u64,
}

/// What the database writer leaves behind: its stats, the last values of the rows it owns, the
/// rows it deleted.
#[derive(Debug, Default)]
struct DbOut {
    stats: DbStats,
    owned: BTreeMap<i64, RowV>,
    deleted: BTreeSet<i64>,
}

/// Commits one change at a time (every 40–200 ms) until `stop` (at most 600): inserts (new rows
/// it owns), updates of its rows' title/qty/status, deletes of its rows, and title/qty updates of
/// the shared rows. Every written value is unique (`seq`).
async fn db_writer(table: String, seed: u64, shared: Vec<i64>, stop: Arc<AtomicBool>) -> DbOut {
    const MAX_TRANSACTIONS: u64 = 600;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x00db_0db0);
    let (c, conn) = tokio_postgres::connect(&common::database_url(), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut out = DbOut::default();
    for id in 1..=DB_ROWS {
        out.owned.insert(
            id,
            RowV {
                title: format!("row {id}"),
                qty: Some(id as i32),
                status: "open".into(),
            },
        );
    }
    let mut seq: i32 = 0;
    while !stop.load(Ordering::SeqCst) && out.stats.transactions < MAX_TRANSACTIONS {
        out.stats.transactions += 1;
        seq += 1;
        let roll = rng.random_range(0..100);
        let status = STATUSES[rng.random_range(0..STATUSES.len())];
        let ids: Vec<i64> = out.owned.keys().copied().collect();
        if ids.len() < 6 || (roll < 18 && ids.len() < 25) {
            let r = RowV {
                title: format!("db new {seq}"),
                qty: Some(1000 + seq),
                status: status.into(),
            };
            let id: i64 = c
                .query_one(
                    &format!(
                        "INSERT INTO public.{table} (title, qty, status) VALUES ($1, $2, $3) \
                         RETURNING id"
                    ),
                    &[&r.title, &r.qty, &r.status],
                )
                .await
                .unwrap()
                .get(0);
            out.owned.insert(id, r);
            out.stats.inserts += 1;
        } else if roll < 50 {
            let id = ids[rng.random_range(0..ids.len())];
            let r = out.owned.get_mut(&id).unwrap();
            match rng.random_range(0..3) {
                0 => r.title = format!("db upd {seq}"),
                1 => r.qty = Some(1000 + seq),
                _ => {
                    r.title = format!("db upd {seq}");
                    r.qty = Some(1000 + seq);
                    r.status = status.into();
                }
            }
            c.execute(
                &format!(
                    "UPDATE public.{table} SET title = $2, qty = $3, status = $4 WHERE id = $1"
                ),
                &[&id, &r.title, &r.qty, &r.status],
            )
            .await
            .unwrap();
            out.stats.updates += 1;
        } else if roll < 62 {
            let id = ids[rng.random_range(0..ids.len())];
            c.execute(&format!("DELETE FROM public.{table} WHERE id = $1"), &[&id])
                .await
                .unwrap();
            out.owned.remove(&id);
            out.deleted.insert(id);
            out.stats.deletes += 1;
        } else {
            let id = shared[rng.random_range(0..shared.len())];
            let q = if rng.random_bool(0.7) {
                format!(
                    "UPDATE public.{table} SET qty = {} WHERE id = {id}",
                    1000 + seq
                )
            } else {
                format!(
                    "UPDATE public.{table} SET title = 'db shared {seq}', qty = {} WHERE id = {id}",
                    1000 + seq
                )
            };
            c.batch_execute(&q).await.unwrap();
            out.stats.shared_updates += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(40..200))).await;
    }
    out
}

#[derive(Debug, Default)]
struct PersonStats {
    actions: u64,
    creates: u64,
    edits: u64,
    deletes: u64,
    shared_edits: u64,
}

/// What the person leaves behind: its stats, the last (Title, Qty) of the items it owns (by item
/// id), the items it created, the items it deleted (with their last title), and failed requests.
#[derive(Debug, Default)]
struct PersonOut {
    stats: PersonStats,
    owned: BTreeMap<String, (String, f64)>,
    created: BTreeSet<String>,
    deleted: BTreeMap<String, String>,
    errors: Vec<String>,
}

/// Acts every 60–250 ms until `stop` (at most 400 actions): creates items (unique titles; they
/// become its own), edits Title and/or Qty of its items, deletes them, and edits the shared items.
/// Every written value is unique (`seq`).
async fn person(
    client: GraphClient,
    site: String,
    list_id: String,
    seed: u64,
    mut owned: BTreeMap<String, (String, f64)>,
    shared: Vec<String>,
    stop: Arc<AtomicBool>,
) -> PersonOut {
    const MAX_ACTIONS: u64 = 400;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9e75_0a11);
    let mut out = PersonOut::default();
    let mut seq: i64 = 0;
    while !stop.load(Ordering::SeqCst) && out.stats.actions < MAX_ACTIONS {
        out.stats.actions += 1;
        seq += 1;
        let roll = rng.random_range(0..100);
        let ids: Vec<String> = owned.keys().cloned().collect();
        let qty = (500_000 + seq) as f64;
        if ids.len() < 6 || (roll < 18 && out.created.len() < 40) {
            let title = format!("person new {seq}");
            let mut f = Map::new();
            f.insert("Title".into(), json!(title));
            f.insert("Qty".into(), json!(qty));
            match client.create_item(&site, &list_id, &f).await {
                Ok(item) => {
                    out.created.insert(item.id.clone());
                    owned.insert(item.id, (title, qty));
                    out.stats.creates += 1;
                }
                Err(e) => out.errors.push(format!("create {title}: {e}")),
            }
        } else if roll < 50 {
            let id = ids[rng.random_range(0..ids.len())].clone();
            let (mut title, mut q) = owned[&id].clone();
            let mut f = Map::new();
            if rng.random_bool(0.6) {
                title = format!("person edit {seq}");
                f.insert("Title".into(), json!(title));
            }
            if f.is_empty() || rng.random_bool(0.6) {
                q = qty;
                f.insert("Qty".into(), json!(q));
            }
            match client
                .update_item_fields(&site, &list_id, &id, &f, None)
                .await
            {
                Ok(_) => {
                    owned.insert(id, (title, q));
                    out.stats.edits += 1;
                }
                Err(e) => out.errors.push(format!("edit of item {id}: {e}")),
            }
        } else if roll < 60 {
            let id = ids[rng.random_range(0..ids.len())].clone();
            match client.delete_item(&site, &list_id, &id, None).await {
                Ok(_) => {
                    let (title, _) = owned.remove(&id).unwrap();
                    out.deleted.insert(id, title);
                    out.stats.deletes += 1;
                }
                Err(e) => out.errors.push(format!("delete of item {id}: {e}")),
            }
        } else {
            let id = shared[rng.random_range(0..shared.len())].clone();
            let mut f = Map::new();
            f.insert("Qty".into(), json!(qty));
            if rng.random_bool(0.3) {
                f.insert("Title".into(), json!(format!("person shared {seq}")));
            }
            match client
                .update_item_fields(&site, &list_id, &id, &f, None)
                .await
            {
                Ok(_) => out.stats.shared_edits += 1,
                Err(e) => out.errors.push(format!("edit of shared item {id}: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(60..250))).await;
    }
    out.owned = owned;
    out
}

// ---------------------------------------------------------------------------------------------
// The test

/// Acceptance: "Crash test: kill -9 at ≥ 20 random points during a two-way workload; final state
/// equal on both sides, no duplicated rows or items, every conflict recorded once."
///
/// A warm-up run syncs the 30 initial rows (stopped with SIGTERM). Then 24 iterations: start
/// `syncbridge run`, let it run 0.3–2.5 s, SIGKILL it if it is still alive, wait 20–400 ms (both
/// writers keep going meanwhile, so changes pile up on both sides and meet at the next start).
/// Two iterations in three arm a failpoint (`push.after_graph=0.4`: abort after a `$batch`
/// answered and before the ledger / offsets hear of it — the same flush has already decided and
/// recorded its list changes' conflicts; `push.after_intent=0.3`: abort right after the create
/// intents were made durable — also after this flush's list changes were decided, before any
/// offset commit); those runs usually end themselves with SIGABRT there, counted as
/// failpoint hits (exit by SIGABRT and "failpoint" in the output; ≥ 3 required, ≥ 1 of them
/// `push.after_graph`). Then the writers stop and a clean run converges (both sides equal and
/// unchanged for 2 s, ≤ 60 s) and is stopped with SIGTERM (exit 0). Asserted: see the module doc.
// Faults it found and that are fixed: duplicate conflict records, lost source wins, a person's
// item created and deleted around a crash, second rows from a replayed item creation, replayed
// list versions overturning newer state, and an item re-created for a row the person deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_two_way_workload_leaves_both_sides_equal() {
    hard_timeout(175, crash_body()).await;
}

async fn crash_body() {
    const ITERATIONS: usize = 24;
    let started = Instant::now();
    let seed: u64 = std::env::var("PULL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("pull crash test: seed {seed} (rerun with PULL_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut fx = Fixture::new().await;
    fx.warm_up().await;

    let items = fx.items().await;
    let item_of = |key: i64| {
        items
            .iter()
            .find(|i| i.sync_key.as_deref() == Some(key.to_string().as_str()))
            .unwrap_or_else(|| panic!("no item for row {key}"))
    };
    let person_owned: BTreeMap<String, (String, f64)> = (DB_ROWS + 1..=DB_ROWS + PERSON_ROWS)
        .map(|k| {
            let i = item_of(k);
            (
                i.id.clone(),
                (i.title.clone().unwrap(), i.qty.expect("Qty")),
            )
        })
        .collect();
    let shared_keys: Vec<i64> = (DB_ROWS + PERSON_ROWS + 1..=INITIAL_ROWS).collect();
    let shared_items: Vec<String> = shared_keys.iter().map(|k| item_of(*k).id.clone()).collect();
    let shared_set: BTreeSet<String> = shared_keys.iter().map(i64::to_string).collect();
    let list_id = fx.h.list_id(&fx.list).await;

    let stop = Arc::new(AtomicBool::new(false));
    let db_task = tokio::spawn(db_writer(
        fx.table.clone(),
        seed,
        shared_keys.clone(),
        stop.clone(),
    ));
    let person_task = tokio::spawn(person(
        fx.h.person.clone(),
        fx.h.site.clone(),
        list_id,
        seed,
        person_owned,
        shared_items,
        stop.clone(),
    ));

    let mut hits: BTreeMap<&str, u32> = BTreeMap::new();
    let mut killed = 0;
    for i in 0..ITERATIONS {
        let failpoint = match i % 3 {
            0 => None,
            1 => Some(("push.after_graph", 0.4)),
            _ => Some(("push.after_intent", 0.3)),
        };
        let up = Duration::from_millis(rng.random_range(300..=2500));
        let down = Duration::from_millis(rng.random_range(20..=400));
        let mut run = fx.spawn(failpoint.map(|(f, p)| format!("{f}={p}")).as_deref());
        let outcome = match run.wait_exit(up).await {
            None => {
                run.kill9();
                killed += 1;
                "killed -9".to_string()
            }
            Some(status) => {
                let out = std::fs::read_to_string(&run.log).unwrap_or_default();
                let fired = failpoint
                    .map(|(f, _)| f)
                    .filter(|f| out.contains(&format!("failpoint {f}")));
                match (status.signal(), fired) {
                    (Some(SIGABRT), Some(f)) => {
                        *hits.entry(f).or_default() += 1;
                        format!("aborted itself at failpoint {f}")
                    }
                    _ => panic!(
                        "iteration {i} (failpoint {failpoint:?}): syncbridge exited on its own \
                         with {status}:\n{}",
                        tail(&run.log)
                    ),
                }
            }
        };
        eprintln!(
            "iteration {i}: failpoint {failpoint:?}, up {up:?}: {outcome}; down {down:?} \
             ({:.1} s elapsed)",
            started.elapsed().as_secs_f64()
        );
        drop(run);
        tokio::time::sleep(down).await;
    }

    stop.store(true, Ordering::SeqCst);
    let db = db_task.await.expect("database writer task");
    let pers = person_task.await.expect("person task");
    eprintln!("database writer: {:?}", db.stats);
    eprintln!("person: {:?}", pers.stats);

    // A clean run until both sides are equal and settled, then SIGTERM.
    let mut run = fx.spawn(None);
    let converged = fx.converge(&mut run, 60).await;
    let status = run.terminate().await;
    if let Err(problems) = converged {
        panic!(
            "the final run did not converge within 60 s; {} problem(s):\n  {}\nlog:\n{}",
            problems.len(),
            problems.join("\n  "),
            tail(&run.log)
        );
    }
    assert_eq!(
        status.code(),
        Some(0),
        "final run did not exit 0 on SIGTERM: {status}\n{}",
        tail(&run.log)
    );

    let rows = fx.rows().await;
    let items = fx.items().await;
    let mut problems = Fixture::discrepancies(&rows, &items);
    // The database writer's rows: its last values (nothing from the list overwrote them).
    for (id, want) in &db.owned {
        match rows.get(id) {
            Some(r) if r == want => {}
            other => problems.push(format!(
                "database-owned row {id}: want {want:?} (the writer's last values), table has \
                 {other:?}"
            )),
        }
    }
    for id in &db.deleted {
        if rows.contains_key(id) {
            problems.push(format!("row {id} deleted by the database writer is back"));
        }
    }
    // The person's items: its last values, on exactly one row each.
    let mut by_title: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (id, r) in &rows {
        by_title.entry(r.title.as_str()).or_default().push(*id);
    }
    for (item_id, (title, qty)) in &pers.owned {
        let Some(item) = items.iter().find(|i| &i.id == item_id) else {
            problems.push(format!("person-owned item {item_id} ({title:?}) is gone"));
            continue;
        };
        if item.title.as_deref() != Some(title) || item.qty != Some(*qty) {
            problems.push(format!(
                "person-owned item {item_id}: want ({title:?}, {qty}) (the person's last \
                 values), list has ({:?}, {:?})",
                item.title, item.qty
            ));
        }
        let on_rows = by_title.get(title.as_str()).cloned().unwrap_or_default();
        let key = item.sync_key.as_deref().and_then(|k| k.parse::<i64>().ok());
        if on_rows.len() != 1 || key != Some(on_rows[0]) {
            problems.push(format!(
                "person-owned item {item_id} {title:?} (SyncKey {:?}) is on rows {on_rows:?}, \
                 want exactly the row its SyncKey names{}",
                item.sync_key,
                if pers.created.contains(item_id) {
                    " (person-created)"
                } else {
                    ""
                }
            ));
        }
    }
    for (item_id, title) in &pers.deleted {
        if items.iter().any(|i| &i.id == item_id) {
            problems.push(format!(
                "item {item_id} deleted by the person is still listed"
            ));
        }
        if let Some(ids) = by_title.get(title.as_str()) {
            problems.push(format!(
                "item {item_id} {title:?} deleted by the person still has rows {ids:?}"
            ));
        }
    }
    problems.extend(
        pers.errors
            .iter()
            .map(|e| format!("a person's request failed: {e}")),
    );

    // Conflicts: one record per decision.
    let conflicts = fx.conflicts();
    let mut decisions: BTreeMap<(String, String, String, String), Vec<&ConflictRecord>> =
        BTreeMap::new();
    for c in &conflicts {
        for f in &c.fields {
            decisions
                .entry((
                    c.key.clone(),
                    f.field.clone(),
                    f.source.to_string(),
                    f.target.to_string(),
                ))
                .or_default()
                .push(c);
        }
    }
    // Title/Qty values are unique per write, so one (key, field, source, target) is one decision.
    // Status has two values only: there, records of one decision also share the list version
    // (`target_modified_ms`).
    let duplicate = |field: &str, recs: &[&ConflictRecord]| {
        if field == "Status" {
            let versions: BTreeSet<Option<i64>> =
                recs.iter().map(|r| r.target_modified_ms).collect();
            versions.len() < recs.len()
        } else {
            recs.len() > 1
        }
    };
    let duplicates: Vec<String> = decisions
        .iter()
        .filter(|((_, field, _, _), recs)| duplicate(field, recs))
        .map(|((key, field, source, target), recs)| {
            format!(
                "row {key} field {field} source {source} target {target}: recorded {} times \
                 (ids {:?}, at_ms {:?}, decisions {:?}, \
                 target_modified_ms {:?})",
                recs.len(),
                recs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                recs.iter().map(|r| r.at_ms).collect::<Vec<_>>(),
                recs.iter().map(|r| r.decision.as_str()).collect::<Vec<_>>(),
                recs.iter()
                    .map(|r| r.target_modified_ms)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    // Not asserted (reported): one list version (its target value is unique) decided more than
    // once with different source values, and "conflicts" where both sides hold the same value.
    let mut by_target: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (key, field, source, target) in decisions.keys() {
        by_target
            .entry((key.clone(), field.clone(), target.clone()))
            .or_default()
            .insert(source.clone());
    }
    let redecided: Vec<String> = by_target
        .iter()
        .filter(|(_, sources)| sources.len() > 1)
        .map(|((key, field, target), sources)| {
            format!("row {key} field {field} target {target}: sources {sources:?}")
        })
        .collect();
    let same_value: Vec<String> = decisions
        .iter()
        .filter(|((_, _, source, target), _)| source == target)
        .map(|((key, field, source, _), recs)| {
            format!(
                "row {key} field {field}: source = target = {source} ({}x)",
                recs.len()
            )
        })
        .collect();
    // A list-side value the database wrote (SyncBridge pushed it): our own write, seen as a
    // person's edit (the ledger never heard of it, e.g. after a crash).
    let own_target: Vec<String> = decisions
        .keys()
        .filter(|(_, field, source, target)| {
            source != target
                && match field.as_str() {
                    "Title" => target.starts_with("\"db ") || target.starts_with("\"row "),
                    "Qty" => target.parse::<f64>().is_ok_and(|q| q < 500_000.0),
                    _ => false,
                }
        })
        .map(|(key, field, source, target)| {
            format!("row {key} field {field}: source {source}, target {target}")
        })
        .collect();
    let off_shared: Vec<&str> = conflicts
        .iter()
        .map(|c| c.key.as_str())
        .filter(|k| !shared_set.contains(*k))
        .collect();

    let total_hits: u32 = hits.values().sum();
    let log_text = std::fs::read_to_string(&run.log).unwrap_or_default();
    let final_stats = log_text
        .lines()
        .rfind(|l| l.contains("push processor stopped"))
        .unwrap_or("(no stats line)");
    eprintln!(
        "pull crash test: seed {seed}, {ITERATIONS} iterations ({killed} killed -9, failpoint \
         hits {hits:?}), {} rows, {} items, {} conflict records ({} field decisions, {} \
         duplicated, {} on keys outside the shared rows: {off_shared:?}), person created {} \
         item(s) ({} still live), {:.1} s\nfinal run: {final_stats}",
        rows.len(),
        items.len(),
        conflicts.len(),
        decisions.len(),
        duplicates.len(),
        off_shared.len(),
        pers.created.len(),
        pers.created
            .iter()
            .filter(|i| pers.owned.contains_key(*i))
            .count(),
        started.elapsed().as_secs_f64()
    );
    if !redecided.is_empty() {
        eprintln!(
            "NOTE: the same list version (target value) was decided more than once, against \
             different source values:\n  {}",
            redecided.join("\n  ")
        );
    }
    if !same_value.is_empty() {
        eprintln!(
            "NOTE: conflicts recorded where both sides hold the same value:\n  {}",
            same_value.join("\n  ")
        );
    }
    if !own_target.is_empty() {
        eprintln!(
            "NOTE: conflicts whose list-side value is one SyncBridge wrote itself (a database \
             value):\n  {}",
            own_target.join("\n  ")
        );
    }
    if !duplicates.is_empty() {
        eprintln!(
            "FINDING: a conflict decision was recorded more than once — a list change \
             re-delivered after a crash (its return offset not yet committed) is decided and \
             recorded again:\n  {}",
            duplicates.join("\n  ")
        );
    }
    assert!(
        problems.is_empty(),
        "after the final run (SIGTERM), {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    assert!(
        total_hits >= 3 && hits.get("push.after_graph").copied().unwrap_or(0) >= 1,
        "failpoints fired too rarely to test anything: {hits:?} (seed {seed})"
    );
    assert_eq!(killed + total_hits as usize, ITERATIONS);
    assert!(
        duplicates.is_empty(),
        "every conflict recorded once: {} decision(s) recorded more than once:\n  {}",
        duplicates.len(),
        duplicates.join("\n  ")
    );
}

/// The interleaving behind a failure of the test above (seed 13608694023476950360), made
/// deterministic: an update of a database-owned row reaches the item, the process dies before
/// the ledger records the outcome (`push.after_graph`), and the row changes again while it is
/// down, one field back to the value the ledger still holds. The next run reads the item's
/// version holding our own write: it must not take those values back into the row (Status
/// `done` would win over the newer `open`, as the return path saw "changed in the list only"),
/// nor record a conflict against them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_cut_off_by_a_crash_is_not_pulled_back_as_a_list_edit() {
    hard_timeout(150, cut_off_update_body()).await;
}

async fn cut_off_update_body() {
    let mut fx = Fixture::new().await;
    fx.warm_up().await;
    let t = fx.table.clone();
    fx.h.sql(&format!(
        "UPDATE public.{t} SET title = 'crash write', qty = 501, status = 'done' WHERE id = 1"
    ))
    .await;
    fx.crash_at("push.after_graph").await;
    let item = fx.h.item(&fx.list, "1").await.expect("row 1's item");
    assert_eq!(
        (item["Title"].as_str(), item["Status"].as_str()),
        (Some("crash write"), Some("done")),
        "the update landed before the crash"
    );
    fx.h.sql(&format!(
        "UPDATE public.{t} SET title = 'after crash', qty = 502, status = 'open' WHERE id = 1"
    ))
    .await;

    let log = fx.settle().await;
    let want = RowV {
        title: "after crash".into(),
        qty: Some(502),
        status: "open".into(),
    };
    assert_eq!(
        fx.rows().await.get(&1),
        Some(&want),
        "row 1 must hold the database's last values\n{log}"
    );
    let on_row_1: Vec<ConflictRecord> = fx
        .conflicts()
        .into_iter()
        .filter(|c| c.key == "1")
        .collect();
    assert!(
        on_row_1.is_empty(),
        "our own write was recorded as a conflict: {on_row_1:?}"
    );
}

/// A crash between appending a conflict record and the ledger remembering it (failpoint
/// `pull.after_conflict`; a kill -9 there made the test above record one decision twice): the
/// list change is decided again after the restart, and its record must not be appended again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_cut_off_by_a_crash_is_recorded_once() {
    hard_timeout(150, cut_off_conflict_body()).await;
}

async fn cut_off_conflict_body() {
    let mut fx = Fixture::new().await;
    fx.warm_up().await;
    let t = fx.table.clone();
    fx.h.sql(&format!(
        "UPDATE public.{t} SET title = 'db side' WHERE id = 1"
    ))
    .await;
    fx.h.person_edit(&fx.list, "1", json!({ "Title": "list side" }))
        .await;
    fx.crash_at("pull.after_conflict").await;
    assert_eq!(
        fx.conflicts().len(),
        1,
        "the conflict was recorded before the crash"
    );

    let log = fx.settle().await;
    let title = fx.rows().await.get(&1).map(|r| r.title.clone());
    assert_eq!(title.as_deref(), Some("db side"), "source_wins");
    let ids: Vec<String> = fx.conflicts().into_iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), 1, "one decision, one record: {ids:?}\n{log}");
}
