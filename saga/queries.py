"""Every SQL statement the saga package runs, by name. Call sites never build SQL.

Typed ``LiteralString``: a statement is a constant, never text assembled at run time. Statements
whose rows are read name every column the record they become has (``AS`` where the column's own
name differs), so the store reads rows by column name (``psycopg.rows.class_row``/``dict_row``).
State and kind literals are checked against ``saga.states`` by ``tests/unit/test_states.py``.
"""

from typing import LiteralString

# -- the store (saga.store, saga.run_transaction) -----------------------------------------

# A pipelined transaction is opened and committed by statements (not psycopg's transaction()),
# so that BEGIN ... COMMIT end with one Sync; its commit is synchronous (the pool's is not).
BEGIN: LiteralString = "BEGIN"
SYNCHRONOUS_COMMIT_ON: LiteralString = "SET LOCAL synchronous_commit TO on"
COMMIT: LiteralString = "COMMIT"

# Waiters (wait_for_run) wake on saga_run_finished_notify (migration 0001).
LISTEN_RUN_FINISHED: LiteralString = "LISTEN saga_run_finished"
# Before a listening connection goes back to its pool.
UNLISTEN_RUN_FINISHED: LiteralString = "UNLISTEN saga_run_finished"

INSERT_RUN: LiteralString = """
INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, input, trace_context,
                       deadline_at, queue, key_prefix, priority, run_gate)
VALUES (%(run_id)s, %(saga_name)s, %(saga_ref)s, %(saga_version)s, %(input)s::jsonb,
        %(trace_context)s, now() + %(timeout)s * interval '1 second', %(queue)s, %(key_prefix)s,
        %(priority)s, %(run_gate)s)
ON CONFLICT (run_id) DO NOTHING
RETURNING run_id
"""

SELECT_RUN_IDENTITY: LiteralString = """
SELECT saga_name, input FROM saga_runs WHERE run_id = %s
"""

# Taken first in every transaction that changes a run: serialises its outcomes and operators.
LOCK_RUN: LiteralString = """
SELECT run_id, state, saga_name, saga_ref, saga_version, input, error, trace_context, queue,
       key_prefix, gated
FROM saga_runs WHERE run_id = %s FOR UPDATE
"""

# A new step, numbered after the run's last, unless the run has it already (a duplicate is a
# no-op). Callers hold the run's row lock, so seq is safe and no one else can insert the same
# step meanwhile: NOT EXISTS does what ON CONFLICT DO NOTHING would, without its speculative
# insertion (a WAL record and a lock per step).
INSERT_STEP: LiteralString = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, position, state, fn_ref,
                        compensation_ref, options, max_attempts, idempotency_key, input, due_at)
SELECT %(run_id)s::text, %(step_key)s::text, %(step_name)s::text, %(kind)s::text,
       (SELECT coalesce(max(seq), 0) + 1 FROM saga_steps WHERE run_id = %(run_id)s),
       %(position)s::int, %(state)s::text, %(fn_ref)s::text, %(compensation_ref)s::text,
       %(options)s::jsonb, %(max_attempts)s::int, %(idempotency_key)s::text, %(input)s::jsonb,
       CASE WHEN %(delay)s::float8 IS NULL AND %(state)s = 'waiting' THEN 'infinity'
            ELSE now() + coalesce(%(delay)s::float8, %(dispatch_timeout)s) * interval '1 second'
       END
WHERE NOT EXISTS (
    SELECT FROM saga_steps WHERE run_id = %(run_id)s AND step_key = %(step_key)s)
"""

# An event that arrived before its wait, journaled as a completed event step.
INSERT_RECEIVED_EVENT: LiteralString = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, position, state, max_attempts,
                        idempotency_key, result, completed_seq, finished_at)
VALUES (%(run_id)s, %(step_key)s, %(step_name)s, 'event',
        (SELECT coalesce(max(seq), 0) + 1 FROM saga_steps WHERE run_id = %(run_id)s),
        %(position)s, 'completed', 1, %(idempotency_key)s, %(result)s,
        nextval('saga_completion_seq'), now())
"""

# The journal, less the completed rows a process has already read (completed rows never change,
# and a run's completions are numbered in commit order under its lock).
SELECT_JOURNAL: LiteralString = """
SELECT step_key, step_name, kind, state, position, result, error, completed_seq,
       compensation_ref, options, attempt
FROM saga_steps
WHERE run_id = %(run_id)s AND (state <> 'completed' OR completed_seq > %(seen)s)
ORDER BY seq
"""

# Claim for one attempt: the fencing token (attempt) goes up by one. Only a dispatched step, or a
# pending one whose time has come, can be claimed; a running, completed or failed one cannot,
# except by the same delivery retrying a claim whose reply it lost (same owner token). Actions
# run while the run runs, compensations while it compensates.
_CLAIM: LiteralString = """
UPDATE saga_steps s
SET state = 'running', attempt = s.attempt + 1, lease_owner = %(owner)s,
    lease_expires_at = now() + %(lease)s * interval '1 second',
    started_at = coalesce(s.started_at, now()), attempt_started_at = now()
FROM saga_runs r
WHERE s.run_id = %(run_id)s AND s.step_key = %(step_key)s AND r.run_id = s.run_id
  AND r.state = CASE s.kind WHEN 'compensation' THEN 'compensating' ELSE 'running' END
  AND (s.state = 'dispatched' OR (s.state = 'pending' AND s.due_at <= now())
       OR (s.state = 'running' AND s.lease_owner = %(owner)s))
"""

