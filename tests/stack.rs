//! Foundation checks against the real local stack (`ops/stack up`): PostgreSQL accepts logical
//! replication, and the Kafka-protocol broker round-trips a message through rdkafka.
//!
//! These fail (not skip) when the stack's environment is missing: run them through `ops/test`
//! or after `eval "$(ops/stack env)"`.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests via ops/test, or eval \"$(ops/stack env)\" first")
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn postgres_creates_a_logical_replication_slot() {
    let (client, conn) = tokio_postgres::connect(&env("DATABASE_URL"), tokio_postgres::NoTls)
        .await
        .expect("connect to the stack's PostgreSQL");
    tokio::spawn(conn);

    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wal_level, "logical");

    let slot = unique("sb_test_slot");
    let row = client
        .query_one(
            "SELECT slot_name::text, lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', true)",
            &[&slot],
        )
        .await
        .expect("create a temporary pgoutput slot");
    assert_eq!(row.get::<_, String>(0), slot);
    let lsn: String = row.get(1);
    assert!(lsn.contains('/'), "an LSN looks like X/Y, got {lsn}");

    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND plugin = 'pgoutput'",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
}

#[tokio::test]
async fn kafka_broker_round_trips_a_message() {
    let brokers = env("KAFKA_BROKERS");
    let topic = unique("sb-test-roundtrip");

    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("admin client");
    let created = tokio::time::timeout(
        Duration::from_secs(20),
        admin.create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ),
    )
    .await
    .expect("create_topics timed out")
    .expect("create_topics");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let delivery = tokio::time::timeout(
        Duration::from_secs(20),
        producer.send(
            FutureRecord::to(&topic).key("k1").payload("hello"),
            Duration::from_secs(10),
        ),
    )
    .await
    .expect("produce timed out")
    .map_err(|(e, _)| e)
    .expect("produce");
    assert_eq!((delivery.partition, delivery.offset), (0, 0));

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", unique("sb-test-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("no message within 30 s")
        .expect("consume");
    assert_eq!(msg.key(), Some(&b"k1"[..]));
    assert_eq!(msg.payload(), Some(&b"hello"[..]));
    assert_eq!(msg.offset(), 0);
}
