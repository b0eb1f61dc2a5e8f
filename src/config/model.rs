//! The validated, typed pipeline configuration (what the rest of SyncBridge consumes).
//!
//! Every value here has passed validation and has its defaults applied. Secrets are held in
//! [`Secret`] and [`PgUrl`], whose `Debug`, `Display` and `Serialize` never reveal them, so the
//! whole config can be logged or served by the API as is.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

/// Microsoft Graph v1.0 endpoint of the public cloud.
pub const DEFAULT_GRAPH_BASE_URL: &str = "https://graph.microsoft.com/v1.0";
/// Entra ID v2 token endpoint; `{tenant}` is replaced by `graph.tenant` when the config is built.
pub const DEFAULT_TOKEN_URL: &str = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token";
/// Smallest licence tier (graph-api.md §8.3): safe for any tenant; raise it for larger tiers.
pub const DEFAULT_RU_PER_MINUTE: u32 = 1250;
/// Delta polling every 2 s keeps pull latency low while costing ≤ 30 RU/min per idle list.
pub const DEFAULT_PULL_INTERVAL_MS: u64 = 2000;
/// Faster polling than this burns the RU budget for no visible gain.
pub const MIN_PULL_INTERVAL_MS: u64 = 100;
/// Pull is on by default: two-way sync is the product; turn it off for push-only mirrors.
pub const DEFAULT_PULL_ENABLED: bool = true;
/// Deleting the row is the default: the list mirrors the table, and in two-way sync a person
/// deleting an item means the record is gone; `soft:<column>` or `ignore` keep the row on purpose.
pub const DEFAULT_ON_DELETE: OnDelete = OnDelete::Delete;
/// Loopback by default: health and metrics are unauthenticated and must be exposed on purpose.
pub const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:8088";
/// Audit records (`GET …/rows/{table}/{key}/history`) are kept 30 days: long enough to answer
/// "what happened to this row" about last month's incident, while a busy pipeline's audit table
/// (one row per row change) stays a bounded size. The log keeps its own retention.
pub const DEFAULT_AUDIT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);
/// Shorter than an hour would prune records before an operator could look at them.
pub const MIN_AUDIT_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);
/// Embedded log directory: `<this>/<pipeline name>`, relative to the working directory.
pub const DEFAULT_EMBEDDED_LOG_DIR: &str = ".syncbridge";
/// Kafka topics are `<prefix>.<pipeline>.…` (DESIGN §2); the product name keeps them apart.
pub const DEFAULT_TOPIC_PREFIX: &str = "syncbridge";
/// SharePoint limits a column's internal name to 32 characters.
pub const MAX_FIELD_NAME_LEN: usize = 32;
/// SharePoint list titles are limited to 255 characters.
pub const MAX_LIST_TITLE_LEN: usize = 255;
/// PostgreSQL truncates identifiers beyond NAMEDATALEN-1 = 63 bytes.
pub const MAX_PG_IDENT_LEN: usize = 63;
/// SharePoint system fields: read-only, so they can only be read (`pull_only`), never written.
pub const SYSTEM_FIELDS: &[&str] = &[
    "ID",
    "Created",
    "Modified",
    "Author",
    "Editor",
    "ContentType",
    "ContentTypeId",
    "Attachments",
    "GUID",
];
/// The hidden column SyncBridge keeps on every item (DESIGN §6); it cannot be mapped.
pub const SYNC_KEY_FIELD: &str = "SyncKey";
/// The label that names a pipeline's application: the inventory's top level.
pub const APPLICATION_LABEL: &str = "application";
/// Label keys: a lower-case letter, then lower-case letters, digits, `_`, `.`, `-`. Lower case
/// and no spaces so a key reads the same in YAML, JSON, URLs and Prometheus-style selectors.
pub const LABEL_KEY_PATTERN: &str = r"^[a-z][a-z0-9_.-]{0,62}$";
/// 63 characters, PostgreSQL's identifier limit, so a key can become a column name as is.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Labels are names and short descriptions shown in one line of a table, not documents.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// A secret value. `Debug`, `Display` and `Serialize` print `***`; call [`Secret::expose`] to use it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: pass it on, never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "writeOnly": true })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// libpq connects here when a URL names no host (its Unix socket, shown as this name).
pub const DEFAULT_PG_HOST: &str = "localhost";
/// PostgreSQL's registered port, libpq's default.
pub const DEFAULT_PG_PORT: u16 = 5432;

