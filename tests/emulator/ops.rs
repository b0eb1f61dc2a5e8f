//! Issue 3 §6, §8: admin endpoints and the HTML view.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn html_view_lists_sites_lists_and_escaped_items() {
    let emu = Emu::start().await;
    let list = emu.create_list("Demo <List>", json!([])).await;
    emu.create_item(&list, json!({ "Title": "<script>alert('x')</script>" }))
        .await;
    let home = emu.http.get(format!("{}/", emu.base)).send().await.unwrap();
    assert_eq!(home.status().as_u16(), 200);
    assert!(
        home.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let home = home.text().await.unwrap();
    assert!(home.contains("contoso.sharepoint.com/sites/dev"));
    let site = emu.site_id().await;
    let enc: String = url::form_urlencoded::byte_serialize(site.as_bytes()).collect();
    let lists = emu
        .http
        .get(format!("{}/?site={enc}", emu.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(lists.contains("Demo &lt;List&gt;"), "{lists}");
    let list_id = list.rsplit('/').next().unwrap();
    let items = emu
        .http
        .get(format!("{}/?site={enc}&list={list_id}", emu.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(items.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(!items.contains("<script>"));
}

#[tokio::test]
async fn reset_clears_data_but_keeps_configured_sites() {
    let emu = Emu::start().await;
    let list = emu.create_list("Gone", json!([])).await;
    emu.create_item(&list, json!({ "Title": "x" })).await;
    assert_eq!(emu.admin("reset", json!({})).await.status, 204);
    assert_eq!(emu.get(&list).await.status, 404);
    assert_eq!(
        emu.get("/v1.0/sites/contoso.sharepoint.com:/sites/dev")
            .await
            .status,
        200
    );
    let stats = emu.stats().await;
    assert_eq!(stats["lists"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn unknown_paths_and_bad_json() {
    let emu = Emu::start().await;
    assert_eq!(emu.get("/v1.0/me").await.status, 400);
    let site = emu.site_id().await;
    let r = emu
        .http
        .post(format!("{}/v1.0/sites/{site}/lists", emu.base))
        .header("authorization", format!("Bearer {}", emu.token))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        emu.admin("faults", json!({ "throttle_rate": 2.0 }))
            .await
            .status,
        400
    );
    assert_eq!(emu.admin("nope", json!({})).await.status, 404);
}

#[tokio::test]
async fn stats_count_calls_per_client_with_batch_entries_by_their_method() {
    let emu = Emu::start().await;
    let list = emu.create_list("Per client", json!([])).await;
    let rel = list.trim_start_matches("/v1.0").to_string();
    emu.create_item(&list, json!({ "Title": "app" })).await;
    let requests = json!([
        { "id": "1", "method": "POST", "url": format!("{rel}/items"),
          "headers": { "Content-Type": "application/json" }, "body": { "fields": { "Title": "b" } } },
        { "id": "2", "method": "PATCH", "url": format!("{rel}/items/1/fields"),
          "headers": { "Content-Type": "application/json" }, "body": { "Title": "c" } },
    ]);
    let r = emu
        .post("/v1.0/$batch", json!({ "requests": requests }))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let person = emu.token_for(USER_CLIENT_ID, USER_SECRET).await;
    let r = emu
        .call_as(
            &person,
            reqwest::Method::PATCH,
            &format!("{list}/items/1/fields"),
            Some(json!({ "Title": "by a person" })),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let stats = emu.stats().await;
    let by_client = &stats["requests"]["by_client"];
    // The app: list create, item create and the batch's POST entry (not the envelope).
    assert_eq!(by_client[CLIENT_ID]["POST"], 3, "{by_client}");
    assert_eq!(by_client[CLIENT_ID]["PATCH"], 1, "{by_client}");
    assert_eq!(by_client[USER_CLIENT_ID]["PATCH"], 1, "{by_client}");
    assert!(
        by_client[USER_CLIENT_ID].get("POST").is_none(),
        "{by_client}"
    );
    assert_eq!(stats["requests"]["batches"], 1);
}
