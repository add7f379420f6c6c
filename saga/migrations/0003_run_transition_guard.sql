-- A run transition that matches no row raises inside its statement instead of returning no
-- row. The store sends run transitions in pipeline mode without reading their results (reading
-- one would cost a round trip), so the check has to abort the transaction on the server. The
-- error reaches the client at the commit's Sync; the store raises RunTransitionError for this
-- SQLSTATE.
CREATE FUNCTION saga_run_transition_refused(p_run_id text, p_wanted text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    current_state text;
BEGIN
    SELECT state INTO current_state FROM saga_runs WHERE run_id = p_run_id;
    RAISE EXCEPTION USING
        ERRCODE = 'SG001',
        MESSAGE = format('run %L is %s; it cannot become %s', p_run_id,
                         coalesce(current_state, 'missing'), p_wanted),
        HINT = '`saga show <run id>` shows the run; nothing of this change was written';
END;
$$;
