//! The drift check and heal of one running pipeline ([`DriftHandle::check`],
//! [`DriftHandle::heal`]): the entry points the control plane and the scheduler call.
//!
//! # How a check reads both sides
//! 1. The ledger, from the processor (a command served between flushes, so it is consistent).
//! 2. Every synced table's SyncKeys (`SELECT key::text …`, on its own connection).
//! 3. Every target list's items, paged, `$select`ing only SyncKey and the mapped fields, through
//!    a client on the pipeline's tenant limiter (so resource units are priced and shared with the
//!    writers); after each list the check sleeps so that its average spend stays under
//!    `drift.budget_share` × `graph.ru_per_minute` (default [`DEFAULT_BUDGET_SHARE`]).
//! 4. After [`RECHECK_DELAY`] the ledger and the tables are read again and the differences
//!    classified again against the same items: only differences both passes saw are reported
//!    (a write in flight during the first pass is confirmed in the ledger by the second).
//!
//! # How a heal fixes them (always through the writer path)
//! - orphaned, duplicate and misrouted items are deleted with `If-Match` (the eTag the check
//!   read: an item changed since is left alone and counted as skipped);
//! - the ledger is repaired by the processor (single writer): an entry naming an item that does
//!   not exist is dropped;
//! - a divergent item's fields are healed in the direction each field's direction and conflict
//!   policy say ([`heal_side`]): a field healed from the row gets the item's actual value in the
//!   ledger entry (so the writer's diff sends exactly those fields, with If-Match); a field
//!   healed from the item is written to the row by the return path's applier (replication
//!   origin, so capture does not push it back) and recorded in the entry; a `manual` field is
//!   left alone (still reported, counted in `healed.manual`). One processor command per item;
//! - the tables concerned are re-read by a watermarked re-snapshot, whose `r` events the
//!   processor writes like any change: missing items are created (intent first), divergent
//!   fields rewritten, items of a dropped entry re-adopted by SyncKey.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::classify::{SeenItem, SeenList, SeenTable, Sides, classify, confirmed};
use super::commands::{DivergedFix, LedgerView, Repairs};
use super::report::{ClassCounts, Difference, DriftClass, DriftReport, HealSummary};
use super::stale::resnapshot;
use crate::capture::ResnapshotHandle;
use crate::config::{ConflictPolicy, Direction, FieldType, PipelineConfig, SYNC_KEY_FIELD};
use crate::control::ConflictRegistry;
use crate::control::meta::drift as meta_drift;
use crate::control::meta::{MetaDb, MetaError, RunCounts, RunKind, RunRecorder, RunStatus, now_ms};
use crate::control::notify::Notifier;
use crate::graph::{GraphClient, GraphError, GraphUsage, ItemQuery};
use crate::log::{AnyLog, EventLog};
use crate::process::ledger::Entry;
use crate::process::processor::Processor;
use crate::pull::resolve::field_keys;
use crate::pull::{ConflictHandle, ResolveError};

/// Share of the tenant's resource-unit budget a check may spend on average unless
/// `drift.budget_share` says otherwise (see [`crate::config::DEFAULT_BUDGET_SHARE`]).
pub use crate::config::DEFAULT_BUDGET_SHARE;
/// Items per page (`$top`): Graph's maximum for list items, the fewest pages per item.
pub const PAGE_SIZE: u32 = 5000;
/// Wait between the two passes: longer than the processor's flush window (a write read in flight
/// in the first pass is confirmed in the ledger by the second).
pub const RECHECK_DELAY: Duration = Duration::from_secs(2);

