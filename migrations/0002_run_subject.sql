-- What a run is about when its kind does not say it all: the tables of a snapshot, the table of
-- a re-snapshot. NULL for runs projected before this column existed (their events carry none).
ALTER TABLE syncbridge_meta.runs ADD COLUMN subject text;
