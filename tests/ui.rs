//! The admin UI end to end (issue 16): the real `syncbridge run` binary with the UI built in, on
//! the stack's PostgreSQL, an in-process Graph emulator and a meta-store, driven in headless
//! Chromium by `src/control/ui/tests/e2e.mjs` (playwright-core).
//!
//! This test prepares what the browser then works on: a two-way pipeline with a `read` and an
//! `operate` token, a parked conflict (row 1 edited on both sides while the process was down), one
//! dead letter (Graph refuses a hyperlink until the emulator allows it again), an orphaned item
//! (drift), more rows than a ledger page, a write workload while the browser watches, a pulled
//! list whose delta link gets reset. The script signs in, sees the events count move, opens a
//! row's lineage, resolves the conflict, replays the dead letter, runs a drift dry run and heals
//! after confirming, resets the delta link and a consumer group after their dry runs, pages
//! through the ledger, edits the mapping (adds a field, sees a change with problems refused,
//! removes a field), failing on any browser console error; its screenshots go to
//! `target/ui-e2e/<pipeline>/`. Afterwards this test checks the effects through the database, the
//! emulator and the run history.
//!
//! Needs the stack (`DATABASE_URL`) and, in `src/control/ui`, `npm ci && npm run build` before
//! the binary was built (ops/test does both). Skipped with a message only when `node` (20.19+,
//! Vite's minimum) or a Chromium is missing on the machine; a missing UI build or `node_modules`
//! fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase;
use harness::{Harness, hard_timeout};

const OPERATE: &str = "ui-op-5c1e0b7d";
const READ: &str = "ui-rd-9a4f2c61";
/// The mapping editor saves the pipeline file.
const WRITES: &[&str] = &["--allow-config-writes"];

/// An executable named `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `CHROMIUM`, else Debian's `chromium` (or `chromium-browser`) on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    which("chromium").or_else(|| which("chromium-browser"))
}

/// Node.js 20.19 or later (Vite's minimum; ops/ui-build skips the UI build below it).
fn recent_node(node: &Path) -> bool {
    let Ok(out) = std::process::Command::new(node)
        .args(["-p", "process.versions.node"])
        .output()
    else {
        return false;
    };
    let v = String::from_utf8_lossy(&out.stdout);
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major > 20 || (major == 20 && minor >= 19)
}

fn ui_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/control/ui")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_ui_operates_a_running_pipeline_in_chromium() {
    let node = which("node").filter(|n| recent_node(n));
    let (Some(node), Some(chromium)) = (node, chromium()) else {
        eprintln!(
            "SKIPPED tests/ui.rs: needs `node` (Node.js 20.19+) and Chromium (Debian `chromium`, \
             or CHROMIUM=/path) on this machine"
        );
        return;
    };
    assert!(
        ui_dir().join("node_modules/playwright-core").is_dir(),
        "run `npm ci && npm run build` in src/control/ui, then build again (ops/test does)"
    );
    hard_timeout(420, async {
        let meta = TempDatabase::create("sbui").await;
        let mut h = Harness::new("ui").await;
        let (t, list, file) = setup(&mut h, &meta).await;
        let base = format!("http://127.0.0.1:{}", h.control_port);
        assert_ui_is_built(&h, &base).await;
        make_a_parked_conflict(&mut h, &t, &list, &file).await;
        make_a_dead_letter(&h, &t).await;
        make_an_orphan(&h, &list).await;

        // A write workload while the browser watches the counts.
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(workload(h.source_url.clone(), t.clone(), stop.clone()));
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/ui-e2e/{}", h.name));
        let script = tokio::process::Command::new(&node)
            .arg(ui_dir().join("tests/e2e.mjs"))
            .current_dir(ui_dir())
            .env("SB_URL", &base)
            .env("SB_TOKEN", OPERATE)
            .env("SB_READ_TOKEN", READ)
            .env("SB_PIPELINE", &h.name)
            .env("SB_TABLE", format!("public.{t}"))
            .env("SB_KEY", "2")
            .env("SB_CONFLICT_KEY", "1")
            .env("SB_LIST", &list)
            .env("CHROMIUM", &chromium)
            .env("OUT_DIR", &out)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run node");
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&script.stdout),
            String::from_utf8_lossy(&script.stderr)
        );
        println!("{said}");
        assert!(
            script.status.success(),
            "e2e.mjs failed ({}):\n{said}\nsyncbridge log:\n{}",
            script.status,
            common_tail(&h)
        );
        assert!(
            said.contains("e2e: all steps passed, no console error"),
            "{said}"
        );
        assert_effects(&h, &t, &list, &file).await;
        h.stop().await;
    })
    .await;
}

