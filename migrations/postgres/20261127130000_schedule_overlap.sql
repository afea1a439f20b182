-- Overlap policy of a recurring schedule: 'allow', or 'skip' (an occurrence
-- due while the previous one has not finished is SKIPPED).
ALTER TABLE schedules ADD COLUMN overlap TEXT NOT NULL DEFAULT 'allow';
