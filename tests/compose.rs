//! No Docker engine runs in CI. `ops/check-ops` validates `docker-compose.yml` with the real
//! Compose implementation (`docker compose config --quiet`); this checks what that cannot see: the
//! services we promise exist, every file it mounts or builds from is in the repo, ports stay on
//! loopback and off PostgreSQL's default port, each service has a healthcheck and a restart policy,
//! state lives on the volumes (the emulator's data dir is owned by the image's user, Kafka's log
//! dir is its volume), commands of our image are real subcommands, the pipeline it runs validates
//! with the environment compose gives it, and every metric the alert rules and the Grafana
//! dashboard query is one the code emits.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");

fn compose() -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    serde_saphyr::from_str(&text).expect("docker-compose.yml parses as YAML")
}

fn services(c: &Value) -> &serde_json::Map<String, Value> {
    c["services"].as_object().expect("services is a map")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn promised_services_exist_with_images_and_healthchecks() {
    let c = compose();
    let names: BTreeSet<&str> = services(&c).keys().map(String::as_str).collect();
    for want in [
        "postgres",
        "kafka",
        "syncbridge",
        "graph-emulator",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "service {want} missing: {names:?}");
    }
    for (name, s) in services(&c) {
        assert!(s["image"].is_string(), "{name}: no image");
        assert!(
            s["healthcheck"]["test"].is_array(),
            "{name}: no healthcheck"
        );
    }
    let kafka_image = services(&c)["kafka"]["image"].as_str().unwrap();
    assert!(kafka_image.starts_with("apache/kafka:"), "{kafka_image}");
}

#[test]
fn postgres_has_logical_replication_and_a_recent_major() {
    let c = compose();
    let pg = &services(&c)["postgres"];
    let image = pg["image"].as_str().unwrap();
    let major: u32 = image
        .split(':')
        .nth(1)
        .and_then(|t| t.split(['.', '-']).next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("postgres image needs a numeric tag: {image}"));
    assert!(major >= 16, "{image}");
    let cmd = strings(&pg["command"]).join(" ");
    assert!(cmd.contains("wal_level=logical"), "{cmd}");
}

#[test]
fn every_port_is_bound_to_loopback() {
    let c = compose();
    for (name, s) in services(&c) {
        for p in strings(&s["ports"]) {
            assert!(
                p.starts_with("127.0.0.1:"),
                "{name}: port {p} is not loopback-only"
            );
        }
    }
}

#[test]
fn mounted_and_built_files_exist_and_named_volumes_are_declared() {
    let c = compose();
    let declared: BTreeSet<String> = c["volumes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    for (name, s) in services(&c) {
        for v in strings(&s["volumes"]) {
            let host = v.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    Path::new(ROOT).join(host).exists(),
                    "{name}: mounts {host}, missing from the repo"
                );
            } else {
                assert!(
                    declared.contains(host),
                    "{name}: volume {host} not declared"
                );
            }
        }
        if let Some(build) = s.get("build") {
            let ctx = build["context"].as_str().unwrap();
            let file = build["dockerfile"].as_str().unwrap();
            let dockerfile = Path::new(ROOT).join(ctx).join(file);
            assert!(dockerfile.exists(), "{name}: {file} missing");
            // Every COPY source of the build stage must exist in the context.
            let text = std::fs::read_to_string(&dockerfile).unwrap();
            for line in text
                .lines()
                .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
            {
                let parts: Vec<&str> = line.split_whitespace().collect();
                for src in &parts[1..parts.len() - 1] {
                    assert!(
                        Path::new(ROOT).join(ctx).join(src).exists(),
                        "{file}: COPY source {src} missing"
                    );
                }
            }
        }
    }
}

