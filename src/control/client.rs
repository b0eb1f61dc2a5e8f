//! The CLI side of the pipeline API: `syncbridge snapshot` asks the process that runs the pipeline
//! (it owns the replication slot) over its control plane; `syncbridge conflicts list|resolve`
//! asks its processor (it owns the ledger); `syncbridge resume` restarts a paused pipeline's
//! processor; `syncbridge cursors [reset]` shows and moves its cursors; `syncbridge guard` shows
//! and decides the deletes the accidental-delete guard holds.
//!
//! Every request carries `Authorization: Bearer $SYNCBRIDGE_API_TOKEN` when that variable is
//! set (the server's `control.tokens`); a 401 or 403 becomes [`ClientError::Unauthorized`],
//! which says what to set.

use std::net::SocketAddr;
use std::time::Duration;

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no SyncBridge process is listening on {addr} (control.listen of the pipeline): start it \
         with `syncbridge run <pipeline.yaml>` first; the running process owns the replication \
         slot and takes the snapshot ({source})"
    )]
    NotListening {
        addr: SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status (404 unknown pipeline/table, 409 busy, …);
    /// `kind` is the machine-readable reason when the server gives one.
    #[error("{message} (HTTP {status})")]
    Refused {
        status: u16,
        message: String,
        kind: Option<String>,
    },
    /// 401 (no or unknown token) or 403 (a `read` token on a route that changes something).
    #[error("{}", unauthorized_message(*.status, .message))]
    Unauthorized { status: u16, message: String },
    #[error("control plane request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("re-snapshot {id} of {table} failed: {error}")]
    SnapshotFailed {
        id: String,
        table: String,
        error: String,
    },
}

impl ClientError {
    /// No process runs the pipeline at that address (nothing listens, or the process there
    /// runs other pipelines): the CLI may then read the pipeline's log itself.
    pub fn not_running(&self) -> bool {
        match self {
            ClientError::NotListening { .. } => true,
            ClientError::Refused {
                status: 404,
                kind: Some(k),
                ..
            } => k == "unknown_pipeline",
            _ => false,
        }
    }
}

/// The environment variable the CLI reads its API token from.
pub const TOKEN_ENV: &str = "SYNCBRIDGE_API_TOKEN";

fn unauthorized_message(status: u16, server: &str) -> String {
    let set = std::env::var_os(TOKEN_ENV).is_some_and(|t| !t.is_empty());
    let hint = match (status, set) {
        (403, _) => format!("the token in {TOKEN_ENV} has role `read`; use an `operate` token"),
        (_, true) => {
            format!("{TOKEN_ENV} is not one of the pipeline's control.tokens; check its value")
        }
        (_, false) => format!(
            "the control plane needs a token: set {TOKEN_ENV} to one of the pipeline's \
             control.tokens"
        ),
    };
    format!("{server} (HTTP {status}): {hint}")
}

fn client() -> Result<reqwest::Client, ClientError> {
    client_with_timeout(Duration::from_secs(30))
}

fn client_with_timeout(timeout: Duration) -> Result<reqwest::Client, ClientError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var(TOKEN_ENV)
        && !token.trim().is_empty()
    {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::Refused {
                status: 0,
                message: format!("{TOKEN_ENV} holds characters not allowed in an HTTP header"),
                kind: None,
            })?;
        // Keeps the token out of debug output of the request.
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .default_headers(headers)
        .build()?)
}

fn url(addr: SocketAddr, pipeline: &str) -> String {
    format!("http://{addr}/pipelines/{pipeline}/snapshot")
}

async fn answer(
    addr: SocketAddr,
    r: Result<reqwest::Response, reqwest::Error>,
) -> Result<serde_json::Value, ClientError> {
    let resp = match r {
        Ok(resp) => resp,
        Err(source) if source.is_connect() => {
            return Err(ClientError::NotListening { addr, source });
        }
        Err(e) => return Err(e.into()),
    };
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if status.is_success() {
        Ok(body)
    } else {
        // `detail` is the RFC 9457 member; `error` the older one (same text).
        let message = body
            .get("detail")
            .or_else(|| body.get("error"))
            .and_then(|e| e.as_str())
            .unwrap_or("request refused")
            .to_string();
        if matches!(status.as_u16(), 401 | 403) {
            return Err(ClientError::Unauthorized {
                status: status.as_u16(),
                message,
            });
        }
        Err(ClientError::Refused {
            status: status.as_u16(),
            message,
            kind: body
                .get("kind")
                .and_then(|k| k.as_str())
                .map(str::to_string),
        })
    }
}

