//! The pure half of a cursor reset: reading the request (every field checked before anything is
//! looked up) and the blast-radius arithmetic the dry run answers with.
//!
//! Blast radius, per kind of cursor:
//! - a consumer group: per partition, the events between its current position (the committed
//!   offset, or the partition's start when the group never committed) and the target are
//!   *re-read* (target before it) or *skipped* (target after it). RU: a re-read change event costs
//!   nothing when the ledger already holds its row's state (same hash → no write) and at most one
//!   write ([`WRITE_RU`]) when it does not, so the push group's RU figure is an upper bound;
//!   skipped events cost nothing and never reach the list.
//! - the slot: the WAL bytes between `confirmed_flush_lsn` and the target are skipped (changes
//!   never captured); it cannot move backwards (PostgreSQL may have removed that WAL).
//! - a list's delta link: every item is enumerated again, [`DELTA_PAGE_ITEMS`] per page at
//!   [`FULL_DELTA_PAGE_RU`] each (a delta without a token); the return path recognises unchanged
//!   items by the ledger, so the pages are the cost.
//!
//! Minutes are RU over the lane's share of the configured `graph.ru_per_minute`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::control::problem::ApiError;

/// RU of one write (create, update or delete: [`Cost::Multi`](crate::graph::limiter::Cost::Multi), graph-api.md §8.2).
pub const WRITE_RU: u64 = 2;
/// RU of one delta page without a token (a full enumeration: [`Cost::Multi`](crate::graph::limiter::Cost::Multi), graph-api.md §6.5).
pub const FULL_DELTA_PAGE_RU: u64 = 2;
/// Items per delta page: Graph's default page size (graph-api.md §5, the emulator's too); the
/// poller asks for no other.
pub const DELTA_PAGE_ITEMS: u64 = 200;
/// Longest `by` accepted (it is recorded with the run).
const MAX_BY_LEN: usize = 200;

/// Where a consumer group moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupTo {
    Earliest,
    Latest,
    /// The same offset in every selected partition.
    Offset(i64),
    /// Each partition's position moved by this many (negative: back), kept within the partition.
    ShiftBy(i64),
    /// The first offset at or after this time (ms since the epoch).
    Time(i64),
}

/// Where the slot moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotTo {
    /// `pg_current_wal_lsn()`.
    Now,
    Lsn(u64),
}

/// Which cursor moves, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Slot(SlotTo),
    Group {
        /// Role (`sync`, `return`, `dlq-replay`) or full group name.
        group: String,
        to: GroupTo,
        topic: Option<String>,
        partition: Option<i32>,
    },
    /// A list's delta link to none (display name or id).
    List(String),
}

/// A parsed `POST /pipelines/{name}/cursors/reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetRequest {
    pub target: Target,
    pub dry_run: bool,
    pub by: Option<String>,
}

/// The fields of a group target (`to` also serves a list: `none`).
const GROUP_FIELDS: &[&str] = &[
    "group",
    "to",
    "offset",
    "shift_by",
    "time",
    "topic",
    "partition",
];
/// Fields any request may have.
const COMMON_FIELDS: &[&str] = &["dry_run", "by"];

fn known_field(k: &str) -> bool {
    ["slot", "list"].contains(&k) || GROUP_FIELDS.contains(&k) || COMMON_FIELDS.contains(&k)
}

