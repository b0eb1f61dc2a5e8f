//! Unit tests: the reader's key lists match the generated schema.

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
