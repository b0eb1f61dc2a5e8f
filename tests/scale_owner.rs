//! One owner for what must not run twice (issue 15 item 2), on the real stack: two
//! `syncbridge run` processes of one two-way pipeline (Kafka log on `KAFKA_BROKERS`, lists on an
//! in-process emulator), each in its own working directory (its own ledger), like two machines.
//!
//! - Each list's delta poller runs in one process: the first holds the list's lock (`/ready`
//!   `owns` true, `syncbridge_pull_poller_owned` 1), the second stands by (false, 0) and never
//!   polls (`syncbridge_pull_delta_polls_total` stays 0 there).
//! - A person's edit reaches the table once: one record in the `.list-changes` topic and one
//!   `UPDATE` of the row (counted by a trigger).
//! - kill -9 of the owner: the other process takes the poller over (from the stored delta link:
//!   no re-enumeration), the return stream's partition (after the broker's session timeout) and
//!   the origin; later edits arrive, once each.
//! - The schedule's ticks (`dlq_replay` every 3 s) are claimed once each across both processes,
//!   and keep running in the survivor.
//!
//! Capture is out of this test's scope: its snapshot progress is a file in the process's state
//! directory, so before the kill the test copies the first process's progress file to the
//! second's (what a shared state directory would give); without it the survivor's capture
//! refuses the slot (see `capture::session`).
//!
//! Needs `DATABASE_URL` and `KAFKA_BROKERS` (`eval "$(cat /work/devstack.env)"`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use syncbridge::log::{
    AnyLog, CancellationToken, EventLog, KafkaLogConfig, LogConfig, LogConsumer,
};
use syncbridge::pull::ListChange;

mod common;
#[path = "common/harness.rs"]
mod harness;
#[path = "common/run.rs"]
mod run;
use harness::{BIN, Harness, hard_timeout};
use run::{Run, tail};

/// One process: its child, control port and working directory.
struct Proc {
    run: Run,
    port: u16,
    cwd: PathBuf,
}

fn spawn(h: &Harness, file: &Path, tag: &str, port: u16) -> Proc {
    let yaml = std::fs::read_to_string(file).unwrap();
    let own = h.dir.path().join(format!("{tag}.yaml"));
    let listen = format!("listen: 127.0.0.1:{}", h.control_port);
    std::fs::write(
        &own,
        yaml.replace(&listen, &format!("listen: 127.0.0.1:{port}")),
    )
    .unwrap();
    let log = h.dir.path().join(format!("{tag}.log"));
    let cwd = h.dir.path().join(tag);
    let run = Run::start_in(BIN, &cwd, &own, log);
    Proc { run, port, cwd }
}

impl Proc {
    /// `/ready`'s `owns` (empty while the control plane is not up).
    async fn owns(&self) -> Value {
        let url = format!("http://127.0.0.1:{}/ready", self.port);
        match reqwest::get(url).await {
            Ok(r) => r
                .json::<Value>()
                .await
                .map_or(Value::Null, |b| b["owns"].clone()),
            Err(_) => Value::Null,
        }
    }

