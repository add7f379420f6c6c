"""Every key the engine makes: a step's key within its run, and its idempotency key.

A step key is unique within a run: the step's name in a graph, ``name[i]`` for a fan-out
branch, ``name#position`` in a workflow written as code, ``compensate:<step_key>`` for a
compensation. The idempotency key adds the run: stable for every attempt of one step of one run,
unique across runs, and what step functions hand to outside systems.

A deployment namespace (``SAGA_KEY_PREFIX``) goes first, so that two environments sharing a
provider account never send the same key: ``<prefix>:<run_id>:<step_key>``. Each run keeps the
prefix it was started with (``saga_runs.key_prefix``): changing the setting changes the keys of
runs started afterwards, never those of a run in flight.
"""

from __future__ import annotations

COMPENSATION_PREFIX = "compensate:"


def branch_key(step_name: str, index: int) -> str:
    """A fan-out branch of a graph step (``map_over``)."""
    return f"{step_name}[{index}]"


def workflow_key(step_name: str, position: int) -> str:
    """A step, sleep or event wait of a workflow written as code, by its call position."""
    return f"{step_name}#{position}"


def compensation_key(step_key: str) -> str:
    """The compensation of the step with this key."""
    return f"{COMPENSATION_PREFIX}{step_key}"


def idempotency_key(run_id: str, step_key: str, prefix: str = "") -> str:
    """Stable for every attempt of one step of one run; unique across runs (and deployments,
    with a ``prefix``; none keeps the keys of versions without one)."""
    return f"{prefix}:{run_id}:{step_key}" if prefix else f"{run_id}:{step_key}"
