//! Read-only HTML view at `/`: sites → lists → items, so a person trying the demo can watch rows
//! arrive. Server-rendered, every value escaped, refreshes itself every 5 seconds.

use serde_json::Value;

use super::graph::Query;
use super::model::fmt_time;
use super::state::State;

/// Rows shown per page of the items table.
const ROWS: usize = 100;

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => escape(s),
        Value::Null => String::new(),
        other => escape(&other.to_string()),
    }
}

pub fn render(st: &State, query: &str) -> String {
    let q = Query::parse(query);
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>SyncBridge Graph emulator</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}\
         th{background:#eee}</style></head><body><h1>SyncBridge Graph emulator</h1>",
    );
    let site = q
        .get("site")
        .and_then(|s| st.site_index(s))
        .map(|i| &st.sites[i]);
    match site {
        None => {
            h.push_str("<h2>Sites</h2><ul>");
            for s in &st.sites {
                let items: usize = s.lists.iter().map(|l| l.items.len()).sum();
                h.push_str(&format!(
                    "<li><a href=\"/?site={}\">{}{}</a> — {} lists, {} items</li>",
                    enc(&s.meta.id),
                    escape(&s.meta.hostname),
                    escape(if s.meta.path.is_empty() {
                        "/"
                    } else {
                        &s.meta.path
                    }),
                    s.lists.len(),
                    items
                ));
            }
            h.push_str("</ul>");
        }
        Some(s) => {
            h.push_str(&format!(
                "<p><a href=\"/\">Sites</a> / {}{}</p>",
                escape(&s.meta.hostname),
                escape(&s.meta.path)
            ));
            let list = q
                .get("list")
                .and_then(|l| s.find_list(l))
                .map(|i| &s.lists[i]);
            match list {
                None => {
                    h.push_str("<h2>Lists</h2><ul>");
                    for l in &s.lists {
                        h.push_str(&format!(
                            "<li><a href=\"/?site={}&amp;list={}\">{}</a> — {} items</li>",
                            enc(&s.meta.id),
                            l.meta.id,
                            escape(&l.meta.display_name),
                            l.items.len()
                        ));
                    }
                    h.push_str("</ul>");
                }
                Some(l) => {
                    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
                    h.push_str(&format!(
                        "<h2>{}</h2><p>{} items (newest first, page {})</p><table><tr><th>ID</th><th>Modified</th><th>Version</th>",
                        escape(&l.meta.display_name),
                        l.items.len(),
                        page + 1
                    ));
                    for c in &l.meta.columns {
                        h.push_str(&format!("<th>{}</th>", escape(&c.display_name)));
                    }
                    h.push_str("</tr>");
                    for it in l
                        .items
                        .values()
                        .rev()
                        .skip(page.saturating_mul(ROWS))
                        .take(ROWS)
                    {
                        h.push_str(&format!(
                            "<tr><td>{}</td><td>{}</td><td>{}.0</td>",
                            it.id,
                            fmt_time(it.modified),
                            it.version
                        ));
                        for c in &l.meta.columns {
                            h.push_str(&format!(
                                "<td>{}</td>",
                                it.values.get(&c.name).map(cell).unwrap_or_default()
                            ));
                        }
                        h.push_str("</tr>");
                    }
                    h.push_str("</table>");
                    if (page + 1) * ROWS < l.items.len() {
                        h.push_str(&format!(
                            "<p><a href=\"/?site={}&amp;list={}&amp;page={}\">older →</a></p>",
                            enc(&s.meta.id),
                            l.meta.id,
                            page + 1
                        ));
                    }
                }
            }
        }
    }
    h.push_str("</body></html>");
    h
}