/// A `postgres://` URL whose password (in the user info or a `password=` query parameter) is
/// redacted by `Debug`, `Display` and `Serialize`; [`PgUrl::expose`] gives the full URL.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl(Url);

impl PgUrl {
    /// Accepts `postgres://` and `postgresql://` URLs only.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let url = Url::parse(text).map_err(|_| "is not a valid URL")?;
        match url.scheme() {
            "postgres" | "postgresql" => Ok(PgUrl(url)),
            _ => Err("must be a postgres:// or postgresql:// URL"),
        }
    }
    /// The full URL, password included: for connecting only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
    fn param(&self, key: &str) -> Option<String> {
        self.0
            .query_pairs()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.into_owned())
    }

    /// The database name as libpq resolves it: `dbname=` in the query, else the URL's path
    /// (percent-decoded), else the user name (libpq's default database).
    pub fn database(&self) -> String {
        let path = decode(self.0.path().trim_start_matches('/'));
        self.param("dbname")
            .or((!path.is_empty()).then_some(path))
            .or_else(|| self.param("user"))
            .unwrap_or_else(|| decode(self.0.username()))
    }

    /// The server as `(host, port)`: `host=` / `port=` in the query, else the URL's, else
    /// libpq's defaults (`localhost`, 5432). Holds no user name or password.
    pub fn server(&self) -> (String, u16) {
        let host = self
            .param("host")
            .or_else(|| self.0.host_str().map(str::to_owned))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| DEFAULT_PG_HOST.to_owned());
        let port = self
            .param("port")
            .and_then(|p| p.parse().ok())
            .or(self.0.port())
            .unwrap_or(DEFAULT_PG_PORT);
        (host, port)
    }

    /// The URL with passwords replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        if url.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" {
                        "***".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({:?})", self.redacted())
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for PgUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

// `url` is built without its `serde` feature; these print URLs as strings.
fn ser_url<S: Serializer>(url: &Url, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(url.as_str())
}

fn ser_opt_url<S: Serializer>(url: &Option<Url>, s: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_str(u.as_str()),
        None => s.serialize_none(),
    }
}

/// A validated pipeline: one file, one replication slot, one set of topics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineConfig {
    /// `[a-z][a-z0-9_]{0,40}`; names the slot, publication, topics and state directory.
    pub name: String,
    pub source: SourceConfig,
    pub log: LogConfig,
    pub graph: GraphConfig,
    /// In file order.
    pub sync: Vec<SyncEntry>,
    pub control: ControlConfig,
    pub guard: GuardConfig,
    /// `labels:` (checked keys and values); empty when the file has none.
    pub labels: BTreeMap<String, String>,
    /// `schedules:`, in file order; empty when the file has none.
    pub schedules: Vec<ScheduleConfig>,
    /// `notify:`; `None`: no notifications.
    pub notify: Option<NotifyConfig>,
    /// `drift:`.
    pub drift: DriftConfig,
}

/// `drift:` (see `crate::process::drift`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftConfig {
    /// Share of `graph.ru_per_minute` a check may spend on average, in (0, 1].
    pub budget_share: f64,
}

/// Half: a check pages through every list, and the writers and the delta pollers keep the other
/// half of the tenant's budget meanwhile.
pub const DEFAULT_BUDGET_SHARE: f64 = 0.5;

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            budget_share: DEFAULT_BUDGET_SHARE,
        }
    }
}

impl PipelineConfig {
    /// `labels.application`, which groups pipelines into applications in the inventory.
    pub fn application(&self) -> Option<&str> {
        self.labels.get(APPLICATION_LABEL).map(String::as_str)
    }
}

