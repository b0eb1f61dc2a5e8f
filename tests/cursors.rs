//! Issue 11 §4 acceptance: cursors and reset with dry run, on the real stack (PostgreSQL, the
//! Graph emulator, the `syncbridge run` binary; the embedded log, and Kafka where named).
//!
//! 1. `a_dry_run_on_the_processor_group_reports_exactly_what_the_real_reset_rereads` (embedded)
//!    and `…_on_kafka`: after a push workload, a dry run moving the processor's group back
//!    reports N events to re-read and changes nothing; the real reset (the processor is stopped,
//!    moved, restarted) reports the same N, the processor then consumes exactly N records (its
//!    metrics), and the ledger absorbs them: 0 extra Graph writes (the emulator's stats). The
//!    reset is a `cursor_reset` run with `by` = the API token's name.
//! 2. Bad targets are 400 problems naming the field, the slot held by capture is 409 naming the
//!    stage; nothing moves.
//! 3. `a_list_delta_link_reset_reenumerates_the_list_without_writes`: the dry run's item count is
//!    the list's, the real reset starts an enumeration (resync `operator`) that writes nothing.
//! 4. `the_slot_moves_forward_while_capture_does_not_hold_it`: capture's walsender is ended and
//!    the reset retried until it lands in the reconnect gap; the slot is then at the target and
//!    capture streams on from it.
//! 5. `a_reset_while_paused_applies_and_the_pipeline_stays_paused_until_resumed`: a dead-letter
//!    storm pauses; `to: latest` skips the held events at once, the pause stands; after the fix
//!    and `syncbridge resume` only later changes sync. With no token, `by` says so.
//!
//! Needs `DATABASE_URL` (and `KAFKA_BROKERS` for the Kafka test). Each test's meta-store is a
//! database of its own. A test FAILS (never skips) when a variable is unset.

use serde_json::{Value, json};

mod common;
use common::TempDatabase;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, cli_with_env, hard_timeout, writes};

const TOKEN: &str = "cursors-test-operate-token";

/// The control plane with the operate token.
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(h: &Harness) -> Api {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {TOKEN}").parse().unwrap(),
        );
        Api {
            base: format!("http://127.0.0.1:{}", h.control_port),
            client: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .unwrap(),
        }
    }

    /// `GET path`; `None` while the process does not answer 200 yet.
    async fn try_get(&self, path: &str) -> Option<Value> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    async fn reset(&self, pipeline: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/pipelines/{pipeline}/cursors/reset", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

/// A meta-store database, a harness with a table of `rows` rows synced to list `T <name>` on the
/// log `log(h)` names (pull on or off), with `meta_url` and an operate token.
async fn setup(
    tag: &str,
    rows: u32,
    pull: bool,
    log: impl FnOnce(&Harness) -> String,
) -> (TempDatabase, Harness, String, String, std::path::PathBuf) {
    let meta_db = TempDatabase::create("sbmetacur").await;
    let mut h = Harness::new(tag).await;
    let (t, list) = h.titled_table(rows).await;
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: {pull}, interval_ms: 300 }}"
    );
    let file = h.pipeline(&log(&h), &sync);
    let yaml = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        format!(
            "{yaml}  meta_url: {}\n  tokens:\n    - {{ name: ops, token: {TOKEN}, role: operate }}\n",
            meta_db.url
        ),
    )
    .unwrap();
    (meta_db, h, t, list, file)
}

/// The sync group of a cursors answer.
fn sync_group(cursors: &Value) -> Value {
    cursors["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["role"] == "sync")
        .cloned()
        .unwrap_or_else(|| panic!("no sync group in {cursors:#}"))
}

/// Committed offsets of the sync group, by `topic/partition`.
fn committed(cursors: &Value) -> Vec<(String, Value)> {
    sync_group(cursors)["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                format!("{}/{}", p["topic"], p["partition"]),
                p["committed"].clone(),
            )
        })
        .collect()
}

/// The processor's group is where `before` had it.
async fn assert_unmoved(api: &Api, pipeline: &str, before: &Value, why: &str) {
    let now = api
        .try_get(&format!("/pipelines/{pipeline}/cursors"))
        .await
        .unwrap();
    assert_eq!(committed(&now), committed(before), "{why}");
}

