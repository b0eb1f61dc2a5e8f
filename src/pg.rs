//! PostgreSQL client connections besides the replication stream (catalog, snapshot, advisory
//! locks, heartbeat, re-snapshot, applier, provisioning, `validate`), with the source URL's TLS
//! options honoured the way libpq honours them, and [`find_primary`] among a source's instances
//! (failover). [`acquire_advisory_lock`] is the one-holder pattern across processes (capture's
//! slot reader, each list's delta poller): a session lock on a dedicated connection, given up
//! when the connection closes.
//!
//! The replication stream goes through libpq, which reads the URL itself. tokio-postgres knows
//! only `sslmode=disable|prefer|require` and no root certificates, so [`connect`] takes the TLS
//! options out of the URL, gives the rest to tokio-postgres and does TLS with rustls:
//!
//! | `sslmode` | TLS | server certificate check |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` | when the server offers it | none (libpq checks none either) |
//! | `require` | always | none; the chain when root certificates are given or `~/.postgresql/root.crt` exists (as libpq) |
//! | `verify-ca` | always | the chain, against the root certificates |
//! | `verify-full` | always | the chain and the host name (or IP address) |
//!
//! Root certificates: `sslrootcert=<PEM file>`, `sslrootcert=system` (the operating system's
//! store), else `~/.postgresql/root.crt` like libpq. Client certificates (`sslcert`, `sslkey`) are
//! not supported: [`TlsOptions::parse`] rejects a URL that names them instead of connecting
//! without. (`allow` means "plaintext first" to libpq; here it is `prefer`.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::task::JoinHandle;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

/// URL parameters this module handles (and keeps away from tokio-postgres, which rejects some).
const TLS_PARAMS: [&str; 3] = ["sslmode", "sslrootcert", "sslnegotiation"];
/// libpq parameters for client certificates, which are not supported.
const CLIENT_CERT_PARAMS: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcrl"];

/// The connection future to spawn (drives the socket until the client is dropped).
pub type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PgConnectError {
    /// The URL's TLS options are invalid or unsupported (not retryable).
    #[error("{0}")]
    Options(String),
    /// The root certificates could not be read (not retryable until the file is fixed).
    #[error("cannot read root certificates {path}: {detail}")]
    RootCert {
        /// The file (`sslrootcert` or `~/.postgresql/root.crt`).
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Connecting or the TLS handshake failed (retryable unless it is a server-side refusal).
    /// The message carries the causes (tokio-postgres' own says only "error performing TLS
    /// handshake").
    #[error("{}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// `e: cause: cause…` (a cause whose text is already there is left out).
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl PgConnectError {
    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Options(_) | Self::RootCert { .. } => false,
            Self::Postgres(e) => e.as_db_error().is_none(),
        }
    }

    /// The server's error, when the server refused (authentication, unknown database, ...).
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            Self::Postgres(e) => e.as_db_error(),
            _ => None,
        }
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// `disable`
    Disable,
    /// `allow` (treated as `prefer`)
    Allow,
    /// `prefer`: libpq's default, which is why validation insists on an explicit mode.
    Prefer,
    /// `require`
    Require,
    /// `verify-ca`
    VerifyCa,
    /// `verify-full`
    VerifyFull,
}

/// Where root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// Not given: `~/.postgresql/root.crt` if it exists.
    Default,
    /// `sslrootcert=system`.
    System,
    /// `sslrootcert=<file>`.
    File(PathBuf),
}

/// The TLS options of a source URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// `sslmode`; `None` when the URL has none (libpq would use `prefer`).
    pub mode: Option<SslMode>,
    /// `sslrootcert`.
    pub root_cert: RootCert,
}

impl TlsOptions {
    /// Reads the TLS options of a `postgres://` URL or a `key=value` connection string (no IO).
    ///
    /// # Errors
    /// An unknown `sslmode`, `sslnegotiation=direct`, or client-certificate parameters.
    pub fn parse(url: &str) -> Result<Self, String> {
        Self::from_params(split(url)?.1)
    }

