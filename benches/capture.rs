//! Capture throughput benchmark (issue 4 performance goals).
//!
//! One run, against the local stack (`ops/bench capture` brings it up and sets the environment):
//!
//! 1. A mixed-type table (bigint key, int, text, numeric(12,2), float8, timestamptz, bool, uuid,
//!    jsonb, date, nullable text) gets a publication and a pgoutput slot; three copies of that slot
//!    are made with `pg_copy_logical_replication_slot`, so all consumers read the same WAL.
//! 2. Three phases, each `ROWS` rows in transactions of `TXN_ROWS`: INSERT, then UPDATE, then
//!    DELETE. After each phase's load, in this order and one at a time:
//!    - `pg_recvlogical` (pgoutput, `proto_version=1`, to `/dev/null`, `--endpos` = the phase end);
//!    - the bare decoder: capture's replication stream and pgoutput parser (`pg_walstream`, the
//!      same settings), every message parsed and dropped, commits acknowledged at once — the
//!      ceiling for capture on this machine, measured in the same run;
//!    - our capture (`capture::run` + `LogSink`, production settings except a 100 ms feedback
//!      interval) into the embedded log;
//!    - the same into Kafka (tansu on loopback, production producer settings);
//!
//!    each timed from start until the phase's end is acknowledged: `pg_recvlogical` exits at its
//!    end position, our capture's slot `confirmed_flush_lsn` passes the phase's last commit.
//!    Every consumer starts a fresh session per phase (connect, start replication), the same for all.
//! 3. The initial snapshot of a `ROWS`-row table by a fresh pipeline (slot creation with an exported
//!    snapshot included), into the embedded log and into Kafka, timed until the snapshot progress
//!    record says complete.
//!
//! Prints rows/s, the ratios to `pg_recvlogical` and to the bare decoder and peak RSS per phase and
//! consumer, then whether each goal is met (embedded ≥ 0.9× the bare decoder and ≥ 1.0×
//! pg_recvlogical, Kafka ≥ 0.9× pg_recvlogical, RSS ≤ 150 MB, snapshot ≥ 250k rows/s, issue 22). It never
//! fails on timing; it fails (exit 1) only when a step breaks or exceeds its timeout. Slots,
//! publications, tables and Kafka topics it created are dropped at the end, also on failure or
//! Ctrl-C.
//!
//! Peak RSS is the capture's process (this one) during each run: `VmHWM` after resetting it through
//! `/proc/self/clear_refs`, so it also counts what the bench itself holds (an upper bound).
//!
//! Environment: `DATABASE_URL`, `KAFKA_BROKERS` (from `ops/stack env`), `CAPTURE_BENCH_ROWS`
//! (1000000), `CAPTURE_BENCH_TXN_ROWS` (10000), `CAPTURE_BENCH_KAFKA` (`0` skips Kafka),
//! `CAPTURE_BENCH_KAFKA_BATCH_RECORDS` (librdkafka `batch.num.messages`; unset = production
//! default), `CAPTURE_BENCH_STEP_TIMEOUT_SECS` (120 + rows/2000), `CAPTURE_BENCH_TIMEOUT_SECS`
//! (whole run, 600 + rows × 3 ms), `PG_RECVLOGICAL` (path; default from the stack or PATH),
//! `RUST_LOG` (capture logs on stderr). Experiment knobs (not production settings):
//! `CAPTURE_BENCH_SLED_CACHE_MB`, `CAPTURE_BENCH_BATCH_EVENTS`, `CAPTURE_BENCH_SNAPSHOT_CHUNK`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use syncbridge::capture::snapshot::{FileProgress, SnapshotProgress, SnapshotState, TableProgress};
use syncbridge::capture::{CaptureConfig, LogSink, TableSpec};
use syncbridge::event::{schemas_topic, topic_name};
use syncbridge::log::{
    AnyLog, CancellationToken, EmbeddedLogConfig, EventLog, KafkaLogConfig, LogConfig,
};
use syncbridge::runtime::TABLE_TOPIC_PARTITIONS;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

/// Topic prefix, as `syncbridge run` uses by default.
const PREFIX: &str = "syncbridge";
const MB: f64 = 1024.0;

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Debug, Clone)]
struct Settings {
    url: String,
    brokers: Option<String>,
    kafka_batch_records: Option<u32>,
    rows: u64,
    txn_rows: u64,
    step_timeout: Duration,
    total_timeout: Duration,
    recvlogical: PathBuf,
    /// Experiment knobs (unset = production defaults).
    sled_cache_mb: Option<u64>,
    batch_events: Option<usize>,
    snapshot_chunk: Option<usize>,
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Result<Option<T>> {
    match env_opt(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .map(Some)
            .map_err(|_| anyhow!("{name}={v:?} is not a valid number")),
    }
}

impl Settings {
    fn from_env() -> Result<Self> {
        let url = env_opt("DATABASE_URL").context(
            "DATABASE_URL is not set: run `ops/bench capture`, or `ops/stack up` and \
             `eval \"$(ops/stack env)\"` first",
        )?;
        let kafka = env_opt("CAPTURE_BENCH_KAFKA").is_none_or(|v| v != "0");
        let brokers = if kafka {
            Some(env_opt("KAFKA_BROKERS").context(
                "KAFKA_BROKERS is not set (or set CAPTURE_BENCH_KAFKA=0 to skip the Kafka runs)",
            )?)
        } else {
            None
        };
        let rows: u64 = env_num("CAPTURE_BENCH_ROWS")?.unwrap_or(1_000_000);
        if rows == 0 {
            bail!("CAPTURE_BENCH_ROWS must be at least 1");
        }
        let txn_rows: u64 = env_num("CAPTURE_BENCH_TXN_ROWS")?
            .unwrap_or(10_000)
            .clamp(1, rows);
        let step = env_num("CAPTURE_BENCH_STEP_TIMEOUT_SECS")?.unwrap_or(120 + rows / 2000);
        let total = env_num("CAPTURE_BENCH_TIMEOUT_SECS")?.unwrap_or(600 + rows * 3 / 1000);
        Ok(Self {
            url,
            brokers,
            kafka_batch_records: env_num("CAPTURE_BENCH_KAFKA_BATCH_RECORDS")?,
            rows,
            txn_rows,
            step_timeout: Duration::from_secs(step),
            total_timeout: Duration::from_secs(total),
            recvlogical: find_recvlogical(),
            sled_cache_mb: env_num("CAPTURE_BENCH_SLED_CACHE_MB")?,
            batch_events: env_num("CAPTURE_BENCH_BATCH_EVENTS")?,
            snapshot_chunk: env_num("CAPTURE_BENCH_SNAPSHOT_CHUNK")?,
        })
    }

