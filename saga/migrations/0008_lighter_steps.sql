-- Less written per step (issue 15). Every index on saga_steps takes an entry for each new row
-- version: the insert, the claim and the outcome each. Two uniqueness checks paid for that
-- without protecting anything:
--   * idempotency_key: "<run_id>:<step_key>" (or a fixed function of them), so the primary key
--     (run_id, step_key) already makes it unique; nothing looks a step up by it.
--   * (run_id, seq): seq is numbered under the run's row lock (max(seq) + 1); journal reads go
--     by run_id through the primary key and sort a run's few rows.
-- Dropping both takes 6 of the 17 index entries a step wrote.
ALTER TABLE saga_steps DROP CONSTRAINT IF EXISTS saga_steps_idempotency_key_key;
ALTER TABLE saga_steps DROP CONSTRAINT IF EXISTS saga_steps_run_id_seq_key;
