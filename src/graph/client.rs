//! The HTTP core: one request = limiter admission → token → send → classify → retry policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::time::Instant;
use url::Url;

use super::auth::{Credential, GRAPH_DEFAULT_SCOPE, TokenProvider};
use super::error::{ErrorDetail, GraphError, throttle_wait};
use super::limiter::{Cost, Lane, LimiterConfig, LimiterRegistry, RateLimit, TenantLimiter};
use crate::config::{GraphConfig, GraphCredential};
use crate::telemetry::metrics as m;

/// `User-Agent` decoration Microsoft asks for (graph-api.md §8.7); undecorated traffic is
/// deprioritised under load.
pub const USER_AGENT: &str = concat!("NONISV|SyncBridge|SyncBridge/", env!("CARGO_PKG_VERSION"));
/// Whole-request timeout: Graph answers in well under a second normally; 30 s catches hung
/// connections without cutting off a slow large page.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout: a TCP/TLS handshake that takes longer is a network problem, retry it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of transient failures (timeouts, resets, 5xx) per request before giving up; with the
/// backoff below that is ~30 s of trying, after which the caller's own retry/DLQ takes over.
pub const DEFAULT_MAX_TRANSIENT_RETRIES: usize = 5;
/// Retries after a 429/503 per request. Each waits the server's `Retry-After` (which can be
/// minutes), so this bounds the time one request can block, not the load on the server.
pub const DEFAULT_MAX_THROTTLE_RETRIES: usize = 8;
/// Exponential backoff bounds for transient failures (doubling, with jitter).
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(16);

/// Everything a [`GraphClient`] needs. Build it from the pipeline's [`GraphConfig`] with `From`.
#[derive(Debug, Clone)]
pub struct GraphClientConfig {
    /// Graph root including the version, e.g. `https://graph.microsoft.com/v1.0`.
    pub base_url: Url,
    /// Token endpoint with the tenant substituted.
    pub token_url: Url,
    pub tenant: String,
    pub client_id: String,
    /// The client secret from the pipeline config, or a certificate set by the caller.
    pub credential: Credential,
    pub scope: String,
    /// Root of SharePoint's REST API (`graph.sharepoint_url`); `None`: `https://` + the site's
    /// host name ([`crate::graph::sharepoint`]).
    pub sharepoint_url: Option<Url>,
    pub limiter: LimiterConfig,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_transient_retries: usize,
    pub max_throttle_retries: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl From<&GraphConfig> for GraphClientConfig {
    fn from(g: &GraphConfig) -> GraphClientConfig {
        GraphClientConfig {
            base_url: g.base_url.clone(),
            token_url: g.token_url.clone(),
            tenant: g.tenant.clone(),
            client_id: g.client_id.clone(),
            credential: match &g.credential {
                GraphCredential::ClientSecret(s) => Credential::Secret(s.clone()),
                GraphCredential::ClientCertificate { cert, key } => Credential::CertificateFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                },
            },
            scope: GRAPH_DEFAULT_SCOPE.to_string(),
            sharepoint_url: g.sharepoint_url.clone(),
            limiter: LimiterConfig::new(g.ru_per_minute),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_transient_retries: DEFAULT_MAX_TRANSIENT_RETRIES,
            max_throttle_retries: DEFAULT_MAX_THROTTLE_RETRIES,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// Which failures a request may be retried on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotency {
    /// GET, PATCH, DELETE: repeating is harmless; retry throttling and transient failures.
    Idempotent,
    /// POST creates and `$batch`: retry only 429/503 (rejected before being applied). A transient
    /// failure may have been applied, so it is returned to the caller to reconcile.
    NonIdempotent,
}

/// One Graph call, before retries.
#[derive(Debug)]
pub(crate) struct Req<'a> {
    pub method: Method,
    /// Relative to the version (`/sites/…`) or an absolute `@odata.nextLink`.
    pub url: String,
    pub body: Option<&'a Value>,
    pub if_match: Option<&'a str>,
    pub prefer: Option<&'a str>,
    pub lane: Lane,
    /// RU charged before sending (one per inner request for `$batch`).
    pub costs: Vec<Cost>,
    pub idempotency: Idempotency,
    /// `Some(scope)`: a SharePoint REST call, sent with a token for that resource (and
    /// SharePoint's JSON `Accept`) instead of Graph's.
    pub sharepoint_scope: Option<String>,
}

impl<'a> Req<'a> {
    pub fn new(method: Method, url: String) -> Req<'a> {
        let costs = vec![Cost::of(method.as_str(), &url)];
        let idempotency = if method == Method::POST {
            Idempotency::NonIdempotent
        } else {
            Idempotency::Idempotent
        };
        Req {
            method,
            url,
            body: None,
            if_match: None,
            prefer: None,
            lane: Lane::Writer,
            costs,
            idempotency,
            sharepoint_scope: None,
        }
    }
}

