//! TLS to PostgreSQL as libpq means it (`sslmode`, `sslrootcert`) on every connection SyncBridge
//! makes: against the stack's server, which `ops/stack` sets up with a throwaway CA
//! (`SYNCBRIDGE_PG_ROOT_CERT`).
//!
//! Needs `DATABASE_URL` and `SYNCBRIDGE_PG_ROOT_CERT`: `eval "$(ops/stack env)"`. Fails (never
//! skips) without them.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use syncbridge::pg::{self, PgConnectError};

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

fn root_cert() -> String {
    match std::env::var("SYNCBRIDGE_PG_ROOT_CERT") {
        Ok(p) if !p.is_empty() => p,
        _ => panic!(
            "SYNCBRIDGE_PG_ROOT_CERT is not set or empty: the stack's PostgreSQL has no TLS. \
             Recreate it (ops/stack down pg; remove its data dir under the stack dir; ops/stack up pg) \
             and eval \"$(ops/stack env)\""
        ),
    }
}

fn port() -> u16 {
    url::Url::parse(&common::database_url())
        .unwrap()
        .port()
        .expect("DATABASE_URL has a port")
}

fn url(host: &str, query: &str) -> String {
    format!("postgres://syncbridge@{host}:{}/syncbridge?{query}", port())
}

/// Connects and returns whether the session is encrypted (the server's view).
async fn ssl_in_use(url: &str) -> Result<bool, PgConnectError> {
    let (client, conn) = pg::connect(url).await?;
    let driver = tokio::spawn(conn);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok(ssl)
}

/// A CA of its own (not the server's), made with openssl.
fn other_ca(dir: &std::path::Path) -> PathBuf {
    let crt = dir.join("other-ca.crt");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=some other CA", "-keyout"])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl runs");
    assert!(status.status.success(), "openssl: {status:?}");
    crt
}

#[tokio::test]
async fn every_sslmode_means_what_it_means_to_libpq() {
    let ca = root_cert();
    let q = |mode: &str| format!("sslmode={mode}&sslrootcert={ca}");

    // Encryption per mode.
    assert!(
        !ssl_in_use(&url("127.0.0.1", "sslmode=disable"))
            .await
            .unwrap()
    );
    assert!(
        ssl_in_use(&url("127.0.0.1", "sslmode=prefer"))
            .await
            .unwrap()
    );
    assert!(
        ssl_in_use(&url("127.0.0.1", "sslmode=require"))
            .await
            .unwrap()
    );
    assert!(
        ssl_in_use(&url("127.0.0.1", &q("verify-ca")))
            .await
            .unwrap()
    );
    // The server certificate names 127.0.0.1 and localhost.
    assert!(
        ssl_in_use(&url("127.0.0.1", &q("verify-full")))
            .await
            .unwrap()
    );
    assert!(
        ssl_in_use(&url("localhost", &q("verify-full")))
            .await
            .unwrap()
    );

    // A host name the certificate does not carry: verify-full refuses, verify-ca does not check it.
    let wrong_host = |mode: &str| {
        url(
            "db.wrong.example",
            &format!("{}&hostaddr=127.0.0.1", q(mode)),
        )
    };
    let e = ssl_in_use(&wrong_host("verify-full")).await.unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("certificate"),
        "verify-full with a wrong host name: {e}"
    );
    assert!(ssl_in_use(&wrong_host("verify-ca")).await.unwrap());

    // Another CA: the chain does not verify for verify-ca, verify-full, and require with a
    // root certificate given (libpq verifies the chain then too).
    let dir = tempfile::tempdir().unwrap();
    let other = other_ca(dir.path());
    for mode in ["verify-ca", "verify-full", "require"] {
        let u = url(
            "127.0.0.1",
            &format!("sslmode={mode}&sslrootcert={}", other.display()),
        );
        let e = ssl_in_use(&u).await.unwrap_err();
        assert!(
            matches!(e, PgConnectError::Postgres(_)) && e.to_string().contains("certificate"),
            "{mode} with a foreign CA: {e}"
        );
        assert!(e.as_db_error().is_none());
    }

    // Unreadable root certificates and unsupported options are named, not retried.
    let missing = dir.path().join("missing.crt");
    let e = ssl_in_use(&url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", missing.display()),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("missing.crt"), "{e}");
    assert!(!e.is_retryable());
    let e = ssl_in_use(&url("127.0.0.1", "sslmode=require&sslcert=client.crt"))
        .await
        .unwrap_err();
    assert!(matches!(e, PgConnectError::Options(_)), "{e}");
    assert!(e.to_string().contains("sslcert"), "{e}");
}

/// A whole two-way pipeline with `sslmode=verify-full`: the replication stream (libpq) and every
/// other connection (catalog, lock, heartbeat, applier) are encrypted, rows reach the list and a
/// person's edit reaches the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_way_pipeline_runs_entirely_over_verified_tls() {
    hard_timeout(180, async {
        let mut h = Harness::new("pgtls").await;
        let app = format!("sbtls_{}", h.name);
        h.source_url = url(
            "localhost",
            &format!(
                "sslmode=verify-full&sslrootcert={}&application_name={app}",
                root_cert()
            ),
        );
        let (t, list) = h.titled_table(3).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n    pull: {{ enabled: true, interval_ms: 200 }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        h.start(&file);
        h.wait_for("the initial rows in the list", || async {
            h.items(&list).await.len() == 3
        })
        .await;
        h.sql(&format!("INSERT INTO public.{t} VALUES (4, 'streamed')"))
            .await;
        h.wait_for("the streamed row in the list", || async {
            h.items(&list).await.len() == 4
        })
        .await;
        h.person_edit(&list, "2", json!({ "Title": "edited in the list" }))
            .await;
        h.wait_for("the person's edit in PostgreSQL", || async {
            let r = h
                .db
                .query_one(&format!("SELECT title FROM public.{t} WHERE id = 2"), &[])
                .await
                .unwrap();
            r.get::<_, String>(0) == "edited in the list"
        })
        .await;

        // The server's view of SyncBridge's sessions: all encrypted, the walsender included.
        let rows = h
            .db
            .query(
                "SELECT a.backend_type, a.application_name, s.ssl \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name IN ($1, $2)",
                &[&app, &format!("syncbridge-apply-{}", h.name)],
            )
            .await
            .unwrap();
        let sessions: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert!(
            sessions.iter().any(|s| s.0 == "walsender"),
            "replication session: {sessions:?}"
        );
        assert!(
            sessions.iter().any(|s| s.1.starts_with("syncbridge-apply-")),
            "applier session: {sessions:?}"
        );
        assert!(sessions.len() >= 3, "{sessions:?}");
        assert!(sessions.iter().all(|s| s.2), "unencrypted: {sessions:?}");
        h.stop().await;
    })
    .await;
}
