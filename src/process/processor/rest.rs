//! The second half of a write: the fields Graph refuses (hyperlinks, graph-api.md §5.7) are set
//! through SharePoint REST ([`crate::graph::sharepoint`]) on the item the Graph part created or
//! updated (`ops/docs/hyperlinks.md`).
//!
//! Invariants (why a crash between the two halves loses nothing):
//! - An op's outcome is `Ok` only when its Graph part *and* its REST part landed; until then the
//!   row's ledger entry is not recorded, so it keeps what it had before the op: the open intent
//!   of a create (the retry's create hits the `SyncKey`, adopts the item and sends every field
//!   again, the hyperlink included), or the `in_flight` fields of an update (always sent again).
//! - The REST call sets values: sending it again is harmless.
//! - A retryable REST failure leaves the op `Transient` (the row stays pending); a refused field
//!   (HTTP 200 with `HasException`) is `Rejected` and dead-letters the row, naming the field.
//! - The item's eTag after the REST write is unknown (the write made a new version), so none is
//!   recorded: the next conditional PATCH of such a row is sent without `If-Match`.

use futures::StreamExt;
use serde_json::{Map, Value as Json};

use super::{Op, OpKind, Outcome, Processor};
use crate::config::HyperlinkWrites;
use crate::graph::GraphError;
use crate::graph::sharepoint::{SharePointSite, hyperlink_form_value};
use crate::log::EventLog;
use crate::process::audit::GraphTrace;
use crate::process::ledger::split_key;
use crate::telemetry::metrics as m;

impl<L: EventLog + 'static> Processor<L> {
    /// Splits an op's fields into those Graph writes and the SharePoint REST form values of the
    /// others (`""` clears a field).
    pub(super) fn split_fields(&self, op: &Op) -> (Map<String, Json>, Vec<(String, String)>) {
        let fields = match &op.kind {
            OpKind::Create { fields, .. } | OpKind::Update { fields, .. } => fields,
            OpKind::Delete { .. } => return (Map::new(), Vec::new()),
        };
        let table = split_key(&op.key).and_then(|(t, _)| self.by_table.get(&t).copied());
        let via_graph = self.cfg.pipeline.graph.hyperlinks == HyperlinkWrites::Graph;
        let Some(ti) = table.filter(|_| !via_graph) else {
            return (fields.clone(), Vec::new());
        };
        let mut graph = fields.clone();
        let mut rest = Vec::new();
        for f in &self.tables[ti].push_fields {
            if !f.written_by_sharepoint_rest() {
                continue;
            }
            if let Some(v) = graph.remove(&f.field) {
                rest.push((f.field.clone(), hyperlink_form_value(&v)));
            }
        }
        (graph, rest)
    }

    /// For every op whose Graph part landed and that has REST fields: writes them (a few in
    /// flight, priced and limited like Graph writes). The op's outcome becomes the REST call's
    /// when that fails; see the module docs.
    pub(super) async fn write_rest(
        &self,
        ops: &[Op],
        rest: &[Vec<(String, String)>],
        mut outcomes: Vec<(Outcome, GraphTrace)>,
    ) -> Vec<(Outcome, GraphTrace)> {
        let todo: Vec<(usize, String, String)> = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| !rest[*i].is_empty())
            .filter_map(|(i, op)| match (&op.kind, &outcomes[i].0) {
                (OpKind::Create { list_id, .. }, Outcome::Ok { body }) => {
                    let id = body.as_ref()?.get("id")?.as_str()?.to_string();
                    Some((i, list_id.clone(), id))
                }
                (OpKind::Update { item, .. }, Outcome::Ok { .. }) => {
                    Some((i, item.list_id.clone(), item.item_id.clone()))
                }
                _ => None,
            })
            .collect();
        if todo.is_empty() {
            return outcomes;
        }
        let site = match self.sharepoint_site() {
            Ok(s) => s,
            Err(e) => {
                for (i, _, _) in &todo {
                    outcomes[*i] = (Outcome::Transient(e.to_string()), GraphTrace::default());
                }
                return outcomes;
            }
        };
        let answers: Vec<(usize, Result<_, GraphError>)> = futures::stream::iter(todo)
            .map(|(i, list_id, item_id)| {
                let site = &site;
                let values = &rest[i];
                async move {
                    let r = self
                        .client
                        .validate_update_list_item(site, &list_id, &item_id, values)
                        .await;
                    (i, r)
                }
            })
            .buffer_unordered(self.cfg.batch_concurrency.max(1))
            .collect()
            .await;
        for (i, answer) in answers {
            let (outcome, trace) = &mut outcomes[i];
            let label = match &answer {
                Ok(_) => "ok",
                Err(e) if e.is_retryable() => "transient",
                Err(_) => "refused",
            };
            metrics::counter!(m::PUSH_REST_WRITES_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "outcome" => label)
                .increment(1);
            match answer {
                Ok((_, lineage)) => {
                    forget_etag(outcome);
                    if trace.client_request_id.is_none() {
                        // Only the REST call was sent (an update of REST fields only).
                        trace.request_id = lineage.request_id;
                        trace.client_request_id = Some(lineage.client_request_id);
                        trace.status = Some(200);
                    }
                }
                Err(e) => *outcome = rest_failure(e),
            }
        }
        outcomes
    }

    /// The site's REST root and token scope.
    fn sharepoint_site(&self) -> Result<SharePointSite, GraphError> {
        let web_url = self.targets.web_url.as_deref().ok_or_else(|| {
            GraphError::Invalid("the site has no webUrl: cannot reach its SharePoint REST".into())
        })?;
        SharePointSite::new(web_url, self.cfg.pipeline.graph.sharepoint_url.as_ref())
    }
}

/// The REST write made a new version of the item: the eTag Graph answered is no longer its.
fn forget_etag(outcome: &mut Outcome) {
    if let Outcome::Ok { body: Some(b) } = outcome
        && let Some(o) = b.as_object_mut()
    {
        o.remove("eTag");
        o.remove("@odata.etag");
    }
}

fn rest_failure(e: GraphError) -> Outcome {
    if e.is_retryable() {
        return Outcome::Transient(format!("SharePoint REST: {e}"));
    }
    let (request_id, status) = match &e {
        GraphError::Client4xx {
            request_id, status, ..
        } => (request_id.clone(), *status),
        GraphError::Auth { status, .. } => (None, *status),
        _ => (None, 0),
    };
    Outcome::Rejected {
        message: format!("SharePoint REST (hyperlink fields): {e}"),
        request_id,
        client_request_id: String::new(),
        status,
    }
}
