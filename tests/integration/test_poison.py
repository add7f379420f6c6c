"""No message can stop or stall a worker: poison messages on a real broker, then a real step.

One prefork worker (one pool child) and one relay per broker serve every case of the module.
Each case publishes one raw bad message with kombu (or, for Redis envelopes, pushes the raw list
item), then runs a two-step saga behind it, and checks that the worker is alive, the saga
completed, the bad message is gone from the queue (and, on Redis, from the unacked set), and
that the worker wrote exactly one log line about it: the rejection, naming its task id.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import amqp
import kombu
import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from saga.client import SagaClient
from saga.settings import Settings
from tests import sagas
from tests.conftest import ADMIN_URL, BROKER_URL, REDIS_URL, unavailable
from tests.processes import ROOT, Process, ProcessGroup, wait_until

AMQP_URL = os.environ.get("SAGA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@dataclass
class Stack:
    broker: str  # "redis" or "amqp"
    settings: Settings
    worker: Process
    client: SagaClient
    connection: kombu.Connection
    redis: redis.Redis | None
    child_pid: int = 0  # the pool child that ran the first run's steps

    def pids(self, run_id: str) -> set[int]:
        """The processes that ran the run's steps (the test sagas record their pid)."""
        assert self.settings.database_url
        with psycopg.connect(self.settings.database_url) as conn:
            rows = conn.execute("SELECT pid FROM test_calls WHERE run_id = %s", (run_id,))
            return {int(row[0]) for row in rows.fetchall()}

    @property
    def queue(self) -> str:
        return self.settings.queue

    def ready(self, queue: str) -> int:
        """Messages waiting in ``queue``, as the broker counts them."""
        if self.redis is not None:
            return int(self.redis.llen(queue))
        channel = self.connection.default_channel
        return int(channel.queue_declare(queue=queue, passive=True).message_count)

    def unacked(self, queue: str) -> int:
        """Messages of ``queue`` delivered and not yet acked (Redis keeps them in a hash)."""
        if self.redis is None:
            return 0  # RabbitMQ counts them only in its management API; see the teardown
        entries = self.redis.hvals("unacked")
        return sum(1 for raw in entries if json.loads(raw)[2] == queue)

    def publish(
        self,
        body: bytes | str,
        headers: dict[str, Any],
        content_type: str = "application/json",
        queue: str | None = None,
    ) -> None:
        with self.connection.Producer() as producer:
            producer.publish(
                body,
                exchange="",  # the default exchange routes by queue name on both brokers
                routing_key=queue or self.queue,
                headers=headers,
                content_type=content_type,
                content_encoding="utf-8",
                retry=False,
            )

    def publish_not_utf8_content_type(self, task_id: str) -> None:
        """An AMQP message whose content type is not UTF-8 (py-amqp could not decode its
        properties and stopped the worker, which stopped each one it was redelivered to)."""
        channel = self.connection.default_channel
        channel.basic_publish(
            NotUtf8ContentType(
                body(ghost(task_id)), content_type=NOT_UTF8, headers=headers(task_id)
            ),
            exchange="",
            routing_key=self.queue,
        )

    def push_raw(self, item: str) -> None:
        """A raw item on the Redis list that is the queue: what kombu reads and parses."""
        assert self.redis is not None
        self.redis.lpush(self.queue, item)


NOT_UTF8 = "NOT-UTF8/json"


class NotUtf8ContentType(amqp.Message):
    """py-amqp encodes only valid UTF-8: the encoded properties are edited instead."""

    def _serialize_properties(self) -> bytes:
        raw: bytes = super()._serialize_properties()
        assert raw.count(NOT_UTF8.encode()) == 1
        return raw.replace(b"NOT-", b"\xff\xfe\xff\xfe")  # same length: the frame stays whole


