//! App-only access tokens: OAuth2 client credentials with a client secret (graph-api.md §1.1) or a
//! certificate, i.e. a signed JWT client assertion (§1.2).
//!
//! Contract:
//! - One token is cached per provider and reused until [`TOKEN_REFRESH_MARGIN`] before its
//!   `expires_in` (at most half the lifetime, so short-lived tokens are not refreshed on every call).
//! - Concurrent callers share one refresh (the cache sits behind an async mutex).
//! - [`TokenProvider::invalidate`] drops the cached token only if it is still the one the caller used,
//!   so a burst of 401s causes one refresh, not one per request.
//! - The secret / private key is used only to build the form body and is never logged (`Debug` of
//!   [`Credential`] shows the certificate thumbprint only); token endpoint errors keep Entra's
//!   `error`/`error_description` (they contain no secret).
//! - A certificate assertion is signed PS256 (current docs) with `x5t#S256`, `aud` = the token URL,
//!   `iss` = `sub` = client id, a fresh `jti`, and a lifetime of [`ASSERTION_LIFETIME`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::error::{ErrorDetail, GraphError};
use crate::config::Secret;
use crate::telemetry::metrics as m;

/// Refresh this long before the token expires. Entra lifetimes are 60–90 min (§1.3); five minutes
/// absorbs clock skew and a slow request, and is what Microsoft's own SDKs use.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The scope of the client-credentials flow for Graph (the `/.default` suffix is mandatory, §1.1).
pub const GRAPH_DEFAULT_SCOPE: &str = "https://graph.microsoft.com/.default";
/// Lifetime of a client assertion JWT: Microsoft suggests 5–10 minutes (§1.2); it is used once.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// How the application proves its identity.
#[derive(Clone)]
pub enum Credential {
    Secret(Secret),
    Certificate(Certificate),
    /// A certificate still on disk (from the pipeline file): [`Credential::load`] reads it when
    /// the client is built, so a missing or wrong file fails start-up, naming the file.
    CertificateFiles {
        cert: std::path::PathBuf,
        /// A PEM file's path, or the PEM itself.
        key: Secret,
    },
}

impl Credential {
    /// Reads a certificate still on disk; other credentials are returned as they are.
    pub fn load(self) -> Result<Credential, GraphError> {
        let Credential::CertificateFiles { cert, key } = self else {
            return Ok(self);
        };
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                GraphError::Invalid(format!(
                    "graph.client_certificate.{what}: cannot read {}: {e}",
                    path.display()
                ))
            })
        };
        let cert_pem = read(&cert, "cert")?;
        let key_pem = if key.expose().contains("-----BEGIN") {
            key.expose().as_bytes().to_vec()
        } else {
            read(std::path::Path::new(key.expose().trim()), "key")?
        };
        Certificate::from_pem(&cert_pem, &key_pem)
            .map(Credential::Certificate)
            .map_err(|e| {
                GraphError::Invalid(format!(
                    "graph.client_certificate ({}): {e}",
                    cert.display()
                ))
            })
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(***)"),
            Credential::Certificate(c) => write!(f, "{c:?}"),
            Credential::CertificateFiles { cert, .. } => {
                write!(f, "CertificateFiles(cert={}, key=***)", cert.display())
            }
        }
    }
}

/// A certificate registered for the app plus its RSA private key.
#[derive(Clone)]
pub struct Certificate {
    key: jsonwebtoken::EncodingKey,
    /// base64url SHA-256 of the certificate DER (`x5t#S256`).
    thumbprint: String,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certificate(x5t#S256={}, key=***)", self.thumbprint)
    }
}

impl Certificate {
    /// From a PEM certificate (`-----BEGIN CERTIFICATE-----`) and a PEM RSA private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Certificate, GraphError> {
        use base64::Engine;
        use sha2::Digest;
        let text = String::from_utf8_lossy(cert_pem);
        let b64: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| GraphError::Invalid("no PEM CERTIFICATE block".into()))?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem)
            .map_err(|e| GraphError::Invalid(format!("not an RSA private key: {e}")))?;
        Ok(Certificate {
            key,
            thumbprint: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(&der)),
        })
    }

    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    fn assertion(&self, client_id: &str, audience: &str) -> Result<String, GraphError> {
        let now = chrono::Utc::now().timestamp();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
        header.x5t_s256 = Some(self.thumbprint.clone());
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME.as_secs() as i64,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| GraphError::Invalid(format!("cannot sign client assertion: {e}")))
    }
}

