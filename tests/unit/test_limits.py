"""Flow-control declarations (saga.limits): validation, keys and units worked out per run, the
gates a step's journal row carries and their order, and what the coordinator journals for graph
sagas, workflows and run-level limits. No services: the gates themselves (taken, refused,
handed over in Postgres) are tested in tests/integration."""

from __future__ import annotations

import json
import math
import re
from inspect import signature
from typing import Any

import pytest

from saga import Concurrency, RateLimit, coordinator
from saga.definition import Saga, StepContext, StepOptions, check_step_args, step
from saga.errors import DefinitionError, InputError
from saga.limits import check_priority, check_run_keys, gates_of
from saga.store_protocol import Store
from saga.workflow import WorkflowContext, workflow
from saga_dev.support_agent import estimated_tokens, support_agent
from tests.unit.memory_run import MemoryStore, Sim


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


# -- declarations: what is refused, and how clearly ---------------------------------------------

WHERE = "saga 's', step 'a'"


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (Concurrency(0), "Concurrency limit must be a positive int, got 0"),
        (Concurrency(-2), "Concurrency limit must be a positive int, got -2"),
        (Concurrency(True), "Concurrency limit must be a positive int, got True"),
        (Concurrency(1.5), "Concurrency limit must be a positive int, got 1.5"),  # type: ignore[arg-type]
        (Concurrency("3"), "Concurrency limit must be a positive int, got '3'"),  # type: ignore[arg-type]
        (Concurrency(1, name=""), "a concurrency limit's name must be a non-empty string"),
        (Concurrency(1, name="a:b"), "without ':' (at most 100 characters), got 'a:b'"),
        (Concurrency(1, name="x" * 101), "name must be a non-empty string without ':'"),
        (Concurrency(1, name=5), "name must be a non-empty string"),  # type: ignore[arg-type]
        (
            Concurrency(1, key=5),  # type: ignore[arg-type]
            "a concurrency limit's key must be a string or a function of the run's input, got int",
        ),
        (
            Concurrency(1, fair=["t"]),  # type: ignore[arg-type]
            "a concurrency limit's fair must be a string or a function of the run's input, got "
            "list",
        ),
    ],
)
def test_concurrency_declarations_are_checked(limit: Concurrency, message: str) -> None:
    with pytest.raises(DefinitionError, match=f"^{re.escape(WHERE)}: .*{re.escape(message)}"):
        Saga("s", [step(a, concurrency=limit)])


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (RateLimit("", 10), "a rate limit's name must be a non-empty string without ':'"),
        (RateLimit("a:b", 10), "got 'a:b'"),
        (RateLimit("llm", 0), "RateLimit limit must be a positive int"),
        (RateLimit("llm", False), "RateLimit limit must be a positive int"),
        (RateLimit("llm", 10, per=0), "RateLimit per must be a positive number of seconds"),
        (RateLimit("llm", 10, per=-1), "RateLimit per must be a positive number of seconds"),
        (RateLimit("llm", 10, per=math.inf), "RateLimit per must be a positive number"),
        (RateLimit("llm", 10, per=math.nan), "RateLimit per must be a positive number"),
        (RateLimit("llm", 10, per=True), "RateLimit per must be a positive number"),
        (RateLimit("llm", 10, per="60"), "RateLimit per must be"),  # type: ignore[arg-type]
        (RateLimit("llm", 10, key=1.5), "a rate limit's key must be a string or a function"),  # type: ignore[arg-type]
        (RateLimit("llm", 10, units=0), "RateLimit units must be a positive int or a function"),
        (RateLimit("llm", 10, units=True), "RateLimit units must be a positive int or a function"),
        (RateLimit("llm", 10, units="1"), "RateLimit units must be a positive int"),  # type: ignore[arg-type]
        (
            RateLimit("llm", 3, units=5),
            "a step taking 5 units can never fit a limit of 3 per 60.0 s; raise the limit or "
            "lower the units",
        ),
    ],
)
def test_rate_limit_declarations_are_checked(limit: RateLimit, message: str) -> None:
    with pytest.raises(DefinitionError, match=f"^{re.escape(WHERE)}: .*{re.escape(message)}"):
        Saga("s", [step(a, rate_limit=limit)])


