//! Mapping editor API (issue 16): `GET /pipelines/{name}/config` answers the pipeline file's YAML
//! (secrets redacted) with its parsed mapping; `PUT /pipelines/{name}/config` (operate) writes a
//! new version of the file and reloads the pipeline through the hot-reload path
//! ([`crate::reload`]), answering the reload's outcome.
//!
//! A write is accepted only when the process was started with `syncbridge run
//! --allow-config-writes` (else 409 `config_writes_disabled`: the process's state, not the token's
//! scope, refuses it) and the file and its folder are
//! writable (else 409 `not_writable`). The body (`yaml`, `base_version`) is checked before anything
//! is written: `base_version` must be the `version` the GET answered (409 `changed_meanwhile`
//! otherwise: someone else saved), then the text is validated exactly as `syncbridge validate`
//! does (all the files of the process, with this one replaced): every problem comes back in one
//! 422 problem (`problems`), nothing written. On success the file is replaced atomically (a temp
//! file in its folder, renamed over it) and a reload runs; when the reload refuses the change or
//! finds the file invalid (a key changed, a pipeline renamed), the old content is written back and
//! the answer is 409 `reload_refused` with the reasons; when the new config does not start (the
//! pipeline runs the old one again), likewise 409 `reload_failed`. So the file and the running
//! pipeline do not disagree because of this route (short of a reload that does not answer in
//! [`RELOAD_WAIT`]: 200 with outcome `unknown`).
//!
//! Redaction: every secret value the file holds (`source.url`'s and `control.meta_url`'s
//! passwords, `graph.client_secret` or the certificate key, schema-registry password, API tokens,
//! notify URLs and secrets) is replaced in the text by `<redacted:N>`; a PUT puts the values back
//! for the placeholders it still holds. Values from `${ENV}` are not in the text at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;

use super::problem::{ApiError, Problem};
use crate::config::{self, LogConfig, PipelineConfig};

/// How long a PUT waits for its reload: a reload drains the pipeline as shutdown does (a batch in
/// flight is written first), which takes seconds; beyond this something is stuck.
const RELOAD_WAIT: Duration = Duration::from_secs(120);

/// What a reload did (the answer of a reload request made through the API).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReloadOutcome {
    /// `applied`, `unchanged`, `invalid`, `refused`, `failed` (the new config did not start;
    /// the old one runs again) or, in a PUT's answer, `unknown` (no answer from the reload loop:
    /// the process is stopping, or the reload takes longer than the PUT waits).
    pub outcome: String,
    /// Per restarted pipeline, what changed.
    pub changed: BTreeMap<String, Vec<String>>,
    /// Why it was not applied.
    pub error: Option<String>,
}

/// A reload asked by the API; the runtime answers on `reply` once it is done.
#[derive(Debug)]
pub struct ReloadRequest {
    pub reply: oneshot::Sender<ReloadOutcome>,
}

/// The pipeline files of the process and the way to reload them; empty until the runtime
/// [`ConfigEditors::enable`]s it (a process without files answers 404 unknown pipeline).
#[derive(Debug, Clone, Default)]
pub struct ConfigEditors {
    inner: Arc<Mutex<Option<Arc<Editor>>>>,
}

#[derive(Debug)]
pub(super) struct Editor {
    /// Every file of the process in load order, with its pipeline's name.
    files: Vec<(String, PathBuf)>,
    allow_writes: bool,
    reload: mpsc::Sender<ReloadRequest>,
    /// One write at a time: a second would validate against a file about to change.
    writing: tokio::sync::Mutex<()>,
}

