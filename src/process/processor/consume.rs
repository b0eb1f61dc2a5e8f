//! Consuming a table record: the schema cache (the schemas topic, and Confluent registry ids
//! when `log.kafka.schema_registry` is set), decoding the Avro envelope and its key, and the
//! decision on what the record means: nothing (a tombstone, an unsynced table), a dead letter
//! (undecodable bytes), or a new desired state of one row, handed to [`coalesce`](super::coalesce).
//!
//! Invariant (*offsets follow durability*): a record is marked consumed as soon as it is read,
//! but before `ingest` returns it is either skipped on purpose, durably dead-lettered, or held
//! by a pending write that remembers its offset; the offset commit
//! ([`flush`](super::flush)) never passes a pending write's lowest offset.

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Desired, LastEvent, Processor, sync_key};
use crate::event::registry::{RegistryClient, confluent_schema_id, to_single_object};
use crate::event::{DecodeError, SchemaResolver, decode_with_fingerprint, schemas_topic};
use crate::log::{ConsumedRecord, EventLog, LogConsumer, TopicSpec};
use crate::process::ProcessError;
use crate::process::ledger;
use crate::process::row::{self, Change};
use crate::telemetry::metrics as m;

/// The writer schemas seen so far, and the consumer that reads more of them on demand.
pub(crate) struct SchemaCache<C> {
    pub(crate) resolver: SchemaResolver,
    pub(crate) consumer: C,
    pub(crate) topic: String,
    pub(crate) read_to: i64,
    pub(crate) stop: CancellationToken,
    /// With `log.kafka.schema_registry`: resolves Confluent schema ids to fingerprints.
    pub(crate) registry: Option<RegistryClient>,
    /// Registry id → CRC-64-AVRO fingerprint of that schema.
    pub(crate) by_id: HashMap<u32, u64>,
}

