//! The scheduler (issue 14 item 3) on the real stack: two `syncbridge run` processes on one
//! pipeline (Kafka log on `KAFKA_BROKERS`; two processes cannot share the embedded log) with a
//! `dlq_replay` job every 5 seconds: every claimed tick is exactly one `scheduled` run (and one
//! `dlq_replay` run), never two, however the processes race. A yearly schedule with
//! `catch_up: true` whose last claimed tick lies before the newest one runs exactly once at start
//! (claimed like any tick), the same schedule without `catch_up` does not.
//!
//! Needs `DATABASE_URL` (the meta-store defaults to the source database) and `KAFKA_BROKERS`.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};

mod common;
#[path = "common/harness.rs"]
mod harness;
#[path = "common/run.rs"]
mod run;
use harness::{BIN, Harness, hard_timeout};
use run::Run;

/// Ticks the test waits for while both processes run.
const TICKS: i64 = 4;

fn spawn(h: &Harness, file: &std::path::Path, tag: &str) -> Run {
    // Each process keeps its state (ledger, positions) under its own working directory.
    let log = h.dir.path().join(format!("{tag}.log"));
    Run::start_in(BIN, &h.dir.path().join(tag), file, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_runs_once_with_two_processes_and_a_missed_tick_is_caught_up_once() {
    hard_timeout(300, async {
        let mut h = Harness::new("sched").await;
        let n = h.name.clone();
        let yearly = "cron: '0 0 1 1 *'\n    job: dlq_replay\n";
        let file = h
            .kafka_titled_pipeline(
                2,
                &format!(
                    "schedules:\n  - name: replay\n    cron: '*/5 * * * * *'\n    job: dlq_replay\n  - name: catch\n    {yearly}    catch_up: true\n  - name: nocatch\n    {yearly}"
                ),
            )
            .await;
        let yaml = std::fs::read_to_string(&file).unwrap();
        let second = h.dir.path().join("second.yaml");
        let port = common::free_port();
        let listen = format!("listen: 127.0.0.1:{}", h.control_port);
        std::fs::write(&second, yaml.replace(&listen, &format!("listen: 127.0.0.1:{port}")))
            .unwrap();

        // Seed the yearly schedules' last claim a year before the newest tick (1 January,
        // 00:00 UTC), as if no process ran since.
        syncbridge::control::meta::migrate::migrate(&common::database_url())
            .await
            .expect("meta-store migrations");
        let newest = Utc.with_ymd_and_hms(Utc::now().year(), 1, 1, 0, 0, 0).unwrap();
        let before = Utc.with_ymd_and_hms(newest.year() - 1, 1, 1, 0, 0, 0).unwrap();
        for s in ["catch", "nocatch"] {
            h.db.execute(
                "DELETE FROM syncbridge_meta.schedule_ticks WHERE pipeline = $1 AND schedule = $2",
                &[&n, &s],
            )
            .await
            .unwrap();
            h.db.execute(
                "INSERT INTO syncbridge_meta.schedule_ticks VALUES ($1, $2, $3, 'seed', 0)",
                &[&n, &s, &before.timestamp_millis()],
            )
            .await
            .unwrap();
        }

        // Two processes; the second starts once the first reads the slot (capture state is per
        // working directory, so the reader must stay the one that took the snapshot).
        let mut a = spawn(&h, &file, "a");
        h.wait_for("the first process to hold the slot", || async {
            std::fs::read_to_string(&a.log)
                .unwrap_or_default()
                .contains("acquired single-reader lock")
        })
        .await;
        let mut b = spawn(&h, &second, "b");
        let ticks = |from: i64| {
            let (db, n) = (&h.db, n.clone());
            async move {
                db.query(
                    "SELECT tick_ms, owner FROM syncbridge_meta.schedule_ticks \
                     WHERE pipeline = $1 AND schedule = 'replay' AND tick_ms > $2 ORDER BY tick_ms",
                    &[&n, &from],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
            }
        };
        h.wait_for("both processes ready", || async {
            let ready = |p: u16| {
                let admin = h.admin.clone();
                async move {
                    admin
                        .get(format!("http://127.0.0.1:{p}/health"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            };
            ready(h.control_port).await && ready(port).await
        })
        .await;
        let start = Utc::now().timestamp_millis();
        let mut claimed = Vec::new();
        for _ in 0..(TICKS * 5 + 30) {
            claimed = ticks(start).await;
            if claimed.len() as i64 >= TICKS {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            claimed.len() as i64 >= TICKS,
            "{TICKS} ticks not claimed: {claimed:?}\n--- a\n{}\n--- b\n{}",
            run::tail(&a.log),
            run::tail(&b.log)
        );
        // The standby first: it must not take over the slot without the reader's state dir.
        assert!(b.terminate().await.success(), "{}", run::tail(&b.log));
        assert!(a.terminate().await.success(), "{}", run::tail(&a.log));

        // Every scheduled run is projected once both processes stopped (their runs ended).
        let all_ticks = ticks(0).await;
        let runs = |kind: &'static str| {
            let (db, n) = (&h.db, n.clone());
            async move {
                db.query(
                    "SELECT subject, status FROM syncbridge_meta.runs \
                     WHERE pipeline = $1 AND kind = $2 ORDER BY subject",
                    &[&n, &kind],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get::<_, String>(1)))
                .collect::<Vec<_>>()
            }
        };
        let expected = all_ticks.len() + 1; // + the catch-up
        h.wait_for("every scheduled and dlq_replay run projected", || async {
            runs("scheduled").await.len() >= expected && runs("dlq_replay").await.len() >= expected
        })
        .await;
        let scheduled = runs("scheduled").await;
        let replays = runs("dlq_replay").await;
        let catch_up = format!(
            "catch: dlq_replay @ {}",
            newest.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        // Exactly one run per claimed tick, each a distinct subject, all succeeded.
        let mut subjects: Vec<_> = scheduled.iter().map(|(s, _)| s.clone()).collect();
        subjects.dedup();
        assert_eq!(subjects.len(), scheduled.len(), "a tick ran twice: {scheduled:#?}");
        assert_eq!(scheduled.len(), expected, "{scheduled:#?}\n{all_ticks:?}");
        assert_eq!(replays.len(), expected, "{replays:#?}");
        assert!(scheduled.iter().all(|(_, st)| st == "succeeded"), "{scheduled:#?}");
        assert_eq!(
            scheduled.iter().filter(|(s, _)| s.starts_with("catch:")).count(),
            1,
            "{scheduled:#?}"
        );
        assert!(scheduled.iter().any(|(s, _)| *s == catch_up), "{scheduled:#?}");
        assert!(!scheduled.iter().any(|(s, _)| s.starts_with("nocatch:")), "{scheduled:#?}");
        let owners: std::collections::BTreeSet<_> = all_ticks.iter().map(|(_, o)| o).collect();
        eprintln!("{} ticks claimed by {} process(es)", all_ticks.len(), owners.len());
    })
    .await;
}
