//! JSON batching (graph-api.md §7): up to 20 writes per `POST /$batch`, outcomes correlated by id.
//!
//! Contract:
//! - [`GraphClient::execute_batch`] rejects an empty batch, more than [`MAX_BATCH`] requests or
//!   duplicate ids (case-insensitive) without sending anything; it charges the sum of the inner
//!   requests' RU as one admission right before sending; the envelope is retried only on 429/503
//!   (it may hold creates).
//! - It returns one [`BatchOutcome`] per request id (responses may come in any order). An inner
//!   429/503 pauses the whole tenant for its `Retry-After` and is reported on that id only.
//! - [`GraphClient::execute_batch_with_retries`] re-batches only the throttled/unavailable inner
//!   requests (plus transient 5xx of idempotent PATCH/DELETE) after the pause, bounded rounds; every
//!   other outcome (success, 4xx → DLQ, 412 → refetch, 404) is final and returned to the caller.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::{GraphClient, Idempotency, Lineage, Req};
use super::error::{ErrorDetail, GraphError, throttle_wait};
use super::limiter::{Cost, RateLimit};
use super::ops::{ListItem, enc_segment, items_path};

/// Graph's limit on requests per `$batch` (§7.1).
pub const MAX_BATCH: usize = 20;

/// One write inside a batch. `url` is relative to the version (`/sites/…`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    pub id: String,
    pub method: Method,
    pub url: String,
    pub body: Option<Value>,
    pub if_match: Option<String>,
}

impl BatchRequest {
    /// `POST …/items {"fields": …}`.
    pub fn create_item(
        id: impl Into<String>,
        site_id: &str,
        list_id: &str,
        fields: Map<String, Value>,
    ) -> BatchRequest {
        BatchRequest {
            id: id.into(),
            method: Method::POST,
            url: items_path(site_id, list_id),
            body: Some(json!({ "fields": fields })),
            if_match: None,
        }
    }

    /// `PATCH …/items/{id}/fields`, optionally with `If-Match`.
    pub fn update_fields(
        id: impl Into<String>,
        site_id: &str,
        list_id: &str,
        item_id: &str,
        fields: Map<String, Value>,
        if_match: Option<String>,
    ) -> BatchRequest {
        BatchRequest {
            id: id.into(),
            method: Method::PATCH,
            url: format!(
                "{}/{}/fields",
                items_path(site_id, list_id),
                enc_segment(item_id)
            ),
            body: Some(Value::Object(fields)),
            if_match,
        }
    }

    /// `DELETE …/items/{id}`, optionally with `If-Match`.
    pub fn delete_item(
        id: impl Into<String>,
        site_id: &str,
        list_id: &str,
        item_id: &str,
        if_match: Option<String>,
    ) -> BatchRequest {
        BatchRequest {
            id: id.into(),
            method: Method::DELETE,
            url: format!("{}/{}", items_path(site_id, list_id), enc_segment(item_id)),
            body: None,
            if_match,
        }
    }

    fn to_json(&self) -> Value {
        let mut headers = Map::new();
        if self.body.is_some() {
            headers.insert("Content-Type".into(), json!("application/json"));
        }
        if let Some(m) = &self.if_match {
            headers.insert("If-Match".into(), json!(m));
        }
        let mut o = Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("method".into(), json!(self.method.as_str()));
        o.insert("url".into(), json!(self.url));
        if !headers.is_empty() {
            o.insert("headers".into(), Value::Object(headers));
        }
        if let Some(b) = &self.body {
            o.insert("body".into(), b.clone());
        }
        Value::Object(o)
    }
}

/// The outcome of one inner request.
#[derive(Debug)]
pub struct BatchOutcome {
    pub id: String,
    pub status: u16,
    /// The inner response body (the item for a create, the field set for an update).
    pub body: Option<Value>,
    /// `Ok` for 2xx; the classified error otherwise.
    pub result: Result<(), GraphError>,
    /// The envelope's `client-request-id` and the inner `request-id` when Graph gave one.
    pub lineage: Lineage,
}

