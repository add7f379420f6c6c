"""``saga bench agent``: the travel agent, four ways, on one workload, in one invocation.

The workload: ``--runs`` trips of ``--steps`` turns each. A turn is a model completion (through
the openai client, from the local model server) and, on every turn but the last, the tool it
chose (a look-up, a booking or an email at the local travel service). A turn fails with
probability ``--failure-rate``, split evenly between the model call and the tool call: each fails
with probability ``1 - sqrt(1 - f)``. Model faults are 500s, 429s with Retry-After, timeouts,
prose where JSON was asked for and unknown tools; tool faults are 500s (nothing applied) and lost
answers (applied, then a 502).

The systems:

* ``plain``: the turns as a sequential script, no retries: a failure ends the run.
* ``celery_autoretry``: a Celery chain of one task per turn with ``autoretry_for=(Exception,)``
  and the same number of attempts as the saga, on two raw Celery workers (late acks). A retry
  re-runs the whole turn: the completion and the tool, without idempotency keys.
* ``saga``: the ``saga_dev.travel_agent`` workflow on this engine, two workers and a relay.
* ``saga_with_kills``: the same, while every ``--kill-every`` seconds a random worker that is
  running a step is killed (SIGKILL) and restarted.
* ``celery_autoretry_with_kills`` (optional, ``--systems``): the Celery chain under the same
  kills; its lost turns come back after Redis's visibility timeout, from an idle poll.

The counts come from the servers, not the engine: the model server counts every request by its
logical step (the conversation and its turn), the travel service every effect by what it is.

* ``completion``: the fraction of runs that finished.
* ``model_calls``: requests that reached the model, answered or failed (a provider's replay of
  an idempotency key's cached answer is not one; see ``provider_replays``).
* ``model_calls_needed``: steps answered + failed attempts: what an ideal client pays.
* ``steps_rerun``: completions answered, then asked for and answered again.
* ``duplicate_effects``: bookings, cancellations or emails applied twice.

``python -m saga_dev.bench_agent celery-worker`` is the Celery side's worker entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
from celery import Celery, Task, chain

from saga.client import SagaClient
from saga.errors import ConfigurationError, WaitTimeoutError
from saga.migrate import migrate
from saga.settings import Settings
from saga_dev.bench import redis_url, run_and_print
from saga_dev.testing import ServerProcess
from saga_dev.travel_agent import TravelTask, first_messages, take_turn, travel_agent

MODEL_CLIENT_TIMEOUT = 1.0  # seconds; the model server's 'timeout' fault stalls past it
MODEL_STALL = 1.5
RETRY_AFTER = 0.1
BACKOFF = 0.05  # first retry delay, both Celery and the saga
WORKERS = 2
STALL_LIMIT = 60.0  # a system making no progress this long is given up on
WORKER_GRACE = 5.0  # a restarted worker is not killed again sooner
# Celery's late-acked turns lost with a killed worker come back only after the visibility
# timeout, and only when kombu restores them from an idle poll: that side gets more patience.
CELERY_VISIBILITY_TIMEOUT = 10.0
CELERY_KILLS_STALL_LIMIT = 180.0
SYSTEMS = ("plain", "celery_autoretry", "saga", "saga_with_kills")  # the headline
OPTIONAL_SYSTEMS = ("celery_autoretry_with_kills",)


def split_rate(failure_rate: float) -> float:
    """Per-call fault rate such that a turn (a completion and a tool call) fails with
    ``failure_rate``."""
    return 1 - math.sqrt(1 - failure_rate)


# -- the Celery side --------------------------------------------------------------------------


_NEEDS_REDIS = "saga bench agent needs a Redis broker (the Celery side reports through it)"


def done_key(queue: str) -> str:
    return f"{queue}:done"


class _ReportingTask(Task):  # type: ignore[misc]
    """Reports a run whose turn failed for good (its retries used up)."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        state = args[0] if args else {}
        _report(self.app, state.get("run", -1), ok=False, error=f"{type(exc).__name__}: {exc}")


