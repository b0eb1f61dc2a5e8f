//! Acceptance tests of the push path (issue 5) against real PostgreSQL, the real binary
//! (`syncbridge run`) and an in-process Graph emulator:
//!
//! 1. `kill_9_during_a_mixed_workload_leaves_lists_equal_to_the_table`: kill -9 at ≥ 20 random
//!    points (some of them exactly between Graph's answer and the ledger write, or right after the
//!    create intents, through the `SYNCBRIDGE_FAILPOINTS` crash points) while a writer runs
//!    inserts, updates, route-changing updates (moves), deletes, re-inserts and no-op updates;
//!    after a clean final run the two lists equal the table exactly.
//! 2. `deleted_ledger_is_rebuilt_from_the_changelog_without_graph_writes`: delete the sled
//!    directory of the ledger, restart; the ledger is replayed from its changelog topic and a no-op
//!    UPDATE of every row costs 0 Graph item writes.
//!
//! Needs the stack (`eval "$(ops/stack env)"`): `DATABASE_URL` (PostgreSQL, superuser). A test
//! FAILS (never skips) when it is unset. Each test has its own emulator (own site and lists), its
//! own pipeline name / table / slot / temp dir, a hard overall timeout, and guards that kill child
//! processes and drop the slot, publication and table even on failure. A failing test keeps its
//! temp dir (logs of every run: `run-<n>.log`) and prints its path.
//!
//! `PUSH_CRASH_SEED=<n>` reproduces the run times, failpoint choices and the writer's choices of
//! test 1 (not the interleaving with the process).

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use syncbridge::config::{GraphConfig, Secret};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};
use syncbridge::graph::{GraphClient, GraphClientConfig, ItemQuery, LimiterRegistry};
use tokio_postgres::{Client, NoTls};

mod common;
#[path = "common/run.rs"]
mod run;
use run::{Run, tail};

const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");
/// SIGABRT: what `std::process::abort` (a failpoint) ends the process with.
const SIGABRT: i32 = 6;
/// The log filter the children run with (the binary's default), so a caller's `RUST_LOG` cannot
/// hide the lines the tests look for.
const CHILD_LOG_FILTER: &str =
    "info,sled=warn,rdkafka=warn,hyper=warn,reqwest=warn,pg_walstream=warn";
const STATUSES: [&str; 3] = ["open", "in_progress", "done"];

// ---------------------------------------------------------------------------------------------
// Shared helpers (test-only)

async fn hard_timeout<F: Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test exceeded its {secs} s timeout"));
}

async fn pg_client() -> Client {
    let (c, conn) = tokio_postgres::connect(&common::database_url(), NoTls)
        .await
        .expect("connect to DATABASE_URL");
    tokio::spawn(conn);
    c
}

/// Drops the pipeline's slot (`sb_<name>`), publication and table (and `more_tables`) on drop.
struct DbGuard {
    name: String,
    more_tables: Vec<String>,
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        let slot = format!("sb_{}", self.name);
        let mut tables = vec![format!("public.{}", self.name)];
        tables.append(&mut self.more_tables);
        common::drop_replication_objects(&slot, &slot, &tables);
    }
}

/// A row as the lists should show it.
#[derive(Debug, Clone, PartialEq)]
struct RowView {
    title: String,
    status: String,
    priority: Option<i32>,
    /// `YYYY-MM-DD`
    due: Option<String>,
}

/// One list item, the fields the tests compare.
#[derive(Debug, Clone, PartialEq)]
struct ItemView {
    list: String,
    id: String,
    etag: Option<String>,
    sync_key: Option<String>,
    title: Option<String>,
    status: Option<String>,
    priority: Option<f64>,
    due: Option<String>,
}

/// Which log the pipeline runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    /// The embedded log in the test's temp dir.
    Embedded,
    /// The stack's broker (`KAFKA_BROKERS`) with default properties; topics are unique per test
    /// through the pipeline name.
    Kafka,
}

impl Log {
    /// The YAML of the pipeline's `log:` value.
    fn yaml(self, root: &std::path::Path) -> String {
        match self {
            Log::Embedded => format!("{{ embedded: {{ path: {} }} }}", root.join("log").display()),
            Log::Kafka => format!(
                "{{ kafka: {{ brokers: ['{}'] }} }}",
                common::kafka_brokers()
            ),
        }
    }
}

/// Everything one test owns: table, pipeline file, temp dir, emulator (own site and lists).
struct Fixture {
    name: String,
    root: PathBuf,
    /// Kept (not deleted) when the test panics, so the run logs can be read.
    dir: Option<tempfile::TempDir>,
    file: PathBuf,
    port: u16,
    site: String,
    main_list: String,
    archive_list: String,
    emu: Option<RunningEmulator>,
    http: reqwest::Client,
    graph: GraphClient,
    pg: Client,
    runs: usize,
    log: Log,
    _db: DbGuard,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.dir.take()
        {
            eprintln!("{}: run logs kept in {}", self.name, d.keep().display());
        }
    }
}

impl Fixture {
    /// Creates the table (`initial` rows), starts the emulator and writes the pipeline file.
    async fn new(tag: &str, initial: &[(i64, RowView)], log: Log) -> Fixture {
        let name = format!(
            "pc_{tag}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let db = DbGuard {
            name: name.clone(),
            more_tables: Vec::new(),
        };
        let pg = pg_client().await;
        pg.batch_execute(&format!(
            "CREATE TABLE public.{name} (id bigint PRIMARY KEY, title text NOT NULL, \
             status text NOT NULL, priority integer, due date)"
        ))
        .await
        .unwrap();
        for (id, r) in initial {
            insert_row(&pg, &name, *id, r).await;
        }

        let site = format!("contoso.sharepoint.com:/sites/{tag}");
        let emu = emulator::spawn(EmulatorArgs {
            sites: vec![site.clone()],
            ..EmulatorArgs::default()
        })
        .await
        .expect("emulator starts");
        let base = emu.base_url();
        let graph_config = GraphConfig {
            base_url: format!("{base}/v1.0").parse().unwrap(),
            token_url: format!("{base}/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT)
                .parse()
                .unwrap(),
            tenant: emulator::DEFAULT_TENANT.into(),
            client_id: emulator::DEFAULT_CLIENT_ID.into(),
            credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(
                emulator::DEFAULT_CLIENT_SECRET,
            )),
            site: site.as_str().into(),
            ru_per_minute: 60_000,
            sharepoint_url: None,
            hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
        };
        let graph = GraphClient::new(
            GraphClientConfig::from(&graph_config),
            &LimiterRegistry::new(),
        )
        .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let port = common::free_port();
        let main_list = format!("PC {tag} Tasks");
        let archive_list = format!("PC {tag} Archive");
        let file = root.join("pipeline.yaml");
        let yaml = format!(
            r#"version: 1
name: {name}
source:
  url: {url}
log: {log}
graph:
  base_url: {base}/v1.0
  token_url: {base}/{{tenant}}/oauth2/v2.0/token
  tenant: {tenant}
  client_id: {client_id}
  client_secret: {secret}
  site: {site}
  ru_per_minute: 60000
# The workload deletes and moves rows out of a list by the hundred on purpose: the accidental-
# delete guard (tests/guard.rs) would hold them for an operator.
guard:
  push: {{ enabled: false }}
sync:
  - table: public.{name}
    list: {main_list}
    fields:
      title: Title
      status: {{ field: Status, type: choice, choices: [open, in_progress, done, archived] }}
      priority: {{ field: Priority, type: number }}
      due: {{ field: DueDate, type: date }}
    routes:
      - when: "status == 'archived'"
        list: {archive_list}
    # The push path only: no delta poller / return path writing into the table.
    pull: {{ enabled: false }}
control:
  listen: 127.0.0.1:{port}
"#,
            url = common::database_url(),
            log = log.yaml(&root),
            tenant = emulator::DEFAULT_TENANT,
            client_id = emulator::DEFAULT_CLIENT_ID,
            secret = emulator::DEFAULT_CLIENT_SECRET,
        );
        std::fs::write(&file, yaml).unwrap();
        Fixture {
            name,
            root,
            dir: Some(dir),
            file,
            port,
            site,
            main_list,
            archive_list,
            emu: Some(emu),
            http: reqwest::Client::new(),
            graph,
            pg,
            runs: 0,
            log,
            _db: db,
        }
    }