impl BatchOutcome {
    pub fn is_success(&self) -> bool {
        self.result.is_ok()
    }

    /// The created item (for a successful create).
    pub fn item(&self) -> Option<ListItem> {
        let mut it: ListItem = serde_json::from_value(self.body.clone()?).ok()?;
        it.lineage = self.lineage.clone();
        Some(it)
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    responses: Vec<InnerResponse>,
}

#[derive(Debug, Deserialize)]
struct InnerResponse {
    id: String,
    status: u16,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    body: Option<Value>,
}

fn inner_header<'a>(h: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

fn validate(reqs: &[BatchRequest]) -> Result<(), GraphError> {
    if reqs.is_empty() {
        return Err(GraphError::Invalid("empty $batch".into()));
    }
    if reqs.len() > MAX_BATCH {
        return Err(GraphError::Invalid(format!(
            "$batch of {} requests exceeds Graph's limit of {MAX_BATCH}",
            reqs.len()
        )));
    }
    for (i, r) in reqs.iter().enumerate() {
        if r.id.is_empty() {
            return Err(GraphError::Invalid("$batch request without id".into()));
        }
        if reqs[..i].iter().any(|o| o.id.eq_ignore_ascii_case(&r.id)) {
            return Err(GraphError::Invalid(format!(
                "duplicate $batch id {:?}",
                r.id
            )));
        }
    }
    Ok(())
}

impl GraphClient {
    /// Sends one `$batch` (see the module docs). `Err` only when the batch as a whole failed.
    pub async fn execute_batch(
        &self,
        reqs: &[BatchRequest],
    ) -> Result<Vec<BatchOutcome>, GraphError> {
        validate(reqs)?;
        let body =
            json!({ "requests": reqs.iter().map(BatchRequest::to_json).collect::<Vec<_>>() });
        let mut req = Req::new(Method::POST, "/$batch".to_string());
        req.body = Some(&body);
        req.costs = reqs
            .iter()
            .map(|r| Cost::of(r.method.as_str(), &r.url))
            .collect();
        req.idempotency = Idempotency::NonIdempotent;
        let resp = self.execute(&req).await?;
        let env: Envelope = serde_json::from_slice(&resp.body).map_err(|e| GraphError::Decode {
            what: "$batch envelope".into(),
            message: e.to_string(),
        })?;
        let mut by_id: HashMap<String, InnerResponse> = env
            .responses
            .into_iter()
            .map(|r| (r.id.to_ascii_lowercase(), r))
            .collect();
        let mut out = Vec::with_capacity(reqs.len());
        let mut longest: Option<(u16, Duration)> = None;
        for r in reqs {
            let Some(inner) = by_id.remove(&r.id.to_ascii_lowercase()) else {
                // Graph answers every id; a missing one is treated as transient so it is retried.
                out.push(BatchOutcome {
                    id: r.id.clone(),
                    status: 0,
                    body: None,
                    result: Err(GraphError::Transient {
                        status: None,
                        message: "no response for this id in the $batch envelope".into(),
                        request_id: resp.lineage.request_id.clone(),
                    }),
                    lineage: resp.lineage.clone(),
                });
                continue;
            };
            // RateLimit-* ride on inner responses too (they describe the same minute budget).
            if let Some(rl) = RateLimit::parse(|name| inner_header(&inner.headers, name)) {
                self.inner.limiter.observe_rate_limit(resp.mark, &rl);
            }
            let request_id = inner_header(&inner.headers, "request-id")
                .map(str::to_string)
                .or_else(|| resp.lineage.request_id.clone());
            let lineage = Lineage {
                client_request_id: resp.lineage.client_request_id.clone(),
                request_id: request_id.clone(),
            };
            let result = if (200..300).contains(&inner.status) {
                Ok(())
            } else {
                let detail = ErrorDetail::from_json(inner.body.as_ref(), b"", request_id);
                let wait = throttle_wait(
                    inner_header(&inner.headers, "retry-after"),
                    inner_header(&inner.headers, "ratelimit-reset").filter(|_| inner.status == 429),
                );
                let e = GraphError::from_response(inner.status, wait, detail);
                if e.is_throttling() {
                    let w = wait.unwrap_or(self.inner.cfg.backoff_min);
                    if longest.is_none_or(|(_, l)| l < w) {
                        longest = Some((inner.status, w));
                    }
                }
                Err(e)
            };
            out.push(BatchOutcome {
                id: r.id.clone(),
                status: inner.status,
                body: inner.body,
                result,
                lineage,
            });
        }
        if let Some((status, wait)) = longest {
            // One pause for the batch, as long as its longest inner Retry-After (§7.2).
            self.throttled(status, wait, "batch");
        }
        Ok(out)
    }

