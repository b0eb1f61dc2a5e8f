//! Applying the answers of a round of writes to the rows' ledger entries (the working copies
//! the round then records, see [`flush`](super::flush)): a created item becomes the row's item,
//! a duplicate create adopts the item an earlier attempt made, a PATCH of a vanished item turns
//! into a create again, a 412 hands the item to the return path's conflict handling, a refusal
//! dead-letters the row. Follow-up writes go to the next round.
//!
//! Invariants kept here:
//! - *Never two items, never none*: a create's intent is cleared only by an answer that names
//!   the item (created, or adopted by `SyncKey`); a move deletes its old item only after the
//!   new one is recorded (`pending_delete` until that delete is done); a re-create records
//!   its intent before it is sent.
//! - *Idempotent replays*: deleting an item that is already gone counts as done.
//! - A write whose answer is unknown ([`Applied::Unfinished`]) leaves the row pending and its
//!   entry unrecorded, so the retry replans it from the last recorded state.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use super::plan::create_fields;
use super::{Op, OpKind, Outcome, Pending, Processor, hash_projection};
use crate::config::SYNC_KEY_FIELD;
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::dlq::DeadLetter;
use crate::process::ledger::{Entry, Intent, ItemRef, Provenance};
use crate::telemetry::metrics as m;

/// One answered write and the state it is applied to.
pub(super) struct Answered<'a> {
    /// The row's ledger key.
    pub(super) key: &'a [u8],
    /// The row's pending write (a copy taken when the answer came).
    pub(super) pending: &'a Pending,
    pub(super) table: &'a str,
    /// The row's working ledger entry; the round records it.
    pub(super) entry: &'a mut Entry,
    /// Follow-up writes for the next round.
    pub(super) next: &'a mut Vec<Op>,
    pub(super) now_ms: i64,
}

impl Answered<'_> {
    fn follow_up(&mut self, kind: OpKind) {
        self.next.push(Op {
            key: self.key.to_vec(),
            kind,
        });
    }
}

/// What applying one answer left for the stage.
pub(super) enum Applied {
    /// The entry holds the step's result; the round records it.
    Recorded,
    /// The write is not settled (retryable, for this reason): the row stays pending and its
    /// entry is not recorded.
    Unfinished(String),
    /// Graph refused the write for good: the row is dead-lettered (its entry is recorded).
    Dead(Box<DeadLetter>),
}

