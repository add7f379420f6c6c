"""`saga demo`: a five-step run on real workers, with a failed attempt and a killed worker.

Shows the point of the engine: the retry is free. Step 2 fails once and is retried; the worker
is killed (SIGKILL) while step 4 runs; a new worker resumes the run at step 4, and steps 1-3 are
read from the journal, never run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from saga.client import SagaClient
from saga.definition import Saga, StepContext
from saga.migrate import migrate
from saga.retry import RetryPolicy
from saga.settings import Settings


def _marker(ctx: StepContext) -> Path:
    return Path(ctx.run_input["marker_dir"]) / f"{ctx.idempotency_key.replace(':', '_')}"


def plan(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    return {**value, "plan": ["search", "read", "summarise"]}


def search(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise ConnectionError("search API answered 503 (a flaky dependency)")
    return {**value, "hits": ["doc-1", "doc-7", "doc-9"]}


def read(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    return {**value, "notes": [f"notes on {h}" for h in value["hits"]]}


def summarise(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    marker = _marker(ctx)
    if not marker.exists():
        marker.touch()
        time.sleep(120)  # the demo kills the worker during this first attempt
    return {**value, "summary": f"{len(value['notes'])} sources on {value['topic']!r}"}


def publish(ctx: StepContext, value: dict[str, Any]) -> dict[str, Any]:
    # An outside effect: the idempotency key is what the outside system would dedupe on.
    return {"summary": value["summary"], "published_with_key": ctx.idempotency_key}


research = Saga(
    "research",
    [plan, search, read, summarise, publish],
    retry=RetryPolicy(max_attempts=3, initial_backoff_seconds=0.5),
)


def _spawn(settings: Settings, *args: str, log: Path) -> subprocess.Popen[bytes]:
    from saga.cli import child_env

    return subprocess.Popen(
        [sys.executable, "-m", "saga", *args],
        env=child_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _show(client: SagaClient, run_id: str, printed: dict[str, str]) -> None:
    for s in client.steps(run_id):
        line = f"{s.state} (attempt {s.attempt})"
        if s.error and s.state != "completed":
            line += f", last error: {s.error.get('message')}"
        if printed.get(s.step_name) != line:
            printed[s.step_name] = line
            print(f"  {time.strftime('%H:%M:%S')}  {s.step_name:<10} {line}", flush=True)


def run_demo(settings: Settings) -> int:
    settings = settings.model_copy(update={"lease_seconds": 3.0, "relay_poll_seconds": 0.2})
    assert settings.database_url
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    log = state / "demo.log"
    print(f"Postgres: {settings.database_url}\nBroker:   {settings.broker_url}\nLogs:     {log}")
    procs = [
        _spawn(settings, "relay", log=log),
        _spawn(settings, "worker", "--pool", "solo", log=log),
    ]
    try:
        with SagaClient(settings) as client:
            run_id = client.start(research, {"topic": "durable agents", "marker_dir": str(state)})
            print(f"\nstarted run {run_id}")
            printed: dict[str, str] = {}
            killed = False
            while not client.run(run_id).finished:
                _show(client, run_id, printed)
                step4 = printed.get("summarise", "")
                if not killed and step4.startswith("running"):
                    time.sleep(0.5)
                    os.killpg(procs[1].pid, signal.SIGKILL)
                    killed = True
                    print("  -- worker killed with SIGKILL during 'summarise'; starting a new one")
                    procs[1] = _spawn(settings, "worker", "--pool", "solo", log=log)
                time.sleep(0.1)
            _show(client, run_id, printed)
            run = client.run(run_id)
            print(f"\nrun {run.state}: {run.result}")
            steps = client.steps(run_id)
            print("attempts per step:", {s.step_name: s.attempt for s in steps})
            print(
                "plan, search and read were not run again after the kill: their results came "
                "from the journal."
            )
            return 0 if run.state == "completed" else 1
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(15)