_CLAIMED: LiteralString = """
RETURNING s.run_id, s.step_key, s.step_name, s.kind, s.attempt, s.max_attempts,
          s.idempotency_key, s.input, s.fn_ref, s.options, r.input AS run_input, r.saga_name,
          r.trace_context, s.created_at AS scheduled_at, r.saga_ref,
          s.error->>'failed_at' AS previous_failed_at, s.error->>'type' AS previous_error_type
"""

# A step with limits (options.gates, 0010) is not claimed here: it takes its gates first
# (CLAIM_GATED_STEP, under the step's row lock).
CLAIM_STEP: LiteralString = _CLAIM + "  AND NOT s.options ? 'gates'\n" + _CLAIMED

# A step with limits, once it holds its gates.
CLAIM_GATED_STEP: LiteralString = _CLAIM + _CLAIMED

# The claimable step with limits, locked (rows before gates: the order every transaction that
# touches both keeps), with its gates and priority (its own, else its run's).
LOCK_GATED_STEP: LiteralString = """
SELECT s.options->'gates' AS gates,
       coalesce((s.options->>'priority')::int, r.priority) AS priority,
       -- its place in a line: a first attempt by when it was scheduled, a retry from now
       CASE WHEN s.attempt = 0 THEN s.created_at ELSE now() END AS ready_at,
       -- running: this owner's claim committed and its reply was lost; it holds its gates
       s.state = 'running' AS claimed
FROM saga_steps s JOIN saga_runs r ON r.run_id = s.run_id
WHERE s.run_id = %(run_id)s AND s.step_key = %(step_key)s AND s.options ? 'gates'
  AND r.state = CASE s.kind WHEN 'compensation' THEN 'compensating' ELSE 'running' END
  AND (s.state = 'dispatched' OR (s.state = 'pending' AND s.due_at <= now())
       OR (s.state = 'running' AND s.lease_owner = %(owner)s))
FOR UPDATE OF s
"""

TAKE_GATE: LiteralString = """
SELECT taken, waited_since FROM saga_gate_take(
    %(gate)s, %(kind)s, %(limit)s, %(period)s, %(units)s, %(run_id)s, %(step_key)s,
    %(run_level)s, %(priority)s, %(fair)s, %(ready_at)s)
"""

# Refused by a gate: in line, in Postgres; no message until the gate is handed to it.
THROTTLE_STEP: LiteralString = """
UPDATE saga_steps SET state = 'throttled', due_at = 'infinity'
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state IN ('dispatched', 'pending')
"""

# Slots given back (a step's attempt ended; a run ended or cancelled its open steps) and handed
# to the next waiters, whose steps are dispatched in the same commit.
RELEASE_GATES: LiteralString = """
SELECT run_id, step_key, queue, trace_context
FROM saga_gate_release(%(run_id)s, %(step_key)s, %(dispatch_timeout)s)
"""

# A step's usage as it reported it (a model call's tokens): replaces the estimate its latest
# grant took from the window.
CORRECT_RATE_GRANT: LiteralString = """
UPDATE saga_rate_grants SET units = %(units)s
WHERE ctid = (SELECT ctid FROM saga_rate_grants
              WHERE gate = %(gate)s AND run_id = %(run_id)s AND step_key = %(step_key)s
              ORDER BY at DESC LIMIT 1)
"""

# The other active runs of a run-level gate, oldest first (a new run with on_limit 'refuse' or
# 'cancel_oldest' counts them, under the gate's lock, once it is inserted).
ACTIVE_RUNS_OF_GATE: LiteralString = """
SELECT run_id FROM saga_runs
WHERE run_gate = %(gate)s AND state IN ('running', 'compensating') AND run_id <> %(run_id)s
ORDER BY created_at, run_id
"""

# Set once, by the run's first step with limits.
MARK_RUN_GATED: LiteralString = """
UPDATE saga_runs SET gated = true WHERE run_id = %s AND NOT gated
"""

# Gates whose waiters are due to be looked at: a rate gate's budget freed, a concurrency gate's
# hand-over check (healing a missed one).
DUE_GATES: LiteralString = """
SELECT gate FROM saga_gates WHERE wake_at <= now() ORDER BY wake_at LIMIT %s
"""

LOCK_GATE: LiteralString = """
SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))
"""

GRANT_GATE: LiteralString = """
SELECT run_id, step_key, queue, trace_context FROM saga_gate_grant(%(gate)s, %(dispatch_timeout)s)
"""

# A provider said 429 with Retry-After: the gate grants nothing to anyone until then.
PAUSE_GATE: LiteralString = """
SELECT saga_gate_pause(%(gate)s, %(kind)s, %(limit)s, %(period)s, %(seconds)s)
"""

# A step's input, for its compensation (read only while a run compensates).
SELECT_STEP_INPUT: LiteralString = """
SELECT input FROM saga_steps WHERE run_id = %s AND step_key = %s
"""

