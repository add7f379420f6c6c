"""Retention: finished runs are deleted, with their steps, events and history, once they have been
finished for longer than their state's setting (``SAGA_RETENTION_<STATE>_SECONDS``; unset keeps
that state forever). Run by the relay every ``retention_interval_seconds`` and by ``saga prune``.

Deletion goes in small batches, each one short statement that locks its runs with ``SKIP
LOCKED``: workers never wait on it for longer than one batch, a run someone else holds is left
for the next pass, and several relays prune side by side. Steps, events and the run history
tables go with their run through their foreign keys (``ON DELETE CASCADE``): this module names
only ``saga_runs``. A run that is not finished is never deleted (``queries.PRUNE_RUNS``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row

from saga import queries as q
from saga.errors import StoreError
from saga.run_transaction import translated
from saga.settings import Settings
from saga.states import RunState

log = logging.getLogger("saga.retention")

# The states that may be pruned, each with its setting. Running and compensating runs have none.
SETTING_OF_STATE: dict[RunState, str] = {
    RunState.COMPLETED: "retention_completed_seconds",
    RunState.COMPENSATED: "retention_compensated_seconds",
    RunState.CANCELLED: "retention_cancelled_seconds",
    RunState.FAILED: "retention_failed_seconds",
    RunState.COMPENSATION_FAILED: "retention_compensation_failed_seconds",
}


def policy(settings: Settings) -> dict[RunState, float]:
    """The states to prune and how long each is kept after it finished; unset states are kept."""
    ages = {state: getattr(settings, name) for state, name in SETTING_OF_STATE.items()}
    return {state: float(age) for state, age in ages.items() if age is not None}


@dataclass
class PruneReport:
    """What one pass deleted (or, dry, would delete), by run state."""

    dry_run: bool
    policy: dict[str, float]
    runs: dict[str, int] = field(default_factory=dict)
    steps: dict[str, int] | None = None  # counted by a dry run only (a cascade returns no count)
    complete: bool = True  # False when the pass stopped at its time budget with more to do

    @property
    def total_runs(self) -> int:
        return sum(self.runs.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "policy_seconds": self.policy,
            "runs": self.runs,
            "total_runs": self.total_runs,
            **({} if self.steps is None else {"steps": self.steps}),
            "complete": self.complete,
        }


class Pruner:
    """Deletes finished runs past their retention, a batch at a time, on a connection of its own."""

    def __init__(
        self,
        conninfo: str,
        ages: Mapping[RunState, float],
        *,
        batch_size: int = 200,
        interval: float = 60.0,
        budget_seconds: float = 2.0,
    ) -> None:
        unfinished = [s for s in ages if s not in SETTING_OF_STATE]
        if unfinished:
            raise ValueError(f"runs in states {unfinished} are not finished: they cannot expire")
        self._conninfo = conninfo
        self._ages = dict(ages)
        self._batch_size = batch_size
        self._interval = interval
        self._budget = budget_seconds
        self._conn: psycopg.Connection[Any] | None = None
        self._next = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Pruner:
        assert settings.database_url, "resolve() fills it"
        return cls(
            settings.database_url,
            policy(settings),
            batch_size=settings.retention_batch_size,
            interval=settings.retention_interval_seconds,
        )

    @property
    def enabled(self) -> bool:
        return bool(self._ages)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # Autocommit: each batch is one statement, so one short transaction.
            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name="saga-retention"
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def prune_batch(self, state: RunState, seconds: float) -> int:
        """Delete at most one batch of ``state`` runs finished more than ``seconds`` ago."""
        params = {"state": state.value, "seconds": seconds, "limit": self._batch_size}
        with translated(f"pruning {state} runs"):
            return self._connection().execute(q.PRUNE_RUNS, params).rowcount

    def prune(self, *, budget_seconds: float | None = None) -> PruneReport:
        """Delete every expired run, batch by batch; with a budget, stop after it has passed
        (``complete`` is then False and the rest waits for the next pass)."""
        report = PruneReport(dry_run=False, policy=self._policy_json())
        deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
        for state, seconds in self._ages.items():
            deleted = 0
            while True:
                n = self.prune_batch(state, seconds)
                deleted += n
                if n < self._batch_size:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    report.complete = False
                    break
            if deleted:
                report.runs[state.value] = deleted
        return report

    def count(self) -> PruneReport:
        """What ``prune`` would delete now, deleting nothing."""
        report = PruneReport(dry_run=True, policy=self._policy_json(), steps={})
        assert report.steps is not None
        with translated("counting prunable runs"):
            cur = self._connection().cursor(row_factory=dict_row)
            for state, seconds in self._ages.items():
                row = cur.execute(q.COUNT_PRUNABLE, {"state": state.value, "seconds": seconds})
                found = row.fetchone()
                assert found is not None
                report.runs[state.value] = int(found["runs"])
                report.steps[state.value] = int(found["steps"])
        return report

    def tick(self) -> float | None:
        """For the relay's loop: prune when due, within a time budget so that publishing goes
        on; returns the seconds until the next pass (0 when expired runs remain)."""
        if not self._ages:
            return None
        now = time.monotonic()
        if now < self._next:
            return self._next - now
        try:
            report = self.prune(budget_seconds=self._budget)
        except StoreError as exc:  # an outage: publishing goes on, pruning tries again later
            log.warning("pruning finished runs failed, will retry: %s", exc)
            self.close()
            self._next = time.monotonic() + self._interval
            return self._interval
        if report.total_runs:
            log.info("pruned %d finished runs %s", report.total_runs, report.runs)
        if not report.complete:
            return 0.0
        self._next = time.monotonic() + self._interval
        return self._interval

    def _policy_json(self) -> dict[str, float]:
        return {state.value: seconds for state, seconds in self._ages.items()}
