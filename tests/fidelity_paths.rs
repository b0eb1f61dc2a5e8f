//! Mapping fidelity (issue 12) beyond value conversions, on the real stack: field directions,
//! SharePoint system fields written into columns, unchanged TOASTed values across a restart,
//! coalescing, and list values the database refuses.
//!
//! Needs `DATABASE_URL`: `eval "$(cat /work/devstack.env)"` or `eval "$(ops/stack env)"`.

use std::time::Duration;

use serde_json::{Map, Value, json};

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, app_calls as app, app_writes, hard_timeout};

/// Creates the table `<name>_t` with `columns` (after `id bigint PRIMARY KEY`), inserts `rows`
/// (SQL value lists), starts a pipeline syncing it two-way with list `T <name>` by `fields`
/// (YAML lines under `fields:`), waits for the items.
async fn start(tag: &str, columns: &str, rows: &[&str], fields: &str) -> (Harness, String, String) {
    start_routed(tag, columns, rows, fields, "", rows.len()).await
}

/// [`start`] with `routes` (YAML lines under `routes:`, may be empty; `{name}` stands for the
/// harness name); waits for `in_list` items in `T <name>`.
async fn start_routed(
    tag: &str,
    columns: &str,
    rows: &[&str],
    fields: &str,
    routes: &str,
    in_list: usize,
) -> (Harness, String, String) {
    let mut h = Harness::new(tag).await;
    let t = h.t("t");
    let mut sql = format!("CREATE TABLE public.{t} (id bigint PRIMARY KEY, {columns});");
    for r in rows {
        sql.push_str(&format!("INSERT INTO public.{t} VALUES ({r});"));
    }
    h.sql(&sql).await;
    h.tables.push(format!("public.{t}"));
    let list = format!("T {}", h.name);
    let routes = if routes.is_empty() {
        String::new()
    } else {
        format!("    routes:\n{}", routes.replace("{name}", &h.name))
    };
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields:\n{fields}{routes}    pull: {{ enabled: true, interval_ms: 200 }}"
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    h.start(&file);
    let (l, n) = (list.clone(), in_list);
    h.wait_for("the initial items", || async {
        h.items(&l).await.len() == n
    })
    .await;
    // Let the creates' echoes pass the return path.
    tokio::time::sleep(Duration::from_millis(800)).await;
    (h, t, list)
}

