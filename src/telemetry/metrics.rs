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
/// Histogram (seconds) of one flush (plan, write, record), label `pipeline`.
pub const PUSH_FLUSH_SECONDS: &str = "syncbridge_push_flush_seconds";
/// Counter of dead letters written to the DLQ topic, labels `pipeline`, `kind`.
pub const PUSH_DEAD_LETTERS_TOTAL: &str = "syncbridge_push_dead_letters_total";
/// Gauge 0/1: the pipeline paused itself and waits for an operator's resume, labels `pipeline`,
/// `kind` (dead_letter_storm/schema_unavailable).
pub const PIPELINE_PAUSED: &str = "syncbridge_pipeline_paused";
/// Counter of pauses (guard trips and schemas that could not be had), labels `pipeline`, `kind`.
pub const PIPELINE_PAUSES_TOTAL: &str = "syncbridge_pipeline_pauses_total";

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
/// Gauge of a tenant's RU budget per minute (graph.ru_per_minute), label `tenant`.
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
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        Unit::Count,
        "Pipeline file reloads by outcome: applied, unchanged, invalid, refused, failed."
    );
    describe_gauge!(
        STAGE_UP,
        "1 when a pipeline stage is started and healthy, 0 otherwise (labels: pipeline, stage)."
    );
    describe_counter!(
        CAPTURE_EVENTS_TOTAL,
        Unit::Count,
        "Change events captured (labels: pipeline, table, op)."
    );
    describe_counter!(
        CAPTURE_BYTES_TOTAL,
        Unit::Bytes,
        "pgoutput bytes received (label: pipeline)."
    );
    describe_gauge!(
        CAPTURE_LAG_SECONDS,
        Unit::Seconds,
        "Now minus the commit time of the last captured transaction (label: pipeline)."
    );
    describe_gauge!(
        CAPTURE_SLOT_LAG_BYTES,
        Unit::Bytes,
        "WAL bytes the pipeline's slot retains: pg_current_wal_lsn() - confirmed_flush_lsn (label: pipeline)."
    );
    describe_gauge!(
        CAPTURE_ACKED_LSN,
        "Highest LSN acknowledged to PostgreSQL, durable in the log (label: pipeline)."
    );
    describe_counter!(
        CAPTURE_RECONNECTS_TOTAL,
        Unit::Count,
        "Capture reconnects after retryable errors (label: pipeline)."
    );
    describe_counter!(
        SNAPSHOT_ROWS_TOTAL,
        Unit::Count,
        "Rows emitted by the initial snapshot and on-demand re-snapshots (labels: pipeline, table)."
    );
    describe_gauge!(
        SNAPSHOT_TABLES_PENDING,
        Unit::Count,
        "Tables whose initial snapshot or running re-snapshot is not finished (label: pipeline)."
    );
    describe_counter!(
        RESNAPSHOT_ROWS_SUPERSEDED_TOTAL,
        Unit::Count,
        "Re-snapshot rows skipped because a WAL change of the same key in the watermark window is newer (labels: pipeline, table)."
    );
    describe_histogram!(
        SINK_APPEND_SECONDS,
        Unit::Seconds,
        "Capture append to the log until durable (label: pipeline)."
    );
    describe_histogram!(
        CAPTURE_SINK_WAIT_SECONDS,
        Unit::Seconds,
        "Capture reader waiting for the sink task (all in-flight batches not yet durable) (label: pipeline)."
    );
    describe_counter!(
        SCHEMA_REGISTRY_REQUESTS_TOTAL,
        Unit::Count,
        "Schema registry HTTP calls (attempts) (labels: op, outcome)."
    );
    describe_counter!(
        GRAPH_REQUESTS_TOTAL,
        Unit::Count,
        "Graph HTTP requests (labels: method, outcome)."
    );
    describe_counter!(
        GRAPH_RU_SPENT_TOTAL,
        Unit::Count,
        "SharePoint resource units charged by the tenant limiter (label: lane)."
    );
    describe_counter!(
        GRAPH_THROTTLED_TOTAL,
        Unit::Count,
        "Graph 429/503 responses, direct or inside $batch (labels: status, source)."
    );
    describe_histogram!(
        GRAPH_RETRY_AFTER_SECONDS,
        Unit::Seconds,
        "Tenant pauses taken for Retry-After; the sum is the time waited."
    );
    describe_histogram!(
        GRAPH_REQUEST_SECONDS,
        Unit::Seconds,
        "Duration of one Graph HTTP request (label: method)."
    );
    describe_counter!(
        GRAPH_TOKEN_REQUESTS_TOTAL,
        Unit::Count,
        "Access token requests to the token endpoint (label: outcome)."
    );
    describe_counter!(
        LOG_APPENDED_RECORDS_TOTAL,
        Unit::Count,
        "Records appended durably to the event log (labels: backend, topic)."
    );
    describe_histogram!(
        LOG_APPEND_SECONDS,
        Unit::Seconds,
        "One EventLog append until the batch is durable (labels: backend, topic)."
    );
    describe_counter!(
        LOG_APPEND_ERRORS_TOTAL,
        Unit::Count,
        "Failed EventLog appends (labels: backend, topic, retryable)."
    );
    describe_counter!(
        LOG_CONSUMED_RECORDS_TOTAL,
        Unit::Count,
        "Records handed to log consumers (labels: backend, topic)."
    );
    describe_counter!(
        LOG_COMMITS_TOTAL,
        Unit::Count,
        "Consumer-group positions committed (labels: backend, group)."
    );
    describe_counter!(
        PULL_DELTA_POLLS_TOTAL,
        Unit::Count,
        "Delta poll rounds of the return path (labels: pipeline, outcome)."
    );
    describe_counter!(
        PULL_ITEMS_RECEIVED_TOTAL,
        Unit::Count,
        "List item changes received from delta and appended to the log (labels: pipeline, kind)."
    );
    describe_counter!(
        PULL_RESYNCS_TOTAL,
        Unit::Count,
        "Full list enumerations started (labels: pipeline, reason)."
    );
    describe_counter!(
        PULL_APPLY_TOTAL,
        Unit::Count,
        "Row changes applied to PostgreSQL by the return path (labels: pipeline, outcome)."
    );
    describe_histogram!(
        PULL_APPLY_SECONDS,
        Unit::Seconds,
        "One row change applied to PostgreSQL, statement and commit (label: pipeline)."
    );
    describe_counter!(
        PULL_APPLY_RECONNECTS_TOTAL,
        Unit::Count,
        "Applier reconnections to PostgreSQL after the first connection (label: pipeline)."
    );
    describe_counter!(
        PUSH_EVENTS_TOTAL,
        Unit::Count,
        "Capture events read by the push processor (labels: pipeline, op)."
    );
    describe_counter!(
        PUSH_WRITES_TOTAL,
        Unit::Count,
        "Graph writes of the push processor (labels: pipeline, kind, outcome)."
    );
    describe_counter!(
        PUSH_SKIPPED_TOTAL,
        Unit::Count,
        "Row changes that needed no Graph write (labels: pipeline, reason)."
    );
    describe_counter!(
        PUSH_COALESCED_TOTAL,
        Unit::Count,
        "Events merged into a pending write of the same row (label: pipeline)."
    );
    describe_counter!(
        DIRECTION_HELD_TOTAL,
        Unit::Count,
        "Values a field's direction kept from the other side (labels: pipeline, direction)."
    );
    describe_counter!(
        PUSH_MOVES_TOTAL,
        Unit::Count,
        "Items moved between lists after a route change (label: pipeline)."
    );
    describe_gauge!(
        PUSH_PENDING_ROWS,
        "Rows with a pending write in the push processor (label: pipeline)."
    );
    describe_histogram!(
        PUSH_FLUSH_SECONDS,
        Unit::Seconds,
        "One flush of the push processor (label: pipeline)."
    );
    describe_counter!(
        PUSH_DEAD_LETTERS_TOTAL,
        Unit::Count,
        "Dead letters written to the DLQ topic (labels: pipeline, kind)."
    );
    describe_gauge!(
        PIPELINE_PAUSED,
        "1 while the pipeline is paused by a guard and waits for a resume (labels: pipeline, kind)."
    );
    describe_counter!(
        PIPELINE_PAUSES_TOTAL,
        Unit::Count,
        "Times the pipeline paused itself (labels: pipeline, kind)."
    );
    describe_counter!(
        META_EVENTS_PROJECTED_TOTAL,
        Unit::Count,
        "Run events and drift report records written to the meta-store by the projectors (label: pipeline)."
    );
    describe_counter!(
        META_PROJECT_ERRORS_TOTAL,
        Unit::Count,
        "Failed attempts to write a run event to the meta-store, retried (label: pipeline)."
    );
    describe_counter!(
        META_AUDIT_PROJECTED_TOTAL,
        Unit::Count,
        "Audit records written to the meta-store by the projector (label: pipeline)."
    );
    describe_counter!(
        PULL_ECHOES_TOTAL,
        Unit::Count,
        "List changes recognised as our own writes and dropped (label: pipeline)."
    );
    describe_counter!(
        PULL_CONFLICTS_TOTAL,
        Unit::Count,
        "Fields changed on both sides, by policy and winner (labels: pipeline, policy, outcome)."
    );
    describe_counter!(
        PULL_CONFLICT_RESOLUTIONS_TOTAL,
        Unit::Count,
        "Operator resolutions of parked conflicts (labels: pipeline, take, outcome)."
    );
    describe_gauge!(
        CONSUMER_LAG_EVENTS,
        Unit::Count,
        "Events in a consumer group's topics it has not committed (labels: pipeline, group)."
    );
    describe_gauge!(
        PUSH_LAST_COMMIT_TIMESTAMP,
        Unit::Seconds,
        "Unix time of the push processor's last offset commit (label: pipeline)."
    );
    describe_gauge!(
        CAPTURE_LAST_ACK_TIMESTAMP,
        Unit::Seconds,
        "Unix time of capture's last acknowledgement to the replication slot (label: pipeline)."
    );
    describe_counter!(
        NOTIFY_SENT_TOTAL,
        Unit::Count,
        "Notifications sent to a target, after retries (labels: pipeline, outcome)."
    );
    describe_counter!(
        NOTIFY_DROPPED_TOTAL,
        Unit::Count,
        "Notifications dropped, oldest first, from a full queue (label: pipeline)."
    );
    describe_gauge!(
        GRAPH_RU_BUDGET_PER_MINUTE,
        "A tenant's RU budget per minute, graph.ru_per_minute (label: tenant)."
    );
}
