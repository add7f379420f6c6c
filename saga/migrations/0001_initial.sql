-- The durable core: runs, the step journal, outside events, and the transactional outbox.
--
-- State machines (every change is a guarded UPDATE ... WHERE state IN (...)):
--   saga_runs.state:  running -> completed | failed
--                     running -> compensating -> compensated | cancelled | compensation_failed
--                     failed | compensation_failed -> running | compensating   (operator retry)
--   saga_steps.state: pending -> dispatched -> running -> completed | failed
--                     running -> pending                  (failed attempt, retried at due_at)
--                     waiting -> completed                (an event step: the event arrived)
--                     waiting -> dispatched               (an event step: its timeout came)
--                     pending | dispatched | waiting -> cancelled   (the run moved on)
--   A 'running' step whose lease expired is an attempt lost with its worker: the sweeper moves it
--   to pending (or failed once its attempts are used up).

CREATE TABLE saga_runs (
    run_id          text PRIMARY KEY,
    saga_name       text NOT NULL,
    saga_ref        text NOT NULL,          -- import path "module:attribute" of the definition
    saga_version    text NOT NULL,
    state           text NOT NULL DEFAULT 'running' CHECK (state IN (
                        'running', 'compensating', 'completed', 'compensated',
                        'failed', 'compensation_failed', 'cancelled')),
    input           jsonb NOT NULL,
    result          jsonb,
    error           jsonb,
    trace_context   jsonb NOT NULL DEFAULT '{}',   -- W3C carrier of the run's root span
    deadline_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX saga_runs_active ON saga_runs (created_at) WHERE state IN ('running', 'compensating');

CREATE SEQUENCE saga_completion_seq;

-- The journal. One row per step, compensation, timer or event wait of a run. step_key is unique
-- within the run: the step's name in a graph, "name[i]" for a fan-out branch, "name#position" in a
-- workflow written as code, "compensate:<step_key>" for a compensation. Everything a worker needs
-- to run the step is in the row (function, options, input): workers need no definition to run it.
CREATE TABLE saga_steps (
    run_id              text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    step_key            text NOT NULL,
    step_name           text NOT NULL,
    kind                text NOT NULL DEFAULT 'action'
                        CHECK (kind IN ('action', 'compensation', 'timer', 'event')),
    seq                 integer NOT NULL,       -- order in which the run scheduled its steps
    position            integer,                -- call position in a workflow written as code
    state               text NOT NULL DEFAULT 'dispatched' CHECK (state IN (
                            'pending', 'dispatched', 'running', 'waiting', 'completed', 'failed',
                            'cancelled')),
    fn_ref              text,                   -- "module:qualname" of the function to call
    compensation_ref    text,                   -- "module:qualname" of its compensation, if any
    options             jsonb NOT NULL DEFAULT '{}',  -- retry policy, timeout, pivot
    attempt             integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),  -- fencing token, +1 per claim
    max_attempts        integer NOT NULL CHECK (max_attempts >= 1),
    idempotency_key     text NOT NULL UNIQUE,   -- stable across attempts; handed to outside systems
    input               jsonb,
    result              jsonb,
    error               jsonb,                  -- last failure: {type, message, attempt, retryable}
    lease_owner         text,
    lease_expires_at    timestamptz,
    due_at              timestamptz NOT NULL DEFAULT now(),  -- pending: dispatch then; dispatched: dispatch again then
    completed_seq       bigint,                 -- global completion order (compensation order)
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,            -- first claim
    attempt_started_at  timestamptz,            -- latest claim
    finished_at         timestamptz,
    PRIMARY KEY (run_id, step_key),
    UNIQUE (run_id, seq)
);
CREATE INDEX saga_steps_due ON saga_steps (due_at)
    WHERE state IN ('pending', 'dispatched', 'waiting');
CREATE INDEX saga_steps_lease ON saga_steps (lease_expires_at) WHERE state = 'running';

-- Outside events (a human approval, a webhook) sent to a run. An event that arrives before the
-- run waits for it is kept here until a wait consumes it.
CREATE TABLE saga_events (
    id          bigserial PRIMARY KEY,
    run_id      text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    name        text NOT NULL,
    payload     jsonb,
    consumed_by text,                           -- the event step that received it
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX saga_events_unconsumed ON saga_events (run_id, name, id) WHERE consumed_by IS NULL;

-- The transactional outbox: every message that matters is a row here first, committed with the
-- state change that caused it. The relay publishes rows whose available_at has come.
CREATE TABLE saga_outbox (
    id              bigserial PRIMARY KEY,
    message_id      uuid NOT NULL UNIQUE,       -- becomes the Celery task id
    destination     text NOT NULL,              -- queue (routing key)
    task_name       text NOT NULL,
    payload         jsonb NOT NULL,             -- task keyword arguments
    headers         jsonb NOT NULL DEFAULT '{}',-- includes the W3C trace context
    created_at      timestamptz NOT NULL DEFAULT now(),
    available_at    timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text
);
CREATE INDEX saga_outbox_unpublished ON saga_outbox (available_at, id) WHERE published_at IS NULL;
CREATE INDEX saga_outbox_published ON saga_outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake relays when a row is ready now (rows left for a worker's fast path are not announced).
CREATE FUNCTION saga_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('saga_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER saga_outbox_notify AFTER INSERT ON saga_outbox
    FOR EACH ROW WHEN (NEW.available_at <= NEW.created_at) EXECUTE FUNCTION saga_outbox_notify();

-- Wake waiters (Python API, CLI) when a run reaches a final state.
CREATE FUNCTION saga_run_finished_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('saga_run_finished', NEW.run_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER saga_run_finished_notify AFTER UPDATE OF state ON saga_runs
    FOR EACH ROW WHEN (NEW.state IN ('completed', 'compensated', 'failed', 'compensation_failed', 'cancelled')
                       AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION saga_run_finished_notify();
