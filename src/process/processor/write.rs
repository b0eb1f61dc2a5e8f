//! Sending writes: a flush stage's [`Op`]s run as Graph `$batch` requests (at most
//! [`MAX_BATCH`] each, `batch_concurrency` in flight, rate-limited by the tenant's limiter in
//! the client), and each answer is classified into an [`Outcome`] the processor can act on.
//!
//! Invariant (*never two items*): a create is only ever retried as a create; the unique
//! `SyncKey` column turns a second create into [`Outcome::Duplicate`], and
//! [`Processor::find_by_sync_key`] finds the item the earlier attempt made. An envelope that
//! failed as a whole tells nothing about its requests: each is `Transient` and stays pending.

use futures::StreamExt;
use serde_json::Value as Json;

use super::{Op, OpKind, Processor};
use crate::config::SYNC_KEY_FIELD;
use crate::graph::{BatchRequest, GraphError, ItemQuery, MAX_BATCH};
use crate::log::EventLog;
use crate::process::audit::GraphTrace;
use crate::telemetry::metrics as m;

/// What a Graph write came back with, classified for the processor.
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok {
        body: Option<Json>,
    },
    NotFound,
    /// The create hit the unique `SyncKey`: an earlier attempt already created the item.
    Duplicate,
    /// 412: the item changed in the list since our last write (conditional PATCH).
    Stale,
    Rejected {
        message: String,
        request_id: Option<String>,
        client_request_id: String,
        status: u16,
    },
    Transient(String),
}

impl<L: EventLog + 'static> Processor<L> {
    /// Runs `ops` as `$batch`es (≤ 20 each, a few in flight); one outcome per op, in order, with
    /// the request that answered it (for the audit trail).
    pub(crate) async fn execute(&self, ops: &[Op]) -> Vec<(Outcome, GraphTrace)> {
        let site = self.targets.site_id.clone();
        let reqs: Vec<BatchRequest> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let id = (i % MAX_BATCH).to_string();
                match &op.kind {
                    OpKind::Create {
                        list_id, fields, ..
                    } => BatchRequest::create_item(id, &site, list_id, fields.clone()),
                    OpKind::Update {
                        item,
                        fields,
                        if_match,
                        ..
                    } => BatchRequest::update_fields(
                        id,
                        &site,
                        &item.list_id,
                        &item.item_id,
                        fields.clone(),
                        if_match.clone(),
                    ),
                    OpKind::Delete { item, .. } => {
                        BatchRequest::delete_item(id, &site, &item.list_id, &item.item_id, None)
                    }
                }
            })
            .collect();
        let chunks: Vec<(usize, Vec<BatchRequest>)> = reqs
            .chunks(MAX_BATCH)
            .enumerate()
            .map(|(i, c)| (i, c.to_vec()))
            .collect();
        let client = self.client.clone();
        let mut results: Vec<(usize, Vec<(Outcome, GraphTrace)>)> = futures::stream::iter(chunks)
            .map(|(i, chunk)| {
                let client = client.clone();
                async move {
                    let outcomes = match client.execute_batch_with_retries(&chunk).await {
                        Ok(outs) => outs
                            .into_iter()
                            .map(|o| {
                                let trace = GraphTrace {
                                    request_id: o.lineage.request_id.clone(),
                                    client_request_id: Some(o.lineage.client_request_id.clone()),
                                    status: Some(o.status).filter(|s| *s != 0),
                                };
                                (classify(o), trace)
                            })
                            .collect(),
                        // The whole envelope failed: nothing is known about any request in it, so
                        // each stays pending (creates are safe to retry thanks to SyncKey).
                        Err(e) => chunk
                            .iter()
                            .map(|_| (Outcome::Transient(e.to_string()), GraphTrace::default()))
                            .collect(),
                    };
                    (i, outcomes)
                }
            })
            .buffer_unordered(self.cfg.batch_concurrency.max(1))
            .collect()
            .await;
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().flat_map(|(_, o)| o).collect()
    }

    /// The item of `list_id` whose `SyncKey` is `sync_key`, if any.
    pub(crate) async fn find_by_sync_key(
        &self,
        list_id: &str,
        sync_key: &str,
    ) -> Result<Option<String>, GraphError> {
        let query = ItemQuery {
            filter: Some(format!(
                "fields/{SYNC_KEY_FIELD} eq '{}'",
                sync_key.replace('\'', "''")
            )),
            select: Some(vec![SYNC_KEY_FIELD.to_string()]),
            limit: 2,
            ..ItemQuery::default()
        };
        let items = self
            .client
            .list_items(&self.targets.site_id, list_id, &query)
            .await?;
        Ok(items.into_iter().next().map(|i| i.id))
    }

    /// Counts one write by kind (`create`, `update`, `delete`) and outcome.
    pub(crate) fn write_metric(&self, kind: &'static str, outcome: &'static str) {
        metrics::counter!(m::PUSH_WRITES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "kind" => kind, "outcome" => outcome)
            .increment(1);
    }
}

/// Classifies one `$batch` answer.
fn classify(o: crate::graph::BatchOutcome) -> Outcome {
    match o.result {
        Ok(()) => Outcome::Ok { body: o.body },
        Err(GraphError::NotFound { .. }) => Outcome::NotFound,
        Err(GraphError::PreconditionFailed { .. }) => Outcome::Stale,
        Err(e) if e.is_retryable() => Outcome::Transient(e.to_string()),
        Err(e) => {
            let text = e.to_string();
            if text.contains("duplicate values") && text.contains(SYNC_KEY_FIELD) {
                return Outcome::Duplicate;
            }
            Outcome::Rejected {
                message: text,
                request_id: o.lineage.request_id.clone(),
                client_request_id: o.lineage.client_request_id.clone(),
                status: o.status,
            }
        }
    }
}
