//! graph-api.md §5: list items — shapes, writes, eTags, validation, filter, paging.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

fn etag_version(e: &str) -> u64 {
    e.trim_matches('"')
        .rsplit(',')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn create_returns_full_item_with_system_fields() {
    let emu = Emu::start().await;
    let list = emu
        .create_list(
            "Widgets",
            json!([ { "name": "Color", "text": {} }, { "name": "Weight", "number": {} } ]),
        )
        .await;
    let r = emu
        .create_item(
            &list,
            json!({ "Title": "Widget", "Color": "Purple", "Weight": 32 }),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let b = &r.body;
    assert!(
        b["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/items/$entity")
    );
    assert_eq!(b["id"], "1");
    let etag = b["eTag"].as_str().unwrap();
    assert_eq!(b["@odata.etag"], etag);
    assert_eq!(b["fields"]["@odata.etag"], etag);
    assert!(etag.starts_with('"') && etag.ends_with(",1\""), "{etag}");
    let guid = etag.trim_matches('"').split(',').next().unwrap();
    assert!(uuid::Uuid::parse_str(guid).is_ok());
    let created = b["createdDateTime"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.len() == 20,
        "whole seconds UTC: {created}"
    );
    assert_eq!(b["lastModifiedDateTime"], created);
    assert!(
        b["webUrl"]
            .as_str()
            .unwrap()
            .ends_with("/Lists/Widgets/1_.000")
    );
    assert!(
        b["parentReference"]["siteId"]
            .as_str()
            .unwrap()
            .contains(',')
    );
    assert_eq!(b["contentType"]["name"], "Item");
    assert!(b["contentType"]["id"].as_str().unwrap().starts_with("0x01"));
    assert!(b["createdBy"].is_object() && b["lastModifiedBy"].is_object());
    let f = &b["fields"];
    assert_eq!(f["Title"], "Widget");
    assert_eq!(f["Color"], "Purple");
    assert_eq!(f["Weight"], 32);
    assert_eq!(f["id"], "1");
    assert_eq!(f["ContentType"], "Item");
    assert_eq!(f["Created"], created);
    assert_eq!(f["Modified"], created);
    assert!(f["AuthorLookupId"].is_string() && f["EditorLookupId"].is_string());
    assert_eq!(f["_UIVersionString"], "1.0");
    assert!(
        f["AppAuthorLookupId"].is_string(),
        "app-only writes carry AppAuthorLookupId"
    );

    // Items list without $expand has no fields; with $expand=fields($select=…) only those.
    let plain = emu.get(&format!("{list}/items")).await;
    assert!(plain.body["value"][0].get("fields").is_none());
    let sel = emu
        .get(&format!("{list}/items?$expand=fields($select=Color)"))
        .await;
    let fields = sel.body["value"][0]["fields"].as_object().unwrap();
    assert_eq!(fields["Color"], "Purple");
    assert!(!fields.contains_key("Weight") && !fields.contains_key("Title"));
    let sel2 = emu
        .get(&format!(
            "{list}/items/1?expand=fields(select=Weight,Title)"
        ))
        .await;
    assert_eq!(sel2.body["fields"]["Weight"], 32);
    assert!(sel2.body["fields"].get("Color").is_none());
    // Empty values are omitted.
    let r2 = emu.create_item(&list, json!({ "Title": "No color" })).await;
    assert!(r2.body["fields"].get("Color").is_none());
}

#[tokio::test]
async fn update_delete_ids_and_etags() {
    let emu = Emu::start().await;
    let list = emu
        .create_list(
            "Things",
            json!([ { "name": "Qty", "number": {} }, { "name": "Color", "text": {} } ]),
        )
        .await;
    let a = emu
        .create_item(&list, json!({ "Title": "a", "Qty": 1, "Color": "red" }))
        .await;
    let e1 = a.body["eTag"].as_str().unwrap().to_string();
    let p = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Qty": 5 })),
            &[],
        )
        .await;
    assert_eq!(p.status, 200, "{:?}", p.body);
    // Full fieldValueSet, untouched columns kept.
    assert_eq!(p.body["Qty"], 5);
    assert_eq!(p.body["Color"], "red");
    assert_eq!(p.body["Title"], "a");
    assert_eq!(p.body["_UIVersionString"], "2.0");
    let e2 = p.body["@odata.etag"].as_str().unwrap().to_string();
    assert_eq!(etag_version(&e2), etag_version(&e1) + 1);
    assert_eq!(e1.split(',').next(), e2.split(',').next(), "same item guid");
    // Clear with null.
    let c = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Color": null })),
            &[],
        )
        .await;
    assert!(c.body.get("Color").is_none());

    // If-Match mismatch: 412 and nothing changes.
    let stale = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Qty": 99 })),
            &[("If-Match", &e1)],
        )
        .await;
    assert_eq!(stale.status, 412);
    let now = emu.get(&format!("{list}/items/1?$expand=fields")).await;
    assert_eq!(now.body["fields"]["Qty"], 5);
    let cur = now.body["eTag"].as_str().unwrap().to_string();
    assert_eq!(etag_version(&cur), 3);
    let del_stale = emu
        .call(
            Method::DELETE,
            &format!("{list}/items/1"),
            None,
            &[("If-Match", &e2)],
        )
        .await;
    assert_eq!(del_stale.status, 412);
    assert_eq!(emu.get(&format!("{list}/items/1")).await.status, 200);
    // Matching If-Match works.
    let ok = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Qty": 7 })),
            &[("If-Match", &cur)],
        )
        .await;
    assert_eq!(ok.status, 200);

    // Delete → 204 empty, then 404; ids are never reused.
    emu.create_item(&list, json!({ "Title": "b" })).await;
    let d = emu
        .call(Method::DELETE, &format!("{list}/items/2"), None, &[])
        .await;
    assert_eq!(d.status, 204);
    assert!(d.body.is_null());
    assert_eq!(emu.get(&format!("{list}/items/2")).await.status, 404);
    assert_eq!(
        emu.get(&format!("{list}/items/2")).await.code(),
        "itemNotFound"
    );
    let c3 = emu.create_item(&list, json!({ "Title": "c" })).await;
    assert_eq!(c3.body["id"], "3");
}

