//! Conformance suite of the event log: every case runs against the embedded (sled) log and the
//! Kafka log, plus embedded-only durability tests (kill -9, directory lock, physical compaction)
//! and a Kafka-only partitioner cross-check against librdkafka.
//!
//! Kafka cases need a broker: `KAFKA_BROKERS` (set by `ops/test` or `eval "$(ops/stack env)"`).
//! Without it they fail, unless `SYNCBRIDGE_SKIP_KAFKA=1` (then they skip, loudly).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use syncbridge::log::{
    AssignmentEvent, ConsumedRecord, Delivered, EmbeddedLog, EmbeddedLogConfig, EventLog, KafkaLog,
    KafkaLogConfig, LogConsumer, LogError, Record, TopicSpec, partition_for,
};
use tokio_util::sync::CancellationToken;

/// A way to open (and reopen) one log instance.
trait Backend: Sync {
    type Log: EventLog;
    const NAME: &'static str;
    /// Opens the log; for the embedded backend the previous handle must be dropped first.
    fn open(&self) -> Self::Log;
    /// How long the first record of a new consumer may take (Kafka: group join + fetch).
    fn first_record_timeout(&self) -> Duration;
}

struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
}

impl Backend for Embedded {
    type Log = EmbeddedLog;
    const NAME: &'static str = "embedded";

    /// Waits (bounded) for an earlier handle in this process to let go: sled's background
    /// threads keep the directory lock for a moment after the last handle drops.
    fn open(&self) -> EmbeddedLog {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match EmbeddedLog::open(EmbeddedLogConfig::new(self.dir.path())) {
                Err(LogError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other.expect("open embedded log"),
            }
        }
    }

    fn first_record_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}

struct Kafka {
    cfg: KafkaLogConfig,
}

impl Kafka {
    /// `None` = skip (SYNCBRIDGE_SKIP_KAFKA=1); panics when the broker is not configured.
    fn from_env(case: &str) -> Option<Self> {
        let brokers = std::env::var("KAFKA_BROKERS")
            .ok()
            .filter(|b| !b.is_empty());
        let Some(brokers) = brokers else {
            if std::env::var("SYNCBRIDGE_SKIP_KAFKA").as_deref() == Ok("1") {
                eprintln!("SKIPPED kafka::{case}: KAFKA_BROKERS unset and SYNCBRIDGE_SKIP_KAFKA=1");
                return None;
            }
            panic!(
                "kafka::{case}: set KAFKA_BROKERS (run via ops/test or eval $(ops/stack env)), \
                 or SYNCBRIDGE_SKIP_KAFKA=1 to skip the Kafka half"
            );
        };
        let mut cfg = KafkaLogConfig::new(brokers);
        // A fresh namespace per test run, so reruns against a live broker start clean.
        cfg.topic_prefix = format!("sbtest-{}", uuid::Uuid::new_v4().simple());
        cfg.replication_factor = 1;
        cfg.session_timeout = Duration::from_secs(6);
        cfg.request_timeout = Duration::from_secs(10);
        cfg.delivery_timeout = Duration::from_secs(30);
        // No producer_batch_records: the log probes the broker (tansu 0.6.0 serves offsets per
        // batch, see src/log/kafka.rs) and the suite checks the defaults.
        Some(Self { cfg })
    }
}

impl Backend for Kafka {
    type Log = KafkaLog;
    const NAME: &'static str = "kafka";

    fn open(&self) -> KafkaLog {
        KafkaLog::new(self.cfg.clone()).expect("create kafka log")
    }

    fn first_record_timeout(&self) -> Duration {
        // Join + a possible wait for a previous member's session to expire (6 s).
        Duration::from_secs(30)
    }
}

/// Every test body runs under a hard timeout: a hung broker call fails the test, never the run.
async fn bounded(name: &str, limit: Duration, f: impl Future<Output = ()>) {
    if tokio::time::timeout(limit, f).await.is_err() {
        panic!("{name}: timed out after {limit:?}");
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let b = super::Embedded::new();
                    super::bounded(concat!("embedded::", stringify!($case)), std::time::Duration::from_secs(60), super::$case(&b)).await;
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(b) = super::Kafka::from_env(stringify!($case)) else { return };
                    super::bounded(concat!("kafka::", stringify!($case)), std::time::Duration::from_secs(120), super::$case(&b)).await;
                }
            )*
        }
    };
}