    fn kafka_log(&self) -> Result<AnyLog> {
        let brokers = self.brokers.clone().context("Kafka runs are disabled")?;
        let mut cfg = KafkaLogConfig::new(brokers);
        // As `syncbridge run` does: the capture sink already names topics `<prefix>.<pipeline>.…`.
        cfg.topic_prefix = String::new();
        cfg.producer_batch_records = self.kafka_batch_records;
        Ok(AnyLog::open(LogConfig::Kafka(cfg))?)
    }

    fn embedded_log(&self, dir: &Path) -> Result<AnyLog> {
        let mut cfg = EmbeddedLogConfig::new(dir);
        if let Some(mb) = self.sled_cache_mb {
            cfg.cache_capacity_bytes = mb * 1024 * 1024;
        }
        Ok(AnyLog::open(LogConfig::Embedded(cfg))?)
    }

    /// The non-default knobs in effect, for the header.
    fn knobs(&self) -> String {
        let mut k = Vec::new();
        if let Some(mb) = self.sled_cache_mb {
            k.push(format!("sled cache {mb} MB"));
        }
        if let Some(n) = self.batch_events {
            k.push(format!("batch_max_events {n}"));
        }
        if let Some(n) = self.snapshot_chunk {
            k.push(format!("snapshot_chunk_size {n}"));
        }
        if let Ok(v) = std::env::var("MALLOC_ARENA_MAX") {
            k.push(format!("MALLOC_ARENA_MAX={v}"));
        }
        if k.is_empty() {
            "production defaults".into()
        } else {
            k.join(", ")
        }
    }
}

/// `PG_RECVLOGICAL`, else the stack's PostgreSQL bin directory, else the Debian 15 path, else PATH.
fn find_recvlogical() -> PathBuf {
    if let Some(p) = env_opt("PG_RECVLOGICAL") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stack = env_opt("SYNCBRIDGE_STACK_DIR").map_or_else(|| root.join(".stack"), PathBuf::from);
    let version = env_opt("SYNCBRIDGE_PG_VERSION").unwrap_or_else(|| "15".into());
    if let Ok(bindir) = std::fs::read_to_string(stack.join(format!("pg{version}/bindir"))) {
        let p = Path::new(bindir.trim()).join("pg_recvlogical");
        if p.exists() {
            return p;
        }
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/pg_recvlogical"));
    if debian.exists() {
        return debian;
    }
    PathBuf::from("pg_recvlogical")
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_mb(kb: Option<u64>) -> String {
    kb.map_or_else(|| "n/a".into(), |kb| format!("{:.0} MB", kb as f64 / MB))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

async fn connect(url: &str) -> Result<Client> {
    let (c, conn) =
        tokio::time::timeout(Duration::from_secs(15), tokio_postgres::connect(url, NoTls))
            .await
            .context("connecting to DATABASE_URL timed out")?
            .context("connecting to DATABASE_URL")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

async fn lsn_of(c: &Client, expr: &str) -> Result<u64> {
    let s: String = c
        .query_one(&format!("SELECT ({expr} - '0/0'::pg_lsn)::text"), &[])
        .await?
        .get(0);
    Ok(s.parse()?)
}

async fn confirmed_flush(c: &Client, slot: &str) -> Result<Option<u64>> {
    let row = c
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok()))
}

// ---------------------------------------------------------------------------------------------
// Cleanup: everything the bench creates is registered here before it exists.

#[derive(Debug, Default)]
struct Objects {
    slots: Vec<String>,
    publications: Vec<String>,
    tables: Vec<String>,
    topics: Vec<String>,
}

#[derive(Debug)]
struct Cleanup {
    url: String,
    brokers: Option<String>,
    objects: Mutex<Objects>,
    done: AtomicBool,
}

impl Cleanup {
    fn new(url: String, brokers: Option<String>) -> Self {
        Self {
            url,
            brokers,
            objects: Mutex::new(Objects::default()),
            done: AtomicBool::new(false),
        }
    }

    fn with<F: FnOnce(&mut Objects)>(&self, f: F) {
        f(&mut self.objects.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn slot(&self, name: &str) {
        self.with(|o| o.slots.push(name.into()));
    }

    fn publication(&self, name: &str) {
        self.with(|o| o.publications.push(name.into()));
    }

    fn table(&self, name: &str) {
        self.with(|o| o.tables.push(name.into()));
    }

    fn topic(&self, name: String) {
        self.with(|o| o.topics.push(name));
    }

    /// Drops slots (ending their walsenders first), publications, tables and Kafka topics. Runs
    /// once; blocking, on its own thread and runtime, so it is safe from `Drop` anywhere.
    fn run(&self) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let objects = std::mem::take(&mut *self.objects.lock().unwrap_or_else(|e| e.into_inner()));
        let (url, brokers) = (self.url.clone(), self.brokers.clone());
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                match tokio::time::timeout(
                    Duration::from_secs(90),
                    drop_objects(&url, brokers.as_deref(), &objects),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("cleanup: {e:#}; leftovers: {objects:?}"),
                    Err(_) => eprintln!("cleanup timed out after 90 s; leftovers: {objects:?}"),
                }
            });
        })
        .join();
        if joined.is_err() {
            eprintln!("cleanup thread panicked");
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

async fn drop_objects(url: &str, brokers: Option<&str>, o: &Objects) -> Result<()> {
    if !o.slots.is_empty() || !o.publications.is_empty() || !o.tables.is_empty() {
        let c = connect(url).await?;
        for slot in &o.slots {
            // A stopped reader's walsender can outlive it briefly: end it and retry.
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let _ = c
                    .execute(
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND active_pid IS NOT NULL",
                        &[slot],
                    )
                    .await;
                let r = c
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                        &[slot],
                    )
                    .await;
                match r {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("cleanup: could not drop slot {slot}: {e}");
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        for p in &o.publications {
            c.batch_execute(&format!("DROP PUBLICATION IF EXISTS {p}"))
                .await?;
        }
        for t in &o.tables {
            c.batch_execute(&format!("DROP TABLE IF EXISTS {t}"))
                .await?;
        }
    }
    if let (Some(brokers), false) = (brokers, o.topics.is_empty()) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let names: Vec<&str> = o.topics.iter().map(String::as_str).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
        match tokio::time::timeout(Duration::from_secs(30), admin.delete_topics(&names, &opts))
            .await
        {
            Ok(Ok(results)) => {
                for r in results {
                    if let Err((topic, e)) = r {
                        eprintln!("cleanup: could not delete Kafka topic {topic}: {e}");
                    }
                }
            }
            Ok(Err(e)) => eprintln!("cleanup: could not delete Kafka topics {names:?}: {e}"),
            Err(_) => eprintln!("cleanup: deleting Kafka topics {names:?} timed out"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Workload

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Insert,
    Update,
    Delete,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }

    fn sql(self, table: &str, lo: u64, hi: u64) -> String {
        match self {
            Self::Insert => insert_sql(table, lo, hi),
            Self::Update => format!(
                "UPDATE {table} SET qty = qty + 1, price = price + 1, score = score * 2, \
                 active = NOT active, attrs = attrs || '{{\"u\": 1}}', note = 'updated', \
                 created_at = created_at + interval '1 day' WHERE id BETWEEN {lo} AND {hi}"
            ),
            Self::Delete => format!("DELETE FROM {table} WHERE id BETWEEN {lo} AND {hi}"),
        }
    }
}

fn create_table_sql(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            id bigint PRIMARY KEY,
            qty int NOT NULL,
            name text NOT NULL,
            price numeric(12,2),
            score float8,
            created_at timestamptz NOT NULL,
            active bool NOT NULL,
            ref uuid NOT NULL,
            attrs jsonb,
            due date,
            note text
        )"
    )
}

fn insert_sql(table: &str, lo: u64, hi: u64) -> String {
    format!(
        "INSERT INTO {table} SELECT g, (g % 1000)::int, 'item ' || g, \
         ((g % 100000) / 100.0)::numeric(12,2), g / 7.0, \
         timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', g % 2 = 0, \
         md5(g::text)::uuid, jsonb_build_object('g', g, 'tags', jsonb_build_array('a', 'b')), \
         date '2024-01-01' + (g % 365)::int, CASE WHEN g % 3 = 0 THEN NULL ELSE 'note ' || g END \
         FROM generate_series({lo}::bigint, {hi}::bigint) g"
    )
}

/// Where a phase ends in the WAL.
#[derive(Debug, Clone, Copy)]
struct PhaseEnd {
    /// Insert position read inside the phase's last transaction, just before COMMIT: the commit
    /// record ends after it, so `confirmed_flush_lsn >= before_commit` means that commit is
    /// acknowledged (our capture acknowledges commit end LSNs only).
    before_commit: u64,
    /// Insert position right after that COMMIT: `pg_recvlogical --endpos`.
    after_commit: u64,
    load_secs: f64,
}

/// Runs a phase in transactions of `txn_rows` rows (autocommit statements; the last one inside
/// BEGIN/COMMIT to read its end). A CHECKPOINT before the last transaction logs a running-xacts
/// record there, so the slots' restart point moves close to the phase end once it is acknowledged
/// and the next session of every consumer re-reads little of this phase.
async fn load_phase(c: &Client, s: &Settings, table: &str, phase: Phase) -> Result<PhaseEnd> {
    let t0 = Instant::now();
    let batches = s.rows.div_ceil(s.txn_rows);
    for b in 0..batches {
        let lo = b * s.txn_rows + 1;
        let hi = ((b + 1) * s.txn_rows).min(s.rows);
        let sql = phase.sql(table, lo, hi);
        if t0.elapsed() > s.step_timeout {
            bail!(
                "loading the {} phase exceeded its {} s timeout",
                phase.name(),
                s.step_timeout.as_secs()
            );
        }
        if b + 1 < batches {
            c.batch_execute(&sql).await?;
            continue;
        }
        c.batch_execute("CHECKPOINT").await?;
        c.batch_execute("BEGIN").await?;
        c.batch_execute(&sql).await?;
        let before_commit = lsn_of(c, "pg_current_wal_insert_lsn()").await?;
        c.batch_execute("COMMIT").await?;
        let after_commit = lsn_of(c, "pg_current_wal_insert_lsn()").await?;
        return Ok(PhaseEnd {
            before_commit,
            after_commit,
            load_secs: t0.elapsed().as_secs_f64(),
        });
    }
    unreachable!("rows >= 1, so there is a last batch")
}

// ---------------------------------------------------------------------------------------------
// Consumers

#[derive(Debug, Clone, Copy)]
struct Measured {
    secs: f64,
    /// Peak RSS in kB of the measured process.
    peak_kb: Option<u64>,
    /// RSS in kB once connections and log were open, before capture started (our capture only).
    base_kb: Option<u64>,
    /// Seconds inside the sink's append (our capture only).
    sink_secs: Option<f64>,
    /// Of that, seconds inside the log's append (our capture only).
    log_secs: Option<f64>,
    /// Seconds the reader waited for the sink task (all batches in flight not yet durable).
    wait_secs: Option<f64>,
}

/// `pg_recvlogical --start` on `slot` until `endpos`, output to /dev/null.
async fn run_recvlogical(
    s: &Settings,
    slot: &str,
    publication: &str,
    endpos: u64,
) -> Result<Measured> {
    let mut cmd = tokio::process::Command::new(&s.recvlogical);
    cmd.arg("-d")
        .arg(&s.url)
        .arg(format!("--slot={slot}"))
        .arg("--start")
        .arg("--no-loop")
        .arg("-f")
        .arg("/dev/null")
        .arg("-o")
        .arg("proto_version=1")
        .arg("-o")
        .arg(format!("publication_names={publication}"))
        .arg(format!("--endpos={}", fmt_lsn(endpos)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", s.recvlogical.display()))?;
    let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    let mut stderr = child.stderr.take();
    let err_reader = tokio::spawn(async move {
        let mut buf = String::new();
        if let Some(e) = stderr.as_mut() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut buf).await;
        }
        buf
    });
    let mut peak: Option<u64> = None;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if let Some(kb) = status_kb(&pid, "VmHWM:") {
                    peak = Some(peak.map_or(kb, |p| p.max(kb)));
                }
                if t0.elapsed() > s.step_timeout {
                    let _ = child.kill().await;
                    bail!("pg_recvlogical on {slot} exceeded its {} s timeout", s.step_timeout.as_secs());
                }
            }
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    let err = err_reader.await.unwrap_or_default();
    if !status.success() {
        bail!("pg_recvlogical on {slot} failed ({status}): {}", err.trim());
    }
    Ok(Measured {
        secs,
        peak_kb: peak,
        base_kb: None,
        sink_secs: None,
        log_secs: None,
        wait_secs: None,
    })
}

/// Cancels and aborts a capture task when dropped (error paths, timeouts).
#[derive(Debug)]
struct CaptureTask {
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), syncbridge::capture::CaptureError>>>,
}

impl CaptureTask {
    fn spawn(config: CaptureConfig, log: Arc<AnyLog>) -> Self {
        let stop = CancellationToken::new();
        let sink = LogSink::new(log, PREFIX, &config.pipeline, TABLE_TOPIC_PARTITIONS);
        let handle = tokio::spawn(syncbridge::capture::run(config, sink, stop.clone()));
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Cancels and waits (bounded) for a clean end.
    async fn stop(mut self) -> Result<()> {
        self.stop.cancel();
        let Some(mut handle) = self.handle.take() else {
            return Ok(());
        };
        match tokio::time::timeout(Duration::from_secs(30), &mut handle).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow!("capture failed: {e}")),
            Ok(Err(join)) => Err(anyhow!("capture task: {join}")),
            Err(_) => {
                handle.abort();
                Err(anyhow!("capture did not stop within 30 s of cancellation"))
            }
        }
    }
}

