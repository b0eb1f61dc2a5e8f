//! Every metric name SyncBridge exports, in one place (Prometheus naming: `syncbridge_` prefix,
//! base units, `_total` for counters). Labels stay low-cardinality: pipeline, stage, table, topic,
//! kind, outcome — never a row key or item id. Each name is documented in `ops/METRICS.md`.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Histogram buckets (seconds) for latencies from sub-millisecond appends to multi-second Graph calls.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Gauge, always 1; label `version`.
pub const BUILD_INFO: &str = "syncbridge_build_info";
/// Gauge 0/1 per (pipeline, stage): is the stage started and healthy.
pub const STAGE_UP: &str = "syncbridge_stage_up";

/// Counter of pipeline file reloads (`SIGHUP`, `run --watch`), label `outcome`: `applied`,
/// `unchanged`, `invalid` (a file has problems), `refused` (a change that cannot apply live),
/// `failed` (the new config did not start; the old one runs again).
pub const CONFIG_RELOADS_TOTAL: &str = "syncbridge_config_reloads_total";
/// The `outcome` labels of [`CONFIG_RELOADS_TOTAL`].
pub const RELOAD_OUTCOMES: [&str; 5] = ["applied", "unchanged", "invalid", "refused", "failed"];

/// Counter of change events captured, labels `pipeline`, `table`, `op` (c/u/d/r/t).
pub const CAPTURE_EVENTS_TOTAL: &str = "syncbridge_capture_events_total";
/// Counter of pgoutput bytes received from the replication stream, label `pipeline`.
pub const CAPTURE_BYTES_TOTAL: &str = "syncbridge_capture_bytes_total";
/// Gauge: seconds between a captured transaction's commit and its capture, label `pipeline`.
pub const CAPTURE_LAG_SECONDS: &str = "syncbridge_capture_lag_seconds";
/// Gauge: `pg_current_wal_lsn() - confirmed_flush_lsn` of the pipeline's slot, label `pipeline`.
pub const CAPTURE_SLOT_LAG_BYTES: &str = "syncbridge_capture_slot_lag_bytes";
/// Gauge: highest LSN acknowledged to PostgreSQL (durable in the log), label `pipeline`.
pub const CAPTURE_ACKED_LSN: &str = "syncbridge_capture_acked_lsn";
/// Counter of capture reconnects after retryable errors, label `pipeline`.
pub const CAPTURE_RECONNECTS_TOTAL: &str = "syncbridge_capture_reconnects_total";
/// Counter of reads of a query source, labels `pipeline`, `source` (`query.<list slug>`), `mode`
/// (full/incremental).
pub const QUERY_READS_TOTAL: &str = "syncbridge_query_reads_total";
/// Counter of change events a query source's reads emitted, labels `pipeline`, `source`, `op`
/// (c/u/d); an unchanged row read again emits none.
pub const QUERY_EVENTS_TOTAL: &str = "syncbridge_query_events_total";
/// Counter of source failovers capture followed (the primary moved, `source.urls`), label
/// `pipeline`.
pub const CAPTURE_FAILOVERS_TOTAL: &str = "syncbridge_capture_failovers_total";
/// Counter of rows emitted by the initial snapshot and by on-demand re-snapshots, labels
/// `pipeline`, `table`.
pub const SNAPSHOT_ROWS_TOTAL: &str = "syncbridge_capture_snapshot_rows_total";
/// Gauge: tables whose initial snapshot (or running on-demand re-snapshot) is not finished yet,
/// label `pipeline`.
pub const SNAPSHOT_TABLES_PENDING: &str = "syncbridge_capture_snapshot_tables_pending";
/// Counter of re-snapshot chunk rows not emitted because a WAL change of the same key inside the
/// chunk's watermark window supersedes them, labels `pipeline`, `table`.
pub const RESNAPSHOT_ROWS_SUPERSEDED_TOTAL: &str =
    "syncbridge_capture_resnapshot_rows_superseded_total";