/// Records the processor consumed from the table topic, and change events it processed.
async fn consumed(h: &Harness, topic: &str) -> (f64, f64) {
    (
        h.metric(
            "syncbridge_log_consumed_records_total",
            &[&format!("topic=\"{topic}\"")],
        )
        .await,
        h.metric(
            "syncbridge_push_events_total",
            &[&format!("pipeline=\"{}\"", h.name)],
        )
        .await,
    )
}

/// `GET path` until `ok` holds for the answer (60 s at most).
async fn wait_value(
    h: &Harness,
    api: &Api,
    what: &str,
    path: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = api.try_get(path).await
            && ok(&v)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            h.run_log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn caught_up(h: &Harness, api: &Api) -> Value {
    let path = format!("/pipelines/{}/cursors", h.name);
    wait_value(h, api, "the processor's group caught up", &path, |c| {
        sync_group(c)["lag"] == 0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_on_the_processor_group_reports_exactly_what_the_real_reset_rereads() {
    hard_timeout(240, async {
        let (_meta, h, t, list, file) = setup("curs", 20, false, |h| h.embedded_log()).await;
        reset_rereads_what_the_dry_run_said(h, &t, &list, &file).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_on_the_processor_group_reports_exactly_what_the_real_reset_rereads_on_kafka() {
    hard_timeout(300, async {
        let (_meta, h, t, list, file) = setup("cursk", 20, false, |h| {
            format!(
                "{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbc{}' }} }}",
                common::kafka_brokers(),
                &h.name[h.name.len() - 8..]
            )
        })
        .await;
        reset_rereads_what_the_dry_run_said(h, &t, &list, &file).await;
    })
    .await;
}

async fn reset_rereads_what_the_dry_run_said(
    mut h: Harness,
    t: &str,
    list: &str,
    file: &std::path::Path,
) {
    let name = h.name.clone();
    h.start(file);
    let api = Api::new(&h);
    h.wait_for("20 items", || async { h.items(list).await.len() == 20 })
        .await;
    // The push workload: every other row changes once more.
    h.sql(&format!(
        "UPDATE public.{t} SET title = title || ' v2' WHERE id % 2 = 0"
    ))
    .await;
    h.wait_for("10 items updated", || async {
        h.items(list)
            .await
            .iter()
            .filter(|(_, f)| f["Title"].as_str().is_some_and(|x| x.ends_with(" v2")))
            .count()
            == 10
    })
    .await;
    let before = caught_up(&h, &api).await;
    let sync = sync_group(&before);
    assert_eq!(sync["stage"], "process", "{sync:#}");
    let topic = sync["partitions"][0]["topic"].as_str().unwrap().to_string();
    let ends: i64 = sync["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end"].as_i64().unwrap())
        .sum();
    assert_eq!(ends, 30, "20 snapshot rows + 10 updates: {sync:#}");
    assert_eq!(before["slot"]["exists"], true, "{before:#}");
    let writes_before = writes(&h.stats().await).1;
    let (records_before, events_before) = consumed(&h, &topic).await;

    // Dry run: the blast radius, nothing moves.
    let target = json!({ "group": "sync", "shift_by": -7 });
    let mut dry_body = target.clone();
    dry_body["dry_run"] = json!(true);
    let (status, dry) = api.reset(&name, dry_body).await;
    assert_eq!(status, 200, "{dry:#}");
    assert_eq!(dry["dry_run"], true);
    let reread = dry["events_reread"].as_u64().unwrap();
    let per_partition: u64 = dry["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reread"].as_u64().unwrap())
        .sum();
    assert_eq!(per_partition, reread, "{dry:#}");
    assert!(
        reread > 7 && reread <= 21,
        "3 partitions back by up to 7: {dry:#}"
    );
    assert_eq!(dry["events_skipped"], 0);
    assert_eq!(dry["ru"], reread * 2, "one write per re-read event at most");
    assert!(dry["minutes"].as_f64().unwrap() > 0.0, "{dry:#}");
    // By time: every event is at or after 2000, so all 30 would be read again.
    let (status, by_time) = api
        .reset(
            &name,
            json!({ "group": "sync", "time": "2000-01-01T00:00:00Z", "dry_run": true }),
        )
        .await;
    assert_eq!(status, 200, "{by_time:#}");
    assert_eq!(by_time["events_reread"], 30, "{by_time:#}");
    assert_unmoved(&api, &name, &before, "a dry run moves nothing").await;

    // Bad targets: 400 naming the field, and still nothing moved.
    for (body, field) in [
        (json!({ "group": "nope", "to": "latest" }), "group"),
        (json!({ "group": "sync", "offset": 1_000_000 }), "offset"),
        (
            json!({ "group": "sync", "to": "latest", "topic": "x" }),
            "topic",
        ),
        (
            json!({ "group": "sync", "to": "latest", "partition": 9 }),
            "partition",
        ),
        (json!({ "slot": "0/1" }), "slot"),
        (json!({ "list": list, "to": "none" }), "list"),
        (
            json!({ "group": "sync", "to": "latest", "colour": 1 }),
            "colour",
        ),
    ] {
        let (status, p) = api.reset(&name, body.clone()).await;
        assert_eq!(status, 400, "{body}: {p:#}");
        assert_eq!(p["invalid-params"][0]["name"], field, "{body}: {p:#}");
    }
    let (status, p) = api.reset(&name, json!({ "slot": "0/1" })).await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("cannot move backwards"),
        "{status} {p:#}"
    );
    // The slot is held by the running capture: a real slot reset is refused, naming the stage.
    let (status, p) = api.reset(&name, json!({ "slot": "now" })).await;
    assert_eq!(status, 409, "{p:#}");
    assert_eq!(p["kind"], "stage_running");
    assert!(p["detail"].as_str().unwrap().contains("capture"), "{p:#}");
    let (status, slot_dry) = api
        .reset(&name, json!({ "slot": "now", "dry_run": true }))
        .await;
    assert_eq!(status, 200, "{slot_dry:#}");
    assert!(
        slot_dry["slot"]["skipped_bytes"].as_u64().is_some(),
        "{slot_dry:#}"
    );
    assert_unmoved(&api, &name, &before, "refusals move nothing").await;

    // The real reset: the same figures, measured when the offsets moved.
    let (status, real) = api.reset(&name, target).await;
    assert_eq!(status, 200, "{real:#}\n{}", h.run_log());
    assert_eq!(real["dry_run"], false);
    assert_eq!(real["events_reread"], dry["events_reread"], "{real:#}");
    assert_eq!(real["partitions"], dry["partitions"], "{real:#}");
    let run_id = real["run_id"].as_str().unwrap().to_string();

    // The restarted processor reads exactly those events again, and writes nothing.
    let after = caught_up(&h, &api).await;
    assert_eq!(committed(&after), committed(&before), "{after:#}");
    h.wait_for("the re-read events consumed", || async {
        consumed(&h, &topic).await.0 - records_before >= reread as f64
    })
    .await;
    // Settled: nothing more arrives after the re-read ones.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (records_after, events_after) = consumed(&h, &topic).await;
    assert_eq!(
        records_after - records_before,
        reread as f64,
        "records re-read"
    );
    assert_eq!(
        events_after - events_before,
        reread as f64,
        "change events processed"
    );
    assert_eq!(
        writes(&h.stats().await).1,
        writes_before,
        "the ledger absorbed every re-read event: no Graph write"
    );
    println!(
        "measured: dry run {reread} events to re-read; real reset {}; consumed {}; Graph writes +{}",
        real["events_reread"],
        records_after - records_before,
        writes(&h.stats().await).1 - writes_before
    );

    // The run: kind cursor_reset, by the token's name, with the counts.
    let run = wait_value(
        &h,
        &api,
        "the cursor_reset run projected",
        &format!("/runs/{run_id}"),
        |r| r["status"] == "succeeded",
    )
    .await;
    assert_eq!(run["kind"], "cursor_reset", "{run:#}");
    assert_eq!(run["by"], "ops", "{run:#}");
    assert_eq!(run["counts"]["reread"], reread, "{run:#}");
    assert_eq!(run["detail"]["target"]["role"], "sync", "{run:#}");

    // A group no running stage owns moves at once.
    let (status, dlq) = api
        .reset(&name, json!({ "group": "dlq-replay", "to": "earliest" }))
        .await;
    assert_eq!(status, 200, "{dlq:#}");
    assert_eq!(dlq["stage"], Value::Null);
    assert!(dlq["run_id"].as_str().is_some(), "{dlq:#}");

    // The CLI shows the cursors and dry-runs a reset through the same API.
    let f = file.to_str().unwrap();
    let env = [("SYNCBRIDGE_API_TOKEN", Some(TOKEN))];
    let (code, out, err) = cli_with_env(&["cursors", f, "--json"], &env).await;
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(committed(&shown), committed(&before));
    let (code, out, err) = cli_with_env(
        &[
            "cursors",
            "reset",
            f,
            "--group",
            "sync",
            "--shift-by",
            "-1",
            "--dry-run",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("dry run, nothing changed: group sync"),
        "{out}"
    );
    let (code, _, err) = cli_with_env(
        &["cursors", "reset", f, "--group", "nope", "--to", "latest"],
        &env,
    )
    .await;
    assert_eq!(code, 2, "a bad target exits 2: {err}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_delta_link_reset_reenumerates_the_list_without_writes() {
    hard_timeout(240, async {
        let (_meta, mut h, _t, list, file) = setup("cursl", 12, true, |h| h.embedded_log()).await;
        let name = h.name.clone();
        h.start(&file);
        let api = Api::new(&h);
        h.wait_for("12 items", || async { h.items(&list).await.len() == 12 })
            .await;
        let path = format!("/pipelines/{name}/cursors");
        h.wait_for("the list's delta link stored", || async {
            api.try_get(&path)
                .await
                .is_some_and(|c| c["lists"][0]["delta_link"] == true && sync_group(&c)["lag"] == 0)
        })
        .await;
        let c = api.try_get(&path).await.unwrap();
        let roles: Vec<&str> = c["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            ["sync", "return", "dlq-replay", "projector"],
            "{c:#}"
        );
        let projector = &c["groups"][3];
        assert!(projector["error"].is_null(), "{projector:#}");
        assert_eq!(projector["resettable"], false);
        assert!(
            projector["partitions"][0]["committed"].as_i64().unwrap() > 0,
            "{projector:#}"
        );
        let resyncs = || async {
            h.metric(
                "syncbridge_pull_resyncs_total",
                &[&format!("pipeline=\"{name}\""), "reason=\"operator\""],
            )
            .await
        };
        assert_eq!(resyncs().await, 0.0);
        let writes_before = writes(&h.stats().await).1;
        let items_received = || async {
            h.metric(
                "syncbridge_pull_items_received_total",
                &[&format!("pipeline=\"{name}\"")],
            )
            .await
        };
        // Our own creates come back through the delta feed (echoes): let them all arrive first
        // (five polls in a row with nothing new).
        let mut received_before = items_received().await;
        let mut quiet = 0;
        while quiet < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let now = items_received().await;
            quiet = if now == received_before { quiet + 1 } else { 0 };
            received_before = now;
        }

        let (status, dry) = api
            .reset(
                &name,
                json!({ "list": list, "to": "none", "dry_run": true }),
            )
            .await;
        assert_eq!(status, 200, "{dry:#}");
        assert_eq!(dry["items_reenumerated"], 12, "{dry:#}");
        assert_eq!(dry["ru"], 2, "one page of up to 200 items at 2 RU");
        let (status, real) = api.reset(&name, json!({ "list": list, "by": "ann" })).await;
        assert_eq!(status, 200, "{real:#}\n{}", h.run_log());
        assert!(real["resync_id"].as_str().is_some(), "{real:#}");
        assert_eq!(resyncs().await, 1.0);
        h.wait_for("the enumeration done and its link stored", || async {
            api.try_get(&path)
                .await
                .is_some_and(|c| c["lists"][0]["delta_link"] == true)
        })
        .await;
        let received = items_received().await - received_before;
        assert_eq!(received, 12.0, "the enumeration read every item once");
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(
            writes(&h.stats().await).1,
            writes_before,
            "unchanged items cause no write"
        );
        let run_path = format!("/runs/{}", real["run_id"].as_str().unwrap());
        let run = wait_value(&h, &api, "the cursor_reset run projected", &run_path, |r| {
            r["status"] == "succeeded"
        })
        .await;
        assert_eq!(run["by"], "ann", "{run:#}");
        assert_eq!(run["detail"]["items_reenumerated"], 12, "{run:#}");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_moves_forward_while_capture_does_not_hold_it() {
    hard_timeout(240, async {
        let (_meta, mut h, t, list, file) = setup("cursp", 3, false, |h| h.embedded_log()).await;
        let name = h.name.clone();
        h.start(&file);
        let api = Api::new(&h);
        h.wait_for("3 items", || async { h.items(&list).await.len() == 3 })
            .await;
        let slot = format!("sb_{name}");
        // Capture reconnects on its own: end its walsender and reset in the gap, retrying the
        // whole step until a reset lands (each refusal changes nothing).
        let mut moved = None;
        for _ in 0..100 {
            h.sql(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND active_pid IS NOT NULL"
            ))
            .await;
            let (status, body) = api
                .reset(&name, json!({ "slot": "now", "by": "ann" }))
                .await;
            match status {
                200 => {
                    moved = Some(body);
                    break;
                }
                409 => assert_eq!(body["kind"], "stage_running", "{body:#}"),
                _ => panic!("{status}: {body:#}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let moved = moved.expect("a reset landed while capture reconnected");
        let to = moved["slot"]["to_lsn"].as_str().unwrap().to_string();
        let row =
            h.db.query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot, &to],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "the slot is at {to} or later");
        assert!(moved["run_id"].as_str().is_some(), "{moved:#}");
        // Capture streams on from the moved slot.
        h.sql(&format!("INSERT INTO public.{t} VALUES (4, 'row 4')"))
            .await;
        h.wait_for("the row inserted after the move", || async {
            h.items(&list).await.len() == 4
        })
        .await;
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_while_paused_applies_and_the_pipeline_stays_paused_until_resumed() {
    hard_timeout(240, async {
        let mut h = Harness::new("cursz").await;
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text, link text);
             INSERT INTO public.{t} SELECT g, 'row ' || g, 'https://example.com/' || g
               FROM generate_series(1, 30) g;"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        // Every write is rejected (hyperlinks, graph-api.md §5.7): a dead-letter storm pauses.
        h.emulator_limits(json!({ "hyperlink_writes": false }))
            .await;
        let list = format!("Z {}", h.name);
        let file = h.pipeline(
            &h.embedded_log(),
            &format!(
                "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      link: {{ field: Link, type: hyperlink }}\n    pull: {{ enabled: false }}"
            ),
        );
        h.start(&file);
        let pause_path = format!("/pipelines/{}/pause", h.name);
        let api = Api {
            base: format!("http://127.0.0.1:{}", h.control_port),
            client: reqwest::Client::new(),
        };
        wait_value(&h, &api, "the pause", &pause_path, |p| p["paused"] == true).await;

        // Skip every held event: the reset is granted at once (the processor is stopped).
        let (status, moved) = api
            .reset(&h.name, json!({ "group": "sync", "to": "latest" }))
            .await;
        assert_eq!(status, 200, "{moved:#}\n{}", h.run_log());
        assert_eq!(moved["events_skipped"], 30, "{moved:#}");
        let still = api.try_get(&pause_path).await.unwrap();
        assert_eq!(still["paused"], true, "a reset does not resume: {still:#}");
        let run = wait_value(
            &h,
            &api,
            "the cursor_reset run",
            &format!("/runs/{}", moved["run_id"].as_str().unwrap()),
            |r| r["status"] == "succeeded",
        )
        .await;
        assert_eq!(run["by"], "anonymous (open API)", "{run:#}");

        // After the fix and the resume, the skipped events stay skipped; new ones sync.
        h.emulator_limits(json!({ "hyperlink_writes": true })).await;
        let (code, out, err) = h.cli(&["resume", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "resume: {out}{err}");
        h.sql(&format!(
            "INSERT INTO public.{t} VALUES (31, 'row 31', 'https://example.com/31')"
        ))
        .await;
        h.wait_for("the row inserted after the resume", || async {
            h.items(&list).await.len() == 1
        })
        .await;
        let items = h.items(&list).await;
        assert_eq!(items[0].1["Title"], "row 31", "{items:?}");
        h.stop().await;
    })
    .await;
}
