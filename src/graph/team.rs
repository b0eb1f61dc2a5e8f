//! Finding the site of a Team (`graph.team`): Microsoft Lists in a Team live in the root site of
//! the Team's Microsoft 365 group (graph-api.md §2.1).
//!
//! A GUID is read as the group's id (`GET /groups/{id}`); anything else as its display name
//! (`GET /groups?$filter=displayName eq '…'`). Either way the group must be team-enabled
//! (`resourceProvisioningOptions` contains `"Team"`), and a name must match exactly one Team.
//! The site then comes from `GET /groups/{id}/sites/root`. Needs `Group.Read.All` beside the
//! `Sites.*` permission.

use reqwest::Method;
use serde::Deserialize;

use super::client::{GraphClient, Req};
use super::error::GraphError;
use super::ops::{Site, decode, enc_query, enc_segment};
use crate::config::SiteRef;

/// The properties read of a group.
const GROUP_SELECT: &str = "id,displayName,resourceProvisioningOptions";

/// A Microsoft 365 group, as far as finding its Team's site needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Group {
    pub id: String,
    #[serde(default)]
    pub display_name: String,
    /// `["Team"]` once a team was created for the group.
    #[serde(default)]
    pub resource_provisioning_options: Vec<String>,
}

impl Group {
    pub fn is_team(&self) -> bool {
        self.resource_provisioning_options
            .iter()
            .any(|o| o.eq_ignore_ascii_case("Team"))
    }
}

#[derive(Deserialize)]
struct Groups {
    value: Vec<Group>,
}

/// An OData string literal's body: a quote is doubled.
fn odata_literal(s: &str) -> String {
    s.replace('\'', "''")
}

/// Picks the one Team among the groups a name matched; zero or several is a [`GraphError::Target`]
/// naming the value and the candidates.
pub fn pick_team(name: &str, groups: Vec<Group>) -> Result<Group, GraphError> {
    let (mut teams, others): (Vec<Group>, Vec<Group>) =
        groups.into_iter().partition(Group::is_team);
    match teams.len() {
        1 => Ok(teams.remove(0)),
        0 if others.is_empty() => Err(GraphError::Target(format!(
            "no Team is named `{name}` (give the Team's display name or its group id)"
        ))),
        0 => Err(GraphError::Target(format!(
            "`{name}` names a group without a Team ({}): only a Team's site can be the target",
            others
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        _ => Err(GraphError::Target(format!(
            "{} Teams are named `{name}`: give the group id of one of {}",
            teams.len(),
            teams
                .iter()
                .map(|g| g.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

impl GraphClient {
    /// The site `target` names: a site path directly, a Team through its group's root site.
    pub async fn resolve_target(&self, target: &SiteRef) -> Result<Site, GraphError> {
        match target {
            SiteRef::Site(spec) => self.resolve_site(spec).await,
            SiteRef::Team(team) => {
                let group = self.find_team(team).await?;
                let url = format!("/groups/{}/sites/root", enc_segment(&group.id));
                let r = self.execute(&Req::new(Method::GET, url)).await?;
                decode(&r, "team site")
            }
        }
    }

    /// The team-enabled group `team` names (a group id or a display name).
    pub async fn find_team(&self, team: &str) -> Result<Group, GraphError> {
        if uuid::Uuid::try_parse(team).is_ok() {
            let url = format!("/groups/{}?$select={GROUP_SELECT}", enc_segment(team));
            let group: Group = match self.execute(&Req::new(Method::GET, url)).await {
                Ok(r) => decode(&r, "group")?,
                Err(GraphError::NotFound { .. }) => {
                    return Err(GraphError::Target(format!("no group has the id `{team}`")));
                }
                Err(e) => return Err(e),
            };
            if !group.is_team() {
                return Err(GraphError::Target(format!(
                    "group `{team}` ({}) has no Team: only a Team's site can be the target",
                    group.display_name
                )));
            }
            return Ok(group);
        }
        let filter = format!("displayName eq '{}'", odata_literal(team));
        let url = format!(
            "/groups?$filter={}&$select={GROUP_SELECT}",
            enc_query(&filter)
        );
        let r = self.execute(&Req::new(Method::GET, url)).await?;
        let groups: Groups = decode(&r, "groups")?;
        pick_team(team, groups.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str, team: bool) -> Group {
        Group {
            id: id.into(),
            display_name: "Ops".into(),
            resource_provisioning_options: if team { vec!["Team".into()] } else { vec![] },
        }
    }

    #[test]
    fn picks_the_only_team_among_groups_of_that_name() {
        let g = pick_team("Ops", vec![group("a", false), group("b", true)]).unwrap();
        assert_eq!(g.id, "b");
    }

    #[test]
    fn zero_or_several_teams_name_the_value_and_candidates() {
        let none = pick_team("Ops", vec![]).unwrap_err().to_string();
        assert!(none.contains("no Team is named `Ops`"), "{none}");
        let plain = pick_team("Ops", vec![group("a", false)])
            .unwrap_err()
            .to_string();
        assert!(plain.contains("without a Team (a)"), "{plain}");
        let many = pick_team("Ops", vec![group("a", true), group("b", true)])
            .unwrap_err()
            .to_string();
        assert!(many.contains("2 Teams are named `Ops`"), "{many}");
        assert!(many.contains("a, b"), "{many}");
    }

    #[test]
    fn quotes_are_doubled_in_the_filter_literal() {
        assert_eq!(odata_literal("O'Brien's"), "O''Brien''s");
    }
}