/// `POST /pipelines/{pipeline}/resume`: the pause it ended (`{"resumed": true, "pause": …}`);
/// HTTP 409 when the pipeline is not paused.
pub async fn resume(addr: SocketAddr, pipeline: &str) -> Result<serde_json::Value, ClientError> {
    let r = client()?
        .post(format!("http://{addr}/pipelines/{pipeline}/resume"))
        .send()
        .await;
    answer(addr, r).await
}

/// `POST /pipelines/{pipeline}/snapshot?table=…`: the queued status (with its `id`).
pub async fn request_snapshot(
    addr: SocketAddr,
    pipeline: &str,
    table: &str,
) -> Result<serde_json::Value, ClientError> {
    let target =
        url::Url::parse_with_params(&url(addr, pipeline), [("table", table)]).map_err(|e| {
            ClientError::Refused {
                status: 0,
                message: format!("invalid pipeline name or table: {e}"),
                kind: None,
            }
        })?;
    let r = client()?.post(target).send().await;
    answer(addr, r).await
}

/// `GET /pipelines/{pipeline}/snapshot`: the latest re-snapshot's status.
pub async fn snapshot_status(
    addr: SocketAddr,
    pipeline: &str,
) -> Result<serde_json::Value, ClientError> {
    let r = client()?.get(url(addr, pipeline)).send().await;
    answer(addr, r).await
}