/// Reads the request body (a JSON object) and the `dry_run` query parameter.
pub fn parse_request(body: &Value, dry_run_query: Option<&str>) -> Result<ResetRequest, ApiError> {
    let obj = body.as_object().ok_or_else(|| {
        ApiError::bad_param(
            "body",
            "expected a JSON object with one of `slot`, `group` or `list`",
        )
    })?;
    if let Some(k) = obj.keys().find(|k| !known_field(k)) {
        return Err(ApiError::bad_param(
            k,
            format!(
                "unknown field; expected slot, list or {}, and {}",
                GROUP_FIELDS.join(", "),
                COMMON_FIELDS.join(", ")
            ),
        ));
    }
    let str_field = |name: &str| -> Result<Option<String>, ApiError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
            Some(_) => Err(ApiError::bad_param(name, "expected a non-empty string")),
        }
    };
    let int_field = |name: &str| -> Result<Option<i64>, ApiError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::bad_param(name, "expected an integer")),
        }
    };
    let dry_run = match (obj.get("dry_run"), dry_run_query) {
        (_, Some("true")) => true,
        (_, Some("false")) | (None | Some(Value::Null), None) => false,
        (_, Some(_)) => return Err(ApiError::bad_param("dry_run", "expected true or false")),
        (Some(v), None) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad_param("dry_run", "expected true or false"))?,
    };
    let by = str_field("by")?;
    if by.as_ref().is_some_and(|b| b.len() > MAX_BY_LEN) {
        return Err(ApiError::bad_param(
            "by",
            format!("at most {MAX_BY_LEN} characters"),
        ));
    }
    let chosen: Vec<&str> = ["slot", "group", "list"]
        .into_iter()
        .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    let target = match chosen.as_slice() {
        ["slot"] => {
            only(obj, &["slot"])?;
            Target::Slot(parse_slot(&str_field("slot")?.unwrap_or_default())?)
        }
        ["list"] => {
            only(obj, &["list", "to"])?;
            if let Some(to) = str_field("to")?
                && to != "none"
            {
                return Err(ApiError::bad_param(
                    "to",
                    "a list's delta link can only be reset to `none` (full re-enumeration)",
                ));
            }
            Target::List(str_field("list")?.unwrap_or_default())
        }
        [_group] => {
            only(obj, GROUP_FIELDS)?;
            let to = parse_group_to(
                str_field("to")?,
                int_field("offset")?,
                int_field("shift_by")?,
                str_field("time")?,
            )?;
            let partition = match int_field("partition")? {
                None => None,
                Some(p) => Some(
                    i32::try_from(p)
                        .ok()
                        .filter(|p| *p >= 0)
                        .ok_or_else(|| ApiError::bad_param("partition", "expected 0 or more"))?,
                ),
            };
            Target::Group {
                group: str_field("group")?.unwrap_or_default(),
                to,
                topic: str_field("topic")?,
                partition,
            }
        }
        [] => {
            return Err(ApiError::bad_param(
                "target",
                "name the cursor to move: `slot`, `group` or `list`",
            ));
        }
        [_, second, ..] => {
            return Err(ApiError::bad_param(
                second,
                "one cursor per reset: give only one of `slot`, `group`, `list`",
            ));
        }
    };
    Ok(ResetRequest {
        target,
        dry_run,
        by,
    })
}