/// Histogram (seconds): one capture append to the log until it is durable, label `pipeline`.
pub const SINK_APPEND_SECONDS: &str = "syncbridge_capture_log_append_seconds";
/// Counter of schema registry HTTP calls (attempts), labels `op` (register/get_schema), `outcome`
/// (ok, unreachable, unavailable, incompatible, invalid_schema, unauthorized, unknown_id, protocol).
pub const SCHEMA_REGISTRY_REQUESTS_TOTAL: &str = "syncbridge_schema_registry_requests_total";
/// Histogram (seconds): the capture reader waiting for the sink because `sink_in_flight` batches
/// were not yet durable (backpressure; its sum is the time reading stood still), label `pipeline`.
pub const CAPTURE_SINK_WAIT_SECONDS: &str = "syncbridge_capture_sink_wait_seconds";

/// Counter of Graph HTTP requests (attempts), labels `method`, `outcome` (ok or the error kind).
pub const GRAPH_REQUESTS_TOTAL: &str = "syncbridge_graph_requests_total";
/// Counter of resource units charged by the tenant limiter, label `lane` (writer/delta).
pub const GRAPH_RU_SPENT_TOTAL: &str = "syncbridge_graph_ru_spent_total";
/// Counter of 429/503 responses (direct or inside `$batch`), labels `status`, `source`.
pub const GRAPH_THROTTLED_TOTAL: &str = "syncbridge_graph_throttled_total";
/// Histogram (seconds): tenant pauses taken for `Retry-After` (its sum is the time waited).
pub const GRAPH_RETRY_AFTER_SECONDS: &str = "syncbridge_graph_retry_after_seconds";
/// Histogram (seconds): one Graph HTTP request, label `method`.
pub const GRAPH_REQUEST_SECONDS: &str = "syncbridge_graph_request_seconds";
/// Counter of token endpoint requests (cache misses), label `outcome` (ok or the error kind).
pub const GRAPH_TOKEN_REQUESTS_TOTAL: &str = "syncbridge_graph_token_requests_total";

/// Counter of records appended durably to the event log, labels `backend` (embedded/kafka), `topic`.
pub const LOG_APPENDED_RECORDS_TOTAL: &str = "syncbridge_log_appended_records_total";
/// Histogram (seconds): one `EventLog::append` call until the batch is durable, labels `backend`, `topic`.
pub const LOG_APPEND_SECONDS: &str = "syncbridge_log_append_seconds";
/// Counter of failed `EventLog::append` calls, labels `backend`, `topic`, `retryable` (true/false).
pub const LOG_APPEND_ERRORS_TOTAL: &str = "syncbridge_log_append_errors_total";
/// Counter of records handed to log consumers, labels `backend`, `topic`.
pub const LOG_CONSUMED_RECORDS_TOTAL: &str = "syncbridge_log_consumed_records_total";
/// Counter of consumer-group positions committed, labels `backend`, `group`.
pub const LOG_COMMITS_TOTAL: &str = "syncbridge_log_commits_total";

