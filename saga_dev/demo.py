"""`saga demo`: the travel agent on real workers, with model faults and a killed worker.

Shows the point of the engine: the retry is free. The agent (``saga_dev.travel_agent``) asks the
local model server what to do next, then does it at the local travel service. Some completions
fail (prose where JSON was asked for, 429s, timeouts...) and some tool calls too; each is retried
alone. The worker is killed (SIGKILL) while the model is answering the fourth decision; a new
worker replays the workflow from the journal: the decisions and bookings before it are read
back, not asked for or made again, and the servers' own counts show it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from saga.agent.llm import run_usage
from saga.client import SagaClient
from saga.migrate import migrate
from saga.settings import Settings
from saga.store import StepRecord
from saga_dev.testing import ServerProcess
from saga_dev.travel_agent import TravelTask, travel_agent

KILL_AT = "decide#7"  # the fourth completion


def _spawn(
    settings: Settings, env: dict[str, str], *args: str, log: Path
) -> subprocess.Popen[bytes]:

    return subprocess.Popen(
        [sys.executable, "-m", "saga", *args],
        env={**settings.child_env(), **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _short(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _what(step: StepRecord) -> str:
    """One line on what a completed step did."""
    result = step.result
    if not isinstance(result, dict):
        return ""
    if result.get("object") == "saga.completion":
        calls = result.get("tool_calls") or []
        if calls:
            call = calls[0]
            return _short(f"model chose {call['name']}({json.dumps(call['arguments'])})", 90)
        return _short(f"model answered: {json.dumps(result.get('answer'))}", 90)
    for field in ("booking_id", "message_id"):
        if field in result:
            return f"{field} {result[field]}"
    if "options" in result:
        return f"{len(result['options'])} {result.get('kind', 'options')} found"
    return ""


class Printer:
    """Prints each step's changes as they are seen in the journal."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, int]] = {}
        self.started = time.monotonic()

    def show(self, steps: list[StepRecord]) -> None:
        for s in steps:
            now = (s.state, s.attempt)
            if self.seen.get(s.step_key) == now:
                continue
            self.seen[s.step_key] = now
            line = ""
            if s.state == "completed":
                again = f" on attempt {s.attempt}" if s.attempt > 1 else ""
                line = f"ran{again}: {_what(s)}"
            elif s.state == "pending" and s.error:
                line = f"attempt {s.attempt} failed, retrying: {_short(s.error.get('message', ''))}"
            elif s.state == "running" and s.attempt > 1:
                line = f"attempt {s.attempt} running"
            elif s.state == "failed":
                line = f"failed for good: {_short((s.error or {}).get('message', ''))}"
            if line:
                print(
                    f"  {time.monotonic() - self.started:5.1f}s  {s.step_key:<18} {line}",
                    flush=True,
                )


def run_demo(settings: Settings) -> int:
    settings = settings.model_copy(
        update={"lease_seconds": 2.0, "relay_poll_seconds": 0.2, "dispatch_timeout_seconds": 5.0}
    )
    assert settings.database_url
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    log = state / "demo.log"
    print(f"Postgres: {settings.database_url}\nBroker:   {settings.broker_url}\nLogs:     {log}")
    trip = f"demo-{uuid.uuid4().hex[:6]}"
    with (
        ServerProcess(
            "saga_dev.testing.model_server",
            "--fault-rate",
            "0.15",
            "--seed",
            "3",
            "--timeout-seconds",
            "1.5",
            log=log,
        ) as model,
        ServerProcess(
            "saga_dev.testing.effects_server", "--fault-rate", "0.1", "--seed", "4", log=log
        ) as service,
    ):
        # Besides the random faults, make sure the interesting cases happen: a malformed first
        # decision, a booking applied whose answer is lost, and the kill mid-completion.
        model.control(force={f"{trip}:decide#1": ["malformed"], f"{trip}:{KILL_AT}": ["hold"]})
        service.control(force={f"{trip}:book_flight#4": ["lost"]})
        env = {
            "SAGA_MODEL_BASE_URL": f"{model.url}/v1",
            "SAGA_MODEL_NAME": "scripted",
            "SAGA_MODEL_TIMEOUT_SECONDS": "0.5",
            "TRAVEL_SERVICE_URL": service.url,
        }
        print(f"Model:    {model.url} (OpenAI-compatible, scripted, 15% faults)")
        print(f"Service:  {service.url} (bookings and emails, 10% faults)")
        procs = [
            _spawn(settings, env, "relay", log=log),
            _spawn(settings, env, "worker", "--pool", "solo", log=log),
        ]
        try:
            with SagaClient(settings) as client:
                return _run(client, settings, env, procs, log, model, service, trip)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(15)


