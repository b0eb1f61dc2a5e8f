//! `graph.team` end to end (issue 21 item 4): a pipeline naming its target by Team syncs like
//! one naming the site — rows land in a list of the Team's own site (not the default site) — and
//! `syncbridge validate --graph` says plainly when a name matches no Team.
//!
//! Needs `DATABASE_URL` (`eval "$(ops/stack env)"`); the harness's in-process emulator seeds the
//! Team `Engineering` with its site, and the plain group `Finance`.

use serde_json::Value;
use syncbridge::config::SiteRef;
use syncbridge::emulator::{
    self,
    groups::{DEFAULT_TEAM_GROUP_ID, DEFAULT_TEAM_NAME, DEFAULT_TEAM_SITE_PATH, PLAIN_GROUP_NAME},
};
use syncbridge::graph::ItemQuery;

mod common;
#[path = "common/harness.rs"]
mod harness;
use harness::{Harness, hard_timeout};

/// The harness's pipeline file with `graph.site` swapped for `graph.team: <team>`.
fn team_pipeline(h: &Harness, sync: &str, team: &str, file: &str) -> std::path::PathBuf {
    let yaml = std::fs::read_to_string(h.pipeline(&h.embedded_log(), sync)).unwrap();
    let site_line = format!("  site: '{}'\n", emulator::DEFAULT_SITE);
    assert!(yaml.contains(&site_line), "{yaml}");
    let path = h.dir.path().join(file);
    std::fs::write(
        &path,
        yaml.replace(
            &site_line,
            &format!("  team: '{}'\n", team.replace('\'', "''")),
        ),
    )
    .unwrap();
    path
}

/// Titles by SyncKey of `list` on the site `site_id` (empty while the list does not exist).
async fn titles(h: &Harness, site_id: &str, list: &str) -> Vec<(String, String)> {
    let Ok(Some(info)) = h.graph.get_list(site_id, list).await else {
        return Vec::new();
    };
    let items = h
        .graph
        .list_items(site_id, &info.id, &ItemQuery::default())
        .await
        .unwrap();
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let mut out: Vec<(String, String)> = items
        .iter()
        .map(|i| (s(i.fields.get("SyncKey")), s(i.fields.get("Title"))))
        .collect();
    out.sort_by_key(|(k, _)| k.parse::<i64>().unwrap_or(i64::MAX));
    out
}

async fn validate(h: &Harness, file: &std::path::Path) -> (i32, String, String) {
    h.cli(&["validate", "--graph", file.to_str().unwrap()])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_naming_its_team_syncs_into_the_teams_site() {
    hard_timeout(120, async {
        let mut h = Harness::new("team").await;
        let (t, list) = h.titled_table(25).await;
        let sync = format!(
            "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
        );
        let file = team_pipeline(&h, &sync, DEFAULT_TEAM_NAME, "team.yaml");
        let team_site = h
            .graph
            .resolve_target(&SiteRef::Team(DEFAULT_TEAM_NAME.into()))
            .await
            .unwrap();
        assert_eq!(
            team_site.web_url.as_deref(),
            Some(format!("https://contoso.sharepoint.com{DEFAULT_TEAM_SITE_PATH}").as_str())
        );
        assert_ne!(team_site.id, h.site, "the Team has its own site");

        h.start(&file);
        let want: Vec<(String, String)> =
            (1..=25).map(|i| (i.to_string(), format!("row {i}"))).collect();
        h.wait_for("the 25 rows in the Team's list", || async {
            titles(&h, &team_site.id, &list).await == want
        })
        .await;
        h.sql(&format!("UPDATE public.{t} SET title = 'changed' WHERE id = 7; DELETE FROM public.{t} WHERE id = 9"))
            .await;
        h.wait_for("the update and the delete", || async {
            let got = titles(&h, &team_site.id, &list).await;
            got.len() == 24 && got.contains(&("7".into(), "changed".into()))
        })
        .await;
        // Nothing went to the default site.
        assert!(h.items(&list).await.is_empty(), "list created on the default site");
        h.stop().await;

        // validate --graph resolves the Team (by name or by group id) to the same, now matching, list.
        for team in [DEFAULT_TEAM_NAME, DEFAULT_TEAM_GROUP_ID] {
            let f = team_pipeline(&h, &sync, team, "ok.yaml");
            let (code, out, err) = validate(&h, &f).await;
            assert_eq!(code, 0, "{team}: {out}{err}");
            assert!(out.contains(&format!("ok: {}", h.name)), "{out}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_names_a_team_that_matches_nothing_or_is_no_team() {
    hard_timeout(60, async {
        let h = Harness::new("team_bad").await;
        let sync = "  - table: public.nothing_here\n    list: L\n    fields: { title: Title }";
        let f = team_pipeline(&h, sync, "Nobody's Team", "nobody.yaml");
        let (code, out, err) = validate(&h, &f).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains(&format!(
                "{}: graph.team: no Team is named `Nobody's Team`",
                h.name
            )),
            "{err}"
        );
        // A group without a team is refused with its id, not taken for the Team.
        let f = team_pipeline(&h, sync, PLAIN_GROUP_NAME, "plain.yaml");
        let (code, out, err) = validate(&h, &f).await;
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains(&format!(
                "`{PLAIN_GROUP_NAME}` names a group without a Team"
            )),
            "{err}"
        );
    })
    .await;
}
