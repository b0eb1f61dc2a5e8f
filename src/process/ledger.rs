//! The ledger: what SyncBridge knows it wrote, per row. A sled tree keyed by
//! `<schema.table>\0<sync key>`, mirrored into a compacted changelog topic
//! (`<prefix>.<pipeline>.ledger`) so the store can be rebuilt after a lost disk.
//!
//! # Durability contract
//! [`Ledger::commit`] makes a batch of mutations durable in this order:
//! 1. append them to the changelog topic (durable when `append` returns);
//! 2. apply them to sled together with the changelog end offsets they reach, then flush.
//!
//! A crash between 1 and 2 leaves sled *behind* the topic; [`Ledger::open`] notices (its stored
//! offsets are below the topic's end) and replays the missing records. A missing or deleted
//! sled directory is the extreme case: everything is replayed. So sled never holds a mutation
//! the changelog does not, and callers may treat `commit` returning `Ok` as "durable".
//! The processor commits its input offsets only after `commit` returned.
//!
//! # Several writers
//! Several processes of one pipeline (Kafka, see `processor::assign`) each keep a store and all
//! append to the one changelog partition. The applied offset therefore means "every changelog
//! record below it is in this store": a commit advances it only when its records sit right at
//! it (no other member's record before or between them), and [`Ledger::catch_up`] replays from
//! it to the end, in order, so the latest record of each key wins. The processor catches up
//! whenever it is assigned partitions, before it uses their records.
//!
//! With an audit trail ([`Ledger::enable_audit`], see [`super::audit`]), `commit` first appends
//! the audit records buffered since the last append ([`Ledger::audit`]) to the audit topic, so a
//! change is never durable without the records that describe it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use super::audit::{AUDIT_PARTITIONS, AuditRecord, AuditTrail};
use crate::log::{EventLog, LogConsumer, LogError, Record, TopicSpec};

/// One changelog partition, also with several processes of one pipeline writing it: one
/// partition keeps the changelog totally ordered, which makes "behind" a single offset
/// comparison (why not partitioned like the table topics: `ops/docs/kafka.md`, scale-out).
pub const LEDGER_PARTITIONS: i32 = 1;
/// sled key holding the changelog offset the store has applied up to.
const APPLIED_KEY: &[u8] = b"\xffapplied";

/// Who last changed the item's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    #[default]
    Push,
    Pull,
}

/// An item reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRef {
    pub list_id: String,
    pub item_id: String,
}

/// A write that was started but whose outcome is not yet recorded. After a crash it is resolved
/// by looking the item up by `SyncKey` in `list_id` (a create), never by writing blindly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// The list a create was sent to.
    pub create_in: String,
}

/// What is known about one row's item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Entry {
    /// Where the row's live item is, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<ItemRef>,
    /// Hash of `projection` (hex), the mapped fields last confirmed written or read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The mapped field values last confirmed (Graph field name → JSON).
    #[serde(default)]
    pub projection: BTreeMap<String, Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Commit LSN of the last source change applied.
    #[serde(default)]
    pub lsn: u64,
    #[serde(default)]
    pub provenance: Provenance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulled_at_ms: Option<i64>,
    /// A create in flight (see [`Intent`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// The old item of a move, still to be deleted (the new one is `item`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_delete: Option<ItemRef>,
    /// Fields of an update sent but not yet confirmed: after a crash the item may hold the old
    /// or the new value, so they are sent again whatever the diff says.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub in_flight: std::collections::BTreeSet<String>,
    /// The values sent for the `in_flight` fields (projection key → every value sent since the
    /// last confirmed write, oldest first, at most [`MAX_SENT_VALUES`]). The return path needs
    /// them: a list version holding one of them holds our own write whose outcome a crash cut
    /// off, not a person's edit to take back into the row.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sent: BTreeMap<String, Vec<Json>>,
    /// Id of the last conflict recorded for this row (a replayed decision is not recorded again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_conflict: Option<String>,
    /// `last_conflict` was remembered before its record was appended, and the append is not
    /// confirmed yet: after a crash the conflicts topic is read to tell whether it landed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conflict_unconfirmed: bool,
    /// Return path, on the intent entry of a person-created item: the SyncKey pre-allocated
    /// for its new row (written to the item before the row is inserted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_row_key: Option<String>,
    /// Return path, on that intent entry: the row was inserted and the item carries its
    /// SyncKey. The entry is kept (until the item is deleted) because the item's creation can
    /// be read again after a restart, and must then not make a second row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub row_created: bool,
}

