"""The engine on a user's own Celery app, run by ``celery -A proj.celery_app worker`` as a real
process: steps and workflows run, the app's own task still works, Celery's tools see each step
attempt under its own name with its real outcome, and beat-style starts are idempotent."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Producer

from saga.client import SagaClient
from saga.settings import Settings
from saga.workers.schedule import scheduled_run_id, tick_of
from saga_dev.otlp_receiver import OTLPReceiver
from tests.conftest import BROKER_URL
from tests.integration.celery_project import (
    celery,
    project_env,
    python,
    start_relay,
    start_worker,
    write_project,
)
from tests.processes import ProcessGroup, wait_until


class Events:
    """Celery's own event receiver, in a thread, collecting every task event."""

    def __init__(self, broker_url: str) -> None:
        self.app = Celery("probe", broker=broker_url, set_as_current=False)
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection() as conn:
            self._receiver = self.app.events.Receiver(
                conn, handlers={"*": self.events.append}, app=self.app
            )
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)

    def names(self) -> dict[str, str]:
        """Task id -> the name Celery's tools show for it (from task-received)."""
        return {e["uuid"]: e["name"] for e in self.events if e["type"] == "task-received"}

    def outcomes(self, name: str) -> list[str]:
        """The end of each attempt of tasks shown as ``name``, in order."""
        ids = {uuid for uuid, n in self.names().items() if n == name}
        ends = ("task-succeeded", "task-failed", "task-retried")
        return [e["type"] for e in self.events if e.get("uuid") in ids and e["type"] in ends]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = write_project(tmp_path / "project")
    monkeypatch.syspath_prepend(str(folder))  # the client imports the sagas it starts
    return folder


@pytest.fixture
def client(settings: Settings) -> Iterator[SagaClient]:
    with SagaClient(settings) as c:
        yield c


def test_celery_a_worker_runs_sagas_the_apps_own_tasks_and_answers_celery_tools(
    settings: Settings, procs: ProcessGroup, client: SagaClient, project: Path
) -> None:
    env = project_env(settings, SAGA_TASK_EVENTS="true")
    with Events(BROKER_URL) as events:
        start_relay(procs, project, env)
        # No -Q: the app's queues (celery, proj) and the engine's queue (SAGA_QUEUE).
        worker = start_worker(procs, project, env, "proj", "--pool=prefork", "--concurrency=2")
        order = client.start("proj.sagas:order", {"item": "trip"})
        flow = client.start("proj.sagas:flow", 3)
        broken = client.start("proj.sagas:broken", {"item": "x"})
        assert client.result(order, timeout=60) == {"reserved": "trip", "flight": "FL-1"}
        assert client.result(flow, timeout=60) == 12
        assert client.wait(broken, timeout=60).state == "compensated"

        # The app's own task, sent with the app's own serializer (pickle) to its own queue.
        out = python(
            project, env, "from proj.tasks import add; print(add.delay(2, 3).get(timeout=30))"
        )
        assert "'sum': 5" in out and "'type': 'int'" in out

        assert "pong" in celery(project, env, "inspect", "ping", "--timeout", "10")
        stats = celery(project, env, "inspect", "stats", "--timeout", "10")
        assert "saga.step" in stats or "total" in stats
        # A control command that would stop the worker is answered and refused.
        refused = celery(project, env, "control", "shutdown", "--timeout", "5")
        assert "refused" in refused
        assert worker.alive()
        assert "pong" in celery(project, env, "inspect", "ping", "--timeout", "10")

        wait_until(lambda: len(events.outcomes("saga.step[doomed]")) == 1, 30, "doomed's event")
        wait_until(lambda: len(events.outcomes("saga.step[book_flight]")) == 2, 30, "flights")
    # Each attempt under its step's name, with its real outcome.
    assert events.outcomes("saga.step[book_flight]") == ["task-retried", "task-succeeded"]
    assert events.outcomes("saga.step[doomed]") == ["task-failed"]
    assert events.outcomes("saga.step[reserve]").count("task-succeeded") == 2
    assert events.outcomes("saga.compensate[reserve]") == ["task-succeeded"]
    assert events.outcomes("saga.step[double]") == ["task-succeeded", "task-succeeded"]
    assert not any(n == "saga.step" for n in events.names().values())
    log = worker.log()
    assert "UnknownSagaError" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("signing", ["off", "on"])