/// The PostgreSQL database the tables live in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceConfig {
    /// The primary (the first of `source.urls`): every connection but capture's failover uses it.
    pub url: PgUrl,
    /// The other instances of `source.urls`, in order: capture and the applier try them when the
    /// current primary is lost (see ops/docs/failover.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub standbys: Vec<PgUrl>,
}

impl SourceConfig {
    /// Every configured instance, the primary first.
    pub fn instances(&self) -> impl Iterator<Item = &PgUrl> {
        std::iter::once(&self.url).chain(&self.standbys)
    }
}

/// Where events are kept between capture and the writers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogConfig {
    /// The sled-backed single-process log (the default).
    Embedded {
        /// Relative paths are relative to the working directory.
        path: PathBuf,
    },
    Kafka {
        /// `host:port` bootstrap servers.
        brokers: Vec<String>,
        topic_prefix: String,
        /// Confluent wire format (schema ids from this registry) instead of single-object
        /// encoding.
        schema_registry: Option<SchemaRegistryConfig>,
    },
}

/// A Confluent-compatible schema registry (`log.kafka.schema_registry`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaRegistryConfig {
    /// The registry's base URL, without user info.
    #[serde(serialize_with = "ser_url")]
    pub url: Url,
    /// HTTP basic auth user, from the URL's user info (percent-decoded).
    pub username: Option<String>,
    /// HTTP basic auth password, from the URL's user info (percent-decoded).
    pub password: Option<Secret>,
}

impl SchemaRegistryConfig {
    /// Splits `url`'s user info (`https://user:password@host`) off into basic-auth credentials,
    /// so the URL itself can be logged and served.
    pub fn from_url(mut url: Url) -> Self {
        let username = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(|p| Secret::new(decode(p)));
        let _ = url.set_username("");
        let _ = url.set_password(None);
        SchemaRegistryConfig {
            url,
            username,
            password,
        }
    }
}

/// Percent-decodes URL user info (`%40` → `@`); invalid escapes are kept as they are.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Microsoft Graph access for one tenant and site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphConfig {
    #[serde(serialize_with = "ser_url")]
    pub base_url: Url,
    /// With `{tenant}` already replaced by [`GraphConfig::tenant`].
    #[serde(serialize_with = "ser_url")]
    pub token_url: Url,
    pub tenant: String,
    pub client_id: String,
    /// Shown as the file's key (`client_secret` or `client_certificate`).
    #[serde(flatten)]
    pub credential: GraphCredential,
    /// Where the lists live; shown as the file's key (`site` or `team`).
    #[serde(flatten)]
    pub site: SiteRef,
    pub ru_per_minute: u32,
    /// Root of SharePoint's REST API (hyperlink writes, `ops/docs/hyperlinks.md`); `None`:
    /// `https://` + the site's host name, known once the site is resolved.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ser_opt_url"
    )]
    pub sharepoint_url: Option<Url>,
    pub hyperlinks: HyperlinkWrites,
}

/// The site holding the lists (graph.site or graph.team).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRef {
    /// `hostname:/server-relative-path` (or a bare hostname for the root site).
    Site(String),
    /// A Team's display name or group id, resolved to the group's root site at start-up.
    Team(String),
}

impl SiteRef {
    /// Identifies the target across files (case-insensitive, a team apart from a site path).
    pub fn key(&self) -> String {
        match self {
            SiteRef::Site(s) => s.to_lowercase(),
            SiteRef::Team(t) => format!("team:{}", t.to_lowercase()),
        }
    }
}

impl From<&str> for SiteRef {
    fn from(site: &str) -> SiteRef {
        SiteRef::Site(site.to_string())
    }
}

impl fmt::Display for SiteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteRef::Site(s) => write!(f, "site `{s}`"),
            SiteRef::Team(t) => write!(f, "Team `{t}`"),
        }
    }
}