impl Entry {
    /// True when nothing is left to remember: no item, nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.item.is_none()
            && self.intent.is_none()
            && self.pending_delete.is_none()
            && self.new_row_key.is_none()
    }

    /// Records an update about to be sent: its fields are in flight until its outcome is
    /// recorded, and their values join the ones sent before (an earlier update whose outcome
    /// is unknown may have landed too).
    pub fn send(&mut self, fields: &serde_json::Map<String, Json>) {
        self.in_flight = fields.keys().cloned().collect();
        for (k, v) in fields {
            let values = self.sent.entry(k.clone()).or_default();
            if !values.contains(v) {
                values.push(v.clone());
            }
            let excess = values.len().saturating_sub(MAX_SENT_VALUES);
            values.drain(..excess);
        }
    }

    /// The outcome of every update sent is known (written, or the item re-read).
    pub fn clear_in_flight(&mut self) {
        self.in_flight.clear();
        self.sent.clear();
    }

    /// True when `value` was sent for the projection key `key` by an update whose outcome is
    /// not recorded: an item holding it may hold our own write.
    pub fn was_sent(&self, key: &str, value: &Json) -> bool {
        self.sent.get(key).is_some_and(|vs| vs.contains(value))
    }
}

/// The values remembered per in-flight field. Every restart after a crash re-sends the field
/// (one more value) until one update's outcome is recorded; a few cover any realistic run of
/// crashes, and the bound keeps a crash-looping process from growing the entry without end.
const MAX_SENT_VALUES: usize = 8;

/// The ledger key of a row.
pub fn key(table: &str, sync_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.len() + sync_key.len() + 1);
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(sync_key.as_bytes());
    k
}

/// Splits a ledger key into `(table, sync key)`.
pub fn split_key(k: &[u8]) -> Option<(String, String)> {
    let i = k.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8(k[..i].to_vec()).ok()?,
        String::from_utf8(k[i + 1..].to_vec()).ok()?,
    ))
}

