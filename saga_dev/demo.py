"""`saga demo`: the travel agent on real workers, with model faults and a killed worker.

Shows the point of the engine: the retry is free. The agent (``saga_dev.travel_agent``) asks the
local model server what to do next, then does it at the local travel service. Some completions
fail (prose where JSON was asked for, 429s, timeouts...) and some tool calls too; each is retried
alone. The worker is killed (SIGKILL) while the model is answering the fourth decision; a new
worker replays the workflow from the journal: the decisions and bookings before it are read
back, not asked for or made again, and the servers' own counts show it.

The demo stops, saying what is stuck, when no step changes for a while or when its relay or
worker exits; Ctrl-C or SIGTERM stop its relay, workers and servers before it exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

from saga.agent.llm import run_usage
from saga.client import SagaClient
from saga.migrate import migrate
from saga.settings import Settings
from saga.states import FINAL_RUN_STATES
from saga.store import StepRecord
from saga.workers.app import create_app
from saga_dev.testing import ServerProcess
from saga_dev.travel_agent import TravelTask, travel_agent

KILL_AT = "decide#7"  # the fourth completion
STALL_SECONDS = 30.0  # no step changed for this long: stop and say what is stuck
LOG_TAIL = 30
LOCK = "saga-demo:"  # + run id: the advisory lock a running demo holds on its run


class Interrupted(Exception):
    """SIGINT or SIGTERM: unwinds the demo so that every child is stopped on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM raise ``Interrupted``, except between starting a child and recording
    it (the child would be left running): there the signal waits for the end of that section.
    (Not a blocked signal mask: a child inherits it, and would ignore our SIGTERM.)"""

    holding = False
    pending: int | None = None

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        # Once: a second Ctrl-C must not cut the clean-up short (each stop is bounded anyway).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cls.holding:
            cls.pending = signum
            return
        raise Interrupted(signum)

    @classmethod
    @contextlib.contextmanager
    def held(cls) -> Iterator[None]:
        cls.holding = True
        try:
            yield
        finally:
            cls.holding = False
        if cls.pending is not None:
            raise Interrupted(cls.pending)


class Children:
    """The relay and workers this demo started (each in its own session), stopped on the way out."""

    def __init__(self, settings: Settings, env: dict[str, str], log: Path) -> None:
        self._env = {**settings.child_env(), **env}
        self._log = log
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.killed: set[int] = set()

    def spawn(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        with _Signals.held(), self._log.open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "saga", role, *args],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.started.append((role, popen))
        return popen

    def kill(self, popen: subprocess.Popen[bytes]) -> None:
        self.killed.add(popen.pid)
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(10)

    def exited(self) -> list[str]:
        """The children that ended on their own (not killed by the demo)."""
        return [
            f"the {role} (pid {p.pid}) exited with code {p.returncode}"
            for role, p in self.started
            if p.poll() is not None and p.pid not in self.killed
        ]

    def stop_all(self) -> None:
        for _, p in self.started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                    os.killpg(p.pid, signal.SIGCONT)  # a stopped process acts on it only now
        for _, p in self.started:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def _tail(log: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _forget_earlier_demos(settings: Settings) -> list[str]:
    """Remove the runs that interrupted demos left unfinished, with their unpublished messages
    and their broker queues.

    Each demo runs on a queue of its own (see run_demo), so an earlier run is never resumed by
    this demo's worker; but this demo's relay would still re-dispatch its steps, to a queue no
    worker reads, for as long as it runs. A demo run is worth nothing once its demo is gone: it
    is deleted, not cancelled (its compensations would call servers that no longer exist). A
    demo still running holds an advisory lock on its run (released when its process ends, even
    killed): its run is left alone.
    """
    assert settings.database_url
    with psycopg.connect(settings.database_url, autocommit=True) as conn, conn.transaction():
        rows = conn.execute(
            "SELECT run_id, queue FROM saga_runs WHERE saga_name = %s AND run_id LIKE 'demo-%%' "
            "AND state <> ALL(%s) AND pg_try_advisory_xact_lock(hashtext(%s || run_id)) "
            "FOR UPDATE",
            (travel_agent.name, list(FINAL_RUN_STATES), LOCK),
        ).fetchall()
        run_ids = [r[0] for r in rows]
        queues = sorted({r[1] for r in rows if r[1] and r[1].startswith("demo-")})
        conn.execute("DELETE FROM saga_outbox WHERE destination = ANY(%s)", (queues,))
        conn.execute("DELETE FROM saga_runs WHERE run_id = ANY(%s)", (run_ids,))
    if queues and settings.broker_url:
        try:
            with create_app(settings).connection_for_write() as broker:
                for queue in queues:
                    broker.default_channel.queue_delete(queue)
        except Exception as exc:  # only leftovers: the demo runs without deleting them
            print(f"could not delete the earlier demos' queues {queues}: {exc}", file=sys.stderr)
    return run_ids


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


def run_demo(settings: Settings, stall_seconds: float = STALL_SECONDS) -> int:
    trip = f"demo-{uuid.uuid4().hex[:6]}"
    # The demo's own queue: a run keeps the queue it started on, so no step of an earlier demo
    # (an interrupted one) reaches this demo's worker, and the servers count this run only.
    settings = settings.model_copy(
        update={
            "queue": trip,
            "lease_seconds": 2.0,
            "relay_poll_seconds": 0.2,
            "dispatch_timeout_seconds": 5.0,
        }
    )
    assert settings.database_url
    state = settings.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    log = state / "demo.log"
    print(f"Postgres: {settings.database_url}\nBroker:   {settings.broker_url}\nLogs:     {log}")
    # Held while this demo runs: a demo started meanwhile leaves this run alone.
    owner = psycopg.connect(settings.database_url, autocommit=True)
    owner.execute("SELECT pg_advisory_lock(hashtext(%s))", (LOCK + trip,))
    try:
        return _demo(settings, log, trip, stall_seconds)
    finally:
        owner.close()


def _demo(settings: Settings, log: Path, trip: str, stall_seconds: float) -> int:
    forgotten = _forget_earlier_demos(settings)
    if forgotten:
        print(
            f"removed {len(forgotten)} unfinished run(s) of earlier demos: {', '.join(forgotten)}"
        )
    _Signals.pending = None
    handlers = {sig: signal.signal(sig, _Signals.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(settings, log, trip, stall_seconds)
    except Interrupted as exc:
        print(
            f"\ninterrupted ({exc}): the relay, workers and local servers are stopped", flush=True
        )
        return 128 + exc.signum
    finally:
        _Signals.holding = False
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _serve(settings: Settings, log: Path, trip: str, stall_seconds: float) -> int:
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
        children = Children(settings, env, log)
        try:
            children.spawn("relay")
            with SagaClient(settings) as client:
                return _run(client, children, log, model, service, trip, stall_seconds)
        finally:
            # From here the clean-up runs to its end (the servers' too, as the with-block
            # exits): a first Ctrl-C now is noted, not raised in the middle of it.
            _Signals.holding = True
            children.stop_all()


def _stuck(client: SagaClient, run_id: str, why: str, children: Children, log: Path) -> int:
    """Say why the demo stops before its run finished, and what is stuck."""
    print(f"\nthe demo stops: {why}", flush=True)
    run = client.run(run_id)
    print(f"run {run_id} is {run.state}; its unfinished steps:")
    for s in client.steps(run_id):
        if s.state != "completed":
            error = _short((s.error or {}).get("message", ""), 80)
            print(f"  {s.step_key:<18} {s.state:<10} attempt {s.attempt}  {error}")
    for role, p in children.started:
        if p.pid not in children.killed:
            status = "running" if p.poll() is None else f"exited with code {p.returncode}"
            print(f"  {role} (pid {p.pid}): {status}")
    print(f"\nthe last {LOG_TAIL} lines of {log}:\n{_tail(log)}", flush=True)
    return 1


def _run(
    client: SagaClient,
    children: Children,
    log: Path,
    model: ServerProcess,
    service: ServerProcess,
    trip: str,
    stall_seconds: float,
) -> int:
    worker = children.spawn("worker", "--pool", "solo")
    task = TravelTask(trip=trip, steps=8, backoff_seconds=0.3)
    run_id = client.start(travel_agent, task.model_dump(), run_id=trip)
    print(f"\nstarted run {run_id}: {task.steps} model turns, each a completion and a tool call\n")
    printer = Printer()
    before_kill: dict[str, Any] = {}
    killed_key = f"{trip}:{KILL_AT}"
    seen: list[tuple[str, str, int]] = []
    last_change = time.monotonic()
    while not client.run(run_id).finished:
        steps = client.steps(run_id)
        printer.show(steps)
        now = [(s.step_key, s.state, s.attempt) for s in steps]
        if now != seen:
            seen, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            why = f"no step changed for {stall_seconds:.0f} s"
            return _stuck(client, run_id, why, children, log)
        exited = children.exited()
        if exited:
            return _stuck(client, run_id, "; ".join(exited), children, log)
        if not before_kill and killed_key in model.stats(detail="0")["held"]:
            children.kill(worker)
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
            worker = children.spawn("worker", "--pool", "solo")
            last_change = time.monotonic()  # the new worker's start-up is no stall
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
