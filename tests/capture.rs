//! Replication reader against the real PostgreSQL of the stack (`ops/stack up pg`).
//! Fails (does not skip) when DATABASE_URL is unset: `eval "$(ops/stack env)"` first.
//!
//! Every test uses its own tables, slot and publication (`sb_<random>`), a hard timeout, and a
//! guard that stops the readers and drops the slot even when the test fails.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use syncbridge::capture::{CaptureConfig, CaptureError, EventSink, SinkError, TableSpec};
use syncbridge::event::change::{ChangeEvent, Op, Value};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

mod common;

use common::database_url as db_url;

async fn client() -> Client {
    let (c, conn) = tokio_postgres::connect(&db_url(), NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    c
}

fn rand_name() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A test sink: collects events; can fail (retryably, or fatally after N appends).
#[derive(Clone, Default)]
struct TestSink {
    events: Arc<Mutex<Vec<ChangeEvent>>>,
    fail: Arc<AtomicBool>,
    /// Fatal error once this many appends succeeded (0 = never).
    fatal_after: Arc<AtomicUsize>,
    appends: Arc<AtomicUsize>,
    /// Milliseconds each append takes (a slow log).
    delay_ms: Arc<AtomicUsize>,
}

impl EventSink for TestSink {
    fn append(
        &mut self,
        events: &[ChangeEvent],
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let r = if self.fail.load(Ordering::SeqCst) {
            Err(SinkError::retryable("test sink: failing on purpose"))
        } else {
            let fa = self.fatal_after.load(Ordering::SeqCst);
            if fa > 0 && self.appends.load(Ordering::SeqCst) >= fa {
                Err(SinkError::fatal("test sink: simulated crash"))
            } else {
                self.appends.fetch_add(1, Ordering::SeqCst);
                self.events.lock().unwrap().extend_from_slice(events);
                Ok(())
            }
        };
        let delay = Duration::from_millis(self.delay_ms.load(Ordering::SeqCst) as u64);
        async move {
            tokio::time::sleep(delay).await;
            r
        }
    }
}

impl TestSink {
    fn snapshot(&self) -> Vec<ChangeEvent> {
        self.events.lock().unwrap().clone()
    }
    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }
}

/// Tables, slot and publication of one test; dropped (after stopping the readers) on drop.
struct Env {
    name: String,
    tables: Vec<String>,
    state: tempfile::TempDir,
    readers: Vec<(CancellationToken, JoinHandle<Result<(), CaptureError>>)>,
}

impl Env {
    fn new(tables: &[&str]) -> Self {
        let name = rand_name();
        Self {
            tables: tables.iter().map(|t| format!("{t}_{name}")).collect(),
            name,
            state: tempfile::tempdir().unwrap(),
            readers: Vec::new(),
        }
    }

    fn slot(&self) -> String {
        format!("sb_{}", self.name)
    }

    fn table(&self, i: usize) -> &str {
        &self.tables[i]
    }

    fn config(&self) -> CaptureConfig {
        let mut c = CaptureConfig::new(
            self.name.clone(),
            db_url(),
            self.tables.iter().map(|t| TableSpec::parse(t)).collect(),
            self.state.path(),
        );
        c.feedback_interval = Duration::from_millis(200);
        c.heartbeat_interval = Duration::from_millis(500);
        c.lock_poll_interval = Duration::from_millis(200);
        c.batch_linger = Duration::from_millis(10);
        c.max_backoff = Duration::from_secs(1);
        c.progress_bar = false;
        c
    }

    fn start<S: EventSink + 'static>(&mut self, config: CaptureConfig, sink: S) -> usize {
        let token = CancellationToken::new();
        let h = tokio::spawn(syncbridge::capture::run(config, sink, token.clone()));
        self.readers.push((token, h));
        self.readers.len() - 1
    }

    /// Stops reader `i` gracefully and returns its result.
    async fn stop(&mut self, i: usize) -> Result<(), CaptureError> {
        self.readers[i].0.cancel();
        let h = &mut self.readers[i].1;
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("reader stops within 20 s")
            .expect("reader task panicked")
    }

    /// Kills reader `i` (task aborted: connections dropped without a goodbye).
    fn kill(&mut self, i: usize) {
        self.readers[i].1.abort();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (t, h) in &self.readers {
            t.cancel();
            h.abort();
        }
        let slot = self.slot();
        common::drop_replication_objects(&slot, &slot, &self.tables);
    }
}

/// Runs a test body with a hard timeout.
async fn hard_timeout<F: Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test exceeded its {secs} s timeout"));
}

