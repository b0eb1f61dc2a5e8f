//! The production [`EventSink`]: Avro-encode each event and append it to the log, schemas first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::avro::{Encoder, schemas_topic, topic_name};
use super::event::ChangeEvent;
use super::sink::{EventSink, SinkError};
use crate::log::{EventLog, LogError, Record, TopicSpec};

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
            let enc = self.encoder.encode(e).map_err(|err| {
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
            for (fp, json) in enc.new_schemas {
                schemas.push(Record::new(fp.into_bytes(), json.into_bytes()));
            }
            let topic = topic_name(
                &self.prefix,
                &self.pipeline,
                &e.relation.schema,
                &e.relation.name,
            );
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
        let result = self.try_append(events).await;
        if result.is_err() {
            // The encoder already counts this batch's schemas as emitted; a fresh one re-emits
            // them with the retried batch (duplicates in the compacted topic are harmless).
            self.encoder = Encoder::new(&self.pipeline);
        }
        result
    }
}
