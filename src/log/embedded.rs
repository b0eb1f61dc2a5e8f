//! The embedded log: one sled database in a directory, single process.
//!
//! Layout (all integers big-endian so sled's byte order is numeric order):
//! - tree `topics`: `name → [partitions i32][compacted u8]`.
//! - tree `log`: records `'r' topic 0x00 partition(u32) offset(u64) → codec v1`, and for compacted
//!   topics the latest offset of each key `'k' topic 0x00 partition(u32) key → offset(u64)`.
//!   Both live in one tree so a batch updates them atomically (`apply_batch`).
//! - tree `offsets`: `len(group)(u16) group topic 0x00 partition(u32) → next offset (i64)`.
//!
//! Durability: `append` applies the batch atomically, then `flush_async` (fsync) before it
//! returns; only then does the partition's durable high watermark move, so consumers never see a
//! record that a crash could take back. Group positions are flushed on every commit.
//!
//! Compaction is immediate: appending a key to a compacted topic physically removes the key's
//! previous record in the same atomic batch, so exactly the latest record per key (tombstones
//! included, kept forever) remains. Offsets of compacted topics therefore have gaps, as in Kafka.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    CommittedOffsets, ConsumedRecord, Delivered, EventLog, LogConsumer, LogError, Record,
    TopicSpec, codec, partition_for, validate_group, validate_spec, validate_topic_name,
};
use crate::telemetry::metrics as m;

/// Records a consumer reads from sled per fetch: its whole buffer (bounded memory per consumer,
/// large enough to amortise one range scan over many records).
pub const EMBEDDED_FETCH_BATCH: usize = 256;

/// sled page cache size. sled's own default (1 GiB) suits a database; the log is read mostly at
/// its tail, so a small cache keeps the service's footprint predictable.
pub const DEFAULT_EMBEDDED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

const BACKEND: &str = "embedded";

/// Configuration of the embedded log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedLogConfig {
    /// Directory of the sled database (created when missing; locked while open).
    pub path: PathBuf,
    /// sled page cache in bytes ([`DEFAULT_EMBEDDED_CACHE_BYTES`]).
    pub cache_capacity_bytes: u64,
    /// Records buffered per consumer ([`EMBEDDED_FETCH_BATCH`]).
    pub fetch_batch: usize,
}

impl EmbeddedLogConfig {
    /// Defaults for a log in `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_capacity_bytes: DEFAULT_EMBEDDED_CACHE_BYTES,
            fetch_batch: EMBEDDED_FETCH_BATCH,
        }
    }
}

/// `(partition index, new end offset)` of each partition a batch touched.
type PartitionEnds = Vec<(usize, i64)>;

/// Per-topic state shared by writers and consumers.
#[derive(Debug)]
struct TopicState {
    name: String,
    partitions: i32,
    compacted: bool,
    /// Next offset to assign per partition; the lock also serialises writers of this topic.
    next: Mutex<Vec<i64>>,
    /// Durable high watermark per partition: records below it are fsynced and visible.
    durable: Vec<AtomicI64>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    fetch_batch: usize,
    db: sled::Db,
    topics_tree: sled::Tree,
    log: sled::Tree,
    offsets: sled::Tree,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    /// Woken after every durable append.
    appended: Notify,
    /// Groups with a live consumer (one consumer per group in the single process).
    active_groups: Mutex<HashSet<String>>,
}

