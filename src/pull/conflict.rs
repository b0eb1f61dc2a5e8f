//! Conflicts: a field changed in the list *and* on the source side since the last sync.
//!
//! Owns the conflict record (`<prefix>.<pipeline>.conflicts`), its deterministic id, the eTag
//! staleness test that tells news from replays and echoes, and the policy decisions
//! (`source_wins`, `target_wins`, `last_writer_wins`, `manual`). The decisions are pure: they
//! read the list change, the ledger's projection and the source side, and say what each field
//! does; the return processor ([`super::upsert`], [`super::delete`]) carries them out.
//!
//! Invariant: a decision replayed after a crash (same row, list version and values) gets the
//! same id, so it is recorded once (the id is remembered in the row's ledger entry before the
//! record is appended, and confirmed after; a replay finding it unconfirmed looks it up in the
//! conflicts topic). Delete conflicts (`super::delete`) still get a random id: not covered.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tracing::warn;

use super::processor::PendingPull;
use crate::config::{ConflictPolicy, Direction, FieldMapping};
use crate::log::{EventLog, Record};
use crate::process::ProcessError;
use crate::process::processor::Processor;
use crate::telemetry::metrics as m;

/// How long a list edit waits when the row also changed in PostgreSQL but that change has not
/// reached the processor yet (so the conflict is decided with both sides and their times):
/// capture delivers a commit well within this, even under load.
const MAX_PULL_DEFER: std::time::Duration = std::time::Duration::from_secs(3);

/// The field name of a delete conflict (the item was deleted while the row changed).
pub(crate) const DELETE_CONFLICT_FIELD: &str = "(item)";

/// One field both sides changed, as recorded in the conflicts topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldConflict {
    pub field: String,
    pub column: String,
    pub source: Json,
    pub target: Json,
    pub policy: ConflictPolicy,
    /// `source`, `target`, or `parked`.
    pub winner: String,
}

/// A conflict record (value of `<prefix>.<pipeline>.conflicts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: String,
    pub pipeline: String,
    pub table: String,
    pub key: String,
    pub list_id: String,
    pub item_id: String,
    pub fields: Vec<FieldConflict>,
    /// `resolved` (every field decided by its policy) or `parked` (manual).
    pub decision: String,
    pub source_commit_ts_ms: i64,
    pub target_modified_ms: Option<i64>,
    pub at_ms: i64,
}

/// `<prefix>.<pipeline>.conflicts`.
pub fn conflicts_topic(prefix: &str, pipeline: &str) -> String {
    format!("{prefix}.{pipeline}.conflicts")
}

/// A deterministic conflict id: table, key, item, list version and the decided fields.
pub(super) fn conflict_id(
    table: &str,
    key: &str,
    item: &str,
    etag: Option<&str>,
    fields: &[FieldConflict],
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [table, key, item, etag.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(serde_json::to_vec(fields).unwrap_or_default());
    hex::encode(&h.finalize()[..16])
}

/// `(item GUID, version)` of a list item eTag (`"{guid},{n}"`, quoted or not, braced or not;
/// graph-api.md §5.8): the version rises with every write to the item.
fn etag_version(etag: &str) -> Option<(String, u64)> {
    let t = etag.trim().trim_start_matches("W/").trim_matches('"');
    let (guid, n) = t.rsplit_once(',')?;
    let guid = guid.trim().trim_matches(['{', '}']).to_ascii_lowercase();
    (!guid.is_empty()).then_some(())?;
    Some((guid, n.trim().parse().ok()?))
}

/// True when the list version `incoming` is one the ledger already holds or has passed (same
/// item, version not above the ledger's). Every write that sets the ledger's eTag either is
/// conditional on the version the ledger knew or rewrites every mapped field, so the ledger's
/// projection holds that version's content: an older or equal list record is a replay (a list
/// change read again after a restart) or the echo of our own write, never news.
pub(super) fn is_stale(incoming: Option<&str>, known: Option<&str>) -> bool {
    match (
        incoming.and_then(etag_version),
        known.and_then(etag_version),
    ) {
        (Some((g1, v1)), Some((g2, v2))) => g1 == g2 && v1 <= v2,
        _ => false,
    }
}

/// The side a policy gives a conflict: `source`, `target`, or `parked` (manual).
/// `last_writer_wins` compares the list's `lastModifiedDateTime` with the source commit time;
/// a tie or an unknown list time goes to the source.
pub(super) fn winner(
    policy: ConflictPolicy,
    target_modified_ms: Option<i64>,
    source_ts_ms: i64,
) -> &'static str {
    match policy {
        ConflictPolicy::SourceWins => "source",
        ConflictPolicy::TargetWins => "target",
        ConflictPolicy::LastWriterWins => {
            if target_modified_ms.is_some_and(|t| t > source_ts_ms) {
                "target"
            } else {
                "source"
            }
        }
        ConflictPolicy::Manual => "parked",
    }
}