conformance!(
    offsets_dense_and_ordered_per_key,
    partition_is_murmur2_of_key,
    records_round_trip_with_headers_and_tombstones,
    group_resumes_after_reopen_and_redelivers_uncommitted,
    groups_are_independent,
    ensure_topic_is_idempotent_and_names_are_checked,
    empty_batch,
    large_batch,
    cancellation_stops_consumer,
    compacted_topic_latest_by_key,
    concurrent_appends,
    positions_by_time_and_an_operators_reset,
    assignment_is_reported_before_records,
);

// ---------------------------------------------------------------------------------------------
// Helpers

fn topics(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn rec(key: &str, value: &str) -> Record {
    Record::new(key, value)
}

/// Receives exactly `n` records (the first may take `first`, the rest 10 s each).
async fn recv_n<C: LogConsumer>(c: &mut C, n: usize, first: Duration) -> Vec<ConsumedRecord> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let limit = if out.is_empty() {
            first
        } else {
            Duration::from_secs(10)
        };
        match tokio::time::timeout(limit, c.recv()).await {
            Ok(Ok(Some(r))) => out.push(r),
            Ok(Ok(None)) => panic!("consumer stopped after {} of {n} records", out.len()),
            Ok(Err(e)) => panic!("recv failed after {} of {n} records: {e}", out.len()),
            Err(_) => panic!("no record within {limit:?} after {} of {n}", out.len()),
        }
    }
    out
}

/// Asserts nothing more arrives within `wait`.
async fn assert_no_more<C: LogConsumer>(c: &mut C, wait: Duration) {
    if let Ok(r) = tokio::time::timeout(wait, c.recv()).await {
        panic!("expected no more records, got {r:?}");
    }
}

fn values(rs: &[ConsumedRecord]) -> Vec<String> {
    rs.iter()
        .map(|r| {
            String::from_utf8_lossy(r.record.value.as_deref().unwrap_or(b"<tombstone>"))
                .into_owned()
        })
        .collect()
}

/// Checks offsets of `delivered` per partition are exactly `start..start+n` in input order.
fn assert_dense(delivered: &[Delivered], start: &BTreeMap<i32, i64>) {
    let mut next = start.clone();
    for d in delivered {
        let want = next.entry(d.partition).or_insert(0);
        assert_eq!(d.offset, *want, "offset of {d:?} not dense/in order");
        *want += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Conformance cases

async fn offsets_dense_and_ordered_per_key<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("orders", 3))
        .await
        .unwrap();
    let mut all = Vec::new();
    for batch in 0..3 {
        let records: Vec<Record> = (0..20)
            .map(|i| rec(&format!("k{}", i % 7), &format!("b{batch}-{i}")))
            .collect();
        let d = log.append("orders", records.clone()).await.unwrap();
        assert_eq!(d.len(), records.len());
        for (r, d) in records.into_iter().zip(d) {
            assert_eq!(d.topic, "orders");
            all.push((r, d));
        }
    }
    let delivered: Vec<Delivered> = all.iter().map(|(_, d)| d.clone()).collect();
    assert_dense(&delivered, &BTreeMap::new());
    let mut counts = vec![0i64; 3];
    for d in &delivered {
        counts[d.partition as usize] += 1;
    }
    assert_eq!(log.end_offsets("orders").await.unwrap(), counts);
    assert!(
        counts.iter().filter(|&&c| c > 0).count() >= 2,
        "7 keys should spread: {counts:?}"
    );

    let mut c = log
        .consumer("g", &topics(&["orders"]), CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, 60, b.first_record_timeout()).await;
    assert_no_more(&mut c, Duration::from_millis(1500)).await;
    // Per partition: offsets strictly increasing from 0; per key: values in append order.
    let mut last: HashMap<i32, i64> = HashMap::new();
    let mut by_key: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for r in &got {
        let prev = last.insert(r.partition, r.offset).unwrap_or(-1);
        assert_eq!(
            r.offset,
            prev + 1,
            "{}: partition {} offsets",
            B::NAME,
            r.partition
        );
        by_key
            .entry(r.record.key.clone())
            .or_default()
            .extend(values(std::slice::from_ref(r)));
    }
    let mut want: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for (r, _) in &all {
        want.entry(r.key.clone())
            .or_default()
            .push(String::from_utf8(r.value.clone().unwrap()).unwrap());
    }
    assert_eq!(by_key, want);
}

