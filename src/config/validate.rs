//! Semantic checks on what the reader recovered, and the build of the typed config.
//!
//! No IO happens here. Every section is checked even when another one is broken, and every
//! problem is reported; the typed config is built only when there are none.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::model::*;
use super::raw::*;
use super::yaml::Loc;

/// What cross-file checks need to know about a valid pipeline.
#[derive(Debug, Clone)]
pub struct CrossRefs {
    pub name: Loc,
    /// Every list display name the pipeline writes to, with where it is written.
    pub lists: Vec<(String, Loc)>,
    /// Where each sync entry's `table:` value is written, in sync order.
    pub tables: Vec<Loc>,
    /// Where each field mapping's column key is written, per sync entry, in `fields` order.
    pub fields: Vec<Vec<Loc>>,
}

fn is_ident(s: &str, extra: &[char]) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
}

/// `[a-z][a-z0-9_]{0,40}`: the name ends up in slot, publication and topic names.
pub fn is_pipeline_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 41
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_pg_ident(s: &str) -> bool {
    s.len() <= MAX_PG_IDENT_LEN && is_ident(s, &['$'])
}

/// SharePoint list titles are case-insensitive.
fn list_key(s: &str) -> String {
    s.trim().to_lowercase()
}

fn http_url(r: &mut Reader, s: &Sp<String>, path: &str) -> Option<Url> {
    match Url::parse(s.value.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
        _ => {
            r.issues.push((
                s.loc,
                format!("`{path}` must be an http:// or https:// URL"),
            ));
            None
        }
    }
}

/// A label key: see [`LABEL_KEY_PATTERN`].
pub fn is_label_key(key: &str) -> bool {
    let mut chars = key.chars();
    key.len() <= MAX_LABEL_KEY_LEN
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

/// `labels:`: keys match [`LABEL_KEY_PATTERN`]; values are 1 to [`MAX_LABEL_VALUE_LEN`]
/// characters (surrounding blanks trimmed) on one line.
fn check_labels(r: &mut Reader, labels: Option<&LabelsFile>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, value) in labels.map(|l| l.0.as_slice()).unwrap_or_default() {
        if !is_label_key(&key.value) {
            r.issues.push((
                key.loc,
                format!(
                    "`labels`: key {} must start with a lower-case letter and hold only a-z 0-9 _ . - (at most {MAX_LABEL_KEY_LEN} characters)",
                    shown(&key.value, false)
                ),
            ));
            continue;
        }
        let text = value.value.trim();
        let path = format!("labels.{}", key.value);
        let why = if text.is_empty() {
            Some("must not be empty".to_owned())
        } else if text.chars().count() > MAX_LABEL_VALUE_LEN {
            Some(format!("is longer than {MAX_LABEL_VALUE_LEN} characters"))
        } else if text.chars().any(char::is_control) {
            Some("must be one line without control characters".to_owned())
        } else {
            None
        };
        match why {
            Some(why) => r.issues.push((value.loc, format!("`{path}` {why}"))),
            None => {
                out.insert(key.value.clone(), text.to_owned());
            }
        }
    }
    out
}

/// `guard:`; every value falls back to its named default.
/// API tokens: names unique, tokens non-empty and unique (one token, one role). Messages name
/// the entry, never the token.
fn check_tokens(r: &mut Reader, tokens: Option<&[TokenFile]>) -> Vec<ApiToken> {
    let mut out: Vec<ApiToken> = Vec::new();
    let mut names: Vec<(&str, Loc)> = Vec::new();
    let mut secrets: Vec<(&str, &str)> = Vec::new();
    for t in tokens.unwrap_or_default() {
        let path = format!("control.tokens[{}]", t.index);
        let name = t.name.value.trim();
        let mut ok = true;
        if name.is_empty() {
            r.issues
                .push((t.name.loc, format!("`{path}.name` must not be empty")));
            ok = false;
        } else if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
            r.issues.push((
                t.name.loc,
                format!("`{path}.name`: duplicate token name `{name}` (first at {first})"),
            ));
            ok = false;
        } else {
            names.push((name, t.name.loc));
        }
        let secret = t.token.value.expose();
        if secret.trim().is_empty() {
            let why = if t.token.interpolated {
                " (its ${VAR} is empty)"
            } else {
                ""
            };
            r.issues.push((
                t.token.loc,
                format!("`{path}.token` must not be empty{why}"),
            ));
            ok = false;
        } else if let Some((_, other)) = secrets.iter().find(|(s, _)| *s == secret) {
            r.issues.push((
                t.token.loc,
                format!("`{path}.token` is the same secret as token `{other}`; give each its own"),
            ));
            ok = false;
        } else {
            secrets.push((secret, name));
        }
        if ok {
            out.push(ApiToken {
                name: name.to_string(),
                token: t.token.value.clone(),
                role: t.role.value,
            });
        }
    }
    out
}

/// `control.audit_retention`: a duration of at least [`MIN_AUDIT_RETENTION`]; the default
/// when absent (or wrong: the problem is reported and the config not built).
fn check_retention(r: &mut Reader, v: Option<&Sp<String>>) -> Duration {
    let Some(v) = v else {
        return DEFAULT_AUDIT_RETENTION;
    };
    match parse_duration(&v.value) {
        Some(d) if d >= MIN_AUDIT_RETENTION => d,
        Some(_) => {
            r.issues.push((
                v.loc,
                "`control.audit_retention` must be at least 1h (records would be pruned before \
                 anyone could read them)"
                    .into(),
            ));
            DEFAULT_AUDIT_RETENTION
        }
        None => {
            r.issues.push((
                v.loc,
                format!(
                    "`control.audit_retention` must be a whole number with a unit d, h, m or s \
                     (e.g. 30d), not {:?}",
                    v.value
                ),
            ));
            DEFAULT_AUDIT_RETENTION
        }
    }
}

