//! Capture with a schema registry (`log.kafka.schema_registry`): PostgreSQL → `capture::run` →
//! `LogSink::with_schema_registry` → the Kafka log (tansu), records in the Confluent wire format,
//! decoded by fetching each schema by id from the registry. The registry is the Confluent-compatible
//! stand-in of `tests/common/registry.rs` (no real registry is installable here).
//!
//! Needs the stack: `DATABASE_URL` and `KAFKA_BROKERS`; a test FAILS (never skips) without them.
//! Each test has its own table, slot, publication and topics, a hard timeout, and a guard that
//! drops the database objects even on failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as Av;
use syncbridge::capture::{CaptureConfig, CaptureError, LogSink, TableSpec};
use syncbridge::config::SchemaRegistryConfig;
use syncbridge::event::registry::{ConfluentResolver, RegistryClient, confluent_schema_id};
use syncbridge::event::{schemas_topic, topic_name};
use syncbridge::log::{
    AnyLog, CancellationToken, ConsumedRecord, EventLog, KafkaLogConfig, LogConfig, LogConsumer,
};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

mod common;
use common::kafka_brokers;
#[path = "common/harness.rs"]
mod harness;
#[path = "common/registry.rs"]
mod registry;

use registry::Registry;

const PREFIX: &str = "sbreg";

use harness::hard_timeout;

/// Drops the slot, publication and table on drop (also when the test fails).
struct DbGuard {
    slot: String,
    table: String,
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        common::drop_replication_objects(
            &self.slot,
            &self.slot,
            &[format!("public.{}", self.table)],
        );
    }
}

struct Env {
    name: String,
    slot: String,
    topic: String,
    c: Client,
    log: Arc<AnyLog>,
    state: tempfile::TempDir,
    _db: DbGuard,
}

/// A table `(id int PRIMARY KEY, t text)` with one row from before the slot, and the Kafka log.
async fn env(tag: &str) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let name = format!("{tag}_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let slot = format!("sb_{name}");
    let db = DbGuard {
        slot: slot.clone(),
        table: name.clone(),
    };
    let (c, conn) = tokio_postgres::connect(&common::database_url(), NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    c.batch_execute(&format!(
        "CREATE TABLE public.{name} (id int PRIMARY KEY, t text);
         INSERT INTO public.{name} VALUES (0, 'before the slot');"
    ))
    .await
    .unwrap();
    let mut cfg = KafkaLogConfig::new(kafka_brokers());
    // LogSink names topics `<prefix>.<pipeline>.…`; defaults otherwise (the log probes tansu).
    cfg.topic_prefix = String::new();
    let state = tempfile::tempdir().unwrap();
    let log = Arc::new(AnyLog::open(LogConfig::Kafka(cfg)).unwrap());
    Env {
        topic: topic_name(PREFIX, &name, "public", &name),
        name,
        slot,
        c,
        log,
        state,
        _db: db,
    }
}

/// A client with short retries, so outages surface quickly as retryable sink errors.
fn client(url: &str) -> RegistryClient {
    let mut c = RegistryClient::new(&SchemaRegistryConfig::from_url(url.parse().unwrap()));
    c.max_attempts = 2;
    c.retry_min = Duration::from_millis(50);
    c.retry_max = Duration::from_millis(200);
    c
}

fn start_capture(
    env: &Env,
    registry_url: &str,
    heartbeat: Duration,
) -> (CancellationToken, JoinHandle<Result<(), CaptureError>>) {
    let mut config = CaptureConfig::new(
        env.name.clone(),
        common::database_url(),
        vec![TableSpec::parse(&format!("public.{}", env.name))],
        env.state.path(),
    );
    config.feedback_interval = Duration::from_millis(200);
    config.heartbeat_interval = heartbeat;
    config.lock_poll_interval = Duration::from_millis(200);
    config.batch_linger = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(500);
    config.progress_bar = false;
    let sink = LogSink::new(env.log.clone(), PREFIX, &env.name, 1)
        .with_schema_registry(client(registry_url));
    let stop = CancellationToken::new();
    let task = tokio::spawn(syncbridge::capture::run(config, sink, stop.clone()));
    (stop, task)
}

async fn total(log: &AnyLog, topic: &str) -> i64 {
    log.end_offsets(topic)
        .await
        .map(|e| e.iter().sum::<i64>())
        .unwrap_or(0)
}

/// Waits until `topic` holds at least `n` records (capture must keep running meanwhile).
async fn wait_records(
    env: &Env,
    n: i64,
    secs: u64,
    capture: &mut JoinHandle<Result<(), CaptureError>>,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let have = total(&env.log, &env.topic).await;
        if have >= n {
            return;
        }
        assert!(
            !capture.is_finished(),
            "capture stopped: {:?}",
            capture.await
        );
        assert!(
            Instant::now() < deadline,
            "{} has {have} of {n} records after {secs} s",
            env.topic
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop_capture(stop: CancellationToken, capture: JoinHandle<Result<(), CaptureError>>) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), capture)
        .await
        .expect("capture stops within 20 s of cancellation")
        .expect("capture task panicked")
        .expect("capture ends Ok when cancelled");
}

