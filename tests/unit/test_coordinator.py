"""The coordinator against an in-memory twin of the store: graphs, fan-out/in, compensation
order, pivot, cancel, workflows replayed against their journal, events, timers, idempotency keys.

No services: ``tests.unit.memory_run.Sim`` plays the workers and decides every step's outcome;
no step function is ever called.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from pydantic import BaseModel

from saga import coordinator
from saga.definition import Saga, StepContext, step
from saga.errors import DefinitionError
from saga.failures import ErrorType, error_record
from saga.keys import idempotency_key
from saga.records import Fenced, OperatorError
from saga.retry import RetryPolicy
from saga.workflow import EventTimeout, StepFailed, WorkflowContext, workflow
from tests import coordinator_sagas as cs
from tests import sagas
from tests.unit.memory_run import MemoryDB, MemoryRunTx, Refused, Sim

# -- definitions of this module (their functions are never called) ----------------------------


def a(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def b(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def c(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def d(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def undo(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


# Two roots; c needs both; d follows c alone; e is a second sink.
diamond = Saga("diamond")
diamond.step()(a)
diamond.step()(b)
diamond.step(after=[a, b])(c)
diamond.step(after=c)(d)
diamond.step(name="e", after=a)(b)

# List form with compensations: a chain the fast path advances without reading the journal.
chain = Saga("chain", [step(a, compensate=undo), step(b, compensate=undo), c])

# A fan-out written as a list, with a compensation per branch.
listed_fan = Saga("listed_fan", [a, step(b, map_over=a, compensate=undo), c])


@workflow("three")
def three(ctx: WorkflowContext, value: Any) -> list[Any]:
    x = ctx.step(a, value)
    y = ctx.step(b, x)
    z = ctx.step(c, y)
    return [x, y, z]


@workflow("parallel")
def parallel(ctx: WorkflowContext, value: Any) -> dict[str, Any]:
    ha, hb, hc = ctx.start(a, 1), ctx.start(b, 2), ctx.start(c, 3)
    ra, rb, rc = ctx.gather(ha, hb, hc)
    return {"a": ra, "b": rb, "c": rc}


@workflow("mapper")
def mapper(ctx: WorkflowContext, items: list[Any]) -> list[Any]:
    return ctx.map(a, items)


@workflow("fallback")
def fallback(ctx: WorkflowContext, value: Any) -> Any:
    try:
        ctx.step(a, value)
    except StepFailed as exc:
        return ctx.step(b, str(exc))
    return "primary"


@workflow("booking")
def booking(ctx: WorkflowContext, value: Any) -> Any:
    ctx.step(a, value, compensate=undo, compensate_retry=cs.BRIEF)
    ctx.step(b, value, compensate=undo)
    ctx.step(c, value)  # not compensable
    return ctx.step(d, value)


@workflow("pivoting")
def pivoting(ctx: WorkflowContext, value: Any) -> Any:
    ctx.step(a, value, compensate=undo)
    ctx.step(b, value, pivot=True)
    return ctx.step(c, value)


@workflow("deploys")
def deploys(ctx: WorkflowContext, value: Any) -> Any:
    ctx.step(a, value, compensate=undo)
    return ctx.step(b, value)


@workflow("deploys")  # the same workflow after a deploy that changed its first call
def deploys_changed(ctx: WorkflowContext, value: Any) -> Any:
    ctx.step(c, value, compensate=undo)
    return ctx.step(b, value)


@workflow("deploys")  # ... or made the first call a sleep
def deploys_sleeps(ctx: WorkflowContext, value: Any) -> Any:
    ctx.sleep(1)
    return ctx.step(b, value)


@workflow("patient")
def patient(ctx: WorkflowContext, value: Any) -> Any:
    try:
        decision = ctx.wait_event("go", timeout=5)
    except EventTimeout:
        decision = "timed out"
    return ctx.step(a, decision)


@workflow("two_waits")
def two_waits(ctx: WorkflowContext, value: Any) -> list[Any]:
    return [ctx.wait_event("ping"), ctx.wait_event("ping")]


@workflow("step_then_two_waits")
def step_then_two_waits(ctx: WorkflowContext, value: Any) -> list[Any]:
    ctx.step(a, value)
    return [ctx.wait_event("ping"), ctx.wait_event("ping")]


class Summary(BaseModel):
    count: int
    names: list[str]


@workflow("summarise")
def summarise(ctx: WorkflowContext, value: Any) -> Summary:
    names = ctx.step(a, value)
    return Summary(count=len(names), names=names)


class Quote(BaseModel):
    city: str
    price: int


def quote(ctx: StepContext, city: str) -> Quote:
    return Quote(city=city, price=100)


def quotes(ctx: StepContext, cities: list[str]) -> list[Quote]:
    return [Quote(city=c, price=100) for c in cities]


def plain(ctx: StepContext, value: Any) -> dict[str, list[int]]:
    return {"n": [1]}


@workflow("typed_results")
def typed_results(ctx: WorkflowContext, city: str) -> dict[str, Any]:
    one = ctx.step(quote, city)
    many = ctx.gather(ctx.start(quotes, [city, "Porto"]), ctx.start(plain, None))
    # Typed as the step functions return them, on every replay: models, not their JSON.
    assert isinstance(one, Quote), type(one)
    assert all(isinstance(q, Quote) for q in many[0]), many[0]
    return {"price": one.price, "cities": [q.city for q in many[0]], "plain": many[1]}


@workflow("unserialisable")
def unserialisable(ctx: WorkflowContext, value: Any) -> Any:
    ctx.step(a, value)
    return object()


TRIP = {"city": "Lisbon"}
BRANCHES = ("flight", "hotel", "car")


def booked(kind: str) -> dict[str, str]:
    return {"kind": kind, "ref": f"{kind}-1"}


def trip_to_branches(**kwargs: Any) -> Sim:
    sim = Sim(cs.trip, TRIP, **kwargs).start()
    sim.complete("quote", {"city": "Lisbon", "price": 420})
    return sim


def journal_shape(sim: Sim) -> list[tuple[Any, ...]]:
    return [
        (
            r.step_key,
            r.step_name,
            r.kind,
            r.seq,
            r.state,
            r.position,
            r.input,
            r.result,
            r.fn_ref,
            r.compensation_ref,
            r.options,
            r.max_attempts,
            r.idempotency_key,
        )
        for r in sim.rows()
    ]


# -- linear sagas -----------------------------------------------------------------------------


def test_linear_saga_schedules_one_step_at_a_time_with_the_previous_result() -> None:
    sim = Sim(sagas.ten, {"n": 0}, run_id="lin").start()
    assert sim.open_steps() == ["step1"]
    assert sim.row("step1").input == {"n": 0}
    for i in range(1, 11):
        sim.complete(f"step{i}", {"n": i})
        if i < 10:
            assert sim.open_steps() == [f"step{i + 1}"]
            assert sim.row(f"step{i + 1}").input == {"n": i}
            assert sim.step_keys() == [f"step{j}" for j in range(1, i + 2)]
            assert sim.run.state == "running"
            assert sim.transactions[-1].journal_reads == 0, "the chain fast path reads no journal"
    assert sim.run.state == "completed"
    assert sim.run.result == {"n": 10}
    assert sim.step_messages() == [f"step{i}" for i in range(1, 11)]


def test_linear_saga_result_json_from_the_worker_is_passed_on_as_journaled() -> None:
    sim = Sim(chain, None).start()
    sim.complete("a", result_json='{"b": 2, "a": [1, 2.5, null]}')
    assert sim.row("b").input == {"b": 2, "a": [1, 2.5, None]}


@pytest.mark.parametrize(
    ("definition", "run_input", "outcomes"),
    [
        (sagas.ten, {"n": 0}, [(f"step{i}", {"n": i}) for i in range(1, 11)]),
        (chain, "x", [("a", 1), ("b", [2]), ("c", {"three": 3})]),
        (
            cs.trip,
            TRIP,
            [
                ("quote", {"price": 1}),
                ("hotel", booked("hotel")),
                ("car", booked("car")),
                ("flight", booked("flight")),
                ("payment", {"paid": 420}),
                ("confirm", "confirmed"),
            ],
        ),
        (cs.fan, 2, [("split", [0, 1]), ("square[1]", 1), ("square[0]", 0), ("total", "t")]),
        (diamond, 7, [("b", "B"), ("a", "A"), ("e", "E"), ("c", "C"), ("d", "D")]),
    ],
    ids=["ten", "chain", "trip", "fan", "diamond"],
)
def test_chain_fast_path_and_full_journal_path_agree(
    definition: Saga, run_input: Any, outcomes: list[tuple[str, Any]]
) -> None:
    fast = Sim(definition, run_input, run_id="same").start()
    slow = Sim(definition, run_input, run_id="same", fast_path=False).start()
    for key, result in outcomes:
        fast.complete(key, result)
        slow.complete(key, result)
        assert journal_shape(fast) == journal_shape(slow), f"after {key!r}"
        assert fast.step_messages() == slow.step_messages()
        assert slow.transactions[-1].completed is None
    assert fast.run.state == slow.run.state == "completed"
    assert fast.run.result == slow.run.result


def test_first_steps_are_what_starting_a_run_schedules() -> None:
    input_json = cs.trip.validate_input(TRIP)
    first = coordinator.first_steps(cs.trip, "r1", input_json)
    assert [s.step_key for s in first] == ["quote"]
    assert first[0].idempotency_key == "r1:quote"
    assert json.loads(first[0].input_json) == json.loads(input_json)
    sim = Sim(cs.trip, TRIP, run_id="r1").start()
    assert sim.open_steps() == ["quote"]
    assert sim.row("quote").input == json.loads(input_json)
    assert sim.row("quote").fn_ref == first[0].fn_ref == "tests.coordinator_sagas:quote"


# -- graphs -----------------------------------------------------------------------------------


def test_graph_schedules_roots_first_with_the_run_input() -> None:
    sim = Sim(diamond, {"x": 1}).start()
    assert sim.open_steps() == ["a", "b"]
    assert sim.row("a").input == sim.row("b").input == {"x": 1}


@pytest.mark.parametrize("order", list(itertools.permutations(BRANCHES)))
def test_step_with_several_deps_is_scheduled_once_when_all_have_completed(
    order: tuple[str, ...],
) -> None:
    sim = trip_to_branches()
    assert sim.open_steps() == list(BRANCHES)
    for kind in BRANCHES:
        assert sim.row(kind).input == {"city": "Lisbon", "price": 420}
        assert sim.row(kind).compensation_ref == "tests.coordinator_sagas:undo"
    for i, kind in enumerate(order):
        assert "payment" not in sim.step_keys()
        sim.complete(kind, booked(kind))
        sim.advance()  # a stray advance task changes nothing
        if i < 2:
            assert sim.open_steps() == [k for k in BRANCHES if k not in order[: i + 1]]
    assert sim.open_steps() == ["payment"]
    assert sim.row("payment").input == {k: booked(k) for k in BRANCHES}
    assert sim.step_messages().count("payment") == 1
    assert sim.row("payment").options["pivot"] is True


def test_several_sinks_give_a_dict_of_their_results() -> None:
    sim = Sim(diamond, 0).start()
    sim.complete("a", "A")
    assert sim.open_steps() == ["b", "e"]  # e follows a alone; c waits for b
    assert sim.row("e").input == "A"
    sim.complete("b", "B")
    assert sim.open_steps() == ["e", "c"]
    assert sim.row("c").input == {"a": "A", "b": "B"}
    sim.complete("c", "C")
    assert sim.row("d").input == "C"
    sim.complete("d", "D")
    assert sim.run.state == "running"
    sim.complete("e", "E")
    assert sim.run.state == "completed"
    assert sim.run.result == {"d": "D", "e": "E"}


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0)])
def test_fan_out_runs_a_branch_per_item_and_fan_in_gets_results_in_index_order(
    order: tuple[int, ...],
) -> None:
    sim = Sim(cs.fan, 3).start()
    assert sim.open_steps() == ["split"]
    sim.complete("split", [10, 20, 30])
    assert sim.open_steps() == ["square[0]", "square[1]", "square[2]"]
    assert [sim.row(f"square[{i}]").input for i in range(3)] == [10, 20, 30]
    assert {sim.row(f"square[{i}]").step_name for i in range(3)} == {"square"}
    for i in order:
        assert "total" not in sim.step_keys()
        sim.complete(f"square[{i}]", (i + 1) * 100)
        assert sim.run.state == "running"
    assert sim.open_steps() == ["total"]
    assert sim.row("total").input == [100, 200, 300]
    sim.complete("total", {"count": 3})
    assert (sim.run.state, sim.run.result) == ("completed", {"count": 3})


def test_fan_out_over_an_empty_list_goes_straight_to_the_fan_in() -> None:
    sim = Sim(cs.fan, 0).start()
    sim.complete("split", [])
    assert sim.step_keys() == ["split", "total"]
    assert sim.open_steps() == ["total"]
    assert sim.row("total").input == []
    sim.complete("total", {"count": 0, "squares": []})
    assert sim.run.state == "completed"


@pytest.mark.parametrize(
    ("result", "type_name"), [({"a": 1}, "dict"), ("abc", "str"), (None, "NoneType"), (3, "int")]
)
def test_fan_out_over_a_non_list_fails_the_run_with_a_clear_error(
    result: Any, type_name: str
) -> None:
    sim = Sim(cs.fan, 3).start()
    sim.complete("split", result)
    assert sim.run.state == "failed"
    assert sim.run.error["type"] == "TypeError"
    message = sim.run.error["message"]
    assert "'square'" in message and "'split'" in message
    assert f"a {type_name}, not a list" in message
    assert sim.step_keys() == ["split"]


def test_listed_fan_out_compensates_every_branch_in_reverse_completion_order() -> None:
    sim = Sim(listed_fan, None).start()
    sim.complete("a", ["x", "y", "z"])
    assert sim.open_steps() == ["b[0]", "b[1]", "b[2]"]
    for i in (1, 2, 0):
        sim.complete(f"b[{i}]", f"r{i}")
    sim.fail("c", "Boom", "c broke")
    undone = []
    while sim.run.state == "compensating":
        [key] = sim.open_steps()
        undone.append(key)
        assert sim.row(key).input == f"r{key[-2]}"
        sim.complete(key)
    assert undone == ["compensate:b[0]", "compensate:b[2]", "compensate:b[1]"]
    assert sim.run.state == "compensated"


# -- failure and compensation -----------------------------------------------------------------


def test_a_step_failing_for_good_compensates_and_cancels_open_steps() -> None:
    sim = trip_to_branches(run_id="r")
    sim.complete("flight", booked("flight"))
    sim.fail("car", "builtins.ValueError", "no cars left")
    assert sim.run.state == "compensating"
    assert sim.run.error["message"] == "no cars left"
    assert sim.row("hotel").state == "cancelled"  # never claimed: known to have done nothing
    with pytest.raises(Refused):
        sim.claim("hotel")
    # The failed step's attempt started: its effect may be applied, so it is undone too,
    # first, with no value (it has no result) and what it needs to undo by key.
    assert sim.open_steps() == ["compensate:car"]
    undo_car = sim.row("compensate:car")
    assert undo_car.input is None
    assert undo_car.options["undo"] == {
        "step_key": "car",
        "idempotency_key": "r:car",
        "completed": False,
        "input": {"city": "Lisbon", "price": 420},
    }
    sim.complete("compensate:car")
    assert sim.open_steps() == ["compensate:flight"]
    assert sim.row("compensate:flight").input == booked("flight")
    assert sim.row("compensate:flight").options["undo"]["completed"] is True
    sim.complete("compensate:flight")
    assert sim.run.state == "compensated"
    assert "compensate:hotel" not in sim.step_keys()


def test_a_retried_attempt_does_not_fail_the_run() -> None:
    sim = trip_to_branches()
    sim.fail("car", "Flaky", "try again", retry_in=0.5)
    assert sim.run.state == "running"
    assert sim.row("car").state == "pending"
    assert sim.row("car").error["retryable"] is True
    sim.redispatch("car")
    sim.complete("car", booked("car"))
    assert sim.row("car").attempt == 2
    assert sim.row("car").state == "completed"


@pytest.mark.parametrize("order", list(itertools.permutations(BRANCHES)))
def test_compensations_run_one_at_a_time_in_reverse_completion_order(
    order: tuple[str, ...],
) -> None:
    sim = trip_to_branches(run_id="trip")
    for kind in order:
        sim.complete(kind, booked(kind))
    sim.fail("payment", "tests.coordinator_sagas.PaymentDeclined", "card declined")
    assert sim.run.state == "compensating"
    undone = []
    while sim.run.state == "compensating":
        open_steps = sim.open_steps()
        assert len(open_steps) == 1, f"one compensation at a time, not {open_steps}"
        key = open_steps[0]
        row = sim.row(key)
        assert (row.kind, row.fn_ref) == ("compensation", "tests.coordinator_sagas:undo")
        assert row.input == booked(row.step_name)
        assert row.idempotency_key == f"trip:{key}"
        assert row.max_attempts == coordinator.COMPENSATION_RETRY.max_attempts
        undone.append(key.removeprefix("compensate:"))
        sim.complete(key, {"cancelled": row.input["ref"]})
    assert undone == list(reversed(order))
    assert sim.run.state == "compensated"
    assert sim.run.error["message"] == "card declined"
    assert "compensate:quote" not in sim.step_keys()  # quote has no compensation
    assert "confirm" not in sim.step_keys()


def test_a_compensation_failing_for_good_ends_compensation_failed() -> None:
    sim = trip_to_branches()
    for kind in BRANCHES:
        sim.complete(kind, booked(kind))
    sim.fail("payment", "PaymentDeclined", "card declined")
    assert sim.open_steps() == ["compensate:car"]
    sim.fail("compensate:car", "Down", "car API down", retry_in=1.0)
    assert sim.run.state == "compensating"
    assert sim.row("compensate:car").state == "pending"
    sim.redispatch("compensate:car")
    sim.fail("compensate:car", "Down", "car API still down")
    assert sim.run.state == "compensation_failed"
    assert sim.run.error["message"] == "card declined", "the run keeps the original error"
    assert sim.step_keys(kind="compensation") == ["compensate:car"]


def test_a_compensation_retries_by_its_steps_compensate_retry_policy() -> None:
    sim = Sim(cs.fragile_trip, {"city": "Oslo"}).start()
    sim.complete("quote_any", {"city": "Oslo"})
    sim.complete("flight", booked("flight"))
    sim.complete("car", booked("car"))
    sim.fail("payment", "PaymentDeclined", "card declined")
    undo_car = sim.row("compensate:car")
    assert undo_car.max_attempts == 2
    assert RetryPolicy.from_json(undo_car.options["retry"]) == cs.BRIEF
    assert undo_car.fn_ref == "tests.coordinator_sagas:undo_until_fixed"
    sim.fail("compensate:car", "RuntimeError", "refused", retry_in=0.05)
    sim.redispatch("compensate:car")
    sim.fail("compensate:car", "RuntimeError", "refused")  # attempt 2 of 2: for good
    assert sim.run.state == "compensation_failed"
    assert sim.step_keys(kind="compensation") == ["compensate:car"]


def test_a_step_running_at_failure_time_is_waited_for_then_compensated_first() -> None:
    sim = trip_to_branches()
    sim.complete("flight", booked("flight"))
    sim.claim("hotel")  # a worker is running it
    sim.fail("car", "Boom", "car failed")
    assert sim.run.state == "compensating"
    assert sim.step_keys(kind="compensation") == [], "nothing is undone while a step runs"
    assert sim.row("hotel").state == "running"
    sim.advance()
    assert sim.step_keys(kind="compensation") == []
    sim.complete("hotel", booked("hotel"))  # its result is journaled though the run compensates
    assert sim.open_steps() == ["compensate:car"]  # the failed step: outcome unknown
    sim.complete("compensate:car")
    assert sim.open_steps() == ["compensate:hotel"]
    sim.complete("compensate:hotel")
    assert sim.open_steps() == ["compensate:flight"]
    sim.complete("compensate:flight")
    assert sim.run.state == "compensated"


def test_a_step_running_at_failure_time_that_fails_is_compensated_all_the_same() -> None:
    # The reproduction: an effect applied, then the answer lost (a retryable error), while a
    # sibling fails for good. The attempt's outcome is unknown: it is undone, not retried.
    sim = trip_to_branches()
    sim.claim("hotel")
    sim.fail("car", "Boom", "car failed")
    assert sim.run.state == "compensating"
    sim.fail("hotel", "Flaky", "applied, but the answer was lost", retry_in=1.0)
    assert sim.row("hotel").state == "failed"  # no retry while compensating
    # Both outcomes unknown: undone newest scheduled first.
    assert sim.open_steps() == ["compensate:car"]
    sim.complete("compensate:car")
    assert sim.open_steps() == ["compensate:hotel"]
    assert sim.row("compensate:hotel").options["undo"]["completed"] is False
    sim.complete("compensate:hotel")
    assert sim.run.state == "compensated"


def test_a_step_waiting_for_its_retry_at_failure_time_is_cancelled_and_compensated() -> None:
    sim = trip_to_branches()
    sim.fail("hotel", "Flaky", "applied, but the answer was lost", retry_in=5.0)
    assert sim.row("hotel").state == "pending"
    sim.fail("car", "Boom", "car failed")
    assert sim.row("hotel").state == "cancelled"  # no more attempts
    assert sorted(sim.step_keys(kind="compensation")) == ["compensate:car"]
    sim.complete("compensate:car")
    assert sim.open_steps() == ["compensate:hotel"]  # its attempt 1 may have booked
    sim.complete("compensate:hotel")
    assert sim.run.state == "compensated"


def test_a_step_whose_worker_died_at_failure_time_is_compensated_once_its_lease_ends() -> None:
    sim = trip_to_branches()
    sim.claim("hotel")  # the worker books, then is killed before the outcome commits
    sim.fail("car", "Boom", "car failed")
    assert sim.step_keys(kind="compensation") == [], "nothing is undone while a lease runs"
    sim.expire_lease("hotel")
    assert sim.row("hotel").state == "failed"
    assert sim.open_steps() == ["compensate:car"]
    sim.complete("compensate:car")
    assert sim.open_steps() == ["compensate:hotel"]
    sim.complete("compensate:hotel")
    assert sim.run.state == "compensated"


@pytest.mark.parametrize("timing", ["running", "retrying", "worker died", "completed"])
def test_the_final_state_does_not_depend_on_a_siblings_timing(timing: str) -> None:
    sim = trip_to_branches()
    sim.complete("flight", booked("flight"))
    if timing == "completed":
        sim.complete("hotel", booked("hotel"))
    else:
        sim.claim("hotel")
        if timing == "retrying":
            sim.fail("hotel", "Flaky", "lost answer", retry_in=5.0)
    sim.fail("car", "Boom", "car failed")
    if timing == "running":
        sim.fail("hotel", "Flaky", "lost answer", retry_in=1.0)
    elif timing == "worker died":
        sim.expire_lease("hotel")
    while sim.run.state == "compensating":
        [key] = sim.open_steps()
        sim.complete(key)
    assert sim.run.state == "compensated"
    assert sorted(sim.step_keys(kind="compensation")) == [
        "compensate:car",
        "compensate:flight",
        "compensate:hotel",
    ]


def test_a_failure_past_the_pivot_fails_the_run_without_compensating() -> None:
    sim = trip_to_branches()
    for kind in BRANCHES:
        sim.complete(kind, booked(kind))
    sim.complete("payment", {"paid": 420})
    assert sim.open_steps() == ["confirm"]
    sim.fail("confirm", "Refused", "the confirmation service refused")
    assert sim.run.state == "failed"
    assert sim.run.error["pivot_passed"] is True
    assert sim.run.error["message"] == "the confirmation service refused"
    assert sim.step_keys(kind="compensation") == []


def test_a_failure_with_nothing_to_undo_fails_the_run() -> None:
    sim = Sim(cs.fan, 3).start()
    sim.complete("split", [0, 1, 2])
    sim.fail("square[0]", "builtins.ValueError", "bad request")
    assert sim.run.state == "failed"
    assert sim.run.error == {
        "type": "builtins.ValueError",
        "message": "bad request",
        "attempt": 1,
        "retryable": False,
    }
    assert sim.states() == {
        "split": "completed",
        "square[0]": "failed",
        "square[1]": "cancelled",
        "square[2]": "cancelled",
    }
    with pytest.raises(Refused):
        sim.claim("square[1]")


def test_a_late_outcome_of_a_step_of_a_finished_run_is_fenced() -> None:
    sim = Sim(cs.fan, 2).start()
    sim.complete("split", [0, 1])
    sim.claim("square[0]")
    sim.fail("square[1]", "Boom", "no")  # square has no compensation: failed at once
    assert sim.run.state == "failed"
    with pytest.raises(Fenced):
        sim.complete("square[0]", 0)
    assert sim.row("square[0]").state == "running", "the fenced outcome was rolled back"
    assert sim.row("square[0]").result is None


def test_an_operator_retry_of_a_failed_compensation_resumes_compensating() -> None:
    sim = trip_to_branches()
    for kind in ("hotel", "flight"):
        sim.complete(kind, booked(kind))
    sim.fail("car", "Boom", "car failed")
    sim.complete("compensate:car")
    sim.fail("compensate:flight", "Down", "airline API down")
    assert sim.run.state == "compensation_failed"
    sim.retry()
    assert sim.run.state == "compensating"
    assert sim.open_steps() == ["compensate:flight"]
    assert (
        sim.row("compensate:flight").max_attempts == 1 + coordinator.COMPENSATION_RETRY.max_attempts
    )
    sim.complete("compensate:flight")
    sim.complete("compensate:hotel")
    assert (sim.run.state, sim.run.error["message"]) == ("compensated", "car failed")


def test_an_operator_retry_of_a_failed_step_resumes_the_run() -> None:
    sim = Sim(sagas.two, {}).start()
    sim.complete("step1", {"one": 1})
    sim.fail("step2", "Bug", "fixed by the next deploy")
    assert sim.run.state == "failed"
    sim.retry()
    assert (sim.run.state, sim.run.error, sim.open_steps()) == ("running", None, ["step2"])
    sim.complete("step2", {"two": 2})
    assert (sim.run.state, sim.run.result) == ("completed", {"two": 2})


def test_a_lost_attempt_out_of_attempts_fails_the_step_and_the_run_advances() -> None:
    sim = Sim(chain, None).start()
    sim.complete("a", "A")
    sim.row("b").max_attempts = 1
    sim.claim("b")
    sim.expire_lease("b")
    assert sim.row("b").error["type"] == "LeaseExpired"
    assert sim.run.state == "compensating"
    assert sim.open_steps() == ["compensate:b"]  # the lost attempt may have done its work
    sim.complete("compensate:b")
    assert sim.open_steps() == ["compensate:a"]


# -- cancel and deadlines ---------------------------------------------------------------------


def test_cancel_compensates_then_ends_cancelled_even_past_the_pivot() -> None:
    sim = trip_to_branches()
    for kind in ("car", "flight", "hotel"):
        sim.complete(kind, booked(kind))
    sim.complete("payment", {"paid": 420})
    sim.cancel("customer changed their mind")
    assert sim.run.state == "compensating"
    assert sim.row("confirm").state == "cancelled"
    undone = []
    while sim.run.state == "compensating":
        [key] = sim.open_steps()
        undone.append(key)
        sim.complete(key)
    assert undone == ["compensate:hotel", "compensate:flight", "compensate:car"]
    assert sim.run.state == "cancelled"
    assert sim.run.error == {"type": "Cancelled", "message": "customer changed their mind"}


def test_cancel_with_nothing_to_compensate_ends_cancelled_at_once() -> None:
    sim = Sim(cs.trip, TRIP).start()
    sim.cancel()
    assert sim.run.state == "cancelled"
    assert sim.row("quote").state == "cancelled"
    with pytest.raises(OperatorError):
        sim.cancel()


def test_cancel_waits_for_a_running_compensable_step() -> None:
    sim = trip_to_branches()
    sim.claim("flight")
    sim.cancel()
    assert (sim.run.state, sim.step_keys(kind="compensation")) == ("compensating", [])
    assert sim.states()["hotel"] == sim.states()["car"] == "cancelled"
    sim.complete("flight", booked("flight"))
    sim.complete("compensate:flight")
    assert sim.run.state == "cancelled"


def test_stop_with_another_error_compensates_then_ends_compensated_or_failed() -> None:
    timeout = {"type": "RunTimeout", "message": "run passed its deadline"}
    sim = trip_to_branches()
    sim.complete("hotel", booked("hotel"))
    sim.stop(timeout)
    sim.complete("compensate:hotel")
    assert (sim.run.state, sim.run.error) == ("compensated", timeout)
    bare = Sim(cs.trip, TRIP).start()
    bare.stop(timeout)
    assert (bare.run.state, bare.run.error) == ("failed", timeout)


def test_coordinator_stop_on_a_bare_transaction() -> None:
    sim = trip_to_branches(run_id="direct")
    sim.complete("car", booked("car"))
    tx = MemoryRunTx(sim.db, sim.view())
    coordinator.stop(tx, error_record(ErrorType.CANCELLED, "stop"))
    assert tx.run.state == sim.run.state == "compensating"
    assert tx.run.error == sim.run.error == {"type": "Cancelled", "message": "stop"}
    assert [m.payload for m in tx.messages] == [{"run_id": "direct", "step_key": "compensate:car"}]


# -- workflows --------------------------------------------------------------------------------


def test_workflow_replay_returns_journaled_results_and_schedules_the_first_missing_call() -> None:
    sim = Sim(three, "in").start()
    assert sim.open_steps() == ["a#1"]
    assert (sim.row("a#1").input, sim.row("a#1").position) == ("in", 1)
    sim.complete("a#1", "A")
    assert sim.step_keys() == ["a#1", "b#2"]
    assert sim.row("b#2").input == "A"
    sim.advance()  # a replay with nothing new schedules nothing again
    assert sim.step_keys() == ["a#1", "b#2"]
    sim.complete("b#2", "B")
    assert sim.row("c#3").input == "B"
    sim.complete("c#3", "C")
    assert sim.run.state == "completed"
    assert sim.run.result == ["A", "B", "C"]


def test_workflow_steps_return_their_declared_types_on_replay_not_json() -> None:
    sim = Sim(typed_results, "Lisbon").start()
    sim.complete("quote#1", {"city": "Lisbon", "price": 120})
    assert sim.open_steps() == ["quotes#2", "plain#3"]
    sim.complete("plain#3", {"n": [1]})
    sim.complete("quotes#2", [{"city": "Lisbon", "price": 1}, {"city": "Porto", "price": 2}])
    assert sim.run.state == "completed", sim.run.error
    assert sim.run.result == {"price": 120, "cities": ["Lisbon", "Porto"], "plain": {"n": [1]}}


def _routed_trip() -> Saga:
    trip = Saga("routed_trip")
    trip.step()(cs.quote)
    trip.step(after=cs.quote, compensate=cs.undo, queue="payments-api")(cs.flight)
    trip.step(after=cs.flight)(cs.payment)
    return trip


def test_a_routed_step_and_its_compensation_carry_its_queue_others_none() -> None:
    sim = Sim(_routed_trip(), TRIP, run_id="r").start()
    assert "queue" not in sim.row("quote").options  # unrouted options are journaled as before
    sim.complete("quote", {"city": "Lisbon", "price": 420})
    assert sim.row("flight").options["queue"] == "payments-api"
    sim.complete("flight", booked("flight"))
    assert "queue" not in sim.row("payment").options
    sim.fail("payment", "tests.coordinator_sagas.PaymentDeclined", "card declined")
    assert sim.row("compensate:flight").options["queue"] == "payments-api"


def test_a_journaled_result_that_no_longer_fits_its_type_is_a_divergence_not_a_failure() -> None:
    sim = Sim(typed_results, "Lisbon").start()
    sim.complete("quote#1", {"city": "Lisbon"})  # journaled by older code: no price
    assert sim.run.state == "failed"
    assert sim.run.error["type"].endswith("NonDeterminismError"), sim.run.error
    assert "step 'quote' (call 1) no longer fits the return type" in sim.run.error["message"]
    assert sim.open_steps() == []


def test_a_step_result_that_does_not_fit_its_annotation_fails_where_it_is_made() -> None:
    from saga.definition import function_info
    from saga.errors import StepResultError

    info = function_info(quote, "test")
    with pytest.raises(StepResultError, match="cannot be journaled"):
        info.encode_result({"city": "Lisbon"}, limit=1000, run_id="r", step="quote#1")
    assert info.encode_result(Quote(city="Lisbon", price=1), limit=1000, run_id="r", step="q")


def int_keys(ctx: StepContext, value: Any) -> dict[int, str]:
    return {1: "a"}


def test_a_dict_with_non_string_keys_is_decoded() -> None:
    from saga.definition import function_info

    info = function_info(int_keys, "test")
    assert info.decode_result({"1": "a"}) == {1: "a"}


@pytest.mark.parametrize("queue", ["", "has space", "x" * 201, 7])
def test_a_bad_queue_name_names_the_saga_and_the_step(queue: Any) -> None:
    trip = Saga("bad_queue")
    with pytest.raises(DefinitionError, match=r"saga 'bad_queue', step 'quote': queue must be"):
        trip.step(queue=queue)(cs.quote)


@pytest.mark.parametrize(
    ("fn", "decodes"),
    [(quote, True), (quotes, True), (plain, False), (cs.split, False), (cs.confirm, False)],
)
def test_only_results_whose_json_is_not_the_value_are_decoded(fn: Any, decodes: bool) -> None:
    from saga.definition import function_info

    assert function_info(fn, "test").decodes_result is decodes


def test_agent_loop_replays_its_history_each_iteration() -> None:
    sim = Sim(cs.agent_loop, {"iterations": 4}).start()
    for i in range(4):
        key = f"think#{i + 1}"
        assert sim.open_steps() == [key]
        assert sim.row(key).input == i
        assert sim.row(key).options["retry"]["max_attempts"] == 30
        sim.complete(key, {"i": i, "done": i == 3})
    assert sim.run.result == {"iterations": 4, "seen": [0, 1, 2, 3]}


def test_workflow_start_and_gather_schedule_several_steps_in_one_replay() -> None:
    sim = Sim(parallel, None).start()
    assert sim.open_steps() == ["a#1", "b#2", "c#3"]
    assert len(sim.transactions) == 1
    assert [sim.row(k).input for k in sim.open_steps()] == [1, 2, 3]
    sim.complete("c#3", "C")
    sim.complete("a#1", "A")
    assert sim.run.state == "running"
    sim.complete("b#2", "B")
    assert sim.run.result == {"a": "A", "b": "B", "c": "C"}


def test_workflow_parallel_steps_sleep_and_map() -> None:
    sim = Sim(cs.parallel_sleep, 3).start()
    assert sim.open_steps() == ["echo#1", "echo#2", "echo#3"]
    timer = sim.row("sleep#4")
    assert (timer.kind, timer.state, timer.due_in, timer.input) == ("timer", "pending", 0.3, None)
    sim.complete("echo#2", 2)
    sim.fire_timer("sleep#4")
    assert sim.row("sleep#4").state == "completed"
    assert sim.open_steps() == ["echo#1", "echo#3"]
    sim.complete("echo#3", 3)
    sim.complete("echo#1", 1)
    assert sim.open_steps() == ["square#5", "square#6", "square#7"]
    assert [sim.row(f"square#{i}").input for i in (5, 6, 7)] == [1, 2, 3]
    for i in (7, 5, 6):
        sim.complete(f"square#{i}", sim.row(f"square#{i}").input ** 2)
    assert (sim.run.state, sim.run.result) == ("completed", [1, 4, 9])


def test_workflow_map_fans_out_and_returns_results_in_order() -> None:
    sim = Sim(mapper, ["p", "q"]).start()
    assert sim.open_steps() == ["a#1", "a#2"]
    sim.complete("a#2", "Q")
    sim.complete("a#1", "P")
    assert sim.run.result == ["P", "Q"]
    empty = Sim(mapper, []).start()
    assert (empty.run.state, empty.run.result, empty.step_keys()) == ("completed", [], [])


def test_a_step_failure_caught_by_the_workflow_lets_it_continue() -> None:
    sim = Sim(fallback, "x").start()
    sim.fail("a#1", "Boom", "primary is down")
    assert sim.run.state == "running"
    assert sim.open_steps() == ["b#2"]
    assert "primary is down" in sim.row("b#2").input
    assert "'a'" in sim.row("b#2").input and "'fallback'" in sim.row("b#2").input
    sim.complete("b#2", "secondary")
    assert (sim.run.state, sim.run.result) == ("completed", "secondary")


def test_an_uncaught_step_failure_compensates_in_reverse_order() -> None:
    sim = Sim(booking, "x").start()
    sim.complete("a#1", "A")
    sim.complete("b#2", "B")
    sim.complete("c#3", "C")
    sim.fail("d#4", "Boom", "d failed")
    assert sim.run.state == "compensating"
    assert sim.run.error["type"] == "saga.workflow.StepFailed"
    assert "d failed" in sim.run.error["message"]
    assert sim.open_steps() == ["compensate:b#2"]
    assert sim.row("compensate:b#2").input == "B"
    sim.complete("compensate:b#2")
    assert sim.open_steps() == ["compensate:a#1"]
    assert sim.row("compensate:a#1").max_attempts == cs.BRIEF.max_attempts == 2
    sim.complete("compensate:a#1")
    assert sim.run.state == "compensated"
    assert sim.step_keys(kind="compensation") == ["compensate:b#2", "compensate:a#1"]


def test_a_workflow_failing_past_its_pivot_is_not_compensated() -> None:
    sim = Sim(pivoting, None).start()
    sim.complete("a#1", "A")
    sim.complete("b#2", "B")
    sim.fail("c#3", "Boom", "c failed")
    assert (sim.run.state, sim.run.error["pivot_passed"]) == ("failed", True)
    assert sim.step_keys(kind="compensation") == []


@pytest.mark.parametrize(
    ("changed", "asks"), [(deploys_changed, "action 'c'"), (deploys_sleeps, "timer 'sleep'")]
)
def test_a_workflow_diverging_from_its_journal_fails_without_compensating(
    changed: Any, asks: str
) -> None:
    sim = Sim(deploys, None, run_id="div").start()
    sim.complete("a#1", "A")
    assert sim.open_steps() == ["b#2"]
    sim.definition = changed  # a deploy: same name and version, other code
    sim.complete("b#2", "B")
    assert sim.run.state == "failed"
    assert sim.run.error["type"] == "saga.workflow.NonDeterminismError"
    message = sim.run.error["message"]
    assert "action 'a'" in message and asks in message
    assert "call 1" in message and "'div'" in message
    assert sim.step_keys(kind="compensation") == []
    assert sim.states() == {"a#1": "completed", "b#2": "completed"}, "the journal is left as is"


def test_workflow_sleep_schedules_a_pending_timer() -> None:
    sim = Sim(deploys_sleeps, None).start()
    timer = sim.row("sleep#1")
    assert (timer.kind, timer.state, timer.due_in, timer.max_attempts) == (
        "timer",
        "pending",
        1.0,
        1,
    )
    assert sim.open_steps() == []
    assert sim.step_messages() == [], "a timer gets its message when it falls due"
    sim.fire_timer("sleep#1")
    assert sim.open_steps() == ["b#2"]


def test_wait_event_schedules_a_waiting_step_and_the_event_completes_it() -> None:
    sim = Sim(cs.approval, {"amount": 3, "timeout": 60}, run_id="ap").start()
    sim.complete("reserve#1", {"reservation": "ap:reserve#1"})
    wait = sim.row("approval#2")
    assert (wait.kind, wait.state, wait.due_in) == ("event", "waiting", 60)
    assert sim.open_steps() == []
    assert sim.send_event("approval", {"approved": True}) is True
    assert sim.row("approval#2").state == "completed"
    assert sim.open_steps() == ["echo#3"]
    assert sim.row("echo#3").input == {"approved": True}
    sim.complete("echo#3", {"approved": True})
    assert sim.run.result == {"held": "ap:reserve#1", "decision": {"approved": True}}


def test_wait_event_without_timeout_waits_forever() -> None:
    sim = Sim(cs.approval, {}).start()
    sim.complete("reserve#1", {"reservation": "r"})
    assert sim.row("approval#2").due_in == math.inf


def test_an_event_sent_before_the_wait_is_consumed_and_journaled_without_waiting() -> None:
    sim = Sim(cs.approval, {"timeout": 60}, run_id="early").start()
    assert sim.send_event("approval", "yes") is False
    assert sim.step_keys() == ["reserve#1"]
    sim.complete("reserve#1", {"reservation": "x"})
    got = sim.row("approval#2")
    assert (got.kind, got.state, got.result, got.position) == ("event", "completed", "yes", 2)
    assert got.idempotency_key == "early:approval#2"
    assert got.completed_seq is not None
    assert sim.open_steps() == ["echo#3"]
    assert sim.row("echo#3").input == "yes"
    assert [e.consumed_by is not None for e in sim.db.events] == [True]


def test_events_are_consumed_one_per_wait_in_order() -> None:
    sim = Sim(two_waits, None).start()
    assert sim.row("ping#1").state == "waiting"
    assert sim.send_event("other", 0) is False
    assert sim.send_event("ping", 1) is True
    assert sim.row("ping#2").state == "waiting"
    assert sim.send_event("ping", 2) is True
    assert sim.run.result == [1, 2]
    assert [(e.name, e.consumed_by) for e in sim.db.events] == [("other", None)]


def test_events_sent_early_are_consumed_in_order_in_one_replay() -> None:
    sim = Sim(step_then_two_waits, None).start()
    assert sim.send_event("ping", "first") is False
    assert sim.send_event("ping", "second") is False
    assert sim.send_event("ping", "third") is False
    sim.complete("a#1", "A")
    assert (sim.run.state, sim.run.result) == ("completed", ["first", "second"])
    assert sim.states() == {"a#1": "completed", "ping#2": "completed", "ping#3": "completed"}
    assert [e.consumed_by is not None for e in sim.db.events] == [True, True, False]


def test_an_event_wait_timing_out_raises_event_timeout_in_the_workflow() -> None:
    sim = Sim(patient, None).start()
    assert sim.row("go#1").due_in == 5
    sim.time_out_event("go#1")
    assert sim.row("go#1").error["type"] == ErrorType.EVENT_TIMEOUT
    assert sim.open_steps() == ["a#2"]
    assert sim.row("a#2").input == "timed out"


def test_an_uncaught_event_timeout_compensates() -> None:
    sim = Sim(cs.approval, {"timeout": 1}).start()
    sim.complete("reserve#1", {"reservation": "held"})
    sim.time_out_event("approval#2")
    assert sim.run.state == "compensating"
    assert sim.run.error["type"] == "saga.workflow.EventTimeout"
    assert sim.open_steps() == ["compensate:reserve#1"]
    assert sim.row("compensate:reserve#1").fn_ref == "tests.coordinator_sagas:release"
    assert sim.row("compensate:reserve#1").input == {"reservation": "held"}
    sim.complete("compensate:reserve#1")
    assert sim.run.state == "compensated"
    with pytest.raises(OperatorError):
        sim.send_event("approval", "too late")


def test_a_workflow_that_returns_finishes_with_the_json_of_its_result() -> None:
    sim = Sim(summarise, None).start()
    sim.complete("a#1", ["x", "y"])
    assert sim.run.state == "completed"
    assert sim.run.result == {"count": 2, "names": ["x", "y"]}


def test_a_workflow_returning_something_not_json_fails_the_run() -> None:
    sim = Sim(unserialisable, None).start()
    sim.complete("a#1", 1)
    assert sim.run.state == "failed"
    assert "not JSON-serialisable" in sim.run.error["message"]
    assert "'unserialisable'" in sim.run.error["message"]


@pytest.mark.parametrize("definition", [cs.trip, three], ids=["graph", "workflow"])
def test_a_run_of_another_version_fails_with_definition_changed(definition: Any) -> None:
    sim = Sim(definition, TRIP, run_id="old", saga_version="0+old").start()
    assert sim.run.state == "failed"
    assert sim.run.error["type"] == "saga.coordinator.DefinitionChangedError"
    message = sim.run.error["message"]
    assert "'0+old'" in message and repr(definition.version_tag) in message
    assert "'old'" in message
    assert sim.step_keys() == []


def test_a_graph_changed_under_a_running_run_fails_it_at_the_next_advance() -> None:
    sim = trip_to_branches()
    sim.definition = cs.fan  # a deploy that changed what the ref names
    sim.complete("flight", booked("flight"))
    assert sim.run.state == "failed"
    assert sim.run.error["type"] == "saga.coordinator.DefinitionChangedError"
    assert sim.states()["hotel"] == "cancelled"


# -- idempotency keys -------------------------------------------------------------------------


def test_idempotency_keys_are_run_id_and_step_key_and_stable_across_attempts() -> None:
    assert idempotency_key("r1", "flight") == "r1:flight"
    sim = trip_to_branches(run_id="run-7")
    sim.fail("hotel", "Flaky", "again", retry_in=0.1)
    sim.redispatch("hotel")
    sim.complete("hotel", booked("hotel"))
    assert sim.row("hotel").attempt == 2
    sim.complete("flight", booked("flight"))
    sim.fail("car", "Boom", "no")
    sim.complete("compensate:car")
    sim.complete("compensate:flight")
    assert {r.step_key: r.idempotency_key for r in sim.rows()} == {
        key: f"run-7:{key}"
        for key in (
            "quote",
            "flight",
            "hotel",
            "car",
            "compensate:car",
            "compensate:hotel",
            "compensate:flight",
        )
    }
    wf = Sim(parallel, None, run_id="run-8", db=sim.db).start()
    assert [r.idempotency_key for r in wf.rows()] == ["run-8:a#1", "run-8:b#2", "run-8:c#3"]


def test_keys_carry_the_runs_prefix_for_its_steps_and_compensations() -> None:
    assert idempotency_key("r1", "flight", "prod") == "prod:r1:flight"
    sim = trip_to_branches(run_id="run-7", key_prefix="prod")
    sim.complete("flight", booked("flight"))
    sim.complete("hotel", booked("hotel"))
    sim.fail("car", "Boom", "no")
    sim.complete("compensate:car")
    sim.complete("compensate:hotel")
    undo = sim.row("compensate:flight").options["undo"]
    assert undo["idempotency_key"] == "prod:run-7:flight"  # what the compensation undoes by
    keys = ["quote", "flight", "hotel", "car", "compensate:car", "compensate:hotel"]
    assert {r.idempotency_key for r in sim.rows()} == {
        f"prod:run-7:{key}" for key in [*keys, "compensate:flight"]
    }
    wf = Sim(parallel, None, run_id="run-8", key_prefix="prod").start()
    assert [r.idempotency_key for r in wf.rows()][:1] == ["prod:run-8:a#1"]


def test_the_same_steps_of_two_runs_get_distinct_keys() -> None:
    db = MemoryDB()
    one = Sim(sagas.two, {}, run_id="one", db=db).start()
    two = Sim(sagas.two, {}, run_id="two", db=db).start()
    assert one.row("step1").idempotency_key != two.row("step1").idempotency_key


# -- bugs -------------------------------------------------------------------------------------


def test_retry_of_a_failed_run_resumes_its_cancelled_branches() -> None:
    sim = Sim(cs.fan, 3).start()
    sim.complete("split", [0, 1, 2])
    sim.fail("square[1]", "Bug", "fixed by the next deploy")  # nothing to undo
    assert sim.run.state == "failed"
    assert sim.states()["square[2]"] == "cancelled"
    sim.retry()
    assert "square[1]" in sim.open_steps()
    for i in range(3):
        if f"square[{i}]" in sim.open_steps():
            sim.complete(f"square[{i}]", i * i)
    assert sim.open_steps() == ["total"]


def test_retry_of_a_failed_workflow_resumes_its_cancelled_steps() -> None:
    sim = Sim(parallel, None).start()
    sim.fail("a#1", "Bug", "fixed by the next deploy")
    assert sim.run.state == "failed"
    sim.retry()
    sim.complete("a#1", "A")
    for key in ("b#2", "c#3"):
        if key in sim.open_steps():
            sim.complete(key, key[0].upper())
    assert (sim.run.state, sim.run.result) == ("completed", {"a": "A", "b": "B", "c": "C"})


def test_a_lease_expiring_while_compensating_does_not_stall_the_compensation() -> None:
    sim = trip_to_branches()
    sim.complete("flight", booked("flight"))
    sim.claim("hotel")
    sim.fail("car", "Boom", "car failed")
    assert (sim.run.state, sim.step_keys(kind="compensation")) == ("compensating", [])
    sim.expire_lease("hotel")  # its worker died
    assert sim.run.state != "compensating" or sim.open_steps(), "nothing left to move the run"


def test_workflow_code_mutating_a_result_does_not_change_the_journal() -> None:
    from saga.coordinator import JournalRow
    from saga.run_transaction import JournalCache

    cache = JournalCache()
    row = JournalRow("s#1", "s", "action", "completed", 1, {"items": [1]}, None, 1, None, {})
    cache.put("r", 1, {"s#1": row})
    _, rows = cache.get("r")
    from saga.coordinator import _private

    copied = _private(rows["s#1"].result)
    copied["items"].append(2)
    assert cache.get("r")[1]["s#1"].result == {"items": [1]}


single = Saga("single", [step(a)])


@pytest.mark.parametrize(
    ("definition", "run_input", "outcomes"),
    [
        (single, 1, [("a", "A")]),
        (sagas.ten, {"n": 0}, [(f"step{i}", {"n": i}) for i in range(1, 11)]),
        (cs.fan, 2, [("split", [0, 1]), ("square[1]", 1), ("square[0]", 0), ("total", "t")]),
        (diamond, 7, [("b", "B"), ("a", "A"), ("e", "E"), ("c", "C"), ("d", "D")]),
    ],
    ids=["single", "chain", "fan", "diamond"],
)
def test_only_a_one_step_run_finishes_without_reading_the_journal(
    definition: Saga, run_input: Any, outcomes: list[tuple[str, Any]]
) -> None:
    """A one-step saga's step completes its run with its result unread; a bigger graph's last
    completion reads the journal to learn whether every other step is done (a forked run may
    have other steps open even behind a chain's last step)."""
    sim = Sim(definition, run_input).start()
    for key, result in outcomes:
        sim.complete(key, result)
    assert sim.run.state == "completed"
    reads = sim.transactions[-1].journal_reads
    assert reads == (0 if len(definition.steps) == 1 else 1), reads
