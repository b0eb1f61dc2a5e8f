//! Pipeline configuration: the example pipelines, the broken-config corpus, the committed JSON
//! Schema, secret redaction, interpolation locations, and no panics on garbage.
//!
//! Regenerate after a deliberate change (then review the diff):
//! - schema: `SYNCBRIDGE_UPDATE_SCHEMA=1 cargo test --test config`
//! - corpus expectations: `SYNCBRIDGE_UPDATE_EXPECTED=1 cargo test --test config`

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use syncbridge::config::{
    self, ConfigReport, ConflictPolicy, Direction, FieldType, LogConfig, OnDelete, PipelineConfig,
    Secret,
};

const PROJECTS: &str = include_str!("../pipelines/projects.yaml");
const DEMO: &str = include_str!("../pipelines/demo.yaml");
const DB_PASSWORD: &str = "pa55-w0rd-db";
const CLIENT_SECRET: &str = "s3cr3t-client-value";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn projects_env(name: &str) -> Option<String> {
    match name {
        "DATABASE_URL" => Some(format!(
            "postgres://sync:{DB_PASSWORD}@db:5432/app?sslmode=require"
        )),
        "GRAPH_CLIENT_SECRET" => Some(CLIENT_SECRET.into()),
        _ => None,
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> PipelineConfig {
    config::load_str("test.yaml", text, env)
        .unwrap_or_else(|r| panic!("expected a valid config:\n{r}"))
}

fn problems(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    match config::load_str("t.yaml", text, env) {
        Ok(c) => panic!("expected problems, got a config: {c:?}"),
        Err(r) => r
            .problems
            .iter()
            .map(|p| format!("{}:{}: {}", p.line, p.col, p.message))
            .collect(),
    }
}

#[test]
fn projects_example_builds_with_its_values_and_defaults() {
    let c = load(PROJECTS, &projects_env);
    assert_eq!(c.name, "projects");
    assert_eq!(
        c.source.url.expose(),
        format!("postgres://sync:{DB_PASSWORD}@db:5432/app?sslmode=require")
    );
    assert_eq!(
        c.log,
        LogConfig::Embedded {
            path: ".syncbridge/projects".into()
        }
    );
    assert_eq!(
        c.graph.base_url.as_str(),
        "https://graph.microsoft.com/v1.0"
    );
    assert_eq!(
        c.graph.token_url.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        "{{tenant}} is substituted"
    );
    assert_eq!(c.graph.client_secret().unwrap().expose(), CLIENT_SECRET);
    assert_eq!(c.graph.ru_per_minute, 1250);
    assert_eq!(c.graph.site, "contoso.sharepoint.com:/sites/ops".into());
    assert_eq!(c.control.listen, "127.0.0.1:8088".parse().unwrap());
    assert_eq!(
        c.control.meta_url.expose(),
        c.source.url.expose(),
        "the meta-store defaults to the source database"
    );
    let e = &c.sync[0];
    assert_eq!(
        (e.table.schema.as_str(), e.table.name.as_str()),
        ("public", "projects")
    );
    assert_eq!(e.list, "Projects");
    assert_eq!(e.key, Some(vec!["id".to_string()]));
    let order: Vec<(&str, &str, FieldType)> = e
        .fields
        .iter()
        .map(|f| (f.column.as_str(), f.field.as_str(), f.field_type))
        .collect();
    assert_eq!(
        order,
        [
            ("name", "Title", FieldType::Text),
            ("status", "Status", FieldType::Choice),
            ("budget", "Budget", FieldType::Currency),
            ("due", "DueDate", FieldType::Date),
            ("notes", "Notes", FieldType::Note),
        ]
    );
    assert_eq!(e.fields[1].choices, ["open", "closed", "archived"]);
    assert_eq!(e.fields[4].direction, Direction::PushOnly);
    assert_eq!(e.fields[0].direction, Direction::Bidirectional);
    assert_eq!(e.routes.len(), 1);
    assert_eq!(
        (e.routes[0].when.as_str(), e.routes[0].list.as_str()),
        ("status == 'archived'", "Projects Archive")
    );
    assert!(e.pull.enabled);
    assert_eq!(e.pull.interval_ms, 2000);
    assert_eq!(e.pull.on_delete, OnDelete::Delete);
    assert_eq!(e.conflict, ConflictPolicy::SourceWins);
    assert_eq!(
        e.lists().collect::<Vec<_>>(),
        ["Projects", "Projects Archive"]
    );
}

#[test]
fn projects_example_needs_its_environment() {
    let got = problems(PROJECTS, &no_env);
    assert_eq!(
        got,
        [
            "4:8: environment variable `DATABASE_URL` is not set (use `${DATABASE_URL:-default}` for a default)",
            "13:18: environment variable `GRAPH_CLIENT_SECRET` is not set (use `${GRAPH_CLIENT_SECRET:-default}` for a default)",
        ]
    );
}

#[test]
fn demo_pipeline_builds_without_any_environment() {
    let c = load(DEMO, &no_env);
    assert_eq!(c.name, "demo");
    assert_eq!(
        c.source.url.expose(),
        "postgres://syncbridge@127.0.0.1:54329/syncbridge?sslmode=disable"
    );
    assert_eq!(c.graph.base_url.as_str(), "http://127.0.0.1:8900/v1.0");
    assert_eq!(
        c.graph.token_url.as_str(),
        "http://127.0.0.1:8900/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(c.graph.client_secret().unwrap().expose(), "dev-secret");
    assert_eq!(c.graph.ru_per_minute, config::DEFAULT_RU_PER_MINUTE);
    let e = &c.sync[0];
    assert_eq!(e.table.to_string(), "public.demo_tasks");
    assert_eq!(e.key, None, "defaults to the primary key");
    let status = e.fields.iter().find(|f| f.column == "status").unwrap();
    assert_eq!(status.choices, ["open", "in_progress", "done", "archived"]);
    let notes = e.fields.iter().find(|f| f.column == "notes").unwrap();
    assert_eq!(notes.direction, Direction::PushOnly);
    assert_eq!(e.routes[0].list, "Demo Tasks Archive");
    // The environment overrides the defaults.
    let c = load(
        DEMO,
        &env_of(&[("GRAPH_BASE_URL", "https://graph.example/v1.0")]),
    );
    assert_eq!(c.graph.base_url.as_str(), "https://graph.example/v1.0");
}

#[test]
fn example_pipelines_pass_load_files() {
    // `load_files` reads the process environment (not changed here: tests run in threads).
    let paths = [
        root().join("pipelines/projects.yaml"),
        root().join("pipelines/demo.yaml"),
    ];
    let missing: Vec<_> = ["DATABASE_URL", "GRAPH_CLIENT_SECRET"]
        .into_iter()
        .filter(|v| std::env::var(v).is_err())
        .collect();
    if !missing.is_empty() {
        // Without them, the only problems are the two unset variables of projects.yaml.
        let report = config::load_files(&paths).unwrap_err();
        assert!(
            report
                .problems
                .iter()
                .all(|p| p.file.ends_with("projects.yaml")),
            "{report}"
        );
        assert_eq!(report.problems.len(), missing.len(), "{report}");
        return;
    }
    let configs = config::load_files(&paths).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(configs.len(), 2);
}

/// Every `tests/configs/broken/X.yaml` fails with exactly the problems in `X.expected`
/// (`line:col: message`, one a line), through `load_files` as `syncbridge validate` runs it.
#[test]
fn broken_corpus_reports_expected_problems() {
    let dir = root().join("tests/configs/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "corpus went missing: {files:?}");
    let update = std::env::var_os("SYNCBRIDGE_UPDATE_EXPECTED").is_some();
    let mut failures = Vec::new();
    for file in &files {
        let report = match config::load_files(std::slice::from_ref(file)) {
            Ok(_) => {
                failures.push(format!("{}: loaded without problems", file.display()));
                continue;
            }
            Err(r) => r,
        };
        let prefix = format!("{}:", file.display());
        let got: String = report
            .to_string()
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix(&prefix).unwrap_or(l)))
            .collect();
        assert!(report.problems.iter().all(|p| Path::new(&p.file) == file));
        let expected_path = file.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- got\n{got}",
                file.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(review, then SYNCBRIDGE_UPDATE_EXPECTED=1 to accept)",
        failures.join("\n")
    );
}

#[test]
fn all_files_are_validated_together_and_names_must_be_unique() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("a.yaml");
    let copy = dir.path().join("b.yaml");
    let broken = dir.path().join("c.yaml");
    std::fs::write(&demo, DEMO).unwrap();
    std::fs::write(&copy, DEMO).unwrap();
    std::fs::write(&broken, "version: 1\nname: Bad\n").unwrap();
    let missing = dir.path().join("missing.yaml");
    let report = config::load_files(&[demo.clone(), copy.clone(), broken.clone(), missing.clone()])
        .unwrap_err();
    let text = report.to_string();
    let a = demo.display().to_string();
    let b = copy.display().to_string();
    assert!(
        text.contains(&format!(
            "{b}:4:7: pipeline name `demo` is already used by {a}:4:7"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{b}:18:11: list `Demo Tasks` on this site is already synced by {a}:18:11"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}:2:7: invalid pipeline `name` `Bad`",
            broken.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}:1:1: missing required key `source`",
            broken.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}:1:1: cannot read the file", missing.display())),
        "{text}"
    );
    assert_eq!(
        text.lines().count(),
        report.problems.len(),
        "one line per problem"
    );
}

#[test]
fn committed_schema_is_up_to_date() {
    let path = root().join("schemas/pipeline.schema.json");
    let fresh = config::json_schema_text();
    if std::env::var_os("SYNCBRIDGE_UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "schemas/pipeline.schema.json is stale; regenerate it with\n  SYNCBRIDGE_UPDATE_SCHEMA=1 cargo test --test config"
    );
    let schema = config::json_schema();
    assert_eq!(schema["additionalProperties"], false);
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for key in ["version", "name", "source", "graph", "sync"] {
        assert!(required.contains(&key), "{key} is required: {required:?}");
    }
    assert!(!required.contains(&"log") && !required.contains(&"control"));
}

#[test]
fn secrets_never_print() {
    let c = load(PROJECTS, &projects_env);
    let outputs = [
        format!("{c:?}"),
        format!("{c:#?}"),
        serde_json::to_string(&c).unwrap(),
        format!("{}", c.source.url),
        format!("{:?}", c.source.url),
        format!("{}", c.graph.client_secret().unwrap()),
        format!("{:?}", c.graph.client_secret().unwrap()),
    ];
    for out in &outputs {
        assert!(
            !out.contains(DB_PASSWORD) && !out.contains(CLIENT_SECRET),
            "secret leaked: {out}"
        );
    }
    assert_eq!(
        c.source.url.to_string(),
        "postgres://sync:***@db:5432/app?sslmode=require"
    );
    assert_eq!(format!("{:?}", Secret::new("x")), "***");
    assert_eq!(
        serde_json::to_value(&c).unwrap()["graph"]["client_secret"],
        "***"
    );

    // A password in the query string (libpq accepts `?password=`) is redacted too.
    let q = load(
        DEMO,
        &env_of(&[(
            "DATABASE_URL",
            "postgresql://u@h/db?password=pa55-w0rd-db&sslmode=disable",
        )]),
    );
    assert_eq!(
        q.source.url.to_string(),
        "postgresql://u@h/db?password=***&sslmode=disable"
    );
    assert!(!format!("{q:?}").contains(DB_PASSWORD));

    // Problems about secret-bearing values never echo them.
    let bad = load_err_text(
        DEMO,
        &env_of(&[("DATABASE_URL", "mysql://root:pa55-w0rd-db@h/db")]),
    );
    assert!(
        bad.contains("source.url` must be a postgres:// or postgresql:// URL"),
        "{bad}"
    );
    assert!(!bad.contains(DB_PASSWORD), "{bad}");
    let bad = load_err_text(
        DEMO,
        &env_of(&[
            ("GRAPH_CLIENT_SECRET", CLIENT_SECRET),
            ("GRAPH_BASE_URL", CLIENT_SECRET),
        ]),
    );
    assert!(!bad.contains(CLIENT_SECRET), "{bad}");

    // Unusable TLS options are located at source.url, the password never shown.
    let bad = load_err_text(
        DEMO,
        &env_of(&[(
            "DATABASE_URL",
            "postgres://u:pa55-w0rd-db@h/db?sslmode=verify_full",
        )]),
    );
    assert!(bad.contains("t.yaml:"), "{bad}");
    assert!(
        bad.contains("`source.url`: sslmode=\"verify_full\" is not one of"),
        "{bad}"
    );
    assert!(!bad.contains(DB_PASSWORD), "{bad}");
    let bad = load_err_text(
        DEMO,
        &env_of(&[(
            "DATABASE_URL",
            "postgres://u@h/db?sslmode=verify-full&sslkey=k.pem",
        )]),
    );
    assert!(
        bad.contains("sslkey (client certificate authentication) is not supported"),
        "{bad}"
    );
}

fn load_err_text(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
    match config::load_str("t.yaml", text, env) {
        Ok(_) => panic!("expected problems"),
        Err(r) => r.to_string(),
    }
}

#[test]
fn interpolated_values_are_located_where_they_are_written() {
    let text = DEMO.replace(
        "  site: contoso.sharepoint.com:/sites/dev\n",
        "  site: contoso.sharepoint.com:/sites/dev\n  ru_per_minute: ${RU}\n",
    );
    let line = text.lines().position(|l| l.contains("${RU}")).unwrap() + 1;
    assert_eq!(
        load(&text, &env_of(&[("RU", "6000")])).graph.ru_per_minute,
        6000,
        "numbers may come from the environment"
    );
    let got = problems(&text, &env_of(&[("RU", "lots")]));
    assert_eq!(
        got,
        [format!(
            "{line}:18: `graph.ru_per_minute`: expected an unsigned integer, found a value from the environment"
        )]
    );
    let got = problems(&text, &no_env);
    assert_eq!(
        got,
        [format!(
            "{line}:18: environment variable `RU` is not set (use `${{RU:-default}}` for a default)"
        )]
    );
    // The `$` of the reference, not the start of the scalar, inside a quoted scalar.
    let text = DEMO.replace(
        "client_secret: ${GRAPH_CLIENT_SECRET:-dev-secret}",
        "client_secret: \"a-$$-${NOPE}\"",
    );
    let line = text.lines().position(|l| l.contains("${NOPE}")).unwrap() + 1;
    assert_eq!(
        problems(&text, &no_env),
        [format!(
            "{line}:24: environment variable `NOPE` is not set (use `${{NOPE:-default}}` for a default)"
        )]
    );
    assert_eq!(
        load(&text, &env_of(&[("NOPE", "x")]))
            .graph
            .client_secret()
            .unwrap()
            .expose(),
        "a-$-x"
    );
    // Comments are not interpolated.
    let text = DEMO.replace("version: 1\n", "version: 1 # ${NOT_A_VAR}\n");
    load(&text, &no_env);
}

#[test]
fn quoted_numbers_and_yaml_1_1_booleans_are_type_errors() {
    let text = DEMO
        .replace("interval_ms: 2000", "interval_ms: \"2000\"")
        .replace("enabled: true", "enabled: yes");
    let got = problems(&text, &no_env);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].ends_with("`sync[0].pull.enabled`: expected `true` or `false`, found `yes`"),
        "{got:?}"
    );
    assert!(got[1].ends_with("`sync[0].pull.interval_ms`: expected an unsigned integer, found the quoted string `2000`"), "{got:?}");
}

