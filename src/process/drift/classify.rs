//! Classifying differences (pure: no IO). Inputs are one read of each side; the caller runs it
//! twice (before and after a short wait, with a fresh ledger and table read) and keeps only the
//! differences both passes saw, so a change still in flight is not reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value as Json};

use super::commands::LedgerView;
use super::report::{Difference, DriftClass, ListCount};
use crate::config::SYNC_KEY_FIELD;
use crate::process::ledger::Entry;

/// One item as the check read it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenItem {
    pub id: String,
    pub etag: Option<String>,
    pub fields: Map<String, Json>,
}

impl SeenItem {
    fn sync_key(&self) -> Option<&str> {
        self.fields
            .get(SYNC_KEY_FIELD)
            .and_then(Json::as_str)
            .filter(|k| !k.is_empty())
    }
}

/// One list: its display name, id and items.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenList {
    pub name: String,
    pub id: String,
    pub items: Vec<SeenItem>,
    /// The list pulls: an item without SyncKey is a person's new row still pending, not an orphan.
    pub pulls: bool,
}

/// One synced table: its lists (the entry's `list` and routes) and the rows' SyncKeys.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenTable {
    pub table: String,
    pub lists: Vec<String>,
    pub keys: BTreeSet<String>,
}

/// Both sides plus the ledger, as read by one pass.
#[derive(Debug, Clone, Default)]
pub struct Sides {
    pub tables: Vec<SeenTable>,
    pub lists: Vec<SeenList>,
    /// `(table, key)` → entry.
    pub ledger: BTreeMap<(String, String), Entry>,
}

/// An entry whose write is still open (a create, an update or a move in flight): skipped.
fn in_flight(e: &Entry) -> bool {
    e.intent.is_some() || e.pending_delete.is_some() || !e.in_flight.is_empty()
}

/// Two field values as equal as SharePoint keeps them (numbers by value, absent = null).
fn same(a: Option<&Json>, b: Option<&Json>) -> bool {
    let norm = |v: Option<&Json>| match v {
        None | Some(Json::Null) => Json::Null,
        Some(Json::String(s)) => s.parse::<f64>().map_or(Json::String(s.clone()), |n| {
            serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
        }),
        Some(Json::Number(n)) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Json::Null, Json::Number),
        Some(v) => v.clone(),
    };
    norm(a) == norm(b)
}