_reporters: dict[str, redis.Redis] = {}


def _report(app: Celery, run: int, *, ok: bool, error: str | None = None) -> None:
    queue = str(app.conf.task_default_queue)
    _reporter(app).lpush(done_key(queue), json.dumps({"run": run, "ok": ok, "error": error}))


def busy_key(queue: str) -> str:
    return f"{queue}:busy"


def _reporter(app: Celery) -> redis.Redis:
    url = redis_url(str(app.conf.broker_url), _NEEDS_REDIS)
    return _reporters.get(url) or _reporters.setdefault(url, redis.Redis.from_url(url))


def _agent_turn(self: Task, state: dict[str, Any]) -> dict[str, Any]:
    """One turn, decide and act, as one Celery task: a retry re-runs both."""
    if state["answer"] is not None:
        return state
    # Marks this worker busy, so the bench kills it mid-turn as it kills saga workers mid-step.
    busy = busy_key(str(self.app.conf.task_default_queue))
    _reporter(self.app).sadd(busy, os.getpid())
    try:
        task = TravelTask.model_validate(state["task"])
        messages, answer = take_turn(task, state["messages"])
    finally:
        _reporter(self.app).srem(busy, os.getpid())
    return {**state, "messages": messages, "answer": answer}


def _report_run(self: Task, state: dict[str, Any]) -> None:
    _report(self.app, state["run"], ok=state["answer"] is not None)


def celery_app(broker_url: str, queue: str, attempts: int) -> Celery:
    app = Celery("agent-bench", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        # A killed worker's unacknowledged tasks come back after this long (Redis).
        broker_transport_options={"visibility_timeout": CELERY_VISIBILITY_TIMEOUT},
    )

    app.task(
        name="bench.agent_turn",
        bind=True,
        base=_ReportingTask,
        autoretry_for=(Exception,),
        max_retries=attempts - 1,
        default_retry_delay=BACKOFF,
        retry_backoff=False,
    )(_agent_turn)
    app.task(name="bench.report", bind=True)(_report_run)
    return app