impl ConfigEditors {
    /// Serves the files `files` (pipeline name, path; in load order); writes only with `allow_writes`.
    pub fn enable(
        &self,
        files: Vec<(String, PathBuf)>,
        allow_writes: bool,
        reload: mpsc::Sender<ReloadRequest>,
    ) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Editor {
            files,
            allow_writes,
            reload,
            writing: tokio::sync::Mutex::new(()),
        }));
    }

    /// The file `pipeline` was loaded from, when the process runs from files.
    pub fn path_of(&self, pipeline: &str) -> Option<PathBuf> {
        self.get(pipeline).ok().map(|(_, path)| path)
    }

    /// The editor of `pipeline`'s file and its path; 404 when no pipeline of that name runs.
    pub(super) fn get(&self, pipeline: &str) -> Result<(Arc<Editor>, PathBuf), ApiError> {
        let editor = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        editor
            .and_then(|e| {
                let path = e.files.iter().find(|(n, _)| n == pipeline)?.1.clone();
                Some((e, path))
            })
            .ok_or_else(|| ApiError::unknown_pipeline(pipeline))
    }
}

/// The config routes with their own state: merge them into the control router.
pub fn routes(editors: ConfigEditors) -> Router {
    Router::new()
        .route("/pipelines/{name}/config", get(get_config).put(put_config))
        .with_state(editors)
}

/// A pipeline's file as the editor shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineFile {
    pub pipeline: String,
    pub file: String,
    /// The file's text, each secret value replaced by `<redacted:N>`.
    pub yaml: String,
    /// Pass back as `base_version` when saving (a hash of the file's text).
    pub version: String,
    /// The source database's name (for `GET /catalog/{database}/tables/{table}`).
    pub database: String,
    /// The parsed `sync:` entries: table, list, key, fields (column, field, type, direction), routes.
    #[schema(value_type = Vec<Object>)]
    pub mapping: serde_json::Value,
    /// Whether a PUT may write it; `why_not` says why not.
    pub writable: bool,
    pub why_not: Option<String>,
}

/// The body of a PUT.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ConfigWrite {
    /// The new text; `<redacted:N>` placeholders of the GET are put back.
    pub yaml: String,
    /// The `version` of the GET this edit started from.
    pub base_version: String,
}

/// The answer of a PUT that wrote the file.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigWritten {
    /// The file's new version.
    pub version: String,
    pub reload: ReloadOutcome,
}

fn version(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..12])
}

/// Every secret value `p` holds as its file spells it, each once, longest first (so a secret
/// containing another is replaced whole).
pub(super) fn secret_values(p: &PipelineConfig) -> Vec<Secret> {
    let mut out: Vec<Secret> = Vec::new();
    for url in [p.source.url.expose(), p.control.meta_url.expose()] {
        if let Some(pw) = url::Url::parse(url)
            .ok()
            .and_then(|u| u.password().map(str::to_string))
        {
            // In its URL only (`:password@`): a short password such as `postgres` is also the
            // user and the scheme, which stay readable.
            out.push(Secret::between(pw, ":", "@"));
        }
    }
    let plain = |s: &config::Secret| Secret::between(s.expose().to_string(), "", "");
    match &p.graph.credential {
        config::GraphCredential::ClientSecret(s) => out.push(plain(s)),
        config::GraphCredential::ClientCertificate { key, .. } => out.push(plain(key)),
    }
    if let LogConfig::Kafka {
        schema_registry: Some(r),
        ..
    } = &p.log
        && let Some(pw) = &r.password
    {
        out.push(plain(pw));
    }
    out.extend(p.control.tokens.iter().map(|t| plain(&t.token)));
    for t in p.notify.iter().flat_map(|n| &n.targets) {
        out.push(plain(&t.url));
        out.extend(t.secret.iter().map(plain));
    }
    out.retain(|s| !s.value.is_empty());
    out.sort_by(|a, b| {
        b.value
            .len()
            .cmp(&a.value.len())
            .then_with(|| a.value.cmp(&b.value))
    });
    out.dedup();
    out
}

/// A secret value and the text around it where it is replaced.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Secret {
    value: String,
    before: &'static str,
    after: &'static str,
}

impl Secret {
    fn between(value: String, before: &'static str, after: &'static str) -> Self {
        Self {
            value,
            before,
            after,
        }
    }
}