#[tokio::test]
async fn person_client_edits_look_like_a_person() {
    let emu = Emu::start().await;
    let list = emu.create_list("Shared", json!([])).await;
    emu.create_item(&list, json!({ "Title": "by app" })).await;
    let person = emu.token_for(USER_CLIENT_ID, USER_SECRET).await;
    let p = emu
        .call_as(
            &person,
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Title": "by person" })),
            &[],
        )
        .await;
    assert_eq!(p.status, 200);
    assert!(p.body.get("AppEditorLookupId").is_none());
    assert_ne!(p.body["EditorLookupId"], p.body["AuthorLookupId"]);
    let item = emu.get(&format!("{list}/items/1")).await;
    assert!(
        item.body["lastModifiedBy"]["user"]["email"].is_string(),
        "{:?}",
        item.body["lastModifiedBy"]
    );
    assert!(item.body["lastModifiedBy"].get("application").is_none());
    assert!(item.body["createdBy"].get("application").is_some());
}

async fn typed_list(emu: &Emu) -> String {
    let customers = emu.create_list("Customers", json!([])).await;
    emu.create_item(&customers, json!({ "Title": "Contoso" }))
        .await;
    let cid = customers.rsplit('/').next().unwrap().to_string();
    emu.create_list(
        "Typed",
        json!([
            { "name": "Code", "text": { "maxLength": 5 }, "indexed": true, "enforceUniqueValues": true },
            { "name": "Notes", "text": { "allowMultipleLines": true } },
            { "name": "Qty", "number": { "minimum": 0, "maximum": 100 } },
            { "name": "Price", "currency": {} },
            { "name": "Due", "dateTime": { "format": "dateOnly" } },
            { "name": "At", "dateTime": { "format": "dateTime" } },
            { "name": "Active", "boolean": {} },
            { "name": "Status", "choice": { "choices": ["Open", "Closed"] } },
            { "name": "Tags", "choice": { "choices": ["a", "b"], "displayAs": "checkBoxes" } },
            { "name": "Owner", "personOrGroup": {} },
            { "name": "Watchers", "personOrGroup": { "allowMultipleSelection": true } },
            { "name": "Customer", "lookup": { "listId": cid, "columnName": "Title" } },
            { "name": "Link", "hyperlinkOrPicture": {} },
            { "name": "Must", "text": {}, "required": true }
        ]),
    )
    .await
}