/// The key of a canonical field's value (its `@odata.type` annotation left out).
fn main_key(canon: &[(String, Json)]) -> Option<&str> {
    canon
        .iter()
        .find(|(k, _)| !k.ends_with("@odata.type"))
        .map(|(k, _)| k.as_str())
}

/// The value of a canonical field (its annotation left out), null when absent.
pub(super) fn main_value(canon: &[(String, Json)]) -> Json {
    canon
        .iter()
        .find(|(k, _)| !k.ends_with("@odata.type"))
        .map(|(_, v)| v.clone())
        .unwrap_or(Json::Null)
}

/// A mapped field with its canonical values (as `convert::canonical_from_item` gives them).
pub(super) type CanonField = (FieldMapping, Vec<(String, Json)>);

/// The source side a list edit is weighed against.
pub(super) struct SourceSide {
    /// The row's projection: its pending push, else as read from PostgreSQL (`None`: unknown,
    /// so no source-side change is assumed).
    pub projection: Option<BTreeMap<String, Json>>,
    /// `projection` is the pending push's (which will write a source winner itself).
    pub from_pending: bool,
    /// Commit time of the pending push, when there is one.
    pub pending_ts_ms: Option<i64>,
}

/// What a list edit does, field by field, once conflicts are decided.
#[derive(Default)]
pub(super) struct FieldDecisions {
    /// Fields whose list value goes to the row: unchanged at the source, pull-only, or won by
    /// the target.
    pub apply: Vec<CanonField>,
    /// Both sides changed the field and disagree: recorded with its winner.
    pub conflicts: Vec<FieldConflict>,
    /// A `manual` field is among the conflicts: neither side is written.
    pub parked: bool,
    /// Both sides hold the same new value (typically our own write whose ledger record a crash
    /// cut off): in sync, nothing to decide or write.
    pub converged: Vec<(String, Json)>,
    /// Source winners the pending push writes: until then the item holds the losing values at
    /// this version, which the ledger records as read (so the push diffs against them).
    pub lost_targets: Vec<(String, Json)>,
    /// Source winners without a pending push (its event was lost to a crash or is older than
    /// the ledger): written to the item by the return path, or nobody would.
    pub source_fields: Map<String, Json>,
}

/// Decides every field the list edit `p` changed against the source side. `None`: the source
/// changed the field too but its change has not reached the processor yet; the edit waits (at
/// most [`MAX_PULL_DEFER`]) so the conflict is decided with both sides and their times.
pub(super) fn decide_fields(
    changed: Vec<CanonField>,
    ledger: &BTreeMap<String, Json>,
    source: &SourceSide,
    policy_default: ConflictPolicy,
    p: &PendingPull,
) -> Option<FieldDecisions> {
    let get = |m: &BTreeMap<String, Json>, k: &str| m.get(k).unwrap_or(&Json::Null).clone();
    let mut out = FieldDecisions::default();
    for (f, canon) in changed {
        let source_changed = source
            .projection
            .as_ref()
            .is_some_and(|pp| canon.iter().any(|(k, _)| get(pp, k) != get(ledger, k)));
        if !source_changed || f.direction == Direction::PullOnly {
            out.apply.push((f, canon));
            continue;
        }
        let pp = source.projection.as_ref().expect("source changed");
        if canon.iter().all(|(k, v)| get(pp, k) == *v) {
            out.converged.extend(canon);
            continue;
        }
        if !source.from_pending
            && p.deferred_since
                .is_none_or(|t| t.elapsed() < MAX_PULL_DEFER)
        {
            return None;
        }
        let policy = f.conflict.unwrap_or(policy_default);
        let source_ts = source
            .pending_ts_ms
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let winner = winner(policy, p.last_modified_ms, source_ts);
        out.conflicts.push(FieldConflict {
            field: f.field.clone(),
            column: f.column.clone(),
            source: main_key(&canon)
                .and_then(|k| pp.get(k).cloned())
                .unwrap_or(Json::Null),
            target: main_value(&canon),
            policy,
            winner: winner.to_string(),
        });
        match winner {
            "target" => out.apply.push((f, canon)),
            "parked" => out.parked = true,
            _ if !source.from_pending => {
                for (k, _) in &canon {
                    out.source_fields.insert(k.clone(), get(pp, k));
                }
            }
            _ => out.lost_targets.extend(canon),
        }
    }
    Some(out)
}

