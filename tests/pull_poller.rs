//! The delta poller (`syncbridge::pull::poller`) against an in-process Graph emulator and the
//! embedded log in a temporary directory. A second emulator client (the "person") edits the lists
//! the way people do in the browser.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value, json};
use syncbridge::config::{GraphConfig, Secret};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};
use syncbridge::graph::{ColumnDefinition, GraphClient, GraphClientConfig, LimiterRegistry};
use syncbridge::log::{
    CancellationToken, CommittedOffsets, Delivered, EmbeddedLog, EmbeddedLogConfig, EventLog,
    LogConsumer, LogError, Record, TopicSpec,
};
use syncbridge::pull::poller::{
    self, ChangeKind, ListChange, PollerConfig, ResyncReason, StartMode,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const PREFIX: &str = "syncbridge";
const WAIT: Duration = Duration::from_secs(20);

struct Env {
    emu: RunningEmulator,
    app: Arc<GraphClient>,
    person: GraphClient,
    site: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    log: Arc<EmbeddedLog>,
}

fn graph_config(base: &str, client_id: &str, secret: &str) -> GraphConfig {
    GraphConfig {
        base_url: format!("{base}/v1.0").parse().unwrap(),
        token_url: format!("{base}/{}/oauth2/v2.0/token", emulator::DEFAULT_TENANT)
            .parse()
            .unwrap(),
        tenant: emulator::DEFAULT_TENANT.into(),
        client_id: client_id.into(),
        credential: syncbridge::config::GraphCredential::ClientSecret(Secret::new(secret)),
        site: emulator::DEFAULT_SITE.into(),
        ru_per_minute: 1_250,
        sharepoint_url: None,
        hyperlinks: syncbridge::config::HyperlinkWrites::SharepointRest,
    }
}

impl Env {
    async fn start() -> Env {
        let emu = emulator::spawn(EmulatorArgs::default())
            .await
            .expect("emulator starts");
        let base = emu.base_url();
        let client = |id: &str, secret: &str| {
            let cfg = GraphClientConfig::from(&graph_config(&base, id, secret));
            GraphClient::new(cfg, &LimiterRegistry::new()).unwrap()
        };
        let app = client(emulator::DEFAULT_CLIENT_ID, emulator::DEFAULT_CLIENT_SECRET);
        let person = client(
            emulator::DEFAULT_USER_CLIENT_ID,
            emulator::DEFAULT_USER_CLIENT_SECRET,
        );
        let site = app.resolve_site(emulator::DEFAULT_SITE).await.unwrap().id;
        let dir = tempfile::tempdir().unwrap();
        let log =
            Arc::new(EmbeddedLog::open(EmbeddedLogConfig::new(dir.path().join("log"))).unwrap());
        Env {
            emu,
            app: Arc::new(app),
            person,
            site,
            http: reqwest::Client::new(),
            _dir: dir,
            log,
        }
    }

    /// A started env with list `name` holding items "a" (Qty 1) and "b" (Qty 2): (env, list id,
    /// a's id, b's id).
    async fn with_list(name: &str) -> (Env, String, String, String) {
        let env = Env::start().await;
        let list = env.list(name).await;
        let a = env.create(&env.app, &list, "a", 1).await;
        let b = env.create(&env.app, &list, "b", 2).await;
        (env, list, a, b)
    }

    async fn list(&self, name: &str) -> String {
        let cols = [ColumnDefinition::new("Qty", "number", json!({}))];
        self.app
            .create_list(&self.site, name, &cols)
            .await
            .unwrap()
            .id
    }

    async fn create(&self, c: &GraphClient, list: &str, title: &str, qty: i64) -> String {
        c.create_item(
            &self.site,
            list,
            &fields(json!({ "Title": title, "Qty": qty })),
        )
        .await
        .unwrap()
        .id
    }

    fn config(&self, list: &str, start: StartMode) -> PollerConfig {
        let mut c = PollerConfig::new(
            PREFIX,
            "pp",
            &self.site,
            list,
            list,
            Duration::from_millis(100),
            start,
        );
        c.retry_min = Duration::from_millis(50);
        c.retry_max = Duration::from_millis(200);
        c
    }

    async fn admin(&self, path: &str, body: Value) {
        let r = self
            .http
            .post(format!("{}/_emulator/{path}", self.emu.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/_emulator/stats", self.emu.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn fields(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), poller::PullError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the poller stops promptly on shutdown")
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}

fn spawn<L: EventLog + 'static>(env: &Env, cfg: PollerConfig, log: Arc<L>) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(poller::run(cfg, env.app.clone(), log, stop.clone()));
    Running { stop, task }
}

/// Every record of the changes topic so far (a fresh group each time, never committed), with
/// its key.
async fn records<L: EventLog>(log: &L) -> Vec<(String, ListChange)> {
    let topic = poller::changes_topic(PREFIX, "pp");
    let end: i64 = match log.end_offsets(&topic).await {
        Ok(e) => e.iter().sum(),
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    if end == 0 {
        return out;
    }
    let stop = CancellationToken::new();
    let mut c = log
        .consumer(
            &format!("t-{}", uuid::Uuid::new_v4()),
            &[topic],
            stop.clone(),
        )
        .await
        .unwrap();
    while (out.len() as i64) < end {
        let r = tokio::time::timeout(WAIT, c.recv())
            .await
            .expect("records up to the end offset")
            .unwrap()
            .unwrap();
        let key = String::from_utf8(r.record.key.clone()).unwrap();
        let v: ListChange = serde_json::from_slice(r.record.value.as_ref().unwrap()).unwrap();
        out.push((key, v));
    }
    stop.cancel();
    out
}

/// Waits until `pred` holds for the records of the changes topic.
async fn wait_records<L: EventLog>(
    log: &L,
    what: &str,
    pred: impl Fn(&[(String, ListChange)]) -> bool,
) -> Vec<(String, ListChange)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = records(log).await;
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cursor<L: EventLog>(log: &L, list: &str) -> Option<poller::StoredCursor> {
    let topic = poller::cursors_topic(PREFIX, "pp");
    if log.end_offsets(&topic).await.is_err() {
        return None;
    }
    poller::read_cursor(log, &topic, list).await.unwrap()
}

async fn wait_cursor<L: EventLog>(log: &L, list: &str) -> poller::StoredCursor {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(c) = cursor(log, list).await {
            return c;
        }
        assert!(Instant::now() < deadline, "no cursor stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn items_of<'a>(r: &'a [(String, ListChange)], id: &str) -> Vec<&'a ListChange> {
    r.iter()
        .filter(|(_, c)| c.item_id.as_deref() == Some(id))
        .map(|(_, c)| c)
        .collect()
}

#[tokio::test]
async fn person_edits_creates_and_deletes_arrive_as_records() {
    let (env, list, a, b) = Env::with_list("Person Edits").await;

    let p = spawn(&env, env.config(&list, StartMode::Latest), env.log.clone());
    let c0 = wait_cursor(&*env.log, &list).await;
    assert_eq!(c0.phase, poller::CursorPhase::Delta);

    let c = env.create(&env.person, &list, "c", 3).await;
    env.person
        .update_item_fields(&env.site, &list, &a, &fields(json!({ "Qty": 10 })), None)
        .await
        .unwrap();
    env.person
        .delete_item(&env.site, &list, &b, None)
        .await
        .unwrap();

    let r = wait_records(&*env.log, "three item changes", |r| {
        r.iter().filter(|(_, c)| c.item_id.is_some()).count() >= 3
    })
    .await;
    assert_eq!(
        r.len(),
        3,
        "Latest start: no enumeration, no markers: {r:#?}"
    );
    for (key, ch) in &r {
        assert_eq!(key, &format!("{list}/{}", ch.item_id.as_deref().unwrap()));
        assert_eq!(ch.list_id, list);
        assert!(!ch.resync && ch.resync_id.is_none());
    }
    let created = items_of(&r, &c);
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].kind, ChangeKind::Upsert);
    let f = created[0].fields.as_ref().unwrap();
    assert_eq!(
        (f["Title"].as_str(), f["Qty"].as_f64()),
        (Some("c"), Some(3.0))
    );
    assert!(created[0].etag.is_some() && created[0].last_modified.is_some());
    let edited = items_of(&r, &a);
    assert_eq!(edited[0].kind, ChangeKind::Upsert);
    assert_eq!(
        edited[0].fields.as_ref().unwrap()["Qty"].as_f64(),
        Some(10.0)
    );
    let deleted = items_of(&r, &b);
    assert_eq!(deleted[0].kind, ChangeKind::Deleted);
    assert!(deleted[0].fields.is_none());

    // The cursor moved past these changes (stored after they were durable) ...
    let c1 = wait_cursor(&*env.log, &list).await;
    assert_ne!(c1.link, c0.link);
    p.stop().await;

    // ... so a restarted poller resumes there and re-delivers nothing.
    let p = spawn(&env, env.config(&list, StartMode::Full), env.log.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        records(&*env.log).await.len(),
        3,
        "no re-delivery after restart"
    );
    env.person
        .update_item_fields(
            &env.site,
            &list,
            &c,
            &fields(json!({ "Title": "c2" })),
            None,
        )
        .await
        .unwrap();
    let r = wait_records(&*env.log, "the edit after restart", |r| r.len() >= 4).await;
    assert_eq!(r[3].1.fields.as_ref().unwrap()["Title"], "c2");
    p.stop().await;
}

/// Waits until `r` says this process owns (`true`) or stands by for (`false`) the poller.
async fn wait_owner(r: &syncbridge::control::Readiness, key: &str, owned: bool) {
    let deadline = Instant::now() + WAIT;
    while r.owners().get(key) != Some(&owned) {
        assert!(
            Instant::now() < deadline,
            "{key} never became owned={owned}: {:?}",
            r.owners()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two processes' pollers of one list (`pull::owner`, lock on DATABASE_URL): one polls, the
/// other stands by and refuses resets; when the owner stops (its lock connection closes, as
/// when a process dies) the other takes over and continues from the stored delta link.
#[tokio::test]
async fn one_poller_per_list_across_processes_and_a_takeover() {
    use syncbridge::pull::owner::{NOT_OWNER, Ownership, run_owned};
    let (env, list, a, b) = Env::with_list("Owned").await;
    let key = format!("pp/poller:{list}");
    let start = |ready: &syncbridge::control::Readiness| {
        let own = Ownership {
            lock_url: common_database_url(),
            retry: Duration::from_millis(100),
            readiness: ready.clone(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let stop = CancellationToken::new();
        let cfg = env.config(&list, StartMode::Latest);
        let task = tokio::spawn(run_owned(
            cfg,
            env.app.clone(),
            env.log.clone(),
            Some(rx),
            own,
            stop.clone(),
        ));
        (Running { stop, task }, tx)
    };
    let (r1, r2) = (
        syncbridge::control::Readiness::default(),
        syncbridge::control::Readiness::default(),
    );
    let (first, _resets1) = start(&r1);
    wait_owner(&r1, &key, true).await;
    wait_cursor(&*env.log, &list).await;
    let (second, resets2) = start(&r2);
    wait_owner(&r2, &key, false).await;
    let (reply, answer) = tokio::sync::oneshot::channel();
    resets2.send(reply).await.unwrap();
    assert_eq!(
        answer.await.unwrap(),
        Err(NOT_OWNER.to_string()),
        "a standby has no poller to reset"
    );

    let edit = |item: &str, title: &str| {
        let f = fields(json!({ "Title": title }));
        let (site, list, item) = (env.site.clone(), list.clone(), item.to_string());
        let person = &env.person;
        async move {
            person
                .update_item_fields(&site, &list, &item, &f, None)
                .await
                .unwrap()
        }
    };
    edit(&a, "a1").await;
    wait_records(&*env.log, "a's edit", |r| !items_of(r, &a).is_empty()).await;
    // A later change seen: a second poller would have appended a's edit again by now.
    edit(&b, "b1").await;
    let r = wait_records(&*env.log, "b's edit", |r| !items_of(r, &b).is_empty()).await;
    assert_eq!(items_of(&r, &a).len(), 1, "a's edit appended once: {r:#?}");
    assert!(!r2.owners()[&key], "the second still stands by");

    first.stop().await;
    wait_owner(&r1, &key, false).await;
    wait_owner(&r2, &key, true).await;
    edit(&a, "a2").await;
    let r = wait_records(&*env.log, "a's edit after the takeover", |r| {
        items_of(r, &a).len() >= 2
    })
    .await;
    let a_changes = items_of(&r, &a);
    assert_eq!(
        a_changes.len(),
        2,
        "continued from the stored link: nothing re-delivered: {r:#?}"
    );
    assert_eq!(a_changes[1].fields.as_ref().unwrap()["Title"], "a2");
    assert!(
        r.iter().all(|(_, c)| !c.resync),
        "no re-enumeration: {r:#?}"
    );
    second.stop().await;
}

fn common_database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL (eval \"$(ops/stack env)\")")
}

/// An event log whose appends to one topic can be made to fail (retryably).
#[derive(Debug)]
struct FlakyLog {
    inner: Arc<EmbeddedLog>,
    topic: String,
    fail: AtomicBool,
    failed: AtomicU64,
}

impl EventLog for FlakyLog {
    type Consumer = <EmbeddedLog as EventLog>::Consumer;

    async fn ensure_topic(&self, spec: &TopicSpec) -> Result<(), LogError> {
        self.inner.ensure_topic(spec).await
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>, LogError> {
        if topic == self.topic && self.fail.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(LogError::Timeout("injected append failure".into()));
        }
        self.inner.append(topic, records).await
    }

    async fn consumer(
        &self,
        group: &str,
        topics: &[String],
        shutdown: CancellationToken,
    ) -> Result<Self::Consumer, LogError> {
        self.inner.consumer(group, topics, shutdown).await
    }

    async fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<CommittedOffsets, LogError> {
        self.inner.committed(group, topics).await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        self.inner.end_offsets(topic).await
    }

    async fn start_offsets(&self, topic: &str) -> Result<Vec<i64>, LogError> {
        self.inner.start_offsets(topic).await
    }

    async fn offsets_for_time(&self, topic: &str, timestamp_ms: i64) -> Result<Vec<i64>, LogError> {
        self.inner.offsets_for_time(topic, timestamp_ms).await
    }

    async fn set_committed(
        &self,
        group: &str,
        positions: &CommittedOffsets,
    ) -> Result<(), LogError> {
        self.inner.set_committed(group, positions).await
    }
}

#[tokio::test]
async fn cursor_moves_only_after_changes_are_durable() {
    let env = Env::start().await;
    let list = env.list("Durable First").await;
    let flaky = Arc::new(FlakyLog {
        inner: env.log.clone(),
        topic: poller::changes_topic(PREFIX, "pp"),
        fail: AtomicBool::new(false),
        failed: AtomicU64::new(0),
    });
    let p = spawn(&env, env.config(&list, StartMode::Latest), flaky.clone());
    let c0 = wait_cursor(&*env.log, &list).await;

    // Appends of changes fail from now on: the poller retries, and the cursor must not move.
    flaky.fail.store(true, Ordering::SeqCst);
    let item = env
        .create(&env.person, &list, "while the log fails", 1)
        .await;
    let deadline = Instant::now() + WAIT;
    while flaky.failed.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the poller did not retry the append"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records(&*env.log).await.len(), 0);
    assert_eq!(
        wait_cursor(&*env.log, &list).await,
        c0,
        "cursor stored although the changes were not durable"
    );
    // A stop while failing loses nothing either: the next poller (healthy log) reads from c0.
    p.stop().await;
    assert_eq!(wait_cursor(&*env.log, &list).await, c0);

    flaky.fail.store(false, Ordering::SeqCst);
    let p = spawn(&env, env.config(&list, StartMode::Latest), flaky.clone());
    let r = wait_records(&*env.log, "the item created while failing", |r| {
        !r.is_empty()
    })
    .await;
    assert_eq!(r[0].1.item_id.as_deref(), Some(item.as_str()));
    assert_eq!(r[0].1.kind, ChangeKind::Upsert);
    let deadline = Instant::now() + WAIT;
    while wait_cursor(&*env.log, &list).await == c0 {
        assert!(Instant::now() < deadline, "cursor never moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop().await;
}

#[tokio::test]
async fn expired_token_re_enumerates_between_resync_markers() {
    let env = Env::start().await;
    let list = env.list("Resync").await;
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(env.create(&env.app, &list, &format!("t{i}"), i).await);
    }
    let mut cfg = env.config(&list, StartMode::Full);
    cfg.page_size = Some(2); // two pages per enumeration: the nextLink path is exercised too
    let p = spawn(&env, cfg, env.log.clone());

    let is_end = |c: &ListChange| c.kind == ChangeKind::ResyncEnd;
    let r = wait_records(&*env.log, "the initial enumeration", |r| {
        r.iter().any(|(_, c)| is_end(c))
    })
    .await;
    check_resync(&r, &list, ResyncReason::Initial, &ids);

    // A person deletes one item and adds another; then the tokens expire. The next poll gets
    // 410 resyncRequired and re-enumerates: the deleted item is simply absent from the full set.
    // (Changes first: a poll between an expiry and the changes would re-enumerate the old set.
    // A poll between the changes and the expiry reads them as incremental records, before the
    // re-enumeration.)
    let before = r.len();
    env.person
        .delete_item(&env.site, &list, &ids[1], None)
        .await
        .unwrap();
    let added = env.create(&env.person, &list, "t4", 4).await;
    env.admin("expire-delta-tokens", json!({})).await;
    let r = wait_records(&*env.log, "the re-enumeration", |r| {
        r[before..].iter().any(|(_, c)| is_end(c))
    })
    .await;
    let begin = before
        + r[before..]
            .iter()
            .position(|(_, c)| c.kind == ChangeKind::ResyncBegin)
            .expect("a re-enumeration begins");
    let expect = [ids[0].clone(), ids[2].clone(), added];
    check_resync(&r[begin..], &list, ResyncReason::TokenExpired, &expect);
    assert!(
        items_of(&r[begin..], &ids[1]).is_empty(),
        "a deleted item is not part of the re-enumeration"
    );
    p.stop().await;
}

/// `r` is exactly resync_begin, the upserts of `ids` (in any order), resync_end.
fn check_resync(r: &[(String, ListChange)], list: &str, reason: ResyncReason, ids: &[String]) {
    assert_eq!(r.len(), ids.len() + 2, "{r:#?}");
    let (begin, end) = (&r[0].1, &r[r.len() - 1].1);
    assert_eq!(begin.kind, ChangeKind::ResyncBegin);
    assert_eq!(end.kind, ChangeKind::ResyncEnd);
    assert_eq!((r[0].0.as_str(), begin.reason), (list, Some(reason)));
    assert_eq!(end.items, Some(ids.len() as u64));
    let id = begin.resync_id.clone().expect("resync id");
    assert_eq!(end.resync_id.as_ref(), Some(&id));
    let mut seen: Vec<String> = Vec::new();
    for (_, c) in &r[1..r.len() - 1] {
        assert_eq!(c.kind, ChangeKind::Upsert);
        assert!(c.resync && c.resync_id.as_ref() == Some(&id));
        assert!(c.fields.as_ref().unwrap().contains_key("Title"));
        seen.push(c.item_id.clone().unwrap());
    }
    seen.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn idle_polling_costs_one_resource_unit_per_poll() {
    let env = Env::start().await;
    let list = env.list("Idle").await;
    env.create(&env.app, &list, "x", 1).await;
    let p = spawn(&env, env.config(&list, StartMode::Latest), env.log.clone());
    wait_cursor(&*env.log, &list).await;
    let sample = |s: &Value| {
        (
            s["ru_consumed"].as_u64().unwrap(),
            s["requests"]["by_method"]["GET"].as_u64().unwrap_or(0),
        )
    };
    let (ru0, get0) = sample(&env.stats().await);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (ru1, get1) = sample(&env.stats().await);
    p.stop().await;
    let polls = get1 - get0;
    assert!(polls >= 5, "polls every 100 ms: {polls} in 1.5 s");
    assert_eq!(
        ru1 - ru0,
        polls,
        "each idle poll (delta with a token) costs 1 RU"
    );
    assert!(records(&*env.log).await.is_empty());
}

#[tokio::test]
async fn throttling_and_outages_delay_but_lose_nothing() {
    let env = Env::start().await;
    let list = env.list("Throttled").await;
    let p = spawn(&env, env.config(&list, StartMode::Latest), env.log.clone());
    wait_cursor(&*env.log, &list).await;
    env.admin(
        "faults",
        json!({ "throttle_rate": 0.3, "unavailable_rate": 0.2, "retry_after_secs": 1, "seed": 6 }),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        // The person's writes are throttled too: retry them by hand (bounded).
        let mut created = None;
        for _ in 0..20 {
            let r = env
                .person
                .create_item(
                    &env.site,
                    &list,
                    &fields(json!({ "Title": format!("p{i}") })),
                )
                .await;
            if let Ok(it) = r {
                created = Some(it.id);
                break;
            }
        }
        ids.push(created.expect("the person's create succeeds eventually"));
    }
    let r = wait_records(&*env.log, "all three items", |r| {
        ids.iter().all(|id| !items_of(r, id).is_empty())
    })
    .await;
    assert!(r.iter().all(|(_, c)| c.kind == ChangeKind::Upsert));
    env.admin("faults", json!({})).await;
    let stats = env.stats().await;
    assert!(
        stats["faults"]["injected_throttles"].as_u64().unwrap()
            + stats["faults"]["injected_unavailable"].as_u64().unwrap()
            > 0
    );
    p.stop().await;
}
