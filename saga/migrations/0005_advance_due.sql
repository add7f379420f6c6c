-- A run that waits for an advance task (after an event arrived, a lease expired, an operator
-- acted, a fork) records when that task is due again. The task is a broker message: were it
-- lost (a broker restarted empty), nothing else would move the run on. The sweeper sends it
-- again once this time passes; an advance clears it. A duplicate advance changes nothing.
ALTER TABLE saga_runs ADD COLUMN advance_due_at timestamptz;
CREATE INDEX saga_runs_advance_due ON saga_runs (advance_due_at) WHERE advance_due_at IS NOT NULL;
