//! The accidental-delete guard (`guard.push`, `guard.pull`): a script that truncates a table, or
//! a person who empties a list, must not be carried to the other side at full speed.
//!
//! Two directions ([`Direction`]): push (rows deleted in PostgreSQL, bound for the lists) and
//! pull (items deleted in a list, bound for the tables when `pull.on_delete` is not `ignore`).
//! The counting is [`DeleteGate`]; the processor's side is `processor/deletes.rs`.
//!
//! # Contract
//! - A pending delete (push: a row whose item the ledger knows, in the pending set; pull: a list
//!   change deleting an item whose row the ledger knows, in the pending pulls) waits `hold_ms`
//!   before it is applied, so a burst is counted whole.
//! - At each flush, [`DeleteGate::decide`] counts the deletes written within `window_ms` plus
//!   every delete now pending. Above the threshold ([`crate::config::DeleteGuard::threshold`])
//!   the direction pauses: no delete is written, creates and updates keep flowing. So no more
//!   than the threshold reaches the lists within a window.
//! - **Durable by the log.** Held deletes stay in their pending set, and the offset commits
//!   never pass a pending row or list change (*offsets follow durability*). After a
//!   restart the deletes are read again from the log and counted again: the direction pauses
//!   again. Nothing is written to the ledger or to sled for them, so there is no second copy
//!   to keep consistent; the cost is that events after the first held delete are read again
//!   after a restart (their hashes match the ledger: no writes).
//! - The operator decides through [`DeleteGuardHandle`] (API `…/guard/{direction}/allow|discard`):
//!   *allow* applies every held delete at once and starts a fresh window; *discard* drops them
//!   from the pending set (their offsets are committed, so they are not read again). Push: the
//!   items stay in the lists and their ledger entries are unchanged, so a later insert of the
//!   same key updates the existing item. Pull: the rows' entries forget the deleted items and the
//!   handle re-snapshots their tables, so the rows re-create them. A decision is not persisted: a
//!   crash before the offsets of an allowed batch are committed holds the rest again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Duration, Instant};

use tracing::warn;

use crate::capture::ResnapshotHandle;
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
/// A direction of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Deletes bound for the lists (rows deleted in PostgreSQL).
    Push,
    /// Deletes bound for the tables (items deleted in a list, pull `on_delete` not `ignore`).
    Pull,
}

impl Direction {
    pub fn word(self) -> &'static str {
        match self {
            Direction::Push => "push",
            Direction::Pull => "pull",
        }
    }

    /// `/ready` stage and notification condition (`<pipeline>/guard.push`).
    pub fn stage(self) -> &'static str {
        match self {
            Direction::Push => "guard.push",
            Direction::Pull => "guard.pull",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Where the held deletes would go, and what discard does, for the operator.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Direction::Push => ("the lists", "leaves the items in place"),
            Direction::Pull => ("the tables", "re-creates the items from the rows"),
        }
    }
}

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
    /// The first held keys (`<schema.table>/<SyncKey>`), at most 20.
    pub first_keys: Vec<String>,
    /// When the direction paused (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
}

/// The processor's answer to a decision: how many deletes, and the tables whose rows must be
/// read again so that discarded list deletes re-create their items.
#[derive(Debug, Default)]
pub struct Applied {
    pub deletes: usize,
    pub resnapshot: Vec<String>,
}

type Reply = oneshot::Sender<Applied>;

#[derive(Debug, Default)]
struct Shared {
    status: [DirectionStatus; 2],
    decision: [Option<(Decision, Reply)>; 2],
}

/// The control plane's view of a pipeline's delete guard (cheap to clone). The processor
/// publishes its status here and takes the operator's decisions from it.
#[derive(Debug, Clone)]
pub struct DeleteGuardHandle {
    pipeline: String,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    /// `/ready`: the direction's stage is not ready while paused.
    readiness: Option<Readiness>,
    notifier: Option<Notifier>,
    /// Re-reads a table's rows (discarded list deletes re-create their items).
    snapshots: Option<ResnapshotHandle>,
}

/// Why a decision was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("the {0} direction is not paused: there is nothing to allow or discard")]
    NotPaused(&'static str),
    #[error("the processor did not take the decision (it stopped or is restarting); try again")]
    NotTaken,
    #[error("the deletes were discarded, but re-reading the rows of {table} failed: {error}")]
    Resnapshot { table: String, error: String },
}

impl DeleteGuardHandle {
    pub fn new(pipeline: &str, guard: &crate::config::GuardConfig) -> Self {
        let mut shared = Shared::default();
        shared.status[0].enabled = guard.push.enabled;
        shared.status[1].enabled = guard.pull.enabled;
        Self {
            pipeline: pipeline.to_string(),
            shared: Arc::new(Mutex::new(shared)),
            wake: Arc::new(Notify::new()),
            readiness: None,
            notifier: None,
            snapshots: None,
        }
    }