impl GraphConfig {
    /// The client secret, when the app signs in with one.
    pub fn client_secret(&self) -> Option<&Secret> {
        match &self.credential {
            GraphCredential::ClientSecret(s) => Some(s),
            GraphCredential::ClientCertificate { .. } => None,
        }
    }
}

/// How the app signs in (graph.client_secret or graph.client_certificate).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphCredential {
    ClientSecret(Secret),
    ClientCertificate {
        /// PEM certificate file.
        cert: PathBuf,
        /// The RSA private key: a PEM file's path, or the PEM itself (from `${ENV}`).
        key: Secret,
    },
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One table (or query) synced with one list (plus its route lists).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncEntry {
    /// The table; for a query source the name its events carry ([`QUERY_SCHEMA`]`.<list slug>`,
    /// see [`query_table_name`]): it names the topic, the ledger keys and the audit.
    pub table: TableName,
    /// `query:` + `poll:` instead of `table:`: read by polling, never by replication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<QuerySource>,
    /// Display name of the default target list.
    pub list: String,
    /// Key columns; `None` means the table's primary key (resolved against the database).
    pub key: Option<Vec<String>>,
    /// In file order.
    pub fields: Vec<FieldMapping>,
    /// First match wins; no match goes to `list`.
    pub routes: Vec<Route>,
    pub pull: PullConfig,
    pub conflict: ConflictPolicy,
}

impl SyncEntry {
    /// Every list this entry writes to: the default list, then the route lists.
    pub fn lists(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.list.as_str()).chain(self.routes.iter().map(|r| r.list.as_str()))
    }
}

/// The schema part of a query source's [`TableName`]: not a PostgreSQL schema, a namespace for
/// the names of query sources' topics and ledger keys.
pub const QUERY_SCHEMA: &str = "query";

/// Whether `schema.table` names a query source (its schema is [`QUERY_SCHEMA`], which `table:`
/// entries may not use).
pub fn is_query_table(qualified: &str) -> bool {
    qualified
        .split_once('.')
        .is_some_and(|(schema, _)| schema == QUERY_SCHEMA)
}

/// The [`TableName`] a query source's events carry: `query.<list slug>` (lower-case ASCII
/// letters, digits and `_`). Derived from the list, which belongs to one entry, so it stays the
/// same when entries are reordered (the ledger and the topic are keyed by it).
pub fn query_table_name(list: &str) -> TableName {
    let mut name: String = list
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(MAX_PG_IDENT_LEN);
    TableName {
        schema: QUERY_SCHEMA.into(),
        name,
    }
}

/// A query polled instead of a table read by replication (`query:` + `poll:`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuerySource {
    /// The SELECT, as written (without a trailing `;`).
    pub sql: String,
    /// Time between two reads (`poll.every`).
    #[serde(serialize_with = "duration_text")]
    pub every: std::time::Duration,
    /// `None`: every read is a full read (`poll.full: true`).
    pub cursor: Option<QueryCursor>,
    /// With a cursor: a full read (which finds deleted rows) at most this often.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_every: Option<std::time::Duration>,
}

impl QuerySource {
    /// How its events name their origin (`source.connector`).
    pub fn connector(&self, full: bool) -> &'static str {
        match (&self.cursor, full) {
            (None, _) | (_, true) => crate::event::change::CONNECTOR_QUERY_FULL,
            (Some(c), false) => match c.kind {
                CursorKind::Timestamp => crate::event::change::CONNECTOR_QUERY_TIMESTAMP,
                CursorKind::Incrementing => crate::event::change::CONNECTOR_QUERY_INCREMENTING,
            },
        }
    }
}

/// An incremental read: rows whose `column` is past the last value read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryCursor {
    pub column: String,
    pub kind: CursorKind,
    /// Timestamp cursors re-read this far before the cursor: a transaction that commits after a
    /// later-stamped one is still seen if it commits within this window.
    #[serde(serialize_with = "duration_text")]
    pub lookback: std::time::Duration,
}

/// No lookback unless asked: it re-reads (and re-emits the changed part of) that window each poll.
pub const DEFAULT_QUERY_LOOKBACK: std::time::Duration = std::time::Duration::ZERO;

