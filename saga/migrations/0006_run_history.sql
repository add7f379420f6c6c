-- A run's history, for operators (saga list / show, the dashboard), at no cost on the happy path.
--
-- A step row holds its latest attempt: its number (attempt), worker (lease_owner, which from
-- now on stays set when the attempt ends), claim time (attempt_started_at), end (finished_at),
-- state and error. saga_attempts keeps only the attempts that did not end the step's story: a
-- failed attempt that is retried, an attempt lost with its worker (its lease expired), an
-- attempt an operator's retry supersedes. Each row is inserted by the transaction that already
-- ends that attempt, in the same statement. A step's attempts are its saga_attempts rows plus
-- its row's latest attempt (saga.runs_view merges them). One attempt that succeeds writes no row.
CREATE TABLE saga_attempts (
    run_id          text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    step_key        text NOT NULL,
    attempt         integer NOT NULL,
    worker          text,                   -- host:pid:boot:delivery of the worker that claimed it
    claimed_at      timestamptz,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    outcome         text NOT NULL CHECK (outcome IN ('failed', 'timed_out', 'lost')),
    error_type      text,
    error_message   text,
    traceback       text,
    PRIMARY KEY (run_id, step_key, attempt)
);

-- Run-level events that nothing else records: compensation begun, and operators' actions (with
-- who and from where). That a run started, finished, waited and got an event is read from the
-- run's and the steps' own rows, so the happy path writes none of these.
CREATE TABLE saga_run_events (
    id          bigserial PRIMARY KEY,
    run_id      text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    event       text NOT NULL,              -- compensation_begun | retry | cancel | fork | send_event
    actor       text,                       -- "user@host", or what the caller said
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saga_run_events_run ON saga_run_events (run_id, id);

-- The operators' filters (saga.runs_view), each an index its list pages walk in order with
-- keyset pagination: no page counts or skips rows. A list by creation time walks one range per
-- state, merged in order (so no index on created_at alone is written for every run); each
-- state's count is one capped range too.
CREATE INDEX saga_runs_state_created ON saga_runs (state, created_at, run_id);
CREATE INDEX saga_runs_saga_created ON saga_runs (saga_name, state, created_at, run_id);
-- Only runs with an error (failed, compensated, cancelled...) have entries.
CREATE INDEX saga_runs_error_type ON saga_runs ((error->>'type'), state, created_at, run_id)
    WHERE error IS NOT NULL;
-- A finished window lists runs by finish time (only finished runs have entries).
CREATE INDEX saga_runs_finished ON saga_runs (finished_at, run_id) WHERE finished_at IS NOT NULL;
-- Run id prefixes (LIKE 'abc%'), listed by run id: the primary key cannot serve them under a
-- non-C collation.
CREATE INDEX saga_runs_id_prefix ON saga_runs (run_id text_pattern_ops);