/// Every record of `topic` up to its current end, with a fresh consumer group.
async fn read_all(log: &AnyLog, topic: &str) -> Vec<ConsumedRecord> {
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for (p, end) in log
        .end_offsets(topic)
        .await
        .unwrap()
        .into_iter()
        .enumerate()
    {
        if end > 0 {
            pending.insert(p as i32, end);
        }
    }
    let stop = CancellationToken::new();
    let group = format!("reg_reader_{}", uuid::Uuid::new_v4().simple());
    let mut consumer = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let rec = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "read {} records of {topic} in 60 s, waiting for {pending:?}",
                    out.len()
                )
            })
            .unwrap()
            .expect("consumer stopped early");
        if pending
            .get(&rec.partition)
            .is_some_and(|&end| rec.offset >= end - 1)
        {
            pending.remove(&rec.partition);
        }
        out.push(rec);
    }
    stop.cancel();
    out
}

/// `confirmed_flush_lsn` of the slot as a number (0 if none yet).
async fn confirmed_flush(c: &Client, slot: &str) -> u64 {
    let row = c
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.and_then(|r| r.get::<_, Option<String>>(0))
        .map(|s| s.parse().unwrap())
        .unwrap_or(0)
}

/// Runs `sql` in one transaction and returns the WAL insert position after it, before COMMIT:
/// the transaction's commit (what capture acknowledges) lies beyond it.
async fn lsn_inside(c: &Client, sql: &str) -> u64 {
    c.batch_execute(&format!("BEGIN; {sql}")).await.unwrap();
    let row = c
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text",
            &[],
        )
        .await
        .unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    row.get::<_, String>(0).parse().unwrap()
}

fn field<'a>(record: &'a Av, name: &str) -> &'a Av {
    match record {
        Av::Record(fields) => {
            &fields
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no field {name} in {record:?}"))
                .1
        }
        other => panic!("not a record: {other:?}"),
    }
}

fn opt(v: &Av) -> Option<&Av> {
    match v {
        Av::Union(_, inner) if **inner == Av::Null => None,
        Av::Union(_, inner) => Some(inner),
        Av::Null => None,
        other => Some(other),
    }
}

/// One record decoded through the registry: (key id, key, value id, op, after image).
#[derive(Debug)]
struct Decoded {
    key_id: Option<u32>,
    key: Option<Av>,
    value_id: u32,
    op: String,
    after: Option<Av>,
}

async fn decode_all(records: &[ConsumedRecord], resolver: &mut ConfluentResolver) -> Vec<Decoded> {
    let mut out = Vec::new();
    for r in records {
        let value = r.record.value.as_deref().expect("no tombstones");
        assert_eq!(
            value[0], 0,
            "value starts with the Confluent magic byte: {value:02x?}"
        );
        let (value_id, env) = resolver.decode(value).await.unwrap_or_else(|e| {
            panic!("record @{} does not decode via the registry: {e}", r.offset)
        });
        let (key_id, key) = if r.record.key.is_empty() {
            (None, None)
        } else {
            let (id, k) = resolver.decode(&r.record.key).await.unwrap();
            (Some(id), Some(k))
        };
        let op = match field(&env, "op") {
            Av::String(s) => s.clone(),
            other => panic!("op: {other:?}"),
        };
        out.push(Decoded {
            key_id,
            key,
            value_id,
            op,
            after: opt(field(&env, "after")).cloned(),
        });
    }
    out
}