/// Rows of the table at start: more than one ledger page (50), so the browser pages through it.
const ROWS: usize = 65;

/// Table `<name>_t` (id, title, link, note) with [`ROWS`] rows, synced two-way with list `T <name>`, Title
/// parked on conflict; both tokens; the meta-store for runs and lineage. Started; [`ROWS`] items.
async fn setup(h: &mut Harness, meta: &TempDatabase) -> (String, String, PathBuf) {
    let t = h.t("t");
    h.sql(&format!(
        "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, link text, note text);
         INSERT INTO public.{t} (id, title, note) SELECT g, 'row ' || g, 'note ' || g FROM generate_series(1, {ROWS}) g;"
    ))
    .await;
    h.tables.push(format!("public.{t}"));
    let list = format!("T {}", h.name);
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      link: {{ field: Link, type: hyperlink }}\n    conflict: manual\n    pull: {{ enabled: true, interval_ms: 300 }}"
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    let mut yaml = std::fs::read_to_string(&file).unwrap();
    yaml.push_str(&format!(
        "  meta_url: {}\n  tokens:\n    - {{ name: ops, token: {OPERATE}, role: operate }}\n    - {{ name: dashboard, token: {READ}, role: read }}\n",
        meta.url
    ));
    std::fs::write(&file, yaml).unwrap();
    h.emulator_limits(json!({ "hyperlink_writes": true })).await;
    h.start_with(&file, WRITES);
    h.wait_for("the items", || async { h.items(&list).await.len() == ROWS })
        .await;
    (t, list, file)
}

async fn assert_ui_is_built(h: &Harness, base: &str) {
    let resp = h.admin.get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "/ui is the not-built page: run `npm ci && npm run build` in src/control/ui, then build \
         syncbridge again (ops/test does)"
    );
}

/// Row 1's title changes in the database and in the list while the process is down, so the
/// return path meets both at the next start and parks the conflict (`conflict: manual`).
async fn make_a_parked_conflict(h: &mut Harness, t: &str, list: &str, file: &Path) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.stop().await;
    h.sql(&format!(
        "UPDATE public.{t} SET title = 'db side' WHERE id = 1"
    ))
    .await;
    h.person_edit(list, "1", json!({ "Title": "list side" }))
        .await;
    h.start_with(file, WRITES);
    h.wait_for("the parked conflict", || async {
        h.metric("syncbridge_pull_conflicts_total", &["outcome=\"parked\""])
            .await
            >= 1.0
    })
    .await;
}

/// Graph refuses hyperlink writes for a moment: row 100 becomes a dead letter; then the emulator
/// accepts them again, so the UI's replay writes it.
async fn make_a_dead_letter(h: &Harness, t: &str) {
    h.emulator_limits(json!({ "hyperlink_writes": false }))
        .await;
    h.sql(&format!(
        "INSERT INTO public.{t} (id, title, link) VALUES (100, 'dead letter', 'https://example.com/ui')"
    ))
    .await;
    h.wait_for("the dead letter", || async {
        h.metric("syncbridge_push_dead_letters_total", &[]).await >= 1.0
    })
    .await;
    h.emulator_limits(json!({ "hyperlink_writes": true })).await;
}

/// The SyncKey of an item no row has: the drift check reports it orphaned, the heal deletes it.
const ORPHAN: &str = "999999";

/// An item with a SyncKey no row has, created with the app's own identity (so the return path
/// takes it for its own write and does not pull it into the table).
async fn make_an_orphan(h: &Harness, list: &str) {
    let id = h.list_id(list).await;
    let fields = json!({ "SyncKey": ORPHAN, "Title": "orphan" });
    h.graph
        .create_item(&h.site, &id, fields.as_object().unwrap())
        .await
        .unwrap();
}

