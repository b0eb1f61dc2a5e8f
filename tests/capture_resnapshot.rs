//! On-demand re-snapshot of one table while streaming continues (DBLog watermarks), against the
//! stack's real PostgreSQL. Fails (does not skip) when DATABASE_URL is unset.
//!
//! - In-process: capture into an embedded log, a concurrent writer updating / deleting /
//!   inserting / re-keying rows of the same table during the re-snapshot; folding the topic by key
//!   (latest wins, deletes remove) must give exactly the final table.
//! - Through the binary: `syncbridge run`, then `syncbridge snapshot --table … --wait` over the
//!   control plane, the HTTP status codes, and the error when no process listens.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apache_avro::types::Value as Avro;
use syncbridge::capture::log_sink::read_schema_records;
use syncbridge::capture::snapshot::FileProgress;
use syncbridge::capture::{
    CaptureConfig, LogSink, ResnapshotHandle, ResnapshotState, TableSpec, run_with_control,
};
use syncbridge::event::{SchemaResolver, decode, schemas_topic, topic_name};
use syncbridge::log::{EmbeddedLog, EmbeddedLogConfig, EventLog, LogConsumer};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

mod common;

use common::{database_url, free_port};

async fn client() -> Client {
    let (c, conn) = tokio_postgres::connect(&database_url(), NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    c
}

/// Drops slot, publication and table even when the test fails.
struct Cleanup {
    slot: String,
    tables: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::drop_replication_objects(&self.slot, &self.slot, &self.tables);
    }
}

/// A scalar of a decoded row as text (`NULL` for null).
fn text(v: &Avro) -> String {
    match v {
        Avro::Null => "NULL".into(),
        Avro::Int(i) => i.to_string(),
        Avro::Long(i) => i.to_string(),
        Avro::String(s) => s.clone(),
        Avro::Union(_, b) => text(b),
        Avro::Enum(_, s) => format!("<{s}>"),
        other => format!("{other:?}"),
    }
}