    /// A metric summed over the series whose line contains every one of `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let text = match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return 0.0,
        };
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Waits (up to `secs`) until `check` holds; panics with both logs otherwise.
async fn wait<F, Fut>(what: &str, secs: u64, procs: &[&Proc], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| tail(&p.run.log)).collect();
            panic!("timed out waiting for {what}:\n{}", logs.join("\n-----\n"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every record of `topic` (a fresh group, never committed): (key, change).
async fn changes(log: &AnyLog, topic: &str) -> Vec<(String, ListChange)> {
    let end: i64 = log.end_offsets(topic).await.map_or(0, |e| e.iter().sum());
    let mut out = Vec::new();
    if end == 0 {
        return out;
    }
    let stop = CancellationToken::new();
    let group = format!("t-{}", uuid::Uuid::new_v4());
    let mut c = log
        .consumer(&group, &[topic.to_string()], stop.clone())
        .await
        .unwrap();
    while (out.len() as i64) < end {
        let r = tokio::time::timeout(Duration::from_secs(20), c.recv())
            .await
            .expect("records up to the end offset")
            .unwrap()
            .unwrap();
        let key = String::from_utf8(r.record.key.clone()).unwrap();
        out.push((
            key,
            serde_json::from_slice(r.record.value.as_ref().unwrap()).unwrap(),
        ));
    }
    stop.cancel();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poller_per_list_and_a_takeover_after_kill_9() {
    hard_timeout(300, async {
        let mut h = Harness::new("owner").await;
        let n = h.name.clone();
        let (t, list) = h.titled_table(3).await;
        // Row version: one `updates` row per UPDATE reaching the table.
        h.sql(&format!(
            "CREATE TABLE public.{t}_updates (id bigint, title text);
             CREATE FUNCTION public.{t}_count() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.{t}_updates VALUES (NEW.id, NEW.title); RETURN NEW; END $$;
             CREATE TRIGGER {t}_count AFTER UPDATE ON public.{t}
               FOR EACH ROW EXECUTE FUNCTION public.{t}_count();"
        ))
        .await;
        h.tables.push(format!("public.{t}_updates"));
        let prefix = format!("sbk{}", &n[n.len() - 8..]);
        let kafka = format!(
            "{{ kafka: {{ brokers: ['{}'], topic_prefix: '{prefix}' }} }}",
            common::kafka_brokers()
        );
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: true, interval_ms: 200 }}"
        );
        let file = h.pipeline(&kafka, &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            &file,
            format!("{yaml}schedules:\n  - name: tick\n    cron: '*/3 * * * * *'\n    job: dlq_replay\n"),
        )
        .unwrap();
        let owner_key = format!("{n}/poller:{list}");

        let mut a = spawn(&h, &file, "a", common::free_port());
        wait("the first process to push the rows and own the poller", 120, &[&a], || async {
            h.items(&list).await.len() == 3 && a.owns().await[&owner_key] == json!(true)
        })
        .await;
        let b = spawn(&h, &file, "b", common::free_port());
        wait("the second process to stand by", 120, &[&a, &b], || async {
            b.owns().await[&owner_key] == json!(false)
        })
        .await;

        // `title` of the rows of `table` with `id`.
        let titles = |table: String, id: i64| {
            let db = &h.db;
            async move {
                db.query(&format!("SELECT title FROM public.{table} WHERE id = $1"), &[&id])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            }
        };
        let updates = |id: i64| titles(format!("{t}_updates"), id);
        let title = |id: i64| {
            let row = titles(t.clone(), id);
            async move { row.await.concat() }
        };
        h.person_edit(&list, "1", json!({ "Title": "p1" })).await;
        wait("the first edit in the table", 120, &[&a, &b], || async { title(1).await == "p1" }).await;
        h.person_edit(&list, "2", json!({ "Title": "p2" })).await;
        wait("the second edit in the table", 120, &[&a, &b], || async { title(2).await == "p2" }).await;

        let log = AnyLog::open(LogConfig::Kafka({
            let mut k = KafkaLogConfig::new(common::kafka_brokers());
            k.topic_prefix = String::new();
            k
        }))
        .unwrap();
        let topic = syncbridge::pull::changes_topic(&prefix, &n);
        let item1 = h.item_id(&list, "1").await;
        let recs = changes(&log, &topic).await;
        // The records of `item` carrying `title` (its creation by the pipeline is recorded too).
        let of = |recs: &[(String, ListChange)], item: &str, title: &str| {
            recs.iter()
                .filter(|(_, c)| {
                    c.item_id.as_deref() == Some(item)
                        && c.fields.as_ref().is_some_and(|f| f["Title"] == title)
                })
                .count()
        };
        assert_eq!(of(&recs, &item1, "p1"), 1, "the edit was appended once: {recs:#?}");
        assert_eq!(updates(1).await, ["p1"], "the edit reached the row once");
        assert_eq!(b.metric("syncbridge_pull_delta_polls_total", &[]).await, 0.0, "the standby never polled");
        assert!(a.metric("syncbridge_pull_delta_polls_total", &[]).await > 0.0);
        assert_eq!(a.metric("syncbridge_pull_poller_owned", &[&list]).await, 1.0);
        assert_eq!(b.metric("syncbridge_pull_poller_owned", &[&list]).await, 0.0);

        // Capture's progress to the survivor (see the module docs), then kill -9 the owner.
        let state = |p: &Proc| p.cwd.join(".syncbridge").join(format!("{n}-state"));
        for e in std::fs::read_dir(state(&a)).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with("capture-") {
                std::fs::copy(e.path(), state(&b).join(e.file_name())).unwrap();
            }
        }
        let a_pid = a.run.pid();
        let killed_at = chrono::Utc::now().timestamp_millis();
        let killed = Instant::now();
        a.run.kill9();
        wait("the survivor to own the poller", 60, &[&b], || async {
            b.owns().await[&owner_key] == json!(true)
        })
        .await;
        let poller_taken = killed.elapsed();
        h.person_edit(&list, "3", json!({ "Title": "p3" })).await;
        wait("the edit after the takeover in the table", 180, &[&b], || async {
            title(3).await == "p3"
        })
        .await;
        eprintln!(
            "after kill -9: poller taken over in {:.1} s, the next edit in the table {:.1} s after the kill",
            poller_taken.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        );
        let item3 = h.item_id(&list, "3").await;
        let recs = changes(&log, &topic).await;
        assert_eq!(of(&recs, &item3, "p3"), 1, "appended once by the new owner: {recs:#?}");
        assert!(recs.iter().all(|(_, c)| !c.resync), "continued from the stored link: {recs:#?}");
        assert_eq!(updates(3).await, ["p3"]);
        assert_eq!(updates(1).await, ["p1"], "nothing applied again after the takeover");

        // Ticks: once each, and the survivor keeps claiming them.
        let ticks = || async {
            h.db.query(
                "SELECT tick_ms, owner FROM syncbridge_meta.schedule_ticks \
                 WHERE pipeline = $1 AND schedule = 'tick' ORDER BY tick_ms",
                &[&n],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
        };
        wait("a tick after the kill", 60, &[&b], || async {
            ticks().await.iter().any(|(ms, _)| *ms > killed_at + 1000)
        })
        .await;
        let ticks = ticks().await;
        let after: Vec<_> = ticks.iter().filter(|(ms, _)| *ms > killed_at + 1000).collect();
        let b_owner = format!("/{}", b.run.pid());
        assert!(after.iter().all(|(_, o)| o.ends_with(&b_owner)), "{after:?}");
        let subjects: Vec<String> = h
            .db
            .query(
                "SELECT subject FROM syncbridge_meta.runs WHERE pipeline = $1 AND kind = 'scheduled'",
                &[&n],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
            .collect();
        let distinct: BTreeSet<_> = subjects.iter().collect();
        assert_eq!(distinct.len(), subjects.len(), "a tick ran twice: {subjects:#?}");
        let by_a = ticks.iter().filter(|(_, o)| o.ends_with(&format!("/{a_pid}"))).count();
        eprintln!(
            "{} ticks claimed ({by_a} by the killed process, {} after the kill), {} scheduled runs projected",
            ticks.len(),
            after.len(),
            subjects.len()
        );
        let mut b = b;
        assert!(b.run.terminate().await.success(), "{}", tail(&b.run.log));
        if std::env::var("SCALE_OWNER_LOGS").is_ok() {
            eprintln!("--- a\n{}\n--- b\n{}", tail(&a.run.log), tail(&b.run.log));
        }
        h.sql(&format!("DROP TABLE public.{t} CASCADE; DROP FUNCTION public.{t}_count();"))
            .await;
    })
    .await;
}