fn placeholder(i: usize) -> String {
    format!("<redacted:{}>", i + 1)
}

/// `text` with each of `secrets` replaced by its placeholder.
fn redact(text: &str, secrets: &[Secret]) -> String {
    secrets
        .iter()
        .enumerate()
        .fold(text.to_string(), |t, (i, s)| {
            t.replace(
                &format!("{}{}{}", s.before, s.value, s.after),
                &format!("{}{}{}", s.before, placeholder(i), s.after),
            )
        })
}

/// `text` with each placeholder replaced by its secret again; a placeholder of no secret is an error.
pub(super) fn unredact(text: &str, secrets: &[Secret]) -> Result<String, String> {
    let mut out = text.to_string();
    for (i, s) in secrets.iter().enumerate().rev() {
        out = out.replace(&placeholder(i), &s.value);
    }
    match out.find("<redacted:") {
        Some(at) => Err(format!(
            "`{}>` is not a placeholder this file's GET answered",
            out[at..].split('>').next().unwrap_or("<redacted:")
        )),
        None => Ok(out),
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unreadable", e.to_string())
}

/// The file's text and its parsed config (as the running process would load it now).
pub(super) fn read(path: &Path) -> Result<(String, PipelineConfig), ApiError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))?;
    let env = |name: &str| std::env::var(name).ok();
    let config = config::load_str(&path.display().to_string(), &text, &env)
        .map_err(|r| unavailable(format!("the file does not load now:\n{r}")))?;
    Ok((text, config))
}

/// Why the file cannot be replaced, if it cannot: opened for writing (without changing it) and a
/// file created in its folder (the rename's temp file).
fn not_writable(path: &Path) -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new().append(true).open(path) {
        return Some(format!("{} is not writable: {e}", path.display()));
    }
    TempBeside::create(path).err()
}

/// A new file beside `path` (same folder, so same file system for the rename), removed on drop
/// unless renamed.
struct TempBeside(PathBuf);

impl TempBeside {
    fn create(path: &Path) -> Result<Self, String> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.{}.edit", uuid::Uuid::new_v4().simple()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("cannot create a file beside {}: {e}", path.display()))?;
        Ok(Self(tmp))
    }

    fn write(&self, text: &str) -> Result<(), String> {
        use std::io::Write;
        let mut f = std::fs::File::create(&self.0).map_err(|e| e.to_string())?;
        f.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())
    }
}

