//! The accidental-delete guard (`guard.push`, `guard.pull`): a script that truncates a table, or
//! a person who empties a list, must not be carried to the other side at full speed.
//!
//! # Contract (push direction)
//! - A pending delete (a row deleted in PostgreSQL whose item the ledger knows) waits `hold_ms`
//!   in the processor's pending set before it is written, so a burst is counted whole.
//! - At each flush, [`DeleteGate::decide`] counts the deletes written within `window_ms` plus
//!   every delete now pending. Above the threshold ([`crate::config::DeleteGuard::threshold`])
//!   the direction pauses: no delete is written, creates and updates keep flowing. So no more
//!   than the threshold reaches the lists within a window.
//! - **Durable by the log.** Held deletes stay in the pending set, and the offset commit never
//!   passes a pending row (*offsets follow durability*, see [`super::processor`]). After a
//!   restart the deletes are read again from the log and counted again: the direction pauses
//!   again. Nothing is written to the ledger or to sled for them, so there is no second copy
//!   to keep consistent; the cost is that events after the first held delete are read again
//!   after a restart (their hashes match the ledger: no writes).
//! - The operator decides through [`DeleteGuardHandle`] (API `…/guard/push/allow|discard`):
//!   *allow* writes every held delete at once and starts a fresh window; *discard* drops them
//!   from the pending set (their offsets are committed, so they are not read again): the items
//!   stay in the lists and their ledger entries are unchanged, so a later insert of the same key
//!   updates the existing item. A decision is not persisted: a crash before the offsets of an
//!   allowed batch are committed holds the rest again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Duration, Instant};

use tracing::warn;

use crate::config::DeleteGuard;
use crate::control::Readiness;
use crate::control::notify::Notifier;
use crate::telemetry::metrics as m;

/// Keys shown to the operator per paused direction (status, log line, notification).
pub const SHOWN_KEYS: usize = 20;
/// How long a decision waits for the processor to take it: a running processor takes it at its
/// next loop turn (milliseconds); one stopped (a pipeline pause, a restart) may take long, and the
/// operator is then told to try again instead of the request hanging.
pub const DECISION_WAIT: Duration = Duration::from_secs(30);
/// `/ready` stage of the push direction's guard (`<pipeline>/guard.push`).
pub const PUSH_STAGE: &str = "guard.push";

/// What the operator decided for a paused direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Discard,
}

/// The state of one direction, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DirectionStatus {
    /// The guard is on for this direction.
    pub enabled: bool,
    /// Deletes are held until an operator allows or discards them.
    pub paused: bool,
    /// Deletes held now (paused, or waiting out `hold_ms`).
    pub held: usize,
    /// The most deletes allowed within the window (at the last count).
    pub threshold: usize,
    /// Deletes written within the current window.
    pub recent: usize,
    /// The first held keys (SyncKeys, `<table>/<key>`), at most 20.
    pub first_keys: Vec<String>,
    /// When the direction paused (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
}

type Reply = oneshot::Sender<usize>;

#[derive(Debug, Default)]
struct Shared {
    push: DirectionStatus,
    decision: Option<(Decision, Reply)>,
}

/// The control plane's view of a pipeline's delete guard (cheap to clone). The processor
/// publishes its status here and takes the operator's decisions from it.
#[derive(Debug, Clone)]
pub struct DeleteGuardHandle {
    pipeline: String,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    /// `/ready`: the stage [`PUSH_STAGE`] is not ready while paused.
    readiness: Option<Readiness>,
    notifier: Option<Notifier>,
}

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("the {0} direction is not paused: there is nothing to allow or discard")]
    NotPaused(&'static str),
    #[error("the processor did not take the decision (it stopped or is restarting); try again")]
    NotTaken,
}

impl DeleteGuardHandle {
    pub fn new(pipeline: &str, push: &DeleteGuard) -> Self {
        let shared = Shared {
            push: DirectionStatus {
                enabled: push.enabled,
                ..Default::default()
            },
            decision: None,
        };
        Self {
            pipeline: pipeline.to_string(),
            shared: Arc::new(Mutex::new(shared)),
            wake: Arc::new(Notify::new()),
            readiness: None,
            notifier: None,
        }
    }

