//! Hyperlink fields through SharePoint REST (issue 21 item 2, `ops/docs/hyperlinks.md`):
//! PostgreSQL → `syncbridge run` → an in-process emulator in its default mode, where Graph
//! refuses hyperlink writes as SharePoint Online does. With certificate credentials the items
//! carry the URL and description after create and after update; with only a client secret
//! `syncbridge validate` fails naming the reason, and the emulator's SharePoint REST refuses a
//! secret-based token as SharePoint does.
//!
//! Needs `DATABASE_URL` (`eval "$(cat /work/devstack.env)"`).

use std::path::PathBuf;

use syncbridge::emulator::{self, EmulatorArgs};
use syncbridge::graph::GraphError;
use syncbridge::graph::sharepoint::SharePointSite;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

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
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, link text);
             INSERT INTO public.{t} VALUES
               (1, 'one', 'https://example.org/one'),
               (2, 'two', 'https://example.org/a,b?q=1'),
               (3, 'three', NULL);"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let list = format!("L {}", h.name);
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields:\n      title: Title\n      link: {{ field: Link, type: hyperlink }}\n    pull: {{ enabled: false }}"
        );
        let file = pipeline(&h, &sync, true);
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
        assert_eq!(
            stats["requests"]["by_status"].get("400"),
            None,
            "{stats:#}"
        );
        let dead = h
            .metric("syncbridge_push_dead_letters_total", &[&format!("pipeline=\"{}\"", h.name)])
            .await;
        assert_eq!(dead, 0.0, "{}", h.run_log());
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
