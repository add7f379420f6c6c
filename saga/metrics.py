"""Gauges read from Postgres: outbox lag, active runs, overdue steps, runs stuck in
``compensation_failed``, live workers (registered by the relay process only); and the count of
task messages workers reject.

The step, compensation, queue-wait and finished-run instruments live in ``saga.tracing``, where
the work they measure happens. These two describe the whole system, so one process (the relay)
reads them from the database, once per metric export, on a connection of its own (the metric
reader calls back from its own thread).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, LiteralString

import psycopg
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from psycopg.rows import dict_row

from saga import queries as q
from saga.tracing import INSTRUMENTATION, MESSAGING_DESTINATION, SAGA_NAME, SAGA_RUN_STATE

log = logging.getLogger("saga.metrics")

STUCK_RUNS_READ_EVERY = 60.0  # seconds between counts of compensation_failed runs

MESSAGES_REJECTED = metrics.get_meter(INSTRUMENTATION).create_counter(
    "saga.messages.rejected",
    unit="{message}",
    description="Task messages a worker dropped before claiming anything, by reason: "
    "unsigned (no valid signature while signing is on) or malformed.",
)
REJECTION_REASON = "saga.rejection.reason"


def message_rejected(unsigned: bool) -> None:
    """Count one task message a worker's intake dropped."""
    MESSAGES_REJECTED.add(1, {REJECTION_REASON: "unsigned" if unsigned else "malformed"})


# Flow control (saga.limits): per limit and key. Keys are tenants or accounts: a deployment with
# very many keys should give the limit no key in its metrics views (a metrics View can drop it).
LIMIT_KIND, LIMIT_NAME, LIMIT_KEY = "saga.limit.kind", "saga.limit.name", "saga.limit.key"
STEPS_THROTTLED = metrics.get_meter(INSTRUMENTATION).create_counter(
    "saga.limits.throttled",
    unit="{step}",
    description="Claims a limit refused: the step waits in line in Postgres (throttled).",
)
LIMIT_WAIT = metrics.get_meter(INSTRUMENTATION).create_histogram(
    "saga.limits.wait",
    unit="s",
    description="How long steps waited in line for a limit before they ran.",
)


def gate_attributes(gate: str) -> dict[str, str]:
    """``c:<name>:<key>`` / ``r:<name>:<key>`` as metric attributes."""
    kind, _, rest = gate.partition(":")
    name, _, key = rest.partition(":")
    return {
        LIMIT_KIND: "concurrency" if kind == "c" else "rate_limit",
        LIMIT_NAME: name,
        LIMIT_KEY: key,
    }


def step_throttled(gate: Mapping[str, Any]) -> None:
    STEPS_THROTTLED.add(1, gate_attributes(str(gate["gate"])))


def step_waited(gate: Mapping[str, Any], since: dt.datetime) -> None:
    waited = (dt.datetime.now(dt.UTC) - since).total_seconds()
    LIMIT_WAIT.record(max(0.0, waited), gate_attributes(str(gate["gate"])))


class DatabaseGauges:
    """Observable gauges ``saga.outbox.lag`` (age of the oldest unpublished outbox row, s),
    ``saga.outbox.unpublished``, ``saga.runs.active`` (by saga and state),
    ``saga.steps.overdue``, ``saga.runs.compensation_failed`` (by saga) and ``saga.workers``
    (by queue)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        meter = metrics.get_meter(INSTRUMENTATION)
        gauges = [
            ("saga.outbox.lag", self._outbox_lag, "s",
             "Age of the oldest unpublished outbox row (0 when none)."),
            ("saga.outbox.unpublished", self._outbox_unpublished, "{message}",
             "Outbox rows not yet published."),
            ("saga.runs.active", self._active_runs, "{run}",
             "Runs running or compensating, by saga and state."),
            ("saga.steps.overdue", self._overdue_steps, "{step}",
             "Dispatched steps not claimed within the dispatch timeout (lost messages, or no "
             "worker on their queue); the sweeper sends them again."),
            ("saga.runs.compensation_failed", self._compensation_failed, "{run}",
             "Runs stopped in compensation_failed, by saga: an operator must act."),
            ("saga.workers", self._workers, "{worker}",
             "Worker processes whose heartbeat is within their lease, by queue."),
            ("saga.limits.in_use", self._limits_in_use, "{slot}",
             "Concurrency slots held (steps or runs), or rate units granted in the current "
             "window, per limit and key."),
            ("saga.limits.waiting", self._limits_waiting, "{step}",
             "Steps waiting in line (throttled) per limit and key."),
        ]  # fmt: skip
        for name, callback, unit, description in gauges:
            meter.create_observable_gauge(
                name, callbacks=[callback], unit=unit, description=description
            )
        self._unpublished = 0
        self._gates: list[dict[str, Any]] = []
        self._stuck: tuple[float, list[dict[str, Any]]] | None = None

    def _query(self, sql: LiteralString) -> list[dict[str, Any]]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self._conninfo,
                        autocommit=True,
                        application_name="saga-metrics",
                        connect_timeout=5,
                    )
                return self._conn.cursor(row_factory=dict_row).execute(sql).fetchall()
            except psycopg.Error as exc:
                log.warning("could not read metrics from Postgres: %s", exc)
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                return []

    def _outbox_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        rows = self._query(q.OUTBOX_LAG)
        if not rows:
            return []
        lag, self._unpublished = float(rows[0]["lag_seconds"]), int(rows[0]["unpublished"])
        return [Observation(lag)]

    def _outbox_unpublished(self, options: CallbackOptions) -> Iterable[Observation]:
        # Read with the lag, in the same collection (callbacks run in registration order).
        return [Observation(self._unpublished)]

    def _active_runs(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(r["runs"]), {SAGA_NAME: r["saga_name"], SAGA_RUN_STATE: r["state"]})
            for r in self._query(q.ACTIVE_RUNS)
        ]

    def _overdue_steps(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(int(r["steps"])) for r in self._query(q.OVERDUE_STEPS)]

    def _compensation_failed(self, options: CallbackOptions) -> Iterable[Observation]:
        # A scan of saga_runs (final states have no index): read at most once a minute.
        now = time.monotonic()
        if self._stuck is None or now - self._stuck[0] >= STUCK_RUNS_READ_EVERY:
            self._stuck = (now, self._query(q.COMPENSATION_FAILED_RUNS))
        return [Observation(int(r["runs"]), {SAGA_NAME: r["saga_name"]}) for r in self._stuck[1]]

    def _workers(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(int(r["workers"]), {MESSAGING_DESTINATION: r["queue"]})
            for r in self._query(q.LIVE_WORKERS)
        ]

    def _limits_in_use(self, options: CallbackOptions) -> Iterable[Observation]:
        self._gates = self._query(q.GATE_USAGE)
        return [Observation(int(r["in_use"]), gate_attributes(r["gate"])) for r in self._gates]

    def _limits_waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        # Read with the slots in use, in the same collection.
        return [Observation(int(r["waiting"]), gate_attributes(r["gate"])) for r in self._gates]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
