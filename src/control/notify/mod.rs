//! Failure notifications (`notify:`): a pipeline's conditions go to webhook, Teams,
//! Slack-compatible and email (SMTP, [`email`]) targets.
//!
//! - Conditions ([`Notifier::raise`] / [`Notifier::clear`]) are keyed: a condition notifies
//!   once when it starts and once more ("resolved") when it clears, however often it is raised
//!   in between. Keys in use: `dead_letters` and `conflicts_parked` ([`watch`], over
//!   `notify.window_s`), `slot_lag` ([`watch_slot`], above `notify.slot_lag_bytes`),
//!   `job_failed:<schedule>` (the scheduler: raised by a failed tick,
//!   cleared by the next good one), `pipeline_stopped` (the runtime, when a stage ends on its
//!   own), `drift:<pipeline>` (the drift check, `crate::process::drift`: raised by a check that
//!   found more than `notify.drift_threshold` differences, cleared by one that did not).
//! - Never blocking the data path: raising only queues ([`QUEUE_CAPACITY`], oldest dropped and
//!   counted in `syncbridge_notify_dropped_total`); one [`deliver`] task per pipeline sends.
//! - Each target is retried with exponential backoff ([`RETRIES`]); failures are logged by
//!   target name. URLs and keys are [`Secret`]s: never logged or put in a payload.
//!
//! Wire formats ([`format`]): `webhook` is JSON signed with
//! `X-SyncBridge-Signature: sha256=<hex HMAC-SHA256(secret, body)>`; `teams` an Adaptive Card
//! message; `slack` `{"text": …}`.

pub mod email;
pub mod format;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, watch as tokio_watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{NotifyConfig, NotifyKind, NotifyTarget};
use crate::process::ProcessorStats;
use crate::telemetry::metrics::{NOTIFY_DROPPED_TOTAL, NOTIFY_SENT_TOTAL};

/// Notifications waiting to be sent, per pipeline; beyond it the oldest is dropped (a target
/// that is down for long must not hold memory without bound).
pub const QUEUE_CAPACITY: usize = 256;
/// Attempts per notification and target, with backoff from [`RETRY_BASE`] doubling: about half
/// a minute in all, enough for a receiver's restart.
pub const RETRIES: usize = 5;
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Per-request limit: a hanging receiver costs one notification's delay, not the queue.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a draining pipeline waits for queued notifications to go out.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a condition started or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Firing,
    Resolved,
}

/// One message, as every target's format renders it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    pub pipeline: String,
    /// The condition's key (see the module docs).
    pub condition: String,
    pub state: State,
    pub summary: String,
    pub detail: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// The queue and condition states of one pipeline. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pipeline: String,
    queue: Mutex<VecDeque<Notification>>,
    wake: Notify,
    /// Conditions that fired and did not clear yet, with their summary.
    active: Mutex<HashMap<String, String>>,
}

