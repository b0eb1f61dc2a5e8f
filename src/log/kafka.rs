//! The Kafka log (rdkafka / librdkafka).
//!
//! - Producer: idempotent (`enable.idempotence=true`, which implies `acks=all` and in-order
//!   retries), so librdkafka's internal retries neither reorder nor duplicate records of a
//!   partition. Each record's partition is set explicitly to [`partition_for`] so the mapping is
//!   exactly the embedded log's; `partitioner=murmur2_random` is set as well, for the record.
//! - Consumer: a `StreamConsumer` in the group `<prefix>.<group>`, subscribed to the topics;
//!   `enable.auto.commit=false` and `enable.auto.offset.store=false`, so positions move only
//!   through [`LogConsumer::commit`] (a synchronous offset commit).
//!   A `ConsumerContext` records each rebalance as an [`AssignmentEvent`] (see `GroupContext`);
//!   [`EventLog::shared_consumer`] adds `partition.assignment.strategy=cooperative-sticky`, so
//!   several processes of one pipeline share the push group (`ops/docs/kafka.md`, scale-out).
//! - Blocking librdkafka calls (metadata, commits, consumer close) run off the async threads.
//! - A consumer's close (leaving the group) can block for long on some brokers, so dropping a
//!   [`KafkaConsumer`] closes it on a detached thread; [`KafkaConsumer::close`] waits for it with
//!   a timeout.
//!
//! # Broker quirks (tansu 0.6.0, the local test broker)
//! - Fetch and ListOffsets work by record-batch base offset (`tests/kafka_broker.rs` reproduces
//!   it with rdkafka alone; tansu-storage 0.6.0 `dynostore.rs`): ListOffsets(latest), which
//!   librdkafka's watermark query and so [`EventLog::end_offsets`] use, answers "base offset of
//!   the most recently written batch + 1", so 5 records appended in one batch read as an end
//!   offset of 1; a fetch from an offset inside a multi-record batch returns the *next* batch, so
//!   a consumer resuming from a committed offset inside a batch loses the rest of it. Every
//!   reader "up to `end_offsets()`" stops short: the processor's schemas-topic refresh read 1 of
//!   the schema records capture had appended in one batch, and decoding failed with "unknown
//!   schema fingerprint" (issue 17); the ledger rebuild and the capture schema preload read the
//!   same way.
//! - Workaround, chosen at run time and not by configuration: before the first append, a probe
//!   appends a 2-record batch to [`PROBE_TOPIC`] and checks that the high watermark covers the
//!   second record and that a fetch from the second record starts there. A broker failing either
//!   check gets a producer with `batch.num.messages=1` (one record per batch: every batch base is
//!   a record offset, so both answers are exact for what this log writes) and a WARN naming the
//!   behaviour and its cost. A behaviour probe rather than recognising tansu: the Kafka protocol
//!   does not name the broker software to clients, and a probe also catches other brokers (or
//!   later tansu versions) with the same defect, or clears them once fixed. An explicit
//!   [`KafkaLogConfig::producer_batch_records`] or `batch.num.messages` in
//!   [`KafkaLogConfig::extra`] skips the probe. Records that others wrote in multi-record
//!   batches still read short on such a broker; nothing in this service reads such topics.
//! - ListOffsets by timestamp answers the earliest offset whatever the time (seen with the
//!   conformance case `positions_by_time_and_an_operators_reset`), so
//!   [`EventLog::offsets_for_time`] takes the broker's answer only as where to start reading and
//!   scans forward to the first record at or after the time (on Apache Kafka the first record
//!   read is the answer).
//! - No transactions (not used here). Closing a consumer after `committed()` on it can hang,
//!   hence the separate short-lived consumer in `committed` and the detached close.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::{
    AssignmentEvent, CommittedOffsets, ConsumedRecord, Delivered, EventLog, LogConsumer, LogError,
    MAX_TOPIC_NAME_LEN, Record, TopicSpec, partition_for, validate_group, validate_position,
    validate_spec, validate_topic_name,
};
use crate::telemetry::metrics as m;

