//! The hidden "User Information List" (graph-api.md §4.5, §5.7): email → person lookup id, through
//! raw HTTP and through `GraphClient::find_user_lookup_id`.

use reqwest::Method;
use serde_json::{Map, Value, json};
use syncbridge::config::{GraphConfig, Secret};
use syncbridge::emulator;
use syncbridge::graph::{ColumnDefinition, GraphClient, GraphClientConfig, LimiterRegistry};

use crate::common::*;

const UIL: &str = "User%20Information%20List";
/// (lookup id, alias, display name) of the emulator's people directory.
const PEOPLE: [(u64, &str, &str); 4] = [
    (6, "meganb", "Megan Bowen"),
    (7, "adelev", "Adele Vance"),
    (10, "alexw", "Alex Wilber"),
    (11, "diegos", "Diego Siciliani"),
];

fn client(emu: &Emu) -> GraphClient {
    let cfg = GraphConfig {
        base_url: format!("{}/v1.0", emu.base).parse().unwrap(),
        token_url: emu.token_url().parse().unwrap(),
        tenant: TENANT.into(),
        client_id: CLIENT_ID.into(),
        credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(SECRET)),
        site: emulator::DEFAULT_SITE.into(),
        ru_per_minute: 1_250,
        sharepoint_url: None,
        hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
    };
    GraphClient::new(GraphClientConfig::from(&cfg), &LimiterRegistry::new()).unwrap()
}

fn email(alias: &str) -> String {
    format!("{alias}@contoso.onmicrosoft.com")
}

fn filter_query(field: &str, value: &str) -> String {
    let f = format!("fields/{field} eq '{}'", value.replace('\'', "''"));
    url::form_urlencoded::byte_serialize(f.as_bytes()).collect()
}

#[tokio::test]
async fn client_finds_each_person_by_email_in_any_case() {
    let emu = Emu::start().await;
    let c = client(&emu);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    for (id, alias, _) in PEOPLE {
        let e = email(alias);
        assert_eq!(c.find_user_lookup_id(&site, &e).await.unwrap(), Some(id));
        assert_eq!(
            c.find_user_lookup_id(&site, &e.to_uppercase())
                .await
                .unwrap(),
            Some(id),
            "{e} in upper case"
        );
    }
    for unknown in [
        "nobody@contoso.onmicrosoft.com",
        "adelev@fabrikam.onmicrosoft.com",
        "o'brien@contoso.onmicrosoft.com",
        "",
    ] {
        assert_eq!(
            c.find_user_lookup_id(&site, unknown).await.unwrap(),
            None,
            "{unknown:?}"
        );
    }
    emu.stop().await;
}

#[tokio::test]
async fn list_is_hidden_addressable_and_shaped_like_sharepoint() {
    let emu = Emu::start().await;
    let site = emu.site_id().await;
    let base = format!("/v1.0/sites/{site}/lists");

    let l = emu.get(&format!("{base}/{UIL}")).await;
    assert_eq!(l.status, 200, "{:?}", l.body);
    assert_eq!(l.body["displayName"], "User Information List");
    assert_eq!(l.body["list"]["hidden"], true);
    assert_eq!(l.body["list"]["template"], "userInformation");
    let id = l.body["id"].as_str().unwrap().to_string();
    // Same list by id and in another case; the id is stable.
    let by_id = emu.get(&format!("{base}/{id}")).await;
    assert_eq!(by_id.body["displayName"], "User Information List");
    let lower = emu.get(&format!("{base}/user%20information%20list")).await;
    assert_eq!(lower.body["id"], id.as_str());

    // Hidden: not in the enumeration.
    let all = emu.get(&base).await;
    assert_eq!(all.status, 200);
    assert!(
        all.body["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["displayName"] != "User Information List"),
        "{:?}",
        all.body
    );

    // All people, item id = lookup id.
    let items = emu.get(&format!("{base}/{UIL}/items?$expand=fields")).await;
    assert_eq!(items.status, 200, "{:?}", items.body);
    let value = items.body["value"].as_array().unwrap();
    assert_eq!(value.len(), PEOPLE.len() + 1);
    // A user who left the directory keeps an entry, without an email.
    let former = &value[PEOPLE.len()];
    assert_eq!(former["id"], "12");
    assert_eq!(former["fields"]["Title"], "Former Employee");
    assert!(former["fields"].get("EMail").is_none(), "{former}");
    for ((id, alias, name), it) in PEOPLE.iter().zip(value) {
        let e = email(alias);
        assert_eq!(it["id"], id.to_string());
        let f = &it["fields"];
        assert_eq!(f["id"], id.to_string());
        assert_eq!(f["Title"], *name);
        assert_eq!(f["EMail"], e.as_str());
        assert_eq!(f["UserName"], e.as_str());
        assert_eq!(f["Name"], format!("i:0#.f|membership|{e}"));
    }

    // The documented app query, no Prefer header: `$filter` on EMail, case-insensitive.
    let q = filter_query("EMail", "AdeleV@Contoso.onmicrosoft.com");
    let r = emu
        .get(&format!("{base}/{UIL}/items?$expand=fields&$filter={q}"))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.body["value"].as_array().unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["id"], "7");
    assert_eq!(v[0]["fields"]["Title"], "Adele Vance");

    // UserName too, with a field selection.
    let q = filter_query("UserName", &email("diegos"));
    let r = emu
        .get(&format!(
            "{base}/{UIL}/items?$expand=fields($select=id,EMail)&$filter={q}"
        ))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.body["value"].as_array().unwrap();
    assert_eq!(v.len(), 1);
    let f = v[0]["fields"].as_object().unwrap();
    let mut keys: Vec<&str> = f.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["@odata.etag", "EMail", "id"]);
    assert_eq!(f["id"], "11");

    // Single item and its fields; unknown item → 404.
    let one = emu
        .get(&format!("{base}/{UIL}/items/10?$expand=fields"))
        .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body["fields"]["EMail"], email("alexw").as_str());
    let fields = emu.get(&format!("{base}/{UIL}/items/6/fields")).await;
    assert_eq!(fields.body["Title"], "Megan Bowen");
    assert_eq!(emu.get(&format!("{base}/{UIL}/items/8")).await.status, 404);

    // Charged like other item queries: 2 RU for the collection, 1 for one item.
    let before = emu.stats().await["ru_consumed"].as_u64().unwrap();
    emu.get(&format!("{base}/{UIL}/items?$filter={q}")).await;
    let mid = emu.stats().await["ru_consumed"].as_u64().unwrap();
    emu.get(&format!("{base}/{UIL}/items/7")).await;
    let after = emu.stats().await["ru_consumed"].as_u64().unwrap();
    assert_eq!((mid - before, after - mid), (2, 1));
    emu.stop().await;
}

