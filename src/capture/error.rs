//! Capture errors, classified for the reconnect loop.

use super::sink::SinkError;

/// Why capture stopped or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The pipeline configuration is unusable (fix the config).
    #[error("capture config: {0}")]
    Config(String),
    /// The database is in a state an operator must fix; the message says how.
    #[error("{0}")]
    Operator(String),
    /// SQL on a regular connection failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The replication connection failed.
    #[error("replication: {0}")]
    Replication(#[from] pg_walstream::ReplicationError),
    /// The server sent something we cannot decode or map.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The sink (log) refused a batch; nothing past the last durable batch was acknowledged.
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
    /// Snapshot progress could not be read or written.
    #[error("snapshot progress store: {0}")]
    Progress(String),
    /// The advisory-lock connection died, so another instance may take over: stop reading.
    #[error("lost the single-reader advisory lock connection")]
    LostLock,
    /// A regular connection closed under us (server restart, terminated backend).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The query sources' poller (run beside replication as the pipeline's input) stopped.
    #[error("{0}")]
    Query(Box<super::query::QueryError>),
}

impl From<crate::pg::PgConnectError> for CaptureError {
    fn from(e: crate::pg::PgConnectError) -> Self {
        use crate::pg::PgConnectError as P;
        match e {
            P::Postgres(e) => CaptureError::Postgres(e),
            other => CaptureError::Config(other.to_string()),
        }
    }
}

impl CaptureError {
    /// Whether reconnecting (and resuming from the slot) may succeed without operator action.
    pub fn is_retryable(&self) -> bool {
        match self {
            CaptureError::Config(_) | CaptureError::Operator(_) | CaptureError::Protocol(_) => {
                false
            }
            CaptureError::Progress(_) => false,
            CaptureError::LostLock | CaptureError::ConnectionLost(_) => true,
            CaptureError::Query(e) => e.is_retryable(),
            CaptureError::Sink(e) => e.retryable,
            CaptureError::Postgres(e) => postgres_retryable(e),
            CaptureError::Replication(e) => {
                use pg_walstream::ReplicationError as R;
                match e {
                    R::Authentication(_) | R::Config(_) => false,
                    // "replication slot ... is active for PID": the previous reader's walsender
                    // has not exited yet; it will.
                    R::ReplicationSlot(m) => m.contains("is active"),
                    // Decoding happens in our code (CaptureError::Protocol); the library's own
                    // Protocol errors are transport oddities and server errors without a class.
                    R::Deserialize(_) | R::Buffer(_) => false,
                    _ => true,
                }
            }
        }
    }
}

/// Connection loss, server shutdown/startup and serialization failures are retryable; SQL and
/// permission errors are not.
pub(crate) fn postgres_retryable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("57P") // admin/crash shutdown, cannot connect now
                || c == "40001"
                || c == "40P01"
                || c == "55006" // object in use (slot active)
                || c == "53300" // too many connections
        }
        // No SQLSTATE: an IO / connect error.
        None => true,
    }
}
