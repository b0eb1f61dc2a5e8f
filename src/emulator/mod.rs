//! An offline Microsoft Graph for SharePoint lists (`syncbridge graph-emulator`).
//!
//! It is an honest stand-in for Microsoft, written from `graph-api.md` and depending on nothing else
//! in the service. Tests start it in-process with [`spawn`]; the CLI runs it with [`run`].
//!
//! What it serves (see `ops/docs/emulator.md` for the full list and every behaviour chosen where
//! Microsoft's documentation is silent):
//!
//! - `POST /{tenant}/oauth2/v2.0/token` — client credentials with a secret or a certificate
//!   (`client_assertion` JWT); JWT-shaped access tokens that expire.
//! - `/v1.0/…` — sites (by path, composite id, group), lists, columns, list items (filter, paging,
//!   eTags, `If-Match`, per-type validation), `items/delta`, and `$batch`.
//! - Throttling by resource units (per app 1-minute and 24-hour budgets, tenant 5-minute budget) with
//!   `Retry-After` and `RateLimit-*` headers; fault injection (429/503/latency/connection resets).
//! - `/_emulator/…` — stats, request log (read-only), faults, limits, token/delta expiry, reset, sites, clock control.
//! - `/` — a read-only HTML view of sites, lists and items.
//!
//! Structure: [`server`] (HTTP, admin, listener) → [`graph`] (routing and handlers, shared by direct
//! calls and `$batch` entries) → [`model`] (data, validation, JSON shapes). [`auth`] issues and checks
//! tokens, [`throttle`] prices requests, [`persist`] keeps `--data` crash-safe, [`filter`] evaluates
//! `$filter`. All state sits behind one mutex ([`state::State`]); a request holds it for
//! microseconds, which meets the throughput goals on two cores (numbers in the docs).

// A 4xx is an ordinary answer here, not an exceptional path: `GraphError` travels by value from the
// handlers to the wire, and boxing it would only add an allocation per error response.
#![allow(clippy::result_large_err)]

mod auth;
mod filter;
mod graph;
pub mod groups;
mod html;
mod model;
mod persist;
mod reply;
mod server;
mod sprest;
mod state;
pub(crate) mod throttle;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use self::auth::{Cert, Client, Identity};
use self::model::Actor;
use self::server::{Clock, Conn, KillableListener, Shared};
use self::state::{FaultSpec, Faults, Settings, State, Stats};
use self::throttle::{Limits, Throttle};

pub const DEFAULT_TENANT: &str = "contoso.onmicrosoft.com";
pub const DEFAULT_CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const DEFAULT_CLIENT_SECRET: &str = "dev-secret";
pub const DEFAULT_SITE: &str = "contoso.sharepoint.com:/sites/dev";
/// The second registered client; its writes look like a person's (Adele Vance, lookup id 7).
pub const DEFAULT_USER_CLIENT_ID: &str = "99999999-8888-7777-6666-555555555555";
pub const DEFAULT_USER_CLIENT_SECRET: &str = "user-secret";

/// Command-line options of `syncbridge graph-emulator`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8900")]
    pub listen: SocketAddr,
    /// Directory for crash-safe persistence; memory only when absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tenant domain (its derived GUID is accepted too).
    #[arg(long, default_value = DEFAULT_TENANT)]
    pub tenant: String,
    /// The registered application's client id.
    #[arg(long, default_value = DEFAULT_CLIENT_ID)]
    pub client_id: String,
    /// The registered application's client secret.
    #[arg(long, default_value = DEFAULT_CLIENT_SECRET)]
    pub client_secret: String,
    /// PEM certificate(s) registered for `client_assertion` sign-in (repeatable).
    #[arg(long = "client-cert")]
    pub client_certs: Vec<PathBuf>,
    /// A second client whose writes are attributed to a person (edit-as-a-person).
    #[arg(long, default_value = DEFAULT_USER_CLIENT_ID)]
    pub user_client_id: String,
    #[arg(long, default_value = DEFAULT_USER_CLIENT_SECRET)]
    pub user_client_secret: String,
    /// Site to provision, `host:/path` (repeatable); default `contoso.sharepoint.com:/sites/dev`.
    #[arg(long = "site")]
    pub sites: Vec<String>,
    /// Per-app resource units per minute (throttling is off unless a budget is given).
    #[arg(long)]
    pub ru_per_minute: Option<u64>,
    /// Per-app resource units per 24 hours.
    #[arg(long)]
    pub ru_per_day: Option<u64>,
    /// Tenant-wide resource units per 5 minutes (default: 15 × the per-minute budget when that is set).
    #[arg(long)]
    pub tenant_ru_per_5min: Option<u64>,
    /// Access-token lifetime (`expires_in`).
    #[arg(long, default_value_t = 3599)]
    pub token_lifetime_secs: u64,
    /// Delta-token lifetime; older tokens get 410 resyncRequired.
    #[arg(long, default_value_t = 30 * 86_400)]
    pub delta_token_lifetime_secs: u64,
    /// Base URL used in `@odata.nextLink` etc. (default: from the request's Host header).
    #[arg(long)]
    pub public_url: Option<String>,
    /// Allow `POST /_emulator/clock/advance` (for tests of time-based behaviour).
    #[arg(long)]
    pub clock_control: bool,
    /// Name shown as the application in `createdBy` / `lastModifiedBy`.
    #[arg(long, default_value = "SyncBridge")]
    pub app_name: String,
}

