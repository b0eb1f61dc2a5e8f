//! Unit tests: the reader's key lists match the generated schema; hostile YAML; `pull.on_delete`.

use super::raw::*;
use super::*;

fn keys_of(schema: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    keys.sort();
    keys
}

#[test]
fn reader_keys_match_schema() {
    let schema = json_schema();
    assert_eq!(keys_of(&schema), sorted(PIPELINE_KEYS));
    let defs = schema["$defs"].as_object().expect("schema has $defs");
    let expected: &[(&str, &[&str])] = &[
        ("SourceFile", SOURCE_KEYS),
        ("LogFile", LOG_KEYS),
        ("EmbeddedFile", EMBEDDED_KEYS),
        ("KafkaFile", KAFKA_KEYS),
        ("GraphFile", GRAPH_KEYS),
        ("SyncFile", SYNC_KEYS),
        ("FieldSpecFile", FIELD_SPEC_KEYS),
        ("RouteFile", ROUTE_KEYS),
        ("PullFile", PULL_KEYS),
        ("ControlFile", CONTROL_KEYS),
        ("GuardFile", GUARD_KEYS),
        ("DeadLetterGuardFile", DEAD_LETTER_GUARD_KEYS),
        ("ScheduleFile", SCHEDULE_KEYS),
        ("NotifyFile", NOTIFY_KEYS),
        ("NotifyTargetFile", NOTIFY_TARGET_KEYS),
        ("DriftFile", DRIFT_KEYS),
        ("PollFile", POLL_KEYS),
        ("CursorFile", CURSOR_KEYS),
    ];
    for (name, keys) in expected {
        let def = defs
            .get(*name)
            .unwrap_or_else(|| panic!("no $defs/{name} in {:?}", defs.keys()));
        assert_eq!(keys_of(def), sorted(keys), "{name}");
        assert_eq!(
            def["additionalProperties"],
            serde_json::json!(false),
            "{name} rejects unknown keys"
        );
    }
}

fn all_problems(text: &str) -> Vec<String> {
    let report = load_str("t.yaml", text, &|_| None).unwrap_err();
    report.problems.iter().map(ToString::to_string).collect()
}

fn assert_reports(text: &str, expected: &str) {
    let got = all_problems(text);
    assert!(
        got.iter().any(|p| p == expected),
        "{expected:?} not in {got:#?}"
    );
}

#[test]
fn hostile_yaml_is_rejected_without_panic() {
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(
        all_problems(&deep),
        ["t.yaml:1:65: nesting deeper than 64 levels"]
    );
    let deeper = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert!(all_problems(&deeper)[0].contains("recursion limit exceeded"));
    // "Billion laughs": each level doubles the previous one.
    let mut bomb = String::from("a: &a0 [x, x]\n");
    for i in 1..40 {
        bomb.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}]\n", p = i - 1));
    }
    let got = all_problems(&bomb);
    assert!(got.len() == 1 && got[0].contains("too large"), "{got:?}");
    assert_reports(
        "version: 1\nversion: 1\n",
        "t.yaml:2:1: duplicate key `version` (first at 1:1)",
    );
    assert_reports(
        "version: !!int 1\n",
        "t.yaml:1:10: YAML tags are not supported in pipeline files",
    );
    assert_eq!(
        all_problems("a: 1\n---\nb: 2\n"),
        ["t.yaml:2:1: a pipeline file holds one YAML document; found a second one"]
    );
    assert_eq!(
        all_problems("- 1\n"),
        [
            "t.yaml:1:1: a pipeline file must be a mapping (version, name, source, graph, sync), found a sequence"
        ]
    );
}

/// A minimal valid pipeline whose one entry has `key: [id, tenant_id]` and `pull: { on_delete: <value> }`.
fn with_on_delete(value: &str) -> String {
    format!(
        "version: 1
name: t
source:
  url: postgres://u@h/db
graph:
  tenant: contoso.onmicrosoft.com
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: s
  site: contoso.sharepoint.com:/sites/ops
sync:
  - table: public.t
    list: T
    key: [id, tenant_id]
    fields:
      name: Title
    pull:
      on_delete: {value}
"
    )
}

