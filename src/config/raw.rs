//! The pipeline file's shape: the types the JSON Schema is generated from, and the reader that
//! fills them from a [`Node`] tree.
//!
//! The reader checks shape only (unknown keys, missing keys, wrong types, unknown words) and
//! keeps going after a problem: a broken item of a list or map is dropped and reported, so that
//! validation still sees the rest and every problem is reported in one run. The `*_KEYS`
//! constants list what the reader accepts; a unit test keeps them equal to the schema's keys.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use super::model::{
    ApiRole, ConflictPolicy, CursorKind, Direction, FieldType, HyperlinkWrites, JobKind,
    NotifyKind, Secret,
};
use super::yaml::{Issue, Kind, Loc, Node};

/// A value and the location of the scalar it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sp<T> {
    pub value: T,
    pub loc: Loc,
    /// The value came (partly) from `${VAR}`: messages must not echo it.
    pub interpolated: bool,
}

impl<T: JsonSchema> JsonSchema for Sp<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// A SyncBridge pipeline file (`pipelines/*.yaml`).
// Schema-only: the reader fills [`PartialFile`] so that it can keep going when a section is
// missing; `reader_keys_match_schema` keeps the two in step.
#[allow(dead_code)]
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "SyncBridge pipeline")]
pub struct PipelineFile {
    /// File format version; must be `1`.
    #[schemars(range(min = 1, max = 1))]
    pub version: Sp<u64>,
    /// Pipeline name: names the replication slot, publication, topics and state directory.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,40}$"))]
    pub name: Sp<String>,
    pub source: SourceFile,
    /// Exactly one of `embedded` / `kafka`; default: embedded under `./.syncbridge/<name>`.
    #[serde(default)]
    pub log: Option<LogFile>,
    pub graph: GraphFile,
    /// Tables and the lists they sync with.
    #[schemars(length(min = 1))]
    pub sync: Vec<SyncFile>,
    #[serde(default)]
    pub control: Option<ControlFile>,
    /// When a pipeline pauses itself instead of carrying on.
    #[serde(default)]
    pub guard: Option<GuardFile>,
    #[serde(default)]
    pub labels: Option<LabelsFile>,
    /// Recurring jobs (drift check and heal, re-snapshots, DLQ replay), each run by exactly one
    /// of the processes running the pipeline and recorded as a run.
    #[serde(default)]
    pub schedules: Option<Vec<ScheduleFile>>,
    /// Where failure notifications go, and when a condition counts as one.
    #[serde(default)]
    pub notify: Option<NotifyFile>,
    /// Drift checks (`syncbridge drift`, `POST /pipelines/{name}/drift`, scheduled ones).
    #[serde(default)]
    pub drift: Option<DriftFile>,
}

/// `drift:`: how a drift check paces itself.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftFile {
    /// Share of `graph.ru_per_minute` a check may spend on average while it reads the lists,
    /// above 0 and at most 1; default 0.5 (the writers and pollers keep the rest).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub budget_share: Option<Sp<f64>>,
}
pub const DRIFT_KEYS: &[&str] = &["budget_share"];

pub const PIPELINE_KEYS: &[&str] = &[
    "version",
    "name",
    "source",
    "log",
    "graph",
    "sync",
    "control",
    "guard",
    "labels",
    "schedules",
    "notify",
    "drift",
];

/// `notify:`: targets and thresholds. Each condition notifies once when it starts and once
/// ("resolved") when it clears.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyFile {
    /// At least one.
    pub targets: Vec<NotifyTargetFile>,
    /// Seconds a condition is evaluated over (dead letters counted, conflicts parked) and how
    /// long a fired condition stays quiet; default 300.
    #[serde(default)]
    #[schemars(range(min = 10))]
    pub window_s: Option<Sp<u64>>,
    /// Dead letters within `window_s` that fire the condition; default 1.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub dead_letters: Option<Sp<u64>>,
    /// Replication slot lag (bytes) that fires the condition; default 1 GiB.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub slot_lag_bytes: Option<Sp<u64>>,
    /// A drift check that finds more differences than this fires `drift:<pipeline>`; default 0
    /// (any difference).
    #[serde(default)]
    pub drift_threshold: Option<Sp<u64>>,
}
pub const NOTIFY_KEYS: &[&str] = &[
    "targets",
    "window_s",
    "dead_letters",
    "slot_lag_bytes",
    "drift_threshold",
];

/// One place notifications are sent to.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyTargetFile {
    /// Unique; shown in logs instead of the URL.
    pub name: Sp<String>,
    /// `webhook` (JSON, HMAC-SHA256 signed), `teams` (Adaptive Card), `slack` (Slack-compatible),
    /// `email` (SMTP: `url` is `smtp://user:password@host:587`, STARTTLS required except on a
    /// loopback host, or `smtps://…:465`).
    pub kind: Sp<NotifyKind>,
    /// The endpoint (`https://…`; `http://` for loopback); a secret: use `${ENV}`.
    pub url: Sp<Secret>,
    /// `webhook`: the HMAC-SHA256 key of the `X-SyncBridge-Signature` header; use `${ENV}`.
    #[serde(default)]
    pub secret: Option<Sp<Secret>>,
    /// `email`: the sender address.
    #[serde(default)]
    pub from: Option<Sp<String>>,
    /// `email`: the recipients.
    #[serde(default)]
    pub to: Option<Sp<Vec<Sp<String>>>>,
}
pub const NOTIFY_TARGET_KEYS: &[&str] = &["name", "kind", "url", "secret", "from", "to"];

/// One recurring job.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    /// Unique in the pipeline: names the job's runs and its lease.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,40}$"))]
    pub name: Sp<String>,
    /// Cron expression: 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds
    /// first; `L`, `W`, `#` and names (`MON`, `JAN`) are accepted.
    pub cron: Sp<String>,
    /// IANA time zone the expression is read in, e.g. `Europe/Berlin`; default `UTC`.
    #[serde(default)]
    pub time_zone: Option<Sp<String>>,
    pub job: Sp<JobKind>,
    /// `resnapshot` only: the tables to read again (`schema.table`); default: every synced table.
    #[serde(default)]
    pub tables: Option<Sp<Vec<Sp<String>>>>,
    /// Run once at start when a tick was missed while no process ran the pipeline; default false.
    #[serde(default)]
    pub catch_up: Option<Sp<bool>>,
}
pub const SCHEDULE_KEYS: &[&str] = &["name", "cron", "time_zone", "job", "tables", "catch_up"];

