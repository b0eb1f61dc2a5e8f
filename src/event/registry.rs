//! Confluent Schema Registry: the client, the Confluent wire format framing of encoded events, and
//! the consumer-side decoder.
//!
//! With `log.kafka.schema_registry` set, every key and value written to a table topic is
//! `00` + the schema's registry id (4 bytes, big-endian) + the same Avro binary datum the
//! single-object encoding carries. Subjects follow the TopicNameStrategy: `<topic>-value` for the
//! `...Envelope` schema, `<topic>-key` for the `...Key` schema (TRUNCATE events and keyless
//! tables keep an empty key, written as a null Kafka key).
//!
//! [`ConfluentFramer`] registers a schema (`POST /subjects/{subject}/versions`) the first time an
//! event using it is framed and caches the id per (subject, fingerprint), so each schema version
//! is registered once per process, and always before the first record carrying its id is
//! appended: a record never names an id the registry does not know. A failed registration fails
//! the event, so capture acknowledges nothing from it on (see [`RegistryError::is_retryable`]).
//! The `<prefix>.<pipeline>.schemas` topic is written as without a registry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use backon::{BackoffBuilder, ExponentialBuilder};
use reqwest::StatusCode;
use serde::Deserialize;
use url::Url;

use super::{CONFLUENT_MAGIC, EncodedEvent, SINGLE_OBJECT_MAGIC};
use crate::config::{SchemaRegistryConfig, Secret};
use crate::telemetry::metrics as m;

/// Content type of the registry's v1 REST API (requests and responses).
pub const REGISTRY_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Why a registry call failed. [`RegistryError::is_retryable`] says whether the same call may
/// succeed later without operator action.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No HTTP response: connection refused/reset, DNS, TLS, timeout. Retryable.
    #[error("schema registry {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// 5xx or 429: the registry (or its backing store / primary) is unavailable. Retryable.
    #[error(
        "schema registry {url} is unavailable (HTTP {status}, error code {error_code}): {message}"
    )]
    Unavailable {
        url: String,
        status: u16,
        error_code: i64,
        message: String,
    },
    /// 409: the schema breaks the subject's compatibility level. Operator error.
    #[error(
        "schema registry rejected the new schema of subject {subject} as incompatible (HTTP 409): \
         {message}. The table's change would break the subject's compatibility level: relax it \
         (`PUT /config/{subject}`) or handle the change (new pipeline/topic prefix), then restart"
    )]
    Incompatible { subject: String, message: String },
    /// 422 (error code 42201): the registry does not accept the schema. Operator error (or a bug).
    #[error(
        "schema registry rejected the schema of subject {subject} as invalid (HTTP 422, error code \
         {error_code}): {message}"
    )]
    InvalidSchema {
        subject: String,
        error_code: i64,
        message: String,
    },
    /// 401/403: credentials missing, wrong or not allowed. Operator error.
    #[error(
        "schema registry refused access (HTTP {status}): {message}; check the user info of \
         `log.kafka.schema_registry`"
    )]
    Unauthorized { status: u16, message: String },
    /// `GET /schemas/ids/{id}`: 404 (error code 40403).
    #[error("schema id {id} is not in the schema registry: {message}")]
    UnknownId { id: u32, message: String },
    /// Any other response: an unexpected status, or a body that is not the API's JSON.
    #[error("schema registry {url}: unexpected response (HTTP {status}): {message}")]
    Protocol {
        url: String,
        status: u16,
        message: String,
    },
}

impl RegistryError {
    /// Connection errors, 5xx and 429 may pass; rejections of the schema or the credentials and
    /// unexpected answers will not without an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } | RegistryError::Unavailable { .. } => true,
            RegistryError::Incompatible { .. }
            | RegistryError::InvalidSchema { .. }
            | RegistryError::Unauthorized { .. }
            | RegistryError::UnknownId { .. }
            | RegistryError::Protocol { .. } => false,
        }
    }

    /// Low-cardinality metric label.
    fn kind(&self) -> &'static str {
        match self {
            RegistryError::Unreachable { .. } => "unreachable",
            RegistryError::Unavailable { .. } => "unavailable",
            RegistryError::Incompatible { .. } => "incompatible",
            RegistryError::InvalidSchema { .. } => "invalid_schema",
            RegistryError::Unauthorized { .. } => "unauthorized",
            RegistryError::UnknownId { .. } => "unknown_id",
            RegistryError::Protocol { .. } => "protocol",
        }
    }
}