/// `schedules:`: unique names, a cron expression croner reads, a known IANA time zone, and
/// `tables` (for `resnapshot` only) naming synced tables.
fn check_schedules(r: &mut Reader, s: &[ScheduleFile], sync: &[SyncFile]) -> Vec<ScheduleConfig> {
    let mut names: HashMap<&str, Loc> = HashMap::new();
    let mut out = Vec::with_capacity(s.len());
    for (i, e) in s.iter().enumerate() {
        let path = format!("schedules[{i}]");
        let before = r.issues.len();
        let name = e.name.value.trim();
        if !is_pipeline_name(name) {
            r.issues.push((
                e.name.loc,
                format!("`{path}.name` must match [a-z][a-z0-9_]{{0,40}}"),
            ));
        } else if let Some(first) = names.insert(name, e.name.loc) {
            r.issues.push((
                e.name.loc,
                format!("schedule `{name}` is defined twice (first at {first})"),
            ));
        }
        if let Err(why) = parse_cron(&e.cron.value) {
            r.issues.push((
                e.cron.loc,
                format!("`{path}.cron` is not a cron expression: {why}"),
            ));
        }
        let time_zone = match &e.time_zone {
            None => DEFAULT_SCHEDULE_TIME_ZONE,
            Some(tz) => tz.value.trim().parse().unwrap_or_else(|_| {
                r.issues.push((
                    tz.loc,
                    format!(
                        "`{path}.time_zone` must be an IANA time zone such as Europe/Berlin or UTC"
                    ),
                ));
                DEFAULT_SCHEDULE_TIME_ZONE
            }),
        };
        let tables = check_schedule_tables(r, e, &path, sync);
        if r.issues.len() == before {
            out.push(ScheduleConfig {
                name: name.to_string(),
                cron: e.cron.value.trim().to_string(),
                time_zone,
                job: e.job.value,
                tables,
                catch_up: e.catch_up.as_ref().is_some_and(|c| c.value),
            });
        }
    }
    out
}

/// `notify:`: at least one target, unique names, http(s) URLs (plain http on loopback only, the
/// payload names the pipeline's failures), a `secret` for webhooks only, bounded numbers.
fn check_notify(r: &mut Reader, n: &NotifyFile) -> NotifyConfig {
    let mut names: HashMap<&str, Loc> = HashMap::new();
    let mut targets = Vec::new();
    for (i, t) in n.targets.iter().enumerate() {
        let path = format!("notify.targets[{i}]");
        let name = t.name.value.trim();
        if let Some(first) = names.insert(name, t.name.loc) {
            r.issues.push((
                t.name.loc,
                format!("notify target `{name}` is defined twice (first at {first})"),
            ));
        }
        check_notify_url(r, t, &path);
        let (from, to) = check_email(r, t, &path);
        targets.push(NotifyTarget {
            name: name.to_string(),
            kind: t.kind.value,
            url: t.url.value.clone(),
            secret: t.secret.as_ref().map(|s| s.value.clone()),
            from,
            to,
        });
    }
    let mut bounded = |v: &Option<Sp<u64>>, key: &str, min: u64, default: u64| match v {
        Some(v) if v.value < min => {
            r.issues
                .push((v.loc, format!("`notify.{key}` must be at least {min}")));
            default
        }
        Some(v) => v.value,
        None => default,
    };
    NotifyConfig {
        targets,
        window: Duration::from_secs(bounded(
            &n.window_s,
            "window_s",
            10,
            DEFAULT_NOTIFY_WINDOW_S,
        )),
        dead_letters: bounded(
            &n.dead_letters,
            "dead_letters",
            1,
            DEFAULT_NOTIFY_DEAD_LETTERS,
        ),
        slot_lag_bytes: bounded(
            &n.slot_lag_bytes,
            "slot_lag_bytes",
            1,
            DEFAULT_NOTIFY_SLOT_LAG_BYTES,
        ),
        drift_threshold: bounded(
            &n.drift_threshold,
            "drift_threshold",
            0,
            DEFAULT_NOTIFY_DRIFT_THRESHOLD,
        ),
    }
}

/// A target's URL scheme fits its kind; a `secret` only on webhooks, where it is required. The
/// URL is a secret (it often embeds a token or password): never echoed.
fn check_notify_url(r: &mut Reader, t: &NotifyTargetFile, path: &str) {
    let url = Url::parse(t.url.value.expose()).ok();
    let ok = url
        .as_ref()
        .is_some_and(|u| match (t.kind.value, u.scheme()) {
            (NotifyKind::Email, "smtps") => true,
            (NotifyKind::Email, "smtp") => u.host_str().is_some(),
            (NotifyKind::Email, _) => false,
            (_, "https") => true,
            (_, "http") => is_loopback_host(u),
            _ => false,
        });
    if !ok {
        let want = match t.kind.value {
            NotifyKind::Email => "an smtp:// (STARTTLS) or smtps:// URL with a host",
            _ => "an https:// URL (http:// only on a loopback host)",
        };
        r.issues
            .push((t.url.loc, format!("`{path}.url` must be {want}")));
    }
    match (&t.secret, t.kind.value) {
        (Some(s), kind) if kind != NotifyKind::Webhook => r.issues.push((
            s.loc,
            format!("`{path}.secret` is only for `kind: webhook`"),
        )),
        (None, NotifyKind::Webhook) => r.issues.push((
            t.kind.loc,
            format!("`{path}`: a webhook needs `secret` (the HMAC-SHA256 key receivers check)"),
        )),
        _ => {}
    }
}

/// `from` and `to` (addresses lettre parses), required for `email` and refused otherwise.
fn check_email(r: &mut Reader, t: &NotifyTargetFile, path: &str) -> (Option<String>, Vec<String>) {
    if t.kind.value != NotifyKind::Email {
        for (loc, key) in [
            (t.from.as_ref().map(|f| f.loc), "from"),
            (t.to.as_ref().map(|f| f.loc), "to"),
        ] {
            if let Some(loc) = loc {
                r.issues
                    .push((loc, format!("`{path}.{key}` is only for `kind: email`")));
            }
        }
        return (None, Vec::new());
    }
    let mut address = |s: &Sp<String>, key: &str| {
        let ok = s.value.trim().parse::<lettre::message::Mailbox>().is_ok();
        if !ok {
            r.issues
                .push((s.loc, format!("`{path}.{key}` is not an email address")));
        }
        s.value.trim().to_string()
    };
    let from = t.from.as_ref().map(|f| address(f, "from"));
    let to: Vec<String> =
        t.to.iter()
            .flat_map(|to| to.value.iter())
            .map(|a| address(a, "to"))
            .collect();
    if from.is_none() || to.is_empty() {
        r.issues.push((
            t.kind.loc,
            format!("`{path}`: an email target needs `from` and at least one `to`"),
        ));
    }
    (from, to)
}

