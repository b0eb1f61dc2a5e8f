//! Microsoft Graph v1.0 for SharePoint lists: routing, sites, lists, columns, items, delta and
//! `$batch`, plus the per-request pipeline (faults → RU charge → handler) shared by direct calls and
//! batch entries.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::filter;
use super::model::{
    Actor, Column, FieldSel, Item, ItemView, List, ListMeta, RenderCtx, Site, USER_INFO_LIST,
    WriteEnv, fields_json, is_user_info_list, item_json, unique_key, user_info_list,
    validate_fields,
};
use super::persist::Record;
use super::reply::{GraphError, GraphResult, Ids, Reply};
use super::state::State;
use super::throttle::Charge;

/// Most lists per site (SharePoint: 2,000 lists + libraries per site collection).
const MAX_LISTS_PER_SITE: usize = 2_000;
/// Most user columns per list (bounded; SharePoint's real limit depends on row size).
const MAX_COLUMNS_PER_LIST: usize = 500;
/// Most requests in one `$batch` (graph-api.md §7.1).
pub const MAX_BATCH: usize = 20;

/// Who is calling (from the validated token).
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: Actor,
    /// Throttling bucket key: the client id.
    pub app_key: String,
}

/// Per-request environment that is not state.
#[derive(Debug, Clone)]
pub struct Env<'a> {
    pub render: RenderCtx<'a>,
    pub now_ms: i64,
}

impl Env<'_> {
    fn now(&self) -> i64 {
        self.now_ms.div_euclid(1000)
    }
}

/// One Graph call, direct or from a batch. `path` is relative to `/v1.0`, still percent-encoded.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub if_match: Option<String>,
    pub prefer: Option<String>,
    pub body: Option<Value>,
}

/// A call's handler once faults and throttling let it through.
type Handler = fn(&mut State, &Env, &Caller, &Call) -> GraphResult;

/// Runs one call through faults, throttling and the handler, and counts it.
pub fn execute(st: &mut State, env: &Env, ids: &Ids, caller: &Caller, call: &Call) -> Reply {
    execute_with(st, env, ids, caller, call, dispatch)
}

/// Like [`execute`], for a SharePoint REST call ([`super::sprest`]): same faults, RU budget
/// and statistics.
pub fn execute_sharepoint(
    st: &mut State,
    env: &Env,
    ids: &Ids,
    caller: &Caller,
    call: &Call,
) -> Reply {
    execute_with(st, env, ids, caller, call, super::sprest::dispatch)
}

fn execute_with(
    st: &mut State,
    env: &Env,
    ids: &Ids,
    caller: &Caller,
    call: &Call,
    handler: Handler,
) -> Reply {
    *st.stats.by_method.entry(call.method.clone()).or_default() += 1;
    *st.stats
        .by_client
        .entry(caller.app_key.clone())
        .or_default()
        .entry(call.method.clone())
        .or_default() += 1;
    let reply = match admit(st, env, ids, caller, call) {
        Ok(extra) => {
            let mut reply = handler(st, env, caller, call).unwrap_or_else(|e| e.into_reply(ids));
            reply.headers.extend(extra);
            reply
        }
        Err(refused) => refused,
    };
    *st.stats.by_status.entry(reply.status).or_default() += 1;
    st.stats.requests.push(super::state::LoggedRequest {
        at_ms: env.now_ms,
        request_id: ids.request_id.clone(),
        client_request_id: ids.client_request_id.clone(),
        client: caller.app_key.clone(),
        method: call.method.clone(),
        path: call.path.clone(),
        status: reply.status,
    });
    reply
}

/// Injected faults and the RU budget: the headers to add to the answer, or the answer instead
/// of the handler's (503, 429).
type Admission = Result<Vec<(String, String)>, Reply>;

fn admit(st: &mut State, env: &Env, ids: &Ids, caller: &Caller, call: &Call) -> Admission {
    let retry = st.faults.spec.retry_after_secs.unwrap_or(1).to_string();
    let (u, t) = (
        st.faults.spec.unavailable_rate,
        st.faults.spec.throttle_rate,
    );
    if st.faults.draw(u) {
        st.faults.injected_unavailable += 1;
        return Err(GraphError::new(
            503,
            "serviceNotAvailable",
            "The service is temporarily unavailable. Please retry.",
        )
        .with_header("Retry-After", retry)
        .into_reply(ids));
    }
    if st.faults.draw(t) {
        st.faults.injected_throttles += 1;
        let e = throttled_error(retry.clone(), vec![("Retry-After".into(), retry)]);
        return Err(e.into_reply(ids));
    }
    let cost = ru_cost(call);
    match st.throttle.charge(&caller.app_key, cost, env.now_ms) {
        Charge::Allowed(h) => Ok(h),
        Charge::Throttled {
            retry_after,
            headers,
        } => Err(throttled_error(retry_after.to_string(), headers).into_reply(ids)),
    }
}

fn throttled_error(_retry: String, headers: Vec<(String, String)>) -> GraphError {
    let mut e = GraphError::new(
        429,
        "activityLimitReached",
        "The request has been throttled",
    );
    e.headers = headers;
    let mut inner = Map::new();
    inner.insert("code".into(), json!("throttledRequest"));
    inner.insert("innerError".into(), json!({ "code": "quota" }));
    e.inner = Some(inner);
    e
}

/// Resource units per graph-api.md §8.2.
pub fn ru_cost(call: &Call) -> u64 {
    let q = Query::parse(&call.query);
    if q.get("expand").is_some_and(|e| e.contains("permissions")) {
        return 5;
    }
    if call.method != "GET" {
        return 2;
    }
    let p = call.path.trim_end_matches('/');
    if p.ends_with("/items/delta") || p.ends_with("/items/delta()") {
        return if q.get("token").is_some() { 1 } else { 2 };
    }
    if p.ends_with("/items") || p.ends_with("/lists") || p.ends_with("/columns") || p == "/sites" {
        return 2;
    }
    1
}

// ------------------------------------------------------------------------------------------------
// Query strings
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: &str) -> Query {
        Query {
            pairs: url::form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        }
    }

    /// `$name` or `name`, case-insensitive.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.trim_start_matches('$').eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Rebuilds a raw query without the named options (kept verbatim otherwise) and appends `extra`.