fn on_delete_of(text: &str) -> OnDelete {
    let config = load_str("t.yaml", text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    config.sync[0].pull.on_delete.clone()
}

#[test]
fn on_delete_parses_each_spelling_and_defaults_to_delete() {
    assert_eq!(on_delete_of(&with_on_delete("delete")), OnDelete::Delete);
    assert_eq!(on_delete_of(&with_on_delete("ignore")), OnDelete::Ignore);
    let soft = OnDelete::Soft {
        column: "deleted_at".into(),
    };
    assert_eq!(on_delete_of(&with_on_delete("soft:deleted_at")), soft);
    assert_eq!(on_delete_of(&with_on_delete("\"soft:deleted_at\"")), soft);
    // 63 bytes is PostgreSQL's limit; `$` is allowed after the first character.
    let long = format!("soft:{}", "c".repeat(MAX_PG_IDENT_LEN));
    assert!(matches!(
        on_delete_of(&with_on_delete(&long)),
        OnDelete::Soft { .. }
    ));
    assert!(matches!(
        on_delete_of(&with_on_delete("soft:_del$1")),
        OnDelete::Soft { .. }
    ));
    // Omitted (and `pull:` omitted altogether): the default.
    let text = with_on_delete("delete").replace("    pull:\n      on_delete: delete\n", "");
    assert_eq!(on_delete_of(&text), DEFAULT_ON_DELETE);
    assert_eq!(DEFAULT_ON_DELETE, OnDelete::Delete);
    let text =
        with_on_delete("delete").replace("      on_delete: delete\n", "      enabled: true\n");
    assert_eq!(on_delete_of(&text), OnDelete::Delete);
    // Without `key`, any identifier will do (the primary key is checked against the database).
    let text = with_on_delete("soft:id").replace("    key: [id, tenant_id]\n", "");
    assert_eq!(
        on_delete_of(&text),
        OnDelete::Soft {
            column: "id".into()
        }
    );
    // Environment values are typed from the substituted text.
    let text = with_on_delete("${ON_DELETE}");
    let got = load_str("t.yaml", &text, &|_| Some("ignore".into())).unwrap();
    assert_eq!(got.sync[0].pull.on_delete, OnDelete::Ignore);
}

#[test]
fn on_delete_displays_and_serializes_as_its_yaml_spelling() {
    let soft = OnDelete::Soft {
        column: "deleted_at".into(),
    };
    assert_eq!(soft.to_string(), "soft:deleted_at");
    assert_eq!(OnDelete::Delete.to_string(), "delete");
    assert_eq!(OnDelete::Ignore.to_string(), "ignore");
    assert_eq!(serde_json::to_value(&soft).unwrap(), "soft:deleted_at");
    let config = load_str("t.yaml", &with_on_delete("soft:deleted_at"), &|_| None).unwrap();
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["sync"][0]["pull"]["on_delete"], "soft:deleted_at");
    assert_eq!(
        json["sync"][0]["pull"]["interval_ms"],
        DEFAULT_PULL_INTERVAL_MS
    );
}

#[test]
fn on_delete_problems_are_reported_at_the_value() {
    let p = "t.yaml:17:18: `sync[0].pull.on_delete`";
    for (value, message) in [
        (
            "purge",
            "unknown value `purge`; expected one of: delete, ignore, soft:<column>",
        ),
        (
            "Delete",
            "unknown value `Delete`; expected one of: delete, ignore, soft:<column>",
        ),
        (
            "soft",
            "unknown value `soft`; expected one of: delete, ignore, soft:<column>",
        ),
        (
            "\"soft:\"",
            "`soft:` needs a column, e.g. `soft:deleted_at`",
        ),
        (
            "soft:id",
            "soft-delete column `id` is a key column; the key identifies the row and cannot mark it deleted",
        ),
        (
            "soft:tenant_id",
            "soft-delete column `tenant_id` is a key column; the key identifies the row and cannot mark it deleted",
        ),
        (
            "\"soft:deleted at\"",
            "soft-delete column `deleted at` is not a column name (ASCII letters, digits, _, $, not starting with a digit or $; at most 63 bytes)",
        ),
        (
            "soft:1st",
            "soft-delete column `1st` is not a column name (ASCII letters, digits, _, $, not starting with a digit or $; at most 63 bytes)",
        ),
    ] {
        assert_eq!(
            all_problems(&with_on_delete(value)),
            [format!("{p}: {message}")],
            "{value}"
        );
    }
    // One byte over PostgreSQL's identifier limit.
    let long = format!("soft:{}", "c".repeat(MAX_PG_IDENT_LEN + 1));
    let got = all_problems(&with_on_delete(&long));
    assert!(
        got.len() == 1 && got[0].contains("is not a column name"),
        "{got:?}"
    );
    // Not a string at all.
    assert_eq!(
        all_problems(&with_on_delete("[delete]")),
        ["t.yaml:17:18: `sync[0].pull.on_delete`: expected a string, found a sequence"]
    );
    // A value from the environment is not echoed.
    let got = load_str("t.yaml", &with_on_delete("${X}"), &|_| Some("purge".into())).unwrap_err();
    assert_eq!(
        got.to_string(),
        "t.yaml:17:18: `sync[0].pull.on_delete`: unknown value a value from the environment; expected one of: delete, ignore, soft:<column>"
    );
    // Reported together with the entry's other problems.
    let text = with_on_delete("purge").replace("    key: [id, tenant_id]\n", "    key: [id, id]\n");
    assert_eq!(all_problems(&text).len(), 2);
}