/// Inserts a row every 300 ms until `stop` (ids from 1000), on a connection of its own.
async fn workload(url: String, t: String, stop: Arc<AtomicBool>) {
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut id: i64 = 1000;
    while !stop.load(Ordering::Relaxed) {
        c.execute(
            &format!("INSERT INTO public.{t} (id, title) VALUES ($1, 'load')"),
            &[&id],
        )
        .await
        .unwrap();
        id += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What the browser did, seen from outside it.
async fn assert_effects(h: &Harness, t: &str, list: &str, file: &Path) {
    // The conflict: resolved by `ops`, the database's title kept on both sides.
    let conflicts = api(h, &format!("/pipelines/{}/conflicts", h.name)).await;
    let conflicts = conflicts.as_array().expect("a list of conflicts");
    let c = conflicts
        .iter()
        .find(|c| c["key"] == "1")
        .expect("row 1's conflict");
    assert_eq!(c["state"], "resolved", "{c:#}");
    assert_eq!(c["resolution"]["resolved_by"], "ops", "{c:#}");
    h.wait_for("row 1's item keeps the database's title", || async {
        h.item(list, "1")
            .await
            .is_some_and(|f| f["Title"] == "db side")
    })
    .await;
    // The replayed dead letter reached the list.
    h.wait_for("the replayed row 100", || async {
        h.item(list, "100").await.is_some()
    })
    .await;
    // Each action is a run, by the token that did it.
    let runs = |kind: &'static str| async move {
        let page = api(h, &format!("/runs?pipeline={}&kind={kind}", h.name)).await;
        page["runs"].as_array().cloned().unwrap_or_default()
    };
    // Runs reach GET /runs through the run projector: wait until each kind is there.
    for kind in ["dlq_replay", "drift_check", "drift_heal", "cursor_reset"] {
        h.wait_for(&format!("a {kind} run"), || async {
            !runs(kind).await.is_empty()
        })
        .await;
    }
    assert_eq!(runs("dlq_replay").await.len(), 1);
    h.wait_for("both cursor resets", || async {
        runs("cursor_reset").await.len() >= 2
    })
    .await;
    let resets = runs("cursor_reset").await;
    assert_eq!(
        resets.len(),
        2,
        "two real resets, the delta link and the group (the dry runs are none): {resets:#?}"
    );
    assert!(resets.iter().all(|r| r["by"] == "ops"), "{resets:#?}");
    // The heal deleted the orphaned item.
    assert!(
        h.item(list, ORPHAN).await.is_none(),
        "the orphan is still in the list"
    );
    // The mapping editor added `note: Note`: the file holds it with its secrets intact, the GET
    // shows it without them, and the reload's re-snapshot filled the new field.
    // Then removed `link`, and a change with problems (Title as a number) was not written.
    let yaml = std::fs::read_to_string(file).unwrap();
    assert!(yaml.contains("note: { field: Note"), "{yaml}");
    assert!(
        !yaml.contains("field: Link") && !yaml.contains("type: number"),
        "{yaml}"
    );
    assert!(
        yaml.contains(OPERATE) && !yaml.contains("<redacted:"),
        "{yaml}"
    );
    let shown = api(h, &format!("/pipelines/{}/config", h.name)).await;
    let shown_yaml = shown["yaml"].as_str().unwrap();
    for secret in [OPERATE, READ, syncbridge::emulator::DEFAULT_CLIENT_SECRET] {
        assert!(!shown_yaml.contains(secret), "secret shown: {shown_yaml}");
    }
    h.wait_for("the new Note field on row 2's item", || async {
        h.item(list, "2")
            .await
            .is_some_and(|f| f["Note"] == "note 2")
    })
    .await;
    let rows: i64 =
        h.db.query_one(&format!("SELECT count(*) FROM public.{t}"), &[])
            .await
            .unwrap()
            .get(0);
    assert!(
        rows > 6,
        "the workload wrote while the browser watched: {rows} rows"
    );
}

/// `GET path` on the process's API with the read token.
async fn api(h: &Harness, path: &str) -> Value {
    let url = format!("http://127.0.0.1:{}{path}", h.control_port);
    let resp = h.admin.get(url).bearer_auth(READ).send().await.unwrap();
    resp.json().await.unwrap()
}

fn common_tail(h: &Harness) -> String {
    let log = h.run_log();
    // Without the replication client's status lines (two a second).
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("pg_walstream"))
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
