-- Retention (saga.retention): finished runs are deleted, per state, once they are older than a
-- setting, in small batches. This index finds the oldest finished runs of a state without
-- reading the others; finished_at is set exactly while a run is in a final state (a retried run
-- clears it), so the partial index holds finished runs only.
--
-- Migrations run in a transaction, so these builds lock out writes to their table while they
-- run. On a large journal, build them first by hand, without blocking anyone, and this file
-- then finds them there:
--   CREATE INDEX CONCURRENTLY saga_runs_finished ON saga_runs (state, finished_at)
--       WHERE finished_at IS NOT NULL;
--   CREATE INDEX CONCURRENTLY saga_events_run ON saga_events (run_id);
CREATE INDEX IF NOT EXISTS saga_runs_finished ON saga_runs (state, finished_at)
    WHERE finished_at IS NOT NULL;

-- Deleting a run cascades to its steps (served by their primary key) and its events, whose only
-- index so far is partial (unconsumed events): without this one each deleted run would scan the
-- whole events table.
CREATE INDEX IF NOT EXISTS saga_events_run ON saga_events (run_id);