#[test]
fn guard_defaults_parse_and_out_of_range_values_are_named() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.guard.dead_letters, DeadLetterGuard::default());
    let text = format!("{base}guard:\n  dead_letters:\n    consecutive: 5\n    window: 0\n");
    let config = load_str("t.yaml", &text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(
        config.guard.dead_letters,
        DeadLetterGuard {
            consecutive: 5,
            window: 0,
            max_percent: DEFAULT_DEAD_LETTER_PERCENT,
        }
    );
    let bad = format!("{base}guard:\n  dead_letters:\n    max_percent: 0\n    burst: 3\n");
    let got = all_problems(&bad);
    assert!(
        got.iter()
            .any(|p| p.ends_with("`guard.dead_letters.max_percent` must be between 1 and 100")),
        "{got:#?}"
    );
    assert!(got.iter().any(|p| p.contains("burst")), "{got:#?}");
}

#[test]
fn delete_guards_default_on_and_every_bad_value_is_named_at_once() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.guard.push, DeleteGuard::default());
    assert!(config.guard.push.enabled && config.guard.pull.enabled);
    let text = format!(
        "{base}guard:\n  push: {{ max_deletes: 50, max_percent: 5, min_deletes: 0, window_ms: 30000, hold_ms: 0 }}\n  pull: {{ enabled: false }}\n"
    );
    let config = load_str("t.yaml", &text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(
        config.guard.push,
        DeleteGuard {
            enabled: true,
            max_deletes: 50,
            max_percent: 5,
            min_deletes: 0,
            window_ms: 30_000,
            hold_ms: 0,
        }
    );
    assert!(!config.guard.pull.enabled);
    let bad = format!(
        "{base}guard:\n  push: {{ max_deletes: 0, max_percent: 101, window_ms: 10, hold: 5 }}\n"
    );
    let got = all_problems(&bad);
    for want in [
        "`guard.push.max_deletes` must be between 1 and 10000000",
        "`guard.push.max_percent` must be between 1 and 100",
        "`guard.push.window_ms` must be between 1000 and 86400000",
    ] {
        assert!(got.iter().any(|p| p.ends_with(want)), "{want}: {got:#?}");
    }
    assert!(got.iter().any(|p| p.contains("hold")), "{got:#?}");
}

#[test]
fn control_tokens_parse_from_env_and_are_never_shown() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert!(config.control.tokens.is_empty(), "no tokens by default");
    let text = format!(
        "{base}control:\n  tokens:\n    - {{ name: ops, token: '${{OPS}}', role: operate }}\n    - {{ name: dash, token: literal-read-token, role: read }}\n"
    );
    let env = |var: &str| (var == "OPS").then(|| "env-operate-token".to_string());
    let config = load_str("t.yaml", &text, &env).unwrap_or_else(|r| panic!("{r}"));
    let tokens = &config.control.tokens;
    assert_eq!(tokens.len(), 2);
    assert_eq!(
        (
            tokens[0].name.as_str(),
            tokens[0].token.expose(),
            tokens[0].role
        ),
        ("ops", "env-operate-token", ApiRole::Operate)
    );
    assert_eq!(
        (
            tokens[1].name.as_str(),
            tokens[1].token.expose(),
            tokens[1].role
        ),
        ("dash", "literal-read-token", ApiRole::Read)
    );
    let shown = format!(
        "{config:?}{}",
        serde_json::to_string(&config.control).unwrap()
    );
    for secret in ["env-operate-token", "literal-read-token"] {
        assert!(!shown.contains(secret), "{secret} shown in {shown}");
    }
    // An empty ${VAR} is named as such; the messages never carry a token.
    let env = |var: &str| (var == "OPS").then(String::new);
    let got = load_str("t.yaml", &text, &env).unwrap_err().to_string();
    assert!(
        got.contains("`control.tokens[0].token` must not be empty (its ${VAR} is empty)"),
        "{got}"
    );
    assert!(!got.contains("literal-read-token"), "{got}");
}

#[test]
fn labels_parse_into_a_map_and_name_the_application() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert!(config.labels.is_empty(), "no labels by default");
    assert_eq!(config.application(), None);
    let text = format!(
        "{base}labels:\n  application: ' billing '\n  team.owner: finance-ops\n  tier: 2\n  cost-center: ${{CC}}\n"
    );
    let env = |var: &str| (var == "CC").then(|| "cc-42".to_string());
    let config = load_str("t.yaml", &text, &env).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.application(), Some("billing"), "trimmed");
    let got: Vec<(&str, &str)> = config
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("application", "billing"),
            ("cost-center", "cc-42"),
            ("team.owner", "finance-ops"),
            ("tier", "2"),
        ]
    );
    let json = serde_json::to_value(&config).unwrap();
    assert_eq!(json["labels"]["application"], "billing");
    // 63 characters is the longest key; 256 the longest value.
    let key = format!("a{}", "b".repeat(MAX_LABEL_KEY_LEN - 1));
    let value = "v".repeat(MAX_LABEL_VALUE_LEN);
    let text = format!("{base}labels:\n  {key}: {value}\n");
    let config = load_str("t.yaml", &text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.labels[&key], value);
}

