"""Gauges read from Postgres (outbox lag, active runs; registered by the relay process only),
and the count of task messages workers reject.

The step, compensation, queue-wait and finished-run instruments live in ``saga.tracing``, where
the work they measure happens. These two describe the whole system, so one process (the relay)
reads them from the database, once per metric export, on a connection of its own (the metric
reader calls back from its own thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, LiteralString

import psycopg
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from psycopg.rows import dict_row

from saga import queries as q
from saga.tracing import INSTRUMENTATION, SAGA_NAME, SAGA_RUN_STATE

log = logging.getLogger("saga.metrics")

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


class DatabaseGauges:
    """Observable gauges ``saga.outbox.lag`` (age of the oldest unpublished outbox row, s),
    ``saga.outbox.unpublished`` and ``saga.runs.active`` (by saga and state)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        meter = metrics.get_meter(INSTRUMENTATION)
        meter.create_observable_gauge(
            "saga.outbox.lag",
            callbacks=[self._outbox_lag],
            unit="s",
            description="Age of the oldest unpublished outbox row (0 when none).",
        )
        meter.create_observable_gauge(
            "saga.outbox.unpublished",
            callbacks=[self._outbox_unpublished],
            unit="{message}",
            description="Outbox rows not yet published.",
        )
        meter.create_observable_gauge(
            "saga.runs.active",
            callbacks=[self._active_runs],
            unit="{run}",
            description="Runs running or compensating, by saga and state.",
        )
        self._unpublished = 0

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

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