/// Polls until the re-snapshot `id` is done (its final status) or failed (an error), showing
/// each status polled to `on_status` (progress: rows and chunks so far).
pub async fn wait_for_snapshot(
    addr: SocketAddr,
    pipeline: &str,
    id: &str,
    mut on_status: impl FnMut(&serde_json::Value),
) -> Result<serde_json::Value, ClientError> {
    loop {
        let s = snapshot_status(addr, pipeline).await?;
        on_status(&s);
        let field = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        if field("id") != id {
            return Err(ClientError::SnapshotFailed {
                id: id.to_string(),
                table: field("table"),
                error: "another re-snapshot replaced it (was the process restarted?)".into(),
            });
        }
        match field("state").as_str() {
            "done" => return Ok(s),
            "failed" => {
                return Err(ClientError::SnapshotFailed {
                    id: id.to_string(),
                    table: field("table"),
                    error: field("error"),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// How long the CLI waits for a resolution: the processor finishes its current flush first and
/// then writes to Graph and PostgreSQL.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(120);

/// `GET /pipelines/{pipeline}/conflicts[?parked=true]`: the recorded conflicts with their state.
pub async fn list_conflicts(
    addr: SocketAddr,
    pipeline: &str,
    parked: bool,
) -> Result<Vec<crate::pull::ConflictView>, ClientError> {
    let mut target = url::Url::parse(&format!("http://{addr}/pipelines/{pipeline}/conflicts"))
        .map_err(|e| ClientError::Refused {
            status: 0,
            message: format!("invalid pipeline name: {e}"),
            kind: None,
        })?;
    if parked {
        target.query_pairs_mut().append_pair("parked", "true");
    }
    let r = client()?.get(target).send().await;
    let body = answer(addr, r).await?;
    serde_json::from_value(body).map_err(|e| ClientError::Refused {
        status: 200,
        message: format!("unreadable conflict list: {e}"),
        kind: None,
    })
}

/// `POST /pipelines/{pipeline}/conflicts/{id}/resolve?take=…&by=…`: the resolved conflict.
pub async fn resolve_conflict(
    addr: SocketAddr,
    pipeline: &str,
    id: &str,
    take: crate::pull::Take,
    by: Option<&str>,
) -> Result<crate::pull::ConflictView, ClientError> {
    let mut target =
        url::Url::parse(&format!("http://{addr}/")).map_err(|e| ClientError::Refused {
            status: 0,
            message: format!("invalid address: {e}"),
            kind: None,
        })?;
    target
        .path_segments_mut()
        .map_err(|()| ClientError::Refused {
            status: 0,
            message: "invalid address".into(),
            kind: None,
        })?
        .clear()
        .extend(["pipelines", pipeline, "conflicts", id, "resolve"]);
    target.query_pairs_mut().append_pair("take", take.as_str());
    if let Some(by) = by {
        target.query_pairs_mut().append_pair("by", by);
    }
    let r = client_with_timeout(RESOLVE_TIMEOUT)?
        .post(target)
        .send()
        .await;
    let body = answer(addr, r).await?;
    serde_json::from_value(body).map_err(|e| ClientError::Refused {
        status: 200,
        message: format!("unreadable answer: {e}"),
        kind: None,
    })
}

/// `GET /pipelines/{pipeline}/dlq?limit=…`: the dead letters not yet replayed (`entries`, each
/// with its `offset` and `dead_letter`) and how many are `pending`.
pub async fn dlq_list(
    addr: SocketAddr,
    pipeline: &str,
    limit: usize,
) -> Result<crate::control::pipelines::DlqPage, ClientError> {
    let r = client()?
        .get(format!(
            "http://{addr}/pipelines/{pipeline}/dlq?limit={limit}"
        ))
        .send()
        .await;
    let body = answer(addr, r).await?;
    serde_json::from_value(body).map_err(|e| ClientError::Refused {
        status: 200,
        message: format!("unreadable dead-letter list: {e}"),
        kind: None,
    })
}

/// `POST /pipelines/{pipeline}/dlq/replay`: `{"replayed": n, "run_id": …}`.
pub async fn dlq_replay(
    addr: SocketAddr,
    pipeline: &str,
) -> Result<serde_json::Value, ClientError> {
    let r = client()?
        .post(format!("http://{addr}/pipelines/{pipeline}/dlq/replay"))
        .send()
        .await;
    answer(addr, r).await
}

/// How long the CLI waits for a cursor reset: stopping the processor flushes what it read, and a
/// delta poller takes a reset between two polls.
const RESET_TIMEOUT: Duration = Duration::from_secs(300);

/// `GET /pipelines/{pipeline}/cursors`: the slot, consumer groups and delta links.
pub async fn cursors(addr: SocketAddr, pipeline: &str) -> Result<serde_json::Value, ClientError> {
    let r = client()?
        .get(format!("http://{addr}/pipelines/{pipeline}/cursors"))
        .send()
        .await;
    answer(addr, r).await
}

/// `POST /pipelines/{pipeline}/cursors/reset` with `body` (the target, `dry_run`, `by`): the
/// blast radius, and for a real reset its `run_id`.
pub async fn reset_cursor(
    addr: SocketAddr,
    pipeline: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let r = client_with_timeout(RESET_TIMEOUT)?
        .post(format!("http://{addr}/pipelines/{pipeline}/cursors/reset"))
        .json(body)
        .send()
        .await;
    answer(addr, r).await
}

/// How long the CLI waits for a drift check or heal: it pages through every list at no more than
/// a share of the RU budget, so a large pipeline takes minutes.
const DRIFT_TIMEOUT: Duration = Duration::from_secs(3600);

/// `POST /pipelines/{pipeline}/drift` (or `/drift/heal`): the report, once the run is done.
pub async fn drift(
    addr: SocketAddr,
    pipeline: &str,
    heal: bool,
) -> Result<serde_json::Value, ClientError> {
    let path = if heal { "drift/heal" } else { "drift" };
    let r = client_with_timeout(DRIFT_TIMEOUT)?
        .post(format!("http://{addr}/pipelines/{pipeline}/{path}"))
        .send()
        .await;
    answer(addr, r).await
}

/// `GET /pipelines/{pipeline}/guard`: the accidental-delete guard per direction.
pub async fn guard_status(
    addr: SocketAddr,
    pipeline: &str,
) -> Result<serde_json::Value, ClientError> {
    let r = client()?
        .get(format!("http://{addr}/pipelines/{pipeline}/guard"))
        .send()
        .await;
    answer(addr, r).await
}

/// `POST /pipelines/{pipeline}/guard/{direction}/{decision}` (`allow` or `discard`): how many
/// held deletes it released or dropped.
pub async fn guard_decide(
    addr: SocketAddr,
    pipeline: &str,
    direction: &str,
    decision: &str,
) -> Result<serde_json::Value, ClientError> {
    let r = client()?
        .post(format!(
            "http://{addr}/pipelines/{pipeline}/guard/{direction}/{decision}"
        ))
        .send()
        .await;
    answer(addr, r).await
}
