//! graph-api.md §8: resource-unit throttling, RateLimit headers; fault injection.

use reqwest::Method;
use serde_json::json;
use syncbridge::emulator::EmulatorArgs;

use crate::common::*;

#[tokio::test]
async fn minute_budget_arithmetic_with_a_controllable_clock() {
    let emu = Emu::start_with(EmulatorArgs {
        ru_per_minute: Some(20),
        ..EmulatorArgs::default()
    })
    .await;
    let list = emu.create_list("Budget", json!([])).await; // GET site (1) + POST list (2) = 3 RU
    // Creates cost 2: 3 + 2*7 = 17 RU; below 80 % (16)? 17 ≥ 16, so headers appear on the 7th create.
    let mut last = None;
    for i in 0..6 {
        let r = emu
            .create_item(&list, json!({ "Title": i.to_string() }))
            .await;
        assert_eq!(r.status, 201);
        assert!(
            r.header("ratelimit-limit").is_none(),
            "no RateLimit headers below 80 % (create {i})"
        );
        last = Some(r);
    }
    drop(last);
    let r = emu.create_item(&list, json!({ "Title": "7" })).await; // 17 RU used
    assert_eq!(r.status, 201);
    assert_eq!(r.header("ratelimit-limit"), Some("20"));
    assert_eq!(r.header("ratelimit-remaining"), Some("3"));
    let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset));
    let single_get = emu.get(&format!("{list}/items/1")).await; // 1 RU → 18
    assert_eq!(single_get.status, 200);
    assert_eq!(single_get.header("ratelimit-remaining"), Some("2"));
    let r = emu.create_item(&list, json!({ "Title": "8" })).await; // 20 RU: allowed, remaining 0
    assert_eq!(r.status, 201);
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let t = emu.create_item(&list, json!({ "Title": "9" })).await; // 22 > 20
    assert_eq!(t.status, 429);
    assert_eq!(t.code(), "activityLimitReached");
    assert_eq!(t.body["error"]["message"], "The request has been throttled");
    assert_eq!(t.body["error"]["innerError"]["code"], "throttledRequest");
    assert_eq!(t.body["error"]["innerError"]["innerError"]["code"], "quota");
    let retry: u64 = t.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(t.header("ratelimit-remaining"), Some("0"));
    assert_eq!(t.header("ratelimit-reset"), t.header("retry-after"));

    let stats = emu.stats().await;
    assert_eq!(stats["throttled"], 1);
    assert_eq!(
        stats["ru_consumed"], 22,
        "throttled requests still consume quota"
    );

    // Refill after the window.
    emu.admin("clock/advance", json!({ "secs": retry + 1 }))
        .await;
    let ok = emu.create_item(&list, json!({ "Title": "10" })).await;
    assert_eq!(ok.status, 201);
    assert!(ok.header("ratelimit-limit").is_none());
}

#[tokio::test]
async fn day_and_tenant_budgets_throttle_without_ratelimit_headers() {
    let emu = Emu::start_with(EmulatorArgs {
        ru_per_day: Some(10),
        ..EmulatorArgs::default()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = emu.get("/v1.0/sites/root").await; // 1 RU each
        if r.status == 429 {
            assert!(r.header("retry-after").is_some());
            assert!(
                r.header("ratelimit-limit").is_none(),
                "other limits suppress RateLimit-*"
            );
            let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(retry > 3600, "day window: {retry}");
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    // A different app has its own per-app bucket.
    let person = emu.token_for(USER_CLIENT_ID, USER_SECRET).await;
    assert_eq!(
        emu.call_as(&person, Method::GET, "/v1.0/sites/root", None, &[])
            .await
            .status,
        200
    );

    // Tenant 5-minute budget is shared by all apps.
    let emu = Emu::start_with(EmulatorArgs {
        tenant_ru_per_5min: Some(4),
        ..EmulatorArgs::default()
    })
    .await;
    let person = emu.token_for(USER_CLIENT_ID, USER_SECRET).await;
    for _ in 0..2 {
        assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
        assert_eq!(
            emu.call_as(&person, Method::GET, "/v1.0/sites/root", None, &[])
                .await
                .status,
            200
        );
    }
    let t = emu
        .call_as(&person, Method::GET, "/v1.0/sites/root", None, &[])
        .await;
    assert_eq!(t.status, 429);
    let retry: u64 = t.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry));
    emu.admin("clock/advance", json!({ "secs": 301 })).await;
    let fresh = emu.token_for(CLIENT_ID, SECRET).await;
    assert_eq!(
        emu.call_as(&fresh, Method::GET, "/v1.0/sites/root", None, &[])
            .await
            .status,
        200
    );
}

async fn ru_of(emu: &Emu, path: String) -> u64 {
    let before = emu.stats().await["ru_consumed"].as_u64().unwrap();
    emu.get(&path).await;
    emu.stats().await["ru_consumed"].as_u64().unwrap() - before
}

#[tokio::test]
async fn resource_unit_costs() {
    let emu = Emu::start().await;
    let list = emu.create_list("Costs", json!([])).await;
    emu.create_item(&list, json!({ "Title": "a" })).await;
    let first = emu.get(&format!("{list}/items/delta")).await;
    assert_eq!(
        ru_of(&emu, format!("{list}/items/1")).await,
        1,
        "single item"
    );
    assert_eq!(
        ru_of(&emu, format!("{list}/items")).await,
        2,
        "multi-item query"
    );
    assert_eq!(
        ru_of(&emu, format!("{list}/items/delta")).await,
        2,
        "delta without token"
    );
    let link = first.body["@odata.deltaLink"].as_str().unwrap().to_string();
    assert_eq!(ru_of(&emu, link).await, 1, "delta with token");
    let before = emu.stats().await["ru_consumed"].as_u64().unwrap();
    emu.create_item(&list, json!({ "Title": "b" })).await;
    assert_eq!(
        emu.stats().await["ru_consumed"].as_u64().unwrap() - before,
        2,
        "create"
    );
}

#[tokio::test]
async fn limits_endpoint_turns_throttling_on_and_off() {
    let emu = Emu::start().await;
    for _ in 0..5 {
        assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    }
    let r = emu.admin("limits", json!({ "ru_per_minute": 2 })).await;
    assert_eq!(r.status, 200);
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 429);
    emu.admin("limits", json!({ "ru_per_minute": null })).await;
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    assert_eq!(emu.admin("limits", json!({ "bogus": 1 })).await.status, 400);
}

