-- What a handler said about an attempt (e.g. the webhook's HTTP status and
-- the start of its answer), beside the error of a failed one.
ALTER TABLE task_runs ADD COLUMN detail TEXT;
