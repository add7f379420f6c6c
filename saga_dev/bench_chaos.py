"""``saga bench chaos``: mixed runs under real faults, judged from outside at the end.

The runs (``saga_dev.chaos_sagas``): half ``chaos_trip`` (a graph with parallel compensable
bookings and a pivot), half ``chaos_order`` (a workflow with a ``ctx.map`` fan-out and
compensations). A fraction fail for good on purpose, where their input says (decided from the
seed and the run's number), and a few are cancelled by the bench right after they start, so
compensations run under the chaos too.

Everything runs on servers of its own, so a flush or a restart touches nobody else: a private
Postgres and Redis (``saga.embedded``, Unix sockets only, in a temporary folder), the effects
server on a free loopback port, a relay and several workers (solo, and one prefork).

The faults, drawn by one seeded generator every ``--chaos-every`` seconds (about), each bounded
in count, until every run is finished or ``--duration-limit`` passes:

* ``kill -9`` of a worker (one running a step when there is one), restarted at once;
* ``kill -9`` of the relay (which also runs the sweeper), restarted after a short pause;
* a broker flush: ``FLUSHALL`` of the private Redis, or a restart of it, empty;
* a Postgres restart: ``pg_ctl restart -m fast``, or ``-m immediate`` (a crash: recovery);
* the effects server's own faults on every request, at ``--fault-rate``: ``error`` (a 500,
  nothing applied) and ``lost`` (applied, then a 502).

Then the chaos stops and the runs get ``--settle-seconds`` to finish. The invariants are
checked from outside: the effects server's record (per trip = run id) and SQL on the journal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import redis

from saga.client import SagaClient
from saga.embedded import _package_dir, _start_redis, _stop_redis, start_embedded, stop_embedded
from saga.errors import ConfigurationError, StoreError
from saga.migrate import migrate
from saga.settings import Settings
from saga_dev.bench import run_and_print
from saga_dev.bench_agent import Children
from saga_dev.chaos_sagas import GRAPH_FAILURES, WORKFLOW_FAILURES, chaos_order, chaos_trip
from saga_dev.testing import ServerProcess

TERMINAL = ("completed", "compensated", "failed", "compensation_failed", "cancelled")
WORKER_GRACE = 3.0  # a worker younger than this is not killed again (it is still importing)
RELAY_PAUSE = (0.2, 2.0)  # seconds the relay stays dead
IN_FLIGHT = 80  # at most this many unfinished runs (a tenth of them, at least 10): the chaos
# meets a steady load, at every stage of the runs, from the first to the last but a few
STALL_SECONDS = 60.0  # no step finishing this long while runs wait: stuck, stop starting more
EXAMPLES = 5  # examples kept per kind of violation

METHOD = (
    "Before each worker kill the bench reads the steps whose lease the worker's processes hold "
    "(state running, lease_owner host:pid:boot:delivery) with their attempt number a, and "
    "notes the "
    "kill time (wall clock; Postgres runs on the same host). A tracker then polls those steps "
    "every 0.2 s: the step resumed when its attempt becomes a + 1, at that claim's "
    "attempt_started_at. Resumption = attempt_started_at - kill time. A step whose attempt a "
    "ended with an outcome (it finished just before the kill) is not counted as interrupted; "
    "one whose run stopped it without a new claim (the run was compensating: the lost attempt "
    "fails, LeaseExpired, or a waiting step is cancelled) is counted apart; one seen "
    "only after a later claim (attempt > a + 1) is counted as unmeasured. The time includes "
    "the rest of the lease (lease_seconds), the sweep, the relay's publish and the wait in the "
    "broker queue behind the other runs' steps (about IN_FLIGHT runs are kept going); "
    "kill_to_redispatch_* stops at the first outbox row naming the step after the kill (the "
    "engine's recovery alone, before queueing)."
)


@dataclass
class ChaosConfig:
    runs: int = 1000
    seed: int = 1
    workers: int = 3  # solo workers, plus one prefork worker with two processes
    fault_rate: float = 0.05  # effects server, per request
    fail_rate: float = 0.3  # runs failing for good on purpose
    cancel_rate: float = 0.05  # runs the bench cancels right after starting them
    chaos_every: float = 1.0
    duration_limit: float = 900.0  # the chaos phase, starting included
    settle_seconds: float = 180.0
    max_worker_kills: int = 200
    max_relay_kills: int = 30
    max_broker_flushes: int = 20
    max_pg_restarts: int = 10
    lease_seconds: float = 2.0
    step_seconds: float = 0.1  # each step's work: long enough for kills to land mid-step


@dataclass
class Planned:
    run_id: str
    kind: str  # "graph" | "workflow"
    input: dict[str, Any]
    cancel: bool


def plan_runs(cfg: ChaosConfig, tag: str) -> list[Planned]:
    """Which runs, and which fail on purpose: from the seed and the run's number only."""
    out = []
    for i in range(cfg.runs):
        rng = random.Random(f"{cfg.seed}:{i}")
        kind = "graph" if i % 2 == 0 else "workflow"
        choices = GRAPH_FAILURES if kind == "graph" else WORKFLOW_FAILURES
        fail = rng.choice(choices) if rng.random() < cfg.fail_rate else ""
        value: dict[str, Any] = {"n": i, "fail": fail}
        if kind == "workflow":
            value["seats"] = 2 + i % 3
        cancel = not fail and rng.random() < cfg.cancel_rate
        out.append(Planned(f"chaos-{tag}-{i:05d}-{kind[0]}", kind, value, cancel))
    return out


