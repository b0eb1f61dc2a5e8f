//! The Microsoft identity platform token endpoint (client credentials, graph-api.md §1) and bearer
//! token checks for Graph calls (§1.4).
//!
//! Access tokens are JWT-shaped (`header.claims.signature`) and signed with a per-data-dir key, so they
//! survive a restart with `--data`. `POST /_emulator/expire-tokens` bumps a generation number that
//! every earlier token carries, making them all fail with "Lifetime validation failed".

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::EmulatorError;
use super::graph::Caller;
use super::model::{Actor, PERSON_CLIENT_LOOKUP_ID};
use super::reply::GraphError;

/// Microsoft Graph's own application id (used in `WWW-Authenticate`, accepted as scope resource).
pub const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";

/// A registered certificate for `client_assertion` sign-in.
#[derive(Debug, Clone)]
pub struct Cert {
    pub pem: Vec<u8>,
    /// base64url SHA-256 of the certificate DER (`x5t#S256`).
    pub thumb_s256: String,
}

impl Cert {
    pub fn load(path: &Path) -> Result<Cert, EmulatorError> {
        let err = |detail: String| EmulatorError::Certificate {
            path: path.to_path_buf(),
            detail,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8_lossy(&pem);
        let b64: String = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        if b64.is_empty() {
            return Err(err("no PEM CERTIFICATE block found".into()));
        }
        let der = STANDARD
            .decode(b64.trim())
            .map_err(|e| err(e.to_string()))?;
        jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
            .map_err(|e| err(format!("not an RSA certificate: {e}")))?;
        Ok(Cert {
            pem,
            thumb_s256: URL_SAFE_NO_PAD.encode(Sha256::digest(&der)),
        })
    }
}

/// A registered application (client).
#[derive(Debug, Clone)]
pub struct Client {
    pub id: String,
    pub secret: String,
    pub certs: Vec<Cert>,
    /// App-only client, or the "person" client whose writes look like a user's.
    pub actor: Actor,
}

/// Identity configuration and the token signing key.
#[derive(Debug)]
pub struct Identity {
    pub tenant: String,
    pub tenant_id: String,
    pub clients: Vec<Client>,
    key: [u8; 32],
    pub generation: AtomicU64,
    pub lifetime_secs: AtomicU64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    aud: String,
    iss: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    appid: String,
    tid: String,
    idtyp: String,
    roles: Vec<String>,
    /// How the client proved itself, as Entra says it: `1` a secret, `2` a certificate.
    #[serde(default)]
    appidacr: String,
    #[serde(rename = "gen")]
    generation: u64,
    uti: String,
}

/// A token endpoint answer: status and JSON body.
#[derive(Debug)]
pub struct TokenReply {
    pub status: u16,
    pub body: Value,
}

impl Identity {
    pub fn new(
        tenant: String,
        clients: Vec<Client>,
        key: [u8; 32],
        lifetime_secs: u64,
    ) -> Identity {
        let tenant_id = {
            let d = Sha256::digest(format!("tenant|{}", tenant.to_lowercase()));
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            uuid::Builder::from_random_bytes(b).into_uuid().to_string()
        };
        Identity {
            tenant,
            tenant_id,
            clients,
            key,
            generation: AtomicU64::new(0),
            lifetime_secs: AtomicU64::new(lifetime_secs),
        }
    }

