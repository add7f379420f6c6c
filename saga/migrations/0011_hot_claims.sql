-- A claim and a lease renewal rewrite no index entry (issue 15). Postgres updates a row in place
-- (HOT: no new index entries, the old version pruned from its page) only when no column that an
-- index names, in its key or in its predicate, changes, and the page has room. A claim changes
-- state, attempt, lease_owner and lease_expires_at, and both indexes of 0001 named some of them:
-- every claim and every renewal wrote a new entry into the primary key and the lease index.
--
-- One index now serves the sweeper's scans, on columns a claim leaves alone:
--   * due_at of a step that has not finished: a retry's or timer's time, a wait's timeout, when
--     a dispatched step is sent again. finished_at is set exactly while a step is in a final
--     state (an operator's retry clears it), so the index holds open steps only.
--   * a running step keeps the due_at it was dispatched with, at most one dispatch timeout
--     after its claim, so a step whose lease ran out has a due_at before now() plus that
--     timeout: the sweeper finds expired leases in that range of this index (store.expire_leases)
--     instead of in an index of their own.
-- Steps whose lease ran out, a dead worker's among them, are found as soon as before.
--
-- fillfactor leaves each new page room for the versions a claim and an outcome write (a row is
-- about 300 bytes), so they can stay on the row's page; it applies to pages written from now on.
--
-- Migrations run in a transaction, so the build locks out writes to saga_steps while it runs. On
-- a large journal, build it first by hand, without blocking anyone, and this file then finds it:
--   CREATE INDEX CONCURRENTLY saga_steps_open_due ON saga_steps (due_at)
--       WHERE finished_at IS NULL;
UPDATE saga_steps SET finished_at = coalesce(attempt_started_at, created_at)
WHERE finished_at IS NULL AND state IN ('completed', 'failed', 'cancelled');

CREATE INDEX IF NOT EXISTS saga_steps_open_due ON saga_steps (due_at) WHERE finished_at IS NULL;
DROP INDEX IF EXISTS saga_steps_due;
DROP INDEX IF EXISTS saga_steps_lease;
ALTER TABLE saga_steps SET (fillfactor = 80);