def celery_worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m saga_dev.bench_agent celery-worker")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--attempts", type=int, required=True)
    args = parser.parse_args(argv)
    broker = Settings().broker_url
    if not broker:
        raise ConfigurationError("SAGA_BROKER_URL is not set")
    app = celery_app(broker, args.queue, args.attempts)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "-Q",
            args.queue,
            f"--hostname={args.hostname}",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=WARNING",
        ]
    )
    return 0


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Children:
    """Processes this bench started; each in its own session, so a kill takes all of it."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)
    closing: list[Callable[[], None]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("ab")
        self.logs.append(log)
        self.procs[name] = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()
        for close in [*self.closing, *(log.close for log in self.logs)]:
            close()
        self.logs.clear()
        self.closing.clear()


@contextlib.contextmanager
def children(log_dir: Path, sig: signal.Signals = signal.SIGTERM) -> Iterator[Children]:
    group = Children(log_dir)
    try:
        yield group
    finally:
        group.stop(sig)


class Killer(threading.Thread):
    """Every ``every`` seconds, kills (SIGKILL) a random worker among those running a step at
    that instant, and starts a new one; a tick finding none kills nothing. A worker started
    less than ``WORKER_GRACE`` seconds (or ``every``) ago is spared: starting and its first
    step are slow (it imports the step's module), and killing it there again and again would
    only use up that step's attempts, measuring start-up."""

    def __init__(
        self,
        group: Children,
        names: list[str],
        restart: Callable[[str], None],
        busy: Callable[[], set[int]],
        every: float,
        rng: random.Random,
    ) -> None:
        super().__init__(name="killer", daemon=True)
        self.group, self.names, self.restart, self.busy = group, names, restart, busy
        self.every, self.rng = every, rng
        self.stopped = threading.Event()
        self.kills = 0
        self.started = dict.fromkeys(names, time.monotonic())

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            pids, now = self.busy(), time.monotonic()
            working = [
                n
                for n in self.names
                if self.group.procs[n].pid in pids
                and now - self.started[n] >= max(self.every, WORKER_GRACE)
            ]
            if not working:
                continue
            victim = self.rng.choice(working)
            self.group.kill(victim)
            self.kills += 1
            self.restart(victim)
            self.started[victim] = time.monotonic()


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Bench:
    settings: Settings
    runs: int
    steps: int
    failure_rate: float
    attempts: int
    kill_every: float
    seed: int
    model: ServerProcess
    service: ServerProcess
    env: dict[str, str]
    log_dir: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def task(self, system: str, i: int) -> TravelTask:
        return TravelTask(
            trip=f"{self.tag}-{system}-{i}",
            steps=self.steps,
            attempts=self.attempts,
            backoff_seconds=BACKOFF,
        )

    def prefix(self, system: str) -> str:
        return f"{self.tag}-{system}-"

    def measure(self, system: str, go: Callable[[], tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        self.model.reset()
        self.service.reset()
        self.service.control(count_trips=[self.prefix(system)])
        started = time.monotonic()
        completed, extra = go()
        elapsed = time.monotonic() - started
        # Only this system's trips count: a straggler of another system cannot add to them.
        m = self.model.stats(prefix=self.prefix(system))
        e = self.service.stats(prefix=self.prefix(system))
        return {
            "completion": completed / self.runs,
            "model_calls": m["calls"],
            "model_calls_needed": m["steps_answered"] + m["failed_attempts"],
            "steps_rerun": m["steps_answered_twice"],
            "duplicate_effects": e["duplicate_effects"],
            "runs_completed": completed,
            "model_failed_attempts": m["failed_attempts"],
            "model_faults": self.model.stats(detail="0")["faults"],
            "provider_replays": m["replays"],
            "tool_calls": e["requests"],
            "tool_failed_attempts": e["failed_attempts"],
            "effect_key_replays": e["duplicate_key_requests"],
            "effects_applied": e["effects_applied"],
            "elapsed_seconds": round(elapsed, 1),
            **extra,
        }

    def progress(self) -> tuple[int, int]:
        """Requests the two servers have seen: the Celery side's only sign of life."""
        return (
            self.model.stats(detail="0")["requests"],
            self.service.stats(detail="0")["requests"],
        )

    # plain ------------------------------------------------------------------------------------

    def plain(self) -> tuple[int, dict[str, Any]]:
        completed = 0
        for i in range(self.runs):
            task = self.task("plain", i)
            messages = first_messages(task)
            try:
                for _ in range(task.steps):
                    messages, answer = take_turn(task, messages)
                    if answer is not None:
                        completed += 1
                        break
            except Exception:  # no retries: any failure ends the run
                continue
        return completed, {}

    # celery -----------------------------------------------------------------------------------

    def celery(self, system: str, kills: bool) -> tuple[int, dict[str, Any]]:
        assert self.settings.broker_url
        queue = f"bench-agent-{system}-{self.tag}"
        app = celery_app(self.settings.broker_url, queue, self.attempts)
        signals = redis.Redis.from_url(redis_url(self.settings.broker_url, _NEEDS_REDIS))
        env = {**self.settings.child_env(), **self.env}
        # Killed when done: a warm shutdown would go on running the chains it holds.
        spawned = {"n": 0}

        def worker(name: str) -> None:
            spawned["n"] += 1
            group.start(
                name,
                [
                    sys.executable,
                    "-m",
                    "saga_dev.bench_agent",
                    "celery-worker",
                    "--queue",
                    queue,
                    "--hostname",
                    f"{name}-{spawned['n']}-{self.tag}@%h",
                    "--attempts",
                    str(self.attempts),
                ],
                env,
            )

        with children(self.log_dir, signal.SIGKILL) as group:
            names = [f"{system}-{n}" for n in range(WORKERS)]
            for name in names:
                worker(name)

            def busy() -> set[int]:
                return {int(pid) for pid in signals.smembers(busy_key(queue))}

            killer = Killer(group, names, worker, busy, self.kill_every, random.Random(self.seed))
            turn, report = app.tasks["bench.agent_turn"], app.tasks["bench.report"]
            for i in range(self.runs):
                task = self.task(system, i)
                state = {
                    "run": i,
                    "task": task.model_dump(),
                    "messages": first_messages(task),
                    "answer": None,
                }
                chain(
                    turn.s(state), *[turn.s() for _ in range(task.steps - 1)], report.s()
                ).apply_async(queue=queue)
            if kills:
                killer.start()
            outcomes: dict[int, bool] = {}
            progress, last = self.progress(), time.monotonic()
            patience = CELERY_KILLS_STALL_LIMIT if kills else STALL_LIMIT
            while len(outcomes) < self.runs and time.monotonic() - last < patience:
                item = signals.brpop([done_key(queue)], timeout=1)
                if item is not None:
                    outcome = json.loads(item[1])
                    outcomes[outcome["run"]] = outcomes.get(outcome["run"], False) or outcome["ok"]
                # Chains advance breadth-first, so runs finish late: progress is any request.
                if item is not None or self.progress() != progress:
                    progress, last = self.progress(), time.monotonic()
            killer.stopped.set()
            if kills:
                killer.join()
        signals.delete(done_key(queue), busy_key(queue), queue)  # what is left of the chains
        signals.close()
        extra = {"runs_reported": len(outcomes), "worker_kills": killer.kills}
        return sum(outcomes.values()), extra

    # saga -------------------------------------------------------------------------------------

    def saga(self, system: str, kills: bool) -> tuple[int, dict[str, Any]]:
        settings = self.settings.model_copy(
            update={
                "queue": f"bench-agent-{system}-{self.tag}",
                "lease_seconds": 2.0,
                "dispatch_timeout_seconds": 5.0,
                "relay_poll_seconds": 0.2,
            }
        )
        env = {**settings.child_env(), **self.env}
        spawned = {"n": 0}

        def worker(name: str) -> None:
            spawned["n"] += 1
            group.start(
                name,
                [
                    sys.executable,
                    "-m",
                    "saga",
                    "worker",
                    "--pool",
                    "solo",
                    "--hostname",
                    f"{name}-{spawned['n']}-{self.tag}@%h",
                    "--loglevel",
                    "WARNING",
                ],
                env,
            )

        with children(self.log_dir) as group, SagaClient(settings) as client:
            group.start(
                f"{system}-relay",
                [sys.executable, "-m", "saga", "--log-level", "INFO", "relay"],
                env,
            )
            names = [f"{system}-worker-{n}" for n in range(WORKERS)]
            for name in names:
                worker(name)
            journal = psycopg.connect(str(settings.database_url), autocommit=True)
            group.closing.append(journal.close)

            def busy() -> set[int]:
                """Pids of the workers running a step of this system (lease owner
                'host:pid:token')."""
                rows = journal.execute(
                    "SELECT lease_owner FROM saga_steps WHERE state = 'running' "
                    "AND run_id LIKE %s AND lease_owner IS NOT NULL",
                    (prefix + "%",),
                ).fetchall()
                return {int(r[0].split(":")[1]) for r in rows}  # host:pid:boot:delivery

            prefix = self.prefix(system)
            killer = Killer(group, names, worker, busy, self.kill_every, random.Random(self.seed))
            run_ids = [
                client.start(
                    travel_agent,
                    self.task(system, i).model_dump(),
                    run_id=self.task(system, i).trip,
                )
                for i in range(self.runs)
            ]
            if kills:
                killer.start()
            pending = list(run_ids)
            progress, last = self.progress(), time.monotonic()
            try:
                while pending and time.monotonic() - last < STALL_LIMIT:
                    with contextlib.suppress(WaitTimeoutError):
                        client.wait(pending[0], timeout=1)
                        pending.pop(0)
                    if self.progress() != progress:
                        progress, last = self.progress(), time.monotonic()
            finally:
                killer.stopped.set()
                if kills:
                    killer.join()
            completed = sum(client.run(r).state == "completed" for r in run_ids)
            stalled = None
            if pending:  # say what was left, before stopping it
                open_steps = journal.execute(
                    "SELECT state, count(*) FROM saga_steps WHERE run_id LIKE %s "
                    "AND state NOT IN ('completed', 'cancelled') GROUP BY state",
                    (prefix + "%",),
                ).fetchall()
                stalled = {
                    "unfinished_runs": sum(not client.run(r).finished for r in run_ids),
                    "open_steps": dict(open_steps),
                    "alive": {n: p.poll() is None for n, p in group.procs.items()},
                }
            # Runs still going would be swept into the next system's queue: stop them here.
            unfinished = [r for r in run_ids if not client.run(r).finished]
            for run_id in unfinished:
                client.cancel(run_id, "the benchmark gave up on it")
            for run_id in unfinished:
                with contextlib.suppress(WaitTimeoutError):
                    client.wait(run_id, timeout=30)
            attempts = [s.attempt for r in run_ids for s in client.steps(r) if s.kind == "action"]
        return completed, {
            "stalled": stalled,
            "worker_kills": killer.kills,
            "journaled_steps": len(attempts),
            "journaled_failed_attempts": sum(a - 1 for a in attempts),
        }


def bench_agent(
    settings: Settings,
    runs: int,
    steps: int,
    failure_rate: float,
    *,
    attempts: int,
    kill_every: float,
    seed: int,
    systems: Sequence[str] = SYSTEMS,
    log: IO[str] | None = None,
) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url
    migrate(settings.database_url)
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM saga_runs WHERE state IN ('running', 'compensating')"
        ).fetchone()
    if row and row[0]:
        raise ConfigurationError(
            f"the database has {row[0]} active runs; the bench's relay would re-dispatch their "
            f"due steps to the bench's workers. Use a database without active runs"
        )
    log_dir = settings.state_dir.resolve() / "bench-agent"
    log_dir.mkdir(parents=True, exist_ok=True)
    rate = split_rate(failure_rate)
    model = ServerProcess(
        "saga_dev.testing.model_server",
        "--fault-rate",
        str(rate),
        "--seed",
        str(seed),
        "--timeout-seconds",
        str(MODEL_STALL),
        "--retry-after-seconds",
        str(RETRY_AFTER),
        log=log_dir / "model-server.log",
    )
    try:
        service = ServerProcess(
            "saga_dev.testing.effects_server",
            "--fault-rate",
            str(rate),
            "--seed",
            str(seed + 1),
            log=log_dir / "effects-server.log",
        )
    except BaseException:
        model.stop()
        raise
    env = {
        "SAGA_MODEL_BASE_URL": f"{model.url}/v1",
        "SAGA_MODEL_NAME": "scripted",
        "SAGA_MODEL_TIMEOUT_SECONDS": str(MODEL_CLIENT_TIMEOUT),
        "TRAVEL_SERVICE_URL": service.url,
        "TRAVEL_SERVICE_TIMEOUT": "5",
    }
    os.environ.update(env)  # the plain script runs in this process
    bench = Bench(
        settings,
        runs,
        steps,
        failure_rate,
        attempts,
        kill_every,
        seed,
        model,
        service,
        env,
        log_dir,
    )
    plans: dict[str, Callable[[], tuple[int, dict[str, Any]]]] = {
        "plain": bench.plain,
        "celery_autoretry": lambda: bench.celery("celery_autoretry", kills=False),
        "celery_autoretry_with_kills": lambda: bench.celery(
            "celery_autoretry_with_kills", kills=True
        ),
        "saga": lambda: bench.saga("saga", kills=False),
        "saga_with_kills": lambda: bench.saga("saga_with_kills", kills=True),
    }
    results: dict[str, Any] = {}
    try:
        for name in systems:
            if log is not None:
                print(f"saga bench agent: {name} ...", file=log, flush=True)
            results[name] = bench.measure(name, plans[name])
            if log is not None:
                print(f"  {_summary(results[name])}", file=log, flush=True)
    finally:
        service.stop()
        model.stop()
    return {
        "suite": "agent",
        "command": f"saga bench agent --json --runs {runs} --steps {steps} "
        f"--failure-rate {failure_rate}",
        "runs": runs,
        "steps": steps,
        "failure_rate": failure_rate,
        "model_fault_rate": round(rate, 4),
        "tool_fault_rate": round(rate, 4),
        "attempts_per_step": attempts,
        "kill_every_seconds": kill_every,
        "expected_plain_completion": round((1 - failure_rate) ** (steps - 1) * (1 - rate), 4),
        "systems": results,
        "targets": _targets(results),
    }


def _summary(r: dict[str, Any]) -> str:
    return (
        f"completion {r['completion']:.3f}, model calls {r['model_calls']} "
        f"(needed {r['model_calls_needed']}), steps rerun {r['steps_rerun']}, "
        f"duplicate effects {r['duplicate_effects']}, {r['elapsed_seconds']} s"
    )


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in ("saga", "saga_with_kills"):
        r = results.get(name)
        if r is None:
            continue
        out[name] = {
            "completion_is_1": r["completion"] == 1.0,
            "no_steps_rerun": r["steps_rerun"] == 0,
            "no_duplicate_effects": r["duplicate_effects"] == 0,
            "model_calls_as_needed": r["model_calls"] == r["model_calls_needed"],
        }
    return out


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    cols = (
        "completion",
        "model_calls",
        "model_calls_needed",
        "steps_rerun",
        "duplicate_effects",
        "elapsed_seconds",
    )
    print(
        f"{report['runs']} runs x {report['steps']} steps, failure rate {report['failure_rate']}"
        f" per step (expected plain completion {report['expected_plain_completion']})",
        file=out,
    )
    print(f"{'system':<18}" + "".join(f"{c:>20}" for c in cols), file=out)
    for name, r in report["systems"].items():
        print(f"{name:<18}" + "".join(f"{r[c]!s:>20}" for c in cols), file=out)
    for name, checks in report["targets"].items():
        verdict = "all met" if all(checks.values()) else f"MISSED: {checks}"
        print(f"targets for {name}: {verdict}", file=out)


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.runs < 1 or args.steps < 1:
        raise ConfigurationError("--runs and --steps must be at least 1")
    if not 0 <= args.failure_rate < 1:
        raise ConfigurationError("--failure-rate must be within 0..1 (1 excluded)")
    systems = [x for x in (args.systems or ",".join(SYSTEMS)).split(",") if x]
    unknown = sorted(set(systems) - {*SYSTEMS, *OPTIONAL_SYSTEMS})
    if unknown:
        raise ConfigurationError(
            f"unknown systems {unknown}; known: {[*SYSTEMS, *OPTIONAL_SYSTEMS]}"
        )

    def make_report() -> dict[str, Any]:
        return bench_agent(
            settings,
            args.runs,
            args.steps,
            args.failure_rate,
            attempts=args.attempts,
            kill_every=args.kill_every,
            seed=args.seed,
            systems=systems,
            log=sys.stderr,
        )

    errors = (redis.RedisError, OSError, RuntimeError)
    return run_and_print(make_report, print_table, args.json, errors)


if __name__ == "__main__":
    if sys.argv[1:2] != ["celery-worker"]:
        sys.exit(
            "usage: python -m saga_dev.bench_agent celery-worker --queue Q --hostname H "
            "--attempts N"
        )
    sys.exit(celery_worker_main(sys.argv[2:]))