/// Basic-auth credentials in the registry URL's user info are split off into a `Secret`: the URL
/// that `Debug` and the API's JSON show has none, and the password never appears in either.
#[test]
fn schema_registry_user_info_becomes_a_redacted_secret() {
    let text = DEMO.replace(
        "  embedded: { path: .syncbridge/demo }",
        "  kafka: { brokers: \"k1:9092\", schema_registry: \"https://sb%40corp:${SR_PASSWORD}@sr.example:8081/base\" }",
    );
    let c = load(&text, &env_of(&[("SR_PASSWORD", "p%2Fw-sr-s3cret")]));
    let LogConfig::Kafka {
        schema_registry: Some(r),
        ..
    } = &c.log
    else {
        panic!("{:?}", c.log)
    };
    assert_eq!(r.url.as_str(), "https://sr.example:8081/base");
    assert_eq!(r.username.as_deref(), Some("sb@corp"));
    assert_eq!(
        r.password.as_ref().map(|p| p.expose()),
        Some("p/w-sr-s3cret")
    );
    let shown = format!("{c:?}{}", serde_json::to_string(&c).unwrap());
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("https://sr.example:8081/base"), "{shown}");
}

#[test]
fn kafka_log_and_lookups_build() {
    let text = DEMO
        .replace("  embedded: { path: .syncbridge/demo }", "  kafka: { brokers: \"k1:9092, k2:9092\", schema_registry: http://sr:8081 }")
        .replace(
            "      title: Title\n",
            "      title: Title\n      parent_id: { field: Parent, type: lookup, list: demo tasks archive }\n      created_at: { field: Created, direction: pull_only }\n      flag: { field: Flag, type: boolean, conflict: last_writer_wins }\n",
        );
    let c = load(&text, &no_env);
    let LogConfig::Kafka {
        brokers,
        topic_prefix,
        schema_registry,
    } = &c.log
    else {
        panic!("{:?}", c.log)
    };
    assert_eq!(brokers, &["k1:9092", "k2:9092"]);
    assert_eq!(topic_prefix, config::DEFAULT_TOPIC_PREFIX);
    assert_eq!(
        schema_registry.as_ref().map(|r| r.url.as_str()),
        Some("http://sr:8081/")
    );
    assert!(schema_registry.as_ref().unwrap().password.is_none());
    let e = &c.sync[0];
    let parent = e.fields.iter().find(|f| f.column == "parent_id").unwrap();
    assert_eq!(parent.lookup_list.as_deref(), Some("demo tasks archive"));
    let flag = e.fields.iter().find(|f| f.column == "flag").unwrap();
    assert_eq!(flag.conflict_policy(e), ConflictPolicy::LastWriterWins);
    assert_eq!(e.fields[0].conflict_policy(e), ConflictPolicy::SourceWins);
    // Default log when `log` is omitted.
    let text = DEMO.replace("log:\n  embedded: { path: .syncbridge/demo }\n", "");
    assert_eq!(
        load(&text, &no_env).log,
        LogConfig::Embedded {
            path: ".syncbridge/demo".into()
        }
    );
}