impl Notifier {
    pub fn new(pipeline: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                pipeline: pipeline.to_string(),
                queue: Mutex::default(),
                wake: Notify::new(),
                active: Mutex::default(),
            }),
        }
    }

    /// The condition `key` holds: notifies unless it already fired and has not cleared.
    pub fn raise(&self, key: &str, summary: &str, detail: &str) {
        let fresh = match lock(&self.inner.active).entry(key.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(summary.to_string());
                true
            }
        };
        if fresh {
            self.push(key, State::Firing, summary, detail);
        }
    }

    /// The condition `key` no longer holds: a "resolved" notification when it had fired.
    pub fn clear(&self, key: &str) {
        if let Some(summary) = lock(&self.inner.active).remove(key) {
            self.push(key, State::Resolved, &format!("resolved: {summary}"), "");
        }
    }

    fn push(&self, key: &str, state: State, summary: &str, detail: &str) {
        let n = Notification {
            pipeline: self.inner.pipeline.clone(),
            condition: key.to_string(),
            state,
            summary: summary.to_string(),
            detail: detail.to_string(),
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let mut q = lock(&self.inner.queue);
        if q.len() >= QUEUE_CAPACITY {
            q.pop_front();
            metrics::counter!(NOTIFY_DROPPED_TOTAL, "pipeline" => self.inner.pipeline.clone())
                .increment(1);
        }
        q.push_back(n);
        drop(q);
        self.inner.wake.notify_one();
    }

    fn pop(&self) -> Option<Notification> {
        lock(&self.inner.queue).pop_front()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends queued notifications to every target until `stop`, then for at most
/// [`FLUSH_TIMEOUT`] more while the queue is not empty.
pub async fn deliver(notifier: Notifier, targets: Vec<NotifyTarget>, stop: CancellationToken) {
    let client = match reqwest::Client::builder().timeout(SEND_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            warn!(pipeline = %notifier.inner.pipeline, "notifications off: no HTTP client: {e}");
            return;
        }
    };
    loop {
        while let Some(n) = notifier.pop() {
            for t in &targets {
                send_with_retry(&client, t, &n).await;
            }
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = notifier.inner.wake.notified() => {}
            () = stop.cancelled() => {
                // Said once more: a pipeline stopping on a failure queues its last words now.
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, flush(&client, &notifier, &targets)).await;
                return;
            }
        }
    }
}

async fn flush(client: &reqwest::Client, notifier: &Notifier, targets: &[NotifyTarget]) {
    while let Some(n) = notifier.pop() {
        for t in targets {
            send_with_retry(client, t, &n).await;
        }
    }
}

async fn send_with_retry(client: &reqwest::Client, target: &NotifyTarget, n: &Notification) {
    let mut delay = RETRY_BASE;
    for attempt in 1..=RETRIES {
        let outcome = match send(client, target, n).await {
            Ok(()) => {
                metrics::counter!(NOTIFY_SENT_TOTAL, "pipeline" => n.pipeline.clone(), "outcome" => "ok")
                    .increment(1);
                return;
            }
            Err(e) => e,
        };
        if attempt == RETRIES {
            metrics::counter!(NOTIFY_SENT_TOTAL, "pipeline" => n.pipeline.clone(), "outcome" => "failed")
                .increment(1);
            warn!(pipeline = %n.pipeline, target = %target.name, condition = %n.condition,
                "notification not delivered after {RETRIES} attempts: {outcome}");
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// One attempt. The error names the status or the failure kind, never the URL.
async fn send(
    client: &reqwest::Client,
    target: &NotifyTarget,
    n: &Notification,
) -> Result<(), String> {
    if target.kind == NotifyKind::Email {
        return email::send(target, n).await;
    }
    let (body, signature) = format::render(target, n);
    let mut req = client
        .post(target.url.expose())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(sig) = signature {
        req = req.header(format::SIGNATURE_HEADER, sig);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("HTTP {}", r.status().as_u16())),
        // Without the URL: reqwest's message includes it.
        Err(e) if e.is_timeout() => Err("timed out".into()),
        Err(e) if e.is_connect() => Err("cannot connect".into()),
        Err(_) => Err("request failed".into()),
    }
}

/// Evaluates the processor's counters over `config.window`: `dead_letters` fires when at
/// least `config.dead_letters` rows were dead-lettered in the window, `conflicts_parked` when
/// any conflict was recorded in it; each clears when a whole window passes without.
pub async fn watch(
    notifier: Notifier,
    config: NotifyConfig,
    stats: tokio_watch::Receiver<ProcessorStats>,
    stop: CancellationToken,
) {
    // Ten looks per window: a condition is seen within a tenth of the window.
    let mut tick = tokio::time::interval(config.window / 10);
    let mut window = Window::new(config.window);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = stats.borrow().clone();
        let (dead, conflicts) = window.push(Instant::now(), s.dead_letters, s.conflicts);
        let secs = config.window.as_secs();
        if dead >= config.dead_letters {
            let summary = format!("{dead} dead letters in the last {secs} s");
            notifier.raise(
                "dead_letters",
                &summary,
                "GET /pipelines/{name}/dlq lists them",
            );
        } else {
            notifier.clear("dead_letters");
        }
        if conflicts > 0 {
            let summary = format!("{conflicts} conflicts recorded in the last {secs} s");
            let detail = "GET /pipelines/{name}/conflicts?parked=true lists the parked ones";
            notifier.raise("conflicts_parked", &summary, detail);
        } else {
            notifier.clear("conflicts_parked");
        }
    }
}

/// Checks the replication slot's lag every `window / 10` on a connection of its own (to the
/// source database at `source_url`): `slot_lag` fires above `config.slot_lag_bytes`, clears at
/// or below it. A failed query changes nothing (it is logged; the database may be restarting).
pub async fn watch_slot(
    notifier: Notifier,
    config: NotifyConfig,
    source_url: String,
    slot: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.window / 10);
    let mut client = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client
            .as_ref()
            .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
        {
            client = match crate::control::meta::connect(&source_url).await {
                Ok(c) => Some(c),
                Err(e) => {
                    warn!(pipeline = %notifier.inner.pipeline, "slot lag watch: {e}");
                    continue;
                }
            };
        }
        let Some(c) = &client else { continue };
        match crate::capture::slot_lag_bytes(c, &slot).await {
            Ok(Some(lag)) if lag > config.slot_lag_bytes as f64 => {
                let summary = format!("replication slot {slot} retains {lag:.0} bytes of WAL");
                let detail = format!(
                    "above notify.slot_lag_bytes ({}): capture is behind or stopped",
                    config.slot_lag_bytes
                );
                notifier.raise("slot_lag", &summary, &detail);
            }
            Ok(_) => notifier.clear("slot_lag"),
            Err(e) => warn!(pipeline = %notifier.inner.pipeline, "slot lag watch: {e}"),
        }
    }
}

