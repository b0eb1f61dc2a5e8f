//! Helpers shared by the integration tests that use the local stack's PostgreSQL
//! (`mod common;` in each test binary; each uses a subset).
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// The stack's database; tests fail (not skip) without it.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!("DATABASE_URL is not set: run via ops/test, or eval \"$(ops/stack env)\" (and ops/stack up) first")
    })
}

/// The stack's Kafka broker(s); tests that need it fail (not skip) without it.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| {
            panic!("KAFKA_BROKERS is not set: run `eval \"$(ops/stack env)\"` (and `ops/stack up`) first")
        })
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Drops a pipeline's replication slot, publication and tables (schema-qualified names), best
/// effort. A stopped reader's walsender can outlive it briefly, so it is ended and the drop retried
/// for up to 15 s: a leaked slot counts against `max_replication_slots` for every later run.
/// Blocking, on its own thread and runtime, so it is safe to call from `Drop` inside a test runtime.
pub fn drop_replication_objects(slot: &str, publication: &str, tables: &[String]) {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        return;
    };
    let (slot, publication, tables) = (slot.to_string(), publication.to_string(), tables.to_vec());
    block_on_own_runtime(async move {
        let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
            return;
        };
        tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let _ = c
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                         WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&slot],
                )
                .await;
            let r = c
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                         WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            if r.is_ok() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = c
            .batch_execute(&format!("DROP PUBLICATION IF EXISTS {publication}"))
            .await;
        // The return path's replication origin (`syncbridge_<pipeline>`, slot `sb_<pipeline>`):
        // each origin with progress holds one of the `max_replication_slots` state slots.
        if let Some(pipeline) = slot.strip_prefix("sb_") {
            let _ = c
                .execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin \
                         WHERE roname = $1",
                    &[&format!("syncbridge_{pipeline}")],
                )
                .await;
        }
        for t in tables {
            let _ = c.batch_execute(&format!("DROP TABLE IF EXISTS {t}")).await;
        }
    });
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own, and waits: safe to call
/// from `Drop` inside a test's runtime.
pub fn block_on_own_runtime<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f);
    })
    .join();
}

/// A database of its own on the stack's server (e.g. for `control.meta_url`, so that migrations
/// another branch applied to the shared database cannot stop a run); dropped on drop.
pub struct TempDatabase {
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    /// `CREATE DATABASE <prefix>_<random>`.
    pub async fn create(prefix: &str) -> TempDatabase {
        let name = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (c, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut url: url::Url = database_url().parse().unwrap();
        url.set_path(&format!("/{name}"));
        TempDatabase {
            name,
            url: url.to_string(),
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        execute_best_effort(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `sql` on the stack's database, ignoring failures; blocking, on a runtime of its own, so
/// it is safe in `Drop` (clean-up of what a test created).
pub fn execute_best_effort(sql: String) {
    block_on_own_runtime(async move {
        if let Ok((c, conn)) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            let _ = c.batch_execute(&sql).await;
        }
    });
}
