//! Configuration of one capture pipeline (one slot, one publication).

use std::path::PathBuf;
use std::time::Duration;

use super::error::CaptureError;

/// Rows per snapshot chunk. One chunk is one keyset query, one sink append and one durable progress
/// record: 10 000 rows of a typical table are a few MB in memory, take well under a second to read
/// and append, and keep the re-read after a crash (at most one chunk) small, while the per-chunk
/// fsync of the progress file stays a negligible cost.
pub const DEFAULT_SNAPSHOT_CHUNK_SIZE: usize = 10_000;
/// How often a heartbeat message is written into the WAL so an idle slot keeps advancing.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the acknowledged (durable) LSN is reported to the server while events flow (≤ 1 s).
pub const DEFAULT_FEEDBACK_INTERVAL: Duration = Duration::from_millis(500);
/// Largest number of committed events appended to the sink in one call.
pub const DEFAULT_BATCH_MAX_EVENTS: usize = 2_000;
/// How long committed events may wait while the sink task is busy before they are queued behind
/// the batch in flight. An idle sink takes a commit at once (group commit: batches form while
/// the previous append is made durable), so this bounds waiting only under load.
pub const DEFAULT_BATCH_LINGER: Duration = Duration::from_millis(50);
/// Batches handed to the sink task and not yet durable (see [`super::sink_task`]): one being
/// appended and one queued behind it, so the sink never waits for the reader while the reader is
/// ahead; more would only hold more memory.
pub const DEFAULT_SINK_IN_FLIGHT: usize = 2;
/// How often a standby instance retries the advisory lock.
pub const DEFAULT_LOCK_POLL_INTERVAL: Duration = crate::pg::LOCK_RETRY_INTERVAL;

/// One captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub schema: String,
    pub name: String,
    /// Key columns when the table has no primary key (or another key is wanted). The columns must
    /// be covered by the table's replica identity so key changes are visible in the WAL.
    pub key: Option<Vec<String>>,
}

impl TableSpec {
    /// `schema.table` (a bare name means `public`).
    pub fn parse(qualified: &str) -> Self {
        let (schema, name) = match qualified.split_once('.') {
            Some((s, n)) => (s.to_string(), n.to_string()),
            None => ("public".to_string(), qualified.to_string()),
        };
        Self {
            schema,
            name,
            key: None,
        }
    }

    #[must_use]
    pub fn with_key(mut self, key: Vec<String>) -> Self {
        self.key = Some(key);
        self
    }

    /// `schema.name`, unquoted (for messages and progress records).
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The publication (and replication slot) name of pipeline `pipeline`: `sb_<pipeline>`.
pub fn publication_name(pipeline: &str) -> String {
    format!("sb_{pipeline}")
}

/// Everything `capture::run` needs.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Pipeline name: `[a-z0-9_]`, at most 60 characters (the slot name `sb_<name>` must fit 63).
    pub pipeline: String,
    /// libpq URL of the source database. `sslmode` must be present: libpq's default `prefer`
    /// silently uses TLS when offered and plaintext otherwise.
    pub source_url: String,
    /// Every instance of a replicated source, primary first (`source.urls`); empty when only
    /// `source_url` is configured. Capture reads from whichever is the primary and moves to a
    /// promoted one when the current primary is lost (see [`super::failover`]).
    pub failover_urls: Vec<String>,
    /// Told about each failover (never blocks capture: a full channel drops the report).
    pub failover_reports: Option<tokio::sync::mpsc::Sender<super::failover::Failover>>,
    pub tables: Vec<TableSpec>,
    /// `sb_<pipeline>` unless overridden.
    pub slot_name: String,
    /// `sb_<pipeline>` unless overridden.
    pub publication_name: String,
    /// Directory holding the durable snapshot progress of this pipeline.
    pub state_dir: PathBuf,
    pub snapshot_chunk_size: usize,
    pub heartbeat_interval: Duration,
    /// ≤ 1 s.
    pub feedback_interval: Duration,
    pub batch_max_events: usize,
    pub batch_linger: Duration,
    /// Batches (stream) or snapshot chunks appended while the next one is read; ≥ 1.
    pub sink_in_flight: usize,
    pub lock_poll_interval: Duration,
    /// pgoutput `streaming on` (protocol 2): large transactions arrive in chunks before commit.
    pub streaming: bool,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Show an indicatif progress bar during the snapshot (only ever on a TTY).
    pub progress_bar: bool,
}

impl CaptureConfig {
    pub fn new(
        pipeline: impl Into<String>,
        source_url: impl Into<String>,
        tables: Vec<TableSpec>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        let pipeline = pipeline.into();
        Self {
            slot_name: publication_name(&pipeline),
            publication_name: publication_name(&pipeline),
            pipeline,
            source_url: source_url.into(),
            failover_urls: Vec::new(),
            failover_reports: None,
            tables,
            state_dir: state_dir.into(),
            snapshot_chunk_size: DEFAULT_SNAPSHOT_CHUNK_SIZE,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            feedback_interval: DEFAULT_FEEDBACK_INTERVAL,
            batch_max_events: DEFAULT_BATCH_MAX_EVENTS,
            batch_linger: DEFAULT_BATCH_LINGER,
            sink_in_flight: DEFAULT_SINK_IN_FLIGHT,
            lock_poll_interval: DEFAULT_LOCK_POLL_INTERVAL,
            streaming: true,
            max_backoff: Duration::from_secs(30),
            progress_bar: true,
        }
    }

    /// Our replication origin name; transactions carrying it are our own return-path writes.
    pub fn origin_name(&self) -> String {
        format!("syncbridge_{}", self.pipeline)
    }

    /// Checks what can be checked without a database.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let bad = |m: String| Err(CaptureError::Config(m));
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !ident_ok(&self.pipeline) || self.pipeline.len() > 60 {
            return bad(format!(
                "pipeline name {:?} must be 1-60 characters of [a-z0-9_]",
                self.pipeline
            ));
        }
        for (what, name) in [
            ("slot", &self.slot_name),
            ("publication", &self.publication_name),
        ] {
            if !ident_ok(name) {
                return bad(format!(
                    "{what} name {name:?} must be 1-63 characters of [a-z0-9_]"
                ));
            }
        }
        if self.tables.is_empty() {
            return bad("no tables configured".into());
        }
        for url in std::iter::once(&self.source_url).chain(&self.failover_urls) {
            match crate::pg::TlsOptions::parse(url) {
                Err(e) => return bad(format!("source url: {e}")),
                Ok(tls) if tls.mode.is_none() => {
                    return bad(
                        "source url must set sslmode explicitly (e.g. ?sslmode=disable or ?sslmode=verify-full): \
                         libpq's default `prefer` silently falls back between TLS and plaintext"
                            .into(),
                    );
                }
                Ok(_) => {}
            }
        }
        if self.feedback_interval > Duration::from_secs(1) || self.feedback_interval.is_zero() {
            return bad("feedback interval must be > 0 and ≤ 1 s".into());
        }
        if self.snapshot_chunk_size == 0 || self.batch_max_events == 0 || self.sink_in_flight == 0 {
            return bad(
                "snapshot chunk size, batch size and sink in-flight batches must be > 0".into(),
            );
        }
        if self.heartbeat_interval.is_zero() || self.lock_poll_interval.is_zero() {
            return bad("heartbeat and lock poll intervals must be > 0".into());
        }
        Ok(())
    }

    /// The URL for the replication connection (`replication=database`).
    pub fn replication_url(&self) -> String {
        let sep = if self.source_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}replication=database", self.source_url)
    }
}
