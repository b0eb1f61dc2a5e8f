//! Manual conflict resolution: an operator decides a conflict the `manual` policy parked
//! (`syncbridge conflicts resolve <pipeline.yaml> <id> --take source|target`).
//!
//! The running processor owns the ledger, so the decision is handed to its task over a bounded
//! channel ([`ConflictHandle`], reached through the control plane) and applied between flushes,
//! against the same ledger entry the push and return paths use:
//!
//! - The conflict is looked up in `<prefix>.<pipeline>.conflicts`; it must be parked, not yet
//!   resolved, and the newest parked conflict of its row (a later one *supersedes* it: the row
//!   conflicted again and that record has the current values).
//! - Both sides are read as they are now (the item by `GET`, the row from PostgreSQL). A
//!   conflicted field whose value is neither the recorded one nor already the decided one means
//!   that side changed since the operator looked: refused ([`ResolveError::Changed`]), nothing
//!   written; the change itself is decided as a new conflict when the processor sees it.
//! - Every mapped field is merged three ways against the ledger's last synced projection: a
//!   field only one side changed flows to the other side (the parked row held back those
//!   changes too); a field both sides changed takes the operator's side (or, for fields the
//!   record shows decided by a per-field policy, that policy's side).
//! - `source` values go to the item with `If-Match` on the eTag just read, so a person's edit in
//!   between meets 412 instead of being overwritten unseen ([`ResolveError::Changed`], the
//!   conflict stays open). `target` values go to the row through the applier's replication-origin
//!   session, so capture marks the change and it is not pushed back.
//! - The ledger then holds the merged projection, its hash and the item's eTag: neither side's
//!   echo causes a write. Last, a resolution record (same id, `decision: resolved_manually`,
//!   `take`, `resolved_by`, `at_ms`, the fields with the values they were decided on) is appended
//!   to the conflicts topic. The answer is sent when all of that is durable.
//!
//! A parked *delete* conflict (the item was deleted while the row had a pending change) resolves
//! with `target` by applying `pull.on_delete` to the row, and with `source` by re-emitting the
//! row (a no-op `UPDATE` outside the replication origin), so the push path creates a new item.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conflict::{ConflictRecord, DELETE_CONFLICT_FIELD, FieldConflict, main_value};
use super::values::{key_match, key_values, sql_params};
use super::{RowChange, RowChangeKind, quote_ident};
use crate::config::{Direction, FieldMapping, OnDelete, SYSTEM_FIELDS};
use crate::graph::GraphError;
use crate::log::{EventLog, LogConsumer, Record, TopicSpec};
use crate::process::ProcessError;
use crate::process::convert;
use crate::process::ledger::{self, Entry, Provenance};
use crate::process::processor::{Processor, hash_projection};
use crate::telemetry::metrics as m;

/// `decision` of a resolution record.
pub const RESOLVED_MANUALLY: &str = "resolved_manually";
/// `decision` of a conflict the `manual` policy parked.
pub const PARKED: &str = "parked";
/// Commands queued for the processor task (resolutions are rare; a full queue answers "busy").
const COMMAND_QUEUE: usize = 8;
/// How long the processor waits for one record of the conflicts topic while reading it.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side an operator takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Take {
    /// PostgreSQL's current values are written to the item.
    Source,
    /// The item's current values are written to the row.
    Target,
}

impl Take {
    pub fn as_str(self) -> &'static str {
        match self {
            Take::Source => "source",
            Take::Target => "target",
        }
    }
}

impl std::fmt::Display for Take {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Take {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "source" => Ok(Take::Source),
            "target" => Ok(Take::Target),
            other => Err(format!("take must be `source` or `target`, not {other:?}")),
        }
    }
}

/// One record of the conflicts topic: a conflict as the return path recorded it, or (with
/// `decision: resolved_manually`) the resolution of a parked one under the same id. A
/// resolution also reads as a plain [`ConflictRecord`] (older readers ignore the extra fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictEntry {
    #[serde(flatten)]
    pub record: ConflictRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take: Option<Take>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
}

/// Where a recorded conflict stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictState {
    /// Decided by its policy when it was recorded.
    Decided,
    /// Parked, waiting for an operator.
    Open,
    /// Parked, then resolved by an operator.
    Resolved,
    /// Parked, but the same row conflicted again since: the newer conflict is the one to resolve.
    Superseded,
}

/// How an operator resolved a parked conflict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    pub take: Take,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
    pub at_ms: i64,
    /// The conflicted fields with the values they were decided on.
    pub fields: Vec<FieldConflict>,
}

/// A recorded conflict with its current state (what `syncbridge conflicts list` shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictView {
    #[serde(flatten)]
    pub record: ConflictRecord,
    pub state: ConflictState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

/// Folds the records of the conflicts topic (in topic order) into one view per conflict.
pub fn conflict_views(entries: Vec<ConflictEntry>) -> Vec<ConflictView> {
    let mut views: Vec<ConflictView> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for e in entries {
        if e.record.decision == RESOLVED_MANUALLY {
            if let Some(&i) = by_id.get(&e.record.id) {
                views[i].state = ConflictState::Resolved;
                views[i].superseded_by = None;
                views[i].resolution = Some(Resolution {
                    take: e.take.unwrap_or(Take::Source),
                    resolved_by: e.resolved_by,
                    at_ms: e.record.at_ms,
                    fields: e.record.fields,
                });
            }
            continue;
        }
        // A replayed decision (same id) is recorded again after a crash: shown once.
        if by_id.contains_key(&e.record.id) {
            continue;
        }
        let parked = e.record.decision == PARKED;
        if parked {
            for v in views.iter_mut() {
                if v.state == ConflictState::Open
                    && v.record.table == e.record.table
                    && v.record.key == e.record.key
                {
                    v.state = ConflictState::Superseded;
                    v.superseded_by = Some(e.record.id.clone());
                }
            }
        }
        by_id.insert(e.record.id.clone(), views.len());
        views.push(ConflictView {
            record: e.record,
            state: if parked {
                ConflictState::Open
            } else {
                ConflictState::Decided
            },
            resolution: None,
            superseded_by: None,
        });
    }
    views
}

