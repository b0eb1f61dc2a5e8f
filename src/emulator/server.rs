//! HTTP front: a listener whose connections can be dropped on purpose (`reset_rate`), one handler
//! that routes token, Graph, admin and HTML requests, and the headers every response carries.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::auth::{Identity, basic_credentials};
use super::graph::{self, Call, Env};
use super::model::{RenderCtx, fmt_time};
use super::persist::Record;
use super::reply::{GraphError, Ids, Reply};
use super::state::{FaultSpec, Faults, Settings, State};
use super::throttle::Limits;

const GRAPH_CONTENT_TYPE: &str = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";

/// Wall clock plus an adjustable offset (tests advance it through `/_emulator/clock/advance`).
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        wall + self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// Everything the handler needs, shared by all connections.
#[derive(Debug)]
pub struct Shared {
    pub identity: Identity,
    pub clock: Clock,
    pub state: Mutex<State>,
    pub public_url: Option<String>,
    pub app_name: String,
    pub clock_control: bool,
    /// Sites the emulator was started with (re-created by `/_emulator/reset`).
    pub configured_sites: Vec<(String, String)>,
    pub default_limits: Limits,
}

impl Shared {
    /// Locks the state; a poisoned lock (a panic elsewhere) still yields the data.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// ------------------------------------------------------------------------------------------------
// Listener with per-connection kill switch
// ------------------------------------------------------------------------------------------------

/// A TCP listener whose streams can be killed from a handler (for `reset_rate`).
#[derive(Debug)]
pub struct KillableListener(pub TcpListener);

/// A TCP stream that fails all further IO once its kill flag is set, so hyper drops the
/// connection without writing the response.
#[derive(Debug)]
pub struct KillableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((s, a)) => {
                    // Small request/response pairs: Nagle would add ~40 ms to each.
                    let _ = s.set_nodelay(true);
                    return (
                        KillableStream {
                            inner: s,
                            kill: Arc::new(AtomicBool::new(false)),
                        },
                        a,
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "connection reset by fault injection",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.kill.load(Ordering::Acquire) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.kill.load(Ordering::Acquire) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.load(Ordering::Acquire) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Per-connection info handed to the handler.
#[derive(Debug, Clone)]
pub struct Conn {
    kill: Arc<AtomicBool>,
}

impl Connected<IncomingStream<'_, KillableListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        Conn {
            kill: stream.io().kill.clone(),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Handler
// ------------------------------------------------------------------------------------------------

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    if let Some(p) = &shared.public_url {
        return p.trim_end_matches('/').to_string();
    }
    let host =
        header(headers, "host").filter(|h| h.len() < 256 && !h.contains(['/', ' ', '"', '<', '>']));
    format!("http://{}", host.unwrap_or("localhost"))
}

pub async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    let client_request_id = header(&headers, "client-request-id")
        .filter(|c| c.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| request_id.clone());
    let now_ms = shared.clock.now_ms();
    let ids = Ids {
        request_id,
        client_request_id,
        date: chrono::DateTime::from_timestamp_millis(now_ms)
            .map(|d| d.format("%Y-%m-%dT%H:%M:%S").to_string())
            .unwrap_or_default(),
    };
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let base = base_url(&shared, &headers);