/// A `resnapshot` schedule's tables (default: every synced one); other jobs take none.
fn check_schedule_tables(
    r: &mut Reader,
    e: &ScheduleFile,
    path: &str,
    sync: &[SyncFile],
) -> Vec<String> {
    // Query sources are read in full by their own polls, never re-snapshotted.
    let synced = || {
        sync.iter()
            .filter_map(|s| s.table.as_ref())
            .map(|t| t.value.trim().to_string())
    };
    let Some(tables) = &e.tables else {
        return match e.job.value {
            JobKind::Resnapshot => synced().collect(),
            _ => Vec::new(),
        };
    };
    if e.job.value != JobKind::Resnapshot {
        r.issues.push((
            tables.loc,
            format!("`{path}.tables` is only for `job: resnapshot`"),
        ));
        return Vec::new();
    }
    if tables.value.is_empty() {
        r.issues.push((
            tables.loc,
            format!("`{path}.tables`: name at least one table"),
        ));
    }
    let mut out = Vec::new();
    for t in &tables.value {
        let name = t.value.trim();
        if synced().any(|s| s == name) {
            out.push(name.to_string());
        } else {
            r.issues.push((
                t.loc,
                format!(
                    "`{path}.tables`: `{}` is not a synced table",
                    name.escape_debug()
                ),
            ));
        }
    }
    out
}

/// `drift.budget_share` in (0, 1]: a check must be able to spend something, and never more
/// than the whole budget.
fn check_drift(r: &mut Reader, d: Option<&DriftFile>) -> DriftConfig {
    let mut drift = DriftConfig::default();
    if let Some(s) = d.and_then(|d| d.budget_share.as_ref()) {
        if s.value > 0.0 && s.value <= 1.0 {
            drift.budget_share = s.value;
        } else {
            r.issues.push((
                s.loc,
                format!(
                    "`drift.budget_share` must be above 0 and at most 1 (a share of \
                     `graph.ru_per_minute`), found {}",
                    s.value
                ),
            ));
        }
    }
    drift
}

fn check_guard(r: &mut Reader, g: Option<&GuardFile>) -> GuardConfig {
    let mut guard = GuardConfig::default();
    let Some(g) = g else {
        return guard;
    };
    let mut bounded = |v: &Option<Sp<u64>>, key: &str, min: u64, max: u64| -> Option<u64> {
        let v = v.as_ref()?;
        if (min..=max).contains(&v.value) {
            Some(v.value)
        } else {
            r.issues.push((
                v.loc,
                format!("`guard.{key}` must be between {min} and {max}"),
            ));
            None
        }
    };
    if let Some(ms) = bounded(&g.schema_wait_ms, "schema_wait_ms", 100, 86_400_000) {
        guard.schema_wait_ms = ms;
    }
    for (dir, file, out) in [
        ("push", &g.push, &mut guard.push),
        ("pull", &g.pull, &mut guard.pull),
    ] {
        if let Some(f) = file {
            check_delete_guard(&mut bounded, dir, f, out);
        }
    }
    let Some(d) = &g.dead_letters else {
        return guard;
    };
    let dl = &mut guard.dead_letters;
    if let Some(n) = bounded(&d.consecutive, "dead_letters.consecutive", 0, 1_000_000) {
        dl.consecutive = n as u32;
    }
    if let Some(n) = bounded(&d.window, "dead_letters.window", 0, 1_000_000) {
        dl.window = n as u32;
    }
    if let Some(n) = bounded(&d.max_percent, "dead_letters.max_percent", 1, 100) {
        dl.max_percent = n as u8;
    }
    guard
}

/// `guard.push` / `guard.pull` (the accidental-delete guard); `bounded` reports out-of-range
/// values.
fn check_delete_guard(
    bounded: &mut impl FnMut(&Option<Sp<u64>>, &str, u64, u64) -> Option<u64>,
    dir: &str,
    f: &DeleteGuardFile,
    out: &mut DeleteGuard,
) {
    if let Some(e) = &f.enabled {
        out.enabled = e.value;
    }
    let key = |k: &str| format!("{dir}.{k}");
    if let Some(n) = bounded(&f.max_deletes, &key("max_deletes"), 1, 10_000_000) {
        out.max_deletes = n as u32;
    }
    if let Some(n) = bounded(&f.max_percent, &key("max_percent"), 1, 100) {
        out.max_percent = n as u8;
    }
    if let Some(n) = bounded(&f.min_deletes, &key("min_deletes"), 0, 10_000_000) {
        out.min_deletes = n as u32;
    }
    if let Some(n) = bounded(&f.window_ms, &key("window_ms"), 1_000, 86_400_000) {
        out.window_ms = n;
    }
    if let Some(n) = bounded(&f.hold_ms, &key("hold_ms"), 0, 600_000) {
        out.hold_ms = n;
    }
}

/// A PostgreSQL URL whose TLS options `crate::pg` understands. The message never echoes the
/// URL: it may hold a password.
fn check_pg_url(r: &mut Reader, url: &Sp<Secret>, key: &str) -> Option<PgUrl> {
    match PgUrl::parse(url.value.expose().trim()) {
        Ok(parsed) => match crate::pg::TlsOptions::parse(parsed.expose()) {
            Ok(_) => Some(parsed),
            Err(why) => {
                r.issues.push((url.loc, format!("`{key}`: {why}")));
                None
            }
        },
        Err(why) => {
            r.issues.push((url.loc, format!("`{key}` {why}")));
            None
        }
    }
}

/// `source`: exactly one of `url` and `urls`; every URL valid (sslmode rules of
/// [`check_pg_url`]) and no instance listed twice.
fn check_source(r: &mut Reader, s: &SourceFile) -> Option<SourceConfig> {
    let urls: Vec<(&Sp<Secret>, String)> = match (&s.url, &s.urls) {
        (Some(u), None) => vec![(u, "source.url".to_owned())],
        (None, Some(list)) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, u)| (u, format!("source.urls[{i}]")))
            .collect(),
        (None, Some(_)) => {
            r.issues.push((
                s.loc,
                "`source.urls` is empty: list the primary first".into(),
            ));
            return None;
        }
        (Some(_), Some(_)) | (None, None) => {
            r.issues.push((
                s.loc,
                "`source` needs exactly one of `url` (one instance) and `urls` (primary first, \
                 then standbys)"
                    .into(),
            ));
            return None;
        }
    };
    let before = r.issues.len();
    let mut parsed: Vec<PgUrl> = Vec::with_capacity(urls.len());
    for (u, key) in &urls {
        let Some(url) = check_pg_url(r, u, key) else {
            continue;
        };
        if let Some(first) = parsed.iter().position(|p| p.server() == url.server()) {
            r.issues.push((
                u.loc,
                format!("`{key}` names the same server as `source.urls[{first}]`"),
            ));
        }
        parsed.push(url);
    }
    if r.issues.len() != before {
        return None;
    }
    let mut parsed = parsed.into_iter();
    Some(SourceConfig {
        url: parsed.next()?,
        standbys: parsed.collect(),
    })
}

