//! Pausing a pipeline whose failures are a fault of the pipeline, not of its rows.
//!
//! A dead letter is the right answer for one bad row (a value too long, an unknown choice). When
//! *every* event fails the same way (the schemas topic is unreadable, the list rejects every
//! write, a mapping no longer fits), dead-lettering them all empties the pipeline into the DLQ and
//! nobody is told: replaying from the DLQ is then the only way back. Two pieces:
//!
//! - [`DeadLetterGuard`] watches the push path's outcomes, one per flushed row: a run of
//!   `consecutive` dead letters of one kind, or more than `max_percent` of the last `window`
//!   outcomes being dead letters of one kind, trips it.
//! - [`PauseHandle`] is the pipeline's pause switch, shared by the processor (which pauses), the
//!   runtime (which waits for the resume and restarts the processor from its committed offsets)
//!   and the control plane (`GET /pipelines/{name}/pause`, `POST /pipelines/{name}/resume`).
//!
//! # Contract
//! While a run of dead letters is open (fewer than `consecutive` so far, no success since), the
//! processor holds those dead letters back and commits no offset at or past the first of them. A
//! success closes the run: the held dead letters are appended to the DLQ and offsets move on. A
//! tripped guard appends nothing and commits nothing past the first failing event, so after the
//! operator's fix and resume every one of those events is processed again, once. The share rule
//! catches failures interleaved with successes; the dead letters before it trips were already
//! acknowledged (they are in the DLQ, replayable), so it only stops the bleeding.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

use crate::config::DeadLetterGuard as Limits;

/// `Paused::kind` of a run of dead letters of one kind.
pub const DEAD_LETTER_STORM: &str = "dead_letter_storm";
/// `Paused::kind` of a change event whose schema did not appear in the schemas topic.
pub const SCHEMA_UNAVAILABLE: &str = "schema_unavailable";

/// Why a guard tripped: the kind of dead letter, how many, and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub kind: String,
    pub count: u32,
    pub rule: String,
}

/// Sliding state of the dead-letter rules (see the module docs).
#[derive(Debug)]
pub struct DeadLetterGuard {
    limits: Limits,
    /// Kind and length of the open run of dead letters of one kind.
    run: Option<(String, u32)>,
    /// The last `window` outcomes: `None` a success, `Some(kind)` a dead letter.
    window: VecDeque<Option<String>>,
    per_kind: BTreeMap<String, u32>,
}

impl DeadLetterGuard {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            run: None,
            window: VecDeque::new(),
            per_kind: BTreeMap::new(),
        }
    }

    /// Whether a run of dead letters is open (its dead letters must be held back).
    pub fn run_open(&self) -> bool {
        self.run.is_some()
    }

    /// Records a successful outcome (written, skipped on purpose): closes an open run.
    pub fn success(&mut self) {
        self.run = None;
        self.push(None);
    }

    /// Records a dead letter of `kind`; `Some` when that trips a rule.
    pub fn dead_letter(&mut self, kind: &str) -> Option<Trip> {
        let run = match self.run.take() {
            Some((k, n)) if k == kind => n + 1,
            _ => 1,
        };
        self.run = Some((kind.to_string(), run));
        self.push(Some(kind.to_string()));
        let c = self.limits.consecutive;
        if c > 0 && run >= c {
            return Some(Trip {
                kind: kind.to_string(),
                count: run,
                rule: format!(
                    "{run} dead letters of one kind in a row (guard.dead_letters.consecutive = {c})"
                ),
            });
        }
        let w = self.limits.window as usize;
        let n = self.per_kind.get(kind).copied().unwrap_or(0);
        if w > 0
            && self.window.len() >= w
            && u64::from(n) * 100 > u64::from(self.limits.max_percent) * w as u64
        {
            return Some(Trip {
                kind: kind.to_string(),
                count: n,
                rule: format!(
                    "{n} of the last {w} events dead-lettered as {kind} (more than guard.dead_letters.max_percent = {} %)",
                    self.limits.max_percent
                ),
            });
        }
        None
    }

    fn push(&mut self, outcome: Option<String>) {
        let w = self.limits.window as usize;
        if w == 0 {
            return;
        }
        if let Some(k) = &outcome {
            *self.per_kind.entry(k.clone()).or_default() += 1;
        }
        self.window.push_back(outcome);
        while self.window.len() > w {
            if let Some(Some(k)) = self.window.pop_front()
                && let Some(n) = self.per_kind.get_mut(&k)
            {
                *n -= 1;
                if *n == 0 {
                    self.per_kind.remove(&k);
                }
            }
        }
    }
}

