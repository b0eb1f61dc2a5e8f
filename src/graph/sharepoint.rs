//! SharePoint's REST API beside Graph, for the field writes Graph refuses (graph-api.md §14):
//! `ValidateUpdateListItem` on an item that Graph created or updated.
//!
//! Contract:
//! - **Where**: `<sharepoint_url><site path>/_api/web/lists(guid'<list>')/items(<id>)/
//!   ValidateUpdateListItem`; `sharepoint_url` defaults to `https://` + the site's host name.
//! - **Token**: the SharePoint resource of the site's host (`https://<host>/.default`), from the
//!   same token endpoint and credential as Graph's, cached and refreshed the same way
//!   ([`super::auth::TokenProvider`]). SharePoint refuses app-only tokens from a client secret
//!   (401 "Unsupported app only token"); the configuration check says so up front.
//! - **Rate and retries**: like a Graph PATCH: priced by [`super::limiter::Cost`], admitted by
//!   the tenant's shared limiter, 429/503 pause the tenant, transient failures are retried
//!   (the call sets values, so repeating it is harmless).
//! - **Answer**: HTTP 200 even when a field is refused; every entry is read and the first refused
//!   one becomes a non-retryable [`GraphError::Client4xx`] naming the field.

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::client::{GraphClient, Idempotency, Lineage, Req};
use super::error::GraphError;

/// The REST root and token scope of one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePointSite {
    /// `<sharepoint_url><site path>` without a trailing slash.
    pub web: String,
    /// `https://<site host>/.default`.
    pub scope: String,
}

impl SharePointSite {
    /// From the site's `webUrl` (`https://contoso.sharepoint.com/sites/ops`) and the configured
    /// REST root, if any (the emulator's address in tests and the demo).
    pub fn new(web_url: &str, sharepoint_url: Option<&Url>) -> Result<SharePointSite, GraphError> {
        let web = Url::parse(web_url)
            .map_err(|e| GraphError::Invalid(format!("site webUrl {web_url:?}: {e}")))?;
        let host = web
            .host_str()
            .ok_or_else(|| GraphError::Invalid(format!("site webUrl {web_url:?} has no host")))?;
        let root = match sharepoint_url {
            Some(u) => u.as_str().trim_end_matches('/').to_string(),
            None => format!("https://{host}"),
        };
        Ok(SharePointSite {
            web: format!("{root}{}", web.path().trim_end_matches('/')),
            scope: format!("https://{host}/.default"),
        })
    }

    fn item_url(&self, list_id: &str, item_id: &str) -> String {
        format!(
            "{}/_api/web/lists(guid'{}')/items({})/ValidateUpdateListItem",
            self.web,
            list_id.trim_matches(|c| c == '{' || c == '}'),
            item_id
        )
    }
}

/// One entry of the answer (`ListItemFormUpdateValue`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FieldResult {
    pub field_name: String,
    #[serde(default)]
    pub field_value: Option<String>,
    #[serde(default)]
    pub has_exception: bool,
    #[serde(default)]
    pub error_code: i64,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// A hyperlink as a person types it in a form: `URL, description` (§14). A comma in the URL is
/// written `,,` so SharePoint does not take it for the separator.
pub fn hyperlink_form_value(v: &Value) -> String {
    let Some(url) = v.get("Url").and_then(Value::as_str) else {
        return String::new();
    };
    let description = v.get("Description").and_then(Value::as_str).unwrap_or(url);
    format!("{}, {description}", url.replace(',', ",,"))
}