def test_step_options_for_limits_are_checked() -> None:
    def refused(message: str, **options: Any) -> None:
        with pytest.raises(DefinitionError, match=f"^{re.escape(WHERE)}: {re.escape(message)}"):
            Saga("s", [step(a, **options)])

    refused("concurrency must be a saga.Concurrency", concurrency=3)
    refused("rate_limit must be a saga.RateLimit (or a list)", rate_limit="llm")
    refused("rate_limit must be a saga.RateLimit (or a list)", rate_limit=[RateLimit("x", 1), 2])
    refused("two rate limits of the same name", rate_limit=[RateLimit("x", 1), RateLimit("x", 2)])
    refused("priority must be an int between -1000000 and 1000000", priority=True)
    refused("priority must be an int between -1000000 and 1000000", priority=2_000_000)
    refused("priority must be an int", priority="high")
    # One rate limit, or several; a priority goes into the journaled options.
    one, two = RateLimit("rpm", 50), RateLimit("tpm", 1000, units=lambda v: 10)
    options = Saga("s", [step(a, rate_limit=one, priority=-3)]).get_step("a").options
    assert options.rate_limits == (one,) and options.to_json() == {"priority": -3}
    assert Saga("s", [step(a, rate_limit=[one, two])]).get_step("a").options.rate_limits == (
        one,
        two,
    )
    assert check_priority(-1_000_000, "w") == -1_000_000
    with pytest.raises(InputError, match="run 'r': priority must be an int"):
        check_priority(1.0, "run 'r'", InputError)


def body(ctx: WorkflowContext, value: Any) -> Any:
    return value


def test_definitions_check_their_run_limit() -> None:
    with pytest.raises(DefinitionError, match=r"^saga 's': concurrency must be a saga.Concurrency"):
        Saga("s", [a], concurrency=2)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match=r"^saga 's': Concurrency limit must be a positive"):
        Saga("s", [a], concurrency=Concurrency(0))
    with pytest.raises(DefinitionError, match=r"^workflow 'w': concurrency must be a saga.Conc"):
        workflow("w", concurrency=1)(body)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match=r"^workflow 'w': a concurrency limit's key must"):
        workflow("w", concurrency=Concurrency(1, key=3))(body)  # type: ignore[arg-type]


def test_check_step_args_knows_the_flow_control_options() -> None:
    check_step_args(
        {"concurrency": Concurrency(1), "rate_limit": RateLimit("x", 1), "priority": 1}, "w"
    )
    with pytest.raises(
        DefinitionError,
        match="'rate_limits' is not a step option \\(did you mean 'rate_limit'\\?\\)",
    ):
        check_step_args({"rate_limits": []}, "w")
    with pytest.raises(DefinitionError, match="did you mean 'concurrency'"):
        check_step_args({"concurency": Concurrency(1)}, "w")
    with pytest.raises(DefinitionError, match="did you mean 'priority'"):
        check_step_args({"priorty": 1}, "w")


# -- keys and units, worked out for a run -------------------------------------------------------


def test_a_key_is_a_string_or_a_function_of_the_runs_input() -> None:
    run = {"tenant": "acme", "user": 7, "flag": True, "none": None, "long": "x" * 201}

    def key_of(key: Any) -> str:
        return str(Concurrency(1, key=key).gate("d", run, "w", run_level=False)["gate"])

    assert key_of(None) == "c:d:"
    assert key_of("eu-west") == "c:d:eu-west"
    assert key_of(lambda r: r["tenant"]) == "c:d:acme"
    assert key_of(lambda r: r["user"]) == "c:d:7"  # an int is taken as its text
    for bad, got in (("flag", "bool"), ("none", "NoneType")):
        with pytest.raises(
            DefinitionError,
            match=f"^w: the limit's key function returned {got}; it must return a string",
        ):
            key_of(lambda r, bad=bad: r[bad])
    with pytest.raises(DefinitionError, match=r"^w: the limit's key function returned dict"):
        key_of(lambda r: r)
    with pytest.raises(DefinitionError, match=r"^w: a limit's key may be at most 200 characters"):
        key_of(lambda r: r["long"])
    with pytest.raises(DefinitionError, match="at most 200 characters"):
        key_of("y" * 201)
    # The fairness group is the key unless given; a function of the run's input too.
    fair = Concurrency(5, key="all", fair=lambda r: r["tenant"]).gate("d", run, "w", run_level=True)
    assert fair == {
        "gate": "c:d:all",
        "kind": "concurrency",
        "limit": 5,
        "fair": "acme",
        "run": True,
    }
    assert Concurrency(5, key="k").gate("d", run, "w", run_level=False)["fair"] == "k"
    assert Concurrency(5, name="svc").gate("d", run, "w", run_level=False)["gate"] == "c:svc:"


def test_units_are_a_function_of_the_steps_input_clamped_to_the_window() -> None:
    tokens = RateLimit("tpm", 1000, per=60, key=lambda r: r["tenant"], units=lambda v: v["tok"])

    def units(step_input: Any) -> Any:
        return tokens.gate({"tenant": "acme"}, step_input, "w")["units"]

    assert units({"tok": 300}) == 300
    assert units({"tok": 5000}) == 1000  # more than a window: it takes the whole window
    assert units({"tok": 0}) == 1 and units({"tok": -4}) == 1
    for bad in ("12", 2.5, True, None):
        with pytest.raises(
            DefinitionError, match=r"^w: the rate limit's units function must return an int"
        ):
            units({"tok": bad})
    assert tokens.gate({"tenant": "acme"}, {"tok": 3}, "w") == {
        "gate": "r:tpm:acme",
        "kind": "rate",
        "limit": 1000,
        "period": 60.0,
        "units": 3,
        "fair": "acme",
    }
    assert RateLimit("rpm", 10, per=1).gate(None, None, "w")["units"] == 1  # 1 per request


