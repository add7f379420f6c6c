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
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from pydantic import ValidationError

from saga import logs
from saga.agent.llm import ModelSettings
from saga.cli_runs import add_parsers, cmd_list, cmd_operate, cmd_show, emit, json_option
from saga.errors import ConfigurationError, SagaError
from saga.exit_codes import Exit, exit_code
from saga.migrate import require_schema as _require_schema
from saga.settings import Settings, unknown_variables
from saga.states import RunState

ENV_HELP = (
    "environment: "
    + ", ".join(f"SAGA_{name.upper()}" for name in Settings.model_fields)
    + "; for model completions (saga.agent, on workers): "
    + ", ".join(f"SAGA_MODEL_{name.upper()}" for name in ModelSettings.model_fields)
)


def resolve(settings: Settings, *, broker: bool = True) -> Settings:
    """Fill unset database and broker URLs with the embedded servers (started if needed);
    not the broker when it comes from the user's app (``broker`` false)."""
    if settings.database_url and (settings.broker_url or not broker):
        return settings
    from saga.embedded import start_embedded

    services = start_embedded(settings.state_dir)
    return settings.model_copy(
        update={
            "database_url": settings.database_url or services.database_url,
            "broker_url": settings.broker_url or (services.broker_url if broker else None),
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


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from saga.workers.app import create_app, run_celery
    from saga.workers.install import run_checks

    app = create_app(settings)
    run_checks(app)  # here, so that what fails says `saga: error:` and exits 2 before Celery
    port = args.http_port if args.http_port is not None else settings.http_port
    if port is not None:
        from saga.workers.probe import serve_worker

        serve_worker(app, settings, port, args.pool)  # before the pool forks and telemetry
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        "-Q",
        args.queues or settings.queue,
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
    return run_celery(app, argv)  # the worker's exit status: non-zero after an unrecoverable error


def _user_app(ref: str) -> Any:
    """The Celery app ``MODULE:ATTRIBUTE`` (or ``MODULE``, as ``celery -A`` takes it), with the
    engine installed on it."""
    from celery.app.utils import find_app

    from saga.workers.registry import installation

    try:
        app = find_app(ref)
    except Exception as exc:  # an import error, or no app there
        raise ConfigurationError(f"--app {ref!r} names no Celery app: {exc}") from None
    installation(app)  # ConfigurationError unless saga.celery.install(app) was called
    return app


def cmd_relay(settings: Settings, args: argparse.Namespace) -> int:
    from saga import tracing
    from saga.outbox.relay import PublishingImpossible, Relay
    from saga.retention import Pruner, policy
    from saga.store import PostgresStore, open_pool
    from saga.sweeper import Sweeper
    from saga.workers import telemetry
    from saga.workers.app import create_app
    from saga.workers.broker import check_broker
    from saga.workers.publish import CeleryPublisher

    assert settings.database_url
    _require_schema(settings.database_url)
    # Publish as the workers' app does (TLS, transport options, queue declarations).
    app = _user_app(args.app) if args.app else create_app(settings)
    check_broker(app)
    port = args.http_port if args.http_port is not None else settings.http_port
    liveness = None
    if port is not None:
        from saga.workers.probe import serve_relay

        _, liveness = serve_relay(app, settings, port)
    _, metrics_on = telemetry.configure_sdk("saga-relay")
    tracing.export_exception_details(settings.trace_exception_details)
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
        key_prefix=settings.key_prefix,
    )
    sweeper = (
        None if args.no_sweeper else Sweeper(store, worker_check_every=settings.lease_seconds / 3)
    )
    pruner = Pruner.from_settings(settings)
    # The outbox module knows nothing of runs: recovery and retention ride on its loop as
    # callbacks, each saying when it wants to run again.
    ticks: list[Callable[[], float | None]] = []
    if sweeper is not None:
        ticks.append(sweeper.tick)
    if pruner.enabled:
        ticks.append(pruner.tick)
    logging.getLogger("saga").info(
        "relay running (sweeper %s, retention %s)",
        "off" if sweeper is None else "on",
        {state.value: age for state, age in policy(settings).items()} or "off",
    )
    try:
        relay.run(
            stop,
            also=_soonest(ticks) if ticks else None,
            heartbeat=None
            if liveness is None
            else lambda: liveness.tick("relay", RELAY_BOUND_SECONDS + settings.relay_poll_seconds),
        )
    except PublishingImpossible as exc:
        raise ConfigurationError(str(exc)) from exc
    finally:
        pruner.close()
        store.close()
        telemetry.shutdown_sdk()
    return 0


def _soonest(ticks: Sequence[Callable[[], float | None]]) -> Callable[[], float | None]:
    """One callback for the relay's loop that runs each of ``ticks`` and wants to run again as
    soon as the soonest of them."""

    def tick() -> float | None:
        waits = [w for w in (t() for t in ticks) if w is not None]
        return min(waits, default=None)

    return tick


def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    from saga.retention import Pruner

    pruner = Pruner.from_settings(settings)
    if not pruner.enabled:
        print(
            "no retention is set (SAGA_RETENTION_<STATE>_SECONDS, e.g. "
            "SAGA_RETENTION_COMPLETED_SECONDS=604800): every run is kept",
            file=sys.stderr,
        )
    try:
        report = pruner.count() if args.dry_run else pruner.prune()
    finally:
        pruner.close()
    if args.json:
        print(json.dumps(report.as_json()))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for state, seconds in report.policy.items():
        steps = "" if report.steps is None else f" ({report.steps.get(state, 0)} steps)"
        print(
            f"{state:<20} kept {seconds:g} s after finishing: {verb} "
            f"{report.runs.get(state, 0)} runs{steps}"
        )
    print(f"{verb} {report.total_runs} finished runs in all")
    return 0


RELAY_BOUND_SECONDS = 30.0  # the relay's loop silent this long (plus a poll): not alive


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """An exec probe: 0 when Postgres and the broker answer and the schema is current, else 1
    with the reason on one line (or the checks as JSON)."""
    from saga import health
    from saga.workers.app import create_app

    try:
        app: Any = create_app(settings)
    except ConfigurationError as exc:
        checks = [
            *health.check_database(settings.database_url, args.timeout),
            health.Check("broker", False, str(exc)),
        ]
    else:
        checks = health.readiness(settings.database_url, app, args.timeout)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps(health.as_json(checks)))
    else:
        print(health.summary(checks), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


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
    "bench": "benchmarks: core, coordinator, agent (against raw Celery), chaos (under faults), "
    "retention (journal size)",
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


HTTP_PORT_HELP = (
    "serve /healthz, /readyz and /metrics on this port (SAGA_HTTP_PORT; bound to SAGA_HTTP_HOST, "
    "127.0.0.1 by default)"
)


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
    w.add_argument(
        "-Q",
        "--queues",
        help="comma-separated queues to read (default SAGA_QUEUE), e.g. -Q saga,gpu",
    )
    w.add_argument("--http-port", type=int, help=HTTP_PORT_HELP)
    r = sub.add_parser(
        "relay", help="publish the outbox and re-dispatch due steps", epilog=ENV_HELP
    )
    r.add_argument("--no-sweeper", action="store_true", help="publish only; no recovery sweeps")
    r.add_argument(
        "-A",
        "--app",
        help="publish through your Celery app MODULE[:APP] (saga.celery.install called on it), "
        "with its broker and options; SAGA_BROKER_URL is then not needed",
    )
    p = sub.add_parser(
        "prune",
        help="delete finished runs past their retention (SAGA_RETENTION_<STATE>_SECONDS)",
        epilog=ENV_HELP,
    )
    p.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    p.add_argument("--json", action="store_true")
    r.add_argument("--http-port", type=int, help=HTTP_PORT_HELP)
    hc = sub.add_parser(
        "health",
        help="exit 0 when Postgres and the broker answer and the schema is current (a probe)",
        epilog=ENV_HELP,
    )
    hc.add_argument("--json", action="store_true", help="the checks as one JSON object")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
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
    "health": cmd_health,
    "worker": cmd_worker,
    "relay": cmd_relay,
    "start": cmd_start,
    "show": cmd_show,
    "list": cmd_list,
    "prune": cmd_prune,
    "demo": cmd_dev_tool,
    "bench": cmd_dev_tool,
    "cancel": cmd_operate,
    "retry": cmd_operate,
    "fork": cmd_operate,
    "send-event": cmd_operate,
    "dashboard": cmd_dashboard,
}


def _setting_problem(error: Any) -> str:
    """One invalid setting, its value shown unless it is (or may hold) a secret."""
    loc = error["loc"]
    if not loc:  # a check across settings: its input is all of them
        return str(error["msg"])
    name = f"SAGA_{'_'.join(map(str, loc)).upper()}"
    field = Settings.model_fields.get(str(loc[0]))
    if field is not None and "SecretStr" in str(field.annotation):
        return f"{name}: {error['msg']}"
    return f"{name}={error.get('input')!r}: {error['msg']}"


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(_setting_problem(e) for e in exc.errors())
        raise ConfigurationError(f"invalid settings: {problems} (saga --help lists them)") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in DEV_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.dev_args = rest
    logs.configure(args.log_level, "text")  # until the settings say which format
    # Definitions are imported by path, as Celery does: the working folder is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for problem in unknown_variables(os.environ):
        logging.getLogger("saga").warning("ignored: %s", problem)
    try:
        settings = _settings()
        if settings.log_format != "text":
            logs.configure(args.log_level, settings.log_format)
        if args.command == "health":  # a probe checks what is configured, never embedded servers
            return cmd_health(settings, args)
        from_app = args.command == "relay" and bool(args.app)
        settings = resolve(settings, broker=not from_app)
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