SELECT_STEP_SNAPSHOT: LiteralString = """
SELECT s.state, s.attempt, r.state AS run_state, s.step_name, s.kind, s.idempotency_key,
       r.saga_name, r.trace_context, s.options ? 'gates' AS gated, s.fn_ref
FROM saga_steps s JOIN saga_runs r USING (run_id)
WHERE s.run_id = %s AND s.step_key = %s
"""

RENEW_LEASE: LiteralString = """
UPDATE saga_steps SET lease_expires_at = now() + %(lease)s * interval '1 second'
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s
RETURNING 1
"""

# The attempt is over though its outcome is not journaled (its run ended meanwhile): the lease
# ends now, and the sweeper's next pass ends the step (EXPIRE_LEASE) and gives its slots back.
END_LEASE: LiteralString = """
UPDATE saga_steps s SET lease_expires_at = now()
FROM saga_runs r
WHERE s.run_id = %(run_id)s AND s.step_key = %(step_key)s AND s.state = 'running'
  AND s.attempt = %(attempt)s AND r.run_id = s.run_id
  AND r.state NOT IN ('running', 'compensating')
"""

# lease_owner stays: the worker of the step's latest attempt, for its history (0006).
COMPLETE_STEP: LiteralString = """
UPDATE saga_steps
SET state = 'completed', result = %(result)s::jsonb, error = NULL, finished_at = now(),
    completed_seq = nextval('saga_completion_seq'), lease_expires_at = NULL
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s
RETURNING state
"""

# A failed attempt: back to pending until due_at (retry), or failed for good. Actions of a run
# that is no longer running (it is being undone) get no new attempt. A retried attempt is kept
# in saga_attempts (0006) by the same statement: the step row will hold the next one.
FAIL_ATTEMPT: LiteralString = """
WITH ended AS (
    UPDATE saga_steps s
    SET state = CASE WHEN %(retry)s AND (s.kind = 'compensation' OR r.state = 'running')
                     THEN 'pending' ELSE 'failed' END,
        error = %(error)s, due_at = now() + %(delay)s * interval '1 second',
        finished_at = CASE WHEN %(retry)s AND (s.kind = 'compensation' OR r.state = 'running')
                           THEN NULL ELSE now() END,
        lease_expires_at = NULL
    FROM saga_runs r
    WHERE s.run_id = %(run_id)s AND s.step_key = %(step_key)s AND s.state = 'running'
      AND s.attempt = %(attempt)s AND r.run_id = s.run_id
    RETURNING s.run_id, s.step_key, s.attempt, s.state, s.lease_owner, s.attempt_started_at
), kept AS (
    INSERT INTO saga_attempts (run_id, step_key, attempt, worker, claimed_at, outcome,
                               error_type, error_message, traceback)
    SELECT run_id, step_key, attempt, lease_owner, attempt_started_at, %(outcome)s,
           %(error)s::jsonb->>'type', %(error)s::jsonb->>'message',
           %(error)s::jsonb->>'traceback'
    FROM ended WHERE state = 'pending'
)
SELECT state FROM ended
"""

# Run transitions are guarded (WHERE state ...) and raise when no row matched (0003's
# saga_run_transition_refused, SQLSTATE SG001): their results are never read, so the check costs
# no round trip, and the error aborts the transaction at its commit.
FINISH_RUN: LiteralString = """
WITH changed AS (
    UPDATE saga_runs
    SET state = %(state)s, result = %(result)s::jsonb, error = coalesce(%(error)s, error),
        finished_at = now(), updated_at = now()
    WHERE run_id = %(run_id)s AND state IN ('running', 'compensating')
    RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT FROM changed) THEN 1
            ELSE saga_run_transition_refused(%(run_id)s, %(state)s) END
"""

BEGIN_COMPENSATION: LiteralString = """
WITH changed AS (
    UPDATE saga_runs SET state = 'compensating', error = %(error)s, updated_at = now()
    WHERE run_id = %(run_id)s AND state = 'running'
    RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT FROM changed) THEN 1
            ELSE saga_run_transition_refused(%(run_id)s, 'compensating') END
"""

# Steps that have not started stop when the run stops running; running ones finish or time out.
CANCEL_OPEN_STEPS: LiteralString = """
UPDATE saga_steps SET state = 'cancelled', finished_at = now()
WHERE run_id = %s AND kind <> 'compensation'
  AND state IN ('pending', 'dispatched', 'waiting', 'throttled')
"""

# An outside event for a run: completes the oldest step waiting for it, if any.
DELIVER_EVENT: LiteralString = """
UPDATE saga_steps
SET state = 'completed', result = %(payload)s, completed_seq = nextval('saga_completion_seq'),
    finished_at = now(), due_at = now()
WHERE (run_id, step_key) = (
    SELECT run_id, step_key FROM saga_steps
    WHERE run_id = %(run_id)s AND kind = 'event' AND step_name = %(name)s AND state = 'waiting'
    ORDER BY seq LIMIT 1)
RETURNING step_key, created_at
"""

STORE_EVENT: LiteralString = """
INSERT INTO saga_events (run_id, name, payload) VALUES (%s, %s, %s)
"""

