//! The processor loop (see the [module docs](super) for the delivery contract): ingest →
//! coalesce → flush (map, route, ledger check, `$batch`, ledger commit) → commit offsets.
//!
//! `LogConsumer::recv` is cancel-safe in both log implementations (a record is handed out only
//! by the poll that returns it), so the loop may race it against the flush timer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::convert::{self, Resolved, Unmappable};
use super::dlq::{DLQ_PARTITIONS, DeadLetter, SourcePosition, dlq_topic};
use super::ledger::{self, Entry, Intent, ItemRef, Ledger, Provenance};
use super::provision::{TableFacts, Targets};
use super::route::Router;
use super::row::{self, Cell, Row};
use super::{
    Failpoints, MAX_LOOKUP_DEFERRALS, ProcessError, ProcessorConfig, ledger_topic, origin_name,
    sync_group,
};
use crate::config::{Direction, FieldMapping, FieldType, SYNC_KEY_FIELD, SYSTEM_FIELDS, SyncEntry};
use crate::event::registry::{RegistryClient, confluent_schema_id, to_single_object};
use crate::event::{
    DecodeError, SchemaResolver, decode_with_fingerprint, schemas_topic, topic_name,
};
use crate::graph::{BatchRequest, GraphClient, GraphError, ItemQuery, MAX_BATCH};
use crate::log::{ConsumedRecord, EventLog, LogConsumer, TopicSpec};
use crate::pull::Applier;
use crate::telemetry::metrics as m;

/// No record for this long: the processor has caught up with its input, so it flushes.
const CAUGHT_UP: Duration = Duration::from_millis(2);
/// A gap this long inside a transaction's records ends waiting for the rest of it.
const TX_GAP: Duration = Duration::from_millis(20);
/// Pause before re-flushing work a flush left pending (deferred list edits or lookups).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest a flush waits for the rest of a transaction (bounded size: `max_pending` too).
const MAX_TX_WAIT: Duration = Duration::from_secs(1);

/// The SyncKey of a row: the key column's text for one-column keys, else a JSON array of the
/// texts in key order. Stable across restarts and versions: it is stored in every item.
pub fn sync_key(key: &[(String, Cell)]) -> String {
    if let [(_, c)] = key {
        return c.to_text().unwrap_or_default();
    }
    let parts: Vec<Option<String>> = key.iter().map(|(_, c)| c.to_text()).collect();
    serde_json::to_string(&parts).unwrap_or_default()
}

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
}

pub(crate) struct TablePlan {
    pub(crate) table: String,
    pub(crate) entry: SyncEntry,
    pub(crate) push_fields: Vec<FieldMapping>,
    pub(crate) router: Router,
    /// 0 for tables other tables' lookups point into (written first), else 1.
    pub(crate) stage: u8,
}

#[derive(Debug, Clone)]
pub(crate) enum Desired {
    Upsert(Row),
    Delete,
}

#[derive(Debug, Clone)]
pub(crate) struct LastEvent {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) table: usize,
    pub(crate) sync_key: String,
    pub(crate) desired: Desired,
    pub(crate) lsn: u64,
    /// Commit time of the latest change merged in (for `last_writer_wins`).
    pub(crate) commit_ts_ms: i64,
    /// Lowest offset merged into this pending write, per (topic, partition).
    pub(crate) offsets: BTreeMap<(String, i32), i64>,
    pub(crate) last: LastEvent,
    pub(crate) deferrals: u32,
}

pub(crate) struct SchemaCache<C> {
    pub(crate) resolver: SchemaResolver,
    pub(crate) consumer: C,
    pub(crate) topic: String,
    pub(crate) read_to: i64,
    pub(crate) stop: CancellationToken,
    /// With `log.kafka.schema_registry`: resolves Confluent schema ids to fingerprints.
    pub(crate) registry: Option<RegistryClient>,
    /// Registry id → CRC-64-AVRO fingerprint of that schema.
    pub(crate) by_id: HashMap<u32, u64>,
}

/// What a Graph write came back with, classified for the processor.
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok {
        body: Option<Json>,
    },
    NotFound,
    /// The create hit the unique `SyncKey`: an earlier attempt already created the item.
    Duplicate,
    /// 412: the item changed in the list since our last write (conditional PATCH).
    Stale,
    Rejected {
        message: String,
        request_id: Option<String>,
        client_request_id: String,
    },
    Transient(String),
}

#[derive(Debug, Clone)]
pub(crate) enum OpKind {
    Create {
        list_id: String,
        fields: Map<String, Json>,
        projection: BTreeMap<String, Json>,
        hash: String,
        move_from: Option<ItemRef>,
    },
    Update {
        item: ItemRef,
        fields: Map<String, Json>,
        projection: BTreeMap<String, Json>,
        hash: String,
        /// The item's eTag when the entry pulls: a person's edit since our last write makes
        /// the PATCH fail with 412 instead of being overwritten unseen.
        if_match: Option<String>,
    },
    Delete {
        item: ItemRef,
        /// Deleting a moved row's old item (not the live one).
        old_of_move: bool,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) key: Vec<u8>,
    pub(crate) kind: OpKind,
}