/// The parked, open conflict `id`, or why it cannot be resolved.
pub fn resolvable<'a>(
    views: &'a [ConflictView],
    id: &str,
) -> Result<&'a ConflictView, ResolveError> {
    let v = views
        .iter()
        .find(|v| v.record.id == id)
        .ok_or_else(|| ResolveError::Unknown { id: id.to_string() })?;
    match v.state {
        ConflictState::Open => Ok(v),
        ConflictState::Decided => Err(ResolveError::NotParked {
            id: id.to_string(),
            decision: v.record.decision.clone(),
        }),
        ConflictState::Resolved => {
            let r = v.resolution.as_ref();
            Err(ResolveError::AlreadyResolved {
                id: id.to_string(),
                take: r.map_or("?", |r| r.take.as_str()).to_string(),
                by: r
                    .and_then(|r| r.resolved_by.clone())
                    .unwrap_or_else(|| "an operator".into()),
                at: r.map_or_else(String::new, |r| format_ms(r.at_ms)),
            })
        }
        ConflictState::Superseded => Err(ResolveError::Superseded {
            id: id.to_string(),
            newer: v.superseded_by.clone().unwrap_or_default(),
        }),
    }
}

/// RFC 3339 (UTC, seconds) of epoch milliseconds.
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Why a resolution was refused or failed. Refusals (`Unknown` … `Gone`) wrote nothing; see
/// [`ResolveError::kind`] for the machine-readable name the control plane returns.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no conflict {id} is recorded for this pipeline (see `syncbridge conflicts list`)")]
    Unknown { id: String },
    #[error(
        "conflict {id} was decided by its policy ({decision}) when it was recorded; only parked \
         (`manual`) conflicts are resolved by hand"
    )]
    NotParked { id: String, decision: String },
    #[error("conflict {id} was already resolved (take {take}, by {by}, at {at})")]
    AlreadyResolved {
        id: String,
        take: String,
        by: String,
        at: String,
    },
    #[error(
        "conflict {id} is superseded: its row conflicted again since (conflict {newer}, with the \
         current values); resolve that one"
    )]
    Superseded { id: String, newer: String },
    #[error("conflict {id} cannot be resolved any more: {reason}")]
    Gone { id: String, reason: String },
    #[error(
        "conflict {id}: {what}; nothing was written and the conflict stays open (the change is \
         decided as a new conflict when the processor sees it: check `syncbridge conflicts list \
         --parked` again)"
    )]
    Changed { id: String, what: String },
    #[error("the processor is busy ({0}); try again in a moment")]
    Busy(String),
    #[error("conflict {id}: applying the decision failed: {message}")]
    Failed {
        id: String,
        message: String,
        retryable: bool,
    },
    #[error("the processor of pipeline {0} is not running")]
    Stopped(String),
}

impl ResolveError {
    /// Whether the same request may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            ResolveError::Busy(_) | ResolveError::Stopped(_) => true,
            ResolveError::Failed { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Machine-readable name (control-plane `kind`, metric outcome).
    pub fn kind(&self) -> &'static str {
        match self {
            ResolveError::Unknown { .. } => "unknown",
            ResolveError::NotParked { .. } => "not_parked",
            ResolveError::AlreadyResolved { .. } => "already_resolved",
            ResolveError::Superseded { .. } => "superseded",
            ResolveError::Gone { .. } => "gone",
            ResolveError::Changed { .. } => "changed",
            ResolveError::Busy(_) => "busy",
            ResolveError::Failed { .. } => "failed",
            ResolveError::Stopped(_) => "stopped",
        }
    }

    /// The control plane's status: 404 unknown id, 409 the id names no open parked conflict,
    /// 412 a side changed since it was recorded, 503 try again, 502 a write failed.
    pub fn http_status(&self) -> u16 {
        match self {
            ResolveError::Unknown { .. } => 404,
            ResolveError::NotParked { .. }
            | ResolveError::AlreadyResolved { .. }
            | ResolveError::Superseded { .. }
            | ResolveError::Gone { .. } => 409,
            ResolveError::Changed { .. } => 412,
            ResolveError::Busy(_) | ResolveError::Stopped(_) => 503,
            ResolveError::Failed { .. } => 502,
        }
    }
}

/// A request for the processor task.
#[derive(Debug)]
pub enum ConflictCommand {
    Resolve {
        id: String,
        take: Take,
        by: Option<String>,
        reply: oneshot::Sender<Result<ConflictView, ResolveError>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<ConflictView>, ResolveError>>,
    },
    /// Drift checks and heals ([`crate::process::drift`]): the ledger, or repairs to commit.
    Drift(crate::process::drift::DriftCommand),
}

/// The control plane's way into one pipeline's processor.
#[derive(Debug, Clone)]
pub struct ConflictHandle {
    pipeline: String,
    tx: mpsc::Sender<ConflictCommand>,
}

