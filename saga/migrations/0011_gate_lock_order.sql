-- Gates are locked in one order by every transaction that takes more than one: a run's own
-- gate first, then its step's concurrency gate, then rate gates ('c:' sorts before 'r:'), each
-- by name (saga.limits.gates_of, as a claim takes them). 0010's saga_gate_release locked the
-- gates it freed by name alone: the end of a run whose step gate's name sorted before its run
-- gate's deadlocked with a claim holding the run gate and asking for the step's.
--
-- A step's place in line for its run's gate (a run-level 'waiting' row) goes, like any other
-- place, once its step no longer waits: 0010 kept it (only a run-level 'held' row was looked
-- at), a phantom waiter until a later hand-over came across it.

CREATE OR REPLACE FUNCTION saga_gate_release(p_run_id text, p_step_key text, p_dispatch_timeout float8)
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