/// Insert/update/delete and an ADD COLUMN reach Kafka as `00` + a registered id + Avro; a
/// consumer decodes every key and value by fetching the schemas by id from the registry. The
/// value subject gets a second version for the new column; each schema is registered exactly
/// once (the id cache), before the first record carrying it; the schemas topic is still written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_registered_ids_and_decode_via_the_registry() {
    hard_timeout(120, async {
        let reg = Registry::start_new().await;
        let env = env("reg_ids").await;
        let (stop, mut capture) = start_capture(&env, &reg.url(), Duration::from_millis(500));
        wait_records(&env, 1, 30, &mut capture).await;
        let name = &env.name;
        for s in [
            format!("INSERT INTO public.{name} VALUES (1, 'one')"),
            format!("UPDATE public.{name} SET t = 'uno' WHERE id = 1"),
            format!("DELETE FROM public.{name} WHERE id = 0"),
            format!("ALTER TABLE public.{name} ADD COLUMN n int"),
            format!("INSERT INTO public.{name} VALUES (2, 'two', 22)"),
        ] {
            env.c.batch_execute(&s).await.unwrap();
        }
        wait_records(&env, 5, 30, &mut capture).await;
        stop_capture(stop, capture).await;

        let value_subject = format!("{}-value", env.topic);
        let key_subject = format!("{}-key", env.topic);
        let value_ids = reg.versions(&value_subject);
        let key_ids = reg.versions(&key_subject);
        assert_eq!(value_ids.len(), 2, "value versions: {value_ids:?}");
        assert_eq!(key_ids.len(), 1, "key versions: {key_ids:?}");
        let registrations: Vec<_> = reg
            .seen()
            .into_iter()
            .filter(|s| s.method == "POST")
            .collect();
        assert_eq!(
            registrations.len(),
            3,
            "each schema registered once: {registrations:#?}"
        );
        for s in &registrations {
            assert_eq!(s.status, 200);
            assert_eq!(
                s.content_type.as_deref(),
                Some("application/vnd.schemaregistry.v1+json")
            );
        }

        let records = read_all(&env.log, &env.topic).await;
        assert_eq!(records.len(), 5, "no duplicates expected without restarts");
        let mut resolver = ConfluentResolver::new(client(&reg.url()));
        let events = decode_all(&records, &mut resolver).await;
        let ops: Vec<&str> = events.iter().map(|e| e.op.as_str()).collect();
        assert_eq!(ops, ["r", "c", "u", "d", "c"], "{events:#?}");
        for e in &events[..4] {
            assert_eq!(e.value_id, value_ids[0], "{e:?}");
        }
        assert_eq!(events[4].value_id, value_ids[1]);
        assert_ne!(value_ids[0], value_ids[1]);
        for e in &events {
            assert_eq!(e.key_id, Some(key_ids[0]), "{e:?}");
        }
        let key_of = |e: &Decoded| match e.key.as_ref().map(|k| field(k, "id")) {
            Some(Av::Int(i)) => *i,
            other => panic!("key: {other:?}"),
        };
        let keys: Vec<i32> = events.iter().map(key_of).collect();
        assert_eq!(keys, [0, 1, 1, 0, 2]);
        let after = events[4].after.as_ref().unwrap();
        assert_eq!(opt(field(after, "n")), Some(&Av::Int(22)));
        assert_eq!(opt(field(after, "t")), Some(&Av::String("two".into())));
        assert_eq!(
            opt(field(events[2].after.as_ref().unwrap(), "t")),
            Some(&Av::String("uno".into()))
        );
        // The consumer fetched each id once (3 schemas), by id.
        let gets: Vec<String> = reg
            .seen()
            .into_iter()
            .filter(|s| s.method == "GET")
            .map(|s| s.path)
            .collect();
        assert_eq!(gets.len(), 3, "{gets:?}");
        assert!(
            gets.iter().all(|p| p.starts_with("/schemas/ids/")),
            "{gets:?}"
        );

        // The schemas topic keeps being written: the key and both envelope versions.
        let schema_records = read_all(&env.log, &schemas_topic(PREFIX, name)).await;
        assert_eq!(schema_records.len(), 3, "schemas topic records");
        // What the registry holds is exactly what the schemas topic holds.
        let mut topic_schemas: Vec<String> = schema_records
            .iter()
            .map(|r| String::from_utf8(r.record.value.clone().unwrap()).unwrap())
            .collect();
        let mut registered: Vec<String> = value_ids
            .iter()
            .chain(&key_ids)
            .map(|id| reg.schema(*id).unwrap())
            .collect();
        topic_schemas.sort();
        registered.sort();
        assert_eq!(topic_schemas, registered);
    })
    .await;
}