async fn partition_is_murmur2_of_key<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("spread", 5))
        .await
        .unwrap();
    let keys: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("pk-{i}").into_bytes())
        .chain([Vec::new(), vec![0, 255, 7]])
        .collect();
    let d = log
        .append(
            "spread",
            keys.iter().map(|k| Record::new(k.clone(), "x")).collect(),
        )
        .await
        .unwrap();
    for (k, d) in keys.iter().zip(&d) {
        assert_eq!(d.partition, partition_for(k, 5), "key {k:?}");
    }
    let used: BTreeSet<i32> = d.iter().map(|d| d.partition).collect();
    assert_eq!(used.len(), 5, "100 keys should hit all 5 partitions");
}

async fn records_round_trip_with_headers_and_tombstones<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("rt", 1)).await.unwrap();
    let sent = vec![
        Record::new("k1", "v1")
            .with_header("op", "c")
            .with_header("op", "again")
            .with_header("empty", "")
            .with_header("bin", vec![0u8, 1, 255])
            .with_timestamp_ms(1_700_000_000_123),
        Record::tombstone("k1").with_timestamp_ms(1_700_000_000_124),
        // An empty value is a value, not a tombstone.
        Record::new("k2", "").with_timestamp_ms(1_700_000_000_124),
        Record::new(vec![0u8, 159, 146, 150], vec![0u8; 1000]).with_timestamp_ms(1_700_000_000_125),
    ];
    log.append("rt", sent.clone()).await.unwrap();
    let mut c = log
        .consumer("g", &topics(&["rt"]), CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, sent.len(), b.first_record_timeout()).await;
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(
            (g.topic.as_str(), g.partition, g.offset),
            ("rt", 0, i as i64)
        );
        assert_eq!(&g.record, s, "record {i}");
    }
}

async fn group_resumes_after_reopen_and_redelivers_uncommitted<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("resume", 1))
        .await
        .unwrap();
    let records: Vec<Record> = (0..10).map(|i| rec("k", &format!("v{i}"))).collect();
    log.append("resume", records).await.unwrap();
    let t = topics(&["resume"]);
    assert!(log.committed("g", &t).await.unwrap().is_empty());

    let mut c = log
        .consumer("g", &t, CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, 10, b.first_record_timeout()).await;
    assert_eq!(got[9].offset, 9);
    // Processed up to offset 5; 6..9 were received but not processed.
    c.commit("resume", 0, 6).await.unwrap();
    drop(c);
    drop(log);

    let log = b.open();
    let committed = log.committed("g", &t).await.unwrap();
    assert_eq!(committed, BTreeMap::from([(("resume".to_owned(), 0), 6)]));
    let mut c = log
        .consumer("g", &t, CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, 4, b.first_record_timeout()).await;
    assert_eq!(values(&got), ["v6", "v7", "v8", "v9"]);
    assert_eq!(got[0].offset, 6);
    assert_no_more(&mut c, Duration::from_millis(1500)).await;
    // Appends after the restart continue the offsets.
    let d = log.append("resume", vec![rec("k", "v10")]).await.unwrap();
    assert_eq!(d[0].offset, 10);
    let got = recv_n(&mut c, 1, Duration::from_secs(10)).await;
    assert_eq!(values(&got), ["v10"]);
}

async fn groups_are_independent<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("shared", 1))
        .await
        .unwrap();
    log.append("shared", (0..6).map(|i| rec("k", &i.to_string())).collect())
        .await
        .unwrap();
    let t = topics(&["shared"]);
    let mut a = log
        .consumer("a", &t, CancellationToken::new())
        .await
        .unwrap();
    let got_a = recv_n(&mut a, 6, b.first_record_timeout()).await;
    a.commit("shared", 0, 5).await.unwrap();
    let mut bc = log
        .consumer("b", &t, CancellationToken::new())
        .await
        .unwrap();
    let got_b = recv_n(&mut bc, 6, b.first_record_timeout()).await;
    assert_eq!(
        values(&got_a),
        values(&got_b),
        "both groups see every record"
    );
    bc.commit("shared", 0, 2).await.unwrap();
    drop(a);
    drop(bc);
    assert_eq!(
        log.committed("a", &t).await.unwrap(),
        BTreeMap::from([(("shared".to_owned(), 0), 5)])
    );
    assert_eq!(
        log.committed("b", &t).await.unwrap(),
        BTreeMap::from([(("shared".to_owned(), 0), 2)])
    );
    let mut bc = log
        .consumer("b", &t, CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut bc, 4, b.first_record_timeout()).await;
    assert_eq!(values(&got), ["2", "3", "4", "5"]);
}