    if path == "/" || path == "/index.html" {
        let html = super::html::render(&shared.lock(), &query);
        return finish(
            &ids,
            Reply::empty(200),
            Some(("text/html; charset=utf-8", html.into_bytes())),
            false,
        );
    }
    if let Some(rest) = path.strip_prefix("/_emulator/") {
        let reply = admin(&shared, &method, rest, &body, &ids, now_ms);
        return finish(&ids, reply, None, false);
    }
    if let Some(tenant) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
    {
        if method != Method::POST {
            return finish(
                &ids,
                GraphError::new(405, "invalid_request", "Use POST").into_reply(&ids),
                None,
                false,
            );
        }
        let basic = basic_credentials(header(&headers, "authorization"));
        let t = shared.identity.token(tenant, &body, basic, now_ms / 1000);
        return finish(&ids, Reply::json(t.status, t.body), None, false);
    }
    // SharePoint REST on a site (`/sites/x/_api/…`), beside Graph (graph-api.md §14).
    let sharepoint = !path.starts_with("/v1.0/") && path.contains("/_api/");
    let graph_path = match path.strip_prefix("/v1.0") {
        Some(p) => p,
        None if sharepoint => path.as_str(),
        None => {
            let e = GraphError::new(
                400,
                "BadRequest",
                &format!("Invalid version or resource: '{path}'."),
            );
            return finish(&ids, e.into_reply(&ids), None, true);
        }
    };
    let authorization = header(&headers, "authorization");
    let caller = if sharepoint {
        match shared
            .identity
            .verify_sharepoint(authorization, now_ms / 1000)
        {
            Ok(c) => c,
            Err(body) => return finish(&ids, Reply::json(401, body), None, false),
        }
    } else {
        match shared.identity.verify(authorization, now_ms / 1000) {
            Ok(c) => c,
            Err(e) => return finish(&ids, e.into_reply(&ids), None, true),
        }
    };
    let parsed_body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(_) => {
                let e = GraphError::new(
                    400,
                    "BadRequest",
                    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
                );
                return finish(&ids, e.into_reply(&ids), None, true);
            }
        }
    };
    let env = Env {
        render: RenderCtx {
            base: &base,
            tenant: &shared.identity.tenant,
            app_id: shared
                .identity
                .clients
                .first()
                .map(|c| c.id.as_str())
                .unwrap_or(""),
            app_name: &shared.app_name,
        },
        now_ms,
    };
    let (reply, reset, latency) = {
        let mut st = shared.lock();
        let reset_rate = st.faults.spec.reset_rate;
        let reset = st.faults.draw(reset_rate);
        if reset {
            st.faults.injected_resets += 1;
        }
        let latency = st.faults.spec.latency_ms;
        let call = Call {
            method: method.as_str().to_ascii_uppercase(),
            path: graph_path.to_string(),
            query: query.clone(),
            if_match: header(&headers, "if-match").map(str::to_string),
            prefer: header(&headers, "prefer").map(str::to_string),
            body: parsed_body,
        };
        let reply = if sharepoint {
            graph::execute_sharepoint(&mut st, &env, &ids, &caller, &call)
        } else if graph_path.trim_end_matches('/') == "/$batch" {
            if method != Method::POST {
                GraphError::new(405, "BadRequest", "Use POST for $batch").into_reply(&ids)
            } else {
                *st.stats.by_method.entry("POST".into()).or_default() += 1;
                let r = graph::batch(&mut st, &env, &ids, &caller, call.body.as_ref())
                    .unwrap_or_else(|e| e.into_reply(&ids));
                *st.stats.by_status.entry(r.status).or_default() += 1;
                r
            }
        } else {
            graph::execute(&mut st, &env, &ids, &caller, &call)
        };
        // The write reaches the kernel before the response leaves: kill -9 can't lose an acknowledged write.
        let reply = match st.wal.commit() {
            Ok(()) => reply,
            Err(e) => {
                tracing::error!(error = %e, "emulator: write-ahead log append failed");
                GraphError::new(
                    500,
                    "generalException",
                    "The emulator could not persist the change.",
                )
                .into_reply(&ids)
            }
        };
        if st.wal.needs_compaction() {
            let State {
                sites,
                wal,
                delta_epoch,
                ..
            } = &mut *st;
            if let Err(e) = wal.compact(sites, *delta_epoch) {
                tracing::error!(error = %e, "emulator: compaction failed");
            }
        }
        (reply, reset, latency)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency.min(60_000))).await;
    }
    if reset {
        // Applied but never answered: the worst case for a client (did my write happen?).
        conn.kill.store(true, Ordering::Release);
    }
    finish(&ids, reply, None, true)
}

/// Adds the headers every response carries and serializes the body.
fn finish(ids: &Ids, reply: Reply, raw: Option<(&str, Vec<u8>)>, graph: bool) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (ctype, bytes) = match (raw, &reply.body) {
        (Some((ct, b)), _) => (ct.to_string(), b),
        (None, Some(v)) => (
            if graph {
                GRAPH_CONTENT_TYPE.to_string()
            } else {
                "application/json; charset=utf-8".to_string()
            },
            serde_json::to_vec(v).unwrap_or_default(),
        ),
        (None, None) => (String::new(), Vec::new()),
    };
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let mut put = |k: &str, v: &str| {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.insert(k, v);
        }
    };
    if !ctype.is_empty() {
        put("content-type", &ctype);
    }
    put("request-id", &ids.request_id);
    put("client-request-id", &ids.client_request_id);
    if graph {
        put("odata-version", "4.0");
        put("strict-transport-security", "max-age=31536000");
        put("cache-control", "no-store, no-cache");
        put(
            "x-ms-ags-diagnostic",
            r#"{"ServerInfo":{"DataCenter":"Emulator","Slice":"E","Ring":"0","ScaleUnit":"000","RoleInstance":"syncbridge-emulator"}}"#,
        );
    }
    for (k, v) in &reply.headers {
        put(k, v);
    }
    resp
}

