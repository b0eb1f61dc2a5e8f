//! Where captured events go. The run loop only needs "append these, in order, and return when
//! they are durable"; the production sink encodes to Avro and appends to the log, tests collect.

use std::future::Future;

use crate::event::change::ChangeEvent;

/// A sink refused (part of) a batch. Nothing of the batch counts as durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub message: String,
    /// Retrying the same batch later may succeed (broker unavailable, disk briefly full, ...).
    pub retryable: bool,
}

impl SinkError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// The destination of captured events.
///
/// Contract: `append` returns `Ok` only when every event of `events` is durable, and events are
/// made durable in slice order relative to earlier successful appends (per key is enough). On
/// `Err` any prefix may be stored; the reader then reconnects and re-sends from the last
/// acknowledged LSN, so events can arrive twice but never go missing.
pub trait EventSink: Send {
    fn append(
        &mut self,
        events: &[ChangeEvent],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;
}