/// The embedded sled log. Cheap to clone (shared handle).
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `config.path`.
    ///
    /// # Errors
    /// [`LogError::Locked`] when another process or handle has the directory open;
    /// [`LogError::Storage`] / [`LogError::Corrupt`] when the store cannot be read.
    pub fn open(config: EmbeddedLogConfig) -> Result<Self, LogError> {
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            .open()
            .map_err(|e| open_error(e, &config.path))?;
        let topics_tree = db.open_tree("topics")?;
        let log = db.open_tree("log")?;
        let offsets = db.open_tree("offsets")?;

        let mut topics = HashMap::new();
        for item in topics_tree.iter() {
            let (k, v) = item?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|e| LogError::Corrupt(format!("topic name not utf-8: {e}")))?;
            let (partitions, compacted) = decode_topic_meta(&v)?;
            let mut next = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                next.push(last_offset(&log, &name, p)?.map_or(0, |o| o + 1));
            }
            let durable = next.iter().map(|&n| AtomicI64::new(n)).collect();
            topics.insert(
                name.clone(),
                Arc::new(TopicState {
                    name,
                    partitions,
                    compacted,
                    next: Mutex::new(next),
                    durable,
                }),
            );
        }
        tracing::info!(path = %config.path.display(), topics = topics.len(), "embedded log opened");
        Ok(Self {
            inner: Arc::new(Inner {
                path: config.path,
                fetch_batch: config.fetch_batch.max(1),
                db,
                topics_tree,
                log,
                offsets,
                topics: RwLock::new(topics),
                appended: Notify::new(),
                active_groups: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The log directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn topic(&self, name: &str) -> Result<Arc<TopicState>, LogError> {
        self.inner.topic(name)
    }

    /// Creates the topic in memory and in the store (not yet flushed). `Ok(false)` if it existed.
    fn create_topic(&self, spec: &TopicSpec) -> Result<bool, LogError> {
        let mut topics = self
            .inner
            .topics
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = topics.get(&spec.name) {
            check_existing(t, spec)?;
            return Ok(false);
        }
        self.inner
            .topics_tree
            .insert(spec.name.as_bytes(), encode_topic_meta(spec).to_vec())?;
        let n = spec.partitions as usize;
        topics.insert(
            spec.name.clone(),
            Arc::new(TopicState {
                name: spec.name.clone(),
                partitions: spec.partitions,
                compacted: spec.compacted,
                next: Mutex::new(vec![0; n]),
                durable: (0..n).map(|_| AtomicI64::new(0)).collect(),
            }),
        );
        Ok(true)
    }

    /// Assigns offsets and applies the batch atomically (not yet durable). Returns the positions
    /// and the new end offset of each touched partition.
    fn write_batch(
        &self,
        topic: &TopicState,
        records: &[Record],
    ) -> Result<(Vec<Delivered>, PartitionEnds), LogError> {
        let mut next_guard = topic.next.lock().unwrap_or_else(PoisonError::into_inner);
        // Work on a copy: offsets advance only if the batch is applied.
        let mut next = next_guard.clone();
        let mut batch = sled::Batch::default();
        let mut latest_in_batch: HashMap<(i32, &[u8]), i64> = HashMap::new();
        let mut delivered = Vec::with_capacity(records.len());
        for r in records {
            let p = partition_for(&r.key, topic.partitions);
            let slot = &mut next[p as usize];
            let offset = *slot;
            *slot += 1;
            batch.insert(record_key(&topic.name, p, offset), codec::encode(r)?);
            if topic.compacted {
                let ik = index_key(&topic.name, p, &r.key);
                let previous = match latest_in_batch.get(&(p, r.key.as_slice())) {
                    Some(&o) => Some(o),
                    None => self
                        .inner
                        .log
                        .get(&ik)?
                        .map(|v| decode_i64(&v))
                        .transpose()?,
                };
                if let Some(prev) = previous {
                    batch.remove(record_key(&topic.name, p, prev));
                }
                batch.insert(ik, offset.to_be_bytes().to_vec());
                latest_in_batch.insert((p, r.key.as_slice()), offset);
            }
            delivered.push(Delivered {
                topic: topic.name.clone(),
                partition: p,
                offset,
            });
        }
        self.inner.log.apply_batch(batch)?;
        let ends = next
            .iter()
            .zip(next_guard.iter())
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(p, (new, _))| (p, *new))
            .collect();
        *next_guard = next;
        Ok((delivered, ends))
    }
}

impl Inner {
    fn topic(&self, name: &str) -> Result<Arc<TopicState>, LogError> {
        validate_topic_name(name)?;
        self.topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_owned()))
    }
}

