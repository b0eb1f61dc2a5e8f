//! graph-api.md §6: items/delta.

use reqwest::Method;
use serde_json::{Value, json};

use crate::common::*;

/// Follows nextLinks until a deltaLink; returns (all entries, deltaLink, pages).
async fn round(emu: &Emu, first: &str) -> (Vec<Value>, String, usize) {
    let mut url = first.to_string();
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let r = emu.get(&url).await;
        assert_eq!(r.status, 200, "{url}: {:?}", r.body);
        pages += 1;
        all.extend(r.body["value"].as_array().unwrap().iter().cloned());
        if let Some(n) = r.body["@odata.nextLink"].as_str() {
            assert!(
                r.body.get("@odata.deltaLink").is_none(),
                "exactly one of nextLink/deltaLink"
            );
            url = n.to_string();
            continue;
        }
        let d = r.body["@odata.deltaLink"]
            .as_str()
            .expect("deltaLink at the end of a round")
            .to_string();
        return (all, d, pages);
    }
}

#[tokio::test]
async fn delta_enumerates_then_reports_latest_changes_and_deletes() {
    let emu = Emu::start().await;
    let list = emu
        .create_list("Tracked", json!([ { "name": "Qty", "number": {} } ]))
        .await;
    for i in 1..=5 {
        emu.create_item(&list, json!({ "Title": format!("t{i}"), "Qty": i }))
            .await;
    }
    let (items, delta_link, pages) =
        round(&emu, &format!("{list}/items/delta?$expand=fields&$top=2")).await;
    assert_eq!(pages, 3);
    assert_eq!(items.len(), 5);
    assert!(delta_link.contains("token="), "{delta_link}");
    for it in &items {
        assert!(
            it["fields"].is_object(),
            "$expand=fields honoured on every page"
        );
        assert!(
            it.get("lastModifiedBy").is_none(),
            "delta items carry no lastModifiedBy"
        );
    }

    // Nothing changed: empty round.
    let (none, delta_link, _) = round(&emu, &delta_link).await;
    assert!(none.is_empty());

    // Edit item 2 twice, delete 3, create 6: latest state once per item, delete as a facet.
    emu.call(
        Method::PATCH,
        &format!("{list}/items/2/fields"),
        Some(json!({ "Title": "first" })),
        &[],
    )
    .await;
    emu.call(
        Method::PATCH,
        &format!("{list}/items/2/fields"),
        Some(json!({ "Title": "second" })),
        &[],
    )
    .await;
    emu.call(Method::DELETE, &format!("{list}/items/3"), None, &[])
        .await;
    emu.create_item(&list, json!({ "Title": "t6" })).await;
    let (changes, next_delta, _) = round(&emu, &delta_link).await;
    let ids: Vec<&str> = changes.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.iter().filter(|i| **i == "2").count(), 1);
    assert_eq!(changes.len(), 3, "{changes:?}");
    let two = changes.iter().find(|c| c["id"] == "2").unwrap();
    assert_eq!(
        two["fields"]["Title"], "second",
        "query options carried by the deltaLink"
    );
    let three = changes.iter().find(|c| c["id"] == "3").unwrap();
    assert_eq!(three["deleted"]["state"], "deleted");
    assert!(three.get("fields").is_none());
    assert!(changes.iter().any(|c| c["id"] == "6"));

    // A person's edit shows up too.
    let person = emu.token_for(USER_CLIENT_ID, USER_SECRET).await;
    emu.call_as(
        &person,
        Method::PATCH,
        &format!("{list}/items/1/fields"),
        Some(json!({ "Qty": 100 })),
        &[],
    )
    .await;
    let (c2, _, _) = round(&emu, &next_delta).await;
    assert_eq!(c2.len(), 1);
    assert_eq!(c2[0]["fields"]["Qty"], 100);
}

#[tokio::test]
async fn token_latest_returns_only_a_delta_link() {
    let emu = Emu::start().await;
    let list = emu.create_list("Latest", json!([])).await;
    emu.create_item(&list, json!({ "Title": "old" })).await;
    let r = emu.get(&format!("{list}/items/delta?token=latest")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["value"], json!([]));
    let link = r.body["@odata.deltaLink"].as_str().unwrap().to_string();
    emu.create_item(&list, json!({ "Title": "new" })).await;
    let (changes, _, _) = round(&emu, &link).await;
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["id"], "2");
}

#[tokio::test]
async fn delta_tokens_expire_with_410_and_location() {
    let emu = Emu::start().await;
    let list = emu.create_list("Expiring", json!([])).await;
    emu.create_item(&list, json!({ "Title": "a" })).await;
    let (_, link, _) = round(&emu, &format!("{list}/items/delta")).await;

    // Forced expiry.
    assert_eq!(
        emu.admin("expire-delta-tokens", json!({})).await.status,
        204
    );
    let r = emu.get(&link).await;
    assert_eq!(r.status, 410);
    assert_eq!(r.code(), "resyncRequired");
    let loc = r.header("location").expect("Location header").to_string();
    let (again, link2, _) = round(&emu, &loc).await;
    assert_eq!(again.len(), 1, "Location restarts a full enumeration");

    // Lifetime expiry (configurable) with the controllable clock.
    emu.admin("limits", json!({ "delta_token_lifetime_secs": 3600 }))
        .await;
    emu.admin("clock/advance", json!({ "secs": 3000 })).await;
    let token = emu.token_for(CLIENT_ID, SECRET).await;
    let ok = emu.call_as(&token, Method::GET, &link2, None, &[]).await;
    assert_eq!(ok.status, 200);
    emu.admin("clock/advance", json!({ "secs": 700 })).await;
    let token = emu.token_for(CLIENT_ID, SECRET).await;
    let gone = emu.call_as(&token, Method::GET, &link2, None, &[]).await;
    assert_eq!(gone.status, 410);

    // A garbage token is unusable too.
    let bad = emu
        .call_as(
            &token,
            Method::GET,
            &format!("{list}/items/delta?token=bm9wZQ"),
            None,
            &[],
        )
        .await;
    assert_eq!(bad.status, 410);
}

#[tokio::test]
async fn delta_replays_can_be_injected() {
    let emu = Emu::start().await;
    let list = emu.create_list("Replay", json!([])).await;
    for i in 0..20 {
        emu.create_item(&list, json!({ "Title": format!("{i}") }))
            .await;
    }
    emu.admin("faults", json!({ "delta_replay_rate": 0.5, "seed": 3 }))
        .await;
    let (items, _, _) = round(&emu, &format!("{list}/items/delta")).await;
    assert!(items.len() > 20, "some entries repeated");
    let mut ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20);
}
