//! Planning a flush stage: for each pending row, route it to its list, map it
//! ([`project`](super::project)) and compare it with the row's ledger entry; the difference
//! becomes the [`Op`]s to send (creates, field-level PATCHes, deletes, moves) or nothing at all.
//!
//! Invariants kept here:
//! - *Idempotent replays*: a pending write older than the ledger's LSN for the row is skipped;
//!   an unchanged projection (same hash) costs no write.
//! - *Never two items, never none*: before a create the row's entry gets an *intent* (recorded
//!   before the create is sent, see [`flush`](super::flush)); an open intent is resolved first
//!   (the create may have landed: the item is found by `SyncKey` and adopted or deleted). A
//!   route change is a create in the new list that remembers the old item (`move_from`).
//! - Fields of an update whose outcome was never recorded (`in_flight`) are always sent again.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use super::flush::Stage;
use super::{Desired, Pending, Processor, ProjectError, diff, hash_projection};
use crate::config::{FieldMapping, FieldType, SYNC_KEY_FIELD};
use crate::graph::GraphError;
use crate::log::EventLog;
use crate::process::ledger::{Entry, Intent, ItemRef};
use crate::process::row::{Cell, Row};
use crate::process::{MAX_LOOKUP_DEFERRALS, ProcessError};

/// One write to send for a row (by its ledger key).
#[derive(Debug, Clone)]
pub(crate) struct Op {
    pub(crate) key: Vec<u8>,
    pub(crate) kind: OpKind,
}

/// What to write.
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

impl OpKind {
    /// The write's name in metrics and dead letters.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            OpKind::Create { .. } => "create",
            OpKind::Update { .. } => "update",
            OpKind::Delete { .. } => "delete",
        }
    }
}

/// A row as it should be in the list.
struct Wanted {
    list_id: String,
    projection: BTreeMap<String, Json>,
    hash: String,
}

/// The fields of a create: the projection without nulls, plus the row's `SyncKey`.
pub(super) fn create_fields(
    projection: &BTreeMap<String, Json>,
    sync_key: &str,
) -> Map<String, Json> {
    let mut f: Map<String, Json> = projection
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    f.insert(SYNC_KEY_FIELD.into(), Json::String(sync_key.to_string()));
    f
}

/// The row as routing sees it: an unchanged TOAST value (of a table that is not `REPLICA
/// IDENTITY FULL`) is taken from the ledger's projection where the field holds the column's
/// text, so a route on it decides as it did when the value was written, never on a `null`
/// that would move the item.
pub(super) fn route_view<'r>(fields: &[FieldMapping], row: &'r Row, entry: &Entry) -> Cow<'r, Row> {
    if !row.values().any(|c| matches!(c, Cell::Unchanged)) {
        return Cow::Borrowed(row);
    }
    let mut out = row.clone();
    for f in fields {
        if !matches!(out.get(&f.column), Some(Cell::Unchanged)) {
            continue;
        }
        let cell = match (f.field_type, entry.projection.get(&f.field)) {
            (FieldType::Text | FieldType::Note | FieldType::Choice, Some(Json::String(s))) => {
                Cell::Text(s.clone())
            }
            (FieldType::MultiChoice, Some(Json::Array(a))) => Cell::Array(
                a.iter()
                    .filter_map(Json::as_str)
                    .map(|s| Cell::Text(s.to_string()))
                    .collect(),
            ),
            _ => continue,
        };
        out.insert(f.column.clone(), cell);
    }
    Cow::Owned(out)
}

