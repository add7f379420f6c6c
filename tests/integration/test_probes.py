"""Probes, /metrics and JSON logs of real worker and relay processes.

Postgres and the broker are cut by TCP proxies between them and the processes (the shared
servers keep running for the other tests)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from saga.client import SagaClient
from saga.settings import Settings
from saga_dev.otlp_receiver import OTLPReceiver
from tests.metric_names import ALERTS_ONLY, DASHBOARD
from tests.processes import Process, ProcessGroup, wait_until
from tests.tcp_proxy import TcpProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def through(url: str, proxy: TcpProxy) -> str:
    """The broker URL with the proxy as its host."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
def proxies(settings: Settings) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    assert settings.database_url and settings.broker_url
    db, broker = conninfo_to_dict(settings.database_url), urlsplit(settings.broker_url)
    pg = TcpProxy(str(db.get("host") or "127.0.0.1"), int(db.get("port") or 5432))
    redis = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 6379)
    yield pg, redis
    pg.close()
    redis.close()


def ready(port: int) -> dict[str, Any] | None:
    status, body = get(port, "/readyz")
    return json.loads(body) if status in (200, 503) else None


def failing(port: int) -> set[str]:
    body = ready(port)
    return {"unreachable"} if body is None else {c["name"] for c in body["checks"] if not c["ok"]}


def expect_probes(ports: dict[str, int], failed: set[str], what: str) -> None:
    """Each process's /readyz comes to fail exactly ``failed``; its /healthz stays 200."""
    for name, port in ports.items():
        wait_until(lambda p=port: failing(p) == failed, 60, f"{name} {what}")  # type: ignore[misc]
        status, body = get(port, "/healthz")
        assert status == 200, f"{name}: {body}"


