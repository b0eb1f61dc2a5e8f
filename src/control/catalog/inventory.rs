//! The inventory: applications → databases → instances → tables, projected from the loaded
//! pipeline files alone (no IO, so it answers even when a database is down).
//!
//! - An **application** is a `labels.application` value; pipelines without one are grouped under
//!   `name: null`.
//! - A **database** is a pipeline's `source`, identified by its database name (as libpq resolves
//!   it from `source.url`); pipelines of one application reading the same database name share it.
//! - Its **instances** are the servers (`host`, `port`) the pipelines' URLs name. Only host and
//!   port are taken from a URL: never the user, password or options.
//! - Its **tables** are the pipelines' synced tables with their target lists (default list first,
//!   then the route lists).

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::capture::config::publication_name;
use crate::config::PipelineConfig;

/// Everything the loaded pipelines sync, by application and database.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Inventory {
    /// Named applications by name, then the unlabelled one (`name: null`) if any.
    pub applications: Vec<InventoryApplication>,
}

/// The pipelines sharing one `labels.application`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InventoryApplication {
    /// `labels.application`; `null` for the pipelines without one.
    pub name: Option<String>,
    /// By name.
    pub databases: Vec<InventoryDatabase>,
}

/// One source database of an application.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InventoryDatabase {
    /// The database name; its catalog is at `/catalog/{name}/tables`.
    pub name: String,
    /// The servers the pipelines reach it at, by host and port.
    pub instances: Vec<InventoryInstance>,
    /// The pipelines reading it, in file order.
    pub pipelines: Vec<InventoryPipeline>,
    /// The synced tables, by pipeline (file order), then sync entry order.
    pub tables: Vec<InventoryTable>,
}

/// A server of a database, as the pipelines' `source.url` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct InventoryInstance {
    pub host: String,
    pub port: u16,
    /// The pipelines whose `source.url` names this server.
    pub pipelines: Vec<String>,
}

/// A pipeline reading a database.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InventoryPipeline {
    pub name: String,
    /// Its `labels:` (including `application`).
    pub labels: BTreeMap<String, String>,
    /// The publication capture reads through (`sb_<pipeline>`).
    pub publication: String,
}

/// A synced table.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct InventoryTable {
    pub schema: String,
    pub name: String,
    /// The pipeline that syncs it.
    pub pipeline: String,
    /// The lists it writes to: the default list, then the route lists.
    pub lists: Vec<String>,
}

/// Projects `pipelines` (in file order) into the inventory.
pub fn project(pipelines: &[PipelineConfig]) -> Inventory {
    // `None` sorts first in a BTreeMap; the unlabelled application goes last instead.
    let mut apps: BTreeMap<(bool, Option<String>), BTreeMap<String, InventoryDatabase>> =
        BTreeMap::new();
    for p in pipelines {
        let app = p.application().map(str::to_owned);
        let db_name = p.source.url.database();
        let db = apps
            .entry((app.is_none(), app))
            .or_default()
            .entry(db_name.clone())
            .or_insert_with(|| InventoryDatabase {
                name: db_name,
                instances: Vec::new(),
                pipelines: Vec::new(),
                tables: Vec::new(),
            });
        add_pipeline(db, p);
    }
    Inventory {
        applications: apps
            .into_iter()
            .map(|((_, name), dbs)| InventoryApplication {
                name,
                databases: dbs.into_values().collect(),
            })
            .collect(),
    }
}

fn add_pipeline(db: &mut InventoryDatabase, p: &PipelineConfig) {
    let (host, port) = p.source.url.server();
    match db
        .instances
        .iter_mut()
        .find(|i| i.host == host && i.port == port)
    {
        Some(i) => i.pipelines.push(p.name.clone()),
        None => {
            db.instances.push(InventoryInstance {
                host,
                port,
                pipelines: vec![p.name.clone()],
            });
            db.instances
                .sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
        }
    }
    db.pipelines.push(InventoryPipeline {
        name: p.name.clone(),
        labels: p.labels.clone(),
        publication: publication_name(&p.name),
    });
    db.tables.extend(p.sync.iter().map(|e| InventoryTable {
        schema: e.table.schema.clone(),
        name: e.table.name.clone(),
        pipeline: p.name.clone(),
        lists: e.lists().map(str::to_owned).collect(),
    }));
}