def expected_states(p: Planned) -> set[str]:
    if p.cancel:  # a cancel that comes after the run finished changes nothing
        return {"cancelled", "completed"}
    if p.input["fail"] == "confirm":
        return {"failed"}
    return {"compensated"} if p.input["fail"] else {"completed"}


# -- the private servers ------------------------------------------------------------------------


class Servers:
    """A private Postgres and Redis under ``root`` (Unix sockets), to restart and flush."""

    def __init__(self, root: Path) -> None:
        self.root = root
        services = start_embedded(root)
        self.database_url = services.database_url
        self.broker_url = services.broker_url
        self.redis_url = services.redis_url
        self.pgdata = root / "pg"
        self.pg_log = root / "pg_ctl.log"

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = _package_dir("pgserver") / "pginstall" / "bin" / "pg_ctl"
        owner = self.pgdata.stat()
        as_root = os.geteuid() == 0
        # The postmaster inherits pg_ctl's stdout: a file, never a pipe we would wait on.
        with self.pg_log.open("ab") as log:
            result = subprocess.run(
                [str(pg_ctl), "-D", str(self.pgdata), "-w", "-t", "60", *args],
                cwd=self.pgdata,
                user=owner.st_uid if as_root else None,
                group=owner.st_gid if as_root else None,
                extra_groups=[] if as_root else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed; see {self.pg_log}")

    def restart_postgres(self, mode: str) -> None:
        self._pg_ctl("-m", mode, "restart")

    def flush_broker(self) -> None:
        with redis.Redis.from_url(self.redis_url) as r:
            r.flushall()

    def restart_broker(self) -> None:
        """Stopped, then started again empty (no persistence), on the same socket."""
        _stop_redis(self.root)
        _start_redis(self.root)

    def stop(self) -> None:
        stop_embedded(self.root)


def sql(url: str, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(query, params).fetchall()


# -- the chaos ----------------------------------------------------------------------------------


@dataclass
class Interrupted:
    run_id: str
    step_key: str
    attempt: int
    killed_at: float


@dataclass
class Chaos:
    cfg: ChaosConfig
    group: Children
    servers: Servers
    start_worker: Callable[[str], None]
    start_relay: Callable[[], None]
    workers: list[str]
    rng: random.Random
    counts: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, str]] = field(default_factory=list)
    interrupted: list[Interrupted] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # children that died without our kill
    started: dict[str, float] = field(default_factory=dict)
    stopped: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    began: float = field(default_factory=time.time)
    tried: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def log(self, what: str) -> None:
        self.events.append((round(time.time() - self.began, 2), what))

    def run(self) -> None:
        while not self.stopped.wait(self.cfg.chaos_every * self.rng.uniform(0.5, 1.5)):
            try:
                self.revive()
                action = self.draw()
                if action is not None:
                    action()
            # Any failure of a fault (a server slow to come back, a kill that did not take) is
            # counted and shown; the chaos, and the restarts it owes, go on.
            except Exception as exc:
                self.counts["chaos_errors"] += 1
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.log(f"chaos action failed: {type(exc).__name__}: {exc}")

    def draw(self) -> Callable[[], None] | None:
        c, cfg = self.counts, self.cfg
        # Each kind of fault once first (a short run still meets them all), then at random. A
        # worker kill waits for a worker old enough; a kind that keeps failing is given up.
        for done, budget, action in (
            ("pg_restarts", cfg.max_pg_restarts, self.restart_postgres),
            ("relay_kills", cfg.max_relay_kills, self.kill_relay),
            ("broker_flushes", cfg.max_broker_flushes, self.flush_broker),
            ("worker_kills", cfg.max_worker_kills, self.kill_worker),
        ):
            if not c[done] and budget and self.tried[done] < 5:
                self.tried[done] += 1
                return action
        options: list[tuple[float, Callable[[], None]]] = []
        if c["worker_kills"] < cfg.max_worker_kills:
            options.append((0.6, self.kill_worker))
        if c["relay_kills"] < cfg.max_relay_kills:
            options.append((0.15, self.kill_relay))
        if c["broker_flushes"] < cfg.max_broker_flushes:
            options.append((0.13, self.flush_broker))
        if c["pg_restarts"] < cfg.max_pg_restarts:
            options.append((0.12, self.restart_postgres))
        if not options:
            return None
        return self.rng.choices([a for _, a in options], [w for w, _ in options])[0]

    def revive(self) -> None:
        """A child that died by itself is a finding: noted, and started again."""
        for name, proc in list(self.group.procs.items()):
            if proc.poll() is not None:
                try:
                    text = (self.group.log_dir / f"{name}.log").read_text(errors="replace")
                except OSError:
                    text = ""
                tail = " | ".join(text.strip().splitlines()[-3:])[-600:]
                self.exits.append(f"{name} exited with code {proc.returncode}: {tail}")
                self.log(f"{name} exited by itself ({proc.returncode}); restarted")
                self._restart(name)

    def _restart(self, name: str) -> None:
        if name == "relay":
            self.start_relay()
        else:
            self.start_worker(name)
        self.started[name] = time.monotonic()

    def _pids(self, name: str) -> set[int]:
        """The worker's main process and its pool processes."""
        main = self.group.procs[name].pid
        pids = {main}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == main:
                        pids.add(int(entry.name))
        return pids

    def kill_worker(self) -> None:
        now = time.monotonic()
        ready = [n for n in self.workers if now - self.started.get(n, 0.0) >= WORKER_GRACE]
        if not ready:
            return
        leases = sql(
            self.servers.database_url,
            "SELECT run_id, step_key, attempt, lease_owner FROM saga_steps "
            "WHERE state = 'running' AND lease_owner IS NOT NULL",
        )
        held: dict[str, list[tuple[str, str, int]]] = {}
        pids = {n: self._pids(n) for n in ready}
        for run_id, step_key, attempt, owner in leases:
            pid = int(str(owner).split(":")[1])  # host:pid:boot:delivery
            for n in ready:
                if pid in pids[n]:
                    held.setdefault(n, []).append((run_id, step_key, attempt))
        victim = self.rng.choice(sorted(held) or ready)
        self.group.kill(victim)
        killed_at = time.time()
        self.counts["worker_kills"] += 1
        with self.lock:
            self.interrupted += [
                Interrupted(r, k, a, killed_at) for r, k, a in held.get(victim, [])
            ]
        self.log(f"kill -9 {victim} holding {len(held.get(victim, []))} leases")
        self._restart(victim)

    def kill_relay(self) -> None:
        self.group.kill("relay")
        self.counts["relay_kills"] += 1
        pause = self.rng.uniform(*RELAY_PAUSE)
        self.log(f"kill -9 relay, restarted after {pause:.1f} s")
        self.stopped.wait(pause)
        self._restart("relay")

    def flush_broker(self) -> None:
        if self.rng.random() < 0.5:
            self.servers.flush_broker()
            self.log("broker FLUSHALL")
        else:
            self.servers.restart_broker()
            self.log("broker restarted empty")
        self.counts["broker_flushes"] += 1

    def restart_postgres(self) -> None:
        mode = self.rng.choice(("fast", "immediate"))
        began = time.monotonic()
        self.servers.restart_postgres(mode)
        self.counts["pg_restarts"] += 1
        self.counts[f"pg_restarts_{mode}"] += 1
        self.log(f"postgres restart -m {mode} ({time.monotonic() - began:.1f} s)")


