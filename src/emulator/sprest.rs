//! SharePoint REST beside Graph (graph-api.md §14): `ValidateUpdateListItem` on an item, the
//! call that writes the hyperlink fields Graph refuses.
//!
//! `POST /<site path>/_api/web/lists(guid'<id>')/items(<n>)/ValidateUpdateListItem` (or
//! `lists/GetByTitle('<title>')`), body `{"formValues": [{"FieldName", "FieldValue"}],
//! "bNewDocumentUpdate"}`. As SharePoint does:
//! - the token must be for a SharePoint resource and, app-only, from a certificate (the server
//!   checks that before it gets here: [`super::auth::Identity::verify_sharepoint`]);
//! - every value is a string as a person would type it (hyperlink `URL, description`, a comma
//!   in the URL doubled);
//! - the answer is HTTP 200 with one entry per field; a refused field has `HasException: true`
//!   and the accepted ones are applied anyway (one new item version);
//! - errors outside the fields (no such list or item) are `{"odata.error": …}`.
//!
//! It runs through the same fault, throttling and statistics pipeline as Graph calls
//! ([`super::graph::execute`]).

use serde_json::{Map, Value, json};

use super::graph::{Call, Caller, Env, apply_item_changes};
use super::model::{Kind, WriteEnv, validate_fields};
use super::reply::{GraphError, GraphResult, Reply};
use super::state::State;

/// SharePoint's error code for a value a field cannot take (`SPFieldValidationException`).
const FIELD_VALUE_ERROR: i64 = -2_130_575_155;

/// Handles a call whose path holds `/_api/`.
pub fn dispatch(st: &mut State, env: &Env, caller: &Caller, call: &Call) -> GraphResult {
    let Some((site_path, api)) = call.path.split_once("/_api/") else {
        return Ok(odata_error(404, "The endpoint was not found."));
    };
    let Some((list_ref, item_id)) = parse_item_call(api) else {
        return Ok(odata_error(
            404,
            &format!(
                "The emulator implements only .../items(<id>)/ValidateUpdateListItem, not {api:?}."
            ),
        ));
    };
    if call.method != "POST" {
        return Ok(odata_error(405, "Use POST."));
    }
    let site_path = site_path.trim_end_matches('/');
    let Some(si) = st
        .sites
        .iter()
        .position(|s| s.meta.path.eq_ignore_ascii_case(site_path))
    else {
        return Ok(odata_error(404, &format!("No site at {site_path:?}.")));
    };
    let Some(li) = st.sites[si].find_list(&list_ref) else {
        return Ok(odata_error(
            404,
            &format!("List '{list_ref}' does not exist at site with URL '{site_path}'."),
        ));
    };
    if !st.sites[si].lists[li].items.contains_key(&item_id) {
        return Ok(odata_error(
            404,
            "Item does not exist. It may have been deleted by another user.",
        ));
    }
    let form = form_values(call.body.as_ref())?;
    let (results, changes) = validate_form(st, (si, li, item_id), &form);
    if !changes.is_empty() {
        apply_item_changes(st, env, caller, (si, li, item_id), changes)?;
    }
    Ok(Reply::json(200, json!({ "value": results })))
}