impl EventLog for EmbeddedLog {
    type Consumer = EmbeddedConsumer;

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), LogError> {
        validate_spec(spec)?;
        if self.create_topic(spec)? {
            self.inner.db.flush_async().await?;
            tracing::info!(topic = %spec.name, partitions = spec.partitions, compacted = spec.compacted, "embedded topic created");
        }
        Ok(())
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>, LogError> {
        let state = self.topic(topic)?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = async {
            let (delivered, ends) = self.write_batch(&state, &records)?;
            // One fsync per batch; it also covers batches applied earlier by other writers.
            self.inner.db.flush_async().await?;
            for (p, end) in ends {
                state.durable[p].fetch_max(end, Ordering::SeqCst);
            }
            self.inner.appended.notify_waiters();
            Ok::<_, LogError>(delivered)
        }
        .await;
        match &result {
            Ok(d) => {
                metrics::counter!(m::LOG_APPENDED_RECORDS_TOTAL, "backend" => BACKEND, "topic" => topic.to_owned())
                    .increment(d.len() as u64);
                metrics::histogram!(m::LOG_APPEND_SECONDS, "backend" => BACKEND, "topic" => topic.to_owned())
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                metrics::counter!(m::LOG_APPEND_ERRORS_TOTAL, "backend" => BACKEND, "topic" => topic.to_owned(), "retryable" => e.is_retryable().to_string())
                    .increment(1);
            }
        }
        result
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<EmbeddedConsumer, LogError> {
        validate_group(group)?;
        let mut parts = Vec::new();
        for name in topics {
            let t = self.topic(name)?;
            for p in 0..t.partitions {
                let next = read_position(&self.inner.offsets, group, name, p)?.unwrap_or(0);
                parts.push(Position {
                    topic: Arc::clone(&t),
                    partition: p,
                    next,
                });
            }
        }
        {
            let mut active = self
                .inner
                .active_groups
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !active.insert(group.to_owned()) {
                return Err(LogError::GroupBusy(group.to_owned()));
            }
        }
        Ok(EmbeddedConsumer {
            inner: Arc::clone(&self.inner),
            group: group.to_owned(),
            parts,
            rr: 0,
            buf: VecDeque::with_capacity(self.inner.fetch_batch),
            shutdown,
        })
    }

    async fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<CommittedOffsets, LogError> {
        validate_group(group)?;
        let mut out = CommittedOffsets::new();
        for name in topics {
            let t = self.topic(name)?;
            for p in 0..t.partitions {
                if let Some(o) = read_position(&self.inner.offsets, group, name, p)? {
                    out.insert((name.clone(), p), o);
                }
            }
        }
        Ok(out)
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        let t = self.topic(topic)?;
        Ok(t.durable.iter().map(|d| d.load(Ordering::SeqCst)).collect())
    }
}

#[derive(Debug)]
struct Position {
    topic: Arc<TopicState>,
    partition: i32,
    next: i64,
}

/// A consumer of the embedded log. At most one per group at a time (dropping it frees the group).
#[derive(Debug)]
pub struct EmbeddedConsumer {
    inner: Arc<Inner>,
    group: String,
    parts: Vec<Position>,
    /// Round-robin start, so one busy partition cannot starve the others.
    rr: usize,
    buf: VecDeque<ConsumedRecord>,
    shutdown: CancellationToken,
}

impl EmbeddedConsumer {
    /// Reads up to `fetch_batch` durable records of the next partition that has some.
    fn fill(&mut self) -> Result<bool, LogError> {
        let n = self.parts.len();
        for i in 0..n {
            let idx = (self.rr + i) % n;
            let pos = &mut self.parts[idx];
            let hw = pos.topic.durable[pos.partition as usize].load(Ordering::SeqCst);
            if pos.next >= hw {
                continue;
            }
            let start = record_key(&pos.topic.name, pos.partition, pos.next);
            let end = record_key(&pos.topic.name, pos.partition, hw);
            for item in self
                .inner
                .log
                .range(start..end)
                .take(self.inner.fetch_batch)
            {
                let (k, v) = item?;
                let offset = offset_of_record_key(&k)?;
                self.buf.push_back(ConsumedRecord {
                    topic: pos.topic.name.clone(),
                    partition: pos.partition,
                    offset,
                    record: codec::decode(&v)?,
                });
                pos.next = offset + 1;
            }
            if self.buf.is_empty() {
                // Only compaction gaps up to the watermark.
                pos.next = hw;
                continue;
            }
            self.rr = idx + 1;
            return Ok(true);
        }
        Ok(false)
    }
}

impl LogConsumer for EmbeddedConsumer {
    async fn recv(&mut self) -> Result<Option<ConsumedRecord>, LogError> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(None);
            }
            if let Some(r) = self.buf.pop_front() {
                metrics::counter!(m::LOG_CONSUMED_RECORDS_TOTAL, "backend" => BACKEND, "topic" => r.topic.clone())
                    .increment(1);
                return Ok(Some(r));
            }
            // Register for the wake-up before looking, so an append in between is not missed.
            let inner = Arc::clone(&self.inner);
            let notified = inner.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.fill()? {
                continue;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Ok(None),
                () = &mut notified => {}
            }
        }
    }

    async fn commit(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), LogError> {
        if !self
            .parts
            .iter()
            .any(|p| p.topic.name == topic && p.partition == partition)
        {
            return Err(LogError::InvalidArgument(format!(
                "group {:?} does not consume {topic}/{partition}",
                self.group
            )));
        }
        if next_offset < 0 {
            return Err(LogError::InvalidArgument(format!(
                "negative offset {next_offset} for {topic}/{partition}"
            )));
        }
        self.inner.offsets.insert(
            position_key(&self.group, topic, partition)?,
            next_offset.to_be_bytes().to_vec(),
        )?;
        self.inner.db.flush_async().await?;
        metrics::counter!(m::LOG_COMMITS_TOTAL, "backend" => BACKEND, "group" => self.group.clone())
            .increment(1);
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.inner
            .active_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.group);
    }
}