/// Why a pipeline is paused, as the control plane shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paused {
    /// `dead_letter_storm` or `schema_unavailable`.
    pub kind: String,
    /// What happened and what to do, for the operator.
    pub reason: String,
    /// The first event not acknowledged: `topic/partition@offset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    pub since_ms: i64,
}

/// The pause switch of one pipeline (cheap to clone).
#[derive(Debug, Clone)]
pub struct PauseHandle {
    pipeline: String,
    state: Arc<Mutex<Option<Paused>>>,
    resumed: Arc<Notify>,
}

impl PauseHandle {
    pub fn new(pipeline: &str) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            state: Arc::new(Mutex::new(None)),
            resumed: Arc::new(Notify::new()),
        }
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// Marks the pipeline paused (the runtime does this when the processor stops with
    /// [`super::ProcessError::Paused`]).
    pub fn pause(&self, paused: Paused) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(paused);
    }

    /// The current pause, if any.
    pub fn paused(&self) -> Option<Paused> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The operator's resume: clears the pause and wakes the runtime. `None` when the pipeline
    /// was not paused.
    pub fn resume(&self) -> Option<Paused> {
        let was = self.state.lock().unwrap_or_else(|p| p.into_inner()).take();
        if was.is_some() {
            self.resumed.notify_one();
        }
        was
    }

    /// Waits until [`resume`](Self::resume) is called (returns at once when not paused).
    pub async fn resumed(&self) {
        loop {
            let notified = self.resumed.notified();
            if self.paused().is_none() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(consecutive: u32, window: u32, max_percent: u8) -> Limits {
        Limits {
            consecutive,
            window,
            max_percent,
        }
    }

    #[test]
    fn a_run_of_one_kind_trips_and_a_success_or_another_kind_resets_it() {
        let mut g = DeadLetterGuard::new(limits(3, 0, 50));
        assert!(g.dead_letter("undecodable").is_none());
        assert!(g.dead_letter("undecodable").is_none());
        assert!(g.run_open());
        g.success();
        assert!(!g.run_open());
        assert!(g.dead_letter("undecodable").is_none());
        assert!(
            g.dead_letter("too_long").is_none(),
            "another kind starts a new run"
        );
        assert!(g.dead_letter("too_long").is_none());
        let trip = g.dead_letter("too_long").expect("third in a row trips");
        assert_eq!((trip.kind.as_str(), trip.count), ("too_long", 3));
    }

    #[test]
    fn the_share_rule_counts_one_kind_over_the_window() {
        let mut g = DeadLetterGuard::new(limits(0, 10, 50));
        // Alternating success / failure: exactly 50 % never exceeds the limit.
        for _ in 0..20 {
            g.success();
            assert!(g.dead_letter("graph_rejected").is_none());
        }
        // Two failures in a row push the share over half of the last ten.
        let trip = g.dead_letter("graph_rejected").expect("6 of 10 > 50 %");
        assert_eq!(trip.count, 6);
        // Mixed kinds do not add up.
        let mut g = DeadLetterGuard::new(limits(0, 4, 50));
        for k in ["a", "b", "a", "b", "a", "b"] {
            assert!(g.dead_letter(k).is_none(), "{k}");
        }
    }

    #[test]
    fn zero_turns_the_rules_off() {
        let mut g = DeadLetterGuard::new(limits(0, 0, 50));
        for _ in 0..1000 {
            assert!(g.dead_letter("undecodable").is_none());
        }
    }

    #[tokio::test]
    async fn resume_wakes_a_waiter_and_reports_whether_it_was_paused() {
        let h = PauseHandle::new("p");
        assert!(h.resume().is_none());
        h.pause(Paused {
            kind: "dead_letter_storm".into(),
            reason: "r".into(),
            at: None,
            since_ms: 0,
        });
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.resumed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(h.resume().map(|p| p.kind), Some("dead_letter_storm".into()));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
