"""``saga demo`` and ``saga bench``: the development tools' commands, reached through ``saga``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from saga.errors import ConfigurationError
from saga.settings import Settings

BENCH_DEFAULTS = {"core": {"steps": 20, "runs": 2000}, "agent": {"steps": 10, "runs": 50}}


def demo_parser() -> argparse.ArgumentParser:
    d = argparse.ArgumentParser(
        prog="saga demo",
        description="The travel agent on real workers, with model faults and a killed worker.",
    )
    d.add_argument(
        "--stall-seconds",
        type=float,
        default=30.0,
        help="stop, saying what is stuck, when no step changes for this long (default 30)",
    )
    return d


def bench_parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(
        prog="saga bench",
        description="Benchmarks against raw Celery (and `saga bench chaos -h`, "
        "`saga bench retention -h`, `saga bench limits -h`, `saga bench peers -h`, "
        "`saga bench dashboard -h`, `saga bench journal -h`).",
    )
    b.add_argument("suite", choices=["core", "coordinator", "agent"])
    b.add_argument(
        "--tracing",
        action="store_true",
        help="core: throughput with tracing exporting to a local receiver vs off",
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--steps", type=int, help="core: 20; agent: 10 (turns per run)")
    b.add_argument("--runs", type=int, help="core: 2000; agent: 50")
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--failure-rate", type=float, default=0.15, help="agent: per step")
    b.add_argument("--attempts", type=int, default=8, help="agent: per step, both Celery and saga")
    b.add_argument("--kill-every", type=float, default=3.0, help="agent: seconds between kills")
    b.add_argument("--seed", type=int, default=1, help="agent: fault and kill schedule")
    b.add_argument(
        "--systems",
        help="agent: comma-separated (default plain,celery_autoretry,saga,saga_with_kills; "
        "celery_autoretry_with_kills is optional)",
    )
    return b


def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    if args.suite == "coordinator":
        from saga_dev.bench_coordinator import bench_coordinator

        print(json.dumps(bench_coordinator(settings), indent=None if args.json else 2))
        return 0
    for name, value in BENCH_DEFAULTS[args.suite].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.suite == "agent":
        from saga_dev.bench_agent import run_bench as run_agent_bench

        return run_agent_bench(settings, args)
    if args.tracing:
        from saga_dev.bench_tracing import bench_tracing

        report = bench_tracing(settings, args.runs, args.repeat)
        print(json.dumps(report, indent=None if args.json else 2))
        return 0
    from saga_dev.bench import run_bench as run_core_bench

    return int(run_core_bench(settings, args))


def main(command: str, argv: Sequence[str], settings: Settings) -> int:
    """Run ``saga COMMAND ARGV...`` with these (resolved) settings."""
    if command == "demo":
        args = demo_parser().parse_args(argv)
        from saga_dev.demo import run_demo

        return run_demo(settings, stall_seconds=args.stall_seconds)
    if command == "bench" and list(argv[:1]) == ["chaos"]:  # its own flags: saga bench chaos -h
        from saga_dev.bench_chaos import main as chaos_main

        return chaos_main(argv[1:], settings)
    if command == "bench" and list(argv[:1]) == ["retention"]:
        from saga_dev.bench_retention import main as retention_main

        return retention_main(argv[1:], settings)
    if command == "bench" and list(argv[:1]) == ["peers"]:
        from saga_dev.bench_peers import main as peers_main

        return peers_main(argv[1:], settings)
    if command == "bench" and list(argv[:1]) == ["journal"]:  # saga bench journal -h
        from saga_dev.bench_journal import main as journal_main

        return journal_main(argv[1:], settings)
    if command == "bench" and list(argv[:1]) == ["limits"]:  # saga bench limits -h
        from saga_dev.bench_limits import main as limits_main

        return limits_main(argv[1:], settings)
    if command == "bench" and list(argv[:1]) == ["dashboard"]:  # saga bench dashboard -h
        from saga_dev.bench_dashboard import main as dashboard_main

        return dashboard_main(argv[1:], settings)
    if command == "bench":
        return run_bench(settings, bench_parser().parse_args(argv))
    raise ConfigurationError(f"no development tool is called {command!r}")
