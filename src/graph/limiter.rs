//! The resource-unit (RU) priced limiter, one per tenant, shared by every pipeline in the process.
//!
//! Contract:
//! - Every request is priced by [`Cost`] (graph-api.md §8.2) and admitted as a whole (a `$batch`
//!   costs the sum of its inner requests) by [`TenantLimiter::acquire`], after a concurrency slot
//!   is free and right before it is sent: RU are counted when they reach Graph, not when a batch
//!   starts collecting them (collecting batches in flight made admitted and sent RU drift apart
//!   by several seconds of budget, which drew 429s at window boundaries: ops/docs/bench.md).
//! - **Window bound**: a sliding log of what was sent admits at most the minute budget in **any**
//!   61-second interval (60 s + [`WINDOW_LATENCY_ALLOWANCE`] for latency jitter), so no alignment
//!   of SharePoint's fixed windows (§8.3; the emulator anchors them at the first request) can see
//!   more, a burst after an idle period included. Throttled requests count too (they consume quota
//!   at SharePoint).
//! - **Pacing**: writes are spread evenly at the window's rate (a request waits until the RU before
//!   it are paid off; after idle at most [`PACE_CATCH_UP`] of budget and one request go at once),
//!   so the budget is spent smoothly instead of in spikes. Delta polls are paced by their own interval: they count
//!   toward the pace writers keep but never wait behind a writer's batch.
//! - A share of the budget ([`DEFAULT_DELTA_RESERVE`]) is reserved for delta pollers
//!   ([`Lane::Delta`]): writers ([`Lane::Writer`]) have their own window and pace for the rest, so
//!   a write backlog can never starve the return path. An optional day budget is paced evenly.
//! - **Learning** ([`TenantLimiter::observe_rate_limit`]): `RateLimit-Limit` below the configured
//!   budget becomes the budget (the tenant's real tier); `RateLimit-Remaining`/`RateLimit-Reset`
//!   cap what is sent until the reset (less what was sent after the answered request), so another
//!   client of the same app in the tenant cannot make us overshoot.
//! - A 429/503 pauses **all** requests to the tenant until its `Retry-After`
//!   ([`TenantLimiter::pause_for`]).
//! - In-flight requests are bounded by a semaphore per tenant.
//!
//! Time is tokio's ([`tokio::time::Instant`]), so tests run it on a paused, virtual clock
//! (`limiter_props.rs` checks it against the emulator's throttling that way).
//!
//! One [`LimiterRegistry`] per process (the runtime owns it) hands out the same `Arc<TenantLimiter>`
//! for a tenant to every client. The first registration's settings win; later ones are ignored.
//! Two processes with the same app and tenant share SharePoint's bucket but not this limiter; the
//! `RateLimit-*` learning then keeps them from overshooting once ≥ 80 % of a window is used.

use crate::telemetry::metrics as m;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Share of the RU budget kept for delta pollers (10 %): a delta page with a token costs 1 RU, so
/// 10 % of the smallest tier (1,250 RU/min) still allows ~2 polls per second for the return path
/// while writers use the remaining 90 %.
pub const DEFAULT_DELTA_RESERVE: f64 = 0.10;
/// How long past its window a sent request still counts (1 s): Graph charges a request when it
/// arrives, so one sent up to this much faster than an earlier one (latency jitter) cannot land in
/// that one's window. Costs 1/61 of the budget (0.984 of it is used under demand).
pub const WINDOW_LATENCY_ALLOWANCE: Duration = Duration::from_secs(1);
/// Share of a day budget paced to: 1 % (about 14 minutes of pace) absorbs catch-up bursts and
/// latency over the day.
const DAY_SHARE: f64 = 0.99;
/// Requests in flight per tenant. Microsoft asks to "reduce concurrency"; 8 keeps two cores busy
/// with Graph latencies of 100–500 ms without spiking.
pub const DEFAULT_MAX_CONCURRENCY: usize = 8;
/// How late a paced request may be and still keep its turn (see `Pacer`): 2 s covers a wait for a
/// concurrency slot behind a few requests in flight, or a flush building its next `$batch`; after
/// idle it lets 2 s of budget (42 RU at the smallest tier) go at once, which the window bound
/// still counts.
pub const PACE_CATCH_UP: Duration = Duration::from_secs(2);
/// Two `RateLimit-Reset` readings this close describe the same server window (the header is in
/// whole seconds, rounded up, and the requests it answers were sent at different times).
const SAME_SERVER_WINDOW: Duration = Duration::from_secs(2);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

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

