//! The admin UI (issue 16): a single-page app whose sources are in `src/control/ui/` (Preact,
//! TypeScript, Vite; its README says how to build and test it), embedded in the binary by
//! `src/control/ui/build.rs` and served here at `/ui` and `/ui/*`.
//!
//! - `/ui/assets/*` are content-hashed files: cached for a year. A `.gz` sibling written by the
//!   UI build is sent as is to clients that accept gzip (nothing is compressed per request).
//! - Any other path under `/ui` that is not a file answers `index.html` (the app routes in the
//!   browser: a reload of `/ui/runs` works); a missing file with an extension is a 404 problem.
//! - The pages are public, like `/openapi.json`: they hold no data. Every API call the app makes
//!   carries the token the operator signed in with (kept in the tab's session storage).
//! - A Content-Security-Policy allows this origin only: no external script, style, font or
//!   connection, so the UI works on a machine without internet and cannot leak the token.
//! - Without a built UI (`dist` absent when the binary was compiled) `/ui` answers 503 with a
//!   page saying how to build it.
//!
//! `GET /whoami` (an API route, token required) tells the app the token's name and role, so it
//! hides what a `read` token may not do.

use axum::extract::{Extension, Path};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::problem::ApiError;

/// One embedded file of the UI build.
#[derive(Debug)]
pub struct Asset {
    /// Path under `dist`, e.g. `assets/index-3f2a.js`.
    pub path: &'static str,
    pub body: &'static [u8],
    /// The same, gzip-compressed by the UI build (text files only).
    pub gzip: Option<&'static [u8]>,
}

include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));

/// Where the UI is mounted; the app is built with this base (`vite.config.ts`).
pub const MOUNT: &str = "/ui";

/// Same origin only. `style-src 'unsafe-inline'` is not needed: the build emits CSS files.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   font-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; \
                   form-action 'self'";

/// Hashed file names never change content: a year, the usual ceiling.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">\
<title>SyncBridge: UI not built</title><h1>The admin UI is not built into this binary</h1>\
<p>Run <code>npm ci &amp;&amp; npm run build</code> in <code>src/control/ui</code> (Node.js 20 \
or later), then build syncbridge again (<code>cargo build</code>). <code>ops/test</code> and \
<code>ops/demo</code> do this when npm is installed.</p><p>The API itself works: see \
<a href=\"/openapi.json\">/openapi.json</a>.</p></html>";

/// True when `path` is under [`MOUNT`] (public: static files only).
pub fn is_ui_path(path: &str) -> bool {
    path == MOUNT
        || path
            .strip_prefix(MOUNT)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The UI routes and `/whoami`: merge them into the control router.
pub fn routes() -> Router {
    Router::new()
        .route(MOUNT, get(index))
        .route("/ui/", get(index))
        .route("/ui/{*path}", get(file))
        .route("/whoami", get(whoami))
}

fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

async fn index(headers: HeaderMap) -> Response {
    match find("index.html") {
        Some(a) => serve(a, &headers),
        None => not_built(),
    }
}

async fn file(Path(path): Path<String>, headers: HeaderMap) -> Response {
    if let Some(a) = find(&path) {
        return serve(a, &headers);
    }
    // A file name (with an extension) that is not there is a real 404; anything else is a
    // route of the app.
    let last = path.rsplit('/').next().unwrap_or("");
    if path.starts_with("assets/") || last.contains('.') {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no file {MOUNT}/{path} in the admin UI"),
        )
        .into_response();
    }
    index(headers).await
}

fn not_built() -> Response {
    let mut resp = (StatusCode::SERVICE_UNAVAILABLE, NOT_BUILT).into_response();
    set(&mut resp, header::CONTENT_TYPE, "text/html; charset=utf-8");
    resp
}

