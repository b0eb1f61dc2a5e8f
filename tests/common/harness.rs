//! The push/pull test harness: an in-process emulator, the real `syncbridge run` binary, a
//! PostgreSQL connection, Graph reads and the process's /metrics. Included with
//! `#[path = "common/harness.rs"] mod harness;` by the end-to-end test binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use syncbridge::config::{GraphConfig, Secret};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};
use syncbridge::graph::{GraphClient, GraphClientConfig, ItemQuery, LimiterRegistry};
use tokio_postgres::{Client, NoTls};

use super::common::{database_url, drop_replication_objects, free_port};

pub const BIN: &str = env!("CARGO_BIN_EXE_syncbridge");

pub struct Harness {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub emu: RunningEmulator,
    pub admin: reqwest::Client,
    pub graph: GraphClient,
    /// The settings of `graph` (the app's client secret).
    pub graph_config: GraphConfig,
    /// A person's client: its writes are attributed to a user, like edits in the browser.
    pub person: GraphClient,
    pub site: String,
    pub db: Client,
    pub tables: Vec<String>,
    pub child: Option<Child>,
    pub control_port: u16,
    /// `source.url` of the pipelines [`Harness::pipeline`] writes (`DATABASE_URL` unless set).
    pub source_url: String,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let slot = format!("sb_{}", self.name);
        drop_replication_objects(&slot, &slot, &self.tables);
    }
}

impl Harness {
    pub async fn new(tag: &str) -> Harness {
        Harness::new_with(tag, EmulatorArgs::default()).await
    }

    /// [`Harness::new`] with an emulator started from `args` (e.g. with a client certificate).
    pub async fn new_with(tag: &str, args: EmulatorArgs) -> Harness {
        let name = format!("{tag}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let emu = emulator::spawn(args).await.expect("emulator starts");
        let base = emu.base_url();
        let gc = GraphConfig {
            base_url: format!("{base}/v1.0").parse().unwrap(),
            token_url: format!("{base}/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT)
                .parse()
                .unwrap(),
            tenant: emulator::DEFAULT_TENANT.into(),
            client_id: emulator::DEFAULT_CLIENT_ID.into(),
            credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(
                emulator::DEFAULT_CLIENT_SECRET,
            )),
            site: emulator::DEFAULT_SITE.into(),
            ru_per_minute: 100_000,
            sharepoint_url: None,
            hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
        };
        let graph =
            GraphClient::new(GraphClientConfig::from(&gc), &LimiterRegistry::new()).unwrap();
        // Adele Vance, editing lists by hand (the emulator's second client).
        let person_cfg = GraphConfig {
            client_id: emulator::DEFAULT_USER_CLIENT_ID.into(),
            credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(
                emulator::DEFAULT_USER_CLIENT_SECRET,
            )),
            ..gc.clone()
        };
        let person = GraphClient::new(
            GraphClientConfig::from(&person_cfg),
            &LimiterRegistry::new(),
        )
        .unwrap();
        let site = graph.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
        let (db, conn) = tokio_postgres::connect(&database_url(), NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        Harness {
            name,
            dir: tempfile::tempdir().unwrap(),
            emu,
            admin: reqwest::Client::new(),
            graph,
            graph_config: gc,
            person,
            site,
            db,
            tables: Vec::new(),
            child: None,
            control_port: free_port(),
            source_url: database_url(),
        }
    }

    pub fn t(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.name)
    }