class Tracker(threading.Thread):
    """Polls the steps a killed worker held until each is claimed again (see METHOD)."""

    def __init__(self, chaos: Chaos, database_url: str) -> None:
        super().__init__(name="chaos-tracker", daemon=True)
        self.chaos, self.url = chaos, database_url
        self.stopped = threading.Event()
        self.latencies: list[float] = []
        self.resumed: list[Interrupted] = []
        self.outcomes: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.poll()

    def poll(self) -> None:
        with self.chaos.lock:
            pending = list(self.chaos.interrupted)
        if not pending:
            return
        keys = [[p.run_id, p.step_key] for p in pending]
        try:
            rows = sql(
                self.url,
                "SELECT s.run_id, s.step_key, s.attempt, "
                "extract(epoch FROM s.attempt_started_at)::float8, s.state, s.error->>'type' "
                "FROM saga_steps s JOIN jsonb_to_recordset(%s::jsonb) AS k(r text, s text) "
                "ON s.run_id = k.r AND s.step_key = k.s",
                (json.dumps([{"r": r, "s": s} for r, s in keys]),),
            )
        except psycopg.Error:
            return  # Postgres is restarting: next time
        now = {(r, k): (a, started, state, error) for r, k, a, started, state, error in rows}
        done = []
        for p in pending:
            gone = (p.attempt, None, "gone", None)
            attempt, started, state, error = now.get((p.run_id, p.step_key), gone)
            if attempt == p.attempt + 1 and started is not None:
                self.latencies.append(started - p.killed_at)
                self.resumed.append(p)
                self.outcomes["resumed"] += 1
            elif attempt > p.attempt + 1:
                self.outcomes["resumed_unmeasured"] += 1
            elif state == "failed" and error == "LeaseExpired":
                self.outcomes["lost_while_its_run_was_undoing"] += 1  # no new attempt, by design
            elif state in ("completed", "failed") and attempt == p.attempt:
                self.outcomes["finished_before_the_kill"] += 1
            elif state in ("cancelled", "gone"):
                self.outcomes["stopped_by_its_run"] += 1
            else:
                continue
            done.append(p)
        with self.chaos.lock:
            self.chaos.interrupted = [p for p in self.chaos.interrupted if p not in done]