/// The `RateLimit-*` trio (graph-api.md §8.6) of a response, or of an inner `$batch` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// `RateLimit-Limit`: the minute budget SharePoint enforces for this app in this tenant.
    pub limit: Option<u64>,
    /// `RateLimit-Remaining`: RU left in the current window, this request included.
    pub remaining: u64,
    /// `RateLimit-Reset`: time until the window refills.
    pub reset: Duration,
}

impl RateLimit {
    /// Reads the headers through `header` (case-insensitive lookup by the caller); `None` unless
    /// both `RateLimit-Remaining` and `RateLimit-Reset` are present and valid.
    pub fn parse<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<RateLimit> {
        let remaining = header("ratelimit-remaining")?.trim().parse().ok()?;
        let reset = super::error::parse_retry_after(header("ratelimit-reset")?)?;
        let limit = header("ratelimit-limit").and_then(|v| v.trim().parse().ok());
        Some(RateLimit {
            limit,
            remaining,
            reset,
        })
    }
}

/// RU sent in the last `window`, oldest first.
#[derive(Debug)]
struct WindowLog {
    window: Duration,
    cap: u64,
    sent: VecDeque<(Instant, u64)>,
    sum: u64,
}

impl WindowLog {
    fn prune(&mut self, now: Instant) {
        while let Some(&(t, c)) = self.sent.front() {
            if t + self.window > now {
                break;
            }
            self.sent.pop_front();
            self.sum -= c;
        }
    }

    /// When `n` more RU fit under the cap (`now` if they do). A request larger than the cap (a
    /// tiny test budget) goes once the log is empty rather than never.
    fn ready_at(&self, now: Instant, n: u64) -> Instant {
        let mut excess = (self.sum + n.min(self.cap)).saturating_sub(self.cap);
        if excess == 0 {
            return now;
        }
        for &(t, c) in &self.sent {
            excess = excess.saturating_sub(c);
            if excess == 0 {
                return t + self.window;
            }
        }
        now
    }
}

/// Even pacing (GCRA's virtual scheduling): a request goes once the RU of those before it are
/// paid off at the pace. A request up to [`PACE_CATCH_UP`] late keeps its turn (the time it waited
/// for a slot or for its batch to fill is not lost), which also bounds a burst after idle to that
/// much budget plus one request.
#[derive(Debug)]
struct Pacer {
    per_ru: Duration,
    /// When the RU admitted so far are paid off (`None`: never admitted).
    paid_off: Option<Instant>,
}

impl Pacer {
    fn new(window: Duration, budget: f64) -> Pacer {
        Pacer {
            per_ru: window.div_f64(budget.max(1.0)),
            paid_off: None,
        }
    }

    fn ready_at(&self, now: Instant) -> Instant {
        self.paid_off.map_or(now, |t| t.max(now))
    }

    fn record(&mut self, now: Instant, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let from = now.checked_sub(PACE_CATCH_UP).unwrap_or(now);
        let base = self.paid_off.map_or(from, |t| t.max(from));
        self.paid_off = Some(base + self.per_ru.saturating_mul(n));
    }
}

/// One lane's minute budget: the window bound and the pace, both at `budget` per
/// `MINUTE + WINDOW_LATENCY_ALLOWANCE`.
#[derive(Debug)]
struct Budget {
    log: WindowLog,
    pace: Pacer,
}

impl Budget {
    fn new(budget: f64) -> Budget {
        let mut b = Budget {
            log: WindowLog {
                window: MINUTE + WINDOW_LATENCY_ALLOWANCE,
                cap: 1,
                sent: VecDeque::new(),
                sum: 0,
            },
            pace: Pacer::new(MINUTE, 1.0),
        };
        b.resize(budget);
        b
    }

    /// A new budget; what was sent stays in the window.
    fn resize(&mut self, budget: f64) {
        let cap = budget.floor().max(1.0);
        self.log.cap = cap as u64;
        self.pace.per_ru = self.log.window.div_f64(cap);
    }