/// Prefix of every topic and group name (`<prefix>.<name>`), see DESIGN §2.
pub const DEFAULT_TOPIC_PREFIX: &str = "syncbridge";
/// Admin and metadata calls: long enough for a controller failover, short enough to report a
/// dead cluster at startup quickly.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `message.timeout.ms`: librdkafka retries a record (safely, the producer is idempotent) until
/// this elapses; then `append` fails with a retryable error and the caller retries the batch.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// `session.timeout.ms`: how long a dead consumer keeps its partitions, i.e. how long a processor
/// restarted after a crash waits before it reads again. 6 s is Apache Kafka's lowest allowed
/// (`group.min.session.timeout.ms`) and fails over quickly without flapping on GC-free Rust
/// processes (librdkafka's default is 45 s). Not 10 s: tansu 0.6.0 then leaves a SIGKILLed
/// member's partitions unassigned for 40 s or more (DESIGN §11), while 6 s takes 6 s.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// `linger.ms`: wait up to 5 ms to fill producer batches; capture emits bursts per transaction.
pub const DEFAULT_LINGER_MS: u32 = 5;
/// `queued.max.messages.kbytes`: bound on a consumer's prefetch queue (librdkafka's default is
/// 64 MiB per consumer, too much when one process runs a consumer per pipeline).
pub const DEFAULT_CONSUMER_QUEUE_KBYTES: u32 = 16 * 1024;
/// Replication factor of created topics; `-1` = the broker's `default.replication.factor`.
pub const DEFAULT_REPLICATION_FACTOR: i32 = -1;
/// The 1-partition topic the batch-offset probe appends 2 records to, once per [`KafkaLog`]
/// (prefixed like every topic).
pub const PROBE_TOPIC: &str = "syncbridge-probe";
/// How long the probe waits for a fetch from inside its batch; on Apache Kafka it answers in
/// milliseconds, so running out means the broker skipped the record (per-batch reads).
const PROBE_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the broker addresses records of a multi-record batch in Fetch and ListOffsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchOffsets {
    /// Per record (Apache Kafka): any offset can be fetched, end offsets count every record.
    PerRecord,
    /// Per batch base offset (tansu 0.6.0): only one record per batch keeps reads whole.
    PerBatch,
}

const BACKEND: &str = "kafka";

/// Configuration of the Kafka log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaLogConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Prefix of topics and groups (`<prefix>.<name>`); empty for none.
    pub topic_prefix: String,
    /// Replication factor of topics created by `ensure_topic` ([`DEFAULT_REPLICATION_FACTOR`]).
    pub replication_factor: i32,
    /// [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// [`DEFAULT_DELIVERY_TIMEOUT`].
    pub delivery_timeout: Duration,
    /// [`DEFAULT_SESSION_TIMEOUT`].
    pub session_timeout: Duration,
    /// [`DEFAULT_LINGER_MS`].
    pub linger_ms: u32,
    /// [`DEFAULT_CONSUMER_QUEUE_KBYTES`].
    pub consumer_queue_kbytes: u32,
    /// `batch.num.messages`: most records per producer batch. `None` (the default) = probe the
    /// broker before the first append and use 1 on a broker that serves offsets per batch (tansu
    /// 0.6.0), librdkafka's 10000 otherwise (see the module docs). `Some(n)` skips the probe.
    pub producer_batch_records: Option<u32>,
    /// `client.id` reported to the brokers.
    pub client_id: String,
    /// Extra librdkafka properties for every client (security, tuning); applied last.
    pub extra: Vec<(String, String)>,
}

impl KafkaLogConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic_prefix: DEFAULT_TOPIC_PREFIX.to_owned(),
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            linger_ms: DEFAULT_LINGER_MS,
            consumer_queue_kbytes: DEFAULT_CONSUMER_QUEUE_KBYTES,
            producer_batch_records: None,
            client_id: "syncbridge".to_owned(),
            extra: Vec::new(),
        }
    }

    /// The broker-side name of `name`.
    pub fn physical_name(&self, name: &str) -> String {
        if self.topic_prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.topic_prefix)
        }
    }

    fn logical_name<'a>(&self, physical: &'a str) -> &'a str {
        if self.topic_prefix.is_empty() {
            return physical;
        }
        physical
            .strip_prefix(self.topic_prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or(physical)
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // Topics are created only by ensure_topic, with the right partition count.
            .set("allow.auto.create.topics", "false");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// The batch size set by the operator, which skips the probe: `producer_batch_records`, or
    /// `batch.num.messages` among the extra properties (`Some(None)` = librdkafka's default).
    fn explicit_batch_records(&self) -> Option<Option<u32>> {
        if self.producer_batch_records.is_some() {
            return Some(self.producer_batch_records);
        }
        self.extra
            .iter()
            .any(|(k, _)| k == "batch.num.messages")
            .then_some(None)
    }

    fn physical_topic(&self, name: &str) -> Result<String, LogError> {
        validate_topic_name(name)?;
        let p = self.physical_name(name);
        if p.len() > MAX_TOPIC_NAME_LEN {
            return Err(LogError::InvalidTopicName(p));
        }
        Ok(p)
    }
}

