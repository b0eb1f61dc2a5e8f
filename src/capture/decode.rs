//! pgoutput messages → committed [`ChangeEvent`]s. Changes are buffered per transaction (and, for
//! streamed in-progress transactions, per top-level xid with the subxact xid of each change) and
//! released only at Commit / StreamCommit; StreamAbort drops the aborted (sub)transaction's changes.

use std::collections::HashMap;
use std::sync::Arc;

use pg_walstream::{LogicalReplicationMessage as M, StreamingReplicationMessage, TupleData};

use super::catalog::Catalog;
use super::error::CaptureError;
use super::now_ms;
use crate::event::change::{ChangeEvent, Op, Relation, Row, Source, Value};

/// Prefix of our heartbeat messages (`pg_logical_emit_message(false, 'syncbridge', ...)`).
pub const HEARTBEAT_PREFIX: &str = "syncbridge";

/// Prefix of the re-snapshot watermarks (`pg_logical_emit_message(true, 'syncbridge_watermark',
/// ...)`, see [`super::resnapshot`]).
pub const WATERMARK_PREFIX: &str = "syncbridge_watermark";

/// Microseconds between 1970-01-01 and 2000-01-01 (the PostgreSQL epoch).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub(crate) fn pg_ts_to_unix_ms(ts: i64) -> i64 {
    ts.saturating_add(PG_EPOCH_OFFSET_US) / 1000
}

/// What one message produced.
#[derive(Debug)]
pub(crate) enum Decoded {
    Nothing,
    /// A transaction committed: its events (possibly none) and the LSN to acknowledge after them.
    Committed {
        events: Vec<ChangeEvent>,
        end_lsn: u64,
        commit_ts_ms: i64,
        /// Contents of the transactional re-snapshot watermarks the transaction wrote, in WAL
        /// order. They take effect after `events` (a watermark's own transaction normally holds
        /// nothing else).
        watermarks: Vec<String>,
    },
    /// A non-transactional heartbeat at this LSN: everything before it has been sent.
    Heartbeat {
        lsn: u64,
    },
}

#[derive(Debug, Default)]
struct OpenTx {
    xid: u32,
    origin: Option<String>,
    /// (xid of the (sub)transaction that made the change, event).
    events: Vec<(u32, ChangeEvent)>,
    /// (xid, content) of re-snapshot watermarks.
    watermarks: Vec<(u32, String)>,
}

/// Transaction assembly state of one replication session.
#[derive(Debug)]
pub(crate) struct Assembler {
    pipeline: String,
    db: String,
    current: Option<OpenTx>,
    streamed: HashMap<u32, OpenTx>,
    in_stream: Option<u32>,
}