CONSUME_EVENT: LiteralString = """
UPDATE saga_events SET consumed_by = %(step_key)s
WHERE id = (SELECT id FROM saga_events WHERE run_id = %(run_id)s AND name = %(name)s
            AND consumed_by IS NULL ORDER BY id LIMIT 1)
RETURNING payload
"""

# Steps whose lease ran out: their worker died or hung. Read without locks; each is then handled
# in its own transaction that takes the run lock first (the same order as outcomes, so no deadlock).
# No index names the lease (a claim and a renewal stay HOT, 0011): a running step keeps the due_at
# it was dispatched with, at most a dispatch timeout after its claim, so an expired lease lies in
# saga_steps_open_due up to now() plus that timeout (``horizon``, the sweeper's own; NULL: every
# open step with a finite due_at, for steps dispatched by a process whose timeout is longer).
SELECT_EXPIRED_LEASES: LiteralString = """
SELECT run_id, step_key, attempt FROM saga_steps
WHERE finished_at IS NULL
  AND due_at < coalesce(now() + %(horizon)s * interval '1 second', 'infinity')
  AND state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %(limit)s
"""

# Out of attempts, or an action of a run being undone (it gets no new attempt): failed. An
# attempt retried after it was lost is kept in saga_attempts (0006), as FAIL_ATTEMPT does.
EXPIRE_LEASE: LiteralString = """
WITH ended AS (
    UPDATE saga_steps
    SET state = CASE WHEN attempt >= max_attempts OR (kind <> 'compensation' AND %(undoing)s)
                     THEN 'failed' ELSE 'pending' END,
        error = %(error)s, due_at = now(), lease_expires_at = NULL,
        finished_at = CASE WHEN attempt >= max_attempts OR (kind <> 'compensation' AND %(undoing)s)
                           THEN now() END
    WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
      AND attempt = %(attempt)s AND lease_expires_at < now()
    RETURNING run_id, step_key, attempt, state, lease_owner, attempt_started_at
), kept AS (
    INSERT INTO saga_attempts (run_id, step_key, attempt, worker, claimed_at, outcome,
                               error_type, error_message)
    SELECT run_id, step_key, attempt, lease_owner, attempt_started_at, 'lost',
           %(error)s::jsonb->>'type', %(error)s::jsonb->>'message'
    FROM ended WHERE state = 'pending'
)
SELECT state FROM ended
"""

# Steps to (re)dispatch: retries and timers whose time has come, event waits that timed out, and
# dispatched steps whose message was not claimed in time (lost with the broker). Each gets a new
# outbox row in the same transaction.
REDISPATCH_DUE: LiteralString = """
WITH due AS (
    SELECT s.run_id, s.step_key FROM saga_steps s JOIN saga_runs r USING (run_id)
    WHERE s.finished_at IS NULL AND s.due_at <= now()
      AND s.state IN ('pending', 'dispatched', 'waiting')
      AND r.state = CASE s.kind WHEN 'compensation' THEN 'compensating' ELSE 'running' END
    ORDER BY s.due_at
    LIMIT %(limit)s
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE saga_steps s
SET state = 'dispatched', due_at = now() + %(dispatch_timeout)s * interval '1 second'
FROM due, saga_runs r
WHERE s.run_id = due.run_id AND s.step_key = due.step_key AND r.run_id = s.run_id
RETURNING s.run_id, s.step_key, r.trace_context, coalesce(s.options->>'queue', r.queue) AS queue
"""

# After a commit whose reply was lost: what it owes goes out with the sweeper's next pass.
MESSAGES_OWED_NOW: LiteralString = """
WITH steps AS (
    UPDATE saga_steps SET due_at = now()
    WHERE run_id = %(run_id)s AND state = 'dispatched' AND due_at > now()
)
UPDATE saga_runs SET advance_due_at = now()
WHERE run_id = %(run_id)s AND advance_due_at > now()
"""

# An advance task is on its way to this run: due again after the dispatch timeout (0005).
ADVANCE_REQUESTED: LiteralString = """
UPDATE saga_runs SET advance_due_at = now() + %(dispatch_timeout)s * interval '1 second'
WHERE run_id = %(run_id)s
"""

# The advance task ran (under the run's lock): nothing is owed any more.
ADVANCE_DONE: LiteralString = """
UPDATE saga_runs SET advance_due_at = NULL WHERE run_id = %s AND advance_due_at IS NOT NULL
"""

# Advance tasks owed for longer than the dispatch timeout, lost with the broker perhaps: sent
# again (a duplicate advance changes nothing), and due again after another timeout.
REDISPATCH_ADVANCES: LiteralString = """
WITH due AS (
    SELECT run_id FROM saga_runs
    WHERE advance_due_at <= now() AND state IN ('running', 'compensating')
    ORDER BY advance_due_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE saga_runs r
SET advance_due_at = now() + %(dispatch_timeout)s * interval '1 second'
FROM due
WHERE r.run_id = due.run_id
RETURNING r.run_id, r.trace_context, r.queue
"""

SELECT_TRACE_CONTEXT: LiteralString = """
SELECT saga_name, trace_context FROM saga_runs WHERE run_id = %s
"""