/// The PostgreSQL source database.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct SourceFile {
    /// `postgres://user:pass@host:port/db?sslmode=...`; usually `${DATABASE_URL}`. Exactly one
    /// of `url` and `urls`.
    #[serde(default)]
    pub url: Option<Sp<Secret>>,
    /// The instances of a replicated source, primary first, then its standbys: capture follows
    /// whichever is the primary (see ops/docs/failover.md). Exactly one of `url` and `urls`.
    #[serde(default)]
    pub urls: Option<Vec<Sp<Secret>>>,
    #[serde(skip)]
    pub loc: Loc,
}
pub const SOURCE_KEYS: &[&str] = &["url", "urls"];

/// The event log: exactly one of `embedded` or `kafka`.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("maxProperties" = 1))]
pub struct LogFile {
    #[serde(default)]
    pub embedded: Option<EmbeddedFile>,
    #[serde(default)]
    pub kafka: Option<KafkaFile>,
    #[serde(skip)]
    pub loc: Loc,
}
pub const LOG_KEYS: &[&str] = &["embedded", "kafka"];

/// The embedded (sled) log.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedFile {
    /// Directory of the log; default `.syncbridge/<name>` (relative to the working directory).
    #[serde(default)]
    pub path: Option<Sp<String>>,
}
pub const EMBEDDED_KEYS: &[&str] = &["path"];

/// A Kafka-compatible broker cluster.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    /// `host:port`, as a list or one comma-separated string.
    pub brokers: Brokers,
    /// Topics are `<topic_prefix>.<pipeline>.…`; default `syncbridge`.
    #[serde(default)]
    pub topic_prefix: Option<Sp<String>>,
    /// Confluent schema registry URL; without it Avro single-object encoding is used.
    #[serde(default)]
    pub schema_registry: Option<Sp<String>>,
}
pub const KAFKA_KEYS: &[&str] = &["brokers", "topic_prefix", "schema_registry"];

/// Kafka bootstrap servers.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub enum Brokers {
    List(Vec<Sp<String>>),
    /// Comma-separated.
    Csv(Sp<String>),
}

/// Microsoft Graph access.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    /// Default `https://graph.microsoft.com/v1.0`.
    #[serde(default)]
    pub base_url: Option<Sp<String>>,
    /// OAuth2 token endpoint; `{tenant}` is replaced by `tenant`.
    /// Default `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token`.
    #[serde(default)]
    pub token_url: Option<Sp<String>>,
    /// Tenant domain (`contoso.onmicrosoft.com`) or id.
    pub tenant: Sp<String>,
    /// Application (client) id: a GUID.
    pub client_id: Sp<String>,
    /// Client secret; write `${GRAPH_CLIENT_SECRET}` rather than the value. Exactly one of
    /// `client_secret` and `client_certificate`.
    #[serde(default)]
    pub client_secret: Option<Sp<Secret>>,
    /// A certificate registered for the app (for tenants that allow certificate sign-in only).
    #[serde(default)]
    pub client_certificate: Option<CertificateFile>,
    /// `hostname:/server-relative-path`, e.g. `contoso.sharepoint.com:/sites/ops`. Exactly one of
    /// `site` and `team`.
    #[serde(default)]
    pub site: Option<Sp<String>>,
    /// A Team's display name or its group id (a GUID): the lists live in the Team's site.
    #[serde(default)]
    pub team: Option<Sp<String>>,
    /// Resource units per minute of the tenant's licence tier; default 1250.
    #[serde(default)]
    #[schemars(range(min = 1, max = 4294967295u64))]
    pub ru_per_minute: Option<Sp<u64>>,
    /// Root of SharePoint's REST API, which writes the hyperlink fields Graph refuses; default
    /// `https://` + the site's host name.
    #[serde(default)]
    pub sharepoint_url: Option<Sp<String>>,
    /// `sharepoint_rest` (default) or `graph`: how hyperlink fields are written.
    #[serde(default)]
    pub hyperlinks: Option<Sp<HyperlinkWrites>>,
}
/// The app's certificate credential.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    /// Path of the PEM certificate (`-----BEGIN CERTIFICATE-----`) registered for the app.
    pub cert: Sp<String>,
    /// The RSA private key: a PEM file's path, or the PEM itself from `${ENV}`.
    pub key: Sp<Secret>,
}
pub const CERTIFICATE_KEYS: &[&str] = &["cert", "key"];

pub const GRAPH_KEYS: &[&str] = &[
    "base_url",
    "token_url",
    "tenant",
    "client_id",
    "client_secret",
    "client_certificate",
    "site",
    "team",
    "ru_per_minute",
    "sharepoint_url",
    "hyperlinks",
];

/// One table (or query) synced with one list.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncFile {
    /// Schema-qualified table name, e.g. `public.projects`; or give `query` instead.
    #[serde(default)]
    pub table: Option<Sp<String>>,
    /// A SELECT (typically of a view) polled instead of a table: needs `key` and `poll`;
    /// push-only.
    #[serde(default)]
    pub query: Option<Sp<String>>,
    /// How a `query` is read.
    #[serde(default)]
    pub poll: Option<PollFile>,
    /// Display name of the target list; created if missing.
    pub list: Sp<String>,
    /// Key columns; default: the table's primary key.
    #[serde(default)]
    pub key: Option<Sp<Vec<Sp<String>>>>,
    pub fields: FieldsFile,
    /// Optional sharding: first match wins, else `list`.
    #[serde(default)]
    pub routes: Option<Vec<RouteFile>>,
    #[serde(default)]
    pub pull: Option<PullFile>,
    /// Default `source_wins`.
    #[serde(default)]
    pub conflict: Option<Sp<ConflictPolicy>>,
}
pub const SYNC_KEYS: &[&str] = &[
    "table", "query", "poll", "list", "key", "fields", "routes", "pull", "conflict",
];

impl SyncFile {
    /// `table:` or else `query:` (the reader keeps only entries with one of them).
    pub fn source(&self) -> &Sp<String> {
        self.table
            .as_ref()
            .or(self.query.as_ref())
            .expect("the reader drops an entry without table and query")
    }
}

