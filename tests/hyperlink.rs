//! Hyperlink fields through SharePoint REST (issue 21 item 2, `ops/docs/hyperlinks.md`):
//! PostgreSQL → `syncbridge run` → an in-process emulator in its default mode, where Graph
//! refuses hyperlink writes as SharePoint Online does. With certificate credentials the items
//! carry the URL and description after create and after update; with only a client secret
//! `syncbridge validate` fails naming the reason, and the emulator's SharePoint REST refuses a
//! secret-based token as SharePoint does.
//!
//! Needs `DATABASE_URL` (`eval "$(cat /work/devstack.env)"`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use syncbridge::config::{GraphCredential, Secret};
use syncbridge::emulator::{self, EmulatorArgs};
use syncbridge::graph::sharepoint::SharePointSite;
use syncbridge::graph::{
    ColumnDefinition, GraphClient, GraphClientConfig, GraphError, LimiterRegistry,
};

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{BIN, Harness, hard_timeout};

fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/emulator/fixtures")
        .join(name)
}

/// A harness whose emulator trusts the test certificate (Graph still refuses hyperlinks).
async fn harness(tag: &str) -> Harness {
    Harness::new_with(
        tag,
        EmulatorArgs {
            client_certs: vec![fixture("app-cert.pem")],
            ..EmulatorArgs::default()
        },
    )
    .await
}

/// The harness's pipeline with hyperlinks at their default (SharePoint REST), the REST root at
/// the emulator and, with `certificate`, the test certificate instead of the client secret.
fn pipeline(h: &Harness, sync: &str, certificate: bool) -> PathBuf {
    let file = h.pipeline(&h.embedded_log(), sync);
    let mut yaml = std::fs::read_to_string(&file)
        .unwrap()
        .replace("  hyperlinks: graph\n", "")
        .replace(
            "  ru_per_minute: 100000\n",
            &format!(
                "  ru_per_minute: 100000\n  sharepoint_url: {}\n",
                h.emu.base_url()
            ),
        );
    if certificate {
        let secret = format!("  client_secret: {}\n", emulator::DEFAULT_CLIENT_SECRET);
        assert!(yaml.contains(&secret));
        yaml = yaml.replace(
            &secret,
            &format!(
                "  client_certificate:\n    cert: {}\n    key: {}\n",
                fixture("app-cert.pem").display(),
                fixture("app-key.pem").display()
            ),
        );
    }
    std::fs::write(&file, yaml).unwrap();
    file
}

/// Table `<name>_t (id, title, link)` filled by `rows` (an INSERT's source), synced push-only to
/// list `L <name>` with `link` as a hyperlink, by a certificate pipeline: (table, list, file).
async fn linked_table(h: &mut Harness, rows: &str) -> (String, String, PathBuf) {
    linked_table_pulled(h, rows, false).await
}

/// [`linked_table`], two-way when `pull` (polled every 300 ms).
async fn linked_table_pulled(h: &mut Harness, rows: &str, pull: bool) -> (String, String, PathBuf) {
    let t = h.t("t");
    h.sql(&format!(
        "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, link text);
         INSERT INTO public.{t} {rows};"
    ))
    .await;
    h.tables.push(format!("public.{t}"));
    let list = format!("L {}", h.name);
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      link: {{ field: Link, type: hyperlink }}\n    pull: {{ enabled: {pull}, interval_ms: 300 }}"
    );
    let file = pipeline(h, &sync, true);
    (t, list, file)
}

/// The `Link` value of the item of row `key`: `Some((url, description))`, `None` when empty.
async fn link(h: &Harness, list: &str, key: &str) -> Option<Option<(String, String)>> {
    let item = h.item(list, key).await?;
    Some(item.get("Link").map(|l| {
        (
            l["Url"].as_str().unwrap_or("").to_string(),
            l["Description"].as_str().unwrap_or("").to_string(),
        )
    }))
}

