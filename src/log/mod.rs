//! The durable event log: topics split into partitions of records addressed by offsets, read by
//! consumer groups that store their positions explicitly.
//!
//! Two implementations pass one conformance suite (`tests/log.rs`):
//! - [`KafkaLog`]: Apache Kafka (or a Kafka-compatible broker) through rdkafka, for production and
//!   horizontal scale through consumer groups.
//! - [`EmbeddedLog`]: one directory (sled for metadata and compacted topics, an append-only file
//!   per other topic), the default when no brokers are configured.
//!   Single process (the directory is locked), durable across `kill -9`.
//!
//! [`AnyLog`] picks one at startup from [`LogConfig`]; the rest of the service is written against
//! [`EventLog`] / [`LogConsumer`].
//!
//! # Delivery contract
//! Every implementation keeps these promises; the conformance suite checks each of them.
//!
//! 1. **Durable on return.** [`EventLog::append`] returns `Ok` only when every record of the batch
//!    is durable: fsynced to disk (embedded) or acknowledged by all in-sync replicas (`acks=all`,
//!    Kafka). The returned [`Delivered`] positions are in the order of the input records.
//! 2. **Not atomic on error.** When `append` fails, a prefix (embedded: none or all of the batch;
//!    Kafka: any subset) may already be stored. The caller retries the whole batch, so a record
//!    can be stored twice; downstream stages absorb duplicates (content-hash ledger).
//! 3. **Ordered per key.** A record goes to partition [`partition_for`]`(key, partitions)` (Kafka's
//!    murmur2 partitioner, so external Java/librdkafka `murmur2_random` producers agree). Within a
//!    partition, offsets grow in append order, so one key's records are read in the order written.
//! 4. **Offsets.** Per partition, starting at 0, strictly increasing and dense (no gaps) on
//!    non-compacted topics. Compacted topics may have gaps where superseded records were removed.
//! 5. **Visible only when durable.** A consumer never sees a record before `append` made it durable
//!    (embedded: a per-partition durable high watermark; Kafka: the broker's high watermark).
//! 6. **At-least-once consumption.** A consumer of group `g` starts each partition at `g`'s
//!    committed position, or at the earliest record when `g` never committed there. It yields each
//!    partition's records in offset order. Positions move only through
//!    [`LogConsumer::commit`]`(topic, partition, next_offset)`, called by the caller **after** the
//!    records below `next_offset` are processed; nothing is committed automatically. Records
//!    received but not committed are delivered again to the next consumer of the group (after a
//!    restart or a rebalance), never again to the same consumer instance.
//! 7. **Groups are independent.** Each group has its own positions over the same records.
//! 8. **Bounded.** Consumers buffer a bounded number of records (embedded:
//!    [`EMBEDDED_FETCH_BATCH`]; Kafka: `queued.max.messages.kbytes`). A slow caller slows the read.
//! 9. **Shutdown.** A consumer stops when its [`CancellationToken`] is cancelled:
//!    [`LogConsumer::recv`] returns `Ok(None)` promptly, also while it waits for records.
//! 10. **Assignment.** [`LogConsumer::take_assignment_events`] reports which partitions the
//!     consumer reads ([`AssignmentEvent`]): the embedded log every partition once; Kafka each
//!     consumer-group rebalance (cooperative-sticky for [`EventLog::shared_consumer`], the
//!     client's default eager assignors otherwise). A partition's `Assigned` event is recorded
//!     before any of its records is yielded; a `Revoked` one before the partition is given up.
//!
//! Compacted topics ([`TopicSpec::compacted`]) keep at least the latest record of each key. A
//! tombstone (`value = None`) marks a key deleted; the embedded log keeps the latest tombstone of a
//! key forever (Kafka removes it after `delete.retention.ms`).
//!
//! # Names
//! Topic names follow Kafka's rules (`[A-Za-z0-9._-]`, 1 to 249 characters, not `.` or `..`), so a
//! pipeline can move between the two implementations unchanged. The Kafka implementation prefixes
//! every topic and group with [`KafkaLogConfig::topic_prefix`] (so several deployments can share a
//! cluster); callers always use the unprefixed names.
//!
//! # Why an enum and not `Arc<dyn EventLog>`
//! The trait uses `async fn` (as `-> impl Future + Send`), which is not dyn-compatible without
//! boxing every future (the `async-trait` pattern). There are exactly two backends, chosen once
//! at startup, so [`AnyLog`] / [`AnyConsumer`] dispatch statically: no allocation per call, `Send`
//! checked by the compiler, no extra dependency. Generic code takes `L: EventLog`.

