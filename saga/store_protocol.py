"""The store as the code that drives the coordinator sees it: what the client, the workers and
the sweeper call. ``PostgresStore`` is the store; ``tests/unit/memory_run.MemoryStore`` is its
in-memory twin, and ``tests/contract/test_store_contract.py`` runs the same cases on both."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from saga.coordinator import RunTx
from saga.outbox.message import OutboxMessage
from saga.records import Claim, KeptAttempt, RunEventRecord, RunRecord, StepRecord
from saga.states import RunEventType

# What a store runs inside a run's transaction: coordinator.advance, coordinator.stop, ...
Decide = Callable[[RunTx], None]


class Store(Protocol):
    def create_run(
        self,
        *,
        run_id: str,
        saga_name: str,
        saga_ref: str,
        saga_version: str,
        input_json: str,
        trace_context: Mapping[str, str],
        timeout: float | None,
        start: Decide,
        fast_path: list[OutboxMessage] | None = None,
        priority: int = 0,
        run_gate: Mapping[str, Any] | None = None,
        replaced: list[str] | None = None,
    ) -> bool:
        """Create the run and let ``start`` schedule its first steps, in one transaction;
        False if it exists already with the same saga and input."""
        ...

    def claim_step(
        self,
        run_id: str,
        step_key: str,
        *,
        owner: str,
        lease: float,
    ) -> Claim | None:
        """One attempt of the step (its number is the fencing token), or None if the step is
        not claimable now."""
        ...

    def complete_step(
        self,
        claim: Claim,
        result_json: str,
        advance: Decide,
        *,
        fast_path: bool,
        read_journal: bool = False,
        usage: Mapping[str, int] | None = None,
    ) -> list[OutboxMessage]:
        """Journal the result and what ``advance`` decides, together; Fenced if the attempt
        no longer owns its step."""
        ...

    def fail_attempt(
        self,
        claim: Claim,
        error: Mapping[str, Any],
        *,
        retry_in: float | None,
        advance: Decide,
        fast_path: bool = False,
        read_journal: bool = False,
    ) -> list[OutboxMessage]:
        """A failed attempt: retried after ``retry_in`` seconds, or (None) failed for good and
        the run advanced."""
        ...

    def expire_leases(
        self, limit: int = 100, *, all_open: bool = False
    ) -> list[tuple[str, str, str]]:
        """Attempts whose lease ran out: (run_id, step_key, new state) of each. ``all_open``
        looks beyond the steps dispatched within this process's dispatch timeout."""
        ...

    def redispatch_due(self, limit: int = 500) -> int:
        """Dispatch the open steps whose time has come; returns how many."""
        ...

    def advance_run(self, run_id: str, advance: Decide) -> None: ...

    # Operator actions are recorded in the run's history with ``actor`` (run_events).

    def send_event(self, run_id: str, name: str, payload: Any, *, actor: str | None = None) -> bool:
        """True: it completed the step waiting for it; False: it is kept for a later wait."""
        ...

    def stop_run(
        self,
        run_id: str,
        stop: Decide,
        *,
        actor: str | None = None,
        event: RunEventType = RunEventType.CANCEL,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Run ``stop`` on a running run (cancel, or out of time); OperatorError otherwise."""
        ...

    def retry_run(self, run_id: str, *, actor: str | None = None) -> None:
        """Operator retry of a failed (or compensation_failed) run; OperatorError otherwise."""
        ...

    def worker_heartbeat(self, owner: str, queues: Sequence[str], silence: float) -> None:
        """Register (at the first beat) or keep alive a worker; silent ``silence`` s: dead."""
        ...

    def deregister_worker(self, owner: str) -> None: ...

    def recover_dead_workers(self) -> list[str]:
        """Remove the workers silent longer than their own limit; make the unclaimed steps of
        their queues due now (a dead worker may have taken one's message). Returns them."""
        ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def get_steps(self, run_id: str) -> list[StepRecord]: ...

    def run_events(self, run_id: str) -> list[RunEventRecord]:
        """The run-level events recorded (compensation begun, operators' actions), in order."""
        ...

    def kept_attempts(self, run_id: str) -> list[KeptAttempt]:
        """Attempts that did not end their step (retried after a failure or a lost lease,
        superseded by an operator's retry), by step key and attempt."""
        ...
