"""The ``saga`` command. Settings come from ``SAGA_*`` environment variables, read here only."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from pydantic import ValidationError

from saga.agent.llm import ModelSettings
from saga.cli_runs import add_parsers, cmd_list, cmd_operate, cmd_show, emit, json_option
from saga.errors import ConfigurationError, SagaError
from saga.exit_codes import Exit, exit_code
from saga.settings import Settings, unknown_variables
from saga.states import RunState

ENV_HELP = (
    "environment: "
    + ", ".join(f"SAGA_{name.upper()}" for name in Settings.model_fields)
    + "; for model completions (saga.agent, on workers): "
    + ", ".join(f"SAGA_MODEL_{name.upper()}" for name in ModelSettings.model_fields)
)


def resolve(settings: Settings) -> Settings:
    """Fill unset database and broker URLs with the embedded servers (started if needed)."""
    if settings.database_url and settings.broker_url:
        return settings
    from saga.embedded import start_embedded

    services = start_embedded(settings.state_dir)
    return settings.model_copy(
        update={
            "database_url": settings.database_url or services.database_url,
            "broker_url": settings.broker_url or services.broker_url,
        }
    )


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from saga.migrate import migrate

    assert settings.database_url
    applied = migrate(settings.database_url)
    if args.json:
        emit({"applied": applied})
    else:
        print(f"applied migrations {applied}" if applied else "schema is up to date")
    return Exit.DONE


def _require_schema(database_url: str | None) -> None:
    """Refuse to start on a database behind this code's migrations: every outcome would fail
    after its step had run."""
    import psycopg

    from saga.migrate import check_schema

    assert database_url, "resolve() fills it"
    # Postgres restarting or not up yet is waited for, as a broker that is down is; anything
    # else (a refused login, a missing database, a schema behind) stops the process at once.
    delay, deadline = 0.5, time.monotonic() + _WAIT_FOR_POSTGRES
    while True:
        try:
            with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
                check_schema(conn)
            return
        except psycopg.OperationalError as exc:
            if not _still_starting(exc) or time.monotonic() + delay > deadline:
                raise SagaError(f"cannot check the database schema: {exc}") from exc
            logging.getLogger("saga").warning("Postgres does not answer yet (%s); waiting", exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        except psycopg.Error as exc:
            raise SagaError(f"cannot check the database schema: {exc}") from exc


_WAIT_FOR_POSTGRES = 120.0  # seconds a starting worker or relay waits for Postgres to answer


def _still_starting(exc: Exception) -> bool:
    """A connection refused, or a server starting up or shutting down: it may answer soon."""
    if getattr(exc, "sqlstate", None) == "57P03":  # cannot_connect_now
        return True
    text = str(exc)
    return any(
        hint in text
        for hint in (
            "Connection refused",
            "No such file or directory",  # its Unix socket is not there yet
            "the database system is starting up",
            "the database system is shutting down",
            "the database system is in recovery mode",
            "server closed the connection unexpectedly",
            "timeout expired",
        )
    )


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from saga.workers import telemetry
    from saga.workers.app import assert_safe, create_app, install_shutdown_hooks
    from saga.workers.broker import check_broker

    _require_schema(settings.database_url)
    app = create_app(settings)
    assert_safe(app)
    check_broker(app)
    install_shutdown_hooks(app)
    telemetry.install_worker_hooks()  # each pool process exports its spans and metrics
    if args.pool == "threads":
        telemetry.configure_sdk("saga-worker")
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        "-Q",
        settings.queue,
        f"--pool={args.pool}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={args.max_tasks_per_child}")
    return app.start(argv)  # the worker's exit status: non-zero after an unrecoverable error


def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from saga.outbox.relay import PublishingImpossible, Relay
    from saga.store import PostgresStore, open_pool
    from saga.sweeper import Sweeper
    from saga.workers import telemetry
    from saga.workers.app import create_app
    from saga.workers.broker import check_broker
    from saga.workers.publish import CeleryPublisher

    assert settings.database_url
    _require_schema(settings.database_url)
    app = create_app(settings)
    check_broker(app)
    _, metrics_on = telemetry.configure_sdk("saga-relay")
    if metrics_on:
        from saga.metrics import DatabaseGauges

        DatabaseGauges(settings.database_url)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    relay = Relay(
        settings.database_url,
        CeleryPublisher(app),
        batch_size=settings.relay_batch_size,
        poll_seconds=settings.relay_poll_seconds,
        retention_seconds=settings.outbox_retention_seconds,
    )
    store = PostgresStore(
        open_pool(settings.database_url, size=settings.pool_size, name="saga-sweeper"),
        queue=settings.queue,
        dispatch_timeout=settings.dispatch_timeout_seconds,
    )
    sweeper = (
        None if args.no_sweeper else Sweeper(store, worker_check_every=settings.lease_seconds / 3)
    )
    logging.getLogger("saga").info("relay running (sweeper %s)", "off" if sweeper is None else "on")
    try:
        relay.run(stop, also=sweeper.tick if sweeper else None)
    except PublishingImpossible as exc:
        raise ConfigurationError(str(exc)) from exc
    finally:
        store.close()
        telemetry.shutdown_sdk()
    return 0


def cmd_start(settings: Settings, args: argparse.Namespace) -> int:
    from saga.client import SagaClient

    payload = json_option("--input", args.input)
    with SagaClient(settings) as client:
        run_id = client.start(args.saga, payload, run_id=args.run_id, timeout=args.timeout)
        if args.wait is None:
            if args.json:
                emit({"run_id": run_id})
            else:
                print(run_id)
            return Exit.DONE
        if not args.json:
            print(run_id, flush=True)
        run = client.wait(run_id, timeout=args.wait or None)
        outcome = {"state": run.state, "result": run.result, "error": run.error}
        if args.json:
            emit({"run_id": run_id, **outcome})
        else:
            print(json.dumps(outcome, indent=2))
        return Exit.DONE if run.state == RunState.COMPLETED else Exit.UNFINISHED


def cmd_dashboard(settings: Settings, args: argparse.Namespace) -> int:
    from saga.dashboard.server import DashboardServer

    _require_schema(settings.database_url)
    server = DashboardServer(
        settings,
        host=args.host,
        port=args.port,
        read_only=args.read_only,
        refresh_seconds=args.refresh,
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown).start())
    mode = "read-only" if args.read_only else "with actions"
    print(f"dashboard on {server.url} ({mode}); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return Exit.DONE


# Commands of the development tools (``saga_dev/`` in a clone of the repository): not part of
# the installed package, found by name only when asked for.
DEV_COMMANDS = {
    "demo": "run the travel agent demo on the embedded servers",
    "bench": "benchmarks: core, coordinator, agent (against raw Celery), chaos (under faults)",
}


def cmd_dev_tool(settings: Settings, args: argparse.Namespace) -> int:
    try:
        tools = importlib.import_module("saga_dev.cli")
    except ModuleNotFoundError as exc:
        if exc.name != "saga_dev":
            raise
        raise ConfigurationError(
            f"`saga {args.command}` is one of the development tools, which live in a clone of "
            f"the repository, not in the installed package: run it from the clone's top folder "
            f"(`scripts/demo`, or `scripts/bootstrap dev` then `.venv/bin/saga {args.command}`)"
        ) from None
    return int(tools.main(args.command, args.dev_args, settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saga", description="Durable sagas on Celery and Postgres.", epilog=ENV_HELP
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate", help="apply the schema migrations", epilog=ENV_HELP)
    m.add_argument("--json", action="store_true")
    w = sub.add_parser("worker", help="run a Celery worker for saga steps", epilog=ENV_HELP)
    w.add_argument("--concurrency", type=int)
    w.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    w.add_argument("--hostname")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--max-tasks-per-child", type=int)
    r = sub.add_parser(
        "relay", help="publish the outbox and re-dispatch due steps", epilog=ENV_HELP
    )
    r.add_argument("--no-sweeper", action="store_true", help="publish only; no recovery sweeps")
    s = sub.add_parser("start", help="start a run of MODULE:SAGA", epilog=ENV_HELP)
    s.add_argument("saga", metavar="MODULE:SAGA")
    s.add_argument("--input", default="null", help="the run's input as JSON")
    s.add_argument("--run-id", help="an id of yours; starting it twice gives the same run")
    s.add_argument("--timeout", type=float, help="stop (and compensate) the run after SECONDS")
    s.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=0.0,
        help="wait for the run to finish (optionally at most SECONDS); exit 1 unless it completed",
    )
    s.add_argument("--json", action="store_true", help="one JSON object: run id (and outcome)")
    add_parsers(sub, ENV_HELP)
    d = sub.add_parser(
        "dashboard", help="serve the web dashboard (runs, steps, actions)", epilog=ENV_HELP
    )
    d.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    d.add_argument("--port", type=int, default=8180)
    d.add_argument("--read-only", action="store_true", help="no retry, cancel, fork or events")
    d.add_argument("--refresh", type=int, default=5, help="seconds between page reloads; 0: off")
    for name, help in DEV_COMMANDS.items():
        # Their own parser (saga_dev.cli) reads the rest, --help included.
        sub.add_parser(name, help=help, add_help=False)
    return parser


COMMANDS = {
    "migrate": cmd_migrate,
    "worker": cmd_worker,
    "relay": cmd_relay,
    "start": cmd_start,
    "show": cmd_show,
    "list": cmd_list,
    "demo": cmd_dev_tool,
    "bench": cmd_dev_tool,
    "cancel": cmd_operate,
    "retry": cmd_operate,
    "fork": cmd_operate,
    "send-event": cmd_operate,
    "dashboard": cmd_dashboard,
}


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SAGA_{'_'.join(map(str, e['loc'])).upper()}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigurationError(f"invalid settings: {problems} (saga --help lists them)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in DEV_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.dev_args = rest
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Definitions are imported by path, as Celery does: the working folder is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for problem in unknown_variables(os.environ):
        logging.getLogger("saga").warning("ignored: %s", problem)
    try:
        settings = resolve(_settings())
        handler: Any = COMMANDS[args.command]
        return int(handler(settings, args))
    except SagaError as exc:  # one line, never a traceback (exit codes: saga.exit_codes)
        print(f"saga: error: {exc}", file=sys.stderr)
        return exit_code(exc)
    except psycopg.Error as exc:  # one that no store call translated (connecting, say)
        print(f"saga: error: Postgres: {str(exc).strip()}", file=sys.stderr)
        return Exit.POSTGRES
    except KeyboardInterrupt:
        print("saga: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("durable-saga")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree not installed
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
