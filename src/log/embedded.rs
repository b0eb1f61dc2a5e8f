//! The embedded log: one directory, one process. sled for metadata, positions and compacted
//! topics; an append-only file per non-compacted topic for the records themselves.
//!
//! Layout (all integers big-endian so sled's byte order is numeric order):
//! - tree `topics`: `name → [partitions i32][compacted u8]([layout u8])?` (no layout byte: the
//!   per-record layout every topic had before topic files existed).
//! - non-compacted topics (layout *files*): `segments/<topic>.log`, frames of consecutive records
//!   of one partition (see [`super::topic_file`]); the file's durable length is noted in tree
//!   `log` under `'c' topic` (not flushed per append: it only bounds how much of the file's tail
//!   is crc-checked when the log is opened).
//! - compacted topics (layout *records*, which remove single records), tree `log`:
//!   `'r' topic 0x00 partition(u32) offset(u64) → codec v1`, and the latest offset of each key
//!   `'k' topic 0x00 partition(u32) key → offset(u64)`; everything of one batch in this one tree
//!   so it is applied atomically (`apply_batch`).
//! - tree `offsets`: `len(group)(u16) group topic 0x00 partition(u32) → next offset (i64)`.
//!
//! Durability: `append` writes the batch (a topic file's frames, or one sled batch), then
//! fsyncs (`fdatasync` of the file, or sled's `flush_async`) before it returns; only then does the
//! partition's durable high watermark move, so consumers never see a record that a crash could
//! take back. Group positions are flushed on every commit.
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

use super::topic_file::{FrameBuf, TopicFile};
use super::{
    AssignmentEvent, CommittedOffsets, ConsumedRecord, Delivered, EventLog, LogConsumer, LogError,
    Record, TopicSpec, codec, partition_for, validate_group, validate_position, validate_spec,
    validate_topic_name,
};
use crate::telemetry::metrics as m;

/// Records a consumer reads from sled per fetch: its whole buffer (bounded memory per consumer,
/// large enough to amortise one range scan over many records).
pub const EMBEDDED_FETCH_BATCH: usize = 256;

/// sled page cache size. sled's own default (1 GiB) suits a database; the log is read mostly at
/// its tail, so a small cache keeps the service's footprint predictable.
pub const DEFAULT_EMBEDDED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Directory of the topic files, inside the log directory.
const TOPIC_FILES_DIR: &str = "segments";

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

/// Where a topic's records live (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One sled key per record (compacted topics and topics created before topic files).
    Records,
    /// The topic's own append-only file.
    Files,
}

/// Per-topic state shared by writers and consumers.
#[derive(Debug)]
struct TopicState {
    name: String,
    partitions: i32,
    compacted: bool,
    storage: Storage,
    /// Next offset to assign per partition; the lock also serialises writers of this topic.
    next: Mutex<Vec<i64>>,
    /// Durable high watermark per partition: records below it are fsynced and visible.
    durable: Vec<AtomicI64>,
}