/// The pipelines reading database `name` (in any application), in file order.
pub fn readers<'p>(pipelines: &'p [PipelineConfig], name: &str) -> Vec<&'p PipelineConfig> {
    pipelines
        .iter()
        .filter(|p| p.source.url.database() == name)
        .collect()
}

/// Every database name the pipelines read, each once, in file order.
pub fn database_names(pipelines: &[PipelineConfig]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in pipelines {
        let name = p.source.url.database();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(name: &str, url: &str, app: Option<&str>, tables: &[(&str, &str)]) -> String {
        let labels = app.map_or(String::new(), |a| {
            format!("labels:\n  application: {a}\n  team: t-{name}\n")
        });
        let mut sync = String::new();
        for (t, list) in tables {
            sync.push_str(&format!(
                "  - table: {t}\n    list: {list}\n    fields:\n      id: Title\n"
            ));
        }
        format!(
            "version: 1\nname: {name}\nsource:\n  url: {url}\ngraph:\n  tenant: contoso.onmicrosoft.com\n  \
             client_id: 11111111-2222-3333-4444-555555555555\n  client_secret: s\n  \
             site: contoso.sharepoint.com:/sites/ops\nsync:\n{sync}{labels}"
        )
    }

    fn load(text: &str) -> PipelineConfig {
        crate::config::load_str("t.yaml", text, &|_| None).unwrap_or_else(|r| panic!("{r}"))
    }

    #[test]
    fn groups_by_application_then_database_and_never_shows_a_password() {
        let pipelines = [
            load(&pipeline(
                "orders",
                "postgres://app:hunter2@db1.internal:6432/shop?sslmode=require",
                Some("shop"),
                &[("public.orders", "Orders")],
            )),
            load(&pipeline(
                "nolabel",
                "postgres://u@localhost/other",
                None,
                &[("public.x", "X")],
            )),
            load(&pipeline(
                "stock",
                "postgresql://app:hunter2@db2.internal/shop",
                Some("shop"),
                &[("inv.stock", "Stock"), ("inv.moves", "Moves")],
            )),
            load(&pipeline(
                "ledger",
                "postgres://app@db1.internal:6432/books?password=hunter2",
                Some("billing"),
                &[("public.ledger", "Ledger")],
            )),
        ];
        let inv = project(&pipelines);
        let json = serde_json::to_value(&inv).unwrap();
        assert!(!json.to_string().contains("hunter2"), "{json}");
        let apps: Vec<Option<&str>> = inv.applications.iter().map(|a| a.name.as_deref()).collect();
        assert_eq!(apps, [Some("billing"), Some("shop"), None]);
        let shop = &inv.applications[1].databases;
        assert_eq!(shop.len(), 1, "one database `shop` on two servers");
        assert_eq!(shop[0].name, "shop");
        let instances: Vec<(&str, u16, Vec<String>)> = shop[0]
            .instances
            .iter()
            .map(|i| (i.host.as_str(), i.port, i.pipelines.clone()))
            .collect();
        assert_eq!(
            instances,
            [
                ("db1.internal", 6432, vec!["orders".to_string()]),
                ("db2.internal", 5432, vec!["stock".to_string()]),
            ]
        );
        let tables: Vec<(&str, &str, &str)> = shop[0]
            .tables
            .iter()
            .map(|t| (t.pipeline.as_str(), t.schema.as_str(), t.name.as_str()))
            .collect();
        assert_eq!(
            tables,
            [
                ("orders", "public", "orders"),
                ("stock", "inv", "stock"),
                ("stock", "inv", "moves"),
            ]
        );
        assert_eq!(shop[0].pipelines[1].publication, "sb_stock");
        assert_eq!(shop[0].pipelines[1].labels["team"], "t-stock");
        assert_eq!(
            inv.applications[2].databases[0].instances[0].host,
            "localhost"
        );
        assert_eq!(database_names(&pipelines), ["shop", "other", "books"]);
        assert_eq!(readers(&pipelines, "shop").len(), 2);
    }

    #[test]
    fn route_lists_follow_the_default_list() {
        let text = pipeline("r", "postgres://u@h/db", None, &[("public.t", "Main")])
            + "    routes:\n      - when: \"x == 1\"\n        list: Archive\n";
        // The routes belong to the last sync entry, which `pipeline` wrote last before labels
        // (none here), so appending works.
        let inv = project(&[load(&text)]);
        assert_eq!(
            inv.applications[0].databases[0].tables[0].lists,
            ["Main", "Archive"]
        );
    }
}