fn url(u: &str) -> Option<Option<(String, String)>> {
    Some(Some((u.to_string(), u.to_string())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hyperlinks_reach_the_list_through_sharepoint_rest_with_a_certificate() {
    hard_timeout(180, async {
        let mut h = harness("hyper").await;
        let (t, list, file) = linked_table(
            &mut h,
            "VALUES (1, 'one', 'https://example.org/one'),
                    (2, 'two', 'https://example.org/a,b?q=1'),
                    (3, 'three', NULL)",
        )
        .await;
        let (code, out, err) = h.cli(&["validate", file.to_str().unwrap()]).await;
        assert_eq!(code, 0, "validate with a certificate: {out}{err}");
        // The emulator's default: Graph refuses hyperlink writes, as SharePoint Online does.
        assert_eq!(h.stats().await["settings"]["hyperlink_writes"], false);
        h.start(&file);

        // After create (the snapshot): the URL and its description, a comma in the URL kept.
        h.wait_for("the snapshot's links", || async {
            link(&h, &list, "1").await == url("https://example.org/one")
                && link(&h, &list, "2").await == url("https://example.org/a,b?q=1")
                && link(&h, &list, "3").await == Some(None)
        })
        .await;

        // After update: changed, set, cleared; and a new row.
        h.sql(&format!(
            "UPDATE public.{t} SET link = 'https://example.org/one-v2' WHERE id = 1;
             UPDATE public.{t} SET link = 'https://example.org/three' WHERE id = 3;
             UPDATE public.{t} SET link = NULL, title = 'two, unlinked' WHERE id = 2;
             INSERT INTO public.{t} VALUES (4, 'four', 'http://example.org/four');"
        ))
        .await;
        h.wait_for("the updated links", || async {
            link(&h, &list, "1").await == url("https://example.org/one-v2")
                && link(&h, &list, "2").await == Some(None)
                && link(&h, &list, "3").await == url("https://example.org/three")
                && link(&h, &list, "4").await == url("http://example.org/four")
        })
        .await;
        let two = h.item(&list, "2").await.unwrap();
        assert_eq!(two["Title"], "two, unlinked");
        assert_eq!(h.items(&list).await.len(), 4);

        // Graph refused nothing (the hyperlinks never went to it) and nothing was dead-lettered.
        let stats = h.stats().await;
        assert_eq!(stats["requests"]["by_status"].get("400"), None, "{stats:#}");
        let dead = h
            .metric(
                "syncbridge_push_dead_letters_total",
                &[&format!("pipeline=\"{}\"", h.name)],
            )
            .await;
        assert_eq!(dead, 0.0, "{}", h.run_log());
        // Creates: 2 (the NULL link is left out of a create); updates: 3 changed links and the
        // new row. Each one REST call.
        let rest = h
            .metric(
                "syncbridge_push_rest_writes_total",
                &[&format!("pipeline=\"{}\"", h.name), "outcome=\"ok\""],
            )
            .await;
        assert_eq!(rest, 6.0, "REST writes\n{}", h.run_log());
        h.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_a_client_secret_validate_fails_and_sharepoint_refuses_the_token() {
    hard_timeout(60, async {
        let h = harness("hypersecret").await;
        let sync = "  - table: public.some_table\n    list: Links\n    fields:\n      title: Title\n      link: { field: Link, type: hyperlink }";
        let file = pipeline(&h, sync, false);
        let (code, out, err) = h.cli(&["validate", file.to_str().unwrap()]).await;
        let text = format!("{out}{err}");
        assert_ne!(code, 0, "validate passed with a secret:\n{text}");
        for needle in [
            "graph.client_secret",
            "`Link` of public.some_table",
            "SharePoint REST",
            "Unsupported app only token",
            "graph.client_certificate",
        ] {
            assert!(text.contains(needle), "no {needle:?} in:\n{text}");
        }

        // The emulator's SharePoint REST refuses the secret's app-only token (401), as
        // SharePoint does; the same call never reaches an item.
        let web = h
            .graph
            .resolve_site(emulator::DEFAULT_SITE)
            .await
            .unwrap()
            .web_url
            .unwrap();
        let base: url::Url = h.emu.base_url().parse().unwrap();
        let site = SharePointSite::new(&web, Some(&base)).unwrap();
        let e = h
            .graph
            .validate_update_list_item(
                &site,
                "00000000-0000-0000-0000-000000000000",
                "1",
                &[("Link".into(), "https://example.org, x".into())],
            )
            .await
            .unwrap_err();
        match &e {
            GraphError::Auth { status: 401, detail } => {
                assert!(detail.message.contains("Unsupported app only token"), "{e}")
            }
            other => panic!("expected a 401, got {other:?}"),
        }
    })
    .await;
}

/// Runs `syncbridge run` with the crash point between a write's Graph half and its REST half
/// armed; waits until it aborts there and returns its output.
async fn run_until_crash_before_rest(h: &Harness, file: &Path, n: u32) -> String {
    let log = h.dir.path().join(format!("crash-{n}.log"));
    let mut child = Command::new(BIN)
        .arg("run")
        .arg(file)
        .env("RUST_LOG", "info")
        .env("SYNCBRIDGE_FAILPOINTS", "push.before_rest=1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start syncbridge run");
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no crash:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("failpoint push.before_rest: aborting"),
        "{out}"
    );
    out
}

/// A crash between the Graph write and the REST write loses no hyperlink: after the create
/// (item made, link not yet set) and after an update (title written, link not yet), the
/// restarted process sets the link, and no row has two items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_graph_write_and_the_rest_write_loses_no_hyperlink() {
    hard_timeout(240, async {
        let mut h = harness("hypercrash").await;
        let (t, list, file) = linked_table(
            &mut h,
            "SELECT g, 'row ' || g, 'https://example.org/' || g FROM generate_series(1, 5) g",
        )
        .await;

        // Crash after the creates: the items exist, their links do not yet.
        run_until_crash_before_rest(&h, &file, 1).await;
        let items = h.items(&list).await;
        assert!(!items.is_empty(), "the crash came before any create");
        assert!(
            items.iter().all(|(_, f)| f.get("Link").is_none()),
            "a link was set before the crash point: {items:?}"
        );
        h.start(&file);
        h.wait_for("every link after the restart", || async {
            let items = h.items(&list).await;
            items.len() == 5
                && items.iter().all(|(k, f)| {
                    f.get("Link").and_then(|l| l["Url"].as_str())
                        == Some(format!("https://example.org/{k}").as_str())
                })
        })
        .await;
        h.stop().await;

        // Crash after an update's Graph half: the title changed, the link not yet.
        h.sql(&format!(
            "UPDATE public.{t} SET title = 'moved', link = 'https://example.org/moved' WHERE id = 2;"
        ))
        .await;
        run_until_crash_before_rest(&h, &file, 2).await;
        let two = h.item(&list, "2").await.unwrap();
        assert_eq!(two["Title"], "moved");
        assert_eq!(two["Link"]["Url"], "https://example.org/2");
        h.start(&file);
        h.wait_for("the updated link after the restart", || async {
            link(&h, &list, "2").await == url("https://example.org/moved")
        })
        .await;
        assert_eq!(h.items(&list).await.len(), 5);
        h.stop().await;
    })
    .await;
}

/// The client against the emulator's REST directly, with the certificate: the SharePoint token is
/// fetched once beside Graph's and cached; each call is priced by the tenant limiter like a
/// Graph write; an answer with a refused field (HTTP 200) is an error naming the field, and the
/// accepted field of the same call is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_call_is_priced_token_cached_and_every_entry_is_read() {
    hard_timeout(60, async {
        let h = harness("hyperclient").await;
        let base = h.emu.base_url();
        let mut gc = syncbridge::config::GraphConfig {
            credential: GraphCredential::ClientCertificate {
                cert: fixture("app-cert.pem"),
                key: Secret::new(fixture("app-key.pem").display().to_string()),
            },
            ..h.graph_config.clone()
        };
        gc.sharepoint_url = Some(base.parse().unwrap());
        let c = GraphClient::new(GraphClientConfig::from(&gc), &LimiterRegistry::new()).unwrap();
        let site = c.resolve_site(emulator::DEFAULT_SITE).await.unwrap();
        let list = c
            .create_list(
                &site.id,
                &format!("R {}", h.name),
                &[
                    ColumnDefinition::new("Link", "hyperlinkOrPicture", serde_json::json!({})),
                    ColumnDefinition::new("Qty", "number", serde_json::json!({})),
                ],
            )
            .await
            .unwrap();
        let mut fields = serde_json::Map::new();
        fields.insert("Title".into(), "x".into());
        let item = c.create_item(&site.id, &list.id, &fields).await.unwrap();
        assert_eq!(c.tokens_fetched(), 1);
        let sp = SharePointSite::new(site.web_url.as_deref().unwrap(), gc.sharepoint_url.as_ref())
            .unwrap();
        let before = c.usage();
        let values = [("Link".to_string(), "https://example.org/r, R".to_string())];
        c.validate_update_list_item(&sp, &list.id, &item.id, &values)
            .await
            .unwrap();
        c.validate_update_list_item(&sp, &list.id, &item.id, &values)
            .await
            .unwrap();
        let after = c.usage();
        assert_eq!(c.tokens_fetched(), 2, "one SharePoint token, cached");
        assert_eq!(after.requests - before.requests, 2);
        assert_eq!(
            after.resource_units - before.resource_units,
            4,
            "2 RU per write"
        );

        // One refused field (Qty is a number): HTTP 200, but the call is an error naming it,
        // and the hyperlink of the same call was applied.
        let e = c
            .validate_update_list_item(
                &sp,
                &list.id,
                &item.id,
                &[
                    ("Link".to_string(), "https://example.org/s, S".to_string()),
                    ("Qty".to_string(), "many".to_string()),
                ],
            )
            .await
            .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("field Qty refused"), "{e}");
        let got = c
            .get_item(&site.id, &list.id, &item.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got.fields["Link"],
            serde_json::json!({"Url": "https://example.org/s", "Description": "S"})
        );
    })
    .await;
}

/// Two-way: the hyperlinks written through REST are not taken for a person's edit (the row keeps
/// its value), and a person's edit of another field comes into the row with the link kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_way_table_keeps_its_links_and_pulls_other_edits() {
    hard_timeout(120, async {
        let mut h = harness("hyperpull").await;
        let (t, list, file) =
            linked_table_pulled(&mut h, "VALUES (1, 'one', 'https://example.org/one')", true).await;
        h.start(&file);
        h.wait_for("the link", || async {
            link(&h, &list, "1").await == url("https://example.org/one")
        })
        .await;
        h.sql(&format!(
            "UPDATE public.{t} SET link = 'https://example.org/one-v2' WHERE id = 1;"
        ))
        .await;
        h.wait_for("the updated link", || async {
            link(&h, &list, "1").await == url("https://example.org/one-v2")
        })
        .await;
        h.person_edit(
            &list,
            "1",
            serde_json::json!({ "Title": "edited in the list" }),
        )
        .await;
        let row = || async {
            let r =
                h.db.query_one(
                    &format!("SELECT title, link FROM public.{t} WHERE id = 1"),
                    &[],
                )
                .await
                .unwrap();
            (r.get::<_, String>(0), r.get::<_, Option<String>>(1))
        };
        h.wait_for("the person's edit in the row", || async {
            row().await.0 == "edited in the list"
        })
        .await;
        assert_eq!(row().await.1.as_deref(), Some("https://example.org/one-v2"));
        assert_eq!(
            link(&h, &list, "1").await,
            url("https://example.org/one-v2")
        );
        assert_eq!(h.items(&list).await.len(), 1);
        h.stop().await;
    })
    .await;
}
