//! The production [`EventSink`]: Avro-encode each event and append it to the log, schemas first.
//!
//! Before its first append the sink reads the compacted `<prefix>.<pipeline>.schemas` topic to its
//! end (a throwaway consumer group that never commits, bounded by the topic's end offsets) and
//! preloads every schema into the [`Encoder`]: schemas already published are not appended again,
//! and a schema that differs from an earlier one only in logical types (same Parsing Canonical
//! Form) never reuses that one's fingerprint, across restarts too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::sink::{EventSink, SinkError};
use crate::event::change::ChangeEvent;
use crate::event::registry::{ConfluentFramer, RegistryClient};
use crate::event::{Encoder, schemas_topic, topic_name};
use crate::log::{EventLog, LogConsumer, LogError, Record, TopicSpec};

/// Longest wait for reading the schemas topic to its end at start-up.
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Every record of `topic` up to its current end, as `(key, value)` strings, latest per key, in
/// key order. Reads with a fresh consumer group that never commits (nothing is stored for it on
/// the embedded log; on Kafka an empty group expires by itself).
pub async fn read_schema_records<L: EventLog>(
    log: &L,
    topic: &str,
) -> Result<Vec<(String, String)>, LogError> {
    let ends = log.end_offsets(topic).await?;
    let mut remaining: HashSet<i32> = ends
        .iter()
        .enumerate()
        .filter(|(_, e)| **e > 0)
        .map(|(p, _)| p as i32)
        .collect();
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    if remaining.is_empty() {
        return Ok(Vec::new());
    }
    let stop = CancellationToken::new();
    let group = format!(
        "syncbridge-schema-preload-{}",
        uuid::Uuid::new_v4().simple()
    );
    let mut consumer = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await?;
    let read = async {
        while !remaining.is_empty() {
            let Some(rec) = consumer.recv().await? else {
                break;
            };
            let key = String::from_utf8_lossy(&rec.record.key).into_owned();
            match rec.record.value.as_deref() {
                Some(value) => {
                    out.insert(key, String::from_utf8_lossy(value).into_owned());
                }
                None => {
                    out.remove(&key);
                }
            }
            let end = ends.get(rec.partition as usize).copied().unwrap_or(0);
            if rec.offset + 1 >= end {
                remaining.remove(&rec.partition);
            }
        }
        Ok::<(), LogError>(())
    };
    let result = tokio::time::timeout(PRELOAD_TIMEOUT, read).await;
    stop.cancel();
    match result {
        Ok(r) => r?,
        Err(_) => {
            return Err(LogError::InvalidArgument(format!(
                "reading {topic} to its end took longer than {} s",
                PRELOAD_TIMEOUT.as_secs()
            )));
        }
    }
    Ok(out.into_iter().collect())
}

/// Encodes with [`Encoder`] and appends to `<prefix>.<pipeline>.<schema>.<table>` topics; new
/// schemas go to the compacted `<prefix>.<pipeline>.schemas` topic before any event using them.
#[derive(Debug)]
pub struct LogSink<L> {
    log: Arc<L>,
    prefix: String,
    pipeline: String,
    partitions: i32,
    encoder: Encoder,
    ensured: HashSet<String>,
    /// The schemas topic's records as read at start-up (`None` until read).
    preloaded: Option<Vec<(String, String)>>,
    /// Confluent wire format instead of single-object encoding (`log.kafka.schema_registry`).
    framer: Option<ConfluentFramer>,
}

impl<L: EventLog> LogSink<L> {
    /// `partitions` is used when a table topic is created (fixed for the topic's life).
    pub fn new(log: Arc<L>, prefix: &str, pipeline: &str, partitions: i32) -> Self {
        Self {
            log,
            prefix: prefix.to_string(),
            pipeline: pipeline.to_string(),
            partitions,
            encoder: Encoder::new(pipeline),
            ensured: HashSet::new(),
            preloaded: None,
            framer: None,
        }
    }

    /// Writes keys and values in the Confluent wire format, registering each schema with this
    /// registry before the first record that uses it (see [`ConfluentFramer`]).
    pub fn with_schema_registry(mut self, client: RegistryClient) -> Self {
        self.framer = Some(ConfluentFramer::new(client));
        self
    }