impl Assembler {
    pub(crate) fn new(pipeline: &str, db: &str) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            db: db.to_string(),
            current: None,
            streamed: HashMap::new(),
            in_stream: None,
        }
    }

    fn open(&mut self, change_xid: Option<u32>) -> Result<(&mut OpenTx, u32), CaptureError> {
        if let Some(top) = self.in_stream {
            let tx = self.streamed.entry(top).or_insert_with(|| OpenTx {
                xid: top,
                ..OpenTx::default()
            });
            return Ok((tx, change_xid.unwrap_or(top)));
        }
        match self.current.as_mut() {
            Some(tx) => {
                let xid = tx.xid;
                Ok((tx, xid))
            }
            None => Err(CaptureError::Protocol(
                "change outside of a transaction".into(),
            )),
        }
    }

    pub(crate) fn handle(
        &mut self,
        msg: StreamingReplicationMessage,
        catalog: &Catalog,
    ) -> Result<Decoded, CaptureError> {
        let change_xid = msg.xid;
        match msg.message {
            M::Begin { xid, .. } => {
                self.current = Some(OpenTx {
                    xid,
                    ..OpenTx::default()
                });
            }
            M::Commit {
                end_lsn, timestamp, ..
            } => {
                let tx = self
                    .current
                    .take()
                    .ok_or_else(|| CaptureError::Protocol("commit without begin".into()))?;
                return Ok(self.finish(tx, end_lsn, timestamp));
            }
            M::Origin { origin_name, .. } => {
                if let Ok((tx, _)) = self.open(change_xid) {
                    tx.origin = Some(origin_name);
                }
            }
            M::StreamStart { xid, .. } => {
                self.in_stream = Some(xid);
                self.streamed.entry(xid).or_insert_with(|| OpenTx {
                    xid,
                    ..OpenTx::default()
                });
            }
            M::StreamStop => self.in_stream = None,
            M::StreamCommit {
                xid,
                end_lsn,
                timestamp,
                ..
            } => {
                let tx = self.streamed.remove(&xid).unwrap_or(OpenTx {
                    xid,
                    ..OpenTx::default()
                });
                return Ok(self.finish(tx, end_lsn, timestamp));
            }
            M::StreamAbort {
                xid,
                subtransaction_xid,
                ..
            } => self.abort_streamed(xid, subtransaction_xid),
            // Non-transactional (flags bit 0 clear) heartbeats are sent as they are decoded,
            // between transactions in the output, so everything before them has been sent.
            M::Message {
                flags, lsn, prefix, ..
            } if flags & 1 == 0 && prefix == HEARTBEAT_PREFIX => {
                return Ok(Decoded::Heartbeat { lsn });
            }
            // Transactional watermarks travel with their transaction and count at its commit.
            M::Message {
                flags,
                prefix,
                content,
                ..
            } if flags & 1 == 1 && prefix == WATERMARK_PREFIX => {
                let text = String::from_utf8_lossy(&content).into_owned();
                if let Ok((tx, x)) = self.open(change_xid) {
                    tx.watermarks.push((x, text));
                }
            }
            other => self.change(change_xid, other, catalog)?,
        }
        Ok(Decoded::Nothing)
    }

    /// StreamAbort: drops the streamed transaction, or only the aborted subtransaction's changes.
    fn abort_streamed(&mut self, xid: u32, subtransaction_xid: u32) {
        if xid == subtransaction_xid {
            self.streamed.remove(&xid);
        } else if let Some(tx) = self.streamed.get_mut(&xid) {
            tx.events.retain(|(x, _)| *x != subtransaction_xid);
            tx.watermarks.retain(|(x, _)| *x != subtransaction_xid);
        }
    }

    /// A row change (Insert, Update, Delete, Truncate): its events join the open transaction.
    fn change(
        &mut self,
        change_xid: Option<u32>,
        message: M,
        catalog: &Catalog,
    ) -> Result<(), CaptureError> {
        match message {
            M::Insert { relation_id, tuple } => {
                let rel = self.relation(catalog, relation_id)?;
                let after = to_row(&rel, &tuple)?;
                let ev = self.event(rel, Op::Create, None, Some(after));
                self.open(change_xid)?.push(ev);
            }
            M::Update {
                relation_id,
                old_tuple,
                new_tuple,
                ..
            } => {
                let rel = self.relation(catalog, relation_id)?;
                let after = to_row(&rel, &new_tuple)?;
                let before = old_tuple.map(|t| to_row(&rel, &t)).transpose()?;
                let key_changed = before.as_ref().is_some_and(|b| {
                    rel.columns.iter().enumerate().any(|(i, c)| {
                        c.is_key && after[i] != Value::UnchangedToast && b[i] != after[i]
                    })
                });
                let evs = if key_changed {
                    // A primary-key change is a delete of the old key plus a create of the new.
                    vec![
                        self.event(rel.clone(), Op::Delete, before, None),
                        self.event(rel, Op::Create, None, Some(after)),
                    ]
                } else {
                    vec![self.event(rel, Op::Update, before, Some(after))]
                };
                let (tx, x) = self.open(change_xid)?;
                tx.events.extend(evs.into_iter().map(|e| (x, e)));
            }
            M::Delete {
                relation_id,
                old_tuple,
                ..
            } => {
                let rel = self.relation(catalog, relation_id)?;
                let before = to_row(&rel, &old_tuple)?;
                let ev = self.event(rel, Op::Delete, Some(before), None);
                self.open(change_xid)?.push(ev);
            }
            M::Truncate { relation_ids, .. } => {
                let mut evs = Vec::new();
                for oid in relation_ids {
                    // Only published tables are in the message; each had a Relation message.
                    if let Some(rel) = catalog.relation(oid) {
                        evs.push(self.event(rel.clone(), Op::Truncate, None, None));
                    }
                }
                let (tx, x) = self.open(change_xid)?;
                tx.events.extend(evs.into_iter().map(|e| (x, e)));
            }
            // Relation is handled by the caller (it needs catalog IO); Type carries nothing we use;
            // two-phase messages are not requested.
            _ => {}
        }
        Ok(())
    }

    fn relation(&self, catalog: &Catalog, oid: u32) -> Result<Arc<Relation>, CaptureError> {
        catalog.relation(oid).cloned().ok_or_else(|| {
            CaptureError::Protocol(format!(
                "change for relation {oid} before its Relation message"
            ))
        })
    }

    fn event(
        &self,
        rel: Arc<Relation>,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
    ) -> ChangeEvent {
        ChangeEvent {
            relation: rel,
            op,
            before,
            after,
            source: Source {
                connector: crate::event::change::CONNECTOR_WAL,
                pipeline: self.pipeline.clone(),
                db: self.db.clone(),
                lsn: 0,
                tx_id: None,
                commit_ts_ms: 0,
                origin: None,
                snapshot: false,
            },
            ts_ms: 0,
        }
    }

    fn finish(&mut self, tx: OpenTx, end_lsn: u64, timestamp: i64) -> Decoded {
        let commit_ts_ms = pg_ts_to_unix_ms(timestamp);
        let now = now_ms();
        let events = tx
            .events
            .into_iter()
            .map(|(_, mut e)| {
                e.source.lsn = end_lsn;
                e.source.tx_id = Some(tx.xid);
                e.source.commit_ts_ms = commit_ts_ms;
                e.source.origin = tx.origin.clone();
                e.ts_ms = now;
                e
            })
            .collect();
        Decoded::Committed {
            events,
            end_lsn,
            commit_ts_ms,
            watermarks: tx.watermarks.into_iter().map(|(_, w)| w).collect(),
        }
    }
}