fn open_error(e: sled::Error, path: &Path) -> LogError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            LogError::Locked {
                path: path.to_owned(),
                detail: io.to_string(),
            }
        }
        other => LogError::Storage(other),
    }
}

fn check_existing(t: &TopicState, spec: &TopicSpec) -> Result<(), LogError> {
    if t.partitions != spec.partitions {
        return Err(LogError::PartitionMismatch {
            topic: spec.name.clone(),
            expected: spec.partitions,
            actual: t.partitions,
        });
    }
    if t.compacted != spec.compacted {
        tracing::warn!(topic = %spec.name, existing = t.compacted, requested = spec.compacted, "topic exists with another compaction setting; keeping the existing one");
    }
    Ok(())
}

fn encode_topic_meta(spec: &TopicSpec) -> [u8; 5] {
    let p = spec.partitions.to_be_bytes();
    [p[0], p[1], p[2], p[3], u8::from(spec.compacted)]
}

fn decode_topic_meta(v: &[u8]) -> Result<(i32, bool), LogError> {
    match v {
        [a, b, c, d, flag @ (0 | 1)] => {
            let partitions = i32::from_be_bytes([*a, *b, *c, *d]);
            if partitions < 1 {
                return Err(LogError::Corrupt(format!(
                    "topic with {partitions} partitions"
                )));
            }
            Ok((partitions, *flag == 1))
        }
        _ => Err(LogError::Corrupt("bad topic metadata".into())),
    }
}

fn partition_prefix(tag: u8, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len() + 1 + 4 + 8);
    k.push(tag);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    // Partitions are validated non-negative, so the u32 cast keeps numeric order.
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

fn record_key(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = partition_prefix(b'r', topic, partition);
    k.extend_from_slice(&(offset as u64).to_be_bytes());
    k
}

fn index_key(topic: &str, partition: i32, key: &[u8]) -> Vec<u8> {
    let mut k = partition_prefix(b'k', topic, partition);
    k.extend_from_slice(key);
    k
}

fn offset_of_record_key(k: &[u8]) -> Result<i64, LogError> {
    let tail = k
        .len()
        .checked_sub(8)
        .map(|at| &k[at..])
        .ok_or_else(|| LogError::Corrupt("short record key".into()))?;
    decode_i64(tail)
}

fn decode_i64(v: &[u8]) -> Result<i64, LogError> {
    let a: [u8; 8] = v
        .try_into()
        .map_err(|_| LogError::Corrupt(format!("expected 8 bytes, got {}", v.len())))?;
    Ok(i64::from_be_bytes(a))
}

fn last_offset(log: &sled::Tree, topic: &str, partition: i32) -> Result<Option<i64>, LogError> {
    let prefix = partition_prefix(b'r', topic, partition);
    match log.scan_prefix(&prefix).next_back() {
        Some(item) => {
            let (k, _) = item?;
            Ok(Some(offset_of_record_key(&k)?))
        }
        None => Ok(None),
    }
}

fn position_key(group: &str, topic: &str, partition: i32) -> Result<Vec<u8>, LogError> {
    let len = u16::try_from(group.len()).map_err(|_| {
        LogError::InvalidArgument(format!("group name of {} bytes is too long", group.len()))
    })?;
    let mut k = Vec::with_capacity(2 + group.len() + topic.len() + 5);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(group.as_bytes());
    k.extend_from_slice(&partition_prefix(b't', topic, partition)[1..]);
    Ok(k)
}

fn read_position(
    offsets: &sled::Tree,
    group: &str,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, LogError> {
    offsets
        .get(position_key(group, topic, partition)?)?
        .map(|v| decode_i64(&v))
        .transpose()
}
