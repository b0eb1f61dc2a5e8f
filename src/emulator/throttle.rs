//! SharePoint's resource-unit throttling (graph-api.md §8): per-app-per-tenant 1-minute and 24-hour
//! budgets plus the tenant-wide 5-minute budget.
//!
//! Windows are fixed-length and anchored at the first request after the previous window ended, so a
//! test with a controllable clock can predict every number. Throttled requests still consume quota.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const MINUTE_MS: i64 = 60_000;
const FIVE_MIN_MS: i64 = 300_000;
const DAY_MS: i64 = 86_400_000;

/// Budgets in resource units; `None` = unlimited (throttling off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub ru_per_minute: Option<u64>,
    pub ru_per_day: Option<u64>,
    pub tenant_ru_per_5min: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    start_ms: i64,
    used: u64,
}

impl Window {
    fn roll(&mut self, now: i64, len: i64) {
        if self.used == 0 || now >= self.start_ms + len || now < self.start_ms {
            self.start_ms = now;
            self.used = 0;
        }
    }

    /// Whole seconds until the window refills (at least 1).
    fn reset_in(&self, now: i64, len: i64) -> u64 {
        let ms = (self.start_ms + len - now).max(0);
        ((ms + 999) / 1000).max(1) as u64
    }

    fn json(&self, limit: Option<u64>, now: i64, len: i64) -> Value {
        let live = self.used > 0 && now < self.start_ms + len && now >= self.start_ms;
        let used = if live { self.used } else { 0 };
        json!({ "limit": limit, "used": used, "reset_in_secs": if live { self.reset_in(now, len) } else { 0 } })
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct AppBuckets {
    minute: Window,
    day: Window,
}

/// The outcome of charging one request.
#[derive(Debug, Clone)]
pub enum Charge {
    /// Allowed; headers to add (the `RateLimit-*` trio once ≥ 80 % of the minute budget is used).
    Allowed(Vec<(String, String)>),
    /// Throttled: `Retry-After` seconds and the headers to send with the 429.
    Throttled {
        retry_after: u64,
        headers: Vec<(String, String)>,
    },
}

#[derive(Debug, Default)]
pub struct Throttle {
    pub limits: Limits,
    apps: HashMap<String, AppBuckets>,
    tenant: Window,
    pub consumed: u64,
    pub throttled: u64,
}

impl Throttle {
    pub fn new(limits: Limits) -> Throttle {
        Throttle {
            limits,
            ..Throttle::default()
        }
    }

    /// Charges `cost` RU to `app` at `now_ms` and decides whether the request may proceed.
    pub fn charge(&mut self, app: &str, cost: u64, now_ms: i64) -> Charge {
        let l = self.limits;
        if l.ru_per_minute.is_none() && l.ru_per_day.is_none() && l.tenant_ru_per_5min.is_none() {
            self.consumed += cost;
            return Charge::Allowed(Vec::new());
        }
        // Bounded: only registered clients ever reach here, but cap defensively anyway.
        if !self.apps.contains_key(app) && self.apps.len() >= 64 {
            self.apps.clear();
        }
        let b = self.apps.entry(app.to_string()).or_default();
        b.minute.roll(now_ms, MINUTE_MS);
        b.day.roll(now_ms, DAY_MS);
        self.tenant.roll(now_ms, FIVE_MIN_MS);
        b.minute.used += cost;
        b.day.used += cost;
        self.tenant.used += cost;
        self.consumed += cost;
        let minute_reset = b.minute.reset_in(now_ms, MINUTE_MS);
        if let Some(lim) = l.ru_per_minute
            && b.minute.used > lim
        {
            self.throttled += 1;
            let headers = vec![
                ("Retry-After".to_string(), minute_reset.to_string()),
                ("RateLimit-Limit".to_string(), lim.to_string()),
                ("RateLimit-Remaining".to_string(), "0".to_string()),
                ("RateLimit-Reset".to_string(), minute_reset.to_string()),
            ];
            return Charge::Throttled {
                retry_after: minute_reset,
                headers,
            };
        }
        // Another limit tripped: only Retry-After (RateLimit-* describe the minute budget only).
        let other = [
            (l.ru_per_day, b.day, DAY_MS),
            (l.tenant_ru_per_5min, self.tenant, FIVE_MIN_MS),
        ];
        for (lim, w, len) in other {
            if lim.is_some_and(|lim| w.used > lim) {
                self.throttled += 1;
                let retry = w.reset_in(now_ms, len);
                return Charge::Throttled {
                    retry_after: retry,
                    headers: vec![("Retry-After".into(), retry.to_string())],
                };
            }
        }
        let mut headers = Vec::new();
        if let Some(lim) = l.ru_per_minute
            && b.minute.used * 5 >= lim * 4
        {
            headers.push(("RateLimit-Limit".into(), lim.to_string()));
            headers.push((
                "RateLimit-Remaining".into(),
                lim.saturating_sub(b.minute.used).to_string(),
            ));
            headers.push(("RateLimit-Reset".into(), minute_reset.to_string()));
        }
        Charge::Allowed(headers)
    }

    /// Budget state for `/_emulator/stats`.
    pub fn json(&self, now_ms: i64) -> Value {
        let apps: serde_json::Map<String, Value> = self
            .apps
            .iter()
            .map(|(app, b)| {
                (
                    app.clone(),
                    json!({
                        "minute": b.minute.json(self.limits.ru_per_minute, now_ms, MINUTE_MS),
                        "day": b.day.json(self.limits.ru_per_day, now_ms, DAY_MS),
                    }),
                )
            })
            .collect();
        json!({
            "limits": self.limits,
            "apps": apps,
            "tenant_5min": self.tenant.json(self.limits.tenant_ru_per_5min, now_ms, FIVE_MIN_MS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_budget_throttles_then_refills() {
        let mut t = Throttle::new(Limits {
            ru_per_minute: Some(10),
            ..Limits::default()
        });
        for _ in 0..3 {
            assert!(matches!(t.charge("a", 2, 1_000), Charge::Allowed(ref h) if h.is_empty()));
        }
        // 8 of 10 used: the RateLimit headers appear.
        assert!(matches!(t.charge("a", 2, 1_000), Charge::Allowed(ref h) if h.len() == 3));
        assert!(matches!(t.charge("a", 2, 1_000), Charge::Allowed(_)));
        match t.charge("a", 2, 31_000) {
            Charge::Throttled { retry_after, .. } => assert_eq!(retry_after, 30),
            other => panic!("expected throttle, got {other:?}"),
        }
        assert!(matches!(t.charge("a", 2, 61_000), Charge::Allowed(_)));
        assert!(matches!(t.charge("b", 2, 61_000), Charge::Allowed(_)));
    }
}
