"""``/metrics`` for Prometheus: the OpenTelemetry Prometheus exporter, across prefork children.

A relay, and a solo or threads worker, record their metrics in the process that serves
``/metrics``: the exporter's reader collects them (and runs the relay's gauge callbacks) at each
scrape. A prefork worker runs its steps in pool children, each with its own SDK: every child
writes its exposition to a file of its own in a folder the parent made, every few seconds and
when it ends, and the parent serves the union. Each child's series carry its
``service_instance_id`` (the exporter copies that resource attribute to a label), so they never
collide; the dashboard's queries sum over it. A dead child's file is served for a while (its last
counts reach Prometheus), then removed: its series end, as a restarted process's do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("saga.metrics")

CHILD_WRITE_SECONDS = 5.0  # how far a prefork worker's /metrics may lag behind its children
DEAD_CHILD_KEEP_SECONDS = 300.0  # a dead child's last counts, served this long


def reader(registry: CollectorRegistry) -> Any:
    """The exporter's metric reader, registering on ``registry`` (not the global one)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    return PrometheusMetricReader(
        registry=registry, resource_attribute_filter=lambda key: key == "service.instance.id"
    )


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ChildFiles:
    """Collects the exposition files of a prefork worker's children (a prometheus_client
    custom collector, registered on the parent's registry)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for path in sorted(self.folder.glob("*.prom")):
            if not self._keep(path):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except OSError:  # removed meanwhile
                continue
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, family)
                if into is not family:
                    into.samples.extend(family.samples)
        yield from merged.values()

    @staticmethod
    def _keep(path: Path) -> bool:
        with contextlib.suppress(ValueError, OSError):
            pid = int(path.stem)
            try:
                os.kill(pid, 0)
                return True
            except ProcessLookupError:
                if time.time() - path.stat().st_mtime < DEAD_CHILD_KEEP_SECONDS:
                    return True
                path.unlink(missing_ok=True)
        return False


class ChildWriter:
    """In a prefork child: writes the child's exposition to ``<folder>/<pid>.prom`` every
    ``CHILD_WRITE_SECONDS`` (a daemon thread) and once more when the child ends."""

    def __init__(self, folder: Path, registry: CollectorRegistry) -> None:
        self._path = folder / f"{os.getpid()}.prom"
        self._registry = registry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saga-metrics-file", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHILD_WRITE_SECONDS):
            self.write()

    def write(self) -> None:
        try:
            temporary = self._path.with_suffix(".tmp")
            temporary.write_bytes(generate_latest(self._registry))
            temporary.replace(self._path)  # a reader never sees half a file
        except OSError as exc:
            log.warning("could not write this process's metrics to %s: %s", self._path, exc)

    def stop(self) -> None:
        self._stop.set()
        self.write()


def registry_with(collectors: Iterable[Any]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return registry
