//! Notifications (issue 14 item 4) against a local HTTP receiver that checks the
//! `X-SyncBridge-Signature` HMAC: a condition raised twice and cleared gives exactly one firing
//! and one resolved message, delivered after the receiver's first refusal (retry); end to end, a
//! `syncbridge run` whose scheduled `drift_check` fails every 2 s (not available in this build)
//! sends one `job_failed` message, not one per failed tick; a drift check finding more than
//! `notify.drift_threshold` differences fires `drift:<pipeline>` once, a clean one resolves it;
//! dead letters above `notify.dead_letters` and a parked conflict each fire once on a running
//! pipeline and resolve after a quiet window; the slot watch fires `slot_lag` for a slot that
//! retains more than `notify.slot_lag_bytes` and resolves once it is advanced.
//!
//! The end-to-end test needs `DATABASE_URL` and `KAFKA_BROKERS` like the other run tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;
use syncbridge::config::{NotifyKind, NotifyTarget, Secret};
use syncbridge::control::notify::{self, Notifier, format};
use tokio_util::sync::CancellationToken;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

const KEY: &str = "receiver-key";

/// What the receiver got: bodies whose signature verified; anything else fails the test.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Value>>>,
    bad: Arc<Mutex<Vec<String>>>,
    /// Requests to refuse with 503 before accepting.
    refuse: Arc<Mutex<u32>>,
}

