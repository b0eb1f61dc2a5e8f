//! Issue 6's loop acceptance test: 1,000 database changes ("pushes") and 1,000 list edits made as
//! a person ("pulls"), interleaved over about two minutes against the real `syncbridge run`, then
//! SyncBridge's Graph writes counted exactly (no echo write in either direction) and the table
//! compared with the list.
//!
//! Why the counts are exact, not bounds:
//! - The two sides touch disjoint rows: rows 1–100 and those the database inserts belong to the
//!   database, rows 101–200 and the items the person creates belong to the person. No conflict
//!   can happen, so no conflict write is "needed".
//! - Every change sets a new unique title, so none is a no-op, and a key is touched again only
//!   after [`COOLDOWN`]: each change reaches the other side on its own (not coalesced with the
//!   next one in the processor's flush window or in one delta round). The test asserts
//!   `syncbridge_push_coalesced_total` did not move, which is what makes that claim checked.
//! - So SyncBridge must write exactly: one create/update/delete per push, plus per person-created
//!   item one `SyncKey` PATCH and one PATCH of the database default (`status` defaults to
//!   `open`) when the person left Status empty. Person updates and deletes need zero writes.
//! - The emulator counts calls per client id (`requests.by_client` of `/_emulator/stats`, each
//!   `$batch` entry by its method), so SyncBridge's writes are measured apart from the person's.
//!
//! `PULL_LOOP_SEED` reproduces a run (the seed is printed); `PULL_LOOP_OPS` (per side, default
//! 1000) and `PULL_LOOP_SECS` (default 120) scale it down for a quick local iteration.
//!
//! Needs `DATABASE_URL`: `eval "$(ops/stack env)"`. Fails (never skips) without it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use syncbridge::emulator;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

/// A key is changed again only this long after its last change, on either side: far longer than
/// the processor's flush window and the 200 ms delta interval, so no two changes of one key are
/// ever merged and each costs exactly its own write.
const COOLDOWN: Duration = Duration::from_secs(4);
/// Rows the database starts with: 1..=OWNED_EACH are the database's, the next ones the person's.
const OWNED_EACH: i64 = 100;
const STATUSES: [&str; 3] = ["open", "done", "held"];

/// The values of one row / item the test expects.
#[derive(Debug, Clone, PartialEq)]
struct Want {
    title: String,
    qty: i32,
    status: String,
}

/// A person-created item until SyncBridge has given it a row (SyncKey and default written back).
#[derive(Debug)]
struct NewItem {
    item: String,
    at: Instant,
}

#[derive(Debug, Default)]
struct Done {
    db_insert: u64,
    db_update: u64,
    db_delete: u64,
    person_create: u64,
    /// Creates that left Status empty: the database default comes back as one more PATCH.
    person_create_default: u64,
    person_update: u64,
    person_delete: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

/// Write calls (POST/PATCH/DELETE, `$batch` entries by their own method) of one client.
fn client_writes(stats: &Value, client: &str) -> BTreeMap<&'static str, u64> {
    ["POST", "PATCH", "DELETE"]
        .into_iter()
        .map(|m| {
            (
                m,
                stats["requests"]["by_client"][client][m]
                    .as_u64()
                    .unwrap_or(0),
            )
        })
        .collect()
}

fn delta(
    after: &BTreeMap<&'static str, u64>,
    before: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after.iter().map(|(k, v)| (*k, v - before[k])).collect()
}

/// The SyncBridge and /metrics counters the assertions compare, read at one moment.
#[derive(Debug, Clone, PartialEq)]
struct Counters {
    applied: f64,
    apply_failed: f64,
    own_origin: f64,
    unchanged: f64,
    stale: f64,
    coalesced: f64,
    write_ok: BTreeMap<&'static str, f64>,
    write_other: f64,
    echoes: f64,
    conflicts: f64,
    dead: f64,
}

