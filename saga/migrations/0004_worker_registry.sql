-- The worker processes that are alive, each beating its heart every third of a lease. A worker
-- killed after the broker handed it a step's message, and before it claimed the step, leaves
-- that message unacknowledged in the broker (Redis returns it only after its visibility
-- timeout, an hour by default). When a worker's heart stops, the sweeper re-dispatches the
-- unclaimed steps of its queues at once instead of after the dispatch timeout. Duplicates are
-- harmless: the claim fences them.
CREATE TABLE saga_workers (
    owner       text PRIMARY KEY,               -- host:pid:boot, as saga_steps.lease_owner starts
    queues      text[] NOT NULL,
    silence_seconds double precision NOT NULL,  -- its lease: silent that long, it is dead
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);
