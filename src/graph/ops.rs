//! Typed SharePoint operations (graph-api.md §2–§5) on top of the client core (`client.rs`).

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::client::{GraphClient, Lineage, Req, Resp};
use super::error::GraphError;
use super::limiter::Lane;

/// The opt-in header for `$filter` on non-indexed columns (§5.3); such queries may fail on lists over
/// 5,000 items.
pub const PREFER_NON_INDEXED: &str = "HonorNonIndexedQueriesWarningMayFailRandomly";
/// Items returned by [`GraphClient::list_items`] at most (the caller pages further with a narrower
/// filter); keeps memory bounded on a 30-million-item list.
pub const DEFAULT_ITEM_LIMIT: usize = 50_000;
/// Display name of the hidden list that maps people to their lookup ids on a site (§5.7).
pub const USER_INFORMATION_LIST: &str = "User Information List";
/// Column pages followed at most (a list has a few hundred columns at the very most).
const MAX_COLUMN_PAGES: usize = 50;

/// A site (§2.3); `id` is the composite `{hostname},{siteCollectionId},{webId}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Site {
    pub id: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
}

/// A list (§3.3), minimal.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListInfo {
    pub id: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
    #[serde(default)]
    pub e_tag: Option<String>,
}

/// A column definition (§4). Common properties are typed; the type facet (`text`, `number`,
/// `choice`, …) and anything else travel in `facet` unchanged, so every facet Graph knows can be sent
/// and compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColumnDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub indexed: bool,
    #[serde(default)]
    pub enforce_unique_values: bool,
    #[serde(default)]
    pub hidden: bool,
    #[serde(default, skip_serializing)]
    pub read_only: bool,
    #[serde(flatten)]
    pub facet: Map<String, Value>,
}

/// Known type facets (exactly one per column, §4.2).
const FACETS: &[&str] = &[
    "boolean",
    "calculated",
    "choice",
    "currency",
    "dateTime",
    "lookup",
    "number",
    "personOrGroup",
    "text",
    "term",
    "hyperlinkOrPicture",
    "thumbnail",
    "contentApprovalStatus",
    "geolocation",
];

impl ColumnDefinition {
    /// A column of type `facet` (e.g. `"text"`) with facet settings `settings` (`{}` for defaults).
    pub fn new(name: impl Into<String>, facet: &str, settings: Value) -> ColumnDefinition {
        let mut m = Map::new();
        m.insert(facet.to_string(), settings);
        ColumnDefinition {
            name: name.into(),
            display_name: None,
            id: None,
            required: false,
            indexed: false,
            enforce_unique_values: false,
            hidden: false,
            read_only: false,
            facet: m,
        }
    }

    /// Single line of text (`maxLength` 255).
    pub fn text(name: impl Into<String>) -> ColumnDefinition {
        ColumnDefinition::new(name, "text", json!({ "maxLength": 255 }))
    }

    /// The type facet's name, if the column has a known one.
    pub fn type_facet(&self) -> Option<&'static str> {
        FACETS.iter().copied().find(|f| self.facet.contains_key(*f))
    }

    pub fn required(mut self, v: bool) -> Self {
        self.required = v;
        self
    }
    pub fn indexed(mut self, v: bool) -> Self {
        self.indexed = v;
        self
    }
    pub fn unique(mut self, v: bool) -> Self {
        self.enforce_unique_values = v;
        self
    }
    pub fn hidden(mut self, v: bool) -> Self {
        self.hidden = v;
        self
    }
}

/// A list item (§5.9), minimal: id, eTag and the `fields` dictionary (internal names).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListItem {
    pub id: String,
    #[serde(default)]
    pub e_tag: Option<String>,
    #[serde(default)]
    pub fields: Map<String, Value>,
    /// Correlation ids of the request that returned this item.
    #[serde(skip)]
    pub lineage: Lineage,
}

/// Result of a `PATCH …/fields`: the full field set after the update.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldsUpdated {
    pub fields: Map<String, Value>,
    /// The item's new eTag (`fields.@odata.etag`).
    pub e_tag: Option<String>,
    pub lineage: Lineage,
}