/// Checks a file and builds its config. Problems go to `r.issues`; `Some` only without any.
pub fn validate(r: &mut Reader, f: &PartialFile) -> Option<(PipelineConfig, CrossRefs)> {
    let before = r.issues.len();
    if let Some(v) = &f.version
        && v.value != 1
    {
        r.issues.push((
            v.loc,
            format!(
                "unsupported `version` {}; this SyncBridge reads version 1",
                v.value
            ),
        ));
    }
    if let Some(n) = &f.name
        && !is_pipeline_name(&n.value)
    {
        r.issues.push((
            n.loc,
            format!(
                "invalid pipeline `name` `{}`: expected [a-z][a-z0-9_]{{0,40}}",
                n.value.escape_debug()
            ),
        ));
    }
    let source = f.source.as_ref().and_then(|s| check_source(r, s));
    let name = f.name.as_ref().map(|n| n.value.clone()).unwrap_or_default();
    let log = match &f.log {
        None => Some(LogConfig::Embedded {
            path: PathBuf::from(DEFAULT_EMBEDDED_LOG_DIR).join(&name),
        }),
        Some(log) => check_log(r, log, &name),
    };
    let graph = f.graph.as_ref().and_then(|g| check_graph(r, g));
    let sync = check_sync(r, &f.sync);
    let control = match f.control.as_ref().and_then(|c| c.listen.as_ref()) {
        None => DEFAULT_CONTROL_LISTEN.parse::<SocketAddr>().ok(),
        Some(l) => match l.value.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                r.issues.push((
                    l.loc,
                    "`control.listen` must be an ip:port socket address, e.g. 127.0.0.1:8088"
                        .into(),
                ));
                None
            }
        },
    };
    let tokens = check_tokens(r, f.control.as_ref().and_then(|c| c.tokens.as_deref()));
    let meta_url = match f.control.as_ref().and_then(|c| c.meta_url.as_ref()) {
        None => source.as_ref().map(|s| s.url.clone()),
        Some(u) => check_pg_url(r, u, "control.meta_url"),
    };
    let audit_retention = check_retention(
        r,
        f.control.as_ref().and_then(|c| c.audit_retention.as_ref()),
    );
    let guard = check_guard(r, f.guard.as_ref());
    let labels = check_labels(r, f.labels.as_ref());
    let schedules = check_schedules(r, &f.schedules, &f.sync);
    let notify = f.notify.as_ref().map(|n| check_notify(r, n));
    let drift = check_drift(r, f.drift.as_ref());
    if let (Some(g), Some((entries, _))) = (f.graph.as_ref(), sync.as_ref()) {
        check_sharepoint_rest(r, g, entries);
    }
    if r.issues.len() != before {
        return None;
    }
    let (sync, lists) = sync?;
    let config = PipelineConfig {
        name,
        source: source?,
        log: log?,
        graph: graph?,
        sync,
        control: ControlConfig {
            listen: control?,
            tokens,
            meta_url: meta_url?,
            audit_retention,
        },
        guard,
        labels,
        schedules,
        notify,
        drift,
    };
    // `version` and `name` are present when the reader reported nothing.
    f.version.as_ref()?;
    Some((
        config,
        CrossRefs {
            name: f.name.as_ref()?.loc,
            lists,
            tables: f.sync.iter().map(|e| e.source().loc).collect(),
            fields: f
                .sync
                .iter()
                .map(|e| e.fields.0.iter().map(|(c, _)| c.loc).collect())
                .collect(),
        },
    ))
}

fn check_log(r: &mut Reader, log: &LogFile, name: &str) -> Option<LogConfig> {
    match (&log.embedded, &log.kafka) {
        (Some(_), Some(_)) => {
            r.issues.push((
                log.loc,
                "`log` has both `embedded` and `kafka`; keep exactly one".into(),
            ));
            None
        }
        (Some(EmbeddedFile { path: Some(p) }), None) if p.value.trim().is_empty() => {
            r.issues
                .push((p.loc, "`log.embedded.path` must not be empty".into()));
            None
        }
        (Some(EmbeddedFile { path: Some(p) }), None) => Some(LogConfig::Embedded {
            path: PathBuf::from(&p.value),
        }),
        (Some(EmbeddedFile { path: None }), None) | (None, None) => Some(LogConfig::Embedded {
            path: PathBuf::from(DEFAULT_EMBEDDED_LOG_DIR).join(name),
        }),
        (None, Some(k)) => check_kafka(r, k),
    }
}

fn check_kafka(r: &mut Reader, k: &KafkaFile) -> Option<LogConfig> {
    let mut ok = true;
    let mut brokers = Vec::new();
    let list: Vec<(String, Loc)> = match &k.brokers {
        Brokers::List(items) => items
            .iter()
            .map(|b| (b.value.trim().to_owned(), b.loc))
            .collect(),
        Brokers::Csv(s) => s
            .value
            .split(',')
            .map(|b| (b.trim().to_owned(), s.loc))
            .collect(),
    };
    for (b, loc) in list {
        let port_ok = b
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if port_ok {
            brokers.push(b);
        } else {
            r.issues
                .push((loc, format!("`log.kafka.brokers`: `{b}` is not host:port")));
            ok = false;
        }
    }
    let topic_prefix = match &k.topic_prefix {
        None => DEFAULT_TOPIC_PREFIX.to_owned(),
        Some(p) => {
            let valid = !p.value.is_empty()
                && p.value.len() <= 100
                && p.value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                r.issues.push((p.loc, "`log.kafka.topic_prefix` may only hold a-z A-Z 0-9 . _ - (Kafka topic characters)".into()));
                ok = false;
            }
            p.value.clone()
        }
    };
    let schema_registry = match &k.schema_registry {
        None => None,
        Some(s) => {
            let url = http_url(r, s, "log.kafka.schema_registry");
            ok &= url.is_some();
            url.map(SchemaRegistryConfig::from_url)
        }
    };
    ok.then_some(LogConfig::Kafka {
        brokers,
        topic_prefix,
        schema_registry,
    })
}

