"""Recovery: re-dispatches steps whose lease expired, whose retry or timer time came, whose event
wait timed out, or whose message was lost; stops runs past their deadline. Runs in the relay
process and needs no saga definitions; several may run (SKIP LOCKED, run locks)."""

from __future__ import annotations

import functools
import logging
import time

from saga import coordinator, tracing
from saga.errors import SagaError, StoreError
from saga.failures import ErrorType, error_record
from saga.states import RunEventType, StepKind, StepState
from saga.store import PostgresStore

log = logging.getLogger("saga.sweeper")


class Sweeper:
    def __init__(
        self,
        store: PostgresStore,
        *,
        max_wait: float = 5.0,
        worker_check_every: float = 10.0,
        lease_check_every: float = 1.0,
        wide_lease_check_every: float = 30.0,
    ) -> None:
        self._store = store
        self._max_wait = max_wait
        self._worker_check_every = worker_check_every
        self._next_worker_check = 0.0
        self._lease_check_every = lease_check_every
        self._next_lease_check = 0.0
        self._wide_lease_check_every = wide_lease_check_every
        self._next_wide_lease_check = 0.0

    def tick(self) -> float | None:
        """One pass; returns the seconds until the next step falls due (capped)."""
        # Workers beat every third of a lease: looking more often finds nothing new, and a relay
        # woken by every commit would pay a statement each time.
        if time.monotonic() >= self._next_worker_check:
            self._next_worker_check = time.monotonic() + self._worker_check_every
            for owner in self._store.recover_dead_workers():
                log.warning("worker %s stopped beating: its queues' steps go again", owner)
        for run_id, step_key, state in self._expired_leases():
            log.warning("step %r of run %r lost its worker; now %s", step_key, run_id, state)
            try:
                if tracing.enabled():
                    self._trace_lost_attempt(run_id, step_key)
            except StoreError as exc:
                log.warning("could not trace the lost attempt of run %r: %s", run_id, exc)
        for run_id in self._store.overdue_runs():
            error = error_record(ErrorType.RUN_TIMEOUT, f"run {run_id!r} passed its deadline")
            try:
                self._store.stop_run(
                    run_id,
                    functools.partial(coordinator.stop, error=error),
                    event=RunEventType.DEADLINE_PASSED,
                )
                log.warning("run %r passed its deadline; stopped", run_id)
            except SagaError as exc:  # finished meanwhile
                log.info("run %r not stopped: %s", run_id, exc)
        woken = self._store.wake_gates()
        if woken:
            log.info("handed %d steps waiting in line their limits' slots or budget", woken)
        dispatched = self._store.redispatch_due()
        if dispatched:
            log.info(
                "dispatched %d due steps and advances (retries, timers, timeouts, lost messages)",
                dispatched,
            )
        nxt = self._store.seconds_until_next_due()
        return self._max_wait if nxt is None else min(nxt, self._max_wait)

    def _expired_leases(self) -> list[tuple[str, str, str]]:
        # Expired leases are found among the open steps dispatched within a dispatch timeout
        # (0011: no index of their own), a range that holds every queued step: a relay woken by
        # every commit looks at most once a second, and at every open step now and then, for
        # steps dispatched by a process with a longer timeout than this one's.
        now = time.monotonic()
        if now < self._next_lease_check:
            return []
        self._next_lease_check = now + self._lease_check_every
        wide = now >= self._next_wide_lease_check
        if wide:
            self._next_wide_lease_check = now + self._wide_lease_check_every
        return self._store.expire_leases(all_open=wide)

    def _trace_lost_attempt(self, run_id: str, step_key: str) -> None:
        found = self._store.trace_context(run_id)
        step = next((s for s in self._store.get_steps(run_id) if s.step_key == step_key), None)
        if found is None or step is None or step.attempt_started_at is None:
            return
        if step.state not in (StepState.PENDING, StepState.FAILED):
            return  # already claimed again: the lost attempt's start time is overwritten
        tracing.lost_attempt(
            found[1],
            saga_name=found[0],
            run_id=run_id,
            step=step.step_name,
            attempt=step.attempt,
            idempotency_key=step.idempotency_key,
            started=step.attempt_started_at,
            compensation=step.kind == StepKind.COMPENSATION,
        )
