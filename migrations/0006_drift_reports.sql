-- Drift reports (issue 14): a check's or heal's full report, projected from the
-- `<prefix>.<pipeline>.drift` topic. `report` is the report without its differences; each
-- difference is a row of `drift_differences`, numbered from 0 in report order (pages of
-- GET /pipelines/{p}/drift/{run_id}). A record read twice inserts nothing (ON CONFLICT).
CREATE TABLE syncbridge_meta.drift_reports (
    run_id      uuid   PRIMARY KEY,
    pipeline    text   NOT NULL,
    started_ms  bigint NOT NULL,
    finished_ms bigint NOT NULL,
    -- How many differences the report holds (the sum of its counts per class).
    differences bigint NOT NULL,
    report      jsonb  NOT NULL
);
-- The latest report of a pipeline (GET /pipelines/{p}/drift).
CREATE INDEX drift_reports_latest ON syncbridge_meta.drift_reports (pipeline, finished_ms DESC, run_id DESC);

CREATE TABLE syncbridge_meta.drift_differences (
    run_id     uuid   NOT NULL,
    idx        bigint NOT NULL,
    -- missing, orphaned, divergent, misrouted, duplicate, stale_ledger
    class      text   NOT NULL,
    difference jsonb  NOT NULL,
    PRIMARY KEY (run_id, idx)
);