/// Polls until `pred(events)` holds or the timeout passes.
async fn wait_until(sink: &TestSink, secs: u64, what: &str, pred: impl Fn(&[ChangeEvent]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if pred(&sink.events.lock().unwrap()) {
            return;
        }
        if Instant::now() > deadline {
            let evs = sink.snapshot();
            panic!(
                "timed out waiting for {what}; {} events, last: {:?}",
                evs.len(),
                evs.last().map(|e| (e.op, &e.after, &e.before))
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn text(v: &str) -> Value {
    Value::Text(v.to_string())
}

fn col(e: &ChangeEvent, row: &Option<Vec<Value>>, name: &str) -> Value {
    let i = e
        .relation
        .columns
        .iter()
        .position(|c| c.name == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    row.as_ref().expect("row image")[i].clone()
}

fn has_id(events: &[ChangeEvent], table: &str, id: &str) -> bool {
    events.iter().any(|e| {
        e.relation.name == table && e.after.is_some() && col(e, &e.after, "id") == text(id)
    })
}

/// Applies events in order to a map id → row (merging unchanged TOAST from the previous image).
fn apply(events: &[ChangeEvent], table: &str) -> BTreeMap<String, Vec<Value>> {
    let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.relation.name == table) {
        let key = |row: &Option<Vec<Value>>| match col(e, row, "id") {
            Value::Text(s) => s,
            other => panic!("key not text: {other:?}"),
        };
        match e.op {
            Op::Create | Op::Read | Op::Update => {
                let k = key(&e.after);
                let mut row = e.after.clone().unwrap();
                if let Some(prev) = m.get(&k) {
                    for (i, v) in row.iter_mut().enumerate() {
                        if *v == Value::UnchangedToast {
                            *v = prev[i].clone();
                        }
                    }
                }
                assert!(
                    !row.contains(&Value::UnchangedToast),
                    "unmergeable TOAST for {k}"
                );
                m.insert(k, row);
            }
            Op::Delete => {
                m.remove(&key(&e.before));
            }
            Op::Truncate => m.clear(),
        }
    }
    m
}

/// The table's rows as text, in the same shape as `apply` produces.
async fn select_all(c: &Client, table: &str) -> BTreeMap<String, Vec<Value>> {
    let mut m = BTreeMap::new();
    for msg in c
        .simple_query(&format!("SELECT * FROM {table}"))
        .await
        .unwrap()
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
            let row: Vec<Value> = (0..r.len())
                .map(|i| r.get(i).map_or(Value::Null, text))
                .collect();
            m.insert(r.get("id").unwrap().to_string(), row);
        }
    }
    m
}

async fn confirmed_flush(c: &Client, slot: &str) -> u64 {
    let s: Option<String> = c
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    pg_walstream::parse_lsn(&s.expect("slot has a confirmed_flush_lsn")).unwrap()
}

async fn current_lsn(c: &Client) -> u64 {
    let s: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    pg_walstream::parse_lsn(&s).unwrap()
}

/// Waits until no walsender uses the slot (it processed everything the reader sent).
async fn wait_inactive(c: &Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let active: bool = c
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if !active {
            return;
        }
        assert!(Instant::now() < deadline, "slot {slot} stays active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the slot exists *and* is consistent (`confirmed_flush_lsn` set). A slot still being
/// created already shows up in `pg_replication_slots`; a write committed in that window belongs to
/// the exported snapshot, not to the stream, which would make stream assertions race.
async fn wait_slot(c: &Client, slot: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while c
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "slot {slot} not created");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dml_arrives_as_change_events() {
    hard_timeout(90, async {
        let mut env = Env::new(&["dml"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, name text, big text);
             ALTER TABLE {t} ALTER COLUMN big SET STORAGE EXTERNAL;
             INSERT INTO {t} VALUES (1, 'one', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g));"
        ))
        .await
        .unwrap();
        let sink = TestSink::default();
        env.start(env.config(), sink.clone());
        wait_until(&sink, 30, "snapshot row", |e| has_id(e, &t, "1")).await;
        let snap = sink.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].op, Op::Read);
        assert!(snap[0].source.snapshot);
        assert_eq!(col(&snap[0], &snap[0].after, "name"), text("one"));
        let big = match col(&snap[0], &snap[0].after, "big") {
            Value::Text(s) => s,
            other => panic!("big: {other:?}"),
        };
        assert_eq!(big.len(), 9600);

        c.batch_execute(&format!(
            "INSERT INTO {t} VALUES (2, 'two', NULL);
             UPDATE {t} SET name = 'deux' WHERE id = 2;
             UPDATE {t} SET id = 3 WHERE id = 2;
             UPDATE {t} SET name = 'uno' WHERE id = 1;
             DELETE FROM {t} WHERE id = 3;
             TRUNCATE {t};
             INSERT INTO {t} VALUES (99, 'end', NULL);"
        ))
        .await
        .unwrap();
        wait_until(&sink, 30, "end marker", |e| has_id(e, &t, "99")).await;
        let evs = sink.snapshot();
        let ops: Vec<Op> = evs[1..].iter().map(|e| e.op).collect();
        assert_eq!(
            ops,
            vec![
                Op::Create,
                Op::Update,
                Op::Delete, // PK change 2 → 3: delete of the old key ...
                Op::Create, // ... plus create of the new one
                Op::Update,
                Op::Delete,
                Op::Truncate,
                Op::Create
            ]
        );
        let e = &evs[1];
        assert_eq!(e.after, Some(vec![text("2"), text("two"), Value::Null]));
        assert!(!e.source.snapshot);
        assert!(e.source.tx_id.is_some());
        assert!(e.source.lsn > 0 && e.source.commit_ts_ms > 0);
        assert_eq!(evs[2].after, Some(vec![text("2"), text("deux"), Value::Null]));
        assert_eq!(col(&evs[3], &evs[3].before, "id"), text("2"));
        assert_eq!(evs[3].after, None);
        assert_eq!(evs[4].after, Some(vec![text("3"), text("deux"), Value::Null]));
        // The TOASTed column was not touched: it is reported unchanged, not NULL.
        assert_eq!(
            evs[5].after,
            Some(vec![text("1"), text("uno"), Value::UnchangedToast])
        );
        assert_eq!(col(&evs[6], &evs[6].before, "id"), text("3"));
        assert_eq!(evs[7].before, None);
        assert_eq!(evs[7].after, None);
        // One transaction (batch_execute is one implicit transaction): one commit LSN.
        assert!(evs[1..].iter().all(|e| e.source.lsn == evs[1].source.lsn));
        // Relation facts from the catalog.
        let rel = &evs[1].relation;
        assert_eq!(rel.replica_identity, 'd');
        assert_eq!(rel.columns[0].type_name, "integer");
        assert!(rel.columns[0].is_key && !rel.columns[0].nullable);
        assert!(!rel.columns[1].is_key && rel.columns[1].nullable);
        env.stop(0).await.unwrap();
    })
    .await;
}

