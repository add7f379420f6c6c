"""``saga bench core --tracing``: durable throughput with tracing exporting against tracing off.

Both modes run in one invocation, in alternating rounds, each on freshly started workers and
relay (the SDK is configured per process at start): "on" exports spans and metrics over OTLP/HTTP
to a receiver in this process; "off" sets OTEL_SDK_DISABLED. Prints ``tracing_overhead``,
1 - on/off, against the target of 0.10.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from saga.bench import (
    STARTER_THREADS,
    WORKERS,
    Bench,
    Children,
    RunWatcher,
    purge,
    raw_app,
    redis_url,
)
from saga.cli import child_env
from saga.client import SagaClient
from saga.migrate import migrate
from saga.otlp_receiver import OTLPReceiver
from saga.settings import Settings

OVERHEAD_TARGET = 0.10


def _env(settings: Settings, endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in child_env(settings).items() if not k.startswith("OTEL_")}
    if endpoint is None:
        env["OTEL_SDK_DISABLED"] = "true"
    else:
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="otlp",
        )
    return env


def _round(settings: Settings, endpoint: str | None, runs: int) -> float:
    """Start workers and relay in one mode, warm them up, measure steps/s once."""
    raw = raw_app(settings, f"{settings.queue}-raw-unused")
    env = _env(settings, endpoint)
    with (
        tempfile.TemporaryDirectory(prefix="saga-bench-") as log_dir,
        Children(Path(log_dir)) as children,
        contextlib.ExitStack() as stack,
    ):
        for i in range(1, WORKERS + 1):
            children.start(
                f"saga-worker-{i}",
                [
                    sys.executable,
                    "-m",
                    "saga",
                    "worker",
                    "--pool",
                    "solo",
                    "--loglevel",
                    "WARNING",
                    "--hostname",
                    f"bench-trace{i}-{uuid.uuid4().hex[:6]}@%h",
                ],
                env,
            )
        children.start("relay", [sys.executable, "-m", "saga", "relay"], env)
        assert settings.database_url and settings.broker_url
        watcher = RunWatcher(settings.database_url, children.check)
        stack.callback(watcher.close)
        clients = [SagaClient(settings) for _ in range(STARTER_THREADS)]
        for client in clients:
            stack.callback(client.close)
        signals = redis.Redis.from_url(redis_url(settings.broker_url))
        stack.callback(signals.close)
        bench = Bench(
            settings,
            raw,
            signals,
            children,
            watcher,
            clients,
            prefix=f"saga-bench:{uuid.uuid4().hex[:12]}",
        )
        try:
            bench.wait_saga_ready()
            bench.saga_steps_per_s(min(runs, 100))  # warm-up
            return bench.saga_steps_per_s(runs)
        finally:
            children.stop()
            bench.cleanup()


def bench_tracing(settings: Settings, runs: int, repeat: int) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    began = time.monotonic()
    migrate(settings.database_url)
    durable = settings.model_copy(update={"queue": f"{settings.queue}-bench-tracing"})
    purge(raw_app(settings, durable.queue), durable.queue)
    off: list[float] = []
    on: list[float] = []
    with OTLPReceiver(decode=False) as receiver:
        for r in range(max(1, repeat)):
            modes = [(off, None), (on, receiver.endpoint)]
            for results, endpoint in modes if r % 2 == 0 else reversed(modes):
                results.append(_round(durable, endpoint, runs))
    off_sps, on_sps = statistics.median(off), statistics.median(on)
    overhead = 1 - on_sps / off_sps
    return {
        "suite": "core --tracing",
        "runs": runs,
        "repeat": repeat,
        "tracing_off_steps_per_s": round(off_sps, 1),
        "tracing_on_steps_per_s": round(on_sps, 1),
        "tracing_overhead": round(overhead, 3),
        "rounds": {"off": [round(x, 1) for x in off], "on": [round(x, 1) for x in on]},
        "targets": {
            "tracing_overhead": {"max": OVERHEAD_TARGET, "pass": overhead <= OVERHEAD_TARGET}
        },
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.monotonic() - began, 1),
    }
