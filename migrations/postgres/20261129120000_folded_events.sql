-- One event row may carry the changes that led up to its state within one
-- status batch: the release (DISPATCHED) and the attempt's start (RUNNING)
-- folded into the attempt's result. A burst's task then costs one event row
-- and one index entry instead of three. Readers unfold a row into up to three
-- events; a row's events take cursors 4 * id - 2, 4 * id - 1 and 4 * id.
ALTER TABLE task_events ADD COLUMN released_at_ms BIGINT;
ALTER TABLE task_events ADD COLUMN run_at_ms BIGINT;