/// The registry's error body: `{"error_code": 42201, "message": "..."}`.
#[derive(Deserialize)]
struct ErrorBody {
    error_code: Option<i64>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct IdBody {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaBody {
    schema: String,
}

/// HTTP client of one registry: `POST /subjects/{subject}/versions`, `GET /schemas/ids/{id}`.
/// Each call retries retryable failures with exponential backoff (jittered) up to
/// `max_attempts` times, then returns the last error.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    /// Without user info; safe to log.
    base: Url,
    auth: Option<(String, Option<Secret>)>,
    /// Attempts per call (≥ 1).
    pub max_attempts: usize,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base.as_str())
            .field("auth", &self.auth.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// Per-request timeout: registering is a small write to the registry's store.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl RegistryClient {
    /// Defaults: 5 attempts per call, 200 ms .. 5 s between them (about 10 s in all), so a
    /// longer outage surfaces as a retryable sink error and capture reconnects with its own
    /// backoff (nothing after the last durable event is acknowledged meanwhile).
    pub fn new(config: &SchemaRegistryConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client with rustls");
        RegistryClient {
            http,
            base: config.url.clone(),
            auth: config
                .username
                .clone()
                .map(|u| (u, config.password.clone()))
                .or_else(|| config.password.clone().map(|p| (String::new(), Some(p)))),
            max_attempts: 5,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
        }
    }

    /// The registry's base URL (no credentials).
    pub fn url(&self) -> &Url {
        &self.base
    }

    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Percent-encodes each segment (a subject is a topic name plus `-value`).
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: Url) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, REGISTRY_CONTENT_TYPE);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, password.as_ref().map(|p| p.expose()));
        }
        req
    }

    /// Registers `schema_json` under `subject` (or finds it there) and returns its global id.
    pub async fn register(&self, subject: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let url = self.endpoint(&["subjects", subject, "versions"]);
        let body = serde_json::json!({ "schema": schema_json }).to_string();
        let (url, body) = (&url, &body);
        self.with_retries("register", || async move {
            let resp = self
                .request(reqwest::Method::POST, url.clone())
                .header(reqwest::header::CONTENT_TYPE, REGISTRY_CONTENT_TYPE)
                .body(body.clone())
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| self.unreachable(e))?;
            if status.is_success() {
                return serde_json::from_str::<IdBody>(&text)
                    .map(|b| b.id)
                    .map_err(|e| self.protocol(status, format!("{e}: {}", clip(&text))));
            }
            let (code, message) = error_body(status, &text);
            Err(match status.as_u16() {
                409 => RegistryError::Incompatible {
                    subject: subject.to_string(),
                    message,
                },
                422 => RegistryError::InvalidSchema {
                    subject: subject.to_string(),
                    error_code: code,
                    message,
                },
                _ => self.status_error(status, code, message),
            })
        })
        .await
    }

    /// The schema JSON registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let url = self.endpoint(&["schemas", "ids", &id.to_string()]);
        let url = &url;
        self.with_retries("get_schema", || async move {
            let resp = self
                .request(reqwest::Method::GET, url.clone())
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| self.unreachable(e))?;
            if status.is_success() {
                return serde_json::from_str::<SchemaBody>(&text)
                    .map(|b| b.schema)
                    .map_err(|e| self.protocol(status, format!("{e}: {}", clip(&text))));
            }
            let (code, message) = error_body(status, &text);
            Err(match status.as_u16() {
                404 => RegistryError::UnknownId { id, message },
                _ => self.status_error(status, code, message),
            })
        })
        .await
    }

    async fn with_retries<T, F, Fut>(
        &self,
        op: &'static str,
        mut call: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter()
            .build();
        loop {
            let result = call().await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            metrics::counter!(m::SCHEMA_REGISTRY_REQUESTS_TOTAL, "op" => op, "outcome" => outcome)
                .increment(1);
            match result {
                Err(e) if e.is_retryable() => match delays.next() {
                    Some(d) => {
                        tracing::warn!(registry = %self.base, op, error = %e, retry_in_ms = d.as_millis() as u64, "schema registry call failed; retrying");
                        tokio::time::sleep(d).await;
                    }
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> RegistryError {
        // reqwest's Display names the URL (ours has no credentials) and hides the cause chain.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        RegistryError::Unreachable {
            url: self.base.to_string(),
            reason,
        }
    }

    fn protocol(&self, status: StatusCode, message: String) -> RegistryError {
        RegistryError::Protocol {
            url: self.base.to_string(),
            status: status.as_u16(),
            message,
        }
    }

    fn status_error(&self, status: StatusCode, code: i64, message: String) -> RegistryError {
        match status.as_u16() {
            429 | 500..=599 => RegistryError::Unavailable {
                url: self.base.to_string(),
                status: status.as_u16(),
                error_code: code,
                message,
            },
            401 | 403 => RegistryError::Unauthorized {
                status: status.as_u16(),
                message,
            },
            _ => self.protocol(status, format!("error code {code}: {message}")),
        }
    }
}

/// `(error_code, message)` of an error response; the status and raw text when it is not JSON.
fn error_body(status: StatusCode, text: &str) -> (i64, String) {
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(b) => (
            b.error_code.unwrap_or(i64::from(status.as_u16())),
            b.message.unwrap_or_default(),
        ),
        Err(_) => (i64::from(status.as_u16()), clip(text)),
    }
}

fn clip(text: &str) -> String {
    text.chars().take(300).collect()
}

/// `<topic>-value` / `<topic>-key` (Confluent's TopicNameStrategy).
pub fn subject_name(topic: &str, part: Part) -> String {
    match part {
        Part::Key => format!("{topic}-key"),
        Part::Value => format!("{topic}-value"),
    }
}

/// Which half of a Kafka record a schema describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Key,
    Value,
}

