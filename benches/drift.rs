//! Drift check cost benchmark (issue 14): `ops/bench drift [--items N] [--ru-per-minute R]`.
//!
//! What a check costs on Graph and how fast it reads, on the real binary:
//! - the Graph emulator runs in this process (`syncbridge::emulator::spawn`, memory only), the
//!   pipeline is `syncbridge run` in a child process (the binary cargo builds with this bench),
//!   with an embedded log and a meta-store database of its own; PostgreSQL from `DATABASE_URL`.
//!   The set-up is the end-to-end tests' harness (`tests/common/harness.rs`).
//! - `ITEMS` rows are pushed to one list at an unthrottled budget; the process is restarted at
//!   `RU_PER_MINUTE` (small, so the check's pacing to `drift.budget_share` of it shows) and one
//!   check runs through `POST /pipelines/{name}/drift`.
//!
//! Printed: RU the check spent (its own counted usage, from the report), the bound
//! ⌈items ÷ page size⌉ × page cost (one multi-item read per page, graph-api.md §8.2), their ratio
//! (goal ≤ 1.1), the check's wall time and items/s, and the rate the pacing alone would allow.
//! It never fails on timing; it exits non-zero only when a step breaks (or the check finds
//! differences on a clean pipeline, or the ratio goal is missed: the RU count is deterministic).
//!
//! Environment: `DATABASE_URL`; `DRIFT_BENCH_ITEMS` [2000]; `DRIFT_BENCH_RU_PER_MINUTE` [600];
//! `DRIFT_BENCH_SHARE` [0.5] (written as the pipeline's `drift.budget_share`).

use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/harness.rs"]
mod harness;

use harness::Harness;

/// Most items: a bench must stay bounded on a shared machine (a page holds 5,000).
const MAX_ITEMS: u64 = 50_000;

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let items = env("DRIFT_BENCH_ITEMS", 2_000).clamp(1, MAX_ITEMS);
    let rpm = env("DRIFT_BENCH_RU_PER_MINUTE", 600).max(1);
    let share = std::env::var("DRIFT_BENCH_SHARE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && *s <= 1.0)
        .unwrap_or(syncbridge::process::drift::DEFAULT_BUDGET_SHARE);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(bench(items, rpm, share));
}

async fn bench(items: u64, rpm: u64, share: f64) {
    let meta = common::TempDatabase::create("sbdriftbench").await;
    let mut h = Harness::new("driftbench").await;
    let (t, list) = h
        .titled_table(u32::try_from(items).unwrap_or(u32::MAX))
        .await;
    let sync = format!(
        "  - table: public.{t}\n    list: {list}\n    fields: {{ title: Title }}\n    pull: {{ enabled: false }}"
    );
    let file = h.pipeline(&h.embedded_log(), &sync);
    let yaml = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{yaml}  meta_url: {}\n", meta.url)).unwrap();
    h.start(&file);
    let started = Instant::now();
    while (h.items(&list).await.len() as u64) < items {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the push of {items} items did not finish in 15 minutes:\n{}",
            h.run_log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "drift bench: {items} items pushed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    h.stop().await;
    let yaml = std::fs::read_to_string(&file).unwrap();
    let yaml = yaml.replace("ru_per_minute: 100000", &format!("ru_per_minute: {rpm}"));
    std::fs::write(&file, format!("{yaml}drift:\n  budget_share: {share}\n")).unwrap();
    h.start(&file);
    let report = h.post_drift("drift").await;
    let total = report["counts"]
        .as_object()
        .map_or(0, |c| c.values().filter_map(|v| v.as_u64()).sum::<u64>());
    assert_eq!(total, 0, "a clean pipeline has no drift: {report:#}");
    let (ru, requests) = (
        report["resource_units"].as_u64().unwrap_or_default(),
        report["graph_requests"].as_u64().unwrap_or_default(),
    );
    let page = u64::from(syncbridge::process::drift::PAGE_SIZE);
    let page_cost = u64::from(syncbridge::graph::Cost::Multi.units());
    let bound = items.div_ceil(page) * page_cost;
    let ms = report["finished_ms"].as_i64().unwrap_or_default()
        - report["started_ms"].as_i64().unwrap_or_default();
    let paced = share * rpm as f64 / 60.0 / page_cost as f64 * page as f64;
    let ratio = ru as f64 / bound as f64;
    println!(
        "drift check: {items} items, {requests} Graph requests, {ru} RU spent; bound {bound} RU \
         (⌈{items} ÷ {page}⌉ × {page_cost} RU); ratio {ratio:.2} (goal ≤ 1.10: {})",
        if ratio <= 1.1 { "met" } else { "MISSED" }
    );
    println!(
        "drift check: {ms} ms, {:.0} items/s at {rpm} RU/min × {share} share (the pacing alone \
         would allow {paced:.0} items/s)",
        items as f64 * 1000.0 / ms.max(1) as f64
    );
    h.stop().await;
    assert!(ratio <= 1.1, "RU {ru} > 1.1 × {bound}");
}
