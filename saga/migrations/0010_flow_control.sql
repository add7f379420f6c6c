-- Flow control (issue 13): concurrency limits, rate limits and priorities, held in Postgres and
-- taken and given back in the same transactions as claims and outcomes.
--
-- A gate is one limit for one key: 'c:<name>:<key>' (at most N holders at a time) or
-- 'r:<name>:<key>' (at most N units in any window of P seconds). A step that declares limits
-- takes its gates when it is claimed (saga_gate_take, under the gate's advisory lock); a step a
-- gate refuses becomes 'throttled' and waits here, not in the broker. A concurrency slot is given
-- back in the transaction that ends the attempt (its outcome, its lost lease, its run's cancel),
-- which hands it to the next waiter by priority, then round-robin between fairness keys, then
-- age: the waiter is dispatched in that same commit (saga_gate_release). A rate gate's waiters
-- are offered the budget when it frees, at the time saga_gates.wake_at says (the relay's sweep
-- sleeps until then).
--
-- Step states gain 'throttled': waits for a slot or a budget (due_at 'infinity').
--   dispatched | pending -> throttled -> dispatched | cancelled

ALTER TABLE saga_steps DROP CONSTRAINT IF EXISTS saga_steps_state_check;
ALTER TABLE saga_steps ADD CONSTRAINT saga_steps_state_check CHECK (state IN (
    'pending', 'dispatched', 'running', 'waiting', 'completed', 'failed', 'cancelled',
    'throttled'));

-- A run's priority: its steps wait ahead of lower ones for a gate (a step may set its own).
-- gated: it has scheduled a step with limits, so its end (and its cancelled steps) give slots
-- back; a run without limits pays nothing for flow control.
ALTER TABLE saga_runs ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE saga_runs ADD COLUMN gated boolean NOT NULL DEFAULT false;
-- The run-level gate of a run whose definition limits its runs (Concurrency on a Saga or a
-- workflow): a new run with on_limit 'refuse' or 'cancel_oldest' counts the active runs of its
-- key here when it starts.
ALTER TABLE saga_runs ADD COLUMN run_gate text;
CREATE INDEX saga_runs_run_gate ON saga_runs (run_gate, created_at, run_id)
    WHERE run_gate IS NOT NULL AND state IN ('running', 'compensating');

-- One row per gate in use: its latest declared limit, when its waiters are next offered
-- budget (rate gates) or looked at again (a missed hand-over, healed), and a provider's pause.
CREATE TABLE saga_gates (
    gate          text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('concurrency', 'rate')),
    lim           integer NOT NULL CHECK (lim >= 1),
    period        float8,                      -- rate gates: the window, in seconds
    wake_at       timestamptz,
    paused_until  timestamptz
);
CREATE INDEX saga_gates_wake ON saga_gates (wake_at) WHERE wake_at IS NOT NULL;

-- Holders and waiters. A holder row is a slot taken: by a step (step_key) from its claim to the
-- end of its attempt, or by a run (run_level, step_key '') from its first claim to its end. A
-- waiter row is a throttled step in line for the gate; 'offered' is a rate waiter dispatched to
-- take budget that has freed (counted against the budget until it claims).
CREATE TABLE saga_gate_slots (
    gate       text NOT NULL,
    run_id     text NOT NULL REFERENCES saga_runs (run_id) ON DELETE CASCADE,
    step_key   text NOT NULL,
    state      text NOT NULL CHECK (state IN ('held', 'waiting', 'offered')),
    run_level  boolean NOT NULL DEFAULT false,
    priority   integer NOT NULL DEFAULT 0,
    fair_key   text NOT NULL DEFAULT '',
    units      integer NOT NULL DEFAULT 1,
    since      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (gate, run_id, step_key)
);
CREATE INDEX saga_gate_slots_line ON saga_gate_slots (gate, priority DESC, since)
    WHERE state = 'waiting';
CREATE INDEX saga_gate_slots_run ON saga_gate_slots (run_id, step_key);

-- What a rate gate granted: units at a time, to a step (whose reported usage, e.g. a model
-- call's tokens, replaces its estimate when its outcome is journaled). The window's sum is read
-- from here.
CREATE TABLE saga_rate_grants (
    gate      text NOT NULL,
    at        timestamptz NOT NULL,
    units     integer NOT NULL,
    run_id    text NOT NULL,
    step_key  text NOT NULL
);
CREATE INDEX saga_rate_grants_gate ON saga_rate_grants (gate, at);

-- How long a grant counts against a rate gate: its window and a guard. A grant is booked when
-- the step is claimed; its request reaches the service after the claim's commit and the worker's
-- start of the step, a delay that varies by milliseconds to tens of them, more when a window
-- lets many steps go at once. Budget re-granted the moment the window let it go would let a
-- step whose request left quickly land in the same window, as the service counts, as one
-- granted a window before whose request left slowly. The guard, 5% of the window and at most
-- 250 ms, costs at most 5% of the rate, a window of a minute 0.4%.
CREATE FUNCTION saga_rate_span(p_period float8) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_period + least(p_period * 0.05, 0.25)) * interval '1 second'
$$;

-- A rate gate's units granted in the window (and guard) ending now.
CREATE FUNCTION saga_rate_used(p_gate text, p_period float8) RETURNS bigint
LANGUAGE sql AS $$
    SELECT coalesce(sum(units), 0) FROM saga_rate_grants
    WHERE gate = p_gate AND at > clock_timestamp() - saga_rate_span(p_period)
$$;

-- When a rate gate can next grant p_units: the earliest time the window's sum leaves room.
CREATE FUNCTION saga_rate_free_at(p_gate text, p_lim integer, p_period float8, p_units integer)
RETURNS timestamptz LANGUAGE sql AS $$
    WITH window_grants AS (
        SELECT at, sum(units) OVER (ORDER BY at ROWS UNBOUNDED PRECEDING) AS dropped,
               sum(units) OVER () AS total
        FROM saga_rate_grants
        WHERE gate = p_gate AND at > clock_timestamp() - saga_rate_span(p_period)
    )
    SELECT coalesce(
        (SELECT min(at) + saga_rate_span(p_period) FROM window_grants
         WHERE total - dropped + p_units <= p_lim),
        clock_timestamp())
$$;

-- A run holds its run-level slot while it is active, and after its end while an attempt it
-- started still runs (its effect is not over: a run cancelled mid-step keeps the slot until
-- that attempt ends or its lease runs out).
CREATE FUNCTION saga_run_holds_slot(p_run_id text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT FROM saga_runs r WHERE r.run_id = p_run_id
                   AND r.state IN ('running', 'compensating'))
        OR EXISTS (SELECT FROM saga_steps t WHERE t.run_id = p_run_id AND t.state = 'running')
$$;

-- The slots of a concurrency gate in use: held by a step still dispatched, running or waiting
-- for another of its gates, or by a run still active or with a step still running (a cancelled
-- run's step runs on until its attempt ends). A slot whose holder ended without giving it back
-- (which the transactions that end steps and runs do) is not counted.
CREATE FUNCTION saga_gate_held(p_gate text) RETURNS bigint
LANGUAGE sql AS $$
    SELECT count(*) FROM saga_gate_slots s
    WHERE s.gate = p_gate AND s.state = 'held'
      AND CASE WHEN s.run_level
               THEN saga_run_holds_slot(s.run_id)
               ELSE EXISTS (SELECT FROM saga_steps t WHERE t.run_id = s.run_id
                            AND t.step_key = s.step_key
                            AND t.state IN ('dispatched', 'running', 'throttled'))
          END
$$;

-- Dispatch waiting steps of a gate while it has room, in order: priority, then the fairness key
-- holding the fewest slots of this gate, then age. Returns the steps dispatched (the caller
-- sends their messages after its commit). Called with the gate's advisory lock held. A waiter
-- whose step is locked by another transaction (its run is being changed) is passed over for
-- now: no lock waits here, so no deadlock with a run's own transaction.
CREATE FUNCTION saga_gate_grant(p_gate text, p_dispatch_timeout float8)
RETURNS TABLE (run_id text, step_key text, queue text, trace_context jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    g      saga_gates;
    w      saga_gate_slots;
    room   bigint;
    tried  integer := 0;
    busy   boolean := false;
    wake   timestamptz;
BEGIN
    SELECT * INTO g FROM saga_gates WHERE gate = p_gate;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF g.kind = 'rate' AND g.paused_until > clock_timestamp() THEN
        UPDATE saga_gates SET wake_at = g.paused_until WHERE gate = p_gate;
        RETURN;
    END IF;
    LOOP
        tried := tried + 1;
        EXIT WHEN tried > 1000;
        IF g.kind = 'concurrency' THEN
            room := g.lim - saga_gate_held(p_gate);
        ELSE
            SELECT g.lim - saga_rate_used(p_gate, g.period)
                   - coalesce(sum(s.units), 0) INTO room
            FROM saga_gate_slots s WHERE s.gate = p_gate AND s.state = 'offered';
        END IF;
        EXIT WHEN room <= 0;
        -- The head of the line: per fairness key its first waiter, then the key that holds the
        -- fewest slots (round-robin between keys), then the oldest.
        -- The slots each key holds are counted once (at most the limit's rows), not per
        -- waiter: a line of 20,000 is ordered in milliseconds, not seconds, under the lock.
        WITH holding AS (
            SELECT h.fair_key, count(*) AS slots FROM saga_gate_slots h
            WHERE h.gate = p_gate AND h.state IN ('held', 'offered')
            GROUP BY h.fair_key
        )
        SELECT s.* INTO w FROM saga_gate_slots s
        LEFT JOIN holding ON holding.fair_key = s.fair_key
        WHERE s.gate = p_gate AND s.state = 'waiting'
        ORDER BY s.priority DESC, coalesce(holding.slots, 0), s.since, s.run_id, s.step_key
        LIMIT 1;
        EXIT WHEN NOT FOUND;
        IF g.kind = 'rate' AND w.units > room THEN
            EXIT;  -- the head waits for more budget; nobody passes it
        END IF;
        -- Its step, if it still waits (a cancelled or already dispatched one has left the line).
        PERFORM 1 FROM saga_steps t
        WHERE t.run_id = w.run_id AND t.step_key = w.step_key AND t.state = 'throttled'
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            IF EXISTS (SELECT FROM saga_steps t WHERE t.run_id = w.run_id
                       AND t.step_key = w.step_key AND t.state = 'throttled') THEN
                busy := true;  -- locked by its run's transaction: looked at again shortly
                EXIT;
            END IF;
            DELETE FROM saga_gate_slots s
            WHERE s.gate = p_gate AND s.run_id = w.run_id AND s.step_key = w.step_key;
            CONTINUE;
        END IF;
        IF g.kind = 'rate' THEN
            UPDATE saga_gate_slots s SET state = 'offered'
            WHERE s.gate = p_gate AND s.run_id = w.run_id AND s.step_key = w.step_key;
        ELSIF w.run_level THEN
            -- The run takes the slot; every step of the run waiting for it goes.
            DELETE FROM saga_gate_slots s
            WHERE s.gate = p_gate AND s.run_id = w.run_id AND s.step_key = w.step_key;
            INSERT INTO saga_gate_slots (gate, run_id, step_key, state, run_level, priority,
                                         fair_key)
            VALUES (p_gate, w.run_id, '', 'held', true, w.priority, w.fair_key)
            ON CONFLICT (gate, run_id, step_key) DO UPDATE SET state = 'held';
        ELSE
            UPDATE saga_gate_slots s SET state = 'held'
            WHERE s.gate = p_gate AND s.run_id = w.run_id AND s.step_key = w.step_key;
        END IF;
        RETURN QUERY
        UPDATE saga_steps t
        SET state = 'dispatched', due_at = now() + p_dispatch_timeout * interval '1 second'
        FROM saga_runs r
        WHERE t.run_id = w.run_id AND r.run_id = t.run_id
          AND (t.step_key = w.step_key
               -- a run's slot: its other steps waiting for the same gate go too
               OR w.run_level AND t.step_key IN (
                   SELECT o.step_key FROM saga_gate_slots o
                   WHERE o.gate = p_gate AND o.run_id = w.run_id AND o.state = 'waiting'))
          AND t.state = 'throttled'
        RETURNING t.run_id, t.step_key, coalesce(t.options->>'queue', r.queue), r.trace_context;
        IF w.run_level THEN
            DELETE FROM saga_gate_slots o
            WHERE o.gate = p_gate AND o.run_id = w.run_id AND o.state = 'waiting';
        END IF;
    END LOOP;
    -- When to look again: a rate gate when the budget for its head (and for the steps already
    -- offered budget, which take it when they claim) frees; a gate whose head was busy, shortly;
    -- a concurrency gate with waiters left, after a minute, in case a hand-over was missed;
    -- else never.
    IF EXISTS (SELECT FROM saga_gate_slots s WHERE s.gate = p_gate AND s.state = 'waiting') THEN
        IF busy THEN
            wake := clock_timestamp() + interval '1 second';
        ELSIF g.kind = 'rate' THEN
            wake := saga_rate_free_at(p_gate, g.lim, g.period, least(g.lim, (
                SELECT coalesce(sum(s.units) FILTER (WHERE s.state = 'offered'), 0)
                       + coalesce((SELECT h.units FROM saga_gate_slots h
                                   WHERE h.gate = p_gate AND h.state = 'waiting'
                                   ORDER BY h.priority DESC, h.since LIMIT 1), 0)
                FROM saga_gate_slots s WHERE s.gate = p_gate)::integer));
            -- Offered steps normally claim within milliseconds; one whose message was lost
            -- holds its offer until its step is dispatched again: no busy loop meanwhile.
            wake := greatest(wake, clock_timestamp() + CASE
                WHEN EXISTS (SELECT FROM saga_gate_slots s
                             WHERE s.gate = p_gate AND s.state = 'offered')
                THEN interval '100 milliseconds' ELSE interval '2 milliseconds' END);
            IF g.paused_until > wake THEN
                wake := g.paused_until;
            END IF;
        ELSE
            wake := clock_timestamp() + interval '60 seconds';
        END IF;
        UPDATE saga_gates SET wake_at = wake WHERE gate = p_gate;
    ELSIF NOT EXISTS (SELECT FROM saga_gate_slots s WHERE s.gate = p_gate)
          AND coalesce(g.paused_until, '-infinity') <= clock_timestamp()
          AND (g.kind = 'concurrency' OR saga_rate_used(p_gate, g.period) = 0) THEN
        -- Idle: nobody holds, waits or is offered anything. A gate per key (a tenant, a user)
        -- would otherwise stay a row forever; the next take makes it again.
        DELETE FROM saga_gates WHERE gate = p_gate;
    ELSE
        UPDATE saga_gates SET wake_at = NULL WHERE gate = p_gate AND wake_at IS NOT NULL;
    END IF;
END;
$$;

-- Take a gate for a step being claimed (the caller holds the step's row lock). taken: the gate
-- is the step's (or its run's) now; else the step waits in line and the caller makes it
-- 'throttled'. waited_since: when it first waited in this line (for its wait span), if it did.
CREATE FUNCTION saga_gate_take(
    p_gate text, p_kind text, p_lim integer, p_period float8, p_units integer,
    p_run_id text, p_step_key text, p_run_level boolean, p_priority integer, p_fair_key text,
    p_ready_at timestamptz, OUT taken boolean, OUT waited_since timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    holder  text := CASE WHEN p_run_level THEN '' ELSE p_step_key END;
    g       saga_gates;
    mine    saga_gate_slots;
    used    bigint;
    wake    timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_gate, 0));
    INSERT INTO saga_gates (gate, kind, lim, period) VALUES (p_gate, p_kind, p_lim, p_period)
    ON CONFLICT (gate) DO UPDATE SET lim = EXCLUDED.lim, period = EXCLUDED.period
        WHERE saga_gates.lim IS DISTINCT FROM EXCLUDED.lim
           OR saga_gates.period IS DISTINCT FROM EXCLUDED.period;
    SELECT * INTO g FROM saga_gates WHERE gate = p_gate;
    SELECT * INTO mine FROM saga_gate_slots s
    WHERE s.gate = p_gate AND s.run_id = p_run_id AND s.step_key = p_step_key;
    -- Its place in line, or the slot handed to it (which keeps the time it joined the line).
    waited_since := mine.since;
    taken := true;
    IF p_kind = 'concurrency' THEN
        IF EXISTS (SELECT FROM saga_gate_slots s WHERE s.gate = p_gate AND s.run_id = p_run_id
                   AND s.step_key = holder AND s.state = 'held') THEN
            DELETE FROM saga_gate_slots s WHERE s.gate = p_gate AND s.run_id = p_run_id
                AND s.step_key = p_step_key AND s.state = 'waiting';
            RETURN;  -- handed over to it, or its run holds the slot
        END IF;
        -- Room is taken by whoever comes: waiters are handed slots as they free, so room with
        -- waiters in line means a hand-over was missed (healed at the gate's next wake).
        IF saga_gate_held(p_gate) < g.lim THEN
            DELETE FROM saga_gate_slots s WHERE s.gate = p_gate AND s.run_id = p_run_id
                AND s.step_key = p_step_key;
            INSERT INTO saga_gate_slots (gate, run_id, step_key, state, run_level, priority,
                                         fair_key)
            VALUES (p_gate, p_run_id, holder, 'held', p_run_level, p_priority, p_fair_key)
            ON CONFLICT (gate, run_id, step_key) DO UPDATE SET state = 'held';
            RETURN;
        END IF;
    ELSE
        used := saga_rate_used(p_gate, g.period);
        IF coalesce(g.paused_until, '-infinity') <= clock_timestamp()
           AND used + p_units <= g.lim
           -- Budget offered to this step, or budget left over that nobody waits for.
           AND (mine.state = 'offered'
                OR used + p_units + (SELECT coalesce(sum(s.units), 0) FROM saga_gate_slots s
                                     WHERE s.gate = p_gate AND s.state = 'offered') <= g.lim
                   AND NOT EXISTS (SELECT FROM saga_gate_slots s WHERE s.gate = p_gate
                                   AND s.state = 'waiting' AND s.priority >= p_priority
                                   AND NOT (s.run_id = p_run_id
                                            AND s.step_key = p_step_key))) THEN
            DELETE FROM saga_gate_slots s WHERE s.gate = p_gate AND s.run_id = p_run_id
                AND s.step_key = p_step_key;
            INSERT INTO saga_rate_grants (gate, at, units, run_id, step_key)
            VALUES (p_gate, clock_timestamp(), p_units, p_run_id, p_step_key);
            -- Grants older than the window count no more.
            DELETE FROM saga_rate_grants
            WHERE gate = p_gate AND at <= clock_timestamp() - saga_rate_span(g.period);
            RETURN;
        END IF;
    END IF;
    taken := false;
    -- In line (an offered step that found no budget keeps its place), by when it was ready:
    -- steps go in the order they were scheduled, not the order workers happened to claim them.
    INSERT INTO saga_gate_slots (gate, run_id, step_key, state, run_level, priority, fair_key,
                                 units, since)
    VALUES (p_gate, p_run_id, p_step_key, 'waiting', p_run_level, p_priority, p_fair_key,
            p_units, coalesce(p_ready_at, clock_timestamp()))
    ON CONFLICT (gate, run_id, step_key) DO UPDATE SET state = 'waiting';
    wake := CASE
        WHEN p_kind = 'rate' THEN least(coalesce(g.wake_at, 'infinity'), greatest(
            coalesce(g.paused_until, '-infinity'),
            saga_rate_free_at(p_gate, g.lim, g.period, p_units)))
        ELSE least(coalesce(g.wake_at, 'infinity'), clock_timestamp() + interval '60 seconds')
    END;
    IF wake IS DISTINCT FROM g.wake_at THEN
        UPDATE saga_gates SET wake_at = wake WHERE gate = p_gate;
        -- The relay's sweep sleeps until the earliest wake it knew of: wake it for this one.
        IF p_kind = 'rate' THEN
            PERFORM pg_notify('saga_outbox', '');
        END IF;
    END IF;
END;
$$;

-- Give back what a run holds and hand each freed gate to its next waiters; returns the steps
-- dispatched. With p_step_key: the slots of that step (its attempt ended). Without: the slots
-- and places in line of the run's steps that no longer run or wait (its open steps were
-- cancelled). Either way, the run's own slot once it no longer holds it (saga_run_holds_slot).
-- Freed gates are locked in the order every transaction taking several keeps: a run's own gate
-- first, then by name ('c:' before 'r:'), as a claim takes them (saga.limits.gates_of).
CREATE FUNCTION saga_gate_release(p_run_id text, p_step_key text, p_dispatch_timeout float8)
RETURNS TABLE (run_id text, step_key text, queue text, trace_context jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    freed text;
BEGIN
    FOR freed IN
        WITH gone AS (
            DELETE FROM saga_gate_slots s
            WHERE s.run_id = p_run_id
              AND CASE WHEN s.run_level AND s.state = 'held'
                       THEN NOT saga_run_holds_slot(p_run_id)
                       WHEN p_step_key IS NOT NULL THEN s.step_key = p_step_key
                       ELSE NOT EXISTS (
                           SELECT FROM saga_steps t WHERE t.run_id = s.run_id
                           AND t.step_key = s.step_key
                           AND t.state IN ('dispatched', 'running', 'throttled'))
                  END
            RETURNING s.gate, s.run_level
        )
        SELECT gate FROM gone GROUP BY gate ORDER BY bool_or(run_level) DESC, gate
    LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended(freed, 0));
        RETURN QUERY SELECT * FROM saga_gate_grant(freed, p_dispatch_timeout);
    END LOOP;
END;
$$;

-- Pause a rate gate (a provider answered 429 with Retry-After): nothing is granted before then.
CREATE FUNCTION saga_gate_pause(p_gate text, p_kind text, p_lim integer, p_period float8,
                                p_seconds float8)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended(p_gate, 0));
    INSERT INTO saga_gates (gate, kind, lim, period, paused_until)
    VALUES (p_gate, p_kind, p_lim, p_period,
            clock_timestamp() + p_seconds * interval '1 second')
    ON CONFLICT (gate) DO UPDATE SET paused_until = greatest(
        coalesce(saga_gates.paused_until, '-infinity'), EXCLUDED.paused_until);
END;
$$;