async fn counters(h: &Harness) -> Counters {
    let mut write_ok = BTreeMap::new();
    for kind in ["create", "update", "delete"] {
        let k = format!("kind=\"{kind}\"");
        write_ok.insert(
            kind,
            h.metric(
                "syncbridge_push_writes_total",
                &[k.as_str(), "outcome=\"ok\""],
            )
            .await,
        );
    }
    Counters {
        applied: h
            .metric("syncbridge_pull_apply_total", &["outcome=\"applied\""])
            .await,
        apply_failed: h.metric("syncbridge_pull_apply_total", &[]).await
            - h.metric("syncbridge_pull_apply_total", &["outcome=\"applied\""])
                .await,
        own_origin: h
            .metric("syncbridge_push_skipped_total", &["reason=\"own_origin\""])
            .await,
        unchanged: h
            .metric("syncbridge_push_skipped_total", &["reason=\"unchanged\""])
            .await,
        stale: h
            .metric("syncbridge_push_skipped_total", &["reason=\"stale\""])
            .await,
        coalesced: h.metric("syncbridge_push_coalesced_total", &[]).await,
        write_ok: write_ok.clone(),
        write_other: h.metric("syncbridge_push_writes_total", &[]).await
            - write_ok.values().sum::<f64>(),
        echoes: h.metric("syncbridge_pull_echoes_total", &[]).await,
        conflicts: h.metric("syncbridge_pull_conflicts_total", &[]).await,
        dead: h.metric("syncbridge_push_dead_letters_total", &[]).await,
    }
}

/// The table as `title → (id, want)` (titles are unique by construction).
async fn table(h: &Harness, t: &str) -> Vec<(i64, Want)> {
    h.db.query(
        &format!("SELECT id, title, qty, status FROM public.{t}"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            Want {
                title: r.get(1),
                qty: r.get::<_, Option<i32>>(2).unwrap_or(i32::MIN),
                status: r.get(3),
            },
        )
    })
    .collect()
}

/// The list as `(SyncKey, item id, want)`.
async fn list(h: &Harness, list: &str) -> Vec<(String, String, Want)> {
    h.items(list)
        .await
        .into_iter()
        .map(|(sk, f)| {
            let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            (
                sk,
                s("id"),
                Want {
                    title: s("Title"),
                    qty: f
                        .get("Qty")
                        .and_then(Value::as_f64)
                        .map_or(i32::MIN, |q| q as i32),
                    status: s("Status"),
                },
            )
        })
        .collect()
}

/// Every way the table, the list and the expected state differ (empty: all three equal).
fn differences(
    rows: &[(i64, Want)],
    items: &[(String, String, Want)],
    db_model: &HashMap<i64, Want>,
    person_model: &HashMap<String, Want>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut by_key: HashMap<&str, Vec<&(String, String, Want)>> = HashMap::new();
    for i in items {
        by_key.entry(i.0.as_str()).or_default().push(i);
    }
    for (k, v) in &by_key {
        if k.is_empty() {
            out.push(format!("{} item(s) without a SyncKey: {v:?}", v.len()));
        } else if v.len() > 1 {
            out.push(format!("duplicate SyncKey {k}: {v:?}"));
        }
    }
    let row_by_id: HashMap<String, &Want> =
        rows.iter().map(|(id, w)| (id.to_string(), w)).collect();
    for (id, w) in rows {
        match by_key.get(id.to_string().as_str()).and_then(|v| v.first()) {
            None => out.push(format!("row {id} {w:?} has no item")),
            Some((_, item, iw)) if iw != w => out.push(format!(
                "row {id} {w:?} differs from its item {item} {iw:?}"
            )),
            Some(_) => {}
        }
    }
    for (k, item, w) in items {
        if !k.is_empty() && !row_by_id.contains_key(k) {
            out.push(format!("item {item} (SyncKey {k}) {w:?} has no row"));
        }
    }
    // Against what the test did: the database's rows by id, the person's items by item id.
    if rows.len() != db_model.len() + person_model.len() {
        out.push(format!(
            "{} rows, expected {} database-owned + {} person-owned",
            rows.len(),
            db_model.len(),
            person_model.len()
        ));
    }
    for (id, w) in db_model {
        if row_by_id.get(&id.to_string()) != Some(&w) {
            out.push(format!(
                "database row {id}: expected {w:?}, table has {:?}",
                row_by_id.get(&id.to_string())
            ));
        }
    }
    for (item, w) in person_model {
        let found = items.iter().find(|(_, i, _)| i == item);
        match found {
            Some((k, _, iw)) if iw == w && row_by_id.get(k) == Some(&w) => {}
            other => out.push(format!(
                "person item {item}: expected {w:?}, list has {other:?}, row {:?}",
                other.and_then(|(k, _, _)| row_by_id.get(k))
            )),
        }
    }
    out
}

