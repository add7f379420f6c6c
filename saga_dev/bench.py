"""``saga bench core``: the engine against raw Celery on the same broker, in one invocation.

Both sides get two solo workers with the same safe Celery settings (JSON only, late acks,
prefetch 1), so what differs is what the engine adds: the journal, the outbox and the relay.

* latency: a sequential chain of N no-op steps, end to end, per step. Raw: a ``celery.chain``
  whose last task LPUSHes a token the bench BLPOPs. Durable: an N-step saga, awaited by LISTEN.
* throughput: many one-step runs at once, from the first start to the last completion. Raw:
  tasks that INCR a counter, the one reaching the total LPUSHes a token. Durable: one-step
  sagas started from a few threads, counted by their ``saga_run_finished`` notifications.

The raw side signals through Redis, so the broker must be Redis. ``python -m saga_dev.bench
raw-worker`` is the raw side's worker entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import redis
from celery import Celery, chain
from kombu.exceptions import KombuError

from saga.client import SagaClient
from saga.errors import ConfigurationError, SagaError
from saga.migrate import migrate
from saga.settings import Settings
from saga.workers.app import create_app
from saga_dev.bench_sagas import CHAIN_LENGTHS, chain_ref

LATENCY_TARGET = 1.3  # saga ms/step may be at most this times raw Celery's
THROUGHPUT_TARGET = 0.7  # saga steps/s must be at least this share of raw Celery's
WORKERS = 2  # per side
STARTER_THREADS = 4  # durable starts wait on a synchronous commit: overlap a few of them
WARMUP_RUNS = 3
RUNS_PER_ROUND = 10
READY_TIMEOUT = 60.0
RUN_TIMEOUT = 60.0


# -- the raw side ---------------------------------------------------------------------------

_signal_clients: dict[str, redis.Redis] = {}


def redis_url(
    broker_url: str,
    why: str = "saga bench core needs a Redis broker (the raw side reports completion through it)",
) -> str:
    """The broker as a redis-py URL (kombu writes Unix sockets as ``redis+socket://``); ``why``
    starts the error for any other broker."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url.removeprefix("redis+socket://")
    if broker_url.startswith(("redis://", "rediss://")):
        return broker_url
    raise ConfigurationError(f"{why}; SAGA_BROKER_URL is {broker_url.split(':', 1)[0]}://")


def signal_client(broker_url: str) -> redis.Redis:
    client = _signal_clients.get(broker_url)
    if client is None:
        client = _signal_clients[broker_url] = redis.Redis.from_url(redis_url(broker_url))
    return client


def _noop(self: Any) -> None:
    pass


def _done(self: Any, key: str) -> None:
    signal_client(self.app.conf.broker_url).lpush(key, 1)


def _count(self: Any, key: str, total: int) -> None:
    client = signal_client(self.app.conf.broker_url)
    if client.incr(key) == total:
        client.lpush(key + ":done", 1)


def _whoami(self: Any, key: str) -> None:
    # Slow enough that two at once land on two idle workers (see bench_sagas.whoami).
    time.sleep(0.05)
    signal_client(self.app.conf.broker_url).lpush(key, os.getpid())


# Celery settings the raw app takes from the engine's app (workers/app.py), so both sides run
# with the same safety and delivery trade-offs.
_SHARED_CONF = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "event_serializer",
    "result_accept_content",
    "task_ignore_result",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "worker_prefetch_multiplier",
    "broker_transport_options",
    "broker_connection_retry_on_startup",
    "worker_hijack_root_logger",
    "worker_send_task_events",
    "task_send_sent_event",
    "worker_enable_remote_control",
    "task_track_started",
)


def raw_app(settings: Settings, queue: str) -> Celery:
    """A plain Celery app configured like the engine's, with the bench's tasks."""
    engine = create_app(settings)
    app = Celery("saga-bench-raw", broker=engine.conf.broker_url, set_as_current=False)
    app.conf.update({k: engine.conf[k] for k in _SHARED_CONF}, task_default_queue=queue)
    for name, fn in (
        ("bench.noop", _noop),
        ("bench.done", _done),
        ("bench.count", _count),
        ("bench.whoami", _whoami),
    ):
        app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True)(fn)
    return app


