//! Audit records: what the processor decided about a row and what Graph answered, one record per
//! decision (DESIGN.md §9, per-row lineage: commit LSN → log offset → decision → Graph request
//! id → item). The meta-store projects them (`crate::control::meta::projector`) and
//! `GET /pipelines/{p}/rows/{table}/{key}/history` serves them.
//!
//! # Where they go: `<prefix>.<pipeline>.audit`, not the runs topic
//! A sibling topic of the runs topic rather than the runs topic itself, because the two differ in
//! volume by orders of magnitude: a run has a few events per hour, the audit one record per row
//! change. On one topic every start would have to read the whole audit backlog before the run
//! events it needs (a start marks a dead process's runs failed only after the runs projector
//! caught up), and the two projections could not progress, or be rebuilt, independently.
//!
//! # Durability: no committed change without its record
//! The processor buffers the records of a flush in the ledger ([`AuditTrail`], through
//! [`Ledger::audit`](super::ledger::Ledger::audit)); [`Ledger::commit`](super::ledger::Ledger::commit)
//! appends the buffered records (one append, all rows) to the audit topic *before* it appends its
//! own changes to the changelog, and the flush appends what is left (decisions that changed no
//! entry: skips, dead letters) before the input offsets are committed. So a ledger change is never
//! durable without the records that describe it, and a crash before the offset commit replays the
//! events: a replay may add records (the projector drops duplicates by `event_id`; a replayed
//! decision is a new record, e.g. `skip-unchanged` after a create), never lose one. A record may
//! describe a Graph write whose ledger change a crash then lost; that write happened, and the
//! replay records its repair (an `adopt`).
//!
//! Intents and fields-in-flight (the bookkeeping recorded *before* a write) are not audited: the
//! write's own record follows them.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::dlq::SourcePosition;
use crate::log::Record;

/// One partition: the processor of a pipeline is its only writer, and one partition keeps the
/// records in append order, which orders records of the same millisecond.
pub const AUDIT_PARTITIONS: i32 = 1;

/// `<prefix>.<pipeline>.audit`: append-only, keyed by `<schema.table>\0<sync key>`.
pub fn audit_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.audit")
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditOp {
    /// An item was created for the row.
    Create,
    /// Fields of the row's item were updated.
    Update,
    /// An item was deleted: the row's, or the old item of a move.
    Delete,
    /// The create in the new list of a row whose route changed (the old item's delete follows).
    Move,
    /// A create met the item an earlier attempt had made (unique `SyncKey`): it became the row's.
    Adopt,
    /// The row's mapped fields equal what the item holds: nothing was written.
    SkipUnchanged,
    /// The change could not be written and went to the dead-letter topic.
    DeadLetter,
    /// A list edit was applied to the row in PostgreSQL (the return path).
    PullApply,
    /// The row and its item both changed; the policy decided (or parked) it.
    Conflict,
}

impl AuditOp {
    pub const ALL: [AuditOp; 9] = [
        AuditOp::Create,
        AuditOp::Update,
        AuditOp::Delete,
        AuditOp::Move,
        AuditOp::Adopt,
        AuditOp::SkipUnchanged,
        AuditOp::DeadLetter,
        AuditOp::PullApply,
        AuditOp::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditOp::Create => "create",
            AuditOp::Update => "update",
            AuditOp::Delete => "delete",
            AuditOp::Move => "move",
            AuditOp::Adopt => "adopt",
            AuditOp::SkipUnchanged => "skip-unchanged",
            AuditOp::DeadLetter => "dead-letter",
            AuditOp::PullApply => "pull-apply",
            AuditOp::Conflict => "conflict",
        }
    }
}

/// The Graph request behind a decision: Microsoft's `request-id`, our `client-request-id` and
/// the HTTP status of the (inner `$batch`) response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphTrace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

/// One audit record (the JSON value of an audit topic record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique per decision; a record read or appended twice has the same one.
    pub event_id: Uuid,
    pub pipeline: String,
    /// `schema.table`.
    pub table: String,
    /// The row's SyncKey.
    pub key: String,
    pub operation: AuditOp,
    /// The list and item the operation was about (for a move's delete: the old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_id: Option<String>,
    /// Hash of the mapped fields the item holds afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Commit LSN of the source change (`None`: not known, e.g. a dead letter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
    /// The change event's position in the log (a table topic, or the list-changes topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePosition>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub graph: GraphTrace,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Why, in words (a dead letter's reason, a conflict's decision, a move's old item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub at_ms: i64,
}

