//! Consuming a table record: decoding the Avro envelope and its key with the schema cache
//! ([`crate::process::schemas`]), and the decision on what the record means: nothing (a
//! tombstone, an unsynced table), a dead letter (undecodable bytes), a pause (a schema that did
//! not appear within `guard.schema_wait_ms`: never a dead letter), a held record of a table
//! whose shape no longer fits its mapping ([`schema_check`](super::schema_check)), or a new
//! desired state of one row, handed to [`coalesce`](super::coalesce).
//!
//! Invariant (*offsets follow durability*): a record is marked consumed as soon as it is read,
//! but before `ingest` returns it is either skipped on purpose, dead-lettered (held by the
//! dead-letter guard until durable, see [`dead_letters`](super::dead_letters)), or held by a
//! pending write that remembers its offset; the offset commit
//! ([`flush`](super::flush)) never passes a pending write's lowest offset.

use apache_avro::Schema;
use apache_avro::types::Value as Avro;
use tokio::time::Instant;
use tracing::debug;

use super::{Desired, LastEvent, Processor, sync_key};
use crate::event::registry::RegistryClient;
use crate::event::{DecodeError, schemas_topic};
use crate::log::{ConsumedRecord, EventLog};
use crate::process::ProcessError;
use crate::process::guard::{Paused, SCHEMA_UNAVAILABLE};
use crate::process::ledger;
use crate::process::row::{self, Change};
pub(crate) use crate::process::schemas::SchemaCache;
use crate::telemetry::metrics as m;

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
            .decode_as(cache, value, "", &last, |fp, s, v| {
                row::change_from_avro(s, v).map(|c| (fp, c))
            })
            .await?
        {
            Ok(c) => c,
            Err(e) => return self.dead_undecodable("?", "?", e.to_string(), &last).await,
        };
        let (fp, change) = change;
        self.note_event(&change);
        let Some(&ti) = self.by_table.get(&change.table) else {
            return Ok(());
        };
        // A table whose events no longer fit its mapping is held whole (see `schema_check`).
        if self
            .hold_for_schema(ti, fp, cache.resolver.get(fp), &last)
            .await
        {
            return Ok(());
        }
        let table = self.tables[ti].table.clone();
        if change.op == 't' {
            return self.truncate(ti, &change, &last);
        }
        let key = &rec.record.key;
        let key_cells = match self
            .decode_as(cache, key, "key: ", &last, |_, s, v| {
                row::key_from_avro(s, v)
            })
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
            // The return path's write may have been applied (and its ledger entry committed to
            // the changelog) by another process of the pipeline: catch the ledger up before
            // folding, or the flush would diff against a projection without the pulled values
            // and write them back to the list (one process: the entry is already current).
            if self
                .ledger
                .get(&lkey)?
                .is_some_and(|e| e.item.is_some() && e.lsn < change.lsn)
            {
                self.ledger.catch_up().await?;
            }
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
                self.fill_unchanged(&lkey, &mut after, change.before.as_ref());
                self.put(lkey, ti, sk, Desired::Upsert(after), lsn, ts, &last);
            }
            other => debug!(op = %other, "ignoring an event op the processor does not handle"),
        }
        Ok(())
    }

    /// Decodes `bytes` and reads the value with its writer schema (`read`: a change, or key
    /// columns). The inner `Err` is for bytes that will never decode; `what` prefixes its
    /// reason. A schema that did not appear within the wait pauses the pipeline (outer `Err`).
    async fn decode_as<T>(
        &self,
        cache: &mut SchemaCache<L::Consumer>,
        bytes: &[u8],
        what: &str,
        last: &LastEvent,
        read: impl FnOnce(u64, &Schema, &Avro) -> Result<T, row::RowError>,
    ) -> Result<Result<T, row::RowError>, ProcessError> {
        Ok(match cache.decode(&*self.log, bytes).await? {
            Ok((fp, v)) => cache
                .resolver
                .get(fp)
                .ok_or_else(|| row::RowError("schema vanished".into()))
                .and_then(|s| read(fp, s, &v)),
            Err(DecodeError::UnknownFingerprint(fp)) => {
                return Err(self.schema_unavailable(cache, &fp, last));
            }
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
        self.dead_letter_push(vec![d]).await
    }

    /// Opens the processor's reader of the schemas topic (see [`SchemaCache`]).
    pub(crate) async fn schema_cache(&self) -> Result<SchemaCache<L::Consumer>, ProcessError> {
        let topic = schemas_topic(&self.cfg.prefix, &self.cfg.pipeline.name);
        let registry = match &self.cfg.pipeline.log {
            crate::config::LogConfig::Kafka {
                schema_registry: Some(r),
                ..
            } => Some(RegistryClient::new(r)),
            _ => None,
        };
        let wait = std::time::Duration::from_millis(self.cfg.pipeline.guard.schema_wait_ms);
        SchemaCache::open(&*self.log, topic, registry, wait).await
    }

    /// The pause for an event whose schema did not appear within the wait: the pipeline stops
    /// before acknowledging it (see [`crate::process::schemas`]).
    fn schema_unavailable(
        &self,
        cache: &SchemaCache<L::Consumer>,
        fingerprint: &str,
        last: &LastEvent,
    ) -> ProcessError {
        let at = format!("{}/{}@{}", last.topic, last.partition, last.offset);
        ProcessError::Paused(Paused {
            kind: SCHEMA_UNAVAILABLE.into(),
            reason: format!(
                "the change event at {at} names schema fingerprint {fingerprint}, which is not in \
                 the schemas topic {} (read up to offset {}) after waiting {} s \
                 (guard.schema_wait_ms). Capture writes every schema there before the first event \
                 that uses it, so the record was lost (topic deleted or recreated, prefix changed, \
                 events written by another producer): publish the schema under its fingerprint, \
                 then `syncbridge resume`",
                cache.topic(),
                cache.read_to(),
                self.cfg.pipeline.guard.schema_wait_ms as f64 / 1000.0
            ),
            at: Some(at),
            since_ms: chrono::Utc::now().timestamp_millis(),
        })
    }
}