/// One column ↔ one SharePoint field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldMapping {
    pub column: String,
    /// SharePoint internal name.
    pub field: String,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    pub direction: Direction,
    /// Allowed values of `choice` / `multichoice` fields (empty otherwise).
    pub choices: Vec<String>,
    /// For `lookup` fields: display name of the synced list the foreign key points into.
    pub lookup_list: Option<String>,
    /// Overrides the entry's conflict policy for this field.
    pub conflict: Option<ConflictPolicy>,
}

impl FieldMapping {
    /// A bidirectional mapping of `column` to the field named like it in upper case (tests).
    #[cfg(test)]
    pub(crate) fn for_test(column: &str, field_type: FieldType) -> Self {
        FieldMapping {
            column: column.into(),
            field: column.to_uppercase(),
            field_type,
            direction: Direction::Bidirectional,
            choices: Vec::new(),
            lookup_list: None,
            conflict: None,
        }
    }

    /// The policy that applies to this field in `entry`.
    pub fn conflict_policy(&self, entry: &SyncEntry) -> ConflictPolicy {
        self.conflict.unwrap_or(entry.conflict)
    }
}

/// A sharding rule: rows for which the CEL expression `when` is true go to `list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    /// A CEL expression over the row's columns (checked to parse).
    pub when: String,
    pub list: String,
}

/// The return path for one entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PullConfig {
    pub enabled: bool,
    pub interval_ms: u64,
    /// What deleting an item in the list does to its row.
    pub on_delete: OnDelete,
}

/// What a pull does to the row of an item deleted in the list (`pull.on_delete`).
///
/// `Display` and `Serialize` give the YAML spelling: `delete`, `ignore`, `soft:<column>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OnDelete {
    /// `DELETE` the row; the default ([`DEFAULT_ON_DELETE`]).
    Delete,
    /// Keep the row and set `column` (a PostgreSQL identifier, never a key column) to mark it
    /// deleted, e.g. `soft:deleted_at`.
    Soft { column: String },
    /// Leave the row as it is.
    Ignore,
}

impl fmt::Display for OnDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnDelete::Delete => f.write_str("delete"),
            OnDelete::Soft { column } => write!(f, "soft:{column}"),
            OnDelete::Ignore => f.write_str("ignore"),
        }
    }
}

impl Serialize for OnDelete {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The control-plane HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControlConfig {
    pub listen: SocketAddr,
    /// Bearer tokens of the HTTP API; empty: the API is open (loopback `listen` only).
    pub tokens: Vec<ApiToken>,
    /// The meta-store database (schema `syncbridge_meta`); `source.url` unless set.
    pub meta_url: PgUrl,
    /// How long audit records stay in the meta-store (`control.audit_retention`).
    #[serde(serialize_with = "duration_text")]
    pub audit_retention: std::time::Duration,
}

/// A duration as `control.audit_retention` spells it (whole days, hours, minutes or seconds).
fn duration_text<S: Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_duration(*d))
}

/// `30d`, `12h`, `90m` or `45s`: the largest unit that divides the duration.
pub fn format_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs > 0 && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

/// Parses `<n>d`, `<n>h`, `<n>m` or `<n>s` (a whole number and one unit).
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let t = text.trim();
    let unit = t.chars().last()?;
    let n: u64 = t[..t.len() - unit.len_utf8()].trim().parse().ok()?;
    let secs = match unit {
        'd' => n.checked_mul(86_400)?,
        'h' => n.checked_mul(3_600)?,
        'm' => n.checked_mul(60)?,
        's' => n,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

/// One bearer token of the control-plane API (`control.tokens[]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiToken {
    /// Who holds it; logged instead of the token.
    pub name: String,
    pub token: Secret,
    pub role: ApiRole,
}