#[test]
fn label_problems_name_the_key_and_are_all_reported() {
    let base = with_on_delete("delete");
    let line = base.lines().count() + 2;
    let text = format!(
        "{base}labels:\n  Application: x\n  1tier: x\n  'has space': x\n  {long_key}: x\n  empty: ''\n  long: {long}\n  nested: {{ a: b }}\n  ok: fine\n  ok: again\n",
        long_key = "k".repeat(MAX_LABEL_KEY_LEN + 1),
        long = "v".repeat(MAX_LABEL_VALUE_LEN + 1),
    );
    let got = all_problems(&text);
    let key_rule =
        "must start with a lower-case letter and hold only a-z 0-9 _ . - (at most 63 characters)";
    let expected = [
        format!("t.yaml:{line}:3: `labels`: key `Application` {key_rule}"),
        format!("t.yaml:{}:3: `labels`: key `1tier` {key_rule}", line + 1),
        format!(
            "t.yaml:{}:3: `labels`: key `has space` {key_rule}",
            line + 2
        ),
        format!(
            "t.yaml:{}:3: `labels`: key `kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk…` {key_rule}",
            line + 3
        ),
        format!("t.yaml:{}:10: `labels.empty` must not be empty", line + 4),
        format!(
            "t.yaml:{}:9: `labels.long` is longer than 256 characters",
            line + 5
        ),
        format!(
            "t.yaml:{}:11: `labels.nested`: expected a string, found a mapping",
            line + 6
        ),
        format!(
            "t.yaml:{}:3: duplicate key `ok` in `labels` (first at {}:3)",
            line + 8,
            line + 7
        ),
    ];
    assert_eq!(got, expected);
    assert_reports(
        &format!("{base}labels: [a, b]\n"),
        &format!(
            "t.yaml:{}:9: `labels`: expected a mapping of key: value, found a sequence",
            line - 1
        ),
    );
    // A value from the environment is checked too, and never echoed.
    let text = format!("{base}labels:\n  application: ${{APP}}\n");
    let got = load_str("t.yaml", &text, &|_| Some("a\nb".into()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        got,
        format!(
            "t.yaml:{line}:16: `labels.application` must be one line without control characters"
        )
    );
}

#[test]
fn pg_urls_name_their_database_and_server_without_credentials() {
    let cases = [
        (
            "postgres://u:pw@db.internal:6432/shop",
            "shop",
            "db.internal",
            6432,
        ),
        (
            "postgresql://u@h/my%20db?sslmode=require",
            "my db",
            "h",
            5432,
        ),
        (
            "postgres://u@h/ignored?dbname=real&host=other&port=7000",
            "real",
            "other",
            7000,
        ),
        ("postgres://alice:pw@h", "alice", "h", 5432),
        (
            "postgres:///db?host=/run/postgresql",
            "db",
            "/run/postgresql",
            5432,
        ),
        ("postgres://[::1]:5433/v6", "v6", "[::1]", 5433),
    ];
    for (text, db, host, port) in cases {
        let url = PgUrl::parse(text).unwrap();
        assert_eq!(url.database(), db, "{text}");
        assert_eq!(url.server(), (host.to_string(), port), "{text}");
    }
    let bare = PgUrl::parse("postgres:///x").unwrap();
    assert_eq!(
        bare.server(),
        (DEFAULT_PG_HOST.to_string(), DEFAULT_PG_PORT)
    );
}

#[test]
fn audit_retention_defaults_to_30_days_parses_units_and_names_bad_values() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.control.audit_retention, DEFAULT_AUDIT_RETENTION);
    assert_eq!(
        serde_json::to_value(&config).unwrap()["control"]["audit_retention"],
        "30d"
    );
    for (text, secs) in [
        ("7d", 7 * 86_400),
        ("36h", 36 * 3_600),
        ("90m", 5_400),
        ("3600s", 3_600),
    ] {
        let yaml = format!("{base}control:\n  audit_retention: {text}\n");
        let config = load_str("t.yaml", &yaml, &|_| None).unwrap_or_else(|r| panic!("{r}"));
        assert_eq!(config.control.audit_retention.as_secs(), secs, "{text}");
    }
    assert_eq!(
        format_duration(std::time::Duration::from_secs(5_400)),
        "90m"
    );
    for (bad, says) in [
        ("30 days", "must be a whole number with a unit"),
        ("d", "must be a whole number with a unit"),
        ("-1d", "must be a whole number with a unit"),
        ("59m", "must be at least 1h"),
    ] {
        let yaml = format!("{base}control:\n  audit_retention: {bad}\n");
        let got = all_problems(&yaml);
        assert!(
            got.len() == 1 && got[0].contains("`control.audit_retention`") && got[0].contains(says),
            "{bad}: {got:#?}"
        );
    }
}