    /// Loads the signing key from `DIR/token-key` (creating it), so tokens survive restarts.
    pub fn key_for(dir: Option<&Path>) -> Result<[u8; 32], EmulatorError> {
        let fresh: [u8; 32] = rand::random();
        let Some(dir) = dir else { return Ok(fresh) };
        let path = dir.join("token-key");
        let io = |source| EmulatorError::Persistence {
            path: path.clone(),
            source,
        };
        if let Ok(existing) = std::fs::read(&path)
            && let Ok(k) = <[u8; 32]>::try_from(
                hex::decode(existing.trim_ascii())
                    .unwrap_or_default()
                    .as_slice(),
            )
        {
            return Ok(k);
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(&path, hex::encode(fresh)).map_err(io)?;
        Ok(fresh)
    }

    fn sign(&self, data: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(data.as_bytes());
        h.update(self.key);
        URL_SAFE_NO_PAD.encode(h.finalize())
    }

    fn error(&self, status: u16, error: &str, code: u32, msg: &str, now: i64) -> TokenReply {
        let trace = uuid::Uuid::new_v4().to_string();
        let corr = uuid::Uuid::new_v4().to_string();
        let ts = chrono::DateTime::from_timestamp(now, 0)
            .map(|d| d.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_default();
        TokenReply {
            status,
            body: json!({
                "error": error,
                "error_description": format!("AADSTS{code}: {msg} Trace ID: {trace} Correlation ID: {corr} Timestamp: {ts}"),
                "error_codes": [code],
                "timestamp": ts,
                "trace_id": trace,
                "correlation_id": corr,
                "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
            }),
        }
    }

    /// `POST /{tenant}/oauth2/v2.0/token`.
    pub fn token(
        &self,
        tenant: &str,
        form: &[u8],
        basic: Option<(String, String)>,
        now: i64,
    ) -> TokenReply {
        let params: Vec<(String, String)> =
            url::form_urlencoded::parse(form).into_owned().collect();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if !tenant.eq_ignore_ascii_case(&self.tenant)
            && !tenant.eq_ignore_ascii_case(&self.tenant_id)
        {
            return self.error(400, "invalid_request", 90002, &format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."), now);
        }
        match get("grant_type") {
            None => {
                return self.error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'grant_type'.",
                    now,
                );
            }
            Some("client_credentials") => {}
            Some(other) => {
                return self.error(
                    400,
                    "unsupported_grant_type",
                    70003,
                    &format!("The app requested an unsupported grant type '{other}'."),
                    now,
                );
            }
        }
        let (client_id, basic_secret) = match (get("client_id"), &basic) {
            (Some(c), _) => (
                c.to_string(),
                basic
                    .as_ref()
                    .filter(|(b, _)| b == c)
                    .map(|(_, s)| s.clone()),
            ),
            (None, Some((c, s))) => (c.clone(), Some(s.clone())),
            (None, None) => {
                return self.error(
                    400,
                    "invalid_request",
                    900144,
                    "The request body must contain the following parameter: 'client_id'.",
                    now,
                );
            }
        };
        let Some(client) = self
            .clients
            .iter()
            .find(|c| c.id.eq_ignore_ascii_case(&client_id))
        else {
            return self.error(400, "unauthorized_client", 700016, &format!("Application with identifier '{client_id}' was not found in the directory '{}'.", self.tenant), now);
        };
        let scope = get("scope").unwrap_or("");
        if scope.is_empty() {
            return self.error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
                now,
            );
        }
        let scopes: Vec<&str> = scope.split(' ').filter(|s| !s.is_empty()).collect();
        if scopes.iter().any(|s| !s.ends_with("/.default")) {
            return self.error(400, "invalid_scope", 1002012, &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."), now);
        }
        let Some(audience) = scopes
            .first()
            .and_then(|s| resource(s))
            .filter(|_| scopes.len() == 1)
        else {
            return self.error(400, "invalid_scope", 70011, &format!("The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."), now);
        };
        let secret = get("client_secret").map(str::to_string).or(basic_secret);
        let appidacr = if secret.is_some() { "1" } else { "2" };
        match (
            secret,
            get("client_assertion"),
            get("client_assertion_type"),
        ) {
            (Some(s), None, _) => {
                if s != client.secret {
                    return self.error(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app.", now);
                }
            }
            (None, Some(a), Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")) => {
                if let Err((code, msg)) =
                    verify_assertion(client, a, [&self.tenant, &self.tenant_id], now)
                {
                    return self.error(401, "invalid_client", code, &msg, now);
                }
            }
            (None, Some(_), _) => {
                return self.error(400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_assertion_type' with value 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.", now);
            }
            (Some(_), Some(_), _) => {
                return self.error(
                    400,
                    "invalid_request",
                    90014,
                    "Only one of 'client_secret' or 'client_assertion' may be sent.",
                    now,
                );
            }
            (None, None, _) => {
                return self.error(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.", now);
            }
        }
        let lifetime = self.lifetime_secs.load(Ordering::Relaxed) as i64;
        let claims = Claims {
            aud: audience,
            iss: format!("https://sts.windows.net/{}/", self.tenant_id),
            iat: now,
            nbf: now,
            exp: now + lifetime,
            appid: client.id.clone(),
            tid: self.tenant_id.clone(),
            idtyp: if client.actor == Actor::App {
                "app".into()
            } else {
                "user".into()
            },
            roles: vec!["Sites.FullControl.All".into()],
            appidacr: appidacr.into(),
            generation: self.generation.load(Ordering::Relaxed),
            uti: uuid::Uuid::new_v4().simple().to_string(),
        };
        let header =
            URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256","x-emulator":"syncbridge"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signing_input = format!("{header}.{body}");
        let token = format!("{signing_input}.{}", self.sign(&signing_input));
        TokenReply {
            status: 200,
            body: json!({ "token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token }),
        }
    }

    /// Checks `Authorization: Bearer …` for a Graph call.
    pub fn verify(&self, header: Option<&str>, now: i64) -> Result<Caller, GraphError> {
        let fail = |m: &str| {
            GraphError::new(401, "InvalidAuthenticationToken", m).with_header(
                "WWW-Authenticate",
                format!("Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"{GRAPH_APP_ID}\""),
            )
        };
        let (claims, caller) = self.decode(header, now).map_err(fail)?;
        if claims.aud != GRAPH_AUDIENCE {
            return Err(fail("Invalid audience."));
        }
        Ok(caller)
    }

    /// Checks `Authorization: Bearer …` for a SharePoint REST call: a token for a SharePoint
    /// resource, obtained with a certificate (SharePoint refuses app-only tokens from a client
    /// secret, graph-api.md §14). The error is SharePoint's: 401 with `error_description`.
    pub fn verify_sharepoint(&self, header: Option<&str>, now: i64) -> Result<Caller, Value> {
        let fail = |m: &str| json!({ "error": "invalid_request", "error_description": m });
        let (claims, caller) = self.decode(header, now).map_err(fail)?;
        if claims.aud == GRAPH_AUDIENCE {
            return Err(fail("Invalid audience Uri 'https://graph.microsoft.com'."));
        }
        if claims.appidacr != "2" && caller.actor == Actor::App {
            return Err(fail("Unsupported app only token."));
        }
        Ok(caller)
    }

    /// A bearer token's claims and caller, or why it is refused.
    fn decode(&self, header: Option<&str>, now: i64) -> Result<(Claims, Caller), &'static str> {
        let raw = header.unwrap_or("").trim();
        let token = raw
            .strip_prefix("Bearer ")
            .or_else(|| raw.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or(if raw.contains(' ') { "" } else { raw });
        if token.is_empty() {
            return Err("Access token is empty.");
        }
        let parts: Vec<&str> = token.split('.').collect();
        if parts.len() != 3 {
            return Err("CompactToken parsing failed with error code: 80049217");
        }
        if self.sign(&format!("{}.{}", parts[0], parts[1])) != parts[2] {
            return Err("CompactToken validation failed with reason code: 80049228.");
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(parts[1])
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("CompactToken parsing failed with error code: 80049217")?;
        if claims.exp <= now || claims.generation != self.generation.load(Ordering::Relaxed) {
            return Err("Lifetime validation failed, the token is expired.");
        }
        let client = self
            .clients
            .iter()
            .find(|c| c.id == claims.appid)
            .ok_or("Invalid client for this tenant.")?;
        let caller = Caller {
            actor: client.actor,
            app_key: client.id.clone(),
        };
        Ok((claims, caller))
    }
}

/// The audience of Graph tokens.
const GRAPH_AUDIENCE: &str = "https://graph.microsoft.com";

/// The resource a `…/.default` scope asks for: Graph (by URL or app id) or a SharePoint host
/// (`https://<tenant>.sharepoint.com`); `None` for anything else.
fn resource(scope: &str) -> Option<String> {
    let r = scope.trim_end_matches("/.default").trim_end_matches('/');
    if r.eq_ignore_ascii_case(GRAPH_AUDIENCE) || r.eq_ignore_ascii_case(GRAPH_APP_ID) {
        return Some(GRAPH_AUDIENCE.into());
    }
    let host = r.strip_prefix("https://")?.to_ascii_lowercase();
    let tenant = host.strip_suffix(".sharepoint.com")?;
    let valid = !tenant.is_empty()
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    valid.then(|| format!("https://{host}"))
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    aud: Value,
    iss: String,
    sub: String,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
}

/// Validates a `client_assertion` JWT (graph-api.md §1.2) against the client's certificates.
fn verify_assertion(
    client: &Client,
    jwt: &str,
    tenants: [&str; 2],
    now: i64,
) -> Result<(), (u32, String)> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let header = jsonwebtoken::decode_header(jwt)
        .map_err(|e| (50027, format!("JWT token is invalid or malformed: {e}.")))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err((
            5002738,
            "Client assertion must be signed with RS256 or PS256.".into(),
        ));
    }
    if client.certs.is_empty() {
        return Err((700027, "Client assertion failed signature validation: no certificate is registered for this application.".into()));
    }
    // Pick certificates by thumbprint when `x5t#S256` is given; plain `x5t` (SHA-1) is not checked.
    let candidates: Vec<&Cert> = match &header.x5t_s256 {
        Some(t) => client.certs.iter().filter(|c| &c.thumb_s256 == t).collect(),
        None => client.certs.iter().collect(),
    };
    if candidates.is_empty() {
        return Err((700027, "Client assertion contains an invalid signature. The key was not found (x5t#S256 matches no registered certificate).".into()));
    }
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut claims: Option<AssertionClaims> = None;
    for c in candidates {
        let Ok(key) = DecodingKey::from_rsa_pem(&c.pem) else {
            continue;
        };
        if let Ok(d) = jsonwebtoken::decode::<AssertionClaims>(jwt, &key, &validation) {
            claims = Some(d.claims);
            break;
        }
    }
    let claims = claims.ok_or((
        700027,
        "Client assertion failed signature validation.".to_string(),
    ))?;
    if claims.iss != client.id || claims.sub != client.id {
        return Err((
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.".into(),
        ));
    }
    let auds: Vec<String> = match &claims.aud {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    // The audience is the token endpoint of this tenant (by domain or id), under any authority host.
    let ok_aud = |a: &String| {
        let a = a.trim_end_matches('/').to_lowercase();
        tenants
            .iter()
            .any(|t| a.ends_with(&format!("/{}/oauth2/v2.0/token", t.to_lowercase())))
    };
    if !auds.iter().any(ok_aud) {
        return Err((
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{}'.",
                auds.join(",")
            ),
        ));
    }
    if claims.exp <= now {
        return Err((
            700024,
            "Client assertion is not within its valid time range.".into(),
        ));
    }
    if claims.nbf.is_some_and(|n| n > now + 300) {
        return Err((
            700024,
            "Client assertion is not within its valid time range.".into(),
        ));
    }
    Ok(())
}

/// Parses `Authorization: Basic …` into (client id, secret).
pub fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let b64 = header?.trim().strip_prefix("Basic ")?;
    let raw = STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (id, secret) = s.split_once(':')?;
    let dec = |x: &str| {
        url::form_urlencoded::parse(format!("a={x}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((dec(id)?, dec(secret)?))
}

/// The person client's actor.
pub fn person_actor() -> Actor {
    Actor::Person(PERSON_CLIENT_LOOKUP_ID)
}
