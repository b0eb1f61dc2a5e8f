//! Issue 3 §7: state survives restarts with --data; a crash (abort) loses nothing acknowledged.

use std::io::Write;

use reqwest::Method;
use serde_json::json;
use syncbridge::emulator::EmulatorArgs;

use crate::common::*;

fn args(dir: &std::path::Path) -> EmulatorArgs {
    EmulatorArgs {
        data: Some(dir.to_path_buf()),
        ..EmulatorArgs::default()
    }
}

#[tokio::test]
async fn state_survives_graceful_restart_and_crash() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emu::start_with(args(dir.path())).await;
    let list = emu
        .create_list(
            "Durable",
            json!([ { "name": "Code", "text": {}, "indexed": true, "enforceUniqueValues": true } ]),
        )
        .await;
    for i in 0..5 {
        assert_eq!(
            emu.create_item(
                &list,
                json!({ "Title": format!("t{i}"), "Code": format!("c{i}") })
            )
            .await
            .status,
            201
        );
    }
    emu.call(Method::DELETE, &format!("{list}/items/5"), None, &[])
        .await;
    let (_, delta_link) = {
        let r = emu.get(&format!("{list}/items/delta")).await;
        (
            r.status,
            r.body["@odata.deltaLink"].as_str().unwrap().to_string(),
        )
    };
    let etag = emu.get(&format!("{list}/items/2")).await.body["eTag"]
        .as_str()
        .unwrap()
        .to_string();
    emu.admin(
        "sites",
        json!({ "hostname": "fabrikam.sharepoint.com", "path": "/sites/ops" }),
    )
    .await;
    let old_base = emu.base.clone();
    emu.stop().await;

    // Graceful restart: everything is back, tokens from before still work (same signing key).
    let emu2 = Emu::start_with(args(dir.path())).await;
    let items = emu2.get(&format!("{list}/items?$expand=fields")).await;
    assert_eq!(items.status, 200, "{:?}", items.body);
    assert_eq!(items.body["value"].as_array().unwrap().len(), 4);
    assert_eq!(
        emu2.get(&format!("{list}/items/2")).await.body["eTag"],
        etag.as_str()
    );
    assert_eq!(
        emu2.get("/v1.0/sites/fabrikam.sharepoint.com:/sites/ops")
            .await
            .status,
        200
    );
    let created = emu2
        .create_item(&list, json!({ "Title": "after", "Code": "new" }))
        .await;
    assert_eq!(
        created.body["id"], "6",
        "ids are never reused, even across restarts"
    );
    let dup = emu2.create_item(&list, json!({ "Code": "c1" })).await;
    assert_eq!(dup.status, 400, "unique index rebuilt");
    let d = emu2.get(&delta_link.replace(&old_base, &emu2.base)).await;
    assert_eq!(d.status, 200, "delta tokens survive a restart");
    assert_eq!(d.body["value"].as_array().unwrap().len(), 1);

    // Crash: abort without flush/compaction; the acknowledged writes are in the log.
    emu2.call(
        Method::PATCH,
        &format!("{list}/items/1/fields"),
        Some(json!({ "Title": "patched" })),
        &[],
    )
    .await;
    emu2.create_item(&list, json!({ "Title": "last" })).await;
    let running = {
        let mut e = emu2;
        e.running.take().unwrap()
    };
    running.abort().await;
    // Simulate a torn final record, as if the process died mid-write.
    let mut wal = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("wal.jsonl"))
        .unwrap();
    wal.write_all(br#"{"t":"item","site":"x","li"#).unwrap();
    drop(wal);

    let emu3 = Emu::start_with(args(dir.path())).await;
    let items = emu3.get(&format!("{list}/items?$expand=fields")).await;
    let titles: Vec<&str> = items.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["fields"]["Title"].as_str())
        .collect();
    assert!(
        titles.contains(&"patched") && titles.contains(&"last"),
        "{titles:?}"
    );
    assert_eq!(titles.len(), 6);
    emu3.stop().await;
}

#[tokio::test]
async fn memory_only_without_data_dir() {
    let emu = Emu::start().await;
    let list = emu.create_list("Volatile", json!([])).await;
    emu.create_item(&list, json!({ "Title": "x" })).await;
    emu.stop().await;
    let emu = Emu::start().await;
    let site = emu.site_id().await;
    assert_eq!(
        emu.get(&format!("/v1.0/sites/{site}/lists/Volatile"))
            .await
            .status,
        404
    );
}
