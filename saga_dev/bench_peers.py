"""``saga bench peers``: the engine and DBOS Transact's queue, same workloads, one Postgres.

Both sides run on one private Postgres cluster made for the bench (``private_postgres``), so
the WAL position, the cluster's CPU and ``pg_stat_statements`` see only the side being
measured: the sides take turns (saga, dbos, saga, dbos, ...), each with only its own processes
up. Workloads: ``--runs`` runs of ``--steps`` no-op steps started at once (throughput, and the
Postgres cost per step), ``--one-step-runs`` one-step runs, and sequential runs for latency.

Per step, for each side: transactions and rows written (``pg_stat_database``), statements
(``pg_stat_statements``; on Postgres 15 a pipelined BEGIN/COMMIT sent as a prepared statement is
not counted, so statements are a lower bound), WAL bytes (the LSN's advance) and Postgres CPU
(the cluster's processes, from /proc). The engine's side also shows where its rows go, per
table, with the share of updates that were HOT.

The engine side is two solo workers and a relay (as ``saga bench core``); the DBOS side is two
worker processes (``saga_dev.dbos_peer``) consuming a DBOS queue, enqueued to by ``DBOSClient``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg

from saga.errors import ConfigurationError, SagaError
from saga.settings import Settings
from saga_dev.bench import WORKERS, Children, bench_harness, prepare
from saga_dev.bench_sagas import CHAIN_LENGTHS
from saga_dev.private_postgres import PrivatePostgres, private_postgres

SAGA_DB = "saga_peers"
DBOS_DB = "dbos_peers"
STATS_SETTLE_S = 10.5  # an idle backend reports its statistics every 10 s (Postgres 15)
RUN_TIMEOUT = 300.0
LATENCY_RUNS = 10
STARTER_THREADS = 4
KINDS = ("inserts", "updates", "hot_updates", "deletes")


@dataclass(frozen=True)
class Counters:
    xacts: int
    rows: int
    wal: int
    statements: int | None
    cpu_s: float
    tables: dict[str, tuple[int, int, int, int]]  # ins, upd, hot upd, del
    lsn: str = ""


def _snapshot(pg: PrivatePostgres, dbname: str, tables: bool) -> Counters:
    with psycopg.connect(pg.url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted,"
            " pg_current_wal_lsn() - '0/0'::pg_lsn, pg_current_wal_lsn()::text"
            " FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
        stmt = admin.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d"
            " ON d.oid = s.dbid WHERE d.datname = %s",
            (dbname,),
        ).fetchone()
    assert row is not None and stmt is not None
    per_table: dict[str, tuple[int, int, int, int]] = {}
    if tables:
        with psycopg.connect(pg.database_url(dbname), autocommit=True) as conn:
            for name, ins, upd, hot, dele in conn.execute(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del"
                " FROM pg_stat_user_tables"
            ):
                per_table[str(name)] = (int(ins), int(upd), int(hot), int(dele))
    return Counters(
        int(row[0]), int(row[1]), int(row[2]), int(stmt[0]), pg.cpu_seconds(), per_table, row[3]
    )


def _minus(a: Counters, b: Counters) -> Counters:
    tables = {
        name: tuple(x - y for x, y in zip(row, b.tables.get(name, (0, 0, 0, 0)), strict=True))
        for name, row in a.tables.items()
    }
    return Counters(
        a.xacts - b.xacts,
        a.rows - b.rows,
        a.wal - b.wal,
        None if a.statements is None or b.statements is None else a.statements - b.statements,
        a.cpu_s - b.cpu_s,
        tables,  # type: ignore[arg-type]
    )


def _per_step(used: Counters, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "transactions_per_step": round(used.xacts / steps, 2),
        "rows_per_step": round(used.rows / steps, 2),
        "wal_bytes_per_step": round(used.wal / steps),
        "statements_per_step": None
        if used.statements is None
        else round(used.statements / steps, 2),
        "postgres_cpu_ms_per_step": round(used.cpu_s * 1000 / steps, 3),
    }
    if used.tables:
        out["rows_by_table"] = {
            name: {kind: round(n / steps, 2) for kind, n in zip(KINDS, row, strict=True)}
            for name, row in sorted(used.tables.items())
            if any(row)
        }
    return out


@contextlib.contextmanager
def _measured(
    pg: PrivatePostgres, dbname: str, steps: int, out: dict[str, Any], tables: bool, settle: float
) -> Iterator[list[int]]:
    """The Postgres cost of the block per step, less the side's idle cost over the wait that
    lets its backends report (the block appends its own read transactions to the list).

    An idle backend reports its statistics only every 10 s (Postgres 15), so the counters are
    read after that long (A), and again as long after (B): B - A is the side's idle cost over
    such a wait (polling, heartbeats), taken off A - before."""
    own: list[int] = []
    time.sleep(settle)
    before = _snapshot(pg, dbname, tables)
    yield own
    time.sleep(settle)
    a = _snapshot(pg, dbname, tables)
    time.sleep(settle)
    b = _snapshot(pg, dbname, tables)
    idle = _minus(b, a)
    used = _minus(_minus(a, before), idle)
    # The bench's own reads (one statement, one transaction each) are not the side's cost.
    statements = None if used.statements is None else used.statements - sum(own)
    used = dataclasses.replace(used, xacts=used.xacts - sum(own), statements=statements)
    out.update(_per_step(used, steps))
    out["wal_by_record"] = _wal_by_record(pg, before, a, b, steps)
    out["idle_transactions_per_s"] = round(idle.xacts / settle, 1)
    out["idle_postgres_cpu_ms_per_s"] = round(idle.cpu_s * 1000 / settle, 1)


def _wal_by_record(
    pg: PrivatePostgres, before: Counters, a: Counters, b: Counters, steps: int
) -> dict[str, dict[str, float]]:
    """Where the WAL went, per step: the record types making up most of it (record and
    full-page-image bytes), less the idle window's."""
    busy, idle = pg.wal_records(before.lsn, a.lsn), pg.wal_records(a.lsn, b.lsn)
    per_step = {}
    for kind, (n, rec, fpi) in busy.items():
        i = idle.get(kind, (0, 0, 0))
        per_step[kind] = ((n - i[0]) / steps, (rec - i[1]) / steps, (fpi - i[2]) / steps)
    top = sorted(per_step.items(), key=lambda kv: kv[1][1] + kv[1][2], reverse=True)[:10]
    return {
        kind: {"records": round(n, 2), "bytes": round(rec), "fpi_bytes": round(fpi)}
        for kind, (n, rec, fpi) in top
        if rec + fpi > 0
    }


