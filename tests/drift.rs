//! Drift detection and heal (issue 14) on the real stack and the emulator.
//!
//! The vanished-list case: a pipeline synced its table, stopped, and the Graph emulator restarted
//! empty (it runs in memory). At the next start provisioning re-creates the list under a new id;
//! the ledger still names the old one. The pipeline must notice before its first write, drop
//! the stale entries, re-create every item, and record one `drift_heal` run.
//!
//! Needs `DATABASE_URL` (superuser). A test FAILS (never skips) when it is unset.

use serde_json::Value;
use syncbridge::emulator::{self, EmulatorArgs};

mod common;
#[path = "common/harness.rs"]
mod harness;
use common::TempDatabase as MetaDatabase;
use harness::{Harness, hard_timeout};

/// Stops the harness's emulator and starts an empty one on the same address.
async fn restart_emulator_empty(h: &mut Harness) {
    let addr = h.emu.addr;
    let placeholder = emulator::spawn(EmulatorArgs::default()).await.unwrap();
    std::mem::replace(&mut h.emu, placeholder)
        .stop()
        .await
        .unwrap();
    let fresh = emulator::spawn(EmulatorArgs {
        listen: addr,
        ..EmulatorArgs::default()
    })
    .await
    .unwrap();
    std::mem::replace(&mut h.emu, fresh).stop().await.unwrap();
    h.site = h
        .graph
        .resolve_site(emulator::DEFAULT_SITE)
        .await
        .unwrap()
        .id;
}

/// `GET /runs?query` on the process's control plane, `None` while it is not listening yet.
async fn try_runs(h: &Harness, query: &str) -> Option<Vec<Value>> {
    let body: Value = h
        .admin
        .get(format!("http://127.0.0.1:{}/runs?{query}", h.control_port))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["runs"].as_array().cloned()
}

/// The list's `(SyncKey, Title)` pairs, sorted.
async fn list_titles(h: &Harness, list: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = h
        .items(list)
        .await
        .into_iter()
        .map(|(k, f)| (k, f["Title"].as_str().unwrap_or("").to_string()))
        .collect();
    out.sort();
    out
}

/// The table's `(id, title)` pairs as SyncKey/Title, sorted like [`list_titles`].
async fn table_titles(h: &Harness, t: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        h.db.query(&format!("SELECT id::text, title FROM public.{t}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_list_is_recreated_with_its_items_at_start_in_one_drift_run() {
    hard_timeout(300, async {
        let meta_db = MetaDatabase::create("sbdrift").await;
        let mut h = Harness::new("drift").await;
        let (t, list) = h.titled_table(20).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}  meta_url: {}\n", meta_db.url)).unwrap();
        let all = format!("pipeline={}", h.name);
        let heals = format!("{all}&kind=drift_heal");

        h.start(&file);
        h.wait_for("20 items", || async { h.items(&list).await.len() == 20 })
            .await;
        let first_list = h.list_id(&list).await;
        h.stop().await;

        // The emulator restarts empty: the list and its 20 items are gone.
        restart_emulator_empty(&mut h).await;
        assert!(h.items(&list).await.is_empty(), "the new emulator is empty");
        // A change made while the pipeline was down reaches the re-created list too.
        h.sql(&format!("UPDATE public.{t} SET title = 'changed' WHERE id = 7"))
            .await;

        h.start(&file);
        let want = table_titles(&h, &t).await;
        h.wait_for("table == list again", || async {
            list_titles(&h, &list).await == want
        })
        .await;
        assert_ne!(h.list_id(&list).await, first_list, "the list was re-created");
        h.wait_for("one succeeded drift_heal run", || async {
            try_runs(&h, &heals).await.is_some_and(|runs| {
                runs.len() == 1
                    && runs[0]["status"] == "succeeded"
                    && runs[0]["counts"]["stale_ledger"] == 20
                    && runs[0]["counts"]["rows"] == 20
            })
        })
        .await;
        assert!(
            h.run_log().contains("ledger named lists that no longer exist"),
            "the heal is logged:\n{}",
            h.run_log()
        );
        // The healed ledger is live: a later change is written to the new item.
        h.sql(&format!("UPDATE public.{t} SET title = 'later' WHERE id = 3"))
            .await;
        h.wait_for("the later change", || async {
            h.item(&list, "3")
                .await
                .is_some_and(|f| f["Title"] == "later")
        })
        .await;
        h.stop().await;

        // A start with nothing vanished heals nothing: still one drift run.
        h.start(&file);
        h.wait_for("the second stream run", || async {
            try_runs(&h, &format!("{all}&kind=stream"))
                .await
                .is_some_and(|runs| runs.len() == 3)
        })
        .await;
        assert_eq!(try_runs(&h, &heals).await.unwrap().len(), 1);
        assert_eq!(list_titles(&h, &list).await, table_titles(&h, &t).await);
        h.stop().await;
    })
    .await;
}