/// Where a topic's records are kept, as its [`Layout`] says.
#[derive(Debug)]
enum Storage {
    /// One key per record in the `log` tree.
    Records,
    /// The topic's own file.
    File(TopicFile),
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
            let (partitions, compacted, layout) = decode_topic_meta(&v)?;
            let (next, storage) = match layout {
                Layout::Records => {
                    let next = (0..partitions)
                        .map(|p| Ok(last_record_offset(&log, &name, p)?.map_or(0, |o| o + 1)))
                        .collect::<Result<Vec<_>, LogError>>()?;
                    (next, Storage::Records)
                }
                Layout::Files => {
                    let checkpoint = log
                        .get(checkpoint_key(&name))?
                        .map(|v| decode_i64(&v))
                        .transpose()?
                        .unwrap_or(0);
                    let r = TopicFile::open(
                        &config.path.join(TOPIC_FILES_DIR),
                        &name,
                        partitions,
                        checkpoint as u64,
                    )?;
                    if r.cut_bytes > 0 {
                        tracing::warn!(topic = %name, bytes = r.cut_bytes, "embedded log: cut an unacknowledged, incomplete append off the end of the topic file (a crash during the append)");
                    }
                    (r.next, Storage::File(r.file))
                }
            };
            let durable = next.iter().map(|&n| AtomicI64::new(n)).collect();
            topics.insert(
                name.clone(),
                Arc::new(TopicState {
                    name,
                    partitions,
                    compacted,
                    storage,
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
        let (layout, storage) = if spec.compacted {
            (Layout::Records, Storage::Records)
        } else {
            let dir = self.inner.path.join(TOPIC_FILES_DIR);
            let file = TopicFile::create(&dir, &spec.name, spec.partitions)?;
            (Layout::Files, Storage::File(file))
        };
        self.inner.topics_tree.insert(
            spec.name.as_bytes(),
            encode_topic_meta(spec, layout).to_vec(),
        )?;
        let n = spec.partitions as usize;
        topics.insert(
            spec.name.clone(),
            Arc::new(TopicState {
                name: spec.name.clone(),
                partitions: spec.partitions,
                compacted: spec.compacted,
                storage,
                next: Mutex::new(vec![0; n]),
                durable: (0..n).map(|_| AtomicI64::new(0)).collect(),
            }),
        );
        Ok(true)
    }

    /// Assigns offsets and writes the batch atomically (not yet durable). Returns the positions
    /// and the new end offset of each touched partition.
    fn write_batch(
        &self,
        topic: &TopicState,
        records: &[Record],
    ) -> Result<(Vec<Delivered>, PartitionEnds), LogError> {
        let mut next_guard = topic.next.lock().unwrap_or_else(PoisonError::into_inner);
        // Work on a copy: offsets advance only if the batch is written.
        let mut next = next_guard.clone();
        let delivered = match &topic.storage {
            Storage::Records => {
                let mut batch = sled::Batch::default();
                let delivered = self.batch_records(topic, records, &mut next, &mut batch)?;
                self.inner.log.apply_batch(batch)?;
                delivered
            }
            Storage::File(file) => {
                let (delivered, frames) = frames_of(topic, records, &mut next)?;
                file.write(frames)?;
                delivered
            }
        };
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

    /// Adds `records` to `batch` one key each (and, for compacted topics, removes each key's
    /// previous record).
    fn batch_records(
        &self,
        topic: &TopicState,
        records: &[Record],
        next: &mut [i64],
        batch: &mut sled::Batch,
    ) -> Result<Vec<Delivered>, LogError> {
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
        Ok(delivered)
    }
}

/// Assigns offsets and encodes `records` into frames: per partition, runs of consecutive
/// records closed at [`super::topic_file::FRAME_TARGET_BYTES`].
fn frames_of(
    topic: &TopicState,
    records: &[Record],
    next: &mut [i64],
) -> Result<(Vec<Delivered>, Vec<FrameBuf>), LogError> {
    let mut open: Vec<Option<FrameBuf>> = (0..topic.partitions).map(|_| None).collect();
    let mut frames = Vec::new();
    let mut delivered = Vec::with_capacity(records.len());
    for r in records {
        let p = partition_for(&r.key, topic.partitions);
        let slot = &mut next[p as usize];
        let offset = *slot;
        *slot += 1;
        let frame = &mut open[p as usize];
        if frame.as_ref().is_some_and(FrameBuf::is_full)
            && let Some(full) = frame.take()
        {
            frames.push(full);
        }
        frame
            .get_or_insert_with(|| FrameBuf::new(p, offset))
            .push(r)?;
        delivered.push(Delivered {
            topic: topic.name.clone(),
            partition: p,
            offset,
        });
    }
    frames.extend(open.into_iter().flatten());
    Ok((delivered, frames))
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
            // One fsync per batch; it also covers batches written earlier by other writers.
            match &state.storage {
                Storage::File(file) => {
                    let len = file.sync().await?;
                    // Persisted with sled's next flush; see `TopicFile::open` for its use.
                    self.inner.log.insert(
                        checkpoint_key(&state.name),
                        (len as i64).to_be_bytes().to_vec(),
                    )?;
                }
                Storage::Records => {
                    self.inner.db.flush_async().await?;
                }
            }
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
                    cursor: None,
                });
            }
        }
        let hold = GroupHold::take(&self.inner, group)?;
        Ok(EmbeddedConsumer {
            inner: Arc::clone(&self.inner),
            _hold: hold,
            group: group.to_owned(),
            parts,
            rr: 0,
            buf: VecDeque::with_capacity(self.inner.fetch_batch),
            shutdown,
            announced: false,
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

    async fn start_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        let t = self.topic(topic)?;
        (0..t.partitions)
            .map(|p| {
                let hw = t.durable[p as usize].load(Ordering::SeqCst);
                match &t.storage {
                    // Topic files keep every record (no retention).
                    Storage::File(_) => Ok(0),
                    Storage::Records => {
                        let start = record_key(&t.name, p, 0);
                        let end = record_key(&t.name, p, hw);
                        match self.inner.log.range(start..end).next() {
                            Some(item) => offset_of_record_key(&item?.0),
                            None => Ok(hw),
                        }
                    }
                }
            })
            .collect()
    }

    async fn offsets_for_time(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<i64>, LogError> {
        let t = self.topic(topic)?;
        // No time index: a forward scan of each partition, an operator's occasional request.
        (0..t.partitions)
            .map(|p| self.first_at_or_after(&t, p, timestamp_ms))
            .collect()
    }

    async fn set_committed(
        &self,
        group: &str,
        positions: &CommittedOffsets,
    ) -> Result<(), LogError> {
        validate_group(group)?;
        for ((topic, p), offset) in positions {
            validate_position(topic, *p, self.topic(topic)?.partitions, *offset)?;
        }
        // Held like a consumer while writing, so none can start in between.
        let _held = GroupHold::take(&self.inner, group)?;
        for ((topic, p), offset) in positions {
            self.inner.offsets.insert(
                position_key(group, topic, *p)?,
                offset.to_be_bytes().to_vec(),
            )?;
        }
        self.inner.db.flush_async().await?;
        Ok(())
    }
}

/// A group marked active for as long as this lives (no consumer of it can start).
#[derive(Debug)]
struct GroupHold {
    inner: Arc<Inner>,
    group: String,
}

impl GroupHold {
    fn take(inner: &Arc<Inner>, group: &str) -> Result<Self, LogError> {
        let mut active = inner
            .active_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !active.insert(group.to_owned()) {
            return Err(LogError::GroupBusy(group.to_owned()));
        }
        Ok(Self {
            inner: Arc::clone(inner),
            group: group.to_owned(),
        })
    }
}

impl Drop for GroupHold {
    fn drop(&mut self) {
        self.inner
            .active_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.group);
    }
}

