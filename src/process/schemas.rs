//! The processor's view of the change-event schemas: a private reader of the compacted
//! `<prefix>.<pipeline>.schemas` topic feeding a [`SchemaResolver`], plus the Confluent registry
//! when `log.kafka.schema_registry` is set.
//!
//! # Contract: an unknown fingerprint is waited for, never dead-lettered
//! Capture appends every schema version to the schemas topic before the first record that uses
//! it, so an event whose fingerprint is unknown means the reader has not *seen* the schema yet,
//! not that it does not exist: the topic's end offset may not cover it yet, a broker may report a
//! low watermark (tansu 0.6.0 reports the last batch's base offset + 1), or a consumer may still
//! be joining its group. [`SchemaCache::decode`] therefore re-reads the topic (to its end offset,
//! then whatever else arrives within a short grace), with backoff, for up to `wait`. Only when
//! the schema is still missing after that does it answer [`DecodeError::UnknownFingerprint`],
//! which the processor turns into a pause naming the fingerprint, the schemas topic and the
//! event's position (nothing past it acknowledged), never into a dead letter: replaying from the
//! DLQ would be the only way back and nobody would be told.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ProcessError;
use crate::event::registry::{RegistryClient, confluent_schema_id, to_single_object};
use crate::event::{DecodeError, SchemaResolver, decode_with_fingerprint};
use crate::log::{EventLog, LogConsumer, TopicSpec};

/// One `recv` of the schemas reader while it is behind the end offset: re-checks the end offset
/// (and the deadline) this often instead of trusting one long poll.
const RECV_SLICE: Duration = Duration::from_secs(1);
/// After reaching the end offset, records arriving within this grace are read too: a broker's
/// watermark may lag the records it already serves.
const PAST_END_GRACE: Duration = Duration::from_millis(200);
/// Backoff between re-reads while a schema is missing: 50 ms doubling to 2 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Decoded schemas and the reader of the schemas topic.
pub(crate) struct SchemaCache<C> {
    pub(crate) resolver: SchemaResolver,
    consumer: C,
    topic: String,
    /// Next offset to read (records below it were added to `resolver`).
    read_to: i64,
    stop: CancellationToken,
    /// With `log.kafka.schema_registry`: resolves Confluent schema ids to fingerprints.
    registry: Option<RegistryClient>,
    /// Registry id → CRC-64-AVRO fingerprint of that schema.
    by_id: HashMap<u32, u64>,
    /// How long a missing schema is waited for (`guard.schema_wait_ms`).
    wait: Duration,
}

impl<C: LogConsumer> SchemaCache<C> {
    /// Opens a reader of `topic` in a group of its own that never commits, so it reads the
    /// compacted topic from its start every time.
    pub(crate) async fn open<L: EventLog<Consumer = C>>(
        log: &L,
        topic: String,
        registry: Option<RegistryClient>,
        wait: Duration,
    ) -> Result<Self, ProcessError> {
        log.ensure_topic(&TopicSpec::compacted(topic.clone(), 1))
            .await?;
        let stop = CancellationToken::new();
        let group = format!("{topic}.reader.{}", uuid::Uuid::new_v4().simple());
        let consumer = log
            .consumer(&group, std::slice::from_ref(&topic), stop.clone())
            .await?;
        Ok(Self {
            resolver: SchemaResolver::new(),
            consumer,
            topic,
            read_to: 0,
            stop,
            registry,
            by_id: HashMap::new(),
            wait,
        })
    }

    /// The schemas topic's name (for operator messages).
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// Next offset the reader will read (for operator messages).
    pub(crate) fn read_to(&self) -> i64 {
        self.read_to
    }

    /// Stops the reader (the processor is done with it).
    pub(crate) fn close(&self) {
        self.stop.cancel();
    }