/// Rewrites a single-object message (`C3 01` + 8-byte fingerprint + datum) in place into the
/// Confluent wire format (`00` + 4-byte big-endian id + datum). `false` (and `msg` untouched) if
/// it is not a single-object message.
pub fn reframe_in_place(msg: &mut Vec<u8>, schema_id: u32) -> bool {
    if msg.len() < 10 || msg[..2] != SINGLE_OBJECT_MAGIC {
        return false;
    }
    msg.copy_within(10.., 5);
    msg.truncate(msg.len() - 5);
    msg[0] = CONFLUENT_MAGIC;
    msg[1..5].copy_from_slice(&schema_id.to_be_bytes());
    true
}

/// The inverse of [`reframe_in_place`]: a Confluent wire-format message as a single-object
/// message of the schema with this CRC-64-AVRO fingerprint (a copy).
pub fn to_single_object(confluent: &[u8], fingerprint: u64) -> Vec<u8> {
    let body = confluent.get(5..).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 10);
    out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The schema id of a Confluent wire-format message.
pub fn confluent_schema_id(msg: &[u8]) -> Option<u32> {
    (msg.len() >= 5 && msg[0] == CONFLUENT_MAGIC)
        .then(|| u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]))
}

/// Frames encoded events in the Confluent wire format, registering schemas on first use.
#[derive(Debug)]
pub struct ConfluentFramer {
    client: RegistryClient,
    /// topic → (part, fingerprint) → id: per (subject, fingerprint), looked up without allocating.
    ids: HashMap<String, HashMap<(Part, u64), u32>>,
}

impl ConfluentFramer {
    pub fn new(client: RegistryClient) -> Self {
        Self {
            client,
            ids: HashMap::new(),
        }
    }

    /// How many (subject, schema) ids are cached.
    pub fn cached(&self) -> usize {
        self.ids.values().map(HashMap::len).sum()
    }

    async fn id_for(
        &mut self,
        topic: &str,
        part: Part,
        fp: u64,
        schema: &Arc<str>,
    ) -> Result<u32, RegistryError> {
        if let Some(id) = self.ids.get(topic).and_then(|m| m.get(&(part, fp))) {
            return Ok(*id);
        }
        let subject = subject_name(topic, part);
        let id = self.client.register(&subject, schema).await?;
        tracing::info!(registry = %self.client.url(), subject = %subject, id, fingerprint = %super::fingerprint_hex(fp), "registered schema");
        self.ids
            .entry(topic.to_string())
            .or_default()
            .insert((part, fp), id);
        Ok(id)
    }

    /// Registers the event's key and value schemas under `topic`'s subjects (unless cached) and
    /// reframes key and value with their ids. On error nothing is reframed.
    pub async fn frame(
        &mut self,
        topic: &str,
        enc: &mut EncodedEvent,
    ) -> Result<(), RegistryError> {
        let key_id = match (&enc.key_fingerprint, &enc.key_schema, enc.key.is_empty()) {
            (Some(fp), Some(schema), false) => {
                Some(self.id_for(topic, Part::Key, *fp, schema).await?)
            }
            _ => None,
        };
        let value_id = self
            .id_for(topic, Part::Value, enc.value_fingerprint, &enc.value_schema)
            .await?;
        if let Some(id) = key_id {
            reframe_in_place(&mut enc.key, id);
        }
        reframe_in_place(&mut enc.value, value_id);
        Ok(())
    }
}