    fn from_params(params: Vec<(String, String)>) -> Result<Self, String> {
        let mut out = TlsOptions {
            mode: None,
            root_cert: RootCert::Default,
        };
        for (k, v) in params {
            match k.as_str() {
                "sslmode" => {
                    out.mode = Some(match v.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" => SslMode::Allow,
                        "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(format!(
                                "sslmode={other:?} is not one of disable, allow, prefer, require, \
                                 verify-ca, verify-full"
                            ));
                        }
                    });
                }
                "sslrootcert" if v == "system" => out.root_cert = RootCert::System,
                "sslrootcert" => out.root_cert = RootCert::File(PathBuf::from(v)),
                "sslnegotiation" if v != "postgres" => {
                    return Err(format!(
                        "sslnegotiation={v:?} is not supported (only the default `postgres`)"
                    ));
                }
                k if CLIENT_CERT_PARAMS.contains(&k) => {
                    return Err(format!(
                        "{k} (client certificate authentication) is not supported yet; \
                         use password or SCRAM authentication over sslmode=verify-full"
                    ));
                }
                _ => {}
            }
        }
        if out.root_cert != RootCert::Default
            && matches!(
                out.mode,
                Some(SslMode::Disable | SslMode::Allow | SslMode::Prefer)
            )
        {
            // libpq ignores the root certificate then; saying so beats a false sense of safety.
            return Err(
                "sslrootcert is only used with sslmode=require, verify-ca or verify-full".into(),
            );
        }
        Ok(out)
    }
}

/// `(the URL without the TLS parameters, the TLS parameters)`.
fn split(url: &str) -> Result<(String, Vec<(String, String)>), String> {
    let is_tls = |k: &str| TLS_PARAMS.contains(&k) || CLIENT_CERT_PARAMS.contains(&k);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url::Url::parse(url).map_err(|e| format!("source url is not a valid URL: {e}"))?;
        // Filter the raw `&`-separated parameters: re-encoding them (form encoding turns spaces
        // into `+`) would change values such as `options=-c%20work_mem%3D64kB` for the server.
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), Vec::new()));
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let mut tls = Vec::new();
        let mut rest = Vec::new();
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            let key = decode(k);
            if is_tls(&key) {
                tls.push((key, decode(v)));
            } else {
                rest.push(param);
            }
        }
        let rest = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        Ok((rest, tls))
    } else {
        // key=value form; values with spaces need quotes, which this simple split keeps intact
        // only for non-TLS parameters (TLS values never contain spaces here).
        let mut tls = Vec::new();
        let mut rest = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if is_tls(k) => {
                    tls.push((k.to_owned(), v.trim_matches('\'').to_owned()))
                }
                _ => rest.push(token),
            }
        }
        Ok((rest.join(" "), tls))
    }
}

/// Connects to `url` honouring its TLS options (see the module docs). Spawn the returned
/// connection (`tokio::spawn(connection)`); the client works while it runs.
///
/// # Errors
/// See [`PgConnectError`].
pub async fn connect(url: &str) -> Result<(Client, PgConnection), PgConnectError> {
    let (rest, params) = split(url).map_err(PgConnectError::Options)?;
    let tls = TlsOptions::from_params(params).map_err(PgConnectError::Options)?;
    let mut config: tokio_postgres::Config = rest.parse()?;
    config.ssl_mode(match tls.mode {
        Some(SslMode::Disable) => tokio_postgres::config::SslMode::Disable,
        None | Some(SslMode::Allow | SslMode::Prefer) => tokio_postgres::config::SslMode::Prefer,
        Some(SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => {
            tokio_postgres::config::SslMode::Require
        }
    });
    let connector = MakeRustlsConnect::new(client_config(&tls)?);
    Ok(config.connect(connector).await?)
}

/// A connection kept for its session state (an advisory lock): `lost` fires when the connection
/// ends, and dropping it closes the socket, which ends the session on the server (releasing what
/// the session held).
#[derive(Debug)]
pub struct WatchedConn {
    pub client: Arc<Client>,
    pub lost: CancellationToken,
    driver: JoinHandle<()>,
}

impl Drop for WatchedConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// [`connect`], with the connection driven by a task that cancels [`WatchedConn::lost`] when it
/// ends.
pub async fn connect_watched(url: &str) -> Result<WatchedConn, PgConnectError> {
    let (client, connection) = connect(url).await?;
    let lost = CancellationToken::new();
    let lost2 = lost.clone();
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
        lost2.cancel();
    });
    Ok(WatchedConn {
        client: Arc::new(client),
        lost,
        driver,
    })
}