/// The registry down (connection refused), then answering 500: the event that needs a new schema
/// is not written and the slot is not acknowledged past it, while capture keeps retrying; when
/// the registry is back the event is written with its new id and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_holds_back_the_slot_until_it_returns() {
    hard_timeout(150, async {
        let mut reg = Registry::start_new().await;
        let env = env("reg_down").await;
        // No heartbeats: the slot moves only with our own transactions.
        let (stop, mut capture) = start_capture(&env, &reg.url(), Duration::from_secs(3600));
        wait_records(&env, 1, 30, &mut capture).await;
        let name = &env.name;
        // A cached schema needs no registry: this one goes through while it is down.
        reg.stop().await;
        env.c
            .batch_execute(&format!(
                "INSERT INTO public.{name} VALUES (1, 'cached id')"
            ))
            .await
            .unwrap();
        wait_records(&env, 2, 30, &mut capture).await;
        let seen_before = reg.seen().len();

        env.c
            .batch_execute(&format!("ALTER TABLE public.{name} ADD COLUMN n int"))
            .await
            .unwrap();
        let inside = lsn_inside(
            &env.c,
            &format!("INSERT INTO public.{name} VALUES (2, 'new schema', 2)"),
        )
        .await;

        let check_held_back = |phase: &'static str| {
            let env = &env;
            async move {
                let until = Instant::now() + Duration::from_secs(4);
                let mut samples = 0;
                while Instant::now() < until {
                    let acked = confirmed_flush(&env.c, &env.slot).await;
                    assert!(
                        acked < inside,
                        "{phase}: slot acknowledged {acked:X} past the unwritten event ({inside:X})"
                    );
                    assert_eq!(
                        total(&env.log, &env.topic).await,
                        2,
                        "{phase}: nothing more written"
                    );
                    samples += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                assert!(samples >= 5);
            }
        };
        check_held_back("registry down").await;
        assert!(
            !capture.is_finished(),
            "capture gave up: {:?}",
            capture.await
        );

        reg.start().await;
        reg.fail_with(Some((500, 50001, "Error in the backend data store")));
        check_held_back("registry answering 500").await;
        assert!(
            !capture.is_finished(),
            "capture gave up: {:?}",
            capture.await
        );
        let failed = reg.seen()[seen_before..]
            .iter()
            .filter(|s| s.method == "POST" && s.status == 500)
            .count();
        assert!(
            failed >= 2,
            "registration retried while the registry failed ({failed} attempts)"
        );

        reg.fail_with(None);
        wait_records(&env, 3, 30, &mut capture).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while confirmed_flush(&env.c, &env.slot).await <= inside {
            assert!(
                Instant::now() < deadline,
                "slot not acknowledged past the event after recovery"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop_capture(stop, capture).await;

        let value_ids = reg.versions(&format!("{}-value", env.topic));
        assert_eq!(value_ids.len(), 2, "{value_ids:?}");
        let records = read_all(&env.log, &env.topic).await;
        let mut resolver = ConfluentResolver::new(client(&reg.url()));
        let events = decode_all(&records, &mut resolver).await;
        let ops: Vec<&str> = events.iter().map(|e| e.op.as_str()).collect();
        assert_eq!(ops, ["r", "c", "c"], "{events:#?}");
        assert_eq!(events[2].value_id, value_ids[1]);
        assert_eq!(
            confluent_schema_id(records[2].record.value.as_deref().unwrap()),
            Some(value_ids[1])
        );
        assert_eq!(
            opt(field(events[2].after.as_ref().unwrap(), "n")),
            Some(&Av::Int(2))
        );
    })
    .await;
}

/// A column type change the subject's compatibility level (BACKWARD) rejects: the registry answers
/// 409, capture stops with an operator error naming the subject and the registry's message, and
/// neither writes nor acknowledges the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_schema_stops_capture_with_an_operator_error() {
    hard_timeout(90, async {
        let reg = Registry::start_new().await;
        let env = env("reg_409").await;
        let (_stop, mut capture) = start_capture(&env, &reg.url(), Duration::from_secs(3600));
        wait_records(&env, 1, 30, &mut capture).await;
        let name = &env.name;
        env.c
            .batch_execute(&format!(
                "ALTER TABLE public.{name} ALTER COLUMN t TYPE int USING length(t)"
            ))
            .await
            .unwrap();
        let inside = lsn_inside(&env.c, &format!("INSERT INTO public.{name} VALUES (1, 1)")).await;
        let result = tokio::time::timeout(Duration::from_secs(30), &mut capture)
            .await
            .expect("capture stops on an incompatible schema")
            .expect("capture task panicked");
        let err = result.expect_err("capture fails");
        assert!(!err.is_retryable(), "{err}");
        let text = err.to_string();
        println!("operator error: {text}");
        let subject = format!("{}-value", env.topic);
        assert!(text.contains(&subject), "names the subject: {text}");
        assert!(
            text.contains("409") && text.contains("incompatible with an earlier schema"),
            "carries the registry's message: {text}"
        );
        assert_eq!(
            total(&env.log, &env.topic).await,
            1,
            "the event was not written"
        );
        let acked = confirmed_flush(&env.c, &env.slot).await;
        assert!(
            acked < inside,
            "slot acknowledged {acked:X} past the rejected event ({inside:X})"
        );
        assert_eq!(reg.versions(&subject).len(), 1);
    })
    .await;
}

