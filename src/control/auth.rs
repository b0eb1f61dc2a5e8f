//! Bearer-token authentication of the control-plane API (`control.tokens`).
//!
//! [`Auth::secure`] wraps the whole router, so routes merged into it later are protected too;
//! only [`PUBLIC_PATHS`] (probes, metrics, the API description) and the admin UI's static files
//! ([`is_public`]) pass without a token. A missing
//! or unknown token is 401 with `WWW-Authenticate: Bearer`; a `read` token on anything but
//! GET/HEAD is 403. Tokens are compared in constant time (over their SHA-256, so not even the
//! length leaks) and every configured token is checked, matched or not. No token configured
//! leaves the API open: [`super::bind`] allows that only on a loopback address.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::problem::ApiError;
use crate::config::{ApiRole, ApiToken};

/// Routes that answer without a token: probes and scrapers carry none, and the API description
/// is what a client reads to learn how to authenticate.
pub const PUBLIC_PATHS: &[&str] = &["/health", "/ready", "/metrics", "/openapi.json"];

/// True for [`PUBLIC_PATHS`] and the admin UI's static files ([`super::ui`]: no data in them; the
/// app sends the operator's token with each API call).
pub fn is_public(path: &str) -> bool {
    PUBLIC_PATHS.contains(&path) || super::ui::is_ui_path(path)
}

/// Who made a request: the name and role of its bearer token, put into the request's extensions
/// by the token check (absent when the API is open). Recorded with operator runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: ApiRole,
}

/// The configured tokens, hashed once at start.
#[derive(Clone, Default)]
pub struct Auth {
    tokens: Arc<Vec<Known>>,
}

struct Known {
    name: String,
    digest: [u8; 32],
    role: ApiRole,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the digests are as good as the tokens for a guessing attack.
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Auth").field("tokens", &names).finish()
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Constant-time equality of two token digests.
pub fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> Choice {
    a.ct_eq(b)
}

impl Auth {
    pub fn new(tokens: &[ApiToken]) -> Self {
        let tokens = tokens
            .iter()
            .map(|t| Known {
                name: t.name.clone(),
                digest: digest(t.token.expose().as_bytes()),
                role: t.role,
            })
            .collect();
        Self {
            tokens: Arc::new(tokens),
        }
    }

    /// No token configured: every route is open.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The name and role of the token `presented`, comparing with every known token.
    fn lookup(&self, presented: &[u8]) -> Option<(&str, ApiRole)> {
        let d = digest(presented);
        let mut found = None;
        for t in self.tokens.iter() {
            // No early exit: the time taken does not say which token (if any) matched.
            if bool::from(same_digest(&t.digest, &d)) && found.is_none() {
                found = Some((t.name.as_str(), t.role));
            }
        }
        found
    }

    /// Wraps `router` (with every route it will serve) in the token check.
    pub fn secure(&self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(
            self.clone(),
            require_token,
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn unauthorized(detail: &str, challenge: &'static str) -> Response {
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    resp
}

async fn require_token(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    if auth.is_open() || is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(presented) = bearer(req.headers()) else {
        return unauthorized(
            "this route needs `Authorization: Bearer <token>` (a token of control.tokens; the \
             CLI sends SYNCBRIDGE_API_TOKEN)",
            r#"Bearer realm="syncbridge""#,
        );
    };
    let Some((name, role)) = auth.lookup(presented) else {
        return unauthorized(
            "the bearer token is not one of control.tokens",
            r#"Bearer realm="syncbridge", error="invalid_token""#,
        );
    };
    if role == ApiRole::Read && !matches!(*req.method(), Method::GET | Method::HEAD) {
        tracing::info!(token = name, method = %req.method(), path = req.uri().path(),
            "refused: read-only API token");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token `{name}` has role `read`, which allows GET only; this needs an `operate` token"
            ),
        )
        .into_response();
    }
    let caller = Caller {
        name: name.to_string(),
        role,
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn token(name: &str, secret: &str, role: ApiRole) -> ApiToken {
        ApiToken {
            name: name.into(),
            token: Secret::new(secret),
            role,
        }
    }

    #[test]
    fn lookup_finds_only_the_exact_token() {
        let auth = Auth::new(&[
            token("ops", "s3cret-operate", ApiRole::Operate),
            token("dash", "s3cret-read", ApiRole::Read),
        ]);
        assert_eq!(
            auth.lookup(b"s3cret-operate"),
            Some(("ops", ApiRole::Operate))
        );
        assert_eq!(auth.lookup(b"s3cret-read"), Some(("dash", ApiRole::Read)));
        for wrong in [&b"s3cret-operatE"[..], b"s3cret-operate ", b"s3cret", b""] {
            assert_eq!(
                auth.lookup(wrong),
                None,
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        // The comparison is subtle's constant-time one (a `Choice`, not a `bool`).
        let c: Choice = same_digest(&digest(b"a"), &digest(b"a"));
        assert!(bool::from(c));
        assert!(!bool::from(same_digest(&digest(b"a"), &digest(b"b"))));
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn debug_shows_names_not_tokens() {
        let auth = Auth::new(&[token("ops", "s3cret-operate", ApiRole::Operate)]);
        let shown = format!("{auth:?}");
        assert!(shown.contains("ops"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