/// The fields of `item` that differ from what the ledger last confirmed.
fn divergent_fields(entry: &Entry, item: &SeenItem) -> Vec<String> {
    entry
        .projection
        .iter()
        .filter(|(k, _)| !k.contains('@') && k.as_str() != SYNC_KEY_FIELD)
        .filter(|(k, v)| !same(Some(v), item.fields.get(k.as_str())))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Every difference between `s.tables`, `s.lists` and `s.ledger`, and the per-list counts.
pub fn classify(s: &Sides) -> (Vec<Difference>, Vec<ListCount>) {
    let name_of: HashMap<&str, &str> = s
        .lists
        .iter()
        .map(|l| (l.id.as_str(), l.name.as_str()))
        .collect();
    // (list name, SyncKey) → items with that key.
    let mut by_key: HashMap<(&str, &str), Vec<&SeenItem>> = HashMap::new();
    for l in &s.lists {
        for i in &l.items {
            if let Some(k) = i.sync_key() {
                by_key.entry((l.name.as_str(), k)).or_default().push(i);
            }
        }
    }
    let mut out = Vec::new();
    let mut rows_in: BTreeMap<&str, u64> = BTreeMap::new();
    for t in &s.tables {
        for key in &t.keys {
            let entry = s.ledger.get(&(t.table.clone(), key.clone()));
            if entry.is_some_and(in_flight) {
                continue;
            }
            let home = entry
                .and_then(|e| e.item.as_ref())
                .and_then(|r| name_of.get(r.list_id.as_str()).copied());
            if let Some(h) = home.or_else(|| (t.lists.len() == 1).then(|| t.lists[0].as_str())) {
                *rows_in.entry(h).or_default() += 1;
            }
            row_differences(t, key, entry, home, &by_key, &mut out);
        }
    }
    orphans(s, &mut out);
    let counts = s
        .lists
        .iter()
        .map(|l| ListCount {
            list: l.name.clone(),
            rows: rows_in.get(l.name.as_str()).copied().unwrap_or(0),
            items: l.items.len() as u64,
        })
        .collect();
    (out, counts)
}

fn diff(class: DriftClass, t: &str, key: &str, list: &str, item: Option<&SeenItem>) -> Difference {
    Difference {
        class,
        table: t.to_string(),
        key: key.to_string(),
        list: list.to_string(),
        item_id: item.map(|i| i.id.clone()),
        etag: item.and_then(|i| i.etag.clone()),
        fields: Vec::new(),
    }
}

/// The differences of one row. `home` is the list the ledger's item is in (when that list
/// exists); the row's items are looked for in every list of its entry.
fn row_differences(
    t: &SeenTable,
    key: &str,
    entry: Option<&Entry>,
    home: Option<&str>,
    by_key: &HashMap<(&str, &str), Vec<&SeenItem>>,
    out: &mut Vec<Difference>,
) {
    let found: Vec<(&str, &SeenItem)> = t
        .lists
        .iter()
        .flat_map(|l| {
            by_key
                .get(&(l.as_str(), key))
                .into_iter()
                .flatten()
                .map(move |i| (l.as_str(), *i))
        })
        .collect();
    let named = entry.and_then(|e| e.item.as_ref());
    // Item ids are per list: the ledger's item is the one with its id in its list.
    let kept = named.and_then(|r| {
        found
            .iter()
            .find(|(l, i)| i.id == r.item_id && Some(*l) == home)
    });
    let (keep_list, keep) = match (kept, found.first()) {
        (Some(k), _) => (k.0, k.1),
        (None, None) => {
            let list = home.or_else(|| t.lists.first().map(String::as_str));
            out.push(diff(
                DriftClass::Missing,
                &t.table,
                key,
                list.unwrap_or(""),
                None,
            ));
            return;
        }
        // The ledger names no item that exists, but the row has one: where the ledger says (or
        // when the ledger says nothing), the ledger is stale; elsewhere the item was moved.
        (None, Some(_)) => {
            let at_home = found.iter().find(|(l, _)| home.is_none_or(|h| h == *l));
            match at_home {
                Some((l, i)) => {
                    out.push(diff(DriftClass::StaleLedger, &t.table, key, l, Some(i)));
                    (*l, *i)
                }
                None => {
                    let (l, i) = found[0];
                    out.push(diff(DriftClass::Misrouted, &t.table, key, l, Some(i)));
                    (l, i)
                }
            }
        }
    };
    if let Some(e) = entry.filter(|e| e.item.is_some()) {
        let fields = divergent_fields(e, keep);
        if !fields.is_empty() {
            let mut d = diff(DriftClass::Divergent, &t.table, key, keep_list, Some(keep));
            d.fields = fields;
            out.push(d);
        }
    }
    // Every other item with the row's SyncKey (in another list of the entry: SharePoint keeps
    // SyncKey unique within a list) is a duplicate of the kept one. Item ids are per list: an
    // item of another list may carry the kept item's id.
    for (l, i) in found
        .iter()
        .filter(|(l, i)| !(*l == keep_list && i.id == keep.id))
    {
        out.push(diff(DriftClass::Duplicate, &t.table, key, l, Some(i)));
    }
}

/// Items whose SyncKey names no row of a table writing to their list (nor a ledger entry: a
/// row deleted a moment ago whose delete is in flight), and items without SyncKey in lists that
/// do not pull.
fn orphans(s: &Sides, out: &mut Vec<Difference>) {
    for l in &s.lists {
        let tables: Vec<&SeenTable> = s
            .tables
            .iter()
            .filter(|t| t.lists.contains(&l.name))
            .collect();
        for i in &l.items {
            let known = match i.sync_key() {
                None => l.pulls,
                Some(k) => tables.iter().any(|t| {
                    t.keys.contains(k) || s.ledger.contains_key(&(t.table.clone(), k.to_string()))
                }),
            };
            if !known {
                let key = i.sync_key().unwrap_or("");
                let table = tables.first().map_or("", |t| t.table.as_str());
                out.push(diff(DriftClass::Orphaned, table, key, &l.name, Some(i)));
            }
        }
    }
}

/// The differences both passes saw (same class, row and item), as the second pass saw them,
/// except on rows whose ledger entry changed between the passes (a write was in flight).
pub fn confirmed(
    first: (&[Difference], &LedgerView),
    second: (Vec<Difference>, &LedgerView),
) -> Vec<Difference> {
    let (first, before) = first;
    let (second, after) = second;
    let seen: BTreeSet<(DriftClass, &str, &str, &str, Option<&str>)> = first
        .iter()
        .map(|d| {
            (
                d.class,
                d.table.as_str(),
                d.key.as_str(),
                d.list.as_str(),
                d.item_id.as_deref(),
            )
        })
        .collect();
    second
        .into_iter()
        .filter(|d| {
            seen.contains(&(
                d.class,
                d.table.as_str(),
                d.key.as_str(),
                d.list.as_str(),
                d.item_id.as_deref(),
            ))
        })
        .filter(|d| {
            let row = (d.table.clone(), d.key.clone());
            before.get(&row) == after.get(&row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ledger::ItemRef;
    use serde_json::json;

    fn item(id: &str, key: &str, title: &str) -> SeenItem {
        let mut fields = Map::new();
        if !key.is_empty() {
            fields.insert(SYNC_KEY_FIELD.into(), json!(key));
        }
        fields.insert("Title".into(), json!(title));
        SeenItem {
            id: id.into(),
            etag: Some(format!("\"{id},1\"")),
            fields,
        }
    }

    fn entry(list: &str, id: &str, title: &str) -> Entry {
        Entry {
            item: Some(ItemRef {
                list_id: list.into(),
                item_id: id.into(),
            }),
            projection: [("Title".to_string(), json!(title))].into(),
            ..Entry::default()
        }
    }

    /// Table `t` (rows 1..=6) routed to lists A and B; every class seeded once.
    fn seeded() -> Sides {
        let mut ledger = BTreeMap::new();
        for k in 1..=6 {
            let list = "a";
            ledger.insert(
                ("t".into(), k.to_string()),
                entry(list, &format!("i{k}"), &format!("row {k}")),
            );
        }
        ledger.remove(&("t".to_string(), "5".to_string())); // 5: ledger entry deleted
        Sides {
            tables: vec![SeenTable {
                table: "t".into(),
                lists: vec!["A".into(), "B".into()],
                keys: (1..=6).map(|k| k.to_string()).collect(),
            }],
            lists: vec![
                SeenList {
                    name: "A".into(),
                    id: "a".into(),
                    pulls: false,
                    items: vec![
                        // 1: deleted (missing)
                        item("i2", "2", "edited"), // divergent
                        // 3: moved to B (misrouted)
                        item("i4", "4", "row 4"),
                        item("i5", "5", "row 5"), // stale ledger
                        item("i6", "6", "row 6"),
                        item("i9", "9", "no row"), // orphaned
                    ],
                },
                SeenList {
                    name: "B".into(),
                    id: "b".into(),
                    pulls: false,
                    items: vec![item("i3", "3", "row 3"), item("i4b", "4", "row 4")], // moved; duplicate
                },
            ],
            ledger,
        }
    }

    /// Item ids are per list: a duplicate in B whose id equals the kept item's id in A is still
    /// a duplicate (CI saw the emulator hand out such ids).
    #[test]
    fn a_duplicate_with_the_kept_items_id_in_another_list_is_found() {
        let mut sides = seeded();
        sides.lists[1].items[1] = item("i4", "4", "row 4");
        let (diffs, _) = classify(&sides);
        assert!(
            diffs
                .iter()
                .any(|d| d.class == DriftClass::Duplicate && d.key == "4"),
            "{diffs:#?}"
        );
    }

    #[test]
    fn every_class_is_found_once_and_nothing_else() {
        let (diffs, counts) = classify(&seeded());
        let got: Vec<(DriftClass, &str)> =
            diffs.iter().map(|d| (d.class, d.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (DriftClass::Missing, "1"),
                (DriftClass::Divergent, "2"),
                (DriftClass::Misrouted, "3"),
                (DriftClass::Duplicate, "4"),
                (DriftClass::StaleLedger, "5"),
                (DriftClass::Orphaned, "9"),
            ]
        );
        assert_eq!(diffs[1].fields, ["Title"]);
        assert_eq!(
            diffs[3].item_id.as_deref(),
            Some("i4b"),
            "the ledger's item is kept"
        );
        assert_eq!(
            counts[0],
            ListCount {
                list: "A".into(),
                rows: 5,
                items: 5
            },
            "row 5 has no ledger entry: its list is unknown"
        );
        assert_eq!(
            counts[1],
            ListCount {
                list: "B".into(),
                rows: 0,
                items: 2
            }
        );
    }

    #[test]
    fn a_clean_pair_has_no_difference_and_in_flight_rows_are_skipped() {
        let mut s = seeded();
        s.lists[0].items = (1..=6)
            .map(|k| item(&format!("i{k}"), &k.to_string(), &format!("row {k}")))
            .collect();
        s.lists[1].items.clear();
        s.ledger
            .insert(("t".into(), "5".into()), entry("a", "i5", "row 5"));
        assert_eq!(classify(&s).0, []);
        // A row whose create is in flight is not missing yet.
        s.lists[0].items.remove(0);
        s.ledger
            .get_mut(&("t".to_string(), "1".to_string()))
            .unwrap()
            .intent = Some(crate::process::ledger::Intent {
            create_in: "a".into(),
        });
        assert_eq!(classify(&s).0, []);
    }

    #[test]
    fn only_differences_both_passes_saw_are_confirmed() {
        let one = seeded();
        let (first, _) = classify(&one);
        let mut s = seeded();
        // Between the passes the writer wrote row 2 again (a later value than the item holds):
        // divergent in both passes, but in flight.
        s.ledger
            .insert(("t".into(), "2".into()), entry("a", "i2", "newer"));
        // And the orphan's row appeared (its item was made for a row inserted meanwhile).
        s.tables[0].keys.insert("9".into());
        let (second, _) = classify(&s);
        let kept = confirmed((&first, &one.ledger), (second, &s.ledger));
        let keys: Vec<&str> = kept.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["1", "3", "4", "5"]);
    }

    #[test]
    fn numbers_compare_by_value_and_absent_is_null() {
        assert!(same(Some(&json!(1)), Some(&json!(1.0))));
        assert!(same(Some(&json!("2")), Some(&json!(2))));
        assert!(same(None, Some(&Json::Null)));
        assert!(!same(Some(&json!("a")), Some(&json!("b"))));
    }
}