trait Push {
    fn push(self, ev: ChangeEvent);
}

impl Push for (&mut OpenTx, u32) {
    fn push(self, ev: ChangeEvent) {
        self.0.events.push((self.1, ev));
    }
}

/// One tuple → one row image in relation column order. Never panics on server bytes.
fn to_row(rel: &Relation, tuple: &TupleData) -> Result<Row, CaptureError> {
    if tuple.columns.len() != rel.columns.len() {
        return Err(CaptureError::Protocol(format!(
            "tuple of {}.{} has {} columns, relation version {} has {}",
            rel.schema,
            rel.name,
            tuple.columns.len(),
            rel.version,
            rel.columns.len()
        )));
    }
    tuple
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| match c.data_type {
            b'n' => Ok(Value::Null),
            b'u' => Ok(Value::UnchangedToast),
            b't' => c
                .as_str()
                .map(|s| Value::Text(s.into_owned()))
                .ok_or_else(|| {
                    CaptureError::Protocol(format!(
                        "column {} of {}.{} is not valid UTF-8",
                        rel.columns[i].name, rel.schema, rel.name
                    ))
                }),
            other => Err(CaptureError::Protocol(format!(
                "unexpected tuple data kind {other:#x} in column {} of {}.{}",
                rel.columns[i].name, rel.schema, rel.name
            ))),
        })
        .collect()
}