fn check_graph(r: &mut Reader, g: &GraphFile) -> Option<GraphConfig> {
    let before = r.issues.len();
    let tenant = g.tenant.value.trim().to_owned();
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    {
        r.issues.push((
            g.tenant.loc,
            "`graph.tenant` must be a tenant domain (contoso.onmicrosoft.com) or id".into(),
        ));
    }
    let base_url = match &g.base_url {
        Some(s) => http_url(r, s, "graph.base_url"),
        None => Url::parse(DEFAULT_GRAPH_BASE_URL).ok(),
    };
    // `{tenant}` is substituted here so consumers get a ready URL.
    let token_url = match &g.token_url {
        Some(s) => {
            let s = Sp {
                value: s.value.replace("{tenant}", &tenant),
                loc: s.loc,
                interpolated: s.interpolated,
            };
            http_url(r, &s, "graph.token_url")
        }
        None => Url::parse(&DEFAULT_TOKEN_URL.replace("{tenant}", &tenant)).ok(),
    };
    let client_id = g.client_id.value.trim().to_owned();
    if uuid::Uuid::try_parse(&client_id).is_err() {
        r.issues.push((
            g.client_id.loc,
            "`graph.client_id` must be the application (client) id, a GUID".into(),
        ));
    }
    let credential = credential(r, g);
    let site = site_ref(r, g);
    let ru_per_minute = match &g.ru_per_minute {
        None => DEFAULT_RU_PER_MINUTE,
        Some(ru) => match u32::try_from(ru.value) {
            Ok(v) if v > 0 => v,
            _ => {
                r.issues.push((
                    ru.loc,
                    format!("`graph.ru_per_minute` must be between 1 and {}", u32::MAX),
                ));
                0
            }
        },
    };
    let sharepoint_url = g
        .sharepoint_url
        .as_ref()
        .map(|s| http_url(r, s, "graph.sharepoint_url"));
    if r.issues.len() != before {
        return None;
    }
    Some(GraphConfig {
        sharepoint_url: sharepoint_url.flatten(),
        hyperlinks: g
            .hyperlinks
            .as_ref()
            .map_or(HyperlinkWrites::SharepointRest, |h| h.value),
        base_url: base_url?,
        token_url: token_url?,
        tenant,
        client_id,
        credential: credential?,
        site: site?,
        ru_per_minute,
    })
}

/// `graph.site` or `graph.team` (the parser made sure there is exactly one).
fn site_ref(r: &mut Reader, g: &GraphFile) -> Option<SiteRef> {
    if let Some(t) = &g.team {
        let team = t.value.trim();
        if team.is_empty() {
            r.issues.push((
                t.loc,
                "`graph.team` is empty: give the Team's name or group id".into(),
            ));
            return None;
        }
        return Some(SiteRef::Team(team.to_owned()));
    }
    let g_site = g.site.as_ref()?;
    let site = g_site.value.trim().to_owned();
    let (host, path) = site
        .split_once(":/")
        .map_or((site.as_str(), None), |(h, p)| (h, Some(p)));
    // A dotted hostname: catches `https://host/...` (host `https`) and bare words.
    let host_ok = host.contains('.')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    if !host_ok || path.is_some_and(|p| p.is_empty() || p.starts_with('/') || p.contains(':')) {
        r.issues.push((
            g_site.loc,
            "`graph.site` must be `hostname:/server-relative-path`, e.g. contoso.sharepoint.com:/sites/ops".into(),
        ));
        return None;
    }
    Some(SiteRef::Site(site))
}

/// The sign-in credential (the parser made sure there is exactly one).
fn credential(r: &mut Reader, g: &GraphFile) -> Option<GraphCredential> {
    let empty = |r: &mut Reader, loc: Loc, what: &str| {
        r.issues.push((loc, format!("`graph.{what}` is empty")));
    };
    if let Some(s) = &g.client_secret {
        if s.value.expose().is_empty() {
            empty(r, s.loc, "client_secret");
            return None;
        }
        return Some(GraphCredential::ClientSecret(s.value.clone()));
    }
    let c = g.client_certificate.as_ref()?;
    let cert = c.cert.value.trim();
    if cert.is_empty() {
        empty(r, c.cert.loc, "client_certificate.cert");
    }
    if c.key.value.expose().trim().is_empty() {
        empty(r, c.key.loc, "client_certificate.key");
    }
    if cert.is_empty() || c.key.value.expose().trim().is_empty() {
        return None;
    }
    Some(GraphCredential::ClientCertificate {
        cert: PathBuf::from(cert),
        key: c.key.value.clone(),
    })
}

/// Hyperlink fields are written through SharePoint REST (Graph refuses them), which refuses
/// app-only tokens obtained with a client secret: such a mapping needs a certificate.
fn check_sharepoint_rest(r: &mut Reader, g: &GraphFile, entries: &[SyncEntry]) {
    let Some(secret) = &g.client_secret else {
        return;
    };
    if g.hyperlinks
        .as_ref()
        .is_some_and(|h| h.value == HyperlinkWrites::Graph)
    {
        return;
    }
    let rest_fields: Vec<String> = entries
        .iter()
        .flat_map(|e| {
            e.fields
                .iter()
                .filter(|f| f.written_by_sharepoint_rest())
                .map(move |f| format!("`{}` of {}", f.field, e.table))
        })
        .collect();
    if rest_fields.is_empty() {
        return;
    }
    r.issues.push((
        secret.loc,
        format!(
            "hyperlink field {} is written through SharePoint REST, which refuses app-only \
             tokens from a client secret (\"Unsupported app only token\"): use \
             `graph.client_certificate` instead of `graph.client_secret`",
            rest_fields.join(", ")
        ),
    ));
}

type SyncOut = (Vec<SyncEntry>, Vec<(String, Loc)>);