/// A 2xx response.
#[derive(Debug)]
pub(crate) struct Resp {
    pub body: Vec<u8>,
    pub lineage: Lineage,
    /// The limiter's admission mark of the request, for `RateLimit-*` of inner `$batch` responses.
    pub mark: u64,
}

/// Correlation ids of the request that produced a result (for lineage in logs and the DLQ).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Ours: a fresh UUID per attempt, sent as `client-request-id`.
    pub client_request_id: String,
    /// Microsoft's `request-id` response header.
    pub request_id: Option<String>,
}

enum AttemptError {
    /// 401: the token was refused; the caller may refresh once.
    Unauthorized {
        token: String,
        err: GraphError,
    },
    /// Failed before the request left (token endpoint): always safe to retry.
    NotSent(GraphError),
    Other(GraphError),
}

/// A Graph client for one tenant and application. Cheap to clone (all state is shared).
#[derive(Debug, Clone)]
pub struct GraphClient {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    http: reqwest::Client,
    base: String,
    tokens: Arc<TokenProvider>,
    /// Tokens for SharePoint resources, by scope: created on first use (the scope names the
    /// site's host, known once the site is resolved), cached and refreshed like Graph's.
    sp_tokens: std::sync::Mutex<HashMap<String, Arc<TokenProvider>>>,
    /// The loaded credential, for the SharePoint token providers.
    credential: Credential,
    pub(crate) limiter: Arc<TenantLimiter>,
    pub(crate) cfg: GraphClientConfig,
    usage: Arc<GraphUsage>,
}

/// What a client (and its clones) spent on Graph, for run counts: the Prometheus counters are
/// per process and tenant, a run needs its own pipeline's numbers.
#[derive(Debug, Default)]
pub struct GraphUsage {
    requests: AtomicU64,
    resource_units: AtomicU64,
    throttled: AtomicU64,
}

/// A reading of [`GraphUsage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphUsageCounts {
    /// HTTP requests sent (a `$batch` is one), whatever their outcome.
    pub requests: u64,
    /// RU charged by the limiter (a `$batch` costs the sum of its inner requests).
    pub resource_units: u64,
    /// 429/503 answers, direct or inside a `$batch`.
    pub throttled: u64,
}

impl GraphUsage {
    pub fn counts(&self) -> GraphUsageCounts {
        GraphUsageCounts {
            requests: self.requests.load(Ordering::Relaxed),
            resource_units: self.resource_units.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
        }
    }
}

impl GraphClient {
    /// Builds a client whose limiter is the tenant's shared one from `registry`.
    pub fn new(
        cfg: GraphClientConfig,
        registry: &LimiterRegistry,
    ) -> Result<GraphClient, GraphError> {
        let limiter = registry.get_or_create(&cfg.tenant, &cfg.limiter);
        GraphClient::with_limiter(cfg, limiter, Arc::default())
    }

    /// Like [`GraphClient::new`], counting what it spends into `usage` (which outlives the
    /// client: a restarted processor's new client keeps adding to its run's numbers).
    pub fn counted(
        cfg: GraphClientConfig,
        registry: &LimiterRegistry,
        usage: Arc<GraphUsage>,
    ) -> Result<GraphClient, GraphError> {
        let limiter = registry.get_or_create(&cfg.tenant, &cfg.limiter);
        GraphClient::with_limiter(cfg, limiter, usage)
    }