impl Drop for CaptureTask {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

fn capture_config(
    s: &Settings,
    pipeline: &str,
    table: &str,
    slot: &str,
    publication: &str,
    state_dir: &Path,
) -> CaptureConfig {
    let mut c = CaptureConfig::new(
        pipeline,
        s.url.clone(),
        vec![TableSpec::parse(table)],
        state_dir,
    );
    c.slot_name = slot.into();
    c.publication_name = publication.into();
    // Acknowledgements reach the server within 100 ms (default 500 ms), so the measured time is
    // the capture's work, not the wait for the next status update.
    c.feedback_interval = Duration::from_millis(100);
    c.max_backoff = Duration::from_secs(2);
    c.progress_bar = false;
    if let Some(n) = s.batch_events {
        c.batch_max_events = n;
    }
    if let Some(n) = s.snapshot_chunk {
        c.snapshot_chunk_size = n;
    }
    c
}

/// Runs capture from the slot's position until its `confirmed_flush_lsn` reaches `target`;
/// returns the seconds from start to acknowledgement.
async fn run_capture(
    s: &Settings,
    observer: &Client,
    log: Arc<AnyLog>,
    config: CaptureConfig,
    target: u64,
) -> Result<f64> {
    let slot = config.slot_name.clone();
    let t0 = Instant::now();
    let task = CaptureTask::spawn(config, log);
    loop {
        if confirmed_flush(observer, &slot)
            .await?
            .is_some_and(|l| l >= target)
        {
            break;
        }
        if task.is_finished() {
            task.stop().await?;
            bail!(
                "capture on slot {slot} stopped before reaching {}",
                fmt_lsn(target)
            );
        }
        if t0.elapsed() > s.step_timeout {
            bail!(
                "capture on slot {slot} did not acknowledge {} within {} s (at {})",
                fmt_lsn(target),
                s.step_timeout.as_secs(),
                confirmed_flush(observer, &slot)
                    .await?
                    .map_or_else(|| "none".into(), fmt_lsn)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    task.stop().await?;
    Ok(secs)
}

/// The bare-decoder baseline: capture's own replication stream and pgoutput parser
/// (`pg_walstream`, same settings), every message parsed and dropped, each commit acknowledged at
/// once. What capture adds on top (row assembly, Avro encoding, the durable log append) is the
/// difference to this run. Returns the seconds until the slot's `confirmed_flush_lsn` reaches
/// `target`, timed like [`run_capture`].
async fn run_decoder(
    s: &Settings,
    observer: &Client,
    config: &CaptureConfig,
    target: u64,
) -> Result<f64> {
    use pg_walstream::{LogicalReplicationMessage as M, LogicalReplicationParser};
    let slot = config.slot_name.clone();
    let t0 = Instant::now();
    let start = confirmed_flush(observer, &slot)
        .await?
        .context("the decoder's slot has no confirmed position")?;
    let mut stream = pg_walstream::LogicalReplicationStream::new(
        &config.replication_url(),
        syncbridge::capture::stream_config(config, false, false),
    )
    .await?;
    stream.start(Some(start)).await?;
    let mut parser = LogicalReplicationParser::with_protocol_version(2);
    let never = CancellationToken::new();
    let mut acked = 0u64;
    let mut tick = tokio::time::interval(config.feedback_interval / 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                stream.maybe_send_feedback().await;
                if acked >= target
                    && confirmed_flush(observer, &slot).await?.is_some_and(|l| l >= target)
                {
                    break;
                }
                if t0.elapsed() > s.step_timeout {
                    bail!("the bare decoder on slot {slot} did not reach {} within {} s",
                        fmt_lsn(target), s.step_timeout.as_secs());
                }
            }
            raw = stream.next_raw_event(&never) => {
                let raw = raw?;
                if raw.data.is_empty() {
                    continue;
                }
                let msg = parser.parse_wal_message_bytes(raw.data)?;
                if let M::Commit { end_lsn, .. } = msg.message {
                    acked = acked.max(end_lsn);
                    stream.shared_lsn_feedback.update_applied_lsn(end_lsn);
                }
            }
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// A fresh pipeline (no slot yet) over `table`: seconds until its initial snapshot is complete,
/// and until its slot existed.
async fn run_snapshot(
    s: &Settings,
    observer: &Client,
    log: Arc<AnyLog>,
    config: CaptureConfig,
) -> Result<(f64, f64)> {
    let slot = config.slot_name.clone();
    let progress = FileProgress::new(&config.state_dir, &slot);
    let t0 = Instant::now();
    let task = CaptureTask::spawn(config, log);
    let mut slot_secs = None;
    loop {
        if slot_secs.is_none() && confirmed_flush(observer, &slot).await?.is_some() {
            slot_secs = Some(t0.elapsed().as_secs_f64());
        }
        if progress
            .load()
            .ok()
            .flatten()
            .is_some_and(|st| st.consistent_point != 0 && st.is_complete())
        {
            break;
        }
        if task.is_finished() {
            task.stop().await?;
            bail!("capture on slot {slot} stopped during the snapshot");
        }
        if t0.elapsed() > s.step_timeout {
            bail!(
                "the snapshot on slot {slot} did not complete within {} s",
                s.step_timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    task.stop().await?;
    Ok((secs, slot_secs.unwrap_or(0.0)))
}

/// Records in a topic of an embedded log (exact there; tansu reads end offsets by batch).
async fn embedded_count(log: &AnyLog, topic: &str) -> i64 {
    log.end_offsets(topic)
        .await
        .map(|e| e.iter().sum())
        .unwrap_or(-1)
}

// ---------------------------------------------------------------------------------------------
// Capture runs in child processes: a fresh process per run, as a pipeline would be, so its peak
// RSS is the capture's own (not what earlier runs left in this process's heap).

/// The environment variable that turns this binary into one capture run (JSON [`Job`]).
const JOB_ENV: &str = "CAPTURE_BENCH_JOB";

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    /// A fresh pipeline's initial snapshot (else: stream until `target` is acknowledged).
    snapshot: bool,
    /// The embedded log's directory; `None` means Kafka.
    embedded: Option<PathBuf>,
    pipeline: String,
    table: String,
    slot: String,
    publication: String,
    state_dir: PathBuf,
    target: u64,
    /// A topic whose records to count afterwards (embedded only).
    count_topic: Option<String>,
    /// The bare-decoder baseline: read and parse the stream, write nothing.
    #[serde(default)]
    decoder: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct JobResult {
    secs: f64,
    /// VmHWM of the child at the end: the peak of the whole process.
    peak_kb: Option<u64>,
    /// VmRSS once the runtime, connections and log were open, just before capture started.
    base_kb: Option<u64>,
    slot_secs: Option<f64>,
    stored: Option<i64>,
    /// Seconds spent inside `EventSink::append` (Avro encoding + log append), from the capture's
    /// own `syncbridge_capture_log_append_seconds` histogram.
    sink_secs: Option<f64>,
    /// Of that, seconds inside `EventLog::append` (`syncbridge_log_append_seconds`).
    log_secs: Option<f64>,
    /// Seconds the reader stood still waiting for the sink task
    /// (`syncbridge_capture_sink_wait_seconds`).
    #[serde(default)]
    wait_secs: Option<f64>,
}

/// Sum of `<name>_sum` over all label sets in a Prometheus text rendering.
fn prometheus_sum(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}_sum");
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            total = Some(total.unwrap_or(0.0) + v);
        }
    }
    total
}

/// The child side: one run, result as `RESULT <json>` on stdout.
async fn job_main(s: &Settings, job: Job) -> Result<JobResult> {
    // As in `syncbridge run`: the process-wide Prometheus recorder (metrics cost included).
    let metrics = syncbridge::telemetry::prometheus().ok();
    let observer = connect(&s.url).await?;
    let log = Arc::new(match &job.embedded {
        Some(dir) => s.embedded_log(dir)?,
        None => s.kafka_log()?,
    });
    let config = capture_config(
        s,
        &job.pipeline,
        &job.table,
        &job.slot,
        &job.publication,
        &job.state_dir,
    );
    let base_kb = status_kb("self", "VmRSS:");
    let (secs, slot_secs) = if job.decoder {
        (run_decoder(s, &observer, &config, job.target).await?, None)
    } else if job.snapshot {
        let (secs, slot) = run_snapshot(s, &observer, log.clone(), config).await?;
        (secs, Some(slot))
    } else {
        (
            run_capture(s, &observer, log.clone(), config, job.target).await?,
            None,
        )
    };
    let peak_kb = status_kb("self", "VmHWM:");
    let stored = match &job.count_topic {
        Some(topic) => Some(embedded_count(&log, topic).await),
        None => None,
    };
    let rendered = metrics.map(|m| m.render()).unwrap_or_default();
    let sink_secs = prometheus_sum(
        &rendered,
        syncbridge::telemetry::metrics::SINK_APPEND_SECONDS,
    );
    let log_secs = prometheus_sum(
        &rendered,
        syncbridge::telemetry::metrics::LOG_APPEND_SECONDS,
    );
    // Absent until the reader first waited: no waiting is 0.
    let wait_secs = sink_secs.map(|_| {
        prometheus_sum(
            &rendered,
            syncbridge::telemetry::metrics::CAPTURE_SINK_WAIT_SECONDS,
        )
        .unwrap_or(0.0)
    });
    Ok(JobResult {
        secs,
        peak_kb,
        base_kb,
        slot_secs,
        stored,
        sink_secs,
        log_secs,
        wait_secs,
    })
}

/// The parent side: runs `job` in a child process of this binary (killed on timeout or drop).
async fn run_job(s: &Settings, job: &Job) -> Result<JobResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env(JOB_ENV, serde_json::to_string(job)?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true);
    let child = cmd.spawn().context("starting a capture run")?;
    let out = tokio::time::timeout(
        s.step_timeout + Duration::from_secs(60),
        child.wait_with_output(),
    )
    .await
    .map_err(|_| anyhow!("the capture run on slot {} did not end in time", job.slot))??;
    if !out.status.success() {
        bail!(
            "the capture run on slot {} failed ({})",
            job.slot,
            out.status
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("the capture run printed no result")?;
    Ok(serde_json::from_str(line)?)
}

fn measured(r: &JobResult) -> Measured {
    Measured {
        secs: r.secs,
        peak_kb: r.peak_kb,
        base_kb: r.base_kb,
        sink_secs: r.sink_secs,
        log_secs: r.log_secs,
        wait_secs: r.wait_secs,
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark

#[derive(Debug, Clone)]
struct Line {
    phase: &'static str,
    consumer: &'static str,
    rows: u64,
    m: Measured,
}

impl Line {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.m.secs.max(1e-9)
    }
}

const RECV: &str = "pg_recvlogical";
const DECODER: &str = "bare decoder";
const EMB: &str = "capture → embedded";
const KAFKA: &str = "capture → kafka";

async fn bench(s: &Settings, cleanup: &Cleanup) -> Result<()> {
    let c = connect(&s.url).await?;
    let version: String = c.query_one("SHOW server_version", &[]).await?.get(0);
    let wal_level: String = c.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!("wal_level is {wal_level}, capture needs logical");
    }
    let recv_version = std::process::Command::new(&s.recvlogical)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .with_context(|| format!("running {} --version", s.recvlogical.display()))?;
    let leftovers: Vec<String> = c
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'sb\\_cbench\\_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !leftovers.is_empty() {
        eprintln!(
            "note: slots of an earlier, killed capture bench still exist (they retain WAL): {leftovers:?}; \
             drop them with SELECT pg_drop_replication_slot('<name>');"
        );
    }

    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let pipeline = format!("cbench_{id}");
    let table = format!("public.{pipeline}");
    let publication = format!("sb_{pipeline}");
    let slot_emb = format!("sb_{pipeline}");
    let slot_recv = format!("sb_{pipeline}_recv");
    let slot_kafka = format!("sb_{pipeline}_kafka");
    let slot_bare = format!("sb_{pipeline}_bare");
    let kafka = s.brokers.is_some();

    println!(
        "capture benchmark {} — {} rows per phase, {} rows per transaction",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        fmt_count(s.rows as f64),
        fmt_count(s.txn_rows as f64)
    );
    println!(
        "PostgreSQL {version}, {recv_version}, {} CPUs, load average {} at start; Kafka: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        match (&s.brokers, s.kafka_batch_records) {
            (None, _) => "skipped".to_string(),
            (Some(b), None) => format!("{b} (producer defaults)"),
            (Some(b), Some(n)) => format!("{b} (batch.num.messages={n})"),
        }
    );
    println!("capture settings: {}", s.knobs());

    // Table, publication, slot and its copies; snapshot progress "complete" for our two slots
    // (they start at the empty table, as if the pipeline had snapshotted it).
    cleanup.table(&table);
    c.batch_execute(&create_table_sql(&table)).await?;
    cleanup.publication(&publication);
    c.batch_execute(&format!(
        "CREATE PUBLICATION {publication} FOR TABLE {table}"
    ))
    .await?;
    cleanup.slot(&slot_emb);
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot_emb],
    )
    .await?;
    for copy in [&slot_recv, &slot_bare] {
        cleanup.slot(copy);
        c.execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&slot_emb, copy],
        )
        .await?;
    }
    if kafka {
        cleanup.slot(&slot_kafka);
        c.execute(
            "SELECT pg_copy_logical_replication_slot($1, $2)",
            &[&slot_emb, &slot_kafka],
        )
        .await?;
        cleanup.topic(topic_name(PREFIX, &pipeline, "public", &pipeline));
        cleanup.topic(schemas_topic(PREFIX, &pipeline));
    }
    let start = confirmed_flush(&c, &slot_emb)
        .await?
        .context("the new slot has no confirmed position")?;
    let work = tempfile::tempdir()?;
    let state_dir = work.path().join("state");
    let emb_dir = work.path().join("log");
    for slot in [&slot_emb, &slot_kafka] {
        let mut state = SnapshotState {
            slot: slot.clone(),
            consistent_point: start,
            tables: BTreeMap::new(),
        };
        state
            .tables
            .insert(table.clone(), TableProgress::Done { rows: 0 });
        FileProgress::new(&state_dir, slot).save(&state)?;
    }
    let table_topic = topic_name(PREFIX, &pipeline, "public", &pipeline);