fn check_sync(r: &mut Reader, entries: &[SyncFile]) -> Option<SyncOut> {
    let before = r.issues.len();
    // Every list any entry writes to (lookups may point at any of them), first use wins.
    let mut lists: Vec<(String, Loc)> = Vec::new();
    let mut owner: HashMap<String, (usize, Loc)> = HashMap::new();
    let mut tables: HashMap<String, Loc> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let mut targets = vec![&e.list];
        targets.extend(e.routes.iter().flatten().map(|rt| &rt.list));
        for l in targets {
            let key = list_key(&l.value);
            match owner.get(&key) {
                Some(&(j, first)) if j != i => r.issues.push((
                    l.loc,
                    format!("list `{}` is already synced by sync[{j}] (at {first}); a list belongs to one entry", l.value.trim()),
                )),
                Some(_) => {}
                None => {
                    owner.insert(key, (i, l.loc));
                    lists.push((l.value.trim().to_owned(), l.loc));
                }
            }
        }
        // A query source's name comes from its list (checked unique above).
        if let Some(t) = &e.table {
            let table = t.value.trim().to_owned();
            if let Some(first) = tables.get(&table) {
                r.issues.push((
                    t.loc,
                    format!("table `{table}` is synced twice (first at {first})"),
                ));
            } else {
                tables.insert(table, t.loc);
            }
        }
    }
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if let Some(entry) = check_entry(r, e, &format!("sync[{i}]"), &owner) {
            out.push(entry);
        }
    }
    (r.issues.len() == before).then_some((out, lists))
}

fn check_list_name(r: &mut Reader, l: &Sp<String>, path: &str) {
    let t = l.value.trim();
    if t.is_empty() || t.chars().count() > MAX_LIST_TITLE_LEN {
        r.issues.push((
            l.loc,
            format!("`{path}` must be a list display name of 1 to {MAX_LIST_TITLE_LEN} characters"),
        ));
    }
}

fn check_entry(
    r: &mut Reader,
    e: &SyncFile,
    path: &str,
    lists: &HashMap<String, (usize, Loc)>,
) -> Option<SyncEntry> {
    let before = r.issues.len();
    let table = match &e.table {
        Some(t) => check_table(r, t, path),
        None => Some(query_table_name(&e.list.value)),
    };
    check_list_name(r, &e.list, &format!("{path}.list"));
    let key = e.key.as_ref().map(|k| check_key(r, k, path));
    let query = check_query(r, e, key.as_deref(), path);
    let pull = check_pull(r, e, key.as_deref(), path);
    let routes = check_routes(r, e, path);
    let fields = check_fields(r, e, path, lists, pull.enabled);
    if r.issues.len() != before {
        return None;
    }
    Some(SyncEntry {
        table: table?,
        query,
        list: e.list.value.trim().to_owned(),
        key,
        fields,
        routes,
        pull,
        conflict: e
            .conflict
            .as_ref()
            .map_or(ConflictPolicy::SourceWins, |c| c.value),
    })
}

/// `table:`, schema-qualified.
fn check_table(r: &mut Reader, t: &Sp<String>, path: &str) -> Option<TableName> {
    match t.value.trim().split_once('.') {
        Some((QUERY_SCHEMA, _)) => {
            r.issues.push((
                t.loc,
                format!(
                    "`{path}.table`: schema `{QUERY_SCHEMA}` is reserved for the names of query \
                     sources' events; sync that table through a `query:` instead"
                ),
            ));
            None
        }
        Some((schema, name)) if is_pg_ident(schema) && is_pg_ident(name) => Some(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        }),
        _ => {
            r.issues.push((
                t.loc,
                format!(
                    "`{path}.table` must be schema-qualified, like public.projects (found `{}`)",
                    t.value.escape_debug()
                ),
            ));
            None
        }
    }
}

/// `query:` with `poll:` (and `key:`), or neither of `poll:` without a query.
fn check_query(
    r: &mut Reader,
    e: &SyncFile,
    key: Option<&[String]>,
    path: &str,
) -> Option<QuerySource> {
    let Some(q) = &e.query else {
        if let Some(p) = &e.poll {
            r.issues
                .push((p.loc, format!("`{path}.poll` is only for a `query` source")));
        }
        return None;
    };
    let sql = q.value.trim().trim_end_matches(';').trim_end().to_owned();
    let starts = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if !matches!(starts.as_str(), "select" | "with" | "table" | "values") {
        r.issues.push((
            q.loc,
            format!("`{path}.query` must be a SELECT (or WITH … SELECT)"),
        ));
    }
    if key.is_none() {
        r.issues.push((
            q.loc,
            format!("`{path}.key` is required with `query`: the columns that identify a row"),
        ));
    }
    let Some(p) = &e.poll else {
        r.issues.push((
            q.loc,
            format!(
                "`{path}.poll` is required with `query` (`every` and `full: true` or `cursor`)"
            ),
        ));
        return None;
    };
    let duration = |r: &mut Reader, d: &Sp<String>, what: &str| {
        let parsed = parse_duration(&d.value).filter(|d| !d.is_zero());
        if parsed.is_none() {
            r.issues.push((
                d.loc,
                format!(
                    "`{path}.poll.{what}` must be a duration like 2s, 5m, 1h or 1d (more than 0)"
                ),
            ));
        }
        parsed
    };
    let every = duration(r, &p.every, "every");
    let full = p.full.as_ref().is_some_and(|f| f.value);
    match (&p.cursor, full) {
        (None, false) => r.issues.push((p.loc, format!("`{path}.poll` needs `full: true` or a `cursor`"))),
        (Some(_), true) => r.issues.push((p.loc, format!("`{path}.poll`: `full: true` and `cursor` exclude each other (a cursor's full reads are `full_every`)"))),
        _ => {}
    }
    let full_every = p.full_every.as_ref().and_then(|d| {
        if p.cursor.is_none() {
            r.issues.push((d.loc, format!("`{path}.poll.full_every` is only for a `cursor` (`full: true` reads everything each time)")));
        }
        duration(r, d, "full_every")
    });
    let cursor = p.cursor.as_ref().map(|c| check_cursor(r, c, path));
    Some(QuerySource {
        sql,
        every: every?,
        cursor,
        full_every,
    })
}