/// Why a check or heal failed.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(
        "a drift check or heal of this pipeline is already running (in this or another process)"
    )]
    Busy,
    #[error("Graph: {0}")]
    Graph(#[from] GraphError),
    #[error("source database: {0}")]
    Source(String),
    #[error("processor: {0}")]
    Processor(#[from] ResolveError),
    #[error("run history: {0}")]
    Meta(#[from] MetaError),
}

impl DriftError {
    pub fn is_retryable(&self) -> bool {
        match self {
            DriftError::Busy | DriftError::Source(_) | DriftError::Meta(_) => true,
            DriftError::Graph(e) => e.is_retryable(),
            DriftError::Processor(_) => true,
        }
    }
}

/// The name of a pipeline's drift lock (see [`crate::pg::lock_key`]).
pub fn drift_lock_name(pipeline: &str) -> String {
    format!("drift:{pipeline}")
}

/// What a check needs of the processor's start: the site, the target lists and the key columns.
#[derive(Debug, Clone, Default)]
pub struct ProcessorFacts {
    pub site_id: String,
    /// Display name → id of every target list.
    pub lists: BTreeMap<String, String>,
    /// Key columns per `schema.table` (the SyncKey's parts, in order).
    pub key_columns: HashMap<String, Vec<String>>,
}

impl<L: EventLog + 'static> Processor<L> {
    /// The [`ProcessorFacts`] of this processor.
    pub fn drift_facts(&self) -> ProcessorFacts {
        ProcessorFacts {
            site_id: self.targets.site_id.clone(),
            lists: self
                .targets
                .lists
                .iter()
                .map(|(name, l)| (name.clone(), l.id.clone()))
                .collect(),
            key_columns: self
                .tables
                .iter()
                .zip(&self.facts)
                .map(|(t, f)| (t.table.clone(), f.key_columns.clone()))
                .collect(),
        }
    }
}

/// Which way a divergent field is healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealSide {
    /// The item is rewritten from the row.
    FromRow,
    /// The row takes the item's value.
    FromItem,
    /// Left alone for an operator (reported).
    Manual,
}

/// How a divergent field is healed, by its `direction`, its conflict `policy` and whether its
/// entry `pulls`. An entry that does not pull keeps the row as the only truth. Otherwise `push_only` and `source_wins` fields take the row's value, `pull_only`
/// and `target_wins` fields the item's, `manual` ones are left alone. `last_writer_wins` takes
/// the item's: a reported divergence has no write of the row in flight (the re-check drops
/// those), so the item was written after the row's value was synced — it is the last writer.
pub fn heal_side(direction: Direction, policy: ConflictPolicy, pulls: bool) -> HealSide {
    if !pulls {
        return HealSide::FromRow;
    }
    match (direction, policy) {
        (Direction::PushOnly, _) | (Direction::Bidirectional, ConflictPolicy::SourceWins) => {
            HealSide::FromRow
        }
        (Direction::PullOnly, _)
        | (Direction::Bidirectional, ConflictPolicy::TargetWins | ConflictPolicy::LastWriterWins) => {
            HealSide::FromItem
        }
        (Direction::Bidirectional, ConflictPolicy::Manual) => HealSide::Manual,
    }
}

/// Everything a check needs of one running pipeline. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DriftHandle {
    pub pipeline: PipelineConfig,
    /// On the pipeline's tenant limiter, with its own usage (what the checks spent).
    pub client: GraphClient,
    pub usage: Arc<GraphUsage>,
    pub facts: ProcessorFacts,
    /// The processors' command handles (looked up per call: a paused and resumed pipeline has
    /// a new processor).
    pub processors: ConflictRegistry,
    pub snapshots: ResnapshotHandle,
    pub log: Arc<AnyLog>,
    pub runs_topic: String,
    pub share: f64,
    /// Where reports are kept: the meta-store, and the drift topic they go to first.
    store: Option<ReportStore>,
    /// The pipeline's notifier and `notify.drift_threshold` (see [`DriftHandle::with_notifier`]).
    notify: Option<(Notifier, u64)>,
    busy: Arc<tokio::sync::Mutex<()>>,
}

/// The meta-store a handle reads reports from and the topic it appends them to.
#[derive(Debug, Clone)]
struct ReportStore {
    db: Arc<MetaDb>,
    topic: String,
}

