-- Less WAL per step (issue 15): saga_steps is rebuilt so that a claim and a lease renewal
-- rewrite no index entry, and each update of a step logs only the columns it changes.
--
-- HOT. Postgres updates a row in place (no new index entries; the old version is pruned from its
-- page) only when no column that an index names, in its key or its predicate, changes, and the
-- page has room. A claim sets state, attempt, lease_owner and lease_expires_at, and both indexes
-- of 0001 named some of them: each claim and each renewal wrote an entry into the primary key
-- and the lease index. One index now serves the sweeper, on columns a claim leaves alone:
--   * due_at of a step that has not finished: a retry's or timer's time, a wait's timeout, when
--     a dispatched step is sent again. finished_at is set exactly while a step is in a final
--     state (an operator's retry clears it), so the index holds the open steps only.
--   * a running step keeps the due_at it was dispatched with, at most one dispatch timeout
--     after its claim, so a step whose lease ran out has a due_at before now() plus that
--     timeout: the sweeper finds expired leases in that range of this index
--     (queries.SELECT_EXPIRED_LEASES) instead of in an index of their own, as soon as before.
-- fillfactor leaves each page room for the versions a claim and an outcome write.
--
-- Column order. An update on the same page logs the new row less the bytes it shares with the
-- old one at its start and at its end. The columns a step's updates change came in the middle
-- of the row, between its options and input: each claim and outcome logged nearly the whole row.
-- They now come last, the claim's first and the result at the end, so a claim logs about 80
-- bytes of a 300-byte row and a renewal one timestamp.
--
-- The rebuild copies the journal once, in the migration's transaction: about 1 s per 100,000
-- steps on a small machine, more where results are large. Both tables are locked first, runs
-- before steps as every transaction takes them: a claim or an outcome committed during the
-- copy would otherwise be lost with the old table (DROP TABLE waits for it, then discards it),
-- and the engine's processes wait meanwhile, readers too. On a large journal, prune it first
-- (saga prune) or migrate in a quiet moment.
LOCK TABLE saga_runs, saga_steps IN ACCESS EXCLUSIVE MODE;

CREATE TABLE saga_steps_0011 (
    run_id              text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    step_key            text NOT NULL,
    step_name           text NOT NULL,
    kind                text NOT NULL DEFAULT 'action',
    seq                 integer NOT NULL,
    position            integer,
    max_attempts        integer NOT NULL,
    fn_ref              text,
    compensation_ref    text,
    idempotency_key     text NOT NULL,
    options             jsonb NOT NULL DEFAULT '{}',
    input               jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    -- what a claim changes
    state               text NOT NULL DEFAULT 'dispatched',
    attempt             integer NOT NULL DEFAULT 0,
    lease_owner         text,
    lease_expires_at    timestamptz,
    started_at          timestamptz,
    attempt_started_at  timestamptz,
    -- what the sweeper and an outcome change
    due_at              timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz,
    completed_seq       bigint,
    error               jsonb,
    result              jsonb
) WITH (fillfactor = 80);

INSERT INTO saga_steps_0011 (
    run_id, step_key, step_name, kind, seq, position, max_attempts, fn_ref, compensation_ref,
    idempotency_key, options, input, created_at, state, attempt, lease_owner, lease_expires_at,
    started_at, attempt_started_at, due_at, finished_at, completed_seq, error, result)
SELECT run_id, step_key, step_name, kind, seq, position, max_attempts, fn_ref, compensation_ref,
       idempotency_key, options, input, created_at, state, attempt, lease_owner,
       lease_expires_at, started_at, attempt_started_at, due_at,
       -- a final step always has one; guard rows an older version may have left without
       CASE WHEN state IN ('completed', 'failed', 'cancelled')
            THEN coalesce(finished_at, attempt_started_at, created_at) ELSE finished_at END,
       completed_seq, error, result
FROM saga_steps;

DROP TABLE saga_steps;
ALTER TABLE saga_steps_0011 RENAME TO saga_steps;
ALTER TABLE saga_steps RENAME CONSTRAINT saga_steps_0011_run_id_fkey TO saga_steps_run_id_fkey;
ALTER TABLE saga_steps
    ADD CONSTRAINT saga_steps_pkey PRIMARY KEY (run_id, step_key),
    ADD CONSTRAINT saga_steps_kind_check
        CHECK (kind IN ('action', 'compensation', 'timer', 'event')),
    ADD CONSTRAINT saga_steps_state_check CHECK (state IN (
        'pending', 'dispatched', 'running', 'waiting', 'completed', 'failed', 'cancelled',
        'throttled')),
    ADD CONSTRAINT saga_steps_attempt_check CHECK (attempt >= 0),
    ADD CONSTRAINT saga_steps_max_attempts_check CHECK (max_attempts >= 1);
CREATE INDEX saga_steps_open_due ON saga_steps (due_at) WHERE finished_at IS NULL;
ANALYZE saga_steps;
