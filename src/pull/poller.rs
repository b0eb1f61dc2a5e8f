//! The Graph delta poller of one SharePoint list: `items/delta` → `<prefix>.<pipeline>.list-changes`.
//!
//! Why a poller: Graph's list webhooks only say "something changed in this list" and still require
//! a delta call (graph-api.md §6.6), so the return path polls `items/delta?$expand=fields` every
//! [`PollerConfig::interval`]. An idle poll with a token costs 1 RU, charged to the tenant
//! limiter's reserved delta lane ([`crate::graph::Lane::Delta`]), so a write backlog cannot starve
//! the return path. A full enumeration (no token) costs 2 RU per page.
//!
//! # Records
//! Each item change becomes one record in the changes topic, key `<list_id>/<item_id>`, value a
//! JSON [`ListChange`] (`kind` `upsert` with the item's `fields`, or `deleted`). Items are the
//! **latest state** of the item, not each edit (§6.2); within one page the last occurrence of an
//! item wins. Full enumerations (the first run with [`StartMode::Full`], and every re-enumeration
//! after a `410 Gone` / `resyncRequired`, §6.4) are framed by control records, key `<list_id>`:
//! `resync_begin` and `resync_end` carrying one `resync_id`; every item in between has
//! `resync: true` and that `resync_id`, and `resync_end` has the number of items (`items`). A
//! consumer that sees `resync_end` knows every item it holds for the list that was not upserted
//! under that `resync_id` is gone (mark and sweep). A `resync_begin` whose `resync_end` never
//! comes is superseded by the next `resync_begin` of the same list.
//!
//! The changes topic is created with **one partition** ([`CHANGES_PARTITIONS`]): all of a
//! pipeline's list changes, markers included, are read in the order written, which the
//! mark-and-sweep above relies on. The return path is bounded by Graph's RU budget (thousands of
//! items per minute at most), far below what one partition carries.
//!
//! # Delivery contract
//! - **The cursor moves only after the changes are durable.** The position in the delta feed (a
//!   `nextLink` inside a round, the `deltaLink` at its end) is stored as a [`StoredCursor`] record
//!   (key = list id) in the compacted cursors topic, and only after [`EventLog::append`] of that
//!   page's changes returned `Ok`. A crash or a failed append at any point re-reads from the last
//!   stored link: changes are re-delivered, never lost. Duplicates are absorbed downstream (the
//!   ledger), as everywhere in SyncBridge.
//! - **Intermediate `nextLink`s are stored too**, so a crash in the middle of enumerating a large
//!   list resumes at the page it stopped at instead of starting over; the stored cursor also
//!   carries the resync in progress (id, reason, items so far), so the resumed enumeration still
//!   ends with the same `resync_end`.
//! - **Idle polls** (one page, no items) do not store their new deltaLink every time: only when
//!   the stored one is older than [`IDLE_CURSOR_REFRESH`] (so the stored token never ages towards
//!   expiry while the list is quiet). Re-reading from an older idle link yields nothing new.
//! - On start, the stored cursor is read back from the cursors topic ([`read_cursor`]: a
//!   throwaway consumer group that never commits reads the compacted topic to its end offset).
//!   Without one, [`StartMode`] decides: `Latest` (`token=latest`, only changes from now on) or
//!   `Full` (enumerate every item, framed as a resync with reason `initial`).
//! - **Operator resets** ([`run_resettable`], `POST /pipelines/{name}/cursors/reset` with a list):
//!   taken between two rounds, they start a full enumeration (reason `operator`) exactly as a
//!   refused token does, answering once its `resync_begin` and first cursor are durable.
//! - **Shutdown** is prompt: the token is watched while waiting for Graph, for the next poll and
//!   for a retry; an append and the cursor store after it are never interrupted (a shutdown that
//!   arrives then takes effect right after the store).
//!
//! # Errors and retries
//! 429/503 are handled inside [`GraphClient`] (tenant-wide pause for `Retry-After`, bounded
//! retries), as are short transient failures. What the client gives up on, and retryable log
//! errors, are retried here with exponential backoff and jitter ([`PollerConfig::retry_min`] ..
//! [`PollerConfig::retry_max`]), indefinitely: the poller is long-lived and the outage is visible in
//! `syncbridge_pull_delta_polls_total{outcome="error"}`. Non-retryable errors ([`PullError::is_retryable`]
//! false: auth, a deleted list, a malformed response, a log configuration problem) end [`run`] with
//! the error for the runtime to report. A `410` is not an error: it starts a re-enumeration (the
//! 410's `Location` is a fresh full-enumeration link; we use our own equivalent first URL).

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::graph::ops::items_path;
use crate::graph::{GraphClient, GraphError};
use crate::log::{
    CancellationToken, EventLog, LogConsumer, LogError, Record, TopicSpec, validate_topic_name,
};
use crate::telemetry::metrics as m;