def test_a_beat_tick_sent_twice_starts_one_run(
    settings: Settings, procs: ProcessGroup, client: SagaClient, project: Path, signing: str
) -> None:
    """With message signing on, beat's process signs what it sends (the worker drops anything
    unsigned), as the relay does."""
    key = {"SAGA_MESSAGE_SIGNING_KEY": "k" * 40} if signing == "on" else {}
    env = project_env(settings, **key)
    start_relay(procs, project, env)
    worker = start_worker(procs, project, env, "beat", "--pool=solo")
    # Beat's own code sends the entry, twice for one tick (two beats by mistake, or one
    # restarted without its state).
    send = (
        "from celery.beat import Scheduler\n"
        "from proj.celery_app import app\n"
        "beat = Scheduler(app=app, lazy=True)\n"
        "spec = app.conf.beat_schedule['nightly-report']\n"
        "for _ in range(2):\n"
        "    beat.apply_async(beat.Entry(name='nightly-report', app=app, **spec))\n"
    )
    python(project, env, send)
    wait_until(lambda: _runs(settings, "proj_order"), 30, "the scheduled run")
    run_id = _runs(settings, "proj_order")[0]
    assert run_id.startswith("nightly-report-")
    assert client.result(run_id, timeout=60) == {"reserved": "report", "flight": "FL-1"}
    assert len(_runs(settings, "proj_order")) == 1
    # Both messages ran, and both named that run.
    started = re.findall(r"saga\.start\[nightly-report\].* succeeded in .*: '(.*)'", worker.log())
    assert started == [run_id, run_id]
    assert "rejected" not in worker.log()


def test_beat_names_the_run_from_its_own_entry_when_the_worker_lacks_it(
    settings: Settings, procs: ProcessGroup, client: SagaClient, project: Path
) -> None:
    """A ``saga worker`` (no beat_schedule) runs what beat sends for an entry that is only in
    beat's scheduler (as with django-celery-beat): a 7 s interval names 7 s ticks (the
    worker's fallback, a minute, collapsed sub-minute intervals), and a tick sent twice starts
    one run."""
    env = project_env(settings)
    start_relay(procs, project, env)
    # Beat's starts go to the app's default queue; the runs' steps to the engine's.
    queues = f"celery,{settings.queue}"
    argv = [sys.executable, "-m", "saga", "worker", "--pool", "solo", "-Q", queues]
    saga_env = {**env, "SAGA_BROKER_URL": env["PROJ_BROKER_URL"]}
    worker = procs.command("sw", argv, saga_env, cwd=project)
    send = (
        "import time\n"
        "from celery import signals\n"
        "from celery.beat import Service\n"
        "from proj.celery_app import app\n"
        "beat = Service(app=app, scheduler_cls='celery.beat:Scheduler')\n"
        "signals.beat_init.send(sender=beat)\n"
        "kwargs = {'saga': 'proj.sagas:order', 'input': {'item': 'fast'}, 'schedule': 'fast'}\n"
        "entry = beat.scheduler.Entry(name='fast', app=app, task='saga.start', schedule=7.0,\n"
        "                             kwargs=kwargs)\n"
        "print('before', time.time())\n"
        "for _ in range(2):\n"
        "    beat.scheduler.apply_async(entry)\n"
        "print('after', time.time())\n"
        "print('kwargs', sorted(entry.kwargs))\n"
    )
    out = python(project, env, send)
    wait_until(lambda: _runs(settings, "proj_order"), 30, "the scheduled run")
    (run_id,) = _runs(settings, "proj_order")
    before, after = (float(re.findall(rf"{w} (\S+)", out)[0]) for w in ("before", "after"))
    ticks = {tick_of(t, 7.0) for t in (before, after)}
    assert run_id in {scheduled_run_id("fast", tick) for tick in ticks}
    assert "kwargs ['input', 'saga', 'schedule']" in out  # beat's entry left as it was
    assert client.result(run_id, timeout=60) == {"reserved": "fast", "flight": "FL-1"}
    started = re.findall(r"saga\.start\[fast\].* succeeded in .*: '(.*)'", worker.log())
    assert started == [run_id, run_id]
    assert _runs(settings, "proj_order") == [run_id]


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_an_engine_task_without_a_task_header_is_refused_on_the_users_app(
    settings: Settings, procs: ProcessGroup, project: Path, serializer: str
) -> None:
    """Celery reads a message with no task header as protocol 1, the task named in its body.
    The app accepts pickle for its own tasks and signing is on: such a message started a run,
    unsigned, unvetted (from pickle too)."""
    env = project_env(settings, SAGA_MESSAGE_SIGNING_KEY="k" * 40)
    worker = start_worker(procs, project, env, "p1", "--pool=solo")
    wait_until(lambda: "ready" in worker.log(), 60, "the worker to be ready")
    forged = {
        "task": "saga.start",
        "id": f"forged-{serializer}",
        "args": [],
        "kwargs": {"saga": "proj.sagas:order", "input": {"item": "x"}, "run_id": "forged"},
    }
    with Connection(env["PROJ_BROKER_URL"]) as conn:
        Producer(conn.default_channel).publish(forged, routing_key="celery", serializer=serializer)
    line = "rejected malformed task message (no task id): names the engine's task saga.start"
    wait_until(lambda: line in worker.log() or _runs(settings, "proj_order"), 30, "a rejection")
    assert _runs(settings, "proj_order") == []
    assert worker.alive()
    assert worker.log().count("rejected malformed task message") == 1