fn set(resp: &mut Response, name: header::HeaderName, value: &'static str) {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|enc| {
            let mut parts = enc.split(';');
            let name = parts.next().unwrap_or("").trim();
            // `gzip;q=0` refuses it.
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let gzip = asset.gzip.filter(|_| accepts_gzip(headers));
    let mut resp = gzip.unwrap_or(asset.body).into_response();
    set(&mut resp, header::CONTENT_TYPE, content_type(asset.path));
    set(&mut resp, header::CONTENT_SECURITY_POLICY, CSP);
    set(&mut resp, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(&mut resp, header::REFERRER_POLICY, "no-referrer");
    let cache = if asset.path.starts_with("assets/") {
        IMMUTABLE
    } else {
        // index.html names the current hashed files: always revalidate.
        "no-cache"
    };
    set(&mut resp, header::CACHE_CONTROL, cache);
    if asset.gzip.is_some() {
        set(&mut resp, header::VARY, "accept-encoding");
    }
    if gzip.is_some() {
        set(&mut resp, header::CONTENT_ENCODING, "gzip");
    }
    resp
}

/// The media type of a built file, by extension (the few kinds a Vite build writes).
fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Who the bearer token is.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name in `control.tokens` (absent when the API is open: no tokens configured).
    pub name: Option<String>,
    /// `read` (GET only) or `operate` (everything); an open API allows everything.
    pub role: String,
    /// True when no tokens are configured (loopback only).
    pub open: bool,
}

#[utoipa::path(get, path = "/whoami", tag = "access",
    responses((status = 200, description = "The token's name and role", body = WhoAmI)))]
pub async fn whoami(caller: Option<Extension<Caller>>) -> Json<WhoAmI> {
    Json(match caller {
        Some(Extension(c)) => WhoAmI {
            name: Some(c.name),
            role: c.role.as_str().to_string(),
            open: false,
        },
        None => WhoAmI {
            name: None,
            role: "operate".into(),
            open: true,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ui_paths_are_the_mount_and_below_only() {
        for p in ["/ui", "/ui/", "/ui/runs", "/ui/assets/x.js"] {
            assert!(is_ui_path(p), "{p}");
        }
        for p in ["/uix", "/u", "/pipelines/ui", "/", "/ui-admin/x"] {
            assert!(!is_ui_path(p), "{p}");
        }
    }

    #[test]
    fn gzip_is_sent_only_when_accepted() {
        let mut h = HeaderMap::new();
        assert!(!accepts_gzip(&h));
        for (value, want) in [
            ("gzip, deflate, br", true),
            ("br;q=1.0, GZIP;q=0.5", true),
            ("gzip;q=0", false),
            ("gzip; q=0", false),
            ("identity", false),
            ("x-gzip-not", false),
        ] {
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
            assert_eq!(accepts_gzip(&h), want, "{value}");
        }
    }

    static JS: Asset = Asset {
        path: "assets/app-1.js",
        body: b"plain",
        gzip: Some(b"zipped"),
    };

    #[tokio::test]
    async fn an_asset_is_served_compressed_cached_and_locked_to_this_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let resp = serve(&JS, &h);
        assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(resp.headers()[header::CACHE_CONTROL], IMMUTABLE);
        assert_eq!(resp.headers()[header::VARY], "accept-encoding");
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/javascript")
        );
        assert!(
            resp.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("default-src 'self'")
        );
        let body = axum::body::to_bytes(resp.into_body(), 100).await.unwrap();
        assert_eq!(&body[..], b"zipped");
        let plain = serve(&JS, &HeaderMap::new());
        assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
        let body = axum::body::to_bytes(plain.into_body(), 100).await.unwrap();
        assert_eq!(&body[..], b"plain");
    }

    #[tokio::test]
    async fn unknown_files_are_404_and_app_routes_get_the_index() {
        let missing = file(Path("assets/nope.js".into()), HeaderMap::new()).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let missing = file(Path("favicon.ico".into()), HeaderMap::new()).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        // An app route answers the index (or, in a build without the UI, the not-built page).
        let route = file(Path("runs/abc".into()), HeaderMap::new()).await;
        let want = if find("index.html").is_some() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        assert_eq!(route.status(), want);
        assert!(
            route.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
    }
}