struct Inner {
    cfg: KafkaLogConfig,
    /// Created on first use, after the batch-offset probe chose `batch.num.messages`.
    producer: OnceCell<FutureProducer>,
    /// Also the client for metadata and watermarks (the producer does not exist before the probe).
    admin: Arc<AdminClient<DefaultClientContext>>,
    /// Partition counts by logical topic (fixed for a topic's life).
    partitions: Mutex<HashMap<String, i32>>,
}

/// The Kafka log. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

impl fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.inner.cfg.brokers)
            .field("topic_prefix", &self.inner.cfg.topic_prefix)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// Creates the admin client (connections are made lazily). The producer is created on the
    /// first append, after the batch-offset probe (see the module docs) when the batch size is not
    /// set explicitly.
    ///
    /// # Errors
    /// [`LogError::Kafka`] when librdkafka rejects the configuration.
    pub fn new(cfg: KafkaLogConfig) -> Result<Self, LogError> {
        let admin: AdminClient<DefaultClientContext> = cfg.client_config().create()?;
        let producer = OnceCell::new();
        if let Some(explicit) = cfg.explicit_batch_records() {
            // An explicit setting wins over the probe; a bad one is reported here, not later.
            let p = producer_config(&cfg, explicit).create()?;
            let _ = producer.set(p);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                producer,
                admin: Arc::new(admin),
                partitions: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// [`EventLog::shared_consumer`]: a group member with `cooperative-sticky` (several processes
    /// of one pipeline share the push processor's group). Other groups keep librdkafka's default
    /// eager assignors: on tansu 0.6.0, which often keeps a SIGKILLed member in its group, a
    /// sticky assignor leaves that member's partitions with it until the broker drops it
    /// (`ops/docs/kafka.md`), so only the group that gains from incremental moves uses it.
    pub async fn cooperative_consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<KafkaConsumer, LogError> {
        self.group_consumer(group, topics, shutdown, true).await
    }

    async fn group_consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
        cooperative: bool,
    ) -> Result<KafkaConsumer, LogError> {
        validate_group(group)?;
        let cfg = &self.inner.cfg;
        let mut physical = Vec::with_capacity(topics.len());
        for t in topics {
            // Same contract as the embedded log: unknown topics are an error, not a silent wait.
            self.partition_count(t).await?;
            physical.push(cfg.physical_name(t));
        }
        let mut cc = cfg.client_config();
        cc.set("group.id", cfg.physical_name(group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", millis(cfg.session_timeout))
            .set(
                "queued.max.messages.kbytes",
                cfg.consumer_queue_kbytes.to_string(),
            );
        if cooperative {
            // Incremental rebalances: a joining or leaving member moves only the partitions
            // that change owner; the others keep being read (and their pending work kept).
            cc.set("partition.assignment.strategy", "cooperative-sticky");
        }
        for (k, v) in &cfg.extra {
            cc.set(k, v);
        }
        let context = GroupContext {
            cfg: cfg.clone(),
            events: Arc::new(Mutex::new(Vec::new())),
        };
        let events = Arc::clone(&context.events);
        let consumer: StreamConsumer<GroupContext> = cc.create_with_context(context)?;
        let names: Vec<&str> = physical.iter().map(String::as_str).collect();
        if !names.is_empty() {
            consumer.subscribe(&names)?;
        }
        Ok(KafkaConsumer {
            consumer: Some(Arc::new(consumer)),
            cfg: cfg.clone(),
            group: group.to_owned(),
            shutdown,
            events,
        })
    }

    /// The producer, created on first use: with one record per batch when the broker serves
    /// offsets per batch (probed once), else with librdkafka's batching.
    async fn producer(&self) -> Result<&FutureProducer, LogError> {
        self.inner
            .producer
            .get_or_try_init(|| async {
                let batch_records = match self.probe_batch_offsets().await? {
                    BatchOffsets::PerRecord => None,
                    BatchOffsets::PerBatch => {
                        tracing::warn!(
                            brokers = %self.inner.cfg.brokers,
                            "the kafka broker serves fetches and end offsets per record batch \
                             (tansu 0.6.0 does): a read from inside a multi-record batch skips \
                             the rest of it and end offsets read low; producing one record per \
                             batch (batch.num.messages=1), which costs one produce request per \
                             record on a busy partition; set producer_batch_records or \
                             batch.num.messages to override"
                        );
                        Some(1)
                    }
                };
                Ok::<_, LogError>(producer_config(&self.inner.cfg, batch_records).create()?)
            })
            .await
    }

    /// Whether the broker reads a multi-record batch per record (Apache Kafka) or per batch
    /// (tansu 0.6.0): appends a 2-record batch to the probe topic, then asks for the high
    /// watermark and fetches from the batch's second record. Either answer being short of the
    /// second record means per-batch; so does a fetch that returns nothing within
    /// [`PROBE_FETCH_TIMEOUT`] (the safe side: one record per batch is always correct).
    async fn probe_batch_offsets(&self) -> Result<BatchOffsets, LogError> {
        let cfg = &self.inner.cfg;
        self.ensure_topic(&TopicSpec::new(PROBE_TOPIC, 1)).await?;
        let physical = cfg.physical_name(PROBE_TOPIC);
        // linger.ms long enough that both records leave in one batch (one ProduceRequest); not
        // idempotent, which saves the InitProducerId round trip at every start.
        let probe: FutureProducer = producer_config(cfg, None)
            .set("linger.ms", "50")
            .set("enable.idempotence", "false")
            .create()?;
        const PAYLOADS: [&[u8]; 2] = [b"probe-1", b"probe-2"];
        let mut pending = Vec::with_capacity(PAYLOADS.len());
        for payload in PAYLOADS {
            let fr = FutureRecord::<[u8], [u8]>::to(&physical)
                .partition(0)
                .payload(payload);
            pending.push(probe.send_result(fr).map_err(|(e, _)| LogError::Kafka(e))?);
        }
        let mut offsets = Vec::with_capacity(pending.len());
        for f in pending {
            match f.await {
                Ok(Ok(d)) => offsets.push(d.offset),
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => return Err(LogError::Closed("probe producer dropped a delivery".into())),
            }
        }
        drop(probe);
        let second = offsets[1];
        if offsets[0] + 1 != second {
            // Not one batch after all (another producer in between): assume the worst.
            return Ok(BatchOffsets::PerBatch);
        }
        let admin = self.inner.admin.clone();
        let (topic, timeout) = (physical.clone(), cfg.request_timeout);
        let high =
            blocking(move || Ok(admin.inner().fetch_watermarks(&topic, 0, timeout)?.1)).await?;
        if high <= second {
            tracing::info!(topic = %physical, second, high, "kafka probe: the high watermark is short of an acknowledged record");
            return Ok(BatchOffsets::PerBatch);
        }
        let mut cc = cfg.client_config();
        // librdkafka refuses `assign` without a group.id ("Local: Unknown group"); the group is
        // never joined (no subscribe) and nothing is committed.
        cc.set(
            "group.id",
            cfg.physical_name(&format!("{PROBE_TOPIC}.reader")),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
        let first_read = blocking(move || {
            let c: BaseConsumer = cc.create()?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&physical, 0, Offset::Offset(second))?;
            c.assign(&tpl)?;
            let deadline = Instant::now() + PROBE_FETCH_TIMEOUT;
            let mut got = None;
            while got.is_none() && Instant::now() < deadline {
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => got = Some(m.offset()),
                    // Transient client events (a broker connection, a coordinator lookup) are
                    // not the probe's answer; the deadline bounds the wait either way.
                    Some(Err(e)) => tracing::debug!("kafka probe: consumer event: {e}"),
                    None => {}
                }
            }
            close_detached(c);
            Ok(got)
        })
        .await?;
        Ok(if first_read == Some(second) {
            BatchOffsets::PerRecord
        } else {
            tracing::info!(
                second,
                ?first_read,
                "kafka probe: a fetch from inside a batch did not start at the requested record"
            );
            BatchOffsets::PerBatch
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaLogConfig {
        &self.inner.cfg
    }

    /// Partition count of a topic from the cluster's metadata; `None` when it does not exist.
    async fn fetch_partitions(&self, physical: String) -> Result<Option<i32>, LogError> {
        let admin = self.inner.admin.clone();
        let timeout = self.inner.cfg.request_timeout;
        blocking(move || {
            let md = admin.inner().fetch_metadata(Some(&physical), timeout)?;
            let Some(t) = md.topics().iter().find(|t| t.name() == physical) else {
                return Ok(None);
            };
            if let Some(err) = t.error() {
                return match RDKafkaErrorCode::from(err) {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        Ok(None)
                    }
                    code => Err(KafkaError::MetadataFetch(code).into()),
                };
            }
            if t.partitions().is_empty() {
                return Ok(None);
            }
            Ok(Some(
                i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
            ))
        })
        .await
    }

    async fn partition_count(&self, topic: &str) -> Result<i32, LogError> {
        let physical = self.inner.cfg.physical_topic(topic)?;
        if let Some(&n) = self.cache().get(topic) {
            return Ok(n);
        }
        let n = self
            .fetch_partitions(physical)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
        self.cache().insert(topic.to_owned(), n);
        Ok(n)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, i32>> {
        self.inner
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `pick` of the `(low, high)` watermarks of each partition of `topic`, indexed by partition.
    async fn watermarks(
        &self,
        topic: &str,
        pick: fn((i64, i64)) -> i64,
    ) -> Result<Vec<i64>, LogError> {
        let n = self.partition_count(topic).await?;
        let physical = self.inner.cfg.physical_name(topic);
        let admin = self.inner.admin.clone();
        let timeout = self.inner.cfg.request_timeout;
        blocking(move || {
            (0..n)
                .map(|p| Ok(pick(admin.inner().fetch_watermarks(&physical, p, timeout)?)))
                .collect()
        })
        .await
    }

    /// Enqueues every record in input order, then waits for all acknowledgements.
    async fn produce(
        &self,
        topic: &str,
        physical: &str,
        partitions: i32,
        records: &[Record],
    ) -> Result<Vec<Delivered>, LogError> {
        let producer = self.producer().await?;
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_slice()),
                });
            }
            let mut fr = FutureRecord::to(physical)
                .key(r.key.as_slice())
                .partition(partition_for(&r.key, partitions))
                .timestamp(r.timestamp_ms)
                .headers(headers);
            if let Some(v) = &r.value {
                fr = fr.payload(v.as_slice());
            }
            // Enqueue synchronously, one after the other: this is what keeps input order.
            loop {
                match producer.send_result(fr) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is bounded (queue.buffering.max.*): wait for room.
                        fr = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        // Records already enqueued still complete; report after they settle.
                        drain(pending).await;
                        return Err(e.into());
                    }
                }
            }
        }
        let mut delivered = Vec::with_capacity(pending.len());
        let mut first_err = None;
        for f in pending {
            match f.await {
                Ok(Ok(d)) => delivered.push(Delivered {
                    topic: topic.to_owned(),
                    partition: d.partition,
                    offset: d.offset,
                }),
                Ok(Err((e, _))) => {
                    first_err.get_or_insert(LogError::Kafka(e));
                }
                Err(_canceled) => {
                    first_err.get_or_insert(LogError::Closed("producer dropped a delivery".into()));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(delivered),
        }
    }
}