    /// Runs `reqs` (≤ 20) as `$batch`es until every request has a final outcome: throttled (429/503)
    /// inner requests, and transient 5xx of idempotent ones, are re-batched after the tenant pause
    /// (the longest inner `Retry-After`), at most `max_throttle_retries` extra rounds. Outcomes are
    /// returned in `reqs` order.
    pub async fn execute_batch_with_retries(
        &self,
        reqs: &[BatchRequest],
    ) -> Result<Vec<BatchOutcome>, GraphError> {
        validate(reqs)?;
        let mut finals: HashMap<String, BatchOutcome> = HashMap::with_capacity(reqs.len());
        let mut pending: Vec<BatchRequest> = reqs.to_vec();
        let mut backoff = self.backoff();
        for round in 0..=self.inner.cfg.max_throttle_retries {
            let outcomes = self.execute_batch(&pending).await?;
            let mut again = Vec::new();
            let mut transient = false;
            for (o, r) in outcomes.into_iter().zip(pending.iter()) {
                let retry = match &o.result {
                    Err(e) if e.is_throttling() => true,
                    Err(e) if e.is_retryable() => {
                        // A 5xx may have been applied: only repeat what is safe to repeat.
                        let safe = r.method != Method::POST;
                        transient |= safe;
                        safe
                    }
                    _ => false,
                };
                if retry && round < self.inner.cfg.max_throttle_retries {
                    again.push(r.clone());
                }
                finals.insert(o.id.clone(), o);
            }
            if again.is_empty() {
                break;
            }
            tracing::debug!(
                round,
                retrying = again.len(),
                "graph $batch: re-batching throttled/transient requests"
            );
            if transient && let Some(d) = backoff.next() {
                tokio::time::sleep(d).await;
            }
            pending = again;
        }
        Ok(reqs.iter().filter_map(|r| finals.remove(&r.id)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_is_client_side() {
        let mk = |id: &str| BatchRequest::delete_item(id, "s", "l", "1", None);
        assert!(validate(&[]).is_err());
        assert!(validate(&(0..20).map(|i| mk(&i.to_string())).collect::<Vec<_>>()).is_ok());
        let e = validate(&(0..21).map(|i| mk(&i.to_string())).collect::<Vec<_>>()).unwrap_err();
        assert!(matches!(e, GraphError::Invalid(_)));
        assert!(validate(&[mk("a"), mk("A")]).is_err());
    }

    #[test]
    fn request_json_has_headers_with_body() {
        let mut f = Map::new();
        f.insert("Title".into(), json!("x"));
        let r = BatchRequest::update_fields("1", "h,a,b", "L", "7", f, Some("\"g,1\"".into()));
        let v = r.to_json();
        assert_eq!(v["method"], "PATCH");
        assert_eq!(v["url"], "/sites/h,a,b/lists/L/items/7/fields");
        assert_eq!(v["headers"]["Content-Type"], "application/json");
        assert_eq!(v["headers"]["If-Match"], "\"g,1\"");
        let d = BatchRequest::delete_item("2", "s", "L", "7", None).to_json();
        assert!(d.get("headers").is_none() && d.get("body").is_none());
    }
}