/// Guards that pause a pipeline (`guard:`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardConfig {
    pub dead_letters: DeadLetterGuard,
    /// Deletes bound for the lists (row deletes in PostgreSQL).
    pub push: DeleteGuard,
    /// Deletes bound for the tables (items deleted in a list, pull `on_delete: delete`).
    pub pull: DeleteGuard,
    /// How long an event with a schema not yet in the schemas topic waits before a pause.
    pub schema_wait_ms: u64,
}

/// A minute covers a consumer joining its group on a slow broker and a partition leader moving
/// (capture writes a schema before its first record, so on a healthy log it is there at once),
/// and is short enough that an operator hears of a truly lost schema.
pub const DEFAULT_SCHEMA_WAIT_MS: u64 = 60_000;

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            dead_letters: DeadLetterGuard::default(),
            push: DeleteGuard::default(),
            pull: DeleteGuard::default(),
            schema_wait_ms: DEFAULT_SCHEMA_WAIT_MS,
        }
    }
}

/// Dead letters of one kind beyond these limits pause the pipeline (0 turns a rule off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeadLetterGuard {
    pub consecutive: u32,
    pub window: u32,
    pub max_percent: u8,
}

/// 20 in a row: a few bad rows in a burst (a bulk import with one bad column) stay below it,
/// while a pipeline fault (a lost schema, a list that rejects every write) trips it within a
/// second of traffic, before many events are dead-lettered.
pub const DEFAULT_DEAD_LETTER_RUN: u32 = 20;
/// The share rule catches faults interleaved with successes (every write to one of two lists
/// fails); 200 events is long enough not to trip on a short bad burst.
pub const DEFAULT_DEAD_LETTER_WINDOW: u32 = 200;
/// More than half of the window failing the same way is not a data problem.
pub const DEFAULT_DEAD_LETTER_PERCENT: u8 = 50;

impl Default for DeadLetterGuard {
    fn default() -> Self {
        Self {
            consecutive: DEFAULT_DEAD_LETTER_RUN,
            window: DEFAULT_DEAD_LETTER_WINDOW,
            max_percent: DEFAULT_DEAD_LETTER_PERCENT,
        }
    }
}

/// The accidental-delete guard of one direction (`guard.push`, `guard.pull`): more deletes
/// within `window_ms` than the threshold pause that direction's deletes until an operator allows
/// or discards them (see `crate::process::delete_guard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeleteGuard {
    /// Off: every delete is carried at once, as before the guard existed.
    pub enabled: bool,
    pub max_deletes: u32,
    pub max_percent: u8,
    /// Below this many deletes the percent rule never pauses.
    pub min_deletes: u32,
    pub window_ms: u64,
    pub hold_ms: u64,
}

/// Microsoft Entra Connect's 'prevent accidental deletes' stops an export of more than 500
/// deletions: the figure administrators already know.
pub const DEFAULT_GUARD_MAX_DELETES: u32 = 500;
/// 10 % of the items the pipeline manages: on a list of 1,000 items, 100 deletes in a window are
/// unusual enough to ask a person first.
pub const DEFAULT_GUARD_MAX_PERCENT: u8 = 10;
/// The percent rule does not apply below 100 deletes: 10 % of a 30-item list is 3, and routine
/// clean-ups of small lists must not wait for an operator.
pub const DEFAULT_GUARD_MIN_DELETES: u32 = 100;
/// A minute: a script or a person emptying a list does it within seconds; routine deletes
/// spread over the day never add up.
pub const DEFAULT_GUARD_WINDOW_MS: u64 = 60_000;
/// Deletes are not held by default: one statement's deletes (a `DELETE` of many rows, a
/// truncate) are one transaction, which a flush never splits, so they are counted whole anyway,
/// and the threshold bounds what passes in any case. A hold would add its latency to every delete
/// and move; set it to count bursts spread over many transactions or delta polls before any of
/// them is applied.
pub const DEFAULT_GUARD_HOLD_MS: u64 = 0;

impl Default for DeleteGuard {
    fn default() -> Self {
        Self {
            enabled: true,
            max_deletes: DEFAULT_GUARD_MAX_DELETES,
            max_percent: DEFAULT_GUARD_MAX_PERCENT,
            min_deletes: DEFAULT_GUARD_MIN_DELETES,
            window_ms: DEFAULT_GUARD_WINDOW_MS,
            hold_ms: DEFAULT_GUARD_HOLD_MS,
        }
    }
}