/// `syncbridge run` with `log.kafka.schema_registry` (basic auth in the URL's user info): capture
/// registers and writes the Confluent wire format, the push processor resolves the ids through the
/// registry and the rows reach the list; the password never reaches the run log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncbridge_run_syncs_through_the_registry_wire_format() {
    hard_timeout(180, async {
        let reg = Registry::start_new().await;
        let password = "sr-pa55-w0rd";
        reg.require_auth("sb", password);
        let mut h = harness::Harness::new("regrun").await;
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, qty int);
             INSERT INTO public.{t} VALUES (1, 'one', 1), (2, 'two', 2);"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let n = h.name.clone();
        let list = format!("Reg {n}");
        let registry_url = reg.url().replace("http://", &format!("http://sb:{password}@"));
        let log = format!(
            "{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbr{}', schema_registry: '{registry_url}' }} }}",
            kafka_brokers(),
            &n[n.len() - 8..]
        );
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      qty: {{ field: Qty, type: number }}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&log, &sync);
        h.start(&file);
        h.wait_for("the snapshot rows in the list", || async {
            h.items(&list).await.len() == 2
        })
        .await;
        h.sql(&format!(
            "INSERT INTO public.{t} VALUES (3, 'three', 3); UPDATE public.{t} SET qty = 20 WHERE id = 2"
        ))
        .await;
        h.wait_for("the streamed insert and update in the list", || async {
            h.items(&list).await.len() == 3
                && h.item(&list, "2").await.is_some_and(|i| i["Qty"].as_f64() == Some(20.0))
        })
        .await;
        h.stop().await;

        let seen = reg.seen();
        let topic = format!("sbr{}.{n}.public.{t}", &n[n.len() - 8..]);
        assert_eq!(reg.versions(&format!("{topic}-value")).len(), 1, "{seen:#?}");
        assert_eq!(reg.versions(&format!("{topic}-key")).len(), 1, "{seen:#?}");
        assert!(seen.iter().all(|s| s.status == 200), "{seen:#?}");
        assert!(
            seen.iter().any(|s| s.method == "GET" && s.path.starts_with("/schemas/ids/")),
            "the processor resolved ids through the registry: {seen:#?}"
        );
        let run_log = h.run_log();
        assert!(run_log.contains("registered schema"), "{run_log}");
        assert!(!run_log.contains(password), "password in the run log:\n{run_log}");
    })
    .await;
}
