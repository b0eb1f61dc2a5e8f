//! Microsoft 365 groups and Teams, read-only: enough for a client to find a Team's site
//! (`graph.team`). Seeded, never changed through the API, so they are not persisted.
//!
//! - `GET /groups` (`$filter=displayName eq '…'` or `resourceProvisioningOptions/Any(x:x eq 'Team')`)
//! - `GET /groups/{id}` (`$select` honoured)
//! - `GET /teams` (the groups with a team, as Graph's `team` resources: id and displayName)
//! - `GET /groups/{id}/sites/root` lives with the sites (graph.rs), by the site's `group_id`.

use serde_json::{Map, Value, json};

use super::graph::{Env, Query};
use super::reply::{GraphError, GraphResult, Reply};

/// The seeded Team: its group has a team and its own site beside the default one.
pub const DEFAULT_TEAM_NAME: &str = "Engineering";
pub const DEFAULT_TEAM_GROUP_ID: &str = "0b6f1c2e-7d4a-4c58-9e1f-3a2b5c6d7e8f";
/// Server-relative path of the Team's site (on the default site's host).
pub const DEFAULT_TEAM_SITE_PATH: &str = "/sites/Engineering";
/// A plain Microsoft 365 group without a team: a Team lookup must not pick it.
pub const PLAIN_GROUP_NAME: &str = "Finance";
pub const PLAIN_GROUP_ID: &str = "5d1e9a47-2c3b-4f6d-8a0e-b7c6d5e4f3a2";

/// One seeded group.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub id: &'static str,
    pub display_name: &'static str,
    pub team: bool,
}

pub const GROUPS: &[Group] = &[
    Group {
        id: DEFAULT_TEAM_GROUP_ID,
        display_name: DEFAULT_TEAM_NAME,
        team: true,
    },
    Group {
        id: PLAIN_GROUP_ID,
        display_name: PLAIN_GROUP_NAME,
        team: false,
    },
];

impl Group {
    /// Graph's `group` resource (the properties a client of lists reads).
    fn json(&self) -> Value {
        let nick: String = self
            .display_name
            .chars()
            .filter(|c| c.is_alphanumeric())
            .collect();
        json!({
            "id": self.id,
            "displayName": self.display_name,
            "description": format!("{} group", self.display_name),
            "groupTypes": ["Unified"],
            "mailEnabled": true,
            "mailNickname": nick,
            "securityEnabled": false,
            "visibility": "Private",
            "resourceBehaviorOptions": [],
            "resourceProvisioningOptions": if self.team { json!(["Team"]) } else { json!([]) },
        })
    }
}

/// What `$filter` on `/groups` may say.
#[derive(Debug, PartialEq)]
enum GroupFilter {
    All,
    DisplayName(String),
    HasTeam,
}

/// Parses the two filters clients use to find Teams; anything else is refused as Graph refuses
/// an unsupported query.
fn parse_filter(f: Option<&str>) -> Result<GroupFilter, GraphError> {
    let Some(f) = f.map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(GroupFilter::All);
    };
    let compact: String = f.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.eq_ignore_ascii_case("resourceProvisioningOptions/Any(x:xeq'Team')") {
        return Ok(GroupFilter::HasTeam);
    }
    let literal = f
        .strip_prefix("displayName")
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix("eq"))
        .map(str::trim)
        .and_then(|r| r.strip_prefix('\'')?.strip_suffix('\''));
    match literal {
        // A lone quote inside the literal must be doubled in OData.
        Some(l) if !l.replace("''", "").contains('\'') => {
            Ok(GroupFilter::DisplayName(l.replace("''", "'")))
        }
        _ => Err(GraphError::new(
            400,
            "Request_UnsupportedQuery",
            "Unsupported query: the emulator filters groups by displayName eq '…' or resourceProvisioningOptions/Any(x:x eq 'Team')",
        )),
    }
}