NEXT_DUE: LiteralString = """
SELECT extract(epoch FROM least(
    (SELECT min(due_at) FROM saga_steps
     WHERE finished_at IS NULL AND state IN ('pending', 'dispatched', 'waiting')),
    (SELECT min(wake_at) FROM saga_gates WHERE wake_at IS NOT NULL)) - now()) AS seconds
"""

SELECT_OVERDUE_RUNS: LiteralString = """
SELECT run_id FROM saga_runs WHERE state = 'running' AND deadline_at < now() LIMIT %s
"""

# Operator retry: failed steps get a fresh set of attempts and are dispatched again; steps the
# failure cancelled before they started are reopened as they were scheduled. The failed attempt
# each reopened step held is kept in saga_attempts first (0006); its outcome as
# saga.failures.attempt_outcome names it.
RETRY_FAILED_STEPS: LiteralString = """
WITH superseded AS (
    INSERT INTO saga_attempts (run_id, step_key, attempt, worker, claimed_at, finished_at,
                               outcome, error_type, error_message, traceback)
    SELECT run_id, step_key, attempt, lease_owner, attempt_started_at,
           coalesce(finished_at, now()),
           CASE WHEN error->>'type' = 'LeaseExpired' THEN 'lost'
                WHEN error->>'type' LIKE '%%.StepTimeoutError' THEN 'timed_out'
                ELSE 'failed' END,
           error->>'type', error->>'message', error->>'traceback'
    FROM saga_steps
    WHERE run_id = %(run_id)s AND kind = ANY(%(kinds)s) AND state = 'failed' AND attempt > 0
    ON CONFLICT (run_id, step_key, attempt) DO NOTHING
)
UPDATE saga_steps
SET state = CASE WHEN state = 'failed' OR kind = 'action' THEN 'dispatched'
                 WHEN kind = 'timer' THEN 'pending' ELSE 'waiting' END,
    max_attempts = CASE WHEN state = 'failed' THEN attempt + max_attempts ELSE max_attempts END,
    error = NULL, finished_at = NULL,
    due_at = CASE WHEN state = 'failed' OR kind = 'action'
                  THEN now() + %(dispatch_timeout)s * interval '1 second' ELSE due_at END
WHERE run_id = %(run_id)s AND kind = ANY(%(kinds)s)
  AND (state = 'failed' OR (state = 'cancelled' AND kind <> 'compensation'))
RETURNING step_key, state, options->>'queue' AS queue
"""

REOPEN_RUN: LiteralString = """
WITH changed AS (
    UPDATE saga_runs
    SET state = %(state)s, error = %(error)s, finished_at = NULL, updated_at = now()
    WHERE run_id = %(run_id)s AND state = ANY(%(from_states)s)
    RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT FROM changed) THEN 1
            ELSE saga_run_transition_refused(%(run_id)s, %(state)s) END
"""

# Fork: a new run with the old run's journal before a step copied as completed. Like any new
# run it takes the forking process's key prefix; ``key_head`` is its keys' beginning
# (saga.keys.idempotency_key with an empty step key).
FORK_RUN: LiteralString = """
WITH forked AS (
    INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, input, trace_context,
                           queue, key_prefix)
    SELECT %(new_run_id)s, saga_name, saga_ref, %(saga_version)s, input, %(trace_context)s,
           queue, %(key_prefix)s
    FROM saga_runs WHERE run_id = %(run_id)s
    RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT FROM forked) THEN 1
            ELSE saga_run_transition_refused(%(run_id)s, 'forked') END
"""

FORK_STEPS: LiteralString = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, position, state, attempt,
                        max_attempts, fn_ref, compensation_ref, options, idempotency_key, input,
                        result, completed_seq, created_at, started_at, attempt_started_at,
                        finished_at)
SELECT %(new_run_id)s, step_key, step_name, kind, seq, position, state, attempt, max_attempts,
       fn_ref, compensation_ref, options, %(key_head)s || step_key, input, result,
       completed_seq, created_at, started_at, attempt_started_at, finished_at
FROM saga_steps
WHERE run_id = %(run_id)s AND state = 'completed' AND kind <> 'compensation'
  AND seq < %(before_seq)s
"""

# A run-level event nothing else records (0006): compensation begun, an operator's action.
RECORD_RUN_EVENT: LiteralString = """
INSERT INTO saga_run_events (run_id, event, actor, detail)
VALUES (%(run_id)s, %(event)s, %(actor)s, %(detail)s)
"""

SELECT_RUN_EVENT_RECORDS: LiteralString = """
SELECT event, actor, detail FROM saga_run_events WHERE run_id = %s ORDER BY id
"""

SELECT_KEPT_ATTEMPTS: LiteralString = """
SELECT step_key, attempt, worker, outcome, error_type FROM saga_attempts
WHERE run_id = %s ORDER BY step_key, attempt
"""

SELECT_STEP_SEQ: LiteralString = """
SELECT seq FROM saga_steps WHERE run_id = %s AND step_key = %s
"""

SELECT_RUN: LiteralString = """
SELECT run_id, saga_name, saga_ref, saga_version, state, input, result, error,
       created_at, updated_at, finished_at