impl Default for EmulatorArgs {
    /// Test-friendly defaults: ephemeral port, memory only, clock control on.
    fn default() -> EmulatorArgs {
        EmulatorArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data: None,
            tenant: DEFAULT_TENANT.into(),
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            client_certs: Vec::new(),
            user_client_id: DEFAULT_USER_CLIENT_ID.into(),
            user_client_secret: DEFAULT_USER_CLIENT_SECRET.into(),
            sites: Vec::new(),
            ru_per_minute: None,
            ru_per_day: None,
            tenant_ru_per_5min: None,
            token_lifetime_secs: 3599,
            delta_token_lifetime_secs: 30 * 86_400,
            public_url: None,
            clock_control: true,
            app_name: "SyncBridge".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid --site {0:?}: expected host:/path, e.g. contoso.sharepoint.com:/sites/dev")]
    InvalidSite(String),
    #[error("persistence error at {path}: {source}")]
    Persistence {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot use certificate {path}: {detail}")]
    Certificate { path: PathBuf, detail: String },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// A running in-process emulator (tests, benchmarks).
#[derive(Debug)]
pub struct RunningEmulator {
    /// The bound address (an ephemeral port when asked for port 0).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), EmulatorError>>,
}

impl RunningEmulator {
    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop: stop serving, flush and compact persistence.
    pub async fn stop(self) -> Result<(), EmulatorError> {
        self.shutdown.cancel();
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(EmulatorError::Serve(std::io::Error::other(e.to_string()))),
        }
    }

    /// Abrupt stop, like `kill -9`: no flush, no compaction (the log is replayed on next start).
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn parse_site(s: &str) -> Result<(String, String), EmulatorError> {
    let (host, path) = s
        .split_once(":/")
        .ok_or_else(|| EmulatorError::InvalidSite(s.to_string()))?;
    let path = server::normalize_site_path(&format!("/{path}"))
        .ok_or_else(|| EmulatorError::InvalidSite(s.to_string()))?;
    if !server::valid_hostname(host) {
        return Err(EmulatorError::InvalidSite(s.to_string()));
    }
    Ok((host.to_string(), path))
}

/// Binds and starts serving in the background.
pub async fn spawn(args: EmulatorArgs) -> Result<RunningEmulator, EmulatorError> {
    let shutdown = CancellationToken::new();
    let (addr, fut) = start(args, shutdown.clone()).await?;
    let task = tokio::spawn(fut);
    Ok(RunningEmulator {
        addr,
        shutdown,
        task,
    })
}

/// Runs the emulator until `shutdown` is cancelled, printing how to connect first.
pub async fn run(args: EmulatorArgs, shutdown: CancellationToken) -> Result<(), EmulatorError> {
    let tenant = args.tenant.clone();
    let (client_id, secret) = (args.client_id.clone(), args.client_secret.clone());
    let (user_id, user_secret) = (args.user_client_id.clone(), args.user_client_secret.clone());
    let public = args.public_url.clone();
    let (addr, fut) = start(args, shutdown).await?;
    let base = public.unwrap_or_else(|| format!("http://{addr}"));
    println!("Graph emulator listening on {addr}");
    println!("  Graph base URL:  {base}/v1.0");
    println!("  Token URL:       {base}/{tenant}/oauth2/v2.0/token");
    println!("  Tenant:          {tenant}");
    println!("  Client id:       {client_id}");
    println!("  Client secret:   {secret}");
    println!("  Scope:           https://graph.microsoft.com/.default");
    println!("  Person client:   {user_id} / {user_secret} (writes appear as Adele Vance)");
    println!("  Browse:          {base}/   Stats: {base}/_emulator/stats");
    fut.await
}

/// Shared start-up: load state, bind, and return the serve future.
async fn start(
    args: EmulatorArgs,
    shutdown: CancellationToken,
) -> Result<
    (
        SocketAddr,
        impl std::future::Future<Output = Result<(), EmulatorError>>,
    ),
    EmulatorError,
> {
    let site_specs = if args.sites.is_empty() {
        vec![DEFAULT_SITE.to_string()]
    } else {
        args.sites.clone()
    };
    let configured_sites = site_specs
        .iter()
        .map(|s| parse_site(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut certs = Vec::new();
    for p in &args.client_certs {
        certs.push(Cert::load(p)?);
    }
    let clients = vec![
        Client {
            id: args.client_id.clone(),
            secret: args.client_secret.clone(),
            certs,
            actor: Actor::App,
        },
        Client {
            id: args.user_client_id.clone(),
            secret: args.user_client_secret.clone(),
            certs: Vec::new(),
            actor: auth::person_actor(),
        },
    ];
    let key = Identity::key_for(args.data.as_deref())?;
    let identity = Identity::new(
        args.tenant.clone(),
        clients,
        key,
        args.token_lifetime_secs.max(1),
    );
    let (sites, delta_epoch, wal, sync_stop) = match &args.data {
        Some(dir) => {
            let (s, e, w, stop) = persist::open(dir)?;
            (s, e, w, Some(stop))
        }
        None => (Vec::new(), 0, persist::Wal::disabled(), None),
    };
    let limits = Limits {
        ru_per_minute: args.ru_per_minute,
        ru_per_day: args.ru_per_day,
        tenant_ru_per_5min: args
            .tenant_ru_per_5min
            .or(args.ru_per_minute.map(|m| m.saturating_mul(15))),
    };
    let settings = Settings {
        delta_token_lifetime_secs: args.delta_token_lifetime_secs,
        ..Settings::default()
    };
    let state = State {
        sites,
        settings,
        throttle: Throttle::new(limits),
        faults: Faults::new(FaultSpec::default()),
        stats: Stats::default(),
        wal,
        delta_epoch,
    };
    let shared = Arc::new(Shared {
        identity,
        clock: Clock::default(),
        state: Mutex::new(state),
        public_url: args.public_url.clone(),
        app_name: args.app_name.clone(),
        clock_control: args.clock_control,
        configured_sites,
        default_limits: limits,
    });
    {
        let now = shared.clock.now_ms();
        let mut st = shared.lock();
        server::add_configured_sites(&shared, &mut st, now);
        st.wal
            .commit()
            .map_err(|source| EmulatorError::Persistence {
                path: args.data.clone().unwrap_or_default(),
                source,
            })?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| EmulatorError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EmulatorError::Bind {
            addr: args.listen,
            source,
        })?;
    let app = axum::Router::new()
        .fallback(server::handle)
        .with_state(shared.clone());
    let data = args.data.clone();
    let fut = async move {
        let served = axum::serve(
            KillableListener(listener),
            app.into_make_service_with_connect_info::<Conn>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(EmulatorError::Serve);
        let flushed = finish_persistence(&shared, data, sync_stop);
        served.and(flushed)
    };
    Ok((addr, fut))
}

/// On graceful shutdown: final commit, snapshot, stop the fsync thread.
fn finish_persistence(
    shared: &Shared,
    data: Option<PathBuf>,
    sync_stop: Option<Arc<AtomicBool>>,
) -> Result<(), EmulatorError> {
    let mut st = shared.lock();
    let path = data.unwrap_or_default();
    let io = |source| EmulatorError::Persistence {
        path: path.clone(),
        source,
    };
    st.wal.commit().map_err(io)?;
    let State {
        sites,
        wal,
        delta_epoch,
        ..
    } = &mut *st;
    if wal.enabled() {
        wal.compact(sites, *delta_epoch).map_err(io)?;
        wal.sync().map_err(io)?;
    }
    if let Some(s) = sync_stop {
        s.store(true, Ordering::Release);
    }
    Ok(())
}