    let mut lines: Vec<Line> = Vec::new();
    let mut loads: Vec<(Phase, f64)> = Vec::new();
    for (i, phase) in [Phase::Insert, Phase::Update, Phase::Delete]
        .into_iter()
        .enumerate()
    {
        eprintln!("[{}] loading {} rows…", phase.name(), s.rows);
        let end = load_phase(&c, s, &table, phase).await?;
        loads.push((phase, end.load_secs));
        eprintln!(
            "[{}] loaded in {:.1} s (ends at {}); pg_recvlogical…",
            phase.name(),
            end.load_secs,
            fmt_lsn(end.after_commit)
        );
        let m = run_recvlogical(s, &slot_recv, &publication, end.after_commit).await?;
        lines.push(Line {
            phase: phase.name(),
            consumer: RECV,
            rows: s.rows,
            m,
        });
        if confirmed_flush(&c, &slot_recv)
            .await?
            .is_none_or(|l| l < end.before_commit)
        {
            eprintln!(
                "note: pg_recvlogical did not confirm the phase end; its next session re-reads the tail"
            );
        }

        eprintln!("[{}] bare decoder…", phase.name());
        let job = Job {
            snapshot: false,
            embedded: Some(emb_dir.clone()),
            pipeline: pipeline.clone(),
            table: table.clone(),
            slot: slot_bare.clone(),
            publication: publication.clone(),
            state_dir: state_dir.clone(),
            target: end.before_commit,
            count_topic: None,
            decoder: true,
        };
        let r = run_job(s, &job).await?;
        lines.push(Line {
            phase: phase.name(),
            consumer: DECODER,
            rows: s.rows,
            m: measured(&r),
        });

        eprintln!("[{}] capture → embedded log…", phase.name());
        let job = Job {
            slot: slot_emb.clone(),
            count_topic: Some(table_topic.clone()),
            decoder: false,
            ..job
        };
        let r = run_job(s, &job).await?;
        let expected = s.rows as i64 * (i as i64 + 1);
        if r.stored != Some(expected) {
            eprintln!(
                "note: the embedded table topic holds {:?} events, {expected} expected \
                 (at-least-once re-deliveries?)",
                r.stored
            );
        }
        lines.push(Line {
            phase: phase.name(),
            consumer: EMB,
            rows: s.rows,
            m: measured(&r),
        });

        if kafka {
            eprintln!("[{}] capture → kafka…", phase.name());
            let job = Job {
                embedded: None,
                slot: slot_kafka.clone(),
                count_topic: None,
                ..job
            };
            let r = run_job(s, &job).await?;
            lines.push(Line {
                phase: phase.name(),
                consumer: KAFKA,
                rows: s.rows,
                m: measured(&r),
            });
        }
    }
    // The streaming slots are done: stop them retaining WAL before the snapshot load.
    for slot in [&slot_emb, &slot_recv, &slot_kafka, &slot_bare] {
        c.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[slot],
        )
        .await?;
    }

    // Initial snapshot of a ROWS-row table by fresh pipelines (they create slot and publication).
    let snap_table = format!("public.{pipeline}_snap");
    cleanup.table(&snap_table);
    c.batch_execute(&create_table_sql(&snap_table)).await?;
    eprintln!("[snapshot] loading {} rows…", s.rows);
    let t0 = Instant::now();
    let mut lo = 1;
    while lo <= s.rows {
        let hi = (lo + s.txn_rows - 1).min(s.rows);
        c.batch_execute(&insert_sql(&snap_table, lo, hi)).await?;
        if t0.elapsed() > s.step_timeout {
            bail!(
                "loading the snapshot table exceeded {} s",
                s.step_timeout.as_secs()
            );
        }
        lo = hi + 1;
    }
    c.batch_execute(&format!("VACUUM ANALYZE {snap_table}"))
        .await?;
    let snap_name = format!("{pipeline}_snap");
    let snap_topic = topic_name(PREFIX, &snap_name, "public", &snap_name);
    let mut snaps: Vec<(Line, f64)> = Vec::new();
    {
        eprintln!("[snapshot] capture → embedded log…");
        let slot = format!("sb_{snap_name}");
        cleanup.slot(&slot);
        cleanup.publication(&slot);
        let job = Job {
            snapshot: true,
            embedded: Some(work.path().join("snap-log")),
            pipeline: snap_name.clone(),
            table: snap_table.clone(),
            slot: slot.clone(),
            publication: slot.clone(),
            state_dir: work.path().join("snap-state"),
            target: 0,
            count_topic: Some(snap_topic.clone()),
            decoder: false,
        };
        let r = run_job(s, &job).await?;
        if r.stored != Some(s.rows as i64) {
            eprintln!(
                "note: the snapshot topic holds {:?} events, {} expected",
                r.stored, s.rows
            );
        }
        snaps.push((
            Line {
                phase: "snapshot",
                consumer: EMB,
                rows: s.rows,
                m: measured(&r),
            },
            r.slot_secs.unwrap_or(0.0),
        ));
    }
    if kafka {
        eprintln!("[snapshot] capture → kafka…");
        let name = format!("{pipeline}_snapk");
        let slot = format!("sb_{name}");
        cleanup.slot(&slot);
        cleanup.publication(&slot);
        cleanup.topic(topic_name(PREFIX, &name, "public", &snap_name));
        cleanup.topic(schemas_topic(PREFIX, &name));
        let job = Job {
            snapshot: true,
            embedded: None,
            pipeline: name.clone(),
            table: snap_table.clone(),
            slot: slot.clone(),
            publication: slot.clone(),
            state_dir: work.path().join("snapk-state"),
            target: 0,
            count_topic: None,
            decoder: false,
        };
        let r = run_job(s, &job).await?;
        snaps.push((
            Line {
                phase: "snapshot",
                consumer: KAFKA,
                rows: s.rows,
                m: measured(&r),
            },
            r.slot_secs.unwrap_or(0.0),
        ));
    }

    report(s, &lines, &loads, &snaps);
    Ok(())
}