# -- the gates a step's journal row carries -----------------------------------------------------


def test_gates_are_the_runs_then_the_steps_concurrency_then_rate_limits() -> None:
    options = StepOptions(
        concurrency=Concurrency(2, key=lambda r: r["tenant"]),
        rate_limits=(RateLimit("rpm", 60), RateLimit("tpm", 9000, units=lambda v: len(v) * 100)),
    )
    gates = options.gates(
        "ask",
        {"tenant": "acme"},
        '"hello"',
        "w",
        run_limit=Concurrency(10, key="all", fair=lambda r: r["tenant"]),
        run_name="agent",
    )
    assert gates == [
        {"gate": "c:agent:all", "kind": "concurrency", "limit": 10, "fair": "acme", "run": True},
        {"gate": "c:ask:acme", "kind": "concurrency", "limit": 2, "fair": "acme"},
        {"gate": "r:rpm:", "kind": "rate", "limit": 60, "period": 60.0, "units": 1, "fair": ""},
        {"gate": "r:tpm:", "kind": "rate", "limit": 9000, "period": 60.0, "units": 500, "fair": ""},
    ]
    assert StepOptions().gates("ask", {}, "null", "w") == []
    assert not StepOptions().limited and options.limited
    # Taken in that order whatever order a row lists them in (a slot before budget, then by
    # name: the order saga_gate_release locks them in too).
    assert gates_of({"gates": gates[::-1]}) == gates
    assert gates_of({}) == [] and gates_of({"gates": None}) == []


# -- what the coordinator journals --------------------------------------------------------------