/// Ledger failures. The log's retryability passes through; sled and data problems are not
/// retryable (the disk or the bytes are broken).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger store: {0}")]
    Store(#[from] sled::Error),
    #[error("ledger changelog: {0}")]
    Log(#[from] LogError),
    #[error("ledger entry {key}: {message}")]
    Corrupt { key: String, message: String },
}

impl LedgerError {
    pub fn is_retryable(&self) -> bool {
        match self {
            LedgerError::Log(e) => e.is_retryable(),
            LedgerError::Store(_) | LedgerError::Corrupt { .. } => false,
        }
    }
}

/// The sled store plus its changelog topic.
#[derive(Debug)]
pub struct Ledger<L> {
    tree: sled::Tree,
    db: sled::Db,
    log: Arc<L>,
    topic: String,
    /// Records replayed from the changelog, at open and by later catch-ups (tests and logs).
    pub replayed: u64,
    /// Audit records waiting for the next commit (`None`: not audited).
    audit: Option<AuditTrail>,
}

impl<L: EventLog> Ledger<L> {
    /// Opens (or creates) the store in `dir` and brings it up to the changelog's end.
    pub async fn open(dir: &Path, log: Arc<L>, topic: &str) -> Result<Self, LedgerError> {
        log.ensure_topic(&TopicSpec::compacted(topic, LEDGER_PARTITIONS))
            .await?;
        let db = sled::Config::new().path(dir).open()?;
        let tree = db.open_tree("ledger")?;
        let mut ledger = Ledger {
            tree,
            db,
            log,
            topic: topic.to_string(),
            replayed: 0,
            audit: None,
        };
        ledger.catch_up().await?;
        Ok(ledger)
    }

    fn applied(&self) -> Result<i64, LedgerError> {
        Ok(match self.tree.get(APPLIED_KEY)? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        })
    }

    /// Replays changelog records at or after the store's applied offset, up to the
    /// changelog's end: at open, and whenever the processor takes over partitions another
    /// member wrote entries for (several processes of one pipeline, see the module docs).
    /// Returns the records replayed.
    pub async fn catch_up(&mut self) -> Result<u64, LedgerError> {
        let end = self
            .log
            .end_offsets(&self.topic)
            .await?
            .first()
            .copied()
            .unwrap_or(0);
        let applied = self.applied()?;
        if applied >= end {
            return Ok(0);
        }
        tracing::info!(topic = %self.topic, from = applied, to = end, "ledger: catching up with the changelog");
        // A throwaway group that never commits by itself; it starts at the applied offset
        // (stored for it first), or at the earliest record for a store that never applied one.
        // Compaction may have removed older versions, which is exactly what a rebuild wants.
        let stop = CancellationToken::new();
        let group = format!("{}.rebuild.{}", self.topic, uuid::Uuid::new_v4().simple());
        if applied > 0 {
            let start = [((self.topic.clone(), 0), applied)].into_iter().collect();
            self.log.set_committed(&group, &start).await?;
        }
        let mut consumer = self
            .log
            .consumer(&group, std::slice::from_ref(&self.topic), stop.clone())
            .await?;
        let mut batch = sled::Batch::default();
        let mut n = 0u64;
        let mut last = applied;
        while last < end {
            let Some(rec) = consumer.recv().await? else {
                break;
            };
            last = rec.offset + 1;
            if rec.offset < applied {
                continue;
            }
            match rec.record.value {
                Some(v) => batch.insert(rec.record.key, v),
                None => batch.remove(rec.record.key),
            }
            n += 1;
        }
        stop.cancel();
        batch.insert(APPLIED_KEY, &end.to_be_bytes());
        self.tree.apply_batch(batch)?;
        self.db.flush_async().await?;
        self.replayed += n;
        Ok(n)
    }

    /// The entry of a row.
    pub fn get(&self, key: &[u8]) -> Result<Option<Entry>, LedgerError> {
        match self.tree.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| LedgerError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    message: e.to_string(),
                }),
        }
    }

    /// Every entry of `table` (for TRUNCATE and drift checks).
    pub fn scan_table(&self, table: &str) -> Result<Vec<(Vec<u8>, Entry)>, LedgerError> {
        let mut prefix = table.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let e = serde_json::from_slice(&v).map_err(|e| LedgerError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                message: e.to_string(),
            })?;
            out.push((k.to_vec(), e));
        }
        Ok(out)
    }

    /// Number of rows with an entry.
    pub fn len(&self) -> usize {
        self.tree.len().saturating_sub(usize::from(
            self.tree.contains_key(APPLIED_KEY).unwrap_or(false),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Audits every later commit: records passed to [`Ledger::audit`] are appended to `topic`
    /// (created unless it exists) before the changes they describe.
    pub async fn enable_audit(&mut self, topic: &str) -> Result<(), LedgerError> {
        self.log
            .ensure_topic(&TopicSpec::new(topic, AUDIT_PARTITIONS))
            .await?;
        self.audit = Some(AuditTrail::new(topic.to_string()));
        Ok(())
    }

    /// Whether decisions are audited (callers skip building records when not).
    pub fn audits(&self) -> bool {
        self.audit.is_some()
    }

    /// Buffers a record until the next [`Ledger::commit`] or [`Ledger::flush_audit`].
    pub fn audit(&self, record: AuditRecord) {
        if let Some(t) = &self.audit {
            t.push(record);
        }
    }

    /// Appends the buffered audit records (one append), durable on return. On failure they
    /// stay buffered, in order, for the next attempt.
    pub async fn flush_audit(&self) -> Result<(), LedgerError> {
        let Some(trail) = &self.audit else {
            return Ok(());
        };
        let records = trail.take();
        if records.is_empty() {
            return Ok(());
        }
        let batch = records.iter().map(AuditRecord::to_record).collect();
        if let Err(e) = self.log.append(trail.topic(), batch).await {
            trail.restore(records);
            return Err(e.into());
        }
        Ok(())
    }

    /// Makes `changes` durable (see the module contract), after the audit records buffered so
    /// far. `None` removes the entry.
    pub async fn commit(&self, changes: Vec<(Vec<u8>, Option<Entry>)>) -> Result<(), LedgerError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.flush_audit().await?;
        let mut records = Vec::with_capacity(changes.len());
        let mut batch = sled::Batch::default();
        for (k, e) in changes {
            match e.filter(|e| !e.is_empty()) {
                Some(e) => {
                    let v = serde_json::to_vec(&e).map_err(|err| LedgerError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        message: err.to_string(),
                    })?;
                    records.push(Record::new(k.clone(), v.clone()));
                    batch.insert(k, v);
                }
                None => {
                    records.push(Record::tombstone(k.clone()));
                    batch.remove(k);
                }
            }
        }
        let delivered = self.log.append(&self.topic, records).await?;
        // The applied offset means "every record below it is in the store". It moves past this
        // batch only when the batch sits right there, without gaps: records of other members
        // (several processes of one pipeline) or of a failed earlier attempt before or between
        // ours are not in the store yet, and the next `catch_up` replays from here.
        let first = delivered.iter().map(|d| d.offset).min();
        let last = delivered.iter().map(|d| d.offset).max();
        if let (Some(first), Some(last)) = (first, last)
            && first == self.applied()?
            && usize::try_from(last - first + 1) == Ok(delivered.len())
        {
            batch.insert(APPLIED_KEY, &(last + 1).to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = key("public.t", "42");
        assert_eq!(split_key(&k), Some(("public.t".into(), "42".into())));
    }

    #[test]
    fn sent_values_accumulate_until_the_outcome_is_known() {
        let mut e = Entry::default();
        let fields = |v: i64| serde_json::json!({ "Qty": v }).as_object().unwrap().clone();
        e.send(&fields(1));
        e.send(&fields(2));
        e.send(&fields(2));
        assert!(e.in_flight.contains("Qty"));
        assert_eq!(
            e.sent["Qty"],
            vec![serde_json::json!(1), serde_json::json!(2)]
        );
        assert!(e.was_sent("Qty", &serde_json::json!(1)) && !e.was_sent("Title", &Json::Null));
        for v in 3..20 {
            e.send(&fields(v));
        }
        assert_eq!(e.sent["Qty"].len(), MAX_SENT_VALUES);
        assert!(
            e.was_sent("Qty", &serde_json::json!(19)) && !e.was_sent("Qty", &serde_json::json!(1))
        );
        e.clear_in_flight();
        assert!(e.in_flight.is_empty() && e.sent.is_empty());
    }

    #[test]
    fn empty_entries_are_tombstones() {
        assert!(Entry::default().is_empty());
        let e = Entry {
            intent: Some(Intent {
                create_in: "L".into(),
            }),
            ..Entry::default()
        };
        assert!(!e.is_empty());
    }
}