impl DriftHandle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: PipelineConfig,
        client: GraphClient,
        usage: Arc<GraphUsage>,
        facts: ProcessorFacts,
        processors: ConflictRegistry,
        snapshots: ResnapshotHandle,
        log: Arc<AnyLog>,
        runs_topic: String,
    ) -> Self {
        DriftHandle {
            share: pipeline.drift.budget_share,
            pipeline,
            client,
            usage,
            facts,
            processors,
            snapshots,
            log,
            runs_topic,
            store: None,
            notify: None,
            busy: Arc::default(),
        }
    }

    /// Keeps every report: appended to `topic` (the pipeline's drift topic), read back from `db`
    /// once projected (see [`crate::control::meta::drift`]).
    #[must_use]
    pub fn with_store(mut self, db: Arc<MetaDb>, topic: String) -> Self {
        self.store = Some(ReportStore { db, topic });
        self
    }

    fn processor(&self) -> Result<ConflictHandle, DriftError> {
        self.processors
            .get(self.name())
            .ok_or_else(|| DriftError::Processor(ResolveError::Stopped(self.name().to_string())))
    }

    pub fn name(&self) -> &str {
        &self.pipeline.name
    }

    /// Raises `drift:<pipeline>` on `notifier` when a check (or heal) finds more than
    /// `threshold` differences, and clears it when one finds no more than that.
    #[must_use]
    pub fn with_notifier(mut self, notifier: Notifier, threshold: u64) -> Self {
        self.notify = Some((notifier, threshold));
        self
    }

    fn notify(&self, report: &DriftReport) {
        let Some((notifier, threshold)) = &self.notify else {
            return;
        };
        let key = format!("drift:{}", self.name());
        let found = report.counts.total();
        if found > *threshold {
            let c = &report.counts;
            let summary = format!(
                "drift check found {found} differences (missing {}, orphaned {}, divergent {}, \
                 misrouted {}, duplicate {}, stale ledger {})",
                c.missing, c.orphaned, c.divergent, c.misrouted, c.duplicate, c.stale_ledger
            );
            let detail = format!(
                "above notify.drift_threshold ({threshold}); GET /pipelines/{}/drift/{} lists them",
                self.name(),
                report.run_id
            );
            notifier.raise(&key, &summary, &detail);
        } else {
            notifier.clear(&key);
        }
    }

    /// Report `run_id` (the latest when `None`) as projected into the meta-store, with
    /// differences `after..after + limit`; `None` when there is none (or no store).
    pub async fn report(
        &self,
        run_id: Option<uuid::Uuid>,
        after: i64,
        limit: i64,
    ) -> Result<Option<DriftReport>, MetaError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let run_id = match run_id {
            Some(id) => id,
            None => match meta_drift::latest(&store.db, self.name()).await? {
                Some(id) => id,
                None => return Ok(None),
            },
        };
        meta_drift::report_page(&store.db, self.name(), run_id, after, limit).await
    }

    /// The pipeline's drift lock on the source database (key `drift:<pipeline>`, held while
    /// the returned connection lives): with several processes of the pipeline (Kafka log) a
    /// check or heal in one makes the others answer [`DriftError::Busy`], as a second one in
    /// this process does. On the source database like the other one-owner locks
    /// (`crate::pull::owner`); a check reads that database anyway.
    async fn hold_across_processes(&self) -> Result<crate::pg::WatchedConn, DriftError> {
        let key = crate::pg::lock_key(&drift_lock_name(self.name()));
        crate::pg::try_advisory_lock(self.pipeline.source.url.expose(), key)
            .await
            .map_err(|e| DriftError::Source(format!("taking the drift lock: {e}")))?
            .ok_or(DriftError::Busy)
    }

    /// Checks the pipeline (one `drift_check` run) and keeps the report.
    pub async fn check(&self) -> Result<DriftReport, DriftError> {
        self.run(RunKind::DriftCheck).await
    }

    /// Checks, then fixes what the check found (one `drift_heal` run) and keeps the report.
    pub async fn heal(&self) -> Result<DriftReport, DriftError> {
        self.run(RunKind::DriftHeal).await
    }

    async fn run(&self, kind: RunKind) -> Result<DriftReport, DriftError> {
        let _guard = self.busy.try_lock().map_err(|_| DriftError::Busy)?;
        let _held = self.hold_across_processes().await?;
        let mut run =
            RunRecorder::start(self.log.clone(), self.runs_topic.clone(), self.name(), kind)
                .await?;
        let before = self.usage.counts();
        let result = self.check_and_heal(kind, run.run_id().to_string()).await;
        let used = self.usage.counts();
        let base = RunCounts {
            graph_requests: used.requests - before.requests,
            resource_units: used.resource_units - before.resource_units,
            throttled: used.throttled - before.throttled,
            ..RunCounts::default()
        };
        match result {
            Ok(mut report) => {
                report.graph_requests = base.graph_requests;
                report.resource_units = base.resource_units;
                let mut counts = RunCounts {
                    drift: report.counts,
                    ..base
                };
                if let Some(h) = &report.healed {
                    counts.deletes = h.deleted;
                }
                // The report is durable before the run says it succeeded.
                if let Err(e) = self.keep(&report).await {
                    run.finish(RunStatus::Failed, counts, Some(e.to_string()))
                        .await?;
                    return Err(e.into());
                }
                run.finish(RunStatus::Succeeded, counts, None).await?;
                self.notify(&report);
                info!(pipeline = %self.name(), kind = kind.as_str(), found = report.counts.total(),
                    ru = report.resource_units, "drift run finished");
                Ok(report)
            }
            Err(e) => {
                run.finish(RunStatus::Failed, base, Some(e.to_string()))
                    .await?;
                Err(e)
            }
        }
    }

    /// Appends `report` to the drift topic (when the handle keeps reports).
    async fn keep(&self, report: &DriftReport) -> Result<(), MetaError> {
        match &self.store {
            Some(s) => meta_drift::append_report(&*self.log, &s.topic, report).await,
            None => Ok(()),
        }
    }

    async fn check_and_heal(
        &self,
        kind: RunKind,
        run_id: String,
    ) -> Result<DriftReport, DriftError> {
        let started_ms = now_ms();
        let mut sides = Sides {
            ledger: self.ledger().await?,
            tables: self.tables().await?,
            lists: Vec::new(),
        };
        sides.lists = self.items().await?;
        let (first, _) = classify(&sides);
        let before = sides.ledger.clone();
        if !first.is_empty() {
            tokio::time::sleep(RECHECK_DELAY).await;
            sides.ledger = self.ledger().await?;
            sides.tables = self.tables().await?;
        }
        let (second, lists) = classify(&sides);
        let in_flight = first.len() as u64;
        let differences = confirmed((&first, &before), (second, &sides.ledger));
        let mut report = DriftReport {
            pipeline: self.name().to_string(),
            run_id,
            started_ms,
            finished_ms: 0,
            counts: ClassCounts::of(&differences),
            lists,
            in_flight: in_flight - differences.len() as u64,
            differences,
            graph_requests: 0,
            resource_units: 0,
            healed: None,
            next: None,
        };
        if kind == RunKind::DriftHeal {
            report.healed = Some(self.fix(&report.differences, &sides).await?);
        }
        report.finished_ms = now_ms();
        Ok(report)
    }

    async fn ledger(&self) -> Result<LedgerView, DriftError> {
        Ok(self.processor()?.drift_ledger().await?)
    }

    /// Every synced table's SyncKeys.
    async fn tables(&self) -> Result<Vec<SeenTable>, DriftError> {
        let err = |e: tokio_postgres::Error| DriftError::Source(e.to_string());
        let (client, conn) = crate::pg::connect_source(&self.pipeline.source)
            .await
            .map_err(|e| DriftError::Source(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let mut out = Vec::new();
        for e in &self.pipeline.sync {
            let table = e.table.to_string();
            let cols = self
                .facts
                .key_columns
                .get(&table)
                .cloned()
                .unwrap_or_default();
            let select = cols
                .iter()
                .map(|c| format!("{}::text", crate::capture::catalog::quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let from = crate::capture::catalog::from_clause(e);
            let rows = client
                .query(&format!("SELECT {select} FROM {from}"), &[])
                .await
                .map_err(err)?;
            let keys = rows
                .iter()
                .map(|r| {
                    let parts: Vec<Option<String>> = (0..cols.len()).map(|i| r.get(i)).collect();
                    sync_key_of(parts)
                })
                .collect();
            out.push(SeenTable {
                table,
                lists: e.lists().map(str::to_string).collect(),
                keys,
            });
        }
        drop(client);
        let _ = conn.await;
        Ok(out)
    }

    /// Every target list's items (SyncKey and mapped fields), paced to the budget share.
    async fn items(&self) -> Result<Vec<SeenList>, DriftError> {
        let rate = self.share * f64::from(self.pipeline.graph.ru_per_minute) / 60.0;
        let mut out = Vec::new();
        for (name, id) in &self.facts.lists {
            let started = Instant::now();
            let ru_before = self.usage.counts().resource_units;
            let query = ItemQuery {
                select: Some(self.select(name)),
                top: Some(PAGE_SIZE),
                limit: usize::MAX,
                ..ItemQuery::default()
            };
            let items = self
                .client
                .list_items(&self.facts.site_id, id, &query)
                .await?;
            let spent = self.usage.counts().resource_units - ru_before;
            // Stay under `share` of the budget on average: a list that cost `spent` RU may not
            // have taken less than `spent / rate` seconds.
            if rate > 0.0 {
                let floor = Duration::from_secs_f64(spent as f64 / rate);
                tokio::time::sleep(floor.saturating_sub(started.elapsed())).await;
            }
            out.push(SeenList {
                name: name.clone(),
                id: id.clone(),
                pulls: self
                    .pipeline
                    .sync
                    .iter()
                    .any(|e| e.pull.enabled && e.lists().any(|l| l == name)),
                items: items
                    .into_iter()
                    .map(|i| SeenItem {
                        id: i.id,
                        etag: i.e_tag,
                        fields: i.fields,
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// `$select` of a list: SyncKey and the mapped fields of every entry writing to it.
    fn select(&self, list: &str) -> Vec<String> {
        let mut out = BTreeSet::from([SYNC_KEY_FIELD.to_string()]);
        for e in self
            .pipeline
            .sync
            .iter()
            .filter(|e| e.lists().any(|l| l == list))
        {
            for f in &e.fields {
                out.insert(match f.field_type {
                    FieldType::Person | FieldType::Lookup => format!("{}LookupId", f.field),
                    _ => f.field.clone(),
                });
            }
        }
        out.into_iter().collect()
    }

    /// Fixes `diffs` (see the module docs) found against `sides`.
    async fn fix(&self, diffs: &[Difference], sides: &Sides) -> Result<HealSummary, DriftError> {
        let mut summary = HealSummary::default();
        let mut repairs: Repairs = Vec::new();
        let mut tables = BTreeSet::new();
        for d in diffs {
            let row = (d.table.clone(), d.key.clone());
            let entry = sides.ledger.get(&row);
            if matches!(
                d.class,
                DriftClass::Orphaned | DriftClass::Duplicate | DriftClass::Misrouted
            ) {
                self.delete(d, &mut summary).await?;
            }
            match d.class {
                DriftClass::Orphaned | DriftClass::Duplicate => continue,
                DriftClass::Divergent => {
                    let fix = entry.and_then(|e| self.diverged(e, d, sides, &mut summary));
                    let Some(fix) = fix else { continue };
                    // Only fields healed from the row need the re-read.
                    if !self.heal_diverged(fix, &mut summary).await? {
                        continue;
                    }
                }
                // The row's entry names no item that exists: dropped; the re-read creates the
                // row's item (or adopts the one with its SyncKey).
                DriftClass::Missing | DriftClass::StaleLedger | DriftClass::Misrouted => {
                    if entry.is_some_and(|e| !names_live_item(e, sides)) {
                        repairs.push((row.0, row.1, None));
                    }
                }
            }
            tables.insert(d.table.clone());
        }
        summary.ledger_repaired = repairs.len() as u64;
        if !repairs.is_empty() {
            self.processor()?.drift_repair(repairs).await?;
        }
        for t in &tables {
            resnapshot(&self.snapshots, t)
                .await
                .map_err(|e| DriftError::Source(format!("re-snapshot of {t}: {e}")))?;
        }
        summary.resnapshotted = tables.into_iter().collect();
        Ok(summary)
    }

    /// The heal of divergent item `d` (entry `e`), each field sent the way [`heal_side`] says;
    /// `None` when every field is `manual` (or the item is gone from what was read).
    fn diverged(
        &self,
        e: &Entry,
        d: &Difference,
        sides: &Sides,
        summary: &mut HealSummary,
    ) -> Option<DivergedFix> {
        let item = find_item(sides, &d.list, d.item_id.as_deref()?)?;
        let target = e.item.as_ref()?;
        let sync = self
            .pipeline
            .sync
            .iter()
            .find(|s| s.table.to_string() == d.table)?;
        let mut fix = DivergedFix {
            table: d.table.clone(),
            key: d.key.clone(),
            list_id: target.list_id.clone(),
            item_id: target.item_id.clone(),
            etag: d.etag.clone(),
            item: item.fields.clone(),
            push: Vec::new(),
            pull: Vec::new(),
        };
        let mut manual = false;
        for k in &d.fields {
            let Some(f) = sync.fields.iter().find(|f| field_keys(f).contains(k)) else {
                fix.push.push(k.clone());
                continue;
            };
            match heal_side(f.direction, f.conflict_policy(sync), sync.pull.enabled) {
                HealSide::FromRow => fix.push.push(k.clone()),
                HealSide::FromItem if !fix.pull.contains(&f.column) => {
                    fix.pull.push(f.column.clone());
                }
                HealSide::FromItem => {}
                HealSide::Manual => manual = true,
            }
        }
        summary.manual += u64::from(manual);
        (!fix.push.is_empty() || !fix.pull.is_empty()).then_some(fix)
    }

    /// Hands `fix` to the processor; whether the row must be re-read (fields healed from it). A
    /// fix the processor refuses for good (the row or the item changed since the check, a value
    /// the row cannot take) is skipped and counted, like a refused delete.
    async fn heal_diverged(
        &self,
        fix: DivergedFix,
        summary: &mut HealSummary,
    ) -> Result<bool, DriftError> {
        let (pushes, pulls) = (!fix.push.is_empty(), !fix.pull.is_empty());
        let key = fix.key.clone();
        match self.processor()?.drift_diverged(fix).await {
            Ok(true) => {
                summary.pulled += u64::from(pulls);
                Ok(pushes)
            }
            Ok(false) => {
                summary.skipped += 1;
                Ok(false)
            }
            Err(e) if !e.is_retryable() => {
                warn!(pipeline = %self.name(), key = %key, "drift heal: divergent item not healed: {e}");
                summary.skipped += 1;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, d: &Difference, summary: &mut HealSummary) -> Result<(), DriftError> {
        let (Some(id), Some(list)) = (d.item_id.as_deref(), self.facts.lists.get(&d.list)) else {
            return Ok(());
        };
        match self
            .client
            .delete_item(&self.facts.site_id, list, id, d.etag.as_deref())
            .await
        {
            Ok(_) => summary.deleted += 1,
            Err(GraphError::PreconditionFailed { .. }) => summary.skipped += 1,
            Err(e) if !e.is_retryable() => {
                warn!(pipeline = %self.name(), item = id, "drift heal: delete failed: {e}");
                summary.skipped += 1;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

fn find_item<'a>(sides: &'a Sides, list: &str, id: &str) -> Option<&'a SeenItem> {
    let mut items = sides
        .lists
        .iter()
        .filter(|l| l.name == list)
        .flat_map(|l| &l.items);
    items.find(|i| i.id == id)
}

/// Whether the entry's item exists (in the list it names).
fn names_live_item(e: &Entry, sides: &Sides) -> bool {
    e.item.as_ref().is_some_and(|r| {
        sides
            .lists
            .iter()
            .any(|l| l.id == r.list_id && l.items.iter().any(|i| i.id == r.item_id))
    })
}

/// The SyncKey of key column texts (as [`crate::process::sync_key`] builds it from cells).
fn sync_key_of(parts: Vec<Option<String>>) -> String {
    if let [one] = parts.as_slice() {
        return one.clone().unwrap_or_default();
    }
    serde_json::to_string(&parts).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_heals_the_way_its_direction_and_policy_say() {
        use ConflictPolicy::*;
        use Direction::*;
        use HealSide::*;
        let cases = [
            (PushOnly, TargetWins, FromRow),
            (PullOnly, SourceWins, FromItem),
            (Bidirectional, SourceWins, FromRow),
            (Bidirectional, TargetWins, FromItem),
            (Bidirectional, LastWriterWins, FromItem),
            (Bidirectional, ConflictPolicy::Manual, HealSide::Manual),
        ];
        for (d, p, want) in cases {
            assert_eq!(heal_side(d, p, true), want, "{d:?} {p:?}");
            // Without pull the row is the only truth.
            assert_eq!(heal_side(d, p, false), FromRow, "{d:?} {p:?} without pull");
        }
    }
}