/// Partitions of the changes topic (see the module docs: one total order per pipeline).
pub const CHANGES_PARTITIONS: i32 = 1;
/// Partitions of the compacted cursors topic (a handful of records, one per list).
pub const CURSORS_PARTITIONS: i32 = 1;
/// An idle poll stores its new deltaLink only when the stored one is older than this.
pub const IDLE_CURSOR_REFRESH: Duration = Duration::from_secs(60);
/// First retry delay after a failed poll.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay after repeated failures.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long [`read_cursor`] waits for the cursors topic's records up to its end offset.
pub const CURSOR_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Graph error codes that mean "start over with a full enumeration" (graph-api.md §6.4).
const RESYNC_CODES: &[&str] = &[
    "resyncRequired",
    "resyncChangesApplyDifferences",
    "resyncChangesUploadDifferences",
    "resyncApplyDifferences",
    "resyncUploadDifferences",
    "syncStateNotFound",
];

/// `<prefix>.<pipeline>.list-changes`
pub fn changes_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.list-changes")
}

/// `<prefix>.<pipeline>.cursors` (compacted)
pub fn cursors_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.cursors")
}

/// Where a list without a stored cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Only changes made from now on (`token=latest`).
    Latest,
    /// Every current item first (a full enumeration framed as a resync with reason `initial`).
    Full,
}

/// Settings of one list's poller.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Pipeline name (metrics label, consumer-group names).
    pub pipeline: String,
    /// Composite site id (`host,siteCollectionId,webId`).
    pub site_id: String,
    /// The list's id (GUID); records and the cursor are keyed by it.
    pub list_id: String,
    /// Display name, for logs only.
    pub list_name: String,
    /// Pause between the end of one round and the next poll.
    pub interval: Duration,
    /// `<prefix>.<pipeline>.list-changes` ([`changes_topic`]).
    pub changes_topic: String,
    /// `<prefix>.<pipeline>.cursors` ([`cursors_topic`]), compacted.
    pub cursors_topic: String,
    /// Used only when no cursor is stored for the list.
    pub start: StartMode,
    /// `$top` of the first request (carried by the links); `None` = the server's page size.
    pub page_size: Option<u32>,
    /// Backoff bounds for retryable failures.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl PollerConfig {
    /// A config with the standard topic names and default retry settings.
    pub fn new(
        prefix: &str,
        pipeline: &str,
        site_id: &str,
        list_id: &str,
        list_name: &str,
        interval: Duration,
        start: StartMode,
    ) -> PollerConfig {
        PollerConfig {
            pipeline: pipeline.to_string(),
            site_id: site_id.to_string(),
            list_id: list_id.to_string(),
            list_name: list_name.to_string(),
            interval,
            changes_topic: changes_topic(prefix, pipeline),
            cursors_topic: cursors_topic(prefix, pipeline),
            start,
            page_size: None,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
        }
    }

    /// First request of a full enumeration (no token: 2 RU per page).
    fn full_url(&self) -> String {
        let mut u = format!(
            "{}/delta?$expand=fields",
            items_path(&self.site_id, &self.list_id)
        );
        if let Some(t) = self.page_size {
            u.push_str(&format!("&$top={t}"));
        }
        u
    }

    /// `token=latest`: an empty page with a deltaLink for "from now on" (1 RU).
    fn latest_url(&self) -> String {
        format!("{}&token=latest", self.full_url())
    }
}

/// What a [`ListChange`] record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The item exists with these fields (created or changed; latest state).
    Upsert,
    /// The item was deleted.
    Deleted,
    /// A full enumeration starts (control record, no item).
    ResyncBegin,
    /// The full enumeration with this `resync_id` is complete (control record, no item).
    ResyncEnd,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Upsert => "upsert",
            ChangeKind::Deleted => "deleted",
            ChangeKind::ResyncBegin => "resync_begin",
            ChangeKind::ResyncEnd => "resync_end",
        }
    }
}

/// Why a full enumeration happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// First run with [`StartMode::Full`].
    Initial,
    /// Graph refused the token (`410 Gone` / `resyncRequired`).
    TokenExpired,
    /// An operator reset the list's delta link (`POST /pipelines/{name}/cursors/reset`).
    Operator,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Initial => "initial",
            ResyncReason::TokenExpired => "token_expired",
            ResyncReason::Operator => "operator",
        }
    }
}

/// The JSON value of a record in the changes topic. Item records have `item_id`; control records
/// (`resync_begin`/`resync_end`) do not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListChange {
    pub list_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    pub kind: ChangeKind,
    /// The item's `fields` (internal names) for upserts; absent for deletes and markers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `lastModifiedDateTime` as sent by Graph (ISO 8601, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// Part of a full enumeration (between `resync_begin` and `resync_end`).
    #[serde(default)]
    pub resync: bool,
    /// The enumeration this record belongs to (markers and resync items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_id: Option<String>,
    /// Markers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ResyncReason>,
    /// `resync_end` only: items upserted under this `resync_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u64>,
}

