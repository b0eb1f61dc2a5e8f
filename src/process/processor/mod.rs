//! The push processor of one pipeline: the [`Processor`] state, its construction and the loop
//! that drives it. The [module docs](super) hold the delivery contract; each promise is kept
//! (and documented) in the file named there.
//!
//! # The loop
//! [`Processor::run`] races table records, list changes (the return path), operator commands and
//! the flush timer. A record is consumed into the pending set (one write per row, coalesced);
//! a flush happens when the window ends ([`Processor::flush_deadline`]), when `max_pending` rows
//! wait, and once more at shutdown; input offsets are committed only after a flush.
//! `LogConsumer::recv` is cancel-safe in both log implementations (a record is handed out only
//! by the poll that returns it), so the loop may race it against the flush timer.
//!
//! # The data path, file by file
//! 1. [`consume`]: the schema cache; decoding a record and deciding what it means for its row
//!    (skip, dead-letter, or a new desired state).
//! 2. [`coalesce`]: the pending set: one write per row, its latest state and the lowest offsets
//!    merged into it.
//! 3. [`project`]: a row's values → list fields (persons, lookups); projection hash and diff.
//! 4. [`plan`]: route + ledger check → the writes to send; intents before creates.
//! 5. [`write`](mod@write): sending the writes as `$batch`es and classifying each answer.
//! 6. [`outcome`]: applying each answer to the row's ledger entry (adopt, move, re-create, 412).
//! 7. [`flush`]: one flush end to end (stages, rounds, ledger commits) and the offset commit.
//!
//! [`dead_letters`] holds what is deliberately not written: dead letters and skip counters.
//! [`audit`] records each decision in the audit trail (see [`crate::process::audit`]).
//! [`assign`] follows the consumer group's assignment (several processes of one pipeline).
//! [`schema_check`] pauses one table whose events no longer fit the mapping (a mapped column
//! dropped, renamed or retyped while streaming).
//!
//! # What the return path uses
//! The return path (`src/pull/processor.rs`, `src/pull/resolve.rs`) is `impl Processor` code
//! too and imports this module with a glob (`crate::process::processor::*`). It relies on:
//! - the [`Processor`] struct and its `pub(crate)` fields (`tables`, `ledger`, `pending`,
//!   `pulls`, `facts`, `targets`, `stats`, …), which stay declared here;
//! - [`Pending`] and [`Desired`] (the pending push of a row, which list edits decide against),
//!   [`sync_key`], [`hash_projection`] and [`diff`], re-exported here from their files;
//! - the methods `project` (a row → list fields, as the push side maps it), `flush`,
//!   `append_dead` and `dead_letter`.
//!
//! The other shared types (`LastEvent`, `SchemaCache`, `Op`, `OpKind`, `Outcome`,
//! `ProjectError`, `TablePlan`, `ProcessorStats`) and `recv_cmd`/`recv_opt` are reachable here
//! too, as they were when the processor was one file.

mod assign;
mod audit;
mod coalesce;
mod consume;
mod dead_letters;
mod deletes;
mod flush;
mod outcome;
mod plan;
mod project;
mod rest;
mod schema_check;
mod write;

pub use coalesce::sync_key;
pub(crate) use coalesce::{Desired, LastEvent, Pending};
pub(crate) use consume::SchemaCache;
pub(crate) use plan::{Op, OpKind};
pub(crate) use project::{ProjectError, diff, hash_projection};
pub(crate) use write::Outcome;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::dlq::{DLQ_PARTITIONS, DeadLetter, dlq_topic};
use super::guard::DeadLetterGuard;
use super::ledger::Ledger;
use super::provision::{TableFacts, Targets};
use super::route::Router;
use super::{Failpoints, ProcessError, ProcessorConfig, ledger_topic, origin_name, sync_group};
use crate::config::{Direction, FieldMapping, SYSTEM_FIELDS, SyncEntry};
use crate::event::topic_name;
use crate::graph::GraphClient;
use crate::log::{ConsumedRecord, EventLog, LogConsumer, TopicSpec};
use crate::pull::Applier;