/// Counter of capture events the push processor read, labels `pipeline`, `op`.
pub const PUSH_EVENTS_TOTAL: &str = "syncbridge_push_events_total";
/// Counter of Graph writes by the push processor, labels `pipeline`, `kind` (create/update/delete), `outcome` (ok/adopted/not_found/rejected/transient).
pub const PUSH_WRITES_TOTAL: &str = "syncbridge_push_writes_total";
/// Counter of SharePoint REST writes of hyperlink fields (after the Graph write of the item),
/// labels `pipeline`, `outcome` (ok/refused/transient).
pub const PUSH_REST_WRITES_TOTAL: &str = "syncbridge_push_rest_writes_total";
/// Counter of row changes that needed no write, labels `pipeline`, `reason` (unchanged/own_origin/stale).
pub const PUSH_SKIPPED_TOTAL: &str = "syncbridge_push_skipped_total";
/// Counter of events merged into an already pending write of the same row, label `pipeline`.
pub const PUSH_COALESCED_TOTAL: &str = "syncbridge_push_coalesced_total";
/// Counter of values a field's direction kept from the other side, labels `pipeline`,
/// `direction`: `push_only` (a list edit not applied to the row), `pull_only` (a row value
/// that differs from the list, not written to it).
pub const DIRECTION_HELD_TOTAL: &str = "syncbridge_direction_held_total";
/// Counter of items moved between lists by a route change, label `pipeline`.
pub const PUSH_MOVES_TOTAL: &str = "syncbridge_push_moves_total";
/// Gauge of rows with a pending write (the processor's queue depth), label `pipeline`.
pub const PUSH_PENDING_ROWS: &str = "syncbridge_push_pending_rows";
/// Gauge of input partitions the push processor owns (Kafka: its share of the consumer group;
/// 0 on a member left without any), label `pipeline`.
pub const PUSH_ASSIGNED_PARTITIONS: &str = "syncbridge_push_assigned_partitions";
/// Histogram (seconds) of one flush (plan, write, record), label `pipeline`.
pub const PUSH_FLUSH_SECONDS: &str = "syncbridge_push_flush_seconds";
/// Counter of dead letters written to the DLQ topic, labels `pipeline`, `kind`.
pub const PUSH_DEAD_LETTERS_TOTAL: &str = "syncbridge_push_dead_letters_total";
/// Gauge of deletes held by the accidental-delete guard (paused, or waiting out `hold_ms`),
/// labels `pipeline`, `direction` (push/pull).
pub const GUARD_DELETES_HELD: &str = "syncbridge_guard_deletes_held";
/// Gauge 0/1: a direction's deletes are paused by the accidental-delete guard until an operator
/// allows or discards them, labels `pipeline`, `direction`.
pub const GUARD_PAUSED: &str = "syncbridge_guard_paused";
/// Gauge 0/1: the pipeline paused itself and waits for an operator's resume, labels `pipeline`,
/// `kind` (dead_letter_storm/schema_unavailable).
pub const PIPELINE_PAUSED: &str = "syncbridge_pipeline_paused";
/// Counter of pauses (guard trips and schemas that could not be had), labels `pipeline`, `kind`.
pub const PIPELINE_PAUSES_TOTAL: &str = "syncbridge_pipeline_pauses_total";
/// Gauge 0/1: one table of the pipeline is paused because its change events no longer fit its
/// mapping (a mapped column dropped, renamed, or retyped to a type its field cannot hold); the
/// other tables keep flowing. Labels `pipeline`, `table`.
pub const TABLE_PAUSED: &str = "syncbridge_table_paused";
/// Counter of table pauses for a schema change, labels `pipeline`, `table`.
pub const TABLE_PAUSES_TOTAL: &str = "syncbridge_table_pauses_total";

/// Meta-store: run events (and drift report records) the projectors wrote to `syncbridge_meta`
/// (counter; label: pipeline).
pub const META_EVENTS_PROJECTED_TOTAL: &str = "syncbridge_meta_events_projected_total";
/// Meta-store: failed attempts to project a run event, retried (counter; label: pipeline).
pub const META_PROJECT_ERRORS_TOTAL: &str = "syncbridge_meta_project_errors_total";
/// Meta-store: audit records the projector wrote to `syncbridge_meta.audit` (counter; label:
/// pipeline).
pub const META_AUDIT_PROJECTED_TOTAL: &str = "syncbridge_meta_audit_projected_total";
/// Counter of list changes recognised as our own writes coming back (echoes), label `pipeline`.
pub const PULL_ECHOES_TOTAL: &str = "syncbridge_pull_echoes_total";
/// Counter of fields changed on both sides, labels `pipeline`, `policy`, `outcome` (source/target/parked).
pub const PULL_CONFLICTS_TOTAL: &str = "syncbridge_pull_conflicts_total";
/// Counter of operator resolutions of parked conflicts, labels `pipeline`, `take` (source/target),
/// `outcome` (applied, or why not: unknown/not_parked/already_resolved/superseded/gone/changed/busy/failed).
pub const PULL_CONFLICT_RESOLUTIONS_TOTAL: &str = "syncbridge_pull_conflict_resolutions_total";

