//! Issue 11 items 6–7 over real HTTP: the `syncbridge run` binary with `control.tokens`
//! (from `${ENV}`) answers 401 without or with a wrong token (`WWW-Authenticate: Bearer`), 403 to
//! a `read` token on a POST, 200 to the right token; errors are problem JSON; `/health`,
//! `/metrics` and `/openapi.json` stay open and `/openapi.json` equals `schemas/openapi.json`.
//! The CLI sends `SYNCBRIDGE_API_TOKEN` and explains a refusal. A non-loopback `control.listen`
//! without tokens makes `syncbridge run` exit 1 before anything starts. schemathesis (installed by
//! `ops/schemathesis-venv`) runs a bounded number of examples with a valid token against
//! `/openapi.json`: no 5xx, no answer the document does not declare.
//!
//! Needs the stack (`eval "$(ops/stack env)"`): `DATABASE_URL`, and the schemathesis venv. Fails
//! (never skips) without them.

use std::process::{Command, Stdio};

use serde_json::Value;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{BIN, Harness, cli_with_env, hard_timeout};

const OPERATE: &str = "op-3b1f9c2e-token";
const READ: &str = "rd-77a0d5e4-token";
/// The pipeline file reads its tokens from these (the CLI loads the same file, so it needs them).
const TOKEN_VARS: [(&str, &str); 2] = [
    ("SB_TEST_OPERATE_TOKEN", OPERATE),
    ("SB_TEST_READ_TOKEN", READ),
];

fn with_tokens(file: &std::path::Path) {
    let mut yaml = std::fs::read_to_string(file).unwrap();
    assert!(yaml.ends_with('\n'), "control: is the file's last section");
    yaml.push_str(
        "  tokens:\n    - { name: ops, token: '${SB_TEST_OPERATE_TOKEN}', role: operate }\n    - { name: dashboard, token: '${SB_TEST_READ_TOKEN}', role: read }\n",
    );
    std::fs::write(file, yaml).unwrap();
}

/// Runs the CLI with the tokens' variables and `SYNCBRIDGE_API_TOKEN` = `token` (unset: None).
async fn cli(args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let mut env: Vec<(&str, Option<&str>)> =
        TOKEN_VARS.iter().map(|(k, v)| (*k, Some(*v))).collect();
    env.push(("SYNCBRIDGE_API_TOKEN", token));
    cli_with_env(args, &env).await
}

/// A running `syncbridge run` of one table, with both tokens configured; (harness, file, table).
async fn start_with_tokens(tag: &str) -> (Harness, std::path::PathBuf, String) {
    let mut h = Harness::new(tag).await;
    let t = h.t("t");
    h.sql(&format!(
        "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text)"
    ))
    .await;
    h.tables.push(format!("public.{t}"));
    let sync = format!(
        "  - table: public.{t}\n    list: L {}\n    fields:\n      title: Title\n    pull: {{ enabled: false }}",
        h.name
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    with_tokens(&file);
    let stderr = std::fs::File::create(h.dir.path().join("run.log")).unwrap();
    h.child = Some(
        Command::new(BIN)
            .arg("run")
            .arg(&file)
            .envs(TOKEN_VARS)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start syncbridge run"),
    );
    h.wait_for("the pipeline to be ready", || async {
        matches!(
            reqwest::get(format!("http://127.0.0.1:{}/ready", h.control_port)).await,
            Ok(r) if r.status().is_success()
        )
    })
    .await;
    (h, file, t)
}

async fn call(h: &Harness, method: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = h.admin.request(
        method.parse().unwrap(),
        format!("http://127.0.0.1:{}{path}", h.control_port),
    );
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn problem(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "status {status}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    for member in ["type", "title", "detail", "error", "kind"] {
        assert!(body[member].is_string(), "no `{member}` in {body}");
    }
    body
}

#[tokio::test]
async fn tokens_guard_the_api_over_http_and_the_cli_sends_them() {
    hard_timeout(240, async {
        let (mut h, file, _) = start_with_tokens("api_auth").await;
        let file_s = file.display().to_string();

        // Probes, metrics and the API description need no token.
        for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
            assert_eq!(call(&h, "GET", path, None).await.status(), 200, "{path}");
        }
        let served: Value = call(&h, "GET", "/openapi.json", None)
            .await
            .json()
            .await
            .unwrap();
        let committed: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/openapi.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            served, committed,
            "/openapi.json differs from schemas/openapi.json"
        );

        let pause = format!("/pipelines/{}/pause", h.name);
        let resume = format!("/pipelines/{}/resume", h.name);
        // 401: no token, a wrong one, a truncated one.
        for token in [None, Some("wrong"), Some(&OPERATE[1..])] {
            for (method, path) in [("GET", &pause), ("POST", &resume)] {
                let resp = call(&h, method, path, token).await;
                let challenge = resp.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .to_string();
                assert!(challenge.starts_with("Bearer"), "{challenge}");
                let body = problem(resp, 401).await;
                assert_eq!(body["kind"], "unauthorized");
            }
        }
        // 403: a read token may look but not resume; the answer names the token, not its value.
        let resp = call(&h, "GET", &pause, Some(READ)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap()["paused"], false);
        let body = problem(call(&h, "POST", &resume, Some(READ)).await, 403).await;
        assert!(
            body["detail"].as_str().unwrap().contains("dashboard"),
            "{body}"
        );
        assert!(!body.to_string().contains(READ), "token echoed: {body}");
        // The operate token passes; the handler answers (409: not paused) as problem JSON.
        let body = problem(call(&h, "POST", &resume, Some(OPERATE)).await, 409).await;
        assert_eq!(body["kind"], "not_paused");
        // Bad input: a problem naming the parameter, nothing queued.
        let snapshot = format!("/pipelines/{}/snapshot", h.name);
        let body = problem(call(&h, "POST", &snapshot, Some(OPERATE)).await, 400).await;
        assert_eq!(body["invalid-params"][0]["name"], "table", "{body}");
        let status: Value = call(&h, "GET", &snapshot, Some(READ))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(status["state"], "idle", "{status}");

        // The CLI: no token, a read token, an operate token.
        let (code, _, err) = cli(&["resume", &file_s], None).await;
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("HTTP 401") && err.contains("SYNCBRIDGE_API_TOKEN"),
            "{err}"
        );
        let (code, _, err) = cli(&["resume", &file_s], Some("wrong")).await;
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("is not one of the pipeline's control.tokens"),
            "{err}"
        );
        let (code, _, err) = cli(&["resume", &file_s], Some(READ)).await;
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("HTTP 403") && err.contains("operate"), "{err}");
        assert!(!err.contains(READ), "token echoed: {err}");
        let (code, _, err) = cli(&["resume", &file_s], Some(OPERATE)).await;
        assert_eq!(code, 2, "not paused: {err}");
        assert!(err.contains("is not paused"), "{err}");
        let (code, out, err) = cli(&["conflicts", "list", "--json", &file_s], Some(READ)).await;
        assert_eq!(code, 0, "{err}");
        // One JSON line per conflict; this pipeline has none.
        assert_eq!(out, "", "{err}");
        assert!(err.contains("0 conflict(s)"), "{err}");
        let (code, _, err) = cli(&["conflicts", "list", &file_s], None).await;
        assert_ne!(
            code, 0,
            "a refused list must not fall back to reading the log: {err}"
        );
        assert!(err.contains("HTTP 401"), "{err}");

        let log = h.run_log();
        for secret in [OPERATE, READ] {
            assert!(!log.contains(secret), "token in the run log:\n{log}");
        }
        h.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_open_api_on_a_public_address_refuses_to_start() {
    hard_timeout(60, async {
        let h = Harness::new("api_open").await;
        let file = h.pipeline(
            &h.embedded_log(),
            "  - table: public.none\n    list: None\n    fields:\n      title: Title",
        );
        let yaml = std::fs::read_to_string(&file)
            .unwrap()
            .replace("listen: 127.0.0.1:", "listen: 0.0.0.0:");
        std::fs::write(&file, yaml).unwrap();
        let file_s = file.display().to_string();
        let (code, _, err) = cli(&["run", &file_s], None).await;
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("not a loopback address") && err.contains("control.tokens"),
            "{err}"
        );
    })
    .await;
}

