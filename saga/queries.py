"""Every SQL statement the saga store runs, by name. Call sites never build SQL."""

INSERT_RUN = """
INSERT INTO saga_runs (run_id, saga_name, saga_ref, saga_version, input, trace_context)
VALUES (%(run_id)s, %(saga_name)s, %(saga_ref)s, %(saga_version)s, %(input)s::jsonb,
        %(trace_context)s)
ON CONFLICT (run_id) DO NOTHING
RETURNING run_id
"""

SELECT_RUN_IDENTITY = """
SELECT saga_name, input FROM saga_runs WHERE run_id = %s
"""

# A new step, numbered after the run's last. Callers hold the run's row lock, so seq is safe.
INSERT_STEP = """
INSERT INTO saga_steps (run_id, step_key, step_name, kind, seq, state, max_attempts,
                        idempotency_key, input, due_at)
VALUES (%(run_id)s, %(step_key)s, %(step_name)s, %(kind)s,
        (SELECT coalesce(max(seq), 0) + 1 FROM saga_steps WHERE run_id = %(run_id)s),
        'dispatched', %(max_attempts)s, %(idempotency_key)s, %(input)s::jsonb,
        now() + %(dispatch_timeout)s * interval '1 second')
ON CONFLICT (run_id, step_key) DO NOTHING
RETURNING seq
"""

# Claim for one attempt: the fencing token (attempt) goes up by one. Only a dispatched step, or a
# pending one whose retry time has come, can be claimed; a running, completed or failed one cannot,
# except by the same delivery retrying a claim whose reply it lost (same owner token).
CLAIM_STEP = """
UPDATE saga_steps s
SET state = 'running', attempt = s.attempt + 1, lease_owner = %(owner)s,
    lease_expires_at = now() + %(lease)s * interval '1 second',
    started_at = coalesce(s.started_at, now()), attempt_started_at = now()
FROM saga_runs r
WHERE s.run_id = %(run_id)s AND s.step_key = %(step_key)s AND r.run_id = s.run_id
  AND r.state = CASE s.kind WHEN 'action' THEN 'running' ELSE 'compensating' END
  AND (s.state = 'dispatched' OR (s.state = 'pending' AND s.due_at <= now())
       OR (s.state = 'running' AND s.lease_owner = %(owner)s))
RETURNING s.attempt, s.step_name, s.kind, s.max_attempts, s.idempotency_key, s.input,
          r.input, r.saga_ref, r.saga_name, r.trace_context
"""

SELECT_STEP_STATE = """
SELECT s.state, s.attempt, r.state FROM saga_steps s JOIN saga_runs r USING (run_id)
WHERE s.run_id = %s AND s.step_key = %s
"""

RENEW_LEASE = """
UPDATE saga_steps SET lease_expires_at = now() + %(lease)s * interval '1 second'
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s
RETURNING 1
"""

# Taken first in every outcome transaction: serialises the outcomes of one run's steps.
LOCK_RUN = """
SELECT state FROM saga_runs WHERE run_id = %s FOR UPDATE
"""

COMPLETE_STEP = """
UPDATE saga_steps
SET state = 'completed', result = %(result)s::jsonb, error = NULL, finished_at = now(),
    completed_seq = nextval('saga_completion_seq'), lease_owner = NULL, lease_expires_at = NULL
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s
RETURNING 1
"""

# A failed attempt: back to pending until due_at (retry), or failed for good.
FAIL_ATTEMPT = """
UPDATE saga_steps
SET state = CASE WHEN %(retry)s THEN 'pending' ELSE 'failed' END,
    error = %(error)s, due_at = now() + %(delay)s * interval '1 second',
    finished_at = CASE WHEN %(retry)s THEN NULL ELSE now() END,
    lease_owner = NULL, lease_expires_at = NULL
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s
RETURNING 1
"""

FINISH_RUN = """
UPDATE saga_runs
SET state = %(state)s, result = %(result)s::jsonb, error = %(error)s, finished_at = now(),
    updated_at = now()
WHERE run_id = %(run_id)s AND state = ANY(%(from_states)s)
RETURNING 1
"""

TOUCH_RUN = """
UPDATE saga_runs SET updated_at = now() WHERE run_id = %s
"""

CANCEL_OPEN_STEPS = """
UPDATE saga_steps SET state = 'cancelled', finished_at = now()
WHERE run_id = %s AND state IN ('pending', 'dispatched')
"""

# Steps whose lease ran out: their worker died or hung. Read without locks; each is then handled
# in its own transaction that takes the run lock first (the same order as outcomes, so no deadlock).
SELECT_EXPIRED_LEASES = """
SELECT run_id, step_key, attempt FROM saga_steps
WHERE state = 'running' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %s
"""

EXPIRE_LEASE = """
UPDATE saga_steps
SET state = CASE WHEN attempt >= max_attempts THEN 'failed' ELSE 'pending' END,
    error = %(error)s, due_at = now(), lease_owner = NULL, lease_expires_at = NULL,
    finished_at = CASE WHEN attempt >= max_attempts THEN now() END
WHERE run_id = %(run_id)s AND step_key = %(step_key)s AND state = 'running'
  AND attempt = %(attempt)s AND lease_expires_at < now()
RETURNING state
"""

# Steps to (re)dispatch: retries whose time has come, and dispatched steps whose message was not
# claimed in time (lost with the broker). Each gets a new outbox row in the same transaction.
REDISPATCH_DUE = """
WITH due AS (
    SELECT s.run_id, s.step_key FROM saga_steps s JOIN saga_runs r USING (run_id)
    WHERE s.state IN ('pending', 'dispatched') AND s.due_at <= now()
      AND r.state IN ('running', 'compensating')
    ORDER BY s.due_at
    LIMIT %(limit)s
    FOR UPDATE OF s SKIP LOCKED
)
UPDATE saga_steps s
SET state = 'dispatched', due_at = now() + %(dispatch_timeout)s * interval '1 second'
FROM due, saga_runs r
WHERE s.run_id = due.run_id AND s.step_key = due.step_key AND r.run_id = s.run_id
RETURNING s.run_id, s.step_key, r.trace_context
"""

SELECT_TRACE_CONTEXT = """
SELECT saga_name, trace_context FROM saga_runs WHERE run_id = %s
"""

NEXT_DUE = """
SELECT extract(epoch FROM min(due_at) - now()) FROM saga_steps
WHERE state IN ('pending', 'dispatched')
"""

SELECT_RUN = """
SELECT run_id, saga_name, saga_ref, saga_version, state, input, result, error,
       created_at, updated_at, finished_at
FROM saga_runs WHERE run_id = %s
"""

SELECT_STEPS = """
SELECT step_key, step_name, kind, seq, state, attempt, max_attempts, idempotency_key,
       result, error, created_at, started_at, attempt_started_at, finished_at
FROM saga_steps WHERE run_id = %s ORDER BY seq
"""

SELECT_RESULTS = """
SELECT step_name, result FROM saga_steps
WHERE run_id = %s AND state = 'completed' AND kind = 'action'
ORDER BY seq
"""
