//! The accidental-delete guard, push direction, end to end (issue 21 item 5): `DELETE FROM` of
//! 1,000 synced rows pauses the deletes before any reaches the list while inserts and updates
//! still flow; the pause shows in `/ready`, `/metrics` and `syncbridge guard`; it survives a
//! restart; `allow` deletes all 1,000 items; a second round with `discard` leaves the 1,000
//! items in place, and a key inserted again afterwards updates its existing item.
//!
//! Needs `DATABASE_URL` (`eval "$(cat /work/devstack.env)"`); the harness runs its own emulator.

use serde_json::Value;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, app_calls, hard_timeout};

/// `guard.push` of the test: the default rules (threshold: 10 % of the managed items, at least
/// 100, at most 500), a 2 s hold.
const GUARD: &str =
    "guard:\n  push: { max_deletes: 500, max_percent: 10, window_ms: 60000, hold_ms: 2000 }\n";

async fn guard_cli(h: &Harness, file: &std::path::Path, action: &str) -> (i32, String, String) {
    h.cli(&[
        "guard",
        file.to_str().unwrap(),
        action,
        "--direction",
        "push",
    ])
    .await
}

/// `GET /pipelines/{name}/guard`'s push direction, `None` while the process is not up.
async fn push_status(h: &Harness) -> Option<Value> {
    direction_status(h, "push").await
}

/// `GET /pipelines/{name}/guard`'s `direction`, `None` while the process is not up.
async fn direction_status(h: &Harness, direction: &str) -> Option<Value> {
    let url = format!(
        "http://127.0.0.1:{}/pipelines/{}/guard",
        h.control_port, h.name
    );
    let r = reqwest::get(url).await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let body: Value = r.json().await.ok()?;
    Some(body[direction].clone())
}

async fn wait_paused(h: &Harness, held: u64) {
    wait_direction_paused(h, "push", held).await;
}

async fn wait_direction_paused(h: &Harness, direction: &str, held: u64) {
    h.wait_for(
        &format!("the {direction} direction paused with {held} held deletes"),
        || async {
            direction_status(h, direction)
                .await
                .is_some_and(|s| s["paused"] == true && s["held"] == held)
        },
    )
    .await;
}

