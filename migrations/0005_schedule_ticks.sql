-- Scheduled-job leases: one row per (pipeline, schedule, tick). The process whose INSERT creates
-- the row runs that tick's job; the others see the conflict and skip it, so a job runs once per
-- tick however many processes run the pipeline. The newest row per schedule also tells a
-- starting process whether a tick was missed while none ran (catch_up).
CREATE TABLE syncbridge_meta.schedule_ticks (
    pipeline   text   NOT NULL,
    schedule   text   NOT NULL,
    tick_ms    bigint NOT NULL,
    owner      text   NOT NULL,
    claimed_ms bigint NOT NULL,
    PRIMARY KEY (pipeline, schedule, tick_ms)
);