pub(crate) enum ProjectError {
    Unmappable(Unmappable),
    Defer(String),
    Graph(GraphError),
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
    pub(crate) conflicts_topic: String,
    /// When the last table record arrived, and whether it continued the transaction before it.
    pub(crate) last_event: (Instant, bool),
    pub(crate) last_lsn: u64,
    /// Operator commands (manual conflict resolution), once a handle was taken.
    pub(crate) commands: Option<tokio::sync::mpsc::Receiver<crate::pull::ConflictCommand>>,
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
                entry: e.clone(),
                push_fields,
                router,
            });
        }
        for t in &topics {
            log.ensure_topic(&TopicSpec::new(t.clone(), cfg.table_partitions))
                .await?;
        }
        let dlq = dlq_topic(&cfg.prefix, &p.name);
        log.ensure_topic(&TopicSpec::new(dlq.clone(), DLQ_PARTITIONS))
            .await?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            ProcessError::Config(format!("state dir {}: {e}", cfg.state_dir.display()))
        })?;
        let ledger = Ledger::open(
            &cfg.state_dir.join("ledger"),
            log.clone(),
            &ledger_topic(&cfg.prefix, &p.name),
        )
        .await?;
        if ledger.replayed > 0 {
            info!(pipeline = %p.name, records = ledger.replayed, "ledger rebuilt from its changelog");
        }
        let table_facts: Vec<TableFacts> = tables
            .iter()
            .map(|t| facts.remove(&t.table).unwrap_or_default())
            .collect();
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
        let pulls = !list_table.is_empty();
        let conflicts = crate::pull::conflicts_topic(&cfg.prefix, &p.name);
        let mut pull_topic = None;
        let mut applier = None;
        if pulls {
            log.ensure_topic(&TopicSpec::new(conflicts.clone(), 1))
                .await?;
            let t = crate::pull::changes_topic(&cfg.prefix, &p.name);
            log.ensure_topic(&TopicSpec::new(
                t.clone(),
                crate::pull::poller::CHANGES_PARTITIONS,
            ))
            .await?;
            pull_topic = Some(t);
            applier = Some(
                Applier::connect(p.source.url.expose(), &p.name)
                    .await
                    .map_err(|e| ProcessError::Catalog(format!("return-path applier: {e}")))?,
            );
        }
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
            conflicts_topic: conflicts,
            last_event: (Instant::now(), false),
            last_lsn: 0,
            commands: None,
            origin: origin_name(&p.name),
            dlq_topic: dlq,
            failpoints: Failpoints::from_env(),
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
        })
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
        let group = sync_group(&self.cfg.prefix, &name);
        let stop = shutdown.child_token();
        let mut consumer = self
            .log
            .consumer(&group, &self.topics, stop.clone())
            .await?;
        let mut schemas = self.schema_cache().await?;
        // The return stream: its own group, so its position is independent of the push side's.
        let mut pulls = match self.pull_topic.clone() {
            Some(t) => Some(
                self.log
                    .consumer(
                        &super::return_group(&self.cfg.prefix, &name),
                        &[t],
                        stop.clone(),
                    )
                    .await?,
            ),
            None => None,
        };
        info!(pipeline = %name, topics = self.topics.len(), pull = pulls.is_some(), "processor started");
        let window = self.cfg.flush_window;
        let mut commands = self.commands.take();
        // When to flush (see `flush_deadline`): the window bounds how long a change waits to be
        // coalesced; caught-up input flushes at once; a transaction still arriving is not split.
        let mut window_start: Option<Instant> = None;
        // After a flush that left work behind (a list edit waiting for its row's change, a row
        // waiting for its lookup target), the next one waits a little instead of spinning.
        let mut not_before: Option<Instant> = None;
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
                        self.ingest(rec, &mut schemas).await?;
                        window_start.get_or_insert_with(Instant::now);
                        if self.pending.len() >= self.cfg.max_pending {
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
                        if self.pulls.len() >= self.cfg.max_pending {
                            self.flush_with_retry(&mut consumer, &mut pulls, &shutdown).await?;
                            window_start = None;
                        }
                    }
                    // Shutdown: the table consumer ends too and does the final flush.
                    None => pulls = None,
                },
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
                    window_start = (!self.pending.is_empty() || !self.pulls.is_empty())
                        .then(Instant::now);
                    not_before = window_start.map(|t| t + RETRY_PAUSE);
                }
            }
        }
        schemas.stop.cancel();
        info!(pipeline = %name, stats = ?self.stats, "push processor stopped");
        Ok(self.stats)
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

    pub(crate) async fn schema_cache(&self) -> Result<SchemaCache<L::Consumer>, ProcessError> {
        let topic = schemas_topic(&self.cfg.prefix, &self.cfg.pipeline.name);
        self.log
            .ensure_topic(&TopicSpec::compacted(topic.clone(), 1))
            .await?;
        let stop = CancellationToken::new();
        // A group that never commits reads the compacted topic from its start every time.
        let group = format!("{topic}.reader.{}", uuid::Uuid::new_v4().simple());
        let consumer = self
            .log
            .consumer(&group, std::slice::from_ref(&topic), stop.clone())
            .await?;
        let registry = match &self.cfg.pipeline.log {
            crate::config::LogConfig::Kafka {
                schema_registry: Some(r),
                ..
            } => Some(RegistryClient::new(r)),
            _ => None,
        };
        Ok(SchemaCache {
            resolver: SchemaResolver::new(),
            consumer,
            topic,
            read_to: 0,
            stop,
            registry,
            by_id: HashMap::new(),
        })
    }

    pub(crate) async fn refresh_schemas(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
    ) -> Result<(), ProcessError> {
        let end = self
            .log
            .end_offsets(&cache.topic)
            .await?
            .first()
            .copied()
            .unwrap_or(0);
        debug!(topic = %cache.topic, from = cache.read_to, end, "reading the schemas topic");
        while cache.read_to < end {
            let rec =
                match tokio::time::timeout(Duration::from_secs(10), cache.consumer.recv()).await {
                    Ok(r) => r?,
                    Err(_) => break,
                };
            let Some(rec) = rec else { break };
            cache.read_to = rec.offset + 1;
            if let (Ok(k), Some(Ok(v))) = (
                std::str::from_utf8(&rec.record.key),
                rec.record.value.as_deref().map(std::str::from_utf8),
            ) && let Err(e) = cache.resolver.add_topic_record(k, v)
            {
                warn!(topic = %cache.topic, "ignoring a bad schemas-topic record: {e}");
            }
        }
        Ok(())
    }

    pub(crate) async fn decode(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        bytes: &[u8],
    ) -> Result<Result<(u64, apache_avro::types::Value), DecodeError>, ProcessError> {
        // Confluent wire format: the id names the schema the capture sink registered; the same
        // schema (with its `sb.*` field properties) is in the schemas topic under its fingerprint.
        let reframed;
        let bytes = match confluent_schema_id(bytes) {
            Some(id) => match self.fingerprint_of_id(cache, id).await? {
                Ok(fp) => {
                    reframed = to_single_object(bytes, fp);
                    &reframed[..]
                }
                Err(e) => return Ok(Err(e)),
            },
            None => bytes,
        };
        match decode_with_fingerprint(bytes, &cache.resolver) {
            Err(DecodeError::UnknownFingerprint(_)) => {
                self.refresh_schemas(cache).await?;
                Ok(decode_with_fingerprint(bytes, &cache.resolver))
            }
            other => Ok(other),
        }
    }

    /// The fingerprint of registry schema `id` (fetched once); the schemas topic is re-read when
    /// it does not have that schema yet, and the registry's copy is used when it never does.
    pub(crate) async fn fingerprint_of_id(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        id: u32,
    ) -> Result<Result<u64, DecodeError>, ProcessError> {
        if let Some(fp) = cache.by_id.get(&id) {
            return Ok(Ok(*fp));
        }
        let Some(client) = &cache.registry else {
            return Ok(Err(DecodeError::NeedsRegistry(id)));
        };
        let json = match client.schema_by_id(id).await {
            Ok(json) => json,
            Err(e @ crate::event::registry::RegistryError::UnknownId { .. }) => {
                return Ok(Err(DecodeError::Schema {
                    origin: format!("schema registry id {id}"),
                    reason: e.to_string(),
                }));
            }
            Err(e) => return Err(ProcessError::Registry(e)),
        };
        let mut probe = SchemaResolver::new();
        let fp = match probe.add_schema_json(&json) {
            Ok(fp) => fp,
            Err(e) => return Ok(Err(e)),
        };
        if cache.resolver.get(fp).is_none() {
            self.refresh_schemas(cache).await?;
        }
        if cache.resolver.get(fp).is_none()
            && let Err(e) = cache.resolver.add_schema_json(&json)
        {
            return Ok(Err(e));
        }
        cache.by_id.insert(id, fp);
        Ok(Ok(fp))
    }

    pub(crate) async fn ingest(
        &mut self,
        rec: ConsumedRecord,
        cache: &mut SchemaCache<L::Consumer>,
    ) -> Result<(), ProcessError> {
        let tp = (rec.topic.clone(), rec.partition);
        self.consumed.insert(tp.clone(), rec.offset + 1);
        self.stats.events += 1;
        let Some(value) = rec.record.value.as_deref() else {
            return Ok(());
        };
        let last = LastEvent {
            topic: rec.topic.clone(),
            partition: rec.partition,
            offset: rec.offset,
            key: rec.record.key.clone(),
            value: rec.record.value.clone(),
        };
        let change = match self.decode(cache, value).await? {
            Ok((fp, v)) => cache
                .resolver
                .get(fp)
                .ok_or_else(|| row::RowError("schema vanished".into()))
                .and_then(|s| row::change_from_avro(s, &v)),
            Err(e) => Err(row::RowError(e.to_string())),
        };
        let change = match change {
            Ok(c) => c,
            Err(e) => {
                let d = self.dead_letter("?", "?", "undecodable", e.to_string(), &last);
                return self.append_dead(vec![d]).await;
            }
        };
        self.last_event = (
            Instant::now(),
            change.lsn != 0 && change.lsn == self.last_lsn,
        );
        self.last_lsn = change.lsn;
        metrics::counter!(m::PUSH_EVENTS_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "op" => change.op.to_string())
            .increment(1);
        let Some(&ti) = self.by_table.get(&change.table) else {
            return Ok(());
        };
        let table = self.tables[ti].table.clone();
        if change.op == 't' {
            let mut keys: Vec<(Vec<u8>, String)> = self
                .ledger
                .scan_table(&table)?
                .into_iter()
                .filter_map(|(k, _)| ledger::split_key(&k).map(|(_, sk)| (k, sk)))
                .collect();
            for (k, p) in &self.pending {
                if p.table == ti {
                    keys.push((k.clone(), p.sync_key.clone()));
                }
            }
            for (k, sk) in keys {
                self.put(
                    k,
                    ti,
                    sk,
                    Desired::Delete,
                    change.lsn,
                    change.commit_ts_ms,
                    &last,
                );
            }
            return Ok(());
        }
        let key_cells = match self.decode(cache, &rec.record.key).await? {
            Ok((fp, v)) => cache
                .resolver
                .get(fp)
                .ok_or_else(|| row::RowError("schema vanished".into()))
                .and_then(|s| row::key_from_avro(s, &v)),
            Err(e) => Err(row::RowError(format!("key: {e}"))),
        };
        let key_cells = match key_cells {
            Ok(k) if !k.is_empty() => k,
            Ok(_) => Err(row::RowError("the event has no key columns".into()))
                .map_err(|e: row::RowError| e)
                .unwrap_or_default(),
            Err(e) => {
                let d = self.dead_letter(&table, "?", "undecodable", e.to_string(), &last);
                return self.append_dead(vec![d]).await;
            }
        };
        if key_cells.is_empty() {
            let d = self.dead_letter(
                &table,
                "?",
                "undecodable",
                "the event has no key".into(),
                &last,
            );
            return self.append_dead(vec![d]).await;
        }
        let sk = sync_key(&key_cells);
        let lkey = ledger::key(&table, &sk);
        if change.origin.as_deref() == Some(self.origin.as_str()) {
            // Our own return-path write: the list already has what it wrote. But its row image
            // is the newest state of the row, and it also folds in database changes committed
            // before it that this processor skips as older than the ledger (the pull raised the
            // ledger's LSN to this commit). So it is not dropped: it replaces an older pending
            // push, or becomes one when the ledger knows the row's item; the flush diffs it
            // against the ledger, so the pulled values (already there) cost nothing and only
            // what the list lacks is sent. A row whose ledger entry the return path has not
            // written yet (a person-created item mid-creation) is left to the return path.
            // Replayed after a restart, an event older than the ledger is history: skipped.
            let known_item = self
                .ledger
                .get(&lkey)?
                .is_some_and(|e| e.item.is_some() && change.lsn >= e.lsn);
            match self.pending.get_mut(&lkey) {
                Some(p) => {
                    match (change.op, change.after) {
                        ('c' | 'u' | 'r', Some(after)) => p.desired = Desired::Upsert(after),
                        _ => p.desired = Desired::Delete,
                    }
                    p.lsn = p.lsn.max(change.lsn);
                }
                None if known_item && matches!(change.op, 'c' | 'u' | 'r') => {
                    if let Some(after) = change.after {
                        self.put(
                            lkey,
                            ti,
                            sk,
                            Desired::Upsert(after),
                            change.lsn,
                            change.commit_ts_ms,
                            &last,
                        );
                        return Ok(());
                    }
                }
                None => {}
            }
            self.stats.skipped_origin += 1;
            self.skip_metric("own_origin");
            return Ok(());
        }
        match change.op {
            'd' => self.put(
                lkey,
                ti,
                sk,
                Desired::Delete,
                change.lsn,
                change.commit_ts_ms,
                &last,
            ),
            'c' | 'u' | 'r' => {
                let Some(mut after) = change.after else {
                    let d = self.dead_letter(
                        &table,
                        &sk,
                        "undecodable",
                        "no after image".into(),
                        &last,
                    );
                    return self.append_dead(vec![d]).await;
                };
                // An unchanged TOAST value: take it from the pending state when there is one
                // (the ledger's projection covers the rest at flush time).
                if let Some(Pending {
                    desired: Desired::Upsert(prev),
                    ..
                }) = self.pending.get(&lkey)
                {
                    for (col, cell) in after.iter_mut() {
                        if matches!(cell, Cell::Unchanged)
                            && let Some(p) = prev.get(col)
                        {
                            *cell = p.clone();
                        }
                    }
                }
                self.put(
                    lkey,
                    ti,
                    sk,
                    Desired::Upsert(after),
                    change.lsn,
                    change.commit_ts_ms,
                    &last,
                );
            }
            other => debug!(op = %other, "ignoring an event op the processor does not handle"),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put(
        &mut self,
        key: Vec<u8>,
        table: usize,
        sync_key: String,
        desired: Desired,
        lsn: u64,
        commit_ts_ms: i64,
        last: &LastEvent,
    ) {
        let tp = (last.topic.clone(), last.partition);
        match self.pending.get_mut(&key) {
            Some(p) => {
                self.stats.coalesced += 1;
                metrics::counter!(m::PUSH_COALESCED_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
                    .increment(1);
                p.desired = desired;
                p.lsn = p.lsn.max(lsn);
                p.commit_ts_ms = p.commit_ts_ms.max(commit_ts_ms);
                p.offsets.entry(tp).or_insert(last.offset);
                p.last = last.clone();
            }
            None => {
                let mut offsets = BTreeMap::new();
                offsets.insert(tp, last.offset);
                self.pending.insert(
                    key,
                    Pending {
                        table,
                        sync_key,
                        desired,
                        lsn,
                        commit_ts_ms,
                        offsets,
                        last: last.clone(),
                        deferrals: 0,
                    },
                );
            }
        }
        metrics::gauge!(m::PUSH_PENDING_ROWS, "pipeline" => self.cfg.pipeline.name.clone())
            .set(self.pending.len() as f64);
    }

    pub(crate) fn skip_metric(&self, reason: &'static str) {
        metrics::counter!(m::PUSH_SKIPPED_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "reason" => reason)
            .increment(1);
    }

    pub(crate) fn dead_letter(
        &self,
        table: &str,
        key: &str,
        kind: &str,
        reason: String,
        last: &LastEvent,
    ) -> DeadLetter {
        DeadLetter {
            pipeline: self.cfg.pipeline.name.clone(),
            table: table.to_string(),
            key: key.to_string(),
            kind: kind.to_string(),
            reason,
            list: None,
            request_id: None,
            client_request_id: None,
            source: Some(SourcePosition {
                topic: last.topic.clone(),
                partition: last.partition,
                offset: last.offset,
            }),
            event_key_b64: None,
            event_value_b64: None,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
        .with_event(&last.key, last.value.as_deref())
    }

    pub(crate) async fn append_dead(&mut self, dead: Vec<DeadLetter>) -> Result<(), ProcessError> {
        if dead.is_empty() {
            return Ok(());
        }
        for d in &dead {
            warn!(pipeline = %d.pipeline, table = %d.table, key = %d.key, kind = %d.kind,
                request_id = d.request_id.as_deref().unwrap_or(""), "dead letter: {}", d.reason);
            metrics::counter!(m::PUSH_DEAD_LETTERS_TOTAL, "pipeline" => d.pipeline.clone(), "kind" => d.kind.clone())
                .increment(1);
        }
        self.stats.dead_letters += dead.len() as u64;
        let records = dead.iter().map(DeadLetter::to_record).collect();
        self.log.append(&self.dlq_topic, records).await?;
        Ok(())
    }

    /// Flushes until it succeeds (retryable failures back off), then commits offsets. On
    /// shutdown a retryable failure stops retrying: the uncommitted events replay on restart.
    pub(crate) async fn flush_with_retry(
        &mut self,
        consumer: &mut L::Consumer,
        pulls: &mut Option<L::Consumer>,
        shutdown: &CancellationToken,
    ) -> Result<(), ProcessError> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.flush().await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    if shutdown.is_cancelled() {
                        warn!("flush failed while draining ({e}); the rest replays on restart");
                        break;
                    }
                    warn!(retry_in = ?delay, "flush incomplete, retrying: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
        self.commit_offsets(consumer).await?;
        if let Some(c) = pulls {
            self.commit_pull_offsets(c).await?;
        }
        Ok(())
    }

    pub(crate) async fn commit_pull_offsets(
        &mut self,
        consumer: &mut L::Consumer,
    ) -> Result<(), ProcessError> {
        let mut floor: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for p in self.pulls.values() {
            let e = floor.entry((p.topic.clone(), 0)).or_insert(p.offset);
            *e = (*e).min(p.offset);
        }
        for (tp, next) in &self.pull_consumed {
            let target = floor.get(tp).map_or(*next, |f| (*f).min(*next));
            if self.pull_committed.get(tp).is_none_or(|c| *c < target) {
                consumer.commit(&tp.0, tp.1, target).await?;
                self.pull_committed.insert(tp.clone(), target);
            }
        }
        Ok(())
    }

    pub(crate) async fn commit_offsets(
        &mut self,
        consumer: &mut L::Consumer,
    ) -> Result<(), ProcessError> {
        let mut floor: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for p in self.pending.values() {
            for (tp, off) in &p.offsets {
                let e = floor.entry(tp.clone()).or_insert(*off);
                *e = (*e).min(*off);
            }
        }
        for (tp, next) in &self.consumed {
            let target = floor.get(tp).map_or(*next, |f| (*f).min(*next));
            if self.committed.get(tp).is_none_or(|c| *c < target) {
                consumer.commit(&tp.0, tp.1, target).await?;
                self.committed.insert(tp.clone(), target);
            }
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ProcessError> {
        if self.pending.is_empty() && self.pulls.is_empty() {
            return Ok(());
        }
        self.stats.flushes += 1;
        let started = Instant::now();
        let mut transient: Option<String> = None;
        // List edits first: they decide conflicts against the pushes pending in this flush.
        if let Err(e) = self.flush_pulls().await {
            if e.is_retryable() {
                transient.get_or_insert(e.to_string());
            } else {
                return Err(e);
            }
        }
        for stage in 0..=1u8 {
            let keys: Vec<Vec<u8>> = self
                .pending
                .iter()
                .filter(|(_, p)| self.tables[p.table].stage == stage)
                .map(|(k, _)| k.clone())
                .collect();
            if keys.is_empty() {
                continue;
            }
            if let Err(e) = self.flush_keys(keys).await {
                if e.is_retryable() {
                    transient.get_or_insert(e.to_string());
                } else {
                    return Err(e);
                }
            }
        }
        metrics::histogram!(m::PUSH_FLUSH_SECONDS, "pipeline" => self.cfg.pipeline.name.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!(m::PUSH_PENDING_ROWS, "pipeline" => self.cfg.pipeline.name.clone())
            .set(self.pending.len() as f64);
        match transient {
            None => Ok(()),
            Some(msg) => Err(ProcessError::Graph(GraphError::Transient {
                status: None,
                message: msg,
                request_id: None,
            })),
        }
    }

    /// One stage of a flush: plan, record intents, write, record outcomes.
    pub(crate) async fn flush_keys(&mut self, keys: Vec<Vec<u8>>) -> Result<(), ProcessError> {
        let mut entries: HashMap<Vec<u8>, Entry> = HashMap::new();
        let mut ops: Vec<Op> = Vec::new();
        let mut done: Vec<Vec<u8>> = Vec::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        let mut ledger_changes: Vec<(Vec<u8>, Option<Entry>)> = Vec::new();
        let mut graph_error: Option<GraphError> = None;

        for k in keys {
            let Some(p) = self.pending.get(&k).cloned() else {
                continue;
            };
            let mut entry = self.ledger.get(&k)?.unwrap_or_default();
            if p.lsn != 0 && entry.lsn > p.lsn {
                self.stats.skipped_stale += 1;
                self.skip_metric("stale");
                done.push(k);
                continue;
            }
            let table = self.tables[p.table].table.clone();
            match &p.desired {
                Desired::Delete => {
                    if let Some(intent) = entry.intent.take() {
                        // A create may have reached SharePoint before a crash: find it to delete it.
                        match self.find_by_sync_key(&intent.create_in, &p.sync_key).await {
                            Ok(Some(id)) => {
                                if let Some(old) = entry.item.replace(ItemRef {
                                    list_id: intent.create_in.clone(),
                                    item_id: id,
                                }) && old.list_id != intent.create_in
                                {
                                    entry.pending_delete = Some(old);
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                graph_error.get_or_insert(e);
                                continue;
                            }
                        }
                    }
                    let mut any = false;
                    if let Some(item) = entry.item.clone() {
                        ops.push(Op {
                            key: k.clone(),
                            kind: OpKind::Delete {
                                item,
                                old_of_move: false,
                            },
                        });
                        any = true;
                    }
                    if let Some(item) = entry.pending_delete.clone() {
                        ops.push(Op {
                            key: k.clone(),
                            kind: OpKind::Delete {
                                item,
                                old_of_move: true,
                            },
                        });
                        any = true;
                    }
                    entry.lsn = entry.lsn.max(p.lsn);
                    if !any {
                        ledger_changes.push((k.clone(), None));
                        done.push(k.clone());
                    }
                    entries.insert(k, entry);
                }
                Desired::Upsert(row) => {
                    let ti = p.table;
                    let list_name = self.tables[ti].router.route(&table, row).to_string();
                    let Some(list_id) = self.targets.list_id(&list_name).map(str::to_owned) else {
                        return Err(ProcessError::Config(format!(
                            "list {list_name:?} was not provisioned"
                        )));
                    };
                    let projection = match self.project(ti, row, &entry).await {
                        Ok(pr) => pr,
                        Err(ProjectError::Unmappable(u)) => {
                            let mut d = self.dead_letter(
                                &table,
                                &p.sync_key,
                                u.kind,
                                u.to_string(),
                                &p.last,
                            );
                            d.list = Some(list_name);
                            dead.push(d);
                            done.push(k);
                            continue;
                        }
                        Err(ProjectError::Defer(why)) => {
                            let pm = self.pending.get_mut(&k).expect("pending");
                            pm.deferrals += 1;
                            if pm.deferrals > MAX_LOOKUP_DEFERRALS {
                                let mut d = self.dead_letter(
                                    &table,
                                    &p.sync_key,
                                    "lookup_missing",
                                    why,
                                    &p.last,
                                );
                                d.list = Some(list_name);
                                dead.push(d);
                                done.push(k);
                            }
                            continue;
                        }
                        Err(ProjectError::Graph(e)) => {
                            graph_error.get_or_insert(e);
                            continue;
                        }
                    };
                    let hash = hash_projection(&projection);
                    let create_fields = || {
                        let mut f: Map<String, Json> = projection
                            .iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        f.insert(SYNC_KEY_FIELD.into(), Json::String(p.sync_key.clone()));
                        f
                    };
                    // An open intent for another list (the route changed since a create whose
                    // outcome was never recorded): that create may have landed. Find it, so it is
                    // moved from / deleted like any other item of the row, never left behind.
                    if let Some(intent) = entry.intent.clone().filter(|i| i.create_in != list_id) {
                        match self.find_by_sync_key(&intent.create_in, &p.sync_key).await {
                            Ok(Some(id)) => {
                                let landed = ItemRef {
                                    list_id: intent.create_in.clone(),
                                    item_id: id,
                                };
                                if let Some(old) = entry.item.replace(landed)
                                    && old.list_id != intent.create_in
                                {
                                    entry.pending_delete = Some(old);
                                }
                                entry.hash = None;
                                entry.projection.clear();
                            }
                            Ok(None) => {}
                            Err(e) => {
                                graph_error.get_or_insert(e);
                                continue;
                            }
                        }
                        entry.intent = None;
                    }
                    match entry.item.clone() {
                        Some(item) if item.list_id == list_id && entry.intent.is_none() => {
                            if let Some(old) = entry.pending_delete.clone() {
                                ops.push(Op {
                                    key: k.clone(),
                                    kind: OpKind::Delete {
                                        item: old,
                                        old_of_move: true,
                                    },
                                });
                            }
                            // Fields of an update whose outcome was never recorded (a crash
                            // between Graph's answer and the ledger) may hold either value in
                            // the item: they are always sent again.
                            let uncertain = !entry.in_flight.is_empty();
                            if !uncertain && entry.hash.as_deref() == Some(hash.as_str()) {
                                self.stats.skipped_ledger += 1;
                                self.skip_metric("unchanged");
                                if entry.pending_delete.is_none() {
                                    done.push(k.clone());
                                }
                            } else {
                                let mut fields = diff(&entry.projection, &projection);
                                for f in &entry.in_flight {
                                    if let Some(v) = projection.get(f) {
                                        fields.insert(f.clone(), v.clone());
                                    }
                                }
                                if fields.is_empty() {
                                    self.stats.skipped_ledger += 1;
                                    self.skip_metric("unchanged");
                                    if uncertain {
                                        entry.in_flight.clear();
                                        ledger_changes.push((k.clone(), Some(entry.clone())));
                                    }
                                    done.push(k.clone());
                                } else {
                                    // Recorded before the PATCH is sent (with the intents).
                                    entry.in_flight = fields.keys().cloned().collect();
                                    entry.hash = None;
                                    ledger_changes.push((k.clone(), Some(entry.clone())));
                                    ops.push(Op {
                                        key: k.clone(),
                                        kind: OpKind::Update {
                                            item,
                                            fields,
                                            projection,
                                            hash,
                                            if_match: if self.tables[ti].entry.pull.enabled {
                                                entry.etag.clone()
                                            } else {
                                                None
                                            },
                                        },
                                    });
                                }
                            }
                        }
                        other => {
                            // No item here yet (new row, move, or an open intent): create. A create
                            // that already happened is caught by the unique SyncKey and adopted.
                            let move_from = other.filter(|i| i.list_id != list_id);
                            entry.intent = Some(Intent {
                                create_in: list_id.clone(),
                            });
                            ledger_changes.push((k.clone(), Some(entry.clone())));
                            ops.push(Op {
                                key: k.clone(),
                                kind: OpKind::Create {
                                    list_id: list_id.clone(),
                                    fields: create_fields(),
                                    projection,
                                    hash,
                                    move_from,
                                },
                            });
                        }
                    }
                    entries.insert(k, entry);
                }
            }
        }

        // Intents (and trivial removals) are durable before any create is sent.
        self.ledger
            .commit(std::mem::take(&mut ledger_changes))
            .await?;
        self.failpoints.hit("push.after_intent");

        let mut round = 0;
        let mut transient: Option<String> = graph_error.map(|e| e.to_string());
        let mut unfinished: HashSet<Vec<u8>> = HashSet::new();
        while !ops.is_empty() && round < 3 {
            round += 1;
            let outcomes = self.execute(&ops).await;
            self.failpoints.hit("push.after_graph");
            let mut next: Vec<Op> = Vec::new();
            let mut touched: HashSet<Vec<u8>> = HashSet::new();
            for (op, outcome) in ops.into_iter().zip(outcomes) {
                let k = op.key.clone();
                touched.insert(k.clone());
                let Some(p) = self.pending.get(&k).cloned() else {
                    continue;
                };
                let table = self.tables[p.table].table.clone();
                let entry = entries.entry(k.clone()).or_default();
                let now = chrono::Utc::now().timestamp_millis();
                match (op.kind, outcome) {
                    (
                        OpKind::Create {
                            list_id,
                            projection,
                            hash,
                            move_from,
                            ..
                        },
                        Outcome::Ok { body },
                    ) => {
                        let id = body
                            .as_ref()
                            .and_then(|b| b["id"].as_str())
                            .unwrap_or_default()
                            .to_string();
                        let etag = body
                            .as_ref()
                            .and_then(|b| b["eTag"].as_str())
                            .map(str::to_owned);
                        self.write_metric("create", "ok");
                        self.stats.creates += 1;
                        set_written(
                            entry,
                            ItemRef {
                                list_id,
                                item_id: id,
                            },
                            projection,
                            hash,
                            etag,
                            p.lsn,
                            now,
                        );
                        entry.intent = None;
                        if let Some(old) = move_from {
                            self.stats.moves += 1;
                            metrics::counter!(m::PUSH_MOVES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone()).increment(1);
                            entry.pending_delete = Some(old.clone());
                            next.push(Op {
                                key: k.clone(),
                                kind: OpKind::Delete {
                                    item: old,
                                    old_of_move: true,
                                },
                            });
                        }
                    }
                    (
                        OpKind::Create {
                            list_id,
                            projection,
                            hash,
                            move_from,
                            fields,
                        },
                        Outcome::Duplicate,
                    ) => {
                        // An earlier attempt created it: adopt that item, then bring it up to date.
                        match self.find_by_sync_key(&list_id, &p.sync_key).await {
                            Ok(Some(id)) => {
                                self.stats.adopted += 1;
                                self.write_metric("create", "adopted");
                                let item = ItemRef {
                                    list_id: list_id.clone(),
                                    item_id: id,
                                };
                                entry.item = Some(item.clone());
                                entry.intent = None;
                                entry.hash = None;
                                // Its content is unknown: the next diff must send every field.
                                entry.projection.clear();
                                if let Some(old) = move_from.filter(|o| o.list_id != list_id) {
                                    entry.pending_delete = Some(old.clone());
                                    next.push(Op {
                                        key: k.clone(),
                                        kind: OpKind::Delete {
                                            item: old,
                                            old_of_move: true,
                                        },
                                    });
                                }
                                let mut f = fields;
                                f.remove(SYNC_KEY_FIELD);
                                for (fk, fv) in &projection {
                                    f.insert(fk.clone(), fv.clone());
                                }
                                next.push(Op {
                                    key: k.clone(),
                                    kind: OpKind::Update {
                                        item,
                                        fields: f,
                                        projection,
                                        hash,
                                        if_match: None,
                                    },
                                });
                            }
                            Ok(None) => {
                                transient.get_or_insert(format!("{table} {}: create reported a duplicate SyncKey but no item has it", p.sync_key));
                                unfinished.insert(k.clone());
                            }
                            Err(e) => {
                                transient.get_or_insert(e.to_string());
                                unfinished.insert(k.clone());
                            }
                        }
                    }
                    (
                        OpKind::Update {
                            item,
                            projection,
                            hash,
                            ..
                        },
                        Outcome::Ok { body },
                    ) => {
                        self.write_metric("update", "ok");
                        self.stats.updates += 1;
                        let etag = body
                            .as_ref()
                            .and_then(|b| b["@odata.etag"].as_str())
                            .map(str::to_owned);
                        let mut merged = entry.projection.clone();
                        merged.extend(projection);
                        let _ = hash;
                        let h = hash_projection(&merged);
                        set_written(entry, item, merged, h, etag, p.lsn, now);
                    }
                    (
                        OpKind::Update {
                            item,
                            projection,
                            hash,
                            ..
                        },
                        Outcome::NotFound,
                    ) => {
                        // Deleted in the list behind our back while the row lives: create it again.
                        self.write_metric("update", "not_found");
                        entry.item = None;
                        entry.intent = Some(Intent {
                            create_in: item.list_id.clone(),
                        });
                        let mut fields: Map<String, Json> = projection
                            .iter()
                            .filter(|(_, v)| !v.is_null())
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        fields.insert(SYNC_KEY_FIELD.into(), Json::String(p.sync_key.clone()));
                        self.ledger
                            .commit(vec![(k.clone(), Some(entry.clone()))])
                            .await?;
                        next.push(Op {
                            key: k.clone(),
                            kind: OpKind::Create {
                                list_id: item.list_id,
                                fields,
                                projection,
                                hash,
                                move_from: None,
                            },
                        });
                    }
                    (
                        OpKind::Delete { item, old_of_move },
                        Outcome::Ok { .. } | Outcome::NotFound,
                    ) => {
                        self.write_metric("delete", "ok");
                        if old_of_move {
                            if entry.pending_delete.as_ref() == Some(&item) {
                                entry.pending_delete = None;
                            }
                        } else {
                            self.stats.deletes += 1;
                            if entry.item.as_ref() == Some(&item) {
                                entry.item = None;
                                entry.hash = None;
                                entry.projection.clear();
                                entry.etag = None;
                            }
                        }
                        entry.lsn = entry.lsn.max(p.lsn);
                    }
                    (OpKind::Update { item, .. }, Outcome::Stale) => {
                        // A person changed the item since our last write: fetch it and let the
                        // next flush decide the conflict by policy; the push stays pending.
                        self.write_metric("update", "stale");
                        let fetched = self
                            .client
                            .get_item(&self.targets.site_id, &item.list_id, &item.item_id)
                            .await;
                        match fetched {
                            Ok(found) => {
                                let modified = found.as_ref().and_then(|i| {
                                    i.fields
                                        .get("Modified")
                                        .and_then(Json::as_str)
                                        .and_then(|t| {
                                            chrono::DateTime::parse_from_rfc3339(t)
                                                .ok()
                                                .map(|t| t.timestamp_millis())
                                        })
                                });
                                let key = format!("{}/{}", item.list_id, item.item_id);
                                let offset = self.pulls.get(&key).map_or(i64::MAX, |p| p.offset);
                                self.pulls.insert(
                                    key,
                                    crate::pull::processor::PendingPull {
                                        table: p.table,
                                        list_id: item.list_id.clone(),
                                        item_id: item.item_id.clone(),
                                        etag: found.as_ref().and_then(|i| i.e_tag.clone()),
                                        fields: found.map(|i| i.fields),
                                        last_modified_ms: modified,
                                        offset,
                                        topic: self.pull_topic.clone().unwrap_or_default(),
                                        deferred_since: None,
                                    },
                                );
                                transient.get_or_insert(format!(
                                    "{table} {}: item changed in the list since our last write",
                                    p.sync_key
                                ));
                            }
                            Err(e) => {
                                transient.get_or_insert(e.to_string());
                            }
                        }
                        unfinished.insert(k.clone());
                    }
                    (
                        kind,
                        Outcome::Rejected {
                            message,
                            request_id,
                            client_request_id,
                        },
                    ) => {
                        let what = match &kind {
                            OpKind::Create { .. } => "create",
                            OpKind::Update { .. } => "update",
                            OpKind::Delete { .. } => "delete",
                        };
                        self.write_metric(what, "rejected");
                        if let OpKind::Create { .. } = kind {
                            entry.intent = None;
                        }
                        let mut d = self.dead_letter(
                            &table,
                            &p.sync_key,
                            "graph_rejected",
                            format!("{what} rejected: {message}"),
                            &p.last,
                        );
                        d.request_id = request_id;
                        d.client_request_id = Some(client_request_id);
                        dead.push(d);
                    }
                    (kind, Outcome::Transient(msg)) => {
                        let what = match &kind {
                            OpKind::Create { .. } => "create",
                            OpKind::Update { .. } => "update",
                            OpKind::Delete { .. } => "delete",
                        };
                        self.write_metric(what, "transient");
                        transient.get_or_insert(msg);
                        // Stays pending; the intent (for creates) makes the retry safe.
                        unfinished.insert(k.clone());
                    }
                    (kind, other) => {
                        transient
                            .get_or_insert(format!("unexpected outcome {other:?} for {kind:?}"));
                        unfinished.insert(k.clone());
                    }
                }
            }
            // Each step is recorded before the next one (move: create recorded, then delete).
            let step: Vec<(Vec<u8>, Option<Entry>)> = touched
                .iter()
                .filter(|k| !unfinished.contains(*k))
                .filter_map(|k| {
                    entries
                        .get(k)
                        .map(|e| (k.clone(), Some(e.clone()).filter(|e| !e.is_empty())))
                })
                .collect();
            self.append_dead(std::mem::take(&mut dead)).await?;
            self.ledger.commit(step).await?;
            ops = next;
        }

        // Rows whose every step is recorded leave the pending set.
        for (k, e) in &entries {
            let finished =
                !unfinished.contains(k) && e.intent.is_none() && e.pending_delete.is_none();
            let dead_or_done = done.contains(k);
            if finished || dead_or_done {
                self.pending.remove(k);
            }
        }
        for k in &done {
            self.pending.remove(k);
        }
        self.append_dead(dead).await?;
        // Entries without an item but with pending work stay; the retry replans them.
        match transient {
            None => Ok(()),
            Some(message) => Err(ProcessError::Graph(GraphError::Transient {
                status: None,
                message,
                request_id: None,
            })),
        }
    }

    pub(crate) fn write_metric(&self, kind: &'static str, outcome: &'static str) {
        metrics::counter!(m::PUSH_WRITES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "kind" => kind, "outcome" => outcome)
            .increment(1);
    }

    /// Maps a row to its projection (Graph field → JSON), resolving persons and lookups.
    pub(crate) async fn project(
        &mut self,
        ti: usize,
        row: &Row,
        entry: &Entry,
    ) -> Result<BTreeMap<String, Json>, ProjectError> {
        let mut out = BTreeMap::new();
        let fields = self.tables[ti].push_fields.clone();
        for f in &fields {
            let Some(cell) = row.get(&f.column) else {
                continue;
            };
            if matches!(cell, Cell::Unchanged) {
                for (k, v) in &entry.projection {
                    if k == &f.field
                        || k.starts_with(&format!("{}@", f.field))
                        || k == &format!("{}LookupId", f.field)
                    {
                        out.insert(k.clone(), v.clone());
                    }
                }
                continue;
            }
            let mut resolved = Resolved::default();
            if !matches!(cell, Cell::Null) {
                match f.field_type {
                    FieldType::Person => {
                        let email = cell.to_text().unwrap_or_default();
                        resolved.person = self.person(&email).await.map_err(ProjectError::Graph)?;
                    }
                    FieldType::Lookup => {
                        resolved.lookup_item = self.lookup_item(f, cell)?;
                        if resolved.lookup_item.is_none() {
                            return Err(ProjectError::Defer(format!(
                                "column {} → field {}: the referenced row {:?} has no item in list {:?}",
                                f.column,
                                f.field,
                                cell.to_text().unwrap_or_default(),
                                f.lookup_list.as_deref().unwrap_or("?")
                            )));
                        }
                    }
                    _ => {}
                }
            }
            for (k, v) in
                convert::to_fields(cell, f, &resolved).map_err(ProjectError::Unmappable)?
            {
                out.insert(k, v);
            }
        }
        Ok(out)
    }

    pub(crate) async fn person(&mut self, email: &str) -> Result<Option<u64>, GraphError> {
        let norm = email.trim().to_ascii_lowercase();
        if let Some(v) = self.people.get(&norm) {
            return Ok(*v);
        }
        let id = self
            .client
            .find_user_lookup_id(&self.targets.site_id, &norm)
            .await?;
        self.people.insert(norm, id);
        Ok(id)
    }

    pub(crate) fn lookup_item(
        &self,
        f: &FieldMapping,
        cell: &Cell,
    ) -> Result<Option<String>, ProjectError> {
        let list = f.lookup_list.as_deref().unwrap_or_default();
        let Some(list_id) = self.targets.list_id(list) else {
            return Ok(None);
        };
        let Some(target) = self
            .tables
            .iter()
            .find(|t| t.entry.lists().any(|l| l == list))
        else {
            return Ok(None);
        };
        let fk = cell.to_text().unwrap_or_default();
        let entry = self
            .ledger
            .get(&ledger::key(&target.table, &fk))
            .map_err(|e| ProjectError::Defer(e.to_string()))?;
        Ok(entry
            .and_then(|e| e.item)
            .filter(|i| i.list_id == list_id)
            .map(|i| i.item_id))
    }

    pub(crate) async fn find_by_sync_key(
        &self,
        list_id: &str,
        sync_key: &str,
    ) -> Result<Option<String>, GraphError> {
        let query = ItemQuery {
            filter: Some(format!(
                "fields/{SYNC_KEY_FIELD} eq '{}'",
                sync_key.replace('\'', "''")
            )),
            select: Some(vec![SYNC_KEY_FIELD.to_string()]),
            limit: 2,
            ..ItemQuery::default()
        };
        let items = self
            .client
            .list_items(&self.targets.site_id, list_id, &query)
            .await?;
        Ok(items.into_iter().next().map(|i| i.id))
    }

    /// Runs `ops` as `$batch`es (≤ 20 each, a few in flight); one outcome per op, in order.
    pub(crate) async fn execute(&self, ops: &[Op]) -> Vec<Outcome> {
        let site = self.targets.site_id.clone();
        let reqs: Vec<BatchRequest> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let id = (i % MAX_BATCH).to_string();
                match &op.kind {
                    OpKind::Create {
                        list_id, fields, ..
                    } => BatchRequest::create_item(id, &site, list_id, fields.clone()),
                    OpKind::Update {
                        item,
                        fields,
                        if_match,
                        ..
                    } => BatchRequest::update_fields(
                        id,
                        &site,
                        &item.list_id,
                        &item.item_id,
                        fields.clone(),
                        if_match.clone(),
                    ),
                    OpKind::Delete { item, .. } => {
                        BatchRequest::delete_item(id, &site, &item.list_id, &item.item_id, None)
                    }
                }
            })
            .collect();
        let chunks: Vec<(usize, Vec<BatchRequest>)> = reqs
            .chunks(MAX_BATCH)
            .enumerate()
            .map(|(i, c)| (i, c.to_vec()))
            .collect();
        let client = self.client.clone();
        let mut results: Vec<(usize, Vec<Outcome>)> = futures::stream::iter(chunks)
            .map(|(i, chunk)| {
                let client = client.clone();
                async move {
                    let outcomes = match client.execute_batch_with_retries(&chunk).await {
                        Ok(outs) => outs.into_iter().map(classify).collect(),
                        // The whole envelope failed: nothing is known about any request in it, so
                        // each stays pending (creates are safe to retry thanks to SyncKey).
                        Err(e) => chunk
                            .iter()
                            .map(|_| Outcome::Transient(e.to_string()))
                            .collect(),
                    };
                    (i, outcomes)
                }
            })
            .buffer_unordered(self.cfg.batch_concurrency.max(1))
            .collect()
            .await;
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().flat_map(|(_, o)| o).collect()
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

pub(crate) fn classify(o: crate::graph::BatchOutcome) -> Outcome {
    match o.result {
        Ok(()) => Outcome::Ok { body: o.body },
        Err(GraphError::NotFound { .. }) => Outcome::NotFound,
        Err(GraphError::PreconditionFailed { .. }) => Outcome::Stale,
        Err(e) if e.is_retryable() => Outcome::Transient(e.to_string()),
        Err(e) => {
            let text = e.to_string();
            if text.contains("duplicate values") && text.contains(SYNC_KEY_FIELD) {
                return Outcome::Duplicate;
            }
            Outcome::Rejected {
                message: text,
                request_id: o.lineage.request_id.clone(),
                client_request_id: o.lineage.client_request_id.clone(),
            }
        }
    }
}

pub(crate) fn set_written(
    entry: &mut Entry,
    item: ItemRef,
    projection: BTreeMap<String, Json>,
    hash: String,
    etag: Option<String>,
    lsn: u64,
    now_ms: i64,
) {
    entry.item = Some(item);
    entry.projection = projection;
    entry.hash = Some(hash);
    entry.in_flight.clear();
    entry.etag = etag;
    entry.lsn = entry.lsn.max(lsn);
    entry.provenance = Provenance::Push;
    entry.pushed_at_ms = Some(now_ms);
}

/// Hex SHA-256 (first 16 bytes) of the canonical JSON of a projection (keys sorted).
pub(crate) fn hash_projection(p: &BTreeMap<String, Json>) -> String {
    let bytes = serde_json::to_vec(p).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// The fields of `new` that differ from `old`, with their `@odata.type` annotations.
pub(crate) fn diff(
    old: &BTreeMap<String, Json>,
    new: &BTreeMap<String, Json>,
) -> Map<String, Json> {
    let mut out = Map::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.insert(k.clone(), v.clone());
            let ann = format!("{k}@odata.type");
            if let Some(a) = new.get(&ann) {
                out.insert(ann, a.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sync_keys_are_stable() {
        assert_eq!(sync_key(&[("id".into(), Cell::Int(42))]), "42");
        assert_eq!(
            sync_key(&[
                ("a".into(), Cell::Text("x".into())),
                ("b".into(), Cell::Int(1))
            ]),
            r#"["x","1"]"#
        );
    }

    #[test]
    fn diff_sends_changed_fields_with_annotations() {
        let old: BTreeMap<String, Json> = [
            ("A".to_string(), json!(1)),
            ("T".to_string(), json!(["a"])),
            ("T@odata.type".to_string(), json!("Collection(Edm.String)")),
        ]
        .into();
        let mut new = old.clone();
        new.insert("T".into(), json!(["a", "b"]));
        let d = diff(&old, &new);
        assert_eq!(d.len(), 2);
        assert_eq!(d["T@odata.type"], json!("Collection(Edm.String)"));
        assert!(diff(&old, &old).is_empty());
        assert_ne!(hash_projection(&old), hash_projection(&new));
    }
}
