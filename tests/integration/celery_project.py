"""A user-style Celery project, written into a folder for a test: its own app, configuration and
tasks, with the engine installed on it, run by ``celery -A proj.celery_app worker``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from saga.settings import Settings
from tests.processes import ROOT, Process, ProcessGroup

CELERY_APP = """
import os

from celery import Celery
from celery.schedules import crontab
from kombu import Queue

import saga.celery

app = Celery("proj", broker=os.environ["PROJ_BROKER_URL"], include=["proj.tasks"])
app.conf.update(
    # The user's own choices for their own tasks: pickle, routing, a result backend.
    accept_content=["json", "pickle"],
    task_serializer="pickle",
    result_backend=os.environ["PROJ_BROKER_URL"],
    task_routes={"proj.tasks.*": {"queue": "proj"}},
    task_queues=[Queue("celery"), Queue("proj")],
    broker_transport_options={"visibility_timeout": 7200},
    beat_schedule={
        "nightly-report": {
            "task": "saga.start",
            "schedule": crontab(minute=0, hour=3),
            "kwargs": {"saga": "proj.sagas:order", "input": {"item": "report"},
                       "schedule": "nightly-report"},
        },
    },
)
saga.celery.install(app)
"""

TASKS = """
from proj.celery_app import app


@app.task
def add(x, y):
    return {"sum": x + y, "type": type(x).__name__}
"""

SAGAS = """
from saga import RetryPolicy, Saga, StepContext, WorkflowContext, step, workflow

fast = RetryPolicy(max_attempts=3, initial_backoff_seconds=0.1, max_backoff_seconds=0.2)


def reserve(ctx: StepContext, order: dict) -> dict:
    return {"reserved": order["item"]}


def book_flight(ctx: StepContext, held: dict) -> dict:
    if ctx.attempt == 1:
        raise RuntimeError("the airline timed out (first attempt, on purpose)")
    return {**held, "flight": "FL-1"}


def cancel(ctx: StepContext, value: dict | None) -> None:
    return None


def doomed(ctx: StepContext, order: dict) -> dict:
    raise ValueError("this step always fails")


order = Saga("proj_order", [reserve, step(book_flight, retry=fast)])
broken = Saga(
    "proj_broken",
    [step(reserve, compensate=cancel), step(doomed, retry=RetryPolicy(max_attempts=1))],
)


def double(ctx: StepContext, n: int) -> int:
    return 2 * n


@workflow("proj_flow")
def flow(ctx: WorkflowContext, n: int) -> int:
    return ctx.step(double, ctx.step(double, n))


def to_a(ctx: StepContext, n: int) -> int:
    return n + 1


def to_b(ctx: StepContext, n: int) -> int:
    return n * 10


routed = Saga("proj_routed", [to_a, step(to_b, queue="qb")])
"""


def write_project(folder: Path) -> Path:
    package = folder / "proj"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "celery_app.py").write_text(CELERY_APP)
    (package / "tasks.py").write_text(TASKS)
    (package / "sagas.py").write_text(SAGAS)
    return folder


def project_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of the project's processes: the engine's settings, except the broker,
    which is the project's own (``PROJ_BROKER_URL``); ``PYTHONPATH`` has the engine's clone but
    not the project (as for an installed engine: the project folder is the working folder)."""
    env = settings.child_env()
    env["PROJ_BROKER_URL"] = env.pop("SAGA_BROKER_URL")
    env["PYTHONPATH"] = str(ROOT)
    # Celery refuses to run as root with pickle accepted (the project accepts it for its own
    # tasks); test containers run as root.
    env["C_FORCE_ROOT"] = "1"
    return {**env, **extra}


def celery(folder: Path, env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """``celery -A proj.celery_app ARGS`` to completion; its output (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "proj.celery_app", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"celery {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done.stdout


def start_worker(
    procs: ProcessGroup, folder: Path, env: dict[str, str], name: str, *args: str
) -> Process:
    argv = [sys.executable, "-m", "celery", "-A", "proj.celery_app", "worker"]
    argv += ["--loglevel=INFO", f"--hostname={name}@%h", "--without-mingle", *args]
    return procs.command(name, argv, env, cwd=folder)


def start_relay(procs: ProcessGroup, folder: Path, env: dict[str, str]) -> Process:
    argv = [sys.executable, "-m", "saga", "--log-level", "INFO", "relay"]
    return procs.command("relay", [*argv, "--app", "proj.celery_app"], env, cwd=folder)


def python(folder: Path, env: dict[str, str], code: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env={**env, "PYTHONPATH": os.pathsep.join([str(folder), env["PYTHONPATH"]])},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{code}: {done.stdout}\n{done.stderr}"
    return done.stdout