impl ConflictHandle {
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ResolveError>>) -> ConflictCommand,
    ) -> Result<T, ResolveError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ResolveError::Busy(format!("{COMMAND_QUEUE} conflict commands queued"))
            }
            mpsc::error::TrySendError::Closed(_) => ResolveError::Stopped(self.pipeline.clone()),
        })?;
        answer
            .await
            .map_err(|_| ResolveError::Stopped(self.pipeline.clone()))?
    }

    /// Applies an operator's decision; answers once it is applied and durable.
    pub async fn resolve(
        &self,
        id: &str,
        take: Take,
        by: Option<String>,
    ) -> Result<ConflictView, ResolveError> {
        let id = id.to_string();
        self.call(|reply| ConflictCommand::Resolve {
            id,
            take,
            by,
            reply,
        })
        .await
    }

    /// Every recorded conflict with its state, oldest first.
    pub async fn list(&self) -> Result<Vec<ConflictView>, ResolveError> {
        self.call(|reply| ConflictCommand::List { reply }).await
    }
}

/// Reads every record of a conflicts topic (from its start to its current end).
pub async fn read_conflicts<L: EventLog>(
    log: &L,
    topic: &str,
) -> Result<Vec<ConflictEntry>, crate::log::LogError> {
    log.ensure_topic(&TopicSpec::new(topic.to_string(), 1))
        .await?;
    let end = log.end_offsets(topic).await?.first().copied().unwrap_or(0);
    let mut out = Vec::new();
    if end == 0 {
        return Ok(out);
    }
    let stop = CancellationToken::new();
    // A group that never commits reads from the start every time.
    let group = format!("{topic}.reader.{}", uuid::Uuid::new_v4().simple());
    let mut c = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await?;
    let mut read = 0;
    while read < end {
        let Ok(r) = tokio::time::timeout(READ_TIMEOUT, c.recv()).await else {
            warn!(
                topic,
                read, end, "conflicts topic: no record for {READ_TIMEOUT:?}; listing what was read"
            );
            break;
        };
        let Some(r) = r? else { break };
        read = r.offset + 1;
        let Some(v) = r.record.value else { continue };
        match serde_json::from_slice::<ConflictEntry>(&v) {
            Ok(e) => out.push(e),
            Err(e) => warn!(
                offset = r.offset,
                "ignoring an unreadable conflict record: {e}"
            ),
        }
    }
    stop.cancel();
    Ok(out)
}

/// What resolving a field conflict writes, decided from both sides' current values.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Graph fields written to the item (with their `@odata.type` annotations).
    to_item: Map<String, Json>,
    /// Fields whose item value is written to the row (canonical item values).
    to_row: Vec<(FieldMapping, Vec<(String, Json)>)>,
    /// The ledger projection once both writes are done.
    projection: BTreeMap<String, Json>,
    /// The recorded conflicted fields with their current values and the side taken.
    decided: Vec<FieldConflict>,
}