/// Counter of delta poll rounds, labels `pipeline`, `outcome` (changes/idle/error).
pub const PULL_DELTA_POLLS_TOTAL: &str = "syncbridge_pull_delta_polls_total";
/// Gauge: 1 when this process runs the list's delta poller, 0 while it stands by (another
/// process holds the list's lock), labels `pipeline`, `list`. Summed over processes: 1 per list.
pub const PULL_POLLER_OWNED: &str = "syncbridge_pull_poller_owned";
/// Counter of item changes received from delta and appended to the log, labels `pipeline`, `kind` (upsert/deleted).
pub const PULL_ITEMS_RECEIVED_TOTAL: &str = "syncbridge_pull_items_received_total";
/// Counter of full list enumerations started, labels `pipeline`, `reason` (initial/token_expired).
pub const PULL_RESYNCS_TOTAL: &str = "syncbridge_pull_resyncs_total";
/// Counter of row changes applied to PostgreSQL, labels `pipeline`, `outcome` (applied/rejected/invalid/error).
pub const PULL_APPLY_TOTAL: &str = "syncbridge_pull_apply_total";
/// Histogram (seconds): one row change applied (statement and commit), label `pipeline`.
pub const PULL_APPLY_SECONDS: &str = "syncbridge_pull_apply_seconds";
/// Counter of applier (re)connections to PostgreSQL after the first, label `pipeline`.
pub const PULL_APPLY_RECONNECTS_TOTAL: &str = "syncbridge_pull_apply_reconnects_total";

/// Gauge of events in a consumer group's topics not yet committed by it, labels `pipeline`,
/// `group` (`sync`: the push processor; `return`: the return path's applier).
pub const CONSUMER_LAG_EVENTS: &str = "syncbridge_consumer_lag_events";
/// Gauge (Unix seconds) of the push processor's last offset commit, label `pipeline`.
pub const PUSH_LAST_COMMIT_TIMESTAMP: &str = "syncbridge_push_last_commit_timestamp_seconds";
/// Gauge (Unix seconds) of capture's last acknowledgement to the slot, label `pipeline`.
pub const CAPTURE_LAST_ACK_TIMESTAMP: &str = "syncbridge_capture_last_ack_timestamp_seconds";
/// Gauge of a tenant's RU budget per minute (graph.ru_per_minute, or Graph's smaller
/// `RateLimit-Limit` once learned), label `tenant`.
pub const GRAPH_RU_BUDGET_PER_MINUTE: &str = "syncbridge_graph_ru_budget_per_minute";
/// Counter of notifications sent per target, labels `pipeline`, `outcome` (ok, failed).
pub const NOTIFY_SENT_TOTAL: &str = "syncbridge_notify_sent_total";
/// Counter of notifications dropped from a full queue (oldest first), label `pipeline`.
pub const NOTIFY_DROPPED_TOTAL: &str = "syncbridge_notify_dropped_total";

/// Dead-letter kinds (`syncbridge_push_dead_letters_total{kind}`), for zero-initialised series.
const DEAD_LETTER_KINDS: [&str; 8] = [
    "too_long",
    "unknown_choice",
    "type_mismatch",
    "out_of_range",
    "unknown_user",
    "lookup_missing",
    "graph_rejected",
    "undecodable",
];

/// Every outcome of [`CONFIG_RELOADS_TOTAL`] at 0, so `increase()` sees the first reload.
pub fn init_reloads() {
    for outcome in RELOAD_OUTCOMES {
        metrics::counter!(CONFIG_RELOADS_TOTAL, "outcome" => outcome).increment(0);
    }
}

