-- Run history (DESIGN.md §9): one row per run, the latest state the projector saw of it.
-- Projected from the `<prefix>.<pipeline>.runs` topic; `seq` orders the events of one run, so a
-- replayed or duplicated event (same or lower seq) changes nothing.
CREATE TABLE syncbridge_meta.runs (
    run_id     uuid PRIMARY KEY,
    pipeline   text   NOT NULL,
    kind       text   NOT NULL,
    status     text   NOT NULL,
    started_ms bigint NOT NULL,
    ended_ms   bigint,
    updated_ms bigint NOT NULL,
    seq        bigint NOT NULL,
    event_id   uuid   NOT NULL,
    owner      text   NOT NULL,
    reason     text,
    counts     jsonb  NOT NULL,
    errors     jsonb  NOT NULL
);
CREATE INDEX runs_newest ON syncbridge_meta.runs (started_ms DESC, run_id DESC);
CREATE INDEX runs_pipeline_status ON syncbridge_meta.runs (pipeline, status);

-- How far the projector has applied each topic partition, committed in the same transaction as
-- the rows it wrote: the position lives with the projection, so dropping the schema restarts the
-- projection from the beginning of the log.
CREATE TABLE syncbridge_meta.projector_offsets (
    topic       text   NOT NULL,
    partition   int    NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