    fn emu_base(&self) -> String {
        self.emu.as_ref().expect("emulator").base_url()
    }

    /// The ledger's sled directory (runtime.rs `state_dir`): beside the embedded log, or under
    /// `.syncbridge/<name>-state` in the working directory (the temp dir) with Kafka.
    fn ledger_dir(&self) -> PathBuf {
        match self.log {
            Log::Embedded => self.root.join("log-state").join("ledger"),
            Log::Kafka => self
                .root
                .join(".syncbridge")
                .join(format!("{}-state", self.name))
                .join("ledger"),
        }
    }

    /// Starts `syncbridge run` (output to `run-<n>.log`), with `failpoints` armed if given.
    fn spawn(&mut self, failpoints: Option<&str>) -> Run {
        let (file, dir) = (self.file.clone(), self.root.clone());
        self.spawn_in(&file, &dir, failpoints)
    }

    /// Starts `syncbridge run` of `file` in the working directory `dir` (whose `.syncbridge/`
    /// holds the ledger store with Kafka).
    fn spawn_in(&mut self, file: &Path, dir: &Path, failpoints: Option<&str>) -> Run {
        let log = self.root.join(format!("run-{}.log", self.runs));
        self.runs += 1;
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // `ulimit -c 0`: a failpoint aborts, and no machine should fill up with core files.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"ulimit -c 0; exec "$0" run "$1""#, BIN])
            .arg(file)
            .current_dir(dir)
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

    /// Every row of the table.
    async fn rows(&self) -> BTreeMap<i64, RowView> {
        let rows = self
            .pg
            .query(
                &format!(
                    "SELECT id, title, status, priority, due::text FROM public.{}",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    RowView {
                        title: r.get(1),
                        status: r.get(2),
                        priority: r.get(3),
                        due: r.get(4),
                    },
                )
            })
            .collect()
    }

    /// Every item of both lists (a list that does not exist yet has none).
    async fn items(&self) -> Vec<ItemView> {
        let site = self.graph.resolve_site(&self.site).await.unwrap();
        let mut out = Vec::new();
        for list in [&self.main_list, &self.archive_list] {
            let Some(info) = self.graph.get_list(&site.id, list).await.unwrap() else {
                continue;
            };
            let items = self
                .graph
                .list_items(&site.id, &info.id, &ItemQuery::default())
                .await
                .unwrap();
            for i in items {
                let s = |k: &str| i.fields.get(k).and_then(Value::as_str).map(str::to_owned);
                out.push(ItemView {
                    list: list.clone(),
                    id: i.id.clone(),
                    etag: i.e_tag.clone(),
                    sync_key: s("SyncKey"),
                    title: s("Title"),
                    status: s("Status"),
                    priority: i.fields.get("Priority").and_then(Value::as_f64),
                    due: s("DueDate"),
                });
            }
        }
        out
    }

    /// Everything that differs between the table and the lists (empty = equal).
    fn discrepancies(&self, rows: &BTreeMap<i64, RowView>, items: &[ItemView]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut by_key: BTreeMap<String, Vec<&ItemView>> = BTreeMap::new();
        for i in items {
            match &i.sync_key {
                Some(k) => by_key.entry(k.clone()).or_default().push(i),
                None => problems.push(format!("item without SyncKey: {i:?}")),
            }
        }
        for (k, its) in &by_key {
            if its.len() > 1 {
                problems.push(format!("duplicate SyncKey {k}: {its:?}"));
            }
            match k.parse::<i64>().ok().filter(|id| rows.contains_key(id)) {
                None => problems.push(format!("item(s) for a deleted/unknown row {k}: {its:?}")),
                Some(_) if its.len() > 1 => {}
                Some(id) => {
                    let (r, i) = (&rows[&id], its[0]);
                    let list = self.route(r);
                    let want = (
                        list,
                        Some(r.title.as_str()),
                        Some(r.status.as_str()),
                        r.priority.map(f64::from),
                        r.due.as_ref().map(|d| format!("{d}T00:00:00Z")),
                    );
                    let got = (
                        i.list.as_str(),
                        i.title.as_deref(),
                        i.status.as_deref(),
                        i.priority,
                        i.due.clone(),
                    );
                    if want != got {
                        problems.push(format!(
                            "row {id} {r:?}: want (list, Title, Status, Priority, DueDate) = \
                             {want:?}, item {} has {got:?}",
                            i.id
                        ));
                    }
                }
            }
        }
        for (id, r) in rows {
            if !by_key.contains_key(&id.to_string()) {
                problems.push(format!(
                    "row {id} {r:?} has no item (route: {})",
                    self.route(r)
                ));
            }
        }
        problems
    }

    fn route(&self, r: &RowView) -> &str {
        if r.status == "archived" {
            &self.archive_list
        } else {
            &self.main_list
        }
    }

    /// Polls until the lists equal the table, for up to `secs`; the last discrepancies otherwise.
    async fn converge(&self, run: &mut Run, secs: u64) -> Result<(), Vec<String>> {
        self.converge_all(std::slice::from_mut(run), secs).await
    }

