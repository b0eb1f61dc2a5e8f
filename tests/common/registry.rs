//! A small Confluent Schema Registry stand-in for tests (no real registry or Karapace is
//! installable here). It implements the parts of the v1 REST API SyncBridge and its consumers use,
//! with the real status codes and error bodies (`{"error_code": N, "message": "..."}`):
//!
//! - `POST /subjects/{subject}/versions` `{"schema": "<json>"}` → `{"id": N}`. Ids are global: the
//!   same schema (compared as parsed JSON) gets the same id under every subject; registering a
//!   schema already in the subject returns its id. Invalid schema → 422 / 42201. A new schema
//!   that fails the subject's compatibility level against the latest version (`BACKWARD` by
//!   default, checked with `apache_avro`'s schema resolution rules) → 409 / 409.
//! - `GET /schemas/ids/{id}` → `{"schema": "<json>"}`, or 404 / 40403.
//! - `GET /subjects`, `GET /subjects/{subject}/versions` (404 / 40401), `PUT|GET /config[/{subject}]`.
//! - Optional basic auth (401 / 401 without the right credentials).
//!
//! Fault injection: [`Registry::fail_with`] answers every request with a given status and
//! error code (e.g. 500 / 50001 "backend datastore"); [`Registry::stop`] / [`Registry::start`]
//! close and reopen the listener on the same port (connection refused meanwhile), keeping state.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One request as received (for assertions).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// The status it was answered with.
    pub status: u16,
}

#[derive(Default)]
struct Inner {
    /// id - 1 → (schema text as registered, parsed JSON for identity).
    schemas: Vec<(String, Value)>,
    /// subject → ids of its versions, oldest first.
    subjects: HashMap<String, Vec<u32>>,
    global_compat: Option<String>,
    subject_compat: HashMap<String, String>,
    fail: Option<(u16, i64, String)>,
    auth: Option<String>,
    seen: Vec<Seen>,
}

/// The running stand-in; state survives [`Registry::stop`] / [`Registry::start`].
pub struct Registry {
    state: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    server: Option<(CancellationToken, JoinHandle<()>)>,
}

type St = Arc<Mutex<Inner>>;

fn error(status: StatusCode, code: i64, message: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "application/vnd.schemaregistry.v1+json")],
        Json(json!({"error_code": code, "message": message.into()})),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/vnd.schemaregistry.v1+json")],
        Json(body),
    )
        .into_response()
}

impl Registry {
    /// Starts on a free loopback port.
    pub async fn start_new() -> Registry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = Registry {
            state: Arc::new(Mutex::new(Inner::default())),
            addr,
            server: None,
        };
        r.serve(listener);
        r
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requires HTTP basic auth `user:password` from now on.
    pub fn require_auth(&self, user: &str, password: &str) {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        self.state.lock().unwrap().auth = Some(format!("Basic {token}"));
    }

    /// Answers every request with `status` and this error body until cleared with `None`.
    pub fn fail_with(&self, fail: Option<(u16, i64, &str)>) {
        self.state.lock().unwrap().fail = fail.map(|(s, c, m)| (s, c, m.to_string()));
    }

    /// Closes the listener (connection refused until [`Registry::start`]).
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn start(&mut self) {
        assert!(self.server.is_none(), "already running");
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}/versions", post(register).get(versions))
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/config", get(get_global_config).put(put_global_config))
            .route(
                "/config/{subject}",
                get(get_subject_config).put(put_subject_config),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.state.clone(),
                gate,
            ))
            .with_state(self.state.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        self.server = Some((stop, task));
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Ids of `subject`'s versions, oldest first.
    pub fn versions(&self, subject: &str) -> Vec<u32> {
        self.state
            .lock()
            .unwrap()
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default()
    }

    /// The schema text registered under `id`.
    pub fn schema(&self, id: u32) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.schemas.get(id as usize - 1).map(|(s, _)| s.clone())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.server {
            stop.cancel();
        }
    }
}

/// Auth, fault injection and the request log, in front of every route.
async fn gate(
    State(st): State<St>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (content_type, authorization) = (header("content-type"), header("authorization"));
    let early = {
        let st = st.lock().unwrap();
        if let Some((status, code, message)) = &st.fail {
            Some(error(
                StatusCode::from_u16(*status).unwrap(),
                *code,
                message.clone(),
            ))
        } else if st.auth.is_some() && st.auth != authorization {
            Some(error(StatusCode::UNAUTHORIZED, 401, "Unauthorized"))
        } else {
            None
        }
    };
    let resp = match early {
        Some(r) => r,
        None => next.run(req).await,
    };
    st.lock().unwrap().seen.push(Seen {
        method: method.to_string(),
        path: uri.path().to_string(),
        content_type,
        authorization,
        status: resp.status().as_u16(),
    });
    resp
}