/// `poll.cursor`: a column name; `lookback` (timestamp cursors only) a duration.
fn check_cursor(r: &mut Reader, c: &CursorFile, path: &str) -> QueryCursor {
    if !is_pg_ident(&c.column.value) {
        r.issues.push((
            c.column.loc,
            format!(
                "`{path}.poll.cursor.column`: `{}` is not a column name",
                c.column.value.escape_debug()
            ),
        ));
    }
    let lookback = match &c.lookback {
        None => DEFAULT_QUERY_LOOKBACK,
        Some(l) if c.kind.value == CursorKind::Incrementing => {
            r.issues.push((
                l.loc,
                format!(
                    "`{path}.poll.cursor.lookback` is for `kind: timestamp`; an incrementing \
                     cursor's late commits are found by `full_every`"
                ),
            ));
            DEFAULT_QUERY_LOOKBACK
        }
        Some(l) => parse_duration(&l.value).unwrap_or_else(|| {
            r.issues.push((
                l.loc,
                format!("`{path}.poll.cursor.lookback` must be a duration like 30s or 5m"),
            ));
            DEFAULT_QUERY_LOOKBACK
        }),
    };
    QueryCursor {
        column: c.column.value.clone(),
        kind: c.kind.value,
        lookback,
    }
}

/// `key:`: at least one column, each a column name, none twice.
fn check_key(r: &mut Reader, k: &Sp<Vec<Sp<String>>>, path: &str) -> Vec<String> {
    if k.value.is_empty() {
        r.issues.push((
            k.loc,
            format!("`{path}.key` must name at least one column (omit it to use the primary key)"),
        ));
    }
    let mut seen: Vec<&str> = Vec::new();
    for c in &k.value {
        if !is_pg_ident(&c.value) {
            r.issues.push((
                c.loc,
                format!(
                    "`{path}.key`: `{}` is not a column name",
                    c.value.escape_debug()
                ),
            ));
        } else if seen.contains(&c.value.as_str()) {
            r.issues.push((
                c.loc,
                format!("`{path}.key`: column `{}` is listed twice", c.value),
            ));
        }
        seen.push(&c.value);
    }
    k.value.iter().map(|c| c.value.clone()).collect()
}

/// `pull:` with its defaults.
fn check_pull(r: &mut Reader, e: &SyncFile, key: Option<&[String]>, path: &str) -> PullConfig {
    let enabled = e.pull.as_ref().and_then(|p| p.enabled.as_ref());
    // A query source is push-only: off by default, refused when asked for.
    let default = DEFAULT_PULL_ENABLED && e.query.is_none();
    if let Some(q) = &e.query
        && e.pull.is_some()
        && enabled.is_none_or(|b| b.value)
    {
        let loc = enabled.map_or(q.loc, |b| b.loc);
        r.issues.push((
            loc,
            format!(
                "`{path}.pull`: a query source is push-only: an item edited in the list has no \
                 row to be written back to (a query's rows belong to the tables behind it); \
                 remove `pull` or set `enabled: false`"
            ),
        ));
    }
    PullConfig {
        enabled: enabled.map_or(default, |b| b.value),
        interval_ms: match e.pull.as_ref().and_then(|p| p.interval_ms.as_ref()) {
            None => DEFAULT_PULL_INTERVAL_MS,
            Some(ms) => {
                if ms.value < MIN_PULL_INTERVAL_MS {
                    r.issues.push((
                        ms.loc,
                        format!(
                            "`{path}.pull.interval_ms` must be at least {MIN_PULL_INTERVAL_MS}"
                        ),
                    ));
                }
                ms.value
            }
        },
        on_delete: check_on_delete(
            r,
            e.pull.as_ref().and_then(|p| p.on_delete.as_ref()),
            key,
            &format!("{path}.pull.on_delete"),
        ),
    }
}

/// `routes:`: each a list name and a CEL expression that compiles.
fn check_routes(r: &mut Reader, e: &SyncFile, path: &str) -> Vec<Route> {
    let mut routes = Vec::new();
    for (i, rt) in e.routes.iter().flatten().enumerate() {
        let rpath = format!("{path}.routes[{i}]");
        check_list_name(r, &rt.list, &format!("{rpath}.list"));
        let when = rt.when.value.trim();
        if when.is_empty() {
            r.issues
                .push((rt.when.loc, format!("`{rpath}.when` is empty")));
        } else if let Err(errors) = cel::Program::compile(when) {
            let first = errors.errors.first();
            let detail = first.map_or_else(
                || "syntax error".to_owned(),
                |e| format!("{} (expression {}:{})", e.msg, e.pos.0, e.pos.1),
            );
            r.issues.push((
                rt.when.loc,
                format!("`{rpath}.when` is not a valid CEL expression: {detail}"),
            ));
        }
        routes.push(Route {
            when: when.to_owned(),
            list: rt.list.value.trim().to_owned(),
        });
    }
    routes
}

/// `fields:`: column names, each field mapped once, pull_only only where pull is on.
fn check_fields(
    r: &mut Reader,
    e: &SyncFile,
    path: &str,
    lists: &HashMap<String, (usize, Loc)>,
    pull_enabled: bool,
) -> Vec<FieldMapping> {
    let mut fields: Vec<FieldMapping> = Vec::new();
    let mut field_locs: Vec<Loc> = Vec::new();
    for (column, value) in &e.fields.0 {
        let fpath = format!("{path}.fields.{}", column.value);
        if !is_pg_ident(&column.value) {
            r.issues.push((
                column.loc,
                format!(
                    "`{fpath}`: `{}` is not a column name",
                    column.value.escape_debug()
                ),
            ));
        }
        let (mapping, loc) = match value {
            FieldValueFile::Name(n) => (
                FieldMapping {
                    column: column.value.clone(),
                    field: n.value.trim().to_owned(),
                    field_type: FieldType::Text,
                    direction: Direction::Bidirectional,
                    choices: Vec::new(),
                    lookup_list: None,
                    conflict: None,
                },
                n.loc,
            ),
            FieldValueFile::Spec(s) => match check_field_spec(r, column, s, &fpath, lists) {
                Some(m) => (m, s.field.loc),
                None => continue,
            },
        };
        check_field_name(r, &mapping, loc, &fpath);
        if let Some(j) = fields
            .iter()
            .position(|f| f.field.eq_ignore_ascii_case(&mapping.field))
        {
            r.issues.push((
                loc,
                format!(
                    "`{fpath}`: field `{}` is already mapped from column `{}` (at {})",
                    mapping.field, fields[j].column, field_locs[j]
                ),
            ));
        }
        if mapping.direction == Direction::PullOnly && !pull_enabled {
            r.issues.push((
                loc,
                format!("`{fpath}` is pull_only but pull is disabled for this entry"),
            ));
        }
        fields.push(mapping);
        field_locs.push(loc);
    }
    fields
}