/// How a query source is read: `every` plus either `full: true` or a `cursor`.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PollFile {
    /// Time between reads: `<n>s`, `<n>m`, `<n>h` or `<n>d`.
    #[schemars(regex(pattern = r"^[0-9]+[smhd]$"))]
    pub every: Sp<String>,
    /// Read every row each time (finds deleted rows); exclusive with `cursor`.
    #[serde(default)]
    pub full: Option<Sp<bool>>,
    /// Read only rows past the last value of a column.
    #[serde(default)]
    pub cursor: Option<CursorFile>,
    /// With `cursor`: also a full read (which finds deleted rows) this often.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[0-9]+[smhd]$"))]
    pub full_every: Option<Sp<String>>,
    #[serde(skip)]
    pub loc: Loc,
}
pub const POLL_KEYS: &[&str] = &["every", "full", "cursor", "full_every"];

/// The cursor of an incremental read.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CursorFile {
    /// A column of the query's result.
    pub column: Sp<String>,
    pub kind: Sp<CursorKind>,
    /// `timestamp` only: how far before the cursor each read starts (late commits); default 0s.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[0-9]+[smhd]$"))]
    pub lookback: Option<Sp<String>>,
}
pub const CURSOR_KEYS: &[&str] = &["column", "kind", "lookback"];

/// `column: FieldName` or `column: { field, type, direction, ... }`, in file order.
#[derive(Debug, Default)]
pub struct FieldsFile(pub Vec<(Sp<String>, FieldValueFile)>);

impl JsonSchema for FieldsFile {
    fn schema_name() -> Cow<'static, str> {
        "Fields".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Column → SharePoint field, in order: `column: FieldName` or `column: { field, type, direction, ... }`.",
            "type": "object",
            "minProperties": 1,
            "additionalProperties": generator.subschema_for::<FieldValueFile>(),
        })
    }
}

/// A field mapping: the short form is just the SharePoint internal name.
#[derive(Debug, JsonSchema)]
#[serde(untagged)]
pub enum FieldValueFile {
    Name(Sp<String>),
    Spec(FieldSpecFile),
}

/// The long form of a field mapping.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldSpecFile {
    /// SharePoint internal name: ASCII identifier, at most 32 characters.
    pub field: Sp<String>,
    /// Default `text`.
    #[serde(default, rename = "type")]
    pub field_type: Option<Sp<FieldType>>,
    /// Default `bidirectional`.
    #[serde(default)]
    pub direction: Option<Sp<Direction>>,
    /// Allowed values; required (non-empty) for `choice` and `multichoice`.
    #[serde(default)]
    pub choices: Option<Sp<Vec<Sp<String>>>>,
    /// For `lookup`: display name of the synced list the foreign key points into.
    #[serde(default)]
    pub list: Option<Sp<String>>,
    /// Overrides the entry's conflict policy for this (bidirectional) field.
    #[serde(default)]
    pub conflict: Option<Sp<ConflictPolicy>>,
    #[serde(skip)]
    pub loc: Loc,
}
pub const FIELD_SPEC_KEYS: &[&str] = &["field", "type", "direction", "choices", "list", "conflict"];

/// A routing rule.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// CEL expression over the row's columns, e.g. `status == 'archived'`.
    pub when: Sp<String>,
    /// Display name of the list matching rows go to.
    pub list: Sp<String>,
}
pub const ROUTE_KEYS: &[&str] = &["when", "list"];

/// The return path (SharePoint → Postgres).
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PullFile {
    /// Default `true`.
    #[serde(default)]
    pub enabled: Option<Sp<bool>>,
    /// Delta polling interval; default 2000, at least 100.
    #[serde(default)]
    #[schemars(range(min = 100))]
    pub interval_ms: Option<Sp<u64>>,
    /// What deleting a list item does to its row: `delete` (default), `ignore`, or
    /// `soft:<column>` (keep the row and set `<column>`, which must not be a key column).
    #[serde(default)]
    #[schemars(regex(pattern = r"^(delete|ignore|soft:[A-Za-z_][A-Za-z0-9_$]{0,62})$"))]
    pub on_delete: Option<Sp<String>>,
}
pub const PULL_KEYS: &[&str] = &["enabled", "interval_ms", "on_delete"];

/// The control-plane HTTP server.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    /// `ip:port`; default `127.0.0.1:8088`.
    #[serde(default)]
    pub listen: Option<Sp<String>>,
    /// Bearer tokens for the HTTP API (every route but `/health`, `/ready`, `/metrics` and
    /// `/openapi.json`). None: the API is open, allowed only on a loopback `listen`.
    #[serde(default)]
    pub tokens: Option<Vec<TokenFile>>,
    /// The meta-store database (`postgres://…`, schema `syncbridge_meta`: run history);
    /// default: `source.url`.
    #[serde(default)]
    pub meta_url: Option<Sp<Secret>>,
    /// How long the meta-store keeps audit records (row history): a whole number with `d`,
    /// `h`, `m` or `s`, at least `1h`; default `30d`. Older ones are pruned in the background.
    #[serde(default)]
    pub audit_retention: Option<Sp<String>>,
}
pub const CONTROL_KEYS: &[&str] = &["listen", "tokens", "meta_url", "audit_retention"];

/// One API token; send it as `Authorization: Bearer <token>`.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Who holds it (shown in logs instead of the token); unique.
    pub name: Sp<String>,
    /// The secret itself; use `${ENV}` so it stays out of the file.
    pub token: Sp<Secret>,
    /// `read`: GET routes only; `operate`: every route.
    pub role: Sp<ApiRole>,
    /// Position in `control.tokens` (entries that could not be read are dropped).
    #[serde(skip)]
    pub index: usize,
}
pub const TOKEN_KEYS: &[&str] = &["name", "token", "role"];

/// Guards that pause a pipeline when its failures look like a fault of the pipeline, not of rows.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    #[serde(default)]
    pub dead_letters: Option<DeadLetterGuardFile>,
    /// The accidental-delete guard of row deletes bound for the lists.
    #[serde(default)]
    pub push: Option<DeleteGuardFile>,
    /// The accidental-delete guard of list deletes bound for the tables (pull
    /// `on_delete: delete`).
    #[serde(default)]
    pub pull: Option<DeleteGuardFile>,
    /// How long a change event whose schema is not (yet) in the schemas topic waits for it
    /// before the pipeline pauses (it is never dead-lettered). Default 60000.
    #[serde(default)]
    #[schemars(range(min = 100))]
    pub schema_wait_ms: Option<Sp<u64>>,
}
pub const GUARD_KEYS: &[&str] = &["dead_letters", "push", "pull", "schema_wait_ms"];