/// The graph keys of a mapping in canonical form (`F`, `FLookupId`, `F@odata.type`).
pub(crate) fn field_keys(f: &FieldMapping) -> Vec<String> {
    convert::canonical_from_item(&Map::new(), f)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// Which sides a field flows to: `(pullable, pushable)` (read-only system fields never go to
/// the item).
fn sides(f: &FieldMapping) -> (bool, bool) {
    let pullable = f.direction != Direction::PushOnly;
    let pushable = f.direction != Direction::PullOnly && !SYSTEM_FIELDS.contains(&f.field.as_str());
    (pullable, pushable)
}

/// A field the conflict record lists: the side it is decided for (its policy's winner, or the
/// operator's `take` for a parked one), once both sides' values `now` (item, row) are checked
/// to be the recorded or the already decided one; with the field as the resolution records it.
fn decide_recorded(
    id: &str,
    f: &FieldMapping,
    c: &FieldConflict,
    take: Take,
    (now_item, now_row): (Json, Json),
) -> Result<(Take, FieldConflict), ResolveError> {
    let (pullable, pushable) = sides(f);
    let s = match c.winner.as_str() {
        "source" => Take::Source,
        "target" => Take::Target,
        _ => take,
    };
    let chosen = match s {
        Take::Source => &c.source,
        Take::Target => &c.target,
    };
    let changed = |what: String| ResolveError::Changed {
        id: id.to_string(),
        what,
    };
    if pullable && now_item != c.target && now_item != *chosen {
        return Err(changed(format!(
            "the item's {} changed since the conflict was recorded (it was {}, it is {now_item} now)",
            f.field, c.target
        )));
    }
    if pushable && now_row != c.source && now_row != *chosen {
        return Err(changed(format!(
            "the row's {} changed since the conflict was recorded (it was {}, it is {now_row} now)",
            f.column, c.source
        )));
    }
    let decided = FieldConflict {
        field: c.field.clone(),
        column: c.column.clone(),
        source: now_row,
        target: now_item,
        policy: c.policy,
        winner: s.as_str().to_string(),
    };
    Ok((s, decided))
}

/// Three-way merge of one conflicted row: `ledger` is the last synced projection, `item` the
/// item's fields now, `source` the row's projection now. Fails with [`ResolveError::Changed`]
/// when a conflicted field holds neither its recorded value nor the decided one on some side.
fn plan(
    fields: &[FieldMapping],
    record: &ConflictRecord,
    take: Take,
    ledger: &BTreeMap<String, Json>,
    item: &Map<String, Json>,
    source: &BTreeMap<String, Json>,
) -> Result<Plan, ResolveError> {
    let mut out = Plan {
        projection: ledger.clone(),
        ..Plan::default()
    };
    let get = |m: &BTreeMap<String, Json>, k: &str| m.get(k).cloned().unwrap_or(Json::Null);
    let mut system = Vec::new();
    for f in fields {
        let (pullable, pushable) = sides(f);
        let keys = field_keys(f);
        let item_canon = convert::canonical_from_item(item, f);
        let row_canon: Vec<(String, Json)> =
            keys.iter().map(|k| (k.clone(), get(source, k))).collect();
        let item_changed = pullable && item_canon.iter().any(|(k, v)| *v != get(ledger, k));
        let row_changed = pushable && row_canon.iter().any(|(k, v)| *v != get(ledger, k));
        let side = match record.fields.iter().find(|c| c.field == f.field) {
            Some(c) => {
                let now = (main_value(&item_canon), main_value(&row_canon));
                let (side, decided) = decide_recorded(&record.id, f, c, take, now)?;
                out.decided.push(decided);
                Some(side)
            }
            None => None,
        };
        let same = item_canon == row_canon;
        let winner = match (item_changed, row_changed) {
            (false, false) => continue,
            (true, false) => Take::Target,
            (false, true) => Take::Source,
            // Both sides changed (the conflict, or a field changed on both sides since it was
            // recorded, which the operator's side decides as well); equal values need no write.
            (true, true) if same => {
                out.projection.extend(item_canon);
                continue;
            }
            (true, true) => side.unwrap_or(take),
        };
        match winner {
            Take::Source => {
                for (k, v) in row_canon {
                    out.to_item.insert(k.clone(), v.clone());
                    out.projection.insert(k, v);
                }
            }
            Take::Target if SYSTEM_FIELDS.contains(&f.field.as_str()) => {
                system.push((f.clone(), item_canon));
            }
            Take::Target => {
                out.projection.extend(item_canon.clone());
                out.to_row.push((f.clone(), item_canon));
            }
        }
    }
    // Read-only system fields (`Modified`…) change with every edit: taken along with a real
    // change, never as one on their own (as the return path does).
    if !out.to_row.is_empty() {
        for (f, canon) in system {
            out.projection.extend(canon.clone());
            out.to_row.push((f, canon));
        }
    }
    Ok(out)
}

pub(crate) fn process_failure(id: &str, e: ProcessError) -> ResolveError {
    ResolveError::Failed {
        id: id.to_string(),
        retryable: e.is_retryable(),
        message: e.to_string(),
    }
}

fn gone(id: &str, reason: &str) -> ResolveError {
    ResolveError::Gone {
        id: id.to_string(),
        reason: reason.to_string(),
    }
}

/// A parked conflict found resolvable, with its row's ledger entry as it is now.
struct Parked {
    view: ConflictView,
    ti: usize,
    lkey: Vec<u8>,
    entry: Entry,
}

impl<L: EventLog + 'static> Processor<L> {
    /// A handle for the control plane; commands are served by [`Processor::run`].
    pub fn conflict_handle(&mut self) -> ConflictHandle {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        self.commands = Some(rx);
        ConflictHandle {
            pipeline: self.cfg.pipeline.name.clone(),
            tx,
        }
    }

    /// Serves one command. Pending work is flushed first, so the decision is taken against a
    /// ledger that reflects every change read so far. A non-retryable processor failure is
    /// answered and then returned (it stops the processor, as in a flush).
    pub(crate) async fn serve_command(&mut self, cmd: ConflictCommand) -> Result<(), ProcessError> {
        match cmd {
            ConflictCommand::Drift(cmd) => self.serve_drift(cmd).await,
            ConflictCommand::List { reply } => {
                let r = read_conflicts(self.log.as_ref(), &self.conflicts_topic)
                    .await
                    .map(conflict_views)
                    .map_err(|e| process_failure("-", e.into()));
                let _ = reply.send(r);
                Ok(())
            }
            ConflictCommand::Resolve {
                id,
                take,
                by,
                reply,
            } => {
                if reply.is_closed() {
                    return Ok(()); // the caller gave up before it was this request's turn
                }
                if !self.pending.is_empty() || !self.pulls.is_empty() {
                    match self.flush().await {
                        Ok(()) => {}
                        Err(e) if e.is_retryable() => {
                            self.resolution_metric(take, "busy");
                            let _ = reply.send(Err(ResolveError::Busy(format!(
                                "pending changes could not be written yet: {e}"
                            ))));
                            return Ok(());
                        }
                        Err(e) => {
                            let _ = reply.send(Err(process_failure(
                                &id,
                                ProcessError::Config(e.to_string()),
                            )));
                            return Err(e);
                        }
                    }
                }
                let result = self.resolve_conflict(&id, take, by).await;
                let outcome = match &result {
                    Ok(_) => "applied",
                    Err(e) => e.kind(),
                };
                self.resolution_metric(take, outcome);
                // A failed ledger or log write is reported here; the next flush meets it too
                // and stops the processor if it persists.
                if let Err(e) = &result {
                    warn!(pipeline = %self.cfg.pipeline.name, conflict = %id, "conflict not resolved: {e}");
                }
                let _ = reply.send(result);
                Ok(())
            }
        }
    }

    fn resolution_metric(&self, take: Take, outcome: &'static str) {
        metrics::counter!(m::PULL_CONFLICT_RESOLUTIONS_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "take" => take.as_str(), "outcome" => outcome)
            .increment(1);
    }

    /// Resolves the parked conflict `id` by taking `take` (see the module docs): find it, apply
    /// the decision to the row and the item, then record the resolution.
    async fn resolve_conflict(
        &mut self,
        id: &str,
        take: Take,
        by: Option<String>,
    ) -> Result<ConflictView, ResolveError> {
        let Parked {
            view,
            ti,
            lkey,
            entry,
        } = self.parked_conflict(id).await?;
        let record = &view.record;
        let decided = if record
            .fields
            .iter()
            .any(|f| f.field == DELETE_CONFLICT_FIELD)
        {
            self.resolve_delete(ti, record, take, &lkey, entry).await?
        } else {
            self.resolve_fields(ti, record, take, lkey, entry).await?
        };
        let at_ms = self
            .append_resolution(record, take, by.clone(), decided.clone())
            .await?;
        info!(pipeline = %self.cfg.pipeline.name, conflict = %id, table = %record.table,
            key = %record.key, %take, by = by.as_deref().unwrap_or(""), "conflict resolved by an operator");
        Ok(ConflictView {
            state: ConflictState::Resolved,
            resolution: Some(Resolution {
                take,
                resolved_by: by,
                at_ms,
                fields: decided,
            }),
            superseded_by: None,
            record: view.record,
        })
    }

    /// The conflict `id` if it is parked, open, of a synced table, and its row and item have no
    /// change still being processed; with the row's ledger entry.
    async fn parked_conflict(&mut self, id: &str) -> Result<Parked, ResolveError> {
        let fail = |e: ProcessError| process_failure(id, e);
        let views = read_conflicts(self.log.as_ref(), &self.conflicts_topic)
            .await
            .map_err(|e| fail(e.into()))?;
        let views = conflict_views(views);
        let view = resolvable(&views, id)?.clone();
        let record = &view.record;
        let Some(&ti) = self.by_table.get(&record.table) else {
            return Err(gone(id, "its table is no longer synced by this pipeline"));
        };
        let lkey = ledger::key(&record.table, &record.key);
        if self.pending.contains_key(&lkey)
            || self
                .pulls
                .contains_key(&format!("{}/{}", record.list_id, record.item_id))
        {
            return Err(ResolveError::Busy(
                "a newer change of this row or item is still being processed".into(),
            ));
        }
        let Some(entry) = self.ledger.get(&lkey).map_err(|e| fail(e.into()))? else {
            return Err(gone(id, "the row or its item was deleted since"));
        };
        Ok(Parked {
            view,
            ti,
            lkey,
            entry,
        })
    }

    /// A parked field conflict: both sides read as they are now, merged three ways ([`plan`]),
    /// `source` values written to the item, `target` values to the row, and the ledger given
    /// the merged projection. The decided fields come back for the resolution record.
    async fn resolve_fields(
        &mut self,
        ti: usize,
        record: &ConflictRecord,
        take: Take,
        lkey: Vec<u8>,
        mut entry: Entry,
    ) -> Result<Vec<FieldConflict>, ResolveError> {
        let id = record.id.as_str();
        let fail = |e: ProcessError| process_failure(id, e);
        if entry
            .item
            .as_ref()
            .is_none_or(|i| i.list_id != record.list_id || i.item_id != record.item_id)
        {
            return Err(gone(
                id,
                "the row's item was deleted or moved to another list since",
            ));
        }
        let item = self
            .client
            .get_item(&self.targets.site_id, &record.list_id, &record.item_id)
            .await
            .map_err(|e| fail(e.into()))?
            .ok_or_else(|| gone(id, "its item was deleted since"))?;
        let source = self
            .source_projection(ti, &record.key, &entry)
            .await
            .map_err(fail)?
            .ok_or_else(|| gone(id, "its row was deleted since (or cannot be read back)"))?;
        let fields: Vec<FieldMapping> = self.tables[ti].entry.fields.clone();
        let plan = plan(
            &fields,
            record,
            take,
            &entry.projection,
            &item.fields,
            &source,
        )?;
        entry.etag = item.e_tag.clone().or(entry.etag);
        let now = chrono::Utc::now().timestamp_millis();
        if !plan.to_item.is_empty() {
            let if_match = item.e_tag.as_deref();
            self.write_to_item(record, &lkey, &mut entry, &plan.to_item, if_match, now)
                .await?;
        }
        if !plan.to_row.is_empty() {
            self.write_to_row(ti, (id, &record.key), &mut entry, &plan.to_row, now)
                .await?;
        }
        entry.projection = plan.projection;
        entry.hash = Some(hash_projection(&entry.projection));
        entry.clear_in_flight();
        self.ledger
            .commit(vec![(lkey, Some(entry))])
            .await
            .map_err(|e| fail(e.into()))?;
        Ok(plan.decided)
    }

    /// The `source` side of a resolution: the row's values go to the item, with `If-Match` on
    /// the eTag just read, and are recorded before the row is written (the item's echo is then
    /// recognised even if the row write fails).
    async fn write_to_item(
        &mut self,
        record: &ConflictRecord,
        lkey: &[u8],
        entry: &mut Entry,
        to_item: &Map<String, Json>,
        if_match: Option<&str>,
        now: i64,
    ) -> Result<(), ResolveError> {
        let id = record.id.as_str();
        let written = self
            .client
            .update_item_fields(
                &self.targets.site_id,
                &record.list_id,
                &record.item_id,
                to_item,
                if_match,
            )
            .await;
        match written {
            Ok(u) => {
                entry.etag = u.e_tag.or(entry.etag.take());
                for (k, v) in to_item {
                    entry.projection.insert(k.clone(), v.clone());
                }
                entry.hash = Some(hash_projection(&entry.projection));
                entry.provenance = Provenance::Push;
                entry.pushed_at_ms = Some(now);
                self.ledger
                    .commit(vec![(lkey.to_vec(), Some(entry.clone()))])
                    .await
                    .map_err(|e| process_failure(id, e.into()))
            }
            Err(GraphError::PreconditionFailed { .. }) => Err(ResolveError::Changed {
                id: id.to_string(),
                what: "the item changed again while the decision was being written (HTTP 412)"
                    .into(),
            }),
            Err(e) => Err(process_failure(id, e.into())),
        }
    }

    /// The `target` side of a resolution (conflict `id` of row `key`; also a drift heal's pull):
    /// the item's values go to the row through the applier's replication-origin session (so
    /// capture does not push them back).
    pub(crate) async fn write_to_row(
        &mut self,
        ti: usize,
        (id, key): (&str, &str),
        entry: &mut Entry,
        to_row: &[(FieldMapping, Vec<(String, Json)>)],
        now: i64,
    ) -> Result<(), ResolveError> {
        let fail = |e: ProcessError| process_failure(id, e);
        let mut set = Vec::new();
        for (f, canon) in to_row {
            match self.pulled_text(f, canon).await.map_err(fail)? {
                Ok(text) => set.push((f.column.clone(), text)),
                Err(u) => {
                    return Err(ResolveError::Failed {
                        id: id.to_string(),
                        message: format!("the item's value cannot be written to the row: {u}"),
                        retryable: false,
                    });
                }
            }
        }
        let change = RowChange {
            table: self.table_name(ti),
            key: key_values(&self.facts[ti].key_columns, key),
            kind: RowChangeKind::Update { set },
        };
        match self.apply(change).await.map_err(fail)? {
            Ok(a) if a.rows == 0 => Err(gone(id, "its row was deleted since")),
            Ok(a) => {
                if let Some(lsn) = a.commit_lsn {
                    entry.lsn = entry.lsn.max(lsn);
                }
                entry.provenance = Provenance::Pull;
                entry.pulled_at_ms = Some(now);
                Ok(())
            }
            Err(e) => Err(ResolveError::Failed {
                id: id.to_string(),
                message: format!("PostgreSQL refused the item's values: {e}"),
                retryable: e.is_retryable(),
            }),
        }
    }

    /// Last: the record that closes the conflict (a crash before it leaves the conflict open,
    /// and resolving it again finds the decision applied and only records it). Returns its time.
    async fn append_resolution(
        &mut self,
        record: &ConflictRecord,
        take: Take,
        by: Option<String>,
        decided: Vec<FieldConflict>,
    ) -> Result<i64, ResolveError> {
        let at_ms = chrono::Utc::now().timestamp_millis();
        let resolution = ConflictEntry {
            record: ConflictRecord {
                decision: RESOLVED_MANUALLY.into(),
                fields: decided,
                at_ms,
                ..record.clone()
            },
            take: Some(take),
            resolved_by: by,
        };
        self.log
            .append(
                &self.conflicts_topic,
                vec![Record::new(
                    format!("{}\u{0}{}", record.table, record.key).into_bytes(),
                    serde_json::to_vec(&resolution).unwrap_or_default(),
                )],
            )
            .await
            .map_err(|e| process_failure(&record.id, e.into()))?;
        Ok(at_ms)
    }

    /// A parked delete conflict (the item was deleted while the row had a pending change; the
    /// ledger entry has no item since). `target`: `pull.on_delete` applies to the row.
    /// `source`: the row is re-emitted (a no-op `UPDATE` without our replication origin), so
    /// the push path creates a new item from it.
    async fn resolve_delete(
        &mut self,
        ti: usize,
        record: &ConflictRecord,
        take: Take,
        lkey: &[u8],
        entry: Entry,
    ) -> Result<Vec<FieldConflict>, ResolveError> {
        let id = record.id.as_str();
        if entry.item.is_some() {
            return Err(gone(
                id,
                "the row has an item again (it was re-created since)",
            ));
        }
        if self.facts[ti].key_columns.is_empty() {
            return Err(gone(id, "the table has no key columns any more"));
        }
        match take {
            Take::Target => self.delete_row(ti, record, lkey).await?,
            Take::Source => self.reemit_row(ti, record).await?,
        }
        Ok(record
            .fields
            .iter()
            .map(|f| FieldConflict {
                winner: take.as_str().into(),
                ..f.clone()
            })
            .collect())
    }

    /// `pull.on_delete` applied to the row of a delete conflict; a deleted row's ledger entry
    /// goes with it.
    async fn delete_row(
        &mut self,
        ti: usize,
        record: &ConflictRecord,
        lkey: &[u8],
    ) -> Result<(), ResolveError> {
        let id = record.id.as_str();
        let fail = |e: ProcessError| process_failure(id, e);
        let kind = match self.tables[ti].entry.pull.on_delete.clone() {
            OnDelete::Delete => RowChangeKind::Delete,
            OnDelete::Soft { column } => RowChangeKind::SoftDelete { column },
            OnDelete::Ignore => return Ok(()),
        };
        let change = RowChange {
            table: self.table_name(ti),
            key: key_values(&self.facts[ti].key_columns, &record.key),
            kind: kind.clone(),
        };
        if let Err(e) = self.apply(change).await.map_err(fail)? {
            return Err(ResolveError::Failed {
                id: id.to_string(),
                message: format!("PostgreSQL refused pull.on_delete: {e}"),
                retryable: e.is_retryable(),
            });
        }
        if kind == RowChangeKind::Delete {
            self.ledger
                .commit(vec![(lkey.to_vec(), None)])
                .await
                .map_err(|e| fail(e.into()))?;
        }
        Ok(())
    }

    /// Re-emits the row of a delete conflict: a no-op `UPDATE` on the catalog connection (not
    /// the applier's origin session), so capture sees an application change and it is pushed.
    async fn reemit_row(&mut self, ti: usize, record: &ConflictRecord) -> Result<(), ResolveError> {
        let id = record.id.as_str();
        let fail = |e: ProcessError| process_failure(id, e);
        let facts = self.facts[ti].clone();
        let q = quote_ident;
        let t = self.tables[ti].entry.table.clone();
        let first = q(&facts.key_columns[0]);
        let (conds, params) = key_match(&facts, &record.key);
        let sql = format!(
            "UPDATE {}.{} SET {first} = {first} WHERE {conds}",
            q(&t.schema),
            q(&t.name),
        );
        let client = self.catalog().await.map_err(fail)?;
        let n = client
            .execute(&sql, &sql_params(&params))
            .await
            .map_err(|e| fail(ProcessError::Catalog(format!("re-emitting the row: {e}"))))?;
        if n == 0 {
            return Err(gone(id, "its row was deleted since"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConflictPolicy, FieldType};
    use serde_json::json;

    fn mapping(column: &str, field: &str, t: FieldType, d: Direction) -> FieldMapping {
        FieldMapping {
            column: column.into(),
            field: field.into(),
            field_type: t,
            direction: d,
            choices: Vec::new(),
            lookup_list: None,
            conflict: None,
        }
    }

    fn record(id: &str, key: &str, decision: &str, fields: Vec<FieldConflict>) -> ConflictEntry {
        ConflictEntry {
            record: ConflictRecord {
                id: id.into(),
                pipeline: "p".into(),
                table: "public.t".into(),
                key: key.into(),
                list_id: "L".into(),
                item_id: "1".into(),
                fields,
                decision: decision.into(),
                source_commit_ts_ms: 0,
                target_modified_ms: None,
                at_ms: 1,
            },
            take: None,
            resolved_by: None,
        }
    }

    fn fc(field: &str, source: Json, target: Json, winner: &str) -> FieldConflict {
        FieldConflict {
            field: field.into(),
            column: field.to_lowercase(),
            source,
            target,
            policy: ConflictPolicy::Manual,
            winner: winner.into(),
        }
    }

    #[test]
    fn views_fold_resolutions_and_supersede_older_parked_conflicts() {
        let mut resolved = record("a", "1", RESOLVED_MANUALLY, vec![]);
        resolved.take = Some(Take::Target);
        resolved.resolved_by = Some("ops".into());
        let views = conflict_views(vec![
            record("a", "1", PARKED, vec![]),
            record("b", "2", PARKED, vec![]),
            record("c", "3", "resolved", vec![]),
            record("b", "2", PARKED, vec![]), // replayed after a crash
            resolved,
            record("d", "2", PARKED, vec![]),
        ]);
        let state = |id: &str| views.iter().find(|v| v.record.id == id).unwrap();
        assert_eq!(views.len(), 4);
        assert_eq!(state("a").state, ConflictState::Resolved);
        let r = state("a").resolution.as_ref().unwrap();
        assert_eq!(
            (r.take, r.resolved_by.as_deref()),
            (Take::Target, Some("ops"))
        );
        assert_eq!(state("b").state, ConflictState::Superseded);
        assert_eq!(state("b").superseded_by.as_deref(), Some("d"));
        assert_eq!(state("c").state, ConflictState::Decided);
        assert_eq!(state("d").state, ConflictState::Open);

        assert!(resolvable(&views, "d").is_ok());
        let kind = |id: &str| resolvable(&views, id).unwrap_err().kind();
        assert_eq!(kind("a"), "already_resolved");
        assert_eq!(kind("b"), "superseded");
        assert_eq!(kind("c"), "not_parked");
        assert_eq!(kind("zz"), "unknown");
    }

    #[test]
    fn a_resolution_record_reads_as_a_plain_conflict_record() {
        let mut e = record("a", "1", RESOLVED_MANUALLY, vec![]);
        e.take = Some(Take::Source);
        let bytes = serde_json::to_vec(&e).unwrap();
        let plain: ConflictRecord = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(plain, e.record);
        let back: ConflictEntry = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, e);
        // Records written before resolutions existed read with no take.
        let old: ConflictEntry =
            serde_json::from_slice(&serde_json::to_vec(&e.record).unwrap()).unwrap();
        assert_eq!(old.take, None);
    }

    fn setup() -> (Vec<FieldMapping>, BTreeMap<String, Json>) {
        let fields = vec![
            mapping("title", "Title", FieldType::Text, Direction::Bidirectional),
            mapping("qty", "Qty", FieldType::Number, Direction::Bidirectional),
            mapping(
                "status",
                "Status",
                FieldType::Text,
                Direction::Bidirectional,
            ),
            mapping("note", "Note", FieldType::Text, Direction::PushOnly),
            mapping("modified", "Modified", FieldType::Text, Direction::PullOnly),
        ];
        let ledger: BTreeMap<String, Json> = [
            ("Title", json!("t0")),
            ("Qty", json!(1.0)),
            ("Status", json!("open")),
            ("Note", json!("n0")),
            ("Modified", json!("m0")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        (fields, ledger)
    }

    #[test]
    fn plan_merges_three_ways_and_takes_the_chosen_side_for_the_conflict() {
        let (fields, ledger) = setup();
        let rec = record(
            "x",
            "1",
            PARKED,
            vec![fc("Qty", json!(11.0), json!(22.0), PARKED)],
        )
        .record;
        // Item: Qty (conflict), Status (only the list), Modified (system). Row: Qty (conflict),
        // Title and the push-only Note (only the database).
        let item: Map<String, Json> = serde_json::from_value(json!({
            "Title": "t0", "Qty": 22, "Status": "done", "Note": "ignored", "Modified": "m1"
        }))
        .unwrap();
        let mut source = ledger.clone();
        source.insert("Qty".into(), json!(11.0));
        source.insert("Title".into(), json!("t1"));
        source.insert("Note".into(), json!("n1"));
        source.remove("Modified");

        let p = plan(&fields, &rec, Take::Source, &ledger, &item, &source).unwrap();
        assert_eq!(
            p.to_item,
            serde_json::from_value::<Map<String, Json>>(
                json!({ "Title": "t1", "Qty": 11.0, "Note": "n1" })
            )
            .unwrap()
        );
        let to_row: Vec<&str> = p.to_row.iter().map(|(f, _)| f.field.as_str()).collect();
        assert_eq!(to_row, ["Status", "Modified"]);
        assert_eq!(p.projection["Qty"], json!(11.0));
        assert_eq!(p.projection["Status"], json!("done"));
        assert_eq!(p.projection["Title"], json!("t1"));
        assert_eq!(p.decided.len(), 1);
        assert_eq!(p.decided[0].winner, "source");
        assert_eq!(
            (&p.decided[0].source, &p.decided[0].target),
            (&json!(11.0), &json!(22.0))
        );

        let p = plan(&fields, &rec, Take::Target, &ledger, &item, &source).unwrap();
        assert!(p.to_item.get("Qty").is_none());
        assert_eq!(p.to_item.len(), 2, "Title and Note still go to the item");
        let to_row: Vec<&str> = p.to_row.iter().map(|(f, _)| f.field.as_str()).collect();
        assert_eq!(to_row, ["Qty", "Status", "Modified"]);
        assert_eq!(p.projection["Qty"], json!(22.0));
        assert_eq!(p.decided[0].winner, "target");
    }

    #[test]
    fn plan_refuses_a_side_that_changed_since_and_accepts_a_decision_already_applied() {
        let (fields, ledger) = setup();
        let rec = record(
            "x",
            "1",
            PARKED,
            vec![fc("Qty", json!(11.0), json!(22.0), PARKED)],
        )
        .record;
        let item = |q: f64| -> Map<String, Json> {
            serde_json::from_value(
                json!({ "Title": "t0", "Qty": q, "Status": "open", "Modified": "m0" }),
            )
            .unwrap()
        };
        let mut source = ledger.clone();
        source.insert("Qty".into(), json!(11.0));
        // A person edited Qty again after the conflict was recorded.
        let e = plan(&fields, &rec, Take::Source, &ledger, &item(23.0), &source).unwrap_err();
        assert_eq!(e.kind(), "changed", "{e}");
        // The database changed it again.
        let mut newer = source.clone();
        newer.insert("Qty".into(), json!(12.0));
        let e = plan(&fields, &rec, Take::Target, &ledger, &item(22.0), &newer).unwrap_err();
        assert_eq!(e.kind(), "changed", "{e}");
        // Already applied before a crash (the item holds the source value): nothing to write.
        let p = plan(&fields, &rec, Take::Source, &ledger, &item(11.0), &source).unwrap();
        assert!(p.to_item.is_empty() && p.to_row.is_empty(), "{p:?}");
        assert_eq!(p.projection["Qty"], json!(11.0));
        // Only system fields changed: not written on their own.
        let mut i = item(22.0);
        i.insert("Modified".into(), json!("m9"));
        let p = plan(&fields, &rec, Take::Source, &ledger, &i, &source).unwrap();
        assert!(p.to_row.is_empty(), "{p:?}");
    }

    #[test]
    fn a_per_field_policy_in_a_parked_record_keeps_its_winner() {
        let (fields, ledger) = setup();
        let rec = record(
            "x",
            "1",
            PARKED,
            vec![
                fc("Qty", json!(11.0), json!(22.0), PARKED),
                fc("Title", json!("db"), json!("list"), "target"),
            ],
        )
        .record;
        let item: Map<String, Json> = serde_json::from_value(
            json!({ "Title": "list", "Qty": 22, "Status": "open", "Modified": "m0" }),
        )
        .unwrap();
        let mut source = ledger.clone();
        source.insert("Qty".into(), json!(11.0));
        source.insert("Title".into(), json!("db"));
        let p = plan(&fields, &rec, Take::Source, &ledger, &item, &source).unwrap();
        assert_eq!(p.to_item.get("Qty"), Some(&json!(11.0)));
        assert!(p.to_item.get("Title").is_none());
        assert!(p.to_row.iter().any(|(f, _)| f.field == "Title"));
    }

    #[test]
    fn takes_parse() {
        assert_eq!("source".parse::<Take>(), Ok(Take::Source));
        assert_eq!("target".parse::<Take>(), Ok(Take::Target));
        assert!("both".parse::<Take>().is_err());
    }
}
