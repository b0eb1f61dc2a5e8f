//! The resource-unit (RU) priced limiter, one per tenant, shared by every pipeline in the process.
//!
//! Contract:
//! - Every request is priced by [`Cost`] (graph-api.md §8.2) and admitted only when the tenant's
//!   budget has that many RU: the per-minute budget (and optionally a per-day budget).
//! - Budgets are enforced so that **any** 60-second (resp. 24-hour) interval admits at most the
//!   budget: a GCRA with burst `B` and rate `r` admits at most `B + r·T` in an interval `T`, so the
//!   rate is `budget − burst` per window. SharePoint's windows are fixed, not sliding (§8.3 and the
//!   emulator), and this bound holds for both.
//! - A share of the budget ([`DEFAULT_DELTA_RESERVE`]) is reserved for delta pollers
//!   ([`Lane::Delta`]): writers ([`Lane::Writer`]) pass through an extra limiter whose rate is the
//!   rest, so a write backlog can never starve the return path.
//! - A 429/503 pauses **all** requests to the tenant until its `Retry-After` ([`TenantLimiter::pause_for`]);
//!   `RateLimit-Remaining`/`RateLimit-Reset` spread the remaining quota over the reset window before
//!   a 429 happens ([`TenantLimiter::observe_rate_limit`]).
//! - In-flight requests are bounded by a semaphore per tenant.
//!
//! One [`LimiterRegistry`] per process (the runtime owns it) hands out the same `Arc<TenantLimiter>`
//! for a tenant to every client. The first registration's settings win; later ones are ignored.

use crate::telemetry::metrics as m;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Share of the RU budget kept for delta pollers (10 %): a delta page with a token costs 1 RU, so
/// 10 % of the smallest tier (1,250 RU/min) still allows ~2 polls per second for the return path
/// while writers use the remaining 90 %.
pub const DEFAULT_DELTA_RESERVE: f64 = 0.10;
/// Share of each window's budget that may be spent as an instantaneous burst (0: one request of
/// the highest cost). The rest is paced evenly, since burst + rate·window ≤ budget: a big burst
/// costs steady-state rate, and paced admission fills a `$batch` within a second or two anyway.
pub const DEFAULT_BURST_SHARE: f64 = 0.0;
/// RU kept unspent per window (5 % of it at most): requests admitted near the end of a window
/// reach Graph in one `$batch` a little later, possibly in the next window; one full batch of
/// writes (20 × 2 RU) absorbs that, so a fixed-window budget is never exceeded by our own pacing.
pub const WINDOW_SPILL_MARGIN_RU: f64 = 40.0;
/// Requests in flight per tenant. Microsoft asks to "reduce concurrency"; 8 keeps two cores busy
/// with Graph latencies of 100–500 ms without spiking.
pub const DEFAULT_MAX_CONCURRENCY: usize = 8;
/// The largest single request cost (a permission operation, §8.2); bursts are never smaller.
const MAX_COST: u32 = 5;
/// Average RU per request (§8.2 rule of thumb) used to spread `RateLimit-Remaining` over the reset.
const AVG_COST: f64 = 2.0;

/// RU price of one Graph request (graph-api.md §8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Single-item GET, delta with a token: 1 RU.
    Single,
    /// Create/update/delete, multi-item query, delta without a token: 2 RU.
    Multi,
    /// Any permission operation (incl. `$expand=permissions`): 5 RU.
    Permission,
}

impl Cost {
    pub fn units(self) -> u32 {
        match self {
            Cost::Single => 1,
            Cost::Multi => 2,
            Cost::Permission => 5,
        }
    }

    /// Prices a request from its method and its URL relative to the version (`/sites/…?…`).
    pub fn of(method: &str, path_and_query: &str) -> Cost {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let query = query.to_ascii_lowercase();
        let path = path.trim_end_matches('/');
        if query.contains("permissions") || path.ends_with("/permissions") {
            return Cost::Permission;
        }
        if !method.eq_ignore_ascii_case("GET") {
            return Cost::Multi;
        }
        if path.ends_with("/delta") || path.ends_with("/delta()") {
            let has_token = query
                .split('&')
                .any(|kv| kv.starts_with("token=") || kv.starts_with("$deltatoken="));
            return if has_token { Cost::Single } else { Cost::Multi };
        }
        if path.ends_with("/items")
            || path.ends_with("/lists")
            || path.ends_with("/columns")
            || path == "/sites"
        {
            return Cost::Multi;
        }
        Cost::Single
    }
}

/// Who is asking: writers cannot consume the share reserved for delta pollers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Writer,
    Delta,
}

/// Budget settings of one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterConfig {
    pub ru_per_minute: u32,
    pub ru_per_day: Option<u64>,
    /// In `[0, 0.9]`; see [`DEFAULT_DELTA_RESERVE`].
    pub delta_reserve: f64,
    pub max_concurrency: usize,
}