mod codec;
mod embedded;
mod error;
mod kafka;
mod partition;
mod topic_file;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

pub use embedded::{
    DEFAULT_EMBEDDED_CACHE_BYTES, EMBEDDED_FETCH_BATCH, EmbeddedConsumer, EmbeddedLog,
    EmbeddedLogConfig,
};
pub use error::LogError;
pub use kafka::{
    DEFAULT_CONSUMER_QUEUE_KBYTES, DEFAULT_DELIVERY_TIMEOUT, DEFAULT_LINGER_MS,
    DEFAULT_REPLICATION_FACTOR, DEFAULT_REQUEST_TIMEOUT, DEFAULT_SESSION_TIMEOUT,
    DEFAULT_TOPIC_PREFIX, KafkaConsumer, KafkaLog, KafkaLogConfig, PROBE_TOPIC,
};
pub use partition::{murmur2, partition_for};
pub use tokio_util::sync::CancellationToken;

/// Longest topic name Kafka accepts.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// One record to append: a key (the encoded primary key), a value (`None` = tombstone), headers
/// and a timestamp in milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partitioning and compaction key.
    pub key: Vec<u8>,
    /// Payload; `None` is a tombstone (the key is deleted).
    pub value: Option<Vec<u8>>,
    /// Ordered headers; names may repeat.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the Unix epoch (event time chosen by the producer).
    pub timestamp_ms: i64,
}

impl Record {
    /// A record with the current time and no headers.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp_ms: now_ms(),
        }
    }

    /// A tombstone for `key` with the current time.
    pub fn tombstone(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            value: None,
            headers: Vec::new(),
            timestamp_ms: now_ms(),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp.
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }
}

/// Where an appended record was stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Delivered {
    /// Topic name (unprefixed).
    pub topic: String,
    /// Partition, `partition_for(key, partitions)`.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// A record read by a consumer, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Topic name (unprefixed).
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset; commit `offset + 1` once the record is processed.
    pub offset: i64,
    /// The record as appended.
    pub record: Record,
}

/// A topic to create (or check) with [`EventLog::ensure_topic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Topic name (unprefixed, Kafka naming rules).
    pub name: String,
    /// Number of partitions; fixed for the topic's life because it decides key → partition.
    pub partitions: i32,
    /// Compacted changelog topic (keeps at least the latest record per key).
    pub compacted: bool,
}

impl TopicSpec {
    /// A regular (delete-retention) topic.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            compacted: false,
        }
    }

    /// A compacted changelog topic.
    pub fn compacted(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            compacted: true,
        }
    }
}

/// Committed positions of a group: `(topic, partition) → next offset to read`. Partitions the
/// group never committed are absent.
pub type CommittedOffsets = BTreeMap<(String, i32), i64>;

/// The durable event log. See the [module docs](self) for the delivery contract every
/// implementation keeps.
pub trait EventLog: Send + Sync {
    /// The consumer type returned by [`EventLog::consumer`].
    type Consumer: LogConsumer;

    /// Creates the topic with `spec.partitions` partitions (and compaction for compacted specs)
    /// unless it exists. Idempotent. An existing topic with a different partition count is an
    /// error ([`LogError::PartitionMismatch`]) because the key → partition mapping would change.
    fn ensure_topic(&self, spec: &TopicSpec) -> impl Future<Output = Result<(), LogError>> + Send;

    /// Appends `records` to `topic` (which must exist), each to
    /// [`partition_for`]`(key, partitions)`. Returns when every record is durable, with the
    /// positions in input order. An empty batch returns an empty vector.
    fn append(
        &self,
        topic: &str,
        records: Vec<Record>,
    ) -> impl Future<Output = Result<Vec<Delivered>, LogError>> + Send;

    /// A consumer of `group` over `topics` (which must exist), starting at the group's committed
    /// positions (earliest where none). It stops when `shutdown` is cancelled.
    fn consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<Self::Consumer, LogError>> + Send;

    /// [`EventLog::consumer`] for a group that several processes share and that should move
    /// partitions between them incrementally: on Kafka with
    /// `partition.assignment.strategy=cooperative-sticky` (a joining or leaving member moves
    /// only the partitions that change owner). The embedded log has one process: the same as
    /// `consumer`.
    fn shared_consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<Self::Consumer, LogError>> + Send {
        self.consumer(group, topics, shutdown)
    }