    /// Builds a client around an existing tenant limiter.
    pub fn with_limiter(
        cfg: GraphClientConfig,
        limiter: Arc<TenantLimiter>,
        usage: Arc<GraphUsage>,
    ) -> Result<GraphClient, GraphError> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.connect_timeout)
            .build()
            .map_err(|e| GraphError::Invalid(format!("cannot build HTTP client: {e}")))?;
        let credential = cfg.credential.clone().load()?;
        let tokens = Arc::new(TokenProvider::new(
            http.clone(),
            cfg.token_url.clone(),
            cfg.client_id.clone(),
            credential.clone(),
            cfg.scope.clone(),
        ));
        let base = cfg.base_url.as_str().trim_end_matches('/').to_string();
        Ok(GraphClient {
            inner: Arc::new(Inner {
                http,
                base,
                tokens,
                sp_tokens: std::sync::Mutex::default(),
                credential,
                limiter,
                cfg,
                usage,
            }),
        })
    }

    /// What this client and its clones spent so far.
    pub fn usage(&self) -> GraphUsageCounts {
        self.inner.usage.counts()
    }

    /// The tenant limiter this client shares.
    pub fn limiter(&self) -> &Arc<TenantLimiter> {
        &self.inner.limiter
    }

    /// Tokens fetched from the token endpoint so far (cache misses), Graph's and SharePoint's.
    pub fn tokens_fetched(&self) -> u64 {
        let sp = self.inner.sp_tokens.lock().expect("sp_tokens poisoned");
        self.inner.tokens.tokens_fetched() + sp.values().map(|t| t.tokens_fetched()).sum::<u64>()
    }

    /// The token provider of a request: Graph's, or the one of its SharePoint resource.
    fn tokens_for(&self, req: &Req<'_>) -> Arc<TokenProvider> {
        let Some(scope) = &req.sharepoint_scope else {
            return self.inner.tokens.clone();
        };
        let inner = &self.inner;
        let mut sp = inner.sp_tokens.lock().expect("sp_tokens poisoned");
        sp.entry(scope.clone())
            .or_insert_with(|| {
                Arc::new(TokenProvider::new(
                    inner.http.clone(),
                    inner.cfg.token_url.clone(),
                    inner.cfg.client_id.clone(),
                    inner.credential.clone(),
                    scope.clone(),
                ))
            })
            .clone()
    }

    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        let c = &self.inner.cfg;
        ExponentialBuilder::default()
            .with_min_delay(c.backoff_min)
            .with_max_delay(c.backoff_max)
            .with_max_times(c.max_transient_retries)
            .with_jitter()
            .build()
    }

    /// Runs a request with the retry policy: one token refresh on 401, `Retry-After` pauses of
    /// the whole tenant on 429/503 (bounded), exponential backoff with jitter on transient
    /// failures of idempotent requests (bounded).
    pub(crate) async fn execute(&self, req: &Req<'_>) -> Result<Resp, GraphError> {
        let mut backoff = self.backoff();
        let mut throttles = 0usize;
        let mut refreshed = false;
        loop {
            let (err, not_sent) = match self.attempt(req).await {
                Ok(r) => return Ok(r),
                Err(AttemptError::Unauthorized { token, err }) => {
                    if refreshed {
                        return Err(err);
                    }
                    refreshed = true;
                    tracing::info!("graph token refused (401); refreshing once and retrying");
                    self.tokens_for(req).invalidate(&token).await;
                    continue;
                }
                Err(AttemptError::NotSent(e)) => (e, true),
                Err(AttemptError::Other(e)) => (e, false),
            };
            if err.is_throttling() {
                // No Retry-After on a 503: back off exponentially, still pausing the tenant.
                let wait = match err.retry_after() {
                    Some(w) => w,
                    None => backoff.next().unwrap_or(self.inner.cfg.backoff_max),
                };
                // Pause the tenant even when giving up: other requests must honour it too.
                self.throttled(err.status().unwrap_or(429), wait, "direct");
                throttles += 1;
                if throttles > self.inner.cfg.max_throttle_retries {
                    return Err(err);
                }
                continue;
            }
            if err.is_retryable() && (not_sent || req.idempotency == Idempotency::Idempotent) {
                match backoff.next() {
                    Some(d) => {
                        tracing::debug!(error = %err, delay_ms = d.as_millis() as u64, "graph transient failure; backing off");
                        tokio::time::sleep(d).await;
                        continue;
                    }
                    None => return Err(err),
                }
            }
            return Err(err);
        }
    }

    /// Records a throttling signal and pauses the tenant for `wait`.
    pub(crate) fn throttled(&self, status: u16, wait: Duration, source: &'static str) {
        metrics::counter!(m::GRAPH_THROTTLED_TOTAL, "status" => status.to_string(), "source" => source)
            .increment(1);
        self.inner.usage.throttled.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!(m::GRAPH_RETRY_AFTER_SECONDS).record(wait.as_secs_f64());
        tracing::info!(
            tenant = self.inner.limiter.tenant(),
            status,
            wait_ms = wait.as_millis() as u64,
            source,
            "graph throttled; pausing all requests to the tenant"
        );
        self.inner.limiter.pause_for(wait);
    }

    /// Absolute URL and the path relative to the version (for pricing and logs).
    fn resolve(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else {
            format!("{}{}", self.inner.base, url)
        }
    }

    async fn attempt(&self, req: &Req<'_>) -> Result<Resp, AttemptError> {
        let inner = &self.inner;
        // Charged as a whole right before sending: Graph counts a `$batch`'s inner requests when
        // it arrives, so admitting them one by one while the batch fills would run ahead of it.
        let units: u32 = req.costs.iter().map(|c| c.units()).sum();
        let admission = inner.limiter.acquire(req.lane, units).await;
        let units = u64::from(units);
        let lane = match req.lane {
            Lane::Writer => "writer",
            Lane::Delta => "delta",
        };
        metrics::counter!(m::GRAPH_RU_SPENT_TOTAL, "lane" => lane, "tenant" => inner.limiter.tenant().to_string())
            .increment(units);
        let usage = &inner.usage;
        usage.resource_units.fetch_add(units, Ordering::Relaxed);
        usage.requests.fetch_add(1, Ordering::Relaxed);
        let token = self
            .tokens_for(req)
            .token()
            .await
            .map_err(AttemptError::NotSent)?;
        // SharePoint REST answers verbose OData XML/JSON unless asked for plain JSON (§14).
        let accept = if req.sharepoint_scope.is_some() {
            "application/json;odata=nometadata"
        } else {
            "application/json"
        };
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let url = self.resolve(&req.url);
        let mut rb = inner
            .http
            .request(req.method.clone(), &url)
            .bearer_auth(&token)
            .header("client-request-id", &client_request_id)
            .header("accept", accept);
        if let Some(b) = req.body {
            rb = rb.json(b);
        }
        if let Some(v) = req.if_match {
            rb = rb.header("if-match", v);
        }
        if let Some(v) = req.prefer {
            rb = rb.header("prefer", v);
        }
        let started = Instant::now();
        let sent = rb.send().await;
        let method = req.method.as_str().to_string();
        let path = path_of(&url);
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let err = GraphError::from_transport(&e);
                self.record(&method, err.kind(), started);
                tracing::debug!(%method, path, %client_request_id, error = %err, "graph request failed");
                return Err(AttemptError::Other(err));
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let request_id = header(&headers, "request-id").map(str::to_string);
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) => {
                let err = GraphError::from_transport(&e);
                self.record(&method, err.kind(), started);
                return Err(AttemptError::Other(err));
            }
        };
        let mark = admission.mark();
        drop(admission);
        tracing::debug!(%method, path, status, request_id = request_id.as_deref().unwrap_or(""), %client_request_id, "graph request");
        if let Some(rl) = RateLimit::parse(|name| header(&headers, name)) {
            inner.limiter.observe_rate_limit(mark, &rl);
        }
        let lineage = Lineage {
            client_request_id,
            request_id: request_id.clone(),
        };
        if (200..300).contains(&status) {
            self.record(&method, "ok", started);
            return Ok(Resp {
                body,
                lineage,
                mark,
            });
        }
        let detail = ErrorDetail::parse(&body, request_id);
        let wait = throttle_wait(
            header(&headers, "retry-after"),
            header(&headers, "ratelimit-reset").filter(|_| status == 429),
        );
        let err = GraphError::from_response(status, wait, detail);
        self.record(&method, err.kind(), started);
        if status == 401 {
            return Err(AttemptError::Unauthorized { token, err });
        }
        Err(AttemptError::Other(err))
    }

    fn record(&self, method: &str, outcome: &'static str, started: Instant) {
        metrics::counter!(m::GRAPH_REQUESTS_TOTAL, "method" => method.to_string(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(m::GRAPH_REQUEST_SECONDS, "method" => method.to_string())
            .record(started.elapsed().as_secs_f64());
    }
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The path of a URL without query (logs never carry `$filter` values, which may hold row data).
fn path_of(url: &str) -> &str {
    let no_query = url.split('?').next().unwrap_or(url);
    match no_query.find("://") {
        Some(i) => {
            let rest = &no_query[i + 3..];
            rest.find('/').map(|j| &rest[j..]).unwrap_or("/")
        }
        None => no_query,
    }
}
