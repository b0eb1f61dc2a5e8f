//! The emulated SharePoint data: sites → lists → columns and items, the people directory, value
//! validation on writes (graph-api.md §5.5–5.7) and the JSON shapes Graph renders (§2.3, §3.3, §4, §5).
//!
//! Everything here is plain data plus pure functions; locking, HTTP and persistence live elsewhere.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::reply::GraphError;

/// Lookup id of the "SharePoint App" account that app-only writes are attributed to.
pub const APP_USER_LOOKUP_ID: u32 = 1_073_741_822;
/// Value of `AppAuthorLookupId` / `AppEditorLookupId` for writes by the registered app.
pub const APP_LOOKUP_ID: u32 = 3;
/// Internal-name length cap applied after `_xHHHH_` encoding (graph-api.md §4.4, UNCONFIRMED figure).
pub const MAX_INTERNAL_NAME: usize = 32;
/// Longest accepted multi-line text value (graph-api.md §10, commonly cited figure).
pub const MAX_NOTE_LEN: usize = 63_999;
/// Tombstones kept per list for delta; older ones are dropped and their tokens answer 410.
pub const MAX_TOMBSTONES: usize = 100_000;

/// A person in the site's hidden User Information List.
#[derive(Debug, Clone, Copy)]
pub struct Person {
    pub lookup_id: u32,
    pub aad_id: &'static str,
    pub name: &'static str,
    pub alias: &'static str,
}

/// The fixed people directory. `Adele Vance` is the person the second ("user") client acts as.
pub const PEOPLE: [Person; 4] = [
    Person {
        lookup_id: 6,
        aad_id: "48d31887-5fad-4d73-a9f5-3c356e68a038",
        name: "Megan Bowen",
        alias: "meganb",
    },
    Person {
        lookup_id: 7,
        aad_id: "87d349ed-44d7-43e1-9a83-5f2406dee5bd",
        name: "Adele Vance",
        alias: "adelev",
    },
    Person {
        lookup_id: 10,
        aad_id: "f2b9a4e1-9b3c-4d5e-8a7f-1c2d3e4f5a6b",
        name: "Alex Wilber",
        alias: "alexw",
    },
    Person {
        lookup_id: 11,
        aad_id: "5c1e8b0e-3f4a-4b6c-9d2e-7a8b9c0d1e2f",
        name: "Diego Siciliani",
        alias: "diegos",
    },
];

/// The lookup id the person client writes as.
pub const PERSON_CLIENT_LOOKUP_ID: u32 = 7;

/// A user who has left the directory: SharePoint keeps their User Information List entry (and
/// person fields that name them) but it has no email any more. Not in [`PEOPLE`]: no one finds
/// them by email, and they act as no client.
pub const FORMER_USER: Person = Person {
    lookup_id: 12,
    aad_id: "0b7e6c1d-2f3a-4e5b-8c9d-0e1f2a3b4c5d",
    name: "Former Employee",
    alias: "",
};

/// Anyone a person field may hold: [`PEOPLE`] and the [`FORMER_USER`].
pub fn person(lookup_id: u32) -> Option<&'static Person> {
    PEOPLE
        .iter()
        .chain(std::iter::once(&FORMER_USER))
        .find(|p| p.lookup_id == lookup_id)
}

/// Display name of every site's hidden list of people; person values are its item ids (§5.7).
pub const USER_INFO_LIST: &str = "User Information List";

/// The tenant's `onmicrosoft.com` domain as derived from a SharePoint hostname:
/// `contoso.sharepoint.com` → `contoso.onmicrosoft.com`.
pub fn tenant_domain(hostname: &str) -> String {
    let label = hostname.split('.').next().unwrap_or(hostname);
    format!("{}.onmicrosoft.com", label.to_ascii_lowercase())
}

impl Person {
    /// `<alias>@<tenant domain of the site's hostname>`, e.g. `adelev@contoso.onmicrosoft.com`.
    pub fn email(&self, hostname: &str) -> String {
        format!("{}@{}", self.alias, tenant_domain(hostname))
    }
}

/// The User Information List's id on a site (stable: derived from the site id).
pub fn user_info_list_id(site: &SiteMeta) -> Uuid {
    derived_uuid(Uuid::nil(), &format!("{USER_INFO_LIST}|{}", site.id))
}

/// Does `key` (a list id or display name from a URL) name the site's User Information List?
pub fn is_user_info_list(site: &SiteMeta, key: &str) -> bool {
    key.eq_ignore_ascii_case(USER_INFO_LIST)
        || Uuid::parse_str(key.trim_matches(|c| c == '{' || c == '}'))
            .is_ok_and(|id| id == user_info_list_id(site))
}

/// The site's hidden User Information List: one item per [`PEOPLE`] entry, item id = lookup id,
/// fields `Title` (name), `EMail`, `UserName` (both the email), `Name` (the claims login), and
/// the [`FORMER_USER`] with a name only. Virtual: built on demand, never stored, so it needs no
/// persistence and cannot be written.
pub fn user_info_list(site: &SiteMeta) -> List {
    let id = user_info_list_id(site);
    let created = site.created.div_euclid(1000);
    let text = |name: &str, display: &str, indexed: bool| Column {
        id: derived_uuid(id, name),
        name: name.into(),
        display_name: display.into(),
        description: String::new(),
        required: false,
        indexed,
        unique: false,
        hidden: false,
        read_only: true,
        builtin: false,
        kind: Kind::Text {
            max_len: 255,
            multiline: false,
            rich: false,
        },
    };
    let columns = vec![
        text("Title", "Name", false),
        text("EMail", "Work email", true),
        text("UserName", "User name", true),
        text("Name", "Account", false),
    ];
    let items = PEOPLE
        .iter()
        .chain(std::iter::once(&FORMER_USER))
        .map(|p| {
            let mut values = Map::new();
            values.insert("Title".into(), json!(p.name));
            if !p.alias.is_empty() {
                let email = p.email(&site.hostname);
                values.insert("EMail".into(), json!(email));
                values.insert("UserName".into(), json!(email));
                values.insert("Name".into(), json!(format!("i:0#.f|membership|{email}")));
            }
            let item = Item {
                id: u64::from(p.lookup_id),
                uid: derived_uuid(id, &format!("item|{}", p.lookup_id)),
                version: 1,
                created,
                modified: created,
                author: Actor::App,
                editor: Actor::App,
                seq: 0,
                values,
            };
            (item.id, item)
        })
        .collect::<BTreeMap<u64, Item>>();
    let mut list = List::new(ListMeta {
        id,
        display_name: USER_INFO_LIST.into(),
        name: "users".into(),
        description: "All people.".into(),
        template: "userInformation".into(),
        hidden: true,
        created,
        modified: created,
        version: 1,
        columns,
        next_id: items.keys().max().map_or(1, |m| m + 1),
        seq: 0,
        created_by: Actor::App,
    });
    list.items = items;
    list
}