    /// [`Fixture::converge`] with several processes of the pipeline, all of which must stay up.
    async fn converge_all(&self, runs: &mut [Run], secs: u64) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            for run in runs.iter_mut() {
                run.assert_alive("waiting for the lists to converge");
            }
            let rows = self.rows().await;
            let items = self.items().await;
            let problems = self.discrepancies(&rows, &items);
            if problems.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(problems);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The emulator's `/_emulator/stats`.
    async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/_emulator/stats", self.emu_base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Replaces the emulator's fault spec (`/_emulator/faults`).
    async fn faults(&self, spec: Value) {
        let r = self
            .http
            .post(format!("{}/_emulator/faults", self.emu_base()))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "faults: {}", r.status());
    }

    /// After a no-op UPDATE of `touched` rows: waits (up to 30 s) until the processes whose
    /// control planes listen on `ports` read them all and have nothing pending for three flush
    /// windows. Returns the update events they read and the rows they skipped as unchanged.
    async fn settle_noops(&self, runs: &mut [Run], ports: &[u16], touched: u64) -> (f64, f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut settled_since: Option<Instant> = None;
        loop {
            let (mut updates, mut skipped, mut pending) = (0.0, 0.0, 0.0);
            for (run, port) in runs.iter_mut().zip(ports) {
                run.assert_alive("waiting for the no-op updates");
                let m = self.metrics_at(*port).await;
                updates += metric_sum(&m, "syncbridge_push_events_total", "op=\"u\"");
                skipped += metric_sum(&m, "syncbridge_push_skipped_total", "reason=\"unchanged\"");
                pending += metric_sum(&m, "syncbridge_push_pending_rows", "pipeline=");
            }
            if updates >= touched as f64 && pending == 0.0 {
                // Three flush windows with nothing pending: the last flush has finished.
                let since = *settled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(600) {
                    return (updates, skipped);
                }
            } else {
                settled_since = None;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "the processors did not settle within 30 s (metrics: events u {updates}, \
                     skipped {skipped}, pending {pending})"
                );
                return (updates, skipped);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The `/metrics` text of the process whose control plane listens on `port` (empty while
    /// it is not up).
    async fn metrics_at(&self, port: u16) -> String {
        match self
            .http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

async fn insert_row(pg: &Client, table: &str, id: i64, r: &RowView) {
    pg.execute(
        &format!(
            "INSERT INTO public.{table} (id, title, status, priority, due) \
             VALUES ($1, $2, $3, $4, ($5::text)::date)"
        ),
        &[&id, &r.title, &r.status, &r.priority, &r.due],
    )
    .await
    .unwrap();
}

/// One transaction of changes by id range: `[edited (title, priority), moved (the status in or
/// out of the archive route), deleted, inserted]`.
async fn change_round(pg: &Client, t: &str, [edit, moved, deleted, inserted]: [(i64, i64); 4]) {
    pg.batch_execute(&format!(
        "UPDATE public.{t} SET title = title || ' (edited)', priority = NULL \
           WHERE id BETWEEN {} AND {};
         UPDATE public.{t} SET status = CASE WHEN status = 'archived' THEN 'open' \
           ELSE 'archived' END WHERE id BETWEEN {} AND {};
         DELETE FROM public.{t} WHERE id BETWEEN {} AND {};
         INSERT INTO public.{t} SELECT g, 'late ' || g, 'done', g, DATE '2030-01-01' + g \
           FROM generate_series({}, {}) g;",
        edit.0, edit.1, moved.0, moved.1, deleted.0, deleted.1, inserted.0, inserted.1
    ))
    .await
    .unwrap();
}

/// `PUSH_CRASH_SEED`, or a random seed.
fn crash_seed() -> u64 {
    std::env::var("PUSH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn random_row(rng: &mut impl Rng, id: i64, tag: &str) -> RowView {
    RowView {
        title: format!("task {id} {tag}"),
        status: if rng.random_bool(0.25) {
            "archived".into()
        } else {
            STATUSES[rng.random_range(0..STATUSES.len())].into()
        },
        priority: rng.random_bool(0.8).then(|| rng.random_range(-5..1000)),
        due: rng
            .random_bool(0.8)
            .then(|| random_date(rng).format("%Y-%m-%d").to_string()),
    }
}

fn random_date(rng: &mut impl Rng) -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2020, 1, 1).unwrap()
        + chrono::TimeDelta::days(rng.random_range(0..3000))
}

/// Sum of the samples of `metric` whose label set contains `label` (e.g. `reason="unchanged"`).
fn metric_sum(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn by_method(stats: &Value, method: &str) -> u64 {
    stats["requests"]["by_method"][method].as_u64().unwrap_or(0)
}

/// Item writes between two emulator stats reads (POSTs that are not `$batch` envelopes, PATCH,
/// DELETE, PUT; the tests themselves only read), with `[POST, $batch, PATCH, DELETE, PUT]`.
fn item_writes(before: &Value, after: &Value) -> (u64, [u64; 5]) {
    let delta = |m: &str| by_method(after, m) - by_method(before, m);
    let batches = after["requests"]["batches"].as_u64().unwrap_or(0)
        - before["requests"]["batches"].as_u64().unwrap_or(0);
    let (posts, patches, deletes, puts) =
        (delta("POST"), delta("PATCH"), delta("DELETE"), delta("PUT"));
    let writes = posts.saturating_sub(batches) + patches + deletes + puts;
    (writes, [posts, batches, patches, deletes, puts])
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 at random points during a mixed workload

#[derive(Debug, Default)]
struct WriterStats {
    transactions: u64,
    inserts: u64,
    reinserts: u64,
    updates: u64,
    moves: u64,
    deletes: u64,
    noops: u64,
}

/// Commits small transactions (1–3 changes each) until `stop`: inserts, field updates (status
/// changes that keep the route included), route-changing updates (moves between the lists),
/// deletes, re-inserts of deleted ids and no-op updates. Keeps ~100–200 live rows.
async fn writer(
    table: String,
    seed: u64,
    mut alive: Vec<i64>,
    stop: Arc<AtomicBool>,
) -> WriterStats {
    const MAX_TRANSACTIONS: u64 = 20_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x00c0_ffee);
    let mut c = pg_client().await;
    let mut next_id = alive.iter().max().copied().unwrap_or(0) + 1;
    let mut deleted: Vec<i64> = Vec::new();
    let mut st = WriterStats::default();
    while !stop.load(Ordering::SeqCst) && st.transactions < MAX_TRANSACTIONS {
        st.transactions += 1;
        let tx = c.transaction().await.unwrap();
        for _ in 0..rng.random_range(1..=3) {
            let roll = rng.random_range(0..100);
            let pick = |rng: &mut rand::rngs::StdRng, alive: &[i64]| {
                alive[rng.random_range(0..alive.len())]
            };
            if alive.len() < 20 || (roll < 25 && alive.len() < 200) {
                let id = next_id;
                next_id += 1;
                let r = random_row(&mut rng, id, &format!("i{}", st.transactions));
                insert_row_tx(&tx, &table, id, &r).await;
                alive.push(id);
                st.inserts += 1;
            } else if roll < 30 && !deleted.is_empty() {
                let id = deleted.swap_remove(rng.random_range(0..deleted.len()));
                let r = random_row(&mut rng, id, &format!("r{}", st.transactions));
                insert_row_tx(&tx, &table, id, &r).await;
                alive.push(id);
                st.reinserts += 1;
            } else if roll < 55 {
                // Field update; the status changes only among the non-archived values.
                let id = pick(&mut rng, &alive);
                let status = STATUSES[rng.random_range(0..STATUSES.len())];
                let priority: Option<i32> =
                    rng.random_bool(0.85).then(|| rng.random_range(0..1000));
                let due: Option<String> = rng
                    .random_bool(0.85)
                    .then(|| random_date(&mut rng).format("%Y-%m-%d").to_string());
                tx.execute(
                    &format!(
                        "UPDATE public.{table} SET title = $2, \
                         status = CASE WHEN status = 'archived' THEN status ELSE $3 END, \
                         priority = $4, due = ($5::text)::date WHERE id = $1"
                    ),
                    &[
                        &id,
                        &format!("task {id} u{}", st.transactions),
                        &status,
                        &priority,
                        &due,
                    ],
                )
                .await
                .unwrap();
                st.updates += 1;
            } else if roll < 72 {
                // Route change: into or out of the archive list.
                let id = pick(&mut rng, &alive);
                let status = STATUSES[rng.random_range(0..STATUSES.len())];
                tx.execute(
                    &format!(
                        "UPDATE public.{table} SET status = CASE WHEN status = 'archived' \
                         THEN $2 ELSE 'archived' END, title = $3 WHERE id = $1"
                    ),
                    &[&id, &status, &format!("task {id} m{}", st.transactions)],
                )
                .await
                .unwrap();
                st.moves += 1;
            } else if roll < 87 {
                let i = rng.random_range(0..alive.len());
                let id = alive.swap_remove(i);
                tx.execute(&format!("DELETE FROM public.{table} WHERE id = $1"), &[&id])
                    .await
                    .unwrap();
                deleted.push(id);
                st.deletes += 1;
            } else {
                let id = pick(&mut rng, &alive);
                tx.execute(
                    &format!("UPDATE public.{table} SET title = title WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap();
                st.noops += 1;
            }
        }
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..30))).await;
    }
    st
}

async fn insert_row_tx(tx: &tokio_postgres::Transaction<'_>, table: &str, id: i64, r: &RowView) {
    tx.execute(
        &format!(
            "INSERT INTO public.{table} (id, title, status, priority, due) \
             VALUES ($1, $2, $3, $4, ($5::text)::date)"
        ),
        &[&id, &r.title, &r.status, &r.priority, &r.due],
    )
    .await
    .unwrap();
}

/// Acceptance: "kill -9 the process at ≥ 20 random points (including between Graph's answer and
/// the ledger write) during a mixed workload; after restart the lists equal the table exactly,
/// no duplicate `SyncKey`, no item missing".
///
/// Every iteration starts `syncbridge run`, lets it run 0.3–2.5 s and SIGKILLs it if it is still
/// alive. Two iterations in three arm a failpoint (`push.after_graph=0.5`: abort after a `$batch`
/// answered and before its outcome reaches the ledger; `push.after_intent=0.5`: abort right after
/// the create intents were made durable, before Graph is called), so those runs usually end
/// themselves with SIGABRT at exactly that point; the test counts the runs where that happened
/// (exit by SIGABRT and "failpoint" in the output) and requires at least 3, at least one of them
/// `push.after_graph`. A kill can also land during start-up (provisioning, snapshot, ledger open).
///
/// Finally a clean run (no failpoints) converges; asserted after its SIGTERM (exit 0): every
/// table row has exactly one item, in the list its route names, with Title/Status/Priority/
/// DueDate equal to the row's mapped values; no item for a deleted row; no duplicate SyncKey in
/// or across the lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_mixed_workload_leaves_lists_equal_to_the_table() {
    hard_timeout(170, crash_body(Log::Embedded)).await;
}

/// The same on the stack's Kafka broker (issue 17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_during_a_mixed_workload_leaves_lists_equal_to_the_table() {
    hard_timeout(480, crash_body(Log::Kafka)).await;
}

async fn crash_body(log: Log) {
    // On Kafka a restarted processor gets its partitions only once the killed member's session
    // expired (`session.timeout.ms`, 6 s by default), and start-up joins two more groups (the
    // schemas reader, the run-history projector), so each run is up for longer than that and
    // there are fewer of them (the failpoints need the processor to be flushing).
    let (iterations, up_ms) = match log {
        Log::Embedded => (21, 300..=2500),
        Log::Kafka => (9, 14000..=18000),
    };
    const INITIAL_ROWS: i64 = 40;
    // Per flush; a run flushes every ~0.2 s while the writer runs, so an armed run usually
    // aborts itself within its 0.3–2.5 s (and P(no after_graph hit in 7 runs) is ≈ 1e-4).
    const FAILPOINT_P: f64 = 0.5;
    let started = Instant::now();
    let seed = crash_seed();
    eprintln!("push crash test: seed {seed} (rerun with PUSH_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let initial: Vec<(i64, RowView)> = (1..=INITIAL_ROWS)
        .map(|id| (id, random_row(&mut rng, id, "init")))
        .collect();
    let mut fx = Fixture::new("crash", &initial, log).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer_task = tokio::spawn(writer(
        fx.name.clone(),
        seed,
        (1..=INITIAL_ROWS).collect(),
        stop.clone(),
    ));

    let mut hits: BTreeMap<&str, u32> = BTreeMap::new();
    let mut killed = 0;
    for i in 0..iterations {
        let failpoint = match i % 3 {
            0 => None,
            1 => Some("push.after_graph"),
            _ => Some("push.after_intent"),
        };
        let up = Duration::from_millis(rng.random_range(up_ms.clone()));
        let down = Duration::from_millis(rng.random_range(20..=300));
        let mut run = fx.spawn(failpoint.map(|f| format!("{f}={FAILPOINT_P}")).as_deref());
        let outcome = match run.wait_exit(up).await {
            None => {
                run.kill9();
                killed += 1;
                "killed -9".to_string()
            }
            Some(status) => {
                let out = std::fs::read_to_string(&run.log).unwrap_or_default();
                let fired = failpoint.filter(|f| out.contains(&format!("failpoint {f}")));
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
    let wrote = writer_task.await.expect("writer task");
    eprintln!("writer: {wrote:?}");

    // A clean run until the lists equal the (now static) table, then SIGTERM.
    // On Kafka (tansu 0.6.0) a run started right after a kill -9 sometimes gets no partitions at
    // all: the broker keeps the killed member in the group (seen in 2 of 4 fresh-clone CI runs on
    // 2026-12-07, the crash iterations included: 0 events in 60 and in 150 s, then a clean drain;
    // Apache Kafka expires such a member after `session.timeout.ms`). That stall, and only that
    // (the run's final stats say 0 events), gets another run after a clean SIGTERM (at most
    // three in all), as an operator would restart it; the state the runs converge to is asserted either way.
    let (converge_secs, attempts) = match log {
        Log::Embedded => (60, 1),
        Log::Kafka => (75, 3),
    };
    let mut attempt = 0;
    let (run, status) = loop {
        attempt += 1;
        let mut run = fx.spawn(None);
        let converged = fx.converge(&mut run, converge_secs).await;
        let status = run.terminate().await;
        let Err(problems) = converged else {
            break (run, status);
        };
        let stalled = std::fs::read_to_string(&run.log)
            .unwrap_or_default()
            .lines()
            .rfind(|l| l.contains("push processor stopped"))
            .is_some_and(|l| l.contains("stats=ProcessorStats { events: 0,"));
        if stalled && attempt < attempts {
            eprintln!(
                "final run {attempt}: no event reached the processor in {converge_secs} s (the \
                 broker kept a killed member's partitions); SIGTERM and one more run"
            );
            continue;
        }
        panic!(
            "the final run did not converge within {converge_secs} s (attempt {attempt}, \
             processor stalled: {stalled}); {} problem(s):\n  {}\nlog:\n{}",
            problems.len(),
            problems.join("\n  "),
            tail(&run.log)
        );
    };
    assert_eq!(
        status.code(),
        Some(0),
        "final run did not exit 0 on SIGTERM: {status}\n{}",
        tail(&run.log)
    );
    let rows = fx.rows().await;
    let items = fx.items().await;
    let problems = fx.discrepancies(&rows, &items);
    let log_text = std::fs::read_to_string(&run.log).unwrap_or_default();
    let final_stats = log_text
        .lines()
        .rfind(|l| l.contains("push processor stopped"))
        .unwrap_or("(no stats line)");
    let in_archive = items.iter().filter(|i| i.list == fx.archive_list).count();
    let total_hits: u32 = hits.values().sum();
    eprintln!(
        "push crash test: seed {seed}, {iterations} iterations ({killed} killed -9, \
         failpoint hits {hits:?}), {} rows, {} items ({} main, {in_archive} archive), \
         {:.1} s\nfinal run: {final_stats}",
        rows.len(),
        items.len(),
        items.len() - in_archive,
        started.elapsed().as_secs_f64()
    );
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
    assert!(killed + total_hits as usize == iterations);
}

// ---------------------------------------------------------------------------------------------
// 2. Ledger rebuild from the changelog

/// Acceptance: "delete the sled directory, restart; the ledger is rebuilt from the changelog
/// topic and no item is rewritten (0 Graph writes)".
///
/// A first run syncs 60 rows plus a round of updates, moves, deletes and inserts (so the
/// changelog holds superseded entries and tombstones too), converges and is stopped (SIGTERM).
/// Then `<state>/ledger` is deleted and the pipeline restarted; once the processor logged
/// `ledger rebuilt from its changelog … records=N`, every row gets a no-op UPDATE (an event per
/// row the processor must match against the rebuilt ledger), and the run is stopped once the
/// processor has read them all and has nothing pending. Asserted: the binary replayed N ≥ rows
/// records; the emulator saw 0 item writes (POST minus `$batch` envelopes, PATCH, DELETE) between
/// the stats read before the restart and the one after the stop; every item is unchanged (same id,
/// eTag and fields); the lists still equal the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ledger_is_rebuilt_from_the_changelog_without_graph_writes() {
    hard_timeout(120, rebuild_body(Log::Embedded)).await;
}

/// The same on the stack's Kafka broker: the changelog topic is read to its end offset, which
/// tansu 0.6.0 reported short for multi-record batches (issue 17).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_deleted_ledger_is_rebuilt_from_the_changelog_without_graph_writes() {
    hard_timeout(180, rebuild_body(Log::Kafka)).await;
}

async fn rebuild_body(log: Log) {
    const ROWS: i64 = 60;
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let initial: Vec<(i64, RowView)> = (1..=ROWS)
        .map(|id| (id, random_row(&mut rng, id, "init")))
        .collect();
    let mut fx = Fixture::new("rebuild", &initial, log).await;
    let t = fx.name.clone();

    // First run: snapshot, then a round of changes, until converged.
    let mut run = fx.spawn(None);
    if let Err(p) = fx.converge(&mut run, 60).await {
        panic!(
            "first run did not sync the snapshot: {p:#?}\n{}",
            tail(&run.log)
        );
    }
    change_round(
        &fx.pg,
        &t,
        [(1, 5), (6, 12), (13, 17), (ROWS + 1, ROWS + 5)],
    )
    .await;
    if let Err(p) = fx.converge(&mut run, 60).await {
        panic!(
            "first run did not sync the changes: {p:#?}\n{}",
            tail(&run.log)
        );
    }
    let status = run.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "first run: {status}\n{}",
        tail(&run.log)
    );
    drop(run);

    let rows = fx.rows().await;
    let items_before = fx.items().await;
    let stats_before = fx.stats().await;
    let ledger = fx.ledger_dir();
    assert!(ledger.is_dir(), "no ledger at {}", ledger.display());
    std::fs::remove_dir_all(&ledger).unwrap();

    // Second run on an empty sled store.
    let mut run = fx.spawn(None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let replayed: u64 = loop {
        run.assert_alive("waiting for the ledger rebuild");
        let out = std::fs::read_to_string(&run.log).unwrap_or_default();
        let rebuilt = out
            .lines()
            .find(|l| l.contains("ledger rebuilt from its changelog"))
            .map(str::to_owned);
        if let Some(line) = rebuilt
            && out.contains("processor started")
        {
            let n = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("records="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no records=N in {line:?}"));
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no \"ledger rebuilt from its changelog\" / \"processor started\" within 30 s:\n{}",
            tail(&run.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A no-op UPDATE of every row: each is an event the processor compares with the ledger.
    let touched = fx
        .pg
        .execute(&format!("UPDATE public.{t} SET title = title"), &[])
        .await
        .unwrap();
    assert_eq!(touched as usize, rows.len());
    let (updates_seen, skipped) = fx
        .settle_noops(std::slice::from_mut(&mut run), &[fx.port], touched)
        .await;
    let status = run.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "second run: {status}\n{}",
        tail(&run.log)
    );

    let stats_after = fx.stats().await;
    let delta = |m: &str| by_method(&stats_after, m) - by_method(&stats_before, m);
    let (item_writes, [posts, batches, patches, deletes, puts]) =
        item_writes(&stats_before, &stats_after);
    let items_after = fx.items().await;
    eprintln!(
        "ledger rebuild: {} rows, {} items, records replayed {replayed}, no-op updates {touched} \
         (processor saw {updates_seen}, skipped as unchanged {skipped}); Graph between the \
         reads: GET {}, POST {posts} ($batch {batches}), PATCH {patches}, DELETE {deletes}, \
         PUT {puts} → item writes {item_writes}; {:.1} s",
        rows.len(),
        items_after.len(),
        delta("GET"),
        started.elapsed().as_secs_f64()
    );
    assert!(
        replayed >= rows.len() as u64,
        "the ledger replayed {replayed} records, fewer than the {} live rows",
        rows.len()
    );
    assert_eq!(
        item_writes,
        0,
        "item writes after the rebuild: POST {posts} ($batch envelopes {batches}), PATCH \
         {patches}, DELETE {deletes}, PUT {puts}\n{}",
        tail(&run.log)
    );
    let key = |i: &ItemView| (i.list.clone(), i.id.clone());
    let mut before = items_before.clone();
    let mut after = items_after.clone();
    before.sort_by_key(key);
    after.sort_by_key(key);
    assert!(
        before == after,
        "items changed across the rebuild:\nbefore {before:#?}\nafter {after:#?}"
    );
    let problems = fx.discrepancies(&fx.rows().await, &items_after);
    assert!(
        problems.is_empty(),
        "lists differ from the table: {problems:#?}"
    );
    assert!(
        updates_seen >= touched as f64 && skipped >= touched as f64,
        "the processor saw {updates_seen} update events and skipped {skipped} as unchanged, \
         expected ≥ {touched} each"
    );
    // Both emulators share nothing with other tests; stop ours cleanly.
    if let Some(emu) = fx.emu.take() {
        emu.stop().await.expect("emulator stops");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Regression: the deterministic form of what test 1 found

/// A route change whose create reached Graph but not the ledger (`push.after_graph`), reverted
/// while the process is down, must not leave the created item behind.
///
/// Steps: row 1 synced to the main list (item A); restart with `push.after_graph=1`; move row 1
/// to the archive (the processor records the intent `create_in: archive`, Graph creates item B
/// in the archive, the process aborts before the ledger hears of B); while it is down, move the
/// row back; restart cleanly. The two events replay together and coalesce into "row 1 in the
/// main list", so the flush sees `item = A (main)`, `intent = archive`, target main. Expected:
/// B is found through the intent's list and deleted, A is updated. (Found by test 1, where a
/// kill -9 / after_graph abort in the middle of a move left both lists with an item of the same
/// SyncKey, the stale one never touched after its create.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverted_route_change_after_a_create_crash_leaves_no_orphan_item() {
    hard_timeout(90, orphan_body(Log::Embedded)).await;
}

/// The same on the stack's Kafka broker. Ignored in CI: the test needs the two updates, 0.9 s
/// apart, to reach the processor in separate flushes, and on tansu the first events after a
/// start arrive late and together (consumer-group joins, capture's schema read-back); with the
/// failpoint armed no write can signal readiness. Passed 2 of 2 alone on a quiet machine, failed
/// its precondition (both updates in one flush) in a full CI run (2026-12-07). Run it by hand:
/// `cargo test --test push_crash kafka_reverted -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing-dependent on tansu: needs two updates 0.9 s apart in separate flushes"]
async fn kafka_reverted_route_change_after_a_create_crash_leaves_no_orphan_item() {
    hard_timeout(150, orphan_body(Log::Kafka)).await;
}

async fn orphan_body(log: Log) {
    let row = |id: i64, status: &str| {
        (
            id,
            RowView {
                title: format!("row {id}"),
                status: status.into(),
                priority: Some(id as i32),
                due: None,
            },
        )
    };
    let on_kafka = matches!(log, Log::Kafka);
    let mut fx = Fixture::new("orphan", &[row(1, "open"), row(2, "archived")], log).await;
    let t = fx.name.clone();
    let mut run = fx.spawn(None);
    if let Err(p) = fx.converge(&mut run, 60).await {
        panic!("the first run did not sync: {p:#?}\n{}", tail(&run.log));
    }
    let status = run.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "first run: {status}\n{}",
        tail(&run.log)
    );
    drop(run);

    // Crash right after Graph answered the create of the move; the move back is committed while
    // that `$batch` is held open (emulator latency), so capture logs it before the abort and the
    // restart reads both events in one flush window.
    let mut run = fx.spawn(Some("push.after_graph=1"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&run.log)
        .unwrap_or_default()
        .contains("processor started")
    {
        run.assert_alive("waiting for the processor");
        assert!(
            Instant::now() < deadline,
            "processor not started within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if on_kafka {
        // "processor started" precedes the consumer groups' assignments and capture's first
        // append (which reads the schemas topic back); on tansu, with 0 or 8 s here both updates
        // below reached the processor in one flush (3 runs of 3), with 15 s in separate ones (2
        // of 2). No write may signal readiness: the armed failpoint aborts after the first
        // `$batch`. The precondition assertion below still catches a run that raced.
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
    fx.faults(serde_json::json!({ "latency_ms": 2500 })).await;
    fx.pg
        .execute(
            &format!("UPDATE public.{t} SET status = 'archived' WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    fx.pg
        .execute(
            &format!("UPDATE public.{t} SET status = 'open', title = 'row 1 back' WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    let status = run.wait_exit(Duration::from_secs(30)).await;
    let out = std::fs::read_to_string(&run.log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.signal() == Some(SIGABRT))
            && out.contains("failpoint push.after_graph"),
        "expected an abort at push.after_graph, got {status:?}:\n{}",
        tail(&run.log)
    );
    fx.faults(serde_json::json!({})).await;
    drop(run);
    let items = fx.items().await;
    let with_key_1: Vec<&ItemView> = items
        .iter()
        .filter(|i| i.sync_key.as_deref() == Some("1"))
        .collect();
    assert_eq!(
        with_key_1.len(),
        2,
        "precondition: Graph created the moved item before the abort: {items:#?}"
    );

    // A clean run.
    let mut run = fx.spawn(None);
    let converged = fx.converge(&mut run, 20).await;
    let status = run.terminate().await;
    if let Err(p) = converged {
        panic!(
            "after the restart the lists do not equal the table within 20 s:\n  {}\nlog:\n{}",
            p.join("\n  "),
            tail(&run.log)
        );
    }
    assert_eq!(
        status.code(),
        Some(0),
        "last run: {status}\n{}",
        tail(&run.log)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Several processes of one pipeline on Kafka (issue 15)

/// How long the members' shares must stay put to count as balanced: two session timeouts (6 s
/// each), longer than tansu took to drop a member it had left out of a rebalance (10 s).
const BALANCE_STABLE: Duration = Duration::from_secs(12);

/// Processes of one pipeline on the stack's broker. Each member runs `syncbridge run` of its
/// own copy of the pipeline file (its own control port) in its own working directory (its own
/// ledger store under `.syncbridge/`), like processes on separate machines.
struct Members {
    runs: Vec<Run>,
    ports: Vec<u16>,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Members {
    fn new() -> Members {
        Members {
            runs: Vec::new(),
            ports: Vec::new(),
            files: Vec::new(),
            dirs: Vec::new(),
        }
    }

    /// Starts one more member.
    fn add(&mut self, fx: &mut Fixture) {
        let m = self.runs.len();
        let port = common::free_port();
        let dir = fx.root.join(format!("member-{m}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pipeline.yaml");
        let yaml = std::fs::read_to_string(&fx.file).unwrap().replace(
            &format!("listen: 127.0.0.1:{}", fx.port),
            &format!("listen: 127.0.0.1:{port}"),
        );
        std::fs::write(&file, yaml).unwrap();
        self.runs.push(fx.spawn_in(&file, &dir, None));
        self.ports.push(port);
        self.files.push(file);
        self.dirs.push(dir);
    }

    /// kill -9 of member `m`, then the same member again (same file, same ledger store).
    fn kill_and_restart(&mut self, fx: &mut Fixture, m: usize) {
        self.runs[m].kill9();
        let (file, dir) = (self.files[m].clone(), self.dirs[m].clone());
        self.runs[m] = fx.spawn_in(&file, &dir, None);
    }

    /// Each member's `syncbridge_push_assigned_partitions` (0 while its control plane is down).
    async fn assigned(&self, fx: &Fixture) -> Vec<f64> {
        let mut out = Vec::new();
        for p in &self.ports {
            let m = fx.metrics_at(*p).await;
            out.push(metric_sum(
                &m,
                "syncbridge_push_assigned_partitions",
                "pipeline=",
            ));
        }
        out
    }

    /// Waits (up to `secs`) until every member owns at least one partition and together they
    /// own the table topics' `partitions` (3 per table, `runtime::TABLE_TOPIC_PARTITIONS`),
    /// stable for
    /// [`BALANCE_STABLE`]: on tansu a member the group left out of a rebalance keeps its
    /// partitions until its heartbeat fails, so the counts add up to 3 with one partition
    /// counted twice for a while (see `ops/docs/kafka.md`).
    async fn wait_balanced(&mut self, fx: &Fixture, secs: u64, partitions: f64) -> Vec<f64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut stable_since: Option<(Instant, Vec<f64>)> = None;
        loop {
            for r in &mut self.runs {
                r.assert_alive("waiting for every member to own partitions");
            }
            let a = self.assigned(fx).await;
            if a.iter().all(|n| *n >= 1.0) && a.iter().sum::<f64>() == partitions {
                match &stable_since {
                    Some((since, seen)) if *seen == a => {
                        if since.elapsed() >= BALANCE_STABLE {
                            return a;
                        }
                    }
                    _ => stable_since = Some((Instant::now(), a.clone())),
                }
            } else {
                stable_since = None;
            }
            assert!(
                Instant::now() < deadline,
                "the group did not give every member partitions within {secs} s: {a:?}\n{}",
                self.runs
                    .iter()
                    .map(|r| tail(&r.log))
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The member that holds capture's single-reader lock (the first to log it).
    fn capture_leader(&self) -> Option<usize> {
        (0..self.runs.len()).find(|m| {
            std::fs::read_to_string(&self.runs[*m].log)
                .unwrap_or_default()
                .contains("acquired single-reader lock")
        })
    }

    /// SIGTERM to every member, capture's leader last (see [`CAPTURE_HANDOVER_LIMIT`]); each
    /// must exit 0.
    async fn terminate(&mut self) {
        let leader = self.capture_leader();
        let order = (0..self.runs.len())
            .filter(|m| Some(*m) != leader)
            .chain(leader);
        for m in order {
            let r = &mut self.runs[m];
            let status = r.terminate().await;
            assert_eq!(
                status.code(),
                Some(0),
                "member {m}: {status}\n{}",
                tail(&r.log)
            );
            // Adopted items are creates that met an existing SyncKey: after a kill -9, or two
            // members writing one partition at once (tansu, see `wait_balanced`).
            let out = std::fs::read_to_string(&r.log).unwrap_or_default();
            let stats = out.lines().rfind(|l| l.contains("push processor stopped"));
            let adopted = stats.and_then(|l| l.split("adopted: ").nth(1)?.split(',').next());
            eprintln!("member {m} stopped; its last run adopted {adopted:?} item(s)");
        }
    }
}

/// Why the tests never stop or kill capture's leader while other members run: a standby that
/// takes the replication slot over refuses to start, because the snapshot progress record is
/// in the leader's local state directory (`capture stopped: replication slot … exists but the
/// snapshot progress record … is missing`, exit 3). Capture failover between processes is
/// issue 15 item 2 and not built yet; these tests cover the push processors' handover.
const CAPTURE_HANDOVER_LIMIT: &str = "capture failover between processes is not built yet";

/// Asserts the lists equal the table (converging within `secs`), then that a no-op UPDATE of
/// every row costs no Graph item write while every member is up: each member's ledger holds
/// what the others wrote for the partitions it owns now.
async fn assert_converged_without_rewrites(fx: &Fixture, members: &mut Members, secs: u64) {
    if let Err(p) = fx.converge_all(&mut members.runs, secs).await {
        panic!(
            "the lists do not equal the table within {secs} s; {} problem(s):\n  {}",
            p.len(),
            p.join("\n  ")
        );
    }
    let before = fx.stats().await;
    let touched = fx
        .pg
        .execute(&format!("UPDATE public.{} SET title = title", fx.name), &[])
        .await
        .unwrap();
    let (seen, skipped) = fx
        .settle_noops(&mut members.runs, &members.ports, touched)
        .await;
    let (writes, counts) = item_writes(&before, &fx.stats().await);
    eprintln!(
        "no-op UPDATE of {touched} rows: {seen} update events read, {skipped} skipped as \
         unchanged; Graph [POST, $batch, PATCH, DELETE, PUT] {counts:?} → {writes} item writes"
    );
    assert!(
        seen >= touched as f64,
        "the members read {seen} of {touched} no-op updates"
    );
    assert_eq!(
        writes, 0,
        "a no-op UPDATE caused {writes} Graph item writes"
    );
}

/// Acceptance (issue 15): two, then three `syncbridge run` processes of one pipeline share the
/// consumer group: every member owns partitions, the lists equal the table after each step,
/// no item is duplicated, and a no-op UPDATE of every row writes nothing (each member restored
/// the ledger entries of the partitions it took over from the changelog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_two_then_three_processes_share_one_pipeline() {
    hard_timeout(300, async {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let initial: Vec<(i64, RowView)> = (1..=60)
            .map(|id| (id, random_row(&mut rng, id, "init")))
            .collect();
        let mut fx = Fixture::new("scale", &initial, Log::Kafka).await;
        let t = fx.name.clone();
        let mut members = Members::new();
        members.add(&mut fx);
        members.add(&mut fx);
        let two = members.wait_balanced(&fx, 90, 3.0).await;
        eprintln!("two members own {two:?} partitions");
        assert_converged_without_rewrites(&fx, &mut members, 90).await;

        members.add(&mut fx);
        let three = members.wait_balanced(&fx, 90, 3.0).await;
        eprintln!("three members own {three:?} partitions");
        change_round(&fx.pg, &t, [(1, 20), (21, 35), (36, 40), (61, 90)]).await;
        assert_converged_without_rewrites(&fx, &mut members, 90).await;
        members.terminate().await;
    })
    .await;
}

/// Acceptance (issue 15): kill -9 one of three processes, three times, during the mixed
/// workload of test 1 (inserts, updates, moves between the lists, deletes, re-inserts, no-op
/// updates); the killed member is restarted (same ledger store) after 0.3–3 s. The victim is
/// never capture's leader ([`CAPTURE_HANDOVER_LIMIT`]). Afterwards the
/// lists equal the table with no duplicate item, and a no-op UPDATE of every row writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_one_of_three_processes_during_a_mixed_workload() {
    hard_timeout(300, async {
        let seed = crash_seed();
        eprintln!("scale kill test: seed {seed} (rerun with PUSH_CRASH_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let initial: Vec<(i64, RowView)> = (1..=40)
            .map(|id| (id, random_row(&mut rng, id, "init")))
            .collect();
        let mut fx = Fixture::new("scalekill", &initial, Log::Kafka).await;
        let mut members = Members::new();
        for _ in 0..3 {
            members.add(&mut fx);
        }
        members.wait_balanced(&fx, 90, 3.0).await;
        let stop = Arc::new(AtomicBool::new(false));
        let writer_task = tokio::spawn(writer(
            fx.name.clone(),
            seed,
            (1..=40).collect(),
            stop.clone(),
        ));
        let leader = members.capture_leader();
        eprintln!(
            "capture leader: member {leader:?}; {CAPTURE_HANDOVER_LIMIT}, so it is not killed"
        );
        let victims: Vec<usize> = (0..3).filter(|m| Some(*m) != leader).collect();
        for k in 0..3 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(6000..=12000))).await;
            let m = victims[rng.random_range(0..victims.len())];
            members.kill_and_restart(&mut fx, m);
            eprintln!("kill {k}: member {m} killed -9 and restarted");
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..=3000))).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::SeqCst);
        let wrote = writer_task.await.expect("writer task");
        eprintln!("writer: {wrote:?}");
        let owned = members.wait_balanced(&fx, 120, 3.0).await;
        eprintln!("after the kills the members own {owned:?} partitions");
        assert_converged_without_rewrites(&fx, &mut members, 120).await;
        members.terminate().await;
    })
    .await;
}

/// Acceptance (issue 15, lookups across members): the fixture's table gets a lookup column
/// `ref` into a parent table synced to its own list; three members run the pipeline, so a
/// child row and its parent row are usually read by different members. Parents and the
/// children pointing at them are inserted in the same transactions (the child's member has to
/// find the parent's item in entries another member recorded), then children are re-pointed at
/// new parents. Asserted: every child item's `RefLookupId` is its parent's item id, no dead
/// letter, and the lists equal the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_lookups_resolve_across_processes() {
    hard_timeout(300, async {
        let mut fx = Fixture::new("scalelk", &[], Log::Kafka).await;
        let (t, parent) = (fx.name.clone(), format!("{}_p", fx.name));
        fx._db.more_tables.push(format!("public.{parent}"));
        let parent_list = "PC scalelk Parents".to_string();
        fx.pg
            .batch_execute(&format!(
                "ALTER TABLE public.{t} ADD COLUMN ref bigint;
                 CREATE TABLE public.{parent} (id bigint PRIMARY KEY, title text NOT NULL);"
            ))
            .await
            .unwrap();
        let yaml = std::fs::read_to_string(&fx.file).unwrap();
        let yaml = yaml
            .replace(
                "      due: { field: DueDate, type: date }\n",
                &format!(
                    "      due: {{ field: DueDate, type: date }}\n      \
                     ref: {{ field: Ref, type: lookup, list: {parent_list} }}\n"
                ),
            )
            .replace(
                "control:\n",
                &format!(
                    "  - table: public.{parent}\n    list: {parent_list}\n    \
                     fields: {{ title: Title }}\n    pull: {{ enabled: false }}\ncontrol:\n"
                ),
            );
        assert!(yaml.contains("type: lookup") && yaml.contains(&parent_list), "{yaml}");
        std::fs::write(&fx.file, yaml).unwrap();
        let mut members = Members::new();
        for _ in 0..3 {
            members.add(&mut fx);
        }
        members.wait_balanced(&fx, 90, 6.0).await;
        // 40 transactions, each a new parent and two children pointing at it.
        for p in 1..=40i64 {
            fx.pg
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO public.{parent} VALUES ({p}, 'parent {p}');
                     INSERT INTO public.{t} VALUES ({a}, 'child {a}', 'open', NULL, NULL, {p}),
                       ({b}, 'child {b}', 'done', NULL, NULL, {p});
                     COMMIT;",
                    a = 2 * p - 1,
                    b = 2 * p
                ))
                .await
                .unwrap();
        }
        // New parents, and every third child re-pointed at one of them.
        fx.pg
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO public.{parent} SELECT g, 'late parent ' || g FROM generate_series(41, 50) g;
                 UPDATE public.{t} SET ref = 41 + id % 10 WHERE id % 3 = 0;
                 COMMIT;"
            ))
            .await
            .unwrap();
        if let Err(p) = fx.converge_all(&mut members.runs, 90).await {
            panic!("the lists do not equal the table: {p:#?}");
        }
        let site = fx.graph.resolve_site(&fx.site).await.unwrap();
        let item_ids = |list: &str| {
            let (graph, site_id, list) = (fx.graph.clone(), site.id.clone(), list.to_string());
            async move {
                let info = graph.get_list(&site_id, &list).await.unwrap().unwrap();
                let items = graph
                    .list_items(&site_id, &info.id, &ItemQuery::default())
                    .await
                    .unwrap();
                items
                    .into_iter()
                    .map(|i| {
                        let f = |k: &str| i.fields.get(k).and_then(Value::as_str).map(str::to_owned);
                        (f("SyncKey").unwrap_or_default(), (i.id.clone(), f("RefLookupId")))
                    })
                    .collect::<BTreeMap<String, (String, Option<String>)>>()
            }
        };
        // `converge` does not compare `Ref`: a child deferred on its lookup may be written a
        // little later, so the lookups get up to 30 s of their own.
        let refs = fx
            .pg
            .query(&format!("SELECT id, ref FROM public.{t}"), &[])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (parents, wrong) = loop {
        let parents = item_ids(&parent_list).await;
        assert_eq!(parents.len(), 50, "parent items: {parents:?}");
        let mut children = item_ids(&fx.main_list).await;
        children.extend(item_ids(&fx.archive_list).await);
        let mut wrong = Vec::new();
        for r in &refs {
            let (id, parent_id): (i64, i64) = (r.get(0), r.get(1));
            let want = parents.get(&parent_id.to_string()).map(|p| p.0.clone());
            let got = children.get(&id.to_string()).and_then(|c| c.1.clone());
            if want.is_none() || got != want {
                wrong.push(format!("child {id} → parent {parent_id}: item {want:?}, lookup {got:?}"));
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            break (parents, wrong);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let dead: f64 = {
            let mut n = 0.0;
            for p in &members.ports {
                let m = fx.metrics_at(*p).await;
                n += metric_sum(&m, "syncbridge_push_dead_letters_total", "pipeline=");
            }
            n
        };
        eprintln!(
            "lookups across 3 members: {} children, {} parents, {} wrong, {dead} dead letters",
            refs.len(),
            parents.len(),
            wrong.len()
        );
        assert!(wrong.is_empty(), "lookups not resolved:\n  {}", wrong.join("\n  "));
        assert_eq!(dead, 0.0, "dead letters");
        members.terminate().await;
    })
    .await;
}