#[test]
fn our_image_runs_real_subcommands_and_the_pipeline_validates() {
    let c = compose();
    for (name, s) in services(&c) {
        if s["image"].as_str() != Some("syncbridge:local") {
            continue;
        }
        let cmd = strings(&s["command"]);
        let sub = &cmd[0];
        let help = Command::new(BIN)
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(
            help.status.success(),
            "{name}: `syncbridge {sub}` is not a subcommand"
        );
        if sub == "run" {
            // Resolve the in-container path through the service's bind mounts.
            let file = &cmd[1];
            let mounts = strings(&s["volumes"]);
            let host = mounts
                .iter()
                .find_map(|m| {
                    let mut it = m.split(':');
                    let (h, c) = (it.next()?, it.next()?);
                    file.strip_prefix(c).map(|rest| format!("{h}{rest}"))
                })
                .unwrap_or_else(|| panic!("{name}: {file} is not under a bind mount"));
            let mut validate = Command::new(BIN);
            validate.current_dir(ROOT).args(["validate", &host]);
            for (k, v) in s["environment"].as_object().unwrap() {
                validate.env(k, v.as_str().unwrap());
            }
            let out = validate.output().unwrap();
            assert!(
                out.status.success(),
                "{name}: {host} does not validate:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn prometheus_scrapes_the_service_on_its_control_port() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ops/prometheus.yml")).unwrap();
    let prom: Value = serde_saphyr::from_str(&text).unwrap();
    let targets = strings(&prom["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, vec!["syncbridge:8088".to_string()]);
    let c = compose();
    let listen = services(&c)["syncbridge"]["environment"]["SYNCBRIDGE_CONTROL_LISTEN"]
        .as_str()
        .unwrap();
    assert!(listen.ends_with(":8088"), "{listen}");
}

fn dockerfile() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("ops/Dockerfile")).unwrap()
}

#[test]
fn every_service_restarts_and_no_port_clashes_with_a_local_postgres() {
    let c = compose();
    for (name, s) in services(&c) {
        assert_eq!(
            s["restart"].as_str(),
            Some("unless-stopped"),
            "{name}: no restart policy"
        );
        assert!(
            s["healthcheck"]["start_period"].is_string(),
            "{name}: healthcheck without start_period"
        );
        for p in strings(&s["ports"]) {
            let host_port = p.split(':').nth(1).unwrap();
            assert_ne!(
                host_port, "5432",
                "{name}: {p} clashes with a local PostgreSQL"
            );
        }
        let image = s["image"].as_str().unwrap();
        if image != "syncbridge:local" {
            let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
            assert!(
                tag.contains('.') && tag != "latest",
                "{name}: image {image} is not pinned to a release"
            );
        }
    }
}

#[test]
fn the_emulator_data_dir_is_created_for_the_image_user() {
    let c = compose();
    let emu = &services(&c)["graph-emulator"];
    let cmd = strings(&emu["command"]);
    let at = cmd.iter().position(|a| a == "--data").expect("--data");
    let data = &cmd[at + 1];
    assert!(
        strings(&emu["volumes"])
            .iter()
            .any(|v| v.split(':').nth(1) == Some(data.as_str()) && !v.starts_with("./")),
        "{data} is not on a named volume"
    );
    // The final stage: a named volume copies the ownership of the path it mounts over, so the
    // path must exist in the image owned by the user the image runs as.
    let text = dockerfile();
    let last = text.rsplit("\nFROM ").next().unwrap();
    let user = last
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image runs as a non-root USER")
        .trim();
    assert_ne!(user, "root");
    let owned = last.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w == ["install", "-d"])
            && words.windows(2).any(|w| w == ["-o", user])
            && words.contains(&data.as_str())
    });
    assert!(
        owned,
        "ops/Dockerfile does not create {data} owned by {user}"
    );
}

#[test]
fn kafka_keeps_its_log_dir_on_its_volume() {
    let c = compose();
    let kafka = &services(&c)["kafka"];
    let dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
        .as_str()
        .expect("KAFKA_LOG_DIRS set (else the image writes under /tmp)");
    let mounts: Vec<String> = strings(&kafka["volumes"])
        .iter()
        .filter(|v| !v.starts_with("./"))
        .filter_map(|v| v.split(':').nth(1).map(str::to_string))
        .collect();
    for dir in dirs.split(',') {
        assert!(
            mounts
                .iter()
                .any(|m| dir == m || dir.starts_with(&format!("{m}/"))),
            "log dir {dir} is not on a volume: {mounts:?}"
        );
    }
    assert!(
        kafka["environment"]["CLUSTER_ID"].is_string(),
        "a fixed CLUSTER_ID keeps the formatted volume valid across recreations"
    );
}

