//! Black-box helpers: start an emulator in-process and talk to it over HTTP only.

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use syncbridge::emulator::{self, EmulatorArgs, RunningEmulator};

pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const SECRET: &str = "dev-secret";
pub const USER_CLIENT_ID: &str = "99999999-8888-7777-6666-555555555555";
pub const USER_SECRET: &str = "user-secret";
pub const SCOPE: &str = "https://graph.microsoft.com/.default";

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

#[derive(Debug)]
pub struct Emu {
    pub running: Option<RunningEmulator>,
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Emu {
    pub async fn start() -> Emu {
        Emu::start_with(EmulatorArgs::default()).await
    }

    pub async fn start_with(args: EmulatorArgs) -> Emu {
        let running = emulator::spawn(args).await.expect("emulator starts");
        let base = running.base_url();
        let http = reqwest::Client::new();
        let mut emu = Emu {
            running: Some(running),
            base,
            http,
            token: String::new(),
        };
        emu.token = emu.token_for(CLIENT_ID, SECRET).await;
        emu
    }

    pub fn token_url(&self) -> String {
        format!("{}/{TENANT}/oauth2/v2.0/token", self.base)
    }

    pub async fn token_request(&self, tenant: &str, body: String) -> Resp {
        let r = self
            .http
            .post(format!("{}/{tenant}/oauth2/v2.0/token", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("token request");
        to_resp(r).await
    }

    pub async fn token_for(&self, client: &str, secret: &str) -> String {
        let body = form(&[
            ("client_id", client),
            ("scope", SCOPE),
            ("client_secret", secret),
            ("grant_type", "client_credentials"),
        ]);
        let r = self.token_request(TENANT, body).await;
        assert_eq!(r.status, 200, "token: {:?}", r.body);
        r.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        self.call_as(&self.token, method, path, body, headers).await
    }

    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut rb = self
            .http
            .request(method, url)
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        to_resp(rb.send().await.expect("request")).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(body), &[]).await
    }

    pub async fn admin(&self, path: &str, body: Value) -> Resp {
        let r = self
            .http
            .post(format!("{}/_emulator/{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("admin request");
        to_resp(r).await
    }

    pub async fn stats(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/_emulator/stats", self.base))
            .send()
            .await
            .expect("stats");
        to_resp(r).await.body
    }

    /// The default site's composite id, looked up by path.
    pub async fn site_id(&self) -> String {
        let r = self
            .get("/v1.0/sites/contoso.sharepoint.com:/sites/dev")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["id"].as_str().expect("site id").to_string()
    }

    /// Creates a list on the default site and returns `/v1.0/sites/{id}/lists/{listId}`.
    pub async fn create_list(&self, name: &str, columns: Value) -> String {
        let site = self.site_id().await;
        let r = self
            .post(&format!("/v1.0/sites/{site}/lists"), json!({ "displayName": name, "columns": columns, "list": { "template": "genericList" } }))
            .await;
        assert_eq!(r.status, 201, "create list: {:?}", r.body);
        format!(
            "/v1.0/sites/{site}/lists/{}",
            r.body["id"].as_str().expect("list id")
        )
    }

    pub async fn create_item(&self, list: &str, fields: Value) -> Resp {
        self.post(&format!("{list}/items"), json!({ "fields": fields }))
            .await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }
}

async fn to_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap_or_default();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Resp {
        status,
        headers,
        body,
    }
}