async fn drain(pending: Vec<rdkafka::producer::DeliveryFuture>) {
    for f in pending {
        let _ = f.await;
    }
}

impl EventLog for KafkaLog {
    type Consumer = KafkaConsumer;

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), LogError> {
        validate_spec(spec)?;
        let cfg = &self.inner.cfg;
        let physical = cfg.physical_topic(&spec.name)?;
        let mut nt = NewTopic::new(
            &physical,
            spec.partitions,
            TopicReplication::Fixed(cfg.replication_factor),
        );
        if spec.compacted {
            nt = nt.set("cleanup.policy", "compact");
        }
        let opts = AdminOptions::new()
            .operation_timeout(Some(cfg.request_timeout))
            .request_timeout(Some(cfg.request_timeout));
        let results = self.inner.admin.create_topics([&nt], &opts).await?;
        let mut created = false;
        for r in results {
            match r {
                Ok(_) => created = true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(KafkaError::AdminOp(code).into()),
            }
        }
        // Metadata can lag behind creation: wait until the topic is visible.
        let deadline = Instant::now() + cfg.request_timeout;
        let actual = loop {
            if let Some(n) = self.fetch_partitions(physical.clone()).await? {
                break n;
            }
            if Instant::now() >= deadline {
                return Err(LogError::Timeout(format!(
                    "topic {physical} not visible in metadata after creation"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if actual != spec.partitions {
            return Err(LogError::PartitionMismatch {
                topic: spec.name.clone(),
                expected: spec.partitions,
                actual,
            });
        }
        self.cache().insert(spec.name.clone(), actual);
        if created {
            tracing::info!(topic = %physical, partitions = actual, compacted = spec.compacted, "kafka topic created");
        }
        Ok(())
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>, LogError> {
        let partitions = self.partition_count(topic).await?;
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let physical = self.inner.cfg.physical_name(topic);
        let started = Instant::now();
        let result = self.produce(topic, &physical, partitions, &records).await;
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
    ) -> Result<KafkaConsumer, LogError> {
        self.group_consumer(group, topics, shutdown, false).await
    }

    async fn shared_consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<KafkaConsumer, LogError> {
        self.cooperative_consumer(group, topics, shutdown).await
    }

    async fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<CommittedOffsets, LogError> {
        validate_group(group)?;
        let cfg = self.inner.cfg.clone();
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            let n = self.partition_count(t).await?;
            for p in 0..n {
                tpl.add_partition_offset(&cfg.physical_name(t), p, Offset::Invalid)?;
            }
        }
        let group = cfg.physical_name(group);
        blocking(move || {
            // A separate short-lived consumer: asking a live group member can hang its close on
            // some brokers (tansu), and this one never joins the group.
            let c = group_client(&cfg, &group)?;
            let res = c.committed_offsets(tpl, cfg.request_timeout);
            close_detached(c);
            let mut out = CommittedOffsets::new();
            for e in res?.elements() {
                if let Offset::Offset(o) = e.offset() {
                    out.insert((cfg.logical_name(e.topic()).to_owned(), e.partition()), o);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        self.watermarks(topic, |(_, high)| high).await
    }

    async fn start_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        self.watermarks(topic, |(low, _)| low).await
    }

    async fn offsets_for_time(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<i64>, LogError> {
        let n = self.partition_count(topic).await?;
        let ends = self.end_offsets(topic).await?;
        let cfg = self.inner.cfg.clone();
        let physical = cfg.physical_name(topic);
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..n {
                tpl.add_partition_offset(&physical, p, Offset::Offset(timestamp_ms))?;
            }
            // A client of no group: ListOffsets needs none.
            let c: BaseConsumer = cfg.client_config().create()?;
            let res = c.offsets_for_times(tpl, cfg.request_timeout);
            close_detached(c);
            let mut hints = ends.clone();
            for e in res?.elements() {
                let slot = usize::try_from(e.partition())
                    .ok()
                    .and_then(|p| hints.get_mut(p));
                // `End` (no record that late) keeps the end offset.
                if let (Some(slot), Offset::Offset(o)) = (slot, e.offset()) {
                    *slot = o;
                }
            }
            // The broker's answer is where the scan starts, not the answer (see the module docs:
            // tansu answers the earliest offset for any time).
            (0..n)
                .zip(hints.into_iter().zip(ends))
                .map(|(p, (hint, end))| scan_for_time(&cfg, &physical, p, hint, end, timestamp_ms))
                .collect()
        })
        .await
    }

    async fn set_committed(
        &self,
        group: &str,
        positions: &CommittedOffsets,
    ) -> Result<(), LogError> {
        validate_group(group)?;
        let cfg = self.inner.cfg.clone();
        let mut tpl = TopicPartitionList::new();
        for ((topic, p), offset) in positions {
            validate_position(topic, *p, self.partition_count(topic).await?, *offset)?;
            tpl.add_partition_offset(&cfg.physical_topic(topic)?, *p, Offset::Offset(*offset))?;
        }
        let logical = group.to_owned();
        let group = cfg.physical_name(group);
        blocking(move || {
            let c = group_client(&cfg, &group)?;
            // A member of the group would overwrite the positions with its next commit.
            let live = c
                .fetch_group_list(Some(&group), cfg.request_timeout)
                .map(|list| list.groups().iter().any(|g| !g.members().is_empty()));
            let result = match live {
                Ok(true) => Err(LogError::GroupBusy(logical)),
                // Not every broker lists groups (tansu): the commit itself is then the check, as
                // a broker refuses a commit from outside a group that has members.
                Ok(false) | Err(_) => match c.commit(&tpl, CommitMode::Sync) {
                    Err(KafkaError::ConsumerCommit(
                        RDKafkaErrorCode::UnknownMemberId
                        | RDKafkaErrorCode::IllegalGeneration
                        | RDKafkaErrorCode::RebalanceInProgress,
                    )) => Err(LogError::GroupBusy(logical)),
                    other => other.map_err(LogError::from),
                },
            };
            close_detached(c);
            result
        })
        .await
    }
}

/// Records a member's rebalances as [`AssignmentEvent`]s. librdkafka runs these callbacks
/// inside the consumer's poll, i.e. inside [`KafkaConsumer::recv`]: a revocation is recorded
/// before the partitions are given up, an assignment after they are taken, and both before any
/// record of an assigned partition is yielded.
struct GroupContext {
    cfg: KafkaLogConfig,
    /// Drained by the consumer's owner after each `recv` (the push processor); a rebalance adds
    /// one or two entries, so this stays small between drains (a consumer whose owner never
    /// drains it keeps one or two per rebalance, which are rare).
    events: Arc<Mutex<Vec<AssignmentEvent>>>,
}

impl GroupContext {
    fn record(&self, tpl: &TopicPartitionList, event: fn(Vec<(String, i32)>) -> AssignmentEvent) {
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (self.cfg.logical_name(e.topic()).to_owned(), e.partition()))
            .collect();
        if parts.is_empty() {
            return;
        }
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event(parts));
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.record(tpl, AssignmentEvent::Revoked),
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "kafka consumer group rebalance failed")
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.record(tpl, AssignmentEvent::Assigned);
        }
    }
}

/// A member of a Kafka consumer group.
pub struct KafkaConsumer {
    /// `None` only after `close`.
    consumer: Option<Arc<StreamConsumer<GroupContext>>>,
    cfg: KafkaLogConfig,
    group: String,
    shutdown: CancellationToken,
    /// The group's rebalances not yet taken (see [`GroupContext`]).
    events: Arc<Mutex<Vec<AssignmentEvent>>>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    fn live(&self) -> Result<Arc<StreamConsumer<GroupContext>>, LogError> {
        self.consumer
            .clone()
            .ok_or_else(|| LogError::Closed("consumer closed".into()))
    }

    /// Leaves the group (so its partitions move to other members at once) and waits up to
    /// `timeout` for that. Returns whether the close finished in time; if not, it continues on a
    /// detached thread.
    pub async fn close(mut self, timeout: Duration) -> bool {
        let Some(c) = self.consumer.take() else {
            return true;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        close_detached_then(c, move || {
            let _ = tx.send(());
        });
        tokio::time::timeout(timeout, rx).await.is_ok()
    }
}

impl LogConsumer for KafkaConsumer {
    fn take_assignment_events(&mut self) -> Vec<AssignmentEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn group_session_timeout(&self) -> Option<Duration> {
        Some(self.cfg.session_timeout)
    }

    async fn recv(&mut self) -> Result<Option<ConsumedRecord>, LogError> {
        if self.shutdown.is_cancelled() {
            return Ok(None);
        }
        let c = self.live()?;
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Ok(None),
            msg = c.recv() => {
                let msg = msg?;
                let mut headers = Vec::new();
                if let Some(h) = msg.headers() {
                    headers.reserve(h.count());
                    for i in 0..h.count() {
                        let hd = h.get(i);
                        headers.push((hd.key.to_owned(), hd.value.unwrap_or_default().to_vec()));
                    }
                }
                let topic = self.cfg.logical_name(msg.topic()).to_owned();
                metrics::counter!(m::LOG_CONSUMED_RECORDS_TOTAL, "backend" => BACKEND, "topic" => topic.clone())
                    .increment(1);
                Ok(Some(ConsumedRecord {
                    topic,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    record: Record {
                        key: msg.key().unwrap_or_default().to_vec(),
                        value: msg.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                    },
                }))
            }
        }
    }

    async fn commit(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), LogError> {
        if next_offset < 0 || partition < 0 {
            return Err(LogError::InvalidArgument(format!(
                "bad position {topic}/{partition}@{next_offset}"
            )));
        }
        let physical = self.cfg.physical_topic(topic)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&physical, partition, Offset::Offset(next_offset))?;
        let c = self.live()?;
        blocking(move || Ok(c.commit(&tpl, CommitMode::Sync)?)).await?;
        metrics::counter!(m::LOG_COMMITS_TOTAL, "backend" => BACKEND, "group" => self.group.clone())
            .increment(1);
        Ok(())
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            close_detached_then(c, || {});
        }
    }
}

