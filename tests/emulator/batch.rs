//! graph-api.md §7: JSON batching.

use serde_json::{Value, json};

use crate::common::*;

fn relative(list: &str) -> String {
    list.trim_start_matches("/v1.0").to_string()
}

fn by_id<'a>(r: &'a Resp, id: &str) -> &'a Value {
    r.body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .unwrap_or_else(|| panic!("response {id}"))
}

#[tokio::test]
async fn batch_runs_requests_and_reports_each() {
    let emu = Emu::start().await;
    let list = emu
        .create_list("Batched", json!([ { "name": "Qty", "number": {} } ]))
        .await;
    let rel = relative(&list);
    emu.create_item(&list, json!({ "Title": "existing" })).await;
    let mut requests: Vec<Value> = (0..18)
        .map(|i| json!({ "id": format!("c{i}"), "method": "POST", "url": format!("{rel}/items"),
                          "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Title": format!("n{i}") } } }))
        .collect();
    requests.push(json!({ "id": "p", "method": "PATCH", "url": format!("{rel}/items/1/fields"),
                          "headers": { "Content-Type": "application/json", "If-Match": "\"00000000-0000-0000-0000-000000000000,9\"" }, "body": { "Qty": 5 } }));
    requests.push(
        json!({ "id": "g", "method": "GET", "url": format!("{rel}/items/1?$expand=fields") }),
    );
    let r = emu
        .post("/v1.0/$batch", json!({ "requests": requests }))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let responses = r.body["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 20);
    for i in 0..18 {
        let c = by_id(&r, &format!("c{i}"));
        assert_eq!(c["status"], 201);
        assert_eq!(c["body"]["fields"]["Title"], format!("n{i}"));
        assert!(c["headers"].is_object());
    }
    assert_eq!(
        by_id(&r, "p")["status"],
        412,
        "inner failures don't fail the envelope"
    );
    assert_eq!(by_id(&r, "g")["status"], 200);
    let items = emu.get(&format!("{list}/items?$top=100")).await;
    assert_eq!(items.body["value"].as_array().unwrap().len(), 19);
    // Order is not guaranteed: with 20 entries a shuffle that keeps the request order is (almost) impossible.
    let order: Vec<&str> = responses
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    let request_order: Vec<String> = (0..18)
        .map(|i| format!("c{i}"))
        .chain(["p".into(), "g".into()])
        .collect();
    assert_ne!(
        order,
        request_order.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn batch_limits_and_malformed_batches() {
    let emu = Emu::start().await;
    let list = emu.create_list("Limits", json!([])).await;
    let rel = relative(&list);
    let get = |id: String| json!({ "id": id, "method": "GET", "url": format!("{rel}/items") });
    let over: Vec<Value> = (0..21).map(|i| get(i.to_string())).collect();
    let r = emu.post("/v1.0/$batch", json!({ "requests": over })).await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"]["code"].is_string());
    let dup = emu
        .post(
            "/v1.0/$batch",
            json!({ "requests": [get("1".into()), get("1".into())] }),
        )
        .await;
    assert_eq!(dup.status, 400);
    let no_ct = emu
        .post("/v1.0/$batch", json!({ "requests": [ { "id": "1", "method": "POST", "url": format!("{rel}/items"), "body": { "fields": {} } } ] }))
        .await;
    assert_eq!(
        no_ct.status, 400,
        "headers with Content-Type are required with a body"
    );
    let exactly20: Vec<Value> = (0..20).map(|i| get(i.to_string())).collect();
    assert_eq!(
        emu.post("/v1.0/$batch", json!({ "requests": exactly20 }))
            .await
            .status,
        200
    );
    // Inner absolute URLs are rejected per request.
    let abs = emu.post("/v1.0/$batch", json!({ "requests": [ { "id": "1", "method": "GET", "url": format!("https://graph.microsoft.com/v1.0{rel}/items") } ] })).await;
    assert_eq!(abs.status, 200);
    assert_eq!(by_id(&abs, "1")["status"], 400);
}

#[tokio::test]
async fn depends_on_yields_424_after_a_failure() {
    let emu = Emu::start().await;
    let list = emu
        .create_list("Deps", json!([ { "name": "Qty", "number": {} } ]))
        .await;
    let rel = relative(&list);
    let r = emu
        .post(
            "/v1.0/$batch",
            json!({ "requests": [
                { "id": "1", "method": "POST", "url": format!("{rel}/items"), "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Qty": "bad" } } },
                { "id": "2", "method": "POST", "url": format!("{rel}/items"), "dependsOn": ["1"], "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Title": "never" } } },
                { "id": "3", "method": "POST", "url": format!("{rel}/items"), "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Title": "ok" } } },
                { "id": "4", "method": "GET", "url": format!("{rel}/items"), "dependsOn": ["3"] }
            ] }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(by_id(&r, "1")["status"], 400);
    assert_eq!(by_id(&r, "2")["status"], 424);
    assert_eq!(by_id(&r, "3")["status"], 201);
    assert_eq!(by_id(&r, "4")["status"], 200);
    assert_eq!(
        by_id(&r, "4")["body"]["value"].as_array().unwrap().len(),
        1,
        "dependency ran first"
    );
    let unknown = emu.post("/v1.0/$batch", json!({ "requests": [ { "id": "1", "method": "GET", "url": format!("{rel}/items"), "dependsOn": ["9"] } ] })).await;
    assert_eq!(unknown.status, 400);
}

#[tokio::test]
async fn batch_entries_are_throttled_individually() {
    let emu = Emu::start().await;
    let list = emu.create_list("ThrottledBatch", json!([])).await;
    let rel = relative(&list);
    // Creates cost 2 RU each: a 20 RU minute budget admits 10 of 20.
    emu.admin("limits", json!({ "ru_per_minute": 20 })).await;
    let requests: Vec<Value> = (0..20)
        .map(|i| json!({ "id": i.to_string(), "method": "POST", "url": format!("{rel}/items"),
                          "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Title": i.to_string() } } }))
        .collect();
    let r = emu
        .post("/v1.0/$batch", json!({ "requests": requests }))
        .await;
    assert_eq!(r.status, 200);
    let statuses: Vec<u64> = r.body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10);
    let throttled = r.body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["status"] == 429)
        .unwrap();
    assert!(
        throttled["headers"]["Retry-After"]
            .as_str()
            .is_some_and(|s| s.parse::<u64>().is_ok())
    );
    assert_eq!(throttled["body"]["error"]["code"], "activityLimitReached");
}
