//! graph-api.md §2–4: sites, lists, columns.

use serde_json::{Value, json};

use crate::common::*;

#[tokio::test]
async fn sites_by_path_id_root_continuation_and_group() {
    let emu = Emu::start().await;
    let by_path = emu
        .get("/v1.0/sites/contoso.sharepoint.com:/sites/dev")
        .await;
    assert_eq!(by_path.status, 200);
    let id = by_path.body["id"].as_str().unwrap().to_string();
    let parts: Vec<&str> = id.split(',').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0], "contoso.sharepoint.com");
    assert!(uuid::Uuid::parse_str(parts[1]).is_ok() && uuid::Uuid::parse_str(parts[2]).is_ok());
    assert_eq!(
        by_path.body["webUrl"],
        "https://contoso.sharepoint.com/sites/dev"
    );
    assert_eq!(
        by_path.body["siteCollection"]["hostname"],
        "contoso.sharepoint.com"
    );
    assert!(
        by_path.body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("$metadata#sites/$entity")
    );

    let by_id = emu.get(&format!("/v1.0/sites/{id}")).await;
    assert_eq!(by_id.status, 200);
    assert_eq!(by_id.body["id"], id.as_str());
    // Composite ids are accepted case-insensitively (real tenants vary).
    assert_eq!(
        emu.get(&format!("/v1.0/sites/{}", id.to_uppercase()))
            .await
            .status,
        200
    );
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    assert_eq!(
        emu.get("/v1.0/sites/contoso.sharepoint.com").await.status,
        200
    );

    let list = emu.create_list("Orders", json!([])).await;
    let list_id = list.rsplit('/').next().unwrap();
    let cont = emu
        .get("/v1.0/sites/contoso.sharepoint.com:/sites/dev:/lists/Orders/items")
        .await;
    assert_eq!(cont.status, 200, "{:?}", cont.body);
    let cont2 = emu
        .get(&format!(
            "/v1.0/sites/contoso.sharepoint.com:/sites/dev:/lists/{list_id}"
        ))
        .await;
    assert_eq!(cont2.body["displayName"], "Orders");

    let missing = emu
        .get("/v1.0/sites/contoso.sharepoint.com:/sites/nope")
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.code(), "itemNotFound");

    let added = emu.admin("sites", json!({ "hostname": "fabrikam.sharepoint.com", "path": "/sites/team", "group_id": "0b4c2b2e-1111-4a4a-9c9c-000000000001" })).await;
    assert_eq!(added.status, 201, "{:?}", added.body);
    assert_eq!(
        emu.get("/v1.0/sites/fabrikam.sharepoint.com:/sites/team")
            .await
            .status,
        200
    );
    let group = emu
        .get("/v1.0/groups/0b4c2b2e-1111-4a4a-9c9c-000000000001/sites/root")
        .await;
    assert_eq!(group.status, 200);
    assert_eq!(
        group.body["webUrl"],
        "https://fabrikam.sharepoint.com/sites/team"
    );
}

#[tokio::test]
async fn create_and_get_lists() {
    let emu = Emu::start().await;
    let site = emu.site_id().await;
    let r = emu
        .post(&format!("/v1.0/sites/{site}/lists"), json!({ "displayName": "Books", "columns": [ { "name": "Author", "text": {} }, { "name": "PageCount", "number": {} } ] }))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(r.body["name"], "Books");
    assert_eq!(r.body["list"]["template"], "genericList");
    assert_eq!(r.body["list"]["hidden"], false);
    assert_eq!(r.body["parentReference"]["siteId"], site.as_str());
    assert_eq!(
        r.body["webUrl"],
        "https://contoso.sharepoint.com/sites/dev/Lists/Books"
    );
    let etag = r.body["eTag"].as_str().unwrap().to_string();
    assert_eq!(
        etag,
        format!(
            "\"{id},{}\"",
            etag.trim_matches('"').rsplit(',').next().unwrap()
        )
    );
    assert!(etag.starts_with(&format!("\"{id},")));

    // By id and by display name (case-insensitive).
    assert_eq!(
        emu.get(&format!("/v1.0/sites/{site}/lists/{id}"))
            .await
            .body["displayName"],
        "Books"
    );
    assert_eq!(
        emu.get(&format!("/v1.0/sites/{site}/lists/books"))
            .await
            .body["id"],
        id.as_str()
    );
    let unknown = emu.get(&format!("/v1.0/sites/{site}/lists/Nope")).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.code(), "itemNotFound");

    // Enumerate, and the $filter=displayName form.
    emu.post(
        &format!("/v1.0/sites/{site}/lists"),
        json!({ "displayName": "Other List" }),
    )
    .await;
    let all = emu.get(&format!("/v1.0/sites/{site}/lists")).await;
    let names: Vec<&str> = all.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["displayName"].as_str())
        .collect();
    assert!(names.contains(&"Books") && names.contains(&"Other List"));
    let filtered = emu
        .get(&format!(
            "/v1.0/sites/{site}/lists?$filter=displayName eq 'Other List'"
        ))
        .await;
    assert_eq!(filtered.body["value"].as_array().unwrap().len(), 1);
    let other = &filtered.body["value"][0];
    assert_eq!(
        other["webUrl"],
        "https://contoso.sharepoint.com/sites/dev/Lists/Other%20List"
    );

    // Title comes with genericList; the given columns exist by internal name.
    let cols = emu
        .get(&format!("/v1.0/sites/{site}/lists/{id}/columns"))
        .await;
    let names: Vec<&str> = cols.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for n in ["Title", "Author", "PageCount", "Created", "Modified"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    // "Author" is also the built-in Created By column: the new one gets a distinct internal name.
    let authors: Vec<&serde_json::Value> = cols.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["displayName"] == "Author")
        .collect();
    assert_eq!(authors.len(), 1);
    let author_name = authors[0]["name"].as_str().unwrap();
    assert_ne!(author_name, "Author");
    assert!(authors[0]["text"].is_object());
}