async fn ensure_topic_is_idempotent_and_names_are_checked<B: Backend>(b: &B) {
    let log = b.open();
    let spec = TopicSpec::new("idem", 2);
    log.ensure_topic(&spec).await.unwrap();
    log.append("idem", vec![rec("k", "v")]).await.unwrap();
    log.ensure_topic(&spec).await.unwrap();
    // Re-ensuring keeps the data.
    assert_eq!(
        log.end_offsets("idem").await.unwrap().iter().sum::<i64>(),
        1
    );
    match log.ensure_topic(&TopicSpec::new("idem", 3)).await {
        Err(LogError::PartitionMismatch {
            expected: 3,
            actual: 2,
            ..
        }) => {}
        other => panic!("expected PartitionMismatch, got {other:?}"),
    }
    match log.append("missing", vec![rec("k", "v")]).await {
        Err(LogError::UnknownTopic(t)) => assert_eq!(t, "missing"),
        other => panic!("expected UnknownTopic, got {other:?}"),
    }
    match log
        .consumer("g", &topics(&["missing"]), CancellationToken::new())
        .await
    {
        Err(LogError::UnknownTopic(_)) => {}
        other => panic!("expected UnknownTopic, got {other:?}"),
    }
    for bad in ["", "has space", "slash/x", ".."] {
        match log.ensure_topic(&TopicSpec::new(bad, 1)).await {
            Err(e @ LogError::InvalidTopicName(_)) => assert!(!e.is_retryable()),
            other => panic!("{bad:?}: expected InvalidTopicName, got {other:?}"),
        }
    }
    assert!(matches!(
        log.ensure_topic(&TopicSpec::new("zero", 0)).await,
        Err(LogError::InvalidArgument(_))
    ));
}

async fn empty_batch<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("empty", 2)).await.unwrap();
    assert!(log.append("empty", Vec::new()).await.unwrap().is_empty());
    assert_eq!(log.end_offsets("empty").await.unwrap(), vec![0, 0]);
    let d = log.append("empty", vec![rec("a", "1")]).await.unwrap();
    assert_eq!(d[0].offset, 0, "an empty batch consumes no offsets");
}

async fn large_batch<B: Backend>(b: &B) {
    const N: usize = 10_000;
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("large", 4)).await.unwrap();
    let records: Vec<Record> = (0..N)
        .map(|i| rec(&format!("row-{}", i % 500), &format!("{i:06}")))
        .collect();
    let d = log.append("large", records).await.unwrap();
    assert_eq!(d.len(), N);
    assert_dense(&d, &BTreeMap::new());
    assert_eq!(
        log.end_offsets("large").await.unwrap().iter().sum::<i64>(),
        N as i64
    );
    let mut c = log
        .consumer("g", &topics(&["large"]), CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, N, b.first_record_timeout()).await;
    let mut last_per_key: HashMap<Vec<u8>, String> = HashMap::new();
    for (v, r) in values(&got).into_iter().zip(&got) {
        if let Some(prev) = last_per_key.insert(r.record.key.clone(), v.clone()) {
            assert!(prev < v, "key order broken: {prev} then {v}");
        }
    }
    assert_eq!(last_per_key.len(), 500);
}

async fn cancellation_stops_consumer<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("cancel", 1))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut c = log
        .consumer("g", &topics(&["cancel"]), shutdown.clone())
        .await
        .unwrap();
    // Waiting on an empty topic: cancellation must wake it.
    let waiter = tokio::spawn(async move {
        let r = c.recv().await;
        (r, c)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "recv returned on an empty topic");
    shutdown.cancel();
    let (r, mut c) = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("recv did not stop within 3 s of cancellation")
        .unwrap();
    assert!(matches!(r, Ok(None)), "{r:?}");
    // Stays stopped even with records available.
    log.append("cancel", vec![rec("k", "v")]).await.unwrap();
    assert!(matches!(c.recv().await, Ok(None)));
}