impl<L: EventLog + 'static> Processor<L> {
    /// Applies one write's answer to its row (see the module docs for what each answer means).
    pub(super) async fn apply_outcome(
        &mut self,
        a: &mut Answered<'_>,
        kind: OpKind,
        outcome: Outcome,
    ) -> Result<Applied, ProcessError> {
        match (kind, outcome) {
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
                let written = Written { projection, hash };
                self.created(a, list_id, written, move_from, body);
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
                let written = Written { projection, hash };
                return Ok(self.adopt(a, list_id, written, move_from, fields).await);
            }
            (
                OpKind::Update {
                    item, projection, ..
                },
                Outcome::Ok { body },
            ) => self.updated(a, item, projection, body),
            (
                OpKind::Update {
                    item,
                    projection,
                    hash,
                    ..
                },
                Outcome::NotFound,
            ) => self.recreate(a, item, Written { projection, hash }).await?,
            (OpKind::Delete { item, old_of_move }, Outcome::Ok { .. } | Outcome::NotFound) => {
                self.deleted(a, item, old_of_move);
            }
            (OpKind::Update { item, .. }, Outcome::Stale) => return Ok(self.stale(a, item).await),
            (
                kind,
                Outcome::Rejected {
                    message,
                    request_id,
                    client_request_id,
                    status,
                },
            ) => {
                let mut d = self.rejected(a, kind, message, request_id, client_request_id);
                d.status = Some(status);
                return Ok(Applied::Dead(Box::new(d)));
            }
            (kind, Outcome::Transient(msg)) => {
                self.write_metric(kind.name(), "transient");
                // Stays pending; the intent (for creates) makes the retry safe.
                return Ok(Applied::Unfinished(msg));
            }
            (kind, other) => {
                let why = format!("unexpected outcome {other:?} for {kind:?}");
                return Ok(Applied::Unfinished(why));
            }
        }
        Ok(Applied::Recorded)
    }

    /// Graph refused the write for good: the row is dead-lettered with the request's ids; a
    /// refused create leaves no intent behind (nothing was created).
    fn rejected(
        &self,
        a: &mut Answered<'_>,
        kind: OpKind,
        message: String,
        request_id: Option<String>,
        client_request_id: String,
    ) -> DeadLetter {
        let what = kind.name();
        self.write_metric(what, "rejected");
        if let OpKind::Create { .. } = kind {
            a.entry.intent = None;
        }
        let mut d = self.dead_letter(
            a.table,
            &a.pending.sync_key,
            "graph_rejected",
            format!("{what} rejected: {message}"),
            &a.pending.last,
        );
        d.request_id = request_id;
        d.client_request_id = Some(client_request_id);
        d
    }

    /// The create landed: its item is the row's; a move goes on with deleting the old item.
    fn created(
        &mut self,
        a: &mut Answered<'_>,
        list_id: String,
        written: Written,
        move_from: Option<ItemRef>,
        body: Option<Json>,
    ) {
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
        let ti = a.pending.table;
        if self.tables[ti].has_system_fields
            && let Some(fields) = body.as_ref().and_then(|b| b["fields"].as_object())
        {
            self.system_fill
                .push((ti, a.pending.sync_key.clone(), fields.clone()));
        }
        set_written(
            a.entry,
            ItemRef {
                list_id,
                item_id: id,
            },
            written.projection,
            written.hash,
            etag,
            a.pending.lsn,
            a.now_ms,
        );
        a.entry.intent = None;
        if let Some(old) = move_from {
            self.stats.moves += 1;
            metrics::counter!(m::PUSH_MOVES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone())
                .increment(1);
            a.entry.pending_delete = Some(old.clone());
            a.follow_up(OpKind::Delete {
                item: old,
                old_of_move: true,
            });
        }
    }

    /// The create hit the unique `SyncKey`: an earlier attempt created the item. Adopt that
    /// item, then bring it up to date (its content is unknown, so every field is sent).
    async fn adopt(
        &mut self,
        a: &mut Answered<'_>,
        list_id: String,
        written: Written,
        move_from: Option<ItemRef>,
        fields: Map<String, Json>,
    ) -> Applied {
        let id = match self.find_by_sync_key(&list_id, &a.pending.sync_key).await {
            Ok(Some(id)) => id,
            Ok(None) => {
                return Applied::Unfinished(format!(
                    "{} {}: create reported a duplicate SyncKey but no item has it",
                    a.table, a.pending.sync_key
                ));
            }
            Err(e) => return Applied::Unfinished(e.to_string()),
        };
        self.stats.adopted += 1;
        self.write_metric("create", "adopted");
        let item = ItemRef {
            list_id: list_id.clone(),
            item_id: id,
        };
        a.entry.item = Some(item.clone());
        a.entry.intent = None;
        a.entry.hash = None;
        // Its content is unknown: the next diff must send every field.
        a.entry.projection.clear();
        if let Some(old) = move_from.filter(|o| o.list_id != list_id) {
            a.entry.pending_delete = Some(old.clone());
            a.follow_up(OpKind::Delete {
                item: old,
                old_of_move: true,
            });
        }
        let mut f = fields;
        f.remove(SYNC_KEY_FIELD);
        for (fk, fv) in &written.projection {
            f.insert(fk.clone(), fv.clone());
        }
        a.follow_up(OpKind::Update {
            item,
            fields: f,
            projection: written.projection,
            hash: written.hash,
            if_match: None,
        });
        Applied::Recorded
    }

    /// The PATCH landed: the entry's projection takes the sent fields.
    fn updated(
        &mut self,
        a: &mut Answered<'_>,
        item: ItemRef,
        projection: BTreeMap<String, Json>,
        body: Option<Json>,
    ) {
        self.write_metric("update", "ok");
        self.stats.updates += 1;
        let etag = body
            .as_ref()
            .and_then(|b| b["@odata.etag"].as_str())
            .map(str::to_owned);
        let mut merged = a.entry.projection.clone();
        merged.extend(projection);
        let h = hash_projection(&merged);
        set_written(a.entry, item, merged, h, etag, a.pending.lsn, a.now_ms);
    }

    /// The item was deleted in the list behind our back while the row lives: create it again
    /// (its intent recorded first).
    async fn recreate(
        &mut self,
        a: &mut Answered<'_>,
        item: ItemRef,
        written: Written,
    ) -> Result<(), ProcessError> {
        self.write_metric("update", "not_found");
        a.entry.item = None;
        a.entry.intent = Some(Intent {
            create_in: item.list_id.clone(),
        });
        let fields = create_fields(&written.projection, &a.pending.sync_key);
        self.ledger
            .commit(vec![(a.key.to_vec(), Some(a.entry.clone()))])
            .await?;
        a.follow_up(OpKind::Create {
            list_id: item.list_id,
            fields,
            projection: written.projection,
            hash: written.hash,
            move_from: None,
        });
        Ok(())
    }

    /// A delete is done (or the item was already gone): the row's item, or a moved row's old
    /// item, is forgotten.
    fn deleted(&mut self, a: &mut Answered<'_>, item: ItemRef, old_of_move: bool) {
        self.write_metric("delete", "ok");
        let entry = &mut *a.entry;
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
        entry.lsn = entry.lsn.max(a.pending.lsn);
    }

    /// 412: a person changed the item since our last write. Fetch it and let the next flush
    /// decide the conflict by policy (as a pending list change); the push stays pending.
    async fn stale(&mut self, a: &mut Answered<'_>, item: ItemRef) -> Applied {
        self.write_metric("update", "stale");
        let fetched = self
            .client
            .get_item(&self.targets.site_id, &item.list_id, &item.item_id)
            .await;
        let found = match fetched {
            Ok(found) => found,
            Err(e) => return Applied::Unfinished(e.to_string()),
        };
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
                table: a.pending.table,
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
        Applied::Unfinished(format!(
            "{} {}: item changed in the list since our last write",
            a.table, a.pending.sync_key
        ))
    }
}

/// What a create or update writes: the projection and its hash.
struct Written {
    projection: BTreeMap<String, Json>,
    hash: String,
}

fn set_written(
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
    entry.clear_in_flight();
    entry.etag = etag;
    entry.lsn = entry.lsn.max(lsn);
    entry.provenance = Provenance::Push;
    entry.pushed_at_ms = Some(now_ms);
}