FROM saga_runs WHERE run_id = %s
"""

SELECT_STEPS: LiteralString = """
SELECT step_key, step_name, kind, seq, state, attempt, max_attempts, idempotency_key,
       result, error, created_at, started_at, attempt_started_at, finished_at
FROM saga_steps WHERE run_id = %s ORDER BY seq
"""

SELECT_RESULTS: LiteralString = """
SELECT step_key, result FROM saga_steps
WHERE run_id = %s AND state = 'completed' AND kind = 'action'
ORDER BY seq
"""

# -- gauges (saga.metrics) --------------------------------------------------------------------

OUTBOX_LAG: LiteralString = """
SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS lag_seconds,
       count(*) AS unpublished
FROM saga_outbox WHERE published_at IS NULL
"""

# Active runs only (served by the partial index); final states are counted as they happen by
# the saga.runs.finished counter.
ACTIVE_RUNS: LiteralString = """
SELECT saga_name, state, count(*) AS runs FROM saga_runs
WHERE state IN ('running', 'compensating')
GROUP BY saga_name, state
"""

# Dispatched steps whose message was not claimed within the dispatch timeout (their due_at has
# passed; the sweeper sends them again): served by saga_steps_open_due.
OVERDUE_STEPS: LiteralString = """
SELECT count(*) AS steps FROM saga_steps
WHERE finished_at IS NULL AND due_at <= now() AND state = 'dispatched'
"""

# Runs stopped in compensation_failed, waiting for an operator. No index serves it (final states
# are not indexed): saga.metrics reads it at most once a minute. A partial index ON saga_runs
# (saga_name) WHERE state = 'compensation_failed' would make it cheap at any table size.
COMPENSATION_FAILED_RUNS: LiteralString = """
SELECT saga_name, count(*) AS runs FROM saga_runs
WHERE state = 'compensation_failed'
GROUP BY saga_name
"""

# Per gate (saga.limits, 0010): slots held (concurrency) or units granted in the window (rate),
# and steps in line. One row per gate in use: as many as limit keys.
GATE_USAGE: LiteralString = """
SELECT g.gate,
       CASE WHEN g.kind = 'concurrency' THEN saga_gate_held(g.gate)
            ELSE saga_rate_used(g.gate, g.period) END AS in_use,
       (SELECT count(*) FROM saga_gate_slots s
        WHERE s.gate = g.gate AND s.state = 'waiting') AS waiting
FROM saga_gates g
"""

# Workers whose heart beat within their lease, per queue.
LIVE_WORKERS: LiteralString = """
SELECT queue, count(*) AS workers FROM saga_workers, unnest(queues) AS queue
WHERE seen_at >= now() - silence_seconds * interval '1 second'
GROUP BY queue
"""

# -- schema migrations (saga.migrate) ---------------------------------------------------------

# The advisory lock that serialises migrations of one database (an arbitrary constant).
MIGRATION_LOCK_KEY = 0x5A6A_0001

LOCK_MIGRATIONS: LiteralString = """
SELECT pg_advisory_xact_lock(%s)
"""

# Held by one migrating session for all its files (each still in its own transaction): the
# first process applies every pending version, the others wait and find nothing to do.
LOCK_MIGRATING_SESSION: LiteralString = """
SELECT pg_advisory_lock(%s)
"""

UNLOCK_MIGRATING_SESSION: LiteralString = """
SELECT pg_advisory_unlock(%s)
"""

CREATE_VERSION_TABLE: LiteralString = """
CREATE TABLE IF NOT EXISTS saga_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,      -- sha256 of the file: an applied migration must not change
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

VERSION_TABLE_EXISTS: LiteralString = """
SELECT to_regclass('saga_schema_migrations') IS NOT NULL AS present
"""

# Migrations after the one that made the roles (0007) run as saga_migrator when the migrating
# user may act as it: what they create is the migrator's, and its default privileges grant it to
# saga_engine and saga_readonly. SET LOCAL: the role ends with the migration's transaction.
ACT_AS_MIGRATOR: LiteralString = """
SELECT set_config('role', 'saga_migrator', true)
WHERE CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = 'saga_migrator')
           THEN pg_has_role(current_user, 'saga_migrator', 'MEMBER') ELSE false END
"""

SELECT_APPLIED_MIGRATIONS: LiteralString = """
SELECT version, checksum FROM saga_schema_migrations
"""

RECORD_MIGRATION: LiteralString = """
INSERT INTO saga_schema_migrations (version, name, checksum) VALUES (%s, %s, %s)
"""


# -- the worker registry (0004): live workers, and the unclaimed steps of dead ones ----------

# Registering and beating are one statement: a worker taken for dead by mistake (its beats
# held up by a long Postgres outage) is back on its next beat.
WORKER_HEARTBEAT: LiteralString = """
INSERT INTO saga_workers (owner, queues, silence_seconds)
VALUES (%(owner)s, %(queues)s, %(silence)s)
ON CONFLICT (owner) DO UPDATE SET seen_at = now()
"""

DEREGISTER_WORKER: LiteralString = """
DELETE FROM saga_workers WHERE owner = %s
"""

# Workers whose heart stopped (each by its own lease), removed; the queues they consumed.
REMOVE_DEAD_WORKERS: LiteralString = """
DELETE FROM saga_workers WHERE seen_at < now() - silence_seconds * interval '1 second'
RETURNING owner, queues
"""