#[derive(Debug, Clone)]
struct Cached {
    access_token: String,
    refresh_at: Instant,
}

/// Fetches and caches access tokens.
#[derive(Debug)]
pub struct TokenProvider {
    http: reqwest::Client,
    token_url: Url,
    client_id: String,
    credential: Credential,
    scope: String,
    cache: Mutex<Option<Cached>>,
    fetched: AtomicU64,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenProvider {
    pub fn new(
        http: reqwest::Client,
        token_url: Url,
        client_id: String,
        credential: Credential,
        scope: String,
    ) -> TokenProvider {
        TokenProvider {
            http,
            token_url,
            client_id,
            credential,
            scope,
            cache: Mutex::new(None),
            fetched: AtomicU64::new(0),
        }
    }

    /// How many tokens were fetched from the token endpoint (cache misses).
    pub fn tokens_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// A valid access token, from the cache when possible.
    pub async fn token(&self) -> Result<String, GraphError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.access_token.clone());
        }
        let fetched = self.fetch().await;
        let outcome = fetched.as_ref().map_or_else(GraphError::kind, |_| "ok");
        metrics::counter!(m::GRAPH_TOKEN_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        let fresh = fetched?;
        let token = fresh.access_token.clone();
        *cache = Some(fresh);
        Ok(token)
    }

    /// Forgets `used` if it is still cached (a 401 said it is no longer valid).
    pub async fn invalidate(&self, used: &str) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| c.access_token == used) {
            *cache = None;
        }
    }

    async fn fetch(&self) -> Result<Cached, GraphError> {
        // Built in a block: the serializer is not `Send` and must not live across an await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("client_id", &self.client_id)
                .append_pair("scope", &self.scope)
                .append_pair("grant_type", "client_credentials");
            match &self.credential {
                Credential::Secret(s) => {
                    form.append_pair("client_secret", s.expose());
                }
                Credential::Certificate(c) => {
                    let jwt = c.assertion(&self.client_id, self.token_url.as_str())?;
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    )
                    .append_pair("client_assertion", &jwt);
                }
                Credential::CertificateFiles { .. } => {
                    return Err(GraphError::Invalid(
                        "certificate not loaded (GraphClient::new loads it)".into(),
                    ));
                }
            }
            form.finish()
        };
        let started = Instant::now();
        let resp = self
            .http
            .post(self.token_url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| GraphError::from_transport(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| GraphError::from_transport(&e))?;
        if !(200..300).contains(&status) {
            let e: Option<TokenErrorBody> = serde_json::from_slice(&bytes).ok();
            let detail = match e {
                Some(e) => ErrorDetail {
                    code: e.error,
                    message: e.error_description,
                    ..ErrorDetail::default()
                },
                None => ErrorDetail::parse(&bytes, None),
            };
            tracing::warn!(status, code = %detail.code, "graph token request refused");
            return Err(match status {
                // 400/401 from the token endpoint: wrong secret, client or scope — not retryable.
                400..=499 if status != 429 => GraphError::Auth {
                    status,
                    detail: Box::new(detail),
                },
                _ => GraphError::from_response(status, None, detail),
            });
        }
        let t: TokenResponse = serde_json::from_slice(&bytes).map_err(|e| GraphError::Decode {
            what: "token endpoint".into(),
            message: e.to_string(),
        })?;
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3599));
        let margin = TOKEN_REFRESH_MARGIN.min(lifetime / 2);
        self.fetched.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            expires_in = lifetime.as_secs(),
            "graph access token acquired"
        );
        Ok(Cached {
            access_token: t.access_token,
            refresh_at: started + (lifetime - margin),
        })
    }
}