impl GraphClient {
    /// Sets `values` (internal name, form value; `""` clears) on an item through SharePoint REST.
    /// `Ok` only when every field was accepted.
    pub async fn validate_update_list_item(
        &self,
        site: &SharePointSite,
        list_id: &str,
        item_id: &str,
        values: &[(String, String)],
    ) -> Result<(Vec<FieldResult>, Lineage), GraphError> {
        let body = json!({
            "formValues": values
                .iter()
                .map(|(k, v)| json!({ "FieldName": k, "FieldValue": v }))
                .collect::<Vec<_>>(),
            "bNewDocumentUpdate": false,
        });
        let mut req = Req::new(Method::POST, site.item_url(list_id, item_id));
        req.body = Some(&body);
        // It sets values: repeating it is harmless, so transient failures are retried.
        req.idempotency = Idempotency::Idempotent;
        req.sharepoint_scope = Some(site.scope.clone());
        let resp = self.execute(&req).await?;
        let results = parse_results(&resp.body)?;
        if let Some(bad) = results.iter().find(|r| r.has_exception) {
            return Err(GraphError::Client4xx {
                status: 200,
                code: format!("SharePoint error {}", bad.error_code),
                message: format!(
                    "field {} refused by ValidateUpdateListItem: {}",
                    bad.field_name,
                    bad.error_message.as_deref().unwrap_or("(no message)")
                ),
                request_id: resp.lineage.request_id.clone(),
            });
        }
        Ok((results, resp.lineage))
    }
}

/// `{"value": [...]}` (odata=nometadata), `{"d": {"ValidateUpdateListItem": {"results": [...]}}}`
/// (verbose) or a bare array.
fn parse_results(body: &[u8]) -> Result<Vec<FieldResult>, GraphError> {
    let decode = |message: String| GraphError::Decode {
        what: "ValidateUpdateListItem".into(),
        message,
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| decode(e.to_string()))?;
    let list = match &v {
        Value::Array(_) => &v,
        _ if v.get("value").is_some() => &v["value"],
        _ => &v["d"]["ValidateUpdateListItem"]["results"],
    };
    serde_json::from_value(list.clone()).map_err(|e| decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_root_defaults_to_the_host_and_scope_names_it() {
        let s = SharePointSite::new("https://contoso.sharepoint.com/sites/ops/", None).unwrap();
        assert_eq!(s.web, "https://contoso.sharepoint.com/sites/ops");
        assert_eq!(s.scope, "https://contoso.sharepoint.com/.default");
        let emu = Url::parse("http://127.0.0.1:8919/").unwrap();
        let s = SharePointSite::new("https://contoso.sharepoint.com/", Some(&emu)).unwrap();
        assert_eq!(s.web, "http://127.0.0.1:8919");
        assert_eq!(s.scope, "https://contoso.sharepoint.com/.default");
        assert_eq!(
            s.item_url("{AB-12}", "7"),
            "http://127.0.0.1:8919/_api/web/lists(guid'AB-12')/items(7)/ValidateUpdateListItem"
        );
    }

    #[test]
    fn hyperlink_form_value_is_url_comma_description() {
        let v = json!({"Url": "https://x.org/a,b", "Description": "Docs"});
        assert_eq!(hyperlink_form_value(&v), "https://x.org/a,,b, Docs");
        assert_eq!(
            hyperlink_form_value(&json!({"Url": "https://x.org"})),
            "https://x.org, https://x.org"
        );
        assert_eq!(hyperlink_form_value(&Value::Null), "");
    }

    #[test]
    fn every_answer_shape_is_read() {
        let entry = r#"{"FieldName":"Link","FieldValue":"u, d","HasException":true,"ErrorCode":-2130575155,"ErrorMessage":"bad"}"#;
        for body in [
            format!("[{entry}]"),
            format!(r#"{{"value":[{entry}]}}"#),
            format!(r#"{{"d":{{"ValidateUpdateListItem":{{"results":[{entry}]}}}}}}"#),
        ] {
            let r = parse_results(body.as_bytes()).unwrap();
            assert_eq!(r.len(), 1);
            assert!(r[0].has_exception);
            assert_eq!(r[0].field_name, "Link");
        }
        assert!(parse_results(b"{}").is_err());
    }
}
