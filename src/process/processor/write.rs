//! Sending writes: a flush stage's [`Op`]s run as Graph `$batch` requests (at most
//! [`MAX_BATCH`] each, `batch_concurrency` in flight, rate-limited by the tenant's limiter in
//! the client), and each answer is classified into an [`Outcome`] the processor can act on.
//!
//! Invariant (*never two items*): a create is only ever retried as a create; the unique
//! `SyncKey` column turns a second create into [`Outcome::Duplicate`], and
//! [`Processor::find_by_sync_key`] finds the item the earlier attempt made. An envelope that
//! failed as a whole tells nothing about its requests: each is `Transient` and stays pending.
//!
//! Fields Graph refuses (hyperlinks) are taken out of the Graph body and written afterwards
//! through SharePoint REST ([`rest`](super::rest)); an op's outcome is `Ok` only when both parts
//! landed, so the ledger never records a hyperlink that is not in the list.

use futures::StreamExt;
use serde_json::{Map, Value as Json};

use super::{Op, OpKind, Processor};
use crate::config::SYNC_KEY_FIELD;
use crate::graph::{BatchRequest, GraphError, ItemQuery, MAX_BATCH};
use crate::log::EventLog;
use crate::process::audit::GraphTrace;
use crate::telemetry::metrics as m;

/// An op's fields for Graph, and the SharePoint REST form values of the others.
type Split = (Map<String, Json>, Vec<(String, String)>);

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
    /// Runs `ops`: their Graph part as `$batch`es (≤ 20 each, a few in flight), then the fields
    /// Graph refuses through SharePoint REST ([`rest`](super::rest)); one outcome per op, in
    /// order, with the request that answered it (for the audit trail).
    pub(crate) async fn execute(&self, ops: &[Op]) -> Vec<(Outcome, GraphTrace)> {
        let split: Vec<Split> = ops.iter().map(|op| self.split_fields(op)).collect();
        // An update of REST fields only has nothing to send to Graph.
        let to_graph: Vec<usize> = (0..ops.len())
            .filter(|&i| {
                !(matches!(ops[i].kind, OpKind::Update { .. }) && split[i].0.is_empty())
                    || split[i].1.is_empty()
            })
            .collect();
        let site = self.targets.site_id.clone();
        let reqs: Vec<BatchRequest> = to_graph
            .iter()
            .enumerate()
            .map(|(n, &i)| {
                let id = (n % MAX_BATCH).to_string();
                let fields = split[i].0.clone();
                match &ops[i].kind {
                    OpKind::Create { list_id, .. } => {
                        BatchRequest::create_item(id, &site, list_id, fields)
                    }
                    OpKind::Update { item, if_match, .. } => BatchRequest::update_fields(
                        id,
                        &site,
                        &item.list_id,
                        &item.item_id,
                        fields,
                        if_match.clone(),
                    ),
                    OpKind::Delete { item, .. } => {
                        BatchRequest::delete_item(id, &site, &item.list_id, &item.item_id, None)
                    }
                }
            })
            .collect();
        let mut answers = self.send_batches(reqs).await.into_iter();
        let mut outcomes: Vec<(Outcome, GraphTrace)> = (0..ops.len())
            .map(|_| (Outcome::Ok { body: None }, GraphTrace::default()))
            .collect();
        for &i in &to_graph {
            if let Some(a) = answers.next() {
                outcomes[i] = a;
            }
        }
        let rest: Vec<Vec<(String, String)>> = split.into_iter().map(|(_, r)| r).collect();
        if rest.iter().any(|r| !r.is_empty()) {
            // Between the two halves of a write: the crash `rest` must survive.
            self.failpoints.hit("push.before_rest");
        }
        self.write_rest(ops, &rest, outcomes).await
    }

    /// Sends `reqs` as `$batch`es, a few in flight; one classified answer per request, in order.
    async fn send_batches(&self, reqs: Vec<BatchRequest>) -> Vec<(Outcome, GraphTrace)> {
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
