//! Return-path benchmark (issue 6 performance goals): `ops/bench pull`.
//!
//! List edits made as a person → rows in PostgreSQL, measured end to end on the real binary:
//! - the Graph emulator runs in this process (`syncbridge::emulator::spawn`, memory only,
//!   throttling off), and so do the "person" (a `GraphClient` with the emulator's user client,
//!   like an edit in the browser) and a PostgreSQL reader;
//! - the pipeline is the release binary, `syncbridge run <pipeline.yaml>` in a child process
//!   (`PULL_BENCH_BIN`, default: the `syncbridge` binary cargo builds with this bench), with an
//!   embedded log in a temp dir and its control plane on a free port (its `/metrics` are read);
//! - PostgreSQL from `DATABASE_URL` (`ops/bench pull` starts the stack's): a fresh table
//!   `pl_<suffix> (id bigint primary key, title text not null, qty int)` synced to the list
//!   "Pull Bench <suffix>" (`title` → Title, `qty` → Qty) with `pull: { enabled: true,
//!   interval_ms: INTERVAL_MS }`.
//!
//! Set-up: `ITEMS` rows are inserted before the process starts; its snapshot pushes them (so every
//! item carries its `SyncKey`); the bench waits until the list holds them all and the return path
//! has been quiet for 3 s (our own creates come back through delta as echoes and are dropped).
//!
//! 1. **Latency** (paced): `RATE` person edits per second for `LATENCY_SECS` (scheduled send
//!    times, each edit a single `PATCH …/fields` of `Qty` on a different item). A reader queries
//!    PostgreSQL every `DB_POLL_MS` and stamps each edit when its row first shows the value written;
//!    latency = that stamp − the PATCH's acknowledgement (overstated by up to one reader period plus
//!    a query). p50/p90/p99/max.
//! 2. **Throughput** (burst): `EDITS` person edits (`Qty` of item `k mod ITEMS` = a value unique to
//!    edit `k`), `CONCURRENCY` PATCHes in flight, as fast as the emulator takes them. items/s end to
//!    end = `EDITS` / (first edit sent → last row showing its value); the edit rate itself is printed
//!    (it must be well above the end-to-end rate for the figure to mean the return path), and the
//!    latency percentiles of the burst (dominated by the backlog). Graph requests and RU of the
//!    burst are split into the person's PATCHes and the poller's delta pages.
//! 3. **Idle cost**: the process is stopped (SIGTERM) and started again with `interval_ms:
//!    IDLE_INTERVAL_MS` (resuming from its stored delta cursor). After its first poll, the bench
//!    waits half an interval, then reads the emulator's `ru_consumed` at the start and the end of a
//!    window of `IDLE_SECS` (a whole number of intervals, so the count of polls in it is exact)
//!    during which nothing changes. RU/min/list = ΔRU / window minutes (one list). Every request in
//!    the window is checked to be a delta GET (`syncbridge_pull_delta_polls_total` moved by the same
//!    count), i.e. the processor made no Graph call while idle. The same is measured briefly
//!    (`IDLE_FAST_SECS`) at `INTERVAL_MS` before the restart, for comparison.
//!
//! It never fails on timing: it prints the figures and whether the idle goal (≤ 2 RU/min/list at a
//! 30 s interval) is met. It exits 1 only when a step breaks or times out. The table, slot and
//! publication it created are dropped at the end, also on failure or Ctrl-C.
//!
//! Environment (defaults in brackets; `PULL_BENCH_QUICK=1` shrinks them): `DATABASE_URL`,
//! `PULL_BENCH_EDITS` [10000 | 1000], `PULL_BENCH_ITEMS` [= EDITS], `PULL_BENCH_CONCURRENCY`
//! [16], `PULL_BENCH_INTERVAL_MS` [500], `PULL_BENCH_RATE` [20], `PULL_BENCH_LATENCY_SECS`
//! [30 | 10], `PULL_BENCH_IDLE_INTERVAL_MS` [30000], `PULL_BENCH_IDLE_SECS` [180 | 60],
//! `PULL_BENCH_IDLE_FAST_SECS` [10], `PULL_BENCH_DB_POLL_MS` [20], `PULL_BENCH_BIN`,
//! `PULL_BENCH_LOG` [warn] (the child's `RUST_LOG`; its stderr goes to a file printed on failure).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use syncbridge::config::{GraphConfig, Secret};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};
use syncbridge::graph::{GraphClient, GraphClientConfig, ItemQuery, LimiterRegistry};
use tokio_postgres::{Client, NoTls};