def worker_argv(queue: str, hostname: str) -> list[str]:
    # The same flags as `saga worker` (cli.cmd_worker) with --pool solo.
    return [
        "worker",
        "--loglevel=WARNING",
        "-Q",
        queue,
        "--pool=solo",
        "--without-gossip",
        "--without-mingle",
        f"--hostname={hostname}",
    ]


def raw_worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m saga_dev.bench raw-worker")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--hostname", required=True)
    args = parser.parse_args(argv)
    raw_app(Settings(), args.queue).worker_main(worker_argv(args.queue, args.hostname))
    return 0


# -- child processes ------------------------------------------------------------------------


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Children:
    """The processes the bench starts; all stopped on exit, however it exits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self._procs.append((name, proc, log))

    def check(self) -> None:
        """SagaError, with the end of its log, if a child has exited."""
        for name, proc, log in self._procs:
            if proc.poll() is not None:
                raise SagaError(
                    f"bench process {name} exited with code {proc.returncode}:\n{self.tail(log)}"
                )

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by role ("saga-worker", "raw-worker", "relay"); Linux only."""
        used: dict[str, float] = {}
        for name, proc, _ in self._procs:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            role = name.rstrip("0123456789").rstrip("-")
            used[role] = used.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return used

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.tail(log)}" for name, _, log in self._procs)

    @staticmethod
    def tail(log: Path, lines: int = 15) -> str:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                proc.terminate()  # Celery and the relay shut down warm on SIGTERM
        deadline = time.monotonic() + grace
        for _, proc, _ in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


# -- measuring ------------------------------------------------------------------------------


class RunWatcher:
    """A connection that LISTENs for finished runs; opened before they start, so none is missed.

    Only notifications are read on it: psycopg drops the rest of a batch when a ``notifies()``
    generator is closed early, which is harmless here because that only happens once every
    awaited run has been seen.
    """

    def __init__(self, database_url: str, check: Callable[[], None]) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._conn.execute("LISTEN saga_run_finished")
        self._check = check

    def close(self) -> None:
        self._conn.close()

    def wait(
        self, run_ids: Sequence[str], timeout: float, check: Callable[[], None] | None = None
    ) -> float:
        """Block until every run has finished; perf_counter() when the last one was seen.
        ``check`` (and the children's check) runs every second, to fail early."""
        pending = set(run_ids)
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SagaError(
                    f"{len(pending)} of {len(run_ids)} bench runs did not finish in {timeout:.0f} s"
                )
            for notify in self._conn.notifies(timeout=min(1.0, remaining)):
                pending.discard(notify.payload)
                if not pending:
                    break
            self._check()
            if check is not None:
                check()
        return time.perf_counter()


