//! The meta-store: schema `syncbridge_meta` in the database of `control.meta_url` (default: the
//! pipeline's `source.url`), holding the run history the control plane serves.
//!
//! Invariant: the meta-store is a projection, never the truth. Run events are appended to the
//! `<prefix>.<pipeline>.runs` topic first ([`runs::RunRecorder`]); the [`projector`] writes them
//! to the schema idempotently, storing its position in the schema itself, so a dropped schema is
//! rebuilt from the log on the next start. [`migrate`] creates and upgrades the schema;
//! [`api`] serves `GET /runs` and `GET /runs/{id}`.
//!
//! The ledger audit (`crate::process::audit`) takes the same way: the processor appends its
//! records to `<prefix>.<pipeline>.audit`, a second projector writes `syncbridge_meta.audit`
//! (pruned after `control.audit_retention`), and [`history`] serves a row's lineage at
//! `GET /pipelines/{name}/rows/{table}/{key}/history`.
//!
//! Drift reports too ([`drift`]): a check's full report goes to `<prefix>.<pipeline>.drift`, a
//! third projector writes `syncbridge_meta.drift_reports` and `drift_differences`.

pub mod api;
pub mod capture_runs;
pub mod drift;
pub mod history;
pub mod migrate;
pub mod projector;
pub mod runs;

use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::Client;
use tracing::warn;

use crate::log::LogError;
use crate::pg::PgConnectError;

pub use api::{MetaRegistry, routes};
pub use projector::{Projection, Projector};
pub use runs::{RunCounts, RunEvent, RunKind, RunRecorder, RunStatus, runs_topic};

/// The meta-store's schema.
pub const SCHEMA: &str = "syncbridge_meta";

/// Failure of the meta-store. Connection and log failures are retryable (the database or broker
/// may come back); a migration refinery rejects (an applied file was edited) and an undecodable
/// run event are not.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("meta-store: cannot connect (control.meta_url): {0}")]
    Connect(#[from] PgConnectError),
    #[error("meta-store: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("meta-store migration failed: {0}")]
    Migrate(String),
    #[error("runs topic: {0}")]
    Log(#[from] LogError),
    #[error("run event: {0}")]
    Decode(String),
}

impl MetaError {
    pub fn is_retryable(&self) -> bool {
        match self {
            MetaError::Connect(e) => e.is_retryable(),
            MetaError::Db(e) => e.as_db_error().is_none() || e.is_closed(),
            MetaError::Log(e) => e.is_retryable(),
            MetaError::Migrate(_) | MetaError::Decode(_) => false,
        }
    }
}

/// A connection to the meta-store database, re-opened when it broke.
#[derive(Debug)]
pub struct MetaDb {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl MetaDb {
    pub fn new(url: &str) -> Arc<Self> {
        Arc::new(Self {
            url: url.to_string(),
            client: Mutex::new(None),
        })
    }

    /// The database URL (with its password: never log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The shared client, connecting first when there is none or it closed.
    pub async fn client(&self) -> Result<Arc<Client>, MetaError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let client = Arc::new(connect(&self.url).await?);
        *guard = Some(client.clone());
        Ok(client)
    }
}

/// A new connection of its own (the driver task runs until the client is dropped).
pub async fn connect(url: &str) -> Result<Client, MetaError> {
    let (client, connection) = crate::pg::connect(url).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!("meta-store connection ended: {e}");
        }
    });
    Ok(client)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
