"""Flow-control declarations (saga.limits): validation, keys and units worked out per run, the
gates a step's journal row carries and their order, and what the coordinator journals for graph
sagas, workflows and run-level limits. No services: the gates themselves (taken, refused,
handed over in Postgres) are tested in tests/integration."""

from __future__ import annotations

from typing import Any

import pytest

from saga import Concurrency
from saga.definition import Saga, StepContext, step
from saga.errors import DefinitionError
from saga.workflow import WorkflowContext, workflow
from tests.unit.memory_run import Sim


def a(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def b(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


# -- a run's limit and its step's are two gates ------------------------------------------------

SAME_NAME = "the step's concurrency limit and its run's are both named"


def test_a_steps_limit_named_as_its_runs_is_refused_when_the_saga_is_built() -> None:
    # By default a step's limit is named after the step and a run's after the saga: a saga
    # named as its step would count the run's slot against its own step (a deadlock at 1).
    with pytest.raises(DefinitionError, match=f"saga 'a', step 'a': {SAME_NAME} 'a'"):
        Saga("a", [step(a, concurrency=Concurrency(1))], concurrency=Concurrency(1))
    with pytest.raises(DefinitionError, match=f"{SAME_NAME} 'svc'"):
        Saga(
            "calls",
            [step(a, concurrency=Concurrency(3, name="svc"))],
            concurrency=Concurrency(2, name="svc"),
        )
    decorated = Saga("decorated", concurrency=Concurrency(1, name="b"))
    with pytest.raises(DefinitionError, match=f"step 'b': {SAME_NAME} 'b'"):
        decorated.step(concurrency=Concurrency(1))(b)
    # Other names, or only one of the two limits: fine.
    Saga("a", [step(a, concurrency=Concurrency(1, name="svc"))], concurrency=Concurrency(1))
    Saga("a", [step(a)], concurrency=Concurrency(1))


@workflow("named_alike", concurrency=Concurrency(1))
def named_alike(ctx: WorkflowContext, value: Any) -> Any:
    return ctx.step(a, value, concurrency=Concurrency(1, name="named_alike"))


def test_a_workflow_steps_limit_named_as_its_runs_is_refused_when_it_is_scheduled() -> None:
    sim = Sim(named_alike, 1)
    with pytest.raises(DefinitionError, match=f"workflow 'named_alike', step 'a': {SAME_NAME}"):
        sim.start()
    assert sim.run_id not in sim.db.runs  # the run's creation is rolled back