/// Who made a write: the registered app (app-only token) or a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    App,
    Person(u32),
}

impl Actor {
    fn lookup_id(self) -> u32 {
        match self {
            Actor::App => APP_USER_LOOKUP_ID,
            Actor::Person(id) => id,
        }
    }
}

/// Context rendering needs that is not part of the data.
#[derive(Debug, Clone)]
pub struct RenderCtx<'a> {
    /// Base URL of this emulator (`http://host:port`), used for `@odata.*` links.
    pub base: &'a str,
    pub tenant: &'a str,
    pub app_id: &'a str,
    pub app_name: &'a str,
}

impl RenderCtx<'_> {
    pub fn identity(&self, actor: Actor) -> Value {
        match actor {
            Actor::App => json!({
                "application": { "id": self.app_id, "displayName": self.app_name },
                "user": { "displayName": "SharePoint App" }
            }),
            Actor::Person(id) => match person(id) {
                Some(p) => json!({ "user": {
                    "email": format!("{}@{}", p.alias, self.tenant),
                    "id": p.aad_id, "displayName": p.name } }),
                None => json!({ "user": { "displayName": format!("User {id}") } }),
            },
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Sites and lists
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteMeta {
    /// Composite id `{hostname},{siteCollectionId},{webId}`.
    pub id: String,
    pub hostname: String,
    /// Server-relative path: `""` for the tenant root site, else `/sites/x`.
    pub path: String,
    pub display_name: String,
    pub created: i64,
    #[serde(default)]
    pub group_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Site {
    pub meta: SiteMeta,
    pub lists: Vec<List>,
}

impl Site {
    /// Site ids are derived from hostname + path so they are stable across restarts.
    pub fn new(hostname: &str, path: &str, created: i64, group_id: Option<String>) -> Site {
        let h = |salt: &str| {
            use sha2::Digest;
            let d = sha2::Sha256::digest(format!(
                "{salt}|{}|{}",
                hostname.to_lowercase(),
                path.to_lowercase()
            ));
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            uuid::Builder::from_random_bytes(b).into_uuid()
        };
        let name = path
            .rsplit('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("Communication site");
        Site {
            meta: SiteMeta {
                id: format!("{hostname},{},{}", h("collection"), h("web")),
                hostname: hostname.to_string(),
                path: path.to_string(),
                display_name: name.to_string(),
                created,
                group_id,
            },
            lists: Vec::new(),
        }
    }

    pub fn web_url(&self) -> String {
        format!("https://{}{}", self.meta.hostname, self.meta.path)
    }

    pub fn find_list(&self, key: &str) -> Option<usize> {
        if let Ok(id) = Uuid::parse_str(key.trim_matches(|c| c == '{' || c == '}'))
            && let Some(i) = self.lists.iter().position(|l| l.meta.id == id)
        {
            return Some(i);
        }
        self.lists
            .iter()
            .position(|l| l.meta.display_name.eq_ignore_ascii_case(key))
            .or_else(|| {
                self.lists
                    .iter()
                    .position(|l| l.meta.name.eq_ignore_ascii_case(key))
            })
    }

    pub fn json(&self, ctx: &RenderCtx) -> Value {
        let mut v = json!({
            "createdDateTime": fmt_time_ms(self.meta.created),
            "description": "",
            "id": self.meta.id,
            "lastModifiedDateTime": fmt_time(self.meta.created / 1000),
            "name": self.meta.display_name,
            "webUrl": self.web_url(),
            "displayName": self.meta.display_name,
            "root": {},
            "siteCollection": { "hostname": self.meta.hostname },
        });
        let _ = ctx;
        if let Some(obj) = v.as_object_mut() {
            let parts: Vec<&str> = self.meta.id.split(',').collect();
            if parts.len() == 3 {
                obj.insert(
                    "sharepointIds".into(),
                    json!({ "siteId": parts[1], "webId": parts[2], "siteUrl": self.web_url() }),
                );
            }
        }
        v
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListMeta {
    pub id: Uuid,
    pub display_name: String,
    pub name: String,
    pub description: String,
    pub template: String,
    pub hidden: bool,
    pub created: i64,
    pub modified: i64,
    /// Schema version: the number in the list eTag; rises on every schema change.
    pub version: u64,
    pub columns: Vec<Column>,
    /// Next item id; ids are never reused.
    pub next_id: u64,
    /// Change sequence for delta: every item write/delete takes the next value.
    pub seq: u64,
    pub created_by: Actor,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tombstones {
    /// `(seq, item id)` in seq order.
    pub entries: VecDeque<(u64, u64)>,
    /// Delta tokens older than this seq can no longer be served (their tombstones were dropped).
    pub floor: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct List {
    pub meta: ListMeta,
    pub items: BTreeMap<u64, Item>,
    #[serde(default)]
    pub tombstones: Tombstones,
    /// Per unique column: normalized value → item id. Derived; rebuilt after load.
    #[serde(skip)]
    pub unique: HashMap<String, HashMap<String, u64>>,
}

impl List {
    pub fn new(meta: ListMeta) -> List {
        List {
            meta,
            items: BTreeMap::new(),
            tombstones: Tombstones::default(),
            unique: HashMap::new(),
        }
    }

    pub fn etag(&self) -> String {
        format!("\"{},{}\"", self.meta.id, self.meta.version)
    }

    pub fn web_url(&self, site: &SiteMeta) -> String {
        format!(
            "https://{}{}/Lists/{}",
            site.hostname,
            site.path,
            self.meta.name.replace(' ', "%20")
        )
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.meta.columns.iter().find(|c| c.name == name)
    }

    pub fn content_type_id(&self) -> String {
        format!("0x0100{}", self.meta.id.simple().to_string().to_uppercase())
    }

    /// Rebuilds the unique-value indexes from the items.
    pub fn rebuild_unique(&mut self) {
        self.unique.clear();
        for c in self.meta.columns.iter().filter(|c| c.unique) {
            let mut idx = HashMap::new();
            for it in self.items.values() {
                if let Some(k) = it.values.get(&c.name).and_then(unique_key) {
                    idx.insert(k, it.id);
                }
            }
            self.unique.insert(c.name.clone(), idx);
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.meta.seq += 1;
        self.meta.seq
    }

    /// Records a deletion for delta, dropping the oldest tombstone once the bound is reached.
    pub fn push_tombstone(&mut self, seq: u64, id: u64) {
        self.tombstones.entries.push_back((seq, id));
        while self.tombstones.entries.len() > MAX_TOMBSTONES {
            if let Some((s, _)) = self.tombstones.entries.pop_front() {
                self.tombstones.floor = s;
            }
        }
    }

    pub fn json(&self, site: &SiteMeta, ctx: &RenderCtx, with_columns: bool) -> Value {
        let etag = self.etag();
        let mut v = json!({
            "@odata.etag": etag,
            "createdDateTime": fmt_time(self.meta.created),
            "description": self.meta.description,
            "eTag": etag,
            "id": self.meta.id.to_string(),
            "lastModifiedDateTime": fmt_time(self.meta.modified),
            "name": self.meta.name,
            "webUrl": self.web_url(site),
            "displayName": self.meta.display_name,
            "createdBy": ctx.identity(self.meta.created_by),
            "parentReference": { "siteId": site.id },
            "list": { "contentTypesEnabled": false, "hidden": self.meta.hidden, "template": self.meta.template },
        });
        if with_columns && let Some(o) = v.as_object_mut() {
            let cols: Vec<Value> = self.all_columns(false).iter().map(|c| c.json()).collect();
            o.insert("columns".into(), Value::Array(cols));
        }
        v
    }

    /// The list's columns as `GET …/columns` shows them: user columns plus the built-in ones.
    pub fn all_columns(&self, include_hidden: bool) -> Vec<Column> {
        let mut out: Vec<Column> = self.meta.columns.clone();
        out.extend(builtin_columns(self.meta.id));
        if !include_hidden {
            out.retain(|c| !c.hidden);
        }
        out
    }
}

// ------------------------------------------------------------------------------------------------
// Columns
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Kind {
    Text {
        max_len: usize,
        multiline: bool,
        rich: bool,
    },
    Number {
        min: Option<f64>,
        max: Option<f64>,
        decimals: String,
        display_as: String,
    },
    Currency {
        locale: String,
    },
    DateTime {
        date_only: bool,
        display_as: String,
    },
    Boolean,
    Choice {
        choices: Vec<String>,
        allow_text: bool,
        display_as: String,
    },
    Person {
        multi: bool,
        choose_from: String,
        display_as: String,
    },
    Lookup {
        multi: bool,
        list_id: String,
        column_name: String,
        unlimited: bool,
    },
    Hyperlink {
        is_picture: bool,
    },
}

impl Kind {
    fn is_lookup(&self) -> bool {
        matches!(self, Kind::Person { .. } | Kind::Lookup { .. })
    }
    fn is_multi(&self) -> bool {
        match self {
            Kind::Choice { display_as, .. } => display_as == "checkBoxes",
            Kind::Person { multi, .. } | Kind::Lookup { multi, .. } => *multi,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Column {
    pub id: Uuid,
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub required: bool,
    pub indexed: bool,
    pub unique: bool,
    pub hidden: bool,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub builtin: bool,
    pub kind: Kind,
}

/// The facet keys Graph defines; the ones we do not emulate are rejected explicitly.
const KNOWN_FACETS: [&str; 14] = [
    "text",
    "number",
    "currency",
    "dateTime",
    "boolean",
    "choice",
    "personOrGroup",
    "lookup",
    "hyperlinkOrPicture",
    "calculated",
    "term",
    "thumbnail",
    "contentApprovalStatus",
    "geolocation",
];

impl Column {
    /// The `Title` column every genericList gets. Observed `required: false` on Graph-created lists.
    pub fn title(list_id: Uuid) -> Column {
        Column {
            id: derived_uuid(list_id, "Title"),
            name: "Title".into(),
            display_name: "Title".into(),
            description: String::new(),
            required: false,
            indexed: false,
            unique: false,
            hidden: false,
            read_only: false,
            builtin: false,
            kind: Kind::Text {
                max_len: 255,
                multiline: false,
                rich: false,
            },
        }
    }

    /// Parses a columnDefinition from a create request.
    pub fn from_json(def: &Value) -> Result<Column, GraphError> {
        let obj = def
            .as_object()
            .ok_or_else(|| GraphError::invalid("Invalid request"))?;
        let str_field = |k: &str| -> Result<Option<String>, GraphError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(GraphError::invalid(&format!(
                    "Invalid value for property '{k}'"
                ))),
            }
        };
        let bool_field = |k: &str| -> Result<bool, GraphError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(GraphError::invalid(&format!(
                    "Invalid value for property '{k}'"
                ))),
            }
        };
        let display = str_field("displayName")?;
        let raw_name = match (str_field("name")?, &display) {
            (Some(n), _) if !n.trim().is_empty() => n,
            (_, Some(d)) if !d.trim().is_empty() => d.clone(),
            _ => {
                return Err(GraphError::invalid(
                    "A column must have a 'name' or 'displayName'",
                ));
            }
        };
        let name = encode_internal_name(&raw_name);
        let facets: Vec<&str> = KNOWN_FACETS
            .iter()
            .copied()
            .filter(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
            .collect();
        if facets.len() != 1 {
            return Err(GraphError::invalid(
                "Unable to determine type of provided column definition",
            ));
        }
        let facet_name = facets[0];
        let facet = obj.get(facet_name).cloned().unwrap_or(Value::Null);
        let f = facet.as_object().cloned().unwrap_or_default();
        let fs = |k: &str, d: &str| f.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
        let fb = |k: &str| f.get(k).and_then(Value::as_bool).unwrap_or(false);
        let kind = match facet_name {
            "text" => {
                let multiline = fb("allowMultipleLines");
                let cap = if multiline { MAX_NOTE_LEN } else { 255 };
                let max_len = match f.get("maxLength") {
                    None | Some(Value::Null) => cap,
                    Some(v) => match v.as_u64() {
                        Some(n) if n >= 1 && n as usize <= cap => n as usize,
                        _ => {
                            return Err(GraphError::invalid(&format!(
                                "maxLength must be between 1 and {cap}"
                            )));
                        }
                    },
                };
                Kind::Text {
                    max_len,
                    multiline,
                    rich: fs("textType", "plain") == "richText",
                }
            }
            "number" => Kind::Number {
                min: f.get("minimum").and_then(Value::as_f64),
                max: f.get("maximum").and_then(Value::as_f64),
                decimals: fs("decimalPlaces", "automatic"),
                display_as: fs("displayAs", "number"),
            },
            "currency" => Kind::Currency {
                locale: fs("locale", "en-us"),
            },
            "dateTime" => {
                let format = fs("format", "dateTime");
                if format != "dateTime" && format != "dateOnly" {
                    return Err(GraphError::invalid(
                        "dateTime.format must be 'dateOnly' or 'dateTime'",
                    ));
                }
                Kind::DateTime {
                    date_only: format == "dateOnly",
                    display_as: fs("displayAs", "default"),
                }
            }
            "boolean" => Kind::Boolean,
            "choice" => {
                let choices: Vec<String> = match f.get("choices") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect(),
                    _ => Vec::new(),
                };
                if choices.len() > 1000 {
                    return Err(GraphError::invalid("Too many choices"));
                }
                Kind::Choice {
                    choices,
                    allow_text: fb("allowTextEntry"),
                    display_as: fs("displayAs", "dropDownMenu"),
                }
            }
            "personOrGroup" => Kind::Person {
                multi: fb("allowMultipleSelection"),
                choose_from: fs("chooseFromType", "peopleAndGroups"),
                display_as: fs("displayAs", "account"),
            },
            "lookup" => {
                let list_id = fs("listId", "");
                if list_id.is_empty() {
                    return Err(GraphError::invalid("lookup.listId is required"));
                }
                Kind::Lookup {
                    multi: fb("allowMultipleValues"),
                    list_id,
                    column_name: fs("columnName", "Title"),
                    unlimited: fb("allowUnlimitedLength"),
                }
            }
            "hyperlinkOrPicture" => Kind::Hyperlink {
                is_picture: fb("isPicture"),
            },
            other => {
                return Err(GraphError::new(
                    400,
                    "notSupported",
                    &format!("Columns of type '{other}' are not supported by the emulator"),
                ));
            }
        };
        let unique = bool_field("enforceUniqueValues")?;
        let indexed = bool_field("indexed")?;
        if unique && !indexed {
            return Err(GraphError::invalid(
                "Unique values can only be enforced on an indexed column; set 'indexed': true",
            ));
        }
        if unique && kind.is_multi() {
            return Err(GraphError::invalid(
                "Unique values cannot be enforced on a multi-value column",
            ));
        }
        Ok(Column {
            id: Uuid::new_v4(),
            name,
            display_name: display.unwrap_or(raw_name),
            description: str_field("description")?.unwrap_or_default(),
            required: bool_field("required")?,
            indexed,
            unique,
            hidden: bool_field("hidden")?,
            read_only: false,
            builtin: false,
            kind,
        })
    }

    pub fn json(&self) -> Value {
        let mut o = Map::new();
        o.insert(
            "columnGroup".into(),
            json!(if self.builtin {
                "Base Columns"
            } else {
                "Custom Columns"
            }),
        );
        o.insert("description".into(), json!(self.description));
        o.insert("displayName".into(), json!(self.display_name));
        o.insert("enforceUniqueValues".into(), json!(self.unique));
        o.insert("hidden".into(), json!(self.hidden));
        o.insert("id".into(), json!(self.id.to_string()));
        o.insert("indexed".into(), json!(self.indexed));
        o.insert("name".into(), json!(self.name));
        o.insert("readOnly".into(), json!(self.read_only));
        o.insert("required".into(), json!(self.required));
        let (facet, body) = match &self.kind {
            Kind::Text {
                max_len,
                multiline,
                rich,
            } => (
                "text",
                json!({ "allowMultipleLines": multiline, "appendChangesToExistingText": false,
                        "linesForEditing": if *multiline { 6 } else { 0 }, "maxLength": max_len,
                        "textType": if *rich { "richText" } else { "plain" } }),
            ),
            Kind::Number {
                min,
                max,
                decimals,
                display_as,
            } => {
                let mut n = json!({ "decimalPlaces": decimals, "displayAs": display_as });
                if let Some(o) = n.as_object_mut() {
                    if let Some(m) = min {
                        o.insert("minimum".into(), json!(m));
                    }
                    if let Some(m) = max {
                        o.insert("maximum".into(), json!(m));
                    }
                }
                ("number", n)
            }
            Kind::Currency { locale } => ("currency", json!({ "locale": locale })),
            Kind::DateTime {
                date_only,
                display_as,
            } => (
                "dateTime",
                json!({ "displayAs": display_as, "format": if *date_only { "dateOnly" } else { "dateTime" } }),
            ),
            Kind::Boolean => ("boolean", json!({})),
            Kind::Choice {
                choices,
                allow_text,
                display_as,
            } => (
                "choice",
                json!({ "allowTextEntry": allow_text, "choices": choices, "displayAs": display_as }),
            ),
            Kind::Person {
                multi,
                choose_from,
                display_as,
            } => (
                "personOrGroup",
                json!({ "allowMultipleSelection": multi, "chooseFromType": choose_from, "displayAs": display_as }),
            ),
            Kind::Lookup {
                multi,
                list_id,
                column_name,
                unlimited,
            } => (
                "lookup",
                json!({ "allowMultipleValues": multi, "allowUnlimitedLength": unlimited,
                        "columnName": column_name, "listId": list_id }),
            ),
            Kind::Hyperlink { is_picture } => {
                ("hyperlinkOrPicture", json!({ "isPicture": is_picture }))
            }
        };
        o.insert(facet.into(), body);
        Value::Object(o)
    }
}

fn derived_uuid(list: Uuid, name: &str) -> Uuid {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{list}|{name}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// Built-in columns shown by `GET …/columns` (read-only; some hidden).
fn builtin_columns(list: Uuid) -> Vec<Column> {
    let mk = |name: &str, display: &str, kind: Kind, hidden: bool| Column {
        id: derived_uuid(list, name),
        name: name.into(),
        display_name: display.into(),
        description: String::new(),
        required: false,
        indexed: matches!(name, "ID" | "Created" | "Modified" | "Author" | "Editor"),
        unique: false,
        hidden,
        read_only: true,
        builtin: true,
        kind,
    };
    let dt = || Kind::DateTime {
        date_only: false,
        display_as: "standard".into(),
    };
    let person = || Kind::Person {
        multi: false,
        choose_from: "peopleAndGroups".into(),
        display_as: "account".into(),
    };
    let text = || Kind::Text {
        max_len: 255,
        multiline: false,
        rich: false,
    };
    vec![
        mk(
            "ID",
            "ID",
            Kind::Number {
                min: None,
                max: None,
                decimals: "none".into(),
                display_as: "number".into(),
            },
            false,
        ),
        mk("ContentType", "Content Type", text(), false),
        mk("Modified", "Modified", dt(), false),
        mk("Created", "Created", dt(), false),
        mk("Author", "Created By", person(), false),
        mk("Editor", "Modified By", person(), false),
        mk("_UIVersionString", "Version", text(), false),
        mk("Attachments", "Attachments", Kind::Boolean, false),
        mk("Edit", "Edit", text(), false),
        mk("LinkTitleNoMenu", "Title", text(), false),
        mk("LinkTitle", "Title", text(), false),
        mk("ItemChildCount", "Item Child Count", text(), true),
        mk("FolderChildCount", "Folder Child Count", text(), true),
        mk(
            "AppAuthor",
            "App Created By",
            Kind::Lookup {
                multi: false,
                list_id: String::new(),
                column_name: "Title".into(),
                unlimited: false,
            },
            true,
        ),
        mk(
            "AppEditor",
            "App Modified By",
            Kind::Lookup {
                multi: false,
                list_id: String::new(),
                column_name: "Title".into(),
                unlimited: false,
            },
            true,
        ),
    ]
}

/// Field keys that exist on every item but can never be written through Graph.
pub const READ_ONLY_FIELDS: [&str; 22] = [
    "id",
    "ID",
    "ContentType",
    "Created",
    "Modified",
    "Author",
    "Editor",
    "AuthorLookupId",
    "EditorLookupId",
    "AppAuthorLookupId",
    "AppEditorLookupId",
    "AppAuthor",
    "AppEditor",
    "_UIVersionString",
    "Attachments",
    "Edit",
    "LinkTitle",
    "LinkTitleNoMenu",
    "ItemChildCount",
    "FolderChildCount",
    "_ComplianceFlags",
    "_ComplianceTag",
];

/// SharePoint's derivation of an internal name (`XmlConvert.EncodeName`-like, then truncated).
pub fn encode_internal_name(display: &str) -> String {
    let mut out = String::new();
    for (i, ch) in display.chars().enumerate() {
        let ok = ch.is_ascii_alphabetic() || ch == '_' || (i > 0 && ch.is_ascii_digit());
        if ok {
            out.push(ch);
        } else {
            let mut buf = [0u16; 2];
            for unit in ch.encode_utf16(&mut buf) {
                out.push_str(&format!("_x{unit:04x}_"));
            }
        }
    }
    // Truncate on a char boundary (all chars are ASCII after encoding).
    out.truncate(MAX_INTERNAL_NAME);
    out
}

// ------------------------------------------------------------------------------------------------
// Items
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub id: u64,
    pub uid: Uuid,
    pub version: u32,
    pub created: i64,
    pub modified: i64,
    pub author: Actor,
    pub editor: Actor,
    pub seq: u64,
    /// Column values keyed by internal name. Lookups/persons hold numbers (arrays when multi).
    pub values: Map<String, Value>,
}

impl Item {
    pub fn etag(&self) -> String {
        format!("\"{},{}\"", self.uid, self.version)
    }

    /// Does an `If-Match` header value match this item? `*` matches anything; surrounding quotes and
    /// the braced/upper-case GUID form are tolerated.
    pub fn etag_matches(&self, if_match: &str) -> bool {
        let want = if_match.trim();
        if want == "*" {
            return true;
        }
        let norm = |s: &str| {
            s.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .replace(['{', '}'], "")
                .to_lowercase()
        };
        want.split(',').count() >= 2 && norm(want) == norm(&self.etag())
    }
}

/// Normalized key for unique-value comparison (text compares case-insensitively, like SharePoint).
pub fn unique_key(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(format!("s:{}", s.to_lowercase())),
        Value::Number(n) => n.as_f64().map(|f| format!("n:{f}")),
        Value::Bool(b) => Some(format!("b:{b}")),
        other => Some(format!("j:{other}")),
    }
}

/// Which fields to render.
#[derive(Debug, Clone)]
pub enum FieldSel {
    All,
    Some(Vec<String>),
}

/// Options for rendering one listItem.
#[derive(Debug, Clone)]
pub struct ItemView<'a> {
    pub fields: Option<&'a FieldSel>,
    pub last_modified_by: bool,
}

pub fn item_json(site: &Site, list: &List, item: &Item, ctx: &RenderCtx, view: &ItemView) -> Value {
    let etag = item.etag();
    let mut o = Map::new();
    o.insert("@odata.etag".into(), json!(etag));
    o.insert("createdDateTime".into(), json!(fmt_time(item.created)));
    o.insert("eTag".into(), json!(etag));
    o.insert("id".into(), json!(item.id.to_string()));
    o.insert(
        "lastModifiedDateTime".into(),
        json!(fmt_time(item.modified)),
    );
    o.insert(
        "webUrl".into(),
        json!(format!("{}/{}_.000", list.web_url(&site.meta), item.id)),
    );
    o.insert("createdBy".into(), ctx.identity(item.author));
    if view.last_modified_by {
        o.insert("lastModifiedBy".into(), ctx.identity(item.editor));
    }
    o.insert(
        "parentReference".into(),
        json!({ "id": list.meta.id.to_string(), "siteId": site.meta.id }),
    );
    o.insert(
        "contentType".into(),
        json!({ "id": list.content_type_id(), "name": "Item" }),
    );
    if let Some(sel) = view.fields {
        o.insert(
            "fields@odata.context".into(),
            json!(format!(
                "{}/v1.0/$metadata#sites('{}')/lists('{}')/items('{}')/fields/$entity",
                ctx.base,
                site.meta.id.replace(',', "%2C"),
                list.meta.id,
                item.id
            )),
        );
        o.insert("fields".into(), fields_json(site, list, item, sel));
    }
    Value::Object(o)
}

/// The item's fieldValueSet: user columns (empty ones omitted) then the system keys.
pub fn fields_json(site: &Site, list: &List, item: &Item, sel: &FieldSel) -> Value {
    let mut all = Map::new();
    all.insert("@odata.etag".into(), json!(item.etag()));
    for col in &list.meta.columns {
        let Some(v) = item.values.get(&col.name) else {
            continue;
        };
        if v.is_null() {
            continue;
        }
        match &col.kind {
            Kind::Person { multi, .. } | Kind::Lookup { multi, .. } => {
                if *multi {
                    all.insert(col.name.clone(), lookup_objects(site, col, v));
                } else if let Some(n) = v.as_u64() {
                    all.insert(format!("{}LookupId", col.name), json!(n.to_string()));
                }
            }
            _ => {
                all.insert(col.name.clone(), v.clone());
            }
        }
    }
    all.insert("id".into(), json!(item.id.to_string()));
    all.insert("ContentType".into(), json!("Item"));
    all.insert("Modified".into(), json!(fmt_time(item.modified)));
    all.insert("Created".into(), json!(fmt_time(item.created)));
    all.insert(
        "AuthorLookupId".into(),
        json!(item.author.lookup_id().to_string()),
    );
    all.insert(
        "EditorLookupId".into(),
        json!(item.editor.lookup_id().to_string()),
    );
    all.insert(
        "_UIVersionString".into(),
        json!(format!("{}.0", item.version)),
    );
    all.insert("Attachments".into(), json!(false));
    all.insert("Edit".into(), json!(""));
    let title = item
        .values
        .get("Title")
        .and_then(Value::as_str)
        .unwrap_or("");
    all.insert("LinkTitleNoMenu".into(), json!(title));
    all.insert("LinkTitle".into(), json!(title));
    all.insert("ItemChildCount".into(), json!("0"));
    all.insert("FolderChildCount".into(), json!("0"));
    all.insert("_ComplianceFlags".into(), json!(""));
    all.insert("_ComplianceTag".into(), json!(""));
    all.insert("_ComplianceTagWrittenTime".into(), json!(""));
    all.insert("_ComplianceTagUserId".into(), json!(""));
    if item.author == Actor::App {
        all.insert("AppAuthorLookupId".into(), json!(APP_LOOKUP_ID.to_string()));
    }
    if item.editor == Actor::App {
        all.insert("AppEditorLookupId".into(), json!(APP_LOOKUP_ID.to_string()));
    }
    match sel {
        FieldSel::All => Value::Object(all),
        FieldSel::Some(names) => {
            let mut out = Map::new();
            out.insert("@odata.etag".into(), json!(item.etag()));
            for n in names {
                if let Some(v) = all.get(n) {
                    out.insert(n.clone(), v.clone());
                    continue;
                }
                // A lookup selected by its own name returns the looked-up display value(s).
                if let Some(col) = list.column(n) {
                    if col.kind.is_lookup()
                        && let Some(v) = item.values.get(&col.name)
                    {
                        let objs = lookup_objects(site, col, v);
                        let shown = if col.kind.is_multi() {
                            objs
                        } else {
                            objs.get(0)
                                .and_then(|o| o.get("LookupValue"))
                                .cloned()
                                .unwrap_or(Value::Null)
                        };
                        out.insert(n.clone(), shown);
                    }
                } else if n == "Author" || n == "Editor" {
                    let actor = if n == "Author" {
                        item.author
                    } else {
                        item.editor
                    };
                    let name = match actor {
                        Actor::App => "SharePoint App".to_string(),
                        Actor::Person(id) => {
                            person(id).map(|p| p.name.to_string()).unwrap_or_default()
                        }
                    };
                    out.insert(n.clone(), json!(name));
                }
            }
            Value::Object(out)
        }
    }
}

/// `[{LookupId, LookupValue(, Email)}]` for a lookup/person value.
fn lookup_objects(site: &Site, col: &Column, v: &Value) -> Value {
    let ids: Vec<u64> = match v {
        Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
        other => other.as_u64().into_iter().collect(),
    };
    let objs = ids
        .into_iter()
        .map(|id| match &col.kind {
            Kind::Person { .. } => match person(id as u32) {
                Some(p) => json!({ "LookupId": id, "LookupValue": p.name }),
                None => json!({ "LookupId": id, "LookupValue": "" }),
            },
            Kind::Lookup {
                list_id,
                column_name,
                ..
            } => {
                let value = site
                    .find_list(list_id)
                    .and_then(|i| site.lists.get(i))
                    .and_then(|l| l.items.get(&id))
                    .and_then(|it| it.values.get(column_name))
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default();
                json!({ "LookupId": id, "LookupValue": value })
            }
            _ => Value::Null,
        })
        .collect();
    Value::Array(objs)
}

// ------------------------------------------------------------------------------------------------
// Write validation
// ------------------------------------------------------------------------------------------------

/// Site-level facts value validation needs.
#[derive(Debug, Clone, Copy)]
pub struct WriteEnv {
    pub utc_offset_minutes: i32,
    pub hyperlink_writes: bool,
}

/// Validates a fields payload against the list schema and returns the normalized changes
/// (`None` = clear). `existing` is the item being updated (None on create).
pub fn validate_fields(
    site: &Site,
    list: &List,
    existing: Option<&Item>,
    body: &Map<String, Value>,
    env: WriteEnv,
) -> Result<Vec<(String, Option<Value>)>, GraphError> {
    let mut changes: Vec<(String, Option<Value>)> = Vec::new();
    for (key, value) in body {
        if key.starts_with("@odata.") || key.ends_with("@odata.type") {
            continue;
        }
        // Exact column match first, then the `XLookupId` form for lookups and persons.
        let (col, via_lookup_id) = match list.column(key) {
            Some(c) => (c, false),
            None => match key.strip_suffix("LookupId").and_then(|b| list.column(b)) {
                Some(c) if c.kind.is_lookup() => (c, true),
                _ => {
                    if READ_ONLY_FIELDS.contains(&key.as_str()) || key.starts_with("_Compliance") {
                        return Err(GraphError::invalid(&format!("Field '{key}' is read-only")));
                    }
                    return Err(GraphError::invalid(&format!(
                        "Field '{key}' is not recognized"
                    )));
                }
            },
        };
        if col.read_only {
            return Err(GraphError::invalid(&format!("Field '{key}' is read-only")));
        }
        if col.kind.is_lookup() && !via_lookup_id {
            return Err(GraphError::invalid(&format!(
                "Field '{key}' is a lookup; write its id as '{key}LookupId'"
            )));
        }
        let annotation = body
            .get(&format!("{key}@odata.type"))
            .and_then(Value::as_str);
        let normalized = normalize_value(site, col, key, value, annotation, env)?;
        changes.push((col.name.clone(), normalized));
    }
    // Required columns: must be present on create, can't be cleared on update.
    for col in list.meta.columns.iter().filter(|c| c.required) {
        let new = changes.iter().find(|(n, _)| n == &col.name);
        let missing = match (new, existing) {
            (Some((_, v)), _) => v.is_none(),
            (None, Some(it)) => it.values.get(&col.name).is_none_or(Value::is_null),
            (None, None) => true,
        };
        if missing {
            return Err(GraphError::invalid(&format!(
                "Field '{}' is required",
                col.name
            )));
        }
    }
    // Unique columns.
    for (name, v) in &changes {
        let Some(v) = v else { continue };
        let Some(idx) = list.unique.get(name) else {
            continue;
        };
        if let Some(k) = unique_key(v)
            && let Some(owner) = idx.get(&k)
            && existing.is_none_or(|it| it.id != *owner)
        {
            return Err(GraphError::new(
                400,
                "invalidRequest",
                &format!(
                    "The list item could not be added or updated because duplicate values were found in the following field(s) in the list: [{name}]"
                ),
            ));
        }
    }
    Ok(changes)
}

fn normalize_value(
    site: &Site,
    col: &Column,
    key: &str,
    value: &Value,
    annotation: Option<&str>,
    env: WriteEnv,
) -> Result<Option<Value>, GraphError> {
    let wrong = |expected: &str| {
        Err(GraphError::invalid(&format!(
            "Invalid value for field '{key}': expected {expected}"
        )))
    };
    if value.is_null() {
        return Ok(None);
    }
    let multi = col.kind.is_multi();
    if multi {
        let Value::Array(arr) = value else {
            return wrong("a collection");
        };
        let Some(ann) = annotation else {
            return Err(GraphError::invalid(
                "A value without a type name was found and no expected type is available. When the model is specified, each value in the payload must have a type which can be either specified in the payload, explicitly by the caller or implicitly inferred from the parent value.",
            ));
        };
        let expected: &[&str] = match col.kind {
            Kind::Choice { .. } => &["Collection(Edm.String)"],
            _ => &["Collection(Edm.Int32)", "Collection(Edm.String)"],
        };
        if !expected.contains(&ann) {
            return wrong(expected[0]);
        }
        if arr.len() > 1000 {
            return wrong("at most 1000 values");
        }
        let mut out = Vec::with_capacity(arr.len());
        for v in arr {
            match single_value(site, col, key, v, env)? {
                Some(n) => out.push(n),
                None => return wrong("non-null values"),
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Value::Array(out)));
    }
    if value.is_array() {
        return wrong("a single value");
    }
    single_value(site, col, key, value, env)
}

fn single_value(
    site: &Site,
    col: &Column,
    key: &str,
    value: &Value,
    env: WriteEnv,
) -> Result<Option<Value>, GraphError> {
    let wrong = |expected: &str| -> Result<Option<Value>, GraphError> {
        Err(GraphError::invalid(&format!(
            "Invalid value for field '{key}': expected {expected}"
        )))
    };
    match &col.kind {
        Kind::Text { max_len, .. } => {
            let Value::String(s) = value else {
                return wrong("a string");
            };
            let n = s.chars().count();
            if n > *max_len {
                return Err(GraphError::invalid(&format!(
                    "The value of field '{key}' is {n} characters long; the column's maximum length is {max_len}"
                )));
            }
            if s.is_empty() {
                Ok(None)
            } else {
                Ok(Some(value.clone()))
            }
        }
        Kind::Number { min, max, .. } => {
            let Some(f) = value.as_f64() else {
                return wrong("a number");
            };
            if !f.is_finite() || min.is_some_and(|m| f < m) || max.is_some_and(|m| f > m) {
                return Err(GraphError::invalid(&format!(
                    "The value of field '{key}' is out of range"
                )));
            }
            Ok(Some(value.clone()))
        }
        Kind::Currency { .. } => match value.as_f64() {
            Some(f) if f.is_finite() => Ok(Some(value.clone())),
            _ => wrong("a number"),
        },
        Kind::Boolean => match value {
            Value::Bool(_) => Ok(Some(value.clone())),
            _ => wrong("a boolean"),
        },
        Kind::DateTime { date_only, .. } => {
            let Value::String(s) = value else {
                return wrong("an ISO 8601 date/time string");
            };
            let Some(secs) = parse_time(s) else {
                return wrong("an ISO 8601 date/time string");
            };
            let secs = if *date_only {
                // Date-only values are stored as midnight in the site's time zone, expressed in UTC.
                let off = i64::from(env.utc_offset_minutes) * 60;
                let date_only_input = s.len() == 10;
                let local = if date_only_input { secs } else { secs + off };
                local.div_euclid(86_400) * 86_400 - off
            } else {
                secs
            };
            Ok(Some(json!(fmt_time(secs))))
        }
        Kind::Choice {
            choices,
            allow_text,
            ..
        } => {
            let Value::String(s) = value else {
                return wrong("a string");
            };
            if !allow_text && !choices.iter().any(|c| c == s) {
                return Err(GraphError::invalid(&format!(
                    "Invalid choice '{s}' for field '{key}'; allowed: {choices:?}"
                )));
            }
            if s.chars().count() > 255 {
                return wrong("at most 255 characters");
            }
            Ok(Some(value.clone()))
        }
        Kind::Person { .. } => {
            let Some(id) = as_id(value) else {
                return wrong("a user lookup id (integer)");
            };
            if person(id as u32).is_none() || id > u64::from(u32::MAX) {
                return Err(GraphError::invalid(&format!(
                    "The user with lookup id {id} does not exist in the site's user information list"
                )));
            }
            Ok(Some(json!(id)))
        }
        Kind::Lookup { list_id, .. } => {
            let Some(id) = as_id(value) else {
                return wrong("an item id (integer)");
            };
            let target = site.find_list(list_id).and_then(|i| site.lists.get(i));
            if let Some(t) = target
                && !t.items.contains_key(&id)
            {
                return Err(GraphError::invalid(&format!(
                    "Invalid lookup value: item {id} does not exist in the lookup list"
                )));
            }
            Ok(Some(json!(id)))
        }
        Kind::Hyperlink { .. } => {
            if !env.hyperlink_writes {
                return Err(GraphError::invalid("Invalid request"));
            }
            match value {
                Value::Object(o) if o.get("Url").is_some_and(Value::is_string) => {
                    Ok(Some(value.clone()))
                }
                _ => wrong("an object {\"Url\", \"Description\"}"),
            }
        }
    }
}

fn as_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

// ------------------------------------------------------------------------------------------------
// Time
// ------------------------------------------------------------------------------------------------

/// `2024-10-24T11:11:11Z` (whole seconds, UTC).
pub fn fmt_time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `2024-10-22T13:21:10.623Z` (milliseconds, for sites).
pub fn fmt_time_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// Parses ISO-8601 (`…Z`, offsets, no zone = UTC) or a bare date; returns Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(d.timestamp());
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(d.and_utc().timestamp());
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_names_encode_like_sharepoint() {
        assert_eq!(encode_internal_name("First Name"), "First_x0020_Name");
        assert_eq!(encode_internal_name("a-b"), "a_x002d_b");
        assert_eq!(encode_internal_name("1st"), "_x0031_st");
        assert_eq!(encode_internal_name("ó"), "_x00f3_");
        assert_eq!(
            encode_internal_name(&"x".repeat(40)).len(),
            MAX_INTERNAL_NAME
        );
    }

    #[test]
    fn times_parse_and_format() {
        assert_eq!(
            parse_time("2024-10-24T11:11:11Z").map(fmt_time).as_deref(),
            Some("2024-10-24T11:11:11Z")
        );
        assert_eq!(
            parse_time("2024-10-24").map(fmt_time).as_deref(),
            Some("2024-10-24T00:00:00Z")
        );
        assert_eq!(
            parse_time("2024-10-24T13:11:11+02:00")
                .map(fmt_time)
                .as_deref(),
            Some("2024-10-24T11:11:11Z")
        );
        assert!(parse_time("yesterday").is_none());
    }
}