    /// When `n` RU fit the window; also when the pace allows them if `paced`.
    fn ready_at(&mut self, now: Instant, n: u64, paced: bool) -> Instant {
        self.log.prune(now);
        let fits = self.log.ready_at(now, n);
        if paced {
            fits.max(self.pace.ready_at(now))
        } else {
            fits
        }
    }

    fn record(&mut self, now: Instant, n: u64) {
        self.log.sent.push_back((now, n));
        self.log.sum += n;
        self.pace.record(now, n);
    }
}

/// What SharePoint last said about its current window (`RateLimit-Remaining`/`-Reset`).
#[derive(Debug, Clone, Copy)]
struct ServerWindow {
    until: Instant,
    remaining: u64,
}

#[derive(Debug)]
struct State {
    /// The minute budget in force: configured, or the tenant's smaller `RateLimit-Limit`.
    per_minute: u64,
    all: Budget,
    writers: Budget,
    day: Option<Pacer>,
    server: Option<ServerWindow>,
    paused_until: Option<Instant>,
    /// RU admitted so far; an [`Admission`] carries the value after its own RU.
    admitted: u64,
}

impl State {
    fn new(config: &LimiterConfig) -> State {
        let per_minute = u64::from(config.ru_per_minute.max(1));
        let (all, writers) = lane_budgets(per_minute, config.delta_reserve);
        State {
            per_minute,
            all: Budget::new(all),
            writers: Budget::new(writers),
            day: config
                .ru_per_day
                .map(|d| Pacer::new(DAY, d as f64 * DAY_SHARE)),
            server: None,
            paused_until: None,
            admitted: 0,
        }
    }

    fn set_per_minute(&mut self, per_minute: u64, delta_reserve: f64) {
        let (all, writers) = lane_budgets(per_minute, delta_reserve);
        self.per_minute = per_minute;
        self.all.resize(all);
        self.writers.resize(writers);
    }

    /// When `n` RU on `lane` can be admitted (`now` or later).
    fn ready_at(&mut self, lane: Lane, n: u64, now: Instant) -> Instant {
        // Delta polls are paced by their interval; they only count toward the pace writers keep,
        // so a poll never waits behind a writer's batch.
        let writer = lane == Lane::Writer;
        let mut at = self.all.ready_at(now, n, writer);
        if writer {
            at = at.max(self.writers.ready_at(now, n, true));
        }
        if let Some(day) = &self.day {
            at = at.max(day.ready_at(now));
        }
        if let Some(p) = self.paused_until {
            at = at.max(p);
        }
        match self.server {
            Some(w) if w.until <= now => self.server = None,
            Some(w) if w.remaining < n => at = at.max(w.until),
            _ => {}
        }
        at
    }

    /// Admits `n` RU on `lane` at `now` if they can be, returning the admission mark.
    fn try_admit(&mut self, lane: Lane, n: u64, now: Instant) -> Option<u64> {
        if self.ready_at(lane, n, now) > now {
            return None;
        }
        self.all.record(now, n);
        if lane == Lane::Writer {
            self.writers.record(now, n);
        }
        if let Some(day) = &mut self.day {
            day.record(now, n);
        }
        if let Some(w) = &mut self.server {
            w.remaining -= n;
        }
        self.admitted += n;
        Some(self.admitted)
    }
}

/// The minute budgets of all requests and of writers (the delta reserve taken off).
fn lane_budgets(per_minute: u64, delta_reserve: f64) -> (f64, f64) {
    let all = per_minute as f64;
    (all, all * (1.0 - delta_reserve.clamp(0.0, 0.9)))
}

/// The limiter of one tenant. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct TenantLimiter {
    tenant: String,
    config: LimiterConfig,
    state: Mutex<State>,
    inflight: Arc<Semaphore>,
}

/// Held while a request is in flight; dropping it frees a concurrency slot.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    mark: u64,
}

impl Admission {
    /// The limiter's count of admitted RU right after this request: pass it back with the
    /// response's `RateLimit-*` ([`TenantLimiter::observe_rate_limit`]).
    pub fn mark(&self) -> u64 {
        self.mark
    }
}