/// Result of a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// 204: deleted by this call.
    Deleted(Lineage),
    /// 404: the item was already gone (deleted by someone else, or by an earlier attempt of this
    /// delete whose response was lost). Either way the desired end state holds. A 412 on a stale
    /// `If-Match` is still an error.
    AlreadyGone(Lineage),
}

/// Options of [`GraphClient::list_items`].
#[derive(Debug, Clone)]
pub struct ItemQuery {
    /// OData `$filter`, e.g. `fields/SyncKey eq 'a1'` (quote doubling is the caller's job).
    pub filter: Option<String>,
    /// Columns for `$expand=fields($select=…)`; all fields when `None`.
    pub select: Option<Vec<String>>,
    /// Page size (`$top`).
    pub top: Option<u32>,
    /// Send `Prefer: HonorNonIndexedQueriesWarningMayFailRandomly` (§5.3).
    pub allow_non_indexed: bool,
    /// Stop after this many items.
    pub limit: usize,
}

impl Default for ItemQuery {
    fn default() -> ItemQuery {
        ItemQuery {
            filter: None,
            select: None,
            top: None,
            allow_non_indexed: false,
            limit: DEFAULT_ITEM_LIMIT,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Page<T> {
    value: Vec<T>,
    #[serde(rename = "@odata.nextLink", default)]
    next_link: Option<String>,
}

/// Percent-encodes one path segment (list display names may contain spaces, `#`, `/`…).
pub(crate) fn enc_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes a query value (`%20` for spaces: `+` is not a space in every OData parser).
pub(crate) fn enc_query(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

pub(crate) fn decode<T: DeserializeOwned>(resp: &Resp, what: &str) -> Result<T, GraphError> {
    serde_json::from_slice(&resp.body).map_err(|e| GraphError::Decode {
        what: what.to_string(),
        message: e.to_string(),
    })
}

pub(crate) fn items_path(site_id: &str, list_id: &str) -> String {
    format!("/sites/{site_id}/lists/{}/items", enc_segment(list_id))
}

impl GraphClient {
    /// Resolves `hostname:/server-relative-path` (or a bare hostname for the root site) to the site;
    /// its `id` is the composite id used in every other call (§2.1).
    pub async fn resolve_site(&self, spec: &str) -> Result<Site, GraphError> {
        let url = match spec.split_once(":/") {
            Some((host, path)) => {
                let path: Vec<String> = path
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(enc_segment)
                    .collect();
                format!("/sites/{}:/{}", enc_segment(host), path.join("/"))
            }
            None => format!("/sites/{}", enc_segment(spec)),
        };
        let r = self.execute(&Req::new(Method::GET, url)).await?;
        decode(&r, "site")
    }

    /// A list by id or display name (§3.1); `None` when it does not exist.
    pub async fn get_list(
        &self,
        site_id: &str,
        id_or_name: &str,
    ) -> Result<Option<ListInfo>, GraphError> {
        let url = format!("/sites/{site_id}/lists/{}", enc_segment(id_or_name));
        match self.execute(&Req::new(Method::GET, url)).await {
            Ok(r) => decode(&r, "list").map(Some),
            Err(GraphError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a `genericList` with `columns` (§3.2). The server adds `Title` and assigns `name`.
    /// Not retried on transient failures (a retry could create a second list); look the list up
    /// by name before retrying.
    pub async fn create_list(
        &self,
        site_id: &str,
        display_name: &str,
        columns: &[ColumnDefinition],
    ) -> Result<ListInfo, GraphError> {
        let body = json!({
            "displayName": display_name,
            "columns": columns,
            "list": { "template": "genericList" },
        });
        let mut req = Req::new(Method::POST, format!("/sites/{site_id}/lists"));
        req.body = Some(&body);
        let r = self.execute(&req).await?;
        decode(&r, "created list")
    }

    /// Every column of a list, including hidden ones such as `SyncKey` (§4.1: hidden columns come
    /// back only when `hidden` is in `$select`, so every property we read is selected explicitly).
    pub async fn list_columns(
        &self,
        site_id: &str,
        list_id: &str,
    ) -> Result<Vec<ColumnDefinition>, GraphError> {
        let select = [
            "id",
            "name",
            "displayName",
            "hidden",
            "indexed",
            "enforceUniqueValues",
            "required",
            "readOnly",
        ]
        .iter()
        .chain(FACETS)
        .copied()
        .collect::<Vec<_>>()
        .join(",");
        let mut url = format!(
            "/sites/{site_id}/lists/{}/columns?$select={select}",
            enc_segment(list_id)
        );
        let mut out = Vec::new();
        for _ in 0..MAX_COLUMN_PAGES {
            let r = self.execute(&Req::new(Method::GET, url)).await?;
            let page: Page<ColumnDefinition> = decode(&r, "columns")?;
            out.extend(page.value);
            match page.next_link {
                Some(n) => url = n,
                None => return Ok(out),
            }
        }
        Err(GraphError::Decode {
            what: "columns".into(),
            message: format!("more than {MAX_COLUMN_PAGES} pages"),
        })
    }

    /// Adds a column to an existing list (§4.1).
    pub async fn create_column(
        &self,
        site_id: &str,
        list_id: &str,
        column: &ColumnDefinition,
    ) -> Result<ColumnDefinition, GraphError> {
        let body = serde_json::to_value(column).map_err(|e| GraphError::Invalid(e.to_string()))?;
        let mut req = Req::new(
            Method::POST,
            format!("/sites/{site_id}/lists/{}/columns", enc_segment(list_id)),
        );
        req.body = Some(&body);
        let r = self.execute(&req).await?;
        decode(&r, "created column")
    }

    /// Creates an item (§5.5). Retried on 429/503 only (rejected before being applied); a transient
    /// failure is returned because the create may have happened — reconcile by the unique `SyncKey`
    /// (a duplicate create then fails with [`GraphError::Conflict`]).
    pub async fn create_item(
        &self,
        site_id: &str,
        list_id: &str,
        fields: &Map<String, Value>,
    ) -> Result<ListItem, GraphError> {
        let body = json!({ "fields": fields });
        let mut req = Req::new(Method::POST, items_path(site_id, list_id));
        req.body = Some(&body);
        let r = self.execute(&req).await?;
        let mut item: ListItem = decode(&r, "created item")?;
        item.lineage = r.lineage;
        Ok(item)
    }

    /// Updates column values (§5.6); `if_match` (an eTag exactly as received) makes a stale write
    /// fail with [`GraphError::PreconditionFailed`] instead of overwriting.
    pub async fn update_item_fields(
        &self,
        site_id: &str,
        list_id: &str,
        item_id: &str,
        fields: &Map<String, Value>,
        if_match: Option<&str>,
    ) -> Result<FieldsUpdated, GraphError> {
        let body = Value::Object(fields.clone());
        let mut req = Req::new(
            Method::PATCH,
            format!(
                "{}/{}/fields",
                items_path(site_id, list_id),
                enc_segment(item_id)
            ),
        );
        req.body = Some(&body);
        req.if_match = if_match;
        let r = self.execute(&req).await?;
        let fields: Map<String, Value> = decode(&r, "updated fields")?;
        let e_tag = fields
            .get("@odata.etag")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(FieldsUpdated {
            fields,
            e_tag,
            lineage: r.lineage,
        })
    }

    /// Deletes an item (§5.6). A 404 is [`Deleted::AlreadyGone`], not an error (see there).
    pub async fn delete_item(
        &self,
        site_id: &str,
        list_id: &str,
        item_id: &str,
        if_match: Option<&str>,
    ) -> Result<Deleted, GraphError> {
        let mut req = Req::new(
            Method::DELETE,
            format!("{}/{}", items_path(site_id, list_id), enc_segment(item_id)),
        );
        req.if_match = if_match;
        match self.execute(&req).await {
            Ok(r) => Ok(Deleted::Deleted(r.lineage)),
            Err(GraphError::NotFound { detail }) => Ok(Deleted::AlreadyGone(Lineage {
                client_request_id: String::new(),
                request_id: detail.request_id,
            })),
            Err(e) => Err(e),
        }
    }

    /// One item with its fields (§5.4); `None` when it does not exist.
    pub async fn get_item(
        &self,
        site_id: &str,
        list_id: &str,
        item_id: &str,
    ) -> Result<Option<ListItem>, GraphError> {
        let url = format!(
            "{}/{}?$expand=fields",
            items_path(site_id, list_id),
            enc_segment(item_id)
        );
        match self.execute(&Req::new(Method::GET, url)).await {
            Ok(r) => {
                let mut item: ListItem = decode(&r, "item")?;
                item.lineage = r.lineage;
                Ok(Some(item))
            }
            Err(GraphError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Items matching `query`, with fields, following `@odata.nextLink` (§5.2) up to `query.limit`.
    pub async fn list_items(
        &self,
        site_id: &str,
        list_id: &str,
        query: &ItemQuery,
    ) -> Result<Vec<ListItem>, GraphError> {
        let expand = match &query.select {
            Some(cols) => format!("fields($select={})", cols.join(",")),
            None => "fields".to_string(),
        };
        let mut url = format!(
            "{}?$expand={}",
            items_path(site_id, list_id),
            enc_query(&expand)
        );
        if let Some(f) = &query.filter {
            url.push_str(&format!("&$filter={}", enc_query(f)));
        }
        if let Some(t) = query.top {
            url.push_str(&format!("&$top={t}"));
        }
        let mut out = Vec::new();
        loop {
            let mut req = Req::new(Method::GET, url);
            req.prefer = query.allow_non_indexed.then_some(PREFER_NON_INDEXED);
            let r = self.execute(&req).await?;
            let page: Page<ListItem> = decode(&r, "items page")?;
            out.extend(page.value);
            if out.len() >= query.limit {
                out.truncate(query.limit);
                return Ok(out);
            }
            match page.next_link {
                Some(n) => url = n,
                None => return Ok(out),
            }
        }
    }

    /// The person lookup id of the user with `email` on this site, `None` when the site does not
    /// know them.
    ///
    /// Person columns are written as `"<Column>LookupId": <id>` where the id is the user's item id
    /// in the site's hidden *User Information List* — not the Entra object id, and not the email
    /// (graph-api.md §5.7). So an email from the source is resolved by querying that list:
    /// `$filter=fields/EMail eq '<email>'` (quotes doubled, §5.3), selecting only `id` and `EMail`.
    /// SharePoint compares text case-insensitively. The Prefer header for non-indexed columns is
    /// sent because `EMail` need not be indexed there. A user who never visited the site (or was
    /// never added) has no entry yet; this does not add one.
    pub async fn find_user_lookup_id(
        &self,
        site_id: &str,
        email: &str,
    ) -> Result<Option<u64>, GraphError> {
        let query = ItemQuery {
            filter: Some(format!("fields/EMail eq '{}'", email.replace('\'', "''"))),
            select: Some(vec!["id".into(), "EMail".into()]),
            top: None,
            allow_non_indexed: true,
            limit: 1,
        };
        let items = self
            .list_items(site_id, USER_INFORMATION_LIST, &query)
            .await?;
        match items.first() {
            None => Ok(None),
            Some(item) => item.id.parse().map(Some).map_err(|_| GraphError::Decode {
                what: "user information list item".into(),
                message: format!("item id {:?} is not a number", item.id),
            }),
        }
    }

    /// One page of `items/delta` from `url` (the first call's relative URL or a `nextLink` /
    /// `deltaLink`), charged to the delta pollers' reserved lane (1 RU with a token, 2 without).
    pub async fn delta_page(&self, url: &str) -> Result<Value, GraphError> {
        let mut req = Req::new(Method::GET, url.to_string());
        req.lane = Lane::Delta;
        let r = self.execute(&req).await?;
        decode(&r, "delta page")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_definition_round_trips_facets() {
        let c = ColumnDefinition::text("SyncKey")
            .indexed(true)
            .unique(true)
            .hidden(true);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["text"]["maxLength"], 255);
        assert_eq!(v["enforceUniqueValues"], true);
        assert!(v.get("readOnly").is_none());
        let back: ColumnDefinition = serde_json::from_value(v).unwrap();
        assert_eq!(back.type_facet(), Some("text"));
        assert_eq!(back, c);
    }

    #[test]
    fn encoding() {
        assert_eq!(enc_segment("Sales Orders #1"), "Sales%20Orders%20%231");
        assert_eq!(
            enc_query("fields/A eq 'x+y'"),
            "fields%2FA%20eq%20%27x%2By%27"
        );
    }
}