async fn register(State(st): State<St>, Path(subject): Path<String>, body: String) -> Response {
    let Ok(Value::Object(req)) = serde_json::from_str::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, 400, "Unrecognized request body");
    };
    if let Some(t) = req.get("schemaType").and_then(Value::as_str)
        && t != "AVRO"
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema type {t}"),
        );
    }
    let Some(text) = req.get("schema").and_then(Value::as_str) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Empty schema");
    };
    let (parsed, json) = match (Schema::parse_str(text), serde_json::from_str::<Value>(text)) {
        (Ok(s), Ok(j)) => (s, j),
        (Err(e), _) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!("Either the input schema or one its references is invalid: {e}"),
            );
        }
        (_, Err(e)) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, e.to_string());
        }
    };
    let mut st = st.lock().unwrap();
    let existing = st
        .schemas
        .iter()
        .position(|(_, j)| *j == json)
        .map(|i| i as u32 + 1);
    let versions = st.subjects.get(&subject).cloned().unwrap_or_default();
    if let Some(id) = existing
        && versions.contains(&id)
    {
        return ok(json!({"id": id}));
    }
    let level = st
        .subject_compat
        .get(&subject)
        .or(st.global_compat.as_ref())
        .cloned()
        .unwrap_or_else(|| "BACKWARD".to_string());
    if let Some(&latest) = versions.last()
        && level != "NONE"
    {
        let old = Schema::parse_str(&st.schemas[latest as usize - 1].0).unwrap();
        // Confluent requires every writer union branch to resolve; apache_avro calls a union
        // that resolves only for some branches `Partial`, which Confluent rejects.
        let check = |writer: &Schema, reader: &Schema| match SchemaCompatibility::can_read(
            writer, reader,
        ) {
            Ok(Compatibility::Full) => Ok(()),
            Ok(Compatibility::Partial) => {
                Err("some writer union branches cannot be read".to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let backward = check(&old, &parsed);
        let forward = check(&parsed, &old);
        let problem = match level.trim_end_matches("_TRANSITIVE") {
            "BACKWARD" => backward.err(),
            "FORWARD" => forward.err(),
            _ => backward.err().or(forward.err()),
        };
        if let Some(p) = problem {
            return error(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \
                     \"{subject}\", details: [{p}]"
                ),
            );
        }
    }
    let id = match existing {
        Some(id) => id,
        None => {
            st.schemas.push((text.to_string(), json));
            st.schemas.len() as u32
        }
    };
    st.subjects.entry(subject).or_default().push(id);
    ok(json!({"id": id}))
}

async fn schema_by_id(State(st): State<St>, Path(id): Path<String>) -> Response {
    let st = st.lock().unwrap();
    match id
        .parse::<usize>()
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| st.schemas.get(i))
    {
        Some((text, _)) => ok(json!({"schema": text})),
        None => error(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        ),
    }
}

async fn subjects(State(st): State<St>) -> Response {
    let st = st.lock().unwrap();
    let mut names: Vec<&String> = st.subjects.keys().collect();
    names.sort();
    ok(json!(names))
}

async fn versions(State(st): State<St>, Path(subject): Path<String>) -> Response {
    let st = st.lock().unwrap();
    match st.subjects.get(&subject) {
        Some(v) => ok(json!((1..=v.len()).collect::<Vec<_>>())),
        None => error(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        ),
    }
}

/// The level of a `{"compatibility": "..."}` body, if valid.
fn compat_body(body: &str) -> Option<String> {
    const LEVELS: &[&str] = &[
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    ];
    let level = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("compatibility")?.as_str().map(str::to_string));
    level.filter(|l| LEVELS.contains(&l.as_str()))
}

async fn get_global_config(State(st): State<St>) -> Response {
    let st = st.lock().unwrap();
    let level = st
        .global_compat
        .clone()
        .unwrap_or_else(|| "BACKWARD".into());
    ok(json!({"compatibilityLevel": level}))
}

async fn put_global_config(State(st): State<St>, body: String) -> Response {
    match compat_body(&body) {
        Some(l) => {
            st.lock().unwrap().global_compat = Some(l.clone());
            ok(json!({"compatibility": l}))
        }
        None => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level",
        ),
    }
}

async fn get_subject_config(State(st): State<St>, Path(subject): Path<String>) -> Response {
    let st = st.lock().unwrap();
    match st.subject_compat.get(&subject) {
        Some(l) => ok(json!({"compatibilityLevel": l})),
        None => error(
            StatusCode::NOT_FOUND,
            40408,
            format!("Subject '{subject}' does not have subject-level compatibility configured"),
        ),
    }
}

async fn put_subject_config(
    State(st): State<St>,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    match compat_body(&body) {
        Some(l) => {
            st.lock().unwrap().subject_compat.insert(subject, l.clone());
            ok(json!({"compatibility": l}))
        }
        None => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level",
        ),
    }
}
