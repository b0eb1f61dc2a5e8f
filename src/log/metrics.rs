//! Metric names of the log layer. They live here until `src/telemetry/metrics.rs` (the one module
//! of metric names) exists; then they move there.
//!
//! Labels: `backend` (`embedded` | `kafka`) and `topic` (unprefixed; bounded by the number of
//! synced tables and side topics).

/// Counter: records appended durably.
pub const LOG_APPENDED_RECORDS_TOTAL: &str = "syncbridge_log_appended_records_total";
/// Histogram (seconds): duration of one `append` call until the batch is durable.
pub const LOG_APPEND_DURATION_SECONDS: &str = "syncbridge_log_append_duration_seconds";
/// Counter: failed `append` calls (label `retryable` = `true` | `false`).
pub const LOG_APPEND_ERRORS_TOTAL: &str = "syncbridge_log_append_errors_total";
/// Counter: records handed to consumers.
pub const LOG_CONSUMED_RECORDS_TOTAL: &str = "syncbridge_log_consumed_records_total";
/// Counter: positions committed by consumers (label `group`).
pub const LOG_COMMITS_TOTAL: &str = "syncbridge_log_commits_total";