def headers(task_id: str, task: str = "saga.step", **fields: Any) -> dict[str, Any]:
    """Celery protocol 2 headers as Celery sends them, built by hand."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "poison-test",
        "ignore_result": True,
        **fields,
    }


NO_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body(kwargs: Any, args: Any = (), embed: Any = None) -> str:
    return json.dumps([list(args), kwargs, NO_EMBED if embed is None else embed])


def ghost(task_id: str) -> dict[str, str]:
    """Arguments naming a step that does not exist: valid, so only the side door is at fault
    (without the intake, the task would run, log "does not exist" and succeed)."""
    return {"run_id": f"ghost-{task_id}", "step_key": "step1"}


def signature(task: str, queue: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "task": task,
        "args": [],
        "kwargs": kwargs,
        "options": {"queue": queue},
        "subtask_type": None,
        "immutable": True,
    }


def envelope(task_id: str, queue: str, encoded_body: Any, **properties: Any) -> dict[str, Any]:
    """kombu's Redis list item for a message (``properties`` replace kombu's)."""
    return {
        "body": encoded_body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers(task_id),
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            **properties,
        },
    }


@dataclass(frozen=True)
class Kind:
    name: str
    send: Callable[[Stack, str], None]
    cause: str  # a fragment of the log line's cause
    named: bool = True  # the log line names the task id (not so for an unreadable list item)
    redis_only: str | None = None  # why the kind exists only on Redis
    amqp_only: str | None = None  # why the kind exists only on RabbitMQ


def later(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


KINDS = [
    Kind("body_empty_list", lambda s, t: s.publish("[]", headers(t)), "not [args, kwargs"),
    Kind("body_empty_object", lambda s, t: s.publish("{}", headers(t)), "not [args, kwargs"),
    Kind("body_null", lambda s, t: s.publish("null", headers(t)), "not [args, kwargs"),
    Kind("body_not_json", lambda s, t: s.publish('[[], {"run', headers(t)), "not JSON"),
    Kind("body_not_utf8", lambda s, t: s.publish(b"\xff\xfe[]", headers(t)), "not JSON"),
    Kind(
        "wrong_types",
        lambda s, t: s.publish(body({"run_id": 1, "step_key": ["s"]}), headers(t)),
        "bad task arguments",
    ),
    Kind(
        "line_break_in_a_field",
        lambda s, t: s.publish(body({**ghost(t), "x\nFAKE LOG LINE": 1}), headers(t)),
        "x\\nFAKE LOG LINE",  # escaped: the log line stays one line
    ),
    Kind(
        "kwargs_not_object",
        lambda s, t: s.publish(json.dumps([[], [1], {}]), headers(t)),
        "kwargs not an object",
    ),
    Kind(
        "positional_args",
        lambda s, t: s.publish(body({}, args=["r", "s"]), headers(t)),
        "keyword arguments only",
    ),
    Kind(
        "nul_in_run_id",
        lambda s, t: s.publish(body({"run_id": "r\x00un", "step_key": "s"}), headers(t)),
        "NUL",
    ),
    Kind(
        "nul_in_step_key",
        lambda s, t: s.publish(body({"run_id": "r", "step_key": "s\x00"}), headers(t)),
        "NUL",
    ),
    Kind(
        "unpaired_surrogate",
        lambda s, t: s.publish('[[], {"run_id": "\\ud800", "step_key": "s"}, {}]', headers(t)),
        "unable to parse raw data as a unicode string",
    ),
    Kind(
        "oversized_body",
        lambda s, t: s.publish(body({"run_id": "x" * 2_000_000, "step_key": "s"}), headers(t)),
        "over 16384",
    ),
    Kind(
        "oversized_headers",
        lambda s, t: s.publish(body(ghost(t)), headers(t, kwargsrepr="x" * 50_000)),
        "headers exceed 16384 bytes",
    ),
    Kind(
        "compressed",
        lambda s, t: s.publish(
            zlib.compress(body(ghost(t)).encode() + b" " * 20_000_000),
            headers(t, compression="application/x-gzip"),
        ),
        "compressed ('application/x-gzip')",
    ),
    Kind(
        "unknown_task",
        lambda s, t: s.publish(body(ghost(t)), headers(t, task="nope.nothing")),
        "unknown task 'nope.nothing'",
    ),
    Kind(
        "task_name_not_a_string",
        lambda s, t: s.publish(body(ghost(t)), headers(t, task=["saga.step"])),
        "unknown task ['saga.step']",
    ),
    Kind(
        "celery_builtin_map",
        lambda s, t: s.publish(
            json.dumps([[signature("saga.step", s.queue, **ghost(t)), [[]]], {}, NO_EMBED]),
            headers(t, task="celery.map"),
        ),
        "unknown task 'celery.map'",
    ),
    Kind(
        "no_task_header",
        lambda s, t: s.publish(
            json.dumps({"task": "saga.step", "id": t, "args": [], "kwargs": ghost(t)}),
            {"id": t},
        ),
        "no task header",
    ),
    Kind(
        "bad_task_id",
        lambda s, t: s.publish(body(ghost(t)), {**headers(t), "id": [t]}),
        "task id is missing",
    ),
    Kind(
        "binary_content",
        lambda s, t: s.publish(
            body(ghost(t)).encode(), headers(t), content_type="application/data"
        ),
        "only application/json",
    ),
    Kind(
        "pickle",
        lambda s, t: s.publish(
            pickle.dumps(([], ghost(t), NO_EMBED)),
            headers(t),
            content_type="application/x-python-serialize",
        ),
        "only application/json in utf-8 is accepted",
    ),
    Kind(
        "eta",
        lambda s, t: s.publish(body(ghost(t)), headers(t, eta=later(1))),
        "sets eta=",
    ),
    Kind(
        "countdown",
        lambda s, t: s.publish(body(ghost(t)), headers(t, countdown=3600)),
        "sets countdown=",
    ),
    Kind(
        "expires",
        lambda s, t: s.publish(body(ghost(t)), headers(t, expires=later(-1))),
        "sets expires=",
    ),
    Kind(
        "timelimit",
        lambda s, t: s.publish(body(ghost(t)), headers(t, timelimit=[0.001, 0.001])),
        "sets timelimit=",
    ),
    Kind(
        "soft_time_limit",
        lambda s, t: s.publish(body(ghost(t)), headers(t, timelimit=[None, 0.001])),
        "sets timelimit=",
    ),
    Kind(
        "group",
        lambda s, t: s.publish(body(ghost(t)), headers(t, group=str(uuid.uuid4()))),
        "sets group=",
    ),
    Kind(
        "errbacks",
        lambda s, t: s.publish(
            body(ghost(t), embed={**NO_EMBED, "errbacks": [signature("x", "y")]}), headers(t)
        ),
        "embeds errbacks=",
    ),
    Kind(
        "chain",
        lambda s, t: s.publish(
            body(ghost(t), embed={**NO_EMBED, "chain": [signature("x", "y")]}), headers(t)
        ),
        "embeds chain=",
    ),
    Kind(
        "chord",
        lambda s, t: s.publish(
            body(ghost(t), embed={**NO_EMBED, "chord": signature("x", "y")}), headers(t)
        ),
        "embeds chord=",
    ),
    Kind(
        "embed_not_object",
        lambda s, t: s.publish(json.dumps([[], ghost(t), [1]]), headers(t)),
        "embed is [1]",
    ),
    Kind(
        "amqp_content_type_not_utf8",
        lambda s, t: s.publish_not_utf8_content_type(t),
        "its AMQP properties cannot be decoded",
        named=False,
        amqp_only="AMQP frame properties; a Redis envelope is JSON (see redis_not_json_item)",
    ),
    Kind(
        "redis_not_json_item",
        lambda s, t: s.push_raw(f"not json {t}"),
        "not a kombu envelope: JSONDecodeError",
        named=False,
        redis_only="a Redis list item; RabbitMQ frames have no JSON envelope",
    ),
    Kind(
        "redis_item_nested_past_the_recursion_limit",
        lambda s, t: s.push_raw("[" * 100_000),
        "not a kombu envelope: RecursionError",
        named=False,
        redis_only="a Redis list item; RabbitMQ frames have no JSON envelope",
    ),
    Kind(
        "redis_array_envelope",
        lambda s, t: s.push_raw(json.dumps([t, {"body": "W10="}])),
        "envelope is a JSON list",
        named=False,
        redis_only="a Redis list item; RabbitMQ frames have no JSON envelope",
    ),
    Kind(
        "redis_body_not_base64",
        lambda s, t: s.push_raw(json.dumps(envelope(t, s.queue, "a"))),
        "kombu cannot read it: Error",
        redis_only="the base64 body encoding is kombu's for Redis",
    ),
    Kind(
        "redis_body_not_a_string",
        lambda s, t: s.push_raw(json.dumps(envelope(t, s.queue, 123))),
        "kombu cannot read it: TypeError",
        redis_only="the base64 body encoding is kombu's for Redis",
    ),
    Kind(
        "redis_unknown_body_encoding",
        lambda s, t: s.push_raw(json.dumps(envelope(t, s.queue, "W10=", body_encoding="rot13"))),
        "kombu cannot read it: AttributeError",
        redis_only="the body encoding is kombu's for Redis",
    ),
    Kind(
        "redis_delivery_tag_not_a_string",
        lambda s, t: s.push_raw(json.dumps(envelope(t, s.queue, "W10=", delivery_tag=[1]))),
        "no delivery tag",
        redis_only="the delivery tag of a Redis message is kombu's",
    ),
    Kind(
        "redis_envelope_without_properties",
        lambda s, t: s.push_raw(json.dumps({"body": "W10=", "headers": headers(t)})),
        "no properties object",
        redis_only="a Redis list item; RabbitMQ frames have no JSON envelope",
    ),
]


@pytest.fixture(scope="module", params=["redis", "amqp"])
def stack(
    request: pytest.FixtureRequest,
    admin_conn: psycopg.Connection[tuple[object, ...]],
    template_db: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    broker: str = request.param
    url = BROKER_URL if broker == "redis" else AMQP_URL
    connection = kombu.Connection(url, connect_timeout=3)
    try:
        connection.ensure_connection(max_retries=1)
    except Exception as exc:  # kombu raises the transport's own error types
        connection.release()
        unavailable("Redis" if broker == "redis" else "RabbitMQ", exc)
    # redis-py's form of the same server (kombu spells a unix socket redis+socket://)
    client: redis.Redis | None = redis.Redis.from_url(REDIS_URL) if broker == "redis" else None
    name = f"saga_poison_{uuid.uuid4().hex[:10]}"
    admin_conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    tmp = tmp_path_factory.mktemp(f"poison-{broker}")
    settings = Settings(
        database_url=make_conninfo(ADMIN_URL, dbname=name),
        broker_url=url,
        queue=f"t-poison-{uuid.uuid4().hex[:8]}",
        lease_seconds=2.0,
        dispatch_timeout_seconds=4.0,
        relay_poll_seconds=0.2,
        state_dir=Path(tmp) / "state",
    )
    procs = ProcessGroup(Path(tmp) / "logs")
    worker = procs.prefork_worker(settings)
    procs.relay(settings)
    with SagaClient(settings) as saga_client:
        s = Stack(broker, settings, worker, saga_client, connection, client)
        try:
            # A first run: the worker has declared its queue and consumes.
            first = saga_client.start(sagas.two, {})
            assert saga_client.result(first, timeout=60)
            (s.child_pid,) = s.pids(first)
            yield s
            # Whatever the worker still held unacked (an ETA message, say) goes back to the
            # queue when it stops: none may be left (RabbitMQ's unacked count is not otherwise
            # visible without its management API).
            assert worker.alive(), "the worker died"
            worker.stop()
            assert worker.popen.returncode == 0, "a worker asked to stop exits 0"
            assert s.ready(s.queue) == 0, "the worker held a message unacked until it stopped"
        finally:
            procs.stop_all()
            if request.node.session.testsfailed:
                print(procs.logs_tail())
            if client is not None:
                client.delete(s.queue)
                client.close()
            else:
                connection.default_channel.queue_delete(s.queue)
                connection.default_channel.exchange_delete(s.queue)  # Celery declared it
            connection.release()
            admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_step_behind(stack: Stack) -> None:
    """A real run queued behind the bad message completes, and the worker is still up."""
    run_id = stack.client.start(sagas.two, {})
    wait_until(
        lambda: not stack.worker.alive() or stack.client.run(run_id).state == "completed",
        60,
        f"run {run_id} to finish",
    )
    assert stack.worker.alive(), f"the worker exited with status {stack.worker.popen.poll()}"
    assert stack.client.result(run_id, timeout=5)["trail"] == [1, 2]
    # A forged time limit had Celery kill the pool child; it is the first run's still.
    assert stack.pids(run_id) == {stack.child_pid}, "the pool child was replaced"


def new_log(worker: Process, since: int) -> list[str]:
    return worker.log()[since:].splitlines()


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_poison_message_is_rejected_and_the_worker_runs_the_next_step(
    stack: Stack, kind: Kind
) -> None:
    if kind.redis_only and stack.broker != "redis":
        pytest.skip(f"Redis only: {kind.redis_only}")
    if kind.amqp_only and stack.broker != "amqp":
        pytest.skip(f"RabbitMQ only: {kind.amqp_only}")
    task_id = f"poison-{kind.name}-{uuid.uuid4().hex[:8]}"
    since = len(stack.worker.log())
    kind.send(stack, task_id)

    run_step_behind(stack)
    wait_until(
        lambda: stack.ready(stack.queue) == 0 and stack.unacked(stack.queue) == 0,
        30,
        "the queue to hold nothing, ready or unacked",
    )

    lines = new_log(stack.worker, since)
    rejected = [line for line in lines if "rejected malformed task message" in line]
    assert len(rejected) == 1, f"one log line for the message, got {rejected}"
    assert kind.cause in rejected[0].replace(task_id, "")
    if kind.named:
        assert task_id in rejected[0]
        # Celery never took it in: no "Received task" line, no traceback naming it.
        assert [line for line in lines if task_id in line] == rejected
    assert not [line for line in lines if "Traceback" in line]


def test_a_forged_callback_publishes_nothing(stack: Stack) -> None:
    other = f"{stack.queue}-other"
    if stack.redis is None:  # a queue of its own to count in; Redis lists need no declaring
        stack.connection.default_channel.queue_declare(queue=other, durable=True, auto_delete=False)
    try:
        task_id = f"poison-callbacks-{uuid.uuid4().hex[:8]}"
        callback = signature("saga.advance", other, run_id=f"forged-{task_id}")
        stack.publish(
            body(ghost(task_id), embed={**NO_EMBED, "callbacks": [callback]}), headers(task_id)
        )
        run_step_behind(stack)
        wait_until(lambda: stack.ready(stack.queue) == 0, 30, "the queue to be empty")
        assert stack.ready(other) == 0, "the forged callback was published"
        assert f"rejected malformed task message {task_id}: embeds callbacks=" in (
            stack.worker.log()
        )
    finally:
        if stack.redis is None:
            stack.connection.default_channel.queue_delete(other)
        else:
            stack.redis.delete(other)


def test_a_worker_stopped_by_an_unrecoverable_error_exits_non_zero(settings: Settings) -> None:
    # Celery's worker_main dropped the status: such a worker exited 0, and a supervisor that
    # restarts on failure left it down.
    done = subprocess.run(
        [sys.executable, "-m", "tests.failing_worker"],
        env=settings.child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Unrecoverable error" in done.stderr + done.stdout
    assert done.returncode == 1, done.stderr[-2000:]