fn requery(raw: &str, drop: &[&str], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let k = p.split('=').next().unwrap_or("");
            let k = k.replace("%24", "$");
            let k = k.trim_start_matches('$');
            !drop.iter().any(|d| d.eq_ignore_ascii_case(k))
        })
        .map(str::to_string)
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}={v}"));
    }
    parts.join("&")
}

/// Parses `$expand`: `fields`, `fields($select=A,B)`, `fields(select=A,B)`, `columns`.
fn expand_fields(q: &Query) -> (Option<FieldSel>, bool) {
    let Some(exp) = q.get("expand") else {
        return (None, false);
    };
    let mut fields = None;
    let mut columns = false;
    for part in split_top_level(exp) {
        let part = part.trim();
        let (name, inner) = match part.find('(') {
            Some(i) => (&part[..i], part[i + 1..].trim_end_matches(')')),
            None => (part, ""),
        };
        match name.trim() {
            "fields" => {
                let sel = inner
                    .split(';')
                    .find_map(|o| {
                        let o = o.trim();
                        o.strip_prefix("$select=")
                            .or_else(|| o.strip_prefix("select="))
                    })
                    .map(|s| {
                        s.split(',')
                            .map(|x| x.trim().to_string())
                            .filter(|x| !x.is_empty())
                            .collect()
                    });
                fields = Some(match sel {
                    Some(v) => FieldSel::Some(v),
                    None => FieldSel::All,
                });
            }
            "columns" => columns = true,
            _ => {}
        }
    }
    (fields, columns)
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ------------------------------------------------------------------------------------------------
// Routing
// ------------------------------------------------------------------------------------------------

fn segment_error(seg: &str) -> GraphError {
    GraphError::new(
        400,
        "BadRequest",
        &format!("Resource not found for the segment '{seg}'."),
    )
}

fn method_not_allowed() -> GraphError {
    GraphError::new(
        405,
        "notSupported",
        "The HTTP method is not supported for this resource.",
    )
}

fn site_not_found() -> GraphError {
    GraphError::not_found("Item not found")
}

/// Resolves the site part of `/sites/…` and returns (site index, remaining path).
fn resolve_site<'p>(st: &State, rest: &'p str) -> Result<(usize, &'p str), GraphError> {
    let slash = rest.find('/').unwrap_or(rest.len());
    let colon = rest.find(':');
    if let Some(c) = colon.filter(|c| *c < slash) {
        // `{host}:/{path}` optionally continued with `:/lists/…`.
        let host = percent_decode(&rest[..c]);
        let after = &rest[c + 1..];
        let (path, remainder) = match after.find(':') {
            Some(i) => (&after[..i], &after[i + 1..]),
            None => (after, ""),
        };
        let path = percent_decode(path);
        let path = path.trim_end_matches('/');
        let idx = st
            .sites
            .iter()
            .position(|s| {
                s.meta.hostname.eq_ignore_ascii_case(&host)
                    && s.meta.path.eq_ignore_ascii_case(path)
            })
            .ok_or_else(site_not_found)?;
        return Ok((idx, remainder));
    }
    let key = percent_decode(&rest[..slash]);
    let remainder = &rest[slash..];
    let idx = if key.eq_ignore_ascii_case("root") {
        st.sites.iter().position(|s| s.meta.path.is_empty())
    } else if key.contains(',') {
        st.site_index(&key)
    } else {
        st.sites
            .iter()
            .position(|s| s.meta.hostname.eq_ignore_ascii_case(&key) && s.meta.path.is_empty())
    };
    Ok((idx.ok_or_else(site_not_found)?, remainder))
}

pub fn dispatch(st: &mut State, env: &Env, caller: &Caller, call: &Call) -> GraphResult {
    let path = call.path.as_str();
    let q = Query::parse(&call.query);
    if path.trim_end_matches('/') == "/sites" {
        if call.method != "GET" {
            return Err(method_not_allowed());
        }
        return search_sites(st, env, &q);
    }
    if let Some(r) = super::groups::dispatch(env, &call.method, path, &q) {
        return r;
    }
    let (site_idx, remainder) = if let Some(rest) = path.strip_prefix("/sites/") {
        resolve_site(st, rest)?
    } else if let Some(rest) = path.strip_prefix("/groups/") {
        let mut it = rest.splitn(2, '/');
        let gid = percent_decode(it.next().unwrap_or(""));
        let tail = it.next().unwrap_or("");
        let tail = tail
            .strip_prefix("sites/root")
            .ok_or_else(|| segment_error(tail))?;
        let idx = st
            .sites
            .iter()
            .position(|s| {
                s.meta
                    .group_id
                    .as_deref()
                    .is_some_and(|g| g.eq_ignore_ascii_case(&gid))
            })
            .ok_or_else(|| GraphError::not_found("Group not found"))?;
        (idx, tail)
    } else {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        return Err(segment_error(first));
    };
    let segs: Vec<String> = remainder
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = call.method.as_str();
    match segs.as_slice() {
        [] => match m {
            "GET" => {
                let s = &st.sites[site_idx];
                let mut v = s.json(&env.render);
                with_context(
                    &mut v,
                    format!("{}/v1.0/$metadata#sites/$entity", env.render.base),
                );
                Ok(Reply::json(200, v))
            }
            _ => Err(method_not_allowed()),
        },
        ["columns"] => match m {
            "GET" => Ok(Reply::json(200, json!({ "value": [] }))),
            _ => Err(method_not_allowed()),
        },
        ["lists"] => match m {
            "GET" => get_lists(st, env, site_idx, &q),
            "POST" => create_list(st, env, caller, site_idx, call.body.as_ref()),
            _ => Err(method_not_allowed()),
        },
        ["lists", l, rest @ ..] => {
            let site = &st.sites[site_idx];
            if is_user_info_list(&site.meta, l) {
                // Virtual and read-only: rebuilt from the people directory on every request.
                if m != "GET" {
                    return Err(access_denied());
                }
                if let ["items", d] = rest
                    && (*d == "delta" || *d == "delta()")
                {
                    return Err(GraphError::new(
                        400,
                        "notSupported",
                        "Delta on the User Information List is not emulated",
                    ));
                }
                let uil = user_info_list(&site.meta);
                return read_list(st, env, site, &uil, rest, call, &q);
            }
            let li = site
                .find_list(l)
                .ok_or_else(|| GraphError::not_found("The specified list was not found"))?;
            match (rest, m) {
                (["items", d], "GET") if *d == "delta" || *d == "delta()" => {
                    delta(st, env, site_idx, li, call, &q)
                }
                (_, "GET") => read_list(st, env, site, &site.lists[li], rest, call, &q),
                (["columns"], "POST") => create_column(st, env, site_idx, li, call.body.as_ref()),
                (["items"], "POST") => {
                    create_item(st, env, caller, site_idx, li, call.body.as_ref())
                }
                (["items", id], _) => {
                    let id = parse_item_id(id)?;
                    match m {
                        "PATCH" => update_item(st, env, caller, site_idx, li, id, call, false),
                        "DELETE" => delete_item(st, env, site_idx, li, id, call),
                        _ => Err(method_not_allowed()),
                    }
                }
                (["items", id, "fields"], _) => {
                    let id = parse_item_id(id)?;
                    match m {
                        "PATCH" => update_item(st, env, caller, site_idx, li, id, call, true),
                        _ => Err(method_not_allowed()),
                    }
                }
                _ => Err(segment_error(rest.last().copied().unwrap_or(l))),
            }
        }
        [other, ..] => Err(segment_error(other)),
    }
}

