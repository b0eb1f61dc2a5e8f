//! Recording decisions in the audit trail ([`crate::process::audit`]): each helper builds the
//! record of one decision and buffers it in the ledger, which appends it before the ledger change
//! it describes (or the flush does, before the offset commit, for decisions that changed no
//! entry). Nothing is built when the pipeline is not audited.
//!
//! The push side records the answered writes ([`Processor::audit_write`]: create, move, adopt,
//! update, delete) and the rows skipped as unchanged; dead letters are recorded when they are
//! appended ([`Processor::audit_dead`]), and the return path records applied list edits and
//! conflicts ([`Processor::audit_pull`]).

use super::{OpKind, Outcome, Pending, Processor};
use crate::log::EventLog;
use crate::process::audit::{AuditOp, AuditRecord, GraphTrace};
use crate::process::dlq::{DeadLetter, SourcePosition};
use crate::process::ledger::{Entry, ItemRef};
use crate::pull::ConflictRecord;
use crate::pull::processor::PendingPull;

/// What an answered write means for the audit trail.
#[derive(Debug)]
pub(super) struct Audited {
    op: AuditOp,
    /// The item the write was about when it is not the row's item afterwards (a delete, an
    /// update of an item that was gone).
    item: Option<ItemRef>,
    detail: Option<String>,
}

/// The audit meaning of `kind` answered with `outcome`; `None` for answers that change nothing
/// yet (transient, 412: the conflict is recorded when decided) or become a dead letter
/// (recorded when appended).
pub(super) fn audited(kind: &OpKind, outcome: &Outcome) -> Option<Audited> {
    let (op, item, detail) = match (kind, outcome) {
        (OpKind::Create { move_from, .. }, Outcome::Ok { .. }) => match move_from {
            Some(old) => (
                AuditOp::Move,
                None,
                Some(format!(
                    "route changed: moved from list {} item {}",
                    old.list_id, old.item_id
                )),
            ),
            None => (AuditOp::Create, None, None),
        },
        (OpKind::Create { .. }, Outcome::Duplicate) => (
            AuditOp::Adopt,
            None,
            Some("an earlier attempt had created the item (same SyncKey)".into()),
        ),
        (OpKind::Update { .. }, Outcome::Ok { .. }) => (AuditOp::Update, None, None),
        (OpKind::Update { item, .. }, Outcome::NotFound) => (
            AuditOp::Update,
            Some(item.clone()),
            Some("the item was gone from the list: it is created again".into()),
        ),
        (OpKind::Delete { item, old_of_move }, Outcome::Ok { .. } | Outcome::NotFound) => {
            let mut why = Vec::new();
            if *old_of_move {
                why.push("the old item of a move");
            }
            if matches!(outcome, Outcome::NotFound) {
                why.push("already gone");
            }
            let detail = (!why.is_empty()).then(|| why.join("; "));
            (AuditOp::Delete, Some(item.clone()), detail)
        }
        _ => return None,
    };
    Some(Audited { op, item, detail })
}

fn set_item(r: &mut AuditRecord, item: Option<&ItemRef>) {
    if let Some(i) = item {
        r.list_id = Some(i.list_id.clone());
        r.item_id = Some(i.item_id.clone());
    }
}

