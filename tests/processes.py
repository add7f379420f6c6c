"""Real worker and relay processes for tests, killed for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saga.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


class Process:
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """kill -9 the process and everything it started (its session)."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._log.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ProcessGroup:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []

    def spawn(
        self, name: str, settings: Settings, *args: str, env: dict[str, str] | None = None
    ) -> Process:
        env = {**settings.child_env(), **(env or {})}
        argv = [sys.executable, "-m", "saga", "--log-level", "INFO", *args]
        return self.command(name, argv, env)

    def command(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> Process:
        """Any command, with exactly this environment, stopped with the others."""
        process = Process(name, argv, env, self.log_dir / f"{name}.log", cwd)
        self.processes.append(process)
        return process

    def worker(
        self, settings: Settings, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> Process:
        return self.spawn(
            name,
            settings,
            "worker",
            "--pool",
            "solo",
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            *extra,
            env=env,
        )

    def prefork_worker(self, settings: Settings, *extra: str) -> Process:
        """A prefork worker with one pool child: a test can kill or recycle the child alone."""
        return self.spawn(
            "prefork",
            settings,
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            *extra,
        )

    def relay(self, settings: Settings, name: str = "relay", *extra: str) -> Process:
        return self.spawn(name, settings, "relay", *extra)

    def stop_all(self) -> None:
        for p in self.processes:
            if p.alive() or not p._log.closed:
                p.stop()

    def logs_tail(self, lines: int = 60) -> str:
        out = []
        for p in self.processes:
            tail = p.log().splitlines()[-lines:]
            out.append(f"----- {p.name} (pid {p.pid}) -----\n" + "\n".join(tail))
        return "\n".join(out)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_for_row(db: Any, query: str, params: tuple[object, ...], what: str) -> object:
    """Poll ``query`` until it returns a row (within 60 s); fail naming ``what``."""
    return wait_until(lambda: db.execute(query, params).fetchone(), 60, what)