    /// The committed positions of `group` on `topics` (for lag metrics and tests).
    fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> impl Future<Output = Result<CommittedOffsets, LogError>> + Send;

    /// The next offset to be written (the durable high watermark) of each partition of `topic`,
    /// indexed by partition. Lag of a group = end offset − committed position.
    fn end_offsets(&self, topic: &str) -> impl Future<Output = Result<Vec<i64>, LogError>> + Send;

    /// The first offset still held of each partition of `topic` (the low watermark), indexed by
    /// partition: 0 unless retention or compaction removed the records before it; the end offset
    /// of an empty partition.
    fn start_offsets(&self, topic: &str)
    -> impl Future<Output = Result<Vec<i64>, LogError>> + Send;

    /// Per partition of `topic`, the first offset whose record timestamp is at or after
    /// `timestamp_ms` (Kafka's `ListOffsets` by time), or the end offset when no record is.
    fn offsets_for_time(
        &self,
        topic: &str,
        timestamp_ms: i64,
    ) -> impl Future<Output = Result<Vec<i64>, LogError>> + Send;

    /// Stores `group`'s positions without consuming (an operator's reset), durable on return.
    /// Refused with [`LogError::GroupBusy`] while the group has a live consumer: its member would
    /// overwrite the positions with its own next commit.
    fn set_committed(
        &self,
        group: &str,
        positions: &CommittedOffsets,
    ) -> impl Future<Output = Result<(), LogError>> + Send;
}

/// A change of the partitions one consumer reads: a consumer-group rebalance (Kafka), or the
/// whole input at once (the embedded log, single process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentEvent {
    /// These `(topic, partition)`s are this consumer's now; their records follow.
    Assigned(Vec<(String, i32)>),
    /// These are not this consumer's any more: another member reads them from the group's
    /// committed positions, so a commit for them from here would overwrite its progress.
    Revoked(Vec<(String, i32)>),
}

/// Reads records for one consumer group. Positions are stored only by [`LogConsumer::commit`].
pub trait LogConsumer: Send + std::fmt::Debug + 'static {
    /// The assignment changes since the last call, oldest first. A record of a partition is
    /// only yielded after the `Assigned` event naming it was recorded, so a caller that drains
    /// the events after each `recv` and before using the record sees every change in time.
    fn take_assignment_events(&mut self) -> Vec<AssignmentEvent>;

    /// How long the group keeps a silent member's partitions (`session.timeout.ms`); `None`
    /// where there is no group protocol (the embedded log).
    fn group_session_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// The next record, waiting until one is durable. `Ok(None)` once the shutdown token is
    /// cancelled (then every later call returns `Ok(None)` too).
    fn recv(&mut self) -> impl Future<Output = Result<Option<ConsumedRecord>, LogError>> + Send;

    /// Stores the group's position of `topic`/`partition` as `next_offset` (the offset of the next
    /// record to process, i.e. last processed + 1). Durable on return.
    fn commit(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> impl Future<Output = Result<(), LogError>> + Send;
}

/// Which log to open.
#[derive(Debug, Clone)]
pub enum LogConfig {
    /// The embedded sled log (default when no brokers are configured).
    Embedded(EmbeddedLogConfig),
    /// A Kafka cluster.
    Kafka(KafkaLogConfig),
}

/// One of the two implementations, chosen at startup (see the module docs for why an enum).
#[derive(Debug)]
pub enum AnyLog {
    /// The embedded sled log.
    Embedded(EmbeddedLog),
    /// The Kafka log.
    Kafka(KafkaLog),
}

impl AnyLog {
    /// Opens the configured log.
    ///
    /// # Errors
    /// See [`EmbeddedLog::open`] and [`KafkaLog::new`].
    pub fn open(config: LogConfig) -> Result<Self, LogError> {
        Ok(match config {
            LogConfig::Embedded(c) => Self::Embedded(EmbeddedLog::open(c)?),
            LogConfig::Kafka(c) => Self::Kafka(KafkaLog::new(c)?),
        })
    }
}

/// The consumer of an [`AnyLog`].
#[derive(Debug)]
pub enum AnyConsumer {
    /// An embedded consumer.
    Embedded(EmbeddedConsumer),
    /// A Kafka consumer.
    Kafka(KafkaConsumer),
}