impl<L: EventLog + 'static> Processor<L> {
    /// A record of `op` on the pending row `p` of `table`: its commit LSN and change event.
    fn push_record(&self, op: AuditOp, table: &str, p: &Pending) -> AuditRecord {
        let mut r = AuditRecord::new(&self.cfg.pipeline.name, table, &p.sync_key, op);
        r.lsn = (p.lsn != 0).then_some(p.lsn);
        r.source = Some(SourcePosition {
            topic: p.last.topic.clone(),
            partition: p.last.partition,
            offset: p.last.offset,
        });
        r
    }

    /// An answered write of row `p`, applied to its working `entry`.
    pub(super) fn audit_write(
        &self,
        table: &str,
        p: &Pending,
        entry: &Entry,
        audited: Audited,
        graph: GraphTrace,
    ) {
        if !self.ledger.audits() {
            return;
        }
        let mut r = self.push_record(audited.op, table, p);
        match &audited.item {
            // Another item than the row's (a delete): its content is not the entry's.
            Some(item) => set_item(&mut r, Some(item)),
            None => {
                set_item(&mut r, entry.item.as_ref());
                r.hash = entry.hash.clone();
                r.etag = entry.etag.clone();
            }
        }
        r.graph = graph;
        r.detail = audited.detail;
        self.ledger.audit(r);
    }

    /// Row `p` maps to what its item already holds: nothing written. Returned, not buffered:
    /// the stage buffers it after its intents are recorded, so the intents' commit (before any
    /// write is sent) never waits for an audit append; a crash in between replays the same
    /// decision.
    pub(super) fn skip_record(
        &self,
        table: &str,
        p: &Pending,
        entry: &Entry,
    ) -> Option<AuditRecord> {
        if !self.ledger.audits() {
            return None;
        }
        let mut r = self.push_record(AuditOp::SkipUnchanged, table, p);
        set_item(&mut r, entry.item.as_ref());
        r.hash = entry.hash.clone();
        r.etag = entry.etag.clone();
        Some(r)
    }

    /// A dead letter, as appended to the dead-letter topic.
    pub(crate) fn audit_dead(&self, d: &DeadLetter) {
        if !self.ledger.audits() {
            return;
        }
        let mut r = AuditRecord::new(&d.pipeline, &d.table, &d.key, AuditOp::DeadLetter);
        r.source = d.source.clone();
        r.list_id = d.list.clone();
        r.graph = GraphTrace {
            request_id: d.request_id.clone(),
            client_request_id: d.client_request_id.clone(),
            status: d.status,
        };
        r.detail = Some(format!("{}: {}", d.kind, d.reason));
        self.ledger.audit(r);
    }

    /// The return path's `op` (`pull-apply`, `conflict`) on row `sk` for the list change `p`;
    /// `entry` is the row's entry as recorded, `lsn` the commit of the applied change.
    pub(crate) fn audit_pull(
        &self,
        op: AuditOp,
        p: &PendingPull,
        sk: &str,
        entry: Option<&Entry>,
        lsn: Option<u64>,
        detail: Option<String>,
    ) {
        if !self.ledger.audits() {
            return;
        }
        let table = &self.tables[p.table].table;
        let mut r = AuditRecord::new(&self.cfg.pipeline.name, table, sk, op);
        r.list_id = Some(p.list_id.clone());
        r.item_id = Some(p.item_id.clone());
        r.lsn = lsn.filter(|l| *l != 0);
        if !p.topic.is_empty() && p.offset != i64::MAX {
            r.source = Some(SourcePosition {
                topic: p.topic.clone(),
                partition: 0,
                offset: p.offset,
            });
        }
        r.etag = entry
            .and_then(|e| e.etag.clone())
            .or_else(|| p.etag.clone());
        r.hash = entry.and_then(|e| e.hash.clone());
        r.detail = detail;
        self.ledger.audit(r);
    }

    /// A conflict as recorded in the conflicts topic: its decision and each field's winner.
    pub(crate) fn audit_conflict(&self, c: &ConflictRecord) {
        if !self.ledger.audits() {
            return;
        }
        let mut r = AuditRecord::new(&c.pipeline, &c.table, &c.key, AuditOp::Conflict);
        r.list_id = Some(c.list_id.clone());
        r.item_id = Some(c.item_id.clone());
        let fields: Vec<String> = c
            .fields
            .iter()
            .map(|f| format!("{} → {}", f.field, f.winner))
            .collect();
        r.detail = Some(format!(
            "conflict {} {}: {}",
            c.id,
            c.decision,
            fields.join(", ")
        ));
        self.ledger.audit(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(l: &str, i: &str) -> ItemRef {
        ItemRef {
            list_id: l.into(),
            item_id: i.into(),
        }
    }

    fn create(move_from: Option<ItemRef>) -> OpKind {
        OpKind::Create {
            list_id: "L2".into(),
            fields: Default::default(),
            projection: Default::default(),
            hash: "h".into(),
            move_from,
        }
    }

    #[test]
    fn answers_map_to_operations() {
        let ok = || Outcome::Ok { body: None };
        let a = audited(&create(None), &ok()).unwrap();
        assert_eq!((a.op, a.item), (AuditOp::Create, None));
        let a = audited(&create(Some(item("L1", "3"))), &ok()).unwrap();
        assert_eq!(a.op, AuditOp::Move);
        assert!(a.detail.unwrap().contains("list L1 item 3"));
        assert_eq!(
            audited(&create(None), &Outcome::Duplicate).unwrap().op,
            AuditOp::Adopt
        );
        let del = OpKind::Delete {
            item: item("L1", "3"),
            old_of_move: true,
        };
        let a = audited(&del, &ok()).unwrap();
        assert_eq!((a.op, a.item), (AuditOp::Delete, Some(item("L1", "3"))));
        assert_eq!(a.detail.as_deref(), Some("the old item of a move"));
        let a = audited(&del, &Outcome::NotFound).unwrap();
        assert_eq!(
            a.detail.as_deref(),
            Some("the old item of a move; already gone")
        );
        // Nothing decided yet, or recorded elsewhere.
        assert!(audited(&create(None), &Outcome::Transient("x".into())).is_none());
        assert!(audited(&del, &Outcome::Stale).is_none());
        let rejected = Outcome::Rejected {
            message: "m".into(),
            request_id: None,
            client_request_id: "c".into(),
            status: 400,
        };
        assert!(audited(&create(None), &rejected).is_none());
    }
}