/// How often a process standing by retries a session advisory lock someone else holds: a dead
/// holder is replaced within this (its lock goes when its connection closes).
pub const LOCK_RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// The advisory-lock key of `name`: FNV-1a of `syncbridge:<name>` (stable across builds and
/// processes, unlike `DefaultHasher`).
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"syncbridge:".iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// Waits until a new connection to `url` holds the session advisory lock `key`, trying every
/// `retry`; `standing_by` is called once, when the first try finds the lock taken. `None` on
/// `shutdown`. The lock lives as long as the returned connection: when its `lost` fires, the
/// lock is gone (another process may hold it already) and the holder must stop at once.
///
/// # Errors
/// Connecting or the lock query failed (the connection was lost meanwhile, too): see
/// [`PgConnectError::is_retryable`].
pub async fn acquire_advisory_lock(
    url: &str,
    key: i64,
    retry: Duration,
    shutdown: &CancellationToken,
    standing_by: impl FnOnce(),
) -> Result<Option<WatchedConn>, PgConnectError> {
    let conn = connect_watched(url).await?;
    let mut standing_by = Some(standing_by);
    loop {
        if try_lock(&conn, key).await? {
            return Ok(Some(conn));
        }
        if let Some(f) = standing_by.take() {
            f();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// One try of [`acquire_advisory_lock`]: the connection holding the lock, `None` when another
/// session holds it.
///
/// # Errors
/// Connecting or the lock query failed.
pub async fn try_advisory_lock(url: &str, key: i64) -> Result<Option<WatchedConn>, PgConnectError> {
    let conn = connect_watched(url).await?;
    Ok(try_lock(&conn, key).await?.then_some(conn))
}

async fn try_lock(conn: &WatchedConn, key: i64) -> Result<bool, tokio_postgres::Error> {
    Ok(conn
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
        .await?
        .get(0))
}

/// How long [`find_primary`] waits for one instance: a lost primary's host may drop packets
/// instead of refusing, and the next instance should be tried well before a reconnect backoff.
pub const PRIMARY_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The index of the first of `urls` that is a primary now: it accepts connections and
/// `pg_is_in_recovery()` is false. Unreachable instances and standbys are skipped (after a
/// failover the old primary is expected to be down); None when no instance is a primary yet.
pub async fn find_primary<S: AsRef<str>>(urls: &[S]) -> Option<usize> {
    for (i, url) in urls.iter().enumerate() {
        let probe = async {
            let (client, connection) = connect(url.as_ref()).await.ok()?;
            let driver = tokio::spawn(connection);
            let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
            driver.abort();
            row.ok().map(|r| !r.get::<_, bool>(0))
        };
        if let Ok(Some(true)) = tokio::time::timeout(PRIMARY_PROBE_TIMEOUT, probe).await {
            return Some(i);
        }
    }
    None
}

/// [`connect`] to a pipeline's source: with standbys listed (`source.urls`), to the instance
/// that is the primary now (a promoted standby after a failover), else to `source.url`. While no
/// instance is a primary, the first is tried (and its error returned).
///
/// # Errors
/// See [`PgConnectError`].
pub async fn connect_source(
    source: &crate::config::SourceConfig,
) -> Result<(Client, PgConnection), PgConnectError> {
    let urls: Vec<&str> = source.instances().map(|u| u.expose()).collect();
    let i = if urls.len() > 1 {
        find_primary(&urls).await.unwrap_or(0)
    } else {
        0
    };
    connect(urls[i]).await
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls configuration for `tls` (reads root certificate files).
fn client_config(tls: &TlsOptions) -> Result<ClientConfig, PgConnectError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| PgConnectError::Options(format!("TLS setup: {e}")))?;
    let verify = match tls.mode {
        None | Some(SslMode::Disable | SslMode::Allow | SslMode::Prefer) => Verify::Nothing,
        Some(SslMode::Require) => match &tls.root_cert {
            RootCert::Default => match default_root_file().filter(|p| p.exists()) {
                Some(p) => Verify::Chain(load_roots(&RootCert::File(p))?),
                None => Verify::Nothing,
            },
            other => Verify::Chain(load_roots(other)?),
        },
        Some(SslMode::VerifyCa) => Verify::Chain(load_roots(&tls.root_cert)?),
        Some(SslMode::VerifyFull) => Verify::Full(load_roots(&tls.root_cert)?),
    };
    let config = match verify {
        Verify::Full(roots) => builder.with_root_certificates(roots),
        Verify::Chain(roots) => {
            let chain =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| PgConnectError::Options(format!("TLS setup: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain: Some(chain),
                    provider,
                }))
        }
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient {
                chain: None,
                provider,
            })),
    };
    Ok(config.with_no_client_auth())
}

