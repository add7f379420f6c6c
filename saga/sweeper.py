"""Recovery: re-dispatches steps whose lease expired, whose retry time came, or whose message
was lost. Runs in the relay process; several may run (SKIP LOCKED)."""

from __future__ import annotations

import logging

from saga import tracing
from saga.coordinator import step_message
from saga.errors import StoreError
from saga.store import PostgresStore

log = logging.getLogger("saga.sweeper")


class Sweeper:
    def __init__(self, store: PostgresStore, queue: str, *, max_wait: float = 5.0) -> None:
        self._store = store
        self._queue = queue
        self._max_wait = max_wait

    def tick(self) -> float | None:
        """One pass; returns the seconds until the next step falls due (capped)."""
        for run_id, step_key, state in self._store.expire_leases():
            log.warning("step %r of run %r lost its worker; now %s", step_key, run_id, state)
            try:
                if tracing.enabled():
                    self._trace_lost_attempt(run_id, step_key)
                if state == "failed":  # out of attempts: expire_leases failed the run
                    self._trace_failed_run(run_id, step_key)
            except StoreError as exc:
                log.warning("could not trace the lost attempt of run %r: %s", run_id, exc)
        dispatched = self._store.redispatch_due(
            lambda run_id, step_key, trace: step_message(self._queue, run_id, step_key, trace)
        )
        if dispatched:
            log.info("dispatched %d due steps (retries or lost messages)", dispatched)
        nxt = self._store.seconds_until_next_due()
        return self._max_wait if nxt is None else min(nxt, self._max_wait)

    def _trace_lost_attempt(self, run_id: str, step_key: str) -> None:
        found = self._store.trace_context(run_id)
        step = next((s for s in self._store.get_steps(run_id) if s.step_key == step_key), None)
        if found is None or step is None or step.attempt_started_at is None:
            return
        if step.state not in ("pending", "failed"):
            return  # already claimed again: the lost attempt's start time is overwritten
        tracing.lost_attempt(
            found[1],
            saga_name=found[0],
            run_id=run_id,
            step=step.step_name,
            attempt=step.attempt,
            idempotency_key=step.idempotency_key,
            started=step.attempt_started_at,
            compensation=step.kind == "compensation",
        )

    def _trace_failed_run(self, run_id: str, step_key: str) -> None:
        found = self._store.trace_context(run_id)
        if found is not None:
            tracing.run_finished(
                found[1],
                saga_name=found[0],
                run_id=run_id,
                state="failed",
                error={
                    "type": "LeaseExpired",
                    "message": f"step {step_key!r} lost its worker on its last attempt",
                },
            )