/// Keeps `id` and the `$select`ed properties.
fn select(mut v: Value, q: &Query) -> Value {
    let Some(sel) = q.get("select") else {
        return v;
    };
    let keep: Vec<&str> = sel.split(',').map(str::trim).collect();
    if let Value::Object(o) = &mut v {
        let kept: Map<String, Value> = std::mem::take(o)
            .into_iter()
            .filter(|(k, _)| k == "id" || keep.iter().any(|s| s.eq_ignore_ascii_case(k)))
            .collect();
        *o = kept;
    }
    v
}

fn find(id: &str) -> Result<&'static Group, GraphError> {
    GROUPS
        .iter()
        .find(|g| g.id.eq_ignore_ascii_case(id))
        .ok_or_else(|| {
            GraphError::new(
                404,
                "Request_ResourceNotFound",
                &format!("Resource '{id}' does not exist or one of its queried reference-property objects are not present."),
            )
        })
}

/// Answers `GET /groups`, `GET /groups/{id}` and `GET /teams`; `None` for other paths.
pub fn dispatch(env: &Env, method: &str, path: &str, q: &Query) -> Option<GraphResult> {
    let path = path.trim_end_matches('/');
    let base = &env.render.base;
    let get = |f: &dyn Fn() -> GraphResult| {
        Some(if method == "GET" {
            f()
        } else {
            Err(GraphError::new(
                405,
                "notSupported",
                "The HTTP method is not supported for this resource.",
            ))
        })
    };
    if path == "/groups" {
        return get(&|| {
            let filter = parse_filter(q.get("filter"))?;
            let value: Vec<Value> = GROUPS
                .iter()
                .filter(|g| match &filter {
                    GroupFilter::All => true,
                    GroupFilter::HasTeam => g.team,
                    GroupFilter::DisplayName(n) => g.display_name.eq_ignore_ascii_case(n),
                })
                .map(|g| select(g.json(), q))
                .collect();
            let ctx = format!("{base}/v1.0/$metadata#groups");
            Ok(Reply::json(
                200,
                json!({ "@odata.context": ctx, "value": value }),
            ))
        });
    }
    if path == "/teams" {
        return get(&|| {
            let value: Vec<Value> = GROUPS
                .iter()
                .filter(|g| g.team)
                .map(|g| json!({ "id": g.id, "displayName": g.display_name, "description": format!("{} group", g.display_name) }))
                .collect();
            let ctx = format!("{base}/v1.0/$metadata#teams");
            Ok(Reply::json(
                200,
                json!({ "@odata.context": ctx, "value": value }),
            ))
        });
    }
    let id = path.strip_prefix("/groups/").filter(|r| !r.contains('/'))?;
    get(&|| {
        let mut v = select(find(&super::graph::percent_decode(id))?.json(), q);
        if let Value::Object(o) = &mut v {
            o.insert(
                "@odata.context".into(),
                json!(format!("{base}/v1.0/$metadata#groups/$entity")),
            );
        }
        Ok(Reply::json(200, v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_display_name_with_doubled_quotes() {
        assert_eq!(
            parse_filter(Some("displayName eq 'O''Brien'")).unwrap(),
            GroupFilter::DisplayName("O'Brien".into())
        );
        assert_eq!(
            parse_filter(Some("resourceProvisioningOptions/Any(x:x eq 'Team')")).unwrap(),
            GroupFilter::HasTeam
        );
        assert_eq!(parse_filter(None).unwrap(), GroupFilter::All);
        assert_eq!(
            parse_filter(Some("displayName eq 'a'b'"))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(parse_filter(Some("mail eq 'x'")).unwrap_err().status, 400);
    }

    #[test]
    fn select_keeps_the_id_and_the_named_properties() {
        let q = Query::parse("$select=displayName");
        let v = select(GROUPS[0].json(), &q);
        assert_eq!(
            v,
            json!({ "id": DEFAULT_TEAM_GROUP_ID, "displayName": DEFAULT_TEAM_NAME })
        );
    }

    #[test]
    fn only_the_team_group_is_provisioned_with_a_team() {
        let opts = |g: &Group| g.json()["resourceProvisioningOptions"].clone();
        assert_eq!(opts(&GROUPS[0]), json!(["Team"]));
        assert_eq!(opts(&GROUPS[1]), json!([]));
    }
}
