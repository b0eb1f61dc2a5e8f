//! The single mutable state behind the emulator's mutex: data, throttling, faults, counters and
//! the write-ahead log handle. One lock keeps every request atomic and the WAL in apply order.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::model::Site;
use super::persist::{Record, Wal};
use super::throttle::Throttle;

/// Tunables where Microsoft's behaviour is undocumented (see ops/docs/emulator.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Items per page without `$top` (reported: 200).
    pub page_size: usize,
    /// `$top` cap (reported: 5,000).
    pub max_page_size: usize,
    /// Delta tokens older than this answer 410 `resyncRequired`.
    pub delta_token_lifetime_secs: u64,
    /// Above this many items, a Prefer-enabled filter on a non-indexed column fails.
    pub list_view_threshold: usize,
    /// Status of that failure (429 reported through Graph; SharePoint REST uses 500).
    pub threshold_status: u16,
    /// Site time zone, for date-only columns (stored as local midnight in UTC).
    pub utc_offset_minutes: i32,
    /// Real Graph rejects hyperlink writes; flip to accept `{Url, Description}`.
    pub hyperlink_writes: bool,
    /// Return `$batch` responses in a shuffled order (Graph does not guarantee order).
    pub shuffle_batch_responses: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            page_size: 200,
            max_page_size: 5_000,
            delta_token_lifetime_secs: 30 * 86_400,
            list_view_threshold: 5_000,
            threshold_status: 429,
            utc_offset_minutes: 0,
            hyperlink_writes: false,
            shuffle_batch_responses: true,
        }
    }
}

/// Fault-injection settings (`POST /_emulator/faults`). Deterministic given a seed and a request order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSpec {
    pub throttle_rate: f64,
    pub unavailable_rate: f64,
    pub latency_ms: u64,
    pub reset_rate: f64,
    /// Probability that a delta entry is repeated on its page (replays happen in real Graph).
    pub delta_replay_rate: f64,
    /// `Retry-After` on injected 429/503 (default 1).
    pub retry_after_secs: Option<u64>,
    pub seed: Option<u64>,
}

#[derive(Debug)]
pub struct Faults {
    pub spec: FaultSpec,
    rng: StdRng,
    pub injected_throttles: u64,
    pub injected_unavailable: u64,
    pub injected_resets: u64,
}

impl Faults {
    pub fn new(spec: FaultSpec) -> Faults {
        let rng = match spec.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Faults {
            spec,
            rng,
            injected_throttles: 0,
            injected_unavailable: 0,
            injected_resets: 0,
        }
    }

    /// One draw per decision, always made (even at rate 0) so sequences stay aligned across settings.
    pub fn draw(&mut self, rate: f64) -> bool {
        let x: f64 = self.rng.random();
        rate > 0.0 && x < rate
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        use rand::seq::SliceRandom;
        v.shuffle(&mut self.rng);
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub by_method: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub batches: u64,
    /// Calls (direct, and each `$batch` entry; not the envelope) by client id, then method: tells
    /// the service's writes from a person's when both work on one list (echo-write tests).
    pub by_client: BTreeMap<String, BTreeMap<String, u64>>,
    /// The latest calls with their ids (`GET /_emulator/requests`).
    pub requests: RequestLog,
}

/// Calls kept by the request log: enough for a test's whole workload (a few thousand writes)
/// while bounding memory in a long-running emulator (~2 MB).
pub const REQUEST_LOG_CAPACITY: usize = 10_000;

/// The latest Graph calls (direct ones and each `$batch` entry), oldest first, so a test can
/// check the request ids a client recorded against what the service saw.
#[derive(Debug, Default)]
pub struct RequestLog {
    entries: std::collections::VecDeque<LoggedRequest>,
}

/// One answered call. Entries of one `$batch` share the envelope's ids (their inner responses
/// carry none of their own, so a client attributes the envelope's to each).
#[derive(Debug, Clone, Serialize)]
pub struct LoggedRequest {
    pub at_ms: i64,
    pub request_id: String,
    pub client_request_id: String,
    /// The caller's client id.
    pub client: String,
    pub method: String,
    /// Path below `/v1.0`.
    pub path: String,
    pub status: u16,
}

impl RequestLog {
    pub fn push(&mut self, r: LoggedRequest) {
        if self.entries.len() == REQUEST_LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(r);
    }

    pub fn to_json(&self) -> Value {
        json!({ "capacity": REQUEST_LOG_CAPACITY, "requests": self.entries })
    }
}

#[derive(Debug)]
pub struct State {
    pub sites: Vec<Site>,
    pub settings: Settings,
    pub throttle: Throttle,
    pub faults: Faults,
    pub stats: Stats,
    pub wal: Wal,
    /// Bumped by `expire-delta-tokens`; tokens of an older epoch answer 410.
    pub delta_epoch: u64,
}

impl State {
    pub fn site_index(&self, id: &str) -> Option<usize> {
        self.sites
            .iter()
            .position(|s| s.meta.id.eq_ignore_ascii_case(id))
    }

    /// Adds a site unless one with the same host and path exists; returns its index.
    pub fn ensure_site(
        &mut self,
        hostname: &str,
        path: &str,
        now_ms: i64,
        group_id: Option<String>,
    ) -> usize {
        if let Some(i) = self.sites.iter().position(|s| {
            s.meta.hostname.eq_ignore_ascii_case(hostname) && s.meta.path.eq_ignore_ascii_case(path)
        }) {
            return i;
        }
        let site = Site::new(hostname, path, now_ms, group_id);
        self.wal.record(&Record::Site {
            meta: site.meta.clone(),
        });
        self.sites.push(site);
        self.sites.len() - 1
    }

    pub fn stats_json(&self, now_ms: i64) -> Value {
        let lists: Vec<Value> = self
            .sites
            .iter()
            .flat_map(|s| {
                s.lists.iter().map(move |l| {
                    json!({ "site": s.meta.id, "list": l.meta.id.to_string(),
                            "displayName": l.meta.display_name, "items": l.items.len() })
                })
            })
            .collect();
        let by_status: serde_json::Map<String, Value> = self
            .stats
            .by_status
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({
            "requests": { "by_method": self.stats.by_method, "by_status": by_status, "batches": self.stats.batches,
                          "by_client": self.stats.by_client },
            "ru_consumed": self.throttle.consumed,
            "throttled": self.throttle.throttled,
            "budget": self.throttle.json(now_ms),
            "faults": {
                "spec": self.faults.spec,
                "injected_throttles": self.faults.injected_throttles,
                "injected_unavailable": self.faults.injected_unavailable,
                "injected_resets": self.faults.injected_resets,
            },
            "settings": self.settings,
            "lists": lists,
            "delta_epoch": self.delta_epoch,
        })
    }
}
