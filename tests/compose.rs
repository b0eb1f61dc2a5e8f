//! No Docker engine runs in CI, so this checks `docker-compose.yml` as far as possible without
//! one: the services we promise exist, every file it mounts or builds from is in the repo, ports
//! stay on loopback, each service has a healthcheck, commands of our image are real subcommands,
//! and the pipeline it runs validates with the environment compose gives it.

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