fn field<'a>(rec: &'a Avro, name: &str) -> &'a Avro {
    let rec = match rec {
        Avro::Union(_, b) => b.as_ref(),
        r => r,
    };
    match rec {
        Avro::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no field {name}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

/// Every record of `topic` up to its end offsets, decoded, in per-partition order.
async fn read_topic(log: &EmbeddedLog, topic: &str, resolver: &SchemaResolver) -> Vec<Avro> {
    let ends = log.end_offsets(topic).await.unwrap();
    let mut remaining: HashSet<i32> = ends
        .iter()
        .enumerate()
        .filter(|(_, e)| **e > 0)
        .map(|(p, _)| p as i32)
        .collect();
    let stop = CancellationToken::new();
    let group = format!("test-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await
        .unwrap();
    let mut out = Vec::new();
    while !remaining.is_empty() {
        let rec = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
            .await
            .expect("records up to the end offsets arrive")
            .unwrap()
            .unwrap();
        if rec.offset + 1 >= ends[rec.partition as usize] {
            remaining.remove(&rec.partition);
        }
        if rec.offset < ends[rec.partition as usize] {
            let v = rec.record.value.expect("no tombstones in table topics");
            out.push(decode(&v, resolver).expect("decodes"));
        }
    }
    stop.cancel();
    out
}

async fn resolver(log: &EmbeddedLog, prefix: &str, pipeline: &str) -> SchemaResolver {
    let mut r = SchemaResolver::new();
    for (k, v) in read_schema_records(log, &schemas_topic(prefix, pipeline))
        .await
        .unwrap()
    {
        r.add_topic_record(&k, &v).unwrap();
    }
    r
}

/// Folds envelopes by key: c/u/r insert-or-replace, d removes, t clears. Returns id → (v, note)
/// plus the number of `r` events.
fn fold(events: &[Avro]) -> (BTreeMap<i64, (String, String)>, usize) {
    let mut m = BTreeMap::new();
    let mut reads = 0;
    for e in events {
        let op = text(field(e, "op"));
        match op.as_str() {
            "c" | "u" | "r" => {
                if op == "r" {
                    reads += 1;
                }
                let after = field(e, "after");
                let id: i64 = text(field(after, "id")).parse().unwrap();
                let note = text(field(after, "note"));
                assert!(!note.starts_with('<'), "unchanged TOAST in a test row");
                m.insert(id, (text(field(after, "v")), note));
            }
            "d" => {
                let before = field(e, "before");
                let id: i64 = text(field(before, "id")).parse().unwrap();
                m.remove(&id);
            }
            "t" => m.clear(),
            other => panic!("unexpected op {other}"),
        }
    }
    (m, reads)
}

async fn table_rows(c: &Client, table: &str) -> BTreeMap<i64, (String, String)> {
    let mut m = BTreeMap::new();
    for msg in c
        .simple_query(&format!("SELECT id, v, note FROM {table}"))
        .await
        .unwrap()
    {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
            m.insert(
                r.get(0).unwrap().parse().unwrap(),
                (
                    r.get(1).unwrap_or("NULL").to_string(),
                    r.get(2).unwrap_or("NULL").to_string(),
                ),
            );
        }
    }
    m
}

/// A writer hammering the table with small transactions until `stop`.
async fn writer(table: String, n: i64, stop: Arc<AtomicBool>, writes: Arc<AtomicU64>) {
    let c = client().await;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_id = n + 1;
    while !stop.load(Ordering::SeqCst) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = (x % n as u64) as i64 + 1;
        let sql = match x % 10 {
            0..=4 => format!("UPDATE {table} SET v = v + 1, note = 'u{x}' WHERE id = {id}"),
            5 => format!("DELETE FROM {table} WHERE id = {id}"),
            6 | 7 => {
                next_id += 1;
                // Spread new keys over the whole key range, including chunks not read yet.
                let nid = if x.is_multiple_of(2) { next_id } else { id };
                format!(
                    "INSERT INTO {table} VALUES ({nid}, 0, 'i{x}') \
                     ON CONFLICT (id) DO UPDATE SET v = {table}.v + 1000, note = 'c{x}'"
                )
            }
            8 => format!(
                "UPDATE {table} SET v = v + 1 WHERE id BETWEEN {id} AND {}",
                id + 25
            ),
            _ => {
                next_id += 1;
                // A key change: a delete plus a create in the log.
                format!(
                    "UPDATE {table} SET id = {} WHERE id = {id}",
                    n * 10 + next_id
                )
            }
        };
        if c.batch_execute(&sql).await.is_ok() {
            writes.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_with_concurrent_writes_folds_to_the_table() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let name = format!("rs{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let table = format!("public.{name}");
        let _cleanup = Cleanup {
            slot: format!("sb_{name}"),
            tables: vec![table.clone()],
        };
        let c = client().await;
        let n: i64 = 2000;
        c.batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL, note text);
             INSERT INTO {table} SELECT g, g, 'n' || g FROM generate_series(1, {n}) g;"
        ))
        .await
        .unwrap();

        let state = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(EmbeddedLogConfig::new(dir.path())).unwrap());
        let mut config = CaptureConfig::new(
            name.clone(),
            database_url(),
            vec![TableSpec::parse(&table)],
            state.path(),
        );
        config.snapshot_chunk_size = 400;
        config.feedback_interval = Duration::from_millis(200);
        config.heartbeat_interval = Duration::from_millis(500);
        config.batch_linger = Duration::from_millis(10);
        config.progress_bar = false;
        let (handle, requests) = ResnapshotHandle::channel(&name, vec![table.clone()]);
        let progress = FileProgress::new(state.path(), &config.slot_name);
        let sink = LogSink::new(log.clone(), "sb", &name, 3);
        let stop = CancellationToken::new();
        let capture = tokio::spawn(run_with_control(
            config,
            sink,
            progress,
            Some(requests),
            stop.clone(),
        ));

        // The initial snapshot is in the log.
        let topic = topic_name("sb", &name, "public", &name);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let count: i64 = log
                .end_offsets(&topic)
                .await
                .map(|e| e.iter().sum())
                .unwrap_or(0);
            if count >= n {
                break;
            }
            assert!(!capture.is_finished(), "capture stopped: {:?}", capture.await);
            assert!(Instant::now() < deadline, "initial snapshot: {count} of {n}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let stop_writer = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let w = tokio::spawn(writer(table.clone(), n, stop_writer.clone(), writes.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;

        let queued = handle.request(&table).unwrap();
        assert!(
            handle.request(&table).is_err(),
            "a second request while one runs is refused"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let s = handle.status().unwrap();
            assert_eq!(s.id, queued.id);
            match s.state {
                ResnapshotState::Done => break s,
                ResnapshotState::Failed => panic!("re-snapshot failed: {s:?}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "re-snapshot not done: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Stop at once: a stale chunk row would not be repaired by later writes.
        stop_writer.store(true, Ordering::SeqCst);
        w.await.unwrap();
        let writes = writes.load(Ordering::SeqCst);
        assert!(writes > 50, "the writer made only {writes} writes");
        assert!(done.chunks >= 2, "{done:?}");
        assert!(done.rows > 0, "{done:?}");

        // The log catches up with the table; then the fold must equal it exactly.
        let expected = table_rows(&c, &table).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (folded, reads) = loop {
            let resolver = resolver(&log, "sb", &name).await;
            let events = read_topic(&log, &topic, &resolver).await;
            let (folded, reads) = fold(&events);
            if folded == expected || Instant::now() > deadline {
                break (folded, reads);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if folded != expected {
            let wrong: Vec<_> = expected
                .iter()
                .filter(|(k, v)| folded.get(k) != Some(v))
                .take(10)
                .collect();
            let extra: Vec<_> = folded
                .keys()
                .filter(|k| !expected.contains_key(k))
                .take(10)
                .collect();
            panic!(
                "fold differs from the table ({} vs {} rows); wrong/missing: {wrong:?}; extra: {extra:?}; status {done:?}",
                folded.len(),
                expected.len()
            );
        }
        assert_eq!(
            reads as u64,
            n as u64 + done.rows,
            "r events = initial snapshot + re-snapshot rows ({done:?})"
        );
        eprintln!("re-snapshot under {writes} concurrent writes: {done:?}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), capture)
            .await
            .expect("capture stops")
            .unwrap()
            .unwrap();
    })
    .await
    .expect("test exceeded its 150 s timeout");
}

const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");

fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn write_pipeline(dir: &std::path::Path, name: &str, port: u16) -> PathBuf {
    let file = dir.join("resnap.yaml");
    let yaml = format!(
        r#"version: 1
name: {name}
source:
  url: {url}
log:
  embedded: {{ path: {log} }}
graph:
  base_url: ${{GRAPH_BASE_URL}}
  token_url: ${{GRAPH_TOKEN_URL}}
  tenant: contoso.onmicrosoft.com
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: dev-secret
  site: contoso.sharepoint.com:/sites/dev
  # The stack's emulator is unthrottled; the default tier would slow these capture tests.
  ru_per_minute: 100000
sync:
  - table: public.{name}
    list: Resnap Items {name}
    pull: {{ enabled: false }}
    fields:
      note: Title
control:
  listen: 127.0.0.1:{port}
"#,
        log = dir.join("log").display(),
        url = database_url(),
    );
    std::fs::write(&file, yaml).unwrap();
    file
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metric_has(port: u16, needle: &str) -> bool {
    http(port, "GET", "/metrics").is_some_and(|(_, m)| m.contains(needle))
}

#[test]
fn snapshot_command_goes_through_the_control_plane() {
    let name = format!("rscli{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let table = format!("public.{name}");
    let _cleanup = Cleanup {
        slot: format!("sb_{name}"),
        tables: vec![table.clone()],
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        client()
            .await
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, v int NOT NULL, note text);
                 INSERT INTO {table} SELECT g, g, 'n' || g FROM generate_series(1, 5) g;"
            ))
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let file = write_pipeline(dir.path(), &name, port);
    let file_arg = file.to_str().unwrap();

    // Nothing listens yet: a clear runtime error.
    let out = Command::new(BIN)
        .args(["snapshot", file_arg, "--table", &table])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("no SyncBridge process is listening"),
        "{stderr}"
    );
    // A table the pipeline does not sync is a configuration error, found without a process.
    let out = Command::new(BIN)
        .args(["snapshot", file_arg, "--table", "public.nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    let child = Command::new(BIN)
        .args(["run", file_arg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let initial =
        format!(r#"syncbridge_capture_snapshot_rows_total{{pipeline="{name}",table="{table}"}} 5"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !metric_has(port, &initial) {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "syncbridge exited early"
        );
        assert!(Instant::now() < deadline, "initial snapshot not seen");
        std::thread::sleep(Duration::from_millis(100));
    }

    let path = format!("/pipelines/{name}/snapshot");
    assert_eq!(
        http(port, "GET", &path).map(|(s, b)| (s, b.contains("idle"))),
        Some((200, true))
    );
    assert_eq!(
        http(port, "POST", &format!("{path}?table=public.other")).map(|r| r.0),
        Some(404)
    );
    assert_eq!(
        http(port, "POST", "/pipelines/nope/snapshot?table=public.x").map(|r| r.0),
        Some(404)
    );
    assert_eq!(
        http(port, "GET", "/pipelines/nope/snapshot").map(|r| r.0),
        Some(404)
    );

    let out = Command::new(BIN)
        .args(["snapshot", file_arg, "--table", &table, "--wait"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(r#""state":"done""#), "{stdout}");
    let (status, body) = http(port, "GET", &path).unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""state":"done""#) && body.contains(r#""rows":5"#),
        "{body}"
    );
    let total = format!(
        r#"syncbridge_capture_snapshot_rows_total{{pipeline="{name}",table="{table}"}} 10"#
    );
    assert!(metric_has(port, &total), "initial 5 + re-snapshot 5 rows");

    // 202 with an id, then 409 while it is queued or running (or 202 again if it already ended).
    let (s1, b1) = http(port, "POST", &format!("{path}?table={table}")).unwrap();
    assert_eq!(s1, 202, "{b1}");
    assert!(b1.contains(r#""id":"#), "{b1}");
    let (s2, b2) = http(port, "POST", &format!("{path}?table={table}")).unwrap();
    assert!(
        s2 == 409 || (s2 == 202 && http(port, "GET", &path).is_some()),
        "{s2} {b2}"
    );

    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            assert_eq!(s.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