#[test]
fn graph_signs_in_with_exactly_one_of_a_secret_and_a_certificate() {
    let base = with_on_delete("delete");
    let cert = "  client_certificate:\n    cert: /etc/sb/app.pem\n    key: ${APP_KEY}\n";
    // A certificate instead of the secret: paths kept, the key (here PEM text) redacted.
    let text = base.replace("  client_secret: s\n", cert);
    let env = |v: &str| (v == "APP_KEY").then(|| "-----BEGIN PRIVATE KEY-----\nabc".to_string());
    let c = load_str("t.yaml", &text, &env).unwrap_or_else(|r| panic!("{r}"));
    match &c.graph.credential {
        GraphCredential::ClientCertificate { cert, key } => {
            assert_eq!(cert, &PathBuf::from("/etc/sb/app.pem"));
            assert!(key.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        }
        other => panic!("{other:?}"),
    }
    assert!(c.graph.client_secret().is_none());
    let view = serde_json::to_string(&c).unwrap();
    assert!(
        view.contains("/etc/sb/app.pem") && !view.contains("PRIVATE"),
        "{view}"
    );
    // Both, or neither: one problem each, at the right place.
    let both = base.replace(
        "  client_secret: s\n",
        &format!(
            "  client_secret: s\n{}",
            cert.replace("${APP_KEY}", "/etc/sb/app.key")
        ),
    );
    let got = all_problems(&both);
    assert_eq!(
        got,
        [
            "t.yaml:10:5: `graph.client_secret` and `graph.client_certificate` exclude each other: keep one"
        ],
        "{got:#?}"
    );
    let neither = base.replace("  client_secret: s\n", "");
    let got = all_problems(&neither);
    assert!(
        got.len() == 1
            && got[0].contains("missing `client_secret` or `client_certificate` in `graph`"),
        "{got:#?}"
    );
    // A certificate without its key, and an empty cert path.
    let partial = base.replace(
        "  client_secret: s\n",
        "  client_certificate: { cert: '' }\n",
    );
    let got = all_problems(&partial);
    assert!(
        got.iter()
            .any(|p| p.contains("missing required key `key` in `graph.client_certificate`")),
        "{got:#?}"
    );
}

/// A pushed hyperlink is written through SharePoint REST, which refuses a client secret's
/// app-only token: the file is refused at the secret, naming the field and the reason, unless
/// the field is pull-only, a certificate signs in, or `graph.hyperlinks: graph`.
#[test]
fn a_pushed_hyperlink_needs_a_certificate_and_sharepoint_url_is_checked() {
    let base = with_on_delete("delete").replace(
        "      name: Title\n",
        "      name: Title\n      home: { field: Home, type: hyperlink }\n",
    );
    let got = all_problems(&base);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with(
            "t.yaml:8:18: hyperlink field `Home` of public.t is written through SharePoint REST"
        ) && got[0].contains("Unsupported app only token")
            && got[0].contains("use `graph.client_certificate`"),
        "{got:#?}"
    );
    let cert = "  client_certificate:\n    cert: /etc/sb/app.pem\n    key: /etc/sb/app.key\n";
    let ok = |text: &str| load_str("t.yaml", text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    let c = ok(&base.replace("  client_secret: s\n", cert));
    assert_eq!(c.graph.hyperlinks, HyperlinkWrites::SharepointRest);
    assert_eq!(c.graph.sharepoint_url, None);
    ok(&base.replace("type: hyperlink", "type: hyperlink, direction: pull_only"));
    let via_graph = ok(&base.replace(
        "  site: contoso.sharepoint.com:/sites/ops\n",
        "  site: contoso.sharepoint.com:/sites/ops\n  hyperlinks: graph\n  sharepoint_url: http://127.0.0.1:8919\n",
    ));
    assert_eq!(via_graph.graph.hyperlinks, HyperlinkWrites::Graph);
    assert_eq!(
        via_graph.graph.sharepoint_url.map(|u| u.to_string()),
        Some("http://127.0.0.1:8919/".to_string())
    );
    let bad = base.replace(
        "  site: contoso.sharepoint.com:/sites/ops\n",
        "  site: contoso.sharepoint.com:/sites/ops\n  hyperlinks: rest\n  sharepoint_url: nope\n",
    );
    let got = all_problems(&bad).join("\n");
    assert!(got.contains("graph.sharepoint_url"), "{got}");
    assert!(got.contains("`graph.hyperlinks`: unknown value"), "{got}");
}

#[test]
fn schedules_are_read_and_every_problem_is_placed() {
    let base = with_on_delete("delete");
    let good = format!(
        "{base}schedules:
  - name: nightly
    cron: \"0 2 * * *\"
    time_zone: Europe/Berlin
    job: resnapshot
    catch_up: true
  - name: replay
    cron: \"*/5 * * * * *\"
    job: dlq_replay
"
    );
    let config = load_str("t.yaml", &good, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    let s = &config.schedules;
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].job, s[0].time_zone, s[0].catch_up),
        (JobKind::Resnapshot, chrono_tz::Europe::Berlin, true)
    );
    // `resnapshot` defaults to every synced table; the other jobs take none.
    assert_eq!(s[0].tables, ["public.t"]);
    assert_eq!((s[1].time_zone, s[1].catch_up), (chrono_tz::UTC, false));
    assert!(s[1].tables.is_empty());

    let bad = format!(
        "{base}schedules:
  - name: a
    cron: \"61 * * * *\"
    time_zone: Mars/Olympus
    job: resnapshot
    tables: [public.nope]
  - name: a
    cron: \"* * * * *\"
    job: dlq_replay
    tables: [public.t]
  - name: b
    cron: \"* * * * *\"
    job: defrag
"
    );
    let got = all_problems(&bad);
    let expected = [
        "t.yaml:20:11: `schedules[0].cron` is not a cron expression: ",
        "t.yaml:21:16: `schedules[0].time_zone` must be an IANA time zone such as Europe/Berlin or UTC",
        "t.yaml:23:14: `schedules[0].tables`: `public.nope` is not a synced table",
        "t.yaml:24:11: schedule `a` is defined twice (first at 19:11)",
        "t.yaml:27:13: `schedules[1].tables` is only for `job: resnapshot`",
        "t.yaml:30:10: `schedules[2].job`: unknown value `defrag`; expected one of: drift_check, drift_heal, resnapshot, dlq_replay",
    ];
    for e in expected {
        assert!(
            got.iter().any(|p| p.starts_with(e)),
            "{e:?} not in {got:#?}"
        );
    }
    assert_eq!(got.len(), expected.len(), "{got:#?}");
}