/// Why a Confluent wire-format message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ConfluentDecodeError {
    #[error("not a Confluent wire-format message ({0} bytes, first byte {1:?})")]
    NotConfluent(usize, Option<u8>),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("schema id {id} from the registry does not parse: {reason}")]
    Schema { id: u32, reason: String },
    #[error("body does not match schema id {id}: {reason}")]
    Body { id: u32, reason: String },
    #[error("{0} trailing bytes after the Avro datum")]
    TrailingBytes(usize),
}

impl ConfluentDecodeError {
    /// Only a registry outage may pass.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConfluentDecodeError::Registry(e) if e.is_retryable())
    }
}

/// Consumer side: decodes Confluent wire-format messages, fetching each writer schema by id from
/// the registry once (`GET /schemas/ids/{id}`).
#[derive(Debug)]
pub struct ConfluentResolver {
    client: RegistryClient,
    schemas: HashMap<u32, Schema>,
}

impl ConfluentResolver {
    pub fn new(client: RegistryClient) -> Self {
        Self {
            client,
            schemas: HashMap::new(),
        }
    }

    /// The writer schema of `id` (fetched once).
    pub async fn schema(&mut self, id: u32) -> Result<&Schema, ConfluentDecodeError> {
        if !self.schemas.contains_key(&id) {
            let json = self.client.schema_by_id(id).await?;
            let schema = Schema::parse_str(&json).map_err(|e| ConfluentDecodeError::Schema {
                id,
                reason: e.to_string(),
            })?;
            self.schemas.insert(id, schema);
        }
        Ok(&self.schemas[&id])
    }