/// Tables without a primary key and no configured key are refused with a clear message; a table
/// missing from an existing publication too (and the slot is never created then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_errors_are_clear() {
    hard_timeout(60, async {
        let env = Env::new(&["nopk", "other"]);
        let c = client().await;
        let (t0, t1) = (env.table(0).to_string(), env.table(1).to_string());
        c.batch_execute(&format!(
            "CREATE TABLE {t0} (a int, b text); CREATE TABLE {t1} (id int PRIMARY KEY)"
        ))
        .await
        .unwrap();
        let err =
            syncbridge::capture::run(env.config(), TestSink::default(), CancellationToken::new())
                .await
                .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("no primary key"), "{err}");

        let mut cfg = env.config();
        cfg.tables[0] = TableSpec::parse(&t0).with_key(vec!["a".into()]);
        // The publication exists but lacks the first table.
        c.batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {t1}", env.slot()))
            .await
            .unwrap();
        let err = syncbridge::capture::run(cfg, TestSink::default(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ALTER PUBLICATION"), "{err}");
        assert!(!err.is_retryable());
        let slots = c
            .query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot()],
            )
            .await
            .unwrap();
        assert!(slots.is_empty(), "no slot may be created on a config error");

        // sslmode must be explicit.
        let mut cfg = env.config();
        cfg.source_url = cfg.source_url.replace("sslmode=disable", "");
        let err = syncbridge::capture::run(cfg, TestSink::default(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("sslmode"), "{err}");
    })
    .await;
}