impl Drop for TempBeside {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[utoipa::path(get, path = "/pipelines/{name}/config", tag = "config",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "The pipeline file (secrets redacted) and its parsed mapping", body = PipelineFile),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The file cannot be read or does not load", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get_config(
    State(editors): State<ConfigEditors>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::Json<PipelineFile>, ApiError> {
    let (editor, path) = editors.get(&name)?;
    let (text, config) = read(&path)?;
    let why_not = if editor.allow_writes {
        not_writable(&path)
    } else {
        Some(WRITES_OFF.to_string())
    };
    Ok(axum::Json(PipelineFile {
        pipeline: name,
        file: path.display().to_string(),
        yaml: redact(&text, &secret_values(&config)),
        version: version(&text),
        database: config.source.url.database(),
        mapping: serde_json::to_value(&config.sync).unwrap_or_default(),
        writable: why_not.is_none(),
        why_not,
    }))
}

const WRITES_OFF: &str = "the process was not started with `syncbridge run --allow-config-writes`";

#[utoipa::path(put, path = "/pipelines/{name}/config", tag = "config",
    params(("name" = String, Path, description = "Pipeline name")),
    request_body(content = ConfigWrite, description = "The new file text and the version it was edited from"),
    responses(
        (status = 200, description = "Written atomically and reloaded: the reload's outcome", body = ConfigWritten),
        (status = 400, description = "A bad body (`invalid-params` names the field)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown pipeline", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Writes are off (`--allow-config-writes`), the file is not writable, it changed since `base_version`, or the reload refused it or its config did not start (the old text was put back)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The text has problems (`problems`, as `syncbridge validate` lists them); nothing written", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn put_config(
    State(editors): State<ConfigEditors>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<axum::Json<ConfigWritten>, ApiError> {
    let (editor, path) = editors.get(&name)?;
    if !editor.allow_writes {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "config_writes_disabled",
            format!("writing pipeline files is off: {WRITES_OFF}"),
        ));
    }
    let write: ConfigWrite = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_param(
            "yaml",
            format!("the body must be {{\"yaml\", \"base_version\"}}: {e}"),
        )
    })?;
    let _one = editor.writing.lock().await;
    let (old, config) = read(&path)?;
    if write.base_version != version(&old) {
        return Err(conflict(
            "changed_meanwhile",
            "the file changed since it was read: load it again and redo the edit",
        ));
    }
    if let Some(why) = not_writable(&path) {
        return Err(conflict("not_writable", &why));
    }
    let new = unredact(&write.yaml, &secret_values(&config))
        .map_err(|e| ApiError::bad_param("yaml", e))?;
    validate(&editor, &path, &new)?;
    replace(&path, &new).map_err(|e| conflict("not_writable", &e))?;
    let reload = request_reload(&editor).await;
    let kind = match reload.outcome.as_str() {
        "invalid" | "refused" => "reload_refused",
        // The new config did not start: the pipeline runs the old one again.
        "failed" => "reload_failed",
        _ => {
            return Ok(axum::Json(ConfigWritten {
                version: version(&new),
                reload,
            }));
        }
    };
    // The running pipeline keeps the old config: so does the file.
    let restored = replace(&path, &old).err();
    let mut detail = format!(
        "the reload did not take the new file, the old one was written back: {}",
        reload.error.as_deref().unwrap_or("")
    );
    if let Some(e) = restored {
        detail.push_str(&format!(" (writing the old text back failed too: {e})"));
    }
    Err(conflict(kind, &detail))
}

fn conflict(kind: &str, detail: &str) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, kind, detail)
}

/// Loads every file of the process as `syncbridge validate` would, `path` replaced by `text`
/// (written to a temp file beside it, so cross-file checks and relative paths behave the same):
/// this file's pipeline as loaded, or every problem (`file:line:col` naming `path`).
pub(super) fn load_edited(
    editor: &Editor,
    path: &Path,
    text: &str,
) -> Result<Result<config::LocatedPipeline, Vec<config::Problem>>, ApiError> {
    let tmp = TempBeside::create(path).map_err(|e| conflict("not_writable", &e))?;
    tmp.write(text).map_err(|e| conflict("not_writable", &e))?;
    let files: Vec<PathBuf> = editor
        .files
        .iter()
        .map(|(_, f)| if f == path { tmp.0.clone() } else { f.clone() })
        .collect();
    let (tmp_name, real) = (tmp.0.display().to_string(), path.display().to_string());
    Ok(match config::load_files_located(&files) {
        Ok(pipelines) => {
            let mut mine = pipelines
                .into_iter()
                .find(|p| p.file == tmp_name)
                .ok_or_else(|| unavailable("the edited file did not load as a pipeline"))?;
            mine.file = real;
            Ok(mine)
        }
        Err(report) => Err(report
            .problems
            .into_iter()
            .map(|p| config::Problem {
                file: p.file.replace(&tmp_name, &real),
                message: p.message.replace(&tmp_name, &real),
                ..p
            })
            .collect()),
    })
}

/// [`load_edited`]'s problems as one 422 problem (nothing written).
fn validate(editor: &Editor, path: &Path, text: &str) -> Result<(), ApiError> {
    let Err(problems) = load_edited(editor, path, text)? else {
        return Ok(());
    };
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    Err(ApiError {
        param: Some(super::problem::InvalidParam {
            name: "yaml".into(),
            reason: problems.join("\n"),
        }),
        ..ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            format!(
                "{} problem(s), nothing written:\n{}",
                problems.len(),
                problems.join("\n")
            ),
        )
    })
}