impl<L: EventLog + 'static> Processor<L> {
    /// Takes one table record in. Its offset counts as consumed at once; the record is then
    /// skipped, dead-lettered (durably, before this returns) or merged into the pending set.
    pub(crate) async fn ingest(
        &mut self,
        rec: ConsumedRecord,
        cache: &mut SchemaCache<L::Consumer>,
    ) -> Result<(), ProcessError> {
        self.consumed
            .insert((rec.topic.clone(), rec.partition), rec.offset + 1);
        self.stats.events += 1;
        let Some(value) = rec.record.value.as_deref() else {
            return Ok(());
        };
        let last = LastEvent::of(&rec);
        let change = match self
            .decode_as(cache, value, "", row::change_from_avro)
            .await?
        {
            Ok(c) => c,
            Err(e) => return self.dead_undecodable("?", "?", e.to_string(), &last).await,
        };
        self.note_event(&change);
        let Some(&ti) = self.by_table.get(&change.table) else {
            return Ok(());
        };
        let table = self.tables[ti].table.clone();
        if change.op == 't' {
            return self.truncate(ti, &change, &last);
        }
        let key = &rec.record.key;
        let key_cells = match self
            .decode_as(cache, key, "key: ", row::key_from_avro)
            .await?
        {
            Ok(k) if !k.is_empty() => k,
            Ok(_) => {
                let why = "the event has no key".to_string();
                return self.dead_undecodable(&table, "?", why, &last).await;
            }
            Err(e) => {
                return self
                    .dead_undecodable(&table, "?", e.to_string(), &last)
                    .await;
            }
        };
        let sk = sync_key(&key_cells);
        let lkey = ledger::key(&table, &sk);
        if change.origin.as_deref() == Some(self.origin.as_str()) {
            return self.fold_own_write(lkey, ti, sk, change, &last);
        }
        let (lsn, ts) = (change.lsn, change.commit_ts_ms);
        match change.op {
            'd' => self.put(lkey, ti, sk, Desired::Delete, lsn, ts, &last),
            'c' | 'u' | 'r' => {
                let Some(mut after) = change.after else {
                    let why = "no after image".to_string();
                    return self.dead_undecodable(&table, &sk, why, &last).await;
                };
                self.fill_unchanged(&lkey, &mut after);
                self.put(lkey, ti, sk, Desired::Upsert(after), lsn, ts, &last);
            }
            other => debug!(op = %other, "ignoring an event op the processor does not handle"),
        }
        Ok(())
    }

    /// Decodes `bytes` and reads the value with its writer schema (`read`: a change, or key
    /// columns). The inner `Err` is for bytes that will never decode; `what` prefixes its
    /// reason.
    async fn decode_as<T>(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        bytes: &[u8],
        what: &str,
        read: impl FnOnce(&Schema, &Avro) -> Result<T, row::RowError>,
    ) -> Result<Result<T, row::RowError>, ProcessError> {
        Ok(match self.decode(cache, bytes).await? {
            Ok((fp, v)) => cache
                .resolver
                .get(fp)
                .ok_or_else(|| row::RowError("schema vanished".into()))
                .and_then(|s| read(s, &v)),
            Err(e) => Err(row::RowError(format!("{what}{e}"))),
        })
    }

    /// Remembers when a record arrived and whether it continued the transaction before it
    /// (same commit LSN): the flush timer waits for the rest of a transaction.
    fn note_event(&mut self, change: &Change) {
        self.last_event = (
            Instant::now(),
            change.lsn != 0 && change.lsn == self.last_lsn,
        );
        self.last_lsn = change.lsn;
        metrics::counter!(m::PUSH_EVENTS_TOTAL, "pipeline" => self.cfg.pipeline.name.clone(), "op" => change.op.to_string())
            .increment(1);
    }

    /// Dead-letters a record that cannot be read (kind `undecodable`), durably.
    async fn dead_undecodable(
        &mut self,
        table: &str,
        key: &str,
        reason: String,
        last: &LastEvent,
    ) -> Result<(), ProcessError> {
        let d = self.dead_letter(table, key, "undecodable", reason, last);
        self.append_dead(vec![d]).await
    }

    pub(crate) async fn schema_cache(&self) -> Result<SchemaCache<L::Consumer>, ProcessError> {
        let topic = schemas_topic(&self.cfg.prefix, &self.cfg.pipeline.name);
        self.log
            .ensure_topic(&TopicSpec::compacted(topic.clone(), 1))
            .await?;
        let stop = CancellationToken::new();
        // A group that never commits reads the compacted topic from its start every time.
        let group = format!("{topic}.reader.{}", uuid::Uuid::new_v4().simple());
        let consumer = self
            .log
            .consumer(&group, std::slice::from_ref(&topic), stop.clone())
            .await?;
        let registry = match &self.cfg.pipeline.log {
            crate::config::LogConfig::Kafka {
                schema_registry: Some(r),
                ..
            } => Some(RegistryClient::new(r)),
            _ => None,
        };
        Ok(SchemaCache {
            resolver: SchemaResolver::new(),
            consumer,
            topic,
            read_to: 0,
            stop,
            registry,
            by_id: HashMap::new(),
        })
    }

    pub(crate) async fn refresh_schemas(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
    ) -> Result<(), ProcessError> {
        let end = self
            .log
            .end_offsets(&cache.topic)
            .await?
            .first()
            .copied()
            .unwrap_or(0);
        debug!(topic = %cache.topic, from = cache.read_to, end, "reading the schemas topic");
        while cache.read_to < end {
            let rec =
                match tokio::time::timeout(Duration::from_secs(10), cache.consumer.recv()).await {
                    Ok(r) => r?,
                    Err(_) => break,
                };
            let Some(rec) = rec else { break };
            cache.read_to = rec.offset + 1;
            if let (Ok(k), Some(Ok(v))) = (
                std::str::from_utf8(&rec.record.key),
                rec.record.value.as_deref().map(std::str::from_utf8),
            ) && let Err(e) = cache.resolver.add_topic_record(k, v)
            {
                warn!(topic = %cache.topic, "ignoring a bad schemas-topic record: {e}");
            }
        }
        Ok(())
    }

    pub(crate) async fn decode(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        bytes: &[u8],
    ) -> Result<Result<(u64, apache_avro::types::Value), DecodeError>, ProcessError> {
        // Confluent wire format: the id names the schema the capture sink registered; the same
        // schema (with its `sb.*` field properties) is in the schemas topic under its fingerprint.
        let reframed;
        let bytes = match confluent_schema_id(bytes) {
            Some(id) => match self.fingerprint_of_id(cache, id).await? {
                Ok(fp) => {
                    reframed = to_single_object(bytes, fp);
                    &reframed[..]
                }
                Err(e) => return Ok(Err(e)),
            },
            None => bytes,
        };
        match decode_with_fingerprint(bytes, &cache.resolver) {
            Err(DecodeError::UnknownFingerprint(_)) => {
                self.refresh_schemas(cache).await?;
                Ok(decode_with_fingerprint(bytes, &cache.resolver))
            }
            other => Ok(other),
        }
    }

    /// The fingerprint of registry schema `id` (fetched once); the schemas topic is re-read when
    /// it does not have that schema yet, and the registry's copy is used when it never does.
    pub(crate) async fn fingerprint_of_id(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        id: u32,
    ) -> Result<Result<u64, DecodeError>, ProcessError> {
        if let Some(fp) = cache.by_id.get(&id) {
            return Ok(Ok(*fp));
        }
        let Some(client) = &cache.registry else {
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
        if cache.resolver.get(fp).is_none() {
            self.refresh_schemas(cache).await?;
        }
        if cache.resolver.get(fp).is_none()
            && let Err(e) = cache.resolver.add_schema_json(&json)
        {
            return Ok(Err(e));
        }
        cache.by_id.insert(id, fp);
        Ok(Ok(fp))
    }
}