impl EventLog for AnyLog {
    type Consumer = AnyConsumer;

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), LogError> {
        match self {
            Self::Embedded(l) => l.ensure_topic(spec).await,
            Self::Kafka(l) => l.ensure_topic(spec).await,
        }
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>, LogError> {
        match self {
            Self::Embedded(l) => l.append(topic, records).await,
            Self::Kafka(l) => l.append(topic, records).await,
        }
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<AnyConsumer, LogError> {
        Ok(match self {
            Self::Embedded(l) => AnyConsumer::Embedded(l.consumer(group, topics, shutdown).await?),
            Self::Kafka(l) => AnyConsumer::Kafka(l.consumer(group, topics, shutdown).await?),
        })
    }

    async fn shared_consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<AnyConsumer, LogError> {
        match self {
            Self::Kafka(l) => Ok(AnyConsumer::Kafka(
                l.cooperative_consumer(group, topics, shutdown).await?,
            )),
            Self::Embedded(_) => self.consumer(group, topics, shutdown).await,
        }
    }

    async fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<CommittedOffsets, LogError> {
        match self {
            Self::Embedded(l) => l.committed(group, topics).await,
            Self::Kafka(l) => l.committed(group, topics).await,
        }
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        match self {
            Self::Embedded(l) => l.end_offsets(topic).await,
            Self::Kafka(l) => l.end_offsets(topic).await,
        }
    }

    async fn start_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        match self {
            Self::Embedded(l) => l.start_offsets(topic).await,
            Self::Kafka(l) => l.start_offsets(topic).await,
        }
    }

    async fn offsets_for_time(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<i64>, LogError> {
        match self {
            Self::Embedded(l) => l.offsets_for_time(topic, timestamp_ms).await,
            Self::Kafka(l) => l.offsets_for_time(topic, timestamp_ms).await,
        }
    }

    async fn set_committed(
        &self,
        group: &str,
        positions: &CommittedOffsets,
    ) -> Result<(), LogError> {
        match self {
            Self::Embedded(l) => l.set_committed(group, positions).await,
            Self::Kafka(l) => l.set_committed(group, positions).await,
        }
    }
}

impl LogConsumer for AnyConsumer {
    fn take_assignment_events(&mut self) -> Vec<AssignmentEvent> {
        match self {
            Self::Embedded(c) => c.take_assignment_events(),
            Self::Kafka(c) => c.take_assignment_events(),
        }
    }

    fn group_session_timeout(&self) -> Option<std::time::Duration> {
        match self {
            Self::Embedded(c) => c.group_session_timeout(),
            Self::Kafka(c) => c.group_session_timeout(),
        }
    }

    async fn recv(&mut self) -> Result<Option<ConsumedRecord>, LogError> {
        match self {
            Self::Embedded(c) => c.recv().await,
            Self::Kafka(c) => c.recv().await,
        }
    }

    async fn commit(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), LogError> {
        match self {
            Self::Embedded(c) => c.commit(topic, partition, next_offset).await,
            Self::Kafka(c) => c.commit(topic, partition, next_offset).await,
        }
    }
}

/// Checks a topic name against Kafka's rules (shared by both implementations).
///
/// # Errors
/// [`LogError::InvalidTopicName`] when the name is empty, too long, `.`/`..`, or has a character
/// outside `[A-Za-z0-9._-]`.
pub fn validate_topic_name(name: &str) -> Result<(), LogError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidTopicName(name.to_owned()))
    }
}

fn validate_spec(spec: &TopicSpec) -> Result<(), LogError> {
    validate_topic_name(&spec.name)?;
    if spec.partitions < 1 {
        return Err(LogError::InvalidArgument(format!(
            "topic {}: partitions must be at least 1, got {}",
            spec.name, spec.partitions
        )));
    }
    Ok(())
}

/// A position to store: an existing partition (of `partitions`) and an offset of 0 or more.
fn validate_position(
    topic: &str,
    partition: i32,
    partitions: i32,
    offset: i64,
) -> Result<(), LogError> {
    if partition < 0 || partition >= partitions || offset < 0 {
        return Err(LogError::InvalidArgument(format!(
            "bad position {topic}/{partition}@{offset} ({partitions} partitions)"
        )));
    }
    Ok(())
}

fn validate_group(group: &str) -> Result<(), LogError> {
    if group.is_empty() {
        return Err(LogError::InvalidArgument(
            "consumer group must not be empty".into(),
        ));
    }
    Ok(())
}

fn now_ms() -> i64 {
    // A clock before 1970 is a broken host; 0 keeps the record valid rather than failing the write.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