// ------------------------------------------------------------------------------------------------
// Admin endpoints (/_emulator/…)
// ------------------------------------------------------------------------------------------------

fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, GraphError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| GraphError::new(400, "BadRequest", &format!("Invalid JSON body: {e}")))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    #[serde(default, deserialize_with = "nullable")]
    ru_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    ru_per_day: Option<Option<u64>>,
    #[serde(default, deserialize_with = "nullable")]
    tenant_ru_per_5min: Option<Option<u64>>,
    token_lifetime_secs: Option<u64>,
    delta_token_lifetime_secs: Option<u64>,
    page_size: Option<usize>,
    max_page_size: Option<usize>,
    list_view_threshold: Option<usize>,
    threshold_status: Option<u16>,
    hyperlink_writes: Option<bool>,
    shuffle_batch_responses: Option<bool>,
    utc_offset_minutes: Option<i32>,
}

/// Distinguishes "absent" (keep) from `null` (unlimited).
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Ok(Some(<Option<u64> as serde::Deserialize>::deserialize(d)?))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteBody {
    hostname: String,
    path: String,
    group_id: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceBody {
    secs: i64,
}

fn admin(
    shared: &Shared,
    method: &Method,
    rest: &str,
    body: &[u8],
    ids: &Ids,
    now_ms: i64,
) -> Reply {
    match admin_inner(shared, method, rest, body, now_ms) {
        Ok(r) => r,
        Err(e) => e.into_reply(ids),
    }
}

fn admin_inner(
    shared: &Shared,
    method: &Method,
    rest: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<Reply, GraphError> {
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    match rest.trim_end_matches('/') {
        "stats" if get => Ok(Reply::json(200, shared.lock().stats_json(now_ms))),
        "requests" if get => Ok(Reply::json(200, shared.lock().stats.requests.to_json())),
        "faults" if get => Ok(Reply::json(200, json!(shared.lock().faults.spec))),
        "faults" if post => {
            let spec: FaultSpec = parse_json(body)?;
            for r in [
                spec.throttle_rate,
                spec.unavailable_rate,
                spec.reset_rate,
                spec.delta_replay_rate,
            ] {
                if !(0.0..=1.0).contains(&r) {
                    return Err(GraphError::new(
                        400,
                        "BadRequest",
                        "rates must be between 0 and 1",
                    ));
                }
            }
            let mut st = shared.lock();
            // Counters are cumulative for the process (until /_emulator/reset).
            let mut f = Faults::new(spec);
            f.injected_throttles = st.faults.injected_throttles;
            f.injected_unavailable = st.faults.injected_unavailable;
            f.injected_resets = st.faults.injected_resets;
            st.faults = f;
            Ok(Reply::json(200, json!(st.faults.spec)))
        }
        "limits" if post => {
            let b: LimitsBody = parse_json(body)?;
            let mut st = shared.lock();
            let l = &mut st.throttle.limits;
            if let Some(v) = b.ru_per_minute {
                l.ru_per_minute = v;
            }
            if let Some(v) = b.ru_per_day {
                l.ru_per_day = v;
            }
            if let Some(v) = b.tenant_ru_per_5min {
                l.tenant_ru_per_5min = v;
            }
            if let Some(v) = b.token_lifetime_secs {
                shared
                    .identity
                    .lifetime_secs
                    .store(v.max(1), Ordering::Relaxed);
            }
            let s: &mut Settings = &mut st.settings;
            if let Some(v) = b.delta_token_lifetime_secs {
                s.delta_token_lifetime_secs = v;
            }
            if let Some(v) = b.page_size {
                s.page_size = v.clamp(1, 100_000);
            }
            if let Some(v) = b.max_page_size {
                s.max_page_size = v.clamp(1, 100_000);
            }
            if let Some(v) = b.list_view_threshold {
                s.list_view_threshold = v;
            }
            if let Some(v) = b.threshold_status {
                if !(400..=599).contains(&v) {
                    return Err(GraphError::new(
                        400,
                        "BadRequest",
                        "threshold_status must be 4xx or 5xx",
                    ));
                }
                s.threshold_status = v;
            }
            if let Some(v) = b.hyperlink_writes {
                s.hyperlink_writes = v;
            }
            if let Some(v) = b.shuffle_batch_responses {
                s.shuffle_batch_responses = v;
            }
            if let Some(v) = b.utc_offset_minutes {
                s.utc_offset_minutes = v.clamp(-14 * 60, 14 * 60);
            }
            Ok(Reply::json(
                200,
                json!({ "limits": st.throttle.limits, "settings": st.settings,
                "token_lifetime_secs": shared.identity.lifetime_secs.load(Ordering::Relaxed) }),
            ))
        }
        "expire-tokens" if post => {
            shared.identity.generation.fetch_add(1, Ordering::Relaxed);
            Ok(Reply::empty(204))
        }
        "expire-delta-tokens" if post => {
            let mut st = shared.lock();
            st.delta_epoch += 1;
            let epoch = st.delta_epoch;
            st.wal.record(&Record::DeltaEpoch { epoch });
            commit(&mut st)?;
            Ok(Reply::empty(204))
        }
        "reset" if post => {
            let mut st = shared.lock();
            st.sites.clear();
            st.delta_epoch += 1;
            let epoch = st.delta_epoch;
            st.wal.record(&Record::Reset);
            st.wal.record(&Record::DeltaEpoch { epoch });
            add_configured_sites(shared, &mut st, now_ms);
            st.throttle = super::throttle::Throttle::new(shared.default_limits);
            st.faults = Faults::new(FaultSpec::default());
            st.stats = Default::default();
            commit(&mut st)?;
            Ok(Reply::empty(204))
        }
        "sites" if get => {
            let st = shared.lock();
            let v: Vec<Value> = st.sites.iter().map(|s| json!({ "id": s.meta.id, "hostname": s.meta.hostname, "path": s.meta.path })).collect();
            Ok(Reply::json(200, json!({ "value": v })))
        }
        "sites" if post => {
            let b: SiteBody = parse_json(body)?;
            let path = normalize_site_path(&b.path).ok_or_else(|| {
                GraphError::new(400, "BadRequest", "path must look like /sites/name")
            })?;
            if !valid_hostname(&b.hostname) {
                return Err(GraphError::new(400, "BadRequest", "invalid hostname"));
            }
            let mut st = shared.lock();
            if st.sites.len() >= 1_000 {
                return Err(GraphError::new(400, "BadRequest", "too many sites"));
            }
            let before = st.sites.len();
            let i = st.ensure_site(&b.hostname, &path, now_ms, b.group_id);
            st.ensure_site(&b.hostname, "", now_ms, None);
            commit(&mut st)?;
            let s = &st.sites[i];
            Ok(Reply::json(
                if st.sites.len() > before { 201 } else { 200 },
                json!({ "id": s.meta.id, "hostname": s.meta.hostname, "path": s.meta.path, "webUrl": s.web_url() }),
            ))
        }
        "clock" if get => Ok(Reply::json(
            200,
            json!({ "now": fmt_time(now_ms / 1000), "now_ms": now_ms }),
        )),
        "clock/advance" if post => {
            if !shared.clock_control {
                return Err(GraphError::new(
                    403,
                    "accessDenied",
                    "start the emulator with --clock-control to move its clock",
                ));
            }
            let b: AdvanceBody = parse_json(body)?;
            if b.secs.abs() > 10 * 365 * 86_400 {
                return Err(GraphError::new(400, "BadRequest", "secs out of range"));
            }
            shared.clock.advance(b.secs * 1000);
            let now = shared.clock.now_ms();
            Ok(Reply::json(
                200,
                json!({ "now": fmt_time(now / 1000), "now_ms": now }),
            ))
        }
        other => Err(GraphError::new(
            404,
            "itemNotFound",
            &format!("Unknown emulator endpoint '{other}' for {method}"),
        )),
    }
}

fn commit(st: &mut State) -> Result<(), GraphError> {
    st.wal
        .commit()
        .map_err(|e| GraphError::new(500, "generalException", &format!("persistence failed: {e}")))
}

pub fn add_configured_sites(shared: &Shared, st: &mut State, now_ms: i64) {
    for (host, path) in &shared.configured_sites {
        st.ensure_site(host, "", now_ms, None);
        st.ensure_site(host, path, now_ms, None);
    }
    // The seeded Team's site, on the first configured host (graph.team resolves to it).
    if let Some((host, _)) = shared.configured_sites.first() {
        let gid = super::groups::DEFAULT_TEAM_GROUP_ID.to_string();
        st.ensure_site(
            host,
            super::groups::DEFAULT_TEAM_SITE_PATH,
            now_ms,
            Some(gid),
        );
    }
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

/// `/sites/x` (leading slash added, trailing removed); `/` or empty = root site.
pub fn normalize_site_path(p: &str) -> Option<String> {
    let p = p.trim().trim_end_matches('/');
    if p.is_empty() {
        return Some(String::new());
    }
    let p = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    let ok = p.len() <= 400
        && !p.contains([':', '?', '#', '"', '<', '>', '\\', ' '])
        && !p.contains("//");
    ok.then_some(p)
}