/// schemathesis (PyPI), installed by `ops/schemathesis-venv` (ops/test runs it first).
fn schemathesis() -> std::path::PathBuf {
    let path = std::env::var_os("SYNCBRIDGE_SCHEMATHESIS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            std::path::Path::new(&home).join(".cache/syncbridge/schemathesis/bin/st")
        });
    assert!(
        path.exists(),
        "{} is missing: run ops/schemathesis-venv (ops/test does)",
        path.display()
    );
    path
}

/// Issue 11 acceptance: schemathesis, with a valid token, against `/openapi.json` for a bounded
/// number of examples: no 5xx, no status, content type or body the document does not declare.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_break() {
    hard_timeout(300, async {
        let st = schemathesis();
        let (mut h, _, t) = start_with_tokens("api_st").await;
        let url = format!("http://127.0.0.1:{}/openapi.json", h.control_port);
        let report = h.dir.path().join("st");
        // The pipeline's own name, table and database, so that operations reach the handlers (a
        // re-snapshot really starts, the catalog is read) instead of answering 404.
        let config = h.dir.path().join("schemathesis.toml");
        std::fs::write(
            &config,
            format!(
                "[parameters]\n\"path.name\" = \"{}\"\n\"query.table\" = \"public.{t}\"\n\
                 \"path.database\" = \"{}\"\n",
                h.name,
                syncbridge::config::PgUrl::parse(&h.source_url)
                    .unwrap()
                    .database()
            ),
        )
        .unwrap();
        let args: Vec<String> = vec![
            "--config-file".into(),
            config.display().to_string(),
            "run".into(),
            url,
            "--header".into(),
            format!("Authorization: Bearer {OPERATE}"),
            "--checks".into(),
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance".into(),
            "--max-examples".into(),
            "30".into(),
            "--workers".into(),
            "1".into(),
            "--seed".into(),
            "11".into(),
            "--generation-database".into(),
            "none".into(),
            "--report-dir".into(),
            report.display().to_string(),
            "--no-color".into(),
        ];
        // In the test's own directory: schemathesis keeps a `.schemathesis/` cache in its working
        // directory, which must not land in the checkout.
        let cwd = h.dir.path().to_path_buf();
        let out = tokio::task::spawn_blocking(move || Command::new(st).args(&args).current_dir(cwd).output())
            .await
            .unwrap()
            .expect("run schemathesis");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "schemathesis failed:\n{text}");
        // It tested every operation it selected, at least every protected one (with the token).
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/openapi.json"))
                .unwrap(),
        )
        .unwrap();
        let protected = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter(|op| op.get("security").is_some())
            .count();
        let number_after = |label: &str| -> usize {
            let at = text.find(label).unwrap_or_else(|| panic!("no {label:?} in\n{text}"));
            text[at + label.len()..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let tested = number_after("Tested:");
        assert!(text.contains(&format!("Selected: {tested}/{tested}")), "{text}");
        assert!(tested >= protected && protected >= 6, "{tested} < {protected}:\n{text}");
        assert!(!text.contains(" failed"), "{text}");
        h.stop().await;
    })
    .await;
}