enum Verify {
    Nothing,
    Chain(RootCertStore),
    Full(RootCertStore),
}

fn default_root_file() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"))
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, PgConnectError> {
    let mut store = RootCertStore::empty();
    let path = match root {
        RootCert::System => {
            let loaded = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(PgConnectError::RootCert {
                    path: PathBuf::from("system"),
                    detail: format!(
                        "no usable certificates in the system store ({:?})",
                        loaded.errors
                    ),
                });
            }
            return Ok(store);
        }
        RootCert::File(p) => p.clone(),
        RootCert::Default => default_root_file().ok_or_else(|| PgConnectError::RootCert {
            path: PathBuf::from("~/.postgresql/root.crt"),
            detail: "HOME is not set; give sslrootcert=<file> or sslrootcert=system".into(),
        })?,
    };
    let err = |detail: String| PgConnectError::RootCert {
        path: path.clone(),
        detail,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| {
            err(format!(
                "{e} (sslmode verify-ca/verify-full need root certificates: sslrootcert=<PEM file> \
                 or sslrootcert=system)"
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(err("no certificate in the file".into()));
    }
    Ok(store)
}

/// The checks below `verify-full`: none (`prefer`, `require` without root certificates: encrypted,
/// the server not authenticated, as libpq does) or the chain without the host name (`verify-ca`,
/// `require` with root certificates). Handshake signatures are always verified.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_connection_strings() {
        let (rest, tls) = split(
            "postgres://u:p@db.example:5432/app?sslmode=verify-full&application_name=sb&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example:5432/app?application_name=sb"
        );
        assert_eq!(tls.len(), 2);
        let (rest, _) = split("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://h/db");
        // Other parameters pass through byte for byte; TLS values are percent-decoded like libpq
        // does (a `+` stays a `+`).
        let (rest, tls) = split(
            "postgres://h/db?options=-c%20work_mem%3D64kB&sslmode=require&sslrootcert=%2Fca+1.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://h/db?options=-c%20work_mem%3D64kB");
        assert_eq!(tls[1], ("sslrootcert".to_owned(), "/ca+1.pem".to_owned()));
        let (rest, tls) = split("host=h dbname=d sslmode=require user=u").unwrap();
        assert_eq!(rest, "host=h dbname=d user=u");
        assert_eq!(tls, [("sslmode".to_owned(), "require".to_owned())]);
    }

    #[test]
    fn options_parse_like_libpq_and_reject_what_is_unsupported() {
        let p = |u: &str| TlsOptions::parse(u);
        assert_eq!(
            p("postgres://h/d?sslmode=verify-full&sslrootcert=system").unwrap(),
            TlsOptions {
                mode: Some(SslMode::VerifyFull),
                root_cert: RootCert::System
            }
        );
        assert_eq!(
            p("postgres://h/d?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem")
                .unwrap()
                .root_cert,
            RootCert::File("/etc/ca.pem".into())
        );
        assert_eq!(p("postgres://h/d").unwrap().mode, None);
        assert!(
            p("postgres://h/d?sslmode=verify_full")
                .unwrap_err()
                .contains("verify-full")
        );
        assert!(
            p("postgres://h/d?sslmode=require&sslcert=c.pem")
                .unwrap_err()
                .contains("sslcert")
        );
        assert!(
            p("postgres://h/d?sslmode=prefer&sslrootcert=ca.pem")
                .unwrap_err()
                .contains("only used")
        );
        assert!(p("postgres://h/d?sslnegotiation=direct").is_err());
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let tls = TlsOptions {
            mode: Some(SslMode::VerifyFull),
            root_cert: RootCert::File("/nonexistent/ca.pem".into()),
        };
        match client_config(&tls) {
            Err(e @ PgConnectError::RootCert { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("/nonexistent/ca.pem"), "{msg}");
                assert!(!e.is_retryable());
            }
            other => panic!("expected RootCert, got {:?}", other.map(|_| ())),
        }
    }
}