async fn compacted_topic_latest_by_key<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::compacted("ledger", 2))
        .await
        .unwrap();
    log.append(
        "ledger",
        vec![
            rec("a", "a1"),
            rec("b", "b1"),
            rec("a", "a2"),
            rec("c", "c1"),
        ],
    )
    .await
    .unwrap();
    log.append(
        "ledger",
        vec![
            Record::tombstone("b"),
            rec("a", "a3"),
            rec("c", "c2"),
            rec("c", "c3"),
        ],
    )
    .await
    .unwrap();
    let ends = log.end_offsets("ledger").await.unwrap();
    assert_eq!(
        ends.iter().sum::<i64>(),
        8,
        "offsets are assigned to every record"
    );
    let mut c = log
        .consumer("g", &topics(&["ledger"]), CancellationToken::new())
        .await
        .unwrap();
    // The embedded log keeps 3 (latest per key); Kafka may keep all 8 until the cleaner runs.
    let mut latest: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    let first = recv_n(&mut c, 3, b.first_record_timeout()).await;
    let mut got = first;
    while let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_millis(1500), c.recv()).await {
        got.push(r);
    }
    assert!((3..=8).contains(&got.len()), "{} records", got.len());
    for r in &got {
        latest.insert(r.record.key.clone(), r.record.value.clone());
    }
    assert_eq!(
        latest,
        BTreeMap::from([
            (b"a".to_vec(), Some(b"a3".to_vec())),
            (b"b".to_vec(), None),
            (b"c".to_vec(), Some(b"c3".to_vec())),
        ])
    );
}

async fn concurrent_appends<B: Backend>(b: &B) {
    let log = std::sync::Arc::new(b.open());
    log.ensure_topic(&TopicSpec::new("conc", 2)).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let log = std::sync::Arc::clone(&log);
        tasks.push(async move {
            let mut out = Vec::new();
            for batch in 0..10 {
                let records: Vec<Record> = (0..25)
                    .map(|i| rec(&format!("w{w}"), &format!("{batch:02}-{i:02}")))
                    .collect();
                out.extend(log.append("conc", records).await.unwrap());
            }
            out
        });
    }
    let results = futures::future::join_all(tasks).await;
    let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (w, d) in results.iter().enumerate() {
        // One writer = one key = one partition: its offsets strictly increase.
        assert!(
            d.windows(2).all(|p| p[0].offset < p[1].offset),
            "writer {w}"
        );
        for d in d {
            by_partition.entry(d.partition).or_default().push(d.offset);
        }
    }
    let ends = log.end_offsets("conc").await.unwrap();
    for (p, mut offs) in by_partition {
        offs.sort_unstable();
        let n = offs.len() as i64;
        assert_eq!(
            offs,
            (0..n).collect::<Vec<_>>(),
            "partition {p} dense, no duplicates"
        );
        assert_eq!(ends[p as usize], n);
    }
}

// ---------------------------------------------------------------------------------------------
// Embedded only

mod embedded_only {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    const WRITER_ENV: &str = "SYNCBRIDGE_TEST_KILL9_WRITER_DIR";
    const CYCLE_ENV: &str = "SYNCBRIDGE_TEST_KILL9_CYCLE";
    const CRASH_TOPIC: &str = "crash";

