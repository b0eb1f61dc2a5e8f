//! graph-api.md §1: token endpoint, client assertion, 401 on Graph calls, common headers.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::json;
use syncbridge::emulator::EmulatorArgs;

use crate::common::*;

#[tokio::test]
async fn token_success_has_documented_fields() {
    let emu = Emu::start().await;
    let r = emu
        .token_request(
            TENANT,
            form(&[
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                ("client_secret", SECRET),
                ("grant_type", "client_credentials"),
            ]),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 3599);
    assert!(r.body["ext_expires_in"].is_number());
    assert!(
        r.body["access_token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3)
    );
    assert!(r.body.get("refresh_token").is_none());
}

#[tokio::test]
async fn token_errors_follow_the_identity_platform_shape() {
    let emu = Emu::start().await;
    let cases = [
        (
            TENANT,
            vec![
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                ("client_secret", "wrong"),
                ("grant_type", "client_credentials"),
            ],
            401,
            "invalid_client",
        ),
        (
            TENANT,
            vec![
                ("client_id", "00000000-0000-0000-0000-000000000000"),
                ("scope", SCOPE),
                ("client_secret", SECRET),
                ("grant_type", "client_credentials"),
            ],
            400,
            "unauthorized_client",
        ),
        (
            TENANT,
            vec![
                ("client_id", CLIENT_ID),
                ("scope", "https://graph.microsoft.com/Sites.Read.All"),
                ("client_secret", SECRET),
                ("grant_type", "client_credentials"),
            ],
            400,
            "invalid_scope",
        ),
        (
            TENANT,
            vec![
                ("client_id", CLIENT_ID),
                ("scope", "https://outlook.office.com/.default"),
                ("client_secret", SECRET),
                ("grant_type", "client_credentials"),
            ],
            400,
            "invalid_scope",
        ),
        (
            TENANT,
            vec![
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                ("client_secret", SECRET),
                ("grant_type", "password"),
            ],
            400,
            "unsupported_grant_type",
        ),
        (
            TENANT,
            vec![
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                ("grant_type", "client_credentials"),
            ],
            401,
            "invalid_client",
        ),
        (
            "fabrikam.onmicrosoft.com",
            vec![
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                ("client_secret", SECRET),
                ("grant_type", "client_credentials"),
            ],
            400,
            "invalid_request",
        ),
    ];
    for (tenant, pairs, status, error) in cases {
        let r = emu.token_request(tenant, form(&pairs)).await;
        assert_eq!(r.status, status, "{pairs:?} → {:?}", r.body);
        assert_eq!(r.body["error"], error, "{pairs:?}");
        assert!(
            r.body["error_description"]
                .as_str()
                .is_some_and(|d| d.starts_with("AADSTS"))
        );
        assert!(
            r.body["error_codes"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        );
        assert!(
            r.body["trace_id"].is_string()
                && r.body["correlation_id"].is_string()
                && r.body["timestamp"].is_string()
        );
    }
}

#[tokio::test]
async fn secret_via_basic_auth_is_accepted() {
    let emu = Emu::start().await;
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{SECRET}"));
    let r = emu
        .http
        .post(emu.token_url())
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("scope", SCOPE),
            ("grant_type", "client_credentials"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

fn assertion(
    key_pem: &[u8],
    cert_pem: Option<&[u8]>,
    aud: &str,
    iss: &str,
    exp_offset: i64,
) -> String {
    let mut header = Header::new(Algorithm::RS256);
    if let Some(cert) = cert_pem {
        use base64::Engine;
        use sha2::Digest;
        let text = String::from_utf8_lossy(cert);
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        header.x5t_s256 = Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der)),
        );
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({ "aud": aud, "iss": iss, "sub": iss, "jti": uuid::Uuid::new_v4().to_string(),
                         "nbf": now, "iat": now, "exp": now + exp_offset });
    jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(key_pem).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn certificate_client_assertion() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator/fixtures");
    let cert = std::fs::read(dir.join("app-cert.pem")).unwrap();
    let key = std::fs::read(dir.join("app-key.pem")).unwrap();
    let other = std::fs::read(dir.join("other-key.pem")).unwrap();
    let emu = Emu::start_with(EmulatorArgs {
        client_certs: vec![dir.join("app-cert.pem")],
        ..EmulatorArgs::default()
    })
    .await;
    let aud = format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token");
    let send = |jwt: String| {
        emu.token_request(
            TENANT,
            form(&[
                ("client_id", CLIENT_ID),
                ("scope", SCOPE),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &jwt),
                ("grant_type", "client_credentials"),
            ]),
        )
    };
    let ok = send(assertion(&key, Some(&cert), &aud, CLIENT_ID, 600)).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let token = ok.body["access_token"].as_str().unwrap().to_string();
    let site = emu
        .call_as(&token, Method::GET, "/v1.0/sites/root", None, &[])
        .await;
    assert_eq!(site.status, 200);

    for (jwt, why) in [
        (
            assertion(&other, Some(&cert), &aud, CLIENT_ID, 600),
            "signed by an unregistered key",
        ),
        (
            assertion(
                &key,
                Some(&cert),
                "https://login.microsoftonline.com/other/oauth2/v2.0/token",
                CLIENT_ID,
                600,
            ),
            "wrong audience",
        ),
        (
            assertion(&key, Some(&cert), &aud, USER_CLIENT_ID, 600),
            "iss/sub not the client",
        ),
        (
            assertion(&key, Some(&cert), &aud, CLIENT_ID, -60),
            "expired",
        ),
        ("not.a.jwt".to_string(), "garbage"),
    ] {
        let r = send(jwt).await;
        assert!(r.status == 401 || r.status == 400, "{why}: {}", r.status);
        assert_eq!(r.body["error"], "invalid_client", "{why}: {:?}", r.body);
    }
}

#[tokio::test]
async fn graph_rejects_missing_wrong_and_expired_tokens() {
    let emu = Emu::start().await;
    let url = format!("{}/v1.0/sites/root", emu.base);
    let none = emu.http.get(&url).send().await.unwrap();
    assert_eq!(none.status().as_u16(), 401);
    let www = none
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        www.contains("00000003-0000-0000-c000-000000000000"),
        "{www}"
    );
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
    assert!(body["error"]["innerError"]["request-id"].is_string());

    for bad in ["garbage", "a.b.c", &format!("{}x", emu.token)] {
        let r = emu
            .call_as(bad, Method::GET, "/v1.0/sites/root", None, &[])
            .await;
        assert_eq!(r.status, 401, "{bad}");
        assert_eq!(r.code(), "InvalidAuthenticationToken");
    }

    // Forced expiry mid-run.
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    assert_eq!(emu.admin("expire-tokens", json!({})).await.status, 204);
    let r = emu.get("/v1.0/sites/root").await;
    assert_eq!(r.status, 401);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("expired")
    );
    let fresh = emu.token_for(CLIENT_ID, SECRET).await;
    assert_eq!(
        emu.call_as(&fresh, Method::GET, "/v1.0/sites/root", None, &[])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn tokens_expire_after_their_lifetime() {
    let emu = Emu::start_with(EmulatorArgs {
        token_lifetime_secs: 120,
        ..EmulatorArgs::default()
    })
    .await;
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    emu.admin("clock/advance", json!({ "secs": 119 })).await;
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 200);
    emu.admin("clock/advance", json!({ "secs": 2 })).await;
    assert_eq!(emu.get("/v1.0/sites/root").await.status, 401);
}

#[tokio::test]
async fn every_response_carries_request_ids_and_odata_headers() {
    let emu = Emu::start().await;
    let r = emu
        .call(
            Method::GET,
            "/v1.0/sites/root",
            None,
            &[("client-request-id", "my-corr-id")],
        )
        .await;
    assert_eq!(r.header("client-request-id"), Some("my-corr-id"));
    assert!(
        r.header("request-id")
            .is_some_and(|v| uuid::Uuid::parse_str(v).is_ok())
    );
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert!(
        r.header("content-type").is_some_and(
            |c| c.starts_with("application/json") && c.contains("odata.metadata=minimal")
        )
    );
    // Without a client-request-id, it equals request-id; errors carry both too.
    let e = emu.get("/v1.0/sites/nowhere.example.com:/sites/x").await;
    assert_eq!(e.status, 404);
    assert_eq!(e.header("client-request-id"), e.header("request-id"));
    assert_eq!(
        e.body["error"]["innerError"]["request-id"].as_str(),
        e.header("request-id")
    );
    let tok = emu
        .token_request(TENANT, form(&[("grant_type", "client_credentials")]))
        .await;
    assert!(tok.header("request-id").is_some() && tok.header("client-request-id").is_some());
}