impl ListChange {
    /// The record key: `<list_id>/<item_id>` for items, `<list_id>` for markers.
    pub fn key(&self) -> String {
        match &self.item_id {
            Some(i) => format!("{}/{}", self.list_id, i),
            None => self.list_id.clone(),
        }
    }

    fn marker(list_id: &str, kind: ChangeKind, rs: &ResyncState) -> ListChange {
        ListChange {
            list_id: list_id.to_string(),
            item_id: None,
            kind,
            fields: None,
            etag: None,
            last_modified: None,
            resync: true,
            resync_id: Some(rs.id.clone()),
            reason: Some(rs.reason),
            items: (kind == ChangeKind::ResyncEnd).then_some(rs.items),
        }
    }

    fn to_record(&self) -> Record {
        // Serializing a struct of strings, maps and numbers cannot fail.
        let value = serde_json::to_vec(self).expect("ListChange serializes");
        Record::new(self.key(), value)
    }
}

/// Whether the stored link continues a round (`next`) or starts the next one (`delta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CursorPhase {
    Next,
    Delta,
}

/// A full enumeration in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncState {
    pub id: String,
    pub reason: ResyncReason,
    /// Items upserted so far.
    pub items: u64,
}

/// The value of a record in the cursors topic (key = list id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCursor {
    pub list_id: String,
    /// An opaque Graph link (absolute `nextLink`/`deltaLink`, or our own first URL of a resync).
    pub link: String,
    pub phase: CursorPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncState>,
    /// When it was stored (ms since the Unix epoch).
    pub stored_at_ms: i64,
}

/// A poller failure. See [`PullError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("graph delta request for list {list} failed: {source}")]
    Graph {
        list: String,
        #[source]
        source: GraphError,
    },
    #[error("event log failed ({what}): {source}")]
    Log {
        what: &'static str,
        #[source]
        source: LogError,
    },
    #[error("unexpected delta page for list {list}: {message}")]
    Decode { list: String, message: String },
    #[error("invalid poller config: {0}")]
    Config(String),
    /// The lock that makes one process poll the list ([`super::owner`]) could not be taken.
    #[error("cannot take the list's poller lock: {0}")]
    Lock(#[source] crate::pg::PgConnectError),
}

impl PullError {
    /// Worth retrying later: Graph throttling/unavailability/transient failures that outlasted
    /// the client's own retries, and transient log failures (timeouts, broker failover).
    pub fn is_retryable(&self) -> bool {
        match self {
            PullError::Graph { source, .. } => source.is_retryable(),
            PullError::Log { source, .. } => source.is_retryable(),
            PullError::Lock(source) => source.is_retryable(),
            PullError::Decode { .. } | PullError::Config(_) => false,
        }
    }
}

/// Whether a Graph error asks for a full re-enumeration (410 Gone or a resync error code).
pub fn is_resync_error(e: &GraphError) -> bool {
    match e {
        GraphError::Client4xx { status, code, .. } => {
            *status == 410 || RESYNC_CODES.iter().any(|c| c.eq_ignore_ascii_case(code))
        }
        _ => false,
    }
}

/// One delta page as sent by Graph.
#[derive(Debug, Deserialize)]
struct DeltaPage {
    #[serde(default)]
    value: Vec<Value>,
    #[serde(rename = "@odata.nextLink", default)]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink", default)]
    delta_link: Option<String>,
}