# -- the invariants ----------------------------------------------------------------------------


@dataclass
class Violations:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, kind: str, example: Any, n: int = 1) -> None:
        self.counts[kind] += n
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES:
            kept.append(example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


STEP_COLUMNS = (
    "run_id",
    "step_key",
    "kind",
    "state",
    "attempt",
    "max_attempts",
    "started",
    "compensation_ref",
    "pivot",
    "idempotency_key",
    "result",
    "error",
    "finished",
)


def check(
    planned: list[Planned], database_url: str, service: ServerProcess, prefix: str
) -> tuple[Violations, dict[str, Any]]:
    v = Violations()
    by_id = {p.run_id: p for p in planned}
    runs = {
        r[0]: (r[1], r[2])
        for r in sql(
            database_url,
            "SELECT run_id, state, error FROM saga_runs WHERE run_id LIKE %s",
            (prefix + "%",),
        )
    }
    steps: dict[str, list[dict[str, Any]]] = {}
    for row in sql(
        database_url,
        "SELECT run_id, step_key, kind, state, attempt, max_attempts, started_at IS NOT NULL, "
        "compensation_ref, coalesce((options->>'pivot')::boolean, false), idempotency_key, "
        "result, error, finished_at IS NOT NULL FROM saga_steps WHERE run_id LIKE %s",
        (prefix + "%",),
    ):
        steps.setdefault(row[0], []).append(dict(zip(STEP_COLUMNS, row, strict=True)))
    record = service.stats(trips=prefix)["trips"]
    totals = service.stats(prefix=prefix)

    # No effect applied twice, by what it is (the service's own count).
    if totals["duplicate_effects"]:
        twice = [
            (trip, effect, n)
            for trip, r in record.items()
            for effect, n in r["effects"].items()
            if n > 1
        ]
        v.add("duplicate_effects", twice[:EXAMPLES], totals["duplicate_effects"])

    states: Counter[str] = Counter()
    stuck = []
    for p in planned:
        state, error = runs.get(p.run_id, ("missing", None))
        states[state] += 1
        mine = steps.get(p.run_id, [])
        by_key = {s["step_key"]: s for s in mine}
        trip = record.get(p.run_id, {"effects": {}, "bookings": {}, "answers": {}})
        if state not in TERMINAL:
            open_steps = [
                f"{s['step_key']} {s['state']} attempt {s['attempt']}"
                for s in mine
                if s["state"] not in ("completed", "cancelled", "failed")
            ]
            stuck.append(p.run_id)
            # With no step open, nothing is due for the sweeper: the run waits for a
            # saga.advance message (see the outbox rows in the journal dump).
            last = sql(
                database_url,
                "SELECT task_name, payload->>'step_key', published_at IS NOT NULL, "
                "to_char(created_at, 'HH24:MI:SS.MS') FROM saga_outbox "
                "WHERE payload->>'run_id' = %s ORDER BY id DESC LIMIT 1",
                (p.run_id,),
            )
            v.add("stuck", {"run": p.run_id, "state": state, "open_steps": open_steps,
                            "steps": [_brief(s) for s in mine],
                            "last_message": last[0] if last else None})  # fmt: skip
            continue
        if state not in expected_states(p):
            failed = [
                f"{s['step_key']}: {(s['error'] or {}).get('message')}"
                for s in mine
                if s["state"] == "failed"
            ]
            v.add(
                "unexpected_state",
                {"run": p.run_id, "input": p.input, "cancel": p.cancel, "state": state,
                 "run_error": error, "failed_steps": failed},
            )  # fmt: skip
        # A finished run has no step still open, and a step in a final state is finished (the
        # sweeper's index of open steps, 0011, holds the steps without a finished_at).
        for s in mine:
            if s["state"] in ("pending", "dispatched", "running", "waiting", "throttled"):
                v.add("open_step_in_finished_run", {"run": p.run_id, "state": state, **_brief(s)})
            elif not s["finished"]:
                v.add("final_step_not_finished", {"run": p.run_id, **_brief(s)})
        active = [b for b in trip["bookings"].values() if b["state"] == "booked"]
        if state in ("compensated", "cancelled") and active:
            v.add("booking_left_active", {"run": p.run_id, "state": state, "active": active})
        if state == "completed":
            _check_completed(v, p, mine, trip)
        if state == "failed":
            pivot_done = any(s["pivot"] and s["state"] == "completed" for s in mine)
            compensable = any(s["started"] and s["compensation_ref"] for s in mine)
            if not pivot_done and compensable:
                v.add("failed_not_allowed", {"run": p.run_id, "steps": [_brief(s) for s in mine]})
            # Past the pivot nothing is undone: no cancellation, no compensation step.
            cancels = [e for e in trip["effects"] if e.startswith("cancel:")]
            undos = [s["step_key"] for s in mine if s["kind"] == "compensation"]
            if pivot_done and (cancels or undos):
                example = {"run": p.run_id, "cancels": cancels, "undos": undos}
                v.add("undone_past_the_pivot", example)
        if state in ("compensated", "cancelled"):
            for s in mine:
                if s["kind"] == "action" and s["started"] and s["compensation_ref"]:
                    undo = by_key.get(f"compensate:{s['step_key']}")
                    if undo is None or undo["state"] != "completed":
                        v.add(
                            "not_compensated",
                            {"run": p.run_id, "step": _brief(s), "undo": undo and _brief(undo)},
                        )
        # One step, one successful outcome: what the journal holds is what the service
        # answered under the step's key (the first answer; a replay answers the same).
        for s in mine:
            answer = trip["answers"].get(s["idempotency_key"])
            if s["state"] != "completed" or answer is None or not isinstance(s["result"], dict):
                continue
            for name in ("booking_id", "message_id"):
                if name in answer and s["result"].get(name) != answer[name]:
                    v.add(
                        "two_outcomes",
                        {"run": p.run_id, "step": s["step_key"], "journal": s["result"],
                         "service": answer},
                    )  # fmt: skip
        # Impossible rows: an outcome without a claim, more claims than allowed, an undo of a
        # step that never started (a never-claimed step is cancelled, not compensated).
        for s in mine:
            ended = s["state"] in ("completed", "failed")
            claimed = s["attempt"] >= 1 and s["started"]
            if ended and s["kind"] in ("action", "compensation") and not claimed:
                v.add("outcome_without_claim", {"run": p.run_id, **_brief(s)})
            if s["attempt"] > s["max_attempts"]:
                v.add("more_attempts_than_allowed", {"run": p.run_id, **_brief(s)})
            if s["kind"] == "compensation":
                undone = by_key.get(s["step_key"].removeprefix("compensate:"))
                if undone is None or not undone["started"]:
                    v.add(
                        "compensated_a_step_never_started",
                        {"run": p.run_id, "undo": _brief(s), "step": undone and _brief(undone)},
                    )
    unknown = [t for t in record if t not in by_id]
    if unknown:
        v.add("effects_of_unknown_runs", unknown[:EXAMPLES], len(unknown))
    return v, {"states": dict(states), "stuck": stuck, "service": totals}


def _brief(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("step_key", "kind", "state", "attempt", "started")}


def _check_completed(
    v: Violations, p: Planned, mine: list[dict[str, Any]], trip: dict[str, Any]
) -> None:
    """Each of its effects exactly once: the bookings it needs, active, one email, no undo."""
    kinds = Counter(b["kind"] for b in trip["bookings"].values())
    want = (
        Counter({"flight": 1, "hotel": 1, "charge": 1})
        if p.kind == "graph"
        else Counter({"seat": int(p.input["seats"])})
    )
    emails = [e for e in trip["effects"] if e.startswith("send_email:")]
    cancels = [e for e in trip["effects"] if e.startswith("cancel:")]
    not_once = {e: n for e, n in trip["effects"].items() if n != 1}
    unfinished = [_brief(s) for s in mine if s["state"] != "completed"]
    if kinds != want or len(emails) != 1 or cancels or not_once or unfinished:
        v.add(
            "completed_not_exactly_once",
            {"run": p.run_id, "bookings": dict(kinds), "want": dict(want), "emails": len(emails),
             "cancels": cancels, "not_once": not_once, "unfinished_steps": unfinished},
        )  # fmt: skip
    if any(b["state"] != "booked" for b in trip["bookings"].values()):
        v.add("completed_with_undone_booking", {"run": p.run_id, "bookings": trip["bookings"]})


# -- the bench ---------------------------------------------------------------------------------


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)