/// A table `<name>_t (id identity pk, title, qty, status default 'open')` with `rows` rows
/// synced two-way (`on_delete: delete`, delta every `interval_ms`) with list "L <name>"; returns
/// once the list has every row.
async fn start(tag: &str, rows: i64, interval_ms: u64) -> (Harness, String, String) {
    let mut h = Harness::new(tag).await;
    let t = h.t("t");
    h.sql(&format!(
        "CREATE TABLE public.{t} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
         title text NOT NULL, qty int, status text NOT NULL DEFAULT 'open');
         INSERT INTO public.{t} (title, qty, status) \
         SELECT 'initial ' || g, g, 'open' FROM generate_series(1, {rows}) g;"
    ))
    .await;
    h.tables.push(format!("public.{t}"));
    let list_name = format!("L {}", h.name);
    let sync = format!(
        "  - table: public.{t}\n    list: {list_name}\n    fields:\n      title: Title\n      qty: {{ field: Qty, type: number }}\n      status: {{ field: Status, type: choice, choices: [open, done, held] }}\n    conflict: source_wins\n    pull: {{ enabled: true, interval_ms: {interval_ms}, on_delete: delete }}"
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    h.start(&file);
    let l = list_name.clone();
    h.wait_for("the initial rows in the list", || async {
        h.items(&l).await.len() == rows as usize
    })
    .await;
    (h, t, list_name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pushes_and_pulls_interleaved_cost_exactly_the_writes_needed() {
    hard_timeout(300, async {
        let ops = env_u64("PULL_LOOP_OPS", 1000) as usize;
        let secs = env_u64("PULL_LOOP_SECS", 120);
        let seed = std::env::var("PULL_LOOP_SEED")
            .ok()
            .map(|s| s.parse::<u64>().expect("PULL_LOOP_SEED must be a number"))
            .unwrap_or_else(rand::random);
        eprintln!("pull_loop: PULL_LOOP_SEED={seed} ({ops} pushes + {ops} pulls over {secs} s)");
        let mut rng = StdRng::seed_from_u64(seed);

        let (mut h, t, list_name) = start("loop", 2 * OWNED_EACH, 200).await;
        let list_id = h.list_id(&list_name).await;
        let app = emulator::DEFAULT_CLIENT_ID;
        let person_client = emulator::DEFAULT_USER_CLIENT_ID;

        // Settle: the snapshot's echoes come back and nothing more is written for 2 s.
        let mut last = client_writes(&h.stats().await, app);
        let mut quiet_since = Instant::now();
        let settle_deadline = Instant::now() + Duration::from_secs(30);
        while quiet_since.elapsed() < Duration::from_secs(2) {
            assert!(Instant::now() < settle_deadline, "SyncBridge kept writing after the snapshot:\n{}", h.run_log());
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = client_writes(&h.stats().await, app);
            if now != last {
                (last, quiet_since) = (now, Instant::now());
            }
        }

        // Who owns what. The database: its rows by id. The person: items by item id.
        let mut db_model: HashMap<i64, Want> = HashMap::new();
        let mut person_model: HashMap<String, Want> = HashMap::new();
        for (sk, item, w) in list(&h, &list_name).await {
            let id: i64 = sk.parse().expect("numeric SyncKey");
            if id <= OWNED_EACH {
                db_model.insert(id, w);
            } else {
                person_model.insert(item, w);
            }
        }
        assert_eq!(db_model.len() + person_model.len(), 2 * OWNED_EACH as usize);
        let mut db_touched: HashMap<i64, Instant> = HashMap::new();
        let mut person_touched: HashMap<String, Instant> = HashMap::new();
        let mut unsettled: VecDeque<NewItem> = VecDeque::new();

        let stats0 = h.stats().await;
        let app0 = client_writes(&stats0, app);
        let person0 = client_writes(&stats0, person_client);
        let c0 = counters(&h).await;

        // The interleaving: `ops` of each side in a seeded random order, paced evenly.
        let mut plan: Vec<bool> = (0..2 * ops).map(|i| i < ops).collect();
        plan.shuffle(&mut rng);
        let step = Duration::from_secs(secs) / (2 * ops) as u32;
        let mut done = Done::default();
        let mut person_gets = 0u64;
        let started = Instant::now();
        for (n, is_push) in plan.into_iter().enumerate() {
            if let Some(wait) = (started + step * n as u32).checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            assert!(
                started.elapsed() < Duration::from_secs(secs + 60),
                "the loop fell more than 60 s behind its pace at op {n}"
            );
            let title = format!("{} {n} s{seed}", if is_push { "db" } else { "person" });
            let qty = rng.random_range(0..100_000);
            let status = STATUSES.choose(&mut rng).unwrap().to_string();
            let roll: f64 = rng.random();
            if is_push {
                let mut ready: Vec<i64> = db_model.keys().copied().filter(|id| cool(&db_touched, id)).collect();
                ready.sort_unstable();
                // Insert 20 %, delete 15 %, update the rest; never below 40 ready rows.
                if roll < 0.20 || ready.len() < 40 {
                    let row = h
                        .db
                        .query_one(
                            &format!("INSERT INTO public.{t} (title, qty, status) VALUES ($1, $2, $3) RETURNING id"),
                            &[&title, &qty, &status],
                        )
                        .await
                        .unwrap();
                    let id: i64 = row.get(0);
                    db_model.insert(id, Want { title, qty, status });
                    db_touched.insert(id, Instant::now());
                    done.db_insert += 1;
                } else {
                    let id = *ready.choose(&mut rng).unwrap();
                    if roll < 0.35 {
                        let n = h.db.execute(&format!("DELETE FROM public.{t} WHERE id = $1"), &[&id]).await.unwrap();
                        assert_eq!(n, 1);
                        db_model.remove(&id);
                        done.db_delete += 1;
                    } else {
                        let n = h
                            .db
                            .execute(
                                &format!("UPDATE public.{t} SET title = $1, qty = $2, status = $3 WHERE id = $4"),
                                &[&title, &qty, &status, &id],
                            )
                            .await
                            .unwrap();
                        assert_eq!(n, 1);
                        db_model.insert(id, Want { title, qty, status });
                        done.db_update += 1;
                    }
                    db_touched.insert(id, Instant::now());
                }
            } else {
                // A person-created item may be edited once SyncBridge has made its row: SyncKey
                // and the default Status are in the item. One GET per pull op at most.
                if let Some(first) = unsettled.front()
                    && first.at.elapsed() >= COOLDOWN
                {
                    person_gets += 1;
                    let it = h.person.get_item(&h.site, &list_id, &first.item).await.unwrap().unwrap();
                    let has = |k: &str| it.fields.get(k).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
                    if has("SyncKey") && has("Status") {
                        unsettled.pop_front();
                    }
                }
                let unsettled_ids: Vec<&str> = unsettled.iter().map(|u| u.item.as_str()).collect();
                let mut ready: Vec<String> = person_model
                    .keys()
                    .filter(|i| cool(&person_touched, *i) && !unsettled_ids.contains(&i.as_str()))
                    .cloned()
                    .collect();
                ready.sort_unstable();
                if roll < 0.20 || ready.len() < 40 {
                    let mut f = Map::new();
                    f.insert("Title".into(), json!(title));
                    f.insert("Qty".into(), json!(qty));
                    let want_status = if rng.random_bool(0.5) {
                        f.insert("Status".into(), json!(status));
                        status
                    } else {
                        done.person_create_default += 1;
                        "open".to_string()
                    };
                    let it = h.person.create_item(&h.site, &list_id, &f).await.unwrap();
                    person_model.insert(it.id.clone(), Want { title, qty, status: want_status });
                    person_touched.insert(it.id.clone(), Instant::now());
                    unsettled.push_back(NewItem { item: it.id, at: Instant::now() });
                    done.person_create += 1;
                } else {
                    let item = ready.choose(&mut rng).unwrap().clone();
                    if roll < 0.35 {
                        h.person.delete_item(&h.site, &list_id, &item, None).await.unwrap();
                        person_model.remove(&item);
                        done.person_delete += 1;
                    } else {
                        let mut f = Map::new();
                        f.insert("Title".into(), json!(title));
                        f.insert("Qty".into(), json!(qty));
                        f.insert("Status".into(), json!(status));
                        h.person.update_item_fields(&h.site, &list_id, &item, &f, None).await.unwrap();
                        person_model.insert(item.clone(), Want { title, qty, status });
                        done.person_update += 1;
                    }
                    person_touched.insert(item, Instant::now());
                }
            }
        }
        let loop_secs = started.elapsed().as_secs_f64();
        eprintln!("pull_loop: {done:?} in {loop_secs:.1} s, {person_gets} GETs to see new items settle");
        if let Some(s) = h.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("syncbridge run exited during the loop with {s}:\n{}", h.run_log());
        }

        // Converged: the table, the list and what the test did are equal.
        let converge = Instant::now();
        let mut diffs = Vec::new();
        while converge.elapsed() < Duration::from_secs(60) {
            let rows = table(&h, &t).await;
            let items = list(&h, &list_name).await;
            diffs = differences(&rows, &items, &db_model, &person_model);
            if diffs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            diffs.is_empty(),
            "seed {seed}: table, list and expected state still differ after 60 s ({} differences):\n{}\n\nrun log tail:\n{}",
            diffs.len(),
            diffs.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
            tail(&h.run_log())
        );
        eprintln!("pull_loop: converged {:.1} s after the loop", converge.elapsed().as_secs_f64());
        // Late writes would be echoes: wait well past a delta round and a flush, then count.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let stats1 = h.stats().await;
        let sb = delta(&client_writes(&stats1, app), &app0);
        let person = delta(&client_writes(&stats1, person_client), &person0);
        let c1 = counters(&h).await;
        let d = |f: fn(&Counters) -> f64| f(&c1) - f(&c0);
        let wd = |k: &str| c1.write_ok[k] - c0.write_ok[k];
        let pushes = done.db_insert + done.db_update + done.db_delete;
        let pulls = done.person_create + done.person_update + done.person_delete;
        let report = format!(
            "seed {seed}: {done:?}\nSyncBridge writes {sb:?}, person writes {person:?} (emulator by client: {})\n\
             applied {}, apply failures {}, skipped own_origin {} unchanged {} stale {}, coalesced {}, \
             push ok writes create {} update {} delete {}, other outcomes {}, echoes {}, conflicts {}, dead letters {}",
            stats1["requests"],
            d(|c| c.applied),
            d(|c| c.apply_failed),
            d(|c| c.own_origin),
            d(|c| c.unchanged),
            d(|c| c.stale),
            d(|c| c.coalesced),
            wd("create"),
            wd("update"),
            wd("delete"),
            d(|c| c.write_other),
            d(|c| c.echoes),
            d(|c| c.conflicts),
            d(|c| c.dead),
        );
        eprintln!("pull_loop: {report}");
        assert_eq!(pushes as usize, ops, "{report}");
        assert_eq!(pulls as usize, ops, "{report}");
        // The person's side is what the test did (the per-client split is trustworthy).
        let want_person: BTreeMap<&str, u64> = [
            ("POST", done.person_create),
            ("PATCH", done.person_update),
            ("DELETE", done.person_delete),
        ]
        .into();
        assert_eq!(person, want_person, "the person's own writes; {report}");
        // The precondition of exactness: no two changes of a row were merged.
        assert_eq!(d(|c| c.coalesced), 0.0, "changes were coalesced (the processor lagged > {COOLDOWN:?}); {report}");
        // Exactly the writes needed: one per push; per person-created item the SyncKey, and the
        // database default when Status was left empty; nothing for person updates and deletes.
        let want_sb: BTreeMap<&str, u64> = [
            ("POST", done.db_insert),
            ("PATCH", done.db_update + done.person_create + done.person_create_default),
            ("DELETE", done.db_delete),
        ]
        .into();
        assert_eq!(sb, want_sb, "SyncBridge's Graph writes (more = echo writes, fewer = lost pushes); {report}");
        assert_eq!(wd("create"), done.db_insert as f64, "{report}");
        assert_eq!(wd("update"), done.db_update as f64, "{report}");
        assert_eq!(wd("delete"), done.db_delete as f64, "{report}");
        assert_eq!(d(|c| c.write_other), 0.0, "no adopted/not_found/rejected/transient write; {report}");
        // Exactly one row change per person edit. The push side skips each as its own: at once
        // (`own_origin`), or, for a row whose item the ledger knows, after diffing its image
        // against the ledger (`unchanged`: it holds the pulled values already). Every database
        // change changed a value, so no other push is skipped; an echo write would show above.
        assert_eq!(d(|c| c.applied), pulls as f64, "row applies (more = echoes into PostgreSQL); {report}");
        assert_eq!(d(|c| c.apply_failed), 0.0, "{report}");
        assert_eq!(
            d(|c| c.own_origin) + d(|c| c.unchanged),
            pulls as f64,
            "own return-path writes skipped by the push side; {report}"
        );
        assert_eq!(d(|c| c.stale), 0.0, "{report}");
        assert_eq!(d(|c| c.conflicts), 0.0, "disjoint rows cannot conflict; {report}");
        assert_eq!(d(|c| c.dead), 0.0, "{report}");
        // Informational: SyncBridge saw its own writes come back and dropped them.
        assert!(d(|c| c.echoes) > 0.0, "{report}");
        h.stop().await;
    })
    .await;
}

/// Whether `k` was last changed at least [`COOLDOWN`] ago (or never).
fn cool<K: std::hash::Hash + Eq>(touched: &HashMap<K, Instant>, k: &K) -> bool {
    touched.get(k).is_none_or(|t| t.elapsed() >= COOLDOWN)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The comparison itself can fail: each kind of mismatch is reported.
#[test]
fn differences_reports_each_kind_of_mismatch() {
    let w = |t: &str| Want {
        title: t.into(),
        qty: 1,
        status: "open".into(),
    };
    let rows = vec![(1, w("a")), (2, w("b")), (3, w("c"))];
    let items = vec![
        ("1".to_string(), "10".to_string(), w("a")),
        ("2".to_string(), "20".to_string(), w("b")),
        ("3".to_string(), "30".to_string(), w("c")),
    ];
    let db: HashMap<i64, Want> = [(1, w("a")), (2, w("b"))].into();
    let person: HashMap<String, Want> = [("30".to_string(), w("c"))].into();
    assert!(differences(&rows, &items, &db, &person).is_empty());

    let mut dup = items.clone();
    dup.push(("3".into(), "31".into(), w("c")));
    dup.push(("".into(), "32".into(), w("x")));
    let d = differences(&rows, &dup, &db, &person);
    assert!(d.iter().any(|m| m.contains("duplicate SyncKey 3")), "{d:?}");
    assert!(d.iter().any(|m| m.contains("without a SyncKey")), "{d:?}");

    let mut changed = items.clone();
    changed[1].2.qty = 2;
    changed.push(("9".into(), "90".into(), w("z")));
    let d = differences(&rows[..2], &changed, &db, &person);
    assert!(d.iter().any(|m| m.starts_with("row 2 ")), "{d:?}");
    assert!(
        d.iter()
            .any(|m| m.contains("SyncKey 9") && m.contains("no row")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|m| m.contains("SyncKey 3") && m.contains("no row")),
        "{d:?}"
    );
    assert!(d.iter().any(|m| m.starts_with("person item 30")), "{d:?}");

    let mut db_moved = db.clone();
    db_moved.insert(2, w("b2"));
    let d = differences(&rows, &items, &db_moved, &person);
    assert!(d.iter().any(|m| m.starts_with("database row 2")), "{d:?}");
}

/// Delta returns an item's state at poll time; SyncBridge writes some items several times in a
/// row (a row changed again and again; a person-created item's SyncKey, then its database
/// default). A poll between two such writes sees an intermediate state of our own writes, which
/// must still be recognised as ours: nothing may be applied back to PostgreSQL, nothing rejected.
/// Tight timing on purpose (delta every 100 ms, a change every 60–80 ms), unlike the loop above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_states_of_our_own_writes_are_not_pulled_back() {
    hard_timeout(180, async {
        let (mut h, t, list_name) = start("loopfast", 2, 100).await;
        let list_id = h.list_id(&list_name).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c0 = counters(&h).await;

        // 1. One row changed 200 times, ~75 ms apart.
        let mut last = String::new();
        for n in 0..200i32 {
            last = format!("fast {n}");
            h.db.execute(
                &format!("UPDATE public.{t} SET title = $1, qty = $2 WHERE id = 1"),
                &[&last, &n],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(75)).await;
        }
        let want = last.clone();
        h.wait_for("the last change in the list", || async {
            h.item(&list_name, "1")
                .await
                .is_some_and(|f| f["Title"] == want.as_str())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c1 = counters(&h).await;
        let row: String =
            h.db.query_one(&format!("SELECT title FROM public.{t} WHERE id = 1"), &[])
                .await
                .unwrap()
                .get(0);
        let report = format!("{c0:?}\n→ {c1:?}");
        eprintln!("rapid updates: {report}");
        assert_eq!(row, last, "the row keeps its last value; {report}");
        assert_eq!(
            c1.applied - c0.applied,
            0.0,
            "a state of our own writes was applied back to PostgreSQL; {report}\n{}",
            tail(&h.run_log())
        );
        assert_eq!(c1.conflicts - c0.conflicts, 0.0, "{report}");

        // 2. 100 person-created items without Status, ~60 ms apart: SyncKey, then the default.
        let mut created = Vec::new();
        for n in 0..100 {
            let mut f = Map::new();
            f.insert("Title".into(), json!(format!("new {n}")));
            f.insert("Qty".into(), json!(n));
            created.push(
                h.person
                    .create_item(&h.site, &list_id, &f)
                    .await
                    .unwrap()
                    .id,
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        h.wait_for("100 new rows", || async {
            let n: i64 =
                h.db.query_one(
                    &format!("SELECT count(*) FROM public.{t} WHERE title LIKE 'new %'"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n == 100
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c2 = counters(&h).await;
        let report = format!("{c1:?}\n→ {c2:?}");
        eprintln!("new items: {report}");
        assert_eq!(
            c2.applied - c1.applied,
            100.0,
            "one insert per new item, nothing else; {report}\n{}",
            tail(&h.run_log())
        );
        let rejected = || {
            h.run_log()
                .lines()
                .filter(|l| l.contains("reject") || l.contains("dead"))
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            c2.apply_failed - c1.apply_failed,
            0.0,
            "{report}\n{}",
            rejected()
        );
        assert_eq!(c2.dead - c1.dead, 0.0, "{report}\n{}", rejected());
        let items = list(&h, &list_name).await;
        for id in &created {
            let (sk, _, w) = items
                .iter()
                .find(|(_, i, _)| i == id)
                .unwrap_or_else(|| panic!("item {id} is gone"));
            assert!(
                !sk.is_empty() && w.status == "open",
                "item {id}: {sk:?} {w:?}"
            );
        }
        h.stop().await;
    })
    .await;
}