/// Counter samples over a sliding window.
#[derive(Debug)]
struct Window {
    span: Duration,
    samples: VecDeque<(Instant, u64, u64)>,
}

impl Window {
    fn new(span: Duration) -> Self {
        Self {
            span,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample; the growth of both counters since the oldest sample within the window.
    fn push(&mut self, at: Instant, a: u64, b: u64) -> (u64, u64) {
        self.samples.push_back((at, a, b));
        while let Some(&(t, ..)) = self.samples.front() {
            if at.duration_since(t) > self.span {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let (_, a0, b0) = self.samples[0];
        (a.saturating_sub(a0), b.saturating_sub(b0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_notifies_once_then_once_resolved() {
        let n = Notifier::new("p");
        n.raise("x", "x broke", "");
        n.raise("x", "x broke again", "");
        n.clear("x");
        n.clear("x");
        n.clear("never");
        let got: Vec<_> = std::iter::from_fn(|| n.pop())
            .map(|m| (m.condition, m.state, m.summary))
            .collect();
        assert_eq!(
            got,
            [
                ("x".into(), State::Firing, "x broke".into()),
                ("x".into(), State::Resolved, "resolved: x broke".into()),
            ]
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let n = Notifier::new("p");
        for i in 0..QUEUE_CAPACITY + 3 {
            n.raise(&i.to_string(), "s", "");
        }
        let first = n.pop().unwrap();
        assert_eq!(first.condition, "3");
        assert_eq!(std::iter::from_fn(|| n.pop()).count(), QUEUE_CAPACITY - 1);
    }

    #[test]
    fn the_window_counts_growth_within_its_span() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10));
        assert_eq!(w.push(t0, 5, 0), (0, 0));
        assert_eq!(w.push(t0 + Duration::from_secs(4), 8, 1), (3, 1));
        // The first sample left the window: growth since the 4 s one.
        assert_eq!(w.push(t0 + Duration::from_secs(12), 9, 1), (1, 0));
        assert_eq!(w.push(t0 + Duration::from_secs(30), 9, 1), (0, 0));
    }
}
