"""``saga bench core --tracing``: durable throughput with tracing exporting against tracing off.

Both modes run in one invocation, in alternating rounds, each on freshly started workers and
relay (the SDK is configured per process at start): "on" exports spans and metrics over OTLP/HTTP
to a receiver in this process; "off" sets OTEL_SDK_DISABLED. Prints ``tracing_overhead``,
1 - on/off, against the target of 0.10.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from typing import Any

from saga.settings import Settings
from saga_dev.bench import _median_cpu, _with_cpu, bench_harness, prepare
from saga_dev.otlp_receiver import OTLPReceiver

OVERHEAD_TARGET = 0.10


def _env(settings: Settings, endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in settings.child_env().items() if not k.startswith("OTEL_")}
    if endpoint is None:
        env["OTEL_SDK_DISABLED"] = "true"
    else:
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="otlp",
        )
    return env


def _hostname(i: int) -> str:
    return f"bench-trace{i}-{uuid.uuid4().hex[:6]}@%h"


def _round(settings: Settings, endpoint: str | None, runs: int) -> tuple[float, dict[str, float]]:
    """Start workers and relay in one mode, warm them up, measure steps/s once (and the CPU
    each role spent per step: steadier than wall time on a noisy machine)."""
    with bench_harness(settings, env=_env(settings, endpoint), hostname=_hostname) as bench:
        bench.wait_saga_ready()
        bench.saga_steps_per_s(min(runs, 100))  # warm-up
        return _with_cpu(bench, bench.saga_steps_per_s, runs, ["saga-worker", "relay"])


def bench_tracing(settings: Settings, runs: int, repeat: int) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    began = time.monotonic()
    durable = prepare(settings, f"{settings.queue}-bench-tracing")
    off: list[tuple[float, dict[str, float]]] = []
    on: list[tuple[float, dict[str, float]]] = []
    with OTLPReceiver(decode=False) as receiver:
        for r in range(max(1, repeat)):
            modes = [(off, None), (on, receiver.endpoint)]
            for results, endpoint in modes if r % 2 == 0 else reversed(modes):
                results.append(_round(durable, endpoint, runs))
    off_sps, on_sps = statistics.median(r for r, _ in off), statistics.median(r for r, _ in on)
    overhead = 1 - on_sps / off_sps
    return {
        "suite": "core --tracing",
        "runs": runs,
        "repeat": repeat,
        "tracing_off_steps_per_s": round(off_sps, 1),
        "tracing_on_steps_per_s": round(on_sps, 1),
        "tracing_overhead": round(overhead, 3),
        "rounds": {"off": [round(x, 1) for x, _ in off], "on": [round(x, 1) for x, _ in on]},
        # CPU ms per step by role; "client" is this process: the starters and the receiver.
        "cpu_ms_per_step": {"off": _median_cpu(off), "on": _median_cpu(on)},
        "targets": {
            "tracing_overhead": {"max": OVERHEAD_TARGET, "pass": overhead <= OVERHEAD_TARGET}
        },
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - began, 1),
    }