/// A client in `group` (physical name) that never joins it: it reads or stores the group's
/// offsets only.
fn group_client(cfg: &KafkaLogConfig, group: &str) -> Result<BaseConsumer, LogError> {
    let mut cc = cfg.client_config();
    cc.set("group.id", group).set("enable.auto.commit", "false");
    Ok(cc.create()?)
}

/// The first offset of `physical`/`p` from `from` (below `end`) whose record timestamp is at or
/// after `ts`, read forward; `end` when none is. Blocking.
fn scan_for_time(
    cfg: &KafkaLogConfig,
    physical: &str,
    p: i32,
    from: i64,
    end: i64,
    ts: i64,
) -> Result<i64, LogError> {
    if from >= end {
        return Ok(end);
    }
    let mut cc = cfg.client_config();
    // Assigned, never subscribed or committed: the group only names the client.
    cc.set(
        "group.id",
        format!("{physical}.time-scan.{}", uuid::Uuid::new_v4().simple()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.partition.eof", "false");
    let c: BaseConsumer = cc.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(physical, p, Offset::Offset(from))?;
    c.assign(&tpl)?;
    let mut idle_until = Instant::now() + cfg.request_timeout;
    let result = loop {
        if Instant::now() > idle_until {
            break Err(LogError::Timeout(format!(
                "{physical}/{p}: no record for {:?} while looking up a time",
                cfg.request_timeout
            )));
        }
        match c.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(m)) => {
                if m.timestamp().to_millis().is_some_and(|t| t >= ts) {
                    break Ok(m.offset());
                }
                if m.offset() + 1 >= end {
                    break Ok(end);
                }
                idle_until = Instant::now() + cfg.request_timeout;
            }
        }
    };
    close_detached(c);
    result
}

/// Drops (closes) a client on its own thread: librdkafka's consumer close blocks until the group
/// is left, which must not stall an async worker or the caller.
fn close_detached<T: Send + 'static>(client: T) {
    close_detached_then(client, || {});
}

fn close_detached_then<T: Send + 'static>(client: T, done: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || {
            drop(client);
            done();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a thread to close a kafka client; it was closed inline");
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Closed(format!("blocking kafka call failed: {e}")))?
}

/// The producer's configuration; `batch_records` sets `batch.num.messages` (`extra` still wins).
fn producer_config(cfg: &KafkaLogConfig, batch_records: Option<u32>) -> ClientConfig {
    let mut pc = cfg.client_config();
    pc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", millis(cfg.delivery_timeout))
        .set("request.timeout.ms", millis(cfg.request_timeout));
    if let Some(n) = batch_records {
        pc.set("batch.num.messages", n.max(1).to_string());
    }
    for (k, v) in &cfg.extra {
        pc.set(k, v);
    }
    pc
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}
