"""The DBOS side of ``saga bench peers``: a DBOS Transact queue worker running the same no-op
workloads as the engine's bench sagas. Imported only by its own worker processes, so DBOS stays a
bench-only dependency (the ``peers`` extra)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from dbos import DBOS

QUEUE = "saga_bench_peers"
CHAIN_WORKFLOW = "bench.chain"


@DBOS.step(name="bench.noop")
def noop(value: int) -> int:
    return value


@DBOS.workflow(name=CHAIN_WORKFLOW)
def chain(steps: int, value: int) -> int:
    # One checkpointed step per iteration, as the engine's noop_chain_N runs N journaled steps.
    for _ in range(steps):
        value = noop(value)
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m saga_dev.dbos_peer")
    p.add_argument("--database-url", required=True)
    p.add_argument("--executor-id", required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--polling", type=float, required=True)
    args = p.parse_args(argv)
    config: Any = {
        "name": "saga-bench-peers",
        "system_database_url": args.database_url,
        "executor_id": args.executor_id,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    DBOS.launch()
    DBOS.register_queue(
        QUEUE,
        worker_concurrency=args.concurrency,
        polling_interval_sec=args.polling,
        on_conflict="always_update",
    )
    print("ready", flush=True)
    stop.wait()
    DBOS.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
