//! Schema preload at start-up (real PostgreSQL of the stack; fails without DATABASE_URL): a
//! restarted capture reads `<prefix>.<pipeline>.schemas` into its encoder before the first append,
//! so it re-publishes nothing already there and a type-only change after the restart (same Avro
//! Parsing Canonical Form, e.g. `timestamp` → `timestamptz`) gets a new fingerprint instead of
//! overwriting the earlier schema in the compacted topic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncbridge::capture::{CaptureConfig, CaptureError, LogSink, TableSpec};
use syncbridge::event::{SchemaResolver, decode, schemas_topic, topic_name};
use syncbridge::log::{EmbeddedLog, EmbeddedLogConfig, EventLog, LogConsumer};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

mod common;

use common::database_url;

struct Cleanup {
    slot: String,
    table: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::drop_replication_objects(&self.slot, &self.slot, std::slice::from_ref(&self.table));
    }
}

/// Every (key, value) record of a topic in offset order (no compaction fold).
async fn raw_records(log: &EmbeddedLog, topic: &str) -> Vec<(String, Vec<u8>)> {
    let ends = log.end_offsets(topic).await.unwrap();
    let total: i64 = ends.iter().sum();
    let stop = CancellationToken::new();
    let group = format!("test-{}", uuid::Uuid::new_v4().simple());
    let mut c = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as i64) < total {
        let r = tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push((
            String::from_utf8_lossy(&r.record.key).into_owned(),
            r.record.value.unwrap_or_default(),
        ));
    }
    stop.cancel();
    out
}

async fn count(log: &EmbeddedLog, topic: &str) -> i64 {
    log.end_offsets(topic)
        .await
        .map(|e| e.iter().sum())
        .unwrap_or(0)
}

async fn wait_count(log: &EmbeddedLog, topic: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = count(log, topic).await;
        if n >= want {
            assert_eq!(n, want, "more records than expected in {topic}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of {want} records in {topic}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start(
    config: &CaptureConfig,
    log: &Arc<EmbeddedLog>,
    name: &str,
) -> (CancellationToken, JoinHandle<Result<(), CaptureError>>) {
    let stop = CancellationToken::new();
    let sink = LogSink::new(log.clone(), "sb", name, 3);
    let h = tokio::spawn(syncbridge::capture::run(config.clone(), sink, stop.clone()));
    (stop, h)
}

async fn stop(s: (CancellationToken, JoinHandle<Result<(), CaptureError>>)) {
    s.0.cancel();
    tokio::time::timeout(Duration::from_secs(20), s.1)
        .await
        .expect("capture stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_preloads_schemas_and_a_type_only_change_gets_a_new_fingerprint() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let name = format!("pl{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let table = format!("public.{name}");
        let _cleanup = Cleanup {
            slot: format!("sb_{name}"),
            table: table.clone(),
        };
        let (c, conn) = tokio_postgres::connect(&database_url(), NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, at timestamp);
             INSERT INTO {table} VALUES (1, '2024-01-02 03:04:05');"
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
        config.feedback_interval = Duration::from_millis(200);
        config.heartbeat_interval = Duration::from_millis(500);
        config.batch_linger = Duration::from_millis(10);
        config.progress_bar = false;
        let topic = topic_name("sb", &name, "public", &name);
        let schemas = schemas_topic("sb", &name);

        // First run: snapshot row, key + envelope schema published.
        let run1 = start(&config, &log, &name);
        wait_count(&log, &topic, 1).await;
        stop(run1).await;
        let published = count(&log, &schemas).await;
        assert_eq!(published, 2, "key and envelope schemas");

        // Restart, same shape: nothing re-published.
        let run2 = start(&config, &log, &name);
        c.batch_execute(&format!(
            "INSERT INTO {table} VALUES (2, '2024-05-06 07:08:09')"
        ))
        .await
        .unwrap();
        wait_count(&log, &topic, 2).await;
        stop(run2).await;
        assert_eq!(
            count(&log, &schemas).await,
            published,
            "preloaded schemas are not appended again"
        );

        // Type-only change while stopped, then restart: a new envelope fingerprint.
        c.batch_execute(&format!(
            "ALTER TABLE {table} ALTER COLUMN at TYPE timestamptz USING at AT TIME ZONE 'UTC';
             INSERT INTO {table} VALUES (3, '2024-07-08 09:10:11+00');"
        ))
        .await
        .unwrap();
        let run3 = start(&config, &log, &name);
        wait_count(&log, &topic, 3).await;
        stop(run3).await;

        let records = raw_records(&log, &schemas).await;
        let mut by_key: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in &records {
            if let Some(prev) = by_key.insert(k.clone(), v.clone()) {
                assert_eq!(
                    &prev, v,
                    "fingerprint {k} was reused for a different schema"
                );
            }
        }
        // Key and envelope schema of each version (the renamed version's key record is
        // renamed too, so it gets a new fingerprint as well).
        assert_eq!(by_key.len(), 4, "two schema versions: {:?}", by_key.keys());

        // Every event decodes with the schema it was written with.
        let mut resolver = SchemaResolver::new();
        for (k, v) in &by_key {
            resolver
                .add_topic_record(k, std::str::from_utf8(v).unwrap())
                .unwrap();
        }
        let events = raw_records(&log, &topic).await;
        assert_eq!(events.len(), 3);
        let mut fingerprints = Vec::new();
        for (_, v) in &events {
            decode(v, &resolver).expect("decodes");
            fingerprints.push(v[2..10].to_vec());
        }
        fingerprints.sort();
        fingerprints.dedup();
        assert_eq!(
            fingerprints.len(),
            2,
            "the timestamptz version has its own fingerprint"
        );
    })
    .await
    .expect("test exceeded its 120 s timeout");
}
