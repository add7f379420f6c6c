"""Sagas for ``saga bench``. Module-level so bench workers import them by path
(``saga_dev.bench_sagas:noop_chain_20``), as they would any user's saga."""

from __future__ import annotations

import os
import time

from saga.definition import Saga, StepContext, step

# The step counts ``saga bench core --steps`` accepts: one saga per count, built at import.
CHAIN_LENGTHS = (1, 10, 20, 50)


def noop(ctx: StepContext, value: int) -> int:
    # Typed like a real step, so the bench pays input validation and result encoding too.
    return value


def whoami(ctx: StepContext, value: None) -> int:
    """Which worker process ran the step. Slow enough that two concurrent runs land on two
    idle workers, which is how the bench knows both are consuming."""
    time.sleep(0.05)
    return os.getpid()


def chain_ref(steps: int) -> str:
    return f"{__name__}:noop_chain_{steps}"


def _chain(n: int) -> Saga:
    # Saga() records the module that calls it; the frame here is this module, as ref() needs.
    return Saga(f"bench.noop_chain_{n}", [step(noop, name=f"s{i}") for i in range(1, n + 1)])


noop_chain_1 = _chain(1)
noop_chain_10 = _chain(10)
noop_chain_20 = _chain(20)
noop_chain_50 = _chain(50)
whoami_saga = Saga("bench.whoami", [whoami])