# Dispatched steps of those queues not yet due again: due now, so the sweep dispatches them
# again. One of them may be the message the dead worker took and never claimed.
RECOVER_UNCLAIMED: LiteralString = """
UPDATE saga_steps s SET due_at = now()
FROM saga_runs r
WHERE r.run_id = s.run_id AND s.finished_at IS NULL AND s.due_at > now()
  AND s.state = 'dispatched'
  AND coalesce(s.options->>'queue', r.queue, %(default_queue)s) = ANY(%(queues)s)
"""


# -- operators' reads (saga.runs_view, migration 0006) -----------------------------------------

# The filters of a runs list. A filter left NULL (or an empty state list) folds away when the
# statement is planned with its values (psycopg sends unnamed statements; RunsView never
# prepares), so each list walks the one index its filters name (0006) in (created_at, run_id)
# order, from the keyset cursor on: no page counts or skips rows.
_STATE_FILTER: LiteralString = """
WHERE (cardinality(%(states)s::text[]) = 0 OR state = ANY(%(states)s::text[]))
"""

_OTHER_FILTERS: LiteralString = """
  AND (%(saga)s::text IS NULL OR saga_name = %(saga)s::text)
  AND (%(created_since)s::timestamptz IS NULL OR created_at >= %(created_since)s::timestamptz)
  AND (%(created_until)s::timestamptz IS NULL OR created_at < %(created_until)s::timestamptz)
  AND (%(finished_since)s::timestamptz IS NULL
       OR finished_at >= %(finished_since)s::timestamptz)
  AND (%(finished_until)s::timestamptz IS NULL
       OR finished_at < %(finished_until)s::timestamptz)
  AND (%(error_type)s::text IS NULL
       OR (error IS NOT NULL AND error->>'type' = %(error_type)s::text))
  AND (%(run_id_like)s::text IS NULL OR run_id LIKE %(run_id_like)s::text)
"""

_RUN_FILTERS: LiteralString = _STATE_FILTER + _OTHER_FILTERS

_RUN_LIST_COLUMNS: LiteralString = """
SELECT run_id, saga_name AS saga, state, created_at, updated_at, finished_at,
       error->>'type' AS error_type, error->>'message' AS error_message
FROM saga_runs
"""


# A page in one of three orders, each walked along its index from the keyset cursor
# (%(after_time)s, %(after_id)s) on. The order follows the most selective filter, so that
# a page never scans past runs that do not match: created_at by default, finished_at when a
# finished window is asked for, the run id when a run id prefix is.
def _page(after: LiteralString, order: LiteralString) -> LiteralString:
    return _RUN_LIST_COLUMNS + _RUN_FILTERS + after + order + "LIMIT %(limit)s\n"


def _by_state(newest: bool, at: LiteralString) -> LiteralString:
    """Runs by creation (``at`` = created_at) or finish time (finished_at): one branch per
    state, each walking that state's range of saga_runs_state_created (0006) or
    saga_runs_finished (0009, finished runs only) from the cursor on, merged in order (Merge
    Append). A state the filter leaves out folds to an empty branch. No index on the time alone
    is needed, nor written for every run."""
    cmp: LiteralString = "<" if newest else ">"
    order: LiteralString = at + (" DESC, run_id DESC" if newest else ", run_id")
    branches: list[LiteralString] = []
    for state in _RUN_STATES:
        branches.append(
            "(" + _RUN_LIST_COLUMNS + "WHERE state = '" + state + "' AND " + at + " IS NOT NULL\n"
            "  AND (cardinality(%(states)s::text[]) = 0 OR '"
            + state
            + "' = ANY(%(states)s::text[]))"
            + _OTHER_FILTERS
            + "  AND (%(after_time)s::timestamptz IS NULL\n"
            "       OR ("
            + at
            + ", run_id) "
            + cmp
            + " (%(after_time)s::timestamptz, %(after_id)s::text))\n"
            "ORDER BY " + order + "\nLIMIT %(limit)s)\n"
        )
    return (
        "SELECT * FROM (\n"
        + "UNION ALL\n".join(branches)
        + ") AS runs\nORDER BY "
        + order
        + "\nLIMIT %(limit)s\n"
    )


# saga.states.RunState, spelled as SQL literals (tests/unit/test_states.py checks them).
_RUN_STATES: tuple[LiteralString, ...] = (
    "running",
    "compensating",
    "completed",
    "compensated",
    "failed",
    "compensation_failed",
    "cancelled",
)

LIST_RUNS: dict[tuple[str, bool], LiteralString] = {
    ("created", True): _by_state(True, "created_at"),
    ("created", False): _by_state(False, "created_at"),
    ("finished", True): _by_state(True, "finished_at"),
    ("finished", False): _by_state(False, "finished_at"),
    # ~<~ and ~>~ compare byte-wise, as the text_pattern_ops index that serves LIKE orders.
    ("run_id", True): _page(
        "  AND (%(after_id)s::text IS NULL OR run_id ~<~ %(after_id)s::text)\n",
        "ORDER BY run_id USING ~>~\n",
    ),
    ("run_id", False): _page(
        "  AND (%(after_id)s::text IS NULL OR run_id ~>~ %(after_id)s::text)\n",
        "ORDER BY run_id USING ~<~\n",
    ),
}