impl LimiterConfig {
    pub fn new(ru_per_minute: u32) -> LimiterConfig {
        LimiterConfig {
            ru_per_minute,
            ru_per_day: None,
            delta_reserve: DEFAULT_DELTA_RESERVE,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// A GCRA admitting at most `budget` units in any interval of length `window`.
fn window_limiter(budget: f64, window: Duration) -> Direct {
    let budget = budget.max(f64::from(MAX_COST) * 2.0);
    let budget = budget - WINDOW_SPILL_MARGIN_RU.min(budget * 0.05);
    let burst = (budget * DEFAULT_BURST_SHARE)
        .floor()
        .max(f64::from(MAX_COST))
        .min(f64::from(u32::MAX));
    let rate = budget - burst;
    let period = window.div_f64(rate.max(1.0));
    let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("non-zero period")
        .allow_burst(NonZeroU32::new(burst as u32).expect("burst ≥ MAX_COST"));
    RateLimiter::direct(quota)
}

/// The limiter of one tenant. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct TenantLimiter {
    tenant: String,
    config: LimiterConfig,
    all: Direct,
    writers: Direct,
    day: Option<Direct>,
    paused_until: Mutex<Option<Instant>>,
    inflight: Arc<Semaphore>,
}

/// Held while a request is in flight; dropping it frees a concurrency slot.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

impl TenantLimiter {
    pub fn new(tenant: impl Into<String>, config: LimiterConfig) -> TenantLimiter {
        let minute = Duration::from_secs(60);
        let per_min = f64::from(config.ru_per_minute.max(1));
        let reserve = config.delta_reserve.clamp(0.0, 0.9);
        let tenant = tenant.into();
        metrics::gauge!(m::GRAPH_RU_BUDGET_PER_MINUTE, "tenant" => tenant.clone()).set(per_min);
        TenantLimiter {
            tenant,
            all: window_limiter(per_min, minute),
            writers: window_limiter(per_min * (1.0 - reserve), minute),
            day: config
                .ru_per_day
                .map(|d| window_limiter(d as f64, Duration::from_secs(86_400))),
            paused_until: Mutex::new(None),
            inflight: Arc::new(Semaphore::new(config.max_concurrency.max(1))),
            config,
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    /// Waits until the tenant is not paused, the budget has `cost`, and a concurrency slot is free.
    pub async fn acquire(&self, lane: Lane, cost: Cost) -> Admission {
        self.reserve(lane, cost).await;
        let permit = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        // A 429 may have arrived while we waited for a slot.
        self.wait_pause().await;
        Admission { _permit: permit }
    }

    /// Waits until the tenant is not paused and the budget has `cost` (charged on return), without
    /// taking a concurrency slot: used for the inner requests of a `$batch`.
    pub async fn reserve(&self, lane: Lane, cost: Cost) {
        let n = NonZeroU32::new(cost.units()).expect("cost ≥ 1");
        self.wait_pause().await;
        // `until_n_ready` only errs when n > burst, which window_limiter rules out (burst ≥ MAX_COST).
        if lane == Lane::Writer {
            let _ = self.writers.until_n_ready(n).await;
        }
        let _ = self.all.until_n_ready(n).await;
        if let Some(day) = &self.day {
            let _ = day.until_n_ready(n).await;
        }
    }

    async fn wait_pause(&self) {
        loop {
            let until = *self.paused_until.lock().expect("pause lock");
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// Pauses every request to this tenant for `d` (extends, never shortens, a pause in force).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut p = self.paused_until.lock().expect("pause lock");
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }

    /// Remaining pause, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        let p = *self.paused_until.lock().expect("pause lock");
        p.and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Reacts to `RateLimit-Remaining`/`RateLimit-Reset` (sent once ≥ 80 % of the minute budget is
    /// used, §8.6): spreads the remaining quota over the time to reset by pausing the tenant for
    /// `reset · AVG_COST / remaining` (the whole reset when nothing remains).
    pub fn observe_rate_limit(&self, remaining: u64, reset: Duration) {
        let wait = if remaining == 0 {
            reset
        } else {
            reset.mul_f64((AVG_COST / remaining as f64).min(1.0))
        };
        if !wait.is_zero() {
            self.pause_for(wait);
        }
    }
}

/// Hands out one [`TenantLimiter`] per tenant (case-insensitive), shared by all clients.
#[derive(Debug, Default)]
pub struct LimiterRegistry {
    by_tenant: Mutex<HashMap<String, Arc<TenantLimiter>>>,
}

impl LimiterRegistry {
    pub fn new() -> LimiterRegistry {
        LimiterRegistry::default()
    }

    /// The tenant's limiter; created with `config` on first use (later configs are ignored).
    pub fn get_or_create(&self, tenant: &str, config: &LimiterConfig) -> Arc<TenantLimiter> {
        let key = tenant.to_ascii_lowercase();
        let mut map = self.by_tenant.lock().expect("registry lock");
        if let Some(l) = map.get(&key) {
            if l.config() != config {
                tracing::warn!(
                    tenant,
                    "graph limiter already configured for this tenant; keeping the first settings"
                );
            }
            return l.clone();
        }
        let l = Arc::new(TenantLimiter::new(tenant, config.clone()));
        map.insert(key, l.clone());
        l
    }

    /// Drops the tenant's limiter so the next [`Self::get_or_create`] makes one with its config (a
    /// reloaded budget). Clients holding the old one keep it until they are made again.
    pub fn forget(&self, tenant: &str) {
        let mut map = self.by_tenant.lock().expect("registry lock");
        map.remove(&tenant.to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_table() {
        let s = "/sites/h,a,b/lists/L";
        assert_eq!(Cost::of("GET", &format!("{s}/items/7")), Cost::Single);
        assert_eq!(
            Cost::of("GET", &format!("{s}/items/7?$expand=fields")),
            Cost::Single
        );
        assert_eq!(
            Cost::of("GET", &format!("{s}/items?$filter=x")),
            Cost::Multi
        );
        assert_eq!(Cost::of("GET", &format!("{s}/columns")), Cost::Multi);
        assert_eq!(Cost::of("GET", "/sites/h,a,b/lists"), Cost::Multi);
        assert_eq!(
            Cost::of("GET", "/sites/contoso.sharepoint.com:/sites/dev"),
            Cost::Single
        );
        assert_eq!(Cost::of("POST", &format!("{s}/items")), Cost::Multi);
        assert_eq!(
            Cost::of("PATCH", &format!("{s}/items/7/fields")),
            Cost::Multi
        );
        assert_eq!(Cost::of("DELETE", &format!("{s}/items/7")), Cost::Multi);
        assert_eq!(Cost::of("GET", &format!("{s}/items/delta")), Cost::Multi);
        assert_eq!(
            Cost::of("GET", &format!("{s}/items/delta?$expand=fields")),
            Cost::Multi
        );
        assert_eq!(
            Cost::of("GET", &format!("{s}/items/delta?token=abc")),
            Cost::Single
        );
        assert_eq!(
            Cost::of("GET", &format!("{s}/items/delta?$expand=fields&token=abc")),
            Cost::Single
        );
        assert_eq!(
            Cost::of("GET", &format!("{s}/items/7?$expand=permissions")),
            Cost::Permission
        );
        assert_eq!(Cost::of("POST", "/sites/x/permissions"), Cost::Permission);
        assert_eq!(
            [Cost::Single, Cost::Multi, Cost::Permission].map(Cost::units),
            [1, 2, 5]
        );
    }

    #[tokio::test]
    async fn burst_is_bounded_and_reserve_is_kept_from_writers() {
        // The burst is one request of the highest cost on every lane.
        let l = TenantLimiter::new("t", LimiterConfig::new(1000));
        let n = NonZeroU32::new(1).unwrap();
        let mut writer_burst = 0;
        while l.writers.check_n(n).is_ok_and(|r| r.is_ok()) {
            writer_burst += 1;
        }
        assert_eq!(writer_burst, MAX_COST);
        let mut all_burst = 0;
        while l.all.check_n(n).is_ok_and(|r| r.is_ok()) {
            all_burst += 1;
        }
        assert_eq!(all_burst, MAX_COST);
        // The largest cost always fits a burst, so acquire can never fail on capacity.
        let tiny = TenantLimiter::new("t", LimiterConfig::new(1));
        assert!(tiny.writers.check_n(NonZeroU32::new(5).unwrap()).is_ok());
    }

    #[tokio::test]
    async fn pause_extends_never_shortens() {
        let l = TenantLimiter::new("t", LimiterConfig::new(100));
        assert!(l.paused_for().is_none());
        l.pause_for(Duration::from_secs(30));
        l.pause_for(Duration::from_secs(1));
        assert!(l.paused_for().unwrap() > Duration::from_secs(20));
        // Spreading: 2 RU avg over 10 remaining in 5 s → 1 s; nothing remaining → the full reset.
        let l = TenantLimiter::new("t", LimiterConfig::new(100));
        l.observe_rate_limit(10, Duration::from_secs(5));
        let p = l.paused_for().unwrap();
        assert!(p <= Duration::from_secs(1) && p > Duration::from_millis(500));
        l.observe_rate_limit(0, Duration::from_secs(40));
        assert!(l.paused_for().unwrap() > Duration::from_secs(30));
    }

    #[test]
    fn registry_shares_per_tenant() {
        let r = LimiterRegistry::new();
        let a = r.get_or_create("Contoso.onmicrosoft.com", &LimiterConfig::new(100));
        let b = r.get_or_create("contoso.onmicrosoft.com", &LimiterConfig::new(100));
        let c = r.get_or_create("fabrikam.onmicrosoft.com", &LimiterConfig::new(100));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