async fn ready(h: &Harness) -> (u16, Value) {
    let r = reqwest::get(format!("http://127.0.0.1:{}/ready", h.control_port))
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn count(h: &Harness, list: &str) -> usize {
    h.items(list).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_delete_pauses_until_allowed_or_discarded() {
    hard_timeout(600, async {
        let mut h = Harness::new("guard").await;
        // 1..=1010: 1,000 to delete, 10 that stay and are updated meanwhile.
        let (t, list) = h.titled_table(1010).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}{GUARD}")).unwrap();
        h.start(&file);
        h.wait_for_secs("1,010 items", 180, || async { count(&h, &list).await == 1010 })
            .await;
        let (code, _, err) = guard_cli(&h, &file, "allow").await;
        assert_eq!(code, 2, "nothing to allow yet: {err}");

        // Round 1: a mass delete, then other changes that must keep flowing.
        let deletes_before = app_calls(&h.stats().await, "DELETE");
        h.sql(&format!("DELETE FROM public.{t} WHERE id <= 1000")).await;
        h.sql(&format!(
            "UPDATE public.{t} SET title = 'after the delete' WHERE id = 1001;
             INSERT INTO public.{t} VALUES (2001, 'inserted while paused')"
        ))
        .await;
        wait_paused(&h, 1000).await;
        h.wait_for("the update and the insert", || async {
            let a = h.item(&list, "1001").await;
            let b = h.item(&list, "2001").await;
            a.is_some_and(|i| i["Title"] == "after the delete") && b.is_some()
        })
        .await;
        let deleted = app_calls(&h.stats().await, "DELETE") - deletes_before;
        assert!(deleted <= 100, "{deleted} deletes reached the list (threshold 100)");
        assert_eq!(count(&h, &list).await, 1011 - deleted as usize);
        let (status, body) = ready(&h).await;
        assert_eq!(status, 503, "{body}");
        let reason = body["reasons"][format!("{}/guard.push", h.name)]
            .as_str()
            .unwrap_or_default();
        assert!(reason.contains("1000 deletes"), "{body}");
        let held = h
            .metric("syncbridge_guard_deletes_held", &[&h.name, "direction=\"push\""])
            .await;
        assert_eq!(held, 1000.0);
        let (code, out, err) = guard_cli(&h, &file, "status").await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("PAUSED") && out.contains("1000 deletes held"), "{out}");
        assert!(out.contains(&format!("public.{t}/1\n")), "first keys shown: {out}");
        // Bad input changes nothing: an unknown direction is refused, naming the parameter.
        let r = h
            .admin
            .post(format!(
                "http://127.0.0.1:{}/pipelines/{}/guard/sideways/allow",
                h.control_port, h.name
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["invalid-params"][0]["name"], "direction", "{problem}");

        // A restart while paused: the held deletes are read again from the log and held again.
        h.stop().await;
        h.start(&file);
        wait_paused(&h, 1000).await;
        assert_eq!(count(&h, &list).await, 1011 - deleted as usize);

        let (code, out, err) = guard_cli(&h, &file, "allow").await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("allow applied to 1000 held deletes"), "{out}");
        h.wait_for_secs("the 1,000 items deleted", 180, || async {
            count(&h, &list).await == 11
        })
        .await;
        let (status, body) = ready(&h).await;
        assert_eq!(status, 200, "ready again: {body}");
        // A few deletes, well under the threshold, go through after their hold.
        h.sql(&format!("DELETE FROM public.{t} WHERE id BETWEEN 1002 AND 1006"))
            .await;
        h.wait_for("5 deletes under the threshold", || async {
            count(&h, &list).await == 6
        })
        .await;

        // Round 2: 1,000 new rows, deleted, then discarded: the items stay.
        h.sql(&format!(
            "INSERT INTO public.{t} SELECT g, 'row ' || g FROM generate_series(3001, 4000) g"
        ))
        .await;
        h.wait_for_secs("1,006 items", 180, || async {
            count(&h, &list).await == 1006
        })
        .await;
        let deletes_before = app_calls(&h.stats().await, "DELETE");
        h.sql(&format!("DELETE FROM public.{t} WHERE id BETWEEN 3001 AND 4000")).await;
        wait_paused(&h, 1000).await;
        let (code, out, err) = guard_cli(&h, &file, "discard").await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("discard applied to 1000 held deletes"), "{out}");
        h.wait_for("the guard flowing again", || async {
            push_status(&h).await.is_some_and(|s| s["paused"] == false && s["held"] == 0)
        })
        .await;
        // A key inserted again updates its existing item (the ledger still knows it).
        h.sql(&format!("INSERT INTO public.{t} VALUES (3001, 'back again')")).await;
        h.wait_for("3001 updated in place", || async {
            h.item(&list, "3001").await.is_some_and(|i| i["Title"] == "back again")
        })
        .await;
        assert_eq!(count(&h, &list).await, 1006, "the discarded deletes left the items");
        let deleted = app_calls(&h.stats().await, "DELETE") - deletes_before;
        assert!(deleted <= 100, "{deleted} deletes reached the list");
        // After a restart nothing of the discarded batch comes back.
        h.stop().await;
        h.start(&file);
        h.wait_for("the process up again", || async { push_status(&h).await.is_some() })
            .await;
        // Changes made now are read after whatever was not acknowledged before the restart.
        h.sql(&format!("UPDATE public.{t} SET title = 'marker' WHERE id > 1000"))
            .await;
        h.wait_for("the marker updates", || async {
            let items = h.items(&list).await;
            items.iter().filter(|(_, f)| f["Title"] == "marker").count() == 7
        })
        .await;
        let s = push_status(&h).await.unwrap();
        assert_eq!((s["paused"].clone(), s["held"].clone()), (false.into(), 0.into()), "{s}");
        assert_eq!(count(&h, &list).await, 1006);
        h.stop().await;
    })
    .await;
}