/// The GET requests under `/lists/{list}` except delta, for a stored list or the virtual User
/// Information List alike.
fn read_list(
    st: &State,
    env: &Env,
    site: &Site,
    list: &List,
    rest: &[&str],
    call: &Call,
    q: &Query,
) -> GraphResult {
    match rest {
        [] => {
            let (_, cols) = expand_fields(q);
            let mut v = list.json(&site.meta, &env.render, cols);
            with_context(&mut v, format!("{}/lists/$entity", site_ctx(env, site)));
            Ok(Reply::json(200, v))
        }
        ["columns"] => {
            let include_hidden = q
                .get("select")
                .is_some_and(|s| s.split(',').any(|x| x.trim() == "hidden"));
            let cols: Vec<Value> = list
                .all_columns(include_hidden)
                .iter()
                .map(Column::json)
                .collect();
            Ok(Reply::json(
                200,
                json!({ "@odata.context": format!("{}/lists('{}')/columns", site_ctx(env, site), list.meta.id), "value": cols }),
            ))
        }
        ["columns", c] => {
            let col = list
                .all_columns(true)
                .into_iter()
                .find(|x| x.id.to_string().eq_ignore_ascii_case(c) || x.name == *c)
                .ok_or_else(|| GraphError::not_found("Column not found"))?;
            Ok(Reply::json(200, col.json()))
        }
        ["items"] => list_items(st, env, site, list, call, q),
        ["items", id] => get_item(env, site, list, parse_item_id(id)?, q),
        ["items", id, "fields"] => {
            let id = parse_item_id(id)?;
            let item = list.items.get(&id).ok_or_else(item_not_found)?;
            let (sel, _) = expand_fields(q);
            let sel = match q.get("select") {
                Some(s) => FieldSel::Some(s.split(',').map(|x| x.trim().to_string()).collect()),
                None => sel.unwrap_or(FieldSel::All),
            };
            let mut v = fields_json(site, list, item, &sel);
            with_context(&mut v, fields_ctx(env, site, list, id));
            Ok(Reply::json(200, v))
        }
        _ => Err(segment_error(rest.last().copied().unwrap_or("lists"))),
    }
}

/// Writes to a read-only resource (the User Information List).
fn access_denied() -> GraphError {
    GraphError::new(
        403,
        "accessDenied",
        "Access denied. You do not have permission to perform this action or access this resource.",
    )
}

fn parse_item_id(s: &str) -> Result<u64, GraphError> {
    s.parse::<u64>()
        .map_err(|_| GraphError::invalid(&format!("Invalid item id '{s}'")))
}

fn item_not_found() -> GraphError {
    GraphError::not_found("Item not found")
}

fn site_ctx(env: &Env, site: &Site) -> String {
    format!(
        "{}/v1.0/$metadata#sites('{}')",
        env.render.base,
        site.meta.id.replace(',', "%2C")
    )
}

fn fields_ctx(env: &Env, site: &Site, list: &List, id: u64) -> String {
    format!(
        "{}/lists('{}')/items('{}')/fields/$entity",
        site_ctx(env, site),
        list.meta.id,
        id
    )
}

/// Puts `@odata.context` first.
fn with_context(v: &mut Value, ctx: String) {
    if let Value::Object(o) = v {
        let mut n = Map::new();
        n.insert("@odata.context".into(), json!(ctx));
        n.extend(std::mem::take(o));
        *o = n;
    }
}

fn link(env: &Env, path: &str, query: &str) -> String {
    if query.is_empty() {
        format!("{}/v1.0{}", env.render.base, path)
    } else {
        format!("{}/v1.0{}?{}", env.render.base, path, query)
    }
}

fn write_env(st: &State) -> WriteEnv {
    WriteEnv {
        utc_offset_minutes: st.settings.utc_offset_minutes,
        hyperlink_writes: st.settings.hyperlink_writes,
    }
}

// ------------------------------------------------------------------------------------------------
// Sites and lists
// ------------------------------------------------------------------------------------------------

fn search_sites(st: &State, env: &Env, q: &Query) -> GraphResult {
    let term = q
        .get("search")
        .unwrap_or("")
        .trim_matches('"')
        .to_lowercase();
    let value: Vec<Value> = st
        .sites
        .iter()
        .filter(|s| {
            term.is_empty()
                || term == "*"
                || s.meta.display_name.to_lowercase().contains(&term)
                || s.meta.path.to_lowercase().contains(&term)
        })
        .map(|s| s.json(&env.render))
        .collect();
    Ok(Reply::json(
        200,
        json!({ "@odata.context": format!("{}/v1.0/$metadata#sites", env.render.base), "value": value }),
    ))
}

fn get_lists(st: &State, env: &Env, si: usize, q: &Query) -> GraphResult {
    let site = &st.sites[si];
    let (_, cols) = expand_fields(q);
    // `$filter=displayName eq 'X'` is used in practice; support that one form.
    let name_filter = match q.get("filter") {
        None => None,
        Some(f) => {
            let f = f.trim();
            let rest = f
                .strip_prefix("displayName eq '")
                .and_then(|r| r.strip_suffix('\''))
                .ok_or_else(|| {
                    GraphError::invalid("Only $filter=displayName eq '…' is supported on lists")
                })?;
            Some(rest.replace("''", "'"))
        }
    };
    let value: Vec<Value> = site
        .lists
        .iter()
        .filter(|l| !l.meta.hidden)
        .filter(|l| {
            name_filter
                .as_ref()
                .is_none_or(|n| l.meta.display_name.eq_ignore_ascii_case(n))
        })
        .map(|l| l.json(&site.meta, &env.render, cols))
        .collect();
    Ok(Reply::json(
        200,
        json!({ "@odata.context": format!("{}/lists", site_ctx(env, site)), "value": value }),
    ))
}