    /// Reads the schemas topic once and registers every schema with the encoder.
    async fn preload(&mut self) -> Result<(), SinkError> {
        if self.preloaded.is_none() {
            let topic = schemas_topic(&self.prefix, &self.pipeline);
            self.ensure(TopicSpec::compacted(topic.clone(), 1)).await?;
            let records = read_schema_records(&*self.log, &topic)
                .await
                .map_err(|e| SinkError {
                    retryable: true,
                    message: format!("cannot read {topic} to preload the encoder: {e}"),
                })?;
            tracing::info!(pipeline = %self.pipeline, topic = %topic, schemas = records.len(), "preloaded published schemas");
            self.preloaded = Some(records);
            self.apply_preloaded();
        }
        Ok(())
    }

    fn apply_preloaded(&mut self) {
        for (key, json) in self.preloaded.iter().flatten() {
            if let Err(e) = self.encoder.preload_schema(key, json) {
                // Not ours or damaged: consumers cannot use it either; keep going without it.
                tracing::warn!(pipeline = %self.pipeline, error = %e, "skipping a schemas topic record");
            }
        }
    }

    async fn ensure(&mut self, spec: TopicSpec) -> Result<(), SinkError> {
        if !self.ensured.contains(&spec.name) {
            self.log.ensure_topic(&spec).await.map_err(log_err)?;
            self.ensured.insert(spec.name);
        }
        Ok(())
    }

    async fn try_append(&mut self, events: &[ChangeEvent]) -> Result<(), SinkError> {
        let mut schemas: Vec<Record> = Vec::new();
        let mut order: Vec<String> = Vec::new();
        let mut by_topic: HashMap<String, Vec<Record>> = HashMap::new();
        for e in events {
            let mut enc = self.encoder.encode(e).map_err(|err| {
                // Data problems of one event; retrying cannot help (dead-letter handling is the
                // processor's concern, capture stops with the reason).
                SinkError::fatal(format!(
                    "cannot encode {} event of {}.{} at LSN {:X}: {err}",
                    e.op.code(),
                    e.relation.schema,
                    e.relation.name,
                    e.source.lsn
                ))
            })?;
            let topic = topic_name(
                &self.prefix,
                &self.pipeline,
                &e.relation.schema,
                &e.relation.name,
            );
            if let Some(framer) = &mut self.framer {
                // Registered before anything of this batch is appended.
                framer
                    .frame(&topic, &mut enc)
                    .await
                    .map_err(|err| SinkError {
                        retryable: err.is_retryable(),
                        message: format!(
                            "cannot encode {} event of {}.{} at LSN {:X}: {err}",
                            e.op.code(),
                            e.relation.schema,
                            e.relation.name,
                            e.source.lsn
                        ),
                    })?;
            }
            for (fp, json) in enc.new_schemas {
                schemas.push(Record::new(fp.into_bytes(), json.into_bytes()));
            }
            let ts = if e.source.commit_ts_ms > 0 {
                e.source.commit_ts_ms
            } else {
                e.ts_ms
            };
            let record = Record::new(enc.key, enc.value).with_timestamp_ms(ts);
            by_topic
                .entry(topic.clone())
                .or_insert_with(|| {
                    order.push(topic);
                    Vec::new()
                })
                .push(record);
        }
        if !schemas.is_empty() {
            let topic = schemas_topic(&self.prefix, &self.pipeline);
            self.ensure(TopicSpec::compacted(topic.clone(), 1)).await?;
            self.log.append(&topic, schemas).await.map_err(log_err)?;
        }
        for topic in order {
            let records = by_topic.remove(&topic).unwrap_or_default();
            self.ensure(TopicSpec::new(topic.clone(), self.partitions))
                .await?;
            self.log.append(&topic, records).await.map_err(log_err)?;
        }
        Ok(())
    }
}

fn log_err(e: LogError) -> SinkError {
    SinkError {
        retryable: e.is_retryable(),
        message: e.to_string(),
    }
}

impl<L: EventLog> EventSink for LogSink<L> {
    async fn append(&mut self, events: &[ChangeEvent]) -> Result<(), SinkError> {
        self.preload().await?;
        let result = self.try_append(events).await;
        if result.is_err() {
            // The encoder already counts this batch's schemas as emitted; a fresh one (with the
            // start-up schemas) re-emits them with the retried batch (duplicates in the compacted
            // topic are harmless).
            self.encoder = Encoder::new(&self.pipeline);
            self.apply_preloaded();
        }
        result
    }
}