# Runs in one state (%(state)s, a value when planned, so the best index for that state is
# chosen), the count stopped at %(cap)s rows: at most that many index entries per state,
# whatever the table's size. RunsView sends one per state in a single round trip.
COUNT_RUNS_IN_STATE: LiteralString = (
    """
SELECT count(*) AS runs FROM (
    SELECT 1 FROM saga_runs
"""
    + _RUN_FILTERS
    + """
      AND state = %(state)s::text
    LIMIT %(cap)s) AS capped
"""
)

SELECT_RUN_DETAIL: LiteralString = """
SELECT run_id, saga_name, saga_ref, saga_version, state, input, result, error, trace_context,
       queue, deadline_at, created_at, updated_at, finished_at
FROM saga_runs WHERE run_id = %s
"""

SELECT_STEP_DETAILS: LiteralString = """
SELECT step_key, step_name, kind, seq, position, state, attempt, max_attempts, idempotency_key,
       input, result, error, lease_owner, created_at, started_at, attempt_started_at, finished_at,
       -- an open step's next dispatch; a wait without a timeout waits until 'infinity'
       CASE WHEN state IN ('pending', 'dispatched', 'waiting') THEN nullif(due_at, 'infinity')
       END AS due_at,
       options->'gates' AS gates  -- its limits, as scheduled (saga.limits, 0010)
FROM saga_steps WHERE run_id = %s ORDER BY seq
"""

# The run's places at its gates (0010): slots its steps (or the run) hold, and its throttled
# steps' places in line. place: waiters ahead by priority, then age, plus one (the grant also
# goes round-robin between fairness keys, so it is where the step stands, not a promise).
# in_use: slots held (concurrency) or units granted in the window (rate). Read-only.
SELECT_RUN_GATES: LiteralString = """
SELECT s.step_key, s.gate, s.state, s.run_level, s.priority, s.units, s.since,
       g.kind, g.lim, g.period,
       CASE WHEN g.paused_until > now() THEN g.paused_until END AS paused_until,
       CASE WHEN s.state = 'waiting' THEN 1 + (
           SELECT count(*) FROM saga_gate_slots o
           WHERE o.gate = s.gate AND o.state = 'waiting'
             AND (o.priority > s.priority OR o.priority = s.priority AND o.since < s.since))
       END AS place,
       (SELECT count(*) FROM saga_gate_slots o
        WHERE o.gate = s.gate AND o.state = 'waiting') AS in_line,
       CASE WHEN g.kind = 'concurrency' THEN saga_gate_held(s.gate)
            WHEN g.kind = 'rate' THEN saga_rate_used(s.gate, g.period) END AS in_use
FROM saga_gate_slots s LEFT JOIN saga_gates g ON g.gate = s.gate
WHERE s.run_id = %s ORDER BY s.step_key, s.gate
"""

SELECT_ATTEMPTS: LiteralString = """
SELECT step_key, attempt, worker, claimed_at, finished_at, outcome, error_type, error_message,
       traceback
FROM saga_attempts WHERE run_id = %s ORDER BY step_key, attempt
"""

SELECT_RUN_EVENTS: LiteralString = """
SELECT event, actor, detail, at FROM saga_run_events WHERE run_id = %s ORDER BY id
"""

# Events sent before the run waited for them, kept until a wait consumes them.
SELECT_KEPT_EVENTS: LiteralString = """
SELECT name, payload, created_at FROM saga_events
WHERE run_id = %s AND consumed_by IS NULL ORDER BY id
"""

# -- retention (saga.retention, migration 0009) -----------------------------------------------

# One batch of finished runs of one state older than its retention, deleted with their steps,
# events and history (ON DELETE CASCADE). The runs are locked first and locked ones skipped: a
# run an operator is retrying, or a late outcome is touching, is left for the next pass, and no
# worker waits on a pruning transaction for more than one short batch. The state is checked
# again against the final states: a run that is not finished is never deleted, whatever the
# caller passes. A run reopened after the snapshot (failed -> running) is re-checked under the
# lock by Postgres and left alone.
PRUNE_RUNS: LiteralString = """
DELETE FROM saga_runs WHERE run_id IN (
    SELECT run_id FROM saga_runs
    WHERE state = %(state)s
      AND state IN ('completed', 'compensated', 'failed', 'compensation_failed', 'cancelled')
      AND finished_at < now() - %(seconds)s * interval '1 second'
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
"""

# What PRUNE_RUNS would delete now, for ``saga prune --dry-run``: runs and their steps.
COUNT_PRUNABLE: LiteralString = """
WITH doomed AS (
    SELECT run_id FROM saga_runs
    WHERE state = %(state)s
      AND state IN ('completed', 'compensated', 'failed', 'compensation_failed', 'cancelled')
      AND finished_at < now() - %(seconds)s * interval '1 second'
)
SELECT (SELECT count(*) FROM doomed) AS runs,
       (SELECT count(*) FROM saga_steps JOIN doomed USING (run_id)) AS steps
"""