fn create_list(
    st: &mut State,
    env: &Env,
    caller: &Caller,
    si: usize,
    body: Option<&Value>,
) -> GraphResult {
    let body = body
        .and_then(Value::as_object)
        .ok_or_else(|| GraphError::invalid("Invalid request"))?;
    if body.contains_key("name") {
        return Err(GraphError::invalid(
            "Cannot define a 'name' for a list as it is assigned by the server. Instead, provide 'displayName'",
        ));
    }
    let display = body
        .get("displayName")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| GraphError::invalid("A list must have a 'displayName'"))?
        .to_string();
    if display.chars().count() > 255 {
        return Err(GraphError::invalid("displayName is too long"));
    }
    let site = &st.sites[si];
    if site.lists.len() >= MAX_LISTS_PER_SITE {
        return Err(GraphError::new(
            400,
            "quotaLimitReached",
            "Too many lists in this site",
        ));
    }
    let name: String = display
        .chars()
        .filter(|c| !"/\\:*?\"<>|#%{}~&".contains(*c))
        .collect();
    // The (virtual) User Information List exists on every site.
    if display.eq_ignore_ascii_case(USER_INFO_LIST)
        || site.lists.iter().any(|l| {
            l.meta.display_name.eq_ignore_ascii_case(&display)
                || l.meta.name.eq_ignore_ascii_case(&name)
        })
    {
        return Err(GraphError::new(
            409,
            "nameAlreadyExists",
            "A list with this name already exists.",
        ));
    }
    let info = body.get("list").and_then(Value::as_object);
    let template = info
        .and_then(|i| i.get("template"))
        .and_then(Value::as_str)
        .unwrap_or("genericList")
        .to_string();
    let hidden = info
        .and_then(|i| i.get("hidden"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let id = Uuid::new_v4();
    let mut columns = vec![Column::title(id)];
    if let Some(defs) = body.get("columns") {
        let defs = defs
            .as_array()
            .ok_or_else(|| GraphError::invalid("'columns' must be an array"))?;
        if defs.len() > MAX_COLUMNS_PER_LIST {
            return Err(GraphError::invalid("Too many columns"));
        }
        for d in defs {
            let mut c = Column::from_json(d)?;
            check_new_column(site, &columns, &mut c)?;
            columns.push(c);
        }
    }
    let now = env.now();
    let meta = ListMeta {
        id,
        display_name: display,
        name,
        description: body
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        template,
        hidden,
        created: now,
        modified: now,
        version: 1,
        columns,
        next_id: 1,
        seq: 0,
        created_by: caller.actor,
    };
    let mut list = List::new(meta);
    list.rebuild_unique();
    st.wal.record(&Record::List {
        site: st.sites[si].meta.id.clone(),
        meta: list.meta.clone(),
    });
    let site = &mut st.sites[si];
    site.lists.push(list);
    let site = &st.sites[si];
    let list = site
        .lists
        .last()
        .ok_or_else(|| GraphError::new(500, "generalException", "list vanished"))?;
    let mut v = list.json(&site.meta, &env.render, false);
    with_context(&mut v, format!("{}/lists/$entity", site_ctx(env, site)));
    Ok(Reply::json(201, v))
}

/// Rejects duplicate user columns; a name that collides with a built-in one gets SharePoint's
/// numeric suffix (`Author` → `Author0`), as the internal name must stay unique.
fn check_new_column(site: &Site, existing: &[Column], c: &mut Column) -> Result<(), GraphError> {
    let builtin = [
        "ID",
        "ContentType",
        "Modified",
        "Created",
        "Author",
        "Editor",
        "_UIVersionString",
        "Attachments",
        "Edit",
        "LinkTitle",
        "LinkTitleNoMenu",
        "ItemChildCount",
        "FolderChildCount",
        "AppAuthor",
        "AppEditor",
    ];
    if existing
        .iter()
        .any(|e| e.name.eq_ignore_ascii_case(&c.name))
    {
        return Err(GraphError::new(
            409,
            "nameAlreadyExists",
            &format!("A column named '{}' already exists.", c.name),
        ));
    }
    let taken = |n: &str| {
        existing.iter().any(|e| e.name.eq_ignore_ascii_case(n))
            || builtin.iter().any(|b| b.eq_ignore_ascii_case(n))
    };
    if taken(&c.name) {
        let base = c.name.clone();
        let free = (0..100).map(|i| format!("{base}{i}")).find(|n| !taken(n));
        c.name =
            free.ok_or_else(|| GraphError::new(409, "nameAlreadyExists", "No free internal name"))?;
    }
    if let super::model::Kind::Lookup { list_id, .. } = &c.kind
        && site.find_list(list_id).is_none()
    {
        return Err(GraphError::invalid(&format!(
            "Lookup list '{list_id}' does not exist in this site"
        )));
    }
    Ok(())
}

fn create_column(
    st: &mut State,
    env: &Env,
    si: usize,
    li: usize,
    body: Option<&Value>,
) -> GraphResult {
    let body = body.ok_or_else(|| GraphError::invalid("Invalid request"))?;
    let mut col = Column::from_json(body)?;
    {
        let site = &st.sites[si];
        let list = &site.lists[li];
        if list.meta.columns.len() >= MAX_COLUMNS_PER_LIST {
            return Err(GraphError::invalid("Too many columns"));
        }
        check_new_column(site, &list.meta.columns, &mut col)?;
        if col.unique {
            let mut seen = std::collections::HashSet::new();
            for it in list.items.values() {
                if let Some(k) = it.values.get(&col.name).and_then(unique_key)
                    && !seen.insert(k)
                {
                    return Err(GraphError::invalid("The column contains duplicate values"));
                }
            }
        }
        if col.required && !list.items.is_empty() {
            // SharePoint allows this (existing items stay empty); nothing to check.
        }
    }
    let now = env.now();
    let site_id = st.sites[si].meta.id.clone();
    let list = &mut st.sites[si].lists[li];
    list.meta.columns.push(col.clone());
    list.meta.version += 1;
    list.meta.modified = now;
    list.rebuild_unique();
    st.wal.record(&Record::List {
        site: site_id,
        meta: list.meta.clone(),
    });
    let mut v = col.json();
    let site = &st.sites[si];
    with_context(
        &mut v,
        format!(
            "{}/lists('{}')/columns/$entity",
            site_ctx(env, site),
            site.lists[li].meta.id
        ),
    );
    Ok(Reply::json(201, v))
}

// ------------------------------------------------------------------------------------------------
// Items
// ------------------------------------------------------------------------------------------------

fn encode_skiptoken(after: u64) -> String {
    STANDARD
        .encode(format!("Paged=TRUE&p_ID={after}"))
        .trim_end_matches('=')
        .to_string()
}

fn decode_skiptoken(s: &str) -> Option<u64> {
    let padded = match s.len() % 4 {
        2 => format!("{s}=="),
        3 => format!("{s}="),
        _ => s.to_string(),
    };
    let raw = STANDARD.decode(padded).ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.split('&')
        .find_map(|kv| kv.strip_prefix("p_ID="))
        .and_then(|v| v.parse().ok())
}

fn page_size(st: &State, q: &Query) -> Result<usize, GraphError> {
    match q.get("top") {
        None => Ok(st.settings.page_size),
        Some(t) => t
            .trim()
            .parse::<usize>()
            .map(|n| n.clamp(1, st.settings.max_page_size))
            .map_err(|_| GraphError::invalid(&format!("Invalid $top value '{t}'"))),
    }
}

fn list_items(
    st: &State,
    env: &Env,
    site: &Site,
    list: &List,
    call: &Call,
    q: &Query,
) -> GraphResult {
    let (sel, _) = expand_fields(q);
    let expr = match q.get("filter") {
        Some(f) if !f.trim().is_empty() => {
            let e = filter::parse(f)
                .map_err(|m| GraphError::invalid(&format!("Invalid filter clause: {m}")))?;
            let mut names = Vec::new();
            filter::fields(&e, &mut names);
            let honor = call.prefer.as_deref().is_some_and(|p| {
                p.split(',').any(|x| {
                    let x = x.trim();
                    x.eq_ignore_ascii_case("HonorNonIndexedQueriesWarningMayFailRandomly")
                        || x.eq_ignore_ascii_case("allowthrottleablequeries")
                })
            });
            let mut non_indexed = false;
            for n in &names {
                match filter::indexed(list, n) {
                    None => {
                        return Err(GraphError::invalid(&format!(
                            "Field '{n}' does not exist or is not supported in $filter"
                        )));
                    }
                    Some(true) => {}
                    Some(false) if honor => non_indexed = true,
                    Some(false) => {
                        return Err(GraphError::invalid(&format!(
                            "Field '{n}' cannot be referenced in filter or orderby as it is not indexed. Provide the 'Prefer: HonorNonIndexedQueriesWarningMayFailRandomly' header to allow this, but be warned that such queries may fail on large lists."
                        )));
                    }
                }
            }
            if non_indexed && list.items.len() > st.settings.list_view_threshold {
                let status = st.settings.threshold_status;
                let code = if status == 429 {
                    "activityLimitReached"
                } else {
                    "generalException"
                };
                let e = GraphError::new(
                    status,
                    code,
                    "The attempted operation is prohibited because it exceeds the list view threshold.",
                );
                return Err(if status == 429 {
                    e.with_header("Retry-After", "1".into())
                } else {
                    e
                });
            }
            Some(e)
        }
        _ => None,
    };
    let top = page_size(st, q)?;
    let after = match q.get("skiptoken") {
        Some(t) => decode_skiptoken(t).ok_or_else(|| GraphError::invalid("Invalid $skiptoken"))?,
        None => 0,
    };
    let view = ItemView {
        fields: sel.as_ref(),
        last_modified_by: true,
    };
    let mut value = Vec::with_capacity(top.min(1024));
    let mut last = after;
    let mut more = false;
    for (id, item) in list.items.range(after.saturating_add(1)..) {
        if let Some(e) = &expr
            && !filter::eval(e, list, item)
        {
            continue;
        }
        if value.len() == top {
            more = true;
            break;
        }
        value.push(item_json(site, list, item, &env.render, &view));
        last = *id;
    }
    let mut out = Map::new();
    out.insert(
        "@odata.context".into(),
        json!(format!(
            "{}/lists('{}')/items",
            site_ctx(env, site),
            list.meta.id
        )),
    );
    if more {
        let qs = requery(
            &call.query,
            &["skiptoken"],
            Some(("$skiptoken", &encode_skiptoken(last))),
        );
        out.insert("@odata.nextLink".into(), json!(link(env, &call.path, &qs)));
    }
    out.insert("value".into(), Value::Array(value));
    Ok(Reply::json(200, Value::Object(out)))
}

fn get_item(env: &Env, site: &Site, list: &List, id: u64, q: &Query) -> GraphResult {
    let item = list.items.get(&id).ok_or_else(item_not_found)?;
    let (sel, _) = expand_fields(q);
    let v = item_entity(env, site, list, item, sel.as_ref());
    Ok(Reply::json(200, v))
}

fn create_item(
    st: &mut State,
    env: &Env,
    caller: &Caller,
    si: usize,
    li: usize,
    body: Option<&Value>,
) -> GraphResult {
    let body = body
        .and_then(Value::as_object)
        .ok_or_else(|| GraphError::invalid("Invalid request"))?;
    let empty = Map::new();
    let fields = match body.get("fields") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(f)) => f,
        Some(_) => return Err(GraphError::invalid("'fields' must be an object")),
    };
    let changes = {
        let site = &st.sites[si];
        validate_fields(site, &site.lists[li], None, fields, write_env(st))?
    };
    let now = env.now();
    let site_id = st.sites[si].meta.id.clone();
    let list = &mut st.sites[si].lists[li];
    let id = list.meta.next_id;
    list.meta.next_id += 1;
    let seq = list.next_seq();
    let mut values = Map::new();
    for (k, v) in changes {
        if let Some(v) = v {
            values.insert(k, v);
        }
    }
    let item = Item {
        id,
        uid: Uuid::new_v4(),
        version: 1,
        created: now,
        modified: now,
        author: caller.actor,
        editor: caller.actor,
        seq,
        values,
    };
    index_unique(list, None, &item);
    list.meta.modified = now;
    if st.wal.enabled() {
        st.wal.record(&Record::Item {
            site: site_id,
            list: list.meta.id,
            item: item.clone(),
        });
    }
    list.items.insert(id, item);
    let site = &st.sites[si];
    let list = &site.lists[li];
    let item = list.items.get(&id).ok_or_else(item_not_found)?;
    Ok(Reply::json(
        201,
        item_entity(env, site, list, item, Some(&FieldSel::All)),
    ))
}