/// More deletes within `window_ms` than the smaller of `max_deletes` and `max_percent` of the
/// managed items pause that direction's deletes until an operator allows or discards them.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteGuardFile {
    /// false turns the guard off for this direction. Default true.
    #[serde(default)]
    pub enabled: Option<Sp<bool>>,
    /// Default 500.
    #[serde(default)]
    pub max_deletes: Option<Sp<u64>>,
    /// Share (1–100 %) of the items the pipeline manages. Default 10.
    #[serde(default)]
    #[schemars(range(min = 1, max = 100))]
    pub max_percent: Option<Sp<u64>>,
    /// The percent rule never pauses below this many deletes. Default 100.
    #[serde(default)]
    pub min_deletes: Option<Sp<u64>>,
    /// Deletes are counted over this window. Default 60000.
    #[serde(default)]
    pub window_ms: Option<Sp<u64>>,
    /// Deletes wait this long before they are applied, so a burst spread over many transactions
    /// is counted whole. Default 0.
    #[serde(default)]
    pub hold_ms: Option<Sp<u64>>,
}
pub const DELETE_GUARD_KEYS: &[&str] = &[
    "enabled",
    "max_deletes",
    "max_percent",
    "min_deletes",
    "window_ms",
    "hold_ms",
];

/// A storm of dead letters of one kind (every event undecodable, every write rejected) pauses
/// the pipeline; nothing past the first failing event is acknowledged.
#[derive(Debug, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterGuardFile {
    /// Pause after this many dead letters of one kind in a row; 0 turns the rule off. Default 20.
    #[serde(default)]
    pub consecutive: Option<Sp<u64>>,
    /// Size of the sliding window of processed events for `max_percent`; 0 turns the rule off.
    /// Default 200.
    #[serde(default)]
    pub window: Option<Sp<u64>>,
    /// Pause when more than this share (1–100 %) of the last `window` events are dead letters of
    /// one kind. Default 50.
    #[serde(default)]
    #[schemars(range(min = 1, max = 100))]
    pub max_percent: Option<Sp<u64>>,
}
pub const DEAD_LETTER_GUARD_KEYS: &[&str] = &["consecutive", "window", "max_percent"];

/// `labels:`: free-form `key: value` strings, in file order (`application` groups pipelines in
/// the inventory). Keys and values are checked by validation, not here.
#[derive(Debug, Default)]
pub struct LabelsFile(pub Vec<(Sp<String>, Sp<String>)>);

impl JsonSchema for LabelsFile {
    fn schema_name() -> Cow<'static, str> {
        "Labels".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        use super::model::{LABEL_KEY_PATTERN, MAX_LABEL_VALUE_LEN};
        let value =
            json_schema!({ "type": "string", "minLength": 1, "maxLength": MAX_LABEL_VALUE_LEN });
        json_schema!({
            "description": "Free-form labels of the pipeline: `key: value` strings. `application` names the application the pipeline belongs to (the inventory groups databases by it).",
            "type": "object",
            "properties": {
                "application": {
                    "description": "The application this pipeline's database belongs to, e.g. `billing`.",
                    "type": "string", "minLength": 1, "maxLength": MAX_LABEL_VALUE_LEN
                }
            },
            "propertyNames": { "pattern": LABEL_KEY_PATTERN },
            "additionalProperties": value,
        })
    }
}

/// What the reader recovered from a file: every section that could be read.
#[derive(Debug, Default)]
pub struct PartialFile {
    pub version: Option<Sp<u64>>,
    pub name: Option<Sp<String>>,
    pub source: Option<SourceFile>,
    pub log: Option<LogFile>,
    pub graph: Option<GraphFile>,
    /// The entries that could be read.
    pub sync: Vec<SyncFile>,
    pub control: Option<ControlFile>,
    pub guard: Option<GuardFile>,
    pub labels: Option<LabelsFile>,
    /// The entries that could be read.
    pub schedules: Vec<ScheduleFile>,
    pub notify: Option<NotifyFile>,
    pub drift: Option<DriftFile>,
}

/// Collects problems while reading.
#[derive(Debug, Default)]
pub struct Reader {
    pub issues: Vec<Issue>,
}

/// The keys of one mapping, checked against what is allowed.
struct MapView<'n> {
    loc: Loc,
    path: String,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> MapView<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, v)| *k == key && !is_null(v))
            .map(|(_, v)| *v)
    }
    fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn is_null(node: &Node) -> bool {
    matches!(&node.kind, Kind::Scalar(s) if s.is_null())
}

/// `value` for messages: quoted, shortened, or hidden when it came from the environment.
fn shown(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar(s) if s.interpolated => "a value from the environment".into(),
        Kind::Scalar(s) if s.is_null() => "null".into(),
        Kind::Scalar(s) => {
            let mut text: String = s.text.chars().take(40).collect();
            if s.text.chars().count() > 40 {
                text.push('…');
            }
            format!("`{text}`")
        }
        _ => node.kind_name().into(),
    }
}

impl Reader {
    fn err(&mut self, loc: Loc, msg: impl Into<String>) {
        self.issues.push((loc, msg.into()));
    }