/// Snapshot in small chunks while a writer changes the table: applying the events in order gives
/// exactly the table's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_with_concurrent_writes_converges() {
    hard_timeout(120, async {
        let mut env = Env::new(&["conc"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v int NOT NULL, note text);
             INSERT INTO {t} SELECT g, 0, 'n' || g FROM generate_series(1, 5000) g;"
        ))
        .await
        .unwrap();
        let mut cfg = env.config();
        cfg.snapshot_chunk_size = 100;
        let sink = TestSink::default();
        env.start(cfg, sink.clone());
        let writer = {
            let t = t.clone();
            tokio::spawn(async move {
                let c = client().await;
                for i in 0..200 {
                    c.batch_execute(&format!(
                        "UPDATE {t} SET v = v + 1 WHERE id % 97 = {m};
                         DELETE FROM {t} WHERE id = {d};
                         INSERT INTO {t} VALUES ({n}, {i}, NULL);
                         UPDATE {t} SET id = id + 100000 WHERE id = {k};",
                        m = i % 97,
                        d = 1 + i * 23 % 5000,
                        n = 10000 + i,
                        k = 2 + i * 31 % 5000,
                    ))
                    .await
                    .unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        writer.await.unwrap();
        c.batch_execute(&format!("INSERT INTO {t} VALUES (-1, -1, 'end')"))
            .await
            .unwrap();
        wait_until(&sink, 60, "end marker", |e| has_id(e, &t, "-1")).await;
        let evs = sink.snapshot();
        assert!(evs.iter().filter(|e| e.op == Op::Read).count() > 4000);
        assert_eq!(apply(&evs, &t), select_all(&c, &t).await);
        env.stop(0).await.unwrap();
    })
    .await;
}

/// A crash mid-snapshot resumes at the last finished chunk under a fresh snapshot; writes made
/// in between (before and after the resume point) are correct in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_resumes_after_crash_and_wal_wins() {
    hard_timeout(120, async {
        let mut env = Env::new(&["resume"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text);
             INSERT INTO {t} SELECT g, 'v0' FROM generate_series(1, 1000) g;"
        ))
        .await
        .unwrap();
        let mut cfg = env.config();
        cfg.snapshot_chunk_size = 100;
        // First run "crashes" after 3 durable chunks.
        let first = TestSink::default();
        first.fatal_after.store(3, Ordering::SeqCst);
        let err = syncbridge::capture::run(cfg.clone(), first.clone(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        let got = first.snapshot();
        assert_eq!(got.len(), 300);
        let progress = std::fs::read_to_string(
            env.state.path().join(format!("capture-{}.snapshot.json", env.slot())),
        )
        .unwrap();
        assert!(progress.contains("\"300\""), "{progress}");

        // Writes while down: in the finished region, in the remaining region, inserts, deletes.
        c.batch_execute(&format!(
            "UPDATE {t} SET v = 'v1' WHERE id IN (5, 250, 600);
             DELETE FROM {t} WHERE id IN (10, 700);
             INSERT INTO {t} VALUES (2000, 'new'), (150, 'x') ON CONFLICT (id) DO UPDATE SET v = 'dup';"
        ))
        .await
        .unwrap();

        let second = TestSink::default();
        env.start(cfg, second.clone());
        c.batch_execute(&format!("UPDATE {t} SET v = 'v2' WHERE id = 600; INSERT INTO {t} VALUES (-1, 'end')"))
            .await
            .unwrap();
        wait_until(&second, 60, "end marker", |e| has_id(e, &t, "-1")).await;
        let evs2 = second.snapshot();
        // Resumed after the last finished chunk: no id ≤ 300 is read again.
        let reads: Vec<i64> = evs2
            .iter()
            .filter(|e| e.op == Op::Read)
            .map(|e| match col(e, &e.after, "id") {
                Value::Text(s) => s.parse().unwrap(),
                _ => unreachable!(),
            })
            .collect();
        assert!(!reads.is_empty());
        assert!(reads.iter().all(|&id| id > 300), "re-read finished chunks: {:?}", &reads[..5]);
        // The fresh snapshot already sees the while-down writes; the WAL replays them after it.
        let mut all = got;
        all.extend(evs2);
        assert_eq!(apply(&all, &t), select_all(&c, &t).await);
        env.stop(0).await.unwrap();
    })
    .await;
}

/// Restart (graceful and kill) and a killed walsender: no event lost; events re-delivered after a
/// restart are only those after the acknowledged LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_walsender_kill_lose_nothing() {
    hard_timeout(120, async {
        let mut env = Env::new(&["restart"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text)"))
            .await
            .unwrap();
        let a = TestSink::default();
        let app = format!("r_{}", env.name);
        let mut cfg_a = env.config();
        cfg_a.source_url = format!("{}&application_name={app}", cfg_a.source_url);
        let ia = env.start(cfg_a, a.clone());
        wait_slot(&c, &env.slot(), 30).await;
        for i in 1..=50 {
            c.batch_execute(&format!("INSERT INTO {t} VALUES ({i}, 'a')"))
                .await
                .unwrap();
        }
        wait_until(&a, 30, "first 50", |e| has_id(e, &t, "50")).await;
        // Kill the walsender under the running reader; it reconnects.
        c.batch_execute(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}'",
            env.slot()
        ))
        .await
        .unwrap();
        for i in 51..=100 {
            c.batch_execute(&format!("INSERT INTO {t} VALUES ({i}, 'b')"))
                .await
                .unwrap();
        }
        wait_until(&a, 60, "rows after the walsender kill", |e| has_id(e, &t, "100")).await;
        // Every connection of the reader dropped at once (what a PostgreSQL restart looks like
        // to it: lock, catalog and replication connections), with writes around it.
        let killed: i64 = c
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        // Lock, catalog (+heartbeat) and replication connections (fewer when a reconnect is
        // under way at that instant).
        assert!(killed >= 1, "killed only {killed} connections");
        for i in 101..=120 {
            c.batch_execute(&format!("INSERT INTO {t} VALUES ({i}, 'r')"))
                .await
                .unwrap();
        }
        wait_until(&a, 60, "rows after all connections died", |e| {
            has_id(e, &t, "120")
        })
        .await;
        env.stop(ia).await.unwrap();
        wait_inactive(&c, &env.slot()).await;
        let acked = confirmed_flush(&c, &env.slot()).await;
        let a_events = a.snapshot();
        // Graceful stop flushed the final ack: everything A saw is acknowledged.
        let a_max = a_events.iter().map(|e| e.source.lsn).max().unwrap();
        assert!(acked >= a_max, "acked {acked:X} < last event {a_max:X}");

        // Written while no reader runs.
        for i in 121..=150 {
            c.batch_execute(&format!("INSERT INTO {t} VALUES ({i}, 'c')"))
                .await
                .unwrap();
        }
        let b = TestSink::default();
        let ib = env.start(env.config(), b.clone());
        wait_until(&b, 60, "rows written while down", |e| has_id(e, &t, "150")).await;
        // Killed (no graceful ack) then restarted: duplicates allowed only after the ack.
        env.kill(ib);
        wait_inactive(&c, &env.slot()).await;
        let acked_b = confirmed_flush(&c, &env.slot()).await;
        for i in 151..=160 {
            c.batch_execute(&format!("INSERT INTO {t} VALUES ({i}, 'd')"))
                .await
                .unwrap();
        }
        let d = TestSink::default();
        env.start(env.config(), d.clone());
        wait_until(&d, 60, "rows after kill", |e| has_id(e, &t, "160")).await;

        let b_events = b.snapshot();
        let d_events = d.snapshot();
        assert!(
            b_events.iter().all(|e| e.source.lsn > acked),
            "B re-delivered an acknowledged event"
        );
        assert!(
            d_events.iter().all(|e| e.source.lsn > acked_b),
            "D re-delivered an acknowledged event"
        );
        let mut all = a_events;
        all.extend(b_events);
        all.extend(d_events);
        for i in 1..=160 {
            assert!(has_id(&all, &t, &i.to_string()), "lost row {i}");
        }
        assert_eq!(apply(&all, &t), select_all(&c, &t).await);
    })
    .await;
}