def _runs(settings: Settings, saga_name: str) -> list[str]:
    import psycopg

    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT run_id FROM saga_runs WHERE saga_name = %s", (saga_name,)
        ).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("command", ["celery -A", "saga worker"])
def test_one_worker_reads_several_queues(
    settings: Settings, procs: ProcessGroup, client: SagaClient, project: Path, command: str
) -> None:
    queue_a = settings.queue
    env = project_env(settings)
    start_relay(procs, project, env)
    # Runs go to the client's queue (a); the second step is routed to qb by its queue= option.
    queues = f"{queue_a},qb"
    if command == "celery -A":
        worker = start_worker(procs, project, env, "ab", "--pool=solo", "-Q", queues)
    else:
        argv = [sys.executable, "-m", "saga", "worker", "--pool", "solo", "-Q", queues]
        # The engine's own app, on the same broker, run from the project's folder.
        saga_env = {**env, "SAGA_BROKER_URL": env["PROJ_BROKER_URL"]}
        worker = procs.command("ab", argv, saga_env, cwd=project)
    run_id = client.start("proj.sagas:routed", 4)
    assert client.result(run_id, timeout=60) == 50
    assert _registered_queues(settings) == {queue_a, "qb"}
    worker.stop()  # SIGTERM: the shutdown hook leaves the worker registry
    assert _registered_queues(settings) == set()


def test_celery_a_worker_refuses_to_start_on_a_database_behind_the_code(
    settings: Settings, project: Path, empty_database_url: str
) -> None:
    env = project_env(settings, SAGA_DATABASE_URL=empty_database_url)
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj.celery_app", "worker", "--pool=solo"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "saga: error:" in done.stderr and "saga migrate" in done.stderr


def _registered_queues(settings: Settings) -> set[str]:
    import psycopg

    assert settings.database_url
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT queues FROM saga_workers").fetchall()
    return {q for r in rows for q in r[0]}


def test_celery_a_prefork_worker_exports_each_steps_span(
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    project: Path,
    receiver: OTLPReceiver,
) -> None:
    """Telemetry as under `saga worker`: set up in each pool process after fork, from the
    standard OTEL_* variables (the receiver fixture sets them)."""
    env = project_env(settings)
    start_relay(procs, project, env)
    start_worker(procs, project, env, "otel", "--pool=prefork", "--concurrency=1")
    run_id = client.start("proj.sagas:flow", 1)
    assert client.result(run_id, timeout=60) == 4
    wait_until(
        lambda: {s.name for s in receiver.spans()} >= {"step double", "process " + settings.queue},
        30,
        "the worker's spans",
    )