/// Replaces `path` with `text` atomically: a temp file in the same folder (same file system),
/// given the old file's permissions, flushed, then renamed over it.
fn replace(path: &Path, text: &str) -> Result<(), String> {
    let tmp = TempBeside::create(path)?;
    tmp.write(text)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp.0, meta.permissions());
    }
    std::fs::rename(&tmp.0, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
}

async fn request_reload(editor: &Editor) -> ReloadOutcome {
    // `unknown`: the file is written, whether the pipeline took it is not known here.
    let failed = |why: &str| ReloadOutcome {
        outcome: "unknown".into(),
        changed: BTreeMap::new(),
        error: Some(why.into()),
    };
    let (reply, answer) = oneshot::channel();
    if editor.reload.send(ReloadRequest { reply }).await.is_err() {
        return failed("the process is shutting down: the file is written, not reloaded");
    }
    match tokio::time::timeout(RELOAD_WAIT, answer).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => failed("the process stopped before the reload answered"),
        Err(_) => failed("the reload did not answer in time; see the process log and GET /runs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_every_secret_and_comes_back_exactly() {
        let text = "source: { url: 'postgres://postgres:postgres@h/db' }\ngraph:\n  client_secret: hush-123\ncontrol:\n  tokens:\n    - { name: a, token: tok-hush-123-x, role: read }\n";
        let secrets = vec![
            Secret::between("tok-hush-123-x".into(), "", ""),
            Secret::between("hush-123".into(), "", ""),
            Secret::between("postgres".into(), ":", "@"),
        ];
        let shown = redact(text, &secrets);
        assert!(!shown.contains("hush"), "{shown}");
        assert!(shown.contains("token: <redacted:1>"), "{shown}");
        // Only the URL's password: the scheme and the user are the same word and stay.
        assert!(
            shown.contains("'postgres://postgres:<redacted:3>@h/db'"),
            "{shown}"
        );
        assert_eq!(unredact(&shown, &secrets).unwrap(), text);
        let err = unredact("x: <redacted:9>", &secrets).unwrap_err();
        assert!(err.contains("<redacted:9>"), "{err}");
    }

    #[test]
    fn secret_values_finds_the_files_secrets() {
        let yaml = "version: 1\nname: p\nsource: { url: 'postgres://u:pw%21x@h/db' }\ngraph:\n  tenant: 00000000-0000-0000-0000-000000000002\n  client_id: 00000000-0000-0000-0000-000000000001\n  client_secret: the-client-secret\n  site: 'contoso.sharepoint.com:/sites/x'\ncontrol:\n  tokens:\n    - { name: ops, token: the-api-token, role: operate }\nsync:\n  - table: public.a\n    list: A\n    fields: { title: Title }\n";
        let p = config::load_str("p.yaml", yaml, &|_| None).unwrap();
        let secrets = secret_values(&p);
        for s in ["the-client-secret", "the-api-token", "pw%21x"] {
            assert!(
                secrets.iter().any(|v| v.value == s),
                "{s} not in {secrets:?}"
            );
        }
        let shown = redact(yaml, &secrets);
        for s in ["the-client-secret", "the-api-token", "pw%21x"] {
            assert!(!shown.contains(s), "{s} shown: {shown}");
        }
        assert_eq!(unredact(&shown, &secrets).unwrap(), yaml);
    }

    #[test]
    fn replace_keeps_the_permissions_and_leaves_no_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, "old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace(&f, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "new");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    const FILE: &str = "version: 1\nname: p\nsource: { url: 'postgres://u:pw@h/db' }\ngraph:\n  tenant: 00000000-0000-0000-0000-000000000002\n  client_id: 00000000-0000-0000-0000-000000000001\n  client_secret: the-client-secret\n  site: 'contoso.sharepoint.com:/sites/x'\ncontrol:\n  tokens:\n    - { name: ops, token: the-api-token, role: operate }\nsync:\n  - table: public.a\n    list: A\n    fields:\n      title: Title\n";

    async fn put(eds: &ConfigEditors, yaml: &str, base: &str) -> Result<ConfigWritten, ApiError> {
        let body = serde_json::json!({ "yaml": yaml, "base_version": base }).to_string();
        put_config(State(eds.clone()), UrlPath("p".into()), Bytes::from(body))
            .await
            .map(|j| j.0)
    }

    #[tokio::test]
    async fn a_write_is_checked_then_written_and_reloaded_or_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, FILE).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let eds = ConfigEditors::default();
        eds.enable(vec![("p".into(), f.clone())], false, tx.clone());
        let err = put(&eds, FILE, "x").await.unwrap_err();
        assert_eq!(
            (err.status.as_u16(), err.kind.as_str()),
            (409, "config_writes_disabled")
        );

        eds.enable(vec![("p".into(), f.clone())], true, tx);
        let got = get_config(State(eds.clone()), UrlPath("p".into()))
            .await
            .unwrap()
            .0;
        assert!(got.writable, "{:?}", got.why_not);
        assert!(!got.yaml.contains("the-api-token") && !got.yaml.contains("the-client-secret"));
        assert_eq!(got.mapping[0]["fields"][0]["field"], "Title");
        let err = put(&eds, &got.yaml, "stale").await.unwrap_err();
        assert_eq!(err.kind, "changed_meanwhile");

        // Every problem at once, named by file and line; nothing written, no temp file left.
        let bad = got.yaml.replace(
            "title: Title",
            "title: Title\n      n: { field: N, type: nonsense }\n      m: { type: text }",
        );
        let err = put(&eds, &bad, &got.version).await.unwrap_err();
        assert_eq!(
            (
                err.status.as_u16(),
                err.param.as_ref().unwrap().name.as_str()
            ),
            (422, "yaml")
        );
        assert!(err.detail.starts_with("2 problem(s)"), "{}", err.detail);
        assert!(
            err.detail.contains(&format!("{}:17:", f.display())),
            "{}",
            err.detail
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap(), FILE);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(rx.try_recv().is_err(), "no reload for a bad file");

        // The process's reload loop: applies the first request, refuses the second, and the
        // third's config does not start.
        tokio::spawn(async move {
            for outcome in ["applied", "refused", "failed"] {
                let req = rx.recv().await.unwrap();
                let _ = req.reply.send(ReloadOutcome {
                    outcome: outcome.into(),
                    changed: BTreeMap::new(),
                    error: (outcome != "applied").then(|| "public.a: key changed".into()),
                });
            }
        });
        // A good edit: written with its secrets back, then reloaded.
        let good = got
            .yaml
            .replace("title: Title", "title: Title\n      note: Note");
        let written = put(&eds, &good, &got.version).await.unwrap();
        assert_eq!(written.reload.outcome, "applied");
        let now = std::fs::read_to_string(&f).unwrap();
        assert_eq!(
            now,
            FILE.replace("title: Title", "title: Title\n      note: Note")
        );
        assert_eq!(written.version, version(&now));
        // A change the reload refuses: the file goes back to what the process runs.
        let again = get_config(State(eds.clone()), UrlPath("p".into()))
            .await
            .unwrap()
            .0;
        let keyed = again
            .yaml
            .replace("    list: A\n", "    list: A\n    key: [title]\n");
        let err = put(&eds, &keyed, &again.version).await.unwrap_err();
        assert_eq!(err.kind, "reload_refused", "{}", err.detail);
        assert!(err.detail.contains("key changed"), "{}", err.detail);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), now);
        let listed = again.yaml.replace("list: A", "list: B");
        let err = put(&eds, &listed, &again.version).await.unwrap_err();
        assert_eq!(err.kind, "reload_failed", "{}", err.detail);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), now);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