/// No record for this long: the processor has caught up with its input, so it flushes.
const CAUGHT_UP: Duration = Duration::from_millis(2);
/// A gap this long inside a transaction's records ends waiting for the rest of it.
const TX_GAP: Duration = Duration::from_millis(20);
/// Pause before re-flushing work a flush left pending (deferred list edits or lookups).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest a flush waits for the rest of a transaction (bounded size: `max_pending` too).
const MAX_TX_WAIT: Duration = Duration::from_secs(1);
/// How often the loop applies rebalances while no record arrives: well under a session
/// timeout, so the unassigned WARN and gauge lag by no more than this.
const ASSIGNMENT_CHECK: Duration = Duration::from_secs(1);

/// Counters of one processor run (also exported as metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessorStats {
    pub events: u64,
    pub coalesced: u64,
    pub skipped_ledger: u64,
    pub skipped_origin: u64,
    pub skipped_stale: u64,
    pub creates: u64,
    pub updates: u64,
    pub deletes: u64,
    pub moves: u64,
    pub adopted: u64,
    pub dead_letters: u64,
    pub flushes: u64,
    /// Return path: list changes applied to PostgreSQL.
    pub pulled: u64,
    /// Return path: our own writes seen coming back (dropped).
    pub echoes: u64,
    pub conflicts: u64,
    /// Input partitions owned now (Kafka: the group's share of this process; embedded: all).
    pub assigned_partitions: u64,
    /// Assignment changes applied (consumer-group rebalances).
    pub rebalances: u64,
}

/// One synced table: its entry, the fields it pushes, its router and its flush stage.
pub(crate) struct TablePlan {
    pub(crate) table: String,
    pub(crate) entry: SyncEntry,
    pub(crate) push_fields: Vec<FieldMapping>,
    /// The entry maps a SharePoint system field (`ID`, `Created`…) into a column.
    pub(crate) has_system_fields: bool,
    pub(crate) router: Router,
    /// 0 for tables other tables' lookups point into (written first), else 1.
    pub(crate) stage: u8,
}

/// The push processor of one pipeline.
pub struct Processor<L: EventLog> {
    pub(crate) cfg: ProcessorConfig,
    pub(crate) log: Arc<L>,
    pub(crate) client: GraphClient,
    pub(crate) targets: Targets,
    pub(crate) ledger: Ledger<L>,
    pub(crate) tables: Vec<TablePlan>,
    pub(crate) by_table: HashMap<String, usize>,
    pub(crate) topics: Vec<String>,
    pub(crate) pending: HashMap<Vec<u8>, Pending>,
    pub(crate) consumed: BTreeMap<(String, i32), i64>,
    pub(crate) committed: BTreeMap<(String, i32), i64>,
    pub(crate) people: HashMap<String, Option<u64>>,
    pub(crate) origin: String,
    pub(crate) dlq_topic: String,
    pub(crate) failpoints: Failpoints,
    pub(crate) stats: ProcessorStats,
    /// Where the counters are published after each flush (the stream run's heartbeat), if asked.
    pub(crate) stats_tx: Option<tokio::sync::watch::Sender<ProcessorStats>>,
    /// The dead-letter guard and the dead letters of its open run, held back (see
    /// [`dead_letters`]).
    pub(crate) dead_guard: DeadLetterGuard,
    pub(crate) held: Vec<DeadLetter>,
    /// When the last dead letter joined `held`.
    pub(crate) held_at: Option<Instant>,
    /// The input partitions this processor owns ([`assign`]).
    pub(crate) own: assign::Ownership,
    /// Per table index: catalog facts (key columns, defaults).
    pub(crate) facts: Vec<TableFacts>,
    /// List id → table index, for lists whose entry pulls.
    pub(crate) list_table: HashMap<String, usize>,
    /// Pending list changes by `<list>/<item>`.
    pub(crate) pulls: HashMap<String, crate::pull::processor::PendingPull>,
    pub(crate) pull_topic: Option<String>,
    pub(crate) pull_consumed: BTreeMap<(String, i32), i64>,
    pub(crate) pull_committed: BTreeMap<(String, i32), i64>,
    /// List id → (resync id, items seen) during a full re-read.
    pub(crate) resync_seen: HashMap<String, (String, HashSet<String>)>,
    pub(crate) applier: Option<Applier>,
    pub(crate) catalog: Option<tokio_postgres::Client>,
    pub(crate) emails: HashMap<u64, Option<String>>,
    /// Items this flush created whose system fields (`ID`, `Created`…) go into their rows once
    /// the ledger has recorded them: (table index, SyncKey, the created item's fields).
    pub(crate) system_fill: Vec<(usize, String, serde_json::Map<String, serde_json::Value>)>,
    pub(crate) conflicts_topic: String,
    /// When the last table record arrived, and whether it continued the transaction before it.
    pub(crate) last_event: (Instant, bool),
    pub(crate) last_lsn: u64,
    /// Operator commands (manual conflict resolution), once a handle was taken.
    pub(crate) commands: Option<tokio::sync::mpsc::Receiver<crate::pull::ConflictCommand>>,
    /// Tables paused for a schema change, and the verdicts per writer schema ([`schema_check`]).
    pub(crate) schema: schema_check::SchemaState,
    /// The accidental-delete guard of the push direction ([`deletes`]).
    pub(crate) deletes: deletes::DeleteHold,
}