/// Turns one page's entries into changes: deleted facet (or `@removed`) → `deleted`, otherwise
/// `upsert` with `fields`; an item repeated on the page keeps only its last occurrence (§6.2),
/// at that occurrence's position.
pub fn page_changes(
    list_id: &str,
    entries: &[Value],
    resync: Option<&ResyncState>,
) -> Result<Vec<ListChange>, String> {
    let mut out: Vec<ListChange> = Vec::with_capacity(entries.len());
    for e in entries {
        let id = match e.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(format!("delta entry without an id: {}", short(e))),
        };
        let deleted = e.get("deleted").is_some_and(|d| !d.is_null())
            || e.get("@removed").is_some_and(|d| !d.is_null());
        let fields = e.get("fields").and_then(Value::as_object).cloned();
        let etag = e
            .get("eTag")
            .and_then(Value::as_str)
            .or_else(|| {
                fields
                    .as_ref()
                    .and_then(|f| f.get("@odata.etag"))
                    .and_then(Value::as_str)
            })
            .map(str::to_string);
        let change = ListChange {
            list_id: list_id.to_string(),
            item_id: Some(id),
            kind: if deleted {
                ChangeKind::Deleted
            } else {
                ChangeKind::Upsert
            },
            fields: if deleted { None } else { fields },
            etag,
            last_modified: e
                .get("lastModifiedDateTime")
                .and_then(Value::as_str)
                .map(str::to_string),
            resync: resync.is_some(),
            resync_id: resync.map(|r| r.id.clone()),
            reason: None,
            items: None,
        };
        out.retain(|c| c.item_id != change.item_id);
        out.push(change);
    }
    Ok(out)
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Reads the latest stored cursor of `list_id` from the compacted `cursors_topic` (which must
/// exist): a consumer of a throwaway group (never committed) reads up to the end offsets taken
/// before it started. `None` when the list has no cursor.
pub async fn read_cursor<L: EventLog>(
    log: &L,
    cursors_topic: &str,
    list_id: &str,
) -> Result<Option<StoredCursor>, PullError> {
    let lerr = |what| move |source| PullError::Log { what, source };
    let ends = log
        .end_offsets(cursors_topic)
        .await
        .map_err(lerr("reading the cursors topic's end offsets"))?;
    let mut remaining: Vec<(i32, i64)> = ends
        .iter()
        .enumerate()
        .filter(|(_, e)| **e > 0)
        .map(|(p, e)| (p as i32, *e))
        .collect();
    if remaining.is_empty() {
        return Ok(None);
    }
    let stop = CancellationToken::new();
    let group = format!("syncbridge-cursor-reader-{}", uuid::Uuid::new_v4());
    let mut consumer = log
        .consumer(&group, &[cursors_topic.to_string()], stop.clone())
        .await
        .map_err(lerr("opening a cursor reader"))?;
    let mut found: Option<StoredCursor> = None;
    let deadline = Instant::now() + CURSOR_READ_TIMEOUT;
    let result = loop {
        if remaining.is_empty() {
            break Ok(found);
        }
        let rec = match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Err(_) => {
                break Err(PullError::Log {
                    what: "reading the cursors topic",
                    source: LogError::Timeout(format!(
                        "cursors topic {cursors_topic} not read to its end within {CURSOR_READ_TIMEOUT:?}"
                    )),
                });
            }
            Ok(Err(e)) => break Err(lerr("reading the cursors topic")(e)),
            Ok(Ok(None)) => break Ok(found),
            Ok(Ok(Some(r))) => r,
        };
        if rec.record.key == list_id.as_bytes() {
            found = match &rec.record.value {
                None => None,
                Some(v) => match serde_json::from_slice::<StoredCursor>(v) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        // An unreadable cursor only costs a re-read; never fail the list over it.
                        tracing::warn!(list = list_id, error = %e, "ignoring an unreadable stored delta cursor");
                        None
                    }
                },
            };
        }
        remaining.retain(|(p, end)| !(*p == rec.partition && rec.offset + 1 >= *end));
    };
    stop.cancel();
    result
}

/// Where the next request goes.
#[derive(Debug, Clone, PartialEq)]
enum Position {
    /// No cursor, `StartMode::Latest`: ask for `token=latest`.
    Latest,
    /// Begin a full enumeration (its `resync_begin` is not written yet).
    StartResync(ResyncReason),
    /// Fetch `link` next; `resync` while a full enumeration is in progress.
    Link {
        link: String,
        phase: CursorPhase,
        resync: Option<ResyncState>,
    },
}

enum Round {
    /// The round reached a deltaLink; `items` item changes were appended.
    Done {
        items: u64,
    },
    Cancelled,
}

struct Poller<L> {
    cfg: PollerConfig,
    client: Arc<GraphClient>,
    log: Arc<L>,
    shutdown: CancellationToken,
    /// When the stored cursor was last written (for [`IDLE_CURSOR_REFRESH`]).
    last_store: Option<Instant>,
    /// Operator resets ([`run_resettable`]).
    resets: Option<tokio::sync::mpsc::Receiver<ResetRequest>>,
}

/// Runs the poller of one list until `shutdown` is cancelled (then `Ok`) or a non-retryable
/// error. Creates the changes and cursors topics when missing. See the module docs for the
/// delivery contract.
pub async fn run<L: EventLog>(
    config: PollerConfig,
    client: Arc<GraphClient>,
    log: Arc<L>,
    shutdown: CancellationToken,
) -> Result<(), PullError> {
    run_resettable(config, client, log, None, shutdown).await
}

/// An operator's request to drop the list's delta link and enumerate the list in full (a cursor
/// reset to none); answered with the new enumeration's `resync_id` once its `resync_begin` and
/// cursor are durable, or why not.
pub type ResetRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// [`run`], also serving `resets` between rounds: each starts a full enumeration (reason
/// `operator`) at once, as a refused token would.
pub async fn run_resettable<L: EventLog>(
    config: PollerConfig,
    client: Arc<GraphClient>,
    log: Arc<L>,
    resets: Option<tokio::sync::mpsc::Receiver<ResetRequest>>,
    shutdown: CancellationToken,
) -> Result<(), PullError> {
    run_lending(config, client, log, resets, shutdown).await.0
}

