"""A prefork worker's /metrics: the union of its children's files, dead children pruned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from saga.workers import prometheus, telemetry


def child_file(folder: Path, pid: int, instance: str, value: float) -> Path:
    registry = CollectorRegistry()
    counter = Counter("saga_step_attempts", "attempts", ["service_instance_id"], registry=registry)
    counter.labels(instance).inc(value)
    path = folder / f"{pid}.prom"
    path.write_bytes(generate_latest(registry))
    return path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(done.stdout)


def served(folder: Path) -> dict[str, float]:
    registry = prometheus.registry_with([prometheus.ChildFiles(folder)])
    text = prometheus.exposition(registry)[0].decode()
    return {
        s.labels["service_instance_id"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "saga_step_attempts_total"
    }


def test_the_children_series_are_served_together(tmp_path: Path) -> None:
    child_file(tmp_path, os.getpid(), "a", 2)
    child_file(tmp_path, os.getppid(), "b", 3)
    assert served(tmp_path) == {"a": 2.0, "b": 3.0}


def test_a_dead_childs_file_is_served_a_while_then_removed(tmp_path: Path) -> None:
    child_file(tmp_path, os.getpid(), "alive", 1)
    dead = child_file(tmp_path, dead_pid(), "dead", 4)
    assert served(tmp_path) == {"alive": 1.0, "dead": 4.0}  # its last counts reach Prometheus
    old = dead.stat().st_mtime - prometheus.DEAD_CHILD_KEEP_SECONDS - 1
    os.utime(dead, (old, old))
    assert served(tmp_path) == {"alive": 1.0}
    assert not dead.exists()


def test_the_prometheus_exporter_name_is_not_an_otlp_exporter() -> None:
    env = {"OTEL_METRICS_EXPORTER": "prometheus,otlp"}
    assert telemetry._exporters("METRICS", env) == ["otlp"]
    assert telemetry._exporters("METRICS", {"OTEL_METRICS_EXPORTER": "prometheus"}) == []