impl<L: EventLog> std::fmt::Debug for Processor<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("pipeline", &self.cfg.pipeline.name)
            .field("pending", &self.pending.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// Opens the ledger (rebuilding it from the changelog when behind) and prepares the tables.
    pub async fn new(
        cfg: ProcessorConfig,
        log: Arc<L>,
        client: GraphClient,
        targets: Targets,
        mut facts: HashMap<String, TableFacts>,
    ) -> Result<Self, ProcessError> {
        let p = &cfg.pipeline;
        let (tables, by_table, topics) = plan_tables(&cfg)?;
        for t in &topics {
            log.ensure_topic(&TopicSpec::new(t.clone(), cfg.table_partitions))
                .await?;
        }
        let dlq = dlq_topic(&cfg.prefix, &p.name);
        log.ensure_topic(&TopicSpec::new(dlq.clone(), DLQ_PARTITIONS))
            .await?;
        let ledger = open_ledger(&cfg, &log).await?;
        let table_facts: Vec<TableFacts> = tables
            .iter()
            .map(|t| facts.remove(&t.table).unwrap_or_default())
            .collect();
        let list_table = pulled_lists(&tables, &targets);
        let conflicts = crate::pull::conflicts_topic(&cfg.prefix, &p.name);
        let (pull_topic, applier) = if list_table.is_empty() {
            (None, None)
        } else {
            let (topic, applier) = open_return_side(&cfg, &log, &conflicts).await?;
            (Some(topic), Some(applier))
        };
        Ok(Processor {
            facts: table_facts,
            list_table,
            pulls: HashMap::new(),
            pull_topic,
            pull_consumed: BTreeMap::new(),
            pull_committed: BTreeMap::new(),
            resync_seen: HashMap::new(),
            applier,
            catalog: None,
            emails: HashMap::new(),
            system_fill: Vec::new(),
            conflicts_topic: conflicts,
            last_event: (Instant::now(), false),
            last_lsn: 0,
            commands: None,
            schema: schema_check::SchemaState::default(),
            deletes: deletes::DeleteHold::new(&p.guard),
            origin: origin_name(&p.name),
            dlq_topic: dlq,
            failpoints: Failpoints::from_env(),
            dead_guard: DeadLetterGuard::new(cfg.pipeline.guard.dead_letters),
            cfg,
            log,
            client,
            targets,
            ledger,
            tables,
            by_table,
            topics,
            pending: HashMap::new(),
            consumed: BTreeMap::new(),
            committed: BTreeMap::new(),
            people: HashMap::new(),
            stats: ProcessorStats::default(),
            stats_tx: None,
            held: Vec::new(),
            held_at: None,
            own: assign::Ownership::new(),
        })
    }

    /// The table topics this processor consumes (group [`crate::process::sync_group`]).
    pub fn input_topics(&self) -> &[String] {
        &self.topics
    }

    /// Publishes the counters to `tx` after every flush, continuing from the value it holds (a
    /// processor rebuilt after a pause keeps counting where the previous one stopped).
    pub fn publish_stats(&mut self, tx: tokio::sync::watch::Sender<ProcessorStats>) {
        self.stats = tx.borrow().clone();
        self.stats_tx = Some(tx);
    }

    pub(crate) fn send_stats(&self) {
        if let Some(tx) = &self.stats_tx {
            tx.send_replace(self.stats.clone());
        }
    }

    /// Ledger records replayed from the changelog when this processor opened.
    pub fn ledger_replayed(&self) -> u64 {
        self.ledger.replayed
    }

    /// Consumes until `shutdown`, then flushes what is pending, commits and returns the counters.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
    ) -> Result<ProcessorStats, ProcessError> {
        let name = self.cfg.pipeline.name.clone();
        let (mut consumer, mut schemas, mut pulls) = self.open_inputs(&shutdown).await?;
        info!(pipeline = %name, topics = self.topics.len(), pull = pulls.is_some(), "processor started");
        let window = self.cfg.flush_window;
        let mut commands = self.commands.take();
        let delete_guard = self.deletes.handle.clone();
        // When to flush (see `flush_deadline`): the window bounds how long a change waits to be
        // coalesced; caught-up input flushes at once; a transaction still arriving is not split.
        let mut window_start: Option<Instant> = None;
        // After a flush that left work behind (a list edit waiting for its row's change, a row
        // waiting for its lookup target), the next one waits a little instead of spinning.
        let mut not_before: Option<Instant> = None;
        // Applies rebalances also while no record arrives (a member left without partitions
        // must notice it, see `assign`).
        let mut assignment_tick = tokio::time::interval(ASSIGNMENT_CHECK);
        loop {
            let deadline = window_start.map(|start| {
                let d = self.flush_deadline(start, window);
                not_before.map_or(d, |n| d.max(n))
            });
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = consumer.recv() => match r? {
                    Some(rec) => {
                        // Before the record is used: its partition may be newly assigned (the
                        // ledger catches up first) or just revoked (then it is not ours).
                        self.apply_assignment(&mut consumer).await?;
                        if !self.owns(&rec) {
                            continue;
                        }
                        self.ingest(rec, &mut schemas).await?;
                        window_start.get_or_insert_with(Instant::now);
                        if self.unparked() >= self.cfg.max_pending {
                            self.flush_with_retry(&mut consumer, &mut pulls, &shutdown).await?;
                            window_start = None;
                        }
                    }
                    None => {
                        self.flush_with_retry(&mut consumer, &mut pulls, &shutdown).await?;
                        break;
                    }
                },
                r = recv_opt(&mut pulls) => match r? {
                    Some(rec) => {
                        self.ingest_pull(rec).await?;
                        window_start.get_or_insert_with(Instant::now);
                        if self.unparked_pulls() >= self.cfg.max_pending {
                            self.flush_with_retry(&mut consumer, &mut pulls, &shutdown).await?;
                            window_start = None;
                        }
                    }
                    // Shutdown: the table consumer ends too and does the final flush.
                    None => pulls = None,
                },
                _ = assignment_tick.tick() => self.apply_assignment(&mut consumer).await?,
                // The operator allowed or discarded held deletes: the next flush applies it.
                () = guard_decided(&delete_guard) => {
                    window_start = Some(Instant::now());
                    not_before = None;
                }
                cmd = recv_cmd(&mut commands) => match cmd {
                    Some(cmd) => {
                        self.serve_command(cmd).await?;
                        if window_start.is_none() && (!self.pending.is_empty() || !self.pulls.is_empty()) {
                            window_start = Some(Instant::now());
                        }
                    }
                    None => commands = None,
                },
                () = timer => {
                    self.flush_with_retry(&mut consumer, &mut pulls, &shutdown).await?;
                    // Deletes paused by the guard wait for the operator, not for a re-flush.
                    window_start = (self.unparked() > 0 || self.unparked_pulls() > 0)
                        .then(Instant::now);
                    not_before = window_start.map(|t| t + RETRY_PAUSE);
                    // Held dead letters of a run that went quiet are released by a later flush.
                    if window_start.is_none() && let Some(at) = self.held_release_at() {
                        window_start = Some(Instant::now());
                        not_before = Some(at);
                    }
                }
            }
        }
        schemas.close();
        self.send_stats();
        info!(pipeline = %name, stats = ?self.stats, "push processor stopped");
        Ok(self.stats)
    }

    /// The loop's inputs, opened in this order: the table consumer (group `<prefix>.<pipeline>.sync`),
    /// the schema cache, and (when an entry pulls) the return stream's consumer.
    async fn open_inputs(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(L::Consumer, SchemaCache<L::Consumer>, Option<L::Consumer>), ProcessError> {
        let name = &self.cfg.pipeline.name;
        let group = sync_group(&self.cfg.prefix, name);
        let stop = shutdown.child_token();
        // Shared by every process of the pipeline (see `assign`).
        let consumer = self
            .log
            .shared_consumer(&group, &self.topics, stop.clone())
            .await?;
        let schemas = self.schema_cache().await?;
        // The return stream: its own group, so its position is independent of the push side's.
        let pulls = match self.pull_topic.clone() {
            Some(t) => Some(
                self.log
                    .consumer(
                        &super::return_group(&self.cfg.prefix, name),
                        &[t],
                        stop.clone(),
                    )
                    .await?,
            ),
            None => None,
        };
        Ok((consumer, schemas, pulls))
    }

    /// The flush moment for a window that started at `start`:
    /// - input caught up (no record for [`CAUGHT_UP`]) → now: latency is not spent waiting;
    /// - the last record belongs to a transaction whose other records may still be arriving
    ///   (same commit LSN as the one before) → when they stop for [`TX_GAP`], at most
    ///   [`MAX_TX_WAIT`] after the start: one transaction's changes are written together;
    /// - otherwise at the end of the window (coalescing bursts of changes to the same rows).
    pub(crate) fn flush_deadline(&self, start: Instant, window: Duration) -> Instant {
        let (last_at, mid_tx) = self.last_event;
        if mid_tx {
            (last_at + TX_GAP).min(start + MAX_TX_WAIT.max(window))
        } else {
            (last_at + CAUGHT_UP).min(start + window)
        }
    }
}

