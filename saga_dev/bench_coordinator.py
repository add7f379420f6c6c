"""``saga bench coordinator``: step graphs against workflows written as code, and raw Celery.

In one invocation, with two solo workers per side (the same harness as ``saga bench core``):
- 100 concurrent runs of a 10-step graph saga, of the same 10 steps written as code, and 100
  concurrent raw Celery chains of 10 tasks: steps/s, and p50/p99 of each run's ms per step;
- one run at a time of a code-first loop at 10, 100 and 1,000 steps: ms per step, which shows
  whether replaying the journal grows the per-step cost with the run's length.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import psycopg
from celery import chain

from saga.definition import Saga, step
from saga.settings import Settings
from saga.workflow import WorkflowContext, workflow
from saga_dev.bench import Bench, bench_harness, prepare
from saga_dev.bench_sagas import noop

CONCURRENT = 100
STEPS = 10
LOOP_LENGTHS = (10, 100, 1000)
PAIRS = 30  # interleaved graph and code-first runs at STEPS steps
TIMEOUT = 600.0

graph10 = Saga("bench.graph10", [step(noop, name=f"s{i}") for i in range(1, STEPS + 1)])


@workflow("bench.code_loop")
def code_loop(ctx: WorkflowContext, n: int) -> int:
    value = 0
    for _ in range(n):
        value = ctx.step(noop, value, name="s")
    return n


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3)}


def _per_run_ms_per_step(database_url: str, run_ids: list[str], steps: int) -> list[float]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM finished_at - created_at) FROM saga_runs "
            "WHERE run_id = ANY(%s) AND state = 'completed'",
            (run_ids,),
        ).fetchall()
    return [float(r[0]) * 1000 / steps for r in rows]


def _concurrent_runs(bench: Bench, ref: str, value: Any) -> dict[str, Any]:
    ids = [uuid.uuid4().hex for _ in range(CONCURRENT)]
    began = time.perf_counter()
    for i, run_id in enumerate(ids):
        bench.start(bench.clients[i % len(bench.clients)], ref, value, run_id)
    ended = bench.watcher.wait(ids, TIMEOUT)
    bench.expect_completed(ids)
    per_step = _per_run_ms_per_step(bench.settings.database_url or "", ids, STEPS)
    return {
        "steps_per_s": round(CONCURRENT * STEPS / (ended - began), 1),
        "ms_per_step": _percentiles(per_step),
    }


def _concurrent_raw(bench: Bench) -> dict[str, Any]:
    key = bench.key("chains")
    sigs = [
        chain(
            *[bench.raw.signature("bench.noop", immutable=True) for _ in range(STEPS - 1)],
            bench.raw.signature("bench.count", args=(key, CONCURRENT), immutable=True),
        )
        for _ in range(CONCURRENT)
    ]
    began = time.perf_counter()
    for sig in sigs:
        sig.apply_async()
    ended, _ = bench.blpop(key + ":done", TIMEOUT)
    return {"steps_per_s": round(CONCURRENT * STEPS / (ended - began), 1)}


def _sequential_ms_per_step(bench: Bench, ref: str, steps: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        run_id = uuid.uuid4().hex
        began = time.perf_counter()
        bench.start(bench.clients[0], ref, steps if "code_loop" in ref else 0, run_id)
        ended = bench.watcher.wait([run_id], TIMEOUT)
        bench.expect_completed([run_id])
        times.append((ended - began) * 1000 / steps)
    return round(statistics.median(times), 3)


def _interleaved_ms_per_step(
    bench: Bench, graph_ref: str, code_ref: str, pairs: int
) -> tuple[float, float]:
    """Median ms per step of the graph and the code-first form at STEPS steps, one run of each
    back to back and alternating which goes first, so drift on a noisy machine hits both."""
    sides: list[tuple[str, list[float]]] = [(graph_ref, []), (code_ref, [])]
    for i in range(pairs):
        for ref, times in sides if i % 2 == 0 else reversed(sides):
            times.append(_sequential_ms_per_step(bench, ref, STEPS, 1))
    return statistics.median(sides[0][1]), statistics.median(sides[1][1])


def bench_coordinator(settings: Settings) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    began = time.monotonic()
    raw_queue = f"{settings.queue}-bench-raw"
    durable = prepare(settings, f"{settings.queue}-bench", raw_queue)
    graph_ref, code_ref = f"{__name__}:graph10", f"{__name__}:code_loop"
    with bench_harness(durable, raw_queue) as bench:
        bench.wait_raw_ready()
        bench.wait_saga_ready()
        _sequential_ms_per_step(bench, graph_ref, STEPS, 3)  # warm-up
        _sequential_ms_per_step(bench, code_ref, STEPS, 3)
        graph_seq, code_seq = _interleaved_ms_per_step(bench, graph_ref, code_ref, PAIRS)
        loop = {
            n: code_seq
            if n == STEPS
            else _sequential_ms_per_step(bench, code_ref, n, 10 if n < 1000 else 2)
            for n in LOOP_LENGTHS
        }
        concurrent = {
            "raw_celery": _concurrent_raw(bench),
            "graph": _concurrent_runs(bench, graph_ref, 0),
            "code": _concurrent_runs(bench, code_ref, STEPS),
        }
    code_vs_graph = loop[STEPS] / graph_seq
    growth = loop[LOOP_LENGTHS[-1]] / loop[LOOP_LENGTHS[0]]
    return {
        "suite": "coordinator",
        "broker": settings.broker_url.split(":", 1)[0],
        "concurrent_runs": CONCURRENT,
        "steps": STEPS,
        "concurrent": concurrent,
        "graph_ms_per_step": round(graph_seq, 3),
        "code_ms_per_step": {str(n): round(ms, 3) for n, ms in loop.items()},
        "codefirst_vs_graph": round(code_vs_graph, 3),
        "cost_growth": round(growth, 3),
        "targets": {
            "codefirst_vs_graph": {"max": 1.1, "pass": code_vs_graph <= 1.1},
            "cost_growth": {"max": 2.0, "pass": growth <= 2.0},
        },
        "elapsed_s": round(time.monotonic() - began, 1),
    }