/// [`run_resettable`] that hands `resets` back when it returns, so a poller stopped and started
/// again (a list's ownership lost and taken again, see [`super::owner`]) keeps serving them.
pub async fn run_lending<L: EventLog>(
    config: PollerConfig,
    client: Arc<GraphClient>,
    log: Arc<L>,
    resets: Option<tokio::sync::mpsc::Receiver<ResetRequest>>,
    shutdown: CancellationToken,
) -> (
    Result<(), PullError>,
    Option<tokio::sync::mpsc::Receiver<ResetRequest>>,
) {
    if let Err(e) = validate(&config) {
        return (Err(e), resets);
    }
    let mut p = Poller {
        cfg: config,
        client,
        log,
        shutdown,
        last_store: None,
        resets,
    };
    let result = p.serve().await;
    (result, p.resets.take())
}

fn validate(c: &PollerConfig) -> Result<(), PullError> {
    for t in [&c.changes_topic, &c.cursors_topic] {
        validate_topic_name(t).map_err(|e| PullError::Config(e.to_string()))?;
    }
    if c.interval.is_zero() {
        return Err(PullError::Config("interval must be > 0".into()));
    }
    if c.list_id.is_empty() || c.site_id.is_empty() {
        return Err(PullError::Config("site_id and list_id are required".into()));
    }
    if c.retry_min.is_zero() || c.retry_max < c.retry_min {
        return Err(PullError::Config(
            "retry_min must be > 0 and ≤ retry_max".into(),
        ));
    }
    Ok(())
}

