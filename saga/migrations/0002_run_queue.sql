-- The broker queue a run's steps go to, chosen when the run starts. Whoever dispatches one of
-- its steps later (a worker of another queue, the sweeper, an operator's CLI) sends it there.
-- NULL for runs started before this column existed: they keep the dispatching process's queue.
ALTER TABLE saga_runs ADD COLUMN queue text;