/// A value for messages: backquoted and shortened, or hidden when it came from `${VAR}`.
fn shown(value: &str, interpolated: bool) -> String {
    if interpolated {
        return "a value from the environment".into();
    }
    let mut text: String = value.chars().take(40).collect();
    if value.chars().count() > 40 {
        text.push('…');
    }
    format!("`{}`", text.escape_debug())
}

/// `delete`, `ignore` or `soft:<column>`; `<column>` is a PostgreSQL identifier that is not one
/// of the entry's `key` columns (overwriting the key would lose the row's identity).
fn check_on_delete(
    r: &mut Reader,
    value: Option<&Sp<String>>,
    key: Option<&[String]>,
    path: &str,
) -> OnDelete {
    let Some(v) = value else {
        return DEFAULT_ON_DELETE;
    };
    let text = v.value.trim();
    let column = match text {
        "delete" => return OnDelete::Delete,
        "ignore" => return OnDelete::Ignore,
        _ => match text.strip_prefix("soft:") {
            Some(column) => column,
            None => {
                r.issues.push((
                    v.loc,
                    format!(
                        "`{path}`: unknown value {}; expected one of: delete, ignore, soft:<column>",
                        shown(text, v.interpolated)
                    ),
                ));
                return DEFAULT_ON_DELETE;
            }
        },
    };
    if column.is_empty() {
        r.issues.push((
            v.loc,
            format!("`{path}`: `soft:` needs a column, e.g. `soft:deleted_at`"),
        ));
    } else if !is_pg_ident(column) {
        r.issues.push((
            v.loc,
            format!(
                "`{path}`: soft-delete column {} is not a column name (ASCII letters, digits, _, $, not starting with a digit or $; at most {MAX_PG_IDENT_LEN} bytes)",
                shown(column, v.interpolated)
            ),
        ));
    } else if key.is_some_and(|k| k.iter().any(|c| c == column)) {
        r.issues.push((
            v.loc,
            format!(
                "`{path}`: soft-delete column {} is a key column; the key identifies the row and cannot mark it deleted",
                shown(column, v.interpolated)
            ),
        ));
    }
    OnDelete::Soft {
        column: column.to_owned(),
    }
}

fn check_field_name(r: &mut Reader, m: &FieldMapping, loc: Loc, path: &str) {
    let name = &m.field;
    if !is_ident(name, &[]) || name.len() > MAX_FIELD_NAME_LEN {
        r.issues.push((
            loc,
            format!(
                "`{path}`: `{}` is not a SharePoint internal name (ASCII letters, digits, _; at most {MAX_FIELD_NAME_LEN} characters)",
                name.escape_debug()
            ),
        ));
    } else if name.eq_ignore_ascii_case(SYNC_KEY_FIELD) {
        r.issues.push((loc, format!("`{path}`: `{SYNC_KEY_FIELD}` is SyncBridge's own hidden column and cannot be mapped")));
    } else if let Some(sys) = SYSTEM_FIELDS.iter().find(|s| s.eq_ignore_ascii_case(name))
        && m.direction != Direction::PullOnly
    {
        r.issues.push((
                loc,
                format!("`{path}`: `{sys}` is a read-only SharePoint system field; map it with `direction: pull_only`"),
            ));
    }
}

fn check_field_spec(
    r: &mut Reader,
    column: &Sp<String>,
    s: &FieldSpecFile,
    path: &str,
    lists: &HashMap<String, (usize, Loc)>,
) -> Option<FieldMapping> {
    let before = r.issues.len();
    let field_type = s.field_type.as_ref().map_or(FieldType::Text, |t| t.value);
    let direction = s
        .direction
        .as_ref()
        .map_or(Direction::Bidirectional, |d| d.value);
    let needs_choices = matches!(field_type, FieldType::Choice | FieldType::MultiChoice);
    let mut choices = Vec::new();
    match (&s.choices, needs_choices) {
        (None, true) => r.issues.push((
            s.loc,
            format!("`{path}`: type {field_type} needs a non-empty `choices` list"),
        )),
        (Some(c), true) if c.value.is_empty() => r.issues.push((
            c.loc,
            format!("`{path}`: type {field_type} needs a non-empty `choices` list"),
        )),
        (Some(c), false) => r.issues.push((
            c.loc,
            format!("`{path}`: `choices` only applies to choice and multichoice fields"),
        )),
        (Some(c), true) => {
            for v in &c.value {
                let t = v.value.trim();
                if t.is_empty() {
                    r.issues
                        .push((v.loc, format!("`{path}.choices`: empty choice")));
                } else if choices.iter().any(|x: &String| x == t) {
                    r.issues
                        .push((v.loc, format!("`{path}.choices`: `{t}` is listed twice")));
                } else {
                    choices.push(t.to_owned());
                }
            }
        }
        (None, false) => {}
    }
    let lookup_list = match (&s.list, field_type == FieldType::Lookup) {
        (None, true) => {
            r.issues.push((
                s.loc,
                format!(
                    "`{path}`: a lookup field needs `list`, the synced list its values point into"
                ),
            ));
            None
        }
        (Some(l), true) => {
            if !lists.contains_key(&list_key(&l.value)) {
                r.issues.push((
                    l.loc,
                    format!(
                        "`{path}.list`: `{}` is not a list synced by this pipeline",
                        l.value.trim()
                    ),
                ));
            }
            Some(l.value.trim().to_owned())
        }
        (Some(l), false) => {
            r.issues.push((
                l.loc,
                format!("`{path}`: `list` only applies to lookup fields"),
            ));
            None
        }
        (None, false) => None,
    };
    if let Some(c) = &s.conflict
        && direction != Direction::Bidirectional
    {
        r.issues.push((c.loc, format!("`{path}`: `conflict` only applies to bidirectional fields (this one is {direction})")));
    }
    if r.issues.len() != before {
        return None;
    }
    Some(FieldMapping {
        column: column.value.clone(),
        field: s.field.value.trim().to_owned(),
        field_type,
        direction,
        choices,
        lookup_list,
        conflict: s.conflict.as_ref().map(|c| c.value),
    })
}