async fn text(h: &Harness, t: &str, col: &str, id: i64) -> Option<String> {
    h.db.query_one(
        &format!("SELECT {col}::text FROM public.{t} WHERE id = $1"),
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Dead letters not yet replayed (`syncbridge dlq list --json`, through the running process).
async fn dead_letters(h: &Harness) -> Vec<Value> {
    let file = h.dir.path().join("pipeline.yaml");
    let (code, out, err) = h
        .cli(&["dlq", "list", "--json", file.to_str().unwrap()])
        .await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_updates_in_one_window_are_one_patch_with_the_last_state() {
    hard_timeout(120, async {
        let (mut h, t, list) = start(
            "coalesce",
            "title text, qty int",
            &["1, 'row 1', 0", "2, 'row 2', 0"],
            "      title: Title\n      qty: { field: Qty, type: number }\n",
        )
        .await;
        let before = h.stats().await;
        let coalesced0 = h.metric("syncbridge_push_coalesced_total", &[]).await;
        // 50 updates of one row in one transaction: one flush window by construction.
        let mut sql = String::from("BEGIN;");
        for i in 1..=50 {
            sql.push_str(&format!(
                "UPDATE public.{t} SET qty = {i}, title = 'v{i}' WHERE id = 1;"
            ));
        }
        sql.push_str("COMMIT;");
        h.sql(&sql).await;
        let l = list.clone();
        h.wait_for("the last state in the list", || async {
            h.item(&l, "1")
                .await
                .is_some_and(|f| f["Qty"] == json!(50.0))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = h.stats().await;
        assert_eq!(app(&after, "PATCH") - app(&before, "PATCH"), 1, "one PATCH");
        assert_eq!(
            app_writes(&after) - app_writes(&before),
            1,
            "and no other write"
        );
        let item = h.item(&list, "1").await.unwrap();
        assert_eq!(
            (&item["Title"], &item["Qty"]),
            (&json!("v50"), &json!(50.0))
        );
        assert_eq!(
            h.metric("syncbridge_push_coalesced_total", &[]).await - coalesced0,
            49.0,
            "49 events folded into the 50th"
        );
        h.stop().await;
    })
    .await;
}

/// 6,000 characters that do not compress, stored out of line (`STORAGE EXTERNAL`): TOASTed.
fn big(seed: char) -> String {
    seed.to_string()
        + &(0..6000u32)
            .map(|i| char::from(b'a' + ((i * 7 + seed as u32) % 26) as u8))
            .collect::<String>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toasted_value_is_kept_across_a_restart_with_either_replica_identity() {
    hard_timeout(180, async {
        let (b1, b2) = (big('x'), big('y'));
        // Row 2 is routed by its TOASTed body: an update that leaves the body alone must not
        // move its item.
        let (mut h, t, list) = start_routed(
            "toast",
            "title text, body text",
            &[&format!("1, 'one', '{b1}'"), &format!("2, 'two', '{b2}'")],
            "      title: Title\n      body: { field: Body, type: note }\n",
            "      - when: \"body.startsWith('y')\"\n        list: Y {name}\n",
            1,
        )
        .await;
        let ylist = format!("Y {}", h.name);
        let file = h.dir.path().join("pipeline.yaml");
        for (round, full) in [(1, false), (2, true)] {
            let identity = if full { "FULL" } else { "DEFAULT" };
            h.sql(&format!(
                "ALTER TABLE public.{t} REPLICA IDENTITY {identity};
                 ALTER TABLE public.{t} ALTER COLUMN body SET STORAGE EXTERNAL;"
            ))
            .await;
            // Out of line for certain: rewrite the values under STORAGE EXTERNAL.
            if round == 1 {
                h.sql(&format!(
                    "UPDATE public.{t} SET body = '{b1}' WHERE id = 1; UPDATE public.{t} SET body = '{b2}' WHERE id = 2;"
                ))
                .await;
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            // An update that leaves the TOASTed column alone, then a restart that empties the
            // processor's memory, then another such update.
            h.sql(&format!("UPDATE public.{t} SET title = 'one r{round}a' WHERE id = 1"))
                .await;
            let l = list.clone();
            h.wait_for("the title", || async {
                h.item(&l, "1").await.is_some_and(|f| f["Title"] == json!(format!("one r{round}a")))
            })
            .await;
            h.stop().await;
            h.sql(&format!(
                "UPDATE public.{t} SET title = 'one r{round}b' WHERE id = 1;
                 UPDATE public.{t} SET title = 'two r{round}b' WHERE id = 2;"
            ))
            .await;
            h.start(&file);
            h.wait_for("the titles after the restart", || async {
                h.item(&l, "1").await.is_some_and(|f| f["Title"] == json!(format!("one r{round}b")))
                    && h.item(&ylist, "2").await.is_some_and(|f| f["Title"] == json!(format!("two r{round}b")))
            })
            .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_eq!(
                (h.items(&list).await.len(), h.items(&ylist).await.len()),
                (1, 1),
                "replica identity {identity}: an item moved"
            );
            for (key, in_list, want) in [("1", &list, &b1), ("2", &ylist, &b2)] {
                let item = h.item(in_list, key).await.unwrap();
                assert_eq!(
                    item["Body"].as_str().map(str::len),
                    Some(want.len()),
                    "replica identity {identity}: item {key} lost its TOASTed body"
                );
                assert_eq!(item["Body"], json!(want), "replica identity {identity}");
            }
            // The database kept it too (no echo wrote a placeholder back).
            assert_eq!(text(&h, &t, "body", 1).await.as_ref(), Some(&b1));
        }
        // It was out of line: PostgreSQL reported it unchanged, not the value.
        let toast: i64 = h
            .db
            .query_one(
                &format!("SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'public.{t}'::regclass"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(toast > 0, "the body is stored in the TOAST table");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_only_and_pull_only_fields_flow_one_way_and_are_counted() {
    hard_timeout(180, async {
        let (mut h, t, list) = start(
            "directions",
            "title text, note text, memo text",
            &["1, 'one', 'db note 1', 'db memo 1'", "2, 'two', 'db note 2', NULL"],
            "      title: Title\n      note: { field: Note, direction: push_only }\n      memo: { field: Memo, direction: pull_only }\n",
        )
        .await;
        // pull_only never leaves the database: not on create, not on an update of the column.
        let item = h.item(&list, "1").await.unwrap();
        assert_eq!(item["Note"], json!("db note 1"));
        assert!(item.get("Memo").is_none(), "pull_only Memo was pushed: {item:?}");
        let before = h.stats().await;
        h.sql(&format!("UPDATE public.{t} SET memo = 'db memo 1b' WHERE id = 1")).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(app_writes(&h.stats().await), app_writes(&before), "pull_only memo written");
        let held_pull = h
            .metric("syncbridge_direction_held_total", &["direction=\"pull_only\""])
            .await;
        assert!(held_pull >= 2.0, "pull_only values held back are counted: {held_pull}");

        // push_only: a list edit never reaches the row…
        h.person_edit(&list, "1", json!({ "Note": "list note 1" })).await;
        // …while a pull_only edit does.
        h.person_edit(&list, "2", json!({ "Memo": "list memo 2" })).await;
        h.wait_for("the pulled memo", || async {
            text(&h, &t, "memo", 2).await.as_deref() == Some("list memo 2")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(text(&h, &t, "note", 1).await.as_deref(), Some("db note 1"));
        let held_push = h
            .metric("syncbridge_direction_held_total", &["direction=\"push_only\""])
            .await;
        assert_eq!(held_push, 1.0, "the push_only edit is counted");
        // Not rewritten before the row changes: the list keeps the person's note.
        assert_eq!(h.item(&list, "1").await.unwrap()["Note"], json!("list note 1"));
        // The row changes (another column): the push_only value is rewritten.
        h.sql(&format!("UPDATE public.{t} SET title = 'one b' WHERE id = 1")).await;
        let l = list.clone();
        h.wait_for("the row's note back in the list", || async {
            h.item(&l, "1").await.is_some_and(|f| f["Title"] == json!("one b") && f["Note"] == json!("db note 1"))
        })
        .await;
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_fields_fill_their_columns_on_create_and_on_every_pull_without_echo() {
    hard_timeout(180, async {
        let (mut h, t, list) = start(
            "sysfields",
            "title text, sp_id int, created_at timestamptz, modified_at timestamptz, author text, editor text",
            &["1, 'one', NULL, NULL, NULL, NULL, NULL", "2, 'two', NULL, NULL, NULL, NULL, NULL"],
            "      title: Title\n      sp_id: { field: ID, type: number, direction: pull_only }\n      created_at: { field: Created, type: datetime, direction: pull_only }\n      modified_at: { field: Modified, type: datetime, direction: pull_only }\n      author: { field: Author, type: person, direction: pull_only }\n      editor: { field: Editor, type: person, direction: pull_only }\n",
        )
        .await;
        let epoch = |f: &Map<String, Value>, k: &str| {
            chrono::DateTime::parse_from_rfc3339(f[k].as_str().unwrap())
                .unwrap()
                .timestamp()
        };
        let sys = |id: i64| {
            let h = &h;
            let t = t.clone();
            async move {
                let r = h
                    .db
                    .query_one(
                        &format!(
                            "SELECT sp_id, extract(epoch from created_at)::bigint, \
                             extract(epoch from modified_at)::bigint, author, editor \
                             FROM public.{t} WHERE id = $1"
                        ),
                        &[&id],
                    )
                    .await
                    .unwrap();
                (
                    r.get::<_, Option<i32>>(0),
                    r.get::<_, Option<i64>>(1),
                    r.get::<_, Option<i64>>(2),
                    r.get::<_, Option<String>>(3),
                    r.get::<_, Option<String>>(4),
                )
            }
        };
        // On create: ID, Created, Modified from the new item; Author/Editor are the app account,
        // which has no email, so they stay empty.
        for id in 1..=2i64 {
            let item = h.item(&list, &id.to_string()).await.unwrap();
            let want = (
                item["id"].as_str().unwrap().parse::<i32>().ok(),
                Some(epoch(&item, "Created")),
                Some(epoch(&item, "Modified")),
                None,
                None,
            );
            let l = format!("row {id}'s system fields");
            h.wait_for(&l, || async { sys(id).await == want }).await;
        }
        // On a pull: a person's edit brings Modified and Editor (the person's email) along.
        let before = h.stats().await;
        h.person_edit(&list, "1", json!({ "Title": "edited" })).await;
        h.wait_for("the edit and its editor", || async {
            sys(1).await.4.as_deref() == Some("adelev@contoso.onmicrosoft.com")
        })
        .await;
        let item = h.item(&list, "1").await.unwrap();
        assert_eq!(sys(1).await.2, Some(epoch(&item, "Modified")));
        assert_eq!(text(&h, &t, "title", 1).await.as_deref(), Some("edited"));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(app_writes(&h.stats().await), app_writes(&before), "no echo write");
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_values_the_row_cannot_take_are_dead_letters_naming_row_field_and_value() {
    hard_timeout(180, async {
        let mut h = Harness::new("badback").await;
        let (t, r) = (h.t("t"), h.t("ref"));
        h.sql(&format!(
            "CREATE TYPE public.{t}_mood AS ENUM ('calm', 'busy');
             CREATE TABLE public.{r} (id bigint PRIMARY KEY, title text);
             INSERT INTO public.{r} VALUES (1, 'ref 1');
             CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text, code varchar(5), qty int,
                 mood public.{t}_mood, ref_id bigint, owner text);
             INSERT INTO public.{t} SELECT g, 'row ' || g, 'c', 1, 'calm', 1, NULL FROM generate_series(1, 8) g;"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        h.tables.push(format!("public.{r}"));
        h.tables.push(format!("public.{t}_never; DROP TYPE IF EXISTS public.{t}_mood"));
        let (list, ref_list) = (format!("T {}", h.name), format!("R {}", h.name));
        let sync = format!(
            "  - table: public.{r}\n    list: {ref_list}\n    fields:\n      title: Title\n    pull: {{ enabled: false }}\n  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      code: Code\n      qty: {{ field: Qty, type: number }}\n      mood: {{ field: Mood, type: choice, choices: [calm, busy, other] }}\n      ref_id: {{ field: Ref, type: lookup, list: {ref_list} }}\n      owner: {{ field: Owner, type: person }}\n    pull: {{ enabled: true, interval_ms: 200 }}"
        );
        let file = h.pipeline(&h.embedded_log(), &sync);
        h.start(&file);
        let l = list.clone();
        h.wait_for("the items", || async { h.items(&l).await.len() == 8 }).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        // An item of the lookup's list that no row stands for.
        let ref_id = h.list_id(&ref_list).await;
        let mut f = Map::new();
        f.insert("Title".into(), json!("made by hand"));
        let stray = h.person.create_item(&h.site, &ref_id, &f).await.unwrap().id;

        // One bad value per row (rows 1–4 and 8), a good edit after them (row 5).
        let bad = [
            ("1", json!({ "Code": "toolong" }), "code", "toolong"),
            // With a good field beside it: that one is taken.
            ("2", json!({ "Qty": 1e12, "Title": "qty edit" }), "qty", "1000000000000"),
            ("3", json!({ "Mood": "other" }), "mood", "other"),
            ("4", json!({ "RefLookupId": stray.parse::<u64>().unwrap() }), "Ref", &stray),
            // A user who has left the directory (no email to put in the row).
            ("8", json!({ "OwnerLookupId": 12 }), "Owner", "12"),
        ];
        for (key, fields, _, _) in &bad {
            h.person_edit(&list, key, fields.clone()).await;
        }
        h.person_edit(&list, "5", json!({ "Title": "good edit" })).await;
        h.wait_for("the good edit", || async {
            text(&h, &t, "title", 5).await.as_deref() == Some("good edit")
        })
        .await;
        // A row with a person who is not in the site's directory: dead on the way out.
        h.sql(&format!("UPDATE public.{t} SET owner = 'nobody@contoso.onmicrosoft.com' WHERE id = 6"))
            .await;
        h.wait_for("6 dead letters", || async { dead_letters(&h).await.len() >= 6 })
            .await;
        let dead = dead_letters(&h).await;
        for (key, _, field, value) in &bad {
            let d = dead
                .iter()
                .find(|d| d["key"] == json!(key))
                .unwrap_or_else(|| panic!("no dead letter for row {key}: {dead:#?}"));
            let reason = d["reason"].as_str().unwrap();
            assert!(
                reason.contains(field) && reason.contains(value),
                "row {key}: the reason names neither {field} nor {value}: {reason}"
            );
        }
        let d = dead.iter().find(|d| d["key"] == json!("6")).expect("row 6");
        assert_eq!(d["kind"], json!("unknown_user"));
        assert!(d["reason"].as_str().unwrap().contains("nobody@contoso.onmicrosoft.com"));
        // Nothing else stopped: the rows keep their values, the good field of the same edit
        // was taken, and later edits flow both ways.
        assert_eq!(text(&h, &t, "code", 1).await.as_deref(), Some("c"));
        assert_eq!(text(&h, &t, "qty", 2).await.as_deref(), Some("1"));
        assert_eq!(text(&h, &t, "title", 2).await.as_deref(), Some("qty edit"));
        h.sql(&format!("UPDATE public.{t} SET title = 'db edit' WHERE id = 5")).await;
        h.person_edit(&list, "7", json!({ "Title": "fine" })).await;
        // A later edit of a row with a refused value is taken, and not refused again.
        h.person_edit(&list, "1", json!({ "Title": "fine 1" })).await;
        let l = list.clone();
        h.wait_for("both directions after the dead letters", || async {
            h.item(&l, "5").await.is_some_and(|f| f["Title"] == json!("db edit"))
                && text(&h, &t, "title", 7).await.as_deref() == Some("fine")
                && text(&h, &t, "title", 1).await.as_deref() == Some("fine 1")
        })
        .await;
        let again = dead_letters(&h).await;
        assert_eq!(again.len(), dead.len(), "no new dead letter: {again:#?}");
        // The row's next change writes the row's value over the refused one in the list.
        h.sql(&format!("UPDATE public.{t} SET title = 'db 1' WHERE id = 1")).await;
        h.wait_for("the list healed from the row", || async {
            h.item(&l, "1")
                .await
                .is_some_and(|f| f["Title"] == json!("db 1") && f["Code"] == json!("c"))
        })
        .await;
        h.stop().await;
    })
    .await;
}
