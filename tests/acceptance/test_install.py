"""A runtime-only install works: the wheel, without extras, in a fresh venv, used from a folder
that is not the clone (so neither ``saga_dev`` nor the clone's sources can be imported).

``saga migrate``, ``saga relay`` and ``saga worker`` run as real processes of that venv, and
``saga start --wait`` runs a two-step saga written into the folder, on Redis and on RabbitMQ.
What this guards against: a dependency the engine needs at run time that only the dev extras
bring (kombu's Redis transport imports ``packaging``, which only ``kombu[redis]`` installs).

pip fetches the dependencies from the index through its usual cache, so a second run installs
from the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from tests.conftest import AMQP_URL, BROKER_URL, unavailable
from tests.processes import ProcessGroup, wait_until

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: the engine and its two linked folders (as deploy/Dockerfile).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "saga", "workers", "outbox")

SAGA_MODULE = """
from saga import Saga, StepContext


def greet(ctx: StepContext, name: str) -> str:
    return f"hello {name}"


def shout(ctx: StepContext, text: str) -> str:
    return text.upper() + "!"


greeting = Saga("install_check", [greet, shout])
"""


def run(
    argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def clean_env(**saga: str) -> dict[str, str]:
    """This environment without anything that would reach the clone or the test's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SAGA_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    return {**env, **saga}


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding the wheel of this tree and its dependencies, no extras."""
    work = tmp_path_factory.mktemp("install")
    # Built from a copy: an in-tree build leaves build/ behind, whose stale files a later build
    # would put in the wheel.
    source = work / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    dist = work / "dist"
    pip = ["-m", "pip", "--disable-pip-version-check", "--quiet"]
    run(
        [sys.executable, *pip, "wheel", "--no-deps", "--wheel-dir", str(dist), str(source)],
        cwd=work,
    )
    (wheel,) = dist.glob("durable_saga-*.whl")
    run([sys.executable, "-m", "venv", str(work / "venv")], cwd=work, env=clean_env())
    python = work / "venv" / "bin" / "python"
    run([str(python), *pip, "install", str(wheel)], cwd=work, env=clean_env())
    yield python.parent
    shutil.rmtree(work, ignore_errors=True)  # pytest keeps its last temp folders: not venvs


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        request.getfixturevalue("redis_client")  # skips (or fails in CI) without Redis
        yield BROKER_URL
        return
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:  # kombu raises the socket's or py-amqp's own errors
        unavailable("RabbitMQ", exc)
    yield AMQP_URL


@pytest.mark.timeout(600)
def test_the_wheel_without_extras_runs_a_saga_outside_the_clone(
    venv_bin: Path,
    broker_url: str,
    empty_database_url: str,
    procs: ProcessGroup,
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    module = f"install_check_{uuid.uuid4().hex[:8]}"
    (app / f"{module}.py").write_text(SAGA_MODULE)
    queue = f"install-{uuid.uuid4().hex[:8]}"
    env = clean_env(
        SAGA_DATABASE_URL=empty_database_url,
        SAGA_BROKER_URL=broker_url,
        SAGA_QUEUE=queue,
        SAGA_STATE_DIR=str(tmp_path / "state"),
        SAGA_RELAY_POLL_SECONDS="0.2",
    )
    saga = str(venv_bin / "saga")
    where = run(
        [
            str(venv_bin / "python"),
            "-c",
            "import importlib.util, saga; "
            "print(importlib.util.find_spec('saga_dev') is None, saga.__file__)",
        ],
        cwd=app,
        env=env,
    )
    no_dev_tools, package = where.split()
    assert no_dev_tools == "True" and Path(package).is_relative_to(venv_bin.parent), where

    # From an empty database: the migrations are in the wheel.
    assert "applied migrations" in run([saga, "migrate"], cwd=app, env=env)
    relay = procs.command("relay", [saga, "--log-level", "INFO", "relay"], env, cwd=app)
    worker = procs.command(
        "worker", [saga, "worker", "--pool", "solo", "--loglevel", "INFO"], env, cwd=app
    )
    start = procs.command(
        "start",
        [saga, "start", f"{module}:greeting", "--input", '"world"', "--wait", "120"],
        env,
        cwd=app,
    )

    def finished() -> bool:
        for p in (relay, worker):  # one that dies (a missing module) fails the test at once
            assert p.alive(), f"saga {p.name} exited {p.popen.returncode}:\n{p.log()}"
        return not start.alive()

    try:
        wait_until(finished, 180, "saga start --wait to return")
    finally:
        if broker_url.startswith("amqp"):  # a durable queue outlives the test otherwise
            procs.stop_all()
            with Connection(broker_url) as conn:
                conn.default_channel.queue_delete(queue)
    out = start.log()
    assert start.popen.returncode == 0, out
    outcome = json.loads(out[out.index("{") :])  # after the run id
    assert outcome == {"state": "completed", "result": "HELLO WORLD!", "error": None}


def test_kombus_redis_transport_loads_in_the_runtime_only_venv(
    venv_bin: Path, tmp_path: Path
) -> None:
    """The import that fails without kombu[redis] (it needs redis and packaging), alone."""
    run(
        [str(venv_bin / "python"), "-c", "import kombu.transport.redis"],
        cwd=tmp_path,
        env=clean_env(),
    )
