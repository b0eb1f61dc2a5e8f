//! What the processor deliberately does not write: dead letters (`<prefix>.<pipeline>.dlq`,
//! see [`dlq`](crate::process::dlq)) and the counters of rows skipped on purpose.
//!
//! Invariant (*offsets follow durability*): an event that is not written counts as handled
//! only once its dead letter is appended to the log ([`Processor::append_dead`] returns after
//! the append, and its error fails the caller: ingest, or the flush before offsets are
//! committed).

use tracing::warn;

use super::{LastEvent, Processor};
use crate::log::EventLog;
use crate::process::ProcessError;
use crate::process::dlq::{DeadLetter, SourcePosition};
use crate::telemetry::metrics as m;

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
        Ok(())
    }
}
