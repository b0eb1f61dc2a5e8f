-- Operator runs (issue 11 §4, `cursor_reset`): who asked for the run and what it was asked to do
-- and found (the reset's target and blast radius). NULL for runs nobody asked for (`stream`).
ALTER TABLE syncbridge_meta.runs
    ADD COLUMN requested_by text,
    ADD COLUMN detail       jsonb;