def c(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def undo(ctx: StepContext, value: Any) -> Any:
    raise AssertionError("never called")


def tenant(run: Any) -> str:
    return str(run["tenant"])


tokens = RateLimit("tpm", 1000, key=tenant, units=lambda v: v["tokens"])
limited = Saga(
    "limited",
    [
        step(a, concurrency=Concurrency(2, key=tenant), compensate=undo, priority=5),
        step(b, rate_limit=tokens),  # its input is a's result: the units are worked out from it
        c,
    ],
)
fanned = Saga("fanned", [a, step(b, map_over=a, rate_limit=tokens)])
per_tenant = Saga(
    "per_tenant", [step(a, compensate=undo), b], concurrency=Concurrency(3, key=tenant)
)
RUN = {"tenant": "acme"}


def gates(sim: Sim, step_key: str) -> list[dict[str, Any]]:
    return list(sim.row(step_key).options.get("gates") or [])


def test_a_graph_step_journals_its_gates_when_it_is_scheduled() -> None:
    sim = Sim(limited, RUN).start()
    assert sim.row("a").options == {
        "priority": 5,
        "gates": [{"gate": "c:a:acme", "kind": "concurrency", "limit": 2, "fair": "acme"}],
    }
    sim.complete("a", {"tokens": 250})
    assert gates(sim, "b") == [
        {
            "gate": "r:tpm:acme",
            "kind": "rate",
            "limit": 1000,
            "period": 60.0,
            "units": 250,
            "fair": "acme",
        }
    ]
    sim.complete("b", "done")
    assert "gates" not in sim.row("c").options  # no limits, no run limit: nothing to take


def test_each_fan_out_branch_takes_units_for_its_own_item() -> None:
    sim = Sim(fanned, RUN).start()
    assert "gates" not in sim.row("a").options
    sim.complete("a", [{"tokens": 30}, {"tokens": 5000}])
    assert [gates(sim, key)[0]["units"] for key in ("b[0]", "b[1]")] == [30, 1000]


def test_a_run_limit_is_the_first_gate_of_every_step_of_the_run() -> None:
    sim = Sim(per_tenant, RUN).start()
    run_gate = {"gate": "c:per_tenant:acme", "kind": "concurrency", "limit": 3, "fair": "acme"}
    assert gates(sim, "a") == [{**run_gate, "run": True}]
    sim.complete("a", 1)
    assert gates(sim, "b") == [{**run_gate, "run": True}]


def test_compensations_take_no_gates() -> None:
    for definition, failing in ((limited, "b"), (per_tenant, "b")):
        sim = Sim(definition, RUN).start()
        sim.complete("a", {"tokens": 1})
        sim.fail(failing)
        assert sim.run.state == "compensating"
        undo_a = sim.row("compensate:a").options
        assert "gates" not in undo_a and "priority" not in undo_a, undo_a


@workflow("wf_limits", concurrency=Concurrency(2, key=tenant, name="wf_runs"))
def wf_limits(ctx: WorkflowContext, value: Any) -> Any:
    first = ctx.step(a, value, concurrency=Concurrency(4, key=tenant), priority=1)
    ctx.sleep(5)
    got = ctx.wait_event("go")
    parts = ctx.map(b, [{"tokens": 10}, {"tokens": 20}], rate_limit=tokens)
    return [first, got, parts]


def test_workflow_steps_journal_their_gates_and_the_runs() -> None:
    sim = Sim(wf_limits, RUN).start()
    run_gate = {"gate": "c:wf_runs:acme", "kind": "concurrency", "limit": 2, "fair": "acme"}
    [first] = sim.step_keys()
    assert sim.row(first).options == {
        "priority": 1,
        "gates": [
            {**run_gate, "run": True},
            # The key is the run's input, whatever the step's input.
            {"gate": "c:a:acme", "kind": "concurrency", "limit": 4, "fair": "acme"},
        ],
    }
    sim.complete(first, "x")
    [timer] = sim.step_keys(kind="timer")
    assert "gates" not in sim.row(timer).options  # a timer runs no code: no limit
    sim.fire_timer(timer)
    [event] = sim.step_keys(kind="event")
    assert "gates" not in sim.row(event).options
    sim.send_event("go", "yes")
    branches = sim.step_keys(kind="action")[1:]
    assert [[g["units"] for g in gates(sim, k) if g["kind"] == "rate"] for k in branches] == [
        [10],
        [20],
    ]
    assert all(gates(sim, k)[0] == {**run_gate, "run": True} for k in branches)


def test_the_memory_twin_keeps_a_runs_priority_as_the_store_does() -> None:
    store = MemoryStore()
    store.create_run(
        run_id="r",
        saga_name="limited",
        saga_ref="tests:limited",
        saga_version=limited.version_tag,
        input_json=json.dumps(RUN),
        trace_context={},
        timeout=None,
        start=lambda tx: coordinator.advance(tx, lambda _ref: limited),
        priority=9,
    )
    assert store.db.runs["r"].priority == 9
    # And takes what the protocol's methods take (PostgresStore is checked by mypy).
    for name, method in vars(Store).items():
        if callable(method) and not name.startswith("_"):
            want = [(p.name, p.kind, p.default) for p in signature(method).parameters.values()]
            got = [
                (p.name, p.kind, p.default)
                for p in signature(getattr(MemoryStore, name)).parameters.values()
            ]
            assert got == want, name


def test_the_readmes_support_agent_limits_runs_per_tenant_and_model_calls_per_account() -> None:
    ticket = {"tenant": "acme", "question": "How do I rotate my API key?"}
    sim = Sim(support_agent, ticket).start()
    [decide] = sim.step_keys()
    request = sim.row(decide).input
    run_gate = {"gate": "c:support_runs:acme", "kind": "concurrency", "limit": 5, "fair": "acme"}
    rate = {"kind": "rate", "period": 60.0, "fair": "shared"}
    assert gates(sim, decide) == [
        {**run_gate, "run": True},
        {"gate": "r:model_requests:shared", "limit": 500, "units": 1, **rate},
        {
            "gate": "r:model_tokens:shared",
            "limit": 200_000,
            "units": estimated_tokens(request),
            **rate,
            "tokens": True,  # saga.agent.complete reports the provider's count
        },
    ]
    assert (
        estimated_tokens(request) == 800 + sum(len(m["content"]) for m in request["messages"]) // 4
    )
    call = {"id": "c1", "name": "search_docs", "arguments": {"query": "api key"}}
    sim.complete(decide, {"model": "m", "tool_calls": [call]})
    [search] = sim.step_keys("dispatched")
    assert gates(sim, search) == [{**run_gate, "run": True}]  # the tool: only the run's slot
    # A tenant with its own provider account has budgets of its own.
    own = Sim(support_agent, {**ticket, "model_account": "acme-key"}).start()
    assert [g["gate"] for g in gates(own, own.step_keys()[0])][1:] == [
        "r:model_requests:acme-key",
        "r:model_tokens:acme-key",
    ]


def test_a_key_function_that_fails_on_the_runs_input_fails_at_start() -> None:
    limits = [Concurrency(3, key=lambda run: run["tenant"], name="per_tenant")]
    check_run_keys(limits, {"tenant": "a"}, "run 'r1'")
    with pytest.raises(InputError, match=r"key function of limit 'per_tenant' fails.*KeyError"):
        check_run_keys(limits, {"user": "a"}, "run 'r1'")
    with pytest.raises(DefinitionError, match="must return a string"):
        check_run_keys([Concurrency(1, key=lambda run: [1])], {}, "run 'r1'")