    /// Writes the pipeline file; `log` is the YAML of the `log:` value. It signs in with the
    /// client secret and writes hyperlinks through Graph (`graph.hyperlinks: graph`), so tests
    /// can make Graph refuse or accept them with the emulator's `hyperlink_writes`.
    pub fn pipeline(&self, log: &str, sync: &str) -> PathBuf {
        let base = self.emu.base_url();
        let yaml = format!(
            "version: 1\nname: {name}\nsource:\n  url: {db}\nlog: {log}\ngraph:\n  base_url: {base}/v1.0\n  token_url: {base}/{{tenant}}/oauth2/v2.0/token\n  tenant: {tenant}\n  client_id: {cid}\n  client_secret: {secret}\n  site: '{site}'\n  ru_per_minute: 100000\n  hyperlinks: graph\nsync:\n{sync}\ncontrol:\n  listen: 127.0.0.1:{port}\n",
            name = self.name,
            db = self.source_url,
            tenant = emulator::DEFAULT_TENANT,
            cid = emulator::DEFAULT_CLIENT_ID,
            secret = emulator::DEFAULT_CLIENT_SECRET,
            site = emulator::DEFAULT_SITE,
            port = self.control_port,
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// [`Harness::pipeline`] on the embedded log with `control.meta_url` set to `meta_url`.
    pub fn pipeline_with_meta(&self, sync: &str, meta_url: &str) -> PathBuf {
        let file = self.pipeline(&self.embedded_log(), sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}  meta_url: {meta_url}\n")).unwrap();
        file
    }

    /// A pipeline file on the Kafka log (`KAFKA_BROKERS`, topic prefix unique to this harness)
    /// syncing a new [`Harness::titled_table`] of `rows` push-only, with `extra` YAML appended.
    pub async fn kafka_titled_pipeline(&mut self, rows: u32, extra: &str) -> PathBuf {
        let (t, list) = self.titled_table(rows).await;
        let kafka = format!(
            "{{ kafka: {{ brokers: ['{}'], topic_prefix: 'sbk{}' }} }}",
            super::common::kafka_brokers(),
            &self.name[self.name.len() - 8..]
        );
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = self.pipeline(&kafka, &sync);
        let yaml = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("{yaml}{extra}")).unwrap();
        file
    }

    pub fn embedded_log(&self) -> String {
        format!(
            "{{ embedded: {{ path: '{}' }} }}",
            self.dir.path().join("log").display()
        )
    }

    pub fn start(&mut self, file: &Path) {
        self.start_with(file, &[]);
    }

    /// [`Harness::start`] with more arguments to `syncbridge run` (e.g. `--allow-config-writes`).
    pub fn start_with(&mut self, file: &Path, args: &[&str]) {
        let stderr = std::fs::File::create(self.dir.path().join("run.log")).unwrap();
        let child = Command::new(BIN)
            .arg("run")
            .arg(file)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start syncbridge run");
        self.child = Some(child);
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "syncbridge run exited with {status}:\n{}",
                    self.run_log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "syncbridge run did not stop:\n{}",
                self.run_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGHUP to the running `syncbridge run` (reloads its pipeline files).
    pub fn sighup(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(status.success());
    }

    /// `GET /ready` of the running process: (HTTP status, body).
    pub async fn ready(&self) -> (u16, Value) {
        let url = format!("http://127.0.0.1:{}/ready", self.control_port);
        match reqwest::get(url).await {
            Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }

    pub fn run_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    /// Creates table `<name>_t (id bigint PRIMARY KEY, title text NOT NULL)` with rows 1..=`rows`
    /// (`title` = `row <id>`), dropped with the harness; returns it and the list name `T <name>`.
    pub async fn titled_table(&mut self, rows: u32) -> (String, String) {
        let t = self.t("t");
        self.sql(&format!(
            "CREATE TABLE public.{t} (id bigint PRIMARY KEY, title text NOT NULL);
             INSERT INTO public.{t} SELECT g, 'row ' || g FROM generate_series(1, {rows}) g;"
        ))
        .await;
        self.tables.push(format!("public.{t}"));
        let list = format!("T {}", self.name);
        (t, list)
    }

    pub async fn sql(&self, q: &str) {
        self.db
            .batch_execute(q)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
    }

    /// Items of a list by SyncKey (empty when the list does not exist yet).
    pub async fn items(&self, list: &str) -> Vec<(String, serde_json::Map<String, Value>)> {
        let Ok(Some(info)) = self.graph.get_list(&self.site, list).await else {
            return Vec::new();
        };
        let items = self
            .graph
            .list_items(&self.site, &info.id, &ItemQuery::default())
            .await
            .unwrap();
        items
            .into_iter()
            .map(|i| {
                (
                    i.fields
                        .get("SyncKey")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    i.fields,
                )
            })
            .collect()
    }

    pub async fn list_id(&self, list: &str) -> String {
        self.graph
            .get_list(&self.site, list)
            .await
            .unwrap()
            .unwrap()
            .id
    }

    /// Which item id has `key` in `list`.
    pub async fn item_id(&self, list: &str, key: &str) -> String {
        self.item(list, key).await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn item(&self, list: &str, key: &str) -> Option<serde_json::Map<String, Value>> {
        self.items(list)
            .await
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, f)| f)
    }

    pub async fn wait_for<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        self.wait_for_secs(what, 40, check).await;
    }

    /// [`Harness::wait_for`] with a deadline of `secs` seconds.
    pub async fn wait_for_secs<F, Fut>(&self, what: &str, secs: u64, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.run_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stats(&self) -> Value {
        self.admin
            .get(format!("{}/_emulator/stats", self.emu.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn emulator_limits(&self, body: Value) {
        let r = self
            .admin
            .post(format!("{}/_emulator/limits", self.emu.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// The value of a counter in the process's /metrics, summed over series matching `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.control_port)).await
        else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Harness {
    /// Changes fields of the item with SyncKey `key` as a person would (the user client).
    pub async fn person_edit(&self, list: &str, key: &str, fields: Value) {
        let list_id = self.list_id(list).await;
        let item = self.item_id(list, key).await;
        let f = fields.as_object().expect("an object of fields").clone();
        self.person
            .update_item_fields(&self.site, &list_id, &item, &f, None)
            .await
            .unwrap();
    }

    /// `POST /pipelines/{name}/{path}` (`drift`, `drift/heal`) once the pipeline is registered;
    /// the report.
    pub async fn post_drift(&self, path: &str) -> Value {
        let url = format!(
            "http://127.0.0.1:{}/pipelines/{}/{path}",
            self.control_port, self.name
        );
        for _ in 0..200 {
            if let Ok(r) = self.admin.post(&url).send().await {
                let status = r.status();
                let body: Value = r.json().await.unwrap();
                if status == 200 {
                    return body;
                }
                assert_eq!(status, 404, "POST {path}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "POST {path}: the pipeline never registered:\n{}",
            self.run_log()
        );
    }

    /// Runs the `syncbridge` binary with `args` (off the async workers); (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli_with_env(args, &[]).await
    }
}

/// Runs the `syncbridge` binary with `args` and the variables `env` set (`None`: removed), off
/// the async workers; (exit code, stdout, stderr).
pub async fn cli_with_env(args: &[&str], env: &[(&str, Option<&str>)]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, Option<String>)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        let mut c = Command::new(BIN);
        c.args(&args);
        for (k, v) in env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.output()
    })
    .await
    .unwrap()
    .expect("run syncbridge");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn writes(stats: &Value) -> (u64, u64) {
    (
        stats["ru_consumed"].as_u64().unwrap(),
        stats["requests"]["by_method"]["POST"].as_u64().unwrap_or(0)
            + stats["requests"]["by_method"]["PATCH"]
                .as_u64()
                .unwrap_or(0)
            + stats["requests"]["by_method"]["DELETE"]
                .as_u64()
                .unwrap_or(0),
    )
}

/// SyncBridge's calls of `method`, as the emulator counted them for its client (`$batch`
/// entries one by one; a person's edits are another client's).
pub fn app_calls(stats: &Value, method: &str) -> u64 {
    stats["requests"]["by_client"][emulator::DEFAULT_CLIENT_ID][method]
        .as_u64()
        .unwrap_or(0)
}

/// SyncBridge's writes (POST, PATCH, DELETE) as the emulator counted them.
pub fn app_writes(stats: &Value) -> u64 {
    ["POST", "PATCH", "DELETE"]
        .iter()
        .map(|m| app_calls(stats, m))
        .sum()
}

pub async fn hard_timeout<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("test exceeded its {secs} s timeout"));
}

/// `GET /runs?query` on the process's control plane, `None` while it is not listening yet.
pub async fn try_runs(h: &Harness, query: &str) -> Option<Vec<Value>> {
    let body: Value = h
        .admin
        .get(format!("http://127.0.0.1:{}/runs?{query}", h.control_port))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["runs"].as_array().cloned()
}