/// A sink that fails: confirmed_flush_lsn never passes a non-durable event; once it recovers,
/// the events arrive and the slot advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_sink_never_lets_the_slot_advance() {
    hard_timeout(90, async {
        let mut env = Env::new(&["fail"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
            .await
            .unwrap();
        let sink = TestSink::default();
        env.start(env.config(), sink.clone());
        wait_slot(&c, &env.slot(), 30).await;
        // Let the (empty) snapshot finish and heartbeats move the slot.
        tokio::time::sleep(Duration::from_secs(2)).await;
        sink.fail.store(true, Ordering::SeqCst);
        c.batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
            .await
            .unwrap();
        let after_insert = current_lsn(&c).await;
        // Several heartbeat and feedback rounds, reconnects included. The slot may move past the
        // INSERT record itself (a keepalive between it and the COMMIT): PostgreSQL re-sends every
        // transaction whose commit lies after confirmed_flush_lsn, so the bound that matters is
        // the commit LSN, known once the event is delivered below.
        let mut highest_ack = 0;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            highest_ack = highest_ack.max(confirmed_flush(&c, &env.slot()).await);
        }
        assert_eq!(sink.len(), 0);
        sink.fail.store(false, Ordering::SeqCst);
        wait_until(&sink, 30, "row after recovery", |e| has_id(e, &t, "1")).await;
        let commit_lsn = sink
            .snapshot()
            .iter()
            .find(|e| has_id(std::slice::from_ref(*e), &t, "1"))
            .map(|e| e.source.lsn)
            .unwrap();
        assert!(
            highest_ack < commit_lsn,
            "confirmed_flush_lsn {highest_ack:X} reached the commit {commit_lsn:X} of a transaction the sink had not stored"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while confirmed_flush(&c, &env.slot()).await < after_insert {
            assert!(
                Instant::now() < deadline,
                "slot did not advance after recovery"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.stop(0).await.unwrap();
    })
    .await;
}

/// Two instances: only the lock holder reads; when it dies, the standby takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_single_reader_and_takeover() {
    hard_timeout(90, async {
        let mut env = Env::new(&["lock"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
            .await
            .unwrap();
        // application_name tells the two instances' backends apart.
        let with_app = |env: &Env, app: &str| {
            let mut cfg = env.config();
            cfg.source_url = format!("{}&application_name={app}_{}", cfg.source_url, env.name);
            cfg
        };
        let (app_a, app_b) = (format!("a_{}", env.name), format!("b_{}", env.name));
        let a = TestSink::default();
        let cfg_a = with_app(&env, "a");
        let ia = env.start(cfg_a, a.clone());
        wait_slot(&c, &env.slot(), 30).await;
        let b = TestSink::default();
        let cfg_b = with_app(&env, "b");
        env.start(cfg_b, b.clone());
        c.batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
            .await
            .unwrap();
        wait_until(&a, 30, "row 1 in A", |e| has_id(e, &t, "1")).await;
        // The standby only polls the lock: one backend, never a walsender or a catalog session.
        let mut seen_b = 0;
        for _ in 0..75 {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app_b],
                )
                .await
                .unwrap()
                .get(0);
            assert!(n <= 1, "standby opened {n} connections while A holds the lock");
            seen_b = seen_b.max(n);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen_b, 1, "the standby is connected and polling");
        let a_walsenders: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND backend_type = 'walsender'",
                &[&app_a],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(a_walsenders, 1);
        assert_eq!(b.len(), 0, "the standby must not read while A holds the lock");
        env.kill(ia);
        c.batch_execute(&format!("INSERT INTO {t} VALUES (2)"))
            .await
            .unwrap();
        wait_until(&b, 60, "row 2 in B after takeover", |e| has_id(e, &t, "2")).await;
        assert!(!has_id(&a.snapshot(), &t, "2"));
        env.stop(1).await.unwrap();
    })
    .await;
}

/// A ~100k-row transaction is streamed in chunks (logical_decoding_work_mem = 64kB for the
/// walsender) and assembled; an aborted large transaction and a rolled-back savepoint yield nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transactions_streamed_assembled_and_aborted() {
    hard_timeout(180, async {
        let mut env = Env::new(&["large"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text)"))
            .await
            .unwrap();
        let mut cfg = env.config();
        // The walsender's decoding memory: small, so these transactions must be streamed.
        cfg.source_url = format!(
            "{}&options=-c%20logical_decoding_work_mem%3D64kB",
            cfg.source_url
        );
        cfg.batch_max_events = 5_000;
        let sink = TestSink::default();
        env.start(cfg, sink.clone());
        wait_slot(&c, &env.slot(), 30).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        c.batch_execute(&format!(
            "BEGIN; INSERT INTO {t} SELECT g, 'aborted' FROM generate_series(1000001, 1100000) g; ROLLBACK;"
        ))
        .await
        .unwrap();
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO {t} SELECT g, 'big' FROM generate_series(1, 100000) g;
             SAVEPOINT s;
             INSERT INTO {t} SELECT g, 'sub-aborted' FROM generate_series(200001, 250000) g;
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO {t} VALUES (-1, 'end');
             COMMIT;"
        ))
        .await
        .unwrap();
        wait_until(&sink, 120, "end of the large transaction", |e| has_id(e, &t, "-1")).await;
        let evs = sink.snapshot();
        assert_eq!(evs.len(), 100_001, "exactly the committed rows");
        assert!(evs.iter().all(|e| e.op == Op::Create));
        assert!(evs.iter().all(|e| {
            let v = col(e, &e.after, "v");
            v == text("big") || v == text("end")
        }));
        assert!(evs.iter().all(|e| e.source.lsn == evs[0].source.lsn));
        let streamed: i64 = c
            .query_one(
                "SELECT coalesce(stream_txns, 0) FROM pg_stat_replication_slots WHERE slot_name = $1",
                &[&env.slot()],
            )
            .await
            .unwrap()
            .get(0);
        assert!(streamed >= 2, "transactions were not streamed ({streamed})");
        env.stop(0).await.unwrap();
    })
    .await;
}