impl DeleteGuard {
    /// The most deletes allowed within the window for a side holding `target` items: the
    /// smaller of `max_deletes` and `max_percent` of `target` (never below `min_deletes`).
    pub fn threshold(&self, target: usize) -> usize {
        let share = (target as u64 * u64::from(self.max_percent) / 100) as usize;
        let share = share.max(self.min_deletes as usize);
        share.min(self.max_deletes as usize)
    }
}

/// Declares an enum of YAML words with a table used both for parsing and for messages.
macro_rules! words {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value with its YAML spelling.
            pub const ALL: &[(&str, $name)] = &[$(($word, $name::$variant)),+];
            /// The YAML spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
            /// Parses the YAML spelling.
            pub fn parse(word: &str) -> Option<Self> {
                Self::ALL.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words! {
    /// What a query source's cursor column holds (`poll.cursor.kind`).
    CursorKind {
        /// A time the row was last written (`timestamp` / `timestamptz`).
        Timestamp = "timestamp",
        /// A value that grows with every insert or update (a sequence or version number).
        Incrementing = "incrementing",
    }
}

words! {
    /// SharePoint column type a field is written as (DESIGN §6).
    FieldType {
        /// Single line of text (255 characters); the default.
        Text = "text",
        /// Multiple lines of text.
        Note = "note",
        Number = "number",
        Currency = "currency",
        Date = "date",
        #[serde(rename = "datetime")]
        DateTime = "datetime",
        Boolean = "boolean",
        /// Needs `choices`.
        Choice = "choice",
        /// Needs `choices`.
        #[serde(rename = "multichoice")]
        MultiChoice = "multichoice",
        /// Email → user lookup id.
        Person = "person",
        /// Foreign key → item id in another synced list; needs `list`.
        Lookup = "lookup",
        Hyperlink = "hyperlink",
    }
}

impl FieldType {
    /// Graph refuses writes of this type (graph-api.md §5.7): it is written through
    /// SharePoint's REST API after the Graph write of the other fields.
    pub fn needs_sharepoint_rest(self) -> bool {
        matches!(self, FieldType::Hyperlink)
    }
}

impl FieldMapping {
    /// The push writes this field through SharePoint REST (with `graph.hyperlinks` at its
    /// default).
    pub fn written_by_sharepoint_rest(&self) -> bool {
        self.field_type.needs_sharepoint_rest() && self.direction != Direction::PullOnly
    }
}

words! {
    /// How hyperlink fields are written (`graph.hyperlinks`, `ops/docs/hyperlinks.md`).
    HyperlinkWrites {
        /// Through SharePoint REST after the Graph write (Graph refuses them); the default.
        SharepointRest = "sharepoint_rest",
        /// Through Graph with the other fields: only where Graph accepts them (an emulator
        /// in its accepting mode), kept for the tests that use Graph's refusal.
        Graph = "graph",
    }
}

words! {
    /// Which way a field's changes flow.
    Direction {
        /// Both ways; the default.
        Bidirectional = "bidirectional",
        /// Postgres → SharePoint only; list edits are ignored.
        PushOnly = "push_only",
        /// SharePoint → Postgres only (e.g. system fields such as `Created`).
        PullOnly = "pull_only",
    }
}

words! {
    /// Who wins when both sides changed since the last sync (DESIGN §8).
    ConflictPolicy {
        /// Postgres wins; the default (the database is the system of record).
        SourceWins = "source_wins",
        TargetWins = "target_wins",
        /// Postgres commit time vs SharePoint `lastModifiedDateTime`.
        LastWriterWins = "last_writer_wins",
        /// Parked for an operator.
        Manual = "manual",
    }
}

words! {
    /// What an API token may do.
    ApiRole {
        /// GET routes only.
        Read = "read",
        /// Every route, including the ones that change something.
        Operate = "operate",
    }
}

words! {
    /// What a `schedules:` entry runs.
    JobKind {
        /// Compares the tables with the lists (a dry run: reports, changes nothing).
        DriftCheck = "drift_check",
        /// Fixes what a drift check finds, through the writer path.
        DriftHeal = "drift_heal",
        /// Re-snapshots `tables` (default: every synced table) while streaming continues.
        Resnapshot = "resnapshot",
        /// Appends the pending dead letters back to their topics.
        DlqReplay = "dlq_replay",
    }
}

/// One recurring job (`schedules:`), evaluated by `crate::control::schedule`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleConfig {
    /// Unique in the pipeline; names the job's runs and its lease.
    pub name: String,
    /// The cron expression as written (5 fields, or 6 with seconds first); checked by validation.
    pub cron: String,
    /// IANA time zone the expression is read in.
    #[serde(serialize_with = "serialize_tz")]
    pub time_zone: chrono_tz::Tz,
    pub job: JobKind,
    /// `resnapshot`: `schema.table`s, each a synced table; empty for the other jobs.
    pub tables: Vec<String>,
    /// A tick missed while no process ran the pipeline runs once at the next start.
    pub catch_up: bool,
}

/// Schedules run in UTC unless they say otherwise: the same instant on every host.
pub const DEFAULT_SCHEDULE_TIME_ZONE: chrono_tz::Tz = chrono_tz::UTC;

fn serialize_tz<S: serde::Serializer>(tz: &chrono_tz::Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

/// Reads a `schedules[].cron` expression: 5 fields, or 6 with seconds first (croner's default
/// parser). The one place both validation and the scheduler parse it, so they agree.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    expr.trim()
        .parse::<croner::Cron>()
        .map_err(|e| e.to_string())
}

words! {
    /// The wire format of a notification target.
    NotifyKind {
        /// JSON body, `X-SyncBridge-Signature: sha256=<hex HMAC-SHA256 of the body>`.
        Webhook = "webhook",
        /// Microsoft Teams incoming webhook / workflow: an Adaptive Card.
        Teams = "teams",
        /// Slack-compatible incoming webhook (`{"text": …}`; Mattermost, Rocket.Chat too).
        Slack = "slack",
        /// SMTP: `smtp://` with STARTTLS (plain only on loopback) or `smtps://`.
        Email = "email",
    }
}

/// `notify:` (see `crate::control::notify`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyConfig {
    pub targets: Vec<NotifyTarget>,
    pub window: std::time::Duration,
    pub dead_letters: u64,
    pub slot_lag_bytes: u64,
    /// Differences a drift check may find without firing `drift:<pipeline>`.
    pub drift_threshold: u64,
}