    /// Decodes a change-event key or value; `Ok(Err)` is a problem of the event (or, for
    /// [`DecodeError::UnknownFingerprint`], a schema that did not appear within the wait).
    pub(crate) async fn decode<L: EventLog<Consumer = C>>(
        &mut self,
        log: &L,
        bytes: &[u8],
    ) -> Result<Result<(u64, apache_avro::types::Value), DecodeError>, ProcessError> {
        // Confluent wire format: the id names the schema the capture sink registered; the same
        // schema (with its `sb.*` field properties) is in the schemas topic under its fingerprint.
        let reframed;
        let bytes = match confluent_schema_id(bytes) {
            Some(id) => match self.fingerprint_of_id(log, id).await? {
                Ok(fp) => {
                    reframed = to_single_object(bytes, fp);
                    &reframed[..]
                }
                Err(e) => return Ok(Err(e)),
            },
            None => bytes,
        };
        let first = decode_with_fingerprint(bytes, &self.resolver);
        if !matches!(first, Err(DecodeError::UnknownFingerprint(_))) {
            return Ok(first);
        }
        let started = Instant::now();
        let deadline = started + self.wait;
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.read_available(log, deadline).await?;
            let again = decode_with_fingerprint(bytes, &self.resolver);
            let missing = matches!(again, Err(DecodeError::UnknownFingerprint(_)));
            if !missing || Instant::now() >= deadline {
                if !missing && started.elapsed() > PAST_END_GRACE * 2 {
                    info!(topic = %self.topic, waited_ms = started.elapsed().as_millis() as u64,
                        "a change event's schema arrived late in the schemas topic");
                }
                return Ok(again);
            }
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            debug!(topic = %self.topic, ?pause, "schema not in the schemas topic yet; waiting");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The fingerprint of registry schema `id` (fetched once); the schemas topic is re-read when
    /// it does not have that schema yet, and the registry's copy is used when it never does.
    async fn fingerprint_of_id<L: EventLog<Consumer = C>>(
        &mut self,
        log: &L,
        id: u32,
    ) -> Result<Result<u64, DecodeError>, ProcessError> {
        if let Some(fp) = self.by_id.get(&id) {
            return Ok(Ok(*fp));
        }
        let Some(client) = &self.registry else {
            return Ok(Err(DecodeError::NeedsRegistry(id)));
        };
        let json = match client.schema_by_id(id).await {
            Ok(json) => json,
            Err(e @ crate::event::registry::RegistryError::UnknownId { .. }) => {
                return Ok(Err(DecodeError::Schema {
                    origin: format!("schema registry id {id}"),
                    reason: e.to_string(),
                }));
            }
            Err(e) => return Err(ProcessError::Registry(e)),
        };
        let mut probe = SchemaResolver::new();
        let fp = match probe.add_schema_json(&json) {
            Ok(fp) => fp,
            Err(e) => return Ok(Err(e)),
        };
        if self.resolver.get(fp).is_none() {
            // The registry has it, so no long wait: read what the topic has now.
            let deadline = Instant::now() + RECV_SLICE.min(self.wait);
            self.read_available(log, deadline).await?;
        }
        if self.resolver.get(fp).is_none()
            && let Err(e) = self.resolver.add_schema_json(&json)
        {
            return Ok(Err(e));
        }
        self.by_id.insert(id, fp);
        Ok(Ok(fp))
    }

    /// Reads the schemas topic up to its end offset (re-checked every [`RECV_SLICE`], so a reader
    /// still joining its group or an end offset that moves does not stall it past `deadline`),
    /// then whatever else the consumer hands out within [`PAST_END_GRACE`].
    async fn read_available<L: EventLog<Consumer = C>>(
        &mut self,
        log: &L,
        deadline: Instant,
    ) -> Result<(), ProcessError> {
        loop {
            let end = log
                .end_offsets(&self.topic)
                .await?
                .first()
                .copied()
                .unwrap_or(0);
            let behind = self.read_to < end;
            let now = Instant::now();
            if behind && now >= deadline {
                warn!(topic = %self.topic, read_to = self.read_to, end,
                    "could not read the schemas topic to its end offset within the wait");
                return Ok(());
            }
            let slice = if behind {
                RECV_SLICE.min(deadline - now)
            } else {
                PAST_END_GRACE
            };
            match tokio::time::timeout(slice, self.consumer.recv()).await {
                Ok(Ok(Some(rec))) => {
                    self.read_to = self.read_to.max(rec.offset + 1);
                    self.add(&rec.record.key, rec.record.value.as_deref());
                }
                // Shutdown: the processor stops too.
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e.into()),
                // Nothing more within the grace past the end: caught up.
                Err(_) if !behind => return Ok(()),
                Err(_) => {}
            }
        }
    }

    fn add(&mut self, key: &[u8], value: Option<&[u8]>) {
        if let (Ok(k), Some(Ok(v))) = (std::str::from_utf8(key), value.map(std::str::from_utf8))
            && let Err(e) = self.resolver.add_topic_record(k, v)
        {
            warn!(topic = %self.topic, "ignoring a bad schemas-topic record: {e}");
        }
    }
}