/// The sync app's and the person's client-side budget: high enough never to pace.
const UNPACED_RU_PER_MINUTE: u32 = 1_000_000;
/// Qty values written by the latency phase: `LATENCY_BASE + j`.
const LATENCY_BASE: i32 = 1_000_000;
/// Qty values written by the burst: `BURST_BASE + k`.
const BURST_BASE: i32 = 2_000_000;
/// The issue's goal for an idle list at a 30 s interval.
const IDLE_GOAL_RU_PER_MIN: f64 = 2.0;

// ---------------------------------------------------------------------------------------------
// Settings

#[derive(Debug, Clone)]
struct Settings {
    url: String,
    quick: bool,
    edits: u64,
    items: u64,
    concurrency: usize,
    interval_ms: u64,
    rate: u64,
    latency_secs: u64,
    idle_interval_ms: u64,
    idle_secs: u64,
    idle_fast_secs: u64,
    db_poll_ms: u64,
    bin: PathBuf,
    child_log: String,
}

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match env_opt(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid number")),
    }
}

impl Settings {
    fn from_env() -> Result<Self> {
        let url = env_opt("DATABASE_URL").context(
            "DATABASE_URL is not set: run `ops/bench pull`, or `ops/stack up pg` and \
             `eval \"$(ops/stack env)\"` first",
        )?;
        let quick = env_opt("PULL_BENCH_QUICK").is_some_and(|v| v != "0");
        let q = |full: u64, small: u64| if quick { small } else { full };
        let edits: u64 = env_num("PULL_BENCH_EDITS", q(10_000, 1_000))?.max(1);
        let items: u64 = env_num("PULL_BENCH_ITEMS", edits)?.clamp(1, edits);
        let idle_interval_ms: u64 = env_num("PULL_BENCH_IDLE_INTERVAL_MS", 30_000)?.max(100);
        // A whole number of intervals (at least one).
        let idle_secs: u64 = env_num("PULL_BENCH_IDLE_SECS", q(180, 60))?;
        let per = idle_interval_ms.div_ceil(1000).max(1);
        let idle_secs = (idle_secs / per).max(1) * per;
        let bin = env_opt("PULL_BENCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_syncbridge")));
        if !bin.exists() {
            bail!("PULL_BENCH_BIN {} does not exist", bin.display());
        }
        Ok(Self {
            url,
            quick,
            edits,
            items,
            concurrency: env_num("PULL_BENCH_CONCURRENCY", 16usize)?.max(1),
            interval_ms: env_num("PULL_BENCH_INTERVAL_MS", 500)?.max(100),
            rate: env_num("PULL_BENCH_RATE", 20)?.max(1),
            latency_secs: env_num("PULL_BENCH_LATENCY_SECS", q(30, 10))?.max(1),
            idle_interval_ms,
            idle_secs,
            idle_fast_secs: env_num("PULL_BENCH_IDLE_FAST_SECS", 10)?,
            db_poll_ms: env_num("PULL_BENCH_DB_POLL_MS", 20)?.max(1),
            bin,
            child_log: env_opt("PULL_BENCH_LOG").unwrap_or_else(|| "warn".into()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Formatting

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

fn n(v: u64) -> String {
    fmt_count(v as f64)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn percentiles(lat: &mut [Duration]) -> String {
    lat.sort();
    format!(
        "p50 {}, p90 {}, p99 {}, max {}",
        ms(pct(lat, 0.50)),
        ms(pct(lat, 0.90)),
        ms(pct(lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default())
    )
}

// ---------------------------------------------------------------------------------------------
// Cleanup: the slot, publication and table, registered before they exist.

#[derive(Debug)]
struct Cleanup {
    url: String,
    name: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Cleanup {
    fn new(url: String) -> Self {
        Self {
            url,
            name: Mutex::new(None),
            done: AtomicBool::new(false),
        }
    }

    fn register(&self, name: &str) {
        *self.name.lock().unwrap_or_else(|e| e.into_inner()) = Some(name.to_string());
    }

    /// Drops the slot (ending its walsender first), publication and table. Runs once; blocking,
    /// on its own thread and runtime, so it is safe from `Drop` anywhere.
    fn run(&self) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(name) = self.name.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let url = self.url.clone();
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                match tokio::time::timeout(Duration::from_secs(60), drop_objects(&url, &name)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("cleanup of {name}: {e:#}"),
                    Err(_) => eprintln!("cleanup of {name} timed out after 60 s"),
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

async fn drop_objects(url: &str, name: &str) -> Result<()> {
    let c = connect(url).await?;
    let slot = format!("sb_{name}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = c
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await;
        match c
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => {
                eprintln!("cleanup: could not drop slot {slot}: {e}");
                break;
            }
        }
    }
    c.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS sb_{name}; DROP TABLE IF EXISTS public.{name}"
    ))
    .await
    .context("dropping the publication and table")?;
    Ok(())
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

// ---------------------------------------------------------------------------------------------
// The pipeline process

struct Proc {
    child: Option<Child>,
    log_path: PathBuf,
    port: u16,
    http: reqwest::Client,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Proc {
    fn start(s: &Settings, file: &Path, log_path: &Path, port: u16) -> Result<Proc> {
        let stderr = std::fs::File::create(log_path).context("child log file")?;
        let child = Command::new(&s.bin)
            .arg("run")
            .arg(file)
            .env("RUST_LOG", &s.child_log)
            .env("DATABASE_URL", &s.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} run", s.bin.display()))?;
        Ok(Proc {
            child: Some(child),
            log_path: log_path.to_path_buf(),
            port,
            http: reqwest::Client::new(),
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            self.child = None;
            bail!(
                "syncbridge run exited with {status}; last log lines:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if let Ok(r) = self
                .http
                .get(format!("http://127.0.0.1:{}/ready", self.port))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready after {timeout:?}; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn metrics(&self) -> Result<Metrics> {
        let text = self
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await
            .context("GET /metrics")?
            .text()
            .await
            .context("/metrics body")?;
        Ok(Metrics(text))
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("syncbridge run exited with {status}:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("syncbridge run did not stop within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One scrape of the process's Prometheus metrics.
struct Metrics(String);

impl Metrics {
    /// Sum of every series named `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
            {
                total += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// Emulator counters

#[derive(Debug, Clone, Default)]
struct EmuStats {
    ru: u64,
    by_method: HashMap<String, u64>,
    items: u64,
}

impl EmuStats {
    fn method(&self, m: &str) -> u64 {
        self.by_method.get(m).copied().unwrap_or(0)
    }

    fn requests(&self) -> u64 {
        self.by_method.values().sum()
    }
}

async fn emu_stats(http: &reqwest::Client, emu: &RunningEmulator, list: &str) -> Result<EmuStats> {
    let v: Value = http
        .get(format!("{}/_emulator/stats", emu.base_url()))
        .send()
        .await
        .context("emulator stats")?
        .json()
        .await
        .context("emulator stats json")?;
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let mut s = EmuStats {
        ru: num(&v["ru_consumed"]),
        ..EmuStats::default()
    };
    if let Some(m) = v["requests"]["by_method"].as_object() {
        for (k, c) in m {
            s.by_method.insert(k.clone(), num(c));
        }
    }
    if let Some(lists) = v["lists"].as_array() {
        s.items = lists
            .iter()
            .filter(|l| l["displayName"] == list)
            .map(|l| num(&l["items"]))
            .sum();
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Edits and their visibility in PostgreSQL

/// One person edit: `qty` of row `row` (item `item`) set to `value`.
#[derive(Debug, Clone)]
struct Edit {
    row: i64,
    item: String,
    value: i32,
}

/// Stamps edits when PostgreSQL shows their value (or a later value of the same row).
struct Tracker {
    /// Per row: indices of its edits in the order sent (values rise).
    by_row: HashMap<i64, Vec<usize>>,
    next: HashMap<i64, usize>,
    values: Vec<i32>,
    visible: Vec<Option<Instant>>,
    remaining: usize,
    min_value: i32,
}

impl Tracker {
    fn new(edits: &[Edit]) -> Self {
        let mut by_row: HashMap<i64, Vec<usize>> = HashMap::new();
        for (i, e) in edits.iter().enumerate() {
            by_row.entry(e.row).or_default().push(i);
        }
        Tracker {
            by_row,
            next: HashMap::new(),
            values: edits.iter().map(|e| e.value).collect(),
            visible: vec![None; edits.len()],
            remaining: edits.len(),
            min_value: edits.iter().map(|e| e.value).min().unwrap_or(0),
        }
    }

    fn observe(&mut self, row: i64, qty: i32, at: Instant) {
        let Some(list) = self.by_row.get(&row) else {
            return;
        };
        let next = self.next.entry(row).or_insert(0);
        while *next < list.len() && self.values[list[*next]] <= qty {
            let i = list[*next];
            if self.visible[i].is_none() {
                self.visible[i] = Some(at);
                self.remaining -= 1;
            }
            *next += 1;
        }
    }

    /// Reads the table until every edit is visible or `timeout` passes.
    async fn watch(
        &mut self,
        db: &Client,
        table: &str,
        every: Duration,
        timeout: Duration,
    ) -> Result<()> {
        let sql = format!("SELECT id, qty FROM {table} WHERE qty >= $1");
        let stmt = db.prepare(&sql).await.context("preparing the reader")?;
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while self.remaining > 0 {
            tick.tick().await;
            let rows = db
                .query(&stmt, &[&self.min_value])
                .await
                .context("reading rows")?;
            let at = Instant::now();
            for r in rows {
                let (id, qty): (i64, Option<i32>) = (r.get(0), r.get(1));
                if let Some(q) = qty {
                    self.observe(id, q, at);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {} edits still not in PostgreSQL after {timeout:?}",
                    self.remaining,
                    self.values.len()
                );
            }
        }
        Ok(())
    }
}

async fn edit(person: &GraphClient, site: &str, list_id: &str, e: &Edit) -> Result<Instant> {
    let mut f = Map::new();
    f.insert("Qty".into(), json!(e.value));
    person
        .update_item_fields(site, list_id, &e.item, &f, None)
        .await
        .with_context(|| format!("person edit of item {}", e.item))?;
    Ok(Instant::now())
}

// ---------------------------------------------------------------------------------------------
// The bench

struct Ctx<'a> {
    s: &'a Settings,
    http: reqwest::Client,
    emu: RunningEmulator,
    person: GraphClient,
    site: String,
    list: String,
    list_id: String,
    /// Item id of row `id` at index `id - 1`.
    items: Vec<String>,
    db: Client,
    table: String,
}

fn pipeline_yaml(
    name: &str,
    list: &str,
    log: &Path,
    base: &str,
    port: u16,
    interval_ms: u64,
) -> String {
    format!(
        r#"version: 1
name: {name}
source:
  url: ${{DATABASE_URL}}
log:
  embedded: {{ path: '{log}' }}
graph:
  base_url: {base}/v1.0
  token_url: {base}/{{tenant}}/oauth2/v2.0/token
  tenant: {tenant}
  client_id: {client}
  client_secret: {secret}
  site: '{site}'
  ru_per_minute: {UNPACED_RU_PER_MINUTE}
sync:
  - table: public.{name}
    list: {list}
    fields:
      title: Title
      qty: {{ field: Qty, type: number }}
    pull: {{ enabled: true, interval_ms: {interval_ms} }}
control:
  listen: 127.0.0.1:{port}
"#,
        log = log.display(),
        tenant = emulator::DEFAULT_TENANT,
        client = emulator::DEFAULT_CLIENT_ID,
        secret = emulator::DEFAULT_CLIENT_SECRET,
        site = emulator::DEFAULT_SITE,
    )
}

/// Waits until the return path is quiet: items received, echoes and applies unchanged for `quiet`.
async fn wait_quiet(p: &mut Proc, quiet: Duration, timeout: Duration) -> Result<Metrics> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<(f64, f64, f64)> = None;
    let mut since = Instant::now();
    loop {
        p.check_running()?;
        let m = p.metrics().await?;
        let now = (
            m.sum("syncbridge_pull_items_received_total", &[]),
            m.sum("syncbridge_pull_echoes_total", &[]),
            m.sum("syncbridge_pull_apply_total", &[]) + m.sum("syncbridge_push_pending_rows", &[]),
        );
        if last != Some(now) {
            last = Some(now);
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("the return path did not settle within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bench(s: &Settings, cleanup: &Cleanup) -> Result<()> {
    let started = Instant::now();
    let name = format!("pl_{:04x}", rand::random::<u16>());
    let list = format!("Pull Bench {}", &name[3..]);
    let table = format!("public.{name}");
    println!(
        "pull bench: {} edits over {} items, {} in flight; interval_ms {} (idle: {} over {} s); \
         load average {}",
        n(s.edits),
        n(s.items),
        s.concurrency,
        s.interval_ms,
        s.idle_interval_ms,
        s.idle_secs,
        load_average()
    );
    println!(
        "  binary {}{}",
        s.bin.display(),
        if s.quick { " (quick run)" } else { "" }
    );

    let emu = emulator::spawn(EmulatorArgs::default())
        .await
        .map_err(|e| anyhow!("emulator: {e}"))?;
    let base = emu.base_url();
    let gc = GraphConfig {
        base_url: format!("{base}/v1.0").parse()?,
        token_url: format!("{base}/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT).parse()?,
        tenant: emulator::DEFAULT_TENANT.into(),
        client_id: emulator::DEFAULT_CLIENT_ID.into(),
        credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(
            emulator::DEFAULT_CLIENT_SECRET,
        )),
        site: emulator::DEFAULT_SITE.into(),
        ru_per_minute: UNPACED_RU_PER_MINUTE,
        sharepoint_url: None,
        hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
    };
    let app = GraphClient::new(GraphClientConfig::from(&gc), &LimiterRegistry::new())?;
    let person_cfg = GraphConfig {
        client_id: emulator::DEFAULT_USER_CLIENT_ID.into(),
        credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(
            emulator::DEFAULT_USER_CLIENT_SECRET,
        )),
        ..gc.clone()
    };
    let person = GraphClient::new(
        GraphClientConfig::from(&person_cfg),
        &LimiterRegistry::new(),
    )?;
    let site = app.resolve_site(emulator::DEFAULT_SITE).await?.id;

    // The table and its rows, before the process starts (its snapshot creates the items).
    let db = connect(&s.url).await?;
    cleanup.register(&name);
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id bigint PRIMARY KEY, title text NOT NULL, qty int); \
         INSERT INTO {table} (id, title, qty) SELECT g, 'item ' || g, 0 FROM generate_series(1, {}) g",
        s.items
    ))
    .await
    .with_context(|| format!("creating {table}"))?;

    let dir = tempfile::tempdir().context("temp dir")?;
    let port = free_port()?;
    let log = dir.path().join("log");
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        pipeline_yaml(&name, &list, &log, &base, port, s.interval_ms),
    )?;
    let mut p = Proc::start(s, &file, &dir.path().join("run-1.log"), port)?;
    p.wait_ready(Duration::from_secs(120)).await?;

    // Seeding: every row becomes an item; the echoes of those creates pass.
    let http = reqwest::Client::new();
    let seed_started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        p.check_running()?;
        if emu_stats(&http, &emu, &list).await?.items >= s.items {
            break;
        }
        if Instant::now() > deadline {
            bail!("the list did not reach {} items within 900 s", s.items);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seeded = seed_started.elapsed();
    let m = wait_quiet(&mut p, Duration::from_secs(3), Duration::from_secs(300)).await?;
    println!(
        "  seeded: {} items in the list {:.1} s after /ready; their delta echoes: {} received, {} dropped as echoes",
        n(s.items),
        seeded.as_secs_f64(),
        fmt_count(m.sum("syncbridge_pull_items_received_total", &[])),
        fmt_count(m.sum("syncbridge_pull_echoes_total", &[])),
    );
    let list_id = app
        .get_list(&site, &list)
        .await?
        .context("the bench list exists")?
        .id;
    let query = ItemQuery {
        select: Some(vec!["SyncKey".into()]),
        top: Some(5000),
        ..ItemQuery::default()
    };
    let mut items = vec![String::new(); s.items as usize];
    for it in app.list_items(&site, &list_id, &query).await? {
        let key: Option<usize> = it
            .fields
            .get("SyncKey")
            .and_then(Value::as_str)
            .and_then(|k| k.parse().ok());
        if let Some(k) = key.filter(|k| (1..=items.len()).contains(k)) {
            items[k - 1] = it.id.clone();
        }
    }
    if let Some(i) = items.iter().position(String::is_empty) {
        bail!("row {} has no item", i + 1);
    }
    let ctx = Ctx {
        s,
        http,
        emu,
        person,
        site,
        list,
        list_id,
        items,
        db,
        table,
    };

    // Idle at the load interval, for comparison (RU of polls only: nothing changes).
    if s.idle_fast_secs > 0 {
        let (ru_min, polls, reqs, other) =
            idle_window(&ctx, &mut p, Duration::from_secs(s.idle_fast_secs), None).await?;
        println!(
            "  idle at interval_ms {}: {:.1} RU/min/list over {} s ({} delta polls, {} Graph requests, {} not delta GETs)",
            s.interval_ms, ru_min, s.idle_fast_secs, polls, reqs, other
        );
    }

    latency_phase(&ctx, &mut p).await?;
    burst_phase(&ctx, &mut p).await?;

    // Idle cost at the long interval: restart with it (resuming from the stored cursor).
    p.stop().await?;
    std::fs::write(
        &file,
        pipeline_yaml(
            &name,
            &ctx.list,
            &log,
            &ctx.emu.base_url(),
            port,
            s.idle_interval_ms,
        ),
    )?;
    let mut p = Proc::start(s, &file, &dir.path().join("run-2.log"), port)?;
    p.wait_ready(Duration::from_secs(120)).await?;
    let (ru_min, polls, reqs, other) = idle_window(
        &ctx,
        &mut p,
        Duration::from_secs(s.idle_secs),
        Some(Duration::from_millis(s.idle_interval_ms)),
    )
    .await?;
    println!(
        "idle cost (interval_ms {}, window {} s, nothing changes):",
        s.idle_interval_ms, s.idle_secs
    );
    println!(
        "  {:.2} RU/min/list ({} delta polls in the window at 1 RU each; {} Graph requests, {} not delta GETs)",
        ru_min, polls, reqs, other
    );
    println!(
        "  goal ≤ {IDLE_GOAL_RU_PER_MIN} RU/min/list at a 30 s interval: {}",
        if s.idle_interval_ms != 30_000 {
            "n/a (interval is not 30 s)"
        } else if ru_min <= IDLE_GOAL_RU_PER_MIN + 1e-9 {
            "met"
        } else {
            "MISSED"
        }
    );
    p.stop().await?;
    let _ = ctx.emu.stop().await;
    println!(
        "pull bench done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// RU/min over a window in which nothing changes; (RU/min, polls, requests, requests that were
/// not delta GETs). With `align`, the window starts half an interval after a poll and lasts a
/// whole number of intervals.
async fn idle_window(
    ctx: &Ctx<'_>,
    p: &mut Proc,
    window: Duration,
    align: Option<Duration>,
) -> Result<(f64, u64, u64, u64)> {
    let polls = |m: &Metrics| m.sum("syncbridge_pull_delta_polls_total", &[]) as u64;
    if let Some(interval) = align {
        // The first poll after start (the stored cursor), then half an interval.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            p.check_running()?;
            if polls(&p.metrics().await?) >= 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!("no delta poll within 120 s of start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(interval / 2).await;
    }
    let m0 = p.metrics().await?;
    let e0 = emu_stats(&ctx.http, &ctx.emu, &ctx.list).await?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    p.check_running()?;
    let e1 = emu_stats(&ctx.http, &ctx.emu, &ctx.list).await?;
    let elapsed = t0.elapsed();
    let m1 = p.metrics().await?;
    let n_polls = polls(&m1) - polls(&m0);
    let reqs = e1.requests() - e0.requests();
    let gets = e1.method("GET") - e0.method("GET");
    // Every request a delta GET: as many GETs as polls (one page each when idle).
    let other = reqs - gets.min(n_polls);
    let ru = e1.ru - e0.ru;
    Ok((
        ru as f64 * 60.0 / elapsed.as_secs_f64(),
        n_polls,
        reqs,
        other,
    ))
}

/// Sends `edits` (paced at `period` apart, or as fast as `concurrency` allows) while the tracker
/// watches PostgreSQL; returns (first send, each edit's acknowledgement, last acknowledgement).
async fn run_edits(
    ctx: &Ctx<'_>,
    edits: &[Edit],
    tracker: &mut Tracker,
    period: Option<Duration>,
    concurrency: usize,
    timeout: Duration,
) -> Result<(Instant, Vec<Instant>, Instant)> {
    let first = Instant::now();
    let start = tokio::time::Instant::now();
    let sender = async {
        let mut acks: Vec<Option<Instant>> = vec![None; edits.len()];
        let mut done = futures::stream::iter(edits.iter().enumerate())
            .map(|(j, e)| async move {
                if let Some(period) = period {
                    tokio::time::sleep_until(start + period * j as u32).await;
                }
                (j, edit(&ctx.person, &ctx.site, &ctx.list_id, e).await)
            })
            .buffer_unordered(concurrency);
        while let Some((j, r)) = done.next().await {
            acks[j] = Some(r?);
        }
        Ok::<_, anyhow::Error>(
            acks.into_iter()
                .map(|a| a.expect("every edit acknowledged"))
                .collect::<Vec<_>>(),
        )
    };
    let every = Duration::from_millis(ctx.s.db_poll_ms);
    let (acks, watched) = tokio::join!(sender, tracker.watch(&ctx.db, &ctx.table, every, timeout));
    let acks = acks?;
    watched?;
    let last_ack = acks.iter().max().copied().unwrap_or(first);
    Ok((first, acks, last_ack))
}

fn latencies(tracker: &Tracker, acks: &[Instant]) -> Vec<Duration> {
    tracker
        .visible
        .iter()
        .zip(acks)
        .map(|(v, a)| v.expect("visible").saturating_duration_since(*a))
        .collect()
}

/// Scalar snapshot of what the burst is split into.
struct Counters {
    emu: EmuStats,
    applied: f64,
    received: f64,
    polls: f64,
    apply_sum: f64,
    apply_count: f64,
    flush_sum: f64,
    flush_count: f64,
}

async fn counters(ctx: &Ctx<'_>, p: &Proc) -> Result<Counters> {
    let m = p.metrics().await?;
    Ok(Counters {
        emu: emu_stats(&ctx.http, &ctx.emu, &ctx.list).await?,
        applied: m.sum("syncbridge_pull_apply_total", &[("outcome", "applied")]),
        received: m.sum("syncbridge_pull_items_received_total", &[]),
        polls: m.sum("syncbridge_pull_delta_polls_total", &[]),
        apply_sum: m.sum("syncbridge_pull_apply_seconds_sum", &[]),
        apply_count: m.sum("syncbridge_pull_apply_seconds_count", &[]),
        flush_sum: m.sum("syncbridge_push_flush_seconds_sum", &[]),
        flush_count: m.sum("syncbridge_push_flush_seconds_count", &[]),
    })
}

async fn latency_phase(ctx: &Ctx<'_>, p: &mut Proc) -> Result<()> {
    let s = ctx.s;
    let count = (s.rate * s.latency_secs) as usize;
    let edits: Vec<Edit> = (0..count)
        .map(|j| {
            let row = (j % ctx.items.len()) as i64 + 1;
            Edit {
                row,
                item: ctx.items[row as usize - 1].clone(),
                value: LATENCY_BASE + j as i32,
            }
        })
        .collect();
    let mut tracker = Tracker::new(&edits);
    let period = Duration::from_secs_f64(1.0 / s.rate as f64);
    let (_, acks, _) = run_edits(
        ctx,
        &edits,
        &mut tracker,
        Some(period),
        4096,
        Duration::from_secs(s.latency_secs + 120),
    )
    .await?;
    p.check_running()?;
    let mut lat = latencies(&tracker, &acks);
    println!(
        "latency (paced: {} edits/s for {} s = {} edits, interval_ms {}; edit acknowledged → row shows it):",
        s.rate,
        s.latency_secs,
        n(count as u64),
        s.interval_ms
    );
    println!("  {}", percentiles(&mut lat));
    wait_quiet(p, Duration::from_secs(2), Duration::from_secs(120)).await?;
    Ok(())
}

async fn burst_phase(ctx: &Ctx<'_>, p: &mut Proc) -> Result<()> {
    let s = ctx.s;
    let edits: Vec<Edit> = (0..s.edits as usize)
        .map(|k| {
            let row = (k % ctx.items.len()) as i64 + 1;
            Edit {
                row,
                item: ctx.items[row as usize - 1].clone(),
                value: BURST_BASE + k as i32,
            }
        })
        .collect();
    let mut tracker = Tracker::new(&edits);
    let c0 = counters(ctx, p).await?;
    let (first, acks, last_ack) = run_edits(
        ctx,
        &edits,
        &mut tracker,
        None,
        s.concurrency,
        Duration::from_secs(1800),
    )
    .await?;
    p.check_running()?;
    let last_visible = tracker
        .visible
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or(first);
    let mut lat = latencies(&tracker, &acks);
    let total = last_visible.duration_since(first).as_secs_f64();
    let send = last_ack.duration_since(first).as_secs_f64();
    wait_quiet(p, Duration::from_secs(2), Duration::from_secs(120)).await?;
    let c1 = counters(ctx, p).await?;
    let patches = c1.emu.method("PATCH") - c0.emu.method("PATCH");
    let gets = c1.emu.method("GET") - c0.emu.method("GET");
    let posts = c1.emu.method("POST") - c0.emu.method("POST");
    let ru = c1.emu.ru - c0.emu.ru;
    let person_ru = 2 * s.edits;
    let applied = c1.applied - c0.applied;
    println!(
        "throughput (burst: {} edits of {} items, {} in flight, interval_ms {}):",
        n(s.edits),
        n(s.items),
        s.concurrency,
        s.interval_ms
    );
    println!(
        "  {:.0} items/s end to end (first edit sent → last row visible: {:.1} s)",
        s.edits as f64 / total,
        total
    );
    println!(
        "  person edits acknowledged at {:.0} edits/s ({:.1} s); the return path then needed {:.1} s more",
        s.edits as f64 / send,
        send,
        (total - send).max(0.0)
    );
    println!("  latency under the burst: {}", percentiles(&mut lat));
    println!(
        "  rows applied {}, item changes received {}, delta rounds {}; Graph: {} PATCH (person), {} GET, {} POST; RU {} (person {}, poller {})",
        fmt_count(applied),
        fmt_count(c1.received - c0.received),
        fmt_count(c1.polls - c0.polls),
        n(patches),
        n(gets),
        n(posts),
        n(ru),
        n(person_ru),
        n(ru.saturating_sub(person_ru)),
    );
    let per = |sum: f64, count: f64| {
        if count > 0.0 {
            sum / count * 1000.0
        } else {
            0.0
        }
    };
    println!(
        "  processor: {} flushes, mean {:.0} ms; PostgreSQL apply mean {:.2} ms per row ({} applies)",
        fmt_count(c1.flush_count - c0.flush_count),
        per(c1.flush_sum - c0.flush_sum, c1.flush_count - c0.flush_count),
        per(c1.apply_sum - c0.apply_sum, c1.apply_count - c0.apply_count),
        fmt_count(c1.apply_count - c0.apply_count),
    );
    Ok(())
}

fn main() {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pull bench: {e:#}");
            std::process::exit(1);
        }
    };
    let cleanup = Cleanup::new(settings.url.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        tokio::select! {
            r = bench(&settings, &cleanup) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    drop(rt);
    cleanup.run();
    if let Err(e) = result {
        eprintln!("pull bench failed: {e:#}");
        std::process::exit(1);
    }
}