/// Five minutes: long enough that a flapping condition does not page every few seconds, short
/// enough that a new failure is heard of within a coffee break.
pub const DEFAULT_NOTIFY_WINDOW_S: u64 = 300;
/// Any dead letter is worth a look: a row that does not reach its list is data loss to a user.
pub const DEFAULT_NOTIFY_DEAD_LETTERS: u64 = 1;
/// 1 GiB of WAL held back by the slot: well before a typical disk fills, far above normal lag.
pub const DEFAULT_NOTIFY_SLOT_LAG_BYTES: u64 = 1 << 30;
/// Any difference: the two sides should be equal, so each one is worth a look.
pub const DEFAULT_NOTIFY_DRIFT_THRESHOLD: u64 = 0;

/// One notification target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NotifyTarget {
    pub name: String,
    pub kind: NotifyKind,
    pub url: Secret,
    pub secret: Option<Secret>,
    /// `email`: sender and recipients (checked addresses).
    pub from: Option<String>,
    pub to: Vec<String>,
}

/// `localhost` or a loopback IP: where plain `http://` / SMTP without TLS is allowed (a local
/// receiver or relay on the same host).
pub fn is_loopback_host(u: &Url) -> bool {
    u.host_str().is_some_and(|h| {
        h == "localhost"
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}
