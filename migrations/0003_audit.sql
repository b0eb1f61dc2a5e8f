-- Ledger audit (DESIGN.md §9, per-row lineage): one row per decision the processor made about a
-- row, projected from the `<prefix>.<pipeline>.audit` topic. `event_id` is the record's own id, so
-- a record read or appended twice is inserted once. Pruned after `control.audit_retention`.
CREATE TABLE syncbridge_meta.audit (
    event_id          uuid   PRIMARY KEY,
    pipeline          text   NOT NULL,
    table_name        text   NOT NULL,
    row_key           text   NOT NULL,
    -- create, update, delete, move, adopt, skip-unchanged, dead-letter, pull-apply, conflict
    operation         text   NOT NULL,
    list_id           text,
    item_id           text,
    content_hash      text,
    -- Commit LSN of the source change, as a number (the API shows it as X/Y).
    lsn               bigint,
    -- The change event's position in the log.
    source_topic      text,
    source_partition  int,
    source_offset     bigint,
    request_id        text,
    client_request_id text,
    http_status       int,
    etag              text,
    detail            text,
    at_ms             bigint NOT NULL,
    -- The record's position in the audit topic: orders records of the same millisecond.
    log_partition     int    NOT NULL,
    log_offset        bigint NOT NULL
);
-- A row's history, newest first (GET /pipelines/{p}/rows/{table}/{key}/history).
CREATE INDEX audit_row_newest
    ON syncbridge_meta.audit (pipeline, table_name, row_key, at_ms DESC, log_partition DESC, log_offset DESC);
-- Retention: the pipeline's records older than a cutoff.
CREATE INDEX audit_pipeline_age ON syncbridge_meta.audit (pipeline, at_ms);
