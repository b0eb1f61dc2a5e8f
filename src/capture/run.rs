//! The capture run loop: the single-reader lock, and sessions ([`super::session`]) restarted
//! with backoff after retryable errors until shutdown or a non-retryable error.
//!
//! Invariant: at most one process reads a slot, the one holding its advisory lock; losing the
//! lock's connection ends the session at once and the lock is taken again before the next one.
//! With several source instances the lock is taken on the current primary, chosen anew each
//! time ([`super::failover`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config::CaptureConfig;
use super::error::CaptureError;
use super::failover::{Failover, Instances};
use super::resnapshot::{Resnapper, ResnapshotRequests};
use super::sink::EventSink;
use super::sink_task::SharedSink;
use super::snapshot::{FileProgress, SnapshotProgress};
use crate::telemetry::metrics as m;

/// Runs capture for one pipeline until `shutdown` is cancelled or a non-retryable error occurs.
/// Snapshot progress is kept in a [`FileProgress`] under `config.state_dir`.
pub async fn run<S: EventSink + 'static>(
    config: CaptureConfig,
    sink: S,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let progress = FileProgress::new(&config.state_dir, &config.slot_name);
    run_with_progress(config, sink, progress, shutdown).await
}

/// [`run`] with an explicit snapshot progress store.
pub async fn run_with_progress<S: EventSink + 'static, P: SnapshotProgress>(
    config: CaptureConfig,
    sink: S,
    progress: P,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    run_with_control(config, sink, progress, None, shutdown).await
}

/// [`run_with_progress`] that also serves on-demand re-snapshots requested through the
/// [`super::ResnapshotHandle`] paired with `requests` (see [`super::resnapshot`]).
pub async fn run_with_control<S: EventSink + 'static, P: SnapshotProgress>(
    config: CaptureConfig,
    sink: S,
    progress: P,
    requests: Option<ResnapshotRequests>,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let mut resnap = Resnapper::new(requests);
    let result = run_inner(config.clone(), sink, progress, &mut resnap, shutdown).await;
    resnap.interrupt(&config.pipeline);
    result
}

async fn run_inner<S: EventSink + 'static, P: SnapshotProgress>(
    mut config: CaptureConfig,
    sink: S,
    mut progress: P,
    resnap: &mut Resnapper,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    config.validate()?;
    // Appends run on a task of their own (see `sink_task`); sessions take turns with the sink.
    let sink: SharedSink<S> = Arc::new(tokio::sync::Mutex::new(sink));
    let mut backoff = Backoff::new(config.max_backoff);
    let mut position = Position::default();
    let mut instances = Instances::new(&config);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // With several instances, the lock and every session connect to the current primary.
        match instances.select(&mut config, &mut backoff, &shutdown).await {
            None => return Ok(()),
            Some(Some(failover)) => position.failover = Some(failover),
            Some(None) => {}
        }
        let lock = match acquire_lock(&config, &shutdown).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(()),
            Err(e) if e.is_retryable() => {
                tracing::warn!(pipeline = %config.pipeline, error = %e, "advisory lock connection failed; retrying");
                if !backoff.sleep(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        tracing::info!(pipeline = %config.pipeline, slot = %config.slot_name, "acquired single-reader lock");
        loop {
            let before = position.durable_lsn;
            let result = super::session::session(
                &config,
                &sink,
                &mut progress,
                &lock,
                &shutdown,
                &mut position,
                resnap,
            )
            .await;
            resnap.session_ended();
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    metrics::counter!(m::CAPTURE_RECONNECTS_TOTAL, "pipeline" => config.pipeline.clone())
                        .increment(1);
                    tracing::warn!(pipeline = %config.pipeline, error = %e, "capture session failed; reconnecting");
                    if position.durable_lsn > before {
                        backoff.reset();
                    }
                    if !backoff.sleep(&shutdown).await {
                        return Ok(());
                    }
                    if lock.lost.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!(pipeline = %config.pipeline, error = %e, "capture stopped");
                    return Err(e);
                }
            }
        }
    }
}

/// Where the next session resumes, kept across sessions.
#[derive(Debug, Default)]
pub(super) struct Position {
    /// Highest LSN whose events (and all before) are durable, known to this process.
    pub(super) durable_lsn: u64,
    /// A failover not yet reported: the next session that opens the slot reports it, with how
    /// it resumed.
    pub(super) failover: Option<Failover>,
    /// Since a failover found no slot on the promoted instance, until the new slot streams.
    pub(super) failover_resync: bool,
}

/// Exponential backoff between reconnects, interruptible by shutdown.
#[derive(Debug)]
pub(super) struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const START: Duration = Duration::from_millis(250);

    pub(super) fn new(max: Duration) -> Self {
        Self {
            current: Self::START,
            max,
        }
    }

    fn reset(&mut self) {
        self.current = Self::START;
    }

    /// Sleeps; false when shutdown was requested meanwhile.
    pub(super) async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// A regular connection whose `lost` fires when it ends (the lock's, the session's).
pub(super) use crate::pg::WatchedConn as Conn;

pub(super) async fn connect(url: &str) -> Result<Conn, CaptureError> {
    Ok(crate::pg::connect_watched(url).await?)
}

/// The advisory-lock key of a slot (see [`crate::pg::lock_key`]).
pub fn lock_key(slot: &str) -> i64 {
    crate::pg::lock_key(slot)
}

/// Waits until this process holds the pipeline's advisory lock (None on shutdown). The lock lives
/// as long as the returned connection; when it dies, `lost` fires and streaming stops.
async fn acquire_lock(
    config: &CaptureConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Conn>, CaptureError> {
    let standing_by = || {
        tracing::info!(pipeline = %config.pipeline, "another instance reads this slot; standing by");
    };
    Ok(crate::pg::acquire_advisory_lock(
        &config.source_url,
        lock_key(&config.slot_name),
        config.lock_poll_interval,
        shutdown,
        standing_by,
    )
    .await?)
}