@dataclass
class Bench:
    settings: Settings  # with the bench's queue
    raw: Celery
    redis: redis.Redis
    children: Children
    watcher: RunWatcher
    clients: list[SagaClient]
    prefix: str  # of this invocation's Redis keys
    run_ids: list[str] = field(default_factory=list)  # every run started, deleted at the end
    _keys: int = 0

    def key(self, kind: str) -> str:
        self._keys += 1
        return f"{self.prefix}:{kind}:{self._keys}"

    def blpop(self, key: str, timeout: float) -> tuple[float, bytes]:
        """(perf_counter() when it came, value) of the next item on ``key``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SagaError(f"raw Celery did not signal {key!r} in {timeout:.0f} s")
            item: Any = self.redis.blpop([key], timeout=min(1.0, remaining))
            if item is not None:
                return time.perf_counter(), bytes(item[1])
            self.children.check()

    def start(self, client: SagaClient, ref: str, value: Any, run_id: str) -> None:
        self.run_ids.append(run_id)
        client.start(ref, value, run_id=run_id)

    def states(self, run_ids: Sequence[str]) -> dict[str, int]:
        with psycopg.connect(self.settings.database_url or "", autocommit=True) as conn:
            rows = conn.execute(
                "SELECT state, count(*) FROM saga_runs WHERE run_id = ANY(%s) GROUP BY state",
                (list(run_ids),),
            ).fetchall()
        return {str(state): int(n) for state, n in rows}

    def expect_completed(self, run_ids: Sequence[str]) -> None:
        states = self.states(run_ids)
        if states.get("completed", 0) != len(run_ids):
            raise SagaError(f"bench runs did not all complete: {states}")

    # Readiness: both workers of a side have taken a message, so no measurement waits for one.

    def wait_raw_ready(self) -> None:
        key, pids = self.key("ready"), set[bytes]()
        while len(pids) < WORKERS:
            for _ in range(WORKERS):
                self.raw.send_task("bench.whoami", args=(key,))
            for _ in range(WORKERS):
                pids.add(self.blpop(key, READY_TIMEOUT)[1])

    def wait_saga_ready(self) -> None:
        pids: set[Any] = set()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(pids) < WORKERS:
            ids = [uuid.uuid4().hex for _ in range(WORKERS)]
            for run_id in ids:
                self.start(self.clients[0], "saga_dev.bench_sagas:whoami_saga", None, run_id)
            self.watcher.wait(ids, max(1.0, deadline - time.monotonic()))
            self.expect_completed(ids)
            pids.update(self.clients[0].run(run_id).result for run_id in ids)

    # Latency: one sequential chain at a time.

    def raw_chain_ms(self, steps: int) -> float:
        key = self.key("chain")
        tasks = [self.raw.signature("bench.noop", immutable=True) for _ in range(steps - 1)]
        sig = chain(*tasks, self.raw.signature("bench.done", args=(key,), immutable=True))
        began = time.perf_counter()
        sig.apply_async()
        ended, _ = self.blpop(key, RUN_TIMEOUT)
        return (ended - began) * 1000

    def saga_chain_ms(self, steps: int) -> float:
        run_id = uuid.uuid4().hex
        began = time.perf_counter()
        self.start(self.clients[0], chain_ref(steps), 0, run_id)
        ended = self.watcher.wait([run_id], RUN_TIMEOUT)
        return (ended - began) * 1000

    # Throughput: ``runs`` one-step runs at once.

    def raw_steps_per_s(self, runs: int) -> float:
        key = self.key("count")
        began = time.perf_counter()
        with self.raw.producer_or_acquire() as producer:
            for _ in range(runs):
                self.raw.send_task("bench.count", args=(key, runs), producer=producer)
        ended, _ = self.blpop(key + ":done", RUN_TIMEOUT + runs * 0.05)
        self.redis.delete(key, key + ":done")
        return runs / (ended - began)

    def saga_steps_per_s(self, runs: int) -> float:
        return runs / self.saga_runs_seconds(runs, steps=1)

    def saga_runs_seconds(
        self,
        runs: int,
        steps: int,
        *,
        ref: str | None = None,
        value: Callable[[int], Any] = lambda i: 0,
        timeout: float | None = None,
        started: Callable[[], object] | None = None,
    ) -> float:
        """Start ``runs`` runs of ``steps`` no-op steps at once, from a few threads; seconds
        from the first start to the last completion. Another saga: ``ref``, run ``i`` with
        input ``value(i)``, started in order of ``i`` (each thread takes every n-th);
        ``started`` is called once every run has started."""
        ids = [uuid.uuid4().hex for _ in range(runs)]
        self.run_ids.extend(ids)
        ref = ref or chain_ref(steps)
        errors: list[BaseException] = []

        def starter(client: SagaClient, part: Sequence[int]) -> None:
            try:
                for i in part:
                    client.start(ref, value(i), run_id=ids[i])
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(
                target=starter, args=(client, range(runs)[i :: len(self.clients)]), daemon=True
            )
            for i, client in enumerate(self.clients)
        ]

        def join_starters() -> None:
            for t in threads:
                t.join()
            if started is not None and not errors:
                started()

        all_started = threading.Thread(target=join_starters, daemon=True)

        def check() -> None:
            if errors:
                raise errors[0]

        began = time.perf_counter()
        for t in threads:
            t.start()
        all_started.start()
        try:
            ended = self.watcher.wait(ids, timeout or RUN_TIMEOUT + runs * steps * 0.05, check)
        finally:
            all_started.join()
        check()
        self.expect_completed(ids)
        return ended - began

    def cleanup(self) -> None:
        """Delete this bench's runs, its outbox rows and its Redis keys; best effort."""
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.settings.database_url or "", autocommit=True) as conn,
        ):
            conn.execute("DELETE FROM saga_runs WHERE run_id = ANY(%s)", (self.run_ids,))
            conn.execute("DELETE FROM saga_outbox WHERE destination = %s", (self.settings.queue,))
        with contextlib.suppress(redis.RedisError):
            keys = list(self.redis.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                self.redis.delete(*keys)


def purge(app: Celery, queue: str) -> None:
    """Drop messages a previous, interrupted bench left in its queue."""
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def _with_cpu(
    bench: Bench, rate: Callable[[int], float], runs: int, roles: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """steps/s, and CPU ms per step of ``roles`` and of this process (the client side)."""
    before, client = bench.children.cpu_seconds(), time.process_time()
    steps_per_s = rate(runs)
    client, after = time.process_time() - client, bench.children.cpu_seconds()
    cpu = {r: (after[r] - before[r]) * 1000 / runs for r in roles if r in after and r in before}
    cpu["client"] = client * 1000 / runs
    return steps_per_s, cpu


def _median_rounds(rounds: list[list[float]]) -> tuple[float, list[float]]:
    return statistics.median([x for r in rounds for x in r]), [statistics.median(r) for r in rounds]


def measure(bench: Bench, steps: int, runs: int, repeat: int) -> dict[str, Any]:
    bench.wait_raw_ready()
    bench.wait_saga_ready()
    for _ in range(WARMUP_RUNS):  # imports, connections, plans, caches: not counted
        bench.raw_chain_ms(steps)
        bench.saga_chain_ms(steps)
    warm = min(runs, 100)
    bench.raw_steps_per_s(warm)
    bench.saga_steps_per_s(warm)

    # Interleaved rounds, alternating which side goes first, so drift hits both.
    raw_lat: list[list[float]] = []
    saga_lat: list[list[float]] = []
    raw_tp: list[tuple[float, dict[str, float]]] = []
    saga_tp: list[tuple[float, dict[str, float]]] = []
    for r in range(repeat):
        sides: list[Callable[[], None]] = [
            lambda: raw_lat.append(
                [bench.raw_chain_ms(steps) / steps for _ in range(RUNS_PER_ROUND)]
            ),
            lambda: saga_lat.append(
                [bench.saga_chain_ms(steps) / steps for _ in range(RUNS_PER_ROUND)]
            ),
        ]
        for side in sides if r % 2 == 0 else reversed(sides):
            side()
    for r in range(repeat):
        sides = [
            lambda: raw_tp.append(_with_cpu(bench, bench.raw_steps_per_s, runs, ["raw-worker"])),
            lambda: saga_tp.append(
                _with_cpu(bench, bench.saga_steps_per_s, runs, ["saga-worker", "relay"])
            ),
        ]
        for side in sides if r % 2 == 0 else reversed(sides):
            side()

    raw_ms, raw_ms_rounds = _median_rounds(raw_lat)
    saga_ms, saga_ms_rounds = _median_rounds(saga_lat)
    raw_sps = statistics.median(r for r, _ in raw_tp)
    saga_sps = statistics.median(r for r, _ in saga_tp)
    latency_ratio, throughput_ratio = saga_ms / raw_ms, saga_sps / raw_sps
    return {
        "raw_ms_per_step": round(raw_ms, 3),
        "saga_ms_per_step": round(saga_ms, 3),
        "latency_ratio": round(latency_ratio, 3),
        "raw_steps_per_s": round(raw_sps, 1),
        "saga_steps_per_s": round(saga_sps, 1),
        "throughput_ratio": round(throughput_ratio, 3),
        "targets": {
            "latency_ratio": {"max": LATENCY_TARGET, "pass": latency_ratio <= LATENCY_TARGET},
            "throughput_ratio": {
                "min": THROUGHPUT_TARGET,
                "pass": throughput_ratio >= THROUGHPUT_TARGET,
            },
        },
        "rounds": {
            "raw_ms_per_step": [round(x, 3) for x in raw_ms_rounds],
            "saga_ms_per_step": [round(x, 3) for x in saga_ms_rounds],
            "raw_steps_per_s": [round(r, 1) for r, _ in raw_tp],
            "saga_steps_per_s": [round(r, 1) for r, _ in saga_tp],
            # Each round's sides ran back to back: their ratio shrugs off slow drift.
            "latency_ratio": [
                round(s / r, 3) for s, r in zip(saga_ms_rounds, raw_ms_rounds, strict=True)
            ],
            "throughput_ratio": [
                round(s / r, 3) for (s, _), (r, _) in zip(saga_tp, raw_tp, strict=True)
            ],
        },
        # Where throughput goes, less noisy than wall time; Postgres and Redis not included.
        "cpu_ms_per_step": {"raw": _median_cpu(raw_tp), "saga": _median_cpu(saga_tp)},
    }


def _median_cpu(rounds: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    roles = rounds[0][1].keys()
    return {r: round(statistics.median(c[r] for _, c in rounds), 3) for r in roles}


# -- the harness (core, coordinator, tracing) ----------------------------------------------


def prepare(settings: Settings, queue: str, raw_queue: str | None = None) -> Settings:
    """``settings`` with the bench's ``queue``, once Redis answers, the schema is migrated and
    the bench's queues are purged."""
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    with redis.Redis.from_url(redis_url(settings.broker_url)) as signals:
        signals.ping()  # fail fast, before Celery's connection retries
    migrate(settings.database_url)
    raw = raw_app(settings, queue)
    for name in (raw_queue, queue):
        if name is not None:
            purge(raw, name)
    return settings.model_copy(update={"queue": queue})


def _saga_hostname(i: int) -> str:
    return f"bench-saga{i}@%h"


def _launch(
    children: Children,
    env: dict[str, str],
    raw_queue: str | None,
    hostname: Callable[[int], str],
    workers: int = WORKERS,
    pool: Sequence[str] = ("--pool", "solo"),
) -> None:
    for i in range(1, workers + 1):
        children.start(
            f"saga-worker-{i}",
            [
                sys.executable,
                "-m",
                "saga",
                "worker",
                *pool,
                "--loglevel",
                "WARNING",
                "--hostname",
                hostname(i),
            ],
            env,
        )
        if raw_queue is not None:
            children.start(
                f"raw-worker-{i}",
                [
                    sys.executable,
                    "-m",
                    "saga_dev.bench",
                    "raw-worker",
                    "--queue",
                    raw_queue,
                    "--hostname",
                    f"bench-raw{i}@%h",
                ],
                env,
            )
    children.start("relay", [sys.executable, "-m", "saga", "relay"], env)


@contextlib.contextmanager
def bench_harness(
    settings: Settings,
    raw_queue: str | None = None,
    *,
    env: dict[str, str] | None = None,
    hostname: Callable[[int], str] = _saga_hostname,
    workers: int = WORKERS,
    pool: Sequence[str] = ("--pool", "solo"),
) -> Iterator[Bench]:
    """A Bench on ``settings`` (from ``prepare``): ``workers`` saga workers (``saga worker``
    flags ``pool``) and a relay, plus as many raw Celery workers on ``raw_queue`` if given,
    logging to a temporary directory. On exit the processes are stopped and the bench's runs
    and Redis keys deleted."""
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    # A suite without raw workers never sends on it, but a Bench holds one.
    raw = raw_app(settings, raw_queue or f"{settings.queue}-raw-unused")
    with (
        tempfile.TemporaryDirectory(prefix="saga-bench-") as log_dir,
        Children(Path(log_dir)) as children,
        contextlib.ExitStack() as stack,
    ):
        signals = redis.Redis.from_url(redis_url(settings.broker_url))
        stack.callback(signals.close)
        _launch(
            children,
            settings.child_env() if env is None else env,
            raw_queue,
            hostname,
            workers,
            pool,
        )
        watcher = RunWatcher(settings.database_url, children.check)
        stack.callback(watcher.close)
        clients = [SagaClient(settings) for _ in range(STARTER_THREADS)]
        for client in clients:
            stack.callback(client.close)
        bench = Bench(
            settings,
            raw,
            signals,
            children,
            watcher,
            clients,
            prefix=f"saga-bench:{uuid.uuid4().hex[:12]}",
        )
        try:
            yield bench
        finally:
            children.stop()  # before deleting the runs their messages name
            bench.cleanup()


# -- the command ----------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the children are stopped either way."""

    def interrupt(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cpu_busy(seconds: float = 0.5) -> float | None:
    """Share of all CPUs busy over ``seconds`` (Linux), or None where /proc/stat is missing."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def bench_core(settings: Settings, steps: int, runs: int, repeat: int) -> dict[str, Any]:
    assert settings.database_url and settings.broker_url, "cli.resolve() fills both"
    began = time.monotonic()
    busy_before = _cpu_busy()
    raw_queue = f"{settings.queue}-bench-raw"
    durable = prepare(settings, f"{settings.queue}-bench", raw_queue)
    with bench_harness(durable, raw_queue) as bench:
        try:
            figures = measure(bench, steps, runs, repeat)
        except SagaError as exc:
            raise SagaError(f"{exc}\n{bench.children.logs()}") from exc
    return {
        "suite": "core",
        "broker": settings.broker_url.split(":", 1)[0],
        "steps": steps,
        "runs": runs,
        "repeat": repeat,
        "workers_per_side": WORKERS,
        **figures,
        # Other work on the machine skews both sides; this says how busy it was just before.
        "cpus": os.cpu_count(),
        "cpu_busy_before": None if busy_before is None else round(busy_before, 3),
        "elapsed_s": round(time.monotonic() - began, 1),
    }


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    t = report["targets"]
    verdict = {True: "pass", False: "FAIL"}
    latency = f"latency, ms/step ({report['steps']}-step chain)"
    throughput = f"throughput, steps/s ({report['runs']} runs)"
    busy = report["cpu_busy_before"]
    lines = [
        f"saga bench core: broker {report['broker']}, {report['workers_per_side']} solo "
        f"workers per side, {report['cpus']} CPUs "
        f"({'?' if busy is None else f'{busy:.0%}'} busy before), {report['elapsed_s']} s",
        "",
        f"{'':34} {'raw Celery':>12} {'saga':>12} {'ratio':>8}  target",
        f"{latency:34} {report['raw_ms_per_step']:>12.3f} {report['saga_ms_per_step']:>12.3f} "
        f"{report['latency_ratio']:>8.3f}  <= {t['latency_ratio']['max']} "
        f"{verdict[t['latency_ratio']['pass']]}",
        f"{throughput:34} {report['raw_steps_per_s']:>12.1f} "
        f"{report['saga_steps_per_s']:>12.1f} {report['throughput_ratio']:>8.3f}  "
        f">= {t['throughput_ratio']['min']} {verdict[t['throughput_ratio']['pass']]}",
        "",
        "per round (medians):",
    ]
    lines += [f"  {name:<18} {values}" for name, values in report["rounds"].items()]
    lines.append("CPU ms per step in throughput rounds (without Postgres and Redis):")
    for side, cpu in report["cpu_ms_per_step"].items():
        lines.append(f"  {side:<18} " + ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items()))
    print("\n".join(lines), file=out)


def run_and_print(
    make_report: Callable[[], dict[str, Any]],
    print_table: Callable[[dict[str, Any], IO[str]], None],
    as_json: bool,
    errors: tuple[type[BaseException], ...],
) -> int:
    """The end of ``saga bench SUITE``: the report as JSON or a table; ``errors`` (from the
    drivers) become a SagaError; Ctrl-C exits 130."""
    try:
        report = make_report()
    except KeyboardInterrupt:
        print("saga bench: interrupted", file=sys.stderr)
        return 130
    except errors as exc:
        raise SagaError(f"bench failed: {type(exc).__name__}: {exc}") from exc
    if as_json:
        print(json.dumps(report))
    else:
        print_table(report, sys.stdout)
    return 0


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.steps not in CHAIN_LENGTHS:
        raise ConfigurationError(f"--steps must be one of {list(CHAIN_LENGTHS)}, got {args.steps}")
    if args.runs < 1 or args.repeat < 1:
        raise ConfigurationError("--runs and --repeat must be at least 1")

    def make_report() -> dict[str, Any]:
        with _sigterm_interrupts():
            return bench_core(settings, args.steps, args.runs, args.repeat)

    errors = (redis.RedisError, psycopg.Error, KombuError, OSError)
    return run_and_print(make_report, print_table, args.json, errors)


if __name__ == "__main__":
    if sys.argv[1:2] != ["raw-worker"]:
        sys.exit("usage: python -m saga_dev.bench raw-worker --queue QUEUE --hostname NAME")
    sys.exit(raw_worker_main(sys.argv[2:]))