#[tokio::test]
async fn emails_use_the_tenant_domain_of_the_site_hostname() {
    let emu = Emu::start().await;
    let added = emu
        .admin(
            "sites",
            json!({ "hostname": "fabrikam.sharepoint.com", "path": "/sites/team" }),
        )
        .await;
    assert!(
        added.status == 201 || added.status == 200,
        "{:?}",
        added.body
    );
    let site = added.body["id"].as_str().unwrap();
    let c = client(&emu);
    assert_eq!(
        c.find_user_lookup_id(site, "alexw@fabrikam.onmicrosoft.com")
            .await
            .unwrap(),
        Some(10)
    );
    assert_eq!(
        c.find_user_lookup_id(site, &email("alexw")).await.unwrap(),
        None
    );
    emu.stop().await;
}

#[tokio::test]
async fn list_is_read_only() {
    let emu = Emu::start().await;
    let site = emu.site_id().await;
    let uil = format!("/v1.0/sites/{site}/lists/{UIL}");
    let writes = [
        (
            Method::POST,
            format!("{uil}/items"),
            json!({ "fields": { "Title": "Eve" } }),
        ),
        (
            Method::PATCH,
            format!("{uil}/items/7/fields"),
            json!({ "Title": "Eve" }),
        ),
        (
            Method::PATCH,
            format!("{uil}/items/7"),
            json!({ "fields": { "Title": "Eve" } }),
        ),
        (Method::DELETE, format!("{uil}/items/7"), Value::Null),
        (
            Method::POST,
            format!("{uil}/columns"),
            json!({ "name": "X", "text": {} }),
        ),
    ];
    for (m, path, body) in writes {
        let body = (!body.is_null()).then_some(body);
        let r = emu.call(m.clone(), &path, body, &[]).await;
        assert_eq!(r.status, 403, "{m} {path}: {:?}", r.body);
        assert_eq!(r.code(), "accessDenied");
    }
    // Nothing changed.
    let f = emu.get(&format!("{uil}/items/7/fields")).await;
    assert_eq!(f.body["Title"], "Adele Vance");
    // Its name is taken on every site.
    let r = emu
        .post(
            &format!("/v1.0/sites/{site}/lists"),
            json!({ "displayName": "User Information List" }),
        )
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    emu.stop().await;
}

#[tokio::test]
async fn person_column_takes_the_looked_up_id() {
    let emu = Emu::start().await;
    let c = client(&emu);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    let cols = [ColumnDefinition::new(
        "Owner",
        "personOrGroup",
        json!({ "allowMultipleSelection": false, "chooseFromType": "peopleOnly" }),
    )];
    let list = c.create_list(&site, "Tasks", &cols).await.unwrap().id;
    let id = c
        .find_user_lookup_id(&site, "AlexW@contoso.onmicrosoft.com")
        .await
        .unwrap()
        .expect("Alex is on the site");
    let mut fields = Map::new();
    fields.insert("Title".into(), json!("Review"));
    fields.insert("OwnerLookupId".into(), json!(id));
    let created = c.create_item(&site, &list, &fields).await.unwrap();
    assert_eq!(created.fields["OwnerLookupId"], id.to_string());
    let read = c
        .get_item(&site, &list, &created.id)
        .await
        .unwrap()
        .expect("item exists");
    assert_eq!(read.fields["OwnerLookupId"], id.to_string());
    // Selected by name, the person column shows the name from the User Information List.
    let named = emu
        .get(&format!(
            "/v1.0/sites/{site}/lists/{list}/items/{}?$expand=fields($select=Owner)",
            created.id
        ))
        .await;
    assert_eq!(named.body["fields"]["Owner"], "Alex Wilber");
    emu.stop().await;
}