/// Transactions carrying our replication origin are marked (and still acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_marked() {
    hard_timeout(60, async {
        let mut env = Env::new(&["origin"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY)"))
            .await
            .unwrap();
        let cfg = env.config();
        let origin = cfg.origin_name();
        let sink = TestSink::default();
        env.start(cfg, sink.clone());
        wait_slot(&c, &env.slot(), 30).await;
        let o = client().await;
        let _ = o
            .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
            .await;
        // Separate statements: the origin must be set up when the insert commits.
        for sql in [
            format!("SELECT pg_replication_origin_create('{origin}')"),
            format!("SELECT pg_replication_origin_session_setup('{origin}')"),
            format!("INSERT INTO {t} VALUES (1)"),
            "SELECT pg_replication_origin_session_reset()".to_string(),
        ] {
            o.batch_execute(&sql).await.unwrap();
        }
        c.batch_execute(&format!("INSERT INTO {t} VALUES (2)"))
            .await
            .unwrap();
        wait_until(&sink, 30, "row 2", |e| has_id(e, &t, "2")).await;
        let evs = sink.snapshot();
        let by_id = |id: &str| {
            evs.iter()
                .find(|e| col(e, &e.after, "id") == text(id))
                .unwrap()
        };
        assert_eq!(by_id("1").source.origin.as_deref(), Some(origin.as_str()));
        assert_eq!(by_id("2").source.origin, None);
        let _ = c
            .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
            .await;
        env.stop(0).await.unwrap();
    })
    .await;
}