def _progress(url: str) -> tuple[int, int]:
    """(unfinished runs, steps finished so far): the second moving is a sign of life."""
    row = sql(
        url,
        "SELECT (SELECT count(*) FROM saga_runs WHERE state IN ('running', 'compensating')), "
        "(SELECT count(*) FROM saga_steps WHERE finished_at IS NOT NULL)",
    )[0]
    return int(row[0]), int(row[1])


def bench_chaos(settings: Settings, cfg: ChaosConfig, log: IO[str] | None = None) -> dict[str, Any]:
    def say(text: str) -> None:
        if log is not None:
            print(f"saga bench chaos: {text}", file=log, flush=True)

    tag = uuid.uuid4().hex[:6]
    planned = plan_runs(cfg, tag)
    prefix = f"chaos-{tag}-"
    root = Path(tempfile.mkdtemp(prefix="saga-chaos-"))
    root.chmod(0o755)  # the private Postgres runs as another user when we are root
    began = time.monotonic()
    servers = Servers(root)
    try:
        return _bench(settings, cfg, planned, prefix, root, servers, began, say)
    finally:
        with contextlib.suppress(Exception):
            servers.stop()
        shutil.rmtree(root, ignore_errors=True)


def _bench(
    settings: Settings,
    cfg: ChaosConfig,
    planned: list[Planned],
    prefix: str,
    root: Path,
    servers: Servers,
    began: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    migrate(servers.database_url)
    chaos_settings = settings.model_copy(
        update={
            "database_url": servers.database_url,
            "broker_url": servers.broker_url,
            "state_dir": root,
            "queue": f"chaos-{prefix}",
            "lease_seconds": cfg.lease_seconds,
            "dispatch_timeout_seconds": 5.0,
            "relay_poll_seconds": 0.2,
        }
    )
    # Kept after the run (the private servers are not): the processes' logs, the chaos and,
    # for each run in violation, its journal rows.
    log_dir = settings.state_dir.resolve() / "bench-chaos" / prefix.rstrip("-")
    log_dir.mkdir(parents=True, exist_ok=True)
    service = ServerProcess(
        "saga_dev.testing.effects_server",
        "--fault-rate",
        str(cfg.fault_rate),
        "--seed",
        str(cfg.seed),
        log=log_dir / "effects-server.log",
    )
    service.control(count_trips=[prefix])  # its counts per prefix: requests, faults
    env = {
        **chaos_settings.child_env(),
        "TRAVEL_SERVICE_URL": service.url,
        "TRAVEL_SERVICE_TIMEOUT": "5",
        "CHAOS_STEP_SECONDS": str(cfg.step_seconds),
    }
    spawned = Counter[str]()
    workers = [f"worker-{i}" for i in range(cfg.workers)] + ["prefork-0"]

    def start_worker(name: str) -> None:
        spawned[name] += 1
        pool = ["--pool", "prefork", "--concurrency", "2"] if name.startswith("prefork") else [
            "--pool", "solo"
        ]  # fmt: skip
        group.start(
            name,
            [sys.executable, "-m", "saga", "worker", *pool, "--loglevel", "WARNING",
             "--hostname", f"{name}-{spawned[name]}@%h"],
            env,
        )  # fmt: skip

    def start_relay() -> None:
        group.start("relay", [sys.executable, "-m", "saga", "--log-level", "INFO", "relay"], env)

    rng = random.Random(cfg.seed)
    with contextlib.ExitStack() as stack:
        stack.callback(service.stop)
        group = Children(log_dir)
        stack.callback(group.stop, signal.SIGKILL)  # a warm shutdown would keep running steps
        start_relay()
        for name in workers:
            start_worker(name)
        chaos = Chaos(cfg, group, servers, start_worker, start_relay, workers, rng)
        for name in workers:
            chaos.started[name] = time.monotonic()
        tracker = Tracker(chaos, servers.database_url)
        thread = threading.Thread(target=chaos.run, name="chaos", daemon=True)
        thread.start()
        tracker.start()
        # Before the children are stopped, however this ends (the stack unwinds in reverse).
        stack.callback(tracker.join)
        stack.callback(tracker.stopped.set)
        stack.callback(thread.join)
        stack.callback(chaos.stopped.set)
        deadline = began + cfg.duration_limit
        say(f"{len(planned)} runs, prefix {prefix}; logs in {log_dir}")
        started_all = _start_runs(chaos_settings, planned, servers.database_url, deadline, say)
        # The chaos goes on while runs are being started (about IN_FLIGHT at a time, so it meets
        # every stage of them); the settle time is then the recovery from the last faults.
        chaos_end = time.monotonic()
        chaos.stopped.set()
        thread.join()
        chaos.revive()  # all up for the settling
        settle_began = time.monotonic()
        say(f"chaos stopped after {chaos_end - began:.0f} s: {dict(chaos.counts)}; settling")
        settled_at, last_finish = _wait_finished(
            servers.database_url, prefix, settle_began + cfg.settle_seconds, say
        )
        tracker.stopped.set()
        tracker.join()
        tracker.poll()
        tracker.outcomes["unresolved"] += len(chaos.interrupted)
        say("checking the invariants")
        violations, found = check(planned, servers.database_url, service, prefix)
        redispatch = redispatch_delays(servers.database_url, tracker.resumed)
        journals = _dump_journals(servers.database_url, violations, log_dir)
        (log_dir / "chaos-events.json").write_text(json.dumps(chaos.events))
        faults = service.stats(detail="0")["faults"]
    lat = tracker.latencies
    return {
        "suite": "chaos",
        "command": f"saga bench chaos --json --runs {cfg.runs} --seed {cfg.seed}",
        "runs": cfg.runs,
        "runs_started": started_all,
        "runs_by_kind": dict(Counter(p.kind for p in planned)),
        "failing_on_purpose": dict(Counter(p.input["fail"] for p in planned if p.input["fail"])),
        "cancelled_by_the_bench": sum(p.cancel for p in planned),
        "final_states": found["states"],
        "stuck": found["stuck"][:20],
        "violations": violations.total,
        "violations_by_kind": dict(violations.counts),
        "violation_examples": violations.examples,
        "journal_of_runs_in_violation": journals,
        "logs": str(log_dir),
        "worker_kills": chaos.counts["worker_kills"],
        "relay_kills": chaos.counts["relay_kills"],
        "broker_flushes": chaos.counts["broker_flushes"],
        "pg_restarts": chaos.counts["pg_restarts"],
        "pg_restarts_by_mode": {m: chaos.counts[f"pg_restarts_{m}"] for m in ("fast", "immediate")},
        "service_faults": faults,
        "service_fault_rate": cfg.fault_rate,
        "service": found["service"],
        "chaos_errors": chaos.counts["chaos_errors"],
        "chaos_error_examples": chaos.errors[:EXAMPLES],
        "unexpected_process_exits": chaos.exits,
        "chaos_seconds": round(chaos_end - began, 1),
        "settle_seconds": round(settled_at - settle_began, 1),
        # Where runs are stuck, settle_seconds is the whole allowance: this is when the rest
        # had finished.
        "last_finished_run_after_seconds": round(last_finish - settle_began, 1),
        "elapsed_seconds": round(time.monotonic() - began, 1),
        "resumption": {
            "method": METHOD,
            "interrupted_steps": sum(tracker.outcomes.values())
            - tracker.outcomes["finished_before_the_kill"],
            "outcomes": dict(tracker.outcomes),
            "p50_seconds": None if not lat else round(statistics.median(lat), 3),
            "p99_seconds": p99(lat),
            "max_seconds": None if not lat else round(max(lat), 3),
            "kill_to_redispatch_p50_seconds": None
            if not redispatch
            else round(statistics.median(redispatch), 3),
            "kill_to_redispatch_p99_seconds": p99(redispatch),
            "lease_seconds": cfg.lease_seconds,
        },
        "chaos_events": chaos.events[-400:],
    }


def redispatch_delays(url: str, resumed: list[Interrupted]) -> list[float]:
    """For each resumed step, kill -> the first outbox row naming it after the kill: the
    engine's own recovery (lease expiry, sweep, new message), before any queueing."""
    if not resumed:
        return []
    rows = sql(
        url,
        "SELECT (SELECT extract(epoch FROM min(o.created_at))::float8 FROM saga_outbox o "
        "        WHERE o.payload->>'run_id' = k.r AND o.payload->>'step_key' = k.s "
        "        AND o.created_at > to_timestamp(k.t)) - k.t "
        "FROM jsonb_to_recordset(%s::jsonb) AS k(r text, s text, t float8)",
        (json.dumps([{"r": p.run_id, "s": p.step_key, "t": p.killed_at} for p in resumed]),),
    )
    return [float(r[0]) for r in rows if r[0] is not None]


def _dump_journals(url: str, v: Violations, log_dir: Path) -> str | None:
    """The journal rows (run, steps) of every run named in the examples, to a file."""
    runs = sorted(
        {str(e["run"]) for examples in v.examples.values() for e in examples
         if isinstance(e, dict) and "run" in e}
    )  # fmt: skip
    if not runs:
        return None
    dump = {
        run: {
            "run": sql(url, "SELECT to_jsonb(r) FROM saga_runs r WHERE run_id = %s", (run,)),
            "steps": sql(
                url,
                "SELECT to_jsonb(s) FROM saga_steps s WHERE run_id = %s ORDER BY seq",
                (run,),
            ),
            "outbox": sql(
                url,
                "SELECT to_jsonb(o) FROM saga_outbox o WHERE payload->>'run_id' = %s ORDER BY id",
                (run,),
            ),
        }
        for run in runs
    }
    path = log_dir / "journal-of-runs-in-violation.json"
    path.write_text(json.dumps(dump, indent=1, default=str))
    return str(path)


def _start_runs(
    settings: Settings,
    planned: list[Planned],
    database_url: str,
    deadline: float,
    say: Callable[[str], None],
) -> int:
    """Starts the runs, keeping about IN_FLIGHT unfinished, through Postgres restarts (a start
    with its run id is idempotent: retried until it lands)."""
    client: SagaClient | None = None
    started = 0
    cap = max(10, min(IN_FLIGHT, len(planned) // 10))
    last_done, moved = -1, time.monotonic()
    try:
        for p in planned:
            while time.monotonic() < deadline:
                try:
                    if client is None:
                        client = SagaClient(settings)
                    if started % 5 == 0:
                        active, done = _progress(database_url)
                        while active >= cap and time.monotonic() < deadline:
                            if done != last_done:
                                last_done, moved = done, time.monotonic()
                            elif time.monotonic() - moved > STALL_SECONDS:
                                say(f"no step finished for {STALL_SECONDS:.0f} s with {active} "
                                    "runs unfinished: no more runs started")  # fmt: skip
                                return started
                            time.sleep(0.2)
                            active, done = _progress(database_url)
                    definition = chaos_trip if p.kind == "graph" else chaos_order
                    client.start(definition, p.input, run_id=p.run_id)
                    if p.cancel:
                        with contextlib.suppress(Exception):
                            client.cancel(p.run_id, "cancelled by the chaos bench")
                    started += 1
                    if started % 100 == 0:
                        say(f"{started} runs started")
                    break
                except (psycopg.Error, StoreError):  # Postgres restarting: start it again
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(0.5)
            else:
                break
    finally:
        if client is not None:
            client.close()
    return started


def _wait_finished(
    url: str, prefix: str, deadline: float, say: Callable[[str], None]
) -> tuple[float, float]:
    """Polls until no run of the bench is unfinished, or the deadline; returns when, and when
    the last run that did finish was seen finished (the settle time of all but stuck runs)."""
    last, left_before, last_finish = 0.0, -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            left = sql(
                url,
                "SELECT count(*) FROM saga_runs WHERE run_id LIKE %s AND state NOT IN "
                "('completed', 'compensated', 'failed', 'compensation_failed', 'cancelled')",
                (prefix + "%",),
            )[0][0]
        except psycopg.Error:
            left = -1
        if left >= 0 and left != left_before:
            left_before, last_finish = left, time.monotonic()
        if left == 0:
            break
        if time.monotonic() - last > 15:
            say(f"{left} runs unfinished")
            last = time.monotonic()
        time.sleep(0.5)
    return time.monotonic(), last_finish


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    r = report["resumption"]
    lines = [
        f"saga bench chaos: {report['runs']} runs ({report['runs_by_kind']}), "
        f"{report['elapsed_seconds']} s",
        f"final states: {report['final_states']}",
        f"failing on purpose: {report['failing_on_purpose']}; cancelled by the bench: "
        f"{report['cancelled_by_the_bench']}",
        f"chaos: {report['worker_kills']} worker kills, {report['relay_kills']} relay kills, "
        f"{report['broker_flushes']} broker flushes, {report['pg_restarts']} Postgres restarts "
        f"{report['pg_restarts_by_mode']}, service faults {report['service_faults']}",
        f"chaos phase {report['chaos_seconds']} s, settle {report['settle_seconds']} s (the "
        f"last run that finished: after {report['last_finished_run_after_seconds']} s); "
        f"unexpected exits {len(report['unexpected_process_exits'])}, chaos errors "
        f"{report['chaos_errors']} {report['chaos_error_examples']}",
        f"kill -> resumption: p50 {r['p50_seconds']} s, p99 {r['p99_seconds']} s, max "
        f"{r['max_seconds']} s over {r['outcomes'].get('resumed', 0)} steps ({r['outcomes']}); "
        f"kill -> re-dispatch p50 {r['kill_to_redispatch_p50_seconds']} s, p99 "
        f"{r['kill_to_redispatch_p99_seconds']} s (lease {r['lease_seconds']} s)",
        f"violations: {report['violations']} {report['violations_by_kind']}",
    ]
    for kind, examples in report["violation_examples"].items():
        lines.append(f"  {kind}:")
        lines += [f"    {json.dumps(e, default=str)[:600]}" for e in examples]
    print("\n".join(lines), file=out)


def parser() -> argparse.ArgumentParser:
    d = ChaosConfig()
    p = argparse.ArgumentParser(prog="saga bench chaos", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers, help="solo workers (+1 prefork)")
    p.add_argument("--fault-rate", type=float, default=d.fault_rate, help="effects server")
    p.add_argument("--fail-rate", type=float, default=d.fail_rate, help="runs failing on purpose")
    p.add_argument("--step-seconds", type=float, default=d.step_seconds, help="work per step")
    p.add_argument("--chaos-every", type=float, default=d.chaos_every, help="seconds")
    p.add_argument("--duration-limit", type=float, default=d.duration_limit, help="seconds")
    p.add_argument("--settle-seconds", type=float, default=d.settle_seconds)
    p.add_argument("--max-worker-kills", type=int, default=d.max_worker_kills)
    p.add_argument("--max-relay-kills", type=int, default=d.max_relay_kills)
    p.add_argument("--max-broker-flushes", type=int, default=d.max_broker_flushes)
    p.add_argument("--max-pg-restarts", type=int, default=d.max_pg_restarts)
    return p


def main(argv: Sequence[str], settings: Settings) -> int:
    """``saga bench chaos ...``; exits 1 when a violation was found."""
    args = parser().parse_args(argv)
    if args.runs < 1 or not 0 <= args.fault_rate < 1 or not 0 <= args.fail_rate <= 1:
        raise ConfigurationError("--runs >= 1, --fault-rate in [0, 1), --fail-rate in [0, 1]")
    cfg = ChaosConfig(
        runs=args.runs,
        seed=args.seed,
        workers=args.workers,
        fault_rate=args.fault_rate,
        fail_rate=args.fail_rate,
        chaos_every=args.chaos_every,
        step_seconds=args.step_seconds,
        duration_limit=args.duration_limit,
        settle_seconds=args.settle_seconds,
        max_worker_kills=args.max_worker_kills,
        max_relay_kills=args.max_relay_kills,
        max_broker_flushes=args.max_broker_flushes,
        max_pg_restarts=args.max_pg_restarts,
    )
    found: dict[str, Any] = {}

    def make_report() -> dict[str, Any]:
        found.update(bench_chaos(settings, cfg, log=sys.stderr))
        return found

    code = run_and_print(
        make_report,
        print_table,
        args.json,
        (redis.RedisError, OSError, RuntimeError, psycopg.Error),
    )
    return code or (1 if found.get("violations") else 0)