# -- the engine's side ---------------------------------------------------------------------


def _saga_side(
    settings: Settings,
    pg: PrivatePostgres,
    steps: int,
    runs: int,
    latency_runs: int,
    settle: float,
    pool: Sequence[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with bench_harness(settings, pool=pool) as bench:
        bench.wait_saga_ready()
        if latency_runs:
            per_step = [bench.saga_chain_ms(steps) / steps for _ in range(latency_runs)]
            out.update(_latency(per_step))
        cpu = bench.children.cpu_seconds()
        with _measured(pg, SAGA_DB, runs * steps, out, True, settle):
            elapsed = bench.saga_runs_seconds(runs, steps)
        out["steps_per_s"] = round(runs * steps / elapsed, 1)
        out["worker_cpu_ms_per_step"] = _cpu_ms(cpu, bench.children.cpu_seconds(), runs * steps)
    return out


# -- DBOS's side -----------------------------------------------------------------------------


class DbosSide:
    """DBOS queue workers as child processes, and a client that enqueues and waits."""

    def __init__(self, url: str, children: Children, concurrency: int, polling: float) -> None:
        from dbos import DBOSClient

        self.url = url
        self.children = children
        for i in range(1, WORKERS + 1):
            children.start(
                f"dbos-worker-{i}",
                [
                    sys.executable,
                    "-m",
                    "saga_dev.dbos_peer",
                    "--database-url",
                    url,
                    "--executor-id",
                    f"bench-dbos-{i}",
                    "--concurrency",
                    str(concurrency),
                    "--polling",
                    str(polling),
                ],
                _env(),
            )
        deadline = time.monotonic() + RUN_TIMEOUT
        while not all(
            "ready" in Children.tail(Path(children.log_dir) / f"dbos-worker-{i}.log")
            for i in range(1, WORKERS + 1)
        ):  # each has migrated DBOS's schema and launched
            children.check()
            if time.monotonic() > deadline:
                raise SagaError(f"DBOS workers not ready in {RUN_TIMEOUT:.0f} s")
            time.sleep(0.1)
        self.client = DBOSClient(system_database_url=url)
        self.conn = psycopg.connect(_psycopg_url(url), autocommit=True)

    def close(self) -> None:
        self.conn.close()
        self.client.destroy()

    def enqueue(self, steps: int, ids: Sequence[str]) -> None:
        from saga_dev.dbos_peer import CHAIN_WORKFLOW, QUEUE

        for wf_id in ids:
            self.client.enqueue(
                {"workflow_name": CHAIN_WORKFLOW, "queue_name": QUEUE, "workflow_id": wf_id},
                steps,
                0,
            )

    def wait(self, ids: Sequence[str], poll: float) -> tuple[float, int]:
        """Block until every workflow succeeded: (perf_counter() then, queries made)."""
        deadline, queries = time.monotonic() + RUN_TIMEOUT, 0
        while True:
            row = self.conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
                " count(*) FILTER (WHERE status IN ('ERROR', 'CANCELLED'))"
                " FROM dbos.workflow_status WHERE workflow_uuid = ANY(%s)",
                (list(ids),),
            ).fetchone()
            queries += 1
            assert row is not None
            if row[1]:
                raise SagaError(f"{row[1]} DBOS bench workflows failed")
            if row[0] == len(ids):
                return time.perf_counter(), queries
            if time.monotonic() > deadline:
                raise SagaError(f"DBOS bench workflows did not finish in {RUN_TIMEOUT:.0f} s")
            self.children.check()
            time.sleep(poll)

    def ready(self) -> None:
        ids = [uuid.uuid4().hex for _ in range(WORKERS * 2)]
        self.enqueue(1, ids)
        self.wait(ids, 0.05)


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return env


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _dbos_side(
    pg: PrivatePostgres,
    steps: int,
    runs: int,
    latency_runs: int,
    concurrency: int,
    polling: float,
    settle: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    url = pg.database_url(DBOS_DB).replace("postgresql://", "postgresql+psycopg://", 1)
    with (
        tempfile.TemporaryDirectory(prefix="saga-bench-dbos-") as logs,
        Children(Path(logs)) as children,
    ):
        side = DbosSide(url, children, concurrency, polling)
        try:
            side.ready()
            if latency_runs:
                per_step = []
                for _ in range(latency_runs):
                    wf = uuid.uuid4().hex
                    began = time.perf_counter()
                    side.enqueue(steps, [wf])
                    ended, _ = side.wait([wf], 0.001)
                    per_step.append((ended - began) * 1000 / steps)
                out.update(_latency(per_step))
            ids = [uuid.uuid4().hex for _ in range(runs)]
            cpu = children.cpu_seconds()
            with _measured(pg, DBOS_DB, runs * steps, out, False, settle) as own:
                began = time.perf_counter()
                _in_threads(lambda part: side.enqueue(steps, part), ids)
                ended, queries = side.wait(ids, 0.05)
                own.append(queries)
            out["steps_per_s"] = round(runs * steps / (ended - began), 1)
            out["worker_cpu_ms_per_step"] = _cpu_ms(cpu, children.cpu_seconds(), runs * steps)
        except SagaError as exc:
            raise SagaError(f"{exc}\n{children.logs()}") from exc
        finally:
            side.close()
    return out


def _cpu_ms(before: dict[str, float], after: dict[str, float], steps: int) -> float:
    """Worker processes' CPU per step (the relay's too, on the engine's side)."""
    return round(sum(after.values()) - sum(before.values()), 3) * 1000 / steps


def _in_threads(work: Callable[[Sequence[str]], None], ids: Sequence[str]) -> None:
    errors: list[BaseException] = []

    def run(part: Sequence[str]) -> None:
        try:
            work(part)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(ids[i::STARTER_THREADS],), daemon=True)
        for i in range(STARTER_THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the whole bench ------------------------------------------------------------------------


def _latency(per_step_ms: list[float]) -> dict[str, float]:
    ordered = sorted(per_step_ms)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "latency_ms_per_step_p50": round(statistics.median(ordered), 3),
        "latency_ms_per_step_p99": round(p99, 3),
    }


def _median_side(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over the rounds; the per-table rows of the median round."""
    out: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(statistics.median(r[key] for r in rounds), 3)
    for key in ("rows_by_table", "wal_by_record"):
        if key in rounds[0]:
            out[key] = rounds[len(rounds) // 2][key]
    out["rounds"] = rounds
    return out


def bench_peers(
    settings: Settings,
    *,
    steps: int,
    runs: int,
    one_step_runs: int,
    repeat: int,
    dbos_concurrency: int,
    dbos_polling: float,
    saga_pool: str = "solo",
    saga_concurrency: int = 1,
    settle: float = STATS_SETTLE_S,
) -> dict[str, Any]:
    try:
        import dbos  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "saga bench peers needs DBOS Transact: pip install -e '.[peers]'"
        ) from None
    if steps not in CHAIN_LENGTHS:
        raise ConfigurationError(f"--steps must be one of {list(CHAIN_LENGTHS)}")
    began = time.monotonic()
    workloads = {f"{steps}_step_runs": (steps, runs), "one_step_runs": (1, one_step_runs)}
    report: dict[str, Any] = {
        "suite": "peers",
        "workers_per_side": WORKERS,
        "saga": {"pool": saga_pool, "concurrency_per_worker": saga_concurrency},
        "dbos": {"concurrency_per_worker": dbos_concurrency, "polling_s": dbos_polling},
    }
    pool = ("--pool", saga_pool, "--concurrency", str(saga_concurrency))
    with private_postgres() as pg:
        with psycopg.connect(pg.url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {SAGA_DB}")
            admin.execute(f"CREATE DATABASE {DBOS_DB}")
            admin.execute("CREATE EXTENSION pg_stat_statements")
            report["postgres"] = admin.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        saga_settings = prepare(
            settings.model_copy(
                # A threads-pool worker wants a connection per thread.
                update={
                    "database_url": pg.database_url(SAGA_DB),
                    "pool_size": max(settings.pool_size, saga_concurrency),
                }
            ),
            f"{settings.queue}-peers",
        )
        for name, (n_steps, n_runs) in workloads.items():
            if not n_runs:
                continue
            sides: dict[str, list[dict[str, Any]]] = {"saga": [], "dbos": []}
            latency = LATENCY_RUNS if n_steps > 1 else 0
            for _ in range(repeat):
                saga_round = _saga_side(saga_settings, pg, n_steps, n_runs, latency, settle, pool)
                sides["saga"].append(saga_round)
                sides["dbos"].append(
                    _dbos_side(pg, n_steps, n_runs, latency, dbos_concurrency, dbos_polling, settle)
                )
            saga, dbos_ = _median_side(sides["saga"]), _median_side(sides["dbos"])
            report[name] = {
                "steps": n_steps,
                "runs": n_runs,
                "saga": saga,
                "dbos": dbos_,
                "throughput_vs_dbos": round(saga["steps_per_s"] / dbos_["steps_per_s"], 3),
            }
    first = report[f"{steps}_step_runs"]
    # The headline figures: the multi-step workload's.
    report["throughput_vs_dbos"] = first["throughput_vs_dbos"]
    report["wal_bytes_per_step"] = {s: first[s]["wal_bytes_per_step"] for s in ("saga", "dbos")}
    report["rows_per_step"] = {s: first[s]["rows_per_step"] for s in ("saga", "dbos")}
    report["elapsed_s"] = round(time.monotonic() - began, 1)
    return report


FIGURES = [
    ("steps_per_s", "throughput, steps/s", "{:.1f}"),
    ("latency_ms_per_step_p50", "latency p50, ms/step", "{:.2f}"),
    ("latency_ms_per_step_p99", "latency p99, ms/step", "{:.2f}"),
    ("transactions_per_step", "transactions/step", "{:.2f}"),
    ("statements_per_step", "statements/step (lower bound)", "{:.2f}"),
    ("rows_per_step", "rows written/step", "{:.2f}"),
    ("wal_bytes_per_step", "WAL bytes/step", "{:.0f}"),
    ("postgres_cpu_ms_per_step", "Postgres CPU ms/step", "{:.3f}"),
    ("worker_cpu_ms_per_step", "worker CPU ms/step", "{:.3f}"),
]


def print_table(report: dict[str, Any], out: IO[str]) -> None:
    lines = [
        f"saga bench peers: Postgres {report['postgres']} (private cluster), "
        f"{report['workers_per_side']} workers per side, saga {report['saga']['pool']} pool "
        f"{report['saga']['concurrency_per_worker']}/worker, DBOS queue "
        f"{report['dbos']['concurrency_per_worker']}/worker polling "
        f"{report['dbos']['polling_s']} s, {report['elapsed_s']} s",
    ]
    for name in [k for k in report if k.endswith("_runs")]:
        w = report[name]
        lines += [
            "",
            f"{w['runs']} runs of {w['steps']} step(s) (medians of rounds)",
            f"{'':32} {'saga':>10} {'dbos':>10} {'saga/dbos':>10}",
        ]
        for key, label, fmt in FIGURES:
            a, b = w["saga"].get(key), w["dbos"].get(key)
            if a is None or b is None:
                continue
            ratio = f"{a / b:.2f}" if b else "-"
            lines.append(f"{label:32} {fmt.format(a):>10} {fmt.format(b):>10} {ratio:>10}")
        for side in ("saga", "dbos"):
            records = w[side].get("wal_by_record", {})
            if records:
                lines.append(f"{side} WAL per step by record type (records, bytes, FPI bytes):")
                lines += [
                    f"  {kind:<28} {r['records']:>6.2f} {r['bytes']:>7.0f} {r['fpi_bytes']:>7.0f}"
                    for kind, r in records.items()
                ]
        tables = w["saga"].get("rows_by_table", {})
        if tables:
            lines.append("saga rows per step by table (inserts, updates of which HOT, deletes):")
            for table, r in tables.items():
                lines.append(
                    f"  {table:<16} ins {r['inserts']:.2f}  upd {r['updates']:.2f} "
                    f"(HOT {r['hot_updates']:.2f})  del {r['deletes']:.2f}"
                )
    print("\n".join(lines), file=out)


def main(argv: Sequence[str], settings: Settings) -> int:
    import argparse

    import redis
    from kombu.exceptions import KombuError

    from saga_dev.bench import _sigterm_interrupts, run_and_print

    p = argparse.ArgumentParser(
        prog="saga bench peers",
        description="The engine against DBOS Transact's queue on one private Postgres: "
        "throughput, latency and Postgres cost per step.",
    )
    p.add_argument("--steps", type=int, default=10, help="steps per run (default 10)")
    p.add_argument("--runs", type=int, default=500, help="multi-step runs per round (500)")
    p.add_argument("--one-step-runs", type=int, default=1000, help="one-step runs (1000; 0: none)")
    p.add_argument("--repeat", type=int, default=2, help="rounds per side, interleaved (2)")
    p.add_argument("--dbos-concurrency", type=int, default=8, help="workflows per DBOS worker")
    p.add_argument("--dbos-polling", type=float, default=0.05, help="DBOS queue polling, s")
    p.add_argument(
        "--saga-pool", default="solo", choices=["solo", "threads", "prefork"], help="worker pool"
    )
    p.add_argument(
        "--saga-concurrency", type=int, default=1, help="steps in flight per saga worker (1)"
    )
    p.add_argument(
        "--settle-seconds",
        type=float,
        default=STATS_SETTLE_S,
        help="wait for idle backends to report their statistics (10.5; less undercounts)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if (
        min(args.runs, args.repeat, args.dbos_concurrency, args.saga_concurrency) < 1
        or args.one_step_runs < 0
    ):
        raise ConfigurationError(
            "--runs, --repeat, --dbos-concurrency and --saga-concurrency must be at least 1"
        )
    if args.saga_pool == "solo" and args.saga_concurrency != 1:
        raise ConfigurationError(
            "--saga-pool solo runs one step at a time: use --saga-pool threads"
        )

    def make_report() -> dict[str, Any]:
        with _sigterm_interrupts():
            return bench_peers(
                settings,
                steps=args.steps,
                runs=args.runs,
                one_step_runs=args.one_step_runs,
                repeat=args.repeat,
                dbos_concurrency=args.dbos_concurrency,
                dbos_polling=args.dbos_polling,
                saga_pool=args.saga_pool,
                saga_concurrency=args.saga_concurrency,
                settle=args.settle_seconds,
            )

    errors = (redis.RedisError, psycopg.Error, KombuError, OSError, subprocess.SubprocessError)
    return run_and_print(make_report, print_table, args.json, errors)