fn report(s: &Settings, lines: &[Line], loads: &[(Phase, f64)], snaps: &[(Line, f64)]) {
    let mut all: Vec<Line> = lines.to_vec();
    // Totals over the three phases.
    for consumer in [RECV, DECODER, EMB, KAFKA] {
        let of: Vec<&Line> = lines.iter().filter(|l| l.consumer == consumer).collect();
        if of.is_empty() {
            continue;
        }
        all.push(Line {
            phase: "total",
            consumer,
            rows: of.iter().map(|l| l.rows).sum(),
            m: Measured {
                secs: of.iter().map(|l| l.m.secs).sum(),
                peak_kb: of.iter().filter_map(|l| l.m.peak_kb).max(),
                base_kb: of.iter().filter_map(|l| l.m.base_kb).min(),
                sink_secs: of.iter().map(|l| l.m.sink_secs).sum::<Option<f64>>(),
                log_secs: of.iter().map(|l| l.m.log_secs).sum::<Option<f64>>(),
                wait_secs: of.iter().map(|l| l.m.wait_secs).sum::<Option<f64>>(),
            },
        });
    }
    // Rate of `base` in the same phase (the totals compare with the totals).
    let base_rate = |base: &str, phase: &str| {
        all.iter()
            .find(|l| l.phase == phase && l.consumer == base)
            .map(Line::rate)
    };
    let ratio_to = |base: &str, l: &Line| base_rate(base, l.phase).map(|b| l.rate() / b);
    let ratio_of = |l: &Line| ratio_to(RECV, l);
    println!();
    println!(
        "{:<9} {:<20} {:>10} {:>8} {:>9} {:>15} {:>11} {:>9} {:>9} {:>8} {:>7} {:>8}",
        "phase",
        "consumer",
        "rows",
        "seconds",
        "rows/s",
        "vs recvlogical",
        "vs decoder",
        "peak RSS",
        "RSS start",
        "in sink",
        "in log",
        "rd waits"
    );
    let print = |l: &Line, ratio: String, vs_decoder: String| {
        let share = |t: Option<f64>| {
            t.map_or_else(
                || "-".into(),
                |t| format!("{:.0}%", 100.0 * t / l.m.secs.max(1e-9)),
            )
        };
        println!(
            "{:<9} {:<20} {:>10} {:>8.2} {:>9} {:>15} {:>11} {:>9} {:>9} {:>8} {:>7} {:>8}",
            l.phase,
            l.consumer,
            fmt_count(l.rows as f64),
            l.m.secs,
            fmt_count(l.rate()),
            ratio,
            vs_decoder,
            fmt_mb(l.m.peak_kb),
            l.m.base_kb.map_or_else(|| "-".into(), |b| fmt_mb(Some(b))),
            share(l.m.sink_secs),
            share(l.m.log_secs),
            share(l.m.wait_secs),
        );
    };
    let fmt_ratio = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}×"));
    for l in &all {
        print(l, fmt_ratio(ratio_of(l)), fmt_ratio(ratio_to(DECODER, l)));
    }
    for (l, slot_secs) in snaps {
        print(l, format!("slot {slot_secs:.2} s"), "-".into());
    }
    println!(
        "(seconds: start of the session until the phase end is acknowledged; peak RSS: VmHWM of \
         the process; RSS start: with log and connections open; in sink: share of the run inside \
         EventSink::append = Avro encoding + durable log append, on the sink task, overlapping the \
         reading; in log: of that, EventLog::append; rd waits: share of the run the reader stood \
         still because the batches in flight were not durable yet; slot: seconds until the \
         snapshot's slot existed)"
    );
    println!();
    println!(
        "load (not a goal): {}",
        loads
            .iter()
            .map(|(p, secs)| format!(
                "{} {} rows/s",
                p.name(),
                fmt_count(s.rows as f64 / secs.max(1e-9))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("load average at end: {}", load_average());

    // Goals.
    let verdict = |ok: bool| if ok { "goal met" } else { "goal NOT met" };
    println!();
    // Issue 22's goals: the embedded log within 10 % of the bare decoder, Kafka within 10 % of
    // pg_recvlogical, on every phase.
    for (consumer, base, goal) in [(EMB, DECODER, 0.9), (EMB, RECV, 1.0), (KAFKA, RECV, 0.9)] {
        let of: Vec<&Line> = all.iter().filter(|l| l.consumer == consumer).collect();
        if of.is_empty() {
            println!("{consumer} ≥ {goal:.1}× {base}: not run");
            continue;
        }
        let ratios: Vec<(&str, f64)> = of
            .iter()
            .filter_map(|l| ratio_to(base, l).map(|r| (l.phase, r)))
            .collect();
        let ok = ratios.iter().all(|(_, r)| *r >= goal);
        println!(
            "{consumer} ≥ {goal:.1}× {base}: {} — {}",
            ratios
                .iter()
                .map(|(p, r)| format!("{p} {r:.2}×"))
                .collect::<Vec<_>>()
                .join(", "),
            verdict(ok)
        );
    }
    let peaks: Vec<(&str, u64)> = all
        .iter()
        .filter(|l| l.phase == "total" && l.consumer != RECV && l.consumer != DECODER)
        .chain(snaps.iter().map(|(l, _)| l))
        .filter_map(|l| l.m.peak_kb.map(|kb| (l.consumer, kb)))
        .collect();
    let peak_max = peaks.iter().map(|(_, kb)| *kb).max();
    println!(
        "peak RSS ≤ 150 MB: {} — {}",
        all.iter()
            .filter(|l| l.phase == "total" && l.consumer != RECV && l.consumer != DECODER)
            .map(|l| format!("{} {}", l.consumer, fmt_mb(l.m.peak_kb)))
            .chain(snaps.iter().map(|(l, _)| format!(
                "snapshot {} {}",
                l.consumer,
                fmt_mb(l.m.peak_kb)
            )))
            .collect::<Vec<_>>()
            .join(", "),
        match peak_max {
            Some(kb) => verdict(kb as f64 / MB <= 150.0),
            None => "unknown (no /proc)",
        }
    );
    if let Some((l, _)) = snaps.iter().find(|(l, _)| l.consumer == EMB) {
        println!(
            "initial snapshot ≥ 250,000 rows/s: {} {} rows/s{} — {}",
            l.consumer,
            fmt_count(l.rate()),
            snaps
                .iter()
                .find(|(l, _)| l.consumer == KAFKA)
                .map(|(k, _)| format!(" ({} {} rows/s)", k.consumer, fmt_count(k.rate())))
                .unwrap_or_default(),
            verdict(l.rate() >= 250_000.0)
        );
    }
}

/// Runs one [`Job`] (this process is a child of the bench); returns the exit code.
fn child_main(settings: &Settings, job: &str) -> i32 {
    let job: Job = match serde_json::from_str(job) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("capture run: bad {JOB_ENV}: {e}");
            return 1;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(job_main(settings, job));
    rt.shutdown_timeout(Duration::from_secs(5));
    match result.and_then(|r| Ok(serde_json::to_string(&r)?)) {
        Ok(json) => {
            println!("RESULT {json}");
            0
        }
        Err(e) => {
            eprintln!("capture run failed: {e:#}");
            1
        }
    }
}

fn main() {
    if env_opt("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("capture bench: {e:#}");
            std::process::exit(1);
        }
    };
    if let Some(job) = env_opt(JOB_ENV) {
        std::process::exit(child_main(&settings, &job));
    }
    // Declared before the runtime, so it is dropped after it: tasks and children are gone by then.
    let cleanup = Cleanup::new(settings.url.clone(), settings.brokers.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            r = tokio::time::timeout(settings.total_timeout, bench(&settings, &cleanup)) => {
                r.unwrap_or_else(|_| Err(anyhow!(
                    "the benchmark exceeded its {} s overall timeout (CAPTURE_BENCH_TIMEOUT_SECS)",
                    settings.total_timeout.as_secs()
                )))
            }
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    cleanup.run();
    if let Err(e) = result {
        eprintln!("capture bench failed: {e:#}");
        std::process::exit(1);
    }
}
