"""Redis Sentinel as the broker: a private redis-server and a sentinel watching it, started by
the test; the relay and worker find the master through the sentinel by its name."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from saga.client import SagaClient
from saga.settings import Settings
from tests import sagas
from tests.processes import ProcessGroup, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_saga_runs_through_a_sentinel(
    settings: Settings, procs: ProcessGroup, tmp_path: Path
) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs redis-server")
    master, sentinel = free_port(), free_port()
    procs.command("master", [server, "--port", str(master), "--save", "", "--appendonly", "no"], {})
    conf = tmp_path / "sentinel.conf"  # the sentinel rewrites it: a file of its own
    conf.write_text(f"port {sentinel}\nsentinel monitor saga-master 127.0.0.1 {master} 1\n")
    procs.command("sentinel", [server, str(conf), "--sentinel"], {})
    wait_until(lambda: listening(master) and listening(sentinel), 20, "redis and its sentinel")

    via_sentinel = settings.model_copy(
        update={
            "broker_url": f"sentinel://127.0.0.1:{sentinel}/0",
            "broker_sentinel_master": "saga-master",
        }
    )
    procs.relay(via_sentinel)
    procs.worker(via_sentinel, "sentinel")
    with SagaClient(via_sentinel) as client:
        run_id = client.start(sagas.ten, {"n": 3})
        assert client.result(run_id, timeout=60)["trail"] == list(range(1, 11))