    /// Shows a pause in `/ready` (stages `guard.push`, `guard.pull`).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        for d in [Direction::Push, Direction::Pull] {
            readiness.set(&self.pipeline, d.stage(), true);
        }
        self.readiness = Some(readiness);
        self
    }

    /// Sends a notification when a direction pauses, and a resolved one when it resumes.
    pub fn with_notifier(mut self, notifier: Option<Notifier>) -> Self {
        self.notifier = notifier;
        self
    }

    /// How a pull discard re-reads the rows whose items were deleted.
    pub fn with_snapshots(mut self, snapshots: ResnapshotHandle) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A direction's state.
    pub fn status(&self, dir: Direction) -> DirectionStatus {
        self.lock().status[dir.index()].clone()
    }

    /// Publishes a direction's state: the gauges, and on a change of pause `/ready`, the log
    /// and the notifier.
    pub(crate) fn publish(&self, dir: Direction, status: DirectionStatus) {
        let was = std::mem::replace(&mut self.lock().status[dir.index()], status.clone());
        let labels = [
            ("pipeline", self.pipeline.clone()),
            ("direction", dir.word().into()),
        ];
        metrics::gauge!(m::GUARD_DELETES_HELD, &labels).set(status.held as f64);
        metrics::gauge!(m::GUARD_PAUSED, &labels).set(if status.paused { 1.0 } else { 0.0 });
        if status.paused && (!was.paused || was.held != status.held) {
            let (bound, discard) = dir.describe();
            let summary = format!(
                "{} deletes bound for {bound} held: more than {} within the window",
                status.held, status.threshold
            );
            let detail = format!(
                "first keys: {}; `syncbridge guard <pipeline.yaml> allow --direction {}` \
                 applies them, `discard` {discard}",
                status.first_keys.join(", "),
                dir.word()
            );
            // `/ready` follows the count; the log line and the notification are once per pause.
            if let Some(r) = &self.readiness {
                r.set_not_ready(&self.pipeline, dir.stage(), format!("{summary} ({detail})"));
            }
            if !was.paused {
                warn!(pipeline = %self.pipeline, direction = dir.word(), held = status.held,
                    threshold = status.threshold, first_keys = ?status.first_keys,
                    "accidental-delete guard paused the deletes: {summary}");
                if let Some(n) = &self.notifier {
                    n.raise(dir.stage(), &summary, &detail);
                }
            }
        } else if !status.paused && was.paused {
            if let Some(r) = &self.readiness {
                r.set(&self.pipeline, dir.stage(), true);
            }
            if let Some(n) = &self.notifier {
                n.clear(dir.stage());
            }
        }
    }

    /// Hands `decision` to the processor and waits until it applied it (for a pull discard,
    /// also until the rows were read again): the number of deletes released or dropped.
    pub async fn decide(&self, dir: Direction, decision: Decision) -> Result<usize, DecisionError> {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut s = self.lock();
            if !s.status[dir.index()].paused {
                return Err(DecisionError::NotPaused(dir.word()));
            }
            s.decision[dir.index()] = Some((decision, tx));
        }
        self.wake.notify_one();
        let applied = match tokio::time::timeout(DECISION_WAIT, &mut rx).await {
            Ok(r) => r.map_err(|_| DecisionError::NotTaken)?,
            Err(_) => {
                // Not taken in time (the processor is stopped): withdrawn, unless it was taken
                // just now, then its answer follows at once.
                if self.lock().decision[dir.index()].take().is_some() {
                    return Err(DecisionError::NotTaken);
                }
                rx.await.map_err(|_| DecisionError::NotTaken)?
            }
        };
        for table in &applied.resnapshot {
            let Some(h) = &self.snapshots else { break };
            crate::process::drift::resnapshot(h, table)
                .await
                .map_err(|error| DecisionError::Resnapshot {
                    table: table.clone(),
                    error,
                })?;
        }
        Ok(applied.deletes)
    }

    pub(crate) fn take_decision(&self, dir: Direction) -> Option<(Decision, Reply)> {
        self.lock().decision[dir.index()].take()
    }

    /// Resolves when a decision is waiting (the processor's loop wakes to flush).
    pub(crate) async fn decided(&self) {
        loop {
            let notified = self.wake.notified();
            if self.lock().decision.iter().any(Option::is_some) {
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

    fn paused_push(h: &DeleteGuardHandle) {
        h.publish(
            Direction::Push,
            DirectionStatus {
                paused: true,
                ..Default::default()
            },
        );
    }

    #[tokio::test]
    async fn a_decision_needs_a_pause_and_is_answered_by_the_processor() {
        let h = DeleteGuardHandle::new("p", &crate::config::GuardConfig::default());
        assert_eq!(
            h.decide(Direction::Push, Decision::Allow).await,
            Err(DecisionError::NotPaused("push"))
        );
        paused_push(&h);
        assert_eq!(
            h.decide(Direction::Pull, Decision::Allow).await,
            Err(DecisionError::NotPaused("pull")),
            "each direction pauses on its own"
        );
        let processor = tokio::spawn({
            let h = h.clone();
            async move {
                h.decided().await;
                assert!(h.take_decision(Direction::Pull).is_none());
                let (d, reply) = h.take_decision(Direction::Push).expect("waiting");
                reply
                    .send(Applied {
                        deletes: 7,
                        resnapshot: Vec::new(),
                    })
                    .unwrap();
                d
            }
        });
        assert_eq!(h.decide(Direction::Push, Decision::Discard).await, Ok(7));
        assert_eq!(processor.await.unwrap(), Decision::Discard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_nobody_takes_is_withdrawn() {
        let h = DeleteGuardHandle::new("p", &crate::config::GuardConfig::default());
        paused_push(&h);
        assert_eq!(
            h.decide(Direction::Push, Decision::Allow).await,
            Err(DecisionError::NotTaken)
        );
        assert!(
            h.take_decision(Direction::Push).is_none(),
            "not left for a later processor"
        );
    }
}