impl EmbeddedLog {
    /// The first offset of partition `p` with a timestamp at or after `ts` (its end offset when
    /// none is), read forward with the consumers' own fetch.
    fn first_at_or_after(&self, t: &Arc<TopicState>, p: i32, ts: i64) -> Result<i64, LogError> {
        let hw = t.durable[p as usize].load(Ordering::SeqCst);
        let mut pos = Position {
            topic: Arc::clone(t),
            partition: p,
            next: 0,
            cursor: None,
        };
        let mut buf = VecDeque::with_capacity(self.inner.fetch_batch);
        while pos.next < hw {
            match &t.storage {
                Storage::Records => {
                    fill_records(
                        &self.inner.log,
                        &mut pos,
                        hw,
                        self.inner.fetch_batch,
                        &mut buf,
                    )?;
                }
                Storage::File(_) => fill_from_file(&mut pos, hw, self.inner.fetch_batch, &mut buf)?,
            }
            if buf.is_empty() {
                break;
            }
            if let Some(r) = buf.drain(..).find(|r| r.record.timestamp_ms >= ts) {
                return Ok(r.offset);
            }
        }
        Ok(hw)
    }
}

#[derive(Debug)]
struct Position {
    topic: Arc<TopicState>,
    partition: i32,
    next: i64,
    /// Topic files: a frame position no later than the frame holding `next` (none before it
    /// holds `next` or later), so a fetch walks on from there instead of seeking again.
    cursor: Option<u64>,
}

