"""The travel agent on real workers against the local model server and the outside service,
each a real process keeping its own count of what it was asked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from saga import SagaClient, Settings
from saga.agent import run_usage
from saga_dev.testing import ServerProcess
from saga_dev.travel_agent import travel_agent
from tests.processes import ProcessGroup, wait_until

Conn = psycopg.Connection[Any]
CLIENT_TIMEOUT = 0.5  # the model client's; the server's 'timeout' fault stalls longer


@pytest.fixture
def model(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        "saga_dev.testing.model_server",
        "--fault-rate",
        "0.15",
        "--seed",
        "5",
        "--timeout-seconds",
        "1.5",
        "--retry-after-seconds",
        "0.2",
        log=tmp_path / "model-server.log",
    ) as server:
        yield server


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(
        "saga_dev.testing.effects_server",
        "--fault-rate",
        "0.1",
        "--faults",
        "error",
        "--seed",
        "7",
        log=tmp_path / "effects-server.log",
    ) as server:
        yield server


@pytest.fixture
def agent_env(model: ServerProcess, service: ServerProcess) -> dict[str, str]:
    return {
        "SAGA_MODEL_BASE_URL": f"{model.url}/v1",
        "SAGA_MODEL_NAME": "scripted",
        "SAGA_MODEL_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT),
        "TRAVEL_SERVICE_URL": service.url,
    }


@pytest.fixture
def client(settings: Settings) -> Iterator[SagaClient]:
    with SagaClient(settings) as c:
        yield c


def task(trip: str, **extra: Any) -> dict[str, Any]:
    return {"trip": trip, "steps": 10, "backoff_seconds": 0.05, **extra}


def decide_keys(client: SagaClient, run_id: str) -> list[str]:
    return [s.idempotency_key for s in client.steps(run_id) if s.step_name == "decide"]


@pytest.mark.parametrize("async_model", [False, True], ids=["sync-model", "async-model"])
def test_agent_with_faults_and_a_kill_9_mid_completion_pays_each_completion_once(
    async_model: bool,
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    db: Conn,
    model: ServerProcess,
    service: ServerProcess,
    agent_env: dict[str, str],
) -> None:
    run_id = "trip-kill"
    # Besides the random faults: two known failed attempts, and the fifth completion held
    # open so that its worker can be killed while the model is answering it.
    model.control(
        force={
            f"{run_id}:decide#1": ["malformed"],
            f"{run_id}:decide#3": ["429"],
            f"{run_id}:decide#9": ["hold"],
        }
    )
    procs.relay(settings)
    procs.worker(settings, "w1", env=agent_env)
    procs.worker(settings, "w2", env=agent_env)
    spec = task(run_id, async_model=async_model)  # decide awaits openai.AsyncOpenAI, or not
    assert client.start(travel_agent, spec, run_id=run_id) == run_id

    held = f"{run_id}:decide#9"
    wait_until(lambda: held in model.stats(detail="0")["held"], 120, "the held completion")
    owner = db.execute(
        "SELECT lease_owner FROM saga_steps WHERE run_id = %s AND step_key = 'decide#9'",
        (run_id,),
    ).fetchone()
    assert owner is not None
    victim = next(p for p in procs.processes if f":{p.pid}:" in str(owner[0]))
    victim.kill()
    replacement = procs.worker(settings, "replacement", env=agent_env)

    result = client.result(run_id, timeout=180)
    assert result["turns"] == 10 and result["answer"]["answer"].startswith(f"Trip {run_id}")

    stats = model.stats()
    keys = decide_keys(client, run_id)
    assert len(keys) == 10
    # The model server's own count: each completed step's request was answered once, even
    # the one whose worker died mid-call (that caller hung up before any answer).
    assert {k: stats["by_key"][k]["ok"] for k in keys} == dict.fromkeys(keys, 1)
    assert all(stats["by_key"][k]["replayed"] == 0 for k in keys)
    assert stats["by_key"][held]["abandoned"] == 1
    assert stats["completions"] == 10
    assert all(c["ok"] <= 1 for c in stats["by_step"].values()), "no completion asked twice"
    assert stats["failed_attempts"] >= 2  # the forced ones at least, each retried

    steps = {s.step_key: s for s in client.steps(run_id)}
    assert steps["decide#1"].attempt >= 2 and steps["decide#3"].attempt >= 2
    assert steps["decide#9"].attempt >= 2

    effects = service.stats()
    assert effects["duplicate_key_requests"] == 0, effects["keys_seen_more_than_once"]
    assert effects["duplicate_effects"] == 0
    assert effects["bookings"] == {"active": 4, "cancelled": 0}
    assert effects["emails_sent"] == 1

    usage = run_usage(client.steps(run_id))
    assert usage.calls == 10
    assert usage.total.total_tokens == stats["usage"]["total_tokens"] > 0
    assert replacement.alive()


def test_malformed_completions_are_failed_attempts_retried_and_the_worker_lives(
    settings: Settings,
    procs: ProcessGroup,
    client: SagaClient,
    model: ServerProcess,
    service: ServerProcess,
    agent_env: dict[str, str],
) -> None:
    model.control(fault_rate=0.0)
    service.control(fault_rate=0.0)
    procs.relay(settings)
    worker = procs.worker(settings, "only", env=agent_env)

    # Prose where JSON was asked for, then a tool that was not offered: two failed attempts,
    # then a good completion. The final answer is malformed once too.
    model.control(
        force={"fixed:decide#1": ["malformed", "unknown_tool"], "fixed:decide#3": ["malformed"]}
    )
    run_id = client.start(travel_agent, task("fixed", steps=2), run_id="fixed")
    assert client.result(run_id, timeout=60)["turns"] == 2
    attempts = {s.step_key: s.attempt for s in client.steps(run_id)}
    assert attempts == {"decide#1": 3, "lookup_flights#2": 1, "decide#3": 2}

    # Out of attempts, the run fails with the model's mistake in plain words.
    model.control(force={"doomed:decide#1": ["unknown_tool", "malformed"]})
    doomed = client.start(travel_agent, task("doomed", attempts=2), run_id="doomed")
    run = client.wait(doomed, timeout=60)
    assert run.state == "failed"
    assert "not JSON where a JSON object was asked for" in run.error["message"]
    step = client.steps(doomed)[0]
    assert step.attempt == 2 and step.state == "failed"
    assert step.error["type"] == "saga.agent.llm.MalformedCompletion"
    assert worker.alive()
    assert model.stats()["by_key"]["doomed:decide#1"]["faults"] == 2