impl TenantLimiter {
    pub fn new(tenant: impl Into<String>, config: LimiterConfig) -> TenantLimiter {
        let tenant = tenant.into();
        metrics::gauge!(m::GRAPH_RU_BUDGET_PER_MINUTE, "tenant" => tenant.clone())
            .set(f64::from(config.ru_per_minute.max(1)));
        TenantLimiter {
            tenant,
            state: Mutex::new(State::new(&config)),
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

    /// The minute budget paced to: `graph.ru_per_minute`, or the tenant's smaller
    /// `RateLimit-Limit` once Graph has sent one.
    pub fn ru_per_minute(&self) -> u64 {
        self.lock().per_minute
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the tenant is not paused, `units` RU fit the budgets and a concurrency slot is
    /// free; the RU are charged on return, so call it right before sending (a `$batch` passes the
    /// sum of its inner requests).
    pub async fn acquire(&self, lane: Lane, units: u32) -> Admission {
        let n = u64::from(units.max(1));
        loop {
            // Wait for the budget without a slot: a writer waiting for its pace must not keep a
            // delta poll (which the budget would admit) from the slots.
            let at = self.lock().ready_at(lane, n, Instant::now());
            tokio::time::sleep_until(at).await;
            let permit = self
                .inflight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            // Charged only with a slot in hand, so the RU are sent right away; if another request
            // took the budget meanwhile, the slot goes back and the wait starts over.
            if let Some(mark) = self.lock().try_admit(lane, n, Instant::now()) {
                return Admission {
                    _permit: permit,
                    mark,
                };
            }
        }
    }

    /// Pauses every request to this tenant for `d` (extends, never shortens, a pause in force).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut s = self.lock();
        if s.paused_until.is_none_or(|cur| cur < until) {
            s.paused_until = Some(until);
        }
    }

    /// Remaining pause, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        let p = self.lock().paused_until;
        p.and_then(|t| t.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Learns from a response's `RateLimit-*` (sent once ≥ 80 % of the minute budget is used,
    /// §8.6) to the request admitted with `mark`: a smaller `RateLimit-Limit` becomes the budget;
    /// until the reset, at most `RateLimit-Remaining` less the RU sent after that request go out.
    pub fn observe_rate_limit(&self, mark: u64, rl: &RateLimit) {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(limit) = rl.limit.filter(|l| *l > 0 && *l < s.per_minute) {
            s.set_per_minute(limit, self.config.delta_reserve);
            tracing::info!(
                tenant = self.tenant,
                limit,
                configured = self.config.ru_per_minute,
                "Graph reports a smaller RU budget per minute than graph.ru_per_minute; pacing to it"
            );
            metrics::gauge!(m::GRAPH_RU_BUDGET_PER_MINUTE, "tenant" => self.tenant.clone())
                .set(limit as f64);
        }
        let remaining = rl.remaining.saturating_sub(s.admitted.saturating_sub(mark));
        let until = now + rl.reset;
        match &mut s.server {
            // Another reading of the same window: the smaller remainder holds.
            Some(w) if w.until > now && until <= w.until + SAME_SERVER_WINDOW => {
                w.remaining = w.remaining.min(remaining);
            }
            _ => s.server = Some(ServerWindow { until, remaining }),
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

    /// Admits `units` and returns the (virtual) time it took.
    async fn timed(l: &TenantLimiter, lane: Lane, units: u32) -> Duration {
        let t = Instant::now();
        drop(l.acquire(lane, units).await);
        t.elapsed()
    }

    /// tokio's timer fires on whole milliseconds.
    fn about(d: Duration, expected: Duration) {
        assert!(
            d >= expected && d <= expected + Duration::from_millis(1),
            "{d:?} ≠ {expected:?}"
        );
    }

    fn no_reserve(ru_per_minute: u32) -> LimiterConfig {
        LimiterConfig {
            delta_reserve: 0.0,
            ..LimiterConfig::new(ru_per_minute)
        }
    }

    /// The window a request counts in.
    const COUNTED: Duration = MINUTE.saturating_add(WINDOW_LATENCY_ALLOWANCE);

    #[tokio::test(start_paused = true)]
    async fn after_idle_a_short_burst_then_the_pace() {
        // 1,250 RU per 61 s: one RU every 61/1,250 s; after idle, PACE_CATCH_UP (2 s ≈ 41 RU) of
        // budget and one request go at once.
        let l = TenantLimiter::new("t", no_reserve(1250));
        let per_ru = COUNTED.div_f64(1250.0);
        for _ in 0..2 {
            assert_eq!(timed(&l, Lane::Writer, 40).await, Duration::ZERO);
            assert_eq!(timed(&l, Lane::Writer, 40).await, Duration::ZERO);
            about(
                timed(&l, Lane::Writer, 2).await,
                per_ru * 80 - PACE_CATCH_UP,
            );
            about(timed(&l, Lane::Writer, 1).await, per_ru * 2);
            // Idle for a window: the same again.
            tokio::time::sleep(MINUTE).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_ever_holds_more_than_the_budget() {
        // Big requests after idle gaps: the pace alone would let a burst plus a full minute's
        // pace into one window.
        let l = TenantLimiter::new("t", no_reserve(1250));
        let t0 = Instant::now();
        let (mut sent, mut idle) = (Vec::new(), Duration::ZERO);
        for i in 0..400u32 {
            if i % 50 == 49 {
                let gap = Duration::from_secs(u64::from(i % 7) * 9);
                tokio::time::sleep(gap).await;
                idle += gap;
            }
            let units = [40, 1, 2, 5, 40][(i % 5) as usize];
            drop(l.acquire(Lane::Writer, units).await);
            sent.push((t0.elapsed(), u64::from(units)));
        }
        for (k, &(start, _)) in sent.iter().enumerate() {
            let in_window: u64 = sent[k..]
                .iter()
                .take_while(|(t, _)| *t < start + COUNTED)
                .map(|(_, u)| u)
                .sum();
            assert!(
                in_window <= 1250,
                "{in_window} RU in the 61 s from {start:?}"
            );
        }
        // And the budget is used while there is demand (time not spent idle).
        let total: u64 = sent.iter().map(|(_, u)| u).sum();
        let busy = (t0.elapsed() - idle).as_secs_f64();
        assert!(
            total as f64 / busy * 60.0 >= 0.95 * 1250.0,
            "{total} RU in {busy} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn writers_leave_the_reserve_to_delta_pollers() {
        let l = TenantLimiter::new("t", LimiterConfig::new(1000));
        let t0 = Instant::now();
        let mut first_minute = 0u64;
        while t0.elapsed() < MINUTE {
            drop(l.acquire(Lane::Writer, 20).await);
            if t0.elapsed() < MINUTE {
                first_minute += 20;
            }
        }
        // Writers alone: 900 RU per window, and they get them.
        assert!((855..=900).contains(&first_minute), "{first_minute}");
        // A delta poll is not held up by the writers' exhausted window or their pace.
        assert_eq!(timed(&l, Lane::Delta, 1).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_extends_never_shortens() {
        let l = TenantLimiter::new("t", LimiterConfig::new(100));
        assert!(l.paused_for().is_none());
        l.pause_for(Duration::from_secs(30));
        l.pause_for(Duration::from_secs(1));
        assert_eq!(l.paused_for(), Some(Duration::from_secs(30)));
        assert_eq!(timed(&l, Lane::Delta, 1).await, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn learns_the_tenant_window_from_ratelimit_headers() {
        let l = TenantLimiter::new("t", no_reserve(2500));
        let a = l.acquire(Lane::Writer, 40).await;
        let b = l.acquire(Lane::Writer, 2).await;
        drop(b);
        // The answer to `a` (sent before `b`): a 1,250 tier, 10 RU left for 5 s.
        let rl = RateLimit::parse(|h| match h {
            "ratelimit-limit" => Some("1250"),
            "ratelimit-remaining" => Some("10"),
            "ratelimit-reset" => Some("5"),
            _ => None,
        })
        .unwrap();
        l.observe_rate_limit(a.mark(), &rl);
        drop(a);
        assert_eq!(l.ru_per_minute(), 1250);
        // 10 − 2 (sent after `a`) = 8 RU left: a 5 RU request fits, the next 5 waits for the reset.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(timed(&l, Lane::Writer, 5).await, Duration::ZERO);
        assert_eq!(timed(&l, Lane::Writer, 5).await, Duration::from_secs(4));
        // A larger limit never raises the configured budget; a partial trio is ignored.
        let rl = RateLimit {
            limit: Some(5000),
            remaining: 4000,
            reset: Duration::from_secs(1),
        };
        l.observe_rate_limit(0, &rl);
        assert_eq!(l.ru_per_minute(), 1250);
        assert!(RateLimit::parse(|h| (h == "ratelimit-remaining").then_some("3")).is_none());
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