    /// Shows a pause in `/ready` (stage [`PUSH_STAGE`]).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        readiness.set(&self.pipeline, PUSH_STAGE, true);
        self.readiness = Some(readiness);
        self
    }

    /// Sends a notification when a direction pauses, and a resolved one when it resumes.
    pub fn with_notifier(mut self, notifier: Option<Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The push direction's state.
    pub fn push_status(&self) -> DirectionStatus {
        self.lock().push.clone()
    }

    /// Publishes the push direction's state: the gauges, and on a change of pause `/ready`,
    /// the log and the notifier.
    pub(crate) fn publish_push(&self, status: DirectionStatus) {
        let was = std::mem::replace(&mut self.lock().push, status.clone());
        let labels = [
            ("pipeline", self.pipeline.clone()),
            ("direction", "push".into()),
        ];
        metrics::gauge!(m::GUARD_DELETES_HELD, &labels).set(status.held as f64);
        metrics::gauge!(m::GUARD_PAUSED, &labels).set(if status.paused { 1.0 } else { 0.0 });
        if status.paused && !was.paused {
            let summary = format!(
                "{} deletes bound for the lists held: more than {} within the window",
                status.held, status.threshold
            );
            let detail = format!(
                "first keys: {}; `syncbridge guard <pipeline.yaml> allow --direction push` \
                 writes them, `discard` leaves the items in place",
                status.first_keys.join(", ")
            );
            warn!(pipeline = %self.pipeline, direction = "push", held = status.held,
                threshold = status.threshold, first_keys = ?status.first_keys,
                "accidental-delete guard paused the deletes: {summary}");
            if let Some(r) = &self.readiness {
                r.set_not_ready(&self.pipeline, PUSH_STAGE, format!("{summary} ({detail})"));
            }
            if let Some(n) = &self.notifier {
                n.raise(PUSH_STAGE, &summary, &detail);
            }
        } else if !status.paused && was.paused {
            if let Some(r) = &self.readiness {
                r.set(&self.pipeline, PUSH_STAGE, true);
            }
            if let Some(n) = &self.notifier {
                n.clear(PUSH_STAGE);
            }
        }
    }

    /// Hands `decision` to the processor and waits until it applied it: the number of deletes
    /// released (allow) or dropped (discard).
    pub async fn decide(&self, decision: Decision) -> Result<usize, DecisionError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.lock();
            if !s.push.paused {
                return Err(DecisionError::NotPaused("push"));
            }
            s.decision = Some((decision, tx));
        }
        self.wake.notify_one();
        let mut rx = rx;
        match tokio::time::timeout(DECISION_WAIT, &mut rx).await {
            Ok(r) => r.map_err(|_| DecisionError::NotTaken),
            Err(_) => {
                // Not taken in time (the processor is stopped): withdrawn, unless it was taken
                // just now, then its answer follows at once.
                if self.lock().decision.take().is_some() {
                    return Err(DecisionError::NotTaken);
                }
                rx.await.map_err(|_| DecisionError::NotTaken)
            }
        }
    }

    pub(crate) fn take_decision(&self) -> Option<(Decision, Reply)> {
        self.lock().decision.take()
    }

    /// Resolves when a decision is waiting (the processor's loop wakes to flush).
    pub(crate) async fn decided(&self) {
        loop {
            let notified = self.wake.notified();
            if self.lock().decision.is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// What a flush does with the pending deletes.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write these deletes now (indexes into the slice given to [`DeleteGate::decide`]); the
    /// others wait for their hold.
    Release(Vec<usize>),
    /// The count crossed the threshold: hold every delete; `true` when this count tripped it.
    Pause { tripped: bool },
}

/// The counting side of one direction (pure: time is passed in).
#[derive(Debug)]
pub struct DeleteGate {
    pub limits: DeleteGuard,
    /// Deletes released within the window: (when, how many).
    released: VecDeque<(Instant, usize)>,
    paused_since: Option<i64>,
}

impl DeleteGate {
    pub fn new(limits: DeleteGuard) -> Self {
        Self {
            limits,
            released: VecDeque::new(),
            paused_since: None,
        }
    }

    pub fn paused(&self) -> bool {
        self.paused_since.is_some()
    }

    pub fn paused_since(&self) -> Option<i64> {
        self.paused_since
    }

    /// Deletes released within the window ending `now`.
    pub fn recent(&mut self, now: Instant) -> usize {
        let window = Duration::from_millis(self.limits.window_ms);
        while self
            .released
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            self.released.pop_front();
        }
        self.released.iter().map(|(_, n)| n).sum()
    }

    /// Decides for the pending deletes, each given by when it became pending. `target`: the
    /// items on the other side (for the percent rule).
    pub fn decide(&mut self, waiting_since: &[Instant], target: usize, now: Instant) -> Verdict {
        if !self.limits.enabled {
            return Verdict::Release((0..waiting_since.len()).collect());
        }
        if self.paused() {
            return Verdict::Pause { tripped: false };
        }
        let recent = self.recent(now);
        if recent + waiting_since.len() > self.limits.threshold(target) {
            self.paused_since = Some(chrono::Utc::now().timestamp_millis());
            return Verdict::Pause { tripped: true };
        }
        let hold = Duration::from_millis(self.limits.hold_ms);
        let due: Vec<usize> = (0..waiting_since.len())
            .filter(|i| now.duration_since(waiting_since[*i]) >= hold)
            .collect();
        if !due.is_empty() {
            self.released.push_back((now, due.len()));
        }
        Verdict::Release(due)
    }

    /// The operator decided: the pause ends and a fresh window starts.
    pub fn resume(&mut self) {
        self.paused_since = None;
        self.released.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, hold_ms: u64) -> DeleteGuard {
        DeleteGuard {
            max_deletes: max,
            min_deletes: 0,
            hold_ms,
            ..DeleteGuard::default()
        }
    }

    #[test]
    fn threshold_is_the_smaller_rule_and_never_below_the_floor() {
        let g = DeleteGuard::default();
        assert_eq!(g.threshold(1_000), 100, "10 % of 1,000");
        assert_eq!(g.threshold(100_000), 500, "500 caps it");
        assert_eq!(g.threshold(30), 100, "floor for small lists");
    }

    #[test]
    fn a_burst_above_the_threshold_pauses_before_any_delete_is_released() {
        let t0 = Instant::now();
        let mut g = DeleteGate::new(limits(10, 1_000));
        let burst = vec![t0; 11];
        assert_eq!(
            g.decide(&burst, 1_000, t0 + Duration::from_millis(10)),
            Verdict::Pause { tripped: true }
        );
        assert!(g.paused());
        assert_eq!(
            g.decide(&burst, 1_000, t0 + Duration::from_secs(5)),
            Verdict::Pause { tripped: false },
            "stays paused until the operator decides"
        );
        g.resume();
        assert_eq!(g.recent(t0), 0);
    }

    #[test]
    fn deletes_wait_their_hold_and_count_over_the_window() {
        let t0 = Instant::now();
        let mut g = DeleteGate::new(limits(10, 1_000));
        let six = vec![t0; 6];
        assert_eq!(g.decide(&six, 1_000, t0), Verdict::Release(vec![]), "held");
        let later = t0 + Duration::from_millis(1_000);
        assert_eq!(
            g.decide(&six, 1_000, later),
            Verdict::Release((0..6).collect())
        );
        // 6 released within the window: 5 more would make 11 > 10.
        let five = vec![later; 5];
        assert_eq!(
            g.decide(&five, 1_000, later + Duration::from_secs(1)),
            Verdict::Pause { tripped: true }
        );
        // After the window the released ones no longer count.
        let mut g = DeleteGate::new(limits(10, 0));
        assert_eq!(
            g.decide(&six, 1_000, t0),
            Verdict::Release((0..6).collect())
        );
        let after = t0 + Duration::from_millis(DeleteGuard::default().window_ms);
        assert_eq!(
            g.decide(&six, 1_000, after),
            Verdict::Release((0..6).collect())
        );
    }

    #[test]
    fn a_disabled_guard_releases_everything_at_once() {
        let t0 = Instant::now();
        let mut g = DeleteGate::new(DeleteGuard {
            enabled: false,
            ..limits(1, 60_000)
        });
        assert_eq!(g.decide(&[t0; 3], 10, t0), Verdict::Release(vec![0, 1, 2]));
    }

    #[tokio::test]
    async fn a_decision_needs_a_pause_and_is_answered_by_the_processor() {
        let h = DeleteGuardHandle::new("p", &DeleteGuard::default());
        assert_eq!(
            h.decide(Decision::Allow).await,
            Err(DecisionError::NotPaused("push"))
        );
        h.publish_push(DirectionStatus {
            paused: true,
            ..Default::default()
        });
        let processor = tokio::spawn({
            let h = h.clone();
            async move {
                h.decided().await;
                let (d, reply) = h.take_decision().expect("waiting");
                reply.send(7).unwrap();
                d
            }
        });
        assert_eq!(h.decide(Decision::Discard).await, Ok(7));
        assert_eq!(processor.await.unwrap(), Decision::Discard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_nobody_takes_is_withdrawn() {
        let h = DeleteGuardHandle::new("p", &DeleteGuard::default());
        h.publish_push(DirectionStatus {
            paused: true,
            ..Default::default()
        });
        assert_eq!(
            h.decide(Decision::Allow).await,
            Err(DecisionError::NotTaken)
        );
        assert!(
            h.take_decision().is_none(),
            "not left for a later processor"
        );
    }
}
