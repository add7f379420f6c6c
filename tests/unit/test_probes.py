"""Liveness decisions of the probe server, without processes."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from saga.errors import ConfigurationError
from saga.health import Check
from saga.probes import Liveness, ProbeServer


def test_alive_while_a_loop_ticked_within_its_bound() -> None:
    liveness = Liveness()
    assert liveness.check() == (True, "starting")
    liveness.tick("consumer", -1.0)  # a bound that has always passed
    alive, detail = liveness.check()
    assert not alive and "consumer last ticked" in detail
    liveness.tick("heartbeat", 3600.0)  # another loop of the process still turns
    assert liveness.check()[0]


def test_a_paused_loop_is_alive_and_a_tick_resumes_it() -> None:
    liveness = Liveness()
    liveness.tick("consumer", -1.0)
    liveness.pause("consumer", "connecting to the broker")
    assert liveness.check() == (True, "consumer paused: connecting to the broker")
    liveness.tick("consumer", -1.0)
    assert not liveness.check()[0]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_server_answers_each_probe() -> None:
    liveness = Liveness()
    checks = [Check("postgres", True, "answers"), Check("broker", False, "refused")]
    server = ProbeServer("127.0.0.1", 0, liveness, lambda: checks, lambda: (b"m 1\n", "text/plain"))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(f"{base}/healthz")[0] == 200
        status, body = get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["summary"] == "broker: refused"
        checks[1] = Check("broker", True, "answers")
        assert get(f"{base}/metrics") == (200, b"m 1\n")
        assert get(f"{base}/nothing")[0] == 404
        liveness.tick("relay", -1.0)
        assert get(f"{base}/healthz")[0] == 503
    finally:
        server.close()


def test_a_port_in_use_is_a_configuration_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}.*Pick a free port"):
            ProbeServer("127.0.0.1", port, Liveness(), list)
    with pytest.raises(ConfigurationError, match="not a TCP port"):
        ProbeServer("127.0.0.1", 70000, Liveness(), list)