impl<L: EventLog + 'static> Processor<L> {
    /// A conflict record of the list change `p` to the row `sk` (decision `parked` or
    /// `resolved`), stamped now.
    pub(super) fn conflict_record(
        &self,
        p: &PendingPull,
        sk: &str,
        id: String,
        fields: Vec<FieldConflict>,
        parked: bool,
        source_commit_ts_ms: i64,
    ) -> ConflictRecord {
        ConflictRecord {
            id,
            pipeline: self.cfg.pipeline.name.clone(),
            table: self.tables[p.table].table.clone(),
            key: sk.to_string(),
            list_id: p.list_id.clone(),
            item_id: p.item_id.clone(),
            fields,
            decision: if parked { "parked" } else { "resolved" }.into(),
            source_commit_ts_ms,
            target_modified_ms: p.last_modified_ms,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    /// True when the conflicts topic holds a record with this id. Reads the whole topic: only
    /// asked after a crash cut off a conflict's confirmation, which is rare.
    pub(super) async fn conflict_recorded(&self, id: &str) -> Result<bool, ProcessError> {
        let entries =
            super::resolve::read_conflicts(self.log.as_ref(), &self.conflicts_topic).await?;
        Ok(entries.iter().any(|e| e.record.id == id))
    }

    /// Appends a conflict to the conflicts topic (keyed by table and row) and counts it.
    pub(super) async fn record_conflict(&mut self, r: &ConflictRecord) -> Result<(), ProcessError> {
        for f in &r.fields {
            metrics::counter!(m::PULL_CONFLICTS_TOTAL, "pipeline" => r.pipeline.clone(), "policy" => f.policy.as_str(), "outcome" => f.winner.clone())
                .increment(1);
        }
        self.stats.conflicts += 1;
        self.audit_conflict(r);
        warn!(table = %r.table, key = %r.key, decision = %r.decision, fields = r.fields.len(), "conflict: both sides changed");
        let value = serde_json::to_vec(r).unwrap_or_default();
        self.log
            .append(
                &self.conflicts_topic,
                vec![Record::new(
                    format!("{}\u{0}{}", r.table, r.key).into_bytes(),
                    value,
                )],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_versions_compare_only_within_one_item() {
        assert_eq!(
            etag_version("\"{1A64AE23-9cb6-4521-b489-61d558dde9f7},11\""),
            Some(("1a64ae23-9cb6-4521-b489-61d558dde9f7".into(), 11))
        );
        assert_eq!(etag_version("\"g,x\""), None);
        assert_eq!(etag_version("no-comma"), None);
        assert!(is_stale(Some("\"g,3\""), Some("\"g,4\"")));
        assert!(is_stale(Some("\"G,3\""), Some("\"{g},4\"")));
        // The version the ledger holds (every write that sets it is conditional or whole, so
        // the ledger has its content): a replay or our own echo.
        assert!(is_stale(Some("\"g,4\""), Some("\"g,4\"")));
        assert!(!is_stale(Some("\"g,5\""), Some("\"g,4\"")));
        // Another item (re-created elsewhere) or no known eTag: not comparable.
        assert!(!is_stale(Some("\"h,1\""), Some("\"g,4\"")));
        assert!(!is_stale(Some("\"g,1\""), None));
        assert!(!is_stale(None, Some("\"g,4\"")));
    }
}