    /// Decodes one message; returns its schema id and the datum.
    pub async fn decode(&mut self, msg: &[u8]) -> Result<(u32, Value), ConfluentDecodeError> {
        let id = confluent_schema_id(msg).ok_or(ConfluentDecodeError::NotConfluent(
            msg.len(),
            msg.first().copied(),
        ))?;
        let schema = self.schema(id).await?;
        let mut body = &msg[5..];
        let value = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .and_then(|r| r.read_value(&mut body))
            .map_err(|e| ConfluentDecodeError::Body {
                id,
                reason: e.to_string(),
            })?;
        if !body.is_empty() {
            return Err(ConfluentDecodeError::TrailingBytes(body.len()));
        }
        Ok((id, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> SchemaRegistryConfig {
        SchemaRegistryConfig::from_url(Url::parse(url).unwrap())
    }

    #[test]
    fn reframes_single_object_in_place() {
        let mut msg = vec![0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0xAA, 0xBB, 0xCC];
        assert!(reframe_in_place(&mut msg, 0x0102_0304));
        assert_eq!(msg, [0, 1, 2, 3, 4, 0xAA, 0xBB, 0xCC]);
        assert_eq!(confluent_schema_id(&msg), Some(0x0102_0304));
        // Same bytes as the copying variant.
        let so = [0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut inplace = so.to_vec();
        assert!(reframe_in_place(&mut inplace, 77));
        assert_eq!(Some(inplace), super::super::to_confluent(&so, 77));
        // Empty datum (a record of no fields) and non-single-object input.
        let mut empty = vec![0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(reframe_in_place(&mut empty, 1));
        assert_eq!(empty, [0, 0, 0, 0, 1]);
        assert_eq!(
            to_single_object(&[0, 0, 0, 0, 1, 0xAA], 0x0807_0605_0403_0201),
            [0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0xAA]
        );
        let mut other = vec![0, 0, 0, 0, 1, 2];
        assert!(!reframe_in_place(&mut other, 9));
        assert_eq!(other, [0, 0, 0, 0, 1, 2]);
        assert_eq!(confluent_schema_id(&[0xC3, 1, 2, 3, 4]), None);
        assert_eq!(confluent_schema_id(&[0, 1]), None);
    }

    #[test]
    fn subjects_follow_the_topic_name_strategy() {
        assert_eq!(
            subject_name("sb.p.public.t", Part::Value),
            "sb.p.public.t-value"
        );
        assert_eq!(
            subject_name("sb.p.public.t", Part::Key),
            "sb.p.public.t-key"
        );
    }

    #[test]
    fn endpoints_keep_the_base_path_and_drop_credentials() {
        let c = RegistryClient::new(&config("https://u:p%40ss@sr.example:8081/reg/"));
        assert_eq!(
            c.endpoint(&["subjects", "sb.p.s.t-value", "versions"])
                .as_str(),
            "https://sr.example:8081/reg/subjects/sb.p.s.t-value/versions"
        );
        let c = RegistryClient::new(&config("http://sr:8081"));
        assert_eq!(
            c.endpoint(&["schemas", "ids", "3"]).as_str(),
            "http://sr:8081/schemas/ids/3"
        );
        let c = RegistryClient::new(&config("https://user:hunter2@sr.example/"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("user"),
            "{shown}"
        );
    }

    #[test]
    fn retryability() {
        let unavailable = RegistryError::Unavailable {
            url: "u".into(),
            status: 503,
            error_code: 50003,
            message: "m".into(),
        };
        assert!(unavailable.is_retryable());
        assert!(
            RegistryError::Unreachable {
                url: "u".into(),
                reason: "refused".into()
            }
            .is_retryable()
        );
        let incompatible = RegistryError::Incompatible {
            subject: "sb.p.s.t-value".into(),
            message: "field x: type changed".into(),
        };
        assert!(!incompatible.is_retryable());
        let text = incompatible.to_string();
        assert!(text.contains("sb.p.s.t-value") && text.contains("field x: type changed"));
        assert!(
            !RegistryError::InvalidSchema {
                subject: "s".into(),
                error_code: 42201,
                message: "m".into()
            }
            .is_retryable()
        );
        let c = RegistryClient::new(&config("http://sr"));
        let e = c.status_error(StatusCode::TOO_MANY_REQUESTS, 429, "slow down".into());
        assert!(e.is_retryable(), "{e}");
        let e = c.status_error(StatusCode::UNAUTHORIZED, 401, "no".into());
        assert!(!e.is_retryable(), "{e}");
        let e = c.status_error(StatusCode::NOT_FOUND, 40401, "Subject not found".into());
        assert!(!e.is_retryable(), "{e}");
        assert_eq!(
            error_body(
                StatusCode::CONFLICT,
                r#"{"error_code":409,"message":"incompatible"}"#
            ),
            (409, "incompatible".to_string())
        );
        assert_eq!(
            error_body(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>"),
            (502, "<html>bad gateway</html>".to_string())
        );
    }

    /// Nothing listens on the port: a connection error, retried `max_attempts` times, retryable.
    #[tokio::test]
    async fn connection_refused_is_retried_then_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = RegistryClient::new(&config(&format!("http://127.0.0.1:{port}")));
        c.max_attempts = 3;
        c.retry_min = Duration::from_millis(10);
        c.retry_max = Duration::from_millis(20);
        let started = std::time::Instant::now();
        let e = c.register("t-value", "\"string\"").await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A cached id is used without asking the registry (which does not exist here).
    #[tokio::test]
    async fn cached_ids_need_no_registry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = RegistryClient::new(&config(&format!("http://127.0.0.1:{port}")));
        c.max_attempts = 1;
        let mut framer = ConfluentFramer::new(c);
        let schema: Arc<str> = Arc::from("\"string\"");
        framer
            .ids
            .entry("t".into())
            .or_default()
            .extend([((Part::Key, 1), 10), ((Part::Value, 2), 20)]);
        let mut enc = EncodedEvent {
            key: vec![0xC3, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0x61],
            value: vec![0xC3, 1, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0x62],
            new_schemas: Vec::new(),
            key_fingerprint: Some(1),
            value_fingerprint: 2,
            key_schema: Some(schema.clone()),
            value_schema: schema.clone(),
        };
        framer.frame("t", &mut enc).await.unwrap();
        assert_eq!(enc.key, [0, 0, 0, 0, 10, 2, 0x61]);
        assert_eq!(enc.value, [0, 0, 0, 0, 20, 2, 0x62]);
        // Another topic is another subject: not cached, so the (absent) registry is asked and
        // the event is left as it was.
        let mut other = EncodedEvent {
            key: Vec::new(),
            value: vec![0xC3, 1, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0x62],
            new_schemas: Vec::new(),
            key_fingerprint: None,
            value_fingerprint: 2,
            key_schema: None,
            value_schema: schema,
        };
        let before = other.clone();
        let e = framer.frame("u", &mut other).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert_eq!(other, before);
        assert_eq!(framer.cached(), 2);
    }
}
