//! What the processor deliberately does not write: dead letters (`<prefix>.<pipeline>.dlq`,
//! see [`dlq`](crate::process::dlq)) and the counters of rows skipped on purpose.
//!
//! Invariant (*offsets follow durability*): an event that is not written counts as handled
//! only once its dead letter is appended to the log ([`Processor::append_dead`] returns after
//! the append, and its error fails the caller: ingest, or the flush before offsets are
//! committed).
//!
//! The push path's dead letters pass the dead-letter guard first
//! ([`Processor::dead_letter_push`], see [`crate::process::guard`]): while a run of dead letters
//! of one kind is open they are *held* in memory, and the offset commit never passes the
//! position of a held one. A success closes the run and appends them; a run that goes quiet for
//! [`HOLD_FOR`] is appended too (a trickle of bad rows is not a storm); a run that trips the
//! guard pauses the pipeline with nothing appended and nothing acknowledged past its first event.

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{LastEvent, Processor};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::dlq::{DeadLetter, SourcePosition};
use crate::process::guard::{DEAD_LETTER_STORM, Paused, Trip};
use crate::telemetry::metrics as m;

/// How long the dead letters of an open run wait for a success or more of their kind before
/// they are appended anyway: a storm delivers its next failure within milliseconds; five quiet
/// seconds mean bad rows arriving one by one, which the DLQ is for.
pub(crate) const HOLD_FOR: Duration = Duration::from_secs(5);

impl<L: EventLog + 'static> Processor<L> {
    /// Counts a row skipped on purpose (`own_origin`, `stale`, `unchanged`).
    pub(crate) fn skip_metric(&self, reason: &'static str) {
        metrics::counter!(m::PUSH_SKIPPED_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "reason" => reason)
            .increment(1);
    }

    /// A dead letter for the event `last` (its position and bytes go with it).
    pub(crate) fn dead_letter(
        &self,
        table: &str,
        key: &str,
        kind: &str,
        reason: String,
        last: &LastEvent,
    ) -> DeadLetter {
        DeadLetter {
            pipeline: self.cfg.pipeline.name.clone(),
            table: table.to_string(),
            key: key.to_string(),
            kind: kind.to_string(),
            reason,
            list: None,
            request_id: None,
            client_request_id: None,
            status: None,
            source: Some(SourcePosition {
                topic: last.topic.clone(),
                partition: last.partition,
                offset: last.offset,
            }),
            event_key_b64: None,
            event_value_b64: None,
            at_ms: chrono::Utc::now().timestamp_millis(),
        }
        .with_event(&last.key, last.value.as_deref())
    }

    /// Appends dead letters to the dead-letter topic (durable when this returns).
    pub(crate) async fn append_dead(&mut self, dead: Vec<DeadLetter>) -> Result<(), ProcessError> {
        if dead.is_empty() {
            return Ok(());
        }
        for d in &dead {
            warn!(pipeline = %d.pipeline, table = %d.table, key = %d.key, kind = %d.kind,
                request_id = d.request_id.as_deref().unwrap_or(""), "dead letter: {}", d.reason);
            metrics::counter!(m::PUSH_DEAD_LETTERS_TOTAL, "pipeline" => d.pipeline.clone(), "kind" => d.kind.clone())
                .increment(1);
        }
        self.stats.dead_letters += dead.len() as u64;
        let records = dead.iter().map(DeadLetter::to_record).collect();
        self.log.append(&self.dlq_topic, records).await?;
        // Appended before the offsets move past them (`flush_with_retry`).
        for d in &dead {
            self.audit_dead(d);
        }
        Ok(())
    }

    /// Push-path dead letters: counted by the guard and held while their run is open (see the
    /// module docs). A tripped guard pauses the pipeline: nothing is appended.
    pub(crate) async fn dead_letter_push(
        &mut self,
        dead: Vec<DeadLetter>,
    ) -> Result<(), ProcessError> {
        for d in dead {
            if let Some(trip) = self.dead_guard.dead_letter(&d.kind) {
                return Err(self.storm(trip, &d));
            }
            self.held.push(d);
            self.held_at = Some(Instant::now());
        }
        Ok(())
    }

    /// `n` rows settled without a dead letter: an open run ends, its dead letters are appended.
    pub(crate) async fn settled_ok(&mut self, n: usize) -> Result<(), ProcessError> {
        if n == 0 {
            return Ok(());
        }
        for _ in 0..n {
            self.dead_guard.success();
        }
        self.release_held().await
    }

    /// Appends the held dead letters of a run that went quiet for [`HOLD_FOR`].
    pub(crate) async fn release_quiet(&mut self) -> Result<(), ProcessError> {
        match self.held_release_at() {
            Some(at) if Instant::now() >= at => self.release_held().await,
            _ => Ok(()),
        }
    }

    /// When the held dead letters are due to be appended, if any are held.
    pub(crate) fn held_release_at(&self) -> Option<Instant> {
        self.held_at
            .filter(|_| !self.held.is_empty())
            .map(|t| t + HOLD_FOR)
    }

    /// The positions of held dead letters: the offset commit stays below them.
    pub(crate) fn held_positions(&self) -> impl Iterator<Item = ((String, i32), i64)> + '_ {
        self.held
            .iter()
            .filter_map(|d| d.source.as_ref())
            .map(|s| ((s.topic.clone(), s.partition), s.offset))
    }

    async fn release_held(&mut self) -> Result<(), ProcessError> {
        if self.held.is_empty() {
            return Ok(());
        }
        let held = std::mem::take(&mut self.held);
        self.held_at = None;
        if let Err(e) = self.append_dead(held.clone()).await {
            // Still held: the offsets stay below them and the next flush tries again.
            self.held = held;
            self.held_at = Some(Instant::now());
            return Err(e);
        }
        Ok(())
    }

    /// The pause for a tripped guard; `at` is the first event of the run (nothing past it is
    /// acknowledged).
    fn storm(&self, trip: Trip, last: &DeadLetter) -> ProcessError {
        let first = self.held.first().unwrap_or(last);
        let at = first
            .source
            .as_ref()
            .map(|s| format!("{}/{}@{}", s.topic, s.partition, s.offset));
        ProcessError::Paused(Paused {
            kind: DEAD_LETTER_STORM.into(),
            reason: format!(
                "{}: {} dead letters ({}) would follow one another, a fault of the pipeline rather \
                 than of its rows. The last: table {} key {}: {}. Nothing was dead-lettered or \
                 acknowledged from {} on; fix the cause (list, mapping, credentials, data), then \
                 `syncbridge resume`",
                trip.rule,
                trip.count,
                trip.kind,
                last.table,
                last.key,
                last.reason,
                at.as_deref().unwrap_or("the first of them")
            ),
            at,
            since_ms: chrono::Utc::now().timestamp_millis(),
        })
    }
}