#[tokio::test]
async fn valid_values_of_every_type_round_trip() {
    let emu = Emu::start().await;
    let list = typed_list(&emu).await;
    let r = emu
        .create_item(
            &list,
            json!({
                "Must": "x", "Code": "A1", "Notes": "line1\nline2", "Qty": 12.5, "Price": 123.32,
                "Due": "2024-10-24", "At": "2024-10-24T13:11:11+02:00", "Active": true, "Status": "Open",
                "Tags@odata.type": "Collection(Edm.String)", "Tags": ["a", "b"],
                "OwnerLookupId": 7, "WatchersLookupId@odata.type": "Collection(Edm.Int32)", "WatchersLookupId": [6, 10],
                "CustomerLookupId": "1"
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let f = &r.body["fields"];
    assert_eq!(f["Notes"], "line1\nline2");
    assert_eq!(f["Qty"], 12.5);
    assert_eq!(f["Price"], 123.32);
    assert_eq!(f["Due"], "2024-10-24T00:00:00Z");
    assert_eq!(f["At"], "2024-10-24T11:11:11Z");
    assert_eq!(f["Active"], true);
    assert_eq!(f["Tags"], json!(["a", "b"]));
    assert_eq!(f["OwnerLookupId"], "7");
    assert_eq!(f["CustomerLookupId"], "1");
    assert!(
        f.get("Owner").is_none(),
        "lookups are not returned by name by default"
    );
    // Selected by name, a lookup returns its display value.
    let sel = emu
        .get(&format!(
            "{list}/items/1?$expand=fields($select=Customer,Owner)"
        ))
        .await;
    assert_eq!(sel.body["fields"]["Customer"], "Contoso");
    assert_eq!(sel.body["fields"]["Owner"], "Adele Vance");
}

#[tokio::test]
async fn invalid_values_get_400_and_change_nothing() {
    let emu = Emu::start().await;
    let list = typed_list(&emu).await;
    let base = json!({ "Must": "x" });
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let bad: Vec<(Value, &str)> = vec![
        (with(json!({ "Code": "TOOLONG" })), "text over maxLength"),
        (with(json!({ "Status": "Maybe" })), "unknown choice"),
        (with(json!({ "Qty": "twelve" })), "number as text"),
        (with(json!({ "Qty": 101 })), "number above maximum"),
        (with(json!({ "Active": "yes" })), "boolean as text"),
        (with(json!({ "At": "not a date" })), "bad date"),
        (
            with(json!({ "Tags": ["a"] })),
            "multi-choice without @odata.type",
        ),
        (
            with(json!({ "Tags@odata.type": "Collection(Edm.String)", "Tags": ["z"] })),
            "unknown multi choice",
        ),
        (
            with(json!({ "WatchersLookupId": [6] })),
            "multi-person without @odata.type",
        ),
        (with(json!({ "OwnerLookupId": 4242 })), "unknown person"),
        (
            with(json!({ "CustomerLookupId": 999 })),
            "missing lookup target",
        ),
        (with(json!({ "Owner": "Adele" })), "lookup written by name"),
        (
            with(json!({ "Link": { "Url": "https://x", "Description": "x" } })),
            "hyperlink writes fail in Graph",
        ),
        (with(json!({ "Nope": 1 })), "unknown field"),
        (
            with(json!({ "Created": "2024-01-01T00:00:00Z" })),
            "read-only Created",
        ),
        (with(json!({ "AuthorLookupId": 6 })), "read-only Author"),
        (
            with(json!({ "_UIVersionString": "9.0" })),
            "read-only version",
        ),
        (json!({ "Code": "A" }), "missing required"),
        (with(json!({ "Must": null })), "required set to null"),
    ];
    for (fields, why) in bad {
        let r = emu.create_item(&list, fields).await;
        assert_eq!(r.status, 400, "{why}: {:?}", r.body);
        assert_eq!(r.code(), "invalidRequest", "{why}");
    }
    let items = emu.get(&format!("{list}/items")).await;
    assert_eq!(
        items.body["value"].as_array().unwrap().len(),
        0,
        "no side effects"
    );

    // Unique column: second item with the same value (any case) fails; updates too.
    assert_eq!(
        emu.create_item(&list, with(json!({ "Code": "AB" })))
            .await
            .status,
        201
    );
    let dup = emu.create_item(&list, with(json!({ "Code": "ab" }))).await;
    assert_eq!(dup.status, 400);
    assert_eq!(
        emu.create_item(&list, with(json!({ "Code": "CD" })))
            .await
            .status,
        201
    );
    let clash = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/2/fields"),
            Some(json!({ "Code": "AB" })),
            &[],
        )
        .await;
    assert_eq!(clash.status, 400);
    // Re-writing an item's own value is fine; freed values can be reused after delete.
    assert_eq!(
        emu.call(
            Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Code": "AB" })),
            &[]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        emu.call(Method::DELETE, &format!("{list}/items/1"), None, &[])
            .await
            .status,
        204
    );
    assert_eq!(
        emu.create_item(&list, with(json!({ "Code": "AB" })))
            .await
            .status,
        201
    );
    // PATCH with a bad value changes nothing.
    let before = emu.get(&format!("{list}/items/2?$expand=fields")).await;
    let bad_patch = emu
        .call(
            Method::PATCH,
            &format!("{list}/items/2/fields"),
            Some(json!({ "Qty": 5, "Status": "Nope" })),
            &[],
        )
        .await;
    assert_eq!(bad_patch.status, 400);
    let after = emu.get(&format!("{list}/items/2?$expand=fields")).await;
    assert_eq!(before.body["eTag"], after.body["eTag"]);
    assert!(after.body["fields"].get("Qty").is_none());
}

#[tokio::test]
async fn paging_follows_next_links() {
    let emu = Emu::start().await;
    let list = emu
        .create_list("Paged", json!([ { "name": "N", "number": {} } ]))
        .await;
    for i in 0..25 {
        emu.create_item(&list, json!({ "Title": format!("t{i}"), "N": i }))
            .await;
    }
    let mut url = format!("{list}/items?$expand=fields&$top=10");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = emu.get(&url).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        pages += 1;
        for v in r.body["value"].as_array().unwrap() {
            assert!(v["fields"].is_object(), "nextLink keeps $expand");
            seen.push(v["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
        match r.body["@odata.nextLink"].as_str() {
            Some(next) => {
                assert!(
                    next.contains("$skiptoken=") && next.contains("$top=10"),
                    "{next}"
                );
                url = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    // Default page size is 200 (configurable).
    let r = emu.get(&format!("{list}/items")).await;
    assert_eq!(r.body["value"].as_array().unwrap().len(), 25);
    assert!(r.body.get("@odata.nextLink").is_none());
    emu.admin("limits", json!({ "page_size": 7 })).await;
    let r = emu.get(&format!("{list}/items")).await;
    assert_eq!(r.body["value"].as_array().unwrap().len(), 7);
    assert!(r.body["@odata.nextLink"].is_string());
}

#[tokio::test]
async fn filter_operators_and_index_rules() {
    let emu = Emu::start().await;
    let list = emu
        .create_list(
            "Filtered",
            json!([
                { "name": "Status", "choice": { "choices": ["Open", "Closed"] }, "indexed": true },
                { "name": "Qty", "number": {}, "indexed": true },
                { "name": "Name", "text": {}, "indexed": true },
                { "name": "Plain", "text": {} },
                { "name": "Active", "boolean": {}, "indexed": true }
            ]),
        )
        .await;
    let rows = [
        ("Open", 5, "apple", true),
        ("Closed", 600, "banana", false),
        ("Open", 700, "avocado", true),
        ("Closed", 10, "it's", true),
    ];
    for (s, q, n, a) in rows {
        let r = emu
            .create_item(
                &list,
                json!({ "Status": s, "Qty": q, "Name": n, "Plain": n, "Active": a }),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let ids = |r: &Resp| -> Vec<String> {
        r.body["value"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    };
    let q = |f: &str| {
        format!(
            "{list}/items?$filter={}",
            url::form_urlencoded::byte_serialize(f.as_bytes()).collect::<String>()
        )
    };
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("fields/Status eq 'Open'", vec!["1", "3"]),
        ("fields/Status ne 'Open'", vec!["2", "4"]),
        ("fields/Qty lt 600", vec!["1", "4"]),
        ("fields/Qty le 600", vec!["1", "2", "4"]),
        ("fields/Qty gt 600", vec!["3"]),
        ("fields/Qty ge 600", vec!["2", "3"]),
        ("startswith(fields/Name,'a')", vec!["1", "3"]),
        ("fields/Status eq 'Open' and fields/Qty gt 10", vec!["3"]),
        ("fields/Qty eq 5 or fields/Qty eq 600", vec!["1", "2"]),
        ("fields/Name eq 'it''s'", vec!["4"]),
        ("fields/Active eq 1", vec!["1", "3", "4"]),
        ("fields/Active eq false", vec!["2"]),
    ];
    for (f, want) in cases {
        let r = emu.get(&q(f)).await;
        assert_eq!(r.status, 200, "{f}: {:?}", r.body);
        assert_eq!(ids(&r), want, "{f}");
    }
    // Non-indexed column: 400 without the Prefer header, works with it.
    let r = emu.get(&q("fields/Plain eq 'apple'")).await;
    assert_eq!(r.status, 400);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("HonorNonIndexedQueriesWarningMayFailRandomly")
    );
    let r = emu
        .call(
            Method::GET,
            &q("fields/Plain eq 'apple'"),
            None,
            &[("Prefer", "HonorNonIndexedQueriesWarningMayFailRandomly")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(ids(&r), vec!["1"]);
    // Above the list view threshold the Prefer-enabled query fails (configurable threshold).
    emu.admin("limits", json!({ "list_view_threshold": 3 }))
        .await;
    let r = emu
        .call(
            Method::GET,
            &q("fields/Plain eq 'apple'"),
            None,
            &[("Prefer", "HonorNonIndexedQueriesWarningMayFailRandomly")],
        )
        .await;
    assert_eq!(r.status, 429);
    // Indexed filters are unaffected; malformed filters and unknown fields are 400.
    assert_eq!(emu.get(&q("fields/Qty gt 1")).await.status, 200);
    assert_eq!(emu.get(&q("fields/Qty gt")).await.status, 400);
    assert_eq!(emu.get(&q("fields/Nope eq 1")).await.status, 400);
    // Filtered paging still pages.
    let r = emu
        .get(&format!("{}&$top=1", q("fields/Status eq 'Open'")))
        .await;
    assert_eq!(ids(&r), vec!["1"]);
    let next = r.body["@odata.nextLink"].as_str().unwrap().to_string();
    assert_eq!(ids(&emu.get(&next).await), vec!["3"]);
}
