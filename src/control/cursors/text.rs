//! The CLI's plain-text view of the cursor routes' answers (`syncbridge cursors [reset]`); `--json`
//! prints the answers themselves.

use std::fmt::Write;

use serde_json::Value;

fn n(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `GET /pipelines/{name}/cursors`, one line per cursor (and per partition).
pub fn describe(body: &Value) -> String {
    let mut out = String::new();
    let slot = &body["slot"];
    if let Some(e) = slot["error"].as_str() {
        let _ = writeln!(out, "slot {}: {e}", n(&slot["name"]));
    } else if slot["exists"] == false {
        let _ = writeln!(out, "slot {}: does not exist", n(&slot["name"]));
    } else {
        let _ = writeln!(
            out,
            "slot {}: confirmed_flush_lsn {}, restart_lsn {}, lag {} bytes behind {}, {}",
            n(&slot["name"]),
            n(&slot["confirmed_flush_lsn"]),
            n(&slot["restart_lsn"]),
            n(&slot["lag_bytes"]),
            n(&slot["current_wal_lsn"]),
            if slot["active"] == true {
                format!("held by pid {}", n(&slot["active_pid"]))
            } else {
                "not held".into()
            }
        );
    }
    for g in body["groups"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "group {} ({}), stage {}: lag {}{}",
            n(&g["role"]),
            n(&g["group"]),
            n(&g["stage"]),
            n(&g["lag"]),
            g["error"]
                .as_str()
                .map(|e| format!(" — {e}"))
                .unwrap_or_default()
        );
        for p in g["partitions"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {}/{}: committed {}, end {}, lag {}",
                n(&p["topic"]),
                n(&p["partition"]),
                n(&p["committed"]),
                n(&p["end"]),
                n(&p["lag"])
            );
        }
    }
    for l in body["lists"].as_array().into_iter().flatten() {
        let state = if let Some(e) = l["error"].as_str() {
            e.to_string()
        } else if l["pulls"] == false {
            "does not pull".into()
        } else if l["delta_link"] == true {
            format!(
                "delta link stored {} s ago",
                l["age_ms"].as_i64().unwrap_or(0) / 1000
            )
        } else if l["phase"] == "next" {
            "enumeration in progress".into()
        } else {
            "no delta link (the next poll enumerates the list)".into()
        };
        let _ = writeln!(
            out,
            "list {} ({}): {state}",
            n(&l["list"]),
            n(&l["list_id"])
        );
    }
    out
}

/// A reset's answer: what moved (or would), and what it costs.
pub fn describe_reset(body: &Value) -> String {
    let mut out = String::new();
    let t = &body["target"];
    let what = match t["kind"].as_str() {
        Some("group") => format!("group {} ({})", n(&t["role"]), n(&t["group"])),
        Some("slot") => format!("slot {}", n(&t["slot"])),
        Some("list") => format!("delta link of list {}", n(&t["list"])),
        _ => "cursor".into(),
    };
    let verb = if body["dry_run"] == true {
        "dry run, nothing changed:"
    } else {
        "moved:"
    };
    let _ = writeln!(out, "{verb} {what}");
    for p in body["partitions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}/{}: {} -> {} (re-read {}, skipped {})",
            n(&p["topic"]),
            n(&p["partition"]),
            n(&p["from"]),
            n(&p["to"]),
            n(&p["reread"]),
            n(&p["skipped"])
        );
    }
    if !body["events_reread"].is_null() {
        let _ = writeln!(
            out,
            "events re-read {}, skipped {}",
            n(&body["events_reread"]),
            n(&body["events_skipped"])
        );
    }
    if let Some(m) = body["slot"].as_object() {
        let _ = writeln!(
            out,
            "slot {} -> {}: {} WAL bytes skipped",
            n(&m["from_lsn"]),
            n(&m["to_lsn"]),
            n(&m["skipped_bytes"])
        );
    }
    if !body["items_reenumerated"].is_null() {
        let _ = writeln!(
            out,
            "items enumerated again: {}",
            n(&body["items_reenumerated"])
        );
    }
    let bound = if body["ru_is_upper_bound"] == true {
        "at most "
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "cost: {bound}{} RU, {:.2} min at {} RU/min",
        n(&body["ru"]),
        body["minutes"].as_f64().unwrap_or(0.0),
        n(&body["ru_per_minute"])
    );
    if let Some(run) = body["run_id"].as_str() {
        let _ = writeln!(out, "run {run} (GET /runs/{run})");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_dry_run_reads_as_a_dry_run_with_its_cost() {
        let text = describe_reset(&json!({
            "dry_run": true,
            "target": {"kind": "group", "role": "sync", "group": "g"},
            "partitions": [{"topic": "t", "partition": 0, "from": 5, "to": 2, "reread": 3, "skipped": 0}],
            "events_reread": 3, "events_skipped": 0,
            "ru": 6, "ru_is_upper_bound": true, "minutes": 0.5, "ru_per_minute": 12,
        }));
        assert!(
            text.starts_with("dry run, nothing changed: group sync (g)"),
            "{text}"
        );
        assert!(
            text.contains("t/0: 5 -> 2 (re-read 3, skipped 0)"),
            "{text}"
        );
        assert!(
            text.contains("cost: at most 6 RU, 0.50 min at 12 RU/min"),
            "{text}"
        );
    }
}