#[tokio::test]
async fn list_create_errors() {
    let emu = Emu::start().await;
    let site = emu.site_id().await;
    let url = format!("/v1.0/sites/{site}/lists");
    let named = emu
        .post(&url, json!({ "displayName": "X", "name": "X" }))
        .await;
    assert_eq!(named.status, 400);
    assert_eq!(named.code(), "invalidRequest");
    assert!(
        named.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'name'")
    );
    let untyped = emu
        .post(
            &url,
            json!({ "displayName": "Y", "columns": [ { "name": "Mystery" } ] }),
        )
        .await;
    assert_eq!(untyped.status, 400);
    assert!(
        untyped.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unable to determine type")
    );
    assert_eq!(
        emu.post(&url, json!({ "displayName": "Z" })).await.status,
        201
    );
    assert_eq!(
        emu.post(&url, json!({ "displayName": "Z" })).await.status,
        409
    );
}

#[tokio::test]
async fn list_etag_changes_on_schema_change_only() {
    let emu = Emu::start().await;
    let list = emu.create_list("Schema", json!([])).await;
    let e1 = emu.get(&list).await.body["eTag"]
        .as_str()
        .unwrap()
        .to_string();
    emu.create_item(&list, json!({ "Title": "a" })).await;
    let e2 = emu.get(&list).await.body["eTag"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(e1, e2, "item writes are not schema changes");
    let c = emu
        .post(
            &format!("{list}/columns"),
            json!({ "name": "Color", "text": { "maxLength": 20 } }),
        )
        .await;
    assert_eq!(c.status, 201, "{:?}", c.body);
    let e3 = emu.get(&list).await.body["eTag"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(e2, e3);
    let n = |e: &str| {
        e.trim_matches('"')
            .rsplit(',')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(n(&e3), n(&e2) + 1);
}

#[tokio::test]
async fn columns_every_type_and_names() {
    let emu = Emu::start().await;
    let list = emu.create_list("Cols", json!([])).await;
    let target = emu.create_list("Customers", json!([])).await;
    let target_id = target.rsplit('/').next().unwrap().to_string();
    let defs: Vec<Value> = vec![
        json!({ "name": "Code", "text": { "maxLength": 10 }, "indexed": true, "enforceUniqueValues": true }),
        json!({ "name": "Notes", "text": { "allowMultipleLines": true } }),
        json!({ "name": "Qty", "number": { "minimum": 0, "maximum": 1000 } }),
        json!({ "name": "Price", "currency": { "locale": "en-us" } }),
        json!({ "name": "Due", "dateTime": { "format": "dateOnly" } }),
        json!({ "name": "At", "dateTime": { "format": "dateTime" } }),
        json!({ "name": "Active", "boolean": {} }),
        json!({ "name": "Status", "choice": { "choices": ["Open", "Closed"] } }),
        json!({ "name": "Tags", "choice": { "choices": ["a", "b", "c"], "displayAs": "checkBoxes" } }),
        json!({ "name": "Owner", "personOrGroup": {} }),
        json!({ "name": "Customer", "lookup": { "listId": target_id, "columnName": "Title" } }),
        json!({ "name": "Link", "hyperlinkOrPicture": { "isPicture": false } }),
        json!({ "displayName": "First Name", "text": {}, "required": true }),
    ];
    for d in &defs {
        let r = emu.post(&format!("{list}/columns"), d.clone()).await;
        assert_eq!(r.status, 201, "{d}: {:?}", r.body);
        assert!(uuid::Uuid::parse_str(r.body["id"].as_str().unwrap()).is_ok());
    }
    let cols = emu.get(&format!("{list}/columns")).await.body["value"]
        .as_array()
        .unwrap()
        .clone();
    let col = |n: &str| {
        cols.iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("column {n}"))
    };
    assert_eq!(col("Code")["text"]["maxLength"], 10);
    assert_eq!(col("Code")["enforceUniqueValues"], true);
    assert_eq!(col("Code")["indexed"], true);
    assert_eq!(col("Notes")["text"]["allowMultipleLines"], true);
    assert_eq!(col("Due")["dateTime"]["format"], "dateOnly");
    assert_eq!(col("Tags")["choice"]["displayAs"], "checkBoxes");
    assert_eq!(col("Customer")["lookup"]["listId"], target_id.as_str());
    assert!(col("Link").get("hyperlinkOrPicture").is_some());
    // Display name "First Name" → internal name First_x0020_Name; required kept.
    let first = col("First_x0020_Name");
    assert_eq!(first["displayName"], "First Name");
    assert_eq!(first["required"], true);

    // Unknown facet, unique without index, duplicate name.
    assert_eq!(
        emu.post(&format!("{list}/columns"), json!({ "name": "Bad" }))
            .await
            .status,
        400
    );
    assert_eq!(
        emu.post(
            &format!("{list}/columns"),
            json!({ "name": "U", "text": {}, "enforceUniqueValues": true })
        )
        .await
        .status,
        400
    );
    assert!(
        emu.post(
            &format!("{list}/columns"),
            json!({ "name": "Qty", "number": {} })
        )
        .await
        .status
            >= 400
    );
    assert_eq!(
        emu.post(
            &format!("{list}/columns"),
            json!({ "name": "T", "text": { "maxLength": 300 } })
        )
        .await
        .status,
        400
    );
}

#[tokio::test]
async fn groups_find_the_seeded_team_and_its_site() {
    use syncbridge::emulator::groups::{
        DEFAULT_TEAM_GROUP_ID, DEFAULT_TEAM_NAME, DEFAULT_TEAM_SITE_PATH, PLAIN_GROUP_ID,
        PLAIN_GROUP_NAME,
    };
    let emu = Emu::start().await;
    let by_name = |n: &str| {
        format!(
            "/v1.0/groups?$filter={}",
            form(&[("x", &format!("displayName eq '{n}'"))]).trim_start_matches("x=")
        )
    };
    let team = emu.get(&by_name(DEFAULT_TEAM_NAME)).await;
    assert_eq!(team.status, 200, "{:?}", team.body);
    let value = team.body["value"].as_array().unwrap();
    assert_eq!(value.len(), 1);
    assert_eq!(value[0]["id"], DEFAULT_TEAM_GROUP_ID);
    assert_eq!(value[0]["resourceProvisioningOptions"], json!(["Team"]));
    assert!(
        team.body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("$metadata#groups")
    );

    let plain = emu.get(&by_name(PLAIN_GROUP_NAME)).await;
    assert_eq!(
        plain.body["value"][0]["resourceProvisioningOptions"],
        json!([])
    );
    assert_eq!(emu.get(&by_name("Nobody")).await.body["value"], json!([]));
    let bad = emu.get("/v1.0/groups?$filter=mail%20eq%20'x'").await;
    assert_eq!(bad.status, 400);

    let one = emu
        .get(&format!(
            "/v1.0/groups/{PLAIN_GROUP_ID}?$select=id,displayName"
        ))
        .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body["displayName"], PLAIN_GROUP_NAME);
    assert!(one.body.get("mailEnabled").is_none(), "{:?}", one.body);
    let unknown = emu
        .get("/v1.0/groups/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(unknown.status, 404);

    let teams = emu.get("/v1.0/teams").await;
    assert_eq!(teams.body["value"].as_array().unwrap().len(), 1);
    assert_eq!(teams.body["value"][0]["displayName"], DEFAULT_TEAM_NAME);

    let site = emu
        .get(&format!("/v1.0/groups/{DEFAULT_TEAM_GROUP_ID}/sites/root"))
        .await;
    assert_eq!(site.status, 200, "{:?}", site.body);
    assert_eq!(
        site.body["webUrl"],
        format!("https://contoso.sharepoint.com{DEFAULT_TEAM_SITE_PATH}")
    );
    // The plain group has no site of its own here, and the default site is not the Team's.
    let none = emu
        .get(&format!("/v1.0/groups/{PLAIN_GROUP_ID}/sites/root"))
        .await;
    assert_eq!(none.status, 404);
}