/// Heartbeats move an idle slot: writes to a table outside the publication still let
/// confirmed_flush_lsn pass them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_an_idle_slot() {
    hard_timeout(60, async {
        let mut env = Env::new(&["idle", "unrelated"]);
        let c = client().await;
        let (t, other) = (env.table(0).to_string(), env.table(1).to_string());
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY); CREATE TABLE {other} (id int PRIMARY KEY)"
        ))
        .await
        .unwrap();
        let mut cfg = env.config();
        cfg.tables.truncate(1);
        env.start(cfg, TestSink::default());
        wait_slot(&c, &env.slot(), 30).await;
        // Slot creation finished (its consistent point is before our write), streaming runs.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.batch_execute(&format!(
            "INSERT INTO {other} SELECT generate_series(1, 1000)"
        ))
        .await
        .unwrap();
        let target = current_lsn(&c).await;
        // No precondition on the slot being behind `target` here: PostgreSQL 18 may already have
        // confirmed it through a keepalive. The wait below is what fails without heartbeats (15).
        let deadline = Instant::now() + Duration::from_secs(15);
        while confirmed_flush(&c, &env.slot()).await < target {
            assert!(Instant::now() < deadline, "idle slot did not advance");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.stop(0).await.unwrap();

        // A slot dropped behind our back is never silently recreated.
        // The stopped reader's walsender exits asynchronously.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = c
            .execute("SELECT pg_drop_replication_slot($1)", &[&env.slot()])
            .await
        {
            assert!(Instant::now() < deadline, "cannot drop the slot: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut cfg = env.config();
        cfg.tables.truncate(1);
        let err = syncbridge::capture::run(cfg, TestSink::default(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("is gone"), "{err}");
        assert!(err.to_string().contains(".snapshot.json"), "{err}");
        let slots = c
            .query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot()],
            )
            .await
            .unwrap();
        assert!(slots.is_empty(), "the slot was recreated");
    })
    .await;
}

/// The production sink: events end up Avro-encoded in the embedded log, schemas published first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_sink_appends_encoded_events() {
    use syncbridge::log::{EmbeddedLog, EmbeddedLogConfig, EventLog};
    hard_timeout(60, async {
        let mut env = Env::new(&["logsink"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, amount numeric(10,2), at timestamptz);
             INSERT INTO {t} VALUES (1, 1.50, now());"
        ))
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(EmbeddedLogConfig::new(dir.path())).unwrap());
        let sink = syncbridge::capture::LogSink::new(log.clone(), "sb", &env.name, 3);
        env.start(env.config(), sink);
        wait_slot(&c, &env.slot(), 30).await;
        c.batch_execute(&format!(
            "INSERT INTO {t} VALUES (2, 2.25, NULL); UPDATE {t} SET amount = 3 WHERE id = 1; DELETE FROM {t} WHERE id = 2;"
        ))
        .await
        .unwrap();
        let topic = syncbridge::event::topic_name("sb", &env.name, "public", &t);
        let schemas = syncbridge::event::schemas_topic("sb", &env.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = match log.end_offsets(&topic).await {
                Ok(ends) => ends.iter().sum(),
                Err(_) => 0,
            };
            if n == 4 {
                break;
            }
            assert!(n < 4, "more records than events: {n}");
            assert!(Instant::now() < deadline, "only {n} of 4 records in {topic}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s: i64 = log.end_offsets(&schemas).await.unwrap().iter().sum();
        assert!(s >= 2, "key and envelope schemas published ({s})");
        env.stop(0).await.unwrap();
    })
    .await;
}