def test_probes_turn_unready_when_postgres_or_the_broker_is_cut(
    settings: Settings, procs: ProcessGroup, proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    pg, redis = proxies
    assert settings.database_url and settings.broker_url
    cut_off = settings.model_copy(
        update={
            "database_url": make_conninfo(
                settings.database_url, host="127.0.0.1", port=str(pg.port)
            ),
            "broker_url": through(settings.broker_url, redis),
        }
    )
    ports = {"relay": free_port(), "worker": free_port()}
    procs.relay(cut_off, "relay", "--http-port", str(ports["relay"]))
    procs.worker(cut_off, "worker", "--http-port", str(ports["worker"]))
    # Alive throughout: restarting a process would not bring Postgres or the broker back.
    expect_probes(ports, set(), "ready")
    pg.cut()
    expect_probes(ports, {"postgres"}, "unready, Postgres cut")
    pg.restore()
    expect_probes(ports, set(), "ready again")
    redis.cut()
    expect_probes(ports, {"broker"}, "unready, broker cut")
    redis.restore()
    expect_probes(ports, set(), "ready again")
    # A network that stops answering fails the checks within their timeouts.
    pg.freeze()
    ports_ready = {"worker": ports["worker"]}  # the relay's own queries hang too (not alive)
    expect_probes(ports_ready, {"postgres"}, "unready, Postgres silent")
    redis.freeze()
    expect_probes(ports_ready, {"postgres", "broker"}, "unready, both silent")
    for proxy in (pg, redis):
        proxy.cut()
        proxy.restore()
    expect_probes(ports, set(), "ready again")
    # The worker still works after both cuts.
    with SagaClient(cut_off) as client:
        run_id = client.start("tests.ops_sagas:speaks", None)
        assert client.wait(run_id, timeout=60).state == "completed"
    # A solo worker serves the metrics it records itself, at each scrape.
    assert "saga_step_attempts_total" in names(ports["worker"])


def series(port: int) -> dict[str, list[Any]]:
    """/metrics parsed by prometheus_client's parser: samples by series name."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def names(port: int) -> set[str]:
    found = set()
    for name in series(port):
        for suffix in ("_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        found.add(name)
    return found


def test_metrics_carry_the_dashboards_names_from_a_prefork_worker_and_a_relay(
    settings: Settings, procs: ProcessGroup
) -> None:
    relay_port, worker_port = free_port(), free_port()
    procs.relay(settings, "relay", "--http-port", str(relay_port))
    procs.prefork_worker(settings, "--http-port", str(worker_port))
    # The relay publishes each run's first message (the client sends none itself), so it has
    # publishing metrics to show.
    with SagaClient(settings, publish=False) as client:
        undone = client.start("tests.ops_sagas:undone", None)
        assert client.wait(undone, timeout=60).state == "compensated"
        stuck = client.start("tests.ops_sagas:stuck", None)
        assert client.wait(stuck, timeout=60).state == "compensation_failed"
        waiting = client.start("tests.ops_sagas:waits", None)  # an active run
        wait_until(
            lambda: any(s.state == "waiting" for s in client.steps(waiting)), 30, "a waiting run"
        )
    worker_names = {
        "saga_step_duration_seconds",
        "saga_step_attempts_total",
        "saga_compensations_total",
        "saga_step_queue_wait_seconds",
        "saga_runs_finished_total",
    }
    # The prefork parent serves what its child recorded (written every few seconds).
    wait_until(lambda: worker_names <= names(worker_port), 60, "the child's metrics")
    relay_names = (DASHBOARD - worker_names) | ALERTS_ONLY
    wait_until(lambda: relay_names <= names(relay_port), 30, "the relay's metrics")
    assert names(worker_port) | names(relay_port) >= DASHBOARD

    worker = series(worker_port)
    compensated = [
        s
        for s in worker["saga_compensations_total"]
        if s.labels["saga_step_outcome"] == "completed"
    ]
    assert [(s.labels["saga_name"], s.value) for s in compensated] == [("undone", 1.0)]
    failed = [
        s for s in worker["saga_compensations_total"] if s.labels["saga_step_outcome"] == "failed"
    ]
    assert [(s.labels["saga_name"], s.value) for s in failed] == [("stuck", 1.0)]
    finished = {
        s.labels["saga_run_state"]: s.value
        for s in worker["saga_runs_finished_total"]
        if s.labels["saga_name"] == "undone"
    }
    assert finished == {"compensated": 1.0}
    relay = series(relay_port)
    active = {
        (s.labels["saga_name"], s.labels["saga_run_state"]) for s in relay["saga_runs_active"]
    }
    assert ("waits", "running") in active
    assert sum(s.value for s in relay["saga_workers"]) >= 1
    stuck_runs = [(s.labels["saga_name"], s.value) for s in relay["saga_runs_compensation_failed"]]
    assert stuck_runs == [("stuck", 1.0)]
    assert [s.value for s in relay["saga_steps_overdue"]] == [0.0]
    assert (
        relay["saga_outbox_published_total"][0].value >= 1
    )  # the first step; workers publish the rest


def json_records(process: Process) -> list[dict[str, Any]]:
    records = []
    for line in process.log().splitlines():
        if line.startswith('{"time"'):
            records.append(json.loads(line))
    return records


def test_json_logs_from_a_step_carry_the_run_step_attempt_trace_and_span(
    settings: Settings, procs: ProcessGroup, receiver: OTLPReceiver
) -> None:
    json_logs = settings.model_copy(update={"log_format": "json"})
    procs.relay(settings)
    worker = procs.worker(json_logs, "worker")
    with SagaClient(settings) as client:
        run_id = client.start("tests.ops_sagas:speaks", None)
        assert client.wait(run_id, timeout=60).state == "completed"

    def spoken() -> list[dict[str, Any]]:
        return [r for r in json_records(worker) if r["message"] == "inside the step speak"]

    (record,) = wait_until(spoken, 30, "the step's log record")  # type: ignore[misc]
    assert (record["run_id"], record["step_key"], record["attempt"]) == (run_id, "speak", 1)
    assert record["logger"] == "tests.ops_sagas" and record["level"] == "WARNING"

    def step_span() -> list[Any]:
        return [s for s in receiver.spans() if s.name == "step speak"]

    (span,) = wait_until(step_span, 30, "the step's span")  # type: ignore[misc]
    assert (record["trace_id"], record["span_id"]) == (span.trace_id, span.span_id)
    # The engine's own records in the attempt carry the ids too; none outside one has them.
    engine = [r for r in json_records(worker) if r["logger"].startswith("saga")]
    assert engine, "the worker logged as JSON"
    assert all("run_id" not in r or r["run_id"] == run_id for r in engine)