    #[tokio::test]
    async fn second_open_is_a_clear_error() {
        let b = Embedded::new();
        let log = b.open();
        match EmbeddedLog::open(EmbeddedLogConfig::new(b.dir.path())) {
            Err(e @ LogError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("locked"), "{msg}");
                assert!(!e.is_retryable());
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(log);
        // Released on drop.
        let _reopened = b.open();
    }

    #[tokio::test]
    async fn one_consumer_per_group() {
        let b = Embedded::new();
        let log = b.open();
        log.ensure_topic(&TopicSpec::new("t", 1)).await.unwrap();
        let t = topics(&["t"]);
        let c = log
            .consumer("g", &t, CancellationToken::new())
            .await
            .unwrap();
        assert!(matches!(
            log.consumer("g", &t, CancellationToken::new()).await,
            Err(LogError::GroupBusy(_))
        ));
        drop(c);
        log.consumer("g", &t, CancellationToken::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn compaction_removes_superseded_records_across_restart() {
        let b = Embedded::new();
        let log = b.open();
        log.ensure_topic(&TopicSpec::compacted("ledger", 1))
            .await
            .unwrap();
        for i in 0..50 {
            log.append("ledger", vec![rec("only", &format!("v{i}"))])
                .await
                .unwrap();
        }
        drop(log);
        let log = b.open();
        assert_eq!(log.end_offsets("ledger").await.unwrap(), vec![50]);
        let mut c = log
            .consumer("g", &topics(&["ledger"]), CancellationToken::new())
            .await
            .unwrap();
        let got = recv_n(&mut c, 1, Duration::from_secs(5)).await;
        assert_eq!((got[0].offset, values(&got)[0].as_str()), (49, "v49"));
        assert_no_more(&mut c, Duration::from_millis(300)).await;
        // Offsets continue after the compacted tail.
        let d = log.append("ledger", vec![rec("other", "x")]).await.unwrap();
        assert_eq!(d[0].offset, 50);
    }

    /// Throughput of durable appends (one fsync per batch). Ignored by default: a measurement
    /// on shared CI machines; run with `--ignored --nocapture` to see the figures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement; run explicitly"]
    async fn append_throughput() {
        let b = Embedded::new();
        let log = b.open();
        log.ensure_topic(&TopicSpec::new("tp", 4)).await.unwrap();
        for batch_size in [1usize, 10, 100, 1000] {
            let batches = (2000 / batch_size).clamp(20, 200);
            let started = Instant::now();
            for n in 0..batches {
                let records = (0..batch_size)
                    .map(|i| rec(&format!("k{i}"), &format!("{n}-{i}-{}", "x".repeat(200))))
                    .collect();
                log.append("tp", records).await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            let rate = (batches * batch_size) as f64 / secs;
            eprintln!(
                "embedded append: batch {batch_size:>4}: {rate:>9.0} records/s, {:.2} ms/batch",
                secs * 1000.0 / batches as f64
            );
            assert!(rate > 50.0, "batch {batch_size}: only {rate:.0} records/s");
        }
    }

    /// The writer half of `kill9_durability`: appends until killed, printing every acknowledged
    /// record as `ACK <partition> <offset> <value>`. Only meaningful as a child process.
    #[test]
    #[ignore = "child process of embedded_only::kill9_durability"]
    fn kill9_writer_child() {
        use std::io::Write;
        let dir = std::env::var(WRITER_ENV).expect("run by kill9_durability only");
        let cycle = std::env::var(CYCLE_ENV).expect("cycle");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir)).unwrap();
            log.ensure_topic(&TopicSpec::new(CRASH_TOPIC, 3))
                .await
                .unwrap();
            let mut out = std::io::stdout().lock();
            for batch in 0u64.. {
                let records: Vec<Record> = (0..20)
                    .map(|i| {
                        rec(
                            &format!("k{}", (batch * 20 + i) % 31),
                            &format!("c{cycle}-b{batch}-{i}"),
                        )
                    })
                    .collect();
                let values: Vec<Vec<u8>> =
                    records.iter().map(|r| r.value.clone().unwrap()).collect();
                let d = log.append(CRASH_TOPIC, records).await.unwrap();
                for (d, v) in d.iter().zip(values) {
                    let v = String::from_utf8(v).unwrap();
                    writeln!(out, "ACK {} {} {v}", d.partition, d.offset).unwrap();
                }
                out.flush().unwrap();
            }
        });
    }