    /// A mapping with only `keys`; null reads as an empty mapping (`embedded:` alone).
    fn map<'n>(&mut self, node: &'n Node, path: &str, keys: &[&str]) -> Option<MapView<'n>> {
        let raw = match &node.kind {
            Kind::Map(entries) => entries.as_slice(),
            _ if is_null(node) => &[],
            _ => {
                let msg = if path.is_empty() {
                    "a pipeline file must be a mapping (version, name, source, graph, sync)".into()
                } else {
                    format!("`{path}`: expected a mapping")
                };
                self.err(node.loc, format!("{msg}, found {}", node.kind_name()));
                return None;
            }
        };
        let mut view = MapView {
            loc: node.loc,
            path: path.to_owned(),
            entries: Vec::new(),
        };
        let place = if path.is_empty() {
            String::new()
        } else {
            format!(" in `{path}`")
        };
        // Keys seen so far (unknown ones too), to point a duplicate at the first one.
        let mut seen: Vec<(&str, Loc)> = Vec::new();
        for (k, v) in raw {
            let Some(key) = self.key(k) else { continue };
            if let Some((_, first)) = seen.iter().find(|(s, _)| *s == key) {
                let msg = format!("duplicate key `{key}`{place} (first at {first})");
                self.err(k.loc, msg);
                continue;
            }
            seen.push((key, k.loc));
            if !keys.contains(&key) {
                let expected = keys.join(", ");
                self.err(
                    k.loc,
                    format!("unknown key `{key}`{place}; expected one of: {expected}"),
                );
                continue;
            }
            view.entries.push((key, v));
        }
        Some(view)
    }

    fn key<'n>(&mut self, node: &'n Node) -> Option<&'n str> {
        match &node.kind {
            Kind::Scalar(s) if !s.is_null() && !s.text.is_empty() => Some(&s.text),
            _ => {
                self.err(
                    node.loc,
                    format!("mapping keys must be strings, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn required<'n>(&mut self, map: &MapView<'n>, key: &str) -> Option<&'n Node> {
        let found = map.get(key);
        if found.is_none() {
            let place = if map.path.is_empty() {
                String::new()
            } else {
                format!(" in `{}`", map.path)
            };
            self.err(map.loc, format!("missing required key `{key}`{place}"));
        }
        found
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<Sp<String>> {
        match &node.kind {
            // Any non-null scalar is text: YAML would read `list: 2024` as a number, but a
            // list called "2024" is what the author meant.
            Kind::Scalar(s) if s.broken => None,
            Kind::Scalar(s) if !s.is_null() => Some(Sp {
                value: s.text.clone(),
                loc: node.loc,
                interpolated: s.interpolated,
            }),
            _ => {
                self.err(
                    node.loc,
                    format!("`{path}`: expected a string, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn secret(&mut self, node: &Node, path: &str) -> Option<Sp<Secret>> {
        self.string(node, path).map(|s| Sp {
            value: Secret::new(s.value),
            loc: s.loc,
            interpolated: s.interpolated,
        })
    }

    /// A plain (or interpolated) scalar: quoting makes a YAML value a string, not a number.
    fn typed_text<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        what: &str,
    ) -> Option<(&'n str, bool)> {
        match &node.kind {
            Kind::Scalar(s) if s.broken => None,
            Kind::Scalar(s) if s.plain || s.interpolated => Some((s.text.trim(), s.interpolated)),
            _ => {
                self.err(
                    node.loc,
                    format!("`{path}`: expected {what}, found {}", describe(node)),
                );
                None
            }
        }
    }

    /// A scalar `parse` reads as `what` (else a problem saying so).
    fn parsed<T>(
        &mut self,
        node: &Node,
        path: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<Sp<T>> {
        let (text, interpolated) = self.typed_text(node, path, what)?;
        match parse(text) {
            Some(value) => Some(Sp {
                value,
                loc: node.loc,
                interpolated,
            }),
            None => {
                self.err(
                    node.loc,
                    format!("`{path}`: expected {what}, found {}", shown(node)),
                );
                None
            }
        }
    }

    fn uint(&mut self, node: &Node, path: &str) -> Option<Sp<u64>> {
        self.parsed(node, path, "an unsigned integer", |text| {
            let digits = text.strip_prefix('+').unwrap_or(text).replace('_', "");
            digits.parse::<u64>().ok().filter(|_| !digits.is_empty())
        })
    }

    fn number(&mut self, node: &Node, path: &str) -> Option<Sp<f64>> {
        self.parsed(node, path, "a number", |text| {
            text.replace('_', "")
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
        })
    }

    fn drift(&mut self, node: &Node, path: &str) -> Option<DriftFile> {
        let m = self.map(node, path, DRIFT_KEYS)?;
        let budget_share = m
            .get("budget_share")
            .and_then(|n| self.number(n, &m.child("budget_share")));
        Some(DriftFile { budget_share })
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<Sp<bool>> {
        let what = "`true` or `false`";
        let (text, interpolated) = self.typed_text(node, path, what)?;
        // YAML 1.2 core schema spellings only: `yes`/`on` are strings there.
        let value = match text {
            "true" | "True" | "TRUE" => true,
            "false" | "False" | "FALSE" => false,
            _ => {
                self.err(
                    node.loc,
                    format!("`{path}`: expected {what}, found {}", shown(node)),
                );
                return None;
            }
        };
        Some(Sp {
            value,
            loc: node.loc,
            interpolated,
        })
    }

    fn word<T: Copy>(&mut self, node: &Node, path: &str, table: &[(&str, T)]) -> Option<Sp<T>> {
        let s = self.string(node, path)?;
        match table.iter().find(|(w, _)| *w == s.value.trim()) {
            Some((_, v)) => Some(Sp {
                value: *v,
                loc: s.loc,
                interpolated: s.interpolated,
            }),
            None => {
                let words: Vec<&str> = table.iter().map(|(w, _)| *w).collect();
                self.err(
                    node.loc,
                    format!(
                        "`{path}`: unknown value {}; expected one of: {}",
                        shown(node),
                        words.join(", ")
                    ),
                );
                None
            }
        }
    }

    fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.err(
                    node.loc,
                    format!("`{path}`: expected a sequence, found {}", node.kind_name()),
                );
                None
            }
        }
    }

    fn strings(&mut self, node: &Node, path: &str) -> Option<Sp<Vec<Sp<String>>>> {
        let items = self.seq(node, path)?;
        let value = items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.string(n, &format!("{path}[{i}]")))
            .collect();
        Some(Sp {
            value,
            loc: node.loc,
            interpolated: false,
        })
    }

    /// Reads a whole file; never fails, problems are in `self.issues`.
    pub fn file(&mut self, root: &Node) -> PartialFile {
        let mut file = PartialFile::default();
        let Some(m) = self.map(root, "", PIPELINE_KEYS) else {
            return file;
        };
        file.version = self
            .required(&m, "version")
            .and_then(|n| self.uint(n, "version"));
        file.name = self
            .required(&m, "name")
            .and_then(|n| self.string(n, "name"));
        file.source = self
            .required(&m, "source")
            .and_then(|n| self.source(n, "source"));
        file.log = m.get("log").and_then(|n| self.log(n, "log"));
        file.graph = self
            .required(&m, "graph")
            .and_then(|n| self.graph(n, "graph"));
        if let Some(node) = self.required(&m, "sync")
            && let Some(items) = self.seq(node, "sync")
        {
            if items.is_empty() {
                self.err(node.loc, "`sync`: at least one entry is needed");
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(entry) = self.sync(item, &format!("sync[{i}]")) {
                    file.sync.push(entry);
                }
            }
        }
        file.control = m.get("control").and_then(|n| self.control(n, "control"));
        file.guard = m.get("guard").and_then(|n| self.guard(n, "guard"));
        file.labels = m.get("labels").and_then(|n| self.labels(n, "labels"));
        if let Some(node) = m.get("schedules")
            && let Some(items) = self.seq(node, "schedules")
        {
            for (i, item) in items.iter().enumerate() {
                if let Some(entry) = self.schedule(item, &format!("schedules[{i}]")) {
                    file.schedules.push(entry);
                }
            }
        }
        file.notify = m.get("notify").and_then(|n| self.notify(n, "notify"));
        file.drift = m.get("drift").and_then(|n| self.drift(n, "drift"));
        file
    }

    fn notify(&mut self, node: &Node, path: &str) -> Option<NotifyFile> {
        let m = self.map(node, path, NOTIFY_KEYS)?;
        let mut targets = Vec::new();
        if let Some(node) = self.required(&m, "targets") {
            let list = m.child("targets");
            let items = self.seq(node, &list).unwrap_or_default();
            if items.is_empty() {
                self.err(node.loc, "`notify.targets`: name at least one target");
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = self.notify_target(item, &format!("{list}[{i}]")) {
                    targets.push(t);
                }
            }
        }
        let mut num = |key: &str| m.get(key).and_then(|n| self.uint(n, &m.child(key)));
        Some(NotifyFile {
            targets,
            window_s: num("window_s"),
            dead_letters: num("dead_letters"),
            slot_lag_bytes: num("slot_lag_bytes"),
            drift_threshold: num("drift_threshold"),
        })
    }

    fn notify_target(&mut self, node: &Node, path: &str) -> Option<NotifyTargetFile> {
        let m = self.map(node, path, NOTIFY_TARGET_KEYS)?;
        let name = self
            .required(&m, "name")
            .and_then(|n| self.string(n, &m.child("name")));
        let kind = self
            .required(&m, "kind")
            .and_then(|n| self.word(n, &m.child("kind"), NotifyKind::ALL));
        let url = self
            .required(&m, "url")
            .and_then(|n| self.secret(n, &m.child("url")));
        let secret = m
            .get("secret")
            .and_then(|n| self.secret(n, &m.child("secret")));
        let from = m.get("from").and_then(|n| self.string(n, &m.child("from")));
        let to = m.get("to").and_then(|n| self.strings(n, &m.child("to")));
        Some(NotifyTargetFile {
            name: name?,
            kind: kind?,
            url: url?,
            secret,
            from,
            to,
        })
    }

    fn schedule(&mut self, node: &Node, path: &str) -> Option<ScheduleFile> {
        let m = self.map(node, path, SCHEDULE_KEYS)?;
        let name = self
            .required(&m, "name")
            .and_then(|n| self.string(n, &m.child("name")));
        let cron = self
            .required(&m, "cron")
            .and_then(|n| self.string(n, &m.child("cron")));
        let job = self
            .required(&m, "job")
            .and_then(|n| self.word(n, &m.child("job"), JobKind::ALL));
        let time_zone = m
            .get("time_zone")
            .and_then(|n| self.string(n, &m.child("time_zone")));
        let tables = m
            .get("tables")
            .and_then(|n| self.strings(n, &m.child("tables")));
        let catch_up = m
            .get("catch_up")
            .and_then(|n| self.boolean(n, &m.child("catch_up")));
        Some(ScheduleFile {
            name: name?,
            cron: cron?,
            time_zone,
            job: job?,
            tables,
            catch_up,
        })
    }

    /// `labels:` as a mapping of scalar values; a duplicate key is reported at its second use.
    fn labels(&mut self, node: &Node, path: &str) -> Option<LabelsFile> {
        let entries = self.free_map(node, path, "a mapping of key: value", |key, first| {
            format!("duplicate key `{key}` in `{path}` (first at {first})")
        })?;
        let labels = entries
            .into_iter()
            .filter_map(|(key, v)| {
                let value = self.string(v, &join(path, &key.value))?;
                Some((key, value))
            })
            .collect();
        Some(LabelsFile(labels))
    }

    fn source(&mut self, node: &Node, path: &str) -> Option<SourceFile> {
        let m = self.map(node, path, SOURCE_KEYS)?;
        let url = m.get("url").and_then(|n| self.secret(n, &m.child("url")));
        let urls = m.get("urls").and_then(|n| {
            let items = self.seq(n, &m.child("urls"))?;
            let urls: Vec<_> = items
                .iter()
                .enumerate()
                .filter_map(|(i, n)| self.secret(n, &format!("{path}.urls[{i}]")))
                .collect();
            (urls.len() == items.len()).then_some(urls)
        });
        // A key that is there but unreadable was reported already; no "needs one of" on top.
        if (m.get("url").is_some() && url.is_none()) || (m.get("urls").is_some() && urls.is_none())
        {
            return None;
        }
        Some(SourceFile {
            url,
            urls,
            loc: node.loc,
        })
    }

    fn log(&mut self, node: &Node, path: &str) -> Option<LogFile> {
        let m = self.map(node, path, LOG_KEYS)?;
        let embedded = m
            .entries
            .iter()
            .find(|(k, _)| *k == "embedded")
            .and_then(|(_, n)| {
                let m = self.map(n, &join(path, "embedded"), EMBEDDED_KEYS)?;
                let path = m.get("path").and_then(|n| self.string(n, &m.child("path")));
                Some(EmbeddedFile { path })
            });
        let kafka = m
            .get("kafka")
            .and_then(|n| self.kafka(n, &m.child("kafka")));
        Some(LogFile {
            embedded,
            kafka,
            loc: node.loc,
        })
    }

    fn kafka(&mut self, node: &Node, path: &str) -> Option<KafkaFile> {
        let m = self.map(node, path, KAFKA_KEYS)?;
        let brokers = self.required(&m, "brokers").and_then(|n| match &n.kind {
            Kind::Seq(items) if items.is_empty() => {
                self.err(n.loc, "`log.kafka.brokers` is empty");
                None
            }
            Kind::Seq(_) => self
                .strings(n, &m.child("brokers"))
                .map(|s| Brokers::List(s.value)),
            _ => self.string(n, &m.child("brokers")).map(Brokers::Csv),
        });
        let topic_prefix = m
            .get("topic_prefix")
            .and_then(|n| self.string(n, &m.child("topic_prefix")));
        let schema_registry = m
            .get("schema_registry")
            .and_then(|n| self.string(n, &m.child("schema_registry")));
        Some(KafkaFile {
            brokers: brokers?,
            topic_prefix,
            schema_registry,
        })
    }

    fn graph(&mut self, node: &Node, path: &str) -> Option<GraphFile> {
        let m = self.map(node, path, GRAPH_KEYS)?;
        let opt = |r: &mut Self, key: &str| m.get(key).and_then(|n| r.string(n, &m.child(key)));
        let req =
            |r: &mut Self, key: &str| r.required(&m, key).and_then(|n| r.string(n, &m.child(key)));
        let base_url = opt(self, "base_url");
        let token_url = opt(self, "token_url");
        let tenant = req(self, "tenant");
        let client_id = req(self, "client_id");
        let client_secret = m
            .get("client_secret")
            .and_then(|n| self.secret(n, &m.child("client_secret")));
        let client_certificate = m
            .get("client_certificate")
            .and_then(|n| self.certificate(n, &m.child("client_certificate")));
        match (m.get("client_secret"), m.get("client_certificate")) {
            (None, None) => self.err(
                m.loc,
                "missing `client_secret` or `client_certificate` in `graph` (give one)",
            ),
            (Some(_), Some(c)) => self.err(
                c.loc,
                "`graph.client_secret` and `graph.client_certificate` exclude each other: keep one",
            ),
            _ => {}
        }
        match (m.get("site"), m.get("team")) {
            (None, None) => self.err(m.loc, "missing `site` or `team` in `graph` (give one)"),
            (Some(_), Some(t)) => self.err(
                t.loc,
                "`graph.site` and `graph.team` exclude each other: keep one",
            ),
            _ => {}
        }
        let site = opt(self, "site");
        let team = opt(self, "team");
        let ru_per_minute = m
            .get("ru_per_minute")
            .and_then(|n| self.uint(n, &m.child("ru_per_minute")));
        let sharepoint_url = opt(self, "sharepoint_url");
        let hyperlinks = m
            .get("hyperlinks")
            .and_then(|n| self.word(n, &m.child("hyperlinks"), HyperlinkWrites::ALL));
        Some(GraphFile {
            base_url,
            token_url,
            tenant: tenant?,
            client_id: client_id?,
            client_secret,
            client_certificate,
            site,
            team,
            ru_per_minute,
            sharepoint_url,
            hyperlinks,
        })
    }

    fn certificate(&mut self, node: &Node, path: &str) -> Option<CertificateFile> {
        let m = self.map(node, path, CERTIFICATE_KEYS)?;
        let cert = self
            .required(&m, "cert")
            .and_then(|n| self.string(n, &m.child("cert")));
        let key = self
            .required(&m, "key")
            .and_then(|n| self.secret(n, &m.child("key")));
        Some(CertificateFile {
            cert: cert?,
            key: key?,
        })
    }

    fn sync(&mut self, node: &Node, path: &str) -> Option<SyncFile> {
        let m = self.map(node, path, SYNC_KEYS)?;
        match (m.get("table"), m.get("query")) {
            (None, None) => self.err(
                m.loc,
                format!("missing `table` or `query` in `{path}` (give one)"),
            ),
            (Some(_), Some(q)) => self.err(
                q.loc,
                format!("`{path}.table` and `{path}.query` exclude each other: keep one"),
            ),
            _ => {}
        }
        let table = m
            .get("table")
            .and_then(|n| self.string(n, &m.child("table")));
        let query = m
            .get("query")
            .and_then(|n| self.string(n, &m.child("query")));
        let poll = m.get("poll").and_then(|n| self.poll(n, &m.child("poll")));
        let list = self
            .required(&m, "list")
            .and_then(|n| self.string(n, &m.child("list")));
        let key = m.get("key").and_then(|n| self.strings(n, &m.child("key")));
        let fields = self
            .required(&m, "fields")
            .and_then(|n| self.fields(n, &m.child("fields")));
        let routes = m.get("routes").and_then(|n| {
            let path = m.child("routes");
            let items = self.seq(n, &path)?;
            let routes = items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let path = format!("{path}[{i}]");
                    let r = self.map(item, &path, ROUTE_KEYS)?;
                    let when = self
                        .required(&r, "when")
                        .and_then(|n| self.string(n, &r.child("when")));
                    let list = self
                        .required(&r, "list")
                        .and_then(|n| self.string(n, &r.child("list")));
                    Some(RouteFile {
                        when: when?,
                        list: list?,
                    })
                })
                .collect();
            Some(routes)
        });
        let pull = m.get("pull").and_then(|n| {
            let p = self.map(n, &m.child("pull"), PULL_KEYS)?;
            let enabled = p
                .get("enabled")
                .and_then(|n| self.boolean(n, &p.child("enabled")));
            let interval_ms = p
                .get("interval_ms")
                .and_then(|n| self.uint(n, &p.child("interval_ms")));
            let on_delete = p
                .get("on_delete")
                .and_then(|n| self.string(n, &p.child("on_delete")));
            Some(PullFile {
                enabled,
                interval_ms,
                on_delete,
            })
        });
        let conflict = m
            .get("conflict")
            .and_then(|n| self.word(n, &m.child("conflict"), ConflictPolicy::ALL));
        // Reported above; the entries after it are still read.
        if table.is_none() && query.is_none() {
            return None;
        }
        Some(SyncFile {
            table,
            query,
            poll,
            list: list?,
            key,
            fields: fields.unwrap_or_default(),
            routes,
            pull,
            conflict,
        })
    }

    fn poll(&mut self, node: &Node, path: &str) -> Option<PollFile> {
        let m = self.map(node, path, POLL_KEYS)?;
        let every = self
            .required(&m, "every")
            .and_then(|n| self.string(n, &m.child("every")));
        let full = m
            .get("full")
            .and_then(|n| self.boolean(n, &m.child("full")));
        let full_every = m
            .get("full_every")
            .and_then(|n| self.string(n, &m.child("full_every")));
        let cursor = m.get("cursor").and_then(|n| {
            let c = self.map(n, &m.child("cursor"), CURSOR_KEYS)?;
            let column = self
                .required(&c, "column")
                .and_then(|n| self.string(n, &c.child("column")));
            let kind = self
                .required(&c, "kind")
                .and_then(|n| self.word(n, &c.child("kind"), CursorKind::ALL));
            let lookback = c
                .get("lookback")
                .and_then(|n| self.string(n, &c.child("lookback")));
            Some(CursorFile {
                column: column?,
                kind: kind?,
                lookback,
            })
        });
        Some(PollFile {
            every: every?,
            full,
            cursor,
            full_every,
            loc: node.loc,
        })
    }

    fn fields(&mut self, node: &Node, path: &str) -> Option<FieldsFile> {
        let entries = self.free_map(node, path, "a mapping of column: field", |c, first| {
            format!("column `{c}` is mapped twice in `{path}` (first at {first})")
        })?;
        if matches!(&node.kind, Kind::Map(e) if e.is_empty()) {
            self.err(node.loc, format!("`{path}`: map at least one column"));
        }
        let mut out: Vec<(Sp<String>, FieldValueFile)> = Vec::new();
        for (column, v) in entries {
            let path = join(path, &column.value);
            let value = match &v.kind {
                Kind::Map(_) => self.field_spec(v, &path).map(FieldValueFile::Spec),
                _ => self.string(v, &path).map(FieldValueFile::Name),
            };
            if let Some(value) = value {
                out.push((column, value));
            }
        }
        Some(FieldsFile(out))
    }

    /// The entries of a mapping whose keys are the author's (`fields:`, `labels:`), in file
    /// order, each key as a located string; a key used again is reported with `twice(key,
    /// first)` and dropped. `None` (reported, expecting `what`) when `node` is no mapping.
    fn free_map<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        what: &str,
        twice: impl Fn(&str, Loc) -> String,
    ) -> Option<Vec<(Sp<String>, &'n Node)>> {
        let Kind::Map(entries) = &node.kind else {
            let found = node.kind_name();
            self.err(
                node.loc,
                format!("`{path}`: expected {what}, found {found}"),
            );
            return None;
        };
        let mut out: Vec<(Sp<String>, &'n Node)> = Vec::new();
        for (k, v) in entries {
            let Some(key) = self.key(k) else { continue };
            if let Some((first, _)) = out.iter().find(|(c, _)| c.value == key) {
                let message = twice(key, first.loc);
                self.err(k.loc, message);
                continue;
            }
            let key = Sp {
                value: key.to_owned(),
                loc: k.loc,
                interpolated: false,
            };
            out.push((key, v));
        }
        Some(out)
    }

    fn field_spec(&mut self, node: &Node, path: &str) -> Option<FieldSpecFile> {
        let m = self.map(node, path, FIELD_SPEC_KEYS)?;
        let field = self
            .required(&m, "field")
            .and_then(|n| self.string(n, &m.child("field")));
        let field_type = m
            .get("type")
            .and_then(|n| self.word(n, &m.child("type"), FieldType::ALL));
        let direction = m
            .get("direction")
            .and_then(|n| self.word(n, &m.child("direction"), Direction::ALL));
        let choices = m
            .get("choices")
            .and_then(|n| self.strings(n, &m.child("choices")));
        let list = m.get("list").and_then(|n| self.string(n, &m.child("list")));
        let conflict = m
            .get("conflict")
            .and_then(|n| self.word(n, &m.child("conflict"), ConflictPolicy::ALL));
        Some(FieldSpecFile {
            field: field?,
            field_type,
            direction,
            choices,
            list,
            conflict,
            loc: node.loc,
        })
    }

    fn control(&mut self, node: &Node, path: &str) -> Option<ControlFile> {
        let m = self.map(node, path, CONTROL_KEYS)?;
        let listen = m
            .get("listen")
            .and_then(|n| self.string(n, &m.child("listen")));
        let tokens = m.get("tokens").and_then(|node| {
            let path = m.child("tokens");
            let items = self.seq(node, &path)?;
            Some(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| self.token(item, &path, i))
                    .collect(),
            )
        });
        let meta_url = m
            .get("meta_url")
            .and_then(|n| self.secret(n, &m.child("meta_url")));
        let audit_retention = m
            .get("audit_retention")
            .and_then(|n| self.string(n, &m.child("audit_retention")));
        Some(ControlFile {
            listen,
            tokens,
            meta_url,
            audit_retention,
        })
    }

    fn token(&mut self, node: &Node, list: &str, index: usize) -> Option<TokenFile> {
        let m = self.map(node, &format!("{list}[{index}]"), TOKEN_KEYS)?;
        let name = self
            .required(&m, "name")
            .and_then(|n| self.string(n, &m.child("name")));
        let token = self
            .required(&m, "token")
            .and_then(|n| self.secret(n, &m.child("token")));
        let role = self
            .required(&m, "role")
            .and_then(|n| self.word(n, &m.child("role"), ApiRole::ALL));
        Some(TokenFile {
            name: name?,
            token: token?,
            role: role?,
            index,
        })
    }

    fn guard(&mut self, node: &Node, path: &str) -> Option<GuardFile> {
        let m = self.map(node, path, GUARD_KEYS)?;
        let dead_letters = m
            .get("dead_letters")
            .and_then(|n| self.dead_letter_guard(n, &m.child("dead_letters")));
        let schema_wait_ms = m
            .get("schema_wait_ms")
            .and_then(|n| self.uint(n, &m.child("schema_wait_ms")));
        let push = m
            .get("push")
            .and_then(|n| self.delete_guard(n, &m.child("push")));
        let pull = m
            .get("pull")
            .and_then(|n| self.delete_guard(n, &m.child("pull")));
        Some(GuardFile {
            dead_letters,
            push,
            pull,
            schema_wait_ms,
        })
    }

    fn delete_guard(&mut self, node: &Node, path: &str) -> Option<DeleteGuardFile> {
        let m = self.map(node, path, DELETE_GUARD_KEYS)?;
        let enabled = m
            .get("enabled")
            .and_then(|n| self.boolean(n, &m.child("enabled")));
        let mut num = |key: &str| m.get(key).and_then(|n| self.uint(n, &m.child(key)));
        Some(DeleteGuardFile {
            enabled,
            max_deletes: num("max_deletes"),
            max_percent: num("max_percent"),
            min_deletes: num("min_deletes"),
            window_ms: num("window_ms"),
            hold_ms: num("hold_ms"),
        })
    }

    fn dead_letter_guard(&mut self, node: &Node, path: &str) -> Option<DeadLetterGuardFile> {
        let m = self.map(node, path, DEAD_LETTER_GUARD_KEYS)?;
        let mut num = |key: &str| m.get(key).and_then(|n| self.uint(n, &m.child(key)));
        Some(DeadLetterGuardFile {
            consecutive: num("consecutive"),
            window: num("window"),
            max_percent: num("max_percent"),
        })
    }
}

/// Like [`shown`], but says why a quoted scalar is not a number or boolean.
fn describe(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar(s) if !s.plain && !s.interpolated => {
            format!("the quoted string {}", shown(node))
        }
        _ => node.kind_name().into(),
    }
}