#[test]
fn report_is_an_error_with_one_line_per_problem() {
    let r: ConfigReport = config::load_str("x.yaml", "version: 1\nfoo: [\n", &no_env).unwrap_err();
    let as_error: &dyn std::error::Error = &r;
    let text = as_error.to_string();
    assert!(text.starts_with("x.yaml:"), "{text}");
    assert_eq!(text.lines().count(), r.problems.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Garbage never panics and always yields problems with real locations.
    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,200}") {
        if let Err(r) = config::load_str("p.yaml", &text, &no_env) {
            prop_assert!(!r.problems.is_empty());
            prop_assert!(r.problems.iter().all(|p| p.line >= 1 && p.col >= 1));
        }
    }

    /// YAML-ish garbage built from the tokens that matter never panics.
    #[test]
    fn yaml_token_soup_never_panics(tokens in prop::collection::vec(prop::sample::select(vec![
        "version: 1\n", "name: x\n", "sync:\n", "  - ", "table: a.b\n", "fields:", " {", "}", "[", "]",
        "\n    ", ": ", "&a ", "*a", "!!str ", "${X}", "${", "$$", "'", "\"", "when: \"a ==\"\n", "- ", "#",
        "list: L\n", "type: lookup\n", "choices: []\n", "---\n", "? ", "|\n  x\n", "\t", "\u{feff}", "é",
    ]), 0..40)) {
        let text: String = tokens.concat();
        let _ = config::load_str("p.yaml", &text, &no_env);
    }

    /// Deleting or replacing a byte range in a valid file never panics.
    #[test]
    fn mutated_demo_never_panics(start in 0usize..DEMO.len(), len in 0usize..40, insert in "(?s).{0,8}") {
        let mut text: Vec<char> = DEMO.chars().collect();
        let start = start.min(text.len());
        let end = (start + len).min(text.len());
        text.splice(start..end, insert.chars());
        let text: String = text.into_iter().collect();
        let _ = config::load_str("p.yaml", &text, &no_env);
    }

    /// Arbitrary `when` expressions either parse or are reported, never panic.
    #[test]
    fn arbitrary_when_never_panics(when in "[a-z0-9 =!<>&|()'\".,\\[\\]{}?:+*/%-]{0,40}") {
        let text = DEMO.replace("\"status == 'archived'\"", &format!("'{}'", when.replace('\'', "''")));
        let _ = config::load_str("p.yaml", &text, &no_env);
    }
}