    /// Runs the writer as a child process, SIGKILLs it mid-append once it acknowledged
    /// `min_acks` records, and returns every acknowledged `(partition, offset, value)`.
    fn run_writer_and_kill(
        dir: &std::path::Path,
        cycle: u32,
        min_acks: usize,
    ) -> Vec<(i32, i64, String)> {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "embedded_only::kill9_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, dir)
            .env(CYCLE_ENV, cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::sync_channel::<String>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ACK ") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut acks = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acks.len() < min_acks {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => acks.push(l),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        panic!("writer acked only {} records in 60 s", acks.len());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("writer exited early"),
            }
        }
        // SIGKILL while the writer is in its append loop.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "writer was not killed: {status}");
        // Lines printed before the kill are acknowledged too; drain until the reader hits EOF.
        acks.extend(rx.iter());
        reader.join().unwrap();
        acks.iter()
            .map(|l| {
                let mut it = l.split(' ').skip(1);
                let p = it.next().unwrap().parse().unwrap();
                let o = it.next().unwrap().parse().unwrap();
                (p, o, it.next().unwrap().to_owned())
            })
            .collect()
    }

    #[test]
    fn kill9_durability() {
        const CYCLES: u32 = 3;
        const MIN_ACKS: usize = 1_000;
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut acked = Vec::new();
        for cycle in 0..CYCLES {
            let new = run_writer_and_kill(dir.path(), cycle, MIN_ACKS);
            eprintln!(
                "kill9_durability: cycle {cycle}: {} records acknowledged before SIGKILL",
                new.len()
            );
            acked.extend(new);
            rt.block_on(verify_after_crash(dir.path(), &acked));
        }
    }

    /// Reopens the log after a crash: it must open cleanly, hold every acknowledged record at
    /// its acknowledged position, have no holes, and keep appending densely.
    async fn verify_after_crash(dir: &std::path::Path, acked: &[(i32, i64, String)]) {
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir)).unwrap();
        let ends = log.end_offsets(CRASH_TOPIC).await.unwrap();
        let total: i64 = ends.iter().sum();
        assert!(
            total as usize >= acked.len(),
            "{total} stored < {} acked",
            acked.len()
        );
        let mut c = log
            .consumer("verify", &topics(&[CRASH_TOPIC]), CancellationToken::new())
            .await
            .unwrap();
        let got = recv_n(&mut c, total as usize, Duration::from_secs(5)).await;
        assert_no_more(&mut c, Duration::from_millis(300)).await;
        let mut stored: HashMap<(i32, i64), String> = HashMap::new();
        let mut next = vec![0i64; ends.len()];
        for r in &got {
            assert_eq!(
                r.offset, next[r.partition as usize],
                "hole in partition {}",
                r.partition
            );
            next[r.partition as usize] += 1;
            stored.insert(
                (r.partition, r.offset),
                values(std::slice::from_ref(r)).remove(0),
            );
        }
        for (p, o, v) in acked {
            assert_eq!(
                stored.get(&(*p, *o)),
                Some(v),
                "acknowledged {p}/{o} lost or changed"
            );
        }
        let d = log
            .append(CRASH_TOPIC, vec![rec("k0", "after-crash")])
            .await
            .unwrap();
        assert_eq!(
            d[0].offset, ends[d[0].partition as usize],
            "appends continue densely"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kafka only

mod kafka_only {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    use super::*;

    /// An external librdkafka producer using `murmur2_random` (no explicit partition) picks the
    /// same partition as `partition_for`, i.e. the Kafka log's mapping is Kafka's own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitioner_agrees_with_librdkafka_murmur2() {
        let Some(b) = Kafka::from_env("partitioner_agrees_with_librdkafka_murmur2") else {
            return;
        };
        bounded("kafka_only::partitioner", Duration::from_secs(60), async {
            let log = b.open();
            log.ensure_topic(&TopicSpec::new("ext", 7)).await.unwrap();
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &b.cfg.brokers)
                .set("partitioner", "murmur2_random")
                .create()
                .unwrap();
            let topic = b.cfg.physical_name("ext");
            for i in 0..50 {
                let key = format!("external-{i}");
                let d = producer
                    .send(
                        FutureRecord::to(&topic).key(key.as_bytes()).payload("x"),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
                assert_eq!(d.partition, partition_for(key.as_bytes(), 7), "key {key}");
            }
        })
        .await;
    }

    /// `close` leaves the group in time after a commit, so the next member resumes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_leaves_group_promptly() {
        let Some(b) = Kafka::from_env("close_leaves_group_promptly") else {
            return;
        };
        bounded("kafka_only::close", Duration::from_secs(60), async {
            let log = b.open();
            log.ensure_topic(&TopicSpec::new("close", 1)).await.unwrap();
            log.append("close", vec![rec("k", "a"), rec("k", "b")])
                .await
                .unwrap();
            let t = topics(&["close"]);
            let mut c = log
                .consumer("g", &t, CancellationToken::new())
                .await
                .unwrap();
            recv_n(&mut c, 1, b.first_record_timeout()).await;
            c.commit("close", 0, 1).await.unwrap();
            assert!(
                c.close(Duration::from_secs(10)).await,
                "close took over 10 s"
            );
            let started = std::time::Instant::now();
            let mut c = log
                .consumer("g", &t, CancellationToken::new())
                .await
                .unwrap();
            let got = recv_n(&mut c, 1, b.first_record_timeout()).await;
            assert_eq!(values(&got), ["b"]);
            eprintln!(
                "close_leaves_group_promptly: next member got its first record after {:?}",
                started.elapsed()
            );
        })
        .await;
    }
}