/// Refuses target fields that do not belong to the chosen kind of cursor.
fn only(obj: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match obj.iter().find(|(k, v)| {
        !v.is_null() && !allowed.contains(&k.as_str()) && !COMMON_FIELDS.contains(&k.as_str())
    }) {
        Some((k, _)) => Err(ApiError::bad_param(
            k,
            format!(
                "not a field of this target (it takes {})",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn parse_slot(s: &str) -> Result<SlotTo, ApiError> {
    if s.eq_ignore_ascii_case("now") {
        return Ok(SlotTo::Now);
    }
    parse_lsn(s).map(SlotTo::Lsn).ok_or_else(|| {
        ApiError::bad_param(
            "slot",
            "expected `now` or an LSN such as 0/16B3748 (a slot only moves forward)",
        )
    })
}

fn parse_group_to(
    to: Option<String>,
    offset: Option<i64>,
    shift_by: Option<i64>,
    time: Option<String>,
) -> Result<GroupTo, ApiError> {
    let given = [
        to.is_some(),
        offset.is_some(),
        shift_by.is_some(),
        time.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ApiError::bad_param(
            "to",
            "give exactly one of `to` (earliest or latest), `offset`, `shift_by` or `time`",
        ));
    }
    if let Some(to) = to {
        return match to.as_str() {
            "earliest" => Ok(GroupTo::Earliest),
            "latest" => Ok(GroupTo::Latest),
            _ => Err(ApiError::bad_param("to", "expected earliest or latest")),
        };
    }
    if let Some(o) = offset {
        return if o < 0 {
            Err(ApiError::bad_param("offset", "expected 0 or more"))
        } else {
            Ok(GroupTo::Offset(o))
        };
    }
    if let Some(n) = shift_by {
        return Ok(GroupTo::ShiftBy(n));
    }
    let time = time.unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(&time)
        .map(|t| GroupTo::Time(t.timestamp_millis()))
        .map_err(|e| {
            ApiError::bad_param(
                "time",
                format!("expected an RFC 3339 time such as 2025-01-31T12:00:00Z ({e})"),
            )
        })
}

/// `X/Y` (hexadecimal halves) → the 64-bit position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// The 64-bit position as PostgreSQL prints it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Where one partition of a group stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub topic: String,
    pub partition: i32,
    /// `None`: the group never committed here (it starts at `start`).
    pub committed: Option<i64>,
    pub start: i64,
    pub end: i64,
}

impl PartitionState {
    /// Where the group's next consumer starts reading.
    pub fn position(&self) -> i64 {
        self.committed.unwrap_or(self.start)
    }
}

/// One partition's move and what it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionMove {
    pub topic: String,
    pub partition: i32,
    pub committed: Option<i64>,
    pub from: i64,
    pub to: i64,
    pub start: i64,
    pub end: i64,
    /// Events read again (target before the position).
    pub reread: u64,
    /// Events never read (target after the position).
    pub skipped: u64,
}

/// Each partition's target, checked against what the partition holds. `by_time` holds the
/// offsets of a [`GroupTo::Time`] target, by `(topic, partition)`.
pub fn plan_group(
    states: &[PartitionState],
    to: &GroupTo,
    by_time: &BTreeMap<(String, i32), i64>,
) -> Result<Vec<PartitionMove>, ApiError> {
    states
        .iter()
        .map(|s| {
            let from = s.position();
            let target = match to {
                GroupTo::Earliest => s.start,
                GroupTo::Latest => s.end,
                GroupTo::Offset(o) if (s.start..=s.end).contains(o) => *o,
                GroupTo::Offset(o) => {
                    return Err(ApiError::bad_param(
                        "offset",
                        format!(
                            "{o} is outside {}/{}, which holds offsets {}..{} (give `partition` to \
                             move one partition)",
                            s.topic, s.partition, s.start, s.end
                        ),
                    ));
                }
                GroupTo::ShiftBy(n) => from.saturating_add(*n).clamp(s.start, s.end.max(s.start)),
                GroupTo::Time(_) => by_time
                    .get(&(s.topic.clone(), s.partition))
                    .copied()
                    .unwrap_or(s.end),
            };
            Ok(PartitionMove {
                topic: s.topic.clone(),
                partition: s.partition,
                committed: s.committed,
                from,
                to: target,
                start: s.start,
                end: s.end,
                reread: u64::try_from(from - target).unwrap_or(0),
                skipped: u64::try_from(target - from).unwrap_or(0),
            })
        })
        .collect()
}

/// Events re-read and skipped over all partitions.
pub fn totals(moves: &[PartitionMove]) -> (u64, u64) {
    moves
        .iter()
        .fold((0, 0), |(r, s), m| (r + m.reread, s + m.skipped))
}

/// RU of enumerating `items` items in full (at least one page, even for an empty list).
pub fn enumeration_ru(items: u64) -> u64 {
    items.div_ceil(DELTA_PAGE_ITEMS).max(1) * FULL_DELTA_PAGE_RU
}

/// Minutes `ru` takes at `share` (0–1] of `ru_per_minute`.
pub fn minutes(ru: u64, ru_per_minute: u32, share: f64) -> f64 {
    let rate = f64::from(ru_per_minute) * share;
    if rate <= 0.0 {
        return 0.0;
    }
    ru as f64 / rate
}

/// The slot's move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotMove {
    pub from_lsn: String,
    pub to_lsn: String,
    /// WAL bytes whose changes are never captured.
    pub skipped_bytes: u64,
}

/// Checks a slot target against the slot's `confirmed` position and the server's `current` one.
pub fn plan_slot(confirmed: u64, current: u64, to: SlotTo) -> Result<SlotMove, ApiError> {
    let target = match to {
        SlotTo::Now => current.max(confirmed),
        SlotTo::Lsn(l) if l < confirmed => {
            return Err(ApiError::bad_param(
                "slot",
                format!(
                    "a replication slot cannot move backwards: its confirmed_flush_lsn is {} and \
                     PostgreSQL may already have removed the WAL before it (to re-read older \
                     changes, re-snapshot the table instead)",
                    format_lsn(confirmed)
                ),
            ));
        }
        SlotTo::Lsn(l) if l > current => {
            return Err(ApiError::bad_param(
                "slot",
                format!(
                    "{} is past the server's current WAL position {}",
                    format_lsn(l),
                    format_lsn(current)
                ),
            ));
        }
        SlotTo::Lsn(l) => l,
    };
    Ok(SlotMove {
        from_lsn: format_lsn(confirmed),
        to_lsn: format_lsn(target),
        skipped_bytes: target - confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::limiter::Cost;
    use serde_json::json;

    fn state(p: i32, committed: Option<i64>, start: i64, end: i64) -> PartitionState {
        PartitionState {
            topic: "t".into(),
            partition: p,
            committed,
            start,
            end,
        }
    }

    #[test]
    fn moving_back_rereads_and_forward_skips_per_partition_and_in_total() {
        let states = [
            state(0, Some(10), 0, 10),
            state(1, Some(4), 0, 7),
            state(2, None, 0, 5),
        ];
        let none = BTreeMap::new();
        let back = plan_group(&states, &GroupTo::ShiftBy(-6), &none).unwrap();
        let rereads: Vec<u64> = back.iter().map(|m| m.reread).collect();
        // 10 → 4, 4 → 0 (kept within the partition), never committed: position 0 → 0.
        assert_eq!(rereads, [6, 4, 0]);
        assert_eq!(totals(&back), (10, 0));
        let latest = plan_group(&states, &GroupTo::Latest, &none).unwrap();
        assert_eq!(totals(&latest), (0, 3 + 5));
        let earliest = plan_group(&states, &GroupTo::Earliest, &none).unwrap();
        assert_eq!(totals(&earliest), (10 + 4, 0));
        assert_eq!(earliest[2].committed, None);
        let at = plan_group(&states[..2], &GroupTo::Offset(5), &none).unwrap();
        assert_eq!((at[0].reread, at[1].skipped), (5, 1));
    }

    #[test]
    fn an_offset_outside_a_partition_is_refused_naming_it() {
        let states = [state(0, Some(3), 2, 9)];
        let none = BTreeMap::new();
        for bad in [1, 10] {
            let e = plan_group(&states, &GroupTo::Offset(bad), &none).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param.unwrap().name, "offset");
        }
        assert!(plan_group(&states, &GroupTo::Offset(9), &none).is_ok());
    }

    #[test]
    fn a_time_target_uses_the_looked_up_offsets_and_the_end_when_none() {
        let states = [state(0, Some(8), 0, 10), state(1, Some(2), 0, 10)];
        let found = BTreeMap::from([(("t".to_string(), 0), 3)]);
        let m = plan_group(&states, &GroupTo::Time(0), &found).unwrap();
        assert_eq!((m[0].to, m[0].reread), (3, 5));
        assert_eq!((m[1].to, m[1].skipped), (10, 8));
    }

    #[test]
    fn enumeration_costs_two_ru_per_page_of_200_and_minutes_follow_the_budget() {
        assert_eq!(WRITE_RU, u64::from(Cost::Multi.units()));
        assert_eq!(
            FULL_DELTA_PAGE_RU,
            u64::from(Cost::of("GET", "/sites/s/lists/l/items/delta").units())
        );
        assert_eq!(enumeration_ru(0), 2);
        assert_eq!(enumeration_ru(200), 2);
        assert_eq!(enumeration_ru(201), 4);
        assert_eq!(enumeration_ru(10_000), 100);
        assert!((minutes(100, 1250, 1.0) - 0.08).abs() < 1e-9);
        assert!((minutes(225, 250, 0.9) - 1.0).abs() < 1e-9);
        assert_eq!(minutes(10, 0, 1.0), 0.0);
    }

    #[test]
    fn lsns_round_trip_and_a_slot_never_moves_back() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
        for bad in ["", "16B3748", "x/1", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        let m = plan_slot(100, 250, SlotTo::Now).unwrap();
        assert_eq!(m.skipped_bytes, 150);
        assert_eq!(
            plan_slot(100, 250, SlotTo::Lsn(100)).unwrap().skipped_bytes,
            0
        );
        let back = plan_slot(100, 250, SlotTo::Lsn(99)).unwrap_err();
        assert!(
            back.detail.contains("cannot move backwards"),
            "{}",
            back.detail
        );
        assert_eq!(back.param.unwrap().name, "slot");
        assert!(plan_slot(100, 250, SlotTo::Lsn(251)).is_err());
    }

    fn parse(v: Value) -> Result<ResetRequest, ApiError> {
        parse_request(&v, None)
    }

    fn bad_field(v: Value) -> String {
        parse(v.clone())
            .expect_err(&v.to_string())
            .param
            .expect("names a field")
            .name
    }

    #[test]
    fn requests_parse_and_every_bad_one_names_its_field() {
        let r =
            parse(json!({"group": "sync", "shift_by": -5, "dry_run": true, "by": "ann"})).unwrap();
        assert!(r.dry_run);
        assert_eq!(r.by.as_deref(), Some("ann"));
        assert_eq!(
            r.target,
            Target::Group {
                group: "sync".into(),
                to: GroupTo::ShiftBy(-5),
                topic: None,
                partition: None
            }
        );
        let t = parse(json!({"group": "g", "time": "2025-01-31T12:00:00Z"})).unwrap();
        assert!(matches!(
            t.target,
            Target::Group {
                to: GroupTo::Time(1_738_324_800_000),
                ..
            }
        ));
        assert_eq!(
            parse(json!({"slot": "now"})).unwrap().target,
            Target::Slot(SlotTo::Now)
        );
        assert_eq!(
            parse(json!({"list": "Tasks", "to": "none"}))
                .unwrap()
                .target,
            Target::List("Tasks".into())
        );
        assert!(
            parse_request(&json!({"slot": "now"}), Some("true"))
                .unwrap()
                .dry_run
        );
        for (body, field) in [
            (json!([]), "body"),
            (json!({}), "target"),
            (json!({"nope": 1}), "nope"),
            (json!({"slot": "now", "group": "sync"}), "group"),
            (json!({"slot": "later"}), "slot"),
            (json!({"slot": "now", "offset": 3}), "offset"),
            (json!({"list": "L", "to": "latest"}), "to"),
            (json!({"group": "sync"}), "to"),
            (
                json!({"group": "sync", "to": "earliest", "offset": 1}),
                "to",
            ),
            (json!({"group": "sync", "to": "middle"}), "to"),
            (json!({"group": "sync", "offset": -1}), "offset"),
            (json!({"group": "sync", "offset": "7"}), "offset"),
            (json!({"group": "sync", "time": "yesterday"}), "time"),
            (
                json!({"group": "sync", "to": "latest", "partition": -1}),
                "partition",
            ),
            (json!({"group": "", "to": "latest"}), "group"),
            (
                json!({"group": "sync", "to": "latest", "dry_run": "yes"}),
                "dry_run",
            ),
            (json!({"slot": "now", "by": "x".repeat(201)}), "by"),
        ] {
            assert_eq!(bad_field(body.clone()), field, "{body}");
        }
        let q = parse_request(&json!({"slot": "now"}), Some("maybe")).unwrap_err();
        assert_eq!(q.param.unwrap().name, "dry_run");
    }
}