async fn hook(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    {
        let mut refuse = r.refuse.lock().unwrap();
        if *refuse > 0 {
            *refuse -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let expected = format!("sha256={}", format::sign(KEY.as_bytes(), &body));
    let sig = headers
        .get(format::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if sig != expected {
        r.bad.lock().unwrap().push(format!("bad signature {sig:?}"));
        return StatusCode::UNAUTHORIZED;
    }
    r.got
        .lock()
        .unwrap()
        .push(serde_json::from_slice(&body).unwrap());
    StatusCode::NO_CONTENT
}

async fn receiver() -> (Receiver, String) {
    let r = Receiver::default();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, url)
}

fn webhook(url: &str, key: &str) -> NotifyTarget {
    NotifyTarget {
        name: "test".into(),
        kind: NotifyKind::Webhook,
        url: Secret::new(url),
        secret: Some(Secret::new(key)),
        from: None,
        to: Vec::new(),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn once_per_condition_then_resolved_signed_and_retried() {
    hard_timeout(60, async {
        let (r, url) = receiver().await;
        *r.refuse.lock().unwrap() = 1;
        let n = Notifier::new("p");
        let stop = CancellationToken::new();
        let sender = tokio::spawn(notify::deliver(
            n.clone(),
            vec![webhook(&url, KEY)],
            stop.clone(),
        ));
        n.raise("dead_letters", "3 dead letters in the last 300 s", "look");
        n.raise("dead_letters", "5 dead letters in the last 300 s", "look");
        n.clear("dead_letters");
        n.clear("dead_letters");
        wait_until("two messages", || r.got.lock().unwrap().len() >= 2).await;
        stop.cancel();
        sender.await.unwrap();
        let got = r.got.lock().unwrap().clone();
        let states: Vec<_> = got
            .iter()
            .map(|m| (m["condition"].clone(), m["state"].clone()))
            .collect();
        assert_eq!(
            states,
            [
                (Value::from("dead_letters"), Value::from("firing")),
                (Value::from("dead_letters"), Value::from("resolved")),
            ],
            "{got:#?}"
        );
        assert_eq!(got[0]["summary"], "3 dead letters in the last 300 s");
        assert!(r.bad.lock().unwrap().is_empty());

        // A sender with the wrong key is refused by the receiver (the check can fail).
        let (r2, url2) = receiver().await;
        let n2 = Notifier::new("p");
        let stop2 = CancellationToken::new();
        let sender2 = tokio::spawn(notify::deliver(
            n2.clone(),
            vec![webhook(&url2, "wrong")],
            stop2.clone(),
        ));
        n2.raise("x", "x", "");
        wait_until("a refused message", || !r2.bad.lock().unwrap().is_empty()).await;
        stop2.cancel();
        sender2.abort();
        assert!(r2.got.lock().unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_scheduled_job_notifies_once_end_to_end() {
    hard_timeout(240, async {
        let (r, url) = receiver().await;
        let mut h = Harness::new("notify").await;
        let n = h.name.clone();
        // A re-snapshot job of the pipeline's table, which is renamed away once the initial
        // snapshot is done: every tick fails the same way.
        let extra = format!(
            "schedules:\n  - name: resnap\n    cron: '*/2 * * * * *'\n    job: resnapshot\n    tables: [public.{n}_t]\nnotify:\n  targets:\n    - name: hook\n      kind: webhook\n      url: {url}\n      secret: {KEY}\n"
        );
        let file = h.kafka_titled_pipeline(1, &extra).await;
        h.start(&file);
        let list = format!("T {n}");
        h.wait_for("the snapshot's item", || async { h.items(&list).await.len() == 1 })
            .await;
        h.sql(&format!("ALTER TABLE public.{n}_t RENAME TO {n}_gone")).await;
        let failed = || async {
            h.db.query(
                "SELECT reason FROM syncbridge_meta.runs \
                 WHERE pipeline = $1 AND kind = 'scheduled' AND status = 'failed' \
                 ORDER BY started_ms",
                &[&n],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, Option<String>>(0)).collect::<Vec<_>>())
            .unwrap_or_default()
        };
        h.wait_for("three failed re-snapshot ticks", || async { failed().await.len() >= 3 })
            .await;
        let reason = failed().await[0].clone().expect("a failed run says why");
        h.stop().await;
        let got = r.got.lock().unwrap().clone();
        let mine: Vec<_> = got.iter().filter(|m| m["condition"] == "job_failed:resnap").collect();
        assert_eq!(mine.len(), 1, "one message for the condition: {got:#?}");
        assert_eq!(mine[0]["state"], "firing");
        assert_eq!(mine[0]["pipeline"], n.as_str());
        assert_eq!(mine[0]["detail"], reason.as_str());
        assert!(r.bad.lock().unwrap().is_empty());
        assert!(!serde_json::to_string(&got).unwrap().contains(KEY), "the key never travels");
    })
    .await;
}

/// Email through a local SMTP sink (`ops/smtp-sink`: aiosmtpd from PyPI, Maildir): one
/// message when the condition fires, one when it resolves.
#[tokio::test]
async fn email_reaches_a_local_smtp_sink_once_then_resolved() {
    hard_timeout(180, async {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("mail");
        let port = common::free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/ops/smtp-sink");
        let mut sink = tokio::process::Command::new(script)
            .arg(port.to_string())
            .arg(&maildir)
            .kill_on_drop(true)
            .spawn()
            .expect("ops/smtp-sink starts");
        // The first run creates the venv (pip install): wait for the port.
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..1200 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let target = NotifyTarget {
            name: "mail".into(),
            kind: NotifyKind::Email,
            url: Secret::new(format!("smtp://{addr}")),
            secret: None,
            from: Some("SyncBridge <syncbridge@example.com>".into()),
            to: vec!["ops@example.com".into()],
        };
        let n = Notifier::new("p");
        let stop = CancellationToken::new();
        let sender = tokio::spawn(notify::deliver(n.clone(), vec![target], stop.clone()));
        n.raise(
            "slot_lag",
            "replication slot retains 2 GiB",
            "capture is behind",
        );
        n.raise(
            "slot_lag",
            "replication slot retains 3 GiB",
            "capture is behind",
        );
        n.clear("slot_lag");
        let new = maildir.join("new");
        let count = || std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0);
        wait_until("two mails", || count() >= 2).await;
        stop.cancel();
        sender.await.unwrap();
        let mut subjects: Vec<String> = std::fs::read_dir(&new)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .map(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        subjects.sort();
        assert_eq!(
            subjects,
            [
                "[SyncBridge p] FIRING: replication slot retains 2 GiB",
                "[SyncBridge p] RESOLVED: resolved: replication slot retains 2 GiB",
            ]
        );
        sink.kill().await.unwrap();
    })
    .await;
}

/// A running pipeline syncing a new titled table to its list, with a meta-store of its own (the
/// shared database's may hold another branch's migrations) and a `notify:` webhook to `url`.
struct NotifyPipeline {
    table: String,
    list: String,
    file: std::path::PathBuf,
    _meta: common::TempDatabase,
}

impl NotifyPipeline {
    /// `rows` rows; `entry`: YAML lines added to the sync entry; `notify`: lines under `notify:`.
    async fn start(h: &mut Harness, rows: u32, entry: &str, notify: &str, url: &str) -> Self {
        let meta = common::TempDatabase::create("sbnotify").await;
        let (table, list) = h.titled_table(rows).await;
        let sync = format!(
            "  - table: public.{table}\n    list: {list}\n    fields: {{ title: Title }}\n{entry}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        let extra = format!(
            "  meta_url: {}\nnotify:\n{notify}\n  targets:\n    - name: hook\n      kind: webhook\n      url: {url}\n      secret: {KEY}\n",
            meta.url
        );
        std::fs::write(&file, format!("{yaml}{extra}")).unwrap();
        h.start(&file);
        h.wait_for("the initial items", || async {
            h.items(&list).await.len() == rows as usize
        })
        .await;
        NotifyPipeline {
            table,
            list,
            file,
            _meta: meta,
        }
    }
}

/// The messages the receiver got for `condition`: `(state, summary, detail)`.
fn messages(r: &Receiver, condition: &str) -> Vec<(String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    r.got
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m["condition"] == condition)
        .map(|m| (text(&m["state"]), text(&m["summary"]), text(&m["detail"])))
        .collect()
}

/// `notify.drift_threshold: 1`, end to end: a check finding one difference sends nothing; one
/// finding two fires `drift:<pipeline>` once (a second such check and a heal add nothing); the
/// clean check after the heal sends the resolved message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_above_the_threshold_notifies_once_then_resolved_end_to_end() {
    hard_timeout(240, async {
        let (r, url) = receiver().await;
        let mut h = Harness::new("notifyd").await;
        let np = NotifyPipeline::start(
            &mut h,
            3,
            "    pull: { enabled: false }",
            "  drift_threshold: 1",
            &url,
        )
        .await;
        let list = np.list.clone();
        let key = format!("drift:{}", h.name);

        h.person_edit(&list, "1", serde_json::json!({ "Title": "edited 1" }))
            .await;
        let one = h.post_drift("drift").await;
        assert_eq!(one["counts"]["divergent"], 1, "{one:#}");
        h.person_edit(&list, "2", serde_json::json!({ "Title": "edited 2" }))
            .await;
        let two = h.post_drift("drift").await;
        assert_eq!(two["counts"]["divergent"], 2, "{two:#}");
        wait_until("the drift message", || !messages(&r, &key).is_empty()).await;
        assert_eq!(h.post_drift("drift").await["counts"]["divergent"], 2);
        h.post_drift("drift/heal").await;
        let titles = || async {
            let mut got: Vec<String> = h
                .items(&list)
                .await
                .iter()
                .map(|(_, f)| f["Title"].as_str().unwrap_or_default().to_string())
                .collect();
            got.sort();
            got
        };
        h.wait_for("the heal rewrote both items", || async {
            titles().await == ["row 1", "row 2", "row 3"]
        })
        .await;
        let clean = h.post_drift("drift").await;
        assert_eq!(clean["counts"]["divergent"], 0, "{clean:#}");
        wait_until("the resolved message", || messages(&r, &key).len() >= 2).await;
        h.stop().await;

        let got = messages(&r, &key);
        assert_eq!(got.len(), 2, "one firing, one resolved: {got:#?}");
        assert_eq!(got[0].0, "firing");
        assert!(got[0].1.contains("found 2 differences"), "{got:#?}");
        let run = two["run_id"].as_str().unwrap();
        assert!(
            got[0].2.contains(run),
            "the detail names the report: {got:#?}"
        );
        assert_eq!(got[1].0, "resolved");
        assert!(r.bad.lock().unwrap().is_empty());
    })
    .await;
}

/// The `(condition, state)` pairs the receiver got, in order, for conditions in `keys`.
fn states(r: &Receiver, keys: &[&str]) -> Vec<(String, String)> {
    r.got
        .lock()
        .unwrap()
        .iter()
        .filter(|m| keys.iter().any(|k| m["condition"] == *k))
        .map(|m| {
            let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            (s("condition"), s("state"))
        })
        .collect()
}

/// End to end on a running pipeline (`window_s: 10`, `dead_letters: 2`): one dead letter sends
/// nothing, a second one within the window fires `dead_letters` once, and a quiet window
/// resolves it; a conflict the `manual` policy parks (both sides changed while the process was
/// down) fires `conflicts_parked` once, resolved after a window without conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_parked_conflicts_notify_once_then_resolved_end_to_end() {
    hard_timeout(300, async {
        let (r, url) = receiver().await;
        let mut h = Harness::new("notifyc").await;
        let entry = "    conflict: manual\n    pull: { enabled: true, interval_ms: 200 }";
        let np = NotifyPipeline::start(&mut h, 2, entry, "  window_s: 10\n  dead_letters: 2", &url)
            .await;
        let (t, list, file) = (np.table.clone(), np.list.clone(), np.file.clone());
        let labels = format!("pipeline=\"{}\"", h.name);
        // A title longer than SharePoint's 255 characters is dead-lettered.
        let long = "x".repeat(300);
        h.sql(&format!("INSERT INTO public.{t} VALUES (10, '{long}')"))
            .await;
        h.wait_for("one dead letter", || async {
            h.metric("syncbridge_push_dead_letters_total", &[&labels])
                .await
                >= 1.0
        })
        .await;
        // Two looks of the watch (one per second) see one dead letter: below the threshold.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            states(&r, &["dead_letters"]),
            [],
            "one is below dead_letters: 2"
        );
        h.sql(&format!("INSERT INTO public.{t} VALUES (11, '{long}')"))
            .await;
        wait_until("dead_letters resolved", || {
            states(&r, &["dead_letters"]).len() >= 2
        })
        .await;

        h.stop().await;
        h.sql(&format!(
            "UPDATE public.{t} SET title = 'db 1' WHERE id = 1"
        ))
        .await;
        h.person_edit(&list, "1", serde_json::json!({ "Title": "list 1" }))
            .await;
        h.start(&file);
        wait_until("conflicts_parked resolved", || {
            states(&r, &["conflicts_parked"]).len() >= 2
        })
        .await;
        h.stop().await;

        let fired = |k: &str| {
            [
                (k.to_string(), "firing".to_string()),
                (k.to_string(), "resolved".to_string()),
            ]
        };
        assert_eq!(states(&r, &["dead_letters"]), fired("dead_letters"));
        assert_eq!(states(&r, &["conflicts_parked"]), fired("conflicts_parked"));
        // The conflict was parked: neither side written.
        assert_eq!(h.item(&list, "1").await.unwrap()["Title"], "list 1");
        let got = r.got.lock().unwrap().clone();
        let dl = got
            .iter()
            .find(|m| m["condition"] == "dead_letters")
            .unwrap();
        assert_eq!(dl["summary"], "2 dead letters in the last 10 s", "{got:#?}");
        assert!(r.bad.lock().unwrap().is_empty());
    })
    .await;
}

/// Drops the slot and the table named by it on drop.
struct SlotCleanup(String);

impl Drop for SlotCleanup {
    fn drop(&mut self) {
        let n = &self.0;
        common::drop_replication_objects(n, n, &[format!("public.{n}")]);
    }
}

/// `slot_lag` end to end against a real replication slot that nothing reads (the watch of a
/// running pipeline, on a slot of the test's own): WAL written past `slot_lag_bytes` fires it
/// once; advancing the slot to the current WAL position resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_lag_above_the_threshold_notifies_once_then_resolved() {
    hard_timeout(120, async {
        let (r, url) = receiver().await;
        let name = format!(
            "sbnotify_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (db, conn) = tokio_postgres::connect(&common::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .unwrap();
        // Dropped however the test ends.
        let _cleanup = SlotCleanup(name.clone());
        let config = syncbridge::config::NotifyConfig {
            targets: vec![webhook(&url, KEY)],
            window: Duration::from_secs(10),
            dead_letters: 1,
            slot_lag_bytes: 1 << 20,
            drift_threshold: 0,
        };
        let n = Notifier::new("p");
        let stop = CancellationToken::new();
        let tasks = [
            tokio::spawn(notify::watch_slot(
                n.clone(),
                config.clone(),
                common::database_url(),
                name.clone(),
                stop.clone(),
            )),
            tokio::spawn(notify::deliver(
                n.clone(),
                config.targets.clone(),
                stop.clone(),
            )),
        ];
        // About 4 MB of WAL the slot retains.
        db.batch_execute(&format!(
            "CREATE TABLE public.{name} (v text);
             INSERT INTO public.{name} SELECT repeat('x', 1000) FROM generate_series(1, 4000);"
        ))
        .await
        .unwrap();
        wait_until("slot_lag fired", || !states(&r, &["slot_lag"]).is_empty()).await;
        // Advanced until a look of the watch sees it at or below the threshold (other sessions
        // on the shared server write WAL too).
        for _ in 0..300 {
            if states(&r, &["slot_lag"]).len() >= 2 {
                break;
            }
            db.execute(
                "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
                &[&name],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.cancel();
        for t in tasks {
            t.await.unwrap();
        }
        let got = states(&r, &["slot_lag"]);
        let want = [("slot_lag", "firing"), ("slot_lag", "resolved")]
            .map(|(c, s)| (c.to_string(), s.to_string()));
        assert_eq!(got, want);
        let first = r.got.lock().unwrap()[0].clone();
        assert!(
            first["summary"]
                .as_str()
                .unwrap()
                .contains(&format!("replication slot {name} retains")),
            "{first:#}"
        );
    })
    .await;
}