/// Rows left in `table`.
async fn rows(h: &Harness, table: &str) -> i64 {
    h.db.query_one(&format!("SELECT count(*) FROM public.{table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Deletes the items with SyncKeys `keys` as a person would (in the browser).
async fn person_delete_all(h: &Harness, list: &str, keys: std::ops::RangeInclusive<u32>) {
    let list_id = h.list_id(list).await;
    let items = h.items(list).await;
    let wanted: std::collections::HashSet<String> = keys.map(|k| k.to_string()).collect();
    for (key, fields) in items {
        if wanted.contains(&key) {
            let id = fields["id"].as_str().unwrap();
            h.person
                .delete_item(&h.site, &list_id, id, None)
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_delete_in_the_list_pauses_until_allowed_or_discarded() {
    hard_timeout(600, async {
        let mut h = Harness::new("guardpull").await;
        let (t, list) = h.titled_table(1010).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: true, interval_ms: 500, on_delete: delete }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        let guard = "guard:\n  pull: { window_ms: 60000, hold_ms: 2000 }\n";
        std::fs::write(&file, format!("{yaml}{guard}")).unwrap();
        h.start(&file);
        h.wait_for_secs("1,010 items", 180, || async { count(&h, &list).await == 1010 })
            .await;

        // Round 1: a person deletes 1,000 items; other changes keep flowing both ways.
        person_delete_all(&h, &list, 1..=1000).await;
        wait_direction_paused(&h, "pull", 1000).await;
        h.sql(&format!("UPDATE public.{t} SET title = 'pushed while paused' WHERE id = 1001"))
            .await;
        h.person_edit(&list, "1002", serde_json::json!({ "Title": "pulled while paused" }))
            .await;
        h.wait_for("the push and the pull", || async {
            let pushed = h.item(&list, "1001").await;
            let pulled: Option<String> = h
                .db
                .query_opt(&format!("SELECT title FROM public.{t} WHERE id = 1002"), &[])
                .await
                .unwrap()
                .map(|r| r.get(0));
            pushed.is_some_and(|i| i["Title"] == "pushed while paused")
                && pulled.as_deref() == Some("pulled while paused")
        })
        .await;
        let left = rows(&h, &t).await;
        assert!(left >= 1010 - 101, "{} rows deleted (threshold 101)", 1010 - left);
        let (status, body) = ready(&h).await;
        assert_eq!(status, 503, "{body}");
        let reason = body["reasons"][format!("{}/guard.pull", h.name)]
            .as_str()
            .unwrap_or_default();
        assert!(reason.contains("1000 deletes bound for the tables"), "{body}");
        let (code, out, err) = h
            .cli(&["guard", file.to_str().unwrap(), "status", "--direction", "pull"])
            .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("pull: PAUSED, 1000 deletes held"), "{out}");
        // A restart while paused: the list changes are read again and held again.
        h.stop().await;
        h.start(&file);
        wait_direction_paused(&h, "pull", 1000).await;
        assert_eq!(rows(&h, &t).await, left, "no row deleted by the restart");

        let (code, out, err) = h
            .cli(&["guard", file.to_str().unwrap(), "allow", "--direction", "pull"])
            .await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("allow applied to 1000 held deletes"), "{out}");
        h.wait_for_secs("the 1,000 rows deleted", 120, || async { rows(&h, &t).await == 10 })
            .await;

        // Round 2: 1,000 new rows, their items deleted in the list, discarded: re-created.
        h.sql(&format!(
            "INSERT INTO public.{t} SELECT g, 'row ' || g FROM generate_series(3001, 4000) g"
        ))
        .await;
        h.wait_for_secs("1,010 items again", 180, || async {
            count(&h, &list).await == 1010
        })
        .await;
        person_delete_all(&h, &list, 3001..=4000).await;
        wait_direction_paused(&h, "pull", 1000).await;
        let (code, out, err) = h
            .cli(&["guard", file.to_str().unwrap(), "discard", "--direction", "pull"])
            .await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("discard applied to 1000 held deletes"), "{out}");
        h.wait_for_secs("the 1,000 items re-created from their rows", 180, || async {
            let items = h.items(&list).await;
            let back = items
                .iter()
                .filter(|(_, f)| f["SyncKey"].as_str().and_then(|k| k.parse::<u32>().ok()).is_some_and(|k| k > 3000))
                .count();
            back == 1000 && items.len() == 1010
        })
        .await;
        assert_eq!(rows(&h, &t).await, 1010, "no row deleted by the discarded batch");
        let (status, body) = ready(&h).await;
        assert_eq!(status, 200, "ready again: {body}");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_move_out_of_a_list_counts_as_deletes_there() {
    hard_timeout(300, async {
        let mut h = Harness::new("guardmove").await;
        let (t, main) = h.titled_table(300).await;
        let archive = format!("A {}", h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {main}\n    fields: {{ title: Title }}\n    routes:\n      - when: \"title == 'archive'\"\n        list: {archive}\n    pull: {{ enabled: false }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        // Threshold: max_deletes 50 (10 % of 300 is below the floor of 100).
        let guard = "guard:\n  push: { max_deletes: 50, hold_ms: 2000 }\n";
        std::fs::write(&file, format!("{yaml}{guard}")).unwrap();
        h.start(&file);
        h.wait_for_secs("300 items", 120, || async { count(&h, &main).await == 300 })
            .await;
        h.sql(&format!("UPDATE public.{t} SET title = 'archive'")).await;
        wait_paused(&h, 300).await;
        let moved = count(&h, &archive).await;
        assert!(moved <= 50, "{moved} items moved (threshold 50)");
        assert_eq!(count(&h, &main).await, 300 - moved);
        let (code, out, err) = guard_cli(&h, &file, "allow").await;
        assert_eq!(code, 0, "{out}{err}");
        h.wait_for_secs("the 300 items moved", 120, || async {
            count(&h, &archive).await == 300 && count(&h, &main).await == 0
        })
        .await;
        h.stop().await;
    })
    .await;
}