def _run(
    client: SagaClient,
    settings: Settings,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    log: Path,
    model: ServerProcess,
    service: ServerProcess,
    trip: str,
) -> int:
    task = TravelTask(trip=trip, steps=8, backoff_seconds=0.3)
    run_id = client.start(travel_agent, task.model_dump(), run_id=trip)
    print(f"\nstarted run {run_id}: {task.steps} model turns, each a completion and a tool call\n")
    printer = Printer()
    before_kill: dict[str, Any] = {}
    killed_key = f"{trip}:{KILL_AT}"
    while not client.run(run_id).finished:
        printer.show(client.steps(run_id))
        if not before_kill and killed_key in model.stats(detail="0")["held"]:
            os.killpg(procs[1].pid, signal.SIGKILL)
            procs[1].wait(10)
            before_kill = {
                "steps": [s.step_key for s in client.steps(run_id) if s.state == "completed"],
                "model": model.stats()["by_key"],
                "service": service.stats()["keys_seen_more_than_once"],
                "requests": service.stats(detail="0")["requests"],
            }
            print(
                f"  {time.monotonic() - printer.started:5.1f}s  -- worker killed (SIGKILL) "
                f"while the model was answering {KILL_AT}; starting a new worker",
                flush=True,
            )
            procs[1] = _spawn(settings, env, "worker", "--pool", "solo", log=log)
        time.sleep(0.05)
    steps = client.steps(run_id)
    printer.show(steps)
    run = client.run(run_id)
    print(f"\nrun {run.state}: {json.dumps(run.result)}")

    m, e = model.stats(), service.stats()
    if before_kill:

        def untouched(step_key: str) -> bool:
            key = f"{trip}:{step_key}"
            if step_key.startswith("decide"):
                return bool(m["by_key"].get(key) == before_kill["model"].get(key))
            seen = e["keys_seen_more_than_once"]
            return bool(seen.get(key) == before_kill["service"].get(key))

        read_back = [k for k in before_kill["steps"] if untouched(k)]
        asked_again = [k for k in before_kill["steps"] if not untouched(k)]
        print(
            f"\nafter the restart the new worker replayed the workflow from the journal: "
            f"{', '.join(read_back)} were read back, not run again (the model server and the "
            f"service saw no new request for them); {KILL_AT} ran again."
        )
        if asked_again:
            print(f"asked again after the restart: {asked_again}")
    decisions = [s.idempotency_key for s in steps if s.step_name == "decide"]
    paid = {k: m["by_key"][k]["ok"] for k in decisions}
    usage = run_usage(steps)
    print(
        f"model server: {m['completions']} completions for {len(decisions)} decisions "
        f"(each answered once: {all(v == 1 for v in paid.values())}), "
        f"{m['failed_attempts']} failed attempts {m['faults']}, {m['abandoned']} abandoned "
        f"by the killed worker"
    )
    print(
        f"travel service: {e['effects_applied']} effects, {e['duplicate_effects']} applied "
        f"twice; {e['duplicate_key_requests']} retried request(s) answered from the key "
        f"instead of booking again; faults {e['faults']}"
    )
    print(
        f"usage (from the journal): {usage.calls} completions, {usage.total.total_tokens} "
        f"tokens ({usage.total.prompt_tokens} prompt, {usage.total.completion_tokens} "
        f"completion)"
    )
    print(f"\nsee every step: saga show {run_id}")
    return 0 if run.state == "completed" else 1