/// Keeps the unique-value indexes in step with an item write (`old` = state before).
fn index_unique(list: &mut List, old: Option<&Item>, new: &Item) {
    for (col, idx) in list.unique.iter_mut() {
        if let Some(k) = old.and_then(|o| o.values.get(col)).and_then(unique_key)
            && idx.get(&k) == Some(&new.id)
        {
            idx.remove(&k);
        }
        if let Some(k) = new.values.get(col).and_then(unique_key) {
            idx.insert(k, new.id);
        }
    }
}

fn check_if_match(item: &Item, call: &Call) -> Result<(), GraphError> {
    if let Some(m) = call.if_match.as_deref()
        && !item.etag_matches(m)
    {
        return Err(GraphError::new(
            412,
            "resourceModified",
            "The resource has changed since the caller last read it; usually an eTag mismatch",
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn update_item(
    st: &mut State,
    env: &Env,
    caller: &Caller,
    si: usize,
    li: usize,
    id: u64,
    call: &Call,
    fields_form: bool,
) -> GraphResult {
    let body = call
        .body
        .as_ref()
        .and_then(Value::as_object)
        .ok_or_else(|| GraphError::invalid("Invalid request"))?;
    let fields = if fields_form {
        body
    } else {
        // PATCH /items/{id}: honour a `fields` object (behaviour UNCONFIRMED; see docs).
        match body.get("fields") {
            Some(Value::Object(f)) => f,
            _ => {
                return Err(GraphError::invalid(
                    "Only 'fields' can be updated on a list item",
                ));
            }
        }
    };
    let changes = {
        let site = &st.sites[si];
        let list = &site.lists[li];
        let item = list.items.get(&id).ok_or_else(item_not_found)?;
        check_if_match(item, call)?;
        validate_fields(site, list, Some(item), fields, write_env(st))?
    };
    apply_item_changes(st, env, caller, (si, li, id), changes)?;
    let site = &st.sites[si];
    let list = &site.lists[li];
    let item = list.items.get(&id).ok_or_else(item_not_found)?;
    if fields_form {
        let mut v = fields_json(site, list, item, &FieldSel::All);
        with_context(&mut v, fields_ctx(env, site, list, id));
        Ok(Reply::json(200, v))
    } else {
        Ok(Reply::json(
            200,
            item_entity(env, site, list, item, Some(&FieldSel::All)),
        ))
    }
}

/// An item with the `fields` selected and `lastModifiedBy`, as a GET, a create or a PATCH of
/// the item answers.
fn item_entity(
    env: &Env,
    site: &Site,
    list: &List,
    item: &Item,
    fields: Option<&FieldSel>,
) -> Value {
    let mut v = item_json(
        site,
        list,
        item,
        &env.render,
        &ItemView {
            fields,
            last_modified_by: true,
        },
    );
    with_context(
        &mut v,
        format!(
            "{}/lists('{}')/items/$entity",
            site_ctx(env, site),
            list.meta.id
        ),
    );
    v
}

/// Applies validated `changes` to item `id` of list `li` of site `si` as one new version by
/// `caller` (Graph PATCH and SharePoint REST writes alike).
pub(super) fn apply_item_changes(
    st: &mut State,
    env: &Env,
    caller: &Caller,
    (si, li, id): (usize, usize, u64),
    changes: Vec<(String, Option<Value>)>,
) -> Result<(), GraphError> {
    let now = env.now();
    let site_id = st.sites[si].meta.id.clone();
    let list = &mut st.sites[si].lists[li];
    let seq = list.next_seq();
    let Some(mut item) = list.items.remove(&id) else {
        return Err(item_not_found());
    };
    let old = item.clone();
    for (k, v) in changes {
        match v {
            Some(v) => {
                item.values.insert(k, v);
            }
            None => {
                item.values.shift_remove(&k);
            }
        }
    }
    item.version += 1;
    item.modified = now;
    item.editor = caller.actor;
    item.seq = seq;
    index_unique(list, Some(&old), &item);
    list.meta.modified = now;
    if st.wal.enabled() {
        st.wal.record(&Record::Item {
            site: site_id,
            list: list.meta.id,
            item: item.clone(),
        });
    }
    list.items.insert(id, item);
    Ok(())
}

fn delete_item(
    st: &mut State,
    env: &Env,
    si: usize,
    li: usize,
    id: u64,
    call: &Call,
) -> GraphResult {
    {
        let item = st.sites[si].lists[li]
            .items
            .get(&id)
            .ok_or_else(item_not_found)?;
        check_if_match(item, call)?;
    }
    let site_id = st.sites[si].meta.id.clone();
    let list = &mut st.sites[si].lists[li];
    let seq = list.next_seq();
    if let Some(old) = list.items.remove(&id) {
        for (col, idx) in list.unique.iter_mut() {
            if let Some(k) = old.values.get(col).and_then(unique_key)
                && idx.get(&k) == Some(&id)
            {
                idx.remove(&k);
            }
        }
    }
    list.push_tombstone(seq, id);
    list.meta.modified = env.now();
    st.wal.record(&Record::Del {
        site: site_id,
        list: list.meta.id,
        id,
        seq,
    });
    Ok(Reply::empty(204))
}

// ------------------------------------------------------------------------------------------------
// Delta
// ------------------------------------------------------------------------------------------------

/// Decoded delta token: an enumeration in progress or a change cursor.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// Initial enumeration: changes after `start_seq` are reported by the next round; resume after `after_id`.
    Enumerate { start_seq: u64, after_id: u64 },
    /// Everything with seq > `since`.
    Changes { since: u64 },
}

fn encode_token(c: Cursor, issued: i64, epoch: u64) -> String {
    let body = match c {
        Cursor::Enumerate {
            start_seq,
            after_id,
        } => format!("e.{start_seq}.{after_id}.{issued}.{epoch}"),
        Cursor::Changes { since } => format!("c.{since}.0.{issued}.{epoch}"),
    };
    URL_SAFE_NO_PAD.encode(body)
}

fn decode_token(t: &str) -> Option<(Cursor, i64, u64)> {
    let raw = URL_SAFE_NO_PAD.decode(t.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let p: Vec<&str> = s.split('.').collect();
    if p.len() != 5 {
        return None;
    }
    let (a, b, issued, epoch) = (
        p[1].parse().ok()?,
        p[2].parse().ok()?,
        p[3].parse().ok()?,
        p[4].parse().ok()?,
    );
    let c = match p[0] {
        "e" => Cursor::Enumerate {
            start_seq: a,
            after_id: b,
        },
        "c" => Cursor::Changes { since: a },
        _ => return None,
    };
    Some((c, issued, epoch))
}

fn delta(st: &mut State, env: &Env, si: usize, li: usize, call: &Call, q: &Query) -> GraphResult {
    let now = env.now();
    let epoch = st.delta_epoch;
    let lifetime = st.settings.delta_token_lifetime_secs as i64;
    let top = page_size(st, q)?;
    let (sel, _) = expand_fields(q);
    let replay_rate = st.faults.spec.delta_replay_rate;
    let base_query = requery(&call.query, &["token", "skiptoken", "deltatoken"], None);
    let resync = |env: &Env| {
        GraphError::new(
            410,
            "resyncRequired",
            "Resync required. Replace any local items with the server's version (including deletes) if you're sure that the service was up to date with your local changes when you last sync'd. Upload any local changes that the server doesn't know about.",
        )
        .with_header("Location", link(env, &call.path, &base_query))
    };
    let list_seq = st.sites[si].lists[li].meta.seq;
    let floor = st.sites[si].lists[li].tombstones.floor;
    let (cursor, issued) = match q.get("token") {
        None => (
            Cursor::Enumerate {
                start_seq: list_seq,
                after_id: 0,
            },
            now,
        ),
        Some(t) if t.eq_ignore_ascii_case("latest") => {
            let tok = encode_token(Cursor::Changes { since: list_seq }, now, epoch);
            let dl = link(
                env,
                &call.path,
                &requery(&base_query, &[], Some(("token", &tok))),
            );
            return Ok(Reply::json(
                200,
                json!({ "value": [], "@odata.deltaLink": dl }),
            ));
        }
        Some(t) => {
            let (c, issued, e) = decode_token(t).ok_or_else(|| resync(env))?;
            let seq_ok = match c {
                Cursor::Changes { since } => since >= floor && since <= list_seq,
                Cursor::Enumerate { start_seq, .. } => start_seq >= floor && start_seq <= list_seq,
            };
            if e != epoch || issued + lifetime < now || !seq_ok {
                return Err(resync(env));
            }
            (c, issued)
        }
    };
    let site = &st.sites[si];
    let list = &site.lists[li];
    let view = ItemView {
        fields: sel.as_ref(),
        last_modified_by: false,
    };
    let mut value: Vec<Value> = Vec::new();
    let next: Option<Cursor>;
    let final_since: u64;
    match cursor {
        Cursor::Enumerate {
            start_seq,
            after_id,
        } => {
            let mut last = after_id;
            let mut more = false;
            for (id, item) in list.items.range(after_id.saturating_add(1)..) {
                if value.len() == top {
                    more = true;
                    break;
                }
                value.push(item_json(site, list, item, &env.render, &view));
                last = *id;
            }
            next = more.then_some(Cursor::Enumerate {
                start_seq,
                after_id: last,
            });
            final_since = start_seq;
        }
        Cursor::Changes { since } => {
            // Latest state per item: an item appears once, at its latest seq; deletes via tombstones.
            let mut changed: Vec<(u64, Option<&Item>, u64)> = list
                .items
                .values()
                .filter(|it| it.seq > since)
                .map(|it| (it.seq, Some(it), it.id))
                .collect();
            changed.extend(
                list.tombstones
                    .entries
                    .iter()
                    .filter(|(s, _)| *s > since)
                    .map(|(s, id)| (*s, None, *id)),
            );
            changed.sort_unstable_by_key(|(s, _, _)| *s);
            let more = changed.len() > top;
            let mut last = since;
            for (s, item, id) in changed.into_iter().take(top) {
                value.push(match item {
                    Some(it) => item_json(site, list, it, &env.render, &view),
                    None => json!({
                        "id": id.to_string(),
                        "parentReference": { "siteId": site.meta.id },
                        "contentType": { "id": list.content_type_id(), "name": "Item" },
                        "deleted": { "state": "deleted" }
                    }),
                });
                last = s;
            }
            next = more.then_some(Cursor::Changes { since: last });
            final_since = list_seq;
        }
    }
    let _ = issued;
    if replay_rate > 0.0 {
        let mut out = Vec::with_capacity(value.len());
        for v in value {
            let dup = st.faults.draw(replay_rate);
            if dup {
                out.push(v.clone());
            }
            out.push(v);
        }
        value = out;
    }
    let site = &st.sites[si];
    let list = &site.lists[li];
    let mut out = Map::new();
    out.insert(
        "@odata.context".into(),
        json!(format!(
            "{}/lists('{}')/items",
            site_ctx(env, site),
            list.meta.id
        )),
    );
    match next {
        Some(c) => {
            let tok = encode_token(c, now, epoch);
            out.insert(
                "@odata.nextLink".into(),
                json!(link(
                    env,
                    &call.path,
                    &requery(&base_query, &[], Some(("token", &tok)))
                )),
            );
        }
        None => {
            let tok = encode_token(Cursor::Changes { since: final_since }, now, epoch);
            out.insert(
                "@odata.deltaLink".into(),
                json!(link(
                    env,
                    &call.path,
                    &requery(&base_query, &[], Some(("token", &tok)))
                )),
            );
        }
    }
    out.insert("value".into(), Value::Array(value));
    Ok(Reply::json(200, Value::Object(out)))
}

// ------------------------------------------------------------------------------------------------
// $batch
// ------------------------------------------------------------------------------------------------

/// Runs a JSON batch. Outer errors (malformed batch) come back as `Err`; otherwise a 200 envelope.
pub fn batch(
    st: &mut State,
    env: &Env,
    ids: &Ids,
    caller: &Caller,
    body: Option<&Value>,
) -> GraphResult {
    st.stats.batches += 1;
    let entries = parse_batch(body)?;
    // Execute in dependency order (Kahn); a cycle is a malformed batch.
    let n = entries.len();
    let mut done: Vec<Option<u16>> = vec![None; n];
    let mut responses: Vec<Value> = Vec::with_capacity(n);
    let mut progressed = true;
    while progressed && done.iter().any(Option::is_none) {
        progressed = false;
        for i in 0..n {
            if done[i].is_some() {
                continue;
            }
            let deps: Vec<usize> = entries[i]
                .depends
                .iter()
                .filter_map(|d| entries.iter().position(|x| x.id.eq_ignore_ascii_case(d)))
                .collect();
            if deps.iter().any(|d| done[*d].is_none()) {
                continue;
            }
            progressed = true;
            let e = &entries[i];
            let failed_dep = deps
                .iter()
                .any(|d| done[*d].is_some_and(|s| !(200..300).contains(&s)));
            let reply = if failed_dep {
                GraphError::new(
                    424,
                    "failedDependency",
                    "The request depends on a request that failed.",
                )
                .into_reply(ids)
            } else {
                run_entry(
                    st,
                    env,
                    ids,
                    caller,
                    &e.method,
                    &e.url,
                    &e.headers,
                    e.body.clone(),
                )
            };
            done[i] = Some(reply.status);
            responses.push(batch_response(&e.id, reply));
        }
    }
    if done.iter().any(Option::is_none) {
        return Err(bad_batch("dependsOn forms a cycle."));
    }
    if st.settings.shuffle_batch_responses {
        st.faults.shuffle(&mut responses);
    }
    Ok(Reply::json(200, json!({ "responses": responses })))
}

/// One request of a `$batch`, as parsed.
struct BatchEntry {
    id: String,
    method: String,
    url: String,
    headers: Map<String, Value>,
    body: Option<Value>,
    depends: Vec<String>,
}

/// A malformed `$batch` (400 `BadRequest`, Graph's wording).
fn bad_batch(detail: &str) -> GraphError {
    GraphError::new(
        400,
        "BadRequest",
        &format!("Invalid batch payload: {detail}"),
    )
}

/// The `requests` of a `$batch` body, checked as Graph checks them: 1 to [`MAX_BATCH`], unique
/// ids, method and url, a Content-Type with a body, `dependsOn` naming other requests.
fn parse_batch(body: Option<&Value>) -> Result<Vec<BatchEntry>, GraphError> {
    let reqs = body
        .and_then(|b| b.get("requests"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad_batch("a 'requests' array is required."))?;
    if reqs.is_empty() {
        return Err(bad_batch("'requests' is empty."));
    }
    if reqs.len() > MAX_BATCH {
        return Err(bad_batch(&format!(
            "the number of requests ({}) exceeds the limit of {MAX_BATCH}.",
            reqs.len()
        )));
    }
    let mut entries: Vec<BatchEntry> = Vec::with_capacity(reqs.len());
    for r in reqs {
        let e = parse_batch_entry(r)?;
        if entries.iter().any(|x| x.id.eq_ignore_ascii_case(&e.id)) {
            return Err(bad_batch(&format!("duplicate request id '{}'.", e.id)));
        }
        entries.push(e);
    }
    for e in &entries {
        for d in &e.depends {
            if !entries.iter().any(|x| x.id.eq_ignore_ascii_case(d))
                || d.eq_ignore_ascii_case(&e.id)
            {
                return Err(bad_batch(&format!(
                    "request '{}' depends on unknown request '{d}'.",
                    e.id
                )));
            }
        }
    }
    Ok(entries)
}

fn parse_batch_entry(r: &Value) -> Result<BatchEntry, GraphError> {
    let o = r
        .as_object()
        .ok_or_else(|| bad_batch("each request must be an object."))?;
    let id = match o.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err(bad_batch("every request needs an 'id'.")),
    };
    let text = |key: &str| {
        o.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad_batch(&format!("request '{id}' has no '{key}'.")))
    };
    let method = text("method")?.to_ascii_uppercase();
    let url = text("url")?;
    let headers = o
        .get("headers")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let body = o.get("body").cloned().filter(|b| !b.is_null());
    if body.is_some()
        && !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("content-type"))
    {
        return Err(bad_batch(&format!(
            "request '{id}' has a body but no Content-Type header."
        )));
    }
    let depends: Vec<String> = match o.get("dependsOn") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(_) => return Err(bad_batch("'dependsOn' must be an array.")),
    };
    Ok(BatchEntry {
        id,
        method,
        url,
        headers,
        body,
        depends,
    })
}

/// One entry of a `$batch` response: id, status, headers and body of the inner reply.
fn batch_response(id: &str, reply: Reply) -> Value {
    let mut headers = Map::new();
    for (k, v) in &reply.headers {
        headers.insert(k.clone(), json!(v));
    }
    if reply.body.is_some() {
        headers.insert("Content-Type".into(), json!("application/json"));
    }
    headers.insert("Cache-Control".into(), json!("no-cache"));
    let mut r = Map::new();
    r.insert("id".into(), json!(id));
    r.insert("status".into(), json!(reply.status));
    r.insert("headers".into(), Value::Object(headers));
    if let Some(b) = reply.body {
        r.insert("body".into(), b);
    }
    Value::Object(r)
}

#[allow(clippy::too_many_arguments)]
fn run_entry(
    st: &mut State,
    env: &Env,
    ids: &Ids,
    caller: &Caller,
    method: &str,
    url: &str,
    headers: &Map<String, Value>,
    body: Option<Value>,
) -> Reply {
    if url.starts_with("http://") || url.starts_with("https://") {
        return GraphError::new(
            400,
            "BadRequest",
            "Batch request URLs must be relative (e.g. '/sites/…').",
        )
        .into_reply(ids);
    }
    let url = if url.starts_with('/') {
        url.to_string()
    } else {
        format!("/{url}")
    };
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (url.clone(), String::new()),
    };
    if path.trim_end_matches('/').ends_with("$batch") {
        return GraphError::new(400, "BadRequest", "Nested $batch requests are not allowed.")
            .into_reply(ids);
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str().map(str::to_string))
    };
    let call = Call {
        method: method.to_string(),
        path,
        query,
        if_match: header("If-Match"),
        prefer: header("Prefer"),
        body,
    };
    execute(st, env, ids, caller, &call)
}