/// A table added to the pipeline later: refused until it is in the publication, then snapshotted
/// (fresh snapshot) before streaming resumes, with its later changes streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_added_later_gets_a_snapshot() {
    hard_timeout(60, async {
        let mut env = Env::new(&["first", "second"]);
        let c = client().await;
        let (t0, t1) = (env.table(0).to_string(), env.table(1).to_string());
        c.batch_execute(&format!(
            "CREATE TABLE {t0} (id int PRIMARY KEY); CREATE TABLE {t1} (id int PRIMARY KEY);
             INSERT INTO {t1} VALUES (1), (2);"
        ))
        .await
        .unwrap();
        let mut only_first = env.config();
        only_first.tables.truncate(1);
        let a = TestSink::default();
        let ia = env.start(only_first, a.clone());
        wait_slot(&c, &env.slot(), 30).await;
        c.batch_execute(&format!("INSERT INTO {t0} VALUES (1)"))
            .await
            .unwrap();
        wait_until(&a, 30, "row in the first table", |e| has_id(e, &t0, "1")).await;
        env.stop(ia).await.unwrap();

        let err =
            syncbridge::capture::run(env.config(), TestSink::default(), CancellationToken::new())
                .await
                .unwrap_err();
        assert!(err.to_string().contains("ALTER PUBLICATION"), "{err}");

        c.batch_execute(&format!(
            "ALTER PUBLICATION {} ADD TABLE {t1}; INSERT INTO {t1} VALUES (3);",
            env.slot()
        ))
        .await
        .unwrap();
        let b = TestSink::default();
        env.start(env.config(), b.clone());
        c.batch_execute(&format!("UPDATE {t1} SET id = 4 WHERE id = 1"))
            .await
            .unwrap();
        wait_until(&b, 30, "streamed change of the new table", |e| {
            has_id(e, &t1, "4")
        })
        .await;
        let evs = b.snapshot();
        let reads = evs
            .iter()
            .filter(|e| e.op == Op::Read && e.relation.name == t1)
            .count();
        assert!(reads >= 3, "the new table was snapshotted ({reads} rows)");
        assert!(
            !evs.iter()
                .any(|e| e.relation.name == t0 && e.op == Op::Read)
        );
        assert_eq!(apply(&evs, &t1), select_all(&c, &t1).await);
    })
    .await;
}

/// Shutdown in the middle of the snapshot stops between chunks; the next run continues after the
/// last finished chunk and nothing is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_snapshot_resumes() {
    hard_timeout(90, async {
        let mut env = Env::new(&["stop"]);
        let t = env.table(0).to_string();
        let c = client().await;
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text);
             INSERT INTO {t} SELECT g, 'x' FROM generate_series(1, 20000) g;"
        ))
        .await
        .unwrap();
        let mut cfg = env.config();
        cfg.snapshot_chunk_size = 100;
        let a = TestSink::default();
        a.delay_ms.store(20, Ordering::SeqCst);
        let ia = env.start(cfg.clone(), a.clone());
        wait_until(&a, 30, "some snapshot chunks", |e| e.len() >= 500).await;
        let t0 = Instant::now();
        env.stop(ia).await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "shutdown waited for the snapshot"
        );
        let first = a.snapshot();
        assert!(first.len() < 20000, "the snapshot was not interrupted");
        let b = TestSink::default();
        env.start(cfg, b.clone());
        c.batch_execute(&format!("INSERT INTO {t} VALUES (-1, 'end')"))
            .await
            .unwrap();
        wait_until(&b, 60, "end marker", |e| has_id(e, &t, "-1")).await;
        let second = b.snapshot();
        let reads = second.iter().filter(|e| e.op == Op::Read).count();
        assert_eq!(first.len() + reads, 20000, "each row read exactly once");
        let mut all = first;
        all.extend(second);
        assert_eq!(apply(&all, &t), select_all(&c, &t).await);
    })
    .await;
}
