//! The `syncbridge` binary as users and CI drive it: exit codes, `validate` over the committed
//! pipelines and the broken-config corpus, and `run`'s lifecycle (serves `/health`, `/ready`,
//! `/metrics`, exits 0 after SIGTERM).

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{database_url, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn syncbridge(args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(ROOT)
        .args(args)
        // Values the committed pipelines take from the environment.
        .env(
            "DATABASE_URL",
            "postgres://u:hunter2@127.0.0.1:54329/syncbridge?sslmode=disable",
        )
        .env("GRAPH_CLIENT_SECRET", "s3cret-value")
        .output()
        .expect("run syncbridge")
}

#[test]
fn version_prints_the_package_version() {
    let out = syncbridge(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!("syncbridge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = syncbridge(&["completions", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {out:?}");
        // Every subcommand is completed.
        for sub in ["run", "validate", "dlq", "conflicts", "catalog", "resume"] {
            assert!(text.contains(sub), "{shell}: no `{sub}`");
        }
    }
    let out = syncbridge(&["man"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(page.contains(".TH syncbridge 1"), "{page}");
    assert!(
        page.contains("SUBCOMMANDS") || page.contains("syncbridge\\-run"),
        "{page}"
    );
    assert_eq!(syncbridge(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(syncbridge(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(syncbridge(&["validate"]).status.code(), Some(2));
}

#[test]
fn committed_pipelines_validate_without_revealing_secrets() {
    let files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(
        files.len() >= 2,
        "expected demo and projects pipelines: {files:?}"
    );
    let mut args = vec!["validate"];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let out = syncbridge(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    assert!(!stdout.contains("s3cret-value") && !stderr.contains("s3cret-value"));
}

#[test]
fn a_missing_file_is_an_invalid_configuration() {
    let out = syncbridge(&["validate", "pipelines/does-not-exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does-not-exist.yaml"), "{stderr}");
}

fn sql(statements: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the stack's PostgreSQL");
        tokio::spawn(conn);
        client.batch_execute(statements).await.expect(statements);
    });
}

/// A pipeline over its own table, slot and publication; dropped again at the end of the test.
struct TestPipeline {
    name: String,
    dir: tempfile::TempDir,
}

impl TestPipeline {
    fn new(with_table: bool) -> Self {
        let name = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        if with_table {
            sql(&format!(
                "CREATE TABLE public.{name} (id bigint PRIMARY KEY, name text);
                 INSERT INTO public.{name} VALUES (1, 'one'), (2, 'two');"
            ));
        }
        TestPipeline {
            name,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Drop for TestPipeline {
    fn drop(&mut self) {
        let n = &self.name;
        common::drop_replication_objects(
            &format!("sb_{n}"),
            &format!("sb_{n}"),
            &[format!("public.{n}")],
        );
    }
}

fn write_pipeline(p: &TestPipeline, port: u16) -> PathBuf {
    let dir = p.dir.path();
    let file = dir.join("lifecycle.yaml");
    let yaml = format!(
        r#"version: 1
name: {name}
source:
  url: {url}
log:
  embedded: {{ path: {log} }}
graph:
  base_url: ${{GRAPH_BASE_URL}}
  token_url: ${{GRAPH_TOKEN_URL}}
  tenant: contoso.onmicrosoft.com
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: dev-secret
  site: contoso.sharepoint.com:/sites/dev
  # The stack's emulator is unthrottled; the default tier would slow these capture tests.
  ru_per_minute: 100000
sync:
  - table: public.{name}
    list: Lifecycle Items {name}
    pull: {{ enabled: false }}
    fields:
      name: Title
control:
  listen: 127.0.0.1:{port}
"#,
        log = dir.join("log").display(),
        name = p.name,
        url = database_url(),
    );
    std::fs::write(&file, yaml).unwrap();
    file
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

fn wait_for(port: u16, path: &str, want: u16, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((status, body)) = http_get(port, path)
            && status == want
        {
            return body;
        }
        if let Some(code) = child.try_wait().unwrap() {
            panic!("syncbridge exited early with {code}");
        }
        assert!(Instant::now() < deadline, "{path} never answered {want}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn terminate(child: &mut Child) -> Option<i32> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("syncbridge did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_serves_health_ready_metrics_and_exits_0_on_sigterm() {
    let pipeline = TestPipeline::new(true);
    let port = free_port();
    let file = write_pipeline(&pipeline, port);
    let mut child = Command::new(BIN)
        .args(["run", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let health = wait_for(port, "/health", 200, &mut child);
    assert!(health.contains("ok"), "{health}");
    let ready = wait_for(port, "/ready", 200, &mut child);
    assert!(
        ready.contains(&format!("{}/capture", pipeline.name)),
        "{ready}"
    );
    let (status, metrics) = http_get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("syncbridge_build_info"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            r#"syncbridge_stage_up{{pipeline="{}",stage="log"}} 1"#,
            pipeline.name
        )),
        "{metrics}"
    );
    // The snapshot of the two rows reaches the log; wait for it rather than for a fixed time.
    let events = format!(
        r#"syncbridge_capture_snapshot_rows_total{{pipeline="{}",table="public.{}"}} 2"#,
        pipeline.name, pipeline.name
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(port, "/metrics").is_some_and(|(_, m)| m.contains(&events)) {
        assert!(
            Instant::now() < deadline,
            "no snapshot events: want {events}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    assert_eq!(terminate(&mut child), Some(0));
}

#[test]
fn run_stops_with_exit_3_and_the_reason_when_a_table_is_missing() {
    let pipeline = TestPipeline::new(false);
    let file = write_pipeline(&pipeline, free_port());
    let out = Command::new(BIN)
        .args(["run", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&pipeline.name), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn run_with_a_taken_port_is_a_runtime_failure() {
    let pipeline = TestPipeline::new(true);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let file = write_pipeline(&pipeline, taken.local_addr().unwrap().port());
    let out = Command::new(BIN)
        .args(["run", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control.listen"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn validate_reports_every_expected_problem_of_the_broken_corpus() {
    let dir = Path::new(ROOT).join("tests/configs/broken");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let yaml = entry.unwrap().path();
        if yaml.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let expected = std::fs::read_to_string(yaml.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{} has no .expected file", yaml.display()));
        let rel = yaml
            .strip_prefix(ROOT)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let out = Command::new(BIN)
            .current_dir(ROOT)
            .args(["validate", &rel])
            .env_remove("SYNCBRIDGE_TEST_UNSET_SECRET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rel}: {stderr}");
        for line in expected.lines().filter(|l| !l.trim().is_empty()) {
            let want = format!("{rel}:{line}");
            assert!(
                stderr.contains(&want),
                "{rel}: missing `{want}` in:\n{stderr}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} broken configs found");
}