/// Counts one reload (per changed pipeline when it applied or failed).
pub fn count_reload(outcome: &'static str) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}

/// Registers a pipeline's counters at 0 with their usual label values, so `increase()` and
/// `rate()` see the first event (a series that appears at 1 hides it) and alerts on them can
/// fire from the first dead letter on.
pub fn init_pipeline(pipeline: &str, pulls: bool) {
    let zero = |name: &'static str, labels: &[(&'static str, &'static str)]| {
        let mut all = vec![metrics::Label::new("pipeline", pipeline.to_string())];
        all.extend(labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)));
        metrics::counter!(name, all).increment(0);
    };
    for name in [
        CAPTURE_RECONNECTS_TOTAL,
        CAPTURE_FAILOVERS_TOTAL,
        PUSH_COALESCED_TOTAL,
        PUSH_MOVES_TOTAL,
        META_EVENTS_PROJECTED_TOTAL,
        META_PROJECT_ERRORS_TOTAL,
    ] {
        zero(name, &[]);
    }
    for op in ["c", "u", "d", "r", "t"] {
        zero(PUSH_EVENTS_TOTAL, &[("op", op)]);
    }
    for kind in ["create", "update", "delete"] {
        for outcome in ["ok", "rejected"] {
            zero(PUSH_WRITES_TOTAL, &[("kind", kind), ("outcome", outcome)]);
        }
    }
    for outcome in ["ok", "refused", "transient"] {
        zero(PUSH_REST_WRITES_TOTAL, &[("outcome", outcome)]);
    }
    for reason in ["unchanged", "own_origin", "stale"] {
        zero(PUSH_SKIPPED_TOTAL, &[("reason", reason)]);
    }
    for kind in DEAD_LETTER_KINDS {
        zero(PUSH_DEAD_LETTERS_TOTAL, &[("kind", kind)]);
    }
    for kind in ["dead_letter_storm", "schema_unavailable"] {
        zero(PIPELINE_PAUSES_TOTAL, &[("kind", kind)]);
    }
    if pulls {
        zero(PULL_ECHOES_TOTAL, &[]);
        zero(PULL_APPLY_RECONNECTS_TOTAL, &[]);
        for outcome in ["applied", "rejected", "invalid", "error"] {
            zero(PULL_APPLY_TOTAL, &[("outcome", outcome)]);
        }
        for outcome in ["changes", "idle", "error"] {
            zero(PULL_DELTA_POLLS_TOTAL, &[("outcome", outcome)]);
        }
        for kind in ["upsert", "deleted"] {
            zero(PULL_ITEMS_RECEIVED_TOTAL, &[("kind", kind)]);
        }
        // Directions only hold values back in two-way entries.
        for direction in ["push_only", "pull_only"] {
            zero(DIRECTION_HELD_TOTAL, &[("direction", direction)]);
        }
    }
}

/// Registers help text and units for every metric, so scrapes carry `# HELP` from the start.
pub fn describe_all() {
    for &(kind, name, unit, help) in DESCRIPTIONS {
        match (kind, unit) {
            (Counter, Some(u)) => describe_counter!(name, u, help),
            (Counter, None) => describe_counter!(name, help),
            (Gauge, Some(u)) => describe_gauge!(name, u, help),
            (Gauge, None) => describe_gauge!(name, help),
            (Histogram, Some(u)) => describe_histogram!(name, u, help),
            (Histogram, None) => describe_histogram!(name, help),
        }
    }
}

/// What kind of metric a name is (for [`DESCRIPTIONS`]).
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}
use Kind::{Counter, Gauge, Histogram};