/// Resolves when the operator decided on held deletes; pending forever without a handle.
async fn guard_decided(h: &Option<crate::process::delete_guard::DeleteGuardHandle>) {
    match h {
        Some(h) => h.decided().await,
        None => std::future::pending().await,
    }
}

/// The next operator command; pending forever when there is no handle.
pub(crate) async fn recv_cmd(
    c: &mut Option<tokio::sync::mpsc::Receiver<crate::pull::ConflictCommand>>,
) -> Option<crate::pull::ConflictCommand> {
    match c {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// `recv` of an optional consumer; pending forever when there is none.
pub(crate) async fn recv_opt<C: LogConsumer>(
    c: &mut Option<C>,
) -> Result<Option<ConsumedRecord>, crate::log::LogError> {
    match c {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// The tables in config order, their index by `schema.table`, their capture topics.
type PlannedTables = (Vec<TablePlan>, HashMap<String, usize>, Vec<String>);

/// The tables of the pipeline in config order, their index by `schema.table`, and their
/// capture topics. Tables that other tables' lookups point into are stage 0 (written first).
fn plan_tables(cfg: &ProcessorConfig) -> Result<PlannedTables, ProcessError> {
    let p = &cfg.pipeline;
    let referenced: HashSet<&str> = p
        .sync
        .iter()
        .flat_map(|e| e.fields.iter())
        .filter_map(|f| f.lookup_list.as_deref())
        .collect();
    let mut tables = Vec::new();
    let mut by_table = HashMap::new();
    let mut topics = Vec::new();
    for e in &p.sync {
        let router = Router::new(e).map_err(ProcessError::Config)?;
        let push_fields = e
            .fields
            .iter()
            .filter(|f| {
                f.direction != Direction::PullOnly && !SYSTEM_FIELDS.contains(&f.field.as_str())
            })
            .cloned()
            .collect();
        let table = e.table.to_string();
        by_table.insert(table.clone(), tables.len());
        topics.push(topic_name(
            &cfg.prefix,
            &p.name,
            &e.table.schema,
            &e.table.name,
        ));
        tables.push(TablePlan {
            table,
            stage: if e.lists().any(|l| referenced.contains(l)) {
                0
            } else {
                1
            },
            has_system_fields: e.pull.enabled
                && e.fields
                    .iter()
                    .any(|f| SYSTEM_FIELDS.contains(&f.field.as_str())),
            entry: e.clone(),
            push_fields,
            router,
        });
    }
    Ok((tables, by_table, topics))
}

/// Opens the ledger under `<state_dir>/ledger`, rebuilding it from its changelog when behind.
async fn open_ledger<L: EventLog + 'static>(
    cfg: &ProcessorConfig,
    log: &Arc<L>,
) -> Result<Ledger<L>, ProcessError> {
    let p = &cfg.pipeline;
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| ProcessError::Config(format!("state dir {}: {e}", cfg.state_dir.display())))?;
    let mut ledger = Ledger::open(
        &cfg.state_dir.join("ledger"),
        log.clone(),
        &ledger_topic(&cfg.prefix, &p.name),
    )
    .await?;
    if cfg.audit {
        ledger
            .enable_audit(&super::audit::audit_topic(&cfg.prefix, &p.name))
            .await?;
    }
    if ledger.replayed > 0 {
        info!(pipeline = %p.name, records = ledger.replayed, "ledger rebuilt from its changelog");
    }
    Ok(ledger)
}

/// List id → table index, for the lists of entries that pull.
fn pulled_lists(tables: &[TablePlan], targets: &Targets) -> HashMap<String, usize> {
    let mut list_table = HashMap::new();
    for (i, t) in tables.iter().enumerate() {
        if t.entry.pull.enabled {
            for l in t.entry.lists() {
                if let Some(id) = targets.list_id(l) {
                    list_table.insert(id.to_string(), i);
                }
            }
        }
    }
    list_table
}

/// The return path's topics (conflicts, list changes) and its PostgreSQL applier; only for
/// pipelines with an entry that pulls. Returns the list-changes topic.
async fn open_return_side<L: EventLog + 'static>(
    cfg: &ProcessorConfig,
    log: &Arc<L>,
    conflicts: &str,
) -> Result<(String, Applier), ProcessError> {
    let p = &cfg.pipeline;
    log.ensure_topic(&TopicSpec::new(conflicts.to_string(), 1))
        .await?;
    let t = crate::pull::changes_topic(&cfg.prefix, &p.name);
    log.ensure_topic(&TopicSpec::new(
        t.clone(),
        crate::pull::poller::CHANGES_PARTITIONS,
    ))
    .await?;
    let instances: Vec<String> = p
        .source
        .instances()
        .map(|u| u.expose().to_owned())
        .collect();
    // `open`: another process of the pipeline may be applying now (see `Applier::open`); every
    // reconnect goes to the instance that is the primary then (failover).
    let applier = Applier::open(&instances, &p.name, crate::pull::apply::IDLE_RELEASE)
        .await
        .map_err(|e| ProcessError::Catalog(format!("return-path applier: {e}")))?;
    Ok((t, applier))
}