impl<L: EventLog + 'static> Processor<L> {
    /// Plans one row: skipped when the ledger is newer, else its delete or upsert. Fails only
    /// for what fails the whole stage (the ledger, a list that was not provisioned).
    pub(super) async fn plan_row(
        &mut self,
        stage: &mut Stage,
        k: Vec<u8>,
    ) -> Result<(), ProcessError> {
        let Some(p) = self.pending.get(&k).cloned() else {
            return Ok(());
        };
        let entry = self.ledger.get(&k)?.unwrap_or_default();
        if p.lsn != 0 && entry.lsn > p.lsn {
            self.stats.skipped_stale += 1;
            self.skip_metric("stale");
            stage.done.push(k);
            return Ok(());
        }
        match &p.desired {
            Desired::Delete => self.plan_delete(stage, k, &p, entry).await,
            Desired::Upsert(row) => self.plan_upsert(stage, k, &p, row, entry).await?,
        }
        Ok(())
    }

    /// A deleted row: delete its item and a moved row's old item; nothing to delete removes
    /// the entry at once.
    async fn plan_delete(&mut self, stage: &mut Stage, k: Vec<u8>, p: &Pending, mut entry: Entry) {
        if let Some(intent) = entry.intent.take() {
            // A create may have reached SharePoint before a crash: find it to delete it.
            let landed = self
                .adopt_landed(&mut entry, &intent.create_in, &p.sync_key)
                .await;
            if let Err(e) = landed {
                stage.transient.get_or_insert(e.to_string());
                return;
            }
        }
        let mut any = false;
        if let Some(item) = entry.item.clone() {
            stage.ops.push(Op {
                key: k.clone(),
                kind: OpKind::Delete {
                    item,
                    old_of_move: false,
                },
            });
            any = true;
        }
        if let Some(item) = entry.pending_delete.clone() {
            stage.ops.push(Op {
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
            stage.intents.push((k.clone(), None));
            stage.done.push(k.clone());
        }
        stage.entries.insert(k, entry);
    }

    /// A created or updated row: route and map it, resolve an open intent for another list,
    /// then update the item in place or create one (a new row, a move, an open intent).
    async fn plan_upsert(
        &mut self,
        stage: &mut Stage,
        k: Vec<u8>,
        p: &Pending,
        row: &Row,
        mut entry: Entry,
    ) -> Result<(), ProcessError> {
        let ti = p.table;
        let table = self.tables[ti].table.clone();
        let routed = route_view(&self.tables[ti].entry.fields, row, &entry);
        let list_name = self.tables[ti].router.route(&table, &routed).to_string();
        let Some(list_id) = self.targets.list_id(&list_name).map(str::to_owned) else {
            return Err(ProcessError::Config(format!(
                "list {list_name:?} was not provisioned"
            )));
        };
        self.count_held_pull_only(ti, row, &entry);
        let projection = match self.project(ti, row, &entry).await {
            Ok(pr) => pr,
            Err(e) => {
                self.unprojectable(stage, k, p, list_name, e);
                return Ok(());
            }
        };
        let hash = hash_projection(&projection);
        // An open intent for another list (the route changed since a create whose outcome was
        // never recorded): that create may have landed. Find it, so it is moved from / deleted
        // like any other item of the row, never left behind.
        if let Some(intent) = entry.intent.clone().filter(|i| i.create_in != list_id) {
            match self
                .adopt_landed(&mut entry, &intent.create_in, &p.sync_key)
                .await
            {
                Ok(true) => {
                    entry.hash = None;
                    entry.projection.clear();
                }
                Ok(false) => {}
                Err(e) => {
                    stage.transient.get_or_insert(e.to_string());
                    return Ok(());
                }
            }
            entry.intent = None;
        }
        let wanted = Wanted {
            list_id,
            projection,
            hash,
        };
        match entry.item.clone() {
            Some(item) if item.list_id == wanted.list_id && entry.intent.is_none() => {
                self.plan_update(stage, &k, p, &mut entry, item, wanted);
            }
            other => plan_create(stage, &k, p, &mut entry, other, wanted),
        }
        stage.entries.insert(k, entry);
        Ok(())
    }

    /// The item is in the right list: PATCH the fields that differ from the ledger's
    /// projection (and any still in flight), delete a moved row's old item, or nothing.
    fn plan_update(
        &mut self,
        stage: &mut Stage,
        k: &[u8],
        p: &Pending,
        entry: &mut Entry,
        item: ItemRef,
        wanted: Wanted,
    ) {
        let Wanted {
            projection, hash, ..
        } = wanted;
        if let Some(old) = entry.pending_delete.clone() {
            stage.ops.push(Op {
                key: k.to_vec(),
                kind: OpKind::Delete {
                    item: old,
                    old_of_move: true,
                },
            });
        }
        // Fields of an update whose outcome was never recorded (a crash between Graph's answer
        // and the ledger) may hold either value in the item: they are always sent again.
        let uncertain = !entry.in_flight.is_empty();
        let table = &self.tables[p.table].table;
        if !uncertain && entry.hash.as_deref() == Some(hash.as_str()) {
            self.stats.skipped_ledger += 1;
            self.skip_metric("unchanged");
            stage.audit.extend(self.skip_record(table, p, entry));
            if entry.pending_delete.is_none() {
                stage.done.push(k.to_vec());
            }
            return;
        }
        let mut fields = diff(&entry.projection, &projection);
        for f in &entry.in_flight {
            if let Some(v) = projection.get(f) {
                fields.insert(f.clone(), v.clone());
            }
        }
        if fields.is_empty() {
            self.stats.skipped_ledger += 1;
            self.skip_metric("unchanged");
            stage.audit.extend(self.skip_record(table, p, entry));
            if uncertain {
                entry.clear_in_flight();
                stage.intents.push((k.to_vec(), Some(entry.clone())));
            }
            stage.done.push(k.to_vec());
            return;
        }
        // Recorded before the PATCH is sent (with the intents).
        entry.send(&fields);
        entry.hash = None;
        stage.intents.push((k.to_vec(), Some(entry.clone())));
        let if_match = if self.tables[p.table].entry.pull.enabled {
            entry.etag.clone()
        } else {
            None
        };
        stage.ops.push(Op {
            key: k.to_vec(),
            kind: OpKind::Update {
                item,
                fields,
                projection,
                hash,
                if_match,
            },
        });
    }

    /// A row that cannot be mapped now: unmappable values are dead-lettered; a lookup target
    /// without an item defers the row, and dead-letters it after [`MAX_LOOKUP_DEFERRALS`]
    /// flushes; a Graph failure (a person lookup) is retryable.
    fn unprojectable(
        &mut self,
        stage: &mut Stage,
        k: Vec<u8>,
        p: &Pending,
        list_name: String,
        e: ProjectError,
    ) {
        let (kind, why) = match e {
            ProjectError::Unmappable(u) => (u.kind, u.to_string()),
            ProjectError::Defer(why) => {
                let pm = self.pending.get_mut(&k).expect("pending");
                pm.deferrals += 1;
                if pm.deferrals <= MAX_LOOKUP_DEFERRALS {
                    return;
                }
                ("lookup_missing", why)
            }
            ProjectError::Graph(e) => {
                stage.transient.get_or_insert(e.to_string());
                return;
            }
        };
        let table = self.tables[p.table].table.clone();
        let mut d = self.dead_letter(&table, &p.sync_key, kind, why, &p.last);
        d.list = Some(list_name);
        stage.dead.push(d);
        stage.dead_rows += 1;
        stage.done.push(k);
    }

    /// Resolves an open intent's create that may have landed (a crash before its outcome was
    /// recorded): the item found by `SyncKey` in `create_in` becomes the row's item, and the
    /// item it replaces (in another list) is remembered for deletion. `false`: none landed.
    async fn adopt_landed(
        &self,
        entry: &mut Entry,
        create_in: &str,
        sync_key: &str,
    ) -> Result<bool, GraphError> {
        let Some(id) = self.find_by_sync_key(create_in, sync_key).await? else {
            return Ok(false);
        };
        let landed = ItemRef {
            list_id: create_in.to_string(),
            item_id: id,
        };
        if let Some(old) = entry.item.replace(landed)
            && old.list_id != create_in
        {
            entry.pending_delete = Some(old);
        }
        Ok(true)
    }
}

/// No item in the wanted list yet (a new row, a move, or an open intent): create one, with an
/// intent recorded first. A create that already happened is caught by the unique `SyncKey`
/// and adopted ([`outcome`](super::outcome)).
fn plan_create(
    stage: &mut Stage,
    k: &[u8],
    p: &Pending,
    entry: &mut Entry,
    current: Option<ItemRef>,
    wanted: Wanted,
) {
    let move_from = current.filter(|i| i.list_id != wanted.list_id);
    entry.intent = Some(Intent {
        create_in: wanted.list_id.clone(),
    });
    stage.intents.push((k.to_vec(), Some(entry.clone())));
    stage.ops.push(Op {
        key: k.to_vec(),
        kind: OpKind::Create {
            fields: create_fields(&wanted.projection, &p.sync_key),
            list_id: wanted.list_id,
            projection: wanted.projection,
            hash: wanted.hash,
            move_from,
        },
    });
}