/// The operator's side of positions (cursor resets): start offsets, offsets by time, and storing
/// a group's positions outside a consumer, refused while a consumer of the group is live.
async fn positions_by_time_and_an_operators_reset<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("reset", 1)).await.unwrap();
    let t = topics(&["reset"]);
    // Recent timestamps: a broker's time-based retention must not remove them.
    let base = chrono::Utc::now().timestamp_millis() - 60_000;
    let records = (0..6)
        .map(|i| rec("k", &format!("v{i}")).with_timestamp_ms(base + 1000 * i))
        .collect();
    log.append("reset", records).await.unwrap();
    assert_eq!(log.start_offsets("reset").await.unwrap(), [0]);
    assert_eq!(log.end_offsets("reset").await.unwrap(), [6]);
    for (at, first) in [
        (0, 0),
        (base + 2500, 3),
        (base + 5000, 5),
        (base + 100_000, 6),
    ] {
        assert_eq!(
            log.offsets_for_time("reset", at).await.unwrap(),
            [first],
            "first offset at or after {at}"
        );
    }

    let at4 = BTreeMap::from([(("reset".to_owned(), 0), 4)]);
    log.set_committed("g", &at4).await.unwrap();
    assert_eq!(log.committed("g", &t).await.unwrap(), at4);
    let mut c = log
        .consumer("g", &t, CancellationToken::new())
        .await
        .unwrap();
    let got = recv_n(&mut c, 2, b.first_record_timeout()).await;
    assert_eq!(values(&got), ["v4", "v5"]);
    // A live member would overwrite the positions with its next commit.
    let at1 = BTreeMap::from([(("reset".to_owned(), 0), 1)]);
    let busy = log.set_committed("g", &at1).await;
    assert!(matches!(busy, Err(LogError::GroupBusy(_))), "{busy:?}");
    drop(c);
    let bad = BTreeMap::from([(("reset".to_owned(), 3), 1)]);
    assert!(
        log.set_committed("g", &bad).await.is_err(),
        "no partition 3"
    );
}

/// A shared consumer (the push processor's) reports which partitions it reads (issue 15)
/// before it yields a record of them:
/// the embedded log every partition at once, Kafka the group's assignment (a sole member gets
/// every partition). Nothing is revoked from a sole member.
async fn assignment_is_reported_before_records<B: Backend>(b: &B) {
    let log = b.open();
    log.ensure_topic(&TopicSpec::new("assigned", 3))
        .await
        .unwrap();
    let records: Vec<Record> = (0..30).map(|i| rec(&format!("k{i}"), "v")).collect();
    let delivered = log.append("assigned", records).await.unwrap();
    let used: BTreeSet<i32> = delivered.iter().map(|d| d.partition).collect();
    assert_eq!(
        used.len(),
        3,
        "precondition: the keys spread over the 3 partitions"
    );
    let mut c = log
        .shared_consumer("g", &topics(&["assigned"]), CancellationToken::new())
        .await
        .unwrap();
    let mut owned = BTreeSet::new();
    for r in recv_n(&mut c, 30, b.first_record_timeout()).await {
        for e in c.take_assignment_events() {
            match e {
                AssignmentEvent::Assigned(parts) => owned.extend(parts),
                AssignmentEvent::Revoked(parts) => panic!("a sole member lost {parts:?}"),
            }
        }
        assert!(
            owned.contains(&("assigned".to_owned(), r.partition)),
            "record of partition {} yielded before its assignment was reported ({owned:?})",
            r.partition
        );
    }
    let all: BTreeSet<(String, i32)> = (0..3).map(|p| ("assigned".to_owned(), p)).collect();
    assert_eq!(owned, all);
}
