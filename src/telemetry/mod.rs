//! Telemetry: tracing set-up and the Prometheus recorder.
//!
//! Logs are human-readable on a terminal and JSON lines when `SYNCBRIDGE_LOG_FORMAT=json` (what
//! log shippers want); `RUST_LOG` filters as usual. Every metric name lives in [`metrics`], each one
//! documented in `ops/METRICS.md` with the question it answers.

pub mod metrics;

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Log filter when `RUST_LOG` is unset: our own crate at info, chatty dependencies at warn.
const DEFAULT_LOG_FILTER: &str =
    "info,sled=warn,rdkafka=warn,hyper=warn,reqwest=warn,pg_walstream=warn";

/// Error from setting up telemetry. Never retryable: it happens once, at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("SYNCBRIDGE_LOG_FORMAT must be `json` or `text`, got `{0}`")]
    LogFormat(String),
    #[error("cannot install the Prometheus recorder: {0}")]
    Recorder(String),
}

/// Installs the global tracing subscriber. Call once, at the binary's edge.
pub fn init_tracing() -> Result<(), TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let format = std::env::var("SYNCBRIDGE_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| StderrBelowBars);
    match format.as_str() {
        "json" => builder.json().flatten_event(true).init(),
        "" | "text" => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        other => return Err(TelemetryError::LogFormat(other.to_string())),
    }
    Ok(())
}

/// The process's progress bars (indicatif draws them on stderr, and only on a terminal). Every bar
/// is added here, and log lines go to stderr through [`StderrBelowBars`], which clears the bars,
/// writes the line and redraws them: a log line never lands inside a bar, and a bar never
/// overwrites a log line.
pub fn progress() -> &'static indicatif::MultiProgress {
    static BARS: OnceLock<indicatif::MultiProgress> = OnceLock::new();
    BARS.get_or_init(indicatif::MultiProgress::new)
}

/// stderr for log lines, written around the progress bars (see [`progress`]).
struct StderrBelowBars;

impl std::io::Write for StderrBelowBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        progress().suspend(|| std::io::stderr().write(buf))
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        progress().suspend(|| std::io::stderr().write_all(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (idempotent) and returns the handle that renders
/// `/metrics`. Also describes every metric so `# HELP` lines appear before the first sample.
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    if let Some(handle) = PROMETHEUS.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(metrics::LATENCY_BUCKETS_SECONDS)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    metrics::describe_all();
    ::metrics::gauge!(metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(PROMETHEUS.get_or_init(|| handle).clone())
}

/// Now as Unix seconds (for the last-activity timestamp gauges).
pub fn unix_seconds() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}