async fn status_sequence(emu: &Emu, n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(emu.get("/v1.0/sites/root").await.status);
    }
    out
}

#[tokio::test]
async fn fault_rates_are_seeded_and_within_tolerance() {
    let emu = Emu::start().await;
    let spec = json!({ "throttle_rate": 0.1, "unavailable_rate": 0.05, "seed": 7 });
    assert_eq!(emu.admin("faults", spec.clone()).await.status, 200);
    let a = status_sequence(&emu, 1000).await;
    let throttled = a.iter().filter(|s| **s == 429).count();
    let unavailable = a.iter().filter(|s| **s == 503).count();
    // Expected 950 draws × 0.1 ≈ 95 and 50; binomial 4σ bounds.
    assert!((55..=140).contains(&throttled), "429s: {throttled}");
    assert!((22..=80).contains(&unavailable), "503s: {unavailable}");
    assert_eq!(
        a.iter().filter(|s| **s == 200).count(),
        1000 - throttled - unavailable
    );
    // Same seed → same sequence.
    emu.admin("faults", spec).await;
    let b = status_sequence(&emu, 1000).await;
    assert_eq!(a, b);
    // Injected responses carry Retry-After and the documented codes.
    let r = loop {
        let r = emu.get("/v1.0/sites/root").await;
        if r.status == 503 {
            break r;
        }
    };
    assert_eq!(r.code(), "serviceNotAvailable");
    assert!(r.header("retry-after").is_some());
    let stats = emu.stats().await;
    assert!(stats["faults"]["injected_throttles"].as_u64().unwrap() >= throttled as u64);
    // Turning faults off.
    emu.admin("faults", json!({})).await;
    assert!(status_sequence(&emu, 50).await.iter().all(|s| *s == 200));
}

#[tokio::test]
async fn reset_rate_drops_connections_after_applying() {
    let emu = Emu::start().await;
    let list = emu.create_list("Resets", json!([])).await;
    emu.admin("faults", json!({ "reset_rate": 1.0, "seed": 1 }))
        .await;
    let url = format!("{}{list}/items", emu.base);
    let err = emu
        .http
        .post(&url)
        .header("authorization", format!("Bearer {}", emu.token))
        .header("content-type", "application/json")
        .body(json!({ "fields": { "Title": "lost answer" } }).to_string())
        .send()
        .await;
    assert!(err.is_err(), "connection dropped: {err:?}");
    emu.admin("faults", json!({})).await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{url}?$expand=fields"))
        .header("authorization", format!("Bearer {}", emu.token))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["value"].as_array().unwrap().len(),
        1,
        "the write was applied before the reset"
    );
    assert_eq!(emu.stats().await["faults"]["injected_resets"], 1);
}

#[tokio::test]
async fn stats_report_requests_ru_and_items() {
    let emu = Emu::start().await;
    let list = emu.create_list("Stats", json!([])).await;
    emu.create_item(&list, json!({ "Title": "a" })).await;
    emu.create_item(&list, json!({ "Title": "b" })).await;
    emu.get(&format!("{list}/items/999")).await;
    let s = emu.stats().await;
    assert_eq!(s["requests"]["by_method"]["POST"], 3);
    assert!(s["requests"]["by_status"]["201"].as_u64().unwrap() >= 3);
    assert_eq!(s["requests"]["by_status"]["404"], 1);
    assert!(s["ru_consumed"].as_u64().unwrap() >= 8);
    let lists = s["lists"].as_array().unwrap();
    let mine = lists.iter().find(|l| l["displayName"] == "Stats").unwrap();
    assert_eq!(mine["items"], 2);
    assert!(s["budget"].is_object());
}