/// A consumer of the embedded log. At most one per group at a time (dropping it frees the group).
#[derive(Debug)]
pub struct EmbeddedConsumer {
    inner: Arc<Inner>,
    /// The group is this consumer's until it is dropped.
    _hold: GroupHold,
    group: String,
    parts: Vec<Position>,
    /// Round-robin start, so one busy partition cannot starve the others.
    rr: usize,
    buf: VecDeque<ConsumedRecord>,
    shutdown: CancellationToken,
    /// Whether the single `Assigned(every partition)` event was taken.
    announced: bool,
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
            match &pos.topic.storage {
                Storage::Records => fill_records(
                    &self.inner.log,
                    pos,
                    hw,
                    self.inner.fetch_batch,
                    &mut self.buf,
                )?,
                Storage::File(_) => {
                    fill_from_file(pos, hw, self.inner.fetch_batch, &mut self.buf)?;
                }
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

/// Buffers up to `max` records of `pos`'s partition from `pos.next` below `hw` (records layout).
fn fill_records(
    log: &sled::Tree,
    pos: &mut Position,
    hw: i64,
    max: usize,
    buf: &mut VecDeque<ConsumedRecord>,
) -> Result<(), LogError> {
    let start = record_key(&pos.topic.name, pos.partition, pos.next);
    let end = record_key(&pos.topic.name, pos.partition, hw);
    for item in log.range(start..end).take(max) {
        let (k, v) = item?;
        let offset = offset_of_record_key(&k)?;
        buf.push_back(ConsumedRecord {
            topic: pos.topic.name.clone(),
            partition: pos.partition,
            offset,
            record: codec::decode(&v)?,
        });
        pos.next = offset + 1;
    }
    Ok(())
}

/// Buffers up to `max` records of `pos`'s partition from `pos.next` below `hw` (topic file).
fn fill_from_file(
    pos: &mut Position,
    hw: i64,
    max: usize,
    buf: &mut VecDeque<ConsumedRecord>,
) -> Result<(), LogError> {
    let topic = Arc::clone(&pos.topic);
    let Storage::File(file) = &topic.storage else {
        return Ok(());
    };
    // Read after `hw`: the file's durable length moves before the watermarks do.
    let end = file.durable_len();
    let mut at = match pos.cursor {
        Some(at) => at,
        None => file.seek(pos.partition, pos.next),
    };
    let mut scratch = Vec::new();
    let mut taken = 0;
    while at < end {
        let h = file.header_at(at)?;
        if h.partition != pos.partition || h.end_offset() <= pos.next {
            at = h.end();
            pos.cursor = Some(at);
            continue;
        }
        let segment = file.segment(&h, &mut scratch)?;
        for (offset, encoded) in (h.first_offset..).zip(codec::split_segment(segment)?) {
            if offset < pos.next {
                continue;
            }
            if offset >= hw || taken == max {
                return Ok(());
            }
            buf.push_back(ConsumedRecord {
                topic: topic.name.clone(),
                partition: pos.partition,
                offset,
                record: codec::decode(encoded)?,
            });
            pos.next = offset + 1;
            taken += 1;
        }
        at = h.end();
        pos.cursor = Some(at);
    }
    Ok(())
}

impl LogConsumer for EmbeddedConsumer {
    /// One process holds the group (the directory is locked), so it reads every partition.
    fn take_assignment_events(&mut self) -> Vec<AssignmentEvent> {
        if std::mem::replace(&mut self.announced, true) {
            return Vec::new();
        }
        let all = self
            .parts
            .iter()
            .map(|p| (p.topic.name.clone(), p.partition))
            .collect();
        vec![AssignmentEvent::Assigned(all)]
    }

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

fn encode_topic_meta(spec: &TopicSpec, layout: Layout) -> [u8; 6] {
    let p = spec.partitions.to_be_bytes();
    // 1 was a pre-release layout (runs of records as sled values) that never shipped.
    let layout = match layout {
        Layout::Records => 0,
        Layout::Files => 2,
    };
    [p[0], p[1], p[2], p[3], u8::from(spec.compacted), layout]
}

fn decode_topic_meta(v: &[u8]) -> Result<(i32, bool, Layout), LogError> {
    let (a, b, c, d, flag, layout) = match v {
        [a, b, c, d, flag] => (a, b, c, d, flag, Layout::Records),
        [a, b, c, d, flag, 0] => (a, b, c, d, flag, Layout::Records),
        [a, b, c, d, flag, 2] => (a, b, c, d, flag, Layout::Files),
        _ => return Err(LogError::Corrupt("bad topic metadata".into())),
    };
    let compacted = match flag {
        0 => false,
        1 => true,
        other => return Err(LogError::Corrupt(format!("bad compaction flag {other}"))),
    };
    let partitions = i32::from_be_bytes([*a, *b, *c, *d]);
    if partitions < 1 {
        return Err(LogError::Corrupt(format!(
            "topic with {partitions} partitions"
        )));
    }
    Ok((partitions, compacted, layout))
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

fn checkpoint_key(topic: &str) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(topic.as_bytes());
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

fn last_record_offset(
    log: &sled::Tree,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, LogError> {
    log.scan_prefix(partition_prefix(b'r', topic, partition))
        .next_back()
        .map(|item| offset_of_record_key(&item?.0))
        .transpose()
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(log: &EmbeddedLog, group: &str, topic: &str) -> Vec<(i32, i64, Record)> {
        let mut c = log
            .consumer(group, &[topic.to_owned()], CancellationToken::new())
            .await
            .unwrap();
        let ends: i64 = log.end_offsets(topic).await.unwrap().iter().sum();
        let mut out = Vec::new();
        for _ in 0..ends {
            let r = c.recv().await.unwrap().unwrap();
            out.push((r.partition, r.offset, r.record));
        }
        out
    }

    /// Opens the log in `dir` once an earlier handle in this process has let go of it: sled's
    /// background threads keep the directory lock for a moment after the last handle drops.
    fn reopen(dir: &Path) -> EmbeddedLog {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match EmbeddedLog::open(EmbeddedLogConfig::new(dir)) {
                Err(LogError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
    }

    fn big(i: usize) -> Record {
        // ~1 KiB each: a batch of 100 spans several segments.
        Record::new(format!("k{}", i % 7), format!("{i}:{}", "x".repeat(1000)))
    }

    #[tokio::test]
    async fn frames_split_resume_mid_frame_and_survive_reopen() {
        const N: i64 = 200;
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir.path())).unwrap();
        log.ensure_topic(&TopicSpec::new("t", 2)).await.unwrap();
        log.append("t", (0..N as usize).map(big).collect())
            .await
            .unwrap();
        let topic = log.inner.topic("t").unwrap();
        let Storage::File(file) = &topic.storage else {
            panic!("non-compacted topic without a file");
        };
        let (mut frames, mut at) = (0, 0);
        while at < file.durable_len() {
            at = file.header_at(at).unwrap().end();
            frames += 1;
        }
        assert!(frames > 2, "200 KiB in {frames} frame(s)");
        assert_eq!(log.inner.log.scan_prefix([b'r']).count(), 0);
        drop(topic);

        // Commit a position inside a frame; the next consumer starts exactly there.
        let mut c = log
            .consumer("g", &["t".to_owned()], CancellationToken::new())
            .await
            .unwrap();
        let first = c.recv().await.unwrap().unwrap();
        let mid = 13;
        c.commit("t", first.partition, mid).await.unwrap();
        drop(c);
        drop(log);

        let log = reopen(dir.path());
        let ends = log.end_offsets("t").await.unwrap();
        assert_eq!(ends.iter().sum::<i64>(), N);
        let mut c = log
            .consumer("g", &["t".to_owned()], CancellationToken::new())
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..(N - mid) {
            let r = c.recv().await.unwrap().unwrap();
            seen.push((r.partition, r.offset));
        }
        let resumed: Vec<i64> = seen
            .iter()
            .filter(|(p, _)| *p == first.partition)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            resumed,
            (mid..ends[first.partition as usize]).collect::<Vec<_>>()
        );
        drop(c);

        // Appends continue the offsets; everything reads back in per-key order.
        let d = log.append("t", vec![big(N as usize)]).await.unwrap();
        assert_eq!(d[0].offset, ends[d[0].partition as usize]);
        let all = read_all(&log, "all", "t").await;
        assert_eq!(all.len(), N as usize + 1);
        for p in 0..2 {
            let offsets: Vec<i64> = all.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
            assert_eq!(offsets, (0..offsets.len() as i64).collect::<Vec<_>>());
        }
        // (Record::new stamps the current time, so compare keys and values.)
        let mut got: Vec<_> = all.iter().map(|r| (&r.2.key, &r.2.value)).collect();
        let want: Vec<Record> = (0..=N as usize).map(big).collect();
        let mut want: Vec<_> = want.iter().map(|r| (&r.key, &r.value)).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    /// A crash in the middle of an append leaves a torn tail: reopening cuts it, keeps every
    /// acknowledged record and continues the offsets.
    #[tokio::test]
    async fn a_torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir.path())).unwrap();
        log.ensure_topic(&TopicSpec::new("t", 1)).await.unwrap();
        log.append("t", (0..10).map(big).collect()).await.unwrap();
        drop(log);
        let path = TopicFile::path_in(&dir.path().join(TOPIC_FILES_DIR), "t");
        let len = std::fs::metadata(&path).unwrap().len();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            // Half a header and some of a payload, as a kill -9 mid-write leaves it.
            f.write_all(&[0, 0, 1, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 7])
                .unwrap();
        }
        let log = reopen(dir.path());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(log.end_offsets("t").await.unwrap(), vec![10]);
        let d = log.append("t", vec![big(10)]).await.unwrap();
        assert_eq!(d[0].offset, 10);
        let all = read_all(&log, "g", "t").await;
        let values: Vec<_> = all.iter().map(|r| r.2.value.clone()).collect();
        let want: Vec<_> = (0..=10).map(|i| big(i).value).collect();
        assert_eq!(values, want);
    }

    /// A topic written before topic files existed (5-byte metadata, one key per record) still reads,
    /// resumes its offsets and keeps its layout.
    #[tokio::test]
    async fn per_record_topics_of_earlier_versions_keep_working() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("topics")
                .unwrap()
                .insert("old", vec![0, 0, 0, 1, 0])
                .unwrap();
            let log = db.open_tree("log").unwrap();
            for o in 0..3 {
                let r = Record::new("k", format!("v{o}"));
                log.insert(record_key("old", 0, o), codec::encode(&r).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let log = reopen(dir.path());
        assert_eq!(log.end_offsets("old").await.unwrap(), vec![3]);
        let d = log
            .append("old", vec![Record::new("k", "v3")])
            .await
            .unwrap();
        assert_eq!(d[0].offset, 3);
        assert!(matches!(
            log.inner.topic("old").unwrap().storage,
            Storage::Records
        ));
        let all = read_all(&log, "g", "old").await;
        let values: Vec<_> = all.iter().map(|r| r.2.value.clone().unwrap()).collect();
        assert_eq!(
            values,
            ["v0", "v1", "v2", "v3"].map(|v| v.as_bytes().to_vec())
        );
    }
}