#[test]
fn notify_targets_are_checked_without_echoing_urls() {
    let base = with_on_delete("delete");
    let good = format!(
        "{base}notify:
  window_s: 60
  targets:
    - name: ops
      kind: webhook
      url: http://127.0.0.1:9/hook
      secret: k
    - name: teams
      kind: teams
      url: https://example.webhook.office.com/x
"
    );
    let config = load_str("t.yaml", &good, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    let n = config.notify.unwrap();
    assert_eq!(n.window, std::time::Duration::from_secs(60));
    assert_eq!(n.dead_letters, DEFAULT_NOTIFY_DEAD_LETTERS);
    assert_eq!(n.drift_threshold, DEFAULT_NOTIFY_DRIFT_THRESHOLD);
    assert_eq!(n.targets[1].kind, NotifyKind::Teams);
    let five = good.replace("  window_s: 60\n", "  window_s: 60\n  drift_threshold: 5\n");
    let config = load_str("t.yaml", &five, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.notify.unwrap().drift_threshold, 5);

    let bad = format!(
        "{base}notify:
  window_s: 1
  targets:
    - name: a
      kind: webhook
      url: http://hooks.example.com/?token=sekrit
    - name: a
      kind: slack
      url: https://hooks.example.com/x
      secret: k
"
    );
    let got = all_problems(&bad);
    let expected = [
        "t.yaml:19:13: `notify.window_s` must be at least 10",
        "t.yaml:23:12: `notify.targets[0].url` must be an https:// URL (http:// only on a loopback host)",
        "t.yaml:22:13: `notify.targets[0]`: a webhook needs `secret`",
        "t.yaml:24:13: notify target `a` is defined twice (first at 21:13)",
        "t.yaml:27:15: `notify.targets[1].secret` is only for `kind: webhook`",
    ];
    for e in expected {
        assert!(
            got.iter().any(|p| p.starts_with(e)),
            "{e:?} not in {got:#?}"
        );
    }
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    assert!(!got.iter().any(|p| p.contains("sekrit")), "{got:#?}");
}

#[test]
fn email_targets_need_an_smtp_url_and_addresses() {
    let base = with_on_delete("delete");
    let good = format!(
        "{base}notify:
  targets:
    - name: mail
      kind: email
      url: smtp://user:p%40ss@smtp.example.com:587
      from: SyncBridge <sb@example.com>
      to: [ops@example.com]
"
    );
    let config = load_str("t.yaml", &good, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    let t = &config.notify.unwrap().targets[0];
    assert_eq!((t.kind, t.to.len()), (NotifyKind::Email, 1));
    let bad = format!(
        "{base}notify:
  targets:
    - name: mail
      kind: email
      url: https://user:sekrit@smtp.example.com
      from: not an address
    - name: hook
      kind: slack
      url: https://hooks.example.com/x
      to: [ops@example.com]
"
    );
    let got = all_problems(&bad);
    for e in [
        "`notify.targets[0].url` must be an smtp:// (STARTTLS) or smtps:// URL with a host",
        "`notify.targets[0].from` is not an email address",
        "`notify.targets[0]`: an email target needs `from` and at least one `to`",
        "`notify.targets[1].to` is only for `kind: email`",
    ] {
        assert!(got.iter().any(|p| p.ends_with(e)), "{e:?} not in {got:#?}");
    }
    assert_eq!(got.len(), 4, "{got:#?}");
    assert!(!got.iter().any(|p| p.contains("sekrit")), "{got:#?}");
}

#[test]
fn drift_budget_share_is_above_0_and_at_most_1() {
    let base = with_on_delete("delete");
    let config = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.drift.budget_share, DEFAULT_BUDGET_SHARE);
    let quarter = format!("{base}drift:\n  budget_share: 0.25\n");
    let config = load_str("t.yaml", &quarter, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.drift.budget_share, 0.25);
    let whole = format!("{base}drift:\n  budget_share: 1\n");
    let config = load_str("t.yaml", &whole, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.drift.budget_share, 1.0);
    for (value, problem) in [
        (
            "0",
            "t.yaml:19:17: `drift.budget_share` must be above 0 and at most 1 (a share of `graph.ru_per_minute`), found 0",
        ),
        (
            "1.5",
            "t.yaml:19:17: `drift.budget_share` must be above 0 and at most 1 (a share of `graph.ru_per_minute`), found 1.5",
        ),
        (
            "half",
            "t.yaml:19:17: `drift.budget_share`: expected a number, found `half`",
        ),
    ] {
        assert_eq!(
            all_problems(&format!("{base}drift:\n  budget_share: {value}\n")),
            [problem],
            "{value}"
        );
    }
    assert_reports(
        &format!("{base}drift:\n  share: 0.5\n"),
        "t.yaml:19:3: unknown key `share` in `drift`; expected one of: budget_share",
    );
}

/// [`with_on_delete`]'s pipeline with its `source:` mapping replaced by `source` (indented).
fn with_source(source: &str) -> String {
    with_on_delete("delete").replace("source:\n  url: postgres://u@h/db\n", source)
}

#[test]
fn source_urls_list_the_primary_first_then_its_standbys() {
    let text = with_source(
        "source:\n  urls:\n    - postgres://u:pw@db1/app?sslmode=disable\n    - postgres://u:pw@db2:5433/app?sslmode=disable\n",
    );
    let config = load_str("t.yaml", &text, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(config.source.url.server(), ("db1".to_string(), 5432));
    let standbys: Vec<_> = config.source.standbys.iter().map(PgUrl::server).collect();
    assert_eq!(standbys, [("db2".to_string(), 5433)]);
    assert_eq!(config.source.instances().count(), 2);
    // Passwords stay out of what is shown.
    let shown = serde_json::to_string(&config.source).unwrap();
    assert!(!shown.contains("pw"), "{shown}");
    // `url` alone: one instance, no standbys.
    let one = load_str("t.yaml", &with_on_delete("delete"), &|_| None).unwrap();
    assert!(one.source.standbys.is_empty());
}

#[test]
fn source_url_problems_are_all_reported_at_their_place() {
    assert_eq!(
        all_problems(&with_source(
            "source:\n  urls:\n    - postgres://u@db1/app\n    - http://db2/app\n    - postgres://u@db1:5432/other\n    - postgres://u@db3/app?sslmode=bogus\n"
        )),
        [
            "t.yaml:6:7: `source.urls[1]` must be a postgres:// or postgresql:// URL",
            "t.yaml:7:7: `source.urls[2]` names the same server as `source.urls[0]`",
            "t.yaml:8:7: `source.urls[3]`: sslmode=\"bogus\" is not one of disable, allow, prefer, require, verify-ca, verify-full",
        ]
    );
    assert_eq!(
        all_problems(&with_source(
            "source:\n  url: postgres://u@db1/app\n  urls: [postgres://u@db2/app]\n"
        )),
        [
            "t.yaml:4:3: `source` needs exactly one of `url` (one instance) and `urls` (primary first, then standbys)"
        ]
    );
    assert_eq!(
        all_problems(&with_source("source:\n  urls: []\n")),
        ["t.yaml:4:3: `source.urls` is empty: list the primary first"]
    );
    assert_eq!(
        all_problems(&with_source("source: {}\n")),
        [
            "t.yaml:3:9: `source` needs exactly one of `url` (one instance) and `urls` (primary first, then standbys)"
        ]
    );
}

#[test]
fn graph_names_its_site_or_its_team_exactly_once() {
    let base = with_on_delete("delete");
    let site = "  site: contoso.sharepoint.com:/sites/ops\n";
    let team = base.replace(site, "  team: \" Engineering \"\n");
    let c = load_str("t.yaml", &team, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(c.graph.site, SiteRef::Team("Engineering".into()));
    // Shown under the file's key.
    let view = serde_json::to_value(&c.graph).unwrap();
    assert_eq!(view["team"], "Engineering");
    assert!(view.get("site").is_none(), "{view}");
    let c = load_str("t.yaml", &base, &|_| None).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(
        c.graph.site,
        SiteRef::Site("contoso.sharepoint.com:/sites/ops".into())
    );
    // Both, neither, or an empty team: one problem each, at the line that has it.
    let both = base.replace(site, &format!("{site}  team: Engineering\n"));
    assert_eq!(
        all_problems(&both),
        ["t.yaml:10:9: `graph.site` and `graph.team` exclude each other: keep one"]
    );
    let neither = all_problems(&base.replace(site, ""));
    assert!(
        neither.len() == 1 && neither[0].contains("missing `site` or `team` in `graph`"),
        "{neither:#?}"
    );
    assert_eq!(
        all_problems(&base.replace(site, "  team: ''\n")),
        ["t.yaml:9:9: `graph.team` is empty: give the Team's name or group id"]
    );
}

/// [`with_on_delete`]'s pipeline with its entry's `table`, `key` and `pull` replaced by `entry`
/// (lines indented 4) and the list named `Project Overview`.
fn with_entry(entry: &str) -> String {
    let base = with_on_delete("delete");
    let (head, _) = base.split_once("  - table:").unwrap();
    format!("{head}  - list: Project Overview\n    fields:\n      name: Title\n{entry}")
}

#[test]
fn query_sources_parse_both_modes_and_are_push_only() {
    let full = load_str(
        "t.yaml",
        &with_entry("    query: SELECT * FROM v_projects;\n    key: [id]\n    poll: { every: 2s, full: true }\n"),
        &|_| None,
    )
    .unwrap_or_else(|r| panic!("{r}"));
    let e = &full.sync[0];
    assert_eq!(e.table.to_string(), "query.project_overview");
    assert!(!e.pull.enabled, "a query source does not pull by default");
    let q = e.query.as_ref().unwrap();
    assert_eq!(q.sql, "SELECT * FROM v_projects");
    assert_eq!(q.every, std::time::Duration::from_secs(2));
    assert!(q.cursor.is_none());

    let cursor = load_str(
        "t.yaml",
        &with_entry("    query: SELECT * FROM v\n    key: [id]\n    poll:\n      every: 5s\n      full_every: 1h\n      cursor: { column: changed_at, kind: timestamp, lookback: 30s }\n"),
        &|_| None,
    )
    .unwrap_or_else(|r| panic!("{r}"));
    let q = cursor.sync[0].query.as_ref().unwrap();
    let c = q.cursor.as_ref().unwrap();
    assert_eq!(
        (c.column.as_str(), c.kind),
        ("changed_at", CursorKind::Timestamp)
    );
    assert_eq!(c.lookback, std::time::Duration::from_secs(30));
    assert_eq!(q.full_every, Some(std::time::Duration::from_secs(3600)));
}

#[test]
fn query_source_problems_are_all_reported_at_their_place() {
    // table and query together; pull on a query; no key; neither full nor cursor; bad duration.
    let got = all_problems(&with_entry(
        "    table: public.p\n    query: SELECT 1\n    pull: { enabled: true }\n    poll: { every: soon }\n",
    ));
    let want = ["t.yaml:15:12: `sync[0].table` and `sync[0].query` exclude each other: keep one"];
    for w in want {
        assert!(got.iter().any(|p| p == w), "{w:?} not in {got:#?}");
    }
    let got = all_problems(&with_entry(
        "    query: SELECT 1 AS id\n    pull: { enabled: true }\n    poll: { every: soon }\n",
    ));
    let expect = [
        "t.yaml:14:12: `sync[0].key` is required with `query`: the columns that identify a row",
        "t.yaml:16:20: `sync[0].poll.every` must be a duration like 2s, 5m, 1h or 1d (more than 0)",
        "t.yaml:16:11: `sync[0].poll` needs `full: true` or a `cursor`",
    ];
    for w in expect {
        assert!(got.iter().any(|p| p == w), "{w:?} not in {got:#?}");
    }
    assert!(
        got.iter()
            .any(|p| p.starts_with("t.yaml:15:22: `sync[0].pull`: a query source is push-only")),
        "{got:#?}"
    );
    let got = all_problems(&with_entry(
        "    query: DELETE FROM x\n    key: [id]\n    poll: { every: 2s, full: true, cursor: { column: n, kind: incrementing, lookback: 5s } }\n",
    ));
    for w in [
        "t.yaml:14:12: `sync[0].query` must be a SELECT (or WITH … SELECT)",
        "t.yaml:16:11: `sync[0].poll`: `full: true` and `cursor` exclude each other (a cursor's full reads are `full_every`)",
    ] {
        assert!(got.iter().any(|p| p == w), "{w:?} not in {got:#?}");
    }
    assert!(
        got.iter()
            .any(|p| p.contains("`sync[0].poll.cursor.lookback` is for `kind: timestamp`")),
        "{got:#?}"
    );
    // The schema of query sources' names is not a table's.
    assert!(
        all_problems(&with_entry("    table: query.x\n"))
            .iter()
            .any(|p| p.contains("schema `query` is reserved")),
    );
    // Neither table nor query.
    assert!(
        all_problems(&with_entry(""))
            .iter()
            .any(|p| p.ends_with("missing `table` or `query` in `sync[0]` (give one)"))
    );
}
