"""`saga demo` as a user runs it: interrupted, stalled, with a broken broker, and `scripts/demo`
in a fresh clone of the repository to its end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import BROKER_URL
from tests.processes import ROOT, wait_until

CLOSING = re.compile(
    r"run completed: .*\n(?:.*\n)*model server: (\d+) completions for (\d+) decisions "
    r"\(each answered once: True\)(?:.*\n)*see every step: saga show demo-\w+\n\Z"
)


def demo_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.pop("PYTHONPATH", None)
    return {
        **env,
        "SAGA_DATABASE_URL": database_url,
        "SAGA_BROKER_URL": BROKER_URL,
        "SAGA_STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",  # its lines as they come, for the test to follow
    }


class Demo:
    """A real `saga demo` process whose output goes to a file the test reads as it grows."""

    def __init__(self, env: dict[str, str], out: Path, *args: str) -> None:
        self.out = out
        with out.open("wb") as sink:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "saga", "demo", *args],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        def seen() -> bool:
            assert self.popen.poll() is None, f"the demo exited early:\n{self.output()}"
            return text in self.output()

        wait_until(seen, timeout, f"the demo to print {text!r}")

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            raise AssertionError(f"the demo did not end:\n{self.output()}") from None


@pytest.fixture
def demo_database(empty_database_url: str, redis_client: redis.Redis) -> Iterator[str]:
    yield empty_database_url


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after the command, which may hold anything


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def started_for(queue: str) -> list[int]:
    """Live processes started with this demo's queue in their environment (its relay and every
    worker, a restarted one too), whoever their parent is now."""
    marker = f"SAGA_QUEUE={queue}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if marker in environ.split(b"\0") and running(int(entry.name)):
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_demo_leaves_nothing_running_and_the_next_reports_its_own_run(
    signum: signal.Signals, demo_database: str, tmp_path: Path
) -> None:
    env = demo_env(demo_database, tmp_path)
    first = Demo(env, tmp_path / "first.out")
    first.wait_for("decide#1 ")  # its relay, worker and both servers are up
    children = descendants(first.popen.pid)
    roles = " | ".join(cmdline(pid) for pid in children)
    for role in ("saga relay", "saga worker", "model_server", "effects_server"):
        assert role in roles, roles
    interrupted = re.search(r"started run (demo-\w+)", first.output())
    assert interrupted
    assert len(started_for(interrupted[1])) >= 2  # the relay and the worker: the check sees them
    first.popen.send_signal(signum)
    assert first.finish() == 128 + signum, first.output()
    assert f"interrupted ({signum.name})" in first.output()
    assert [pid for pid in children if running(pid)] == []
    assert started_for(interrupted[1]) == []

    second = Demo(env, tmp_path / "second.out")
    assert second.finish() == 0, second.output()
    out = second.output()
    assert f"unfinished run(s) of earlier demos: {interrupted[1]}" in out
    closing = CLOSING.search(out)
    assert closing, out
    # The model server counts this run's completions only: one per decision.
    assert closing[1] == closing[2], out


@pytest.mark.timeout(300)
def test_a_demo_leaves_the_run_of_a_demo_still_running_alone(
    demo_database: str, tmp_path: Path
) -> None:
    env = demo_env(demo_database, tmp_path)
    first = Demo(env, tmp_path / "first.out")
    first.wait_for("decide#1 ")
    second = Demo(env, tmp_path / "second.out")
    for demo in (first, second):
        assert demo.finish() == 0, demo.output()
        assert CLOSING.search(demo.output()), demo.output()
    assert "earlier demos" not in second.output()


@pytest.mark.timeout(300)
def test_a_demo_that_stops_progressing_says_what_is_stuck(
    demo_database: str, tmp_path: Path
) -> None:
    # Long enough for its worker to start on a busy machine (the first step waits for it).
    stall = "8"
    demo = Demo(demo_env(demo_database, tmp_path), tmp_path / "demo.out", "--stall-seconds", stall)
    demo.wait_for("decide#1 ")
    children = descendants(demo.popen.pid)
    (worker,) = [pid for pid in children if "saga worker" in cmdline(pid)]
    os.kill(worker, signal.SIGSTOP)  # alive, holding its lease, doing nothing
    assert demo.finish() == 1, demo.output()
    out = demo.output()
    assert f"the demo stops: no step changed for {stall} s" in out
    assert re.search(r"its unfinished steps:\n  \S+#\d+ +\w+ +attempt \d", out), out
    assert "the last 30 lines of" in out
    assert [pid for pid in children if running(pid)] == []  # the stopped worker too


@pytest.mark.timeout(300)
def test_a_demo_whose_relay_exits_stops_with_its_message(
    demo_database: str, tmp_path: Path
) -> None:
    try:
        import pymongo  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pymongo is installed: mongodb:// is no missing transport here")
    env = {**demo_env(demo_database, tmp_path), "SAGA_BROKER_URL": "mongodb://127.0.0.1:1/x"}
    demo = Demo(env, tmp_path / "demo.out")
    assert demo.finish() == 1, demo.output()
    out = demo.output()
    assert re.search(r"the demo stops: the (relay|worker) \(pid \d+\) exited with code 2", out)
    assert "No module named 'pymongo'" in out  # from the log's tail


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scripts_demo_in_a_fresh_clone_runs_to_its_end(
    demo_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a user does first: clone, `scripts/demo`. The clone is of the committed HEAD (what
    CI has); its bootstrap makes the clone's own .venv, installing from pip's cache."""
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)],
        check=True,
        timeout=120,
    )
    env = {k: v for k, v in demo_env(demo_database, tmp_path).items() if k != "SAGA_STATE_DIR"}
    env.pop("VIRTUAL_ENV", None)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(clone / "scripts" / "demo")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        shutil.rmtree(clone, ignore_errors=True)  # pytest keeps its last temp folders: no venvs
    with capsys.disabled():  # how long a user waits: reported, not judged
        print(f"\nscripts/demo in a fresh clone took {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert CLOSING.search(proc.stdout), proc.stdout[-4000:]
