//! The mapping editor's checks on the real stack and the emulator (issue 16):
//! `POST /pipelines/{name}/config/validate` finds every problem of a draft at once (config, the
//! table's catalog, the live list) and writes nothing; `GET /pipelines/{name}/lists/{list}/columns`
//! answers a list's live columns.
//!
//! Needs `DATABASE_URL` (superuser). A test FAILS (never skips) when it is unset.

use serde_json::{Value, json};

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

const FIELDS: &str = "      title: Title\n      n: { field: N, type: number }\n";

/// POST `yaml` to the validate route: status, content type and body.
async fn validate(h: &Harness, yaml: &str) -> (u16, String, Value) {
    let url = format!(
        "http://127.0.0.1:{}/pipelines/{}/config/validate",
        h.control_port, h.name
    );
    let r = h
        .admin
        .post(url)
        .json(&json!({ "yaml": yaml }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, r.json().await.unwrap())
}

async fn get(h: &Harness, path: &str) -> (u16, Value) {
    let url = format!("http://127.0.0.1:{}{path}", h.control_port);
    let r = h.admin.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// `(source, blocking, column or field)` of each finding.
fn findings(body: &Value, key: &str) -> Vec<(String, bool, String)> {
    body[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {body:#}"))
        .iter()
        .map(|f| {
            let what = f["column"].as_str().or(f["field"].as_str()).unwrap_or("");
            (
                f["source"].as_str().unwrap().to_string(),
                f["blocking"].as_bool().unwrap(),
                what.to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_is_checked_against_config_catalog_and_live_list_and_nothing_is_written() {
    hard_timeout(180, async {
        let mut h = Harness::new("cfgchk").await;
        let t = h.t("t");
        h.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL, n bigint, flag boolean);
             INSERT INTO public.{t} SELECT g, 'row ' || g, g, true FROM generate_series(1, 3) g;"
        ))
        .await;
        h.tables.push(format!("public.{t}"));
        let list = format!("T {}", h.name);
        let sync = format!("  - table: public.{t}\n    list: {list}\n    fields:\n{FIELDS}    pull: {{ enabled: false }}");
        let file = h.pipeline(&h.embedded_log(), &sync);
        h.start(&file);
        h.wait_for("the 3 items", || async { h.items(&list).await.len() == 3 })
            .await;
        let original = std::fs::read_to_string(&file).unwrap();
        let (_, got) = get(&h, &format!("/pipelines/{}/config", h.name)).await;
        let yaml = got["yaml"].as_str().unwrap().to_string();

        // The live list's columns.
        let path = format!("/pipelines/{}/lists/{}/columns", h.name, list.replace(' ', "%20"));
        let (status, cols) = get(&h, &path).await;
        assert_eq!(status, 200, "{cols:#}");
        assert_eq!(cols["exists"], true);
        let n = cols["columns"].as_array().unwrap().iter().find(|c| c["name"] == "N");
        assert_eq!(n.map(|c| c["type"].clone()), Some(json!("number")), "{cols:#}");
        let (status, body) = get(&h, &format!("/pipelines/{}/lists/Nope/columns", h.name)).await;
        assert_eq!((status, body["kind"].as_str()), (404, Some("unknown_list")));

        // Four problems in three places, and one note: title cannot be a number (catalog), no
        // column `gone` (catalog), the list's N is a number column (live list); Flag is missing
        // from the list, which the reload adds (a note).
        let bad = yaml.replace(
            FIELDS,
            "      title: { field: Title, type: number }\n      n: { field: N, type: boolean }\n      gone: Gone\n      flag: { field: Flag, type: boolean }\n",
        );
        let (status, ctype, body) = validate(&h, &bad).await;
        assert_eq!(status, 422, "{body:#}");
        assert_eq!(ctype, "application/problem+json");
        assert_eq!(body["kind"], "invalid_config");
        let mut found = findings(&body, "problems");
        found.sort();
        let want = |s: &str, b: bool, w: &str| (s.to_string(), b, w.to_string());
        assert_eq!(
            found,
            [
                want("catalog", true, "gone"),
                want("catalog", true, "n"),
                want("catalog", true, "title"),
                want("graph", false, "Flag"),
                want("graph", false, "Gone"),
                want("graph", true, "N"),
                want("graph", true, "Title"),
            ],
            "{body:#}"
        );
        let blocking = found.iter().filter(|f| f.1).count();
        assert_eq!(
            body["invalid-params"].as_array().unwrap().len(),
            blocking,
            "one invalid-params entry per blocking problem: {body:#}"
        );
        // Catalog problems point at the entry's `table:` line.
        let file_name = file.display().to_string();
        let params = body["invalid-params"].to_string();
        assert!(params.contains(&format!("{file_name}:")), "{params}");

        // A config problem: named by file, line and column; the catalog is not asked.
        let broken = yaml.replace("type: number", "type: nonsense");
        let (status, _, body) = validate(&h, &broken).await;
        assert_eq!(status, 422, "{body:#}");
        let p = &body["problems"][0];
        assert_eq!((p["source"].as_str(), p["blocking"].as_bool()), (Some("config"), Some(true)), "{body:#}");
        assert!(p["line"].as_u64().unwrap() > 1 && p["file"] == file_name.as_str(), "{body:#}");
        assert!(body["mapping"].is_null(), "{body:#}");

        // A good draft: 200, the note, the draft's mapping.
        let good = yaml.replace(FIELDS, &format!("{FIELDS}      flag: {{ field: Flag, type: boolean }}\n"));
        let (status, _, body) = validate(&h, &good).await;
        assert_eq!(status, 200, "{body:#}");
        assert_eq!(findings(&body, "findings"), [want("graph", false, "Flag")]);
        assert_eq!(body["mapping"][0]["fields"][2]["field"], "Flag", "{body:#}");

        assert_eq!(std::fs::read_to_string(&file).unwrap(), original, "nothing written");
        h.stop().await;
    })
    .await;
}
