"""The Prometheus names of the engine's metrics, as /metrics and Prometheus's OTLP receiver give
them. The deploy files (dashboard, alert rules) may name only these; the integration tests
check that /metrics carries them."""

from __future__ import annotations

# The nine metric names deploy/grafana/dashboards/saga.json queries.
DASHBOARD = {
    "saga_runs_active",
    "saga_runs_finished_total",
    "saga_step_duration_seconds",
    "saga_step_attempts_total",
    "saga_compensations_total",
    "saga_step_queue_wait_seconds",
    "saga_outbox_lag_seconds",
    "saga_outbox_unpublished",
    "saga_outbox_published_total",
}
HISTOGRAMS = {"saga_step_duration_seconds", "saga_step_queue_wait_seconds"}
# Gauges the relay reads for the alert rules.
ALERTS_ONLY = {"saga_steps_overdue", "saga_runs_compensation_failed", "saga_workers"}


# Gauges the relay reads while limits (saga.limits) are in use: no series before.
LIMITS = {"saga_limits_waiting", "saga_limits_in_use"}


def series_names() -> set[str]:
    """Every series name a query may use: histograms as their _bucket, _count and _sum."""
    names = (DASHBOARD | ALERTS_ONLY | LIMITS) - HISTOGRAMS
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_count", f"{h}_sum"}
    return names
