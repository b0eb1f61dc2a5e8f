//! Graph emulator throughput/latency benchmark (issue 3 performance goals).
//!
//! Runs the emulator in-process (throttling off, memory only) and drives it over real HTTP with
//! reqwest from the same process — so the client competes for the same 2 cores and the numbers are
//! a lower bound. Prints creates/s for single requests and for `$batch`, latency percentiles for
//! single creates, and resident memory per stored item.
//!
//! `cargo bench --bench emulator` (env: `SINGLE=20000 BATCHES=5000 CONCURRENCY=16`).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use syncbridge::emulator::{self, EmulatorArgs};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn fields(i: usize) -> Value {
    json!({ "Title": format!("Item {i}"), "Qty": i as f64, "Status": if i.is_multiple_of(2) { "Open" } else { "Closed" },
            "Code": format!("K{i:08}"), "Due": "2024-10-24T11:11:11Z" })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let single_n = env_usize("SINGLE", 20_000);
    let batches = env_usize("BATCHES", 5_000);
    let conc = env_usize("CONCURRENCY", 16).max(1);
    let emu = emulator::spawn(EmulatorArgs {
        clock_control: false,
        ..EmulatorArgs::default()
    })
    .await
    .expect("start");
    let base = emu.base_url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conc * 2)
        .build()
        .expect("client");
    let form = format!(
        "client_id={}&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret={}&grant_type=client_credentials",
        emulator::DEFAULT_CLIENT_ID,
        emulator::DEFAULT_CLIENT_SECRET
    );
    let tok: Value = http
        .post(format!(
            "{base}/{}/oauth2/v2.0/token",
            emulator::DEFAULT_TENANT
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token json");
    let auth = format!(
        "Bearer {}",
        tok["access_token"].as_str().expect("access_token")
    );
    let site: Value = http
        .get(format!(
            "{base}/v1.0/sites/contoso.sharepoint.com:/sites/dev"
        ))
        .header("authorization", &auth)
        .send()
        .await
        .expect("site")
        .json()
        .await
        .expect("site json");
    let site_id = site["id"].as_str().expect("site id").to_string();
    let list: Value = http
        .post(format!("{base}/v1.0/sites/{site_id}/lists"))
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .body(
            json!({ "displayName": "Bench", "columns": [
                { "name": "Qty", "number": {} },
                { "name": "Status", "choice": { "choices": ["Open", "Closed"] } },
                { "name": "Code", "text": { "maxLength": 32 }, "indexed": true, "enforceUniqueValues": true },
                { "name": "Due", "dateTime": {} } ] })
            .to_string(),
        )
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("list json");
    let items_path = format!(
        "/sites/{site_id}/lists/{}/items",
        list["id"].as_str().expect("list id")
    );
    let items_url = format!("{base}/v1.0{items_path}");
    let rss_before = rss_bytes();

    // Warm-up.
    for i in 0..200 {
        let r = http
            .post(&items_url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(json!({ "fields": fields(10_000_000 + i) }).to_string())
            .send()
            .await
            .expect("warm-up");
        assert_eq!(r.status().as_u16(), 201);
    }

    // 1. Single-request latency, one request at a time.
    let mut lat = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let body = json!({ "fields": fields(20_000_000 + i) }).to_string();
        let t = Instant::now();
        let r = http
            .post(&items_url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("create");
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        lat.push(t.elapsed());
        assert_eq!(status, 201);
    }
    lat.sort_unstable();

    // 2. Single-request throughput with `conc` concurrent clients.
    let t = Instant::now();
    let per = single_n / conc;
    let mut tasks = Vec::new();
    let mut clat_all = Vec::new();
    for w in 0..conc {
        let (http, auth, url) = (http.clone(), auth.clone(), items_url.clone());
        tasks.push(tokio::spawn(async move {
            let mut l = Vec::with_capacity(per);
            for i in 0..per {
                let body = json!({ "fields": fields(30_000_000 + w * per + i) }).to_string();
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("create");
                let ok = r.status().as_u16() == 201;
                let _ = r.bytes().await;
                l.push(t.elapsed());
                assert!(ok);
            }
            l
        }));
    }
    for task in tasks {
        clat_all.extend(task.await.expect("task"));
    }
    let single_secs = t.elapsed().as_secs_f64();
    let single_rate = (per * conc) as f64 / single_secs;
    clat_all.sort_unstable();

    // 3. $batch throughput: 20 creates per batch, `conc` concurrent clients.
    let t = Instant::now();
    let per_b = batches / conc;
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (http, auth, base, path) =
            (http.clone(), auth.clone(), base.clone(), items_path.clone());
        tasks.push(tokio::spawn(async move {
            for b in 0..per_b {
                let reqs: Vec<Value> = (0..20)
                    .map(|k| {
                        let i = 40_000_000 + (w * per_b + b) * 20 + k;
                        json!({ "id": k.to_string(), "method": "POST", "url": path, "headers": { "Content-Type": "application/json" }, "body": { "fields": fields(i) } })
                    })
                    .collect();
                let r = http.post(format!("{base}/v1.0/$batch")).header("authorization", &auth).header("content-type", "application/json")
                    .body(json!({ "requests": reqs }).to_string()).send().await.expect("batch");
                let v: Value = r.json().await.expect("batch json");
                let ok = v["responses"].as_array().map(|a| a.iter().all(|x| x["status"] == 201)).unwrap_or(false);
                assert!(ok, "batch failed: {v}");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let batch_secs = t.elapsed().as_secs_f64();
    let batch_items = per_b * conc * 20;
    let batch_rate = batch_items as f64 / batch_secs;

    let total_items = 200 + 2_000 + per * conc + batch_items;
    let rss_after = rss_bytes();
    println!(
        "graph-emulator benchmark (in-process client and server, 2 tokio workers, throttling off)"
    );
    println!(
        "  single create, sequential: n=2000  p50={:?} p99={:?} max={:?}",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "  single create, {conc} concurrent: {} creates in {:.2}s = {:.0} creates/s  (p50={:?} p99={:?})",
        per * conc,
        single_secs,
        single_rate,
        pct(&clat_all, 0.5),
        pct(&clat_all, 0.99)
    );
    println!(
        "  $batch (20/batch), {conc} concurrent: {batch_items} creates in {batch_secs:.2}s = {batch_rate:.0} creates/s"
    );
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        println!(
            "  memory: RSS {:.1} MiB → {:.1} MiB for {total_items} items ≈ {} bytes/item (5 user fields, incl. allocator slack)",
            a as f64 / 1048576.0,
            b as f64 / 1048576.0,
            (b.saturating_sub(a)) / total_items as u64
        );
    }
    emu.stop().await.expect("stop");
}