fn is_default(t: &GraphTrace) -> bool {
    *t == GraphTrace::default()
}

impl AuditRecord {
    /// A record of `operation` on row `key` of `table`, stamped now, with nothing else known yet.
    pub fn new(pipeline: &str, table: &str, key: &str, operation: AuditOp) -> Self {
        AuditRecord {
            event_id: Uuid::new_v4(),
            pipeline: pipeline.to_string(),
            table: table.to_string(),
            key: key.to_string(),
            operation,
            list_id: None,
            item_id: None,
            hash: None,
            lsn: None,
            source: None,
            graph: GraphTrace::default(),
            etag: None,
            detail: None,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The log record: keyed by row, so a row's records stay in order on any partitioning.
    pub fn to_record(&self) -> Record {
        let mut key = Vec::with_capacity(self.table.len() + self.key.len() + 1);
        key.extend_from_slice(self.table.as_bytes());
        key.push(0);
        key.extend_from_slice(self.key.as_bytes());
        Record::new(key, self.encode()).with_timestamp_ms(self.at_ms)
    }
}

/// The records of decisions not yet appended, and the topic they go to.
#[derive(Debug)]
pub struct AuditTrail {
    topic: String,
    pending: Mutex<Vec<AuditRecord>>,
}

impl AuditTrail {
    pub fn new(topic: String) -> Self {
        Self {
            topic,
            pending: Mutex::new(Vec::new()),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn push(&self, record: AuditRecord) {
        self.lock().push(record);
    }

    /// The buffered records, leaving the buffer empty.
    pub fn take(&self) -> Vec<AuditRecord> {
        std::mem::take(&mut *self.lock())
    }

    /// Puts records whose append failed back in front of those buffered since.
    pub fn restore(&self, mut records: Vec<AuditRecord>) {
        let mut pending = self.lock();
        records.append(&mut pending);
        *pending = records;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AuditRecord>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> AuditRecord {
        let mut r = AuditRecord::new("p", "public.t", "42", AuditOp::Move);
        r.list_id = Some("L2".into());
        r.item_id = Some("7".into());
        r.hash = Some("ab".into());
        r.lsn = Some(0x16B_3748);
        r.source = Some(SourcePosition {
            topic: "sb.p.public.t".into(),
            partition: 2,
            offset: 9,
        });
        r.graph = GraphTrace {
            request_id: Some("r".into()),
            client_request_id: Some("c".into()),
            status: Some(201),
        };
        r.etag = Some("\"g,1\"".into());
        r.detail = Some("from L1/3".into());
        r
    }

    #[test]
    fn records_round_trip_and_omit_what_is_unknown() {
        let r = full();
        assert_eq!(AuditRecord::decode(&r.encode()).unwrap(), r);
        let bare = AuditRecord::new("p", "public.t", "42", AuditOp::SkipUnchanged);
        let v: serde_json::Value = serde_json::from_slice(&bare.encode()).unwrap();
        assert_eq!(v["operation"], "skip-unchanged");
        for absent in [
            "list_id", "item_id", "lsn", "source", "graph", "etag", "detail",
        ] {
            assert!(v.get(absent).is_none(), "{absent} serialised: {v}");
        }
        assert_eq!(AuditRecord::decode(&bare.encode()).unwrap(), bare);
        assert!(AuditRecord::decode(b"{").is_err());
    }

    #[test]
    fn operation_names_match_their_serde_names() {
        for op in AuditOp::ALL {
            assert_eq!(
                serde_json::to_value(op).unwrap(),
                serde_json::Value::from(op.as_str())
            );
        }
    }

    #[test]
    fn the_log_record_is_keyed_by_row_and_stamped() {
        let r = full();
        let rec = r.to_record();
        assert_eq!(rec.key, b"public.t\x0042");
        assert_eq!(
            AuditRecord::decode(rec.value.as_deref().unwrap()).unwrap(),
            r
        );
    }

    #[test]
    fn a_failed_append_keeps_its_records_first() {
        let t = AuditTrail::new("x".into());
        let a = full();
        let b = AuditRecord::new("p", "public.t", "1", AuditOp::Create);
        t.push(a.clone());
        let taken = t.take();
        assert!(t.take().is_empty());
        t.push(b.clone());
        t.restore(taken);
        assert_eq!(t.take(), vec![a, b]);
    }
}