/// Every metric with its unit and `# HELP` text, in the order `/metrics` describes them.
const DESCRIPTIONS: &[(Kind, &str, Option<Unit>, &str)] = &[
    (
        Gauge,
        BUILD_INFO,
        None,
        "Build information; the value is always 1.",
    ),
    (
        Counter,
        CONFIG_RELOADS_TOTAL,
        Some(Unit::Count),
        "Pipeline file reloads by outcome: applied, unchanged, invalid, refused, failed.",
    ),
    (
        Gauge,
        STAGE_UP,
        None,
        "1 when a pipeline stage is started and healthy, 0 otherwise (labels: pipeline, stage).",
    ),
    (
        Counter,
        CAPTURE_EVENTS_TOTAL,
        Some(Unit::Count),
        "Change events captured (labels: pipeline, table, op).",
    ),
    (
        Counter,
        CAPTURE_BYTES_TOTAL,
        Some(Unit::Bytes),
        "pgoutput bytes received (label: pipeline).",
    ),
    (
        Gauge,
        CAPTURE_LAG_SECONDS,
        Some(Unit::Seconds),
        "Now minus the commit time of the last captured transaction (label: pipeline).",
    ),
    (
        Gauge,
        CAPTURE_SLOT_LAG_BYTES,
        Some(Unit::Bytes),
        "WAL bytes the pipeline's slot retains: pg_current_wal_lsn() - confirmed_flush_lsn (label: pipeline).",
    ),
    (
        Gauge,
        CAPTURE_ACKED_LSN,
        None,
        "Highest LSN acknowledged to PostgreSQL, durable in the log (label: pipeline).",
    ),
    (
        Counter,
        QUERY_READS_TOTAL,
        Some(Unit::Count),
        "Reads of a query source (labels: pipeline, source, mode).",
    ),
    (
        Counter,
        QUERY_EVENTS_TOTAL,
        Some(Unit::Count),
        "Change events emitted by a query source's reads (labels: pipeline, source, op).",
    ),
    (
        Counter,
        CAPTURE_RECONNECTS_TOTAL,
        Some(Unit::Count),
        "Capture reconnects after retryable errors (label: pipeline).",
    ),
    (
        Counter,
        CAPTURE_FAILOVERS_TOTAL,
        Some(Unit::Count),
        "Source failovers capture followed to a promoted instance (label: pipeline).",
    ),
    (
        Counter,
        SNAPSHOT_ROWS_TOTAL,
        Some(Unit::Count),
        "Rows emitted by the initial snapshot and on-demand re-snapshots (labels: pipeline, table).",
    ),
    (
        Gauge,
        SNAPSHOT_TABLES_PENDING,
        Some(Unit::Count),
        "Tables whose initial snapshot or running re-snapshot is not finished (label: pipeline).",
    ),
    (
        Counter,
        RESNAPSHOT_ROWS_SUPERSEDED_TOTAL,
        Some(Unit::Count),
        "Re-snapshot rows skipped because a WAL change of the same key in the watermark window is newer (labels: pipeline, table).",
    ),
    (
        Histogram,
        SINK_APPEND_SECONDS,
        Some(Unit::Seconds),
        "Capture append to the log until durable (label: pipeline).",
    ),
    (
        Histogram,
        CAPTURE_SINK_WAIT_SECONDS,
        Some(Unit::Seconds),
        "Capture reader waiting for the sink task (all in-flight batches not yet durable) (label: pipeline).",
    ),
    (
        Counter,
        SCHEMA_REGISTRY_REQUESTS_TOTAL,
        Some(Unit::Count),
        "Schema registry HTTP calls (attempts) (labels: op, outcome).",
    ),
    (
        Counter,
        GRAPH_REQUESTS_TOTAL,
        Some(Unit::Count),
        "Graph HTTP requests (labels: method, outcome).",
    ),
    (
        Counter,
        GRAPH_RU_SPENT_TOTAL,
        Some(Unit::Count),
        "SharePoint resource units charged by the tenant limiter (label: lane).",
    ),
    (
        Counter,
        GRAPH_THROTTLED_TOTAL,
        Some(Unit::Count),
        "Graph 429/503 responses, direct or inside $batch (labels: status, source).",
    ),
    (
        Histogram,
        GRAPH_RETRY_AFTER_SECONDS,
        Some(Unit::Seconds),
        "Tenant pauses taken for Retry-After; the sum is the time waited.",
    ),
    (
        Histogram,
        GRAPH_REQUEST_SECONDS,
        Some(Unit::Seconds),
        "Duration of one Graph HTTP request (label: method).",
    ),
    (
        Counter,
        GRAPH_TOKEN_REQUESTS_TOTAL,
        Some(Unit::Count),
        "Access token requests to the token endpoint (label: outcome).",
    ),
    (
        Counter,
        LOG_APPENDED_RECORDS_TOTAL,
        Some(Unit::Count),
        "Records appended durably to the event log (labels: backend, topic).",
    ),
    (
        Histogram,
        LOG_APPEND_SECONDS,
        Some(Unit::Seconds),
        "One EventLog append until the batch is durable (labels: backend, topic).",
    ),
    (
        Counter,
        LOG_APPEND_ERRORS_TOTAL,
        Some(Unit::Count),
        "Failed EventLog appends (labels: backend, topic, retryable).",
    ),
    (
        Counter,
        LOG_CONSUMED_RECORDS_TOTAL,
        Some(Unit::Count),
        "Records handed to log consumers (labels: backend, topic).",
    ),
    (
        Counter,
        LOG_COMMITS_TOTAL,
        Some(Unit::Count),
        "Consumer-group positions committed (labels: backend, group).",
    ),
    (
        Counter,
        PULL_DELTA_POLLS_TOTAL,
        Some(Unit::Count),
        "Delta poll rounds of the return path (labels: pipeline, outcome).",
    ),
    (
        Gauge,
        PULL_POLLER_OWNED,
        None,
        "1 when this process runs the list's delta poller, 0 while standing by (labels: pipeline, list).",
    ),
    (
        Counter,
        PULL_ITEMS_RECEIVED_TOTAL,
        Some(Unit::Count),
        "List item changes received from delta and appended to the log (labels: pipeline, kind).",
    ),
    (
        Counter,
        PULL_RESYNCS_TOTAL,
        Some(Unit::Count),
        "Full list enumerations started (labels: pipeline, reason).",
    ),
    (
        Counter,
        PULL_APPLY_TOTAL,
        Some(Unit::Count),
        "Row changes applied to PostgreSQL by the return path (labels: pipeline, outcome).",
    ),
    (
        Histogram,
        PULL_APPLY_SECONDS,
        Some(Unit::Seconds),
        "One row change applied to PostgreSQL, statement and commit (label: pipeline).",
    ),
    (
        Counter,
        PULL_APPLY_RECONNECTS_TOTAL,
        Some(Unit::Count),
        "Applier reconnections to PostgreSQL after the first connection (label: pipeline).",
    ),
    (
        Counter,
        PUSH_EVENTS_TOTAL,
        Some(Unit::Count),
        "Capture events read by the push processor (labels: pipeline, op).",
    ),
    (
        Counter,
        PUSH_WRITES_TOTAL,
        Some(Unit::Count),
        "Graph writes of the push processor (labels: pipeline, kind, outcome).",
    ),
    (
        Counter,
        PUSH_REST_WRITES_TOTAL,
        Some(Unit::Count),
        "SharePoint REST writes of hyperlink fields (labels: pipeline, outcome).",
    ),
    (
        Counter,
        PUSH_SKIPPED_TOTAL,
        Some(Unit::Count),
        "Row changes that needed no Graph write (labels: pipeline, reason).",
    ),
    (
        Counter,
        PUSH_COALESCED_TOTAL,
        Some(Unit::Count),
        "Events merged into a pending write of the same row (label: pipeline).",
    ),
    (
        Counter,
        DIRECTION_HELD_TOTAL,
        Some(Unit::Count),
        "Values a field's direction kept from the other side (labels: pipeline, direction).",
    ),
    (
        Counter,
        PUSH_MOVES_TOTAL,
        Some(Unit::Count),
        "Items moved between lists after a route change (label: pipeline).",
    ),
    (
        Gauge,
        PUSH_PENDING_ROWS,
        None,
        "Rows with a pending write in the push processor (label: pipeline).",
    ),
    (
        Gauge,
        PUSH_ASSIGNED_PARTITIONS,
        None,
        "Input partitions the push processor owns; 0 = a group member reading nothing (label: pipeline).",
    ),
    (
        Histogram,
        PUSH_FLUSH_SECONDS,
        Some(Unit::Seconds),
        "One flush of the push processor (label: pipeline).",
    ),
    (
        Counter,
        PUSH_DEAD_LETTERS_TOTAL,
        Some(Unit::Count),
        "Dead letters written to the DLQ topic (labels: pipeline, kind).",
    ),
    (
        Gauge,
        GUARD_DELETES_HELD,
        None,
        "Deletes held by the accidental-delete guard (labels: pipeline, direction).",
    ),
    (
        Gauge,
        GUARD_PAUSED,
        None,
        "1 while a direction's deletes wait for an operator's allow or discard (labels: pipeline, direction).",
    ),
    (
        Gauge,
        PIPELINE_PAUSED,
        None,
        "1 while the pipeline is paused by a guard and waits for a resume (labels: pipeline, kind).",
    ),
    (
        Counter,
        PIPELINE_PAUSES_TOTAL,
        Some(Unit::Count),
        "Times the pipeline paused itself (labels: pipeline, kind).",
    ),
    (
        Gauge,
        TABLE_PAUSED,
        None,
        "1 while a table is paused because its changes no longer fit its mapping (labels: pipeline, table).",
    ),
    (
        Counter,
        TABLE_PAUSES_TOTAL,
        Some(Unit::Count),
        "Times a table paused for a schema change (labels: pipeline, table).",
    ),
    (
        Counter,
        META_EVENTS_PROJECTED_TOTAL,
        Some(Unit::Count),
        "Run events and drift report records written to the meta-store by the projectors (label: pipeline).",
    ),
    (
        Counter,
        META_PROJECT_ERRORS_TOTAL,
        Some(Unit::Count),
        "Failed attempts to write a run event to the meta-store, retried (label: pipeline).",
    ),
    (
        Counter,
        META_AUDIT_PROJECTED_TOTAL,
        Some(Unit::Count),
        "Audit records written to the meta-store by the projector (label: pipeline).",
    ),
    (
        Counter,
        PULL_ECHOES_TOTAL,
        Some(Unit::Count),
        "List changes recognised as our own writes and dropped (label: pipeline).",
    ),
    (
        Counter,
        PULL_CONFLICTS_TOTAL,
        Some(Unit::Count),
        "Fields changed on both sides, by policy and winner (labels: pipeline, policy, outcome).",
    ),
    (
        Counter,
        PULL_CONFLICT_RESOLUTIONS_TOTAL,
        Some(Unit::Count),
        "Operator resolutions of parked conflicts (labels: pipeline, take, outcome).",
    ),
    (
        Gauge,
        CONSUMER_LAG_EVENTS,
        Some(Unit::Count),
        "Events in a consumer group's topics it has not committed (labels: pipeline, group).",
    ),
    (
        Gauge,
        PUSH_LAST_COMMIT_TIMESTAMP,
        Some(Unit::Seconds),
        "Unix time of the push processor's last offset commit (label: pipeline).",
    ),
    (
        Gauge,
        CAPTURE_LAST_ACK_TIMESTAMP,
        Some(Unit::Seconds),
        "Unix time of capture's last acknowledgement to the replication slot (label: pipeline).",
    ),
    (
        Counter,
        NOTIFY_SENT_TOTAL,
        Some(Unit::Count),
        "Notifications sent to a target, after retries (labels: pipeline, outcome).",
    ),
    (
        Counter,
        NOTIFY_DROPPED_TOTAL,
        Some(Unit::Count),
        "Notifications dropped, oldest first, from a full queue (label: pipeline).",
    ),
    (
        Gauge,
        GRAPH_RU_BUDGET_PER_MINUTE,
        None,
        "A tenant's RU budget per minute, graph.ru_per_minute (label: tenant).",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn every_metric_is_scraped_with_its_help_text() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_all();
            // The exporter prints HELP only for metrics that have a sample.
            for &(kind, name, _, _) in DESCRIPTIONS {
                match kind {
                    Counter => metrics::counter!(name).increment(1),
                    Gauge => metrics::gauge!(name).set(1.0),
                    Histogram => metrics::histogram!(name).record(1.0),
                }
            }
        });
        let text = handle.render();
        for &(_, name, _, help) in DESCRIPTIONS {
            assert!(
                text.contains(&format!("# HELP {name} {help}")),
                "no HELP line for {name}:\n{text}"
            );
        }
    }
}