/// `web/lists(guid'<id>')/items(<n>)/ValidateUpdateListItem` or
/// `web/lists/GetByTitle('<title>')/items(<n>)/ValidateUpdateListItem` → (list key, item id).
fn parse_item_call(api: &str) -> Option<(String, u64)> {
    let rest = api.strip_prefix("web/lists")?;
    let (list, rest) = if let Some(r) = rest.strip_prefix("(guid'") {
        r.split_once("')")?
    } else {
        const BY_TITLE: &str = "/GetByTitle('";
        let r = rest
            .get(..BY_TITLE.len())
            .filter(|p| p.eq_ignore_ascii_case(BY_TITLE))
            .map(|_| &rest[BY_TITLE.len()..])?;
        r.split_once("')")?
    };
    let rest = rest.strip_prefix("/items(")?;
    let (id, method) = rest.split_once(')')?;
    method
        .eq_ignore_ascii_case("/ValidateUpdateListItem")
        .then_some(())?;
    let list = percent_decode(list).replace("''", "'");
    Some((list, id.trim().parse().ok()?))
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The `formValues` of the body: (field name, typed value).
fn form_values(body: Option<&Value>) -> Result<Vec<(String, String)>, GraphError> {
    let bad = || GraphError::invalid("The body must hold formValues: [{FieldName, FieldValue}]");
    let values = body
        .and_then(|b| b.get("formValues"))
        .and_then(Value::as_array)
        .ok_or_else(bad)?;
    values
        .iter()
        .map(|v| {
            let name = v.get("FieldName").and_then(Value::as_str).ok_or_else(bad)?;
            let value = v.get("FieldValue").and_then(Value::as_str).unwrap_or("");
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// One answer entry per field, and the changes of the accepted ones. Each field is checked on
/// its own (so one refusal leaves the others applied), as Graph would check its typed value,
/// except that hyperlinks are accepted: this is the API that writes them.
fn validate_form(
    st: &State,
    (si, li, id): (usize, usize, u64),
    form: &[(String, String)],
) -> (Vec<Value>, Vec<(String, Option<Value>)>) {
    let site = &st.sites[si];
    let list = &site.lists[li];
    let item = list.items.get(&id);
    let env = WriteEnv {
        utc_offset_minutes: st.settings.utc_offset_minutes,
        hyperlink_writes: true,
    };
    let mut results = Vec::new();
    let mut changes = Vec::new();
    for (name, text) in form {
        let typed = match list.column(name) {
            Some(col) => Ok(typed_value(&col.kind, text)),
            None => Err(format!(
                "Column '{name}' does not exist. It may have been deleted by another user."
            )),
        };
        let checked = typed.and_then(|v| {
            let mut one = Map::new();
            one.insert(name.clone(), v);
            validate_fields(site, list, item, &one, env).map_err(|e| e.message)
        });
        let (error, message) = match checked {
            Ok(c) => {
                changes.extend(c);
                (0, None)
            }
            Err(m) => (FIELD_VALUE_ERROR, Some(m)),
        };
        results.push(json!({
            "FieldName": name,
            "FieldValue": text,
            "HasException": message.is_some(),
            "ErrorCode": error,
            "ErrorMessage": message,
            "ItemId": id,
        }));
    }
    (results, changes)
}

/// A form string as the typed value a Graph write would carry (`""` clears the field).
fn typed_value(kind: &Kind, text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    match kind {
        Kind::Hyperlink { .. } => {
            let (url, description) = split_hyperlink(text);
            json!({ "Url": url, "Description": description })
        }
        Kind::Number { .. } | Kind::Currency { .. } => text
            .trim()
            .parse::<f64>()
            .map_or_else(|_| json!(text), |n| json!(n)),
        Kind::Boolean => match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => json!(true),
            "0" | "false" | "no" => json!(false),
            _ => json!(text),
        },
        _ => json!(text),
    }
}

/// `URL, description` with `,,` standing for a comma inside the URL; no separator: the URL is
/// its own description.
fn split_hyperlink(text: &str) -> (String, String) {
    let mut url = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != ',' {
            url.push(c);
            continue;
        }
        if chars.peek().map(|(_, n)| *n) == Some(',') {
            chars.next();
            url.push(',');
            continue;
        }
        let description = text[i + 1..].strip_prefix(' ').unwrap_or(&text[i + 1..]);
        return (url, description.to_string());
    }
    (url.clone(), url)
}

/// SharePoint REST's error shape.
fn odata_error(status: u16, message: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "odata.error": {
                "code": "-2130575338, Microsoft.SharePoint.SPException",
                "message": { "lang": "en-US", "value": message }
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_calls_parse_by_id_and_by_title() {
        assert_eq!(
            parse_item_call("web/lists(guid'0f3c-ab')/items(12)/ValidateUpdateListItem"),
            Some(("0f3c-ab".to_string(), 12))
        );
        assert_eq!(
            parse_item_call(
                "web/lists/GetByTitle('Bob''s%20list')/items(3)/validateupdatelistitem"
            ),
            Some(("Bob's list".to_string(), 3))
        );
        assert_eq!(parse_item_call("web/lists(guid'x')/items(1)/recycle"), None);
        assert_eq!(
            parse_item_call("web/lists(guid'x')/items(a)/ValidateUpdateListItem"),
            None
        );
    }

    #[test]
    fn hyperlink_text_splits_at_the_first_single_comma() {
        assert_eq!(
            split_hyperlink("https://x.org/a,,b, Docs, v2"),
            ("https://x.org/a,b".to_string(), "Docs, v2".to_string())
        );
        assert_eq!(
            split_hyperlink("https://x.org"),
            ("https://x.org".to_string(), "https://x.org".to_string())
        );
        assert_eq!(
            typed_value(&Kind::Hyperlink { is_picture: false }, "https://x.org, X"),
            json!({"Url": "https://x.org", "Description": "X"})
        );
        assert_eq!(typed_value(&Kind::Boolean, "1"), json!(true));
        assert_eq!(typed_value(&Kind::Boolean, ""), Value::Null);
    }
}