impl<L: EventLog> Poller<L> {
    /// The poll loop: see [`run`].
    async fn serve(&mut self) -> Result<(), PullError> {
        let Some(mut pos) = self.start_with_retry().await? else {
            return Ok(());
        };
        tracing::info!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, list_id = %self.cfg.list_id, "delta poller started");
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            match self.round(&mut pos).await {
                Ok(Round::Cancelled) => return Ok(()),
                Ok(Round::Done { items }) => {
                    backoff = self.backoff();
                    let outcome = if items > 0 { "changes" } else { "idle" };
                    metrics::counter!(m::PULL_DELTA_POLLS_TOTAL, "pipeline" => self.cfg.pipeline.clone(), "outcome" => outcome)
                        .increment(1);
                    if !self.sleep_or_reset(self.cfg.interval, &mut pos).await {
                        return Ok(());
                    }
                }
                Err(e) if e.is_retryable() => {
                    metrics::counter!(m::PULL_DELTA_POLLS_TOTAL, "pipeline" => self.cfg.pipeline.clone(), "outcome" => "error")
                        .increment(1);
                    let delay = backoff.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, error = %e,
                        delay_ms = delay.as_millis() as u64, "delta poll failed; retrying");
                    if !self.sleep(delay).await {
                        return Ok(());
                    }
                }
                Err(e) => {
                    metrics::counter!(m::PULL_DELTA_POLLS_TOTAL, "pipeline" => self.cfg.pipeline.clone(), "outcome" => "error")
                        .increment(1);
                    tracing::error!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, error = %e, "delta poller stopped");
                    return Err(e);
                }
            }
        }
    }

    fn backoff(&self) -> impl Iterator<Item = Duration> + use<L> {
        ExponentialBuilder::default()
            .with_min_delay(self.cfg.retry_min)
            .with_max_delay(self.cfg.retry_max)
            .without_max_times()
            .with_jitter()
            .build()
    }

    /// Sleeps `d`; false when shutdown came first.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Sleeps `d` between rounds; a reset arriving meanwhile starts a full enumeration and ends
    /// the sleep. False when shutdown came first.
    async fn sleep_or_reset(&mut self, d: Duration, pos: &mut Position) -> bool {
        let next_reset = async {
            match self.resets.as_mut() {
                Some(r) => r.recv().await,
                None => std::future::pending().await,
            }
        };
        let reset = tokio::select! {
            _ = tokio::time::sleep(d) => return true,
            _ = self.shutdown.cancelled() => return false,
            r = next_reset => r,
        };
        let Some(reply) = reset else {
            // Every handle is gone: no more resets.
            self.resets = None;
            return true;
        };
        tracing::info!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name,
            "delta link reset by the operator");
        let started = self.start_resync(ResyncReason::Operator, pos).await;
        let answer = match (&started, &*pos) {
            (
                Ok(()),
                Position::Link {
                    resync: Some(rs), ..
                },
            ) => Ok(rs.id.clone()),
            (Ok(()), _) => Err("the enumeration did not start".to_string()),
            (Err(e), _) => Err(e.to_string()),
        };
        let _ = reply.send(answer);
        true
    }

    /// Creates the topics and reads the stored cursor, retrying retryable errors; `None` on
    /// shutdown.
    async fn start_with_retry(&mut self) -> Result<Option<Position>, PullError> {
        let mut backoff = self.backoff();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(None);
            }
            match self.start().await {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.is_retryable() => {
                    let delay = backoff.next().unwrap_or(self.cfg.retry_max);
                    tracing::warn!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, error = %e, "delta poller start-up failed; retrying");
                    if !self.sleep(delay).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the topics and reads the stored cursor.
    async fn start(&mut self) -> Result<Position, PullError> {
        let lerr = |what| move |source| PullError::Log { what, source };
        self.log
            .ensure_topic(&TopicSpec::new(
                self.cfg.changes_topic.clone(),
                CHANGES_PARTITIONS,
            ))
            .await
            .map_err(lerr("creating the changes topic"))?;
        self.log
            .ensure_topic(&TopicSpec::compacted(
                self.cfg.cursors_topic.clone(),
                CURSORS_PARTITIONS,
            ))
            .await
            .map_err(lerr("creating the cursors topic"))?;
        let stored = read_cursor(&*self.log, &self.cfg.cursors_topic, &self.cfg.list_id).await?;
        Ok(match stored {
            Some(c) => {
                tracing::debug!(list = %self.cfg.list_name, phase = ?c.phase, "resuming from the stored delta cursor");
                Position::Link {
                    link: c.link,
                    phase: c.phase,
                    resync: c.resync,
                }
            }
            None => match self.cfg.start {
                StartMode::Latest => Position::Latest,
                StartMode::Full => Position::StartResync(ResyncReason::Initial),
            },
        })
    }

    async fn fetch(&self, url: &str) -> Option<Result<Value, GraphError>> {
        tokio::select! {
            r = self.client.delta_page(url) => Some(r),
            _ = self.shutdown.cancelled() => None,
        }
    }

    fn graph_err(&self, source: GraphError) -> PullError {
        PullError::Graph {
            list: self.cfg.list_name.clone(),
            source,
        }
    }

    fn decode_err(&self, message: impl Into<String>) -> PullError {
        PullError::Decode {
            list: self.cfg.list_name.clone(),
            message: message.into(),
        }
    }

    /// Appends records (durable on `Ok`).
    async fn append(&self, changes: &[ListChange]) -> Result<(), PullError> {
        if changes.is_empty() {
            return Ok(());
        }
        let records = changes.iter().map(ListChange::to_record).collect();
        self.log
            .append(&self.cfg.changes_topic, records)
            .await
            .map_err(|source| PullError::Log {
                what: "appending list changes",
                source,
            })?;
        Ok(())
    }

    /// Stores the cursor (durable on `Ok`).
    async fn store(
        &mut self,
        link: &str,
        phase: CursorPhase,
        resync: Option<&ResyncState>,
    ) -> Result<(), PullError> {
        let c = StoredCursor {
            list_id: self.cfg.list_id.clone(),
            link: link.to_string(),
            phase,
            resync: resync.cloned(),
            stored_at_ms: now_ms(),
        };
        let value = serde_json::to_vec(&c).expect("StoredCursor serializes");
        self.log
            .append(
                &self.cfg.cursors_topic,
                vec![Record::new(self.cfg.list_id.clone(), value)],
            )
            .await
            .map_err(|source| PullError::Log {
                what: "storing the delta cursor",
                source,
            })?;
        self.last_store = Some(Instant::now());
        Ok(())
    }

    /// Follows links from `pos` until a deltaLink. `pos` advances only after a page's changes
    /// and the cursor after them are durable, so a failed round is retried from the last
    /// position that was made durable in this process (or stored before it).
    async fn round(&mut self, pos: &mut Position) -> Result<Round, PullError> {
        let mut items = 0u64;
        let mut pages = 0u32;
        loop {
            let (link, phase, resync) = match pos.clone() {
                Position::Latest => return self.start_at_latest(pos).await,
                Position::StartResync(reason) => {
                    self.start_resync(reason, pos).await?;
                    continue;
                }
                Position::Link {
                    link,
                    phase,
                    resync,
                } => (link, phase, resync),
            };
            let Some(r) = self.fetch(&link).await else {
                return Ok(Round::Cancelled);
            };
            let value = match r {
                Ok(v) => v,
                Err(e) if is_resync_error(&e) => {
                    tracing::info!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, error = %e,
                        "delta token refused; re-enumerating the list");
                    *pos = Position::StartResync(ResyncReason::TokenExpired);
                    continue;
                }
                Err(e) => return Err(self.graph_err(e)),
            };
            pages += 1;
            let page = self.page(value)?;
            let changes = page_changes(&self.cfg.list_id, &page.value, resync.as_ref())
                .map_err(|m| self.decode_err(m))?;
            let n = changes.len() as u64;
            let mut resync = resync;
            if let Some(rs) = resync.as_mut() {
                rs.items += changes
                    .iter()
                    .filter(|c| c.kind == ChangeKind::Upsert)
                    .count() as u64;
            }
            items += n;
            match (page.next_link, page.delta_link) {
                (Some(next), _) => {
                    self.append(&changes).await?;
                    self.count(&changes);
                    self.store(&next, CursorPhase::Next, resync.as_ref())
                        .await?;
                    *pos = Position::Link {
                        link: next,
                        phase: CursorPhase::Next,
                        resync,
                    };
                }
                (None, Some(delta)) => {
                    // Only an idle single-page delta round may keep the stored cursor.
                    let single_delta_page = pages == 1 && phase == CursorPhase::Delta;
                    self.finish_round(pos, changes, delta, resync, single_delta_page)
                        .await?;
                    return Ok(Round::Done { items });
                }
                (None, None) => {
                    return Err(
                        self.decode_err("page has neither @odata.nextLink nor @odata.deltaLink")
                    );
                }
            }
        }
    }

    /// No cursor and `StartMode::Latest`: `token=latest` gives the deltaLink to start from,
    /// stored at once; no item change is read.
    async fn start_at_latest(&mut self, pos: &mut Position) -> Result<Round, PullError> {
        let url = self.cfg.latest_url();
        let Some(r) = self.fetch(&url).await else {
            return Ok(Round::Cancelled);
        };
        let page = self.page(r.map_err(|e| self.graph_err(e))?)?;
        let Some(dl) = page.delta_link else {
            return Err(self.decode_err("token=latest answered without a deltaLink"));
        };
        self.store(&dl, CursorPhase::Delta, None).await?;
        *pos = Position::Link {
            link: dl,
            phase: CursorPhase::Delta,
            resync: None,
        };
        Ok(Round::Done { items: 0 })
    }

    /// Begins a full enumeration: its `resync_begin` marker is appended and the cursor stored
    /// at the first page before any item of it is read.
    async fn start_resync(
        &mut self,
        reason: ResyncReason,
        pos: &mut Position,
    ) -> Result<(), PullError> {
        let rs = ResyncState {
            id: uuid::Uuid::new_v4().to_string(),
            reason,
            items: 0,
        };
        metrics::counter!(m::PULL_RESYNCS_TOTAL, "pipeline" => self.cfg.pipeline.clone(), "reason" => reason.as_str())
            .increment(1);
        tracing::info!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name, reason = reason.as_str(),
            resync_id = %rs.id, "full enumeration of the list starts");
        self.append(&[ListChange::marker(
            &self.cfg.list_id,
            ChangeKind::ResyncBegin,
            &rs,
        )])
        .await?;
        let link = self.cfg.full_url();
        self.store(&link, CursorPhase::Next, Some(&rs)).await?;
        *pos = Position::Link {
            link,
            phase: CursorPhase::Next,
            resync: Some(rs),
        };
        Ok(())
    }

    /// The last page of a round (it carries the deltaLink): its changes (with the
    /// `resync_end` marker of a full enumeration) are appended, then the deltaLink is stored.
    async fn finish_round(
        &mut self,
        pos: &mut Position,
        mut changes: Vec<ListChange>,
        delta: String,
        resync: Option<ResyncState>,
        single_delta_page: bool,
    ) -> Result<(), PullError> {
        if let Some(rs) = &resync {
            changes.push(ListChange::marker(
                &self.cfg.list_id,
                ChangeKind::ResyncEnd,
                rs,
            ));
        }
        self.append(&changes).await?;
        self.count(&changes);
        // An idle single-page round keeps the stored (older, equivalent) link unless it is
        // getting old; anything else is stored now.
        let idle = changes.is_empty()
            && single_delta_page
            && self
                .last_store
                .is_some_and(|t| t.elapsed() < IDLE_CURSOR_REFRESH);
        if !idle {
            self.store(&delta, CursorPhase::Delta, None).await?;
        }
        if let Some(rs) = &resync {
            tracing::info!(pipeline = %self.cfg.pipeline, list = %self.cfg.list_name,
                resync_id = %rs.id, items = rs.items, "full enumeration of the list complete");
        }
        *pos = Position::Link {
            link: delta,
            phase: CursorPhase::Delta,
            resync: None,
        };
        Ok(())
    }

    fn page(&self, v: Value) -> Result<DeltaPage, PullError> {
        serde_json::from_value(v).map_err(|e| self.decode_err(e.to_string()))
    }

    fn count(&self, changes: &[ListChange]) {
        for kind in [ChangeKind::Upsert, ChangeKind::Deleted] {
            let n = changes.iter().filter(|c| c.kind == kind).count() as u64;
            if n > 0 {
                metrics::counter!(m::PULL_ITEMS_RECEIVED_TOTAL, "pipeline" => self.cfg.pipeline.clone(), "kind" => kind.as_str())
                    .increment(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ErrorDetail;
    use serde_json::json;

    fn cfg() -> PollerConfig {
        PollerConfig::new(
            "syncbridge",
            "demo",
            "h,a,b",
            "L1",
            "Tasks",
            Duration::from_secs(2),
            StartMode::Latest,
        )
    }

    #[test]
    fn urls_and_topics() {
        let mut c = cfg();
        assert_eq!(c.changes_topic, "syncbridge.demo.list-changes");
        assert_eq!(c.cursors_topic, "syncbridge.demo.cursors");
        assert_eq!(
            c.full_url(),
            "/sites/h,a,b/lists/L1/items/delta?$expand=fields"
        );
        c.page_size = Some(50);
        assert_eq!(
            c.latest_url(),
            "/sites/h,a,b/lists/L1/items/delta?$expand=fields&$top=50&token=latest"
        );
        // Priced as the limiter expects: full enumeration 2 RU, token=latest 1 RU.
        use crate::graph::Cost;
        assert_eq!(Cost::of("GET", &c.full_url()), Cost::Multi);
        assert_eq!(Cost::of("GET", &c.latest_url()), Cost::Single);
        assert!(validate(&c).is_ok());
        c.interval = Duration::ZERO;
        assert!(validate(&c).is_err());
    }

    #[test]
    fn page_changes_maps_upserts_deletes_and_keeps_last_occurrence() {
        let entries = vec![
            json!({"id": "1", "eTag": "\"g1,1\"", "lastModifiedDateTime": "2025-01-01T00:00:00Z",
                   "fields": {"Title": "a", "@odata.etag": "\"g1,1\""}}),
            json!({"id": "2", "deleted": {"state": "deleted"}}),
            json!({"id": "1", "fields": {"Title": "b", "@odata.etag": "\"g1,2\""}}),
            json!({"id": "3", "@removed": {"reason": "deleted"}, "fields": {"Title": "x"}}),
        ];
        let c = page_changes("L1", &entries, None).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].item_id.as_deref(), Some("2"));
        assert_eq!(c[0].kind, ChangeKind::Deleted);
        assert!(c[0].fields.is_none());
        assert_eq!(c[1].key(), "L1/1");
        assert_eq!(c[1].fields.as_ref().unwrap()["Title"], "b");
        assert_eq!(
            c[1].etag.as_deref(),
            Some("\"g1,2\""),
            "etag from fields when absent"
        );
        assert_eq!(c[2].kind, ChangeKind::Deleted);
        assert!(c[2].fields.is_none());
        assert!(c.iter().all(|x| !x.resync && x.resync_id.is_none()));

        let rs = ResyncState {
            id: "r1".into(),
            reason: ResyncReason::TokenExpired,
            items: 0,
        };
        let c = page_changes("L1", &entries[..1], Some(&rs)).unwrap();
        assert!(c[0].resync);
        assert_eq!(c[0].resync_id.as_deref(), Some("r1"));
        assert!(page_changes("L1", &[json!({"fields": {}})], None).is_err());
    }

    #[test]
    fn record_json_shape() {
        let rs = ResyncState {
            id: "r1".into(),
            reason: ResyncReason::Initial,
            items: 7,
        };
        let end = ListChange::marker("L1", ChangeKind::ResyncEnd, &rs);
        assert_eq!(end.key(), "L1");
        let v: Value = serde_json::from_slice(end.to_record().value.as_ref().unwrap()).unwrap();
        assert_eq!(
            v,
            json!({"list_id": "L1", "kind": "resync_end", "resync": true, "resync_id": "r1",
                   "reason": "initial", "items": 7})
        );
        let begin = ListChange::marker("L1", ChangeKind::ResyncBegin, &rs);
        assert!(begin.items.is_none());
        let item = page_changes("L1", &[json!({"id": "4", "fields": {"Qty": 1}})], None)
            .unwrap()
            .remove(0);
        let v = serde_json::to_value(&item).unwrap();
        assert_eq!(
            v,
            json!({"list_id": "L1", "item_id": "4", "kind": "upsert", "fields": {"Qty": 1}, "resync": false})
        );
        let back: ListChange = serde_json::from_value(v).unwrap();
        assert_eq!(back, item);
    }

    #[test]
    fn cursor_round_trips() {
        let c = StoredCursor {
            list_id: "L1".into(),
            link: "http://x/items/delta?token=abc".into(),
            phase: CursorPhase::Next,
            resync: Some(ResyncState {
                id: "r".into(),
                reason: ResyncReason::TokenExpired,
                items: 3,
            }),
            stored_at_ms: 1,
        };
        let back: StoredCursor = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn resync_errors_are_recognised() {
        let d = |code: &str| ErrorDetail {
            code: code.into(),
            message: String::new(),
            ..ErrorDetail::default()
        };
        assert!(is_resync_error(&GraphError::from_response(
            410,
            None,
            d("resyncRequired")
        )));
        assert!(is_resync_error(&GraphError::from_response(
            410,
            None,
            d("")
        )));
        assert!(is_resync_error(&GraphError::from_response(
            400,
            None,
            d("syncStateNotFound")
        )));
        assert!(!is_resync_error(&GraphError::from_response(
            400,
            None,
            d("invalidRequest")
        )));
        assert!(!is_resync_error(&GraphError::from_response(
            503,
            None,
            d("")
        )));
        let e = PullError::Graph {
            list: "x".into(),
            source: GraphError::from_response(503, None, d("")),
        };
        assert!(e.is_retryable());
        let e = PullError::Graph {
            list: "x".into(),
            source: GraphError::from_response(403, None, d("accessDenied")),
        };
        assert!(!e.is_retryable());
        assert!(
            PullError::Log {
                what: "x",
                source: LogError::Timeout("t".into())
            }
            .is_retryable()
        );
    }
}