#[test]
fn the_dockerfile_caches_dependencies_and_the_context_is_small() {
    let text = dockerfile();
    assert!(text.starts_with("# syntax=docker/dockerfile:1"));
    assert!(
        text.contains("--mount=type=cache") && text.contains("target=/usr/local/cargo/registry"),
        "cargo build without cache mounts"
    );
    let ignore =
        std::fs::read_to_string(Path::new(ROOT).join("ops/Dockerfile.dockerignore")).unwrap();
    let rules: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        rules.first(),
        Some(&"*"),
        "the context must exclude by default"
    );
    // Everything the Dockerfile copies from the context is let back in.
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            let want = src.trim_end_matches('/');
            assert!(
                rules
                    .iter()
                    .any(|r| r.trim_start_matches('!').trim_end_matches('/') == want),
                "ops/Dockerfile.dockerignore excludes {src}, which ops/Dockerfile copies"
            );
        }
    }
}

/// Every `syncbridge_*` metric name declared in src/telemetry/metrics.rs.
fn emitted_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("src/telemetry/metrics.rs")).unwrap();
    let names: BTreeSet<String> = text
        .lines()
        .filter(|l| l.contains("&str = \"") || l.trim_start().starts_with("\"syncbridge_"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("syncbridge_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() > 20, "metric list not found: {names:?}");
    names
}

/// Names of SyncBridge series an expression selects (histograms may add their suffixes).
fn metrics_in(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\bsyncbridge_[a-z0-9_]+").unwrap();
    re.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

fn assert_known(what: &str, expr: &str, known: &BTreeSet<String>) -> usize {
    let used = metrics_in(expr);
    for name in &used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| known.contains(*b))
            .unwrap_or(name);
        assert!(
            known.contains(base),
            "{what}: `{name}` is not a metric the code emits (src/telemetry/metrics.rs)\n{expr}"
        );
    }
    used.len()
}

#[test]
fn alert_rules_query_only_emitted_metrics_and_have_runbooks() {
    let known = emitted_metrics();
    let text = std::fs::read_to_string(Path::new(ROOT).join("ops/alerts.yml")).unwrap();
    let rules: Value = serde_saphyr::from_str(&text).unwrap();
    let runbook = std::fs::read_to_string(Path::new(ROOT).join("ops/METRICS.md")).unwrap();
    let mut n = 0;
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            let name = r["alert"].as_str().expect("only alerting rules");
            let expr = r["expr"].as_str().unwrap();
            // `up` is Prometheus's own series; everything else must be ours.
            if !expr.contains("up{job=\"syncbridge\"}") {
                assert!(assert_known(name, expr, &known) > 0, "{name}: no metric");
            }
            assert!(
                runbook.contains(&format!("`{name}`")),
                "{name}: no runbook line in ops/METRICS.md"
            );
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} alert rules");
}

#[test]
fn dashboard_panels_query_only_emitted_metrics() {
    let known = emitted_metrics();
    let dir = Path::new(ROOT).join("ops/grafana/dashboards");
    let mut panels = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let dash: Value = serde_json::from_str(&text).unwrap();
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            vars.iter().any(|v| v["name"] == "pipeline"),
            "{}: not templated by pipeline",
            path.display()
        );
        for v in &vars {
            if let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str()) {
                assert_known("template variable", q, &known);
            }
        }
        fn walk(v: &Value, known: &BTreeSet<String>, panels: &mut usize) {
            for p in v["panels"].as_array().into_iter().flatten() {
                walk(p, known, panels);
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                if p["type"] == "row" {
                    continue;
                }
                let title = p["title"].as_str().unwrap_or("?");
                assert!(!targets.is_empty(), "panel {title}: no query");
                for t in targets {
                    let expr = t["expr"].as_str().unwrap();
                    assert!(
                        assert_known(title, expr, known) > 0,
                        "panel {title}: no metric"
                    );
                }
                *panels += 1;
            }
        }
        walk(&dash, &known, &mut panels);
    }
    assert!(panels >= 15, "only {panels} panels");
}

#[test]
fn every_emitted_metric_has_a_line_in_metrics_md() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ops/METRICS.md")).unwrap();
    for name in emitted_metrics() {
        assert!(
            doc.contains(&format!("| `{name}` |")),
            "{name}: no row in ops/METRICS.md"
        );
    }
}
