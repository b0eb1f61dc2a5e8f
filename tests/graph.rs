//! The Graph client against the in-process emulator, black-box over HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Map, Value, json};
use syncbridge::config::{GraphConfig, GraphCredential, Secret};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};
use syncbridge::graph::{
    BatchRequest, Certificate, ColumnDefinition, Credential, Deleted, GraphClient,
    GraphClientConfig, GraphError, ItemQuery, LimiterRegistry, MAX_BATCH,
};

struct Env {
    emu: RunningEmulator,
    admin: reqwest::Client,
}

impl Env {
    async fn start() -> Env {
        Env::start_with(EmulatorArgs::default()).await
    }

    async fn start_with(args: EmulatorArgs) -> Env {
        let emu = emulator::spawn(args).await.expect("emulator starts");
        Env {
            emu,
            admin: reqwest::Client::new(),
        }
    }

    fn graph_config(&self, ru_per_minute: u32) -> GraphConfig {
        let base = self.emu.base_url();
        GraphConfig {
            base_url: format!("{base}/v1.0").parse().unwrap(),
            token_url: format!("{base}/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT)
                .parse()
                .unwrap(),
            tenant: emulator::DEFAULT_TENANT.into(),
            client_id: emulator::DEFAULT_CLIENT_ID.into(),
            credential: GraphCredential::ClientSecret(Secret::new(emulator::DEFAULT_CLIENT_SECRET)),
            site: emulator::DEFAULT_SITE.into(),
            ru_per_minute,
            sharepoint_url: None,
            hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
        }
    }

    /// A client with its own limiter registry (tests run in parallel against separate emulators).
    fn client(&self, ru_per_minute: u32) -> GraphClient {
        let cfg = GraphClientConfig::from(&self.graph_config(ru_per_minute));
        GraphClient::new(cfg, &LimiterRegistry::new()).unwrap()
    }

    async fn admin_post(&self, path: &str, body: Value) {
        let r = self
            .admin
            .post(format!("{}/_emulator/{path}", self.emu.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn stats(&self) -> Value {
        self.admin
            .get(format!("{}/_emulator/stats", self.emu.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// A list with a hidden, indexed, unique `SyncKey` plus two user columns.
async fn make_list(c: &GraphClient, site: &str, name: &str) -> String {
    let cols = [
        ColumnDefinition::text("Writer"),
        ColumnDefinition::new("Pages", "number", json!({})),
        ColumnDefinition::text("SyncKey")
            .indexed(true)
            .unique(true)
            .hidden(true),
    ];
    c.create_list(site, name, &cols).await.unwrap().id
}

async fn sync_keys(c: &GraphClient, site: &str, list: &str) -> Vec<String> {
    let items = c
        .list_items(site, list, &ItemQuery::default())
        .await
        .unwrap();
    items
        .iter()
        .map(|i| i.fields["SyncKey"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn token_is_cached_and_refreshed_after_forced_expiry() {
    let env = Env::start().await;
    let c = env.client(1_250);
    for _ in 0..5 {
        c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
    }
    assert_eq!(c.tokens_fetched(), 1, "five calls share one token");

    // Every token the emulator issued is now invalid: the next call gets a 401, refreshes once and
    // succeeds without the caller noticing.
    env.admin_post("expire-tokens", json!({})).await;
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
    assert!(site.id.contains(','));
    assert_eq!(c.tokens_fetched(), 2);

    // Proactive refresh: with a 2 s lifetime the refresh margin is 1 s, so after 1.2 s the client
    // fetches a new token ahead of expiry (the old one would still be accepted until 2 s).
    env.admin_post("limits", json!({ "token_lifetime_secs": 2 }))
        .await;
    env.admin_post("expire-tokens", json!({})).await;
    c.resolve_site(emulator::DEFAULT_SITE).await.unwrap(); // 401 → refresh (2 s token)
    assert_eq!(c.tokens_fetched(), 3);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
    assert_eq!(c.tokens_fetched(), 4);
}

#[tokio::test]
async fn wrong_secret_is_an_auth_error() {
    let env = Env::start().await;
    let mut g = env.graph_config(1_250);
    g.credential = GraphCredential::ClientSecret(Secret::new("wrong"));
    let c = GraphClient::new(GraphClientConfig::from(&g), &LimiterRegistry::new()).unwrap();
    let e = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap_err();
    assert!(matches!(e, GraphError::Auth { .. }), "{e:?}");
    assert!(!e.is_retryable());
    assert!(
        !format!("{e} {e:?}").contains("wrong"),
        "secret leaked: {e}"
    );
}

#[tokio::test]
async fn certificate_client_assertion_signs_in() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator/fixtures");
    let env = Env::start_with(EmulatorArgs {
        client_certs: vec![fixtures.join("app-cert.pem")],
        ..EmulatorArgs::default()
    })
    .await;
    let cert_pem = std::fs::read(fixtures.join("app-cert.pem")).unwrap();
    let with_key = |key: &str| {
        let key_pem = std::fs::read(fixtures.join(key)).unwrap();
        let mut cfg = GraphClientConfig::from(&env.graph_config(1_250));
        cfg.credential =
            Credential::Certificate(Certificate::from_pem(&cert_pem, &key_pem).unwrap());
        assert!(!format!("{cfg:?}").contains("PRIVATE"));
        GraphClient::new(cfg, &LimiterRegistry::new()).unwrap()
    };
    let c = with_key("app-key.pem");
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
    assert!(site.id.contains(','));
    assert_eq!(c.tokens_fetched(), 1);
    // The same certificate with a key that does not match it fails signature validation.
    let e = with_key("other-key.pem")
        .resolve_site(emulator::DEFAULT_SITE)
        .await
        .unwrap_err();
    assert!(matches!(e, GraphError::Auth { .. }), "{e:?}");
}

/// `graph.client_certificate` from a pipeline file: the key as a path or as PEM text (from
/// `${ENV}`) signs in; a file that cannot be read fails building the client, naming it.
#[tokio::test]
async fn a_configured_certificate_signs_in_and_a_missing_file_is_named() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator/fixtures");
    let env = Env::start_with(EmulatorArgs {
        client_certs: vec![fixtures.join("app-cert.pem")],
        ..EmulatorArgs::default()
    })
    .await;
    let key_pem = std::fs::read_to_string(fixtures.join("app-key.pem")).unwrap();
    let (cert, key) = (fixtures.join("app-cert.pem"), fixtures.join("app-key.pem"));
    for key in [Secret::new(key.display().to_string()), Secret::new(key_pem)] {
        let mut g = env.graph_config(1_250);
        g.credential = GraphCredential::ClientCertificate {
            cert: cert.clone(),
            key,
        };
        let c = GraphClient::new(GraphClientConfig::from(&g), &LimiterRegistry::new()).unwrap();
        c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
        assert_eq!(c.tokens_fetched(), 1);
    }
    let mut g = env.graph_config(1_250);
    g.credential = GraphCredential::ClientCertificate {
        cert: fixtures.join("nope.pem"),
        key: Secret::new("/nowhere/key.pem"),
    };
    let e = GraphClient::new(GraphClientConfig::from(&g), &LimiterRegistry::new()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("graph.client_certificate.cert") && text.contains("nope.pem"),
        "{text}"
    );
}

#[tokio::test]
async fn sites_lists_and_item_lifecycle() {
    let env = Env::start().await;
    let c = env.client(1_250);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
    assert_eq!(site.id.split(',').count(), 3, "composite id: {}", site.id);
    assert!(matches!(
        c.resolve_site("contoso.sharepoint.com:/sites/nope").await,
        Err(GraphError::NotFound { .. })
    ));
    let s = site.id.as_str();

    // Lists: missing → create → found by display name and by id, with our columns.
    assert_eq!(c.get_list(s, "Books Sync").await.unwrap(), None);
    let list_id = make_list(&c, s, "Books Sync").await;
    let by_name = c.get_list(s, "Books Sync").await.unwrap().unwrap();
    assert_eq!(by_name.id, list_id);
    assert_eq!(by_name.display_name, "Books Sync");
    assert_eq!(c.get_list(s, &list_id).await.unwrap().unwrap().id, list_id);
    let cols = c.list_columns(s, &list_id).await.unwrap();
    let key = cols
        .iter()
        .find(|c| c.name == "SyncKey")
        .expect("SyncKey column");
    assert!(key.indexed && key.enforce_unique_values);
    assert_eq!(key.type_facet(), Some("text"));
    assert_eq!(
        cols.iter()
            .find(|c| c.name == "Pages")
            .unwrap()
            .type_facet(),
        Some("number")
    );
    assert!(
        cols.iter().any(|c| c.name == "Title"),
        "genericList brings Title"
    );

    // Create, get.
    let l = list_id.as_str();
    let created = c
        .create_item(
            s,
            l,
            &fields(json!({ "Title": "Dune", "Writer": "Herbert", "Pages": 412, "SyncKey": "k1" })),
        )
        .await
        .unwrap();
    assert!(!created.lineage.client_request_id.is_empty());
    assert!(created.lineage.request_id.is_some());
    let etag1 = created.e_tag.clone().unwrap();
    let got = c.get_item(s, l, &created.id).await.unwrap().unwrap();
    assert_eq!(got.fields["Writer"], "Herbert");
    assert_eq!(got.e_tag.as_deref(), Some(etag1.as_str()));

    // Update with the current eTag, then with the stale one → 412 and no change.
    let up = c
        .update_item_fields(
            s,
            l,
            &created.id,
            &fields(json!({ "Pages": 500 })),
            Some(&etag1),
        )
        .await
        .unwrap();
    assert_eq!(up.fields["Pages"], 500);
    assert_ne!(up.e_tag.as_deref(), Some(etag1.as_str()));
    let stale = c
        .update_item_fields(
            s,
            l,
            &created.id,
            &fields(json!({ "Pages": 1 })),
            Some(&etag1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(stale, GraphError::PreconditionFailed { .. }),
        "{stale:?}"
    );
    assert!(!stale.is_retryable());
    assert_eq!(
        c.get_item(s, l, &created.id).await.unwrap().unwrap().fields["Pages"],
        500
    );

    // A second item with the same SyncKey violates the unique column → Conflict.
    let dup = c
        .create_item(s, l, &fields(json!({ "Title": "Dup", "SyncKey": "k1" })))
        .await
        .unwrap_err();
    assert!(matches!(dup, GraphError::Conflict { .. }), "{dup:?}");
    // An unknown column is a plain 4xx (→ DLQ).
    let bad = c
        .create_item(s, l, &fields(json!({ "NoSuchColumn": 1 })))
        .await
        .unwrap_err();
    assert!(
        matches!(bad, GraphError::Client4xx { status: 400, .. }),
        "{bad:?}"
    );

    // Filtering: indexed SyncKey works; non-indexed Writer needs the Prefer header.
    for i in 2..=5 {
        c.create_item(
            s,
            l,
            &fields(
                json!({ "Title": format!("B{i}"), "Writer": "Other", "SyncKey": format!("k{i}") }),
            ),
        )
        .await
        .unwrap();
    }
    let q = ItemQuery {
        filter: Some("fields/SyncKey eq 'k3'".into()),
        ..ItemQuery::default()
    };
    let hits = c.list_items(s, l, &q).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].fields["Title"], "B3");
    let q = ItemQuery {
        filter: Some("fields/Writer eq 'Other'".into()),
        ..ItemQuery::default()
    };
    let e = c.list_items(s, l, &q).await.unwrap_err();
    assert!(
        matches!(e, GraphError::Client4xx { status: 400, .. }),
        "{e:?}"
    );
    let q = ItemQuery {
        allow_non_indexed: true,
        ..q
    };
    assert_eq!(c.list_items(s, l, &q).await.unwrap().len(), 4);
    // Paging: pages of 2 are followed to the end; `limit` stops early.
    let q = ItemQuery {
        top: Some(2),
        ..ItemQuery::default()
    };
    assert_eq!(c.list_items(s, l, &q).await.unwrap().len(), 5);
    let q = ItemQuery {
        top: Some(2),
        limit: 3,
        ..ItemQuery::default()
    };
    assert_eq!(c.list_items(s, l, &q).await.unwrap().len(), 3);

    // Delete: stale If-Match → 412; then delete; a repeat is "already gone"; get → None.
    let e = c
        .delete_item(s, l, &created.id, Some(&etag1))
        .await
        .unwrap_err();
    assert!(matches!(e, GraphError::PreconditionFailed { .. }), "{e:?}");
    assert!(matches!(
        c.delete_item(s, l, &created.id, None).await.unwrap(),
        Deleted::Deleted(_)
    ));
    assert!(matches!(
        c.delete_item(s, l, &created.id, None).await.unwrap(),
        Deleted::AlreadyGone(_)
    ));
    assert_eq!(c.get_item(s, l, &created.id).await.unwrap(), None);
}

#[tokio::test]
async fn batch_of_twenty_creates_and_oversized_batch_rejected() {
    let env = Env::start().await;
    let c = env.client(1_250);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    let list = make_list(&c, &site, "Batch").await;
    let reqs: Vec<BatchRequest> = (0..MAX_BATCH)
        .map(|i| {
            BatchRequest::create_item(
                format!("r{i}"),
                &site,
                &list,
                fields(json!({ "Title": format!("t{i}"), "SyncKey": format!("b{i}") })),
            )
        })
        .collect();
    let out = c.execute_batch(&reqs).await.unwrap();
    assert_eq!(out.len(), 20);
    let mut ids = BTreeSet::new();
    for (o, r) in out.iter().zip(&reqs) {
        assert_eq!(o.id, r.id, "outcomes come back in request order");
        assert_eq!(o.status, 201, "{:?}", o.result);
        let item = o.item().unwrap();
        assert_eq!(item.fields["SyncKey"], format!("b{}", &r.id[1..]));
        ids.insert(item.id);
    }
    assert_eq!(ids.len(), 20, "20 distinct item ids");
    assert_eq!(sync_keys(&c, &site, &list).await.len(), 20);

    // 21 requests never leave the process.
    let batches_before = env.stats().await["requests"]["batches"].as_u64().unwrap();
    let mut too_many = reqs.clone();
    too_many.push(BatchRequest::delete_item("x", &site, &list, "1", None));
    let e = c.execute_batch(&too_many).await.unwrap_err();
    assert!(matches!(e, GraphError::Invalid(_)), "{e:?}");
    let e = c.execute_batch_with_retries(&too_many).await.unwrap_err();
    assert!(matches!(e, GraphError::Invalid(_)), "{e:?}");
    assert_eq!(
        env.stats().await["requests"]["batches"].as_u64().unwrap(),
        batches_before
    );

    // Mixed outcomes are reported per id: a duplicate SyncKey fails alone.
    let mixed = vec![
        BatchRequest::create_item("ok", &site, &list, fields(json!({ "SyncKey": "new" }))),
        BatchRequest::create_item("dup", &site, &list, fields(json!({ "SyncKey": "b0" }))),
    ];
    let out = c.execute_batch_with_retries(&mixed).await.unwrap();
    assert!(out[0].is_success());
    assert!(
        matches!(out[1].result, Err(GraphError::Conflict { .. })),
        "{:?}",
        out[1].result
    );
}

/// Only 429/503 faults, which the server answers before applying anything: every write lands
/// exactly once, whether sent alone or in `$batch`es.
#[tokio::test]
async fn throttle_and_unavailable_faults_still_write_exactly_once() {
    let env = Env::start().await;
    let c = env.client(1_250);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    let list = make_list(&c, &site, "Faulty").await;
    env.admin_post(
        "faults",
        json!({ "throttle_rate": 0.2, "unavailable_rate": 0.05, "retry_after_secs": 1, "seed": 42 }),
    )
    .await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let (c, site, list) = (c.clone(), site.clone(), list.clone());
        tasks.push(tokio::spawn(async move {
            c.create_item(&site, &list, &fields(json!({ "SyncKey": format!("s{i}") })))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every single create succeeds");
    }
    for chunk in 0..2 {
        let reqs: Vec<BatchRequest> = (0..20)
            .map(|i| {
                let k = format!("b{}", chunk * 20 + i);
                BatchRequest::create_item(k.clone(), &site, &list, fields(json!({ "SyncKey": k })))
            })
            .collect();
        let out = c.execute_batch_with_retries(&reqs).await.unwrap();
        for o in &out {
            assert!(o.is_success(), "{}: {:?}", o.id, o.result);
        }
    }
    let stats = env.stats().await;
    let injected = stats["faults"]["injected_throttles"].as_u64().unwrap()
        + stats["faults"]["injected_unavailable"].as_u64().unwrap();
    let batches = stats["requests"]["batches"].as_u64().unwrap();
    eprintln!("faults: {injected} injected 429/503 across 80 writes; {batches} $batch requests");
    assert!(batches > 2, "throttled inner requests were re-batched");
    assert!(injected >= 5, "faults were exercised: {injected}");
    env.admin_post("faults", json!({})).await;

    let keys = sync_keys(&c, &site, &list).await;
    let unique: BTreeSet<_> = keys.iter().cloned().collect();
    assert_eq!(keys.len(), 80, "no duplicates, nothing lost");
    let expected: BTreeSet<String> = (0..40)
        .map(|i| format!("s{i}"))
        .chain((0..40).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(unique, expected);
}

/// Connection resets after the server applied the write: a create cannot know whether it happened,
/// so the client returns a transient error instead of retrying (which could duplicate). Every such
/// error corresponds to an item that exists.
#[tokio::test]
async fn resets_are_not_retried_for_creates() {
    let env = Env::start().await;
    let c = env.client(1_250);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    let list = make_list(&c, &site, "Resets").await;
    env.admin_post("faults", json!({ "reset_rate": 0.3, "seed": 7 }))
        .await;
    let (mut ok, mut lost) = (0, 0);
    for i in 0..30 {
        match c
            .create_item(&site, &list, &fields(json!({ "SyncKey": format!("r{i}") })))
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(
                    matches!(e, GraphError::Transient { status: None, .. }),
                    "{e:?}"
                );
                lost += 1;
            }
        }
    }
    env.admin_post("faults", json!({})).await;
    eprintln!("resets: {ok} creates acknowledged, {lost} reset (not retried)");
    assert!(lost > 0, "resets were exercised");
    let keys = sync_keys(&c, &site, &list).await;
    assert_eq!(
        keys.len(),
        ok + lost,
        "each reset create was applied by the server"
    );
}

/// An emulator with a 120 RU/min budget, a client believing in `client_ru_per_minute`, the site
/// and a fresh list.
async fn low_budget_list(client_ru_per_minute: u32) -> (Env, GraphClient, String, String) {
    let env = Env::start_with(EmulatorArgs {
        ru_per_minute: Some(120),
        ..EmulatorArgs::default()
    })
    .await;
    let c = env.client(client_ru_per_minute);
    let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
    let list = make_list(&c, &site, "Paced").await;
    (env, c, site, list)
}

/// The burst of 62 creates against a 120 RU/min budget: requests, RU, 429s and the budget the
/// client's limiter ended up pacing to.
async fn low_budget_burst(client_ru_per_minute: u32) -> (u64, u64, u64, u64) {
    let (env, c, site, list) = low_budget_list(client_ru_per_minute).await;
    let writes = 62;
    let mut tasks = Vec::new();
    for i in 0..writes {
        let (c, site, list) = (c.clone(), site.clone(), list.clone());
        tasks.push(tokio::spawn(async move {
            c.create_item(&site, &list, &fields(json!({ "SyncKey": format!("p{i}") })))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("every create succeeds");
    }
    let stats = env.stats().await;
    let consumed = stats["ru_consumed"].as_u64().unwrap();
    let throttled = stats["throttled"].as_u64().unwrap();
    let requests: u64 = stats["requests"]["by_method"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    eprintln!(
        "client budget {client_ru_per_minute} RU/min: {requests} requests, {consumed} RU, {throttled} budget 429s"
    );
    assert_eq!(sync_keys(&c, &site, &list).await.len(), writes);
    (requests, consumed, throttled, c.limiter().ru_per_minute())
}

/// With a low budget (120 RU/min on both sides) a burst of 62 creates (124 RU, more than one
/// window allows) completes with no budget 429 at all: the limiter paces it across windows.
/// Takes about 70 s by construction (the burst must outlast one 60 s window to prove anything).
#[tokio::test]
async fn limiter_keeps_throttling_rare_under_a_low_budget() {
    let (requests, consumed, throttled, _) = low_budget_burst(120).await;
    assert!(
        consumed > 120,
        "the burst exceeded one window's budget ({consumed} RU)"
    );
    assert!(
        throttled * 100 < requests,
        "{throttled} of {requests} requests were throttled (≥ 1 %)"
    );
}

/// A client that believes in a huge budget learns the tenant's from `RateLimit-Limit` (sent once
/// 80 % of a window is used) and paces the same burst without a single 429.
#[tokio::test]
async fn an_unpaced_client_learns_the_budget_from_ratelimit_headers() {
    let (requests, _, throttled, learned) = low_budget_burst(1_000_000).await;
    assert_eq!(learned, 120, "the limiter paces to Graph's RateLimit-Limit");
    assert_eq!(
        throttled, 0,
        "{throttled} of {requests} requests were throttled"
    );
}

/// Control for the tests above: with a client that believes in a huge budget, 80 creates sent as
/// four `$batch`es at once (160 RU, all in flight before an answer can teach the client the real
/// budget) are throttled by the emulator, and still complete by honouring `Retry-After`. Shows the
/// 429 assertions above can fail.
#[tokio::test]
async fn without_pacing_a_batched_burst_is_throttled() {
    let (env, c, site, list) = low_budget_list(1_000_000).await;
    let mut tasks = Vec::new();
    for b in 0..4 {
        let reqs: Vec<BatchRequest> = (0..20)
            .map(|i| {
                let key = format!("b{b}-{i}");
                BatchRequest::create_item(
                    i.to_string(),
                    &site,
                    &list,
                    fields(json!({ "SyncKey": key })),
                )
            })
            .collect();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.execute_batch_with_retries(&reqs).await
        }));
    }
    for t in tasks {
        let outcomes = t.await.unwrap().expect("every batch is answered");
        assert!(outcomes.iter().all(|o| o.is_success()), "{outcomes:?}");
    }
    let throttled = env.stats().await["throttled"].as_u64().unwrap();
    assert!(throttled > 0, "the emulator throttled the unpaced burst");
    assert_eq!(sync_keys(&c, &site, &list).await.len(), 80);
}
